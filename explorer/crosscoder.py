"""Crosscoders: one sparse dictionary over the base and the finetuned model's activations at one
hook, with one encoder over both and one decoder per model (Anthropic 2024, "Sparse
Crosscoders"; Minder et al. 2025, BatchTopK crosscoders), and their loading.

The model, for one token t with activations x_base, x_finetuned (each of width d_in) at the hook:

    n_M(x)  = (x - input_mean[M]) * input_scale[M]          the crosscoder's input normalisation
    a_j     = relu( sum_M  n_M(x_M) @ W_enc[M, :, j]  + b_enc[j] )
    f_j     = a_j * [a_j * c_j > threshold]   (BatchTopK at inference, as dictionary_learning's
                                               BatchTopKCrossCoder.encode(use_threshold=True))
            = a_j                             (a plain ReLU / L1 crosscoder)
    xhat_M  = (sum_j f_j W_dec[M, j] + b_dec[M]) * output_scale[M] + input_mean[M]

c_j is the code normalisation the top-k selection ranks by: `crosscoder` (dictionary_learning's
default) sum_M ||W_dec[M, j]||; `sae` ||concat_M W_dec[M, j]||; `none` 1; `mixed`
alpha_sae * sae + alpha_cc * crosscoder. f_j (the latent's activation, `Crosscoder.encode`) is
the coefficient of the decoder rows, dictionary_learning's `encode` output (its
`get_activations` multiplies it by c_j; we do not). Without a normaliser input_mean = 0 and the
scales are 1. Weight statistics (decoder norms, relative norm, decoder cosine) and Latent
Scaling are computed in the crosscoder's normalised space, as dictionary_learning and the
diffing-toolkit compute them; cosines against an SAE's decoder use `decoder_in_model_space`.

Formats `load_crosscoder` reads (weights with safetensors or `torch.load(weights_only=True)`):

* this project's: a directory with `cfg.json` ({"format": FORMAT, ...}) and
  `crosscoder.safetensors` (W_enc [2, d_in, d_sae], b_enc [d_sae], W_dec [2, d_sae, d_in],
  b_dec [2, d_in], threshold [] for BatchTopK, optional input_mean [2, d_in], input_scale [2],
  output_scale [2]); cfg.json names the model of each leading index (`models`);
* dictionary_learning's `CrossCoder` / `BatchTopKCrossCoder` state dicts (saprmarks and the
  science-of-finetuning fork): a `.pt` file (torch.save of the state dict), a `.safetensors`
  file, or a directory holding `model.safetensors` (+ `config.json`, PyTorchModelHubMixin's
  layout). Names: encoder.weight [L, d_in, d_sae], encoder.bias [d_sae], decoder.weight
  [L, d_sae, d_in], decoder.bias [L, d_in]; BatchTopK adds k, threshold; newer versions add
  code_normalization_id and the NormalizableMixin buffers activation_mean, activation_std,
  target_rms, activation_global_scale (keep_relative_variance=True, its default, is assumed: the
  flag is not saved). A `_orig_mod.` prefix (torch.compile) is removed. L must be 2; layer
  `base_layer` (default 0, the diffing-toolkit's convention) is the base model.

Anything else is a ConfigError naming what was found. Decoupled codes (per-model thresholds)
are refused: their latents have two activations, not one.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from explorer.errors import ConfigError, MissingPathError

FORMAT = "sae-transfer-explorer/crosscoder/v1"
CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "crosscoder.safetensors"
MODELS = ("base", "finetuned")
CODE_NORMALIZATIONS = ("crosscoder", "sae", "none", "mixed")
# Relative-norm bands ||d_F|| / (||d_B|| + ||d_F||): Minder et al. 2025's bands on their Delta-norm
# (0.1, 0.4-0.6, 0.9) expressed as relative norm (1/6, 4/9-5/9, 5/6), rounded.
DEFAULT_BANDS = {"base_only_max": 0.17, "shared_min": 0.44, "shared_max": 0.56, "finetune_only_min": 0.83}
# dictionary_learning's CodeNormalization enum values (enum.auto(): 1, 2, ...)
_DL_CODE_NORMALIZATION = {1: "crosscoder", 2: "sae", 3: "mixed", 4: "none", 5: "decoupled"}
_DL_REQUIRED = ("encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias")
_DL_OPTIONAL = (
    "k", "threshold", "code_normalization_id", "activation_mean", "activation_std", "target_rms", "activation_global_scale",
)
_OWN_REQUIRED = ("W_enc", "b_enc", "W_dec", "b_dec")
_OWN_OPTIONAL = ("threshold", "input_mean", "input_scale", "output_scale")


@dataclass
class Crosscoder:
    """A loaded crosscoder (float32 tensors on `device`); index 0 of every leading axis is the
    base model, index 1 the finetuned model."""

    W_enc: Any  # [2, d_in, d_sae]
    b_enc: Any  # [d_sae]
    W_dec: Any  # [2, d_sae, d_in]
    b_dec: Any  # [2, d_in]
    architecture: str  # "batchtopk" | "relu"
    threshold: float | None = None  # BatchTopK's inference threshold on a_j * c_j
    k: int | None = None
    code_normalization: str = "crosscoder"
    alpha_sae: float = 1.0
    alpha_cc: float = 0.1
    input_mean: Any = None  # [2, d_in]
    input_scale: Any = None  # [2]
    output_scale: Any = None  # [2]
    source: str = ""  # "this project's format" | "dictionary_learning ..."
    meta: dict = field(default_factory=dict)

    @property
    def d_in(self) -> int:
        return int(self.W_enc.shape[1])

    @property
    def d_sae(self) -> int:
        return int(self.W_enc.shape[2])

    @property
    def device(self):
        return self.W_enc.device

    def code_norm(self):
        """c_j [d_sae]: what BatchTopK ranks a_j * c_j by."""
        import torch

        if self.code_normalization == "crosscoder":
            return self.W_dec.norm(dim=2).sum(0)
        if self.code_normalization == "sae":
            return self.W_dec.norm(dim=(0, 2))
        if self.code_normalization == "mixed":
            return self.alpha_sae * self.W_dec.norm(dim=(0, 2)) + self.alpha_cc * self.W_dec.norm(dim=2).sum(0)
        return torch.ones(self.d_sae, dtype=self.W_dec.dtype, device=self.device)

    def normalize(self, x, m: int):
        if self.input_mean is None:
            return x
        return (x - self.input_mean[m]) * self.input_scale[m]

    def denormalize(self, x, m: int):
        if self.input_mean is None:
            return x
        return x * self.output_scale[m] + self.input_mean[m]

    def decoder_in_model_space(self, m: int):
        """[d_sae, d_in]: the vector latent j adds to model m's activation per unit of f_j."""
        if self.input_mean is None:
            return self.W_dec[m]
        return self.W_dec[m] * self.output_scale[m]

    # ------------------------------------------------------------------ encode / decode (dense)

    def pre_acts(self, x_base, x_finetuned):
        """a_j before the ReLU, [N, d_sae] (x_* : [N, d_in])."""
        import torch

        h = torch.addmm(self.b_enc, self.normalize(x_base, 0), self.W_enc[0])
        return h.addmm_(self.normalize(x_finetuned, 1), self.W_enc[1])

    def encode(self, x_base, x_finetuned):
        """f [N, d_sae] (dense; for tests, training and small inputs)."""
        import torch

        a = torch.relu(self.pre_acts(x_base, x_finetuned))
        if self.architecture == "batchtopk" and self.threshold is not None:
            # as dictionary_learning: a * (a * c > threshold)
            return a * ((a * self.code_norm()) > self.threshold)
        return a

    def decode(self, f):
        """(xhat_base, xhat_finetuned), each [N, d_in], in the models' own units."""
        return tuple(self.denormalize(f @ self.W_dec[m] + self.b_dec[m], m) for m in range(2))

    def to(self, device):
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "input_mean", "input_scale", "output_scale"):
            v = getattr(self, name)
            if v is not None:
                setattr(self, name, v.to(device))
        return self


class CrosscoderCodec:
    """The crosscoder's sparse encode and decode for the precompute (the SaeCodec of a crosscoder).

    `encode_sparse(x_b, x_f)` returns (token row, latent, f) of the positive entries of
    `Crosscoder.encode` in row-major (token, latent) order (the same float32 operations, so the
    same entries); `decode_sparse` sums the active decoder rows (embedding_bag; equal to the dense
    f @ W_dec + b_dec up to float32 summation order), in the crosscoder's normalised space."""

    def __init__(self, cc: Crosscoder):
        import torch

        self.cc = cc
        with torch.inference_mode():
            self.code_norm = cc.code_norm()

    def encode_sparse(self, x_base, x_finetuned):
        import torch

        cc = self.cc
        a = cc.pre_acts(x_base, x_finetuned)
        if cc.architecture == "batchtopk" and cc.threshold is not None:
            positive = (a > 0) & ((a * self.code_norm) > cc.threshold)
        else:
            positive = a > 0
        if positive.device.type == "cpu":
            flat = torch.from_numpy(np.flatnonzero(positive.numpy()))
        else:
            flat = torch.nonzero(positive.view(-1)).view(-1)
        n_cols = a.shape[1]
        t, j = flat // n_cols, flat % n_cols
        return t, j, a.view(-1).index_select(0, flat)

    def decode_sparse(self, t, j, v, n_tok: int, m: int):
        """Model m's reconstruction [n_tok, d_in] in the crosscoder's normalised space (no denormalisation)."""
        import torch

        counts = torch.bincount(t, minlength=n_tok)
        offsets = torch.cumsum(counts, 0) - counts
        return torch.nn.functional.embedding_bag(j, self.cc.W_dec[m], offsets, mode="sum", per_sample_weights=v) + self.cc.b_dec[m]

    def encode_at(self, x_base, x_finetuned, rows: np.ndarray, latents: np.ndarray, chunk: int = 2048) -> np.ndarray:
        """f of latents[i] at the rows rows[i] ([n, W]) of x_* ([N, d_in]) -> numpy [n, W]."""
        import torch

        cc = self.cc
        out = np.zeros(rows.shape, np.float32)
        uniq, inv = np.unique(np.asarray(latents, dtype=np.int64), return_inverse=True)
        xb, xf = cc.normalize(x_base, 0), cc.normalize(x_finetuned, 1)
        for lo in range(0, len(uniq), chunk):
            j = torch.from_numpy(uniq[lo : lo + chunk]).to(x_base.device)
            a = torch.addmm(cc.b_enc.index_select(0, j), xb, cc.W_enc[0].index_select(1, j))
            a = a.addmm_(xf, cc.W_enc[1].index_select(1, j))
            if cc.architecture == "batchtopk" and cc.threshold is not None:
                keep = (a > 0) & ((a * self.code_norm.index_select(0, j)) > cc.threshold)
            else:
                keep = a > 0
            acts = torch.where(keep, a, torch.zeros((), dtype=a.dtype, device=a.device)).float().cpu().numpy()
            mine = np.flatnonzero((inv >= lo) & (inv < lo + chunk))
            out[mine] = acts[rows[mine], (inv[mine] - lo)[:, None]]
        return out


# ---------------------------------------------------------------------------------------- loading


def _fail(path: Path, what: str) -> ConfigError:
    return ConfigError(
        f"{path} is not a crosscoder this tool reads: {what}. Give a directory in this project's format "
        f"({CONFIG_FILE} + {WEIGHTS_FILE}, as `python -m precompute.crosscoder_train` writes), or a dictionary_learning "
        "CrossCoder / BatchTopKCrossCoder checkpoint (a .pt or .safetensors state dict, or a directory with model.safetensors)."
    )


def _read_safetensors(path: Path) -> dict:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same problem for the user
        raise _fail(path, f"its safetensors cannot be read ({type(exc).__name__}: {exc})") from None


def _read_torch(path: Path) -> dict:
    import torch

    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickles with code, truncated files, other formats
        raise _fail(path, f"torch.load(weights_only=True) refused it ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise _fail(path, "it is not a flat state dict of tensors")
    return obj


def load_crosscoder(path: str | Path, device: str = "cpu", base_layer: int = 0) -> Crosscoder:
    """Read a crosscoder in this project's format or dictionary_learning's (module docstring)."""
    path = Path(path)
    if not path.exists():
        raise MissingPathError(f"Crosscoder {path} does not exist.")
    if base_layer not in (0, 1):
        raise ConfigError(f"base_layer must be 0 or 1 (the crosscoder's index of the base model), got {base_layer!r}.")
    if path.is_dir():
        if (path / CONFIG_FILE).exists() or (path / WEIGHTS_FILE).exists():
            cc = _load_own(path)
        elif (path / "model.safetensors").exists():
            hub_cfg = {}
            if (path / "config.json").exists():
                try:
                    hub_cfg = json.loads((path / "config.json").read_text())
                except (json.JSONDecodeError, UnicodeDecodeError):
                    raise _fail(path, "its config.json is not valid JSON") from None
            cc = _from_dictionary_learning(_read_safetensors(path / "model.safetensors"), path, base_layer, hub_cfg if isinstance(hub_cfg, dict) else {})
        else:
            raise _fail(path, f"the directory holds neither {CONFIG_FILE} nor model.safetensors")
    elif path.suffix == ".safetensors":
        cc = _from_dictionary_learning(_read_safetensors(path), path, base_layer, {})
    elif path.suffix in (".pt", ".pth", ".bin"):
        cc = _from_dictionary_learning(_read_torch(path), path, base_layer, {})
    else:
        raise _fail(path, f"unknown file type {path.suffix or '(no suffix)'!r}")
    return cc.to(device)


def _check_shapes(path: Path, t: dict, names: dict[str, tuple]) -> None:
    for name, shape in names.items():
        got = tuple(t[name].shape)
        if len(got) != len(shape) or any(s is not None and g != s for g, s in zip(got, shape)):
            raise _fail(path, f"{name} has shape {list(got)}, expected {['*' if s is None else s for s in shape]}")


def _load_own(path: Path) -> Crosscoder:
    import torch

    for required in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / required).exists():
            raise MissingPathError(f"Crosscoder directory {path} lacks {required} (this project's format holds {CONFIG_FILE} and {WEIGHTS_FILE}).")
    try:
        cfg = json.loads((path / CONFIG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _fail(path, f"{CONFIG_FILE} is not valid JSON ({exc})") from None
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise _fail(path, f"{CONFIG_FILE} has format {cfg.get('format') if isinstance(cfg, dict) else None!r}, expected {FORMAT!r}")
    t = _read_safetensors(path / WEIGHTS_FILE)
    missing = [n for n in _OWN_REQUIRED if n not in t]
    extra = sorted(set(t) - set(_OWN_REQUIRED) - set(_OWN_OPTIONAL))
    if missing or extra:
        raise _fail(path, f"{WEIGHTS_FILE} lacks {missing} / has unknown tensors {extra[:5]}")
    if t["W_enc"].ndim != 3:
        raise _fail(path, f"W_enc has shape {list(t['W_enc'].shape)}, expected [2, d_in, d_sae]")
    d_in, d_sae = int(t["W_enc"].shape[1]), int(t["W_enc"].shape[2])
    _check_shapes(path, t, {"W_enc": (2, d_in, d_sae), "b_enc": (d_sae,), "W_dec": (2, d_sae, d_in), "b_dec": (2, d_in)})
    models = cfg.get("models", list(MODELS))
    if list(models) != list(MODELS):
        raise _fail(path, f"{CONFIG_FILE} models is {models!r}; this format stores {list(MODELS)} in that order")
    arch = cfg.get("architecture")
    if arch not in ("batchtopk", "relu"):
        raise _fail(path, f"architecture {arch!r} (expected 'batchtopk' or 'relu')")
    code_norm = cfg.get("code_normalization", "crosscoder")
    if code_norm not in CODE_NORMALIZATIONS:
        raise _fail(path, f"code_normalization {code_norm!r} (expected one of {list(CODE_NORMALIZATIONS)})")
    norm = [n for n in ("input_mean", "input_scale", "output_scale") if n in t]
    if norm and len(norm) != 3:
        raise _fail(path, "input_mean, input_scale and output_scale come together")
    if norm:
        _check_shapes(path, t, {"input_mean": (2, d_in), "input_scale": (2,), "output_scale": (2,)})
    f32 = {k: v.to(torch.float32) for k, v in t.items()}
    threshold = float(f32["threshold"]) if "threshold" in f32 else None
    if arch == "batchtopk" and threshold is None:
        raise _fail(path, "a BatchTopK crosscoder needs its inference threshold (tensor `threshold`)")
    return Crosscoder(
        W_enc=f32["W_enc"], b_enc=f32["b_enc"], W_dec=f32["W_dec"], b_dec=f32["b_dec"], architecture=arch,
        threshold=threshold, k=cfg.get("k"), code_normalization=code_norm,
        alpha_sae=float(cfg.get("alpha_sae", 1.0)), alpha_cc=float(cfg.get("alpha_cc", 0.1)),
        input_mean=f32.get("input_mean"), input_scale=f32.get("input_scale"), output_scale=f32.get("output_scale"),
        source="this project's format", meta=cfg,
    )


def _from_dictionary_learning(sd: dict, path: Path, base_layer: int, hub_cfg: dict) -> Crosscoder:
    import torch

    sd = {(k.split("_orig_mod.", 1)[1] if "_orig_mod." in k else k): v for k, v in sd.items()}
    missing = [n for n in _DL_REQUIRED if n not in sd]
    if missing:
        raise _fail(path, f"the state dict lacks {missing} (it has {sorted(sd)[:8]})")
    unknown = sorted(set(sd) - set(_DL_REQUIRED) - set(_DL_OPTIONAL))
    if unknown:
        raise _fail(path, f"the state dict has tensors a CrossCoder does not: {unknown[:5]}")
    enc = sd["encoder.weight"]
    if enc.ndim != 3:
        raise _fail(path, f"encoder.weight has shape {list(enc.shape)}, expected [n_layers, activation_dim, dict_size]")
    n_layers, d_in, d_sae = (int(s) for s in enc.shape)
    if n_layers != 2:
        raise _fail(path, f"it has {n_layers} layers; a base/finetuned crosscoder has 2")
    _check_shapes(path, sd, {"encoder.bias": (d_sae,), "decoder.weight": (2, d_sae, d_in), "decoder.bias": (2, d_in)})
    code_id = int(sd["code_normalization_id"]) if "code_normalization_id" in sd else 1  # older files: CROSSCODER
    code_norm = _DL_CODE_NORMALIZATION.get(code_id)
    if code_norm is None:
        raise _fail(path, f"code_normalization_id {code_id} is unknown")
    if code_norm == "decoupled":
        raise _fail(path, "it uses a decoupled code (one threshold per model): its latents have two activations, which this tool does not show")
    if isinstance(hub_cfg.get("code_normalization"), str) and hub_cfg["code_normalization"].lower() != code_norm:
        raise _fail(path, f"config.json says code_normalization {hub_cfg['code_normalization']!r}, the state dict {code_norm!r}")
    f32 = {k: v.to(torch.float32) for k, v in sd.items()}
    order = [base_layer, 1 - base_layer]
    batchtopk = "k" in sd or "threshold" in sd
    threshold = None
    if batchtopk:
        if "threshold" not in sd or f32["threshold"].numel() != 1:
            raise _fail(path, "a BatchTopKCrossCoder needs one scalar `threshold` (per-model thresholds are a decoupled code)")
        threshold = float(f32["threshold"])
    mean = scale = out_scale = None
    if "activation_mean" in sd:
        m, s = f32["activation_mean"], f32.get("activation_std")
        has = not bool(torch.isnan(m).any()) and s is not None and not bool(torch.isnan(s).any())
        if has:
            _check_shapes(path, f32, {"activation_mean": (2, d_in), "activation_std": (2, d_in)})
            g = f32.get("activation_global_scale")
            if g is None:
                target = float(f32.get("target_rms", torch.tensor(1.0)))
                g = target / torch.sqrt((s**2).sum(-1) + 1e-8)
            _check_shapes(path, {"activation_global_scale": g}, {"activation_global_scale": (2,)})
            # dictionary_learning: normalise (x - mean) * g, denormalise x / (g + 1e-8) + mean
            mean, scale, out_scale = m[order], g[order], 1.0 / (g[order] + 1e-8)
    return Crosscoder(
        W_enc=f32["encoder.weight"][order].contiguous(), b_enc=f32["encoder.bias"].contiguous(),
        W_dec=f32["decoder.weight"][order].contiguous(), b_dec=f32["decoder.bias"][order].contiguous(),
        architecture="batchtopk" if batchtopk else "relu", threshold=threshold, k=int(sd["k"]) if "k" in sd else None,
        code_normalization=code_norm,
        alpha_sae=float(hub_cfg.get("code_normalization_alpha_sae") or 1.0), alpha_cc=float(hub_cfg.get("code_normalization_alpha_cc") or 0.1),
        input_mean=mean, input_scale=scale, output_scale=out_scale,
        source=f"dictionary_learning {'BatchTopKCrossCoder' if batchtopk else 'CrossCoder'}", meta={"base_layer": base_layer},
    )


def check_fits(cc: Crosscoder, width: int, hook: str) -> None:
    """The crosscoder reads activations of `width` at `hook` (its own cfg.json may name its hook)."""
    from explorer.errors import DimensionMismatchError

    if cc.d_in != width:
        raise DimensionMismatchError(
            f"The crosscoder has d_in={cc.d_in} per model but the models' activation at {hook} has width {width}. "
            "Pick the crosscoder trained for these models and this hook."
        )
    trained_at = cc.meta.get("hook")
    if trained_at and trained_at != hook:
        raise ConfigError(f"The crosscoder was trained at {trained_at!r}, but the run's hook is {hook!r}. Use the run's hook or another crosscoder.")


def weights_file(path: str | Path) -> Path:
    """The file holding a crosscoder's weights (for input fingerprints)."""
    path = Path(path)
    if path.is_dir():
        return path / WEIGHTS_FILE if (path / WEIGHTS_FILE).exists() or (path / CONFIG_FILE).exists() else path / "model.safetensors"
    return path


def save_crosscoder(cc: Crosscoder, path: str | Path, extra: dict[str, Any] | None = None) -> None:
    """Write this project's format: cfg.json + crosscoder.safetensors (float32)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {"W_enc": cc.W_enc, "b_enc": cc.b_enc, "W_dec": cc.W_dec, "b_dec": cc.b_dec}
    if cc.threshold is not None:
        import torch

        tensors["threshold"] = torch.tensor(float(cc.threshold), dtype=torch.float32)
    if cc.input_mean is not None:
        tensors.update(input_mean=cc.input_mean, input_scale=cc.input_scale, output_scale=cc.output_scale)
    save_file({k: v.detach().to("cpu").float().contiguous() for k, v in tensors.items()}, str(path / WEIGHTS_FILE))
    cfg = {
        "format": FORMAT, "architecture": cc.architecture, "d_in": cc.d_in, "d_sae": cc.d_sae, "k": cc.k,
        "code_normalization": cc.code_normalization, "models": list(MODELS), **(extra or {}),
    }
    if cc.code_normalization == "mixed":
        cfg.update(alpha_sae=cc.alpha_sae, alpha_cc=cc.alpha_cc)
    (path / CONFIG_FILE).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
