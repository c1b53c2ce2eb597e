"""Training-time window features over raw events: the offline entry point to the window kernels.

Callers hold events in any order with any entity keys (int64 or strings); the kernels need int64
entity codes sorted by (entity, time). window_features factorizes, sorts stably (events of one
entity at one time keep their given order), runs the kernels and returns every feature in the
caller's row order, so it lines up with the labels. Each event sees only itself and earlier
events of its entity, never a later one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from numbers import Real

import numpy as np

from featurestore.errors import InvalidArgumentError
from featurestore.kernels import windows

KINDS = {
    "window": ("count", "sum", "mean", "min", "max"),
    "ewma": ("",),
    "rfm": ("recency_s", "frequency", "monetary"),
}
"""Each spec kind and the suffixes of the columns it yields (`<name>_<suffix>`)."""
_INT64_MAX = np.iinfo(np.int64).max


@dataclass(frozen=True)
class WindowSpec:
    """One named family of window features over one value column.

    kind "window": trailing-window count, sum, mean, min, max over `seconds`; "ewma":
    time-decayed mean with half-life `seconds`; "rfm": seconds since the entity's previous
    event, events and sum of values in the trailing `seconds`.
    """

    name: str
    kind: str
    column: str
    seconds: float

    def outputs(self) -> list[str]:
        """The output column names of this spec."""
        return [f"{self.name}_{s}" if s else self.name for s in KINDS[self.kind]]

    def span_us(self) -> int:
        """seconds in whole µs, from 1 to int64's largest; InvalidArgumentError otherwise (a
        0 µs window holds no event, not even the one it is computed for)."""
        seconds = self.seconds
        if isinstance(seconds, Real) and not isinstance(seconds, bool) and math.isfinite(seconds):
            span = round(float(seconds) * 1e6)
            if 1 <= span <= _INT64_MAX:
                return span
        raise InvalidArgumentError(
            f"window spec {self.name!r}: seconds must be a number from 1e-06 (1 µs) to "
            f"{_INT64_MAX / 1e6:.6g} (the int64 µs range), got {seconds!r}"
        )


def window_features(
    entity: np.ndarray | Sequence,
    ts_us: np.ndarray,
    columns: Mapping[str, np.ndarray],
    specs: Sequence[WindowSpec],
) -> dict[str, np.ndarray]:
    """Every spec's output columns, one value per event, in the given row order."""
    ts = np.asarray(ts_us)
    if ts.ndim != 1 or ts.dtype.kind not in "iu":
        raise InvalidArgumentError(
            f"ts_us must be a 1-D integer array of µs since the epoch, got {ts.dtype} {ts.shape}"
        )
    n = len(ts)
    if ts.dtype == np.uint64 and n and ts.max() > _INT64_MAX:
        row = int(np.argmax(ts > _INT64_MAX))
        raise InvalidArgumentError(
            f"ts_us[{row}] = {ts[row]} is beyond int64 µs (over {_INT64_MAX}); give µs since "
            "the epoch as int64"
        )
    keys = np.asarray(entity)
    if keys.shape != (n,):
        raise InvalidArgumentError(f"entity has shape {keys.shape}, expected ({n},) like ts_us")
    values = [_values(spec, columns, n) for spec in specs]
    _check_names(specs)
    try:
        _, codes = np.unique(keys, return_inverse=True)
    except TypeError as exc:
        raise InvalidArgumentError(
            f"entity: the keys cannot be sorted ({exc}); give keys of one type (ints or "
            "strings) and no None"
        ) from None
    order = np.lexsort((ts, codes))
    sorted_codes = codes[order].astype(np.int64)
    sorted_ts = ts[order].astype(np.int64)
    out: dict[str, np.ndarray] = {}
    for spec, column_values in zip(specs, values, strict=True):
        v = column_values[order]
        span = spec.span_us()
        if spec.kind == "window":
            result = windows.window_aggregates(sorted_codes, sorted_ts, v, span)
        elif spec.kind == "ewma":
            result = (windows.ewma(sorted_codes, sorted_ts, v, float(span)),)
        else:
            result = windows.rfm(sorted_codes, sorted_ts, v, span)
        for name, column in zip(spec.outputs(), result, strict=True):
            restored = np.empty_like(column)
            restored[order] = column
            out[name] = restored
    return out


def _values(spec: WindowSpec, columns: Mapping[str, np.ndarray], n: int) -> np.ndarray:
    """The spec's value column as contiguous float64, after checking the spec itself."""
    label = f"window spec {spec.name!r}"
    if spec.kind not in KINDS:
        raise InvalidArgumentError(f"{label}: kind {spec.kind!r} is unknown; use {list(KINDS)}")
    spec.span_us()
    if spec.column not in columns:
        raise InvalidArgumentError(
            f"{label}: column {spec.column!r} is missing; given: {sorted(columns)}"
        )
    v = np.asarray(columns[spec.column])
    if v.shape != (n,) or v.dtype.kind not in "fiub":
        raise InvalidArgumentError(
            f"{label}: column {spec.column!r} must be {n} numbers, got {v.dtype} {v.shape}"
        )
    return np.ascontiguousarray(v, dtype=np.float64)


def _check_names(specs: Sequence[WindowSpec]) -> None:
    seen: set[str] = set()
    for spec in specs:
        for name in spec.outputs():
            if name in seen:
                raise InvalidArgumentError(f"window spec {spec.name!r}: output {name!r} repeats")
            seen.add(name)
