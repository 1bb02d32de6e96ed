"""The stream's CPU-side work per batch at gemma-2-2b width, without a model: what bounds the GPU path.

    python benchmarks/cpu_side_per_batch.py [--batches 8] [--warm-tokens 0 1000000 ...] [--sources 2] [--threads 0 2] [--out FILE]

A stream of fresh 4096-token batches (32 x 128, global token indices increasing as in a run) at
d_model 2304, with per model and SAE (two 16k SAEs) sparse feature activations drawn as an SAE's
are: feature densities log-spread over four decades (1e-5 to 1e-1 before scaling) with mean L0 64,
lognormal values, and the finetuned model's entries the base model's with 10% moved to other
features and values perturbed (so that features co-fire on the two models as a transfer does).
Each batch goes through the accumulators the stream updates (precompute/accumulators.py):
QualityStats per (SAE, model) (the activations' reductions once per model, precompute/
hook_moments.py), FeatureStats / TopK / QuantileSample per (SAE, model), PairStats and
KLCorrStats per SAE, CrossProducts on 20 candidate pairs per feature.

Printed per batch: CPU seconds per part and the batch's total with two SAEs on two models (the
GPU check's setup). The first batches are the most expensive (every entry enters the top-k and
quantile samples while they fill); the "steady" line is the median over the last third of the
batches. On a GPU the torch work of a batch takes well under a second, so the total bounds
tokens/s: 4096 / total. QualityStats' part runs here on the CPU; in a GPU run its reductions run on
the GPU.

With `--threads 0 1 N`, the sparse accumulators of every batch then run again as the stream runs
them (precompute.stream.BatchUpdates; 0: in the calling thread), once per thread count: their wall
time per batch, and whether the states are bitwise equal to the serial run's.

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

B, C, D_MODEL, D_SAE, L0, N_CAND = 32, 128, 2304, 16384, 64, 20
T = B * C
SAES = ("base_sae", "finetuned_sae")


def densities(seed: int) -> np.ndarray:
    """Per-feature firing probabilities, log-uniform over four decades, scaled to mean L0."""
    r = np.random.default_rng(seed)
    p = 10.0 ** r.uniform(-5, -1, D_SAE)
    return np.minimum(p * (L0 / p.sum()), 0.5)


def draw_batch(rng: np.random.Generator, dens: dict[str, np.ndarray], b: int, S: int):
    """One batch's SparseActs per (SAE, model), as the stream builds them (gidx = b * T + t)."""
    from precompute.accumulators import SparseActs

    src_flat = np.repeat(np.arange(B) % S, C)
    n_by_source = np.bincount(src_flat, minlength=S).astype(np.int64)
    out = {}
    for s in SAES:
        counts = rng.binomial(T, dens[s])
        f = np.repeat(np.arange(D_SAE), counts)
        t = rng.integers(0, T, len(f))
        kb = np.unique(t * D_SAE + f)
        move = rng.random(len(kb)) < 0.1  # the finetune: 10% of the entries move to other features
        kf = kb.copy()
        kf[move] = (kb[move] // D_SAE) * D_SAE + rng.integers(0, D_SAE, int(move.sum()))
        kf = np.unique(kf)
        for m, k in (("base", kb), ("finetuned", kf)):
            tt, ff = k // D_SAE, k % D_SAE
            v = rng.lognormal(0.0, 0.6, len(k)).astype(np.float32)
            out[(s, m)] = SparseActs(b * T + tt, ff.astype(np.int64), v, T, src_flat[tt], n_by_source)
    return out


def warm(st: dict, dens: dict[str, np.ndarray], n_tokens: int, seed: int) -> None:
    """Set the top-k and quantile samples to what `n_tokens` earlier tokens (global indices below
    the batches') leave in them, drawn from the same distribution instead of streamed: feature i
    has fired m_i ~ Binomial(n_tokens, p_i) times; its quantile sample holds the min(150, m_i)
    smallest of m_i uniform priorities (the order statistics, by exponential spacings), its top-k
    the min(20, m_i) largest of m_i lognormal values (upper quantiles). Only the per-entry filters'
    thresholds matter for what the next batches cost, and these have the streamed state's
    distribution."""
    from scipy.stats import norm

    from precompute.accumulators import INT64_MAX

    if n_tokens <= 0:
        return
    r = np.random.default_rng(seed)
    for (s, m), q in st["quantile"].items():
        seen = r.binomial(n_tokens, dens[s])
        k = q.size
        gaps = r.exponential(1.0, (D_SAE, k)).cumsum(axis=1) / np.maximum(seen, 1)[:, None]
        q.priority[:] = np.minimum(gaps * float(INT64_MAX), float(INT64_MAX) - 1024).astype(np.int64)
        filled = np.arange(k)[None, :] < seen[:, None]
        q.priority[~filled] = INT64_MAX
        q.token[:] = np.where(filled, r.integers(0, n_tokens, (D_SAE, k)), -1)
        q.value[:] = np.where(filled, r.lognormal(0.0, 0.6, (D_SAE, k)), 0).astype(np.float32)
        tk = st["topk"][(s, m)]
        kk = tk.k
        u = r.exponential(1.0, (D_SAE, kk)).cumsum(axis=1) / np.maximum(seen, 1)[:, None]  # upper tail probabilities, ascending
        v = np.exp(0.6 * norm.isf(np.clip(u, 1e-300, 1.0))).astype(np.float32)  # descending values
        filled = np.arange(kk)[None, :] < seen[:, None]
        tk.value[:] = np.where(filled, v, -np.inf)
        tk.token[:] = np.where(filled, r.integers(0, n_tokens, (D_SAE, kk)), -1)


def main(argv: list[str] | None = None) -> int:
    global D_MODEL, D_SAE  # the functions above read the sizes from the module (tests/test_benchmarks_smoke.py runs a tiny one)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--warm-tokens", type=int, nargs="+", default=[0, 1_000_000, 10_000_000],
                    help="start from the top-k and quantile samples as after this many tokens (one pass per value)")
    ap.add_argument("--sources", type=int, default=1, help="corpus sources (per-source sums)")
    ap.add_argument("--threads", type=int, nargs="*", default=[], help="also time the sparse accumulators on these thread counts")
    ap.add_argument("--d-model", type=int, default=D_MODEL)
    ap.add_argument("--d-sae", type=int, default=D_SAE)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    D_MODEL, D_SAE = args.d_model, args.d_sae
    import torch

    torch.set_num_threads(1)
    from explorer import schema
    from precompute.accumulators import CrossProducts, FeatureStats, KLCorrStats, PairStats, QualityStats, QuantileSample, TopK, cofire_hits
    from precompute.hook_moments import HookMoments

    rng = np.random.default_rng(0)
    S = args.sources
    models = schema.MODELS
    x = {m: rng.standard_normal((T, D_MODEL), dtype=np.float32) for m in models}
    x_hat = {m: x[m] + 0.1 * rng.standard_normal((T, D_MODEL), dtype=np.float32) for m in models}
    counted = np.ones((B, C), bool)
    counted[:, 0] = False
    outlier = np.zeros((B, C), bool)
    outlier[3, 5] = True  # one outlier token: both variants computed
    src2d = np.repeat((np.arange(B) % S)[:, None], C, axis=1)
    kl_tok = rng.random(T)
    kl_tok[::C] = np.nan
    l0 = np.full(T, L0)
    dens = {s: densities(i + 1) for i, s in enumerate(SAES)}
    keys = np.unique(rng.integers(0, D_SAE * D_SAE, D_SAE * N_CAND))

    def fresh_state():
        return dict(
            quality={(s, m): QualityStats(D_MODEL, S) for s in SAES for m in models},
            features={(s, m): FeatureStats(D_SAE, schema.ACT_HIST_EDGES, S) for s in SAES for m in models},
            topk={(s, m): TopK(D_SAE, 20) for s in SAES for m in models},
            quantile={(s, m): QuantileSample(D_SAE, 150, 0) for s in SAES for m in models},
            pairs={s: PairStats(D_SAE, 1e-10, S) for s in SAES},
            kl_corr={s: KLCorrStats(D_SAE) for s in SAES},
            cross=CrossProducts(D_SAE, D_SAE, keys),
        )

    results = {}
    for n_warm in args.warm_tokens:
        b0 = -(-n_warm // T)  # the batches' global token indices come after the warm-up's
        batches = [draw_batch(np.random.default_rng(100 + b), dens, b0 + b, S) for b in range(args.batches)]
        nnz = float(np.mean([len(a.feature) for bt in batches for a in bt.values()]))
        print(f"warm {n_warm:,} tokens: {args.batches} batches of {T} tokens; mean nnz per (SAE, model) {nnz:,.0f} (L0 {nnz / T:.1f})", flush=True)

        def warm_state():
            st = fresh_state()
            warm(st, dens, n_warm, 7)
            return st

        st = warm_state()
        rows = []
        for b, acts in enumerate(batches):
            t: dict[str, float] = {}
            c = time.process_time()
            for m in models:
                mo = HookMoments(x[m], counted, outlier, src2d, S)
                for s in SAES:
                    st["quality"][(s, m)].update(None, x_hat[m], l0, counted, outlier, None, src2d, moments=mo)
            t["quality"] = time.process_time() - c
            for kind in ("features", "topk", "quantile"):
                c = time.process_time()
                for key, a in acts.items():
                    st[kind][key].update(a)
                t[kind] = time.process_time() - c
            c = time.process_time()
            for s in SAES:
                hits = cofire_hits(acts[(s, "base")], acts[(s, "finetuned")], D_SAE)
                st["pairs"][s].update(acts[(s, "base")], acts[(s, "finetuned")], hits)
                st["kl_corr"][s].update(acts[(s, "base")], acts[(s, "finetuned")], kl_tok, (b0 + b) * T, hits)
            t["pairs + kl_corr"] = time.process_time() - c
            c = time.process_time()
            st["cross"].update(acts[("base_sae", "base")], acts[("finetuned_sae", "finetuned")])
            t["cross"] = time.process_time() - c
            t["sparse total"] = sum(v for k, v in t.items() if k != "quality")
            t["total"] = t["sparse total"] + t["quality"]
            rows.append(t)
            print(" ", b, {k: round(v, 3) for k, v in t.items()}, flush=True)
        med = {k: float(np.median([r[k] for r in rows])) for k in rows[0]}
        print(f"median (warm {n_warm:,}):", {k: round(v, 3) for k, v in med.items()},
              f"-> bound {T / med['total']:,.0f} tokens/s; with quality on the GPU {T / med['sparse total']:,.0f}", flush=True)
        threaded = time_threads(args.threads, batches, warm_state, kl_tok, st, b0) if args.threads else {}
        results[n_warm] = {"nnz": nnz, "rows": rows, "median": med, "threads": threaded}
    if args.out:
        args.out.write_text(json.dumps({"checkout": str(Path.cwd()), "sources": S, "batches": args.batches, "results": results}, indent=1))
    return 0


def time_threads(thread_counts, batches, fresh_state, kl_tok, serial_state, b0: int = 0) -> dict:
    """The sparse accumulators of every batch as the stream runs them (precompute.stream's
    sparse_update_tasks through BatchUpdates) on each thread count, side by side: wall and CPU
    seconds per batch, and whether every state array is bitwise the serial run's above. The
    calling thread only submits here (in the stream it runs the next batch's forwards meanwhile)."""
    from types import SimpleNamespace

    from precompute.stream import BatchUpdates, sparse_update_tasks

    out = {}
    for n in thread_counts:
        st = fresh_state()
        ns = SimpleNamespace(sae_names=SAES, d_sae={s: D_SAE for s in SAES}, twin=None, twin_features=None,
                             cross={"finetuned_sae": st["cross"]}, **{k: st[k] for k in ("features", "topk", "quantile", "pairs", "kl_corr")})
        w, c = time.perf_counter(), time.process_time()
        with BatchUpdates(n) as updates:
            for b, acts in enumerate(batches):
                sparse = {s: {m: acts[(s, m)] for m in ("base", "finetuned")} for s in SAES}
                updates.submit(sparse_update_tasks(ns, sparse, kl_tok, (b0 + b) * T))
        w, c = time.perf_counter() - w, time.process_time() - c
        same = all(
            np.array_equal(va, vb, equal_nan=True)
            for kind in ("features", "topk", "quantile", "pairs", "kl_corr")
            for key in st[kind]
            for va, vb in zip(st[kind][key].state().values(), serial_state[kind][key].state().values())
        ) and all(np.array_equal(a, b) for a, b in zip(st["cross"].state().values(), serial_state["cross"].state().values()))
        out[n] = {"wall_per_batch": w / len(batches), "cpu_per_batch": c / len(batches), "bitwise_equal_to_serial": bool(same)}
        print(f"  update threads {n}: wall {w / len(batches):.3f} s, CPU {c / len(batches):.3f} s per batch; states bitwise the serial run's: {same}", flush=True)
    return out


if __name__ == "__main__":
    sys.exit(main())
