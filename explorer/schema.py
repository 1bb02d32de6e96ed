"""The run-directory schema: the one place that says what a precompute run contains.

Writers (`precompute/`) and readers (`explorer/store.py`) and tests import the tables and
names from here; nothing else spells a column name as a literal string twice.

A run lives in `data/runs/<run_id>/`:

    manifest.json            written LAST; `complete: true` means every file listed is whole
    vocab.parquet            VOCAB
    tokens.parquet           TOKENS            the token sample every statistic is computed on
    metrics.parquet          METRICS           SAE quality per (sae, model, outliers)
    resid_position.parquet   RESID_POSITION    residual similarity by context position
    resid_histograms.parquet RESID_HISTOGRAMS  residual similarity histograms
    resid_summary.parquet    RESID_SUMMARY     residual similarity global statistics
    features.parquet         FEATURES          one row per (sae, feature_id), both models
    features_by_source.parquet FEATURES_BY_SOURCE  the per-feature statistics per corpus source
    metrics_by_source.parquet  METRICS_BY_SOURCE   SAE quality per (sae, model, outliers, source)
    examples.parquet         EXAMPLES          top and quantile examples, sorted by (sae, feature_id)
    matches.parquet          MATCHES           candidate pairs between the two SAEs (two-SAE runs)
    baseline.parquet         BASELINE          born/lost counts over the match threshold, against the seed twin
    score_separation.parquet SCORE_SEPARATION  each matching score on the twin's assigned vs random pairs (twin runs)
    kl_contexts.parquet      KL_CONTEXTS       the tokens where the two models' predictions differ most
    crosscoder*.parquet      CROSSCODER...     a crosscoder over both models (runs with [crosscoder])

Vocabulary (STYLE.md): `feature_id` is the latent index, never a row position; `model` is
"base" or "finetuned"; `sae` is "base_sae" or "finetuned_sae"; `run_id` names a run.
Units: activations are in the SAE's own units (the output of `sae.encode`); densities are
fractions of tokens in [0, 1]; CE losses are nats per token; cosines and correlations are in
[-1, 1]; L2 distances are in the residual stream's own units.

Which tokens count (precompute/stream.py): special tokens (BOS/EOS/PAD) are left out of every SAE
and feature statistic, as SAELens's `run_evals` leaves them out; residual-stream similarity
covers every token. The manifest's `n_counted_tokens` is the number of counted tokens. A CE loss,
KL or loss difference at position p (the prediction of token p + 1) counts when token p counts.
The zero-ablated CE zeros every position, BOS included, unless `[evals] zero_ablation =
"counted"` (manifest config).

Alive: a feature is alive on a model when it fires at least once on the sample's counted tokens.
Born and lost counts, the matching and the assignment cover alive features only: a base_sae
feature alive on the base model, a finetuned_sae feature alive on the finetuned model, a
base_sae_twin feature alive on the base model.

Sources: every sequence has a source label (the corpus's `source` column, or "unlabelled");
the *_by_source tables hold the same statistics computed on each source's tokens alone.
The methods, column by column, are in docs/METHODS.md.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

SCHEMA_VERSION = 3  # 2: the optional crosscoder tables (issue 16), vocab pieces (issue 11); 3: per-source tables, baseline, significance, KL (issue 12)

MANIFEST = "manifest.json"
MODELS = ("base", "finetuned")
SAES = ("base_sae", "finetuned_sae")
TWIN = "base_sae_twin"  # the base SAE's seed twin: matched with base_sae only (the null baseline)
STATUSES = ("dead", "ultralow", "regular", "dense")
CROSS_CLASSES = ("both_alive", "died", "woke", "both_dead")
# significance classes (precompute/significance.py; METHODS.md section 8)
CHANGE_CLASSES = ("died", "rarer", "too_rare_to_tell", "no_significant_change", "commoner", "woke", "both_dead")
SIGNIFICANCE_ALPHA = 0.01  # on the Benjamini-Hochberg q-value
UNLABELLED_SOURCE = "unlabelled"
# matching scores (precompute/weights.py; METHODS.md section 7)
MATCH_BASE_SCORES = ("act_corr", "cofire_corr", "dec_cos", "enc_cos")
MATCH_SCORES = MATCH_BASE_SCORES + ("act_corr+dec_cos", "cofire_corr+dec_cos")
DEFAULT_MATCH_SCORE = "act_corr+dec_cos"
MATCH_SCORE_DOCS = {
    "act_corr": "Pearson correlation over all counted tokens of the two features' activations",
    "cofire_corr": "Pearson correlation over the tokens where either feature fires",
    "dec_cos": "cosine of the two decoder rows",
    "enc_cos": "cosine of the two encoder columns",
    "act_corr+dec_cos": "mean of act_corr (NaN as 0) and dec_cos",
    "cofire_corr+dec_cos": "mean of cofire_corr (NaN as 0) and dec_cos",
}
EXAMPLE_KINDS = ("top", "quantile")
RESID_METRICS = ("cosine", "l2", "seq_mean_cosine", "seq_mean_l2")

# Fixed, log-spaced activation histogram bins (mergeable across shards without knowing the max).
# Bin i counts positive activations in [ACT_HIST_EDGES[i], ACT_HIST_EDGES[i+1]); activations
# below the first edge fall in bin 0 and above the last in the last bin.
ACT_HIST_EDGES = np.logspace(-4, 4, 65)
N_ACT_HIST_BINS = len(ACT_HIST_EDGES) - 1

# Residual similarity histograms: fixed ranges, 100 bins (METHODS.md section 1).
RESID_HIST_BINS = 100
COSINE_RANGE = (-1.0, 1.0)

_model_cols = lambda name, typ: [pa.field(f"{name}_{m}", typ) for m in MODELS]  # noqa: E731


def _doc(schema: pa.Schema, docs: dict[str, str]) -> pa.Schema:
    """Attach the column docs as field metadata, and check every column has one."""
    missing = [f.name for f in schema if f.name not in docs]
    extra = [k for k in docs if k not in schema.names]
    if missing or extra:
        raise AssertionError(f"schema docs out of sync: missing {missing}, extra {extra}")
    return pa.schema([f.with_metadata({"doc": docs[f.name]}) for f in schema])


VOCAB = _doc(
    pa.schema(
        [pa.field("token_id", pa.int32(), nullable=False), pa.field("token_str", pa.string()), pa.field("token_piece", pa.string()), pa.field("token_bytes", pa.binary())]
    ),
    {
        "token_id": "token id (shared by both tokenizers)",
        "token_str": "display form of the token alone (explorer/tokens.py: SentencePiece's ▁ as a space, bytes that are not a whole character as \\xNN); escape before rendering",
        "token_piece": "the tokenizer's raw piece (convert_ids_to_tokens, e.g. 'Ġcaf', '▁the', '<0xC3>'), shown on hover",
        "token_bytes": "the UTF-8 bytes the token adds to decoded text (null past the tokenizer); windows decode runs of them together so characters split over tokens read whole",
    },
)

TOKENS = _doc(
    pa.schema(
        [
            pa.field("seq_id", pa.int32(), nullable=False),
            pa.field("source", pa.string()),
            pa.field("token_ids", pa.list_(pa.int32())),
            pa.field("kl", pa.list_(pa.float32())),
            pa.field("loss_diff", pa.list_(pa.float32())),
        ]
    ),
    {
        "seq_id": "sequence index in the run's token sample (0..n_sequences-1)",
        "source": "corpus label of the sequence, e.g. 'english' or 'python' ('unlabelled' without a source column)",
        "token_ids": "the context_size token ids fed to both models",
        "kl": "per position p: KL(p_base || p_finetuned) of the two models' next-token distributions after tokens 0..p (nats); NaN at the last position",
        "loss_diff": "per position p: loss_finetuned - loss_base on the true next token p + 1 (nats); NaN at the last position",
    },
)

_metric_docs = {
    "sae": "base_sae or finetuned_sae",
    "model": "base or finetuned: the model whose activations the SAE encodes",
    "outliers": "'included' (all tokens) or 'excluded' (tokens whose activation norm exceeds the outlier threshold removed)",
    "n_tokens": "tokens counted",
    "l0": "mean number of features with activation > 0 per token",
    "mse": "squared reconstruction error summed over dimensions, mean over tokens",
    "explained_variance": "sae_lens 6.54 `explained_variance` (its current definition): 1 - mean_t ||x - x_hat||^2 / (mean_t ||x||^2 - ||mean_t x||^2), pooled over the tokens counted, float64",
    "explained_variance_legacy": "sae_lens 6.54 `explained_variance_legacy` (its old formula): mean over tokens of 1 - ||x - x_hat||^2 / ||x - mean_batch(x)||^2, the mean over the batch's counted tokens ([sample] batch_size sequences); depends on the batch size",
    "pooled_r2": "Study T's pooled R^2: 1 - SSE / SST over all scalar elements (can be far below 0)",
    "ce_clean": "next-token CE loss without hooks (nats/token)",
    "ce_spliced": "CE loss with the activation replaced by the SAE reconstruction",
    "ce_zero_ablated": "CE loss with the activation replaced by zeros (every position, BOS included, unless [evals] zero_ablation = 'counted')",
    "ce_delta": "ce_spliced - ce_clean",
    "ce_recovered": "(ce_zero_ablated - ce_spliced) / (ce_zero_ablated - ce_clean); NaN when |zero - clean| < 1e-4",
    "outlier_fraction": "share of tokens whose activation norm exceeds the outlier threshold",
    "n_nonfinite_clean": "tokens whose clean loss was NaN/inf (counted, excluded from means)",
    "n_nonfinite_spliced": "tokens whose spliced loss was NaN/inf",
    "n_nonfinite_zero_ablated": "tokens whose zero-ablated loss was NaN/inf",
}
METRICS = _doc(
    pa.schema(
        [pa.field("sae", pa.string()), pa.field("model", pa.string()), pa.field("outliers", pa.string()), pa.field("n_tokens", pa.int64())]
        + [pa.field(k, pa.float64()) for k in ("l0", "mse", "explained_variance", "explained_variance_legacy", "pooled_r2", "ce_clean", "ce_spliced", "ce_zero_ablated", "ce_delta", "ce_recovered", "outlier_fraction")]
        + [pa.field(k, pa.int64()) for k in ("n_nonfinite_clean", "n_nonfinite_spliced", "n_nonfinite_zero_ablated")]
    ),
    _metric_docs,
)
METRICS_BY_SOURCE = _doc(
    pa.schema([*METRICS, pa.field("source", pa.string())]),
    {**_metric_docs, "source": "the corpus source whose tokens alone these numbers cover"},
)

RESID_POSITION = _doc(
    pa.schema(
        [pa.field("position", pa.int32()), pa.field("n_tokens", pa.int64()), pa.field("mean_cosine", pa.float64()), pa.field("mean_l2", pa.float64())]
    ),
    {
        "position": "context position (0 = BOS)",
        "n_tokens": "tokens at that position in the sample",
        "mean_cosine": "mean cosine(x_base, x_finetuned) at that position",
        "mean_l2": "mean ||x_base - x_finetuned|| at that position",
    },
)

RESID_HISTOGRAMS = _doc(
    pa.schema(
        [pa.field("metric", pa.string()), pa.field("bin_left", pa.float64()), pa.field("bin_right", pa.float64()), pa.field("count", pa.int64())]
    ),
    {
        "metric": "cosine | l2 (per token) | seq_mean_cosine | seq_mean_l2 (per sequence)",
        "bin_left": "left edge (inclusive)",
        "bin_right": "right edge (exclusive; the last bin includes it)",
        "count": "tokens (or sequences) in the bin",
    },
)

RESID_SUMMARY = _doc(
    pa.schema(
        [pa.field("metric", pa.string()), pa.field("n", pa.int64()), pa.field("mean", pa.float64()), pa.field("std", pa.float64()), pa.field("min", pa.float64()), pa.field("max", pa.float64())]
    ),
    {"metric": "cosine | l2 | seq_mean_cosine | seq_mean_l2", "n": "tokens or sequences", "mean": "mean", "std": "population std", "min": "min", "max": "max"},
)

_logit_cols = []
_logit_docs = {}
for _m in MODELS:
    for _sign in ("pos", "neg"):
        _logit_cols += [pa.field(f"logit_{_sign}_ids_{_m}", pa.list_(pa.int32())), pa.field(f"logit_{_sign}_values_{_m}", pa.list_(pa.float32()))]
        _logit_docs[f"logit_{_sign}_ids_{_m}"] = f"token ids of the top 10 {'positive' if _sign == 'pos' else 'negative'} entries of W_dec[i] @ W_U({_m})"
        _logit_docs[f"logit_{_sign}_values_{_m}"] = f"their values (descending for pos, ascending for neg)"

_logit_effect_cols = []
for _sign in ("pos", "neg"):
    _logit_effect_cols += [pa.field(f"logit_effect_{_sign}_ids", pa.list_(pa.int32())), pa.field(f"logit_effect_{_sign}_values", pa.list_(pa.float32()))]
    _logit_docs[f"logit_effect_{_sign}_ids"] = (
        f"token ids of the top 10 {'positive' if _sign == 'pos' else 'negative'} entries of the logit effect W_dec[i] @ (W_U(finetuned) - W_U(base))"
    )
    _logit_docs[f"logit_effect_{_sign}_values"] = "their values (descending for pos, ascending for neg)"

# Per-feature statistics that also exist per source (features_by_source.parquet holds them under
# the same names, one row per (sae, feature_id, source)).
_per_source_fields = (
    _model_cols("density", pa.float64())
    + _model_cols("mean_act", pa.float64())
    + _model_cols("mean_active_act", pa.float64())
    + _model_cols("max_act", pa.float64())
    + _model_cols("status", pa.string())
    + [
        pa.field("cross_class", pa.string()),
        pa.field("act_similarity", pa.float64()),
        pa.field("act_error", pa.float64()),
    ]
    + _model_cols("count", pa.int64())
    + [
        pa.field("n_fires_both", pa.int64()),
        pa.field("n_base_only", pa.int64()),
        pa.field("n_finetuned_only", pa.int64()),
        pa.field("p_value", pa.float64()),
        pa.field("q_value", pa.float64()),
        pa.field("change_class", pa.string()),
        pa.field("log_density_ratio", pa.float64()),
        pa.field("log_density_ratio_low", pa.float64()),
        pa.field("log_density_ratio_high", pa.float64()),
        pa.field("delta_mean_active_act", pa.float64()),
        pa.field("delta_max_act", pa.float64()),
    ]
)
PER_SOURCE_COLUMNS = tuple(f.name for f in _per_source_fields)
_per_source_docs = {
    **{f"density_{m}": f"fraction of counted tokens where the feature fires (> 0) on the {m} model" for m in MODELS},
    **{f"mean_act_{m}": f"mean activation over all counted tokens on the {m} model" for m in MODELS},
    **{f"mean_active_act_{m}": f"mean activation over firing tokens on the {m} model (NaN if dead)" for m in MODELS},
    **{f"max_act_{m}": f"max activation on the {m} model (0 if dead)" for m in MODELS},
    **{f"status_{m}": "dead | ultralow | regular | dense (thresholds in the manifest config)" for m in MODELS},
    "cross_class": "both_alive | died (alive on base, dead on finetuned) | woke (dead on base, alive on finetuned) | both_dead: descriptive, no test",
    "act_similarity": "Pearson over counted tokens of f_i(x_base) and f_i(x_finetuned); NaN when either side is constant",
    "act_error": "mean over counted tokens of |log10(f_i(x_base)+eps) - log10(f_i(x_finetuned)+eps)|, eps in the manifest",
    **{f"count_{m}": f"counted tokens where the feature fires on the {m} model" for m in MODELS},
    "n_fires_both": "counted tokens where it fires on both models",
    "n_base_only": "b: tokens where it fires on the base model only (count_base - n_fires_both)",
    "n_finetuned_only": "c: tokens where it fires on the finetuned model only; under no change in density the expected count on the finetuned model is count_base (the same tokens)",
    "p_value": "exact McNemar p-value: two-sided binomial test of c out of b + c at 1/2 (1 when b + c = 0)",
    "q_value": "Benjamini-Hochberg q-value across the SAE's features that fire on at least one model (NaN for both_dead)",
    "change_class": "died | rarer | too_rare_to_tell | no_significant_change | commoner | woke | both_dead, at q < SIGNIFICANCE_ALPHA (docs/METHODS.md section 8)",
    "log_density_ratio": "log10((count_finetuned + 0.5) / (count_base + 0.5)), the tokens being the same",
    "log_density_ratio_low": "lower end of its 95% interval (Poisson approximation, counts taken as independent)",
    "log_density_ratio_high": "upper end of its 95% interval",
    "delta_mean_active_act": "mean_active_act_finetuned - mean_active_act_base (NaN unless alive on both)",
    "delta_max_act": "max_act_finetuned - max_act_base",
}

FEATURES = _doc(
    pa.schema(
        [pa.field("sae", pa.string(), nullable=False), pa.field("feature_id", pa.int32(), nullable=False)]
        + _per_source_fields
        + [pa.field("logit_similarity", pa.float64())]
        + _logit_cols
        + _logit_effect_cols
        + [pa.field("logit_effect_max_abs", pa.float64()), pa.field("kl_corr", pa.float64())]
        + _model_cols("act_hist", pa.list_(pa.int64()))
        + [
            pa.field("nn_feature_ids", pa.list_(pa.int32())),
            pa.field("nn_cosines", pa.list_(pa.float32())),
            pa.field("match_feature_id", pa.int32()),
            pa.field("match_score", pa.float64()),
            pa.field("match_act_corr", pa.float64()),
            pa.field("match_cofire_corr", pa.float64()),
            pa.field("match_dec_cos", pa.float64()),
            pa.field("match_enc_cos", pa.float64()),
            pa.field("assigned_feature_id", pa.int32()),
            pa.field("assigned_score", pa.float64()),
            pa.field("twin_match_feature_id", pa.int32()),
            pa.field("twin_match_score", pa.float64()),
            pa.field("top_tokens", pa.string()),
        ]
    ),
    {
        "sae": "base_sae or finetuned_sae",
        "feature_id": "latent index in that SAE",
        **_per_source_docs,
        "logit_similarity": "Pearson over the vocabulary of W_dec[i] @ W_U(base) and W_dec[i] @ W_U(finetuned)",
        **_logit_docs,
        "logit_effect_max_abs": "the largest |entry| of the logit effect W_dec[i] @ (W_U(finetuned) - W_U(base))",
        "kl_corr": "Pearson over counted tokens (those with a next token) of |f_i(x_finetuned) - f_i(x_base)| and KL(p_base || p_finetuned)",
        **{f"act_hist_{m}": f"counts of positive activations on the {m} model in the bins schema.ACT_HIST_EDGES" for m in MODELS},
        "nn_feature_ids": "top 10 other features of the same SAE by decoder cosine",
        "nn_cosines": "their decoder cosines (descending)",
        "match_feature_id": "best match in the other SAE among its alive features (null without a second SAE, or if this feature is dead on its own model)",
        "match_score": "its score on the run's matching score (manifest summary.matching.score; MATCH_SCORE_DOCS)",
        "match_act_corr": "activation correlation of the best match over all counted tokens (this SAE on its model vs the other SAE on its model, same tokens)",
        "match_cofire_corr": "activation correlation of the best match over the tokens where either fires",
        "match_dec_cos": "decoder cosine of the best match",
        "match_enc_cos": "encoder cosine of the best match",
        "assigned_feature_id": "partner in the one-to-one assignment of alive features on the matching score (null if unassigned or dead)",
        "assigned_score": "matching score of the assigned pair",
        "twin_match_feature_id": "base_sae only: best match in the seed twin base_sae_twin (the null baseline), on the same score",
        "twin_match_score": "its score",
        "top_tokens": "space-separated token strings at the max of the top examples (both models), for search",
    },
)

FEATURES_BY_SOURCE = _doc(
    pa.schema(
        [pa.field("sae", pa.string(), nullable=False), pa.field("feature_id", pa.int32(), nullable=False), pa.field("source", pa.string(), nullable=False)]
        + _per_source_fields
    ),
    {
        "sae": "base_sae or finetuned_sae",
        "feature_id": "latent index in that SAE",
        "source": "the corpus source whose counted tokens alone these statistics cover (q-values: across the SAE's features within that source)",
        **_per_source_docs,
    },
)

EXAMPLES = _doc(
    pa.schema(
        [
            pa.field("sae", pa.string(), nullable=False),
            pa.field("feature_id", pa.int32(), nullable=False),
            pa.field("model", pa.string(), nullable=False),
            pa.field("kind", pa.string(), nullable=False),
            pa.field("bin", pa.int16()),
            pa.field("bin_low", pa.float32()),
            pa.field("bin_high", pa.float32()),
            pa.field("rank", pa.int16()),
            pa.field("seq_id", pa.int32()),
            pa.field("position", pa.int16()),
            pa.field("activation", pa.float32()),
            pa.field("window_start", pa.int16()),
            pa.field("token_ids", pa.list_(pa.int32())),
            pa.field("acts_base", pa.list_(pa.float32())),
            pa.field("acts_finetuned", pa.list_(pa.float32())),
        ]
    ),
    {
        "sae": "base_sae or finetuned_sae",
        "feature_id": "latent index",
        "model": "the model whose activations selected this example",
        "kind": "top (highest activations) | quantile (a uniform sample of the firing tokens, cut into equal-count activation bins)",
        "bin": "quantile bin index (0 = lowest); null for top examples",
        "bin_low": "lowest activation among the feature's sampled tokens in this quantile bin; null for top",
        "bin_high": "highest activation among the feature's sampled tokens in this quantile bin; null for top",
        "rank": "0-based rank within (kind, bin): by activation for top, by sampling priority for quantile",
        "seq_id": "sequence in tokens.parquet",
        "position": "position of the selecting token in the sequence",
        "activation": "feature activation at (seq_id, position) on `model`",
        "window_start": "position of the first token of the window in the sequence",
        "token_ids": "the window's token ids",
        "acts_base": "the feature's activation on each window token, base model (0 at special tokens)",
        "acts_finetuned": "the feature's activation on each window token, finetuned model (0 at special tokens)",
    },
)

MATCHES = _doc(
    pa.schema(
        [
            pa.field("base_feature_id", pa.int32()),
            pa.field("finetuned_feature_id", pa.int32()),
            pa.field("act_corr", pa.float64()),
            pa.field("cofire_corr", pa.float64()),
            pa.field("dec_cos", pa.float64()),
            pa.field("enc_cos", pa.float64()),
            pa.field("score", pa.float64()),
            pa.field("assigned", pa.bool_()),
        ]
    ),
    {
        "base_feature_id": "feature of base_sae (encoding the base model; alive on it)",
        "finetuned_feature_id": "feature of finetuned_sae (encoding the finetuned model; alive on it)",
        "act_corr": "Pearson over the same counted tokens of f_i(base_sae, x_base) and f_j(finetuned_sae, x_finetuned); NaN if constant",
        "cofire_corr": "the same over the tokens where either fires",
        "dec_cos": "cos(W_dec_base_sae[i], W_dec_finetuned_sae[j])",
        "enc_cos": "cos(W_enc_base_sae[:, i], W_enc_finetuned_sae[:, j])",
        "score": "the run's matching score (manifest summary.matching.score) of the pair",
        "assigned": "the pair is in the one-to-one assignment of alive features",
    },
)

# ------------------------------------------------------------------ crosscoder (issue 16)
# One crosscoder over both models (precompute/crosscoder_stats.py defines every quantity): its
# latent j has one activation f_j(t) per token (from both models' activations) and one decoder
# row per model, d_j^base and d_j^finetuned (W_dec[m, j], in the crosscoder's normalised space).

CROSSCODER = _doc(
    pa.schema(
        [pa.field("feature_id", pa.int32(), nullable=False)]
        + [pa.field(k, pa.float64()) for k in ("dec_norm_base", "dec_norm_finetuned", "relative_norm", "dec_cos")]
        + [pa.field(k, pa.float64()) for k in ("density", "mean_act", "mean_active_act", "max_act")]
        + _model_cols("density", pa.float64())
        + [pa.field("act_hist", pa.list_(pa.int64()))]
        + [pa.field(f"beta_{kind}_{m}", pa.float64()) for kind in ("error", "recon") for m in MODELS]
        + [pa.field(k, pa.float64()) for k in ("nu_error", "nu_recon", "nu_error_mirror", "nu_recon_mirror")]
        + [pa.field(f"nearest_{s}_{k}", t) for s in SAES for k, t in (("ids", pa.list_(pa.int32())), ("cos", pa.list_(pa.float32())))]
    ),
    {
        "feature_id": "latent index in the crosscoder",
        "dec_norm_base": "||d_j^base||, the norm of the latent's base decoder row",
        "dec_norm_finetuned": "||d_j^finetuned||",
        "relative_norm": "||d_F|| / (||d_B|| + ||d_F||): ~0 base-only, ~0.5 shared, ~1 finetune-only (Anthropic 2024); NaN when both are 0",
        "dec_cos": "cos(d_j^base, d_j^finetuned); NaN when either is 0",
        "density": "fraction of counted tokens where the latent fires (f_j > 0)",
        "mean_act": "mean of f_j over counted tokens",
        "mean_active_act": "mean of f_j over the tokens where it fires (NaN if dead)",
        "max_act": "max of f_j (0 if dead)",
        **{f"density_{m}": f"fraction of counted tokens where the latent writes into the {m} model's reconstruction (f_j > 0 and d_j^{m} != 0)" for m in MODELS},
        "act_hist": "counts of positive f_j in the bins schema.ACT_HIST_EDGES",
        **{f"beta_error_{m}": f"Latent Scaling: best scalar fit of f_j d_j^finetuned to the {m} model's error without latent j (activation minus the other latents' reconstruction; Minder et al. 2025)" for m in MODELS},
        **{f"beta_recon_{m}": f"Latent Scaling: best scalar fit of f_j d_j^finetuned to the {m} model's reconstruction" for m in MODELS},
        "nu_error": "beta_error_base / beta_error_finetuned (Minder et al.'s nu^epsilon: ~0 a real finetune-only latent, ~1 complete shrinkage)",
        "nu_recon": "beta_recon_base / beta_recon_finetuned (Minder et al.'s nu^r: ~0 real, ~1 latent decoupling)",
        "nu_error_mirror": "the mirror for base-only latents: fits of f_j d_j^base, beta_error_finetuned / beta_error_base",
        "nu_recon_mirror": "the mirror: beta_recon_finetuned / beta_recon_base with f_j d_j^base",
        **{f"nearest_{s}_ids": f"the {s} features nearest to d_j^{'base' if s == 'base_sae' else 'finetuned'} by decoder cosine (best first; empty if that row is 0, null without the SAE)" for s in SAES},
        **{f"nearest_{s}_cos": "their decoder cosines" for s in SAES},
    },
)

CROSSCODER_EXAMPLES = _doc(
    pa.schema(
        [EXAMPLES.field(n) for n in ("feature_id", "kind", "bin", "bin_low", "bin_high", "rank", "seq_id", "position", "activation", "window_start")]
        + [pa.field("acts", pa.list_(pa.float32()))]
    ),
    {
        "feature_id": "crosscoder latent",
        "kind": "top (highest f_j) | quantile (a uniform sample of the firing tokens in equal-count activation bins)",
        "bin": "quantile bin index (0 = lowest); null for top examples",
        "bin_low": "lowest f_j among the latent's sampled tokens in this bin; null for top",
        "bin_high": "highest f_j among the latent's sampled tokens in this bin; null for top",
        "rank": "0-based rank within (kind, bin)",
        "seq_id": "sequence in tokens.parquet (the window's token ids are read from there)",
        "position": "position of the selecting token in the sequence",
        "activation": "f_j at (seq_id, position)",
        "window_start": "position of the window's first token; the window is acts' length long",
        "acts": "f_j on each window token (0 at special tokens); model m's line is acts x dec_norm_m",
    },
)

CROSSCODER_LINKS = _doc(
    pa.schema(
        [pa.field("sae", pa.string(), nullable=False), pa.field("feature_id", pa.int32(), nullable=False), pa.field("rank", pa.int16()),
         pa.field("latent_id", pa.int32()), pa.field("dec_cos", pa.float32())]
    ),
    {
        "sae": "base_sae (linked through d_j^base) or finetuned_sae (through d_j^finetuned)",
        "feature_id": "feature of that SAE",
        "rank": "0 = the crosscoder latent with the largest decoder cosine to this feature",
        "latent_id": "crosscoder latent",
        "dec_cos": "cos(W_dec_sae[feature_id], d_latent^model), in the model's own space",
    },
)

CROSSCODER_METRICS = _doc(
    pa.schema(
        [f for f in METRICS if f.name != "sae"]
    ),
    {
        **{k: v.replace("SAE", "crosscoder") for k, v in _metric_docs.items() if k not in ("sae", "model")},
        "model": "base or finetuned: the model whose activation is reconstructed (the crosscoder reads both)",
    },
)


BASELINE = _doc(
    pa.schema(
        [pa.field("score", pa.string()), pa.field("threshold", pa.float64())]
        + [pa.field(k, pa.int64()) for k in ("n_alive_base_sae", "n_alive_finetuned_sae", "n_alive_twin", "n_lost", "n_born", "n_lost_twin", "n_born_twin")]
        + [pa.field(k, pa.float64()) for k in ("lost_rate", "born_rate", "lost_rate_twin", "born_rate_twin", "excess_lost", "excess_born")]
    ),
    {
        "score": "the matching score (MATCH_SCORES) the counts use",
        "threshold": "match threshold s (0.00 to 1.00 by 0.01)",
        "n_alive_base_sae": "base_sae features alive on the base model",
        "n_alive_finetuned_sae": "finetuned_sae features alive on the finetuned model (null without a finetuned SAE)",
        "n_alive_twin": "base_sae_twin features alive on the base model (null without a twin)",
        "n_lost": "alive base_sae features whose best match in finetuned_sae scores below s",
        "n_born": "alive finetuned_sae features whose best match in base_sae scores below s",
        "n_lost_twin": "alive base_sae features whose best match in the twin scores below s (null without a twin)",
        "n_born_twin": "alive twin features whose best match in base_sae scores below s",
        "lost_rate": "n_lost / n_alive_base_sae",
        "born_rate": "n_born / n_alive_finetuned_sae",
        "lost_rate_twin": "n_lost_twin / n_alive_base_sae: the rate between two SAEs of the same model",
        "born_rate_twin": "n_born_twin / n_alive_twin: the reference for born (the base twin's rate; no finetuned-SAE twin ships)",
        "excess_lost": "lost_rate - lost_rate_twin",
        "excess_born": "born_rate - born_rate_twin",
    },
)

SCORE_SEPARATION = _doc(
    pa.schema(
        [
            pa.field("score", pa.string()),
            pa.field("auc", pa.float64()),
            pa.field("group", pa.string()),
            pa.field("bin_left", pa.float64()),
            pa.field("bin_right", pa.float64()),
            pa.field("count", pa.int64()),
        ]
    ),
    {
        "score": "the matching score (MATCH_SCORES)",
        "auc": "P(an assigned base_sae-twin pair scores above a random pair), ties one half",
        "group": "assigned (the one-to-one assignment of base_sae and its twin on this score) | random (each alive base_sae feature with a random alive twin feature)",
        "bin_left": "left edge (scores clipped into [-1, 1])",
        "bin_right": "right edge",
        "count": "pairs in the bin",
    },
)

KL_CONTEXTS = _doc(
    pa.schema(
        [
            pa.field("rank", pa.int32()),
            pa.field("seq_id", pa.int32()),
            pa.field("position", pa.int16()),
            pa.field("source", pa.string()),
            pa.field("kl", pa.float32()),
            pa.field("loss_diff", pa.float32()),
            pa.field("window_start", pa.int16()),
            pa.field("token_ids", pa.list_(pa.int32())),
            pa.field("kl_window", pa.list_(pa.float32())),
            pa.field("feature_ids", pa.list_(pa.int32())),
            pa.field("act_deltas", pa.list_(pa.float32())),
            pa.field("acts_base", pa.list_(pa.float32())),
            pa.field("acts_finetuned", pa.list_(pa.float32())),
        ]
    ),
    {
        "rank": "0 = the highest KL of the sample (counted positions)",
        "seq_id": "sequence in tokens.parquet",
        "position": "position p: the models predict token p + 1 after reading tokens 0..p",
        "source": "the sequence's source",
        "kl": "KL(p_base || p_finetuned) at p (nats)",
        "loss_diff": "loss_finetuned - loss_base on the true next token (nats)",
        "window_start": "first position of the window",
        "token_ids": "the window's token ids (the window runs to p + 1, the predicted token)",
        "kl_window": "KL at each window position (NaN where undefined)",
        "feature_ids": "base_sae features with the largest |f_i(x_finetuned) - f_i(x_base)| at p, largest first",
        "act_deltas": "their f_i(x_finetuned) - f_i(x_base) at p",
        "acts_base": "their f_i(x_base) at p",
        "acts_finetuned": "their f_i(x_finetuned) at p",
    },
)

# file name -> schema; the manifest lists exactly these (the OPTIONAL ones only where they apply)
TABLES: dict[str, pa.Schema] = {
    "vocab.parquet": VOCAB,
    "tokens.parquet": TOKENS,
    "metrics.parquet": METRICS,
    "metrics_by_source.parquet": METRICS_BY_SOURCE,
    "resid_position.parquet": RESID_POSITION,
    "resid_histograms.parquet": RESID_HISTOGRAMS,
    "resid_summary.parquet": RESID_SUMMARY,
    "features.parquet": FEATURES,
    "features_by_source.parquet": FEATURES_BY_SOURCE,
    "examples.parquet": EXAMPLES,
    "matches.parquet": MATCHES,
    "baseline.parquet": BASELINE,
    "score_separation.parquet": SCORE_SEPARATION,
    "kl_contexts.parquet": KL_CONTEXTS,
    "crosscoder.parquet": CROSSCODER,
    "crosscoder_examples.parquet": CROSSCODER_EXAMPLES,
    "crosscoder_links.parquet": CROSSCODER_LINKS,
    "crosscoder_metrics.parquet": CROSSCODER_METRICS,
}
CROSSCODER_TABLES = {"crosscoder.parquet", "crosscoder_examples.parquet", "crosscoder_links.parquet", "crosscoder_metrics.parquet"}
# matches: two-SAE runs; baseline: runs with a finetuned SAE or a twin; score_separation: twin runs
OPTIONAL_TABLES = {"matches.parquet", "baseline.parquet", "score_separation.parquet"} | CROSSCODER_TABLES

# Row-group size of examples.parquet: small enough that one feature's rows are read by
# row-group pruning on (sae, feature_id).
EXAMPLES_ROW_GROUP_SIZE = 2048
# Row-group size of features.parquet (sorted by (sae, feature_id)): one feature's row is then
# read from one row group (measured on a synthetic 131k-feature run: 40 ms instead of 190 ms
# with a single row group), while the table scans of the Features page stay as fast. B4
# (benchmarks/b4_store_latency.py, 16k features, interleaved, same load): 1024 rows took the
# feature-page row lookup from p50 115 ms (8192) to 54 ms, the nearest-neighbour rows from 50 to
# 20 ms, and a filtered sorted page from 44 to 31 ms; 512 was no better.
FEATURES_ROW_GROUP_SIZE = 1024


# manifest.json keys (written by precompute/tables.py::finalize via rundir.write_manifest, last)
MANIFEST_DOCS = {
    "schema_version": "this module's SCHEMA_VERSION when the run was written",
    "run_id": "the run's id (its directory name)",
    "created_at": "UTC time the manifest was written (ISO 8601)",
    "complete": "true: every file listed under `files` is whole",
    "config": "the normalized precompute config (precompute/config.py RunConfig.to_dict, hook resolved)",
    "packages": "versions of python, torch, sae-lens, transformer-lens, transformers, numpy, scipy, pyarrow, safetensors",
    "tokenizer_check": "explorer.models.TokenizerComparison.to_dict() of the two tokenizers (METHODS.md section 0)",
    "models": "per model: architecture, model_name, n_layers, d_model, d_mlp, d_vocab, n_ctx (its TransformerLens config)",
    "inputs": "fingerprints (bytes, sha256 of the first and last 16 MiB) of the local corpus, model and SAE weight files; config_dir: the folder the config's relative paths resolve against (relative to the repository when inside it)",
    "loading": "how the pair was loaded (explorer/models.py load_pair): device, dtype, processing flags and where they come from, per model its loader (HookedTransformer / TransformerBridge), format and vocabulary size, per SAE its hook, dtype, normalization, context; vocabulary (the shared vocabulary the logit statistics use, tokens added at the end); warnings",
    "corpus": "what reading the corpus did (precompute/corpus.py CorpusStats): format, column, rows, rows skipped by reason, sequences available, rows without BOS, tokens left over per source, warnings",
    "n_tokens": "tokens in the sample (n_sequences x context_size)",
    "n_sequences": "sequences in the sample (rows of tokens.parquet)",
    "n_counted_tokens": "tokens that count for SAE and feature statistics (special tokens excluded)",
    "special_token_ids": "the token ids excluded from SAE and feature statistics",
    "saes": "SAE names present: [base_sae] or [base_sae, finetuned_sae]",
    "twin": "base_sae_twin when the run has the base SAE's seed twin (matched with base_sae only), else null",
    "sources": "source label -> counted tokens of that source (every label of the sample; `unlabelled` without a source column)",
    "d_sae": "dictionary size per SAE (the twin's too)",
    "act_hist_edges": "ACT_HIST_EDGES, the bins of features.act_hist_*",
    "calibration": "outlier thresholds (and the mean norms they come from) per model, and l2_max, fixed on the first sequences",
    "resid_l2_range": "[0, l2_max]: the range of the L2 histograms",
    "resid_clipped": "per resid histogram metric, the values outside its range (counted in the end bins)",
    "summary": "counts: alive/status/cross-class/change-class per SAE, detection floors, NaN similarities, non-finite explained variance, matching (score and why, AUC per score, born/lost of alive features at the threshold and against the twin), KL; crosscoder (its format, sizes, bands at the config's thresholds, dead latents, pooled explained variance per model)",
    "timing": "stream seconds, tokens streamed, tokens per second, finalize seconds (of the invocation that finished the run)",
    "files": "file name -> {rows, bytes, sha256}",
}


def describe() -> str:
    """The schema as Markdown (docs/SCHEMA.md is generated from this)."""
    out = [f"# Run schema, version {SCHEMA_VERSION}", "", (__doc__ or "").strip(), ""]
    out += [f"## {MANIFEST}", "", "| key | meaning |", "|---|---|"]
    out += [f"| `{k}` | {v} |" for k, v in MANIFEST_DOCS.items()]
    out.append("")
    for name, schema in TABLES.items():
        out += [f"## {name}", "", "| column | type | meaning |", "|---|---|---|"]
        for f in schema:
            out.append(f"| `{f.name}` | {f.type} | {f.metadata[b'doc'].decode()} |")
        out.append("")
    return "\n".join(out)
