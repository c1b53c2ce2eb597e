from protos.featureserve.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class BatchPolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REJECT_BATCH: _ClassVar[BatchPolicy]
    SKIP_BAD_ROWS: _ClassVar[BatchPolicy]
REJECT_BATCH: BatchPolicy
SKIP_BAD_ROWS: BatchPolicy

class JoinKey(_message.Message):
    __slots__ = ("name", "dtype")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: _types_pb2.DType
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[_types_pb2.DType, str]] = ...) -> None: ...

class Entity(_message.Message):
    __slots__ = ("name", "join_keys", "description")
    NAME_FIELD_NUMBER: _ClassVar[int]
    JOIN_KEYS_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    join_keys: _containers.RepeatedCompositeFieldContainer[JoinKey]
    description: str
    def __init__(self, name: _Optional[str] = ..., join_keys: _Optional[_Iterable[_Union[JoinKey, _Mapping]]] = ..., description: _Optional[str] = ...) -> None: ...

class FeatureSpec(_message.Message):
    __slots__ = ("name", "dtype", "vector_length", "description", "allow_nan")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    VECTOR_LENGTH_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    ALLOW_NAN_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: _types_pb2.DType
    vector_length: int
    description: str
    allow_nan: bool
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[_types_pb2.DType, str]] = ..., vector_length: _Optional[int] = ..., description: _Optional[str] = ..., allow_nan: bool = ...) -> None: ...

class FeatureView(_message.Message):
    __slots__ = ("name", "version", "entity", "features", "ttl_seconds", "description", "owner", "tags", "created_us", "updated_us", "ttl_history")
    class TagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ENTITY_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    CREATED_US_FIELD_NUMBER: _ClassVar[int]
    UPDATED_US_FIELD_NUMBER: _ClassVar[int]
    TTL_HISTORY_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    entity: str
    features: _containers.RepeatedCompositeFieldContainer[FeatureSpec]
    ttl_seconds: int
    description: str
    owner: str
    tags: _containers.ScalarMap[str, str]
    created_us: int
    updated_us: int
    ttl_history: _containers.RepeatedCompositeFieldContainer[TtlChange]
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., entity: _Optional[str] = ..., features: _Optional[_Iterable[_Union[FeatureSpec, _Mapping]]] = ..., ttl_seconds: _Optional[int] = ..., description: _Optional[str] = ..., owner: _Optional[str] = ..., tags: _Optional[_Mapping[str, str]] = ..., created_us: _Optional[int] = ..., updated_us: _Optional[int] = ..., ttl_history: _Optional[_Iterable[_Union[TtlChange, _Mapping]]] = ...) -> None: ...

class TtlChange(_message.Message):
    __slots__ = ("since_us", "ttl_seconds")
    SINCE_US_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    since_us: int
    ttl_seconds: int
    def __init__(self, since_us: _Optional[int] = ..., ttl_seconds: _Optional[int] = ...) -> None: ...

class FeatureService(_message.Message):
    __slots__ = ("name", "features", "description", "owner", "tags", "created_us", "updated_us", "projections")
    class TagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    CREATED_US_FIELD_NUMBER: _ClassVar[int]
    UPDATED_US_FIELD_NUMBER: _ClassVar[int]
    PROJECTIONS_FIELD_NUMBER: _ClassVar[int]
    name: str
    features: _containers.RepeatedScalarFieldContainer[str]
    description: str
    owner: str
    tags: _containers.ScalarMap[str, str]
    created_us: int
    updated_us: int
    projections: _containers.RepeatedCompositeFieldContainer[FeatureProjection]
    def __init__(self, name: _Optional[str] = ..., features: _Optional[_Iterable[str]] = ..., description: _Optional[str] = ..., owner: _Optional[str] = ..., tags: _Optional[_Mapping[str, str]] = ..., created_us: _Optional[int] = ..., updated_us: _Optional[int] = ..., projections: _Optional[_Iterable[_Union[FeatureProjection, _Mapping]]] = ...) -> None: ...

class FeatureProjection(_message.Message):
    __slots__ = ("view", "alias", "features", "join_key_map")
    class JoinKeyMapEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    VIEW_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    JOIN_KEY_MAP_FIELD_NUMBER: _ClassVar[int]
    view: str
    alias: str
    features: _containers.RepeatedScalarFieldContainer[str]
    join_key_map: _containers.ScalarMap[str, str]
    def __init__(self, view: _Optional[str] = ..., alias: _Optional[str] = ..., features: _Optional[_Iterable[str]] = ..., join_key_map: _Optional[_Mapping[str, str]] = ...) -> None: ...

class GetOnlineFeaturesRequest(_message.Message):
    __slots__ = ("entity_keys", "features", "feature_service")
    ENTITY_KEYS_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    FEATURE_SERVICE_FIELD_NUMBER: _ClassVar[int]
    entity_keys: _containers.RepeatedCompositeFieldContainer[_types_pb2.NamedArray]
    features: _containers.RepeatedScalarFieldContainer[str]
    feature_service: str
    def __init__(self, entity_keys: _Optional[_Iterable[_Union[_types_pb2.NamedArray, _Mapping]]] = ..., features: _Optional[_Iterable[str]] = ..., feature_service: _Optional[str] = ...) -> None: ...

class ViewResult(_message.Message):
    __slots__ = ("view", "version", "event_timestamps", "blocks", "projection_of")
    VIEW_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    EVENT_TIMESTAMPS_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    PROJECTION_OF_FIELD_NUMBER: _ClassVar[int]
    view: str
    version: int
    event_timestamps: bytes
    blocks: _containers.RepeatedCompositeFieldContainer[_types_pb2.FeatureBlock]
    projection_of: str
    def __init__(self, view: _Optional[str] = ..., version: _Optional[int] = ..., event_timestamps: _Optional[bytes] = ..., blocks: _Optional[_Iterable[_Union[_types_pb2.FeatureBlock, _Mapping]]] = ..., projection_of: _Optional[str] = ...) -> None: ...

class GetOnlineFeaturesResponse(_message.Message):
    __slots__ = ("rows", "views")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    VIEWS_FIELD_NUMBER: _ClassVar[int]
    rows: int
    views: _containers.RepeatedCompositeFieldContainer[ViewResult]
    def __init__(self, rows: _Optional[int] = ..., views: _Optional[_Iterable[_Union[ViewResult, _Mapping]]] = ...) -> None: ...

class WriteFeaturesRequest(_message.Message):
    __slots__ = ("view", "version", "entity_keys", "event_timestamps", "blocks", "policy")
    VIEW_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ENTITY_KEYS_FIELD_NUMBER: _ClassVar[int]
    EVENT_TIMESTAMPS_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    view: str
    version: int
    entity_keys: _containers.RepeatedCompositeFieldContainer[_types_pb2.NamedArray]
    event_timestamps: bytes
    blocks: _containers.RepeatedCompositeFieldContainer[_types_pb2.FeatureBlock]
    policy: BatchPolicy
    def __init__(self, view: _Optional[str] = ..., version: _Optional[int] = ..., entity_keys: _Optional[_Iterable[_Union[_types_pb2.NamedArray, _Mapping]]] = ..., event_timestamps: _Optional[bytes] = ..., blocks: _Optional[_Iterable[_Union[_types_pb2.FeatureBlock, _Mapping]]] = ..., policy: _Optional[_Union[BatchPolicy, str]] = ...) -> None: ...

class WriteFeaturesResponse(_message.Message):
    __slots__ = ("rows_written", "rows_stale", "rows_rejected", "errors")
    ROWS_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    ROWS_STALE_FIELD_NUMBER: _ClassVar[int]
    ROWS_REJECTED_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    rows_written: int
    rows_stale: int
    rows_rejected: int
    errors: _containers.RepeatedCompositeFieldContainer[_types_pb2.RowError]
    def __init__(self, rows_written: _Optional[int] = ..., rows_stale: _Optional[int] = ..., rows_rejected: _Optional[int] = ..., errors: _Optional[_Iterable[_Union[_types_pb2.RowError, _Mapping]]] = ...) -> None: ...

class ListFeatureViewsRequest(_message.Message):
    __slots__ = ("name_prefix", "all_versions")
    NAME_PREFIX_FIELD_NUMBER: _ClassVar[int]
    ALL_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    name_prefix: str
    all_versions: bool
    def __init__(self, name_prefix: _Optional[str] = ..., all_versions: bool = ...) -> None: ...

class ListFeatureViewsResponse(_message.Message):
    __slots__ = ("views", "entities")
    VIEWS_FIELD_NUMBER: _ClassVar[int]
    ENTITIES_FIELD_NUMBER: _ClassVar[int]
    views: _containers.RepeatedCompositeFieldContainer[FeatureView]
    entities: _containers.RepeatedCompositeFieldContainer[Entity]
    def __init__(self, views: _Optional[_Iterable[_Union[FeatureView, _Mapping]]] = ..., entities: _Optional[_Iterable[_Union[Entity, _Mapping]]] = ...) -> None: ...

class GetFeatureViewRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class DeleteFeatureViewRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class DeleteFeatureViewResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ApplyFeatureViewsRequest(_message.Message):
    __slots__ = ("entities", "views", "dry_run", "feature_services", "prune")
    ENTITIES_FIELD_NUMBER: _ClassVar[int]
    VIEWS_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    FEATURE_SERVICES_FIELD_NUMBER: _ClassVar[int]
    PRUNE_FIELD_NUMBER: _ClassVar[int]
    entities: _containers.RepeatedCompositeFieldContainer[Entity]
    views: _containers.RepeatedCompositeFieldContainer[FeatureView]
    dry_run: bool
    feature_services: _containers.RepeatedCompositeFieldContainer[FeatureService]
    prune: bool
    def __init__(self, entities: _Optional[_Iterable[_Union[Entity, _Mapping]]] = ..., views: _Optional[_Iterable[_Union[FeatureView, _Mapping]]] = ..., dry_run: bool = ..., feature_services: _Optional[_Iterable[_Union[FeatureService, _Mapping]]] = ..., prune: bool = ...) -> None: ...

class ApplyResult(_message.Message):
    __slots__ = ("view", "version", "action", "feature_service", "entity")
    class Action(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        ACTION_UNSPECIFIED: _ClassVar[ApplyResult.Action]
        CREATED: _ClassVar[ApplyResult.Action]
        UPDATED: _ClassVar[ApplyResult.Action]
        UNCHANGED: _ClassVar[ApplyResult.Action]
        DELETED: _ClassVar[ApplyResult.Action]
    ACTION_UNSPECIFIED: ApplyResult.Action
    CREATED: ApplyResult.Action
    UPDATED: ApplyResult.Action
    UNCHANGED: ApplyResult.Action
    DELETED: ApplyResult.Action
    VIEW_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    FEATURE_SERVICE_FIELD_NUMBER: _ClassVar[int]
    ENTITY_FIELD_NUMBER: _ClassVar[int]
    view: str
    version: int
    action: ApplyResult.Action
    feature_service: str
    entity: str
    def __init__(self, view: _Optional[str] = ..., version: _Optional[int] = ..., action: _Optional[_Union[ApplyResult.Action, str]] = ..., feature_service: _Optional[str] = ..., entity: _Optional[str] = ...) -> None: ...

class ApplyFeatureViewsResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ApplyResult]
    def __init__(self, results: _Optional[_Iterable[_Union[ApplyResult, _Mapping]]] = ...) -> None: ...

class ListFeatureServicesRequest(_message.Message):
    __slots__ = ("name_prefix",)
    NAME_PREFIX_FIELD_NUMBER: _ClassVar[int]
    name_prefix: str
    def __init__(self, name_prefix: _Optional[str] = ...) -> None: ...

class ListFeatureServicesResponse(_message.Message):
    __slots__ = ("feature_services",)
    FEATURE_SERVICES_FIELD_NUMBER: _ClassVar[int]
    feature_services: _containers.RepeatedCompositeFieldContainer[FeatureService]
    def __init__(self, feature_services: _Optional[_Iterable[_Union[FeatureService, _Mapping]]] = ...) -> None: ...

class GetFeatureServiceRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteFeatureServiceRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteFeatureServiceResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
