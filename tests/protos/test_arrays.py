"""protos.arrays: NumPy <-> featureserve.v1.Array for every dtype, and clear errors on bad bytes."""

from __future__ import annotations

import numpy as np
import pytest

from protos import arrays
from protos.featureserve.v1 import types_pb2


@pytest.mark.parametrize(
    ("values", "dtype"),
    [
        (np.arange(12, dtype=np.float32).reshape(4, 3), types_pb2.FLOAT32),
        (np.array([1.5, -2.25, np.nan]), types_pb2.FLOAT64),
        (np.array([np.iinfo(np.int64).min, 0, np.iinfo(np.int64).max]), types_pb2.INT64),
        (np.array([True, False, True]), types_pb2.BOOL),
    ],
)
def test_fixed_width_round_trip(values: np.ndarray, dtype: int) -> None:
    msg = arrays.to_array(values)
    assert msg.dtype == dtype
    back = arrays.from_array(msg)
    np.testing.assert_array_equal(back.reshape(values.shape), values)


def test_strings_round_trip_with_unicode_and_empty() -> None:
    values = np.array(["", "héllo", "\x00\xff", "z" * 1000], dtype=object)
    back = arrays.from_array(arrays.to_array(values))
    assert back.ravel().tolist() == values.tolist()


def test_vectors_round_trip() -> None:
    values = np.random.default_rng(0).random((5, 8), dtype=np.float32)
    msg = arrays.to_array(values, types_pb2.FLOAT32_VECTOR)
    assert (msg.rows, msg.width, msg.vector_length) == (5, 1, 8)
    np.testing.assert_array_equal(arrays.from_array(msg)[:, 0, :], values)


def test_nulls_round_trip() -> None:
    nulls = np.array([False, True, False])
    msg = arrays.to_array(np.zeros(3), nulls=nulls)
    np.testing.assert_array_equal(arrays.nulls_of(msg).ravel(), nulls)
    assert arrays.nulls_of(arrays.to_array(np.zeros(3))) is None


def test_short_data_names_the_field_and_expected_size() -> None:
    msg = types_pb2.Array(dtype=types_pb2.FLOAT32, rows=4, width=1, data=b"\x00" * 12)
    with pytest.raises(arrays.ArrayError, match=r"keys\[0\]: 12 bytes of data, expected 16"):
        arrays.from_array(msg, "keys[0]")


def test_bad_string_offsets_and_utf8_are_rejected() -> None:
    msg = arrays.to_array(np.array(["ab", "c"], dtype=object))
    msg.offsets = np.array([0, 5, 3], dtype="<i8").tobytes()
    with pytest.raises(arrays.ArrayError, match="offsets must rise"):
        arrays.from_array(msg, "name")
    bad = arrays.to_array(np.array(["ab"], dtype=object))
    bad.data = b"\xff\xfe"
    with pytest.raises(arrays.ArrayError, match="element 0 is not valid UTF-8"):
        arrays.from_array(bad, "name")


def test_lenient_decoding_lists_bad_elements_and_keeps_their_neighbours() -> None:
    msg = arrays.to_array(np.array([["ok", b"\xff"], [b"\xc3", "é"]], dtype=object))
    values, bad = arrays.from_array_lenient(msg, "name")
    assert values.tolist() == [["ok", ""], ["", "é"]]
    assert [i for i, _ in bad] == [1, 2]
    assert "not valid UTF-8 (invalid start byte at byte 0)" in bad[0][1]
    with pytest.raises(arrays.ArrayError, match="name: element 1 is not valid UTF-8"):
        arrays.from_array(msg, "name")
    msg.offsets = np.array([0, 2, 9, 4, 6], dtype="<i8").tobytes()
    with pytest.raises(arrays.ArrayError, match="offsets must rise"):
        arrays.from_array_lenient(msg, "name")


def test_bool_bytes_other_than_0_or_1_are_bad_elements() -> None:
    msg = types_pb2.Array(dtype=types_pb2.BOOL, rows=3, width=1, data=b"\x01\x02\x00")
    values, bad = arrays.from_array_lenient(msg, "flag")
    assert values.ravel().tolist() == [True, False, False]
    assert [i for i, _ in bad] == [1] and "BOOL byte 2" in bad[0][1]
    with pytest.raises(arrays.ArrayError, match="flag: element 1 is BOOL byte 2"):
        arrays.from_array(msg, "flag")


@pytest.mark.parametrize("size", [0, 7, 9, 15, 17])
def test_string_offsets_of_a_wrong_byte_length_name_the_field_and_size(size: int) -> None:
    msg = arrays.to_array(np.array(["a"], dtype=object))
    msg.offsets = b"\x00" * size
    expected = rf"keys\[0\]: offsets has {size} bytes, expected 16 \(2 little-endian int64"
    with pytest.raises(arrays.ArrayError, match=expected):
        arrays.from_array(msg, "keys[0]")
    with pytest.raises(arrays.ArrayError, match=expected):
        arrays.from_array_lenient(msg, "keys[0]")


@pytest.mark.parametrize("dtype", [types_pb2.FLOAT64, types_pb2.INT64, types_pb2.FLOAT32_VECTOR])
def test_data_of_a_wrong_byte_length_is_an_array_error_for_every_dtype(dtype: int) -> None:
    msg = types_pb2.Array(dtype=dtype, rows=1, width=1, vector_length=2, data=b"\x00" * 7)
    with pytest.raises(arrays.ArrayError, match="blocks: 7 bytes of data, expected 8"):
        arrays.from_array(msg, "blocks")
    msg = types_pb2.Array(dtype=types_pb2.INT64, rows=2, data=b"\x00" * 16, nulls=b"\x01")
    with pytest.raises(arrays.ArrayError, match="blocks: nulls has 1 bytes, expected 2"):
        arrays.nulls_of(msg, "blocks")


def test_unsigned_values_over_int64_are_rejected_not_wrapped() -> None:
    top = np.iinfo(np.int64).max
    msg = arrays.to_array(np.array([0, top], dtype=np.uint64))
    assert arrays.from_array(msg).ravel().tolist() == [0, top]
    big = np.array([1, 2**63, 2**64 - 1], dtype=np.uint64)
    with pytest.raises(
        arrays.ArrayError,
        match=r"keys\['user_id'\]: row 1: 9223372036854775808 exceeds the int64 range "
        r"\(-2\*\*63 to 2\*\*63-1\) \(2 values do not fit\)",
    ):
        arrays.to_array(big, field="keys['user_id']")
    masked = arrays.to_array(big, nulls=np.array([False, True, True]))
    assert arrays.from_array(masked)[0, 0] == 1 and arrays.nulls_of(masked).ravel()[1:].all()


def test_float64_vectors_that_overflow_float32_are_rejected_not_stored_as_inf() -> None:
    fine = np.array([[1e-3, -2.5], [np.inf, 3e38]])
    msg = arrays.to_array(fine, types_pb2.FLOAT32_VECTOR)
    np.testing.assert_array_equal(arrays.from_array(msg)[:, 0, :], fine.astype(np.float32))
    with pytest.raises(
        arrays.ArrayError,
        match=r"emb: row 1: a vector element overflows FLOAT32_VECTOR \(largest finite "
        r"3.4028235e\+38\); send a smaller value",
    ):
        arrays.to_array(np.array([[1.0, 1.0], [1e300, 1.0]]), types_pb2.FLOAT32_VECTOR, field="emb")
    with pytest.raises(arrays.ArrayError, match=r"x: row 0: 1e\+39 overflows FLOAT32"):
        arrays.to_array(np.array([1e39]), types_pb2.FLOAT32, field="x")


@pytest.mark.parametrize(
    ("values", "dtype", "reason"),
    [
        (np.array([2**53 + 1], dtype=np.int64), types_pb2.FLOAT64, "not exactly representable"),
        (np.array([2**24 + 1], dtype=np.int64), types_pb2.FLOAT32, "not exactly representable"),
        (np.array([1.5]), types_pb2.INT64, "not a whole number in the int64 range"),
        (np.array([np.nan]), types_pb2.INT64, "not a whole number in the int64 range"),
        (np.array([2.0**63]), types_pb2.INT64, "not a whole number in the int64 range"),
        (np.array([2]), types_pb2.BOOL, r"is not a BOOL \(0 or 1\)"),
    ],
)
def test_other_lossy_casts_to_an_explicit_dtype_are_rejected(
    values: np.ndarray, dtype: int, reason: str
) -> None:
    with pytest.raises(arrays.ArrayError, match=f"col: row 0: .* {reason}"):
        arrays.to_array(values, dtype, field="col")


def test_exact_casts_to_an_explicit_dtype_keep_their_values() -> None:
    exact = {
        types_pb2.FLOAT64: np.array([2**53, -(2**53)], dtype=np.int64),
        types_pb2.INT64: np.array([-(2.0**63), 42.0]),
        types_pb2.BOOL: np.array([0, 1], dtype=np.int8),
        types_pb2.FLOAT32: np.array([0.1, -1e38]),
    }
    for dtype, values in exact.items():
        back = arrays.from_array(arrays.to_array(values, dtype)).ravel()
        np.testing.assert_array_equal(back, values.astype(back.dtype))


def test_wide_floats_travel_as_float64() -> None:
    assert arrays.dtype_for_numpy(np.zeros(1, dtype=np.longdouble)) == types_pb2.FLOAT64
    assert arrays.dtype_for_numpy(np.zeros(1, dtype=np.float16)) == types_pb2.FLOAT32


def test_text_that_is_not_str_or_bytes_is_null_where_masked_and_rejected_elsewhere() -> None:
    values = np.array(["a\x00", None, b"b\x00", 5], dtype=object)
    masked = arrays.to_array(values, nulls=np.array([False, True, False, True]), field="f")
    assert arrays.from_array(masked).ravel().tolist() == ["a\x00", "", "b\x00", ""]
    np.testing.assert_array_equal(arrays.nulls_of(masked).ravel(), [False, True, False, True])
    with pytest.raises(arrays.ArrayError, match=r"^f: row 3: 5 is not a str or bytes; send text"):
        arrays.to_array(values, nulls=np.array([False, True, False, False]), field="f")
    table = np.array([["a", "b"], ["c", None]], dtype=object)
    with pytest.raises(arrays.ArrayError, match=r"^f: row 1: None is not a str or bytes"):
        arrays.to_array(table, field="f")


def test_cast_changes_lists_every_row_cast_refuses_and_why() -> None:
    values = np.array([1.0, 1e39, 2.5, -1e40])
    changes = arrays.cast_changes(values, types_pb2.FLOAT32, "f")
    assert list(changes) == [1, 3]
    assert changes[1].startswith("1e+39 overflows FLOAT32")
    with pytest.raises(arrays.ArrayError, match=r"f: row 1: 1e\+39 overflows FLOAT32"):
        arrays.cast(values, types_pb2.FLOAT32, "f")
    vectors = np.array([[1.0, 2.0], [3.0, 1e39]])
    assert list(arrays.cast_changes(vectors, types_pb2.FLOAT32_VECTOR, "v")) == [1]
    assert arrays.cast_changes(np.array([2**24 + 1]), types_pb2.FLOAT32, "i") == {
        0: "16777217 is not exactly representable as FLOAT32 (it holds every integer up to "
        "2**24); send it as a float"
    }
    assert arrays.cast_changes(np.array([1.0, 2.0]), types_pb2.FLOAT32, "f") == {}


def test_a_lone_surrogate_is_an_array_error_naming_field_and_row() -> None:
    """A str holding a lone surrogate (how Python decodes non-UTF-8 argv or file names) is an
    ArrayError naming the field and row, in a column or a rows x width table (it escaped as a
    bare UnicodeEncodeError)."""
    column = ["ok", b"\xff", "a\udcffb"]
    with pytest.raises(
        arrays.ArrayError,
        match=r"^keys\['name'\]: row 2: lone surrogate '\\udcff' at character 1 is not "
        r"encodable as UTF-8; send valid Unicode text$",
    ) as info:
        arrays.to_array(np.array(column, dtype=object), field="keys['name']")
    assert (info.value.field, info.value.row) == ("keys['name']", 2)
    table = np.array([["a", "b"], ["c", "\ud800"]], dtype=object)
    with pytest.raises(arrays.ArrayError, match=r"^s: row 1: lone surrogate '\\ud800' at char"):
        arrays.to_array(table, field="s")
