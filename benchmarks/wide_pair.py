"""A wide synthetic model pair for scale benchmarks: real widths, random but structured weights.

    python benchmarks/wide_pair.py --out benchmarks/_work/wide                     # d_model 2304, 4 layers, 32k vocab, SAEs of 16k/65k/131k
    python benchmarks/wide_pair.py --out DIR --d-model 768 --d-sae 2048 16384 --n-sequences 2048
    python benchmarks/wide_pair.py --out DIR --gemma-2-2b --d-sae 16384 --dtype bfloat16 --device cuda   # 26 layers, gemma-2-2b's widths
    python benchmarks/wide_pair.py --out DIR --tiny                                 # seconds; the test suite's size

For benchmarks and scale tests only; never shipped as data (write it under benchmarks/_work/,
which is git-ignored, or a directory of your own). What it writes, in the layout of the demo pair
(so every benchmark that takes `--demo` can take it):

    OUT/base/, OUT/finetuned/                 local checkpoints (explorer.models format)
    OUT/saes/<d_sae>/base_sae/, .../finetuned_sae/   SAELens JumpReLU directories, one pair per width
    OUT/saes/base_sae, OUT/saes/finetuned_sae  links to the first width's SAEs
    OUT/eval_corpus.parquet                   token_ids (BOS first) and a source label per sequence
    OUT/PAIR.json                             the settings, timings and the SAEs' measured L0 and densities

The models are HookedTransformers (GPT-2 style: LayerNorm, GELU MLP, learned positions) with
weights drawn uniformly at the variance of TransformerLens's own initialisation, the token
embedding and unembedding with a Zipfian scale per token (frequent tokens are "bigger"), over a
word-level tokenizer of `d_vocab` made-up words. The finetune is the base plus a controlled
perturbation: every weight matrix gets independent uniform noise of `--perturb` (default 0.05)
times its own standard deviation.

The SAEs are JumpReLU SAEs whose decoder directions come in families (each a random centre plus
noise, so decoder neighbours and matches exist), with W_enc = W_dec^T and b_dec the mean
activation at the hook. Each feature gets a target firing density, log-normally spread
(log10 density with standard deviation 0.8, the mean set so that the expected L0 is `--l0`;
2% of the features dead), and its threshold is set from a calibration batch of the model's own
activations at the hook: the pre-activation's mean + std * z(1 - density) (a Gaussian tail). The
finetuned SAE is the base SAE with its decoder directions perturbed, 10% of its features
replaced by new directions, and thresholds set on the finetuned model's activations. PAIR.json
records the L0 and density spread each SAE actually shows on held-out sequences.

Random numbers: one seeded torch generator per tensor (on `--device`). The models are built and
written one at a time, so memory is about one model plus one SAE pair.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: make the repository importable
    sys.path.insert(0, str(REPO))

BOS, UNK = "<bos>", "<unk>"
DEAD_SHARE = 0.02
REPLACED_SHARE = 0.10
DENSITY_LOG_SD = 0.8
MAX_DENSITY = 0.3


@dataclass(frozen=True)
class PairSettings:
    d_model: int = 2304
    n_layers: int = 4
    n_heads: int = 8
    d_head: int | None = None  # default d_model // n_heads
    d_mlp: int | None = None  # default 4 * d_model
    d_vocab: int = 32768
    d_sae: tuple[int, ...] = (16384, 65536, 131072)
    n_sequences: int = 2048
    context: int = 128
    l0: float = 64.0
    perturb: float = 0.05
    calibration_tokens: int = 1024
    dtype: str = "float32"
    seed: int = 0
    hook_layer: int | None = None  # default n_layers // 2 - 1 (blocks.L.hook_resid_post)

    def resolved(self) -> "PairSettings":
        return replace(
            self,
            d_head=self.d_head or self.d_model // self.n_heads,
            d_mlp=self.d_mlp or 4 * self.d_model,
            hook_layer=self.hook_layer if self.hook_layer is not None else max(0, self.n_layers // 2 - 1),
            d_sae=tuple(int(d) for d in self.d_sae),
        )

    @property
    def hook(self) -> str:
        return f"blocks.{self.resolved().hook_layer}.hook_resid_post"


TINY = PairSettings(d_model=64, n_layers=2, n_heads=2, d_vocab=1024, d_sae=(256, 512), n_sequences=24, context=16, l0=8.0, calibration_tokens=256)
GEMMA_2_2B = dict(d_model=2304, n_layers=26, n_heads=8, d_head=256, d_mlp=9216)


def tl_config(s: PairSettings) -> dict:
    s = s.resolved()
    return {
        "n_layers": s.n_layers, "d_model": s.d_model, "d_head": s.d_head, "n_heads": s.n_heads, "d_mlp": s.d_mlp,
        "d_vocab": s.d_vocab, "n_ctx": max(s.context, 128), "act_fn": "gelu", "normalization_type": "LN",
        "positional_embedding_type": "standard", "tokenizer_prepends_bos": True, "default_prepend_bos": True, "seed": s.seed,
    }


# ----------------------------------------------------------------------------------------------
# Tokenizer and corpus


def _words(n: int) -> list[str]:
    """n distinct made-up lowercase words (base-26 numerals spelled with letters)."""
    out = []
    for i in range(n):
        w, k = "", i
        while True:
            w = chr(97 + k % 26) + w
            k //= 26
            if k == 0:
                break
        out.append(w)
    return out


def build_tokenizer(d_vocab: int, out_dir: Path):
    """A word-level HF tokenizer of exactly d_vocab tokens: <bos>, <unk> and made-up words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from explorer.models import save_local_tokenizer

    vocab = {BOS: 0, UNK: 1}
    for i, w in enumerate(_words(d_vocab - 2)):
        vocab[w] = i + 2
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=BOS, pad_token=BOS, unk_token=UNK)
    save_local_tokenizer(fast, out_dir)
    return AutoTokenizer.from_pretrained(str(out_dir), local_files_only=True)  # TL reloads a tokenizer from its path


def zipf_probs(d_vocab: int, a: float = 1.1) -> "np.ndarray":  # noqa: F821
    import numpy as np

    p = 1.0 / (np.arange(d_vocab - 2) + 2.7) ** a
    return p / p.sum()


def write_corpus(path: Path, s: PairSettings) -> None:
    """n_sequences x context token ids: BOS, then Zipfian words; two sources with their own word ranks."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(s.seed + 1)
    p = zipf_probs(s.d_vocab)
    n, ctx = s.n_sequences, s.context
    ranks = rng.choice(len(p), size=(n, ctx - 1), p=p)
    words = [rng.permutation(len(p)) + 2 for _ in range(2)]  # each source ranks the words differently
    source = np.arange(n) % 2
    body = np.where(source[:, None] == 0, words[0][ranks], words[1][ranks])
    ids = np.concatenate([np.zeros((n, 1), np.int64), body], axis=1).astype(np.int32)
    offsets = pa.array(np.arange(0, (n + 1) * ctx, ctx, dtype=np.int32))
    table = pa.table({
        "token_ids": pa.ListArray.from_arrays(offsets, pa.array(ids.reshape(-1), pa.int32())),
        "source": pa.array(np.where(source == 0, "source_a", "source_b").astype(object), pa.string()),
    })
    pq.write_table(table, path)


# ----------------------------------------------------------------------------------------------
# Models


def _fill_uniform(t, std: float, gen) -> None:
    a = std * math.sqrt(3.0)
    t.uniform_(-a, a, generator=gen)


def build_model(s: PairSettings, tokenizer, device: str):
    """The base model: TL's shapes, uniform weights at TL's initialisation variance (no TL init pass)."""
    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(**tl_config(s), device=device, init_weights=False)
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=True)
    gen = torch.Generator(device=device).manual_seed(s.seed)
    std = cfg.initializer_range  # 0.8 / sqrt(d_model)
    zipf = torch.from_numpy(zipf_probs(s.d_vocab)).to(device=device, dtype=torch.float32)
    tok_scale = torch.cat([torch.ones(2, device=device), 0.5 + 0.5 * (zipf / zipf.max()) ** 0.1])  # frequent words a bit larger
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith((".w", "ln_final.w")):
                p.fill_(1.0)
            elif name.endswith((".b", "b_Q", "b_K", "b_V", "b_O", "b_in", "b_out", "b_U")):
                p.zero_()
            elif name.endswith(("W_O", "W_out")):
                _fill_uniform(p, std / math.sqrt(2 * s.n_layers), gen)  # GPT-2's scaled residual writes
            else:
                _fill_uniform(p, std, gen)
        model.embed.W_E.mul_(tok_scale[:, None])
        model.unembed.W_U.mul_(tok_scale[None, :])
    model.eval()
    return model


def perturb_model(model, eps: float, seed: int) -> None:
    """In place: every weight matrix plus uniform noise of eps x its own std (LayerNorm weights too)."""
    import torch

    gen = torch.Generator(device=model.cfg.device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            std = float(p.float().std()) if p.numel() > 1 else 0.0
            if std == 0.0:  # zero biases, ones of LayerNorm: a small absolute shift
                std = 0.02 if name.endswith(".w") else 0.0
            if std:
                noise = torch.empty_like(p)
                _fill_uniform(noise, eps * std, gen)
                p.add_(noise)


def hook_acts(model, tokens, hook: str, batch: int = 16):
    """Activations at `hook` for `tokens` [n, ctx] -> [n * ctx, d] float32 (the model stops after the hook's layer)."""
    import torch

    layer = int(hook.split(".")[1])
    out = []
    with torch.inference_mode():
        for i in range(0, len(tokens), batch):
            store = {}

            def grab(act, hook):  # noqa: ARG001
                store["x"] = act
                return act

            model.run_with_hooks(tokens[i : i + batch], fwd_hooks=[(hook, grab)], return_type=None, stop_at_layer=layer + 1)
            out.append(store["x"].float().reshape(-1, store["x"].shape[-1]))
    return torch.cat(out)


def save_model(model, path: Path, s: PairSettings, role: str) -> None:
    import torch

    from explorer.models import save_local_model

    dt = getattr(torch, s.dtype)
    if dt != torch.float32:  # weights stored in dt; explorer.models loads them into a float32 model unless told otherwise
        state_model = model.to(dt)
        save_local_model(state_model, path, tl_config(s), extra={"synthetic": role, "weights_dtype": s.dtype})
        model.to(torch.float32)
    else:
        save_local_model(model, path, tl_config(s), extra={"synthetic": role, "weights_dtype": s.dtype})


# ----------------------------------------------------------------------------------------------
# SAEs


def _decoder(d_sae: int, d_in: int, gen, device: str, family: int = 16):
    """Unit decoder rows in families: centre (weight 0.6) + noise (weight 0.8), so a family's rows share ~0.36 cosine."""
    import torch

    n_fam = max(1, d_sae // family)
    centres = torch.empty(n_fam, d_in, device=device)
    centres.uniform_(-1, 1, generator=gen)
    centres /= centres.norm(dim=1, keepdim=True)
    fam = torch.randint(0, n_fam, (d_sae,), generator=gen, device=device)
    w = torch.empty(d_sae, d_in, device=device)
    w.uniform_(-1, 1, generator=gen)
    w /= w.norm(dim=1, keepdim=True)
    w.mul_(0.8).add_(centres[fam], alpha=0.6)
    return w / w.norm(dim=1, keepdim=True)


def finetuned_directions(w, gen, device: str):
    """The finetuned SAE's unit decoder rows: each base row plus noise (norm 0.1), REPLACED_SHARE of them new."""
    import torch

    d_sae, d_in = w.shape
    noise = torch.empty_like(w)
    noise.uniform_(-1, 1, generator=gen)
    w_ft = w + 0.1 * noise / noise.norm(dim=1, keepdim=True)
    replaced = torch.rand(d_sae, generator=gen, device=device) < REPLACED_SHARE
    fresh = _decoder(d_sae, d_in, gen, device)
    w_ft = torch.where(replaced[:, None], fresh, w_ft)
    return w_ft / w_ft.norm(dim=1, keepdim=True)


def target_densities(d_sae: int, l0: float, gen, device: str):
    """Log-normal densities (log10 sd 0.8) whose sum is about l0; DEAD_SHARE of them 0."""
    import torch

    z = torch.randn(d_sae, generator=gen, device=device, dtype=torch.float64)
    mu = math.log10(l0 / d_sae) - DENSITY_LOG_SD**2 * math.log(10) / 2  # E[10^X] = l0 / d_sae
    dens = (10 ** (mu + DENSITY_LOG_SD * z)).clamp(max=MAX_DENSITY)
    dead = torch.rand(d_sae, generator=gen, device=device) < DEAD_SHARE
    return torch.where(dead, torch.zeros_like(dens), dens)


def thresholds_for(w_enc, b_dec, calib, dens, chunk: int = 8192):
    """Per feature: mean + std * z(1 - density) of its pre-activation over the calibration rows (+inf when dead)."""
    import torch
    from scipy.special import ndtri

    x = calib - b_dec
    thr = torch.empty(w_enc.shape[1], dtype=torch.float32, device=w_enc.device)
    z = torch.from_numpy(ndtri(1.0 - dens.clamp(min=1e-12).cpu().numpy())).to(w_enc.device)
    for lo in range(0, w_enc.shape[1], chunk):
        pre = x @ w_enc[:, lo : lo + chunk]
        mean, std = pre.mean(0).double(), pre.std(0).double()
        thr[lo : lo + chunk] = (mean + std * z[lo : lo + chunk]).float()
    thr = torch.where(dens > 0, thr.clamp(min=1e-3), torch.full_like(thr, 1e4))  # dead: never fires
    return thr


def sae_cfg(d_in: int, d_sae: int, hook: str, s: PairSettings, role: str) -> dict:
    from importlib.metadata import version

    v = version("sae-lens")
    return {
        "metadata": {
            "sae_lens_version": v, "sae_lens_training_version": v, "hook_name": hook, "model_name": f"wide-synthetic-{role}",
            "model_class_name": "HookedTransformer", "hook_head_index": None, "context_size": s.context, "prepend_bos": True,
            "dataset_path": "synthetic", "exclude_special_tokens": False, "model_from_pretrained_kwargs": {},
            "sequence_separator_token": "bos", "disable_concat_sequences": False, "seqpos_slice": [None],
        },
        "d_in": d_in, "d_sae": d_sae, "apply_b_dec_to_input": True, "reshape_activations": "none", "dtype": s.dtype,
        "device": "cpu", "normalize_activations": "none", "architecture": "jumprelu",
    }


def save_sae(path: Path, w_dec, b_dec, threshold, cfg: dict, dtype: str) -> None:
    import torch
    from safetensors.torch import save_file

    from explorer.models import SAE_CONFIG, SAE_WEIGHTS

    dt = getattr(torch, dtype)
    path.mkdir(parents=True, exist_ok=True)
    state = {
        "W_enc": w_dec.T.contiguous(), "W_dec": w_dec.contiguous(), "b_enc": torch.zeros(w_dec.shape[0], device=w_dec.device),
        "b_dec": b_dec.contiguous(), "threshold": threshold.contiguous(),
    }
    save_file({k: v.detach().to("cpu", dt).contiguous() for k, v in state.items()}, str(path / SAE_WEIGHTS))
    (path / SAE_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")


def sae_pair(d_sae: int, calib_base, calib_ft, s: PairSettings, device: str):
    """(base SAE, finetuned SAE) as (w_dec, b_dec, threshold, densities) on `device`."""
    import torch

    gen = torch.Generator(device=device).manual_seed(s.seed * 1000 + d_sae)
    d_in = calib_base.shape[1]
    w = _decoder(d_sae, d_in, gen, device)
    dens = target_densities(d_sae, s.l0, gen, device)
    b_dec = calib_base.mean(0)
    base = (w, b_dec, thresholds_for(w.T, b_dec, calib_base, dens), dens)
    # the finetuned SAE: perturbed directions, REPLACED_SHARE new ones, densities jittered, thresholds on the finetune's activations
    w_ft = finetuned_directions(w, gen, device)
    dens_ft = (dens * 10 ** (0.3 * torch.randn(d_sae, generator=gen, device=device, dtype=torch.float64))).clamp(max=MAX_DENSITY)
    b_ft = calib_ft.mean(0)
    ft = (w_ft, b_ft, thresholds_for(w_ft.T, b_ft, calib_ft, dens_ft), dens_ft)
    return base, ft


def measure_sae(w_dec, b_dec, thr, x, chunk: int = 8192) -> dict:
    """L0 per token and the spread of firing densities of a JumpReLU SAE on activations x [n, d]."""
    import numpy as np

    xc = x - b_dec
    counts = []
    l0 = 0
    for lo in range(0, w_dec.shape[0], chunk):
        pre = xc @ w_dec[lo : lo + chunk].T
        fire = pre > thr[lo : lo + chunk]
        counts.append(fire.sum(0).cpu().numpy())
        l0 += int(fire.sum())
    dens = np.concatenate(counts) / len(x)
    alive = dens[dens > 0]
    q = np.quantile(np.log10(alive), [0.05, 0.5, 0.95]).tolist() if len(alive) else [None] * 3
    return {"tokens": int(len(x)), "l0": l0 / len(x), "alive_share": float(len(alive) / len(dens)), "log10_density_p05_p50_p95": q}


# ----------------------------------------------------------------------------------------------


def generate(out: Path, s: PairSettings, device: str = "cpu") -> dict:
    """Write the pair, its SAEs and its corpus to `out`; returns PAIR.json's content."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch

    s = s.resolved()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t = {}
    t0 = time.perf_counter()
    tok = build_tokenizer(s.d_vocab, out / "_tokenizer")
    write_corpus(out / "eval_corpus.parquet", s)
    t["tokenizer_and_corpus"] = time.perf_counter() - t0
    ids = np.asarray(pq.read_table(out / "eval_corpus.parquet").column("token_ids").to_pylist(), np.int64)
    n_cal = max(1, min(len(ids) // 2, -(-s.calibration_tokens // s.context)))
    cal_tokens = torch.from_numpy(ids[:n_cal]).to(device)
    held_out = torch.from_numpy(ids[-n_cal:]).to(device)  # L0 and densities are reported on these

    t0 = time.perf_counter()
    model = build_model(s, tok, device)
    t["build_base"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    save_model(model, out / "base", s, "base")
    t["save_base"] = time.perf_counter() - t0
    calib = {"base": hook_acts(model, cal_tokens, s.hook), "base_held_out": hook_acts(model, held_out, s.hook)}
    t0 = time.perf_counter()
    perturb_model(model, s.perturb, s.seed + 7)
    t["perturb"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    save_model(model, out / "finetuned", s, "finetuned")
    t["save_finetuned"] = time.perf_counter() - t0
    calib["finetuned"], calib["finetuned_held_out"] = hook_acts(model, cal_tokens, s.hook), hook_acts(model, held_out, s.hook)
    del model
    import shutil

    shutil.rmtree(out / "_tokenizer", ignore_errors=True)

    saes = {}
    for d_sae in s.d_sae:
        t0 = time.perf_counter()
        base, ft = sae_pair(d_sae, calib["base"], calib["finetuned"], s, device)
        for name, (w, b, thr, _), model_name in (("base_sae", base, "base"), ("finetuned_sae", ft, "finetuned")):
            save_sae(out / "saes" / str(d_sae) / name, w, b, thr, sae_cfg(s.d_model, d_sae, s.hook, s, model_name), s.dtype)
        saes[str(d_sae)] = {
            "seconds": time.perf_counter() - t0,
            "base_sae_on_base": measure_sae(base[0], base[1], base[2], calib["base_held_out"]),
            "finetuned_sae_on_finetuned": measure_sae(ft[0], ft[1], ft[2], calib["finetuned_held_out"]),
            "base_sae_on_finetuned": measure_sae(base[0], base[1], base[2], calib["finetuned_held_out"]),
        }
        del base, ft
    for name in ("base_sae", "finetuned_sae"):  # the demo layout: saes/<name> is the first width
        link = out / "saes" / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(Path(str(s.d_sae[0])) / name)
    info = {"settings": {**asdict(s), "hook": s.hook}, "device": device, "seconds": t, "saes": saes, "n_params_per_model": _n_params(s)}
    (out / "PAIR.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def _n_params(s: PairSettings) -> int:
    s = s.resolved()
    attn = 4 * s.d_model * s.n_heads * s.d_head
    mlp = 2 * s.d_model * s.d_mlp
    return int(s.n_layers * (attn + mlp) + 2 * s.d_vocab * s.d_model + s.context * s.d_model)


def config_text(pair: Path, run_id: str, d_sae: int, n_tokens: int, context: int, both_saes: bool = True, batch_size: int = 32,
                corpus: Path | None = None, extra: str = "") -> str:
    """A precompute config (TOML) for the pair at one SAE width; the demo config's defaults elsewhere."""
    pair = Path(pair).resolve()
    info = json.loads((pair / "PAIR.json").read_text())
    q = lambda p: json.dumps(str(p))  # noqa: E731  (a JSON string is a valid TOML basic string)
    saes = pair / "saes" / str(d_sae)
    lines = [
        f"run_id = {json.dumps(run_id)}", f"hook = {json.dumps(info['settings']['hook'])}",
        "[models.base]", f"path = {q(pair / 'base')}", "[models.finetuned]", f"path = {q(pair / 'finetuned')}",
        "[saes.base_sae]", f"path = {q(saes / 'base_sae')}",
    ]
    if both_saes:
        lines += ["[saes.finetuned_sae]", f"path = {q(saes / 'finetuned_sae')}"]
    lines += ["[corpus]", f"path = {q(corpus or pair / 'eval_corpus.parquet')}",
              "[sample]", f"n_tokens = {n_tokens}", f"context_size = {context}", f"batch_size = {batch_size}", "seed = 0"]
    return "\n".join(lines) + "\n" + extra


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "_work" / "wide")
    d = PairSettings()
    p.add_argument("--d-model", type=int, default=d.d_model)
    p.add_argument("--layers", type=int, default=d.n_layers)
    p.add_argument("--heads", type=int, default=d.n_heads)
    p.add_argument("--d-head", type=int, default=None)
    p.add_argument("--d-mlp", type=int, default=None)
    p.add_argument("--d-vocab", type=int, default=d.d_vocab)
    p.add_argument("--d-sae", type=int, nargs="+", default=list(d.d_sae))
    p.add_argument("--n-sequences", type=int, default=d.n_sequences)
    p.add_argument("--context", type=int, default=d.context)
    p.add_argument("--l0", type=float, default=d.l0, help="expected active features per token of every SAE (default 64)")
    p.add_argument("--perturb", type=float, default=d.perturb, help="finetune noise, in units of each weight's std (default 0.05)")
    p.add_argument("--calibration-tokens", type=int, default=d.calibration_tokens)
    p.add_argument("--dtype", default=d.dtype, choices=("float32", "bfloat16", "float16"), help="dtype of the weights written")
    p.add_argument("--device", default="cpu", help="where the weights are drawn (cuda: seconds at full depth)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gemma-2-2b", action="store_true", help="gemma-2-2b's shapes: 26 layers, d_model 2304, 8 heads of 256, d_mlp 9216")
    p.add_argument("--tiny", action="store_true", help="the test suite's size (d_model 64, 2 layers, 1k vocabulary, SAEs of 256 and 512)")
    a = p.parse_args(argv)
    if a.tiny:
        s = replace(TINY, seed=a.seed, dtype=a.dtype)
    else:
        s = PairSettings(
            d_model=a.d_model, n_layers=a.layers, n_heads=a.heads, d_head=a.d_head, d_mlp=a.d_mlp, d_vocab=a.d_vocab, d_sae=tuple(a.d_sae),
            n_sequences=a.n_sequences, context=a.context, l0=a.l0, perturb=a.perturb, calibration_tokens=a.calibration_tokens,
            dtype=a.dtype, seed=a.seed,
        )
        if a.gemma_2_2b:
            s = replace(s, **GEMMA_2_2B)
    if s.d_vocab < 3 or min(s.d_sae) < 1 or s.context < 2:
        raise SystemExit("error: need d_vocab >= 3, d_sae >= 1 and context >= 2")
    t0 = time.perf_counter()
    info = generate(a.out, s, a.device)
    print(json.dumps({"out": str(a.out), "seconds": round(time.perf_counter() - t0, 1), "saes": {k: {m: v[m]["l0"] for m in v if m != "seconds"} for k, v in info["saes"].items()}}))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    raise SystemExit(main())
