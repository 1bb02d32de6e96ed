"""`sae-transfer export features`: a Features-page view (its URL query or link) as CSV or Parquet
(explorer/features_view.py; issue 15). Checked against a naive pandas reading of
features.parquet (and features_by_source.parquet for a source), and against the rows the app's
own FeatureTable pages through."""

from __future__ import annotations

import csv
import io
import re

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from explorer import features_view, store
from explorer.synthetic import make_run
from sae_transfer.cli import main


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    runs = tmp_path_factory.mktemp("export_runs")
    make_run(runs / "synth", n_features=180, seed=7)
    return runs


def _export(runs, tmp_path, view: str, name: str, *extra: str) -> int:
    return main(["export", "features", "--run", "synth", "--runs-dir", str(runs), "--view", view, "--out", str(tmp_path / name), *extra])


def _naive(runs, sae: str, source: str | None = None) -> pd.DataFrame:
    df = pd.read_parquet(runs / "synth" / "features.parquet")
    df = df[df.sae == sae].copy()
    if source is not None:
        by = pd.read_parquet(runs / "synth" / "features_by_source.parquet")
        by = by[(by.sae == sae) & (by.source == source)].set_index("feature_id")
        for c in store.schema.PER_SOURCE_COLUMNS:
            if c in df.columns and c in by.columns:
                df[c] = df.feature_id.map(by[c])
    return df


def test_a_filtered_sorted_view_equals_a_naive_reading(runs, tmp_path):
    view = "sae=base_sae&class=died~both_alive&density=-6~-1&sort=density_base&desc=1"
    assert _export(runs, tmp_path, view, "v.parquet") == 0
    got = pq.read_table(tmp_path / "v.parquet").to_pandas()
    df = _naive(runs, "base_sae")
    logd = np.log10(df.density_base + 1e-10)
    want = df[df.cross_class.isin(["died", "both_alive"]) & (logd >= -6) & (logd <= -1)]
    want = want.sort_values(["density_base", "feature_id"], ascending=[False, True], kind="stable")
    assert len(got) > 0 and list(got.feature_id) == list(want.feature_id)
    assert list(got.columns) == [c for c in store.TABLE_COLUMNS if c in df.columns]
    np.testing.assert_array_equal(got.density_base.to_numpy(), want.density_base.to_numpy())


def test_csv_and_parquet_hold_the_same_rows_and_the_app_pages_through_them(runs, tmp_path):
    link = "http://127.0.0.1:8501/features?run=synth&sae=finetuned_sae&sort=act_similarity&rows=25&page=2&q=the"
    assert _export(runs, tmp_path, link, "v.csv") == 0 and _export(runs, tmp_path, link, "v.parquet") == 0
    got_csv = pd.read_csv(tmp_path / "v.csv")
    got_pq = pq.read_table(tmp_path / "v.parquet").to_pandas()
    assert list(got_csv.feature_id) == list(got_pq.feature_id)
    ft = store.FeatureTable.open(runs / "synth", "finetuned_sae")
    flt = features_view.feature_filter({"q": "the"})
    pages = [ft.page(flt, "act_similarity", False, 25, off) for off in range(0, ft.count(flt), 25)]
    assert list(got_pq.feature_id) == [int(i) for p in pages for i in p.feature_id]  # every page, not the link's page 2 only
    # the default view leaves out the features dead on both models, as the page does
    assert _export(runs, tmp_path, "", "all.parquet") == 0
    everything = _naive(runs, "base_sae")
    assert len(pq.read_table(tmp_path / "all.parquet")) == int((everything.cross_class != "both_dead").sum())


def test_a_source_view_uses_that_sources_columns(runs, tmp_path):
    sources = list(pd.read_parquet(runs / "synth" / "features_by_source.parquet").source.unique())
    src = sources[0]
    assert _export(runs, tmp_path, f"source={src}&sort=density_finetuned&desc=1&both_dead=1", "s.parquet") == 0
    got = pq.read_table(tmp_path / "s.parquet").to_pandas()
    want = _naive(runs, "base_sae", src).sort_values(["density_finetuned", "feature_id"], ascending=[False, True], kind="stable")
    assert list(got.feature_id) == list(want.feature_id)
    np.testing.assert_allclose(got.density_finetuned.to_numpy(), want.density_finetuned.to_numpy())


def test_csv_text_cells_cannot_run_as_formulas(runs, tmp_path):
    assert _export(runs, tmp_path, "both_dead=1", "f.csv") == 0
    rows = list(csv.DictReader(io.StringIO((tmp_path / "f.csv").read_text())))
    assert all(not re.match(r"[=+\-@\t\r]", r["top_tokens"]) for r in rows)


@pytest.mark.parametrize(
    "view, message",
    [
        ("class=dying", "class="),
        ("sort=nonsense", "sort="),
        ("density=3~4", "density="),
        ("sae=crosscoder", "this run's SAEs"),
        ("source=klingon", "this run's sources"),
        ("colour=red", "unknown parameter"),
        ("q=(&mode=regex", "regular expression"),
    ],
)
def test_a_bad_view_is_one_line_exit_2_and_writes_nothing(runs, tmp_path, capsys, view, message):
    assert _export(runs, tmp_path, view, "bad.csv") == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and "Traceback" not in err
    assert not (tmp_path / "bad.csv").exists() and list(tmp_path.iterdir()) == []


def test_an_existing_file_is_kept_without_overwrite(runs, tmp_path, capsys):
    (tmp_path / "v.csv").write_text("mine")
    assert _export(runs, tmp_path, "", "v.csv") == 2
    assert (tmp_path / "v.csv").read_text() == "mine"
    assert _export(runs, tmp_path, "", "v.csv", "--overwrite") == 0
    assert (tmp_path / "v.csv").read_text().startswith('"feature_id"') or (tmp_path / "v.csv").read_text().startswith("feature_id")
    assert _export(runs, tmp_path, "", "v.txt") == 2 and "--format" in capsys.readouterr().err


def test_the_view_round_trips_through_its_query():
    v = features_view.parse_query("sae=finetuned_sae&status_base=dead~regular&similarity=-0.5~0.5&mode=exact&q=def", ["base_sae", "finetuned_sae"], [])
    again = features_view.parse_query(v.query(), ["base_sae", "finetuned_sae"], [])
    assert again == v and v.filter.similarity_min == -0.5 and v.filter.status_base == ("dead", "regular")


def test_the_views_labels_cover_the_stores_search_modes_and_sort_columns():
    assert tuple(features_view.SEARCH_LABELS) == store.SEARCH_MODES
    assert set(features_view.SORT_COLUMNS) <= set(store.TABLE_COLUMNS) | {"feature_id"}
