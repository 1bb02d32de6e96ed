"""Train the demo's BatchTopK crosscoder: one encoder over the base and the finetuned model's
activations at the demo's hook, one decoder per model (Minder et al. 2025's BatchTopK
crosscoder, dictionary_learning's BatchTopKCrossCoder, at toy scale). Seeded.

    python -m precompute.crosscoder_train                  # data/demo/crosscoder (about 15 min, 2 CPU cores)
    python -m precompute.crosscoder_train --tiny --demo DIR --out DIR/crosscoder   # seconds (tests)
    python -m precompute.crosscoder_train --report-only    # rewrite the REPORT section from training.json

Training text: the demo's own training documents (precompute/demo.py: English prose from Debian
packages, Python from the standard library, the same held-out split, so no evaluation document is
trained on), packed into BOS-led sequences with the demo's tokenizer, half English and half Python,
shuffled. Both models read the same token ids; their activations at the hook are taken on the fly.
Special tokens (BOS, which is also the demo's EOS/PAD and separates documents) are left out of the
training activations, as the precompute leaves them out of every statistic: their activation is
an outlier (norm 23 on the base model against 19 for other tokens) that no latent should spend
itself on.

Objective (dictionary_learning's BatchTopKCrossCoderTrainer): per batch of B tokens keep the k*B
largest a_j * c_j (c_j = sum over models of ||W_dec[m, j]||, the `crosscoder` code
normalisation), loss = sum over models of ||x_m - xhat_m||^2 (mean over tokens), plus 1/32 of the
AuxK loss (dead latents, not fired for `dead_tokens`, reconstruct the residual: Gao et al. 2024).
Decoder norms are free (the relative norm is what the analysis reads). The inference threshold is
an exponential moving average of the smallest selected a_j * c_j. Adam, linear warm-up, cosine decay.

Outputs in --out: crosscoder.safetensors + cfg.json (explorer/crosscoder.py's format) and
training.json (the curve); REPORT.json["crosscoder"] and a "## Crosscoder" section of REPORT.md in
--demo. FVE ("fraction of variance explained", sae_lens's `explained_variance` definition): per
model, 1 - sum ||x - xhat||^2 / sum ||x - mean(x)||^2 pooled over the non-special tokens of the
first `final_eval_sequences` held-out evaluation sequences of each source (the demo run's
crosscoder_metrics.parquet has it on the whole evaluation corpus).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

HOOK = "blocks.1.hook_resid_pre"
REPORT_HEADER = "## Crosscoder"


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    d_sae: int = 2048
    k: int = 32
    tokens: int = 2_000_000
    batch_tokens: int = 4096
    lr: float = 1e-3
    decoder_init_norm: float = 0.1
    warmup_steps: int = 100
    auxk_alpha: float = 1 / 32
    dead_tokens: int = 500_000  # a latent not fired for this many training tokens is dead (AuxK)
    threshold_beta: float = 0.99
    threshold_start_step: int = 50
    buffer_batches: int = 8  # activations of this many batches are shuffled together
    log_every: int = 25
    eval_every: int = 100
    eval_sequences: int = 48  # per source, from the evaluation corpus, for the curve
    final_eval_sequences: int = 512  # per source, for the reported FVE (the demo run covers all of them)
    norm_batches: int = 8  # batches whose activations fix the input normalisation
    threads: int = 2

    @classmethod
    def tiny(cls) -> "TrainConfig":
        return cls(d_sae=64, k=4, tokens=256 * 60, batch_tokens=256, warmup_steps=5, dead_tokens=2560, threshold_start_step=5,
                   buffer_batches=4, log_every=5, eval_every=20, eval_sequences=4, final_eval_sequences=6, norm_batches=4, threads=1)


# ------------------------------------------------------------------------------------------ data


def training_sequences(demo_dir: Path, n_tokens: int, seed: int) -> list[list[int]]:
    """The demo's training documents packed into BOS-led sequences: half English, half Python, shuffled."""
    from transformers import AutoTokenizer

    from precompute import demo

    report = json.loads((demo_dir / "REPORT.json").read_text())
    dcfg = report["config"]
    ctx = int(dcfg["context_size"])
    tok = AutoTokenizer.from_pretrained(str(demo_dir / "base" / "tokenizer"), local_files_only=True)
    en_train, _ = demo.split_documents(demo.english_documents(dcfg.get("corpus_chars")), dcfg["eval_share"], dcfg["seed"])
    py_train, _ = demo.split_documents(demo.python_documents(dcfg.get("corpus_chars")), dcfg["eval_share"], dcfg["seed"])
    rng = np.random.default_rng(seed + 3)  # another order than the demo's LM and SAE training
    n_each = max(1, n_tokens // ctx // 2 + 1)
    en = demo.pack(tok, [en_train[i] for i in rng.permutation(len(en_train))], ctx, n_each)
    py = demo.pack(tok, [py_train[i] for i in rng.permutation(len(py_train))], ctx, n_each)
    seqs = en + py
    return [seqs[i] for i in rng.permutation(len(seqs))]


def eval_sequences(demo_dir: Path, per_source: int | None) -> dict[str, np.ndarray]:
    """The evaluation corpus's sequences by source (all of them, or the first `per_source`)."""
    import pyarrow.parquet as pq

    t = pq.read_table(demo_dir / "eval_corpus.parquet", columns=["source", "token_ids"])
    src = np.asarray(t.column("source").to_pylist())
    toks = np.stack(t.column("token_ids").to_numpy(zero_copy_only=False)).astype(np.int64)
    return {s: toks[src == s][:per_source] for s in sorted(set(src))}


class Activations:
    """Both models' activations at the hook on token batches, special tokens left out."""

    def __init__(self, demo_dir: Path, hook: str = HOOK):
        from sae_lens.util import get_special_token_ids

        from explorer.models import ModelSpec, load_model
        from precompute.forward import ModelRunner

        self.models = {m: load_model(ModelSpec(path=str(demo_dir / m))) for m in ("base", "finetuned")}
        self.runners = {m: ModelRunner(model, hook) for m, model in self.models.items()}
        ids = set(get_special_token_ids(self.models["base"].tokenizer)) | set(get_special_token_ids(self.models["finetuned"].tokenizer))
        self.special = np.asarray(sorted(ids), np.int64)

    def __call__(self, tokens: np.ndarray):
        """tokens [B, C] -> (x_base [N, d], x_finetuned [N, d]) at the non-special positions."""
        import torch

        keep = torch.from_numpy(~np.isin(tokens, self.special).reshape(-1))
        t = torch.from_numpy(tokens.astype(np.int64))
        with torch.inference_mode():
            xs = [self.runners[m].acts(t).reshape(-1, self.runners[m].model.cfg.d_model)[keep] for m in ("base", "finetuned")]
        return xs[0].clone(), xs[1].clone()


# ------------------------------------------------------------------------------------------ model


class Trainer:
    """The crosscoder's parameters and one optimisation step. Inputs are normalised per model as
    dictionary_learning's NormalizableMixin does (keep_relative_variance, target_rms 1):
    (x - mean_m) * g_m with g_m = 1 / sqrt(sum over dimensions of the variance); the mean and
    variance come from the first `norm_batches` batches and are saved with the crosscoder.

    Initialisation: encoder columns of unit norm per model (dictionary_learning's norm_init_scale
    1), decoder = encoder transposed times `decoder_init_norm` (0.1, sae_lens's BatchTopK default:
    k unit rows would start far louder than the normalised activations). The step is sparse: the
    selection (which latents are active) reads the dense pre-activations without gradients, the
    selected entries are gathered from them and decoded by embedding_bag: the gradients equal the
    dense formulation's, and the decoder costs O(active entries x d_in) instead of a dense matmul."""

    def __init__(self, d_in: int, cfg: TrainConfig, mean, scale):
        import torch

        self.cfg = cfg
        self.d_in = d_in
        self.mean, self.scale = mean, scale  # [2, d_in], [2]
        g = torch.Generator().manual_seed(cfg.seed)
        w = torch.nn.init.kaiming_uniform_(torch.empty(2, d_in, cfg.d_sae), generator=g)
        w = w / w.norm(dim=1, keepdim=True)
        self.W_enc = torch.nn.Parameter(w.clone())
        self.b_enc = torch.nn.Parameter(torch.zeros(cfg.d_sae))
        self.W_dec = torch.nn.Parameter((w.transpose(1, 2) * cfg.decoder_init_norm).contiguous())
        self.b_dec = torch.nn.Parameter(torch.zeros(2, d_in))
        self.params = [self.W_enc, self.b_enc, self.W_dec, self.b_dec]
        self.opt = torch.optim.Adam(self.params, lr=cfg.lr)
        self.threshold = -1.0
        self.since_fired = torch.zeros(cfg.d_sae, dtype=torch.long)
        self.step = 0

    def normalize(self, xb, xf):
        return (xb - self.mean[0]) * self.scale[0], (xf - self.mean[1]) * self.scale[1]

    def _decode(self, t, j, f, n: int, m: int, bias: bool = True):
        import torch

        counts = torch.bincount(t, minlength=n)
        out = torch.nn.functional.embedding_bag(j, self.W_dec[m], torch.cumsum(counts, 0) - counts, mode="sum", per_sample_weights=f)
        return out + self.b_dec[m] if bias else out

    def train_step(self, xb, xf, lr_scale: float) -> dict:
        """BatchTopK: the k*n largest a * c of the batch (a token keeps at most its 2k largest:
        the candidates come from a per-token top-2k, for speed)."""
        import torch

        cfg = self.cfg
        xb, xf = self.normalize(xb, xf)
        n = xb.shape[0]
        X = torch.cat([xb, xf], 1)
        pre = torch.addmm(self.b_enc, X, self.W_enc.reshape(2 * self.d_in, -1))  # rows: base dims, then finetuned
        with torch.no_grad():
            a = torch.relu(pre.detach())
            scaled = a * self.W_dec.norm(dim=2).sum(0)
            cand_val, cand_idx = scaled.topk(min(2 * cfg.k, cfg.d_sae), dim=1)
            top = cand_val.flatten().topk(cfg.k * n, sorted=False).indices
            t, j = top // cand_idx.shape[1], cand_idx.flatten()[top]
            order = torch.argsort(t * cfg.d_sae + j)
            t, j = t[order], j[order]
            sel = scaled[t, j]
        f = torch.relu(pre[t, j])
        xhat = [self._decode(t, j, f, n, m) for m in range(2)]
        err = [x - h for x, h in zip((xb, xf), xhat)]
        recon = sum(e.pow(2).sum(-1) for e in err).mean()
        fired = torch.zeros(cfg.d_sae, dtype=torch.bool)
        fired[j[sel > 0]] = True
        self.since_fired = torch.where(fired, torch.zeros_like(self.since_fired), self.since_fired + n)
        dead = self.since_fired >= cfg.dead_tokens
        aux = torch.zeros(())
        n_dead = int(dead.sum())
        if n_dead:  # AuxK: the dead latents' top k_aux per token reconstruct the residual
            k_aux = min(self.d_in // 2, n_dead)
            with torch.no_grad():
                dead_ids = torch.nonzero(dead).view(-1)
                val, idx = scaled.index_select(1, dead_ids).topk(k_aux, dim=1)
                ta = torch.arange(n).repeat_interleave(k_aux)
                ja, ok = dead_ids[idx.flatten()], val.flatten() > 0
                ta, ja = ta[ok], ja[ok]
            if len(ta):
                fa = torch.relu(pre[ta, ja])
                num = sum((e.detach() - self._decode(ta, ja, fa, n, m, bias=False)).pow(2).sum(-1).mean() for m, e in enumerate(err))
                den = sum((e.detach() - e.detach().mean(0)).pow(2).sum(-1).mean() for e in err)
                aux = torch.nan_to_num(num / den, nan=0.0)
        loss = recon + cfg.auxk_alpha * aux
        for group in self.opt.param_groups:
            group["lr"] = cfg.lr * lr_scale
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        with torch.no_grad():
            pos = sel[sel > 0]
            if len(pos) and self.step >= cfg.threshold_start_step:
                m = float(pos.min())
                self.threshold = m if self.threshold < 0 else cfg.threshold_beta * self.threshold + (1 - cfg.threshold_beta) * m
            fve = [float(1 - e.pow(2).sum() / (x - x.mean(0)).pow(2).sum()) for e, x in zip(err, (xb, xf))]
        self.step += 1
        return {"loss": float(recon.detach()), "aux": float(aux.detach()), "fve_base": fve[0], "fve_finetuned": fve[1], "l0": len(t) / n, "dead": n_dead}

    def crosscoder(self):
        from explorer.crosscoder import Crosscoder

        return Crosscoder(
            W_enc=self.W_enc.detach().clone(), b_enc=self.b_enc.detach().clone(), W_dec=self.W_dec.detach().clone(),
            b_dec=self.b_dec.detach().clone(), architecture="batchtopk", threshold=float(self.threshold), k=self.cfg.k,
            code_normalization="crosscoder", input_mean=self.mean.clone(), input_scale=self.scale.clone(),
            output_scale=1.0 / self.scale, source="this project's format",
        )


def evaluate(cc, acts: Activations, seqs_by_source: dict[str, np.ndarray], batch: int = 64) -> dict:
    """Pooled FVE, MSE and L0 per model and source, and which latents fired, on the given sequences."""
    import torch

    from explorer.crosscoder import CrosscoderCodec

    codec = CrosscoderCodec(cc)
    out: dict = {"by_source": {}}
    fired = torch.zeros(cc.d_sae, dtype=torch.bool)
    tot = {m: [0.0, 0.0, 0, np.zeros(cc.d_in), 0.0] for m in range(2)}  # sse, sum x^2, n, sum x
    l0_sum, n_all = 0.0, 0
    for source, seqs in seqs_by_source.items():
        acc = {m: [0.0, 0.0, 0, np.zeros(cc.d_in)] for m in range(2)}
        for i in range(0, len(seqs), batch):
            xb, xf = acts(seqs[i : i + batch])
            with torch.inference_mode():
                t, j, v = codec.encode_sparse(xb, xf)
                fired[j] = True
                l0_sum += len(t)
                n_all += xb.shape[0]
                for m, x in enumerate((xb, xf)):
                    xhat = cc.denormalize(codec.decode_sparse(t, j, v, x.shape[0], m), m)
                    x64, e64 = x.double(), (x - xhat).double()
                    for a in (acc[m], tot[m]):
                        a[0] += float(e64.pow(2).sum())
                        a[1] += float(x64.pow(2).sum())
                        a[2] += x.shape[0]
                        a[3] += x64.sum(0).numpy()
        out["by_source"][source] = {MODEL_NAMES[m]: _fve(*acc[m][:4]) for m in range(2)}
    out.update({MODEL_NAMES[m]: _fve(*tot[m][:4]) for m in range(2)})
    out["l0"] = l0_sum / max(1, n_all)
    out["n_tokens"] = n_all
    out["n_fired"] = int(fired.sum())
    return out


MODEL_NAMES = ("base", "finetuned")


def _fve(sse: float, sumsq: float, n: int, sumx: np.ndarray) -> dict:
    total = sumsq - float(sumx @ sumx) / max(1, n)
    return {"explained_variance": 1 - sse / total if total > 0 else float("nan"), "mse": sse / max(1, n), "n_tokens": n}


# ------------------------------------------------------------------------------------------ training


def train(demo_dir: Path, out: Path, cfg: TrainConfig, command: str = "python -m precompute.crosscoder_train") -> dict:
    import torch

    from explorer.crosscoder import save_crosscoder

    t0 = time.time()
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    acts = Activations(demo_dir)
    seqs = np.asarray(training_sequences(demo_dir, cfg.tokens, cfg.seed), dtype=np.int64)
    ctx = seqs.shape[1]
    per_batch = max(1, cfg.batch_tokens // ctx)
    evals = eval_sequences(demo_dir, cfg.eval_sequences)
    print(f"[crosscoder] {len(seqs)} training sequences of {ctx} tokens; d_sae={cfg.d_sae} k={cfg.k}", flush=True)
    rng = np.random.default_rng(cfg.seed + 4)

    def buffers():
        """Shuffled activations of buffer_batches batches at a time, as (x_base, x_finetuned)."""
        pos = 0
        while True:
            if pos + per_batch * cfg.buffer_batches > len(seqs):
                pos = 0  # another epoch (reported in training.json)
            xb, xf = acts(seqs[pos : pos + per_batch * cfg.buffer_batches])
            pos += per_batch * cfg.buffer_batches
            perm = torch.from_numpy(rng.permutation(xb.shape[0]))
            yield xb[perm], xf[perm]

    first = acts(seqs[: per_batch * cfg.norm_batches])
    mean = torch.stack([x.double().mean(0) for x in first])
    scale = torch.stack([1.0 / x.double().var(0, unbiased=False).sum().sqrt() for x in first])
    trainer = Trainer(first[0].shape[1], cfg, mean.float(), scale.float())
    gen = buffers()
    n_steps = max(1, cfg.tokens // cfg.batch_tokens)
    curve, seen = [], 0
    buf, off = next(gen), 0
    for step in range(n_steps):
        if off + cfg.batch_tokens > buf[0].shape[0]:
            buf, off = next(gen), 0
        xb, xf = buf[0][off : off + cfg.batch_tokens], buf[1][off : off + cfg.batch_tokens]
        off += cfg.batch_tokens
        seen += xb.shape[0]
        warm = min(1.0, (step + 1) / cfg.warmup_steps)
        stats = trainer.train_step(xb, xf, warm * 0.5 * (1 + math.cos(math.pi * step / n_steps)))
        last = step == n_steps - 1
        if step % cfg.log_every == 0 or last:
            row = {"step": step, "tokens": seen, **stats}
            if step % cfg.eval_every == 0 or last:
                ev = evaluate(trainer.crosscoder(), acts, evals)
                row["eval_fve_base"] = ev["base"]["explained_variance"]
                row["eval_fve_finetuned"] = ev["finetuned"]["explained_variance"]
            curve.append(row)
            print(
                f"[crosscoder] step {step}/{n_steps} tokens {seen:,} loss {stats['loss']:.3f} fve {stats['fve_base']:.3f}/{stats['fve_finetuned']:.3f} "
                f"l0 {stats['l0']:.1f} dead {stats['dead']} ({time.time() - t0:.0f} s)", flush=True,
            )
    train_seconds = time.time() - t0
    cc = trainer.crosscoder()
    final = evaluate(cc, acts, eval_sequences(demo_dir, cfg.final_eval_sequences))
    rel = rel_norm(cc)
    info = {
        "command": command,
        "config": asdict(cfg),
        "hook": HOOK,
        "d_in": cc.d_in,
        "training_tokens": seen,
        "epochs": seen / max(1, int((~np.isin(seqs, acts.special)).sum())),
        "train_seconds": train_seconds,
        "threshold": cc.threshold,
        "eval": final,
        "dead_latents_eval": cc.d_sae - final["n_fired"],
        "relative_norm_counts": rel,
        "machine": f"{os.uname().machine}, {os.cpu_count()} cores, torch {torch.__version__}",
    }
    out.mkdir(parents=True, exist_ok=True)
    save_crosscoder(cc, out, {"hook": HOOK, "trained_on": "the demo pair's training documents, English and Python (precompute/crosscoder_train.py)", "seed": cfg.seed})
    (out / "training.json").write_text(json.dumps({"info": info, "curve": curve}, indent=2, sort_keys=True) + "\n")
    update_report(demo_dir, out)
    print(f"[crosscoder] wrote {out} in {train_seconds:.0f} s; FVE base {final['base']['explained_variance']:.3f}, "
          f"finetuned {final['finetuned']['explained_variance']:.3f}; {info['dead_latents_eval']} latents never fire on the eval corpus", flush=True)
    return info


def rel_norm(cc) -> dict:
    """Latents per relative-norm band (the precompute's default bands, precompute/config.py)."""
    from explorer.crosscoder import DEFAULT_BANDS as d

    n = cc.W_dec.norm(dim=2).double().numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        r = n[1] / (n[0] + n[1])
    return {
        "base_only": int((r <= d["base_only_max"]).sum()), "finetune_only": int((r >= d["finetune_only_min"]).sum()),
        "shared": int(((r >= d["shared_min"]) & (r <= d["shared_max"])).sum()), "total": int(len(r)),
        "percentiles": {str(q): float(np.nanpercentile(r, q)) for q in (0, 1, 50, 99, 100)},
    }


# ------------------------------------------------------------------------------------------ report


def report_lines(info: dict, curve: list[dict], rel_out: str) -> list[str]:
    ev = info["eval"]
    cfg = info["config"]
    lines = [
        REPORT_HEADER,
        "",
        f"A BatchTopK crosscoder at {info['hook']} of both models (one encoder over the concatenated base and finetuned "
        f"activations, one decoder per model), in `{rel_out}`. Trained by `{info['command']}` "
        f"({info['train_seconds']:.0f} s on {info['machine']}); seed {cfg['seed']}; d_in {info['d_in']} per model, "
        f"{cfg['d_sae']} latents, k = {cfg['k']} per token (batch-wise), {info['training_tokens']:,} training tokens "
        f"({info['epochs']:.2f} epochs) from the demo's own English and Python training documents, special tokens (BOS) left out.",
        "",
        "Fraction of variance explained (sae_lens's `explained_variance` definition, pooled over "
        f"{ev['n_tokens']:,} non-special tokens of held-out evaluation sequences, {cfg['final_eval_sequences']} per source), "
        "and MSE (squared error summed over dimensions, mean over tokens):",
        "",
        "| model | source | FVE | MSE |",
        "|---|---|---|---|",
    ]
    for m in MODEL_NAMES:
        lines.append(f"| {m} | all | {ev[m]['explained_variance']:.3f} | {ev[m]['mse']:.3f} |")
        for s, by in ev["by_source"].items():
            lines.append(f"| {m} | {s} | {by[m]['explained_variance']:.3f} | {by[m]['mse']:.3f} |")
    rel = info["relative_norm_counts"]
    lines += [
        "",
        f"L0 on the evaluation corpus {ev['l0']:.1f}; {info['dead_latents_eval']} of {cfg['d_sae']} latents never fire on it; "
        f"inference threshold {info['threshold']:.4g}. Relative decoder norm ||d_F|| / (||d_B|| + ||d_F||): "
        f"{rel['base_only']} base-only, {rel['shared']} shared, {rel['finetune_only']} finetune-only latents "
        "(the precompute's default bands)"
        + (_percentile_text(rel["percentiles"]) if "percentiles" in rel else "."),
        "",
        "Training curve (loss: sum over both models of ||x - xhat||^2, mean over the batch's tokens, in the crosscoder's "
        "normalised units; FVE and L0 on the training batch, where BatchTopK keeps exactly k per token on average; eval FVE "
        "on the first evaluation sequences of each source with the inference threshold, which is unset before step "
        f"{cfg['threshold_start_step']} (every positive latent fires then, so the first eval row is not comparable):",
        "",
        "| step | tokens | loss | FVE base | FVE finetuned | L0 | dead | eval FVE base | eval FVE finetuned |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    shown = [r for r in curve if "eval_fve_base" in r]
    for r in shown:
        lines.append(
            f"| {r['step']} | {r['tokens']:,} | {r['loss']:.3f} | {r['fve_base']:.3f} | {r['fve_finetuned']:.3f} | {r['l0']:.1f} | {r['dead']} "
            f"| {r['eval_fve_base']:.3f} | {r['eval_fve_finetuned']:.3f} |"
        )
    lines.append("")
    lines.append(f"Every {cfg['log_every']} steps in `{rel_out}/training.json`.")
    return lines


def _percentile_text(p: dict) -> str:
    return f"; relative norms from {p['0']:.3f} to {p['100']:.3f} (1st and 99th percentiles {p['1']:.3f} and {p['99']:.3f}, median {p['50']:.3f})."


def update_report(demo_dir: Path, out: Path) -> None:
    """REPORT.json["crosscoder"] and the REPORT.md section (replaced if present), from out/training.json."""
    data = json.loads((out / "training.json").read_text())
    try:
        rel_out = str(out.resolve().relative_to(demo_dir.resolve().parent.parent))
    except ValueError:
        rel_out = str(out)
    report_json = demo_dir / "REPORT.json"
    report = json.loads(report_json.read_text())
    from explorer.crosscoder import load_crosscoder

    data["info"]["relative_norm_counts"] = rel_norm(load_crosscoder(out))  # from the saved weights
    (out / "training.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    report["crosscoder"] = {**data["info"], "path": rel_out}
    report_json.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    md = demo_dir / "REPORT.md"
    text = md.read_text() if md.exists() else ""
    kept, skipping = [], False
    for line in text.splitlines():
        if line.strip() == REPORT_HEADER:
            skipping = True
            continue
        if skipping and line.startswith("## "):
            skipping = False
        if not skipping:
            kept.append(line)
    while kept and not kept[-1].strip():
        kept.pop()
    md.write_text("\n".join(kept + [""] + report_lines(data["info"], data["curve"], rel_out)) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m precompute.crosscoder_train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", default="data/demo", help="the demo pair's directory (default data/demo)")
    p.add_argument("--out", default=None, help="output directory (default DEMO/crosscoder)")
    p.add_argument("--tiny", action="store_true", help="a few steps of a 64-latent crosscoder (tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokens", type=int, default=None, help="training tokens (default 2,000,000; tiny 15,360)")
    p.add_argument("--report-only", action="store_true", help="rewrite the REPORT.md/json section from OUT/training.json")
    args = p.parse_args(argv)
    demo_dir = Path(args.demo)
    out = Path(args.out) if args.out else demo_dir / "crosscoder"
    for need in ("REPORT.json", "eval_corpus.parquet", "base", "finetuned"):
        if not (demo_dir / need).exists():
            print(f"error: {demo_dir} is not a demo pair (no {need}); build one with `python -m precompute.demo`", file=sys.stderr)
            return 2
    if args.report_only:
        if not (out / "training.json").exists():
            print(f"error: {out / 'training.json'} does not exist; train first", file=sys.stderr)
            return 2
        update_report(demo_dir, out)
        return 0
    cfg = TrainConfig.tiny() if args.tiny else TrainConfig()
    cfg = TrainConfig(**{**asdict(cfg), "seed": args.seed, **({"tokens": args.tokens} if args.tokens else {})})
    shown = [a for a in (argv if argv is not None else sys.argv[1:])]
    train(demo_dir, out, cfg, " ".join(["python -m precompute.crosscoder_train", *shown]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
