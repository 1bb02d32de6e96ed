"""Stage 5a, the statistics tables built at finalize from the pass state: the per-feature columns
that also exist per source (densities, similarity, paired significance, what changed most), the
per-source tables, the matching on every candidate score with the seed-twin baseline, and the
tables of born/lost curves and score separation (METHODS.md sections 7-10).

`per_feature(...)` is the one function that turns one (SAE, source) slice of the accumulators
into those columns: features.parquet takes it pooled, features_by_source.parquet per source.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from explorer import schema
from precompute import baseline as B
from precompute import significance as sig
from precompute import weights as W
from precompute.pass_state import PassState
from precompute.prepare import Prepared

MODELS = schema.MODELS


def _status(count: np.ndarray, density: np.ndarray, ultralow: float, dense: float) -> np.ndarray:
    return np.select([count == 0, density < ultralow, density > dense], ["dead", "ultralow", "dense"], "regular").astype(object)


def _cross_class(alive_b: np.ndarray, alive_f: np.ndarray) -> np.ndarray:
    return np.select(
        [alive_b & alive_f, alive_b & ~alive_f, ~alive_b & alive_f], ["both_alive", "died", "woke"], "both_dead"
    ).astype(object)


def per_feature(prep: Prepared, state: PassState, s: str, source: int | None) -> dict[str, Any]:
    """schema.PER_SOURCE_COLUMNS of SAE `s`, pooled (source None) or on one source's tokens."""
    th = prep.cfg.thresholds
    cols: dict[str, Any] = {}
    fin = {m: state.features[(s, m)].finalize(source) for m in MODELS}
    n_tok = {m: state.features[(s, m)].part(source)[0] for m in MODELS}
    for m in MODELS:
        cols[f"density_{m}"] = fin[m]["density"]
        cols[f"mean_act_{m}"] = fin[m]["mean_act"]
        cols[f"mean_active_act_{m}"] = fin[m]["mean_active_act"]
        cols[f"max_act_{m}"] = fin[m]["max_act"] if "max_act" in fin[m] else state.topk[(s, m)].max()
        cols[f"status_{m}"] = _status(fin[m]["count"], fin[m]["density"], th.ultralow_density, th.dense_density).astype(str)
        cols[f"count_{m}"] = fin[m]["count"].astype(np.int64)
    cb, cf = cols["count_base"], cols["count_finetuned"]
    cols["cross_class"] = _cross_class(cb > 0, cf > 0).astype(str)
    pair = state.pairs[s].finalize(state.features[(s, "base")], state.features[(s, "finetuned")], source)
    cols["act_similarity"], cols["act_error"] = pair["act_similarity"], pair["act_error"]
    b, c = pair["n_base_only"], pair["n_finetuned_only"]
    cols["n_fires_both"], cols["n_base_only"], cols["n_finetuned_only"] = pair["n_both"], b, c
    p = sig.mcnemar_p(b, c)
    tested = (cb > 0) | (cf > 0)
    q = sig.bh_q(p, tested)
    cols["p_value"], cols["q_value"] = p, q
    cols["change_class"] = sig.change_class(cb, cf, b, c, q, schema.SIGNIFICANCE_ALPHA).astype(str)
    cols["log_density_ratio"], cols["log_density_ratio_low"], cols["log_density_ratio_high"] = sig.log_density_ratio(cb, cf, n_tok["base"], n_tok["finetuned"])
    cols["delta_mean_active_act"] = cols["mean_active_act_finetuned"] - cols["mean_active_act_base"]
    cols["delta_max_act"] = cols["max_act_finetuned"] - cols["max_act_base"]
    return cols


def significance_summary(cols: dict[str, Any]) -> dict[str, Any]:
    """Counts per change class and the detection floor of one (SAE, source) slice."""
    tested = (cols["count_base"] > 0) | (cols["count_finetuned"] > 0)
    cc = np.asarray(cols["change_class"])
    return {
        "change_class_counts": {k: int((cc == k).sum()) for k in schema.CHANGE_CLASSES},
        "detection_floor": sig.detection_floor(cols["p_value"], tested, schema.SIGNIFICANCE_ALPHA),
        "bh_cutoff": sig.bh_cutoff(cols["p_value"], tested, schema.SIGNIFICANCE_ALPHA),
        "n_tested": int(tested.sum()),
    }


def features_by_source_table(prep: Prepared, state: PassState, summary: dict) -> pa.Table:
    """features_by_source.parquet: per_feature() of every SAE on every source, sorted by (sae, source, feature_id)."""
    parts = []
    summary["by_source"] = {}
    for s in state.sae_names:
        d = state.d_sae[s]
        summary["by_source"][s] = {}
        for i, name in enumerate(prep.source_names):
            cols = per_feature(prep, state, s, i)
            summary["by_source"][s][name] = significance_summary(cols)
            parts.append(pa.table({"sae": [s] * d, "feature_id": np.arange(d, dtype=np.int32), "source": [name] * d, **cols}))
    return pa.concat_tables([t.select(schema.FEATURES_BY_SOURCE.names).cast(schema.FEATURES_BY_SOURCE) for t in parts])


def metrics_rows(state: PassState, source: int | None) -> list[dict]:
    return [{"sae": s, "model": m, **row} for s in state.sae_names for m in MODELS for row in state.quality[(s, m)].finalize(source)]


def metrics_by_source_table(prep: Prepared, state: PassState) -> pa.Table:
    rows = [{**r, "source": name} for i, name in enumerate(prep.source_names) for r in metrics_rows(state, i)]
    return pa.Table.from_pylist(rows)


# ----------------------------------------------------------------------------------------------
# Matching, with the seed twin


@dataclass
class Matching:
    """The base SAE matched with each other SAE on every candidate score (PairScores), the run's
    score and why, the real pair's MatchResult, the twin's best matches and the score separation."""

    kind: str
    reason: str
    scores: dict[str, tuple[W.PairScores, np.ndarray, np.ndarray]]  # other -> (scores, alive base_sae, alive other)
    match: W.MatchResult | None  # base_sae x finetuned_sae (None without a finetuned SAE)
    twin_best: tuple[np.ndarray, np.ndarray] | None  # base_sae's best twin match (ids, scores)
    separations: dict[str, B.Separation]


def _unit_enc(sae) -> Any:
    return W.unit_rows(sae.W_enc.T)


def matching(prep: Prepared, state: PassState, units: dict) -> Matching | None:
    """Match base_sae (on base) with finetuned_sae (on finetuned) and with the twin (on base); None with neither."""
    if not state.cross:
        return None
    saes = {**prep.pair.saes}
    if prep.twin is not None:
        saes[state.twin] = prep.twin
    fa = state.features[("base_sae", "base")]
    alive_a = fa.count > 0
    scores = {}
    for other, cross in state.cross.items():
        fb = state.twin_features if other == state.twin else state.features[(other, "finetuned")]
        dec_b = units[other] if other in units else W.unit_rows(saes[other].W_dec)
        ps = W.pair_scores(
            cross.correlation(fa, fb), cross.cofire_correlation(fa, fb), units["base_sae"], dec_b,
            _unit_enc(saes["base_sae"]), _unit_enc(saes[other]), cross.pair_keys,
        )
        scores[other] = (ps, alive_a, fb.count > 0)
    seps: dict[str, B.Separation] = {}
    configured = prep.cfg.matching.score
    if state.twin is not None:
        ps, a, b = scores[state.twin]
        seps = B.separations(ps, a, b, B.random_pair_keys(ps.d_a, ps.d_b, prep.cfg.sample.seed))
    if configured != "auto":
        kind, reason = configured, "set in the config ([matching] score)"
    elif seps:
        kind = B.choose(seps)
        reason = "the highest AUC separating the seed twin's assigned pairs from random pairs"
    else:
        kind, reason = W.DEFAULT_SCORE, "the default without a seed twin to choose on"
    match = None
    if "finetuned_sae" in scores:
        ps, a, b = scores["finetuned_sae"]
        match = W.match(ps, kind, a, b, prep.cfg.matching.n_kept_per_feature)
    twin_best = None
    if state.twin is not None:
        ps, a, b = scores[state.twin]
        ids, best, _, _ = W.best_matches(ps, kind, a, b)
        twin_best = (ids, best)
    return Matching(kind, reason, scores, match, twin_best, seps)


def matches_table(match: W.MatchResult) -> pa.Table:
    """matches.parquet: the kept candidate pairs of alive features with every score and whether the assignment took them."""
    return pa.table(
        {
            "base_feature_id": match.pair_a.astype(np.int32), "finetuned_feature_id": match.pair_b.astype(np.int32),
            **{k: match.pair[k] for k in schema.MATCH_BASE_SCORES}, "score": match.pair["score"], "assigned": match.pair_assigned,
        }
    )


def baseline_table(mt: Matching) -> pa.Table:
    """baseline.parquet: born/lost counts and rates at every threshold, on every score, against the twin."""
    parts = []
    n = len(B.THRESHOLDS)
    for kind in schema.MATCH_SCORES:
        c = B.curves(mt.scores, kind)
        nulls = lambda: np.full(n, None, dtype=object)  # noqa: E731
        n_alive_a = c.get("n_alive_base_sae", c.get("n_alive_base_sae_twin"))
        cols = {
            "score": [kind] * n, "threshold": B.THRESHOLDS, "n_alive_base_sae": n_alive_a,
            "n_alive_finetuned_sae": c.get("n_alive_other", nulls()), "n_alive_twin": c.get("n_alive_other_twin", nulls()),
            "n_lost": c.get("n_lost", nulls()), "n_born": c.get("n_born", nulls()),
            "n_lost_twin": c.get("n_lost_twin", nulls()), "n_born_twin": c.get("n_born_twin", nulls()),
        }
        rate = lambda num, den: (np.asarray(num, np.float64) / np.asarray(den, np.float64)) if num is not None and den is not None else np.full(n, np.nan)  # noqa: E731
        with np.errstate(invalid="ignore", divide="ignore"):
            lost = rate(c.get("n_lost"), n_alive_a)
            born = rate(c.get("n_born"), c.get("n_alive_other"))
            lost_t = rate(c.get("n_lost_twin"), n_alive_a)
            born_t = rate(c.get("n_born_twin"), c.get("n_alive_other_twin"))
        cols.update(lost_rate=lost, born_rate=born, lost_rate_twin=lost_t, born_rate_twin=born_t, excess_lost=lost - lost_t, excess_born=born - born_t)
        parts.append(pa.table({k: pa.array(v.tolist() if isinstance(v, np.ndarray) and v.dtype == object else v) for k, v in cols.items()}))
    return pa.concat_tables([t.cast(schema.BASELINE) for t in parts])


def score_separation_table(mt: Matching) -> pa.Table:
    rows: dict[str, list] = {k: [] for k in schema.SCORE_SEPARATION.names}
    for kind, sep in mt.separations.items():
        edges, h_assigned, h_random = sep.histograms()
        for group, counts in (("assigned", h_assigned), ("random", h_random)):
            rows["score"] += [kind] * len(counts)
            rows["auc"] += [sep.auc] * len(counts)
            rows["group"] += [group] * len(counts)
            rows["bin_left"] += edges[:-1].tolist()
            rows["bin_right"] += edges[1:].tolist()
            rows["count"] += counts.tolist()
    return pa.table(rows)


def matching_summary(mt: Matching, thr: float) -> dict[str, Any]:
    """The manifest's summary.matching: the score and why, AUCs, and alive-only born/lost at `thr` with the twin's rates."""
    out: dict[str, Any] = {"score": mt.kind, "score_reason": mt.reason, "threshold": thr, "counts": "alive features only"}
    out["auc"] = {k: s.auc for k, s in mt.separations.items()}
    i = int(np.argmin(np.abs(B.THRESHOLDS - thr)))
    c = B.curves(mt.scores, mt.kind)
    at = lambda k: int(c[k][i]) if k in c and abs(B.THRESHOLDS[i] - thr) < 1e-9 else None  # noqa: E731
    if mt.match is not None:
        m = mt.match
        alive_a, alive_b = mt.scores["finetuned_sae"][1], mt.scores["finetuned_sae"][2]
        below = lambda v, alive: int(np.sum(alive & ~(np.nan_to_num(v, nan=-np.inf) >= thr)))  # noqa: E731
        out.update(
            mode=m.mode, n_candidate_pairs=m.n_candidate_pairs, n_rows=int(len(m.pair_a)), n_assigned=int((m.assigned_b_for_a >= 0).sum()),
            n_alive_base_sae=int(alive_a.sum()), n_alive_finetuned_sae=int(alive_b.sum()),
            n_lost=below(m.best_score_a, alive_a), n_born=below(m.best_score_b, alive_b),
            act_corr_nan_pairs=int(np.isnan(m.pair["act_corr"]).sum()),
        )
    if mt.twin_best is not None:
        alive_t = mt.scores[schema.TWIN][2]
        out.update(n_alive_twin=int(alive_t.sum()), n_lost_twin=at("n_lost_twin"), n_born_twin=at("n_born_twin"))
        n_a = int(mt.scores[schema.TWIN][1].sum())
        out["lost_rate_twin"] = out["n_lost_twin"] / n_a if n_a and out["n_lost_twin"] is not None else None
        out["born_rate_twin"] = out["n_born_twin"] / int(alive_t.sum()) if alive_t.sum() and out["n_born_twin"] is not None else None
        if mt.match is not None:
            out["lost_rate"] = out["n_lost"] / max(out["n_alive_base_sae"], 1)
            out["born_rate"] = out["n_born"] / max(out["n_alive_finetuned_sae"], 1)
    return out
