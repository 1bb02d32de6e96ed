"""Similarity: per-feature transfer distributions, log-density histograms, the base vs finetuned
log-density scatter with the detection floor (click a point to open the feature), parallel
coordinates, and how well each matching score separates the seed twin's pairs from random ones."""

import math

import streamlit as st

from explorer import figures
from webapp import data, state, ui

run = state.run_picker()
st.title("Similarity")

MAX_POINTS = 20000
N_BINS = 50

with state.guard():
    source = state.source_picker(run)
    sae = state.sae_param(run)
    st.session_state["similarity_sae"] = sae
    sae = st.selectbox(
        "SAE", run.saes, key="similarity_sae", format_func=lambda s: figures.SAE_LABELS.get(s, s),
        on_change=lambda: state.set_params(sae=st.session_state["similarity_sae"]),
    )
    state.set_params(sae=sae, feature=None)
    ui.legend()

    st.subheader("Per-feature transfer (pairing by identity)")
    c1, c2, c3 = st.columns(3)
    if source:
        st.caption(f"Every per-feature number below is computed on the {ui.plain(source)} tokens alone (logit similarity does not depend on tokens).")
    h = data.histogram(run, sae, "act_similarity", N_BINS, -1.0, 1.0, source=source)
    c1.plotly_chart(figures.binned_histogram(h, "Activation similarity", "Pearson r over tokens (base vs finetuned)", "features"), key="sim_act")
    c1.caption(f"{h.attrs.get('n', 0):,} features; {h.attrs.get('n_nan', 0):,} without a value (constant, e.g. dead, on a model) are not drawn.")
    h = data.histogram(run, sae, "logit_similarity", N_BINS)
    c2.plotly_chart(figures.binned_histogram(h, "Logit similarity", "Pearson r over the vocabulary", "features"), key="sim_logit")
    c2.caption("Caveat: high logit similarity mostly reflects an unchanged unembedding W_U; it says little about the feature.")
    h = data.histogram(run, sae, "act_error", N_BINS, source=source)
    eps = (run.config.get("thresholds") or {}).get("act_error_eps", 1e-10)
    c3.plotly_chart(figures.binned_histogram(h, "Activation error", f"mean |Δ log10(f + {eps:g})| over tokens", "features"), key="sim_err")
    c3.caption(f"Depends on eps = {eps:g}; useful for dead features, where the correlation is undefined.")

    st.subheader("Feature density on each model")
    hists = {m: data.histogram(run, sae, f"density_{m}", N_BINS, -10.0, 0.0, log_density=True, source=source) for m in figures.MODELS}
    st.plotly_chart(figures.two_model_histogram(hists, "Log-density histograms", "log10(density + 1e-10)  (−10 = never fires)"), key="sim_density")

    @state.fragment
    def scatter() -> None:
        reg = data.density_regression(run, sae, source=source)
        reg_alive = data.density_regression(run, sae, alive_on_both=True, source=source)
        pts = data.scatter_sample(run, sae, MAX_POINTS, source)
        summ = run.manifest.get("summary") or {}
        sig = ((summ.get("by_source") or {}).get(sae) or {}).get(source) if source else (summ.get("significance") or {}).get(sae)
        n_counted = (run.manifest.get("sources") or {}).get(source) if source else run.manifest.get("n_counted_tokens")
        floor = None
        if sig and isinstance(n_counted, (int, float)) and n_counted > 0 and sig.get("detection_floor"):
            floor = math.log10(sig["detection_floor"] / n_counted + 1e-10)
        a, b, c = st.columns(3)
        a.metric("Pearson R, all features", ui.fmt(reg["r"], ".3f"), help="of log10(density + 1e-10) on base vs on finetuned, over every feature (dead ones sit at −10)")
        b.metric("Pearson R, alive on both", ui.fmt(reg_alive["r"], ".3f"), help=f"over the {reg_alive['n']:,} features that fire on both models")
        c.metric("least-squares slope", ui.fmt(reg_alive["slope"], ".3f"), help=f"finetuned = {ui.fmt(reg_alive['intercept'], '.3f')} + slope × base, over the features alive on both (the drawn line)")
        st.caption("For scale (Study T): R = 0.47 for Gemma-2b → python-codes, 0.94 for Mistral-7B → MetaMath.")
        if pts.attrs.get("n_total", len(pts)) > len(pts):
            st.caption(f"Showing a fixed sample of {len(pts):,} of {pts.attrs['n_total']:,} features; R and the line use all of them.")
        event = st.plotly_chart(
            figures.density_scatter(pts, reg_alive, floor=floor, floor_label=f"detection floor: {sig['detection_floor']} firings" if floor is not None else ""),
            key="sim_scatter", on_select="rerun", selection_mode="points",
        )
        st.caption(
            "Click a point to open that feature. The line is the least-squares fit over the features alive on both models "
            "(features dead on a model sit at −10 and would pull it; they stay out of it)."
            + (f" Left of (below) the green dotted line a feature fires fewer than {sig['detection_floor']} times on base (finetuned): "
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
    st.caption("One line per feature (the same sample as the scatter). Drag along an axis to filter; features with no similarity value sit below the axis.")
    st.plotly_chart(figures.parallel_coordinates(data.scatter_sample(run, sae, MAX_POINTS, source)), key="sim_parcoords")

    st.subheader("Matching scores: telling the same feature from another")
    sep = data.score_separation(run)
    if sep.empty:
        st.info(
            "This run has no seed twin of the base SAE, so the matching scores cannot be compared. Add `[saes.base_sae_twin]` "
            "(the base SAE's recipe with another seed) to the precompute config."
        )
    else:
        m = (run.manifest.get("summary") or {}).get("matching") or {}
        chosen = m.get("score")
        st.caption(
            "The base SAE and its seed twin (same model, data and settings, another seed) are assigned one-to-one on each score; "
            "the assigned pairs should be the same feature, random pairs should not. The AUC is the chance that an assigned pair "
            f"outscores a random one. The run uses **{ui.plain(chosen)}** (the highest AUC) for best matches, born and lost."
        )
        st.plotly_chart(figures.roc_curves(sep, chosen), key="sim_roc")
        kinds = list(dict.fromkeys(sep["score"]))
        cols = st.columns(3)
        for i, kind in enumerate(kinds):
            cols[i % 3].plotly_chart(figures.score_separation(sep, kind), key=f"sim_sep_{i}")
