"""The precompute pipeline: one pass over ONE token sample into mergeable accumulators, then a run directory.

    prepare(cfg)      load and check everything (models, SAEs, hook, d_in, tokenizers, corpus,
                      sample) BEFORE a run directory is touched: a bad config leaves nothing.
    run(...)          stream the batches (or one shard's slice of them), checkpointing the
                      accumulator state every N batches; then finalize (or, for a shard, save).
    merge(...)        combine the shard states of a run and finalize.
    finalize(...)     weights-only statistics, examples' windows, tables, and the manifest last.

Which tokens count. Special tokens of either tokenizer (BOS, EOS, PAD, as SAELens's
`get_special_token_ids` lists them) are excluded from every SAE and feature statistic, as SAELens's
`run_evals(exclude_special_tokens=True)` does: L0, MSE, explained variance, densities,
activation similarity and examples cover the other ("counted") tokens; a CE loss at position p
counts when the token at p counts; the spliced pass replaces the activation only at counted
tokens (the special tokens keep theirs), and the zero-ablated pass zeros every position (both
SAELens's conventions). Residual-stream similarity covers every token, BOS included, so that its
by-position curve starts at position 0.

Outliers (METHODS.md section 2): a counted token whose activation norm at the hook exceeds the
threshold: `outlier_norm`, or `outlier_norm_factor` x the mean norm of the model's counted
tokens in the calibration sequences (Study T's 2*sqrt(d_model) after scaling the mean norm to
sqrt(d_model) is factor 2). The "excluded" rows of metrics.parquet leave outlier tokens out of
every mean and do not splice the SAE in at them (a second spliced pass, run only for batches
that contain an outlier).

Calibration: the first min(64, n_sequences) sequences of the sample fix, before the stream,
the outlier thresholds and the upper end of the L2 histogram range (1.5 x the largest L2 seen,
rounded up); every shard computes the same values. L2 values above the range are counted in the
last bin, and the number clipped is in the manifest.

Per-token explained variance uses the mean of the batch (SAELens's convention), so it depends on
the batch size; shards are cut at batch boundaries, so it does not depend on sharding.

Speed: for `hook_resid_pre` / `hook_resid_post` hooks the spliced and zero-ablated losses run
the model from the hook's layer on (`start_at_layer`) with the replaced residual, instead of a
full hooked forward; tests check both give the same loss. Other hooks use the hooked forward.
On that path the zero-ablated loss is one single-position forward from the hook on (a zero
residual at every position makes every later position identical, so the logits are the same
everywhere; `ModelRunner.zero_loss`), not a full-batch pass: B2 (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import json
import math
import functools
import os
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from explorer import rundir, schema
from explorer.errors import ConfigError, CorpusError, RunError
from precompute import examples as ex_mod
from precompute.accumulators import (
    CrossProducts,
    FeatureStats,
    PairStats,
    QualityStats,
    QuantileSample,
    ResidStats,
    SparseActs,
    TopK,
    _Stateful,
)
from precompute.config import REPO_ROOT, STATE_VERSION, RunConfig
from precompute.corpus import TokenSample, check_token_ids, read_corpus, sample_sequences

MODELS = schema.MODELS
CALIBRATION_SEQUENCES = 64
CE_CHUNK_BYTES = 1 << 20  # logits per chunk of the loss: 64 positions of a 4096-token vocabulary
CHECKPOINT_DIR = ".checkpoint"
SHARDS_DIR = "shards"
STATE_FILE = "state.safetensors"
COMPLETE_MARKER = "COMPLETE.json"
PACKAGES = ("torch", "sae-lens", "transformer-lens", "transformers", "numpy", "scipy", "pyarrow", "safetensors")


def log(msg: str) -> None:
    print(f"[precompute] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Loading and checking


@dataclass
class Prepared:
    cfg: RunConfig  # hook resolved
    pair: Any  # explorer.models.LoadedPair
    sample: TokenSample
    special_ids: np.ndarray
    device: str
    inputs: dict[str, Any]

    @property
    def n_batches(self) -> int:
        return math.ceil(self.sample.n_sequences / self.cfg.sample.batch_size)

    def batch_seq_ids(self, b: int) -> np.ndarray:
        bs = self.cfg.sample.batch_size
        return np.arange(b * bs, min((b + 1) * bs, self.sample.n_sequences))

    @functools.cached_property
    def codecs(self) -> dict[str, "SaeCodec"]:
        """One SaeCodec per SAE, built once per run (their weight norms are computed once)."""
        return {name: SaeCodec(sae) for name, sae in self.pair.saes.items()}


def _file_fingerprint(path: Path, chunk: int = 16 << 20) -> dict[str, Any]:
    """Size and sha256 of the first and last 16 MiB: cheap even for large weights, and it changes
    whenever a retrained model or SAE, or another corpus, is written at the same path."""
    import hashlib

    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        h.update(fh.read(chunk))
        if size > 2 * chunk:
            fh.seek(size - chunk)
        h.update(fh.read(chunk))
    return {"bytes": size, "sha256_head_tail": h.hexdigest()}


def input_fingerprints(cfg: RunConfig) -> dict[str, Any]:
    """Fingerprints of the local files a run reads (hub models and SAEs are named by their ids)."""
    from explorer.models import LOCAL_MODEL_WEIGHTS, SAE_WEIGHTS

    out: dict[str, Any] = {"corpus": _file_fingerprint(cfg.resolve(cfg.corpus.path))}
    for name, spec in cfg.models.items():
        if spec.path is not None:
            out[name] = _file_fingerprint(cfg.resolve(spec.path) / LOCAL_MODEL_WEIGHTS)
    for name, spec in cfg.saes.items():
        if spec.path is not None:
            out[name] = _file_fingerprint(cfg.resolve(spec.path) / SAE_WEIGHTS)
    return out


def prepare(cfg: RunConfig, device: str = "cpu") -> Prepared:
    """Load and check models, SAEs, hook, tokenizers and the corpus; raise an ExplorerError on any problem."""
    from sae_lens.util import get_special_token_ids

    from explorer.models import load_pair

    corpus_path = cfg.resolve(cfg.corpus.path)
    if not corpus_path.is_file():
        raise CorpusError(f"Corpus file {corpus_path} does not exist. Point [corpus] path at a Parquet file with a token_ids or text column.")
    pair = load_pair(
        cfg.models["base"], cfg.models["finetuned"], cfg.saes["base_sae"], cfg.saes.get("finetuned_sae"),
        hook=cfg.hook, min_matching_id_share=cfg.thresholds.min_matching_id_share, device=device, root=REPO_ROOT,
    )
    ctx = cfg.sample.context_size
    for label, model in (("base", pair.base), ("finetuned", pair.finetuned)):
        if ctx > model.cfg.n_ctx:
            raise ConfigError(f"[sample] context_size={ctx} exceeds the {label} model's context length n_ctx={model.cfg.n_ctx}.")
    vocab = min(pair.base.cfg.d_vocab, pair.finetuned.cfg.d_vocab)
    seqs, sources = read_corpus(corpus_path, ctx, pair.base.tokenizer)
    check_token_ids(seqs, vocab, corpus_path)
    sample = sample_sequences(seqs, sources, cfg.sample.n_sequences, cfg.sample.seed, corpus_path)
    special = sorted(set(get_special_token_ids(pair.base.tokenizer)) | set(get_special_token_ids(pair.finetuned.tokenizer)))
    return Prepared(cfg.with_hook(pair.hook), pair, sample, np.asarray(special, np.int64), device, input_fingerprints(cfg))


# ----------------------------------------------------------------------------------------------
# Forward passes


def _hook_start_layer(hook: str, n_layers: int) -> int | None:
    """The layer whose input residual IS the hook's activation (resid_pre L -> L, resid_post L -> L+1)."""
    parts = hook.split(".")
    if len(parts) == 3 and parts[0] == "blocks" and parts[1].isdigit():
        layer = int(parts[1])
        if parts[2] == "hook_resid_pre":
            return layer
        if parts[2] == "hook_resid_post":
            return layer + 1
    return None


class ModelRunner:
    """Clean, spliced and zero-ablated losses of one model, and its activation at the hook."""

    def __init__(self, model, hook: str, fast: bool = True):
        from sae_lens.util import extract_stop_at_layer_from_tlens_hook_name

        self.model, self.hook = model, hook
        self.start_layer = _hook_start_layer(hook, model.cfg.n_layers)
        tok = model.tokenizer
        self.fast = (
            fast
            and self.start_layer is not None
            and model.cfg.positional_embedding_type != "shortformer"
            and not (tok is not None and getattr(tok, "padding_side", "right") == "left")
        )
        self.stop_at = extract_stop_at_layer_from_tlens_hook_name(hook)
        # Our own head (ln_final, unembed, log-softmax, gather) on the blocks' output: only where
        # the hook is in the blocks and the logits are not soft-capped (TL's loss otherwise).
        cap = getattr(model.cfg, "output_logits_soft_cap", None)
        self.own_head = self.fast and not (cap is not None and cap > 0)

    def head_loss(self, resid, tokens):
        """Per-token loss [B, C-1] from the residual after the last block, as TransformerLens's
        forward computes it (ln_final, the unembed as `Unembed.forward` does it, log-softmax,
        gather of the next token), but in chunks of positions whose logits fit in cache, never
        materialising [B, C, d_vocab], and without the last position's logits (no next token).
        Equal to TL's `return_type="loss"` to float32 rounding (bitwise on the demo); B2."""
        import torch

        model = self.model
        if model.cfg.normalization_type is not None:
            resid = model.ln_final(resid)
        n_b, n_ctx, d = resid.shape
        h = resid[:, :-1].reshape(-1, d)
        target = tokens[:, 1:].reshape(-1, 1).to(h.device)
        W_T, b_U = model.unembed.W_U.T.contiguous(), model.unembed.b_U
        step = max(1, CE_CHUNK_BYTES // (h.element_size() * W_T.shape[0]))
        out = []
        for i in range(0, h.shape[0], step):
            logits = torch.nn.functional.linear(h[i : i + step], W_T, b_U)
            out.append(logits.log_softmax(-1).gather(-1, target[i : i + step]))
        return -torch.cat(out).view(n_b, n_ctx - 1)

    def clean(self, tokens):
        """(per-token loss [B, C-1], activation at the hook [B, C, d])."""
        store = {}

        def grab(act, hook):  # noqa: ARG001
            store["x"] = act.detach().clone()
            return act

        if self.own_head:
            resid = self.model.run_with_hooks(tokens, stop_at_layer=self.model.cfg.n_layers, fwd_hooks=[(self.hook, grab)])
            return self.head_loss(resid, tokens), store["x"]
        loss = self.model.run_with_hooks(tokens, return_type="loss", loss_per_token=True, fwd_hooks=[(self.hook, grab)])
        return loss, store["x"]

    def loss_with(self, tokens, x_new):
        """Per-token loss with the activation at the hook replaced by x_new."""
        if self.own_head:
            return self.head_loss(self.model(x_new, start_at_layer=self.start_layer, stop_at_layer=self.model.cfg.n_layers), tokens)
        if self.fast:
            return self.model(x_new, start_at_layer=self.start_layer, tokens=tokens, return_type="loss", loss_per_token=True)

        def replace(act, hook):  # noqa: ARG001
            return x_new

        return self.model.run_with_hooks(tokens, return_type="loss", loss_per_token=True, fwd_hooks=[(self.hook, replace)])

    def zero_loss(self, tokens, x):
        """Per-token loss with the activation at the hook zeroed at every position.

        Fast path: with every position's residual equal (zero) at the hook, and no positional
        signal added after it (standard/rotary/ALiBi positions act at the embedding or only on
        attention weights; shortformer and left padding are excluded from `fast`), each later
        layer sees identical positions (attention averages identical values), so the logits are
        the same at every position of every sequence: one single-position forward from the hook
        on, then a gather. Equal to the full pass up to float rounding (tests compare it with
        full hooked forwards and SAELens's run_evals); it saves one of the four CE passes per
        model (clean, zero-ablated, spliced per SAE)."""
        if not self.fast:
            import torch

            return self.loss_with(tokens, torch.zeros_like(x))

        logits = self.model(x.new_zeros((1, 1, x.shape[-1])), start_at_layer=self.start_layer, return_type="logits")
        log_probs = logits[0, 0].log_softmax(-1)
        return -log_probs[tokens[:, 1:]]

    def acts(self, tokens):
        """The activation at the hook only (the model stops after the hook's layer)."""
        store = {}

        def grab(act, hook):  # noqa: ARG001
            store["x"] = act.detach().clone()
            return act

        self.model.run_with_hooks(tokens, return_type=None, fwd_hooks=[(self.hook, grab)], stop_at_layer=self.stop_at)
        return store["x"]


class SaeCodec:
    """One SAE's encode, as the sparse positive entries, and its decode, for the stream.

    `encode_decode(x_flat)` returns (token row, feature, value, x_hat) with the entries in
    row-major (token, feature) order: the positive entries of `sae.encode(x)` and
    `sae.decode(sae.encode(x))`. Fast path for plain ReLU and JumpReLU SAEs (SAELens's
    StandardSAE / JumpReLUSAE with no activation normalization, no hook_z reshaping and no hooks
    attached): the pre-activations are `encode`'s (one fused addmm instead of matmul + bias:
    equal to float32 rounding, bitwise on the demo), the positive entries are read off
    `hidden_pre > max(threshold, 0)` (JumpReLU's relu(h) * (h > threshold) is positive exactly
    there, and equals h), and the decode sums only the active decoder rows (`embedding_bag`;
    equal to the dense `acts @ W_dec + b_dec` up to float32 summation order). That skips four
    elementwise passes over the dense [tokens, d_sae] activations and the dense decode matmul
    (B2, benchmarks/RESULTS.md). Any other SAE goes through `sae.encode` / `sae.decode`.

    Features that cannot fire in a batch are not encoded (fast path): by Cauchy-Schwarz a
    pre-activation is at most max_t ||sae_in_t|| * ||W_enc[:, j]|| + b_enc[j], so a feature
    whose bound (widened by 1e-3 relative, far above the float32 rounding of a d_in-term dot
    product) stays below its gate is zero at every token of the batch. On the demo that is a
    third of the features (dead or high-threshold ones); the others' pre-activations come from
    the same addmm on W_enc's remaining columns (equal to float32 rounding, bitwise on the
    demo). The entries and x_hat are those of the full encode. B2."""

    PRUNE_MIN_SHARE = 0.1  # encode a column subset only when it skips at least this share of the features
    PRUNE_MARGIN = 1e-3

    def __init__(self, sae):
        import torch
        from sae_lens.saes.jumprelu_sae import JumpReLUSAE
        from sae_lens.saes.standard_sae import StandardSAE

        self.sae = sae
        kind = type(sae)
        self.fast = (
            kind in (JumpReLUSAE, StandardSAE)
            and isinstance(getattr(sae, "activation_fn", None), torch.nn.ReLU)
            and getattr(sae.cfg, "normalize_activations", "none") == "none"
            and not getattr(sae, "hook_z_reshaping_mode", False)
            and all(not m._forward_hooks and not m._forward_pre_hooks for m in sae.modules())
        )
        self.jumprelu = kind is JumpReLUSAE
        if self.fast:
            with torch.inference_mode():
                self.gate = sae.threshold.clamp_min(0) if self.jumprelu else torch.zeros_like(sae.b_enc)
                # the bound's per-feature terms in float64 on the CPU (MPS has no float64): ||W_enc[:, j]||
                # (widened; a sum over rows: vector_norm along dim 0 of the row-major W_enc is 15x
                # slower), b_enc, the gate
                cpu64 = {"device": "cpu", "dtype": torch.float64}
                self.w_norm = sae.W_enc.to(**cpu64).square().sum(0).sqrt() * (1 + self.PRUNE_MARGIN)
                self.b_enc64, self.gate64 = sae.b_enc.to(**cpu64), self.gate.to(**cpu64)

    def live_features(self, sae_in):
        """Ascending ids of the features that may fire on some row of sae_in, or None when
        (nearly) all may: the Cauchy-Schwarz bound of the class docstring."""
        import torch

        if sae_in.dtype not in (torch.float32, torch.float64):  # the margin covers float32 rounding, not half precision
            return None
        x_norm = float(torch.linalg.vector_norm(sae_in, dim=1).max()) * (1 + self.PRUNE_MARGIN) if len(sae_in) else 0.0
        if not math.isfinite(x_norm):
            return None
        bound = self.w_norm * x_norm + self.b_enc64
        bound = bound + bound.abs() * self.PRUNE_MARGIN
        may_fire = ~(bound < self.gate64)  # NaN: never pruned
        n_live = int(may_fire.sum())
        if n_live > (1 - self.PRUNE_MIN_SHARE) * len(bound):
            return None
        # a multiple of 16 columns (an odd count makes the addmm ~1.6x slower on CPU): pad with
        # features that cannot fire, which then give no entries either
        pad = -n_live % 16
        if n_live + pad >= len(bound):
            return None
        if pad:
            may_fire[torch.nonzero(~may_fire).view(-1)[:pad]] = True
        return torch.nonzero(may_fire).view(-1).to(sae_in.device)

    def encode_decode(self, x_flat):
        import torch

        sae = self.sae
        n_tok = x_flat.shape[0]
        if not self.fast:
            acts = sae.encode(x_flat)
            x_hat = sae.decode(acts).to(x_flat.dtype)
            nz = torch.nonzero(acts > 0)  # row-major: sorted by (token, feature)
            t, f = nz[:, 0], nz[:, 1]
            return t, f, acts[t, f], x_hat
        sae_in = x_flat.to(sae.dtype) - sae.b_dec * sae.cfg.apply_b_dec_to_input  # SAE.process_sae_in
        live = self.live_features(sae_in)
        if live is None:
            hidden_pre = torch.addmm(sae.b_enc, sae_in, sae.W_enc)  # sae_in @ W_enc + b_enc, fused
            positive = hidden_pre > self.gate
        else:  # only the features that may fire (ascending: entries stay in (token, feature) order)
            hidden_pre = torch.addmm(sae.b_enc.index_select(0, live), sae_in, sae.W_enc.index_select(1, live))
            positive = hidden_pre > self.gate.index_select(0, live)
        if positive.device.type == "cpu":  # numpy's nonzero of a sparse mask is ~4x torch's on CPU
            flat = torch.from_numpy(np.flatnonzero(positive.numpy()))  # row-major: sorted by (token, feature)
        else:
            flat = torch.nonzero(positive.view(-1)).view(-1)
        n_cols = hidden_pre.shape[1]
        t, f = flat // n_cols, flat % n_cols
        vals = hidden_pre.view(-1).index_select(0, flat)
        if live is not None:
            f = live.index_select(0, f)
        counts = torch.bincount(t, minlength=n_tok)
        offsets = torch.cumsum(counts, 0) - counts
        x_hat = torch.nn.functional.embedding_bag(f, sae.W_dec, offsets, mode="sum", per_sample_weights=vals) + sae.b_dec
        return t, f, vals, x_hat.to(x_flat.dtype)

    def encode_at(self, x, rows: np.ndarray, features: np.ndarray, chunk: int = 2048) -> np.ndarray:
        """`features[i]`'s activation at the positions `rows[i]` of `x` ([N, d_in]; rows [n, W]) -> numpy [n, W].

        Encodes the N positions once, restricted to the features asked for (in chunks of
        `chunk` features), then gathers: a window pass costs N x d_in x (distinct features), not a
        dense encode per example. Fast path as in `encode_decode` (equal to `sae.encode` up to
        float32 summation order); otherwise `sae.encode` and its columns."""
        import torch

        sae = self.sae
        out = np.zeros(rows.shape, np.float32)
        uniq, inv = np.unique(np.asarray(features, dtype=np.int64), return_inverse=True)
        if self.fast:
            sae_in = x.to(sae.dtype) - sae.b_dec * sae.cfg.apply_b_dec_to_input
            gate_all = sae.threshold.clamp_min(0) if self.jumprelu else None
        else:
            dense = sae.encode(x)
        for lo in range(0, len(uniq), chunk):
            f = torch.from_numpy(uniq[lo : lo + chunk]).to(x.device)
            if self.fast:
                pre = torch.addmm(sae.b_enc.index_select(0, f), sae_in, sae.W_enc.index_select(1, f))  # [N, u]
                gate = gate_all.index_select(0, f) if gate_all is not None else 0.0
                acts = torch.where(pre > gate, pre, torch.zeros((), dtype=pre.dtype, device=pre.device)).float().cpu().numpy()
            else:
                acts = dense.index_select(1, f).float().cpu().numpy()
            mine = np.flatnonzero((inv >= lo) & (inv < lo + chunk))
            out[mine] = acts[rows[mine], (inv[mine] - lo)[:, None]]
        return out


# ----------------------------------------------------------------------------------------------
# Calibration


@dataclass(frozen=True)
class Calibration:
    n_sequences: int
    mean_norm: dict[str, float]
    outlier_threshold: dict[str, float]
    l2_max: float

    def to_dict(self) -> dict[str, Any]:
        return {"n_sequences": self.n_sequences, "mean_norm": self.mean_norm, "outlier_threshold": self.outlier_threshold, "l2_max": self.l2_max}


def _ceil_2sig(x: float) -> float:
    if not np.isfinite(x) or x <= 0:
        return 1.0
    e = math.floor(math.log10(x)) - 1
    return math.ceil(x / 10**e) * 10**e


def calibrate(prep: Prepared, runners: dict[str, ModelRunner]) -> Calibration:
    import torch

    n = min(CALIBRATION_SEQUENCES, prep.sample.n_sequences)
    bs = prep.cfg.sample.batch_size
    norms = {m: [] for m in MODELS}
    l2s = []
    with torch.inference_mode():
        for i in range(0, n, bs):
            tok_np = prep.sample.tokens[i : min(i + bs, n)]
            tokens = torch.from_numpy(tok_np.astype(np.int64)).to(prep.device)
            counted = ~np.isin(tok_np, prep.special_ids)
            xs = {m: runners[m].acts(tokens) for m in MODELS}
            for m in MODELS:
                norms[m].append(xs[m].norm(dim=-1).cpu().numpy()[counted])
            l2s.append((xs["base"] - xs["finetuned"]).norm(dim=-1).cpu().numpy().ravel())
    mean_norm = {m: float(np.concatenate(norms[m]).astype(np.float64).mean()) if sum(len(a) for a in norms[m]) else float("nan") for m in MODELS}
    th = prep.cfg.thresholds
    if th.outlier_norm is not None:
        thr = {m: float(th.outlier_norm) for m in MODELS}
    else:
        thr = {m: float(th.outlier_norm_factor * mean_norm[m]) if np.isfinite(mean_norm[m]) else float("inf") for m in MODELS}
    l2_max = _ceil_2sig(1.5 * float(np.concatenate(l2s).max()))
    return Calibration(n, mean_norm, thr, l2_max)


# ----------------------------------------------------------------------------------------------
# The pass state: every accumulator of a run


class PassState:
    def __init__(self, prep: Prepared, calib: Calibration, pair_keys: np.ndarray | None, batch_range: tuple[int, int]):
        cfg = prep.cfg
        self.sae_names = cfg.sae_names
        self.d_sae = {s: int(prep.pair.saes[s].cfg.d_sae) for s in self.sae_names}
        ex = cfg.examples
        self.features = {(s, m): FeatureStats(self.d_sae[s], schema.ACT_HIST_EDGES) for s in self.sae_names for m in MODELS}
        self.topk = {(s, m): TopK(self.d_sae[s], ex.n_top) for s in self.sae_names for m in MODELS}
        self.quantile = {(s, m): QuantileSample(self.d_sae[s], ex.quantile_sample, cfg.sample.seed) for s in self.sae_names for m in MODELS}
        self.quality = {(s, m): QualityStats() for s in self.sae_names for m in MODELS}
        self.pairs = {s: PairStats(self.d_sae[s], cfg.thresholds.act_error_eps) for s in self.sae_names}
        self.cross = (
            CrossProducts(self.d_sae["base_sae"], self.d_sae["finetuned_sae"], pair_keys) if "finetuned_sae" in self.sae_names else None
        )
        self.resid = ResidStats(cfg.sample.context_size, calib.l2_max, schema.RESID_HIST_BINS, schema.COSINE_RANGE)
        self.batch_start, self.batch_end = batch_range
        self.next_batch = self.batch_start

    def accumulators(self) -> dict[str, _Stateful]:
        out: dict[str, _Stateful] = {}
        for kind in ("features", "topk", "quantile", "quality"):
            for (s, m), acc in getattr(self, kind).items():
                out[f"{kind}.{s}.{m}"] = acc
        for s, acc in self.pairs.items():
            out[f"pairs.{s}"] = acc
        if self.cross is not None:
            out["cross"] = self.cross
        out["resid"] = self.resid
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


# ----------------------------------------------------------------------------------------------
# One batch


def process_batch(prep: Prepared, runners: dict[str, ModelRunner], state: PassState, calib: Calibration, b: int) -> dict:
    """Run batch `b` through both models and SAEs into the accumulators; returns both models'
    activations at the hook ({model: [B, C, d] tensor}) for the hook-activation cache."""
    import torch

    codecs = prep.codecs
    seq_ids = prep.batch_seq_ids(b)
    tok_np = prep.sample.tokens[seq_ids]
    n_b, ctx = tok_np.shape
    tokens = torch.from_numpy(tok_np.astype(np.int64)).to(prep.device)
    counted = ~np.isin(tok_np, prep.special_ids)  # [B, C]
    counted_flat = counted.reshape(-1)
    counted_t = torch.from_numpy(counted).to(prep.device)
    gidx = (seq_ids[:, None].astype(np.int64) * ctx + np.arange(ctx)[None, :]).reshape(-1)
    n_counted = int(counted.sum())
    xs = {}
    sparse: dict[str, dict[str, SparseActs]] = {s: {} for s in state.sae_names}
    with torch.inference_mode():
        for m in MODELS:
            r = runners[m]
            clean_loss, x = r.clean(tokens)
            zero_loss = r.zero_loss(tokens, x)
            xs[m] = x
            outlier = (x.norm(dim=-1) > calib.outlier_threshold[m]).cpu().numpy()
            any_outlier = bool((counted & outlier).any())
            clean_np, zero_np = clean_loss.cpu().numpy(), zero_loss.cpu().numpy()
            x_flat = x.reshape(n_b * ctx, -1)
            for s in state.sae_names:
                t, f, vals, x_hat_flat = codecs[s].encode_decode(x_flat)
                x_hat = x_hat_flat.reshape(x.shape)
                spliced = r.loss_with(tokens, torch.where(counted_t[..., None], x_hat, x)).cpu().numpy()
                if any_outlier:
                    keep = torch.from_numpy(counted & ~outlier).to(prep.device)[..., None]
                    spliced_ex = r.loss_with(tokens, torch.where(keep, x_hat, x)).cpu().numpy()
                else:
                    spliced_ex = spliced
                vals = vals.cpu().numpy().astype(np.float32)
                t, f = t.cpu().numpy(), f.cpu().numpy().astype(np.int64)
                l0 = np.bincount(t, minlength=n_b * ctx)  # active features per token
                keep = counted_flat[t]  # special tokens do not count
                t, f, vals = t[keep], f[keep], vals[keep]
                state.quality[(s, m)].update(
                    x_flat.cpu().numpy(), x_hat_flat.cpu().numpy(), l0, counted, outlier,
                    {"clean": (clean_np, clean_np), "spliced": (spliced, spliced_ex), "zero_ablated": (zero_np, zero_np)},
                )
                sa = SparseActs(gidx[t], f, vals, n_counted)
                state.features[(s, m)].update(sa)
                state.topk[(s, m)].update(sa)
                state.quantile[(s, m)].update(sa)
                sparse[s][m] = sa
        xb, xf = xs["base"], xs["finetuned"]
        cos = torch.nn.functional.cosine_similarity(xb, xf, dim=-1).cpu().numpy()
        l2 = (xb - xf).norm(dim=-1).cpu().numpy()
    state.resid.update(cos, l2)
    for s in state.sae_names:
        state.pairs[s].update(sparse[s]["base"], sparse[s]["finetuned"])
    if state.cross is not None:
        state.cross.update(sparse["base_sae"]["base"], sparse["finetuned_sae"]["finetuned"])
    return xs


# ----------------------------------------------------------------------------------------------
# Hook activations kept for the example windows


HOOK_ACTS_DIR = "hook_acts"
HOOK_CACHE_MB_ENV = "PRECOMPUTE_HOOK_CACHE_MB"
HOOK_CACHE_MB_DEFAULT = 2048


class HookActsCache:
    """Both models' activations at the hook, one file per stream batch, kept on disk during the
    stream so that finalize fills the example windows without running the models again.

    Disk, not memory (peak memory stays flat in the token count), bounded by
    $PRECOMPUTE_HOOK_CACHE_MB (default 2048 MB; 0 turns it off): batches past the budget are
    recomputed at finalize, as is any batch whose file is missing or whose tokens differ. Files
    are written atomically (`.npz` renamed into place) and live in the run's checkpoint
    directory (a shard's: moved next to its state when the shard completes), so they go when
    the run is finalized."""

    def __init__(self, read_dirs: Sequence[Path], write_dir: Path | None = None):
        self.read_dirs = [Path(d) for d in read_dirs]
        self.write_dir = None if write_dir is None else Path(write_dir)
        try:
            mb = float(os.environ.get(HOOK_CACHE_MB_ENV, HOOK_CACHE_MB_DEFAULT))
        except ValueError:
            mb = HOOK_CACHE_MB_DEFAULT
        self.budget = int(max(0.0, mb) * 2**20)
        self.used = 0
        if self.write_dir is not None and self.write_dir.is_dir():
            for f in self.write_dir.iterdir():
                if f.suffix == ".npz":
                    self.used += f.stat().st_size
                else:  # a temporary file of a process killed mid-write
                    f.unlink(missing_ok=True)

    @staticmethod
    def _name(b: int) -> str:
        return f"{b:07d}.npz"

    def put(self, b: int, tokens: np.ndarray, xs: dict) -> bool:
        if self.write_dir is None:
            return False
        arrays = {"tokens": np.ascontiguousarray(tokens, dtype=np.int64), **{m: x.detach().float().cpu().numpy() for m, x in xs.items()}}
        size = sum(a.nbytes for a in arrays.values())
        if self.used + size > self.budget:
            return False
        self.write_dir.mkdir(parents=True, exist_ok=True)
        final = self.write_dir / self._name(b)
        tmp = self.write_dir / f".{final.name}.{os.getpid()}.tmp"
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
        os.replace(tmp, final)
        self.used += final.stat().st_size
        return True

    def get(self, b: int, tokens: np.ndarray) -> dict[str, np.ndarray] | None:
        for d in self.read_dirs:
            f = d / self._name(b)
            if not f.is_file():
                continue
            try:
                with np.load(f, allow_pickle=False) as z:
                    if not np.array_equal(z["tokens"], tokens):
                        return None
                    return {m: z[m] for m in MODELS}
            except (OSError, ValueError, KeyError):  # damaged: recompute
                return None
        return None


# ----------------------------------------------------------------------------------------------
# Checkpoints and shard states (safetensors + JSON metadata; no pickle)


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


def _state_meta(prep: Prepared, calib: Calibration, state: PassState, shard: tuple[int, int] | None, complete: bool) -> dict[str, Any]:
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


def _check_meta(meta: dict[str, Any], prep: Prepared, path: Path) -> None:
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


# ----------------------------------------------------------------------------------------------
# Run, shards, merge


def _runners(prep: Prepared) -> dict[str, ModelRunner]:
    return {"base": ModelRunner(prep.pair.base, prep.cfg.hook), "finetuned": ModelRunner(prep.pair.finetuned, prep.cfg.hook)}


def _pair_keys(prep: Prepared) -> np.ndarray | None:
    from precompute.weights import candidate_pair_keys, unit_rows

    saes = prep.pair.saes
    if "finetuned_sae" not in saes:
        return None
    d_a, d_b = int(saes["base_sae"].cfg.d_sae), int(saes["finetuned_sae"].cfg.d_sae)
    if max(d_a, d_b) <= prep.cfg.matching.max_all_pairs_d_sae:
        return None
    return candidate_pair_keys(unit_rows(saes["base_sae"].W_dec), unit_rows(saes["finetuned_sae"].W_dec), prep.cfg.matching.n_candidates)


def _clear_run_dir(run_dir: Path) -> None:
    """Remove what a precompute writes in a run directory (for --overwrite): the manifest first."""
    (run_dir / schema.MANIFEST).unlink(missing_ok=True)
    for name in schema.TABLES:
        (run_dir / name).unlink(missing_ok=True)
    for sub in (CHECKPOINT_DIR, SHARDS_DIR):
        if (run_dir / sub).is_dir():
            shutil.rmtree(run_dir / sub)


def _existing_run(run_dir: Path, prep: Prepared, overwrite: bool) -> bool:
    """True when the run is already complete with this config (nothing to do)."""
    manifest = run_dir / schema.MANIFEST
    if not manifest.exists():
        return False
    try:
        old = json.loads(manifest.read_text())
        same = RunConfig.from_dict(old.get("config")).hash() == prep.cfg.hash()
    except Exception:  # noqa: BLE001 - an unreadable old manifest is just "different"
        same = False
    if same and not overwrite:
        return True
    if not overwrite:
        raise RunError(
            f"Run {prep.cfg.run_id!r} already exists at {run_dir} with a different config. Choose another run_id, "
            "or pass --overwrite to replace it."
        )
    return False


def run(
    cfg: RunConfig,
    runs_dir: Path | str = rundir.DEFAULT_RUNS_DIR,
    shard: tuple[int, int] | None = None,
    checkpoint_every: int = 25,
    device: str = "cpu",
    overwrite: bool = False,
    progress: bool = True,
    batch_delay: float = 0.0,
) -> Path:
    """Compute a run (or one shard of it). Returns the run directory."""
    prep = prepare(cfg, device)
    run_dir = rundir.run_path(prep.cfg.run_id, runs_dir)
    if run_dir.exists() and overwrite:
        _clear_run_dir(run_dir)
    if run_dir.exists() and _existing_run(run_dir, prep, overwrite):
        log(f"run {prep.cfg.run_id!r} is already complete at {run_dir}; nothing to do.")
        return run_dir
    n_batches = prep.n_batches
    if shard is not None:
        i, n = shard
        if n > n_batches:
            raise ConfigError(f"--shard {i}/{n}: the sample has only {n_batches} batches; use at most {n_batches} shards.")
        batch_range = (i * n_batches // n, (i + 1) * n_batches // n)
        work = run_dir / SHARDS_DIR / f"{i}-of-{n}"
        if (work / COMPLETE_MARKER).exists():
            _check_meta(read_state_meta(work / STATE_FILE), prep, work / STATE_FILE)
            log(f"shard {i}/{n} of {prep.cfg.run_id!r} is already complete; run `python -m precompute merge {prep.cfg.run_id}` when all are.")
            return run_dir
        ckpt = work / CHECKPOINT_DIR / STATE_FILE
    else:
        batch_range = (0, n_batches)
        ckpt = run_dir / CHECKPOINT_DIR / STATE_FILE

    runners = _runners(prep)
    calib = calibrate(prep, runners)
    state = PassState(prep, calib, _pair_keys(prep), batch_range)
    if ckpt.exists():
        meta = read_state_meta(ckpt)
        _check_meta(meta, prep, ckpt)
        if meta["calibration"] != json.loads(json.dumps(calib.to_dict())) or (meta["batch_start"], meta["batch_end"]) != batch_range:
            raise RunError(f"The checkpoint {ckpt} does not fit this run (calibration or batch range differ). Delete it and run again.")
        state.load_arrays(load_state_arrays(ckpt))
        state.next_batch = int(meta["next_batch"])
        log(f"resuming {prep.cfg.run_id!r} from its checkpoint at batch {state.next_batch}/{batch_range[1]}")
    run_dir.mkdir(parents=True, exist_ok=True)

    t0, c0 = time.time(), time.process_time()
    processed = _stream(prep, runners, state, calib, ckpt, shard, checkpoint_every, progress, batch_delay)
    stream_s = time.time() - t0
    timing = {"stream_seconds": stream_s, "stream_cpu_seconds": time.process_time() - c0, "stream_tokens": processed, "tokens_per_second": processed / stream_s if stream_s > 0 else None}
    if shard is not None:
        work = ckpt.parent.parent
        save_state(work / STATE_FILE, state, {**_state_meta(prep, calib, state, shard, True), "timing": timing})
        if (ckpt.parent / HOOK_ACTS_DIR).is_dir():  # kept for the merge's example windows
            shutil.rmtree(work / HOOK_ACTS_DIR, ignore_errors=True)
            os.replace(ckpt.parent / HOOK_ACTS_DIR, work / HOOK_ACTS_DIR)
        rundir.atomic_write_bytes(work / COMPLETE_MARKER, json.dumps({"config_hash": prep.cfg.hash(), "shard": list(shard)}).encode())
        shutil.rmtree(ckpt.parent, ignore_errors=True)
        log(f"shard {shard[0]}/{shard[1]} done ({processed:,} tokens in {stream_s:.0f} s)")
        return run_dir
    for stale in run_dir.glob(".*.tmp"):  # temporary table/manifest files of a process killed mid-write
        stale.unlink(missing_ok=True)
    finalize(prep, runners, state, calib, run_dir, timing, HookActsCache([run_dir / CHECKPOINT_DIR / HOOK_ACTS_DIR]))
    shutil.rmtree(run_dir / CHECKPOINT_DIR, ignore_errors=True)
    return run_dir


def _stream(prep, runners, state: PassState, calib, ckpt: Path, shard, checkpoint_every: int, progress: bool, batch_delay: float) -> int:
    from tqdm import tqdm

    ctx = prep.cfg.sample.context_size
    tokens_in = lambda lo, hi: int(sum(len(prep.batch_seq_ids(b)) for b in range(lo, hi))) * ctx  # noqa: E731
    total = tokens_in(state.batch_start, state.batch_end)
    done = tokens_in(state.batch_start, state.next_batch)
    bar = tqdm(
        total=total, initial=done, unit="tok", unit_scale=True, desc=f"precompute {prep.cfg.run_id}", disable=not progress,
        mininterval=1.0, smoothing=0.3, file=sys.stderr,
    )
    processed = 0
    since = 0
    hook_cache = HookActsCache([], ckpt.parent / HOOK_ACTS_DIR)
    for b in range(state.next_batch, state.batch_end):
        xs = process_batch(prep, runners, state, calib, b)
        hook_cache.put(b, prep.sample.tokens[prep.batch_seq_ids(b)], xs)
        state.next_batch = b + 1
        n = len(prep.batch_seq_ids(b)) * ctx
        processed += n
        bar.update(n)
        since += 1
        if batch_delay:
            time.sleep(batch_delay)
        if since >= checkpoint_every or state.next_batch == state.batch_end:
            save_state(ckpt, state, _state_meta(prep, calib, state, shard, False))
            since = 0
    bar.close()
    return processed


def _shard_dirs(run_dir: Path) -> list[Path]:
    root = run_dir / SHARDS_DIR
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def merge(run_id: str, runs_dir: Path | str = rundir.DEFAULT_RUNS_DIR, device: str = "cpu") -> Path:
    """Merge the complete shard states of a run into the run directory."""
    run_dir = rundir.run_path(run_id, runs_dir)
    shards = _shard_dirs(run_dir)
    if not shards:
        raise RunError(f"Run {run_id!r} has no shards in {run_dir / SHARDS_DIR}. Run `python -m precompute run --config X --shard I/N` first.")
    metas = []
    for d in shards:
        if not (d / COMPLETE_MARKER).exists():
            raise RunError(f"Shard {d.name} of run {run_id!r} is not complete. Run it again (it resumes), then merge.")
        metas.append((d, read_state_meta(d / STATE_FILE)))
    counts = {tuple(m["shard"])[1] for _, m in metas}
    hashes = {m["config_hash"] for _, m in metas}
    if len(counts) != 1 or len(hashes) != 1:
        raise RunError(f"The shards of run {run_id!r} come from different configs or shard counts ({sorted(d.name for d in shards)}). Delete the stray ones.")
    n = counts.pop()
    have = sorted(m["shard"][0] for _, m in metas)
    if have != list(range(n)):
        missing = sorted(set(range(n)) - set(have))
        raise RunError(f"Run {run_id!r} has shards {have} of {n}; missing {missing}. Run them, then merge.")
    metas.sort(key=lambda dm: dm[1]["shard"][0])
    cfg = RunConfig.from_dict(metas[0][1]["config"])
    prep = prepare(cfg, device)
    for d, meta in metas:
        _check_meta(meta, prep, d / STATE_FILE)
    if (run_dir / schema.MANIFEST).exists():
        log(f"run {run_id!r} is already complete at {run_dir}; nothing to do.")
        return run_dir
    calib = Calibration(**{k: v for k, v in metas[0][1]["calibration"].items()})
    runners = _runners(prep)
    pair_keys = _pair_keys(prep)
    state = None
    expected = 0
    stream_s, stream_tokens = 0.0, 0
    for d, meta in metas:
        if meta["calibration"] != metas[0][1]["calibration"]:
            raise RunError(f"Shard {d.name} was calibrated differently from shard 0 (different hardware or code?). Rerun the shards on one setup.")
        if meta["batch_start"] != expected or meta["next_batch"] != meta["batch_end"]:
            raise RunError(f"Shard {d.name} covers batches {meta['batch_start']}..{meta['next_batch']}, expected to start at {expected}.")
        expected = meta["batch_end"]
        part = PassState(prep, calib, pair_keys, (meta["batch_start"], meta["batch_end"]))
        part.load_arrays(load_state_arrays(d / STATE_FILE))
        if state is None:
            state = part
        else:
            state.merge(part)
        stream_s += meta.get("timing", {}).get("stream_seconds", 0.0)
        stream_tokens += meta.get("timing", {}).get("stream_tokens", 0)
    if expected != prep.n_batches:
        raise RunError(f"The shards of run {run_id!r} cover batches 0..{expected}, not all {prep.n_batches}.")
    state.batch_start, state.batch_end, state.next_batch = 0, prep.n_batches, prep.n_batches
    timing = {"stream_seconds": stream_s, "stream_tokens": stream_tokens, "tokens_per_second": stream_tokens / stream_s if stream_s else None, "merged_shards": n}
    finalize(prep, runners, state, calib, run_dir, timing, HookActsCache([d / HOOK_ACTS_DIR for d, _ in metas]))
    shutil.rmtree(run_dir / SHARDS_DIR, ignore_errors=True)
    return run_dir


# ----------------------------------------------------------------------------------------------
# Finalize: tables and manifest


def _status(count: np.ndarray, density: np.ndarray, ultralow: float, dense: float) -> np.ndarray:
    return np.select([count == 0, density < ultralow, density > dense], ["dead", "ultralow", "dense"], "regular").astype(object)


def _cross_class(alive_b: np.ndarray, alive_f: np.ndarray) -> np.ndarray:
    return np.select(
        [alive_b & alive_f, alive_b & ~alive_f, ~alive_b & alive_f], ["both_alive", "died", "woke"], "both_dead"
    ).astype(object)


def _list_col(arr2d: np.ndarray, typ):
    import pyarrow as pa

    n, k = arr2d.shape
    offsets = np.arange(0, n * k + 1, k, dtype=np.int32) if n else np.zeros(1, np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(np.ascontiguousarray(arr2d).reshape(-1), typ))


def _nullable(values: np.ndarray, valid: np.ndarray, typ):
    import pyarrow as pa

    return pa.array(np.where(valid, values, 0).astype(typ.to_pandas_dtype()), typ, mask=~valid)


def _search_form(token: str) -> str:
    """A token as one space-free word for features.top_tokens: stripped, or whitespace made visible."""
    return token.strip().replace(" ", "\u2423") or token.replace("\n", "\\n").replace("\t", "\\t").replace(" ", "\u2423")


def vocab_strings(tokenizer, d_vocab: int) -> list[str]:
    n = len(tokenizer) if tokenizer is not None else 0
    strs = tokenizer.batch_decode([[i] for i in range(min(n, d_vocab))]) if n else []
    return strs + [f"<id {i}>" for i in range(len(strs), d_vocab)]


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


def finalize(prep: Prepared, runners: dict[str, ModelRunner], state: PassState, calib: Calibration, run_dir: Path, timing: dict,
             hook_cache: HookActsCache | None = None) -> dict:
    """Compute the weights-only statistics and the examples' windows, write every table, then the manifest."""
    import pyarrow as pa
    import torch

    from precompute import weights as W

    t0 = time.time()
    cfg, sample = prep.cfg, prep.sample
    ctx = sample.context_size
    saes = prep.pair.saes
    run_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, dict] = {}
    summary: dict[str, Any] = {}

    # metrics.parquet
    rows = [{"sae": s, "model": m, **row} for s in state.sae_names for m in MODELS for row in state.quality[(s, m)].finalize()]
    summary["explained_variance_nonfinite"] = {f"{r['sae']}/{r['model']}/{r['outliers']}": r["n_ev_nonfinite"] for r in rows}
    files["metrics.parquet"] = rundir.write_table(run_dir, "metrics.parquet", pa.Table.from_pylist(rows))

    # resid_*.parquet
    from precompute.accumulators import RESID_METRIC_ORDER

    res = state.resid
    pos_n = res.pos_n
    with np.errstate(invalid="ignore", divide="ignore"):
        files["resid_position.parquet"] = rundir.write_table(
            run_dir, "resid_position.parquet",
            pa.table({"position": np.arange(ctx, dtype=np.int32), "n_tokens": pos_n, "mean_cosine": res.pos_cos / pos_n, "mean_l2": res.pos_l2 / pos_n}),
        )
    hist_rows = {"metric": [], "bin_left": [], "bin_right": [], "count": []}
    for i, metric in enumerate(RESID_METRIC_ORDER):
        lo, hi = res.range(i)
        edges = np.linspace(lo, hi, res.n_bins + 1)
        hist_rows["metric"] += [metric] * res.n_bins
        hist_rows["bin_left"] += edges[:-1].tolist()
        hist_rows["bin_right"] += edges[1:].tolist()
        hist_rows["count"] += res.hist[i].tolist()
    files["resid_histograms.parquet"] = rundir.write_table(run_dir, "resid_histograms.parquet", pa.table(hist_rows))
    mom = res.moments.finalize()
    files["resid_summary.parquet"] = rundir.write_table(
        run_dir, "resid_summary.parquet", pa.table({"metric": list(RESID_METRIC_ORDER), **{k: mom[k] for k in ("n", "mean", "std", "min", "max")}})
    )

    # matching
    match = None
    units = {s: W.unit_rows(saes[s].W_dec) for s in state.sae_names}
    if state.cross is not None:
        fa, fb = state.features[("base_sae", "base")], state.features[("finetuned_sae", "finetuned")]
        corr = state.cross.correlation(fa, fb)
        if state.cross.pair_keys is None:
            match = W.match_all_pairs(corr, units["base_sae"], units["finetuned_sae"], cfg.matching.n_kept_per_feature)
        else:
            match = W.match_candidates(state.cross.pair_keys, corr, units["base_sae"], units["finetuned_sae"])
        files["matches.parquet"] = rundir.write_table(
            run_dir, "matches.parquet",
            pa.table(
                {
                    "base_feature_id": match.pair_a.astype(np.int32), "finetuned_feature_id": match.pair_b.astype(np.int32),
                    "act_corr": match.pair_corr, "dec_cos": match.pair_cos, "score": match.pair_score, "assigned": match.pair_assigned,
                }
            ),
        )
        thr = cfg.thresholds.match
        summary["matching"] = {
            "mode": match.mode,
            "n_candidate_pairs": match.n_candidate_pairs,
            "n_rows": int(len(match.pair_a)),
            "n_assigned": int((match.assigned_b_for_a >= 0).sum()),
            "threshold": thr,
            "n_lost": int(np.sum(~(np.nan_to_num(match.best_score_a, nan=-np.inf) >= thr))),
            "n_born": int(np.sum(~(np.nan_to_num(match.best_score_b, nan=-np.inf) >= thr))),
            "act_corr_nan_pairs": int(np.isnan(match.pair_corr).sum()),
        }

    # features.parquet
    vocab = vocab_strings(prep.pair.base.tokenizer, prep.pair.base.cfg.d_vocab)
    flat_tokens = sample.tokens.reshape(-1)
    th = cfg.thresholds
    w_u = {"base": prep.pair.base.W_U, "finetuned": prep.pair.finetuned.W_U}
    feature_tables = []
    summary["status_counts"], summary["cross_class_counts"], summary["act_similarity_nan"], summary["logit_similarity_nan"] = {}, {}, {}, {}
    for s in state.sae_names:
        sae = saes[s]
        d = state.d_sae[s]
        cols: dict[str, Any] = {"sae": [s] * d, "feature_id": np.arange(d, dtype=np.int32)}
        alive = {}
        summary["status_counts"][s] = {}
        for m in MODELS:
            fs = state.features[(s, m)]
            fin = fs.finalize()
            cols[f"density_{m}"] = fin["density"]
            cols[f"mean_act_{m}"] = fin["mean_act"]
            cols[f"mean_active_act_{m}"] = fin["mean_active_act"]
            cols[f"max_act_{m}"] = state.topk[(s, m)].max()
            status = _status(fs.count, fin["density"], th.ultralow_density, th.dense_density)
            cols[f"status_{m}"] = status.astype(str)
            summary["status_counts"][s][m] = {k: int((status == k).sum()) for k in schema.STATUSES}
            alive[m] = fs.count > 0
        cc = _cross_class(alive["base"], alive["finetuned"])
        cols["cross_class"] = cc.astype(str)
        summary["cross_class_counts"][s] = {k: int((cc == k).sum()) for k in schema.CROSS_CLASSES}
        pair = state.pairs[s].finalize(state.features[(s, "base")], state.features[(s, "finetuned")])
        cols["act_similarity"], cols["act_error"] = pair["act_similarity"], pair["act_error"]
        summary["act_similarity_nan"][s] = int(np.isnan(pair["act_similarity"]).sum())
        d_model = int(prep.pair.base.cfg.d_model)
        if int(sae.cfg.d_in) == d_model and _hook_start_layer(cfg.hook, prep.pair.base.cfg.n_layers) is not None:
            ls = W.logit_stats(sae.W_dec, w_u)
            cols["logit_similarity"] = ls.similarity
            summary["logit_similarity_nan"][s] = int(np.isnan(ls.similarity).sum())
            for m in MODELS:
                cols[f"logit_pos_ids_{m}"] = _list_col(ls.pos_ids[m], pa.int32())
                cols[f"logit_pos_values_{m}"] = _list_col(ls.pos_values[m], pa.float32())
                cols[f"logit_neg_ids_{m}"] = _list_col(ls.neg_ids[m], pa.int32())
                cols[f"logit_neg_values_{m}"] = _list_col(ls.neg_values[m], pa.float32())
        else:  # the decoder does not write into the residual stream: no direct logits
            cols["logit_similarity"] = np.full(d, np.nan)
            for m in MODELS:
                for sign in ("pos", "neg"):
                    cols[f"logit_{sign}_ids_{m}"] = pa.nulls(d, pa.list_(pa.int32()))
                    cols[f"logit_{sign}_values_{m}"] = pa.nulls(d, pa.list_(pa.float32()))
        for m in MODELS:
            cols[f"act_hist_{m}"] = _list_col(state.features[(s, m)].hist, pa.int64())
        nn_ids, nn_cos = W.nearest_neighbours(units[s])
        cols["nn_feature_ids"], cols["nn_cosines"] = _list_col(nn_ids, pa.int32()), _list_col(nn_cos, pa.float32())
        if match is not None:
            if s == "base_sae":
                best, bs_, bc, bcos, asg, asc = (match.best_b_for_a, match.best_score_a, match.best_corr_a, match.best_cos_a, match.assigned_b_for_a, match.assigned_score_a)
            else:
                best, bs_, bc, bcos, asg, asc = (match.best_a_for_b, match.best_score_b, match.best_corr_b, match.best_cos_b, match.assigned_a_for_b, match.assigned_score_b)
            cols["match_feature_id"] = _nullable(best, best >= 0, pa.int32())
            cols["match_score"], cols["match_act_corr"], cols["match_dec_cos"] = bs_, bc, bcos
            cols["assigned_feature_id"] = _nullable(asg, asg >= 0, pa.int32())
            cols["assigned_score"] = asc
        else:
            for c, typ in (("match_feature_id", pa.int32()), ("match_score", pa.float64()), ("match_act_corr", pa.float64()),
                           ("match_dec_cos", pa.float64()), ("assigned_feature_id", pa.int32()), ("assigned_score", pa.float64())):
                cols[c] = pa.nulls(d, typ)
        top_tok = []
        tk = {m: state.topk[(s, m)].token for m in MODELS}
        for i in range(d):
            seen: dict[str, None] = {}
            for m in MODELS:
                for g in tk[m][i]:
                    if g >= 0:
                        seen.setdefault(_search_form(vocab[int(flat_tokens[g])]), None)
            top_tok.append(" ".join(seen))
        cols["top_tokens"] = top_tok
        feature_tables.append(pa.table(cols))
    features = pa.concat_tables([t.select(schema.FEATURES.names).cast(schema.FEATURES) for t in feature_tables])
    files["features.parquet"] = rundir.write_table(run_dir, "features.parquet", features, row_group_size=schema.FEATURES_ROW_GROUP_SIZE)

    # examples.parquet
    ex = ex_mod.collect(state, cfg.examples.n_quantile_bins, cfg.examples.n_per_quantile_bin)

    codecs = prep.codecs

    hook_stats = {"cached": 0, "recomputed": 0}

    def resid_batch(b: int):  # both models at the hook on stream batch b: kept by the stream, or run again
        tok_np = sample.tokens[prep.batch_seq_ids(b)]
        kept = hook_cache.get(b, tok_np) if hook_cache is not None else None
        if kept is not None:
            hook_stats["cached"] += 1
            return {m: torch.from_numpy(kept[m]).to(prep.device) for m in MODELS}
        hook_stats["recomputed"] += 1
        tokens = torch.from_numpy(tok_np.astype(np.int64)).to(prep.device)
        with torch.inference_mode():
            return {m: runners[m].acts(tokens) for m in MODELS}

    def encode_at(sae_name: str, x, rows: np.ndarray, features: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return codecs[sae_name].encode_at(x.reshape(-1, x.shape[-1]), rows, features)

    win = ex_mod.fill_windows(
        ex, sample.tokens, cfg.sample.batch_size, cfg.examples.window_before, cfg.examples.window_after, resid_batch, encode_at, prep.special_ids
    )
    files["examples.parquet"] = rundir.write_table(
        run_dir, "examples.parquet", ex_mod.table(ex, win, ctx), row_group_size=schema.EXAMPLES_ROW_GROUP_SIZE
    )

    # tokens.parquet, vocab.parquet
    files["tokens.parquet"] = rundir.write_table(
        run_dir, "tokens.parquet",
        pa.table({"seq_id": np.arange(sample.n_sequences, dtype=np.int32), "source": pa.array(sample.sources, pa.string()), "token_ids": _list_col(sample.tokens.astype(np.int32), pa.int32())}),
    )
    files["vocab.parquet"] = rundir.write_table(
        run_dir, "vocab.parquet", pa.table({"token_id": np.arange(len(vocab), dtype=np.int32), "token_str": vocab})
    )

    timing = {**timing, "finalize_seconds": time.time() - t0, "window_batches_from_stream": hook_stats["cached"], "window_batches_recomputed": hook_stats["recomputed"]}
    manifest = {
        "run_id": cfg.run_id,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "complete": True,
        "config": cfg.to_dict(),
        "packages": package_versions(),
        "tokenizer_check": prep.pair.tokenizer_comparison.to_dict(),
        "inputs": prep.inputs,
        "n_tokens": sample.n_tokens,
        "n_sequences": sample.n_sequences,
        "n_counted_tokens": int(state.features[(state.sae_names[0], "base")].n_tokens),
        "special_token_ids": prep.special_ids.tolist(),
        "saes": list(state.sae_names),
        "d_sae": dict(state.d_sae),
        "act_hist_edges": schema.ACT_HIST_EDGES.tolist(),
        "calibration": calib.to_dict(),
        "resid_l2_range": [0.0, calib.l2_max],
        "resid_clipped": {m: int(c) for m, c in zip(RESID_METRIC_ORDER, res.clipped)},
        "summary": summary,
        "timing": timing,
        "files": files,
    }
    manifest = _jsonable(manifest)
    rundir.write_manifest(run_dir, manifest)
    log(
        f"wrote {run_dir}: {sample.n_tokens:,} tokens, {len(ex):,} examples"
        + (f", stream {timing['tokens_per_second']:,.0f} tok/s" if timing.get("tokens_per_second") else "")
        + f", finalize {timing['finalize_seconds']:.0f} s"
    )
    return manifest
