"""The wide synthetic pair (benchmarks/wide_pair.py) at its tiny size, and smoke runs of B7
(benchmarks/b7_scaling.py) and the GPU check's CPU smoke (benchmarks/gpu_check.sh --cpu-smoke).
No speed is asserted; what is asserted is that each measured what it says it measured."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from tests.helpers import load_benchmark

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wide():
    return load_benchmark("wide_pair")


@pytest.fixture(scope="module")
def tiny_pair(wide, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wide") / "pair"
    wide.generate(out, wide.TINY)
    return out


def test_tiny_wide_pair_is_a_real_pair_with_sparse_saes(wide, tiny_pair):
    from safetensors.torch import load_file

    from explorer.models import ModelSpec, SAESpec, load_model, load_sae, sae_hook_name

    s = wide.TINY.resolved()
    info = json.loads((tiny_pair / "PAIR.json").read_text())
    base, ft = (load_model(ModelSpec(path=str(tiny_pair / m))) for m in ("base", "finetuned"))
    assert base.cfg.d_model == s.d_model and base.cfg.d_vocab == s.d_vocab == len(base.tokenizer) and base.cfg.n_layers == s.n_layers
    # the finetune is the base plus noise whose std is `perturb` x each weight's own std
    wb, wf = base.blocks[0].mlp.W_in.detach(), ft.blocks[0].mlp.W_in.detach()
    rel = float((wf - wb).std() / wb.std())
    assert 0.5 * s.perturb < rel < 1.5 * s.perturb
    tokens = torch.from_numpy(np.asarray(pq.read_table(tiny_pair / "eval_corpus.parquet").column("token_ids").to_pylist()[:8]))
    assert (tokens[:, 0] == base.tokenizer.bos_token_id).all()
    for d_sae in s.d_sae:
        for name, model in (("base_sae", base), ("finetuned_sae", ft)):
            path = tiny_pair / "saes" / str(d_sae) / name
            sae = load_sae(SAESpec(path=str(path)))
            assert sae.cfg.d_sae == d_sae and sae_hook_name(sae) == s.hook
            raw = load_file(str(path / "sae_weights.safetensors"))
            _, cache = model.run_with_cache(tokens, names_filter=s.hook)
            x = cache[s.hook]
            pre = (x - raw["b_dec"]) @ raw["W_enc"] + raw["b_enc"]
            hand = torch.where(pre > raw["threshold"], pre, torch.zeros_like(pre))
            with torch.no_grad():
                torch.testing.assert_close(sae.encode(x), hand, rtol=1e-5, atol=1e-5)
            l0 = (hand > 0).sum(-1).float().mean()
            assert 0 < l0 < d_sae / 4  # sparse, and firing
        m = info["saes"][str(d_sae)]["base_sae_on_base"]
        assert m["l0"] > 0 and m["log10_density_p05_p50_p95"][2] > m["log10_density_p05_p50_p95"][0]  # a spread of densities


def test_b7_smoke(tiny_pair, tmp_path):
    b7 = load_benchmark("b7_scaling")
    out = tmp_path / "b7.json"
    assert b7.main(["--smoke", "--pair", str(tiny_pair), "--work", str(tmp_path / "work"), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert len(res["widths"]) == 1 and len(res["tokens"]) == 1
    for p in res["widths"] + res["tokens"]:
        t = p["ours"]["timing"]
        assert t["stream_tokens"] == p["n_tokens"]  # the run it measured streamed the tokens it claims
        assert p["limit"]["n_tokens"] > 0 and p["limit"]["limit"]["wall_seconds"] > 0 and p["limit"]["floor"]["wall_seconds"] > 0
        assert p["per_token_us"]["ours_stream"] == pytest.approx(1e6 * t["stream_seconds"] / p["n_tokens"])
        assert p["ratios"]["stream_over_limit"] == pytest.approx(p["per_token_us"]["ours_stream"] / p["per_token_us"]["limit"])
        assert p["ours"]["peak_rss_bytes"] > 50 * 2**20
        assert {"matching", "nearest_neighbours", "logits", "examples"} <= set(t["finalize_parts"])


def test_gpu_check_cpu_smoke(tmp_path):
    """Every step of benchmarks/gpu_check.sh at the tiny size on the CPU, in bf16, ours twice (CE on
    one batch in 2, then on every batch)."""
    out = tmp_path / "gpu.json"
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--cpu-smoke", "--work", str(tmp_path / "work"), "--out", str(out), "--ce-every", "2", "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["smoke"] and res["device"] == "cpu" and res["dtype"] == "bfloat16" and res["partial"] is False
    assert "partial result in" in proc.stdout  # steps 1-2 were written before step 3 started
    assert res["ce_every"] == [2, 1] and set(res["by_ce_every"]) == {"2", "1"}
    for n, got in res["by_ce_every"].items():
        assert got["ours_timing"]["stream_tokens"] == res["n_tokens"] and res["limit"]["n_tokens"] > 0
        assert got["stream_over_bare_forward"] == pytest.approx(res["limit_tokens_per_second"] / got["stream_tokens_per_second"])
        assert got["run_dtype"] == "bfloat16"  # the models ran in bf16 (the run's manifest: loading.dtype)
        assert "precompute gpu-check-ce" + n in (tmp_path / "work" / "logs" / f"ours-ce{n}.log").read_text()  # the stream's progress, in its log
        cfg = Path(got["ours"]["command"].split("--config ")[1].split()[0])
        assert f"ce_every = {n}\n" in cfg.read_text()
    assert res["stream_tokens_per_second"] == res["by_ce_every"]["2"]["stream_tokens_per_second"]  # the first value's at the top
    assert proc.stdout.count("10M tokens extrapolated") == 2


@pytest.mark.xdist_group("ray")  # with tests/test_distributed.py, on one xdist worker (see there)
def test_b8_smoke(tiny_pair, tmp_path):
    """B8 at the tiny size: one process, then a local Ray cluster of 2 workers (stopped by its
    process group; --smoke leaves out the 1-worker cluster, the same code path); the Ray run's
    tables are bitwise those of the single process."""
    pytest.importorskip("ray")
    b8 = load_benchmark("b8_ray")
    out = tmp_path / "b8.json"
    assert b8.main(["--smoke", "--pair", str(tiny_pair), "--work", str(tmp_path / "work"), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res["runs"]) == {"single", "ray_2_workers"}
    single = pd.read_parquet(Path(res["runs"]["single"][-1]["run_dir"]) / "features.parquet")
    for label in ("ray_2_workers",):
        run = res["runs"][label][0]
        assert run["timing"]["merged_shards"] == 2 and run["timing"]["ray_wall_seconds"] > 0
        diffs = [d for d in res["differences_vs_single_process"][label] if not d.startswith("manifest.json: ")]
        # kl_corr (|delta f| vs KL) comes from float64 sums over tokens that shards add in another order: equal to rounding
        assert set(diffs) <= {"features.parquet: columns differ bitwise: kl_corr"}
        merged = pd.read_parquet(Path(run["run_dir"]) / "features.parquet")
        np.testing.assert_allclose(merged.kl_corr.to_numpy(), single.kl_corr.to_numpy(), rtol=1e-9, atol=1e-12)
    assert res["speedup_2_over_1_workers_wall"] is None and res["summary"]["ray_2_workers"]["median_wall_seconds"] > 0
