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


def test_readme_links_stay_inside_the_repository():
    import re

    text = (REPO / "README.md").read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    assert targets, "README has links"
    for t in targets:
        if t.startswith(("http://", "https://", "#", "/feature?")):
            continue
        path = (REPO / t.split("#")[0]).resolve()
        assert REPO in path.parents or path == REPO, f"README links outside the repository: {t}"
        assert path.exists(), f"README links to a missing file: {t}"
    assert "docs/METHODS.md" in targets and "shared" not in " ".join(targets)


def test_sae_stage_retrains_only_the_saes(tiny_demo, tmp_path):
    """`--stage saes` keeps the language models, writes the three SAEs (with the seed twin), the
    same SAEs for the same config (seeded), and refuses a demo whose data it cannot rebuild."""
    import json
    import shutil


    import pyarrow.parquet as pq

    from precompute.demo import main as demo_main

    out = tmp_path / "demo"
    shutil.copytree(tiny_demo, out)
    models = {m: (out / m / "model.safetensors").read_bytes() for m in ("base", "finetuned")}
    assert demo_main(["--tiny", "--stage", "saes", "--out", str(out)]) == 0
    for m, blob in models.items():
        assert (out / m / "model.safetensors").read_bytes() == blob  # the language models are untouched
    for s in ("base_sae", "finetuned_sae", "base_sae_twin"):
        assert (out / "saes" / s / "sae_weights.safetensors").read_bytes() == (tiny_demo / "saes" / s / "sae_weights.safetensors").read_bytes(), s
    report = json.loads((out / "REPORT.json").read_text())
    assert "saes_retrained" in report and {r["sae"] for r in report["dead_latents"]} == {"base_sae", "finetuned_sae", "base_sae_twin"}
    assert all("explained_variance_legacy" in r for r in report["sae_evals"])
    assert not (out / "saes.partial").exists()
    # an eval corpus the documents do not rebuild: refused before any training
    t = pq.read_table(out / "eval_corpus.parquet")
    pq.write_table(t.slice(1), out / "eval_corpus.parquet")
    before = (out / "saes" / "base_sae" / "sae_weights.safetensors").stat().st_mtime_ns
    with pytest.raises(SystemExit, match="differ from"):
        demo_main(["--tiny", "--stage", "saes", "--out", str(out)])
    assert (out / "saes" / "base_sae" / "sae_weights.safetensors").stat().st_mtime_ns == before

