"""State in the URL, in Debian's Chromium (issue 13): Back restores a search, the copy-link button
copies the view's URL, /overview on a warm server is the Overview, and the features table shows
every row of its page.

The server is tests/browser_utils.synthetic_app_url (run "synth", 200 features).
"""

from __future__ import annotations

import re

import pytest

from explorer import store
from tests.browser_utils import wait_idle

pytestmark = pytest.mark.browser


def _count_line(page) -> str:
    return page.get_by_text(re.compile(r"features match")).first.inner_text()


def _wait_query(page, pattern: str, timeout_ms: int = 60000) -> None:
    """Wait until the address bar's query matches `pattern` (Streamlit changes it with pushState)."""
    page.wait_for_function("(p) => new RegExp(p).test(window.location.search)", arg=pattern, timeout=timeout_ms, polling=200)


def test_back_after_opening_a_feature_restores_the_search(synthetic_app_url, synthetic_runs, page):
    page.goto(f"{synthetic_app_url}/features?run=synth&sae=base_sae")
    wait_idle(page)
    box = page.get_by_label("Search top-example tokens")
    box.fill("the")
    box.press("Enter")
    wait_idle(page)
    _wait_query(page, r"[?&]q=the(&|$)")
    n = store.FeatureTable.open(synthetic_runs / "synth", "base_sae").count(store.FeatureFilter(search="the", exclude_both_dead=True))
    assert f"{n:,} of 200 features match" in _count_line(page)
    assert n < 200
    # open a feature from the table (its first row), then press Back
    grid = page.locator('[data-testid="stDataFrame"]').first
    b = grid.bounding_box()
    page.mouse.click(b["x"] + 18, b["y"] + 35 + 17)
    page.wait_for_url(re.compile(r".*/feature\?.*feature=\d+"), timeout=60000)
    wait_idle(page)
    page.go_back()
    page.wait_for_function("() => window.location.pathname.endsWith('/features') && /[?&]q=the/.test(window.location.search)", timeout=60000, polling=200)
    wait_idle(page)
    assert page.get_by_label("Search top-example tokens").input_value() == "the"
    assert f"{n:,} of 200 features match" in _count_line(page)


def test_copy_link_copies_the_views_url(browser, synthetic_app_url):
    context = browser.new_context(viewport={"width": 1500, "height": 1100})
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=synthetic_app_url)
    page = context.new_page()
    try:
        page.goto(f"{synthetic_app_url}/similarity?run=synth&sae=finetuned_sae&both_dead=1")
        wait_idle(page)
        frame = page.frame_locator('[data-testid="stSidebar"] iframe').first
        frame.get_by_role("button", name="Copy link to this view").click()
        frame.get_by_text("Copied").wait_for(timeout=10000)
        copied = page.evaluate("() => navigator.clipboard.readText()")
        assert copied == page.url
        assert "sae=finetuned_sae" in copied and "both_dead=1" in copied and "run=synth" in copied
    finally:
        context.close()


def test_overview_path_on_a_warm_server(synthetic_app_url, page):
    page.goto(f"{synthetic_app_url}/?run=synth")  # the server has answered before: it is warm
    wait_idle(page)
    page.goto(f"{synthetic_app_url}/overview?run=synth")
    wait_idle(page)
    page.get_by_role("heading", name="Overview").wait_for(timeout=60000)
    page.wait_for_timeout(1000)
    assert "Page not found" not in page.inner_text("body")
    assert page.dialogs == []
    assert "run=synth" in page.url


def test_features_table_shows_fifty_rows(synthetic_app_url, page):
    page.goto(f"{synthetic_app_url}/features?run=synth&sae=base_sae&both_dead=1")
    wait_idle(page)
    grid = page.locator('[data-testid="stDataFrame"]').first
    grid.wait_for(timeout=60000)
    h = grid.bounding_box()["height"]
    assert h >= 35 * 51, h  # the header and 50 rows of 35 px, no scrolling inside the table
    # the grid's last line is the page's last row, not a scroll position: click it, it opens feature 49
    grid.evaluate("el => el.scrollIntoView({block: 'end'})")
    page.wait_for_timeout(500)
    b = grid.bounding_box()
    page.mouse.click(b["x"] + 18, b["y"] + 35 * 51 - 17)
    page.wait_for_url(re.compile(r".*/feature\?.*feature=49\b"), timeout=60000)
