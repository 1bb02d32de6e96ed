"""The Neuronpedia export (explorer/neuronpedia.py, `sae-transfer export neuronpedia`).

Unit tier: a synthetic run (explorer/synthetic.py: real schema, hostile vocabulary) with a NUL
character added to one token. The bundle is read back file by file and checked against
Neuronpedia's own schema (the required columns and their types below are copied from
apps/webapp/prisma/schema.prisma of hijohnnylin/neuronpedia: non-null columns without a default),
its importer's rules (one JSON line per metadata file, every line of a batch with the first
line's keys, no \\u0000, strict JSON), and the run's Parquet tables.
"""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from explorer import neuronpedia, rundir, schema, store
from explorer.errors import ConfigError
from explorer.synthetic import make_run

N_FEATURES = 150
PER_BATCH = 64

# Prisma: required (non-null, no default) columns -> JSON type; and typed optional ones we write.
STR, INT, NUM, BOOL, LIST = str, int, (int, float), bool, list
REQUIRED = {
    "SourceRelease": {"name": STR, "description": STR, "creatorName": STR, "creatorId": STR, "urls": LIST},
    "Model": {"id": STR, "creatorId": STR, "layers": INT, "neuronsPerLayer": INT, "owner": STR},
    "SourceSet": {"modelId": STR, "name": STR, "description": STR, "creatorName": STR, "urls": LIST, "creatorId": STR},
    "Source": {"id": STR, "modelId": STR, "setName": STR, "creatorId": STR},
    "Neuron": {"modelId": STR, "layer": STR, "index": STR},
    "Activation": {"tokens": LIST, "index": STR, "layer": STR, "modelId": STR, "maxValue": NUM, "maxValueTokenIndex": INT,
                   "minValue": NUM, "values": LIST, "creatorId": STR},
}
TYPED = {
    "Source": {"cosSimMatchModelId": STR, "cosSimMatchSourceId": STR, "num_prompts": INT, "num_tokens_in_prompt": INT, "hasDashboards": BOOL},
    "Neuron": {"maxActApprox": NUM, "frac_nonzero": NUM, "pos_str": LIST, "pos_values": LIST, "neg_str": LIST, "neg_values": LIST,
               "topkCosSimIndices": LIST, "topkCosSimValues": LIST, "freq_hist_data_bar_heights": LIST, "freq_hist_data_bar_values": LIST,
               "hasVector": BOOL, "hookName": STR, "sourceSetName": STR},
    "Activation": {"binMin": NUM, "binMax": NUM, "binContains": NUM, "qualifyingTokenIndex": INT, "id": STR},
    "Model": {"dimension": INT, "instruct": BOOL},
}
METADATA_FILES = {"release.jsonl": "SourceRelease", "model.jsonl": "Model", "sourceset.jsonl": "SourceSet", "source.jsonl": "Source"}


def _strict(text: str):
    def bad(c):
        raise AssertionError(f"non-strict JSON constant {c}")

    return json.loads(text, parse_constant=bad)


def _read_jsonl_gz(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        raw = fh.read()
    assert "\\u0000" not in raw and "\x00" not in raw
    return [_strict(line) for line in raw.splitlines()]


def _check_types(table: str, row: dict) -> None:
    for key, typ in REQUIRED[table].items():
        assert key in row and row[key] is not None, f"{table}.{key} missing"
        assert isinstance(row[key], typ) and not (typ is INT and isinstance(row[key], bool)), f"{table}.{key}: {row[key]!r}"
    for key, typ in TYPED.get(table, {}).items():
        assert key in row, f"{table}.{key} missing"
        if row[key] is not None:
            assert isinstance(row[key], typ), f"{table}.{key}: {row[key]!r}"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A synthetic two-SAE run whose vocabulary has a NUL character in one token (token 5)."""
    d = make_run(tmp_path_factory.mktemp("runs") / "np", n_features=N_FEATURES, n_sequences=48, context=24)
    manifest = json.loads((d / schema.MANIFEST).read_text())
    vocab = pq.read_table(d / "vocab.parquet")
    strs = vocab.column("token_str").to_pylist()
    strs[5] = "nul\x00here"
    raw = vocab.column("token_bytes").to_pylist()
    raw[5] = strs[5].encode("utf-8")
    vocab = vocab.set_column(vocab.schema.get_field_index("token_str"), "token_str", pa.array(strs, pa.string()))
    vocab = vocab.set_column(vocab.schema.get_field_index("token_bytes"), "token_bytes", pa.array(raw, vocab.schema.field("token_bytes").type))
    manifest["files"]["vocab.parquet"] = rundir.write_table(d, "vocab.parquet", vocab)
    manifest.pop("schema_version", None)
    rundir.write_manifest(d, manifest)
    return d


@pytest.fixture(scope="module")
def bundle(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("np_out")
    sources = neuronpedia.export(run, out, neuronpedia.NeuronpediaOptions(features_per_batch=PER_BATCH))
    return out, sources


def test_layout_one_source_per_sae_and_model(bundle, run):
    out, sources = bundle
    manifest = rundir.open_run(run)
    assert {(b.sae, b.model) for b in sources} == {(s, m) for s in manifest["saes"] for m in schema.MODELS}
    model_dirs = sorted(p.name for p in (out / "v1").iterdir())
    assert model_dirs == sorted({b.model_id for b in sources}) and len(model_dirs) == 2
    for b in sources:
        assert b.path == out / "v1" / b.model_id / b.source_id
        assert sorted(p.name for p in b.path.iterdir()) == ["activations", "features", "model.jsonl", "release.jsonl", "source.jsonl", "sourceset.jsonl"]
        n_batches = math.ceil(N_FEATURES / PER_BATCH)
        for sub in ("features", "activations"):
            assert sorted(p.name for p in (b.path / sub).iterdir()) == [f"batch-{i}.jsonl.gz" for i in range(n_batches)]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # the staging directory is gone


def test_metadata_rows_have_neuronpedias_required_fields(bundle):
    _, sources = bundle
    for b in sources:
        for name, table in METADATA_FILES.items():
            lines = (b.path / name).read_text(encoding="utf-8").splitlines()
            assert len(lines) == 1, name
            _check_types(table, _strict(lines[0]))
        model = _strict((b.path / "model.jsonl").read_text())
        assert model["id"] == b.model_id and model["layers"] == 2  # the synthetic models' real layer count, never 0
        source = _strict((b.path / "source.jsonl").read_text())
        assert source["id"] == b.source_id and source["modelId"] == b.model_id
        assert b.source_id.startswith("1-") and source["setName"] == b.source_id[2:]  # {layer}-{setName}, hook blocks.1
        sourceset = _strict((b.path / "sourceset.jsonl").read_text())
        assert sourceset["name"] == source["setName"] and sourceset["modelId"] == b.model_id
        release = _strict((b.path / "release.jsonl").read_text())
        assert sourceset["releaseName"] == release["name"]


def test_base_and_finetuned_sources_are_matched_both_ways(bundle):
    _, sources = bundle
    by_key = {(b.sae, b.model): b for b in sources}
    for (sae, model), b in by_key.items():
        other = by_key[(sae, "finetuned" if model == "base" else "base")]
        source = _strict((b.path / "source.jsonl").read_text())
        assert (source["cosSimMatchModelId"], source["cosSimMatchSourceId"]) == (other.model_id, other.source_id)
        assert other.model_id != b.model_id


def test_batches_carry_the_first_lines_keys_and_the_runs_row_counts(bundle, run):
    _, sources = bundle
    ex = pq.read_table(run / "examples.parquet", columns=["sae", "model", "acts_base"]).to_pandas()
    for b in sources:
        n_neurons = n_acts = 0
        for sub, table in (("features", "Neuron"), ("activations", "Activation")):
            for f in sorted((b.path / sub).iterdir()):
                rows = _read_jsonl_gz(f)
                assert rows, f
                keys = set(rows[0])
                for r in rows:
                    assert set(r) == keys, f"{f}: a line with other keys than the first"
                    _check_types(table, r)
                    assert r["modelId"] == b.model_id and r["layer"] == b.source_id
                if table == "Neuron":
                    n_neurons += len(rows)
                else:
                    n_acts += len(rows)
        assert n_neurons == N_FEATURES == b.n_features
        assert n_acts == int(((ex["sae"] == b.sae) & (ex["model"] == b.model)).sum()) == b.n_activations


def test_one_features_values_equal_the_runs_parquet(bundle, run):
    _, sources = bundle
    b = next(s for s in sources if (s.sae, s.model) == ("base_sae", "finetuned"))
    feats = pq.read_table(run / "features.parquet").to_pandas()
    feats = feats[feats["sae"] == "base_sae"].set_index("feature_id")
    vocab = pq.read_table(run / "vocab.parquet").column("token_str").to_pylist()
    forms = store.vocab_forms(run)
    ex = pq.read_table(run / "examples.parquet").to_pandas()
    ex = ex[(ex["sae"] == "base_sae") & (ex["model"] == "finetuned")]
    fid = int(ex.groupby("feature_id").size().idxmax())
    row = feats.loc[fid]
    neurons = {r["index"]: r for f in (b.path / "features").iterdir() for r in _read_jsonl_gz(f)}
    n = neurons[str(fid)]
    assert n["frac_nonzero"] == pytest.approx(row["density_finetuned"], rel=0, abs=0)
    assert n["maxActApprox"] == pytest.approx(row["max_act_finetuned"], rel=1e-12)
    assert n["pos_str"] == [vocab[i].replace("\x00", "") for i in row["logit_pos_ids_finetuned"]]
    np.testing.assert_allclose(n["pos_values"], row["logit_pos_values_finetuned"], rtol=1e-7)
    assert n["neg_str"] == [vocab[i].replace("\x00", "") for i in row["logit_neg_ids_finetuned"]]
    assert n["topkCosSimIndices"] == list(row["nn_feature_ids"])
    hist = np.asarray(row["act_hist_finetuned"])
    assert sum(n["freq_hist_data_bar_heights"]) == int(hist.sum())
    assert n["hookName"] == "blocks.1.hook_resid_pre" and n["hasVector"] is False

    acts = [r for f in (b.path / "activations").iterdir() for r in _read_jsonl_gz(f) if r["index"] == str(fid)]
    mine = ex[ex["feature_id"] == fid]
    assert len(acts) == len(mine)
    by_values = {tuple(np.round(r["values"], 5)): r for r in acts}
    n_bins = rundir.open_run(run)["config"]["examples"]["n_quantile_bins"]
    for _, e in mine.iterrows():
        r = by_values[tuple(np.round(np.asarray(e["acts_finetuned"], dtype=np.float64), 5))]
        assert r["tokens"] == [s.replace("\x00", "") for s in forms.window(e["token_ids"])]
        assert len(r["tokens"]) == len(r["values"])
        assert r["qualifyingTokenIndex"] == int(e["position"] - e["window_start"])
        assert r["dataIndex"] == str(int(e["seq_id"]))
        assert r["maxValue"] == max(r["values"]) and r["values"][r["maxValueTokenIndex"]] == r["maxValue"]
        if e["kind"] == "top":
            assert (r["binMin"], r["binContains"]) == (-1, -1) and r["binMax"] == pytest.approx(row["max_act_finetuned"])
        else:
            assert r["binMin"] == pytest.approx(e["bin_low"]) and r["binMax"] == pytest.approx(e["bin_high"])
            assert r["binContains"] == pytest.approx(1 / n_bins)


def test_nul_characters_are_stripped(bundle, run):
    _, sources = bundle
    windows = pq.read_table(run / "examples.parquet", columns=["token_ids"]).column("token_ids").to_pylist()
    assert any(5 in w for w in windows)  # the NUL token is in the bundle's windows
    for b in sources:
        for sub in ("features", "activations"):
            for f in (b.path / sub).iterdir():
                with gzip.open(f, "rb") as fh:
                    assert b"\\u0000" not in fh.read()


def test_existing_bundle_is_kept_unless_overwrite(run, tmp_path):
    first = neuronpedia.export(run, tmp_path)
    marker = first[0].path / "features" / "batch-0.jsonl.gz"
    before = marker.read_bytes()
    with pytest.raises(ConfigError, match="already exists"):
        neuronpedia.export(run, tmp_path)
    assert marker.read_bytes() == before
    again = neuronpedia.export(run, tmp_path, overwrite=True)
    assert marker.read_bytes() == before  # deterministic rows and ids
    assert [b.n_activations for b in again] == [b.n_activations for b in first]


def test_a_run_without_layer_counts_writes_nothing(run, tmp_path):
    import shutil

    d = tmp_path / "runs" / "nolayers"
    shutil.copytree(run, d)
    manifest = json.loads((d / schema.MANIFEST).read_text())
    manifest.pop("models")
    manifest.pop("schema_version", None)
    rundir.write_manifest(d, manifest)
    out = tmp_path / "out"
    with pytest.raises(Exception, match="how many layers"):
        neuronpedia.export(d, out)
    assert not out.exists() or not any(out.iterdir())


def test_command_line(run, tmp_path, capsys):
    from sae_transfer.cli import main

    args = ["export", "neuronpedia", "--run", run.name, "--runs-dir", str(run.parent), "--out", str(tmp_path),
            "--base-model-id", "My Base", "--finetuned-model-id", "my-base-it", "--features-per-batch", "100"]
    assert main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith(str(tmp_path / "v1")) for line in lines)
    assert sorted(p.name for p in (tmp_path / "v1").iterdir()) == ["my-base", "my-base-it"]
    assert main(args) == 2  # exists: a clear error, nothing replaced
    assert "already exists" in capsys.readouterr().err
    assert main(["export", "neuronpedia", "--run", "missing", "--runs-dir", str(run.parent), "--out", str(tmp_path)]) == 2
