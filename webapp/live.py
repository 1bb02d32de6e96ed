"""Live models for the probe page: the run's pair loaded once per process, probe results cached.

    key = pair_key(run)              # the run's model/SAE specs + hook, as canonical JSON
    pair = get_pair(key)             # st.cache_resource: loaded once per server process
    result = probe(key, "text", "def f(x):")      # st.cache_data on (key, prompt, ...)
    result = probe(key, "ids", (0, 17, 42))
    steered = steer(key, token_ids, "base_sae", 12, coef=8.0, n_new_tokens=20)

The specs come from the run's manifest: `config.models.{base,finetuned}` (ModelSpec dicts),
`config.saes.{base_sae,finetuned_sae}` (SAESpec dicts), `config.hook`, and the models load as the
run loaded them: `config.models.{dtype,processing}`, `config.allow_hook_mismatch`. Relative paths
resolve against the run's config folder (`inputs.config_dir`, itself relative to the repository
when inside it; older runs: the repository root), as in the precompute.
Device: $SAE_EXPLORER_DEVICE (cpu, cuda, mps, auto; default auto); dtype: the run's, or
$SAE_EXPLORER_DTYPE (float32, bfloat16, float16) to override it.
Two runs over the same models share one loaded pair. torch is imported only when a pair loads.
Torch threads: when a pair loads, torch's intra-op threads are set to $SAE_EXPLORER_TORCH_THREADS,
else to half the cores (at least 1), as the precompute CLI does: on a busy 2-core machine the
64-token probe takes ~45 ms with 1 thread and ~300+ ms with 2 (benchmarks/b5_probe_latency.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import streamlit as st

from explorer.errors import ConfigError, ExplorerError
from explorer.schema import MODELS, SAES

if TYPE_CHECKING:
    import pandas as pd

    from explorer.models import LoadedPair
    from explorer.probe import ProbeResult, SteeringResult
    from webapp.state import Run

REPO = Path(__file__).resolve().parent.parent
THREADS_ENV = "SAE_EXPLORER_TORCH_THREADS"
DEVICE_ENV = "SAE_EXPLORER_DEVICE"
DTYPE_ENV = "SAE_EXPLORER_DTYPE"


def _clean(spec: Any, what: str) -> dict[str, Any]:
    if not isinstance(spec, dict):
        raise ConfigError(f"The run's manifest has no usable {what} spec, so its models cannot be loaded for live probing. Re-run its precompute.")
    return {k: v for k, v in spec.items() if v is not None}


def pair_key(run: "Run | dict[str, Any]") -> str:
    """Canonical JSON of what `get_pair` loads for this run (its cache key)."""
    manifest = run if isinstance(run, dict) else run.manifest
    config = manifest.get("config") or {}
    models = config.get("models") or {}
    saes = config.get("saes") or {}
    if "base_sae" not in saes:
        raise ConfigError("The run's manifest names no base SAE, so the live probe has nothing to run. Re-run its precompute.")
    thresholds = config.get("thresholds") or {}
    config_dir = str((manifest.get("inputs") or {}).get("config_dir") or ".")
    key = {
        "models": {m: _clean(models.get(m), f"{m} model") for m in MODELS},
        "saes": {s: _clean(saes[s], s) for s in SAES if saes.get(s)},
        "hook": config.get("hook"),
        "min_matching_id_share": thresholds.get("min_matching_id_share"),
        "root": str(REPO / config_dir) if not Path(config_dir).is_absolute() else config_dir,
        "dtype": os.environ.get(DTYPE_ENV, "").strip() or models.get("dtype") or "float32",
        "processing": models.get("processing", "auto"),
        "allow_hook_mismatch": bool(config.get("allow_hook_mismatch", False)),
        "device": os.environ.get(DEVICE_ENV, "").strip() or "auto",
    }
    return json.dumps(key, sort_keys=True)


@st.cache_resource(show_spinner="Loading both models and the SAEs (once per server)...", max_entries=4)
def get_pair(key: str) -> "LoadedPair":
    """Load the pair described by `pair_key` (shared by every session; never mutated)."""
    import torch

    from explorer.models import DEFAULT_MIN_MATCHING_ID_SHARE, ModelSpec, SAESpec, load_pair

    threads = os.environ.get(THREADS_ENV, "").strip()
    try:
        torch.set_num_threads(max(1, int(threads)) if threads else max(1, (os.cpu_count() or 1) // 2))
    except ValueError:
        raise ConfigError(f"{THREADS_ENV} must be a whole number of threads, got {threads[:20]!r}.") from None
    spec = json.loads(key)
    saes = spec["saes"]
    try:
        return load_pair(
            ModelSpec.from_dict(spec["models"]["base"]),
            ModelSpec.from_dict(spec["models"]["finetuned"]),
            SAESpec.from_dict(saes["base_sae"]),
            SAESpec.from_dict(saes["finetuned_sae"]) if "finetuned_sae" in saes else None,
            hook=spec.get("hook"),
            min_matching_id_share=spec.get("min_matching_id_share") or DEFAULT_MIN_MATCHING_ID_SHARE,
            root=spec["root"],
            device=spec.get("device", "auto"),
            dtype=spec.get("dtype", "float32"),
            processing=spec.get("processing", "auto"),
            allow_hook_mismatch=spec.get("allow_hook_mismatch", False),
        )
    except ExplorerError as exc:
        raise type(exc)(f"The live probe cannot load this run's models: {exc}") from None


@st.cache_data(show_spinner="Running both models and the SAEs...", max_entries=32)
def probe(key: str, kind: str, value: Any, exclude_special_tokens: bool = True) -> "ProbeResult":
    """Probe a typed prompt (kind "text", value str) or stored token ids (kind "ids", value tuple)."""
    from explorer import probe as P

    pair = get_pair(key)
    prompt = P.prepare_prompt(pair, value) if kind == "text" else P.prepare_token_ids(pair, value)
    return P.probe(pair, prompt, exclude_special_tokens=exclude_special_tokens)


@st.cache_data(show_spinner="Generating steered and unsteered continuations...", max_entries=64)
def steer(key: str, token_ids: tuple[int, ...], sae: str, feature_id: int, coef: float, n_new_tokens: int, scale: float | None = None, scale_label: str = "") -> "SteeringResult":
    from explorer import probe as P

    pair = get_pair(key)
    prompt = P.prepare_token_ids(pair, token_ids)
    return P.steer(pair, prompt, sae=sae, feature_id=feature_id, coef=coef, n_new_tokens=n_new_tokens, scale=scale, scale_label=scale_label)


@st.cache_data(show_spinner=False, max_entries=256)
def predictions_table(key: str, kind: str, value: Any, exclude_special_tokens: bool, model: str, position: int, labels: tuple[tuple[str, str], ...]) -> "pd.DataFrame":
    """The next-token predictions at one position of a probe, one column per variant (in the
    order of `labels`: (variant, column name)), "‹token›  p%" per rank. Built once per
    (probe, model, position): a rerun of the page only reads it."""
    import pandas as pd

    from explorer.render import display_token

    p = probe(key, kind, value, exclude_special_tokens).next_token_predictions(model, position)
    variant, rank = p["variant"].to_numpy(object), p["rank"].to_numpy()
    token, prob = p["token_str"].to_numpy(object), p["prob"].to_numpy(dtype=float)
    ranks = sorted(set(rank.tolist()))
    cols: dict[str, list] = {"rank": [r + 1 for r in ranks]}
    for v, name in labels:
        sel = variant == v
        by_rank = dict(zip(rank[sel].tolist(), zip(token[sel].tolist(), prob[sel].tolist())))
        cols[name] = [f"‹{display_token(by_rank[r][0])}›  {100 * by_rank[r][1]:.1f}%" if r in by_rank else "" for r in ranks]
    return pd.DataFrame(cols)


@st.cache_data(show_spinner=False, max_entries=128)
def top_features_table(key: str, kind: str, value: Any, exclude_special_tokens: bool, sae: str, k: int, url_prefix: str) -> tuple["pd.DataFrame", list[str]]:
    """One row per token of a probe; per model, k link cells (url_prefix + feature id, with
    "id (activation)" as the link's text after "#") to the feature pages. Built once per
    (probe, SAE)."""
    from urllib.parse import quote

    import numpy as np
    import pandas as pd

    from explorer.render import display_token

    result = probe(key, kind, value, exclude_special_tokens)
    n = result.prompt.n_tokens
    table = pd.DataFrame({"position": np.arange(n), "token": [display_token(t) for t in result.prompt.token_labels]})
    links = []
    for m in ("base", "finetuned"):
        df = result.top_features_per_token(sae, m, k)
        pos, rank = df["position"].to_numpy(), df["rank"].to_numpy()
        fid, act = df["feature_id"].to_numpy(), df["activation"].to_numpy(dtype=float)
        for r in range(k):
            cells: list = [None] * n
            for p_, f_, a_ in zip(pos[rank == r].tolist(), fid[rank == r].tolist(), act[rank == r].tolist()):
                cells[p_] = f"{url_prefix}{f_}#" + quote(f"{f_} ({a_:.3g})")
            col = f"{m} #{r + 1}"
            table[col] = cells
            links.append(col)
    return table, links


@st.cache_data(show_spinner=False, max_entries=64)
def decode(key: str, token_ids: tuple[int, ...]) -> str:
    from explorer import probe as P

    return P.decode_text(get_pair(key), token_ids)


@st.cache_data(show_spinner=False, max_entries=256)
def token_strs(key: str, token_ids: tuple[int, ...]) -> list[str]:
    """Display strings of running text (characters split over byte tokens shown whole on the last)."""
    from explorer import probe as P

    return P.decode_window(get_pair(key).base.tokenizer, token_ids)[0]
