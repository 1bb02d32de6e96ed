"""Smoke run of benchmarks/b2_physical_limit.py: it keeps working; speed is never asserted here."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _load():
    path = REPO / "benchmarks" / "b2_physical_limit.py"
    spec = importlib.util.spec_from_file_location("bench_b2_physical_limit", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_b2_smoke(tiny_demo, tmp_path):
    b2 = _load()
    out = tmp_path / "b2.json"
    assert b2.main(["--smoke", "--demo", str(tiny_demo), "--work", str(tmp_path / "work"), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["smoke"] is True and res["reps"] == 1
    assert res["n_tokens"] == 4 * res["context_size"]
    for v in ("stop", "logits", "ce"):
        assert res["summary"]["limit"][v]["median_wall_seconds"] > 0
    assert res["summary"]["ours"]["median_stream_wall_seconds"] > 0
    assert len(res["limit_runs"]) == len(res["our_runs"]) == 1
    assert "stream_cpu_seconds" in res["our_runs"][0]["timing"]
