"""The installable package (pyproject.toml) and its `sae-transfer` command.

A real wheel install (`pip install --no-deps --no-build-isolation .`, non-editable) into a fresh
virtual environment that sees this machine's pinned stack (--system-site-packages), then the
command is run from a folder outside the repository: the code, the app's pages and its Streamlit
config must come from the installed copy, and the explorer must serve a real page in Chromium.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.browser_utils import free_port, wait_idle

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("pkg")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    py = venv / "bin" / "python"
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", str(REPO)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SAE_EXPLORER_RUNS_DIR")}
    return {"py": py, "bin": venv / "bin" / "sae-transfer", "cwd": elsewhere, "env": env}


def _run(installed, *args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(installed["bin"]), *args], cwd=installed["cwd"], env=installed["env"], capture_output=True, text=True, timeout=300, **kw)


def test_the_installed_copy_is_used_outside_the_repository(installed):
    code = "import explorer, precompute, webapp, sae_transfer.cli as c; print(explorer.__file__); print(c.app_dir())"
    r = subprocess.run([str(installed["py"]), "-c", code], cwd=installed["cwd"], env=installed["env"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    module_file, app_dir = r.stdout.strip().splitlines()
    site = str(installed["py"].parent.parent)
    assert module_file.startswith(site) and app_dir.startswith(site), r.stdout
    app = Path(app_dir)
    assert (app / "app.py").is_file() and (app / ".streamlit" / "config.toml").is_file()
    assert sorted(p.name for p in (app / "pages").glob("*.py")) == sorted(p.name for p in (REPO / "pages").glob("*.py"))


def test_help_everywhere_and_usage_errors_exit_2(installed):
    for args in ([], ["run"], ["merge"], ["app"], ["export"], ["export", "neuronpedia"], ["schema"]):
        r = _run(installed, *args, "--help")
        assert r.returncode == 0 and "usage: sae-transfer" in r.stdout, (args, r.stderr)
    for args in (["bogus"], ["run"], ["export", "neuronpedia", "--run", "x"], ["app", "--port", "notaport"]):
        r = _run(installed, *args)
        assert r.returncode == 2, (args, r.returncode)
        assert "Traceback" not in r.stderr
    r = _run(installed, "app", "--run", "no-such-run", "--runs-dir", str(REPO / "data" / "runs"))
    assert r.returncode == 2 and r.stderr.strip().startswith("error: ") and len(r.stderr.strip().splitlines()) == 1


def test_schema_goes_to_stdout(installed):
    r = _run(installed, "schema")
    assert r.returncode == 0 and r.stdout.startswith("# Run schema, version")


def test_python_dash_m_precompute_keeps_working(installed):
    r = subprocess.run([str(installed["py"]), "-m", "precompute", "run", "--help"], cwd=installed["cwd"], env=installed["env"], capture_output=True, text=True)
    assert r.returncode == 0 and "usage: python -m precompute run" in r.stdout


@pytest.mark.browser
def test_app_serves_the_demo_run_from_the_installed_copy(installed, page):
    port = free_port()
    proc = subprocess.Popen(
        [str(installed["bin"]), "app", "--run", "demo", "--port", str(port), "--runs-dir", str(REPO / "data" / "runs")],
        cwd=installed["cwd"], env=installed["env"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        url = proc.stdout.readline().strip()
        assert url == f"http://127.0.0.1:{port}/overview?run=demo"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        break
            assert time.monotonic() < deadline, "the installed app did not become healthy"
            time.sleep(0.5)
        page.goto(url)
        wait_idle(page, 120000)
        assert page.get_by_role("heading", name="Overview").count() >= 1
        assert page.locator('[data-testid="stException"]').count() == 0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/host-config", timeout=5) as r:
            json.loads(r.read())  # the server answers its own protocol
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
