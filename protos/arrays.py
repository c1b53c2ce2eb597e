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
    """An Array message whose bytes do not match its declared shape and dtype, or values that
    cannot be sent as their wire dtype; `row` is set when one row is to blame."""

    def __init__(self, message: str, field: str = "", row: int | None = None, why: str = ""):
        super().__init__(message)
        self.field, self.row, self.why = field, row, why

    @classmethod
    def at(cls, field: str, row: int, why: str) -> ArrayError:
        """The error of one row: "<field>: row <row>: <why>"."""
        return cls(f"{field}: row {row}: {why}", field, row, why)

    def shifted(self, rows: int) -> ArrayError:
        """The same error for a caller whose rows start `rows` earlier (a slice's offset)."""
        return self if self.row is None else ArrayError.at(self.field, self.row + rows, self.why)


def dtype_for_numpy(values: np.ndarray) -> int:
    """The wire dtype for a NumPy array (strings and objects map to STRING)."""
    kind = values.dtype.kind
    if kind in "USO":
        return types_pb2.STRING
    if kind == "b":
        return types_pb2.BOOL
    if kind == "f":
        return types_pb2.FLOAT32 if values.dtype.itemsize <= 4 else types_pb2.FLOAT64
    if kind in "iu":
        return types_pb2.INT64
    raise ArrayError(f"unsupported NumPy dtype {values.dtype}")


def encode_strings(
    values: np.ndarray | list, field: str = "array", nulls: np.ndarray | None = None
) -> tuple[bytes, bytes]:
    """UTF-8 data and int64 offsets for a flat sequence of str or bytes. A value that is neither
    (None, pd.NA, a number) travels as "" where `nulls` marks it, else raises ArrayError naming
    `field` and its row: nothing is sent as the text of another value."""
    values = np.asarray(values, dtype=object)
    try:
        encoded = [
            v.encode() if isinstance(v, str) else v if isinstance(v, bytes) else None
            for v in values.flat
        ]
    except UnicodeEncodeError as exc:
        raise _unencodable(values, field, exc) from None
    if None in encoded:
        _encode_missing(values, encoded, field, nulls)
    lengths = np.fromiter((len(b) for b in encoded), dtype=np.int64, count=len(encoded))
    offsets = np.zeros(len(encoded) + 1, dtype="<i8")
    np.cumsum(lengths, out=offsets[1:])
    return b"".join(encoded), offsets.tobytes()


def _unencodable(values: np.ndarray, field: str, exc: UnicodeEncodeError) -> ArrayError:
    """The ArrayError naming the row of the str UTF-8 could not encode (one holding a lone
    surrogate, as Python decodes non-UTF-8 argv or file names); searched for only on failure."""
    width = values.shape[1] if values.ndim == 2 else 1
    why = (
        f"lone surrogate {exc.object[exc.start]!r} at character {exc.start} is not encodable as "
        "UTF-8; send valid Unicode text"
    )
    for i, value in enumerate(values.flat):
        if value is exc.object:
            return ArrayError.at(field, i // width, why)
    return ArrayError(f"{field}: {why}")


def _encode_missing(
    values: np.ndarray, encoded: list, field: str, nulls: np.ndarray | None
) -> None:
    """Encode as "" the values left None in `encoded` that `nulls` marks; ArrayError naming the
    row of the first one it does not."""
    flat = np.ravel(values)
    marked = np.ravel(nulls) if nulls is not None and np.size(nulls) == len(flat) else None
    width = values.shape[1] if values.ndim == 2 else 1
    for i, value in enumerate(encoded):
        if value is not None:
            continue
        if marked is None or not marked[i]:
            raise ArrayError.at(
                field,
                i // width,
                f"{flat[i]!r} is not a str or bytes; send text (a feature value that is "
                "missing: mark its row in nulls)",
            )
        encoded[i] = b""


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
    if len(offsets) != (count + 1) * 8:
        raise ArrayError(
            f"{field}: offsets has {len(offsets)} bytes, expected {(count + 1) * 8} "
            f"({count + 1} little-endian int64 offsets: one per string and one for the end)"
        )
    offs = np.frombuffer(offsets, dtype="<i8")
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
    field: str = "array",
) -> types_pb2.Array:
    """Fill an Array message from a 1-D (one column), 2-D (rows x width) or, for
    FLOAT32_VECTOR, 2-/3-D array. Raises ArrayError naming `field` when a value would change
    on the way to the wire dtype (see cast)."""
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
        msg.data, msg.offsets = encode_strings(arr, field, nulls)
    else:
        msg.data = cast(arr, wire, field, nulls).tobytes()
    if nulls is not None and np.any(nulls):
        msg.nulls = np.ascontiguousarray(nulls, dtype=np.uint8).tobytes()
    return msg


def _cast_loss(values: np.ndarray, out: np.ndarray, wire: int) -> tuple[np.ndarray, str] | None:
    """Where `out` (values cast to the wire dtype) differs from `values` beyond float rounding,
    and why; None when the cast keeps every value."""
    kind, target = values.dtype.kind, out.dtype
    if kind == "b" or (kind == target.kind and values.dtype.itemsize <= target.itemsize):
        return None
    name = types_pb2.DType.Name(wire)
    if wire == types_pb2.BOOL:
        return (values != 0) & (values != 1), "is not a BOOL (0 or 1); send 0, 1 or a bool array"
    if target.kind == "i" and kind == "u":
        return values > np.iinfo(np.int64).max, "exceeds the int64 range (-2**63 to 2**63-1)"
    if target.kind == "i" and kind == "f":
        whole = np.isfinite(values) & (np.trunc(values) == values)
        fits = whole & (values >= -(2.0**63)) & (values < 2.0**63)
        return ~fits, "is not a whole number in the int64 range (-2**63 to 2**63-1)"
    if target.kind == "f" and kind == "f":
        why = f"overflows {name} (largest finite {np.finfo(target).max:.8g}); send a smaller value"
        return np.isinf(out) & np.isfinite(values), why
    if target.kind == "f" and kind in "iu":
        info = np.iinfo(values.dtype)
        fits = (out >= float(info.min)) & (out < float(info.max) + 1.0)
        lost = ~fits | (np.where(fits, out, 0).astype(values.dtype) != values)
        digits = np.finfo(target).nmant + 1
        why = f"is not exactly representable as {name} (it holds every integer up to 2**{digits})"
        return lost, why + "; send it as a float"
    return None


def _converted(values: np.ndarray, wire: int, field: str) -> np.ndarray:
    """`values` as the wire dtype's little-endian NumPy dtype, unchecked (ArrayError when the
    values are not numbers at all)."""
    target = DTYPE_TO_NUMPY.get(wire)
    if target is None:
        raise ArrayError(f"{field}: dtype {wire} is not a fixed-width featureserve.v1.DType")
    try:
        with np.errstate(over="ignore", invalid="ignore"):
            return np.ascontiguousarray(values, dtype=target)
    except (TypeError, ValueError, OverflowError):
        raise ArrayError(
            f"{field}: {values.dtype} values cannot be read as {types_pb2.DType.Name(wire)}; "
            "send a numeric array"
        ) from None


def _changes(
    values: np.ndarray, out: np.ndarray, wire: int, nulls: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, str] | None:
    """(rows x columns mask of the values the cast changed, values as rows x columns (x width),
    why), nulls excepted; None when it changed none."""
    loss = _cast_loss(values, out, wire)
    if loss is None or not loss[0].any():
        return None
    lost, why = loss
    table = values.reshape(values.shape[0], -1) if values.ndim < 3 else values
    lost = lost.reshape(table.shape)
    if lost.ndim == 3:
        lost = lost.any(axis=2)
    if nulls is not None and np.size(nulls) == lost.size:
        lost = lost & ~np.asarray(nulls, dtype=bool).reshape(lost.shape)
    return (lost, table, why) if lost.any() else None


def _what(table: np.ndarray, row: int, col: int) -> str:
    return "a vector element" if table.ndim == 3 else repr(table[row, col].item())


def cast(
    values: np.ndarray, wire: int, field: str = "array", nulls: np.ndarray | None = None
) -> np.ndarray:
    """`values` as the wire dtype's little-endian NumPy dtype. A value the cast would change
    beyond float rounding (an unsigned integer over the int64 range, a finite float overflowing
    to inf, an integer a float cannot hold, a fraction to INT64) raises ArrayError naming
    `field` and the first such row, unless `nulls` (rows x width) marks it null: nothing is
    silently sent as another value."""
    if values.dtype == DTYPE_TO_NUMPY.get(wire):
        return np.ascontiguousarray(values)
    out = _converted(values, wire, field)
    changed = _changes(values, out, wire, nulls)
    if changed is None:
        return out
    lost, table, why = changed
    bad = np.flatnonzero(lost)
    row, col = divmod(int(bad[0]), lost.shape[1])
    more = f" ({len(bad)} values do not fit)" if len(bad) > 1 else ""
    raise ArrayError.at(field, row, f"{_what(table, row, col)} {why}{more}")


def cast_changes(values: np.ndarray, wire: int, field: str = "array") -> dict[int, str]:
    """{row: what would change} for every row cast() would refuse (it raises at the first),
    for callers that report each bad row, such as `featureserve ingest`."""
    if values.dtype == DTYPE_TO_NUMPY.get(wire) or not len(values):
        return {}
    changed = _changes(values, _converted(values, wire, field), wire, None)
    if changed is None:
        return {}
    lost, table, why = changed
    return {
        int(row): f"{_what(table, int(row), int(np.argmax(lost[row])))} {why}"
        for row in np.flatnonzero(lost.any(axis=1))
    }


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
