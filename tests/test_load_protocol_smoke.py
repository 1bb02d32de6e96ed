"""Smoke run of the server load test (benchmarks/load_protocol.py --smoke: 3 websocket sessions for
8 s against a real `streamlit run app.py` over the shipped demo run). It checks that the client
really drives the server: every action is answered by script_finished, with no error. The full
runs (25 and 100 sessions, 60 s) are made by hand; numbers in benchmarks/RESULTS.md."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


def test_load_protocol_smoke(tmp_path):
    out = tmp_path / "load_protocol.json"
    done = subprocess.run([sys.executable, "benchmarks/load_protocol.py", "--smoke", "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["sessions"] == 3 and res["duration_s"] == 8
    s = res["summary"]
    assert s["all"]["n"] >= 6 and s["all"]["errors"] == 0 and res["error_samples"] == []
    # every recorded action ended with the server's script_finished (not a timeout or a closed socket)
    assert s["all"]["script_finished"] == s["all"]["n"]
    assert sum(s[a]["n"] for a in ("feature", "filter", "probe") if a in s) >= 3
    for r in res["samples"]:
        assert r["status"] == "finished" and r["messages"] > 3 and 0 < r["seconds"] < 120
    assert res["loadavg_before"] and res["loadavg_after"]
