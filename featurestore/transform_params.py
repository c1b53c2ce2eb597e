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


def _whole(value: Any, label: str, key: str, k: int, lo: int, hi: int, fix: str) -> int:
    """One whole-number param as an exact Python int (an int is never sent through float64,
    which rounds above 2**53), checked against [lo, hi]."""
    where = f"{label}: params.{key}[{k}]"
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise InvalidArgumentError(f"{where} must be a whole number, got {value!r}")
    if isinstance(value, float | np.floating) and not float(value).is_integer():
        raise InvalidArgumentError(
            f"{where} is {value!r}; use a whole number (an integer, not a fraction or NaN/inf)"
        )
    whole = int(value)
    if not lo <= whole <= hi:
        raise InvalidArgumentError(f"{where} is {value!r}; it must be in [{lo}, {hi}]: {fix}")
    return whole


def param_ints(
    params: dict, key: str, n: int, label: str, lo: int, hi: int, fix: str
) -> np.ndarray:
    """params[key] as n whole numbers in [lo, hi] (int64), given like param_floats; Python ints
    stay exact, and `fix` says what to do about a value out of range."""
    if key not in params:
        raise InvalidArgumentError(f"{label}: params.{key} is required (fit the transform)")
    raw = params[key]
    items = list(raw) if isinstance(raw, list | tuple | np.ndarray) else [raw] * n
    if len(items) != n:
        raise InvalidArgumentError(
            f"{label}: params.{key} needs {n} values (one per input), got {len(items)}"
        )
    return np.array([_whole(v, label, key, k, lo, hi, fix) for k, v in enumerate(items)], np.int64)


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
