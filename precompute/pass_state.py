"""Stage 4a, the pass state: every accumulator of a run (`PassState`), and its checkpoints and shard
states on disk (safetensors arrays + JSON metadata; no pickle), written atomically.

A run directory while it is being computed:
    <run>/.checkpoint/state.safetensors         the single pass's checkpoint (and its hook_acts/)
    <run>/shards/<i>-of-<n>/state.safetensors   a finished shard's state, with COMPLETE.json
    <run>/shards/<i>-of-<n>/.checkpoint/...     a shard's checkpoint while it runs
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from explorer import rundir, schema
from explorer.errors import ConfigError, RunError
from precompute.accumulators import (
    CrossProducts,
    FeatureStats,
    KLCorrStats,
    PairStats,
    QualityStats,
    QuantileSample,
    ResidStats,
    TokenStats,
    TopK,
    _Stateful,
)
from precompute.calibration import Calibration
from precompute.config import STATE_VERSION
from precompute.crosscoder_stats import CrosscoderStats
from precompute.prepare import Prepared

MODELS = schema.MODELS
CHECKPOINT_DIR = ".checkpoint"
SHARDS_DIR = "shards"
STATE_FILE = "state.safetensors"
COMPLETE_MARKER = "COMPLETE.json"



class PassState:
    def __init__(self, prep: Prepared, calib: Calibration, pair_keys: dict[str, np.ndarray | None], batch_range: tuple[int, int]):
        cfg = prep.cfg
        self.sae_names = cfg.sae_names
        self.twin = cfg.twin
        self.n_sources = S = prep.n_sources
        self.d_sae = {s: int(prep.pair.saes[s].cfg.d_sae) for s in self.sae_names}
        d_in = int(prep.pair.saes["base_sae"].cfg.d_in)
        ex = cfg.examples
        self.features = {(s, m): FeatureStats(self.d_sae[s], schema.ACT_HIST_EDGES, S) for s in self.sae_names for m in MODELS}
        self.topk = {(s, m): TopK(self.d_sae[s], ex.n_top) for s in self.sae_names for m in MODELS}
        self.quantile = {(s, m): QuantileSample(self.d_sae[s], ex.quantile_sample, cfg.sample.seed) for s in self.sae_names for m in MODELS}
        self.quality = {(s, m): QualityStats(d_in, S) for s in self.sae_names for m in MODELS}
        self.pairs = {s: PairStats(self.d_sae[s], cfg.thresholds.act_error_eps, S) for s in self.sae_names}
        self.kl_corr = {s: KLCorrStats(self.d_sae[s]) for s in self.sae_names}
        # cross products of base_sae (on base) with the finetuned SAE (on finetuned) and with the twin (on base)
        others = {s: self.d_sae[s] for s in self.sae_names if s != "base_sae"}
        if self.twin is not None:
            others[self.twin] = prep.d_twin
        self.cross = {s: CrossProducts(self.d_sae["base_sae"], d, pair_keys.get(s)) for s, d in others.items()}
        self.twin_features = FeatureStats(prep.d_twin, schema.ACT_HIST_EDGES) if self.twin is not None else None
        self.resid = ResidStats(cfg.sample.context_size, calib.l2_max, schema.RESID_HIST_BINS, schema.COSINE_RANGE)
        cc = cfg.crosscoder  # issue 16
        self.crosscoder = (
            CrosscoderStats(prep.crosscoder.d_sae, prep.crosscoder.d_in, cc.n_top, cc.quantile_sample, cfg.sample.seed) if cc is not None else None
        )
        self.tokens = TokenStats(prep.sample.n_sequences, cfg.sample.context_size)
        self.batch_start, self.batch_end = batch_range
        self.next_batch = self.batch_start

    def accumulators(self) -> dict[str, _Stateful]:
        out: dict[str, _Stateful] = {}
        for kind in ("features", "topk", "quantile", "quality"):
            for (s, m), acc in getattr(self, kind).items():
                out[f"{kind}.{s}.{m}"] = acc
        for kind in ("pairs", "kl_corr", "cross"):
            for s, acc in getattr(self, kind).items():
                out[f"{kind}.{s}"] = acc
        if self.twin_features is not None:
            out["twin_features"] = self.twin_features
        out["resid"] = self.resid
        out["tokens"] = self.tokens
        if self.crosscoder is not None:
            out.update(self.crosscoder.accumulators())
        return out

    def arrays(self) -> dict[str, np.ndarray]:
        return {f"{name}/{k}": v for name, acc in self.accumulators().items() for k, v in acc.state().items()}

    def load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        for name, acc in self.accumulators().items():
            prefix = f"{name}/"
            acc.load({k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)})

    def merge(self, other: "PassState") -> None:
        mine, theirs = self.accumulators(), other.accumulators()
        for name, acc in mine.items():
            acc.merge(theirs[name])


def pair_keys(prep: Prepared) -> dict[str, np.ndarray | None]:
    """Per other SAE matched with base_sae: None (all pairs) or the candidate pairs' keys (large
    dictionaries: top decoder cosines both ways; for the twin also the random pairs of the score choice)."""
    from precompute.baseline import random_pair_keys
    from precompute.weights import candidate_pair_keys, unit_rows

    saes = prep.pair.saes
    others = {s: saes[s] for s in prep.cfg.sae_names if s != "base_sae"}
    if prep.twin is not None:
        others[prep.cfg.twin] = prep.twin
    d_a = int(saes["base_sae"].cfg.d_sae)
    out: dict[str, np.ndarray | None] = {}
    for name, sae in others.items():
        d_b = int(sae.cfg.d_sae)
        if max(d_a, d_b) <= prep.cfg.matching.max_all_pairs_d_sae:
            out[name] = None
            continue
        keys = candidate_pair_keys(unit_rows(saes["base_sae"].W_dec), unit_rows(sae.W_dec), prep.cfg.matching.n_candidates, prep.device)
        if name == prep.cfg.twin:
            keys = np.union1d(keys, random_pair_keys(d_a, d_b, prep.cfg.sample.seed))
        out[name] = keys
    return out



def save_state(path: Path, state: PassState, meta: dict[str, Any]) -> None:
    """Write atomically: a kill at any moment leaves the previous file or the new one."""
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(state.arrays(), str(tmp), metadata={"meta": json.dumps(meta, sort_keys=True)})
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    rundir._fsync_dir(path.parent)


def read_state_meta(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "np") as fh:
            return json.loads((fh.metadata() or {})["meta"])
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same problem for the user
        raise RunError(f"The saved state {path} is unreadable ({type(exc).__name__}: {exc}). Delete it and run again.") from None


def load_state_arrays(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path))


def state_meta(prep: Prepared, calib: Calibration, state: PassState, shard: tuple[int, int] | None, complete: bool) -> dict[str, Any]:
    return {
        "state_version": STATE_VERSION,
        "config_hash": prep.cfg.hash(),
        "config": prep.cfg.to_dict(),
        "inputs": prep.inputs,
        "calibration": calib.to_dict(),
        "batch_start": state.batch_start,
        "batch_end": state.batch_end,
        "next_batch": state.next_batch,
        "n_batches": prep.n_batches,
        "shard": list(shard) if shard else None,
        "complete": complete,
    }


def check_meta(meta: dict[str, Any], prep: Prepared, path: Path) -> None:
    if meta.get("state_version") != STATE_VERSION:
        raise RunError(f"{path} was written by another version of the precompute (state version {meta.get('state_version')}). Delete it and run again.")
    if meta.get("config_hash") != prep.cfg.hash():
        raise ConfigError(
            f"{path} holds the state of a run with a different config under the same run id {prep.cfg.run_id!r}. "
            "Use another run_id, restore the original config, or pass --overwrite to start this run from scratch."
        )
    if meta.get("inputs") != prep.inputs:
        changed = sorted(k for k in set(meta.get("inputs") or {}) | set(prep.inputs) if (meta.get("inputs") or {}).get(k) != prep.inputs.get(k))
        raise RunError(
            f"{path} was computed from other input files: {changed} changed since. Pass --overwrite to start "
            "this run from scratch (mixing the two would give wrong statistics)."
        )

