"""Transform input conversion: columns to the contiguous float64, int64 time or key (int64 or
packed string) arrays that the kernels of each op kind take.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from featurestore.errors import InvalidArgumentError
from featurestore.kernels.encoding import StringColumn, pack_strings

_INT64_MAX = np.iinfo(np.int64).max


def as_float(x: Any, label: str, name: str) -> np.ndarray:
    """A numeric column as contiguous 1-D float64; other dtypes raise InvalidArgumentError."""
    arr = x if isinstance(x, np.ndarray) else np.asarray(x)
    if arr.dtype.kind not in "fiub":
        raise InvalidArgumentError(
            f"{label}: input {name!r} has dtype {arr.dtype}; this op needs numbers"
        )
    return np.ascontiguousarray(arr.reshape(-1), dtype=np.float64)


def _check_int64(arr: np.ndarray, label: str, name: str) -> None:
    """Refuse unsigned values over int64's largest, which the int64 cast would wrap negative."""
    if arr.dtype.itemsize == 8 and arr.size and arr.max() > _INT64_MAX:
        row = int(np.argmax(arr.reshape(-1) > _INT64_MAX))
        raise InvalidArgumentError(
            f"{label}: input {name!r} holds {arr.reshape(-1)[row]} at row {row}, over int64's "
            f"largest ({_INT64_MAX}); give values that fit int64"
        )


def _as_time(x: Any, label: str, name: str) -> np.ndarray:
    arr = x if isinstance(x, np.ndarray) else np.asarray(x)
    if arr.dtype.kind == "u":
        _check_int64(arr, label, name)
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
        if arr.dtype.kind == "u":
            _check_int64(arr, label, name)
        return np.ascontiguousarray(arr.reshape(-1), dtype=np.int64)
    if arr.dtype.kind in "US" and not isinstance(x, np.ndarray):
        # A fixed-width array drops trailing NULs ("a\x00" became "a"): keep the given strings.
        arr = np.asarray(x, dtype=object)
    if arr.dtype.kind in "USO":
        try:
            return pack_strings(arr)
        except (TypeError, UnicodeEncodeError):
            row, value = next((i, v) for i, v in enumerate(arr.ravel()) if not _utf8(v))
            raise InvalidArgumentError(
                f"{label}: input {name!r} holds {value!r} at row {row}; give str (UTF-8) or "
                "bytes values, or int64 keys"
            ) from None
    raise InvalidArgumentError(
        f"{label}: input {name!r} has dtype {arr.dtype}; this op needs strings or int64"
    )


def _utf8(value: object) -> bool:
    """Whether pack_strings takes value: bytes-like, or a str that encodes as UTF-8."""
    if isinstance(value, str):
        return value.encode("utf-8", "surrogatepass") == value.encode("utf-8", "ignore")
    return isinstance(value, (bytes, bytearray, memoryview))


CONVERTERS = {"float": as_float, "time": _as_time, "key": _as_key}
