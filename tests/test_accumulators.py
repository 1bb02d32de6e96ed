"""Unit tests of precompute/accumulators.py: each against a naive numpy recomputation over all
the data at once, merge against one pass, and state round-trips through safetensors.

No model is loaded here (the tests on real activations are in test_precompute.py).
"""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from explorer import schema
from precompute.accumulators import (
    CrossProducts,
    FeatureStats,
    PairStats,
    QualityStats,
    QuantileSample,
    ResidStats,
    SparseActs,
    TopK,
    fixed_hist,
    hist_bins,
    pearson,
    priority,
)

D = 12
CTX = 8


def _batches(n_batches=4, seqs_per_batch=3, d=D, seed=0, ties=False, density=0.3):
    """Random sparse activations of two 'models' (correlated) on the same tokens, in batches."""
    rng = np.random.default_rng(seed)
    out = []
    for b in range(n_batches):
        seq_ids = np.arange(b * seqs_per_batch, (b + 1) * seqs_per_batch)
        t = len(seq_ids) * CTX
        gidx = (seq_ids[:, None] * CTX + np.arange(CTX)).reshape(-1)
        base = rng.exponential(1.0, (t, d)) * (rng.random((t, d)) < density)
        fin = np.where(rng.random((t, d)) < 0.8, base * rng.uniform(0.5, 1.5, (t, d)), rng.exponential(1.0, (t, d)) * (rng.random((t, d)) < 0.1))
        if ties:
            base = np.round(base, 1)
            fin = np.round(fin, 1)
        base[:, 0] = 0.0  # a dead feature
        fin[:, 1] = 0.0  # a feature that dies
        base[:, 2] = np.where(base[:, 2] > 0, 0.5, 0)  # constant when firing (not a constant series)
        counted = rng.random(t) > 0.1
        counted[:: CTX] = False  # BOS
        out.append((gidx, base.astype(np.float32), fin.astype(np.float32), counted))
    return out


def _all(batches):
    g = np.concatenate([b[0] for b in batches])
    c = np.concatenate([b[3] for b in batches])
    base = np.concatenate([b[1] for b in batches])[c]
    fin = np.concatenate([b[2] for b in batches])[c]
    return g[c], base.astype(np.float64), fin.astype(np.float64)


def _roundtrip(acc, tmp_path, fresh):
    path = tmp_path / "state.safetensors"
    save_file(acc.state(), str(path))
    return fresh.load(load_file(str(path)))


# ----------------------------------------------------------------------------------------------


def test_feature_stats_match_naive_and_merge(tmp_path):
    batches = _batches()
    one = FeatureStats(D, schema.ACT_HIST_EDGES)
    halves = [FeatureStats(D, schema.ACT_HIST_EDGES), FeatureStats(D, schema.ACT_HIST_EDGES)]
    for i, (g, base, _, c) in enumerate(batches):
        sa = SparseActs.from_dense(base, g, c)
        one.update(sa)
        halves[i % 2].update(sa)
    _, acts, _ = _all(batches)
    n = acts.shape[0]
    assert int(one.n_tokens) == n
    np.testing.assert_array_equal(one.count, (acts > 0).sum(0))
    np.testing.assert_allclose(one.sum, acts.sum(0), rtol=1e-12)
    np.testing.assert_allclose(one.sumsq, (acts**2).sum(0), rtol=1e-12)
    fin = one.finalize()
    np.testing.assert_allclose(fin["density"], (acts > 0).mean(0))
    np.testing.assert_allclose(fin["mean_act"], acts.mean(0))
    with np.errstate(invalid="ignore"):
        np.testing.assert_allclose(fin["mean_active_act"], acts.sum(0) / (acts > 0).sum(0))
    assert np.isnan(fin["mean_active_act"][0])  # dead feature
    # Histogram: for each feature, count positive activations in [e_i, e_i+1) by plain comparisons.
    e = schema.ACT_HIST_EDGES
    for f in range(D):
        pos = acts[:, f][acts[:, f] > 0]
        naive = np.array([((pos >= e[i]) & (pos < e[i + 1])).sum() for i in range(len(e) - 1)])
        naive[0] += (pos < e[0]).sum()
        naive[-1] += (pos >= e[-1]).sum()
        np.testing.assert_array_equal(one.hist[f], naive)
    halves[1].merge(halves[0])  # merge order does not matter
    for name in FeatureStats.FIELDS:
        np.testing.assert_allclose(getattr(halves[1], name), getattr(one, name), rtol=1e-12)
    back = _roundtrip(one, tmp_path, FeatureStats(D, schema.ACT_HIST_EDGES))
    for name in FeatureStats.FIELDS:
        np.testing.assert_array_equal(getattr(back, name), getattr(one, name))


def test_hist_bins_edges():
    e = np.array([1.0, 2.0, 4.0])
    np.testing.assert_array_equal(hist_bins(np.array([0.5, 1.0, 1.99, 2.0, 4.0, 9.0]), e), [0, 0, 0, 1, 1, 1])


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("k", [1, 5])  # k=1: batches exceed 2*k*d entries, so the pre-reduction runs
def test_topk_matches_naive_with_tie_break_and_merges_exactly(tmp_path, ties, k):
    batches = _batches(n_batches=5, ties=ties)
    one = TopK(D, k)
    parts = [TopK(D, k) for _ in range(3)]
    for i, (g, base, _, c) in enumerate(batches):
        sa = SparseActs.from_dense(base, g, c)
        one.update(sa)
        parts[i % 3].update(sa)
    g_all, acts, _ = _all(batches)
    for f in range(D):
        entries = sorted(((-acts[t, f], int(g_all[t])) for t in range(len(g_all)) if acts[t, f] > 0))[:k]
        got = [(float(v), int(t)) for v, t in zip(one.value[f], one.token[f]) if t >= 0]
        assert got == [(-v, t) for v, t in entries]  # float32 values are exact in float64
        if entries:
            assert one.max()[f] == pytest.approx(-entries[0][0], rel=1e-6)
        else:
            assert one.max()[f] == 0
    # merge in a different order than the stream: exact equality
    merged = parts[2]
    merged.merge(parts[0])
    merged.merge(parts[1])
    np.testing.assert_array_equal(merged.token, one.token)
    np.testing.assert_array_equal(merged.value, one.value)
    back = _roundtrip(one, tmp_path, TopK(D, k))
    np.testing.assert_array_equal(back.token, one.token)


def test_topk_update_does_not_depend_on_entry_order():
    """Entries in token order take a one-key sort; any other order the three-key sort: same rows."""
    rng = np.random.default_rng(3)
    for trial in range(40):
        d, k = int(rng.integers(1, 15)), int(rng.integers(1, 6))
        a, b = TopK(d, k), TopK(d, k)
        for batch in range(3):
            dense = np.round(rng.random((30, d)) * (rng.random((30, d)) < 0.5), 1).astype(np.float32)
            t, f = np.nonzero(dense > 0)
            g, v = t.astype(np.int64) + 30 * batch, dense[t, f]
            a.update(SparseActs(g, f.astype(np.int64), v, 30))
            perm = rng.permutation(len(g))
            b.update(SparseActs(g[perm], f[perm].astype(np.int64), v[perm], 30))
            np.testing.assert_array_equal(a.token, b.token)
            np.testing.assert_array_equal(a.value, b.value)


def test_topk_ties_prefer_smaller_token_index():
    acc = TopK(1, 2)
    acc.update(SparseActs(np.array([9, 3]), np.array([0, 0]), np.array([1.0, 1.0], np.float32), 2))
    acc.update(SparseActs(np.array([1]), np.array([0]), np.array([1.0], np.float32), 1))
    assert acc.token[0].tolist() == [1, 3]


def test_priority_is_deterministic_distinct_and_seeded():
    tok = np.repeat(np.arange(2000), 8)
    feat = np.tile(np.arange(8), 2000)
    p = priority(0, tok, feat)
    assert p.dtype == np.int64 and (p >= 0).all()
    assert len(np.unique(p)) == len(p)
    np.testing.assert_array_equal(p, priority(0, tok, feat))
    assert (p != priority(1, tok, feat)).mean() > 0.99
    # roughly uniform on [0, 2^63): a bijective mix of distinct keys
    u = p / 2.0**63
    assert abs(u.mean() - 0.5) < 0.02 and abs((u < 0.1).mean() - 0.1) < 0.02


def _naive_quantile(g_all, acts, f, size, seed, n_bins, n_per):
    rows = [t for t in range(len(g_all)) if acts[t, f] > 0]
    pri = {t: int(priority(seed, np.array([g_all[t]]), np.array([f]))[0]) for t in rows}
    sample = sorted(rows, key=lambda t: (pri[t], g_all[t]))[:size]
    by_act = sorted(sample, key=lambda t: (np.float32(acts[t, f]), g_all[t]))
    m = len(by_act)
    if m == 0:
        return []
    n_eff = max(1, min(n_bins, m // n_per))
    out = []
    # equal-count split as numpy.array_split defines it: the first m % n_eff bins get one more
    sizes = [m // n_eff + (1 if i < m % n_eff else 0) for i in range(n_eff)]
    start = 0
    for b, sz in enumerate(sizes):
        chunk = by_act[start : start + sz]
        start += sz
        picks = sorted(chunk, key=lambda t: (pri[t], g_all[t]))[:n_per]
        out += [(b, r, int(g_all[t])) for r, t in enumerate(picks)]
    return out


def test_quantile_sample_matches_naive_and_merges_exactly(tmp_path):
    size, n_bins, n_per, seed = 9, 3, 2, 7
    batches = _batches(n_batches=6)
    one = QuantileSample(D, size, seed)
    parts = [QuantileSample(D, size, seed), QuantileSample(D, size, seed)]
    for i, (g, base, _, c) in enumerate(batches):
        sa = SparseActs.from_dense(base, g, c)
        one.update(sa)
        parts[i % 2].update(sa)
    g_all, acts, _ = _all(batches)
    q = one.finalize(n_bins, n_per)
    for f in range(D):
        got = [(int(b), int(r), int(t)) for ff, b, r, t in zip(q.feature, q.bin, q.rank, q.token) if ff == f]
        assert got == _naive_quantile(g_all, acts, f, size, seed, n_bins, n_per), f
    # the sample of a feature that fired on >= size tokens is the `size` smallest priorities
    parts[1].merge(parts[0])
    np.testing.assert_array_equal(parts[1].token, one.token)
    np.testing.assert_array_equal(parts[1].priority, one.priority)
    back = _roundtrip(one, tmp_path, QuantileSample(D, size, seed))
    np.testing.assert_array_equal(back.priority, one.priority)


def test_quantile_insert_equals_full_reselection_with_priority_ties():
    """`update` merges new entries into the sorted rows (only rows that got entries); it must give
    exactly the rows of a full re-selection (`_select`), also when priorities tie (then the
    smaller token wins) and when one batch brings more than `size` entries for a feature."""
    rng = np.random.default_rng(5)
    for trial in range(60):
        d, size = int(rng.integers(1, 20)), int(rng.integers(1, 10))
        inc, full = QuantileSample(d, size, 0), QuantileSample(d, size, 0)
        for batch in range(4):
            m = int(rng.integers(0, 60))
            f = rng.integers(0, d, m).astype(np.int64)
            p = rng.integers(0, 6 if trial % 2 else 1 << 40, m).astype(np.int64)
            g = (rng.permutation(1000)[:m] + 1000 * batch).astype(np.int64)
            v = rng.random(m).astype(np.float32)
            keep = p < full.priority[f, size - 1]
            if keep.any():
                inc._insert(f[keep], p[keep], g[keep], v[keep])
                full._select(*(np.concatenate([x, y]) for x, y in zip(full._entries(), (f[keep], p[keep], g[keep], v[keep]))))
            for name in QuantileSample.FIELDS:
                np.testing.assert_array_equal(getattr(inc, name), getattr(full, name))


def test_quantile_bins_are_full_when_the_feature_fires_enough():
    rng = np.random.default_rng(1)
    t = 4000
    vals = rng.exponential(1.0, t).astype(np.float32)
    acc = QuantileSample(1, 150, 0)
    acc.update(SparseActs(np.arange(t), np.zeros(t, np.int64), vals, t))
    q = acc.finalize(10, 5)
    assert len(q.feature) == 50
    assert sorted(set(q.bin.tolist())) == list(range(10))
    # bins are ordered by activation: every example of bin b is <= every example of bin b+1
    for b in range(9):
        assert q.value[q.bin == b].max() <= q.value[q.bin == b + 1].min()
        assert q.bin_high[q.bin == b][0] <= q.bin_low[q.bin == b + 1][0]


def test_pair_stats_match_corrcoef_and_log_error(tmp_path):
    eps = 1e-10
    batches = _batches()
    one = PairStats(D, eps)
    fs = {"b": FeatureStats(D, schema.ACT_HIST_EDGES), "f": FeatureStats(D, schema.ACT_HIST_EDGES)}
    parts = [PairStats(D, eps), PairStats(D, eps)]
    for i, (g, base, fin, c) in enumerate(batches):
        sb, sf = SparseActs.from_dense(base, g, c), SparseActs.from_dense(fin, g, c)
        one.update(sb, sf)
        parts[i % 2].update(sb, sf)
        fs["b"].update(sb)
        fs["f"].update(sf)
    _, a, b = _all(batches)
    res = one.finalize(fs["b"], fs["f"])
    for f in range(D):
        if a[:, f].std() == 0 or b[:, f].std() == 0:
            assert np.isnan(res["act_similarity"][f])
        else:
            assert res["act_similarity"][f] == pytest.approx(np.corrcoef(a[:, f], b[:, f])[0, 1], abs=1e-10)
    naive_err = np.abs(np.log10(a.astype(np.float32).astype(np.float64) + eps) - np.log10(b.astype(np.float32).astype(np.float64) + eps)).mean(0)
    np.testing.assert_allclose(res["act_error"], naive_err, rtol=1e-10, atol=1e-12)
    assert np.isnan(res["act_similarity"][0]) and np.isnan(res["act_similarity"][1])
    parts[0].merge(parts[1])
    np.testing.assert_allclose(parts[0].sum_xy, one.sum_xy, rtol=1e-12)
    back = _roundtrip(one, tmp_path, PairStats(D, eps))
    np.testing.assert_array_equal(back.sum_log_err, one.sum_log_err)


def test_pearson_nan_when_constant():
    x = np.array([[1.0, 1, 1, 1], [1, 1, 0, 0], [0, 3, 1, 2]])
    y = np.array([[0.0, 1, 2, 3], [2, 2, 0, 0], [5, 1, 0, 0.5]])
    r = pearson(4, x.sum(1), y.sum(1), (x * x).sum(1), (y * y).sum(1), (x * y).sum(1))
    assert np.isnan(r[0])  # x constant: variance 0, kept as NaN
    assert r[1] == pytest.approx(1.0)
    assert r[2] == pytest.approx(np.corrcoef(x[2], y[2])[0, 1])


def test_cross_products_dense_and_candidates_match_naive(tmp_path):
    batches = _batches(d=D)
    rng = np.random.default_rng(3)
    d_b = 7
    dense = CrossProducts(D, d_b)
    keys = np.unique(rng.integers(0, D * d_b, 30))
    cand = CrossProducts(D, d_b, keys)
    fa, fb = FeatureStats(D, schema.ACT_HIST_EDGES), FeatureStats(d_b, schema.ACT_HIST_EDGES)
    for g, base, fin, c in batches:
        sa, sb = SparseActs.from_dense(base, g, c), SparseActs.from_dense(fin[:, :d_b], g, c)
        dense.update(sa, sb)
        cand.update(sa, sb)
        fa.update(sa)
        fb.update(sb)
    _, a, b = _all(batches)
    b = b[:, :d_b]
    np.testing.assert_allclose(dense.sum_xy, a.T @ b, rtol=1e-12, atol=1e-12)
    i, j = keys // d_b, keys % d_b
    np.testing.assert_allclose(cand.sum_xy, (a.T @ b)[i, j], rtol=1e-12, atol=1e-12)
    corr = dense.correlation(fa, fb)
    with np.errstate(invalid="ignore", divide="ignore"):
        naive = np.corrcoef(a.T, b.T)[:D, D:]
    np.testing.assert_allclose(corr, naive, atol=1e-10)  # NaN in the same places
    np.testing.assert_allclose(cand.correlation(fa, fb), naive[i, j], atol=1e-10)
    back = _roundtrip(dense, tmp_path, CrossProducts(D, d_b))
    np.testing.assert_array_equal(back.sum_xy, dense.sum_xy)


@pytest.mark.parametrize("map_bytes", [1, 3 * 9, 1 << 22])
def test_candidate_cross_products_in_chunks_with_a_hub_match_naive(map_bytes):
    """The candidate lookup in chunks of tokens (MAP_BYTES: one token per chunk, three, or the whole
    batch) with a hub feature whose candidates overflow the padded table (every B feature): sums and
    co-firing counts against the dense product; any chunking gives bitwise the same sums (each
    pair's products are added in token order)."""
    d_a = 150  # enough rows that the hub is above the 99th percentile of the candidate counts
    batches = _batches(n_batches=3, seqs_per_batch=4, d=d_a, seed=5, density=0.2)
    d_b = 9
    rng = np.random.default_rng(1)
    keys = np.union1d(np.unique(rng.integers(0, d_a * d_b, 300)), 4 * d_b + np.arange(d_b))  # feature 4: a hub
    cand, whole = CrossProducts(d_a, d_b, keys), CrossProducts(d_a, d_b, keys)
    cand.MAP_BYTES, whole.MAP_BYTES = map_bytes, 1 << 30
    for g, base, fin, c in batches:
        sa, sb = SparseActs.from_dense(base, g, c), SparseActs.from_dense(fin[:, :d_b], g, c)
        cand.update(sa, sb)
        whole.update(sa, sb)
    assert cand._tables[3][4] > 0  # the hub took the overflow path
    _, a, b = _all(batches)
    b = b[:, :d_b]
    i, j = keys // d_b, keys % d_b
    np.testing.assert_allclose(cand.sum_xy, (a.T @ b)[i, j], rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(cand.n_both, ((a > 0).astype(int).T @ (b > 0).astype(int))[i, j])
    np.testing.assert_array_equal(cand.sum_xy, whole.sum_xy)
    with pytest.raises(ValueError, match="sorted"):
        sa = SparseActs.from_dense(batches[0][1], batches[0][0], batches[0][3])
        cand.update(SparseActs(sa.token[::-1].copy(), sa.feature[::-1].copy(), sa.value, sa.n_tokens), sb)


def test_resid_stats_match_numpy(tmp_path):
    rng = np.random.default_rng(0)
    l2_max = 3.0
    one = ResidStats(CTX, l2_max, 10)
    parts = [ResidStats(CTX, l2_max, 10), ResidStats(CTX, l2_max, 10)]
    cos_all, l2_all = [], []
    for i in range(5):
        cos = np.clip(rng.normal(0.8, 0.3, (3, CTX)), -1, 1)
        cos[0, 0] = 1.0  # the right edge belongs to the last bin
        l2 = rng.exponential(1.0, (3, CTX))
        l2[1, 2] = 5.0  # above the range: clipped into the last bin
        one.update(cos, l2)
        parts[i % 2].update(cos, l2)
        cos_all.append(cos)
        l2_all.append(l2)
    cos, l2 = np.concatenate(cos_all), np.concatenate(l2_all)
    np.testing.assert_array_equal(one.hist[0], np.histogram(cos, bins=10, range=(-1, 1))[0])
    np.testing.assert_array_equal(one.hist[1], np.histogram(np.clip(l2, 0, l2_max), bins=10, range=(0, l2_max))[0])
    np.testing.assert_array_equal(one.hist[2], np.histogram(cos.mean(1), bins=10, range=(-1, 1))[0])
    assert one.clipped[1] == (l2 > l2_max).sum() >= 5
    np.testing.assert_allclose(one.pos_cos / one.pos_n, cos.mean(0))
    np.testing.assert_allclose(one.pos_l2 / one.pos_n, l2.mean(0))
    mom = one.moments.finalize()
    for i, v in enumerate((cos, l2, cos.mean(1), l2.mean(1))):
        assert mom["mean"][i] == pytest.approx(v.mean())
        assert mom["std"][i] == pytest.approx(v.std())
        assert (mom["min"][i], mom["max"][i], mom["n"][i]) == (v.min(), v.max(), v.size)
    parts[0].merge(parts[1])
    np.testing.assert_array_equal(parts[0].hist, one.hist)
    np.testing.assert_allclose(parts[0].moments.mean, one.moments.mean, rtol=1e-14)
    np.testing.assert_allclose(parts[0].moments.m2, one.moments.m2, rtol=1e-12)
    back = _roundtrip(one, tmp_path, ResidStats(CTX, l2_max, 10))
    np.testing.assert_array_equal(back.moments.max, one.moments.max)


def test_fixed_hist_counts_clipped():
    counts, clipped = fixed_hist(np.array([-2.0, 0.0, 0.5, 1.0, 7.0]), 0.0, 1.0, 2)
    assert counts.tolist() == [2, 3] and clipped == 2


def test_quality_stats_match_naive_formulas(tmp_path):
    rng = np.random.default_rng(0)
    b, c, d = 3, CTX, 5
    one = QualityStats(d)
    parts = [QualityStats(d), QualityStats(d)]
    rec = []
    for i in range(4):
        x = rng.normal(0, 1, (b * c, d)).astype(np.float32)
        x[3] *= 20  # an outlier
        x_hat = (x + rng.normal(0, 0.3, x.shape)).astype(np.float32)
        l0 = rng.integers(0, 6, b * c)
        counted = np.ones((b, c), bool)
        counted[:, 0] = False
        outlier = (np.linalg.norm(x, axis=1) > 10).reshape(b, c)
        losses = {k: (rng.exponential(2, (b, c - 1)), rng.exponential(2, (b, c - 1))) for k in ("clean", "spliced", "zero_ablated")}
        if i == 1:
            losses["spliced"][0][0, 3] = np.inf  # non-finite: counted, left out of the mean
        for acc in (one, parts[i % 2]):
            acc.update(x, x_hat, l0, counted, outlier, losses)
        rec.append((x.astype(np.float64), x_hat.astype(np.float64), l0, counted, outlier, losses))
    rows = one.finalize()
    for v, row in enumerate(rows):
        ev, sse, n, l0s, xs, ce = [], 0.0, 0, 0.0, [], {k: [] for k in ("clean", "spliced", "zero_ablated")}
        n_nonfinite = 0
        for x, x_hat, l0, counted, outlier, losses in rec:
            m2 = counted if v == 0 else counted & ~outlier
            m = m2.reshape(-1)
            xm, hm = x[m], x_hat[m]
            err = ((xm - hm) ** 2).sum(1)
            ev += list(1 - err / ((xm - xm.mean(0)) ** 2).sum(1))
            sse += err.sum()
            n += m.sum()
            l0s += l0[m].sum()
            xs.append(xm)
            for k in ce:
                vals = losses[k][v][m2[:, :-1]]
                n_nonfinite += int((~np.isfinite(vals)).sum()) if k == "spliced" else 0
                ce[k] += list(vals[np.isfinite(vals)])
        xa = np.concatenate(xs)
        assert row["n_tokens"] == n
        assert row["l0"] == pytest.approx(l0s / n)
        assert row["mse"] == pytest.approx(sse / n)
        assert row["explained_variance_legacy"] == pytest.approx(np.mean(ev))
        assert row["pooled_r2"] == pytest.approx(1 - sse / ((xa - xa.mean()) ** 2).sum())
        means = {k: np.mean(vals) for k, vals in ce.items()}
        assert row["ce_clean"] == pytest.approx(means["clean"])
        assert row["ce_spliced"] == pytest.approx(means["spliced"])
        assert row["ce_recovered"] == pytest.approx((means["zero_ablated"] - means["spliced"]) / (means["zero_ablated"] - means["clean"]))
        assert row["n_nonfinite_spliced"] == n_nonfinite
    assert rows[0]["n_nonfinite_spliced"] == 1 and rows[0]["n_tokens"] > rows[1]["n_tokens"]
    assert rows[0]["outlier_fraction"] == pytest.approx(4 / (4 * 3 * (CTX - 1)))
    parts[0].merge(parts[1])
    for name in QualityStats.FIELDS:
        np.testing.assert_allclose(getattr(parts[0], name), getattr(one, name), rtol=1e-12)
    back = _roundtrip(one, tmp_path, QualityStats(d))
    assert back.finalize() == rows


def test_quality_stats_without_outliers_fill_both_variants_alike():
    rng = np.random.default_rng(2)
    acc = QualityStats(4)
    x = rng.normal(0, 1, (2 * CTX, 4)).astype(np.float32)
    counted = np.ones((2, CTX), bool)
    counted[:, 0] = False
    loss = rng.exponential(2, (2, CTX - 1))
    other = rng.exponential(2, (2, CTX - 1))
    acc.update(x, x * 0.9, rng.integers(0, 5, 2 * CTX), counted, np.zeros((2, CTX), bool),
               {"clean": (loss, loss), "spliced": (loss, other), "zero_ablated": (loss, loss)})
    inc, exc = acc.finalize()
    for k in ("n_tokens", "l0", "mse", "explained_variance", "explained_variance_legacy", "pooled_r2", "ce_clean", "ce_zero_ablated"):
        assert inc[k] == exc[k], k
    assert inc["ce_spliced"] == pytest.approx(loss[counted[:, :-1]].mean())
    assert exc["ce_spliced"] == pytest.approx(other[counted[:, :-1]].mean())


def test_ce_recovered_guard():
    acc = QualityStats(3)
    x = np.ones((2, 3), np.float32)
    same = np.full((1, 1), 2.0)
    acc.update(x, x, np.ones(2), np.ones((1, 2), bool), np.zeros((1, 2), bool), {k: (same, same) for k in ("clean", "spliced", "zero_ablated")})
    assert np.isnan(acc.finalize()[0]["ce_recovered"])  # |zero - clean| < 1e-4


def test_moments_are_stable_for_nearly_constant_values():
    from precompute.accumulators import Moments

    rng = np.random.default_rng(0)
    chunks = [0.99996 + 2e-5 * rng.standard_normal(rng.integers(1, 500)) for _ in range(40)]
    one, a, b = Moments(1), Moments(1), Moments(1)
    for i, c in enumerate(chunks):
        one.update(0, c)
        (a if i % 3 else b).update(0, c)
    b.merge(a)
    v = np.concatenate(chunks)
    for acc in (one, b):
        fin = acc.finalize()
        assert fin["std"][0] == pytest.approx(v.std(), rel=1e-9)
        assert fin["mean"][0] == pytest.approx(v.mean(), rel=1e-14)


def test_hist_bins_log_edges_match_binary_search():
    """The log10-guess path for log-spaced edges gives searchsorted's bins, at and around every
    edge, outside the range, and for 0, negative, NaN and infinite values."""
    from explorer import schema

    edges = np.asarray(schema.ACT_HIST_EDGES, np.float64)
    rng = np.random.default_rng(0)
    e32 = edges.astype(np.float32)
    values = np.concatenate([
        10 ** rng.uniform(-5, 5, 5000), e32, np.nextafter(e32, np.float32(0)), np.nextafter(e32, np.float32(np.inf)),
        [0.0, -1.0, np.nan, np.inf, -np.inf, 1e-30, 1e30],
    ]).astype(np.float32)
    want = np.clip(np.searchsorted(edges, values.astype(np.float64), side="right") - 1, 0, len(edges) - 2)
    np.testing.assert_array_equal(hist_bins(values, edges), want)
    lin = np.linspace(0.0, 1.0, 11)  # not log-spaced: the binary search
    np.testing.assert_array_equal(hist_bins(np.linspace(-0.5, 1.5, 200), lin),
                                  np.clip(np.searchsorted(lin, np.linspace(-0.5, 1.5, 200), side="right") - 1, 0, 9))
