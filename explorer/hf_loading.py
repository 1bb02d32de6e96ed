"""Models as users bring them, into TransformerLens: Hugging Face `save_pretrained` directories,
hub ids, LoRA adapters; on a chosen device and dtype, with the weight processing the SAE expects.

Which TransformerLens class:
  * `HookedTransformer` where TransformerLens converts the architecture (GPT-2, Llama, Mistral,
    Qwen, Gemma, ... `HOOKED_ARCHITECTURES`). Its own local-directory config loader breaks under
    transformers 5 (it reads `GPT2Config.n_ctx`, and a directory whose name contains "llama" or
    "gemma" is taken for a hub name), so the HookedTransformerConfig is built here from the
    loaded model's own config (`hooked_config`: TransformerLens's converter on a copy of
    config.json in a neutrally named directory, with the transformers-5 fields it expects), and
    the weights go through TransformerLens's own conversion (`get_pretrained_state_dict(...,
    hf_model=...)`), then `load_and_process_state_dict` with the processing flags;
  * `TransformerBridge.boot_transformers` for every other architecture and for `hub` specs (raw HF
    weights; `process_weights` when processing is asked for).

Processing (`PROCESSING_FLAGS`): SAELens 6 trains and evaluates on
`HookedTransformer.from_pretrained_no_processing(model, **sae.cfg.metadata.model_from_pretrained_kwargs)`,
so `processing_from_sae` starts from no processing and applies the flags those kwargs set.

Devices: "cpu", "cuda" (or "cuda:N"), "mps", "auto" (cuda, else mps, else cpu); asking for a
device the machine lacks is a ConfigError. Dtypes: "float32", "bfloat16", "float16". Models with
processing are converted and processed in float32, then cast (TransformerLens warns that folding
in reduced precision loses accuracy).

Hub failures (no network, offline mode without a cached copy, a gated repository without
HF_TOKEN, an unknown repository) become one-line `HubError`s (`hub_errors`).
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from explorer.errors import ConfigError, ExplorerError, MissingPathError

PROCESSING_FLAGS = ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases", "refactor_factored_attn_matrices")
NO_PROCESSING = dict.fromkeys(PROCESSING_FLAGS, False)
# HookedTransformer.from_pretrained's defaults
TRANSFORMER_LENS_PROCESSING = {"fold_ln": True, "center_writing_weights": True, "center_unembed": True, "fold_value_biases": True, "refactor_factored_attn_matrices": False}
PROCESSING_NAMES = ("auto", "none", "transformer_lens")

DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda", "mps")

# Causal LMs whose weights TransformerLens's get_pretrained_state_dict converts into a HookedTransformer.
HOOKED_ARCHITECTURES = frozenset(
    {
        "GPT2LMHeadModel", "GPTNeoForCausalLM", "OPTForCausalLM", "GPTJForCausalLM", "GPTNeoXForCausalLM",
        "LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM", "BloomForCausalLM", "Qwen2ForCausalLM",
        "Qwen3ForCausalLM", "PhiForCausalLM", "Phi3ForCausalLM", "GemmaForCausalLM", "Gemma2ForCausalLM",
        "Gemma3ForCausalLM", "OlmoForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM", "OlmoeForCausalLM",
        "GptOssForCausalLM", "ApertusForCausalLM",
    }
)
HF_CONFIG = "config.json"
ADAPTER_CONFIG = "adapter_config.json"
LORA_HELP = (
    "Merge it into its base model with peft (`pip install peft`; then PeftModel.from_pretrained(base, adapter)"
    ".merge_and_unload().save_pretrained(dir)), or install peft and the explorer merges it when loading."
)


class HubError(ExplorerError):
    """A model or SAE could not be fetched from the Hugging Face hub (network, access, name)."""


# --------------------------------------------------------------------------------------------
# Device, dtype, processing


def resolve_device(device: str) -> str:
    """"auto" -> the best device present; an absent device is a ConfigError (not a RuntimeError later)."""
    import torch

    if not isinstance(device, str) or not device.strip():
        raise ConfigError(f"device must be one of {list(DEVICES)} (or cuda:N), got {device!r}.")
    device = device.strip().lower()
    kind, _, index = device.partition(":")
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if kind not in DEVICES or kind == "auto" or (index and (kind != "cuda" or not index.isdigit())):
        raise ConfigError(f"device must be one of {list(DEVICES)} (or cuda:N), got {device!r}.")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device {device!r}: this machine has no CUDA GPU that torch can use (torch {torch.__version__}, "
                f"CUDA build: {torch.version.cuda or 'none'}). Use --device cpu or auto."
            )
        if index and int(index) >= torch.cuda.device_count():
            raise ConfigError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s).")
    if kind == "mps" and not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
        raise ConfigError(f"device {device!r}: Apple's MPS backend is not available on this machine. Use --device cpu or auto.")
    return device


def check_dtype(dtype: Any, what: str = "dtype") -> str:
    if dtype not in DTYPES:
        raise ConfigError(f"{what} must be one of {list(DTYPES)}, got {dtype!r}.")
    return dtype


def torch_dtype(dtype: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[check_dtype(dtype)]


def check_processing(setting: Any) -> str | dict[str, bool]:
    """A config's processing setting: a name of PROCESSING_NAMES, or a table of PROCESSING_FLAGS."""
    if isinstance(setting, str):
        if setting not in PROCESSING_NAMES:
            raise ConfigError(f"processing must be one of {list(PROCESSING_NAMES)} or a table of {list(PROCESSING_FLAGS)}, got {setting!r}.")
        return setting
    if isinstance(setting, dict):
        unknown = sorted(set(setting) - set(PROCESSING_FLAGS))
        if unknown:
            raise ConfigError(f"processing: unknown flag(s) {unknown}; the flags are {list(PROCESSING_FLAGS)}.")
        bad = [k for k, v in setting.items() if not isinstance(v, bool)]
        if bad:
            raise ConfigError(f"processing: {bad} must be true or false.")
        return dict(setting)
    raise ConfigError(f"processing must be one of {list(PROCESSING_NAMES)} or a table of {list(PROCESSING_FLAGS)}, got {setting!r}.")


def processing_from_sae(sae) -> tuple[dict[str, bool], dict[str, Any]]:
    """The flags SAELens 6 loads the model with for this SAE: no processing, then the processing
    flags of `model_from_pretrained_kwargs`. Returns (flags, the other kwargs, which are not applied)."""
    kwargs = dict(getattr(sae.cfg.metadata, "model_from_pretrained_kwargs", None) or {})
    flags = dict(NO_PROCESSING)
    for k in PROCESSING_FLAGS:
        if k in kwargs:
            flags[k] = bool(kwargs.pop(k))
    return flags, kwargs


def resolve_processing(setting: str | dict[str, bool], sae=None) -> tuple[dict[str, bool], str]:
    """(flags, where they come from) for a config setting; "auto" reads the base SAE's cfg."""
    setting = check_processing(setting)
    if isinstance(setting, dict):
        return {**NO_PROCESSING, **setting}, "config"
    if setting == "none":
        return dict(NO_PROCESSING), "config: none"
    if setting == "transformer_lens":
        return dict(TRANSFORMER_LENS_PROCESSING), "config: transformer_lens (HookedTransformer.from_pretrained's defaults)"
    if sae is None:
        return dict(NO_PROCESSING), "auto: no SAE, no processing"
    flags, _ = processing_from_sae(sae)
    kwargs = getattr(sae.cfg.metadata, "model_from_pretrained_kwargs", None) or {}
    return flags, f"auto: the base SAE's model_from_pretrained_kwargs {json.dumps(kwargs, sort_keys=True)} on from_pretrained_no_processing"


# --------------------------------------------------------------------------------------------
# Hub errors


def _hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def describe_hub_error(exc: BaseException) -> str | None:
    """One plain line for a failure to fetch from the hub, or None when `exc` is something else."""
    from huggingface_hub import errors as E

    chain, seen = [], set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ or e.__context__
    for e in chain:
        if isinstance(e, E.GatedRepoError):
            token = "HF_TOKEN is not set" if not os.environ.get("HF_TOKEN") else "the token in HF_TOKEN has no access"
            return f"the repository is gated and {token}: accept its conditions on its Hugging Face page, then set HF_TOKEN to a token of that account."
        if isinstance(e, E.RepositoryNotFoundError):
            return "no such repository on the Hugging Face hub (check the id; a private repository also needs HF_TOKEN)."
        if isinstance(e, E.RevisionNotFoundError):
            return "the repository has no such revision."
        if isinstance(e, E.OfflineModeIsEnabled) or isinstance(e, E.LocalEntryNotFoundError):
            offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
            why = "HF_HUB_OFFLINE is set" if offline else f"the hub ({_hub_endpoint()}) cannot be reached"
            return f"it is not in the local Hugging Face cache and {why}. Connect to the network (or unset HF_HUB_OFFLINE), or point HF_HOME / HF_HUB_CACHE at a cache that holds it."
        if isinstance(e, E.EntryNotFoundError):
            return f"a file it needs is missing from the repository ({_first_line(e)})."
        if isinstance(e, E.HfHubHTTPError):
            status = getattr(getattr(e, "response", None), "status_code", None)
            return f"the hub answered HTTP {status}: {_first_line(e)}"
    for e in chain:
        name = type(e).__module__.split(".")[0]
        if name in ("httpx", "httpcore", "requests", "urllib3") or isinstance(e, (ConnectionError, TimeoutError)):
            return f"cannot reach the Hugging Face hub at {_hub_endpoint()} ({type(e).__name__}: {_first_line(e)}). Check the network or proxy, or set HF_HUB_OFFLINE=1 to use the local cache."
    for e in chain:
        text = str(e)
        if isinstance(e, OSError) and ("huggingface.co" in text or "hf.co" in text or "valid model identifier" in text or "couldn't connect" in text.lower()):
            return _first_line(e)
    return None


_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def check_hub_reachable(repo_id: str, what: str, timeout_s: float = 3.0) -> None:
    """Fail at once, in one line, when `repo_id` is not in the local Hugging Face cache and the
    hub's endpoint refuses a connection: huggingface_hub retries each file 5 times with backoff
    (~23 s a file, about a minute for a model) before it says the same. Skipped when
    HF_HUB_OFFLINE is set (the hub client fails fast then), when a proxy is configured (a direct
    connection says nothing about the proxy's), and when the repository is cached (the client
    falls back to the cache)."""
    import socket
    import time
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on") or any(os.environ.get(v) for v in _PROXY_VARS):
        return
    try:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
            return
    except Exception:  # noqa: BLE001 - an id the cache lookup rejects: let the real load say why
        return
    url = urlparse(_hub_endpoint())
    if not url.hostname:
        return
    port = url.port or (443 if url.scheme == "https" else 80)
    last: OSError | None = None
    for attempt in range(2):  # one retry: a dropped packet is not a network that is down
        try:
            socket.create_connection((url.hostname, port), timeout=timeout_s).close()
            return
        except OSError as exc:
            last = exc
            if attempt == 0:
                time.sleep(0.5)
    raise HubError(f"{what}: it is not in the local Hugging Face cache and the hub ({_hub_endpoint()}) cannot be reached "
                   f"({type(last).__name__}: {_first_line(last)}). Connect to the network (or check HF_ENDPOINT), or point HF_HOME / HF_HUB_CACHE at a cache that holds it.")


def _first_line(e: BaseException) -> str:
    lines = [s.strip() for s in str(e).splitlines() if s.strip()]
    return (lines[0] if lines else type(e).__name__)[:300]


@contextmanager
def hub_errors(what: str) -> Iterator[None]:
    """Turn hub failures inside the block into one-line HubErrors that name `what`."""
    try:
        yield
    except ExplorerError:
        raise
    except Exception as exc:  # noqa: BLE001 - classified below, re-raised when not a hub failure
        msg = describe_hub_error(exc)
        if msg is None:
            raise
        raise HubError(f"{what}: {msg}") from None


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """No per-file progress bars or info lines from transformers while a model loads (errors still raise)."""
    from transformers.utils import logging as hf_logging

    bars, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


# --------------------------------------------------------------------------------------------
# Local directories


def directory_kind(path: Path) -> str:
    """"hf" (save_pretrained), "adapter" (a PEFT/LoRA adapter) or "" (neither) for a local directory."""
    if (path / HF_CONFIG).is_file():
        try:
            meta = json.loads((path / HF_CONFIG).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path / HF_CONFIG} is not valid JSON: {exc}") from None
        if isinstance(meta, dict) and "model_type" in meta:
            return "hf"
    if (path / ADAPTER_CONFIG).is_file():
        return "adapter"
    return ""


def weight_files(path: Path) -> list[Path]:
    """The weight files of a save_pretrained directory (safetensors, sharded or not)."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        files = sorted(path.glob("pytorch_model*.bin"))
    return files


def _check_hf_dir(path: Path) -> None:
    if not weight_files(path):
        raise MissingPathError(f"Model directory {path} has a config.json but no weights (*.safetensors).")
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")):
        raise MissingPathError(
            f"Model directory {path} has no tokenizer files (tokenizer.json, tokenizer_config.json): save the tokenizer "
            "next to the model with tokenizer.save_pretrained(dir)."
        )


def _is_local(source: str) -> bool:
    return Path(source).expanduser().is_dir()


# --------------------------------------------------------------------------------------------
# Hugging Face models -> TransformerLens


def load_tokenizer(source: str):
    from transformers import AutoTokenizer

    with hub_errors(f"tokenizer of {source}"):
        return AutoTokenizer.from_pretrained(source, local_files_only=_is_local(source))


def load_hf_causal_lm(source: str, dtype: str):
    """The Hugging Face model (eval mode), from a local directory (no network) or the hub; a LoRA
    adapter is merged into its base model (peft) or refused with what to do."""
    from transformers import AutoModelForCausalLM

    adapter = _adapter_config(source)
    if adapter is not None:
        return _merge_adapter(source, adapter, dtype)
    with hub_errors(f"model {source}"), quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype(dtype), local_files_only=_is_local(source))
    model.eval()
    return model


def _adapter_config(source: str) -> dict[str, Any] | None:
    if _is_local(source):
        p = Path(source).expanduser() / ADAPTER_CONFIG
        if not p.is_file() or (p.parent / HF_CONFIG).is_file():
            return None
        return json.loads(p.read_text())
    from huggingface_hub import errors as E
    from huggingface_hub import hf_hub_download

    try:
        with hub_errors(f"model {source}"):
            try:
                return json.loads(Path(hf_hub_download(source, ADAPTER_CONFIG)).read_text())
            except (E.RemoteEntryNotFoundError, E.LocalEntryNotFoundError):
                return None
    except HubError:
        return None  # the model load itself says what is wrong


def _merge_adapter(source: str, adapter: dict[str, Any], dtype: str):
    base = adapter.get("base_model_name_or_path")
    kind = adapter.get("peft_type", "adapter")
    if not base:
        raise ConfigError(f"{source} is a {kind} adapter whose adapter_config.json names no base_model_name_or_path.")
    try:
        from peft import PeftModel
    except ImportError:
        raise ConfigError(f"{source} is a {kind} adapter (adapter_config.json), not a model, and peft is not installed. {LORA_HELP}") from None
    base_model = load_hf_causal_lm(base, "float32")
    with hub_errors(f"adapter {source}"), quiet_transformers():
        merged = PeftModel.from_pretrained(base_model, source).merge_and_unload()
    merged = merged.to(torch_dtype(dtype))
    merged.eval()
    return merged


def adapter_tokenizer_source(source: str) -> str:
    """Where a model's tokenizer lives: the source itself, or an adapter's base model when the adapter has none."""
    adapter = _adapter_config(source)
    if adapter is None:
        return source
    if _is_local(source) and any((Path(source) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return source
    return adapter.get("base_model_name_or_path") or source


def architecture_of(hf_model) -> str:
    archs = getattr(hf_model.config, "architectures", None) or []
    return archs[0] if archs else type(hf_model).__name__


def hooked_config(hf_model, flags: dict[str, bool], dtype, device: str, name: str):
    """A HookedTransformerConfig for a loaded HF model, from its own config (module docstring)."""
    from transformer_lens import loading_from_pretrained as tl_loading

    cfg_json = hf_model.config.to_dict()
    cfg_json["architectures"] = [architecture_of(hf_model)]
    if cfg_json.get("model_type") in ("gpt2", "gpt_neo") or "n_positions" in cfg_json:
        cfg_json.setdefault("n_ctx", cfg_json.get("n_positions"))
    with tempfile.TemporaryDirectory(prefix="sx-hf-") as tmp:
        neutral = Path(tmp) / "model"  # no "llama"/"gemma" in the name: TL would take it for a hub name
        neutral.mkdir()
        (neutral / HF_CONFIG).write_text(json.dumps(cfg_json, default=str))
        cfg = tl_loading.get_pretrained_model_config(
            str(neutral), hf_cfg=cfg_json, fold_ln=flags["fold_ln"], device=device, dtype=dtype
        )
    cfg.model_name = name
    cfg.tokenizer_name = None
    return cfg


def hooked_from_hf(hf_model, tokenizer, flags: dict[str, bool], dtype: str, device: str, name: str, cfg=None):
    """A HookedTransformer with `hf_model`'s weights (TransformerLens's conversion), processed by `flags`."""
    import torch
    from transformer_lens import HookedTransformer
    from transformer_lens import loading_from_pretrained as tl_loading

    work_dtype = torch.float32 if any(flags.values()) else torch_dtype(dtype)
    hf_model = hf_model.to(work_dtype)
    if cfg is None:
        cfg = hooked_config(hf_model, flags, work_dtype, "cpu", name)
    else:
        cfg.dtype, cfg.device = work_dtype, "cpu"
    with tempfile.TemporaryDirectory(prefix="sx-hf-") as tmp:
        state = tl_loading.get_pretrained_state_dict(tmp, cfg, hf_model=hf_model, dtype=work_dtype)
    model = HookedTransformer(cfg, tokenizer, move_to_device=False)
    model.load_and_process_state_dict(state, **flags)
    del state
    if work_dtype != torch_dtype(dtype):
        model = model.to(torch_dtype(dtype), print_details=False)
    return model.to(device, print_details=False)


def bridge_from_source(source: str, tokenizer, flags: dict[str, bool], dtype: str, device: str, hf_model=None):
    """A TransformerBridge on the raw HF weights; `process_weights(**flags)` when processing is asked for."""
    from transformer_lens.model_bridge import TransformerBridge

    with hub_errors(f"model {source}"), quiet_transformers():
        bridge = TransformerBridge.boot_transformers(
            source, device=device, dtype=torch_dtype(dtype), tokenizer=tokenizer, hf_model=hf_model
        )
    if any(flags.values()):
        bridge.process_weights(**flags)
    return bridge


def hooked_or_bridge(source: str, flags: dict[str, bool], dtype: str, device: str, name: str) -> tuple[Any, str]:
    """Load a HF model (local dir or hub id): HookedTransformer if TransformerLens converts its
    architecture, else TransformerBridge. Returns (model, loader name)."""
    tokenizer = load_tokenizer(adapter_tokenizer_source(source))
    hf_model = load_hf_causal_lm(source, dtype if not any(flags.values()) else "float32")
    arch = architecture_of(hf_model)
    if arch in HOOKED_ARCHITECTURES:
        return hooked_from_hf(hf_model, tokenizer, flags, dtype, device, name), "HookedTransformer"
    adapter = _adapter_config(source)
    config_source = adapter.get("base_model_name_or_path", source) if adapter else source
    return bridge_from_source(config_source, tokenizer, flags, dtype, device, hf_model=hf_model.to(torch_dtype(dtype))), "TransformerBridge"


ARCH_FIELDS = (
    "original_architecture", "n_layers", "d_model", "n_heads", "d_head", "d_mlp", "n_key_value_heads", "act_fn",
    "normalization_type", "positional_embedding_type", "gated_mlp", "parallel_attn_mlp", "rotary_dim",
)


def config_differences(named, own) -> dict[str, tuple[Any, Any]]:
    """Architecture fields on which a named TransformerLens config and a model's own config disagree."""
    out = {}
    for f in ARCH_FIELDS:
        a, b = getattr(named, f, None), getattr(own, f, None)
        if f == "normalization_type":  # fold_ln turns LN into LNPre on both sides alike
            a, b = (str(a or "").replace("Pre", ""), str(b or "").replace("Pre", ""))
        if a != b:
            out[f] = (a, b)
    return out
