"""Similarity: per-feature transfer distributions, log-density histograms, the base vs finetuned
log-density scatter with the detection floor (click a point to open the feature), parallel
coordinates, and how well each matching score separates the seed twin's pairs from random ones.
The figures are built once per (run, SAE, source, selection) and shared (webapp.charts)."""

import streamlit as st

from explorer.render import inert
from webapp import charts, data, state, ui, urlstate

run = state.run_picker()
st.title("Similarity")

with state.guard():
    source = state.source_picker(run, "similarity_source")
    sae = state.sae_picker(run, "similarity_sae")
    state.set_params(feature=None)  # a feature id means nothing on this page: not in its links
    n_both_dead = data.cross_class_counts(run, sae, source).get("both_dead", 0)
    show_dead = urlstate.widget(
        st.toggle, "both_dead", f"Show the {n_both_dead:,} features dead on both models", key="sim_both_dead", default=False, codec=urlstate.flag(),
        help="Hidden by default in the histograms, the scatter and the parallel coordinates: they never fire on either model, so they pile up at log-density −10. The Pearson R values always use every feature.",
    )
    hide = not show_dead
    figs = charts.similarity(run, sae, hide, source)
    ui.legend()
    scope = f"; the {n_both_dead:,} features dead on both models are hidden" if hide and n_both_dead else ""

    st.subheader("Per-feature transfer (pairing by identity)")
    if source:
        st.caption("Every per-feature number below is computed on the " + inert(source) + " tokens alone (logit similarity does not depend on tokens).")
    c1, c2, c3 = st.columns(3)
    h = data.histogram(run, sae, "act_similarity", charts.SIM_BINS, -1.0, 1.0, exclude_both_dead=hide, source=source)
    c1.plotly_chart(figs["act"], key="sim_act")
    c1.caption(f"{h.attrs.get('n', 0):,} features; {h.attrs.get('n_nan', 0):,} without a value (constant, e.g. dead, on a model) are not drawn{inert(scope)}.")
    c2.plotly_chart(figs["logit"], key="sim_logit")
    c2.caption("Caveat: high logit similarity mostly reflects an unchanged unembedding W_U; it says little about the feature.")
    c3.plotly_chart(figs["error"], key="sim_err")
    eps = (run.config.get("thresholds") or {}).get("act_error_eps", 1e-10)
    c3.caption(f"Depends on eps = {inert(eps)}; useful for dead features, where the correlation is undefined.")

    st.subheader("Feature density on each model")
    st.plotly_chart(figs["density"], key="sim_density")

    @state.fragment
    def scatter() -> None:
        reg = data.density_regression(run, sae, source=source)
        reg_alive = data.density_regression(run, sae, alive_on_both=True, source=source)
        pts = data.scatter_sample(run, sae, charts.MAX_POINTS, exclude_both_dead=hide, source=source)
        floor, n_floor = charts.detection_floor(run, sae, source)
        a, b, c = st.columns(3)
        a.metric("Pearson R, all features", ui.fmt(reg["r"], ".3f"), help="of log10(density + 1e-10) on base vs on finetuned, over every feature (dead ones sit at −10)")
        b.metric("Pearson R, alive on both", ui.fmt(reg_alive["r"], ".3f"), help=f"over the {reg_alive['n']:,} features that fire on both models")
        c.metric("least-squares slope", ui.fmt(reg_alive["slope"], ".3f"), help=f"finetuned = {ui.fmt(reg_alive['intercept'], '.3f')} + slope × base, over the features alive on both (the drawn line)")
        st.caption("For scale (Study T): R = 0.47 for Gemma-2b → python-codes, 0.94 for Mistral-7B → MetaMath.")
        if pts.attrs.get("n_total", len(pts)) > len(pts):
            st.caption(f"Showing a fixed sample of {len(pts):,} of {pts.attrs['n_total']:,} features; R and the line use all of them (the line, those alive on both).")
        elif hide and n_both_dead:
            st.caption(f"{len(pts):,} points: the {n_both_dead:,} features dead on both models (all at −10, −10) are hidden; “Pearson R, all features” still counts them.")
        event = st.plotly_chart(figs["scatter"], key="sim_scatter", on_select="rerun", selection_mode="points")
        st.caption(
            "Click a point to open that feature. The line is the least-squares fit over the features alive on both models "
            "(features dead on a model sit at −10 and would pull it; they stay out of it)."
            + (f" Left of (below) the green dotted line a feature fires fewer than {n_floor:d} times on base (finetuned): "
               "even if it never fires on the other model, the paired test cannot call it died (woke) at q < 0.01." if floor is not None else "")
        )
        points = (event.selection.points if event is not None and event.selection else []) or []
        for p in points:
            fid = p.get("customdata")
            if isinstance(fid, list):
                fid = fid[0] if fid else None
            if fid is None and p.get("point_index") is not None and p.get("curve_number", 0) == 0:
                fid = int(pts.iloc[int(p["point_index"])]["feature_id"])
            if fid is not None:
                ui.open_feature(run, sae, int(fid))

    st.subheader("Base vs finetuned log-density")
    scatter()

    st.subheader("Parallel coordinates")
    st.caption("One line per feature (the same features as the scatter). Drag along an axis to filter; features with no similarity value sit below the axis.")
    st.plotly_chart(figs["parcoords"], key="sim_parcoords")

    st.subheader("Matching scores: telling the same feature from another")
    sep = data.score_separation(run)
    if sep.empty:
        st.info(
            "This run has no seed twin of the base SAE, so the matching scores cannot be compared. Add `[saes.base_sae_twin]` "
            "(the base SAE's recipe with another seed) to the precompute config."
        )
    else:
        m = (run.manifest.get("summary") or {}).get("matching") or {}
        chosen = m.get("score") if isinstance(m, dict) else None
        st.caption(
            "The base SAE and its seed twin (same model, data and settings, another seed) are assigned one-to-one on each score; "
            "the assigned pairs should be the same feature, random pairs should not. The AUC is the chance that an assigned pair "
            "outscores a random one. The run uses **" + inert(chosen) + "** (the highest AUC) for best matches, born and lost."
        )
        sep_figs = charts.separation(run, chosen if isinstance(chosen, str) else None)
        st.plotly_chart(sep_figs["roc"], key="sim_roc")
        cols = st.columns(3)
        for i, kind in enumerate(dict.fromkeys(sep["score"])):
            cols[i % 3].plotly_chart(sep_figs[str(kind)], key=f"sim_sep_{i}")
