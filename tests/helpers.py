"""Small helpers shared by test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from explorer.synthetic import make_run, point_at_pair

REPO = Path(__file__).resolve().parent.parent


def load_benchmark(name: str) -> ModuleType:
    """benchmarks/<name>.py as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def make_probe_run(out: Path, demo: Path) -> Path:
    """A synthetic run (64 features, 512-token vocabulary, context 32) whose config names the
    tiny demo pair, so the live probe can load its models."""
    return point_at_pair(make_run(out, n_features=64, n_vocab=512, context=32), demo)


def app_maker(runs: Path, monkeypatch, pages: dict[str, str]):
    """make(page, **query params) -> a run AppTest of app.py on `page` (a key of `pages`), with the
    runs dir set to `runs` (the entry point runs first: app.py registers the pages)."""
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("SAE_EXPLORER_RUNS_DIR", str(runs))

    def make(page: str, **params) -> AppTest:
        at = AppTest.from_file(str(REPO / "app.py"), default_timeout=120)
        at.query_params.update({k: str(v) for k, v in params.items()})
        at.run()
        if page != "overview":
            at.switch_page(pages[page])
            at.run()
        return at

    return make
