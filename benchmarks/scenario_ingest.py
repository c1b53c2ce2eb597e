"""The `ingest` scenario: durable StreamWriteFeatures of 32 float32 features, reported as rows/s.

A client stream does not fit one-request-one-response load, so one "request" here is one whole
stream: --messages-per-stream messages of --rows-per-message rows, then the server's
acknowledgement (sent once every row is committed with sync). Only rows written count: a stream
whose answer calls any row stale or rejected is an error (IngestRowsError), so rows_per_s =
fully written streams/s x rows per stream. The generator writes no stale row by construction:
the key space is cut into interleaved slices of at least a stream's rows, each stream in flight
holds a slice of its own (claimed across client processes with an exclusive file) and writes
distinct random keys of it, and the event times of a request function only ever increase, so
no row is ever stale. Setup writes into a fresh, empty store, so a row is an insert the first
time its key is written and a last-write-wins update after. Each point's record
adds rows_written, rows_stale and rows_rejected summed over every answer of the point (warm-up
included), so a point where any row was not written says so.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from benchmarks.scenario_lookup import JOIN_KEY, VIEW, bench_definitions
from benchmarks.scenarios import (
    RequestFn,
    ScenarioBase,
    ScenarioError,
    ScenarioRun,
    register_scenario,
)
from benchmarks.server_launch import launch
from clients.feature_client import FeatureStoreClient
from clients.feature_messages import write_request
from featurestore.online_store import OnlineStore, StoreConfig
from protos.featureserve.v1 import feature_store_pb2 as pb

METHOD = "/featureserve.v1.FeatureStore/StreamWriteFeatures"
DEFAULT_KEY_SPACE = 1_000_000
TALLY_PREFIX = "tally-"
SLICE_PREFIX = "slice-"
TALLY_FIELDS = ("rows_written", "rows_stale", "rows_rejected")


class IngestRowsError(Exception):
    """The server's answer counts rows of the stream as stale or rejected: not all were written."""


class KeySlicesExhaustedError(Exception):
    """Every key slice is held by a stream in flight: more streams than --key-space allows."""


class KeySlices:
    """Interleaved slices of the key space, slice s holding keys s, s + n, s + 2n, ...; a slice
    is claimed for the whole point by creating its file in `folder`, so no two client processes
    share one, and is reused by the claiming process only after its last stream was answered."""

    def __init__(self, folder: Path, key_space: int, stream_rows: int) -> None:
        self.folder = folder
        self.count = key_space // stream_rows
        self.size = key_space // self.count
        self.stream_rows = stream_rows
        self._free: list[int] = []

    def take(self, rng: np.random.Generator) -> int:
        """A slice no other stream in flight holds: one this process released, else a new one."""
        if self._free:
            return self._free.pop()
        start = int(rng.integers(self.count))
        for k in range(self.count):
            index = (start + k) % self.count
            try:
                os.close(os.open(self.folder / f"{SLICE_PREFIX}{index}", os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                continue
            return index
        raise KeySlicesExhaustedError(
            f"all {self.count} key slices are held by streams in flight; raise --key-space to at "
            f"least {self.stream_rows} x the streams in flight"
        )

    def release(self, index: int) -> None:
        """Give back a slice whose stream was answered (every row of it committed)."""
        self._free.append(index)

    def keys(self, index: int, rng: np.random.Generator) -> np.ndarray:
        """stream_rows distinct random keys of slice index, as little-endian int64."""
        picks = rng.choice(self.size, size=self.stream_rows, replace=False)
        return (index + self.count * picks).astype("<i8")


def message(rows: int, features: int, rng: np.random.Generator) -> pb.WriteFeaturesRequest:
    """A WriteFeaturesRequest of `rows` float32 rows of random values; keys and event times are
    set per stream."""
    values = rng.standard_normal((rows, features), dtype=np.float32)
    columns = {f"f{j}": values[:, j] for j in range(features)}
    return write_request(VIEW, {JOIN_KEY: np.zeros(rows, np.int64)}, 0, columns)


def sum_tallies(folder: Path) -> dict[str, int]:
    """Sum the client processes' answer tallies in folder, then clear it (tallies and slice
    claims) for the next point."""
    totals = np.zeros(len(TALLY_FIELDS), np.int64)
    for path in folder.iterdir():
        if path.name.startswith(TALLY_PREFIX):
            tally = np.frombuffer(path.read_bytes(), "<i8")
            if len(tally) == len(TALLY_FIELDS):
                totals += tally
        path.unlink()
    return dict(zip(TALLY_FIELDS, totals.tolist(), strict=True))


class IngestScenario(ScenarioBase):
    """Durable client-stream writes; one request = one stream of K messages."""

    name = "ingest"
    help = "durable StreamWriteFeatures (x32 float32); one request = one stream of K messages"
    response_sized = False
    """Its answer is a row count, so --with-baseline has no response size to match."""

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
            help="rows are written to random keys in 0..N-1, each stream in flight on its own "
            "slice of at least a stream's rows (default 1000000: 100 slices of 10000)",
        )

    def setup(self, args: argparse.Namespace) -> ScenarioRun:
        """Refuse --rate (an open loop's streams in flight, hence key slices, have no bound),
        check the key space holds a slice per stream, register the view in a fresh store and
        start a server (unless --target); make the folder where clients claim slices."""
        if getattr(args, "rate", None):
            raise ScenarioError(
                "ingest runs closed loop only: --rate has no bound on streams in flight, each "
                "holding a key slice; use --concurrency"
            )
        rows = args.rows_per_message * args.messages_per_stream
        slices = args.key_space // rows
        most = max(getattr(args, "concurrency", None) or [1])
        if slices < most:
            raise ScenarioError(
                f"--key-space {args.key_space} holds {slices} slices of {rows} rows (one per "
                f"stream in flight) but --concurrency reaches {most}: raise --key-space to at "
                f"least {most * rows} or lower --rows-per-message or --messages-per-stream"
            )
        params = {
            "rows_per_message": args.rows_per_message,
            "messages_per_stream": args.messages_per_stream,
            "features": args.features,
            "key_space": args.key_space,
        }
        client_dir = tempfile.mkdtemp(prefix="featureserve-ingest-clients-")
        client_args = argparse.Namespace(**vars(args), client_dir=client_dir)
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
        """One whole stream of pre-built messages, given distinct keys of a slice it holds and
        newer event times; raises IngestRowsError unless the answer says every row was written."""
        rng = np.random.default_rng()
        rows, count = args.rows_per_message, args.messages_per_stream
        stream_rows = rows * count
        slices = KeySlices(Path(args.client_dir), args.key_space, stream_rows)
        requests = [message(rows, args.features, rng) for _ in range(count)]
        fd, _ = tempfile.mkstemp(prefix=TALLY_PREFIX, dir=args.client_dir)
        tally = np.zeros(len(TALLY_FIELDS), "<i8")
        clock = [0]
        call = channel.stream_unary(METHOD)
        timeout = args.timeout

        def stamped(index: int) -> list[bytes]:
            clock[0] = max(clock[0] + count, time.time_ns() // 1000)
            keys = slices.keys(index, rng).reshape(count, rows)
            for k, request in enumerate(requests):
                request.entity_keys[0].values.data = keys[k].tobytes()
                request.event_timestamps = np.full(rows, clock[0] + k, "<i8").tobytes()
            return [request.SerializeToString() for request in requests]

        async def request() -> None:
            index = slices.take(rng)
            raw = await call(iter(stamped(index)), timeout=timeout)
            # Released only once answered: a failed stream may still commit, so its slice retires.
            slices.release(index)
            answer = pb.WriteFeaturesResponse.FromString(raw)
            tally[:] += (answer.rows_written, answer.rows_stale, answer.rows_rejected)
            os.pwrite(fd, tally.tobytes(), 0)
            if answer.rows_written != stream_rows:
                raise IngestRowsError(
                    f"{answer.rows_written} of {stream_rows} rows written ({answer.rows_stale} "
                    f"stale, {answer.rows_rejected} rejected)"
                )

        return request

    def finish_point(self, run: ScenarioRun, record: dict[str, Any]) -> None:
        """Add the rows written, stale and rejected that the point's answers counted."""
        assert run.client_args is not None
        record.update(sum_tallies(Path(run.client_args.client_dir)))

    def teardown(self, run: ScenarioRun) -> None:
        """Stop the server, if setup started one, and remove the clients' folder."""
        super().teardown(run)
        if run.client_args is not None:
            shutil.rmtree(run.client_args.client_dir, ignore_errors=True)


INGEST = register_scenario(IngestScenario())
