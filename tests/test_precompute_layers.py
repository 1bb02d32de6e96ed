"""The precompute's modules import one way (issue 10): entry points -> stages -> libraries.

Read from the source (AST), no model loaded. A stage may import an earlier stage of the pipeline,
never a later one or an entry point; a library imports no stage; no stage module is much over
400 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "precompute"
LIBRARIES = ("accumulators", "hook_moments", "weights", "sparse_assignment", "significance", "baseline", "examples", "corpus", "config", "columns", "log", "crosscoder_stats")
STAGES = ("sae_codec", "forward", "prepare", "calibration", "pass_state", "hook_cache", "stream", "stats_tables", "feature_table", "diffing", "manifest", "crosscoder_tables", "tables")
ENTRY_POINTS = ("run", "check", "distributed", "__main__")
MAX_STAGE_LINES = 420


def _precompute_imports(module: str) -> set[str]:
    tree = ast.parse((PKG / f"{module}.py").read_text(encoding="utf-8"))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "precompute":
                out |= {a.name for a in node.names}
            elif node.module.startswith("precompute."):
                out.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("precompute.")}
    return out - {module}


def test_every_module_is_placed():
    placed = set(LIBRARIES) | set(STAGES) | set(ENTRY_POINTS) | {"__init__", "demo", "crosscoder_train"}
    assert {p.stem for p in PKG.glob("*.py")} <= placed


@pytest.mark.parametrize("module", LIBRARIES)
def test_libraries_import_no_stage(module):
    assert not _precompute_imports(module) & (set(STAGES) | set(ENTRY_POINTS))


@pytest.mark.parametrize("module", STAGES)
def test_stages_import_only_earlier_stages_and_libraries(module):
    earlier = set(STAGES[: STAGES.index(module)])
    assert _precompute_imports(module) <= earlier | set(LIBRARIES)


@pytest.mark.parametrize("module", STAGES + ("run", "distributed"))
def test_stage_modules_stay_small(module):
    n = len((PKG / f"{module}.py").read_text(encoding="utf-8").splitlines())
    assert n <= MAX_STAGE_LINES, f"precompute/{module}.py has {n} lines"
