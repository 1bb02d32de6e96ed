"""Smoke runs of the benchmark scripts: they keep working; speed is never asserted here.

B1's SAEDashboard side needs its own venv (benchmarks/saedashboard_venv.sh), which CI does not
build: the smoke test runs our side, and the SAEDashboard side only where the venv exists.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import load_benchmark

REPO = Path(__file__).resolve().parent.parent


_load = load_benchmark


def test_b1_config_is_a_valid_precompute_config(tiny_demo, tmp_path):
    """The config the B1 driver writes reads back through the precompute's own config loader."""
    from precompute.config import RunConfig

    b1 = _load("b1_vs_saedashboard")
    corpus = tmp_path / "corpus.parquet"
    rows, context = b1.make_corpus(tiny_demo, 3, corpus)
    assert (rows, context) == (3, 32)
    cfg_path = tmp_path / "c.toml"
    b1.write_config(cfg_path, "b1-x", tiny_demo, corpus, rows * context, context, both_saes=True)
    cfg = RunConfig.from_toml(cfg_path)
    assert cfg.run_id == "b1-x"
    assert set(cfg.saes) == {"base_sae", "finetuned_sae"}
    assert Path(cfg.models["base"].path) == tiny_demo / "base"
    assert cfg.sample.n_tokens == 3 * 32 and cfg.sample.context_size == 32

    import pyarrow.parquet as pq

    got = pq.read_table(corpus).column("token_ids").to_pylist()
    want = pq.read_table(tiny_demo / "eval_corpus.parquet").column("token_ids").to_pylist()[:3]
    assert got == want


def test_b1_runner_hand_encode_matches_sae_lens(tiny_demo):
    """The runner's reference encode (used to check SAEDashboard's output) equals sae_lens's encode."""
    import torch
    from safetensors.torch import load_file

    from explorer.models import ModelSpec, SAESpec, load_model, load_sae, sae_hook_name

    runner = _load("_saedashboard_runner")
    sae = load_sae(SAESpec(path=str(tiny_demo / "saes" / "base_sae")))
    model = load_model(ModelSpec(path=str(tiny_demo / "base")))
    tokens = runner.load_tokens(tiny_demo / "eval_corpus.parquet", 4)
    assert tokens.shape == (4, 32)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=sae_hook_name(sae))
        x = cache[sae_hook_name(sae)]
        want = sae.encode(x)
    got = runner.hand_encode(x, load_file(str(tiny_demo / "saes" / "base_sae" / "sae_weights.safetensors")))
    assert (want > 0).any()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_b1_summary_ratios():
    b1 = _load("b1_vs_saedashboard")
    reps = [
        {"saedashboard": {"seconds_per_feature_token": 10.0, "wall_seconds": 100.0, "output_bytes": 1000, "output_bytes_per_feature": 100.0},
         "ours_base_sae": {"seconds_per_feature_token": 0.5, "wall_seconds": 5.0, "output_bytes": 200, "output_bytes_per_feature": 20.0}},
        {"saedashboard": {"seconds_per_feature_token": 12.0, "wall_seconds": 120.0, "output_bytes": 1000, "output_bytes_per_feature": 100.0},
         "ours_base_sae": {"seconds_per_feature_token": 2.0, "wall_seconds": 20.0, "output_bytes": 200, "output_bytes_per_feature": 25.0}},
        {"saedashboard": {"seconds_per_feature_token": 9.0, "wall_seconds": 90.0, "output_bytes": 1000, "output_bytes_per_feature": 100.0},
         "ours_base_sae": {"seconds_per_feature_token": 1.0, "wall_seconds": 10.0, "output_bytes": 200, "output_bytes_per_feature": 50.0}},
    ]
    s = b1.summarize(reps, ["saedashboard", "ours_base_sae"])
    r = s["ratio_vs_saedashboard"]["ours_base_sae"]
    assert r["throughput_per_feature_token_each_rep"] == [20.0, 6.0, 9.0]
    assert r["throughput_per_feature_token_median"] == 9.0  # median of per-rep ratios, not ratio of medians (10/1)
    assert r["output_bytes_per_feature_sd_over_ours_median"] == 4.0
    assert s["median"]["saedashboard"]["wall_seconds"] == 100.0
    assert s["median"]["ours_base_sae"]["runs"] == 3


def _check_ours(rep: dict, tool: str, n_tokens: int) -> None:
    from explorer.rundir import open_run

    row = rep[tool]
    run_dir = Path(row["run_dir"])
    manifest = open_run(run_dir)
    assert row["n_tokens"] == manifest["n_tokens"] == n_tokens
    assert row["n_features"] == sum(manifest["d_sae"].values())
    assert row["output_bytes"] == sum(p.stat().st_size for p in run_dir.rglob("*") if p.is_file())
    assert row["seconds_per_feature_token"] == pytest.approx(row["wall_seconds"] / (row["n_features"] * n_tokens))


def test_b1_smoke(tiny_demo, tmp_path):
    """Our side of `b1_vs_saedashboard.py --smoke` on the tiny demo: both variants, checked numbers."""
    b1 = _load("b1_vs_saedashboard")
    out = tmp_path / "b1.json"
    assert b1.main(["--demo", str(tiny_demo), "--smoke", "--skip-saedashboard", "--bounds", "--work", str(tmp_path / "work"), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["settings"]["n_tokens"] == 2 * 32
    # --bounds: B7's limit child on the same tokens, one row per variant, no SAEDashboard ratio without SAEDashboard
    bounds = result["bounds"]
    assert bounds["n_tokens"] == 2 * 32 and bounds["threads"] == 1
    for v in b1.BOUND_VARIANTS:
        assert bounds[v]["cpu_seconds"] > 0 and bounds[v]["what"] == b1.BOUND_VARIANTS[v]
        assert "saedashboard_cpu_per_feature_token_over_this" not in bounds[v]
    assert len(result["reps"]) == 1
    rep = result["reps"][0]
    assert set(rep) == {"order", "git", "ours_base_sae", "ours_both_saes"}
    _check_ours(rep, "ours_base_sae", 64)
    _check_ours(rep, "ours_both_saes", 64)
    assert rep["ours_base_sae"]["d_sae"] == {"base_sae": 64}
    assert rep["ours_both_saes"]["d_sae"] == {"base_sae": 64, "finetuned_sae": 64}
    for tool in ("ours_base_sae", "ours_both_saes"):
        assert result["checks"][f"{tool}_tokens_vs_corpus"] == {"sequences": 2, "identical_set": True}
        assert result["summary"]["median"][tool]["wall_seconds"] == rep[tool]["wall_seconds"]


def test_b1_smoke_saedashboard_side(tiny_demo, tmp_path):
    """SAEDashboard's side of the smoke, where its venv has been built (not in CI)."""
    b1 = _load("b1_vs_saedashboard")
    if not b1.venv_ready():
        pytest.skip("the SAEDashboard venv is not built (bash benchmarks/saedashboard_venv.sh)")
    out = tmp_path / "b1.json"
    assert b1.main(["--demo", str(tiny_demo), "--smoke", "--skip-ours", "--work", str(tmp_path / "work"), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    sd = result["reps"][0]["saedashboard"]
    assert sd["n_features"] == 8 and sd["n_tokens"] == 64
    assert sd["output_check"] == {"features_checked": 8, "density_mismatches": 0, "top_activation_mismatches": 0, "n_alive": sd["output_check"]["n_alive"]}
    assert result["checks"]["venv_model_sae_vs_explorer_loaders"]["max_abs_diff_features"] < 1e-4
    assert sd["output_bytes"] > 0 and sd["versions"]["sae-dashboard"] == "0.8.0"


def test_b9_page_script_smoke(tmp_path):
    """B9 (every page's server-side script run, tests/st_protocol.py) on a small synthetic run."""
    out = tmp_path / "b9.json"
    assert _load("b9_page_script").main(["--smoke", "--n", "2", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res["summary"]) == {"overview", "features", "feature (new)", "dead-born", "similarity"}
    for s in res["summary"].values():
        assert s["n"] == 2 and 0 < s["median_ms"] <= s["max_ms"]


def test_cpu_side_per_batch_smoke(tmp_path):
    """The GPU path's CPU-side benchmark at a tiny width, cold and warm: every part is timed, and
    the sparse accumulators through precompute.stream.BatchUpdates on 0 and 2 threads end in states
    bitwise equal to the part-by-part serial pass."""
    import torch

    threads = torch.get_num_threads()
    try:
        mod = _load("cpu_side_per_batch")
        out = tmp_path / "cpu_side.json"
        args = ["--batches", "2", "--warm-tokens", "0", "100000", "--threads", "0", "2", "--d-model", "32", "--d-sae", "512", "--out", str(out)]
        assert mod.main(args) == 0
    finally:
        torch.set_num_threads(threads)
    res = json.loads(out.read_text())["results"]
    assert set(res) == {"0", "100000"}
    for r in res.values():
        assert r["nnz"] > 0 and r["median"]["cross"] > 0 and r["median"]["total"] >= r["median"]["sparse total"]
        assert {n: t["bitwise_equal_to_serial"] for n, t in r["threads"].items()} == {"0": True, "2": True}


def test_b7_matching_smoke(tmp_path):
    """B7's matching benchmark at two tiny widths: candidate pairs, and our assignment (from the
    auction's prices and from a cold start) and scipy's on the square and rectangular graphs agree
    on the optimum (the script exits non-zero if not)."""
    import torch

    threads = torch.get_num_threads()
    try:
        out = tmp_path / "b7_matching.json"
        assert _load("b7_matching").main(["--smoke", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    rows = json.loads(out.read_text())["rows"]
    assert [r["d_sae"] for r in rows] == [512, 1024]
    for r in rows:
        assert r["candidate_pairs"] >= 10 * r["d_sae"] and 0 < r["assigned"] <= r["d_sae"]
        for name in ("ours_cold", "scipy_square", "scipy_rect"):
            assert abs(r["total_score"] - r[f"{name}_total_score"]) < 1e-9 * r["d_sae"]
            assert r[f"{name}_cpu_seconds"] > 0
        assert r["ours_cpu_seconds"] > 0


def test_windows_encode_smoke(tmp_path):
    """The windows' encode benchmark on the tiny wide pair: the block-wise encode_at and the
    former every-position one agree (the script exits non-zero if not), on both sides of the gate."""
    import torch

    threads = torch.get_num_threads()
    try:
        out = tmp_path / "windows_encode.json"
        assert _load("windows_encode").main(["--smoke", "--work", str(tmp_path), "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    (row,) = json.loads(out.read_text())["rows"]
    assert row["examples"] == 300 and row["same_nonzero_pattern"] and 0 < row["nonzero_share"] < 1
    assert row["max_abs_diff"] <= 1e-4
