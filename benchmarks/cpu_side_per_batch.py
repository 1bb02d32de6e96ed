"""The stream's CPU-side work per batch at gemma-2-2b width, without a model: what bounds the GPU path.

    python benchmarks/cpu_side_per_batch.py

One 4096-token batch (32 x 128) of random activations at d_model 2304, and random sparse feature
activations of a 16k SAE at L0 64 (two independent sets: base and finetuned), through the
accumulators the stream updates per batch (precompute/accumulators.py, numpy, one thread):
QualityStats per (SAE, model), FeatureStats / TopK / QuantileSample per (SAE, model), PairStats per
SAE, CrossProducts on 20 candidate pairs per feature. Printed: CPU seconds per accumulator, and the
total for one batch with two SAEs on two models (the GPU check's setup). On a GPU the torch work of
a batch takes well under a second, so this total bounds tokens/s: 4096 / total.
"""
import sys
import time
from pathlib import Path

import numpy as np
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from precompute.accumulators import QualityStats, FeatureStats, TopK, QuantileSample, PairStats, CrossProducts, SparseActs
from explorer import schema
rng = np.random.default_rng(0)
T, d, D, L0 = 4096, 2304, 16384, 64
x = rng.standard_normal((T, d), dtype=np.float32); xh = x + 0.1 * rng.standard_normal((T, d), dtype=np.float32)
counted = np.ones((32, 128), bool); counted[:, 0] = False; outl = np.zeros((32, 128), bool)
losses = {k: (rng.random((32, 127)), rng.random((32, 127))) for k in ("clean", "spliced", "zero_ablated")}
def acts(seed):
    r = np.random.default_rng(seed); n = T * L0
    t = np.repeat(np.arange(T), L0); f = r.integers(0, D, n); k = np.unique(t * D + f)
    return SparseActs((k // D).astype(np.int64), (k % D).astype(np.int64), (r.random(len(k)) + 0.05).astype(np.float32), T)
A, B = acts(1), acts(2)
keys = np.unique(rng.integers(0, D * D, D * 20))
accs = dict(feat=FeatureStats(D, schema.ACT_HIST_EDGES), topk=TopK(D, 20), quant=QuantileSample(D, 150, 0))
q = QualityStats(); pair = PairStats(D, 1e-10); cross = CrossProducts(D, D, keys)
l0 = np.full(T, L0)
for rep in range(2):
    t = {}
    c = time.process_time(); q.update(x, xh, l0, counted, outl, losses); t["quality (1 sae,model)"] = time.process_time() - c
    for name, acc in accs.items():
        c = time.process_time(); acc.update(A); t[name] = time.process_time() - c
    c = time.process_time(); pair.update(A, B); t["pair"] = time.process_time() - c
    c = time.process_time(); cross.update(A, B); t["cross (candidates)"] = time.process_time() - c
    print(rep, {k: round(v, 3) for k, v in t.items()}, "per batch, 2 SAEs x 2 models:", round(4 * sum(t[k] for k in ("quality (1 sae,model)", "feat", "topk", "quant")) + 2 * t["pair"] + t["cross (candidates)"], 2), "s CPU")
