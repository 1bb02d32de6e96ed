"""The features table's search (exact token, substring, RE2 regex, over top tokens and top-example
contexts), its both-dead filter, and formula-safe CSV (explorer/store.py; issue 13).

The search is checked against a brute-force reading of examples.parquet and vocab.parquet with
pandas and Python's `re` (patterns that mean the same in RE2 and in `re`).
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from explorer import store
from explorer.errors import RunError
from explorer.synthetic import make_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("search") / "synth", n_features=150, seed=31)


@pytest.fixture(scope="module")
def table(run_dir) -> store.FeatureTable:
    return store.FeatureTable.open(run_dir, "base_sae")


def _brute(run_dir: Path, sae: str = "base_sae") -> tuple[dict[int, list[str]], dict[int, list[str]], dict[int, list[list[str]]]]:
    """Per feature: its top tokens (the token at each top example's max), its top examples'
    window texts, and their windows as token lists."""
    vocab = store.vocab(run_dir)
    ex = pd.read_parquet(run_dir / "examples.parquet")
    ex = ex[(ex.sae == sae) & (ex.kind == "top")]
    tops, texts, windows = {}, {}, {}
    for r in ex.itertuples(index=False):
        toks = [vocab[int(i)] for i in r.token_ids]
        fid = int(r.feature_id)
        tops.setdefault(fid, []).append(toks[int(r.position) - int(r.window_start)])
        texts.setdefault(fid, []).append("".join(toks))
        windows.setdefault(fid, []).append(toks)
    return tops, texts, windows


def _ids(table: store.FeatureTable, **kw) -> list[int]:
    return sorted(int(i) for i in table.ids(store.FeatureFilter(**kw)))


@pytest.mark.parametrize("query", ["the", "def return", "<script>alert(1)</script>", "nothing-like-this"])
def test_exact_token_search(run_dir, table, query):
    tops, _, windows = _brute(run_dir)
    words = set(query.split())
    want = sorted(f for f, ts in tops.items() if any(t.strip() in words for t in ts))
    assert _ids(table, search=query, search_mode="exact") == want
    want_ctx = sorted(set(want) | {f for f, ws in windows.items() if any(t.strip() in words for w in ws for t in w)})
    assert _ids(table, search=query, search_mode="exact", search_contexts=True) == want_ctx
    if query == "def return":
        assert want, "the fixture should find the words"


@pytest.mark.parametrize("pattern", [r"^ ?(def|return)$", r"\d{2,}", r"[<>]", r"(?i)^ THE"])
def test_regex_search(run_dir, table, pattern):
    tops, texts, _ = _brute(run_dir)
    rx = re.compile(pattern)
    want = sorted(f for f, ts in tops.items() if any(rx.search(t) for t in ts))
    assert _ids(table, search=pattern, search_mode="regex") == want
    want_ctx = sorted(set(want) | {f for f, xs in texts.items() if any(rx.search(x) for x in xs)})
    assert _ids(table, search=pattern, search_mode="regex", search_contexts=True) == want_ctx


def test_substring_search_over_contexts(run_dir, table):
    _, texts, _ = _brute(run_dir)
    base = _ids(table, search="IMPORT")  # the top_tokens column, as before (case-insensitive)
    want = sorted(set(base) | {f for f, xs in texts.items() if any("import" in x.lower() for x in xs)})
    assert _ids(table, search="IMPORT", search_contexts=True) == want
    assert len(want) > len(base)


@pytest.mark.parametrize("bad,message", [("(unclosed", "missing )"), (r"(a)\1", "invalid escape"), ("x" * 201, "at most 200")])
def test_unusable_searches_are_explained(table, bad, message):
    with pytest.raises(store.SearchError, match=re.escape(message)):
        table.count(store.FeatureFilter(search=bad, search_mode="regex"))


def test_search_needs_the_in_memory_table(run_dir):
    with pytest.raises(ValueError, match="FeatureTable"):
        store.FeatureFilter(search="x", search_mode="exact").where("base_sae")
    with pytest.raises(store.SearchError, match="search index"):
        store.FeatureTable(pq.read_table(run_dir / "features.parquet", columns=list(store.TABLE_COLUMNS))).count(store.FeatureFilter(search="x", search_mode="exact"))


def test_both_dead_filter_in_memory_and_in_duckdb(run_dir, table):
    feats = pd.read_parquet(run_dir / "features.parquet")
    base = feats[feats.sae == "base_sae"]
    want = sorted(base[base.cross_class != "both_dead"].feature_id)
    assert (base.cross_class == "both_dead").any()
    flt = store.FeatureFilter(exclude_both_dead=True)
    assert _ids(table, exclude_both_dead=True) == want
    assert store.count_features(store.connect(), run_dir, "base_sae", flt) == len(want)
    h = store.histogram(store.connect(), run_dir, "base_sae", "act_error", 10, exclude_both_dead=True)
    assert h.attrs["n"] + h.attrs["n_nan"] == len(want)
    pts = store.scatter_sample(store.connect(), run_dir, "base_sae", exclude_both_dead=True)
    assert sorted(pts.feature_id) == want


def test_csv_cells_a_spreadsheet_would_run_are_text():
    df = pd.DataFrame({
        "feature_id": [1, 2, 3, 4, 5, 6, 7, 8],
        "score": [-0.5, 1.0, float("nan"), 2.0, -3.0, 0.0, 1.5, 2.5],
        "top_tokens": ["=HYPERLINK(\"http://x\")", "+ your", "-1+1", "@SUM(A1)", "\tx", "\rx", " the", None],
    })
    rows = list(csv.reader(io.StringIO(store.csv_bytes(df).decode())))
    assert rows[0] == ["feature_id", "score", "top_tokens"]
    cells = [r[2] for r in rows[1:]]
    assert cells == ["'=HYPERLINK(\"http://x\")", "'+ your", "'-1+1", "'@SUM(A1)", "'\tx", "'\rx", " the", ""]
    assert [r[1] for r in rows[1:]][:2] == ["-0.5", "1.0"]  # numbers stay numbers (a negative number is not a formula)
    raw = store.csv_bytes(df).decode()
    assert '"\'+ your"' in raw  # text cells are quoted


def test_features_csv_of_the_demo_run_quotes_formula_like_tokens():
    """The audit's example (the old demo's feature 372, top tokens beginning with '+'): every
    feature of the shipped run whose top tokens begin like a formula is written with a leading
    quote, and the run has such features (its Python source begins tokens with '+', '-', '=', '@')."""
    demo = Path(__file__).resolve().parent.parent / "data" / "runs" / "demo"
    ft = store.FeatureTable.open(demo, "base_sae")
    feats = pd.read_parquet(demo / "features.parquet", columns=["sae", "feature_id", "top_tokens", "cross_class"])
    feats = feats[(feats.sae == "base_sae") & (feats.cross_class != "both_dead")]
    starts = tuple(store.FORMULA_PREFIXES)
    risky = feats[feats.top_tokens.fillna("").str.startswith(starts)]
    assert len(risky) >= 5
    full = pd.read_csv(io.BytesIO(ft.csv()), keep_default_na=False)
    assert not any(v.startswith(starts) for v in full.top_tokens)
    got = full.set_index("feature_id").loc[risky.feature_id.tolist(), "top_tokens"]
    assert got.tolist() == ["'" + v for v in risky.top_tokens]


def test_invalid_utf8_vocab_is_a_run_error(tmp_path):
    run = make_run(tmp_path / "bad", n_features=10, seed=1)
    vals = [b"ok", b"\xff\xfe", b"fine"]
    offs = np.cumsum([0] + [len(v) for v in vals]).astype(np.int32)
    arr = pa.Array.from_buffers(pa.string(), 3, [None, pa.py_buffer(offs.tobytes()), pa.py_buffer(b"".join(vals))])
    pq.write_table(pa.table({"token_id": pa.array([0, 1, 2], pa.int32()), "token_str": arr}), run / "vocab.parquet")
    with pytest.raises(RunError, match="damaged.*vocab.parquet.*UTF-8"):
        store.vocab(run)


def test_in_memory_rows_and_matches_equal_the_file_queries(run_dir, table):
    """FeatureTable.rows and MatchesIndex (the feature page's neighbours and candidate matches,
    read without a file scan) answer what features_by_ids and candidate_matches answer."""
    con = store.connect()
    ids = [7, 3, 149, 0, 99999, 42]
    cols = ["feature_id", "density_base", "density_finetuned", "top_tokens"]
    want = store.features_by_ids(con, run_dir, "base_sae", ids, cols)
    got = table.rows(ids, cols)
    pd.testing.assert_frame_equal(got.reset_index(drop=True), want.reset_index(drop=True), check_dtype=False)
    mi = store.MatchesIndex.open(run_dir)
    for sae in ("base_sae", "finetuned_sae"):
        for fid in (0, 5, 17, 80, 149):
            for limit in (3, 10):
                want = store.candidate_matches(con, run_dir, sae, fid, limit)
                got = mi.candidates(sae, fid, limit)
                assert list(got.columns) == list(want.columns)
                pd.testing.assert_frame_equal(got.reset_index(drop=True), want.reset_index(drop=True), check_dtype=False)
    assert mi.candidates("base_sae", 10**6).empty
