"""Loading a base/finetuned model pair and its SAEs from specs, with checks that fail clearly.

A model spec is one of
  * a local directory:                       ModelSpec(path="models/my-finetune")
      - a Hugging Face `save_pretrained` directory (config.json with model_type, *.safetensors,
        tokenizer files), or a PEFT/LoRA adapter directory (adapter_config.json: merged into its
        base model through peft), loaded through TransformerLens with no conversion step
        (explorer/hf_loading.py: HookedTransformer where TransformerLens converts the
        architecture, TransformerBridge otherwise);
      - this project's own checkpoint (config.json with "format": LOCAL_MODEL_FORMAT,
        model.safetensors, tokenizer/; as `save_local_model` writes), told apart by its config;
  * a TransformerLens model name:            ModelSpec(name="gemma-2b")
  * a finetune in that architecture:         ModelSpec(name="gemma-2b", hf_model="shahdishank/gemma-2b-it-finetune-python-codes")
      (`hf_model` a hub id or a local directory; a finetune whose config disagrees with the named
      architecture is a ConfigError);
  * any hub model, through TransformerBridge: ModelSpec(hub="Qwen/Qwen2.5-0.5B")

An SAE spec is one of
  * an SAELens release + SAE id:             SAESpec(release="gemma-2b-res-jb", sae_id="blocks.6.hook_resid_post")
  * a local SAELens directory:               SAESpec(path="data/demo/saes/base_sae")
    (cfg.json + sae_weights.safetensors, as SAELens's `save_inference_model` writes)

Both models are loaded with the same device, dtype and weight processing (by default what the
base SAE's `model_from_pretrained_kwargs` asks for on top of no processing, as SAELens 6 loads
models: explorer/hf_loading.py). Hub failures are one-line HubErrors; unknown names fail before
any network call. Weights are read with safetensors (or, for hub models that only ship
pytorch_model.bin, by transformers with torch.load(weights_only=True)).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from explorer.errors import (
    ConfigError,
    DimensionMismatchError,
    HookMismatchError,
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
    """Where a model comes from. Exactly one of `name`, `path` or `hub`; `hf_model` only with `name`."""

    name: str | None = None
    hf_model: str | None = None
    path: str | None = None
    hub: str | None = None

    KEYS = ("name", "hf_model", "path", "hub")

    def __post_init__(self) -> None:
        for key in self.KEYS:
            value = getattr(self, key)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ConfigError(f"model spec: `{key}` must be a non-empty string, got {value!r}.")
        if sum(getattr(self, k) is not None for k in ("name", "path", "hub")) != 1:
            raise ConfigError(
                "model spec: give exactly one of `name` (a TransformerLens model name), `path` (a local "
                "directory: a Hugging Face save_pretrained model or this project's checkpoint) or `hub` (a Hugging Face hub id)."
            )
        if self.hf_model is not None and self.name is None:
            raise ConfigError("model spec: `hf_model` needs `name`, the TransformerLens architecture to load it into.")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelSpec":
        if not isinstance(data, dict):
            raise ConfigError(f"model spec must be a table/dict, got {type(data).__name__}.")
        _check_keys("model spec", data, set(cls.KEYS))
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def describe(self) -> str:
        if self.path is not None:
            return f"local model {self.path}"
        if self.hub is not None:
            return f"hub model {self.hub}"
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


def load_model(
    spec: ModelSpec, device: str = "cpu", root: str | Path | None = None, dtype: str = "float32", processing: dict[str, bool] | None = None
):
    """Load a model from a spec, in eval mode (processing: hf_loading.PROCESSING_FLAGS; default none)."""
    return load_model_with_info(spec, device, root, dtype, processing)[0]


def load_model_with_info(
    spec: ModelSpec, device: str = "cpu", root: str | Path | None = None, dtype: str = "float32", processing: dict[str, bool] | None = None
) -> tuple[Any, dict[str, Any]]:
    """(model in eval mode, how it was loaded: loader, format, source, architecture, vocabulary sizes)."""
    from explorer import hf_loading as H

    flags = {**H.NO_PROCESSING, **(processing or {})}
    H.check_dtype(dtype)
    device = H.resolve_device(device)
    if spec.path is not None:
        path = resolve_path(spec.path, root)
        model, info = _load_local_model(path, device, dtype, flags)
    elif spec.hub is not None:
        model, info = _load_hub_model(spec.hub, device, dtype, flags)
    else:
        model, info = _load_named_model(spec, device, dtype, flags, root)
    model.eval()
    info.update(
        device=device, dtype=dtype, d_vocab=output_vocab_size(model),
        n_tokenizer=len(model.tokenizer) if model.tokenizer is not None else None, n_layers=int(model.cfg.n_layers),
        d_model=int(model.cfg.d_model),
    )
    return model, info


def output_vocab_size(model) -> int:
    """The number of logits the model outputs (W_U's columns)."""
    out = getattr(model.cfg, "d_vocab_out", None)
    return int(out) if out and out > 0 else int(model.cfg.d_vocab)


def _load_named_model(spec: ModelSpec, device: str, dtype: str, flags: dict[str, bool], root: str | Path | None = None):
    import torch
    from transformer_lens import HookedTransformer
    from transformer_lens import loading_from_pretrained as tl_loading

    from explorer import hf_loading as H

    assert spec.name is not None
    try:
        official = tl_loading.get_official_model_name(spec.name)
    except ValueError:
        raise UnknownModelError(
            f"TransformerLens does not know the model {spec.name!r}. Use an official name or alias "
            "(see transformer_lens.loading_from_pretrained.OFFICIAL_MODEL_NAMES), `path` for a local directory, "
            "or `hub` for any hub model (TransformerBridge)."
        ) from None
    work = torch.float32 if any(flags.values()) else H.torch_dtype(dtype)
    info: dict[str, Any] = {"loader": "HookedTransformer", "format": "transformer_lens name", "source": official}
    if spec.hf_model is None:
        with H.hub_errors(f"model {official}"):
            model = HookedTransformer.from_pretrained(official, device="cpu", dtype=work, **flags)
        if work != H.torch_dtype(dtype):
            model = model.to(H.torch_dtype(dtype), print_details=False)
        info["architecture"] = model.cfg.original_architecture
        return model.to(device, print_details=False), info
    # a finetune in the named architecture: its config must agree with the named one
    with H.hub_errors(f"the TransformerLens config of {official}"):
        named = tl_loading.get_pretrained_model_config(official, fold_ln=flags["fold_ln"], device="cpu", dtype=work)
    source = spec.hf_model
    local = resolve_path(Path(source).expanduser(), root)
    if local.is_dir():  # a local directory (relative paths: against the config's folder); else a hub id
        source = str(local.resolve())
    hf_model = H.load_hf_causal_lm(source, dtype if work != torch.float32 else "float32")
    own = H.hooked_config(hf_model, flags, work, "cpu", official)
    diff = H.config_differences(named, own)
    if diff:
        shown = ", ".join(f"{k}: {a!r} vs {b!r}" for k, (a, b) in list(diff.items())[:6])
        raise ConfigError(
            f"hf_model {spec.hf_model!r} is not a {official} model: its config disagrees with the named architecture ({shown}; "
            "named vs hf_model). Name the architecture it was finetuned from, or use `path` for a local directory."
        )
    named.d_vocab, named.d_vocab_out = own.d_vocab, own.d_vocab_out  # added tokens: the finetune's own vocabulary
    tokenizer = H.load_tokenizer(H.adapter_tokenizer_source(source))
    model = H.hooked_from_hf(hf_model, tokenizer, flags, dtype, device, official, cfg=named)
    info.update(format="huggingface finetune in a TransformerLens architecture", source=source, architecture=H.architecture_of(hf_model))
    return model, info


def _load_hub_model(hub_id: str, device: str, dtype: str, flags: dict[str, bool]):
    from explorer import hf_loading as H

    if Path(hub_id).expanduser().is_dir():
        raise ConfigError(f"hub = {hub_id!r} is a local directory; use `path = {hub_id!r}` for local models.")
    H.check_hub_reachable(hub_id, f"model {hub_id}")
    adapter = H._adapter_config(hub_id)
    if adapter is not None:
        merged = H._merge_adapter(hub_id, adapter, dtype)
        tokenizer = H.load_tokenizer(H.adapter_tokenizer_source(hub_id))
        model = H.bridge_from_source(adapter["base_model_name_or_path"], tokenizer, flags, dtype, device, hf_model=merged)
        arch = H.architecture_of(merged)
    else:
        model = H.bridge_from_source(hub_id, None, flags, dtype, device)
        arch = getattr(model.cfg, "architecture", None)
    return model, {"loader": "TransformerBridge", "format": "hub", "source": hub_id, "architecture": arch}


def _load_local_model(path: Path, device: str, dtype: str, flags: dict[str, bool]):
    from explorer import hf_loading as H

    if not path.is_dir():
        raise MissingPathError(f"Model directory {path} does not exist.")
    kind = H.directory_kind(path)
    if kind == "hf":
        H._check_hf_dir(path)
    if kind in ("hf", "adapter"):
        model, loader = H.hooked_or_bridge(str(path.resolve()), flags, dtype, device, path.name)
        fmt = "huggingface save_pretrained" if kind == "hf" else "peft adapter merged into its base model"
        return model, {"loader": loader, "format": fmt, "source": str(path), "architecture": getattr(model.cfg, "original_architecture", None) or getattr(model.cfg, "architecture", None)}
    return _load_own_checkpoint(path, device, dtype, flags), {"loader": "HookedTransformer", "format": LOCAL_MODEL_FORMAT, "source": str(path), "architecture": "HookedTransformer"}


def _load_own_checkpoint(path: Path, device: str, dtype: str, flags: dict[str, bool]):
    """This project's checkpoint format (config.json with the TL config, model.safetensors, tokenizer/)."""
    from safetensors.torch import load_file
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from explorer import hf_loading as H

    for required in (LOCAL_MODEL_CONFIG, LOCAL_MODEL_WEIGHTS, LOCAL_MODEL_TOKENIZER):
        if not (path / required).exists():
            raise MissingPathError(
                f"Model checkpoint {path} lacks {required}; a local model is a Hugging Face save_pretrained directory "
                f"(config.json with model_type, *.safetensors, tokenizer files) or this project's checkpoint "
                f"({LOCAL_MODEL_CONFIG}, {LOCAL_MODEL_WEIGHTS} and {LOCAL_MODEL_TOKENIZER}/)."
            )
    try:
        meta = json.loads((path / LOCAL_MODEL_CONFIG).read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path / LOCAL_MODEL_CONFIG} is not valid JSON: {exc}") from None
    if meta.get("format") != LOCAL_MODEL_FORMAT:
        raise ConfigError(
            f"{path / LOCAL_MODEL_CONFIG}: neither a Hugging Face config (no model_type) nor this project's checkpoint "
            f"(expected format {LOCAL_MODEL_FORMAT!r}, got {meta.get('format')!r})."
        )
    tokenizer = _load_local_tokenizer(path / LOCAL_MODEL_TOKENIZER)
    tl_config = dict(meta["tl_config"])
    if flags["fold_ln"] and tl_config.get("normalization_type") in ("LN", "RMS"):
        tl_config["normalization_type"] += "Pre"
    cfg = HookedTransformerConfig(**tl_config, device=device)
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    state = load_file(str(path / LOCAL_MODEL_WEIGHTS), device=device)
    if any(flags.values()):
        model.load_and_process_state_dict(state, **flags)
    else:
        model.load_state_dict(state, strict=False)
        missing = [k for k in model.state_dict() if k not in state and not k.endswith(("IGNORE", ".mask"))]
        if missing:
            raise ConfigError(f"Checkpoint {path} lacks weights: {missing[:5]}")
    if dtype != "float32":
        model = model.to(H.torch_dtype(dtype), print_details=False)
    return model.to(device, print_details=False)


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
    """An SAELens SAE in eval mode, in its own dtype (activations are cast to it when encoded)."""
    import warnings

    from sae_lens import SAE

    from explorer import hf_loading as H

    device = H.resolve_device(device)
    with warnings.catch_warnings():  # "non-empty model_from_pretrained_kwargs": acted on by load_pair's processing
        warnings.filterwarnings("ignore", message="(?s).*model_from_pretrained_kwargs")
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
            with H.hub_errors(f"SAE {spec.release} / {spec.sae_id}"):
                sae = SAE.from_pretrained(spec.release, spec.sae_id, device=device)
    sae.eval()
    return sae


def sae_hook_name(sae: "SAE") -> str:
    return sae.cfg.metadata.hook_name


SAE_DTYPES = ("float32", "float64", "bfloat16", "float16")


def check_sae(sae: "SAE", label: str, hook: str, allow_hook_mismatch: bool = False) -> None:
    """What must hold before an SAE is run at `hook`: its own hook (unless overridden), a supported
    activation normalization, a float dtype, whole-hook reading."""
    own = sae_hook_name(sae)
    if own != hook and not allow_hook_mismatch:
        raise HookMismatchError(
            f"{label} was trained at {own!r}, but the run's hook is {hook!r}. Leave `hook` out to use the SAE's own, "
            "or set allow_hook_mismatch = true to run it at another hook on purpose."
        )
    norm = getattr(sae.cfg, "normalize_activations", "none")
    if norm == "expected_average_only_in":
        raise ConfigError(
            f"{label} expects its inputs scaled by a dataset-wide norm factor (normalize_activations="
            "'expected_average_only_in') that is not folded into its weights, and SAELens records no factor for it. "
            "Fold it first (sae.fold_activation_norm_scaling_factor(factor); sae.save_model(dir))."
        )
    dtype = str(sae.dtype).replace("torch.", "")
    if dtype not in SAE_DTYPES:
        raise ConfigError(f"{label} has dtype {dtype}; supported SAE dtypes are {list(SAE_DTYPES)}.")
    if getattr(sae.cfg.metadata, "hook_head_index", None) is not None:
        raise ConfigError(f"{label} reads a single attention head (hook_head_index); only whole-hook SAEs are supported.")


def sae_info(sae: "SAE") -> dict[str, Any]:
    meta = sae.cfg.metadata
    return {
        "architecture": sae.cfg.architecture(), "d_in": int(sae.cfg.d_in), "d_sae": int(sae.cfg.d_sae), "hook_name": meta.hook_name,
        "dtype": str(sae.dtype).replace("torch.", ""), "normalize_activations": getattr(sae.cfg, "normalize_activations", "none"),
        "context_size": getattr(meta, "context_size", None), "prepend_bos": getattr(meta, "prepend_bos", None),
        "model_name": getattr(meta, "model_name", None), "model_from_pretrained_kwargs": getattr(meta, "model_from_pretrained_kwargs", None) or {},
    }


def sae_context_warnings(saes: dict[str, "SAE"], context_size: int, starts_with_bos: bool) -> list[str]:
    """Warnings where an SAE was trained on other contexts than the run's (length, BOS)."""
    out = []
    for name, sae in saes.items():
        info = sae_info(sae)
        ctx = info["context_size"]
        if isinstance(ctx, int) and ctx > 0 and ctx != context_size:
            how = "positions beyond its context are outside what it saw" if context_size > ctx else "later positions it saw are not sampled"
            out.append(f"{name} was trained on contexts of {ctx} tokens; this run uses {context_size} ({how}).")
        bos = info["prepend_bos"]
        if isinstance(bos, bool) and bos != starts_with_bos:
            out.append(
                f"{name} was trained with prepend_bos={bos}, but this run's sequences {'start' if starts_with_bos else 'do not start'} with BOS."
            )
    return out


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
    shared_vocab: int = 0  # logits 0..shared_vocab-1 mean the same tokens on both models (0: unknown, set by load_pair)
    loading: dict[str, Any] = field(default_factory=dict)  # how everything was loaded (the manifest's `loading`)
    warnings: list[str] = field(default_factory=list)


def check_vocabularies(base_model, finetuned_model, min_matching_id_share: float = DEFAULT_MIN_MATCHING_ID_SHARE) -> dict[str, Any]:
    """The vocabulary both models' logits share: ids 0..n_shared-1. A finetune whose vocabulary is
    the base's plus tokens added at the END (chat tokens) shares the base's; tokens that differ
    inside the shared range beyond the tolerance are a TokenizerMismatchError, raised here,
    before any work (logit statistics would compare different tokens)."""
    n_b, n_f = output_vocab_size(base_model), output_vocab_size(finetuned_model)
    n_shared = min(n_b, n_f)
    tb, tf = base_model.tokenizer, finetuned_model.tokenizer
    n_tok = min(len(tb), len(tf), n_shared)
    pb, pf = tb.convert_ids_to_tokens(list(range(n_tok))), tf.convert_ids_to_tokens(list(range(n_tok)))
    differ = [i for i in range(n_tok) if pb[i] != pf[i]]
    if len(differ) > (1 - min_matching_id_share) * max(n_tok, 1):
        raise TokenizerMismatchError(
            f"The base and finetuned tokenizers do not match: {len(differ)} of the {n_tok} token ids both have mean different "
            f"tokens (e.g. id {differ[0]}: {pb[differ[0]]!r} vs {pf[differ[0]]!r}), beyond the {1 - min_matching_id_share:.2%} "
            "tolerated. Tokens added by a finetune must come after the base vocabulary."
        )
    bigger = finetuned_model if n_f > n_b else base_model
    extra_ids = list(range(n_shared, max(n_b, n_f)))
    extra = bigger.tokenizer.convert_ids_to_tokens([i for i in extra_ids if i < len(bigger.tokenizer)])
    info = {
        "n_base": n_b, "n_finetuned": n_f, "n_shared": n_shared, "n_differing_in_shared": len(differ),
        "added_at_end": {"model": "finetuned" if n_f > n_b else "base", "n": len(extra_ids), "tokens": [str(t) for t in extra[:20]]} if extra_ids else None,
        "logits_on": f"token ids 0..{n_shared - 1}" + (" (the shared vocabulary: logit statistics leave out the tokens only one model has)" if n_b != n_f else ""),
    }
    return info


def load_pair(
    base: ModelSpec,
    finetuned: ModelSpec,
    base_sae: SAESpec,
    finetuned_sae: SAESpec | None = None,
    hook: str | None = None,
    min_matching_id_share: float = DEFAULT_MIN_MATCHING_ID_SHARE,
    device: str = "cpu",
    root: str | Path | None = None,
    dtype: str = "float32",
    processing: str | dict[str, bool] = "auto",
    allow_hook_mismatch: bool = False,
) -> LoadedPair:
    """Load and check everything a transfer study needs; raise an ExplorerError on any mismatch.

    SAEs load first (small), so that `processing="auto"` can follow the base SAE's
    `model_from_pretrained_kwargs`; both models then load with the same device, dtype and processing."""
    from explorer import hf_loading as H

    device = H.resolve_device(device)
    H.check_dtype(dtype)
    saes = {"base_sae": load_sae(base_sae, device, root)}
    if finetuned_sae is not None:
        saes["finetuned_sae"] = load_sae(finetuned_sae, device, root)
    flags, flags_source = H.resolve_processing(processing, saes["base_sae"])
    warnings_: list[str] = []
    if "finetuned_sae" in saes and processing == "auto":
        other, _ = H.processing_from_sae(saes["finetuned_sae"])
        if other != flags:
            warnings_.append(
                f"finetuned_sae asks for other model processing ({other}) than base_sae ({flags}); both models use base_sae's, "
                "so that they are compared in one basis."
            )
    _, ignored = H.processing_from_sae(saes["base_sae"])
    if ignored and processing == "auto":
        warnings_.append(f"base_sae's model_from_pretrained_kwargs {sorted(ignored)} are not processing flags and are not applied.")
    base_model, base_info = load_model_with_info(base, device, root, dtype, flags)
    finetuned_model, finetuned_info = load_model_with_info(finetuned, device, root, dtype, flags)
    comparison = compare_tokenizers(base_model.tokenizer, finetuned_model.tokenizer)
    check_tokenizers(comparison, min_matching_id_share)
    vocab = check_vocabularies(base_model, finetuned_model, min_matching_id_share)
    hook = hook or sae_hook_name(saes["base_sae"])
    for label, model in (("base", base_model), ("finetuned", finetuned_model)):
        for sae_name, sae in saes.items():
            check_hook(model, hook)
            check_sae_fits(sae, model, hook, label=f"{sae_name} on the {label} model")
    for sae_name, sae in saes.items():
        check_sae(sae, sae_name, hook, allow_hook_mismatch)
        if sae_hook_name(sae) != hook:
            warnings_.append(f"{sae_name} was trained at {sae_hook_name(sae)!r} and runs at {hook!r} (allow_hook_mismatch).")
    loading = {
        "device": device, "dtype": dtype, "processing": flags, "processing_source": flags_source,
        "models": {"base": base_info, "finetuned": finetuned_info}, "saes": {k: sae_info(v) for k, v in saes.items()},
        "vocabulary": vocab,
    }
    return LoadedPair(base_model, finetuned_model, hook, saes, comparison, vocab["n_shared"], loading, warnings_)
