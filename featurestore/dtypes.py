"""Feature value types and per-value statuses; the numbers equal featureserve.v1's proto enums."""

from enum import IntEnum

import numpy as np

from featurestore.errors import InvalidArgumentError


class DType(IntEnum):
    """A feature or join key value type (same numbers as featureserve.v1.DType)."""

    FLOAT32 = 1
    FLOAT64 = 2
    INT64 = 3
    BOOL = 4
    STRING = 5
    FLOAT32_VECTOR = 6


class FeatureStatus(IntEnum):
    """The status of one returned value (same numbers as featureserve.v1.FeatureStatus)."""

    PRESENT = 1
    NOT_FOUND = 2
    NULL_VALUE = 3
    OUTSIDE_MAX_AGE = 4


_NUMPY = {
    DType.FLOAT32: np.dtype("<f4"),
    DType.FLOAT64: np.dtype("<f8"),
    DType.INT64: np.dtype("<i8"),
    DType.BOOL: np.dtype(np.bool_),
    DType.STRING: np.dtype(object),
    DType.FLOAT32_VECTOR: np.dtype("<f4"),
}

_WIDTH = {
    DType.FLOAT32: 4,
    DType.FLOAT64: 8,
    DType.INT64: 8,
    DType.BOOL: 1,
    DType.STRING: 0,
    DType.FLOAT32_VECTOR: 4,
}


def numpy_dtype(dtype: DType) -> np.dtype:
    """The NumPy element dtype that holds values of `dtype` (object for STRING)."""
    return _NUMPY[dtype]


def fixed_width(dtype: DType, vector_length: int = 0) -> int:
    """Bytes one value takes in a packed row's fixed block; 0 for variable-length STRING."""
    dtype = DType(dtype)
    if dtype is DType.FLOAT32_VECTOR:
        return _WIDTH[dtype] * vector_length
    return _WIDTH[dtype]


def is_float(dtype: DType) -> bool:
    """True for dtypes whose values may be NaN."""
    return dtype in (DType.FLOAT32, DType.FLOAT64, DType.FLOAT32_VECTOR)


_SEND = {
    DType.FLOAT32: "FLOAT32 values (NumPy float32)",
    DType.FLOAT64: "FLOAT64 values (NumPy float64)",
    DType.INT64: "INT64 values (NumPy int64)",
    DType.BOOL: "BOOL values (NumPy bool)",
    DType.STRING: "STRING values (str, or UTF-8 bytes)",
    DType.FLOAT32_VECTOR: "FLOAT32_VECTOR values (NumPy float32, rows x vector_length)",
}


def sent_type(dtype: np.dtype) -> str:
    """A column's NumPy dtype as the protocol's DType name (what the wire carries it as), or as
    the NumPy name where the protocol has none, so one message fits RPC and Python callers."""
    kind, size = dtype.kind, dtype.itemsize
    if kind in "OUS":
        return DType.STRING.name
    if kind == "b":
        return DType.BOOL.name
    if kind == "f" and size in (4, 8):
        return (DType.FLOAT32 if size == 4 else DType.FLOAT64).name
    if kind == "i" and size == 8:
        return DType.INT64.name
    return f"NumPy {dtype}"


def wrong_type(what: str, declared: DType, col: np.ndarray) -> InvalidArgumentError:
    """The error for a column whose values are not of `what`'s declared type: names both types
    in the protocol's DType names and what to send instead."""
    return InvalidArgumentError(
        f"{what} is declared {declared.name} but the column holds {sent_type(col.dtype)} "
        f"values; send {_SEND[declared]}"
    )
