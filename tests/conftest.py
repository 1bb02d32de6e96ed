"""Shared fixtures.

Tiers (STYLE.md): unit tests load no model; integration tests use `tiny_demo`, a demo pair
built by `python -m precompute.demo --tiny` into a temporary directory once per session
(about 10 s); tests that need the shipped demo use `shipped_demo`.

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
    """A freshly built tiny demo pair: base/, finetuned/, saes/{base_sae,finetuned_sae}/, eval_corpus.parquet."""
    from precompute.demo import main

    out = tmp_path_factory.mktemp("tiny_demo") / "demo"
    assert main(["--tiny", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def shipped_demo() -> Path:
    path = REPO / "data" / "demo"
    if not (path / "REPORT.json").exists():
        pytest.fail("data/demo is missing: the demo pair ships with the repository")
    return path
