"""Plotly figure builders: pure functions from DataFrames/arrays to `go.Figure` (no streamlit).

One colour per model everywhere (MODEL_COLORS, shared with explorer/render.py): base is blue,
finetuned is orange. Axis titles name the quantity and its unit. Strings that come from a
vocabulary or corpus are never put into a figure unescaped (plotly interprets a subset of HTML
in labels and hover text), see `_safe`.
"""

from __future__ import annotations

import html
import math
from typing import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from explorer.render import MODEL_COLORS, MODEL_LABELS

MODELS = ("base", "finetuned")
SAE_LABELS = {"base_sae": "base SAE", "finetuned_sae": "finetuned SAE"}
NEUTRAL = "#5b6770"
FONT = dict(size=13)


def _safe(text: object) -> str:
    return html.escape(str(text), quote=True)


def _layout(fig: go.Figure, title: str | None, x: str, y: str, height: int = 320, **kw) -> go.Figure:
    fig.update_layout(**_layout_dict(title, x, y, height, **kw))
    return fig


def _bars(df: pd.DataFrame, color: str, name: str, opacity: float = 1.0) -> go.Bar:
    left = df["bin_left"].to_numpy(dtype=float)
    right = df["bin_right"].to_numpy(dtype=float)
    return go.Bar(
        x=(left + right) / 2,
        y=df["count"].to_numpy(),
        width=(right - left),
        marker_color=color,
        opacity=opacity,
        name=name,
        customdata=np.stack([left, right], axis=1) if len(left) else None,
        hovertemplate="[%{customdata[0]:.3g}, %{customdata[1]:.3g}): %{y}<extra>" + _safe(name) + "</extra>",
    )


def _step_trace(left: np.ndarray, right: np.ndarray, counts: np.ndarray, color: str, name: str, unit: str = "") -> dict:
    """A histogram as an outlined step with a light fill (a scatter trace as a dict, arrays as
    given): two models stay readable when overlaid."""
    xs = np.empty(2 * len(left))
    ys = np.empty(2 * len(left))
    xs[0::2], xs[1::2] = left, right
    ys[0::2], ys[1::2] = counts, counts
    rgb = tuple(int(color[i : i + 2], 16) for i in (1, 3, 5))
    return {
        "x": xs, "y": ys, "mode": "lines", "name": name, "line": {"color": color, "width": 2}, "fill": "tozeroy",
        "fillcolor": f"rgba({rgb[0]},{rgb[1]},{rgb[2]},0.18)", "hovertemplate": "%{x:.3g}: %{y}" + unit + "<extra>" + _safe(name) + "</extra>",
    }


def _step(left: np.ndarray, right: np.ndarray, counts: np.ndarray, color: str, name: str, unit: str = "") -> go.Scatter:
    return go.Scatter(**_step_trace(left, right, counts, color, name, unit))


def binned_histogram(df: pd.DataFrame, title: str, x_title: str, y_title: str = "count", color: str = NEUTRAL, name: str = "", log_y: bool = False) -> go.Figure:
    """Bars from precomputed bins (bin_left, bin_right, count)."""
    fig = go.Figure(_bars(df, color, name or title))
    fig.update_layout(bargap=0, showlegend=False)
    if log_y:
        fig.update_yaxes(type="log")
    return _layout(fig, title, x_title, y_title)


def resid_histogram(df: pd.DataFrame, metric: str) -> go.Figure:
    labels = {
        "cosine": ("Cosine similarity per token", "cosine(x_base, x_finetuned)", "tokens"),
        "l2": ("L2 distance per token", "||x_base − x_finetuned|| (residual units)", "tokens"),
        "seq_mean_cosine": ("Mean cosine per sequence", "mean cosine over the sequence", "sequences"),
        "seq_mean_l2": ("Mean L2 distance per sequence", "mean L2 distance (residual units)", "sequences"),
    }
    title, x, y = labels.get(metric, (metric, metric, "count"))
    return binned_histogram(df[df["metric"] == metric], title, x, y)


def _by_position(df: pd.DataFrame, left: tuple[str, str], right: tuple[str, str, str], title: str, x_title: str, y_title: str) -> go.Figure:
    """Two per-position lines: left = (column, name) on the left axis, right = (column, name, axis title) on the right."""
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=df["position"], y=df[left[0]], name=left[1], line=dict(color=NEUTRAL)))
    fig.add_trace(go.Scatter(x=df["position"], y=df[right[0]], name=right[1], line=dict(color="#8e5ea2", dash="dot"), yaxis="y2"))
    fig.update_layout(yaxis2=dict(title=right[2], overlaying="y", side="right", showgrid=False))
    return _layout(fig, title, x_title, y_title)


def resid_by_position(df: pd.DataFrame) -> go.Figure:
    """Mean cosine (left axis) and mean L2 distance (right axis) by context position."""
    return _by_position(df, ("mean_cosine", "mean cosine"), ("mean_l2", "mean L2 distance", "mean L2 distance (residual units)"),
                        "Residual similarity by position", "context position (0 = BOS)", "mean cosine")


def _fast_figure(traces: list[dict], layout: dict) -> go.Figure:
    """A figure from plain dicts and lists, not validated property by property: go.Figure's
    validation is most of building a small figure (the activation histogram: 19 ms validated,
    1.5 ms not). Used for the feature page's figure, built once for every feature a reader
    opens; tests/test_figures_fast.py checks that plotly's validation accepts each one and
    changes nothing in its JSON."""
    return go.Figure({"data": traces, "layout": layout}, _validate=False)


def _layout_dict(title: str | None, x: str, y: str, height: int = 320, **kw) -> dict:
    """What `_layout` sets, as a plain layout dict."""
    return {
        "title": {"text": _safe(title) if title else None, "font": {"size": 15}},
        "xaxis": {"title": {"text": x}},
        "yaxis": {"title": {"text": y}},
        "height": height,
        "margin": {"l": 60, "r": 20, "t": 50 if title else 20, "b": 50},
        "font": dict(FONT),
        "legend": {"orientation": "h", "yanchor": "bottom", "y": 1.02, "xanchor": "right", "x": 1},
        **kw,
    }


def activation_histograms(edges: Sequence[float], hist_by_model: dict[str, Sequence[int]], title: str = "Activation histogram",
                          quantile_bins: dict[str, Sequence[tuple[int, float, float]]] | None = None) -> go.Figure:
    """Counts of positive activations in log-spaced bins, both models overlaid.

    `quantile_bins` (model -> (bin, low, high) of the quantile examples' activation bins) are
    marked as dashed vertical lines at each bin's edges, in the model's colour; hovering a line
    names its bin and range. Built from plain dicts (`_fast_figure`)."""
    edges = np.asarray(edges, dtype=float)
    traces: list[dict] = []
    top = 0
    for m in MODELS:
        counts = hist_by_model.get(m)
        if counts is None:
            continue
        counts = np.asarray(counts)
        nz = np.flatnonzero(counts)
        if not len(nz):
            continue
        top = max(top, int(counts.max()))
        lo, hi = max(nz[0] - 1, 0), min(nz[-1] + 2, len(counts))
        t = _step_trace(edges[:-1][lo:hi], edges[1:][lo:hi], counts[lo:hi], MODEL_COLORS[m], MODEL_LABELS[m], " tokens")
        traces.append({"type": "scatter", **t, "x": t["x"].tolist(), "y": t["y"].tolist()})  # lists: what validation would keep
    for m, bins in (quantile_bins or {}).items():
        xs, ys, text = [], [], []
        for b, low, high in sorted(bins):
            for x in (low, high):
                if not (math.isfinite(x) and x > 0):
                    continue
                label = f"quantile bin {int(b)}: [{low:.3g}, {high:.3g}]"
                xs += [float(x), float(x), None]
                ys += [0, top or 1, None]
                text += [label, label, None]
        if xs:
            traces.append({
                "type": "scatter", "x": xs, "y": ys, "mode": "lines", "name": f"quantile bins ({MODEL_LABELS.get(m, m)})", "text": text,
                "line": {"color": MODEL_COLORS.get(m, NEUTRAL), "dash": "dot", "width": 1}, "hovertemplate": "%{text}<extra></extra>",
            })
    layout = _layout_dict(title, "activation (SAE units, log scale)", "tokens", height=300)
    layout["xaxis"]["type"] = "log"
    return _fast_figure(traces, layout)


def two_model_histogram(hists: dict[str, pd.DataFrame], title: str, x_title: str, y_title: str = "features") -> go.Figure:
    """Two binned histograms (model -> bins) overlaid as steps in the model colours."""
    fig = go.Figure(
        [
            _step(df["bin_left"].to_numpy(dtype=float), df["bin_right"].to_numpy(dtype=float), df["count"].to_numpy(), MODEL_COLORS[m], MODEL_LABELS[m])
            for m, df in hists.items()
        ]
    )
    return _layout(fig, title, x_title, y_title)


def density_scatter(points: pd.DataFrame, regression: dict[str, float], title: str = "Log-density: base vs finetuned", floor: float | None = None,
                    floor_label: str = "detection floor") -> go.Figure:
    """log10(density+1e-10) on base (x) vs finetuned (y), one point per feature, with the
    least-squares line and Pearson R of `regression` (the caller passes the fit over features
    alive on both models: the dead sentinel at -10 stays out of it), and the detection floor: the
    log10 density below which a feature cannot be called died (vertical) or woke (horizontal).
    Each point carries its feature_id as customdata."""
    x = np.log10(points["density_base"].to_numpy(dtype=float) + 1e-10)
    y = np.log10(points["density_finetuned"].to_numpy(dtype=float) + 1e-10)
    fig = go.Figure()
    fig.add_trace(
        go.Scattergl(
            x=x,
            y=y,
            mode="markers",
            name="features",
            marker=dict(size=5, color=NEUTRAL, opacity=0.55),
            customdata=points["feature_id"].to_numpy(),
            hovertemplate="feature %{customdata}<br>base %{x:.2f}<br>finetuned %{y:.2f}<extra></extra>",
        )
    )
    slope, intercept, r = regression.get("slope"), regression.get("intercept"), regression.get("r")
    if slope is not None and math.isfinite(slope) and len(x):
        xs = np.array([x.min(), x.max()])
        fig.add_trace(go.Scatter(x=xs, y=intercept + slope * xs, mode="lines", name=f"least squares (R = {r:.3f})", line=dict(color="#c0392b", width=2)))
    lims = [min(x.min(initial=-10), y.min(initial=-10)) - 0.3, 0.3]
    fig.add_trace(go.Scatter(x=lims, y=lims, mode="lines", name="y = x", line=dict(color="#999", dash="dash", width=1)))
    if floor is not None and math.isfinite(floor):
        fig.add_trace(go.Scatter(x=[floor, floor, lims[0]], y=[lims[1], floor, floor], mode="lines", name=_safe(floor_label),
                                 line=dict(color="#2e7d32", dash="dot", width=2), hoverinfo="name"))
    return _layout(fig, title, "log10(density on base + 1e-10)", "log10(density on finetuned + 1e-10)", height=480)


BASELINE_COLORS = {"real": "#c0392b", "twin": NEUTRAL}


def baseline_curves(df: pd.DataFrame, which: str, threshold: float | None = None) -> go.Figure:
    """Born or lost rate over the match threshold (base SAE vs finetuned SAE) with the seed twin's
    rate (base SAE vs its twin: what "no match" looks like without finetuning), and the slider's threshold."""
    fig = go.Figure()
    label = {"lost": "lost: base SAE features with no match", "born": "born: features with no match in the base SAE"}[which]
    real, twin = df[f"{which}_rate"].to_numpy(dtype=float), df[f"{which}_rate_twin"].to_numpy(dtype=float)
    if np.isfinite(real).any():
        fig.add_trace(go.Scatter(x=df["threshold"], y=real, mode="lines", name="base SAE vs finetuned SAE", line=dict(color=BASELINE_COLORS["real"], width=2),
                                 hovertemplate="threshold %{x:.2f}: %{y:.1%}<extra>finetuned SAE</extra>"))
    if np.isfinite(twin).any():
        name = "base SAE vs its seed twin" + (" (the reference for born)" if which == "born" else "")
        fig.add_trace(go.Scatter(x=df["threshold"], y=twin, mode="lines", name=name, line=dict(color=BASELINE_COLORS["twin"], width=2, dash="dash"),
                                 hovertemplate="threshold %{x:.2f}: %{y:.1%}<extra>seed twin</extra>"))
    if threshold is not None:
        fig.add_vline(x=float(threshold), line=dict(color="#444", width=1, dash="dot"))
    fig.update_yaxes(tickformat=".0%", range=[0, 1.02])
    return _layout(fig, label, "match threshold s", "share of alive features below s", height=300)


def score_separation(df: pd.DataFrame, score: str) -> go.Figure:
    """One matching score on the seed twin's assigned pairs vs random pairs (pairs per bin, each group normalized)."""
    sub = df[df["score"] == score]
    fig = go.Figure()
    for group, color, name in (("assigned", "#c0392b", "assigned twin pairs"), ("random", NEUTRAL, "random pairs")):
        g = sub[sub["group"] == group]
        counts = g["count"].to_numpy(dtype=float)
        total = counts.sum()
        fig.add_trace(_step(g["bin_left"].to_numpy(dtype=float), g["bin_right"].to_numpy(dtype=float), counts / total if total else counts, color, name))
    auc = sub["auc"].iloc[0] if len(sub) else float("nan")
    return _layout(fig, f"{_safe(score)}: AUC {auc:.3f}", "score", "share of pairs", height=260)


def roc_curves(df: pd.DataFrame, chosen: str | None = None) -> go.Figure:
    """ROC of every matching score (assigned twin pairs = positives, random pairs = negatives), from the histograms."""
    fig = go.Figure()
    for score in dict.fromkeys(df["score"]):
        sub = df[df["score"] == score]
        pos = sub[sub["group"] == "assigned"].sort_values("bin_left", ascending=False)["count"].to_numpy(dtype=float)
        neg = sub[sub["group"] == "random"].sort_values("bin_left", ascending=False)["count"].to_numpy(dtype=float)
        if not pos.sum() or not neg.sum():
            continue
        tpr, fpr = np.concatenate([[0], np.cumsum(pos) / pos.sum()]), np.concatenate([[0], np.cumsum(neg) / neg.sum()])
        width = 3 if score == chosen else 1.5
        fig.add_trace(go.Scatter(x=fpr, y=tpr, mode="lines", name=f"{_safe(score)} (AUC {sub['auc'].iloc[0]:.3f})", line=dict(width=width)))
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="chance", line=dict(color="#999", dash="dash", width=1)))
    return _layout(fig, "Which score tells the same feature from another", "share of random pairs above the cut", "share of assigned twin pairs above the cut", height=380)


def kl_by_position(df: pd.DataFrame) -> go.Figure:
    """Mean KL(base || finetuned) and mean loss difference by context position."""
    return _by_position(df, ("mean_kl", "mean KL(base ‖ finetuned)"), ("mean_loss_diff", "mean loss_finetuned − loss_base", "loss difference (nats)"),
                        "Where the models' predictions differ, by position", "context position p (predicting token p + 1)", "mean KL (nats)")


def kl_by_source(df: pd.DataFrame) -> go.Figure:
    """Mean KL and loss difference per source (bars)."""
    sub = df[df["source"] != "all"]
    fig = go.Figure()
    fig.add_trace(go.Bar(x=[_safe(v) for v in sub["source"]], y=sub["mean_kl"], name="mean KL(base ‖ finetuned)", marker_color=NEUTRAL))
    fig.add_trace(go.Bar(x=[_safe(v) for v in sub["source"]], y=sub["mean_loss_diff"], name="mean loss_finetuned − loss_base", marker_color="#8e5ea2"))
    fig.update_layout(barmode="group")
    return _layout(fig, "By source", "source", "nats per token", height=300)


def parallel_coordinates(points: pd.DataFrame) -> go.Figure:
    """Per-feature parallel coordinates: log-densities, activation/logit similarity, activation error."""
    dims = []
    specs = [
        ("log10 density base", np.log10(points["density_base"].to_numpy(dtype=float) + 1e-10)),
        ("log10 density finetuned", np.log10(points["density_finetuned"].to_numpy(dtype=float) + 1e-10)),
        ("activation similarity", points["act_similarity"].to_numpy(dtype=float)),
        ("logit similarity", points["logit_similarity"].to_numpy(dtype=float)),
        ("activation error", points["act_error"].to_numpy(dtype=float)),
    ]
    for label, values in specs:
        v = np.where(np.isfinite(values), values, np.nan)
        finite = v[np.isfinite(v)]
        lo, hi = (float(finite.min()), float(finite.max())) if len(finite) else (0.0, 1.0)
        # NaN (constant feature) is drawn just below the axis minimum
        pad = (hi - lo) * 0.05 or 0.05
        dims.append(dict(label=label, values=np.where(np.isnan(v), lo - pad, v), range=[lo - pad, hi]))
    color = np.log10(points["density_base"].to_numpy(dtype=float) + 1e-10)
    fig = go.Figure(go.Parcoords(line=dict(color=color, colorscale="Blues", showscale=True, colorbar=dict(title="log10 density base")), dimensions=dims))
    fig.update_layout(height=420, margin=dict(l=70, r=60, t=50, b=30), font=FONT)
    return fig


def quality_bars(metrics: pd.DataFrame, column: str, title: str, y_title: str) -> go.Figure:
    """One metric per (SAE, model), bars coloured by the model whose activations are encoded."""
    fig = go.Figure()
    for m in MODELS:
        sub = metrics[metrics["model"] == m]
        fig.add_trace(go.Bar(x=[SAE_LABELS.get(s, s) for s in sub["sae"]], y=sub[column], name=MODEL_LABELS[m], marker_color=MODEL_COLORS[m]))
    fig.update_layout(barmode="group")
    return _layout(fig, title, "SAE", y_title, height=300)


# ------------------------------------------------------------------ crosscoder (issue 16)

BAND_COLORS = {"base_only": MODEL_COLORS["base"], "shared": "#6d7f3a", "finetune_only": MODEL_COLORS["finetuned"], "other": "#c9ced3"}
BAND_NAMES = {"base_only": "base-only", "shared": "shared", "finetune_only": "finetune-only", "other": "in between"}


def _band_of(x: np.ndarray, bands) -> np.ndarray:
    out = np.full(len(x), "other", dtype=object)
    out[x >= bands.shared_min] = np.where(x[x >= bands.shared_min] <= bands.shared_max, "shared", "other")
    out[x <= bands.base_only_max] = "base_only"
    out[x >= bands.finetune_only_min] = "finetune_only"
    return out


def relative_norm_histogram(hist: pd.DataFrame, bands, title: str = "Relative decoder norm of the alive latents") -> go.Figure:
    """Bars over [0, 1] coloured by the band of the bin's centre, the band edges as lines.
    `bands` has base_only_max, shared_min, shared_max, finetune_only_min (explorer.crosscoder_store.Bands)."""
    left = hist["bin_left"].to_numpy(dtype=float)
    right = hist["bin_right"].to_numpy(dtype=float)
    centre = (left + right) / 2
    band = _band_of(centre, bands)
    fig = go.Figure()
    for b in ("base_only", "other", "shared", "finetune_only"):
        sel = band == b
        if not sel.any():
            continue
        fig.add_trace(
            go.Bar(
                x=centre[sel], y=hist["count"].to_numpy()[sel], width=(right - left)[sel], marker_color=BAND_COLORS[b], name=BAND_NAMES[b],
                customdata=np.stack([left[sel], right[sel]], axis=1),
                hovertemplate="[%{customdata[0]:.2f}, %{customdata[1]:.2f}): %{y} latents<extra>" + _safe(BAND_NAMES[b]) + "</extra>",
            )
        )
    for x in (bands.base_only_max, bands.shared_min, bands.shared_max, bands.finetune_only_min):
        fig.add_vline(x=float(x), line=dict(color="#333", dash="dot", width=1))
    fig.update_layout(bargap=0, barmode="overlay")
    fig.update_xaxes(range=[0, 1])
    return _layout(fig, title, "||d_F|| / (||d_B|| + ||d_F||)   (0 base-only · 0.5 shared · 1 finetune-only)", "latents")


def latent_scaling_scatter(points: pd.DataFrame, title: str = "Latent Scaling: finetune-only latents (shared for reference)") -> go.Figure:
    """nu_error (x) vs nu_recon (y) per latent, coloured by band; customdata = feature_id (Minder et al. 2025, fig. 3)."""
    fig = go.Figure()
    for b in ("shared", "finetune_only"):
        sub = points[points["band"] == b]
        if sub.empty:
            continue
        fig.add_trace(
            go.Scattergl(
                x=sub["nu_error"].to_numpy(dtype=float), y=sub["nu_recon"].to_numpy(dtype=float), mode="markers", name=BAND_NAMES[b],
                marker=dict(size=7 if b == "finetune_only" else 5, color=BAND_COLORS[b], opacity=0.85 if b == "finetune_only" else 0.35),
                customdata=sub["feature_id"].to_numpy(),
                hovertemplate="latent %{customdata}<br>ν_ε %{x:.3f}<br>ν_r %{y:.3f}<extra>" + _safe(BAND_NAMES[b]) + "</extra>",
            )
        )
    for v in (0.0, 1.0):
        fig.add_hline(y=v, line=dict(color="#999", dash="dash", width=1))
        fig.add_vline(x=v, line=dict(color="#999", dash="dash", width=1))
    return _layout(fig, title, "ν_ε = β_ε(base) / β_ε(finetuned)   (error: ~0 real, ~1 complete shrinkage)",
                   "ν_r = β_r(base) / β_r(finetuned)   (~1: latent decoupling)", height=460)
