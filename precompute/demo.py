"""Build the shipped demo: a base model on English prose, its Python finetune, an SAE on each.

    python -m precompute.demo                 # full build into data/demo (about 20 min, 2 CPU cores)
    python -m precompute.demo --tiny --out /tmp/demo   # a few steps on a tiny corpus (tests)

It mirrors the published gemma-2b -> gemma-2b-python-codes experiment at toy scale:
  1. corpora from Debian packages (English prose) and the Python standard library (code),
     split by document into train and held-out evaluation parts;
  2. a byte-level BPE tokenizer (4096 tokens) on both;
  3. a 2-layer TransformerLens model trained on English (the base);
  4. the base trained further on Python (the finetune);
  5. one SAELens BatchTopK SAE (saved as JumpReLU) per model at blocks.1.hook_resid_pre;
  6. the evaluation corpus (English and Python sequences, each labelled) and REPORT.md/json.

Everything is seeded. Apt packages for the English prose: see APT_PACKAGES.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import os
import re
import shutil
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path

APT_PACKAGES = ["fortunes", "fortunes-min", "dict-gcide", "wordnet-base", "git-doc", "python3.11-doc", "info"]
BOS = "<|endoftext|>"
HOOK = "blocks.1.hook_resid_pre"


@dataclass(frozen=True)
class DemoConfig:
    seed: int = 0
    vocab_size: int = 4096
    n_layers: int = 2
    d_model: int = 128
    n_heads: int = 4
    d_mlp: int = 512
    context_size: int = 128
    batch_size: int = 32
    base_tokens: int = 6_000_000
    finetune_tokens: int = 2_500_000
    base_lr: float = 2e-3
    finetune_lr: float = 5e-4
    d_sae: int = 2048
    sae_k: int = 24
    sae_tokens: int = 2_000_000
    sae_lr: float = 3e-3
    sae_batch_tokens: int = 1024  # tokens per SAE training step: more, smaller steps revive latents faster per token
    # SAELens's TopK auxiliary loss (aux-k) trains latents that have not fired for this many steps
    # (of sae_batch_tokens tokens) to reconstruct the residual error: the dead-latent fix of Gao et al. 2024
    sae_dead_feature_window: int = 200
    sae_aux_loss_coefficient: float = 1.0
    # b_dec starts at the mean activation (special tokens left out) instead of 0: with Adam's
    # steps of about lr, b_dec would otherwise stay far from a mean that is a large part of
    # every activation, and the latents spent on that mean left most of the others dead
    sae_b_dec_init_mean: bool = True
    twin_seed_offset: int = 1  # the seed twin of the base SAE: same model, data and hyperparameters, seed + this
    # the finetuned SAE's seed differs from the base SAE's too: with one seed the two dictionaries
    # start from the same initialization and look more alike than independent SAEs (the twin's seed differs)
    finetuned_sae_seed_offset: int = 2
    eval_sequences_per_source: int = 1950  # x 128 tokens x 2 sources ~ 0.5M tokens
    tokenizer_chars: int = 30_000_000
    eval_share: float = 0.08  # share of documents held out for evaluation
    corpus_chars: int | None = None  # cap on characters read per source (None: all)

    @classmethod
    def tiny(cls) -> "DemoConfig":
        return cls(
            vocab_size=512, n_layers=2, d_model=32, n_heads=2, d_mlp=64, context_size=32,
            batch_size=8, base_tokens=8 * 32 * 6, finetune_tokens=8 * 32 * 4, d_sae=64, sae_k=4,
            sae_tokens=8 * 32 * 16, sae_batch_tokens=256, sae_lr=4e-4, sae_dead_feature_window=500,
            eval_sequences_per_source=6, tokenizer_chars=200_000, corpus_chars=400_000, eval_share=0.3,
        )


# ------------------------------------------------------------------------------------------
# Corpora


def _read(path: Path) -> str:
    raw = path.read_bytes()
    if path.suffix == ".gz" or path.suffix == ".dz":
        raw = gzip.decompress(raw)
    return raw.decode("utf-8", errors="replace")


def english_documents(max_chars: int | None = None) -> list[tuple[str, str]]:
    """(name, text) pairs of English prose from Debian packages, in a fixed order."""
    docs: list[tuple[str, str]] = []
    fort = Path("/usr/share/games/fortunes")
    if fort.is_dir():
        for p in sorted(fort.glob("*")):
            if p.suffix in (".dat", ".u8") or p.is_dir() or "off" in p.parts:
                continue
            for i, chunk in enumerate(_read(p).split("\n%\n")):
                if chunk.strip():
                    docs.append((f"fortune:{p.name}:{i}", chunk.strip()))
    gcide = Path("/usr/share/dictd/gcide.dict.dz")
    if gcide.exists():
        text = _read(gcide)
        entries = re.split(r"\n(?=[A-Z][^\n]{0,40}\n  )", text)
        for i, e in enumerate(entries):
            e = re.sub(r"[ \t]+", " ", e).strip()
            if len(e) > 40:
                docs.append((f"gcide:{i}", e))
    wn = Path("/usr/share/wordnet")
    if wn.is_dir():
        for part in ("noun", "verb", "adj", "adv"):
            p = wn / f"data.{part}"
            if not p.exists():
                continue
            glosses = [line.split(" | ", 1)[1].strip() for line in _read(p).splitlines() if " | " in line and not line.startswith("  ")]
            for i in range(0, len(glosses), 20):
                docs.append((f"wordnet:{part}:{i}", "\n".join(glosses[i : i + 20])))
    for root in (Path("/usr/share/doc/python3.11/html/_sources"), Path("/usr/share/doc/git")):
        if root.is_dir():
            for p in sorted(root.rglob("*.txt")):
                docs.append((f"doc:{p}", _read(p)))
    info = Path("/usr/share/info")
    if info.is_dir():
        for p in sorted(info.glob("*.info*.gz")):
            docs.append((f"info:{p.name}", _read(p)))
    return _cap(docs, max_chars)


def python_documents(max_chars: int | None = None) -> list[tuple[str, str]]:
    """(name, source) pairs from the Python standard library, in a fixed order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for p in sorted(stdlib.rglob("*.py")):
        rel = p.relative_to(stdlib)
        if rel.parts and rel.parts[0] in ("site-packages", "dist-packages"):
            continue
        try:
            docs.append((f"py:{rel}", p.read_text(encoding="utf-8")))
        except (UnicodeDecodeError, OSError):
            continue
    return _cap(docs, max_chars)


def _cap(docs: list[tuple[str, str]], max_chars: int | None) -> list[tuple[str, str]]:
    if max_chars is None:
        return docs
    # Spread the cap over the whole ordered list so every source contributes.
    total = sum(len(t) for _, t in docs)
    if total <= max_chars:
        return docs
    keep_every = total / max_chars
    out, acc = [], 0.0
    for i, d in enumerate(docs):
        acc += 1
        if acc >= keep_every:
            acc -= keep_every
            out.append(d)
    return out


def is_held_out(name: str, share: float, seed: int) -> bool:
    h = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < share


def split_documents(docs, share, seed):
    train = [d for d in docs if not is_held_out(d[0], share, seed)]
    held = [d for d in docs if is_held_out(d[0], share, seed)]
    if not held and len(train) > 1:  # tiny corpora: still hold one document out
        held = [train.pop()]
    return train, held


# ------------------------------------------------------------------------------------------
# Tokenizer and packing


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from explorer.models import save_local_tokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=BOS, pad_token=BOS, unk_token=None)
    save_local_tokenizer(fast, out_dir)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(out_dir), local_files_only=True)


def pack(tokenizer, docs: list[tuple[str, str]], context: int, n_sequences: int | None = None) -> list[list[int]]:
    """Concatenate documents (BOS-separated) and cut into sequences that each start with BOS."""
    bos = tokenizer.bos_token_id
    body = context - 1
    seqs: list[list[int]] = []
    buf: list[int] = []
    for _, text in docs:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        buf.extend(ids + [bos])
        while len(buf) >= body:
            seqs.append([bos] + buf[:body])
            buf = buf[body:]
            if n_sequences is not None and len(seqs) >= n_sequences:
                return seqs
    return seqs


# ------------------------------------------------------------------------------------------
# Training


def tl_config(cfg: DemoConfig) -> dict:
    return dict(
        n_layers=cfg.n_layers, d_model=cfg.d_model, n_ctx=cfg.context_size, d_head=cfg.d_model // cfg.n_heads,
        n_heads=cfg.n_heads, d_mlp=cfg.d_mlp, d_vocab=cfg.vocab_size, act_fn="gelu", normalization_type="LN",
        positional_embedding_type="standard", seed=cfg.seed, model_name="demo",
    )


def train_lm(model, sequences, n_tokens: int, lr: float, batch_size: int, seed: int, label: str, warmup: int = 50):
    import torch
    from tqdm import tqdm

    g = torch.Generator().manual_seed(seed)
    data = torch.tensor(sequences, dtype=torch.long)
    steps = max(1, n_tokens // (batch_size * data.shape[1]))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    model.train()
    order = torch.randperm(len(data), generator=g)
    pos = 0
    bar = tqdm(range(steps), desc=f"train {label}", unit="step", mininterval=5)
    for step in bar:
        if pos + batch_size > len(order):
            order, pos = torch.randperm(len(data), generator=g), 0
        batch = data[order[pos : pos + batch_size]]
        pos += batch_size
        loss = model(batch, return_type="loss")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return model


def heldout_loss(model, sequences, batch_size: int = 64) -> float:
    import torch

    data = torch.tensor(sequences, dtype=torch.long)
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(data), batch_size):
            b = data[i : i + batch_size]
            loss = model(b, return_type="loss", loss_per_token=True)
            total += loss.sum().item()
            n += loss.numel()
    return total / n


def train_sae(model, sequences, cfg: DemoConfig, out_dir: Path, label: str, seed: int | None = None):
    """One SAELens BatchTopK SAE on `model`'s activations at HOOK, saved (as JumpReLU) to out_dir.

    Dead latents: SAELens's TopK auxiliary loss (`aux_loss_coefficient`) makes the latents that
    have not fired for `dead_feature_window` training steps reconstruct the residual error;
    the window is in steps of `train_batch_size_tokens` tokens."""
    import datasets
    import torch
    from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, LoggingConfig
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAEConfig

    seed = cfg.seed if seed is None else seed
    train_batch = cfg.sae_batch_tokens
    store_batch = 16 if cfg.d_model >= 64 else 4
    n_buf = max(2, math.ceil(train_batch * 2 / (store_batch * cfg.context_size)))
    # sae_lens needs n_batches_in_buffer * context_size >= train_batch_size_tokens
    n_buf = max(n_buf, math.ceil(train_batch / cfg.context_size))
    runner_cfg = LanguageModelSAERunnerConfig(
        sae=BatchTopKTrainingSAEConfig(
            d_in=cfg.d_model, d_sae=cfg.d_sae, k=cfg.sae_k, normalize_activations="none", dtype="float32", device="cpu",
            aux_loss_coefficient=cfg.sae_aux_loss_coefficient,
        ),
        model_name="demo", hook_name=HOOK, dataset_path="local", is_dataset_tokenized=True, streaming=False,
        context_size=cfg.context_size, n_batches_in_buffer=n_buf, store_batch_size_prompts=store_batch,
        training_tokens=cfg.sae_tokens, train_batch_size_tokens=train_batch, lr=cfg.sae_lr, lr_warm_up_steps=20,
        device="cpu", seed=seed, prepend_bos=True, n_checkpoints=0, checkpoint_path=None, output_path=None,
        verbose=False, n_eval_batches=1, eval_batch_size_prompts=4, n_batches_for_norm_estimate=5,
        dead_feature_window=cfg.sae_dead_feature_window, feature_sampling_window=max(500, cfg.sae_dead_feature_window),
        logger=LoggingConfig(log_to_wandb=False),
    )
    dataset = datasets.Dataset.from_dict({"input_ids": sequences})
    print(f"[demo] training {label} SAE: d_sae={cfg.d_sae} k={cfg.sae_k} seed={seed} on {cfg.sae_tokens:,} tokens", flush=True)
    torch_seed(seed)
    runner = LanguageModelSAETrainingRunner(runner_cfg, override_dataset=dataset, override_model=model)
    if cfg.sae_b_dec_init_mean:
        with torch.no_grad():
            runner.sae.b_dec.data.copy_(mean_activation(model, sequences[:256]))
    sae = runner.run()
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    sae.save_inference_model(str(tmp))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    from sae_lens import SAE

    return SAE.load_from_disk(str(out_dir))


def torch_seed(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


def mean_activation(model, sequences: list, batch: int = 32):
    """The mean activation at HOOK over the sequences' tokens, special tokens (BOS) left out."""
    import numpy as np
    import torch
    from sae_lens.util import get_special_token_ids

    special = np.asarray(sorted(get_special_token_ids(model.tokenizer)), np.int64)
    total, n = None, 0
    with torch.inference_mode():
        for i in range(0, len(sequences), batch):
            tok = np.asarray(sequences[i : i + batch], np.int64)
            _, cache = model.run_with_cache(torch.from_numpy(tok), names_filter=[HOOK], stop_at_layer=int(HOOK.split(".")[1]) + 1)
            x = cache[HOOK][torch.from_numpy(~np.isin(tok, special))].double()
            total = x.sum(0) if total is None else total + x.sum(0)
            n += x.shape[0]
    return (total / max(n, 1)).float()


SAE_NAMES = ("base_sae", "finetuned_sae", "base_sae_twin")


def sae_training_sets(cfg: DemoConfig, en_seqs: list, py_seqs: list) -> dict[str, list]:
    """Each SAE's training sequences: the base SAE (and its seed twin, on the same sequences) on
    the base model's English; the finetuned SAE on the finetune, half English, half Python."""
    import numpy as np

    sae_rng = np.random.default_rng(cfg.seed + 2)
    n_sae = cfg.sae_tokens // cfg.context_size + 1
    base_sae_seqs = [en_seqs[i] for i in sae_rng.permutation(len(en_seqs))[:n_sae]]
    mix = [en_seqs[i] for i in sae_rng.permutation(len(en_seqs))[: n_sae // 2]] + [py_seqs[i] for i in sae_rng.permutation(len(py_seqs))[: n_sae - n_sae // 2]]
    mix = [mix[i] for i in sae_rng.permutation(len(mix))]
    return {"base_sae": base_sae_seqs, "finetuned_sae": mix, "base_sae_twin": base_sae_seqs}


def train_saes(sae_dir: Path, cfg: DemoConfig, models: dict, seqs: dict[str, list], stages: dict, done) -> dict:
    """base_sae and its seed twin on the base model, finetuned_sae on the finetune; a finished
    SAE (recorded in `stages`) is loaded, not retrained."""
    from sae_lens import SAE

    saes = {}
    for name in SAE_NAMES:
        model = models["finetuned" if name == "finetuned_sae" else "base"]
        seed = cfg.seed + {"base_sae": 0, "finetuned_sae": cfg.finetuned_sae_seed_offset, "base_sae_twin": cfg.twin_seed_offset}[name]
        if name in stages and (sae_dir / name).is_dir():
            saes[name] = SAE.load_from_disk(str(sae_dir / name))
        else:
            saes[name] = train_sae(model, seqs[name], cfg, sae_dir / name, name, seed=seed)
            done(name)
    return saes


# ------------------------------------------------------------------------------------------
# Report


def sae_evals(sae, model, sequences, cfg: DemoConfig) -> dict:
    """sae_lens run_evals on the given sequences (all of them, one pass), under sae_lens's own
    metric names: `explained_variance` (its current, pooled definition) and
    `explained_variance_legacy` (its old per-token formula, batches of 16 sequences)."""
    import datasets
    from sae_lens.evals import EvalConfig, run_evals
    from sae_lens.training.activation_scaler import ActivationScaler
    from sae_lens.training.activations_store import ActivationsStore

    batch = 16
    n_batches = max(1, len(sequences) // batch)
    store = ActivationsStore.from_sae(
        model, sae, dataset=datasets.Dataset.from_dict({"input_ids": sequences}), streaming=False,
        context_size=cfg.context_size, store_batch_size_prompts=batch, n_batches_in_buffer=2,
        train_batch_size_tokens=batch * cfg.context_size, device="cpu",
    )
    eval_cfg = EvalConfig(
        batch_size_prompts=batch, n_eval_reconstruction_batches=n_batches, n_eval_sparsity_variance_batches=n_batches,
        compute_ce_loss=True, compute_sparsity_metrics=True, compute_variance_metrics=True,
        compute_featurewise_density_statistics=True,
    )
    metrics, feature_metrics = run_evals(sae, store, model, ActivationScaler(), eval_config=eval_cfg, exclude_special_tokens=True)
    density = feature_metrics.get("feature_density") or []
    return {
        "l0": metrics["sparsity"]["l0"],
        "explained_variance": metrics["reconstruction_quality"]["explained_variance"],
        "explained_variance_legacy": metrics["reconstruction_quality"]["explained_variance_legacy"],
        "mse": metrics["reconstruction_quality"]["mse"],
        "ce_loss_clean": metrics["model_performance_preservation"]["ce_loss_without_sae"],
        "ce_loss_spliced": metrics["model_performance_preservation"]["ce_loss_with_sae"],
        "ce_loss_zero_ablated": metrics["model_performance_preservation"]["ce_loss_with_ablation"],
        "ce_loss_recovered": metrics["model_performance_preservation"]["ce_loss_score"],
        "dead_share": sum(1 for d in density if d == 0) / len(density) if density else float("nan"),
        "n_tokens": n_batches * batch * cfg.context_size,
    }


def dead_latents(sae, model, sequences, batch: int = 32) -> dict:
    """Latents that never fire on `sequences` (special tokens excluded), as the run counts them."""
    import numpy as np
    import torch
    from sae_lens.util import get_special_token_ids

    special = np.asarray(sorted(get_special_token_ids(model.tokenizer)), np.int64)
    fired = torch.zeros(int(sae.cfg.d_sae), dtype=torch.bool)
    with torch.inference_mode():
        for i in range(0, len(sequences), batch):
            tok = np.asarray(sequences[i : i + batch], np.int64)
            _, cache = model.run_with_cache(torch.from_numpy(tok), names_filter=[HOOK], stop_at_layer=int(HOOK.split(".")[1]) + 1)
            acts = sae.encode(cache[HOOK])[torch.from_numpy(~np.isin(tok, special))]
            fired |= (acts > 0).any(0)
    n_dead = int((~fired).sum())
    return {"n_dead": n_dead, "dead_share": n_dead / int(sae.cfg.d_sae)}


def write_report(out: Path, report: dict) -> None:
    (out / "REPORT.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    lines = [
        "# Demo pair: proof that it learned",
        "",
        f"Built by `python -m precompute.demo` ({report['build_seconds']:.0f} s on {report['machine']}).",
    ]
    if report.get("saes_retrained"):
        r = report["saes_retrained"]
        lines.append(f"SAEs retrained by `python -m precompute.demo --stage saes` ({r['seconds']:.0f} s on {r['machine']}); the language models are unchanged.")
    lines += [
        f"Config: `{json.dumps(report['config'])}`",
        "",
        f"Tokens: base trained on {report['tokens']['base_train']:,} English tokens, finetuned on "
        f"{report['tokens']['finetune_train']:,} Python tokens; evaluation corpus {report['tokens']['eval']:,} tokens "
        "from held-out documents.",
        "",
        "## Held-out next-token loss (nats/token)",
        "",
        f"Initial loss of an untrained model: ln(vocab) = {report['ln_vocab']:.3f}.",
        "",
        "| model | English | Python |",
        "|---|---|---|",
    ]
    for m in ("base", "finetuned"):
        lines.append(f"| {m} | {report['heldout_loss'][m]['english']:.3f} | {report['heldout_loss'][m]['python']:.3f} |")
    if report.get("dead_latents"):
        lines += [
            "",
            "## Dead latents on the whole evaluation corpus",
            "",
            "Latents that never fire on the evaluation corpus (both sources, special tokens excluded), on the model each SAE was trained on.",
            "`base_sae_twin` is the base SAE's seed twin: the same model, data and hyperparameters, another seed (the null baseline for born and lost features).",
            "",
            "| SAE | model | dead latents | share |",
            "|---|---|---|---|",
        ]
        for row in report["dead_latents"]:
            lines.append(f"| {row['sae']} | {row['model']} | {row['n_dead']:,} | {100 * row['dead_share']:.1f}% |")
    lines += [
        "",
        "## SAEs at " + report["hook"] + " (sae_lens `run_evals` on the evaluation corpus)",
        "",
        "Names as sae_lens 6.54 gives them: `explained_variance` is its current definition (one pooled ratio over all",
        "tokens, `ExplainedVarianceCalculator`), `explained_variance_legacy` its old per-token formula (depends on the",
        "batch: 16 sequences here). Special tokens (BOS) are left out of every number; the zero-ablated CE zeros every",
        "position, BOS included (sae_lens's convention).",
        "",
        "| SAE | model | source | L0 | explained_variance | explained_variance_legacy | CE clean | CE spliced | CE zero-abl | CE recovered |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["sae_evals"]:
        legacy = row.get("explained_variance_legacy")
        lines.append(
            f"| {row['sae']} | {row['model']} | {row['source']} | {row['l0']:.1f} | {row['explained_variance']:.3f} | "
            f"{'n/a' if legacy is None else format(legacy, '.3f')} | "
            f"{row['ce_loss_clean']:.3f} | {row['ce_loss_spliced']:.3f} | {row['ce_loss_zero_ablated']:.3f} | {row['ce_loss_recovered']:.3f} |"
        )
    (out / "REPORT.md").write_text("\n".join(lines) + "\n")


# ------------------------------------------------------------------------------------------


@dataclass
class Corpora:
    tokenizer: object
    en_seqs: list  # training sequences, English (the base model's data)
    py_seqs: list  # training sequences, Python (the finetune's data)
    en_eval_seqs: list  # held-out documents, packed
    py_eval_seqs: list


def corpora(cfg: DemoConfig, tokenizer_dir: Path, train_tokenizer_if_missing: bool) -> Corpora:
    """The documents, split by document into train and held-out, shuffled and packed: the same
    sequences every time for a config (the SAE stage rebuilds the LM stage's data with this)."""
    import numpy as np

    english = english_documents(cfg.corpus_chars)
    python = python_documents(cfg.corpus_chars)
    if not english:
        raise SystemExit(f"No English prose found. Install: apt-get install {' '.join(APT_PACKAGES)}")
    print(f"[demo] {len(english)} English documents, {len(python)} Python files", flush=True)
    en_train, en_eval = split_documents(english, cfg.eval_share, cfg.seed)
    py_train, py_eval = split_documents(python, cfg.eval_share, cfg.seed)
    if (tokenizer_dir / "tokenizer.json").exists() or not train_tokenizer_if_missing:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    else:
        half = cfg.tokenizer_chars // 2
        tok_texts = [t for _, t in _cap(en_train, half)] + [t for _, t in _cap(py_train, half)]
        tokenizer = train_tokenizer(tok_texts, cfg.vocab_size, tokenizer_dir)
    print(f"[demo] tokenizer: {len(tokenizer)} tokens", flush=True)
    ctx = cfg.context_size
    rng = np.random.default_rng(cfg.seed)
    en_train = [en_train[i] for i in rng.permutation(len(en_train))]
    py_train = [py_train[i] for i in rng.permutation(len(py_train))]
    en_seqs = pack(tokenizer, en_train, ctx, cfg.base_tokens // ctx + 1)
    py_seqs = pack(tokenizer, py_train, ctx, cfg.finetune_tokens // ctx + 1)
    en_eval_seqs = pack(tokenizer, [en_eval[i] for i in rng.permutation(len(en_eval))], ctx, cfg.eval_sequences_per_source)
    py_eval_seqs = pack(tokenizer, [py_eval[i] for i in rng.permutation(len(py_eval))], ctx, cfg.eval_sequences_per_source)
    print(f"[demo] sequences: {len(en_seqs)} English, {len(py_seqs)} Python train; {len(en_eval_seqs)} + {len(py_eval_seqs)} eval", flush=True)
    return Corpora(tokenizer, en_seqs, py_seqs, en_eval_seqs, py_eval_seqs)


def _stage_state(tmp: Path, cfg: DemoConfig, resume: bool) -> tuple[dict, callable]:
    """Finished stages of an interrupted build in `tmp` (same config), and the function that records one."""
    stage_file = tmp / "_stages.json"
    if resume and stage_file.exists() and json.loads(stage_file.read_text()).get("config") == asdict(cfg):
        stages = json.loads(stage_file.read_text())
        print(f"[demo] resuming: finished stages {sorted(k for k in stages if k != 'config')}", flush=True)
    else:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        stages = {"config": asdict(cfg)}

    def done(stage: str, value=True) -> None:
        stages[stage] = value
        stage_file.write_text(json.dumps(stages))

    return stages, done


def _report_rows(saes: dict, models: dict, data: Corpora, cfg: DemoConfig) -> tuple[list, list]:
    """sae_lens run_evals of every SAE on each model and source; dead latents on the SAE's own model."""
    evals, dead = [], []
    for sae_name, sae in saes.items():
        own = "finetuned" if sae_name == "finetuned_sae" else "base"
        dead.append({"sae": sae_name, "model": own, **dead_latents(sae, models[own], data.en_eval_seqs + data.py_eval_seqs)})
        print(f"[demo] {sae_name}: {dead[-1]['n_dead']} dead latents on {own} ({100 * dead[-1]['dead_share']:.1f}%)", flush=True)
        if sae_name == "base_sae_twin":
            continue
        for model_name, m in models.items():
            for source, seqs in (("english", data.en_eval_seqs), ("python", data.py_eval_seqs)):
                evals.append({"sae": sae_name, "model": model_name, "source": source, **sae_evals(sae, m, seqs, cfg)})
    return evals, dead


def build(out: Path, cfg: DemoConfig, resume: bool = False) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from explorer.models import ModelSpec, load_model, save_local_model

    t0 = time.time()
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(int(os.environ.get("DEMO_THREADS", os.cpu_count() or 1)))
    tmp = out.with_name(out.name + ".partial")
    stages, done = _stage_state(tmp, cfg, resume)
    data = corpora(cfg, tmp / "_tokenizer", train_tokenizer_if_missing=True)
    tokenizer, en_seqs, py_seqs, en_eval_seqs, py_eval_seqs = data.tokenizer, data.en_seqs, data.py_seqs, data.en_eval_seqs, data.py_eval_seqs
    ctx = cfg.context_size

    tlc = tl_config(cfg)
    ln_vocab = math.log(cfg.vocab_size)
    # Epochs beyond the data repeat it; say so rather than hide it.
    base_epochs = cfg.base_tokens / max(1, len(en_seqs) * ctx)
    if "base" in stages:
        model = load_model(ModelSpec(path=str(tmp / "base")))
        base_loss = stages["base"]
    else:
        model = HookedTransformer(HookedTransformerConfig(**tlc), tokenizer=tokenizer)
        train_lm(model, en_seqs, cfg.base_tokens, cfg.base_lr, cfg.batch_size, cfg.seed, "base")
        save_local_model(model, tmp / "base", tlc, {"trained_on": "English prose (Debian packages)", "train_tokens": cfg.base_tokens})
        base_loss = {"english": heldout_loss(model, en_eval_seqs), "python": heldout_loss(model, py_eval_seqs)}
        done("base", base_loss)
    print(f"[demo] base held-out loss {base_loss}", flush=True)

    if "finetuned" in stages:
        ft_loss = stages["finetuned"]
    else:
        model.train()
        train_lm(model, py_seqs, cfg.finetune_tokens, cfg.finetune_lr, cfg.batch_size, cfg.seed + 1, "finetune", warmup=20)
        save_local_model(model, tmp / "finetuned", tlc, {"trained_on": "base + Python standard library", "train_tokens": cfg.finetune_tokens})
        ft_loss = {"english": heldout_loss(model, en_eval_seqs), "python": heldout_loss(model, py_eval_seqs)}
        done("finetuned", ft_loss)
    print(f"[demo] finetuned held-out loss {ft_loss}", flush=True)

    models = {"base": load_model(ModelSpec(path=str(tmp / "base"))), "finetuned": load_model(ModelSpec(path=str(tmp / "finetuned")))}
    saes = train_saes(tmp / "saes", cfg, models, sae_training_sets(cfg, en_seqs, py_seqs), stages, done)

    # Evaluation corpus: held-out documents only, each sequence labelled with its source.
    rows = [("english", s) for s in en_eval_seqs] + [("python", s) for s in py_eval_seqs]
    eval_table = pa.table(
        {
            "seq_id": pa.array(range(len(rows)), pa.int32()),
            "source": pa.array([r[0] for r in rows], pa.string()),
            "token_ids": pa.array([r[1] for r in rows], pa.list_(pa.int32())),
            "text": pa.array([tokenizer.decode(r[1][1:]) for r in rows], pa.string()),
        }
    )
    pq.write_table(eval_table, tmp / "eval_corpus.parquet", compression="zstd")

    evals, dead = _report_rows(saes, models, data, cfg)
    shutil.rmtree(tmp / "_tokenizer")
    (tmp / "_stages.json").unlink()
    import platform

    report = {
        "config": asdict(cfg),
        "hook": HOOK,
        "ln_vocab": ln_vocab,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "tokens": {
            "base_train": cfg.base_tokens, "finetune_train": cfg.finetune_tokens,
            "base_unique": len(en_seqs) * ctx, "finetune_unique": len(py_seqs) * ctx,
            "base_epochs": base_epochs, "eval": len(rows) * ctx,
        },
        "heldout_loss": {"base": base_loss, "finetuned": ft_loss},
        "sae_evals": evals,
        "dead_latents": dead,
        "build_seconds": time.time() - t0,
    }
    write_report(tmp, report)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    print(f"[demo] wrote {out} in {report['build_seconds']:.0f} s", flush=True)
    return report


LM_FIELDS = ("seed", "vocab_size", "n_layers", "d_model", "n_heads", "d_mlp", "context_size", "batch_size", "base_tokens",
             "finetune_tokens", "base_lr", "finetune_lr", "eval_sequences_per_source", "tokenizer_chars", "eval_share", "corpus_chars")


def retrain_saes(out: Path, cfg: DemoConfig, resume: bool = False) -> dict:
    """The SAE stage alone: retrain base_sae, finetuned_sae and the base SAE's seed twin on the
    demo's existing language models (never retrained here), then rewrite the report.

    The language models' data is rebuilt from the same documents and seeds; the rebuilt
    held-out sequences must equal the shipped eval_corpus.parquet (else the documents on this
    machine differ from the build's, and nothing is written). Resumable: a finished SAE of an
    interrupted stage (same config) is kept; `out/saes` is replaced only at the end."""
    import platform

    import pyarrow.parquet as pq
    import torch

    from explorer.models import ModelSpec, load_model

    t0 = time.time()
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(int(os.environ.get("DEMO_THREADS", os.cpu_count() or 1)))
    report_path = out / "REPORT.json"
    if not report_path.exists():
        raise SystemExit(f"{out} holds no demo build (no REPORT.json): run `python -m precompute.demo --out {out}` first.")
    report = json.loads(report_path.read_text())
    built = report.get("config", {})
    changed = [k for k in LM_FIELDS if built.get(k) != asdict(cfg).get(k)]
    if changed:
        raise SystemExit(f"The demo in {out} was built with other language-model settings {changed}; the SAE stage keeps its models.")
    data = corpora(cfg, out / "base" / "tokenizer", train_tokenizer_if_missing=False)
    shipped = pq.read_table(out / "eval_corpus.parquet", columns=["token_ids"]).column("token_ids").to_pylist()
    if shipped != data.en_eval_seqs + data.py_eval_seqs:
        raise SystemExit(f"The rebuilt evaluation sequences differ from {out}/eval_corpus.parquet: the documents on this machine are not the build's.")
    tmp = out / "saes.partial"
    stages, done = _stage_state(tmp, cfg, resume)
    models = {m: load_model(ModelSpec(path=str(out / m))) for m in ("base", "finetuned")}
    saes = train_saes(tmp, cfg, models, sae_training_sets(cfg, data.en_seqs, data.py_seqs), stages, done)
    evals, dead = _report_rows(saes, models, data, cfg)
    (tmp / "_stages.json").unlink()
    old = out / "saes.old"
    if old.exists():
        shutil.rmtree(old)
    if (out / "saes").exists():
        (out / "saes").rename(old)
    tmp.rename(out / "saes")
    if old.exists():
        shutil.rmtree(old)
    report.update(
        config=asdict(cfg), sae_evals=evals, dead_latents=dead,
        saes_retrained={"seconds": time.time() - t0, "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"},
    )
    write_report(out, report)
    print(f"[demo] retrained the SAEs in {out} in {time.time() - t0:.0f} s", flush=True)
    return report


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/demo", help="output directory (default data/demo)")
    parser.add_argument("--tiny", action="store_true", help="a few steps on a tiny corpus (for tests)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="reuse the finished stages of an interrupted build (same config)")
    parser.add_argument(
        "--stage", choices=("all", "saes"), default="all",
        help="all: build everything; saes: retrain only the SAEs (and the base SAE's seed twin) on the existing models in --out",
    )
    args = parser.parse_args(argv)
    cfg = DemoConfig.tiny() if args.tiny else DemoConfig()
    cfg = DemoConfig(**{**asdict(cfg), "seed": args.seed})
    print(f"[demo] English prose comes from Debian packages: apt-get install {' '.join(APT_PACKAGES)}", flush=True)
    if args.stage == "saes":
        retrain_saes(Path(args.out), cfg, resume=args.resume)
    else:
        build(Path(args.out), cfg, resume=args.resume)
    return 0


if __name__ == "__main__":
    sys.exit(main())
