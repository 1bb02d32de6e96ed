"""Stage 1, loading and checking: models, SAEs, hook, d_in, tokenizers, corpus and the token
sample, all BEFORE a run directory is touched, so that a bad config leaves nothing behind."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from explorer.errors import ConfigError
from precompute.config import RunConfig
from precompute.corpus import CorpusStats, TokenSample, check_token_ids, detect_format, read_corpus_with_stats, sample_sequences
from precompute.log import log
from precompute.sae_codec import SaeCodec


@dataclass
class Prepared:
    cfg: RunConfig  # hook resolved
    pair: Any  # explorer.models.LoadedPair
    sample: TokenSample
    special_ids: np.ndarray
    device: str
    inputs: dict[str, Any]
    corpus: CorpusStats | None = None
    warnings: tuple[str, ...] = ()  # printed when prepared; in the manifest's `loading`
    crosscoder: Any = None  # explorer.crosscoder.Crosscoder when the config has [crosscoder] (issue 16)
    twin: Any = None  # the base SAE's seed twin (sae_lens SAE), matched with base_sae only; None without one
    source_names: list[str] = field(default_factory=list)  # the sample's source labels, sorted; code = index
    seq_source: np.ndarray | None = None  # [n_sequences] int64 source code of each sequence

    @property
    def n_sources(self) -> int:
        return max(1, len(self.source_names))

    @property
    def n_batches(self) -> int:
        return math.ceil(self.sample.n_sequences / self.cfg.sample.batch_size)

    def batch_seq_ids(self, b: int) -> np.ndarray:
        bs = self.cfg.sample.batch_size
        return np.arange(b * bs, min((b + 1) * bs, self.sample.n_sequences))

    @functools.cached_property
    def codecs(self) -> dict[str, SaeCodec]:
        """One SaeCodec per SAE, built once per run (their weight norms are computed once)."""
        codecs = {name: SaeCodec(sae) for name, sae in self.pair.saes.items()}
        if self.twin is not None:
            codecs[self.cfg.twin] = SaeCodec(self.twin)
        return codecs

    @property
    def d_twin(self) -> int:
        return int(self.twin.cfg.d_sae) if self.twin is not None else 0

    @functools.cached_property
    def crosscoder_codec(self):
        from explorer.crosscoder import CrosscoderCodec

        return CrosscoderCodec(self.crosscoder)


def _file_fingerprint(path: Path, chunk: int = 16 << 20) -> dict[str, Any]:
    """Size and sha256 of the first and last 16 MiB: cheap even for large weights, and it changes
    whenever a retrained model or SAE, or another corpus, is written at the same path."""
    import hashlib

    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        h.update(fh.read(chunk))
        if size > 2 * chunk:
            fh.seek(size - chunk)
        h.update(fh.read(chunk))
    return {"bytes": size, "sha256_head_tail": h.hexdigest()}


def _path_fingerprint(path: Path) -> dict[str, Any]:
    """A file's fingerprint, or a folder's: each of its files' (sorted by path)."""
    if path.is_file():
        return _file_fingerprint(path)
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return {"files": {str(p.relative_to(path)): _file_fingerprint(p) for p in files}}


def _model_weights(path: Path) -> list[Path]:
    from explorer.hf_loading import weight_files
    from explorer.models import LOCAL_MODEL_WEIGHTS

    own = path / LOCAL_MODEL_WEIGHTS
    return [own] if own.is_file() and not (path / "model.safetensors.index.json").exists() else weight_files(path)


def input_fingerprints(cfg: RunConfig) -> dict[str, Any]:
    """Fingerprints of the local files a run reads (hub models and SAEs are named by their ids), and
    `config_dir`, the folder its relative paths resolve against (config.config_dir_record)."""
    from explorer.models import SAE_WEIGHTS

    out: dict[str, Any] = {"corpus": _path_fingerprint(cfg.resolve(cfg.corpus.path)), "config_dir": cfg.config_dir_record()}
    for name, spec in cfg.models.items():
        local = spec.path or (spec.hf_model if spec.hf_model and cfg.resolve(spec.hf_model).is_dir() else None)
        if local is not None:
            files = _model_weights(cfg.resolve(local))
            out[name] = _file_fingerprint(files[0]) if len(files) == 1 else {f.name: _file_fingerprint(f) for f in files}
    for name, spec in cfg.saes.items():
        if spec.path is not None:
            out[name] = _file_fingerprint(cfg.resolve(spec.path) / SAE_WEIGHTS)
    if cfg.crosscoder is not None:
        from explorer.crosscoder import weights_file

        out["crosscoder"] = _file_fingerprint(weights_file(cfg.resolve(cfg.crosscoder.path)))
    return out


def log_prepared(prep: Prepared) -> None:
    """The corpus summary (rows skipped, sequences available) and every warning, on stderr."""
    if prep.corpus is not None:
        log(prep.corpus.summary())
    for w in prep.warnings:
        log(f"warning: {w}")


def prepare(cfg: RunConfig, device: str = "cpu") -> Prepared:
    """Load and check models, SAEs, hook, tokenizers, vocabularies and the corpus; raise an
    ExplorerError on any problem, before anything is written."""
    from sae_lens.util import get_special_token_ids

    from explorer.hf_loading import resolve_device
    from explorer.models import load_pair, sae_context_warnings

    device = resolve_device(device)
    corpus_path = cfg.resolve(cfg.corpus.path)
    detect_format(corpus_path, cfg.corpus.format)  # a missing corpus fails before any model loads
    spec_root = cfg.root
    pair = load_pair(
        cfg.models["base"], cfg.models["finetuned"], cfg.saes["base_sae"], cfg.saes.get("finetuned_sae"),
        hook=cfg.hook, min_matching_id_share=cfg.thresholds.min_matching_id_share, device=device, root=spec_root,
        dtype=cfg.dtype, processing=cfg.processing, allow_hook_mismatch=cfg.allow_hook_mismatch,
    )
    for sae in pair.saes.values():  # the stream hands per-head activations over flattened (forward.py)
        if getattr(sae, "hook_z_reshaping_mode", False):
            sae.turn_off_forward_pass_hook_z_reshaping()
    crosscoder = None
    if cfg.crosscoder is not None:  # issue 16: one crosscoder over both models at the hook
        from explorer.crosscoder import check_fits, load_crosscoder
        from explorer.models import width_at_hook

        crosscoder = load_crosscoder(cfg.resolve(cfg.crosscoder.path), device, cfg.crosscoder.base_layer)
        check_fits(crosscoder, width_at_hook(pair.base, pair.hook), pair.hook)
    ctx = cfg.sample.context_size
    for label, model in (("base", pair.base), ("finetuned", pair.finetuned)):
        if ctx > model.cfg.n_ctx:
            raise ConfigError(f"[sample] context_size={ctx} exceeds the {label} model's context length n_ctx={model.cfg.n_ctx}.")
    seqs, sources, stats = read_corpus_with_stats(corpus_path, ctx, pair.base.tokenizer, cfg.corpus.format, cfg.corpus.split)
    check_token_ids(seqs, pair.shared_vocab, corpus_path)
    sample = sample_sequences(seqs, sources, cfg.sample.n_sequences, cfg.sample.seed, corpus_path)
    special = sorted(set(get_special_token_ids(pair.base.tokenizer)) | set(get_special_token_ids(pair.finetuned.tokenizer)))
    bos = pair.base.tokenizer.bos_token_id
    starts_with_bos = bos is not None and bool((sample.tokens[:, 0] == bos).all())
    warnings = [*pair.warnings, *stats.warnings, *sae_context_warnings(pair.saes, ctx, starts_with_bos)]
    names, codes = source_codes(sample.sources, cfg.evals.max_sources, corpus_path)
    twin = None
    if cfg.twin is not None:  # the base SAE's seed twin: checked like the base SAE, on the base model
        from explorer.models import check_sae, check_sae_fits, load_sae, sae_hook_name

        twin = load_sae(cfg.saes[cfg.twin], device, spec_root)
        check_sae_fits(twin, pair.base, pair.hook, label=f"{cfg.twin} on the base model")
        check_sae(twin, cfg.twin, pair.hook, cfg.allow_hook_mismatch)
        if getattr(twin, "hook_z_reshaping_mode", False):
            twin.turn_off_forward_pass_hook_z_reshaping()
        if sae_hook_name(twin) != pair.hook:
            warnings.append(f"{cfg.twin} was trained at {sae_hook_name(twin)!r} and runs at {pair.hook!r} (allow_hook_mismatch).")
    pair.loading["warnings"] = warnings
    return Prepared(
        cfg.with_hook(pair.hook), pair, sample, np.asarray(special, np.int64), device, input_fingerprints(cfg),
        corpus=stats, warnings=tuple(warnings), crosscoder=crosscoder, twin=twin, source_names=names, seq_source=codes,
    )


def source_codes(sources: list[str | None], max_sources: int, corpus_path: Path) -> tuple[list[str], np.ndarray]:
    """(sorted source labels, per-sequence code); a missing label is schema.UNLABELLED_SOURCE."""
    from explorer.schema import UNLABELLED_SOURCE

    labels = [UNLABELLED_SOURCE if s is None else str(s) for s in sources]
    names = sorted(set(labels))
    if len(names) > max_sources:
        raise ConfigError(
            f"The sample of {corpus_path} has {len(names)} source labels; per-source statistics are kept for at most "
            f"[evals] max_sources = {max_sources}. Raise max_sources or merge labels in the corpus's source column."
        )
    index = {n: i for i, n in enumerate(names)}
    return names, np.asarray([index[s] for s in labels], np.int64)

