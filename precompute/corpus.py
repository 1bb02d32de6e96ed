"""The token sample: read a corpus Parquet file and draw the run's sequences from it, deterministically.

A corpus is a Parquet file with either
  * `token_ids` (list<int>): each row with at least `context_size` tokens gives one sequence, its
    first `context_size` tokens, fed as they are (rows are expected to start with BOS, as the demo
    corpus does); shorter rows are skipped and counted; or
  * `text` (string): each row is tokenized with the base tokenizer, documents are joined with
    BOS and cut into sequences of [BOS] + (context_size - 1) tokens (the demo's packing).
An optional `source` column (string) labels every sequence (e.g. "english" / "python").

The sample is `n_tokens // context_size` sequences drawn without replacement by
`numpy.random.default_rng(seed).permutation`, in that (shuffled) order: seq_id i is the i-th drawn
sequence, and batch b holds seq_ids [b * batch_size, (b + 1) * batch_size). Every statistic of a
run, on both models, is computed on exactly this sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from explorer.errors import CorpusError

TOKEN_COLUMN = "token_ids"
TEXT_COLUMN = "text"
SOURCE_COLUMN = "source"


@dataclass
class TokenSample:
    tokens: np.ndarray  # [n_sequences, context_size] int32
    sources: list[str | None]  # per sequence
    corpus_rows: np.ndarray  # [n_sequences] the row (token_ids) or packed-sequence index (text) it came from

    @property
    def n_sequences(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def context_size(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.size)


def read_corpus(path: Path, context_size: int, tokenizer=None) -> tuple[np.ndarray, list[str | None]]:
    """All usable sequences of the corpus: ([n, context_size] int64, sources)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"Corpus file {path} does not exist. Point [corpus] path at a Parquet file with a token_ids or text column.")
    try:
        pfile = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise CorpusError(f"Corpus {path} is not a readable Parquet file ({exc}).") from None
    names = pfile.schema_arrow.names
    if TOKEN_COLUMN not in names and TEXT_COLUMN not in names:
        raise CorpusError(f"Corpus {path} has neither a {TOKEN_COLUMN!r} (list<int>) nor a {TEXT_COLUMN!r} (string) column; it has {names}.")
    if pfile.metadata.num_rows == 0:
        raise CorpusError(f"Corpus {path} is empty (0 rows).")
    has_source = SOURCE_COLUMN in names
    if TOKEN_COLUMN in names:
        table = pq.read_table(path, columns=[TOKEN_COLUMN] + ([SOURCE_COLUMN] if has_source else []))
        col = table.column(TOKEN_COLUMN).combine_chunks()
        if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)) or not pa.types.is_integer(col.type.value_type):
            raise CorpusError(f"Corpus {path}: column {TOKEN_COLUMN!r} must be a list of integers, got {col.type}.")
        if col.null_count:
            raise CorpusError(f"Corpus {path}: column {TOKEN_COLUMN!r} has {col.null_count} null rows.")
        lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False).astype(np.int64)
        offsets = col.offsets.to_numpy().astype(np.int64)
        values = col.values.to_numpy(zero_copy_only=False).astype(np.int64)
        rows = np.nonzero(lengths >= context_size)[0]
        if len(rows) == 0:
            raise CorpusError(
                f"Corpus {path} has no row with at least context_size={context_size} tokens "
                f"(longest: {int(lengths.max()) if len(lengths) else 0}). Lower [sample] context_size or use longer rows."
            )
        seqs = values[offsets[rows][:, None] + np.arange(context_size)[None, :]]
        sources = _sources(table, rows, has_source)
        return seqs, sources
    # text: tokenize and pack
    if tokenizer is None:
        raise CorpusError(f"Corpus {path} has only a {TEXT_COLUMN!r} column, which needs the base model's tokenizer.")
    table = pq.read_table(path, columns=[TEXT_COLUMN] + ([SOURCE_COLUMN] if has_source else []))
    texts = table.column(TEXT_COLUMN).to_pylist()
    srcs = table.column(SOURCE_COLUMN).to_pylist() if has_source else [None] * len(texts)
    bos = tokenizer.bos_token_id
    body = context_size - 1 if bos is not None else context_size
    seqs_list: list[list[int]] = []
    seq_sources: list[str | None] = []
    buf: list[int] = []
    buf_source: str | None = None
    for text, src in zip(texts, srcs):
        if not text:
            continue
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if buf_source != src:  # never mix two sources in one sequence
            buf, buf_source = [], src
        buf.extend(ids + ([bos] if bos is not None else []))
        while len(buf) >= body:
            seqs_list.append(([bos] if bos is not None else []) + buf[:body])
            seq_sources.append(src)
            buf = buf[body:]
    if not seqs_list:
        raise CorpusError(f"Corpus {path}: its texts give no complete sequence of {context_size} tokens.")
    return np.asarray(seqs_list, dtype=np.int64), seq_sources


def _sources(table, rows: np.ndarray, has_source: bool) -> list[str | None]:
    if not has_source:
        return [None] * len(rows)
    src = table.column(SOURCE_COLUMN).to_pylist()
    return [None if src[r] is None else str(src[r]) for r in rows]


def check_token_ids(seqs: np.ndarray, vocab_size: int, path: Path) -> None:
    bad = (seqs < 0) | (seqs >= vocab_size)
    if bad.any():
        i, j = map(int, np.argwhere(bad)[0])
        raise CorpusError(
            f"Corpus {path}: token id {int(seqs[i, j])} (sequence {i}, position {j}) is outside the models' vocabulary "
            f"of {vocab_size} tokens ({int(bad.sum())} such ids). The corpus was tokenized with another tokenizer; "
            "re-tokenize it, or give a text column."
        )


def sample_sequences(seqs: np.ndarray, sources: list[str | None], n_sequences: int, seed: int, path: Path) -> TokenSample:
    available = int(seqs.shape[0])
    if available == 0:
        raise CorpusError(f"Corpus {path} is empty.")
    ctx = int(seqs.shape[1])
    if n_sequences > available:
        raise CorpusError(
            f"[sample] n_tokens asks for {n_sequences} sequences of {ctx} tokens ({n_sequences * ctx:,} tokens), but the corpus "
            f"{path} has only {available} ({available * ctx:,} tokens). Lower n_tokens to at most {available * ctx} or use a larger corpus."
        )
    order = np.random.default_rng(seed).permutation(available)[:n_sequences]
    return TokenSample(tokens=seqs[order].astype(np.int32), sources=[sources[i] for i in order], corpus_rows=order.astype(np.int64))
