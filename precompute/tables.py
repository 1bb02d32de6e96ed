"""Stage 5, finalize: the finalized pass state into the run's tables, then the manifest, last.

`finalize` is the list of table builders; each builder is a function of the pass state (and, for
the features, the SAE weights and the matching) that returns an Arrow table, and each table is
written atomically (explorer.rundir.write_table) before the manifest names it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from explorer import rundir, schema
from precompute import diffing
from precompute import examples as ex_mod
from precompute import stats_tables as st
from precompute import weights as W
from precompute.accumulators import RESID_METRIC_ORDER, ResidStats
from precompute.calibration import Calibration
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
    write("metrics_by_source.parquet", st.metrics_by_source_table(prep, state))
    for name, table in resid_tables(state.resid, prep.sample.context_size).items():
        write(name, table)
    lap("metrics_resid")
    units = {s: W.unit_rows(prep.pair.saes[s].W_dec) for s in state.sae_names}
    mt = st.matching(prep, state, units)
    if mt is not None:
        if mt.match is not None:
            write("matches.parquet", st.matches_table(mt.match))
        write("baseline.parquet", st.baseline_table(mt))
        if mt.separations:
            write("score_separation.parquet", st.score_separation_table(mt))
        summary["matching"] = st.matching_summary(mt, prep.cfg.thresholds.match)
    lap("matching")
    vocab_forms = vocab_from_tokenizer(prep.pair.base.tokenizer, int(prep.pair.base.cfg.d_vocab))
    vocab = vocab_forms.strs
    write("features.parquet", features_table(prep, state, mt, units, vocab, summary, parts), row_group_size=schema.FEATURES_ROW_GROUP_SIZE)
    write("features_by_source.parquet", st.features_by_source_table(prep, state, summary), row_group_size=schema.FEATURES_ROW_GROUP_SIZE)
    lap("features_other")
    resid_batch, hook_stats = resid_batches(prep, runners, hook_cache)
    examples, n_examples = examples_table(prep, state, resid_batch)
    write("examples.parquet", examples, row_group_size=schema.EXAMPLES_ROW_GROUP_SIZE)
    lap("examples")
    kl_batch, _ = resid_batches(prep, runners, hook_cache)  # its own counts: the timing's are the windows'
    write("kl_contexts.parquet", diffing.kl_contexts_table(prep, state, kl_batch))
    summary["kl"] = diffing.kl_summary(prep, state)
    lap("kl_contexts")
    write("tokens.parquet", diffing.tokens_table(prep, state))
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
    """metrics.parquet: one row per (sae, model, outlier variant), pooled over sources."""
    rows = st.metrics_rows(state, None)
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


def resid_batches(prep: Prepared, runners: dict[str, ModelRunner], hook_cache: HookActsCache | None) -> tuple[Callable[[int], dict], dict]:
    """(resid_batch, stats): resid_batch(b) gives both models' activations at the hook on stream
    batch b, kept by the stream (`hook_cache`) or run again; stats counts {"cached", "recomputed"} batches."""
    import torch

    sample = prep.sample
    hook_stats = {"cached": 0, "recomputed": 0}

    def resid_batch(b: int):
        tok_np = sample.tokens[prep.batch_seq_ids(b)]
        kept = hook_cache.get(b, tok_np) if hook_cache is not None else None
        if kept is not None:
            hook_stats["cached"] += 1
            return {m: torch.from_numpy(kept[m]).to(prep.device) for m in MODELS}
        hook_stats["recomputed"] += 1
        tokens = torch.from_numpy(tok_np.astype(np.int64)).to(prep.device)
        with torch.inference_mode():
            return {m: runners[m].acts(tokens) for m in MODELS}

    return resid_batch, hook_stats


def examples_table(prep: Prepared, state: PassState, resid_batch: Callable[[int], dict]) -> tuple[pa.Table, int]:
    """examples.parquet: the top and quantile examples with their windows on both models
    (the windows' hook activations from `resid_batch`). Returns (table, number of examples)."""
    import torch

    cfg, sample = prep.cfg, prep.sample
    ex = ex_mod.collect(state, cfg.examples.n_quantile_bins, cfg.examples.n_per_quantile_bin)
    codecs = prep.codecs

    def encode_at(sae_name: str, x, rows: np.ndarray, features: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return codecs[sae_name].encode_at(x.reshape(-1, x.shape[-1]), rows, features)

    win = ex_mod.fill_windows(
        ex, sample.tokens, cfg.sample.batch_size, cfg.examples.window_before, cfg.examples.window_after, resid_batch, encode_at, prep.special_ids
    )
    return ex_mod.table(ex, win, sample.context_size), len(ex)


def vocab_table(vocab: Vocab) -> pa.Table:
    """vocab.parquet: each token id's display string, raw piece and bytes (explorer/tokens.py)."""
    return pa.table(
        {
            "token_id": np.arange(len(vocab), dtype=np.int32), "token_str": vocab.strs, "token_piece": vocab.pieces,
            "token_bytes": pa.array(vocab.raw, pa.binary()),
        }
    )
