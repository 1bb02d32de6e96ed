"""Stage 1, loading and checking: models, SAEs, hook, d_in, tokenizers, corpus and the token
sample, all BEFORE a run directory is touched, so that a bad config leaves nothing behind."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from explorer.errors import ConfigError, CorpusError
from precompute.config import REPO_ROOT, RunConfig
from precompute.corpus import TokenSample, check_token_ids, read_corpus, sample_sequences
from precompute.sae_codec import SaeCodec




@dataclass
class Prepared:
    cfg: RunConfig  # hook resolved
    pair: Any  # explorer.models.LoadedPair
    sample: TokenSample
    special_ids: np.ndarray
    device: str
    inputs: dict[str, Any]
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


def input_fingerprints(cfg: RunConfig) -> dict[str, Any]:
    """Fingerprints of the local files a run reads (hub models and SAEs are named by their ids)."""
    from explorer.models import LOCAL_MODEL_WEIGHTS, SAE_WEIGHTS

    out: dict[str, Any] = {"corpus": _file_fingerprint(cfg.resolve(cfg.corpus.path))}
    for name, spec in cfg.models.items():
        if spec.path is not None:
            out[name] = _file_fingerprint(cfg.resolve(spec.path) / LOCAL_MODEL_WEIGHTS)
    for name, spec in cfg.saes.items():
        if spec.path is not None:
            out[name] = _file_fingerprint(cfg.resolve(spec.path) / SAE_WEIGHTS)
    return out


def prepare(cfg: RunConfig, device: str = "cpu") -> Prepared:
    """Load and check models, SAEs, hook, tokenizers and the corpus; raise an ExplorerError on any problem."""
    from sae_lens.util import get_special_token_ids

    from explorer.models import load_pair

    corpus_path = cfg.resolve(cfg.corpus.path)
    if not corpus_path.is_file():
        raise CorpusError(f"Corpus file {corpus_path} does not exist. Point [corpus] path at a Parquet file with a token_ids or text column.")
    pair = load_pair(
        cfg.models["base"], cfg.models["finetuned"], cfg.saes["base_sae"], cfg.saes.get("finetuned_sae"),
        hook=cfg.hook, min_matching_id_share=cfg.thresholds.min_matching_id_share, device=device, root=REPO_ROOT,
    )
    ctx = cfg.sample.context_size
    for label, model in (("base", pair.base), ("finetuned", pair.finetuned)):
        if ctx > model.cfg.n_ctx:
            raise ConfigError(f"[sample] context_size={ctx} exceeds the {label} model's context length n_ctx={model.cfg.n_ctx}.")
    vocab = min(pair.base.cfg.d_vocab, pair.finetuned.cfg.d_vocab)
    seqs, sources = read_corpus(corpus_path, ctx, pair.base.tokenizer)
    check_token_ids(seqs, vocab, corpus_path)
    sample = sample_sequences(seqs, sources, cfg.sample.n_sequences, cfg.sample.seed, corpus_path)
    special = sorted(set(get_special_token_ids(pair.base.tokenizer)) | set(get_special_token_ids(pair.finetuned.tokenizer)))
    names, codes = source_codes(sample.sources, cfg.evals.max_sources, corpus_path)
    twin = None
    if cfg.twin is not None:
        from explorer.models import check_sae_fits, load_sae

        twin = load_sae(cfg.saes[cfg.twin], device, REPO_ROOT)
        check_sae_fits(twin, pair.base, pair.hook, label=f"{cfg.twin} on the base model")
    return Prepared(cfg.with_hook(pair.hook), pair, sample, np.asarray(special, np.int64), device, input_fingerprints(cfg), twin, names, codes)


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

