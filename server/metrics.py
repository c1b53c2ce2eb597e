"""Prometheus metrics of featureserve: the metric families, pre-bound per-model and per-view
recorders for hot paths, and the /metrics HTTP endpoint (single process or across workers)."""

from __future__ import annotations

import glob
import logging
import os
import resource
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client import start_http_server as _start_http_server
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector

from featurestore.errors import FeatureStoreError
from server.config import host_port

log = logging.getLogger("featureserve.metrics")
disable_created_metrics()

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
WORKER_ENV = "FEATURESERVE_WORKER_INDEX"
SAMPLE_INTERVAL_S = 1.0

LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
)  # fmt: skip
BATCH_ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
AGE_BUCKETS = (1, 10, 60, 300, 900, 3600, 4 * 3600, 86400, 7 * 86400, 30 * 86400)

RPC_REQUESTS = Counter(
    "featureserve_rpc_requests",
    "RPCs handled, by full method name and gRPC status code.",
    ["method", "code"],
)
RPC_DURATION = Histogram(
    "featureserve_rpc_duration_seconds",
    "Time from the handler's start to its status, by full method name.",
    ["method"],
    buckets=LATENCY_BUCKETS,
)

MODEL_LABELS = ["model", "version"]
MODEL_REQUESTS = Counter(
    "featureserve_model_requests", "Requests executed successfully.", MODEL_LABELS
)
MODEL_ROWS = Counter(
    "featureserve_model_rows", "Rows of the requests executed successfully.", MODEL_LABELS
)
MODEL_BATCHES = Counter("featureserve_model_batches", "Batches executed.", MODEL_LABELS)
MODEL_BATCH_ROWS = Histogram(
    "featureserve_model_batch_rows",
    "Rows per executed batch.",
    MODEL_LABELS,
    buckets=BATCH_ROWS_BUCKETS,
)
MODEL_QUEUE = Histogram(
    "featureserve_model_queue_duration_seconds",
    "Time the oldest request of a batch waited in the model's queue.",
    MODEL_LABELS,
    buckets=LATENCY_BUCKETS,
)
MODEL_COMPUTE = Histogram(
    "featureserve_model_compute_duration_seconds",
    "ONNX Runtime time per batch.",
    MODEL_LABELS,
    buckets=LATENCY_BUCKETS,
)
MODEL_QUEUE_DEPTH = Gauge(
    "featureserve_model_queue_depth",
    "Requests waiting in the model's queue (summed over live workers).",
    MODEL_LABELS,
    multiprocess_mode="livesum",
)
MODEL_FAILURES = Counter(
    "featureserve_model_failures",
    "Requests that failed, by reason: rejected (queue full), timed_out (dropped unrun at their "
    "deadline or queue timeout), cancelled (by their caller while queued), error (failed to run).",
    [*MODEL_LABELS, "reason"],
)
FAILURE_REASONS = ("rejected", "timed_out", "cancelled", "error")
MODEL_RESPONSE_CACHE = Counter(
    "featureserve_model_response_cache",
    "Requests of a model with the response cache on, by result: hit (answered from the cache, "
    "never executed: not in featureserve_model_requests_total) or miss.",
    [*MODEL_LABELS, "result"],
)
AUDIT_FAILURES = Counter(
    "featureserve_audit_failures",
    "Audit records that could not be written (disk full, a file unwritable or not reopenable).",
)

VIEW_ROWS_WRITTEN = Counter("featureserve_view_rows_written", "Rows stored.", ["view"])
VIEW_ROWS_STALE = Counter(
    "featureserve_view_rows_stale", "Rows skipped: older event time than the stored row.", ["view"]
)
VIEW_ROWS_REJECTED = Counter(
    "featureserve_view_rows_rejected", "Rows refused as invalid.", ["view"]
)
VIEW_LOOKUPS = Counter(
    "featureserve_view_lookup_rows",
    "Entity rows looked up, by result: hit, miss (not found), expired (older than the TTL).",
    ["view", "result"],
)
VIEW_VALUE_AGE = Histogram(
    "featureserve_view_value_age_seconds",
    "Age of served values (now minus event time), from sampled lookups.",
    ["view"],
    buckets=AGE_BUCKETS,
)
VIEW_STORE_BYTES = Gauge(
    "featureserve_view_store_bytes",
    "Bytes the view's LMDB database occupies (the environment is shared by workers).",
    ["view"],
    multiprocess_mode="mostrecent",
)
VIEW_HISTORY_BYTES = Gauge(
    "featureserve_view_history_bytes",
    "Bytes the view's history log occupies in LMDB (it grows with every accepted row until "
    "history retention compacts it).",
    ["view"],
    multiprocess_mode="mostrecent",
)
FEATURE_PSI = Gauge(
    "featureserve_feature_psi",
    "Population stability index of sampled live values against the reference profile.",
    ["view", "feature"],
    multiprocess_mode="livemax",
)

PROCESS_CPU = Gauge(
    "featureserve_process_cpu_seconds",
    "User plus system CPU time of each server process.",
    multiprocess_mode="liveall",
)
PROCESS_RSS = Gauge(
    "featureserve_process_resident_memory_bytes",
    "Resident memory of each server process.",
    multiprocess_mode="liveall",
)
PROCESS_RPCS = Gauge(
    "featureserve_process_rpcs",
    "RPCs handled by each server process since it started (shows how workers share load).",
    multiprocess_mode="liveall",
)


class ModelMetrics:
    """Recorders for one model version, bound once so each call is a few attribute lookups."""

    __slots__ = (
        "_batch_rows",
        "_batches",
        "_compute",
        "_depth",
        "_queue",
        "_requests",
        "_rows",
        "cache_hit",
        "cache_miss",
        "cancelled",
        "error",
        "rejected",
        "timed_out",
    )

    def __init__(self, name: str, version: str | int) -> None:
        labels = (name, str(version))
        self._requests = MODEL_REQUESTS.labels(*labels)
        self._rows = MODEL_ROWS.labels(*labels)
        self._batches = MODEL_BATCHES.labels(*labels)
        self._batch_rows = MODEL_BATCH_ROWS.labels(*labels)
        self._queue = MODEL_QUEUE.labels(*labels)
        self._compute = MODEL_COMPUTE.labels(*labels)
        self._depth = MODEL_QUEUE_DEPTH.labels(*labels)
        self.rejected = MODEL_FAILURES.labels(*labels, "rejected")
        self.timed_out = MODEL_FAILURES.labels(*labels, "timed_out")
        self.cancelled = MODEL_FAILURES.labels(*labels, "cancelled")
        self.error = MODEL_FAILURES.labels(*labels, "error")
        self.cache_hit = MODEL_RESPONSE_CACHE.labels(*labels, "hit")
        self.cache_miss = MODEL_RESPONSE_CACHE.labels(*labels, "miss")

    def observe_batch(
        self, requests: int, rows: int, batch_rows: int, queue_s: float, compute_s: float
    ) -> None:
        """One executed batch of `batch_rows` rows, in which `requests` requests holding `rows`
        rows succeeded (failed ones count only in featureserve_model_failures_total)."""
        self._requests.inc(requests)
        self._rows.inc(rows)
        self._batches.inc()
        self._batch_rows.observe(batch_rows)
        self._queue.observe(queue_s)
        self._compute.observe(compute_s)

    def observe_requests(self, requests: int, rows: int) -> None:
        """Requests that succeeded without a batch of this model's own (an ensemble's: its
        steps' batches, queue and compute count on its composing models)."""
        self._requests.inc(requests)
        self._rows.inc(rows)

    def fail(self, reason: str, requests: int = 1) -> None:
        """Requests that failed; reason is one of FAILURE_REASONS."""
        getattr(self, reason).inc(requests)

    def queue_depth(self, n: int) -> None:
        """The current number of queued requests."""
        self._depth.set(n)


class ViewMetrics:
    """Recorders for one feature view; lookups and ages take whole columns, never per-row calls."""

    __slots__ = (
        "_age",
        "_bytes",
        "_expired",
        "_history_bytes",
        "_hit",
        "_miss",
        "_rejected",
        "_stale",
        "_view",
        "_written",
    )

    def __init__(self, view: str) -> None:
        self._view = view
        self._written = VIEW_ROWS_WRITTEN.labels(view)
        self._stale = VIEW_ROWS_STALE.labels(view)
        self._rejected = VIEW_ROWS_REJECTED.labels(view)
        self._hit = VIEW_LOOKUPS.labels(view, "hit")
        self._miss = VIEW_LOOKUPS.labels(view, "miss")
        self._expired = VIEW_LOOKUPS.labels(view, "expired")
        self._age = VIEW_VALUE_AGE.labels(view)
        self._bytes = VIEW_STORE_BYTES.labels(view)
        self._history_bytes = VIEW_HISTORY_BYTES.labels(view)

    def observe_write(self, written: int, stale: int = 0, rejected: int = 0) -> None:
        """Outcome counts of one write batch."""
        if written:
            self._written.inc(written)
        if stale:
            self._stale.inc(stale)
        if rejected:
            self._rejected.inc(rejected)

    def observe_lookup(self, hits: int, misses: int, expired: int) -> None:
        """Outcome counts of one lookup."""
        if hits:
            self._hit.inc(hits)
        if misses:
            self._miss.inc(misses)
        if expired:
            self._expired.inc(expired)

    def observe_ages(self, ages_s: np.ndarray) -> None:
        """Add a sample of value ages in seconds to the age histogram in one vectorised step."""
        add_to_histogram(self._age, ages_s)

    def store_bytes(self, online: int, history: int) -> None:
        """The view's current size on disk: its online rows and its history log."""
        self._bytes.set(online)
        self._history_bytes.set(history)

    def remove(self) -> None:
        """Drop the view's label values from every view family, so a deleted view leaves no
        series behind and one re-created under its name starts from zero."""
        for family in (VIEW_ROWS_WRITTEN, VIEW_ROWS_STALE, VIEW_ROWS_REJECTED, VIEW_VALUE_AGE):
            forget(family, self._view)
        for result in ("hit", "miss", "expired"):
            forget(VIEW_LOOKUPS, self._view, result)
        forget(VIEW_STORE_BYTES, self._view)
        forget(VIEW_HISTORY_BYTES, self._view)


def forget(family: Counter | Gauge | Histogram, *labels: str) -> None:
    """Remove one label set from a family. A no-op across --workers: prometheus_client keeps
    every label set in the workers' shared files, and remove() there only warns on stderr."""
    if multiprocess_dir() is None:
        family.remove(*labels)


def add_to_histogram(child: Histogram, values: np.ndarray) -> None:
    """Add many observations to a bound histogram child: one searchsorted and one inc per bucket
    instead of one observe() per value (same buckets as observe(): upper bounds inclusive)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0:
        return
    bounds = np.asarray(child._upper_bounds)
    counts = np.bincount(np.searchsorted(bounds, values, side="left"), minlength=len(bounds))
    for bucket, count in zip(child._buckets, counts[: len(bounds)].tolist(), strict=True):
        if count:
            bucket.inc(count)
    child._sum.inc(float(np.nansum(values)))


def multiprocess_dir() -> Path | None:
    """The shared metrics directory when running as one of several workers."""
    value = os.environ.get(MULTIPROC_ENV)
    return Path(value) if value else None


ViewFeatures = Callable[[], Mapping[str, frozenset[str]]]
"""Reads the registered views -> the features any version of each has (RegistryReader)."""


class RegisteredViewsOnly:
    """The workers' merged metrics without the series of deleted views, as one process shows
    them: prometheus_client cannot remove a label set from the shared files, so each scrape
    drops the samples labelled with a view no longer registered, and the drift samples of a
    feature no registered version of their view has. Served unfiltered while the registry
    cannot be read."""

    def __init__(self, merged: MultiProcessCollector, registered: ViewFeatures) -> None:
        self._merged = merged
        self._registered = registered
        self._unreadable = False

    def collect(self) -> Iterator[Metric]:
        """The merged families, filtered by the registry as it is now."""
        try:
            views = self._registered()
        except FeatureStoreError as exc:
            if not self._unreadable:  # once per outage, not once per scrape
                log.warning("metrics of deleted views kept", extra={"reason": str(exc)})
            self._unreadable = True
            yield from self._merged.collect()
            return
        self._unreadable = False
        for family in self._merged.collect():
            family.samples = [s for s in family.samples if _of_registered(s.labels, views)]
            yield family


def _of_registered(labels: dict[str, str], views: Mapping[str, frozenset[str]]) -> bool:
    """Whether a sample belongs to a registered view and, for drift, to one of its features
    (samples without a view label always do)."""
    view = labels.get("view")
    if view is None:
        return True
    features = views.get(view)
    feature = labels.get("feature")
    return features is not None and (feature is None or feature in features)


class _EscapedMultiProcessCollector(MultiProcessCollector):
    """MultiProcessCollector for a folder whose path may hold glob characters: prometheus_client
    globs the path itself, so a $TMPDIR with `[`, `*` or `?` in it served an empty /metrics."""

    def collect(self) -> Iterable[Metric]:
        """Every worker file's samples, merged."""
        return self.merge(glob.glob(os.path.join(glob.escape(self._path), "*.db")), accumulate=True)


def scrape_registry(
    directory: Path | None, registered: ViewFeatures | None = None
) -> CollectorRegistry:
    """The registry a scrape reads: this process's own, or every worker's via their files,
    keeping only registered views' series when `registered` is given."""
    if directory is None:
        return REGISTRY
    registry = CollectorRegistry()
    merged = _EscapedMultiProcessCollector(None, path=str(directory))
    registry.register(merged if registered is None else RegisteredViewsOnly(merged, registered))
    return registry


def serve_metrics(
    host: str, port: int, directory: Path | None = None, registered: ViewFeatures | None = None
) -> int:
    """Serve /metrics over HTTP from a daemon thread; returns the bound port. A port that
    cannot be bound is a StartupError naming metrics_port. With `directory`, the workers'
    merged metrics, filtered by `registered` (see RegisteredViewsOnly)."""
    from server.app import StartupError

    registry = scrape_registry(directory, registered)
    try:
        httpd, _ = _start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise StartupError(
            f"cannot serve /metrics on {host_port(host, port)}: {exc.strerror}; pick a free "
            "--metrics-port (metrics_port), or 0 to turn /metrics off"
        ) from None
    bound = httpd.server_port
    log.info(
        "metrics", extra={"address": host_port(host, bound), "multiprocess": directory is not None}
    )
    return bound


def _sample_process(rpc_count: Callable[[], int]) -> None:
    """Publish this process's CPU, RSS and RPC count to its per-pid gauges."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    PROCESS_CPU.set(usage.ru_utime + usage.ru_stime)
    with open("/proc/self/statm", "rb") as statm:
        PROCESS_RSS.set(int(statm.read().split()[1]) * resource.getpagesize())
    PROCESS_RPCS.set(rpc_count())


@dataclass
class MetricsRuntime:
    """What start_metrics started: the HTTP port (0 if none) and the per-process sampler."""

    port: int
    _stop: threading.Event

    def close(self) -> None:
        """Stop the sampler thread (the HTTP thread is a daemon and ends with the process)."""
        self._stop.set()


def start_metrics(
    host: str, metrics_port: int, rpc_count: Callable[[], int] = lambda: 0
) -> MetricsRuntime:
    """Start the per-process sampler and, unless this is a worker (whose parent serves the
    scrape for all of them), the /metrics endpoint when metrics_port > 0.

    `rpc_count` returns the RPCs this process has handled (MetricsInterceptor.count).
    """
    directory = multiprocess_dir()
    port = serve_metrics(host, metrics_port) if directory is None and metrics_port > 0 else 0
    stop = threading.Event()

    def sample() -> None:
        while True:
            _sample_process(rpc_count)
            if stop.wait(SAMPLE_INTERVAL_S):
                return

    threading.Thread(target=sample, name="metrics-sampler", daemon=True).start()
    return MetricsRuntime(port, stop)
