"""Arrow columns from numpy arrays, for the table builders."""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def list_col(arr2d: np.ndarray, typ) -> pa.ListArray:
    """A [n, k] array as n fixed-length lists."""
    n, k = arr2d.shape
    offsets = np.arange(0, n * k + 1, k, dtype=np.int32) if n else np.zeros(1, np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(np.ascontiguousarray(arr2d).reshape(-1), typ))


def nullable(values: np.ndarray, valid: np.ndarray, typ) -> pa.Array:
    """`values` where `valid`, null elsewhere."""
    return pa.array(np.where(valid, values, 0).astype(typ.to_pandas_dtype()), typ, mask=~valid)
