"""The window job: Flink SQL window TVFs per entity, written to featureserve by a vectorised sink.

Flink's own operators parse, watermark and window the events; Python runs only pandas UDFs
over Arrow batches: the derived columns (shared Numba kernels), the sink and the dead-letter
writer. Sums and means are the shared exact_sum kernel's over each window's values (collected by
ARRAY_AGG), not Flink's SUM and AVG, which add in arrival order: so a window's value is the one
the offline window kernels give, whatever order its events came in. Distinct counts come from
the same values (Flink's batch planner cannot mix COUNT(DISTINCT) with ARRAY_AGG). The same
statements run in streaming mode (a watched folder or Kafka) and in batch mode (backfill.py).
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from pyflink.table import DataTypes, EnvironmentSettings, TableEnvironment
from pyflink.table.udf import FunctionContext, ScalarFunction, udf

from clients.channel import ClientConfig
from featurestore.errors import FeatureStoreError, InvalidArgumentError, UnavailableError
from featurestore.kernels.exact_sum import segment_sums_and_means
from pipelines.config import COLUMN_TYPES, Pipeline, Window, load_pipelines
from pipelines.dead_letter import DeadLetterWriter, count_by_reason, dead_letter_size
from pipelines.parse_check import ParseChecker
from pipelines.sink import FeatureSink, SinkConfig, SinkCounters, read_stats

ROWTIME = "event_rowtime"
PACKAGES = ("pipelines", "clients", "protos", "featurestore")
_SQL_AGG = {"count": "COUNT(*)", "min": "MIN({c})", "max": "MAX({c})"}
_FROM_VALUES = ("sum", "mean", "count_distinct")
_VALUES = "{} values"  # a space: never a feature's name
_DOUBLE_MAX = "1.7976931348623157E308"
# A plain decimal: no NaN/Infinity words (Calcite folds `v <> v` away), no hex or d/f suffixes.
_DECIMAL = r"^[+-]?([0-9]+[.]?[0-9]*|[.][0-9]+)([eE][+-]?[0-9]+)?$"
# The rowtime of a rejected row: at the epoch, so it never moves the watermark (a kept row's
# event time is > 0, as the server requires).
_REJECTED_MS = 0
_SCAN_BLOCK = 16 << 20
# Jackson's CSV errors that escape Flink's ignore-parse-errors (see pipelines/parse_check.py).
_READER_FAILURE = re.compile(r"Missing closing quote for value|Expected column separator")


@dataclass
class JobOptions:
    """Where a job reads, where it writes, and how it runs."""

    source: Path
    target: str | ClientConfig
    definitions: Path
    bounded: bool = False
    parallelism: int = 1
    monitor_interval_s: float = 1.0
    dead_letter: Path | None = None
    stats_dir: Path | None = None
    jobmanager: str | None = None
    kafka_jar: Path | None = None
    kafka_topic: str | None = None
    bootstrap_servers: str | None = None
    retry_bound_s: float = 30.0
    message_rows: int = 2000
    arrow_batch_rows: int = 10_000
    bundle_time_ms: int = 200
    check_views: bool = True
    max_clock_skew_s: float = 300.0
    source_idle_timeout_s: float = 5.0

    def dead_letter_path(self) -> Path:
        """The dead-letter file: beside the source folder unless given."""
        if self.dead_letter is not None:
            return Path(self.dead_letter)
        source = Path(self.source)
        return source.parent / f"{source.name}.dead-letter.jsonl"


@dataclass
class JobReport:
    """What a finished (or stopped) job did."""

    mode: str
    seconds: float
    sinks: dict[str, SinkCounters] = field(default_factory=dict)
    dead_letters: dict[str, int] = field(default_factory=dict)
    incomplete_windows: dict[str, int] = field(default_factory=dict)


def _interval(seconds: float) -> str:
    """A DAY TO SECOND(3) literal (up to 99 days; the form Flink's code generator accepts)."""
    ms = round(seconds * 1000)
    days, ms = divmod(ms, 86_400_000)
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    return f"INTERVAL '{days} {hours:02d}:{minutes:02d}:{ms / 1000:06.3f}' DAY TO SECOND(3)"


@dataclass(frozen=True)
class WindowColumns:
    """What the window query hands the sink after the key and window end: Flink's aggregates
    (`native`, feature names), then each window's values of every column in `collected`;
    `from_values` names each feature computed from those values, its function and column."""

    native: tuple[str, ...]
    collected: tuple[str, ...]
    from_values: tuple[tuple[str, str, str], ...]


def _features_from_values(
    columns: WindowColumns, arrays: tuple[pd.Series, ...]
) -> dict[str, np.ndarray]:
    """Sums and means (exact_sum: exactly rounded) and distinct counts, one per window, from each
    window's values."""
    flat: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for column, series in zip(columns.collected, arrays, strict=True):
        windows = series.to_list()
        offsets = np.zeros(len(windows) + 1, np.int64)
        np.cumsum(np.fromiter(map(len, windows), np.int64, len(windows)), out=offsets[1:])
        flat[column] = (np.concatenate(windows) if windows else np.empty(0)), offsets
    summed: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # a column's sums and means, once
    out = {}
    for name, fn, column in columns.from_values:
        values, offsets = flat[column]
        if fn == "count_distinct":
            out[name] = _distinct_counts(values, offsets)
            continue
        if column not in summed:
            as_doubles = values.astype(np.float64, copy=False)
            summed[column] = segment_sums_and_means(as_doubles, offsets)
        sums, means = summed[column]
        out[name] = sums if fn == "sum" else means
    return out


def _distinct_counts(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Distinct values per segment values[offsets[i]:offsets[i+1]]."""
    codes, uniques = pd.factorize(values)
    segment = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    pairs = np.unique(segment * max(len(uniques), 1) + codes)
    return np.bincount(pairs // max(len(uniques), 1), minlength=len(offsets) - 1)


class WindowSink(ScalarFunction):
    """Pandas UDF: writes a batch of window rows to one view and returns once it is durable.

    With skip_incomplete (bounded input, where the end of input fires every window) a window
    that ends after now is incomplete: it is counted, not written. A window whose double
    feature is not finite (a sum of finite events overflowed) is dead-lettered, as an infinite
    event is.
    """

    def __init__(self, config: SinkConfig, columns: WindowColumns, skip_incomplete: bool,
                 dead_letter: Path, run: str) -> None:  # fmt: skip
        self.config, self.columns, self.skip_incomplete = config, columns, skip_incomplete
        self.dead_letter, self.run = dead_letter, run
        self.sink: FeatureSink | None = None
        self.writer: DeadLetterWriter | None = None
        self.incomplete = 0

    def open(self, function_context: FunctionContext) -> None:
        self.sink = FeatureSink(self.config)
        self.writer = DeadLetterWriter(self.dead_letter, self.run)

    def eval(self, keys: pd.Series, window_end: pd.Series, *values: pd.Series) -> pd.Series:
        n = len(keys)
        key_a = keys.to_numpy(np.int64)
        end_us = window_end.to_numpy().astype("datetime64[us]").astype(np.int64)
        native = len(self.columns.native)
        cols = {
            name: v.to_numpy() for name, v in zip(self.columns.native, values[:native], strict=True)
        }
        cols |= _features_from_values(self.columns, values[native:])
        keep = np.ones(n, dtype=np.bool_)
        if self.skip_incomplete:
            keep = end_us <= time.time_ns() // 1000
            if not keep.all():
                self._count_incomplete(n - int(keep.sum()))
        infinite = {name: ~np.isfinite(v) for name, v in cols.items() if v.dtype.kind == "f"}
        overflow = np.logical_or.reduce(list(infinite.values()), initial=False) & keep
        if overflow.any():
            self._overflow(key_a[overflow], end_us[overflow], cols, infinite, overflow)
            keep &= ~overflow
        if not keep.all():
            key_a, end_us = key_a[keep], end_us[keep]
            cols = {name: v[keep] for name, v in cols.items()}
        self.sink.write(key_a, end_us, cols)
        return pd.Series(np.ones(n, dtype=np.int8))

    def _overflow(self, keys, end_us, cols, infinite, rows) -> None:
        names = [[f for f, bad in infinite.items() if bad[i]] for i in np.flatnonzero(rows)]
        reasons = [
            f"overflow: {', '.join(f)} of view {self.config.view} is not finite (the window's "
            "sum overflowed a double); scale the source column down"
            for f in names
        ]
        records = {self.config.key_column: keys, "window_end_us": end_us}
        self.writer.write(reasons, records | {f: v[rows] for f, v in cols.items()})

    def _count_incomplete(self, rows: int) -> None:
        self.incomplete += rows
        folder = Path(self.config.stats_dir) / "incomplete"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{self.config.view}-{os.getpid()}-{id(self):x}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"view": self.config.view, "windows": self.incomplete}))
        os.replace(tmp, path)

    def close(self) -> None:
        if self.sink is not None:
            self.sink.close()


class DeadLetterSink(ScalarFunction):
    """Pandas UDF: appends rejected events and their reasons to the dead-letter file."""

    def __init__(self, path: Path, columns: list[str], run: str) -> None:
        self.path, self.columns, self.run = path, columns, run
        self.writer: DeadLetterWriter | None = None

    def open(self, function_context: FunctionContext) -> None:
        self.writer = DeadLetterWriter(self.path, self.run)

    def eval(self, reason: pd.Series, *values: pd.Series) -> pd.Series:
        records = {n: v.tolist() for n, v in zip(self.columns, values, strict=True)}
        self.writer.write(reason.tolist(), records)
        return pd.Series(np.ones(len(reason), dtype=np.int8))


class DistanceToPoint(ScalarFunction):
    """Pandas UDF: haversine km from each event to a fixed point, by the shared Numba kernel."""

    def __init__(self, point: tuple[float, float]) -> None:
        self.point = point

    def eval(self, lat: pd.Series, lon: pd.Series) -> pd.Series:
        from featurestore.kernels.spatial import distance_to_point_km

        lat_a, lon_a = lat.to_numpy(np.float64), lon.to_numpy(np.float64)
        return pd.Series(distance_to_point_km(lat_a, lon_a, self.point[0], self.point[1]))


def create_table_env(options: JobOptions, streaming: bool) -> TableEnvironment:
    """A table environment: local mini-cluster, or a remote cluster with --jobmanager."""
    mode = (
        EnvironmentSettings.in_streaming_mode()
        if streaming
        else EnvironmentSettings.in_batch_mode()
    )
    t_env = TableEnvironment.create(mode)
    conf = t_env.get_config()
    conf.set("python.executable", sys.executable)
    conf.set("python.client.executable", sys.executable)
    conf.set("table.local-time-zone", "UTC")
    conf.set("parallelism.default", str(options.parallelism))
    conf.set("python.fn-execution.arrow.batch.size", str(options.arrow_batch_rows))
    conf.set("python.fn-execution.bundle.size", str(options.arrow_batch_rows * 10))
    conf.set("python.fn-execution.bundle.time", str(options.bundle_time_ms))
    conf.set("pipeline.name", f"featureserve-{'streaming' if streaming else 'backfill'}")
    if streaming:
        # A source subtask with no split (one file, parallelism 2) would hold the watermark back
        # for good: idle subtasks stop counting towards it.
        conf.set(
            "table.exec.source.idle-timeout", f"{round(options.source_idle_timeout_s * 1000)} ms"
        )
    if options.jobmanager:
        host, _, port = options.jobmanager.rpartition(":")
        conf.set("execution.target", "remote")
        conf.set("rest.address", host)
        conf.set("rest.port", port)
        root = Path(__file__).resolve().parent.parent
        conf.set("python.files", ",".join(str(root / p) for p in PACKAGES))
    if options.kafka_jar:
        conf.set("pipeline.jars", Path(options.kafka_jar).resolve().as_uri())
    return t_env


def _connector(pipeline: Pipeline, options: JobOptions, streaming: bool) -> str:
    fmt = pipeline.format
    opts = {f"{fmt}.ignore-parse-errors": "true"}
    if options.kafka_topic:
        opts.update({
            "connector": "kafka", "topic": options.kafka_topic, "format": fmt,
            "properties.bootstrap.servers": options.bootstrap_servers or "localhost:9092",
            "properties.group.id": f"featureserve-{pipeline.name}",
            "scan.startup.mode": "group-offsets",
            "properties.auto.offset.reset": "earliest",
        })  # fmt: skip
    else:
        opts.update({"connector": "filesystem", "path": str(Path(options.source).resolve())})
        opts["format"] = fmt
        if streaming and not options.bounded:
            opts["source.monitor-interval"] = f"{int(options.monitor_interval_s * 1000)} ms"
    return ", ".join(f"'{k}' = '{v}'" for k, v in opts.items())


def _reason_sql(pipeline: Pipeline) -> str:
    """First problem of a raw (all-STRING) row, or NULL when the row is well formed (a future
    event time aside: see _future_sql).

    TRY_CAST alone is too lenient: it truncates '110.5' to the BIGINT 110 (another entity's
    key) and reads 'NaN' and '1e400' as doubles the server rejects, failing the whole job.
    """
    cases = []
    for col, typ in pipeline.columns.items():
        c = f"`{col}`"
        if typ == "string":
            cases.append(f"WHEN {c} IS NULL THEN 'malformed: {col} is missing'")
            continue
        cast = f"TRY_CAST({c} AS {COLUMN_TYPES[typ]})"
        cases.append(f"WHEN {cast} IS NULL THEN 'malformed: {col} is missing or not a {typ}'")
        if typ == "bigint":
            cases.append(
                f"WHEN NOT REGEXP(TRIM({c}), '^[+-]?[0-9]+$') "
                f"THEN 'malformed: {col} is not a bigint'"
            )
            if col == pipeline.event_time_column:
                cases.append(
                    f"WHEN {cast} <= 0 THEN 'malformed: {col} is not after the epoch; epoch "
                    "milliseconds > 0 expected'"
                )
        else:
            cases.append(
                f"WHEN NOT REGEXP(TRIM({c}), '{_DECIMAL}') OR ABS({cast}) > {_DOUBLE_MAX} "
                f"THEN 'malformed: {col} is not a finite double'"
            )
    return "CASE " + " ".join(cases) + " ELSE CAST(NULL AS STRING) END"


def _rowtime_sql(pipeline: Pipeline, options: JobOptions) -> str:
    """The event time of a row that passes every check, else the epoch (never moving the
    watermark); evaluated once per row, in the source, as it reads the clock."""
    event_ms = f"TRY_CAST(`{pipeline.event_time_column}` AS BIGINT)"
    limit_ms = f"(UNIX_TIMESTAMP() + {round(options.max_clock_skew_s)}) * 1000"
    ok = f"({_reason_sql(pipeline)}) IS NULL AND {event_ms} <= {limit_ms}"
    return f"TO_TIMESTAMP_LTZ(CASE WHEN {ok} THEN {event_ms} ELSE {_REJECTED_MS} END, 3)"


def _watermark_sql(pipeline: Pipeline) -> str:
    """The newest event time, but never past the clock as the row is read, minus the delay: an
    event dated ahead (allowed up to the clock skew) neither makes the on-time events after it
    late nor fires windows that end after now, before their events have come."""
    return f"LEAST({ROWTIME}, CURRENT_ROW_TIMESTAMP()) - {_interval(pipeline.watermark_delay_s)}"


def _full_reason_sql(pipeline: Pipeline, options: JobOptions) -> str:
    """_reason_sql, else a future event time: read off the rowtime, so it is decided once."""
    col = pipeline.event_time_column
    future = (
        f"CASE WHEN {ROWTIME} = TO_TIMESTAMP_LTZ({_REJECTED_MS}, 3) THEN CONCAT('malformed: "
        f"{col} ', `{col}`, ' is after now + {round(options.max_clock_skew_s)} s (the "
        "server''s max_clock_skew_seconds); epoch milliseconds expected') END"
    )
    return f"COALESCE({_reason_sql(pipeline)}, {future})"


def _window_sql(pipeline: Pipeline, window: Window, events: str) -> tuple[str, WindowColumns]:
    if window.kind == "hop":
        tvf = f"HOP(TABLE {events}, DESCRIPTOR({ROWTIME}), {_interval(window.slide_s)}, "
        tvf += f"{_interval(window.size_s)})"
    else:
        tvf = f"TUMBLE(TABLE {events}, DESCRIPTOR({ROWTIME}), {_interval(window.size_s)})"
    native = [a for a in window.aggregates if a.fn not in _FROM_VALUES]
    from_values = [a for a in window.aggregates if a.fn in _FROM_VALUES]
    collected = tuple(dict.fromkeys(a.column for a in from_values))
    aggs = []
    for agg in native:
        expr = _SQL_AGG[agg.fn].format(c=f"`{agg.column}`")
        sql_type = "BIGINT" if agg.dtype.name == "INT64" else "DOUBLE"
        aggs.append(f"CAST({expr} AS {sql_type}) AS `{agg.name}`")
    aggs += [f"ARRAY_AGG(`{c}`) AS `{_VALUES.format(c)}`" for c in collected]
    entity = f"`{pipeline.entity_column}`"
    select = f"SELECT {entity}, window_end, {', '.join(aggs)} FROM TABLE({tvf}) "
    select += f"GROUP BY {entity}, window_start, window_end"
    columns = WindowColumns(
        native=tuple(a.name for a in native),
        collected=collected,
        from_values=tuple((a.name, a.fn, a.column) for a in from_values),
    )
    return select, columns


def add_pipeline(t_env: TableEnvironment, statements, pipeline: Pipeline, options: JobOptions,
                 streaming: bool, stats_dir: Path, run: str) -> None:  # fmt: skip
    """Declare the source, parsed and event views, and add the window and dead-letter inserts."""
    p = pipeline.name
    raw_cols = ", ".join(f"`{c}` STRING" for c in pipeline.columns)
    t_env.execute_sql(
        f"CREATE TEMPORARY TABLE {p}_src ({raw_cols}, "
        f"{ROWTIME} AS {_rowtime_sql(pipeline, options)}, "
        f"WATERMARK FOR {ROWTIME} AS {_watermark_sql(pipeline)}) "
        f"WITH ({_connector(pipeline, options, streaming)})"
    )
    typed = ", ".join(
        f"TRY_CAST(`{c}` AS {COLUMN_TYPES[t]}) AS `{c}`" if t != "string" else f"`{c}`"
        for c, t in pipeline.columns.items()
    )
    reason = _full_reason_sql(pipeline, options)
    # One late decision, right after the source, for both the windows and the dead letters: a
    # row reaches the window operator before any later watermark, so a row kept here is never
    # dropped there, and a late row is never counted (the window's own watermark lags, as the
    # Python operators hold watermarks until a bundle ends).
    late = "CAST(NULL AS STRING)"
    if streaming:
        wm = f"CURRENT_WATERMARK({ROWTIME})"
        late = (
            f"CASE WHEN {ROWTIME} <= {wm} THEN CONCAT('late: event time ', "
            f"CAST({ROWTIME} AS STRING), ' is {pipeline.watermark_delay_s:g} s or more behind "
            f"the newest event, or the clock if that was earlier (watermark ', "
            f"CAST({wm} AS STRING), ')') END"
        )
    t_env.execute_sql(
        f"CREATE TEMPORARY VIEW {p}_parsed AS SELECT {typed}, {ROWTIME}, {reason} AS reason, "
        f"{late} AS late FROM {p}_src"
    )
    derived = []
    for d in pipeline.derived:
        fn = f"{p}_{d.name}_udf"
        t_env.create_temporary_function(
            fn, udf(DistanceToPoint(d.point), result_type=DataTypes.DOUBLE(), func_type="pandas")
        )
        derived.append(f"{fn}(`{d.lat}`, `{d.lon}`) AS `{d.name}`")
    cols = ", ".join([f"`{c}`" for c in pipeline.columns] + derived + [ROWTIME])
    t_env.execute_sql(
        f"CREATE TEMPORARY VIEW {p}_events AS SELECT {cols} FROM {p}_parsed "
        "WHERE reason IS NULL AND late IS NULL"
    )
    t_env.execute_sql(
        f"CREATE TEMPORARY TABLE {p}_done (ok TINYINT) WITH ('connector' = 'blackhole')"
    )
    for window in pipeline.windows:
        select, window_columns = _window_sql(pipeline, window, f"{p}_events")
        config = SinkConfig(
            target=options.target, view=window.view, key_column=pipeline.entity_column,
            retry_bound_s=options.retry_bound_s, message_rows=options.message_rows,
            stats_dir=stats_dir,
        )  # fmt: skip
        fn = f"{p}_{window.view}_sink"
        complete_only = options.bounded or not streaming
        window_sink = WindowSink(
            config, window_columns, complete_only, options.dead_letter_path(), run
        )
        sink = udf(window_sink, result_type=DataTypes.TINYINT(), func_type="pandas")
        t_env.create_temporary_function(fn, sink)
        outputs = [*window_columns.native, *map(_VALUES.format, window_columns.collected)]
        cols = ", ".join(
            [f"`{pipeline.entity_column}`", "window_end"] + [f"`{n}`" for n in outputs]
        )
        statements.add_insert_sql(f"INSERT INTO {p}_done SELECT {fn}({cols}) FROM ({select})")
    columns = list(pipeline.columns)
    dead = DeadLetterSink(options.dead_letter_path(), columns, run)
    t_env.create_temporary_function(
        f"{p}_dead_letter", udf(dead, result_type=DataTypes.TINYINT(), func_type="pandas")
    )
    raw = ", ".join(f"`{c}`" for c in columns)
    as_text = ", ".join(f"CAST(`{c}` AS STRING)" for c in columns)
    rejected = f"SELECT {reason} AS reason, {raw} FROM {p}_src WHERE ({reason}) IS NOT NULL"
    if streaming:
        rejected += (
            f" UNION ALL SELECT late, {as_text} FROM {p}_parsed "
            "WHERE reason IS NULL AND late IS NOT NULL"
        )
    statements.add_insert_sql(
        f"INSERT INTO {p}_done SELECT {p}_dead_letter(reason, {raw}) FROM ({rejected})"
    )


def _first_non_utf8(folder: Path) -> tuple[Path, int] | None:
    """The first file and line under folder that is not UTF-8, decoding blocks of whole lines."""
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.name[0] != ".")
    for path in files:
        lines, rest = 0, b""
        with path.open("rb") as f:
            while True:
                block = f.read(_SCAN_BLOCK)
                data = rest + block
                cut = data.rfind(b"\n") + 1 if block else len(data)
                try:
                    data[:cut].decode()
                except UnicodeDecodeError as exc:
                    return path, lines + data.count(b"\n", 0, exc.start) + 1
                lines, rest = lines + data.count(b"\n", 0, cut), data[cut:]
                if not block:
                    break
    return None


def _not_utf8(options: JobOptions) -> InvalidArgumentError:
    """Name the input that Flink's reader could not decode (its own error names no file)."""
    fix = "re-encode it as UTF-8 or remove the row, then rerun the job"
    if options.kafka_topic:
        return InvalidArgumentError(f"a record on Kafka topic {options.kafka_topic!r} is not "
                                    f"valid UTF-8; {fix}")  # fmt: skip
    found = _first_non_utf8(Path(options.source))
    where = f"{found[0]} line {found[1]}" if found else f"a file under {options.source}"
    return InvalidArgumentError(f"input {where} is not valid UTF-8; {fix}")


def _job_error(
    exc: Exception, options: JobOptions, checker: ParseChecker | None = None
) -> FeatureStoreError:
    """The sink's own message out of a Flink job failure, a named undecodable or unreadable
    input, else the first Java cause."""
    text = str(exc)
    if checker is not None and _READER_FAILURE.search(text):
        checker.stop()
        try:  # the file may have come after the checker's last look
            checker.scan_new()
        except InvalidArgumentError as failure:
            return failure
        if checker.failure is not None:
            return checker.failure
    if "CharConversionException" in text:
        return _not_utf8(options)
    for kind in ("UnavailableError", "InvalidArgumentError"):
        match = re.search(rf"{kind}: (.+)", text)
        if match:
            cls = UnavailableError if kind == "UnavailableError" else InvalidArgumentError
            return cls(match.group(1).strip())
    causes = re.findall(r"Caused by: (.+)", text)
    return UnavailableError(f"pipeline job failed: {causes[-1] if causes else text[:2000]}")


def _incomplete_windows(stats_dir: Path) -> dict[str, int]:
    """Windows per view that the sinks left unwritten because they end after now."""
    out: dict[str, int] = {}
    for path in sorted((stats_dir / "incomplete").glob("*.json")):
        entry = json.loads(path.read_text())
        out[entry["view"]] = out.get(entry["view"], 0) + entry["windows"]
    return out


def run_job(
    options: JobOptions, streaming: bool, pipelines: list[Pipeline] | None = None
) -> JobReport:
    """Build every pipeline of the definitions file into one Flink job and run it to the end."""
    from pipelines.checks import check_views

    pipelines = pipelines if pipelines is not None else load_pipelines(options.definitions)
    if options.check_views:
        check_views(options.target, pipelines)
    json_files = not options.kafka_topic and any(p.format == "json" for p in pipelines)
    # Flink's JSON reader drops an undecodable line with the other parse errors: look first.
    if json_files and _first_non_utf8(Path(options.source)) is not None:
        raise _not_utf8(options)
    stats_dir = Path(options.stats_dir or tempfile.mkdtemp(prefix="featureserve-sink-"))
    dead_start = dead_letter_size(options.dead_letter_path())
    run = uuid.uuid4().hex
    started = time.monotonic()
    checker = None
    if not options.kafka_topic:  # Kafka records are not checked: the reader's drops stay silent
        formats = {p.name: (p.format, len(p.columns)) for p in pipelines}
        writer = DeadLetterWriter(options.dead_letter_path(), run)
        checker = ParseChecker(Path(options.source), formats, writer)
        checker.scan_new()
    t_env = create_table_env(options, streaming)
    statements = t_env.create_statement_set()
    for pipeline in pipelines:
        add_pipeline(t_env, statements, pipeline, options, streaming, stats_dir, run)
    try:
        if checker is not None and streaming and not options.bounded:
            checker.watch(options.monitor_interval_s)  # here, so the finally always stops it
        statements.execute().wait()
    except Exception as exc:
        raise _job_error(exc, options, checker) from None
    finally:
        if checker is not None:
            checker.stop()
    views = [w.view for p in pipelines for w in p.windows]
    return JobReport(
        mode="streaming" if streaming else "backfill",
        seconds=time.monotonic() - started,
        sinks={v: read_stats(stats_dir, v) for v in views},
        dead_letters=count_by_reason(options.dead_letter_path(), dead_start, run),
        incomplete_windows=_incomplete_windows(stats_dir),
    )


def run_streaming(options: JobOptions) -> JobReport:
    """The streaming job; with options.bounded it reads the folder once and fires every window."""
    return run_job(options, streaming=True)
