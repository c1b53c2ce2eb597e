"""The `ingest` scenario: durable StreamWriteFeatures of 32 float32 features, reported as rows/s.

A client stream does not fit one-request-one-response load, so one "request" here is one whole
stream: --messages-per-stream pre-serialized messages of --rows-per-message rows, then the
server's acknowledgement (sent once every row is committed with sync). rows_per_s = streams/s x
rows per stream. Each stream re-stamps its pre-built messages with newer event times and shifts
their random keys, so rows are real last-write-wins updates; a row whose key a concurrent stream
wrote with a newer time counts as stale (it was still compared inside a durable transaction).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

from benchmarks.scenario_lookup import JOIN_KEY, VIEW, bench_definitions
from benchmarks.scenarios import RequestFn, ScenarioBase, ScenarioRun, register_scenario
from benchmarks.server_launch import launch
from clients.feature_client import FeatureStoreClient
from clients.feature_messages import write_request
from featurestore.online_store import OnlineStore, StoreConfig
from protos.featureserve.v1 import feature_store_pb2 as pb

METHOD = "/featureserve.v1.FeatureStore/StreamWriteFeatures"
DEFAULT_KEY_SPACE = 1_000_000


class IngestRowsError(Exception):
    """The server acknowledged fewer rows written than the stream carried."""


def message_bytes(
    rows: int, features: int, key_space: int, event_us: int, rng: np.random.Generator
) -> bytes:
    """A serialized WriteFeaturesRequest of `rows` random keys and float32 feature columns."""
    ids = rng.choice(key_space, size=rows, replace=False).astype(np.int64)
    values = rng.standard_normal((rows, features), dtype=np.float32)
    request = write_request(
        VIEW, {JOIN_KEY: ids}, event_us, {f"f{j}": values[:, j] for j in range(features)}
    )
    return request.SerializeToString()


class IngestScenario(ScenarioBase):
    """Durable client-stream writes; one request = one stream of K messages."""

    name = "ingest"
    help = "durable StreamWriteFeatures (x32 float32); one request = one stream of K messages"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """--rows-per-message, --messages-per-stream, --features, --key-space."""
        parser.add_argument(
            "--rows-per-message", type=int, default=1000, help="rows per message (default 1000)"
        )
        parser.add_argument(
            "--messages-per-stream",
            type=int,
            default=10,
            help="messages per stream, i.e. per measured request (default 10)",
        )
        parser.add_argument(
            "--features", type=int, default=32, help="float32 features per row (default 32)"
        )
        parser.add_argument(
            "--key-space",
            type=int,
            default=DEFAULT_KEY_SPACE,
            help="rows are written to random keys in 0..N-1 (default 1000000)",
        )

    def setup(self, args: argparse.Namespace) -> ScenarioRun:
        """Register the view in a fresh store, start a server (unless --target); fix event time."""
        params = {
            "rows_per_message": args.rows_per_message,
            "messages_per_stream": args.messages_per_stream,
            "features": args.features,
        }
        client_args = argparse.Namespace(**vars(args), event_us=time.time_ns() // 1000)
        rows = args.rows_per_message * args.messages_per_stream
        entity, view = bench_definitions(args.features)
        if args.target:
            with FeatureStoreClient(args.target) as client:
                client.apply([entity], [view])
            return ScenarioRun(
                target=args.target,
                server_pid=args.server_pid,
                params=params,
                rows_per_request=rows,
                client_args=client_args,
            )
        workdir = Path(tempfile.mkdtemp(prefix="featureserve-ingest-"))
        with OnlineStore(StoreConfig(path=workdir / "data")) as store:
            store.registry.apply([entity], [view])
        (workdir / "models").mkdir()
        server = launch(workdir / "data", workdir / "models", scratch=workdir)
        return ScenarioRun(
            target=server.target,
            server_pid=server.pid,
            params=params,
            rows_per_request=rows,
            server=server,
            client_args=client_args,
        )

    def make_request_fn(self, args: argparse.Namespace, channel: grpc.aio.Channel) -> RequestFn:
        """One whole stream of pre-built, newly stamped messages; raises if a row is not written."""
        rng = np.random.default_rng(os.getpid())
        messages = [
            message_bytes(args.rows_per_message, args.features, args.key_space, args.event_us, rng)
            for _ in range(args.messages_per_stream)
        ]
        rows = args.rows_per_message * args.messages_per_stream
        call = channel.stream_unary(METHOD)
        timeout = args.timeout

        requests = [pb.WriteFeaturesRequest.FromString(m) for m in messages]
        clock = [args.event_us]

        base_ids = [np.frombuffer(m.entity_keys[0].values.data, "<i8") for m in requests]

        def stamped() -> list[bytes]:
            clock[0] = max(clock[0] + len(requests), time.time_ns() // 1000)
            shift = int(rng.integers(args.key_space))
            for k, message in enumerate(requests):
                ids = (base_ids[k] + shift) % args.key_space
                message.entity_keys[0].values.data = ids.astype("<i8").tobytes()
                stamp = clock[0] + k
                message.event_timestamps = np.full(args.rows_per_message, stamp, "<i8").tobytes()
            return [m.SerializeToString() for m in requests]

        async def request() -> None:
            raw = await call(iter(stamped()), timeout=timeout)
            answer = pb.WriteFeaturesResponse.FromString(raw)
            if answer.rows_written + answer.rows_stale != rows or answer.rows_rejected:
                raise IngestRowsError(f"server applied {answer.rows_written} of {rows} rows")

        return request


INGEST = register_scenario(IngestScenario())
