"""Export a run as Neuronpedia bundles: one source per (SAE, model), base and finetune linked.

Neuronpedia shows one model at a time and has no base-vs-finetune view, so a run of an SAE on
two models becomes two sources (one per model) of the same source set, and each names the other
through `cosSimMatchModelId` / `cosSimMatchSourceId` (Neuronpedia's matched-source pane). A
two-SAE run writes four sources.

The layout is the one Neuronpedia's importer reads (apps/webapp/app/api/admin/import/route.ts,
lib/db/import.ts in hijohnnylin/neuronpedia), field names as its Prisma schema spells them:

    OUT/v1/{modelId}/{sourceId}/
        release.jsonl  model.jsonl  sourceset.jsonl  source.jsonl      one JSON line each
        features/batch-{N}.jsonl.gz                                    Neuron rows
        activations/batch-{N}.jsonl.gz                                 Activation rows

- `sourceId` is `{layer}-{setName}` (e.g. `1-base-sae-res`), `layer` of every Neuron and
  Activation row is that sourceId, `index` is the feature id as a string.
- The importer inserts with `jsonb_to_recordset` over the keys of a batch's FIRST line, so every
  line of a file carries the same keys (missing values are null or empty lists, never absent),
  and Postgres rejects `\\u0000`: it is stripped from every string.
- Activations: top examples have `binMin = -1`, `binContains = -1`, `binMax` = the feature's
  max activation on that model (SAEDashboard's convention); quantile examples have the bin's
  lowest and highest sampled activation as `binMin` / `binMax` and `binContains` = the bin's
  share of the sampled firing tokens (bins hold equal counts: 1 / n_bins). `values` are the
  feature's activations on the source's model over the window (0 at special tokens, as in the
  run); `qualifyingTokenIndex` is the selecting token's index in the window.
- Neuron rows: `frac_nonzero` = density on the model; `maxActApprox` = max activation;
  `pos_str/pos_values`, `neg_str/neg_values` = the top W_dec[i] @ W_U logits of that model;
  `topkCosSimIndices/Values` = the decoder neighbours in the same SAE; token strings are the app's
  display forms (SentencePiece's `▁` as a space; in a window, a character split over byte pieces
  shown once, on the piece that completes it); the activation histogram
  `freq_hist_data_bar_values/heights` = the run's log-spaced bins (geometric bin centres,
  counts), trimmed to the non-empty range. Not in a run, written empty: the logit histogram,
  `decoder_weights_dist`, the decoder vector (`hasVector` false).
- Ids are deterministic (a re-export writes the same rows); Neuronpedia's re-import into a
  source set that already has rows writes nothing, so import into a fresh instance or set.

Every file is written under a temporary directory and renamed into place when the bundle is
complete; an existing bundle is replaced only with `overwrite`.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from explorer import rundir, schema, store
from explorer.errors import ConfigError, RunError

DATASET_VERSION = "v1"
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CREATOR_ID = "sae-transfer-explorer"
DEFAULT_CREATOR_NAME = "SAE Transfer Explorer"
FEATURES_PER_BATCH = 1024
HOOK_KIND_SHORT = {
    "hook_resid_pre": "res", "hook_resid_mid": "res-mid", "hook_resid_post": "res",
    "hook_mlp_out": "mlp", "hook_attn_out": "att", "hook_z": "att-z", "hook_mlp_in": "mlp-in", "hook_attn_in": "att-in",
}
_SLUG = re.compile(r"[^a-z0-9]+")


def slug(text: str) -> str:
    """A Neuronpedia id: lower-case letters, digits and single dashes."""
    out = _SLUG.sub("-", str(text).lower()).strip("-")
    if not out:
        raise ConfigError(f"{text!r} gives an empty Neuronpedia id; pass another name.")
    return out


def _clean(value: Any) -> Any:
    """Strict JSON for Postgres: NaN/inf -> null, numpy -> python, no NUL characters."""
    if isinstance(value, str):
        return value.replace("\x00", "")
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def _line(row: dict[str, Any]) -> bytes:
    return json.dumps(_clean(row), ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8") + b"\n"


@dataclass(frozen=True)
class NeuronpediaOptions:
    """What a bundle is called on Neuronpedia. Unset ids are derived from the run."""

    model_ids: dict[str, str] = field(default_factory=dict)  # "base" / "finetuned" -> Neuronpedia model id
    set_names: dict[str, str] = field(default_factory=dict)  # sae -> source set name
    release_name: str | None = None
    creator_id: str = DEFAULT_CREATOR_ID
    creator_name: str = DEFAULT_CREATOR_NAME
    instruct: dict[str, bool] = field(default_factory=dict)  # model -> is an instruction/chat model
    features_per_batch: int = FEATURES_PER_BATCH


@dataclass(frozen=True)
class SourceBundle:
    sae: str
    model: str
    model_id: str
    source_id: str
    path: Path
    n_features: int
    n_activations: int
    n_batches: int


def _hook_layer(hook: str) -> int:
    parts = hook.split(".")
    if len(parts) >= 2 and parts[0] == "blocks" and parts[1].isdigit():
        return int(parts[1])
    raise ConfigError(f"hook {hook!r} names no layer (blocks.N....): Neuronpedia sources need one.")


def _model_facts(manifest: dict, model: str) -> dict[str, Any]:
    """n_layers, d_model, d_mlp, TransformerLens name: from the manifest (runs that record them)
    or from the local model's config.json; {} when neither says."""
    facts = (manifest.get("models") or {}).get(model)
    if facts:
        return facts
    spec = (manifest.get("config", {}).get("models") or {}).get(model, {})
    path = spec.get("path")
    if path:
        config_dir = Path(str((manifest.get("inputs") or {}).get("config_dir") or "."))
        root = config_dir if config_dir.is_absolute() else REPO_ROOT / config_dir
        cfg_path = Path(path) if Path(path).is_absolute() else root / path
        try:
            cfg = json.loads((cfg_path / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        tl = cfg.get("tl_config") or {}
        return {
            "n_layers": tl.get("n_layers", cfg.get("n_layer", cfg.get("num_hidden_layers"))),
            "d_model": tl.get("d_model", cfg.get("n_embd", cfg.get("hidden_size"))),
            "d_mlp": tl.get("d_mlp", cfg.get("n_inner", cfg.get("intermediate_size"))),
        }
    return {}


def default_model_ids(manifest: dict) -> dict[str, str]:
    """Neuronpedia model ids from the run's model specs: the TransformerLens name, the hub id's
    last part, or the local folder's name; `{run_id}-{model}` when the two would be equal."""
    specs = manifest.get("config", {}).get("models") or {}
    out = {}
    for m in schema.MODELS:
        spec = specs.get(m, {})
        raw = spec.get("hf_model") or spec.get("hub") or spec.get("name") or spec.get("path") or m
        out[m] = slug(str(raw).rstrip("/").split("/")[-1])
    if out["base"] == out["finetuned"] or set(out.values()) <= set(schema.MODELS):
        out = {m: slug(f"{manifest['run_id']}-{m}") for m in schema.MODELS}
    return out


class _Export:
    def __init__(self, run_dir: Path, opts: NeuronpediaOptions):
        self.run_dir = run_dir
        self.opts = opts
        self.manifest = rundir.open_run(run_dir)
        cfg = self.manifest["config"]
        self.hook = cfg["hook"]
        self.layer = _hook_layer(self.hook)
        self.kind = HOOK_KIND_SHORT.get(self.hook.split(".")[-1], slug(self.hook.split(".")[-1]))
        self.model_ids = {**default_model_ids(self.manifest), **{m: slug(v) for m, v in opts.model_ids.items()}}
        if self.model_ids["base"] == self.model_ids["finetuned"]:
            raise ConfigError(f"the base and finetuned models need different Neuronpedia ids (both {self.model_ids['base']!r}).")
        self.set_names = {s: slug(opts.set_names.get(s, f"{s.replace('_', '-')}-{self.kind}")) for s in self.manifest["saes"]}
        self.release = slug(opts.release_name or f"{self.manifest['run_id']}-transfer")
        self.created_at = self.manifest.get("created_at") or datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.vocab = store.vocab_forms(run_dir)  # windows grouped across byte pieces, as the app shows them

    def source_id(self, sae: str) -> str:
        return f"{self.layer}-{self.set_names[sae]}"

    # ------------------------------------------------------------------------ metadata rows

    def release_row(self) -> dict:
        text = f"SAE transfer run {self.manifest['run_id']}: {', '.join(self.manifest['saes'])} on the base and the finetuned model"
        return {
            "name": self.release, "description": text, "descriptionShort": text, "creatorName": self.opts.creator_name,
            "creatorNameShort": self.opts.creator_name, "creatorId": self.opts.creator_id, "urls": [], "visibility": "PUBLIC",
            "isNewUi": False, "featured": False, "defaultSourceSetName": self.set_names[self.manifest["saes"][0]],
            "defaultSourceId": self.source_id(self.manifest["saes"][0]), "createdAt": self.created_at,
        }

    def model_row(self, model: str) -> dict:
        facts = _model_facts(self.manifest, model)
        n_layers = facts.get("n_layers")
        if not n_layers:
            raise RunError(
                f"The run does not say how many layers the {model} model has (Neuronpedia pages break with 0). "
                "Rebuild the run with this version of the precompute, which records it."
            )
        spec = self.manifest["config"]["models"].get(model, {})
        mid = self.model_ids[model]
        return {
            "id": mid, "instruct": bool(self.opts.instruct.get(model, False)), "creatorId": self.opts.creator_id,
            "displayName": mid, "displayNameShort": mid, "tlensId": spec.get("name"), "dimension": facts.get("d_model"),
            "layers": int(n_layers), "neuronsPerLayer": int(facts.get("d_mlp") or 0), "inferenceEnabled": False,
            "visibility": "PUBLIC", "defaultSourceSetName": self.set_names[self.manifest["saes"][0]],
            "defaultSourceId": self.source_id(self.manifest["saes"][0]), "owner": self.opts.creator_name, "website": None,
            "createdAt": self.created_at, "updatedAt": self.created_at,
        }

    def sourceset_row(self, sae: str, model: str) -> dict:
        d_sae = self.manifest["d_sae"][sae]
        return {
            "modelId": self.model_ids[model], "name": self.set_names[sae], "creatorId": self.opts.creator_id,
            "description": f"{sae} ({d_sae:,} features) at {self.hook}, run {self.manifest['run_id']}",
            "type": "sae", "creatorName": self.opts.creator_name, "urls": [], "releaseName": self.release,
            "visibility": "PUBLIC", "hasDashboards": True, "defaultRange": 1, "defaultShowBreaks": True, "showDfa": False,
            "showCorrelated": False, "showHeadAttribution": False, "showUmap": False, "createdAt": self.created_at,
        }

    def source_row(self, sae: str, model: str) -> dict:
        other = "finetuned" if model == "base" else "base"
        spec = self.manifest["config"]["saes"].get(sae, {})
        corpus = self.manifest["config"]["corpus"]["path"]
        return {
            "id": self.source_id(sae), "modelId": self.model_ids[model], "setName": self.set_names[sae], "creatorId": self.opts.creator_id,
            "hasDashboards": True, "inferenceEnabled": False, "saelensRelease": spec.get("release"), "saelensSaeId": spec.get("sae_id"),
            "saelensConfig": None, "hfRepoId": None, "hfFolderId": None, "visibility": "PUBLIC",
            "num_prompts": int(self.manifest["n_sequences"]), "num_tokens_in_prompt": int(self.manifest["config"]["sample"]["context_size"]),
            "dataset": Path(str(corpus)).name,
            "notes": f"{sae} encoding the {model} model's activations; the same SAE on the {other} model is "
                     f"{self.model_ids[other]}/{self.source_id(sae)} (run {self.manifest['run_id']}, sae-transfer-explorer)",
            "cosSimMatchModelId": self.model_ids[other], "cosSimMatchSourceId": self.source_id(sae), "createdAt": self.created_at,
        }

    # ------------------------------------------------------------------------ features and activations

    def _tokens(self, ids) -> list[str]:
        """Single tokens (the logit lists)."""
        return [self.vocab.single(int(i)) for i in ids]

    def neuron_rows(self, sae: str, model: str) -> Iterator[dict]:
        cols = [
            "feature_id", f"density_{model}", f"max_act_{model}", f"act_hist_{model}", "nn_feature_ids", "nn_cosines",
            f"logit_pos_ids_{model}", f"logit_pos_values_{model}", f"logit_neg_ids_{model}", f"logit_neg_values_{model}",
        ]
        t = pq.read_table(self.run_dir / "features.parquet", columns=["sae", *cols], filters=[("sae", "=", sae)])
        edges = np.asarray(self.manifest.get("act_hist_edges") or schema.ACT_HIST_EDGES, dtype=np.float64)
        centres = np.sqrt(edges[:-1] * edges[1:])
        source_id, mid = self.source_id(sae), self.model_ids[model]
        for r in t.select(cols).to_pylist():
            hist = np.asarray(r[f"act_hist_{model}"] or [], dtype=np.int64)
            nz = np.flatnonzero(hist)
            lo, hi = (int(nz[0]), int(nz[-1]) + 1) if len(nz) else (0, 0)
            yield {
                "modelId": mid, "layer": source_id, "index": str(r["feature_id"]), "sourceSetName": self.set_names[sae],
                "creatorId": self.opts.creator_id, "createdAt": self.created_at, "maxActApprox": r[f"max_act_{model}"],
                "hasVector": False, "vector": [], "vectorLabel": None, "vectorDefaultSteerStrength": None, "hookName": self.hook,
                "topkCosSimIndices": r["nn_feature_ids"] or [], "topkCosSimValues": r["nn_cosines"] or [],
                "pos_str": self._tokens(r[f"logit_pos_ids_{model}"] or []), "pos_values": r[f"logit_pos_values_{model}"] or [],
                "neg_str": self._tokens(r[f"logit_neg_ids_{model}"] or []), "neg_values": r[f"logit_neg_values_{model}"] or [],
                "frac_nonzero": r[f"density_{model}"],
                "freq_hist_data_bar_heights": hist[lo:hi].tolist(), "freq_hist_data_bar_values": centres[lo:hi].tolist(),
                "logits_hist_data_bar_heights": [], "logits_hist_data_bar_values": [], "decoder_weights_dist": [],
            }

    def activation_rows(self, sae: str, model: str, index: store.ExamplesIndex, ids: list[int], max_act: dict[int, float]) -> Iterator[dict]:
        t = index.read(sae, ids)
        t = t.filter(pc.equal(t.column("model"), model)).sort_by(
            [("feature_id", "ascending"), ("kind", "descending"), ("bin", "descending"), ("rank", "ascending")]
        )
        n_bins = int(self.manifest["config"]["examples"]["n_quantile_bins"])
        source_id, mid = self.source_id(sae), self.model_ids[model]
        for r in t.to_pylist():
            values = [float(v) for v in (r[f"acts_{model}"] or [])]
            tokens = self.vocab.window(r["token_ids"] or [])
            if not values:
                continue
            top = r["kind"] == "top"
            key = f"{self.manifest['run_id']}|{sae}|{model}|{r['feature_id']}|{r['kind']}|{r['bin']}|{r['rank']}"
            yield {
                "id": "c" + hashlib.sha256(key.encode()).hexdigest()[:24], "tokens": tokens, "values": values,
                "modelId": mid, "layer": source_id, "index": str(r["feature_id"]), "creatorId": self.opts.creator_id,
                "createdAt": self.created_at, "maxValue": max(values), "maxValueTokenIndex": int(np.argmax(values)),
                "minValue": min(values),
                "binMin": -1.0 if top else r["bin_low"], "binMax": max_act.get(r["feature_id"]) if top else r["bin_high"],
                "binContains": -1.0 if top else 1.0 / n_bins, "qualifyingTokenIndex": int(r["position"] - r["window_start"]),
                "dataSource": None, "dataIndex": str(r["seq_id"]), "lossValues": [], "logitContributions": None,
            }


def _write_gz(path: Path, rows) -> int:
    n = 0
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=5, mtime=0) as fh:  # mtime 0: reproducible bytes
        for row in rows:
            fh.write(_line(row))
            n += 1
    return n


def export(run_dir: Path | str, out_dir: Path | str, opts: NeuronpediaOptions = NeuronpediaOptions(), overwrite: bool = False,
           progress=None) -> list[SourceBundle]:
    """Write the Neuronpedia bundles of a run under out_dir/v1/. Returns one entry per source."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if opts.features_per_batch < 1:
        raise ConfigError("features_per_batch must be at least 1.")
    ex = _Export(run_dir, opts)
    targets = {(s, m): out_dir / DATASET_VERSION / ex.model_ids[m] / ex.source_id(s) for s in ex.manifest["saes"] for m in schema.MODELS}
    existing = [str(p) for p in targets.values() if p.exists()]
    if existing and not overwrite:
        raise ConfigError(f"{existing[0]} already exists; pass --overwrite to replace the bundle, or choose another --out.")
    rows = {"release": ex.release_row(), "model": {m: ex.model_row(m) for m in schema.MODELS}}  # fail before writing
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp_root = Path(tempfile.mkdtemp(prefix=".neuronpedia-", dir=out_dir))
    index = store.ExamplesIndex.open(run_dir)
    done = []
    try:
        staged = {}
        for (sae, model), target in targets.items():
            src = tmp_root / f"{sae}.{model}"
            (src / "features").mkdir(parents=True)
            (src / "activations").mkdir()
            for name, row in (("release", rows["release"]), ("model", rows["model"][model]),
                              ("sourceset", ex.sourceset_row(sae, model)), ("source", ex.source_row(sae, model))):
                (src / f"{name}.jsonl").write_bytes(_line(row))
            neurons = list(ex.neuron_rows(sae, model))
            max_act = {int(n["index"]): n["maxActApprox"] for n in neurons}
            n_act = n_batch = 0
            for b, lo in enumerate(range(0, len(neurons), opts.features_per_batch)):
                chunk = neurons[lo : lo + opts.features_per_batch]
                _write_gz(src / "features" / f"batch-{b}.jsonl.gz", chunk)
                ids = [int(n["index"]) for n in chunk]
                n_act += _write_gz(src / "activations" / f"batch-{b}.jsonl.gz", ex.activation_rows(sae, model, index, ids, max_act))
                n_batch += 1
                if progress is not None:
                    progress(f"{ex.model_ids[model]}/{ex.source_id(sae)}: batch {b + 1} ({lo + len(chunk):,}/{len(neurons):,} features)")
            staged[(sae, model)] = src
            done.append(SourceBundle(sae, model, ex.model_ids[model], ex.source_id(sae), target, len(neurons), n_act, n_batch))
        for key, src in staged.items():  # every source is complete: move them into place
            target = targets[key]
            if target.exists():
                shutil.rmtree(target)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, target)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    return done
