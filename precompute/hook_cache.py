"""Stage 4b, the kept hook activations: both models' activations at the hook, one file per stream
batch, written during the stream and read by the example windows at finalize (`HookActsCache`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from explorer import schema

MODELS = schema.MODELS


HOOK_ACTS_DIR = "hook_acts"
HOOK_CACHE_MB_ENV = "PRECOMPUTE_HOOK_CACHE_MB"
HOOK_CACHE_MB_DEFAULT = 2048


class HookActsCache:
    """Both models' activations at the hook, one file per stream batch, kept on disk during the
    stream so that finalize fills the example windows without running the models again.

    Disk, not memory (peak memory stays flat in the token count), bounded by
    $PRECOMPUTE_HOOK_CACHE_MB (default 2048 MB; 0 turns it off): batches past the budget are
    recomputed at finalize, as is any batch whose file is missing or whose tokens differ. Files
    are written atomically (`.npz` renamed into place) and live in the run's checkpoint
    directory (a shard's: moved next to its state when the shard completes), so they go when
    the run is finalized."""

    def __init__(self, read_dirs: Sequence[Path], write_dir: Path | None = None):
        self.read_dirs = [Path(d) for d in read_dirs]
        self.write_dir = None if write_dir is None else Path(write_dir)
        try:
            mb = float(os.environ.get(HOOK_CACHE_MB_ENV, HOOK_CACHE_MB_DEFAULT))
        except ValueError:
            mb = HOOK_CACHE_MB_DEFAULT
        self.budget = int(max(0.0, mb) * 2**20)
        self.used = 0
        if self.write_dir is not None and self.write_dir.is_dir():
            for f in self.write_dir.iterdir():
                if f.suffix == ".npz":
                    self.used += f.stat().st_size
                else:  # a temporary file of a process killed mid-write
                    f.unlink(missing_ok=True)

    @staticmethod
    def _name(b: int) -> str:
        return f"{b:07d}.npz"

    def put(self, b: int, tokens: np.ndarray, xs: dict) -> bool:
        if self.write_dir is None:
            return False
        arrays = {"tokens": np.ascontiguousarray(tokens, dtype=np.int64), **{m: x.detach().float().cpu().numpy() for m, x in xs.items()}}
        size = sum(a.nbytes for a in arrays.values())
        if self.used + size > self.budget:
            return False
        self.write_dir.mkdir(parents=True, exist_ok=True)
        final = self.write_dir / self._name(b)
        tmp = self.write_dir / f".{final.name}.{os.getpid()}.tmp"
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
        os.replace(tmp, final)
        self.used += final.stat().st_size
        return True

    def get(self, b: int, tokens: np.ndarray) -> dict[str, np.ndarray] | None:
        for d in self.read_dirs:
            f = d / self._name(b)
            if not f.is_file():
                continue
            try:
                with np.load(f, allow_pickle=False) as z:
                    if not np.array_equal(z["tokens"], tokens):
                        return None
                    return {m: z[m] for m in MODELS}
            except (OSError, ValueError, KeyError):  # damaged: recompute
                return None
        return None

