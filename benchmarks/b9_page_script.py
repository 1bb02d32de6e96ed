"""B9: every page's server-side script run, warm, on a run (default the shipped demo run).

    python benchmarks/b9_page_script.py                      # data/runs/demo, 15 samples a view
    python benchmarks/b9_page_script.py --n 5 --smoke         # a 120-feature synthetic run (tests)

Starts `streamlit run app.py` (tests/browser_utils.streamlit_server) and drives it with the
websocket client of tests/st_protocol.py: the time of one script run is from the BackMsg
rerun_script to the ForwardMsg script_finished, as the browser would see it without rendering
(server script, messages, websocket, the client's protobuf parse), and the server process's CPU
time for that run (/proc/<pid>/stat; one request at a time, so it is that run's cost, which
other processes on the machine do not inflate). Every page is opened once
first (imports, the run's store, the features table, the live probe's models: "cold", not
counted), then --n times per view:

    overview / dead-born / similarity   the page again (same URL)
    features                            the page again, and a new search term (a widget change)
    feature (same)                      the same feature again
    feature (new)                       a feature this server has not shown before (its examples,
                                        histogram and neighbours are read and drawn)
    live_probe (same)                   the page again (the probe of its prompt cached)
    differences / crosscoder            the page again (crosscoder: runs with one)

Goal (issue 13): each page at most 300 ms warm. Results: a table on stdout and
benchmarks/results/b9.json (every sample, the load before and after).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks._common import machine, smoke_run, write_result  # noqa: E402
from benchmarks._common import SEARCH_TERMS  # noqa: E402
from benchmarks.load_protocol import cpu_seconds, loadavg, server_pid  # noqa: E402
from tests.st_protocol import Session, text  # noqa: E402

GOAL_MS = 300.0


class _Cpu:
    """The server process's CPU seconds (user + system) since the last call: with one request at
    a time, that request's CPU cost, which other processes on the machine do not inflate."""

    def __init__(self, url: str):
        self.pid = server_pid(int(url.rsplit(":", 1)[1]))
        self.last = cpu_seconds(self.pid)

    def delta_ms(self) -> float | None:
        now = cpu_seconds(self.pid)
        d = None if now is None or self.last is None else 1000 * (now - self.last)
        self.last = now
        return d


async def measure(url: str, run_id: str, d_sae: int, n: int, seed: int, crosscoder: bool = False) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    rng = np.random.default_rng(seed)
    out: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    meter = _Cpu(url)

    def add(view: str, r) -> None:
        if r.errors:
            raise SystemExit(f"{view}: {r.errors}")
        out.setdefault(view, []).append(1000 * r.seconds)
        d = meter.delta_ms()
        if d is not None:
            cpu.setdefault(view, []).append(d)

    fresh = iter(rng.permutation(d_sae).tolist())
    async with Session(url, timeout=600) as s:
        extra = ("differences", *(("crosscoder",) if crosscoder else ()))
        for page in ("", "features", "feature", "dead-born", "similarity", "live_probe", *extra):  # cold, not counted
            r = await s.open(page, f"run={run_id}&sae=base_sae&feature={next(fresh)}")
            if r.errors:
                raise SystemExit(f"cold /{page}: {r.errors}")
        await asyncio.sleep(2.0)  # background warm-up threads (the features table's sort orders) finish
        meter.delta_ms()
        for _ in range(n):
            add("overview", await s.open("", f"run={run_id}"))
            add("dead-born", await s.open("dead-born", f"run={run_id}"))
            add("similarity", await s.open("similarity", f"run={run_id}&sae=base_sae"))
            r = await s.open("features", f"run={run_id}&sae=base_sae")
            add("features", r)
            add("features (search)", await s.set_widgets({r.widget(key="f_search").id: text(str(rng.choice(SEARCH_TERMS)))}))
            add("feature (same)", await s.open("feature", f"run={run_id}&sae=base_sae&feature=3"))
            add("feature (new)", await s.open("feature", f"run={run_id}&sae=base_sae&feature={next(fresh)}"))
            add("live_probe (same)", await s.open("live_probe", f"run={run_id}"))
            for page in extra:
                add(page, await s.open(page, f"run={run_id}"))
    return out, cpu


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, default=REPO / "data" / "runs" / "demo", help="a run directory")
    ap.add_argument("--n", type=int, default=15, help="samples per view")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="a 120-feature synthetic run in a temp dir (its live probe cannot load models: skipped)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "b9.json")
    a = ap.parse_args(argv)
    cmdline = ("python benchmarks/b9_page_script.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    from explorer import rundir
    from tests.browser_utils import streamlit_server

    tmp = None
    run = a.run
    if a.smoke:
        tmp, run = smoke_run("b9-smoke-", 120)
    manifest = rundir.open_run(run)
    load_before = loadavg()
    with streamlit_server(runs_dir=run.resolve().parent, timeout=180) as url:
        samples, cpu = asyncio.run(measure_smoke(url, run.name, int(manifest["d_sae"]["base_sae"]), a.n, a.seed) if a.smoke
                                   else measure(url, run.name, int(manifest["d_sae"]["base_sae"]), a.n, a.seed, "crosscoder.parquet" in manifest.get("files", {})))
    load_after = loadavg()
    summary = {
        v: {"median_ms": statistics.median(x), "p95_ms": float(np.percentile(x, 95)), "max_ms": max(x), "n": len(x), "meets_goal": float(np.percentile(x, 95)) <= GOAL_MS,
            "server_cpu_median_ms": statistics.median(cpu[v]) if cpu.get(v) else None, "server_cpu_p95_ms": float(np.percentile(cpu[v], 95)) if cpu.get(v) else None}
        for v, x in samples.items()
    }
    fmt = lambda v: "-" if v is None else f"{v:.0f}ms"  # noqa: E731
    print(f"{'view':<20} {'median':>8} {'p95':>8} {'max':>8} {'cpu med':>8} {'cpu p95':>8}  (goal: p95 <= {GOAL_MS:.0f} ms)")
    for v, s in summary.items():
        print(f"{v:<20} {fmt(s['median_ms']):>8} {fmt(s['p95_ms']):>8} {fmt(s['max_ms']):>8} {fmt(s['server_cpu_median_ms']):>8} {fmt(s['server_cpu_p95_ms']):>8}  {'ok' if s['meets_goal'] else 'OVER'}")
    print(f"loadavg before: {load_before}   after: {load_after}")
    result = {
        "benchmark": "B9: every page's server-side script run, warm (websocket protocol client)",
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": cmdline, "run": str(run), "goal_ms": GOAL_MS,
        "machine": {**machine(), "loadavg_before": load_before, "loadavg_after": load_after},
        "summary": summary, "samples_ms": samples, "server_cpu_ms": cpu,
    }
    if not a.smoke or a.out != ap.get_default("out"):
        write_result(a.out, result)
        print("->", a.out)
    if tmp is not None:
        tmp.cleanup()
    return 0


async def measure_smoke(url: str, run_id: str, d_sae: int, n: int, seed: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """measure() without the live probe (a synthetic run names no loadable models)."""
    out: dict[str, list[float]] = {}
    async with Session(url, timeout=300) as s:
        for page in ("", "features", "feature", "dead-born", "similarity"):
            await s.open(page, f"run={run_id}&sae=base_sae&feature=1")
        for i in range(n):
            for view, page, q in (("overview", "", ""), ("features", "features", ""), ("feature (new)", "feature", f"&sae=base_sae&feature={(i + 2) % d_sae}"),
                                  ("dead-born", "dead-born", ""), ("similarity", "similarity", "")):
                r = await s.open(page, f"run={run_id}{q}")
                if r.errors:
                    raise SystemExit(f"{view}: {r.errors}")
                out.setdefault(view, []).append(1000 * r.seconds)
    return out, {}


if __name__ == "__main__":
    raise SystemExit(main())
