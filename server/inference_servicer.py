"""inference.GRPCInferenceService (KServe v2 / Open Inference Protocol) over a ModelRepository.

Requests are validated completely before they join a batch; responses carry raw contents.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import NamedTuple

import grpc
import numpy as np

from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from protos.inference import model_config_pb2 as mc
from server.audit import AuditLog
from server.auth import AuthConfig, Authorizer
from server.batcher import BatcherStats, Duration
from server.config import ServerConfig
from server.errors import (
    InvalidRequestError,
    is_domain_error,
    maps_errors,
    status_message,
)
from server.infer_request import (
    Wanted,
    build_response,
    decode_inputs,
    requested_outputs,
    schedule_of,
    to_shared_memory,
)
from server.log_settings import SETTING_PARAMS, LogControl, LogSettings, SettingValue
from server.message_size import MessageLimit, Unusable, usable
from server.model_config import (
    CONFIG_FILENAME,
    MODEL_FILENAME,
    ModelConfig,
    QueuePolicy,
)
from server.model_repository import LoadedModel, ModelRepository
from server.ordered_stream import answer_in_order, unparsed
from server.response_cache import VersionCache
from server.shared_memory import SharedMemoryRegistry
from server.tensors import (
    TRITON_TYPE_NAMES,
)
from server.tracing import DEFAULT_FILE, TraceConfig, TraceControl
from server.worker_stats import WorkerStatistics, merge_statistics

log = logging.getLogger("featureserve.inference")

SERVER_NAME = "featureserve"
EXTENSIONS = [
    "model_repository",
    "model_configuration",
    "statistics",
    "schedule_policy",
    "system_shared_memory",
    "classification",
    "logging",
    "trace",
]
STREAM_METHOD = "/inference.GRPCInferenceService/ModelStreamInfer"
UNLOAD_DEPENDENTS = "unload_dependents"
STREAM_WINDOW = 256
"""Requests of one ModelStreamInfer in flight before the server stops reading it: enough to
fill several batches of a typical max_batch_size, and a bound on what a slow reader holds."""


def _server_version() -> str:
    """The installed featureserve version."""
    try:
        return metadata.version("featureserve")
    except metadata.PackageNotFoundError:
        return "0.0.0"


def _setting_value(key: str, value: pb.LogSettingsRequest.SettingValue) -> SettingValue:
    """A LogSettings request's value, of the type its field carries (InvalidRequestError: none)."""
    kind = value.WhichOneof("parameter_choice")
    if kind is None:
        raise InvalidRequestError(
            f"settings: '{key}' has no value; set one of {', '.join(SETTING_PARAMS.values())}"
        )
    return getattr(value, kind)


INFER_DURATIONS = (
    "success",
    "fail",
    "queue",
    "compute_input",
    "compute_infer",
    "compute_output",
    "cache_hit",
    "cache_miss",
)
"""BatcherStats' durations, each copied to the InferStatistics field of its name."""


def _duration(target: pb.StatisticDuration, source: Duration) -> None:
    """Copy a Duration into its proto."""
    target.count = source.count
    target.ns = source.ns


def statistics_proto(name: str, version: str, stats: BatcherStats) -> pb.ModelStatistics:
    """A version's BatcherStats as Triton's ModelStatistics."""
    message = pb.ModelStatistics(
        name=name,
        version=version,
        last_inference=stats.last_inference_ms,
        inference_count=stats.inference_count,
        execution_count=stats.execution_count,
    )
    infer = message.inference_stats
    for field in INFER_DURATIONS:
        _duration(getattr(infer, field), getattr(stats, field))
    for size in sorted(stats.batch_sizes):
        entry = stats.batch_sizes[size]
        batch = message.batch_stats.add(batch_size=size)
        _duration(batch.compute_input, entry.compute_input)
        _duration(batch.compute_infer, entry.compute_infer)
        _duration(batch.compute_output, entry.compute_output)
    return message


class _Lookup(NamedTuple):
    """A response-cache lookup: the request's key, the ns it took, and the answer on a hit."""

    key: bytes
    ns: int
    response: pb.ModelInferResponse | None


def _look_up(
    model: LoadedModel,
    cache: VersionCache,
    request_id: str,
    inputs: dict[str, np.ndarray],
    wanted: Wanted,
) -> _Lookup:
    """Look a validated request up in the response cache; a hit is answered with the request's
    own id and counted as Triton counts one (see BatcherStats.count_cache_hit)."""
    start = time.perf_counter_ns()
    key = cache.key(inputs, wanted.names)
    cached = cache.get(key)
    lookup_ns = time.perf_counter_ns() - start
    if cached is None:
        return _Lookup(key, lookup_ns, None)
    response = build_response(model, request_id, cached, wanted.classes)
    model.batcher.stats.count_cache_hit(lookup_ns, time.perf_counter_ns() - start)
    model.batcher.metrics.cache_hit.inc()
    return _Lookup(key, lookup_ns, response)


def _store(
    model: LoadedModel, cache: VersionCache, lookup: _Lookup, result: dict[str, np.ndarray]
) -> None:
    """Store a missed request's result; its lookup and this insert count as one cache_miss."""
    start = time.perf_counter_ns()
    cache.put(lookup.key, result)
    model.batcher.stats.cache_miss.add(lookup.ns + time.perf_counter_ns() - start)
    model.batcher.metrics.cache_miss.inc()


def local_statistics(repository: ModelRepository) -> pb.ModelStatisticsResponse:
    """Every version this process serves, with its own figures (what a --workers sibling reads)."""
    return pb.ModelStatisticsResponse(
        model_stats=[
            statistics_proto(m.name, m.version, m.batcher.stats) for m in repository.loaded()
        ]
    )


def _queue_policy(target: mc.ModelQueuePolicy, policy: QueuePolicy) -> None:
    """Copy a QueuePolicy into Triton's ModelQueuePolicy."""
    target.timeout_action = mc.ModelQueuePolicy.TimeoutAction.Value(policy.timeout_action.upper())
    target.default_timeout_microseconds = policy.default_timeout_us
    target.allow_timeout_override = policy.allow_timeout_override
    target.max_queue_size = policy.max_queue_size


def config_proto(config: ModelConfig) -> mc.ModelConfig:
    """A ModelConfig as Triton's proto (dims exclude the batch dimension when batching; warmup
    samples as applied, their defaults filled in; an ensemble with its ensemble_scheduling
    steps and no backend, instances or batching of its own, as Triton reports one)."""
    skip = 1 if config.max_batch_size else 0
    message = mc.ModelConfig(
        name=config.name, platform=config.platform, max_batch_size=config.max_batch_size or 0
    )
    message.response_cache.enable = config.response_cache
    for spec in config.inputs:
        message.input.add(
            name=spec.name,
            data_type=mc.DataType.Value(TRITON_TYPE_NAMES[spec.datatype]),
            dims=spec.shape[skip:],
            optional=spec.optional,
        )
    for spec in config.outputs:
        message.output.add(
            name=spec.name,
            data_type=mc.DataType.Value(TRITON_TYPE_NAMES[spec.datatype]),
            dims=spec.shape[skip:],
            label_filename=spec.label_filename,
        )
    _version_policy(message.version_policy, config)
    if config.ensemble:
        for step in config.ensemble:
            message.ensemble_scheduling.step.add(
                model_name=step.model_name,
                model_version=step.model_version,
                input_map=step.input_map,
                output_map=step.output_map,
            )
        return message
    message.backend = "onnxruntime"
    message.default_model_filename = MODEL_FILENAME
    message.instance_group.add(
        name=f"{config.name}_0",
        count=config.instance_group.count,
        kind=mc.ModelInstanceGroup.KIND_CPU,
    )
    if config.batching:
        batching = config.dynamic_batching
        dynamic = message.dynamic_batching
        dynamic.preferred_batch_size.extend(batching.preferred_batch_sizes)
        dynamic.max_queue_delay_microseconds = batching.max_queue_delay_us
        # preserve_ordering stays false: batches run concurrently on instance_group.count
        # sessions, higher priorities overtake, and a request can expire in the queue, so
        # responses may finish out of arrival order (ModelStreamInfer still answers each stream
        # in its own request order).
        if batching.priority_levels:
            dynamic.priority_levels = batching.priority_levels
            dynamic.default_priority_level = batching.default_priority_level
        _queue_policy(dynamic.default_queue_policy, batching.default_queue_policy)
        for level, policy in batching.priority_queue_policy:
            _queue_policy(dynamic.priority_queue_policy[level], policy)
    for sample in config.model_warmup:
        warmup = message.model_warmup.add(
            name=sample.name, batch_size=sample.batch_size, count=sample.count
        )
        for name, spec in sample.inputs.items():
            entry = warmup.inputs[name]
            entry.data_type = mc.DataType.Value(TRITON_TYPE_NAMES[spec.datatype])
            entry.dims.extend(spec.dims)
            setattr(entry, spec.data, spec.file or True)
    return message


def _version_policy(target: mc.ModelVersionPolicy, config: ModelConfig) -> None:
    """Copy a config's VersionPolicy into Triton's ModelVersionPolicy."""
    policy = config.version_policy
    if policy.all:
        target.all.SetInParent()
    elif policy.specific:
        target.specific.versions.extend(policy.specific)
    else:
        target.latest.num_versions = policy.latest or 1


def _first_unaccepted(method: str, parameters: Mapping, accepted: dict[str, str]) -> str | None:
    """The first repository parameter (by name) that `accepted` (name -> the value kind it takes)
    does not list, or None; an accepted one sent as another kind is INVALID_ARGUMENT."""
    for key in sorted(parameters):
        kind = accepted.get(key)
        if kind is None:
            return key
        sent = parameters[key].WhichOneof("parameter_choice")
        if sent != kind:
            raise InvalidRequestError(
                f"{method}: parameter '{key}' must be a {kind}, got {sent or 'no value'}; "
                f"send it as {kind}"
            )
    return None


def reject_load_parameters(request: pb.RepositoryModelLoadRequest, repository: Path) -> None:
    """Reject any RepositoryModelLoad parameter (INVALID_ARGUMENT): Triton's "config" override and
    "file:" contents are not applied here, and loading without them would answer OK while the
    model keeps its own files."""
    key = _first_unaccepted("RepositoryModelLoad", request.parameters, {})
    if key is None:
        return
    folder = repository / request.model_name
    if key == "config":
        fix = f"edit {folder / CONFIG_FILENAME} in the model repository instead"
    elif key.startswith("file:"):
        name = key.removeprefix("file:")
        fix = f"write the file to {folder}/{name} in the model repository instead"
    else:
        fix = f"change the model's files in {folder} (its config in {CONFIG_FILENAME}) instead"
    raise InvalidRequestError(
        f"RepositoryModelLoad: parameter '{key}' is not supported (this server takes models only "
        f"from its repository, and RepositoryModelLoad takes no parameters); {fix}, then load "
        "the model again without parameters"
    )


def unload_dependents(request: pb.RepositoryModelUnloadRequest) -> bool:
    """Triton's "unload_dependents" (a bool_param; absent = false): whether unloading an
    ensemble unloads its composing models too. Any other parameter is INVALID_ARGUMENT."""
    accepted = {UNLOAD_DEPENDENTS: "bool_param"}
    key = _first_unaccepted("RepositoryModelUnload", request.parameters, accepted)
    if key is not None:
        raise InvalidRequestError(
            f"RepositoryModelUnload: parameter '{key}' is not supported; it takes only "
            f"'{UNLOAD_DEPENDENTS}' (a bool_param), so remove '{key}' and unload again"
        )
    parameter = request.parameters.get(UNLOAD_DEPENDENTS)
    return bool(parameter and parameter.bool_param)


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The KServe v2 gRPC endpoints; inference goes through each model version's batcher."""

    def __init__(
        self,
        repository: ModelRepository,
        authorizer: Authorizer | None = None,
        audit: AuditLog | None = None,
        limit: MessageLimit | None = None,
        workers: WorkerStatistics | None = None,
        regions: SharedMemoryRegistry | None = None,
        logs: LogControl | None = None,
        tracing: TraceControl | None = None,
    ) -> None:
        self.repository = repository
        self.regions = regions or SharedMemoryRegistry()
        self.logs = logs or LogControl(LogSettings())
        self.tracing = tracing or TraceControl(TraceConfig(), Path(DEFAULT_FILE))
        self.auth = authorizer or Authorizer(AuthConfig())
        self.audit = audit or AuditLog(None)
        self.limit = limit or MessageLimit.of(ServerConfig())
        self.workers = workers
        self._version = _server_version()

    async def ServerLive(self, request, context) -> pb.ServerLiveResponse:
        """Live whenever the process answers."""
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context) -> pb.ServerReadyResponse:
        """Ready once the repository has started."""
        return pb.ServerReadyResponse(ready=self.repository.ready)

    @maps_errors
    async def ModelReady(self, request, context) -> pb.ModelReadyResponse:
        """Whether the model (version) can take requests now."""
        self.auth.require(f"infer:{request.name}")
        return pb.ModelReadyResponse(ready=self.repository.is_ready(request.name, request.version))

    async def ServerMetadata(self, request, context) -> pb.ServerMetadataResponse:
        """Name, version and the protocol extensions implemented here."""
        return pb.ServerMetadataResponse(
            name=SERVER_NAME, version=self._version, extensions=EXTENSIONS
        )

    @maps_errors
    async def ModelMetadata(self, request, context) -> pb.ModelMetadataResponse:
        """A model version's tensors (full shapes, -1 = variable) and served versions."""
        self.auth.require(f"infer:{request.name}")
        model = self.repository.get(request.name, request.version)
        response = pb.ModelMetadataResponse(
            name=model.name,
            versions=self.repository.versions(model.name),
            platform=model.config.platform,
        )
        for spec in model.config.inputs:
            response.inputs.add(name=spec.name, datatype=spec.datatype, shape=spec.shape)
        for spec in model.config.outputs:
            response.outputs.add(name=spec.name, datatype=spec.datatype, shape=spec.shape)
        return response

    @maps_errors
    async def ModelConfig(self, request, context) -> pb.ModelConfigResponse:
        """A model version's configuration in Triton's form."""
        self.auth.require(f"infer:{request.name}")
        model = self.repository.get(request.name, request.version)
        return pb.ModelConfigResponse(config=config_proto(model.config))

    async def _infer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext | None
    ) -> pb.ModelInferResponse:
        """Validate, batch, and answer one request (from the response cache when the version
        has one: only after auth and validation); domain errors propagate. A request the trace
        settings sample is traced once auth admitted it and its model serves, answered or not
        (a cache hit: with no queue or compute timestamps, as in Triton)."""
        started_ns = time.perf_counter_ns() if self.tracing.active else 0
        trace = None
        try:
            self.auth.require(f"infer:{request.model_name}")
            model = self.repository.get(request.model_name, request.model_version)
            if started_ns:
                trace = self.tracing.begin(
                    model.name, request.model_version, request.id, started_ns
                )
            inputs, rows = decode_inputs(model.config, request, self.regions, self.limit.limit)
            wanted = requested_outputs(model, request, self.regions, rows)
            priority, timeout_us, deadline = schedule_of(request, context)
            started = time.perf_counter_ns() if wanted.shared else 0
            cache = model.cache
            if cache is not None:
                # Inputs from shared memory are keyed by the bytes copied out of their regions,
                # and a hit writes its outputs into this request's regions: cached like any
                # other; the cache holds the outputs themselves, so classes are taken from them
                # on every hit.
                lookup = _look_up(model, cache, request.id, inputs, wanted)
                if lookup.response is not None:
                    return self._placed(model, lookup.response, wanted, started, hit=True)
            result = await model.batcher.submit(
                inputs,
                rows,
                priority=priority,
                deadline=deadline,
                timeout_us=timeout_us,
                outputs=wanted.names,
                trace=trace,
            )
            if cache is not None:
                _store(model, cache, lookup, result)
            response = build_response(model, request.id, result, wanted.classes)
            return self._placed(model, response, wanted, started)
        except BaseException as exc:
            if trace is not None:
                trace.failed(exc)
            raise
        finally:
            if trace is not None:
                self.tracing.end(trace)

    def _placed(
        self,
        model: LoadedModel,
        response: pb.ModelInferResponse,
        wanted: Wanted,
        started: int,
        hit: bool = False,
    ) -> pb.ModelInferResponse:
        """response, its outputs asked in shared memory moved there; when they cannot be, the
        request (counted a success, or a cache hit) counts as failed since `started`."""
        if wanted.shared:
            try:
                to_shared_memory(response, wanted.shared, self.regions)
            except Exception:
                model.batcher.stats.count_undelivered(time.perf_counter_ns() - started, hit)
                model.batcher.metrics.fail("error")
                raise
        return response

    @maps_errors
    async def ModelInfer(self, request, context) -> pb.ModelInferResponse:
        """One inference, dynamically batched with others."""
        return await self._infer(request, context)

    async def _stream_one(
        self, request: pb.ModelInferRequest | Unusable, position: int
    ) -> pb.ModelStreamInferResponse:
        """The response to the stream's request number `position` (from 0); an error (a
        request that did not parse or a message over max_message_bytes too) becomes
        error_message, not a stream failure."""
        try:
            request = usable(request)
            response = pb.ModelStreamInferResponse(infer_response=await self._infer(request, None))
            return self.limit.response(STREAM_METHOD, response)
        except Exception as exc:
            if not is_domain_error(exc):
                log.exception("ModelStreamInfer request %r failed", getattr(request, "id", ""))
            message = f"{type(exc).__name__}: {status_message(exc)}"
            if isinstance(request, pb.ModelInferRequest):
                known = request
            else:
                known = pb.ModelInferRequest()
                message += unparsed(position)
            return pb.ModelStreamInferResponse(
                error_message=message,
                infer_response=pb.ModelInferResponse(
                    model_name=known.model_name,
                    model_version=known.model_version,
                    id=known.id,
                ),
            )

    async def ModelStreamInfer(self, request_iterator, context) -> AsyncIterator:
        """Bidirectional stream: requests run concurrently (and batch); responses keep order."""
        async for response in answer_in_order(request_iterator, self._stream_one, STREAM_WINDOW):
            yield response

    @maps_errors
    async def ModelStatistics(self, request, context) -> pb.ModelStatisticsResponse:
        """Cumulative statistics per served version (when name is empty: of every model the
        caller may infer with, so a token scoped to some models learns nothing of the others).
        Under --workers, the totals of every worker of the group at the time of the call."""
        name, version = request.name, request.version
        if name:
            self.auth.require(f"infer:{name}")
            if version:
                version = self.repository.get(name, version).version
            elif not self.repository.versions(name):
                self.repository.get(name)

        def wanted(model: str, model_version: str) -> bool:
            return (
                (not name or model == name)
                and (not version or model_version == version)
                and self.auth.allows(f"infer:{model}")
            )

        local = [
            statistics_proto(m.name, m.version, m.batcher.stats)
            for m in self.repository.loaded()
            if wanted(m.name, m.version)
        ]
        if self.workers is None:
            return pb.ModelStatisticsResponse(model_stats=local)
        parts = [local]
        for answer in await self.workers.siblings(context.time_remaining()):
            parts.append([s for s in answer.model_stats if wanted(s.name, s.version)])
        return pb.ModelStatisticsResponse(model_stats=merge_statistics(parts))

    @maps_errors
    async def SystemSharedMemoryStatus(
        self, request, context
    ) -> pb.SystemSharedMemoryStatusResponse:
        """The registered system shared-memory regions, or the one named (NOT_FOUND if none)."""
        response = pb.SystemSharedMemoryStatusResponse()
        for spec in self.regions.status(request.name):
            entry = response.regions[spec.name]
            entry.name, entry.key = spec.name, spec.key
            entry.offset, entry.byte_size = spec.offset, spec.byte_size
        return response

    @maps_errors
    async def SystemSharedMemoryRegister(
        self, request, context
    ) -> pb.SystemSharedMemoryRegisterResponse:
        """Register a span of a POSIX shared-memory object under a name (for every worker)."""
        self.auth.require("admin")

        async def register(_: dict) -> None:
            self.regions.register(request.name, request.key, request.offset, request.byte_size)

        await self.audit.change("shm_register", request.name, context, register, key=request.key)
        return pb.SystemSharedMemoryRegisterResponse()

    @maps_errors
    async def SystemSharedMemoryUnregister(
        self, request, context
    ) -> pb.SystemSharedMemoryUnregisterResponse:
        """Unregister a region (every region when the name is empty; an unknown name is OK, as
        in Triton) in every worker before answering."""
        self.auth.require("admin")

        async def unregister(_: dict) -> None:
            self.regions.unregister(request.name)

        await self.audit.change("shm_unregister", request.name or "*", context, unregister)
        return pb.SystemSharedMemoryUnregisterResponse()

    @maps_errors
    async def LogSettings(self, request, context) -> pb.LogSettingsResponse:
        """The log settings after making the changes the request names (Triton's logging
        extension; none: only read them)."""
        self.auth.require("admin")
        changes = {key: _setting_value(key, v) for key, v in request.settings.items()}
        if changes:

            async def change(_: dict) -> None:
                self.logs.update(changes)

            await self.audit.change("log_settings", ",".join(sorted(changes)), context, change)
        response = pb.LogSettingsResponse()
        for key, value in self.logs.current().as_dict().items():
            param = SETTING_PARAMS[type(value)]
            setattr(response.settings[key], param, value)
        return response

    @maps_errors
    async def TraceSetting(self, request, context) -> pb.TraceSettingResponse:
        """The trace settings, global or of request.model_name, after making the changes the
        request names (Triton's trace extension; none: only read them). A model need not be
        loaded (its settings stay across unload and load): one the repository does not know
        and that has no settings of its own is NOT_FOUND."""
        self.auth.require("admin")
        model = request.model_name
        if model and not (
            self.repository.versions(model)
            or self.tracing.has_own(model)
            or any(status.name == model for status in self.repository.index())
        ):
            self.repository.get(model)
        changes = {key: list(v.value) for key, v in request.settings.items()}
        if changes:

            async def change(_: dict) -> None:
                self.tracing.update(changes, model)

            target = f"{model or '*'}:{','.join(sorted(changes))}"
            await self.audit.change("trace_settings", target, context, change)
        response = pb.TraceSettingResponse()
        for key, values in self.tracing.current(model).items():
            response.settings[key].value.extend(values)
        return response

    async def RepositoryIndex(self, request, context) -> pb.RepositoryIndexResponse:
        """Every model version the repository knows that the caller may infer with, with state
        and reason (which can name server paths, so other models' entries are left out)."""
        response = pb.RepositoryIndexResponse()
        for status in self.repository.index():
            if request.ready and status.state != "READY":
                continue
            if not self.auth.allows(f"infer:{status.name}"):
                continue
            response.models.add(
                name=status.name, version=status.version, state=status.state, reason=status.reason
            )
        return response

    @maps_errors
    async def RepositoryModelLoad(self, request, context) -> pb.RepositoryModelLoadResponse:
        """Load or reload a model from the repository folder (in a --workers group sharing one
        model state, on every worker)."""
        self.auth.require("admin")

        async def load(_: dict) -> None:
            reject_load_parameters(request, self.repository.path)
            group = self.repository.group
            if group is None:
                await self.repository.load(request.model_name)
            else:
                await group.load(request.model_name, context.time_remaining)

        await self.audit.change("model_load", request.model_name, context, load)
        return pb.RepositoryModelLoadResponse()

    @maps_errors
    async def RepositoryModelUnload(self, request, context) -> pb.RepositoryModelUnloadResponse:
        """Unload a model (in a --workers group sharing one model state, on every worker); its
        in-flight requests finish first. With "unload_dependents" true, an ensemble's composing
        models are unloaded too."""
        self.auth.require("admin")

        async def unload(_: dict) -> None:
            dependents = unload_dependents(request)
            group = self.repository.group
            if group is None:
                await self.repository.unload(request.model_name, dependents)
            else:
                await group.unload(request.model_name, context.time_remaining, dependents)

        await self.audit.change("model_unload", request.model_name, context, unload)
        return pb.RepositoryModelUnloadResponse()


async def start_server(
    repository: ModelRepository, address: str = "127.0.0.1:0", limit: MessageLimit | None = None
) -> tuple[grpc.aio.Server, int]:
    """A grpc.aio server with only the inference service (tests, benchmarks); returns it and its
    port. The caller starts and stops the repository."""
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)])
    servicer = InferenceServicer(repository, limit=limit)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port(address)
    await server.start()
    return server, port
