"""Stage 4, the pass over the token stream: each batch through both models and every SAE into the
accumulators of the pass state (`process_batch`), checkpointed every N batches (`stream`).

Which tokens count. Special tokens of either tokenizer (BOS, EOS, PAD, as SAELens's
`get_special_token_ids` lists them) are excluded from every SAE and feature statistic, as SAELens's
`run_evals(exclude_special_tokens=True)` does: L0, MSE, explained variance, densities,
activation similarity and examples cover the other ("counted") tokens; a CE loss at position p
counts when the token at p counts; the spliced pass replaces the activation only at counted
tokens (the special tokens keep theirs), and the zero-ablated pass zeros every position (both
SAELens's conventions). Residual-stream similarity covers every token, BOS included, so that its
by-position curve starts at position 0.

Outliers (precompute/calibration.py): the "excluded" rows of metrics.parquet leave outlier tokens
out of every mean and do not splice the SAE in at them (a second spliced pass, run only for
batches that contain an outlier).

Per-token explained variance uses the mean of the batch (SAELens's convention), so it depends on
the batch size; shards are cut at batch boundaries, so it does not depend on sharding.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from explorer import schema
from precompute.accumulators import SparseActs
from precompute.calibration import Calibration
from precompute.forward import ModelRunner
from precompute.hook_cache import HOOK_ACTS_DIR, HookActsCache
from precompute.pass_state import PassState, save_state, state_meta
from precompute.prepare import Prepared

MODELS = schema.MODELS



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
    model_losses, outliers = {}, {}  # for the crosscoder (issue 16)
    sparse: dict[str, dict[str, SparseActs]] = {s: {} for s in state.sae_names}
    with torch.inference_mode():
        for m in MODELS:
            r = runners[m]
            clean_loss, x = r.clean(tokens)
            zero_loss = r.zero_loss(tokens, x)
            xs[m] = x
            outlier = (x.float().norm(dim=-1) > calib.outlier_threshold[m]).cpu().numpy()
            any_outlier = bool((counted & outlier).any())
            clean_np, zero_np = clean_loss.float().cpu().numpy(), zero_loss.float().cpu().numpy()  # .float(): half-precision models
            model_losses[m], outliers[m] = (clean_np, zero_np), outlier
            x_flat = x.reshape(n_b * ctx, -1)
            for s in state.sae_names:
                t, f, vals, x_hat_flat = codecs[s].encode_decode(x_flat)
                x_hat = x_hat_flat.reshape(x.shape)
                spliced = r.loss_with(tokens, torch.where(counted_t[..., None], x_hat, x)).float().cpu().numpy()
                if any_outlier:
                    keep = torch.from_numpy(counted & ~outlier).to(prep.device)[..., None]
                    spliced_ex = r.loss_with(tokens, torch.where(keep, x_hat, x)).float().cpu().numpy()
                else:
                    spliced_ex = spliced
                vals = vals.float().cpu().numpy()
                t, f = t.cpu().numpy(), f.cpu().numpy().astype(np.int64)
                l0 = np.bincount(t, minlength=n_b * ctx)  # active features per token
                keep = counted_flat[t]  # special tokens do not count
                t, f, vals = t[keep], f[keep], vals[keep]
                state.quality[(s, m)].update(
                    x_flat.float().cpu().numpy(), x_hat_flat.float().cpu().numpy(), l0, counted, outlier,
                    {"clean": (clean_np, clean_np), "spliced": (spliced, spliced_ex), "zero_ablated": (zero_np, zero_np)},
                )
                sa = SparseActs(gidx[t], f, vals, n_counted)
                state.features[(s, m)].update(sa)
                state.topk[(s, m)].update(sa)
                state.quantile[(s, m)].update(sa)
                sparse[s][m] = sa
        xb, xf = xs["base"].float(), xs["finetuned"].float()
        cos = torch.nn.functional.cosine_similarity(xb, xf, dim=-1).cpu().numpy()
        l2 = (xb - xf).norm(dim=-1).cpu().numpy()
    state.resid.update(cos, l2)
    for s in state.sae_names:
        state.pairs[s].update(sparse[s]["base"], sparse[s]["finetuned"])
    if state.cross is not None:
        state.cross.update(sparse["base_sae"]["base"], sparse["finetuned_sae"]["finetuned"])
    if state.crosscoder is not None:  # issue 16: the crosscoder on both models' activations
        state.crosscoder.update_batch(prep.crosscoder_codec, runners, tokens, xs, counted, outliers, model_losses, gidx)
    return xs



def stream(prep, runners, state: PassState, calib, ckpt: Path, shard, checkpoint_every: int, progress: bool, batch_delay: float) -> int:
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
            save_state(ckpt, state, state_meta(prep, calib, state, shard, False))
            since = 0
    bar.close()
    return processed
