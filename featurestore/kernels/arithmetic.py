"""Two-column arithmetic kernels: safe ratio and difference."""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(nogil=True, cache=True)
def ratio_value(a: float, b: float, fill: float) -> float:
    """a / b, or fill when b == 0 (NaN in either input gives NaN)."""
    if b == 0.0:
        return fill
    return a / b


@njit(nogil=True, cache=True)
def ratio(a: np.ndarray, b: np.ndarray, fill: float) -> np.ndarray:
    """Row-wise a / b with fill where b == 0."""
    out = np.empty(a.shape[0], np.float64)
    for i in range(a.shape[0]):
        out[i] = ratio_value(a[i], b[i], fill)
    return out


@njit(nogil=True, cache=True)
def difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise a - b."""
    out = np.empty(a.shape[0], np.float64)
    for i in range(a.shape[0]):
        out[i] = a[i] - b[i]
    return out
