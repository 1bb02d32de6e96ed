"""explorer/store.py against a direct pandas/numpy recomputation on a synthetic run (real schema).

Unit tier: no model is loaded. The synthetic run (explorer/synthetic.py) is written through
explorer.rundir, so it also checks that it is a valid run.
"""

from __future__ import annotations

import io
import math
import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from explorer import rundir, schema, store
from explorer.synthetic import NASTY_TOKENS, make_run

N = 300


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    # small chunks -> many row groups, so pruning is actually exercised
    return make_run(tmp_path_factory.mktemp("runs") / "synth", n_features=N, seed=1, chunk_features=64)


@pytest.fixture(scope="module")
def con():
    # a cursor, as the app uses it: settings must reach it too
    return store.connect().cursor()


@pytest.fixture(scope="module")
def feats(run_dir):
    return pd.read_parquet(run_dir / "features.parquet")


@pytest.fixture(scope="module")
def examples(run_dir):
    return pd.read_parquet(run_dir / "examples.parquet")


def _logd(x):
    return np.log10(x + 1e-10)


def test_synthetic_run_is_a_valid_run(run_dir):
    manifest = rundir.open_run(run_dir)
    assert manifest["d_sae"] == {"base_sae": N, "finetuned_sae": N}
    for name, entry in manifest["files"].items():
        assert pq.read_schema(run_dir / name).names == schema.TABLES[name].names
        assert pq.ParquetFile(run_dir / name).metadata.num_rows == entry["rows"]


def test_synthetic_run_is_internally_consistent(feats, examples):
    # status follows density, class follows status, dead features have no examples on that model
    for m in schema.MODELS:
        assert ((feats[f"density_{m}"] == 0) == (feats[f"status_{m}"] == "dead")).all()
        dead = feats[feats[f"status_{m}"] == "dead"][["sae", "feature_id"]]
        ex_m = examples[examples["model"] == m]
        assert dead.merge(ex_m, on=["sae", "feature_id"]).empty
    died = feats[(feats.status_base != "dead") & (feats.status_finetuned == "dead")]
    assert (died.cross_class == "died").all() and len(died) > 0
    # examples sorted by (sae, feature_id): the row-group pruning relies on it
    keys = list(zip(examples["sae"], examples["feature_id"]))
    assert keys == sorted(keys)


def test_vocab_matches_the_table(run_dir):
    v = store.vocab(run_dir)
    t = pd.read_parquet(run_dir / "vocab.parquet")
    assert len(v) == len(t)
    assert all(v[i] == s for i, s in zip(t.token_id, t.token_str))
    assert NASTY_TOKENS[0] in v


def test_small_tables(con, run_dir):
    for fn, name in ((store.metrics, "metrics"), (store.resid_position, "resid_position"), (store.resid_histograms, "resid_histograms"), (store.resid_summary, "resid_summary")):
        got = fn(con, run_dir)
        ref = pd.read_parquet(run_dir / f"{name}.parquet")
        assert len(got) == len(ref) and set(got.columns) == set(ref.columns)
    pos = store.resid_position(con, run_dir)
    assert pos["position"].is_monotonic_increasing


def test_counts(con, run_dir, feats):
    sc = store.status_counts(con, run_dir)
    for (sae, m), grp in sc.groupby(["sae", "model"]):
        ref = feats[feats.sae == sae][f"status_{m}"].value_counts()
        assert dict(zip(grp.status, grp.n)) == ref.to_dict()
    cc = store.cross_class_counts(con, run_dir, "base_sae")
    ref = feats[feats.sae == "base_sae"].cross_class.value_counts()
    assert cc == {c: int(ref.get(c, 0)) for c in schema.CROSS_CLASSES}


def _born_lost_ref(feats, which, thr):
    sae, status = ("finetuned_sae", "status_finetuned") if which == "born" else ("base_sae", "status_base")
    f = feats[(feats.sae == sae) & (feats[status] != "dead")]
    score = f.match_score.astype(float)
    return f[score.isna() | (score < thr)]


@pytest.mark.parametrize("thr", [0.0, 0.3, 0.5, 0.9])
def test_born_lost(con, run_dir, feats, thr):
    counts = store.born_lost_counts(con, run_dir, thr)
    for which in ("born", "lost"):
        ref = _born_lost_ref(feats, which, thr)
        assert counts[which] == len(ref)
        page, n = store.born_lost_page(con, run_dir, which, thr, limit=7, offset=3)
        assert n == len(ref)
        ref_sorted = ref.assign(_s=ref.match_score.fillna(-1e300)).sort_values(["_s", "feature_id"])
        assert page.feature_id.tolist() == ref_sorted.feature_id.iloc[3:10].tolist()


FILTERS = [
    store.FeatureFilter(),
    store.FeatureFilter(status_base=("regular",), status_finetuned=("regular", "dense")),
    store.FeatureFilter(cross_class=("died", "woke")),
    store.FeatureFilter(density_model="finetuned", log_density_min=-4.0, log_density_max=-2.0),
    store.FeatureFilter(similarity_min=0.2, similarity_max=0.8, include_nan_similarity=False),
    store.FeatureFilter(similarity_min=0.5, include_nan_similarity=True),
    store.FeatureFilter(include_nan_similarity=False),
    store.FeatureFilter(search="SCRIPT"),
    store.FeatureFilter(search="_"),  # a LIKE wildcard must match literally
    store.FeatureFilter(search="'; DROP TABLE x; --"),
]


def _filter_ref(feats, sae, f: store.FeatureFilter) -> pd.DataFrame:
    d = feats[feats.sae == sae]
    if f.status_base:
        d = d[d.status_base.isin(f.status_base)]
    if f.status_finetuned:
        d = d[d.status_finetuned.isin(f.status_finetuned)]
    if f.cross_class:
        d = d[d.cross_class.isin(f.cross_class)]
    logd = _logd(d[f"density_{f.density_model}"])
    if f.log_density_min is not None:
        d = d[logd >= f.log_density_min]
        logd = _logd(d[f"density_{f.density_model}"])
    if f.log_density_max is not None:
        d = d[logd <= f.log_density_max]
    sim = d.act_similarity
    ok = pd.Series(True, index=d.index)
    if f.similarity_min is not None:
        ok &= sim >= f.similarity_min
    if f.similarity_max is not None:
        ok &= sim <= f.similarity_max
    if f.include_nan_similarity:
        ok |= sim.isna()
    else:
        ok &= sim.notna()
    d = d[ok]
    if f.search:
        d = d[d.top_tokens.fillna("").str.lower().str.contains(f.search.lower(), regex=False)]
    return d


@pytest.mark.parametrize("flt", FILTERS, ids=range(len(FILTERS)))
@pytest.mark.parametrize("sort_by,desc", [("feature_id", False), ("act_similarity", True), ("density_base", False), ("match_score", True)])
def test_features_page_matches_pandas(con, run_dir, feats, flt, sort_by, desc):
    ref = _filter_ref(feats, "base_sae", flt)
    assert store.count_features(con, run_dir, "base_sae", flt) == len(ref)
    # NaN last in either direction, ties by feature_id
    key = ref[sort_by].astype(float)
    ref = ref.assign(_nan=key.isna(), _k=-key if desc else key).sort_values(["_nan", "_k", "feature_id"])
    pages = [store.features_page(con, run_dir, "base_sae", flt, sort_by, desc, limit=37, offset=o) for o in range(0, len(ref) + 37, 37)]
    got = pd.concat(pages) if pages else pd.DataFrame()
    assert got.feature_id.tolist() == ref.feature_id.tolist()
    assert list(pages[0].columns) == list(store.TABLE_COLUMNS)
    assert all(len(p) <= 37 for p in pages)


@pytest.fixture(scope="module")
def table(run_dir):
    return {sae: store.FeatureTable.open(run_dir, sae) for sae in schema.SAES}


ALL_SORTS = [(c, d) for c in store.SORTABLE for d in (False, True)]


@pytest.mark.parametrize("flt", FILTERS, ids=range(len(FILTERS)))
def test_feature_table_matches_pandas_and_duckdb(con, run_dir, feats, table, flt):
    """The in-memory table the app pages with answers exactly what DuckDB answers, on every
    filter, every sortable column (strings by their bytes, NaN/NULL last, ties by id) and both
    directions, at the first page, a middle page, a ragged last page and past the end."""
    for sae in schema.SAES:
        ref = _filter_ref(feats, sae, flt)
        assert table[sae].count(flt) == len(ref) == store.count_features(con, run_dir, sae, flt)
        for sort_by, desc in ALL_SORTS:
            offsets = sorted({0, len(ref) // 2, max(0, len(ref) - 5), len(ref) + 3})
            for off in offsets:
                got = table[sae].page(flt, sort_by, desc, 11, off)
                want = store.features_page(con, run_dir, sae, flt, sort_by, desc, 11, off)
                assert got.feature_id.tolist() == want.feature_id.tolist(), (sae, sort_by, desc, off)
                pd.testing.assert_frame_equal(got, want)
        # the id list in order equals a pandas sort with NaN last and ties by id
        key = ref["max_act_finetuned"].astype(float)
        ref_sorted = ref.assign(_nan=key.isna(), _k=-key).sort_values(["_nan", "_k", "feature_id"])
        assert table[sae].ids(flt, "max_act_finetuned", True).tolist() == ref_sorted.feature_id.tolist()


def test_feature_table_tiny_hand_checked_case(tmp_path):
    """Ties, NaN, -0.0 and NULL on a five-row table, checked by hand."""
    t = pa.table({
        "feature_id": pa.array([0, 1, 2, 3, 4], pa.int32()),
        "status_base": ["regular", "dead", "regular", None, "dense"],
        "status_finetuned": ["dead", "dead", "regular", "regular", "dense"],
        "cross_class": ["died", "both_dead", "both_alive", "woke", "both_alive"],
        "density_base": [0.01, 0.0, 0.01, 0.0, 0.5],
        "act_similarity": [float("nan"), 0.5, -0.0, 0.0, 0.9],
        "match_feature_id": pa.array([3, None, 1, None, 0], pa.int32()),
        "top_tokens": ["Def x", None, "<script>", "def", "undefined"],
    })
    ft = store.FeatureTable(t)
    assert ft.ids(sort_by="density_base").tolist() == [1, 3, 0, 2, 4]
    assert ft.ids(sort_by="density_base", descending=True).tolist() == [4, 0, 2, 1, 3]
    # NaN last both ways; -0.0 ties with 0.0 (broken by id)
    assert ft.ids(sort_by="act_similarity").tolist() == [2, 3, 1, 4, 0]
    assert ft.ids(sort_by="act_similarity", descending=True).tolist() == [4, 1, 2, 3, 0]
    assert ft.ids(sort_by="match_feature_id").tolist() == [4, 2, 0, 1, 3]
    # strings by bytes ("dead" < "dense" < "regular"), NULL last
    assert ft.ids(sort_by="status_base").tolist() == [1, 4, 0, 2, 3]
    assert ft.ids(sort_by="status_base", descending=True).tolist() == [0, 2, 4, 1, 3]
    assert ft.count(store.FeatureFilter(search="DEF")) == 3
    assert ft.ids(store.FeatureFilter(search="<script>")).tolist() == [2]
    assert ft.count(store.FeatureFilter(include_nan_similarity=False)) == 4
    assert ft.ids(store.FeatureFilter(similarity_min=0.0, similarity_max=0.5)).tolist() == [0, 1, 2, 3]
    assert ft.ids(store.FeatureFilter(similarity_min=0.0, similarity_max=0.5, include_nan_similarity=False)).tolist() == [1, 2, 3]
    assert ft.ids(store.FeatureFilter(status_base=("regular", "bogus"))).tolist() == [0, 2]
    assert ft.count(store.FeatureFilter(status_base=("bogus",))) == 0
    assert ft.ids(store.FeatureFilter(log_density_min=-2.0)).tolist() == [0, 2, 4]
    assert ft.page(limit=2, offset=4).feature_id.tolist() == [4]
    assert ft.page(limit=2, offset=9).empty
    with pytest.raises(ValueError):
        ft.page(sort_by="feature_id; DROP TABLE x")
    with pytest.raises(ValueError):
        ft.count(store.FeatureFilter(density_model="nope"))


def test_feature_table_keeps_recent_masks_only(table):
    ft = table["base_sae"]
    flts = [store.FeatureFilter(log_density_min=-float(i)) for i in range(ft.MAX_MASKS + 5)]
    counts = [ft.count(f) for f in flts]
    assert len(ft._masks) <= ft.MAX_MASKS
    assert [ft.count(f) for f in flts] == counts  # evicted ones are recomputed, same answer


def test_feature_table_is_thread_safe(run_dir, feats):
    from concurrent.futures import ThreadPoolExecutor

    ft = store.FeatureTable.open(run_dir, "base_sae")
    fresh = store.FeatureTable.open(run_dir, "base_sae")
    jobs = [(flt, s, d) for flt in FILTERS for s, d in ALL_SORTS[:8]]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda j: ft.ids(*j).tolist(), jobs * 2))
    assert got == [fresh.ids(*j).tolist() for j in jobs * 2]


def test_search_finds_hostile_tokens_literally(con, run_dir, feats):
    page = store.features_page(con, run_dir, "base_sae", store.FeatureFilter(search="<script>alert(1)</script>"), limit=1000)
    assert len(page) > 0
    assert all("<script>alert(1)</script>" in t for t in page.top_tokens)


def test_nan_filters_are_not_fooled_by_parquet_statistics(con, run_dir, feats):
    # pyarrow's min/max statistics exclude NaN; DuckDB must still see the NaN rows
    n_nan = int(feats[feats.sae == "base_sae"].act_similarity.isna().sum())
    assert n_nan > 0
    n_all = store.count_features(con, run_dir, "base_sae")
    n_no_nan = store.count_features(con, run_dir, "base_sae", store.FeatureFilter(include_nan_similarity=False))
    assert n_all - n_no_nan == n_nan


def test_bad_sort_or_column_is_refused(con, run_dir):
    with pytest.raises(ValueError):
        store.features_page(con, run_dir, "base_sae", sort_by="feature_id; DROP TABLE x")
    with pytest.raises(ValueError):
        store.histogram(con, run_dir, "base_sae", "density_base) FROM x --")


def test_features_csv(con, run_dir, feats):
    flt = store.FeatureFilter(status_base=("regular",))
    got = pd.read_csv(io.BytesIO(store.features_csv(con, run_dir, "base_sae", flt, "feature_id", False)))
    ref = _filter_ref(feats, "base_sae", flt)
    assert got.feature_id.tolist() == sorted(ref.feature_id.tolist())
    assert list(got.columns) == list(store.TABLE_COLUMNS)


def test_feature_row(con, run_dir, feats):
    for sae, fid in (("base_sae", 0), ("finetuned_sae", N - 1), ("base_sae", 123)):
        row = store.feature(con, run_dir, sae, fid)
        ref = feats[(feats.sae == sae) & (feats.feature_id == fid)].iloc[0]
        for col in ("density_base", "status_finetuned", "top_tokens", "match_feature_id"):
            a, b = row[col], ref[col]
            assert (a == b) or (a is None and pd.isna(b)) or (isinstance(a, float) and math.isnan(a) and pd.isna(b))
        assert list(row["nn_feature_ids"]) == list(ref["nn_feature_ids"])
        assert list(row["act_hist_base"]) == list(ref["act_hist_base"])
    assert store.feature(con, run_dir, "base_sae", N + 5) is None


def test_features_by_ids_keeps_order(con, run_dir, feats):
    ids = [17, 3, 250, 3000, 42]
    got = store.features_by_ids(con, run_dir, "finetuned_sae", ids, ["density_base"])
    assert got.feature_id.tolist() == [17, 3, 250, 42]
    ref = feats[feats.sae == "finetuned_sae"].set_index("feature_id").density_base
    assert np.allclose(got.density_base, ref.loc[[17, 3, 250, 42]])


def test_examples_index_prunes_and_reads_exactly(run_dir, examples):
    idx = store.ExamplesIndex.open(run_dir)
    n_groups = pq.ParquetFile(run_dir / "examples.parquet").metadata.num_row_groups
    assert n_groups > 4
    present = examples.groupby("sae").feature_id.unique()
    picks = [("base_sae", int(present["base_sae"][0])), ("base_sae", int(present["base_sae"][len(present["base_sae"]) // 2])),
             ("finetuned_sae", int(present["finetuned_sae"][-1])), ("finetuned_sae", int(present["finetuned_sae"][40]))]
    for sae, fid in picks:
        groups = idx.row_groups(sae, [fid])
        assert 1 <= len(groups) <= 2 < n_groups  # pruned to the group(s) holding it
        got = store.feature_examples(idx, sae, fid)
        ref = examples[(examples.sae == sae) & (examples.feature_id == fid)]
        assert len(got) == len(ref) > 0
        key = ["model", "kind", "bin", "rank"]
        a = got.sort_values(key, na_position="first").reset_index(drop=True)
        b = ref.sort_values(key, na_position="first").reset_index(drop=True)
        assert np.allclose(a.activation, b.activation)
        assert [list(x) for x in a.token_ids] == [list(x) for x in b.token_ids]
        # display order: per model, top (by rank) before quantile bins (high to low)
        for m, g in got.groupby("model", sort=False):
            kinds = g.kind.tolist()
            assert kinds == sorted(kinds, key=lambda k: k != "top")
            tops = g[g.kind == "top"]
            assert tops["rank"].tolist() == sorted(tops["rank"].tolist())
            assert (np.diff(tops.activation.to_numpy()) <= 1e-6).all()
    assert store.feature_examples(idx, "base_sae", N + 10).empty


def test_row_group_cache_reads_what_the_file_holds_within_its_budget(tmp_path, run_dir, examples):
    """ExamplesIndex.read through a RowGroupCache equals the uncached read (and pandas' read of
    the whole file), keeps at most its budget, and never answers a rewritten file from the old one."""
    t = pq.read_table(run_dir / "examples.parquet")
    (tmp_path / "x").mkdir()
    path = tmp_path / "x" / "examples.parquet"
    pq.write_table(t, path, row_group_size=400)
    one_group = pq.ParquetFile(path).read_row_group(0).nbytes
    cache = store.RowGroupCache(int(2.5 * one_group))  # room for two row groups
    cached, plain = store.ExamplesIndex.open(tmp_path / "x", cache=cache), store.ExamplesIndex.open(tmp_path / "x")
    picks = [("base_sae", 5), ("base_sae", 6), ("finetuned_sae", 40), ("base_sae", 5), ("base_sae", 250), ("finetuned_sae", 41)]
    for sae, fid in picks:
        a, b = cached.read(sae, [fid]), plain.read(sae, [fid])
        assert a.equals(b) and a.num_rows == len(examples[(examples.sae == sae) & (examples.feature_id == fid)]) > 0
        assert cached.read(sae, [fid], ["activation"]).equals(plain.read(sae, [fid], ["activation"]))
        assert cache.nbytes <= cache.budget_bytes and len(cache._items) <= 2
    assert cache.hits > 0 and cache.misses > 2  # the repeat was served from memory, the rest read
    # the file rewritten (other rows): a new index reads the new file, not the cached groups
    t2 = t.filter(pc.equal(t.column("sae"), "finetuned_sae"))
    pq.write_table(t2, path, row_group_size=400)
    again = store.ExamplesIndex.open(tmp_path / "x", cache=cache)
    assert again.read("base_sae", [5]).num_rows == 0
    assert again.read("finetuned_sae", [40]).equals(store.ExamplesIndex.open(tmp_path / "x").read("finetuned_sae", [40]))
    # budget 0: no cache at all
    assert store.ExamplesIndex.open(tmp_path / "x", cache=store.RowGroupCache(0)).cache is None


def test_examples_without_statistics_still_read_correctly(tmp_path, run_dir, examples):
    t = pq.read_table(run_dir / "examples.parquet")
    (tmp_path / "x").mkdir()
    pq.write_table(t, tmp_path / "x" / "examples.parquet", row_group_size=500, write_statistics=False)
    idx = store.ExamplesIndex.open(tmp_path / "x")
    got = store.feature_examples(idx, "base_sae", 5)
    assert len(got) == len(examples[(examples.sae == "base_sae") & (examples.feature_id == 5)])


def test_top_examples(run_dir, examples):
    idx = store.ExamplesIndex.open(run_dir)
    ids = [1, 2, 3, 200, 299]
    got = store.top_examples(idx, "base_sae", ids, "base")
    ref = examples[(examples.sae == "base_sae") & examples.feature_id.isin(ids) & (examples.model == "base") & (examples.kind == "top") & (examples["rank"] == 0)]
    assert sorted(got.feature_id) == sorted(ref.feature_id)
    assert np.allclose(got.sort_values("feature_id").activation, ref.sort_values("feature_id").activation)


@pytest.mark.parametrize("column,log", [("act_similarity", False), ("logit_similarity", False), ("act_error", False), ("density_base", True), ("density_finetuned", True)])
def test_histogram_matches_numpy(con, run_dir, feats, column, log):
    vals = feats[feats.sae == "base_sae"][column].to_numpy(dtype=float)
    if log:
        vals = _logd(vals)
    lo, hi = (-10.0, 0.0) if log else (-1.0, 1.0) if column != "act_error" else (None, None)
    h = store.histogram(con, run_dir, "base_sae", column, 40, lo, hi, log_density=log)
    finite = vals[~np.isnan(vals)]
    rng = (lo, hi) if lo is not None else (finite.min(), finite.max())
    ref, edges = np.histogram(finite, bins=40, range=rng)
    assert np.allclose(h.bin_left, edges[:-1]) and np.allclose(h.bin_right, edges[1:])
    # identical except possibly for values within float rounding of an edge
    assert np.abs(h["count"].to_numpy() - ref).sum() <= 2 and h["count"].sum() == ref.sum()
    assert h.attrs["n_nan"] == int(np.isnan(vals).sum())


def test_density_regression_matches_numpy(con, run_dir, feats):
    f = feats[feats.sae == "base_sae"]
    x, y = _logd(f.density_base.to_numpy()), _logd(f.density_finetuned.to_numpy())
    reg = store.density_regression(con, run_dir, "base_sae")
    slope, intercept = np.polyfit(x, y, 1)
    assert reg["n"] == len(f)
    assert reg["slope"] == pytest.approx(slope, rel=1e-9) and reg["intercept"] == pytest.approx(intercept, rel=1e-9)
    assert reg["r"] == pytest.approx(np.corrcoef(x, y)[0, 1], rel=1e-9)
    alive = (f.density_base > 0) & (f.density_finetuned > 0)
    reg2 = store.density_regression(con, run_dir, "base_sae", alive_on_both=True)
    assert reg2["n"] == int(alive.sum())
    assert reg2["r"] == pytest.approx(np.corrcoef(x[alive], y[alive])[0, 1], rel=1e-9)


def test_scatter_sample(con, run_dir):
    full = store.scatter_sample(con, run_dir, "base_sae", max_points=10_000)
    assert len(full) == N and full.attrs["n_total"] == N
    part = store.scatter_sample(con, run_dir, "base_sae", max_points=50)
    assert len(part) == 50 and part.feature_id.is_unique
    assert part.feature_id.tolist() == store.scatter_sample(con, run_dir, "base_sae", max_points=50).feature_id.tolist()  # deterministic


def test_class_page_and_candidates(con, run_dir, feats):
    page, n = store.class_page(con, run_dir, "base_sae", "woke", limit=5, offset=0)
    ref = feats[(feats.sae == "base_sae") & (feats.cross_class == "woke")].sort_values(["density_finetuned", "feature_id"], ascending=[False, True])
    assert n == len(ref) and page.feature_id.tolist() == ref.feature_id.iloc[:5].tolist()
    m = pd.read_parquet(run_dir / "matches.parquet")
    got = store.candidate_matches(con, run_dir, "base_sae", 7)
    ref = m[m.base_feature_id == 7]
    assert sorted(got.other_feature_id) == sorted(ref.finetuned_feature_id)
    got = store.candidate_matches(con, run_dir, "finetuned_sae", int(m.finetuned_feature_id.iloc[0]))
    assert len(got) >= 1


def test_opening_and_querying_writes_nothing(tmp_path):
    d = make_run(tmp_path / "ro", n_features=20, seed=3)
    before = {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in d.iterdir()}
    os.chmod(d, 0o555)  # a read-only directory: any write would fail
    try:
        con = store.connect()
        store.features_page(con, d, "base_sae")
        store.feature_examples(store.ExamplesIndex.open(d), "base_sae", 1)
        store.histogram(con, d, "base_sae", "act_similarity")
        store.vocab(d)
    finally:
        os.chmod(d, 0o755)
    assert {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in d.iterdir()} == before


def test_one_sae_run(tmp_path):
    d = make_run(tmp_path / "one", n_features=30, two_saes=False, seed=4)
    con = store.connect()
    assert rundir.open_run(d)["saes"] == ["base_sae"]
    assert store.candidate_matches(con, d, "base_sae", 0).empty
    assert store.count_features(con, d, "base_sae") == 30
