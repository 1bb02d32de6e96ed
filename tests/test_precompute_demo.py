"""The shipped pieces of the precompute: the demo config, the demo run, the schema document."""

from __future__ import annotations

from pathlib import Path

import pytest

from explorer import rundir, schema
from precompute.__main__ import main
from precompute.config import RunConfig

REPO = Path(__file__).resolve().parent.parent
DEMO_RUN = REPO / "data" / "runs" / "demo"


def test_schema_doc_is_up_to_date():
    assert main(["schema", "--check", str(REPO / "docs" / "SCHEMA.md")]) == 0, "run: python -m precompute schema --write docs/SCHEMA.md"


def test_demo_config_is_valid():
    cfg = RunConfig.from_toml(REPO / "configs" / "demo.toml")
    assert cfg.run_id == "demo" and cfg.sae_names == ["base_sae", "finetuned_sae"]
    assert RunConfig.from_dict(cfg.to_dict()) == cfg


def test_shipped_demo_run_is_current():
    if not (DEMO_RUN / schema.MANIFEST).exists():
        pytest.fail("data/runs/demo is missing: python -m precompute run --config configs/demo.toml")
    manifest = rundir.open_run(DEMO_RUN)  # complete, every file whole (sizes and sha256)
    assert manifest["schema_version"] == schema.SCHEMA_VERSION
    assert set(manifest) == set(schema.MANIFEST_DOCS)
    cfg = RunConfig.from_toml(REPO / "configs" / "demo.toml")
    assert manifest["config"] == cfg.with_hook(manifest["config"]["hook"]).to_dict(), "the shipped run was made from another config"
    assert set(manifest["files"]) == set(schema.TABLES)
    size = sum(p.stat().st_size for p in DEMO_RUN.iterdir() if p.is_file())
    assert size < 15 * 2**20, f"data/runs/demo is {size / 2**20:.1f} MiB"
