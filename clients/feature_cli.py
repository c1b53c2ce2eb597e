"""Feature store subcommands: `featureserve apply`, `ingest` and `get`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc
import numpy as np

from clients.channel import ClientError
from clients.cli import add_connection_flags, client_config
from clients.feature_client import FeatureStoreClient
from featurestore.dtypes import DType, FeatureStatus


def cmd_apply(args: argparse.Namespace) -> int:
    """Register the entities and views declared in a features.toml file."""
    from featurestore.definitions import load_definitions

    entities, views = load_definitions(args.file)
    with FeatureStoreClient(client_config(args)) as client:
        results = client.apply(entities, views, dry_run=args.dry_run)
    for result in results:
        print(f"{result.view}@{result.version}: {result.action}")
    return 0


def _read_table(path: Path):
    """The file as an Arrow table; only empty CSV cells are null, so "NaN" stays a NaN value."""
    if path.suffix in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        return pq.read_table(path)
    import pyarrow.csv as pcsv

    options = pcsv.ConvertOptions(null_values=[""], strings_can_be_null=True)
    return pcsv.read_csv(path, convert_options=options)


def _event_times(column) -> np.ndarray:
    """Event times as datetime64 (ISO 8601 text or timestamps) or int µs since the epoch."""
    import pyarrow as pa

    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        import pandas as pd

        # "mixed": pandas 2.2's "ISO8601" gives wrong instants when offsets and naive times mix.
        parsed = pd.to_datetime(column.to_pandas(), utc=True, format="mixed")
        return parsed.dt.tz_localize(None).to_numpy()
    return column.to_numpy()


def _vectors(column, length: int) -> np.ndarray:
    """A rows x length float32 array from list cells or "[0.1, 0.2]" text; nulls become zeros."""
    rows = []
    for cell in column.to_pylist():
        if cell is None:
            cell = [0.0] * length
        elif isinstance(cell, str):
            cell = [float(x) for x in cell.strip("[] ").replace(",", " ").split()]
        rows.append(np.asarray(cell, dtype=np.float32))
    return np.stack(rows) if rows else np.zeros((0, length), dtype=np.float32)


def _feature_values(column, dtype: DType, length: int) -> np.ndarray:
    """Values of one feature column with nulls filled by a placeholder the null mask hides."""
    if dtype == DType.FLOAT32_VECTOR:
        return _vectors(column, length)
    if dtype == DType.STRING:
        return column.cast("string").fill_null("").to_numpy(zero_copy_only=False)
    filler = False if dtype == DType.BOOL else 0
    return column.fill_null(filler).to_numpy(zero_copy_only=False)


def _entity_keys(client: FeatureStoreClient, view) -> list:
    entities, _ = client.list_feature_views(view.name)
    for entity in entities:
        if entity.name == view.entity:
            return list(entity.join_keys)
    raise ClientError(
        grpc.StatusCode.NOT_FOUND, f"entity {view.entity!r} of view {view.name!r} is not registered"
    )


def cmd_ingest(args: argparse.Namespace) -> int:
    """Stream a CSV or Parquet file into a view; columns are named like the view's features."""
    table = _read_table(args.file)
    with FeatureStoreClient(client_config(args)) as client:
        view = client.get_feature_view(args.view, args.version)
        join_keys = _entity_keys(client, view)
        wanted = [k.name for k in join_keys] + [args.event_time_column]
        missing = [name for name in wanted if name not in table.column_names]
        if missing:
            print(f"featureserve: {args.file}: missing columns {missing}", file=sys.stderr)
            return 2
        try:
            times = _event_times(table[args.event_time_column])
        except ValueError as exc:
            print(f"featureserve: {args.file}: {args.event_time_column}: {exc}", file=sys.stderr)
            return 2
        keys = {k.name: _feature_values(table[k.name], k.dtype, 0) for k in join_keys}
        features = {}
        nulls = {}
        for feature in view.features:
            if feature.name not in table.column_names:
                continue
            column = table[feature.name]
            nulls[feature.name] = column.is_null().to_numpy(zero_copy_only=False)
            features[feature.name] = _feature_values(column, feature.dtype, feature.vector_length)
        with client.stream_writer(
            args.view, batch_rows=args.batch_rows, version=view.version, policy=args.policy
        ) as writer:
            writer.write(keys, times, features, nulls)
        summary = writer.summary
    print(f"written={summary.written} stale={summary.stale} rejected={summary.rejected}")
    for err in summary.errors[:20]:
        print(f"  batch {err.batch} row {err.row} {err.column}: {err.reason}")
    return 0 if summary.rejected == 0 else 1


def _key_values(text: str) -> np.ndarray:
    parts = text.split(",")
    try:
        return np.array([int(p) for p in parts], dtype=np.int64)
    except ValueError:
        return np.array(parts, dtype=object)


def cmd_get(args: argparse.Namespace) -> int:
    """Print features of a few entities."""
    with FeatureStoreClient(client_config(args)) as client:
        view = client.get_feature_view(args.view, args.version)
        keys = dict(kv.split("=", 1) for kv in args.entity)
        if args.keys is not None:
            join_keys = _entity_keys(client, view)
            keys[join_keys[0].name] = args.keys
        ref = f"{args.view}@{view.version}" if args.version else args.view
        refs = [f"{ref}:{f}" for f in args.features.split(",")] if args.features else [ref]
        result = client.get_online_features(refs, {k: _key_values(v) for k, v in keys.items()})
    first_keys = {k: _key_values(v) for k, v in keys.items()}
    stamps = result.event_timestamps.get(args.view, np.zeros(result.rows, dtype=np.int64))
    for row in range(result.rows):
        key_text = ", ".join(f"{k}={v[row]}" for k, v in first_keys.items())
        print(f"[{key_text}] event_time_us={int(stamps[row])}")
        for name, values in result.values.items():
            status = FeatureStatus(int(result.statuses[name][row])).name
            shown = values[row] if status == "PRESENT" else "-"
            print(f"  {name} = {shown} ({status})")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add apply, ingest and get."""
    p = subparsers.add_parser(
        "apply",
        help="register entities and feature views from a file",
        description="Apply a features.toml file to the registry.",
    )
    p.add_argument("file", type=Path, help="features.toml")
    p.add_argument("--dry-run", action="store_true", help="validate only, change nothing")
    add_connection_flags(p)
    p.set_defaults(func=cmd_apply)

    p = subparsers.add_parser(
        "ingest",
        help="write a CSV or Parquet file into a view",
        description="Stream a CSV/Parquet file into a feature view.",
    )
    p.add_argument("file", type=Path, help="CSV or Parquet file")
    p.add_argument("--view", required=True, help="target feature view")
    p.add_argument("--version", type=int, default=0, help="view version (default latest)")
    p.add_argument(
        "--event-time-column",
        default="event_timestamp",
        help="column of event times (datetime or int µs since epoch)",
    )
    p.add_argument("--batch-rows", type=int, default=1000, help="rows per message")
    p.add_argument(
        "--policy",
        choices=["reject_batch", "skip_bad_rows"],
        default="reject_batch",
        help="what to do with bad rows",
    )
    add_connection_flags(p)
    p.set_defaults(func=cmd_ingest)

    p = subparsers.add_parser(
        "get", help="print online features of some entities", description="Look up online features."
    )
    p.add_argument("--view", required=True, help="feature view")
    p.add_argument("--version", type=int, default=0, help="view version (default latest)")
    p.add_argument("--keys", help="comma-separated keys of the view's (first) join key")
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
