"""inference.GRPCInferenceService (KServe v2 / Open Inference Protocol) over a ModelRepository.

Requests are validated completely before they join a batch; responses carry raw contents.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
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
from server.batcher import BatcherStats, Duration, oversized_request
from server.classification import CLASSIFICATION, check_classification, classify
from server.config import ServerConfig
from server.errors import (
    InvalidRequestError,
    SharedMemoryLimitError,
    is_domain_error,
    maps_errors,
    status_message,
)
from server.log_settings import SETTING_PARAMS, LogControl, LogSettings, SettingValue
from server.message_size import MessageLimit, Unusable, usable
from server.model_config import (
    CONFIG_FILENAME,
    MODEL_FILENAME,
    ModelConfig,
    QueuePolicy,
    TensorSpec,
)
from server.model_repository import LoadedModel, ModelRepository
from server.ordered_stream import answer_in_order, unparsed
from server.response_cache import VersionCache
from server.shared_memory import BYTE_SIZE, OFFSET, REGION, SharedMemoryRegistry, Slice
from server.tensors import (
    NUMPY_DTYPES,
    TRITON_TYPE_NAMES,
    check_size,
    decode_contents,
    decode_raw,
    element_count,
    encode_raw,
)
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
]
PLATFORM = "onnxruntime_onnx"
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


def _check_raw_count(request: pb.ModelInferRequest) -> None:
    """raw_input_contents holds one entry per input not in shared memory, in order."""
    raw, inputs = request.raw_input_contents, request.inputs
    in_memory = sum(REGION in tensor.parameters for tensor in inputs)
    if len(raw) == len(inputs) - in_memory:
        return
    if not in_memory:
        raise InvalidRequestError(
            f"raw_input_contents has {len(raw)} entries for {len(inputs)} inputs; "
            "send one per input, in order"
        )
    raise InvalidRequestError(
        f"raw_input_contents has {len(raw)} entries for the {len(inputs) - in_memory} inputs "
        f"not in shared memory (of {len(inputs)}); send one per input not in shared memory, "
        "in order"
    )


def decode_inputs(
    config: ModelConfig,
    request: pb.ModelInferRequest,
    regions: SharedMemoryRegistry,
    max_message_bytes: int,
) -> tuple[dict[str, np.ndarray], int]:
    """Validated input arrays and the request's row count (1 for a model that does not batch).
    Inputs in shared memory are copied out of their regions here, in one step with the look-up
    of their regions (a BYTES one of at most max_message_bytes, as raw contents could be)."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        _check_raw_count(request)
    batching = bool(config.max_batch_size)
    arrays: dict[str, np.ndarray] = {}
    rows = -1
    in_memory = 0
    for index, tensor in enumerate(request.inputs):
        name = tensor.name
        spec = config.input(name)
        if spec is None:
            known = ", ".join(t.name for t in config.inputs)
            raise InvalidRequestError(
                f"unknown input '{name}'; model '{config.name}' takes {known}"
            )
        if name in arrays:
            raise InvalidRequestError(f"input '{name}' appears twice")
        if tensor.datatype != spec.datatype:
            raise InvalidRequestError(
                f"input '{name}': datatype {tensor.datatype or '(empty)'}, expected {spec.datatype}"
            )
        where = None
        if tensor.parameters:
            _refuse_output_parameters(f"input '{name}'", tensor.parameters)
            where = _shared_memory_slice(regions, f"input '{name}'", tensor.parameters)
        shape = tuple(tensor.shape)
        if (
            len(shape) != len(spec.shape)
            or any(s != -1 and d != s for d, s in zip(shape, spec.shape, strict=True))
            or any(d < 0 for d in shape)
        ):
            raise InvalidRequestError(
                f"input '{name}': shape {list(shape)} does not match {list(spec.shape)} "
                "(-1 = any size)"
            )
        check_size(name, spec.datatype, shape)
        if batching:
            if shape[0] > config.max_batch_size:
                raise oversized_request(config.name, [name], shape[0], config.max_batch_size)
            if rows == -1:
                rows = shape[0]
            elif shape[0] != rows:
                raise InvalidRequestError(
                    f"input '{name}': batch dimension {shape[0]}, but earlier inputs have {rows}"
                )
        if where is not None:
            if tensor.contents.ListFields() or len(raw) == len(request.inputs):
                sent = "typed contents" if tensor.contents.ListFields() else "a raw entry"
                raise InvalidRequestError(
                    f"input '{name}': both parameter '{REGION}' and {sent} are set; send "
                    "the data in one place (raw_input_contents holds entries only for the inputs "
                    "not in shared memory)"
                )
            arrays[name] = _read_input(
                regions, name, spec.datatype, shape, where, max_message_bytes
            )
            in_memory += 1
        elif raw:
            if tensor.contents.ListFields():
                raise InvalidRequestError(
                    f"input '{name}': both raw_input_contents and typed contents are set; send one"
                )
            arrays[name] = decode_raw(name, spec.datatype, shape, raw[index - in_memory])
        else:
            arrays[name] = decode_contents(name, spec.datatype, shape, tensor.contents)
    for spec in config.inputs:
        if spec.name not in arrays and not spec.optional:
            raise InvalidRequestError(f"input '{spec.name}' ({spec.datatype}) is missing")
    if not batching:
        return arrays, 1
    if not arrays:
        raise InvalidRequestError(
            f"no input sent; model '{config.name}' takes {', '.join(t.name for t in config.inputs)}"
        )
    if rows == 0:
        raise InvalidRequestError(
            f"input '{next(iter(arrays))}': batch dimension 0; model '{config.name}' takes 1 to "
            f"max_batch_size={config.max_batch_size} rows per request"
        )
    return arrays, rows


def _read_input(
    regions: SharedMemoryRegistry,
    name: str,
    datatype: str,
    shape: tuple[int, ...],
    where: Slice,
    max_message_bytes: int,
) -> np.ndarray:
    """An input's array from a copy of its shared-memory bytes, validated as raw contents are;
    the byte size is checked before anything is read (a BYTES one against max_message_bytes,
    since its size follows from its elements only)."""
    source = f"shared-memory contents ('{BYTE_SIZE}' {where.byte_size} of region "
    source += f"'{where.region.spec.name}')"
    if datatype == "BYTES":
        if where.byte_size > max_message_bytes:
            raise SharedMemoryLimitError(
                f"input '{name}': parameter '{BYTE_SIZE}' is {where.byte_size} bytes, over the "
                f"server's limit for a BYTES input of max_message_bytes={max_message_bytes} "
                "(what raw contents may carry); send fewer rows per request, or raise "
                "max_message_bytes in the server config"
            )
    else:
        count, itemsize = element_count(shape), NUMPY_DTYPES[datatype].itemsize
        if where.byte_size != count * itemsize:
            raise InvalidRequestError(
                f"input '{name}': parameter '{BYTE_SIZE}' is {where.byte_size}, but shape "
                f"{list(shape)} of {datatype} takes {count * itemsize} bytes ({count} x "
                f"{itemsize}); set '{BYTE_SIZE}' to {count * itemsize}"
            )
    return decode_raw(name, datatype, shape, regions.read(f"input '{name}'", where), source)


def _setting_value(key: str, value: pb.LogSettingsRequest.SettingValue) -> SettingValue:
    """A LogSettings request's value, of the type its field carries (InvalidRequestError: none)."""
    kind = value.WhichOneof("parameter_choice")
    if kind is None:
        raise InvalidRequestError(
            f"settings: '{key}' has no value; set one of {', '.join(SETTING_PARAMS.values())}"
        )
    return getattr(value, kind)


@dataclass(frozen=True, slots=True)
class Wanted:
    """The outputs a request asks for (validated; all of the model's when it names none), where
    in shared memory those asked there go, and the class count of those asked as classes."""

    names: list[str]
    shared: dict[str, Slice] | None = None
    classes: dict[str, int] | None = None


def requested_outputs(
    model: LoadedModel, request: pb.ModelInferRequest, regions: SharedMemoryRegistry, rows: int
) -> Wanted:
    """The outputs a request of `rows` rows asks for, checked before it joins a batch: one in
    shared memory whose size the config fixes must fit its span."""
    if not request.outputs:
        return Wanted(model.output_names)
    names = []
    shared: dict[str, Slice] = {}
    classes: dict[str, int] = {}
    for output in request.outputs:
        spec = model.config.output(output.name)
        if spec is None:
            raise InvalidRequestError(
                f"unknown output '{output.name}'; model '{model.name}' has "
                f"{', '.join(model.output_names)}"
            )
        if output.name in names:
            raise InvalidRequestError(
                f"output '{output.name}' is requested twice; request each output once (one "
                "answer per output: as scores, or as classes with 'classification')"
            )
        if output.parameters:
            tensor = f"output '{output.name}'"
            if CLASSIFICATION in output.parameters:
                classes[output.name] = check_classification(
                    output.name, output.parameters[CLASSIFICATION], spec
                )
            where = _shared_memory_slice(regions, tensor, output.parameters)
            if where is not None:
                if output.name not in classes:
                    _check_fixed_fit(model.config, spec, rows, where)
                shared[output.name] = where
        names.append(output.name)
    return Wanted(names, shared or None, classes or None)


def _check_fixed_fit(config: ModelConfig, spec: TensorSpec, rows: int, where: Slice) -> None:
    """Refuse an output whose size the config fixes (a non-BYTES output without variable
    dimensions but the batch) when it would not fit its shared-memory span."""
    if spec.datatype == "BYTES":
        return
    shape = [rows, *spec.shape[1:]] if config.max_batch_size else list(spec.shape)
    if any(dim < 0 for dim in shape):
        return
    needed = element_count(shape) * NUMPY_DTYPES[spec.datatype].itemsize
    if needed > where.byte_size:
        raise _too_small(spec.name, where, shape, spec.datatype, needed)


def _too_small(
    name: str, where: Slice, shape: list[int], datatype: str, needed: int
) -> InvalidRequestError:
    """The error of an output of `needed` bytes asked into a smaller shared-memory span."""
    return InvalidRequestError(
        f"output '{name}': parameter '{BYTE_SIZE}' is {where.byte_size}, but the output (shape "
        f"{shape} of {datatype}) takes {needed} bytes; set '{BYTE_SIZE}' to at least {needed}, "
        f"inside region '{where.region.spec.name}'"
    )


def _shared_memory_slice(
    regions: SharedMemoryRegistry, tensor: str, parameters: Mapping
) -> Slice | None:
    """Where a tensor's shared-memory parameters put it (None without them): "shared_memory_
    region" (string_param) and "shared_memory_byte_size", with an optional
    "shared_memory_offset" (int64_param, as Triton sends them, or uint64_param)."""
    if REGION not in parameters:
        for key in (OFFSET, BYTE_SIZE):
            if key in parameters:
                raise InvalidRequestError(
                    f"{tensor}: parameter '{key}' needs parameter '{REGION}' beside it; name "
                    f"the registered region the tensor is in, or remove '{key}'"
                )
        return None
    region = parameters[REGION]
    if region.WhichOneof("parameter_choice") != "string_param":
        raise InvalidRequestError(
            f"{tensor}: parameter '{REGION}' must be a string_param (the region's name)"
        )
    byte_size = _int_parameter(parameters, BYTE_SIZE, f"{tensor}: ")
    if byte_size is None:
        raise InvalidRequestError(
            f"{tensor}: parameter '{REGION}' needs parameter '{BYTE_SIZE}' beside it (an "
            "int64_param: the tensor's size in bytes)"
        )
    offset = _int_parameter(parameters, OFFSET, f"{tensor}: ") or 0
    return regions.slice(tensor, region.string_param, offset, byte_size)


def to_shared_memory(
    response: pb.ModelInferResponse, targets: dict[str, Slice], regions: SharedMemoryRegistry
) -> None:
    """Move the outputs requested in shared memory from raw_output_contents into their regions,
    as Triton does: each keeps an empty raw_output_contents entry (so the entries stay aligned
    with outputs) and carries the parameters it was written with, its byte size being the bytes
    written. Every output is checked to fit before any is written."""
    moves = []
    for index, output in enumerate(response.outputs):
        where = targets.get(output.name)
        if where is None:
            continue
        data = response.raw_output_contents[index]
        if len(data) > where.byte_size:
            raise _too_small(output.name, where, list(output.shape), output.datatype, len(data))
        moves.append((index, where, data))
    regions.write([(f"output '{response.outputs[i].name}'", w, d) for i, w, d in moves])
    for index, where, data in moves:
        response.raw_output_contents[index] = b""
        parameters = response.outputs[index].parameters
        parameters[REGION].string_param = where.region.spec.name
        parameters[BYTE_SIZE].int64_param = len(data)
        if where.offset:
            parameters[OFFSET].int64_param = where.offset


def _refuse_output_parameters(tensor: str, parameters: Mapping) -> None:
    """Refuse an input's parameter that only a requested output can take (it would otherwise
    be ignored, and the answer would not be what the client asked for)."""
    if CLASSIFICATION in parameters:
        raise InvalidRequestError(
            f"{tensor}: parameter '{CLASSIFICATION}' applies to requested outputs only; move it "
            "to the output whose classes you want"
        )


def _int_parameter(parameters: Mapping, key: str, where: str = "") -> int | None:
    """An integer parameter (int64_param or uint64_param) of a request or tensor (`where`
    prefixes the messages), if present."""
    if key not in parameters:
        return None
    param = parameters[key]
    kind = param.WhichOneof("parameter_choice")
    if kind not in ("int64_param", "uint64_param"):
        raise InvalidRequestError(f"{where}parameter '{key}' must be int64_param or uint64_param")
    value = getattr(param, kind)
    if value < 0:
        raise InvalidRequestError(f"{where}parameter '{key}' must be >= 0, got {value}")
    return value


def schedule_of(
    request: pb.ModelInferRequest, context: grpc.aio.ServicerContext | None
) -> tuple[int | None, int | None, float | None]:
    """(priority, timeout µs, time.monotonic() deadline): the "priority" and "timeout" parameters,
    which the model's queue policy applies, and the caller's gRPC deadline, which always drops."""
    priority = _int_parameter(request.parameters, "priority")
    timeout_us = _int_parameter(request.parameters, "timeout")
    remaining = context.time_remaining() if context is not None else None
    deadline = None if remaining is None else time.monotonic() + remaining
    return priority, timeout_us, deadline


def build_response(
    model: LoadedModel,
    request_id: str,
    outputs: dict[str, np.ndarray],
    classes: dict[str, int] | None = None,
) -> pb.ModelInferResponse:
    """A ModelInferResponse with raw_output_contents in the order of outputs; those in classes
    answered as their top classes (BYTES, Triton's classification extension)."""
    response = pb.ModelInferResponse(
        model_name=model.name, model_version=model.version, id=request_id
    )
    config = model.config
    for name, array in outputs.items():
        spec = config.output(name)
        datatype = spec.datatype
        if classes is not None and name in classes:
            batched = bool(config.max_batch_size)
            array = classify(array, classes[name], spec.labels, batched=batched)
            datatype = "BYTES"
        response.outputs.add(name=name, datatype=datatype, shape=array.shape)
        response.raw_output_contents.append(encode_raw(datatype, array))
    return response


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
    samples as applied, their defaults filled in)."""
    skip = 1 if config.max_batch_size else 0
    message = mc.ModelConfig(
        name=config.name,
        platform=PLATFORM,
        backend="onnxruntime",
        max_batch_size=config.max_batch_size or 0,
        default_model_filename=MODEL_FILENAME,
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
    message.instance_group.add(
        name=f"{config.name}_0",
        count=config.instance_group.count,
        kind=mc.ModelInstanceGroup.KIND_CPU,
    )
    policy = config.version_policy
    if policy.all:
        message.version_policy.all.SetInParent()
    elif policy.specific:
        message.version_policy.specific.versions.extend(policy.specific)
    else:
        message.version_policy.latest.num_versions = policy.latest or 1
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


def check_unload_parameters(request: pb.RepositoryModelUnloadRequest) -> None:
    """Accept Triton's "unload_dependents" (a bool_param, which changes nothing: no model here
    depends on another, as there are no ensembles); any other parameter is INVALID_ARGUMENT."""
    accepted = {UNLOAD_DEPENDENTS: "bool_param"}
    key = _first_unaccepted("RepositoryModelUnload", request.parameters, accepted)
    if key is not None:
        raise InvalidRequestError(
            f"RepositoryModelUnload: parameter '{key}' is not supported; it takes only "
            f"'{UNLOAD_DEPENDENTS}' (a bool_param), so remove '{key}' and unload again"
        )


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
    ) -> None:
        self.repository = repository
        self.regions = regions or SharedMemoryRegistry()
        self.logs = logs or LogControl(LogSettings())
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
            name=model.name, versions=self.repository.versions(model.name), platform=PLATFORM
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
        has one: only after auth and validation); domain errors propagate."""
        self.auth.require(f"infer:{request.model_name}")
        model = self.repository.get(request.model_name, request.model_version)
        inputs, rows = decode_inputs(model.config, request, self.regions, self.limit.limit)
        wanted = requested_outputs(model, request, self.regions, rows)
        priority, timeout_us, deadline = schedule_of(request, context)
        started = time.perf_counter_ns() if wanted.shared else 0
        cache = model.cache
        if cache is not None:
            # Inputs from shared memory are keyed by the bytes copied out of their regions, and
            # a hit writes its outputs into this request's regions: cached like any other; the
            # cache holds the outputs themselves, so classes are taken from them on every hit.
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
        )
        if cache is not None:
            _store(model, cache, lookup, result)
        response = build_response(model, request.id, result, wanted.classes)
        return self._placed(model, response, wanted, started)

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
        in-flight requests finish first. "unload_dependents" is accepted and changes nothing (no
        model depends on another here)."""
        self.auth.require("admin")

        async def unload(_: dict) -> None:
            check_unload_parameters(request)
            group = self.repository.group
            if group is None:
                await self.repository.unload(request.model_name)
            else:
                await group.unload(request.model_name, context.time_remaining)

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
