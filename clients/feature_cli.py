"""Feature store subcommands: `featureserve apply`, `delete-view`, `delete-service`, `ingest`
and `get`."""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np

from clients.channel import ClientError
from clients.cli import add_connection_flags, client_config
from clients.feature_client import FeatureStoreClient
from clients.feature_messages import OnlineFeatures
from featurestore.dtypes import DType, FeatureStatus
from featurestore.registry import JoinKey
from protos import arrays


def cmd_apply(args: argparse.Namespace) -> int:
    """Register the entities, views and feature services declared in a features.toml file
    (with --prune, delete those it does not declare; with --dry-run, say what would change and
    write nothing); a file that cannot be used as written exits 2, as other input errors do,
    and so does --prune with a file declaring nothing (it would empty the registry)."""
    from featurestore.definitions import load_definitions
    from featurestore.errors import InvalidArgumentError

    try:
        defs = load_definitions(args.file, "give the file as apply's FILE argument")
    except InvalidArgumentError as exc:
        print(f"featureserve: {exc}", file=sys.stderr)
        return 2
    if args.prune and not (defs.entities or defs.views or defs.feature_services):
        print(
            f"featureserve: {args.file}: declares no entity, feature view or feature service, "
            "so --prune would delete everything registered; declare what the registry should "
            "hold, or delete by hand (featureserve delete-view, delete-service)",
            file=sys.stderr,
        )
        return 2
    with FeatureStoreClient(client_config(args)) as client:
        results = client.apply(
            defs.entities,
            defs.views,
            dry_run=args.dry_run,
            feature_services=defs.feature_services,
            prune=args.prune,
        )
    for result in results:
        action = result.action
        if args.dry_run and action != "unchanged":
            action = f"would be {action}"
        if result.entity:
            print(f"entity {result.entity}: {action}")
        elif result.feature_service:
            print(f"service {result.feature_service}: {action}")
        else:
            print(f"{result.view}@{result.version}: {action}")
    if args.prune:
        deleted = sum(result.action == "deleted" for result in results)
        print(f"prune: {deleted} {'would be deleted' if args.dry_run else 'deleted'}")
    if args.dry_run:
        print("dry run: nothing was written; apply without --dry-run to write")
    return 0


def cmd_delete_view(args: argparse.Namespace) -> int:
    """Delete one version of a feature view: its definition, online rows and history."""
    with FeatureStoreClient(client_config(args)) as client:
        client.delete_feature_view(args.view, args.version)
    print(f"{args.view}@{args.version}: deleted")
    return 0


def cmd_delete_service(args: argparse.Namespace) -> int:
    """Delete one feature service; the views it reads stay."""
    if not args.name:
        print("featureserve: NAME: empty; name the feature service to delete", file=sys.stderr)
        return 2
    with FeatureStoreClient(client_config(args)) as client:
        client.delete_feature_service(args.name)
    print(f"service {args.name}: deleted")
    return 0


class _InputError(Exception):
    """Input (a file or a flag) that cannot be used as given; printed as `featureserve: ...`."""


CSV_BLOCK_BYTES = 1 << 20
"""pyarrow's CSV block size to start with (its default); a row must fit in one block."""
MAX_CSV_BLOCK_BYTES = 2**31 - 1
"""The largest block pyarrow takes."""


def _read_table(path: Path, text_columns: list[str], string_features: list[str]):
    """The file as an Arrow table. In a CSV, `text_columns` (the keys and features) are read as
    text for _convert to parse by the view's types; only empty cells are null, so "NaN" stays
    a NaN value, and a quoted "" in a STRING feature is the empty string. A file that cannot be
    read, or names a column twice, is an _InputError saying why."""
    import pyarrow as pa

    try:
        if path.suffix in (".parquet", ".pq"):
            import pyarrow.parquet as pq

            try:
                # Checked first: pyarrow refuses a schema with a name twice as "Multiple matches".
                _unique_columns(pq.read_schema(path).names, "schema")
                return pq.read_table(path)
            except pa.ArrowInvalid as exc:
                raise _InputError(f"not a Parquet file ({exc}); give a Parquet file") from None
        import pyarrow.csv as pcsv

        options = pcsv.ConvertOptions(
            null_values=[""],
            strings_can_be_null=True,
            column_types={name: pa.string() for name in text_columns},
        )
        block = CSV_BLOCK_BYTES
        while True:
            try:
                read = pcsv.ReadOptions(block_size=block)
                table = pcsv.read_csv(path, read_options=read, convert_options=options)
                break
            except pa.ArrowInvalid as exc:
                # A row longer than a block (a vector of 1M floats is ~10 MB of text).
                if "straddl" in str(exc) and block < MAX_CSV_BLOCK_BYTES:
                    block = min(block * 16, MAX_CSV_BLOCK_BYTES)
                    continue
                raise _InputError(_csv_problem(path, exc, block)) from None
        _unique_columns(table.column_names, "header")
        return _quoted_empty_strings(path, table, string_features, block)
    except OSError as exc:
        raise _InputError(f"cannot read the file ({exc.strerror or exc}); check the path") from None


def _unique_columns(names: list[str], where: str) -> None:
    """_InputError naming a column the file's `where` (header or schema) names more than once:
    which one to read would be a guess (it was a KeyError traceback)."""
    counts = Counter(names)
    twice = [name for name, count in counts.items() if count > 1]
    if twice:
        raise _InputError(
            f"column {twice[0]!r} appears {counts[twice[0]]} times in the {where}; give each "
            "column a name of its own"
        )


def _quoted_empty_strings(path: Path, table, names: list[str], block: int):
    """`table` with the quoted "" cells of its STRING feature columns `names` read as "" (the
    first read makes every empty cell null; reading every column that way would make an
    inferred column holding a quoted "", such as the event times, text). Only a STRING
    feature column with nulls is read again, alone, in blocks of `block` bytes."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    nullable = [name for name in names if name in table.column_names and table[name].null_count]
    if not nullable:
        return table
    options = pcsv.ConvertOptions(
        null_values=[""],
        strings_can_be_null=True,
        quoted_strings_can_be_null=False,
        column_types={name: pa.string() for name in nullable},
        include_columns=nullable,
    )
    read = pcsv.ReadOptions(block_size=block)
    texts = pcsv.read_csv(path, read_options=read, convert_options=options)
    for name in nullable:
        table = table.set_column(table.column_names.index(name), name, texts[name])
    return table


def _csv_problem(path: Path, error: Exception, block: int) -> str:
    """What is wrong with a CSV file pyarrow refused (`error`, reading in blocks of `block`
    bytes), naming the row it can find."""
    import pyarrow.csv as pcsv

    if "Empty CSV file" in str(error):
        return "the file is empty; a CSV needs a header row naming its columns"
    ragged = []

    def note(row) -> str:
        ragged.append(row)
        return "error"

    # Only a single-threaded read numbers the rows it hands to invalid_row_handler.
    with contextlib.suppress(OSError, ValueError):
        pcsv.read_csv(
            path,
            # latin-1 decodes any byte: a ragged row's text is then shown, never an error
            read_options=pcsv.ReadOptions(use_threads=False, encoding="latin-1", block_size=block),
            parse_options=pcsv.ParseOptions(invalid_row_handler=note),
        )
    if ragged and ragged[0].number is not None:
        row = ragged[0]
        return (
            f"row {row.number - 2} has {row.actual_columns} cells but the header has "
            f"{row.expected_columns} columns (rows count from 0 after the header); give every "
            "row one cell per column and quote cells that hold a comma"
        )
    return f"not a readable CSV file ({error}); fix the file"


def _is_text(column) -> bool:
    """Whether an Arrow column holds text (string or large_string)."""
    import pyarrow as pa

    return pa.types.is_string(column.type) or pa.types.is_large_string(column.type)


def _whole_numbers(text):
    """Which cells of a (trimmed) text column are written as integers, as Arrow's cast to int64
    reads them (no leading "+"); nulls are not."""
    import pyarrow.compute as pc

    return pc.fill_null(pc.match_substring_regex(text, r"^-?[0-9]+$"), False)


MIN_MICROS = 10**15
"""In a time column of numbers or text, a whole number is µs since the epoch from 10**15
(2001-09-09) on; a smaller one is read as a time ("20240102" is a date) or refused (epoch
seconds or ms would be µs in 1970)."""

SMALL_NUMBER_FIX = (
    f"µs are numbers from {MIN_MICROS} (2001-09-09) on; a smaller number looks like seconds "
    "or ms: give µs (seconds x 1000000) or ISO 8601 times"
)

_US_PER_UNIT = {"s": 10**6, "ms": 10**3, "us": 1}


def _event_times(column, name: str) -> tuple[np.ndarray, dict[int, str]]:
    """Event times as int64 µs since the epoch from timestamps, dates, ISO 8601 text or µs
    (numbers or text, from MIN_MICROS on), and {row: reason} of the empty cells and the cells
    that are none of these."""
    import pyarrow as pa

    empty = column.is_null().to_numpy(zero_copy_only=False)
    if _is_text(column) or pa.types.is_integer(column.type):
        micros, failed = _whole_or_iso_micros(column, name)
        cells = column
        why = f"is neither an ISO 8601 time nor µs since the epoch ({SMALL_NUMBER_FIX})"
    elif pa.types.is_floating(column.type):
        # As the client's event_times_us does, fractions of a µs are truncated.
        floats = np.trunc(column.fill_null(0).to_numpy(zero_copy_only=False))
        failed = np.zeros(len(column), dtype=bool)
        failed[list(arrays.cast_changes(floats, int(DType.INT64), name))] = True
        failed |= ~empty & ~(floats >= MIN_MICROS)
        micros = np.where(failed, 0, floats).astype(np.int64)
        cells = column
        why = f"is not an integer of µs since the epoch in the int64 range ({SMALL_NUMBER_FIX})"
    elif pa.types.is_timestamp(column.type) or pa.types.is_date(column.type):
        micros, failed, cells, unit = _stamp_micros(column)
        why = (
            f"{unit} since the epoch is beyond the event times int64 µs can hold (about "
            "292,000 years either side of 1970); give a time within them"
        )
    elif pa.types.is_null(column.type):
        micros, failed = np.zeros(len(column), dtype=np.int64), np.zeros(len(column), dtype=bool)
        cells, why = column, ""
    else:
        raise _InputError(
            f"column {name!r} holds {column.type}, which are not event times; give ISO 8601 "
            "times, timestamps or integer µs since the epoch"
        )
    bad = {int(row): "the event time is empty" for row in np.flatnonzero(empty)}
    shown = cells.to_pylist() if (failed & ~empty).any() else []
    for row in np.flatnonzero(failed & ~empty).tolist():
        bad[row] = f"{shown[row]!r} {why}"
    micros[list(bad)] = 0
    return micros, bad


def _whole_or_iso_micros(column, name: str) -> tuple[np.ndarray, np.ndarray]:
    """µs since the epoch of a text or integer column: whole numbers from MIN_MICROS on as µs,
    the other cells (an integer as its decimal text) parsed as times; and which cells are
    neither. Nulls are 0 and not failed."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.compute as pc

    if _is_text(column):
        column = pc.utf8_trim_whitespace(column)
        ints, _ = _convert(pc.if_else(_whole_numbers(column), column, None), name, DType.INT64)
    else:
        ints, _ = _convert(column, name, DType.INT64)
    values = np.asarray(ints.fill_null(0).to_numpy(zero_copy_only=False), dtype=np.int64)
    counted = ints.is_valid().to_numpy(zero_copy_only=False) & (values >= MIN_MICROS)
    micros = np.where(counted, values, 0)
    rest = np.flatnonzero(~counted & column.is_valid().to_numpy(zero_copy_only=False))
    failed = np.zeros(len(column), dtype=bool)
    if rest.size:
        text = column.take(pa.array(rest)).cast(pa.string()).to_pandas()
        # "mixed": pandas 2.2's "ISO8601" gives wrong instants when offsets and naive times mix.
        parsed = pd.to_datetime(text, utc=True, format="mixed", errors="coerce")
        stamps = parsed.dt.tz_localize(None).to_numpy().astype("datetime64[us]")
        dated = ~np.isnat(stamps)
        micros[rest[dated]] = stamps[dated].astype(np.int64)
        failed[rest[~dated]] = True
    return micros, failed


def _stamp_micros(column) -> tuple[np.ndarray, np.ndarray, object, str]:
    """µs since the epoch of a timestamp or date column (nulls 0), which cells int64 µs cannot
    hold (NumPy's cast wrapped them: year 586,000 became 2024), the cells as integers in their
    unit, and that unit's name."""
    import pyarrow as pa

    if pa.types.is_date32(column.type):
        ticks, per, unit = column.cast(pa.int32()).cast(pa.int64()), 86_400 * 10**6, "days"
    elif pa.types.is_date64(column.type):
        ticks, per, unit = column.cast(pa.int64()), 10**3, "ms"
    else:
        unit = column.type.unit
        ticks, per = column.cast(pa.int64()), _US_PER_UNIT.get(unit, 1)  # ns: divided below
    values = np.asarray(ticks.fill_null(0).to_numpy(zero_copy_only=False), dtype=np.int64)
    if unit == "ns":
        return values // 1000, np.zeros(len(values), dtype=bool), ticks, unit
    limit = (2**63 - 1) // per
    outside = (values > limit) | (values < -limit)
    return np.where(outside, 0, values) * per, outside, ticks, unit


def _arrow_type(dtype: DType):
    import pyarrow as pa

    return {
        DType.FLOAT32: pa.float32(),
        DType.FLOAT64: pa.float64(),
        DType.INT64: pa.int64(),
        DType.BOOL: pa.bool_(),
        DType.STRING: pa.string(),
    }[dtype]


def _convert(column, name: str, dtype: DType, parse_as: DType | None = None):
    """The column as the view's `dtype`, or as `parse_as` when given (text is trimmed unless the
    type is STRING); cells that do not convert become null and come back as {row: reason}."""
    import pyarrow as pa
    import pyarrow.compute as pc

    parse_as = parse_as or dtype
    target = _arrow_type(parse_as)
    trim = _is_text(column) and parse_as != DType.STRING
    source = pc.utf8_trim_whitespace(column) if trim else column
    try:
        return source.cast(target), {}
    except pa.ArrowNotImplementedError:
        raise _InputError(
            f"column {name!r} holds {column.type}, which cannot be read as {dtype.name} (its "
            "type in the view); fix the file or the view"
        ) from None
    except pa.ArrowInvalid:
        pass
    cells, bad = [], {}
    for row, cell in enumerate(source.to_pylist()):
        try:
            cells.append(
                None if cell is None else pa.scalar(cell, source.type).cast(target).as_py()
            )
        except pa.ArrowInvalid:
            cells.append(None)
            bad[row] = f"{cell!r} is not {dtype.name}"
    return pa.chunked_array([pa.array(cells, target)]), bad


def _floats(column, name: str, dtype: DType) -> tuple[np.ndarray, dict[int, str]]:
    """A FLOAT32 or FLOAT64 column as that dtype, and {row: reason} of the cells that are not
    numbers or whose value the cast would change by the client's rule (a finite float that
    overflows; an integer, or text written as one, that the float cannot hold exactly)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    text = _is_text(column)
    source = pc.utf8_trim_whitespace(column) if text else column
    values = np.zeros(len(column))
    bad: dict[int, str] = {}
    rest = source
    if text or pa.types.is_integer(column.type):
        whole = _whole_numbers(source) if text else column.is_valid()
        ints, outside = _convert(pc.if_else(whole, source, None), name, dtype, DType.INT64)
        for row, reason in outside.items():
            bad[row] = (
                f"{reason.removesuffix(f' is not {dtype.name}')} is an integer outside the int64 "
                f"range, which {dtype.name} does not hold exactly; write it as a float (e.g. "
                "1.5e20) to have it rounded"
            )
        held = np.flatnonzero(ints.is_valid().to_numpy(zero_copy_only=False))
        exact = ints.fill_null(0).to_numpy(zero_copy_only=False)[held]
        values[held] = exact
        changed = arrays.cast_changes(exact, int(dtype), name)
        bad.update({int(held[at]): why for at, why in changed.items()})
        rest = pc.if_else(whole, None, source) if text else None
    if rest is not None:
        floats, not_numbers = _convert(rest, name, dtype, DType.FLOAT64)
        bad.update(not_numbers)
        if text:
            spelled = pc.match_substring_regex(rest, r"^[+-]?inf(inity)?$", ignore_case=True)
            beyond = pc.and_(pc.is_inf(floats), pc.invert(pc.fill_null(spelled, False)))
            for row in np.flatnonzero(pc.fill_null(beyond, False).to_numpy(zero_copy_only=False)):
                bad[int(row)] = (
                    f"{rest[int(row)].as_py()!r} overflows FLOAT64 (largest finite "
                    f"{np.finfo(np.float64).max:.8g}); send a smaller value"
                )
        held = np.flatnonzero(floats.is_valid().to_numpy(zero_copy_only=False))
        numbers = floats.fill_null(0).to_numpy(zero_copy_only=False)[held]
        values[held] = numbers
        changed = arrays.cast_changes(numbers, int(dtype), name)
        bad.update({int(held[at]): why for at, why in changed.items()})
    values[list(bad)] = 0
    return arrays.cast(values, int(dtype), name), bad


def _vectors(column, name: str, length: int) -> tuple[np.ndarray, dict[int, str]]:
    """A rows x length float32 array from list cells or "[0.1, 0.2]" text (nulls become zeros),
    and {row: reason} of the cells that are not `length` numbers or hold one that overflows
    float32 (the client's cast rule)."""
    rows, bad = [], {}
    for row, cell in enumerate(column.to_pylist()):
        try:
            if cell is None:
                cell = [0.0] * length
            elif isinstance(cell, str):
                cell = [float(x) for x in cell.strip("[] ").replace(",", " ").split()]
            vector = np.asarray(cell, dtype=np.float64)
        except (TypeError, ValueError):
            vector = None
        if vector is None or vector.shape != (length,):
            bad[row] = f"{cell!r} is not a vector of {length} numbers"
            vector = np.zeros(length)
        rows.append(vector)
    values = np.stack(rows) if rows else np.zeros((0, length))
    for row, why in arrays.cast_changes(values, int(DType.FLOAT32_VECTOR), name).items():
        bad.setdefault(row, why)
    values[list(bad)] = 0
    return arrays.cast(values, int(DType.FLOAT32_VECTOR), name), bad


def _bools(column, name: str) -> tuple[np.ndarray, dict[int, str]]:
    """A column of numbers as BOOL, and {row: reason} of the cells other than 0 and 1 (Arrow's
    cast would store 2, -1 or 0.5 as true); nulls read as False for the null mask to hide."""
    numbers = column.fill_null(0).to_numpy(zero_copy_only=False)
    wrong = (numbers != 0) & (numbers != 1)
    cells = column.to_pylist() if wrong.any() else []
    bad = {
        row: f"{cells[row]!r} is not BOOL (a number must be 0 or 1)"
        for row in np.flatnonzero(wrong).tolist()
    }
    return numbers == 1, bad


def _feature_values(column, name: str, dtype: DType, length: int):
    """Values of one column typed as the view declares them, with nulls filled by a placeholder
    the null mask hides; also {row: reason} of the cells that do not convert."""
    import pyarrow as pa

    if dtype == DType.FLOAT32_VECTOR:
        return _vectors(column, name, length)
    if dtype in (DType.FLOAT32, DType.FLOAT64):
        return _floats(column, name, dtype)
    if dtype == DType.BOOL and (
        pa.types.is_integer(column.type) or pa.types.is_floating(column.type)
    ):
        return _bools(column, name)
    typed, bad = _convert(column, name, dtype)
    filler = {DType.STRING: "", DType.BOOL: False}.get(dtype, 0)
    return typed.fill_null(filler).to_numpy(zero_copy_only=False), bad


def _join_keys(client: FeatureStoreClient, view) -> list[JoinKey]:
    entities, _ = client.list_feature_views(view.name)
    for entity in entities:
        if entity.name == view.entity:
            return list(entity.join_keys)
    raise ClientError(
        grpc.StatusCode.NOT_FOUND, f"entity {view.entity!r} of view {view.name!r} is not registered"
    )


class _Rows:
    """The rows of a file the CLI writes: columns typed by the view, and the bad rows found
    before sending (the first problem of each row, by its 0-based row in the file)."""

    def __init__(self, table, view, join_keys: list[JoinKey], time_column: str) -> None:
        self.bad: dict[int, tuple[str, str]] = {}
        self.keys: dict[str, np.ndarray] = {}
        for key in join_keys:
            column = table[key.name]
            self.keys[key.name], bad = _feature_values(column, key.name, key.dtype, 0)
            self._note(key.name, bad)
            empty = column.is_null().to_numpy(zero_copy_only=False).nonzero()[0]
            self._note(key.name, {int(r): "the join key is empty" for r in empty})
        self.times, bad = _event_times(table[time_column], time_column)
        self._note(time_column, bad)
        self.features: dict[str, np.ndarray] = {}
        self.nulls: dict[str, np.ndarray] = {}
        for feature in view.features:
            if feature.name not in table.column_names:
                continue
            column = table[feature.name]
            self.nulls[feature.name] = column.is_null().to_numpy(zero_copy_only=False)
            self.features[feature.name], bad = _feature_values(
                column, feature.name, feature.dtype, feature.vector_length
            )
            self._note(feature.name, bad)
        self.kept = np.arange(table.num_rows)

    def _note(self, column: str, bad: dict[int, str]) -> None:
        for row, reason in bad.items():
            self.bad.setdefault(row, (column, reason))

    def first_bad(self) -> str:
        row = min(self.bad)
        column, reason = self.bad[row]
        return (
            f"column {column!r} row {row}: {reason}; fix the file, or pass --policy "
            f"skip_bad_rows to skip bad rows ({len(self.bad)} bad rows; rows count from 0 "
            "after the header)"
        )

    def drop_bad(self) -> None:
        """Keep only the good rows."""
        self.kept = np.setdiff1d(self.kept, np.fromiter(self.bad, dtype=np.int64))
        self.keys = {k: v[self.kept] for k, v in self.keys.items()}
        self.times = self.times[self.kept]
        self.features = {k: v[self.kept] for k, v in self.features.items()}
        self.nulls = {k: v[self.kept] for k, v in self.nulls.items()}


WIRE_TIME_COLUMN = "event_timestamps"
"""The name the server gives the event times in row errors (their WriteFeatures field)."""


def _time_column(time_column: str, declared: list[str]) -> str:
    """The file column to name for a row error the server reports under WIRE_TIME_COLUMN: the
    event-time column, unless a key or feature has the wire name (then the error is its)."""
    return WIRE_TIME_COLUMN if WIRE_TIME_COLUMN in declared else time_column


def _stopped_at(error: ClientError, kept: np.ndarray, batch_rows: int, time_column: str) -> str:
    """The error of a stream the server ended at one of its messages (error.batch), in the
    file's terms: the bad row counted from the file's header (the server counts within its
    message), its event-time column by the file's name, and the rows written before that
    message."""
    start = error.batch * batch_rows
    first_row = int(kept[min(start, len(kept) - 1)])
    rerun = "run the command again"
    written = ""
    if start:
        rows = (
            f"rows 0..{start - 1} ({start} rows)"
            if first_row == start
            else f"{start} rows before row {first_row} (bad rows were skipped)"
        )
        written = f"; {rows} were written and are durable"
        rerun += (
            ": rows already written come back as stale (last write wins by event time), so "
            "rewriting them is safe"
        )
    if error.row is None or start + error.row >= len(kept):
        end = int(kept[min(start + batch_rows, len(kept)) - 1])
        return (
            f"{error}; in the file: the message of rows {first_row}..{end} failed{written}, "
            f"rows from row {first_row} on were not acknowledged; fix the cause and {rerun}"
        )
    row = int(kept[start + error.row])
    wire = f"column {WIRE_TIME_COLUMN!r} row {error.row}:"
    column = (
        f"column {time_column!r} "
        if time_column != WIRE_TIME_COLUMN and wire in error.message
        else ""
    )
    return (
        f"{error}; in the file: {column}row {row} (rows count from 0 after the header){written}, "
        f"nothing from row {first_row} on was written; fix row {row} and {rerun}, or pass "
        "--policy skip_bad_rows to write the good rows and list the bad ones"
    )


def cmd_ingest(args: argparse.Namespace) -> int:
    """Stream a CSV or Parquet file into a view; columns are named like the view's features
    and parsed by the types the view and its entity declare."""
    with FeatureStoreClient(client_config(args)) as client:
        view = client.get_feature_view(args.view, args.version)
        join_keys = _join_keys(client, view)
        declared = [k.name for k in join_keys] + [f.name for f in view.features]
        strings = [f.name for f in view.features if f.dtype == DType.STRING]
        try:
            table = _read_table(args.file, declared, strings)
            wanted = [k.name for k in join_keys] + [args.event_time_column]
            missing = [name for name in wanted if name not in table.column_names]
            if missing:
                raise _InputError(f"missing columns {missing}")
            rows = _Rows(table, view, join_keys, args.event_time_column)
            if rows.bad and args.policy == "reject_batch":
                raise _InputError(rows.first_bad())
        except _InputError as exc:
            print(f"featureserve: {args.file}: {exc}", file=sys.stderr)
            return 2
        rows.drop_bad()
        time_column = _time_column(args.event_time_column, declared)
        try:
            with client.stream_writer(
                args.view, batch_rows=args.batch_rows, version=view.version, policy=args.policy
            ) as writer:
                writer.write(rows.keys, rows.times, rows.features, rows.nulls)
        except ClientError as exc:
            if exc.batch is None:
                raise
            stopped = _stopped_at(exc, rows.kept, args.batch_rows, time_column)
            print(f"featureserve: {args.file}: {stopped}", file=sys.stderr)
            return 1
        summary = writer.summary
    rejected = dict(rows.bad)
    for err in summary.errors:
        row = int(rows.kept[err.batch * args.batch_rows + err.row])
        column = time_column if err.column == WIRE_TIME_COLUMN else err.column
        rejected.setdefault(row, (column, err.reason))
    total = summary.rejected + len(rows.bad)
    print(f"written={summary.written} stale={summary.stale} rejected={total}")
    for row in sorted(rejected)[:20]:
        column, reason = rejected[row]
        print(f"  row {row} {column}: {reason}")
    return 0 if total == 0 else 1


INT64_RANGE = f"{-(2**63)} to {2**63 - 1}"


def _int64_array(values: list[int], what: str, fix: str) -> np.ndarray:
    """Python ints as an int64 array; _InputError naming `what`, the first value outside the
    int64 range and the `fix` (NumPy would raise a bare OverflowError)."""
    outside = [v for v in values if not -(2**63) <= v < 2**63]
    if outside:
        raise _InputError(f"{what}: {outside[0]} is outside the int64 range ({INT64_RANGE}); {fix}")
    return np.array(values, dtype=np.int64)


def _integers(parts: list[str]) -> list[int]:
    """The parts of a comma-separated flag as integers, read as ingest reads an integer cell (after
    trimming, ASCII digits with an optional "-", as Arrow's cast takes them); ValueError for
    others (Python's int() also reads "1_0" as 10, "+1" and other scripts' digits)."""
    stripped = [part.strip() for part in parts]
    if not all(re.fullmatch(r"-?[0-9]+", part) for part in stripped):
        raise ValueError("not integers")
    return [int(part) for part in stripped]


def _key_values(text: str, flag: str) -> np.ndarray:
    """Comma-separated keys typed by guessing (all integers: int64, else strings), for callers
    that do not know the entity's key types (`featureserve predict`)."""
    parts = text.split(",")
    try:
        ints = _integers(parts)
    except ValueError:
        return np.array(parts, dtype=object)
    what = f"{flag}: {text!r} holds only integers, read as int64"
    return _int64_array(ints, what, "pass --key-type string for text")


def _typed_keys(text: str, key: JoinKey, flag: str) -> np.ndarray:
    """Comma-separated keys parsed as the join key's declared type (so "007" stays a string)."""
    parts = text.split(",")
    if key.dtype == DType.STRING:
        return np.array(parts, dtype=object)
    try:
        ints = _integers(parts)
    except ValueError:
        raise _InputError(
            f"{flag}: {text!r}: join key {key.name!r} is int64; give comma-separated integers "
            "(ASCII digits, optionally after a -)"
        ) from None
    return _int64_array(
        ints, f"{flag}: {text!r}: join key {key.name!r} is int64", "give keys in that range"
    )


def _keys_of(args: argparse.Namespace, join_keys: list[JoinKey]) -> dict[str, np.ndarray]:
    """The entities named by --keys and --entity, typed by the entity's join keys."""
    by_name = {k.name: k for k in join_keys}
    keys = {}
    for item in args.entity:
        name, sep, text = item.partition("=")
        if not sep or name not in by_name:
            raise _InputError(
                f"--entity {item!r}: use NAME=V1,V2 where NAME is a join key of the view's "
                f"entity ({', '.join(by_name)})"
            )
        if name in keys:
            raise _InputError(f"--entity {name}= is given twice; give each join key once")
        keys[name] = _typed_keys(text, by_name[name], "--entity")
    if args.keys is not None:
        first = join_keys[0].name
        if first in keys:
            raise _InputError(f"--keys and --entity {first}= both set {first!r}; give one")
        keys[first] = _typed_keys(args.keys, join_keys[0], "--keys")
    return keys


def _print_view(keys: dict[str, np.ndarray], result: OnlineFeatures, part: str) -> None:
    """Print one view's features, filed under `part` ("view" or "view@2"): a line per entity
    with its keys and the view's event time, then a line per feature."""
    stamps = result.event_timestamps.get(part, np.zeros(result.rows, dtype=np.int64))
    names = [name for name in result.values if name.startswith(f"{part}:")]
    for row in range(result.rows):
        key_text = ", ".join(f"{k}={v[row]}" for k, v in keys.items())
        print(f"[{key_text}] event_time_us={int(stamps[row])}")
        for name in names:
            status = FeatureStatus(int(result.statuses[name][row])).name
            shown = result.values[name][row] if status == "PRESENT" else "-"
            print(f"  {name} = {shown} ({status})")


def _get_problem(args: argparse.Namespace) -> str | None:
    """Why get's flags cannot be used together, naming the flags and the fix."""
    if args.feature_service == "":
        return "--feature-service: empty; name a feature service, e.g. fraud"
    if args.feature_service is not None and (args.version is not None or args.features):
        return (
            "--feature-service reads the views, versions and features the service names; "
            "drop --version and --features (they go with --view)"
        )
    if args.keys is None and not args.entity:
        lookup = (
            f"--view {args.view}"
            if args.feature_service is None
            else f"--feature-service {args.feature_service}"
        )
        return (
            "get needs the entities to look up: give --keys 1,2,3 (keys of the view's first "
            "join key) or --entity NAME=V1,V2 for each join key, e.g. "
            f"featureserve get {lookup} --keys 1,2,3"
        )
    return None


def cmd_get(args: argparse.Namespace) -> int:
    """Print features of a few entities: of one view, or of each view a feature service reads,
    one view after the other, each headed by the view and the version read."""
    problem = _get_problem(args)
    if problem is not None:
        print(f"featureserve: {problem}", file=sys.stderr)
        return 2
    with FeatureStoreClient(client_config(args)) as client:
        projections = ()
        if args.feature_service is None:
            views = [client.get_feature_view(args.view, args.version or 0)]
        else:
            service = client.get_feature_service(args.feature_service)
            views = [client.get_feature_view(name, version) for name, version in service.reads]
            projections = service.projections
        join_keys = dict.fromkeys(key for view in views for key in _join_keys(client, view))
        for projection in projections:  # keyed by the columns its join_key_map names
            view = client.get_feature_view(*projection.view_key)
            join_keys.update(
                (JoinKey(projection.column(key.name), key.dtype), None)
                for key in _join_keys(client, view)
            )
        try:
            keys = _keys_of(args, list(join_keys))
        except _InputError as exc:
            print(f"featureserve: {exc}", file=sys.stderr)
            return 2
        try:
            if args.feature_service is None:
                ref = f"{args.view}@{views[0].version}" if args.version else args.view
                refs = [f"{ref}:{f}" for f in args.features.split(",")] if args.features else [ref]
                result = client.get_online_features(refs, keys)
                parts = [ref]
            else:
                result = client.get_online_features(keys=keys, feature_service=args.feature_service)
                parts = list(result.versions)
        except arrays.ArrayError as exc:
            print(f"featureserve: --keys/--entity: {exc}", file=sys.stderr)
            return 2
    for part in parts:
        if part in result.projection_of:
            print(f"{part} ({result.projection_of[part]}@{result.versions[part]}):")
        elif args.feature_service is not None:
            print(f"{part}@{result.versions[part]}:")
        _print_view(keys, result, part)
    return 0


def _bounded_int(meaning: str, low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer from low to high (inclusive); argparse prints the message
    and exits 2 for another, instead of a traceback from deep in the client."""
    bounds = f"from {low} to {high}" if high is not None else f">= {low}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{text!r}: give {meaning}, an integer {bounds}")
        return value

    return parse


_ROWS = _bounded_int("rows per message", 1)
_VERSION = _bounded_int("a view version", 1, 2**32 - 1)
VERSION_OR_LATEST = _bounded_int("a view version (0: the latest)", 0, 2**32 - 1)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add apply, delete-view, delete-service, ingest and get."""
    p = subparsers.add_parser(
        "apply",
        help="register entities and feature views from a file",
        description="Apply a features.toml file to the registry.",
    )
    p.add_argument("file", type=Path, help="features.toml")
    p.add_argument("--dry-run", action="store_true", help="validate only, change nothing")
    p.add_argument(
        "--prune",
        action="store_true",
        help="also delete the feature services, views (all versions) and unused entities the "
        "file does not declare (admin scope)",
    )
    add_connection_flags(p)
    p.set_defaults(func=cmd_apply)

    p = subparsers.add_parser(
        "delete-view",
        help="delete one version of a feature view",
        description="Delete one version of a feature view: its definition, its online rows and "
        "its history. Other versions stay readable. Needs the admin scope.",
    )
    p.add_argument("view", help="feature view")
    p.add_argument("--version", type=_VERSION, required=True, help="the version to delete")
    add_connection_flags(p)
    p.set_defaults(func=cmd_delete_view)

    p = subparsers.add_parser(
        "delete-service",
        help="delete a feature service",
        description="Delete a feature service's definition; the views it reads and their rows "
        "stay. Needs the admin scope.",
    )
    p.add_argument("name", help="feature service")
    add_connection_flags(p)
    p.set_defaults(func=cmd_delete_service)

    p = subparsers.add_parser(
        "ingest",
        help="write a CSV or Parquet file into a view",
        description="Stream a CSV/Parquet file into a feature view; columns are read as the "
        "types the view and its entity declare.",
    )
    p.add_argument("file", type=Path, help="CSV or Parquet file")
    p.add_argument("--view", required=True, help="target feature view")
    p.add_argument(
        "--version", type=VERSION_OR_LATEST, default=0, help="view version (default latest)"
    )
    p.add_argument(
        "--event-time-column",
        default="event_timestamp",
        help="column of event times (datetime or int µs since epoch)",
    )
    p.add_argument("--batch-rows", type=_ROWS, default=1000, help="rows per message (>= 1)")
    p.add_argument(
        "--policy",
        choices=["reject_batch", "skip_bad_rows"],
        default="reject_batch",
        help="bad rows (0-based after the header): reject_batch stops at the first, "
        "skip_bad_rows writes the others and lists them",
    )
    add_connection_flags(p)
    p.set_defaults(func=cmd_ingest)

    p = subparsers.add_parser(
        "get",
        help="print online features of some entities",
        description="Look up online features of one view, or of a feature service (one block "
        "per view it reads, each printed as for --view).",
    )
    lookup = p.add_mutually_exclusive_group(required=True)
    lookup.add_argument("--view", help="feature view")
    lookup.add_argument(
        "--feature-service",
        metavar="NAME",
        help="read the features of this feature service (not with --version or --features)",
    )
    p.add_argument("--version", type=VERSION_OR_LATEST, help="view version (default latest)")
    p.add_argument(
        "--keys", help="comma-separated keys of the view's (first) join key, read as its type"
    )
    p.add_argument(
        "--entity",
        action="append",
        default=[],
        metavar="NAME=V1,V2",
        help="keys of one join key (repeat for composite keys)",
    )
    p.add_argument("--features", help="comma-separated feature names (default: all)")
    add_connection_flags(p)
    p.set_defaults(func=cmd_get)
