"""The precompute config: typed, frozen, validated; read from TOML, saved in the manifest.

    run_id = "demo"
    hook = "blocks.1.hook_resid_pre"     # optional: defaults to the base SAE's hook
    allow_hook_mismatch = false          # true: run SAEs at `hook` even where they were trained at another
    [models]             dtype = "float32" (| "bfloat16" | "float16"), processing = "auto"
                         (| "none" | "transformer_lens" | {fold_ln = true, ...}: explorer/hf_loading.py)
    [models.base]        path = "../data/demo/base"         (a ModelSpec: path / name + hf_model / hub)
    [models.finetuned]   path = "../data/demo/finetuned"
    [saes.base_sae]      path = "../data/demo/saes/base_sae"  (an SAESpec: release + sae_id, or path)
    [saes.finetuned_sae] path = ...                         (optional: enables two-SAE matching)
    [saes.base_sae_twin] path = ...                         (optional: the base SAE's seed twin, the null
                                                             baseline for born/lost and the score choice)
    [corpus]     path = "../data/demo/eval_corpus.parquet", format = "auto", split (precompute/corpus.py)
    [sample]     n_tokens, context_size, batch_size, seed
    [thresholds] ultralow_density, dense_density, outlier_norm | outlier_norm_factor, match,
                 min_matching_id_share, act_error_eps
    [examples]   n_top, n_quantile_bins, n_per_quantile_bin, quantile_sample, window_before, window_after
    [matching]   max_all_pairs_d_sae, n_candidates, n_kept_per_feature, score
    [evals]      zero_ablation ("all" positions, sae_lens's default, or "counted": special tokens such as
                 BOS keep their activation, as in the splice), max_sources, ce_every (CE losses on
                 every N-th batch only; 1, the default, on every batch)
    [diffing]    n_top_kl_contexts, n_features_per_context
    [crosscoder] path, base_layer, examples and bands (optional: one crosscoder over both models)

Relative paths are resolved against the folder of the config file (`base_dir`; the repository
root for a config built from a dict without one), at load time: the stored config keeps the
paths as written, and the run records the folder (manifest `inputs.config_dir`, relative to the
repository when inside it, so a shipped run works from any clone). Unknown keys and wrong types
are `ConfigError`s: a typo never falls back to a default. `RunConfig.to_dict()` is the
normalized config (every default filled in) that the manifest stores, and `RunConfig.from_dict`
reads it back: the two round-trip. The device is not part of the config (a command-line option:
it does not change what is computed, only where); the dtype is.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from explorer.crosscoder import DEFAULT_BANDS
from explorer.errors import ConfigError, MissingPathError
from explorer.hf_loading import check_dtype, check_processing
from explorer.models import DEFAULT_MIN_MATCHING_ID_SHARE, ModelSpec, SAESpec
from explorer.rundir import validate_run_id

REPO_ROOT = Path(__file__).resolve().parent.parent

# Bumped when the accumulator state layout changes, so that an old checkpoint is refused.
STATE_VERSION = 2


def _typecheck(section: str, name: str, value: Any, kind: type | tuple[type, ...]) -> Any:
    """`kind` is int, float, str or bool; ints are accepted for floats; bools are never ints."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        raise ConfigError(f"[{section}] {name}: expected {_kind_name(kinds)}, got the boolean {value!r}.")
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kinds):
        raise ConfigError(f"[{section}] {name}: expected {_kind_name(kinds)}, got {type(value).__name__} {value!r}.")
    return value


def _kind_name(kinds: tuple[type, ...]) -> str:
    return " or ".join({int: "an integer", float: "a number", str: "a string", bool: "true/false"}[k] for k in kinds)


def _section(cls, section: str, data: Any) -> Any:
    """Build dataclass `cls` from a TOML table, checking keys and types against its fields."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"[{section}] must be a table, got {type(data).__name__}.")
    types = cls.FIELD_TYPES
    unknown = sorted(set(data) - set(types))
    if unknown:
        raise ConfigError(f"[{section}]: unknown key(s) {unknown}; allowed keys are {sorted(types)}.")
    missing = [k for k in getattr(cls, "REQUIRED", ()) if k not in data]
    if missing:
        raise ConfigError(f"[{section}]: missing required key(s) {missing}.")
    kwargs = {}
    for name, kind in types.items():
        if name in data:
            value = data[name]
            if value is None:
                kwargs[name] = None
            else:
                kwargs[name] = _typecheck(section, name, value, kind)
    return cls(**kwargs)


def _positive(section: str, name: str, value: float | int, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"[{section}] {name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}.")


CORPUS_FORMATS = ("auto", "parquet", "jsonl", "text", "datasets")


def _check_example_counts(section: str, cfg: Any, hint: str = "") -> None:
    """n_top, n_quantile_bins, n_per_quantile_bin, quantile_sample of [examples] or [crosscoder]."""
    for name in ("n_top", "n_quantile_bins", "n_per_quantile_bin", "quantile_sample"):
        _positive(section, name, getattr(cfg, name))
    if cfg.quantile_sample < cfg.n_quantile_bins * cfg.n_per_quantile_bin:
        raise ConfigError(
            f"[{section}] quantile_sample ({cfg.quantile_sample}) must be at least n_quantile_bins * n_per_quantile_bin "
            f"({cfg.n_quantile_bins * cfg.n_per_quantile_bin}){hint}."
        )
    if cfg.n_top > 32767 or cfg.quantile_sample > 32767:
        raise ConfigError(f"[{section}] n_top and quantile_sample must be below 32768.")


@dataclass(frozen=True)
class CorpusConfig:
    """Where the token sample comes from (precompute/corpus.py): a Parquet or JSONL file, plain
    text files, or a `datasets.save_to_disk` folder, with `text` or `token_ids` and optional `source`."""

    path: str = ""
    format: str = "auto"
    split: str | None = None  # the split of a DatasetDict folder

    FIELD_TYPES = {"path": str, "format": str, "split": str}
    REQUIRED = ("path",)

    def __post_init__(self) -> None:
        if not self.path.strip():
            raise ConfigError("[corpus] path is required: a Parquet/JSONL file, a text file or folder, or a datasets folder.")
        if self.format not in CORPUS_FORMATS:
            raise ConfigError(f"[corpus] format must be one of {list(CORPUS_FORMATS)}, got {self.format!r}.")


@dataclass(frozen=True)
class SampleConfig:
    """The ONE token sample every statistic is computed on: n_tokens // context_size sequences."""

    n_tokens: int = 0
    context_size: int = 0
    batch_size: int = 32
    seed: int = 0

    FIELD_TYPES = {"n_tokens": int, "context_size": int, "batch_size": int, "seed": int}
    REQUIRED = ("n_tokens", "context_size")

    def __post_init__(self) -> None:
        for name in ("n_tokens", "context_size", "batch_size"):
            _positive("sample", name, getattr(self, name))
        _positive("sample", "seed", self.seed, allow_zero=True)
        if self.context_size < 2:
            raise ConfigError("[sample] context_size must be at least 2 (the loss needs a next token).")
        if self.n_tokens < self.context_size:
            raise ConfigError(
                f"[sample] n_tokens ({self.n_tokens}) is smaller than one context ({self.context_size}); "
                "the sample is n_tokens // context_size whole sequences."
            )

    @property
    def n_sequences(self) -> int:
        return self.n_tokens // self.context_size


@dataclass(frozen=True)
class ThresholdsConfig:
    """Status thresholds (METHODS.md sections 2-5). Exactly one of outlier_norm / outlier_norm_factor."""

    ultralow_density: float = 1e-5
    dense_density: float = 0.1
    outlier_norm: float | None = None
    outlier_norm_factor: float | None = 2.0
    match: float = 0.5
    min_matching_id_share: float = DEFAULT_MIN_MATCHING_ID_SHARE
    act_error_eps: float = 1e-10

    FIELD_TYPES = {
        "ultralow_density": float, "dense_density": float, "outlier_norm": float, "outlier_norm_factor": float,
        "match": float, "min_matching_id_share": float, "act_error_eps": float,
    }

    def __post_init__(self) -> None:
        if not 0 < self.ultralow_density < self.dense_density <= 1:
            raise ConfigError(
                f"[thresholds] need 0 < ultralow_density < dense_density <= 1, got {self.ultralow_density} and {self.dense_density}."
            )
        if (self.outlier_norm is None) == (self.outlier_norm_factor is None):
            raise ConfigError(
                "[thresholds] give exactly one of outlier_norm (an absolute activation norm) or outlier_norm_factor "
                "(a multiple of the mean activation norm, Study T's 2*sqrt(d_model) after scaling is factor 2)."
            )
        for name in ("outlier_norm", "outlier_norm_factor", "act_error_eps"):
            if getattr(self, name) is not None:
                _positive("thresholds", name, getattr(self, name))
        if not -1 <= self.match <= 1:
            raise ConfigError(f"[thresholds] match is a combined score in [-1, 1], got {self.match}.")
        if not 0 <= self.min_matching_id_share <= 1:
            raise ConfigError(f"[thresholds] min_matching_id_share must be in [0, 1], got {self.min_matching_id_share}.")

    @classmethod
    def from_table(cls, data: Any) -> "ThresholdsConfig":
        # Giving outlier_norm replaces the default factor (and vice versa): one rule, no merging.
        if isinstance(data, dict) and "outlier_norm" in data and "outlier_norm_factor" not in data:
            data = {**data, "outlier_norm_factor": None}
        return _section(cls, "thresholds", data)


@dataclass(frozen=True)
class ExamplesConfig:
    """Top examples and quantile examples per (sae, feature, model); windows around the token."""

    n_top: int = 20
    n_quantile_bins: int = 10
    n_per_quantile_bin: int = 5
    quantile_sample: int = 150
    window_before: int = 12
    window_after: int = 4

    FIELD_TYPES = {
        "n_top": int, "n_quantile_bins": int, "n_per_quantile_bin": int, "quantile_sample": int,
        "window_before": int, "window_after": int,
    }

    def __post_init__(self) -> None:
        _check_example_counts("examples", self, "; about 3x that keeps every bin full")
        for name in ("window_before", "window_after"):
            _positive("examples", name, getattr(self, name), allow_zero=True)


@dataclass(frozen=True)
class MatchingConfig:
    """Two-SAE matching: all pairs up to max_all_pairs_d_sae, else candidates from decoder cosine."""

    max_all_pairs_d_sae: int = 4096
    n_candidates: int = 10
    n_kept_per_feature: int = 5
    score: str = "auto"  # one of explorer.schema.MATCH_SCORES; auto: the best on the seed twin (if any)

    FIELD_TYPES = {"max_all_pairs_d_sae": int, "n_candidates": int, "n_kept_per_feature": int, "score": str}

    def __post_init__(self) -> None:
        from explorer.schema import MATCH_SCORES

        for name in ("max_all_pairs_d_sae", "n_candidates", "n_kept_per_feature"):
            _positive("matching", name, getattr(self, name))
        if self.score != "auto" and self.score not in MATCH_SCORES:
            raise ConfigError(f"[matching] score must be 'auto' or one of {list(MATCH_SCORES)}, got {self.score!r}.")


ZERO_ABLATION = ("all", "counted")


@dataclass(frozen=True)
class EvalsConfig:
    """How the SAE-quality evals treat positions. The zero-ablated CE zeros the activation at every
    position, BOS included ("all", sae_lens's run_evals), or only at the counted tokens ("counted":
    special tokens such as BOS keep their activation, as the spliced pass leaves them alone).
    max_sources bounds the corpus labels per-source statistics are kept for.

    ce_every: the CE losses (clean, spliced, zero-ablated, hence CE delta and CE recovered) on the
    batches whose global index is a multiple of N only, all three on the same tokens (as sae_lens's
    run_evals computes them on its first n_eval_reconstruction_batches). The spliced pass is the
    costliest part of the stream after the forwards (a pass from the hook on, with its unembed, per
    SAE and model); every other statistic, the per-token KL and loss difference included, covers
    every batch. Which batches count depends only on the batch index, not on shards."""

    zero_ablation: str = "all"
    max_sources: int = 16
    ce_every: int = 1

    FIELD_TYPES = {"zero_ablation": str, "max_sources": int, "ce_every": int}

    def __post_init__(self) -> None:
        if self.zero_ablation not in ZERO_ABLATION:
            raise ConfigError(f"[evals] zero_ablation must be one of {list(ZERO_ABLATION)}, got {self.zero_ablation!r}.")
        _positive("evals", "max_sources", self.max_sources)
        _positive("evals", "ce_every", self.ce_every)


@dataclass(frozen=True)
class DiffingConfig:
    """Where the models differ (METHODS.md section 11): the highest-KL contexts kept, and the
    base-SAE features with the largest activation change listed at each."""

    n_top_kl_contexts: int = 100
    n_features_per_context: int = 10

    FIELD_TYPES = {"n_top_kl_contexts": int, "n_features_per_context": int}

    def __post_init__(self) -> None:
        for name in ("n_top_kl_contexts", "n_features_per_context"):
            _positive("diffing", name, getattr(self, name))


@dataclass(frozen=True)
class CrosscoderConfig:
    """[crosscoder] (issue 16): one crosscoder over both models at the run's hook.

    `path`: this project's crosscoder directory or a dictionary_learning CrossCoder /
    BatchTopKCrossCoder checkpoint (explorer/crosscoder.py); `base_layer`: the checkpoint's index of
    the base model. Examples per latent: n_top, and a quantile sample as [examples] has it (fewer by
    default: one set per latent, shown on both models). n_nearest SAE features per latent and
    n_links latents per SAE feature, by decoder cosine. Bands of the relative decoder norm
    ||d_F|| / (||d_B|| + ||d_F||) (the app's default thresholds): base-only <= base_only_max,
    shared in [shared_min, shared_max], finetune-only >= finetune_only_min; the defaults are
    Minder et al. 2025's bands on their Delta-norm (0.1, 0.4-0.6, 0.9) expressed as relative norm
    (1/6, 4/9-5/9, 5/6), rounded.
    """

    path: str = ""
    base_layer: int = 0
    n_top: int = 10
    n_quantile_bins: int = 4
    n_per_quantile_bin: int = 1
    quantile_sample: int = 12
    n_nearest: int = 5
    n_links: int = 3
    base_only_max: float = DEFAULT_BANDS["base_only_max"]
    shared_min: float = DEFAULT_BANDS["shared_min"]
    shared_max: float = DEFAULT_BANDS["shared_max"]
    finetune_only_min: float = DEFAULT_BANDS["finetune_only_min"]

    FIELD_TYPES = {
        "path": str, "base_layer": int, "n_top": int, "n_quantile_bins": int, "n_per_quantile_bin": int, "quantile_sample": int,
        "n_nearest": int, "n_links": int, "base_only_max": float, "shared_min": float, "shared_max": float, "finetune_only_min": float,
    }
    REQUIRED = ("path",)

    def __post_init__(self) -> None:
        if not self.path.strip():
            raise ConfigError("[crosscoder] path is required: a crosscoder directory or a dictionary_learning checkpoint.")
        if self.base_layer not in (0, 1):
            raise ConfigError(f"[crosscoder] base_layer is the checkpoint's index of the base model: 0 or 1, got {self.base_layer}.")
        _check_example_counts("crosscoder", self)
        for name in ("n_nearest", "n_links"):
            _positive("crosscoder", name, getattr(self, name))
        if not 0 <= self.base_only_max < self.shared_min <= self.shared_max < self.finetune_only_min <= 1:
            raise ConfigError(
                "[crosscoder] the relative-norm bands need 0 <= base_only_max < shared_min <= shared_max < finetune_only_min <= 1, got "
                f"{self.base_only_max}, {self.shared_min}, {self.shared_max}, {self.finetune_only_min}."
            )


@dataclass(frozen=True)
class RunConfig:
    run_id: str
    models: dict[str, ModelSpec]
    saes: dict[str, SAESpec]
    corpus: CorpusConfig
    sample: SampleConfig
    hook: str | None = None
    thresholds: ThresholdsConfig = field(default_factory=ThresholdsConfig)
    examples: ExamplesConfig = field(default_factory=ExamplesConfig)
    matching: MatchingConfig = field(default_factory=MatchingConfig)
    evals: EvalsConfig = field(default_factory=EvalsConfig)
    diffing: DiffingConfig = field(default_factory=DiffingConfig)
    crosscoder: CrosscoderConfig | None = None
    allow_hook_mismatch: bool = False
    dtype: str = "float32"  # [models] dtype: both models
    processing: Any = "auto"  # [models] processing: both models
    base_dir: Path | None = field(default=None, compare=False)  # relative paths resolve here (not part of the config)

    TOP_KEYS = ("run_id", "hook", "allow_hook_mismatch", "models", "saes", "corpus", "sample", "thresholds", "examples", "matching", "evals", "diffing", "crosscoder")
    MODEL_SETTINGS = ("dtype", "processing")
    SAE_KEYS = ("base_sae", "finetuned_sae", "base_sae_twin")

    def __post_init__(self) -> None:
        validate_run_id(self.run_id)
        if set(self.models) != {"base", "finetuned"}:
            raise ConfigError(f"[models] needs exactly [models.base] and [models.finetuned], got {sorted(self.models)}.")
        if "base_sae" not in self.saes or not set(self.saes) <= set(self.SAE_KEYS):
            raise ConfigError(
                f"[saes] needs [saes.base_sae] and optionally [saes.finetuned_sae] and [saes.base_sae_twin] (the base SAE's seed twin), got {sorted(self.saes)}."
            )
        if self.hook is not None and not self.hook.strip():
            raise ConfigError("hook must be a non-empty hook name such as 'blocks.6.hook_resid_post', or left out.")
        try:
            check_dtype(self.dtype, "[models] dtype")
            object.__setattr__(self, "processing", check_processing(self.processing))
        except ConfigError as exc:
            raise ConfigError(f"[models] {exc}" if not str(exc).startswith("[models]") else str(exc)) from None

    # -- dict / TOML -------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Any, base_dir: str | Path | None = None) -> "RunConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"A precompute config must be a table, got {type(data).__name__}.")
        unknown = sorted(set(data) - set(cls.TOP_KEYS))
        if unknown:
            raise ConfigError(f"Config: unknown top-level key(s) {unknown}; allowed keys are {sorted(cls.TOP_KEYS)}.")
        for required in ("run_id", "models", "saes", "corpus", "sample"):
            if required not in data:
                raise ConfigError(f"Config: `{required}` is required (see configs/demo.toml for a complete example).")
        run_id = _typecheck("top level", "run_id", data["run_id"], str)
        hook = data.get("hook")
        if hook is not None:
            hook = _typecheck("top level", "hook", hook, str)
        models_table = data["models"]
        settings = {}
        if isinstance(models_table, dict):
            settings = {k: models_table[k] for k in cls.MODEL_SETTINGS if k in models_table}
            models_table = {k: v for k, v in models_table.items() if k not in cls.MODEL_SETTINGS}
        if "dtype" in settings:
            settings["dtype"] = _typecheck("models", "dtype", settings["dtype"], str)
        models = _specs("models", models_table, ("base", "finetuned"), ModelSpec)
        saes = _specs("saes", data["saes"], cls.SAE_KEYS, SAESpec)
        allow = _typecheck("top level", "allow_hook_mismatch", data.get("allow_hook_mismatch", False), bool)
        return cls(
            run_id=run_id,
            hook=hook,
            allow_hook_mismatch=allow,
            base_dir=Path(base_dir) if base_dir is not None else None,
            **settings,
            models=models,
            saes=saes,
            corpus=_section(CorpusConfig, "corpus", data["corpus"]),
            sample=_section(SampleConfig, "sample", data["sample"]),
            thresholds=ThresholdsConfig.from_table(data.get("thresholds")),
            examples=_section(ExamplesConfig, "examples", data.get("examples")),
            matching=_section(MatchingConfig, "matching", data.get("matching")),
            evals=_section(EvalsConfig, "evals", data.get("evals")),
            diffing=_section(DiffingConfig, "diffing", data.get("diffing")),
            crosscoder=_section(CrosscoderConfig, "crosscoder", data["crosscoder"]) if "crosscoder" in data else None,
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"run_id": self.run_id}
        if self.hook is not None:
            out["hook"] = self.hook
        out["allow_hook_mismatch"] = self.allow_hook_mismatch
        out["models"] = {"dtype": self.dtype, "processing": self.processing, **{k: v.to_dict() for k, v in self.models.items()}}
        out["saes"] = {k: v.to_dict() for k, v in self.saes.items()}
        for name in ("corpus", "sample", "thresholds", "examples", "matching", "evals", "diffing"):
            section = getattr(self, name)
            out[name] = {f.name: getattr(section, f.name) for f in fields(section)}
        if self.crosscoder is not None:  # absent otherwise: runs without one keep their config hash
            out["crosscoder"] = {f.name: getattr(self.crosscoder, f.name) for f in fields(self.crosscoder)}
        return out

    @classmethod
    def from_toml(cls, path: str | Path) -> "RunConfig":
        path = Path(path)
        if not path.is_file():
            raise MissingPathError(f"Config file {path} does not exist. See configs/demo.toml for an example.")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}.") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path} is not a UTF-8 text file.") from None
        return cls.from_dict(data, base_dir=path.resolve().parent)

    # -- derived -----------------------------------------------------------------------------

    def with_hook(self, hook: str) -> "RunConfig":
        return replace(self, hook=hook)

    def with_dtype(self, dtype: str) -> "RunConfig":
        return replace(self, dtype=dtype)

    def with_run_id(self, run_id: str) -> "RunConfig":
        return replace(self, run_id=run_id)

    @property
    def sae_names(self) -> list[str]:
        """The SAEs every statistic is computed for (the seed twin is only matched: `twin`)."""
        return [s for s in ("base_sae", "finetuned_sae") if s in self.saes]

    @property
    def twin(self) -> str | None:
        return "base_sae_twin" if "base_sae_twin" in self.saes else None

    def hash(self) -> str:
        """What makes two runs the same computation: the normalized config (run_id excluded)."""
        d = self.to_dict()
        d.pop("run_id")
        blob = json.dumps({"state_version": STATE_VERSION, "config": d}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()

    @property
    def root(self) -> Path:
        """The folder relative paths resolve against: the config file's, else the repository root."""
        return self.base_dir if self.base_dir is not None else REPO_ROOT

    def resolve(self, path: str) -> Path:
        p = Path(path).expanduser()
        return p if p.is_absolute() else self.root / p

    def config_dir_record(self) -> str:
        """`root` as the manifest records it: relative to the repository when inside it."""
        root = self.root.resolve()
        try:
            return str(root.relative_to(REPO_ROOT.resolve())) or "."
        except ValueError:
            return str(root)


def _specs(section: str, data: Any, allowed: tuple[str, ...], spec_cls) -> dict:
    if not isinstance(data, dict):
        raise ConfigError(f"[{section}] must be a table of {', '.join(allowed)} entries.")
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ConfigError(f"[{section}]: unknown entry(ies) {unknown}; allowed are {list(allowed)}.")
    out = {}
    for name in allowed:
        if name in data:
            try:
                out[name] = spec_cls.from_dict(data[name])
            except ConfigError as exc:
                raise ConfigError(f"[{section}.{name}] {exc}") from None
    return out
