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
