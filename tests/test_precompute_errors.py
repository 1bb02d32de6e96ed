"""Bad configs and inputs: each gives one clear message, exit status 2, no traceback, and nothing
that looks like a run (no run directory at all)."""

from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from explorer import schema
from precompute.__main__ import main
from precompute.config import RunConfig
from tests.bad_artifacts import write_narrow_sae, write_renumbered_tokenizer_model
from tests.test_precompute import CTX, tiny_config_text, write_tiny_corpus


@pytest.fixture(scope="module")
def setup(tiny_demo, tmp_path_factory):
    d = tmp_path_factory.mktemp("errors")
    corpus = write_tiny_corpus(tiny_demo, d / "corpus.parquet", n_seq=40)
    # an SAE whose d_in (16) is not the models' width (32)
    write_narrow_sae(tiny_demo, d / "narrow_sae")
    # a finetune whose tokenizer numbers the same strings differently
    other = write_renumbered_tokenizer_model(tiny_demo, d / "other_tokenizer_model")
    # corpora: empty, and with ids beyond the vocabulary
    empty = d / "empty.parquet"
    pq.write_table(pa.table({"token_ids": pa.array([], pa.list_(pa.int32()))}), empty)
    big_ids = d / "big_ids.parquet"
    pq.write_table(pa.table({"token_ids": pa.array([[0] + [5] * (CTX - 2) + [100_000]] * 4, pa.list_(pa.int32()))}), big_ids)
    no_cols = d / "no_cols.parquet"
    pq.write_table(pa.table({"words": ["a", "b"]}), no_cols)
    return {"demo": tiny_demo, "corpus": corpus, "dir": d, "narrow": d / "narrow_sae", "other": other, "empty": empty, "big_ids": big_ids, "no_cols": no_cols}


def _base(setup) -> str:
    return tiny_config_text(setup["demo"], setup["corpus"], run_id="bad", n_seq=8)


CASES = {
    "unknown key": (lambda s, b: b.replace("seed = 3", "seed = 3\nsed = 4"), "unknown key(s) ['sed']"),
    "unknown table": (lambda s, b: b + "\n[sampel]\nn_tokens = 5\n", "unknown top-level key(s) ['sampel']"),
    "wrong type": (lambda s, b: b.replace(f"n_tokens = {8 * CTX}", 'n_tokens = "many"'), "n_tokens: expected an integer"),
    "missing section": (lambda s, b: b.replace("[corpus]", "[corpus_]"), "unknown top-level key(s) ['corpus_']"),
    "invalid toml": (lambda s, b: b.replace('run_id = "bad"', "run_id = "), "is not valid TOML"),
    "both outlier thresholds": (lambda s, b: b.replace("outlier_norm_factor", "outlier_norm = 3.0\noutlier_norm_factor"), "exactly one of outlier_norm"),
    "missing model": (lambda s, b: b.replace(f'"{s["demo"]}/base"', '"/nonexistent/model"'), "/nonexistent/model does not exist"),
    "missing sae": (lambda s, b: b.replace(f'"{s["demo"]}/saes/base_sae"', '"/nonexistent/sae"'), "SAE directory /nonexistent/sae does not exist"),
    "missing corpus": (lambda s, b: b.replace(str(s["corpus"]), "/nonexistent/corpus.parquet"), "Corpus file /nonexistent/corpus.parquet does not exist"),
    "hook not found": (lambda s, b: b.replace('run_id = "bad"', 'run_id = "bad"\nhook = "blocks.9.hook_resid_pre"'), "Hook 'blocks.9.hook_resid_pre' is not in the model"),
    "d_in mismatch": (lambda s, b: b.replace(f'"{s["demo"]}/saes/finetuned_sae"', f'"{s["narrow"]}"'), "has d_in=16 but the model's activation"),
    "tokenizer mismatch": (lambda s, b: b.replace(f'"{s["demo"]}/finetuned"', f'"{s["other"]}"'), "tokenizers do not match"),
    "empty corpus": (lambda s, b: b.replace(str(s["corpus"]), str(s["empty"])), "is empty (0 rows)"),
    "corpus without columns": (lambda s, b: b.replace(str(s["corpus"]), str(s["no_cols"])), "has neither a 'token_ids'"),
    "n_tokens beyond corpus": (lambda s, b: b.replace(f"n_tokens = {8 * CTX}", f"n_tokens = {1000 * CTX}"), "but the corpus"),
    "ids beyond vocabulary": (lambda s, b: b.replace(str(s["corpus"]), str(s["big_ids"])), "token id 100000"),
    "context beyond model": (lambda s, b: b.replace(f"context_size = {CTX}", f"context_size = {4 * CTX}"), "exceeds the base model's context length"),
    "bad run id": (lambda s, b: b.replace('run_id = "bad"', 'run_id = "../escape"'), "is not a valid run id"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_config_or_input_fails_clearly(setup, case, tmp_path, capsys):
    mutate, message = CASES[case]
    text = mutate(setup, _base(setup))
    assert text != _base(setup)
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    runs = tmp_path / "runs"
    rc = main(["run", "--config", str(cfg), "--runs-dir", str(runs), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err
    assert err.startswith("error: ") and "Traceback" not in err
    assert not runs.exists() or not any(runs.iterdir())  # no run directory at all


def test_bad_shard_spec(setup, tmp_path, capsys):
    cfg = tmp_path / "ok.toml"
    cfg.write_text(_base(setup))
    for spec in ("3/2", "a/b", "1"):
        assert main(["run", "--config", str(cfg), "--runs-dir", str(tmp_path / "runs"), "--shard", spec]) == 2
        assert "--shard must be I/N" in capsys.readouterr().err
    assert main(["run", "--config", str(cfg), "--runs-dir", str(tmp_path / "runs"), "--shard", "0/50"]) == 2
    assert "use at most 1 shards" in capsys.readouterr().err


def test_missing_config_file(tmp_path, capsys):
    assert main(["run", "--config", str(tmp_path / "nope.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_existing_run_with_another_config_is_not_overwritten(setup, tmp_path, capsys):
    cfg = tmp_path / "ok.toml"
    cfg.write_text(_base(setup))
    runs = tmp_path / "runs"
    assert main(["run", "--config", str(cfg), "--runs-dir", str(runs), "--no-progress"]) == 0
    manifest = (runs / "bad" / schema.MANIFEST).read_text()
    cfg.write_text(_base(setup).replace("seed = 3", "seed = 5"))
    assert main(["run", "--config", str(cfg), "--runs-dir", str(runs), "--no-progress"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (runs / "bad" / schema.MANIFEST).read_text() == manifest
    assert main(["run", "--config", str(cfg), "--runs-dir", str(runs), "--no-progress", "--overwrite"]) == 0
    assert json.loads((runs / "bad" / schema.MANIFEST).read_text())["config"]["sample"]["seed"] == 5


def test_config_round_trips_and_rejects_bad_values(setup):
    from explorer.errors import ConfigError

    cfg = RunConfig.from_dict(_toml(_base(setup)))
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    assert RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))).hash() == cfg.hash()
    d = cfg.to_dict()
    for section, key, value, msg in [
        ("sample", "batch_size", 0, "batch_size must be > 0"),
        ("sample", "n_tokens", True, "got the boolean"),
        ("thresholds", "dense_density", 1e-6, "ultralow_density < dense_density"),
        ("examples", "quantile_sample", 3, "quantile_sample (3) must be at least"),
        ("thresholds", "match", 2.0, "match is a combined score"),
    ]:
        bad = json.loads(json.dumps(d))
        bad[section][key] = value
        with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            RunConfig.from_dict(bad)
    # an absolute outlier norm replaces the default factor
    t = _toml(_base(setup).replace("outlier_norm_factor = ", "outlier_norm = "))
    c = RunConfig.from_dict(t)
    assert c.thresholds.outlier_norm_factor is None and c.thresholds.outlier_norm is not None
    assert RunConfig.from_dict(c.to_dict()) == c


def _toml(text: str) -> dict:
    import tomllib

    return tomllib.loads(text)


def test_checkpoint_from_other_input_files_is_refused(setup, tmp_path, capsys):
    """A shard (or checkpoint) computed from other weights is never merged with new ones."""
    demo = tmp_path / "demo"
    shutil.copytree(setup["demo"], demo)
    corpus = setup["corpus"]
    cfg = tmp_path / "c.toml"
    cfg.write_text(tiny_config_text(demo, corpus, run_id="fp", n_seq=32))
    runs = tmp_path / "runs"
    assert main(["run", "--config", str(cfg), "--runs-dir", str(runs), "--shard", "0/2", "--no-progress"]) == 0
    # retrain the base SAE at the same path: here, perturb its weights
    from safetensors.torch import load_file, save_file

    w = demo / "saes" / "base_sae" / "sae_weights.safetensors"
    state = load_file(str(w))
    state["W_dec"] = state["W_dec"] * 1.01
    save_file(state, str(w))
    assert main(["run", "--config", str(cfg), "--runs-dir", str(runs), "--shard", "1/2", "--no-progress"]) == 0
    assert main(["merge", "fp", "--runs-dir", str(runs)]) == 2
    assert "['base_sae'] changed" in capsys.readouterr().err
    assert not (runs / "fp" / schema.MANIFEST).exists()
