"""Feature store subcommands: `featureserve apply`, `ingest` and `get`."""

from __future__ import annotations

import argparse
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
    import pandas as pd

    if path.suffix in (".parquet", ".pq"):
        return pd.read_parquet(path)
    return pd.read_csv(path)


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
        missing = [k.name for k in join_keys if k.name not in table.columns]
        missing += [args.event_time_column] if args.event_time_column not in table.columns else []
        if missing:
            print(f"featureserve: {args.file}: missing columns {missing}")
            return 2
        times = table[args.event_time_column]
        if times.dtype.kind in "OM":
            import pandas as pd

            times = pd.to_datetime(times, utc=True).dt.tz_localize(None)
        keys = {k.name: table[k.name].to_numpy() for k in join_keys}
        features = {}
        nulls = {}
        for feature in view.features:
            if feature.name not in table.columns:
                continue
            column = table[feature.name]
            nulls[feature.name] = column.isna().to_numpy()
            if feature.dtype == DType.STRING:
                features[feature.name] = column.fillna("").astype(str).to_numpy(dtype=object)
            elif feature.dtype == DType.FLOAT32_VECTOR:
                features[feature.name] = np.stack([np.asarray(v, dtype=np.float32) for v in column])
            else:
                features[feature.name] = column.fillna(0).to_numpy()
        with client.stream_writer(
            args.view, batch_rows=args.batch_rows, version=view.version, policy=args.policy
        ) as writer:
            writer.write(keys, times.to_numpy(), features, nulls)
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
