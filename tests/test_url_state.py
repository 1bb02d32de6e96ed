"""Every page's selection is in the URL (issue 13): restored from it, written back on change, one
rule for repeated parameters; and the issue's bugs that AppTest can see (the features table's
height, a damaged vocabulary, the token counts).

AppTests of the real app on synthetic runs (explorer.synthetic) and the shipped demo run.
The live probe's selections are in tests/test_app_probe.py, the browser's Back button and the
copy-link button in tests/test_browser_state.py, the server's answers to /overview in
tests/test_protocol.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from streamlit.testing.v1 import AppTest

from explorer import rundir, schema, store
from explorer.synthetic import make_run
from tests.helpers import APP, PAGES, REPO, md_text

N = 150


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("url_runs")
    make_run(root / "synth", n_features=N, seed=11)
    make_run(root / "other", n_features=40, seed=12)
    bad = make_run(root / "badvocab", n_features=20, seed=13)
    _write_invalid_utf8_vocab(bad)
    return root


def _write_invalid_utf8_vocab(run_dir: Path) -> None:
    """Rewrite vocab.parquet with one token string that is not UTF-8, and the manifest's checksum
    of it: a run whose files all match the manifest but hold undecodable text."""
    t = pq.read_table(run_dir / "vocab.parquet")
    strs = [s.encode() for s in t.column("token_str").to_pylist()]
    strs[5] = b"\xff\xfe broken"
    offsets = np.cumsum([0] + [len(b) for b in strs]).astype(np.int32)
    arr = pa.Array.from_buffers(pa.string(), len(strs), [None, pa.py_buffer(offsets.tobytes()), pa.py_buffer(b"".join(strs))])
    t = t.set_column(t.column_names.index("token_str"), "token_str", arr)  # the other columns (token_piece, token_bytes) as they were
    pq.write_table(t.cast(schema.VOCAB), run_dir / "vocab.parquet")
    m = json.loads((run_dir / schema.MANIFEST).read_text())
    path = run_dir / "vocab.parquet"
    m["files"]["vocab.parquet"] = {"rows": len(strs), "bytes": path.stat().st_size, "sha256": rundir.sha256_file(path)}
    m.pop("schema_version", None)
    rundir.write_manifest(run_dir, m)


@pytest.fixture
def app(runs, monkeypatch):
    monkeypatch.setenv("SAE_EXPLORER_RUNS_DIR", str(runs))

    def make(_page: str, **params) -> AppTest:
        at = AppTest.from_file(APP, default_timeout=120)
        at.query_params.update({k: v if isinstance(v, list) else str(v) for k, v in params.items()})
        at.run()
        if _page != "overview":
            at.switch_page(PAGES[_page])
            at.run()
        assert not at.exception, [e.value for e in at.exception]
        return at

    return make


def _qp(at: AppTest) -> dict[str, str]:
    return {k: (v[0] if isinstance(v, list) and len(v) == 1 else v) for k, v in at.query_params.items()}


def _table(runs: Path, sae: str = "base_sae") -> store.FeatureTable:
    return store.FeatureTable.open(runs / "synth", sae)


# ---------------------------------------------------------------- repeated parameters


@pytest.mark.parametrize("page", list(PAGES))
def test_repeated_parameters_first_wins_and_the_url_is_rewritten(app, page):
    at = app(page, run=["synth", "other"], sae=["finetuned_sae", "base_sae"], feature=["4", "9"])
    assert not at.error, [e.value for e in at.error]
    assert at.sidebar.selectbox[0].value == "synth"
    q = _qp(at)
    assert q["run"] == "synth"  # one value, the first
    if "sae" in q:
        assert q["sae"] == "finetuned_sae"
    if page == "feature":
        assert q["feature"] == "4" and any("feature 4" in s.value for s in at.subheader)


# ---------------------------------------------------------------- the features page


def test_features_selection_is_restored_from_the_url(app, runs):
    at = app("features", run="synth", sae="finetuned_sae", sort="act_similarity", desc="1", rows="25", page="2",
             status_base="regular~dense", q=" the", both_dead="1")
    assert not at.error and not at.warning, [w.value for w in at.warning]
    assert at.selectbox(key="features_sae").value == "finetuned_sae"
    assert at.selectbox(key="features_sort").value == "act_similarity"
    assert at.toggle(key="features_desc").value is True
    assert at.selectbox(key="features_page_size").value == 25
    assert at.multiselect(key="f_status_base").value == ["regular", "dense"]
    assert at.text_input(key="f_search").value == " the"
    flt = store.FeatureFilter(status_base=("regular", "dense"), search=" the")
    ft = _table(runs, "finetuned_sae")
    n = ft.count(flt)
    assert n > 25, "the fixture needs two pages"
    assert any(f"**{n:,}** of {N:,} features match." == m.value for m in at.markdown)
    want = ft.page(flt, "act_similarity", True, 25, 25).feature_id.tolist()  # page 2
    assert at.dataframe[0].value.feature_id.tolist() == want
    assert at.get("pagination")[0].value == 2


def test_features_changes_are_written_to_the_url_and_reset_the_page(app, runs):
    at = app("features", run="synth", both_dead="1", page="2")
    at.selectbox(key="features_sort").set_value("density_base").run()
    q = _qp(at)
    assert q["sort"] == "density_base" and "page" not in q  # a new order starts at page 1
    at.text_input(key="f_search").input("def").run()
    at.radio(key="f_search_mode").set_value("exact").run()
    at.checkbox(key="f_search_contexts").check().run()
    at.slider(key="f_sim").set_value((0.0, 0.5)).run()
    q = _qp(at)
    assert (q["q"], q["mode"], q["contexts"], q["similarity"]) == ("def", "exact", "1", "0~0.5")
    # back to a default: the parameter leaves the URL
    at.selectbox(key="features_sort").set_value("feature_id").run()
    assert "sort" not in _qp(at)
    # the URL, opened afresh, gives the same view
    again = app("features", **_qp(at))
    assert again.dataframe[0].value.feature_id.tolist() == at.dataframe[0].value.feature_id.tolist()
    assert again.checkbox(key="f_search_contexts").value is True and again.slider(key="f_sim").value == (0.0, 0.5)


@pytest.mark.parametrize(
    "param,value,widget",
    [("sort", "nope", "features_sort"), ("rows", "7", "features_page_size"), ("density", "3~1", "f_density"),
     ("status_base", "regular~<b>x</b>", "f_status_base"), ("desc", "maybe", "features_desc"), ("q", "x" * 300, "f_search")],
)
def test_unusable_url_values_warn_and_leave_the_url(app, param, value, widget):
    at = app("features", run="synth", **{param: value})
    warnings = [md_text(w.value) for w in at.warning]
    assert len(warnings) == 1 and f"The link's {param}" in warnings[0], warnings
    assert "<b>" not in at.warning[0].value  # shown as text
    assert param not in _qp(at)
    assert not at.error


def test_search_modes_in_the_app(app, runs):
    ft = _table(runs)
    for mode, query, contexts in (("exact", "def return", False), ("regex", r"^ ?(def|class)\d*$", False), ("substring", "import", True)):
        at = app("features", run="synth", both_dead="1", q=query, mode=mode, contexts="1" if contexts else "0")
        n = ft.count(store.FeatureFilter(search=query, search_mode=mode, search_contexts=contexts))
        assert any(f"**{n:,}** of {N:,} features match." == m.value for m in at.markdown), (mode, n, [m.value for m in at.markdown])
    at = app("features", run="synth", q="(unclosed", mode="regex")
    assert any("regular expression cannot be used" in md_text(w.value) for w in at.warning)
    assert not at.exception and not at.error


def test_features_table_shows_every_row_of_its_page(app):
    """The table was set to 50 rows a page and showed about 10 (Streamlit's default height)."""
    from tests.st_protocol import Session, run_sync

    at = app("features", run="synth", both_dead="1", rows="50")
    assert len(at.dataframe[0].value) == 50
    # AppTest keeps no element heights: ask the real server (tests/st_protocol.py)
    from tests.browser_utils import streamlit_server

    async def heights(url):
        async with Session(url) as s:
            out = {}
            for rows in (25, 50, 100):
                r = await s.open("features", f"run=synth&both_dead=1&rows={rows}")
                assert r.ok, r.errors
                out[rows] = [h.pixel_height for t, h in r.layouts if t == "dataframe"][0]
            return out

    with streamlit_server(runs_dir=at_runs_dir(at)) as url:
        px = run_sync(heights(url))
    for rows, h in px.items():
        assert h >= 35 * (rows + 1), (rows, h)  # header + every row at Streamlit's 35 px


def at_runs_dir(at: AppTest) -> str:
    import os

    return os.environ["SAE_EXPLORER_RUNS_DIR"]


# ---------------------------------------------------------------- the other pages


def test_feature_page_selection_in_the_url(app):
    at = app("feature", run="synth", sae="finetuned_sae", feature="12", quantiles="1")
    assert at.selectbox(key="feature_page_sae").value == "finetuned_sae"
    assert at.number_input(key="feature_page_id").value == 12
    assert at.toggle(key="feature_quantiles").value is True
    assert "bin " in "".join(h.proto.body for h in at.get("html"))  # the quantile examples' captions
    at.number_input(key="feature_page_id").set_value(13).run()
    at.selectbox(key="feature_page_sae").set_value("base_sae").run()
    q = _qp(at)
    assert (q["feature"], q["sae"], q["quantiles"]) == ("13", "base_sae", "1")
    # "Back": the old URL again, after the page was left (its widget state is gone)
    at.switch_page(PAGES["features"]).run()
    at.query_params.clear()
    at.query_params.update(run="synth", sae="finetuned_sae", feature="12")
    at.switch_page(PAGES["feature"]).run()
    assert at.number_input(key="feature_page_id").value == 12 and at.selectbox(key="feature_page_sae").value == "finetuned_sae"
    assert at.toggle(key="feature_quantiles").value is False


def test_dead_born_threshold_and_pages_in_the_url(app, runs):
    con = store.connect()
    at = app("dead_born", run="synth", threshold="0.3", died_page="1")
    assert at.slider(key="match_threshold").value == pytest.approx(0.3)
    bl = store.born_lost_counts(con, runs / "synth", 0.3)
    assert f"**{bl['born']:,}** features at threshold 0.30" in [m.value for m in at.markdown]
    at.slider(key="match_threshold").set_value(0.6).run()
    assert _qp(at)["threshold"] == "0.6"
    n_lost = store.born_lost_counts(con, runs / "synth", 0.6)["lost"]
    if n_lost > 10:
        pag = [p for p in at.get("pagination") if p.proto.id.endswith("pager_lost_page")][0]
        assert pag.value == 1


def test_overview_and_similarity_toggles_in_the_url(app, runs):
    at = app("overview", run="synth", outliers="1")
    assert at.toggle(key="overview_outliers").value is True
    ref = pd.read_parquet(runs / "synth" / "metrics.parquet")
    assert sorted(at.dataframe[0].value.ce_recovered.round(9)) == sorted(ref[ref.outliers == "excluded"].ce_recovered.round(9))
    at.toggle(key="overview_outliers").set_value(False).run()
    assert "outliers" not in _qp(at)
    at = app("similarity", run="synth", sae="finetuned_sae", both_dead="1")
    assert at.toggle(key="sim_both_dead").value is True and at.selectbox(key="similarity_sae").value == "finetuned_sae"


@pytest.mark.parametrize("page", list(PAGES))
def test_every_page_has_a_copy_link_button(app, page):
    at = app(page, run="synth", feature="1")
    frames = at.sidebar.get("iframe")
    assert len(frames) == 1 and "Copy link to this view" in frames[0].proto.srcdoc
    assert "window.parent.location.href" in frames[0].proto.srcdoc  # the browser's URL: every selection


# ---------------------------------------------------------------- the audit's other bugs


@pytest.mark.parametrize("page", ["feature", "dead_born", "features"])
def test_invalid_utf8_in_the_vocabulary_is_a_damaged_run(app, page):
    """vocab.parquet with a valid checksum but a token string that is not UTF-8: the page says
    the run is damaged (it said "Something went wrong")."""
    at = app(page, run="badvocab", sae="base_sae", feature="3", both_dead="1")
    errors = [md_text(e.value) for e in at.error]
    if page == "features":  # the table does not read the vocabulary; its exact-token search does
        assert not errors
        at.radio(key="f_search_mode").set_value("exact").run()
        at.text_input(key="f_search").input("the").run()
        errors = [md_text(e.value) for e in at.error]
    assert any("is damaged" in e and "vocab.parquet" in e and "UTF-8" in e for e in errors), errors
    assert not any("Something went wrong" in e for e in errors)


def test_token_counts_are_explained_where_both_appear(app):
    """Sidebar: the sample's tokens; quality table: the counted ones. Both numbers, and why."""
    at = app("overview", run="synth")
    m = json.loads((Path(at_runs_dir(at)) / "synth" / schema.MANIFEST).read_text())
    n, counted = m["n_tokens"], m["n_counted_tokens"]
    assert counted < n
    side = md_text(at.sidebar.caption[0].value)
    assert f"{n:,} tokens in the sample" in side and f"{counted:,} count" in side and "special tokens" in side
    main = " ".join(md_text(c.value) for c in at.caption)
    assert f"{n:,}" in main and f"{counted:,}" in main and "BOS" in main
    assert "tokens counted" in json.dumps([c.proto.columns for c in at.dataframe[:1]])


def test_token_counts_on_the_demo_run(monkeypatch):
    if not (REPO / "data" / "runs" / "demo" / schema.MANIFEST).exists():
        pytest.fail("data/runs/demo is missing: the demo run ships with the repository")
    monkeypatch.delenv("SAE_EXPLORER_RUNS_DIR", raising=False)
    at = AppTest.from_file(APP, default_timeout=120)
    at.query_params["run"] = "demo"
    at.run()
    m = json.loads((REPO / "data" / "runs" / "demo" / schema.MANIFEST).read_text())
    side = md_text(at.sidebar.caption[0].value)
    assert f"{m['n_tokens']:,}" in side and f"{m['n_counted_tokens']:,}" in side  # 499,200 and 494,500
    assert set(at.dataframe[0].value["n_tokens"]) == {m["n_counted_tokens"]}  # the quality table counts these
