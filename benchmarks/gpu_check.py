"""The GPU path (benchmarks/gpu_check.sh): the precompute at gemma-2-2b size on one GPU, in minutes.

    bash benchmarks/gpu_check.sh                # 26 layers, d_model 2304, 32k vocab, SAEs of 16k, bf16, 2^20 tokens, cuda
    bash benchmarks/gpu_check.sh --tokens 262144
    bash benchmarks/gpu_check.sh --ce-every 4 1    # ours twice: CE losses on one batch in 4, then on every batch
    bash benchmarks/gpu_check.sh --cpu-smoke    # the same steps at the tiny size on the CPU (the test suite)

Steps, each timed:
  1. the wide synthetic pair (benchmarks/wide_pair.py --gemma-2-2b) drawn on the device, weights
     written in bf16, into --work (default benchmarks/_work/gpu_check);
  2. the bare forward: B7's limit child (both models' full forwards with logits + the SAEs'
     encode matmuls) over the first --limit-tokens tokens on the device: tokens/s;
  3. ours: the precompute CLI (both SAEs on both models, `--device`, `--dtype`) in a child process,
     once per --ce-every value ([evals] ce_every, default 1: the CE losses on every batch), with
     nvidia-smi sampling utilisation and memory every 200 ms in the background; the run's manifest
     says what it used (`loading.dtype`, in the result as `run_dtype`).
Printed and written to benchmarks/results/gpu_check.json (or --out), after step 2 and after each
run of ours (`"partial": true` until the last): per --ce-every value (`by_ce_every`; the first
value's also at the top level) tokens/s of the stream, GPU utilisation during the stream (mean and
median of the samples inside the stream's window), peak GPU memory (nvidia-smi's memory.used), the
stream's ratio to the bare forward, and the extrapolation to 10M tokens (fixed costs + 10M /
stream tokens/s). Goal on an H200: 10M tokens in <= 15 minutes, utilisation >= 70%.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / "benchmarks" / "_work" / "gpu_check"
DEFAULT_OUT = REPO / "benchmarks" / "results" / "gpu_check.json"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks._common import CHILD_ENV, load_script, machine, write_result  # noqa: E402

TEN_M = 10_000_000


def _load(name: str):
    return load_script(name)


class Sampler:
    """nvidia-smi in the background: (time, utilisation %, memory used MiB) every 200 ms."""

    def __init__(self, path: Path):
        self.path, self.proc = path, None
        if shutil.which("nvidia-smi"):
            self.fh = path.open("w")
            self.proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=timestamp,utilization.gpu,memory.used", "--format=csv,noheader,nounits", "-lms", "200"],
                stdout=self.fh, stderr=subprocess.DEVNULL,
            )
        self.t0 = time.time()

    def stop(self) -> list[tuple[float, float, float]]:
        if self.proc is None:
            return []
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self.fh.close()
        rows = []
        for line in self.path.read_text().splitlines():
            parts = [x.strip() for x in line.split(",")]
            if len(parts) < 3:
                continue
            try:
                t = datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
                rows.append((t, float(parts[1]), float(parts[2])))
            except ValueError:
                continue
        return rows


def _run(cmd: list[str], log: Path, env: dict | None = None) -> float:
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with log.open("w") as fh:
        rc = subprocess.run(cmd, cwd=REPO, env={**os.environ, **CHILD_ENV, **(env or {})}, stdout=fh, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({rc}); last lines of {log}:\n" + "\n".join(log.read_text(errors="replace").splitlines()[-25:]))
    return time.time() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=1 << 20)
    p.add_argument("--d-sae", type=int, default=16384)
    p.add_argument("--batch-size", type=int, default=64, help="sequences of 128 tokens per batch (default 64)")
    p.add_argument("--limit-tokens", type=int, default=131072)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--work", type=Path, default=WORK)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--keep", action="store_true", help="keep the generated pair and the run (default: deleted at the end)")
    p.add_argument("--cpu-smoke", action="store_true", help="the tiny pair on the CPU, bf16, a few hundred tokens: checks every step, measures nothing")
    p.add_argument("--ce-every", type=int, nargs="+", default=[1],
                   help="ours once per value, in this order: [evals] ce_every (the CE losses on one batch in N; default 1)")
    a = p.parse_args(argv)
    if any(n < 1 for n in a.ce_every):
        p.error("--ce-every: each value must be at least 1")
    wide = _load("wide_pair")
    smoke = a.cpu_smoke
    device = "cpu" if smoke else a.device
    work = a.work.resolve()
    pair = work / "pair"
    ctx = 16 if smoke else 128
    n_tokens = 24 * ctx if smoke else a.tokens
    if smoke:
        settings = wide.replace(wide.TINY, d_sae=(256,), dtype=a.dtype, n_sequences=24)
    else:
        settings = wide.PairSettings(**wide.GEMMA_2_2B, d_vocab=32768, d_sae=(a.d_sae,), n_sequences=-(-n_tokens // ctx), context=ctx, dtype=a.dtype)
    timings: dict[str, float] = {}
    print(f"[gpu_check] 1/3 generating the pair on {device} ...", flush=True)
    t0 = time.time()
    shutil.rmtree(pair, ignore_errors=True)
    wide.generate(pair, settings, device)
    timings["generate_seconds"] = time.time() - t0
    d_sae = settings.d_sae[0]
    batch_size = 8 if smoke else a.batch_size
    cfg = work / "gpu_check.toml"
    cfg.write_text(wide.config_text(pair, "gpu-check", d_sae, n_tokens, ctx, batch_size=batch_size))

    print("[gpu_check] 2/3 the bare forward ...", flush=True)
    lim_out = work / "limit.json"
    limit_tokens = min(n_tokens, 8 * ctx if smoke else a.limit_tokens)
    code = (f"import sys; sys.path.insert(0, {str(REPO)!r}); from benchmarks.gpu_check import _load; "
            f"_load('b7_scaling').limit_child(__import__('pathlib').Path({str(cfg)!r}), {os.cpu_count() or 1}, {limit_tokens}, "
            f"__import__('pathlib').Path({str(lim_out)!r}), {device!r}, {a.dtype!r}, ('limit',))")
    timings["limit_child_seconds"] = _run([sys.executable, "-c", code], work / "logs" / "limit.log")
    limit = json.loads(lim_out.read_text())
    limit_tps = limit["n_tokens"] / limit["limit"]["wall_seconds"]
    out = a.out or (work / "gpu_check-smoke.json" if smoke else DEFAULT_OUT)
    result = {
        "benchmark": "GPU check: the precompute at gemma-2-2b size on one GPU", "partial": True,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "bash benchmarks/gpu_check.sh " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(), "loadavg": list(os.getloadavg()), "smoke": smoke, "device": device, "dtype": a.dtype,
        "pair": json.loads((pair / "PAIR.json").read_text())["settings"], "n_tokens": n_tokens, "timings": timings,
        "limit": limit, "limit_tokens_per_second": limit_tps, "ce_every": a.ce_every, "by_ce_every": {},
        "goal": "10M tokens <= 900 s, utilisation >= 70% (H200)",
    }
    # what is known so far, written now and after each run of ours: a check stopped by a time limit
    # still leaves its finished steps ("partial": true until the last)
    write_result(out, result, indent=2)
    print(f"[gpu_check] bare forward: {limit_tps:,.0f} tokens/s over {limit['n_tokens']:,} tokens (partial result in {out})", flush=True)

    runs = work / "runs"
    for i, ce_every in enumerate(a.ce_every):
        print(f"[gpu_check] 3/3 ours, ce_every = {ce_every} ({i + 1} of {len(a.ce_every)}) ...", flush=True)
        run_id = f"gpu-check-ce{ce_every}"
        cfg_n = work / f"{run_id}.toml"
        cfg_n.write_text(wide.config_text(pair, run_id, d_sae, n_tokens, ctx, batch_size=batch_size, extra=f"[evals]\nce_every = {ce_every}\n"))
        sampler = Sampler(work / f"nvidia-smi-ce{ce_every}.csv")
        # the progress bar goes to the log: where the stream got to, if it is stopped
        cmd = [sys.executable, "-m", "precompute", "run", "--config", str(cfg_n), "--runs-dir", str(runs), "--overwrite", "--device", device, "--dtype", a.dtype]
        t_start = time.time()
        _run(cmd, work / "logs" / f"ours-ce{ce_every}.log")
        ours = {"wall_seconds": time.time() - t_start, "run_dir": str(runs / run_id), "t_end": time.time(), "command": " ".join(cmd)}
        samples = sampler.stop()
        man = json.loads((Path(ours["run_dir"]) / "manifest.json").read_text())
        t = man["timing"]
        stream_end = ours["t_end"] - t["finalize_seconds"]
        stream_start = stream_end - t["stream_seconds"]
        inside = [x for x in samples if stream_start <= x[0] <= stream_end]
        fixed = ours["wall_seconds"] - t["stream_seconds"]
        stream_tps = t["stream_tokens"] / t["stream_seconds"]
        got = {
            "ours": ours, "ours_timing": t, "stream_tokens_per_second": stream_tps, "run_dtype": (man.get("loading") or {}).get("dtype"),
            "stream_over_bare_forward": limit_tps / stream_tps,
            "gpu_util_samples_in_stream": len(inside),
            "gpu_util_mean": statistics.mean(x[1] for x in inside) if inside else None,
            "gpu_util_median": statistics.median(x[1] for x in inside) if inside else None,
            "gpu_memory_peak_mib": max((x[2] for x in samples), default=None),
            "fixed_seconds": fixed,
            "extrapolated_10M_seconds": fixed + TEN_M / stream_tps,
        }
        result["by_ce_every"][str(ce_every)] = got
        if i == 0:
            result.update(got)  # the first value's numbers at the top level
        result["partial"] = i + 1 < len(a.ce_every)
        write_result(out, result, indent=2)
        u, um = got["gpu_util_mean"], got["gpu_util_median"]
        util = "n/a (no nvidia-smi)" if u is None else f"{u:.0f}% mean, {um:.0f}% median of {len(inside)} samples"
        print(f"ce_every = {ce_every}: stream {stream_tps:,.0f} tokens/s ({t['stream_tokens']:,} tokens in {t['stream_seconds']:.1f} s); "
              f"bare forward {limit_tps:,.0f} tokens/s; ratio {got['stream_over_bare_forward']:.2f}x")
        print(f"  GPU utilisation in the stream: {util}; peak memory {got['gpu_memory_peak_mib'] or 'n/a'} MiB")
        print(f"  fixed costs {fixed:.0f} s (load, calibration, finalize); 10M tokens extrapolated: {got['extrapolated_10M_seconds']:.0f} s (goal <= 900 s)", flush=True)
        if not a.keep:
            shutil.rmtree(runs / run_id, ignore_errors=True)
    print(f"wrote {out}")
    if not a.keep:
        shutil.rmtree(pair, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
