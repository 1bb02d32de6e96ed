"""Corpora (precompute/corpus.py): every format gives the sequences a naive packing gives; labels
that change row by row lose nothing; skipped rows are counted; odd inputs fail clearly."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from explorer.errors import CorpusError
from precompute.corpus import read_corpus, read_corpus_with_stats

CTX = 16
DOCS = [
    ("english", "The quick brown fox jumps over the lazy dog, again and again, until the dog wakes up."),
    ("python", "def f(x):\n    return x + 1\n\nclass A:\n    pass\n"),
    ("english", "A café in Köln serves naïve crème brûlée to a crowd of parser authors."),
    ("python", "for i in range(10):\n    print(i * i)\n"),
    ("english", ""),
    ("python", "import os\nprint(os.getcwd())\n" * 3),
]


@pytest.fixture(scope="module")
def tok(hf_models):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(hf_models.gpt2["base"]), local_files_only=True)


def naive_pack(tok, docs, ctx):
    """Reference: each source's documents joined with BOS, cut into [BOS] + (ctx - 1) tokens."""
    bos = tok.bos_token_id
    out, left = [], {}
    for source in dict.fromkeys(s for s, _ in docs):
        buf = []
        for s, text in docs:
            if s == source and text:
                buf += tok(text, add_special_tokens=False)["input_ids"] + [bos]
        n = len(buf) // (ctx - 1)
        out += [(source, [bos] + buf[i * (ctx - 1) : (i + 1) * (ctx - 1)]) for i in range(n)]
        left[source] = len(buf) - n * (ctx - 1)
    return out, left


def _by_source(seqs, sources):
    return sorted((s, list(map(int, q))) for s, q in zip(sources, seqs))


def write_all_formats(tmp_path, docs):
    paths = {}
    pq.write_table(pa.table({"source": [s for s, _ in docs], "text": [t for _, t in docs]}), tmp_path / "c.parquet")
    paths["parquet"] = tmp_path / "c.parquet"
    with open(tmp_path / "c.jsonl", "w") as fh:
        for s, t in docs:
            fh.write(json.dumps({"text": t, "source": s}) + "\n")
    paths["jsonl"] = tmp_path / "c.jsonl"
    folder = tmp_path / "texts"
    for i, (s, t) in enumerate(docs):
        (folder / s).mkdir(parents=True, exist_ok=True)
        (folder / s / f"{i:03d}.txt").write_text(t)
    paths["text"] = folder
    import datasets

    datasets.Dataset.from_dict({"text": [t for _, t in docs], "source": [s for s, _ in docs]}).save_to_disk(str(tmp_path / "ds"))
    paths["datasets"] = tmp_path / "ds"
    return paths


def test_every_format_packs_each_source_like_the_naive_reference(tok, tmp_path):
    want, left = naive_pack(tok, DOCS, CTX)
    for fmt, path in write_all_formats(tmp_path, DOCS).items():
        seqs, sources, stats = read_corpus_with_stats(path, CTX, tok)
        assert stats.format == fmt
        assert _by_source(seqs, sources) == sorted(want), fmt
        assert (seqs[:, 0] == tok.bos_token_id).all()
        assert stats.tokens_left_over == {k: v for k, v in left.items() if v}
        assert stats.skipped == {"empty text": 1}, fmt  # the empty document (a row, or an empty file)


def test_labels_changing_row_by_row_lose_nothing(tok, tmp_path):
    """Alternating labels used to reset the packing buffer at every row: 'no complete sequence'."""
    docs = [("a" if i % 2 else "b", f"Sentence number {i} is here.") for i in range(40)]
    path = tmp_path / "alt.parquet"
    pq.write_table(pa.table({"source": [s for s, _ in docs], "text": [t for _, t in docs]}), path)
    seqs, sources = read_corpus(path, CTX, tok)
    want, left = naive_pack(tok, docs, CTX)
    assert _by_source(seqs, sources) == sorted(want) and {"a", "b"} == set(sources)
    total = sum(len(tok(t, add_special_tokens=False)["input_ids"]) + 1 for _, t in docs)
    assert len(seqs) * (CTX - 1) + sum(left.values()) == total  # every token is in a sequence or counted as left over


def test_too_little_text_says_why(tok, tmp_path):
    path = tmp_path / "short.parquet"
    pq.write_table(pa.table({"source": ["a", "b", "a"], "text": ["hi", "yo", ""]}), path)
    with pytest.raises(CorpusError, match=r"no complete sequence of 16 tokens \(tokens per source: a: \d+, b: \d+; 1 rows skipped as empty\)\. A sequence holds the tokens of one source only"):
        read_corpus(path, CTX, tok)


def test_token_rows_skipped_and_without_bos_are_counted(tok, tmp_path):
    bos = tok.bos_token_id
    rows = [[bos] + [5] * (CTX - 1), [7] * CTX, [bos, 1, 2], [8] * (CTX + 3)]
    path = tmp_path / "ids.jsonl"
    path.write_text("".join(json.dumps({"input_ids": r, "source": "x"}) + "\n" for r in rows))
    seqs, sources, stats = read_corpus_with_stats(path, CTX, tok)
    assert seqs.tolist() == [rows[0], rows[1], rows[3][:CTX]]
    assert stats.column == "input_ids" and stats.skipped == {f"shorter than context_size={CTX}": 1}
    assert stats.n_rows_without_bos == 2 and "2 of 3 token_ids rows do not start with BOS" in stats.warnings[0]
    assert stats.to_dict()["n_rows_skipped"] == 1 and "1 rows skipped" in stats.summary()


def test_bad_inputs_fail_clearly(tok, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(CorpusError, match="line 2: not valid JSON"):
        read_corpus(bad, CTX, tok)
    ids = tmp_path / "ids.jsonl"
    ids.write_text('{"token_ids": [1, "two"]}\n')
    with pytest.raises(CorpusError, match="token_ids must be a list of integers"):
        read_corpus(ids, CTX, tok)
    import datasets

    dd = datasets.DatasetDict({s: datasets.Dataset.from_dict({"text": ["x " * 50]}) for s in ("train", "test")})
    dd.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(CorpusError, match=r"holds the splits \['test', 'train'\]; name one with \[corpus\] split"):
        read_corpus(tmp_path / "dd", CTX, tok)
    seqs, _ = read_corpus(tmp_path / "dd", CTX, tok, split="test")
    assert len(seqs) >= 1
    empty_dir = tmp_path / "nothing"
    empty_dir.mkdir()
    with pytest.raises(CorpusError, match="has no .txt or .md files"):
        read_corpus(empty_dir, CTX, tok)
