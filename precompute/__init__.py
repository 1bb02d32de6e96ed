"""The offline precompute: the same tokens through the base and the finetuned model, every SAE on
both, into mergeable accumulators, then one run directory of Parquet tables and a manifest.

The stages, in the order data passes through them (entry points: `run.run`, `run.merge`, and
`distributed.run_on_ray` for the shards as Ray tasks; command line: `python -m precompute`):

1. `prepare`      load and check models, SAEs, hook, widths, tokenizers, corpus and the token
                  sample before anything is written (a bad config leaves nothing).
2. `forward`      each model's clean / spliced / zero-ablated losses and its hook activation;
   `sae_codec`    each SAE's sparse encode and decode.
3. `calibration`  outlier thresholds and histogram ranges from the first sequences.
4. `stream`       batch by batch into the accumulators of the pass state (`pass_state`, which
                  also owns checkpoints and shard states), keeping the hook activations for the
                  example windows (`hook_cache`).
5. `tables`       finalize: one builder per table (`feature_table` builds features.parquet,
                  `crosscoder_tables` the crosscoder's), the example windows (`examples`), then
                  the manifest (`manifest`), last.

Below the stages: `accumulators` (mergeable statistics; `crosscoder_stats`, a crosscoder's),
`weights` (weights-only statistics and matching), `examples`, `corpus`, `config`, and `explorer/` (loading, schema, run directory).
Beside them: `demo` builds the demo pair, `crosscoder_train` trains its crosscoder.
Nothing imports upward: entry points call stages, stages call those libraries.
"""
