"""Small helpers shared by test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

from explorer import rundir
from explorer.synthetic import make_run

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
    out = make_run(out, n_features=64, n_vocab=512, context=32)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["config"]["models"] = {m: {"path": str(demo / m)} for m in ("base", "finetuned")}
    manifest["config"]["saes"] = {s: {"path": str(demo / "saes" / s)} for s in ("base_sae", "finetuned_sae")}
    manifest.pop("schema_version")
    rundir.write_manifest(out, manifest)
    return out
