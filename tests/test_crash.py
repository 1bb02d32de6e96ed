"""Crash safety (issue 6): `kill -9` of a real `python -m precompute run` at different points, then
the same command again: it resumes, and the final run equals an uninterrupted one. A run killed
while its tables or its manifest are being written never looks complete (not listed, not
openable, the app says so).

Kill points (parametrised):
  stream          between checkpoints, at a batch drawn at random (seeded) from the middle of the stream
  streamed        every batch streamed and checkpointed, finalize not yet begun
  tables          during finalize, after some tables have been written (their files exist)
  manifest        during the manifest write: its temporary file is on disk, not yet renamed

At the stream kill point the same run id with another config is refused (the checkpoint left as
it was), and once the run is complete the same command again is a no-op.
Slowing down for a reliable kill point uses --batch-delay (a CLI option) for the stream, and, for
finalize, a wrapper process that patches explorer.rundir's writers to pause (test code only; the
production modules are not changed).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from explorer import rundir, schema
from explorer.errors import RunError
from precompute import pass_state
from tests.test_precompute import BATCH, N_SEQ, assert_runs_equal, tiny_config_text, write_tiny_corpus

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
N_BATCHES = N_SEQ // BATCH

# The CLI with explorer.rundir's writers slowed down: each table write is followed by a pause, and
# the manifest's temporary file is written, then held for a while before the real (atomic) write.
SLOW_WRITER = r"""
import sys, time
from pathlib import Path
from explorer import rundir
_table, _atomic = rundir.write_table, rundir.atomic_write_bytes
def write_table(run_dir, name, *a, **k):
    entry = _table(run_dir, name, *a, **k)
    time.sleep(1.5)
    return entry
def atomic_write_bytes(path, data):
    path = Path(path)
    if path.name == "manifest.json":
        hold = path.parent / ".manifest.json.held.tmp"
        hold.write_bytes(data[: len(data) // 2])   # as if killed mid-write of the temporary file
        time.sleep(60)
        hold.unlink()
    return _atomic(path, data)
rundir.write_table, rundir.atomic_write_bytes = write_table, atomic_write_bytes
from precompute.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def _cmd(cfg: Path, runs: Path, *extra: str, slow_writer: bool = False) -> list[str]:
    args = ["run", "--config", str(cfg), "--runs-dir", str(runs), "--no-progress", *extra]
    return [sys.executable, "-c", SLOW_WRITER, *args] if slow_writer else [sys.executable, "-m", "precompute", *args]


def _next_batch(ckpt: Path) -> int | None:
    try:
        return int(pass_state.read_state_meta(ckpt)["next_batch"]) if ckpt.exists() else None
    except Exception:  # noqa: BLE001 - being replaced right now
        return None


@pytest.fixture(scope="module")
def setup(tiny_demo, tmp_path_factory):
    d = tmp_path_factory.mktemp("crash")
    corpus = write_tiny_corpus(tiny_demo, d / "corpus.parquet")
    cfg = d / "ref.toml"
    cfg.write_text(tiny_config_text(tiny_demo, corpus))
    whole = d / "whole"
    done = subprocess.run(_cmd(cfg, whole), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    return {"cfg": cfg, "whole": whole / "ref"}


def _assert_not_a_run(runs: Path) -> None:
    run_dir = runs / "ref"
    assert not (run_dir / schema.MANIFEST).exists()
    assert rundir.list_runs(runs) == []
    with pytest.raises(RunError, match="incomplete|no run"):
        rundir.open_run(run_dir)


@pytest.mark.parametrize("point", ["stream", "streamed", "tables", "manifest"])
def test_kill_9_then_the_same_command_resumes_to_the_uninterrupted_run(setup, point, tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"
    run_dir = runs / "ref"
    ckpt = run_dir / pass_state.CHECKPOINT_DIR / pass_state.STATE_FILE
    target = random.Random(f"crash-{point}").randrange(1, N_BATCHES - 1)  # stream: a random middle batch
    finalize = point in ("tables", "manifest")
    extra = ["--checkpoint-every", "2", "--batch-delay", "0.7"] if point == "stream" else ["--checkpoint-every", "1"]
    if point == "streamed":
        extra += ["--batch-delay", "0.2"]
    proc = subprocess.Popen(_cmd(setup["cfg"], runs, *extra, slow_writer=finalize), cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)

    def reached() -> bool:
        if point == "stream":
            # past a checkpoint and mid-way to the next one (checkpoints every 2 batches)
            b = _next_batch(ckpt)
            return b is not None and b >= target
        if point == "streamed":
            return _next_batch(ckpt) == N_BATCHES
        if point == "tables":
            return len([p for p in run_dir.glob("*.parquet")]) >= 3
        return (run_dir / ".manifest.json.held.tmp").exists()

    try:
        deadline = time.time() + 600
        while not reached():
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.time() < deadline, f"kill point {point} not reached"
            time.sleep(0.05 if point != "stream" else 0.02)
        if point == "stream":
            time.sleep(0.35)  # inside the next batch, after the checkpoint
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL

    # killed during writing (or anywhere): never looks complete, in the store and in the app
    _assert_not_a_run(runs)
    if finalize:
        assert any(run_dir.glob("*.parquet"))  # tables were there, but no manifest
    _app_says_incomplete(runs, monkeypatch)

    killed_at = _next_batch(ckpt)
    if point == "stream":
        assert killed_at is not None and 1 <= killed_at < N_BATCHES
        # the same run id with another config refuses to touch the checkpoint
        other = tmp_path / "other.toml"
        other.write_text(setup["cfg"].read_text().replace("seed = 3", "seed = 4"))
        assert other.read_text() != setup["cfg"].read_text()
        from precompute.__main__ import main

        assert main(["run", "--config", str(other), "--runs-dir", str(runs), "--no-progress"]) == 2
        assert _next_batch(ckpt) == killed_at
    again = subprocess.run(_cmd(setup["cfg"], runs), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Traceback" not in again.stderr
    if killed_at is not None:
        assert f"from its checkpoint at batch {killed_at}/{N_BATCHES}" in again.stderr
        man = rundir.open_run(run_dir)
        assert man["timing"]["stream_tokens"] == (N_BATCHES - killed_at) * BATCH * run_mod_ctx(setup)
    assert not ckpt.exists() and not list(run_dir.glob(".*.tmp"))
    rundir.open_run(run_dir)
    assert rundir.list_runs(runs) == ["ref"]
    assert_runs_equal(setup["whole"], run_dir, exact_floats=True)
    if point == "stream":
        # once complete, the same command is a no-op: the run is not rewritten
        created = json.loads((run_dir / schema.MANIFEST).read_text())["created_at"]
        from precompute.__main__ import main

        capsys.readouterr()
        assert main(["run", "--config", str(setup["cfg"]), "--runs-dir", str(runs), "--no-progress"]) == 0
        assert "already complete" in capsys.readouterr().err
        assert json.loads((run_dir / schema.MANIFEST).read_text())["created_at"] == created


def run_mod_ctx(setup) -> int:
    import tomllib

    return int(tomllib.loads(setup["cfg"].read_text())["sample"]["context_size"])


def _app_says_incomplete(runs: Path, monkeypatch) -> None:
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("SAE_EXPLORER_RUNS_DIR", str(runs))
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=120)
    at.query_params["run"] = "ref"
    at.run()
    assert not at.exception
    errors = [e.value for e in at.error]
    assert any("is incomplete" in e or "No runs found" in e for e in errors), errors
