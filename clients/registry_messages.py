"""Convert registry definitions (featurestore.registry dataclasses: entities, feature views and
feature services) to and from protobuf.

Both the server's registry RPCs and the client's `apply` use this, so a definition reads
the same on both sides of the wire.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from featurestore.dtypes import DType
from featurestore.errors import InvalidArgumentError
from featurestore.registry import (
    KEY_DTYPES,
    ApplyResult,
    Entity,
    Feature,
    FeatureProjection,
    FeatureService,
    FeatureView,
    JoinKey,
)
from protos.featureserve.v1 import feature_store_pb2 as pb

ACTIONS = {
    "created": pb.ApplyResult.CREATED,
    "updated": pb.ApplyResult.UPDATED,
    "unchanged": pb.ApplyResult.UNCHANGED,
    "deleted": pb.ApplyResult.DELETED,
}
ACTION_NAMES = {number: name for name, number in ACTIONS.items()}
UINT32 = (0, 2**32 - 1)
INT64 = (-(2**63), 2**63 - 1)


def _dtype(number: int, field: str, allowed: tuple[DType, ...] = tuple(DType)) -> DType:
    """A featurestore DType from a wire number; 0, unknown or not `allowed` is an error naming
    the field and the dtypes it takes."""
    try:
        dtype = DType(number)
    except ValueError:
        dtype = None
    if dtype not in allowed:
        raise InvalidArgumentError(
            f"{field}: dtype {number} is not one of " + ", ".join(d.name for d in allowed)
        )
    return dtype


def _fits(value: int, bounds: tuple[int, int], field: str) -> int:
    """`value` if its wire field holds it; else InvalidArgumentError naming the field (protobuf
    would raise a bare "Value out of range")."""
    low, high = bounds
    if not low <= value <= high:
        raise InvalidArgumentError(
            f"{field}: {value} is outside {low} to {high}; give a value in that range"
        )
    return value


def entity_to_proto(entity: Entity) -> pb.Entity:
    """Entity -> featureserve.v1.Entity."""
    return pb.Entity(
        name=entity.name,
        join_keys=[pb.JoinKey(name=k.name, dtype=int(k.dtype)) for k in entity.join_keys],
        description=entity.description,
    )


def entity_from_proto(msg: pb.Entity, field: str = "entity") -> Entity:
    """featureserve.v1.Entity -> Entity."""
    return Entity(
        name=msg.name,
        join_keys=tuple(
            JoinKey(k.name, _dtype(k.dtype, f"{field}.join_keys[{i}]", KEY_DTYPES))
            for i, k in enumerate(msg.join_keys)
        ),
        description=msg.description,
    )


def view_to_proto(view: FeatureView) -> pb.FeatureView:
    """FeatureView -> featureserve.v1.FeatureView; InvalidArgumentError naming a number its
    field cannot hold. A stored view (created_us set) carries its ttl_changes(); a definition
    not yet applied has no TTL history to send."""
    where = f"feature view {view.name!r}"
    changes = view.ttl_changes() if view.created_us else ()
    return pb.FeatureView(
        name=view.name,
        version=_fits(view.version, UINT32, f"{where}: version"),
        entity=view.entity,
        features=[
            pb.FeatureSpec(
                name=f.name,
                dtype=int(f.dtype),
                vector_length=_fits(
                    f.vector_length, UINT32, f"{where} feature {f.name!r}: vector_length"
                ),
                description=f.description,
                allow_nan=f.allow_nan,
            )
            for f in view.features
        ],
        ttl_seconds=_fits(view.ttl_seconds, INT64, f"{where}: ttl_seconds"),
        description=view.description,
        owner=view.owner,
        tags=dict(view.tags),
        created_us=_fits(view.created_us, INT64, f"{where}: created_us"),
        updated_us=_fits(view.updated_us, INT64, f"{where}: updated_us"),
        ttl_history=[
            pb.TtlChange(
                since_us=_fits(since, INT64, f"{where}: ttl_history since_us"),
                ttl_seconds=_fits(ttl, INT64, f"{where}: ttl_history ttl_seconds"),
            )
            for since, ttl in changes
        ],
    )


def view_from_proto(msg: pb.FeatureView, field: str = "view") -> FeatureView:
    """featureserve.v1.FeatureView -> FeatureView. The output-only fields (created_us,
    updated_us, ttl_history) are carried over for readers; Registry.apply ignores them."""
    return FeatureView(
        name=msg.name,
        entity=msg.entity,
        features=tuple(
            Feature(
                name=f.name,
                dtype=_dtype(f.dtype, f"{field}.features[{i}]"),
                vector_length=f.vector_length,
                description=f.description,
                allow_nan=f.allow_nan,
            )
            for i, f in enumerate(msg.features)
        ),
        version=msg.version,
        ttl_seconds=msg.ttl_seconds,
        description=msg.description,
        owner=msg.owner,
        tags=dict(msg.tags),
        created_us=msg.created_us,
        updated_us=msg.updated_us,
        ttl_history=tuple((c.since_us, c.ttl_seconds) for c in msg.ttl_history),
    )


def service_to_proto(service: FeatureService) -> pb.FeatureService:
    """FeatureService -> featureserve.v1.FeatureService; TypeError naming the field when
    features is one string (it would go as one reference per character) or no list, tags hold
    a non-string, or a projection a wrong type (protobuf's own error names nothing)."""
    where = f"feature service {service.name!r}"
    if isinstance(service.features, str):
        raise TypeError(
            f"{where}: features is the str {service.features!r}; give a list of references, "
            f"e.g. ({service.features!r},)"
        )
    if not isinstance(service.features, Iterable):
        raise TypeError(
            f"{where}: features is {service.features!r:.80}; give a list of references "
            "(empty when projections are given)"
        )
    for key, value in dict(service.tags).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"{where}: tags[{key!r}] = {value!r}; tags map str to str")
    return pb.FeatureService(
        name=service.name,
        features=list(service.features),
        description=service.description,
        owner=service.owner,
        tags=dict(service.tags),
        created_us=_fits(service.created_us, INT64, f"{where}: created_us"),
        updated_us=_fits(service.updated_us, INT64, f"{where}: updated_us"),
        projections=[
            _projection_to_proto(p, f"{where}: projections[{j}]")
            for j, p in enumerate(
                _listed(service.projections, FeatureProjection, f"{where}: projections")
            )
        ],
    )


def _projection_to_proto(projection: FeatureProjection, where: str) -> pb.FeatureProjection:
    """FeatureProjection -> featureserve.v1.FeatureProjection; TypeError naming the field
    (`where`.view, .alias, .features, .join_key_map) when it holds the wrong type: protobuf's
    own error names nothing, and a None view or alias would go as ''."""
    for name in ("view", "alias"):
        value = getattr(projection, name)
        if not isinstance(value, str):
            raise TypeError(f"{where}.{name}: expected str, got {type(value).__name__} {value!r}")
    features = projection.features
    if isinstance(features, str):
        raise TypeError(
            f"{where}.features: the str {features!r}; give a list of feature names, e.g. "
            f"({features!r},)"
        )
    if not isinstance(features, list | tuple) or not all(isinstance(f, str) for f in features):
        raise TypeError(
            f"{where}.features: {features!r:.80}; give a list of feature names (empty: every "
            "feature)"
        )
    key_map = projection.join_key_map
    if not isinstance(key_map, Mapping):
        raise TypeError(
            f"{where}.join_key_map: {key_map!r:.80}; give a dict of join key -> request column "
            "(empty: every join key read from the column of its own name)"
        )
    for key, column in key_map.items():
        if not isinstance(key, str) or not isinstance(column, str):
            raise TypeError(
                f"{where}.join_key_map[{key!r}] = {column!r}; it maps a join key to a "
                "request column, str to str"
            )
    return pb.FeatureProjection(
        view=projection.view,
        alias=projection.alias,
        features=list(projection.features),
        join_key_map=dict(projection.join_key_map),
    )


def service_from_proto(msg: pb.FeatureService) -> FeatureService:
    """featureserve.v1.FeatureService -> FeatureService. The output-only times are carried
    over for readers; Registry.apply ignores them."""
    return FeatureService(
        name=msg.name,
        features=tuple(msg.features),
        description=msg.description,
        owner=msg.owner,
        tags=dict(msg.tags),
        created_us=msg.created_us,
        updated_us=msg.updated_us,
        projections=tuple(
            FeatureProjection(p.view, p.alias, tuple(p.features), dict(p.join_key_map))
            for p in msg.projections
        ),
    )


def apply_result_to_proto(result: ApplyResult) -> pb.ApplyResult:
    """ApplyResult -> featureserve.v1.ApplyResult."""
    return pb.ApplyResult(
        view=result.view,
        version=result.version,
        action=ACTIONS[result.action],
        feature_service=result.feature_service,
        entity=result.entity,
    )


def apply_result_from_proto(msg: pb.ApplyResult) -> ApplyResult:
    """featureserve.v1.ApplyResult -> ApplyResult."""
    return ApplyResult(
        view=msg.view,
        version=msg.version,
        action=ACTION_NAMES[msg.action],
        feature_service=msg.feature_service,
        entity=msg.entity,
    )


def apply_request(
    entities: Sequence[Entity],
    views: Sequence[FeatureView],
    dry_run: bool = False,
    feature_services: Sequence[FeatureService] = (),
    prune: bool = False,
) -> pb.ApplyFeatureViewsRequest:
    """An ApplyFeatureViews request (prune: delete what it does not declare); TypeError naming
    the argument when one is not a list of its definitions (a single FeatureService, or a
    name, where a list belongs)."""
    return pb.ApplyFeatureViewsRequest(
        entities=[entity_to_proto(e) for e in _listed(entities, Entity, "entities")],
        views=[view_to_proto(v) for v in _listed(views, FeatureView, "views")],
        dry_run=dry_run,
        feature_services=[
            service_to_proto(s)
            for s in _listed(feature_services, FeatureService, "feature_services")
        ],
        prune=prune,
    )


def _listed(items: object, kind: type, argument: str) -> list:
    """`items` as a list of `kind`, or TypeError naming the argument and the bad item."""
    if isinstance(items, (kind, str, bytes)) or not isinstance(items, Iterable):
        raise TypeError(f"{argument}: give a list of {kind.__name__}, got {items!r:.80}")
    listed = list(items)
    for i, item in enumerate(listed):
        if not isinstance(item, kind):
            raise TypeError(
                f"{argument}[{i}]: expected a {kind.__name__}, got {type(item).__name__} "
                f"{item!r:.80}"
            )
    return listed
