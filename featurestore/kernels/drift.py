"""Drift kernels: histograms against fitted bin edges and the population stability index."""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from featurestore.kernels.scaling import bucket_value


@njit(nogil=True, cache=True)
def histogram(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts per bucket of `bucketize(values, edges)`: len(edges) + 2 int64 counts, the first
    below edges[0], the one before last at or above edges[-1], the last counting NaN."""
    nb = edges.shape[0]
    counts = np.zeros(nb + 2, np.int64)
    for i in range(values.shape[0]):
        counts[bucket_value(values[i], edges, 0, nb)] += 1
    return counts


@njit(nogil=True, cache=True)
def psi(expected: np.ndarray, actual: np.ndarray, eps: float) -> float:
    """Population stability index sum((a - e) * ln(a / e)) over bucket shares, each share
    floored at eps so empty buckets stay finite; NaN when either histogram is empty."""
    te = 0.0
    ta = 0.0
    for k in range(expected.shape[0]):
        te += expected[k]
        ta += actual[k]
    if te == 0.0 or ta == 0.0:
        return math.nan
    total = 0.0
    for k in range(expected.shape[0]):
        e = max(expected[k] / te, eps)
        a = max(actual[k] / ta, eps)
        total += (a - e) * math.log(a / e)
    return total
