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

CE losses ([evals] ce_every = N): the zero-ablated and spliced passes, and every CE sum, only on
batches whose global index is a multiple of N; all else on every batch.

Outliers (precompute/calibration.py): the "excluded" rows of metrics.parquet leave outlier tokens
out of every mean and do not splice the SAE in at them (a second spliced pass, run only for
batches that contain an outlier).

`explained_variance_legacy` uses the mean of the batch (sae_lens's old formula), so it depends on
the batch size; shards are cut at batch boundaries, so it does not depend on sharding.
`explained_variance` (sae_lens's current definition) is pooled over all tokens.

Where the models differ (METHODS.md section 11): the clean pass of both models runs first; their
next-token log-probabilities are then computed together in chunks of positions (never [B, C,
d_vocab] for both models at once), giving both clean losses and KL(p_base || p_finetuned) per
position (`forward.clean_losses_and_kl`); the per-token KL and loss difference go into
`TokenStats`, and per feature the sums for the correlation of |delta f| with KL into `KLCorrStats`.

Per source (section 9): every entry carries its sequence's source code, and the per-feature and
per-(SAE, model) accumulators keep their sums per source (`FeatureStats`, `PairStats`,
`QualityStats`); the pooled numbers are the sums over sources.

The seed twin (`[saes.base_sae_twin]`) is encoded on the base model only, into its own
`FeatureStats` and the cross products with the base SAE (the null baseline of born/lost).

Threads (`BatchUpdates`, `--update-threads`): the models, the SAEs, QualityStats and the CE passes
run in the calling thread; the sparse accumulators' updates of batch b (`sparse_update_tasks`) run
on a pool while batch b+1 goes through the models, and batch b+1's wait for them. Each
accumulator sees the batches in order, so a run is bitwise the same for any number of threads.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from explorer import schema
from precompute.accumulators import SparseActs, cofire_hits
from precompute.calibration import Calibration
from precompute.forward import ModelRunner, clean_losses_and_kl
from precompute.hook_cache import HOOK_ACTS_DIR, HookActsCache
from precompute.hook_moments import HookMoments
from precompute.pass_state import PassState, save_state, state_meta
from precompute.prepare import Prepared

MODELS = schema.MODELS


def process_batch(prep: Prepared, runners: dict[str, ModelRunner], state: PassState, calib: Calibration, b: int, updates: "BatchUpdates | None" = None) -> dict:
    """Run batch `b` through both models and SAEs into the accumulators; returns both models'
    activations at the hook ({model: [B, C, d] tensor}) for the hook-activation cache.

    The sparse accumulators' updates go to `updates` (BatchUpdates: on its threads, while the next
    batch runs through the models; None: here, before returning)."""
    import torch

    codecs = prep.codecs
    seq_ids = prep.batch_seq_ids(b)
    tok_np = prep.sample.tokens[seq_ids]
    n_b, ctx = tok_np.shape
    tokens = torch.from_numpy(tok_np.astype(np.int64)).to(prep.device)
    counted = ~np.isin(tok_np, prep.special_ids)  # [B, C]
    counted_flat = counted.reshape(-1)
    counted_t = torch.from_numpy(counted).to(prep.device)
    token0 = int(seq_ids[0]) * ctx  # global index of the batch's first token
    gidx = token0 + np.arange(n_b * ctx, dtype=np.int64)  # the batch's sequences are consecutive
    src2d = np.broadcast_to(prep.seq_source[seq_ids][:, None], (n_b, ctx))  # [B, C] source codes
    src_flat = src2d.reshape(-1)
    n_counted = int(counted.sum())
    n_by_source = np.bincount(src_flat[counted_flat], minlength=state.n_sources).astype(np.int64)
    zero_counted = prep.cfg.evals.zero_ablation == "counted"
    ce_batch = b % prep.cfg.evals.ce_every == 0  # CE losses on this batch ([evals] ce_every)
    xs, finals, clean = {}, {}, {}
    model_losses, outliers = {}, {}  # for the crosscoder (issue 16)
    sparse: dict[str, dict[str, SparseActs]] = {s: {} for s in state.sae_names}
    sparse_twin = None

    def sparse_acts(codec, x_flat):
        t, f, vals, x_hat_flat = codec.encode_decode(x_flat)
        vals = vals.float().cpu().numpy()  # .float(): half-precision models (numpy has no bfloat16)
        t, f = t.cpu().numpy(), f.cpu().numpy().astype(np.int64)
        l0 = np.bincount(t, minlength=n_b * ctx)  # active features per token
        keep = counted_flat[t]  # special tokens do not count
        t, f, vals = t[keep], f[keep], vals[keep]
        return SparseActs(gidx[t], f, vals, n_counted, src_flat[t], n_by_source), l0, x_hat_flat

    with torch.inference_mode():
        for m in MODELS:  # clean forwards first: the KL needs both models' final residuals
            clean[m], xs[m], finals[m] = runners[m].clean_final(tokens)
        clean, kl = clean_losses_and_kl(runners, finals, clean, tokens)
        del finals
        for m in MODELS:
            r, x = runners[m], xs[m]
            outlier = (x.float().norm(dim=-1) > calib.outlier_threshold[m]).cpu().numpy()
            any_outlier = bool((counted & outlier).any())
            if ce_batch:
                zero_loss = r.zero_loss_counted(tokens, x, counted_t) if zero_counted else r.zero_loss(tokens, x)
                clean_np, zero_np = clean[m].float().cpu().numpy(), zero_loss.float().cpu().numpy()  # .float(): half-precision models
                model_losses[m] = (clean_np, zero_np)
            else:
                model_losses[m] = None
            outliers[m] = outlier
            x_flat = x.reshape(n_b * ctx, -1)
            moments = HookMoments(x_flat, counted, outlier, src2d, state.n_sources)  # on x's device, once for every SAE
            for s in state.sae_names:
                sa, l0, x_hat_flat = sparse_acts(codecs[s], x_flat)
                x_hat = x_hat_flat.reshape(x.shape)
                losses = None  # no CE on this batch ([evals] ce_every)
                if ce_batch:
                    spliced = r.loss_with(tokens, torch.where(counted_t[..., None], x_hat, x)).float().cpu().numpy()
                    if any_outlier:
                        keep = torch.from_numpy(counted & ~outlier).to(prep.device)[..., None]
                        spliced_ex = r.loss_with(tokens, torch.where(keep, x_hat, x)).float().cpu().numpy()
                    else:
                        spliced_ex = spliced
                    losses = {"clean": (clean_np, clean_np), "spliced": (spliced, spliced_ex), "zero_ablated": (zero_np, zero_np)}
                state.quality[(s, m)].update(None, x_hat_flat, l0, counted, outlier, losses, src2d, moments=moments)
                sparse[s][m] = sa
            if m == "base" and prep.twin is not None:  # the seed twin: encoded on the base model only
                sparse_twin, _, _ = sparse_acts(codecs[prep.cfg.twin], x_flat)
        xb, xf = xs["base"].float(), xs["finetuned"].float()
        cos = torch.nn.functional.cosine_similarity(xb, xf, dim=-1).cpu().numpy()
        l2 = (xb - xf).norm(dim=-1).cpu().numpy()
        kl_np = kl.float().cpu().numpy()
        loss_diff = (clean["finetuned"] - clean["base"]).float().cpu().numpy()
    state.resid.update(cos, l2)
    state.tokens.update(seq_ids, kl_np, loss_diff)
    # KL per token where it counts (a next token exists and the token counts), for |delta f| vs KL
    kl_tok = np.full((n_b, ctx), np.nan)
    kl_tok[:, :-1] = np.where(counted[:, :-1], kl_np, np.nan)
    kl_tok = kl_tok.reshape(-1)
    (updates or BatchUpdates(0)).submit(sparse_update_tasks(state, sparse, kl_tok, token0, sparse_twin))
    if state.crosscoder is not None:  # issue 16: the crosscoder on both models' activations
        state.crosscoder.update_batch(prep.crosscoder_codec, runners, tokens, xs, counted, outliers, model_losses, gidx)
    return xs



def sparse_update_tasks(state, sparse: dict, kl_tok: np.ndarray, token0: int, sparse_twin: SparseActs | None = None) -> list:
    """One batch's updates of the sparse accumulators, as independent tasks (each touches its own
    accumulators and only reads the batch's SparseActs): per (SAE, model) FeatureStats, TopK and
    QuantileSample; per SAE PairStats and KLCorrStats; each CrossProducts; the twin's FeatureStats.
    Costliest first. `state` is a PassState (or anything with its attributes)."""

    def per_model(s, m):
        def task():
            sa = sparse[s][m]
            state.features[(s, m)].update(sa)
            state.topk[(s, m)].update(sa)
            state.quantile[(s, m)].update(sa)

        return task

    def per_sae(s):
        def task():
            base, fin = sparse[s]["base"], sparse[s]["finetuned"]
            hits = cofire_hits(base, fin, state.d_sae[s])
            state.pairs[s].update(base, fin, hits)
            state.kl_corr[s].update(base, fin, kl_tok, token0, hits)

        return task

    tasks = []
    if "finetuned_sae" in state.cross:
        tasks.append(lambda: state.cross["finetuned_sae"].update(sparse["base_sae"]["base"], sparse["finetuned_sae"]["finetuned"]))
    if sparse_twin is not None:
        tasks.append(lambda: state.cross[state.twin].update(sparse["base_sae"]["base"], sparse_twin))
    tasks += [per_model(s, m) for s in state.sae_names for m in MODELS]
    tasks += [per_sae(s) for s in state.sae_names]
    if sparse_twin is not None:
        tasks.append(lambda: state.twin_features.update(sparse_twin))
    return tasks


class BatchUpdates:
    """The sparse accumulators' updates of a batch on a pool of `threads` threads, while the
    calling thread runs the next batch through the models and SAEs (on a GPU, its kernels; on the
    CPU, torch's own threads).

    Each accumulator gets the batches in order, one at a time: `submit` first waits for the
    previous batch's tasks, and within a batch every task has its own accumulators. So the state
    is bitwise the serial run's for any number of threads (tests/test_precompute.py). `wait()`
    before reading or saving the state; a task's exception is raised there. threads=0: every task
    runs in the calling thread, at submit."""

    def __init__(self, threads: int):
        from concurrent.futures import ThreadPoolExecutor

        self.threads = max(0, int(threads))
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="precompute-updates") if self.threads else None
        self._pending: list = []

    def submit(self, tasks: list) -> None:
        self.wait()
        if self._pool is None:
            for task in tasks:
                task()
        else:
            self._pending = [self._pool.submit(task) for task in tasks]

    def wait(self) -> None:
        pending, self._pending = self._pending, []
        errors = [f.exception() for f in pending]  # every task finishes before the state is read
        for e in errors:
            if e is not None:
                raise e

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)

    def __enter__(self) -> "BatchUpdates":
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
        else:  # already failing: finish the running tasks, keep the first error
            self._pending, pending = [], self._pending
            for f in pending:
                f.exception()
            if self._pool is not None:
                self._pool.shutdown(wait=True)


def default_update_threads(device: str, torch_threads: int) -> int:
    """Threads for the sparse accumulators when the command line does not say: on a GPU, the
    cores (up to 8) less the one driving the GPU; on the CPU, the cores torch's threads leave idle
    (at least 1: the updates then overlap the next batch's forwards)."""
    import os

    cores = os.cpu_count() or 1
    if str(device).startswith("cuda"):
        return max(1, min(8, cores - 1))
    return max(1, cores - torch_threads)


def stream(prep, runners, state: PassState, calib, ckpt: Path, shard, checkpoint_every: int, progress: bool, batch_delay: float, update_threads: int = 0) -> int:
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
    with BatchUpdates(update_threads) as updates:
        for b in range(state.next_batch, state.batch_end):
            xs = process_batch(prep, runners, state, calib, b, updates)
            hook_cache.put(b, prep.sample.tokens[prep.batch_seq_ids(b)], xs)
            n = len(prep.batch_seq_ids(b)) * ctx
            processed += n
            since += 1
            if batch_delay:
                time.sleep(batch_delay)
            state.next_batch = b + 1
            if since >= checkpoint_every or state.next_batch == state.batch_end:
                updates.wait()  # the checkpoint holds whole batches only
                save_state(ckpt, state, state_meta(prep, calib, state, shard, False))
                since = 0
            bar.update(n)
    bar.close()
    return processed
