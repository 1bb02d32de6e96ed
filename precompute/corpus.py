"""The token sample: read a corpus and draw the run's sequences from it, deterministically.

A corpus is one of (`[corpus] format`, "auto" tells them apart by suffix and contents):
  * "parquet": a Parquet file;
  * "jsonl":   a JSON Lines file (.jsonl / .ndjson / .json), one JSON object per line;
  * "text":    a plain text file, or a folder of .txt/.md files (recursive, in sorted order): each file
               one document; in a folder, the file's first sub-folder is its source label
               (corpus/english/a.txt -> "english");
  * "datasets": a folder written by `datasets.Dataset.save_to_disk` (`datasets.load_from_disk`; a
               DatasetDict needs `[corpus] split` unless it has one split);
each row holding either
  * `token_ids` (or `input_ids`, list of ints): each row with at least `context_size` tokens gives
    one sequence, its first `context_size` tokens, fed as they are; rows are expected to start
    with BOS (the run warns, with a count, when some do not); shorter rows are skipped; or
  * `text` (string): tokenized with the base tokenizer (no special tokens), documents joined with
    BOS and cut into sequences of [BOS] + (context_size - 1) tokens. Each source is packed on its
    own (a sequence never mixes two sources, and interleaved labels lose nothing); the tokens left
    over at the end of each source (less than one sequence) are counted, not used.
An optional `source` column (string) labels every sequence (e.g. "english" / "python").
Skipped rows (empty or missing text, too-short token rows) are counted by reason, printed, and in
the manifest (`corpus`).

The sample is `n_tokens // context_size` sequences drawn without replacement by
`numpy.random.default_rng(seed).permutation`, in that (shuffled) order: seq_id i is the i-th drawn
sequence, and batch b holds seq_ids [b * batch_size, (b + 1) * batch_size). Every statistic of a
run, on both models, is computed on exactly this sample.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from explorer.errors import CorpusError

TOKEN_COLUMN = "token_ids"
TOKEN_COLUMNS = ("token_ids", "input_ids")
TEXT_COLUMN = "text"
SOURCE_COLUMN = "source"
TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")


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


@dataclass
class CorpusStats:
    """What reading the corpus did (the manifest's `corpus`)."""

    format: str
    column: str  # token_ids / input_ids / text
    n_rows: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> rows
    n_sequences_available: int = 0
    n_rows_without_bos: int | None = None  # token ids: rows whose first token is not BOS
    tokens_left_over: dict[str, int] = field(default_factory=dict)  # text: per source, after the last whole sequence
    warnings: list[str] = field(default_factory=list)

    @property
    def n_skipped(self) -> int:
        return int(sum(self.skipped.values()))

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format, "column": self.column, "n_rows": self.n_rows, "n_rows_skipped": self.n_skipped,
            "skipped": dict(self.skipped), "n_sequences_available": self.n_sequences_available,
            "n_rows_without_bos": self.n_rows_without_bos, "tokens_left_over": dict(self.tokens_left_over), "warnings": list(self.warnings),
        }

    def summary(self) -> str:
        parts = [f"{self.n_rows:,} rows ({self.format}, {self.column})", f"{self.n_sequences_available:,} sequences available"]
        if self.skipped:
            parts.append(f"{self.n_skipped:,} rows skipped (" + ", ".join(f"{n:,} {why}" for why, n in sorted(self.skipped.items())) + ")")
        if self.tokens_left_over:
            parts.append(f"{sum(self.tokens_left_over.values()):,} tokens left over at the ends of the sources")
        return "corpus: " + "; ".join(parts)


def detect_format(path: Path, fmt: str = "auto") -> str:
    path = Path(path)
    if not path.exists():
        raise CorpusError(f"Corpus file {path} does not exist. Point [corpus] path at a Parquet/JSONL/text file, a text folder or a datasets folder.")
    if fmt != "auto":
        return fmt
    if path.is_dir():
        if any((path / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
            return "datasets"
        return "text"
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix in TEXT_SUFFIXES:
        return "text"
    return "parquet"


def load_table(path: Path, fmt: str, split: str | None = None):
    """The corpus as an Arrow table (columns as stored), for any format."""
    import pyarrow as pa

    path = Path(path)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        if not path.is_file():
            raise CorpusError(f"Corpus {path} is not a file (format parquet).")
        try:
            return pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as exc:
            raise CorpusError(f"Corpus {path} is not a readable Parquet file ({exc}).") from None
    if fmt == "jsonl":
        return _jsonl_table(path)
    if fmt == "text":
        return _text_table(path)
    if fmt == "datasets":
        return _datasets_table(path, split)
    raise CorpusError(f"Unknown corpus format {fmt!r}.")


def _jsonl_table(path: Path):
    import pyarrow as pa

    rows: list[dict] = []
    try:
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise CorpusError(f"Corpus {path}, line {n}: not valid JSON ({exc.msg}).") from None
                if not isinstance(obj, dict):
                    raise CorpusError(f"Corpus {path}, line {n}: expected a JSON object with a text or token_ids field, got {type(obj).__name__}.")
                rows.append(obj)
    except UnicodeDecodeError:
        raise CorpusError(f"Corpus {path} is not UTF-8 text.") from None
    if not rows:
        return pa.table({})
    names = [c for c in (*TOKEN_COLUMNS, TEXT_COLUMN, SOURCE_COLUMN) if any(c in r for r in rows)]
    cols = {}
    for c in names:
        values = [r.get(c) for r in rows]
        if c in TOKEN_COLUMNS:
            bad = next((i for i, v in enumerate(values) if v is not None and not (isinstance(v, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in v))), None)
            if bad is not None:
                raise CorpusError(f"Corpus {path}, row {bad + 1}: {c} must be a list of integers.")
            cols[c] = pa.array(values, pa.list_(pa.int64()))
        else:
            cols[c] = pa.array([None if v is None else str(v) for v in values], pa.string())
    return pa.table(cols)


def _text_table(path: Path):
    import pyarrow as pa

    if path.is_file():
        files, sources = [path], [None]
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        sources = [p.relative_to(path).parts[0] if len(p.relative_to(path).parts) > 1 else None for p in files]
        if not files:
            raise CorpusError(f"Corpus folder {path} has no .txt or .md files (and is not a datasets folder).")
    texts = []
    for p in files:
        try:
            texts.append(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise CorpusError(f"Corpus file {p} is not UTF-8 text.") from None
    return pa.table({TEXT_COLUMN: pa.array(texts, pa.string()), SOURCE_COLUMN: pa.array(sources, pa.string())})


def _datasets_table(path: Path, split: str | None):
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise CorpusError(f"Corpus {path} is not a datasets folder that datasets.load_from_disk reads ({exc}).") from None
    if isinstance(ds, datasets.DatasetDict):
        if split is None:
            if len(ds) != 1:
                raise CorpusError(f"Corpus {path} holds the splits {sorted(ds)}; name one with [corpus] split.")
            split = next(iter(ds))
        if split not in ds:
            raise CorpusError(f"Corpus {path} has no split {split!r}; it has {sorted(ds)}.")
        ds = ds[split]
    keep = [c for c in (*TOKEN_COLUMNS, TEXT_COLUMN, SOURCE_COLUMN) if c in ds.column_names]
    if not keep:
        raise CorpusError(f"Corpus {path} has neither a 'token_ids'/'input_ids' nor a 'text' column; it has {ds.column_names}.")
    return ds.select_columns(keep).flatten_indices().data.table


def read_corpus(path: Path, context_size: int, tokenizer=None, fmt: str = "auto", split: str | None = None) -> tuple[np.ndarray, list[str | None]]:
    """All usable sequences of the corpus: ([n, context_size] int64, sources)."""
    seqs, sources, _ = read_corpus_with_stats(path, context_size, tokenizer, fmt, split)
    return seqs, sources


def read_corpus_with_stats(path: Path, context_size: int, tokenizer=None, fmt: str = "auto", split: str | None = None):
    """(sequences [n, context_size] int64, sources, CorpusStats)."""
    path = Path(path)
    fmt = detect_format(path, fmt)
    table = load_table(path, fmt, split)
    names = table.schema.names
    token_col = next((c for c in TOKEN_COLUMNS if c in names), None)
    if table.num_rows == 0:
        raise CorpusError(f"Corpus {path} is empty (0 rows).")
    if token_col is None and TEXT_COLUMN not in names:
        raise CorpusError(f"Corpus {path} has neither a {TOKEN_COLUMN!r} (list<int>) nor a {TEXT_COLUMN!r} (string) column; it has {names}.")
    stats = CorpusStats(format=fmt, column=token_col or TEXT_COLUMN, n_rows=int(table.num_rows))
    if SOURCE_COLUMN in names:
        src = [None if s is None else str(s) for s in table.column(SOURCE_COLUMN).to_pylist()]
    else:
        src = [None] * table.num_rows
    if token_col is not None:
        seqs, sources = _token_rows(path, table.column(token_col), token_col, src, context_size, tokenizer, stats)
    else:
        if tokenizer is None:
            raise CorpusError(f"Corpus {path} has only a {TEXT_COLUMN!r} column, which needs the base model's tokenizer.")
        seqs, sources = _pack_texts(path, table.column(TEXT_COLUMN).to_pylist(), src, context_size, tokenizer, stats)
    stats.n_sequences_available = int(seqs.shape[0])
    return seqs, sources, stats


def _token_rows(path: Path, col, name: str, src: list, context_size: int, tokenizer, stats: CorpusStats):
    import pyarrow as pa
    import pyarrow.compute as pc

    col = col.combine_chunks()
    if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)) or not pa.types.is_integer(col.type.value_type):
        raise CorpusError(f"Corpus {path}: column {name!r} must be a list of integers, got {col.type}.")
    if col.null_count:
        raise CorpusError(f"Corpus {path}: column {name!r} has {col.null_count} null rows.")
    lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False).astype(np.int64)
    offsets = col.offsets.to_numpy().astype(np.int64)
    values = col.values.to_numpy(zero_copy_only=False).astype(np.int64)
    rows = np.nonzero(lengths >= context_size)[0]
    if len(rows) < len(lengths):
        stats.skipped[f"shorter than context_size={context_size}"] = int(len(lengths) - len(rows))
    if len(rows) == 0:
        raise CorpusError(
            f"Corpus {path} has no row with at least context_size={context_size} tokens "
            f"(longest: {int(lengths.max()) if len(lengths) else 0}). Lower [sample] context_size or use longer rows."
        )
    seqs = values[offsets[rows][:, None] + np.arange(context_size)[None, :]]
    bos = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
    if bos is not None:
        no_bos = int((seqs[:, 0] != bos).sum())
        stats.n_rows_without_bos = no_bos
        if no_bos:
            stats.warnings.append(
                f"{no_bos:,} of {len(rows):,} token_ids rows do not start with BOS (id {bos}); they are fed as they are "
                "(the text path prepends BOS; models and SAEs are usually trained with it)."
            )
    return seqs, [src[r] for r in rows]


def _pack_texts(path: Path, texts: list, src: list, context_size: int, tokenizer, stats: CorpusStats):
    bos = tokenizer.bos_token_id
    body = context_size - 1 if bos is not None else context_size
    head = [bos] if bos is not None else []
    seqs_list: list[list[int]] = []
    seq_sources: list[str | None] = []
    buffers: dict[str | None, list[int]] = {}  # one per source: labels may interleave row by row
    totals: Counter = Counter()
    skipped: Counter = Counter()
    for text, s in zip(texts, src):
        if text is None:
            skipped["missing text"] += 1
            continue
        if not str(text).strip():
            skipped["empty text"] += 1
            continue
        ids = tokenizer(str(text), add_special_tokens=False)["input_ids"]
        buf = buffers.setdefault(s, [])
        buf.extend(ids + head)
        totals[s] += len(ids)
        while len(buf) >= body:
            seqs_list.append(head + buf[:body])
            seq_sources.append(s)
            del buf[:body]
    stats.skipped.update(skipped)
    stats.tokens_left_over = {str(s): len(b) for s, b in buffers.items() if b}
    if not seqs_list:
        per_source = ", ".join(f"{s if s is not None else 'unlabelled'}: {n:,}" for s, n in totals.items()) or "none"
        raise CorpusError(
            f"Corpus {path}: its texts give no complete sequence of {context_size} tokens (tokens per source: {per_source}; "
            f"{sum(skipped.values())} rows skipped as empty). A sequence holds the tokens of one source only: use more or "
            "longer texts per source, or lower [sample] context_size."
        )
    return np.asarray(seqs_list, dtype=np.int64), seq_sources


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
