"""Feature page: one feature of one SAE on both models. Deep link: /feature?run=&sae=&feature=N"""

import streamlit as st

from explorer import figures, render, schema
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

    # ---- is the change in firing real? (paired exact test)
    st.markdown("**Did its firing change?** (the same tokens on both models, paired)")
    cb, cf = int(ui.num(row.get("count_base"), 0.0)), int(ui.num(row.get("count_finetuned"), 0.0))
    a, b, c, d = st.columns(4)
    a.metric("fires on base", f"{cb:,}", help="counted tokens where it fires on the base model")
    b.metric("fires on finetuned", f"{cf:,}", help=f"if its density had not changed, the expected count is {cb:,}: the same tokens go through both models")
    c.metric("b / c", f"{int(ui.num(row.get('n_base_only'), 0.0)):,} / {int(ui.num(row.get('n_finetuned_only'), 0.0)):,}", help="b: tokens where it fires on base only; c: on the finetune only")
    d.metric("change class", inert(str(row.get("change_class") or "n/a").replace("_", " ")), help=f"q < {schema.SIGNIFICANCE_ALPHA:g} on the Benjamini-Hochberg q-value")
    st.caption(
        f"Exact McNemar test (two-sided binomial of c out of b + c at ½): p = {ui.fmt(row.get('p_value'), '.3g')}, "
        f"Benjamini-Hochberg q = {ui.fmt(row.get('q_value'), '.3g')} across this SAE's features. "
        f"log10 density ratio (finetuned / base, counts + 0.5) = {ui.fmt(row.get('log_density_ratio'), '.3f')}, 95% interval "
        f"[{ui.fmt(row.get('log_density_ratio_low'), '.3f')}, {ui.fmt(row.get('log_density_ratio_high'), '.3f')}] (Poisson approximation). "
        f"Δ mean activation when firing {ui.fmt(row.get('delta_mean_active_act'), '+.3g')}, Δ max {ui.fmt(row.get('delta_max_act'), '+.3g')}; "
        f"correlation of |Δf| with the models' KL over tokens {ui.fmt(row.get('kl_corr'), '.3f')}."
    )
    by_src = data.feature_by_source(run, sae, fid)
    if len(by_src) > 1:
        with st.expander(f"Per source ({len(by_src)} sources)"):
            st.dataframe(
                by_src[["source", "density_base", "density_finetuned", "count_base", "count_finetuned", "change_class", "q_value", "act_similarity", "mean_active_act_base", "mean_active_act_finetuned"]],
                hide_index=True, key="feature_by_source",
                column_config={
                    "source": st.column_config.TextColumn("source"),
                    "density_base": st.column_config.NumberColumn("density base", format="%.2e"),
                    "density_finetuned": st.column_config.NumberColumn("density finetuned", format="%.2e"),
                    "q_value": st.column_config.NumberColumn("q", format="%.2g"),
                    "act_similarity": st.column_config.NumberColumn("act. similarity", format="%.3f"),
                },
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

    st.markdown("### Logit effect: W_dec[i] @ (W_U(finetuned) − W_U(base))")
    st.caption("What the finetune's unembedding does differently with this feature's direction (the plain lists above look alike whenever W_U barely moved).")
    cols = st.columns(2)
    for col, (sign, label) in zip(cols, (("pos", "top + Δ logit"), ("neg", "top − Δ logit"))):
        ids = row.get(f"logit_effect_{sign}_ids") or []
        vals = row.get(f"logit_effect_{sign}_values") or []
        with col:
            st.markdown("**" + inert(label) + "**")
            if ids:
                st.html(render.token_list_html(data.token_strings(run, ids), vals, "finetuned", fmt="{:+.4f}"))
            else:
                st.caption("n/a")

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
            score = ((run.manifest.get("summary") or {}).get("matching") or {}).get("score")
            score = score if isinstance(score, str) and score else schema.DEFAULT_MATCH_SCORE  # a hand-edited manifest may hold anything
            a, b, c = st.columns(3)
            a.metric("match score", ui.fmt(row["match_score"], ".3f"), help="the run's matching score: " + inert(score) + " (" + inert(schema.MATCH_SCORE_DOCS.get(score, "")) + ")")
            b.metric("activation corr.", ui.fmt(row["match_act_corr"], ".3f"), help="this SAE on its model vs the other SAE on its model, same tokens")
            c.metric("decoder cosine", ui.fmt(row["match_dec_cos"], ".3f"))
            a, b, c = st.columns(3)
            a.metric("corr. when either fires", ui.fmt(row.get("match_cofire_corr"), ".3f"))
            b.metric("encoder cosine", ui.fmt(row.get("match_enc_cos"), ".3f"))
            if row.get("twin_match_score") is not None:
                c.metric("best match in the seed twin", ui.fmt(row.get("twin_match_score"), ".3f"), help="the same score against the base SAE's seed twin: what a match looks like without finetuning")
            if row.get("assigned_feature_id") is not None:
                aid = int(row["assigned_feature_id"])
                st.caption(f"One-to-one (Hungarian) partner: feature {aid:d}, score {ui.fmt(row['assigned_score'], '.3f')}")
            cands = data.candidate_matches(run, sae, fid, 10)
            if len(cands) > 1:
                with st.expander(f"{len(cands):d} candidate matches"):
                    st.dataframe(cands, hide_index=True, column_config={"other_feature_id": st.column_config.NumberColumn("feature", format="%d")})

    # ---- this feature and its best match in the other SAE, side by side: drawn for a born or lost
    # feature (its best match scores below the run's match threshold), on request for the others
    other = ui.OTHER_SAE[sae]
    match_thr = float((run.config.get("thresholds") or {}).get("match", 0.5))
    unmatched = not (ui.num(row.get("match_score"), float("nan")) >= match_thr)
    if other in run.saes and row.get("match_feature_id") is not None and (unmatched or urlstate.widget(
        st.toggle, "pair", f"Show it side by side with its best match (which scores at least the run's threshold, {match_thr:g})",
        key="feature_pair", default=False, codec=urlstate.flag(),
    )):
        mid = int(row["match_feature_id"])
        own = {"base_sae": "base", "finetuned_sae": "finetuned"}
        st.markdown(f"### Side by side: this feature and its best match ({figures.SAE_LABELS[other]} feature {mid:d})")
        st.caption("Each one's top examples on its own SAE's model (the base SAE on the base model, the finetuned SAE on the finetune), both models' activations on the same tokens.")
        partner = data.feature(run, other, mid) or {}
        left, right = st.columns(2)
        for col, s_, f_, r_ in ((left, sae, fid, row), (right, other, mid, partner)):
            with col:
                ui.feature_link(run, s_, f_, label=f"{figures.SAE_LABELS[s_]} feature {f_}")
                ex_ = data.feature_examples(run, s_, f_)
                top = ex_[(ex_["model"] == own[s_]) & (ex_["kind"] == "top")].head(3) if len(ex_) else ex_
                mv = max(ui.num(r_.get("max_act_base"), 0.0), ui.num(r_.get("max_act_finetuned"), 0.0)) or 1.0
                ui.show_examples(run, top, mv, empty=f"No top examples on the {render.MODEL_LABELS[own[s_]]}.",
                                 caption_fn=lambda r: f"#{int(r.rank) + 1} · activation {float(r.activation):.3g}")

    # ---- the crosscoder's latents nearest to this feature (issue 16; nothing without a crosscoder)
    crosscoder_ui.feature_links(run, sae, fid)
