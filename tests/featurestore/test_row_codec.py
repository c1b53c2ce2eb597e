"""Row codec: the Numba decoder and the plain-Python reference agree with the encoded input."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from featurestore.dtypes import DType, FeatureStatus, numpy_dtype
from featurestore.errors import CorruptRowError
from featurestore.registry import Feature, FeatureView
from featurestore.row_codec import (
    MISSING_ROW,
    NO_CUTOFF,
    DecodePlan,
    RowLayout,
    decode_rows,
    decode_rows_reference,
    encode_rows,
    row_event_us,
)

FLOATS = st.floats(allow_nan=True, allow_infinity=True, width=32)
VALUES = {
    DType.FLOAT32: FLOATS,
    DType.FLOAT64: st.floats(allow_nan=True, allow_infinity=True),
    DType.INT64: st.integers(-(2**63), 2**63 - 1),
    DType.BOOL: st.booleans(),
    DType.STRING: st.text(max_size=12),
}


@st.composite
def batches(draw):
    """A random view, a batch of rows for it (values, nulls) and a random feature request."""
    n_feats = draw(st.integers(1, 40))
    feats = []
    for i in range(n_feats):
        dtype = draw(st.sampled_from(list(DType)))
        vlen = draw(st.integers(1, 3)) if dtype is DType.FLOAT32_VECTOR else 0
        feats.append(Feature(f"f{i}", dtype, vlen))
    view = FeatureView("v", "e", tuple(feats), version=1)
    n = draw(st.integers(0, 6))
    columns, nulls = {}, {}
    for feat in feats:
        if feat.dtype is DType.FLOAT32_VECTOR:
            flat = draw(
                st.lists(FLOATS, min_size=n * feat.vector_length, max_size=n * feat.vector_length)
            )
            columns[feat.name] = np.array(flat, np.float32).reshape(n, feat.vector_length)
        else:
            values = draw(st.lists(VALUES[feat.dtype], min_size=n, max_size=n))
            if feat.dtype is DType.STRING:
                columns[feat.name] = values
            else:
                columns[feat.name] = np.array(values, numpy_dtype(feat.dtype)).reshape(n)
        nulls[feat.name] = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)), bool)
    events = np.array(draw(st.lists(st.integers(1, 2**62), min_size=n, max_size=n)), np.int64)
    requested = draw(st.permutations([f.name for f in feats]))
    requested = requested[: draw(st.integers(1, len(requested)))]
    missing = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    cutoff = draw(st.integers(0, 2**62))
    return view, columns, nulls, events, requested, missing, cutoff


def by_feature(decoded):
    out = {}
    for block in decoded.blocks:
        for j, name in enumerate(block.features):
            out[name] = (block.dtype, block.values[:, j], block.statuses[:, j])
    return out


@settings(max_examples=150, deadline=None)
@given(batches())
def test_kernel_and_reference_decode_what_was_encoded(case):
    view, columns, nulls, events, requested, missing, cutoff = case
    layout = RowLayout(view)
    encoded = {k: [s.encode() for s in v] if isinstance(v, list) else v for k, v in columns.items()}
    rows = encode_rows(layout, events, 7, encoded, nulls)
    assert all(len(r) % 4 == 0 for r in rows)
    assert [row_event_us(r) for r in rows] == events.tolist()
    rows = [MISSING_ROW if m else r for r, m in zip(rows, missing, strict=True)]
    cut = np.full(len(rows), cutoff, np.int64)
    fast = decode_rows(DecodePlan(layout, requested), rows, cut)
    slow = decode_rows_reference(view, requested, rows, cut)
    np.testing.assert_array_equal(fast.row_status, slow.row_status)
    np.testing.assert_array_equal(fast.event_us, slow.event_us)
    got, ref = by_feature(fast), by_feature(slow)
    assert [name for b in fast.blocks for name in b.features] == [
        name for b in slow.blocks for name in b.features
    ]
    for r in range(len(rows)):
        if missing[r]:
            expected_row = FeatureStatus.NOT_FOUND
        elif events[r] < cutoff:
            expected_row = FeatureStatus.OUTSIDE_MAX_AGE
        else:
            expected_row = FeatureStatus.PRESENT
        assert fast.row_status[r] == expected_row
        for name in requested:
            dtype, values, statuses = got[name]
            np.testing.assert_array_equal(values[r], ref[name][1][r])
            assert statuses[r] == ref[name][2][r]
            if expected_row != FeatureStatus.PRESENT:
                assert statuses[r] == expected_row
            elif nulls[name][r]:
                assert statuses[r] == FeatureStatus.NULL_VALUE
            else:
                assert statuses[r] == FeatureStatus.PRESENT
                want = columns[name][r]
                if dtype is DType.STRING:
                    assert values[r] == want
                else:
                    np.testing.assert_array_equal(values[r], np.asarray(want, values.dtype))
            if statuses[r] != FeatureStatus.PRESENT:
                empty = "" if dtype is DType.STRING else 0
                assert np.all(values[r] == empty)


def test_rows_of_an_older_layout_read_added_features_as_null():
    old = FeatureView(
        "v", "e", (Feature("a", DType.FLOAT32), Feature("s", DType.STRING)), version=1
    )
    new = FeatureView(
        "v",
        "e",
        (*old.features, Feature("b", DType.INT64), Feature("t", DType.STRING)),
        version=1,
    )
    rows = encode_rows(
        RowLayout(old),
        np.array([5, 6]),
        9,
        {"a": np.array([1.5, 2.5], np.float32), "s": [b"x", "ü".encode()]},
        {},
    )
    names = ["t", "a", "b", "s"]
    cut = np.full(2, NO_CUTOFF, np.int64)
    for decoded in (
        decode_rows(DecodePlan(RowLayout(new), names), rows, cut),
        decode_rows_reference(new, names, rows, cut),
    ):
        got = by_feature(decoded)
        assert got["a"][1].tolist() == [1.5, 2.5] and got["s"][1].tolist() == ["x", "ü"]
        assert got["b"][2].tolist() == [FeatureStatus.NULL_VALUE] * 2
        assert got["t"][2].tolist() == [FeatureStatus.NULL_VALUE] * 2
        assert got["t"][1].tolist() == ["", ""] and got["b"][1].tolist() == [0, 0]


def test_empty_batch_decodes_to_empty_blocks():
    view = FeatureView("v", "e", (Feature("a", DType.FLOAT64), Feature("s", DType.STRING)))
    decoded = decode_rows(DecodePlan(RowLayout(view), ["a", "s"]), [], np.zeros(0, np.int64))
    assert decoded.event_us.shape == (0,)
    assert [b.values.shape for b in decoded.blocks] == [(0, 1), (0, 1)]


def test_encoding_refuses_a_column_not_of_the_feature_dtype():
    layout = RowLayout(FeatureView("v", "e", (Feature("a", DType.FLOAT32),)))
    with pytest.raises(TypeError, match="equiv"):
        encode_rows(layout, np.array([1]), 9, {"a": np.array([1e300])}, {})
    big_endian = np.array([1.5], ">f4")
    rows = encode_rows(layout, np.array([1]), 9, {"a": big_endian}, {})
    decoded = decode_rows(DecodePlan(layout, ["a"]), rows, np.full(1, NO_CUTOFF, np.int64))
    assert decoded.blocks[0].values.tolist() == [[1.5]]


def decode_both(view, features, rows, cutoff) -> list:
    """What the kernel and the reference make of rows: a Decoded, or a CorruptRowError's
    (row, message)."""
    cut = np.full(len(rows), cutoff, np.int64)
    outcomes = []
    for decode in (
        lambda: decode_rows(DecodePlan(RowLayout(view), features), rows, cut),
        lambda: decode_rows_reference(view, features, rows, cut),
    ):
        try:
            outcomes.append(decode())
        except CorruptRowError as err:
            outcomes.append((err.row, str(err)))
    return outcomes


CORRUPTIBLE = FeatureView(
    "v",
    "e",
    (
        Feature("a", DType.FLOAT64),
        Feature("s", DType.STRING),
        Feature("flag", DType.BOOL),
        Feature("t", DType.STRING),
    ),
    version=3,
)
"""Rows of 56 bytes: header 24, bitmap 4, a 8, flag 4, s length 4 + "abcd", t length 4 + "efgh"."""


def corruptible_rows() -> list[bytes]:
    columns = {
        "a": np.array([1.5, 2.5, 3.5]),
        "s": [b"abcd"] * 3,
        "flag": np.array([True, False, True]),
        "t": [b"efgh"] * 3,
    }
    rows = encode_rows(RowLayout(CORRUPTIBLE), np.array([5, 6, 7]), 9, columns, {})
    assert {len(r) for r in rows} == {56}
    return rows


def patched(row: bytes, at: int, value: bytes, keep_length: bool = True) -> bytes:
    """row with `value` written at byte `at` (appended past the end); the length field is set
    to the result's length unless keep_length."""
    out = bytearray(row)
    out[at : at + len(value)] = value
    if not keep_length:
        out[0:4] = len(out).to_bytes(4, "little")
    return bytes(out)


def u32(value: int) -> bytes:
    return value.to_bytes(4, "little")


CORRUPTIONS = {
    "cut by a word, length field kept": (lambda r: r[:-4], "length field does not match"),
    "cut to an odd length": (lambda r: r[:-1], "not a multiple of 4 bytes"),
    "empty": (lambda r: b"", "shorter than the 24-byte row header"),
    "cut inside the header": (
        lambda r: patched(r[:12], 0, b"", keep_length=False),
        "shorter than the 24-byte row header",
    ),
    "length field past the buffer": (lambda r: patched(r, 0, u32(1 << 30)), "length field"),
    "length field zero": (lambda r: patched(r, 0, u32(0)), "length field"),
    "more features than the view": (lambda r: patched(r, 4, b"\x05\x00"), "more features"),
    "fixed block cut off": (
        lambda r: patched(r[:32], 0, b"", keep_length=False),
        "fixed-width values run past its end",
    ),
    "string length past the end": (lambda r: patched(r, 40, u32(0xFFFFFFFF)), "string value's"),
    "string length one past the end": (lambda r: patched(r, 48, u32(5)), "string value's"),
    "string shorter than its bytes": (lambda r: patched(r, 48, u32(0)), "bytes left after"),
    "bytes appended": (lambda r: patched(r, 56, bytes(8), keep_length=False), "bytes left"),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
@pytest.mark.parametrize("features", [["a", "s", "flag", "t"], ["flag"]])
@pytest.mark.parametrize("cutoff", [NO_CUTOFF, 100])
def test_a_corrupt_row_fails_the_read_naming_the_row(name, features, cutoff):
    """Truncated and corrupted rows are never read past their end: both decoders fail the read
    naming the view version, the row and what is wrong, whatever features are requested and
    whether or not the row is expired."""
    corrupt, reason = CORRUPTIONS[name]
    rows = corruptible_rows()
    rows[1] = corrupt(rows[1])
    rows.insert(0, MISSING_ROW)
    for row, message in decode_both(CORRUPTIBLE, features, rows, cutoff):
        assert row == 2
        assert message.startswith("feature view 'v' version 3: stored row 2 of the 4 read is")
        assert reason in message and "write that entity's features again" in message


def test_a_string_that_is_not_utf8_fails_the_read_when_returned():
    rows = corruptible_rows()
    rows[2] = patched(rows[2], 52, b"\xff")
    for features in (["a", "t"], ["t"], ["s", "t"]):
        for row, message in decode_both(CORRUPTIBLE, features, rows, NO_CUTOFF):
            assert row == 2 and "is corrupt (a string value is not valid UTF-8)" in message
    for decoded in decode_both(CORRUPTIBLE, ["a", "s"], rows, NO_CUTOFF):
        assert decoded.blocks[1].values[:, 0].tolist() == ["abcd"] * 3


@pytest.mark.parametrize("values", [[1e300, 2.5], [0.0, 0.0]])
def test_a_row_of_another_layout_is_corrupt_not_misread(values):
    """A row written for FLOAT64 x, y read by a version that made them STRING: its doubles would
    be string lengths (the lost race of a write against delete and re-apply)."""
    floats = FeatureView("v", "e", (Feature("x", DType.FLOAT64), Feature("y", DType.FLOAT64)))
    strings = FeatureView("v", "e", (Feature("x", DType.STRING), Feature("y", DType.STRING)))
    columns = {"x": np.array(values[:1]), "y": np.array(values[1:])}
    rows = encode_rows(RowLayout(floats), np.array([5]), 9, columns, {})
    for row, message in decode_both(strings, ["x", "y"], rows, NO_CUTOFF):
        assert row == 0 and "stored row 0 of the 1 read is corrupt" in message


def assert_same_decode(fast, slow):
    """Equal statuses, and equal values where PRESENT (the kernel copies a null cell as stored,
    which only the encoder keeps zero)."""
    np.testing.assert_array_equal(fast.row_status, slow.row_status)
    np.testing.assert_array_equal(fast.event_us, slow.event_us)
    got, ref = by_feature(fast), by_feature(slow)
    assert list(got) == list(ref)
    for name, (_, values, statuses) in got.items():
        np.testing.assert_array_equal(statuses, ref[name][2])
        present = statuses == FeatureStatus.PRESENT
        np.testing.assert_array_equal(values[present], ref[name][1][present])


FLIPS = st.lists(st.tuples(st.integers(0), st.integers(0), st.integers(0, 255)), max_size=4)


CUTS = st.lists(st.tuples(st.integers(0), st.integers(-12, 0), st.binary(max_size=8)), max_size=3)


def encoded_rows(case) -> list[bytes]:
    view, columns, nulls, events, _, missing, _ = case
    encoded = {k: [s.encode() for s in v] if isinstance(v, list) else v for k, v in columns.items()}
    rows = encode_rows(RowLayout(view), events, 7, encoded, nulls)
    return [MISSING_ROW if m else r for r, m in zip(rows, missing, strict=True)]


def assert_decoders_agree(case, rows):
    view, _, _, _, requested, _, cutoff = case
    fast, slow = decode_both(view, requested, rows, cutoff)
    if isinstance(fast, tuple) or isinstance(slow, tuple):
        assert fast == slow
    else:
        assert_same_decode(fast, slow)


@settings(max_examples=300, deadline=None)
@given(batches(), FLIPS)
def test_kernel_and_reference_agree_on_rows_with_flipped_bytes(case, flips):
    """Rows with random bytes overwritten decode the same both ways or fail the same way."""
    rows = encoded_rows(case)
    for which, at, byte in flips:
        if rows:
            r = which % len(rows)
            rows[r] = patched(rows[r], at % len(rows[r]), bytes([byte]))
    assert_decoders_agree(case, rows)


@settings(max_examples=200, deadline=None)
@given(batches(), CUTS)
def test_kernel_and_reference_agree_on_cut_or_extended_rows(case, cuts):
    """Rows cut short and/or with bytes appended (their length fields kept) are never read past
    their end and fail the same way in both decoders."""
    rows = encoded_rows(case)
    for which, cut, extra in cuts:
        if rows:
            r = which % len(rows)
            rows[r] = rows[r][: len(rows[r]) + cut] + extra
    assert_decoders_agree(case, rows)
