"""Loading a base/finetuned model pair and its SAEs from specs, with checks that fail clearly.

A model spec is one of
  * a TransformerLens model name:            ModelSpec(name="gemma-2b")
  * a Hugging Face finetune in that
    architecture (weights from the hub):     ModelSpec(name="gemma-2b", hf_model="shahdishank/gemma-2b-it-finetune-python-codes")
  * a local checkpoint directory:            ModelSpec(path="data/demo/base")
    (config.json + model.safetensors + tokenizer/, as written by `save_local_model`)

An SAE spec is one of
  * an SAELens release + SAE id:             SAESpec(release="gemma-2b-res-jb", sae_id="blocks.6.hook_resid_post")
  * a local SAELens directory:               SAESpec(path="data/demo/saes/base_sae")
    (cfg.json + sae_weights.safetensors, as SAELens's `save_inference_model` writes)

Hub loading needs the network; on these machines tests exercise the local paths, and the hub
paths are checked up to the point of download (unknown names fail before any network call).
Weights are read with safetensors only.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from explorer.errors import (
    ConfigError,
    DimensionMismatchError,
    HookNotFoundError,
    MissingPathError,
    TokenizerMismatchError,
    UnknownModelError,
    UnknownSAEError,
)

if TYPE_CHECKING:  # torch-heavy imports stay out of module import time
    from sae_lens import SAE
    from transformer_lens import HookedTransformer

LOCAL_MODEL_CONFIG = "config.json"
LOCAL_MODEL_WEIGHTS = "model.safetensors"
LOCAL_MODEL_TOKENIZER = "tokenizer"
LOCAL_MODEL_FORMAT = "sae-transfer-explorer/hooked-transformer/v1"
SAE_CONFIG = "cfg.json"
SAE_WEIGHTS = "sae_weights.safetensors"

DEFAULT_MIN_MATCHING_ID_SHARE = 0.99


def _check_keys(kind: str, data: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(
            f"{kind}: unknown key(s) {unknown}; allowed keys are {sorted(allowed)}."
        )


@dataclass(frozen=True)
class ModelSpec:
    """Where a model comes from. Exactly one of `name` or `path`; `hf_model` only with `name`."""

    name: str | None = None
    hf_model: str | None = None
    path: str | None = None

    def __post_init__(self) -> None:
        for key in ("name", "hf_model", "path"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ConfigError(f"model spec: `{key}` must be a non-empty string, got {value!r}.")
        if (self.name is None) == (self.path is None):
            raise ConfigError(
                "model spec: give exactly one of `name` (a TransformerLens model name) "
                "or `path` (a local checkpoint directory)."
            )
        if self.hf_model is not None and self.name is None:
            raise ConfigError("model spec: `hf_model` needs `name`, the TransformerLens architecture to load it into.")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelSpec":
        if not isinstance(data, dict):
            raise ConfigError(f"model spec must be a table/dict, got {type(data).__name__}.")
        _check_keys("model spec", data, {"name", "hf_model", "path"})
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def describe(self) -> str:
        if self.path is not None:
            return f"local checkpoint {self.path}"
        if self.hf_model is not None:
            return f"{self.hf_model} (in the {self.name} architecture)"
        return str(self.name)


@dataclass(frozen=True)
class SAESpec:
    """Where an SAE comes from: `release` + `sae_id` (SAELens pretrained) or `path` (local dir)."""

    release: str | None = None
    sae_id: str | None = None
    path: str | None = None

    def __post_init__(self) -> None:
        for key in ("release", "sae_id", "path"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ConfigError(f"SAE spec: `{key}` must be a non-empty string, got {value!r}.")
        if self.path is not None and (self.release is not None or self.sae_id is not None):
            raise ConfigError("SAE spec: give either `path` or `release` + `sae_id`, not both.")
        if self.path is None and (self.release is None or self.sae_id is None):
            raise ConfigError("SAE spec: give `path` (a local SAELens directory) or both `release` and `sae_id`.")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SAESpec":
        if not isinstance(data, dict):
            raise ConfigError(f"SAE spec must be a table/dict, got {type(data).__name__}.")
        _check_keys("SAE spec", data, {"release", "sae_id", "path"})
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def describe(self) -> str:
        return f"local SAE {self.path}" if self.path else f"{self.release} / {self.sae_id}"


# --------------------------------------------------------------------------------------------
# Models


def resolve_path(path: str | Path, root: str | Path | None = None) -> Path:
    """A spec path relative to `root` (the config's directory or the repo), made absolute."""
    p = Path(path)
    if not p.is_absolute() and root is not None:
        p = Path(root) / p
    return p


def _load_local_tokenizer(tokenizer_dir: Path):
    from transformers import AutoTokenizer

    if not (tokenizer_dir / "tokenizer.json").exists():
        raise MissingPathError(f"Tokenizer directory {tokenizer_dir} has no tokenizer.json.")
    return AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)


def load_model(spec: ModelSpec, device: str = "cpu", root: str | Path | None = None) -> "HookedTransformer":
    """Load a HookedTransformer from a spec, in eval mode."""
    if spec.path is not None:
        model = _load_local_model(resolve_path(spec.path, root), device)
    else:
        model = _load_hub_model(spec, device)
    model.eval()
    return model


def _load_hub_model(spec: ModelSpec, device: str) -> "HookedTransformer":
    from transformer_lens import HookedTransformer
    from transformer_lens.loading_from_pretrained import get_official_model_name

    assert spec.name is not None
    try:
        official = get_official_model_name(spec.name)
    except ValueError:
        raise UnknownModelError(
            f"TransformerLens does not know the model {spec.name!r}. Use an official name or alias "
            "(see transformer_lens.loading_from_pretrained.OFFICIAL_MODEL_NAMES), or `path` for a local checkpoint."
        ) from None
    kwargs: dict[str, Any] = {"device": device}
    if spec.hf_model is not None:
        # A finetune in the same architecture: TL converts the HF weights into `official`.
        from transformers import AutoModelForCausalLM, AutoTokenizer

        kwargs["hf_model"] = AutoModelForCausalLM.from_pretrained(spec.hf_model)
        kwargs["tokenizer"] = AutoTokenizer.from_pretrained(spec.hf_model)
    return HookedTransformer.from_pretrained(official, **kwargs)


def _load_local_model(path: Path, device: str) -> "HookedTransformer":
    from safetensors.torch import load_file
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    if not path.is_dir():
        raise MissingPathError(f"Model checkpoint directory {path} does not exist.")
    for required in (LOCAL_MODEL_CONFIG, LOCAL_MODEL_WEIGHTS, LOCAL_MODEL_TOKENIZER):
        if not (path / required).exists():
            raise MissingPathError(
                f"Model checkpoint {path} lacks {required}; a local checkpoint holds "
                f"{LOCAL_MODEL_CONFIG}, {LOCAL_MODEL_WEIGHTS} and {LOCAL_MODEL_TOKENIZER}/."
            )
    try:
        meta = json.loads((path / LOCAL_MODEL_CONFIG).read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path / LOCAL_MODEL_CONFIG} is not valid JSON: {exc}") from None
    if meta.get("format") != LOCAL_MODEL_FORMAT:
        raise ConfigError(f"{path / LOCAL_MODEL_CONFIG}: expected format {LOCAL_MODEL_FORMAT!r}, got {meta.get('format')!r}.")
    tokenizer = _load_local_tokenizer(path / LOCAL_MODEL_TOKENIZER)
    cfg = HookedTransformerConfig(**meta["tl_config"], device=device)
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    state = load_file(str(path / LOCAL_MODEL_WEIGHTS), device=device)
    model.load_state_dict(state, strict=False)
    missing = [k for k in model.state_dict() if k not in state and not k.endswith(("IGNORE", ".mask"))]
    if missing:
        raise ConfigError(f"Checkpoint {path} lacks weights: {missing[:5]}")
    return model.to(device)


def save_local_model(model: "HookedTransformer", path: str | Path, tl_config: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
    """Write a local checkpoint: config.json (TL config), model.safetensors, tokenizer/."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if not k.endswith(("IGNORE", ".mask"))}
    save_file(state, str(path / LOCAL_MODEL_WEIGHTS))
    save_local_tokenizer(model.tokenizer, path / LOCAL_MODEL_TOKENIZER)
    meta = {"format": LOCAL_MODEL_FORMAT, "tl_config": tl_config, **(extra or {})}
    (path / LOCAL_MODEL_CONFIG).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def save_local_tokenizer(tokenizer, path: str | Path) -> None:
    """Save a HF tokenizer so that older transformers (and TL's reload) can read it.

    transformers 5 writes `"tokenizer_class": "TokenizersBackend"`, which transformers 4 does not
    know; PreTrainedTokenizerFast is the same thing under the name both understand.
    """
    path = Path(path)
    tokenizer.save_pretrained(str(path))
    cfg_path = path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg.pop("name_or_path", None)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------------------------
# SAEs


def load_sae(spec: SAESpec, device: str = "cpu", root: str | Path | None = None) -> "SAE":
    from sae_lens import SAE

    if spec.path is not None:
        path = resolve_path(spec.path, root)
        if not path.is_dir():
            raise MissingPathError(f"SAE directory {path} does not exist.")
        for required in (SAE_CONFIG, SAE_WEIGHTS):
            if not (path / required).exists():
                raise MissingPathError(f"SAE directory {path} lacks {required} (an SAELens directory holds {SAE_CONFIG} and {SAE_WEIGHTS}).")
        sae = SAE.load_from_disk(str(path), device=device)
    else:
        from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

        directory = get_pretrained_saes_directory()
        if spec.release not in directory:
            raise UnknownSAEError(
                f"SAELens lists no release {spec.release!r}. See sae_lens/pretrained_saes.yaml "
                "or use `path` for a local SAE directory."
            )
        ids = directory[spec.release].saes_map
        if spec.sae_id not in ids:
            raise UnknownSAEError(
                f"Release {spec.release!r} has no SAE {spec.sae_id!r}; it has e.g. {list(ids)[:5]}."
            )
        sae = SAE.from_pretrained(spec.release, spec.sae_id, device=device)
    sae.eval()
    return sae


def sae_hook_name(sae: "SAE") -> str:
    return sae.cfg.metadata.hook_name


# --------------------------------------------------------------------------------------------
# Checks


def width_at_hook(model: "HookedTransformer", hook: str) -> int:
    """The activation width at `hook`, measured by a one-token forward pass."""
    import torch

    check_hook(model, hook)
    store: dict[str, torch.Size] = {}

    def grab(act, hook):  # noqa: ARG001
        store["shape"] = act.shape
        return act

    layer = _layer_of(hook)
    with torch.no_grad():
        tokens = torch.zeros((1, 1), dtype=torch.long, device=model.cfg.device)
        model.run_with_hooks(
            tokens,
            fwd_hooks=[(hook, grab)],
            return_type=None,
            stop_at_layer=None if layer is None else layer + 1,
        )
    shape = store["shape"]
    if hook.endswith("hook_z") or hook.endswith(("hook_q", "hook_k", "hook_v")):
        return int(shape[-2] * shape[-1])
    return int(shape[-1])


def _layer_of(hook: str) -> int | None:
    parts = hook.split(".")
    if len(parts) > 1 and parts[0] == "blocks" and parts[1].isdigit():
        return int(parts[1])
    return None


def check_hook(model: "HookedTransformer", hook: str) -> None:
    if hook not in model.hook_dict:
        near = [h for h in model.hook_dict if h.split(".")[-1] == hook.split(".")[-1]][:6]
        raise HookNotFoundError(
            f"Hook {hook!r} is not in the model ({model.cfg.n_layers} layers). "
            f"Hooks of that kind: {near or sorted(model.hook_dict)[:6]}."
        )


def check_sae_fits(sae: "SAE", model: "HookedTransformer", hook: str, label: str = "SAE") -> None:
    width = width_at_hook(model, hook)
    if int(sae.cfg.d_in) != width:
        raise DimensionMismatchError(
            f"{label} has d_in={sae.cfg.d_in} but the model's activation at {hook} has width {width}. "
            "Pick the SAE trained for this model and hook."
        )


@dataclass
class TokenizerComparison:
    """How far two vocabularies agree (METHODS.md section 0)."""

    n_base: int
    n_finetuned: int
    n_shared_strings: int
    n_matching_ids: int
    only_in_base: list[str] = field(default_factory=list)
    only_in_finetuned: list[str] = field(default_factory=list)
    same_string_different_id: list[tuple[str, int, int]] = field(default_factory=list)
    n_only_in_base: int = 0
    n_only_in_finetuned: int = 0
    n_same_string_different_id: int = 0

    @property
    def matching_id_share(self) -> float:
        union = self.n_base + self.n_finetuned - self.n_shared_strings
        return self.n_matching_ids / union if union else 1.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["matching_id_share"] = self.matching_id_share
        return d

    def summary(self) -> str:
        return (
            f"{self.matching_id_share:.4%} of tokens have the same id in both tokenizers "
            f"({self.n_only_in_base} only in base, {self.n_only_in_finetuned} only in finetuned, "
            f"{self.n_same_string_different_id} same string with a different id)."
        )


def compare_vocabularies(base_vocab: dict[str, int], finetuned_vocab: dict[str, int], n_examples: int = 20) -> TokenizerComparison:
    shared = base_vocab.keys() & finetuned_vocab.keys()
    only_b = sorted(base_vocab.keys() - finetuned_vocab.keys(), key=lambda s: base_vocab[s])
    only_f = sorted(finetuned_vocab.keys() - base_vocab.keys(), key=lambda s: finetuned_vocab[s])
    differ = sorted(
        ((s, base_vocab[s], finetuned_vocab[s]) for s in shared if base_vocab[s] != finetuned_vocab[s]),
        key=lambda t: t[1],
    )
    return TokenizerComparison(
        n_base=len(base_vocab),
        n_finetuned=len(finetuned_vocab),
        n_shared_strings=len(shared),
        n_matching_ids=len(shared) - len(differ),
        only_in_base=only_b[:n_examples],
        only_in_finetuned=only_f[:n_examples],
        same_string_different_id=differ[:n_examples],
        n_only_in_base=len(only_b),
        n_only_in_finetuned=len(only_f),
        n_same_string_different_id=len(differ),
    )


def compare_tokenizers(base_tokenizer, finetuned_tokenizer) -> TokenizerComparison:
    return compare_vocabularies(base_tokenizer.get_vocab(), finetuned_tokenizer.get_vocab())


def check_tokenizers(comparison: TokenizerComparison, min_matching_id_share: float = DEFAULT_MIN_MATCHING_ID_SHARE) -> None:
    if comparison.matching_id_share < min_matching_id_share:
        raise TokenizerMismatchError(
            "The base and finetuned tokenizers do not match: "
            + comparison.summary()
            + f" The threshold is {min_matching_id_share:.2%}. Feeding the same token ids to both models "
            "would compare different text, so every transfer metric would be meaningless. "
            "Use a finetune that keeps the base tokenizer."
        )


# --------------------------------------------------------------------------------------------
# The pair


@dataclass
class LoadedPair:
    base: "HookedTransformer"
    finetuned: "HookedTransformer"
    hook: str
    saes: dict[str, "SAE"]  # "base_sae" and optionally "finetuned_sae"
    tokenizer_comparison: TokenizerComparison


def load_pair(
    base: ModelSpec,
    finetuned: ModelSpec,
    base_sae: SAESpec,
    finetuned_sae: SAESpec | None = None,
    hook: str | None = None,
    min_matching_id_share: float = DEFAULT_MIN_MATCHING_ID_SHARE,
    device: str = "cpu",
    root: str | Path | None = None,
) -> LoadedPair:
    """Load and check everything a transfer study needs; raise an ExplorerError on any mismatch."""
    base_model = load_model(base, device, root)
    finetuned_model = load_model(finetuned, device, root)
    comparison = compare_tokenizers(base_model.tokenizer, finetuned_model.tokenizer)
    check_tokenizers(comparison, min_matching_id_share)
    saes = {"base_sae": load_sae(base_sae, device, root)}
    if finetuned_sae is not None:
        saes["finetuned_sae"] = load_sae(finetuned_sae, device, root)
    hook = hook or sae_hook_name(saes["base_sae"])
    for label, model in (("base", base_model), ("finetuned", finetuned_model)):
        for sae_name, sae in saes.items():
            check_hook(model, hook)
            check_sae_fits(sae, model, hook, label=f"{sae_name} on the {label} model")
    return LoadedPair(base_model, finetuned_model, hook, saes, comparison)
