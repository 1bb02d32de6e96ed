"""The crosscoder's accumulators (issue 16): per latent, what the stream folds in batch by batch.

A library (no stage imports): `CrosscoderStats.update_batch` is handed the crosscoder's codec
(explorer.crosscoder.CrosscoderCodec) and the models' runners by the stream.

Which tokens count: the run's counted tokens (special tokens excluded, precompute/stream.py). At
each counted token t the crosscoder reads both models' activations and gives one activation f_j(t)
per latent j (`Crosscoder.encode`). "On model m" means the latent's share of model m's
reconstruction, f_j(t) * d_j^m (d_j^m = W_dec[m, j]):

* activation statistics (density, mean, max, histogram, top and quantile examples) are of f_j(t);
  the windows show f_j(t) * ||d_j^m|| on each model's line (the norm of what the latent writes
  into model m's reconstruction), so one ranking serves both models;
* density on model m (features table) = share of counted tokens where f_j(t) > 0 and d_j^m != 0.

Reconstruction quality per model (QualityStats, as for the SAEs: L0, MSE, sae_lens 6.54's
`explained_variance` (pooled over the counted tokens) and `explained_variance_legacy` (its old
per-token formula), CE clean / spliced / zero-ablated, both outlier variants).

Latent Scaling (Minder et al. 2025, "Overcoming Sparsity Artifacts in Crosscoders"; the
diffing-toolkit's `closed_form_scalars`): for latent j, a direction v_j and a target y^m(t) on
model m, the best scalar fit beta = argmin_b sum_t ||b f_j(t) v_j - y^m(t)||^2
= <v_j, sum_t f_j(t) y^m(t)> / (||v_j||^2 sum_t f_j(t)^2), the sums over the counted tokens (tokens
where f_j = 0 add nothing). Targets, in the crosscoder's normalised space (n_m(x) and the
decoder output before denormalisation):
  error          eps_j^m(t) = n_m(x_m(t)) - (xhat_m(t) - f_j(t) d_j^m)   (latent j's own share removed)
  reconstruction r^m(t)     = xhat_m(t)                                    (the full reconstruction)
Only running sums are kept, from the sparse activations (no dense [tokens x latents] array):
  C_j = sum_t f_j^2,  E[m, v]_j = sum_t f_j <v_j, n_m(x_m) - xhat_m>,  R[m, v]_j = sum_t f_j <v_j, xhat_m>,
so beta_error = (E + C <v_j, d_j^m>) / (||v_j||^2 C) and beta_recon = R / (||v_j||^2 C). Minder et
al. fit the finetuned decoder direction v_j = d_j^F on both models (d_j^B of a finetune-only latent
is about 0): nu_error = beta_error^B / beta_error^F, nu_recon = beta_recon^B / beta_recon^F; a
finetune-only latent with nu near 0 is really absent from the base, one with nu near 1 is an
artefact (the base model needs the same direction). The mirror (v_j = d_j^B, nu = beta^F / beta^B)
is kept for base-only latents.
"""

from __future__ import annotations

import numpy as np

from explorer import schema
from precompute.accumulators import FeatureStats, QualityStats, QuantileSample, SparseActs, TopK, _Stateful

MODELS = schema.MODELS
DIRECTIONS = ("finetuned", "base")  # v_j = d_j^F (Minder et al.), d_j^B (the mirror)
DOT_CHUNK = 1 << 15  # sparse entries per chunk of the dot products (memory: chunk x d_in x 8 bytes)


class LatentScalingSums(_Stateful):
    """C_j, E[m, v]_j and R[m, v]_j of the module docstring (float64, mergeable by addition)."""

    FIELDS = ("c2", "err", "rec")

    def __init__(self, d_sae: int):
        self.d_sae = d_sae
        self.c2 = np.zeros(d_sae, np.float64)
        self.err = np.zeros((len(MODELS), len(DIRECTIONS), d_sae), np.float64)
        self.rec = np.zeros((len(MODELS), len(DIRECTIONS), d_sae), np.float64)

    def update(self, j: np.ndarray, v: np.ndarray, proj_err: np.ndarray, proj_rec: np.ndarray) -> None:
        """j, v: the entries' latents and f; proj_*: [models, directions, nnz] <v_j, target_t>."""
        self.c2 += np.bincount(j, weights=v.astype(np.float64) ** 2, minlength=self.d_sae)
        for m in range(len(MODELS)):
            for d in range(len(DIRECTIONS)):
                self.err[m, d] += np.bincount(j, weights=v * proj_err[m, d], minlength=self.d_sae)
                self.rec[m, d] += np.bincount(j, weights=v * proj_rec[m, d], minlength=self.d_sae)

    def merge(self, other: "LatentScalingSums") -> None:
        self.c2 += other.c2
        self.err += other.err
        self.rec += other.rec

    def finalize(self, W_dec: np.ndarray) -> dict[str, np.ndarray]:
        """W_dec [2, d_sae, d_in] (float64) -> betas [models, directions, d_sae] and the ratios."""
        vecs = {"finetuned": W_dec[1], "base": W_dec[0]}
        beta_err = np.full((len(MODELS), len(DIRECTIONS), self.d_sae), np.nan)
        beta_rec = np.full_like(beta_err, np.nan)
        with np.errstate(invalid="ignore", divide="ignore"):
            for d, name in enumerate(DIRECTIONS):
                v = vecs[name]
                denom = (v * v).sum(1) * self.c2
                ok = denom > 0
                for m in range(len(MODELS)):
                    own = (v * W_dec[m]).sum(1)  # <v_j, d_j^m>
                    beta_err[m, d] = np.where(ok, (self.err[m, d] + self.c2 * own) / np.where(ok, denom, 1), np.nan)
                    beta_rec[m, d] = np.where(ok, self.rec[m, d] / np.where(ok, denom, 1), np.nan)
            b, f = MODELS.index("base"), MODELS.index("finetuned")
            vf, vb = DIRECTIONS.index("finetuned"), DIRECTIONS.index("base")
            return {
                "beta_error": beta_err, "beta_recon": beta_rec,
                "nu_error": beta_err[b, vf] / beta_err[f, vf], "nu_recon": beta_rec[b, vf] / beta_rec[f, vf],
                "nu_error_mirror": beta_err[f, vb] / beta_err[b, vb], "nu_recon_mirror": beta_rec[f, vb] / beta_rec[b, vb],
            }


class CrosscoderStats:
    """Every accumulator of the run's crosscoder; `accumulators()` names them for the pass state."""

    def __init__(self, d_sae: int, d_in: int, n_top: int, quantile_sample: int, seed: int):
        self.d_sae, self.d_in = d_sae, d_in
        self.features = FeatureStats(d_sae, schema.ACT_HIST_EDGES)
        self.topk = TopK(d_sae, n_top)
        self.quantile = QuantileSample(d_sae, quantile_sample, seed)
        self.quality = {m: QualityStats(d_in) for m in MODELS}
        self.scaling = LatentScalingSums(d_sae)

    def accumulators(self) -> dict[str, _Stateful]:
        out: dict[str, _Stateful] = {"crosscoder.features": self.features, "crosscoder.topk": self.topk, "crosscoder.quantile": self.quantile}
        for m in MODELS:
            out[f"crosscoder.quality.{m}"] = self.quality[m]
        out["crosscoder.scaling"] = self.scaling
        return out

    def update_batch(self, codec, runners: dict, tokens, xs: dict, counted: np.ndarray, outliers: dict[str, np.ndarray],
                     losses: dict[str, tuple[np.ndarray, np.ndarray]], gidx: np.ndarray) -> None:
        """One stream batch: tokens [B, C] (tensor), xs {model: [B, C, d_in] tensor}, counted/outliers
        [B, C] bool, losses {model: (clean, zero-ablated) per-token [B, C-1], or None without CE on this batch}, gidx [B*C] global token ids."""
        import torch

        cc = codec.cc
        n_b, ctx = counted.shape
        n = n_b * ctx
        counted_flat = counted.reshape(-1)
        x_flat = [xs[m].reshape(n, -1) for m in MODELS]
        with torch.inference_mode():
            t, j, v = codec.encode_sparse(x_flat[0], x_flat[1])
            keep = torch.from_numpy(counted_flat).to(t.device)[t]  # special tokens do not count
            t, j, v = t[keep], j[keep], v[keep]
            counted_t = torch.from_numpy(counted).to(xs[MODELS[0]].device)[..., None]
            l0 = np.bincount(t.cpu().numpy(), minlength=n)
            recon_n, resid_n = [], []
            for mi, m in enumerate(MODELS):
                xhat_n = codec.decode_sparse(t, j, v, n, mi)  # normalised space
                x_hat = cc.denormalize(xhat_n, mi).to(xs[m].dtype)
                recon_n.append(xhat_n)
                resid_n.append(cc.normalize(x_flat[mi], mi) - xhat_n)
                x_hat3 = x_hat.reshape(xs[m].shape)
                outlier = outliers[m]
                ce = None  # losses[m] is None on a batch without CE ([evals] ce_every)
                if losses[m] is not None:
                    spliced = runners[m].loss_with(tokens, torch.where(counted_t, x_hat3, xs[m])).cpu().numpy()
                    if bool((counted & outlier).any()):
                        keep_ex = torch.from_numpy(counted & ~outlier).to(counted_t.device)[..., None]
                        spliced_ex = runners[m].loss_with(tokens, torch.where(keep_ex, x_hat3, xs[m])).cpu().numpy()
                    else:
                        spliced_ex = spliced
                    clean, zero = losses[m]
                    ce = {"clean": (clean, clean), "spliced": (spliced, spliced_ex), "zero_ablated": (zero, zero)}
                self.quality[m].update(x_flat[mi], x_hat, l0, counted, outlier, ce)  # the activations' reductions on their device
            proj_err, proj_rec = self._projections(cc, t, j, recon_n, resid_n)
        t_np, j_np, v_np = t.cpu().numpy(), j.cpu().numpy().astype(np.int64), v.cpu().numpy().astype(np.float32)
        sa = SparseActs(gidx[t_np], j_np, v_np, int(counted_flat.sum()))
        self.features.update(sa)
        self.topk.update(sa)
        self.quantile.update(sa)
        self.scaling.update(j_np, v_np.astype(np.float64), proj_err, proj_rec)

    @staticmethod
    def _projections(cc, t, j, recon_n: list, resid_n: list) -> tuple[np.ndarray, np.ndarray]:
        """<v_j, target_t> per entry, model and direction, in float64, chunked over the entries."""
        import torch

        nnz = len(t)
        proj_err = np.zeros((len(MODELS), len(DIRECTIONS), nnz))
        proj_rec = np.zeros_like(proj_err)
        dirs = {"finetuned": cc.W_dec[1], "base": cc.W_dec[0]}
        for lo in range(0, nnz, DOT_CHUNK):
            tt, jj = t[lo : lo + DOT_CHUNK], j[lo : lo + DOT_CHUNK]
            for d, name in enumerate(DIRECTIONS):
                vec = dirs[name].index_select(0, jj).double()
                for m in range(len(MODELS)):
                    proj_err[m, d, lo : lo + len(tt)] = (vec * resid_n[m].index_select(0, tt).double()).sum(1).cpu().numpy()
                    proj_rec[m, d, lo : lo + len(tt)] = (vec * recon_n[m].index_select(0, tt).double()).sum(1).cpu().numpy()
        return proj_err, proj_rec
