"""Mergeable accumulators: everything a run needs, kept without holding the activations.

Numpy, no model; the one exception is QualityStats' dense [tokens, d] reductions, which run in
torch on the activations' own device (precompute/hook_moments.py). Every accumulator has the same shape (STYLE.md, after sae_vis's
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
    """The positive feature activations of one (sae, model) batch, on the counted tokens only.

    Per source (METHODS.md section 9): `source` gives each entry's source code (0..S-1, the
    sequence's corpus label) and `n_by_source` the batch's counted tokens per source; both None
    for a single source (code 0)."""

    token: np.ndarray  # [nnz] int64 global token index, sorted (row-major order of [token, feature])
    feature: np.ndarray  # [nnz] int64
    value: np.ndarray  # [nnz] float32, > 0
    n_tokens: int  # counted tokens in the batch (the denominator of densities)
    source: np.ndarray | None = None  # [nnz] int64 source code of each entry's token
    n_by_source: np.ndarray | None = None  # [S] int64 counted tokens per source

    @staticmethod
    def from_dense(acts: np.ndarray, token_index: np.ndarray, counted: np.ndarray, source: np.ndarray | None = None, n_sources: int = 1) -> "SparseActs":
        """acts [T, d_sae]; token_index [T] global indices; counted [T] bool; source [T] codes. For tests and references."""
        acts = np.where(counted[:, None], acts, 0)
        t, f = np.nonzero(acts > 0)
        src = n_by = None
        if source is not None:
            src = np.asarray(source, np.int64)[t]
            n_by = np.bincount(np.asarray(source, np.int64)[counted], minlength=n_sources).astype(np.int64)
        return SparseActs(token_index[t].astype(np.int64), f.astype(np.int64), acts[t, f].astype(np.float32), int(counted.sum()), src, n_by)

    def keys(self, d: int, n_sources: int) -> np.ndarray:
        """source * d + feature per entry: the flat index into [S, d] per-source arrays."""
        if self.source is None or n_sources == 1:
            return self.feature
        return self.source * d + self.feature

    def tokens_by_source(self, n_sources: int) -> np.ndarray:
        if self.n_by_source is None or n_sources == 1:
            out = np.zeros(n_sources, np.int64)
            out[0] = self.n_tokens
            return out
        return np.asarray(self.n_by_source, np.int64)


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
    """Per feature: firing count, sum and sum of squares of the activation, per source (the
    pooled values are their sums over sources), the max per source (with several sources), and
    the pooled activation histogram."""

    FIELDS = ("src_n_tokens", "src_count", "src_sum", "src_sumsq", "src_max", "hist")

    def __init__(self, d_sae: int, edges: np.ndarray, n_sources: int = 1):
        self.d_sae, self.n_sources = d_sae, n_sources
        self.edges = np.asarray(edges, dtype=np.float64)
        self.n_bins = len(self.edges) - 1
        self.src_n_tokens = np.zeros(n_sources, np.int64)
        self.src_count = np.zeros((n_sources, d_sae), np.int64)
        self.src_sum = np.zeros((n_sources, d_sae), np.float64)
        self.src_sumsq = np.zeros((n_sources, d_sae), np.float64)
        # the max per source only with several sources (TopK holds the pooled max)
        self.src_max = np.zeros((n_sources if n_sources > 1 else 0, d_sae), np.float32)
        self.hist = np.zeros((d_sae, self.n_bins), np.int64)

    # pooled views
    @property
    def n_tokens(self) -> np.int64:
        return self.src_n_tokens.sum()

    @property
    def count(self) -> np.ndarray:
        return self.src_count[0] if self.n_sources == 1 else self.src_count.sum(0)

    @property
    def sum(self) -> np.ndarray:
        return self.src_sum[0] if self.n_sources == 1 else self.src_sum.sum(0)

    @property
    def sumsq(self) -> np.ndarray:
        return self.src_sumsq[0] if self.n_sources == 1 else self.src_sumsq.sum(0)

    def update(self, acts: SparseActs) -> None:
        S, d = self.n_sources, self.d_sae
        f, v = acts.feature, acts.value.astype(np.float64)
        k = acts.keys(d, S)
        self.src_n_tokens += acts.tokens_by_source(S)
        self.src_count += np.bincount(k, minlength=S * d).reshape(S, d)
        self.src_sum += np.bincount(k, weights=v, minlength=S * d).reshape(S, d)
        self.src_sumsq += np.bincount(k, weights=v * v, minlength=S * d).reshape(S, d)
        if S > 1 and len(k):
            np.maximum.at(self.src_max.reshape(-1), k, acts.value.astype(np.float32))
        b = hist_bins(v, self.edges)
        self.hist += np.bincount(f * self.n_bins + b, minlength=d * self.n_bins).reshape(d, self.n_bins)

    def merge(self, other: "FeatureStats") -> None:
        self.src_n_tokens += other.src_n_tokens
        self.src_count += other.src_count
        self.src_sum += other.src_sum
        self.src_sumsq += other.src_sumsq
        self.src_max = np.maximum(self.src_max, other.src_max)
        self.hist += other.hist

    def part(self, source: int | None) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
        """(n_tokens, count, sum, sumsq): pooled (source None) or of one source."""
        if source is None:
            return int(self.n_tokens), self.count, self.sum, self.sumsq
        return int(self.src_n_tokens[source]), self.src_count[source], self.src_sum[source], self.src_sumsq[source]

    def finalize(self, source: int | None = None) -> dict[str, np.ndarray]:
        n, count, total, _ = self.part(source)
        with np.errstate(invalid="ignore", divide="ignore"):
            out = {
                "count": count,
                "density": count / n if n else np.full(self.d_sae, np.nan),
                "mean_act": total / n if n else np.full(self.d_sae, np.nan),
                "mean_active_act": np.where(count > 0, total / np.maximum(count, 1), np.nan),
            }
        if source is not None and self.n_sources > 1:
            out["max_act"] = self.src_max[source].astype(np.float64)
        return out


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


def cofire_hits(base: SparseActs, finetuned: SparseActs, d: int) -> tuple[np.ndarray, np.ndarray]:
    """Entries where a feature fires on both models at the same token: (index into base's
    entries, index into finetuned's entries), in base's order."""
    kb = base.token * d + base.feature  # both sorted: SparseActs come in (token, feature) order
    kf = finetuned.token * d + finetuned.feature
    if np.any(np.diff(kb) <= 0) or np.any(np.diff(kf) <= 0):
        raise ValueError("SparseActs must be sorted by (token, feature) without duplicates")
    if len(kf) == 0 or len(kb) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    pos = np.minimum(np.searchsorted(kf, kb), len(kf) - 1)
    hit = kf[pos] == kb
    return np.nonzero(hit)[0], pos[hit]


class PairStats(_Stateful):
    """Per feature of one SAE, per source: sum f(x_base) f(x_finetuned), sum |log10(f_B+eps) -
    log10(f_F+eps)|, and the number of tokens where it fires on both models (`n_both`: with the
    firing counts, the paired discordant counts of METHODS.md section 8)."""

    FIELDS = ("src_sum_xy", "src_sum_log_err", "src_n_both")

    def __init__(self, d_sae: int, eps: float, n_sources: int = 1):
        self.d_sae, self.eps, self.n_sources = d_sae, eps, n_sources
        self.src_sum_xy = np.zeros((n_sources, d_sae), np.float64)
        self.src_sum_log_err = np.zeros((n_sources, d_sae), np.float64)
        self.src_n_both = np.zeros((n_sources, d_sae), np.int64)

    # pooled views (sums over sources)
    @property
    def sum_xy(self) -> np.ndarray:
        return self.src_sum_xy.sum(0)

    @property
    def sum_log_err(self) -> np.ndarray:
        return self.src_sum_log_err.sum(0)

    @property
    def n_both(self) -> np.ndarray:
        return self.src_n_both.sum(0)

    def update(self, base: SparseActs, finetuned: SparseActs, hits: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        d, eps, S = self.d_sae, self.eps, self.n_sources
        ib, jf = cofire_hits(base, finetuned, d) if hits is None else hits
        kb, kf = base.keys(d, S), finetuned.keys(d, S)
        vb, vf = base.value.astype(np.float64), finetuned.value.astype(np.float64)
        n = S * d
        self.src_sum_xy += np.bincount(kb[ib], weights=vb[ib] * vf[jf], minlength=n).reshape(S, d)
        self.src_n_both += np.bincount(kb[ib], minlength=n).reshape(S, d)
        # Where both are 0 the log error is exactly 0, so only firing entries contribute: each side's
        # entries as if the other were 0, corrected where both fire.
        log_eps = np.log10(eps)
        lb, lf = np.log10(vb + eps), np.log10(vf + eps)
        err = np.bincount(kb, weights=np.abs(lb - log_eps), minlength=n).astype(np.float64)  # int64 when empty
        err += np.bincount(kf, weights=np.abs(lf - log_eps), minlength=n)
        both = np.abs(lb[ib] - lf[jf]) - np.abs(lb[ib] - log_eps) - np.abs(lf[jf] - log_eps)
        err += np.bincount(kb[ib], weights=both, minlength=n)
        self.src_sum_log_err += err.reshape(S, d)

    def merge(self, other: "PairStats") -> None:
        self.src_sum_xy += other.src_sum_xy
        self.src_sum_log_err += other.src_sum_log_err
        self.src_n_both += other.src_n_both

    def finalize(self, base: FeatureStats, finetuned: FeatureStats, source: int | None = None) -> dict[str, np.ndarray]:
        """act_similarity, act_error, and the paired counts: n_both (fires on both at the same
        token), n_base_only (b), n_finetuned_only (c)."""
        n, cb, sb, qb = base.part(source)
        _, cf, sf, qf = finetuned.part(source)
        pick = (lambda a: a.sum(0)) if source is None else (lambda a: a[source])
        sxy, serr, both = pick(self.src_sum_xy), pick(self.src_sum_log_err), pick(self.src_n_both)
        sim = pearson(n, sb, sf, qb, qf, sxy)
        err = serr / n if n else np.full(self.d_sae, np.nan)
        return {"act_similarity": sim, "act_error": err, "n_both": both, "n_base_only": cb - both, "n_finetuned_only": cf - both}


class KLCorrStats(_Stateful):
    """Per feature of one SAE: the sums for the Pearson correlation over tokens of
    |f_i(x_finetuned) - f_i(x_base)| with the token's KL(base || finetuned) (METHODS.md section
    11), over the tokens whose KL is defined (`kl` finite: a next token exists and the token counts)."""

    FIELDS = ("n", "sum_k", "sum_kk", "sum_d", "sum_dd", "sum_dk")

    def __init__(self, d_sae: int):
        self.d_sae = d_sae
        self.n = np.zeros((), np.int64)
        self.sum_k = np.zeros((), np.float64)
        self.sum_kk = np.zeros((), np.float64)
        self.sum_d = np.zeros(d_sae, np.float64)
        self.sum_dd = np.zeros(d_sae, np.float64)
        self.sum_dk = np.zeros(d_sae, np.float64)

    def update(self, base: SparseActs, finetuned: SparseActs, kl: np.ndarray, token0: int, hits: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """kl: the batch's per-token KL, indexed by global token - token0 (NaN where undefined)."""
        d = self.d_sae
        ib, jf = cofire_hits(base, finetuned, d) if hits is None else hits
        kl = np.asarray(kl, np.float64)
        ok = np.isfinite(kl)
        self.n += int(ok.sum())
        self.sum_k += float(kl[ok].sum())
        self.sum_kk += float((kl[ok] ** 2).sum())
        kb, kf = kl[base.token - token0], kl[finetuned.token - token0]
        okb, okf = np.isfinite(kb), np.isfinite(kf)
        vb, vf = base.value.astype(np.float64), finetuned.value.astype(np.float64)
        # |delta| is v_b where only base fires, v_f where only finetuned fires, |v_b - v_f| where both
        wb, wf = np.where(okb, vb, 0.0), np.where(okf, vf, 0.0)
        kb0, kf0 = np.where(okb, kb, 0.0), np.where(okf, kf, 0.0)
        both_fix = np.where(okb[ib], np.abs(vb[ib] - vf[jf]) - vb[ib] - vf[jf], 0.0)
        self.sum_d += np.bincount(base.feature, weights=wb, minlength=d) + np.bincount(finetuned.feature, weights=wf, minlength=d)
        self.sum_d += np.bincount(base.feature[ib], weights=both_fix, minlength=d)
        self.sum_dd += np.bincount(base.feature, weights=wb * vb, minlength=d) + np.bincount(finetuned.feature, weights=wf * vf, minlength=d)
        self.sum_dd -= np.bincount(base.feature[ib], weights=np.where(okb[ib], 2 * vb[ib] * vf[jf], 0.0), minlength=d)
        self.sum_dk += np.bincount(base.feature, weights=wb * kb0, minlength=d) + np.bincount(finetuned.feature, weights=wf * kf0, minlength=d)
        self.sum_dk += np.bincount(base.feature[ib], weights=both_fix * kb0[ib], minlength=d)

    def merge(self, other: "KLCorrStats") -> None:
        for name in self.FIELDS:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def finalize(self) -> np.ndarray:
        return pearson(int(self.n), self.sum_d, float(self.sum_k), self.sum_dd, float(self.sum_kk), self.sum_dk)


class TokenStats(_Stateful):
    """Per token of the sample: KL(p_base || p_finetuned) of the next-token distributions and the
    loss difference loss_finetuned - loss_base on the true next token (METHODS.md section 11).

    [n_sequences, context_size] float32, NaN at the last position (no next token) and until a
    batch fills its rows; shards fill disjoint rows, and a merge takes the other's filled rows."""

    FIELDS = ("kl", "loss_diff", "filled")

    def __init__(self, n_sequences: int, context_size: int):
        self.kl = np.full((n_sequences, context_size), np.nan, np.float32)
        self.loss_diff = np.full((n_sequences, context_size), np.nan, np.float32)
        self.filled = np.zeros(n_sequences, bool)

    def update(self, seq_ids: np.ndarray, kl: np.ndarray, loss_diff: np.ndarray) -> None:
        """kl, loss_diff: [len(seq_ids), context_size - 1] (position p predicts token p + 1)."""
        c = kl.shape[1]
        self.kl[seq_ids, :c] = kl
        self.loss_diff[seq_ids, :c] = loss_diff
        self.filled[seq_ids] = True

    def merge(self, other: "TokenStats") -> None:
        rows = np.flatnonzero(other.filled)
        self.kl[rows] = other.kl[rows]
        self.loss_diff[rows] = other.loss_diff[rows]
        self.filled |= other.filled


# ----------------------------------------------------------------------------------------------
# Two SAEs: activation cross-products for matching


class CrossProducts(_Stateful):
    """For pairs (i of SAE A, j of SAE A'): sum over tokens of f_i(A, x) * f_j(A', y), and the
    number of tokens where both fire (`n_both`), for all pairs (dense d_a x d_b) or given
    candidate pairs. x and y are the activations each SAE encodes (its own model's, or the same
    model's for a seed twin).

    Candidate pairs are given as sorted keys i * d_b + j.
    """

    FIELDS = ("sum_xy", "n_both")

    def __init__(self, d_a: int, d_b: int, pair_keys: np.ndarray | None = None):
        self.d_a, self.d_b = d_a, d_b
        self.pair_keys = None if pair_keys is None else np.asarray(pair_keys, np.int64)
        if self.pair_keys is not None and np.any(np.diff(self.pair_keys) <= 0):
            raise ValueError("pair_keys must be sorted and unique")
        shape = (d_a, d_b) if pair_keys is None else len(self.pair_keys)
        self.sum_xy = np.zeros(shape, np.float64)
        self.n_both = np.zeros(shape, np.int64)
        if self.pair_keys is not None:  # the candidates of each base feature i: pair_keys[ptr[i]:ptr[i+1]] (keys sorted by i, then j)
            self._cand_ptr = np.searchsorted(self.pair_keys // d_b, np.arange(d_a + 1))
            self._cand_j = self.pair_keys % d_b
            self._tables = None  # (pad_pair, pad_j, extra_start, extra_count): built at the first update

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
                return sp.csr_matrix((v, f, indptr), shape=(n, d))
            return sp.csr_matrix((v, (t, f)), shape=(n, d))

        ma = by_token(ta, a.feature, a.value.astype(np.float64), self.d_a).T  # [d_a, n]
        mb = by_token(tb, b.feature, b.value.astype(np.float64), self.d_b)
        for field, prod in (("sum_xy", (ma @ mb).tocsr()), ("n_both", (ma.astype(bool).astype(np.int64) @ mb.astype(bool).astype(np.int64)).tocsr())):
            self._add(getattr(self, field), prod)

    def _add(self, target: np.ndarray, prod) -> None:
        # flat index row * d_b + col, rows in order (the dense update walks the matrix row by row)
        keys = np.repeat(np.arange(prod.shape[0], dtype=np.int64) * self.d_b, np.diff(prod.indptr)) + prod.indices
        target.reshape(-1)[keys] += prod.data  # all pairs (candidate pairs: _update_candidates)

    # The candidate lookup's chunk: a token range whose membership map (tokens x d_b bytes) fits in cache.
    MAP_BYTES = 1 << 22

    def _candidate_tables(self):
        """Each base feature's candidates padded to K slots (K: the 99th percentile of the counts, so
        that a hub with many candidates does not pad every row): pad_pair [d_a, K] (the pair's index
        into pair_keys, -1 in padding) and pad_j [d_a, K] (its j), int32; the candidates beyond
        slot K of the few larger rows: extra_start [d_a] (index of the row's first extra pair) and
        extra_count [d_a]."""
        ptr, d_a = self._cand_ptr, self.d_a
        cnt = np.diff(ptr)
        k = max(1, int(np.ceil(np.quantile(cnt, 0.99)))) if d_a else 1
        n = len(self.pair_keys)
        row = np.repeat(np.arange(d_a, dtype=np.int64), cnt)
        slot = np.arange(n, dtype=np.int64) - ptr[:-1][row]
        inside = slot < k
        pad_pair = np.full((d_a, k), -1, np.int32 if n < 2**31 else np.int64)
        pad_j = np.zeros((d_a, k), np.int32 if self.d_b < 2**31 else np.int64)
        pad_pair[row[inside], slot[inside]] = np.flatnonzero(inside)
        pad_j[row[inside], slot[inside]] = self._cand_j[inside]
        return pad_pair, pad_j, ptr[:-1] + k, np.maximum(cnt - k, 0)

    def _update_candidates(self, a: SparseActs, b: SparseActs) -> None:
        """Candidate pairs only: each entry (t, i) of A is expanded over i's candidates j and
        looked up at (t, j) among B's entries. Work: nnz(A) x candidates per feature, where the
        all-pairs product costs tokens x L0_A x L0_B (at L0 64, 16M products per 4096-token batch,
        most of them for pairs that are not candidates; B7).

        In chunks of tokens whose (token, j) membership map of B's entries is a few MB: the
        expansion is one gather of the padded candidate table per chunk ([entries, K]), membership
        one gather from the map, and only the hits are searched for B's value. Per pair the products
        are summed in token order, as the sparse product sums them (and the whole-batch expansion
        did: the same float64 sums, bitwise)."""
        if self._tables is None:
            self._tables = self._candidate_tables()
        pad_pair, pad_j, extra_start, extra_count = self._tables
        k = pad_pair.shape[1]
        d_b = self.d_b
        kb = b.token * d_b + b.feature
        if np.any(a.token[1:] < a.token[:-1]) or np.any(kb[1:] <= kb[:-1]):
            raise ValueError("SparseActs must be sorted by (token, feature) without duplicates")
        span = max(1, self.MAP_BYTES // d_b)  # tokens per chunk
        t_lo = int(min(a.token[0], b.token[0]))
        edges = np.arange(t_lo, int(a.token[-1]) + span + 1, span, dtype=np.int64)
        a_cut = np.searchsorted(a.token, edges)
        b_cut = np.searchsorted(kb, edges * d_b)
        present = np.zeros(span * d_b, bool)
        pairs, prods = [], []
        for c in np.flatnonzero((a_cut[1:] > a_cut[:-1]) & (b_cut[1:] > b_cut[:-1])):  # chunks with entries on both sides
            a0, a1, b0, b1 = a_cut[c], a_cut[c + 1], b_cut[c], b_cut[c + 1]
            base = int(edges[c]) * d_b
            sub = kb[b0:b1] - base  # B's entries in the chunk, as offsets into the map
            present[sub] = True
            fa = a.feature[a0:a1]
            off = (a.token[a0:a1] * d_b - base)[:, None]
            want = pad_j[fa] + off  # [n, K] int64 offsets of (t, j)
            pair = pad_pair[fa]
            hit = present[want]
            hit &= pair >= 0
            at = np.flatnonzero(hit)
            w = want.reshape(-1)[at]
            hit_pair = pair.reshape(-1)[at].astype(np.int64)
            hit_row = a0 + at // k
            extra = np.flatnonzero(extra_count[fa])
            if len(extra):  # the candidates beyond slot K of a few rows (their pairs are in no padded slot)
                n_x = extra_count[fa[extra]]
                rep = np.repeat(extra, n_x)
                first = np.cumsum(n_x) - n_x
                x_pair = extra_start[fa[extra]][np.repeat(np.arange(len(extra)), n_x)] + (np.arange(int(n_x.sum())) - np.repeat(first, n_x))
                x_want = off[rep, 0] + self._cand_j[x_pair]
                x_hit = np.flatnonzero(present[x_want])
                w = np.concatenate([w, x_want[x_hit]])
                hit_pair = np.concatenate([hit_pair, x_pair[x_hit]])
                hit_row = np.concatenate([hit_row, a0 + rep[x_hit]])
            pos = b0 + np.searchsorted(sub, w)
            present[sub] = False
            pairs.append(hit_pair)
            prods.append(a.value[hit_row].astype(np.float64) * b.value[pos].astype(np.float64))
        if not pairs:
            return
        # chunks in token order, and within a chunk each pair's hits in entry (token) order
        pair, prod = np.concatenate(pairs), np.concatenate(prods)
        self.sum_xy += np.bincount(pair, weights=prod, minlength=len(self.pair_keys))
        self.n_both += np.bincount(pair, minlength=len(self.pair_keys)).astype(np.int64)

    def merge(self, other: "CrossProducts") -> None:
        self.sum_xy += other.sum_xy
        self.n_both += other.n_both

    def _sides(self, fa: FeatureStats, fb: FeatureStats):
        if self.pair_keys is None:
            return (slice(None), None), (None, slice(None))
        return self.pair_keys // self.d_b, self.pair_keys % self.d_b

    def correlation(self, fa: FeatureStats, fb: FeatureStats) -> np.ndarray:
        """Pearson over all counted tokens per pair: a dense [d_a, d_b] matrix, or one value per candidate pair."""
        n = int(fa.n_tokens)
        i, j = self._sides(fa, fb)
        return pearson(n, fa.sum[i], fb.sum[j], fa.sumsq[i], fb.sumsq[j], self.sum_xy)

    def cofire_correlation(self, fa: FeatureStats, fb: FeatureStats) -> np.ndarray:
        """Pearson per pair over the tokens where either feature fires (their union: count_i +
        count_j - n_both tokens). Off both firing sets both activations are 0, so the sums over
        the union are the sums over all tokens; only n changes."""
        i, j = self._sides(fa, fb)
        n_union = fa.count[i] + fb.count[j] - self.n_both
        return pearson(n_union, fa.sum[i], fb.sum[j], fa.sumsq[i], fb.sumsq[j], self.sum_xy)


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
    """L0, MSE, explained variance (both of sae_lens's definitions), pooled R^2 and CE losses, per
    source; variant 0 all counted tokens, variant 1 without outlier tokens.

    Explained variance under the names sae_lens 6.54 gives them (sae_lens.evals):
      * `explained_variance` (its current definition, `ExplainedVarianceCalculator`):
        1 - E_t ||x - x_hat||^2 / (E_t ||x||^2 - ||E_t x||^2), one ratio pooled over every
        counted token of the variant, sums in float64; independent of the batch size.
      * `explained_variance_legacy` (its old formula): the mean over tokens of
        1 - ||x - x_hat||^2 / ||x - mean_batch(x)||^2, the mean over the batch's tokens of that
        variant (per source: the batch's tokens of that source); depends on the batch size.
        Non-finite values are counted and left out of the mean.
    Pooled R^2 (Study T, torcheval R2Score on flattened activations) is 1 - SSE / SST with SST
    about the mean of all scalar elements. CE: `losses[kind]` is the next-token loss at each
    position but the last; position p counts when its input token counts (SAELens's convention).

    Per source: every sum has a leading source axis [S, ...]; the pooled values are the sums over
    sources, except the legacy explained variance, whose batch mean differs per source (kept
    pooled in `pooled_sum_ev`).
    """

    FIELDS = (
        "n_tokens", "n_outliers", "sum_l0", "sum_sqerr", "sum_ev", "n_ev_nonfinite", "sum_x", "sum_elem", "sum_elem_sq", "n_elem",
        "ce_sum", "ce_n", "ce_nonfinite", "pooled_sum_ev", "pooled_n_ev_nonfinite",
    )

    def __init__(self, d_in: int, n_sources: int = 1):
        v, S, K = len(OUTLIER_VARIANTS), n_sources, len(CE_KINDS)
        self.d_in, self.n_sources = d_in, n_sources
        self.n_tokens = np.zeros((S, v), np.int64)
        self.n_outliers = np.zeros(S, np.int64)
        self.sum_l0 = np.zeros((S, v), np.float64)
        self.sum_sqerr = np.zeros((S, v), np.float64)
        self.sum_ev = np.zeros((S, v), np.float64)
        self.n_ev_nonfinite = np.zeros((S, v), np.int64)
        self.sum_x = np.zeros((S, v, d_in), np.float64)
        self.sum_elem = np.zeros((S, v), np.float64)
        self.sum_elem_sq = np.zeros((S, v), np.float64)
        self.n_elem = np.zeros((S, v), np.int64)
        self.ce_sum = np.zeros((S, K, v), np.float64)
        self.ce_n = np.zeros((S, K, v), np.int64)
        self.ce_nonfinite = np.zeros((S, K, v), np.int64)
        self.pooled_sum_ev = np.zeros(v, np.float64)
        self.pooled_n_ev_nonfinite = np.zeros(v, np.int64)

    @staticmethod
    def _legacy_ev(var: np.ndarray, sqerr: np.ndarray) -> tuple[float, int]:
        """(sum of the finite per-token legacy explained variances, number non-finite) of one
        batch's tokens, from each token's squared distance from their mean (`var`)."""
        if var.shape[0] == 0:
            return 0.0, 0
        with np.errstate(invalid="ignore", divide="ignore"):
            ev = 1.0 - sqerr / var
        finite = np.isfinite(ev)
        return float(ev[finite].sum()), int((~finite).sum())

    def update(
        self,
        x,  # [T, d] activations at the hook (T = batch * context, flattened): numpy or a torch tensor on any device; None with `moments`
        x_hat,  # [T, d] SAE reconstruction, likewise
        l0: np.ndarray,  # [T] active features per token
        counted: np.ndarray,  # [B, C] bool
        outlier: np.ndarray,  # [B, C] bool
        losses: dict[str, tuple[np.ndarray, np.ndarray]] | None,  # kind -> (loss with variant 0, loss with variant 1), each [B, C-1]; None: no CE on this batch
        source: np.ndarray | None = None,  # [B, C] int source code of each token (None: all 0)
        moments=None,  # precompute.hook_moments.HookMoments of (x, counted, outlier, source), shared by the SAEs of one model
    ) -> None:
        from precompute.hook_moments import HookMoments

        S = self.n_sources
        mo = moments if moments is not None else HookMoments(x, counted, outlier, source, S)
        src2d = mo.src2d
        sqerr = mo.sqerr(x_hat)
        masks = (counted, counted & ~outlier)
        self.n_outliers += np.bincount(src2d[counted & outlier], minlength=S)
        bc = lambda idx, w=None: np.bincount(idx, weights=w, minlength=S)  # noqa: E731
        inc: dict[str, np.ndarray] = {}
        ce_inc: dict[str, tuple] = {}
        for v, mask2d in enumerate(masks):
            # Without outlier tokens both variants cover the same tokens: the sums are computed once.
            same = v == 1 and mo.n_out == 0
            if not same:
                inc = self._increments(mo, mo.variants[v], sqerr, l0)
            for name in ("n_tokens", "sum_l0", "sum_sqerr", "sum_elem", "sum_elem_sq", "n_elem", "sum_ev", "n_ev_nonfinite"):
                getattr(self, name)[:, v] += inc[name]
            self.sum_x[:, v] += inc["sum_x"]
            self.pooled_sum_ev[v] += inc["pooled_sum_ev"]
            self.pooled_n_ev_nonfinite[v] += inc["pooled_n_ev_nonfinite"]
            if losses is None:  # a batch without CE ([evals] ce_every): the CE sums are left as they are
                continue
            ce_mask = mask2d[:, :-1]
            ce_src = src2d[:, :-1][ce_mask]
            for k, kind in enumerate(CE_KINDS):
                arr = losses[kind][v]
                if not (same and arr is losses[kind][0]):
                    loss = np.asarray(arr, np.float64)[ce_mask]
                    finite = np.isfinite(loss)
                    ce_inc[kind] = (bc(ce_src[finite], loss[finite]), bc(ce_src[finite]), bc(ce_src[~finite]))
                d_sum, d_n, d_bad = ce_inc[kind]
                self.ce_sum[:, k, v] += d_sum
                self.ce_n[:, k, v] += d_n
                self.ce_nonfinite[:, k, v] += d_bad

    def _increments(self, mo, vm, sqerr: np.ndarray, l0: np.ndarray) -> dict:
        """One variant's additions from one batch: per-source sums over its tokens `vm.m` (their sources `vm.sm`)."""
        S = self.n_sources
        bc = lambda idx, w=None: np.bincount(idx, weights=w, minlength=S)  # noqa: E731
        m, sm = vm.m, vm.sm
        em = sqerr[m]
        inc = {
            "n_tokens": bc(sm), "sum_l0": bc(sm, np.asarray(l0)[m].astype(np.float64)), "sum_sqerr": bc(sm, em),
            "sum_elem": bc(sm, mo.xsum[m]), "sum_elem_sq": bc(sm, mo.xsq[m]), "n_elem": bc(sm) * mo.d_in,
            "sum_x": np.zeros((S, mo.d_in)), "sum_ev": np.zeros(S), "n_ev_nonfinite": np.zeros(S, np.int64),
        }
        inc["pooled_sum_ev"], inc["pooled_n_ev_nonfinite"] = self._legacy_ev(vm.var, em)
        for s_, (sel, sum_x, var) in enumerate(vm.per_source):
            if var is None:
                continue
            inc["sum_x"][s_] = sum_x
            inc["sum_ev"][s_], inc["n_ev_nonfinite"][s_] = self._legacy_ev(var, em[sel]) if S > 1 else (inc["pooled_sum_ev"], inc["pooled_n_ev_nonfinite"])
        return inc

    def merge(self, other: "QualityStats") -> None:
        for name in self.FIELDS:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def finalize(self, source: int | None = None) -> list[dict]:
        """One row per outlier variant, pooled (source None) or of one source."""
        if source is None:
            pick = lambda a: a.sum(axis=0)  # noqa: E731
            ev_sum, ev_bad = self.pooled_sum_ev, self.pooled_n_ev_nonfinite
        else:
            pick = lambda a: a[source]  # noqa: E731
            ev_sum, ev_bad = self.sum_ev[source], self.n_ev_nonfinite[source]
        n_tokens, sum_l0, sum_sqerr, sum_x = pick(self.n_tokens), pick(self.sum_l0), pick(self.sum_sqerr), pick(self.sum_x)
        sum_elem, sum_elem_sq, n_elem = pick(self.sum_elem), pick(self.sum_elem_sq), pick(self.n_elem)
        ce_sum, ce_n, ce_bad = pick(self.ce_sum), pick(self.ce_n), pick(self.ce_nonfinite)
        n_outliers = int(pick(self.n_outliers))
        rows = []
        for v, variant in enumerate(OUTLIER_VARIANTS):
            n = int(n_tokens[v])
            with np.errstate(invalid="ignore", divide="ignore"):
                n_ev = n - int(ev_bad[v])
                sse = sum_sqerr[v]
                ne = n_elem[v]
                sst = sum_elem_sq[v] - sum_elem[v] ** 2 / ne if ne else np.nan
                ce = {kind: ce_sum[k, v] / ce_n[k, v] if ce_n[k, v] else np.nan for k, kind in enumerate(CE_KINDS)}
            denom = ce["zero_ablated"] - ce["clean"]
            recovered = (ce["zero_ablated"] - ce["spliced"]) / denom if np.isfinite(denom) and abs(denom) >= 1e-4 else np.nan
            n_counted = int(n_tokens[0])
            rows.append(
                {
                    "outliers": variant,
                    "n_tokens": n,
                    "l0": sum_l0[v] / n if n else np.nan,
                    "mse": sse / n if n else np.nan,
                    "explained_variance": pooled_explained_variance(n, sse, sum_elem_sq[v], sum_x[v]),
                    "explained_variance_legacy": ev_sum[v] / n_ev if n_ev else np.nan,
                    "pooled_r2": 1.0 - sse / sst if ne and sst > 0 else np.nan,
                    "ce_clean": ce["clean"],
                    "ce_spliced": ce["spliced"],
                    "ce_zero_ablated": ce["zero_ablated"],
                    "ce_delta": ce["spliced"] - ce["clean"],
                    "ce_recovered": recovered,
                    "outlier_fraction": n_outliers / n_counted if n_counted else np.nan,
                    "n_nonfinite_clean": int(ce_bad[0, v]),
                    "n_nonfinite_spliced": int(ce_bad[1, v]),
                    "n_nonfinite_zero_ablated": int(ce_bad[2, v]),
                    "n_ev_nonfinite": int(ev_bad[v]),
                }
            )
        return rows


def pooled_explained_variance(n: int, sse: float, sum_sq_norm: float, sum_x: np.ndarray) -> float:
    """sae_lens 6.54's `explained_variance` (ExplainedVarianceCalculator.compute) from the sums:
    1 - (SSE / n) / (sum ||x||^2 / n - ||sum x / n||^2); 1.0 (perfect) or 0.0 when the total
    variance is below 1e-10, as sae_lens returns; NaN without tokens."""
    if n == 0:
        return float("nan")
    total_variance = sum_sq_norm / n - float(((np.asarray(sum_x, np.float64) / n) ** 2).sum())
    mse = sse / n
    if total_variance < 1e-10:
        return 1.0 if mse < 1e-10 else 0.0
    return 1.0 - mse / total_variance
