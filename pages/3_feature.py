"""Feature page: one feature of one SAE on both models. Deep link: /feature?run=&sae=&feature=N"""

import math

import streamlit as st

from explorer import figures, render
from webapp import crosscoder as crosscoder_ui
from webapp import data, state, ui

run = state.run_picker()
st.title("Feature")

_SAE_KEY, _FID_KEY = "feature_page_sae", "feature_page_id"


def _on_pick() -> None:
    state.set_params(sae=st.session_state[_SAE_KEY], feature=st.session_state[_FID_KEY])


with state.guard():
    sae = state.sae_param(run)
    d_sae = run.d_sae(sae)
    fid = state.feature_param(run, sae)
    bad_param = fid is None and st.query_params.get(state.FEATURE_PARAM) not in (None, "")

    c1, c2, _ = st.columns([1, 1, 2])
    st.session_state[_SAE_KEY] = sae
    c1.selectbox("SAE", run.saes, key=_SAE_KEY, format_func=lambda s: figures.SAE_LABELS.get(s, s), on_change=_on_pick)
    st.session_state[_FID_KEY] = fid if fid is not None else 0
    c2.number_input(f"Feature (0 to {d_sae - 1})", min_value=0, max_value=max(0, d_sae - 1), step=1, key=_FID_KEY, on_change=_on_pick)
    if fid is None:
        if not bad_param:
            st.info("Choose a feature above, or open one from the Features, Dead & born or Similarity pages.")
        st.stop()
    state.set_params(sae=sae, feature=fid)

    row = data.feature(run, sae, fid)
    if row is None:
        st.error(f"Feature {fid} of {sae} is not in run {run.run_id!r}. The run may be incomplete; re-run its precompute.")
        st.stop()
    examples = data.feature_examples(run, sae, fid)

    st.subheader(f"{figures.SAE_LABELS.get(sae, sae)} · feature {fid}")
    ui.legend()

    # ---- per-model statistics, side by side
    cols = st.columns(2)
    for col, m in zip(cols, figures.MODELS):
        with col:
            st.markdown(f"**On the {render.MODEL_LABELS[m]}** · status `{row[f'status_{m}']}`")
            a, b, c = st.columns(3)
            a.metric("density", ui.density(row[f"density_{m}"]), help="share of tokens where the feature fires (> 0)")
            b.metric("max activation", ui.fmt(row[f"max_act_{m}"]))
            c.metric("mean when firing", ui.fmt(row[f"mean_active_act_{m}"]), help="mean over the tokens where it fires")

    # ---- across models
    st.markdown("**Across the two models** (same tokens)")
    a, b, c, d = st.columns(4)
    a.metric("activation similarity", ui.fmt(row["act_similarity"], ".3f"), help="Pearson correlation over tokens of this feature's activation on base vs finetuned; n/a when the feature is constant on one model")
    b.metric("activation error", ui.fmt(row["act_error"], ".3g"), help="mean |log10(f_base + eps) - log10(f_finetuned + eps)|, eps = 1e-10 (depends on eps)")
    c.metric("logit similarity", ui.fmt(row["logit_similarity"], ".4f"), help="Pearson over the vocabulary of W_dec[i] @ W_U(base) and W_dec[i] @ W_U(finetuned)")
    d.metric("cross-model class", str(row["cross_class"]).replace("_", " "))
    st.caption(
        "Caveat on logit similarity: it is high whenever the unembedding W_U barely changed in finetuning, "
        "so it mostly measures W_U, and says little about whether the feature itself transferred."
    )

    edges = run.manifest.get("act_hist_edges")
    if edges and any(row.get(f"act_hist_{m}") for m in figures.MODELS):
        st.plotly_chart(
            figures.activation_histograms(edges, {m: row[f"act_hist_{m}"] for m in figures.MODELS}, "Activation histogram (positive activations)"),
            key="feature_act_hist",
        )

    # ---- examples: the same contexts on both models
    max_value = max(float(row["max_act_base"] or 0), float(row["max_act_finetuned"] or 0)) or 1.0
    st.markdown("### Top examples")
    st.caption(
        "Each window shows the same tokens on both models: the base line in blue, the finetuned line in orange, "
        "shaded by activation relative to this feature's max on either model; the outlined token is the selecting one. "
        "Hover a token for its activation."
    )
    cols = st.columns(2)
    for col, m in zip(cols, figures.MODELS):
        top = examples[(examples["model"] == m) & (examples["kind"] == "top")]
        with col:
            st.markdown(f"**Top on the {render.MODEL_LABELS[m]}**, with the other model's activations")
            ui.show_examples(
                run, top, max_value,
                empty=f"No examples: the feature never fires on the {render.MODEL_LABELS[m]}.",
                caption_fn=lambda r: f"#{int(r.rank) + 1} · seq {int(r.seq_id)} pos {int(r.position)} · activation {float(r.activation):.3g}",
            )

    with st.expander("Quantile examples (sampled within activation bins)"):
        cols = st.columns(2)
        for col, m in zip(cols, figures.MODELS):
            q = examples[(examples["model"] == m) & (examples["kind"] == "quantile")]
            with col:
                st.markdown(f"**{render.MODEL_LABELS[m].capitalize()}**")
                ui.show_examples(
                    run, q, max_value, empty="No quantile examples.",
                    caption_fn=lambda r: f"bin {int(r.bin)} [{float(r.bin_low):.3g}, {float(r.bin_high):.3g}) · activation {float(r.activation):.3g}",
                )

    # ---- logits
    st.markdown("### Logits: W_dec[i] @ W_U, each model's own unembedding")
    cols = st.columns(4)
    i = 0
    for m in figures.MODELS:
        for sign, label in (("pos", "top +"), ("neg", "top −")):
            ids = row.get(f"logit_{sign}_ids_{m}") or []
            vals = row.get(f"logit_{sign}_values_{m}") or []
            with cols[i]:
                st.markdown(f"**{label}, {m}**")
                if ids:
                    st.html(render.token_list_html(data.token_strings(run, ids), vals, m))
                else:
                    st.caption("n/a")
            i += 1

    # ---- neighbours and the best match
    left, right = st.columns(2)
    with left:
        st.markdown("### Nearest features (decoder cosine)")
        nn_ids = list(row.get("nn_feature_ids") or [])
        nn_cos = list(row.get("nn_cosines") or [])
        if nn_ids:
            nn = data.features_by_ids(run, sae, tuple(int(x) for x in nn_ids), ("feature_id", "density_base", "density_finetuned", "top_tokens"))
            info = {int(r.feature_id): r for r in nn.itertuples(index=False)}
            for j, c in zip(nn_ids, nn_cos):
                r = info.get(int(j))
                extra = f" · density {ui.density(r.density_base)} / {ui.density(r.density_finetuned)}" if r is not None else ""
                ui.feature_link(run, sae, int(j), label=f"feature {int(j)} · cos {float(c):.3f}{extra}")
        else:
            st.caption("No neighbours stored.")
    with right:
        other = ui.OTHER_SAE[sae]
        st.markdown(f"### Best match in the {figures.SAE_LABELS.get(other, other)}")
        if other not in run.saes or row.get("match_feature_id") is None:
            st.caption("This run has one SAE: no cross-SAE match.")
        else:
            mid = int(row["match_feature_id"])
            ui.feature_link(run, other, mid, label=f"{figures.SAE_LABELS[other]} feature {mid}")
            a, b, c = st.columns(3)
            a.metric("combined score", ui.fmt(row["match_score"], ".3f"), help="0.5 × activation correlation (n/a as 0) + 0.5 × decoder cosine")
            b.metric("activation corr.", ui.fmt(row["match_act_corr"], ".3f"), help="this SAE on its model vs the other SAE on its model, same tokens")
            c.metric("decoder cosine", ui.fmt(row["match_dec_cos"], ".3f"))
            if row.get("assigned_feature_id") is not None:
                aid = int(row["assigned_feature_id"])
                st.caption(f"One-to-one (Hungarian) partner: feature {aid}, score {ui.fmt(row['assigned_score'], '.3f')}")
            cands = data.candidate_matches(run, sae, fid, 10)
            if len(cands) > 1:
                with st.expander(f"{len(cands)} candidate matches"):
                    st.dataframe(cands, hide_index=True, column_config={"other_feature_id": st.column_config.NumberColumn("feature", format="%d")})

    # ---- the crosscoder's latents nearest to this feature (issue 16; nothing without a crosscoder)
    crosscoder_ui.feature_links(run, sae, fid)
