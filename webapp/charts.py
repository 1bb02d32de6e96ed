"""The pages' plotly figures, built once per (run, selection) and shared: st.cache_resource.

A figure of explorer/figures.py takes 10-25 ms to build from the cached queries of
webapp/data.py, and as long to unpickle, so st.cache_data (which copies its value on every
hit) would save nothing; st.plotly_chart only reads a figure (it serializes a dict copy to JSON
in ~3 ms), so one shared object per key is safe. Keys: the Run (webapp.state.HASH_FUNCS: its
identity and manifest version) and the selection.
"""

from __future__ import annotations

import math

import numpy as np

import plotly.graph_objects as go
import streamlit as st

from explorer import figures
from webapp import data
from webapp.state import HASH_FUNCS, Run

_figure = lambda **kw: st.cache_resource(show_spinner=False, hash_funcs=HASH_FUNCS, **kw)  # noqa: E731

SIM_BINS = 50
MAX_POINTS = 20000


@_figure(max_entries=32)
def quality(run: Run, outliers: str, source: str | None = None) -> tuple[go.Figure, go.Figure]:
    """CE recovered and explained variance per (SAE, model), outliers included or excluded,
    pooled or on one source's tokens."""
    metrics = data.metrics(run, source)
    q = metrics[metrics["outliers"] == outliers]
    return (
        figures.quality_bars(q, "ce_recovered", "CE recovered", "CE recovered (1 = perfect)"),
        figures.quality_bars(q, "explained_variance", "Explained variance", "explained_variance (sae_lens, pooled)"),
    )


@_figure(max_entries=32)
def resid(run: Run) -> dict[str, go.Figure]:
    """Residual-stream similarity: a histogram per metric and the by-position curve."""
    pos, hists, _ = data.resid(run)
    out = {m: figures.resid_histogram(hists, m) for m in ("cosine", "l2", "seq_mean_cosine", "seq_mean_l2")}
    out["position"] = figures.resid_by_position(pos)
    return out


def detection_floor(run: Run, sae: str, source: str | None = None) -> tuple[float | None, int | None]:
    """log10(floor density + 1e-10) of the paired test's detection floor (the fewest firings on
    one model, none on the other, that can be called died or woke) and the floor in firings;
    (None, None) when the run has no significance summary for this SAE (and source)."""
    summ = run.manifest.get("summary") or {}
    summ = summ if isinstance(summ, dict) else {}
    if source:
        sig = ((summ.get("by_source") or {}).get(sae) or {}).get(source)
        n_counted = (run.manifest.get("sources") or {}).get(source)
    else:
        sig = (summ.get("significance") or {}).get(sae)
        n_counted = run.manifest.get("n_counted_tokens")
    floor = sig.get("detection_floor") if isinstance(sig, dict) else None
    if not isinstance(floor, (int, float)) or isinstance(floor, bool) or floor <= 0:
        return None, None
    if not isinstance(n_counted, (int, float)) or isinstance(n_counted, bool) or n_counted <= 0:
        return None, None
    return math.log10(floor / n_counted + 1e-10), int(floor)


@_figure(max_entries=32)
def similarity(run: Run, sae: str, exclude_both_dead: bool, source: str | None = None) -> dict[str, go.Figure]:
    """The Similarity page's figures (the same queries as its captions, webapp.data), pooled or
    on one source's tokens (logit similarity does not depend on tokens)."""
    kw = dict(exclude_both_dead=exclude_both_dead, source=source)
    eps = (run.config.get("thresholds") or {}).get("act_error_eps", 1e-10)
    try:
        eps_text = f"{float(eps):g}"
    except (TypeError, ValueError):
        eps_text = "eps"
    pts = data.scatter_sample(run, sae, MAX_POINTS, **kw)
    floor, n_floor = detection_floor(run, sae, source)
    return {
        "act": figures.binned_histogram(data.histogram(run, sae, "act_similarity", SIM_BINS, -1.0, 1.0, **kw), "Activation similarity", "Pearson r over tokens (base vs finetuned)", "features"),
        "logit": figures.binned_histogram(data.histogram(run, sae, "logit_similarity", SIM_BINS, exclude_both_dead=exclude_both_dead), "Logit similarity", "Pearson r over the vocabulary", "features"),
        "error": figures.binned_histogram(data.histogram(run, sae, "act_error", SIM_BINS, **kw), "Activation error", f"mean |Δ log10(f + {eps_text})| over tokens", "features"),
        "density": figures.two_model_histogram(
            {m: data.histogram(run, sae, f"density_{m}", SIM_BINS, -10.0, 0.0, log_density=True, **kw) for m in figures.MODELS},
            "Log-density histograms", "log10(density + 1e-10)  (−10 = never fires)",
        ),
        # the line is the fit over the features alive on both models: the dead sentinel at -10 stays out
        "scatter": figures.density_scatter(pts, data.density_regression(run, sae, alive_on_both=True, source=source), floor=floor,
                                           floor_label=f"detection floor: {n_floor} firings" if floor is not None else ""),
        "parcoords": figures.parallel_coordinates(pts),
    }


@_figure(max_entries=32)
def kl(run: Run, source: str | None = None) -> dict[str, go.Figure]:
    """Where the models' predictions differ: mean KL and loss difference by source and by position."""
    return {"source": figures.kl_by_source(data.kl_by_source(run)), "position": figures.kl_by_position(data.kl_by_position(run, source))}


@_figure(max_entries=8)
def separation(run: Run, chosen: str | None) -> dict[str, go.Figure]:
    """How well each matching score separates the seed twin's assigned pairs from random pairs:
    the ROC of every score ("roc") and one histogram per score (by score name)."""
    sep = data.score_separation(run)
    return {"roc": figures.roc_curves(sep, chosen), **{str(k): figures.score_separation(sep, k) for k in dict.fromkeys(sep["score"])}}


@_figure(max_entries=256)
def baseline(run: Run, score: str, which: str, threshold: float) -> go.Figure | None:
    """Born or lost rate over the match threshold with the seed twin's curve; None without curves."""
    curves = data.baseline(run, score)
    return figures.baseline_curves(curves, which, threshold) if len(curves) else None


@_figure(max_entries=256)
def activation(run: Run, sae: str, feature_id: int) -> go.Figure | None:
    """One feature's activation histograms on both models with its quantile bins marked; None
    when it never fires on either model."""
    row = data.feature(run, sae, feature_id)
    edges = run.manifest.get("act_hist_edges")
    if row is None or not edges:
        return None
    hists = {m: row.get(f"act_hist_{m}") or [] for m in figures.MODELS}
    if not any(sum(int(c) for c in h) for h in hists.values()):
        return None
    ex = data.feature_examples(run, sae, feature_id)
    bins = {}
    if len(ex):
        kind, model = ex["kind"].to_numpy(), ex["model"].to_numpy()
        b, lo, hi = ex["bin"].to_numpy(), ex["bin_low"].to_numpy(dtype=float), ex["bin_high"].to_numpy(dtype=float)
        for m in figures.MODELS:
            sel = np.flatnonzero((kind == "quantile") & (model == m))
            bins[m] = sorted({(int(b[i]), float(lo[i]), float(hi[i])) for i in sel})
    return figures.activation_histograms(edges, hists, "Activation histogram (positive activations)", quantile_bins={m: b for m, b in bins.items() if b})
