"""Compare two run directories table by table, bitwise (Arrow buffers, NaN bit patterns included),
and their manifests (all but created_at, timing and the files' checksums).

    python scripts/compare_runs.py RUN_DIR_A RUN_DIR_B     # exit 0 when identical, 1 otherwise

Used to check that a refactor of the precompute, or a sharded or distributed run, gives the run a
single pass gives.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import pyarrow.parquet as pq  # noqa: E402

from explorer import schema  # noqa: E402

MANIFEST_KEYS_IGNORED = ("created_at", "timing", "files")


def _digest(column) -> bytes:
    h = hashlib.sha256()
    for buf in column.combine_chunks().buffers():
        h.update(b"-" if buf is None else bytes(buf))
    return h.digest()


def compare(a: Path, b: Path) -> list[str]:
    """The differences between runs a and b, as lines; empty when identical."""
    out = []
    for name in schema.TABLES:
        if not (a / name).exists() or not (b / name).exists():
            if (a / name).exists() != (b / name).exists():
                out.append(f"{name}: present in only one run")
            continue
        ta, tb = pq.read_table(a / name), pq.read_table(b / name)
        if ta.schema != tb.schema or ta.num_rows != tb.num_rows:
            out.append(f"{name}: schema or row count differ ({ta.num_rows} vs {tb.num_rows} rows)")
            continue
        bad = [col for col in ta.schema.names if _digest(ta.column(col)) != _digest(tb.column(col))]
        if bad:
            out.append(f"{name}: columns differ bitwise: {', '.join(bad)}")
    ma, mb = (json.loads((p / schema.MANIFEST).read_text()) for p in (a, b))
    for key in sorted(set(ma) | set(mb)):
        if key not in MANIFEST_KEYS_IGNORED and ma.get(key) != mb.get(key):
            out.append(f"manifest.json: {key} differs")
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    diffs = compare(Path(argv[0]), Path(argv[1]))
    for line in diffs:
        print(line)
    print("identical" if not diffs else f"{len(diffs)} difference(s)")
    return 0 if not diffs else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
