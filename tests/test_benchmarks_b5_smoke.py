"""Smoke run of benchmarks/b5_probe_latency.py (B5) on the tiny demo: it keeps working; speed is not asserted."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_probe_latency_benchmark_prints_its_table(tiny_demo, capsys, tmp_path):
    import json

    import torch

    from benchmarks.b5_probe_latency import main

    before = torch.get_num_threads()
    assert main(["--demo", str(tiny_demo), "--tokens", "16", "--n", "2", "--warmup", "0", "--new", "2", "--threads", "1", "--out", str(tmp_path / "b5.json")]) == 0
    assert torch.get_num_threads() == before
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| 1 |")]
    assert len(rows) == 4
    assert any("probe (16 tokens" in r for r in rows)
    for r in rows:
        median = float(r.split("|")[3])
        assert median > 0
    res = json.loads((tmp_path / "b5.json").read_text())
    assert [r["stage"] for r in res["stages"]] == ["prepare", "probe", "clean", "steer"]
    assert all(len(r["samples_ms"]) == 2 and r["median_ms"] > 0 for r in res["stages"])
    assert res["settings"]["tokens"] == 16 and res["machine"]["nproc"]
