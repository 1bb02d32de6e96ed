"""Smoke run of the load benchmark (benchmarks/load_test.py --smoke: 3 Playwright sessions for 10 s
against a real `streamlit run app.py` on 127.0.0.1), on a synthetic run whose live probe runs the
tiny demo pair. The full benchmark (25 sessions, 60 s) is run by hand; numbers in benchmarks/RESULTS.md."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]
REPO = Path(__file__).resolve().parent.parent


def test_load_smoke(tiny_demo, tmp_path):
    out = tmp_path / "load.json"
    done = subprocess.run(
        [sys.executable, "benchmarks/load_test.py", "--smoke", "--synthetic", str(tiny_demo), "--out", str(out), "--action-timeout", "180"],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["sessions"] == 3 and res["duration_s"] == 10
    assert res["summary"]["all"]["n"] >= 3 and res["summary"]["all"]["errors"] == 0
    assert res["error_samples"] == []
    for action in ("feature", "filter", "probe"):
        s = res["summary"][action]
        assert s["errors"] == 0
        if s["n"]:
            assert 0 < s["p50_s"] <= s["p95_s"]
