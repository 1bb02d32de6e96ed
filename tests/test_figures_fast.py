"""The feature page's activation histogram is built from plain dicts without plotly's validation
(explorer.figures._fast_figure): plotly's validation must accept it and change nothing."""

from __future__ import annotations

import json

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio

from explorer import figures


def _validated_json(fig: go.Figure) -> dict:
    # go.Figure(dict) validates every property: an invalid name or value raises ValueError
    return json.loads(pio.to_json(go.Figure(fig.to_dict()), validate=True))


def test_activation_histogram_passes_plotly_validation_unchanged():
    edges = np.logspace(-2, 2, 41)
    hists = {"base": np.r_[np.zeros(5), np.arange(1, 31), np.zeros(5)].astype(int), "finetuned": np.r_[np.zeros(10), np.arange(30, 0, -1)].astype(int)}
    qb = {"base": [(0, 0.1, 0.5), (1, 0.5, 2.0)], "finetuned": [(0, 0.0, 0.3)]}  # a 0 edge is not drawn on a log axis
    fig = figures.activation_histograms(edges, hists, "Activation <b>histogram</b>", qb)
    got = json.loads(pio.to_json(fig, validate=False))
    assert got == _validated_json(fig)
    names = [t["name"] for t in got["data"]]
    assert names == ["base model", "finetuned model", "quantile bins (base model)", "quantile bins (finetuned model)"]
    assert got["layout"]["xaxis"]["type"] == "log" and "template" in got["layout"]
    assert got["layout"]["title"]["text"] == "Activation &lt;b&gt;histogram&lt;/b&gt;"  # escaped, as every title
    # the step outline: each bin's count at both of its edges, one empty bin either side of the counts
    base = got["data"][0]
    nz = np.flatnonzero(hists["base"])
    lo, hi = nz[0] - 1, nz[-1] + 2
    assert base["x"][0::2] == list(edges[:-1][lo:hi]) and base["x"][1::2] == list(edges[1:][lo:hi])
    assert base["y"][0::2] == [float(c) for c in hists["base"][lo:hi]]
    marks = got["data"][3]
    assert [x for x in marks["x"] if x is not None] == [0.3, 0.3]


def test_a_dead_model_draws_no_trace():
    fig = figures.activation_histograms(np.logspace(-1, 1, 5), {"base": [0, 0, 0, 0], "finetuned": [0, 3, 1, 0]})
    assert [t.name for t in fig.data] == ["finetuned model"]
    assert json.loads(pio.to_json(fig, validate=False)) == _validated_json(fig)
