"""Unit tests (no model) of the statistics of issue 12: the paired significance test against
scipy's exact binomial test, Benjamini-Hochberg against scipy, the change classes and the
detection floor on hand-made counts, the log density ratio; the per-source, co-firing, KL and
cross-product accumulators against naive numpy; the baseline's AUC and curves."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from explorer import schema
from precompute import significance as sig
from precompute.accumulators import CrossProducts, FeatureStats, KLCorrStats, PairStats, QualityStats, SparseActs, TokenStats, cofire_hits, pooled_explained_variance
from precompute.baseline import auc, below, random_pair_keys

# ---------------------------------------------------------------------------------------- significance

HAND = [(3, 0), (0, 3), (40, 0), (0, 0), (5, 5), (10, 2), (2, 10), (1, 0), (7, 8), (200, 150), (1000, 0), (12, 13)]


@pytest.mark.parametrize("b,c", HAND)
def test_mcnemar_equals_scipy_exact_binomial_test(b, c):
    from scipy.stats import binomtest

    got = float(sig.mcnemar_p(np.array([b]), np.array([c]))[0])
    want = 1.0 if b + c == 0 else binomtest(c, b + c, 0.5, alternative="two-sided").pvalue
    assert got == pytest.approx(want, rel=1e-12, abs=1e-300)


def test_mcnemar_reference_values_of_the_methods():
    p = sig.mcnemar_p(np.array([3, 40]), np.array([0, 0]))
    assert p[0] == 0.25  # 3 firings on base, none on the finetune: too rare to tell
    assert p[1] == pytest.approx(1.8189894035458565e-12, rel=1e-12)  # 40 firings: p ~ 2e-12


def test_bh_equals_scipy_false_discovery_control():
    from scipy.stats import false_discovery_control

    rng = np.random.default_rng(0)
    p = np.concatenate([rng.uniform(0, 1, 200), rng.uniform(0, 1e-4, 30), [1.0, 1.0, 0.0]])
    mask = rng.uniform(size=len(p)) > 0.2
    q = sig.bh_q(p, mask)
    np.testing.assert_allclose(q[mask], false_discovery_control(p[mask], method="bh"), rtol=1e-12)
    assert np.isnan(q[~mask]).all()
    # hand case: m = 4, p = (0.01, 0.04, 0.03, 0.2) -> q = (0.04, 0.0533.., 0.0533.., 0.2)
    np.testing.assert_allclose(sig.bh_q(np.array([0.01, 0.04, 0.03, 0.2])), [0.04, 0.04 * 4 / 3, 0.04 * 4 / 3, 0.2])


def test_change_classes_on_hand_made_counts():
    #            died   rare   rarer  commoner woke  both_dead  flat   rare-woke
    cb = np.array([40,   3,     500,   100,     0,    0,         300,   0])
    cf = np.array([0,    0,     100,   500,     60,   0,         310,   2])
    both = np.array([0,  0,     90,    90,      0,    0,         290,   0])
    b, c = cb - both, cf - both
    p = sig.mcnemar_p(b, c)
    q = sig.bh_q(p, (cb > 0) | (cf > 0))
    got = sig.change_class(cb, cf, b, c, q).tolist()
    assert got == ["died", "too_rare_to_tell", "rarer", "commoner", "woke", "both_dead", "no_significant_change", "too_rare_to_tell"]
    assert set(got) <= set(schema.CHANGE_CLASSES)


def test_detection_floor_is_the_smallest_count_that_can_reach_the_cutoff():
    # nothing else significant: BH accepts nothing, the cutoff is alpha / m; with m = 100 that is 1e-4
    p = np.ones(100)
    floor = sig.detection_floor(p, np.ones(100, bool))
    assert 2 * 0.5**floor <= 1e-4 < 2 * 0.5 ** (floor - 1)
    assert floor == 15
    # with many strong discoveries the cutoff rises and the floor drops
    p = np.concatenate([np.full(50, 1e-9), np.ones(50)])
    cut = sig.bh_cutoff(p, np.ones(100, bool))
    assert cut == 1e-9
    p = np.concatenate([np.full(99, 1e-3), [1.0]])
    assert sig.bh_cutoff(p, np.ones(100, bool)) == 1e-3
    assert sig.detection_floor(p, np.ones(100, bool)) == 11  # 2 / 2**11 < 1e-3 < 2 / 2**10
    # a count at the floor with c = 0 is called died when the others make the same cutoff
    n = sig.detection_floor(p, np.ones(100, bool))
    pf = sig.mcnemar_p(np.array([n, n - 1]), np.array([0, 0]))
    assert pf[0] <= 1e-3 < pf[1]


def test_log_density_ratio_and_its_interval():
    est, lo, hi = sig.log_density_ratio(np.array([40, 0, 100]), np.array([0, 0, 400]), 1000, 1000)
    np.testing.assert_allclose(est, np.log10([0.5 / 40.5, 1.0, 400.5 / 100.5]))
    half = 1.959963984540054 * np.sqrt(1 / np.array([0.5, 0.5, 400.5]) + 1 / np.array([40.5, 0.5, 100.5])) / np.log(10)
    np.testing.assert_allclose(hi - est, half)
    np.testing.assert_allclose(est - lo, half)
    assert lo[2] > 0 and hi[0] < 0 and lo[1] < 0 < hi[1]


# ---------------------------------------------------------------------------------------- accumulators

D, S, CTX = 6, 2, 10


def _batches(n_batches=4, d=D, seed=0):
    """Dense activations of two models for a few batches of tokens with sources and a KL per token."""
    rng = np.random.default_rng(seed)
    out = []
    g0 = 0
    for _ in range(n_batches):
        t = 3 * CTX
        base = np.where(rng.uniform(size=(t, d)) < 0.3, rng.exponential(1.0, (t, d)), 0.0).astype(np.float32)
        fin = np.where(rng.uniform(size=(t, d)) < 0.3, base + rng.normal(0, 0.3, (t, d)), 0.0).clip(0).astype(np.float32)
        fin[:, 0] = 0  # feature 0 dies on the finetune
        base[:, 1] = 0  # feature 1 wakes
        counted = rng.uniform(size=t) > 0.1
        src = np.repeat(rng.integers(0, S, 3), CTX)  # one source per sequence
        kl = rng.exponential(0.1, t)
        kl[CTX - 1 :: CTX] = np.nan  # last positions: no next token
        kl[~counted] = np.nan
        g = g0 + np.arange(t)
        g0 += t
        out.append((g, base.astype(np.float64), fin.astype(np.float64), counted, src, kl))
    return out


def _sparse(acts, g, counted, src):
    return SparseActs.from_dense(acts, g, counted, src, S)


def test_feature_and_pair_stats_per_source_match_naive(tmp_path):
    batches = _batches()
    fb, ff = FeatureStats(D, schema.ACT_HIST_EDGES, S), FeatureStats(D, schema.ACT_HIST_EDGES, S)
    pair, parts = PairStats(D, 1e-10, S), [PairStats(D, 1e-10, S), PairStats(D, 1e-10, S)]
    for i, (g, base, fin, counted, src, _) in enumerate(batches):
        sb, sf = _sparse(base, g, counted, src), _sparse(fin, g, counted, src)
        fb.update(sb)
        ff.update(sf)
        pair.update(sb, sf)
        parts[i % 2].update(sb, sf, cofire_hits(sb, sf, D))
    base = np.concatenate([b[1] for b in batches])
    fin = np.concatenate([b[2] for b in batches])
    counted = np.concatenate([b[3] for b in batches])
    src = np.concatenate([b[4] for b in batches])
    for s in (None, 0, 1):
        m = counted if s is None else counted & (src == s)
        a, f = base[m], fin[m]
        res = fb.finalize(s)
        np.testing.assert_array_equal(res["count"], (a > 0).sum(0))
        np.testing.assert_allclose(res["density"], (a > 0).mean(0))
        if s is not None:
            np.testing.assert_allclose(res["max_act"], a.max(0))
        pr = pair.finalize(fb, ff, s)
        both = ((a > 0) & (f > 0)).sum(0)
        np.testing.assert_array_equal(pr["n_both"], both)
        np.testing.assert_array_equal(pr["n_base_only"], ((a > 0) & ~(f > 0)).sum(0))
        np.testing.assert_array_equal(pr["n_finetuned_only"], (~(a > 0) & (f > 0)).sum(0))
        for j in range(D):
            if a[:, j].std() > 0 and f[:, j].std() > 0:
                assert pr["act_similarity"][j] == pytest.approx(np.corrcoef(a[:, j], f[:, j])[0, 1], abs=1e-10)
            else:
                assert np.isnan(pr["act_similarity"][j])
    # the pooled views equal the sums over sources; merging shards gives the same sums
    np.testing.assert_array_equal(fb.count, fb.src_count.sum(0))
    assert int(fb.n_tokens) == counted.sum()
    parts[0].merge(parts[1])
    for name in PairStats.FIELDS:
        np.testing.assert_allclose(getattr(parts[0], name), getattr(pair, name), rtol=1e-12)
    path = tmp_path / "s.safetensors"
    save_file(fb.state(), str(path))
    back = FeatureStats(D, schema.ACT_HIST_EDGES, S).load(load_file(str(path)))
    np.testing.assert_array_equal(back.src_max, fb.src_max)


def test_kl_corr_stats_match_naive():
    batches = _batches(d=D)
    acc, parts = KLCorrStats(D), [KLCorrStats(D), KLCorrStats(D)]
    for i, (g, base, fin, counted, src, kl) in enumerate(batches):
        sb, sf = _sparse(base, g, counted, src), _sparse(fin, g, counted, src)
        acc.update(sb, sf, kl, int(g[0]))
        parts[i % 2].update(sb, sf, kl, int(g[0]))
    base = np.concatenate([b[1] for b in batches])
    fin = np.concatenate([b[2] for b in batches])
    counted = np.concatenate([b[3] for b in batches])
    kl = np.concatenate([b[5] for b in batches])
    ok = np.isfinite(kl)
    delta = np.abs(np.where(counted[:, None], fin, 0) - np.where(counted[:, None], base, 0))[ok]
    got = acc.finalize()
    for j in range(D):
        want = np.corrcoef(delta[:, j], kl[ok])[0, 1] if delta[:, j].std() > 0 else np.nan
        np.testing.assert_allclose(got[j], want, atol=1e-10)
    parts[0].merge(parts[1])
    np.testing.assert_allclose(parts[0].finalize(), got, atol=1e-12)


def test_cross_products_count_cofiring_and_correlate_on_the_union():
    batches = _batches(d=D)
    d_b = 4
    dense = CrossProducts(D, d_b)
    keys = np.array([0 * d_b + 1, 2 * d_b + 3, 5 * d_b + 0])
    cand = CrossProducts(D, d_b, keys)
    fa, fb = FeatureStats(D, schema.ACT_HIST_EDGES), FeatureStats(d_b, schema.ACT_HIST_EDGES)
    for g, base, fin, counted, _, _ in batches:
        sa, sb = SparseActs.from_dense(base, g, counted), SparseActs.from_dense(fin[:, :d_b], g, counted)
        for acc in (dense, cand):
            acc.update(sa, sb)
        fa.update(sa)
        fb.update(sb)
    counted = np.concatenate([b[3] for b in batches])
    a = np.concatenate([b[1] for b in batches])[counted]
    b = np.concatenate([b[2] for b in batches])[counted][:, :d_b]
    np.testing.assert_array_equal(dense.n_both, (a > 0).astype(int).T @ (b > 0).astype(int))
    cof = dense.cofire_correlation(fa, fb)
    for i in range(D):
        for j in range(d_b):
            u = (a[:, i] > 0) | (b[:, j] > 0)
            if u.sum() > 1 and a[u, i].std() > 0 and b[u, j].std() > 0:
                assert cof[i, j] == pytest.approx(np.corrcoef(a[u, i], b[u, j])[0, 1], abs=1e-10)
            else:
                assert np.isnan(cof[i, j])
    np.testing.assert_allclose(cand.cofire_correlation(fa, fb), cof[keys // d_b, keys % d_b], atol=1e-12)
    np.testing.assert_array_equal(cand.n_both, dense.n_both[keys // d_b, keys % d_b])


def test_token_stats_fill_rows_and_merge_shards():
    one, a, b = TokenStats(4, 5), TokenStats(4, 5), TokenStats(4, 5)
    kl = np.arange(16, dtype=np.float32).reshape(4, 4)
    diff = -kl
    one.update(np.arange(4), kl, diff)
    a.update(np.arange(2), kl[:2], diff[:2])
    b.update(np.arange(2, 4), kl[2:], diff[2:])
    a.merge(b)
    np.testing.assert_array_equal(a.kl, one.kl)
    np.testing.assert_array_equal(a.loss_diff[:, :4], diff)
    assert np.isnan(a.kl[:, 4]).all() and a.filled.all()


def test_quality_stats_per_source_and_the_pooled_explained_variance():
    """Each source's rows equal the metrics computed on that source's tokens alone (the legacy
    explained variance with the batch mean of that source's tokens); the pooled rows are sae_lens's
    ExplainedVarianceCalculator over all tokens."""
    import torch
    from sae_lens.evals import ExplainedVarianceCalculator

    rng = np.random.default_rng(4)
    b, c, d = 4, CTX, 3
    acc = QualityStats(d, S)
    calc = {s: ExplainedVarianceCalculator() for s in (None, 0, 1)}
    rec = []
    for _ in range(3):
        x = (rng.normal(0, 1, (b * c, d)) + 3).astype(np.float32)
        x_hat = (x + rng.normal(0, 0.4, x.shape)).astype(np.float32)
        counted = rng.uniform(size=(b, c)) > 0.1
        src = np.repeat(rng.integers(0, S, b)[:, None], c, axis=1)
        losses = {k: (rng.exponential(2, (b, c - 1)),) * 2 for k in ("clean", "spliced", "zero_ablated")}
        acc.update(x, x_hat, rng.integers(0, 5, b * c), counted, np.zeros((b, c), bool), losses, src)
        for s, calc_s in calc.items():
            m = (counted if s is None else counted & (src == s)).reshape(-1)
            calc_s.add_batch(torch.from_numpy(x_hat[m]).double(), torch.from_numpy(x[m]).double())
        rec.append((x.astype(np.float64), x_hat.astype(np.float64), counted, src, losses))
    for s in (None, 0, 1):
        row = acc.finalize(s)[0]
        assert row["explained_variance"] == pytest.approx(calc[s].compute(), abs=1e-12)
        evs, ce = [], []
        for x, x_hat, counted, src, losses in rec:
            m = (counted if s is None else counted & (src == s)).reshape(-1)
            xm, hm = x[m], x_hat[m]
            if len(xm):
                evs += list(1 - ((xm - hm) ** 2).sum(1) / ((xm - xm.mean(0)) ** 2).sum(1))
            cm = (counted if s is None else counted & (src == s))[:, :-1]
            ce += list(losses["clean"][0][cm])
        assert row["explained_variance_legacy"] == pytest.approx(np.mean(evs), rel=1e-12)
        assert row["ce_clean"] == pytest.approx(np.mean(ce), rel=1e-12)
    assert pooled_explained_variance(0, 0.0, 0.0, np.zeros(3)) != pooled_explained_variance(0, 0.0, 0.0, np.zeros(3))  # NaN
    assert pooled_explained_variance(5, 0.0, 5.0, np.full(1, 5.0)) == 1.0  # no variance, no error: sae_lens says 1


# ---------------------------------------------------------------------------------------- baseline


def test_auc_equals_the_pairwise_definition():
    rng = np.random.default_rng(1)
    pos, neg = np.round(rng.normal(1, 1, 50), 1), np.round(rng.normal(0, 1, 70), 1)  # rounded: ties
    want = np.mean([(p > neg).mean() + 0.5 * (p == neg).mean() for p in pos])
    assert auc(pos, neg) == pytest.approx(want, abs=1e-12)
    assert auc(np.array([1.0, 2.0]), np.array([0.0])) == 1.0 and np.isnan(auc(np.array([]), neg))


def test_below_counts_alive_features_under_each_threshold():
    scores = np.array([0.1, 0.5, np.nan, 0.9, 0.3])
    alive = np.array([True, True, True, True, False])
    np.testing.assert_array_equal(below(scores, alive, np.array([0.0, 0.2, 0.5, 0.51, 1.0])), [1, 2, 2, 3, 4])


def test_random_pairs_give_every_feature_one_partner():
    keys = random_pair_keys(10, 7, 3)
    i, j = keys // 7, keys % 7
    assert sorted(i) == list(range(10)) and (j < 7).all()
    assert len(set(j[:7])) == 7  # a permutation on the first d_b features
    np.testing.assert_array_equal(keys, random_pair_keys(10, 7, 3))


def test_hook_moments_torch_path_and_shared_moments_equal_the_numpy_path():
    """The GPU path's reductions (torch, forced here on the CPU) equal numpy's to float64 rounding;
    moments computed once and shared by two SAEs give each SAE the rows of its own update; a bf16
    tensor on the CPU goes through numpy (float32 first, as numpy has no bfloat16)."""
    import torch

    from precompute.hook_moments import HookMoments

    rng = np.random.default_rng(9)
    b, c, d = 4, CTX, 6
    accs = {k: QualityStats(d, S) for k in ("numpy", "torch", "shared_a", "shared_b", "alone_b", "bf16")}
    for _ in range(3):
        x = (rng.normal(0, 1, (b * c, d)) + 2).astype(np.float32)
        x[5] *= 30
        x_hat_a = (x + rng.normal(0, 0.4, x.shape)).astype(np.float32)
        x_hat_b = (x + rng.normal(0, 0.9, x.shape)).astype(np.float32)
        counted = rng.uniform(size=(b, c)) > 0.1
        outlier = (np.linalg.norm(x, axis=1) > 20).reshape(b, c)
        src = np.repeat(rng.integers(0, S, b)[:, None], c, axis=1)
        l0 = rng.integers(0, 5, b * c)
        losses = {k: (rng.exponential(2, (b, c - 1)), rng.exponential(2, (b, c - 1))) for k in ("clean", "spliced", "zero_ablated")}
        accs["numpy"].update(x, x_hat_a, l0, counted, outlier, losses, src)
        mt = HookMoments(torch.from_numpy(x), counted, outlier, src, S, in_torch=True)
        assert isinstance(mt.x, torch.Tensor) and mt.x.dtype == torch.float64
        accs["torch"].update(None, torch.from_numpy(x_hat_a), l0, counted, outlier, losses, src, moments=mt)
        shared = HookMoments(x, counted, outlier, src, S)
        assert isinstance(shared.x, np.ndarray)
        accs["shared_a"].update(None, x_hat_a, l0, counted, outlier, losses, src, moments=shared)
        accs["shared_b"].update(None, x_hat_b, l0, counted, outlier, losses, src, moments=shared)
        accs["alone_b"].update(x, x_hat_b, l0, counted, outlier, losses, src)
        xb = torch.from_numpy(x).bfloat16()
        accs["bf16"].update(xb, torch.from_numpy(x_hat_a).bfloat16(), l0, counted, outlier, losses, src)
        accs.setdefault("bf16_ref", QualityStats(d, S)).update(xb.float().numpy(), torch.from_numpy(x_hat_a).bfloat16().float().numpy(), l0, counted, outlier, losses, src)
    assert accs["numpy"].n_outliers.sum() > 0  # both variants differ: the outlier branch ran
    for name in QualityStats.FIELDS:
        ref = getattr(accs["numpy"], name)
        np.testing.assert_allclose(getattr(accs["torch"], name), ref, rtol=1e-12, atol=1e-12, err_msg=name)
        np.testing.assert_array_equal(getattr(accs["shared_a"], name), ref, err_msg=name)
        np.testing.assert_array_equal(getattr(accs["shared_b"], name), getattr(accs["alone_b"], name), err_msg=name)
        np.testing.assert_array_equal(getattr(accs["bf16"], name), getattr(accs["bf16_ref"], name), err_msg=name)
    assert accs["shared_a"].finalize()[0]["mse"] < accs["shared_b"].finalize()[0]["mse"]  # each SAE kept its own error
