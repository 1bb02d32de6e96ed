"""Cached store queries for the pages: st.cache_data keyed on (run, sae, feature_id, ...).

Each wrapper takes a `webapp.state.Run` (hashed by its identity and manifest version, never its
contents), takes a fresh DuckDB cursor from the run's cached connection, and calls the pure
query in explorer/store.py. Pages call these and nothing else for data.
"""

from __future__ import annotations

from typing import Any, Sequence

import pandas as pd
import streamlit as st

from explorer import store
from webapp.state import HASH_FUNCS, Run, connection

_cache = lambda **kw: st.cache_data(show_spinner=False, hash_funcs=HASH_FUNCS, **kw)  # noqa: E731


def _cur(run: Run):
    return connection(run).cursor()


@st.cache_resource(show_spinner=False, max_entries=16)
def _examples_index(path: str, token: tuple[int, int]) -> store.ExamplesIndex:
    return store.ExamplesIndex.open(path, cache=store.ROW_GROUPS)


def examples_index(run: Run) -> store.ExamplesIndex:
    return _examples_index(run.path, run.token)


@_cache(max_entries=32)
def metrics(run: Run, source: str | None = None) -> pd.DataFrame:
    return store.metrics(_cur(run), run.dir, source)


@_cache(max_entries=32)
def resid(run: Run) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    cur = _cur(run)
    return store.resid_position(cur, run.dir), store.resid_histograms(cur, run.dir), store.resid_summary(cur, run.dir)


@_cache(max_entries=32)
def status_counts(run: Run, source: str | None = None) -> pd.DataFrame:
    return store.status_counts(_cur(run), run.dir, source)


@_cache(max_entries=32)
def cross_class_counts(run: Run, sae: str = "base_sae", source: str | None = None) -> dict[str, int]:
    return store.cross_class_counts(_cur(run), run.dir, sae, source)


@_cache(max_entries=256)
def born_lost_counts(run: Run, threshold: float) -> dict[str, int]:
    return store.born_lost_counts(_cur(run), run.dir, threshold)


@st.cache_resource(show_spinner="Loading the features table…", max_entries=8)
def _feature_table(path: str, token: tuple[int, int], sae: str, source: str | None = None) -> store.FeatureTable:
    import threading

    table = store.FeatureTable.open(path, sae, source)
    # sort orders and search text are built in the background (about 1.5 s at 1M features), so
    # the first sort by a column does not pay for it; until then a page builds what it needs
    threading.Thread(target=table.warm, name=f"warm-{sae}", daemon=True).start()
    return table


def feature_table(run: Run, sae: str, source: str | None = None) -> store.FeatureTable:
    """One SAE's features table in memory (filters and sorts without a scan; B4), pooled or of one source."""
    return _feature_table(run.path, run.token, sae, source)


@_cache(max_entries=512)
def features_page(run: Run, sae: str, flt: store.FeatureFilter, sort_by: str, descending: bool, limit: int, offset: int, source: str | None = None) -> pd.DataFrame:
    return feature_table(run, sae, source).page(flt, sort_by, descending, limit, offset)


@_cache(max_entries=256)
def count_features(run: Run, sae: str, flt: store.FeatureFilter, source: str | None = None) -> int:
    return feature_table(run, sae, source).count(flt)


def features_export(run: Run, sae: str, flt: store.FeatureFilter, sort_by: str, descending: bool, source: str | None, fmt: str) -> bytes:
    """Every matching row (pooled, or of one source) as formula-safe CSV or Parquet
    (explorer.features_view.to_bytes, as `sae-transfer export features` writes it), built when
    the button is pressed."""
    from explorer import features_view

    return features_view.to_bytes(feature_table(run, sae, source).matching(flt, sort_by, descending), fmt)


@_cache(max_entries=1024)
def feature(run: Run, sae: str, feature_id: int) -> dict[str, Any] | None:
    return store.feature(_cur(run), run.dir, sae, feature_id)


@st.cache_resource(show_spinner=False, hash_funcs=HASH_FUNCS, max_entries=1024)
def feature_examples(run: Run, sae: str, feature_id: int) -> pd.DataFrame:
    """One feature's examples, shared and not copied (cache_resource; a cache_data hit unpickles
    the frame, ~1.5 ms, and a feature page takes it four times): callers only filter it."""
    return store.feature_examples(examples_index(run), sae, feature_id)


@_cache(max_entries=512)
def top_examples(run: Run, sae: str, ids: tuple[int, ...], model: str | None = None) -> pd.DataFrame:
    return store.top_examples(examples_index(run), sae, list(ids), model)


@_cache(max_entries=1024)
def features_by_ids(run: Run, sae: str, ids: tuple[int, ...], columns: tuple[str, ...] = store.TABLE_COLUMNS) -> pd.DataFrame:
    if set(columns) <= set(store.TABLE_COLUMNS):  # in memory (the features table), no file read
        return feature_table(run, sae).rows(ids, columns)
    return store.features_by_ids(_cur(run), run.dir, sae, ids, columns)


@st.cache_resource(show_spinner=False, max_entries=8)
def _matches_index(path: str, token: tuple[int, int]) -> store.MatchesIndex:
    return store.MatchesIndex.open(path)


def candidate_matches(run: Run, sae: str, feature_id: int, limit: int = 10) -> pd.DataFrame:
    """Candidate partners in the other SAE, best first (in memory: store.MatchesIndex)."""
    return _matches_index(run.path, run.token).candidates(sae, feature_id, limit)


@_cache(max_entries=256)
def class_page(run: Run, sae: str, cross_class: str, limit: int, offset: int, source: str | None = None) -> tuple[pd.DataFrame, int]:
    return store.class_page(_cur(run), run.dir, sae, cross_class, limit, offset, source)


@_cache(max_entries=256)
def born_lost_page(run: Run, which: str, threshold: float, limit: int, offset: int) -> tuple[pd.DataFrame, int]:
    return store.born_lost_page(_cur(run), run.dir, which, threshold, limit, offset)


def _with_attrs(pair: tuple[pd.DataFrame, dict]) -> pd.DataFrame:
    # DataFrame.attrs do not survive st.cache_data's pickling: cache them alongside
    df, attrs = pair
    df = df.copy(deep=False)
    df.attrs.update(attrs)
    return df


@_cache(max_entries=128)
def _histogram(run: Run, sae: str, column: str, bins: int, lo: float | None, hi: float | None, log_density: bool, exclude_both_dead: bool,
               source: str | None) -> tuple[pd.DataFrame, dict]:
    df = store.histogram(_cur(run), run.dir, sae, column, bins, lo, hi, log_density, exclude_both_dead=exclude_both_dead, source=source)
    return df, dict(df.attrs)


def histogram(run: Run, sae: str, column: str, bins: int = 50, lo: float | None = None, hi: float | None = None, log_density: bool = False,
              exclude_both_dead: bool = False, source: str | None = None) -> pd.DataFrame:
    """Binned column (attrs: n, n_nan), pooled or of one source."""
    return _with_attrs(_histogram(run, sae, column, bins, lo, hi, log_density, exclude_both_dead, source))


@_cache(max_entries=64)
def density_regression(run: Run, sae: str, alive_on_both: bool = False, source: str | None = None) -> dict[str, float]:
    return store.density_regression(_cur(run), run.dir, sae, alive_on_both, source)


@_cache(max_entries=16)
def _scatter_sample(run: Run, sae: str, max_points: int, exclude_both_dead: bool, source: str | None) -> tuple[pd.DataFrame, dict]:
    df = store.scatter_sample(_cur(run), run.dir, sae, max_points, exclude_both_dead=exclude_both_dead, source=source)
    return df, dict(df.attrs)


def scatter_sample(run: Run, sae: str, max_points: int = 20000, exclude_both_dead: bool = False, source: str | None = None) -> pd.DataFrame:
    """Per-feature points (attrs: n_total), pooled or of one source."""
    return _with_attrs(_scatter_sample(run, sae, max_points, exclude_both_dead, source))


@_cache(max_entries=16)
def sequences(run: Run, limit: int = 200, offset: int = 0) -> pd.DataFrame:
    return store.sequences(_cur(run), run.dir, limit, offset)


def token_strings(run: Run, ids: Sequence[int]) -> list[str]:
    """Token ids -> their (unescaped) strings; unknown ids -> '<id N>'. Used for lists of single
    tokens (top logits); windows of running text use `window_strings`."""
    from webapp.state import vocab

    v = vocab(run)
    return [v[i] if 0 <= i < len(v) else f"<id {i}>" for i in (int(x) for x in ids)]


def window_strings(run: Run, ids: Sequence[int]) -> tuple[list[str], list[str]]:
    """A window of running text: (display strings, characters split over byte tokens shown whole
    on the token that completes them; hover titles with each id and raw piece)."""
    v = vocab_forms(run)
    return v.window(ids), v.titles(ids)


def vocab_forms(run: Run):
    """explorer.tokens.Vocab of the run (webapp.state.vocab_forms): take it once per list of windows."""
    from webapp.state import vocab_forms as forms

    return forms(run)


# ---------------------------------------------------------------------------- issue 12: significance, baseline, diffing


@_cache(max_entries=64)
def change_class_counts(run: Run, sae: str = "base_sae", source: str | None = None) -> dict[str, int]:
    return store.change_class_counts(_cur(run), run.dir, sae, source)


@_cache(max_entries=256)
def change_page(run: Run, sae: str, change_class: str, limit: int, offset: int, source: str | None = None) -> tuple[pd.DataFrame, int]:
    return store.change_page(_cur(run), run.dir, sae, change_class, limit, offset, source)


@_cache(max_entries=256)
def changed_most(run: Run, sae: str, ranking: str, limit: int, offset: int, source: str | None = None) -> tuple[pd.DataFrame, int]:
    return store.changed_most(_cur(run), run.dir, sae, ranking, limit, offset, source)


@_cache(max_entries=128)
def source_contrast(run: Run, sae: str, classes_a: tuple[str, ...], source_a: str, classes_b: tuple[str, ...], source_b: str, limit: int, offset: int) -> tuple[pd.DataFrame, int]:
    return store.source_contrast(_cur(run), run.dir, sae, classes_a, source_a, classes_b, source_b, limit, offset)


@_cache(max_entries=32)
def baseline(run: Run, score: str | None = None) -> pd.DataFrame:
    return store.baseline(_cur(run), run.dir, score)


@_cache(max_entries=8)
def score_separation(run: Run) -> pd.DataFrame:
    return store.score_separation(_cur(run), run.dir)


@_cache(max_entries=1024)
def feature_by_source(run: Run, sae: str, feature_id: int) -> pd.DataFrame:
    return store.feature_by_source(run.dir, sae, [int(feature_id)])


@_cache(max_entries=8)
def kl_by_source(run: Run) -> pd.DataFrame:
    return store.kl_by_source(_cur(run), run.dir, tuple(run.manifest.get("special_token_ids") or ()))


@_cache(max_entries=32)
def kl_by_position(run: Run, source: str | None = None) -> pd.DataFrame:
    return store.kl_by_position(_cur(run), run.dir, tuple(run.manifest.get("special_token_ids") or ()), source)


@_cache(max_entries=128)
def kl_contexts(run: Run, limit: int, offset: int, source: str | None = None) -> tuple[pd.DataFrame, int]:
    return store.kl_contexts(_cur(run), run.dir, limit, offset, source)
