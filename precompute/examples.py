"""Top and quantile examples: which tokens (from the accumulators) and their windows (one short pass).

The stream keeps, per (sae, feature, model), only (activation, global token index) of the top-k
tokens and of the quantile sample. The windows (the tokens around each example and the feature's
activation on every window token, on BOTH models) are filled at finalize by one pass that runs
each model only up to the hook (`stop_at_layer`) on the stream batches that hold an example, and
encodes each window with its example's feature only (not the whole SAE). Storing windows in the stream instead would cost
(n_top + quantile_sample) x window x 3 values per feature and model in every checkpoint (about
200 MB for the demo's four (sae, model) pairs); this pass costs a fraction of one stream pass.
Batches are the stream's own batches, so the activations are the ones the stream saw.

Activations at special tokens (BOS/EOS/PAD) are reported as 0 in windows: special tokens are
excluded from every statistic of a run (see precompute/stream.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from explorer import schema


@dataclass
class ExampleSet:
    """The selected examples; sae / model / kind as small-int codes into schema.SAES, MODELS and
    EXAMPLE_KINDS (tens of millions of examples at 131k features: no object arrays)."""

    sae_code: np.ndarray  # int8
    feature: np.ndarray  # int64
    model_code: np.ndarray  # int8
    kind_code: np.ndarray  # int8
    bin: np.ndarray  # int64, -1 for top examples
    bin_low: np.ndarray  # float32 (NaN = null)
    bin_high: np.ndarray
    rank: np.ndarray  # int16
    token: np.ndarray  # int64 global token index
    value: np.ndarray  # float32

    def __len__(self) -> int:
        return len(self.feature)

    @property
    def sae(self) -> np.ndarray:
        return np.asarray(schema.SAES, dtype=object)[self.sae_code]

    @property
    def model(self) -> np.ndarray:
        return np.asarray(schema.MODELS, dtype=object)[self.model_code]

    @property
    def kind(self) -> np.ndarray:
        return np.asarray(schema.EXAMPLE_KINDS, dtype=object)[self.kind_code]


def collect(state, n_quantile_bins: int, n_per_bin: int) -> ExampleSet:
    """All selected examples of a finalized pass state, sorted by (sae, feature, model, kind, bin, rank)."""
    parts = []
    top_code, quantile_code = schema.EXAMPLE_KINDS.index("top"), schema.EXAMPLE_KINDS.index("quantile")
    code = lambda n, c: np.full(n, c, np.int8)  # noqa: E731
    for (sae, model), topk in state.topk.items():
        sc, mc = schema.SAES.index(sae), schema.MODELS.index(model)
        f, r = np.nonzero(topk.token >= 0)
        n = len(f)
        parts.append(
            dict(
                sae_code=code(n, sc), feature=f.astype(np.int64), model_code=code(n, mc), kind_code=code(n, top_code),
                bin=np.full(n, -1, np.int64), bin_low=np.full(n, np.nan, np.float32), bin_high=np.full(n, np.nan, np.float32),
                rank=r.astype(np.int16), token=topk.token[f, r], value=topk.value[f, r],
            )
        )
        q = state.quantile[(sae, model)].finalize(n_quantile_bins, n_per_bin)
        n = len(q.feature)
        parts.append(
            dict(
                sae_code=code(n, sc), feature=q.feature, model_code=code(n, mc), kind_code=code(n, quantile_code),
                bin=q.bin.astype(np.int64), bin_low=q.bin_low, bin_high=q.bin_high, rank=q.rank, token=q.token, value=q.value,
            )
        )
    cat = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    order = np.lexsort((cat["rank"], cat["bin"], cat["kind_code"], cat["model_code"], cat["feature"], cat["sae_code"]))
    cat = {k: v[order] for k, v in cat.items()}
    return ExampleSet(**cat)


@dataclass
class Windows:
    start: np.ndarray  # [n] int64 window_start
    length: np.ndarray  # [n] int64
    token_ids: np.ndarray  # [n, W] int32 (valid up to length)
    acts: dict[str, np.ndarray]  # model -> [n, W] float32


def fill_windows(ex: ExampleSet, sample_tokens: np.ndarray, batch_size: int, before: int, after: int, resid_batch, encode_at,
                 special_ids: np.ndarray | None = None) -> Windows:
    """Windows of every example, on both models.

    `resid_batch(batch_index) -> {model: x [B, C, d_in] tensor}` gives both models' activations
    at the hook on one stream batch; `encode_at(sae, x, rows [n, W], features [n]) -> numpy
    [n, W]` gives example i's feature at the batch's flattened positions rows[i] (B x C rows),
    encoding only the features the batch's examples need.
    Activations at special tokens are 0. The example's own value is the stream's (`ex.value`),
    so a window's centre equals the example's activation bitwise on the example's model."""
    n_seq, ctx = sample_tokens.shape
    width = before + 1 + after
    seq = ex.token // ctx
    pos = ex.token % ctx
    start = np.maximum(pos - before, 0)
    length = np.minimum(pos + after + 1, ctx) - start
    token_ids = np.zeros((len(ex), width), np.int32)
    acts = {m: np.zeros((len(ex), width), np.float32) for m in schema.MODELS}
    if len(ex) == 0:
        return Windows(start=start, length=length, token_ids=token_ids, acts=acts)
    special = np.asarray([] if special_ids is None else special_ids, dtype=np.int64)
    batch_of = seq // batch_size
    order = np.argsort(batch_of, kind="stable")
    bounds = np.searchsorted(batch_of[order], np.arange(batch_of.max() + 2))
    offsets = np.arange(width)[None, :]
    for b in np.unique(batch_of):
        idx = order[bounds[b] : bounds[b + 1]]
        cols = np.minimum(start[idx, None] + offsets, ctx - 1)  # [n, W] positions in the sequence
        valid = offsets < length[idx, None]
        toks = sample_tokens[seq[idx, None], cols]
        token_ids[idx] = np.where(valid, toks, 0)
        keep = valid & ~np.isin(toks, special)
        xs = resid_batch(int(b))
        flat = (seq[idx] - b * batch_size)[:, None] * ctx + cols  # [n, W] rows of the batch's flattened positions
        for sc, sae in enumerate(schema.SAES):
            part = np.flatnonzero(ex.sae_code[idx] == sc)
            if len(part) == 0:
                continue
            sel = idx[part]
            for m, x in xs.items():
                acts[m][sel] = np.where(keep[part], encode_at(sae, x, flat[part], ex.feature[sel]), 0)
    on_model = {m: ex.model_code == mc for mc, m in enumerate(schema.MODELS)}
    centre = pos - start
    for m in schema.MODELS:
        i = np.flatnonzero(on_model[m])
        acts[m][i, centre[i]] = ex.value[i]
    return Windows(start=start, length=length, token_ids=token_ids, acts=acts)


def _ragged(values: np.ndarray, valid: np.ndarray, typ: pa.DataType) -> pa.Array:
    lengths = valid.sum(axis=1)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values[valid], typ))


def table(ex: ExampleSet, win: Windows, context_size: int) -> pa.Table:
    import pyarrow.compute as pc

    width = win.token_ids.shape[1] if len(ex) else 0
    valid = np.arange(width)[None, :] < win.length[:, None]
    top = ex.kind_code == schema.EXAMPLE_KINDS.index("top")
    names = lambda values, codes: pc.take(pa.array(list(values), pa.string()), pa.array(codes))  # noqa: E731
    return pa.table(
        {
            "sae": names(schema.SAES, ex.sae_code),
            "feature_id": pa.array(ex.feature.astype(np.int32)),
            "model": names(schema.MODELS, ex.model_code),
            "kind": names(schema.EXAMPLE_KINDS, ex.kind_code),
            "bin": pa.array(ex.bin.astype(np.int16), mask=top),
            "bin_low": pa.array(ex.bin_low.astype(np.float32), mask=top),
            "bin_high": pa.array(ex.bin_high.astype(np.float32), mask=top),
            "rank": pa.array(ex.rank.astype(np.int16)),
            "seq_id": pa.array((ex.token // context_size).astype(np.int32)),
            "position": pa.array((ex.token % context_size).astype(np.int16)),
            "activation": pa.array(ex.value.astype(np.float32)),
            "window_start": pa.array(win.start.astype(np.int16)),
            "token_ids": _ragged(win.token_ids, valid, pa.int32()),
            "acts_base": _ragged(win.acts["base"], valid, pa.float32()),
            "acts_finetuned": _ragged(win.acts["finetuned"], valid, pa.float32()),
        }
    )
