"""Run directories on disk: atomic table writes, the manifest, and validation on open.

Writing: each table goes to a temporary name in the run directory and is renamed into place
(`write_table`), and `write_manifest` goes last, itself atomically. A directory without a
manifest, or whose manifest says `complete: false`, is not a run.

Reading: `open_run` checks the manifest, the schema version, every listed file's size and
(by default) sha256, and returns the manifest. Any problem is a `RunError` with a message
that names it and says what to do.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from explorer import schema
from explorer.errors import RunError

RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# The repository's data/runs (a checkout or an editable install); an installed copy has none, and
# then runs are looked for in ./data/runs (or wherever --runs-dir / $SAE_EXPLORER_RUNS_DIR says).
_REPO_RUNS_DIR = Path(__file__).resolve().parent.parent / "data" / "runs"
DEFAULT_RUNS_DIR = _REPO_RUNS_DIR if _REPO_RUNS_DIR.is_dir() else Path.cwd() / "data" / "runs"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _umask_mode(mode: int = 0o666) -> int:
    """`mode` less the process umask: what a plain open() would create (mkstemp makes 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_table(run_dir: Path, name: str, table: pa.Table, row_group_size: int | None = None) -> dict[str, Any]:
    """Write `table` as `run_dir/name` atomically, cast to the schema module's schema.

    Returns the manifest entry: rows, bytes, sha256.
    """
    target_schema = schema.TABLES[name]
    table = table.select(target_schema.names).cast(target_schema)
    run_dir = Path(run_dir)
    fd, tmp = tempfile.mkstemp(dir=run_dir, prefix=f".{name}.", suffix=".tmp")
    os.close(fd)
    try:
        pq.write_table(table, tmp, compression="zstd", row_group_size=row_group_size)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode())
        entry = {"rows": table.num_rows, "bytes": os.path.getsize(tmp), "sha256": sha256_file(Path(tmp))}
        os.replace(tmp, run_dir / name)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(run_dir)
    return entry


def write_manifest(run_dir: Path, manifest: dict[str, Any]) -> None:
    """Write manifest.json last and atomically; it is what makes a run complete."""
    manifest = {"schema_version": schema.SCHEMA_VERSION, **manifest}
    atomic_write_bytes(Path(run_dir) / schema.MANIFEST, (json.dumps(manifest, indent=2, sort_keys=True, default=_json_default) + "\n").encode())


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def validate_run_id(run_id: Any) -> str:
    if not isinstance(run_id, str) or not RUN_ID_PATTERN.match(run_id) or ".." in run_id:
        raise RunError(
            f"{str(run_id)[:80]!r} is not a valid run id: use letters, digits, '.', '_' and '-' "
            "(up to 128 characters, no path separators)."
        )
    return run_id


def run_path(run_id: str, runs_dir: Path | str = DEFAULT_RUNS_DIR) -> Path:
    """The directory of `run_id` inside `runs_dir`; never outside it."""
    validate_run_id(run_id)
    root = Path(runs_dir).resolve()
    path = (root / run_id).resolve()
    if path.parent != root:
        raise RunError(f"Run id {run_id!r} points outside the runs directory.")
    return path


def list_runs(runs_dir: Path | str = DEFAULT_RUNS_DIR) -> list[str]:
    """Run ids under `runs_dir` that have a manifest (complete or not), sorted."""
    root = Path(runs_dir)
    if not root.is_dir():
        return []
    real = root.resolve()
    return sorted(
        p.name for p in root.iterdir()
        if p.is_dir() and RUN_ID_PATTERN.match(p.name) and p.resolve().parent == real and (p / schema.MANIFEST).exists()
    )  # a symlink pointing outside the runs dir is not offered (run_path refuses it too)


_verified: dict[tuple[str, int, int], str] = {}


def read_manifest(run_dir: Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"There is no run at {run_dir}. Pick a run from the list, or create one with `python -m precompute run`.")
    path = run_dir / schema.MANIFEST
    if not path.exists():
        raise RunError(
            f"Run {run_dir.name!r} is incomplete: it has no {schema.MANIFEST} (its precompute is still running or was "
            "stopped). Run the same precompute command again to resume it."
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunError(f"Run {run_dir.name!r} has an unreadable {schema.MANIFEST} ({exc}). Re-run its precompute.") from None
    if not isinstance(manifest, dict):
        raise RunError(f"Run {run_dir.name!r}: {schema.MANIFEST} is not a JSON object. Re-run its precompute.")
    return manifest


def open_run(run_dir: Path | str, verify_hashes: bool = True) -> dict[str, Any]:
    """Validate a run directory and return its manifest, or raise RunError."""
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    version = manifest.get("schema_version")
    if version != schema.SCHEMA_VERSION:
        raise RunError(
            f"Run {run_dir.name!r} has schema version {version!r}, but this explorer reads version "
            f"{schema.SCHEMA_VERSION}. Re-run its precompute with this version of the tool."
        )
    if manifest.get("complete") is not True:
        raise RunError(f"Run {run_dir.name!r} is marked incomplete. Run the same precompute command again to finish it.")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise RunError(f"Run {run_dir.name!r}: the manifest lists no files. Re-run its precompute.")
    required = set(schema.TABLES) - schema.OPTIONAL_TABLES
    missing = sorted(required - set(files))
    if missing:
        raise RunError(f"Run {run_dir.name!r}: the manifest lacks {missing}. Re-run its precompute.")
    for name, entry in files.items():
        if name not in schema.TABLES:
            raise RunError(f"Run {run_dir.name!r}: unexpected file {name!r} in the manifest.")
        path = run_dir / name
        if not path.exists():
            raise RunError(f"Run {run_dir.name!r} is damaged: {name} is missing. Re-run its precompute.")
        size = path.stat().st_size
        if size != entry.get("bytes"):
            raise RunError(
                f"Run {run_dir.name!r} is damaged: {name} has {size} bytes, the manifest says {entry.get('bytes')} "
                "(truncated or overwritten). Re-run its precompute."
            )
        if verify_hashes:
            key = (str(path.resolve()), size, path.stat().st_mtime_ns)
            digest = _verified.get(key) or sha256_file(path)
            if digest != entry.get("sha256"):
                raise RunError(
                    f"Run {run_dir.name!r} is damaged: the sha256 of {name} does not match the manifest "
                    "(the file was corrupted or changed). Re-run its precompute."
                )
            _verified[key] = digest
    return manifest
