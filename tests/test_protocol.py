"""The server's answers to URLs, seen through Streamlit's websocket protocol (tests/st_protocol.py):
what a browser's frontend receives, without a browser.

* /overview on a warm server: the Overview, no "Page not found" (Streamlit serves the default
  page at "/" only; app.py's hidden alias forwards /overview);
* repeated parameters: the first wins and the URL the browser is told to show has one value;
* every page, opened by URL, finishes its script run without an error.
"""

from __future__ import annotations


import pytest

from explorer.synthetic import make_run
from tests.browser_utils import streamlit_server
from tests.st_protocol import Session, params, run_sync

PATHS = ["", "overview", "features", "feature", "dead-born", "similarity"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("protocol_runs")
    make_run(root / "synth", n_features=80, seed=21)
    make_run(root / "other", n_features=30, seed=22)
    with streamlit_server(runs_dir=root) as url:
        yield url


def test_overview_path_on_a_warm_server_is_the_overview(server):
    async def go():
        async with Session(server) as s:
            first = await s.open("", "run=synth")  # the server is warm: it has answered a request
            assert first.ok, first.errors
            return await s.open("overview", "run=synth&outliers=1")

    r = run_sync(go())
    assert not r.page_not_found, "Streamlit's 'Page not found' dialog"
    assert r.ok, r.errors
    assert "Overview" in r.texts()
    assert params(r.query_string) == {"run": ["synth"], "outliers": ["1"]}  # the query survives the forward
    assert r.n_runs == 2  # the alias's run, then the Overview's


@pytest.mark.parametrize("path", PATHS)
def test_every_page_by_url(server, path):
    async def go():
        async with Session(server) as s:
            await s.open("", "run=synth")
            return await s.open(path, "run=synth&sae=base_sae&feature=3")

    r = run_sync(go())
    assert r.ok and not r.page_not_found, r.errors


@pytest.mark.parametrize("path", ["feature", "features", "overview"])
def test_repeated_parameters_are_rewritten_to_the_first(server, path):
    async def go():
        async with Session(server) as s:
            return await s.open(path, "run=synth&run=other&sae=finetuned_sae&sae=base_sae&feature=5&feature=6")

    r = run_sync(go())
    assert r.ok, r.errors
    q = params(r.query_string)
    assert q["run"] == ["synth"]
    if "sae" in q:
        assert q["sae"] == ["finetuned_sae"]
    if path == "feature":
        assert q["feature"] == ["5"] and any("feature 5" in t for t in r.texts())
