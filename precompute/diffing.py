"""Stage 5b, where the two models differ (METHODS.md section 11), at finalize: the per-token KL and
loss difference into tokens.parquet, and the highest-KL contexts with the base-SAE features whose
activation changes most there (kl_contexts.parquet).

A position p counts when its token counts (the CE convention): p predicts token p + 1, so the
last position has no KL. The contexts are the `[diffing] n_top_kl_contexts` counted positions
with the largest KL (ties: the earlier token). At each, the base SAE encodes both models'
activations at p (from the stream's kept hook activations, or the models run again up to the
hook), and the `n_features_per_context` features with the largest |f_i(x_finetuned) -
f_i(x_base)| are listed, largest first (ties: the smaller feature id).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import pyarrow as pa

from explorer import schema
from precompute.columns import list_col
from precompute.pass_state import PassState
from precompute.prepare import Prepared


def source_labels(prep: Prepared) -> list[str]:
    return [prep.source_names[c] for c in prep.seq_source]


def tokens_table(prep: Prepared, state: PassState) -> pa.Table:
    """tokens.parquet: the sample's sequences with their source labels, per-token KL and loss difference."""
    sample = prep.sample
    return pa.table(
        {
            "seq_id": np.arange(sample.n_sequences, dtype=np.int32),
            "source": pa.array(source_labels(prep), pa.string()),
            "token_ids": list_col(sample.tokens.astype(np.int32), pa.int32()),
            "kl": list_col(state.tokens.kl, pa.float32()),
            "loss_diff": list_col(state.tokens.loss_diff, pa.float32()),
        }
    )


def counted_kl(prep: Prepared, state: PassState) -> np.ndarray:
    """[n_sequences, context_size] float64 KL where the position counts, NaN elsewhere."""
    kl = state.tokens.kl.astype(np.float64)
    counted = ~np.isin(prep.sample.tokens, prep.special_ids)
    return np.where(counted, kl, np.nan)


def kl_summary(prep: Prepared, state: PassState) -> dict:
    """Mean KL and loss difference over the counted positions, pooled and per source (the manifest)."""
    kl = counted_kl(prep, state)
    diff = np.where(np.isfinite(kl), state.tokens.loss_diff.astype(np.float64), np.nan)
    out = {}
    for name, rows in [("all", slice(None))] + [(n, prep.seq_source == i) for i, n in enumerate(prep.source_names)]:
        k, d = kl[rows], diff[rows]
        ok = np.isfinite(k)
        out[name] = {"n": int(ok.sum()), "mean_kl": float(k[ok].mean()) if ok.any() else None, "mean_loss_diff": float(d[ok].mean()) if ok.any() else None}
    return out


def kl_contexts_table(prep: Prepared, state: PassState, resid_batch: Callable[[int], dict]) -> pa.Table:
    """kl_contexts.parquet (module docstring). `resid_batch(b)` gives both models' hook activations on stream batch b."""
    import torch

    cfg = prep.cfg
    n_top, n_feat = cfg.diffing.n_top_kl_contexts, cfg.diffing.n_features_per_context
    kl = counted_kl(prep, state)
    n_seq, ctx = kl.shape
    flat = np.nan_to_num(kl.reshape(-1), nan=-np.inf)
    n_ok = int(np.isfinite(kl).sum())
    order = np.lexsort((np.arange(flat.size), -flat))[: min(n_top, n_ok)]
    seq, pos = order // ctx, order % ctx
    sae = prep.pair.saes["base_sae"]
    d_sae = int(sae.cfg.d_sae)
    k = min(n_feat, d_sae)
    feats = np.zeros((len(order), k), np.int32)
    deltas = np.zeros((len(order), k), np.float32)
    acts = {m: np.zeros((len(order), k), np.float32) for m in schema.MODELS}
    bs = cfg.sample.batch_size
    for b in np.unique(seq // bs):
        idx = np.flatnonzero(seq // bs == b)
        xs = resid_batch(int(b))
        rows = torch.from_numpy((seq[idx] - b * bs) * ctx + pos[idx])
        with torch.inference_mode():
            f = {m: sae.encode(x.reshape(-1, x.shape[-1]).index_select(0, rows.to(x.device))).float().cpu().numpy().astype(np.float64) for m, x in xs.items()}
        delta = f["finetuned"] - f["base"]
        top = np.lexsort((np.broadcast_to(np.arange(d_sae), delta.shape), -np.abs(delta)), axis=1)[:, :k]
        feats[idx] = top
        deltas[idx] = np.take_along_axis(delta, top, axis=1)
        for m in schema.MODELS:
            acts[m][idx] = np.take_along_axis(f[m], top, axis=1)
    before = cfg.examples.window_before
    start = np.maximum(pos - before, 0)
    end = np.minimum(pos + 2, ctx)  # through the predicted token p + 1
    tok_rows, kl_rows = [], []
    for i in range(len(order)):
        tok_rows.append(prep.sample.tokens[seq[i], start[i] : end[i]].astype(np.int32))
        kl_rows.append(state.tokens.kl[seq[i], start[i] : end[i]].astype(np.float32))
    labels = source_labels(prep)
    return pa.table(
        {
            "rank": np.arange(len(order), dtype=np.int32),
            "seq_id": seq.astype(np.int32),
            "position": pos.astype(np.int16),
            "source": pa.array([labels[s] for s in seq], pa.string()),
            "kl": kl.reshape(-1)[order].astype(np.float32),
            "loss_diff": state.tokens.loss_diff.reshape(-1)[order].astype(np.float32),
            "window_start": start.astype(np.int16),
            "token_ids": pa.array(tok_rows, pa.list_(pa.int32())),
            "kl_window": pa.array(kl_rows, pa.list_(pa.float32())),
            "feature_ids": list_col(feats, pa.int32()),
            "act_deltas": list_col(deltas, pa.float32()),
            "acts_base": list_col(acts["base"], pa.float32()),
            "acts_finetuned": list_col(acts["finetuned"], pa.float32()),
        }
    )
