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
    w = w.detach().to("cpu", torch.float32)
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)


def nearest_neighbours(w_unit: torch.Tensor, k: int = N_NEIGHBOURS, chunk: int = CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """Top-k other features by decoder cosine within one SAE: ids [d, k'] int32, cosines [d, k'] float32."""
    d = w_unit.shape[0]
    k = min(k, d - 1)
    ids = np.zeros((d, k), np.int32)
    cos = np.zeros((d, k), np.float32)
    for start in range(0, d, chunk):
        sims = w_unit[start : start + chunk] @ w_unit.T  # [chunk, d]
        rows = torch.arange(sims.shape[0])
        sims[rows, rows + start] = -np.inf  # not its own neighbour
        val, idx = sims.topk(k, dim=1)
        ids[start : start + chunk] = idx.numpy()
        cos[start : start + chunk] = val.numpy()
    return ids, cos


def cross_topk(wa_unit: torch.Tensor, wb_unit: torch.Tensor, k: int, chunk: int = CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """For each row of A, the k rows of B with the largest decoder cosine: ids [d_a, k], cosines."""
    k = min(k, wb_unit.shape[0])
    ids = np.zeros((wa_unit.shape[0], k), np.int64)
    cos = np.zeros((wa_unit.shape[0], k), np.float32)
    for start in range(0, wa_unit.shape[0], chunk):
        val, idx = (wa_unit[start : start + chunk] @ wb_unit.T).topk(k, dim=1)
        ids[start : start + chunk] = idx.numpy()
        cos[start : start + chunk] = val.numpy()
    return ids, cos


def candidate_pair_keys(wa_unit: torch.Tensor, wb_unit: torch.Tensor, k: int) -> np.ndarray:
    """Sorted unique keys i * d_b + j of the candidate pairs (top-k decoder cosine, both directions)."""
    d_a, d_b = wa_unit.shape[0], wb_unit.shape[0]
    a_ids, _ = cross_topk(wa_unit, wb_unit, k)
    b_ids, _ = cross_topk(wb_unit, wa_unit, k)
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


def logit_stats(w_dec: torch.Tensor, w_u: dict[str, torch.Tensor], k: int = N_LOGITS, chunk: int | None = None) -> LogitStats:
    """W_dec @ W_U for each model, in chunks of features: similarity and top +/- k tokens.

    A chunk holds at most 2**24 float64 logits per model (128 MiB), whatever the vocabulary."""
    w_dec = w_dec.detach().to("cpu", torch.float32)
    w_u = {m: w.detach().to("cpu", torch.float32) for m, w in w_u.items()}
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
    for start in range(0, d, chunk):
        sl = slice(start, start + chunk)
        logits = {m: (w_dec[sl] @ w_u[m]).to(torch.float64) for m in models}
        for m in models:
            k_m = out["pos_ids"][m].shape[1]
            v, i = logits[m].topk(k_m, dim=1)
            out["pos_ids"][m][sl], out["pos_values"][m][sl] = i.numpy(), v.numpy()
            v, i = logits[m].topk(k_m, dim=1, largest=False)
            out["neg_ids"][m][sl], out["neg_values"][m][sl] = i.numpy(), v.numpy()
        if len(models) == 2:
            a, b = logits[models[0]], logits[models[1]]
            a = a - a.mean(dim=1, keepdim=True)
            b = b - b.mean(dim=1, keepdim=True)
            den = (a.norm(dim=1) * b.norm(dim=1)).numpy()
            num = (a * b).sum(dim=1).numpy()
            with np.errstate(invalid="ignore", divide="ignore"):
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
