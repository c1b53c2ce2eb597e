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
    # ttl_s = 90                         # optional; default slide + watermark delay + 10 s

    [pipeline.window.features]           # count | count_distinct(c) | sum | mean | min | max
    txn_count = "count"
    amount_sum = "sum(amount)"
    distance_mean = "mean(distance_km)"
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from featurestore.definitions import TOP_LEVEL_KEYS, read_toml
from featurestore.dtypes import DType
from featurestore.errors import InvalidArgumentError

COLUMN_TYPES = {"bigint": "BIGINT", "double": "DOUBLE", "string": "STRING"}
FUNCTIONS = ("count", "count_distinct", "sum", "mean", "min", "max")
DERIVED_KINDS = ("haversine_to_point",)
FORMATS = ("csv", "json")
_WINDOW_COLUMNS = ("window_start", "window_end", "window_time")
RESERVED_COLUMNS = ("reason", "late", "event_rowtime", *_WINDOW_COLUMNS)
"""Columns the job adds beside the source's (streaming.py): no source or derived column may
take one's name, nor may a feature take a window column's."""
MIN_INTERVAL_S = 0.001
MAX_INTERVAL_S = 99 * 86_400
"""Flink's DAY TO SECOND(3) interval holds whole milliseconds and at most two digits of days."""
TTL_MARGIN_S = 10
"""Seconds a window's default TTL allows for its firing and the sink's durable write."""
MAX_TTL_S = 3650 * 86_400
"""The longest ttl_s a window takes (10 years); 0 means no limit."""
_PIPELINE_KEYS = {
    "name", "format", "entity_column", "event_time_column", "out_of_orderness_s",
    "allowed_lateness_s", "columns", "derived", "window",
}  # fmt: skip
_DERIVED_KEYS = {"name", "kind", "lat", "lon", "point"}
_WINDOW_KEYS = {"view", "kind", "size_s", "slide_s", "ttl_s", "features"}
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
    """A hop (sliding) or tumble window per entity, written to one feature view.

    ttl_s is the view's TTL the definitions set (0 = no limit), None for the default
    (Pipeline.ttl_seconds).
    """

    view: str
    kind: str
    size_s: float
    slide_s: float
    aggregates: tuple[Aggregate, ...]
    ttl_s: int | None = None


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
        allowed lateness is folded into the watermark, which follows the newest event time
        but never passes the clock (streaming.py). An event is judged against the last
        watermark Flink emitted (periodically, every 200 ms by default), not against the
        newest event itself: one less than out_of_orderness + allowed_lateness behind the
        newest counts, one more than that behind it plus the emission interval is
        dead-lettered, and one in between may go either way.
        """
        return self.out_of_orderness_s + self.allowed_lateness_s

    def ttl_seconds(self, window: Window) -> int:
        """The TTL of the view a window writes: Flink never emits an empty window, so an
        entity's last window stays in the store after the entity goes quiet. It is current
        until the next window would have fired: one slide after its end, plus the watermark
        delay, rounded up to whole seconds, plus TTL_MARGIN_S; ttl_s overrides it."""
        if window.ttl_s is not None:
            return window.ttl_s
        delay_ms = round(self.out_of_orderness_s * 1000) + round(self.allowed_lateness_s * 1000)
        return -(-(round(window.slide_s * 1000) + delay_ms) // 1000) + TTL_MARGIN_S

    def numeric_columns(self) -> list[str]:
        """Source and derived columns that aggregates may read."""
        source = [c for c, t in self.columns.items() if t != "string"]
        return source + [d.name for d in self.derived]


def _fail(where: str, message: str) -> InvalidArgumentError:
    return InvalidArgumentError(f"{where}: {message}")


def _table(value: object, where: str, known: set[str]) -> dict:
    """value as a TOML table whose keys are all known: a typo must not pass as a default."""
    if not isinstance(value, dict):
        raise _fail(where, f"expected a table, got {type(value).__name__} {value!r}")
    unknown = sorted(set(value) - known)
    if unknown:
        raise _fail(where, f"unknown key(s) {unknown}; the known keys are {sorted(known)}")
    return value


def _tables(section: dict, key: str, where: str, header: str) -> list[dict]:
    value = section.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise _fail(where, f"expected an array of tables ({header} sections), got {value!r}")
    return value


def _name(value: object, where: str) -> str:
    if value is None:
        raise _fail(where, "is required; give a name of letters, digits and underscores")
    if not isinstance(value, str) or not _NAME.match(value):
        raise _fail(
            where,
            f"{value!r} is not a valid name; use letters, digits and underscores, not starting "
            "with a digit",
        )
    return value


def _column_name(value: object, where: str) -> str:
    """A name the job can give a column: not one of the columns it adds itself."""
    name = _name(value, where)
    if name.lower() in RESERVED_COLUMNS:
        raise _fail(
            where,
            f"{name!r} is a column the job adds itself (reserved: {', '.join(RESERVED_COLUMNS)}); "
            "rename it (for a source column, name the file's field differently too)",
        )
    return name


def _seconds(
    section: dict, key: str, where: str, default: float | None = None, low: float = 0.0
) -> float:
    """A duration Flink can take: finite, from low to MAX_INTERVAL_S, whole milliseconds."""
    if key not in section and default is not None:
        return default
    value = section.get(key)
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or not low <= value <= MAX_INTERVAL_S:
        raise _fail(
            f"{where}.{key}",
            f"give a number of seconds from {low:g} to {MAX_INTERVAL_S} (99 days, the longest "
            f"interval Flink takes), got {value!r}",
        )
    if abs(value * 1000 - round(value * 1000)) > 1e-3:
        raise _fail(f"{where}.{key}", f"give whole milliseconds (Flink's precision), got {value!r}")
    return float(value)


def _ttl(section: dict, where: str) -> int | None:
    """A window's optional ttl_s: whole seconds from 0 (no limit) to MAX_TTL_S."""
    if "ttl_s" not in section:
        return None
    value = section["ttl_s"]
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or not 0 <= value <= MAX_TTL_S or value % 1:
        raise _fail(
            f"{where}.ttl_s",
            f"give whole seconds from 0 (no limit) to {MAX_TTL_S} (10 years), got {value!r}",
        )
    return int(value)


def _aggregates(
    features: object, columns: list[str], strings: list[str], entity: str, where: str
) -> tuple[Aggregate, ...]:
    if not isinstance(features, dict) or not features:
        raise _fail(where, 'features must be a table like { txn_count = "count" }')
    out = []
    for name, text in features.items():
        here = f"{where}.{name}"
        _name(name, here)
        if name.lower() in (entity.lower(), *_WINDOW_COLUMNS):
            raise _fail(here, f"{name!r} is a column of the window's own output; rename it")
        match = _AGGREGATE.match(text) if isinstance(text, str) else None
        if not match:
            raise _fail(here, f'{text!r} is not one of {", ".join(FUNCTIONS)}, e.g. "sum(amount)"')
        fn, column = match.group(1), match.group(2) or ""
        if fn == "count" and column:
            raise _fail(here, 'count takes no column (it counts events); write "count"')
        allowed = columns + strings if fn == "count_distinct" else columns
        if fn != "count" and column not in allowed:
            raise _fail(here, f"{fn} needs one of the columns {allowed}, got {column!r}")
        out.append(Aggregate(name, fn, column))
    return tuple(out)


def _window(
    section: dict, columns: list[str], strings: list[str], entity: str, where: str
) -> Window:
    _table(section, where, _WINDOW_KEYS)
    kind = section.get("kind", "hop")
    if kind not in ("hop", "tumble"):
        raise _fail(f"{where}.kind", f"must be hop or tumble, got {kind!r}")
    size = _seconds(section, "size_s", where, low=MIN_INTERVAL_S)
    if kind == "tumble" and "slide_s" in section:
        raise _fail(f"{where}.slide_s", 'is for hop windows only; remove it or set kind = "hop"')
    slide = _seconds(section, "slide_s", where, size, MIN_INTERVAL_S)
    size_ms, slide_ms = round(size * 1000), round(slide * 1000)
    if slide_ms > size_ms or size_ms % slide_ms:
        raise _fail(
            f"{where}.slide_s",
            f"{slide:g} must divide size_s {size:g} (a hop window is a whole number of slides)",
        )
    view = _name(section.get("view"), f"{where}.view")
    features = _aggregates(section.get("features"), columns, strings, entity, f"{where}.features")
    return Window(view, kind, size, slide, features, _ttl(section, where))


def _derived(section: dict, columns: dict[str, str], where: str) -> Derived:
    _table(section, where, _DERIVED_KEYS)
    name = _column_name(section.get("name"), f"{where}.name")
    if name.lower() in {c.lower() for c in columns}:
        raise _fail(f"{where}.name", f"{name!r} is already a source column; give another name")
    kind = section.get("kind")
    if kind not in DERIVED_KINDS:
        raise _fail(f"{where}.kind", f"must be one of {DERIVED_KINDS}, got {kind!r}")
    lat, lon = section.get("lat"), section.get("lon")
    doubles = [c for c, t in columns.items() if t == "double"]
    for key, col in (("lat", lat), ("lon", lon)):
        if col not in doubles:
            raise _fail(f"{where}.{key}", f"must name a double column of the source {doubles}, "
                        f"got {col!r}")  # fmt: skip
    point = section.get("point")
    numbers = isinstance(point, list) and len(point) == 2
    numbers = numbers and all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in point
    )
    if not numbers or not (-90 <= point[0] <= 90 and -180 <= point[1] <= 180):
        raise _fail(
            f"{where}.point",
            f"must be [latitude, longitude] in degrees, like [48.8566, 2.3522], got {point!r}",
        )
    return Derived(name, kind, lat, lon, (float(point[0]), float(point[1])))


def parse_pipeline(section: dict, index: int = 0) -> Pipeline:
    """One [[pipeline]] table, validated; errors name the section, the key and the fix."""
    if not isinstance(section, dict):
        raise _fail(f"pipeline[{index}]", f"expected a table, got {section!r}")
    name = _name(section.get("name"), f"pipeline[{index}].name")
    where = f"pipeline {name}"
    _table(section, where, _PIPELINE_KEYS)
    fmt = section.get("format", "csv")
    if fmt not in FORMATS:
        raise _fail(f"{where}.format", f"must be one of {FORMATS}, got {fmt!r}")
    columns = section.get("columns")
    if not isinstance(columns, dict) or not columns:
        raise _fail(f"{where}.columns", 'must be a table like { card_id = "bigint" }')
    for col, typ in columns.items():
        _column_name(col, f"{where}.columns.{col}")
        if not isinstance(typ, str) or typ not in COLUMN_TYPES:
            raise _fail(f"{where}.columns.{col}", f"type must be one of {list(COLUMN_TYPES)}, "
                        f"got {typ!r}")  # fmt: skip
    lowered = Counter(c.lower() for c in columns)
    twins = sorted(c for c in columns if lowered[c.lower()] > 1)
    if twins:
        raise _fail(f"{where}.columns", f"{twins} differ only in case; rename one of them")
    bigints = [c for c, t in columns.items() if t == "bigint"]
    for key in ("entity_column", "event_time_column"):
        if section.get(key) not in bigints:
            raise _fail(f"{where}.{key}", f"must name a bigint column of the source {bigints}, "
                        f"got {section.get(key)!r}")  # fmt: skip
    derived = tuple(
        _derived(d, columns, f"{where}.derived[{i}]")
        for i, d in enumerate(
            _tables(section, "derived", f"{where}.derived", "[[pipeline.derived]]")
        )
    )
    names = [d.name.lower() for d in derived]
    if len(set(names)) != len(names):
        raise _fail(f"{where}.derived", f"each derived column needs its own name, got {names}")
    out_of_orderness = _seconds(section, "out_of_orderness_s", where, 0.0)
    lateness = _seconds(section, "allowed_lateness_s", where, 0.0)
    if out_of_orderness + lateness > MAX_INTERVAL_S:
        raise _fail(
            where,
            f"out_of_orderness_s + allowed_lateness_s must be at most {MAX_INTERVAL_S} (99 days, "
            f"the longest interval Flink takes), got {out_of_orderness + lateness}",
        )
    entity = section["entity_column"]
    pipeline = Pipeline(
        name, fmt, entity, section["event_time_column"], dict(columns), out_of_orderness,
        lateness, derived, (),
    )  # fmt: skip
    numeric = pipeline.numeric_columns()
    strings = [c for c, t in columns.items() if t == "string"]
    windows = tuple(
        _window(w, numeric, strings, entity, f"{where}.window[{i}]")
        for i, w in enumerate(_tables(section, "window", f"{where}.window", "[[pipeline.window]]"))
    )
    if not windows:
        raise _fail(where, "needs at least one [[pipeline.window]]")
    views = [w.view for w in windows]
    if len(set(views)) != len(views):
        raise _fail(f"{where}.window", f"each window needs its own view, got {views}")
    return Pipeline(**{**pipeline.__dict__, "windows": windows})


def load_pipelines(path: Path | str) -> list[Pipeline]:
    """Every [[pipeline]] of a features.toml file, validated before any job starts; errors
    name the file, the key and the fix."""
    path = Path(path)
    doc = read_toml(path, "give its path with --definitions")
    try:
        _table(doc, "top level", TOP_LEVEL_KEYS)
        sections = _tables(doc, "pipeline", "pipeline", "[[pipeline]]")
        if not sections:
            raise _fail("top level", "no [[pipeline]] section; see pipelines/config.py")
        pipelines = [parse_pipeline(s, i) for i, s in enumerate(sections)]
        names = [p.name for p in pipelines]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise _fail("pipeline", f"names {twice} are used twice; give each pipeline its own")
        views = [w.view for p in pipelines for w in p.windows]
        twice = sorted({v for v in views if views.count(v) > 1})
        if twice:
            raise _fail("pipeline", f"views {twice} are written by two windows; give each its own")
    except InvalidArgumentError as exc:
        raise InvalidArgumentError(f"{path}: {exc}") from None
    return pipelines
