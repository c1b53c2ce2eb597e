"""Calendar and cyclical time kernels over int64 microseconds since the Unix epoch (UTC).

Integer division floors (Python semantics), so instants before 1970 land in the right hour and
day. Cyclical encodings use the whole hour (0..23) and day of week (Monday=0).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

US_PER_HOUR = 3_600_000_000
US_PER_DAY = 86_400_000_000
EPOCH_WEEKDAY = 3  # 1970-01-01 was a Thursday; Monday = 0
TWO_PI = 2.0 * math.pi


@njit(nogil=True, cache=True)
def hour_of_day(ts_us: np.ndarray) -> np.ndarray:
    """Hour of day 0..23 (UTC)."""
    out = np.empty(ts_us.shape[0], np.int64)
    for i in range(ts_us.shape[0]):
        out[i] = (ts_us[i] // US_PER_HOUR) % 24
    return out


@njit(nogil=True, cache=True)
def day_of_week(ts_us: np.ndarray) -> np.ndarray:
    """Day of week 0..6, Monday = 0 (UTC)."""
    out = np.empty(ts_us.shape[0], np.int64)
    for i in range(ts_us.shape[0]):
        out[i] = (ts_us[i] // US_PER_DAY + EPOCH_WEEKDAY) % 7
    return out


@njit(nogil=True, cache=True)
def is_weekend(ts_us: np.ndarray) -> np.ndarray:
    """1 on Saturday and Sunday (UTC), else 0, as int64."""
    out = np.empty(ts_us.shape[0], np.int64)
    for i in range(ts_us.shape[0]):
        out[i] = 1 if (ts_us[i] // US_PER_DAY + EPOCH_WEEKDAY) % 7 >= 5 else 0
    return out


@njit(nogil=True, cache=True)
def hour_cyclical(ts_us: np.ndarray) -> np.ndarray:
    """rows x 2 (sin, cos) of 2*pi*hour/24."""
    out = np.empty((ts_us.shape[0], 2), np.float64)
    for i in range(ts_us.shape[0]):
        angle = TWO_PI * ((ts_us[i] // US_PER_HOUR) % 24) / 24.0
        out[i, 0] = math.sin(angle)
        out[i, 1] = math.cos(angle)
    return out


@njit(nogil=True, cache=True)
def dow_cyclical(ts_us: np.ndarray) -> np.ndarray:
    """rows x 2 (sin, cos) of 2*pi*day_of_week/7."""
    out = np.empty((ts_us.shape[0], 2), np.float64)
    for i in range(ts_us.shape[0]):
        angle = TWO_PI * ((ts_us[i] // US_PER_DAY + EPOCH_WEEKDAY) % 7) / 7.0
        out[i, 0] = math.sin(angle)
        out[i, 1] = math.cos(angle)
    return out


@njit(nogil=True, cache=True)
def seconds_between(start_us: int, end_us: int) -> float:
    """(end_us - start_us) / 1e6 without int64 wrap-around (a -2**63 "unknown" sentinel against a
    2026 time): high and low 32-bit halves are subtracted apart, so the difference is exact up
    to 2**53 µs at any magnitude and rounded once beyond."""
    high = (end_us >> 32) - (start_us >> 32)
    low = (end_us & 0xFFFFFFFF) - (start_us & 0xFFFFFFFF)
    return (float(high) * 4294967296.0 + float(low)) / 1e6


@njit(nogil=True, cache=True)
def age_seconds(event_us: np.ndarray, now_us: int) -> np.ndarray:
    """Seconds from each event time to now_us (positive for past events), never wrapping."""
    out = np.empty(event_us.shape[0], np.float64)
    for i in range(event_us.shape[0]):
        out[i] = seconds_between(event_us[i], now_us)
    return out


@njit(nogil=True, cache=True)
def elapsed_seconds(start_us: np.ndarray, end_us: np.ndarray) -> np.ndarray:
    """Seconds from start_us[i] to end_us[i], row by row, never wrapping."""
    out = np.empty(start_us.shape[0], np.float64)
    for i in range(start_us.shape[0]):
        out[i] = seconds_between(start_us[i], end_us[i])
    return out
