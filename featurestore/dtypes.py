"""Feature value types and per-value statuses; the numbers equal featureserve.v1's proto enums."""

from enum import IntEnum

import numpy as np


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
