"""The featureserve sink: batches of window rows written over StreamWriteFeatures, with retries.

A batch returns only once the server has made it durable, so whatever Flink acknowledges
upstream is stored. Writes are last-write-wins by event time: a replayed batch comes back as
`stale` and changes nothing, which turns Flink's at-least-once delivery into exactly-once results.
The same idempotence lets a batch go again in smaller messages when the server finds one too
large (RESOURCE_EXHAUSTED naming the message, e.g. over max_rows_per_write).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import grpc
import numpy as np

from clients.channel import ClientConfig, ClientError
from clients.feature_client import FeatureStoreClient
from featurestore.errors import InvalidArgumentError, UnavailableError

RETRYABLE = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
)
MAX_MESSAGES_PER_STREAM = 32
AUTH_CODES = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
AUTH_FIX = "give `featureserve pipeline run` the server's --token (and --tls, --ca, --cert, --key)"
_VIEW_FIX = (
    "if the view changed since the job started, make it match the definitions file again and "
    "rerun `featureserve pipeline run`, whose pre-flight check names each view that does not "
    "match and the fix"
)


def connection(target: str | ClientConfig) -> ClientConfig:
    """target as a ClientConfig: a bare HOST:PORT, or a config that carries TLS and a token."""
    return target if isinstance(target, ClientConfig) else ClientConfig(target=target)


@dataclass
class SinkConfig:
    """Where and how the sink writes; retry_bound_s caps the total time spent retrying a batch.

    target is the server's HOST:PORT, or a ClientConfig that also carries TLS and a token.
    message_rows is where a stream's messages start; a message the server refuses as too large
    is halved, down to one row.
    """

    target: str | ClientConfig
    view: str
    key_column: str
    message_rows: int = 2000
    retry_bound_s: float = 30.0
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 5.0
    call_timeout_s: float = 10.0
    stats_dir: Path | None = None


@dataclass
class SinkCounters:
    """What the sink did: rows handed to it, and the server's verdicts."""

    rows: int = 0
    written: int = 0
    stale: int = 0
    rejected: int = 0
    batches: int = 0
    retries: int = 0
    splits: int = 0
    errors: list[str] = field(default_factory=list)

    def __add__(self, other: SinkCounters) -> SinkCounters:
        return SinkCounters(
            self.rows + other.rows,
            self.written + other.written,
            self.stale + other.stale,
            self.rejected + other.rejected,
            self.batches + other.batches,
            self.retries + other.retries,
            self.splits + other.splits,
            self.errors + other.errors,
        )


class FeatureSink:
    """Writes columnar batches to one view; retries with exponential backoff up to a bound."""

    def __init__(self, config: SinkConfig) -> None:
        if config.message_rows < 1:
            raise InvalidArgumentError(
                f"message_rows must be at least 1, got {config.message_rows}; give the rows per "
                "StreamWriteFeatures message (--message-rows)"
            )
        self.config = config
        self.counters = SinkCounters()
        base = connection(config.target)
        self.address = base.target
        self.message_rows = config.message_rows
        self._client = FeatureStoreClient(
            replace(base, timeout_s=config.call_timeout_s, max_attempts=1)
        )
        self._stats_path = None
        if config.stats_dir is not None:
            Path(config.stats_dir).mkdir(parents=True, exist_ok=True)
            name = f"{config.view}-{os.getpid()}-{id(self):x}.json"
            self._stats_path = Path(config.stats_dir) / name

    def write(
        self, keys: np.ndarray, event_time_us: np.ndarray, features: Mapping[str, np.ndarray]
    ) -> None:
        """Write rows sorted by event time (so a batch holding one entity twice ends newest)."""
        rows = len(keys)
        if rows == 0:
            return
        order = np.argsort(event_time_us, kind="stable")
        keys, times = np.asarray(keys)[order], np.asarray(event_time_us, dtype=np.int64)[order]
        cols = {name: np.asarray(values)[order] for name, values in features.items()}
        start = 0
        while start < rows:
            part = slice(start, start + self.message_rows * MAX_MESSAGES_PER_STREAM)
            self._write_durably(keys[part], times[part], {k: v[part] for k, v in cols.items()})
            start = part.stop
        self.counters.rows += rows
        self.counters.batches += 1
        self._save_stats()

    def _write_durably(self, keys, times, features) -> None:
        deadline = time.monotonic() + self.config.retry_bound_s
        backoff = self.config.initial_backoff_s
        while True:
            try:
                writer = self._client.stream_writer(
                    self.config.view, batch_rows=self.message_rows, ack_every=1 << 30
                )
                writer.write({self.config.key_column: keys}, times, features)
                summary = writer.flush()
                break
            except ClientError as exc:
                too_large = exc.code == grpc.StatusCode.RESOURCE_EXHAUSTED and exc.batch is not None
                if too_large and self.message_rows > 1:
                    self.message_rows = max(1, self.message_rows // 2)
                    self.counters.splits += 1
                    continue
                if too_large:
                    raise InvalidArgumentError(
                        f"featureserve at {self.address} refused even a one-row message for view "
                        f"{self.config.view!r}: {exc}; raise the server limit it names"
                    ) from None
                if exc.code not in RETRYABLE:
                    fix = AUTH_FIX if exc.code in AUTH_CODES else _VIEW_FIX
                    raise InvalidArgumentError(
                        f"featureserve at {self.address} refused a batch for view "
                        f"{self.config.view!r}: {exc}; {fix}"
                    ) from None
                left = deadline - time.monotonic()
                if left <= 0:
                    raise UnavailableError(
                        f"featureserve at {self.address} did not accept a batch for view "
                        f"{self.config.view!r} within {self.config.retry_bound_s:g} s "
                        f"({self.counters.retries} retries; last error {exc}); is the server "
                        "running and reachable?"
                    ) from None
                self.counters.retries += 1
                time.sleep(min(backoff, left))
                backoff = min(backoff * 2, self.config.max_backoff_s)
        self.counters.written += summary.written
        self.counters.stale += summary.stale
        self.counters.rejected += summary.rejected
        self.counters.errors = (self.counters.errors + [str(e).strip() for e in summary.errors])[
            :20
        ]

    def _save_stats(self) -> None:
        if self._stats_path is None:
            return
        tmp = self._stats_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self.counters)))
        os.replace(tmp, self._stats_path)

    def close(self) -> None:
        """Close the channel."""
        self._client.close()


def read_stats(stats_dir: Path | str, view: str | None = None) -> SinkCounters:
    """The counters every sink instance saved under stats_dir, summed (optionally one view)."""
    total = SinkCounters()
    for path in sorted(Path(stats_dir).glob("*.json")):
        if view is None or path.name.rsplit("-", 2)[0] == view:
            total += SinkCounters(**json.loads(path.read_text()))
    return total
