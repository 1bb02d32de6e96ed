"""The precompute on Ray (precompute/distributed.py), on a real local Ray cluster.

A module fixture starts `ray start --head` on 127.0.0.1 with 2 CPUs (2 worker processes) in its
own process group, and stops that group afterwards. Each test runs the CLI as a separate driver
process (`python -m precompute run --ray ADDRESS --shards N`) and compares the run it writes with
a single-process run of the same config: counts, examples and everything not a float64 sum are
compared exactly, floats to rtol 1e-9 (tests/test_precompute.assert_runs_equal).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from benchmarks._common import stop_process_group

from explorer import schema
from precompute import run as run_mod
from precompute.config import RunConfig
from tests.test_precompute import assert_runs_equal, tiny_config_text, write_tiny_corpus

ray = pytest.importorskip("ray")
REPO = Path(__file__).resolve().parent.parent
# one xdist worker runs every Ray test (tests/test_benchmarks_wide_smoke.py::test_b8_smoke too): a test here
# finds its shard tasks by their process names, which another test's Ray workers would share
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]
# Ray on loopback only (its single-machine mode: every Ray address is 127.0.0.1), no usage stats,
# and no token (a test cluster on this machine's loopback)
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray head on 127.0.0.1 with 2 CPUs; yields its address; stopped by process group."""
    port = _free_port()
    tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay short
    log = open(Path(tmp) / "ray-start.log", "w")
    cmd = [
        sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
        "--num-cpus", "2", "--num-gpus", "0", "--object-store-memory", str(256 * 2**20), "--include-dashboard", "false",
        "--disable-usage-stats", "--temp-dir", tmp,
    ]
    env = {**os.environ, **RAY_ENV}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    address = f"127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        if proc.poll() is not None:
            pytest.fail(f"ray start exited ({proc.returncode}): {(Path(tmp) / 'ray-start.log').read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            if time.time() > deadline:
                pytest.fail("the Ray head did not come up in 120 s")
            time.sleep(0.5)
    time.sleep(3)  # the raylet registers after the GCS listens
    yield address
    stop_process_group(proc, grace_s=3)  # the head's process group (ray start, GCS, raylet, workers); what outlives 3 s of SIGTERM is killed
    log.close()
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def setup(tiny_demo, tmp_path_factory):
    d = tmp_path_factory.mktemp("ray")
    corpus = write_tiny_corpus(tiny_demo, d / "corpus.parquet")
    cfg_path = d / "ray.toml"
    cfg_path.write_text(tiny_config_text(tiny_demo, corpus, run_id="ray"))
    single = run_mod.run(RunConfig.from_toml(cfg_path), runs_dir=d / "single", progress=False)
    return {"dir": d, "cfg": cfg_path, "single": single, "n_batches": 6}


def _driver(cfg: Path, runs: Path, address: str, shards: int, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "precompute", "run", "--config", str(cfg), "--runs-dir", str(runs), "--ray", address, "--shards", str(shards),
           "--no-progress", "--threads", "1", *extra]
    env = {**os.environ, **RAY_ENV, "PYTHONPATH": str(REPO), "PRECOMPUTE_RAY_SCRATCH": str(runs.parent / "scratch")}
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def test_ray_run_equals_single_process_and_resumes_after_the_driver_is_killed(ray_cluster, setup, tmp_path):
    """4 shards on 2 workers, states through --storage: the driver is killed once a shard is
    finished; the same command again runs only the missing shards; the merged run equals the
    single-process run."""
    runs, storage = tmp_path / "runs", tmp_path / "states"
    proc = _driver(setup["cfg"], runs, ray_cluster, 4, "--storage", str(storage), "--batch-delay", "2")
    shards = runs / "ray" / "shards"
    deadline = time.time() + 400
    while not list(shards.glob("*/COMPLETE.json")):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline, "no shard finished in 400 s"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver (and anything it started), not the cluster
    proc.wait(timeout=30)
    done_before = sorted(p.parent.name for p in shards.glob("*/COMPLETE.json"))
    assert 1 <= len(done_before) < 4, done_before
    assert not (runs / "ray" / schema.MANIFEST).exists()

    out = _finish(_driver(setup["cfg"], runs, ray_cluster, 4, "--storage", str(storage)))
    n_resumed = 4 - sum(f"shard {i}/4 starts" in out for i in range(4))
    assert n_resumed >= len(done_before), out[-3000:]  # finished shards were not run again
    assert f"of 4 shards already finished" in out
    merged = runs / "ray"
    assert (merged / schema.MANIFEST).exists() and not (merged / "shards").exists()
    assert json.loads((merged / schema.MANIFEST).read_text())["timing"]["merged_shards"] == 4
    assert_runs_equal(setup["single"], merged)
    assert len(list(storage.rglob("*.safetensors"))) == 4  # every state went through the storage


def test_a_killed_worker_costs_only_its_shard(ray_cluster, setup, tmp_path):
    """kill -9 of one worker mid-shard: Ray retries that shard (from the worker's checkpoint when
    it has one); the other shard runs once; the run equals the single-process run."""
    runs = tmp_path / "runs"
    proc = _driver(setup["cfg"], runs, ray_cluster, 2, "--batch-delay", "1.5")
    deadline = time.time() + 400
    victim = None
    while victim is None:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline, "no shard task seen in 400 s"
        busy = []
        for p in Path("/proc").iterdir():
            if p.name.isdigit():
                try:
                    if (p / "cmdline").read_bytes().startswith(b"ray::precompute_shard"):
                        busy.append(int(p.name))
                except OSError:
                    continue
        if len(busy) == 2:
            time.sleep(4)  # both mid-stream (model loading done, a batch or so in)
            victim = busy[0]
        time.sleep(0.2)
    os.kill(victim, signal.SIGKILL)
    out = _finish(proc)
    assert f"Worker PID: {victim}" in out and "will be retried" in out, out[-3000:]  # Ray saw the death and retried the task
    for i in range(2):  # the driver got each shard's state once
        assert sum(f"shard {i}/2 finished" in line for line in out.splitlines()) == 1, out[-3000:]
    assert_runs_equal(setup["single"], runs / "ray")


def test_ray_refuses_a_bad_address_before_any_work(setup, tmp_path):
    from precompute.__main__ import main

    runs = tmp_path / "runs"
    assert main(["run", "--config", str(setup["cfg"]), "--runs-dir", str(runs), "--ray", "127.0.0.1:1", "--shards", "2", "--no-progress"]) == 2
    assert not (runs / "ray" / schema.MANIFEST).exists()
    assert main(["run", "--config", str(setup["cfg"]), "--runs-dir", str(runs), "--shards", "2"]) == 2
    assert main(["run", "--config", str(setup["cfg"]), "--runs-dir", str(runs), "--ray", "--shard", "0/2"]) == 2
