"""`featureserve training-set`: feature views joined point-in-time onto a file of labelled rows
and written as Parquet (Feast's get_historical_features), read from the store's history logs
beside running servers."""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from featurestore.dtypes import DType, FeatureStatus
from server.store_cli import STORE_MAX_DBS, add_store_flags, store_dir

if TYPE_CHECKING:
    from collections.abc import Sequence

    import pyarrow as pa

    from featurestore.online_store import OnlineStore
    from featurestore.registry import FeatureProjection


def register(subparsers: argparse._SubParsersAction) -> None:
    """The `training-set` subcommand."""
    p = subparsers.add_parser(
        "training-set",
        help="join features point-in-time onto labelled rows, written as Parquet",
        description="For each row of LABELS, the value of every feature referenced (by "
        "--features, or by the feature service --feature-service names) a training example "
        "sees at its label time: each view joined on its own entity's join keys, by "
        "event time (as Feast) or, with --as-served, as GetOnlineFeatures answered then. Reads "
        "the store's history beside running servers and writes OUT as Parquet: the columns of "
        "LABELS, one column per feature (null unless present), VIEW__event_timestamp per view "
        "and FEATURE__status per feature.",
    )
    p.add_argument("labels", type=Path, metavar="LABELS", help="CSV or Parquet file")
    selection = p.add_mutually_exclusive_group(required=True)
    selection.add_argument(
        "--features",
        help="comma-separated references: view:feature, view (every feature), view@2:feature",
    )
    selection.add_argument(
        "--feature-service",
        metavar="NAME",
        help="the references and projections of this feature service; columns are named as a "
        "lookup by the service names them (view:feature, without a pinned version; "
        "alias:feature for a projection, joined on the LABELS columns its join_key_map names)",
    )
    p.add_argument("--out", type=Path, required=True, help="Parquet file to write")
    p.add_argument(
        "--timestamp-column",
        default="event_timestamp",
        help="the label time column: a timestamp, int64 µs since the epoch, or ISO 8601 text "
        "(UTC when without an offset); default event_timestamp",
    )
    p.add_argument(
        "--as-served",
        action="store_true",
        help="what GetOnlineFeatures answered at each label time (default: join on event time)",
    )
    add_store_flags(p)
    p.set_defaults(func=cmd_training_set)


class _Refused(Exception):
    """A flag or input the command refuses (exit 2); the message names it."""


def cmd_training_set(args: argparse.Namespace) -> int:
    """Write the training set; print one line of counts. Exit 2 for a flag or input it
    refuses, 1 for an unknown feature service, view or feature (the store's error)."""
    from featurestore.errors import InvalidArgumentError
    from featurestore.online_store import OnlineStore, StoreConfig
    from featurestore.training_set import (
        TrainingSet,
        by_view_names,
        merged,
        projected,
        training_inputs,
        training_set,
        unversioned,
    )
    from server.config import ConfigError

    service = args.feature_service
    listed = None
    if args.features is not None:
        listed = [ref.strip() for ref in args.features.split(",") if ref.strip()]
    try:
        data_dir = store_dir(args)
        if listed == []:
            raise _Refused("--features: give at least one reference, e.g. spend:amount")
        if service == "":
            raise _Refused("--feature-service: empty; name a feature service, e.g. fraud")
        with OnlineStore(StoreConfig(data_dir, max_dbs=STORE_MAX_DBS)) as store:
            # the service is read once, so the key columns and the features agree
            refs, projections = training_inputs(store, listed, service)
            key_types, readers = _join_key_types(store, refs, projections)
            labels = _read_labels(args.labels, key_types, readers, args.timestamp_column)
            keys = {name: _key_column(labels, name, dtype) for name, dtype in key_types.items()}
            ts = _label_micros(labels.column(args.timestamp_column), args.timestamp_column)
            try:
                found = (
                    training_set(store, keys, ts, refs, as_served=args.as_served)
                    if refs  # a service may read by projections only
                    else TrainingSet({}, {}, {})
                )
                by_alias = projected(store, projections, keys, ts, as_served=args.as_served)
            except InvalidArgumentError as exc:  # name the file's column, not the argument
                where = f"LABELS column {args.timestamp_column!r}: "
                raise _Refused(str(exc).replace("timestamps: ", where, 1)) from None
            types = _feature_types(store, list(found.values))
            alias_types = _projection_types(store, projections)
        if service is not None:  # named as a lookup by the service names them
            found = merged(by_view_names(found), by_alias)
            types = {unversioned(column): spec for column, spec in types.items()} | alias_types
        table = _output_table(labels, found, types)
    except (ConfigError, _Refused, InvalidArgumentError) as exc:
        print(f"featureserve: {exc}", file=sys.stderr)
        return 2
    try:
        _write_parquet(table, args.out)
    except OSError as exc:
        print(f"featureserve: --out {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    statuses = np.concatenate(list(found.statuses.values()))
    counts = ", ".join(
        f"{int((statuses == s).sum())} {s.name.lower()}"
        for s in FeatureStatus
        if (statuses == s).any()
    )
    counted = f" ({counts})" if counts else ""
    print(f"wrote {table.num_rows} rows x {len(found.values)} features to {args.out}{counted}")
    return 0


def _join_key_types(
    store: OnlineStore, refs: list[str], projections: Sequence[FeatureProjection] = ()
) -> tuple[dict[str, DType], dict[str, str]]:
    """Each key column the referenced views need (a join key's own name, or the column a
    projection maps it to), with its type, and with the first read that needs it (as a
    message names it); _Refused when two entities type one column differently (a feature
    service never reads such views)."""
    from featurestore.feature_refs import parse_feature_refs

    reads = [(key, {}, "") for key in parse_feature_refs(refs)]
    reads += [(p.view_key, p.join_key_map, p.alias) for p in projections]
    types: dict[str, DType] = {}
    readers: dict[str, str] = {}
    for (name, version), key_map, alias in reads:
        entity = store.registry.get_entity(store.registry.get_view(name, version).entity)
        for key in entity.join_keys:
            column = key_map.get(key.name, key.name)
            if types.setdefault(column, key.dtype) != key.dtype:
                raise _Refused(
                    f"--features: join key {column!r} is {types[column].name} for one view "
                    f"and {key.dtype.name} for entity {entity.name!r}; one column cannot be both"
                )
            readers.setdefault(
                column,
                f"projection {alias!r} needs, for join key {key.name!r} of feature view {name!r}"
                if alias
                else f"feature view {name!r} needs",
            )
    return types, readers


def _projection_types(
    store: OnlineStore, projections: Sequence[FeatureProjection]
) -> dict[str, tuple[DType, int]]:
    """Each "alias:feature" column a feature service's projections may output, with its type
    and vector length."""
    types = {}
    for projection in projections:
        view = store.registry.get_view(*projection.view_key)
        types.update(
            (f"{projection.alias}:{f.name}", (f.dtype, f.vector_length)) for f in view.features
        )
    return types


def _read_labels(
    path: Path, key_types: dict[str, DType], readers: dict[str, str], ts_column: str
) -> pa.Table:
    """LABELS as a table holding every join key column and the timestamp column; a missing
    key column is named with the read that needs it (readers: column -> that read)."""
    import pyarrow as pa

    if not path.is_file():
        raise _Refused(f"LABELS {path}: no such file")
    try:
        with path.open("rb") as f:
            parquet = f.read(4) == b"PAR1"  # the magic, whatever the file's name
        if parquet:
            import pyarrow.parquet as pq

            table = pq.read_table(path)
        else:
            import pyarrow.csv as pcsv

            kinds = {DType.INT64: pa.int64(), DType.STRING: pa.string()}
            with path.open(newline="", encoding="utf-8-sig", errors="replace") as f:
                header = next((row for row in csv.reader(f) if row), [])  # as pyarrow reads it
            # other columns are copied as written ("007" stays text); the label time is parsed
            types = {name: pa.string() for name in header if name != ts_column}
            types.update((name, kinds[dtype]) for name, dtype in key_types.items())
            options = pcsv.ConvertOptions(column_types=types, strings_can_be_null=False)
            table = pcsv.read_csv(path, convert_options=options)
    except (OSError, pa.ArrowException) as exc:
        raise _Refused(f"LABELS {path}: {exc}") from None
    twice = sorted({name for name in table.column_names if table.column_names.count(name) > 1})
    if twice:  # Parquet readers refuse a file with two columns of one name
        raise _Refused(f"LABELS {path}: two columns are named {twice[0]!r}; rename one")
    for name in [*key_types, ts_column]:
        if name not in table.column_names:
            what = (
                "the label time column the features need"
                if name == ts_column
                else f"a join key column {readers[name]}"
            )
            raise _Refused(
                f"LABELS {path}: no column {name!r} ({what}); it has {table.column_names}"
            )
    return table


def _key_column(table: pa.Table, name: str, dtype: DType) -> np.ndarray:
    """A join key column as the feature store takes it; _Refused for a null or a value of the
    wrong type, naming the column and the first such row."""
    import pyarrow as pa

    column = table.column(name)
    if column.null_count:
        row = column.is_null().to_numpy(zero_copy_only=False).argmax()
        raise _Refused(f"LABELS column {name!r} row {row}: a join key value is null")
    kind = column.type
    if pa.types.is_dictionary(kind):
        column, kind = column.cast(kind.value_type), kind.value_type
    fits = pa.types.is_integer if dtype is DType.INT64 else _is_text
    if not fits(kind):
        raise _Refused(
            f"LABELS column {name!r}: {kind} values, expected {dtype.name} join keys (integers "
            "for INT64, text for STRING; no other type is converted)"
        )
    try:
        column = column.cast(pa.int64() if dtype is DType.INT64 else pa.string())
    except pa.ArrowException as exc:  # a uint64 over the int64 range
        raise _Refused(f"LABELS column {name!r}: {exc}") from None
    if dtype is DType.INT64:
        return column.to_numpy()
    return np.array(column.to_pylist(), dtype=object)


def _is_text(kind: pa.DataType) -> bool:
    import pyarrow as pa

    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def _label_micros(column: pa.ChunkedArray, name: str) -> np.ndarray:
    """Label times as int64 µs since the epoch; _Refused naming the column otherwise."""
    import pyarrow as pa

    if column.null_count:
        row = column.is_null().to_numpy(zero_copy_only=False).argmax()
        raise _Refused(f"LABELS column {name!r} row {row}: a label time is null")
    kind = column.type
    if len(column) == 0:
        return np.zeros(0, np.int64)
    try:
        if pa.types.is_integer(kind):
            return column.cast(pa.int64()).to_numpy()
        if _is_text(kind):
            try:
                column = column.cast(pa.timestamp("us", "UTC"))
            except pa.ArrowInvalid as with_offset:
                try:
                    column = column.cast(pa.timestamp("us"))
                except pa.ArrowInvalid as without:
                    raise _Refused(
                        f"LABELS column {name!r}: {with_offset}; read as UTC without an "
                        f"offset: {without}"
                    ) from None
            kind = column.type
        if pa.types.is_timestamp(kind):
            return column.cast(pa.timestamp("us", kind.tz)).cast(pa.int64()).to_numpy()
    except pa.ArrowException as exc:
        raise _Refused(f"LABELS column {name!r}: {exc}") from None
    raise _Refused(
        f"LABELS column {name!r}: {kind} values; give timestamps, int64 µs since the epoch or "
        "ISO 8601 text"
    )


def _feature_types(store: OnlineStore, columns: list[str]) -> dict[str, tuple[DType, int]]:
    """Each output feature column's type and vector length, from its view's definition."""
    from featurestore.feature_refs import split_ref

    types = {}
    for i, column in enumerate(columns):
        (name, version), feature, _ = split_ref(column, i)
        view = store.registry.get_view(name, version)
        spec = next(f for f in view.features if f.name == feature)
        types[column] = (spec.dtype, spec.vector_length)
    return types


def _arrow_values(values: np.ndarray, present: np.ndarray, dtype: DType, length: int) -> pa.Array:
    """One feature column, null where the value is not PRESENT."""
    import pyarrow as pa

    missing = ~present
    if dtype is DType.FLOAT32_VECTOR:  # a list per row: Parquet takes no null of fixed size
        offsets = np.zeros(len(values) + 1, np.int32)
        np.cumsum(present * length, out=offsets[1:])
        flat = pa.array(np.ascontiguousarray(values[present], np.float32).reshape(-1))
        return pa.ListArray.from_arrays(pa.array(offsets), flat, mask=pa.array(missing))
    if dtype is DType.STRING:
        return pa.array(values.tolist(), type=pa.string(), mask=missing)
    return pa.array(values, mask=missing)


def _output_table(labels: pa.Table, found, types: dict[str, tuple[DType, int]]) -> pa.Table:
    """LABELS' columns, then per feature its values and status, per view its row's event
    time; _Refused when an output name is already a column of LABELS."""
    import pyarrow as pa

    names = np.array([s.name for s in FeatureStatus], dtype=object)
    columns: list[tuple[str, pa.Array]] = []
    for ref, values in found.values.items():
        status = found.statuses[ref]
        dtype, length = types[ref]
        columns.append((ref, _arrow_values(values, status == FeatureStatus.PRESENT, dtype, length)))
        statuses = names[status.astype(np.int64) - 1].tolist()
        columns.append((f"{ref}__status", pa.array(statuses, type=pa.string())))
    for view, event_us in found.event_us.items():
        stamps = pa.array(event_us, mask=event_us == 0).cast(pa.timestamp("us", "UTC"))
        columns.append((f"{view}__event_timestamp", stamps))
    given = set(labels.column_names)
    taken = set(given)
    for name, array in columns:
        if name in taken:
            whose = "LABELS has" if name in given else "two outputs take"
            raise _Refused(f"{whose} the column name {name!r}; rename the column or the feature")
        taken.add(name)
        labels = labels.append_column(name, array)
    return labels


def _write_parquet(table: pa.Table, out: Path) -> None:
    """Write next to OUT and rename over it, so OUT is never a partial file."""
    import pyarrow.parquet as pq

    partial = out.with_name(f".{out.name}.partial")
    try:
        pq.write_table(table, partial)
        os.replace(partial, out)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
