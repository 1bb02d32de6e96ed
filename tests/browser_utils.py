"""Browser-test plumbing: a real `streamlit run app.py` server and Debian's Chromium via Playwright.

Stable API (test_browser.py and test_browser_probe.py use it):

    streamlit_server(runs_dir=None, env=None, timeout=90) -> context manager yielding the base URL
        Starts `streamlit run app.py --server.address 127.0.0.1 --server.port <free port>
        --server.headless true` from the repository root (with SAE_EXPLORER_RUNS_DIR=runs_dir
        when given), waits for /_stcore/health, yields "http://127.0.0.1:<port>", and stops the
        server (its process group) afterwards. The server log is attached to any start failure.

    app_url            session fixture: a server over the default runs dir (data/runs, the
                       shipped demo run)
    synthetic_app_url  session fixture: a server over a tmp dir holding a synthetic run
                       "synth" (explorer.synthetic, 200 features, hostile vocabulary)
    browser            session fixture: Chromium at /usr/bin/chromium (never `playwright install`)
    page               function fixture: a fresh page; any JS dialog (alert/confirm/prompt)
                       is recorded in page.dialogs and dismissed

    wait_idle(page, timeout_ms=60000)  waits until Streamlit has finished its current rerun

The fixtures are registered once in tests/conftest.py; test modules import only the helpers.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

REPO = Path(__file__).resolve().parent.parent
CHROMIUM_PATH = os.environ.get("SAE_EXPLORER_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    "--disable-dev-shm-usage",
]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def streamlit_server(runs_dir: Path | str | None = None, env: dict[str, str] | None = None, timeout: float = 90.0, workers: int = 1) -> Iterator[str]:
    """`workers` > 1: `sae-transfer app --workers N` (N Streamlit processes behind
    sae_transfer.balancer on the one port) instead of one `streamlit run app.py`."""
    port = free_port()
    proc_env = dict(os.environ)
    proc_env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"})
    if runs_dir is not None:
        proc_env["SAE_EXPLORER_RUNS_DIR"] = str(runs_dir)
    proc_env.update(env or {})
    log = tempfile.NamedTemporaryFile(prefix="streamlit-", suffix=".log", delete=False)
    cmd = [
        sys.executable, "-m", "streamlit", "run", "app.py",
        "--server.address", "127.0.0.1",
        "--server.port", str(port),
        "--server.headless", "true",
        "--browser.gatherUsageStats", "false",
    ]
    if workers > 1:
        cmd = [sys.executable, "-m", "sae_transfer.cli", "app", "--workers", str(workers), "--port", str(port), "--address", "127.0.0.1"]
        if runs_dir is not None:
            cmd += ["--runs-dir", str(runs_dir)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=proc_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"streamlit exited with {proc.returncode}:\n{Path(log.name).read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"streamlit did not become healthy in {timeout:.0f} s:\n{Path(log.name).read_text()[-4000:]}")
            time.sleep(0.3)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
        log.close()
        if os.environ.get("SAE_EXPLORER_KEEP_LOG"):
            print("streamlit log:", log.name)
        else:
            with contextlib.suppress(OSError):
                os.unlink(log.name)


@pytest.fixture(scope="session")
def app_url() -> Iterator[str]:
    with streamlit_server() as url:
        yield url


@pytest.fixture(scope="session")
def synthetic_runs(tmp_path_factory) -> Path:
    from explorer.synthetic import make_run

    root = tmp_path_factory.mktemp("synthetic_runs")
    make_run(root / "synth", n_features=200, seed=0)
    return root


@pytest.fixture(scope="session")
def synthetic_app_url(synthetic_runs) -> Iterator[str]:
    with streamlit_server(runs_dir=synthetic_runs) as url:
        yield url


@pytest.fixture(scope="session")
def browser():
    if not Path(CHROMIUM_PATH).exists() and not shutil.which(CHROMIUM_PATH):
        pytest.fail(f"Chromium not found at {CHROMIUM_PATH}: install Debian's chromium (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM_PATH, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1500, "height": 1100})
    pg = context.new_page()
    pg.dialogs = []  # type: ignore[attr-defined]

    def _on_dialog(dialog):
        pg.dialogs.append(f"{dialog.type}: {dialog.message}")  # type: ignore[attr-defined]
        dialog.dismiss()

    pg.on("dialog", _on_dialog)
    try:
        yield pg
    finally:
        context.close()


# Streamlit marks its root with the script's state: "initial" until the first run of the page
# starts (the websocket may not even be connected), "running" during a run, "notRunning" after.
# Idle means a run has finished: "initial" is not idle (a cold server takes seconds to start the
# first run, and a test that read the page then would find it empty).
IDLE_JS = """() => {
    const app = document.querySelector('[data-testid="stApp"]');
    if (!app) return false;
    return !document.querySelector('[data-testid="stStatusWidget"]') && app.getAttribute('data-test-script-state') === 'notRunning';
}"""


def wait_idle(page, timeout_ms: int = 60000) -> None:
    """Wait for the app to load and for Streamlit's current rerun to finish."""
    page.wait_for_selector('[data-testid="stApp"]', timeout=timeout_ms)
    page.wait_for_function(IDLE_JS, timeout=timeout_ms, polling=200)
    # a rerun may start right after the first paint (query params written back): settle once more
    page.wait_for_timeout(300)
    page.wait_for_function(IDLE_JS, timeout=timeout_ms, polling=200)
