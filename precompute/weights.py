"""Weights-only statistics, computed at finalize: logits, decoder neighbours, two-SAE matching.

Nothing here sees an activation except through the accumulators it is handed. Every
d_sae x (d_sae or d_vocab) product is computed in row chunks, so no dense d_sae x d_sae (or
d_sae x d_vocab) matrix is ever held, except the d_a x d_b score matrix of all-pairs matching,
which is used only up to `[matching] max_all_pairs_d_sae` (4096 by default: 128 MiB in float64).

Logits (METHODS.md section 4): W_dec[i] @ W_U(model), each model's own unembedding, as Study T
computes them (the direct path, no final LayerNorm). Logit similarity is the Pearson correlation
of the two over the vocabulary.

Matching (sections 5 and 7): A on its model's activations against A' on its model's (the
finetuned SAE on the finetune, or the base SAE's seed twin on the base model), same tokens.
Only features alive on their own model take part: a dead feature has no best match and is never
assigned. Candidate scores (`SCORE_KINDS`): activation correlation over all counted tokens,
correlation over the tokens where either fires, decoder cosine, encoder cosine, and even mixes;
the run uses one of them (`[matching] score`, by default the one that best separates the seed
twin's assigned pairs from random pairs: precompute/baseline.py).
  * all-pairs mode (max(d_a, d_b) <= max_all_pairs_d_sae): every score for every pair; best match
    per feature in both directions; one-to-one assignment by scipy.optimize.linear_sum_assignment
    (maximize) on the alive rows and columns.
  * candidate mode (larger dictionaries): the candidate pairs are each feature's n_candidates
    nearest decoder directions in the other SAE (both directions, union); activation statistics
    are accumulated for those pairs only; best match among a feature's candidates; the one-to-one
    assignment is a minimum-cost assignment on the candidate graph (precompute/sparse_assignment.py,
    Jonker and Volgenant's method), where every base feature also has a private "unassigned" option
    scored -2 (below any real pair), so an assignment always exists and a real pair is always
    preferred.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from explorer import schema

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

# Candidate scores of a pair (METHODS.md section 7): activation correlation on all counted tokens,
# correlation on the tokens where either feature fires, decoder cosine, encoder cosine, and two
# even mixes. A NaN correlation (a constant side) counts as 0 in every score.
BASE_SCORES = schema.MATCH_BASE_SCORES
SCORE_KINDS = schema.MATCH_SCORES
DEFAULT_SCORE = schema.DEFAULT_MATCH_SCORE  # without a seed twin to choose on (the score of earlier runs)
NO_SCORE = -np.inf  # a dead feature's (or a missing pair's) score: below every real one


def combine(kind: str, base: dict[str, np.ndarray]) -> np.ndarray:
    """The score `kind` from the base scores: one of them, or the mean of those joined by '+'."""
    parts = kind.split("+")
    if not parts or any(p not in BASE_SCORES for p in parts):
        raise ValueError(f"unknown score {kind!r}; choose one of {SCORE_KINDS}")
    out = np.nan_to_num(np.asarray(base[parts[0]], np.float64), nan=0.0)
    for p in parts[1:]:
        out = out + np.nan_to_num(np.asarray(base[p], np.float64), nan=0.0)
    return out / len(parts)


@dataclass
class PairScores:
    """The base scores of the pairs of two SAEs A (rows) and B (columns): dense [d_a, d_b]
    matrices (`pair_keys` None) or one value per candidate pair (keys i * d_b + j, sorted)."""

    d_a: int
    d_b: int
    base: dict[str, np.ndarray]
    pair_keys: np.ndarray | None = None

    @property
    def dense(self) -> bool:
        return self.pair_keys is None

    def score(self, kind: str) -> np.ndarray:
        return combine(kind, self.base)

    def rows_cols(self) -> tuple[np.ndarray, np.ndarray]:
        return self.pair_keys // self.d_b, self.pair_keys % self.d_b


def pair_scores(corr: np.ndarray, cofire: np.ndarray, dec_a: torch.Tensor, dec_b: torch.Tensor, enc_a: torch.Tensor, enc_b: torch.Tensor,
                pair_keys: np.ndarray | None) -> PairScores:
    """PairScores from the activation correlations (CrossProducts) and the SAEs' unit decoder rows
    and unit encoder columns (as rows, [d_sae, d_in])."""
    d_a, d_b = dec_a.shape[0], dec_b.shape[0]
    if pair_keys is None:
        cos = lambda a, b: (a.to(torch.float64) @ b.to(torch.float64).T).numpy()  # noqa: E731
    else:
        ia, ib = torch.from_numpy(pair_keys // d_b), torch.from_numpy(pair_keys % d_b)
        cos = lambda a, b: (a[ia].to(torch.float64) * b[ib].to(torch.float64)).sum(1).numpy()  # noqa: E731
    base = {"act_corr": corr, "cofire_corr": cofire, "dec_cos": cos(dec_a, dec_b), "enc_cos": cos(enc_a, enc_b)}
    return PairScores(d_a, d_b, base, None if pair_keys is None else np.asarray(pair_keys, np.int64))


@dataclass
class MatchResult:
    mode: str  # "all_pairs" | "candidates"
    kind: str  # the score the best matches and the assignment use
    # best match per alive feature, both directions (-1 / NaN for a dead feature or one without a candidate)
    best_b_for_a: np.ndarray
    best_a_for_b: np.ndarray
    best_a: dict[str, np.ndarray]  # "score" and each base score of A's best pair
    best_b: dict[str, np.ndarray]
    assigned_b_for_a: np.ndarray  # -1 unassigned (dead features are never assigned)
    assigned_a_for_b: np.ndarray
    assigned_score_a: np.ndarray
    assigned_score_b: np.ndarray
    # rows of matches.parquet: alive pairs kept (each feature's n_kept best, both directions, plus the assignment)
    pair_a: np.ndarray
    pair_b: np.ndarray
    pair: dict[str, np.ndarray]  # "score" and each base score
    pair_assigned: np.ndarray
    n_candidate_pairs: int

    @property
    def best_score_a(self) -> np.ndarray:
        return self.best_a["score"]

    @property
    def best_score_b(self) -> np.ndarray:
        return self.best_b["score"]


def _masked(ps: PairScores, kind: str, alive_a: np.ndarray, alive_b: np.ndarray) -> np.ndarray:
    """The score of `kind` with every pair that has a dead side at NO_SCORE."""
    score = ps.score(kind)
    if ps.dense:
        return np.where(alive_a[:, None] & alive_b[None, :], score, NO_SCORE)
    ia, ib = ps.rows_cols()
    return np.where(alive_a[ia] & alive_b[ib], score, NO_SCORE)


def best_matches(ps: PairScores, kind: str, alive_a: np.ndarray, alive_b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(best B for each A, its score, best A for each B, its score) among alive pairs; -1 / NaN
    where a feature is dead or has no alive candidate. Ties: the smaller id."""
    score = _masked(ps, kind, alive_a, alive_b)
    if ps.dense:
        ra, rb = np.arange(ps.d_a), np.arange(ps.d_b)
        if score.size == 0:
            return np.full(ps.d_a, -1), np.full(ps.d_a, np.nan), np.full(ps.d_b, -1), np.full(ps.d_b, np.nan)
        best_b, best_a = score.argmax(axis=1), score.argmax(axis=0)
        sa, sb = score[ra, best_b], score[best_a, rb]
    else:
        ia, ib = ps.rows_cols()
        ok = score > NO_SCORE
        ga = _best_per_group(ia[ok], ib[ok], score[ok], ps.d_a)
        gb = _best_per_group(ib[ok], ia[ok], score[ok], ps.d_b)
        idx = np.flatnonzero(ok)
        best_b = np.where(ga >= 0, ib[idx[np.maximum(ga, 0)]] if len(idx) else -1, -1)
        best_a = np.where(gb >= 0, ia[idx[np.maximum(gb, 0)]] if len(idx) else -1, -1)
        sa = np.where(ga >= 0, score[idx[np.maximum(ga, 0)]] if len(idx) else NO_SCORE, NO_SCORE)
        sb = np.where(gb >= 0, score[idx[np.maximum(gb, 0)]] if len(idx) else NO_SCORE, NO_SCORE)
    has_a, has_b = sa > NO_SCORE, sb > NO_SCORE
    return np.where(has_a, best_b, -1), np.where(has_a, sa, np.nan), np.where(has_b, best_a, -1), np.where(has_b, sb, np.nan)


def assignment(ps: PairScores, kind: str, alive_a: np.ndarray, alive_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one assignment of alive features maximizing the total score: (B for each A, A for each B), -1 unassigned.

    All pairs: scipy's linear_sum_assignment on the alive rows and columns. Candidates: a
    minimum-cost assignment on the alive candidate graph (`candidate_graph`) where every A
    feature may stay unassigned and a real pair (score s) is always preferred to none, solved
    exactly by precompute.sparse_assignment (an auction's prices as the start of Jonker and
    Volgenant's method, shortest augmenting paths; its dual potentials certify the optimum)."""
    from scipy.optimize import linear_sum_assignment

    assigned_b = np.full(ps.d_a, -1, np.int64)
    assigned_a = np.full(ps.d_b, -1, np.int64)
    ra, rb = np.flatnonzero(alive_a), np.flatnonzero(alive_b)
    if len(ra) == 0 or len(rb) == 0:
        return assigned_b, assigned_a
    if ps.dense:
        rows, cols = linear_sum_assignment(ps.score(kind)[np.ix_(ra, rb)], maximize=True)
        r, c = ra[rows], rb[cols]
    else:
        from precompute.sparse_assignment import min_cost_row_assignment

        ia, ib, sc = alive_pairs(ps, kind, alive_a, alive_b)
        na, nb = len(ra), len(rb)
        indptr, cols, costs = candidate_graph(ia, ib, sc, na, nb)
        to_col, _, _ = min_cost_row_assignment(indptr, cols, costs, nb + na)
        real = np.flatnonzero(to_col < nb)
        r, c = ra[real], rb[to_col[real]]
    assigned_b[r] = c
    assigned_a[c] = r
    return assigned_b, assigned_a


def alive_pairs(ps: PairScores, kind: str, alive_a: np.ndarray, alive_b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The candidate pairs of alive features, renumbered 0..n-1 among the alive ones on each side
    (the rows and columns of `candidate_graph`), with their scores `kind`: (ia, ib, score)."""
    ia, ib = ps.rows_cols()
    ok = alive_a[ia] & alive_b[ib]
    pos_a, pos_b = np.cumsum(alive_a) - 1, np.cumsum(alive_b) - 1
    return pos_a[ia[ok]], pos_b[ib[ok]], ps.score(kind)[ok]


def candidate_graph(ia: np.ndarray, ib: np.ndarray, score: np.ndarray, na: int, nb: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The candidate assignment's graph in CSR form (indptr, columns, costs): na rows (A's alive
    features, pairs (ia, ib) sorted by ia), nb + na columns: B's alive features at cost 2 - score
    (in [1, 3]) and a private "unassigned" column nb + i per row at cost 4, so an assignment of
    every row always exists, a real pair is always preferred to none, and the minimum cost is the
    maximum total score: cost = 4 na + sum over the pairs assigned of (-2 - score)."""
    ia = np.asarray(ia, np.int64)
    counts = np.bincount(ia, minlength=na) + 1
    indptr = np.zeros(na + 1, np.int64)
    np.cumsum(counts, out=indptr[1:])
    order = np.argsort(ia, kind="stable")
    rows = np.concatenate([ia[order], np.arange(na)])
    cols = np.concatenate([np.asarray(ib, np.int64)[order], nb + np.arange(na)])
    costs = np.concatenate([2.0 - np.asarray(score, np.float64)[order], np.full(na, 4.0)])
    by_row = np.argsort(rows, kind="stable")  # each row's pairs, then its dummy
    return indptr, cols[by_row], costs[by_row]


def _values_at(ps: PairScores, a: np.ndarray, b: np.ndarray, values: np.ndarray) -> np.ndarray:
    """values (a dense matrix or per candidate pair) at pairs (a, b); NaN where a < 0, b < 0 or not a candidate."""
    ok = (a >= 0) & (b >= 0)
    a0, b0 = np.maximum(a, 0), np.maximum(b, 0)
    if ps.dense:
        v = values[a0, b0] if values.size else np.full(len(a), np.nan)
    else:
        keys = a0.astype(np.int64) * ps.d_b + b0
        pos = np.minimum(np.searchsorted(ps.pair_keys, keys), max(len(ps.pair_keys) - 1, 0))
        ok &= (ps.pair_keys[pos] == keys) if len(ps.pair_keys) else False
        v = values[pos] if len(values) else np.full(len(a), np.nan)
    return np.where(ok, v, np.nan)


def match(ps: PairScores, kind: str, alive_a: np.ndarray, alive_b: np.ndarray, n_kept: int) -> MatchResult:
    """Best matches both ways, the one-to-one assignment and the kept pairs, on score `kind`, among alive features."""
    best_b, _, best_a, _ = best_matches(ps, kind, alive_a, alive_b)
    assigned_b, assigned_a = assignment(ps, kind, alive_a, alive_b)
    values = {"score": ps.score(kind), **ps.base}
    ra, rb = np.arange(ps.d_a), np.arange(ps.d_b)
    score = _masked(ps, kind, alive_a, alive_b)
    if ps.dense:
        n_kept_b, n_kept_a = min(n_kept, ps.d_b), min(n_kept, ps.d_a)
        kept_b = np.argsort(-score, axis=1, kind="stable")[:, :n_kept_b]
        kept_a = np.argsort(-score, axis=0, kind="stable")[:n_kept_a, :]
        keys = np.concatenate([np.repeat(ra, kept_b.shape[1]) * ps.d_b + kept_b.reshape(-1), kept_a.reshape(-1) * ps.d_b + np.tile(rb, kept_a.shape[0])])
        keys = keys[score.reshape(-1)[keys] > NO_SCORE]
        n_candidates = int(alive_a.sum()) * int(alive_b.sum())
    else:
        keys = ps.pair_keys[score > NO_SCORE]
        n_candidates = len(keys)
    assigned_keys = np.flatnonzero(assigned_b >= 0) * ps.d_b + assigned_b[assigned_b >= 0]
    keys = np.unique(np.concatenate([keys, assigned_keys]).astype(np.int64))
    pa_, pb_ = keys // ps.d_b, keys % ps.d_b
    return MatchResult(
        mode="all_pairs" if ps.dense else "candidates", kind=kind,
        best_b_for_a=best_b, best_a_for_b=best_a,
        best_a={k: _values_at(ps, ra, best_b, v) for k, v in values.items()},
        best_b={k: _values_at(ps, best_a, rb, v) for k, v in values.items()},
        assigned_b_for_a=assigned_b, assigned_a_for_b=assigned_a,
        assigned_score_a=_values_at(ps, ra, assigned_b, values["score"]),
        assigned_score_b=_values_at(ps, assigned_a, rb, values["score"]),
        pair_a=pa_, pair_b=pb_, pair={k: _values_at(ps, pa_, pb_, v) for k, v in values.items()},
        pair_assigned=assigned_b[pa_] == pb_,
        n_candidate_pairs=n_candidates,
    )


def _best_per_group(group: np.ndarray, other: np.ndarray, score: np.ndarray, n: int) -> np.ndarray:
    """Index (into the pair arrays) of the best-scoring pair per group value 0..n-1 (-1 if none); ties: smaller `other`."""
    order = np.lexsort((other, -score, group))
    g = group[order]
    first = np.searchsorted(g, np.arange(n), side="left")
    has = (first < len(g)) & (g[np.minimum(first, len(g) - 1)] == np.arange(n))
    return np.where(has, order[np.minimum(first, len(g) - 1)], -1)
