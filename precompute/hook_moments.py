"""The dense reductions of one batch's activations at the hook, on the activations' own device.

`QualityStats` (precompute/accumulators.py) needs, per batch, sums over [T, d] activations in
float64: each token's squared norm and element sum, per outlier variant and source the sum of x
and each token's squared distance from the selection's mean (the legacy explained variance's
denominator), and per SAE each token's squared reconstruction error. Computed in numpy on the
CPU they were about a third of the stream's per-batch CPU work at d_model 2,304 (and serial with
a GPU's work), and everything but the reconstruction error was computed again for every SAE.

`HookMoments` computes the SAE-independent part once per (model, batch), on the device the
activations are on: in torch on a GPU (the [T, d] float64 copies never leave it; what comes back
to the CPU is [T]- and [S, d]-sized), in numpy on the CPU (where numpy's float64 reductions are
2-3x faster than torch's: `python benchmarks/cpu_side_per_batch.py`). Each SAE adds only
`sqerr(x_hat)`. Masks and source codes stay numpy (they are [B, C]). The code below is written
once for both: numpy arrays and torch tensors share `*`, `-`, `**`, `.sum(axis=)` and
`.mean(axis=)`; only taking rows and coming back to numpy differ (`_take`, `_np`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class VariantMoments:
    """One outlier variant's tokens: `m` [T] bool, their sources `sm`, each token's squared distance
    from the mean of the variant's tokens (`var`), and per source (sel: positions within the
    variant's tokens, None with one source; sum of x [d]; the distances from that source's mean, or
    None where the source has no token)."""

    m: np.ndarray
    sm: np.ndarray
    var: np.ndarray
    per_source: list[tuple[np.ndarray | None, np.ndarray, np.ndarray | None]] = field(default_factory=list)


def _np(a) -> np.ndarray:
    """A numpy array of a numpy array or a torch tensor on any device."""
    return a if isinstance(a, np.ndarray) else a.cpu().numpy()


def _take(x, rows: np.ndarray):
    """x[rows] for numpy or torch (the row indices moved to the tensor's device)."""
    if isinstance(x, np.ndarray):
        return x[rows]
    import torch

    return x[torch.from_numpy(rows).to(x.device)]


def _float64(x, in_torch: bool | None = None):
    """x as float64 [T, d]: a torch tensor on its device for a tensor off the CPU (or with
    in_torch=True), numpy otherwise."""
    import torch

    if in_torch or (in_torch is None and isinstance(x, torch.Tensor) and x.device.type != "cpu"):
        t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
        return t.reshape(-1, t.shape[-1]).to(torch.float64)
    if isinstance(x, torch.Tensor):
        x = x.float().numpy() if x.dtype != torch.float32 else x.numpy()  # numpy has no bfloat16
    return np.asarray(x).reshape(-1, x.shape[-1]).astype(np.float64)


def _sq_dist_from_mean(x) -> np.ndarray:
    """||x_t - mean_t(x)||^2 per row, as numpy float64 (empty in, empty out)."""
    if x.shape[0] == 0:
        return np.zeros(0)
    return _np(((x - x.mean(axis=0)) ** 2).sum(axis=1))


class HookMoments:
    """The SAE-independent reductions of one model's batch of activations (see the module doc)."""

    def __init__(self, x, counted: np.ndarray, outlier: np.ndarray, source: np.ndarray | None = None, n_sources: int = 1, in_torch: bool | None = None):
        # [T, d] float64 on the activations' device; in_torch=True forces torch on the CPU (the GPU path's code, tested on a CPU)
        self.x = _float64(x, in_torch)
        self.d_in = int(self.x.shape[1])
        self.src2d = np.zeros(counted.shape, np.int64) if source is None else np.asarray(source, np.int64)
        src = self.src2d.reshape(-1)
        self.n_out = int((counted & outlier).sum())
        self.xsq = _np((self.x * self.x).sum(axis=1))
        self.xsum = _np(self.x.sum(axis=1))
        self.variants: list[VariantMoments] = []
        for v, mask2d in enumerate((counted, counted & ~outlier)):
            if v == 1 and self.n_out == 0:  # without outlier tokens both variants cover the same tokens
                self.variants.append(self.variants[0])
                continue
            m = mask2d.reshape(-1)
            sm = src[m]
            xm = _take(self.x, np.flatnonzero(m))
            vm = VariantMoments(m, sm, _sq_dist_from_mean(xm))
            for s_ in range(n_sources):
                if n_sources == 1:
                    sel, xs, var = None, xm, vm.var
                else:
                    sel = np.flatnonzero(sm == s_)
                    xs = _take(xm, sel)
                    var = _sq_dist_from_mean(xs)
                if xs.shape[0] == 0:
                    vm.per_source.append((sel, np.zeros(self.d_in), None))
                else:
                    vm.per_source.append((sel, _np(xs.sum(axis=0)), var))
            self.variants.append(vm)

    def sqerr(self, x_hat) -> np.ndarray:
        """||x_t - x_hat_t||^2 per token (float64, numpy) for one SAE's reconstruction."""
        in_torch = not isinstance(self.x, np.ndarray)
        xh = _float64(x_hat, in_torch)
        if in_torch:
            xh = xh.to(self.x.device)
        return _np(((self.x - xh) ** 2).sum(axis=1))
