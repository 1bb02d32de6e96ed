"""Similarity: per-feature transfer distributions, log-density histograms, the base vs finetuned
log-density scatter (click a point to open the feature) and parallel coordinates. The figures
are built once per (run, SAE, selection) and shared (webapp.charts)."""

import streamlit as st

from explorer.render import inert
from webapp import charts, data, state, ui, urlstate

run = state.run_picker()
st.title("Similarity")

with state.guard():
    sae = state.sae_picker(run, "similarity_sae")
    state.set_params(feature=None)  # a feature id means nothing on this page: not in its links
    n_both_dead = data.cross_class_counts(run, sae).get("both_dead", 0)
    show_dead = urlstate.widget(
        st.toggle, "both_dead", f"Show the {n_both_dead:,} features dead on both models", key="sim_both_dead", default=False, codec=urlstate.flag(),
        help="Hidden by default in the histograms, the scatter and the parallel coordinates: they never fire on either model, so they pile up at log-density −10. The Pearson R values always use every feature.",
    )
    hide = not show_dead
    figs = charts.similarity(run, sae, hide)
    ui.legend()
    scope = f"; the {n_both_dead:,} features dead on both models are hidden" if hide and n_both_dead else ""

    st.subheader("Per-feature transfer (pairing by identity)")
    c1, c2, c3 = st.columns(3)
    h = data.histogram(run, sae, "act_similarity", charts.SIM_BINS, -1.0, 1.0, exclude_both_dead=hide)
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
        reg = data.density_regression(run, sae)
        reg_alive = data.density_regression(run, sae, alive_on_both=True)
        pts = data.scatter_sample(run, sae, charts.MAX_POINTS, exclude_both_dead=hide)
        a, b, c = st.columns(3)
        a.metric("Pearson R, all features", ui.fmt(reg["r"], ".3f"), help="of log10(density + 1e-10) on base vs on finetuned, over every feature (dead ones sit at −10)")
        b.metric("Pearson R, alive on both", ui.fmt(reg_alive["r"], ".3f"), help=f"over the {reg_alive['n']:,} features that fire on both models")
        c.metric("least-squares slope", ui.fmt(reg["slope"], ".3f"), help=f"finetuned = {ui.fmt(reg['intercept'], '.3f')} + slope × base (all features)")
        st.caption("For scale (Study T): R = 0.47 for Gemma-2b → python-codes, 0.94 for Mistral-7B → MetaMath.")
        if pts.attrs.get("n_total", len(pts)) > len(pts):
            st.caption(f"Showing a fixed sample of {len(pts):,} of {pts.attrs['n_total']:,} features; R and the line use all of them.")
        elif hide and n_both_dead:
            st.caption(f"{len(pts):,} points: the {n_both_dead:,} features dead on both models (all at −10, −10) are hidden; R and the line use every feature.")
        event = st.plotly_chart(figs["scatter"], key="sim_scatter", on_select="rerun", selection_mode="points")
        st.caption("Click a point to open that feature.")
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
