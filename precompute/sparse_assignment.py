"""Minimum-cost assignment of every row on a sparse bipartite graph (the candidate matching's solver).

`min_cost_row_assignment(indptr, indices, costs, n_cols)`: each of the n_rows rows of a CSR graph
gets one distinct column, minimising the sum of the costs of the edges used (a full matching of
the rows must exist; the candidate matching guarantees it with a private "unassigned" column per
row). It returns the column of each row and the dual potentials (u per row, v per column) that
certify optimality: u_i + v_j <= c_ij on every edge, with equality on the edges used, so no other
assignment costs less (linear-programming duality; tests/test_matching.py checks the certificate
and the optimum against scipy).

The algorithm is Jonker and Volgenant's (as scipy's LAPJVsp): a greedy start on each row's
cheapest edge, two passes of augmenting row reduction (a free row takes its cheapest column at
the second-cheapest price, as an auction bid, freeing the column's holder), then successive
shortest augmenting paths: for each row still free a Dijkstra search
over reduced costs c_ij - u_i - v_j >= 0 with a binary heap, until a free column is reached, then
the potentials of the columns and rows it settled are moved and the path is flipped. Only what a
search touches is reset after it, so a search costs its own size, not the number of columns:
scipy's implementation resets and scans every column per augmentation, which grows with d_sae
squared (benchmarks/RESULTS.md, "B7 matching"). On the candidate graphs of B7's matching
benchmark the row reduction leaves no row free, and its bidding, which still grows about as
d_sae^1.9 there, is the cost: 13 CPU-s at 131k features against scipy's 414. Compiled with numba (cached on disk after the
first call).
"""

from __future__ import annotations

import numpy as np

from numba import njit


@njit(cache=True)
def _heap_push(keys, vals, size, key, val):
    i = size
    keys[i] = key
    vals[i] = val
    while i > 0:
        parent = (i - 1) // 2
        if keys[parent] <= keys[i]:
            break
        keys[parent], keys[i] = keys[i], keys[parent]
        vals[parent], vals[i] = vals[i], vals[parent]
        i = parent
    return size + 1


@njit(cache=True)
def _heap_pop(keys, vals, size):
    """Removes the smallest entry; returns (key, val, new size)."""
    key, val = keys[0], vals[0]
    size -= 1
    keys[0], vals[0] = keys[size], vals[size]
    i = 0
    while True:
        left = 2 * i + 1
        if left >= size:
            break
        child = left
        if left + 1 < size and keys[left + 1] < keys[left]:
            child = left + 1
        if keys[i] <= keys[child]:
            break
        keys[child], keys[i] = keys[i], keys[child]
        vals[child], vals[i] = vals[i], vals[child]
        i = child
    return key, val, size


@njit(cache=True)
def _relax(i, d, indptr, indices, costs, u, v, dist, pred, done, touched, n_touched, hkeys, hvals, size):
    """Row i reached at distance d: offer each of its columns not yet settled d + its reduced cost.
    Returns (n_touched, heap size)."""
    for t in range(indptr[i], indptr[i + 1]):
        k = indices[t]
        if done[k]:
            continue
        nd = d + costs[t] - u[i] - v[k]
        if nd < dist[k]:
            if dist[k] == np.inf:
                touched[n_touched] = k
                n_touched += 1
            dist[k] = nd
            pred[k] = i
            size = _heap_push(hkeys, hvals, size, nd, k)
    return n_touched, size


@njit(cache=True)
def _solve(indptr, indices, costs, n_cols):
    n_rows = len(indptr) - 1
    inf = np.inf
    x = np.full(n_rows, -1, np.int64)  # column of each row
    y = np.full(n_cols, -1, np.int64)  # row of each column
    u = np.zeros(n_rows)
    v = np.zeros(n_cols)
    # greedy start: u_i = the row's cheapest edge (v = 0 keeps every reduced cost >= 0); take it if free
    for i in range(n_rows):
        best, best_j = inf, -1
        for t in range(indptr[i], indptr[i + 1]):
            if costs[t] < best:
                best, best_j = costs[t], indices[t]
        if best_j < 0:
            return x, u, v, False
        u[i] = best
        if y[best_j] == -1:
            x[i] = best_j
            y[best_j] = i
    # augmenting row reduction (Jonker and Volgenant), two passes over the free rows: a free row
    # takes its cheapest column at the second-cheapest reduced price, lowering that column's
    # potential (as an auction bid) and freeing its holder; dual feasibility and tight matched
    # edges are kept, and most rows leave with a column and better prices for the searches below
    free = np.flatnonzero(x == -1)
    for _ in range(2):
        n_free = len(free)
        nxt = np.empty(n_rows, np.int64)
        n_next = 0
        h = 0
        queue = free  # a displaced row is written back only into slots already read
        while h < n_free:
            i = queue[h]
            h += 1
            v0, v1, j0, j1 = inf, inf, -1, -1
            for t in range(indptr[i], indptr[i + 1]):
                j = indices[t]
                dj = costs[t] - v[j]
                if dj < v1:
                    if dj >= v0:
                        v1, j1 = dj, j
                    else:
                        v1, j1, v0, j0 = v0, j0, dj, j
            if j1 < 0:  # a single edge: take it at its price
                v1 = v0
            i0 = y[j0]
            u[i] = v1
            if v0 < v1:
                v[j0] -= v1 - v0
            elif i0 != -1 and j1 >= 0:
                j0 = j1
                i0 = y[j0]
            x[i] = j0
            y[j0] = i
            if i0 != -1:
                x[i0] = -1
                if v0 < v1:
                    h -= 1
                    queue[h] = i0
                else:
                    nxt[n_next] = i0
                    n_next += 1
        free = nxt[:n_next]
    dist = np.full(n_cols, inf)
    pred = np.full(n_cols, -1, np.int64)
    done = np.zeros(n_cols, np.bool_)
    touched = np.empty(n_cols, np.int64)
    settled = np.empty(n_cols, np.int64)
    cap = len(indices) + 1
    hkeys = np.empty(cap)
    hvals = np.empty(cap, np.int64)
    for s in range(n_rows):
        if x[s] != -1:
            continue
        n_settled = 0
        n_touched, size = _relax(s, 0.0, indptr, indices, costs, u, v, dist, pred, done, touched, 0, hkeys, hvals, 0)
        end = -1
        delta = 0.0
        while size > 0:
            d, j, size = _heap_pop(hkeys, hvals, size)
            if done[j] or d > dist[j]:
                continue
            done[j] = True
            settled[n_settled] = j
            n_settled += 1
            i = y[j]
            if i == -1:
                end, delta = j, d
                break
            # row i is reached at distance d (its matched edge has reduced cost 0)
            n_touched, size = _relax(i, d, indptr, indices, costs, u, v, dist, pred, done, touched, n_touched, hkeys, hvals, size)
        if end < 0:
            return x, u, v, False
        # potentials: settled columns j (d_j <= delta) and the rows they hold move by delta - d_j
        u[s] += delta
        for q in range(n_settled):
            j = settled[q]
            shift = delta - dist[j]
            if j != end:
                u[y[j]] += shift
            v[j] -= shift
        # flip the path from `end` back to s
        j = end
        while True:
            i = pred[j]
            nxt = x[i]
            x[i] = j
            y[j] = i
            if i == s:
                break
            j = nxt
        for q in range(n_touched):
            j = touched[q]
            dist[j] = inf
            done[j] = False
            pred[j] = -1
    return x, u, v, True


def min_cost_row_assignment(indptr: np.ndarray, indices: np.ndarray, costs: np.ndarray, n_cols: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(column of each row, u, v) of a minimum-cost assignment of every row of the CSR graph to a
    distinct column; ValueError if no such assignment exists. Costs must be finite."""
    indptr = np.ascontiguousarray(indptr, np.int64)
    indices = np.ascontiguousarray(indices, np.int64)
    costs = np.ascontiguousarray(costs, np.float64)
    if not np.isfinite(costs).all():
        raise ValueError("every cost must be finite")
    x, u, v, ok = _solve(indptr, indices, costs, int(n_cols))
    if not ok:
        raise ValueError("no assignment of every row exists")
    return x, u, v
