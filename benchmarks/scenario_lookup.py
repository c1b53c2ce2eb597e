"""The `lookup` scenario: GetOnlineFeatures of random entities against a store of N x 32 float32.

The rows are written straight into the LMDB environment before the server starts (only the
lookup is measured), into a data directory that is kept and reused by later runs of the same
size. Each client process pre-serializes its requests once and sends raw bytes, so the client's
protobuf cost stays out of the figures. One variant per --entities value, so --with-baseline
compares each against the transport floor at its own response size, and per --by value: the
view by reference, or the feature service SERVICE that reads it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

from benchmarks.scenarios import (
    RequestFn,
    ScenarioBase,
    ScenarioError,
    ScenarioRun,
    UnaryRequest,
    comma_choices,
    register_scenario,
)
from benchmarks.server_launch import add_ops_argument, launch_for, ops_metadata
from clients.feature_messages import get_request, online_features
from featurestore.dtypes import DType, FeatureStatus
from featurestore.online_store import OnlineStore, StoreConfig, WriteBatch
from featurestore.registry import Entity, Feature, FeatureService, FeatureView, JoinKey
from protos.featureserve.v1 import feature_store_pb2 as pb

METHOD = "/featureserve.v1.FeatureStore/GetOnlineFeatures"
ENTITY = "bench_entity"
JOIN_KEY = "entity_id"
VIEW = "bench_lookup"
SERVICE = "bench_lookup_service"
"""A feature service reading the whole view: what `--by service` looks up."""
BY = ("refs", "service")
MARKER = "bench-lookup.json"
LOAD_BATCH_ROWS = 100_000
REQUESTS_PER_CLIENT = 256
DEFAULT_ENTITIES_TOTAL = 1_000_000
DEFAULT_FEATURES = 32


def _int_list(text: str) -> list[int]:
    """argparse type for a comma-separated list of positive integers."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 1,10,100, got '{text}'") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got '{text}'")
    return values


def bench_definitions(features: int) -> tuple[Entity, FeatureView]:
    """The benchmark's entity (one int64 join key) and its view of `features` float32 columns."""
    entity = Entity(ENTITY, (JoinKey(JOIN_KEY, DType.INT64),))
    view = FeatureView(
        VIEW, ENTITY, tuple(Feature(f"f{j}", DType.FLOAT32) for j in range(features))
    )
    return entity, view


def default_data_dir(entities_total: int, features: int) -> Path:
    """Where the loaded store is kept between runs when --data-dir is not given."""
    return (
        Path(tempfile.gettempdir()) / "featureserve-bench" / f"lookup-{entities_total}x{features}"
    )


def load_store(data_dir: Path, entities_total: int, features: int, seed: int = 0) -> float:
    """Write entities 0..entities_total-1 with `features` random float32 values each, directly
    into the LMDB environment in batches of 100k rows; returns the seconds taken, 0 when the
    directory already holds this data set (its marker file matches)."""
    marker = data_dir / MARKER
    wanted = {"entities_total": entities_total, "features": features, "seed": seed}
    if marker.exists() and json.loads(marker.read_text()) == wanted:
        return 0.0
    if marker.exists() or (data_dir / "data.mdb").exists():
        raise ScenarioError(
            f"{data_dir} holds another data set ({marker.name} differs or is missing); "
            "pass an empty --data-dir or delete it"
        )
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    entity, view = bench_definitions(features)
    now_us = time.time_ns() // 1000
    config = StoreConfig(path=data_dir, map_size=1 << 31)
    with OnlineStore(config) as store:
        store.registry.apply([entity], [view])
        for start in range(0, entities_total, LOAD_BATCH_ROWS):
            ids = np.arange(start, min(start + LOAD_BATCH_ROWS, entities_total), dtype=np.int64)
            values = rng.standard_normal((len(ids), features), dtype=np.float32)
            batch = WriteBatch(
                view=VIEW,
                keys={JOIN_KEY: ids},
                event_us=np.full(len(ids), now_us, np.int64),
                columns={f"f{j}": values[:, j] for j in range(features)},
            )
            store.write(batch, now_us)
    marker.write_text(json.dumps(wanted))
    return time.perf_counter() - started


def apply_service(data_dir: Path) -> None:
    """Register SERVICE (reading the whole view) in the loaded store, before a server opens it."""
    with OnlineStore(StoreConfig(data_dir)) as store:
        store.registry.apply([], [], feature_services=[FeatureService(SERVICE, (VIEW,))])


def request_bytes(
    entities: int, entities_total: int, rng: np.random.Generator, by: str = "refs"
) -> bytes:
    """A serialized GetOnlineFeatures request for `entities` random keys and the whole view,
    named by reference or (by "service") through SERVICE."""
    ids = rng.integers(0, entities_total, size=entities, dtype=np.int64)
    if by == "service":
        return get_request(None, {JOIN_KEY: ids}, SERVICE).SerializeToString()
    return get_request([VIEW], {JOIN_KEY: ids}).SerializeToString()


def check_response(
    target: str,
    entities: int,
    entities_total: int,
    timeout_s: float,
    metadata: tuple = (),
    by: str = "refs",
) -> int:
    """Send one lookup, check every value came back PRESENT; returns the response size in bytes."""
    body = request_bytes(entities, entities_total, np.random.default_rng(1), by)
    with grpc.insecure_channel(target) as channel:
        raw = channel.unary_unary(METHOD)(body, timeout=timeout_s, metadata=metadata)
    features = online_features(pb.GetOnlineFeaturesResponse.FromString(raw), [VIEW])
    missing = [k for k, s in features.statuses.items() if (s != FeatureStatus.PRESENT).any()]
    if features.rows != entities or missing:
        raise ScenarioError(
            f"lookup of {entities} entities returned {features.rows} rows, "
            f"{len(missing)} features not PRESENT (first: {missing[:1]}); is --data-dir loaded?"
        )
    return len(raw)


class LookupScenario(ScenarioBase):
    """GetOnlineFeatures of --entities random keys against N loaded entities."""

    name = "lookup"
    help = "GetOnlineFeatures of random entities (x32 float32) against N loaded entities"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """--entities, --entities-total, --features, --data-dir."""
        parser.add_argument(
            "--entities",
            type=_int_list,
            default=[100],
            help="entities per request; a comma list runs one variant each (default 100)",
        )
        parser.add_argument(
            "--entities-total",
            type=int,
            default=DEFAULT_ENTITIES_TOTAL,
            help="entities loaded into the store (default 1000000; 200000 for quick runs)",
        )
        parser.add_argument(
            "--features",
            type=int,
            default=DEFAULT_FEATURES,
            help="float32 features per entity (default 32)",
        )
        parser.add_argument(
            "--data-dir",
            type=Path,
            default=None,
            help="store directory, loaded once and reused (default: a cache dir under $TMPDIR)",
        )
        parser.add_argument(
            "--by",
            type=comma_choices(BY),
            default=["refs"],
            help="name the view by its reference (refs) or through a feature service reading "
            f"it ({SERVICE}, registered when the harness starts the server); a comma list "
            "runs one variant each, side by side (default refs)",
        )
        add_ops_argument(parser)

    def variants(self, args: argparse.Namespace) -> list[argparse.Namespace]:
        """One namespace per (--entities value, --ops value, --by value)."""
        return [
            argparse.Namespace(**{**vars(args), "entities": [n], "ops": [o], "by": [b]})
            for n in args.entities
            for o in args.ops
            for b in args.by
        ]

    def setup(self, args: argparse.Namespace) -> ScenarioRun:
        """Load the store (unless cached), start a server unless --target, measure one response.

        params name the keys: h2load sends one body, so the same keys (hot in the CPU caches)
        every time; the Python generator draws random keys per request."""
        entities = args.entities[0]
        params = {
            "entities": entities,
            "features": args.features,
            "entities_total": args.entities_total,
            "keys": "fixed" if args.generator == "h2load" else "random",
            "ops": args.ops[0],
            "by": args.by[0],
        }
        server = None
        target = args.target
        if target is None:
            data_dir = args.data_dir or default_data_dir(args.entities_total, args.features)
            params["load_s"] = round(load_store(data_dir, args.entities_total, args.features), 1)
            apply_service(data_dir)
            models = data_dir / "bench-models"
            models.mkdir(exist_ok=True)
            server = launch_for(args.ops[0], data_dir, models)
            target = server.target
        try:
            response_bytes = check_response(
                target,
                entities,
                args.entities_total,
                args.timeout,
                ops_metadata(args.ops[0]),
                args.by[0],
            )
        except BaseException:
            if server is not None:
                server.stop()
            raise
        return ScenarioRun(
            target=target,
            server_pid=server.pid if server else args.server_pid,
            params=params,
            response_bytes=response_bytes,
            server=server,
        )

    def make_request_fn(self, args: argparse.Namespace, channel: grpc.aio.Channel) -> RequestFn:
        """Cycle through pre-serialized requests of random keys (distinct per client process)."""
        rng = np.random.default_rng(os.getpid())
        entities = args.entities[0]
        bodies = [
            request_bytes(entities, args.entities_total, rng, args.by[0])
            for _ in range(REQUESTS_PER_CLIENT)
        ]
        nxt = itertools.cycle(bodies).__next__
        call = channel.unary_unary(METHOD)
        timeout = args.timeout
        metadata = ops_metadata(args.ops[0])

        async def request() -> bytes:
            return await call(nxt(), timeout=timeout, metadata=metadata)

        return request

    def unary_request(self, args: argparse.Namespace) -> UnaryRequest | None:
        """One fixed request (the same keys every time) and the token of an ops-on server,
        for h2load."""
        rng = np.random.default_rng(2)
        body = request_bytes(args.entities[0], args.entities_total, rng, args.by[0])
        return METHOD, body, ops_metadata(args.ops[0])


LOOKUP = register_scenario(LookupScenario())
