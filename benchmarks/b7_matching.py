"""B7, two-SAE matching alone: candidate pairs and the one-to-one assignment over SAE widths.

    python benchmarks/b7_matching.py --pair benchmarks/_work/wide512 --widths 16384 65536

On a wide pair's SAEs (benchmarks/wide_pair.py): `precompute.weights.candidate_pair_keys` (each
feature's 10 nearest decoder directions in the other SAE, both directions: one blocked pass over
A B^T, no d_sae x d_sae matrix), then `match_candidates` (scipy's LAPJVsp,
min_weight_full_bipartite_matching, on the candidate graph plus one private "unassigned" column
per base feature). The activation correlations, which a run accumulates, are stood in for by the
decoder cosine plus Gaussian noise (sd 0.1): the assignment's cost depends on the graph and the
score spread, not on where the scores come from. Times are wall and CPU seconds, 1 thread.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks._common import machine, write_result  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pair", type=Path, required=True)
    p.add_argument("--widths", type=int, nargs="+", required=True)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "b7_matching.json")
    a = p.parse_args(argv)
    import os

    import numpy as np
    import torch
    from safetensors.torch import load_file

    from precompute import weights as W

    torch.set_num_threads(1)
    rows = []
    for d in a.widths:
        saes = a.pair / "saes" / str(d)
        wa, wb = (W.unit_rows(load_file(str(saes / s / "sae_weights.safetensors"))["W_dec"]) for s in ("base_sae", "finetuned_sae"))
        t0, c0 = time.perf_counter(), time.process_time()
        keys = W.candidate_pair_keys(wa, wb, 10)
        t_keys, c_keys = time.perf_counter() - t0, time.process_time() - c0
        pa_, pb_ = keys // d, keys % d
        cos = (wa[torch.from_numpy(pa_)] * wb[torch.from_numpy(pb_)]).sum(1).numpy().astype(np.float64)
        corr = np.clip(cos + np.random.default_rng(0).normal(0, 0.1, len(cos)), -1, 1)
        t0, c0 = time.perf_counter(), time.process_time()
        m = W.match_candidates(keys, corr, wa, wb)
        row = {"d_sae": d, "d_in": int(wa.shape[1]), "candidate_pairs": int(len(keys)), "keys_wall_seconds": t_keys, "keys_cpu_seconds": c_keys,
               "assignment_wall_seconds": time.perf_counter() - t0, "assignment_cpu_seconds": time.process_time() - c0,
               "assigned": int((m.assigned_b_for_a >= 0).sum()), "loadavg": list(os.getloadavg())}
        rows.append(row)
        print(json.dumps(row), flush=True)
    write_result(a.out, {"benchmark": "B7 matching: candidate pairs and assignment over d_sae", "command": "python benchmarks/b7_matching.py " + " ".join(argv or sys.argv[1:]),
                         "machine": machine(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
