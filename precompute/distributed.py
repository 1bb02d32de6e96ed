"""Entry point: one run's shards as Ray tasks, their states merged in a tree, then finalized here.

    python -m precompute run --config X --ray --shards 8                 # a local Ray instance on this machine
    python -m precompute run --config X --ray 10.0.0.5:6379 --shards 64  # an existing cluster (`ray start --head` there)
    python -m precompute run --config X --ray auto --shards 64 --storage s3://bucket/states

How it runs (`run_on_ray`):
  1. The driver (this process) loads and checks everything (`prepare`), calibrates once, and
     computes the candidate pairs for two-SAE matching once; every shard gets the same values.
  2. Shard i of N (batches cut as `--shard i/N` cuts them) is one Ray task: one GPU per task when
     `--device` is cuda, `--threads` CPUs otherwise. The task loads the models on its worker,
     streams its batches (checkpointing on the worker's own disk, so a retry on the same node
     resumes), and returns its accumulator state as safetensors bytes (no pickle) through Ray's
     object store, or writes it to `--storage` (a local path or a pyarrow filesystem URI such as
     s3://, gs://, hdfs://) and returns its location. No shared filesystem is needed for states.
  3. The driver persists each finished state in the run directory's shards/<i>-of-<N>/ (with
     COMPLETE.json), so the same command run again after the driver was killed resumes from the
     finished shards; a shard state found in `--storage` counts as finished too.
  4. States are merged in a fixed binary tree ((0+1)+(2+3))+... as soon as both children exist,
     reading them back from shards/ (memory: a few states, not N), then `tables.finalize` writes
     the run as a single pass would. The example windows are recomputed on the driver (the
     shards' hook activations stay on their workers).

A worker that dies mid-shard costs only that shard: Ray retries the task (`max_retries`), from the
worker's checkpoint when it lands on the same node. An error in the inputs (an ExplorerError
raised in a task) is not retried; it is reported as the single-process run reports it.

Equality with a single process: counts, top-k and quantile examples, histograms and everything
built from them are bitwise equal; float64 sums (means, variances, correlations, CE and quality
sums) are added in another order, so they agree to float64 rounding (rtol 1e-9 in the tests),
not bitwise. The models, SAEs and corpus must be readable on every worker at the paths (or hub
ids) the config names, and the repository importable there (the tasks put the driver's
repository path on PYTHONPATH; on a multi-node cluster keep a checkout at the same path on every
node, see README.md).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from explorer import rundir
from explorer.errors import ConfigError, ExplorerError, RunError
from precompute.calibration import Calibration, calibrate
from precompute.config import REPO_ROOT, RunConfig
from precompute.forward import runners as runners_for
from precompute.hook_cache import HOOK_CACHE_MB_ENV, HookActsCache
from precompute.log import log
from precompute.pass_state import (
    COMPLETE_MARKER,
    SHARDS_DIR,
    STATE_FILE,
    PassState,
    check_meta,
    load_state_arrays,
    pair_keys,
    read_state_meta,
    state_meta,
)
from precompute.prepare import Prepared, prepare

RAY_TMP_ENV = "PRECOMPUTE_RAY_SCRATCH"  # where shard tasks checkpoint on their worker (default: the system temp dir)
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
CHILD_ENV_KEYS = ("RAY_AUTH_MODE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "HF_TOKEN", "SAE_LENS_CACHE", HOOK_CACHE_MB_ENV, RAY_TMP_ENV)


# ----------------------------------------------------------------------------------------------
# State bytes and storage


def state_bytes(state: PassState, meta: dict[str, Any]) -> bytes:
    from safetensors.numpy import save

    return save(state.arrays(), metadata={"meta": json.dumps(meta, sort_keys=True)})


def _state_from_bytes(blob: bytes) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    from safetensors.numpy import load

    meta = None
    try:
        arrays = load(blob)
        header_len = int.from_bytes(blob[:8], "little")
        meta = json.loads(json.loads(blob[8 : 8 + header_len])["__metadata__"]["meta"])
    except Exception as exc:  # noqa: BLE001 - a damaged blob is one problem for the user
        raise RunError(f"A shard state came back unreadable ({type(exc).__name__}: {exc}). Run the command again.") from None
    return arrays, meta


def _storage(uri: str):
    """(pyarrow filesystem, base path) for a storage URI or a local path."""
    import pyarrow.fs as pafs

    if "://" not in uri:
        path = Path(uri).expanduser().resolve()
        return pafs.LocalFileSystem(), str(path)
    try:
        fs, base = pafs.FileSystem.from_uri(uri)
    except Exception as exc:  # noqa: BLE001 - any unsupported scheme or missing credentials
        raise ConfigError(f"--storage {uri!r}: pyarrow cannot open it ({exc}).") from None
    return fs, base.rstrip("/")


def _storage_key(cfg: RunConfig, shard: tuple[int, int]) -> str:
    return f"{cfg.run_id}-{cfg.hash()[:16]}/{shard[0]}-of-{shard[1]}.safetensors"


def _storage_write(uri: str, key: str, blob: bytes) -> str:
    fs, base = _storage(uri)
    path = f"{base}/{key}"
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with fs.open_output_stream(tmp) as fh:
        fh.write(blob)
    fs.move(tmp, path)  # atomic on a local disk; object stores write whole objects anyway
    return path


def _storage_read(uri: str, key: str) -> bytes | None:
    import pyarrow.fs as pafs

    fs, base = _storage(uri)
    path = f"{base}/{key}"
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as fh:
        return fh.read()


# ----------------------------------------------------------------------------------------------
# The shard task (runs on a Ray worker)


def shard_task(cfg_dict: dict, shard: tuple[int, int], calib_dict: dict, keys_bytes: dict[str, bytes | None], device: str, threads: int | None,
               storage: str | None, batch_delay: float = 0.0, base_dir: str | None = None) -> dict[str, Any]:
    """Stream one shard on this worker; returns {"state": bytes} or {"storage": path}, plus timing."""
    import torch

    from precompute import run as run_mod

    if threads:
        torch.set_num_threads(threads)
    log(f"shard {shard[0]}/{shard[1]} starts on pid {os.getpid()}")
    old = os.environ.get(HOOK_CACHE_MB_ENV)
    os.environ[HOOK_CACHE_MB_ENV] = "0"  # the driver cannot read this worker's disk: windows are recomputed there
    try:
        cfg = RunConfig.from_dict(cfg_dict, base_dir=base_dir)  # relative paths: the driver's config folder (the same path on every node)
        prep = prepare(cfg, device)
        calib = Calibration(**calib_dict)
        keys = {name: None if b is None else np.frombuffer(b, np.int64).copy() for name, b in keys_bytes.items()}  # pass_state.pair_keys
        batch_range = run_mod.shard_range(prep.n_batches, shard)
        scratch = Path(os.environ.get(RAY_TMP_ENV) or tempfile.gettempdir()) / "precompute-ray" / f"{cfg.run_id}-{cfg.hash()[:16]}" / f"{shard[0]}-of-{shard[1]}"
        ckpt = scratch / STATE_FILE
        runners = runners_for(prep.pair, prep.cfg.hook)
        # the sparse updates: on a GPU task the default (the node's cores less one, up to 8); on a CPU
        # task one thread, not the node's idle cores (other tasks hold them)
        update_threads = None if str(prep.device).startswith("cuda") else 1
        state, timing = run_mod.stream_range(prep, runners, calib, keys, batch_range, ckpt, shard, 25, False, batch_delay, update_threads)
        blob = state_bytes(state, {**state_meta(prep, calib, state, shard, True), "timing": timing})
        shutil.rmtree(scratch, ignore_errors=True)
    finally:
        if old is None:
            os.environ.pop(HOOK_CACHE_MB_ENV, None)
        else:
            os.environ[HOOK_CACHE_MB_ENV] = old
    log(f"shard {shard[0]}/{shard[1]} done ({timing['stream_tokens']:,} tokens in {timing['stream_seconds']:.0f} s)")
    if storage:
        return {"storage": _storage_write(storage, _storage_key(cfg, shard), blob), "timing": timing}
    return {"state": blob, "timing": timing}


# ----------------------------------------------------------------------------------------------
# The driver


def _probe(address: str | None) -> None:
    """A host:port address must accept a connection (Ray's own connect retries for a minute)."""
    import socket

    if not address or address in ("local", "auto") or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--ray {address!r}: expected host:port (e.g. 10.0.0.5:6379), auto, or ray://host:port.")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise ConfigError(f"--ray {address}: no Ray cluster answers there ({exc.strerror or exc}). Start one with `ray start --head` or leave ADDRESS out for a local one.") from None


def _connect(address: str | None, device: str) -> None:
    import ray

    env = {k: os.environ[k] for k in CHILD_ENV_KEYS if k in os.environ}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    kwargs: dict[str, Any] = {"runtime_env": {"env_vars": env}, "log_to_driver": True, "logging_level": logging.WARNING}
    if address in (None, "", "local"):
        kwargs["include_dashboard"] = False
    else:
        kwargs["address"] = address
    try:
        ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ConfigError(f"--ray {address or ''}: could not start or reach a Ray cluster ({exc}).".replace("  ", " ")) from None
    if device.startswith("cuda") and not ray.cluster_resources().get("GPU"):
        raise ConfigError("--device cuda with --ray: the Ray cluster has no GPU (ray.cluster_resources() lists none).")


def _work_dir(run_dir: Path, shard: tuple[int, int]) -> Path:
    return run_dir / SHARDS_DIR / f"{shard[0]}-of-{shard[1]}"


def _persist(run_dir: Path, prep: Prepared, shard: tuple[int, int], blob: bytes) -> dict:
    """Write a finished shard's state into shards/<i>-of-<n>/ (state first, COMPLETE.json last)."""
    arrays, meta = _state_from_bytes(blob)
    del arrays
    work = _work_dir(run_dir, shard)
    check_meta(meta, prep, work / STATE_FILE)
    work.mkdir(parents=True, exist_ok=True)
    rundir.atomic_write_bytes(work / STATE_FILE, blob)
    rundir.atomic_write_bytes(work / COMPLETE_MARKER, json.dumps({"config_hash": prep.cfg.hash(), "shard": list(shard)}).encode())
    return meta


def _finished(run_dir: Path, prep: Prepared, shard: tuple[int, int]) -> dict | None:
    work = _work_dir(run_dir, shard)
    if not (work / COMPLETE_MARKER).exists():
        return None
    meta = read_state_meta(work / STATE_FILE)
    check_meta(meta, prep, work / STATE_FILE)
    return meta


class _TreeMerge:
    """Shard states merged in a fixed binary tree as they arrive: node j of a level pairs with its
    sibling j ^ 1 ((0+1)+(2+3))+..., so the merge order, and with it every float64 sum, never
    depends on which shard finished first. A leaf is read from shards/ only when its sibling is
    ready, so the driver holds a few states at a time, not N."""

    def __init__(self, prep: Prepared, calib: Calibration, keys, run_dir: Path, n: int, calib_dict: dict):
        self.prep, self.calib, self.keys, self.run_dir, self.n, self.calib_dict = prep, calib, keys, run_dir, n, calib_dict
        self.waiting: dict[tuple[int, int], Any] = {}  # (level, node) -> PassState, or ("leaf", i) not read yet
        self.metas: dict[int, dict] = {}
        self.top: PassState | None = None

    def _get(self, node) -> PassState:
        if not isinstance(node, tuple):
            return node
        i = node[1]
        meta = self.metas[i]
        if meta["calibration"] != self.calib_dict:
            raise RunError(f"Shard {i}/{self.n} was calibrated differently from this run (another machine or code?). Delete {self.run_dir / SHARDS_DIR} and run again.")
        part = PassState(self.prep, self.calib, self.keys, (meta["batch_start"], meta["batch_end"]))
        part.load_arrays(load_state_arrays(_work_dir(self.run_dir, (i, self.n)) / STATE_FILE))
        part.next_batch = int(meta["next_batch"])
        return part

    def add(self, i: int, meta: dict) -> None:
        self.metas[i] = meta
        level, j, node, width = 0, i, ("leaf", i), self.n
        while width > 1:
            sib = j ^ 1
            if sib < width:
                other = self.waiting.pop((level, sib), None)
                if other is None:
                    self.waiting[(level, j)] = node
                    return
                left, right = (self._get(node), self._get(other)) if j < sib else (self._get(other), self._get(node))
                left.merge(right)
                left.batch_end, left.next_batch = right.batch_end, right.next_batch
                node = left
            level, j, width = level + 1, j // 2, (width + 1) // 2
        self.top = self._get(node)

    def result(self) -> PassState | None:
        return self.top if len(self.metas) == self.n else None


def run_on_ray(cfg: RunConfig, runs_dir: Path | str = rundir.DEFAULT_RUNS_DIR, address: str | None = None, n_shards: int = 2,
               device: str = "cpu", threads: int | None = None, overwrite: bool = False, storage: str | None = None,
               max_retries: int = 3, batch_delay: float = 0.0) -> Path:
    """Compute a run as `n_shards` Ray tasks; returns the run directory (see the module docstring)."""
    from precompute import run as run_mod
    from precompute.tables import finalize

    if n_shards < 1:
        raise ConfigError(f"--shards must be at least 1, got {n_shards}.")
    if address in (None, "", "local"):  # a local instance listens on loopback only (Ray's single-machine mode; read when ray is imported)
        os.environ.setdefault(LOOPBACK_ENV, "0")
    if not ray_available():
        raise ConfigError("--ray needs the `ray` package (pinned in requirements.txt: pip install -r requirements.txt).")
    if storage:
        _storage(storage)  # a bad URI fails before any work
    _probe(address)
    import torch

    if device == "auto":  # the workers' device: a GPU where the cluster has one
        device = "cuda" if torch.cuda.is_available() else "cpu"
    driver_device = device
    if device.startswith("cuda") and not torch.cuda.is_available():
        driver_device = "cpu"  # the driver may be a CPU-only head node; finalize runs there
    prep = prepare(cfg, driver_device)
    run_dir = rundir.run_path(prep.cfg.run_id, runs_dir)
    if run_dir.exists() and overwrite:
        run_mod._clear_run_dir(run_dir)
    if run_dir.exists() and run_mod._existing_run(run_dir, prep, overwrite):
        log(f"run {prep.cfg.run_id!r} is already complete at {run_dir}; nothing to do.")
        return run_dir
    run_mod.shard_range(prep.n_batches, (0, n_shards))  # at most one shard per batch
    stale = [d for d in (run_dir / SHARDS_DIR).glob("*-of-*") if not d.name.endswith(f"-of-{n_shards}")] if (run_dir / SHARDS_DIR).is_dir() else []
    if stale:
        raise RunError(f"{run_dir / SHARDS_DIR} holds shards of another shard count ({sorted(d.name for d in stale)[:3]}). Use --shards as before, or --overwrite.")
    runners = runners_for(prep.pair, prep.cfg.hook)
    calib = calibrate(prep, runners)
    calib_dict = json.loads(json.dumps(calib.to_dict()))
    keys = pair_keys(prep)
    tree = _TreeMerge(prep, calib, keys, run_dir, n_shards, calib_dict)
    todo = []
    for i in range(n_shards):
        meta = _finished(run_dir, prep, (i, n_shards))
        if meta is None and storage:
            blob = _storage_read(storage, _storage_key(prep.cfg, (i, n_shards)))
            if blob is not None:
                meta = _persist(run_dir, prep, (i, n_shards), blob)
        if meta is None:
            todo.append(i)
        else:
            tree.add(i, meta)
    if n_shards - len(todo):
        log(f"{n_shards - len(todo)} of {n_shards} shards already finished; running {len(todo)}")
    t0 = time.time()
    timings: dict[int, dict] = {i: tree.metas[i].get("timing", {}) for i in tree.metas}
    if todo:
        import ray

        _connect(address, device)
        try:
            gpu = 1 if device.startswith("cuda") else 0
            task = ray.remote(shard_task).options(num_cpus=threads or 1, num_gpus=gpu, max_retries=max_retries, retry_exceptions=False, name="precompute_shard")
            calib_ref = calib.to_dict()
            keys_bytes = {name: None if k is None else np.ascontiguousarray(k, np.int64).tobytes() for name, k in keys.items()}
            keys_ref = ray.put(keys_bytes)
            cfg_dict = prep.cfg.to_dict()
            base_dir = str(prep.cfg.root.resolve())
            pending = {task.remote(cfg_dict, (i, n_shards), calib_ref, keys_ref, device, threads, storage, batch_delay, base_dir): i for i in todo}
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                i = pending.pop(done[0])
                try:
                    res = ray.get(done[0])
                except ray.exceptions.RayTaskError as exc:
                    cause = getattr(exc, "cause", None)
                    if isinstance(cause, ExplorerError):
                        raise type(cause)(str(cause)) from None
                    raise RunError(f"Shard {i}/{n_shards} failed on its worker: {str(exc).splitlines()[-1] if str(exc) else type(exc).__name__}") from None
                except ray.exceptions.RayError as exc:  # a worker or node lost more often than Ray retries, out of memory, ...
                    raise RunError(f"Shard {i}/{n_shards} was lost ({type(exc).__name__}, after up to {max_retries} retries); "
                                   "run the command again: finished shards are kept.") from None
                blob = res["state"] if "state" in res else _storage_read(storage, _storage_key(prep.cfg, (i, n_shards)))
                meta = _persist(run_dir, prep, (i, n_shards), blob)
                del blob, res
                timings[i] = meta.get("timing", {})
                log(f"shard {i}/{n_shards} finished ({len(tree.metas) + 1}/{n_shards})")
                tree.add(i, meta)
        finally:
            ray.shutdown()
    state = tree.result()
    if state is None:
        raise RunError(f"The shards of run {prep.cfg.run_id!r} did not merge (have {sorted(tree.metas)} of {n_shards}).")
    if state.batch_start != 0 or state.batch_end != prep.n_batches:
        raise RunError(f"The merged shards cover batches {state.batch_start}..{state.batch_end}, not 0..{prep.n_batches}.")
    stream_s = sum(t.get("stream_seconds", 0.0) for t in timings.values())
    stream_tokens = sum(t.get("stream_tokens", 0) for t in timings.values())
    timing = {
        "stream_seconds": stream_s, "stream_tokens": stream_tokens, "tokens_per_second": stream_tokens / stream_s if stream_s else None,
        "merged_shards": n_shards, "ray_wall_seconds": time.time() - t0,
    }
    for tmp in run_dir.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
    finalize(prep, runners, state, calib, run_dir, timing, HookActsCache([]))
    shutil.rmtree(run_dir / SHARDS_DIR, ignore_errors=True)
    if storage:
        log(f"shard states stay in {storage} ({prep.cfg.run_id}-{prep.cfg.hash()[:16]}/); delete them when you no longer need them")
    return run_dir


def ray_available() -> bool:
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True

