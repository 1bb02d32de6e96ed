"""Shared fixtures.

Tiers (STYLE.md): unit tests load no model; integration tests use `tiny_demo`, a demo pair
built by `python -m precompute.demo --tiny` into a temporary directory once per session
(about 10 s), or `hf_models`, tiny Hugging Face models as users bring them (tests/hf_models.py);
tests that need the shipped demo use `shipped_demo`.

The browser fixtures (tests/browser_utils.py) are registered here, once: imported into several
test modules they would be separate session fixtures, and a second `sync_playwright()` inside the
first one's event loop fails.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.browser_utils import app_url, browser, page, synthetic_app_url, synthetic_runs  # noqa: E402,F401

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory) -> Path:
    """A freshly built tiny demo pair: base/, finetuned/, saes/{base_sae,finetuned_sae}/, eval_corpus.parquet,
    and, as the shipped demo, its crosscoder/ (`python -m precompute.crosscoder_train --tiny`)."""
    from precompute.crosscoder_train import main as train_crosscoder
    from precompute.demo import main

    out = tmp_path_factory.mktemp("tiny_demo") / "demo"
    assert main(["--tiny", "--out", str(out)]) == 0
    assert train_crosscoder(["--tiny", "--demo", str(out), "--out", str(out / "crosscoder")]) == 0
    return out


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory):
    """Tiny Hugging Face save_pretrained models (GPT-2, Llama, GPTBigCode; each a base and a
    finetune), SAEs and a text corpus, built and trained once per session (tests/hf_models.py)."""
    from tests.hf_models import build_all

    return build_all(tmp_path_factory.mktemp("hf_models"))


@pytest.fixture(scope="session")
def tiny_crosscoder(tiny_demo) -> Path:
    """The tiny demo pair's crosscoder (issue 16): a BatchTopK crosscoder trained for a few steps."""
    return tiny_demo / "crosscoder"


@pytest.fixture(scope="session")
def shipped_demo() -> Path:
    path = REPO / "data" / "demo"
    if not (path / "REPORT.json").exists():
        pytest.fail("data/demo is missing: the demo pair ships with the repository")
    return path


@pytest.fixture(autouse=True)
def _served_apps_pages_mode(monkeypatch):
    """AppTests run the app as a served app runs after its first request: out of Streamlit's
    pages/-directory mode.

    Streamlit enters that mode when `pages/` exists, until st.navigation leaves it; a served app
    leaves it once, on its first request (webapp.state._leave_pages_dir_mode, by a rerun; that
    first request is tested in Chromium, tests/test_browser.py). AppTest resets the mode before
    every run, so every AppTest run would pay that rerun, which drops a pressed form button:
    a page whose url path equals its file's page name (6_live_probe.py at /live_probe) then
    never sees its Steer button pressed.
    """
    from streamlit.runtime.pages_manager import PagesManager

    init = PagesManager.__init__

    def __init__(self, *a, **kw):
        init(self, *a, **kw)
        PagesManager.uses_pages_directory = False

    monkeypatch.setattr(PagesManager, "__init__", __init__)
