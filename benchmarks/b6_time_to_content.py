"""B6: app time-to-content -- navigation to a rendered feature page (deep link), headless Chromium.

    python benchmarks/b6_time_to_content.py                                    # demo run + largest B4 synthetic run
    python benchmarks/b6_time_to_content.py --run data/runs/demo --run benchmarks/_work/b4/synth-1048576 --cold 3 --warm 5
    python benchmarks/b6_time_to_content.py --smoke                            # a 200-feature synthetic run, 1 cold + 1 warm

For each run: `streamlit run app.py` (tests/browser_utils.streamlit_server, runs dir = the run's
parent) and Debian's Chromium through Playwright (the test suite's launch arguments). The clock
starts just before `page.goto(<app>/feature?run=<id>&sae=base_sae&feature=<fid>)` and stops when
the highlighted example windows of BOTH models are visible (`.sx-ex[data-model=base] .sx-tok`
and the same for finetuned). Each navigation uses a fresh browser context (no browser cache) and
a feature alive on both models that no earlier navigation of that server opened (so no
st.cache_data hit):
  * cold: the first navigation after a fresh server start (imports, connection, examples index,
    vocabulary); --cold server starts per run;
  * warm: --warm further navigations to the same server.
The runs alternate cold start by cold start, so the machine's load hits them alike.

Results: a table on stdout and `benchmarks/results/b6.json` (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks._common import machine, smoke_run, write_result  # noqa: E402
from tests.browser_utils import CHROMIUM_ARGS, CHROMIUM_PATH, streamlit_server  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "results" / "b6.json"
B4_WORK = REPO / "benchmarks" / "_work" / "b4"


def default_runs() -> list[Path]:
    out = []
    demo = REPO / "data" / "runs" / "demo"
    if (demo / "manifest.json").exists():
        out.append(demo)
    synth = sorted((p for p in B4_WORK.glob("synth-*") if (p / "manifest.json").exists()), key=lambda p: int(p.name.split("-")[1]))
    if synth:
        out.append(synth[-1])
    return out


def alive_features(run_dir: Path, k: int, seed: int) -> list[int]:
    """k distinct base_sae features alive on both models that have top examples on both."""
    import pyarrow.parquet as pq
    import pyarrow.compute as pc

    t = pq.read_table(run_dir / "features.parquet", columns=["sae", "feature_id", "cross_class"])
    t = t.filter(pc.and_(pc.equal(t.column("sae"), "base_sae"), pc.equal(t.column("cross_class"), "both_alive")))
    ids = t.column("feature_id").to_numpy()
    if len(ids) == 0:
        raise SystemExit(f"{run_dir}: no base_sae feature is alive on both models")
    rng = np.random.default_rng(seed)
    return [int(x) for x in rng.choice(ids, size=min(k, len(ids)), replace=False)]


def time_to_content(browser, url: str, timeout_ms: int) -> float:
    context = browser.new_context(viewport={"width": 1500, "height": 1100})
    try:
        page = context.new_page()
        t0 = time.perf_counter()
        page.goto(url, wait_until="commit", timeout=timeout_ms)
        for m in ("base", "finetuned"):
            page.wait_for_selector(f'.sx-ex[data-model="{m}"] .sx-tok', state="visible", timeout=timeout_ms)
        return (time.perf_counter() - t0) * 1000
    finally:
        context.close()


def server_script_ms(run_dir: Path, ids: list[int]) -> list[float]:
    """The server's share: Streamlit's script run of the feature page for each id (AppTest, warm
    process, uncached features), without a browser or websocket."""
    from streamlit.runtime.pages_manager import PagesManager
    from streamlit.testing.v1 import AppTest

    old_env, old_init = os.environ.get("SAE_EXPLORER_RUNS_DIR"), PagesManager.__init__

    def init(self, *a, **kw):  # as a served app after its first request (see tests/conftest.py)
        old_init(self, *a, **kw)
        PagesManager.uses_pages_directory = False

    os.environ["SAE_EXPLORER_RUNS_DIR"] = str(run_dir.resolve().parent)
    PagesManager.__init__ = init
    try:
        at = AppTest.from_file(str(REPO / "app.py"), default_timeout=180)
        at.query_params["run"] = run_dir.name
        at.run()
        at.switch_page("pages/3_feature.py")
        out = []
        for fid in ids:
            at.query_params.update(sae="base_sae", feature=str(fid))
            t0 = time.perf_counter()
            at.run()
            out.append((time.perf_counter() - t0) * 1000)
            if at.exception:
                raise SystemExit(f"{run_dir.name}: feature {fid}: {at.exception[0].message}")
        return out
    finally:
        PagesManager.__init__ = old_init
        if old_env is None:
            os.environ.pop("SAE_EXPLORER_RUNS_DIR", None)
        else:
            os.environ["SAE_EXPLORER_RUNS_DIR"] = old_env


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, action="append", default=None, help="a run directory (repeatable); default: data/runs/demo and the largest B4 synthetic run")
    p.add_argument("--cold", type=int, default=3, help="server starts per run")
    p.add_argument("--warm", type=int, default=4, help="warm navigations per server start")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for one page")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--smoke", action="store_true", help="a 200-feature synthetic run in a temp dir, 1 cold + 1 warm")
    a = p.parse_args(argv)
    cmdline = ("python benchmarks/b6_time_to_content.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()

    tmp = None
    runs = a.run
    if a.smoke:
        tmp, run = smoke_run("b6-smoke-", 200)
        runs = [run]
        a.cold, a.warm = 1, 1
    runs = runs or default_runs()
    if not runs:
        raise SystemExit("no run to measure: pass --run DIR (e.g. data/runs/demo)")
    from playwright.sync_api import sync_playwright

    feats = {str(r): alive_features(r, a.cold * (1 + a.warm), a.seed) for r in runs}
    res: dict[str, dict] = {str(r): {"cold_ms": [], "warm_ms": [], "loadavg": [], "features": []} for r in runs}
    timeout_ms = int(a.timeout * 1000)
    load_start = list(os.getloadavg())
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM_PATH, args=CHROMIUM_ARGS, headless=True)
        try:
            for c in range(a.cold):
                for r in runs:
                    key = str(r)
                    ids = feats[key][c * (1 + a.warm):(c + 1) * (1 + a.warm)]
                    with streamlit_server(runs_dir=r.resolve().parent, timeout=180) as base:
                        for j, fid in enumerate(ids):
                            url = f"{base}/feature?run={r.name}&sae=base_sae&feature={fid}"
                            res[key]["loadavg"].append(os.getloadavg()[0])
                            ms = time_to_content(browser, url, timeout_ms)
                            res[key]["cold_ms" if j == 0 else "warm_ms"].append(ms)
                            res[key]["features"].append(fid)
                            print(f"{r.name:<20} {'cold' if j == 0 else 'warm'} feature {fid:>8}: {ms:8.0f} ms  (load {os.getloadavg()[0]:.1f})", flush=True)
        finally:
            browser.close()
    server = {}
    for r in runs:  # the same features again, server-side only, in this process (its caches are empty)
        ms = server_script_ms(r, feats[str(r)])
        ms = ms[1:] if len(ms) > 1 else ms  # the first run warms the process up
        server[str(r)] = ms
        print(f"{r.name:<20} server script run of the page: median {statistics.median(ms):.0f} ms over {len(ms)} features", flush=True)
    summary = {}
    for r in runs:
        x = res[str(r)]
        m = json.loads((r / "manifest.json").read_text())
        summary[r.name] = {
            "run_dir": str(r), "d_sae": m["d_sae"], "synthetic": bool(m.get("synthetic")),
            "cold_median_ms": statistics.median(x["cold_ms"]), "warm_median_ms": statistics.median(x["warm_ms"]) if x["warm_ms"] else None,
            "cold_ms": x["cold_ms"], "warm_ms": x["warm_ms"], "features": x["features"], "loadavg_1min": x["loadavg"],
            "server_script_ms": server[str(r)], "server_script_median_ms": statistics.median(server[str(r)]),
        }
    result = {
        "benchmark": "B6: app time-to-content (feature page deep link, headless Chromium)",
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": cmdline,
        "machine": {**machine(), "loadavg_at_start": load_start, "loadavg_at_end": list(os.getloadavg())},
        "settings": {"cold": a.cold, "warm": a.warm, "seed": a.seed, "smoke": a.smoke, "chromium": CHROMIUM_PATH},
        "runs": summary,
    }
    print(f"{'run':<20} {'features':>9} {'cold median':>12} {'warm median':>12}")
    for name, s in summary.items():
        wm = "-" if s["warm_median_ms"] is None else f"{s['warm_median_ms']:.0f} ms"
        print(f"{name:<20} {s['d_sae']['base_sae']:>9} {s['cold_median_ms']:>9.0f} ms {wm:>12}")
    if not a.smoke or a.out != DEFAULT_OUT:
        write_result(a.out, result)
        print(f"-> {a.out}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
