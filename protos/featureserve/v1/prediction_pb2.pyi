from protos.featureserve.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RowStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROW_STATUS_UNSPECIFIED: _ClassVar[RowStatus]
    OK: _ClassVar[RowStatus]
    FAILED: _ClassVar[RowStatus]
ROW_STATUS_UNSPECIFIED: RowStatus
OK: RowStatus
FAILED: RowStatus

class PredictRequest(_message.Message):
    __slots__ = ("model", "model_version", "entity_keys", "request_values", "request_id", "outputs")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ENTITY_KEYS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_VALUES_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    model: str
    model_version: str
    entity_keys: _containers.RepeatedCompositeFieldContainer[_types_pb2.NamedArray]
    request_values: _containers.RepeatedCompositeFieldContainer[_types_pb2.NamedArray]
    request_id: str
    outputs: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model: _Optional[str] = ..., model_version: _Optional[str] = ..., entity_keys: _Optional[_Iterable[_Union[_types_pb2.NamedArray, _Mapping]]] = ..., request_values: _Optional[_Iterable[_Union[_types_pb2.NamedArray, _Mapping]]] = ..., request_id: _Optional[str] = ..., outputs: _Optional[_Iterable[str]] = ...) -> None: ...

class FeatureFill(_message.Message):
    __slots__ = ("feature", "statuses", "filled_with")
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    STATUSES_FIELD_NUMBER: _ClassVar[int]
    FILLED_WITH_FIELD_NUMBER: _ClassVar[int]
    feature: str
    statuses: bytes
    filled_with: str
    def __init__(self, feature: _Optional[str] = ..., statuses: _Optional[bytes] = ..., filled_with: _Optional[str] = ...) -> None: ...

class Lineage(_message.Message):
    __slots__ = ("model_version", "feature_views", "oldest_event_timestamps", "fills", "feature_service", "feature_view_aliases")
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    FEATURE_VIEWS_FIELD_NUMBER: _ClassVar[int]
    OLDEST_EVENT_TIMESTAMPS_FIELD_NUMBER: _ClassVar[int]
    FILLS_FIELD_NUMBER: _ClassVar[int]
    FEATURE_SERVICE_FIELD_NUMBER: _ClassVar[int]
    FEATURE_VIEW_ALIASES_FIELD_NUMBER: _ClassVar[int]
    model_version: str
    feature_views: _containers.RepeatedScalarFieldContainer[str]
    oldest_event_timestamps: bytes
    fills: _containers.RepeatedCompositeFieldContainer[FeatureFill]
    feature_service: str
    feature_view_aliases: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model_version: _Optional[str] = ..., feature_views: _Optional[_Iterable[str]] = ..., oldest_event_timestamps: _Optional[bytes] = ..., fills: _Optional[_Iterable[_Union[FeatureFill, _Mapping]]] = ..., feature_service: _Optional[str] = ..., feature_view_aliases: _Optional[_Iterable[str]] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("request_id", "model", "rows", "outputs", "row_statuses", "row_errors", "lineage", "error_code", "error_message")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    ROW_STATUSES_FIELD_NUMBER: _ClassVar[int]
    ROW_ERRORS_FIELD_NUMBER: _ClassVar[int]
    LINEAGE_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    rows: int
    outputs: _containers.RepeatedCompositeFieldContainer[_types_pb2.NamedArray]
    row_statuses: bytes
    row_errors: _containers.RepeatedCompositeFieldContainer[_types_pb2.RowError]
    lineage: Lineage
    error_code: int
    error_message: str
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., rows: _Optional[int] = ..., outputs: _Optional[_Iterable[_Union[_types_pb2.NamedArray, _Mapping]]] = ..., row_statuses: _Optional[bytes] = ..., row_errors: _Optional[_Iterable[_Union[_types_pb2.RowError, _Mapping]]] = ..., lineage: _Optional[_Union[Lineage, _Mapping]] = ..., error_code: _Optional[int] = ..., error_message: _Optional[str] = ...) -> None: ...
