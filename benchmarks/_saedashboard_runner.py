"""B1, SAEDashboard side: run sae-dashboard 0.8.0's Neuronpedia feature-data generation on our demo.

Runs INSIDE benchmarks/_work/saedash-venv (built by benchmarks/saedashboard_venv.sh), which has
old transformer-lens 2.x / transformers 4.x and no `explorer` package, so everything is loaded
by hand here:

  * the model: `<demo>/base/config.json` (`tl_config` = HookedTransformerConfig kwargs) +
    `model.safetensors` + the HF tokenizer dir `tokenizer/`, into a HookedSAETransformer;
  * the SAE: `<demo>/saes/base_sae/` with sae-lens's own `SAE.load_from_disk` (the venv resolves
    sae-lens 6.x, which reads the 6.54 JumpReLU format), checked on real tokens against a hand
    encode: relu((x - b_dec) @ W_enc + b_enc), zeroed where the pre-activation <= threshold;
  * the tokens: the first N rows of `<demo>/eval_corpus.parquet` (`token_ids`), read with pyarrow,
    the same rows our precompute uses.

The generation itself is SAEDashboard's standard all-features path, `NeuronpediaRunner.run()`
(the code behind Neuronpedia imports): features in batches of `n_features_at_a_time`, each batch
one `SaeVisRunner.run()` (forward passes cached on disk after the first batch, activations,
top-k / quantile sequences, histograms, logit tables, correlation tables), converted by
`NeuronpediaConverter` and written as `batch-<i>.json`. Only the parts of `NeuronpediaRunner`
that fetch from a hub (SAE/model `from_pretrained`, the streaming `ActivationsStore`, token
generation) are replaced; its `run()` is called unchanged, with its dataclass defaults.

The timed region starts after imports and loading and ends when the last JSON is written;
`process_seconds` is from interpreter start. `check_seconds` is the time spent in this script's
own checks (not SAEDashboard's work): the driver subtracts it from the subprocess's wall time.
The last stdout line is one JSON object (see `main`).

    benchmarks/_work/saedash-venv/bin/python benchmarks/_saedashboard_runner.py \
        --demo data/demo --n-sequences 391 --out benchmarks/_work/saedash-out
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

T_PROCESS = time.time()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402


def load_tokens(corpus: Path, n_sequences: int) -> torch.Tensor:
    """The first `n_sequences` rows of the corpus's token_ids column, [n_sequences, ctx]."""
    table = pq.read_table(corpus, columns=["token_ids"])
    if table.num_rows < n_sequences:
        raise SystemExit(f"{corpus} has {table.num_rows} sequences, fewer than the {n_sequences} asked for.")
    rows = table.column("token_ids").slice(0, n_sequences).to_pylist()
    lengths = {len(r) for r in rows}
    if len(lengths) != 1:
        raise SystemExit(f"{corpus}: sequences of different lengths {sorted(lengths)[:5]}; SAEDashboard needs one.")
    return torch.tensor(rows, dtype=torch.long)


def load_model(path: Path):
    """Our local checkpoint format, read with the venv's transformer-lens 2.x."""
    from safetensors.torch import load_file
    from sae_lens import HookedSAETransformer
    from transformer_lens import HookedTransformerConfig
    from transformers import AutoTokenizer

    meta = json.loads((path / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(str(path / "tokenizer"), local_files_only=True)
    cfg = HookedTransformerConfig(**meta["tl_config"], device="cpu")
    model = HookedSAETransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    state = load_file(str(path / "model.safetensors"))
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith(("IGNORE", ".mask"))]
    if missing or result.unexpected_keys:
        raise SystemExit(f"checkpoint {path}: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}")
    model.eval()
    return model


def hand_encode(x: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
    """JumpReLU encode from the raw safetensors: pre = (x - b_dec) @ W_enc + b_enc; pre where pre > threshold."""
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    return torch.where(pre > w["threshold"], torch.relu(pre), torch.zeros_like(pre))


def hook_acts(model, tokens: torch.Tensor, hook: str) -> torch.Tensor:
    layer = int(hook.split(".")[1])
    _, cache = model.run_with_cache(tokens, names_filter=hook, stop_at_layer=layer + 1)
    return cache[hook]


def check_sae(model, sae, sae_dir: Path, tokens: torch.Tensor, hook: str, check_out: Path | None) -> dict:
    """sae.encode == the hand encode from the safetensors, on real tokens (before any folding).

    With `check_out`, also writes the tokens, hook activations and feature activations there
    (safetensors) so that the driver can compare them with the main environment's loaders.
    """
    from safetensors.torch import load_file

    raw = load_file(str(sae_dir / "sae_weights.safetensors"))
    missing = {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"} - set(raw)
    if missing:
        raise SystemExit(f"{sae_dir}: sae_weights.safetensors lacks {sorted(missing)}")
    with torch.no_grad():
        x = hook_acts(model, tokens, hook)
        ours = hand_encode(x, raw)
        theirs = sae.encode(x)
    max_abs = float((ours - theirs).abs().max())
    same_support = bool(((ours > 0) == (theirs > 0)).all())
    if max_abs > 1e-4 or not same_support:
        raise SystemExit(f"SAE check failed: sae.encode differs from the hand JumpReLU encode (max |diff| {max_abs:.3g}, same support {same_support}).")
    if check_out is not None:
        from safetensors.torch import save_file

        check_out.parent.mkdir(parents=True, exist_ok=True)
        save_file({"tokens": tokens.contiguous(), "hook_acts": x.contiguous(), "feature_acts": theirs.contiguous()}, str(check_out))
    return {"tokens_checked": int(tokens.numel()), "max_abs_diff": max_abs, "l0": float((ours > 0).sum(-1).float().mean())}


def check_outputs(model, raw_sae: dict, tokens: torch.Tensor, hook: str, feature_json: dict[int, dict], bos: int) -> dict:
    """SAEDashboard's per-feature density and top activation against a hand encode of all tokens.

    SAEDashboard folds the decoder norm into the encoder, so its activations are ours times
    ||W_dec[i]||; it masks BOS tokens but keeps them in the density's denominator.
    """
    dec_norm = raw_sae["W_dec"].norm(dim=-1)
    feats = sorted(feature_json)
    count = torch.zeros(len(feats), dtype=torch.float64)
    top = torch.zeros(len(feats))
    with torch.no_grad():
        for chunk in tokens.split(32):
            acts = hand_encode(hook_acts(model, chunk, hook), raw_sae)[..., feats] * dec_norm[feats]
            acts = acts.masked_fill((chunk == bos).unsqueeze(-1), 0)
            count += (acts > 0).sum((0, 1)).double()
            top = torch.maximum(top, acts.amax((0, 1)))
    density = (count / tokens.numel()).numpy()
    theirs_density = np.array([feature_json[f]["frac_nonzero"] for f in feats])
    theirs_top = np.array([max((max(a["values"]) for a in feature_json[f]["activations"]), default=0.0) for f in feats])
    top = top.numpy()
    # frac_nonzero is parsed from a title printed with 3 decimals in percent; values are rounded to 3 decimals.
    density_ok = np.abs(density - theirs_density) <= 5e-6 + 1e-3 * density
    top_ok = np.abs(top - theirs_top) <= 2e-3 + 1e-3 * np.abs(top)
    return {
        "features_checked": len(feats),
        "density_mismatches": int((~density_ok).sum()),
        "top_activation_mismatches": int((~top_ok).sum()),
        "n_alive": int((count > 0).sum()),
    }


def dir_bytes(path: Path, exclude: Path | None = None) -> int:
    total = 0
    for p in path.rglob("*"):
        if p.is_file() and (exclude is None or exclude not in p.parents):
            total += p.stat().st_size
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", type=Path, required=True, help="demo directory (base/, saes/base_sae/, eval_corpus.parquet)")
    parser.add_argument("--model", default="base", help="model subdirectory of --demo (default base)")
    parser.add_argument("--sae", default="base_sae", help="SAE subdirectory of --demo/saes (default base_sae)")
    parser.add_argument("--corpus", type=Path, default=None, help="token corpus parquet (token_ids); default <demo>/eval_corpus.parquet")
    parser.add_argument("--n-sequences", type=int, required=True, help="use the first N sequences of the corpus")
    parser.add_argument("--out", type=Path, required=True, help="output directory (emptied first)")
    parser.add_argument("--n-features", type=int, default=None, help="only the first N features (smoke runs); default all")
    parser.add_argument("--n-batches", type=int, default=None, help="only the first K feature batches of the default size (a timed sample of a large SAE); default all")
    parser.add_argument("--n-features-at-a-time", type=int, default=None, help="features per SaeVisRunner batch (default: NeuronpediaRunnerConfig's)")
    parser.add_argument("--n-prompts-in-forward-pass", type=int, default=None, help="sequences per forward pass (default: NeuronpediaRunnerConfig's)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--check-out", type=Path, default=None, help="write the loaded model's and SAE's activations on 2 sequences here (safetensors)")
    parser.add_argument("--no-check", action="store_true", help="skip the post-run check of densities and top activations")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)

    import importlib.metadata as md

    from sae_lens import SAE
    from sae_dashboard.neuronpedia.neuronpedia_runner import NeuronpediaRunner
    from sae_dashboard.neuronpedia.neuronpedia_runner_config import NeuronpediaRunnerConfig

    class LocalNeuronpediaRunner(NeuronpediaRunner):
        """NeuronpediaRunner with the hub loading replaced by objects loaded here; `run()` is theirs."""

        def __init__(self, cfg, sae, model, tokens, cache_dir: Path):
            self.cfg = cfg
            self.device_count = self._setup_devices()
            self.sae = sae
            self._configure_dtypes()  # theirs: dtype, device, and fold_W_dec_norm()
            self._extract_model_info()
            self.model = model
            self.hook_name = sae.cfg.metadata.hook_name
            self.activations_store = None
            self.cached_activations_dir = cache_dir
            self._setup_output_directory()
            self.vocab_dict = self.get_vocab_dict()
            self._tokens = tokens

        def get_tokens(self):
            return self._tokens

    demo = args.demo.resolve()
    sae_dir = demo / "saes" / args.sae
    t_load = time.time()
    corpus = (args.corpus or demo / "eval_corpus.parquet").resolve()
    tokens = load_tokens(corpus, args.n_sequences)
    model = load_model(demo / args.model)
    sae = SAE.load_from_disk(str(sae_dir), device="cpu")
    sae.eval()
    hook = sae.cfg.metadata.hook_name
    t_check, c_check = time.time(), time.process_time()
    sae_check = check_sae(model, sae, sae_dir, tokens[:2], hook, args.check_out)
    check_seconds = time.time() - t_check
    check_cpu_seconds = time.process_time() - c_check
    load_seconds = time.time() - t_load - check_seconds

    if args.out.exists():
        shutil.rmtree(args.out)
    outputs_dir = args.out / "outputs"
    cache_dir = args.out / "cached_activations"  # fresh each run: no reuse across repetitions
    outputs_dir.mkdir(parents=True)

    defaults = NeuronpediaRunnerConfig(sae_set="x", sae_path="x", outputs_dir="x")
    per_batch = args.n_features_at_a_time or defaults.n_features_at_a_time
    d_sae = int(sae.cfg.d_sae)
    n_features = d_sae if args.n_features is None else min(args.n_features, d_sae)
    n_batches_total = -(-d_sae // per_batch)
    if args.n_batches is not None and args.n_batches < n_batches_total:
        n_features = min(d_sae, args.n_batches * per_batch)  # the first K batches, at the default batch size
    elif n_features < d_sae:
        # NeuronpediaRunner always covers all d_sae features; a smoke run stops after the batch
        # holding feature n_features - 1 by setting end_batch, with batches of n_features.
        per_batch = n_features
    cfg = NeuronpediaRunnerConfig(
        sae_set=f"demo-{args.sae}",
        sae_path=str(sae_dir),
        outputs_dir=str(outputs_dir),
        from_local_sae=True,
        huggingface_dataset_path=str(corpus),
        n_prompts_total=int(tokens.shape[0]),
        n_tokens_in_prompt=int(tokens.shape[1]),
        n_prompts_in_forward_pass=args.n_prompts_in_forward_pass or defaults.n_prompts_in_forward_pass,
        n_features_at_a_time=per_batch,
        end_batch=None if n_features == d_sae else (args.n_batches - 1 if args.n_batches else 0),
        sae_device="cpu",
        model_device="cpu",
        activation_store_device="cpu",
        shuffle_tokens=False,
        use_wandb=False,
    )

    t0 = time.time()
    runner = LocalNeuronpediaRunner(cfg, sae, model, tokens, cache_dir)
    runner.run()
    wall = time.time() - t0
    out_dir = Path(runner.cfg.outputs_dir)
    batch_files = sorted(out_dir.glob("batch-*.json"))
    output_bytes = dir_bytes(args.out, exclude=cache_dir)
    # each batch's JSON is written when the batch is done: its mtime dates the batch
    ends = sorted(f.stat().st_mtime - t0 for f in batch_files)
    n_batches_run = len(ends)
    full_estimate = None
    if n_batches_run >= 2 and n_features < d_sae:
        per_batch_s = float(np.median(np.diff(ends)))
        full_estimate = ends[0] + (n_batches_total - 1) * per_batch_s + (wall - ends[-1])
    cache_bytes = dir_bytes(cache_dir) if cache_dir.exists() else 0

    t_check, c_check = time.time(), time.process_time()
    feature_json: dict[int, dict] = {}
    for f in batch_files:
        for feat in json.loads(f.read_text())["features"]:
            feature_json[int(feat["feature_index"])] = feat
    if sorted(feature_json) != list(range(n_features)):
        raise SystemExit(f"SAEDashboard wrote {len(feature_json)} features, expected {n_features}.")
    check = None
    if not args.no_check:
        from safetensors.torch import load_file

        check = check_outputs(model, load_file(str(sae_dir / "sae_weights.safetensors")), tokens, hook, feature_json, model.tokenizer.bos_token_id)

    check_seconds += time.time() - t_check
    check_cpu_seconds += time.process_time() - c_check
    n_tokens = int(tokens.numel())
    result = {
        "tool": "sae-dashboard",
        "path": "NeuronpediaRunner.run (JSON batches)",
        "n_tokens": n_tokens,
        "n_sequences": int(tokens.shape[0]),
        "n_features": n_features,
        "wall_seconds": wall,
        "load_seconds": load_seconds,
        "check_seconds": check_seconds,
        "check_cpu_seconds": check_cpu_seconds,
        "process_seconds": time.time() - T_PROCESS,
        "output_bytes": output_bytes,
        "output_files": len(batch_files),
        "output_bytes_per_feature": output_bytes / n_features,
        "activation_cache_bytes": cache_bytes,
        "seconds_per_feature_token": wall / (n_features * n_tokens),
        "batch_end_seconds": ends,
        "n_batches_run": n_batches_run,
        "n_batches_total": n_batches_total,
        "d_sae": d_sae,
        "full_run_seconds_estimate": full_estimate,
        "n_features_at_a_time": cfg.n_features_at_a_time,
        "n_prompts_in_forward_pass": cfg.n_prompts_in_forward_pass,
        "torch_threads": torch.get_num_threads(),
        "sae_check": sae_check,
        "output_check": check,
        "versions": {p: md.version(p) for p in ("sae-dashboard", "sae-lens", "transformer-lens", "transformers", "torch", "numpy", "pyarrow")},
    }
    print(json.dumps(result), flush=True)
    if check and (check["density_mismatches"] or check["top_activation_mismatches"]):
        print(f"SAEDashboard output disagrees with the hand encode: {check}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
