"""Small helpers shared by test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from explorer.synthetic import make_run, point_at_pair

REPO = Path(__file__).resolve().parent.parent
APP = str(REPO / "app.py")
# the pages AppTests switch to (the live probe has its own tests: it loads models)
PAGES = {
    "overview": "pages/1_overview.py",
    "features": "pages/2_features.py",
    "feature": "pages/3_feature.py",
    "dead_born": "pages/4_dead-born.py",
    "similarity": "pages/5_similarity.py",
    "differences": "pages/8_differences.py",
}


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


def md_text(body: str) -> str:
    """What Streamlit shows for Markdown source built with explorer.render.inert: the backslash
    escapes resolved and the invisible word joiners (which break autolinks) removed."""
    import re

    return re.sub(r"\\([!-/:-@\[-`{-~])", r"\1", body).replace("\u2060", "").replace("\u00a0", " ")


def app_maker(runs: Path, monkeypatch, pages: dict[str, str]):
    """make(page, **query params) -> a run AppTest of app.py on `page` (a key of `pages`), with the
    runs dir set to `runs` (the entry point runs first: app.py registers the pages)."""
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("SAE_EXPLORER_RUNS_DIR", str(runs))

    def make(page: str, **params) -> AppTest:
        at = AppTest.from_file(APP, default_timeout=120)
        at.query_params.update({k: str(v) for k, v in params.items()})
        at.run()
        if page != "overview":
            at.switch_page(pages[page])
            at.run()
        return at

    return make
