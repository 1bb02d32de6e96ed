"""Minimum-cost assignment of every row on a sparse bipartite graph (the candidate matching's solver).

`min_cost_row_assignment(indptr, indices, costs, n_cols)`: each of the n_rows rows of a CSR graph
gets one distinct column, minimising the sum of the costs of the edges used (a full matching of
the rows must exist; the candidate matching guarantees it with a private "unassigned" column per
row). It returns the column of each row and the dual potentials (u per row, v per column) that
certify optimality: u_i + v_j <= c_ij on every edge, with equality on the edges used, v_j <= 0, and
v_j = 0 on every column left unused, so no other assignment costs less (linear-programming
duality; tests/test_matching.py checks the certificate and the optimum against scipy).

Three stages:
1. **Prices from an auction** (Bertsekas' forward auction, one fixed epsilon of 1e-3 of the cost
   spread): each unassigned row bids for its cheapest column (cost + price), raising that
   column's price by the gap to its second cheapest plus epsilon and taking it from its holder.
   Every bid raises a price by at least epsilon, so there are no long price wars of tiny gaps;
   on the candidate graphs the bids per row stay flat (about 30) as d_sae grows. Its assignment
   is optimal only to within epsilon per row: the stage is used for its prices alone, v0 = -price.
2. **The exact method from those potentials**: Jonker and Volgenant's (as scipy's LAPJVsp): a
   greedy start on each row's cheapest reduced cost, two passes of augmenting row reduction (a
   free row takes its cheapest column at the second-cheapest price, as an auction bid with
   epsilon 0, freeing the column's holder), then for each row still free a Dijkstra search
   over reduced costs c_ij - u_i - v_j >= 0 with a binary heap until a free column is reached;
   the potentials of the columns and rows it settled move and the path is flipped. Only what a
   search touches is reset after it, so a search costs its own size, not the number of columns.
   From the auction's potentials almost every row takes its cheapest column at once.
3. **Unused columns raised to 0**: a warm start can leave a column unused with v_j < 0, which the
   certificate does not allow (the assignment may then not be optimal). For each, a Dijkstra
   search backwards from it (a column, the rows with an edge into it, the columns those rows
   hold) raises v_j towards 0 and lowers the rows' potentials; where another column can be
   freed at v = 0 more cheaply, the rows along the path move and that column is left unused.
   Each search keeps the duals feasible and the used edges tight, so afterwards the certificate
   holds whatever the prices of stage 1 were (tests feed random potentials to check this).

Started cold (v0 = 0, no stage 3 needed), stage 2's row reduction grows about as d_sae^1.9 on the
candidate graphs: every bid there lowers a price by a small gap (11.9 CPU-s at 131k features).
From the auction's prices the whole solve takes 0.98 s there and grows about as d_sae^1.3, the
auction most of it (benchmarks/RESULTS.md, "The assignment from an auction's prices"). Compiled
with numba (cached on disk after the first call).
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
def _solve(indptr, indices, costs, n_cols, v0):
    n_rows = len(indptr) - 1
    inf = np.inf
    x = np.full(n_rows, -1, np.int64)  # column of each row
    y = np.full(n_cols, -1, np.int64)  # row of each column
    u = np.zeros(n_rows)
    v = v0.copy()
    # greedy start: u_i = the row's cheapest reduced cost (so every reduced cost is >= 0); take that column if free
    for i in range(n_rows):
        best, best_j = inf, -1
        for t in range(indptr[i], indptr[i + 1]):
            r = costs[t] - v[indices[t]]
            if r < best:
                best, best_j = r, indices[t]
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


@njit(cache=True)
def _auction_prices(indptr, indices, costs, n_cols, eps, max_bids):
    """Column prices from a forward auction with a fixed eps (stage 1): each unassigned row bids
    for its cheapest column at cost + price, raising the price by the gap to its second cheapest
    plus eps. Stops when every row holds a column or after max_bids bids (a graph without a full
    assignment, or a slow one: the prices are then only a worse start). Prices are >= 0."""
    n_rows = len(indptr) - 1
    p = np.zeros(n_cols)
    owner = np.full(n_cols, -1, np.int64)
    queue = np.arange(n_rows)  # a ring of the unassigned rows
    head, tail, count = 0, 0, n_rows
    bids = 0
    while count > 0 and bids < max_bids:
        i = queue[head]
        head = (head + 1) % n_rows
        count -= 1
        w0, w1, j0 = np.inf, np.inf, -1
        for t in range(indptr[i], indptr[i + 1]):
            w = costs[t] + p[indices[t]]
            if w < w1:
                if w < w0:
                    w1, w0, j0 = w0, w, indices[t]
                else:
                    w1 = w
        if j0 < 0:  # a row without edges: no assignment exists (stage 2 says so)
            break
        if w1 == np.inf:  # a single edge: the smallest raise
            w1 = w0
        p[j0] += w1 - w0 + eps
        bids += 1
        prev = owner[j0]
        owner[j0] = i
        if prev >= 0:
            queue[tail] = prev
            tail = (tail + 1) % n_rows
            count += 1
    return p


@njit(cache=True)
def _by_column(indptr, indices, n_cols):
    """The graph's edges grouped by column: (colptr, edge ids, their rows)."""
    n_rows = len(indptr) - 1
    colptr = np.zeros(n_cols + 1, np.int64)
    for t in range(len(indices)):
        colptr[indices[t] + 1] += 1
    for j in range(n_cols):
        colptr[j + 1] += colptr[j]
    fill = colptr[:-1].copy()
    eid = np.empty(len(indices), np.int64)
    erow = np.empty(len(indices), np.int64)
    for i in range(n_rows):
        for t in range(indptr[i], indptr[i + 1]):
            j = indices[t]
            eid[fill[j]] = t
            erow[fill[j]] = i
            fill[j] += 1
    return colptr, eid, erow


@njit(cache=True)
def _raise_unused_columns(indptr, indices, costs, x, u, v):
    """Stage 3: every unused column j with v_j < 0 is raised to 0 (x, u, v updated in place).

    A Dijkstra search backwards from j over columns: from a settled column c at distance D_c, each
    row k with an edge into c (and holding another column l) offers l the distance
    D_c + (c_kc - u_k - v_c). Stopping at a settled column c costs D_c - v_c: raise the tree's
    columns c by (best - D_c) and lower their holders' u by the same (feasible, used edges still
    tight), then move the rows along the path from c back to j, which leaves c unused at v = 0
    (c = j: j itself raised to 0). Returns how many columns were raised."""
    n_rows = len(indptr) - 1
    n_cols = len(v)
    y = np.full(n_cols, -1, np.int64)
    for i in range(n_rows):
        y[x[i]] = i
    if not ((y == -1) & (v < 0)).any():  # a cold start, or a warm one that left none: nothing to build
        return 0
    colptr, eid, erow = _by_column(indptr, indices, n_cols)
    inf = np.inf
    dist = np.full(n_cols, inf)
    pred_row = np.full(n_cols, -1, np.int64)  # column l reached through the row holding it ...
    pred_col = np.full(n_cols, -1, np.int64)  # ... from the column that row has an edge to
    done = np.zeros(n_cols, np.bool_)
    touched = np.empty(n_cols, np.int64)
    settled = np.empty(n_cols, np.int64)
    hkeys = np.empty(len(indices) + 1)
    hvals = np.empty(len(indices) + 1, np.int64)
    n_raised = 0
    for j in range(n_cols):
        if y[j] != -1 or v[j] >= 0:
            continue
        n_raised += 1
        dist[j] = 0.0
        touched[0] = j
        n_touched, n_settled = 1, 0
        best, end = -v[j], j
        size = _heap_push(hkeys, hvals, 0, 0.0, j)
        while size > 0:
            d, c, size = _heap_pop(hkeys, hvals, size)
            if done[c] or d > dist[c]:
                continue
            if d >= best:
                break
            done[c] = True
            settled[n_settled] = c
            n_settled += 1
            if d - v[c] < best:
                best, end = d - v[c], c
            for q in range(colptr[c], colptr[c + 1]):
                k = erow[q]
                l = x[k]
                if l == c or done[l]:
                    continue
                nd = d + costs[eid[q]] - u[k] - v[c]
                if nd < dist[l]:
                    if dist[l] == inf:
                        touched[n_touched] = l
                        n_touched += 1
                    dist[l] = nd
                    pred_row[l] = k
                    pred_col[l] = c
                    size = _heap_push(hkeys, hvals, size, nd, l)
        for q in range(n_settled):
            c = settled[q]
            shift = best - dist[c]
            if shift > 0:
                v[c] += shift
                if y[c] != -1:
                    u[y[c]] -= shift
        l = end
        while l != j:  # each row on the path moves to the column it reached its own from
            k, c = pred_row[l], pred_col[l]
            x[k] = c
            y[c] = k
            l = c
        if end != j:
            y[end] = -1
            v[j] = min(v[j], 0.0)
        v[end] = 0.0
        for q in range(n_touched):
            c = touched[q]
            dist[c] = inf
            done[c] = False
            pred_row[c] = -1
            pred_col[c] = -1
    return n_raised


AUCTION_EPS = 1e-3  # stage 1's epsilon, as a share of the cost spread
AUCTION_MAX_BIDS_PER_EDGE = 64


def min_cost_row_assignment(indptr: np.ndarray, indices: np.ndarray, costs: np.ndarray, n_cols: int, v0: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(column of each row, u, v) of a minimum-cost assignment of every row of the CSR graph to a
    distinct column; ValueError if no such assignment exists. Costs must be finite.

    v0: the column potentials to start from (any values <= 0; the result is optimal and certified
    whatever they are). None: from stage 1's auction prices. Zeros: a cold start (stage 3 then
    has nothing to do)."""
    indptr = np.ascontiguousarray(indptr, np.int64)
    indices = np.ascontiguousarray(indices, np.int64)
    costs = np.ascontiguousarray(costs, np.float64)
    if not np.isfinite(costs).all():
        raise ValueError("every cost must be finite")
    n_cols = int(n_cols)
    if v0 is None:
        spread = float(costs.max() - costs.min()) if len(costs) else 0.0
        eps = AUCTION_EPS * (spread if spread > 0 else 1.0)
        v0 = -_auction_prices(indptr, indices, costs, n_cols, eps, AUCTION_MAX_BIDS_PER_EDGE * max(len(indices), 1))
    else:
        v0 = np.ascontiguousarray(v0, np.float64)
        if v0.shape != (n_cols,) or not (v0 <= 0).all():
            raise ValueError("v0 must hold one potential <= 0 per column")
    x, u, v, ok = _solve(indptr, indices, costs, n_cols, v0)
    if not ok:
        raise ValueError("no assignment of every row exists")
    _raise_unused_columns(indptr, indices, costs, x, u, v)
    return x, u, v
