"""Smoke runs of the B3 (memory), B4 (store latency) and B6 (time-to-content) benchmark scripts.

They keep the scripts working; no speed or memory figure is asserted (the numbers live in
benchmarks/RESULTS.md). What is asserted is that each script measured what it says it measured.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import load_benchmark

REPO = Path(__file__).resolve().parent.parent


_load = load_benchmark


def test_b3_config_is_the_demo_config_with_our_token_count(tmp_path):
    """The B3 config reads back through the precompute's own loader: demo settings, our n_tokens."""
    from precompute.config import RunConfig

    b3 = _load("b3_memory")
    cfg = tmp_path / "c.toml"
    b3.write_config(cfg, "b3-x", Path("/somewhere/demo"), 51200, 128)
    got = RunConfig.from_toml(cfg)
    ref = RunConfig.from_toml(REPO / "configs" / "demo.toml")
    assert got.run_id == "b3-x"
    assert got.sample.n_tokens == 51200 and got.sample.context_size == 128
    assert set(got.saes) == set(ref.saes) == {"base_sae", "finetuned_sae", "base_sae_twin"}
    assert Path(got.models["base"].path) == Path("/somewhere/demo/base")
    assert Path(got.saes["finetuned_sae"].path) == Path("/somewhere/demo/saes/finetuned_sae")
    assert got.examples == ref.examples and got.thresholds == ref.thresholds


@pytest.mark.slow
def test_b3_smoke(tiny_demo, tmp_path):
    b3 = _load("b3_memory")
    out = tmp_path / "b3.json"
    assert b3.main(["--smoke", "--demo", str(tiny_demo), "--work", str(tmp_path / "work"), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    tokens = res["settings"]["tokens"]
    assert len(tokens) == 2 and len(res["runs"]) == 2
    for run in res["runs"]:
        # the run it measured is complete and used the token count it claims
        manifest = json.loads((tmp_path / "work" / "runs" / f"b3-{run['n_tokens']}" / "manifest.json").read_text())
        assert manifest["complete"] and manifest["n_tokens"] == run["n_tokens"]
        assert run["peak_rss_bytes"] > 50 * 2**20  # a python + torch process; ru_maxrss was read
    r = {x["n_tokens"]: x["peak_rss_bytes"] for x in res["runs"]}
    assert res["ratio_largest_over_smallest"] == pytest.approx(r[max(tokens)] / r[min(tokens)])


@pytest.mark.slow
def test_b4_smoke(tmp_path):
    b4 = _load("b4_store_latency")
    out = tmp_path / "b4.json"
    assert b4.main(["--smoke", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res["runs"]) == {"synthetic-300", "synthetic-600"}
    for name, r in res["runs"].items():
        for what in ("feature_page", "table_page", "table_page_duckdb"):
            assert r[what]["n"] == 20
            assert 0 < r[what]["p50_ms"] <= r[what]["p95_ms"] <= r[what]["max_ms"]
        d = r["disk"]
        assert d["total_bytes"] == sum(d["files"].values())
        assert d["n_features_all_saes"] == 2 * r["d_sae"]
        assert d["bytes_per_feature_per_model"] == pytest.approx(d["total_bytes"] / (2 * r["d_sae"] * 2))
    # the full example set (300) vs 2 top examples and no quantile ones (600): rows per feature
    assert res["runs"]["synthetic-300"]["disk"]["representative"] and not res["runs"]["synthetic-600"]["disk"]["representative"]
    assert res["runs"]["synthetic-300"]["mean_example_rows_per_feature"] > 10 * res["runs"]["synthetic-600"]["mean_example_rows_per_feature"]


def test_b4_feature_page_fetches_what_the_page_shows(tmp_path):
    """The B4 feature-page fetch returns every example of the feature on both models."""
    import pyarrow.parquet as pq

    from explorer.synthetic import make_run

    b4 = _load("b4_store_latency")
    run = make_run(tmp_path / "s", n_features=50, seed=2, chunk_features=16)
    bench = b4.Bench(run, seed=0)
    ex = pq.read_table(run / "examples.parquet", columns=["sae", "feature_id"]).to_pandas()
    for fid in (0, 7, 49):
        want = int(((ex.sae == "base_sae") & (ex.feature_id == fid)).sum())
        assert bench.feature_page(fid) == want
    for draw in (0.0, 0.5, 0.99):
        n = bench.table_page(b4.FILTERS[1][1], "act_similarity", True, draw)
        assert 0 < n <= 50
        assert bench.table_page_duckdb(b4.FILTERS[1][1], "act_similarity", True, draw) == n


@pytest.mark.browser
@pytest.mark.slow
def test_b6_smoke(tmp_path):
    # In a subprocess: the session's browser fixture may hold a sync Playwright in this process.
    out = tmp_path / "b6.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "b6_time_to_content.py"), "--smoke", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    res = json.loads(out.read_text())
    (run,) = res["runs"].values()
    assert len(run["cold_ms"]) == 1 and len(run["warm_ms"]) == 1
    assert all(ms > 0 for ms in run["cold_ms"] + run["warm_ms"])
    assert len(set(run["features"])) == 2  # two different features: the warm one was not a cache hit
    assert len(run["server_script_ms"]) == 1 and run["server_script_ms"][0] > 0  # the page's script run, no browser
