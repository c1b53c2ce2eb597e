"""Plain-NumPy references for every kernel, same names and signatures: the tests compare the
Numba kernels against these on random data. Written for clarity, not speed."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np

from featurestore.kernels.encoding import FNV_OFFSET, FNV_PRIME
from featurestore.kernels.spatial import DEG, EARTH_RADIUS_KM
from featurestore.kernels.time import EPOCH_WEEKDAY, TWO_PI, US_PER_DAY, US_PER_HOUR


def standardize(x: np.ndarray, mean: float, std: float) -> np.ndarray:
    """(x - mean) / std; std == 0 -> 0 (NaN stays NaN)."""
    x = np.asarray(x, np.float64)
    if std == 0.0:
        return np.where(np.isnan(x), np.nan, 0.0)
    with np.errstate(invalid="ignore", over="ignore"):
        return (x - mean) / std


def min_max_scale(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """(x - lo) / (hi - lo); hi == lo -> 0 (NaN stays NaN)."""
    x = np.asarray(x, np.float64)
    if hi == lo:
        return np.where(np.isnan(x), np.nan, 0.0)
    with np.errstate(invalid="ignore", over="ignore"):
        return (x - lo) / (hi - lo)


def log1p(x: np.ndarray) -> np.ndarray:
    """log1p with negatives clipped to 0."""
    x = np.asarray(x, np.float64)
    return np.log1p(np.where(x < 0.0, 0.0, x))


def clip(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """x limited to [lo, hi]; NaN stays NaN."""
    return np.clip(np.asarray(x, np.float64), lo, hi)


def bucketize_width(x: np.ndarray, lo: float, hi: float, n: int) -> np.ndarray:
    """Equal-width buckets 0..n-1 over [lo, hi], clamped (a NaN position to 0); NaN -> n."""
    x = np.asarray(x, np.float64)
    nan = np.isnan(x)
    if hi <= lo:
        return np.where(nan, n, 0).astype(np.int64)
    with np.errstate(invalid="ignore", over="ignore"):
        t = (x - lo) / (hi - lo) * n
    t = np.floor(np.clip(np.where(t >= 0.0, t, 0.0), 0, n - 1)).astype(np.int64)
    return np.where(nan, n, t)


def bucketize(x: np.ndarray, boundaries: np.ndarray) -> np.ndarray:
    """Count of boundaries <= x; NaN -> len(boundaries) + 1."""
    x = np.asarray(x, np.float64)
    idx = np.searchsorted(boundaries, x, side="right").astype(np.int64)
    return np.where(np.isnan(x), len(boundaries) + 1, idx)


def _fnv1a_bytes(rows: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """FNV-1a 64 of each row of a rows x maxlen uint8 matrix, using the first lengths[i] bytes."""
    h = np.full(rows.shape[0], FNV_OFFSET, np.uint64)
    for j in range(rows.shape[1]):
        live = lengths > j
        h[live] = (h[live] ^ rows[live, j].astype(np.uint64)) * FNV_PRIME
    return h


def fnv1a_strings(data: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """FNV-1a 64 of every string, vectorised over byte positions."""
    lengths = np.diff(offsets)
    width = int(lengths.max()) if lengths.size else 0
    rows = np.zeros((lengths.size, width), np.uint8)
    for j in range(width):
        live = lengths > j
        rows[live, j] = data[offsets[:-1][live] + j]
    return _fnv1a_bytes(rows, lengths)


def fnv1a_int64(values: np.ndarray) -> np.ndarray:
    """FNV-1a 64 of the 8 little-endian bytes of every int64."""
    rows = np.ascontiguousarray(values, dtype="<i8").view(np.uint8).reshape(-1, 8)
    return _fnv1a_bytes(rows, np.full(rows.shape[0], 8))


def hash_bucket_strings(data: np.ndarray, offsets: np.ndarray, n: int) -> np.ndarray:
    """fnv1a(string) % n."""
    return (fnv1a_strings(data, offsets) % np.uint64(n)).astype(np.int64)


def hash_bucket_int64(values: np.ndarray, n: int) -> np.ndarray:
    """fnv1a(value) % n."""
    return (fnv1a_int64(values) % np.uint64(n)).astype(np.int64)


def vocab_index_strings(
    data: np.ndarray,
    offsets: np.ndarray,
    vocab_hashes: np.ndarray,
    vocab_order: np.ndarray,
    vocab_data: np.ndarray,
    vocab_offsets: np.ndarray,
) -> np.ndarray:
    """Index of each string's bytes in the vocabulary (from its own bytes), len when absent."""
    size = len(vocab_offsets) - 1
    index = {vocab_data[vocab_offsets[k] : vocab_offsets[k + 1]].tobytes(): k for k in range(size)}
    return np.array(
        [
            index.get(data[offsets[i] : offsets[i + 1]].tobytes(), size)
            for i in range(len(offsets) - 1)
        ],
        dtype=np.int64,
    )


def vocab_index_int64(values: np.ndarray, vocab_sorted: np.ndarray, vocab_order: np.ndarray):
    """Index of each value in the vocabulary, len when absent."""
    vocab = np.empty_like(vocab_sorted)
    vocab[vocab_order] = vocab_sorted
    hits = values[:, None] == vocab[None, :]
    return np.where(hits.any(axis=1), hits.argmax(axis=1), len(vocab)).astype(np.int64)


def one_hot(indices: np.ndarray, width: int) -> np.ndarray:
    """rows x width float32 with 1 at each in-range index."""
    return (np.asarray(indices)[:, None] == np.arange(width)[None, :]).astype(np.float32)


def hour_of_day(ts_us: np.ndarray) -> np.ndarray:
    """Hour of day 0..23 (UTC)."""
    return (ts_us // US_PER_HOUR) % 24


def day_of_week(ts_us: np.ndarray) -> np.ndarray:
    """Day of week, Monday = 0 (UTC)."""
    return (ts_us // US_PER_DAY + EPOCH_WEEKDAY) % 7


def is_weekend(ts_us: np.ndarray) -> np.ndarray:
    """1 on Saturday/Sunday, else 0."""
    return (day_of_week(ts_us) >= 5).astype(np.int64)


def _sin_cos(angle: np.ndarray) -> np.ndarray:
    return np.stack([np.sin(angle), np.cos(angle)], axis=1).reshape(-1, 2)


def hour_cyclical(ts_us: np.ndarray) -> np.ndarray:
    """(sin, cos) of 2*pi*hour/24."""
    return _sin_cos(TWO_PI * hour_of_day(ts_us) / 24.0)


def dow_cyclical(ts_us: np.ndarray) -> np.ndarray:
    """(sin, cos) of 2*pi*day_of_week/7."""
    return _sin_cos(TWO_PI * day_of_week(ts_us) / 7.0)


def seconds_between(start_us, end_us) -> np.ndarray:
    """(end_us - start_us) / 1e6 by 32-bit halves, as the kernel does: exact up to 2**53 µs."""
    start = np.asarray(start_us, np.int64)
    end = np.asarray(end_us, np.int64)
    high = ((end >> 32) - (start >> 32)).astype(np.float64)
    low = ((end & 0xFFFFFFFF) - (start & 0xFFFFFFFF)).astype(np.float64)
    return (high * 4294967296.0 + low) / 1e6


def age_seconds(event_us: np.ndarray, now_us: int) -> np.ndarray:
    """Seconds from each event time to now_us, never wrapping."""
    return seconds_between(event_us, np.int64(now_us))


def elapsed_seconds(start_us: np.ndarray, end_us: np.ndarray) -> np.ndarray:
    """Seconds from start_us to end_us row by row, never wrapping."""
    return seconds_between(start_us, end_us)


def haversine_km(lat1, lon1, lat2, lon2) -> np.ndarray:
    """Row-wise haversine distance in km; the haversine term clamped to [0, 1], NaN kept."""
    p1 = np.asarray(lat1, np.float64) * DEG
    p2 = np.asarray(lat2, np.float64) * DEG
    s_lat = np.sin((p2 - p1) * 0.5)
    s_lon = np.sin((np.asarray(lon2, np.float64) - lon1) * DEG * 0.5)
    a = s_lat * s_lat + np.cos(p1) * np.cos(p2) * s_lon * s_lon
    return 2.0 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0)))


def distance_to_point_km(lat, lon, lat0: float, lon0: float) -> np.ndarray:
    """Haversine distance in km to a fixed point."""
    lat = np.asarray(lat, np.float64)
    return haversine_km(lat, lon, np.full_like(lat, lat0), np.full_like(lat, lon0))


def ratio(a: np.ndarray, b: np.ndarray, fill: float) -> np.ndarray:
    """a / b with fill where b == 0."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return np.where(b == 0.0, fill, np.asarray(a, np.float64) / np.where(b == 0.0, 1.0, b))


def difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a - b."""
    with np.errstate(invalid="ignore", over="ignore"):
        return np.asarray(a, np.float64) - b


def is_sorted(entity: np.ndarray, ts_us: np.ndarray) -> bool:
    """True when sorted by (entity, time)."""
    order = np.lexsort((ts_us, entity))
    return bool(np.array_equal(entity[order], entity) and np.array_equal(ts_us[order], ts_us))


def _windows(entity: np.ndarray, ts_us: np.ndarray, window_us: int):
    """(start, stop) row range of each event's trailing window, found by searchsorted."""
    n = len(entity)
    starts = np.empty(n, np.int64)
    for i in range(n):
        first = np.searchsorted(entity, entity[i], side="left")
        starts[i] = first + np.searchsorted(ts_us[first : i + 1], ts_us[i] - window_us, "right")
    return starts, np.arange(1, n + 1)


def exact_sum(values: np.ndarray, divisor: int = 1) -> float:
    """The exact sum of the non-NaN values as a fraction (over divisor), rounded once to a
    double (ties to even); ±inf beyond the largest double or for infinite values, NaN for +inf
    with -inf or no values, +0.0 for an exact zero."""
    v = np.asarray(values, np.float64)
    v = v[~np.isnan(v)]
    pos_inf, neg_inf = bool(np.any(v == np.inf)), bool(np.any(v == -np.inf))
    if v.size == 0 or (pos_inf and neg_inf):
        return math.nan
    if pos_inf or neg_inf:
        return math.inf if pos_inf else -math.inf
    total = sum((Fraction(float(x)) for x in v), Fraction(0)) / divisor
    try:
        return float(total) + 0.0
    except OverflowError:
        return math.inf if total > 0 else -math.inf


def exact_mean(values: np.ndarray) -> float:
    """exact_sum over the number of non-NaN values, rounded once."""
    return exact_sum(values, max(int(np.count_nonzero(~np.isnan(np.asarray(values)))), 1))


def segment_sums_and_means(values: np.ndarray, offsets: np.ndarray):
    """(exact_sum, exact_mean) of each segment values[offsets[i]:offsets[i+1]]."""
    bounds = list(itertools.pairwise(offsets))
    sums = np.array([exact_sum(values[a:b]) for a, b in bounds], np.float64)
    return sums, np.array([exact_mean(values[a:b]) for a, b in bounds], np.float64)


def window_aggregates(entity, ts_us, values, window_us: int):
    """Per-event (count, sum, mean, min, max) computed window by window."""
    starts, stops = _windows(entity, ts_us, window_us)
    n = len(entity)
    count = stops - starts
    total, mean, vmin, vmax = (np.full(n, np.nan) for _ in range(4))
    for i in range(n):
        w = values[starts[i] : stops[i]]
        w = w[~np.isnan(w)]
        if w.size:
            total[i] = exact_sum(w)
            mean[i] = exact_mean(w)
            vmin[i] = w.min()
            vmax[i] = w.max()
    return count.astype(np.int64), total, mean, vmin, vmax


def ewma(entity, ts_us, values, half_life_us: float) -> np.ndarray:
    """Per-event sum_j w_j v_j / sum_j w_j with w_j = 0.5 ** ((t_i - t_j) / half_life_us)."""
    n = len(entity)
    out = np.full(n, np.nan)
    for i in range(n):
        first = np.searchsorted(entity, entity[i], side="left")
        v = values[first : i + 1]
        keep = ~np.isnan(v)
        since = np.ascontiguousarray(ts_us).view(np.uint64)  # sorted gaps fit uint64: no wrap
        w = 0.5 ** ((since[i] - since[first : i + 1][keep]).astype(np.float64) / half_life_us)
        if w.sum() > 0.0:
            out[i] = np.sum(w * v[keep]) / np.sum(w)
    return out


def rfm(entity, ts_us, values, window_us: int):
    """Per-event (seconds since previous event, events in window, sum in window)."""
    recency = np.full(len(entity), np.nan)
    if len(entity) > 1:
        same = entity[1:] == entity[:-1]
        since = np.ascontiguousarray(ts_us).view(np.uint64)  # sorted gaps fit uint64: no wrap
        recency[1:] = np.where(same, (since[1:] - since[:-1]).astype(np.float64) / 1e6, np.nan)
    count, total, _, _, _ = window_aggregates(entity, ts_us, values, window_us)
    return recency, count, total


def asof_join(event_entity, event_ts, query_entity, query_ts) -> np.ndarray:
    """Latest event row of the query's entity with time <= query time, or -1."""
    lo = np.searchsorted(event_entity, query_entity, side="left")
    hi = np.searchsorted(event_entity, query_entity, side="right")
    out = np.full(len(query_entity), -1, np.int64)
    for q in range(len(query_entity)):
        k = lo[q] + np.searchsorted(event_ts[lo[q] : hi[q]], query_ts[q], side="right") - 1
        if k >= lo[q]:
            out[q] = k
    return out


def histogram(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts of bucketize(values, edges): len(edges) + 2, the last counting NaN."""
    return np.bincount(bucketize(values, edges), minlength=len(edges) + 2).astype(np.int64)


def psi(expected: np.ndarray, actual: np.ndarray, eps: float) -> float:
    """Population stability index between two histograms of counts."""
    te = float(np.sum(expected))
    ta = float(np.sum(actual))
    if te == 0.0 or ta == 0.0:
        return float("nan")
    e = np.maximum(expected / te, eps)
    a = np.maximum(actual / ta, eps)
    return float(np.sum((a - e) * np.log(a / e)))
