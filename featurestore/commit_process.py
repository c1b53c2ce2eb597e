"""Group commit in a child process: durable writes run under their own interpreter lock.

py-lmdb releases the GIL around every LMDB call, so a writer thread inside the server hands the
GIL to the event loop twice per row and waits to get it back: under durable ingest the
last-write-wins apply took twice as long as alone (0.45-0.56 s against 0.30 s per 200k rows).
Here a child process runs the GroupCommitter over its own handle on the same LMDB environment.
The server sends it each prepared batch as its history record (which already packs the batch's
keys and rows), with the view version and the created_us of the definition it was encoded for,
and resolves the batch's future once the child reports the commit synced.
"""

from __future__ import annotations

import atexit
import gc
import itertools
import os
import pickle
import queue
import signal
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial
from multiprocessing.connection import Connection

import numpy as np

from featurestore.errors import FeatureStoreError, UnavailableError
from featurestore.group_commit import GroupCommitter
from featurestore.history import unpack_batch
from featurestore.online_store import (
    OnlineStore,
    PreparedBatch,
    RowError,
    StoreConfig,
    WriteResult,
    definition_changed,
)

COMMIT_ROWS = 600_000
"""Rows per commit at most. A random update dirties a whole B-tree leaf, and a commit into a
1M-key table rewrites nearly every leaf from ~200k rows on, so more rows per commit cost little
more I/O: 600k gave 301-317k rows/s at 96-128 streams, 400k gave 293k (one run each)."""
GC_THRESHOLDS = (10_000, 50, 50)
"""The child decodes a thousand row objects per batch; at Python's default thresholds the
collector ran every 700 of them and took ~3% of the committing thread."""


class CommitProcess:
    """submit(prepared) -> Future[WriteResult], durable once resolved, like GroupCommitter; the
    commits run in a child process, started by the first write (a server that only reads never
    pays its ~0.7 s of start-up CPU) and again by the next write if it dies."""

    def __init__(self, config: StoreConfig) -> None:
        self._config = config
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._channel: _Channel | None = None
        self._closed = False
        atexit.register(self.close)

    def submit(self, prepared: PreparedBatch) -> Future[WriteResult]:
        """Send a prepared batch to the commit process; a batch without rows resolves at once."""
        future: Future[WriteResult] = Future()
        future.set_running_or_notify_cancel()
        if not prepared.keys:
            future.set_result(WriteResult(0, 0, prepared.rejected, prepared.errors))
            return future
        with self._lock:
            if self._closed:
                raise UnavailableError("the commit process is closed")
            ident = next(self._ids)
            while self._channel is None or not self._channel.send(ident, prepared, future):
                self._channel = _Channel.start(self._config)
        return future

    def close(self) -> None:
        """Let the child commit everything already sent, then stop it."""
        with self._lock:
            self._closed = True
            channel, self._channel = self._channel, None
        if channel is not None:
            channel.close()
        atexit.unregister(self.close)

    @property
    def pid(self) -> int | None:
        """The current commit process's pid (None before the first write and once closed)."""
        channel = self._channel
        return None if channel is None else channel.process.pid


@dataclass
class _Channel:
    """One child process, the pipes to it, and the batches it has not yet answered."""

    process: subprocess.Popen
    to_child: Connection
    from_child: Connection
    outbox: queue.SimpleQueue[bytes | None] = field(default_factory=queue.SimpleQueue)
    pending: dict[int, tuple[int, list[RowError], Future[WriteResult]]] = field(
        default_factory=dict
    )
    lock: threading.Lock = field(default_factory=threading.Lock)
    failed: bool = False
    receiver: threading.Thread | None = None

    @classmethod
    def start(cls, config: StoreConfig) -> _Channel:
        """Start a child: a fresh interpreter running this module, which imports the store
        only (a fork would copy the server's gRPC threads; multiprocessing would import the
        server's main module in it)."""
        requests_r, requests_w = os.pipe()
        answers_r, answers_w = os.pipe()
        process = subprocess.Popen(
            [sys.executable, "-m", __name__, str(requests_r), str(answers_w)],
            pass_fds=(requests_r, answers_w),
            stdin=subprocess.DEVNULL,
        )
        os.close(requests_r)
        os.close(answers_w)
        channel = cls(
            process, Connection(requests_w, readable=False), Connection(answers_r, writable=False)
        )
        channel.outbox.put(pickle.dumps(config, protocol=pickle.HIGHEST_PROTOCOL))
        threading.Thread(target=channel._send_loop, name="commit-send", daemon=True).start()
        channel.receiver = threading.Thread(
            target=channel._receive_loop, name="commit-receive", daemon=True
        )
        channel.receiver.start()
        return channel

    def send(self, ident: int, prepared: PreparedBatch, future: Future[WriteResult]) -> bool:
        """Queue a batch for the child; False if the child has died (nothing queued)."""
        view = prepared.view
        message = (
            ident,
            view.name,
            view.version,
            view.created_us,
            prepared.row_count,
            prepared.event_us,
            prepared.history,
        )
        with self.lock:
            if self.failed:
                return False
            self.pending[ident] = (prepared.rejected, prepared.errors, future)
        self.outbox.put(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))
        return True

    def close(self) -> None:
        """End of input for the child; wait for its last answers and for it to exit."""
        self.outbox.put(None)
        self.receiver.join()
        self.process.wait()

    def _send_loop(self) -> None:
        try:
            while (message := self.outbox.get()) is not None:
                self.to_child.send_bytes(message)
        except OSError:
            pass
        finally:
            self.to_child.close()

    def _receive_loop(self) -> None:
        try:
            while True:
                ident, outcome = pickle.loads(self.from_child.recv_bytes())
                with self.lock:
                    rejected, errors, future = self.pending.pop(ident)
                if isinstance(outcome, BaseException):
                    future.set_exception(outcome)
                else:
                    written, stale = outcome
                    future.set_result(WriteResult(written, stale, rejected, errors))
        except (EOFError, OSError):
            pass
        with self.lock:
            self.failed = True
            lost, self.pending = list(self.pending.values()), {}
        try:
            code = self.process.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            code = None
        for _, _, future in lost:
            future.set_exception(
                UnavailableError(
                    f"the commit process exited (exit code {code}) before this "
                    "batch was committed; resend it (writes are idempotent)"
                )
            )


def main(argv: list[str]) -> None:
    """`python -m featurestore.commit_process REQUESTS_FD ANSWERS_FD`: the child's entry point;
    the first message on REQUESTS_FD is the pickled StoreConfig."""
    requests = Connection(int(argv[0]), writable=False)
    answers = Connection(int(argv[1]), readable=False)
    config = pickle.loads(requests.recv_bytes())
    serve_commits(requests, answers, config)


def serve_commits(requests: Connection, answers: Connection, config: StoreConfig) -> None:
    """The child: group-commit every batch received until end of input, answering each with its
    (written, stale) counts once durable. Signals meant for the server are ignored: the server
    ends the input when it stops, and the child then commits what it has and exits."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    send_lock = threading.Lock()
    unpacker = _Unpacker()
    with OnlineStore(config) as store:
        committer = GroupCommitter(
            _Decoding(store, unpacker), max_batch_rows=COMMIT_ROWS, linger_fraction=0.0
        )
        try:
            while True:
                try:
                    ident, *fields = pickle.loads(requests.recv_bytes())
                except EOFError:
                    break
                batch = _Received(*fields)
                unpacker.add(batch)
                committer.submit(batch).add_done_callback(
                    partial(_answer, answers, send_lock, ident)
                )
        finally:
            committer.close()
            unpacker.close()


@dataclass
class _Received:
    """A batch as it came down the pipe. The thread reading the pipe holds the child's GIL as
    little as possible, so the batch is unpacked later, by the _Unpacker or by the committing
    thread, whichever comes first."""

    view: str
    version: int
    created_us: int
    row_count: int
    event_us: np.ndarray
    history: bytes
    unpacked: tuple[list[bytes], list[bytes]] | None = None

    def unpack(self) -> tuple[list[bytes], list[bytes]]:
        """The batch's LMDB keys and packed rows."""
        if self.unpacked is None:
            self.unpacked = unpack_batch(self.history)
        return self.unpacked


class _Unpacker:
    """Unpacks received batches on a thread of its own, but only while the committing thread
    waits for LMDB's commit, which writes and syncs the pages with the GIL released throughout.

    During the apply, py-lmdb releases the GIL twice per row, and a second busy thread takes it
    each time and holds it for up to the switch interval: unpacking alongside the apply made
    commits slower. Alongside the commit it is free, and the next commit finds its batches
    unpacked.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._waiting: deque[_Received] = deque()
        self._open = False
        self._busy = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="unpack", daemon=True)
        self._thread.start()

    def add(self, batch: _Received) -> None:
        """A batch to unpack at the next commit."""
        with self._cond:
            self._waiting.append(batch)

    def __enter__(self) -> None:
        """Unpack while the body (a commit) runs."""
        with self._cond:
            self._open = True
            self._cond.notify_all()

    def __exit__(self, *exc: object) -> None:
        """Stop unpacking once the batch being unpacked is done."""
        with self._cond:
            self._open = False
            while self._busy:
                self._cond.wait()

    def close(self) -> None:
        """Stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not (self._open and self._waiting):
                    self._cond.wait()
                if self._closed:
                    return
                batch = self._waiting.popleft()
                self._busy = True
            try:
                batch.unpack()
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()


class _Decoding:
    """OnlineStore.write_prepared over received batches: decode them, then commit them all,
    unpacking the next ones during the commit."""

    def __init__(self, store: OnlineStore, unpacker: _Unpacker) -> None:
        self._store = store
        self._unpacker = unpacker

    def write_prepared(self, batches: Sequence[_Received]) -> list[WriteResult | FeatureStoreError]:
        """Fail at once a batch whose view version has been deleted or re-created since the
        server checked it; write_prepared checks the others again inside the transaction."""
        find_view = self._store.registry.find_view
        views = [find_view(b.view, b.version) for b in batches]
        errors = [
            definition_changed(b.view, b.version, b.created_us, view)
            for b, view in zip(batches, views, strict=True)
        ]
        prepared = [
            PreparedBatch(view, *b.unpack(), b.event_us, b.history, 0, [])
            for b, view, error in zip(batches, views, errors, strict=True)
            if error is None
        ]
        results = iter(self._store.write_prepared(prepared, self._unpacker))
        return [next(results) if error is None else error for error in errors]


def _answer(answers: Connection, lock: threading.Lock, ident: int, future: Future) -> None:
    """Send one batch's outcome to the server: its counts, or the error (made picklable)."""
    error = future.exception()
    if error is None:
        result = future.result()
        outcome: object = (result.written, result.stale)
    else:
        outcome = error
    try:
        message = pickle.dumps((ident, outcome), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:
        message = pickle.dumps((ident, UnavailableError(f"{type(error).__name__}: {error}")))
    try:
        with lock:
            answers.send_bytes(message)
    except OSError:
        pass


if __name__ == "__main__":
    main(sys.argv[1:])
