"""Transform parameter parsing: numbers and per-input lists from config tables, checked with
errors that name the field, and the JSON/TOML-friendly form they are written back in.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from featurestore.errors import InvalidArgumentError


def param_float(value: Any, label: str, key: str) -> float:
    """One number param; the strings "nan", "inf", "+inf" and "-inf" are accepted too."""
    if isinstance(value, str) and value.strip().lower() in ("nan", "inf", "+inf", "-inf"):
        return float(value)
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise InvalidArgumentError(f"{label}: params.{key} must be a number, got {value!r}")
    return float(value)


def param_floats(params: dict, key: str, n: int, label: str, finite: bool = True) -> np.ndarray:
    """params[key] as n float64 values: a list with one per input, or one number for all."""
    if key not in params:
        raise InvalidArgumentError(f"{label}: params.{key} is required (fit the transform)")
    raw = params[key]
    items = list(raw) if isinstance(raw, list | tuple | np.ndarray) else [raw] * n
    if len(items) != n:
        raise InvalidArgumentError(
            f"{label}: params.{key} needs {n} values (one per input), got {len(items)}"
        )
    values = np.array([param_float(v, label, key) for v in items], np.float64)
    bad = np.flatnonzero(np.isnan(values) | (~np.isfinite(values) if finite else False))
    if bad.size:
        raise InvalidArgumentError(
            f"{label}: params.{key}[{bad[0]}] is {values[bad[0]]}; it must be finite"
        )
    return values


def param_ints(params: dict, key: str, n: int, label: str, minimum: int) -> np.ndarray:
    """params[key] as n whole numbers >= minimum (int64), given like param_floats."""
    values = param_floats(params, key, n, label)
    bad = np.flatnonzero((values != np.floor(values)) | (values < minimum))
    if bad.size:
        raise InvalidArgumentError(
            f"{label}: params.{key}[{bad[0]}] is {values[bad[0]]}; use a whole number >= {minimum}"
        )
    return values.astype(np.int64)


def jsonable(value: Any) -> Any:
    """Lists, ints, floats and strings only; NaN and infinities as "nan", "inf", "-inf"."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [jsonable(v) for v in value]
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        f = float(value)
        return f if math.isfinite(f) else str(f)
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, str):
        return str(value)
    return value
