"""Interrupt-and-resume: kill -9 a real `python -m precompute run` after a checkpoint, run the same
command again, and get exactly the run an uninterrupted process writes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from explorer import rundir, schema
from precompute import pass_state
from tests.test_precompute import BATCH, CTX, N_SEQ, assert_runs_equal, tiny_config_text, write_tiny_corpus

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}


def _cli(*args: str, **kw) -> list[str]:
    return [sys.executable, "-m", "precompute", *args]


def _checkpoint_batch(path: Path) -> int | None:
    if not path.exists():
        return None
    try:
        return int(pass_state.read_state_meta(path)["next_batch"])
    except Exception:  # noqa: BLE001 - being replaced right now; poll again
        return None


@pytest.mark.slow
def test_kill_9_then_rerun_resumes_and_equals_an_uninterrupted_run(tiny_demo, tmp_path):
    corpus = write_tiny_corpus(tiny_demo, tmp_path / "corpus.parquet")
    cfg = tmp_path / "ref.toml"
    cfg.write_text(tiny_config_text(tiny_demo, corpus))
    n_batches = N_SEQ // BATCH

    # uninterrupted, in its own process
    whole = tmp_path / "whole"
    done = subprocess.run(_cli("run", "--config", str(cfg), "--runs-dir", str(whole), "--no-progress"), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr

    # interrupted: slowed down so that it is surely mid-run when killed
    runs = tmp_path / "runs"
    ckpt = runs / "ref" / pass_state.CHECKPOINT_DIR / pass_state.STATE_FILE
    proc = subprocess.Popen(
        _cli("run", "--config", str(cfg), "--runs-dir", str(runs), "--checkpoint-every", "1", "--batch-delay", "1.0", "--no-progress"),
        cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            b = _checkpoint_batch(ckpt)
            if b is not None and b >= 2:
                break
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.05)
        else:
            pytest.fail("no checkpoint appeared")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    killed_at = _checkpoint_batch(ckpt)
    assert killed_at is not None and 2 <= killed_at < n_batches
    # a killed run does not look like a run
    assert not (runs / "ref" / schema.MANIFEST).exists() and rundir.list_runs(runs) == []

    # the same run id with another config refuses to touch the checkpoint
    other = tmp_path / "other.toml"
    other.write_text(cfg.read_text().replace("seed = 3", "seed = 4"))
    from precompute.__main__ import main

    assert main(["run", "--config", str(other), "--runs-dir", str(runs), "--no-progress"]) == 2
    assert _checkpoint_batch(ckpt) == killed_at

    # the same command again resumes from the checkpoint
    again = subprocess.run(_cli("run", "--config", str(cfg), "--runs-dir", str(runs), "--no-progress"), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert f"from its checkpoint at batch {killed_at}/{n_batches}" in again.stderr
    man = rundir.open_run(runs / "ref")
    # finished work was not redone: only the remaining batches were streamed
    assert man["timing"]["stream_tokens"] == (n_batches - killed_at) * BATCH * CTX
    assert not ckpt.exists()
    assert_runs_equal(whole / "ref", runs / "ref", exact_floats=True)

    # and once complete, the same command is a no-op
    third = subprocess.run(_cli("run", "--config", str(cfg), "--runs-dir", str(runs), "--no-progress"), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert third.returncode == 0 and "already complete" in third.stderr
    assert json.loads((runs / "ref" / schema.MANIFEST).read_text())["created_at"] == man["created_at"]
