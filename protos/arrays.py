"""Convert between NumPy arrays and featureserve.v1.Array messages without a per-value loop.

Both ends of the wire use this module, so the byte layout documented in types.proto
lives in exactly one place.
"""

from __future__ import annotations

import math
from itertools import pairwise

import numpy as np

from protos.featureserve.v1 import types_pb2

DTYPE_TO_NUMPY: dict[int, np.dtype] = {
    types_pb2.FLOAT32: np.dtype("<f4"),
    types_pb2.FLOAT64: np.dtype("<f8"),
    types_pb2.INT64: np.dtype("<i8"),
    types_pb2.BOOL: np.dtype("u1"),
    types_pb2.FLOAT32_VECTOR: np.dtype("<f4"),
}


class ArrayError(ValueError):
    """An Array message whose bytes do not match its declared shape and dtype."""


def dtype_for_numpy(values: np.ndarray) -> int:
    """The wire dtype for a NumPy array (strings and objects map to STRING)."""
    kind = values.dtype.kind
    if kind in "USO":
        return types_pb2.STRING
    if kind == "b":
        return types_pb2.BOOL
    if kind == "f":
        return types_pb2.FLOAT64 if values.dtype.itemsize == 8 else types_pb2.FLOAT32
    if kind in "iu":
        return types_pb2.INT64
    raise ArrayError(f"unsupported NumPy dtype {values.dtype}")


def encode_strings(values: np.ndarray | list) -> tuple[bytes, bytes]:
    """UTF-8 data and int64 offsets for a flat sequence of strings."""
    encoded = [v.encode() if isinstance(v, str) else bytes(v) for v in np.ravel(values)]
    lengths = np.fromiter((len(b) for b in encoded), dtype=np.int64, count=len(encoded))
    offsets = np.zeros(len(encoded) + 1, dtype="<i8")
    np.cumsum(lengths, out=offsets[1:])
    return b"".join(encoded), offsets.tobytes()


def decode_strings(data: bytes, offsets: bytes, count: int, field: str) -> np.ndarray:
    """An object array of str from UTF-8 data and int64 offsets."""
    out, bad = decode_strings_lenient(data, offsets, count, field)
    if bad:
        raise ArrayError(f"{field}: element {bad[0][0]} {bad[0][1]}")
    return out


def decode_strings_lenient(
    data: bytes, offsets: bytes, count: int, field: str
) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Like decode_strings, but an element that is not valid UTF-8 reads as "" and is listed as
    (index, reason), so a caller can reject it alone; the offsets must still be well formed."""
    offs = np.frombuffer(offsets, dtype="<i8")
    if len(offs) != count + 1:
        raise ArrayError(f"{field}: expected {count + 1} string offsets, got {len(offs)}")
    if count and (offs[0] != 0 or offs[-1] != len(data) or np.any(np.diff(offs) < 0)):
        raise ArrayError(f"{field}: string offsets must rise from 0 to len(data)={len(data)}")
    bounds = offs.tolist()
    spans = list(pairwise(bounds))
    out = np.empty(count, dtype=object)
    try:
        out[:] = [data[a:b].decode() for a, b in spans]
        return out, []
    except UnicodeDecodeError:
        pass
    bad: list[tuple[int, str]] = []
    for i, (a, b) in enumerate(spans):
        try:
            out[i] = data[a:b].decode()
        except UnicodeDecodeError as exc:
            out[i] = ""
            why = f"is not valid UTF-8 ({exc.reason} at byte {exc.start}); send UTF-8 text"
            bad.append((i, why))
    return out, bad


def to_array(
    values: np.ndarray | list,
    dtype: int | None = None,
    nulls: np.ndarray | None = None,
    out: types_pb2.Array | None = None,
) -> types_pb2.Array:
    """Fill an Array message from a 1-D (one column), 2-D (rows x width) or, for
    FLOAT32_VECTOR, 2-/3-D array."""
    arr = values if isinstance(values, np.ndarray) else np.asarray(values)
    wire = dtype if dtype is not None else dtype_for_numpy(arr)
    msg = out if out is not None else types_pb2.Array()
    msg.dtype = wire
    if wire == types_pb2.FLOAT32_VECTOR:
        if arr.ndim == 2:
            arr = arr[:, None, :]
        rows, width, vlen = arr.shape
        msg.vector_length = vlen
    else:
        if arr.ndim == 1:
            arr = arr[:, None]
        rows, width = arr.shape
    msg.rows = rows
    msg.width = width
    if wire == types_pb2.STRING:
        msg.data, msg.offsets = encode_strings(arr)
    else:
        msg.data = np.ascontiguousarray(arr, dtype=DTYPE_TO_NUMPY[wire]).tobytes()
    if nulls is not None and np.any(nulls):
        msg.nulls = np.ascontiguousarray(nulls, dtype=np.uint8).tobytes()
    return msg


def from_array(msg: types_pb2.Array, field: str = "array") -> np.ndarray:
    """A NumPy view (rows x width [x vector_length]) of an Array message; strings as objects.

    Raises ArrayError naming `field` when the bytes do not match the declared shape, or an
    element is bad (a STRING not valid UTF-8, a BOOL byte other than 0 or 1).
    """
    values, bad = from_array_lenient(msg, field)
    if bad:
        raise ArrayError(f"{field}: element {bad[0][0]} {bad[0][1]}")
    return values


def from_array_lenient(
    msg: types_pb2.Array, field: str = "array"
) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Like from_array, but bad elements (a STRING not valid UTF-8, a BOOL byte other than 0
    or 1) read as ""/False and come back as (flat row-major index, reason), so a write can
    reject those rows alone. A message whose shape or offsets are wrong still raises."""
    width = msg.width or 1
    count = msg.rows * width
    if msg.dtype == types_pb2.STRING:
        values, bad = decode_strings_lenient(msg.data, msg.offsets, count, field)
        return values.reshape(msg.rows, width), bad
    np_dtype = DTYPE_TO_NUMPY.get(msg.dtype)
    if np_dtype is None:
        raise ArrayError(f"{field}: dtype {msg.dtype} is not a known featureserve.v1.DType")
    shape: tuple[int, ...] = (msg.rows, width)
    if msg.dtype == types_pb2.FLOAT32_VECTOR:
        if msg.vector_length == 0:
            raise ArrayError(f"{field}: FLOAT32_VECTOR needs vector_length > 0")
        shape = (msg.rows, width, msg.vector_length)
    expected = math.prod(shape) * np_dtype.itemsize
    if len(msg.data) != expected:
        raise ArrayError(
            f"{field}: {len(msg.data)} bytes of data, expected {expected} "
            f"for shape {shape} of {types_pb2.DType.Name(msg.dtype)}"
        )
    arr = np.frombuffer(msg.data, dtype=np_dtype).reshape(shape)
    if msg.dtype != types_pb2.BOOL:
        return arr, []
    over = np.flatnonzero(arr > 1)
    bad = [(i, f"is BOOL byte {arr.flat[i]}; send 0 (false) or 1 (true)") for i in over.tolist()]
    return arr == 1, bad


def nulls_of(msg: types_pb2.Array, field: str = "array") -> np.ndarray | None:
    """The null mask (rows x width bool) of an Array, or None when nothing is null."""
    if not msg.nulls:
        return None
    width = msg.width or 1
    if len(msg.nulls) != msg.rows * width:
        raise ArrayError(f"{field}: nulls has {len(msg.nulls)} bytes, expected {msg.rows * width}")
    return np.frombuffer(msg.nulls, dtype=np.uint8).reshape(msg.rows, width).astype(bool)
