"""Offline window kernels over events sorted by (entity, time): trailing-window aggregates,
time-decayed EWMA, recency/frequency/monetary, and the point-in-time (as-of) join.

Entities are int64 codes (factorize string keys first), times int64 microseconds. The window of
event i holds the events j <= i of the same entity (in sorted order) with time > t_i - window_us,
so an aggregate never sees a later event. NaN values count as events but are left out of
sum/mean/min/max. window_us is at least 1, so an event always sees itself.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from featurestore.kernels import exact_sum

_INT64_MIN = np.int64(-(2**63))


@njit(nogil=True, cache=True)
def is_sorted(entity: np.ndarray, ts_us: np.ndarray) -> bool:
    """True when rows are sorted by (entity, time) ascending, as every kernel here requires."""
    for i in range(1, entity.shape[0]):
        if entity[i] < entity[i - 1] or (entity[i] == entity[i - 1] and ts_us[i] < ts_us[i - 1]):
            return False
    return True


@njit(nogil=True, cache=True)
def _elapsed_us(later: np.int64, earlier: np.int64) -> float:
    """later - earlier (later >= earlier) as float64, rounded once. The span of two int64 times
    reaches 2**64 - 1, past int64 (it wrapped negative near the ends), so it is taken in
    uint64, where it is exact."""
    return float(np.uint64(later) - np.uint64(earlier))


@njit(nogil=True, cache=True)
def window_aggregates(entity: np.ndarray, ts_us: np.ndarray, values: np.ndarray, window_us: int):
    """Per-event trailing-window (count, sum, mean, min, max).

    count counts events in the window (int64); sum/mean/min/max cover its non-NaN values (NaN
    when there are none). The sum and the mean are exactly rounded (exact_sum, as the pipelines'
    windows compute them). Two-pointer scan with an exact running sum and monotonic
    deques for min and max: O(n).
    """
    n = entity.shape[0]
    count = np.empty(n, np.int64)
    total = np.empty(n, np.float64)
    mean = np.empty(n, np.float64)
    vmin = np.empty(n, np.float64)
    vmax = np.empty(n, np.float64)
    min_q = np.empty(n, np.int64)
    max_q = np.empty(n, np.int64)
    start = 0
    acc = exact_sum.new_accumulator()
    scratch = exact_sum.new_scratch()
    min_head = 0
    min_tail = 0
    max_head = 0
    max_tail = 0
    # Below this time t_i - window_us would wrap past int64: the window then starts before
    # every representable time, so no earlier event leaves it.
    lowest = _INT64_MIN + window_us
    for i in range(n):
        if i == 0 or entity[i] != entity[i - 1]:
            start = i
            exact_sum.clear(acc)
            min_head = min_tail = i
            max_head = max_tail = i
        v = values[i]
        exact_sum.add(acc, v)
        if not math.isnan(v):
            while min_tail > min_head and values[min_q[min_tail - 1]] >= v:
                min_tail -= 1
            min_q[min_tail] = i
            min_tail += 1
            while max_tail > max_head and values[max_q[max_tail - 1]] <= v:
                max_tail -= 1
            max_q[max_tail] = i
            max_tail += 1
        if ts_us[i] >= lowest:
            lower = ts_us[i] - window_us
            while start <= i and ts_us[start] <= lower:
                exact_sum.remove(acc, values[start])
                start += 1
        while min_head < min_tail and min_q[min_head] < start:
            min_head += 1
        while max_head < max_tail and max_q[max_head] < start:
            max_head += 1
        count[i] = i - start + 1
        valid = exact_sum.count(acc)
        if valid == 0:
            total[i] = math.nan
            mean[i] = math.nan
            vmin[i] = math.nan
            vmax[i] = math.nan
            continue
        total[i], mean[i] = exact_sum.sum_and_mean(acc, scratch)
        vmin[i] = values[min_q[min_head]]
        vmax[i] = values[max_q[max_head]]
    return count, total, mean, vmin, vmax


@njit(nogil=True, cache=True)
def ewma(entity: np.ndarray, ts_us: np.ndarray, values: np.ndarray, half_life_us: float):
    """Per-event time-decayed mean: sum_j w_j v_j / sum_j w_j over the entity's non-NaN values
    so far, w_j = 0.5 ** ((t_i - t_j) / half_life_us); NaN before the first value."""
    n = entity.shape[0]
    out = np.empty(n, np.float64)
    s = 0.0
    w = 0.0
    for i in range(n):
        if i == 0 or entity[i] != entity[i - 1]:
            s = 0.0
            w = 0.0
        else:
            decay = 0.5 ** (_elapsed_us(ts_us[i], ts_us[i - 1]) / half_life_us)
            s *= decay
            w *= decay
        v = values[i]
        if not math.isnan(v):
            s += v
            w += 1.0
        out[i] = s / w if w > 0.0 else math.nan
    return out


@njit(nogil=True, cache=True)
def rfm(entity: np.ndarray, ts_us: np.ndarray, values: np.ndarray, window_us: int):
    """Per-event (recency_s, frequency, monetary): seconds since the entity's previous event
    (NaN for its first), events in the trailing window, sum of values in the window."""
    n = entity.shape[0]
    recency = np.empty(n, np.float64)
    for i in range(n):
        if i == 0 or entity[i] != entity[i - 1]:
            recency[i] = math.nan
        else:
            recency[i] = _elapsed_us(ts_us[i], ts_us[i - 1]) / 1e6
    count, total, _, _, _ = window_aggregates(entity, ts_us, values, window_us)
    return recency, count, total


@njit(nogil=True, cache=True)
def asof_join(
    event_entity: np.ndarray, event_ts: np.ndarray, query_entity: np.ndarray, query_ts: np.ndarray
) -> np.ndarray:
    """For each (entity, ts) query, the row of the latest event of that entity with time <= ts
    (the last such row on ties), or -1. Events and queries both sorted by (entity, time)."""
    nq = query_entity.shape[0]
    ne = event_entity.shape[0]
    out = np.empty(nq, np.int64)
    j = 0
    for q in range(nq):
        qe = query_entity[q]
        qt = query_ts[q]
        while j < ne and (event_entity[j] < qe or (event_entity[j] == qe and event_ts[j] <= qt)):
            j += 1
        if j > 0 and event_entity[j - 1] == qe:
            out[q] = j - 1
        else:
            out[q] = -1
    return out
