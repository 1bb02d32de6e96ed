"""B2 before/after: the precompute at an earlier commit against this checkout, side by side.

    python benchmarks/b2_before_after.py --before ecdd667 --reps 3          # 51,200 tokens, 1 thread

The earlier commit is unpacked with `git archive` into benchmarks/_work/b2ba/<commit>/ (no
worktree is registered). Every child runs `python -m precompute run --config CFG --overwrite
--no-progress --threads T` from its own tree on the same demo models and SAEs (absolute paths into
this checkout's data/demo), on the first `--tokens` tokens of the eval corpus, batch 32:

    before        the earlier commit, base SAE + finetuned SAE (it knows no seed twin)
    after         this checkout, the same two SAEs
    after_twin    this checkout, plus the base SAE's seed twin (when data/demo ships one)

The variants alternate, their order rotated every repetition; medians are reported, with the
ratios after / before of the stream's CPU seconds (the manifest's `stream_cpu_seconds`), of the
stream's wall seconds, and of the whole process's CPU seconds (`os.wait4`).
Results: a table on stdout and benchmarks/results/b2_before_after.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tarfile
import io
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / "benchmarks" / "_work" / "b2ba"
DEFAULT_OUT = REPO / "benchmarks" / "results" / "b2_before_after.json"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks._common import CHILD_ENV, corpus_info, demo_config_text, machine, write_result  # noqa: E402


def unpack(commit: str) -> Path:
    """The tree of `commit` (git archive) under WORK, unpacked once."""
    sha = subprocess.run(["git", "rev-parse", commit], cwd=REPO, check=True, capture_output=True, text=True).stdout.strip()
    tree = WORK / sha[:12]
    if (tree / "precompute" / "__main__.py").exists():
        return tree
    blob = subprocess.run(["git", "archive", "--format=tar", sha, "precompute", "explorer", "configs"], cwd=REPO, check=True, capture_output=True).stdout
    tree.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        tar.extractall(tree, filter="data")
    (tree / "app.py").write_text("")  # precompute.config resolves relative paths against the directory holding app.py
    return tree


def without_twin(text: str) -> str:
    return re.sub(r"(?ms)^\[saes\.base_sae_twin\].*?(?=^\[)", "", text)


def child(tree: Path, cfg: Path, runs: Path, threads: int, log: Path) -> dict:
    cmd = [sys.executable, "-m", "precompute", "run", "--config", str(cfg), "--runs-dir", str(runs), "--overwrite", "--no-progress", "--threads", str(threads)]
    t0 = time.time()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=tree, env={**os.environ, **CHILD_ENV}, stdout=fh, stderr=subprocess.STDOUT)
        _, status, ru = os.wait4(proc.pid, 0)
    wall = time.time() - t0
    if status != 0:
        raise SystemExit(f"{cmd} failed in {tree} (see {log})")
    timing = json.loads((runs / "b2ba" / "manifest.json").read_text())["timing"]
    return {"wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime, "stream_s": timing["stream_seconds"], "stream_cpu_s": timing["stream_cpu_seconds"],
            "finalize_s": timing["finalize_seconds"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", required=True, help="the earlier commit (e.g. ecdd667)")
    p.add_argument("--tokens", type=int, default=51200)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--demo", type=Path, default=REPO / "data" / "demo")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = p.parse_args(argv)
    demo = a.demo.resolve()
    _, context = corpus_info(demo)
    before_tree = unpack(a.before)
    text = demo_config_text("b2ba", demo, a.tokens, context)
    variants = {"before": (before_tree, without_twin(text)), "after": (REPO, without_twin(text))}
    if (demo / "saes" / "base_sae_twin").is_dir() and "[saes.base_sae_twin]" in text:
        variants["after_twin"] = (REPO, text)
    results: dict[str, list[dict]] = {v: [] for v in variants}
    names = list(variants)
    for rep in range(a.reps):
        order = names[rep % len(names):] + names[: rep % len(names)]
        for v in order:
            tree, cfg_text = variants[v]
            d = WORK / "runs" / v
            d.mkdir(parents=True, exist_ok=True)
            cfg = d / "b2ba.toml"
            cfg.write_text(cfg_text)
            r = child(tree, cfg, d / "runs", a.threads, d / f"rep{rep}.log")
            results[v].append(r)
            print(f"rep {rep} {v}: stream CPU {r['stream_cpu_s']:.2f} s, stream {r['stream_s']:.2f} s, total CPU {r['cpu_s']:.2f} s", flush=True)
    med = {v: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for v, rs in results.items()}
    ratios = {v: {k: med[v][k] / med["before"][k] for k in ("stream_cpu_s", "stream_s", "cpu_s", "finalize_s")} for v in med if v != "before"}
    out = {"command": " ".join(["python", "benchmarks/b2_before_after.py", *(argv if argv is not None else sys.argv[1:])]), "machine": machine(),
           "tokens": a.tokens, "threads": a.threads, "before": a.before, "median": med, "ratio_to_before": ratios, "runs": results}
    write_result(a.out, out)
    print(f"\n{a.tokens:,} tokens, {a.threads} thread(s), median of {a.reps}")
    print(f"{'variant':<12}{'stream CPU s':>14}{'stream s':>10}{'total CPU s':>13}{'finalize s':>12}  ratio (stream CPU)")
    for v, m in med.items():
        r = ratios.get(v, {}).get("stream_cpu_s", 1.0)
        print(f"{v:<12}{m['stream_cpu_s']:>14.2f}{m['stream_s']:>10.2f}{m['cpu_s']:>13.2f}{m['finalize_s']:>12.2f}  {r:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
