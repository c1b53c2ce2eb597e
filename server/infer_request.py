"""A ModelInferRequest taken apart before it joins a batch, and its ModelInferResponse put
together: inputs decoded and validated (raw, typed or shared-memory contents), the outputs asked
for (names, shared-memory spans, class counts), the schedule parameters, and the response's raw
contents (classes taken, outputs moved to shared memory).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import grpc
import numpy as np

from protos.inference import grpc_service_pb2 as pb
from server.batcher import oversized_request
from server.classification import CLASSIFICATION, check_classification, classify
from server.errors import InvalidRequestError, SharedMemoryLimitError
from server.model_config import ModelConfig, TensorSpec
from server.model_repository import LoadedModel
from server.shared_memory import BYTE_SIZE, OFFSET, REGION, SharedMemoryRegistry, Slice
from server.tensors import (
    NUMPY_DTYPES,
    check_size,
    decode_contents,
    decode_raw,
    element_count,
    encode_raw,
)


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
