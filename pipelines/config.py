"""Pipeline definitions: the [[pipeline]] sections of features.toml, parsed into dataclasses.

Layout (next to the entities and views that definitions.py reads):

    [[pipeline]]
    name = "card_txn"
    format = "csv"                       # csv | json
    entity_column = "card_id"            # BIGINT; also the view's join key
    event_time_column = "event_time"     # epoch milliseconds
    out_of_orderness_s = 2.0             # watermark = newest event time - this - lateness
    allowed_lateness_s = 3.0

    [pipeline.columns]                   # in file order for CSV; bigint | double | string
    card_id = "bigint"
    amount = "double"
    merchant = "string"
    lat = "double"
    lon = "double"
    event_time = "bigint"

    [[pipeline.derived]]                 # computed by a Numba kernel in a pandas UDF
    name = "distance_km"
    kind = "haversine_to_point"
    lat = "lat"
    lon = "lon"
    point = [48.8566, 2.3522]

    [[pipeline.window]]
    view = "card_txn_5m"
    kind = "hop"                         # hop | tumble
    size_s = 300
    slide_s = 60                         # hop only

    [pipeline.window.features]           # count | count_distinct(c) | sum | mean | min | max
    txn_count = "count"
    amount_sum = "sum(amount)"
    distance_mean = "mean(distance_km)"
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from featurestore.dtypes import DType
from featurestore.errors import InvalidArgumentError

COLUMN_TYPES = {"bigint": "BIGINT", "double": "DOUBLE", "string": "STRING"}
FUNCTIONS = ("count", "count_distinct", "sum", "mean", "min", "max")
DERIVED_KINDS = ("haversine_to_point",)
FORMATS = ("csv", "json")
_AGGREGATE = re.compile(r"\s*(count_distinct|count|sum|mean|min|max)\s*(?:\(\s*(\w*)\s*\))?\s*\Z")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


@dataclass(frozen=True)
class Aggregate:
    """One window feature: fn over column (column is empty for a plain count)."""

    name: str
    fn: str
    column: str = ""

    @property
    def dtype(self) -> DType:
        """The feature's type in the view: counts are INT64, the rest FLOAT64."""
        return DType.INT64 if self.fn in ("count", "count_distinct") else DType.FLOAT64


@dataclass(frozen=True)
class Window:
    """A hop (sliding) or tumble window per entity, written to one feature view."""

    view: str
    kind: str
    size_s: float
    slide_s: float
    aggregates: tuple[Aggregate, ...]


@dataclass(frozen=True)
class Derived:
    """A per-event column computed by a shared kernel before windowing."""

    name: str
    kind: str
    lat: str
    lon: str
    point: tuple[float, float]


@dataclass(frozen=True)
class Pipeline:
    """One source schema, its derived columns and the windows computed over it."""

    name: str
    format: str
    entity_column: str
    event_time_column: str
    columns: dict[str, str]
    out_of_orderness_s: float
    allowed_lateness_s: float
    derived: tuple[Derived, ...]
    windows: tuple[Window, ...]

    @property
    def watermark_delay_s(self) -> float:
        """How far the watermark trails the newest event time.

        Window TVFs have no late firing, and the store keeps one value per event time, so
        allowed lateness is folded into the watermark: an event up to out_of_orderness +
        allowed_lateness behind the newest one still counts; a later one is dead-lettered.
        """
        return self.out_of_orderness_s + self.allowed_lateness_s

    def numeric_columns(self) -> list[str]:
        """Source and derived columns that aggregates may read."""
        source = [c for c, t in self.columns.items() if t != "string"]
        return source + [d.name for d in self.derived]


def _fail(where: str, message: str) -> InvalidArgumentError:
    return InvalidArgumentError(f"{where}: {message}")


def _name(value: object, where: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise _fail(where, f"{value!r} is not a valid name (letters, digits, underscores)")
    return value


def _positive(section: dict, key: str, where: str, default: float | None = None) -> float:
    value = section.get(key, default)
    if not isinstance(value, int | float) or value < 0 or (value == 0 and key.endswith("size_s")):
        raise _fail(where, f"{key} must be a positive number of seconds, got {value!r}")
    return float(value)


def _aggregates(
    features: object, columns: list[str], strings: list[str], where: str
) -> tuple[Aggregate, ...]:
    if not isinstance(features, dict) or not features:
        raise _fail(where, 'features must be a table like { txn_count = "count" }')
    out = []
    for name, text in features.items():
        match = _AGGREGATE.match(str(text))
        if not match:
            raise _fail(where, f"feature {name}: {text!r} is not one of {', '.join(FUNCTIONS)}")
        fn, column = match.group(1), match.group(2) or ""
        allowed = columns + strings if fn == "count_distinct" else columns
        if fn != "count" and column not in allowed:
            raise _fail(where, f"feature {name}: {fn} needs one of the columns {allowed}")
        out.append(Aggregate(_name(name, where), fn, column))
    return tuple(out)


def _window(section: dict, columns: list[str], strings: list[str], where: str) -> Window:
    kind = section.get("kind", "hop")
    if kind not in ("hop", "tumble"):
        raise _fail(where, f"kind must be hop or tumble, got {kind!r}")
    size = _positive(section, "size_s", where)
    slide = _positive(section, "slide_s", where, size) if kind == "hop" else size
    if slide <= 0 or slide > size or (size / slide) != int(size / slide):
        raise _fail(where, f"slide_s {slide} must divide size_s {size}")
    view = _name(section.get("view"), f"{where}.view")
    return Window(
        view, kind, size, slide, _aggregates(section.get("features"), columns, strings, where)
    )


def _derived(section: dict, columns: dict[str, str], where: str) -> Derived:
    kind = section.get("kind")
    if kind not in DERIVED_KINDS:
        raise _fail(where, f"kind must be one of {DERIVED_KINDS}, got {kind!r}")
    lat, lon = section.get("lat"), section.get("lon")
    for col in (lat, lon):
        if columns.get(col) != "double":
            raise _fail(where, f"{col!r} must be a double column of the source")
    point = section.get("point")
    if not isinstance(point, list) or len(point) != 2:
        raise _fail(where, "point must be [latitude, longitude]")
    return Derived(_name(section.get("name"), where), kind, lat, lon, (point[0], point[1]))


def parse_pipeline(section: dict, index: int = 0) -> Pipeline:
    """One [[pipeline]] table, validated; errors name the section and the field."""
    name = _name(section.get("name"), f"pipeline[{index}].name")
    where = f"pipeline {name}"
    fmt = section.get("format", "csv")
    if fmt not in FORMATS:
        raise _fail(where, f"format must be one of {FORMATS}, got {fmt!r}")
    columns = section.get("columns")
    if not isinstance(columns, dict) or not columns:
        raise _fail(where, 'columns must be a table like { card_id = "bigint" }')
    for col, typ in columns.items():
        _name(col, f"{where}.columns")
        if typ not in COLUMN_TYPES:
            raise _fail(where, f"column {col}: type must be one of {list(COLUMN_TYPES)}")
    entity = section.get("entity_column")
    event_time = section.get("event_time_column")
    for key, col in (("entity_column", entity), ("event_time_column", event_time)):
        if columns.get(col) != "bigint":
            raise _fail(where, f"{key} {col!r} must name a bigint column of the source")
    derived = tuple(
        _derived(d, columns, f"{where}.derived[{i}]")
        for i, d in enumerate(section.get("derived", []))
    )
    pipeline = Pipeline(
        name, fmt, entity, event_time, dict(columns),
        _positive(section, "out_of_orderness_s", where, 0.0),
        _positive(section, "allowed_lateness_s", where, 0.0),
        derived, (),
    )  # fmt: skip
    numeric = pipeline.numeric_columns()
    strings = [c for c, t in columns.items() if t == "string"]
    windows = tuple(
        _window(w, numeric, strings, f"{where}.window[{i}]")
        for i, w in enumerate(section.get("window", []))
    )
    if not windows:
        raise _fail(where, "needs at least one [[pipeline.window]]")
    views = [w.view for w in windows]
    if len(set(views)) != len(views):
        raise _fail(where, f"each window needs its own view, got {views}")
    return Pipeline(**{**pipeline.__dict__, "windows": windows})


def load_pipelines(path: Path | str) -> list[Pipeline]:
    """Every [[pipeline]] of a features.toml file."""
    with open(path, "rb") as f:
        doc = tomllib.load(f)
    sections = doc.get("pipeline", [])
    if not sections:
        raise InvalidArgumentError(f"{path}: no [[pipeline]] section; see pipelines/config.py")
    return [parse_pipeline(s, i) for i, s in enumerate(sections)]
