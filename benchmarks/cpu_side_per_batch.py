"""The stream's CPU-side work per batch at gemma-2-2b width, without a model: what bounds the GPU path.

    python benchmarks/cpu_side_per_batch.py [--reps 3] [--sources 2] [--out FILE]

One 4096-token batch (32 x 128) of random activations at d_model 2304 and, per model, random
sparse feature activations of two 16k SAEs at L0 64, through the accumulators the stream updates
per batch (precompute/accumulators.py), one thread: QualityStats per (SAE, model) (with the
checkout's precompute/hook_moments.py, the activations' reductions once per model and only the
reconstruction error per SAE, as the stream does), FeatureStats / TopK / QuantileSample per (SAE,
model), PairStats per SAE, CrossProducts on 20 candidate pairs per feature. Printed: CPU seconds
per part, and the total for one batch with two SAEs on two models (the GPU check's setup). On a
GPU the torch work of a batch takes well under a second, so this total bounds tokens/s: 4096 /
total. QualityStats' part here runs on the CPU; in a GPU run its reductions run on the GPU.

It imports precompute from the checkout it is run in (`python benchmarks/cpu_side_per_batch.py`
from the repository root), so that two checkouts can be measured side by side in one loop.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path.cwd()))

T, D_MODEL, D_SAE, L0, N_CAND = 4096, 2304, 16384, 64, 20


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--sources", type=int, default=1, help="corpus sources (per-source sums)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from explorer import schema
    from precompute.accumulators import CrossProducts, FeatureStats, PairStats, QualityStats, QuantileSample, SparseActs, TopK

    try:
        from precompute.hook_moments import HookMoments
    except ImportError:  # a checkout from before the reductions moved to torch
        HookMoments = None
    rng = np.random.default_rng(0)
    S = args.sources
    x = {m: rng.standard_normal((T, D_MODEL), dtype=np.float32) for m in schema.MODELS}
    x_hat = {m: x[m] + 0.1 * rng.standard_normal((T, D_MODEL), dtype=np.float32) for m in schema.MODELS}
    counted = np.ones((32, 128), bool)
    counted[:, 0] = False
    outlier = np.zeros((32, 128), bool)
    outlier[3, 5] = True  # one outlier token: both variants computed
    src2d = np.repeat((np.arange(32) % S)[:, None], 128, axis=1)
    losses = {k: (rng.random((32, 127)), rng.random((32, 127))) for k in ("clean", "spliced", "zero_ablated")}

    def acts(seed: int) -> SparseActs:
        r = np.random.default_rng(seed)
        t = np.repeat(np.arange(T), L0)
        k = np.unique(t * D_SAE + r.integers(0, D_SAE, T * L0))
        return SparseActs((k // D_SAE).astype(np.int64), (k % D_SAE).astype(np.int64), (r.random(len(k)) + 0.05).astype(np.float32), T)

    A, B = acts(1), acts(2)
    keys = np.unique(rng.integers(0, D_SAE * D_SAE, D_SAE * N_CAND))
    saes = ("base_sae", "finetuned_sae")
    quality = {(s, m): QualityStats(D_MODEL, S) for s in saes for m in schema.MODELS}
    accs = dict(features=FeatureStats(D_SAE, schema.ACT_HIST_EDGES), topk=TopK(D_SAE, 20), quantile=QuantileSample(D_SAE, 150, 0))
    pair, cross = PairStats(D_SAE, 1e-10), CrossProducts(D_SAE, D_SAE, keys)
    l0 = np.full(T, L0)
    reps = []
    for rep in range(args.reps):
        t: dict[str, float] = {}
        c = time.process_time()
        for m in schema.MODELS:  # 2 SAEs on each model
            mo = HookMoments(x[m], counted, outlier, src2d, S) if HookMoments is not None else None
            for s in saes:
                kw = {"moments": mo} if mo is not None else {}
                quality[(s, m)].update(x[m], x_hat[m], l0, counted, outlier, losses, src2d, **kw)
        t["quality (2 SAEs x 2 models)"] = time.process_time() - c
        for name, acc in accs.items():
            c = time.process_time()
            acc.update(A)
            t[f"{name} (1 SAE, model)"] = time.process_time() - c
        c = time.process_time()
        pair.update(A, B)
        t["pair (1 SAE)"] = time.process_time() - c
        c = time.process_time()
        cross.update(A, B)
        t["cross (candidates)"] = time.process_time() - c
        total = t["quality (2 SAEs x 2 models)"] + 4 * sum(t[f"{n} (1 SAE, model)"] for n in accs) + 2 * t["pair (1 SAE)"] + t["cross (candidates)"]
        t["total per batch (2 SAEs x 2 models)"] = total
        reps.append(t)
        print(rep, {k: round(v, 3) for k, v in t.items()}, f"-> bound {T / total:,.0f} tokens/s", flush=True)
    med = {k: float(np.median([r[k] for r in reps])) for k in reps[0]}
    print("median:", {k: round(v, 3) for k, v in med.items()})
    if args.out:
        args.out.write_text(json.dumps({"checkout": str(Path.cwd()), "hook_moments": HookMoments is not None, "sources": S, "reps": reps, "median": med}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
