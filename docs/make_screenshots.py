"""Screenshots of every page, taken in Debian's Chromium with Playwright.

    python docs/make_screenshots.py [--runs-dir DIR] [--run demo] [--out docs] [--pages overview,feature,...]

Starts `streamlit run app.py` on 127.0.0.1 (tests/browser_utils.streamlit_server), opens each
page, waits for Streamlit to finish, and writes docs/<page>.png. The live probe page gets a
prompt and a steering call first, so its screenshot shows results.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.browser_utils import CHROMIUM_ARGS, CHROMIUM_PATH, streamlit_server, wait_idle  # noqa: E402


def pages(run: str, sae: str, feature: int) -> dict[str, str]:
    return {
        "overview": f"/overview?run={run}",
        "features": f"/features?run={run}&sae={sae}",
        "feature": f"/feature?run={run}&sae={sae}&feature={feature}",
        "dead_born": f"/dead-born?run={run}",
        "similarity": f"/similarity?run={run}&sae={sae}",
        "live_probe": f"/live_probe?run={run}",
        "differences": f"/differences?run={run}",
        # widened bands (the demo crosscoder has no latent beyond 0.37-0.64) and its most finetune-leaning latent
        "crosscoder": f"/crosscoder?run={run}&base_only_max=0.42&shared_min=0.48&shared_max=0.52&finetune_only_min=0.58&latent=81",
    }


def _probe(page) -> None:
    """Type a prompt, run the probe, then steer (the Live probe page's own buttons)."""
    box = page.locator('[data-testid="stTextArea"] textarea').first
    box.wait_for(timeout=120000)
    box.fill("def read_config(path):\n    with open(path) as f:\n        return json.load(f)\n\nThe meeting was moved to Friday.")
    page.get_by_role("button", name="Run probe").click()
    wait_idle(page, 300000)
    page.locator('[data-probe="feature-acts"]').wait_for(timeout=300000)
    page.get_by_role("button", name="Steer").click()
    wait_idle(page, 300000)
    page.locator('[data-probe="steering-finetuned"]').wait_for(timeout=300000)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs-dir", type=Path, default=None)
    p.add_argument("--run", default="demo")
    p.add_argument("--sae", default="base_sae")
    p.add_argument("--feature", type=int, default=0)
    p.add_argument("--out", type=Path, default=REPO / "docs")
    p.add_argument("--pages", default="")
    p.add_argument("--width", type=int, default=1400)
    a = p.parse_args(argv)
    from playwright.sync_api import sync_playwright

    wanted = [x for x in a.pages.split(",") if x] or list(pages(a.run, a.sae, a.feature))
    a.out.mkdir(parents=True, exist_ok=True)
    with streamlit_server(runs_dir=a.runs_dir) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM_PATH, args=CHROMIUM_ARGS)
        ctx = browser.new_context(viewport={"width": a.width, "height": 1000}, device_scale_factor=1)
        page = ctx.new_page()
        for name, path in pages(a.run, a.sae, a.feature).items():
            if name not in wanted:
                continue
            page.goto(url + path)
            wait_idle(page, 120000)
            if name == "live_probe":
                _probe(page)
            page.wait_for_timeout(1500)  # let plotly finish drawing
            wait_idle(page, 120000)
            # Streamlit scrolls inside its main container: grow the viewport to the content
            height = page.evaluate(
                """() => Math.max(1000, ...['[data-testid="stMain"]', '[data-testid="stMainBlockContainer"]', 'section.main']
                    .map(s => document.querySelector(s)).filter(Boolean).map(e => e.scrollHeight))"""
            )
            page.set_viewport_size({"width": a.width, "height": min(int(height) + 40, 12000)})
            page.wait_for_timeout(800)
            out = a.out / f"{name}.png"
            page.screenshot(path=str(out), full_page=True)
            page.set_viewport_size({"width": a.width, "height": 1000})
            print(out)
        browser.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
