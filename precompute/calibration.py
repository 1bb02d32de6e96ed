"""Stage 3, calibration: values fixed before the stream from the first sequences of the sample.

The first min(64, n_sequences) sequences of the sample fix the outlier thresholds and the upper
end of the L2 histogram range (1.5 x the largest L2 seen, rounded up); every shard computes the
same values. L2 values above the range are counted in the last bin, and the number clipped is in
the manifest.

Outliers (METHODS.md section 2): a counted token whose activation norm at the hook exceeds the
threshold: `outlier_norm`, or `outlier_norm_factor` x the mean norm of the model's counted
tokens in the calibration sequences (Study T's 2*sqrt(d_model) after scaling the mean norm to
sqrt(d_model) is factor 2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from explorer import schema
from precompute.forward import ModelRunner
from precompute.prepare import Prepared

MODELS = schema.MODELS
CALIBRATION_SEQUENCES = 64




@dataclass(frozen=True)
class Calibration:
    n_sequences: int
    mean_norm: dict[str, float]
    outlier_threshold: dict[str, float]
    l2_max: float

    def to_dict(self) -> dict[str, Any]:
        return {"n_sequences": self.n_sequences, "mean_norm": self.mean_norm, "outlier_threshold": self.outlier_threshold, "l2_max": self.l2_max}


def _ceil_2sig(x: float) -> float:
    if not np.isfinite(x) or x <= 0:
        return 1.0
    e = math.floor(math.log10(x)) - 1
    return math.ceil(x / 10**e) * 10**e


def calibrate(prep: Prepared, runners: dict[str, ModelRunner]) -> Calibration:
    import torch

    n = min(CALIBRATION_SEQUENCES, prep.sample.n_sequences)
    bs = prep.cfg.sample.batch_size
    norms = {m: [] for m in MODELS}
    l2s = []
    with torch.inference_mode():
        for i in range(0, n, bs):
            tok_np = prep.sample.tokens[i : min(i + bs, n)]
            tokens = torch.from_numpy(tok_np.astype(np.int64)).to(prep.device)
            counted = ~np.isin(tok_np, prep.special_ids)
            xs = {m: runners[m].acts(tokens) for m in MODELS}
            for m in MODELS:
                norms[m].append(xs[m].float().norm(dim=-1).cpu().numpy()[counted])  # .float(): half-precision models
            l2s.append((xs["base"].float() - xs["finetuned"].float()).norm(dim=-1).cpu().numpy().ravel())
    mean_norm = {m: float(np.concatenate(norms[m]).astype(np.float64).mean()) if sum(len(a) for a in norms[m]) else float("nan") for m in MODELS}
    th = prep.cfg.thresholds
    if th.outlier_norm is not None:
        thr = {m: float(th.outlier_norm) for m in MODELS}
    else:
        thr = {m: float(th.outlier_norm_factor * mean_norm[m]) if np.isfinite(mean_norm[m]) else float("inf") for m in MODELS}
    l2_max = _ceil_2sig(1.5 * float(np.concatenate(l2s).max()))
    return Calibration(n, mean_norm, thr, l2_max)

