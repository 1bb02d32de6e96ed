"""B1: our precompute against SAEDashboard, on the same model, SAE and tokens, side by side.

    python benchmarks/b1_vs_saedashboard.py                    # ~50k tokens, 3 repetitions
    python benchmarks/b1_vs_saedashboard.py --reps 5 --n-tokens 50000
    python benchmarks/b1_vs_saedashboard.py --smoke            # tiny: 2 sequences, 1 repetition

What runs (all on CPU, one process at a time, in alternating order each repetition):
  * SAEDashboard 0.8.0 (`_saedashboard_runner.py`, in its own venv built by
    `saedashboard_venv.sh`): its Neuronpedia all-features path on the demo BASE model with the
    BASE SAE, one model;
  * ours, `python -m precompute run --config <cfg>`: the same tokens on BOTH models, with the
    base SAE ("ours_base_sae"), and again with both SAEs ("ours_both_saes": twice the features,
    plus the two-SAE matching).

The tokens: the first N sequences of the demo's eval corpus, written to a corpus file of their
own under benchmarks/_work/b1/, which both tools read whole (our precompute permutes its sample,
so the set of tokens is identical, the order is not). The script checks that our run's tokens
are that set and that the venv's hand-loaded model and SAE give the activations our loaders give.

Measured per run: wall seconds of the whole subprocess (interpreter start, imports, loading,
computing, writing the output; for SAEDashboard less the time the runner spends checking its
output against a hand encode), and of the tool's own compute region where it reports one;
output bytes (SAEDashboard: its JSON; ours: the run directory). Derived: seconds per
feature-token (wall / (SAE features x tokens): ours covers both models in that time) and output
bytes per feature. Ratios are taken per repetition, between runs made back to back in the same
invocation, and the median of those is reported; the machine is shared and noisy.

Results: a table on stdout and `benchmarks/results/b1.json` (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks"
WORK = BENCH / "_work"
VENV = WORK / "saedash-venv"
VENV_SCRIPT = BENCH / "saedashboard_venv.sh"
RUNNER = BENCH / "_saedashboard_runner.py"
DEFAULT_OUT = BENCH / "results" / "b1.json"
if str(REPO) not in sys.path:  # run as a script: make `explorer` importable
    sys.path.insert(0, str(REPO))

from benchmarks import _common  # noqa: E402
CHILD_ENV = _common.CHILD_ENV


# ------------------------------------------------------------------------------------------
# Setup


def venv_python() -> Path:
    return VENV / "bin" / "python"


def venv_ready() -> bool:
    return (VENV / ".b1-complete").is_file() and venv_python().exists()


def ensure_venv() -> Path:
    """Build (or reuse) the SAEDashboard venv; its log goes to benchmarks/_work/saedash-venv.log."""
    log = WORK / "saedash-venv.log"
    WORK.mkdir(parents=True, exist_ok=True)
    with log.open("w") as fh:
        proc = subprocess.run(["bash", str(VENV_SCRIPT)], stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"Building the SAEDashboard venv failed (exit {proc.returncode}); see {log}.")
    return venv_python()


def make_corpus(demo: Path, n_sequences: int, out: Path) -> tuple[int, int]:
    """The first n_sequences rows of the demo eval corpus (token_ids, source) -> out. Returns (rows, context)."""
    import pyarrow.parquet as pq

    table = pq.read_table(demo / "eval_corpus.parquet", columns=["token_ids", "source"])
    if table.num_rows < n_sequences:
        raise SystemExit(f"{demo / 'eval_corpus.parquet'} has {table.num_rows} sequences; {n_sequences} were asked for.")
    table = table.slice(0, n_sequences)
    lengths = {len(r) for r in table.column("token_ids").to_pylist()}
    if len(lengths) != 1:
        raise SystemExit(f"eval corpus rows have different lengths {sorted(lengths)[:5]}")
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out)
    return n_sequences, lengths.pop()


def write_config(path: Path, run_id: str, demo: Path, corpus: Path, n_tokens: int, context: int, both_saes: bool) -> None:
    """A precompute config (TOML, the shared contract) for the demo pair on `corpus`; defaults elsewhere."""
    q = lambda p: json.dumps(str(p))  # noqa: E731  (a JSON string is a valid TOML basic string)
    lines = [
        f"run_id = {json.dumps(run_id)}",
        "[models.base]", f"path = {q(demo / 'base')}",
        "[models.finetuned]", f"path = {q(demo / 'finetuned')}",
        "[saes.base_sae]", f"path = {q(demo / 'saes' / 'base_sae')}",
    ]
    if both_saes:
        lines += ["[saes.finetuned_sae]", f"path = {q(demo / 'saes' / 'finetuned_sae')}"]
    lines += ["[corpus]", f"path = {q(corpus)}", "[sample]", f"n_tokens = {n_tokens}", f"context_size = {context}"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


# ------------------------------------------------------------------------------------------
# The two tools


def _timed(cmd: list[str], log: Path) -> tuple[float, int, dict]:
    """Run `cmd`, output to `log`. Returns (wall seconds, exit status, its CPU seconds and peak RSS).

    CPU seconds (user + system, from wait4) are less sensitive than wall time to other jobs on
    a shared machine; both are recorded, wall time is the headline.
    """
    env = {**os.environ, **CHILD_ENV}
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as fh:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    res = {"cpu_seconds": usage.ru_utime + usage.ru_stime, "max_rss_bytes": usage.ru_maxrss * 1024}
    return wall, proc.returncode, res


def _tail(log: Path, n: int = 25) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-n:])


def run_saedashboard(py: Path, demo: Path, corpus: Path, n_sequences: int, out: Path, n_features: int | None, check_out: Path | None, threads: int | None = None,
                     n_batches: int | None = None) -> dict:
    cmd = [str(py), str(RUNNER), "--demo", str(demo), "--corpus", str(corpus), "--n-sequences", str(n_sequences), "--out", str(out)]
    if n_batches is not None:
        cmd += ["--n-batches", str(n_batches)]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    if n_features is not None:
        cmd += ["--n-features", str(n_features)]
    if check_out is not None:
        cmd += ["--check-out", str(check_out)]
    log = out.with_suffix(".log")
    wall, rc, usage = _timed(cmd, log)
    if rc != 0:
        raise SystemExit(f"SAEDashboard runner failed (exit {rc}); last lines of {log}:\n{_tail(log)}")
    lines = [ln for ln in log.read_text().splitlines() if ln.startswith("{") and '"tool": "sae-dashboard"' in ln]
    if not lines:
        raise SystemExit(f"SAEDashboard runner printed no result line; see {log}.")
    res = json.loads(lines[-1])
    n_ft = res["n_features"] * res["n_tokens"]
    # The runner's own correctness checks are not SAEDashboard's work: take them out of the wall time.
    wall_tool = wall - res["check_seconds"]
    usage = {**usage, "cpu_seconds": usage["cpu_seconds"] - res.get("check_cpu_seconds", 0.0)}
    extra = {}
    if res.get("full_run_seconds_estimate") is not None:
        # a timed sample of the batches: the whole run (all d_sae features) estimated from its
        # measured parts (process start to the run, first batch with the activation caching, the
        # median batch after it, the tail), per feature-token of ALL features
        full = (wall_tool - res["wall_seconds"]) + res["full_run_seconds_estimate"]
        extra = {"sampled": True, "sample_wall_seconds": wall_tool, "sample_features": res["n_features"], "full_wall_seconds_estimate": full}
        wall_tool = full
        n_ft = res["d_sae"] * res["n_tokens"]
        usage = {**usage, "cpu_seconds": usage["cpu_seconds"] * full / extra["sample_wall_seconds"]}  # scaled like the wall time
        res = {**res, "n_features": res["d_sae"], "wall_seconds": res["full_run_seconds_estimate"]}
    return {
        **res,
        **extra,
        "inner_seconds": res["wall_seconds"],
        "subprocess_seconds": wall,
        **usage,
        "cpu_seconds_per_feature_token": usage["cpu_seconds"] / n_ft,
        "wall_seconds": wall_tool,
        "seconds_per_feature_token": wall_tool / n_ft,
        "inner_seconds_per_feature_token": res["wall_seconds"] / n_ft,
    }


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def our_command(config: Path, runs_dir: Path, threads: int | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "precompute", "run", "--config", str(config), "--runs-dir", str(runs_dir), "--no-progress"]
    return cmd + (["--threads", str(threads)] if threads is not None else [])


def run_ours(config: Path, runs_dir: Path, run_id: str, label: str, threads: int | None = None) -> dict:
    import shutil

    run_dir = runs_dir / run_id
    if run_dir.exists():
        shutil.rmtree(run_dir)
    log = runs_dir / f"{run_id}.log"
    wall, rc, usage = _timed(our_command(config, runs_dir, threads), log)
    if rc != 0:
        raise SystemExit(f"our precompute ({label}) failed (exit {rc}); last lines of {log}:\n{_tail(log)}")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    if not manifest.get("complete"):
        raise SystemExit(f"our precompute ({label}) left an incomplete manifest in {run_dir}.")
    d_sae = {k: int(v) for k, v in manifest["d_sae"].items()}
    n_features = sum(d_sae.values())
    n_tokens = int(manifest["n_tokens"])
    output_bytes = dir_bytes(run_dir)
    timing = manifest.get("timing") or {}
    inner = None
    if "stream_seconds" in timing and "finalize_seconds" in timing:
        inner = float(timing["stream_seconds"]) + float(timing["finalize_seconds"])  # excludes loading and calibration
    return {
        "tool": label,
        "run_dir": str(run_dir),
        "n_tokens": n_tokens,
        "n_sequences": int(manifest["n_sequences"]),
        "n_features": n_features,
        "d_sae": d_sae,
        "models": 2,
        "wall_seconds": wall,
        "output_bytes": output_bytes,
        "output_bytes_per_feature": output_bytes / n_features,
        "output_bytes_per_feature_per_model": output_bytes / n_features / 2,
        "seconds_per_feature_token": wall / (n_features * n_tokens),
        **usage,
        "cpu_seconds_per_feature_token": usage["cpu_seconds"] / (n_features * n_tokens),
        "inner_seconds": inner,
        "inner_seconds_per_feature_token": None if inner is None else inner / (n_features * n_tokens),
        "manifest_timing": timing,
    }


# ------------------------------------------------------------------------------------------
# Checks: the same tokens, the same model and SAE


def check_same_tokens(run_dir: Path, corpus: Path) -> dict:
    """Our run's token sample is exactly the corpus file's rows (as a multiset: we permute)."""
    import pyarrow.parquet as pq

    from explorer.schema import TOKENS

    ours = pq.read_table(run_dir / "tokens.parquet", columns=[TOKENS.field("token_ids").name]).column(0).to_pylist()
    theirs = pq.read_table(corpus, columns=["token_ids"]).column(0).to_pylist()
    same = sorted(map(tuple, ours)) == sorted(map(tuple, theirs))
    if not same:
        raise SystemExit(f"our run {run_dir} used other tokens than {corpus}: the comparison would be unfair.")
    return {"sequences": len(ours), "identical_set": same}


def check_same_model(check_file: Path, demo: Path) -> dict:
    """The venv's hand-loaded model + SAE agree with explorer.models' loaders on the runner's tokens."""
    import torch
    from safetensors.torch import load_file

    from explorer.models import SAESpec, ModelSpec, load_model, load_sae, sae_hook_name

    got = load_file(str(check_file))
    model = load_model(ModelSpec(path=str(demo / "base")))
    sae = load_sae(SAESpec(path=str(demo / "saes" / "base_sae")))
    hook = sae_hook_name(sae)
    with torch.no_grad():
        _, cache = model.run_with_cache(got["tokens"].long(), names_filter=hook)
        x = cache[hook]
        f = sae.encode(x)
    d_x = float((x - got["hook_acts"]).abs().max())
    d_f = float((f - got["feature_acts"]).abs().max())
    ok = torch.allclose(x, got["hook_acts"], atol=1e-4, rtol=1e-4) and torch.allclose(f, got["feature_acts"], atol=1e-4, rtol=1e-4)
    if not ok:
        raise SystemExit(f"the SAEDashboard venv's model/SAE disagree with ours (max |d hook| {d_x:.3g}, |d features| {d_f:.3g}).")
    return {"tokens": int(got["tokens"].numel()), "max_abs_diff_hook": d_x, "max_abs_diff_features": d_f}


# ------------------------------------------------------------------------------------------
# Report


def git_state() -> dict:
    """The commit measured, and which tracked files of the measured code differ from it."""
    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, check=True).stdout.rstrip("\n")
        except (OSError, subprocess.CalledProcessError):
            return ""

    dirty = [ln[3:] for ln in git("status", "--porcelain", "--", "precompute", "explorer", "benchmarks").splitlines() if ln]
    return {"commit": git("rev-parse", "HEAD").strip(), "uncommitted_changes": dirty}


def machine() -> dict:
    import torch

    return {**_common.machine(), "torch_main_env": torch.__version__, "torch_threads_main_env": torch.get_num_threads(), "loadavg_at_start": os.getloadavg()}


def summarize(reps: list[dict], tools: list[str]) -> dict:
    med = lambda xs: statistics.median(xs) if xs else None  # noqa: E731
    out: dict = {"median": {}, "ratio_vs_saedashboard": {}}
    for tool in tools:
        rows = [r[tool] for r in reps if tool in r]
        out["median"][tool] = {
            k: med([r[k] for r in rows if r.get(k) is not None])
            for k in ("wall_seconds", "inner_seconds", "cpu_seconds", "max_rss_bytes", "seconds_per_feature_token", "cpu_seconds_per_feature_token", "inner_seconds_per_feature_token", "output_bytes", "output_bytes_per_feature", "output_bytes_per_feature_per_model")
            if rows and k in rows[0]
        }
        out["median"][tool]["runs"] = len(rows)
    if "saedashboard" in tools:
        for tool in tools:
            if tool == "saedashboard":
                continue
            pairs = [(r["saedashboard"], r[tool]) for r in reps if "saedashboard" in r and tool in r]
            if not pairs:
                continue
            per_rep = [sd["seconds_per_feature_token"] / us["seconds_per_feature_token"] for sd, us in pairs]
            bytes_ratio = [sd["output_bytes_per_feature"] / us["output_bytes_per_feature"] for sd, us in pairs]
            cpu_ratio = [sd["cpu_seconds_per_feature_token"] / us["cpu_seconds_per_feature_token"] for sd, us in pairs if "cpu_seconds_per_feature_token" in sd and "cpu_seconds_per_feature_token" in us]
            out["ratio_vs_saedashboard"][tool] = {
                "throughput_per_feature_token_each_rep": per_rep,
                "throughput_per_feature_token_median": med(per_rep),
                "output_bytes_per_feature_sd_over_ours_median": med(bytes_ratio),
                "cpu_time_per_feature_token_each_rep": cpu_ratio,
                "cpu_time_per_feature_token_median": med(cpu_ratio),
            }
    return out


BOUND_VARIANTS = {
    "hook": "forwards to the hook's layer + the encode's matmul and gate, both models (no logits: no KL, no CE)",
    "limit": "full forwards with logits + the encode's matmul and gate, both models (B7's bare limit)",
    "floor": "what reporting CE loss on every token costs: clean, spliced and zero-ablated losses, both models (B7's CE floor)",
}


def bounds(cfg: Path, n_tokens: int, threads: int | None, work: Path, result: dict) -> dict:
    """B7's limit child on our base-SAE config (the same tokens, both models, the same threads): CPU
    seconds of each variant in BOUND_VARIANTS, and SAEDashboard's CPU seconds per feature-token over
    that variant's (features counted once, as for ours): the most a two-model tool that did only
    that work, with no imports, loading, statistics or output, could reach."""
    out = work / "bounds.json"
    cmd = [sys.executable, str(BENCH / "b7_scaling.py"), "--_limit", str(cfg), "--threads", str(threads or 1), "--limit-tokens", str(n_tokens),
           "--variants", *BOUND_VARIANTS, "--out", str(out)]
    print(f"[b1] bounds: {' '.join(BOUND_VARIANTS)} ...", flush=True)
    subprocess.run(cmd, check=True, cwd=REPO, env={**os.environ, **CHILD_ENV})
    lim = json.loads(out.read_text())
    sd = result["summary"]["median"].get("saedashboard", {})
    n_features = next((r[t]["n_features"] for r in result["reps"] for t in ("ours_base_sae", "saedashboard") if t in r), None)  # the base SAE's d_sae
    res = {"command": " ".join(shlex.quote(c) for c in cmd), "n_tokens": lim["n_tokens"], "threads": lim["threads"]}
    for v, what in BOUND_VARIANTS.items():
        cpu = lim[v]["cpu_seconds"]
        row = {"what": what, "cpu_seconds": cpu, "wall_seconds": lim[v]["wall_seconds"]}
        if sd.get("cpu_seconds_per_feature_token") and n_features:
            row["saedashboard_cpu_per_feature_token_over_this"] = sd["cpu_seconds_per_feature_token"] / (cpu / (n_features * lim["n_tokens"]))
        res[v] = row
    return res


def print_table(result: dict) -> None:
    s = result["summary"]
    print()
    print(f"B1 on {result['settings']['n_tokens']:,} tokens, {result['settings']['reps']} repetition(s), median per tool:")
    hdr = f"{'tool':<18}{'models':>7}{'features':>9}{'wall s':>10}{'cpu s':>9}{'s/feature-token':>17}{'out bytes':>13}{'B/feature':>11}{'x SAEDash':>11}{'x (cpu)':>9}"
    print(hdr)
    print("-" * len(hdr))
    for tool, m in s["median"].items():
        last = next(r[tool] for r in reversed(result["reps"]) if tool in r)
        ratios = s["ratio_vs_saedashboard"].get(tool, {})
        ratio, cpu_ratio = ratios.get("throughput_per_feature_token_median"), ratios.get("cpu_time_per_feature_token_median")
        cpu = m.get("cpu_seconds")
        print(
            f"{tool:<18}{last.get('models', 1):>7}{last['n_features']:>9}{m['wall_seconds']:>10.2f}{'' if cpu is None else f'{cpu:.1f}':>9}"
            f"{m['seconds_per_feature_token']:>17.3e}{m['output_bytes']:>13,.0f}{m['output_bytes_per_feature']:>11,.0f}"
            f"{'' if ratio is None else f'{ratio:.1f}x':>11}{'' if cpu_ratio is None else f'{cpu_ratio:.1f}x':>9}"
        )
    print("(x SAEDash: SAEDashboard's wall seconds per feature-token over ours, median of the per-repetition ratios;")
    print(" x (cpu): the same with CPU seconds, user + system, which other jobs on the machine disturb less.)")
    b = result.get("bounds")
    if b:
        print(f"Bounds (B7's limit child, {b['n_tokens']:,} tokens, {b['threads']} thread(s)): CPU s, and the ratio a two-model tool doing only that work would reach")
        for v in BOUND_VARIANTS:
            r = b[v]
            x = r.get("saedashboard_cpu_per_feature_token_over_this")
            print(f"  {v:<6}{r['cpu_seconds']:>9.1f}{'' if x is None else f'{x:>8.1f}x'}   {r['what']}")


# ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", type=Path, default=REPO / "data" / "demo", help="demo pair directory (default data/demo)")
    parser.add_argument("--n-tokens", type=int, default=50_000, help="about this many tokens, rounded up to whole sequences (default 50000)")
    parser.add_argument("--reps", type=int, default=3, help="repetitions, each tool once per repetition, order alternating (default 3)")
    parser.add_argument("--work", type=Path, default=WORK / "b1", help="scratch directory (default benchmarks/_work/b1)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="result JSON (default benchmarks/results/b1.json)")
    parser.add_argument("--smoke", action="store_true", help="tiny run: 2 sequences, 8 SAEDashboard features, 1 repetition; skips SAEDashboard if its venv is not built")
    parser.add_argument("--skip-saedashboard", action="store_true", help="run only our side")
    parser.add_argument("--skip-ours", action="store_true", help="run only SAEDashboard")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for BOTH tools (default: each tool's own: SAEDashboard all cores, our CLI half)")
    parser.add_argument("--no-both-saes", action="store_true", help="skip our two-SAE variant")
    parser.add_argument("--bounds", action="store_true",
                        help="after the tools, B7's limit child on our base-SAE config, same tokens and threads: the hook, limit and floor variants; "
                             "each gives the ratio over SAEDashboard that a two-model tool doing only that work would reach")
    parser.add_argument("--sd-batches", type=int, default=None,
                        help="SAEDashboard: time only its first K feature batches and estimate the whole run from them (large SAEs on a slow machine)")
    args = parser.parse_args(argv)

    demo = args.demo.resolve()
    work = args.work.resolve()
    reps = 1 if args.smoke else args.reps
    sd_features = 8 if args.smoke else None

    run_sd = not args.skip_saedashboard
    if run_sd:
        if args.smoke and not venv_ready():
            print("[b1] smoke: the SAEDashboard venv is not built; skipping its side.", flush=True)
            run_sd = False
        else:
            print("[b1] ensuring the SAEDashboard venv ...", flush=True)
            ensure_venv()
    run_us = not args.skip_ours
    if not (run_sd or run_us):
        raise SystemExit("nothing to run: both sides skipped.")

    import pyarrow.parquet as pq

    context = len(pq.read_table(demo / "eval_corpus.parquet", columns=["token_ids"]).slice(0, 1).column(0)[0])
    n_sequences = 2 if args.smoke else -(-args.n_tokens // context)
    corpus = work / "corpus.parquet"
    make_corpus(demo, n_sequences, corpus)
    n_tokens = n_sequences * context

    variants: list[tuple[str, bool]] = [("ours_base_sae", False)]
    if not args.no_both_saes and (demo / "saes" / "finetuned_sae").is_dir():
        variants.append(("ours_both_saes", True))
    configs = {}
    for label, both in variants:
        cfg = work / f"{label}.toml"
        write_config(cfg, f"b1-{label.replace('_', '-')}", demo, corpus, n_tokens, context, both)
        configs[label] = cfg

    tools = (["saedashboard"] if run_sd else []) + ([v[0] for v in variants] if run_us else [])
    result: dict = {
        "benchmark": "B1: precompute vs SAEDashboard",
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join(shlex.quote(a) for a in [str(Path(__file__).relative_to(REPO))] + list(sys.argv[1:] if argv is None else argv)),
        "machine": machine(),
        "git": git_state(),
        "settings": {"demo": str(demo), "n_sequences": n_sequences, "context_size": context, "n_tokens": n_tokens, "reps": reps, "smoke": args.smoke, "threads": args.threads or "each tool's default", "saedashboard_features": sd_features or "all"},
        "checks": {},
        "reps": [],
    }
    for rep in range(reps):
        order = tools if rep % 2 == 0 else list(reversed(tools))
        row: dict = {"order": order, "git": git_state()}  # the working tree may change between repetitions
        for tool in order:
            print(f"[b1] rep {rep + 1}/{reps}: {tool} ...", flush=True)
            if tool == "saedashboard":
                check_out = work / "sd_check.safetensors" if rep == 0 else None
                row[tool] = run_saedashboard(venv_python(), demo, corpus, n_sequences, work / "saedashboard", sd_features, check_out, args.threads, args.sd_batches)
                if check_out is not None:
                    result["checks"]["venv_model_sae_vs_explorer_loaders"] = check_same_model(check_out, demo)
                    result["checks"]["saedashboard_output_vs_hand_encode"] = row[tool]["output_check"]
                    result["checks"]["saedashboard_sae_vs_hand_encode"] = row[tool]["sae_check"]
            else:
                row[tool] = run_ours(configs[tool], work / "runs", f"b1-{tool.replace('_', '-')}", tool, args.threads)
                if rep == 0:
                    result["checks"][f"{tool}_tokens_vs_corpus"] = check_same_tokens(Path(row[tool]["run_dir"]), corpus)
            print(f"[b1]   {row[tool]['wall_seconds']:.2f} s, {row[tool]['output_bytes']:,} bytes", flush=True)
        result["reps"].append(row)
        result["machine"]["loadavg_at_end"] = os.getloadavg()
        result["summary"] = summarize(result["reps"], tools)
        _common.write_result(args.out, result, indent=2)  # after every repetition

    if args.bounds:
        result["bounds"] = bounds(configs["ours_base_sae"], n_tokens, args.threads, work, result)
        _common.write_result(args.out, result, indent=2)
    print_table(result)
    print(f"[b1] wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
