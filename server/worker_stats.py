"""ModelStatistics across the processes of a `featureserve serve --workers N` group.

Each worker batches on its own, so each holds only its share of the figures. Each also serves
them on a unix socket in the group's metrics folder (made mode 0700 by workers.make_metrics_dir,
so only the group's user reaches it, and never through the public port); the worker that takes a
ModelStatistics call reads every sibling's socket at that moment and merges their figures with
its own. Nothing of this runs on the inference path."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from google.protobuf.message import DecodeError, Message

from protos.inference import grpc_service_pb2 as pb
from server.metrics import multiprocess_dir
from server.workers import STATS_SOCKET_GLOB, stats_socket, worker_index

log = logging.getLogger("featureserve.worker_stats")

SIBLING_TIMEOUT_S = 0.5
"""The longest a ModelStatistics call waits for a sibling (at most half the caller's remaining
deadline); one slower than that, or gone, or still starting, is left out of the totals."""
ANSWER_TIMEOUT_S = 5.0
"""The longest a worker spends writing its figures to a sibling that does not read them."""
MAX_SOCKET_PATH = 107
"""Bytes a unix socket address holds (sun_path, less its terminating NUL)."""
LENGTH = struct.Struct("!I")
"""The frame of an answer: its length first, so a sibling that dies mid-write is told from a
short answer (a truncated protobuf message can still parse)."""

LocalStatistics = Callable[[], pb.ModelStatisticsResponse]


def merge_statistics(parts: Iterable[Iterable[pb.ModelStatistics]]) -> list[pb.ModelStatistics]:
    """One ModelStatistics per (name, version) found in any part, in first-seen order: counts
    and durations summed (per batch size too), last_inference the latest."""
    totals: dict[tuple[str, str], pb.ModelStatistics] = {}
    batches: dict[tuple[str, str], dict[int, pb.InferBatchStatistics]] = {}
    for part in parts:
        for stats in part:
            key = (stats.name, stats.version)
            total = totals.get(key)
            if total is None:
                total = totals[key] = pb.ModelStatistics(name=stats.name, version=stats.version)
                batches[key] = {}
            total.last_inference = max(total.last_inference, stats.last_inference)
            total.inference_count += stats.inference_count
            total.execution_count += stats.execution_count
            _add_durations(total.inference_stats, stats.inference_stats)
            sizes = batches[key]
            for batch in stats.batch_stats:
                size = sizes.get(batch.batch_size)
                if size is None:
                    size = sizes[batch.batch_size] = pb.InferBatchStatistics(
                        batch_size=batch.batch_size
                    )
                _add_durations(size, batch)
    for key, total in totals.items():
        total.batch_stats.extend(batches[key][size] for size in sorted(batches[key]))
    return list(totals.values())


def _add_durations(total: Message, part: Message) -> None:
    """Add each StatisticDuration field set in part to the same field of total."""
    for field, theirs in part.ListFields():
        if field.message_type is not None:
            mine = getattr(total, field.name)
            mine.count += theirs.count
            mine.ns += theirs.ns


@contextlib.contextmanager
def socket_address(path: Path) -> Iterator[str]:
    """path as a unix socket address: one longer than sun_path holds (a long $TMPDIR) is
    reached through an open descriptor of its folder, /proc/self/fd/N/name, as systemd does."""
    if len(os.fsencode(path)) <= MAX_SOCKET_PATH:
        yield str(path)
        return
    folder = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{folder}/{path.name}"
    finally:
        os.close(folder)


async def read_statistics(path: Path) -> pb.ModelStatisticsResponse:
    """The figures a worker serves on the socket at path (the caller bounds the wait)."""
    with socket_address(path) as address:
        reader, writer = await asyncio.open_unix_connection(address)
    try:
        (length,) = LENGTH.unpack(await reader.readexactly(LENGTH.size))
        return pb.ModelStatisticsResponse.FromString(await reader.readexactly(length))
    finally:
        writer.close()


class WorkerStatistics:
    """This worker's statistics socket, and the reading of its siblings' ones."""

    def __init__(self, folder: Path, local: LocalStatistics) -> None:
        self.folder = folder
        self.path = stats_socket(folder, os.getpid())
        self._local = local
        self._server: asyncio.Server | None = None

    @classmethod
    def of_this_worker(cls, local: LocalStatistics) -> WorkerStatistics | None:
        """The group's statistics when this process is a --workers worker, else None."""
        folder = multiprocess_dir()
        return None if worker_index() is None or folder is None else cls(folder, local)

    async def start(self) -> None:
        """Serve this worker's figures on its socket."""
        self.path.unlink(missing_ok=True)  # left by an earlier process of the same pid
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with socket_address(self.path) as address:
                sock.bind(address)
            self._server = await asyncio.start_unix_server(self._answer, sock=sock)
        except BaseException:
            sock.close()
            raise

    async def close(self) -> None:
        """Stop serving and remove the socket (siblings then leave this worker out)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        self.path.unlink(missing_ok=True)
        await server.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Write this worker's figures, framed, to the sibling that connected."""
        body = self._local().SerializeToString()
        try:
            writer.write(LENGTH.pack(len(body)) + body)
            await asyncio.wait_for(writer.drain(), ANSWER_TIMEOUT_S)
        except (OSError, TimeoutError) as exc:
            log.debug("a sibling did not take this worker's statistics", extra={"error": repr(exc)})
        finally:
            writer.close()

    async def siblings(self, remaining: float | None) -> list[pb.ModelStatisticsResponse]:
        """Every sibling's figures now, read concurrently, waiting at most SIBLING_TIMEOUT_S
        and half of `remaining` (the caller's deadline, in seconds); a sibling that does not
        answer in time is left out, at debug level."""
        timeout = SIBLING_TIMEOUT_S if remaining is None else min(SIBLING_TIMEOUT_S, remaining / 2)
        paths = [p for p in self.folder.glob(STATS_SOCKET_GLOB) if p != self.path]
        answers = await asyncio.gather(*(self._read(path, timeout) for path in paths))
        return [answer for answer in answers if answer is not None]

    async def _read(self, path: Path, timeout: float) -> pb.ModelStatisticsResponse | None:
        """One sibling's figures, or None when it is gone, starting, slow or answers garbage."""
        try:
            return await asyncio.wait_for(read_statistics(path), timeout)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, DecodeError) as exc:
            log.debug(
                "a sibling's statistics were left out",
                extra={"socket": str(path), "error": repr(exc)},
            )
            return None
