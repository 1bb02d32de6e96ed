"""features.parquet: one row per (sae, feature), built at finalize from the pass state, the SAE
weights (logits, decoder neighbours) and the two-SAE matching."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from explorer import schema
from precompute import weights as W
from precompute.columns import list_col, nullable
from precompute.forward import hook_start_layer
from precompute.pass_state import PassState
from precompute.prepare import Prepared
from precompute.stats_tables import Matching, per_feature, significance_summary

MODELS = schema.MODELS
MATCH_COLUMNS = (
    ("match_feature_id", pa.int32()), ("match_score", pa.float64()), ("match_act_corr", pa.float64()),
    ("match_cofire_corr", pa.float64()), ("match_dec_cos", pa.float64()), ("match_enc_cos", pa.float64()),
    ("assigned_feature_id", pa.int32()), ("assigned_score", pa.float64()),
    ("twin_match_feature_id", pa.int32()), ("twin_match_score", pa.float64()),
)


def _search_form(token: str) -> str:
    """A token as one space-free word for features.top_tokens: stripped, or whitespace made visible."""
    return token.strip().replace(" ", "\u2423") or token.replace("\n", "\\n").replace("\t", "\\t").replace(" ", "\u2423")


def _density_columns(prep: Prepared, state: PassState, s: str, cols: dict, summary: dict) -> None:
    """The per-feature statistics (schema.PER_SOURCE_COLUMNS) pooled over sources, and their counts."""
    cols.update(per_feature(prep, state, s, None))
    summary["status_counts"][s] = {m: {k: int((cols[f"status_{m}"] == k).sum()) for k in schema.STATUSES} for m in MODELS}
    summary["cross_class_counts"][s] = {k: int((cols["cross_class"] == k).sum()) for k in schema.CROSS_CLASSES}
    summary["alive"][s] = {m: int((cols[f"count_{m}"] > 0).sum()) for m in MODELS}
    summary["significance"][s] = significance_summary(cols)
    summary["act_similarity_nan"][s] = int(np.isnan(cols["act_similarity"]).sum())


def _logit_columns(prep: Prepared, s: str, d: int, cols: dict, summary: dict) -> None:
    """Logit similarity and the top +/- logits on each model, where the decoder writes into the residual stream."""
    sae = prep.pair.saes[s]
    d_model = int(prep.pair.base.cfg.d_model)
    if int(sae.cfg.d_in) == d_model and hook_start_layer(prep.cfg.hook, prep.pair.base.cfg.n_layers) is not None:
        n = prep.pair.shared_vocab or None  # logits on the vocabulary both models share (added tokens left out)
        ls = W.logit_stats(sae.W_dec, {"base": prep.pair.base.W_U[:, :n], "finetuned": prep.pair.finetuned.W_U[:, :n]}, device=prep.device)
        cols["logit_similarity"] = ls.similarity
        summary["logit_similarity_nan"][s] = int(np.isnan(ls.similarity).sum())
        for m in MODELS:
            cols[f"logit_pos_ids_{m}"] = list_col(ls.pos_ids[m], pa.int32())
            cols[f"logit_pos_values_{m}"] = list_col(ls.pos_values[m], pa.float32())
            cols[f"logit_neg_ids_{m}"] = list_col(ls.neg_ids[m], pa.int32())
            cols[f"logit_neg_values_{m}"] = list_col(ls.neg_values[m], pa.float32())
        # the logit effect W_dec[i] @ (W_U(finetuned) - W_U(base)) over the ids both vocabularies have (METHODS.md section 10)
        w_b, w_f = prep.pair.base.W_U, prep.pair.finetuned.W_U
        v = min(w_b.shape[1], w_f.shape[1])
        eff = W.logit_stats(sae.W_dec, {"effect": w_f[:, :v].float() - w_b[:, :v].float()}, device=prep.device)
        for sign in ("pos", "neg"):
            cols[f"logit_effect_{sign}_ids"] = list_col(getattr(eff, f"{sign}_ids")["effect"], pa.int32())
            cols[f"logit_effect_{sign}_values"] = list_col(getattr(eff, f"{sign}_values")["effect"], pa.float32())
        top = np.abs(np.concatenate([eff.pos_values["effect"][:, :1], eff.neg_values["effect"][:, :1]], axis=1)).max(axis=1)
        cols["logit_effect_max_abs"] = top.astype(np.float64)
    else:  # the decoder does not write into the residual stream: no direct logits
        cols["logit_similarity"] = np.full(d, np.nan)
        cols["logit_effect_max_abs"] = np.full(d, np.nan)
        for sign in ("pos", "neg"):
            cols[f"logit_effect_{sign}_ids"] = pa.nulls(d, pa.list_(pa.int32()))
            cols[f"logit_effect_{sign}_values"] = pa.nulls(d, pa.list_(pa.float32()))
        for m in MODELS:
            for sign in ("pos", "neg"):
                cols[f"logit_{sign}_ids_{m}"] = pa.nulls(d, pa.list_(pa.int32()))
                cols[f"logit_{sign}_values_{m}"] = pa.nulls(d, pa.list_(pa.float32()))


def _match_columns(mt: Matching | None, s: str, d: int, cols: dict) -> None:
    """Each feature's best match and its assigned partner in the other SAE, and base_sae's best
    match in the seed twin (null where they do not apply)."""
    for c, typ in MATCH_COLUMNS:
        cols[c] = pa.nulls(d, typ)
    if mt is None:
        return
    if mt.match is not None:
        m = mt.match
        if s == "base_sae":
            best, vals, asg, asc = m.best_b_for_a, m.best_a, m.assigned_b_for_a, m.assigned_score_a
        else:
            best, vals, asg, asc = m.best_a_for_b, m.best_b, m.assigned_a_for_b, m.assigned_score_b
        cols["match_feature_id"] = nullable(best, best >= 0, pa.int32())
        cols["match_score"] = vals["score"]
        for k in schema.MATCH_BASE_SCORES:
            cols[f"match_{k}"] = vals[k]
        cols["assigned_feature_id"] = nullable(asg, asg >= 0, pa.int32())
        cols["assigned_score"] = asc
    if mt.twin_best is not None and s == "base_sae":
        ids, score = mt.twin_best
        cols["twin_match_feature_id"] = nullable(ids, ids >= 0, pa.int32())
        cols["twin_match_score"] = score


def _top_tokens(state: PassState, s: str, d: int, vocab: list[str], flat_tokens: np.ndarray) -> pa.Array:
    """The distinct tokens of a feature's top examples on both models, space-joined (the table's search text).

    Per feature: the search forms of its top examples' tokens, base model first, each model's in
    rank order, each form once (its first occurrence). Vectorised over features: token ids are
    mapped to form ids (two token ids can share a form), repeated forms in a row are masked by a
    stable sort of the row, and Arrow joins the rows; no Python loop over features."""
    forms, form_of = np.unique(np.asarray([_search_form(v) for v in vocab], dtype=object), return_inverse=True)
    tk = np.concatenate([state.topk[(s, m)].token for m in MODELS], axis=1)  # [d, 2k], -1 = empty
    valid = tk >= 0
    fid = np.where(valid, form_of[flat_tokens[np.where(valid, tk, 0)]], -1)
    order = np.argsort(fid, axis=1, kind="stable")
    srt = np.take_along_axis(fid, order, axis=1)
    first = np.ones_like(valid)
    first[:, 1:] = srt[:, 1:] != srt[:, :-1]
    keep = np.zeros_like(valid)
    np.put_along_axis(keep, order, first, axis=1)
    keep &= valid
    lengths = keep.sum(axis=1)
    offsets = np.zeros(d + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    words = pa.ListArray.from_arrays(pa.array(offsets), pa.array(forms[fid[keep]].tolist() if keep.any() else [], pa.string()))
    return pc.binary_join(words, " ")


def features_table(prep: Prepared, state: PassState, mt: Matching | None, units: dict, vocab: list[str], summary: dict,
                   parts: dict | None = None) -> pa.Table:
    """features.parquet's rows for every SAE of the run; fills summary's per-feature counts (and
    `parts`, when given, with the seconds of its weights-only columns and top tokens)."""
    parts = {} if parts is None else parts

    def timed(name: str, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        parts[name] = parts.get(name, 0.0) + time.perf_counter() - t0
        return out

    flat_tokens = prep.sample.tokens.reshape(-1)
    for key in ("status_counts", "cross_class_counts", "alive", "significance", "act_similarity_nan", "logit_similarity_nan"):
        summary[key] = {}
    tables = []
    for s in state.sae_names:
        d = state.d_sae[s]
        cols: dict[str, Any] = {"sae": [s] * d, "feature_id": np.arange(d, dtype=np.int32)}
        _density_columns(prep, state, s, cols, summary)
        timed("logits", _logit_columns, prep, s, d, cols, summary)
        cols["kl_corr"] = state.kl_corr[s].finalize()
        for m in MODELS:
            cols[f"act_hist_{m}"] = list_col(state.features[(s, m)].hist, pa.int64())
        nn_ids, nn_cos = timed("nearest_neighbours", W.nearest_neighbours, units[s], W.N_NEIGHBOURS, W.CHUNK, prep.device)
        cols["nn_feature_ids"], cols["nn_cosines"] = list_col(nn_ids, pa.int32()), list_col(nn_cos, pa.float32())
        _match_columns(mt, s, d, cols)
        cols["top_tokens"] = timed("top_tokens", _top_tokens, state, s, d, vocab, flat_tokens)
        tables.append(pa.table(cols))
    return pa.concat_tables([t.select(schema.FEATURES.names).cast(schema.FEATURES) for t in tables])
