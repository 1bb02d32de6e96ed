"""Run directories: atomic writes, the manifest, and every way a run can be broken."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from explorer import rundir, schema
from explorer.errors import RunError


def _write_minimal_run(run_dir):
    run_dir.mkdir(parents=True)
    files = {}
    for name, sch in schema.TABLES.items():
        if name in schema.OPTIONAL_TABLES:
            continue
        files[name] = rundir.write_table(run_dir, name, sch.empty_table())
    rundir.write_manifest(run_dir, {"run_id": run_dir.name, "complete": True, "files": files})
    return files


def test_write_table_casts_and_records(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    table = pa.table({"token_str": ["<script>", "a"], "token_bytes": [b"<script>", b"a"], "token_piece": ["<script>", "a"], "token_id": [3, 4]})  # other order, int64
    entry = rundir.write_table(run, "vocab.parquet", table)
    back = pq.read_table(run / "vocab.parquet")
    assert back.schema.equals(schema.VOCAB, check_metadata=False)
    assert back.column("token_str").to_pylist() == ["<script>", "a"]
    assert entry["rows"] == 2
    assert entry["bytes"] == (run / "vocab.parquet").stat().st_size
    assert entry["sha256"] == rundir.sha256_file(run / "vocab.parquet")
    assert [p.name for p in run.iterdir()] == ["vocab.parquet"]  # no temporary left behind


def test_write_table_failure_leaves_nothing(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    with pytest.raises(Exception):
        rundir.write_table(run, "vocab.parquet", pa.table({"token_id": ["not an int"], "token_str": ["x"]}))
    assert list(run.iterdir()) == []


def test_open_run_accepts_a_complete_run(tmp_path):
    files = _write_minimal_run(tmp_path / "good")
    manifest = rundir.open_run(tmp_path / "good")
    assert manifest["schema_version"] == schema.SCHEMA_VERSION
    assert manifest["files"] == files
    assert rundir.list_runs(tmp_path) == ["good"]


def test_missing_run_and_missing_manifest(tmp_path):
    with pytest.raises(RunError, match="no run at"):
        rundir.open_run(tmp_path / "nope")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "features.parquet").write_bytes(b"PAR1")
    with pytest.raises(RunError, match="incomplete.*no manifest.json"):
        rundir.open_run(tmp_path / "half")
    assert rundir.list_runs(tmp_path) == []


def _edit_manifest(run, **changes):
    path = run / schema.MANIFEST
    m = json.loads(path.read_text())
    m.update(changes)
    path.write_text(json.dumps(m))


def test_incomplete_flag_and_other_schema_version(tmp_path):
    run = tmp_path / "r"
    _write_minimal_run(run)
    _edit_manifest(run, complete=False)
    with pytest.raises(RunError, match="marked incomplete"):
        rundir.open_run(run)
    _edit_manifest(run, complete=True, schema_version=schema.SCHEMA_VERSION + 1)
    with pytest.raises(RunError, match=f"schema version {schema.SCHEMA_VERSION + 1}"):
        rundir.open_run(run)
    (run / schema.MANIFEST).write_text("{broken")
    with pytest.raises(RunError, match="unreadable"):
        rundir.open_run(run)


def test_truncated_and_corrupted_files(tmp_path):
    run = tmp_path / "r"
    _write_minimal_run(run)
    path = run / "features.parquet"
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(RunError, match="features.parquet has .* bytes.*truncated"):
        rundir.open_run(run)
    corrupted = bytearray(data)
    corrupted[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(corrupted))
    with pytest.raises(RunError, match="sha256 of features.parquet does not match"):
        rundir.open_run(run)
    path.unlink()
    with pytest.raises(RunError, match="features.parquet is missing"):
        rundir.open_run(run)


@pytest.mark.parametrize("bad", ["../etc", "..", "a/b", "/abs", "", "x" * 200, ".hidden", "a\x00b", 5, None])
def test_run_ids_cannot_escape(tmp_path, bad):
    with pytest.raises(RunError, match="not a valid run id"):
        rundir.run_path(bad, tmp_path)


def test_run_path_inside_root(tmp_path):
    assert rundir.run_path("demo", tmp_path) == (tmp_path / "demo").resolve()


def test_written_files_are_readable_by_others(tmp_path):
    """mkstemp creates 0600; a run shared with colleagues (or served by another user) must not be."""
    import os
    import stat

    _write_minimal_run(tmp_path / "r")
    umask = os.umask(0)
    os.umask(umask)
    for p in (tmp_path / "r").iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask, p.name
