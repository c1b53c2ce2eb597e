"""Transform input conversion: columns to the contiguous float64, int64 time or key (int64 or
packed string) arrays that the kernels of each op kind take.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from featurestore.errors import InvalidArgumentError
from featurestore.kernels.encoding import StringColumn, pack_strings


def as_float(x: Any, label: str, name: str) -> np.ndarray:
    """A numeric column as contiguous 1-D float64; other dtypes raise InvalidArgumentError."""
    arr = x if isinstance(x, np.ndarray) else np.asarray(x)
    if arr.dtype.kind not in "fiub":
        raise InvalidArgumentError(
            f"{label}: input {name!r} has dtype {arr.dtype}; this op needs numbers"
        )
    return np.ascontiguousarray(arr.reshape(-1), dtype=np.float64)


def _as_time(x: Any, label: str, name: str) -> np.ndarray:
    arr = x if isinstance(x, np.ndarray) else np.asarray(x)
    if arr.dtype.kind == "M":
        return np.ascontiguousarray(arr.astype("datetime64[us]").view(np.int64).reshape(-1))
    if arr.dtype.kind not in "iu":
        raise InvalidArgumentError(
            f"{label}: input {name!r} has dtype {arr.dtype}; time ops need int64 microseconds "
            "since the epoch (UTC) or datetime64"
        )
    return np.ascontiguousarray(arr.reshape(-1), dtype=np.int64)


def _as_key(x: Any, label: str, name: str) -> np.ndarray | StringColumn:
    if isinstance(x, StringColumn):
        return x
    arr = x if isinstance(x, np.ndarray) else np.asarray(x)
    if arr.dtype.kind in "iub":
        return np.ascontiguousarray(arr.reshape(-1), dtype=np.int64)
    if arr.dtype.kind in "USO":
        return pack_strings(arr)
    raise InvalidArgumentError(
        f"{label}: input {name!r} has dtype {arr.dtype}; this op needs strings or int64"
    )


CONVERTERS = {"float": as_float, "time": _as_time, "key": _as_key}
