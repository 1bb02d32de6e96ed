"""B3: peak memory (RSS) of the precompute at ~50k and ~500k tokens. Goal: flat.

    python benchmarks/b3_memory.py                          # 51,200 and 499,200 tokens, both SAEs, 1 rep
    python benchmarks/b3_memory.py --tokens 51200 499200 --reps 2
    python benchmarks/b3_memory.py --smoke                  # a tiny demo pair, 2 tiny token counts

Each run is `python -m precompute run --config <cfg> --runs-dir benchmarks/_work/b3/runs
--overwrite --no-progress` in its own child process; the peak RSS is the child's own
`ru_maxrss` from `os.wait4` (the kernel's high-water mark of that process and the children it
waited for), not a sampled value. The config is configs/demo.toml (both SAEs, the shipped
example settings) with the demo paths made absolute and only `run_id`, `n_tokens` (and, for the
smoke, `context_size`) changed. Within a repetition the token counts run back to back, in
alternating order from one repetition to the next; the ratio largest/smallest is taken per
repetition and its median reported.

Results: a table on stdout and `benchmarks/results/b3.json` (or --out).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / "benchmarks" / "_work" / "b3"
DEFAULT_OUT = REPO / "benchmarks" / "results" / "b3.json"
if str(REPO) not in sys.path:  # run as a script: make the repository importable
    sys.path.insert(0, str(REPO))

from benchmarks._common import corpus_info, machine, run_child, write_config, write_result  # noqa: E402


def run_once(cfg: Path, runs_dir: Path, log: Path, threads: int | None) -> dict:
    """One precompute in a child process: wall seconds, peak RSS (bytes), exit code."""
    cmd = [sys.executable, "-m", "precompute", "run", "--config", str(cfg), "--runs-dir", str(runs_dir), "--overwrite", "--no-progress"]
    if threads:
        cmd += ["--threads", str(threads)]
    return run_child(cmd, log)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--demo", type=Path, default=REPO / "data" / "demo", help="the demo pair (default data/demo)")
    p.add_argument("--tokens", type=int, nargs="+", default=[51200, 499200])
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="passed to precompute --threads (default: its own)")
    p.add_argument("--work", type=Path, default=WORK)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--smoke", action="store_true", help="tiny: 2 and 4 sequences of the given demo's corpus, 1 rep")
    a = p.parse_args(argv)

    rows, context = corpus_info(a.demo)
    tokens = sorted(set([2 * context, 4 * context] if a.smoke else a.tokens))
    reps = 1 if a.smoke else a.reps
    for n in tokens:
        if n > rows * context:
            raise SystemExit(f"{a.demo / 'eval_corpus.parquet'} has {rows * context} tokens; {n} were asked for.")
    cmdline = "python benchmarks/b3_memory.py " + " ".join(argv if argv is not None else sys.argv[1:])
    runs: list[dict] = []
    ratios: list[float] = []
    for r in range(reps):
        order = tokens if r % 2 == 0 else tokens[::-1]
        got = {}
        for n in order:
            run_id = f"b3-{n}"
            cfg = a.work / "configs" / f"{run_id}.toml"
            write_config(cfg, run_id, a.demo.resolve(), n, context)
            res = run_once(cfg, a.work / "runs", a.work / "logs" / f"{run_id}-rep{r}.log", a.threads)
            res.update(rep=r, n_tokens=n)
            runs.append(res)
            got[n] = res["peak_rss_bytes"]
            print(f"rep {r}: {n:>8} tokens  wall {res['wall_seconds']:8.1f} s  peak RSS {res['peak_rss_bytes'] / 2**20:8.1f} MiB  load {res['loadavg_after'][0]:.2f}", flush=True)
        ratios.append(got[tokens[-1]] / got[tokens[0]])
    summary = {}
    for n in tokens:
        mine = [x for x in runs if x["n_tokens"] == n]
        summary[str(n)] = {"median_peak_rss_bytes": statistics.median(x["peak_rss_bytes"] for x in mine), "median_wall_seconds": statistics.median(x["wall_seconds"] for x in mine), "runs": len(mine)}
    ratio = statistics.median(ratios)
    result = {
        "benchmark": "B3: precompute peak RSS vs tokens",
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": cmdline.strip(),
        "machine": machine(),
        "settings": {"demo": str(a.demo), "tokens": tokens, "reps": reps, "context_size": context, "smoke": a.smoke, "threads": a.threads},
        "runs": runs,
        "summary": summary,
        "ratio_largest_over_smallest": ratio,
        "ratios_per_rep": ratios,
        "goal": "flat (ratio close to 1)",
    }
    write_result(a.out, result)
    print(f"peak RSS ratio {tokens[-1]}/{tokens[0]} tokens: {ratio:.3f} (median of {reps}); -> {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
