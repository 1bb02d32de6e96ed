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
    text = re.sub(r'(?m)^path\s*=\s*"(?:\.\./)?data/demo/([^"]*)"', lambda m: f"path = {json.dumps(str(Path(demo) / m.group(1)))}", text)
    text = re.sub(r"(?m)^n_tokens\s*=\s*\d+", f"n_tokens = {n_tokens}", text)
    return re.sub(r"(?m)^context_size\s*=\s*\d+", f"context_size = {context}", text)


def write_config(path: Path, run_id: str, demo: Path, n_tokens: int, context: int) -> None:
    """demo_config_text written to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(demo_config_text(run_id, demo, n_tokens, context))


def run_child(cmd: list[str], log: Path, env: dict | None = None) -> dict:
    """Run `cmd` from the repository root (output to `log`, CHILD_ENV set) and time it: wall and
    CPU seconds (user + system from os.wait4), peak RSS (ru_maxrss of the child and the children
    it waited for), load averages before and after. A failure ends the benchmark with the log's tail."""
    import subprocess
    import time

    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()
    with log.open("w") as fh:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **CHILD_ENV, **(env or {})}, stdout=fh, stderr=subprocess.STDOUT)
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    rc = os.waitstatus_to_exitcode(status)
    if rc != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise SystemExit(f"{' '.join(map(str, cmd))} failed (exit {rc}); last lines of {log}:\n{tail}")
    return {"command": " ".join(map(str, cmd)), "wall_seconds": wall, "cpu_seconds": ru.ru_utime + ru.ru_stime, "user_seconds": ru.ru_utime,
            "sys_seconds": ru.ru_stime, "peak_rss_bytes": ru.ru_maxrss * 1024, "loadavg_before": list(load0), "loadavg_after": list(os.getloadavg())}


def load_script(path: Path | str, name: str | None = None):
    """A script (benchmarks/<name>.py, scripts/<name>.py) as a module: they are not a package."""
    import importlib.util
    import sys

    path = Path(path)
    if path.suffix != ".py":
        path = REPO / "benchmarks" / f"{path}.py"
    spec = importlib.util.spec_from_file_location(name or f"bench_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
# what the load tests type: search terms for the features table, prompts for the live probe
SEARCH_TERMS = ["the", "def", "import", "(", "in", "x", "return", "of", "self", "zzzz-no-match"]
PROMPTS = [
    "def add(a, b):\n    return a + b",
    "The cat sat on the mat and looked at the door.",
    "import numpy as np\nx = np.zeros(3)",
    "Once upon a time, there was a little girl.",
    "<script>alert(1)</script> for i in range(10): print(i)",
    "class Foo:\n    def __init__(self):\n        self.x = 1",
]


def load_summary(records: list[dict], actions, skip_empty: bool = False) -> dict:
    """Per action (and "all"): n, errors, p50/p95/max seconds of the actions without an error."""
    import numpy as np

    out = {}
    for action in (*actions, "all"):
        rs = [r for r in records if action == "all" or r["action"] == action]
        if skip_empty and not rs and action != "all":
            continue
        ok = [r["seconds"] for r in rs if not r["error"] and r["seconds"] is not None]
        out[action] = {
            "n": len(rs),
            "errors": sum(1 for r in rs if r["error"]),
            "p50_s": float(np.percentile(ok, 50)) if ok else None,
            "p95_s": float(np.percentile(ok, 95)) if ok else None,
            "max_s": float(max(ok)) if ok else None,
        }
    return out


def print_load_summary(summary: dict, actions, error_samples: list, out: Path, width: int = 8, digits: int = 2) -> None:
    """The per-action lines of a load test (n, errors, p50/p95/max), its first errors and where
    the result went (benchmarks/load_test.py, benchmarks/load_protocol.py)."""
    fmt = lambda v: f"{v:.{digits}f} s" if v is not None else "-"  # noqa: E731
    for a in actions:
        if a in summary:
            s = summary[a]
            print(f"  {a:{width}s} n={s['n']:4d} errors={s['errors']:3d} p50={fmt(s['p50_s'])} p95={fmt(s['p95_s'])} max={fmt(s['max_s'])}")
    for e in error_samples[:10]:
        print("  error:", e)
    print("wrote", out)


def smoke_run(prefix: str, n_features: int):
    """(temp dir, run dir): a synthetic run for a benchmark's --smoke mode; clean up the temp dir."""
    import tempfile

    from explorer.synthetic import make_run

    tmp = tempfile.TemporaryDirectory(prefix=prefix)
    return tmp, make_run(Path(tmp.name) / "synth", n_features=n_features, seed=0)


def write_result(out: Path, result: dict, indent: int = 1) -> Path:
    """Write a benchmark's result JSON (parents created); returns the path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=indent, default=str) + "\n")
    return out


def stop_process_group(proc, grace_s: float = 15.0) -> None:
    """SIGTERM the process group led by `proc` (started with start_new_session=True), wait until
    every process of the group is gone (at most `grace_s`), then SIGKILL what is left. Polls
    instead of sleeping the whole grace period (a local Ray head stops in a second or two)."""
    import os as _os
    import signal as _signal
    import time as _time

    try:
        _os.killpg(proc.pid, _signal.SIGTERM)
    except ProcessLookupError:
        proc.wait(timeout=30)
        return
    deadline = _time.monotonic() + grace_s
    while _time.monotonic() < deadline:
        proc.poll()  # reap the leader, so that only live members keep the group
        try:
            _os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        _time.sleep(0.2)
    else:
        try:
            _os.killpg(proc.pid, _signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)
