"""HDR-style log-linear latency histogram: ~0.4% bucket error, mergeable as a numpy count array.

Values are integer nanoseconds. Below 256 every value has its own bucket; above, each power of
two is split into 128 equal buckets, so a bucket's width is at most 1/128 of its value and its
midpoint is within 0.4% of any value in it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

SUB_BITS = 8
SUB_COUNT = 1 << SUB_BITS
HALF_COUNT = SUB_COUNT // 2
MAX_VALUE = (1 << 44) - 1
BUCKET_COUNT = SUB_COUNT + (MAX_VALUE.bit_length() - SUB_BITS) * HALF_COUNT


def bucket_index(value: int) -> int:
    """The bucket of one non-negative integer value (clamped to MAX_VALUE)."""
    if value < SUB_COUNT:
        return max(value, 0)
    value = min(value, MAX_VALUE)
    shift = value.bit_length() - SUB_BITS
    return SUB_COUNT + (shift - 1) * HALF_COUNT + (value >> shift) - HALF_COUNT


def bucket_indices(values: np.ndarray) -> np.ndarray:
    """Vectorised bucket_index for an array of values."""
    v = np.clip(np.asarray(values, dtype=np.int64), 0, MAX_VALUE)
    bit_length = np.frexp(v.astype(np.float64))[1].astype(np.int64)
    shift = np.maximum(bit_length - SUB_BITS, 1)
    high = SUB_COUNT + (shift - 1) * HALF_COUNT + (v >> shift) - HALF_COUNT
    return np.where(v < SUB_COUNT, v, high)


def _bucket_bounds() -> tuple[np.ndarray, np.ndarray]:
    """Lowest value and width of every bucket."""
    index = np.arange(BUCKET_COUNT, dtype=np.int64)
    j = np.maximum(index - SUB_COUNT, 0)
    shift = j // HALF_COUNT + 1
    low = np.where(index < SUB_COUNT, index, (j % HALF_COUNT + HALF_COUNT) << shift)
    width = np.where(index < SUB_COUNT, 1, np.left_shift(1, shift))
    return low, width


_LOW, _WIDTH = _bucket_bounds()
_MID = _LOW + (_WIDTH - 1) / 2.0


class Histogram:
    """Counts of latencies (ns) in log-linear buckets, plus exact min, max and sum."""

    __slots__ = ("counts", "max", "min", "total_ns")

    def __init__(self) -> None:
        self.counts = np.zeros(BUCKET_COUNT, dtype=np.int64)
        self.min = MAX_VALUE
        self.max = 0
        self.total_ns = 0

    def record(self, value_ns: int) -> None:
        """Add one value; cheap enough for a per-request call."""
        self.counts[bucket_index(value_ns)] += 1
        self.total_ns += value_ns
        if value_ns < self.min:
            self.min = value_ns
        if value_ns > self.max:
            self.max = value_ns

    def record_many(self, values_ns: np.ndarray) -> None:
        """Add an array of values in one pass."""
        values = np.asarray(values_ns, dtype=np.int64)
        if values.size == 0:
            return
        self.counts += np.bincount(bucket_indices(values), minlength=BUCKET_COUNT)
        self.total_ns += int(values.sum())
        self.min = min(self.min, int(values.min()))
        self.max = max(self.max, int(values.max()))

    def merge(self, other: Histogram) -> None:
        """Add another histogram's counts into this one (e.g. from another process)."""
        self.counts += other.counts
        self.total_ns += other.total_ns
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)

    @property
    def count(self) -> int:
        """Number of recorded values."""
        return int(self.counts.sum())

    def mean(self) -> float:
        """Exact mean in ns (NaN when empty)."""
        n = self.count
        return self.total_ns / n if n else float("nan")

    def percentile(self, q: float) -> float:
        """The q-th percentile (0..100) in ns: midpoint of the bucket holding that rank."""
        return self.percentiles([q])[0]

    def percentiles(self, qs: Iterable[float]) -> list[float]:
        """Several percentiles in ns with one cumulative pass; NaN when empty."""
        cumulative = np.cumsum(self.counts)
        n = int(cumulative[-1])
        if n == 0:
            return [float("nan") for _ in qs]
        out = []
        for q in qs:
            rank = min(max(int(np.ceil(q / 100.0 * n)), 1), n)
            index = int(np.searchsorted(cumulative, rank))
            out.append(float(min(max(_MID[index], self.min), self.max)))
        return out

    def to_dict(self) -> dict[str, Any]:
        """A compact, JSON-friendly form: only the non-empty buckets."""
        nonzero = np.flatnonzero(self.counts)
        return {
            "indices": nonzero.tolist(),
            "counts": self.counts[nonzero].tolist(),
            "min": self.min,
            "max": self.max,
            "total_ns": self.total_ns,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Histogram:
        """Inverse of to_dict."""
        hist = cls()
        hist.counts[np.asarray(data["indices"], dtype=np.int64)] = data["counts"]
        hist.min, hist.max, hist.total_ns = data["min"], data["max"], data["total_ns"]
        return hist
