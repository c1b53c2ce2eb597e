"""Entity key encoding: the LMDB key size limit in terms of the string bytes a caller sends."""

from pathlib import Path

import lmdb
import numpy as np
import pytest

from featurestore.dtypes import DType
from featurestore.keys import INVALID_KEY, MAX_KEY_BYTES, decode_keys, encode_keys
from featurestore.registry import Entity, JoinKey

SESSION = Entity("session", (JoinKey("sid", DType.STRING),))
PLACED = Entity("placed", (JoinKey("a", DType.STRING), JoinKey("b", DType.INT64)))
ROUTE = Entity(
    "route", (JoinKey("src", DType.STRING), JoinKey("n", DType.INT64), JoinKey("dst", DType.STRING))
)


def strings(*values: str) -> np.ndarray:
    return np.array(values, dtype=object)


def test_a_string_key_holds_507_bytes_and_508_names_the_limit() -> None:
    encoded = encode_keys(SESSION, {"sid": strings("x" * 507, "x" * 508, "é" * 254)})
    assert len(encoded.keys[0]) == MAX_KEY_BYTES
    assert encoded.keys[1:] == [INVALID_KEY, INVALID_KEY]
    reason = (
        "join key 'sid': 508 bytes; a key of entity 'session' holds at most 507 bytes of strings "
        "(LMDB's 511-byte key limit less the encoding's 4 bytes); shorten it"
    )
    assert encoded.errors == [(1, "sid", reason), (2, "sid", reason)]


def test_a_composite_key_names_its_string_part_not_the_last_join_key() -> None:
    encoded = encode_keys(PLACED, {"a": strings("x" * 499, "x" * 500), "b": np.array([1, 2])})
    assert len(encoded.keys[0]) == MAX_KEY_BYTES
    assert encoded.errors == [
        (
            1,
            "a",
            "join key 'a': 500 bytes; a key of entity 'placed' holds at most 499 bytes of "
            "strings (LMDB's 511-byte key limit less the encoding's 12 bytes); shorten it",
        )
    ]


def test_several_string_parts_share_the_room_and_the_longest_is_named() -> None:
    keys = {
        "src": strings("s" * 200, "s" * 300),
        "n": np.array([1, 2]),
        "dst": strings("d" * 295, "d" * 200),
    }
    encoded = encode_keys(ROUTE, keys)
    assert len(encoded.keys[0]) == MAX_KEY_BYTES
    assert decode_keys(ROUTE, encoded.keys[:1])["dst"].tolist() == ["d" * 295]
    assert encoded.errors == [
        (
            1,
            "src",
            "join keys 'src' 300, 'dst' 200: 500 bytes of strings; a key of entity 'route' "
            "holds at most 495 bytes of strings (LMDB's 511-byte key limit less the encoding's "
            "16 bytes); shorten them",
        )
    ]


def test_the_limit_is_lmdbs(tmp_path: Path) -> None:
    """A key at the stated limit is stored by LMDB itself; one byte more is refused by it."""
    env = lmdb.open(str(tmp_path), map_size=1 << 20)
    longest = encode_keys(SESSION, {"sid": strings("x" * 507)}).keys[0]
    with env.begin(write=True) as txn:
        txn.put(longest, b"row")
        with pytest.raises(lmdb.BadValsizeError):
            txn.put(longest + b"x", b"row")
    with env.begin() as txn:
        assert txn.get(longest) == b"row"
    env.close()
