"""The featureserve server: builds the grpc.aio server, its services and their lifecycles."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import grpc
import lmdb
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from featurestore.commit_process import CommitProcess
from featurestore.online_store import OnlineStore, StoreConfig
from protos.featureserve.v1 import (
    feature_store_pb2,
    feature_store_pb2_grpc,
    prediction_pb2,
    prediction_pb2_grpc,
)
from protos.inference import grpc_service_pb2, grpc_service_pb2_grpc
from server.audit import AuditConfig, AuditLog, parse_audit
from server.auth import Authorizer, parse_auth
from server.config import POLL, ConfigError, ServerConfig, host_port
from server.event_loop import running_loop_name
from server.feature_servicer import FeatureStoreServicer
from server.handler_wrapping import InterceptingRegistrar
from server.health import Health
from server.inference_servicer import STREAM_METHOD as MODEL_STREAM
from server.inference_servicer import InferenceServicer, local_statistics
from server.log_settings import LogControl, LogSettings
from server.message_size import MessageLimit, MessageSizeInterceptor
from server.metrics import MetricsRuntime, multiprocess_dir, start_metrics
from server.metrics_interceptor import MetricsInterceptor
from server.model_control import GroupControl
from server.model_repository import ModelRepository
from server.overload import OverloadInterceptor
from server.prediction_servicer import STREAM_METHOD as PREDICT_STREAM
from server.prediction_servicer import PredictionServicer
from server.retention import HistoryRetention
from server.shared_memory import SharedMemoryRegistry
from server.tls import TlsConfig, parse_tls, server_credentials
from server.tracing import TraceConfig, TraceControl, parse_trace
from server.worker_stats import WorkerStatistics
from server.workers import worker_index

log = logging.getLogger("featureserve.server")

FEATURE_STORE = feature_store_pb2.DESCRIPTOR.services_by_name["FeatureStore"].full_name
PREDICTION = prediction_pb2.DESCRIPTOR.services_by_name["Prediction"].full_name
INFERENCE = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
SERVICES = [FEATURE_STORE, PREDICTION, INFERENCE]
SERVED = [*SERVICES, "grpc.health.v1.Health", reflection.SERVICE_NAME]
"""Every service the server registers, health checking and reflection included."""


class StartupError(Exception):
    """The server cannot start (port in use, unwritable data dir); the message says which."""


def grpc_receive_limit(config: ServerConfig) -> int:
    """The size gRPC itself lets a request reach: twice max_message_bytes plus 16 MiB (gRPC's
    ceiling at most), so MessageSizeInterceptor, not gRPC, rejects most oversized requests and
    names max_message_bytes; only beyond this does gRPC answer with its own text."""
    return min(2 * config.max_message_bytes + (16 << 20), 2**31 - 1)


def grpc_options(config: ServerConfig) -> list[tuple[str, int]]:
    """Channel arguments every featureserve server uses (the benchmark baseline uses them too)."""
    return [
        ("grpc.max_receive_message_length", grpc_receive_limit(config)),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.so_reuseport", 0 if worker_index() is None else 1),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


def ensure_writable_dir(path: Path, what: str) -> Path:
    """Create `path` if needed and check it is a writable directory."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StartupError(f"{what} {path} cannot be created: {exc.strerror}") from None
    if not path.is_dir() or not os.access(path, os.W_OK | os.X_OK):
        raise StartupError(f"{what} {path} is not a writable directory")
    return path


def check_port_free(host: str, port: int) -> None:
    """Fail with one clear line when the port is taken, before gRPC logs its own noise."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise StartupError(
                f"cannot listen on {host_port(host, port)}: {exc.strerror}"
            ) from None


def store_config(config: ServerConfig) -> StoreConfig:
    """The online store's settings from the server's config."""
    return StoreConfig(
        path=config.data_dir,
        map_size=config.lmdb_map_bytes,
        max_dbs=config.lmdb_max_dbs,
        max_clock_skew_seconds=config.max_clock_skew_seconds,
        max_entities_per_read=config.max_entities_per_request,
        max_rows_per_write=config.max_rows_per_write,
    )


def open_store(config: StoreConfig) -> OnlineStore:
    """The online store, or StartupError naming the key to fix when LMDB cannot open it or
    lmdb_max_dbs cannot hold the view versions it has."""
    try:
        store = OnlineStore(config)
    except lmdb.MemoryError as exc:
        raise StartupError(
            f"lmdb_map_bytes = {config.map_size} cannot be mapped ({exc}); set lmdb_map_bytes "
            "lower (the default is 1 GiB)"
        ) from None
    except lmdb.Error as exc:
        raise StartupError(
            f"LMDB cannot open the store ({exc}); point --data-dir (data_dir) at a featureserve "
            "store or an empty directory"
        ) from None
    needed = store.databases_needed()
    if needed > config.max_dbs:
        store.close()
        raise StartupError(
            f"lmdb_max_dbs = {config.max_dbs} is too small for the store in {config.path}: its "
            f"{(needed - 1) // 2} view versions need {needed} LMDB databases; set lmdb_max_dbs "
            f"to at least {needed}"
        )
    return store


@dataclass(frozen=True)
class Sections:
    """The [auth], [tls], [audit] and [trace] tables parsed, with the TLS credentials read and
    checked."""

    authorizer: Authorizer
    tls: TlsConfig | None
    credentials: grpc.ServerCredentials | None
    audit: AuditConfig
    trace: TraceConfig


def parse_sections(config: ServerConfig) -> Sections:
    """The config's sections, or StartupError naming the key: a bad section stops start-up."""
    try:
        tls = parse_tls(config.extra.get("tls"), base=config.config_dir)
        return Sections(
            Authorizer(parse_auth(config.extra.get("auth"), services=SERVED)),
            tls,
            server_credentials(tls) if tls is not None else None,
            parse_audit(config.extra.get("audit")),
            parse_trace(config.extra.get("trace")),
        )
    except ConfigError as exc:
        raise StartupError(str(exc)) from None


def open_audit(config: AuditConfig, data_dir: Path) -> AuditLog:
    """The audit log, or StartupError naming [audit] path when its file cannot be opened."""
    try:
        return AuditLog.from_config(config, data_dir)
    except OSError as exc:
        raise StartupError(
            f"[audit] path {exc.filename}: {exc.strerror}; set [audit] path to a writable file"
        ) from None


def trace_file_error(path: Path, exc: OSError) -> StartupError:
    """The start-up error of a trace file that cannot be opened."""
    return StartupError(
        f"[trace] trace_file {path}: {exc.strerror}; set [trace] trace_file (--trace-file) to "
        "a writable file"
    )


def preflight(config: ServerConfig) -> None:
    """What start() refuses up to opening the store, checked once by the parent of a worker
    group, so a bad config is reported in one line rather than once per worker."""
    sections = parse_sections(config)
    data_dir = ensure_writable_dir(config.data_dir, "data dir")
    ensure_writable_dir(config.model_repo, "model repository")
    open_audit(sections.audit, data_dir).close()
    trace_path = sections.trace.path(data_dir)
    try:
        sections.trace.check_file(trace_path)
    except OSError as exc:
        raise trace_file_error(trace_path, exc) from None
    open_store(store_config(config)).close()


class FeatureServer:
    """One featureserve server process: start(), then wait_closed(); stop() drains it."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.port: int = 0
        self.health = Health(SERVICES)
        self._server: grpc.aio.Server | None = None
        self.store: OnlineStore | None = None
        self.committer: CommitProcess | None = None
        self.metrics_interceptor = MetricsInterceptor()
        self.message_limit = MessageLimit.of(config)
        self.metrics: MetricsRuntime | None = None
        self.audit = AuditLog(None)
        sections = parse_sections(config)
        self.authorizer = sections.authorizer
        self.tls = sections.tls
        self._credentials = sections.credentials
        self.audit_config = sections.audit
        self.models: ModelRepository | None = None
        self.worker_stats: WorkerStatistics | None = None
        self.retention: HistoryRetention | None = None
        self.features: FeatureStoreServicer | None = None
        # A --workers group shares its shared-memory registrations, log and trace settings
        # through its folder (see shared_memory, log_settings and tracing).
        group_folder = multiprocess_dir() if worker_index() is not None else None
        self.regions = SharedMemoryRegistry(group_folder)
        self.logs = LogControl(
            LogSettings.of_level(config.log_level, config.log_format), group_folder
        )
        self.tracing = TraceControl(
            sections.trace, sections.trace.path(config.data_dir), group_folder, worker_index()
        )

    async def start(self) -> int:
        """Open the stores and bind the port (ServerLive answers from then on), warm the store and
        load the models, then report serving (ServerReady, health); returns the bound port. A
        --workers worker binds only once loaded (it shares the port with serving workers)."""
        ensure_writable_dir(self.config.data_dir, "data dir")
        model_repo = ensure_writable_dir(self.config.model_repo, "model repository")
        if worker_index() is None:
            check_port_free(self.config.host, self.config.port)
        self.audit = open_audit(self.audit_config, self.config.data_dir)
        try:
            self.tracing.start()
        except OSError as exc:
            raise trace_file_error(self.tracing.path, exc) from None
        settings = store_config(self.config)
        self.store = open_store(settings)
        self.committer = CommitProcess(settings)
        self.models = ModelRepository(
            model_repo,
            watch=self.config.watch_model_repo,
            poll_interval_s=self.config.model_poll_interval_s,
            control=worker_index() is None or self.config.model_control_mode != POLL,
            response_cache_bytes=self.config.response_cache_bytes,
            mode=self.config.model_control_mode,
            startup_models=self.config.startup_models,
        )
        self.models.group = GroupControl.of_this_worker(self.models)
        self.logs.start()
        self.worker_stats = WorkerStatistics.of_this_worker(lambda: local_statistics(self.models))
        # A --workers worker joins the shared port only once loaded: SO_REUSEPORT would hand a
        # loading worker new connections that the serving ones could answer.
        steps = (
            [self._load, self._listen] if worker_index() is not None else [self._listen, self._load]
        )
        try:
            for step in steps:
                await step()
        except BaseException:
            server, self._server = self._server, None
            if server is not None:
                await server.stop(0)
            await self._release()
            raise
        await self.health.set_all(True)
        log.info("serving", extra=self._where())
        if self.config.history_retention_seconds > 0 and worker_index() in (None, 0):
            self.retention = HistoryRetention(
                self.config.data_dir,
                self.config.history_retention_seconds,
                self.config.history_compaction_interval_seconds,
                self.features.refresh_sizes if self.features else None,
            )
            self.retention.start()
        return self.port

    async def _load(self) -> None:
        """Warm the store (when configured) and load every model in the repository."""
        if self.config.warm_store_seconds > 0:
            await asyncio.to_thread(self._warm_store)
        await (self.models.group or self.models).start()

    async def _listen(self) -> None:
        """Build the gRPC server with its interceptors and services, bind and start it, not yet
        ready: ServerLive answers while models load, ServerReady and health say not serving."""
        interceptors = [self.metrics_interceptor]
        if self.config.max_concurrent_rpcs > 0:
            interceptors.append(OverloadInterceptor(self.config.max_concurrent_rpcs))
        auth = self.authorizer.interceptor(self.audit)
        if auth is not None:
            interceptors.append(auth)
        in_place = frozenset({PREDICT_STREAM, MODEL_STREAM})
        interceptors.append(MessageSizeInterceptor(self.message_limit, in_place))
        self.metrics = start_metrics(
            self.config.host, self.config.metrics_port, lambda: self.metrics_interceptor.count
        )
        server = grpc.aio.server(options=grpc_options(self.config))
        self._register(InterceptingRegistrar(server, interceptors))
        try:
            if self._credentials is not None:
                self.port = server.add_secure_port(self.config.address, self._credentials)
            else:
                self.port = server.add_insecure_port(self.config.address)
        except RuntimeError:
            self.port = 0
        if self.port == 0:
            raise StartupError(f"cannot listen on {self.config.address}: address in use or invalid")
        await self.health.set_all(False)
        if self.worker_stats is not None:
            # Before the public port serves, so no figure of this worker is ever missing.
            try:
                await self.worker_stats.start()
            except OSError as exc:
                raise StartupError(
                    f"cannot serve worker statistics on {self.worker_stats.path}: "
                    f"{exc.strerror}; set TMPDIR to a writable local directory"
                ) from None
        await server.start()
        self._server = server
        log.info("listening", extra=self._where())

    def _where(self) -> dict:
        """Where and how this process serves, for its log lines."""
        return {
            "address": host_port(self.config.host, self.port),
            "pid": os.getpid(),
            "worker": worker_index(),
            "tls": self.tls is not None,
            "event_loop": running_loop_name(),
            "auth": self.authorizer.enabled,
            "metrics_port": self.metrics.port,
        }

    def _warm_store(self) -> None:
        """Read the store's file into the page cache before serving, for at most
        warm_store_seconds: until then a lookup may wait for the disk on the event loop."""
        try:
            warmed = self.store.warm_page_cache(self.config.warm_store_seconds)
        except OSError as exc:
            log.warning("could not read the store into the page cache", extra={"error": str(exc)})
            return
        log.info(
            "store read into the page cache",
            extra={
                "mb": round(warmed.bytes_read / 2**20, 1),
                "of_mb": round(warmed.file_bytes / 2**20, 1),
                "seconds": round(warmed.seconds, 2),
                "complete": warmed.complete,
            },
        )

    def _register(self, server: InterceptingRegistrar) -> None:
        """Add every service, health and reflection to the server, through the interceptors."""
        self.features = FeatureStoreServicer(
            self.store,
            self.committer,
            self.config.max_entities_per_request,
            self.authorizer,
            self.audit,
        )
        feature_store_pb2_grpc.add_FeatureStoreServicer_to_server(self.features, server)
        prediction_pb2_grpc.add_PredictionServicer_to_server(
            PredictionServicer(
                self.store,
                self.models,
                self.config.max_entities_per_request,
                self.authorizer,
                limit=self.message_limit,
            ),
            server,
        )
        grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(
                self.models,
                self.authorizer,
                self.audit,
                self.message_limit,
                self.worker_stats,
                self.regions,
                self.logs,
                self.tracing,
            ),
            server,
        )
        self.health.register(server)
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
            reflection.aio.ReflectionServicer(SERVED),
            server,
        )

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting calls, let in-flight ones finish within the grace period, close stores."""
        if self._server is None:
            return
        if self.models is not None:
            self.models.begin_stop()  # a load in flight would hold the drain until it ends
        await self.health.shutdown()
        grace = self.config.grace_seconds if grace is None else grace
        log.info("stopping", extra={"grace_seconds": grace})
        await self._server.stop(grace)
        await self._release()
        log.info("stopped")

    async def _release(self) -> None:
        """Stop serving statistics to sibling workers (the drain is over: the figures are
        final), let audited changes under way end, then unload models, flush pending writes,
        close the store, the metrics endpoint and audit."""
        if self.retention is not None:
            await self.retention.stop()
        if self.worker_stats is not None:
            await self.worker_stats.close()
        await self.audit.changes_done()
        if self.models is not None:
            if self.models.group is not None:
                await self.models.group.stop()
            await self.models.stop()
        self.regions.close()
        await self.logs.stop()
        await self.tracing.stop()
        if self.committer is not None:
            self.committer.close()
        if self.store is not None:
            self.store.close()
        if self.metrics is not None:
            self.metrics.close()
        self.audit.close()

    async def wait_closed(self) -> None:
        """Wait until the server has stopped."""
        if self._server is not None:
            await self._server.wait_for_termination()
