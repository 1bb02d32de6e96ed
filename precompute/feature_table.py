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

MODELS = schema.MODELS
MATCH_COLUMNS = (
    ("match_feature_id", pa.int32()), ("match_score", pa.float64()), ("match_act_corr", pa.float64()),
    ("match_dec_cos", pa.float64()), ("assigned_feature_id", pa.int32()), ("assigned_score", pa.float64()),
)


def _status(count: np.ndarray, density: np.ndarray, ultralow: float, dense: float) -> np.ndarray:
    return np.select([count == 0, density < ultralow, density > dense], ["dead", "ultralow", "dense"], "regular").astype(object)


def _cross_class(alive_b: np.ndarray, alive_f: np.ndarray) -> np.ndarray:
    return np.select(
        [alive_b & alive_f, alive_b & ~alive_f, ~alive_b & alive_f], ["both_alive", "died", "woke"], "both_dead"
    ).astype(object)


def _search_form(token: str) -> str:
    """A token as one space-free word for features.top_tokens: stripped, or whitespace made visible."""
    return token.strip().replace(" ", "\u2423") or token.replace("\n", "\\n").replace("\t", "\\t").replace(" ", "\u2423")


def vocab_strings(tokenizer, d_vocab: int) -> list[str]:
    """Each token id's display form alone (explorer/tokens.py: SentencePiece's `▁` as a space,
    partial UTF-8 bytes as \\xNN); ids past the tokenizer: '<id N>'."""
    from explorer.tokens import vocab_from_tokenizer

    return vocab_from_tokenizer(tokenizer, d_vocab).strs


def _density_columns(prep: Prepared, state: PassState, s: str, cols: dict, summary: dict) -> None:
    """Density, mean and max activation and status on each model; the cross-model class."""
    th = prep.cfg.thresholds
    alive = {}
    summary["status_counts"][s] = {}
    for m in MODELS:
        fs = state.features[(s, m)]
        fin = fs.finalize()
        cols[f"density_{m}"] = fin["density"]
        cols[f"mean_act_{m}"] = fin["mean_act"]
        cols[f"mean_active_act_{m}"] = fin["mean_active_act"]
        cols[f"max_act_{m}"] = state.topk[(s, m)].max()
        status = _status(fs.count, fin["density"], th.ultralow_density, th.dense_density)
        cols[f"status_{m}"] = status.astype(str)
        summary["status_counts"][s][m] = {k: int((status == k).sum()) for k in schema.STATUSES}
        alive[m] = fs.count > 0
    cc = _cross_class(alive["base"], alive["finetuned"])
    cols["cross_class"] = cc.astype(str)
    summary["cross_class_counts"][s] = {k: int((cc == k).sum()) for k in schema.CROSS_CLASSES}


def _pair_columns(state: PassState, s: str, cols: dict, summary: dict) -> None:
    """Activation similarity and error of each feature between the two models (pairing by identity)."""
    pair = state.pairs[s].finalize(state.features[(s, "base")], state.features[(s, "finetuned")])
    cols["act_similarity"], cols["act_error"] = pair["act_similarity"], pair["act_error"]
    summary["act_similarity_nan"][s] = int(np.isnan(pair["act_similarity"]).sum())


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
    else:  # the decoder does not write into the residual stream: no direct logits
        cols["logit_similarity"] = np.full(d, np.nan)
        for m in MODELS:
            for sign in ("pos", "neg"):
                cols[f"logit_{sign}_ids_{m}"] = pa.nulls(d, pa.list_(pa.int32()))
                cols[f"logit_{sign}_values_{m}"] = pa.nulls(d, pa.list_(pa.float32()))


def _match_columns(match: W.MatchResult | None, s: str, d: int, cols: dict) -> None:
    """Each feature's best match and its assigned partner in the other SAE (null without a second SAE)."""
    if match is None:
        for c, typ in MATCH_COLUMNS:
            cols[c] = pa.nulls(d, typ)
        return
    if s == "base_sae":
        best, bs_, bc, bcos, asg, asc = (match.best_b_for_a, match.best_score_a, match.best_corr_a, match.best_cos_a, match.assigned_b_for_a, match.assigned_score_a)
    else:
        best, bs_, bc, bcos, asg, asc = (match.best_a_for_b, match.best_score_b, match.best_corr_b, match.best_cos_b, match.assigned_a_for_b, match.assigned_score_b)
    cols["match_feature_id"] = nullable(best, best >= 0, pa.int32())
    cols["match_score"], cols["match_act_corr"], cols["match_dec_cos"] = bs_, bc, bcos
    cols["assigned_feature_id"] = nullable(asg, asg >= 0, pa.int32())
    cols["assigned_score"] = asc


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


def features_table(prep: Prepared, state: PassState, match: W.MatchResult | None, units: dict, vocab: list[str], summary: dict,
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
    summary["status_counts"], summary["cross_class_counts"], summary["act_similarity_nan"], summary["logit_similarity_nan"] = {}, {}, {}, {}
    tables = []
    for s in state.sae_names:
        d = state.d_sae[s]
        cols: dict[str, Any] = {"sae": [s] * d, "feature_id": np.arange(d, dtype=np.int32)}
        _density_columns(prep, state, s, cols, summary)
        _pair_columns(state, s, cols, summary)
        timed("logits", _logit_columns, prep, s, d, cols, summary)
        for m in MODELS:
            cols[f"act_hist_{m}"] = list_col(state.features[(s, m)].hist, pa.int64())
        nn_ids, nn_cos = timed("nearest_neighbours", W.nearest_neighbours, units[s], W.N_NEIGHBOURS, W.CHUNK, prep.device)
        cols["nn_feature_ids"], cols["nn_cosines"] = list_col(nn_ids, pa.int32()), list_col(nn_cos, pa.float32())
        _match_columns(match, s, d, cols)
        cols["top_tokens"] = timed("top_tokens", _top_tokens, state, s, d, vocab, flat_tokens)
        tables.append(pa.table(cols))
    return pa.concat_tables([t.select(schema.FEATURES.names).cast(schema.FEATURES) for t in tables])
