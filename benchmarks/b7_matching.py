"""B7, two-SAE matching alone: candidate pairs and the one-to-one assignment over SAE widths.

    python benchmarks/b7_matching.py --widths 16384 32768 65536 131072            # synthetic decoders, d_in 256
    python benchmarks/b7_matching.py --pair benchmarks/_work/wide512 --widths 16384 65536
    python benchmarks/b7_matching.py --smoke --out X.json                          # the test suite

Per width, decoders as benchmarks/wide_pair.py draws them (families of directions; the finetuned
SAE's rows perturbed, 10% replaced), from a wide pair's SAEs (--pair) or drawn here (--d-in).
Then `precompute.weights.candidate_pair_keys` (each feature's 10 nearest decoder directions in
the other SAE, both directions: one blocked pass over A B^T, no d_sae x d_sae matrix) and the
assignment, timed side by side on the same candidate graph:

    square       `precompute.weights.assignment`: scipy's LAPJVsp on the square graph of
                 `_square_candidate_graph` (what a run does);
    rectangular  the formulation before it (each A feature's private "unassigned" column, a
                 d_a x (d_b + d_a) graph), on which LAPJVsp skips its initialisation;

with their total scores compared (the same optimum). The activation correlations, which a run
accumulates, are stood in for by the decoder cosine plus Gaussian noise (sd 0.1): the
assignment's cost depends on the graph and the score spread, not on where the scores come from.
2% of the features on each side are dead (excluded, as in a run). Wall and CPU seconds, 1 thread.
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


def rectangular_assignment(ps, kind: str, alive_a, alive_b):
    """The candidate assignment as it was: a d_a x (d_b + d_a) graph, real pairs at 2 - score, a
    private dummy column per A feature at 4 (kept here only to time against the square graph)."""
    import numpy as np
    import scipy.sparse as sp
    from scipy.sparse.csgraph import min_weight_full_bipartite_matching

    score = ps.score(kind)
    ia, ib = ps.rows_cols()
    ok = alive_a[ia] & alive_b[ib]
    ia, ib, sc = ia[ok], ib[ok], score[ok]
    rows = np.concatenate([ia, np.arange(ps.d_a)])
    cols = np.concatenate([ib, ps.d_b + np.arange(ps.d_a)])
    costs = np.concatenate([2.0 - sc, np.full(ps.d_a, 4.0)])
    rr, cc = min_weight_full_bipartite_matching(sp.csr_matrix((costs, (rows, cols)), shape=(ps.d_a, ps.d_b + ps.d_a)))
    real = (cc < ps.d_b) & alive_a[rr]
    out = np.full(ps.d_a, -1, np.int64)
    out[rr[real]] = cc[real]
    return out


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
    p.add_argument("--no-rectangular", action="store_true", help="skip the old formulation (it grows with d_sae squared)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="two tiny widths (the test suite)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "b7_matching.json")
    a = p.parse_args(argv)
    import numpy as np
    import torch

    from precompute import weights as W

    torch.set_num_threads(1)
    widths, d_in = ([512, 1024], 32) if a.smoke else (a.widths, a.d_in)
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
        (to_b, _), t_sq, c_sq = _timed(W.assignment, ps, "act_corr", alive_a, alive_b)
        total = lambda b_for_a: float(corr[np.searchsorted(keys, np.flatnonzero(b_for_a >= 0) * d + b_for_a[b_for_a >= 0])].sum())  # noqa: E731
        row = {"d_sae": d, "d_in": int(wa.shape[1]), "candidate_pairs": int(len(keys)), "keys_wall_seconds": t_keys, "keys_cpu_seconds": c_keys,
               "square_wall_seconds": t_sq, "square_cpu_seconds": c_sq, "assigned": int((to_b >= 0).sum()), "total_score": total(to_b)}
        if not a.no_rectangular:
            old, t_rect, c_rect = _timed(rectangular_assignment, ps, "act_corr", alive_a, alive_b)
            row.update(rectangular_wall_seconds=t_rect, rectangular_cpu_seconds=c_rect, rectangular_assigned=int((old >= 0).sum()),
                       rectangular_total_score=total(old), same_assignment=bool(np.array_equal(old, to_b)),
                       rectangular_over_square_cpu=c_rect / max(c_sq, 1e-9))
            if abs(row["rectangular_total_score"] - row["total_score"]) > 1e-9 * max(1.0, abs(row["total_score"])):
                raise SystemExit(f"d_sae {d}: the two formulations disagree on the optimum: {row['total_score']} vs {row['rectangular_total_score']}")
        row["loadavg"] = list(os.getloadavg())
        rows.append(row)
        print(json.dumps(row), flush=True)
    write_result(a.out, {"benchmark": "B7 matching: candidate pairs and assignment over d_sae", "command": "python benchmarks/b7_matching.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                       "machine": machine(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
