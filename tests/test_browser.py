"""The app in a real browser: `streamlit run app.py` on 127.0.0.1, Debian's Chromium via Playwright.

* a feature page opened by deep link shows highlighted examples for both models (shipped demo run);
* hostile vocabulary (`<script>`, `<img onerror>`, ...) renders as text and fires no dialog
  (synthetic run);
* selecting a row of the Features table and clicking a point of the Similarity scatter open the
  feature page;
* bad query params show a friendly message, never a traceback.

The live probe and steering are driven in tests/test_browser_probe.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

from tests.browser_utils import wait_idle

pytestmark = pytest.mark.browser
REPO = Path(__file__).resolve().parent.parent


def _highlighted(page, model: str) -> int:
    """Token spans with a non-zero background in the given model's example lines."""
    return page.evaluate(
        """(model) => Array.from(document.querySelectorAll(`.sx-ex[data-model="${model}"] .sx-tok`))
              .filter(s => { const m = (s.getAttribute('style') || '').match(/rgba\\([^)]*,\\s*([0-9.]+)\\)/); return m && parseFloat(m[1]) > 0; }).length""",
        model,
    )


def _no_traceback(page) -> None:
    text = page.inner_text("body")
    assert "Traceback" not in text and "File \"/" not in text


def test_feature_deep_link_on_the_demo_run(app_url, page):
    demo = REPO / "data" / "runs" / "demo"
    feats = pd.read_parquet(demo / "features.parquet", columns=["sae", "feature_id", "cross_class", "density_base"])
    alive = feats[(feats.sae == "base_sae") & (feats.cross_class == "both_alive")].sort_values("density_base", ascending=False)
    fid = int(alive.feature_id.iloc[0])
    page.goto(f"{app_url}/feature?run=demo&sae=base_sae&feature={fid}")
    wait_idle(page)
    page.wait_for_selector('.sx-ex[data-model="finetuned"]', timeout=60000)
    assert page.locator("h3", has_text=f"feature {fid}").count() >= 1
    # top examples on each model, each drawn on both models, with highlighted tokens
    assert page.locator('.sx-ex[data-model="base"]').count() >= 2
    assert page.locator('.sx-ex[data-model="finetuned"]').count() >= 2
    assert _highlighted(page, "base") > 0 and _highlighted(page, "finetuned") > 0
    # the navigation is the app's (app.py ran), not Streamlit's pages/ fallback
    nav = page.inner_text('[data-testid="stSidebarNav"]')
    assert "Dead & born" in nav and "Live probe" in nav
    assert page.dialogs == []
    _no_traceback(page)


def test_hostile_tokens_render_as_text(synthetic_app_url, synthetic_runs, page):
    feats = pd.read_parquet(synthetic_runs / "synth" / "features.parquet")
    hit = feats[(feats.sae == "base_sae") & feats.top_tokens.str.contains("<script>alert(1)</script>", regex=False) & (feats.status_base != "dead")]
    fid = int(hit.feature_id.iloc[0])
    page.goto(f"{synthetic_app_url}/feature?run=synth&sae=base_sae&feature={fid}")
    wait_idle(page)
    page.wait_for_selector(".sx-tok", timeout=60000)
    # hover every token (tooltips), scroll everything into view
    for el in page.locator(".sx-tok").all()[:200]:
        el.hover(timeout=5000)
    page.wait_for_timeout(500)
    assert page.dialogs == []
    # shown as text ...
    toks = page.eval_on_selector_all(".sx-tok", "els => els.map(e => e.textContent)")
    assert "<script>alert(1)</script>" in toks
    # ... and never parsed into elements
    assert page.evaluate("() => Array.from(document.scripts).filter(s => s.textContent.includes('alert(')).length") == 0
    assert page.locator(".sx-ex img, .sx-ex svg, .sx-ex script, .sx-ex b").count() == 0
    assert page.locator('img[src="x"]').count() == 0


def test_features_row_opens_the_feature_page(synthetic_app_url, page):
    page.goto(f"{synthetic_app_url}/features?run=synth&sae=base_sae")
    wait_idle(page)
    grid = page.locator('[data-testid="stDataFrame"]').first
    grid.wait_for(timeout=60000)
    # sort by feature id (default): row 3 is feature 3; click its row-selection cell
    box = grid.bounding_box()
    assert box is not None
    row_h = 35
    page.mouse.click(box["x"] + 18, box["y"] + row_h * 4 + row_h / 2)  # header + 3 rows down
    page.wait_for_url(re.compile(r".*/feature\?.*feature=\d+"), timeout=60000)
    wait_idle(page)
    fid = int(re.search(r"feature=(\d+)", page.url).group(1))
    assert page.locator("h3", has_text=f"feature {fid}").count() >= 1
    _no_traceback(page)


def test_similarity_point_opens_the_feature_page(synthetic_app_url, page):
    page.goto(f"{synthetic_app_url}/similarity?run=synth&sae=base_sae")
    wait_idle(page)
    page.wait_for_function(
        "() => Array.from(document.querySelectorAll('.js-plotly-plot')).some(p => p._fullData && p._fullData[0] && p._fullData[0].type === 'scattergl')",
        timeout=60000,
    )
    # the scatter is the plot whose first trace holds one point per feature
    idx = page.evaluate(
        """() => Array.from(document.querySelectorAll('.js-plotly-plot')).findIndex(p => p._fullData && p._fullData[0] && p._fullData[0].customdata && p._fullData[0].type === 'scattergl')"""
    )
    assert idx >= 0
    plot = page.locator(".js-plotly-plot").nth(idx)
    plot.scroll_into_view_if_needed()
    page.wait_for_timeout(1500)
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    # Plotly emits plotly_click only with hover data in hand (Fx.click reads gd._hoverdata), and its
    # hover is throttled: a click whose mousemove has not yet been hovered does nothing. So each try
    # takes the point's pixel position afresh (a chart above may have changed the layout), hovers
    # it, waits until plotly has hovered a point, then clicks.
    for attempt in range(3):
        xy = page.evaluate(
            """(i) => { const p = document.querySelectorAll('.js-plotly-plot')[i];
                     const d = p._fullData[0]; const fl = p._fullLayout;
                     const xs = d.x, ys = d.y; let k = 0;
                     for (let j = 0; j < xs.length; j++) { if (xs[j] > -9 && ys[j] > -9) { k = j; break; } }
                     const r = p.getBoundingClientRect();
                     return [r.left + fl._size.l + fl.xaxis.l2p(xs[k]), r.top + fl._size.t + fl.yaxis.l2p(ys[k])]; }""",
            idx,
        )
        page.mouse.move(xy[0] - 3, xy[1] - 3)
        page.mouse.move(xy[0], xy[1], steps=3)
        try:
            page.wait_for_function(
                "(i) => { const p = document.querySelectorAll('.js-plotly-plot')[i]; return !!(p._hoverdata && p._hoverdata.length); }",
                arg=idx,
                timeout=20000,
            )
        except PlaywrightTimeout:
            if attempt == 2:
                raise
            continue
        page.mouse.down()
        page.mouse.up()
        try:
            page.wait_for_url(re.compile(r".*/feature\?.*feature=\d+"), timeout=30000)
            break
        except PlaywrightTimeout:
            if attempt == 2:
                raise
    wait_idle(page)
    assert "sae=base_sae" in page.url
    _no_traceback(page)


@pytest.mark.parametrize("query,message", [("feature=abc", "is not a feature number"), ("feature=-4", "is negative"), ("feature=99999999", "out of range")])
def test_bad_params_in_the_browser(synthetic_app_url, page, query, message):
    page.goto(f"{synthetic_app_url}/feature?run=synth&sae=base_sae&{query}")
    wait_idle(page)
    page.wait_for_selector('[data-testid="stAlertContentError"]', timeout=60000)
    assert message in page.inner_text('[data-testid="stAlertContentError"]')
    _no_traceback(page)


def test_unknown_run_in_the_browser(synthetic_app_url, page):
    page.goto(f"{synthetic_app_url}/overview?run=..%2F..%2Fetc")
    wait_idle(page)
    page.wait_for_selector('[data-testid="stAlertContentError"]', timeout=60000)
    assert "not a valid run id" in page.inner_text('[data-testid="stAlertContentError"]')
    _no_traceback(page)


def test_no_outbound_requests(synthetic_app_url, page):
    """The app runs offline: no page asks for anything outside 127.0.0.1."""
    outside = []
    page.on("request", lambda r: outside.append(r.url) if not r.url.startswith(synthetic_app_url) and r.url.split(":", 1)[0] in ("http", "https", "ws", "wss") else None)
    for path in ("/overview?run=synth", "/features?run=synth", "/feature?run=synth&feature=5", "/dead-born?run=synth", "/similarity?run=synth", "/differences?run=synth"):
        page.goto(synthetic_app_url + path)
        wait_idle(page)
        page.wait_for_timeout(500)
    assert outside == []


def test_features_csv_download(synthetic_app_url, synthetic_runs, page):
    page.goto(f"{synthetic_app_url}/features?run=synth&sae=finetuned_sae")
    wait_idle(page)
    with page.expect_download(timeout=60000) as dl:
        page.get_by_role("button", name=re.compile("Download the .* matching rows as CSV")).click()
    got = pd.read_csv(dl.value.path())
    feats = pd.read_parquet(synthetic_runs / "synth" / "features.parquet")
    want = feats[(feats.sae == "finetuned_sae") & (feats.cross_class != "both_dead")].sort_values("feature_id")  # the default view
    assert got.feature_id.tolist() == want.feature_id.tolist()
    # hostile strings intact, as data; one that a spreadsheet would run as a formula has a leading quote
    as_text = lambda v: "'" + v if v.startswith(("=", "+", "-", "@", "\t", "\r")) else v  # noqa: E731
    assert got.top_tokens.fillna("").tolist() == [as_text(v) for v in want.top_tokens.fillna("")]


def test_features_parquet_download_equals_the_command_line_export(synthetic_app_url, synthetic_runs, page, tmp_path):
    """The page's Parquet download of a filtered, sorted view holds the rows `sae-transfer export
    features --view` writes for the same view (the link's query)."""
    import pyarrow.parquet as pq

    from sae_transfer.cli import main

    query = "sae=base_sae&class=died~both_alive&sort=density_base&desc=1&density=-8~-0.5"
    page.goto(f"{synthetic_app_url}/features?run=synth&{query}")
    wait_idle(page)
    with page.expect_download(timeout=60000) as dl:
        page.get_by_role("button", name=re.compile("or as Parquet")).click()
    got = pq.read_table(dl.value.path())
    out = tmp_path / "cli.parquet"
    assert main(["export", "features", "--run", "synth", "--runs-dir", str(synthetic_runs), "--view", page.url, "--out", str(out)]) == 0
    want = pq.read_table(out)
    assert got.num_rows > 0 and got.column("feature_id").to_pylist() == want.column("feature_id").to_pylist(), page.url
    assert got.schema.remove_metadata() == want.schema.remove_metadata()
    pd.testing.assert_frame_equal(got.to_pandas(), want.to_pandas())  # NaN equal to NaN (Table.equals says not)


@pytest.mark.parametrize("path", ["/dead-born?run=synth", "/live_probe?run=synth", "/feature?run=synth&feature=3", "/features?run=synth", "/similarity?run=synth", "/overview?run=synth", "/crosscoder?run=synth", "/differences?run=synth"])
def test_every_page_url_is_found_as_a_fresh_servers_first_request(synthetic_runs, page, path):
    """In Streamlit's pages/-directory mode a URL must match a page file's name (4_dead-born.py -> dead-born)."""
    from tests.browser_utils import streamlit_server

    with streamlit_server(runs_dir=synthetic_runs) as url:
        page.goto(f"{url}{path}")
        wait_idle(page)
        page.wait_for_selector('[data-testid="stSidebarNav"]', timeout=60000)
        page.wait_for_timeout(1000)
        assert "Page not found" not in page.inner_text("body")


def test_deep_link_is_the_first_request_of_a_fresh_server(synthetic_runs, page):
    """Streamlit runs a fresh server's first request in pages/-directory mode (without app.py);
    webapp.state leaves that mode, so a deep link still gets the app's navigation and page."""
    from tests.browser_utils import streamlit_server

    with streamlit_server(runs_dir=synthetic_runs) as url:
        page.goto(f"{url}/feature?run=synth&sae=finetuned_sae&feature=7")
        wait_idle(page)
        page.wait_for_selector(".sx-ex", timeout=60000)
        nav = page.inner_text('[data-testid="stSidebarNav"]')
        assert "Dead & born" in nav and "Live probe" in nav  # app.py's st.navigation, not the pages/ listing
        assert page.locator("h3", has_text="feature 7").count() >= 1
        assert "sae=finetuned_sae" in page.url and "feature=7" in page.url
