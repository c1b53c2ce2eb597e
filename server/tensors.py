"""KServe v2 tensors <-> NumPy: datatype tables, raw and typed contents decoding and encoding."""

from __future__ import annotations

import struct

import numpy as np

from protos.inference import grpc_service_pb2 as pb
from server.errors import InvalidRequestError

MAX_ARRAY_BYTES = np.iinfo(np.intp).max
"""The largest array NumPy can describe, in bytes."""
NUMPY_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # bit patterns: NumPy has no bfloat16 (see bf16_to_float32)
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}

ONNX_TO_KSERVE: dict[str, str] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(bfloat16)": "BF16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}

# Triton's DataType enum names (model_config.proto) for each KServe datatype.
TRITON_TYPE_NAMES: dict[str, str] = {
    name: "TYPE_STRING" if name == "BYTES" else f"TYPE_{name}" for name in NUMPY_DTYPES
}

# Which InferTensorContents field carries each datatype; FP16 and BF16 have none (raw only).
_CONTENTS_FIELD: dict[str, str] = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}

# The element type each InferTensorContents field holds on the wire (protobuf enforces it),
# so typed values convert exactly before any narrowing to the declared datatype.
_FIELD_DTYPES: dict[str, np.dtype] = {
    "bool_contents": np.dtype(np.bool_),
    "uint_contents": np.dtype("<u4"),
    "uint64_contents": np.dtype("<u8"),
    "int_contents": np.dtype("<i4"),
    "int64_contents": np.dtype("<i8"),
    "fp32_contents": np.dtype("<f4"),
    "fp64_contents": np.dtype("<f8"),
}

_LENGTH = struct.Struct("<I")


def unserved_type(tensor: str, onnx_type: str) -> str:
    """Why a model's tensor of an ONNX type with no KServe datatype cannot be served, naming the
    tensor and the fix (the model's load error)."""
    served = ", ".join(ONNX_TO_KSERVE)
    return (
        f"tensor '{tensor}' has type {onnx_type}; the server serves {served}: cast it to one "
        "of them"
    )


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    """BF16 bit patterns as the float32 values they stand for (exact: BF16 is float32's top
    half)."""
    return (np.asarray(bits, np.uint16).astype(np.uint32) << 16).view(np.float32)


def element_count(shape: tuple[int, ...] | list[int]) -> int:
    """Number of elements of a tensor of this shape."""
    count = 1
    for dim in shape:
        count *= dim
    return count


def check_size(name: str, datatype: str, shape: tuple[int, ...]) -> None:
    """Refuse a shape no array can take, even with no elements: NumPy sizes a reshape by the
    product of the non-zero dimensions, so [0, 2**62] fails there rather than being empty."""
    dims = 1
    for dim in shape:
        dims *= dim or 1
    if dims * NUMPY_DTYPES[datatype].itemsize > MAX_ARRAY_BYTES:
        raise InvalidRequestError(
            f"input '{name}': shape {list(shape)} is larger than any array can be "
            f"(its non-zero dimensions make {dims} elements of {datatype}); send real dimensions"
        )


def decode_raw(
    name: str, datatype: str, shape: tuple[int, ...], raw: bytes, source: str = "raw contents"
) -> np.ndarray:
    """A raw_input_contents entry (or a tensor's bytes from elsewhere, which messages call
    `source`) as an array; the byte length must match shape x dtype."""
    count = element_count(shape)
    if datatype == "BYTES":
        return _decode_bytes_raw(name, shape, count, raw, source)
    dtype = NUMPY_DTYPES[datatype]
    expected = count * dtype.itemsize
    if len(raw) != expected:
        raise InvalidRequestError(
            f"input '{name}': {source} hold {len(raw)} bytes, but shape {list(shape)} of "
            f"{datatype} needs {expected} bytes ({count} x {dtype.itemsize})"
        )
    array = np.frombuffer(raw, dtype=dtype)
    if datatype == "BOOL":
        _check_bool_bytes(name, array, source)
    return array.reshape(shape)


def _check_bool_bytes(name: str, array: np.ndarray, source: str) -> None:
    """NumPy reinterprets any byte as a bool without normalising it, so only 0 and 1 are valid."""
    octets = array.view(np.uint8)
    if octets.size and octets.max() > 1:
        index = int(np.argmax(octets > 1))
        raise InvalidRequestError(
            f"input '{name}': BOOL {source} element {index} is byte {octets[index]}; "
            f"each BOOL element is one byte, 0 (false) or 1 (true)"
        )


def _decode_bytes_raw(
    name: str, shape: tuple[int, ...], count: int, raw: bytes, source: str
) -> np.ndarray:
    """BYTES raw contents: each element is a 4-byte little-endian length and its bytes."""
    items: list[str] = []
    view = memoryview(raw)
    offset = 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InvalidRequestError(
                f"input '{name}': BYTES {source} end inside the length of element "
                f"{len(items)}; each element needs a 4-byte little-endian length prefix"
            )
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += 4
        if offset + length > len(raw):
            raise InvalidRequestError(
                f"input '{name}': BYTES {source} element {len(items)} declares {length} bytes "
                f"but only {len(raw) - offset} remain"
            )
        items.append(_to_text(name, bytes(view[offset : offset + length]), len(items), source))
        offset += length
    if len(items) != count:
        raise InvalidRequestError(
            f"input '{name}': {source} hold {len(items)} BYTES elements, "
            f"shape {list(shape)} needs {count}"
        )
    return _object_array(items, shape)


def _to_text(name: str, value: bytes, index: int, source: str = "contents") -> str:
    """ONNX Runtime string tensors hold text: BYTES elements (of `source`) must be UTF-8."""
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequestError(
            f"input '{name}': BYTES {source} element {index} is not UTF-8; ONNX string tensors "
            "hold text"
        ) from None


def _object_array(items: list, shape: tuple[int, ...]) -> np.ndarray:
    """An object array of exactly this shape (np.array would split nested sequences)."""
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array.reshape(shape)


def decode_contents(
    name: str, datatype: str, shape: tuple[int, ...], contents: pb.InferTensorContents
) -> np.ndarray:
    """Typed InferTensorContents as an array; the field must be the datatype's and fully filled."""
    field = _CONTENTS_FIELD.get(datatype)
    if field is None:
        raise InvalidRequestError(
            f"input '{name}': {datatype} has no typed contents field; send it in raw_input_contents"
        )
    for other in set(_CONTENTS_FIELD.values()) - {field}:
        if len(getattr(contents, other)):
            raise InvalidRequestError(
                f"input '{name}': datatype {datatype} goes in contents.{field}, "
                f"but contents.{other} is set"
            )
    values = getattr(contents, field)
    count = element_count(shape)
    if len(values) != count:
        raise InvalidRequestError(
            f"input '{name}': contents.{field} holds {len(values)} values, "
            f"shape {list(shape)} needs {count}"
        )
    if datatype == "BYTES":
        return _object_array([_to_text(name, v, i) for i, v in enumerate(values)], shape)
    array = np.fromiter(values, dtype=_FIELD_DTYPES[field], count=count)
    dtype = NUMPY_DTYPES[datatype]
    if dtype != array.dtype:
        _check_range(name, datatype, field, array)
    return array.astype(dtype, copy=False).reshape(shape)


def _check_range(name: str, datatype: str, field: str, array: np.ndarray) -> None:
    """Typed values of an 8- or 16-bit datatype arrive in a 32-bit field and must fit it."""
    info = np.iinfo(NUMPY_DTYPES[datatype])
    if array.size and (array.min() < info.min or array.max() > info.max):
        index = int(np.argmax((array < info.min) | (array > info.max)))
        raise InvalidRequestError(
            f"input '{name}': contents.{field} element {index} is {array[index]}, outside the "
            f"range of {datatype} [{info.min}, {info.max}]; send values in range or declare "
            f"a wider datatype"
        )


def encode_raw(datatype: str, array: np.ndarray) -> bytes:
    """An output array as raw little-endian bytes (BYTES: length-prefixed UTF-8 elements)."""
    if datatype == "BYTES":
        parts: list[bytes] = []
        for item in array.reshape(-1):
            data = item if isinstance(item, bytes) else str(item).encode("utf-8")
            parts.append(_LENGTH.pack(len(data)))
            parts.append(data)
        return b"".join(parts)
    return np.ascontiguousarray(array, dtype=NUMPY_DTYPES[datatype]).tobytes()


def encode_bytes_elements(values: list[bytes]) -> bytes:
    """Length-prefixed BYTES raw contents from a list of byte strings (for clients and tests)."""
    return b"".join(_LENGTH.pack(len(v)) + v for v in values)
