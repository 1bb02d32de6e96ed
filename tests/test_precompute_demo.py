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
    # the stored config read back as a run resume reads it (options added since take their
    # defaults, as [evals] ce_every = 1: the shipped run computed CE on every batch)
    stored = RunConfig.from_dict(manifest["config"]).to_dict()
    assert stored == cfg.with_hook(manifest["config"]["hook"]).to_dict(), "the shipped run was made from another config"
    assert {k: v for k, v in stored["evals"].items() if k != "ce_every"} == manifest["config"]["evals"]
    assert set(manifest["files"]) == set(schema.TABLES)
    size = sum(p.stat().st_size for p in DEMO_RUN.iterdir() if p.is_file())
    # the repository carries it (and every rebuild in its history): 24 MiB, of which about 5 MiB is
    # the per-token KL and loss difference of the 499,200 tokens (tokens.parquet) and about 10 MiB
    # the examples of ~2,000 alive features per SAE and model
    assert size < 24 * 2**20, f"data/runs/demo is {size / 2**20:.1f} MiB"


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



def test_demo_saes_have_few_dead_latents():
    """Issue 12: every shipped SAE (the seed twin too) has under 10% dead latents on its own model,
    in REPORT.json and in the shipped run (the same eval corpus, special tokens left out)."""
    import json

    report = json.loads((REPO / "data" / "demo" / "REPORT.json").read_text())
    dead = {r["sae"]: r for r in report["dead_latents"]}
    assert set(dead) == {"base_sae", "finetuned_sae", "base_sae_twin"}
    assert all(r["dead_share"] < 0.10 for r in dead.values()), dead
    man = rundir.open_run(DEMO_RUN)
    alive = man["summary"]["alive"]
    assert alive["base_sae"]["base"] == 2048 - dead["base_sae"]["n_dead"]
    assert alive["finetuned_sae"]["finetuned"] == 2048 - dead["finetuned_sae"]["n_dead"]
    assert man["summary"]["matching"]["n_alive_twin"] == 2048 - dead["base_sae_twin"]["n_dead"]


def test_one_born_lost_count_everywhere():
    """The manifest, the store (what the app shows and the CSV filters on) and the baseline table
    give the same alive-only born and lost counts at the run's threshold."""
    import pandas as pd

    from explorer import store

    man = rundir.open_run(DEMO_RUN)
    m = man["summary"]["matching"]
    thr = man["config"]["thresholds"]["match"]
    assert m["counts"] == "alive features only"
    counts = store.born_lost_counts(store.connect(), DEMO_RUN, thr)
    assert (counts["born"], counts["lost"]) == (m["n_born"], m["n_lost"])
    bl = pd.read_parquet(DEMO_RUN / "baseline.parquet")
    row = bl[(bl.score == m["score"]) & ((bl.threshold - thr).abs() < 1e-9)].iloc[0]
    assert (row.n_born, row.n_lost) == (m["n_born"], m["n_lost"])
    feats = pd.read_parquet(DEMO_RUN / "features.parquet", columns=["sae", "count_base", "count_finetuned", "match_score"])
    base = feats[feats.sae == "base_sae"]
    assert ((base.count_base > 0) & ~(base.match_score.fillna(-1e300) >= thr)).sum() == m["n_lost"]
    assert base.match_score[base.count_base == 0].isna().all()  # dead features are not matched
