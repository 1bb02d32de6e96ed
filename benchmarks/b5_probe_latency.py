"""B5: latency of the live probe on the demo pair.

    python benchmarks/b5_probe_latency.py                     # data/demo, 64 tokens, 30 repetitions
    python benchmarks/b5_probe_latency.py --demo /tmp/demo --tokens 32 --n 50

Measures, after warm-up, the median and p95 wall time of:
  - prepare: sanitise + tokenize a typed prompt (BOS, cut to n_ctx);
  - probe:   `explorer.probe.probe` on a fixed n-token prompt: both models, every SAE's encode,
             spliced and zero-ablated CE, next-token predictions (one batched forward per model);
  - clean:   for reference, two plain `run_with_cache` forwards (one per model) on the same tokens;
  - steer:   `explorer.probe.steer`, `--new` greedy tokens, steered + unsteered, both models.
Each stage is measured with 1 torch thread and with torch's default (the CPU count): on a CPU
shared with other work, intra-op threads oversubscribe it and one thread is often much faster.
Prints a Markdown table and writes benchmarks/results/b5.json (or --out; --out '' writes none).
Timings depend on the machine and its load; nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: make the repository importable
    sys.path.insert(0, str(REPO))
DEFAULT_OUT = REPO / "benchmarks" / "results" / "b5.json"
GOAL_MS = 150.0


def _time(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000.0)
    return out


def _p95(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(0.95 * (len(xs) - 1))))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", default=str(REPO / "data" / "demo"), help="demo pair directory (base/, finetuned/, saes/, eval_corpus.parquet)")
    parser.add_argument("--tokens", type=int, default=64, help="prompt length in tokens, BOS included")
    parser.add_argument("--n", type=int, default=30, help="timed repetitions")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--new", type=int, default=20, help="new tokens per steering call")
    parser.add_argument("--threads", default=None, help="comma-separated torch thread counts to measure, e.g. 1,2 (default: 1 and torch's own default)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="JSON results file ('' for none)")
    args = parser.parse_args(argv)
    cmdline = ("python benchmarks/b5_probe_latency.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()

    import pyarrow.parquet as pq
    import torch

    from explorer.models import ModelSpec, SAESpec, load_pair
    from explorer.probe import prepare_prompt, prepare_token_ids, probe, steer

    default_threads = torch.get_num_threads()
    threads = [int(t) for t in args.threads.split(",")] if args.threads else sorted({1, default_threads})
    demo = Path(args.demo)
    saes = demo / "saes"
    t0 = time.perf_counter()
    pair = load_pair(
        ModelSpec(path=str(demo / "base")),
        ModelSpec(path=str(demo / "finetuned")),
        SAESpec(path=str(saes / "base_sae")),
        SAESpec(path=str(saes / "finetuned_sae")) if (saes / "finetuned_sae").exists() else None,
    )
    load_s = time.perf_counter() - t0
    corpus = pq.read_table(demo / "eval_corpus.parquet", columns=["token_ids", "text"]).to_pylist()
    ids = corpus[0]["token_ids"][: args.tokens]
    prompt = prepare_token_ids(pair, ids)
    text = corpus[-1]["text"][:2000]

    def run_clean():
        with torch.inference_mode():
            t = torch.tensor([prompt.token_ids])
            for m in (pair.base, pair.finetuned):
                m.run_with_cache(t, names_filter=[pair.hook])

    stages = {
        "prepare (tokenize a typed prompt)": lambda: prepare_prompt(pair, text),
        f"probe ({prompt.n_tokens} tokens, 2 models, {len(pair.saes)} SAEs, spliced + zero CE)": lambda: probe(pair, prompt),
        "clean forward x2 (reference)": run_clean,
        f"steer ({args.new} new tokens, steered + unsteered, 2 models)": lambda: steer(pair, prompt, sae="base_sae", feature_id=0, coef=4.0, n_new_tokens=args.new),
    }
    cfg = pair.base.cfg
    print("# Live probe latency (B5)\n")
    print(f"demo: {demo} (d_model {cfg.d_model}, {cfg.n_layers} layers, n_ctx {cfg.n_ctx}, d_vocab {cfg.d_vocab}; "
          f"SAEs {', '.join(f'{k} d_sae={int(v.cfg.d_sae)}' for k, v in pair.saes.items())})")
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; pair loaded in {load_s:.1f} s; "
          f"{args.warmup} warm-up + {args.n} timed runs per stage\n")
    print("| torch threads | stage | median ms | p95 ms | min ms |")
    print("|---|---|---|---|---|")
    rows = []
    load_start = list(os.getloadavg())
    for n_threads in threads:
        torch.set_num_threads(n_threads)
        for key, (name, fn) in zip(("prepare", "probe", "clean", "steer"), stages.items()):
            _time(fn, args.warmup)
            xs = _time(fn, args.n)
            rows.append({"threads": n_threads, "stage": key, "label": name, "median_ms": statistics.median(xs), "p95_ms": _p95(xs), "min_ms": min(xs), "samples_ms": xs})
            print(f"| {n_threads} | {name} | {statistics.median(xs):.1f} | {_p95(xs):.1f} | {min(xs):.1f} |", flush=True)
    torch.set_num_threads(default_threads)
    if args.out:
        from datetime import datetime, timezone

        from benchmarks._common import machine, write_result

        probe_rows = [r for r in rows if r["stage"] == "probe"]
        result = {
            "benchmark": "B5: live probe latency",
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": cmdline,
            "machine": {**machine(), "torch": torch.__version__, "loadavg_at_start": load_start, "loadavg_at_end": list(os.getloadavg())},
            "settings": {"demo": str(demo), "tokens": prompt.n_tokens, "n": args.n, "warmup": args.warmup, "new_tokens": args.new, "pair_load_seconds": load_s},
            "goal_ms": GOAL_MS,
            "goal_met_median": {str(r["threads"]): r["median_ms"] <= GOAL_MS for r in probe_rows},
            "stages": rows,
        }
        print(f"-> {write_result(Path(args.out), result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
