"""Weights-only statistics, computed at finalize: logits, decoder neighbours, two-SAE matching.

Nothing here sees an activation except through the accumulators it is handed. Every
d_sae x (d_sae or d_vocab) product is computed in row chunks, so no dense d_sae x d_sae (or
d_sae x d_vocab) matrix is ever held, except the d_a x d_b score matrix of all-pairs matching,
which is used only up to `[matching] max_all_pairs_d_sae` (4096 by default: 128 MiB in float64).

Logits (METHODS.md section 4): W_dec[i] @ W_U(model), each model's own unembedding, as Study T
computes them (the direct path, no final LayerNorm). Logit similarity is the Pearson correlation
of the two over the vocabulary.

Matching (section 5): A on x_base against A' on x_finetuned.
  * all-pairs mode (max(d_a, d_b) <= max_all_pairs_d_sae): activation correlation and decoder cosine
    for every pair; score = 0.5 * corr (NaN -> 0) + 0.5 * dec_cos; best match per feature in both
    directions; one-to-one assignment by scipy.optimize.linear_sum_assignment (maximize).
  * candidate mode (larger dictionaries): the candidate pairs are each feature's n_candidates
    nearest decoder directions in the other SAE (both directions, union); activation correlation
    is accumulated for those pairs only; best match among a feature's candidates; the one-to-one
    assignment is a min-weight full bipartite matching (scipy.sparse.csgraph) on the candidate
    graph, where every base feature also has a private "unassigned" option scored -2 (below any
    real pair), so a matching always exists and a real pair is always preferred.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

N_LOGITS = 10
N_NEIGHBOURS = 10
CHUNK = 1024


def unit_rows(w: torch.Tensor) -> torch.Tensor:
    """Decoder rows scaled to unit norm, float32 on the CPU (the matching's float64 steps run there)."""
    w = w.detach().to("cpu", torch.float32)
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)


class _RunningTopK:
    """Per row, the k largest values seen so far over column blocks, with their column ids."""

    def __init__(self, n: int, k: int, device):
        self.val = torch.full((n, k), -torch.inf, device=device)
        self.idx = torch.full((n, k), -1, dtype=torch.int64, device=device)
        self.k = k

    def add(self, rows: slice, sims: torch.Tensor, col0: int) -> None:
        k = min(self.k, sims.shape[1])
        v, i = sims.topk(k, dim=1)
        v = torch.cat([self.val[rows], v], dim=1)
        i = torch.cat([self.idx[rows], i + col0], dim=1)
        top_v, pos = v.topk(self.k, dim=1)
        self.val[rows], self.idx[rows] = top_v, i.gather(1, pos)


def _block_topk(wa: torch.Tensor, wb: torch.Tensor | None, k_a: int, k_b: int, chunk: int) -> tuple[_RunningTopK, _RunningTopK | None]:
    """Top-k decoder cosines from ONE pass over the blocks of wa @ wb.T: each block gives its
    rows' candidates (top k_a of wa's rows) and its columns' (top k_b of wb's rows), so the
    product is computed once, not once per direction. wb None: wa against itself, upper-triangle
    blocks only (the matrix is symmetric), its diagonal excluded (no feature is its own
    neighbour)."""
    same = wb is None
    wb = wa if same else wb
    top_a = _RunningTopK(wa.shape[0], k_a, wa.device)
    top_b = top_a if same else _RunningTopK(wb.shape[0], k_b, wa.device)
    for i0 in range(0, wa.shape[0], chunk):
        rows = slice(i0, min(i0 + chunk, wa.shape[0]))
        for j0 in range(i0 if same else 0, wb.shape[0], chunk):
            cols = slice(j0, min(j0 + chunk, wb.shape[0]))
            sims = wa[rows] @ wb[cols].T
            if same and j0 == i0:
                sims.fill_diagonal_(-torch.inf)
            if k_a:
                top_a.add(rows, sims, j0)
            if k_b and not (same and j0 == i0):
                top_b.add(cols, sims.T.contiguous(), i0)
    return top_a, (None if same else top_b)


def nearest_neighbours(w_unit: torch.Tensor, k: int = N_NEIGHBOURS, chunk: int = CHUNK, device: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k other features by decoder cosine within one SAE: ids [d, k'] int32, cosines [d, k'] float32.

    One pass over the upper-triangle blocks of W W^T (half the products of a row-by-row pass),
    on `device`; cosines equal the row-by-row products to float32 rounding."""
    d = w_unit.shape[0]
    k = min(k, d - 1)
    if k <= 0:
        return np.zeros((d, 0), np.int32), np.zeros((d, 0), np.float32)
    w = w_unit.to(device or w_unit.device)
    top, _ = _block_topk(w, None, k, k, chunk)
    return top.idx.cpu().numpy().astype(np.int32), top.val.cpu().numpy().astype(np.float32)


def cross_topk(wa_unit: torch.Tensor, wb_unit: torch.Tensor, k: int, chunk: int = CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """For each row of A, the k rows of B with the largest decoder cosine: ids [d_a, k], cosines."""
    k = min(k, wb_unit.shape[0])
    top, _ = _block_topk(wa_unit, wb_unit, k, 0, chunk)
    return top.idx.cpu().numpy(), top.val.cpu().numpy()


def candidate_pair_keys(wa_unit: torch.Tensor, wb_unit: torch.Tensor, k: int, device: str | None = None, chunk: int = CHUNK) -> np.ndarray:
    """Sorted unique keys i * d_b + j of the candidate pairs (top-k decoder cosine, both directions),
    from one pass over the blocks of A B^T on `device` (both directions from the same products)."""
    d_a, d_b = wa_unit.shape[0], wb_unit.shape[0]
    dev = device or wa_unit.device
    top_a, top_b = _block_topk(wa_unit.to(dev), wb_unit.to(dev), min(k, d_b), min(k, d_a), chunk)
    a_ids, b_ids = top_a.idx.cpu().numpy(), top_b.idx.cpu().numpy()
    keys_ab = np.repeat(np.arange(d_a, dtype=np.int64), a_ids.shape[1]) * d_b + a_ids.reshape(-1)
    keys_ba = b_ids.reshape(-1) * d_b + np.repeat(np.arange(d_b, dtype=np.int64), b_ids.shape[1])
    return np.unique(np.concatenate([keys_ab, keys_ba]))


@dataclass
class LogitStats:
    similarity: np.ndarray  # [d] float64, NaN where a side is constant
    pos_ids: dict[str, np.ndarray]  # model -> [d, 10] int32
    pos_values: dict[str, np.ndarray]  # model -> [d, 10] float32 (descending)
    neg_ids: dict[str, np.ndarray]
    neg_values: dict[str, np.ndarray]  # ascending


def logit_stats(w_dec: torch.Tensor, w_u: dict[str, torch.Tensor], k: int = N_LOGITS, chunk: int | None = None, device: str | None = None) -> LogitStats:
    """W_dec @ W_U for each model, in chunks of features on `device`: similarity and top +/- k tokens.

    A chunk holds at most 2**24 logits per model (64 MiB in float32), whatever the vocabulary. The
    top-k are taken on the float32 logits. The similarity is the Pearson correlation over the
    vocabulary the two unembeddings share (the first min(d_vocab) tokens: a finetune's added
    tokens are not compared), from float64 sums of the float32 logits and their products."""
    dev = device or "cpu"
    w_dec = w_dec.detach().to(dev, torch.float32)
    w_u = {m: w.detach().to(dev, torch.float32) for m, w in w_u.items()}
    d = w_dec.shape[0]
    models = list(w_u)
    if chunk is None:
        chunk = max(8, min(512, (1 << 24) // max(w.shape[1] for w in w_u.values())))
    sim = np.zeros(d, np.float64)
    out = {name: {m: None for m in models} for name in ("pos_ids", "pos_values", "neg_ids", "neg_values")}
    for m in models:
        k_m = min(k, w_u[m].shape[1])
        out["pos_ids"][m] = np.zeros((d, k_m), np.int32)
        out["neg_ids"][m] = np.zeros((d, k_m), np.int32)
        out["pos_values"][m] = np.zeros((d, k_m), np.float32)
        out["neg_values"][m] = np.zeros((d, k_m), np.float32)
    f64 = torch.float64
    for start in range(0, d, chunk):
        sl = slice(start, start + chunk)
        logits = {m: w_dec[sl] @ w_u[m] for m in models}
        for m in models:
            k_m = out["pos_ids"][m].shape[1]
            v, i = logits[m].topk(k_m, dim=1)
            out["pos_ids"][m][sl], out["pos_values"][m][sl] = i.cpu().numpy(), v.cpu().numpy()
            v, i = logits[m].topk(k_m, dim=1, largest=False)
            out["neg_ids"][m][sl], out["neg_values"][m][sl] = i.cpu().numpy(), v.cpu().numpy()
        if len(models) == 2:
            n_v = min(w.shape[1] for w in w_u.values())
            a, b = logits[models[0]][:, :n_v], logits[models[1]][:, :n_v]
            if a.device.type == "mps":  # no float64 there
                a, b = a.cpu(), b.cpu()
            sa, sb = a.sum(1, dtype=f64), b.sum(1, dtype=f64)
            saa, sbb, sab = (a * a).sum(1, dtype=f64), (b * b).sum(1, dtype=f64), (a * b).sum(1, dtype=f64)
            cov = n_v * sab - sa * sb
            den = torch.sqrt((n_v * saa - sa * sa).clamp_min(0) * (n_v * sbb - sb * sb).clamp_min(0))
            with np.errstate(invalid="ignore", divide="ignore"):
                num, den = cov.cpu().numpy(), den.cpu().numpy()
                sim[sl] = np.where(den > 0, np.clip(num / den, -1, 1), np.nan)
    return LogitStats(sim, out["pos_ids"], out["pos_values"], out["neg_ids"], out["neg_values"])


# ----------------------------------------------------------------------------------------------
# Matching


@dataclass
class MatchResult:
    mode: str  # "all_pairs" | "candidates"
    # best match per feature, both directions (index -1 / NaN when a feature has no candidate)
    best_b_for_a: np.ndarray
    best_a_for_b: np.ndarray
    best_score_a: np.ndarray
    best_score_b: np.ndarray
    best_corr_a: np.ndarray
    best_corr_b: np.ndarray
    best_cos_a: np.ndarray
    best_cos_b: np.ndarray
    assigned_b_for_a: np.ndarray  # -1 unassigned
    assigned_a_for_b: np.ndarray
    assigned_score_a: np.ndarray
    assigned_score_b: np.ndarray
    # rows of matches.parquet
    pair_a: np.ndarray
    pair_b: np.ndarray
    pair_corr: np.ndarray
    pair_cos: np.ndarray
    pair_score: np.ndarray
    pair_assigned: np.ndarray
    n_candidate_pairs: int


def combined_score(corr: np.ndarray, dec_cos: np.ndarray) -> np.ndarray:
    return 0.5 * np.nan_to_num(corr, nan=0.0) + 0.5 * dec_cos


def match_all_pairs(corr: np.ndarray, wa_unit: torch.Tensor, wb_unit: torch.Tensor, n_kept: int) -> MatchResult:
    from scipy.optimize import linear_sum_assignment

    d_a, d_b = corr.shape
    dec_cos = (wa_unit.to(torch.float64) @ wb_unit.to(torch.float64).T).numpy()
    score = combined_score(corr, dec_cos)
    best_b = score.argmax(axis=1)
    best_a = score.argmax(axis=0)
    ra = np.arange(d_a)
    rb = np.arange(d_b)
    rows, cols = linear_sum_assignment(score, maximize=True)
    assigned_b = np.full(d_a, -1, np.int64)
    assigned_a = np.full(d_b, -1, np.int64)
    assigned_b[rows] = cols
    assigned_a[cols] = rows
    # Keep each feature's n_kept best partners (both directions) plus the assignment.
    kept_b = np.argsort(-score, axis=1, kind="stable")[:, :n_kept]
    kept_a = np.argsort(-score, axis=0, kind="stable")[:n_kept, :]
    keys = np.concatenate(
        [
            np.repeat(ra, kept_b.shape[1]) * d_b + kept_b.reshape(-1),
            kept_a.reshape(-1) * d_b + np.tile(rb, kept_a.shape[0]),
            rows.astype(np.int64) * d_b + cols,
        ]
    )
    keys = np.unique(keys)
    pa_, pb_ = keys // d_b, keys % d_b
    return MatchResult(
        mode="all_pairs",
        best_b_for_a=best_b, best_a_for_b=best_a,
        best_score_a=score[ra, best_b], best_score_b=score[best_a, rb],
        best_corr_a=corr[ra, best_b], best_corr_b=corr[best_a, rb],
        best_cos_a=dec_cos[ra, best_b], best_cos_b=dec_cos[best_a, rb],
        assigned_b_for_a=assigned_b, assigned_a_for_b=assigned_a,
        assigned_score_a=np.where(assigned_b >= 0, score[ra, np.maximum(assigned_b, 0)], np.nan),
        assigned_score_b=np.where(assigned_a >= 0, score[np.maximum(assigned_a, 0), rb], np.nan),
        pair_a=pa_, pair_b=pb_, pair_corr=corr[pa_, pb_], pair_cos=dec_cos[pa_, pb_], pair_score=score[pa_, pb_],
        pair_assigned=assigned_b[pa_] == pb_,
        n_candidate_pairs=d_a * d_b,
    )


def _best_per_group(group: np.ndarray, other: np.ndarray, score: np.ndarray, n: int) -> np.ndarray:
    """Index (into the pair arrays) of the best-scoring pair per group value 0..n-1 (-1 if none); ties: smaller `other`."""
    order = np.lexsort((other, -score, group))
    g = group[order]
    first = np.searchsorted(g, np.arange(n), side="left")
    has = (first < len(g)) & (g[np.minimum(first, len(g) - 1)] == np.arange(n))
    return np.where(has, order[np.minimum(first, len(g) - 1)], -1)


def match_candidates(pair_keys: np.ndarray, corr: np.ndarray, wa_unit: torch.Tensor, wb_unit: torch.Tensor) -> MatchResult:
    import scipy.sparse as sp
    from scipy.sparse.csgraph import min_weight_full_bipartite_matching

    d_a, d_b = wa_unit.shape[0], wb_unit.shape[0]
    pa_, pb_ = pair_keys // d_b, pair_keys % d_b
    dec_cos = (wa_unit[torch.from_numpy(pa_)].to(torch.float64) * wb_unit[torch.from_numpy(pb_)].to(torch.float64)).sum(1).numpy()
    score = combined_score(corr, dec_cos)
    ia = _best_per_group(pa_, pb_, score, d_a)
    ib = _best_per_group(pb_, pa_, score, d_b)

    def pick(values, idx, fill):
        return np.where(idx >= 0, values[np.maximum(idx, 0)], fill)

    # One-to-one: costs 2 - score in [1, 3] on real pairs; a private dummy column per row at cost 4.
    unassigned_cost = 2.0 - (-2.0)
    rows = np.concatenate([pa_, np.arange(d_a)])
    cols = np.concatenate([pb_, d_b + np.arange(d_a)])
    costs = np.concatenate([2.0 - score, np.full(d_a, unassigned_cost)])
    graph = sp.csr_matrix((costs, (rows, cols)), shape=(d_a, d_b + d_a))
    r, c = min_weight_full_bipartite_matching(graph)
    real = c < d_b
    assigned_b = np.full(d_a, -1, np.int64)
    assigned_a = np.full(d_b, -1, np.int64)
    assigned_b[r[real]] = c[real]
    assigned_a[c[real]] = r[real]

    def assigned_scores(a_of, b_of):
        keys = a_of * d_b + b_of
        pos = np.searchsorted(pair_keys, keys)
        ok = (a_of >= 0) & (b_of >= 0)
        return np.where(ok, score[np.minimum(pos, len(score) - 1)], np.nan)

    return MatchResult(
        mode="candidates",
        best_b_for_a=pick(pb_, ia, -1), best_a_for_b=pick(pa_, ib, -1),
        best_score_a=pick(score, ia, np.nan), best_score_b=pick(score, ib, np.nan),
        best_corr_a=pick(corr, ia, np.nan), best_corr_b=pick(corr, ib, np.nan),
        best_cos_a=pick(dec_cos, ia, np.nan), best_cos_b=pick(dec_cos, ib, np.nan),
        assigned_b_for_a=assigned_b, assigned_a_for_b=assigned_a,
        assigned_score_a=assigned_scores(np.arange(d_a), assigned_b),
        assigned_score_b=assigned_scores(assigned_a, np.arange(d_b)),
        pair_a=pa_, pair_b=pb_, pair_corr=corr, pair_cos=dec_cos, pair_score=score,
        pair_assigned=assigned_b[pa_] == pb_,
        n_candidate_pairs=len(pair_keys),
    )
