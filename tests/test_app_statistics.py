"""AppTests of issue 12's views on synthetic runs (explorer/synthetic.py, real schema): the source
filter switches every number to the per-source tables, Dead & born shows the significance
classes and the seed-twin baseline at the slider's threshold, Similarity the score separation and
the detection floor, the Where-the-models-differ page its contexts with linked features, and the
feature page the paired test, the per-source rows, the logit effect and its best match side by
side. Each number is checked against the table it comes from."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from explorer import schema, store
from explorer.synthetic import make_run
from tests.helpers import PAGES, app_maker


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stat_runs")
    make_run(root / "twin", n_features=100, seed=11, twin=True)
    make_run(root / "notwin", n_features=60, seed=12)
    make_run(root / "onesae", n_features=40, seed=13, two_saes=False)
    return root


@pytest.fixture
def app(runs, monkeypatch):
    return app_maker(runs, monkeypatch, PAGES)


def _ok(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def _metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def _by_source(runs: Path, run: str) -> pd.DataFrame:
    return pd.read_parquet(runs / run / "features_by_source.parquet")


@pytest.mark.parametrize("run", ["twin", "notwin", "onesae"])
@pytest.mark.parametrize("page", list(PAGES))
def test_pages_render_pooled_and_per_source(app, page, run):
    for params in ({}, {"source": "python"}):
        at = app(page, run=run, sae="base_sae", feature=4, **params)
        _ok(at)


def test_source_picker_sets_the_url_and_the_numbers(app, runs):
    at = app("overview", run="twin")
    _ok(at)
    picker = [s for s in at.sidebar.selectbox if s.label == "Source"][0]
    picker.set_value("python").run()
    _ok(at)
    assert at.query_params["source"] in (["python"], "python")
    per = _by_source(runs, "twin")
    base = per[(per.sae == "base_sae") & (per.source == "python")]
    m = _metrics(at)
    assert m["died"] == f"{(base.cross_class == 'died').sum():,}"
    assert m["dead (base SAE on base)"] == f"{(base.status_base == 'dead').sum():,}"
    q = at.dataframe[0].value
    ref = pd.read_parquet(runs / "twin" / "metrics_by_source.parquet")
    ref = ref[(ref.source == "python") & (ref.outliers == "included")]
    assert sorted(q.explained_variance.round(9)) == sorted(ref.explained_variance.round(9))
    assert "explained_variance_legacy" in q.columns


def test_unknown_source_falls_back_with_a_warning(app):
    # the page that reads the link warns (in an AppTest the entry point's default page runs
    # first) and removes the unusable value from the URL (webapp.urlstate), so the next page
    # shows all sources pooled without a second warning
    at = app("overview", run="twin", source="[x](javascript:alert(1))")
    assert not at.exception
    warn = [w.value for w in at.warning]
    assert any("is not in run" in w and "\\[x\\]" in w for w in warn), warn
    assert "source" not in at.query_params
    at = app("dead_born", run="twin", source="[x](javascript:alert(1))")
    _ok(at)
    assert "source" not in at.query_params
    assert [s.value for s in at.sidebar.selectbox if s.label == "Source"] == [None]  # all sources


def test_dead_born_significance_classes_match_the_table(app, runs):
    at = app("dead_born", run="twin", source="python")
    _ok(at)
    per = _by_source(runs, "twin")
    base = per[(per.sae == "base_sae") & (per.source == "python")]
    m = _metrics(at)
    for cls, label in (("died", "Died"), ("too_rare_to_tell", "Too rare to tell"), ("rarer", "Rarer"), ("commoner", "Commoner"), ("woke", "Woke")):
        assert m[label] == f"{(base.change_class == cls).sum():,}"
    md = [x.value for x in at.markdown]
    assert f"**{(base.cross_class == 'died').sum():,}** features" in md


def test_dead_born_baseline_at_the_threshold(app, runs):
    at = app("dead_born", run="twin")
    _ok(at)
    bl = pd.read_parquet(runs / "twin" / "baseline.parquet")
    man = json.loads((runs / "twin" / schema.MANIFEST).read_text())
    score = man["summary"]["matching"]["score"]
    for thr in (0.5, 0.3):
        if thr != 0.5:
            at.slider(key="match_threshold").set_value(thr).run()
            _ok(at)
        row = bl[(bl.score == score) & ((bl.threshold - thr).abs() < 1e-9)].iloc[0]
        rates = [m.value for m in at.metric if m.label == "seed-twin rate"]
        assert rates == [f"{100 * row.lost_rate_twin:.1f}%", f"{100 * row.born_rate_twin:.1f}%"]
        counts = store.born_lost_counts(store.connect(), runs / "twin", thr)
        md = [x.value for x in at.markdown]
        assert f"**{counts['lost']:,}** features at threshold {thr:.2f}" in md
    # both curves are drawn over the threshold: the run's and the twin's
    figs = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    curves = [f for f in figs if any("seed twin" in (t.get("name") or "") for t in f["data"])]
    assert len(curves) == 2 and all(len(f["data"]) == 2 for f in curves)


def test_dead_born_without_twin_says_so(app):
    at = app("dead_born", run="notwin")
    _ok(at)
    assert any("no seed twin" in c.value for c in at.caption) or any("no seed twin" in m.value for m in at.markdown)


def test_similarity_score_separation_and_floor(app, runs):
    at = app("similarity", run="twin", sae="base_sae")
    _ok(at)
    sep = pd.read_parquet(runs / "twin" / "score_separation.parquet")
    figs = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    roc = [f for f in figs if any("AUC" in (t.get("name") or "") for t in f["data"])]
    assert roc and len([t for t in roc[0]["data"] if "AUC" in t["name"]]) == sep.score.nunique()
    for score, auc in sep.groupby("score").auc.first().items():
        assert any(f"{score} (AUC {auc:.3f})" in t["name"] for t in roc[0]["data"])
    scatter = [f for f in figs if any(t.get("name") == "features" for t in f["data"])][0]
    names = [t.get("name") or "" for t in scatter["data"]]
    man = json.loads((runs / "twin" / schema.MANIFEST).read_text())
    assert any(n.startswith("detection floor") for n in names) == bool((man["summary"].get("significance") or {}).get("base_sae"))
    at = app("similarity", run="notwin", sae="base_sae")
    _ok(at)
    assert any("no seed twin" in i.value for i in at.info)


def test_differences_page_lists_contexts_with_linked_features(app, runs):
    at = app("differences", run="twin", source="python")
    _ok(at)
    ctx = pd.read_parquet(runs / "twin" / "kl_contexts.parquet")
    py = ctx[ctx.source == "python"]
    assert f"**{len(py):,}** contexts kept (the run's `[diffing] n_top_kl_contexts` highest)" in [m.value for m in at.markdown]
    links = [l for l in at.get("page_link") if "feature=" in l.proto.query_string]
    first = py.sort_values("rank").iloc[0]
    assert any(f"feature={int(first.feature_ids[0])}" in l.proto.query_string for l in links)
    html = "\n".join(h.proto.body for h in at.get("html"))
    assert f"KL {float(first.kl):.3g} nats" in html
    assert "<script>" not in html  # the synthetic vocabulary's hostile tokens are escaped


def test_feature_page_significance_per_source_and_side_by_side(app, runs):
    feats = pd.read_parquet(runs / "twin" / "features.parquet")
    thr = json.loads((runs / "twin" / "manifest.json").read_text())["config"]["thresholds"]["match"]
    matched = feats[(feats.sae == "base_sae") & feats.match_feature_id.notna() & (feats.count_base > 0)]
    row = matched[~(matched.match_score >= thr)].iloc[0]  # lost: its best match scores below the threshold
    at = app("feature", run="twin", sae="base_sae", feature=int(row.feature_id))
    _ok(at)
    m = _metrics(at)
    assert m["fires on base"] == f"{int(row.count_base):,}" and m["fires on finetuned"] == f"{int(row.count_finetuned):,}"
    assert m["change class"] == str(row.change_class).replace("_", " ")
    assert any(f"q = {row.q_value:.3g}" in c.value for c in at.caption)
    frames = [d.value for d in at.dataframe]
    assert any(set(f.columns) >= {"source", "change_class"} and len(f) == 2 for f in frames)
    md = [x.value for x in at.markdown]
    assert any(v.startswith("### Side by side") for v in md)
    links = [l.proto.query_string for l in at.get("page_link")]
    assert any(f"sae=finetuned_sae&feature={int(row.match_feature_id)}" in q for q in links)
    assert "### Logit effect: W_dec[i] @ (W_U(finetuned) − W_U(base))" in md
    # a feature whose best match clears the threshold: the side by side only on request (?pair=1)
    kept = matched[matched.match_score >= thr].iloc[0]
    at = app("feature", run="twin", sae="base_sae", feature=int(kept.feature_id))
    _ok(at)
    assert not any(x.value.startswith("### Side by side") for x in at.markdown)
    at.toggle(key="feature_pair").set_value(True).run()
    _ok(at)
    assert any(x.value.startswith("### Side by side") for x in at.markdown) and at.query_params.get("pair") in ("1", ["1"])
