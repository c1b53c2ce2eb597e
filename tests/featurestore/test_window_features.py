"""Offline window features: any row order and key type in, kernel results in the same order out,
equal to the NumPy references run on the (entity, time)-sorted events; never a later event."""

import numpy as np
import pytest

from featurestore.errors import InvalidArgumentError
from featurestore.kernels import reference as ref
from featurestore.window_features import WindowSpec, window_features

SPECS = [
    WindowSpec("amt_10m", "window", "amount", 600),
    WindowSpec("amt_decay", "ewma", "amount", 300),
    WindowSpec("rfm_1h", "rfm", "amount", 3600),
]


def events(n: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    entity = np.array([f"user-{k}" for k in rng.integers(0, 12, n)], object)
    ts = 1_700_000_000_000_000 + rng.integers(0, 4 * 3600, n) * 1_000_000
    ts[: n // 10] = ts[n // 10 : 2 * (n // 10)]  # ties in time
    amount = rng.gamma(2.0, 30.0, n)
    amount[rng.random(n) < 0.05] = np.nan
    return entity, ts, {"amount": amount}


def expected(entity, ts, amount) -> dict[str, np.ndarray]:
    """The references on stably sorted events, put back in row order."""
    _, codes = np.unique(entity, return_inverse=True)
    order = np.lexsort((ts, codes))
    e, t, v = codes[order], ts[order], amount[order]
    sorted_out = {}
    for spec in SPECS:
        span = spec.seconds * 1_000_000
        if spec.kind == "window":
            result = ref.window_aggregates(e, t, v, span)
        elif spec.kind == "ewma":
            result = (ref.ewma(e, t, v, span),)
        else:
            result = ref.rfm(e, t, v, span)
        sorted_out.update(zip(spec.outputs(), result, strict=True))
    out = {}
    for name, column in sorted_out.items():
        out[name] = np.empty_like(column)
        out[name][order] = column
    return out


def test_features_equal_the_references_in_the_callers_row_order() -> None:
    entity, ts, columns = events(3000)
    got = window_features(entity, ts, columns, SPECS)
    want = expected(entity, ts, columns["amount"])
    assert list(got) == [name for spec in SPECS for name in spec.outputs()]
    for name, column in want.items():
        if name.endswith("_decay"):  # EWMA: a power of 0.5 per event, libm against NumPy
            np.testing.assert_allclose(got[name], column, rtol=1e-9, atol=1e-9, err_msg=name)
        else:  # counts, exact sums and their means, minima, maxima, recency
            np.testing.assert_array_equal(got[name], column, err_msg=name)


def test_an_event_never_sees_a_later_one() -> None:
    entity, ts, columns = events(2000, seed=2)
    cut = np.quantile(ts, 0.6)
    early = ts < cut
    full = window_features(entity, ts, columns, SPECS)
    prefix = window_features(entity[early], ts[early], {"amount": columns["amount"][early]}, SPECS)
    for name in full:
        np.testing.assert_array_equal(full[name][early], prefix[name], err_msg=name)


def test_int_keys_and_empty_input() -> None:
    got = window_features(np.array([3, 3, 1]), np.array([2, 1, 5]), {"amount": [1.0, 2.0, 4.0]},
                          [WindowSpec("w", "window", "amount", 10)])  # fmt: skip
    assert got["w_count"].tolist() == [2, 1, 1] and got["w_sum"].tolist() == [3.0, 2.0, 4.0]
    empty = window_features(np.array([], np.int64), np.array([], np.int64),
                            {"amount": np.array([])}, SPECS)  # fmt: skip
    assert all(len(v) == 0 for v in empty.values())


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (WindowSpec("w", "median", "amount", 60), "kind 'median' is unknown"),
        (WindowSpec("w", "window", "amount", 0), "seconds must be a number from 1e-06"),
        (WindowSpec("w", "window", "amount", 1e-9), r"from 1e-06 \(1 µs\) to 9.22337e\+12"),
        (WindowSpec("w", "ewma", "amount", 1e-9), "'w': seconds must be a number from 1e-06"),
        (WindowSpec("w", "rfm", "amount", float("inf")), "the int64 µs range\\), got inf"),
        (WindowSpec("w", "window", "amount", float("nan")), "range\\), got nan"),
        (WindowSpec("w", "window", "amount", 1e13), "range\\), got 10000000000000.0"),
        (WindowSpec("w", "window", "amount", "60"), "range\\), got '60'"),
        (WindowSpec("w", "ewma", "price", 60), "column 'price' is missing"),
        (WindowSpec("amt_10m", "window", "amount", 60), "output 'amt_10m_count' repeats"),
    ],
)
def test_bad_specs_name_the_problem(spec: WindowSpec, message: str) -> None:
    entity, ts, columns = events(10)
    with pytest.raises(InvalidArgumentError, match=message):
        window_features(entity, ts, columns, [SPECS[0], spec])


def test_columns_of_the_wrong_length_are_refused() -> None:
    entity, ts, columns = events(10)
    with pytest.raises(InvalidArgumentError, match="must be 10 numbers"):
        window_features(entity, ts, {"amount": columns["amount"][:9]}, SPECS)
    with pytest.raises(InvalidArgumentError, match=r"expected \(10,\)"):
        window_features(entity[:9], ts, columns, SPECS)


def test_timestamps_at_the_ends_of_int64_count_every_event_in_the_window() -> None:
    """An event always sees itself: t - window below int64's minimum used to wrap (count 0)."""
    low = np.array([-(2**63) + 1, -(2**63) + 2, -(2**63) + 3], np.int64)
    got = window_features([1, 1, 1], low, {"amount": [1.0, 2.0, 4.0]}, SPECS[:1])
    assert got["amt_10m_count"].tolist() == [1, 2, 3] and got["amt_10m_sum"].tolist() == [1, 3, 7]
    ends = [-(2**63), -(2**63) + 10**18, 10**18, 2**63 - 1]
    widest = WindowSpec("all", "window", "amount", 9.2e12)
    got = window_features([1] * 4, np.array(ends), {"amount": np.ones(4)}, [widest])
    span = 9_200_000_000_000_000_000
    want = [sum(u > t - span for u in ends[: i + 1]) for i, t in enumerate(ends)]  # Python ints
    assert got["all_count"].tolist() == want == [1, 2, 1, 2]


def test_uint64_timestamps_beyond_int64_are_refused_naming_the_row() -> None:
    ts = np.array([5, 2**63 + 5], np.uint64)
    with pytest.raises(InvalidArgumentError, match=r"ts_us\[1\] = 9223372036854775813 is beyond"):
        window_features([1, 1], ts, {"amount": [1.0, 2.0]}, SPECS)
    fits = window_features([1, 1], np.array([5, 2**63 - 1], np.uint64), {"amount": [1.0, 2.0]},
                           SPECS[:1])  # fmt: skip
    assert fits["amt_10m_count"].tolist() == [1, 1]


@pytest.mark.parametrize("keys", [[1, None], [1, "1"]], ids=["None", "mixed types"])
def test_keys_that_cannot_be_sorted_name_the_entity_argument(keys) -> None:
    with pytest.raises(InvalidArgumentError, match=r"entity: the keys cannot be sorted .* no None"):
        window_features(np.array(keys, object), np.array([0, 1]), {"amount": [1.0, 2.0]}, SPECS)


def test_recency_and_decay_span_the_whole_int64_range() -> None:
    """rfm recency and the EWMA decay took t_i - t_(i-1) in int64, which wrapped near the ends
    of the range (recency -3e-06 s where 18446744073709.55 s passed); checked against Python
    ints, and exact to the µs where float64 times would round both ends alike."""
    for times in ([-(2**63) + 1, 2**63 - 1], [2**62, 2**62 + 1], [-(2**63) + 1, -(2**63) + 2]):
        specs = [WindowSpec("r", "rfm", "x", 1), WindowSpec("e", "ewma", "x", 9.2e12)]
        got = window_features([7, 7], np.array(times), {"x": [1.0, 2.0]}, specs)
        elapsed = times[1] - times[0]  # Python ints: exact
        decay = 0.5 ** (elapsed / 9.2e18)
        assert got["r_recency_s"][1] == elapsed / 1e6
        assert got["e"].tolist() == pytest.approx([1.0, (decay + 2.0) / (decay + 1.0)], rel=1e-12)
        entity, ts, x = np.array([7, 7]), np.array(times, np.int64), np.array([1.0, 2.0])
        assert ref.rfm(entity, ts, x, 10**6)[0][1] == elapsed / 1e6  # the NumPy reference too
        assert ref.ewma(entity, ts, x, 9.2e18).tolist() == got["e"].tolist()
