"""Mergeable accumulators: everything a run needs, kept without holding the activations.

Pure numpy (no model, no torch). Every accumulator has the same shape (STYLE.md, after sae_vis's
RollingCorrCoef):

    acc.update(...)          fold one batch in
    acc.merge(other)         fold in another accumulator of the same kind (a shard)
    acc.finalize(...)        the statistics
    acc.state() / load(d)    its state as a flat dict of numpy arrays (saved with safetensors
                             for checkpoints and shards; never pickle)

Sums are float64 (in float32 `n*sum(x^2) - sum(x)^2` cancels). Counts are int64. Merging is
associative and, for counts, top-k and the quantile sample, exact: a sharded run merges to the
same numbers as one pass (sums agree to float64 rounding).

Feature activations arrive as `SparseActs`: the positive entries of one (sae, model) batch as
(global token index, feature id, value), where the global token index is
`seq_id * context_size + position` and identifies a token across shards.

Top-k examples (`TopK`): per feature, the k largest activations; ties are broken by the smaller
global token index, so the selection does not depend on batch or shard order.

Quantile examples (`QuantileSample`): every (token, feature) pair with a positive activation gets
a pseudo-random priority, a 64-bit integer hash of (seed, global token index, feature id)
(`priority`). Per feature we keep the `size` smallest priorities: a bottom-k sketch, which is a
uniform random sample without replacement of the feature's firing tokens, and which merges
exactly (the bottom-k of a union is the bottom-k of the bottom-ks). At finalize the sample is
sorted by activation and cut into `n_bins` equal-count bins (quantile bins of the sample, which
estimate the feature's activation quantiles); in each bin the `n_per_bin` smallest priorities are
the examples. With `size` about 3x n_bins * n_per_bin every bin is full whenever the feature fired
on at least `size` tokens; a feature that fired on m < size tokens gets min(n_bins, m // n_per_bin)
bins (at least one).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

INT64_MAX = np.iinfo(np.int64).max
_MASK64 = (1 << 64) - 1


# ----------------------------------------------------------------------------------------------
# Inputs


@dataclass
class SparseActs:
    """The positive feature activations of one (sae, model) batch, on the counted tokens only."""

    token: np.ndarray  # [nnz] int64 global token index, sorted (row-major order of [token, feature])
    feature: np.ndarray  # [nnz] int64
    value: np.ndarray  # [nnz] float32, > 0
    n_tokens: int  # counted tokens in the batch (the denominator of densities)

    @staticmethod
    def from_dense(acts: np.ndarray, token_index: np.ndarray, counted: np.ndarray) -> "SparseActs":
        """acts [T, d_sae]; token_index [T] global indices; counted [T] bool. For tests and references."""
        acts = np.where(counted[:, None], acts, 0)
        t, f = np.nonzero(acts > 0)
        return SparseActs(token_index[t].astype(np.int64), f.astype(np.int64), acts[t, f].astype(np.float32), int(counted.sum()))


def priority(seed: int, token: np.ndarray, feature: np.ndarray) -> np.ndarray:
    """A deterministic pseudo-random int64 priority per (token, feature): splitmix64 of the pair.

    The key (token << 32 | feature) + seed * golden is unique per pair for token < 2**31, and the
    splitmix64 finalizer is a bijection, so priorities are distinct up to the final 1-bit shift.
    """
    # in place on one buffer, the int64 inputs reinterpreted as uint64 (no conversion copies; B2)
    z = np.asarray(token, np.int64).view(np.uint64) << np.uint64(32)
    z |= np.asarray(feature, np.int64).view(np.uint64)
    z += np.uint64((seed * 0x9E3779B97F4A7C15) & _MASK64)
    t = z >> np.uint64(30)
    z ^= t
    z *= np.uint64(0xBF58476D1CE4E5B9)
    np.right_shift(z, np.uint64(27), out=t)
    z ^= t
    z *= np.uint64(0x94D049BB133111EB)
    np.right_shift(z, np.uint64(31), out=t)
    z ^= t
    z >>= np.uint64(1)
    return z.view(np.int64)


def hist_bins(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin index of each value on `edges`: [e_i, e_i+1); below the first edge -> 0, above the last -> last.

    For log-spaced edges (the activation histogram's) the bin is guessed from log10 and checked
    against the edges; only values whose guess fails the check (none in practice but for NaN and
    the like) take the binary search: the same bins, ~3x faster than searchsorted for all (B2)."""
    edges = np.asarray(edges, np.float64)
    v64 = values.astype(np.float64)
    grid = _log_grid(edges)
    if grid is None or len(v64) < 64:
        return np.clip(np.searchsorted(edges, v64, side="right") - 1, 0, len(edges) - 2)
    lo, step = grid
    last = len(edges) - 2
    with np.errstate(all="ignore"):
        guess = np.log10(values.astype(np.float32)) - np.float32(lo)
        guess *= np.float32(1.0 / step)
    np.nan_to_num(guess, copy=False, nan=0.0, posinf=last, neginf=0.0)
    np.clip(guess, 0, last, out=guess)
    idx = guess.astype(np.intp)
    # the guess is the bin when (idx == 0 or v >= edges[idx]) and (idx == last or v < edges[idx + 1])
    wrong = ((idx > 0) & ~(v64 >= edges[idx])) | ((idx < last) & ~(v64 < edges[idx + 1]))
    if wrong.any():
        w = np.flatnonzero(wrong)
        idx[w] = np.clip(np.searchsorted(edges, v64[w], side="right") - 1, 0, last)
    return idx


def _log_grid(edges: np.ndarray) -> tuple[float, float] | None:
    """(log10 of the first edge, log10 step) when the edges are positive and log-spaced, else None."""
    if len(edges) < 3 or not np.all(edges > 0) or not np.all(np.isfinite(edges)):
        return None
    logs = np.log10(edges)
    step = (logs[-1] - logs[0]) / (len(edges) - 1)
    if step <= 0 or not np.allclose(np.diff(logs), step, rtol=1e-6, atol=0):
        return None
    return float(logs[0]), float(step)


def _merge_into_rows(arrays: list[np.ndarray], token: np.ndarray, f: np.ndarray, new: list[np.ndarray], precedes) -> None:
    """Merge new entries into per-feature rows that are kept sorted, keeping each row's first
    `size` entries: what a full re-sort of the rows' and the new entries would keep, touching
    only the rows that get new entries (TopK and QuantileSample; B2).

    arrays: the state's [d, size] arrays (one per field), rows sorted, filled slots first (those
    with `token` >= 0); f: the new entries' rows, sorted by row and within a row in the rows' order;
    new: the new entries' fields, in `arrays`' order; precedes(idx, j): whether the state entry
    at flat index idx comes before new entry j (bool per pair). Every new entry comes before an
    empty slot, and none is already in its row.
    """
    size = arrays[0].shape[1]
    n = len(f)
    starts = np.flatnonzero(np.r_[True, f[1:] != f[:-1]])  # first new entry of each row
    rows = f[starts]
    row_of = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, n]))
    rank_new = np.arange(n) - starts[row_of]  # rank among the row's new entries
    # rank among the row's current entries: binary search over its filled slots
    base = f * size
    lo, hi = np.zeros(n, np.int64), (token[rows] >= 0).sum(axis=1)[row_of]
    active = lo < hi
    j = np.arange(n)
    while active.any():
        mid = (lo + hi) // 2
        less = active & precedes(base + np.minimum(mid, size - 1), j)
        lo = np.where(less, mid + 1, lo)
        hi = np.where(active & ~less, mid, hi)
        active = lo < hi
    pos = lo + rank_new  # slot in the merged row
    ok = pos < size
    at = row_of[ok] * size + pos[ok]
    marked = np.zeros(len(rows) * size, bool)
    marked[at] = True
    # unmarked slots take the row's current entries in order
    src = np.arange(size)[None, :] - np.cumsum(marked.reshape(len(rows), size), axis=1, dtype=np.int32)
    np.clip(src, 0, size - 1, out=src)
    row_base = rows[:, None] * size
    flat = (row_base + src).ravel()
    dest = (row_base + np.arange(size)[None, :]).ravel()
    for arr, vals in zip(arrays, new):
        a = arr.reshape(-1)
        merged = a.take(flat)
        merged[at] = vals[ok]
        a[dest] = merged


class _Stateful:
    """State as a flat dict of arrays; subclasses list their array attributes in FIELDS."""

    FIELDS: tuple[str, ...] = ()

    def state(self) -> dict[str, np.ndarray]:
        return {name: np.array(getattr(self, name), order="C", copy=True) for name in self.FIELDS}

    def load(self, state: dict[str, np.ndarray]) -> "_Stateful":
        for name in self.FIELDS:
            current = getattr(self, name)
            value = state[name]
            if value.shape != current.shape or value.dtype != current.dtype:
                raise ValueError(f"{type(self).__name__}.{name}: state has {value.shape}/{value.dtype}, expected {current.shape}/{current.dtype}")
            setattr(self, name, value.copy())
        return self


# ----------------------------------------------------------------------------------------------
# Per (sae, model): density, moments, histogram


class FeatureStats(_Stateful):
    FIELDS = ("n_tokens", "count", "sum", "sumsq", "hist")

    def __init__(self, d_sae: int, edges: np.ndarray):
        self.d_sae = d_sae
        self.edges = np.asarray(edges, dtype=np.float64)
        self.n_bins = len(self.edges) - 1
        self.n_tokens = np.zeros((), np.int64)
        self.count = np.zeros(d_sae, np.int64)
        self.sum = np.zeros(d_sae, np.float64)
        self.sumsq = np.zeros(d_sae, np.float64)
        self.hist = np.zeros((d_sae, self.n_bins), np.int64)

    def update(self, acts: SparseActs) -> None:
        f, v = acts.feature, acts.value.astype(np.float64)
        self.n_tokens += acts.n_tokens
        self.count += np.bincount(f, minlength=self.d_sae)
        self.sum += np.bincount(f, weights=v, minlength=self.d_sae)
        self.sumsq += np.bincount(f, weights=v * v, minlength=self.d_sae)
        b = hist_bins(v, self.edges)
        self.hist += np.bincount(f * self.n_bins + b, minlength=self.d_sae * self.n_bins).reshape(self.d_sae, self.n_bins)

    def merge(self, other: "FeatureStats") -> None:
        self.n_tokens += other.n_tokens
        self.count += other.count
        self.sum += other.sum
        self.sumsq += other.sumsq
        self.hist += other.hist

    def finalize(self) -> dict[str, np.ndarray]:
        n = int(self.n_tokens)
        with np.errstate(invalid="ignore", divide="ignore"):
            return {
                "density": self.count / n if n else np.full(self.d_sae, np.nan),
                "mean_act": self.sum / n if n else np.full(self.d_sae, np.nan),
                "mean_active_act": np.where(self.count > 0, self.sum / np.maximum(self.count, 1), np.nan),
            }


# ----------------------------------------------------------------------------------------------
# Top-k per feature


class TopK(_Stateful):
    """Per feature, the k largest activations (ties: smaller global token index first)."""

    FIELDS = ("value", "token")

    def __init__(self, d_sae: int, k: int):
        self.d_sae, self.k = d_sae, k
        self.value = np.full((d_sae, k), -np.inf, np.float32)
        self.token = np.full((d_sae, k), -1, np.int64)

    def _entries(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        f, r = np.nonzero(self.token >= 0)
        return f.astype(np.int64), self.value[f, r], self.token[f, r]

    def _select(self, f: np.ndarray, v: np.ndarray, g: np.ndarray) -> None:
        order = np.lexsort((g, -v, f))  # feature asc, value desc, token asc
        f, v, g = f[order], v[order], g[order]
        rank = np.arange(len(f)) - np.searchsorted(f, f, side="left")
        keep = rank < self.k
        self.value = np.full((self.d_sae, self.k), -np.inf, np.float32)
        self.token = np.full((self.d_sae, self.k), -1, np.int64)
        self.value[f[keep], rank[keep]] = v[keep]
        self.token[f[keep], rank[keep]] = g[keep]

    def update(self, acts: SparseActs) -> None:
        f, v, g = acts.feature, acts.value, acts.token
        # Only entries that can enter: >= the current k-th value of their feature (-inf when not full).
        keep = v >= self.value[f, self.k - 1]
        if not keep.any():
            return
        f, v, g = f[keep], v[keep].astype(np.float32), g[keep]
        if len(g) > 1 and np.all(v > 0) and np.all(g[1:] >= g[:-1]):
            # Entries arrive in token order, and for positive float32 the bit pattern orders like
            # the value: one stable sort by (feature, value desc) leaves equal values in token order.
            key = (f.astype(np.int64) << 32) | (0x7FFFFFFF - v.view(np.int32).astype(np.int64))
            order = np.argsort(key, kind="stable")
        else:
            order = np.lexsort((g, -v, f))  # feature asc, value desc, token asc
        f, v, g = f[order], v[order], g[order]
        V, T = self.value.reshape(-1), self.token.reshape(-1)

        def precedes(idx, j):  # (V desc, T asc) before (v, g); empty slots (-inf) never
            vm = V[idx]
            vj = v[j]
            return (vm > vj) | ((vm == vj) & (T[idx] < g[j]))

        # Merged rows drop what falls beyond k, as `_select` of the current and new entries would.
        _merge_into_rows([self.value, self.token], self.token, f, [v, g], precedes)

    def merge(self, other: "TopK") -> None:
        a, b = self._entries(), other._entries()
        self._select(*(np.concatenate([x, y]) for x, y in zip(a, b)))

    def max(self) -> np.ndarray:
        """Max activation per feature (0 where the feature never fired)."""
        return np.where(self.token[:, 0] >= 0, self.value[:, 0], 0).astype(np.float64)


# ----------------------------------------------------------------------------------------------
# Quantile examples: a bottom-k (by hash priority) uniform sample per feature


@dataclass
class QuantileExample:
    feature: np.ndarray  # int64
    bin: np.ndarray  # int16
    bin_low: np.ndarray  # float32
    bin_high: np.ndarray  # float32
    rank: np.ndarray  # int16
    token: np.ndarray  # int64
    value: np.ndarray  # float32


class QuantileSample(_Stateful):
    FIELDS = ("priority", "token", "value")

    def __init__(self, d_sae: int, size: int, seed: int):
        self.d_sae, self.size, self.seed = d_sae, size, seed
        self.priority = np.full((d_sae, size), INT64_MAX, np.int64)
        self.token = np.full((d_sae, size), -1, np.int64)
        self.value = np.zeros((d_sae, size), np.float32)

    def _entries(self):
        f, r = np.nonzero(self.token >= 0)
        return f.astype(np.int64), self.priority[f, r], self.token[f, r], self.value[f, r]

    def _select(self, f, p, g, v) -> None:
        order = np.lexsort((g, p, f))
        f, p, g, v = f[order], p[order], g[order], v[order]
        rank = np.arange(len(f)) - np.searchsorted(f, f, side="left")
        keep = rank < self.size
        self.priority = np.full((self.d_sae, self.size), INT64_MAX, np.int64)
        self.token = np.full((self.d_sae, self.size), -1, np.int64)
        self.value = np.zeros((self.d_sae, self.size), np.float32)
        fk, rk = f[keep], rank[keep]
        self.priority[fk, rk], self.token[fk, rk], self.value[fk, rk] = p[keep], g[keep], v[keep]

    def update(self, acts: SparseActs) -> None:
        f, g, v = acts.feature, acts.token, acts.value
        p = priority(self.seed, g, f)
        keep = p < self.priority[f, self.size - 1]
        if not keep.any():
            return
        self._insert(f[keep], p[keep], g[keep], v[keep])

    def _insert(self, f, p, g, v) -> None:
        """Merge new entries (none already in the sample, every p < INT64_MAX) into the sorted rows:
        the same rows as `_select` of the sample and the new entries (per feature the `size`
        smallest (priority, token)), touching only the rows of features that got new entries (B2:
        the full lexsort of every kept entry per batch was the stream's largest accumulator cost)."""
        n = len(f)
        # sort by (feature, priority, token): priority first, then a stable sort by feature (a radix
        # sort on int16 features); equal priorities, which distinct hashes practically never give,
        # fall back to the three-key sort
        order = np.argsort(p)
        fo = f[order]
        order = order[np.argsort(fo.astype(np.int16) if self.d_sae <= np.iinfo(np.int16).max else fo, kind="stable")]
        f, p, g, v = f[order], p[order], g[order], v[order]
        if n > 1 and np.any((f[1:] == f[:-1]) & (p[1:] == p[:-1])):
            order = np.lexsort((g, p, f))
            f, p, g, v = f[order], p[order], g[order], v[order]
        P, G = self.priority.reshape(-1), self.token.reshape(-1)

        def precedes(idx, j):  # (P, G) < (p, g); empty slots (P = INT64_MAX > p) never
            pm = P[idx]
            pj = p[j]
            return (pm < pj) | ((pm == pj) & (G[idx] < g[j]))

        _merge_into_rows([self.priority, self.token, self.value], self.token, f, [p, g, v], precedes)

    def merge(self, other: "QuantileSample") -> None:
        a, b = self._entries(), other._entries()
        self._select(*(np.concatenate([x, y]) for x, y in zip(a, b)))

    def finalize(self, n_bins: int, n_per_bin: int) -> QuantileExample:
        """Cut each feature's sample into equal-count activation bins; n_per_bin smallest priorities in each.

        Per feature with m sampled entries: sorted by (activation, token), cut as np.array_split
        cuts m into max(1, min(n_bins, m // n_per_bin)) parts; in each part the entries with the
        smallest (priority, token) are the examples, and a row's slot order IS that order (rows are
        kept sorted by it). Vectorised over features (sorts along rows, one stable grouping
        sort), in (feature, bin, rank) order: no Python loop over features (B7)."""
        filled = (self.token >= 0).sum(axis=1)
        feats = np.flatnonzero(filled)
        empty = QuantileExample(*(np.zeros(0, t) for t in (np.int64, np.int16, np.float32, np.float32, np.int16, np.int64, np.float32)))
        if len(feats) == 0:
            return empty
        m = filled[feats].astype(np.int64)[:, None]  # [n, 1]
        tk, va = self.token[feats], self.value[feats]
        slot = np.arange(self.size)[None, :]
        inside = slot < m
        # activation order within each row: (value asc, token asc), empty slots last
        va_key = np.where(inside, va, np.inf).astype(np.float64)
        by_tok = np.argsort(np.where(inside, tk, np.iinfo(np.int64).max), axis=1, kind="stable")
        by_act = np.take_along_axis(by_tok, np.argsort(np.take_along_axis(va_key, by_tok, axis=1), axis=1, kind="stable"), axis=1)
        pos = np.empty_like(by_act)
        np.put_along_axis(pos, by_act, np.broadcast_to(slot, by_act.shape), axis=1)  # slot j's place in activation order
        n_eff = np.maximum(1, np.minimum(n_bins, m // n_per_bin))
        q, r = m // n_eff, m % n_eff
        big = r * (q + 1)  # the first r parts have q + 1 entries, the others q
        b = np.where(pos < big, pos // (q + 1), r + (pos - big) // np.maximum(q, 1))
        start = np.where(b < r, b * (q + 1), big + (b - r) * q)
        end = start + np.where(b < r, q + 1, q)
        va_sorted = np.take_along_axis(va, by_act, axis=1)
        row, j = np.nonzero(inside)  # row-major: j (priority order) ascending within each row
        bj = b[row, j]
        order = np.argsort(row * (n_bins + 1) + bj, kind="stable")  # (feature, bin), priority order kept
        row, j, bj = row[order], j[order], bj[order]
        group = row * (n_bins + 1) + bj
        first = np.r_[0, np.flatnonzero(group[1:] != group[:-1]) + 1]
        rank = np.arange(len(group)) - np.repeat(first, np.diff(np.r_[first, len(group)]))
        keep = rank < n_per_bin
        row, j, bj, rank = row[keep], j[keep], bj[keep], rank[keep]
        return QuantileExample(
            feature=feats[row].astype(np.int64), bin=bj.astype(np.int16),
            bin_low=va_sorted[row, start[row, j]].astype(np.float32), bin_high=va_sorted[row, end[row, j] - 1].astype(np.float32),
            rank=rank.astype(np.int16), token=tk[row, j].astype(np.int64), value=va[row, j].astype(np.float32),
        )


# ----------------------------------------------------------------------------------------------
# Same SAE on both models: activation similarity and activation error


def pearson(n, sx, sy, sxx, syy, sxy) -> np.ndarray:
    """Pearson correlation from float64 sums; NaN where either variance is not positive."""
    n = np.asarray(n, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        cov = n * sxy - sx * sy
        vx = n * sxx - sx * sx
        vy = n * syy - sy * sy
        r = cov / np.sqrt(vx * vy)
    r = np.where((vx > 0) & (vy > 0), r, np.nan)
    return np.clip(r, -1.0, 1.0)


class PairStats(_Stateful):
    """Per feature of one SAE: sum f(x_base) f(x_finetuned) and sum |log10(f_B+eps) - log10(f_F+eps)|."""

    FIELDS = ("sum_xy", "sum_log_err")

    def __init__(self, d_sae: int, eps: float):
        self.d_sae, self.eps = d_sae, eps
        self.sum_xy = np.zeros(d_sae, np.float64)
        self.sum_log_err = np.zeros(d_sae, np.float64)

    def update(self, base: SparseActs, finetuned: SparseActs) -> None:
        d, eps = self.d_sae, self.eps
        kb = base.token * d + base.feature  # both sorted: SparseActs come in (token, feature) order
        kf = finetuned.token * d + finetuned.feature
        if np.any(np.diff(kb) <= 0) or np.any(np.diff(kf) <= 0):
            raise ValueError("SparseActs must be sorted by (token, feature) without duplicates")
        pos = np.minimum(np.searchsorted(kf, kb), max(len(kf) - 1, 0))
        hit = (kf[pos] == kb) if len(kf) else np.zeros(len(kb), bool)
        ib, jf = np.nonzero(hit)[0], pos[hit]
        vb, vf = base.value.astype(np.float64), finetuned.value.astype(np.float64)
        self.sum_xy += np.bincount(base.feature[ib], weights=vb[ib] * vf[jf], minlength=d)
        # Where both are 0 the log error is exactly 0, so only firing entries contribute: each side's
        # entries as if the other were 0, corrected where both fire.
        log_eps = np.log10(eps)
        lb, lf = np.log10(vb + eps), np.log10(vf + eps)
        err = np.bincount(base.feature, weights=np.abs(lb - log_eps), minlength=d).astype(np.float64)  # int64 when empty
        err += np.bincount(finetuned.feature, weights=np.abs(lf - log_eps), minlength=d)
        both = np.abs(lb[ib] - lf[jf]) - np.abs(lb[ib] - log_eps) - np.abs(lf[jf] - log_eps)
        err += np.bincount(base.feature[ib], weights=both, minlength=d)
        self.sum_log_err += err

    def merge(self, other: "PairStats") -> None:
        self.sum_xy += other.sum_xy
        self.sum_log_err += other.sum_log_err

    def finalize(self, base: FeatureStats, finetuned: FeatureStats) -> dict[str, np.ndarray]:
        n = int(base.n_tokens)
        sim = pearson(n, base.sum, finetuned.sum, base.sumsq, finetuned.sumsq, self.sum_xy)
        err = self.sum_log_err / n if n else np.full(self.d_sae, np.nan)
        return {"act_similarity": sim, "act_error": err}


# ----------------------------------------------------------------------------------------------
# Two SAEs: activation cross-products for matching


class CrossProducts(_Stateful):
    """sum over tokens of f_i(A, x_B) * f_j(A', x_F): all pairs (dense d_a x d_b) or given candidate pairs.

    Candidate pairs are given as sorted keys i * d_b + j.
    """

    FIELDS = ("sum_xy",)

    def __init__(self, d_a: int, d_b: int, pair_keys: np.ndarray | None = None):
        self.d_a, self.d_b = d_a, d_b
        self.pair_keys = None if pair_keys is None else np.asarray(pair_keys, np.int64)
        if self.pair_keys is not None and np.any(np.diff(self.pair_keys) <= 0):
            raise ValueError("pair_keys must be sorted and unique")
        self.sum_xy = np.zeros((d_a, d_b) if pair_keys is None else len(self.pair_keys), np.float64)
        if self.pair_keys is not None:  # the candidates of each base feature i: pair_keys[ptr[i]:ptr[i+1]] (keys sorted by i, then j)
            self._cand_ptr = np.searchsorted(self.pair_keys // d_b, np.arange(d_a + 1))
            self._cand_j = self.pair_keys % d_b

    def update(self, a: SparseActs, b: SparseActs) -> None:
        import scipy.sparse as sp

        if len(a.token) == 0 or len(b.token) == 0:
            return
        if self.pair_keys is not None:
            self._update_candidates(a, b)
            return
        lo = min(a.token.min(), b.token.min())  # a batch's tokens are a short range of global indices
        ta, tb = a.token - lo, b.token - lo
        n = int(max(ta.max(), tb.max())) + 1

        def by_token(t, f, v, d):  # [n, d] CSR straight from entries sorted by (token, feature)
            if np.all(t[1:] >= t[:-1]):
                indptr = np.zeros(n + 1, np.int64)
                np.cumsum(np.bincount(t, minlength=n), out=indptr[1:])
                return sp.csr_matrix((v.astype(np.float64), f, indptr), shape=(n, d))
            return sp.csr_matrix((v.astype(np.float64), (t, f)), shape=(n, d))

        ma = by_token(ta, a.feature, a.value, self.d_a).T  # [d_a, n]
        mb = by_token(tb, b.feature, b.value, self.d_b)
        prod = (ma @ mb).tocsr()  # a product has no duplicate entries
        # flat index row * d_b + col, rows in order (the dense update walks sum_xy row by row)
        keys = np.repeat(np.arange(prod.shape[0], dtype=np.int64) * self.d_b, np.diff(prod.indptr)) + prod.indices
        self.sum_xy.reshape(-1)[keys] += prod.data

    def _update_candidates(self, a: SparseActs, b: SparseActs) -> None:
        """Candidate pairs only: each entry (t, i) of A is expanded over i's candidates j and
        looked up at (t, j) among B's entries. Work: nnz(A) x candidates per feature, where the
        all-pairs product costs tokens x L0_A x L0_B (at L0 64, 16M products per 4096-token batch,
        most of them for pairs that are not candidates; B7). For each pair the products are
        summed in token order, as the sparse product sums them."""
        d_b = self.d_b
        kb = b.token * d_b + b.feature  # sorted: (token, feature) order
        n_c = self._cand_ptr[a.feature + 1] - self._cand_ptr[a.feature]
        total = int(n_c.sum())
        if total == 0:
            return
        rep = np.repeat(np.arange(len(a.feature)), n_c)
        first = np.cumsum(n_c) - n_c
        pair = self._cand_ptr[a.feature][rep] + (np.arange(total) - first[rep])
        want = a.token[rep] * d_b + self._cand_j[pair]
        pos = np.searchsorted(kb, want)
        pos_ok = np.minimum(pos, len(kb) - 1)
        hit = kb[pos_ok] == want
        prod = a.value[rep[hit]].astype(np.float64) * b.value[pos_ok[hit]].astype(np.float64)
        self.sum_xy += np.bincount(pair[hit], weights=prod, minlength=len(self.pair_keys))

    def merge(self, other: "CrossProducts") -> None:
        self.sum_xy += other.sum_xy

    def correlation(self, fa: FeatureStats, fb: FeatureStats) -> np.ndarray:
        """Pearson per pair: a dense [d_a, d_b] matrix, or one value per candidate pair."""
        n = int(fa.n_tokens)
        if self.pair_keys is None:
            return pearson(n, fa.sum[:, None], fb.sum[None, :], fa.sumsq[:, None], fb.sumsq[None, :], self.sum_xy)
        i, j = self.pair_keys // self.d_b, self.pair_keys % self.d_b
        return pearson(n, fa.sum[i], fb.sum[j], fa.sumsq[i], fb.sumsq[j], self.sum_xy)


# ----------------------------------------------------------------------------------------------
# Residual-stream similarity (METHODS.md section 1)


class Moments(_Stateful):
    """n, mean, M2 (sum of squared deviations), min, max of scalar streams, for several metrics at once.

    Chan et al.'s pairwise update keeps the variance stable where sum(x^2)/n - mean^2 would cancel
    (cosines of 0.99996 +- 2e-5), and merges shards the same way.
    """

    FIELDS = ("n", "mean", "m2", "min", "max")

    def __init__(self, k: int):
        self.n = np.zeros(k, np.int64)
        self.mean = np.zeros(k, np.float64)
        self.m2 = np.zeros(k, np.float64)
        self.min = np.full(k, np.inf)
        self.max = np.full(k, -np.inf)

    def _combine(self, i, n_b: int, mean_b: float, m2_b: float) -> None:
        n_a = int(self.n[i])
        n = n_a + n_b
        delta = mean_b - self.mean[i]
        self.mean[i] += delta * n_b / n
        self.m2[i] += m2_b + delta * delta * n_a * n_b / n
        self.n[i] = n

    def update(self, i: int, values: np.ndarray) -> None:
        values = np.asarray(values, np.float64).ravel()
        if values.size == 0:
            return
        mean_b = values.mean()
        self._combine(i, values.size, mean_b, float(((values - mean_b) ** 2).sum()))
        self.min[i] = min(self.min[i], values.min())
        self.max[i] = max(self.max[i], values.max())

    def merge(self, other: "Moments") -> None:
        for i in range(len(self.n)):
            if other.n[i]:
                self._combine(i, int(other.n[i]), float(other.mean[i]), float(other.m2[i]))
        self.min = np.minimum(self.min, other.min)
        self.max = np.maximum(self.max, other.max)

    def finalize(self) -> dict[str, np.ndarray]:
        with np.errstate(invalid="ignore", divide="ignore"):
            var = np.where(self.n > 0, self.m2 / self.n, np.nan)
            mean = np.where(self.n > 0, self.mean, np.nan)
        return {"n": self.n, "mean": mean, "std": np.sqrt(var), "min": self.min, "max": self.max}


def fixed_hist(values: np.ndarray, low: float, high: float, n_bins: int) -> tuple[np.ndarray, int]:
    """Counts on n_bins equal bins of [low, high]; values outside are clipped into the end bins.

    Returns (counts, number clipped). The last bin includes `high` (numpy's convention).
    Non-finite values (NaN, inf from a broken model or SAE) are in no bin; they are counted in
    the returned number with the clipped ones (never silently binned as the lowest value).
    """
    values = np.asarray(values, np.float64).ravel()
    finite = np.isfinite(values)
    n_nonfinite = int((~finite).sum())
    values = values[finite] if n_nonfinite else values
    clipped = int(((values < low) | (values > high)).sum()) + n_nonfinite
    idx = np.floor((np.clip(values, low, high) - low) / (high - low) * n_bins).astype(np.int64)
    idx = np.clip(idx, 0, n_bins - 1)
    return np.bincount(idx, minlength=n_bins).astype(np.int64), clipped


RESID_METRIC_ORDER = ("cosine", "l2", "seq_mean_cosine", "seq_mean_l2")


class ResidStats(_Stateful):
    """Per-token cosine and L2 between x_base and x_finetuned: histograms, per position, per sequence."""

    FIELDS = ("hist", "clipped", "pos_n", "pos_cos", "pos_l2") + tuple(f"mom_{f}" for f in Moments.FIELDS)

    def __init__(self, context_size: int, l2_max: float, n_bins: int, cos_range=(-1.0, 1.0)):
        self.context_size, self.l2_max, self.n_bins, self.cos_range = context_size, float(l2_max), n_bins, cos_range
        self.hist = np.zeros((4, n_bins), np.int64)  # RESID_METRIC_ORDER
        self.clipped = np.zeros(4, np.int64)
        self.pos_n = np.zeros(context_size, np.int64)
        self.pos_cos = np.zeros(context_size, np.float64)
        self.pos_l2 = np.zeros(context_size, np.float64)
        self.moments = Moments(4)

    def range(self, i: int) -> tuple[float, float]:
        return self.cos_range if i in (0, 2) else (0.0, self.l2_max)

    def update(self, cos: np.ndarray, l2: np.ndarray) -> None:
        """cos, l2: [n_sequences_in_batch, context_size] (every token, BOS included)."""
        cos = np.asarray(cos, np.float64)
        l2 = np.asarray(l2, np.float64)
        series = (cos, l2, cos.mean(axis=1), l2.mean(axis=1))
        for i, values in enumerate(series):
            counts, clipped = fixed_hist(values, *self.range(i), self.n_bins)
            self.hist[i] += counts
            self.clipped[i] += clipped
            self.moments.update(i, values)
        self.pos_n += cos.shape[0]
        self.pos_cos += cos.sum(axis=0)
        self.pos_l2 += l2.sum(axis=0)

    def merge(self, other: "ResidStats") -> None:
        self.hist += other.hist
        self.clipped += other.clipped
        self.pos_n += other.pos_n
        self.pos_cos += other.pos_cos
        self.pos_l2 += other.pos_l2
        self.moments.merge(other.moments)

    def state(self) -> dict[str, np.ndarray]:
        out = {k: np.array(getattr(self, k), order="C", copy=True) for k in ("hist", "clipped", "pos_n", "pos_cos", "pos_l2")}
        out.update({f"mom_{k}": v for k, v in self.moments.state().items()})
        return out

    def load(self, state: dict[str, np.ndarray]) -> "ResidStats":
        for k in ("hist", "clipped", "pos_n", "pos_cos", "pos_l2"):
            setattr(self, k, state[k].copy())
        self.moments.load({k[4:]: v for k, v in state.items() if k.startswith("mom_")})
        return self


# ----------------------------------------------------------------------------------------------
# SAE quality per (sae, model), with and without outliers (METHODS.md section 2)

OUTLIER_VARIANTS = ("included", "excluded")
CE_KINDS = ("clean", "spliced", "zero_ablated")


class QualityStats(_Stateful):
    """L0, MSE, explained variance (per token and pooled), CE losses; variant 0 all counted tokens,
    variant 1 without outlier tokens.

    Explained variance follows SAELens's per-token formula (`explained_variance_legacy` in
    sae_lens.evals): 1 - ||x - x_hat||^2 / ||x - mean_batch(x)||^2, where the mean is over the
    batch's tokens of that variant; non-finite values are counted and left out of the mean.
    Pooled R^2 (Study T, torcheval R2Score on flattened activations) is 1 - SSE / SST with SST
    about the mean of all scalar elements. CE: `losses[kind]` is the next-token loss at each
    position but the last; position p counts when its input token counts (SAELens's convention).
    """

    FIELDS = (
        "n_tokens", "n_outliers", "sum_l0", "sum_sqerr", "sum_ev", "n_ev_nonfinite", "sum_elem", "sum_elem_sq", "n_elem",
        "ce_sum", "ce_n", "ce_nonfinite",
    )

    def __init__(self):
        v = len(OUTLIER_VARIANTS)
        self.n_tokens = np.zeros(v, np.int64)
        self.n_outliers = np.zeros((), np.int64)
        self.sum_l0 = np.zeros(v, np.float64)
        self.sum_sqerr = np.zeros(v, np.float64)
        self.sum_ev = np.zeros(v, np.float64)
        self.n_ev_nonfinite = np.zeros(v, np.int64)
        self.sum_elem = np.zeros(v, np.float64)
        self.sum_elem_sq = np.zeros(v, np.float64)
        self.n_elem = np.zeros(v, np.int64)
        self.ce_sum = np.zeros((len(CE_KINDS), v), np.float64)
        self.ce_n = np.zeros((len(CE_KINDS), v), np.int64)
        self.ce_nonfinite = np.zeros((len(CE_KINDS), v), np.int64)

    def update(
        self,
        x: np.ndarray,  # [T, d] activations at the hook (T = batch * context, flattened)
        x_hat: np.ndarray,  # [T, d] SAE reconstruction
        l0: np.ndarray,  # [T] active features per token
        counted: np.ndarray,  # [B, C] bool
        outlier: np.ndarray,  # [B, C] bool
        losses: dict[str, tuple[np.ndarray, np.ndarray]],  # kind -> (loss with variant 0, loss with variant 1), each [B, C-1]
    ) -> None:
        n_out = int((counted & outlier).sum())
        masks = (counted, counted & ~outlier)
        self.n_outliers += n_out
        x = x.astype(np.float64)
        sqerr = ((x - x_hat.astype(np.float64)) ** 2).sum(axis=1)
        done_x, done_ce = None, {}
        for v, mask2d in enumerate(masks):
            # Without outlier tokens both variants cover the same tokens: the sums are computed once.
            same = v == 1 and n_out == 0
            if same:
                dx = done_x
            else:
                m = mask2d.reshape(-1)
                xm = x[m]
                dx = None
                if xm.shape[0]:
                    var = ((xm - xm.mean(axis=0)) ** 2).sum(axis=1)
                    with np.errstate(invalid="ignore", divide="ignore"):
                        ev = 1.0 - sqerr[m] / var
                    finite = np.isfinite(ev)
                    dx = (float(l0[m].sum()), float(sqerr[m].sum()), float(ev[finite].sum()), int((~finite).sum()),
                          float(xm.sum()), float((xm * xm).sum()), xm.size)
                done_x = (int(m.sum()), dx)
                dx = done_x
            self.n_tokens[v] += dx[0]
            if dx[1] is not None:
                l0_sum, sq_sum, ev_sum, ev_bad, e_sum, e_sq, e_n = dx[1]
                self.sum_l0[v] += l0_sum
                self.sum_sqerr[v] += sq_sum
                self.sum_ev[v] += ev_sum
                self.n_ev_nonfinite[v] += ev_bad
                self.sum_elem[v] += e_sum
                self.sum_elem_sq[v] += e_sq
                self.n_elem[v] += e_n
            ce_mask = mask2d[:, :-1]
            for k, kind in enumerate(CE_KINDS):
                arr = losses[kind][v]
                if same and arr is losses[kind][0]:
                    dce = done_ce[kind]
                else:
                    loss = np.asarray(arr, np.float64)[ce_mask]
                    finite = np.isfinite(loss)
                    dce = done_ce[kind] = (float(loss[finite].sum()), int(finite.sum()), int((~finite).sum()))
                self.ce_sum[k, v] += dce[0]
                self.ce_n[k, v] += dce[1]
                self.ce_nonfinite[k, v] += dce[2]

    def merge(self, other: "QualityStats") -> None:
        for name in self.FIELDS:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def finalize(self) -> list[dict]:
        rows = []
        for v, variant in enumerate(OUTLIER_VARIANTS):
            n = int(self.n_tokens[v])
            with np.errstate(invalid="ignore", divide="ignore"):
                n_ev = n - int(self.n_ev_nonfinite[v])
                sse = self.sum_sqerr[v]
                ne = self.n_elem[v]
                sst = self.sum_elem_sq[v] - self.sum_elem[v] ** 2 / ne if ne else np.nan
                ce = {kind: self.ce_sum[k, v] / self.ce_n[k, v] if self.ce_n[k, v] else np.nan for k, kind in enumerate(CE_KINDS)}
            denom = ce["zero_ablated"] - ce["clean"]
            recovered = (ce["zero_ablated"] - ce["spliced"]) / denom if np.isfinite(denom) and abs(denom) >= 1e-4 else np.nan
            n_counted = int(self.n_tokens[0])
            rows.append(
                {
                    "outliers": variant,
                    "n_tokens": n,
                    "l0": self.sum_l0[v] / n if n else np.nan,
                    "mse": sse / n if n else np.nan,
                    "explained_variance": self.sum_ev[v] / n_ev if n_ev else np.nan,
                    "pooled_r2": 1.0 - sse / sst if ne and sst > 0 else np.nan,
                    "ce_clean": ce["clean"],
                    "ce_spliced": ce["spliced"],
                    "ce_zero_ablated": ce["zero_ablated"],
                    "ce_delta": ce["spliced"] - ce["clean"],
                    "ce_recovered": recovered,
                    "outlier_fraction": int(self.n_outliers) / n_counted if n_counted else np.nan,
                    "n_nonfinite_clean": int(self.ce_nonfinite[0, v]),
                    "n_nonfinite_spliced": int(self.ce_nonfinite[1, v]),
                    "n_nonfinite_zero_ablated": int(self.ce_nonfinite[2, v]),
                    "n_ev_nonfinite": int(self.n_ev_nonfinite[v]),
                }
            )
        return rows
