"""Read-only queries over one run directory.

Pure functions `(con, run_dir, ...) -> pandas.DataFrame | dict`: `con` is a DuckDB connection
or cursor (`connect()`; the app keeps one per run and takes a `.cursor()` per query), and
`run_dir` is a validated run directory (explorer.rundir.open_run). SQL is parameterised; the
only identifiers spliced into SQL come from whitelists built from explorer/schema.py. Nothing
is written, and opening a store creates nothing on disk.

* The features table is paged in DuckDB (filters, ORDER BY, LIMIT/OFFSET pushed down), so a
  page never ships the whole table.
* One feature's examples are read by row-group pruning: `ExamplesIndex` reads the parquet
  footer once, keeps each row group's (sae, feature_id) ranges, and reads only the row groups
  that can hold the requested features (examples.parquet is sorted by (sae, feature_id)).
* `connect()` sets `parquet_can_have_nan` (see there): without it DuckDB 2.0 answers NaN
  filters wrongly on pyarrow-written files.
* Floating NaN (e.g. act_similarity of a constant feature) is treated as missing in filters,
  sorts and statistics: DuckDB orders NaN above every number, so every numeric column goes
  through `_nan_null` first.
* Search (`FeatureFilter.search`): a substring of the top tokens (in DuckDB or FeatureTable), or,
  in FeatureTable with its `SearchIndex`, an exact token, a substring or an RE2 regular
  expression over each top token and over each top example's context window.
* CSV (`csv_bytes`): text cells that a spreadsheet would run as a formula are written as text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from explorer import schema
from explorer.errors import ExplorerError, RunError

LOG_DENSITY_EPS = 1e-10  # METHODS.md section 3: plot log10(density + 1e-10)

FEATURES_FILE = "features.parquet"
FEATURES_BY_SOURCE_FILE = "features_by_source.parquet"
EXAMPLES_FILE = "examples.parquet"
MATCHES_FILE = "matches.parquet"

_FEATURE_COLUMNS = set(schema.FEATURES.names)
_FLOAT_COLUMNS = {f.name for f in schema.FEATURES if pa.types.is_floating(f.type)}

# The columns of the features table view (no list columns: they stay on disk).
TABLE_COLUMNS = (
    "feature_id",
    "status_base",
    "status_finetuned",
    "cross_class",
    "density_base",
    "density_finetuned",
    "max_act_base",
    "max_act_finetuned",
    "mean_active_act_base",
    "mean_active_act_finetuned",
    "act_similarity",
    "act_error",
    "logit_similarity",
    "match_feature_id",
    "match_score",
    "change_class",
    "q_value",
    "log_density_ratio",
    "delta_mean_active_act",
    "logit_effect_max_abs",
    "kl_corr",
    "top_tokens",
)
SORTABLE = tuple(c for c in TABLE_COLUMNS if c not in ("top_tokens", "change_class"))


def connect():
    """A fresh in-memory DuckDB connection (reads parquet; writes nothing)."""
    import duckdb

    con = duckdb.connect(":memory:")
    # GLOBAL: a plain SET is local to one connection, and `.cursor()` opens another one.
    con.execute("SET enable_progress_bar = false")
    # pyarrow writes min/max statistics that exclude NaN and no nan_count; without this DuckDB
    # assumes such columns hold no NaN and prunes/folds `isnan(x)` to false (wrong answers).
    con.execute("SET GLOBAL parquet_can_have_nan = true")
    con.execute("SET GLOBAL parquet_metadata_cache = true")
    return con


def _path(run_dir: Path | str, name: str) -> str:
    if name not in schema.TABLES:
        raise ValueError(f"unknown table {name!r}")
    return str(Path(run_dir) / name)


def has_table(run_dir: Path | str, name: str) -> bool:
    return (Path(run_dir) / name).exists()


def _feats(run_dir: Path | str, source: str | None = None) -> tuple[str, list[Any]]:
    """The FROM clause (and its parameters) of the features table: features.parquet, or with a
    `source` its rows with the per-source columns (schema.PER_SOURCE_COLUMNS) replaced by that
    source's values from features_by_source.parquet (every other column stays pooled)."""
    if source is None:
        return "read_parquet(?)", [_path(run_dir, FEATURES_FILE)]
    cols = ", ".join(f"s.{c} AS {c}" for c in schema.PER_SOURCE_COLUMNS)
    sql = (
        f"(SELECT f.* REPLACE ({cols}) FROM read_parquet(?) f "
        "JOIN (SELECT * FROM read_parquet(?) WHERE source = ?) s USING (sae, feature_id))"
    )
    return sql, [_path(run_dir, FEATURES_FILE), _path(run_dir, FEATURES_BY_SOURCE_FILE), str(source)]


def _nan_null(col: str) -> str:
    if col not in _FEATURE_COLUMNS:
        raise ValueError(f"unknown column {col!r}")
    return f"(CASE WHEN isnan({col}) THEN NULL ELSE {col} END)" if col in _FLOAT_COLUMNS else col


def _df(con, sql: str, params: Sequence[Any] = ()) -> pd.DataFrame:
    return con.execute(sql, list(params)).df()


# ---------------------------------------------------------------------------- small tables


def _vocab_table(run_dir: Path | str, columns: list[str]) -> pa.Table:
    """vocab.parquet's columns, checked: a token string that is not valid UTF-8 (a file changed
    after its checksum was written, or written by a broken tool) is a RunError that says the run
    is damaged."""
    t = pq.read_table(_path(run_dir, "vocab.parquet"), columns=columns)
    try:
        t.validate(full=True)  # checks UTF-8; reading alone does not
    except pa.ArrowInvalid:
        raise RunError(
            f"Run {Path(run_dir).name!r} is damaged: vocab.parquet holds token strings that are not valid UTF-8 "
            "(the file was changed or written by a broken tool). Re-run its precompute."
        ) from None
    return t


def vocab(run_dir: Path | str) -> list[str]:
    """Token strings indexed by token id (missing ids -> ''). Unescaped: escape before HTML."""
    t = _vocab_table(run_dir, ["token_id", "token_str"])
    ids = t.column("token_id").to_numpy()
    strs = t.column("token_str").to_pylist()
    out = [""] * (int(ids.max()) + 1 if len(ids) else 0)
    for i, s in zip(ids.tolist(), strs):
        out[i] = "" if s is None else s
    return out


def vocab_forms(run_dir: Path | str):
    """The vocabulary with raw pieces and bytes (explorer.tokens.Vocab: grouped window display, hover titles)."""
    from explorer.tokens import Vocab

    t = _vocab_table(run_dir, ["token_id", "token_str", "token_piece", "token_bytes"])
    ids = t.column("token_id").to_numpy()
    n = int(ids.max()) + 1 if len(ids) else 0
    strs, pieces, raw = [""] * n, [""] * n, [None] * n
    for i, s, p, b in zip(ids.tolist(), t.column("token_str").to_pylist(), t.column("token_piece").to_pylist(), t.column("token_bytes").to_pylist()):
        strs[i], pieces[i], raw[i] = s or "", p or "", b
    return Vocab(strs, pieces, raw)


def metrics(con, run_dir: Path | str, source: str | None = None) -> pd.DataFrame:
    """SAE quality per (sae, model, outliers): pooled, or on one source's tokens (metrics_by_source.parquet)."""
    if source is None:
        return _df(con, "SELECT * FROM read_parquet(?) ORDER BY sae, model, outliers", [_path(run_dir, "metrics.parquet")])
    return _df(con, "SELECT * EXCLUDE (source) FROM read_parquet(?) WHERE source = ? ORDER BY sae, model, outliers", [_path(run_dir, "metrics_by_source.parquet"), str(source)])


def resid_position(con, run_dir: Path | str) -> pd.DataFrame:
    return _df(con, "SELECT * FROM read_parquet(?) ORDER BY position", [_path(run_dir, "resid_position.parquet")])


def resid_histograms(con, run_dir: Path | str) -> pd.DataFrame:
    return _df(con, "SELECT * FROM read_parquet(?) ORDER BY metric, bin_left", [_path(run_dir, "resid_histograms.parquet")])


def resid_summary(con, run_dir: Path | str) -> pd.DataFrame:
    return _df(con, "SELECT * FROM read_parquet(?) ORDER BY metric", [_path(run_dir, "resid_summary.parquet")])


def sequences(con, run_dir: Path | str, limit: int = 200, offset: int = 0) -> pd.DataFrame:
    """Sequences of the run's token sample (seq_id, source, token_ids), paged."""
    return _df(con, "SELECT seq_id, source, token_ids FROM read_parquet(?) ORDER BY seq_id LIMIT ? OFFSET ?", [_path(run_dir, "tokens.parquet"), int(limit), int(offset)])


# ---------------------------------------------------------------------------- counts


def status_counts(con, run_dir: Path | str, source: str | None = None) -> pd.DataFrame:
    """Features per (sae, model, status)."""
    rel, rp = _feats(run_dir, source)
    parts = " UNION ALL ".join(f"SELECT sae, '{m}' AS model, status_{m} AS status FROM f" for m in schema.MODELS)
    sql = f"WITH f AS (SELECT sae, status_base, status_finetuned FROM {rel}) SELECT sae, model, status, count(*) AS n FROM ({parts}) GROUP BY ALL ORDER BY ALL"
    return _df(con, sql, rp)


def cross_class_counts(con, run_dir: Path | str, sae: str = "base_sae", source: str | None = None) -> dict[str, int]:
    rel, rp = _feats(run_dir, source)
    rows = con.execute(f"SELECT cross_class, count(*) FROM {rel} WHERE sae = ? GROUP BY 1", [*rp, sae]).fetchall()
    out = {c: 0 for c in schema.CROSS_CLASSES}
    out.update({k: int(v) for k, v in rows if k is not None})
    return out


# born: a finetuned_sae feature alive on the finetuned model whose best match in base_sae
# scores below the threshold; lost: a base_sae feature alive on the base model whose best match
# in finetuned_sae scores below it. A missing/NaN score counts as no match.
_BORN_LOST = {
    "born": ("finetuned_sae", "status_finetuned"),
    "lost": ("base_sae", "status_base"),
}


def _born_lost_where(which: str) -> tuple[str, str]:
    if which not in _BORN_LOST:
        raise ValueError(f"which must be one of {sorted(_BORN_LOST)}")
    sae, status = _BORN_LOST[which]
    return sae, f"sae = ? AND {status} <> 'dead' AND coalesce({_nan_null('match_score')}, -1e300) < ?"


def born_lost_counts(con, run_dir: Path | str, threshold: float) -> dict[str, int]:
    out = {}
    for which in _BORN_LOST:
        sae, where = _born_lost_where(which)
        out[which] = int(con.execute(f"SELECT count(*) FROM read_parquet(?) WHERE {where}", [_path(run_dir, FEATURES_FILE), sae, float(threshold)]).fetchone()[0])
    return out


# ---------------------------------------------------------------------------- features table


SEARCH_MODES = ("substring", "exact", "regex")
MAX_SEARCH_CHARS = 200


class SearchError(ExplorerError):
    """A search the features table cannot run (an invalid or too long regular expression)."""


@dataclass(frozen=True)
class FeatureFilter:
    """Filters of the features table. Empty tuples mean "any"; None bounds mean unbounded.

    Density bounds are on log10(density + 1e-10) of `density_model`. Similarity bounds apply to
    act_similarity; features whose similarity is NaN (constant on one model) are kept only if
    `include_nan_similarity`. `exclude_both_dead` drops the features dead on both models.

    Search: `search_mode` "substring" (the default) matches `search` case-insensitively as a
    substring of the top-example tokens; "exact" matches features whose top token (with
    surrounding whitespace stripped) equals one of the space-separated words of `search`; "regex"
    matches an RE2 regular expression (no back-references or look-arounds; linear time) against
    each top token. With `search_contexts`, each top example's context window (its tokens joined
    as text) is searched too. Only "substring" without contexts runs in DuckDB (`where`); the
    rest needs FeatureTable and its SearchIndex.
    """

    status_base: tuple[str, ...] = ()
    status_finetuned: tuple[str, ...] = ()
    cross_class: tuple[str, ...] = ()
    change_class: tuple[str, ...] = ()
    density_model: str = "base"
    log_density_min: float | None = None
    log_density_max: float | None = None
    similarity_min: float | None = None
    similarity_max: float | None = None
    include_nan_similarity: bool = True
    search: str = ""
    search_mode: str = "substring"
    search_contexts: bool = False
    exclude_both_dead: bool = False

    def searching(self) -> bool:
        return bool(self.search.strip())

    def where(self, sae: str) -> tuple[str, list[Any]]:
        if self.searching() and (self.search_mode != "substring" or self.search_contexts):
            raise ValueError("exact-token, regex and context search run in FeatureTable (its SearchIndex), not in DuckDB")
        if self.search_mode not in SEARCH_MODES:
            raise ValueError(f"search_mode must be one of {SEARCH_MODES}")
        clauses, params = ["sae = ?"], [sae]
        if self.exclude_both_dead:
            clauses.append("cross_class IS DISTINCT FROM 'both_dead'")
        for col, values, allowed in (
            ("status_base", self.status_base, schema.STATUSES),
            ("status_finetuned", self.status_finetuned, schema.STATUSES),
            ("cross_class", self.cross_class, schema.CROSS_CLASSES),
            ("change_class", self.change_class, schema.CHANGE_CLASSES),
        ):
            if values:
                vals = [v for v in values if v in allowed]
                clauses.append(f"{col} IN ({', '.join('?' * len(vals))})" if vals else "FALSE")
                params += vals
        if self.density_model not in schema.MODELS:
            raise ValueError(f"density_model must be one of {schema.MODELS}")
        logd = f"log10(density_{self.density_model} + {LOG_DENSITY_EPS})"
        if self.log_density_min is not None:
            clauses.append(f"{logd} >= ?")
            params.append(float(self.log_density_min))
        if self.log_density_max is not None:
            clauses.append(f"{logd} <= ?")
            params.append(float(self.log_density_max))
        sim = _nan_null("act_similarity")
        bounds = []
        if self.similarity_min is not None:
            bounds.append(f"{sim} >= ?")
            params.append(float(self.similarity_min))
        if self.similarity_max is not None:
            bounds.append(f"{sim} <= ?")
            params.append(float(self.similarity_max))
        if bounds:
            cond = " AND ".join(bounds)
            clauses.append(f"(({cond}) OR {sim} IS NULL)" if self.include_nan_similarity else f"({cond})")
        elif not self.include_nan_similarity:
            clauses.append(f"{sim} IS NOT NULL")
        if self.search.strip():
            clauses.append("contains(lower(coalesce(top_tokens, '')), lower(?))")
            params.append(self.search.strip())
        return " AND ".join(clauses), params


def _order(sort_by: str, descending: bool) -> str:
    if sort_by not in SORTABLE:
        raise ValueError(f"cannot sort by {sort_by!r}; choose one of {SORTABLE}")
    direction = "DESC" if descending else "ASC"
    tie = "" if sort_by == "feature_id" else ", feature_id ASC"
    return f"{_nan_null(sort_by)} {direction} NULLS LAST{tie}"


def count_features(con, run_dir: Path | str, sae: str, flt: FeatureFilter = FeatureFilter(), source: str | None = None) -> int:
    where, params = flt.where(sae)
    rel, rp = _feats(run_dir, source)
    return int(con.execute(f"SELECT count(*) FROM {rel} WHERE {where}", [*rp, *params]).fetchone()[0])


def features_page(
    con,
    run_dir: Path | str,
    sae: str,
    flt: FeatureFilter = FeatureFilter(),
    sort_by: str = "feature_id",
    descending: bool = False,
    limit: int = 50,
    offset: int = 0,
    columns: Sequence[str] = TABLE_COLUMNS,
    source: str | None = None,
) -> pd.DataFrame:
    """One page of the filtered, sorted features table (the per-source columns of `source`, if given).

    Two steps: DuckDB filters, sorts and pages the feature ids alone (LIMIT/OFFSET), then the
    page's rows are read by id (row-group pruning). Sorting whole rows (top_tokens strings
    included) made deep pages slow: B4, 1M features, offset 100k: 1.2 s -> 0.36 s.
    """
    cols = [c for c in columns if c in _FEATURE_COLUMNS]
    where, params = flt.where(sae)
    rel, rp = _feats(run_dir, source)
    sql = f"SELECT feature_id FROM {rel} WHERE {where} ORDER BY {_order(sort_by, descending)} LIMIT ? OFFSET ?"
    ids = [int(r[0]) for r in con.execute(sql, [*rp, *params, max(0, int(limit)), max(0, int(offset))]).fetchall()]
    if not ids:
        return _empty_features(cols)
    page = features_by_ids(con, run_dir, sae, ids, cols)[cols]
    per = [c for c in cols if c in schema.PER_SOURCE_COLUMNS]
    if source is not None and per:  # the per-source values of the page's rows
        by = feature_by_source(run_dir, sae, ids, source).set_index("feature_id").reindex(ids)
        for c in per:
            page[c] = by[c].to_numpy()
    return page


class FeatureTable:
    """The features table of one SAE in memory: counts and pages filters without a scan on disk.

    What the features-table page runs on. Holds the table columns (TABLE_COLUMNS; statuses as
    dictionary codes) of one SAE, about 140 MB at 1M features, read once per run. Answers
    exactly what `count_features` / `features_page` answer in DuckDB (same filters, NaN as
    missing, NULLS LAST, ties by feature_id; tests compare the two on every filter/sort), but
    from numpy: a filter is a boolean mask (the last few are kept, so paging through one filter
    evaluates it once), a sort is an argsort computed on the first use of (column, direction)
    and kept. B4 at 1M features: DuckDB's count + page p95 was 336 ms on an idle machine.
    Thread-safe: the app shares one per (run, SAE) between sessions.
    """

    MAX_MASKS = 16

    def __init__(self, table: pa.Table):
        import threading

        self._lock = threading.Lock()
        self.table = table
        self.n = table.num_rows
        self.feature_id = table.column("feature_id").to_numpy().astype(np.int64)
        if self.n and np.any(np.diff(self.feature_id) < 0):  # keep rows in feature_id order: stable sorts then break ties by id
            self.table = table = table.take(pa.array(np.argsort(self.feature_id, kind="stable")))
            self.feature_id = table.column("feature_id").to_numpy().astype(np.int64)
        self._codes: dict[str, tuple[np.ndarray, list[str]]] = {}
        for col in ("status_base", "status_finetuned", "cross_class", "change_class"):
            if col not in table.column_names:  # a table of fewer columns (tests); its filter then keeps nothing
                self._codes[col] = (np.full(self.n, -1, np.int64), [])
                continue
            d = table.column(col).combine_chunks().dictionary_encode()
            codes = pc.fill_null(d.indices, -1).to_numpy().astype(np.int64)  # -1: NULL
            self._codes[col] = (codes, d.dictionary.to_pylist())
        self._lower_tokens = None
        self._floats: dict[str, np.ndarray] = {}
        self._orders: dict[tuple[str, bool], np.ndarray] = {}
        self._masks: dict[FeatureFilter, np.ndarray | None] = {}
        self.run_dir: Path | None = None  # set by open(): where the SearchIndex is built from
        self.sae: str | None = None
        self._search: SearchIndex | None = None

    @classmethod
    def open(cls, run_dir: Path | str, sae: str, source: str | None = None) -> "FeatureTable":
        """Read one SAE's table columns (row groups of other SAEs are skipped by their statistics);
        with `source`, the per-source columns hold that source's values (features_by_source.parquet)."""
        cols = [c for c in TABLE_COLUMNS if c in _FEATURE_COLUMNS]
        idx = features_index(run_dir)
        groups = [g for g, (lo, hi) in enumerate(zip(idx.sae_min, idx.sae_max)) if lo <= sae <= hi]
        t = pq.ParquetFile(idx.path, metadata=idx.metadata).read_row_groups(groups, columns=[*cols, "sae"])
        if any(not (idx.sae_min[g] == idx.sae_max[g] == sae) for g in groups):  # a row group holding another SAE too
            t = t.filter(pc.equal(t.column("sae"), sae))
        t = t.select(cols)
        if source is not None:
            t = t.sort_by("feature_id")
            per = [c for c in cols if c in schema.PER_SOURCE_COLUMNS]
            bs = pq.read_table(_path(run_dir, FEATURES_BY_SOURCE_FILE), columns=["feature_id", *per], filters=[("sae", "=", sae), ("source", "=", str(source))]).sort_by("feature_id")
            if bs.num_rows != t.num_rows:
                raise ValueError(f"source {source!r} is not in this run")
            for c in per:
                t = t.set_column(t.column_names.index(c), c, bs.column(c).cast(t.schema.field(c).type))
        table = cls(t)
        table.run_dir, table.sae = Path(run_dir), sae
        return table

    def search_index(self) -> "SearchIndex":
        """The exact/regex/context search index of this SAE, built on first use (the top
        examples of every feature and the vocabulary; ~0.5 s for the demo run)."""
        if self._search is None:
            if self.run_dir is None or self.sae is None:
                raise SearchError("This features table was not opened from a run, so it has no search index.")
            index = SearchIndex.build(self.run_dir, self.sae, self.feature_id)
            with self._lock:
                self._search = index
        return self._search

    # -- columns as float64 numpy with NaN for missing (NULL or NaN)
    def _float(self, col: str) -> np.ndarray:
        v = self._floats.get(col)
        if v is None:
            c = self.table.column(col)
            v = np.asarray(c.to_numpy(), dtype=np.float64) if c.null_count == 0 else pc.fill_null(pc.cast(c, pa.float64()), float("nan")).to_numpy()
            self._floats[col] = v
        return v

    def _key(self, col: str) -> np.ndarray:
        """A float64 sort key of `col`; NaN where the value is missing."""
        if col in self._codes:  # strings sort by their bytes, as in DuckDB
            codes, words = self._codes[col]
            rank = np.argsort(np.argsort(np.array([w.encode() for w in words], dtype=object), kind="stable"), kind="stable")
            return np.where(codes >= 0, rank[np.maximum(codes, 0)] if len(words) else 0, np.nan).astype(np.float64)
        return self._float(col)

    def order(self, sort_by: str, descending: bool) -> np.ndarray:
        """Row positions sorted by `sort_by` (NaN/NULL last in either direction, ties by feature_id)."""
        _order(sort_by, descending)  # validates the column name
        k = (sort_by, bool(descending))
        o = self._orders.get(k)
        if o is None:
            asc, desc = self._sort_both(sort_by)
            with self._lock:
                self._orders[(sort_by, False)], self._orders[(sort_by, True)] = asc, desc
            o = desc if descending else asc
        return o

    def _sort_both(self, col: str) -> tuple[np.ndarray, np.ndarray]:
        """Ascending and descending row orders of `col` from one stable sort.

        Rows are in feature_id order, so a stable sort breaks ties by id. The descending order
        is the ascending one reversed with each run of equal values put back in id order:
        the element at sorted position j of a run [s, e) goes to (m - e) + (j - s).
        """
        key = self._key(col)
        missing = np.isnan(key)
        present = np.flatnonzero(~missing)
        vals = key[present]
        o = present[np.argsort(vals, kind="stable")]  # -0.0 and 0.0 compare equal, as in DuckDB
        m = len(o)
        ks = key[o]
        start = np.ones(m, dtype=bool)
        start[1:] = ks[1:] != ks[:-1]
        starts = np.flatnonzero(start)
        group = np.cumsum(start) - 1
        ends = np.append(starts[1:], m)
        j = np.arange(m)
        desc = np.empty(m, dtype=o.dtype)
        desc[(m - ends[group]) + (j - starts[group])] = o
        tail = np.flatnonzero(missing)  # NULL/NaN last in either direction, by id
        idx = np.int32 if self.n < 2**31 else np.int64  # 4 MB per order at 1M features
        return np.concatenate([o, tail]).astype(idx), np.concatenate([desc, tail]).astype(idx)

    def warm(self, columns: Sequence[str] = SORTABLE) -> None:
        """Build the sort orders of `columns` and the lowered search text now (the app runs this
        in a background thread after loading, so the first sort or search does not pay it)."""
        for c in columns:
            self.order(c, False)
        self._tokens_lower()

    def _tokens_lower(self) -> pa.Array:
        if self._lower_tokens is None:
            low = pc.utf8_lower(pc.fill_null(self.table.column("top_tokens").combine_chunks(), ""))
            with self._lock:
                self._lower_tokens = low
        return self._lower_tokens

    def mask(self, flt: FeatureFilter) -> np.ndarray | None:
        """Boolean mask of the rows `flt` keeps (None: every row)."""
        with self._lock:
            if flt in self._masks:
                m = self._masks.pop(flt)
                self._masks[flt] = m  # most recently used last
                return m
        m = self._compute_mask(flt)
        with self._lock:
            self._masks[flt] = m
            while len(self._masks) > self.MAX_MASKS:
                self._masks.pop(next(iter(self._masks)))
        return m

    def _compute_mask(self, flt: FeatureFilter) -> np.ndarray | None:
        if flt.density_model not in schema.MODELS:
            raise ValueError(f"density_model must be one of {schema.MODELS}")
        m = None

        def _and(x):
            nonlocal m
            m = x if m is None else (m & x)

        for col, values, allowed in (
            ("status_base", flt.status_base, schema.STATUSES),
            ("status_finetuned", flt.status_finetuned, schema.STATUSES),
            ("cross_class", flt.cross_class, schema.CROSS_CLASSES),
            ("change_class", flt.change_class, schema.CHANGE_CLASSES),
        ):
            if values:
                codes, words = self._codes[col]
                want = [i for i, w in enumerate(words) if w in set(values) & set(allowed)]
                _and(np.isin(codes, want))
        if flt.log_density_min is not None or flt.log_density_max is not None:
            with np.errstate(invalid="ignore", divide="ignore"):
                logd = np.log10(self._float(f"density_{flt.density_model}") + LOG_DENSITY_EPS)
            if flt.log_density_min is not None:
                _and(logd >= float(flt.log_density_min))
            if flt.log_density_max is not None:
                _and(logd <= float(flt.log_density_max))
        sim = self._float("act_similarity")
        missing = np.isnan(sim)
        if flt.similarity_min is not None or flt.similarity_max is not None:
            ok = ~missing
            if flt.similarity_min is not None:
                ok &= sim >= float(flt.similarity_min)
            if flt.similarity_max is not None:
                ok &= sim <= float(flt.similarity_max)
            _and(ok | missing if flt.include_nan_similarity else ok)
        elif not flt.include_nan_similarity:
            _and(~missing)
        if flt.exclude_both_dead:
            codes, words = self._codes["cross_class"]
            _and(codes != (words.index("both_dead") if "both_dead" in words else -2))
        if flt.searching():
            if flt.search_mode not in SEARCH_MODES:
                raise ValueError(f"search_mode must be one of {SEARCH_MODES}")
            if flt.search_mode == "substring" and not flt.search_contexts:
                needle = pc.utf8_lower(pa.scalar(flt.search.strip())).as_py()
                _and(pc.match_substring(self._tokens_lower(), needle).to_numpy(zero_copy_only=False).astype(bool))
            else:
                _and(self.search_index().mask(flt.search, flt.search_mode, flt.search_contexts))
        return m

    def count(self, flt: FeatureFilter = FeatureFilter()) -> int:
        m = self.mask(flt)
        return self.n if m is None else int(np.count_nonzero(m))

    def page_rows(self, flt: FeatureFilter = FeatureFilter(), sort_by: str = "feature_id", descending: bool = False, limit: int = 50, offset: int = 0) -> np.ndarray:
        """Row positions of one page of the filtered, sorted table."""
        o = self.order(sort_by, descending)
        m = self.mask(flt)
        lo, hi = max(0, int(offset)), max(0, int(offset)) + max(0, int(limit))
        if m is None:
            return o[lo:hi].astype(np.int64)
        return o[np.flatnonzero(m[o])[lo:hi]].astype(np.int64)

    def page(self, flt: FeatureFilter = FeatureFilter(), sort_by: str = "feature_id", descending: bool = False, limit: int = 50, offset: int = 0,
             columns: Sequence[str] = TABLE_COLUMNS) -> pd.DataFrame:
        """One page as `features_page` returns it."""
        cols = [c for c in columns if c in _FEATURE_COLUMNS and c in self.table.column_names]
        rows = self.page_rows(flt, sort_by, descending, limit, offset)
        if len(rows) == 0:
            return _empty_features(cols)
        return self.table.select(cols).take(pa.array(rows, pa.int64())).to_pandas()

    def ids(self, flt: FeatureFilter = FeatureFilter(), sort_by: str = "feature_id", descending: bool = False) -> np.ndarray:
        """Every matching feature id, in order."""
        return self.feature_id[self.page_rows(flt, sort_by, descending, self.n, 0)]

    def rows(self, ids: Iterable[int], columns: Sequence[str] = TABLE_COLUMNS) -> pd.DataFrame:
        """Rows of the given feature ids, in the order given (unknown ids skipped): what
        `features_by_ids` answers for table columns, without reading the file."""
        ids = np.asarray([int(i) for i in ids], dtype=np.int64)
        cols = [c for c in columns if c in self.table.column_names]
        if "feature_id" not in cols:
            cols = ["feature_id", *cols]
        pos = np.searchsorted(self.feature_id, ids)
        ok = (pos < self.n) & (self.feature_id[np.minimum(pos, max(self.n - 1, 0))] == ids) if self.n else np.zeros(len(ids), bool)
        return self.table.select(cols).take(pa.array(pos[ok], pa.int64())).to_pandas()

    def matching(self, flt: FeatureFilter = FeatureFilter(), sort_by: str = "feature_id", descending: bool = False,
                 columns: Sequence[str] = TABLE_COLUMNS) -> pa.Table:
        """Every matching row (table columns), in order, as an Arrow table (the exports)."""
        cols = [c for c in columns if c in _FEATURE_COLUMNS and c in self.table.column_names]
        return self.table.select(cols).take(pa.array(self.page_rows(flt, sort_by, descending, self.n, 0), pa.int64()))

    def csv(self, flt: FeatureFilter = FeatureFilter(), sort_by: str = "feature_id", descending: bool = False) -> bytes:
        """Every matching row (table columns), in order, as formula-safe CSV (`csv_bytes`)."""
        return csv_bytes(self.matching(flt, sort_by, descending).to_pandas())


class SearchIndex:
    """What the features table searches beyond the top_tokens column: per SAE, the token at the
    max of each top example (`top_ids`, owner row `top_row`) and each top example's window of
    tokens (`ctx_ids` flat with owner row `ctx_tok_row`; as text, `ctx_text` with owner
    `ctx_row`). Rows are positions in the FeatureTable (feature_id order).

    Exact: token ids whose string, stripped, equals a query word; substring: case-insensitive
    over the token strings / window texts; regex: RE2 (pyarrow.compute), linear time, over each
    token string / window text. Thread-safe (read-only after build)."""

    def __init__(self, vocab: list[str], n_rows: int, top_row: np.ndarray, top_ids: np.ndarray,
                 ctx_row: np.ndarray, ctx_ids: np.ndarray, ctx_offsets: np.ndarray):
        self.vocab = vocab
        self.n = n_rows
        self.top_row, self.top_ids = top_row, top_ids
        self.ctx_row, self.ctx_ids, self.ctx_offsets = ctx_row, ctx_ids, ctx_offsets
        self.ctx_tok_row = np.repeat(ctx_row, np.diff(ctx_offsets))
        v = np.array(vocab + [""], dtype=object)
        safe = lambda ids: np.where((ids >= 0) & (ids < len(vocab)), ids, len(vocab))  # noqa: E731
        self.top_text = pa.array(v[safe(top_ids)].tolist(), pa.string())
        toks = v[safe(ctx_ids)]
        self.ctx_text = pa.array(["".join(toks[a:b]) for a, b in zip(ctx_offsets[:-1], ctx_offsets[1:])], pa.string())
        self._lower: dict[str, pa.Array] = {}
        self._stripped = {i: t.strip() for i, t in enumerate(vocab)}

    @classmethod
    def build(cls, run_dir: Path | str, sae: str, feature_ids: np.ndarray) -> "SearchIndex":
        index = ExamplesIndex.open(run_dir)
        groups = [g for g, (lo, hi) in enumerate(zip(index.sae_min, index.sae_max)) if lo <= sae <= hi]
        t = pq.ParquetFile(index.path, metadata=index.metadata).read_row_groups(groups, columns=["sae", "feature_id", "kind", "position", "window_start", "token_ids"])
        t = t.filter(pc.and_(pc.equal(t.column("sae"), sae), pc.equal(t.column("kind"), "top")))
        fid = t.column("feature_id").to_numpy().astype(np.int64)
        rows = np.searchsorted(feature_ids, fid)
        keep = (rows < len(feature_ids)) & (feature_ids[np.minimum(rows, max(len(feature_ids) - 1, 0))] == fid) if len(feature_ids) else np.zeros(len(fid), bool)
        lists = t.column("token_ids").combine_chunks() if t.num_rows else pa.array([], pa.list_(pa.int32()))
        offsets = lists.offsets.to_numpy().astype(np.int64) - (lists.offsets[0].as_py() if len(lists) else 0)
        flat = lists.values.to_numpy().astype(np.int64) if len(lists) else np.zeros(0, np.int64)
        at = t.column("position").to_numpy().astype(np.int64) - t.column("window_start").to_numpy().astype(np.int64)
        lengths = np.diff(offsets)
        inside = (at >= 0) & (at < lengths)
        top_ids = np.where(inside, flat[np.minimum(offsets[:-1] + np.maximum(at, 0), max(len(flat) - 1, 0))] if len(flat) else -1, -1)
        sel = np.flatnonzero(keep)
        starts, ends = offsets[:-1][sel], offsets[1:][sel]
        ctx_offsets = np.concatenate([[0], np.cumsum(ends - starts)]).astype(np.int64)
        ctx_ids = np.concatenate([flat[a:b] for a, b in zip(starts, ends)]) if len(sel) else np.zeros(0, np.int64)
        top_sel = sel[inside[sel]]
        return cls(vocab(run_dir), len(feature_ids), rows[top_sel], top_ids[top_sel], rows[sel], ctx_ids, ctx_offsets)

    def _low(self, name: str) -> pa.Array:
        if name not in self._lower:
            self._lower[name] = pc.utf8_lower(getattr(self, name))
        return self._lower[name]

    def mask(self, query: str, mode: str, contexts: bool) -> np.ndarray:
        """Rows with a match (see FeatureFilter)."""
        q = query.strip()
        if len(q) > MAX_SEARCH_CHARS:
            raise SearchError(f"The search is {len(q)} characters long; at most {MAX_SEARCH_CHARS} are allowed.")
        out = np.zeros(self.n, dtype=bool)
        if mode == "exact":
            words = set(q.split())
            ids = np.fromiter((i for i, t in self._stripped.items() if t in words), dtype=np.int64)
            out[self.top_row[np.isin(self.top_ids, ids)]] = True
            if contexts:
                out[self.ctx_tok_row[np.isin(self.ctx_ids, ids)]] = True
            return out
        targets = [("top_text", self.top_row)] + ([("ctx_text", self.ctx_row)] if contexts else [])
        for name, owner in targets:
            if mode == "substring":
                hit = pc.match_substring(self._low(name), pc.utf8_lower(pa.scalar(q)).as_py())
            elif mode == "regex":
                try:
                    hit = pc.match_substring_regex(getattr(self, name), q)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                    reason = str(exc).split(":", 1)[-1].strip() or "invalid"
                    raise SearchError(
                        f"The regular expression cannot be used: {reason}. The search uses RE2 syntax "
                        "(no back-references or look-arounds)."
                    ) from None
            else:
                raise ValueError(f"search_mode must be one of {SEARCH_MODES}")
            out[owner[hit.to_numpy(zero_copy_only=False).astype(bool)]] = True
        return out


FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def csv_bytes(df: pd.DataFrame) -> bytes:
    """`df` as CSV that spreadsheets cannot run: a text cell beginning with = + - @, a tab or a
    carriage return gets a leading single quote, so Excel, LibreOffice and Google Sheets show
    it as text (the OWASP rule for CSV injection), and every text cell is quoted. Numbers are
    written as numbers (a negative number is not a formula)."""
    import csv

    out = df.copy()
    for c in out.columns:
        if out[c].dtype == object or pd.api.types.is_string_dtype(out[c]):
            out[c] = out[c].map(lambda v: "'" + v if isinstance(v, str) and v.startswith(FORMULA_PREFIXES) else v)
    return out.to_csv(index=False, quoting=csv.QUOTE_NONNUMERIC).encode()


def _empty_features(columns: Sequence[str]) -> pd.DataFrame:
    """No rows, with the dtypes a page with rows has."""
    return pa.schema([schema.FEATURES.field(c) for c in columns]).empty_table().to_pandas()


def features_csv(con, run_dir: Path | str, sae: str, flt: FeatureFilter = FeatureFilter(), sort_by: str = "feature_id", descending: bool = False,
                 source: str | None = None) -> bytes:
    """Every row matching the filter (table columns) as CSV bytes; built only when asked for."""
    where, params = flt.where(sae)
    rel, rp = _feats(run_dir, source)
    sql = f"SELECT {', '.join(TABLE_COLUMNS)} FROM {rel} WHERE {where} ORDER BY {_order(sort_by, descending)}"
    return csv_bytes(_df(con, sql, [*rp, *params]))


def feature(con, run_dir: Path | str, sae: str, feature_id: int) -> dict[str, Any] | None:
    """Every column of one feature, lists as Python lists; None if the id is not in the run."""
    t = features_index(run_dir).read(sae, [int(feature_id)])
    if t.num_rows == 0:
        return None
    return t.slice(0, 1).to_pylist()[0]


def features_by_ids(con, run_dir: Path | str, sae: str, ids: Iterable[int], columns: Sequence[str] = TABLE_COLUMNS) -> pd.DataFrame:
    """Rows of the given feature ids, in the order given (unknown ids are skipped)."""
    ids = [int(i) for i in ids]
    if not ids:
        return pd.DataFrame(columns=list(columns))
    cols = [c for c in columns if c in _FEATURE_COLUMNS]
    if "feature_id" not in cols:
        cols = ["feature_id", *cols]
    df = features_index(run_dir).read(sae, ids, cols).to_pandas()
    order = {fid: i for i, fid in enumerate(ids)}
    return df.assign(_o=df["feature_id"].map(order)).sort_values("_o").drop(columns="_o").reset_index(drop=True)


def feature_column(con, run_dir: Path | str, sae: str, columns: Sequence[str], source: str | None = None) -> pd.DataFrame:
    """Whole columns of one SAE's features (numeric views: histograms, scatter)."""
    cols = [c for c in columns if c in _FEATURE_COLUMNS]
    rel, rp = _feats(run_dir, source)
    return _df(con, f"SELECT feature_id, {', '.join(cols)} FROM {rel} WHERE sae = ? ORDER BY feature_id", [*rp, sae])


# ---------------------------------------------------------------------------- dead & born lists


def class_page(con, run_dir: Path | str, sae: str, cross_class: str, limit: int = 20, offset: int = 0, source: str | None = None) -> tuple[pd.DataFrame, int]:
    """Features of one cross-model class (e.g. died/woke), most active on the live side first."""
    if cross_class not in schema.CROSS_CLASSES:
        raise ValueError(f"cross_class must be one of {schema.CROSS_CLASSES}")
    side = "density_finetuned" if cross_class == "woke" else "density_base"
    rel, rp = _feats(run_dir, source)
    n = int(con.execute(f"SELECT count(*) FROM {rel} WHERE sae = ? AND cross_class = ?", [*rp, sae, cross_class]).fetchone()[0])
    df = _df(
        con,
        f"SELECT {', '.join(TABLE_COLUMNS)} FROM {rel} WHERE sae = ? AND cross_class = ? ORDER BY {side} DESC, feature_id LIMIT ? OFFSET ?",
        [*rp, sae, cross_class, int(limit), int(offset)],
    )
    return df, n


def born_lost_page(con, run_dir: Path | str, which: str, threshold: float, limit: int = 20, offset: int = 0) -> tuple[pd.DataFrame, int]:
    """Born (finetuned_sae) or lost (base_sae) features at `threshold`, lowest match score first."""
    sae, where = _born_lost_where(which)
    path = _path(run_dir, FEATURES_FILE)
    params = [path, sae, float(threshold)]
    n = int(con.execute(f"SELECT count(*) FROM read_parquet(?) WHERE {where}", params).fetchone()[0])
    df = _df(
        con,
        f"SELECT {', '.join(TABLE_COLUMNS)} FROM read_parquet(?) WHERE {where} ORDER BY coalesce({_nan_null('match_score')}, -1e300) ASC, feature_id LIMIT ? OFFSET ?",
        [*params, int(limit), int(offset)],
    )
    return df, n


# ---------------------------------------------------------------------------- similarity views


_NOT_BOTH_DEAD = " AND cross_class IS DISTINCT FROM 'both_dead'"


def histogram(con, run_dir: Path | str, sae: str, column: str, bins: int = 50, lo: float | None = None, hi: float | None = None, log_density: bool = False,
              exclude_both_dead: bool = False, source: str | None = None) -> pd.DataFrame:
    """Histogram of one numeric feature column (NaN excluded; n_nan reported) computed in DuckDB.

    Returns bin_left, bin_right, count, plus attrs n_nan and n. With `log_density`, bins
    log10(column + 1e-10). `exclude_both_dead` leaves out the features dead on both models.
    """
    expr = f"log10({column} + {LOG_DENSITY_EPS})" if log_density else _nan_null(column)
    if column not in _FEATURE_COLUMNS:
        raise ValueError(f"unknown column {column!r}")
    rel, rp = _feats(run_dir, source)
    where = "sae = ?" + (_NOT_BOTH_DEAD if exclude_both_dead else "")
    stats = con.execute(f"SELECT min(v), max(v), count(v), count(*) - count(v) FROM (SELECT {expr} AS v FROM {rel} WHERE {where})", [*rp, sae]).fetchone()
    vmin, vmax, n, n_nan = stats
    lo = vmin if lo is None else lo
    hi = vmax if hi is None else hi
    if n == 0 or lo is None or hi is None:
        df = pd.DataFrame({"bin_left": [], "bin_right": [], "count": []})
    else:
        if hi <= lo:
            hi = lo + 1e-9
        width = (hi - lo) / bins
        rows = con.execute(
            f"SELECT least(greatest(floor((v - ?) / ?), 0), ?)::INTEGER AS b, count(*) FROM (SELECT {expr} AS v FROM {rel} WHERE {where}) "
            "WHERE v IS NOT NULL AND v >= ? AND v <= ? GROUP BY 1",
            [lo, width, bins - 1, *rp, sae, lo, hi],
        ).fetchall()
        counts = np.zeros(bins, dtype=np.int64)
        for b, c in rows:
            counts[int(b)] += int(c)
        edges = lo + width * np.arange(bins + 1)
        df = pd.DataFrame({"bin_left": edges[:-1], "bin_right": edges[1:], "count": counts})
    df.attrs.update(n=int(n), n_nan=int(n_nan))
    return df


def density_regression(con, run_dir: Path | str, sae: str = "base_sae", alive_on_both: bool = False, source: str | None = None) -> dict[str, float]:
    """Least-squares line and Pearson R of log10(density_finetuned + eps) on log10(density_base + eps)
    (with `alive_on_both`, only the features that fire on both models: no dead sentinel at -10)."""
    where = "sae = ?" + (" AND density_base > 0 AND density_finetuned > 0" if alive_on_both else "")
    x = f"log10(density_base + {LOG_DENSITY_EPS})"
    y = f"log10(density_finetuned + {LOG_DENSITY_EPS})"
    rel, rp = _feats(run_dir, source)
    row = con.execute(
        f"SELECT regr_slope({y}, {x}), regr_intercept({y}, {x}), corr({y}, {x}), count(*) FROM {rel} WHERE {where}",
        [*rp, sae],
    ).fetchone()
    slope, intercept, r, n = row
    f = lambda v: float("nan") if v is None else float(v)  # noqa: E731
    return {"slope": f(slope), "intercept": f(intercept), "r": f(r), "n": int(n)}


SCATTER_COLUMNS = ("density_base", "density_finetuned", "act_similarity", "logit_similarity", "act_error", "cross_class", "status_base", "status_finetuned", "change_class")


def scatter_sample(con, run_dir: Path | str, sae: str, max_points: int = 20000, seed: int = 0, exclude_both_dead: bool = False,
                   source: str | None = None) -> pd.DataFrame:
    """Per-feature points for scatter/parallel plots: all features (or all but those dead on
    both models), or a deterministic sample of `max_points` (hash of feature_id and seed) when
    there are more; with `source`, the per-source columns hold that source's values."""
    rel, rp = _feats(run_dir, source)
    where = "sae = ?" + (_NOT_BOTH_DEAD if exclude_both_dead else "")
    n = int(con.execute(f"SELECT count(*) FROM {rel} WHERE {where}", [*rp, sae]).fetchone()[0])
    cols = ", ".join(("feature_id", *SCATTER_COLUMNS))
    if n <= max_points:
        df = _df(con, f"SELECT {cols} FROM {rel} WHERE {where} ORDER BY feature_id", [*rp, sae])
    else:
        df = _df(con, f"SELECT {cols} FROM {rel} WHERE {where} ORDER BY hash(feature_id + ?) LIMIT ?", [*rp, sae, int(seed), int(max_points)])
    df.attrs["n_total"] = n
    return df


# ---------------------------------------------------------------------------- matches


def candidate_matches(con, run_dir: Path | str, sae: str, feature_id: int, limit: int = 10) -> pd.DataFrame:
    """Candidate partners of one feature in the other SAE (matches.parquet), best score first.

    Columns: other_feature_id, act_corr, cofire_corr, dec_cos, enc_cos, score, assigned. Empty for one-SAE runs.
    """
    if not has_table(run_dir, MATCHES_FILE):
        return pd.DataFrame(columns=["other_feature_id", "act_corr", "cofire_corr", "dec_cos", "enc_cos", "score", "assigned"])
    mine, other = ("base_feature_id", "finetuned_feature_id") if sae == "base_sae" else ("finetuned_feature_id", "base_feature_id")
    return _df(
        con,
        f"SELECT {other} AS other_feature_id, act_corr, cofire_corr, dec_cos, enc_cos, score, assigned FROM read_parquet(?) WHERE {mine} = ? "
        "ORDER BY (CASE WHEN isnan(score) THEN NULL ELSE score END) DESC NULLS LAST, other_feature_id LIMIT ?",
        [_path(run_dir, MATCHES_FILE), int(feature_id), int(limit)],
    )


class MatchesIndex:
    """matches.parquet in memory, rows grouped by the feature of either SAE: `candidates`
    answers what `candidate_matches` answers (same columns, order and limit) without a scan."""

    COLUMNS = ["other_feature_id", "act_corr", "cofire_corr", "dec_cos", "enc_cos", "score", "assigned"]

    def __init__(self, df: pd.DataFrame | None):
        self._by: dict[str, dict[int, pd.DataFrame]] = {"base_sae": {}, "finetuned_sae": {}}
        if df is None or df.empty:
            return
        df = df.assign(_null=df["score"].isna(), _neg=-df["score"].fillna(0.0))
        for sae, mine, other in (("base_sae", "base_feature_id", "finetuned_feature_id"), ("finetuned_sae", "finetuned_feature_id", "base_feature_id")):
            d = df.rename(columns={other: "other_feature_id"}).sort_values(["_null", "_neg", "other_feature_id"], kind="stable")
            for fid, g in d.groupby(mine, sort=False):
                self._by[sae][int(fid)] = g[self.COLUMNS].reset_index(drop=True)

    @classmethod
    def open(cls, run_dir: Path | str) -> "MatchesIndex":
        if not has_table(run_dir, MATCHES_FILE):
            return cls(None)
        return cls(pq.read_table(_path(run_dir, MATCHES_FILE)).to_pandas())

    def candidates(self, sae: str, feature_id: int, limit: int = 10) -> pd.DataFrame:
        g = self._by.get(sae, {}).get(int(feature_id))
        if g is None:
            return pd.DataFrame({c: pd.Series(dtype="int32" if c == "other_feature_id" else "bool" if c == "assigned" else "float64") for c in self.COLUMNS})
        return g.head(max(0, int(limit))).copy()


# ---------------------------------------------------------------------------- examples


class RowGroupCache:
    """Decoded parquet row groups kept in memory, least recently used out, up to `budget_bytes`
    (Arrow's `nbytes`). Keys carry the file's identity (path, mtime, size), so a rewritten file
    is never answered from the old one. Thread-safe (Streamlit runs each session's script in
    its own thread); two threads missing the same group both read it, and one copy is kept.

    The app shares one (`ROW_GROUPS`): a feature page reads one row group of features.parquet,
    of features_by_source.parquet and of examples.parquet, and the next feature a researcher
    opens is mostly in the same ones (the demo's three files decode to ~60 MB in all)."""

    def __init__(self, budget_bytes: int):
        import threading
        from collections import OrderedDict

        self.budget_bytes = int(budget_bytes)
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self._items: "OrderedDict[tuple, pa.Table]" = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple, read: Any) -> pa.Table:
        with self._lock:
            t = self._items.get(key)
            if t is not None:
                self._items.move_to_end(key)
                self.hits += 1
                return t
        t = read()  # outside the lock: pyarrow's read releases the GIL
        with self._lock:
            self.misses += 1
            if key in self._items:
                return self._items[key]
            size = int(t.nbytes)
            if size > self.budget_bytes:
                return t  # larger than the whole budget: served, not kept
            self._items[key] = t
            self.nbytes += size
            while self.nbytes > self.budget_bytes:
                _, old = self._items.popitem(last=False)
                self.nbytes -= int(old.nbytes)
            return t

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.nbytes = 0


def _cache_budget() -> int:
    import os

    raw = os.environ.get("SAE_EXPLORER_CACHE_MB", "512")
    try:
        mb = float(raw)
    except ValueError:
        mb = 512.0
    return int(max(0.0, mb) * 2**20)


# The app's one row-group cache (SAE_EXPLORER_CACHE_MB, default 512; 0 turns it off).
ROW_GROUPS = RowGroupCache(_cache_budget())


@dataclass
class ExamplesIndex:
    """Row-group ranges of a parquet file sorted by (sae, feature_id) (examples.parquet, and
    features.parquet and features_by_source.parquet through `features_index`/`by_source_index`):
    which row groups can hold (sae, feature_id).

    Built once per run from the parquet footer (no data read). `read(sae, ids)` then reads only
    the candidate row groups and filters them exactly. With a `cache` (a RowGroupCache), each
    row group is decoded once (all its columns) and kept there.
    """

    path: str
    metadata: Any = field(repr=False)
    sae_min: list[str] = field(repr=False)
    sae_max: list[str] = field(repr=False)
    fid_min: np.ndarray = field(repr=False)
    fid_max: np.ndarray = field(repr=False)
    cache: RowGroupCache | None = field(default=None, repr=False)
    identity: tuple = field(default=(), repr=False)

    @classmethod
    def open(cls, run_dir: Path | str, name: str = EXAMPLES_FILE, cache: RowGroupCache | None = None) -> "ExamplesIndex":
        path = _path(run_dir, name)
        st = Path(path).stat()
        md = pq.ParquetFile(path).metadata
        names = [md.schema.column(i).name for i in range(md.num_columns)]
        i_sae, i_fid = names.index("sae"), names.index("feature_id")
        smin, smax, fmin, fmax = [], [], [], []
        for g in range(md.num_row_groups):
            rg = md.row_group(g)
            s, f = rg.column(i_sae).statistics, rg.column(i_fid).statistics
            if s is not None and s.has_min_max and f is not None and f.has_min_max:
                smin.append(s.min)
                smax.append(s.max)
                fmin.append(f.min)
                fmax.append(f.max)
            else:  # no statistics: this row group is always a candidate
                smin.append("")
                smax.append("\U0010ffff")
                fmin.append(-(2**31))
                fmax.append(2**31 - 1)
        return cls(path, md, smin, smax, np.asarray(fmin, dtype=np.int64), np.asarray(fmax, dtype=np.int64),
                   cache if cache is not None and cache.budget_bytes > 0 else None, (path, st.st_mtime_ns, st.st_size))

    def row_groups(self, sae: str, ids: Sequence[int]) -> list[int]:
        ids = np.asarray(sorted(set(int(i) for i in ids)), dtype=np.int64)
        if len(ids) == 0:
            return []
        sae_ok = np.array([lo <= sae <= hi for lo, hi in zip(self.sae_min, self.sae_max)], dtype=bool)
        # a row group is a candidate if some requested id lies in [fid_min, fid_max]
        pos = np.searchsorted(ids, self.fid_min, side="left")
        has = (pos < len(ids)) & (ids[np.minimum(pos, len(ids) - 1)] <= self.fid_max)
        return np.flatnonzero(sae_ok & has).tolist()

    def _groups(self, groups: list[int], cols: list[str] | None) -> pa.Table:
        if self.cache is None:
            return pq.ParquetFile(self.path, metadata=self.metadata).read_row_groups(groups, columns=cols)
        read = lambda g: pq.ParquetFile(self.path, metadata=self.metadata).read_row_group(g)  # noqa: E731
        parts = [self.cache.get((*self.identity, g), lambda g=g: read(g)) for g in groups]
        t = parts[0] if len(parts) == 1 else pa.concat_tables(parts)
        return t if cols is None else t.select(cols)

    def read(self, sae: str, ids: Sequence[int], columns: Sequence[str] | None = None) -> pa.Table:
        """Rows of (sae, feature_id in ids), all columns or `columns` (in file order)."""
        groups = self.row_groups(sae, ids)
        cols = None if columns is None else list(dict.fromkeys(["sae", "feature_id", *columns]))
        if not groups:
            t = self.metadata.schema.to_arrow_schema().empty_table()
            return t if cols is None else t.select([c for c in columns])
        t = self._groups(groups, cols)
        mask = pc.and_(pc.equal(t.column("sae"), sae), pc.is_in(t.column("feature_id"), value_set=pa.array(sorted(set(int(i) for i in ids)), pa.int32())))
        t = t.filter(mask)
        return t if columns is None else t.select(list(columns))


# One feature's row (the feature page) and a handful of rows by id (its neighbours) are read by
# the same row-group pruning as the examples: at 1M features DuckDB's scan took ~380 ms to find
# one row among 2048 row groups (B4), the pruned pyarrow read ~14 ms. The index of a run's
# features.parquet is kept per (path, mtime, size): a re-written file gets a new one.
_FEATURES_INDEX: dict[tuple[str, int, int], ExamplesIndex] = {}


def _file_index(run_dir: Path | str, name: str) -> ExamplesIndex:
    path = _path(run_dir, name)
    st = Path(path).stat()
    key = (path, st.st_mtime_ns, st.st_size)
    idx = _FEATURES_INDEX.get(key)
    if idx is None:
        idx = ExamplesIndex.open(run_dir, name, cache=ROW_GROUPS)
        if len(_FEATURES_INDEX) >= 32:
            _FEATURES_INDEX.pop(next(iter(_FEATURES_INDEX)))
        _FEATURES_INDEX[key] = idx
    return idx


def features_index(run_dir: Path | str) -> ExamplesIndex:
    """The row-group index of the run's features.parquet (decoded row groups in ROW_GROUPS)."""
    return _file_index(run_dir, FEATURES_FILE)


def by_source_index(run_dir: Path | str) -> ExamplesIndex:
    """The row-group index of the run's features_by_source.parquet (sorted by sae, feature_id)."""
    return _file_index(run_dir, FEATURES_BY_SOURCE_FILE)


_EXAMPLE_ORDER = [("feature_id", "ascending"), ("model", "ascending"), ("kind", "descending"), ("bin", "descending"), ("rank", "ascending")]


def feature_examples(index: ExamplesIndex, sae: str, feature_id: int) -> pd.DataFrame:
    """All examples of one feature (both models; top first, then quantile bins high to low)."""
    t = index.read(sae, [feature_id]).sort_by(_EXAMPLE_ORDER)
    return t.to_pandas(types_mapper=None)


def top_examples(index: ExamplesIndex, sae: str, ids: Sequence[int], model: str | None = None, rank: int = 0) -> pd.DataFrame:
    """The rank-`rank` top example of each feature in `ids` (on `model`, or on both)."""
    t = index.read(sae, ids)
    mask = pc.and_(pc.equal(t.column("kind"), "top"), pc.equal(t.column("rank"), rank))
    if model is not None:
        mask = pc.and_(mask, pc.equal(t.column("model"), model))
    return t.filter(mask).sort_by(_EXAMPLE_ORDER).to_pandas()


def log_density(d: Any) -> Any:
    """log10(density + 1e-10), the plotted quantity (METHODS.md section 3)."""
    return np.log10(np.asarray(d, dtype=np.float64) + LOG_DENSITY_EPS)


def finite_or_none(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


# ---------------------------------------------------------------------------- issue 12: sources, significance, baseline, diffing


def sources(run_dir: Path | str) -> list[str]:
    """The run's source labels (features_by_source.parquet), sorted."""
    t = pq.read_table(_path(run_dir, FEATURES_BY_SOURCE_FILE), columns=["source"])
    return sorted(set(t.column("source").to_pylist()))


def feature_by_source(run_dir: Path | str, sae: str, ids: Sequence[int], source: str | None = None) -> pd.DataFrame:
    """features_by_source rows of the given features (every source, or one)."""
    t = by_source_index(run_dir).read(sae, [int(i) for i in ids])
    if source is not None:
        t = t.filter(pc.equal(t.column("source"), str(source)))
    return t.to_pandas()


def change_class_counts(con, run_dir: Path | str, sae: str = "base_sae", source: str | None = None) -> dict[str, int]:
    """Features per significance class (schema.CHANGE_CLASSES)."""
    rel, rp = _feats(run_dir, source)
    rows = con.execute(f"SELECT change_class, count(*) FROM {rel} WHERE sae = ? GROUP BY 1", [*rp, sae]).fetchall()
    out = {c: 0 for c in schema.CHANGE_CLASSES}
    out.update({k: int(v) for k, v in rows if k is not None})
    return out


def change_page(con, run_dir: Path | str, sae: str, change_class: str, limit: int = 20, offset: int = 0, source: str | None = None) -> tuple[pd.DataFrame, int]:
    """Features of one significance class, most significant first (q, then the larger count on the live side)."""
    if change_class not in schema.CHANGE_CLASSES:
        raise ValueError(f"change_class must be one of {schema.CHANGE_CLASSES}")
    live = "count_finetuned" if change_class in ("woke", "commoner") else "count_base"
    rel, rp = _feats(run_dir, source)
    cols = ", ".join(dict.fromkeys((*TABLE_COLUMNS, "count_base", "count_finetuned", "n_base_only", "n_finetuned_only", "p_value")))
    n = int(con.execute(f"SELECT count(*) FROM {rel} WHERE sae = ? AND change_class = ?", [*rp, sae, change_class]).fetchone()[0])
    df = _df(
        con,
        f"SELECT {cols} FROM {rel} WHERE sae = ? AND change_class = ? ORDER BY {_nan_null('q_value')} ASC NULLS LAST, {live} DESC, feature_id LIMIT ? OFFSET ?",
        [*rp, sae, change_class, int(limit), int(offset)],
    )
    return df, n


# what changed most (METHODS.md section 10): ranking name -> (column, descending, needs alive on both)
RANKINGS = {
    "rarer": ("log_density_ratio", False),
    "commoner": ("log_density_ratio", True),
    "weaker": ("delta_mean_active_act", False),
    "stronger": ("delta_mean_active_act", True),
    "max_down": ("delta_max_act", False),
    "max_up": ("delta_max_act", True),
    "logit_effect": ("logit_effect_max_abs", True),
    "kl_corr": ("kl_corr", True),
}


def changed_most(con, run_dir: Path | str, sae: str, ranking: str, limit: int = 20, offset: int = 0, source: str | None = None) -> tuple[pd.DataFrame, int]:
    """Features ranked by one change (RANKINGS), features that fire on neither model left out."""
    if ranking not in RANKINGS:
        raise ValueError(f"ranking must be one of {sorted(RANKINGS)}")
    col, desc = RANKINGS[ranking]
    rel, rp = _feats(run_dir, source)
    cols = ", ".join(dict.fromkeys((*TABLE_COLUMNS, "count_base", "count_finetuned", "log_density_ratio_low", "log_density_ratio_high", "delta_max_act")))
    where = f"sae = ? AND (count_base > 0 OR count_finetuned > 0) AND {_nan_null(col)} IS NOT NULL"
    n = int(con.execute(f"SELECT count(*) FROM {rel} WHERE {where}", [*rp, sae]).fetchone()[0])
    df = _df(con, f"SELECT {cols} FROM {rel} WHERE {where} ORDER BY {_order(col, desc) if col in SORTABLE else _nan_null(col) + (' DESC' if desc else ' ASC') + ', feature_id'} LIMIT ? OFFSET ?",
             [*rp, sae, int(limit), int(offset)])
    return df, n


def source_contrast(con, run_dir: Path | str, sae: str, classes_a: Sequence[str], source_a: str, classes_b: Sequence[str], source_b: str,
                    limit: int = 20, offset: int = 0) -> tuple[pd.DataFrame, int]:
    """Features whose change class is in `classes_a` on `source_a` and in `classes_b` on
    `source_b` (e.g. died on python, no significant change on english)."""
    ca = [c for c in classes_a if c in schema.CHANGE_CLASSES] or ["__none__"]
    cb = [c for c in classes_b if c in schema.CHANGE_CLASSES] or ["__none__"]
    path = _path(run_dir, FEATURES_BY_SOURCE_FILE)
    sql = (
        "FROM read_parquet(?) a JOIN read_parquet(?) b USING (sae, feature_id) "
        f"WHERE a.sae = ? AND a.source = ? AND b.source = ? AND a.change_class IN ({', '.join('?' * len(ca))}) AND b.change_class IN ({', '.join('?' * len(cb))})"
    )
    params = [path, path, sae, str(source_a), str(source_b), *ca, *cb]
    n = int(con.execute(f"SELECT count(*) {sql}", params).fetchone()[0])
    df = _df(
        con,
        "SELECT feature_id, a.change_class AS class_a, a.count_base AS count_base_a, a.count_finetuned AS count_finetuned_a, a.q_value AS q_value_a, "
        "b.change_class AS class_b, b.count_base AS count_base_b, b.count_finetuned AS count_finetuned_b, b.q_value AS q_value_b "
        f"{sql} ORDER BY (CASE WHEN isnan(a.q_value) THEN NULL ELSE a.q_value END) ASC NULLS LAST, a.count_base DESC, feature_id LIMIT ? OFFSET ?",
        [*params, int(limit), int(offset)],
    )
    return df, n


def baseline(con, run_dir: Path | str, score: str | None = None) -> pd.DataFrame:
    """baseline.parquet (born/lost counts and rates over the threshold, against the seed twin), one score or all."""
    if not has_table(run_dir, "baseline.parquet"):
        return schema.BASELINE.empty_table().to_pandas()
    if score is None:
        return _df(con, "SELECT * FROM read_parquet(?) ORDER BY score, threshold", [_path(run_dir, "baseline.parquet")])
    return _df(con, "SELECT * FROM read_parquet(?) WHERE score = ? ORDER BY threshold", [_path(run_dir, "baseline.parquet"), str(score)])


def score_separation(con, run_dir: Path | str) -> pd.DataFrame:
    """score_separation.parquet (each matching score on the twin's assigned vs random pairs); empty without a twin."""
    if not has_table(run_dir, "score_separation.parquet"):
        return schema.SCORE_SEPARATION.empty_table().to_pandas()
    return _df(con, "SELECT * FROM read_parquet(?) ORDER BY score, \"group\", bin_left", [_path(run_dir, "score_separation.parquet")])


def _kl_tokens(run_dir: Path | str, special_ids: Sequence[int]) -> tuple[str, list[Any]]:
    """Per counted position (its token not special; the last position has no KL): seq_id, source, position, kl, loss_diff."""
    special = [int(i) for i in special_ids] or [-1]
    sql = (
        "(SELECT seq_id, source, generate_subscripts(kl, 1) - 1 AS position, unnest(kl) AS kl, unnest(loss_diff) AS loss_diff, unnest(token_ids) AS token_id "
        "FROM read_parquet(?))"
    )
    where = f"NOT isnan(kl) AND token_id NOT IN ({', '.join('?' * len(special))})"
    return f"(SELECT * FROM {sql} WHERE {where})", [_path(run_dir, "tokens.parquet"), *special]


def kl_by_source(con, run_dir: Path | str, special_ids: Sequence[int]) -> pd.DataFrame:
    """Mean KL(base || finetuned) and loss difference over the counted positions, per source and over all ('all' first)."""
    rel, rp = _kl_tokens(run_dir, special_ids)
    df = _df(con, f"SELECT coalesce(source, 'all') AS source, count(*) AS n_tokens, avg(kl) AS mean_kl, quantile_cont(kl, 0.5) AS median_kl, "
             f"avg(loss_diff) AS mean_loss_diff FROM {rel} GROUP BY ROLLUP (source) ORDER BY source IS NOT NULL, source", rp)
    return df


def kl_by_position(con, run_dir: Path | str, special_ids: Sequence[int], source: str | None = None) -> pd.DataFrame:
    """Mean KL and loss difference per context position (counted positions), over all sources or one."""
    rel, rp = _kl_tokens(run_dir, special_ids)
    where, params = ("WHERE source = ?", [str(source)]) if source is not None else ("", [])
    return _df(con, f"SELECT position, count(*) AS n_tokens, avg(kl) AS mean_kl, avg(loss_diff) AS mean_loss_diff FROM {rel} {where} GROUP BY 1 ORDER BY 1", [*rp, *params])


def kl_contexts(con, run_dir: Path | str, limit: int = 20, offset: int = 0, source: str | None = None) -> tuple[pd.DataFrame, int]:
    """The highest-KL contexts (kl_contexts.parquet), highest first, over all sources or one."""
    path = _path(run_dir, "kl_contexts.parquet")
    where, params = ("WHERE source = ?", [str(source)]) if source is not None else ("", [])
    n = int(con.execute(f"SELECT count(*) FROM read_parquet(?) {where}", [path, *params]).fetchone()[0])
    return _df(con, f"SELECT * FROM read_parquet(?) {where} ORDER BY rank LIMIT ? OFFSET ?", [path, *params, int(limit), int(offset)]), n
