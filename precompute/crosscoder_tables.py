"""Stage 5b, the crosscoder's tables (issue 16), built at finalize from its accumulators
(precompute/crosscoder_stats.py defines every quantity) and its weights:

    crosscoder.parquet           one row per latent: decoder norms, relative norm, decoder cosine,
                                 activation statistics, Latent Scaling, nearest SAE features
    crosscoder_examples.parquet  top and quantile examples, f_j over each window (the window's token
                                 ids are read from tokens.parquet: not stored twice)
    crosscoder_links.parquet     per SAE feature, the latents nearest to it by decoder cosine (the
                                 feature page's links back)
    crosscoder_metrics.parquet   reconstruction quality per (model, outlier variant)

The windows' activations come from the stream's kept hook activations (or both models run to the
hook again), as for the SAEs' examples; a window's centre is the stream's value, bitwise.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from explorer import schema
from precompute import weights as W
from precompute.columns import list_col
from precompute.crosscoder_stats import CrosscoderStats
from precompute.examples import _ragged
from precompute.hook_cache import HookActsCache
from precompute.prepare import Prepared

MODELS = schema.MODELS
SIDE = {"base_sae": 0, "finetuned_sae": 1}  # an SAE is compared with the decoder row of its own model


def crosscoder_tables(prep: Prepared, runners: dict, cc_state: CrosscoderStats, hook_cache: HookActsCache | None, summary: dict) -> dict[str, pa.Table]:
    """The four tables, and summary["crosscoder"]."""
    import torch

    cfg = prep.cfg.crosscoder
    cc = prep.crosscoder
    w_dec = cc.W_dec.detach().to("cpu", torch.float64).numpy()  # [2, d_sae, d_in]
    norms = np.linalg.norm(w_dec, axis=2)
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = np.where(norms.sum(0) > 0, norms[1] / norms.sum(0), np.nan)
        cos = np.where((norms[0] > 0) & (norms[1] > 0), (w_dec[0] * w_dec[1]).sum(1) / (norms[0] * norms[1]), np.nan)
    fs = cc_state.features.finalize()
    cols: dict[str, Any] = {
        "feature_id": np.arange(cc.d_sae, dtype=np.int32), "dec_norm_base": norms[0], "dec_norm_finetuned": norms[1],
        "relative_norm": rel, "dec_cos": cos, "density": fs["density"], "mean_act": fs["mean_act"],
        "mean_active_act": fs["mean_active_act"], "max_act": cc_state.topk.max(),
    }
    for i, m in enumerate(MODELS):
        cols[f"density_{m}"] = np.where(norms[i] > 0, fs["density"], 0.0)
    cols["act_hist"] = list_col(cc_state.features.hist, pa.int64())
    ls = cc_state.scaling.finalize(w_dec)
    for kind in ("error", "recon"):
        for i, m in enumerate(MODELS):
            cols[f"beta_{kind}_{m}"] = ls[f"beta_{kind}"][i, 0]  # direction 0: d_j^finetuned
    for name in ("nu_error", "nu_recon", "nu_error_mirror", "nu_recon_mirror"):
        cols[name] = ls[name]
    links = _nearest(prep, cc, cfg.n_nearest, cfg.n_links, cols)
    alive = cc_state.features.count > 0
    bands = {
        "base_only": int(((rel <= cfg.base_only_max) & alive).sum()), "shared": int(((rel >= cfg.shared_min) & (rel <= cfg.shared_max) & alive).sum()),
        "finetune_only": int(((rel >= cfg.finetune_only_min) & alive).sum()),
    }
    metrics = metrics_table(cc_state)
    summary["crosscoder"] = {
        "source": cc.source, "architecture": cc.architecture, "d_sae": cc.d_sae, "d_in": cc.d_in, "k": cc.k, "threshold": cc.threshold,
        "code_normalization": cc.code_normalization, "normalised_inputs": cc.input_mean is not None,
        "n_dead": int((~alive).sum()), "bands_alive": bands,
        "explained_variance": {r["model"]: r["explained_variance"] for r in metrics.to_pylist() if r["outliers"] == "included"},
    }
    return {
        "crosscoder.parquet": pa.table(cols),
        "crosscoder_examples.parquet": examples_table(prep, runners, cc_state, hook_cache),
        "crosscoder_links.parquet": links,
        "crosscoder_metrics.parquet": metrics,
    }


def _nearest(prep: Prepared, cc, n_nearest: int, n_links: int, cols: dict) -> pa.Table:
    """Per latent its n_nearest features of each SAE (by decoder cosine, in the model's own space),
    and per SAE feature its n_links nearest latents (crosscoder_links.parquet)."""
    import torch

    links: dict[str, list] = {k: [] for k in ("sae", "feature_id", "rank", "latent_id", "dec_cos")}
    for s in schema.SAES:
        if s not in prep.pair.saes:
            cols[f"nearest_{s}_ids"] = pa.nulls(cc.d_sae, pa.list_(pa.int32()))
            cols[f"nearest_{s}_cos"] = pa.nulls(cc.d_sae, pa.list_(pa.float32()))
            continue
        d = cc.decoder_in_model_space(SIDE[s]).detach().to("cpu", torch.float32)
        zero = (d.norm(dim=1) == 0).numpy()
        lat, feat = W.unit_rows(d), W.unit_rows(prep.pair.saes[s].W_dec)
        ids, cos = W.cross_topk(lat, feat, n_nearest)
        keep = np.where(zero[:, None], False, np.ones(ids.shape, bool))
        cols[f"nearest_{s}_ids"] = _ragged(ids.astype(np.int32), keep, pa.int32())
        cols[f"nearest_{s}_cos"] = _ragged(cos.astype(np.float32), keep, pa.float32())
        live = torch.from_numpy(np.flatnonzero(~zero))
        if len(live) == 0:
            continue
        back_ids, back_cos = W.cross_topk(feat, lat.index_select(0, live), n_links)
        n_feat, k = back_ids.shape
        links["sae"] += [s] * (n_feat * k)
        links["feature_id"].append(np.repeat(np.arange(n_feat, dtype=np.int32), k))
        links["rank"].append(np.tile(np.arange(k, dtype=np.int16), n_feat))
        links["latent_id"].append(live.numpy()[back_ids.reshape(-1)].astype(np.int32))
        links["dec_cos"].append(back_cos.reshape(-1).astype(np.float32))
    out = {k: (np.concatenate(v) if v and not isinstance(v[0], str) else v) for k, v in links.items()}
    return pa.table({
        "sae": pa.array(out["sae"], pa.string()),
        **{k: (out[k] if len(out[k]) else np.zeros(0, t)) for k, t in (("feature_id", np.int32), ("rank", np.int16), ("latent_id", np.int32), ("dec_cos", np.float32))},
    })


def metrics_table(cc_state: CrosscoderStats) -> pa.Table:
    rows = []
    for m in MODELS:
        for row in cc_state.quality[m].finalize():
            row.pop("n_ev_nonfinite", None)
            rows.append({"model": m, **row})
    return pa.Table.from_pylist(rows)


def _selected(cc_state: CrosscoderStats, n_bins: int, n_per_bin: int) -> dict[str, np.ndarray]:
    """Every example (top and quantile), sorted by (latent, kind, bin, rank)."""
    tk = cc_state.topk
    f, r = np.nonzero(tk.token >= 0)
    q = cc_state.quantile.finalize(n_bins, n_per_bin)
    parts = [
        dict(feature=f.astype(np.int64), kind=np.zeros(len(f), np.int64), bin=np.full(len(f), -1, np.int64),
             bin_low=np.full(len(f), np.nan, np.float32), bin_high=np.full(len(f), np.nan, np.float32), rank=r.astype(np.int16),
             token=tk.token[f, r], value=tk.value[f, r]),
        dict(feature=q.feature.astype(np.int64), kind=np.ones(len(q.feature), np.int64), bin=q.bin.astype(np.int64), bin_low=q.bin_low,
             bin_high=q.bin_high, rank=q.rank.astype(np.int16), token=q.token, value=q.value),
    ]
    cat = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    order = np.lexsort((cat["rank"], cat["bin"], cat["kind"], cat["feature"]))
    return {k: v[order] for k, v in cat.items()}


def examples_table(prep: Prepared, runners: dict, cc_state: CrosscoderStats, hook_cache: HookActsCache | None) -> pa.Table:
    import torch

    cfg, sample = prep.cfg, prep.sample
    ex = _selected(cc_state, cfg.crosscoder.n_quantile_bins, cfg.crosscoder.n_per_quantile_bin)
    n_seq, ctx = sample.tokens.shape
    before, after = cfg.examples.window_before, cfg.examples.window_after
    width = before + 1 + after
    seq, pos = ex["token"] // ctx, ex["token"] % ctx
    start = np.maximum(pos - before, 0)
    length = np.minimum(pos + after + 1, ctx) - start
    acts = np.zeros((len(seq), width), np.float32)
    bs = cfg.sample.batch_size
    batch_of = seq // bs
    offsets = np.arange(width)[None, :]
    codec = prep.crosscoder_codec
    for b in np.unique(batch_of):
        idx = np.flatnonzero(batch_of == b)
        tok_np = sample.tokens[prep.batch_seq_ids(int(b))]
        kept = hook_cache.get(int(b), tok_np) if hook_cache is not None else None
        if kept is not None:
            xs = {m: torch.from_numpy(kept[m]).to(prep.device) for m in MODELS}
        else:
            t = torch.from_numpy(tok_np.astype(np.int64)).to(prep.device)
            with torch.inference_mode():
                xs = {m: runners[m].acts(t) for m in MODELS}
        cols = np.minimum(start[idx, None] + offsets, ctx - 1)
        valid = offsets < length[idx, None]
        keep = valid & ~np.isin(sample.tokens[seq[idx, None], cols], prep.special_ids)
        flat = (seq[idx] - b * bs)[:, None] * ctx + cols
        d = xs[MODELS[0]].shape[-1]
        with torch.inference_mode():
            got = codec.encode_at(xs["base"].reshape(-1, d), xs["finetuned"].reshape(-1, d), flat, ex["feature"][idx])
        acts[idx] = np.where(keep, got, 0)
    centre = pos - start
    acts[np.arange(len(seq)), centre] = ex["value"]
    valid = offsets < length[:, None]
    top = ex["kind"] == 0
    return pa.table({
        "feature_id": pa.array(ex["feature"].astype(np.int32)),
        "kind": pa.array(np.where(top, "top", "quantile").astype(str)),
        "bin": pa.array(ex["bin"].astype(np.int16), mask=top),
        "bin_low": pa.array(ex["bin_low"].astype(np.float32), mask=top),
        "bin_high": pa.array(ex["bin_high"].astype(np.float32), mask=top),
        "rank": pa.array(ex["rank"].astype(np.int16)),
        "seq_id": pa.array(seq.astype(np.int32)),
        "position": pa.array(pos.astype(np.int16)),
        "activation": pa.array(ex["value"].astype(np.float32)),
        "window_start": pa.array(start.astype(np.int16)),
        "acts": _ragged(acts, valid, pa.float32()),
    })
