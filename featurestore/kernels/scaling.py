"""Scaling kernels: standardize, min-max, log1p, clip and bucketize over float64 columns.

Each column kernel loops over a scalar `*_value` function that the fused chain in
featurestore/kernels/fused.py calls too, so the maths exists exactly once. NaN in gives NaN out,
except for bucketing, which sends NaN to a dedicated last bucket.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit


@njit(nogil=True, cache=True)
def standardize_value(x: float, mean: float, std: float) -> float:
    """(x - mean) / std; a zero std maps every non-NaN value to 0."""
    if std == 0.0:
        return x if math.isnan(x) else 0.0
    return (x - mean) / std


@njit(nogil=True, cache=True)
def min_max_value(x: float, lo: float, hi: float) -> float:
    """(x - lo) / (hi - lo), not clipped; hi == lo maps every non-NaN value to 0."""
    if hi == lo:
        return x if math.isnan(x) else 0.0
    return (x - lo) / (hi - lo)


@njit(nogil=True, cache=True)
def log1p_value(x: float) -> float:
    """log(1 + x) with negative inputs clipped to 0 first (so the result is >= 0, never NaN)."""
    if x < 0.0:
        x = 0.0
    return math.log1p(x)


@njit(nogil=True, cache=True)
def clip_value(x: float, lo: float, hi: float) -> float:
    """x limited to [lo, hi]."""
    if x < lo:
        return lo
    if x > hi:
        return hi
    return x


@njit(nogil=True, cache=True)
def bucket_width_value(x: float, lo: float, hi: float, n: int) -> int:
    """Equal-width bucket of x among n over [lo, hi]: 0..n-1, out-of-range clamped; NaN -> n.

    A NaN position (hi - lo overflowing, which loading rejects) clamps to bucket 0.
    """
    if math.isnan(x):
        return n
    if hi <= lo:
        return 0
    t = (x - lo) / (hi - lo) * n
    if not t >= 0.0:
        return 0
    if t >= n - 1:
        return n - 1
    return int(t)


@njit(nogil=True, cache=True)
def bucket_value(x: float, boundaries: np.ndarray, start: int, stop: int) -> int:
    """Count of boundaries[start:stop] <= x (sorted ascending); NaN -> stop - start + 1.

    Up to 16 boundaries a branch-free linear count beats a binary search on random data.
    """
    if math.isnan(x):
        return stop - start + 1
    if stop - start <= 16:
        count = 0
        for j in range(start, stop):
            count += boundaries[j] <= x
        return count
    lo = start
    hi = stop
    while lo < hi:
        mid = (lo + hi) >> 1
        if boundaries[mid] <= x:
            lo = mid + 1
        else:
            hi = mid
    return lo - start


@njit(nogil=True, cache=True)
def standardize(x: np.ndarray, mean: float, std: float) -> np.ndarray:
    """Column standardize: (x - mean) / std, std == 0 -> 0."""
    out = np.empty(x.shape[0], np.float64)
    for i in range(x.shape[0]):
        out[i] = standardize_value(x[i], mean, std)
    return out


@njit(nogil=True, cache=True)
def min_max_scale(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Column min-max scale to [0, 1] for values inside [lo, hi]."""
    out = np.empty(x.shape[0], np.float64)
    for i in range(x.shape[0]):
        out[i] = min_max_value(x[i], lo, hi)
    return out


@njit(nogil=True, cache=True)
def log1p(x: np.ndarray) -> np.ndarray:
    """Column log1p with negatives clipped to 0."""
    out = np.empty(x.shape[0], np.float64)
    for i in range(x.shape[0]):
        out[i] = log1p_value(x[i])
    return out


@njit(nogil=True, cache=True)
def clip(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Column clip to [lo, hi]."""
    out = np.empty(x.shape[0], np.float64)
    for i in range(x.shape[0]):
        out[i] = clip_value(x[i], lo, hi)
    return out


@njit(nogil=True, cache=True)
def bucketize_width(x: np.ndarray, lo: float, hi: float, n: int) -> np.ndarray:
    """Column equal-width buckets 0..n-1 over [lo, hi]; NaN -> bucket n."""
    out = np.empty(x.shape[0], np.int64)
    for i in range(x.shape[0]):
        out[i] = bucket_width_value(x[i], lo, hi, n)
    return out


@njit(nogil=True, cache=True)
def bucketize(x: np.ndarray, boundaries: np.ndarray) -> np.ndarray:
    """Column buckets by sorted boundaries: bucket k holds boundaries[k-1] <= x < boundaries[k]
    (0..len(boundaries)); NaN -> len(boundaries) + 1."""
    out = np.empty(x.shape[0], np.int64)
    nb = boundaries.shape[0]
    for i in range(x.shape[0]):
        out[i] = bucket_value(x[i], boundaries, 0, nb)
    return out
