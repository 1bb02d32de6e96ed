"""The run's manifest: what was computed from what, written last (a run with a manifest is complete)."""

from __future__ import annotations

import sys
from datetime import datetime, timezone
from typing import Any

import numpy as np

from explorer import schema
from precompute.accumulators import RESID_METRIC_ORDER
from precompute.calibration import Calibration
from precompute.pass_state import PassState
from precompute.prepare import Prepared

PACKAGES = ("torch", "sae-lens", "transformer-lens", "transformers", "numpy", "scipy", "pyarrow", "safetensors")


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _jsonable(obj):
    """NaN/inf -> None, numpy -> python, recursively (the manifest is strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if np.isfinite(obj) else None
    return obj


def model_facts(model) -> dict[str, Any]:
    """What a reader of the run needs to know of a model without loading it (e.g. Neuronpedia's export)."""
    c = model.cfg
    return {
        "architecture": getattr(c, "original_architecture", None), "model_name": getattr(c, "model_name", None),
        "n_layers": int(c.n_layers), "d_model": int(c.d_model), "d_mlp": int(c.d_mlp) if getattr(c, "d_mlp", None) else None,
        "d_vocab": int(c.d_vocab), "n_ctx": int(c.n_ctx),
    }


def build_manifest(prep: Prepared, state: PassState, calib: Calibration, summary: dict, timing: dict, files: dict) -> dict[str, Any]:
    """The manifest's content (strict JSON), from the finalized pass and the tables' file entries."""
    cfg, sample = prep.cfg, prep.sample
    manifest = {
        "run_id": cfg.run_id,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "complete": True,
        "config": cfg.to_dict(),
        "packages": package_versions(),
        "tokenizer_check": prep.pair.tokenizer_comparison.to_dict(),
        "models": {m: model_facts(model) for m, model in (("base", prep.pair.base), ("finetuned", prep.pair.finetuned))},
        "inputs": prep.inputs,
        "loading": prep.pair.loading,
        "corpus": prep.corpus.to_dict() if prep.corpus is not None else None,
        "n_tokens": sample.n_tokens,
        "n_sequences": sample.n_sequences,
        "n_counted_tokens": int(state.features[(state.sae_names[0], "base")].n_tokens),
        "special_token_ids": prep.special_ids.tolist(),
        "saes": list(state.sae_names),
        "twin": state.twin,
        "sources": {name: int(state.features[(state.sae_names[0], "base")].src_n_tokens[i]) for i, name in enumerate(prep.source_names)},
        "d_sae": {**state.d_sae, **({state.twin: prep.d_twin} if state.twin else {})},
        "act_hist_edges": schema.ACT_HIST_EDGES.tolist(),
        "calibration": calib.to_dict(),
        "resid_l2_range": [0.0, calib.l2_max],
        "resid_clipped": {m: int(c) for m, c in zip(RESID_METRIC_ORDER, state.resid.clipped)},
        "summary": summary,
        "timing": timing,
        "files": files,
    }
    return _jsonable(manifest)
