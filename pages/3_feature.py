"""Feature page: one feature of one SAE on both models. Deep link: /feature?run=&sae=&feature=N"""

import streamlit as st

from explorer import figures, render
from explorer.render import inert
from webapp import charts, data, state, ui, urlstate
from webapp import crosscoder as crosscoder_ui

run = state.run_picker()
st.title("Feature")

_FID_KEY = "feature_page_id"


def _on_pick() -> None:
    state.set_params(feature=int(st.session_state[_FID_KEY]))


with state.guard():
    c1, c2, _ = st.columns([1, 1, 2])
    sae = state.sae_picker(run, "feature_page_sae", c1)
    d_sae = run.d_sae(sae)
    fid = state.feature_param(run, sae)
    bad_param = fid is None and st.query_params.get(state.FEATURE_PARAM) not in (None, "")
    value = fid if fid is not None else 0
    if st.session_state.get(_FID_KEY) != value:
        st.session_state[_FID_KEY] = value  # the URL is the source of truth (restored on Back)
    c2.number_input(f"Feature (0 to {max(0, d_sae - 1):,d})", min_value=0, max_value=max(0, d_sae - 1), step=1, key=_FID_KEY, on_change=_on_pick)
    if fid is None:
        if not bad_param:
            st.info("Choose a feature above, or open one from the Features, Dead & born or Similarity pages.")
        st.stop()

    row = data.feature(run, sae, fid)
    if row is None:
        st.error(inert(f"Feature {fid} of {sae} is not in run {run.run_id!r}. The run may be incomplete; re-run its precompute."))
        st.stop()

    st.subheader(f"{ui.sae_label(sae)} · feature {fid:d}")
    ui.legend()
    ui.probe_link(run, sae, fid)

    dead_on = [m for m in figures.MODELS if not (ui.num(row.get(f"density_{m}"), 0.0) > 0)]
    if len(dead_on) == len(figures.MODELS):
        st.info(inert(
            f"This feature is dead on both models: it never fires on any of the run's counted tokens ({state.token_counts(run)}) "
            "So it has no activation histogram, no examples and no activation similarity; its logits and decoder neighbours below are still defined."
        ), icon=":material/block:")

    # ---- per-model statistics, side by side
    cols = st.columns(2)
    for col, m in zip(cols, figures.MODELS):
        with col:
            st.markdown(f"**On the {render.MODEL_LABELS[m]}** · status " + inert(row[f"status_{m}"]))
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
    d.metric("cross-model class", inert(str(row["cross_class"]).replace("_", " ")))
    st.caption(
        "Caveat on logit similarity: it is high whenever the unembedding W_U barely changed in finetuning, "
        "so it mostly measures W_U, and says little about whether the feature itself transferred."
    )

    hist = charts.activation(run, sae, fid)
    if hist is not None:
        st.plotly_chart(hist, key="feature_act_hist")
        if dead_on:
            st.caption(f"It never fires on the {render.MODEL_LABELS[dead_on[0]]}, so only the other model's histogram is drawn.")
        st.caption("Dotted lines: the edges of the quantile bins the quantile examples below are sampled from (hover one for its range).")

    # ---- examples: the same contexts on both models
    max_value = max(ui.num(row["max_act_base"], 0.0), ui.num(row["max_act_finetuned"], 0.0)) or 1.0
    st.markdown("### Top examples")
    st.caption(
        "Each window shows the same tokens on both models: the base line in blue, the finetuned line in orange, "
        "shaded by activation relative to this feature's max on either model; the outlined token is the selecting one. "
        "Hover a token for its activation."
    )
    cols = st.columns(2)
    for col, m in zip(cols, figures.MODELS):
        with col:
            st.markdown(f"**Top on the {render.MODEL_LABELS[m]}**, with the other model's activations")
            ui.feature_examples(run, sae, fid, m, "top", max_value, empty=f"No examples: the feature never fires on the {render.MODEL_LABELS[m]}.")

    st.markdown("### Quantile examples")
    # drawn on request: they are two thirds of the page's bytes (about 360 KB of HTML on the demo)
    if urlstate.widget(st.toggle, "quantiles", "Show the quantile examples (sampled within activation bins)", key="feature_quantiles", default=False, codec=urlstate.flag()):
        cols = st.columns(2)
        for col, m in zip(cols, figures.MODELS):
            with col:
                st.markdown("**" + inert(render.MODEL_LABELS[m].capitalize()) + "**")
                ui.feature_examples(run, sae, fid, m, "quantile", max_value, empty="No quantile examples.")

    # ---- logits
    st.markdown("### Logits: W_dec[i] @ W_U, each model's own unembedding")
    cols = st.columns(4)
    i = 0
    for m in figures.MODELS:
        for sign, label in (("pos", "top +"), ("neg", "top −")):
            ids = row.get(f"logit_{sign}_ids_{m}") or []
            vals = row.get(f"logit_{sign}_values_{m}") or []
            with cols[i]:
                st.markdown("**" + inert(f"{label}, {m}") + "**")
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
        st.markdown(f"### Best match in the {ui.sae_label(other)}")
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
                st.caption(f"One-to-one (Hungarian) partner: feature {aid:d}, score {ui.fmt(row['assigned_score'], '.3f')}")
            cands = data.candidate_matches(run, sae, fid, 10)
            if len(cands) > 1:
                with st.expander(f"{len(cands):d} candidate matches"):
                    st.dataframe(cands, hide_index=True, column_config={"other_feature_id": st.column_config.NumberColumn("feature", format="%d")})

    # ---- the crosscoder's latents nearest to this feature (issue 16; nothing without a crosscoder)
    crosscoder_ui.feature_links(run, sae, fid)
