"""The two-SAE assignment on candidate pairs (precompute/weights.py) against references.

No model is loaded: candidate graphs are drawn at random. The reference for the optimum is
scipy's dense `linear_sum_assignment` on the rectangular formulation (every alive A feature may
take any candidate B or its own "unassigned" column; non-candidates forbidden), and a hand-checked
case where the greedy best match is not the optimum.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from precompute.weights import PairScores, assignment


def _scores(d_a: int, d_b: int, keys: np.ndarray, values: np.ndarray) -> PairScores:
    keys = np.asarray(keys, np.int64)
    order = np.argsort(keys)
    return PairScores(d_a, d_b, {"dec_cos": np.asarray(values, np.float64)[order]}, keys[order])


def _dense_reference(ps: PairScores, alive_a: np.ndarray, alive_b: np.ndarray) -> tuple[float, int]:
    """(the optimal total score, pairs assigned) of the rectangular problem, by dense Hungarian:
    cost 2 - s on a candidate pair of alive features, 4 on A's private unassigned column, else forbidden."""
    big = 1e9
    cost = np.full((ps.d_a, ps.d_b + ps.d_a), big)
    ia, ib = ps.rows_cols()
    ok = alive_a[ia] & alive_b[ib]
    cost[ia[ok], ib[ok]] = 2.0 - ps.base["dec_cos"][ok]
    cost[np.arange(ps.d_a), ps.d_b + np.arange(ps.d_a)] = 4.0
    r, c = linear_sum_assignment(cost)
    real = c < ps.d_b
    assert (cost[r, c] < big).all()
    return float((2.0 - cost[r[real], c[real]]).sum()), int(real.sum())


def _total(ps: PairScores, b_for_a: np.ndarray) -> float:
    a = np.flatnonzero(b_for_a >= 0)
    keys = a * ps.d_b + b_for_a[a]
    pos = np.searchsorted(ps.pair_keys, keys)
    assert (ps.pair_keys[pos] == keys).all(), "an assigned pair is not a candidate"
    return float(ps.base["dec_cos"][pos].sum())


def test_candidate_assignment_takes_the_optimum_not_the_greedy_best():
    """a-x 0.9, a-y 0.8, b-x 0.85 (b-y no candidate): greedy takes a-x (0.9, b unassigned); the
    optimum is a-y + b-x (1.65)."""
    ps = _scores(2, 2, [0 * 2 + 0, 0 * 2 + 1, 1 * 2 + 0], [0.9, 0.8, 0.85])
    alive = np.ones(2, bool)
    to_b, to_a = assignment(ps, "dec_cos", alive, alive)
    assert to_b.tolist() == [1, 0] and to_a.tolist() == [1, 0]
    # with b dead, a takes its best, x
    to_b, to_a = assignment(ps, "dec_cos", np.array([True, False]), alive)
    assert to_b.tolist() == [0, -1] and to_a.tolist() == [0, -1]


def test_candidate_assignment_prefers_a_negative_pair_to_none():
    """Any real pair (score >= -1) beats leaving both features unassigned, as in the all-pairs mode."""
    ps = _scores(1, 1, [0], [-0.75])
    to_b, to_a = assignment(ps, "dec_cos", np.ones(1, bool), np.ones(1, bool))
    assert to_b.tolist() == [0] and to_a.tolist() == [0]


@pytest.mark.parametrize("d_a, d_b, k, seed", [(40, 40, 3, 0), (60, 35, 4, 1), (30, 70, 2, 2), (200, 180, 5, 3)])
def test_candidate_assignment_is_optimal_against_dense_hungarian(d_a, d_b, k, seed):
    rng = np.random.default_rng(seed)
    # each A feature's k candidates and each B feature's k candidates (union), scores in [-1, 1]
    fwd = (np.arange(d_a)[:, None] * d_b + rng.choice(d_b, size=(d_a, k), replace=True)).reshape(-1)
    bwd = (rng.choice(d_a, size=(d_b, k), replace=True) * d_b + np.arange(d_b)[:, None]).reshape(-1)
    keys = np.unique(np.concatenate([fwd, bwd]))
    values = np.clip(rng.normal(0.3, 0.4, len(keys)), -1, 1)
    ps = _scores(d_a, d_b, keys, values)
    alive_a, alive_b = rng.random(d_a) > 0.15, rng.random(d_b) > 0.15
    to_b, to_a = assignment(ps, "dec_cos", alive_a, alive_b)
    # one-to-one, consistent both ways, alive features only
    a = np.flatnonzero(to_b >= 0)
    assert len(np.unique(to_b[a])) == len(a) and (to_a[to_b[a]] == a).all()
    assert (to_a >= 0).sum() == len(a)
    assert alive_a[a].all() and alive_b[to_b[a]].all()
    best, n_ref = _dense_reference(ps, alive_a, alive_b)
    assert _total(ps, to_b) == pytest.approx(best, abs=1e-9)
    assert len(a) == n_ref  # the same optimum (random scores: no ties)


def _random_graph(seed: int):
    """A random sparse cost graph of n rows and m >= n columns with a full row assignment
    (one guaranteed edge per row to distinct columns), integer costs on odd seeds (ties)."""
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 60))
    m = n + int(rng.integers(0, 12))
    g = sp.random(n, m, density=rng.uniform(0.03, 0.5), random_state=seed, format="csr")
    g.data = rng.integers(1, 6, len(g.data)).astype(float) if seed % 2 else rng.uniform(1, 3, len(g.data))
    g = (g + sp.csr_matrix((np.full(n, 9.0), (np.arange(n), rng.permutation(m)[:n])), shape=(n, m))).tocsr()
    g.sort_indices()
    return g


def _certified_optimum(g, x, u, v) -> float:
    """The cost of assignment x, after checking that (u, v) certify it optimal: one distinct column
    per row, reduced costs >= 0 on every edge and 0 on the edges used, v <= 0, v = 0 on unused columns."""
    n, m = g.shape
    assert len(np.unique(x)) == n and (x >= 0).all()
    rows = np.repeat(np.arange(n), np.diff(g.indptr))
    reduced = g.data - u[rows] - v[g.indices]
    assert reduced.min() >= -1e-9
    used = np.asarray(g[np.arange(n), x]).ravel()
    assert np.abs(used - u - v[x]).max() <= 1e-9
    assert v.max() <= 1e-12
    unused = np.setdiff1d(np.arange(m), x)
    assert (v[unused] == 0).all()
    return float(used.sum())


@pytest.mark.parametrize("seed", range(40))
def test_sparse_assignment_is_optimal_with_its_dual_certificate(seed):
    """precompute.sparse_assignment against scipy's LAPJVsp (the same minimum cost), and its dual
    potentials certify optimality, from the auction's prices (the default), from a cold start
    (v0 = 0), and from random potentials (which leave unused columns below 0 for stage 3)."""
    from scipy.sparse.csgraph import min_weight_full_bipartite_matching

    from precompute.sparse_assignment import min_cost_row_assignment

    g = _random_graph(seed)
    n, m = g.shape
    r, c = min_weight_full_bipartite_matching(g)
    optimum = g[r, c].sum()
    rng = np.random.default_rng(1000 + seed)
    for v0 in (None, np.zeros(m), -rng.uniform(0, 3, m), -rng.integers(0, 3, m).astype(float)):
        x, u, v = min_cost_row_assignment(g.indptr, g.indices, g.data, m, v0)
        assert _certified_optimum(g, x, u, v) == pytest.approx(optimum, abs=1e-9)


def test_sparse_assignment_raises_a_column_a_warm_start_left_below_zero():
    """Hand-checked stage 3. One row, columns 0 (cost 1) and 1 (cost 2), started from v0 = (-5, 0):
    the greedy start takes column 1 (reduced costs 6 and 2), leaving column 0 unused at v = -5,
    which no certificate allows. The backward search from column 0 reaches column 1 (held by the
    row) at distance 1 - 2 + 5 = 4 < 5 (raising column 0 to 0 in place), so the row moves to
    column 0, column 0 rises by 4 to v = -1, and column 1 is left unused at v = 0: u = 2."""
    from precompute.sparse_assignment import min_cost_row_assignment

    x, u, v = min_cost_row_assignment(np.array([0, 2]), np.array([0, 1]), np.array([1.0, 2.0]), 2, np.array([-5.0, 0.0]))
    assert x.tolist() == [0] and u.tolist() == [2.0] and v.tolist() == [-1.0, 0.0]
    # two rows, three columns, the unused column raised in place: row 0 on column 0 (cost 1), row 1 on
    # column 1 (cost 1), column 2 (edges from row 1 at cost 3) started at -1; raising it to 0 keeps
    # row 1's edge to it at reduced cost 3 - 1 - 0 = 2 >= 0, so nothing moves
    g = (np.array([0, 1, 3]), np.array([0, 1, 2]), np.array([1.0, 1.0, 3.0]))
    x, u, v = min_cost_row_assignment(*g, 3, np.array([0.0, 0.0, -1.0]))
    assert x.tolist() == [0, 1] and v.tolist() == [0.0, 0.0, 0.0] and u.tolist() == [1.0, 1.0]


def test_sparse_assignment_rejects_an_impossible_graph_and_bad_costs():
    from precompute.sparse_assignment import min_cost_row_assignment

    # two rows whose only edges go to column 0
    with pytest.raises(ValueError, match="no assignment"):
        min_cost_row_assignment(np.array([0, 1, 2]), np.array([0, 0]), np.array([1.0, 2.0]), 2)
    # a row without any edge
    with pytest.raises(ValueError, match="no assignment"):
        min_cost_row_assignment(np.array([0, 1, 1]), np.array([0]), np.array([1.0]), 2)
    with pytest.raises(ValueError, match="finite"):
        min_cost_row_assignment(np.array([0, 1]), np.array([0]), np.array([np.nan]), 1)
    with pytest.raises(ValueError, match="v0"):
        min_cost_row_assignment(np.array([0, 1]), np.array([0]), np.array([1.0]), 1, np.array([0.5]))
