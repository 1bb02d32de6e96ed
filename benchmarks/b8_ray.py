"""B8: the precompute on a local Ray cluster with 1 worker vs 2 workers, against one process.

    python benchmarks/b8_ray.py                  # B7's wide pair, the 16k base SAE on both models, 32,768 tokens, 2 shards
    python benchmarks/b8_ray.py --tokens 65536 --shards 4
    python benchmarks/b8_ray.py --smoke          # the tiny wide pair, one process and 2 workers only (the test suite)

For each worker count W in (1, 2), in alternating order per repetition: `ray start --head` on
127.0.0.1 with --num-cpus W (Ray's single-machine mode, so every Ray address is loopback) in its
own process group; `python -m precompute run --config CFG --ray ADDRESS --shards N --threads 1`
timed as a child (wall, and the manifest's `ray_wall_seconds`: first task submitted to last
state back); the cluster stopped by its process group. Alongside, the same config as one process
(`--threads 1`). The runs are compared with scripts/compare_runs.py (bitwise). Speedup = wall(1
worker) / wall(2 workers). Results: stdout and benchmarks/results/b8.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / "benchmarks" / "_work" / "b8"
DEFAULT_OUT = REPO / "benchmarks" / "results" / "b8.json"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks._common import load_script, machine, run_child, stop_process_group, write_result  # noqa: E402

RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}


class LocalRay:
    """`ray start --head --block` on 127.0.0.1 with `cpus` CPUs, in its own process group."""

    def __init__(self, cpus: int):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.tmp = tempfile.mkdtemp(prefix="ray-b8-", dir="/tmp")
        self.log = open(Path(self.tmp) / "ray.log", "w")
        cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(self.port),
               "--num-cpus", str(cpus), "--num-gpus", "0", "--object-store-memory", str(512 * 2**20), "--include-dashboard", "false",
               "--disable-usage-stats", "--temp-dir", self.tmp]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **RAY_ENV})
        deadline = time.time() + 120
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"ray start failed: {(Path(self.tmp) / 'ray.log').read_text()[-1500:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline:
                    raise SystemExit("the Ray head did not come up in 120 s")
                time.sleep(0.5)
        time.sleep(3)
        self.address = f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        stop_process_group(self.proc, grace_s=3)  # what outlives 3 s of SIGTERM is killed (a throwaway local cluster)
        self.log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


_child = run_child


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pair", type=Path, default=None, help="a wide pair (default: B7's, benchmarks/_work/b7-pair; --smoke: the tiny one, built in --work)")
    p.add_argument("--d-sae", type=int, default=16384)
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--work", type=Path, default=WORK)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--smoke", action="store_true")
    a = p.parse_args(argv)
    wide = load_script("wide_pair")
    work = a.work.resolve()
    pair, d_sae, n_tokens = a.pair or REPO / "benchmarks" / "_work" / "b7-pair", a.d_sae, a.tokens
    if a.smoke:
        pair = a.pair or work / "tiny-pair"
        if not (pair / "PAIR.json").exists():
            wide.generate(pair, wide.TINY)
        d_sae, n_tokens = wide.TINY.d_sae[0], 16 * wide.TINY.context
    info = json.loads((pair / "PAIR.json").read_text())
    ctx = info["settings"]["context"]
    batch = 8 if a.smoke else 32
    # --smoke (the test suite) leaves out the 1-worker cluster: the same code path as 2 workers, and
    # a cluster start plus a run of CI time; tests/test_distributed.py runs Ray against one process
    runs: dict[str, list] = {"single": [], "ray_2_workers": []} if a.smoke else {"single": [], "ray_1_worker": [], "ray_2_workers": []}
    cfgs = {}
    for label in runs:
        cfgs[label] = work / f"{label}.toml"
        cfgs[label].parent.mkdir(parents=True, exist_ok=True)
        cfgs[label].write_text(wide.config_text(pair, f"b8-{label.replace('_', '-')}", d_sae, n_tokens, ctx, both_saes=False, batch_size=batch))
    for rep in range(a.reps):
        order = [k for k in (["single", "ray_1_worker", "ray_2_workers"] if rep % 2 == 0 else ["ray_2_workers", "ray_1_worker", "single"]) if k in runs]
        for label in order:
            runs_dir = work / "runs" / label
            shutil.rmtree(runs_dir, ignore_errors=True)
            cmd = [sys.executable, "-m", "precompute", "run", "--config", str(cfgs[label]), "--runs-dir", str(runs_dir), "--no-progress", "--threads", "1"]
            if label == "single":
                res = _child(cmd, work / "logs" / f"{label}-{rep}.log")
            else:
                cluster = LocalRay(1 if label == "ray_1_worker" else 2)
                try:
                    res = _child(cmd + ["--ray", cluster.address, "--shards", str(a.shards)], work / "logs" / f"{label}-{rep}.log",
                                 {**RAY_ENV, "PYTHONPATH": str(REPO)})
                finally:
                    cluster.stop()
            run_dir = next((runs_dir).iterdir())
            man = json.loads((run_dir / "manifest.json").read_text())
            res["timing"] = man["timing"]
            res["run_dir"] = str(run_dir)
            runs[label].append(res)
            print(f"rep {rep} {label:>14}: {res['wall_seconds']:7.1f} s wall  (ray part {man['timing'].get('ray_wall_seconds', float('nan')):.1f} s)  load {res['loadavg_after'][0]:.1f}", flush=True)
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    summary = {k: {"median_wall_seconds": med([r["wall_seconds"] for r in v]),
                   "median_ray_wall_seconds": med([r["timing"].get("ray_wall_seconds") or 0 for r in v])} for k, v in runs.items()}
    if "ray_1_worker" in summary:
        speedup = summary["ray_1_worker"]["median_wall_seconds"] / summary["ray_2_workers"]["median_wall_seconds"]
        speedup_ray = summary["ray_1_worker"]["median_ray_wall_seconds"] / max(summary["ray_2_workers"]["median_ray_wall_seconds"], 1e-9)
    else:
        speedup = speedup_ray = None
    compare = load_script(REPO / "scripts" / "compare_runs.py", "compare_runs")
    same = {k: compare.compare(Path(runs["single"][-1]["run_dir"]), Path(runs[k][-1]["run_dir"])) for k in ("ray_1_worker", "ray_2_workers") if k in runs}
    result = {
        "benchmark": "B8: the precompute on Ray, 1 vs 2 local workers, and one process",
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/b8_ray.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(), "pair": info["settings"], "d_sae": d_sae, "n_tokens": n_tokens, "shards": a.shards, "smoke": a.smoke,
        "runs": runs, "summary": summary, "speedup_2_over_1_workers_wall": speedup, "speedup_2_over_1_workers_ray_part": speedup_ray,
        "differences_vs_single_process": same,
    }
    out = a.out or (work / "b8-smoke.json" if a.smoke else DEFAULT_OUT)
    write_result(out, result, indent=2)
    if speedup is not None:
        print(f"speedup 2 vs 1 workers: {speedup:.2f}x wall, {speedup_ray:.2f}x for the Ray part (shards); single process {summary['single']['median_wall_seconds']:.1f} s")
    for k, diff in same.items():
        print(f"{k} vs single process: {'bitwise identical tables' if not [d for d in diff if not d.startswith('manifest.json: ')] else diff}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
