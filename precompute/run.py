"""The precompute's entry points: `run` (one pass, or one shard of it) and `merge` (the shards).

The stages, in the order data passes through them (the package docstring, precompute/__init__.py,
says the same in a few lines):

    prepare.py      load and check everything before a run directory is touched
    forward.py      each model's losses and activation at the hook (ModelRunner)
    sae_codec.py    each SAE's sparse encode and decode (SaeCodec)
    calibration.py  outlier thresholds and histogram ranges from the first sequences
    stream.py       each batch into the accumulators of the pass state, checkpointed
    pass_state.py   the accumulators, their checkpoints and shard states
    hook_cache.py   the hook activations kept for the example windows
    tables.py       finalize: the tables (feature_table.py: features.parquet; crosscoder_tables.py:
                    a crosscoder's), then the manifest

A killed run resumes from its last checkpoint when the same command is run again; a shard's
finished state waits in `shards/` for `merge`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from explorer import rundir, schema
from explorer.errors import ConfigError, RunError
from precompute.calibration import Calibration, calibrate
from precompute.config import RunConfig
from precompute.forward import runners as runners_for
from precompute.hook_cache import HOOK_ACTS_DIR, HookActsCache
from precompute.log import log
from precompute.pass_state import (
    CHECKPOINT_DIR,
    COMPLETE_MARKER,
    SHARDS_DIR,
    STATE_FILE,
    PassState,
    check_meta,
    load_state_arrays,
    pair_keys,
    read_state_meta,
    save_state,
    state_meta,
)
from precompute.prepare import Prepared, log_prepared, prepare
from precompute.stream import default_update_threads, stream
from precompute.tables import finalize


def _clear_run_dir(run_dir: Path) -> None:
    """Remove what a precompute writes in a run directory (for --overwrite): the manifest first."""
    (run_dir / schema.MANIFEST).unlink(missing_ok=True)
    for name in schema.TABLES:
        (run_dir / name).unlink(missing_ok=True)
    for sub in (CHECKPOINT_DIR, SHARDS_DIR):
        if (run_dir / sub).is_dir():
            shutil.rmtree(run_dir / sub)


def _existing_run(run_dir: Path, prep: Prepared, overwrite: bool) -> bool:
    """True when the run is already complete with this config (nothing to do)."""
    manifest = run_dir / schema.MANIFEST
    if not manifest.exists():
        return False
    try:
        old = json.loads(manifest.read_text())
        same = RunConfig.from_dict(old.get("config")).hash() == prep.cfg.hash()
    except Exception:  # noqa: BLE001 - an unreadable old manifest is just "different"
        same = False
    if same and not overwrite:
        return True
    if not overwrite:
        raise RunError(
            f"Run {prep.cfg.run_id!r} already exists at {run_dir} with a different config. Choose another run_id, "
            "or pass --overwrite to replace it."
        )
    return False


def run(
    cfg: RunConfig,
    runs_dir: Path | str = rundir.DEFAULT_RUNS_DIR,
    shard: tuple[int, int] | None = None,
    checkpoint_every: int = 25,
    device: str = "cpu",
    overwrite: bool = False,
    progress: bool = True,
    batch_delay: float = 0.0,
    update_threads: int | None = None,
) -> Path:
    """Compute a run (or one shard of it). Returns the run directory. update_threads: threads for
    the sparse accumulators (precompute.stream.BatchUpdates; None: stream.default_update_threads);
    the run is bitwise the same for any number."""
    prep = prepare(cfg, device)
    run_dir = rundir.run_path(prep.cfg.run_id, runs_dir)
    if run_dir.exists() and overwrite:
        _clear_run_dir(run_dir)
    if run_dir.exists() and _existing_run(run_dir, prep, overwrite):
        log(f"run {prep.cfg.run_id!r} is already complete at {run_dir}; nothing to do.")
        return run_dir
    n_batches = prep.n_batches
    if shard is not None:
        i, n = shard
        batch_range = shard_range(n_batches, shard)
        work = run_dir / SHARDS_DIR / f"{i}-of-{n}"
        if (work / COMPLETE_MARKER).exists():
            check_meta(read_state_meta(work / STATE_FILE), prep, work / STATE_FILE)
            log(f"shard {i}/{n} of {prep.cfg.run_id!r} is already complete; run `python -m precompute merge {prep.cfg.run_id}` when all are.")
            return run_dir
        ckpt = work / CHECKPOINT_DIR / STATE_FILE
    else:
        batch_range = (0, n_batches)
        ckpt = run_dir / CHECKPOINT_DIR / STATE_FILE

    log_prepared(prep)
    runners = runners_for(prep.pair, prep.cfg.hook)
    calib = calibrate(prep, runners)
    run_dir.mkdir(parents=True, exist_ok=True)
    state, timing = stream_range(prep, runners, calib, pair_keys(prep), batch_range, ckpt, shard, checkpoint_every, progress, batch_delay, update_threads)
    processed, stream_s = timing["stream_tokens"], timing["stream_seconds"]
    if shard is not None:
        work = ckpt.parent.parent
        save_state(work / STATE_FILE, state, {**state_meta(prep, calib, state, shard, True), "timing": timing})
        if (ckpt.parent / HOOK_ACTS_DIR).is_dir():  # kept for the merge's example windows
            shutil.rmtree(work / HOOK_ACTS_DIR, ignore_errors=True)
            os.replace(ckpt.parent / HOOK_ACTS_DIR, work / HOOK_ACTS_DIR)
        rundir.atomic_write_bytes(work / COMPLETE_MARKER, json.dumps({"config_hash": prep.cfg.hash(), "shard": list(shard)}).encode())
        shutil.rmtree(ckpt.parent, ignore_errors=True)
        log(f"shard {shard[0]}/{shard[1]} done ({processed:,} tokens in {stream_s:.0f} s)")
        return run_dir
    for stale in run_dir.glob(".*.tmp"):  # temporary table/manifest files of a process killed mid-write
        stale.unlink(missing_ok=True)
    finalize(prep, runners, state, calib, run_dir, timing, HookActsCache([run_dir / CHECKPOINT_DIR / HOOK_ACTS_DIR]))
    shutil.rmtree(run_dir / CHECKPOINT_DIR, ignore_errors=True)
    return run_dir


def stream_range(prep: Prepared, runners, calib: Calibration, keys, batch_range: tuple[int, int], ckpt: Path, shard: tuple[int, int] | None,
                 checkpoint_every: int = 25, progress: bool = True, batch_delay: float = 0.0, update_threads: int | None = None) -> tuple[PassState, dict]:
    """Stream batches [batch_range) into a new pass state, resuming from the checkpoint `ckpt` when
    it exists (and fits); returns the state and the stream's timing. Used by `run` and by the
    shard tasks of `precompute.distributed`."""
    state = PassState(prep, calib, keys, batch_range)
    if ckpt.exists():
        meta = read_state_meta(ckpt)
        check_meta(meta, prep, ckpt)
        if meta["calibration"] != json.loads(json.dumps(calib.to_dict())) or (meta["batch_start"], meta["batch_end"]) != tuple(batch_range):
            raise RunError(f"The checkpoint {ckpt} does not fit this run (calibration or batch range differ). Delete it and run again.")
        state.load_arrays(load_state_arrays(ckpt))
        state.next_batch = int(meta["next_batch"])
        log(f"resuming {prep.cfg.run_id!r} from its checkpoint at batch {state.next_batch}/{batch_range[1]}")
    if update_threads is None:
        import torch

        update_threads = default_update_threads(prep.device, torch.get_num_threads())
    t0, c0 = time.time(), time.process_time()
    processed = stream(prep, runners, state, calib, ckpt, shard, checkpoint_every, progress, batch_delay, update_threads)
    stream_s = time.time() - t0
    timing = {"stream_seconds": stream_s, "stream_cpu_seconds": time.process_time() - c0, "stream_tokens": processed, "tokens_per_second": processed / stream_s if stream_s > 0 else None,
              "update_threads": update_threads}
    return state, timing


def shard_range(n_batches: int, shard: tuple[int, int]) -> tuple[int, int]:
    """Batches [lo, hi) of shard i of n (shards are cut at batch boundaries)."""
    i, n = shard
    if n > n_batches:
        raise ConfigError(f"--shard {i}/{n}: the sample has only {n_batches} batches; use at most {n_batches} shards.")
    return i * n_batches // n, (i + 1) * n_batches // n


def _config_dir(meta: dict) -> Path | None:
    """The folder a shard's config resolved its paths against (prepare.input_fingerprints)."""
    from precompute.config import REPO_ROOT

    d = (meta.get("inputs") or {}).get("config_dir")
    return None if d is None else (Path(d) if Path(d).is_absolute() else REPO_ROOT / d)


def _shard_dirs(run_dir: Path) -> list[Path]:
    root = run_dir / SHARDS_DIR
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def merge(run_id: str, runs_dir: Path | str = rundir.DEFAULT_RUNS_DIR, device: str = "cpu") -> Path:
    """Merge the complete shard states of a run into the run directory."""
    run_dir = rundir.run_path(run_id, runs_dir)
    shards = _shard_dirs(run_dir)
    if not shards:
        raise RunError(f"Run {run_id!r} has no shards in {run_dir / SHARDS_DIR}. Run `python -m precompute run --config X --shard I/N` first.")
    metas = []
    for d in shards:
        if not (d / COMPLETE_MARKER).exists():
            raise RunError(f"Shard {d.name} of run {run_id!r} is not complete. Run it again (it resumes), then merge.")
        metas.append((d, read_state_meta(d / STATE_FILE)))
    counts = {tuple(m["shard"])[1] for _, m in metas}
    hashes = {m["config_hash"] for _, m in metas}
    if len(counts) != 1 or len(hashes) != 1:
        raise RunError(f"The shards of run {run_id!r} come from different configs or shard counts ({sorted(d.name for d in shards)}). Delete the stray ones.")
    n = counts.pop()
    have = sorted(m["shard"][0] for _, m in metas)
    if have != list(range(n)):
        missing = sorted(set(range(n)) - set(have))
        raise RunError(f"Run {run_id!r} has shards {have} of {n}; missing {missing}. Run them, then merge.")
    metas.sort(key=lambda dm: dm[1]["shard"][0])
    cfg = RunConfig.from_dict(metas[0][1]["config"], base_dir=_config_dir(metas[0][1]))
    prep = prepare(cfg, device)
    for d, meta in metas:
        check_meta(meta, prep, d / STATE_FILE)
    if (run_dir / schema.MANIFEST).exists():
        log(f"run {run_id!r} is already complete at {run_dir}; nothing to do.")
        return run_dir
    calib = Calibration(**{k: v for k, v in metas[0][1]["calibration"].items()})
    runners = runners_for(prep.pair, prep.cfg.hook)
    keys = pair_keys(prep)
    state = None
    expected = 0
    stream_s, stream_tokens = 0.0, 0
    for d, meta in metas:
        if meta["calibration"] != metas[0][1]["calibration"]:
            raise RunError(f"Shard {d.name} was calibrated differently from shard 0 (different hardware or code?). Rerun the shards on one setup.")
        if meta["batch_start"] != expected or meta["next_batch"] != meta["batch_end"]:
            raise RunError(f"Shard {d.name} covers batches {meta['batch_start']}..{meta['next_batch']}, expected to start at {expected}.")
        expected = meta["batch_end"]
        part = PassState(prep, calib, keys, (meta["batch_start"], meta["batch_end"]))
        part.load_arrays(load_state_arrays(d / STATE_FILE))
        if state is None:
            state = part
        else:
            state.merge(part)
        stream_s += meta.get("timing", {}).get("stream_seconds", 0.0)
        stream_tokens += meta.get("timing", {}).get("stream_tokens", 0)
    if expected != prep.n_batches:
        raise RunError(f"The shards of run {run_id!r} cover batches 0..{expected}, not all {prep.n_batches}.")
    state.batch_start, state.batch_end, state.next_batch = 0, prep.n_batches, prep.n_batches
    timing = {"stream_seconds": stream_s, "stream_tokens": stream_tokens, "tokens_per_second": stream_tokens / stream_s if stream_s else None, "merged_shards": n}
    finalize(prep, runners, state, calib, run_dir, timing, HookActsCache([d / HOOK_ACTS_DIR for d, _ in metas]))
    shutil.rmtree(run_dir / SHARDS_DIR, ignore_errors=True)
    return run_dir

