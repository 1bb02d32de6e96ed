"""The Live probe page in Debian's Chromium: type a prompt, probe, see highlighted activations; steer.

The server is the app engineer's `streamlit_server` (tests/browser_utils.py) over a runs dir
holding one run whose config names the tiny demo pair, so the models run live in the server.
"""

from __future__ import annotations

import re
from typing import Iterator

import pytest

from tests.helpers import make_probe_run

from tests.browser_utils import streamlit_server, wait_idle

pytestmark = [pytest.mark.browser, pytest.mark.slow]

PROMPT = 'The <b>cat</b> sat on the mat. <img src=x onerror="alert(1)"> 😀 done'


@pytest.fixture(scope="module")
def probe_app_url(tiny_demo, tmp_path_factory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("browser_probe_runs")
    make_probe_run(root / "probe", tiny_demo)
    with streamlit_server(runs_dir=root) as url:
        yield url


def _wait_for(page, locator, timeout_ms: int) -> None:
    """Wait for `locator`; on a timeout, fail with what the page shows instead (for CI logs)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        locator.wait_for(timeout=timeout_ms)
    except PlaywrightTimeout:
        shown = page.locator("body").inner_text(timeout=5_000)[:3000]
        raise AssertionError(f"timed out after {timeout_ms / 1000:.0f} s waiting for {locator}; the page shows:\n{shown}") from None


def _alpha(style: str) -> float:
    m = re.search(r"rgba\(\s*\d+\s*,\s*\d+\s*,\s*\d+\s*,\s*([0-9.]+)\s*\)", style or "")
    return float(m.group(1)) if m else 0.0


def test_live_probe_and_steering_in_chromium(page, probe_app_url):  # noqa: F811
    # A fresh server answers its very first request in Streamlit's pages/-directory mode, where the
    # probe page's url path differs (see webapp.state._leave_pages_dir_mode): open the app first.
    page.goto(probe_app_url + "/?run=probe", wait_until="domcontentloaded")
    wait_idle(page, timeout_ms=180_000)
    page.goto(probe_app_url + "/live_probe?run=probe", wait_until="domcontentloaded")
    wait_idle(page, timeout_ms=180_000)
    assert page.get_by_text("Page not found").count() == 0
    page.get_by_role("heading", name="Live probe").wait_for(timeout=60_000)

    box = page.locator('[data-testid="stTextArea"] textarea')
    box.fill(PROMPT)
    page.get_by_role("button", name="Run probe").click()
    wait_idle(page, timeout_ms=120_000)

    panel = page.locator('[data-probe="feature-acts"]')
    _wait_for(page, panel, 240_000)
    for model in ("base", "finetuned"):
        spans = panel.locator(f'[data-model="{model}"] .sx-tok')
        n = spans.count()
        assert n >= 10, f"{model}: {n} token spans"
        alphas = [_alpha(spans.nth(i).get_attribute("style")) for i in range(n)]
        assert max(alphas) > 0, f"{model}: no token is highlighted"
    line = panel.locator('[data-model="base"]').text_content().replace("\u00b7", " ")  # render shows all-space tokens as dots
    assert "The <b>cat</b> sat on the mat" in line  # the typed text, token by token, as text
    # the prompt's markup is shown as text, never parsed
    assert panel.locator("b, img").count() == 0
    assert page.locator('[data-testid="stException"]').count() == 0

    page.get_by_role("button", name="Steer").click()
    wait_idle(page, timeout_ms=120_000)
    for model in ("base", "finetuned"):
        block = page.locator(f'[data-probe="steering-{model}"]')
        _wait_for(page, block, 120_000)
        for kind in ("unsteered", "steered"):
            cont = block.locator(f'[data-probe="{kind}"]')
            assert cont.count() == 1
            assert cont.locator(".sx-tok").count() > 12  # 12 prompt tokens of context + the continuation
    assert page.get_by_text(re.compile(r"W_dec\[\d+\]")).count() >= 1
    assert page.locator('[data-testid="stException"]').count() == 0
    assert page.dialogs == []


def test_live_probe_deep_link_on_the_shipped_demo(page, app_url):  # noqa: F811
    """The shipped demo run: ?feature= picks the feature, the default prompt is probed, steering runs."""
    page.goto(app_url + "/?run=demo", wait_until="domcontentloaded")
    wait_idle(page, timeout_ms=180_000)
    page.goto(app_url + "/live_probe?run=demo&sae=finetuned_sae&feature=7", wait_until="domcontentloaded")
    wait_idle(page, timeout_ms=180_000)
    panel = page.locator('[data-probe="feature-acts"]')
    _wait_for(page, panel, 240_000)
    _wait_for(page, page.get_by_text("finetuned SAE feature 7").first, 60_000)
    for model in ("base", "finetuned"):
        assert panel.locator(f'[data-model="{model}"] .sx-tok').count() > 20
    link = page.locator('a[href*="feature=7"]').first
    assert "sae=finetuned_sae" in (link.get_attribute("href") or "")
    page.get_by_role("button", name="Steer").click()
    wait_idle(page, timeout_ms=120_000)
    for model in ("base", "finetuned"):
        _wait_for(page, page.locator(f'[data-probe="steering-{model}"] [data-probe="steered"]'), 120_000)
    assert page.locator('[data-testid="stException"]').count() == 0
    assert page.dialogs == []
