"""`check CONFIG`: every problem a run of this config would hit, found before running it.

An entry point beside `run` and `merge`, built from the same checks `prepare` makes (explorer's
loaders and checks, the corpus reader), but each taken on its own so that one problem does not
hide the next: the config, the corpus file, each SAE (cfg and weights), each model (config,
weights, tokenizer), the tokenizers and vocabularies of the pair, the hook and its width for every
(SAE, model), each SAE's own hook, normalization and dtype, the context length, and the corpus
read with the base tokenizer (rows skipped, sequences available against the sample asked for,
token ids against the shared vocabulary). No forward pass over the corpus is run (the width at the
hook is measured on one token) and nothing is written.

    python -m precompute check configs/demo.toml          # or: sae-transfer check configs/demo.toml
    exit 0: no problem (warnings may be printed); exit 2: problems, one line each
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from explorer.errors import ExplorerError


@dataclass
class CheckReport:
    config: str
    problems: list[tuple[str, str]] = field(default_factory=list)  # (what, message)
    warnings: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)  # what passed

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        out = [f"ok       {what}" for what in self.checked]
        out += [f"warning  {w}" for w in self.warnings]
        out += [f"problem  {what}: {msg}" for what, msg in self.problems]
        n = len(self.problems)
        out.append(f"{self.config}: " + ("no problems found" if not n else f"{n} problem{'s' if n > 1 else ''}"))
        return out


def _step(report: CheckReport, what: str, fn: Callable[[], Any]) -> Any:
    """fn's result, or None with its ExplorerError recorded as a problem of `what`."""
    try:
        out = fn()
    except ExplorerError as exc:
        report.problems.append((what, str(exc)))
        return None
    report.checked.append(what)
    return out


def check(config_path: str | Path, device: str = "cpu", dtype: str | None = None) -> CheckReport:
    from explorer import hf_loading as H
    from explorer import models as M
    from precompute.config import RunConfig
    from precompute.corpus import check_token_ids, detect_format, read_corpus_with_stats, sample_sequences

    report = CheckReport(str(config_path))
    cfg = _step(report, "config", lambda: RunConfig.from_toml(config_path))
    if cfg is None:
        return report
    if dtype is not None:
        cfg = cfg.with_dtype(H.check_dtype(dtype, "--dtype"))
    device = _step(report, "device", lambda: H.resolve_device(device))
    if device is None:
        return report
    corpus_path = cfg.resolve(cfg.corpus.path)
    corpus_format = _step(report, f"corpus {corpus_path}", lambda: detect_format(corpus_path, cfg.corpus.format))

    saes = {}
    for name, spec in cfg.saes.items():
        sae = _step(report, f"SAE {name}", lambda spec=spec: M.load_sae(spec, device, cfg.root))
        if sae is not None:
            saes[name] = sae
    flags = H.NO_PROCESSING
    if "base_sae" in saes:
        flags = _step(report, "model processing", lambda: H.resolve_processing(cfg.processing, saes["base_sae"])[0]) or flags
    models = {}
    for m in ("base", "finetuned"):
        loaded = _step(report, f"{m} model", lambda m=m: M.load_model_with_info(cfg.models[m], device, cfg.root, cfg.dtype, flags))
        if loaded is not None:
            models[m] = loaded[0]
    shared_vocab = None
    if len(models) == 2:
        b, f = models["base"], models["finetuned"]
        th = cfg.thresholds.min_matching_id_share
        _step(report, "tokenizers", lambda: M.check_tokenizers(M.compare_tokenizers(b.tokenizer, f.tokenizer), th))
        vocab = _step(report, "vocabularies", lambda: M.check_vocabularies(b, f, th))
        shared_vocab = vocab["n_shared"] if vocab else None
    hook = cfg.hook or (M.sae_hook_name(saes["base_sae"]) if "base_sae" in saes else None)
    if hook is not None:
        for m, model in models.items():
            for name, sae in saes.items():
                def fits(model=model, sae=sae, name=name, m=m):
                    M.check_hook(model, hook)
                    M.check_sae_fits(sae, model, hook, label=f"{name} on the {m} model")
                _step(report, f"{name} at {hook} on the {m} model", fits)
        for name, sae in saes.items():
            _step(report, f"{name}: its own hook, normalization and dtype", lambda sae=sae, name=name: M.check_sae(sae, name, hook, cfg.allow_hook_mismatch))
    ctx = cfg.sample.context_size
    for m, model in models.items():
        def context(model=model, m=m):
            if ctx > model.cfg.n_ctx:
                from explorer.errors import ConfigError

                raise ConfigError(f"[sample] context_size={ctx} exceeds the {m} model's context length n_ctx={model.cfg.n_ctx}.")
        _step(report, f"context size on the {m} model", context)
    if corpus_format is not None and "base" in models:
        def corpus():
            seqs, sources, stats = read_corpus_with_stats(corpus_path, ctx, models["base"].tokenizer, cfg.corpus.format, cfg.corpus.split)
            report.warnings.extend(stats.warnings)
            report.checked.append(f"corpus read: {stats.summary()}")
            if shared_vocab:
                check_token_ids(seqs, shared_vocab, corpus_path)
            sample = sample_sequences(seqs, sources, cfg.sample.n_sequences, cfg.sample.seed, corpus_path)
            bos = models["base"].tokenizer.bos_token_id
            starts_with_bos = bos is not None and bool((sample.tokens[:, 0] == bos).all())
            report.warnings.extend(M.sae_context_warnings(saes, ctx, starts_with_bos))
            return sample
        _step(report, f"token sample ({cfg.sample.n_sequences:,} sequences of {ctx})", corpus)
    return report
