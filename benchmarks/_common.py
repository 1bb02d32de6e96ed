"""What the benchmark scripts share: the machine description and the demo-config rewriting.

Scripts import it as `benchmarks._common` after putting the repository root on sys.path (they
run as `python benchmarks/<name>.py` and are loaded by file path in the smoke tests).
"""

from __future__ import annotations

import json
import os
import platform
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# children run offline, without trackers or tokenizer thread pools
CHILD_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}


def machine() -> dict:
    """Platform, CPU model, core count, memory and Python version of this machine."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        mem = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return {"platform": platform.platform(), "cpu": cpu, "nproc": os.cpu_count(), "mem_total_bytes": mem, "python": platform.python_version()}


def corpus_info(demo: Path) -> tuple[int, int]:
    """(rows, context) of the demo eval corpus."""
    import pyarrow.parquet as pq

    t = pq.read_table(Path(demo) / "eval_corpus.parquet", columns=["token_ids"])
    lengths = {len(r) for r in t.column("token_ids").to_pylist()}
    if len(lengths) != 1:
        raise SystemExit(f"eval corpus rows have different lengths {sorted(lengths)[:5]}")
    return t.num_rows, lengths.pop()


def demo_config_text(run_id: str, demo: Path, n_tokens: int, context: int) -> str:
    """configs/demo.toml (both SAEs, the shipped settings) with absolute paths into `demo` and
    our run_id, n_tokens and context_size; without its [crosscoder] section, so that the
    benchmarks keep measuring the SAE pipeline their results in RESULTS.md describe."""
    text = (REPO / "configs" / "demo.toml").read_text()
    text = re.sub(r"(?ms)^\[crosscoder\].*?(?=^\[|\Z)", "", text)
    text = re.sub(r"(?m)^run_id\s*=.*$", f"run_id = {json.dumps(run_id)}", text)
    text = re.sub(r'(?m)^path\s*=\s*"data/demo/([^"]*)"', lambda m: f"path = {json.dumps(str(Path(demo) / m.group(1)))}", text)
    text = re.sub(r"(?m)^n_tokens\s*=\s*\d+", f"n_tokens = {n_tokens}", text)
    return re.sub(r"(?m)^context_size\s*=\s*\d+", f"context_size = {context}", text)


def write_config(path: Path, run_id: str, demo: Path, n_tokens: int, context: int) -> None:
    """demo_config_text written to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(demo_config_text(run_id, demo, n_tokens, context))


def write_result(out: Path, result: dict, indent: int = 1) -> Path:
    """Write a benchmark's result JSON (parents created); returns the path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=indent, default=str) + "\n")
    return out
