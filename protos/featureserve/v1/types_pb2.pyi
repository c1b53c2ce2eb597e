from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    FLOAT64: _ClassVar[DType]
    INT64: _ClassVar[DType]
    BOOL: _ClassVar[DType]
    STRING: _ClassVar[DType]
    FLOAT32_VECTOR: _ClassVar[DType]

class FeatureStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FEATURE_STATUS_UNSPECIFIED: _ClassVar[FeatureStatus]
    PRESENT: _ClassVar[FeatureStatus]
    NOT_FOUND: _ClassVar[FeatureStatus]
    NULL_VALUE: _ClassVar[FeatureStatus]
    OUTSIDE_MAX_AGE: _ClassVar[FeatureStatus]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
FLOAT64: DType
INT64: DType
BOOL: DType
STRING: DType
FLOAT32_VECTOR: DType
FEATURE_STATUS_UNSPECIFIED: FeatureStatus
PRESENT: FeatureStatus
NOT_FOUND: FeatureStatus
NULL_VALUE: FeatureStatus
OUTSIDE_MAX_AGE: FeatureStatus

class Array(_message.Message):
    __slots__ = ("dtype", "rows", "width", "vector_length", "data", "offsets", "nulls")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    VECTOR_LENGTH_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    OFFSETS_FIELD_NUMBER: _ClassVar[int]
    NULLS_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    rows: int
    width: int
    vector_length: int
    data: bytes
    offsets: bytes
    nulls: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., rows: _Optional[int] = ..., width: _Optional[int] = ..., vector_length: _Optional[int] = ..., data: _Optional[bytes] = ..., offsets: _Optional[bytes] = ..., nulls: _Optional[bytes] = ...) -> None: ...

class NamedArray(_message.Message):
    __slots__ = ("name", "values")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    name: str
    values: Array
    def __init__(self, name: _Optional[str] = ..., values: _Optional[_Union[Array, _Mapping]] = ...) -> None: ...

class FeatureBlock(_message.Message):
    __slots__ = ("features", "values", "statuses")
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    STATUSES_FIELD_NUMBER: _ClassVar[int]
    features: _containers.RepeatedScalarFieldContainer[str]
    values: Array
    statuses: bytes
    def __init__(self, features: _Optional[_Iterable[str]] = ..., values: _Optional[_Union[Array, _Mapping]] = ..., statuses: _Optional[bytes] = ...) -> None: ...

class RowError(_message.Message):
    __slots__ = ("row", "column", "reason", "batch")
    ROW_FIELD_NUMBER: _ClassVar[int]
    COLUMN_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    row: int
    column: str
    reason: str
    batch: int
    def __init__(self, row: _Optional[int] = ..., column: _Optional[str] = ..., reason: _Optional[str] = ..., batch: _Optional[int] = ...) -> None: ...
