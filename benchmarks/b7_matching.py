"""B7, two-SAE matching alone: candidate pairs and the one-to-one assignment over SAE widths.

    python benchmarks/b7_matching.py --widths 16384 32768 65536 131072            # synthetic decoders, d_in 256
    python benchmarks/b7_matching.py --pair benchmarks/_work/wide512 --widths 16384 65536
    python benchmarks/b7_matching.py --smoke --out X.json                          # the test suite

Per width, decoders as benchmarks/wide_pair.py draws them (families of directions; the finetuned
SAE's rows perturbed, 10% replaced), from a wide pair's SAEs (--pair) or drawn here (--d-in).
Then `precompute.weights.candidate_pair_keys` (each feature's 10 nearest decoder directions in
the other SAE, both directions: one blocked pass over A B^T, no d_sae x d_sae matrix) and the
assignment, timed side by side on the same candidate graph by four solvers:

    ours         `precompute.weights.assignment` (what a run does): precompute/sparse_assignment.py
                 (numba; its compile is timed once, apart): the auction's prices, then shortest
                 augmenting paths from them, then unused columns raised to 0;
    ours cold    the same solver from v0 = 0 (no auction prices), as it was before that stage;
    scipy square scipy's LAPJVsp (min_weight_full_bipartite_matching) on an equivalent square
                 graph (A + B's "unassigned" rows, B + A's "unassigned" columns), on which it
                 runs its initialisation;
    scipy rect   LAPJVsp on the run's rectangular graph (A's private "unassigned" columns), as
                 the run did before; it skips its initialisation there;

with their total scores compared (the same optimum, or the script fails). The activation
correlations, which a run accumulates, are stood in for by the decoder cosine plus Gaussian noise
(sd 0.1): the assignment's cost depends on the graph and the score spread, not on where the
scores come from. 2% of the features on each side are dead (excluded, as in a run). Wall and CPU seconds, 1 thread.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks._common import load_script, machine, write_result  # noqa: E402

DEAD_SHARE = 0.02


def _alive_pairs(ps, kind: str, alive_a, alive_b):
    """weights.alive_pairs, plus the counts and ids of the alive features: (ia, ib, score, na, nb, ra, rb)."""
    import numpy as np

    from precompute import weights as W

    ra, rb = np.flatnonzero(alive_a), np.flatnonzero(alive_b)
    return (*W.alive_pairs(ps, kind, alive_a, alive_b), len(ra), len(rb), ra, rb)


def _to_b(d_a: int, rr, cc, na: int, nb: int, ra, rb):
    import numpy as np

    real = (rr < na) & (cc < nb)
    out = np.full(d_a, -1, np.int64)
    out[ra[rr[real]]] = rb[cc[real]]
    return out


def _ours_cold(ps, kind: str, alive_a, alive_b):
    """Our solver on the run's graph from a cold start (v0 = 0: no auction prices), as before the auction stage."""
    import numpy as np

    from precompute import weights as W
    from precompute.sparse_assignment import min_cost_row_assignment

    ia, ib, sc, na, nb, ra, rb = _alive_pairs(ps, kind, alive_a, alive_b)
    indptr, cols, costs = W.candidate_graph(ia, ib, sc, na, nb)
    x, _, _ = min_cost_row_assignment(indptr, cols, costs, nb + na, np.zeros(nb + na))
    return _to_b(ps.d_a, np.arange(na), x, na, nb, ra, rb)


def _scipy_assignment(ps, kind: str, alive_a, alive_b, square: bool):
    """scipy's LAPJVsp on the alive candidate graph: the run's rectangular graph, or a square one."""
    import numpy as np
    import scipy.sparse as sp
    from scipy.sparse.csgraph import min_weight_full_bipartite_matching

    from precompute import weights as W

    ia, ib, sc, na, nb, ra, rb = _alive_pairs(ps, kind, alive_a, alive_b)
    if square:
        # rows A, then B' (B_j unassigned); columns B, then A' (A_i unassigned). A_i-B_j 3 - s,
        # A_i-A'_i 3, B'_j-B_j 3, B'_j-A'_i 1 per candidate pair: a full matching costs
        # 3 (na + nb) + sum over the pairs assigned of (-2 - s), the rectangular objective shifted.
        m = len(ia)
        rows = np.concatenate([ia, np.arange(na), na + np.arange(nb), na + ib])
        cols = np.concatenate([ib, nb + np.arange(na), np.arange(nb), nb + ia])
        costs = np.concatenate([3.0 - sc, np.full(na + nb, 3.0), np.ones(m)])
        graph = sp.csr_matrix((costs, (rows, cols)), shape=(na + nb, na + nb))
    else:  # the run's own graph
        indptr, cols, costs = W.candidate_graph(ia, ib, sc, na, nb)
        graph = sp.csr_matrix((costs, cols, indptr), shape=(na, nb + na))
    rr, cc = min_weight_full_bipartite_matching(graph)
    return _to_b(ps.d_a, rr, cc, na, nb, ra, rb)


def _decoders(pair: Path | None, d: int, d_in: int, seed: int):
    import torch

    from precompute import weights as W

    if pair is not None:
        from safetensors.torch import load_file

        saes = pair / "saes" / str(d)
        return tuple(W.unit_rows(load_file(str(saes / s / "sae_weights.safetensors"))["W_dec"]) for s in ("base_sae", "finetuned_sae"))
    wide = load_script("wide_pair")
    gen = torch.Generator().manual_seed(seed * 1000 + d)
    w = wide._decoder(d, d_in, gen, "cpu")
    return w, wide.finetuned_directions(w, gen, "cpu")


def _timed(fn, *args):
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn(*args)
    return out, time.perf_counter() - t0, time.process_time() - c0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pair", type=Path, default=None, help="a wide pair whose SAEs of each width to use (default: decoders drawn here)")
    p.add_argument("--widths", type=int, nargs="+", default=[16384, 32768, 65536, 131072])
    p.add_argument("--d-in", type=int, default=256, help="the decoders' width when drawn here (default 256)")
    p.add_argument("--no-rectangular", action="store_true", help="skip scipy on the rectangular graph (it grows with d_sae squared)")
    p.add_argument("--no-scipy", action="store_true", help="skip scipy on the square graph too")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="two tiny widths (the test suite)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "b7_matching.json")
    a = p.parse_args(argv)
    import numpy as np
    import torch

    from precompute import weights as W

    torch.set_num_threads(1)
    widths, d_in = ([512, 1024], 32) if a.smoke else (a.widths, a.d_in)
    from precompute.sparse_assignment import min_cost_row_assignment

    _, t_jit, c_jit = _timed(min_cost_row_assignment, np.array([0, 1]), np.array([0]), np.array([1.0]), 1)  # numba's compile (or its cache)
    print(json.dumps({"compile_wall_seconds": t_jit}), flush=True)
    rows = []
    for d in widths:
        wa, wb = _decoders(a.pair, d, d_in, a.seed)
        keys, t_keys, c_keys = _timed(W.candidate_pair_keys, wa, wb, 10)
        pa_, pb_ = keys // d, keys % d
        cos = (wa[torch.from_numpy(pa_)] * wb[torch.from_numpy(pb_)]).sum(1).numpy().astype(np.float64)
        rng = np.random.default_rng(a.seed)
        corr = np.clip(cos + rng.normal(0, 0.1, len(cos)), -1, 1)
        ps = W.PairScores(d, d, {"act_corr": corr}, keys)
        alive_a, alive_b = rng.random(d) >= DEAD_SHARE, rng.random(d) >= DEAD_SHARE
        (to_b, _), t_ours, c_ours = _timed(W.assignment, ps, "act_corr", alive_a, alive_b)
        total = lambda b_for_a: float(corr[np.searchsorted(keys, np.flatnonzero(b_for_a >= 0) * d + b_for_a[b_for_a >= 0])].sum())  # noqa: E731
        row = {"d_sae": d, "d_in": int(wa.shape[1]), "candidate_pairs": int(len(keys)), "keys_wall_seconds": t_keys, "keys_cpu_seconds": c_keys,
               "ours_wall_seconds": t_ours, "ours_cpu_seconds": c_ours, "assigned": int((to_b >= 0).sum()), "total_score": total(to_b)}
        solvers = {"ours_cold": lambda: _ours_cold(ps, "act_corr", alive_a, alive_b),
                   "scipy_square": lambda: _scipy_assignment(ps, "act_corr", alive_a, alive_b, True),
                   "scipy_rect": lambda: _scipy_assignment(ps, "act_corr", alive_a, alive_b, False)}
        for name, solve in solvers.items():
            if name == "scipy_rect" and a.no_rectangular or name == "scipy_square" and a.no_scipy:
                continue
            other, t, c = _timed(solve)
            row.update({f"{name}_wall_seconds": t, f"{name}_cpu_seconds": c, f"{name}_total_score": total(other),
                        f"{name}_same_assignment": bool(np.array_equal(other, to_b)), f"{name}_over_ours_cpu": c / max(c_ours, 1e-9)})
            if abs(row[f"{name}_total_score"] - row["total_score"]) > 1e-9 * max(1.0, abs(row["total_score"])):
                raise SystemExit(f"d_sae {d}: {name} and ours disagree on the optimum: {row[f'{name}_total_score']} vs {row['total_score']}")
        row["loadavg"] = list(os.getloadavg())
        rows.append(row)
        print(json.dumps(row), flush=True)
    write_result(a.out, {"benchmark": "B7 matching: candidate pairs and assignment over d_sae", "command": "python benchmarks/b7_matching.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                       "machine": machine(), "compile_wall_seconds": t_jit, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
