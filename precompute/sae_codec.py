"""Stage 2b, the SAEs: one SAE's encode (as its sparse positive entries) and decode for the stream,
and its encode of chosen features at chosen positions for the example windows (`SaeCodec`)."""

from __future__ import annotations

import math

import numpy as np


class SaeCodec:
    """One SAE's encode, as the sparse positive entries, and its decode, for the stream.

    `encode_decode(x_flat)` returns (token row, feature, value, x_hat) with the entries in
    row-major (token, feature) order: the positive entries of `sae.encode(x)` and
    `sae.decode(sae.encode(x))`. Fast path for plain ReLU and JumpReLU SAEs (SAELens's
    StandardSAE / JumpReLUSAE with no activation normalization, no hook_z reshaping and no hooks
    attached): the pre-activations are `encode`'s (one fused addmm instead of matmul + bias:
    equal to float32 rounding, bitwise on the demo), the positive entries are read off
    `hidden_pre > max(threshold, 0)` (JumpReLU's relu(h) * (h > threshold) is positive exactly
    there, and equals h), and the decode sums only the active decoder rows (`embedding_bag`;
    equal to the dense `acts @ W_dec + b_dec` up to float32 summation order). That skips four
    elementwise passes over the dense [tokens, d_sae] activations and the dense decode matmul
    (B2, benchmarks/RESULTS.md). Any other SAE goes through `sae.encode` / `sae.decode`.

    Features that cannot fire in a batch are not encoded (fast path): by Cauchy-Schwarz a
    pre-activation is at most max_t ||sae_in_t|| * ||W_enc[:, j]|| + b_enc[j], so a feature
    whose bound (widened by 1e-3 relative, far above the float32 rounding of a d_in-term dot
    product) stays below its gate is zero at every token of the batch. On the demo that is a
    third of the features (dead or high-threshold ones); the others' pre-activations come from
    the same addmm on W_enc's remaining columns (equal to float32 rounding, bitwise on the
    demo). The entries and x_hat are those of the full encode. B2."""

    PRUNE_MIN_SHARE = 0.1  # encode a column subset only when it skips at least this share of the features
    PRUNE_MARGIN = 1e-3
    ENCODE_CHUNK_BYTES = 64 << 20  # dense pre-activations per encode chunk
    ENCODE_AT_BLOCK = 128  # encode_at groups the examples by the block of positions their rows start in

    def __init__(self, sae):
        import torch
        from sae_lens.saes.jumprelu_sae import JumpReLUSAE
        from sae_lens.saes.standard_sae import StandardSAE

        self.sae = sae
        kind = type(sae)
        self.fast = (
            kind in (JumpReLUSAE, StandardSAE)
            and isinstance(getattr(sae, "activation_fn", None), torch.nn.ReLU)
            and getattr(sae.cfg, "normalize_activations", "none") == "none"
            and not getattr(sae, "hook_z_reshaping_mode", False)
            and all(not m._forward_hooks and not m._forward_pre_hooks for m in sae.modules())
        )
        self.jumprelu = kind is JumpReLUSAE
        if self.fast:
            with torch.inference_mode():
                self.gate = sae.threshold.clamp_min(0) if self.jumprelu else torch.zeros_like(sae.b_enc)
                # the bound's per-feature terms in float64 on the CPU (MPS has no float64): ||W_enc[:, j]||
                # (widened; a sum over rows: vector_norm along dim 0 of the row-major W_enc is 15x
                # slower), b_enc, the gate
                cpu64 = {"device": "cpu", "dtype": torch.float64}
                self.w_norm = sae.W_enc.to(**cpu64).square().sum(0).sqrt() * (1 + self.PRUNE_MARGIN)
                self.b_enc64, self.gate64 = sae.b_enc.to(**cpu64), self.gate.to(**cpu64)

    def live_features(self, sae_in):
        """Ascending ids of the features that may fire on some row of sae_in, or None when
        (nearly) all may: the Cauchy-Schwarz bound of the class docstring."""
        import torch

        if sae_in.dtype not in (torch.float32, torch.float64):  # the margin covers float32 rounding, not half precision
            return None
        x_norm = float(torch.linalg.vector_norm(sae_in, dim=1).max()) * (1 + self.PRUNE_MARGIN) if len(sae_in) else 0.0
        if not math.isfinite(x_norm):
            return None
        bound = self.w_norm * x_norm + self.b_enc64
        bound = bound + bound.abs() * self.PRUNE_MARGIN
        may_fire = ~(bound < self.gate64)  # NaN: never pruned
        n_live = int(may_fire.sum())
        if n_live > (1 - self.PRUNE_MIN_SHARE) * len(bound):
            return None
        # a multiple of 16 columns (an odd count makes the addmm ~1.6x slower on CPU): pad with
        # features that cannot fire, which then give no entries either
        pad = -n_live % 16
        if n_live + pad >= len(bound):
            return None
        if pad:
            may_fire[torch.nonzero(~may_fire).view(-1)[:pad]] = True
        return torch.nonzero(may_fire).view(-1).to(sae_in.device)

    def encode_decode(self, x_flat):
        import torch

        sae = self.sae
        n_tok = x_flat.shape[0]
        if not self.fast:
            acts = sae.encode(x_flat)
            x_hat = sae.decode(acts).to(x_flat.dtype)
            nz = torch.nonzero(acts > 0)  # row-major: sorted by (token, feature)
            t, f = nz[:, 0], nz[:, 1]
            return t, f, acts[t, f], x_hat
        sae_in = x_flat.to(sae.dtype) - sae.b_dec * sae.cfg.apply_b_dec_to_input  # SAE.process_sae_in
        live = self.live_features(sae_in)
        if live is None:
            w_enc, b_enc, gate = sae.W_enc, sae.b_enc, self.gate
        else:  # only the features that may fire (ascending: entries stay in (token, feature) order)
            w_enc, b_enc, gate = sae.W_enc.index_select(1, live), sae.b_enc.index_select(0, live), self.gate.index_select(0, live)
        n_cols = w_enc.shape[1]
        # rows in chunks: the dense pre-activations of a chunk stay under ENCODE_CHUNK_BYTES (at 131k
        # features a whole batch's would be 2 GiB); each row's values are the same either way
        step = max(1, self.ENCODE_CHUNK_BYTES // (n_cols * w_enc.element_size()))
        parts_t, parts_f, parts_v = [], [], []
        for r0 in range(0, n_tok, step):
            hidden_pre = torch.addmm(b_enc, sae_in[r0 : r0 + step], w_enc)  # sae_in @ W_enc + b_enc, fused
            positive = hidden_pre > gate
            if positive.device.type == "cpu":  # numpy's nonzero of a sparse mask is ~4x torch's on CPU
                flat = torch.from_numpy(np.flatnonzero(positive.numpy()))  # row-major: sorted by (token, feature)
            else:
                flat = torch.nonzero(positive.view(-1)).view(-1)
            parts_t.append(flat // n_cols + r0)
            parts_f.append(flat % n_cols)
            parts_v.append(hidden_pre.view(-1).index_select(0, flat))
            del hidden_pre, positive
        t, f, vals = (torch.cat(x) if len(x) > 1 else x[0] for x in (parts_t, parts_f, parts_v))
        if live is not None:
            f = live.index_select(0, f)
        counts = torch.bincount(t, minlength=n_tok)
        offsets = torch.cumsum(counts, 0) - counts
        x_hat = torch.nn.functional.embedding_bag(f, sae.W_dec, offsets, mode="sum", per_sample_weights=vals) + sae.b_dec
        return t, f, vals, x_hat.to(x_flat.dtype)

    def encode_at(self, x, rows: np.ndarray, features: np.ndarray, chunk: int | None = None) -> np.ndarray:
        """`features[i]`'s activation at the positions `rows[i]` of `x` ([N, d_in]; rows [n, W]) -> numpy [n, W].

        Fast path, by blocks of positions: the examples are grouped by where their rows start
        (`ENCODE_AT_BLOCK` positions a group), and each group's span of x is encoded for that
        group's distinct features only (one addmm), then gathered and gated as in
        `encode_decode`. A window's rows are consecutive, so a batch costs about
        (block + W) x d_in x (the examples' distinct features per block, summed) multiply-adds:
        proportional to the examples, not to N x (distinct features), which encoding all N
        positions for every distinct feature cost (a dense encode of the batch once its examples
        cover most features). Equal to `sae.encode` up to float32 summation order. `chunk`: the
        block size (positions) on the fast path; otherwise `sae.encode` and its columns, `chunk`
        distinct features at a time."""
        import torch

        sae = self.sae
        rows = np.asarray(rows, dtype=np.int64)
        features = np.asarray(features, dtype=np.int64)
        out = np.zeros(rows.shape, np.float32)
        if rows.size == 0:
            return out
        if self.fast:
            sae_in = x.to(sae.dtype) - sae.b_dec * sae.cfg.apply_b_dec_to_input
            zero = torch.zeros((), dtype=sae_in.dtype, device=sae_in.device)
            lo, hi = rows.min(1), rows.max(1)
            block = lo // (chunk or self.ENCODE_AT_BLOCK)
            order = np.argsort(block, kind="stable")
            cuts = np.flatnonzero(np.diff(block[order])) + 1
            for idx in np.split(order, cuts):
                r0, r1 = int(lo[idx].min()), int(hi[idx].max()) + 1
                uniq, inv = np.unique(features[idx], return_inverse=True)
                step = max(1, self.ENCODE_CHUNK_BYTES // (4 * (r1 - r0)))  # bounds [span, u] (rows far apart: a wide span)
                for c0 in range(0, len(uniq), step):
                    f = torch.from_numpy(uniq[c0 : c0 + step]).to(x.device)
                    pre = torch.addmm(sae.b_enc.index_select(0, f), sae_in[r0:r1], sae.W_enc.index_select(1, f))  # [span, u]
                    acts = torch.where(pre > self.gate.index_select(0, f), pre, zero).float().cpu().numpy()  # gate: threshold or 0
                    mine = np.flatnonzero((inv >= c0) & (inv < c0 + step))
                    out[idx[mine]] = acts[rows[idx[mine]] - r0, (inv[mine] - c0)[:, None]]
            return out
        uniq, inv = np.unique(features, return_inverse=True)
        dense = sae.encode(x)
        step = chunk or 2048
        for lo in range(0, len(uniq), step):
            f = torch.from_numpy(uniq[lo : lo + step]).to(x.device)
            acts = dense.index_select(1, f).float().cpu().numpy()
            mine = np.flatnonzero((inv >= lo) & (inv < lo + step))
            out[mine] = acts[rows[mine], (inv[mine] - lo)[:, None]]
        return out

