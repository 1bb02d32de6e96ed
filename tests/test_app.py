"""AppTest for every page (except the live probe, tests/test_app_probe.py): renders without an
exception, shows its key elements with the values the store computes, and answers bad query
params / broken runs with a friendly message.

Runs on a synthetic run (explorer/synthetic.py, real schema, hostile vocabulary) in a tmp runs
dir, and on the shipped demo run data/runs/demo.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from explorer import schema, store
from explorer.synthetic import make_run
from tests.helpers import APP, PAGES, REPO, md_text

N = 120


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("app_runs")
    make_run(root / "synth", n_features=N, seed=2)
    make_run(root / "onesae", n_features=40, seed=3, two_saes=False)
    # broken runs
    inc = make_run(root / "incomplete", n_features=10, seed=4)
    m = json.loads((inc / schema.MANIFEST).read_text())
    m["complete"] = False
    (inc / schema.MANIFEST).write_text(json.dumps(m))
    old = make_run(root / "oldschema", n_features=10, seed=5)
    m = json.loads((old / schema.MANIFEST).read_text())
    m["schema_version"] = 0
    (old / schema.MANIFEST).write_text(json.dumps(m))
    partial = make_run(root / "partial", n_features=10, seed=6)
    (partial / schema.MANIFEST).unlink()  # precompute still running: no manifest yet
    damaged = make_run(root / "damaged", n_features=10, seed=7)
    with open(damaged / "features.parquet", "ab") as f:
        f.write(b"garbage")
    return root


@pytest.fixture
def app(runs, monkeypatch):
    monkeypatch.setenv("SAE_EXPLORER_RUNS_DIR", str(runs))

    def make(page: str, **params) -> AppTest:
        at = AppTest.from_file(APP, default_timeout=120)
        at.query_params.update({k: str(v) for k, v in params.items()})
        at.run()  # the entry point first: app.py registers the pages
        if page != "overview":
            at.switch_page(PAGES[page])
            at.run()
        return at

    return make


def _no_traceback(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    for el in list(at.error) + list(at.warning) + list(at.markdown):
        assert "Traceback" not in str(el.value)


def _html(at: AppTest) -> str:
    return "\n".join(h.proto.body for h in at.get("html"))


def _feats(runs: Path) -> pd.DataFrame:
    return pd.read_parquet(runs / "synth" / "features.parquet")


# ---------------------------------------------------------------- every page renders


@pytest.mark.parametrize("page", list(PAGES))
def test_every_page_renders(app, page):
    at = app(page, run="synth", sae="base_sae", feature=3)
    _no_traceback(at)
    assert not at.error, [e.value for e in at.error]
    assert at.title[0].value
    # the run picker is on every page, set to the run in the URL
    picker = at.sidebar.selectbox[0]
    assert picker.label == "Run" and picker.value == "synth"
    assert at.query_params["run"] == ["synth"] or at.query_params["run"] == "synth"


def test_overview_key_elements(app, runs):
    at = app("overview", run="synth")
    _no_traceback(at)
    feats = _feats(runs)
    base = feats[feats.sae == "base_sae"]
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["died"] == f"{(base.cross_class == 'died').sum():,}"
    assert metrics["woke"] == f"{(base.cross_class == 'woke').sum():,}"
    assert metrics["dead (base SAE on base)"] == f"{(base.status_base == 'dead').sum():,}"
    con = store.connect()
    bl = store.born_lost_counts(con, runs / "synth", 0.5)
    assert metrics["born"] == f"{bl['born']:,}" and metrics["lost"] == f"{bl['lost']:,}"
    summ = pd.read_parquet(runs / "synth" / "resid_summary.parquet").set_index("metric")
    assert metrics["mean cosine"] == f"{summ.loc['cosine', 'mean']:.4f}"
    # the verdict, in plain words, in a coloured box
    boxes = [b.value for b in list(at.success) + list(at.warning) + list(at.error) + list(at.info)]
    assert any("Does the base SAE transfer?" in b for b in boxes)
    assert any("Tokenizer check passed" in b for b in boxes)
    # the quality table: one row per (SAE, model) for the chosen outlier setting
    q = at.dataframe[0].value
    assert len(q) == 4 and {"l0", "ce_recovered", "explained_variance"} <= set(q.columns)
    ref = pd.read_parquet(runs / "synth" / "metrics.parquet")
    inc = ref[ref.outliers == "included"].sort_values(["sae", "model"])
    assert sorted(q.ce_recovered.round(9)) == sorted(inc.ce_recovered.round(9))
    # outliers toggle switches to the 'excluded' rows
    at.toggle(key="overview_outliers").set_value(True).run()
    _no_traceback(at)
    exc = ref[ref.outliers == "excluded"]
    assert sorted(at.dataframe[0].value.ce_recovered.round(9)) == sorted(exc.ce_recovered.round(9))
    assert len(at.get("plotly_chart")) >= 5


def test_features_table_filters_pages_and_sorts(app, runs):
    feats = _feats(runs)
    base = feats[feats.sae == "base_sae"]
    n_both_dead = int((base.cross_class == "both_dead").sum())
    assert n_both_dead > 0
    at = app("features", run="synth", sae="base_sae")
    _no_traceback(at)
    # features dead on both models are hidden by default, with their count and a toggle
    assert any(md_text(m.value) == f"**{N - n_both_dead:,}** of {N:,} features match ({n_both_dead:,} dead on both models hidden)." for m in at.markdown)
    assert at.toggle(key="f_both_dead").label == f"Show the {n_both_dead:,} features dead on both models"
    assert at.dataframe[0].value.feature_id.tolist() == base[base.cross_class != "both_dead"].feature_id.tolist()[:50]
    at.toggle(key="f_both_dead").set_value(True).run()
    assert at.query_params["both_dead"] in ("1", ["1"])
    df = at.dataframe[0].value
    assert len(df) == 50  # one page, not the whole table
    assert df.feature_id.tolist() == list(range(50))
    assert any(f"**{N:,}** of {N:,} features match." == m.value for m in at.markdown)

    at.multiselect(key="f_status_base").select("regular").run()
    n_regular = int((base.status_base == "regular").sum())
    assert any(f"**{n_regular:,}** of" in m.value for m in at.markdown)
    assert set(at.dataframe[0].value.status_base) == {"regular"}

    at.selectbox(key="features_sort").set_value("act_similarity").run()
    at.toggle(key="features_desc").set_value(True).run()
    sims = at.dataframe[0].value.act_similarity.dropna().tolist()
    assert sims == sorted(sims, reverse=True)
    top = base[base.status_base == "regular"].act_similarity.max()
    assert sims[0] == pytest.approx(top)

    at.text_input(key="f_search").input("<script>alert(1)</script>").run()
    _no_traceback(at)
    got = at.dataframe[0].value
    want = base[(base.status_base == "regular") & base.top_tokens.str.contains("<script>alert(1)</script>", regex=False)]
    assert sorted(got.feature_id) == sorted(want.feature_id)[:50] or len(got) == len(want)
    assert len(at.get("download_button")) == 2  # CSV and Parquet


def test_features_pagination(app, runs):
    at = app("features", run="synth", sae="finetuned_sae")
    pag = at.get("pagination")
    assert len(pag) == 1 and pag[0].num_pages == -(-N // 50)
    assert at.query_params["sae"] in ("finetuned_sae", ["finetuned_sae"])


def test_feature_page_deep_link(app, runs):
    feats = _feats(runs)
    ex = pd.read_parquet(runs / "synth" / "examples.parquet")
    # a feature alive on both models whose top example holds a hostile token
    alive = feats[(feats.sae == "base_sae") & (feats.cross_class == "both_alive") & feats.top_tokens.str.contains("<", regex=False)]
    fid = int(alive.feature_id.iloc[0])
    at = app("feature", run="synth", sae="base_sae", feature=fid)
    _no_traceback(at)
    assert not at.error
    assert any(f"feature {fid}" in s.value for s in at.subheader)
    assert at.number_input(key="feature_page_id").value == fid
    row = feats[(feats.sae == "base_sae") & (feats.feature_id == fid)].iloc[0]
    labels = [(m.label, m.value) for m in at.metric]
    assert ("max activation", f"{row.max_act_base:.3g}") in labels and ("max activation", f"{row.max_act_finetuned:.3g}") in labels
    body = _html(at)
    n_top = int(((ex.sae == "base_sae") & (ex.feature_id == fid) & (ex.kind == "top") & (ex.model == "base")).sum())
    # each top example is drawn on both models
    assert body.count('data-model="base"') >= 2 * n_top and body.count('data-model="finetuned"') >= 2 * n_top
    assert "<script>alert" not in body and "<img src=x" not in body
    assert "&lt;script&gt;" in body or "&lt;img" in body or "&lt;/div&gt;" in body or "&quot;&gt;&lt;svg" in body
    # logit similarity comes with its caveat
    assert any("Caveat on logit similarity" in c.value for c in at.caption)
    # nearest features and the best match link to feature pages
    links = at.get("page_link")
    assert sum(1 for l in links if "feature=" in l.proto.query_string) >= 10


def test_feature_page_picker_writes_the_url(app, runs):
    at = app("feature", run="synth", sae="base_sae", feature=3)
    at.number_input(key="feature_page_id").set_value(7).run()
    _no_traceback(at)
    assert any("feature 7" in s.value for s in at.subheader)
    assert at.query_params["feature"] in ("7", ["7"])


@pytest.mark.parametrize(
    "raw,message",
    [
        ("abc", "is not a feature number"),
        ("-5", "is negative"),
        (str(N), "out of range"),
        ("99999999999999999999999999", "out of range"),
        ("1e3", "is not a feature number"),
        ("<script>alert(1)</script>", "is not a feature number"),
        ("3.5", "is not a feature number"),
    ],
)
def test_feature_page_bad_feature_param(app, raw, message):
    at = app("feature", run="synth", sae="base_sae", feature=raw)
    _no_traceback(at)
    errors = [e.value for e in at.error]
    assert len(errors) == 1 and message in errors[0]
    assert not at.get("html") or "sx-ex" not in _html(at)


def test_unknown_sae_falls_back_with_a_warning(app):
    at = app("feature", run="synth", sae="nope", feature=2)
    _no_traceback(at)
    assert any("SAE ‘nope’ is not in run" in w.value for w in at.warning)
    assert any("feature 2" in s.value for s in at.subheader)


@pytest.mark.parametrize("page", list(PAGES))
@pytest.mark.parametrize(
    "run,message",
    [
        ("nope", "There is no run called ‘nope’"),
        ("../../etc", "is not a valid run id"),
        ("incomplete", "marked incomplete"),
        ("oldschema", "schema version 0"),
        ("partial", "is incomplete"),
        ("damaged", "is damaged"),
    ],
)
def test_bad_runs_get_a_friendly_message(app, page, run, message):
    at = app(page, run=run, feature=1)
    _no_traceback(at)
    errors = [e.value for e in at.error]
    assert any(message in e for e in errors), errors


@pytest.mark.parametrize("param", ["run", "feature", "sae"])
def test_url_values_are_shown_as_text_not_markdown(app, param):
    hostile = "[click](javascript:alert(1))<img src=x onerror=alert(2)>**b**"
    params = {"run": "synth", "sae": "base_sae", "feature": "1", param: hostile}
    at = app("feature", **params)
    _no_traceback(at)
    shown = [e.value for e in list(at.error) + list(at.warning)]
    assert len(shown) >= 1
    import re

    for text in shown:
        assert "[click](" not in text
        assert re.search(r"(?<!\\)[<>\[\]()*]", text.split("’")[0]) is None  # every special char of the value escaped
    assert any("\\[click\\]" in t for t in shown)


def test_no_runs_at_all(tmp_path, monkeypatch):
    monkeypatch.setenv("SAE_EXPLORER_RUNS_DIR", str(tmp_path / "empty"))
    at = AppTest.from_file(APP, default_timeout=60).run()
    _no_traceback(at)
    assert any("No runs found" in e.value for e in at.error)


def test_dead_born_lists_and_threshold(app, runs):
    at = app("dead_born", run="synth")
    _no_traceback(at)
    feats = _feats(runs)
    base = feats[feats.sae == "base_sae"]
    md = [m.value for m in at.markdown]
    assert f"**{(base.cross_class == 'died').sum():,}** features" in md
    assert f"**{(base.cross_class == 'woke').sum():,}** features" in md
    con = store.connect()
    for thr in (0.5, 0.2):
        if thr != 0.5:
            at.slider(key="match_threshold").set_value(thr).run()
            _no_traceback(at)
        bl = store.born_lost_counts(con, runs / "synth", thr)
        md = [m.value for m in at.markdown]
        assert f"**{bl['born']:,}** features at threshold {thr:.2f}" in md
        assert f"**{bl['lost']:,}** features at threshold {thr:.2f}" in md
    # every row links to its feature page and shows its top example inline
    links = [l for l in at.get("page_link") if "feature=" in l.proto.query_string]
    assert len(links) >= 10
    assert _html(at).count('class="sx-ex"') >= 10


def test_dead_born_one_sae_run(app):
    at = app("dead_born", run="onesae")
    _no_traceback(at)
    assert any("only the base SAE" in i.value for i in at.info)


def test_similarity_page(app, runs):
    at = app("similarity", run="synth", sae="base_sae")
    _no_traceback(at)
    feats = _feats(runs)
    base = feats[feats.sae == "base_sae"]
    import numpy as np

    x, y = np.log10(base.density_base + 1e-10), np.log10(base.density_finetuned + 1e-10)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Pearson R, all features"] == f"{np.corrcoef(x, y)[0, 1]:.3f}"
    def scatter_ids(at):
        charts = at.get("plotly_chart")
        assert len(charts) == 6
        spec = json.loads(charts[4].proto.spec)  # the scatter carries feature ids for click-to-open
        cd = spec["data"][0]["customdata"]
        if isinstance(cd, dict):  # plotly's typed-array encoding
            import base64

            cd = np.frombuffer(base64.b64decode(cd["bdata"]), dtype=np.dtype(cd["dtype"])).tolist()
        return sorted(cd)

    # features dead on both models are hidden by default (a toggle shows them); R uses them all
    alive = base[base.cross_class != "both_dead"]
    assert len(alive) < len(base)
    assert scatter_ids(at) == sorted(alive.feature_id.tolist())
    assert any(f"{int(alive.act_similarity.isna().sum()):,} without a value" in c.value for c in at.caption)
    at.toggle(key="sim_both_dead").set_value(True).run()
    _no_traceback(at)
    assert scatter_ids(at) == sorted(base.feature_id.tolist())
    assert any(f"{int(base.act_similarity.isna().sum()):,} without a value" in c.value for c in at.caption)
    assert {m.label: m.value for m in at.metric}["Pearson R, all features"] == f"{np.corrcoef(x, y)[0, 1]:.3f}"


def test_similarity_and_features_one_sae(app):
    for page in ("similarity", "features", "overview"):
        at = app(page, run="onesae")
        _no_traceback(at)
        assert not at.error


# ---------------------------------------------------------------- the shipped demo run


@pytest.fixture(scope="module")
def demo_run() -> Path:
    path = REPO / "data" / "runs" / "demo"
    if not (path / schema.MANIFEST).exists():
        pytest.fail("data/runs/demo is missing: the demo run ships with the repository (python -m precompute run --config configs/demo.toml)")
    return path


@pytest.mark.parametrize("page", list(PAGES))
def test_pages_on_the_demo_run(demo_run, monkeypatch, page):
    monkeypatch.delenv("SAE_EXPLORER_RUNS_DIR", raising=False)
    feats = pd.read_parquet(demo_run / "features.parquet", columns=["sae", "feature_id", "cross_class"])
    fid = int(feats[(feats.sae == "base_sae") & (feats.cross_class == "both_alive")].feature_id.iloc[0])
    at = AppTest.from_file(APP, default_timeout=180)
    at.query_params.update(run="demo", sae="base_sae", feature=str(fid))
    at.run()
    if page != "overview":
        at.switch_page(PAGES[page])
        at.run()
    _no_traceback(at)
    assert not at.error, [e.value for e in at.error]
    if page == "feature":
        body = _html(at)
        assert 'data-model="base"' in body and 'data-model="finetuned"' in body


# ---------------------------------------------------------------- the error guard


def _guarded_page():
    import streamlit as st

    from explorer.errors import RunError
    from webapp import state

    kind = st.query_params.get("kind")

    @state.fragment
    def panel():
        if kind == "fragment":
            raise ZeroDivisionError("secret internals")
        st.write("panel ok")

    with state.guard():
        if kind == "explorer":
            raise RunError("Run 'x' is damaged: re-run its precompute.")
        if kind == "other":
            raise KeyError("secret internals")
        panel()
    st.write("after")


@pytest.mark.parametrize(
    "kind,message",
    [("explorer", "Run 'x' is damaged"), ("other", "Something went wrong"), ("fragment", "Something went wrong")],
)
def test_guard_turns_errors_into_friendly_messages(kind, message):
    at = AppTest.from_function(_guarded_page, default_timeout=30)
    at.query_params["kind"] = kind
    at.run()
    assert not at.exception
    errors = [e.value for e in at.error]
    assert len(errors) == 1 and message in errors[0] and "secret internals" not in errors[0]


# ---------------------------------------------------------------- issue 13: the feature page for researchers


def test_dead_feature_says_so_instead_of_an_empty_chart(app, runs):
    feats = _feats(runs)
    dead = feats[(feats.sae == "base_sae") & (feats.cross_class == "both_dead")]
    assert len(dead)
    fid = int(dead.feature_id.iloc[0])
    at = app("feature", run="synth", sae="base_sae", feature=fid)
    _no_traceback(at)
    assert any("dead on both models" in md_text(i.value) and "never fires" in md_text(i.value) for i in at.info)
    assert not at.get("plotly_chart")  # no empty histogram
    # a live feature has its histogram
    alive = int(feats[(feats.sae == "base_sae") & (feats.cross_class == "both_alive")].feature_id.iloc[0])
    at = app("feature", run="synth", sae="base_sae", feature=alive)
    assert len(at.get("plotly_chart")) == 1 and not any("dead on both models" in md_text(i.value) for i in at.info)


def test_activation_histogram_marks_the_quantile_bins(app, runs):
    ex = pd.read_parquet(runs / "synth" / "examples.parquet")
    q = ex[(ex.sae == "base_sae") & (ex.kind == "quantile")]
    fid = int(q.feature_id.value_counts().index[0])
    at = app("feature", run="synth", sae="base_sae", feature=fid)
    spec = json.loads(at.get("plotly_chart")[0].proto.spec)
    marks = [t for t in spec["data"] if str(t.get("name", "")).startswith("quantile bins")]
    assert marks, [t.get("name") for t in spec["data"]]
    for t in marks:
        model = "base" if "(base model)" in t["name"] else "finetuned"
        bins = q[(q.feature_id == fid) & (q.model == model)][["bin_low", "bin_high"]].drop_duplicates()
        want = sorted({round(float(v), 5) for v in pd.concat([bins.bin_low, bins.bin_high]) if v > 0})
        got = sorted({round(float(x), 5) for x in t["x"] if x is not None})
        assert got == want
        assert all("quantile bin" in s for s in t["text"] if s)


def test_feature_page_links_to_the_live_probe(app):
    at = app("feature", run="synth", sae="finetuned_sae", feature=9)
    link = [l for l in at.get("page_link") if "Probe and steer" in l.proto.label]
    assert len(link) == 1
    assert link[0].proto.page.endswith("live_probe") or "live_probe" in link[0].proto.page
    assert "feature=9" in link[0].proto.query_string and "sae=finetuned_sae" in link[0].proto.query_string
