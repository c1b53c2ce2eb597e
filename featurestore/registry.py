"""Entities, versioned feature views and feature services, stored in the online store's LMDB
environment.

Definitions live in their own named database; a generation counter bumped by every apply and
delete lets each process keep a parsed in-memory cache and refresh it with one cheap `get`.
A view version's created_us identifies its definition: an in-place update keeps it, and a
version deleted and created again gets a later one (creation times never repeat).
"""

from __future__ import annotations

import bisect
import difflib
import json
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Protocol, TypeVar

import lmdb

from featurestore.dtypes import DType
from featurestore.errors import (
    MAX_SUGGESTIONS,
    ConflictError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
    quoted,
)
from featurestore.feature_refs import ViewKey, parse_feature_refs, split_ref

T = TypeVar("T")

REGISTRY_DB = b"__registry__"
_GENERATION = b"gen"
_LAST_CREATED = b"created"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
KEY_DTYPES = (DType.INT64, DType.STRING)
MAX_NAME_BYTES = 255
"""Longest name of an entity, join key, view or feature (as for models): a view's registry key
and database names must fit LMDB's 511-byte key limit."""
MAX_FEATURES = 65_535
"""Most features of one view: a packed row records its feature count in 16 bits."""
MAX_VECTOR_FLOATS = 1_048_576
"""Most floats the FLOAT32_VECTOR features of one view hold per row together (4 MiB), so a
lookup's answer grows by at most that per entity."""
MAX_COMPARED_NAMES = 1000
"""Registered names a NotFoundError's suggestions compare the missing name with (~25 µs each):
with more, those beside it in sorted order, so a typo stays cheap to answer on the event loop."""


@dataclass(frozen=True)
class JoinKey:
    """One column of an entity's key; dtype is INT64 or STRING."""

    name: str
    dtype: DType


@dataclass(frozen=True)
class Entity:
    """What features describe (a user, a driver); composite keys have several join keys."""

    name: str
    join_keys: tuple[JoinKey, ...]
    description: str = ""


@dataclass(frozen=True)
class Feature:
    """One feature of a view; vector_length > 0 only for FLOAT32_VECTOR."""

    name: str
    dtype: DType
    vector_length: int = 0
    description: str = ""
    allow_nan: bool = False


@dataclass(frozen=True)
class FeatureView:
    """A versioned group of features of one entity, written and read together.

    tags is a plain dict (not hashed or compared by identity; treat it as read-only).
    version 0 in `Registry.apply` means "the registry decides"; stored views have version >= 1.
    ttl_history is kept by the registry (apply ignores what it is given): (from_us, ttl_seconds)
    of each TTL this version has had, oldest first; it is left out of equality, so re-applying
    a definition stays "unchanged". Read it through ttl_changes().
    """

    name: str
    entity: str
    features: tuple[Feature, ...]
    version: int = 0
    ttl_seconds: int = 0
    description: str = ""
    owner: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    created_us: int = 0
    updated_us: int = 0
    ttl_history: tuple[tuple[int, int], ...] = field(default=(), compare=False)

    def ttl_changes(self) -> tuple[tuple[int, int], ...]:
        """(from_us, ttl_seconds) of each TTL this version has had, oldest first: the TTL in
        force from from_us on. A record written before the history was kept (none stored) has
        had its current TTL since created_us."""
        return self.ttl_history or ((self.created_us, self.ttl_seconds),)

    @cached_property
    def _by_name(self) -> dict[str, Feature]:
        return {feat.name: feat for feat in self.features}

    def feature(self, name: str) -> Feature:
        """The feature called `name`, or NotFoundError suggesting the closest features."""
        found = self._by_name.get(name)
        if found is not None:
            return found
        raise NotFoundError(
            f"feature {quoted(name)} is not in view {self.name!r} v{self.version}",
            "feature",
            close_names(name, sorted(self._by_name)),
            "GetFeatureView lists its features",
        )


def close_names(name: str, known: Sequence[str]) -> list[str]:
    """The names of `known` (sorted) closest to `name`, best first, compared with at most
    MAX_COMPARED_NAMES of them: what a NotFoundError suggests."""
    if len(known) > MAX_COMPARED_NAMES:
        start = bisect.bisect(known, name) - MAX_COMPARED_NAMES // 2
        start = min(max(start, 0), len(known) - MAX_COMPARED_NAMES)
        known = known[start : start + MAX_COMPARED_NAMES]
    # no registered name is longer than MAX_NAME_BYTES: comparing more of `name` adds nothing
    return difflib.get_close_matches(name[:MAX_NAME_BYTES], known, n=max(len(known), 1))


@dataclass(frozen=True)
class FeatureProjection:
    """One view read by a feature service under an alias, keyed by request columns of its own
    (Feast's with_name / with_join_key_map): a service can read one view twice, e.g. the
    origin's and the destination's location stats. view is "view" (the latest at each lookup)
    or "view@2"; features () reads every feature; join_key_map maps a join key of the view's
    entity to the request column that carries it (keys not mapped keep their own name). Results
    carry the alias where a plain read carries the view's name. join_key_map is a plain dict;
    treat it as read-only."""

    view: str
    alias: str
    features: tuple[str, ...] = ()
    join_key_map: dict[str, str] = field(default_factory=dict)

    @cached_property
    def view_key(self) -> ViewKey:
        """(view, version) of `view`; version 0 is the latest."""
        name, _, version = self.view.partition("@")
        return name, int(version or 0)

    def column(self, join_key: str) -> str:
        """The request column that carries `join_key` for this projection."""
        return self.join_key_map.get(join_key, join_key)


@dataclass(frozen=True)
class FeatureService:
    """A named set of feature references read together (Feast's FeatureService): a model's
    features, looked up by one name. References are GetOnlineFeatures' ("view:feature", "view",
    "view@2:feature", "view@2"); one without a version reads the latest at each lookup.
    Projections read views under an alias by request columns of their own. The registry keeps
    every stored service resolvable: each view at one version, each feature named once and
    present in the version it reads. tags is a plain dict; treat it as read-only."""

    name: str
    features: tuple[str, ...]
    description: str = ""
    owner: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    created_us: int = field(default=0, compare=False)
    updated_us: int = field(default=0, compare=False)
    projections: tuple[FeatureProjection, ...] = ()

    @cached_property
    def reads(self) -> dict[ViewKey, list[str] | None]:
        """The references grouped by (view, version) as parse_feature_refs groups them: what a
        lookup by this service reads, parsed once per stored definition (its projections are
        read besides)."""
        return parse_feature_refs(list(self.features))

    @cached_property
    def view_names(self) -> frozenset[str]:
        """Every view the service reads, by a reference or a projection: what a caller must
        see to see the service."""
        return frozenset(
            [name for name, _ in self.reads] + [p.view_key[0] for p in self.projections]
        )


@dataclass(frozen=True)
class ApplyResult:
    """What apply did to one view, or to one feature service (feature_service set, view empty
    and version 0): action is "created", "updated" or "unchanged"; or what a prune deleted
    (action "deleted"): a view version, a feature service, or an entity (entity set)."""

    view: str
    version: int
    action: str
    feature_service: str = ""
    entity: str = ""


class TxnSource(Protocol):
    """The slice of the LMDB environment wrapper the registry needs (see online_store.LmdbEnv)."""

    def read_txn(self) -> AbstractContextManager[lmdb.Transaction]: ...

    def run_write(self, fn: Callable[[lmdb.Transaction], T], *, exclusive: bool = False) -> T: ...

    def registry_db(self) -> lmdb._Database: ...

    def db_in_write(self, name: bytes, txn: lmdb.Transaction) -> lmdb._Database: ...

    def drop_db(self, name: bytes, txn: lmdb.Transaction) -> None: ...


def view_db_name(name: str, version: int) -> bytes:
    """The named LMDB database that holds the online rows of one view version."""
    return f"v:{name}@{version}".encode()


def history_db_name(name: str, version: int) -> bytes:
    """The named LMDB database holding the history log of one view version."""
    return f"h:{name}@{version}".encode()


def _entity_key(name: str) -> bytes:
    return b"e\x00" + name.encode()


def _view_key(name: str, version: int) -> bytes:
    return b"v\x00" + name.encode() + b"\x00" + version.to_bytes(4, "big")


def _service_key(name: str) -> bytes:
    return b"s\x00" + name.encode()


def _result_key(deleted: ApplyResult) -> bytes:
    """The registry key of what a "deleted" result names."""
    if deleted.entity:
        return _entity_key(deleted.entity)
    if deleted.feature_service:
        return _service_key(deleted.feature_service)
    return _view_key(deleted.view, deleted.version)


def _entity_to_json(entity: Entity) -> bytes:
    return json.dumps(
        {
            "name": entity.name,
            "join_keys": [[k.name, int(k.dtype)] for k in entity.join_keys],
            "description": entity.description,
        }
    ).encode()


def _entity_from_json(raw: bytes) -> Entity:
    d = json.loads(raw)
    keys = tuple(JoinKey(name, DType(dtype)) for name, dtype in d["join_keys"])
    return Entity(d["name"], keys, d["description"])


def _view_to_json(view: FeatureView) -> bytes:
    d = {
        "name": view.name,
        "entity": view.entity,
        "version": view.version,
        "ttl_seconds": view.ttl_seconds,
        "description": view.description,
        "owner": view.owner,
        "tags": dict(view.tags),
        "created_us": view.created_us,
        "updated_us": view.updated_us,
        "ttl_history": [list(change) for change in view.ttl_history],
        "features": [
            [f.name, int(f.dtype), f.vector_length, f.description, f.allow_nan]
            for f in view.features
        ],
    }
    return json.dumps(d).encode()


def _view_from_json(raw: bytes) -> FeatureView:
    d = json.loads(raw)
    feats = tuple(Feature(n, DType(t), vl, desc, nan) for n, t, vl, desc, nan in d.pop("features"))
    history = tuple((since, ttl) for since, ttl in d.pop("ttl_history", ()))
    return FeatureView(features=feats, ttl_history=history, **d)


def _service_to_json(service: FeatureService) -> bytes:
    """A service's stored record. "projections" is left out when there are none, so a build
    from before projections (whose FeatureService takes no such field) still reads it."""
    d: dict = {
        "name": service.name,
        "features": list(service.features),
        "description": service.description,
        "owner": service.owner,
        "tags": dict(service.tags),
        "created_us": service.created_us,
        "updated_us": service.updated_us,
    }
    if service.projections:
        d["projections"] = [
            [p.view, p.alias, list(p.features), dict(p.join_key_map)] for p in service.projections
        ]
    return json.dumps(d).encode()


def _service_from_json(raw: bytes) -> FeatureService:
    d = json.loads(raw)
    projections = tuple(
        FeatureProjection(view, alias, tuple(features), key_map)
        for view, alias, features, key_map in d.pop("projections", ())
    )
    return FeatureService(features=tuple(d.pop("features")), projections=projections, **d)


def _check_name(kind: str, name: object) -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        shown = quoted(name) if isinstance(name, str) else repr(name)
        raise InvalidArgumentError(
            f"{kind} {shown} is not a valid name: use letters, digits and _, not starting "
            "with a digit"
        )
    if len(name) > MAX_NAME_BYTES:
        raise InvalidArgumentError(
            f"{kind} {name[:40]!r}... is {len(name)} bytes long; use a name of at most "
            f"{MAX_NAME_BYTES} bytes"
        )


def validate_entity(entity: Entity) -> None:
    """Raise InvalidArgumentError naming the bad field of an entity definition."""
    _check_name("entity name", entity.name)
    if not entity.join_keys:
        raise InvalidArgumentError(f"entity {entity.name!r}: join_keys must not be empty")
    seen: set[str] = set()
    for key in entity.join_keys:
        _check_name(f"entity {entity.name!r} join key", key.name)
        if key.name in seen:
            raise InvalidArgumentError(f"entity {entity.name!r}: join key {key.name!r} repeated")
        seen.add(key.name)
        if key.dtype not in KEY_DTYPES:
            raise InvalidArgumentError(
                f"entity {entity.name!r} join key {key.name!r}: dtype must be INT64 or STRING, "
                f"got {_dtype_name(key.dtype)}"
            )


def _dtype_name(dtype: object) -> str:
    """A dtype as a message names it: FLOAT32 (its DType name), else what was given."""
    try:
        return DType(dtype).name
    except (TypeError, ValueError):
        return repr(dtype)


def check_repeats(
    entities: Sequence[Entity],
    views: Sequence[FeatureView],
    entity_field: str = "entities",
    view_field: str = "views",
    services: Sequence[FeatureService] = (),
    service_field: str = "feature_services",
) -> None:
    """InvalidArgumentError naming both positions of an entity or feature service name, or of a
    view name and version, declared twice in one apply (a view with no version, the latest,
    clashes with any other declaration of it): applied in turn, the second would merge silently
    into the first. The fields name the lists as the caller wrote them."""
    _check_names_once([e.name for e in entities], entity_field, "entity")
    _check_names_once([s.name for s in services], service_field, "feature service")
    by_name: dict[str, list[tuple[int, int]]] = {}
    for i, view in enumerate(views):
        declared = by_name.setdefault(view.name, [])
        for first, version in declared:
            # version 0 means "the latest", which may be any version declared beside it
            if version == view.version:
                what = f"version {view.version}" if view.version else "with no version"
                raise InvalidArgumentError(
                    f"{view_field}[{i}]: feature view {quoted(view.name)} {what} is declared "
                    f"again (first at {view_field}[{first}]); declare it once with all its "
                    "features, or give each declaration its own explicit version"
                )
            if 0 in (version, view.version):
                raise InvalidArgumentError(
                    f"{view_field}[{i}]: feature view {quoted(view.name)} is declared "
                    f"{_as_version(view.version)} here and {_as_version(version)} at "
                    f"{view_field}[{first}]; with no version a declaration means the latest, "
                    "which the other one may be: give each declaration its own explicit version"
                )
        declared.append((i, view.version))


def _check_names_once(names: Sequence[str], list_field: str, kind: str) -> None:
    """InvalidArgumentError naming both positions of a name that `names` holds twice."""
    first_at: dict[str, int] = {}
    for i, name in enumerate(names):
        first = first_at.setdefault(name, i)
        if first != i:
            raise InvalidArgumentError(
                f"{list_field}[{i}]: {kind} {quoted(name)} is declared again (first at "
                f"{list_field}[{first}]); declare each {kind} once"
            )


def _as_version(version: int) -> str:
    return f"as version {version}" if version else "with no version"


def validate_view(view: FeatureView, entity: Entity | None) -> None:
    """Raise InvalidArgumentError naming the bad field of a view definition."""
    _check_name("feature view name", view.name)
    where = f"feature view {view.name!r}"
    if entity is None:
        raise InvalidArgumentError(
            f"{where}: entity {view.entity!r} is not registered; apply it with the view"
        )
    if not isinstance(view.version, int) or view.version < 0:
        raise InvalidArgumentError(f"{where}: version must be >= 0, got {view.version!r}")
    if not isinstance(view.ttl_seconds, int) or view.ttl_seconds < 0:
        raise InvalidArgumentError(f"{where}: ttl_seconds must be >= 0, got {view.ttl_seconds!r}")
    if not view.features:
        raise InvalidArgumentError(f"{where}: features must not be empty")
    if len(view.features) > MAX_FEATURES:
        raise InvalidArgumentError(
            f"{where}: features has {len(view.features)} entries, over the limit of "
            f"{MAX_FEATURES} per view; split the features across several views"
        )
    key_names = {k.name for k in entity.join_keys}
    seen: set[str] = set()
    vector_floats = 0
    for feat in view.features:
        _check_name(f"{where} feature", feat.name)
        if feat.name in seen:
            raise InvalidArgumentError(f"{where}: feature {feat.name!r} repeated")
        if feat.name in key_names:
            raise InvalidArgumentError(
                f"{where}: feature {feat.name!r} has the name of a join key of {entity.name!r}"
            )
        seen.add(feat.name)
        dtype = _feature_dtype(view, feat)
        if dtype is DType.FLOAT32_VECTOR and feat.vector_length <= 0:
            raise InvalidArgumentError(
                f"{where} feature {feat.name!r}: FLOAT32_VECTOR needs vector_length > 0"
            )
        if dtype is not DType.FLOAT32_VECTOR and feat.vector_length != 0:
            raise InvalidArgumentError(
                f"{where} feature {feat.name!r}: vector_length is only for FLOAT32_VECTOR"
            )
        vector_floats += feat.vector_length
        if vector_floats > MAX_VECTOR_FLOATS:
            raise InvalidArgumentError(
                f"{where} feature {feat.name!r}: vector_length {feat.vector_length} brings the "
                f"view's vectors to {vector_floats} floats per row, over the limit of "
                f"{MAX_VECTOR_FLOATS} (4 MiB); use shorter vectors or put them in several views"
            )
    for key, value in view.tags.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidArgumentError(f"{where}: tags must map str to str, got {key!r}")


def validate_service(service: FeatureService) -> None:
    """Raise InvalidArgumentError naming the bad field of a feature service definition: its
    name, an empty or malformed reference, a view read at two versions, a feature named twice,
    tags that are not str -> str, or a malformed projection (what needs no registered view to
    check)."""
    _check_name("feature service name", service.name)
    where = f"feature service {service.name!r}"
    if not isinstance(service.projections, list | tuple):
        raise InvalidArgumentError(
            f"{where}: projections: expected a list of FeatureProjection (empty: none), got "
            f"{type(service.projections).__name__} {service.projections!r:.80}"
        )
    if not isinstance(service.features, list | tuple) or not (
        service.features or service.projections
    ):
        raise InvalidArgumentError(
            f"{where}: features must list at least one reference, e.g. ['user:age'], got "
            f"{service.features!r} (or projections one projection)"
        )
    versions: dict[str, tuple[int, int]] = {}
    named: dict[str, dict[str | None, int]] = {}
    for i, ref in enumerate(service.features):
        if not isinstance(ref, str):
            raise InvalidArgumentError(f"{where}: features[{i}]: expected str, got {ref!r}")
        try:
            (view, version), feature, _ = split_ref(ref, i)
        except InvalidArgumentError as exc:
            raise InvalidArgumentError(f"{where}: {exc}") from None
        first_version = versions.setdefault(view, (version, i))
        if first_version[0] != version:
            raise InvalidArgumentError(
                f"{where}: features[{i}] {quoted(ref)} reads view {view!r} "
                f"{_at_version(version)}, but features[{first_version[1]}] reads it "
                f"{_at_version(first_version[0])}; a service reads each view at one version"
            )
        of_view = named.setdefault(view, {})
        # a whole-view reference (None) overlaps every other reference to the view
        overlaps = of_view if feature is None else [k for k in (feature, None) if k in of_view]
        if overlaps:
            first = min(of_view[k] for k in overlaps)
            raise InvalidArgumentError(
                f"{where}: features[{i}] {quoted(ref)} reads again what features[{first}] "
                f"{quoted(service.features[first])} reads; name each feature once"
            )
        of_view[feature] = i
    for key, value in service.tags.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidArgumentError(f"{where}: tags must map str to str, got {key!r}")
    aliases: dict[str, int] = {}
    for j, projection in enumerate(service.projections):
        _check_projection(f"{where}: projections[{j}]", projection, set(versions))
        first = aliases.setdefault(projection.alias, j)
        if first != j:
            raise InvalidArgumentError(
                f"{where}: projections[{j}]: alias {projection.alias!r} is the alias of "
                f"projections[{first}] too; give each projection its own alias"
            )


def _check_projection(at: str, projection: object, plain_views: set[str]) -> None:
    """InvalidArgumentError naming the bad field of one projection of a service (`at`):
    its view reference, alias (a name, and none of `plain_views`, the views the service's
    references read, whose results carry their view's name), features or join_key_map."""
    if not isinstance(projection, FeatureProjection):
        raise InvalidArgumentError(
            f"{at}: expected a FeatureProjection, got {type(projection).__name__}"
        )
    view = projection.view
    name, at_sign, version = view.partition("@") if isinstance(view, str) else ("", "", "")
    if not _NAME.match(name) or (at_sign and not (version.isascii() and version.isdecimal())):
        raise InvalidArgumentError(
            f"{at}.view: {view!r} is not a view reference; use 'view' or 'view@VERSION', "
            "VERSION in ASCII digits (0: the latest)"
        )
    _check_name(f"{at}.alias", projection.alias)
    if projection.alias in plain_views:
        raise InvalidArgumentError(
            f"{at}: alias {projection.alias!r} is a view the service's features read, and "
            "results are named by view or alias; choose another alias"
        )
    features = projection.features
    if not isinstance(features, list | tuple) or not all(
        isinstance(f, str) and f for f in features
    ):
        raise InvalidArgumentError(
            f"{at}.features: {features!r}; give a list of feature names (empty: every feature)"
        )
    twice = next((f for k, f in enumerate(features) if f in features[:k]), None)
    if twice is not None:
        raise InvalidArgumentError(f"{at}.features: {twice!r} is named twice; name it once")
    key_map = projection.join_key_map
    if not isinstance(key_map, Mapping):
        raise InvalidArgumentError(
            f"{at}.join_key_map: {key_map!r}; give a table of join key -> request column"
        )
    for key, column in key_map.items():
        if not isinstance(key, str):
            raise InvalidArgumentError(f"{at}.join_key_map: key {key!r} is not a join key name")
        _check_name(f"{at}.join_key_map[{key!r}]", column)


def _at_version(version: int) -> str:
    return f"at version {version}" if version else "at its latest version"


@dataclass(frozen=True)
class ServiceProblem:
    """Why a feature service cannot be read: message names its first unresolvable read;
    projection is that read's index in service.projections, None for a reference (the fix
    differs: a projection is pinned by its `view`, a reference by 'view@1:feature')."""

    message: str
    projection: int | None = None


def service_problem(
    service: FeatureService,
    views: Mapping[str, Mapping[int, FeatureView]],
    entities: Mapping[str, Entity],
) -> ServiceProblem | None:
    """Why `service` cannot be read from `views` (each view name -> its versions) and
    `entities`, naming its first unresolvable reference or projection and the view version it
    resolves to; None when it can. Besides a missing view, version or feature, a lookup cannot
    send one key column typed two ways, so two read entities may not type one request column
    differently (a join key's own name, or the column a projection maps it to)."""
    key_types = _KeyColumns()
    for i, ref in enumerate(service.features):
        (name, version), feature, _ = split_ref(ref, i)
        what = f"features[{i}] {quoted(ref)}"
        view = _resolved_view(what, views, name, version)
        if isinstance(view, str):
            return ServiceProblem(view)
        if feature is not None and feature not in view._by_name:
            return ServiceProblem(_missing_feature(what, view, version, feature))
        entity = entities[view.entity]
        problem = key_types.add(
            what, f"features[{i}]", view, {k.name: k.name for k in entity.join_keys}, entity
        )
        if problem is not None:
            return ServiceProblem(problem)
    for j, projection in enumerate(service.projections):
        problem = _projection_problem(projection, f"projections[{j}]", views, entities, key_types)
        if problem is not None:
            return ServiceProblem(problem, j)
    return None


def _projection_problem(
    projection: FeatureProjection,
    at: str,
    views: Mapping[str, Mapping[int, FeatureView]],
    entities: Mapping[str, Entity],
    key_types: _KeyColumns,
) -> str | None:
    """Why the projection `at` of a service cannot be read (see service_problem)."""
    name, version = projection.view_key
    what = f"{at} ({projection.alias})"
    view = _resolved_view(what, views, name, version)
    if isinstance(view, str):
        return view
    for feature in projection.features:
        if feature not in view._by_name:
            return _missing_feature(what, view, version, feature)
    entity = entities[view.entity]
    key_names = [k.name for k in entity.join_keys]
    unknown = next((k for k in projection.join_key_map if k not in key_names), None)
    if unknown is not None:
        return (
            f"{what}: join_key_map key {quoted(unknown)} is not a join key of entity "
            f"{entity.name!r}, which feature view {name!r} v{view.version} is keyed by "
            f"(join keys: {', '.join(key_names)})"
        )
    columns = {key: projection.column(key) for key in key_names}
    return key_types.add(what, what, view, columns, entity)


def _pin_hint(
    service: FeatureService,
    j: int,
    views: Mapping[str, Mapping[int, FeatureView]],
    entities: Mapping[str, Entity],
) -> str | None:
    """How to pin projection j of `service` to the latest other version of its view that
    mends it (`view = "name@N"` in its TOML table), or None when no version does."""
    projection = service.projections[j]
    name, pinned = projection.view_key
    for version in sorted(views.get(name, ()), reverse=True):
        if version == pinned:
            continue
        ref = f"{name}@{version}"
        tried = list(service.projections)
        tried[j] = replace(projection, view=ref)
        problem = service_problem(replace(service, projections=tuple(tried)), views, entities)
        if problem is None or problem.projection != j:
            return f'view = "{ref}" in its [[feature_service.projection]]'
    return None


def _resolved_view(
    what: str, views: Mapping[str, Mapping[int, FeatureView]], name: str, version: int
) -> FeatureView | str:
    """The view version `what` (a reference or projection) reads, or why none is stored."""
    versions = views.get(name)
    if not versions:
        missing = f"{what}: feature view {quoted(name)} is not registered"
        return str(NotFoundError(missing, "view", close_names(name, sorted(views))))
    view = versions.get(version or max(versions))
    if view is None:
        return (
            f"{what}: feature view {name!r} has no version {version}; versions: "
            f"{', '.join(str(v) for v in sorted(versions))}"
        )
    return view


def _missing_feature(what: str, view: FeatureView, version: int, feature: str) -> str:
    """Why `what` cannot read `feature` from `view` (read pinned to `version`, or latest)."""
    which = "" if version else " (its latest)"
    missing = f"{what}: feature view {view.name!r} v{view.version}{which} has no feature"
    close = close_names(feature, sorted(view._by_name))
    return str(NotFoundError(f"{missing} {quoted(feature)}", "feature", close))


class _KeyColumns:
    """The request columns a service's reads take their keys from, each with its type and
    the first read that uses it: one column cannot carry keys of two types."""

    def __init__(self) -> None:
        self._first: dict[str, tuple[DType, str, str, str]] = {}

    def add(
        self,
        what: str,
        label: str,
        view: FeatureView,
        columns: Mapping[str, str],
        entity: Entity,
    ) -> str | None:
        """Record the columns (join key -> request column) a read of `view` (`what`, named
        `label` by later messages) uses; why not, when a column is typed two ways or carries
        two join keys."""
        used: dict[str, str] = {}
        for key in entity.join_keys:
            column = columns[key.name]
            other = used.setdefault(column, key.name)
            if other != key.name:
                return (
                    f"{what}: join keys {other!r} and {key.name!r} of entity {entity.name!r} "
                    f"are both read from request column {column!r}; map each to its own column"
                )
            dtype, first, first_entity, first_key = self._first.setdefault(
                column, (key.dtype, label, entity.name, key.name)
            )
            if dtype != key.dtype:
                return (
                    f"{what}: feature view {view.name!r} v{view.version} is keyed by entity "
                    f"{entity.name!r}, whose join key {_keyed(key.name, column)} is "
                    f"{key.dtype.name}, but {first} reads entity {first_entity!r}, whose "
                    f"{_keyed(first_key, column)} is {dtype.name} (a lookup sends one column "
                    "per join key name)"
                )
        return None


def _keyed(key: str, column: str) -> str:
    """A join key as a message names it, with the request column it is read from if another."""
    return repr(key) if key == column else f"{key!r} (request column {column!r})"


def _feature_dtype(view: FeatureView, feat: Feature) -> DType:
    """A feature's dtype as a DType (it may be declared as its number), or InvalidArgumentError
    naming the view, the feature and the valid dtypes."""
    try:
        return DType(feat.dtype)
    except (TypeError, ValueError):
        valid = ", ".join(f"DType.{d.name}" for d in DType)
        raise InvalidArgumentError(
            f"feature view {view.name!r} feature {feat.name!r}: unknown dtype {feat.dtype!r}; "
            f"use one of {valid}"
        ) from None


def _normalise(view: FeatureView) -> FeatureView:
    feats = tuple(replace(f, dtype=_feature_dtype(view, f)) for f in view.features)
    return replace(view, features=feats, tags=dict(view.tags))


def _merge(old: FeatureView, new: FeatureView, latest: int) -> FeatureView | None:
    """The in-place update of `old` by `new`, or None when they define the same view.

    Raises ConflictError when the change drops or retypes a feature (or changes the entity).
    """
    fix = f"needs a new version (apply with version={latest + 1})"
    if new.entity != old.entity:
        raise ConflictError(
            f"feature view {old.name!r} v{old.version}: changing entity {old.entity!r} to "
            f"{new.entity!r} {fix}"
        )
    new_by_name = {f.name: f for f in new.features}
    for feat in old.features:
        now = new_by_name.get(feat.name)
        if now is None:
            raise ConflictError(
                f"feature view {old.name!r} v{old.version}: dropping feature {feat.name!r} {fix}"
            )
        if (now.dtype, now.vector_length) != (feat.dtype, feat.vector_length):
            raise ConflictError(
                f"feature view {old.name!r} v{old.version}: retyping feature {feat.name!r} from "
                f"{feat.dtype.name}[{feat.vector_length}] to {now.dtype.name}[{now.vector_length}] "
                f"{fix}"
            )
    old_names = {f.name for f in old.features}
    kept = tuple(new_by_name[f.name] for f in old.features)
    added = tuple(f for f in new.features if f.name not in old_names)
    merged = replace(
        old,
        features=kept + added,
        ttl_seconds=new.ttl_seconds,
        description=new.description,
        owner=new.owner,
        tags=dict(new.tags),
    )
    if merged == old:
        return None
    return merged


@dataclass
class _Snapshot:
    entities: dict[str, Entity]
    views: dict[str, dict[int, FeatureView]]
    services: dict[str, FeatureService] = field(default_factory=dict)

    def broken_service(
        self, changed: str, fix: str, projection_fix: Callable[[str | None], str]
    ) -> ConflictError | None:
        """A ConflictError naming the first stored service that these views no longer resolve
        (after `changed`, the change to the views being made) and how to keep it readable:
        `fix` for a reference, projection_fix(pin) for a projection (pin: how to pin it to a
        version that mends it, None if none does)."""
        for name in sorted(self.services):
            service = self.services[name]
            problem = service_problem(service, self.views, self.entities)
            if problem is not None:
                if problem.projection is not None:
                    pin = _pin_hint(service, problem.projection, self.views, self.entities)
                    fix = projection_fix(pin)
                return ConflictError(
                    f"{changed} would break feature service {name!r}: {problem.message}; {fix}"
                )
        return None

    def prune_services(self, declared: set[str]) -> list[ApplyResult]:
        """Remove the services not `declared`; their "deleted" results, by name."""
        gone = sorted(set(self.services) - declared)
        for name in gone:
            del self.services[name]
        return [ApplyResult("", 0, "deleted", feature_service=name) for name in gone]

    def prune_views(self, declared: set[str]) -> list[ApplyResult]:
        """Remove every version of the views whose name is not `declared`; their "deleted"
        results, by name, then version."""
        results: list[ApplyResult] = []
        for name in sorted(set(self.views) - declared):
            versions = self.views.pop(name)
            results += [ApplyResult(name, version, "deleted") for version in sorted(versions)]
        return results

    def prune_entities(self, declared: set[str]) -> list[ApplyResult]:
        """Remove the entities neither `declared` nor used by a view version left; their
        "deleted" results, by name."""
        used = {view.entity for versions in self.views.values() for view in versions.values()}
        gone = sorted(set(self.entities) - declared - used)
        for name in gone:
            del self.entities[name]
        return [ApplyResult("", 0, "deleted", entity=name) for name in gone]


def _generation(txn: lmdb.Transaction, db: lmdb._Database) -> int:
    """The registry's change counter, bumped by every apply and delete."""
    raw = txn.get(_GENERATION, db=db)
    return int.from_bytes(raw, "little") if raw else 0


def _load_snapshot(txn: lmdb.Transaction, db: lmdb._Database) -> _Snapshot:
    """Every entity and view version stored in the registry database as of txn."""
    snap = _Snapshot({}, {})
    for key, raw in txn.cursor(db=db):
        if key.startswith(b"e\x00"):
            entity = _entity_from_json(raw)
            snap.entities[entity.name] = entity
        elif key.startswith(b"v\x00"):
            view = _view_from_json(raw)
            snap.views.setdefault(view.name, {})[view.version] = view
        elif key.startswith(b"s\x00"):
            service = _service_from_json(raw)
            snap.services[service.name] = service
    return snap


class Registry:
    """Entities and versioned feature views with a per-process cache refreshed by generation.

    max_dbs is the environment's limit of named databases: apply refuses new versions beyond
    what it holds, so no version is created that could not be written or reopened.
    """

    def __init__(self, env: TxnSource, max_dbs: int) -> None:
        self._env = env
        self._max_dbs = max_dbs
        self._cache: tuple[int, _Snapshot] = (-1, _Snapshot({}, {}))

    def _snapshot(self, txn: lmdb.Transaction) -> _Snapshot:
        """The definitions as of txn: the cache, reloaded if an apply or delete committed since
        it was filled (one `get` if not). Callers use the snapshot returned, never the cache:
        another thread may refill it from an older transaction meanwhile."""
        db = self._env.registry_db()
        generation = _generation(txn, db)
        cached, snap = self._cache
        if generation != cached:
            snap = _load_snapshot(txn, db)
            self._cache = (generation, snap)
        return snap

    def _current(self) -> _Snapshot:
        with self._env.read_txn() as txn:
            return self._snapshot(txn)

    def get_view(
        self, name: str, version: int = 0, txn: lmdb.Transaction | None = None
    ) -> FeatureView:
        """The view `name` at `version` (0 = latest); NotFoundError suggests the closest views
        or names the nearest versions."""
        snap = self._current() if txn is None else self._snapshot(txn)
        versions = snap.views.get(name)
        if not versions:
            raise NotFoundError(
                f"feature view {quoted(name)} is not registered",
                "view",
                close_names(name, sorted(snap.views)),
                "ListFeatureViews lists the views",
            )
        if version == 0:
            return versions[max(versions)]
        view = versions.get(version)
        if view is None:
            nearest = sorted(sorted(versions, key=lambda v: abs(v - version))[:MAX_SUGGESTIONS])
            known = ", ".join(str(v) for v in nearest)
            if len(versions) > len(nearest):
                known += f" and {len(versions) - len(nearest)} more"
            raise NotFoundError(
                f"feature view {name!r} has no version {version}; versions: {known}",
                "version",
                listed_by="ListFeatureViews with all_versions lists them",
            )
        return view

    def find_view(
        self, name: str, version: int, txn: lmdb.Transaction | None = None
    ) -> FeatureView | None:
        """The view `name` at `version` (>= 1), or None: what a write checks the definition its
        batches were encoded for against (there, absence is an outcome, not an error)."""
        snap = self._current() if txn is None else self._snapshot(txn)
        return snap.views.get(name, {}).get(version)

    def list_views(self, name_prefix: str = "", all_versions: bool = False) -> list[FeatureView]:
        """Views whose name starts with name_prefix, by name; latest version only unless asked."""
        snap = self._current()
        out: list[FeatureView] = []
        for name in sorted(snap.views):
            if not name.startswith(name_prefix):
                continue
            versions = snap.views[name]
            if all_versions:
                out.extend(versions[v] for v in sorted(versions))
            else:
                out.append(versions[max(versions)])
        return out

    def get_entity(self, name: str, txn: lmdb.Transaction | None = None) -> Entity:
        """The entity `name`; NotFoundError suggests the closest entities."""
        snap = self._current() if txn is None else self._snapshot(txn)
        entity = snap.entities.get(name)
        if entity is None:
            raise NotFoundError(
                f"entity {quoted(name)} is not registered",
                "entity",
                close_names(name, sorted(snap.entities)),
                "ListFeatureViews lists the entities",
            )
        return entity

    def list_entities(self) -> list[Entity]:
        """All registered entities, by name."""
        snap = self._current()
        return [snap.entities[n] for n in sorted(snap.entities)]

    def get_service(
        self,
        name: str,
        txn: lmdb.Transaction | None = None,
        visible: Callable[[FeatureService], bool] | None = None,
    ) -> FeatureService:
        """The feature service `name`; NotFoundError suggests the closest services, and
        InvalidArgumentError says a name no service can have. With `visible`, a service it
        refuses is answered as not registered, and only those it accepts are suggested (a
        caller may see only some)."""
        snap = self._current() if txn is None else self._snapshot(txn)
        service = snap.services.get(name)
        if service is not None and (visible is None or visible(service)):
            return service
        _check_name("feature service name", name)
        close = close_names(name, sorted(snap.services))
        raise NotFoundError(
            f"feature service {quoted(name)} is not registered",
            "feature service",
            [n for n in close if visible is None or visible(snap.services[n])],
            "ListFeatureServices lists the services",
        )

    def list_services(self, name_prefix: str = "") -> list[FeatureService]:
        """Feature services whose name starts with name_prefix, by name."""
        snap = self._current()
        return [snap.services[n] for n in sorted(snap.services) if n.startswith(name_prefix)]

    def apply(
        self,
        entities: Iterable[Entity],
        views: Iterable[FeatureView],
        dry_run: bool = False,
        feature_services: Iterable[FeatureService] = (),
        prune: bool = False,
    ) -> list[ApplyResult]:
        """Register entities, views and feature services atomically, following the versioning
        rules; the results are the views' in order, then the services'.

        prune makes the registry mirror this apply (as `feast apply` does), in the same
        transaction: every service not given, every version of every view whose name is not
        given (definition and databases, as delete_view), and every entity not given that no
        remaining view version uses are deleted; their "deleted" results follow, views (by
        name, then version), then services, then entities. A given service that would read a
        deleted view is a ConflictError, and nothing is written.

        Per view, version 0 lets the registry decide: same definition -> "unchanged"; only added
        features or metadata changes -> "updated" in place; dropped or retyped features ->
        ConflictError. version = latest+1 creates a new version; older versions stay readable.
        A service must resolve against the views as this apply leaves them (else
        InvalidArgumentError naming its reference), and so must every stored service (else
        ConflictError: a new version that drops a feature a service reads from the latest).
        An entity or service name, or a view name and version, given twice is an
        InvalidArgumentError.
        """
        entities = list(entities)
        views = [_normalise(v) for v in views]
        services = list(feature_services)
        for entity in entities:
            validate_entity(replace(entity, join_keys=tuple(entity.join_keys)))
        for view in views:
            _check_name("feature view name", view.name)
        for service in services:
            validate_service(service)
        services = [
            replace(
                s,
                features=tuple(s.features),
                tags=dict(s.tags),
                projections=tuple(
                    replace(p, features=tuple(p.features), join_key_map=dict(p.join_key_map))
                    for p in s.projections
                ),
            )
            for s in services
        ]
        check_repeats(entities, views, services=services)

        def work(txn: lmdb.Transaction) -> list[ApplyResult]:
            db = self._env.registry_db()
            snap = _load_snapshot(txn, db)
            raw = txn.get(_LAST_CREATED, db=db)
            last_created = int.from_bytes(raw, "little") if raw else 0
            now = max(time.time_ns() // 1000, last_created + 1)
            puts: list[tuple[bytes, bytes]] = []
            new_views: list[FeatureView] = []
            for entity in entities:
                entity = replace(
                    entity,
                    join_keys=tuple(JoinKey(k.name, DType(k.dtype)) for k in entity.join_keys),
                )
                old = snap.entities.get(entity.name)
                if old is not None and old.join_keys != entity.join_keys:
                    raise ConflictError(
                        f"entity {entity.name!r}: join keys cannot change (stored: "
                        f"{[(k.name, k.dtype.name) for k in old.join_keys]}); register a new "
                        "entity name"
                    )
                if old != entity:
                    puts.append((_entity_key(entity.name), _entity_to_json(entity)))
                snap.entities[entity.name] = entity
            results = [self._plan_view(snap, view, now, puts, new_views) for view in views]
            results += [self._plan_service(snap, service, now, puts) for service in services]
            pruned_services = snap.prune_services({s.name for s in services}) if prune else []
            broken = None
            if new_views:
                broken = snap.broken_service(
                    "this apply",
                    "apply the service without that reference, or with it pinned to a version "
                    "that has it ('view@1:feature'), in this apply or before it",
                    lambda pin: (
                        "apply the service with that projection "
                        + (f"pinned to a version that has what it reads ({pin}) or " if pin else "")
                        + "reading other features, or without it, in this apply or before it"
                    ),
                )
            if broken is not None:
                raise broken
            pruned_views = snap.prune_views({v.name for v in views}) if prune else []
            if pruned_views:
                names = ", ".join(sorted({quoted(r.view) for r in pruned_views}))
                broken = snap.broken_service(
                    f"pruning feature views this apply does not declare ({names})",
                    "declare the view it reads in this apply (prune keeps declared views), "
                    "or apply the service without that reference",
                    lambda _: (
                        "declare the view it reads in this apply (prune keeps declared "
                        "views), or apply the service without that projection"
                    ),
                )
                if broken is not None:
                    raise broken
            pruned = pruned_views + pruned_services
            if prune:
                pruned += snap.prune_entities({e.name for e in entities})
            if new_views:
                self._check_room(snap)
            results += pruned
            if dry_run:
                return results
            for key, value in puts:
                txn.put(key, value, db=db)
            for result in pruned:
                txn.delete(_result_key(result), db=db)
            if puts or pruned:
                _bump_generation(txn, db)
            if new_views:
                txn.put(_LAST_CREATED, now.to_bytes(8, "little"), db=db)
            for result in pruned_views:
                self._env.drop_db(view_db_name(result.view, result.version), txn)
                self._env.drop_db(history_db_name(result.view, result.version), txn)
            for view in new_views:
                self._env.db_in_write(view_db_name(view.name, view.version), txn)
            return results

        # deleting a database needs this process's other transactions out of the way
        return self._env.run_write(work, exclusive=prune and not dry_run)

    def _check_room(self, snap: _Snapshot) -> None:
        """ResourceExhaustedError naming lmdb_max_dbs when the stored and planned view versions
        need more databases than the environment holds (counted as the server's start-up does:
        1 for the registry, 2 per version; a deleted version no longer counts)."""
        versions = sum(len(by_version) for by_version in snap.views.values())
        needed = 1 + 2 * versions
        if needed > self._max_dbs:
            raise ResourceExhaustedError(
                f"views: {versions} view versions would need {needed} LMDB databases (1 for "
                f"the registry, 2 per version: online rows and history), over lmdb_max_dbs = "
                f"{self._max_dbs}; set lmdb_max_dbs in the server config (StoreConfig.max_dbs) "
                f"to at least {needed}, or delete view versions no longer used"
            )

    def _plan_view(
        self,
        snap: _Snapshot,
        view: FeatureView,
        now: int,
        puts: list[tuple[bytes, bytes]],
        new_views: list[FeatureView],
    ) -> ApplyResult:
        validate_view(view, snap.entities.get(view.entity))
        versions = snap.views.setdefault(view.name, {})
        latest = max(versions, default=0)
        target = view.version or latest
        if target == 0 or (target == latest + 1 and target not in versions):
            stored = replace(
                view,
                version=target or 1,
                created_us=now,
                updated_us=now,
                ttl_history=((now, view.ttl_seconds),),
            )
            versions[stored.version] = stored
            puts.append((_view_key(stored.name, stored.version), _view_to_json(stored)))
            new_views.append(stored)
            return ApplyResult(stored.name, stored.version, "created")
        old = versions.get(target)
        if old is None:
            raise InvalidArgumentError(
                f"feature view {view.name!r}: version {view.version} does not exist; existing: "
                f"{sorted(versions)}; the next new version is {latest + 1}"
            )
        merged = _merge(old, view, latest)
        if merged is None:
            return ApplyResult(old.name, old.version, "unchanged")
        history = old.ttl_changes()
        if merged.ttl_seconds != old.ttl_seconds:
            # kept strictly increasing (a clock may step back): labels bisect these times
            history += ((max(now, history[-1][0] + 1), merged.ttl_seconds),)
        merged = replace(merged, updated_us=now, ttl_history=history)
        versions[target] = merged
        puts.append((_view_key(merged.name, merged.version), _view_to_json(merged)))
        return ApplyResult(merged.name, merged.version, "updated")

    @staticmethod
    def _plan_service(
        snap: _Snapshot, service: FeatureService, now: int, puts: list[tuple[bytes, bytes]]
    ) -> ApplyResult:
        problem = service_problem(service, snap.views, snap.entities)
        if problem is not None:
            if problem.projection is None:
                fix = "drop or fix that reference"
            else:
                pin = _pin_hint(service, problem.projection, snap.views, snap.entities)
                fix = f"pin that projection to a version that has it ({pin}), " if pin else ""
                fix += "fix its view, features or join_key_map, or drop it"
            raise InvalidArgumentError(
                f"feature service {service.name!r}: {problem.message}; {fix}, or apply the "
                "view or feature it names first or in the same apply"
            )
        old = snap.services.get(service.name)
        if old == service:
            return ApplyResult("", 0, "unchanged", old.name)
        created = now if old is None else old.created_us
        stored = replace(service, created_us=created, updated_us=now)
        snap.services[service.name] = stored
        puts.append((_service_key(stored.name), _service_to_json(stored)))
        return ApplyResult("", 0, "created" if old is None else "updated", stored.name)

    def delete_view(self, name: str, version: int) -> None:
        """Remove one version of a view and delete its databases (online rows and history),
        freeing their room under max_dbs; NotFoundError if absent, ConflictError naming a
        feature service that reads it (pinned, or through the latest with no older version
        holding what it reads)."""

        def work(txn: lmdb.Transaction) -> None:
            db = self._env.registry_db()
            if version == 0:
                raise InvalidArgumentError(f"delete_view {name!r}: name the version to delete")
            self.get_view(name, version, txn)
            snap = _load_snapshot(txn, db)
            left = snap.views[name]
            del left[version]
            if not left:
                del snap.views[name]
            others = f"another version of {name!r} ({', '.join(map(str, sorted(left)))})"
            broken = snap.broken_service(
                f"deleting feature view {name!r} v{version}",
                "first apply the service without that reference"
                + (f" or with it pinned to {others}" if left else "")
                + ", or delete the service (DeleteFeatureService)",
                lambda pin: (
                    "first apply the service without that projection"
                    + (f" or with it pinned to another version ({pin})" if pin else "")
                    + ", or delete the service (DeleteFeatureService)"
                ),
            )
            if broken is not None:
                raise broken
            txn.delete(_view_key(name, version), db=db)
            _bump_generation(txn, db)
            self._env.drop_db(view_db_name(name, version), txn)
            self._env.drop_db(history_db_name(name, version), txn)

        self._env.run_write(work, exclusive=True)

    def delete_service(self, name: str) -> None:
        """Remove one feature service (the views it reads stay); NotFoundError if absent."""

        def work(txn: lmdb.Transaction) -> None:
            db = self._env.registry_db()
            self.get_service(name, txn)
            txn.delete(_service_key(name), db=db)
            _bump_generation(txn, db)

        self._env.run_write(work)


def _bump_generation(txn: lmdb.Transaction, db: lmdb._Database) -> None:
    """Tell every process's cache (see Registry._snapshot) that the definitions changed."""
    txn.put(_GENERATION, (_generation(txn, db) + 1).to_bytes(8, "little"), db=db)


class RegistryReader:
    """The registered views' names and features, read from a store that other processes own
    (a --workers parent drops deleted views from its merged /metrics with them).

    Read-only: it never writes and never waits for a writer. It opens the environment at its
    first read, once (LMDB allows one handle per process), so open it only after starting any
    child that would fork from this process and use it; a child that execs drops it."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._env: lmdb.Environment | None = None
        self._db: lmdb._Database | None = None
        self._cache: tuple[int, dict[str, frozenset[str]]] = (-1, {})

    def view_features(self) -> Mapping[str, frozenset[str]]:
        """Each registered view -> the features any of its versions has, as of one read
        transaction (parsed again only after an apply or delete). UnavailableError while the
        store cannot be read, e.g. before a server has created it."""
        with self._lock:
            try:
                txn = self._begin()
                try:
                    generation = _generation(txn, self._db)
                    if generation != self._cache[0]:
                        views = _load_snapshot(txn, self._db).views
                        self._cache = (generation, _features_by_view(views))
                finally:
                    txn.abort()
            except lmdb.Error as exc:
                raise UnavailableError(
                    f"the registry in {self._path} cannot be read ({exc}); a featureserve "
                    "server creates it there at start-up"
                ) from None
            return self._cache[1]

    def _begin(self) -> lmdb.Transaction:
        """A read transaction, opening the environment first if needed; map_size=0 adopts the
        size the writers set, and a resize since is adopted the same way."""
        if self._env is None:
            env = lmdb.open(
                str(self._path), readonly=True, create=False, map_size=0, max_dbs=1, readahead=False
            )
            try:
                env.reader_check()  # free the slots of readers that died (a killed worker)
                self._db = env.open_db(REGISTRY_DB, create=False)
            except lmdb.Error:
                env.close()
                raise
            self._env = env
        while True:
            try:
                return self._env.begin()
            except lmdb.MapResizedError:
                self._env.set_mapsize(0)


def _features_by_view(views: dict[str, dict[int, FeatureView]]) -> dict[str, frozenset[str]]:
    """Each view -> the names of the features any of its versions has."""
    return {
        name: frozenset(f.name for view in versions.values() for f in view.features)
        for name, versions in views.items()
    }
