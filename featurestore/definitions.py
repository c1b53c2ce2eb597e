"""Load entities, feature views and feature services from a features.toml file.

Format (a `[[pipeline]]` table may sit beside these; pipelines.config reads it)::

    [[entity]]
    name = "user"
    join_keys = [{ name = "user_id", dtype = "int64" }]
    description = "a signed-up user"          # optional

    [[feature_view]]
    name = "user_stats"
    entity = "user"
    ttl = "1d"               # or ttl_seconds = 86400; units s, m, h, d, w (e.g. "1h30m")
    version = 0              # optional: 0 lets the registry decide, N+1 makes a new version
    owner = "growth"         # optional, as are description and tags
    tags = { tier = "gold" }

    [[feature_view.feature]]
    name = "clicks_7d"
    dtype = "float32"        # float32, float64, int64, bool, string, float32_vector
    vector_length = 0        # > 0 only for float32_vector
    allow_nan = false
    description = ""

    [[feature_service]]
    name = "fraud"
    features = ["user_stats:clicks_7d", "profile"]   # GetOnlineFeatures' references
    owner = "risk"           # optional, as are description and tags

    [[feature_service.projection]]                   # optional: a view read under an alias
    view = "location_stats"  # or "location_stats@2"
    alias = "origin"         # names its results, as a view's name names a plain read's
    features = ["avg_amount"]                        # optional (default: every feature)
    join_key_map = { location_id = "origin_id" }     # join key -> request column (optional)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from featurestore.dtypes import DType
from featurestore.errors import FeatureStoreError, InvalidArgumentError
from featurestore.registry import (
    Entity,
    Feature,
    FeatureProjection,
    FeatureService,
    FeatureView,
    JoinKey,
    check_repeats,
    validate_entity,
    validate_service,
)
from featurestore.toml_file import read_toml as read_toml_file

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"(\d+)([smhdw])")
TOP_LEVEL_KEYS = {"entity", "feature_view", "feature_service", "pipeline"}
"""The tables a features.toml may hold: this module reads the first three, pipelines.config
the last, and each accepts the others beside its own."""
_ENTITY = {"name", "join_keys", "description"}
_JOIN_KEY = {"name", "dtype"}
_VIEW = {
    "name",
    "entity",
    "ttl",
    "ttl_seconds",
    "version",
    "owner",
    "description",
    "tags",
    "feature",
}
_FEATURE = {"name", "dtype", "vector_length", "allow_nan", "description"}
_SERVICE = {"name", "features", "description", "owner", "tags", "projection"}
_PROJECTION = {"view", "alias", "features", "join_key_map"}
_UINT32_MAX = 2**32 - 1
_INT64_MAX = 2**63 - 1


def parse_duration(text: str) -> int:
    """Seconds in a duration such as "90s", "15m", "1h30m", "7d"; ValueError if malformed."""
    text = text.strip().replace(" ", "")
    parts = _DURATION.findall(text)
    if not text or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"bad duration {text!r}: use e.g. 90s, 15m, 1h30m, 7d, 2w")
    return sum(int(n) * _UNITS[u] for n, u in parts)


def format_duration(seconds: int) -> str:
    """A whole number of seconds as parse_duration reads it back ("1h30m", "7d"); "0s" for 0."""
    parts = []
    for unit, size in sorted(_UNITS.items(), key=lambda item: -item[1]):
        count, seconds = divmod(seconds, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts) or "0s"


class _Where:
    """Builds error messages naming the file and the key path."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def error(self, key: str, problem: str) -> InvalidArgumentError:
        return InvalidArgumentError(f"{self.path}: {key}: {problem}")

    def table(self, value: Any, key: str, allowed: set[str]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.error(key, f"expected a table, got {type(value).__name__}")
        unknown = sorted(set(value) - allowed)
        if unknown:
            raise self.error(key, f"unknown key(s) {unknown}; allowed: {sorted(allowed)}")
        return value

    def get(self, table: dict[str, Any], key: str, where: str, kind: type, default: Any = None):
        if key not in table:
            if default is None:
                raise self.error(f"{where}.{key}", "is required")
            return default
        value = table[key]
        if (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
            raise self.error(
                f"{where}.{key}", f"expected {kind.__name__}, got {type(value).__name__}"
            )
        return value

    def bounded(self, value: int, key: str, high: int, fix: str) -> int:
        """`value` if it is from 0 to `high` (the range of its field on the wire)."""
        if not 0 <= value <= high:
            raise self.error(key, f"{value} is outside 0 to {high}; {fix}")
        return value

    def dtype(self, table: dict[str, Any], where: str) -> DType:
        name = self.get(table, "dtype", where, str)
        try:
            return DType[name.upper()]
        except KeyError:
            choices = ", ".join(d.name.lower() for d in DType)
            raise self.error(
                f"{where}.dtype", f"unknown dtype {name!r}; use one of {choices}"
            ) from None


@dataclass(frozen=True)
class Definitions:
    """What a features.toml file declares, in file order, ready for Registry.apply."""

    entities: tuple[Entity, ...]
    views: tuple[FeatureView, ...]
    feature_services: tuple[FeatureService, ...]


def read_toml(path: Path, fix: str) -> dict:
    """A features.toml file's TOML document; InvalidArgumentError naming the file when it
    cannot be read (with `fix`, the caller's way to give another file), is not UTF-8 or is not
    valid TOML."""
    return read_toml_file(path, "definitions file", fix, InvalidArgumentError)


def load_definitions(
    path: str | Path, fix: str = "give the path of a readable features.toml"
) -> Definitions:
    """Parse features.toml into entities, feature views and feature services.

    Errors are InvalidArgumentError naming the file and key (for example
    "features.toml: feature_view[0].feature[2].dtype: ..."); an entity or service, or a view
    and version, declared twice is one too. Whether a service's references resolve is the
    registry's to say at apply (the views may be registered already). `fix` ends the message
    for a file that cannot be read: how the caller (a command's argument or flag) takes
    another path.
    """
    path = Path(path)
    w = _Where(path)
    doc = read_toml(path, fix)
    w.table(doc, "top level", TOP_LEVEL_KEYS)
    entities = [_entity(w, raw, f"entity[{i}]") for i, raw in enumerate(_array(w, doc, "entity"))]
    views = [
        _view(w, raw, f"feature_view[{i}]") for i, raw in enumerate(_array(w, doc, "feature_view"))
    ]
    services = [
        _service(w, raw, f"feature_service[{i}]")
        for i, raw in enumerate(_array(w, doc, "feature_service"))
    ]
    try:
        check_repeats(entities, views, "entity", "feature_view", services, "feature_service")
    except InvalidArgumentError as exc:
        raise InvalidArgumentError(f"{path}: {exc}") from None
    return Definitions(tuple(entities), tuple(views), tuple(services))


def _array(w: _Where, table: dict[str, Any], key: str) -> list[Any]:
    value = table.get(key, [])
    if not isinstance(value, list):
        raise w.error(key, f"expected an array of tables ([[{key}]]), got {type(value).__name__}")
    return value


def _entity(w: _Where, raw: Any, where: str) -> Entity:
    table = w.table(raw, where, _ENTITY)
    keys = []
    for j, key in enumerate(_array(w, table, "join_keys")):
        at = f"{where}.join_keys[{j}]"
        key = w.table(key, at, _JOIN_KEY)
        keys.append(JoinKey(w.get(key, "name", at, str), w.dtype(key, at)))
    entity = Entity(
        w.get(table, "name", where, str), tuple(keys), w.get(table, "description", where, str, "")
    )
    try:
        validate_entity(entity)
    except FeatureStoreError as exc:
        raise w.error(where, str(exc)) from None
    return entity


def _view(w: _Where, raw: Any, where: str) -> FeatureView:
    table = w.table(raw, where, _VIEW)
    name = w.get(table, "name", where, str)
    where = f"{where} ({name})"
    if "ttl" in table and "ttl_seconds" in table:
        raise w.error(where, "set ttl or ttl_seconds, not both")
    ttl = w.get(table, "ttl_seconds", where, int, 0)
    if isinstance(table.get("ttl"), int) and not isinstance(table["ttl"], bool):
        raise w.error(
            f"{where}.ttl",
            f'expected a duration string such as "1d", got int; for seconds write '
            f"ttl_seconds = {table['ttl']}",
        )
    if "ttl" in table:
        try:
            ttl = parse_duration(w.get(table, "ttl", where, str))
        except ValueError as exc:
            raise w.error(f"{where}.ttl", str(exc)) from None
    ttl_key = f"{where}.{'ttl' if 'ttl' in table else 'ttl_seconds'}"
    ttl = w.bounded(ttl, ttl_key, _INT64_MAX, f"give seconds, 0 (no limit) to {_INT64_MAX}")
    tags = _tags(w, table, where)
    features = []
    positions: dict[str, int] = {}
    for j, raw_feature in enumerate(_array(w, table, "feature")):
        at = f"{where}.feature[{j}]"
        feat = w.table(raw_feature, at, _FEATURE)
        feature_name = w.get(feat, "name", at, str)
        first = positions.setdefault(feature_name, j)
        if first != j:
            raise w.error(
                f"{at}.name",
                f"{feature_name!r} repeats feature[{first}]; give each feature of a view its own "
                f"name",
            )
        features.append(
            Feature(
                name=feature_name,
                dtype=w.dtype(feat, at),
                vector_length=w.bounded(
                    w.get(feat, "vector_length", at, int, 0),
                    f"{at}.vector_length",
                    _UINT32_MAX,
                    f"give the float32_vector length, 1 to {_UINT32_MAX}",
                ),
                description=w.get(feat, "description", at, str, ""),
                allow_nan=w.get(feat, "allow_nan", at, bool, False),
            )
        )
    if not features:
        raise w.error(where, "needs at least one [[feature_view.feature]]")
    return FeatureView(
        name=name,
        entity=w.get(table, "entity", where, str),
        features=tuple(features),
        version=w.bounded(
            w.get(table, "version", where, int, 0),
            f"{where}.version",
            _UINT32_MAX,
            f"give 0 (the registry decides) or a version from 1 to {_UINT32_MAX}",
        ),
        ttl_seconds=ttl,
        description=w.get(table, "description", where, str, ""),
        owner=w.get(table, "owner", where, str, ""),
        tags=tags,
    )


def _tags(w: _Where, table: dict[str, Any], where: str) -> dict[str, str]:
    """The optional `tags` table of a view or service: text values only."""
    tags = w.get(table, "tags", where, dict, {})
    for key, value in tags.items():
        if not isinstance(value, str):
            raise w.error(f"{where}.tags.{key}", f"expected str, got {type(value).__name__}")
    return dict(tags)


def _service(w: _Where, raw: Any, where: str) -> FeatureService:
    table = w.table(raw, where, _SERVICE)
    name = w.get(table, "name", where, str)
    where = f"{where} ({name})"
    projections = [
        _projection(w, raw_projection, f"{where}.projection[{j}]")
        for j, raw_projection in enumerate(_array(w, table, "projection"))
    ]
    features = w.get(table, "features", where, list, [] if projections else None)
    _strings(w, features, f"{where}.features", 'a reference string such as "view:feature"')
    if not features and not projections:
        raise w.error(
            f"{where}.features",
            'needs at least one reference, e.g. features = ["user_stats:clicks_7d"] (or a '
            "[[feature_service.projection]])",
        )
    service = FeatureService(
        name=name,
        features=tuple(features),
        description=w.get(table, "description", where, str, ""),
        owner=w.get(table, "owner", where, str, ""),
        tags=_tags(w, table, where),
        projections=tuple(projections),
    )
    try:
        validate_service(service)
    except InvalidArgumentError as exc:
        # the registry starts with the service ("feature service 'x': features[1] ..."); the
        # file names it by its key instead
        raise w.error(where, str(exc).removeprefix(f"feature service {name!r}: ")) from None
    return service


def _strings(w: _Where, values: list[Any], where: str, expected: str) -> None:
    """Refuse an entry of `values` that is not a string, naming it and what it should be."""
    for j, value in enumerate(values):
        if not isinstance(value, str):
            raise w.error(f"{where}[{j}]", f"expected {expected}, got {type(value).__name__}")


def _projection(w: _Where, raw: Any, where: str) -> FeatureProjection:
    """One [[feature_service.projection]] table (the registry checks it against the views)."""
    table = w.table(raw, where, _PROJECTION)
    features = w.get(table, "features", where, list, [])
    _strings(w, features, f"{where}.features", "a feature name")
    key_map = w.get(table, "join_key_map", where, dict, {})
    for key, column in key_map.items():
        if not isinstance(column, str):
            raise w.error(
                f"{where}.join_key_map.{key}",
                f"expected the request column's name, got {type(column).__name__}",
            )
    return FeatureProjection(
        view=w.get(table, "view", where, str),
        alias=w.get(table, "alias", where, str),
        features=tuple(features),
        join_key_map=dict(key_map),
    )
