"""Stage 5, finalize: the finalized pass state into the run's tables, then the manifest, last.

`finalize` is the list of table builders; each builder is a function of the pass state (and, for
the features, the SAE weights and the matching) that returns an Arrow table, and each table is
written atomically (explorer.rundir.write_table) before the manifest names it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from explorer import rundir, schema
from precompute import examples as ex_mod
from precompute import weights as W
from precompute.accumulators import RESID_METRIC_ORDER, ResidStats
from precompute.calibration import Calibration
from precompute.columns import list_col
from explorer.tokens import Vocab, vocab_from_tokenizer
from precompute.crosscoder_tables import crosscoder_tables
from precompute.feature_table import features_table
from precompute.forward import ModelRunner
from precompute.hook_cache import HookActsCache
from precompute.log import log
from precompute.manifest import build_manifest
from precompute.pass_state import PassState
from precompute.prepare import Prepared

MODELS = schema.MODELS


def finalize(prep: Prepared, runners: dict[str, ModelRunner], state: PassState, calib: Calibration, run_dir: Path, timing: dict,
             hook_cache: HookActsCache | None = None) -> dict:
    """Compute the weights-only statistics and the examples' windows, write every table, then the manifest."""
    t0 = time.time()
    run_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, dict] = {}
    summary: dict[str, Any] = {}

    def write(name: str, table: pa.Table, **kw) -> None:
        files[name] = rundir.write_table(run_dir, name, table, **kw)

    parts: dict[str, float] = {}  # seconds per part, in the manifest's timing (B7)
    clock = [time.perf_counter()]

    def lap(name: str) -> None:
        now = time.perf_counter()
        parts[name] = parts.get(name, 0.0) + now - clock[0]
        clock[0] = now

    write("metrics.parquet", metrics_table(state, summary))
    for name, table in resid_tables(state.resid, prep.sample.context_size).items():
        write(name, table)
    lap("metrics_resid")
    units = {s: W.unit_rows(prep.pair.saes[s].W_dec) for s in state.sae_names}
    match = match_saes(prep, state, units)
    if match is not None:
        write("matches.parquet", matches_table(match))
        summary["matching"] = matching_summary(match, prep.cfg.thresholds.match)
    lap("matching")
    vocab_forms = vocab_from_tokenizer(prep.pair.base.tokenizer, int(prep.pair.base.cfg.d_vocab))
    vocab = vocab_forms.strs
    write("features.parquet", features_table(prep, state, match, units, vocab, summary, parts), row_group_size=schema.FEATURES_ROW_GROUP_SIZE)
    lap("features_other")
    examples, n_examples, hook_stats = examples_table(prep, runners, state, hook_cache)
    write("examples.parquet", examples, row_group_size=schema.EXAMPLES_ROW_GROUP_SIZE)
    lap("examples")
    write("tokens.parquet", tokens_table(prep))
    write("vocab.parquet", vocab_table(vocab_forms))
    lap("tokens_vocab")
    parts["features_other"] -= sum(parts.get(k, 0.0) for k in ("logits", "nearest_neighbours", "top_tokens"))
    if state.crosscoder is not None:  # issue 16
        for name, table in crosscoder_tables(prep, runners, state.crosscoder, hook_cache, summary).items():
            write(name, table, row_group_size=schema.EXAMPLES_ROW_GROUP_SIZE if name == "crosscoder_examples.parquet" else None)

    timing = {**timing, "finalize_seconds": time.time() - t0, "finalize_parts": parts,
              "window_batches_from_stream": hook_stats["cached"], "window_batches_recomputed": hook_stats["recomputed"]}
    manifest = build_manifest(prep, state, calib, summary, timing, files)
    rundir.write_manifest(run_dir, manifest)
    log(
        f"wrote {run_dir}: {prep.sample.n_tokens:,} tokens, {n_examples:,} examples"
        + (f", stream {timing['tokens_per_second']:,.0f} tok/s" if timing.get("tokens_per_second") else "")
        + f", finalize {timing['finalize_seconds']:.0f} s"
    )
    return manifest


def metrics_table(state: PassState, summary: dict) -> pa.Table:
    """metrics.parquet: one row per (sae, model, outlier variant)."""
    rows = [{"sae": s, "model": m, **row} for s in state.sae_names for m in MODELS for row in state.quality[(s, m)].finalize()]
    summary["explained_variance_nonfinite"] = {f"{r['sae']}/{r['model']}/{r['outliers']}": r["n_ev_nonfinite"] for r in rows}
    return pa.Table.from_pylist(rows)


def resid_tables(res: ResidStats, ctx: int) -> dict[str, pa.Table]:
    """resid_position, resid_histograms and resid_summary.parquet."""
    pos_n = res.pos_n
    with np.errstate(invalid="ignore", divide="ignore"):
        position = pa.table({"position": np.arange(ctx, dtype=np.int32), "n_tokens": pos_n, "mean_cosine": res.pos_cos / pos_n, "mean_l2": res.pos_l2 / pos_n})
    hist_rows = {"metric": [], "bin_left": [], "bin_right": [], "count": []}
    for i, metric in enumerate(RESID_METRIC_ORDER):
        lo, hi = res.range(i)
        edges = np.linspace(lo, hi, res.n_bins + 1)
        hist_rows["metric"] += [metric] * res.n_bins
        hist_rows["bin_left"] += edges[:-1].tolist()
        hist_rows["bin_right"] += edges[1:].tolist()
        hist_rows["count"] += res.hist[i].tolist()
    mom = res.moments.finalize()
    return {
        "resid_position.parquet": position,
        "resid_histograms.parquet": pa.table(hist_rows),
        "resid_summary.parquet": pa.table({"metric": list(RESID_METRIC_ORDER), **{k: mom[k] for k in ("n", "mean", "std", "min", "max")}}),
    }


def match_saes(prep: Prepared, state: PassState, units: dict) -> W.MatchResult | None:
    """The base SAE (on the base model) matched with the finetuned SAE (on the finetune); None with one SAE."""
    if state.cross is None:
        return None
    fa, fb = state.features[("base_sae", "base")], state.features[("finetuned_sae", "finetuned")]
    corr = state.cross.correlation(fa, fb)
    if state.cross.pair_keys is None:
        return W.match_all_pairs(corr, units["base_sae"], units["finetuned_sae"], prep.cfg.matching.n_kept_per_feature)
    return W.match_candidates(state.cross.pair_keys, corr, units["base_sae"], units["finetuned_sae"])


def matches_table(match: W.MatchResult) -> pa.Table:
    """matches.parquet: the candidate pairs with their scores and whether the assignment took them."""
    return pa.table(
        {
            "base_feature_id": match.pair_a.astype(np.int32), "finetuned_feature_id": match.pair_b.astype(np.int32),
            "act_corr": match.pair_corr, "dec_cos": match.pair_cos, "score": match.pair_score, "assigned": match.pair_assigned,
        }
    )


def matching_summary(match: W.MatchResult, thr: float) -> dict[str, Any]:
    return {
        "mode": match.mode,
        "n_candidate_pairs": match.n_candidate_pairs,
        "n_rows": int(len(match.pair_a)),
        "n_assigned": int((match.assigned_b_for_a >= 0).sum()),
        "threshold": thr,
        "n_lost": int(np.sum(~(np.nan_to_num(match.best_score_a, nan=-np.inf) >= thr))),
        "n_born": int(np.sum(~(np.nan_to_num(match.best_score_b, nan=-np.inf) >= thr))),
        "act_corr_nan_pairs": int(np.isnan(match.pair_corr).sum()),
    }


def examples_table(prep: Prepared, runners: dict[str, ModelRunner], state: PassState, hook_cache: HookActsCache | None) -> tuple[pa.Table, int, dict]:
    """examples.parquet: the top and quantile examples with their windows on both models.

    The windows' hook activations come from the stream's kept batches (`hook_cache`) or, for a
    batch not kept, from running both models up to the hook again. Returns (table, number of
    examples, {"cached": n, "recomputed": n} batches)."""
    import torch

    cfg, sample = prep.cfg, prep.sample
    ex = ex_mod.collect(state, cfg.examples.n_quantile_bins, cfg.examples.n_per_quantile_bin)
    codecs = prep.codecs
    hook_stats = {"cached": 0, "recomputed": 0}

    def resid_batch(b: int):  # both models at the hook on stream batch b: kept by the stream, or run again
        tok_np = sample.tokens[prep.batch_seq_ids(b)]
        kept = hook_cache.get(b, tok_np) if hook_cache is not None else None
        if kept is not None:
            hook_stats["cached"] += 1
            return {m: torch.from_numpy(kept[m]).to(prep.device) for m in MODELS}
        hook_stats["recomputed"] += 1
        tokens = torch.from_numpy(tok_np.astype(np.int64)).to(prep.device)
        with torch.inference_mode():
            return {m: runners[m].acts(tokens) for m in MODELS}

    def encode_at(sae_name: str, x, rows: np.ndarray, features: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return codecs[sae_name].encode_at(x.reshape(-1, x.shape[-1]), rows, features)

    win = ex_mod.fill_windows(
        ex, sample.tokens, cfg.sample.batch_size, cfg.examples.window_before, cfg.examples.window_after, resid_batch, encode_at, prep.special_ids
    )
    return ex_mod.table(ex, win, sample.context_size), len(ex), hook_stats


def tokens_table(prep: Prepared) -> pa.Table:
    """tokens.parquet: the sample's sequences with their source labels."""
    sample = prep.sample
    return pa.table(
        {"seq_id": np.arange(sample.n_sequences, dtype=np.int32), "source": pa.array(sample.sources, pa.string()), "token_ids": list_col(sample.tokens.astype(np.int32), pa.int32())}
    )


def vocab_table(vocab: Vocab) -> pa.Table:
    """vocab.parquet: each token id's display string, raw piece and bytes (explorer/tokens.py)."""
    return pa.table(
        {
            "token_id": np.arange(len(vocab), dtype=np.int32), "token_str": vocab.strs, "token_piece": vocab.pieces,
            "token_bytes": pa.array(vocab.raw, pa.binary()),
        }
    )
