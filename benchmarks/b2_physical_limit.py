"""B2: our full precompute against the "physical limit" (bare forwards + SAE encodes). Goal: <= 2.0x.

    python benchmarks/b2_physical_limit.py                   # 51,200 tokens (400 sequences), 3 reps, 1 thread
    python benchmarks/b2_physical_limit.py --tokens 51200 --reps 5 --threads 1
    python benchmarks/b2_physical_limit.py --smoke           # tiny demo pair (built if --demo is not given)

Every measurement is its own child process with the same torch thread count, run interleaved
(limit, ours, limit, ours, ... in alternating order per repetition); medians are reported.

The limit child (`--_limit CFG`) gets the CLI's glibc setting (`_keep_freed_memory`), loads the pair and the token sample exactly as the precompute
does (`precompute.run.prepare`), then times, over the same batches (same batch size), three loops:

    stop    per model: a forward that stops after the hook's layer (`stop_at_layer`), grabbing
            the hook activation; per SAE: `sae.encode` of it.
    logits  per model: a full forward with logits (`return_type="logits"`, a CE loss needs
            them), grabbing the hook activation; per SAE: `sae.encode`.
    ce      what the precompute necessarily computes on the torch side, without accumulators:
            per model the clean loss forward, per SAE encode + decode + the spliced loss from
            the hook on, the zero-ablated loss from the hook on (ModelRunner and SaeCodec, the
            precompute's own pass code). `ours / ce` is the overhead of everything that is not a forward.

For each loop the child reports wall seconds and its process CPU seconds (all threads).
Ours is `python -m precompute run --config CFG --runs-dir benchmarks/_work/b2/runs --overwrite
--no-progress --threads T`; its stream and finalize seconds (and stream CPU seconds) come from
the manifest's timing, its total wall from the parent, its total CPU from `os.wait4`'s rusage.

Results: a table on stdout and `benchmarks/results/b2.json` (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / "benchmarks" / "_work" / "b2"
DEFAULT_OUT = REPO / "benchmarks" / "results" / "b2.json"
if str(REPO) not in sys.path:  # run as a script: make the repository importable
    sys.path.insert(0, str(REPO))

from benchmarks._common import CHILD_ENV, corpus_info, machine, run_child, write_config, write_result  # noqa: E402
VARIANTS = ("stop", "logits", "ce")


# ----------------------------------------------------------------------------------------------
# The limit child


def limit_child(cfg_path: Path, threads: int, out: Path) -> None:
    sys.path.insert(0, str(REPO))
    from precompute.__main__ import _keep_freed_memory

    _keep_freed_memory()  # the CLI's glibc setting: without it every freed 64 MiB logits buffer page-faults back in
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    from precompute.config import RunConfig
    from precompute.forward import runners as model_runners
    from precompute.prepare import prepare
    from precompute.sae_codec import SaeCodec

    prep = prepare(RunConfig.from_toml(cfg_path))
    runners = model_runners(prep.pair, prep.cfg.hook)
    saes = prep.pair.saes
    models = {"base": prep.pair.base, "finetuned": prep.pair.finetuned}
    hook = prep.cfg.hook
    batches = [torch.from_numpy(prep.sample.tokens[prep.batch_seq_ids(b)].astype(np.int64)) for b in range(prep.n_batches)]
    counted = [torch.from_numpy(~np.isin(t.numpy(), prep.special_ids)) for t in batches]

    def grab_forward(model, tokens, **kw):
        store = {}

        def grab(act, hook):  # noqa: ARG001
            store["x"] = act
            return act

        model.run_with_hooks(tokens, fwd_hooks=[(hook_name, grab)], **kw)
        return store["x"]

    hook_name = hook
    codecs = {s: SaeCodec(saes[s]) for s in saes}
    stop_at = runners["base"].stop_at

    def loop(variant: str) -> None:
        sink = 0.0
        for bi, tokens in enumerate(batches):
            for m, model in models.items():
                if variant == "stop":
                    x = grab_forward(model, tokens, return_type=None, stop_at_layer=stop_at)
                    for s in saes:
                        sink += float(saes[s].encode(x)[0, 0, 0])
                elif variant == "logits":
                    x = grab_forward(model, tokens, return_type="logits")
                    for s in saes:
                        sink += float(saes[s].encode(x)[0, 0, 0])
                else:
                    r = runners[m]
                    clean, x = r.clean(tokens)
                    zero = r.zero_loss(tokens, x) if hasattr(r, "zero_loss") else r.loss_with(tokens, torch.zeros_like(x))
                    sink += float(clean[0, 0]) + float(zero[0, 0])
                    for s in saes:
                        if codecs is not None:  # the precompute's own sparse encode + decode
                            x_hat = codecs[s].encode_decode(x.reshape(-1, x.shape[-1]))[3].reshape(x.shape)
                        else:
                            acts = saes[s].encode(x)
                            x_hat = saes[s].decode(acts).to(x.dtype)
                        sink += float(r.loss_with(tokens, torch.where(counted[bi][..., None], x_hat, x))[0, 0])
        if sink != sink:  # keep the results alive
            print("nan", file=sys.stderr)

    res = {"n_tokens": int(sum(t.numel() for t in batches)), "n_batches": len(batches), "threads": torch.get_num_threads()}
    with torch.inference_mode():
        for variant in VARIANTS:
            w0, c0 = time.perf_counter(), time.process_time()
            loop(variant)
            res[variant] = {"wall_seconds": time.perf_counter() - w0, "cpu_seconds": time.process_time() - c0}
    out.write_text(json.dumps(res))


# ----------------------------------------------------------------------------------------------
# The parent


_child = run_child


def run_limit(cfg: Path, threads: int, work: Path, tag: str) -> dict:
    out = work / f"limit-{tag}.json"
    res = _child([sys.executable, str(Path(__file__).resolve()), "--_limit", str(cfg), "--threads", str(threads), "--out", str(out)], work / "logs" / f"limit-{tag}.log")
    res.update(json.loads(out.read_text()))
    return res


def run_ours(cfg: Path, threads: int, work: Path, tag: str) -> dict:
    runs = work / "runs"
    cmd = [sys.executable, "-m", "precompute", "run", "--config", str(cfg), "--runs-dir", str(runs), "--overwrite", "--no-progress", "--threads", str(threads)]
    res = _child(cmd, work / "logs" / f"ours-{tag}.log")
    run_id = re.search(r'(?m)^run_id\s*=\s*"([^"]*)"', cfg.read_text()).group(1)
    timing = json.loads((runs / run_id / "manifest.json").read_text())["timing"]
    res.update(command=" ".join(cmd), timing=timing)
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--demo", type=Path, default=None, help="the demo pair (default data/demo; --smoke builds a tiny one)")
    p.add_argument("--tokens", type=int, default=51200)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads of both sides (default 1)")
    p.add_argument("--work", type=Path, default=WORK)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--smoke", action="store_true", help="tiny demo pair, 4 sequences, 1 rep")
    p.add_argument("--_limit", type=Path, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._limit is not None:
        limit_child(a._limit, a.threads, a.out)
        return 0

    cmdline = "python benchmarks/b2_physical_limit.py " + " ".join(argv if argv is not None else sys.argv[1:])
    tmp = None
    demo = a.demo
    if demo is None:
        if a.smoke:
            tmp = tempfile.TemporaryDirectory(prefix="b2-smoke-")
            demo = Path(tmp.name) / "demo"
            subprocess.run([sys.executable, "-m", "precompute.demo", "--tiny", "--out", str(demo)], cwd=REPO, env={**os.environ, **CHILD_ENV},
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        else:
            demo = REPO / "data" / "demo"
    demo = demo.resolve()
    rows, context = corpus_info(demo)
    n_tokens = 4 * context if a.smoke else a.tokens
    reps = 1 if a.smoke else a.reps
    if n_tokens > rows * context:
        raise SystemExit(f"{demo / 'eval_corpus.parquet'} has {rows * context} tokens; {n_tokens} were asked for.")
    out_path = a.out or (a.work / "b2-smoke.json" if a.smoke else DEFAULT_OUT)
    cfg = a.work / "configs" / "b2.toml"
    write_config(cfg, "b2", demo, n_tokens, context)

    limits, ours = [], []
    for r in range(reps):
        order = ("limit", "ours") if r % 2 == 0 else ("ours", "limit")
        for side in order:
            if side == "limit":
                res = run_limit(cfg, a.threads, a.work, f"rep{r}")
                limits.append(res)
                print(f"rep {r} limit: stop {res['stop']['wall_seconds']:.1f} s  logits {res['logits']['wall_seconds']:.1f} s  ce {res['ce']['wall_seconds']:.1f} s  "
                      f"(cpu {res['stop']['cpu_seconds']:.1f}/{res['logits']['cpu_seconds']:.1f}/{res['ce']['cpu_seconds']:.1f})  load {res['loadavg_after'][0]:.2f}", flush=True)
            else:
                res = run_ours(cfg, a.threads, a.work, f"rep{r}")
                ours.append(res)
                t = res["timing"]
                print(f"rep {r} ours: stream {t['stream_seconds']:.1f} s (cpu {t.get('stream_cpu_seconds', float('nan')):.1f})  finalize {t['finalize_seconds']:.1f} s  "
                      f"total {res['wall_seconds']:.1f} s (cpu {res['cpu_seconds']:.1f})  load {res['loadavg_after'][0]:.2f}", flush=True)

    med = statistics.median
    summary = {
        "limit": {v: {"median_wall_seconds": med(x[v]["wall_seconds"] for x in limits), "median_cpu_seconds": med(x[v]["cpu_seconds"] for x in limits)} for v in VARIANTS},
        "ours": {
            "median_stream_wall_seconds": med(x["timing"]["stream_seconds"] for x in ours),
            "median_stream_cpu_seconds": med(x["timing"].get("stream_cpu_seconds", float("nan")) for x in ours),
            "median_finalize_wall_seconds": med(x["timing"]["finalize_seconds"] for x in ours),
            "median_total_wall_seconds": med(x["wall_seconds"] for x in ours),
            "median_total_cpu_seconds": med(x["cpu_seconds"] for x in ours),
        },
    }
    o = summary["ours"]
    ratios = {}
    for v in VARIANTS:
        lw, lc = summary["limit"][v]["median_wall_seconds"], summary["limit"][v]["median_cpu_seconds"]
        ratios[v] = {
            "stream_wall": o["median_stream_wall_seconds"] / lw if lw else None,
            "stream_cpu": o["median_stream_cpu_seconds"] / lc if lc else None,
            "stream_plus_finalize_wall": (o["median_stream_wall_seconds"] + o["median_finalize_wall_seconds"]) / lw if lw else None,
        }
    summary["ratios"] = ratios
    result = {
        "benchmark": "B2: full precompute vs bare forwards + SAE encodes over the same tokens",
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": cmdline.strip(),
        "machine": machine(),
        "git_rev": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip(),
        "smoke": a.smoke,
        "n_tokens": n_tokens,
        "context_size": context,
        "threads": a.threads,
        "reps": reps,
        "goal": "ours / limit <= 2.0",
        "summary": summary,
        "limit_runs": limits,
        "our_runs": ours,
    }
    write_result(out_path, result, indent=2)

    print(f"\nB2 at {n_tokens:,} tokens, {a.threads} thread(s), {reps} rep(s), medians:")
    print(f"{'':34}{'wall s':>10}{'cpu s':>10}{'ours/this wall':>16}{'cpu':>8}")
    for v, label in (("stop", "limit: stop_at_layer + encodes"), ("logits", "limit: full fwd w/ logits + encodes"), ("ce", "floor: all CE passes (no accum.)")):
        s = summary["limit"][v]
        print(f"{label:34}{s['median_wall_seconds']:10.1f}{s['median_cpu_seconds']:10.1f}{ratios[v]['stream_wall'] or float('nan'):16.2f}{ratios[v]['stream_cpu'] or float('nan'):8.2f}")
    print(f"{'ours: stream':34}{o['median_stream_wall_seconds']:10.1f}{o['median_stream_cpu_seconds']:10.1f}")
    print(f"{'ours: finalize':34}{o['median_finalize_wall_seconds']:10.1f}")
    print(f"{'ours: whole CLI (load+cal+all)':34}{o['median_total_wall_seconds']:10.1f}{o['median_total_cpu_seconds']:10.1f}")
    print(f"goal ours-stream / limit(logits) <= 2.0: {ratios['logits']['stream_wall']:.2f}x wall, {ratios['logits']['stream_cpu']:.2f}x cpu")
    print(f"wrote {out_path}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
