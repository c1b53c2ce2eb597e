"""Every Numba kernel against its plain-NumPy reference on random data with NaN, empty arrays
and extreme values. Exact equality for arithmetic, comparisons, integer and hash kernels;
transcendental ones (log1p, sin/cos, haversine, EWMA, PSI) within the stated tolerances, since
Numba calls libm while NumPy uses its own SIMD routines (1 ulp apart)."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys

import numpy as np
import pytest

from featurestore.kernels import arithmetic, drift, encoding, exact_sum, scaling, spatial, windows
from featurestore.kernels import reference as ref
from featurestore.kernels import time as ktime

F32_MAX = float(np.finfo(np.float32).max)
F64_MAX = float(np.finfo(np.float64).max)
ULP2 = 5e-16  # relative tolerance of two float64 ulps


def assert_same(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == b.dtype or a.dtype.kind == b.dtype.kind
    np.testing.assert_array_equal(a, b)


def floats(rng: np.random.Generator, n: int = 2000) -> np.ndarray:
    x = rng.standard_normal(n) * np.exp(rng.uniform(-5, 5, n))
    x[rng.random(n) < 0.1] = np.nan
    x[:10] = [F32_MAX, -F32_MAX, np.inf, -np.inf, 0.0, -0.0, 1e-300, -1e300, 1e308, -1e308]
    x[10:12] = [F64_MAX, -F64_MAX]
    return x


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20240601)


@pytest.mark.parametrize(
    ("name", "args"),
    [
        ("standardize", (1.5, 2.5)),
        ("standardize", (1.5, 0.0)),
        ("min_max_scale", (-3.0, 7.0)),
        ("min_max_scale", (2.0, 2.0)),
        ("clip", (-1.0, 1.0)),
        ("bucketize_width", (-2.0, 3.0, 7)),
        ("bucketize_width", (1.0, 1.0, 4)),
        ("standardize", (-1e308, 1e-300)),
        ("min_max_scale", (-8e307, 8e307)),
        ("clip", (-np.inf, 1e308)),
        ("bucketize_width", (-8e307, 8e307, 5)),
        ("bucketize_width", (-2.0, 3.0, 2**40)),
    ],
)
def test_scaling_matches_reference_exactly(rng, name, args):
    x = floats(rng)
    for data in (x, x[:0]):
        assert_same(getattr(scaling, name)(data, *args), getattr(ref, name)(data, *args))


def test_standardize_zero_std_gives_zero_and_keeps_nan():
    out = scaling.standardize(np.array([1.0, np.nan, -5.0]), 3.0, 0.0)
    np.testing.assert_array_equal(out, [0.0, np.nan, 0.0])


def test_log1p_clips_negatives_and_matches_reference(rng):
    x = floats(rng)
    out = scaling.log1p(x)
    np.testing.assert_allclose(out, ref.log1p(x), rtol=ULP2, atol=0)
    assert out[x < 0].max() == 0.0
    assert np.isnan(out[np.isnan(x)]).all()
    assert scaling.log1p(x[:0]).shape == (0,)


@pytest.mark.parametrize("count", [0, 1, 7, 40])
def test_bucketize_matches_searchsorted_with_nan_bucket(rng, count):
    x = floats(rng)
    bounds = np.sort(rng.standard_normal(count) * 3)
    out = scaling.bucketize(x, bounds)
    assert_same(out, ref.bucketize(x, bounds))
    assert (out[np.isnan(x)] == count + 1).all()
    assert out[~np.isnan(x)].max() <= count
    assert_same(scaling.bucketize(x[:0], bounds), ref.bucketize(x[:0], bounds))


def test_bucketize_width_edges():
    out = scaling.bucketize_width(
        np.array([-np.inf, 0.0, 0.999, 1.0, 9.99, 10.0, np.nan]), 0, 10, 10
    )
    np.testing.assert_array_equal(out, [0, 0, 0, 1, 9, 9, 10])
    x = np.array([-np.inf, -F64_MAX, -8e307, 0.0, 7.9e307, F64_MAX, np.inf, np.nan])
    for run in (scaling.bucketize_width, ref.bucketize_width):
        np.testing.assert_array_equal(run(x, -8e307, 8e307, 5), [0, 0, 0, 2, 4, 4, 4, 5])


@pytest.mark.parametrize(("lo", "hi"), [(-1e308, 1e308), (-F64_MAX, F64_MAX), (0.0, np.inf)])
def test_bucketize_width_clamps_when_the_range_overflows(rng, lo, hi):
    """Loading rejects these ranges; called directly, a NaN position must still clamp."""
    x = floats(rng)
    out = scaling.bucketize_width(x, lo, hi, 5)
    assert_same(out, ref.bucketize_width(x, lo, hi, 5))
    nan = np.isnan(x)
    assert (out[nan] == 5).all()
    assert out[~nan].min() >= 0 and out[~nan].max() <= 4


def random_strings(rng: np.random.Generator, n: int) -> list[str]:
    alphabet = [*"abcxyz019 ", "é", "ß", "日", "😀"]
    return ["".join(rng.choice(alphabet, rng.integers(0, 12))) for _ in range(n)]


def test_fnv1a_known_vectors_and_reference(rng):
    col = encoding.pack_strings(["", "a", "foobar", *random_strings(rng, 500)])
    hashes = encoding.fnv1a_strings(col.data, col.offsets)
    assert hashes[0] == 0xCBF29CE484222325
    assert hashes[1] == 0xAF63DC4C8601EC8C
    assert hashes[2] == 0x85944171F73967E8
    assert_same(hashes, ref.fnv1a_strings(col.data, col.offsets))
    ints = np.concatenate([rng.integers(-(2**63), 2**63 - 1, 500), [0, -1, 2**63 - 1, -(2**63)]])
    assert_same(encoding.fnv1a_int64(ints), ref.fnv1a_int64(ints))
    empty = encoding.pack_strings([])
    assert encoding.fnv1a_strings(empty.data, empty.offsets).shape == (0,)
    assert encoding.fnv1a_int64(ints[:0]).shape == (0,)


def test_int64_hash_equals_hash_of_its_little_endian_bytes():
    value = np.array([123456789], np.int64)
    col = encoding.pack_strings([value.astype("<i8").tobytes()])
    assert encoding.fnv1a_int64(value)[0] == encoding.fnv1a_strings(col.data, col.offsets)[0]


@pytest.mark.parametrize("n", [1, 97, 2**63 - 1])
def test_hash_buckets_match_reference(rng, n):
    col = encoding.pack_strings(["", *random_strings(rng, 300)])
    out = encoding.hash_bucket_strings(col.data, col.offsets, n)
    assert_same(out, ref.hash_bucket_strings(col.data, col.offsets, n))
    assert out.min() >= 0 and out.max() < n
    ints = np.concatenate([rng.integers(-(2**62), 2**62, 300), [0, -1, 2**63 - 1, -(2**63)]])
    out = encoding.hash_bucket_int64(ints, n)
    assert_same(out, ref.hash_bucket_int64(ints, n))
    assert out.min() >= 0 and out.max() < n
    empty = encoding.pack_strings([])
    assert_same(
        encoding.hash_bucket_strings(empty.data, empty.offsets, n),
        ref.hash_bucket_strings(empty.data, empty.offsets, n),
    )
    assert_same(encoding.hash_bucket_int64(ints[:0], n), ref.hash_bucket_int64(ints[:0], n))


HASH_SCRIPT = (
    "import sys; from featurestore.kernels import encoding as e; import numpy as np;"
    "c = e.pack_strings(['user-1', 'κόσμε', '']);"
    "print(*e.fnv1a_strings(c.data, c.offsets), *e.fnv1a_int64(np.array([7, -7])))"
)


def test_hashes_are_stable_across_processes_and_hash_seeds():
    outputs = set()
    for seed in ("1", "4242"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        run = subprocess.run(
            [sys.executable, "-c", HASH_SCRIPT], env=env, capture_output=True, text=True, check=True
        )
        outputs.add(run.stdout.strip())
    col = encoding.pack_strings(["user-1", "κόσμε", ""])
    here = [*encoding.fnv1a_strings(col.data, col.offsets)]
    here += [*encoding.fnv1a_int64(np.array([7, -7]))]
    assert outputs == {" ".join(str(h) for h in here)}


def test_vocab_lookup_and_one_hot_match_reference(rng):
    vocab_words = sorted(set(random_strings(rng, 40)) - {""})
    vocab = encoding.StringVocab.build(vocab_words)
    words = [*vocab_words[:10], "never-seen", "", *random_strings(rng, 200)]
    col = encoding.pack_strings(words)
    idx = vocab.lookup(col)
    assert_same(
        idx, ref.vocab_index_strings(*col, vocab.hashes, vocab.order, vocab.data, vocab.offsets)
    )
    assert list(idx[:10]) == list(range(10))
    assert idx[10] == len(vocab_words)
    ivocab = encoding.IntVocab.build([50, -3, 7, 2**40])
    ints = np.array([7, 50, 8, 2**40, -3, 0], np.int64)
    iidx = ivocab.lookup(ints)
    np.testing.assert_array_equal(iidx, [2, 0, 4, 3, 1, 4])
    assert_same(iidx, ref.vocab_index_int64(ints, ivocab.values, ivocab.order))
    assert_same(encoding.one_hot(iidx, 5), ref.one_hot(iidx, 5))
    assert encoding.one_hot(iidx[:0], 5).shape == (0, 5)


@pytest.mark.parametrize("width", [1, 5, 300])
def test_one_hot_matches_reference_on_random_indices(rng, width):
    idx = rng.integers(-3, width + 3, 2000)
    idx[:4] = [-(2**63), 2**63 - 1, 0, width - 1]
    out = encoding.one_hot(idx, width)
    assert_same(out, ref.one_hot(idx, width))
    in_range = (idx >= 0) & (idx < width)
    np.testing.assert_array_equal(out.sum(axis=1), in_range.astype(np.float32))
    assert_same(encoding.one_hot(idx[:0], width), ref.one_hot(idx[:0], width))


def test_vocab_rejects_duplicates():
    with pytest.raises(Exception, match="duplicates"):
        encoding.StringVocab.build(["a", "b", "a"])
    with pytest.raises(Exception, match="appears twice"):
        encoding.IntVocab.build([1, 2, 1])


def timestamps(rng: np.random.Generator) -> np.ndarray:
    ts = rng.integers(-(2**40), 2**52, 2000)
    return np.concatenate([ts, [0, -1, 2**62, -(2**62), 2**63 - 1, -(2**63)]]).astype(np.int64)


@pytest.mark.parametrize(
    "name", ["hour_of_day", "day_of_week", "is_weekend", "hour_cyclical", "dow_cyclical"]
)
def test_calendar_kernels_match_reference(rng, name):
    ts = timestamps(rng)
    out, expected = getattr(ktime, name)(ts), getattr(ref, name)(ts)
    if out.dtype.kind == "f":
        np.testing.assert_allclose(out, expected, rtol=ULP2, atol=1e-15)
    else:
        assert_same(out, expected)
    assert getattr(ktime, name)(ts[:0]).shape[0] == 0


def test_calendar_agrees_with_datetime(rng):
    ts = rng.integers(-(2**40), 2**52, 300)
    epoch = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    moments = [epoch + dt.timedelta(microseconds=int(t)) for t in ts]
    np.testing.assert_array_equal(ktime.hour_of_day(ts), [m.hour for m in moments])
    np.testing.assert_array_equal(ktime.day_of_week(ts), [m.weekday() for m in moments])
    np.testing.assert_array_equal(ktime.is_weekend(ts), [m.weekday() >= 5 for m in moments])


def test_age_and_elapsed_seconds_match_reference(rng):
    ts = timestamps(rng)[:-2]
    now = 1_700_000_000_000_000
    assert_same(ktime.age_seconds(ts, now), ref.age_seconds(ts, now))
    assert ktime.age_seconds(np.array([now - 2_500_000]), now)[0] == 2.5
    assert_same(ktime.elapsed_seconds(ts, ts[::-1].copy()), ref.elapsed_seconds(ts, ts[::-1]))
    assert_same(ktime.age_seconds(ts[:0], now), ref.age_seconds(ts[:0], now))
    assert_same(ktime.elapsed_seconds(ts[:0], ts[:0]), ref.elapsed_seconds(ts[:0], ts[:0]))


INT64_EXTREMES = [-(2**63), -(2**63) + 1, -(2**62), -1, 0, 1, 2**53 + 1, 2**62, 2**63 - 1]


def test_age_and_elapsed_seconds_do_not_wrap_at_int64_extremes():
    # The exact difference, as Python ints, against kernel and reference: the int64 difference
    # of a -2**63 "unknown" sentinel and a 2026 time wraps to a negative age in both alike.
    now_2026 = 1_780_000_000_000_000
    events = np.array(INT64_EXTREMES, np.int64)
    for now in [now_2026, 2**63 - 1, -(2**63)]:
        exact = [(now - e) / 10**6 for e in INT64_EXTREMES]
        for got in (ktime.age_seconds(events, now), ref.age_seconds(events, now)):
            np.testing.assert_allclose(got, exact, rtol=1e-15, atol=0)
    assert ktime.age_seconds(events[:1], now_2026)[0] > 9.2e12
    ends = events[::-1].copy()
    exact = [(b - a) / 10**6 for a, b in zip(INT64_EXTREMES, INT64_EXTREMES[::-1], strict=True)]
    for got in (ktime.elapsed_seconds(events, ends), ref.elapsed_seconds(events, ends)):
        np.testing.assert_allclose(got, exact, rtol=1e-15, atol=0)


def degrees(rng: np.random.Generator, n: int, bound: float) -> np.ndarray:
    """Random degrees in [-bound, bound], a tenth out of range, with NaN, +-inf and +-1e308."""
    x = rng.uniform(-bound, bound, n)
    wild = rng.random(n) < 0.1
    x[wild] = rng.uniform(-1000, 1000, wild.sum())
    x[rng.random(n) < 0.05] = np.nan
    x[10:14] = [np.inf, -np.inf, 1e308, -1e308]
    return x


def test_haversine_matches_reference_and_known_distance(rng):
    n = 1000
    lat1, lat2 = degrees(rng, n, 90), degrees(rng, n, 90)
    lon1, lon2 = degrees(rng, n, 180), degrees(rng, n, 180)
    lat1[:3] = [np.nan, 90.0, 0.0]
    lon1[:3] = [0.0, 0.0, 0.0]
    lat2[:3] = [0.0, -90.0, 0.0]
    lon2[:3] = [0.0, 0.0, 180.0]
    # out-of-range latitudes wrap over the pole: (91, 0) is (89, 180)
    lat1[3:6] = [91.0, 135.5, 91.0]
    lon1[3:6] = [0.0, 3.0, 0.0]
    lat2[3:6] = [89.0, 44.5, 89.0]
    lon2[3:6] = [180.0, 183.0, 0.0]
    out = spatial.haversine_km(lat1, lon1, lat2, lon2)
    with np.errstate(invalid="ignore"):  # sin/cos of +-inf: NaN, as in the kernel
        expected = ref.haversine_km(lat1, lon1, lat2, lon2)
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-9)
    assert np.isnan(out[0])
    assert out[1] == pytest.approx(np.pi * spatial.EARTH_RADIUS_KM)
    assert np.isnan(out[10:12]).all()
    inf = np.isinf(lat1) | np.isinf(lon1) | np.isinf(lat2) | np.isinf(lon2)
    assert np.isnan(out[inf]).all()
    live = ~np.isnan(out)
    assert (out[live] >= 0).all() and (out[live] <= np.pi * spatial.EARTH_RADIUS_KM).all()
    np.testing.assert_allclose(out[3:6], [0.0, 0.0, 2 * spatial.DEG * spatial.EARTH_RADIUS_KM])
    paris_london = spatial.distance_to_point_km(
        np.array([48.8566]), np.array([2.3522]), 51.5074, -0.1278
    )
    assert paris_london[0] == pytest.approx(343.5, abs=1.0)
    for lat0, lon0 in [(10.0, 20.0), (-95.0, 540.0), (1e308, 0.0), (0.0, -np.inf)]:
        with np.errstate(invalid="ignore"):
            expected = ref.distance_to_point_km(lat1, lon1, lat0, lon0)
        np.testing.assert_allclose(
            spatial.distance_to_point_km(lat1, lon1, lat0, lon0), expected, rtol=1e-12, atol=1e-9
        )


def test_ratio_and_difference_match_reference(rng):
    a, b = floats(rng), floats(rng)
    b[10:60] = 0.0
    for fill in (np.nan, -1.0):
        out = arithmetic.ratio(a, b, fill)
        assert_same(out, ref.ratio(a, b, fill))
    assert (arithmetic.ratio(a, b, -1.0)[10:60] == -1.0).all()
    assert_same(arithmetic.difference(a, b), ref.difference(a, b))
    assert arithmetic.ratio(a[:0], b[:0], 0.0).shape == (0,)


def events(rng: np.random.Generator, n: int = 1500):
    entity = rng.integers(0, 12, n)
    ts = rng.integers(0, 5_000, n) * 1_000_000 + 2**50
    order = np.lexsort((ts, entity))
    values = rng.standard_normal(n) * 100
    values[rng.random(n) < 0.1] = np.nan
    return entity[order], ts[order], values


@pytest.mark.parametrize("extreme", [False, True])
def test_window_aggregates_match_reference(rng, extreme):
    entity, ts, values = events(rng)
    if extreme:
        values[::37] = F32_MAX
        values[5::41] = -F32_MAX
        values[11::301] = np.inf
        values[13::503] = -np.inf
    window = 600_000_000
    out = windows.window_aggregates(entity, ts, values, window)
    expected = ref.window_aggregates(entity, ts, values, window)
    for got, want in zip(out, expected, strict=True):
        assert_same(got, want)
    empty = windows.window_aggregates(entity[:0], ts[:0], values[:0], window)
    assert all(a.shape == (0,) for a in empty)


def test_window_sum_recovers_after_a_huge_value_leaves():
    entity = np.zeros(3, np.int64)
    ts = np.array([0, 10, 20], np.int64)
    _, total, _, _, _ = windows.window_aggregates(entity, ts, np.array([1e300, 1.0, 2.0]), 15)
    np.testing.assert_array_equal(total, [1e300, 1e300, 3.0])
    ts = np.array([0, 1, 2, 20], np.int64)
    values = np.array([F64_MAX, F64_MAX, -F64_MAX, 1.0])
    _, total, _, _, _ = windows.window_aggregates(np.zeros(4, np.int64), ts, values, 15)
    np.testing.assert_array_equal(total, [F64_MAX, np.inf, F64_MAX, 1.0])


def sum_cases(rng: np.random.Generator, n: int) -> np.ndarray:
    """Doubles over the whole range, with values that cancel, subnormals, ties and infinities."""
    v = rng.standard_normal(n) * 10.0 ** rng.integers(-320, 308, n)
    v[rng.random(n) < 0.2] = rng.choice([F64_MAX, -F64_MAX, 1e16, -1e16, 0.1, 5e-324, -0.0], 1)
    v[rng.random(n) < 0.02] = rng.choice([np.inf, -np.inf, np.nan], 1)
    return v


def sums(values: list[float]) -> float:
    """The one segment's sum."""
    return exact_sum.segment_sums_and_means(np.array(values), np.array([0, len(values)]))[0][0]


def test_segment_sums_and_means_equal_the_exact_ones_rounded_once(rng):
    values = sum_cases(rng, 3000)
    offsets = np.unique(np.concatenate([[0, 3000], rng.integers(0, 3000, 400)]))
    got = exact_sum.segment_sums_and_means(values, offsets)
    for kernel, reference in zip(got, ref.segment_sums_and_means(values, offsets), strict=True):
        assert_same(kernel, reference)
    # In arrival order these are 0.9999999999999999, 0.0 and inf.
    assert sums([0.1] * 10) == sums([1e16, 1.0, -1e16]) == 1.0
    assert sums([F64_MAX, F64_MAX, -F64_MAX]) == F64_MAX
    assert sums([F64_MAX, 2.0**970]) == np.inf  # half an ulp of the largest: a tie, to even
    means = exact_sum.segment_sums_and_means(
        np.array([F64_MAX, F64_MAX, 2.0**53, 0.1, 0.3]), np.array([0, 2, 5])
    )[1]
    assert means.tolist() == [F64_MAX, 3002399751580331.0]  # sum / n: inf, 3002399751580330.5
    no_segment = np.array([0])
    empty = exact_sum.segment_sums_and_means(values[:0], no_segment)
    empty += ref.segment_sums_and_means(values[:0], no_segment)
    assert all(a.shape == (0,) for a in empty)


def test_sums_do_not_depend_on_the_order_of_the_values(rng):
    values = sum_cases(rng, 500)
    values = values[np.isfinite(values)]
    first = sums(list(values))
    for _ in range(5):
        assert sums(list(rng.permutation(values))) == first


def test_the_accumulator_keeps_its_value_when_carries_run():
    acc = exact_sum.new_accumulator()
    scratch = exact_sum.new_scratch()
    for v in (F64_MAX, -1.0, 0.1, -5e-324):
        exact_sum.add(acc, v)
    before = exact_sum.total(acc, scratch)
    acc[exact_sum.DIGITS] = 2**30 - 1  # additions since carries last ran: the next runs them
    exact_sum.add(acc, 0.25)
    exact_sum.remove(acc, 0.25)
    assert acc[exact_sum.DIGITS] == 1 and np.all(acc[: exact_sum.DIGITS - 1] >= 0)
    want = ref.exact_sum(np.array([F64_MAX, -1.0, 0.1, -5e-324]))
    assert exact_sum.total(acc, scratch) == before == want
    assert exact_sum.count(acc) == 4


def test_ewma_matches_direct_formula(rng):
    entity, ts, values = events(rng, 800)
    out = windows.ewma(entity, ts, values, 3e8)
    np.testing.assert_allclose(out, ref.ewma(entity, ts, values, 3e8), rtol=1e-9, atol=1e-12)
    assert windows.ewma(entity[:0], ts[:0], values[:0], 1.0).shape == (0,)


def test_rfm_matches_reference(rng):
    entity, ts, values = events(rng)
    values = np.abs(values)
    out = windows.rfm(entity, ts, values, 10**9)
    expected = ref.rfm(entity, ts, values, 10**9)
    assert_same(out[0], expected[0])
    assert_same(out[1], expected[1])
    assert_same(out[2], expected[2])
    empty = windows.rfm(entity[:0], ts[:0], values[:0], 10**9)
    for got, want in zip(empty, ref.rfm(entity[:0], ts[:0], values[:0], 10**9), strict=True):
        assert_same(got, want)
        assert got.shape == (0,)


def test_asof_join_matches_reference(rng):
    entity, ts, _ = events(rng)
    q_entity = rng.integers(-1, 14, 700)
    q_ts = rng.integers(-10, 5_010, 700) * 1_000_000 + 2**50
    order = np.lexsort((q_ts, q_entity))
    q_entity, q_ts = q_entity[order], q_ts[order]
    out = windows.asof_join(entity, ts, q_entity, q_ts)
    assert_same(out, ref.asof_join(entity, ts, q_entity, q_ts))
    hit = out >= 0
    assert (entity[out[hit]] == q_entity[hit]).all() and (ts[out[hit]] <= q_ts[hit]).all()
    assert (out[(q_entity < 0) | (q_entity > 11)] == -1).all()
    assert windows.asof_join(entity[:0], ts[:0], q_entity, q_ts).tolist() == [-1] * 700


def test_is_sorted(rng):
    entity, ts, _ = events(rng)
    assert windows.is_sorted(entity, ts) and ref.is_sorted(entity, ts)
    swapped = ts.copy()
    swapped[[0, 1]] = [ts[0] + 10**9, ts[0]]
    assert windows.is_sorted(entity, swapped) == ref.is_sorted(entity, swapped)


def test_histogram_and_psi_match_reference(rng):
    x = floats(rng)
    edges = np.quantile(x[np.isfinite(x)], np.linspace(0, 1, 11))
    hist = drift.histogram(x, edges)
    assert_same(hist, ref.histogram(x, edges))
    assert hist.sum() == x.size and hist[-1] == np.isnan(x).sum()
    with np.errstate(over="ignore"):  # the +-1e308 rows scale to +-inf, still counted
        live = drift.histogram(x * 1.5 + 0.3, edges)
    assert drift.psi(hist, live, 1e-4) == pytest.approx(ref.psi(hist, live, 1e-4), rel=1e-12)
    assert drift.psi(hist, live, 1e-4) > 0.01
    assert drift.psi(hist, hist, 1e-4) == 0.0
    assert np.isnan(drift.psi(hist, np.zeros_like(hist), 1e-4))
    assert drift.histogram(x[:0], edges).sum() == 0


def test_spatial_kernels_take_empty_columns():
    empty = np.zeros(0)
    assert spatial.haversine_km(empty, empty, empty, empty).shape == (0,)
    assert ref.haversine_km(empty, empty, empty, empty).shape == (0,)
    assert spatial.distance_to_point_km(empty, empty, 10.0, 20.0).shape == (0,)


def test_ewma_and_rfm_with_extreme_values_match_reference(rng):
    entity, ts, values = events(rng, 800)
    values[::53] = 1e308
    values[7::97] = np.inf
    values[11::211] = -np.inf
    with np.errstate(invalid="ignore"):  # inf - inf in the reference's sums: NaN, as intended
        expected_ewma = ref.ewma(entity, ts, values, 3e8)
    np.testing.assert_allclose(windows.ewma(entity, ts, values, 3e8), expected_ewma, rtol=1e-9)
    out = windows.rfm(entity, ts, np.abs(values), 10**9)
    expected = ref.rfm(entity, ts, np.abs(values), 10**9)
    assert_same(out[0], expected[0])
    assert_same(out[1], expected[1])
    assert_same(out[2], expected[2])
