"""Load test (issue 6): many concurrent browser sessions against a real `streamlit run app.py`.

Starts `streamlit run app.py` on 127.0.0.1 (a random free port, via tests/browser_utils.py) over
a runs dir (default: data/runs, the shipped demo run), launches ONE Debian Chromium with one
Playwright browser context per session, and for --duration seconds every session loops over a
random mix of:

    feature  deep link to a random feature of a random SAE (/feature?run=..&sae=..&feature=..),
             done when its "feature N" heading is shown
    filter   the Features page: type a search term in the table filter, done when the count
             line ("N of M features match") or "No feature matches" is shown
    probe    the Live probe page: type a fresh prompt, click "Run probe", done when the
             highlighted activations panel is shown (real inference in the server, shared pair)

Errors counted per action: a Streamlit exception box, an error alert, the app's generic
"Something went wrong" message, "Traceback" in the page text, an HTTP response >= 400, an
uncaught page JS error, and a timeout. Latency is per action, wall clock from the action's start
until its done condition. Sessions stop by themselves at the deadline (an action in flight
finishes or times out). Prints p50/p95 per action type and writes benchmarks/results/load.json.

    python benchmarks/load_test.py                      # 25 sessions, 60 s
    python benchmarks/load_test.py --smoke              # 3 sessions, 10 s (tests/test_load_smoke.py)
    python benchmarks/load_test.py --sessions 25 --duration 60 --out benchmarks/results/load.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sys
import time
from pathlib import Path


REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks._common import PROMPTS, SEARCH_TERMS, load_summary, print_load_summary  # noqa: E402
from tests.browser_utils import CHROMIUM_ARGS, CHROMIUM_PATH, IDLE_JS, streamlit_server  # noqa: E402

ACTIONS = ("feature", "filter", "probe")
WEIGHTS = (0.45, 0.3, 0.25)


async def wait_idle(page, timeout_ms: int) -> None:
    await page.wait_for_selector('[data-testid="stApp"]', timeout=timeout_ms)
    await page.wait_for_function(IDLE_JS, timeout=timeout_ms, polling=200)
    await page.wait_for_timeout(300)
    await page.wait_for_function(IDLE_JS, timeout=timeout_ms, polling=200)


async def page_problems(page) -> list[str]:
    found = []
    if await page.locator('[data-testid="stException"]').count():
        found.append("exception box")
    errs = page.locator('[data-testid="stAlertContentError"]')
    if await errs.count():
        found.append("error alert: " + (await errs.first.inner_text())[:200])
    body = await page.inner_text("body")
    if "Traceback" in body:
        found.append("Traceback in page")
    if "Something went wrong" in body:
        found.append("generic error message")
    return found


def base_path_probe(url: str, response) -> bool:
    """Streamlit's frontend finds the server's base path by trying /<page>/_stcore/health and
    /<page>/_stcore/host-config on a deep link; their 404s are expected, not failures."""
    path = response.url[len(url):].split("?")[0]
    return response.status == 404 and path.count("/") == 3 and path.endswith(("/_stcore/health", "/_stcore/host-config"))


class Session:
    def __init__(self, idx: int, browser, url: str, run_id: str, d_sae: dict[str, int], deadline: float, timeout_ms: int, rng: random.Random):
        self.idx, self.browser, self.url, self.run_id, self.d_sae = idx, browser, url, run_id, d_sae
        self.deadline, self.timeout_ms, self.rng = deadline, timeout_ms, rng
        self.records: list[dict] = []
        self.http_errors: list[str] = []
        self.js_errors: list[str] = []

    async def run(self) -> None:
        ctx = await self.browser.new_context(viewport={"width": 1400, "height": 1000})
        page = await ctx.new_page()
        page.on("dialog", lambda d: asyncio.ensure_future(d.dismiss()))
        page.on("response", lambda r: self.http_errors.append(f"{r.status} {r.url}") if r.status >= 400 and not base_path_probe(self.url, r) else None)
        page.on("pageerror", lambda e: self.js_errors.append(str(e)[:300]))
        try:
            while time.monotonic() < self.deadline:
                action = self.rng.choices(ACTIONS, WEIGHTS)[0]
                n_http, n_js = len(self.http_errors), len(self.js_errors)
                t0 = time.monotonic()
                error = None
                try:
                    await getattr(self, "_" + action)(page)
                    problems = await page_problems(page)
                    if problems:
                        error = "; ".join(problems)
                except Exception as exc:  # noqa: BLE001 - a timeout or a failed wait is an error of this action
                    error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                dt = time.monotonic() - t0
                if len(self.http_errors) > n_http:
                    error = (error + "; " if error else "") + "HTTP " + ", ".join(self.http_errors[n_http:])[:200]
                if len(self.js_errors) > n_js:
                    error = (error + "; " if error else "") + "JS " + ", ".join(self.js_errors[n_js:])[:200]
                self.records.append({"session": self.idx, "action": action, "seconds": dt, "error": error, "t": t0})
        finally:
            await ctx.close()

    async def _feature(self, page) -> None:
        sae = self.rng.choice(sorted(self.d_sae))
        fid = self.rng.randrange(self.d_sae[sae])
        await page.goto(f"{self.url}/feature?run={self.run_id}&sae={sae}&feature={fid}", wait_until="domcontentloaded", timeout=self.timeout_ms)
        await wait_idle(page, self.timeout_ms)
        await page.locator("h3", has_text=f"feature {fid}").first.wait_for(timeout=self.timeout_ms)

    async def _filter(self, page) -> None:
        if "/features" not in page.url:
            await page.goto(f"{self.url}/features?run={self.run_id}", wait_until="domcontentloaded", timeout=self.timeout_ms)
            await wait_idle(page, self.timeout_ms)
        box = page.get_by_label("Search top-example tokens")
        await box.fill(self.rng.choice(SEARCH_TERMS), timeout=self.timeout_ms)
        await box.press("Enter")
        await wait_idle(page, self.timeout_ms)
        await page.get_by_text("features match").or_(page.get_by_text("No feature matches")).first.wait_for(timeout=self.timeout_ms)

    async def _probe(self, page) -> None:
        if "/live_probe" not in page.url:
            await page.goto(f"{self.url}/live_probe?run={self.run_id}", wait_until="domcontentloaded", timeout=self.timeout_ms)
            await wait_idle(page, self.timeout_ms)
        prompt = f"{self.rng.choice(PROMPTS)} {self.rng.randrange(10**6)}"  # fresh: never a cache hit
        await page.locator('[data-testid="stTextArea"] textarea').fill(prompt, timeout=self.timeout_ms)
        await page.get_by_role("button", name="Run probe").click(timeout=self.timeout_ms)
        await wait_idle(page, self.timeout_ms)
        await page.locator('[data-probe="feature-acts"] .sx-tok').first.wait_for(timeout=self.timeout_ms)


def summarize(records: list[dict]) -> dict:
    return load_summary(records, ACTIONS)


async def drive(url: str, args, run_id: str, d_sae: dict[str, int]) -> tuple[list[dict], float]:
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM_PATH, args=CHROMIUM_ARGS, headless=True)
        try:
            # warm-up (not measured): the first request of a fresh server, and the models' first load
            ctx = await browser.new_context()
            page = await ctx.new_page()
            await page.goto(f"{url}/?run={run_id}", wait_until="domcontentloaded")
            await wait_idle(page, 300_000)
            await page.goto(f"{url}/live_probe?run={run_id}", wait_until="domcontentloaded")
            await wait_idle(page, 300_000)
            await page.locator('[data-probe="feature-acts"]').first.wait_for(timeout=300_000)
            await ctx.close()
            t_start = time.monotonic()
            deadline = t_start + args.duration
            sessions = [Session(i, browser, url, run_id, d_sae, deadline, args.action_timeout * 1000, random.Random(args.seed * 1000 + i)) for i in range(args.sessions)]
            await asyncio.gather(*(s.run() for s in sessions))
            wall = time.monotonic() - t_start
        finally:
            await browser.close()
    return [r for s in sessions for r in s.records], wall


def synthetic_runs(pair: Path) -> Path:
    """A temp runs dir holding run "synth": synthetic tables, a config that names `pair`'s models and SAEs."""
    import tempfile


    from explorer.synthetic import make_run, point_at_pair

    pair = pair.resolve()
    tl = json.loads((pair / "base" / "config.json").read_text())["tl_config"]
    d_sae = int(json.loads((pair / "saes" / "base_sae" / "cfg.json").read_text())["d_sae"])
    root = Path(tempfile.mkdtemp(prefix="load-runs-"))
    point_at_pair(make_run(root / "synth", n_features=d_sae, n_vocab=int(tl["d_vocab"]), context=min(64, int(tl["n_ctx"])), n_sequences=64), pair)
    return root


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=25)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of load (after a warm-up)")
    ap.add_argument("--smoke", action="store_true", help="3 sessions, 10 s")
    ap.add_argument("--runs-dir", default=None, help="runs dir for the server (default: data/runs)")
    ap.add_argument("--run", default="demo", help="run id to drive")
    ap.add_argument("--synthetic", metavar="PAIR_DIR", default=None,
                    help="instead of --runs-dir/--run: a synthetic run (explorer.synthetic, the SAE's width, hostile "
                    "vocabulary) in a temp dir whose config names the demo pair in PAIR_DIR (e.g. data/demo) for live probes")
    ap.add_argument("--action-timeout", type=float, default=120.0, help="seconds before an action counts as a timeout")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "load.json"))
    args = ap.parse_args(argv)
    if args.smoke:
        args.sessions, args.duration = 3, 10.0

    from explorer import rundir

    runs = Path(args.runs_dir) if args.runs_dir else rundir.DEFAULT_RUNS_DIR
    if args.synthetic:
        runs, args.run = synthetic_runs(Path(args.synthetic)), "synth"
    manifest = rundir.open_run(rundir.run_path(args.run, runs))
    d_sae = {s: int(manifest["d_sae"][s]) for s in manifest["saes"]}

    with streamlit_server(runs_dir=runs, timeout=180) as url:
        records, wall = asyncio.run(drive(url, args, args.run, d_sae))
    summary = summarize(records)
    errors = [r for r in records if r["error"]]
    result = {
        "sessions": args.sessions,
        "duration_s": args.duration,
        "wall_s": wall,
        "run": args.run,
        "client": "Playwright: one Debian Chromium, one browser context per session",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "loadavg_at_end": os.getloadavg()},
        "summary": summary,
        "error_samples": [{k: r[k] for k in ("session", "action", "error")} for r in errors[:20]],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.sessions} sessions, {args.duration:.0f} s of load ({wall:.0f} s wall): {summary['all']['n']} actions, {summary['all']['errors']} errors")
    print_load_summary(summary, ACTIONS, result["error_samples"], out)
    return 0 if not errors and summary["all"]["n"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
