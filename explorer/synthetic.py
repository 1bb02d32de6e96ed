"""A synthetic run directory with the real schema, for app tests and benchmarks.

`make_run(out_dir, n_features=200)` writes every table of explorer/schema.py (through
explorer.rundir.write_table, and examples.parquet streamed in chunks through a ParquetWriter
with the schema's row-group size) and a complete manifest last. The numbers are random but
consistent with each other the way a real run is: status follows density and the manifest
thresholds, the cross-model class follows status, dead features have no examples on the model
they are dead on, examples are sorted by (sae, feature_id), top examples descend, quantile
examples fall inside their bins, `top_tokens` holds the token strings at the max of the top
examples, and the vocabulary contains hostile strings (`<script>`, `<img onerror>`,
`javascript:`, control characters, emoji, right-to-left text) that show up in top examples.

Vectorised and chunked: 16k features take seconds; 131k and 1M are for benchmarks (pass
smaller `n_top` / quantile settings to keep the examples file to a sane size).

    python -m explorer.synthetic OUT_DIR --features 16384 [--run-id synth]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from explorer import rundir, schema
from explorer.models import compare_vocabularies

NASTY_TOKENS = (
    "<script>alert(1)</script>",
    "<img src=x onerror=alert(2)>",
    "javascript:alert(3)",
    '"><svg onload=alert(4)>',
    "</div><b>bold?</b>",
    "&amp;&lt;",
    "\n",
    "\t",
    " ",
    "\x07bell",
    "\u202eevil",
    "\u05e9\u05dc\u05d5\u05dd",  # Hebrew (RTL)
    "\u0645\u0631\u062d\u0628\u0627",  # Arabic (RTL)
    "\U0001f642",
    "{{7*7}}",
)
_WORDS = (
    "the of and to in is that for it as with was on be by at this are from or have an they which one you were "
    "def return import self class if else for while print None True False lambda yield try except with range len"
).split()


def _vocab(n_vocab: int) -> list[str]:
    out = []
    for i in range(n_vocab):
        if i < len(NASTY_TOKENS) + 1 and i > 0:
            out.append(NASTY_TOKENS[i - 1])
        elif i == 0:
            out.append("<|bos|>")
        else:
            w = _WORDS[i % len(_WORDS)]
            out.append((" " if i % 3 else "") + w + ("" if i < 2 * len(_WORDS) else str(i)))
    return out


def _list_array(values: np.ndarray, typ: pa.DataType) -> pa.Array:
    """[n, k] numpy -> list<typ> with k items per row."""
    n, k = values.shape
    offsets = pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1), type=typ))


def _status(density: np.ndarray, low: float, dense: float) -> np.ndarray:
    out = np.full(density.shape, "regular", dtype=object)
    out[density == 0] = "dead"
    out[(density > 0) & (density < low)] = "ultralow"
    out[density > dense] = "dense"
    return out


def _act_hist(density: np.ndarray, mean_active: np.ndarray, n_tokens: int, chunk: int = 65536) -> pa.Array:
    """A bump of activations around each feature's typical size (bins are log-spaced), as
    list<int64>. Built `chunk` features at a time: the float [n, bins] temporaries of the whole
    SAE at once need gigabytes at 1M features."""
    nb = schema.N_ACT_HIST_BINS
    counts = np.empty((len(density), nb), dtype=np.int64)
    bins = np.arange(nb)[None, :]
    for i in range(0, len(density), chunk):
        d, ma = density[i : i + chunk], mean_active[i : i + chunk]
        centre = np.clip(np.searchsorted(schema.ACT_HIST_EDGES, np.nan_to_num(ma, nan=1.0)), 3, nb - 4)
        shape = np.exp(-0.5 * ((bins - centre[:, None]) / 2.5) ** 2)
        total = np.round(d * max(n_tokens, 100_000))
        counts[i : i + chunk] = np.round(shape / shape.sum(axis=1, keepdims=True) * total[:, None])
    return _list_array(counts, pa.int64())


def _significance(cols: dict[str, Any], n_tokens: int) -> None:
    """Counts, paired counts, McNemar p / BH q, change class and the log density ratio from the
    densities, as a real run computes them from counts (precompute.significance)."""
    from precompute import significance as sig

    cb = np.round(cols["density_base"] * n_tokens).astype(np.int64)
    cf = np.round(cols["density_finetuned"] * n_tokens).astype(np.int64)
    both = np.minimum(cb, cf) * 3 // 4
    b, c = cb - both, cf - both
    cols["count_base"], cols["count_finetuned"], cols["n_fires_both"], cols["n_base_only"], cols["n_finetuned_only"] = cb, cf, both, b, c
    p = sig.mcnemar_p(b, c)
    q = sig.bh_q(p, (cb > 0) | (cf > 0))
    cols["p_value"], cols["q_value"] = p, q
    cols["change_class"] = sig.change_class(cb, cf, b, c, q, schema.SIGNIFICANCE_ALPHA)
    cols["log_density_ratio"], cols["log_density_ratio_low"], cols["log_density_ratio_high"] = sig.log_density_ratio(cb, cf, n_tokens, n_tokens)
    cols["delta_mean_active_act"] = cols["mean_active_act_finetuned"] - cols["mean_active_act_base"]
    cols["delta_max_act"] = cols["max_act_finetuned"] - cols["max_act_base"]


def _by_source(rng, sae: str, cols: dict[str, Any], sources: list[str], n_tokens: int) -> pa.Table:
    """features_by_source rows: each source gets a random share of the pooled density."""
    parts = []
    n = len(cols["feature_id"])
    for i, src in enumerate(sources):
        share = rng.uniform(0.2, 1.8, n) if i else rng.uniform(0.5, 1.5, n)
        sub: dict[str, Any] = {}
        for m in schema.MODELS:
            d = np.clip(cols[f"density_{m}"] * share * (1 if m == "base" or i == 0 else rng.uniform(0.0, 1.2, n)), 0, 0.9)
            d[rng.random(n) < 0.05] = 0.0
            sub[f"density_{m}"] = d
            sub[f"mean_active_act_{m}"] = np.where(d > 0, np.nan_to_num(cols[f"mean_active_act_{m}"], nan=1.0), np.nan)
            sub[f"mean_act_{m}"] = np.where(d > 0, sub[f"mean_active_act_{m}"] * d, 0.0)
            sub[f"max_act_{m}"] = np.where(d > 0, np.maximum(cols[f"max_act_{m}"], 0.1), 0.0)
            sub[f"status_{m}"] = _status(d, 1e-5, 0.1)
        ab, af = sub["density_base"] > 0, sub["density_finetuned"] > 0
        sub["cross_class"] = np.where(ab & af, "both_alive", np.where(ab, "died", np.where(af, "woke", "both_dead"))).astype(object)
        sub["act_similarity"] = np.where(ab & af, cols["act_similarity"], np.nan)
        sub["act_error"] = cols["act_error"]
        _significance(sub, n_tokens // len(sources))
        parts.append(pa.table({"sae": np.full(n, sae, dtype=object), "feature_id": cols["feature_id"], "source": np.full(n, src, dtype=object), **sub}))
    return pa.concat_tables([t.select(schema.FEATURES_BY_SOURCE.names).cast(schema.FEATURES_BY_SOURCE) for t in parts])


def _features(rng, sae: str, n: int, n_vocab: int, n_tokens: int, thresholds: dict, other_n: int | None, twin: bool = False) -> dict[str, Any]:
    cols: dict[str, Any] = {"sae": np.full(n, sae, dtype=object), "feature_id": np.arange(n, dtype=np.int32)}
    log_d = rng.normal(-3.0, 1.0, n)
    d_base = np.clip(10**log_d, 0, 0.5)
    d_ft = np.clip(10 ** (log_d + rng.normal(0, 0.6, n)), 0, 0.5)
    # make some dead on one side or both
    kill = rng.random(n)
    d_base[kill < 0.10] = 0.0  # woke (dead on base)
    d_ft[(kill >= 0.10) & (kill < 0.16)] = 0.0  # died
    d_base[(kill >= 0.16) & (kill < 0.19)] = 0.0  # both dead
    d_ft[(kill >= 0.16) & (kill < 0.19)] = 0.0
    for m, d in (("base", d_base), ("finetuned", d_ft)):
        mean_active = np.where(d > 0, rng.gamma(2.0, 1.5, n) + 0.2, np.nan)
        max_act = np.where(d > 0, mean_active * (2.0 + rng.random(n) * 3.0), 0.0)
        cols[f"density_{m}"] = d
        cols[f"mean_active_act_{m}"] = mean_active
        cols[f"mean_act_{m}"] = np.where(d > 0, mean_active * d, 0.0)
        cols[f"max_act_{m}"] = max_act
        cols[f"status_{m}"] = _status(d, thresholds["ultralow_density"], thresholds["dense_density"])
    alive_b, alive_f = d_base > 0, d_ft > 0
    cross = np.where(alive_b & alive_f, "both_alive", np.where(alive_b, "died", np.where(alive_f, "woke", "both_dead")))
    cols["cross_class"] = cross.astype(object)
    sim = np.clip(rng.beta(4, 2, n) * 1.2 - 0.2, -1, 1)
    cols["act_similarity"] = np.where(alive_b & alive_f, sim, np.nan)
    cols["act_error"] = np.abs(np.log10(d_base + 1e-10) - np.log10(d_ft + 1e-10)) * 0.5
    cols["logit_similarity"] = np.clip(1 - rng.exponential(0.03, n), -1, 1)
    _significance(cols, n_tokens)
    effect = {"pos": -np.sort(-rng.gamma(2, 0.05, (n, 10)), axis=1), "neg": np.sort(-rng.gamma(2, 0.05, (n, 10)), axis=1)}
    for sign, values in effect.items():
        cols[f"logit_effect_{sign}_ids"] = _list_array(rng.integers(0, n_vocab, (n, 10), dtype=np.int32), pa.int32())
        cols[f"logit_effect_{sign}_values"] = _list_array(values.astype(np.float32), pa.float32())
    cols["logit_effect_max_abs"] = rng.gamma(2, 0.1, n)
    cols["kl_corr"] = np.where((cols["density_base"] > 0) | (cols["density_finetuned"] > 0), np.clip(rng.normal(0.05, 0.1, n), -1, 1), np.nan)
    for m in schema.MODELS:
        pos_ids = rng.integers(0, n_vocab, (n, 10), dtype=np.int32)
        neg_ids = rng.integers(0, n_vocab, (n, 10), dtype=np.int32)
        pos_v = -np.sort(-rng.gamma(2, 0.5, (n, 10)), axis=1).astype(np.float32)
        neg_v = np.sort(-rng.gamma(2, 0.5, (n, 10)), axis=1).astype(np.float32)
        cols[f"logit_pos_ids_{m}"] = _list_array(pos_ids, pa.int32())
        cols[f"logit_pos_values_{m}"] = _list_array(pos_v, pa.float32())
        cols[f"logit_neg_ids_{m}"] = _list_array(neg_ids, pa.int32())
        cols[f"logit_neg_values_{m}"] = _list_array(neg_v, pa.float32())
        cols[f"act_hist_{m}"] = _act_hist(cols[f"density_{m}"], cols[f"mean_active_act_{m}"], n_tokens)
    nn = (np.arange(n)[:, None] + rng.integers(1, max(2, n - 1), (n, 10))) % max(n, 1)
    cols["nn_feature_ids"] = _list_array(nn.astype(np.int32), pa.int32())
    cols["nn_cosines"] = _list_array(-np.sort(-rng.uniform(0.05, 0.9, (n, 10)), axis=1).astype(np.float32), pa.float32())
    if other_n:
        match = rng.integers(0, other_n, n).astype(np.int32)
        act_corr = np.where(rng.random(n) < 0.05, np.nan, rng.uniform(-0.1, 1.0, n))
        dec_cos = rng.uniform(0.0, 1.0, n)
        score = 0.5 * np.nan_to_num(act_corr, nan=0.0) + 0.5 * dec_cos
        cols["match_feature_id"] = pa.array(match, type=pa.int32())
        cols["match_score"] = score
        cols["match_act_corr"] = act_corr
        cols["match_cofire_corr"] = np.clip(np.nan_to_num(act_corr, nan=0.0) + rng.normal(0, 0.1, n), -1, 1)
        cols["match_dec_cos"] = dec_cos
        cols["match_enc_cos"] = np.clip(dec_cos + rng.normal(0, 0.1, n), -1, 1)
        assigned = rng.random(n) < 0.8
        cols["assigned_feature_id"] = pa.array(np.where(assigned, match, 0).astype(np.int32), mask=~assigned)
        cols["assigned_score"] = np.where(assigned, score, np.nan)
    else:
        for k, t in (("match_feature_id", pa.int32()), ("assigned_feature_id", pa.int32())):
            cols[k] = pa.nulls(n, t)
        for k in ("match_score", "match_act_corr", "match_cofire_corr", "match_dec_cos", "match_enc_cos", "assigned_score"):
            cols[k] = pa.nulls(n, pa.float64())
    if twin and sae == "base_sae":
        cols["twin_match_feature_id"] = pa.array(rng.integers(0, n, n).astype(np.int32), type=pa.int32())
        cols["twin_match_score"] = np.clip(rng.beta(3, 2, n), 0, 1)
    else:
        cols["twin_match_feature_id"] = pa.nulls(n, pa.int32())
        cols["twin_match_score"] = pa.nulls(n, pa.float64())
    cols["top_tokens"] = np.full(n, "", dtype=object)  # filled from the examples
    return cols


def _examples_chunk(rng, sae: str, f0: int, f1: int, feats: dict, n_vocab: int, n_seq: int, context: int, ex: dict, vocab: list[str]):
    """Examples for features [f0, f1) of one SAE, sorted (feature_id, model, kind, bin, rank)."""
    n_top, n_bins, n_per = ex["n_top"], ex["n_quantile_bins"], ex["n_per_quantile_bin"]
    before, after = ex["window_before"], ex["window_after"]
    width = before + after + 1
    per_model = n_top + n_bins * n_per
    fids = np.arange(f0, f1)
    rows_f, rows_m, kind, bins, rank = [], [], [], [], []
    for fid in fids:
        for m in schema.MODELS:
            if feats[f"density_{m}"][fid] <= 0:
                continue
            rows_f.append(np.full(per_model, fid))
            rows_m.append(np.full(per_model, m, dtype=object))
            kind.append(np.array(["top"] * n_top + ["quantile"] * (n_bins * n_per), dtype=object))
            bins.append(np.concatenate([np.full(n_top, -1), np.repeat(np.arange(n_bins), n_per)]))
            rank.append(np.concatenate([np.arange(n_top), np.tile(np.arange(n_per), n_bins)]))
    if not rows_f:
        return None, {}
    fid = np.concatenate(rows_f)
    model = np.concatenate(rows_m)
    kind = np.concatenate(kind)
    bins = np.concatenate(bins)
    rank = np.concatenate(rank)
    n = len(fid)
    max_act = np.where(model == "base", feats["max_act_base"][fid], feats["max_act_finetuned"][fid])
    is_top = kind == "top"
    top_act = max_act * (1.0 - 0.02 * rank)
    lo = max_act * bins / max(n_bins, 1)  # top rows (bin -1) are masked out below
    hi = max_act * (bins + 1) / max(n_bins, 1)
    q_act = lo + (hi - lo) * rng.random(n)
    act = np.where(is_top, top_act, q_act).astype(np.float32)
    seq = rng.integers(0, n_seq, n).astype(np.int32)
    pos = rng.integers(1, context, n).astype(np.int16)
    start = np.maximum(pos - before, 0).astype(np.int16)
    tokens = rng.integers(len(NASTY_TOKENS) + 1, n_vocab, (n, width)).astype(np.int32)
    focus = (pos - start).astype(np.int64)
    # hostile tokens at the max of some features' top examples
    nasty = is_top & (fid % 5 == 0)
    tokens[nasty, focus[nasty]] = 1 + (fid[nasty] // 5 + rank[nasty]) % len(NASTY_TOKENS)
    own = rng.random((n, width)).astype(np.float32) * (act[:, None] * 0.3) * (rng.random((n, width)) < 0.3)
    own[np.arange(n), focus] = act
    other_scale = np.where(model == "base", 0.7, 1.3)[:, None]
    other = (own * other_scale * rng.uniform(0.5, 1.0, (n, width))).astype(np.float32)
    acts_base = np.where((model == "base")[:, None], own, other)
    acts_ft = np.where((model == "base")[:, None], other, own)
    table = pa.table(
        {
            "sae": pa.array(np.full(n, sae, dtype=object), pa.string()),
            "feature_id": pa.array(fid.astype(np.int32)),
            "model": pa.array(model, pa.string()),
            "kind": pa.array(kind, pa.string()),
            "bin": pa.array(bins.astype(np.int16), mask=is_top),
            "bin_low": pa.array(lo.astype(np.float32), mask=is_top),
            "bin_high": pa.array(hi.astype(np.float32), mask=is_top),
            "rank": pa.array(rank.astype(np.int16)),
            "seq_id": pa.array(seq),
            "position": pa.array(pos),
            "activation": pa.array(act),
            "window_start": pa.array(start),
            "token_ids": _list_array(tokens, pa.int32()),
            "acts_base": _list_array(acts_base.astype(np.float32), pa.float32()),
            "acts_finetuned": _list_array(acts_ft.astype(np.float32), pa.float32()),
        },
        schema=schema.EXAMPLES,
    )
    top_tokens: dict[int, list[str]] = {}
    sel = np.flatnonzero(is_top)
    for i in sel:
        top_tokens.setdefault(int(fid[i]), []).append(vocab[int(tokens[i, focus[i]])])
    return table, top_tokens


def _baseline(rng, out: Path, feats: dict, n: int, threshold: float, twin: bool) -> tuple[dict, dict | None, dict]:
    """baseline.parquet (with `twin`: its columns too) and score_separation.parquet (with `twin`)
    from the features' match scores and a noisier twin, and the manifest's summary.matching."""
    from precompute.baseline import HIST_BINS, THRESHOLDS

    rows, seps = [], []
    alive_a = np.asarray(feats["base_sae"]["density_base"]) > 0
    alive_b = np.asarray(feats["finetuned_sae"]["density_finetuned"]) > 0
    lost_s = np.asarray(feats["base_sae"]["match_score"], dtype=float)[alive_a]
    born_s = np.asarray(feats["finetuned_sae"]["match_score"], dtype=float)[alive_b]
    tm = feats["base_sae"]["twin_match_score"]
    twin_a = np.asarray(tm.to_numpy(zero_copy_only=False) if isinstance(tm, pa.Array) else tm, dtype=float)[alive_a]
    twin_b = np.clip(rng.beta(3, 2, int(alive_a.sum())), 0, 1)
    aucs = {}
    for k, score in enumerate(schema.MATCH_SCORES):
        shift = 0.03 * k
        for t in THRESHOLDS:
            nl, nb, nlt, nbt = ((v - shift < t).sum() for v in (lost_s, born_s, twin_a, twin_b))
            la, lb = int(alive_a.sum()), int(alive_b.sum())
            row = dict(score=score, threshold=float(t), n_alive_base_sae=la, n_alive_finetuned_sae=lb, n_alive_twin=la, n_lost=int(nl), n_born=int(nb),
                       n_lost_twin=int(nlt), n_born_twin=int(nbt), lost_rate=nl / la, born_rate=nb / lb, lost_rate_twin=nlt / la, born_rate_twin=nbt / la,
                       excess_lost=nl / la - nlt / la, excess_born=nb / lb - nbt / la)
            if not twin:
                row.update({k: None for k in ("n_alive_twin", "n_lost_twin", "n_born_twin")}, lost_rate_twin=np.nan, born_rate_twin=np.nan, excess_lost=np.nan, excess_born=np.nan)
            rows.append(row)
        aucs[score] = 0.95 - 0.02 * k
        edges = np.linspace(-1, 1, HIST_BINS + 1)
        for group, sample in (("assigned", rng.beta(5, 2, n)), ("random", rng.normal(0.0, 0.1, n))):
            counts = np.histogram(np.clip(sample, -1, 1), bins=edges)[0]
            seps += [dict(score=score, auc=aucs[score], group=group, bin_left=float(edges[i]), bin_right=float(edges[i + 1]), count=int(counts[i])) for i in range(HIST_BINS)]
    f1 = rundir.write_table(out, "baseline.parquet", pa.Table.from_pylist(rows, schema=schema.BASELINE))
    f2 = rundir.write_table(out, "score_separation.parquet", pa.Table.from_pylist(seps)) if twin else None
    i = int(np.argmin(np.abs(THRESHOLDS - threshold)))
    at = rows[i]
    summ = {"score": schema.MATCH_SCORES[0] if twin else schema.DEFAULT_MATCH_SCORE,
            "score_reason": "the highest AUC separating the seed twin's assigned pairs from random pairs" if twin else "the default without a seed twin to choose on",
            "auc": aucs if twin else {},
            "threshold": threshold, "counts": "alive features only", "n_lost": at["n_lost"], "n_born": at["n_born"], "n_lost_twin": at["n_lost_twin"],
            "n_born_twin": at["n_born_twin"], "n_alive_base_sae": at["n_alive_base_sae"], "n_alive_finetuned_sae": at["n_alive_finetuned_sae"], "n_alive_twin": at["n_alive_twin"]}
    return f1, f2, summ


def make_run(
    out_dir: Path | str,
    n_features: int = 200,
    run_id: str | None = None,
    two_saes: bool = True,
    n_vocab: int = 512,
    n_sequences: int = 64,
    context: int = 32,
    n_top: int = 20,
    n_quantile_bins: int = 10,
    n_per_quantile_bin: int = 5,
    seed: int = 0,
    chunk_features: int = 2048,
    twin: bool = False,
) -> Path:
    """Write a complete synthetic run to `out_dir` (created; its name is the run id by default);
    with `twin` (two-SAE runs only) also the seed-twin baseline and the score separation."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run_id = run_id or out.name
    rng = np.random.default_rng(seed)
    n_tokens = n_sequences * context
    thresholds = {"ultralow_density": 1e-5, "dense_density": 0.1, "outlier_norm_factor": 2.0, "match": 0.5, "min_matching_id_share": 0.99, "act_error_eps": 1e-10}
    ex = {"n_top": n_top, "n_quantile_bins": n_quantile_bins, "n_per_quantile_bin": n_per_quantile_bin, "window_before": 12, "window_after": 4}
    saes = list(schema.SAES) if two_saes else ["base_sae"]
    twin = twin and two_saes
    sources = ["english", "python"]
    vocab = _vocab(n_vocab)
    files: dict[str, Any] = {}

    files["vocab.parquet"] = rundir.write_table(
        out, "vocab.parquet",
        pa.table({"token_id": pa.array(np.arange(n_vocab, dtype=np.int32)), "token_str": vocab, "token_piece": vocab, "token_bytes": [s.encode("utf-8") for s in vocab]}),
    )
    tok = rng.integers(1, n_vocab, (n_sequences, context)).astype(np.int32)
    tok[:, 0] = 0
    seq_source = np.where(np.arange(n_sequences) % 2, "python", "english").astype(object)
    kl = rng.exponential(0.05, (n_sequences, context)).astype(np.float32) * np.where(seq_source == "python", 3.0, 1.0)[:, None].astype(np.float32)
    kl[:, -1] = np.nan
    loss_diff = (rng.normal(0, 0.2, (n_sequences, context)) - np.where(seq_source == "python", 0.3, -0.2)[:, None]).astype(np.float32)
    loss_diff[:, -1] = np.nan
    files["tokens.parquet"] = rundir.write_table(
        out,
        "tokens.parquet",
        pa.table({"seq_id": np.arange(n_sequences, dtype=np.int32), "source": seq_source, "token_ids": _list_array(tok, pa.int32()),
                  "kl": _list_array(kl, pa.float32()), "loss_diff": _list_array(loss_diff, pa.float32())}),
    )
    flat = np.nan_to_num(kl.reshape(-1), nan=-1.0)
    top = np.argsort(-flat, kind="stable")[:30]
    seq, pos = top // context, top % context
    start = np.maximum(pos - 12, 0)
    end = np.minimum(pos + 2, context)
    n_feat_ctx = min(10, n_features)
    files["kl_contexts.parquet"] = rundir.write_table(out, "kl_contexts.parquet", pa.table({
        "rank": np.arange(len(top), dtype=np.int32), "seq_id": seq.astype(np.int32), "position": pos.astype(np.int16),
        "source": seq_source[seq], "kl": kl.reshape(-1)[top], "loss_diff": loss_diff.reshape(-1)[top], "window_start": start.astype(np.int16),
        "token_ids": pa.array([tok[q, a:b] for q, a, b in zip(seq, start, end)], pa.list_(pa.int32())),
        "kl_window": pa.array([kl[q, a:b] for q, a, b in zip(seq, start, end)], pa.list_(pa.float32())),
        "feature_ids": _list_array(rng.integers(0, n_features, (len(top), n_feat_ctx)).astype(np.int32), pa.int32()),
        "act_deltas": _list_array(-np.sort(-rng.normal(0, 1, (len(top), n_feat_ctx)), axis=1).astype(np.float32), pa.float32()),
        "acts_base": _list_array(rng.gamma(2, 1, (len(top), n_feat_ctx)).astype(np.float32), pa.float32()),
        "acts_finetuned": _list_array(rng.gamma(2, 1, (len(top), n_feat_ctx)).astype(np.float32), pa.float32()),
    }))
    mrows = []
    for sae in saes:
        for m in schema.MODELS:
            for outl in ("included", "excluded"):
                own = (sae == "base_sae") == (m == "base")
                clean = 3.0 if m == "base" else 2.5
                spliced = clean + (0.2 if own else 1.5) * (0.9 if outl == "excluded" else 1.0)
                zero = clean + 5.0
                mrows.append(
                    dict(sae=sae, model=m, outliers=outl, n_tokens=n_tokens if outl == "included" else n_tokens - n_sequences,
                         l0=float(rng.uniform(20, 60)), mse=float(rng.uniform(0.5, 3.0)), explained_variance=0.92 if own else 0.62,
                         explained_variance_legacy=0.9 if own else 0.6,
                         pooled_r2=0.85 if own else -0.5, ce_clean=clean, ce_spliced=spliced, ce_zero_ablated=zero, ce_delta=spliced - clean,
                         ce_recovered=(zero - spliced) / (zero - clean), outlier_fraction=1.0 / context, n_nonfinite_clean=0,
                         n_nonfinite_spliced=0, n_nonfinite_zero_ablated=0)
                )
    files["metrics.parquet"] = rundir.write_table(out, "metrics.parquet", pa.Table.from_pylist(mrows))
    src_rows = [{**r, "source": src, "n_tokens": r["n_tokens"] // 2, "explained_variance": r["explained_variance"] - 0.05 * i, "ce_clean": r["ce_clean"] + 0.4 * i}
                for i, src in enumerate(sources) for r in mrows]
    files["metrics_by_source.parquet"] = rundir.write_table(out, "metrics_by_source.parquet", pa.Table.from_pylist(src_rows))
    posn = np.arange(context)
    files["resid_position.parquet"] = rundir.write_table(
        out, "resid_position.parquet",
        pa.table({"position": posn.astype(np.int32), "n_tokens": np.full(context, n_sequences, dtype=np.int64),
                  "mean_cosine": 0.7 + 0.3 * np.exp(-posn / 3.0), "mean_l2": 4.0 - 3.0 * np.exp(-posn / 3.0)}),
    )
    hist_rows, summ = [], []
    for metric, lo, hi, sample in (
        ("cosine", -1.0, 1.0, np.clip(rng.normal(0.75, 0.1, n_tokens), -1, 1)),
        ("l2", 0.0, 10.0, np.abs(rng.normal(4, 1, n_tokens))),
        ("seq_mean_cosine", -1.0, 1.0, np.clip(rng.normal(0.75, 0.03, n_sequences), -1, 1)),
        ("seq_mean_l2", 0.0, 10.0, np.abs(rng.normal(4, 0.3, n_sequences))),
    ):
        counts, edges = np.histogram(sample, bins=schema.RESID_HIST_BINS, range=(lo, hi))
        hist_rows += [dict(metric=metric, bin_left=float(edges[i]), bin_right=float(edges[i + 1]), count=int(counts[i])) for i in range(len(counts))]
        summ.append(dict(metric=metric, n=len(sample), mean=float(sample.mean()), std=float(sample.std()), min=float(sample.min()), max=float(sample.max())))
    files["resid_histograms.parquet"] = rundir.write_table(out, "resid_histograms.parquet", pa.Table.from_pylist(hist_rows))
    files["resid_summary.parquet"] = rundir.write_table(out, "resid_summary.parquet", pa.Table.from_pylist(summ))

    feats = {sae: _features(rng, sae, n_features, n_vocab, n_tokens, thresholds, n_features if two_saes else None, twin) for sae in saes}

    # examples: streamed, sorted by (sae, feature_id)
    fd, tmp = tempfile.mkstemp(dir=out, prefix=".examples.parquet.", suffix=".tmp")
    os.close(fd)
    n_rows = 0
    try:
        with pq.ParquetWriter(tmp, schema.EXAMPLES, compression="zstd") as writer:
            for sae in saes:
                for f0 in range(0, n_features, chunk_features):
                    table, top = _examples_chunk(rng, sae, f0, min(n_features, f0 + chunk_features), feats[sae], n_vocab, n_sequences, context, ex, vocab)
                    if table is None:
                        continue
                    writer.write_table(table, row_group_size=schema.EXAMPLES_ROW_GROUP_SIZE)
                    n_rows += table.num_rows
                    for fid, toks in top.items():
                        feats[sae]["top_tokens"][fid] = " ".join(toks)
        files["examples.parquet"] = {"rows": n_rows, "bytes": os.path.getsize(tmp), "sha256": rundir.sha256_file(Path(tmp))}
        os.replace(tmp, out / "examples.parquet")
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

    ftable = pa.concat_tables([pa.table({k: v for k, v in feats[s].items()}) .select(schema.FEATURES.names).cast(schema.FEATURES) for s in saes])
    files["features.parquet"] = rundir.write_table(out, "features.parquet", ftable, row_group_size=schema.FEATURES_ROW_GROUP_SIZE)
    by_source = pa.concat_tables([_by_source(rng, s, feats[s], sources, n_tokens) for s in saes])
    files["features_by_source.parquet"] = rundir.write_table(out, "features_by_source.parquet", by_source, row_group_size=schema.FEATURES_ROW_GROUP_SIZE)
    summary: dict[str, Any] = {}
    if two_saes:
        b = feats["base_sae"]
        files["matches.parquet"] = rundir.write_table(
            out, "matches.parquet",
            pa.table({"base_feature_id": np.arange(n_features, dtype=np.int32), "finetuned_feature_id": np.asarray(b["match_feature_id"].to_numpy(zero_copy_only=False), dtype=np.int32),
                      "act_corr": b["match_act_corr"], "cofire_corr": b["match_cofire_corr"], "dec_cos": b["match_dec_cos"], "enc_cos": b["match_enc_cos"],
                      "score": b["match_score"], "assigned": rng.random(n_features) < 0.8}),
        )
        files["baseline.parquet"], sep, summary["matching"] = _baseline(rng, out, feats, n_features, thresholds["match"], twin)
        if twin:
            files["score_separation.parquet"] = sep
    spec = lambda p: {"name": None, "hf_model": None, "path": p}  # noqa: E731
    manifest = {
        "run_id": run_id,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        "complete": True,
        "synthetic": True,
        "config": {
            "run_id": run_id,
            "hook": "blocks.1.hook_resid_pre",
            "models": {"base": spec("synthetic/base"), "finetuned": spec("synthetic/finetuned")},
            "saes": {s: {"release": None, "sae_id": None, "path": f"synthetic/saes/{s}"} for s in saes},
            "corpus": {"path": "synthetic/corpus.parquet"},
            "sample": {"n_tokens": n_tokens, "context_size": context, "batch_size": 8, "seed": seed},
            "thresholds": thresholds,
            "examples": ex,
        },
        "packages": {"synthetic": "1"},
        "tokenizer_check": compare_vocabularies({t: i for i, t in enumerate(vocab)}, {t: i for i, t in enumerate(vocab)}).to_dict(),
        "models": {m: {"architecture": "synthetic", "model_name": f"synthetic-{m}", "n_layers": 2, "d_model": 64, "d_mlp": 256,
                       "d_vocab": n_vocab, "n_ctx": context} for m in schema.MODELS},
        "n_tokens": n_tokens,
        "n_sequences": n_sequences,
        "n_counted_tokens": n_tokens - n_sequences,  # BOS (token 0) opens every sequence and is not counted
        "special_token_ids": [0],
        "saes": saes,
        "twin": schema.TWIN if twin else None,
        "sources": {src: n_tokens // len(sources) for src in sources},
        "summary": summary,
        "d_sae": {s: n_features for s in saes},
        "act_hist_edges": schema.ACT_HIST_EDGES.tolist(),
        "files": files,
    }
    rundir.write_manifest(out, manifest)
    return out


def point_at_pair(run_dir: Path, pair: Path) -> Path:
    """Make a synthetic run's config name a local model pair (pair/base, pair/finetuned,
    pair/saes/<sae>), so the live probe can load it. The manifest is rewritten atomically."""
    import json

    run_dir, pair = Path(run_dir), Path(pair)
    manifest = json.loads((run_dir / schema.MANIFEST).read_text())
    manifest["config"]["models"] = {m: {"path": str(pair / m)} for m in schema.MODELS}
    manifest["config"]["saes"] = {s: {"path": str(pair / "saes" / s)} for s in schema.SAES}
    manifest.pop("schema_version", None)
    rundir.write_manifest(run_dir, manifest)
    return run_dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--features", type=int, default=200)
    p.add_argument("--run-id")
    p.add_argument("--one-sae", action="store_true")
    p.add_argument("--n-top", type=int, default=20)
    p.add_argument("--quantile-bins", type=int, default=10)
    p.add_argument("--per-bin", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--twin", action="store_true", help="also the seed-twin baseline tables")
    a = p.parse_args(argv)
    make_run(a.out, a.features, a.run_id, two_saes=not a.one_sae, n_top=a.n_top, n_quantile_bins=a.quantile_bins, n_per_quantile_bin=a.per_bin, seed=a.seed, twin=a.twin)
    print(a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
