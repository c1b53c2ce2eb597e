"""KServe v2 conformance of InferenceServicer over a real grpc.aio server on the loopback."""

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from onnx import TensorProto, helper

from benchmarks.model_zoo import (
    IR_VERSION,
    OPSET,
    add_sub_model,
    gather_model,
    graph_model,
    identity_model,
    medium_model,
    mlp_model,
    write_model,
)
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from protos.inference import model_config_pb2 as mc
from server.inference_servicer import start_server
from server.message_size import MessageLimit
from server.model_repository import ModelRepository
from server.tensors import NUMPY_DTYPES, bf16_to_float32, encode_bytes_elements
from tests.conftest import float32_to_bf16

Body = Callable[[pb_grpc.GRPCInferenceServiceStub, ModelRepository], Awaitable[None]]
# The KServe v2 spec's datatype -> InferTensorContents field, written out independently of
# server/tensors.py so that a wrong entry there fails these tests instead of agreeing with itself.
TYPED = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def serve(tmp_path: Path, body: Body, limit: MessageLimit | None = None, **repository: Any) -> None:
    """Run body against a fresh server over the models already written under tmp_path (under
    `limit`; the other keyword arguments go to its ModelRepository)."""

    async def main() -> None:
        repo = ModelRepository(tmp_path, watch=False, **repository)
        await repo.start()
        server, port = await start_server(repo, limit=limit)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                await body(pb_grpc.GRPCInferenceServiceStub(channel), repo)
        finally:
            await server.stop(None)
            await repo.stop()

    asyncio.run(main())


def infer_request(model: str, arrays: dict[str, np.ndarray], **kwargs) -> pb.ModelInferRequest:
    """A raw-contents FP32-or-other request."""
    request = pb.ModelInferRequest(model_name=model, **kwargs)
    for name, array in arrays.items():
        datatype = next(k for k, v in NUMPY_DTYPES.items() if v == array.dtype and k != "BYTES")
        request.inputs.add(name=name, datatype=datatype, shape=array.shape)
        request.raw_input_contents.append(array.tobytes())
    return request


def output(response: pb.ModelInferResponse, name: str) -> np.ndarray:
    index = [o.name for o in response.outputs].index(name)
    meta = response.outputs[index]
    dtype = NUMPY_DTYPES[meta.datatype]
    return np.frombuffer(response.raw_output_contents[index], dtype).reshape(meta.shape)


def onnx_model(nodes: list, inputs: list, outputs: list) -> onnx.ModelProto:
    """A checked onnx.helper model at the opset and IR version this ONNX Runtime reads."""
    graph = helper.make_graph(nodes, "g", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def batch_sizes(stats: pb.ModelStatistics) -> dict[int, int]:
    """Executions per batch size (rows), from ModelStatistics batch_stats."""
    return {b.batch_size: b.compute_infer.count for b in stats.batch_stats}


def sample(datatype: str, rows: int = 2) -> np.ndarray:
    if datatype == "BOOL":
        return np.array([[True, False, True]] * rows)
    if datatype == "BYTES":
        return np.array([["a", "bé", ""]] * rows, dtype=object)
    dtype = NUMPY_DTYPES[datatype]
    return (np.arange(rows * 3).reshape(rows, 3) + 1).astype(dtype)


def test_server_and_model_metadata_rpcs(tmp_path: Path) -> None:
    write_model(
        tmp_path,
        "simple",
        add_sub_model(16),
        config_toml="[dynamic_batching]\nmax_queue_delay_us = 100\n",
    )

    async def body(stub, repo) -> None:
        assert (await stub.ServerLive(pb.ServerLiveRequest())).live
        assert (await stub.ServerReady(pb.ServerReadyRequest())).ready
        meta = await stub.ServerMetadata(pb.ServerMetadataRequest())
        assert meta.name == "featureserve" and "statistics" in meta.extensions
        assert (await stub.ModelReady(pb.ModelReadyRequest(name="simple"))).ready
        assert not (await stub.ModelReady(pb.ModelReadyRequest(name="simple", version="7"))).ready
        model = await stub.ModelMetadata(pb.ModelMetadataRequest(name="simple"))
        assert list(model.versions) == ["1"] and model.platform == "onnxruntime_onnx"
        assert [(t.name, t.datatype, list(t.shape)) for t in model.inputs] == [
            ("INPUT0", "FP32", [-1, 16]),
            ("INPUT1", "FP32", [-1, 16]),
        ]
        config = (await stub.ModelConfig(pb.ModelConfigRequest(name="simple"))).config
        assert config.max_batch_size == 64
        assert config.input[0].data_type == mc.TYPE_FP32 and list(config.input[0].dims) == [16]
        assert config.dynamic_batching.max_queue_delay_microseconds == 100
        assert config.instance_group[0].count == 1
        index = await stub.RepositoryIndex(pb.RepositoryIndexRequest())
        assert [(m.name, m.version, m.state) for m in index.models] == [("simple", "1", "READY")]
        for rpc, request in [
            (stub.ModelMetadata, pb.ModelMetadataRequest(name="nope")),
            (stub.ModelConfig, pb.ModelConfigRequest(name="simple", version="2")),
        ]:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await rpc(request)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND

    serve(tmp_path, body)


def test_model_config_reports_the_batching_policy_it_applies(tmp_path: Path) -> None:
    write_model(
        tmp_path,
        "ranked",
        mlp_model(),
        config_toml=(
            "max_batch_size = 16\n"
            "[dynamic_batching]\n"
            "max_queue_delay_us = 500\n"
            "preferred_batch_sizes = [4, 8]\n"
            "max_queue_size = 7\n"
            "default_timeout_us = 5000\n"
            "priority_levels = 3\n"
            "default_priority_level = 2\n"
            "[instance_group]\n"
            "count = 2\n"
        ),
    )
    write_model(tmp_path, "plain", mlp_model())
    write_model(
        tmp_path, "unbatched", mlp_model(), config_toml="[dynamic_batching]\nenabled = false\n"
    )

    async def body(stub, repo) -> None:
        async def config(name: str) -> mc.ModelConfig:
            return (await stub.ModelConfig(pb.ModelConfigRequest(name=name))).config

        ranked = await config("ranked")
        assert ranked.max_batch_size == 16 and ranked.instance_group[0].count == 2
        dynamic = ranked.dynamic_batching
        assert list(dynamic.preferred_batch_size) == [4, 8]
        assert dynamic.max_queue_delay_microseconds == 500
        assert (dynamic.priority_levels, dynamic.default_priority_level) == (3, 2)
        # Two instances run batches concurrently, so responses are not kept in request order.
        assert not dynamic.preserve_ordering
        queue = dynamic.default_queue_policy
        assert queue.max_queue_size == 7 and queue.default_timeout_microseconds == 5000
        assert queue.timeout_action == mc.ModelQueuePolicy.REJECT and queue.allow_timeout_override
        plain = await config("plain")
        assert plain.HasField("dynamic_batching")
        assert (
            plain.dynamic_batching.priority_levels,
            plain.dynamic_batching.default_priority_level,
        ) == (0, 0)
        assert not plain.dynamic_batching.preserve_ordering
        unbatched = await config("unbatched")
        assert unbatched.max_batch_size == 64 and not unbatched.HasField("dynamic_batching")

    serve(tmp_path, body)


def test_every_datatype_raw_and_typed(tmp_path: Path) -> None:
    for datatype in NUMPY_DTYPES:
        write_model(tmp_path, f"id_{datatype}", identity_model([datatype]))

    async def body(stub, repo) -> None:
        for datatype in NUMPY_DTYPES:
            array = sample(datatype)
            raw = pb.ModelInferRequest(model_name=f"id_{datatype}")
            raw.inputs.add(name=f"INPUT_{datatype}", datatype=datatype, shape=array.shape)
            if datatype == "BYTES":
                data = encode_bytes_elements([s.encode() for s in array.reshape(-1)])
            else:
                data = array.tobytes()
            raw.raw_input_contents.append(data)
            raw.outputs.add(name=f"OUTPUT_{datatype}")
            requests = [raw]
            if datatype in TYPED:
                typed = pb.ModelInferRequest(model_name=f"id_{datatype}")
                tensor = typed.inputs.add(
                    name=f"INPUT_{datatype}", datatype=datatype, shape=array.shape
                )
                values = array.reshape(-1).tolist()
                if datatype == "BYTES":
                    values = [v.encode() for v in values]
                getattr(tensor.contents, TYPED[datatype]).extend(values)
                typed.outputs.add(name=f"OUTPUT_{datatype}")
                requests.append(typed)
            for request in requests:
                response = await stub.ModelInfer(request)
                assert [o.name for o in response.outputs] == [f"OUTPUT_{datatype}"]
                assert response.outputs[0].datatype == datatype
                assert list(response.outputs[0].shape) == [2, 3]
                assert response.raw_output_contents[0] == data

    serve(tmp_path, body)


def test_validation_errors_name_the_tensor(tmp_path: Path) -> None:
    write_model(tmp_path, "simple", add_sub_model(4), config_toml="max_batch_size = 8\n")
    write_model(tmp_path, "identity", identity_model(["FP16", "INT32"]))
    a = np.ones((2, 4), np.float32)

    def with_typed_too() -> pb.ModelInferRequest:
        request = infer_request("simple", {"INPUT0": a, "INPUT1": a})
        request.inputs[0].contents.fp32_contents.extend([1.0] * 8)
        return request

    def short_raw() -> pb.ModelInferRequest:
        request = infer_request("simple", {"INPUT0": a, "INPUT1": a})
        request.raw_input_contents[1] = request.raw_input_contents[1][:-4]
        return request

    fp16_typed = pb.ModelInferRequest(model_name="identity")
    fp16_typed.inputs.add(name="INPUT_FP16", datatype="FP16", shape=[1, 3])
    cases = [
        (infer_request("nope", {"INPUT0": a}), grpc.StatusCode.NOT_FOUND, "nope"),
        (
            infer_request("simple", {"INPUT0": a, "INPUT1": a}, model_version="3"),
            grpc.StatusCode.NOT_FOUND,
            "version",
        ),
        (
            infer_request("simple", {"INPUT0": a, "INPUTX": a}),
            grpc.StatusCode.INVALID_ARGUMENT,
            "unknown input 'INPUTX'",
        ),
        (
            infer_request("simple", {"INPUT0": a, "INPUT1": a.astype(np.float64)}),
            grpc.StatusCode.INVALID_ARGUMENT,
            "'INPUT1': datatype FP64, expected FP32",
        ),
        (
            infer_request("simple", {"INPUT0": a, "INPUT1": np.ones((2, 5), np.float32)}),
            grpc.StatusCode.INVALID_ARGUMENT,
            "'INPUT1': shape [2, 5]",
        ),
        (
            infer_request("simple", {"INPUT0": a}),
            grpc.StatusCode.INVALID_ARGUMENT,
            "'INPUT1' (FP32) is missing",
        ),
        (short_raw(), grpc.StatusCode.INVALID_ARGUMENT, "'INPUT1': raw contents hold 28 bytes"),
        (with_typed_too(), grpc.StatusCode.INVALID_ARGUMENT, "both raw_input_contents"),
        (
            infer_request(
                "simple",
                {"INPUT0": np.ones((9, 4), np.float32), "INPUT1": np.ones((9, 4), np.float32)},
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "input 'INPUT0': batch dimension 9 exceeds max_batch_size=8 of model 'simple'; "
            "split the request",
        ),
        (
            infer_request("simple", {"INPUT0": a, "INPUT1": np.ones((9, 4), np.float32)}),
            grpc.StatusCode.INVALID_ARGUMENT,
            "input 'INPUT1': batch dimension 9 exceeds max_batch_size=8",
        ),
        (
            infer_request(
                "simple",
                {"INPUT0": np.ones((0, 4), np.float32), "INPUT1": np.ones((0, 4), np.float32)},
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "input 'INPUT0': batch dimension 0",
        ),
        (
            infer_request("simple", {"INPUT0": a, "INPUT1": np.ones((3, 4), np.float32)}),
            grpc.StatusCode.INVALID_ARGUMENT,
            "batch dimension 3",
        ),
        (fp16_typed, grpc.StatusCode.INVALID_ARGUMENT, "raw_input_contents"),
    ]
    unknown_output = infer_request("simple", {"INPUT0": a, "INPUT1": a})
    unknown_output.outputs.add(name="OUTPUT9")
    cases.append((unknown_output, grpc.StatusCode.INVALID_ARGUMENT, "unknown output 'OUTPUT9'"))
    top_k = infer_request("simple", {"INPUT0": a, "INPUT1": a})
    top_k.outputs.add(name="OUTPUT0").parameters["classification"].int64_param = 0
    cases.append((top_k, grpc.StatusCode.INVALID_ARGUMENT, "parameter 'classification' is 0"))
    twice = infer_request("simple", {"INPUT0": a, "INPUT1": a})
    twice.outputs.add(name="OUTPUT0")
    twice.outputs.add(name="OUTPUT0").parameters["classification"].int64_param = 2
    cases.append((twice, grpc.StatusCode.INVALID_ARGUMENT, "output 'OUTPUT0' is requested twice"))
    top_k_in = infer_request("simple", {"INPUT0": a, "INPUT1": a})
    top_k_in.inputs[0].parameters["classification"].int64_param = 3
    cases.append((top_k_in, grpc.StatusCode.INVALID_ARGUMENT, "applies to requested outputs"))
    shm_out = infer_request("simple", {"INPUT0": a, "INPUT1": a})
    shm_out.outputs.add(name="OUTPUT0").parameters["shared_memory_region"].string_param = "r0"
    cases.append((shm_out, grpc.StatusCode.INVALID_ARGUMENT, "needs parameter 'shared_memory_byte"))
    shm_in = pb.ModelInferRequest(model_name="simple")
    for name in ("INPUT0", "INPUT1"):
        tensor = shm_in.inputs.add(name=name, datatype="FP32", shape=[2, 4])
        tensor.parameters["shared_memory_region"].string_param = "r0"
        tensor.parameters["shared_memory_byte_size"].int64_param = 32
    cases.append((shm_in, grpc.StatusCode.INVALID_ARGUMENT, "input 'INPUT0': parameter"))

    async def body(stub, repo) -> None:
        for request, code, needle in cases:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.ModelInfer(request)
            assert info.value.code() == code, info.value.details()
            assert needle in info.value.details()
        assert repo.get("simple").batcher.stats.execution_count == 0

    serve(tmp_path, body)


def test_an_empty_tensor_of_impossible_shape_is_invalid_argument(tmp_path: Path) -> None:
    """[0, 2**62] holds no element, but NumPy cannot shape an array so: refused by name,
    raw and typed, where it was INTERNAL; [0, 2**40] is a real empty tensor."""
    x = helper.make_tensor_value_info("INPUT_FP32", TensorProto.FLOAT, ["A", "B"])
    y = helper.make_tensor_value_info("OUTPUT_FP32", TensorProto.FLOAT, ["A", "B"])
    model = graph_model([helper.make_node("Identity", ["INPUT_FP32"], ["OUTPUT_FP32"])], [x], [y])
    write_model(tmp_path, "ident", model, config_toml="max_batch_size = 0\n")

    def request(shape: list[int], raw: bool) -> pb.ModelInferRequest:
        message = pb.ModelInferRequest(model_name="ident")
        message.inputs.add(name="INPUT_FP32", datatype="FP32", shape=shape)
        if raw:
            message.raw_input_contents.append(b"")
        return message

    async def body(stub, repo) -> None:
        for raw in (True, False):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.ModelInfer(request([0, 2**62], raw))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
            assert "input 'INPUT_FP32': shape [0, 4611686018427387904] is larger" in (
                info.value.details()
            )
        response = await stub.ModelInfer(request([0, 3], True))
        assert list(response.outputs[0].shape) == [0, 3]

    serve(tmp_path, body)


def test_500_concurrent_rpcs_each_get_their_own_rows(tmp_path: Path) -> None:
    model = mlp_model()
    write_model(
        tmp_path,
        "mlp",
        model,
        config_toml=(
            "[dynamic_batching]\nmax_queue_delay_us = 1000\n[instance_group]\ncount = 2\n"
        ),
    )
    reference = ort.InferenceSession(model.SerializeToString())
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal((int(rng.integers(1, 4)), 32)).astype(np.float32) for _ in range(500)]

    async def body(stub, repo) -> None:
        responses = await asyncio.gather(
            *(stub.ModelInfer(infer_request("mlp", {"x": x}, id=str(i))) for i, x in enumerate(xs))
        )
        for i, (x, response) in enumerate(zip(xs, responses, strict=True)):
            assert response.id == str(i) and response.model_version == "1"
            np.testing.assert_allclose(
                output(response, "y"), reference.run(None, {"x": x})[0], rtol=1e-5
            )
        stats = (await stub.ModelStatistics(pb.ModelStatisticsRequest(name="mlp"))).model_stats
        assert stats[0].inference_count == sum(len(x) for x in xs)
        assert stats[0].inference_stats.success.count == 500
        assert stats[0].execution_count < 500
        assert sum(b.compute_infer.count for b in stats[0].batch_stats) == stats[0].execution_count

    serve(tmp_path, body)


SLOW = "max_batch_size = 256\n[dynamic_batching]\nmax_queue_size = 1\n"


async def occupy(stub, repo) -> asyncio.Task:
    x = np.ones((256, 2048), np.float32)
    task = asyncio.ensure_future(stub.ModelInfer(infer_request("slow", {"x": x})))
    while repo.get("slow").batcher.busy_instances == 0:
        await asyncio.sleep(0.001)
    return task


def test_full_queue_is_resource_exhausted_and_timeouts_deadline_exceeded(tmp_path: Path) -> None:
    write_model(tmp_path, "slow", medium_model(width=2048, layers=4), config_toml=SLOW)
    x = np.ones((1, 2048), np.float32)

    async def body(stub, repo) -> None:
        blocker = await occupy(stub, repo)
        timeout = infer_request("slow", {"x": x})
        timeout.parameters["timeout"].int64_param = 5000
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ModelInfer(timeout)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert 'before it ran: its "timeout" of 5000 µs passed' in info.value.details()
        queued = asyncio.ensure_future(stub.ModelInfer(infer_request("slow", {"x": x})))
        while repo.get("slow").batcher.queued == 0:
            await asyncio.sleep(0.001)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ModelInfer(infer_request("slow", {"x": x}))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        await asyncio.gather(blocker, queued)
        blocker = await occupy(stub, repo)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ModelInfer(infer_request("slow", {"x": x}), timeout=0.01)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await blocker
        while repo.get("slow").batcher.queued:
            await asyncio.sleep(0.001)
        stats = repo.get("slow").batcher.stats
        assert stats.execution_count == 3
        assert stats.inference_count == 256 * 2 + 1

    serve(tmp_path, body)


def test_stream_survives_errors_and_keeps_order(tmp_path: Path) -> None:
    """The stream's 7 gather requests form one batch (preferred size 7, so it leaves as soon as
    they are queued); two bad rows fail it, and its requests are retried one by one."""
    write_model(
        tmp_path,
        "gather",
        gather_model(),
        config_toml=(
            "[dynamic_batching]\nmax_queue_delay_us = 10000000\npreferred_batch_sizes = [7]\n"
        ),
    )

    def request(i: int, index: int) -> pb.ModelInferRequest:
        return infer_request("gather", {"idx": np.array([[index]], np.int64)}, id=f"r{i}")

    indices = [1, 2, 99, 3, -50, 4]

    async def body(stub, repo) -> None:
        async def requests():
            for i, index in enumerate(indices):
                yield request(i, index)
            yield infer_request("nope", {"idx": np.array([[1]], np.int64)}, id="r6")
            yield request(7, 5)

        responses = [r async for r in stub.ModelStreamInfer(requests())]
        assert [r.infer_response.id for r in responses] == [f"r{i}" for i in range(8)]
        errors = [i for i, r in enumerate(responses) if r.error_message]
        assert errors == [2, 4, 6]
        assert "ONNX Runtime failed" in responses[2].error_message
        assert "ModelNotFoundError" in responses[6].error_message
        for i in (0, 1, 3, 5, 7):
            index = indices[i] if i < len(indices) else 5
            np.testing.assert_array_equal(
                output(responses[i].infer_response, "y"), [np.arange(4) + 4 * index]
            )
        stats = (await stub.ModelStatistics(pb.ModelStatisticsRequest(name="gather"))).model_stats
        # The failed batch of 7 is one execution without a batch size; then 7 runs of 1 row.
        assert batch_sizes(stats[0]) == {1: 7} and stats[0].execution_count == 8
        assert stats[0].inference_stats.success.count == 5
        bad = infer_request("gather", {"idx": np.full((7, 1), 99, np.int64)})
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ModelInfer(bad)
        assert info.value.code() == grpc.StatusCode.INTERNAL

    serve(tmp_path, body)


def test_repository_rpcs_load_unload_and_report_failures(tmp_path: Path) -> None:
    write_model(tmp_path, "mlp", mlp_model())
    write_model(tmp_path, "broken", b"garbage")

    async def body(stub, repo) -> None:
        index = await stub.RepositoryIndex(pb.RepositoryIndexRequest())
        states = {m.name: (m.state, m.reason) for m in index.models}
        assert states["mlp"][0] == "READY" and states["broken"][0] == "UNAVAILABLE"
        assert states["broken"][1]
        ready = await stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True))
        assert [m.name for m in ready.models] == ["mlp"]
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ModelInfer(infer_request("broken", {"x": np.ones((1, 32), np.float32)}))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        await stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="mlp"))
        assert not (await stub.ModelReady(pb.ModelReadyRequest(name="mlp"))).ready
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="broken"))
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "call RepositoryModelLoad again" in info.value.details()
        await stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="mlp"))
        response = await stub.ModelInfer(infer_request("mlp", {"x": np.ones((1, 32), np.float32)}))
        assert output(response, "y").shape == (1, 1)
        stats = await stub.ModelStatistics(pb.ModelStatisticsRequest())
        assert [(s.name, s.inference_count) for s in stats.model_stats] == [("mlp", 1)]

    serve(tmp_path, body)


def test_repository_model_load_rejects_config_and_file_overrides(tmp_path: Path) -> None:
    """Triton's "config" and "file:" load parameters are refused INVALID_ARGUMENT naming the
    parameter and the file to edit instead; the model keeps serving its own config."""
    write_model(tmp_path, "m", identity_model(["FP32"]), config_toml="max_batch_size = 8\n")
    config = tmp_path / "m" / "config.toml"

    async def body(stub, repo) -> None:
        override = pb.RepositoryModelLoadRequest(model_name="m")
        override.parameters["config"].string_param = '{"max_batch_size": 2}'
        upload = pb.RepositoryModelLoadRequest(model_name="m")
        upload.parameters["file:1/model.onnx"].bytes_param = b"onnx"
        for request, needles in (
            (override, ("parameter 'config' is not supported", f"edit {config}")),
            (upload, ("parameter 'file:1/model.onnx'", f"{tmp_path / 'm'}/1/model.onnx")),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.RepositoryModelLoad(request)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            for needle in (*needles, "load the model again without parameters"):
                assert needle in info.value.details()
        served = await stub.ModelConfig(pb.ModelConfigRequest(name="m"))
        assert served.config.max_batch_size == 8

    serve(tmp_path, body)


def test_repository_model_unload_takes_only_a_bool_unload_dependents(tmp_path: Path) -> None:
    """Triton's "unload_dependents" bool_param is accepted (no model here depends on another, so
    it changes nothing); another parameter, or another value kind, is INVALID_ARGUMENT naming it
    and the model keeps serving."""
    write_model(tmp_path, "a", identity_model(["FP32"]))
    write_model(tmp_path, "b", identity_model(["FP32"]))

    async def body(stub, repo) -> None:
        unknown = pb.RepositoryModelUnloadRequest(model_name="a")
        unknown.parameters["unload_dependents"].bool_param = True
        unknown.parameters["force"].bool_param = True
        as_string = pb.RepositoryModelUnloadRequest(model_name="a")
        as_string.parameters["unload_dependents"].string_param = "true"
        for request, needle in (
            (
                unknown,
                "RepositoryModelUnload: parameter 'force' is not supported; it takes only "
                "'unload_dependents' (a bool_param), so remove 'force'",
            ),
            (
                as_string,
                "RepositoryModelUnload: parameter 'unload_dependents' must be a bool_param, got "
                "string_param; send it as bool_param",
            ),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.RepositoryModelUnload(request)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert needle in info.value.details()
            assert (await stub.ModelReady(pb.ModelReadyRequest(name="a"))).ready
        for name, value in (("a", True), ("b", False)):
            request = pb.RepositoryModelUnloadRequest(model_name=name)
            request.parameters["unload_dependents"].bool_param = value
            await stub.RepositoryModelUnload(request)
            assert not (await stub.ModelReady(pb.ModelReadyRequest(name=name))).ready

    serve(tmp_path, body)


def test_model_config_reports_the_queue_policy_as_configured(tmp_path: Path) -> None:
    write_model(
        tmp_path,
        "delaying",
        mlp_model(),
        config_toml=(
            "max_batch_size = 16\n"
            "[dynamic_batching]\n"
            "max_queue_size = 9\n"
            "default_timeout_us = 3000\n"
            'timeout_action = "delay"\n'
            "allow_timeout_override = false\n"
            "priority_levels = 2\n"
            "default_priority_level = 2\n"
            "[dynamic_batching.priority_queue_policy.1]\n"
            "max_queue_size = 4\n"
            'timeout_action = "reject"\n'
        ),
    )

    async def body(stub, repo) -> None:
        config = (await stub.ModelConfig(pb.ModelConfigRequest(name="delaying"))).config
        queue = config.dynamic_batching.default_queue_policy
        assert queue.timeout_action == mc.ModelQueuePolicy.DELAY
        assert not queue.allow_timeout_override
        assert (queue.max_queue_size, queue.default_timeout_microseconds) == (9, 3000)
        assert list(config.dynamic_batching.priority_queue_policy) == [1]
        level = config.dynamic_batching.priority_queue_policy[1]
        assert level.timeout_action == mc.ModelQueuePolicy.REJECT
        assert not level.allow_timeout_override
        assert (level.max_queue_size, level.default_timeout_microseconds) == (4, 3000)

    serve(tmp_path, body)


def test_delay_policy_runs_a_timed_out_request_but_the_grpc_deadline_drops_one(
    tmp_path: Path,
) -> None:
    """With timeout_action "delay", a request whose "timeout" parameter (1 ms) passes while the
    instance is busy still runs; one whose gRPC deadline passes is dropped unexecuted."""
    write_model(
        tmp_path,
        "slow",
        # 12 layers: the blocker must outlast the 60 ms deadline below (with 4 it once ran in
        # less on CI, and the request that should have been dropped ran)
        medium_model(width=2048, layers=12),
        config_toml=(
            "max_batch_size = 256\n"
            "[dynamic_batching]\n"
            "default_timeout_us = 60000000\n"
            'timeout_action = "delay"\n'
        ),
    )

    async def body(stub, repo) -> None:
        blocker = await occupy(stub, repo)
        timed_out = infer_request("slow", {"x": np.ones((1, 2048), np.float32)})
        timed_out.parameters["timeout"].int64_param = 1000
        delayed = asyncio.ensure_future(stub.ModelInfer(timed_out))
        gone = infer_request("slow", {"x": np.ones((2, 2048), np.float32)})
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ModelInfer(gone, timeout=0.06)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await blocker
        assert output(await delayed, "y").shape == (1, 2048)
        stats = repo.get("slow").batcher.stats
        assert stats.inference_count == 256 + 1
        assert stats.fail.count == 1

    serve(tmp_path, body)


def test_an_oversized_stream_message_fails_only_its_own_request(tmp_path: Path, server_factory):
    """max_message_bytes = 10000: a 16 KB answer and a 16 KB request each get error_message in
    their place, and the stream goes on."""
    write_model(tmp_path / "models", "wide", gather_model(width=4000))
    write_model(tmp_path / "models", "narrow", gather_model(width=4))
    config = tmp_path / "small.toml"
    config.write_text("max_message_bytes = 10000\n")
    server = server_factory("--config", str(config))
    limit = "over the server's limit of max_message_bytes=10000"

    def gather(model: str, rows: int, id: str) -> pb.ModelInferRequest:
        return infer_request(model, {"idx": np.full((rows, 1), 2, np.int64)}, id=id)

    requests = [gather("narrow", 1, "before"), gather("wide", 1, "big-answer"),
                gather("narrow", 2000, "big-request"), gather("narrow", 1, "after")]  # fmt: skip
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        responses = list(stub.ModelStreamInfer(iter(requests), timeout=60))
    assert [r.infer_response.id for r in responses] == ["before", "big-answer", "", "after"]
    for ok in (responses[0], responses[3]):
        assert not ok.error_message
        np.testing.assert_array_equal(output(ok.infer_response, "y"), [np.arange(8, 12)])
    assert "the response is" in responses[1].error_message and limit in responses[1].error_message
    assert "send fewer rows per request or request fewer outputs" in responses[1].error_message
    assert "the request is" in responses[2].error_message and limit in responses[2].error_message
    assert "ModelStreamInfer" in responses[2].error_message
    assert "no request id: it answers request 2 of the stream" in responses[2].error_message
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(gather("wide", 1, "unary"), timeout=60)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = info.value.details()
    assert "ModelInfer: the response is" in details and limit in details
    assert "send fewer rows per request or request fewer outputs" in details
    assert "max_entities_per_request" not in details
    with grpc.insecure_channel(server.target) as channel:
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        huge = reflection_pb2.ServerReflectionRequest(file_containing_symbol="x" * 20_000)
        with pytest.raises(grpc.RpcError) as info:
            list(reflect.ServerReflectionInfo(iter([huge]), timeout=30))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert limit in info.value.details()


def test_model_statistics_count_every_inference_and_time_each_phase(tmp_path: Path) -> None:
    """N sequential 2-row requests: N executions of batch size 2, each request counted once in
    queue (at least its 1 ms queue delay), compute_input, compute_infer and compute_output."""
    write_model(
        tmp_path, "mlp", mlp_model(), config_toml="[dynamic_batching]\nmax_queue_delay_us = 1000\n"
    )
    n = 5
    x = np.ones((2, 32), np.float32)

    async def body(stub, repo) -> None:
        for _ in range(n):
            await stub.ModelInfer(infer_request("mlp", {"x": x}))
        response = await stub.ModelStatistics(pb.ModelStatisticsRequest(name="mlp"))
        [stats] = response.model_stats
        assert (stats.name, stats.version) == ("mlp", "1")
        assert (stats.inference_count, stats.execution_count) == (2 * n, n)
        assert stats.last_inference > 0
        infer = stats.inference_stats
        assert (infer.success.count, infer.fail.count) == (n, 0)
        assert infer.queue.count == n and infer.queue.ns >= n * 1_000_000
        for phase in ("compute_input", "compute_infer", "compute_output"):
            duration = getattr(infer, phase)
            assert duration.count == n and duration.ns > 0, phase
        assert infer.success.ns >= infer.queue.ns + infer.compute_infer.ns
        assert batch_sizes(stats) == {2: n}
        for request, needle in (
            (pb.ModelStatisticsRequest(name="nope"), "no model 'nope'"),
            (pb.ModelStatisticsRequest(name="mlp", version="9"), "has no version '9'"),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.ModelStatistics(request)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            assert needle in info.value.details()

    serve(tmp_path, body)


def three_output_model() -> onnx.ModelProto:
    """x [N, 4] FP32 -> twice = x + x (FP32), neg = -x (FP32), whole = int(x) (INT32)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    outputs = [
        helper.make_tensor_value_info("twice", TensorProto.FLOAT, ["N", 4]),
        helper.make_tensor_value_info("neg", TensorProto.FLOAT, ["N", 4]),
        helper.make_tensor_value_info("whole", TensorProto.INT32, ["N", 4]),
    ]
    nodes = [
        helper.make_node("Add", ["x", "x"], ["twice"]),
        helper.make_node("Neg", ["x"], ["neg"]),
        helper.make_node("Cast", ["x"], ["whole"], to=TensorProto.INT32),
    ]
    return onnx_model(nodes, [x], outputs)


def test_requested_outputs_come_back_alone_in_the_requested_order(tmp_path: Path) -> None:
    """Three 1-row requests asking for [whole, neg], [twice] and everything share one batch
    (preferred size 3); each gets exactly its outputs, in its order, with its own rows."""
    write_model(
        tmp_path,
        "three",
        three_output_model(),
        config_toml=(
            "[dynamic_batching]\nmax_queue_delay_us = 10000000\npreferred_batch_sizes = [3]\n"
        ),
    )
    xs = [np.array([[1.5, -2.0, 3.25, 4.0]], np.float32) * (i + 1) for i in range(3)]
    wanted = [["whole", "neg"], ["twice"], []]

    def expected(x: np.ndarray) -> dict[str, np.ndarray]:
        return {"twice": x + x, "neg": -x, "whole": x.astype(np.int32)}

    async def body(stub, repo) -> None:
        requests = []
        for x, names in zip(xs, wanted, strict=True):
            request = infer_request("three", {"x": x})
            for name in names:
                request.outputs.add(name=name)
            requests.append(request)
        responses = await asyncio.gather(*(stub.ModelInfer(r) for r in requests))
        for x, names, response in zip(xs, wanted, responses, strict=True):
            names = names or ["twice", "neg", "whole"]
            assert [o.name for o in response.outputs] == names
            assert len(response.raw_output_contents) == len(names)
            for name in names:
                np.testing.assert_array_equal(output(response, name), expected(x)[name])
        stats = (await stub.ModelStatistics(pb.ModelStatisticsRequest(name="three"))).model_stats
        assert batch_sizes(stats[0]) == {3: 1}

    serve(tmp_path, body)


def test_priority_parameter_orders_batches_and_an_out_of_range_one_gets_the_default_level(
    tmp_path: Path,
) -> None:
    """priority_levels = 3, default 2; batches of exactly 4 rows (preferred size 4, max 4) leave
    at once, others wait 60 s. Queued: low (3), zero (0 = default) and over (5, outside the
    levels, which Triton's SetPriority maps to the default level), 1 row each, then high (1) with
    2 rows: one batch [high, zero, over] leaves; low waits until a 3-row level-3 request joins it.
    Arrival order would have batched [low, zero, over] instead; clamping 5 to the lowest level
    would have left over behind."""
    write_model(
        tmp_path,
        "ranked",
        mlp_model(),
        config_toml=(
            "max_batch_size = 4\n"
            "[dynamic_batching]\n"
            "max_queue_delay_us = 60000000\n"
            "preferred_batch_sizes = [4]\n"
            "priority_levels = 3\n"
            "default_priority_level = 2\n"
        ),
    )
    reference = ort.InferenceSession(mlp_model().SerializeToString())
    rng = np.random.default_rng(11)

    def ranked(priority: int | None, rows: int, kind: str = "uint64") -> pb.ModelInferRequest:
        x = rng.standard_normal((rows, 32)).astype(np.float32)
        request = infer_request("ranked", {"x": x})
        if priority is not None:
            setattr(request.parameters["priority"], f"{kind}_param", priority)
        return request

    async def answer(request: pb.ModelInferRequest, call: Awaitable) -> None:
        x = np.frombuffer(request.raw_input_contents[0], np.float32).reshape(-1, 32)
        np.testing.assert_allclose(
            output(await call, "y"), reference.run(None, {"x": x})[0], rtol=1e-5
        )

    async def body(stub, repo) -> None:
        batcher = repo.get("ranked").batcher

        async def queue(request: pb.ModelInferRequest, queued: int) -> asyncio.Task:
            task = asyncio.ensure_future(answer(request, stub.ModelInfer(request)))
            while batcher.queued < queued and not task.done():
                await asyncio.sleep(0.001)
            return task

        low = await queue(ranked(3, 1), 1)
        zero = await queue(ranked(0, 1, "int64"), 2)
        over = await queue(ranked(5, 1), 3)
        high = await queue(ranked(1, 2), 0)
        await asyncio.gather(high, zero, over)
        assert not low.done() and batcher.queued == 1
        await asyncio.gather(low, await queue(ranked(3, 3), 0))
        stats = (await stub.ModelStatistics(pb.ModelStatisticsRequest(name="ranked"))).model_stats
        assert batch_sizes(stats[0]) == {4: 2}
        assert stats[0].inference_stats.success.count == 5

    serve(tmp_path, body)


def test_bf16_tensors_travel_as_raw_bit_patterns(tmp_path: Path) -> None:
    """BF16 goes in and out as raw 16-bit patterns (NumPy has no bfloat16: the server holds
    them as uint16 and hands ONNX Runtime bfloat16 OrtValues), batched like any dtype; typed
    contents are refused, as for FP16."""
    bf16 = onnx_model(
        [
            helper.make_node("Cast", ["x"], ["wide"], to=TensorProto.FLOAT),
            helper.make_node("Add", ["wide", "wide"], ["doubled"]),
            helper.make_node("Cast", ["y"], ["rounded"], to=TensorProto.BFLOAT16),
        ],
        [
            helper.make_tensor_value_info("x", TensorProto.BFLOAT16, ["N", 4]),
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4]),
        ],
        [
            helper.make_tensor_value_info("doubled", TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("rounded", TensorProto.BFLOAT16, ["N", 4]),
        ],
    )
    config = "max_batch_size = 64\n\n[dynamic_batching]\nmax_queue_delay_us = 20000\n"
    write_model(tmp_path, "bf16", bf16, config_toml=config)
    rng = np.random.default_rng(5)

    def request(rows: int) -> tuple[pb.ModelInferRequest, np.ndarray, np.ndarray]:
        x = rng.integers(0, 2**16, (rows, 4), dtype=np.uint16)
        x[(x & 0x7F80) == 0x7F80] = 0x3FC0  # NaN and inf patterns: 1.5 instead
        y = rng.standard_normal((rows, 4)) * 10.0 ** rng.integers(-30, 30, (rows, 4))
        req = pb.ModelInferRequest(model_name="bf16")
        req.inputs.add(name="x", datatype="BF16", shape=[rows, 4])
        req.inputs.add(name="y", datatype="FP32", shape=[rows, 4])
        req.raw_input_contents.extend([x.tobytes(), y.astype(np.float32).tobytes()])
        return req, x, y.astype(np.float32)

    async def body(stub, repo) -> None:
        meta = await stub.ModelMetadata(pb.ModelMetadataRequest(name="bf16"))
        assert [(t.name, t.datatype) for t in meta.inputs] == [("x", "BF16"), ("y", "FP32")]
        assert [t.datatype for t in meta.outputs] == ["FP32", "BF16"]
        sent = [request(rows) for rows in (1, 3, 2, 5)]
        answers = await asyncio.gather(*(stub.ModelInfer(r) for r, _, _ in sent))
        for (_, x, y), answer in zip(sent, answers, strict=True):
            np.testing.assert_array_equal(output(answer, "doubled"), 2 * bf16_to_float32(x))
            np.testing.assert_array_equal(output(answer, "rounded"), float32_to_bf16(y))
        stats = (await stub.ModelStatistics(pb.ModelStatisticsRequest(name="bf16"))).model_stats
        assert stats[0].inference_stats.success.count == 4
        assert stats[0].execution_count < 4  # batched together
        typed = pb.ModelInferRequest(model_name="bf16")
        tensor = typed.inputs.add(name="x", datatype="BF16", shape=[1, 4])
        tensor.contents.uint_contents.extend([1, 2, 3, 4])
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ModelInfer(typed)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "BF16 has no typed contents field; send it in raw_input_contents" in (
            info.value.details()
        )

    serve(tmp_path, body)


def test_a_bf16_model_passing_an_input_through_answers_each_request_its_own_rows(
    tmp_path: Path,
) -> None:
    """ONNX Runtime hands back a graph input that is also an output as the feed's own OrtValue,
    over the batch's array: the answer must be a copy (it was read from freed memory)."""
    width = 1024
    x = helper.make_tensor_value_info("x", TensorProto.BFLOAT16, ["N", 2])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", width])
    y = helper.make_tensor_value_info("y", TensorProto.BFLOAT16, ["N", 2])
    model = onnx_model([helper.make_node("Identity", ["x"], ["y"])], [x, z], [y, z])
    config = "max_batch_size = 64\n\n[dynamic_batching]\nmax_queue_delay_us = 5000\n"
    write_model(tmp_path, "alias", model, config_toml=config)

    async def one(stub, i: int) -> bool:
        rows = 1 + i % 4
        zs = np.full((rows, width), float(i), np.float32) + np.arange(width, dtype=np.float32)
        xs = np.full((rows, 2), 0x3F80, np.uint16)
        request = pb.ModelInferRequest(model_name="alias")
        request.inputs.add(name="x", datatype="BF16", shape=xs.shape)
        request.inputs.add(name="z", datatype="FP32", shape=zs.shape)
        request.raw_input_contents.extend([xs.tobytes(), zs.tobytes()])
        answer = await stub.ModelInfer(request)
        return np.array_equal(output(answer, "z"), zs) and np.array_equal(output(answer, "y"), xs)

    async def body(stub, repo) -> None:
        for _ in range(3):
            assert all(await asyncio.gather(*(one(stub, i) for i in range(64))))
        stats = (await stub.ModelStatistics(pb.ModelStatisticsRequest(name="alias"))).model_stats
        assert stats[0].execution_count < 3 * 64  # batched

    serve(tmp_path, body)


def test_bf16_beside_bytes_inputs(tmp_path: Path) -> None:
    """A BF16 input beside a BYTES input is served; a BYTES input with a BF16 output cannot be
    (ONNX Runtime's Python API takes strings only as NumPy, gives bfloat16 only as OrtValues),
    so that model fails to load saying so, and the other serves."""
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.BFLOAT16, ["N", 2]),
        helper.make_tensor_value_info("s", TensorProto.STRING, ["N", 2]),
    ]
    wide = helper.make_node("Cast", ["x"], ["wide"], to=TensorProto.FLOAT)
    text = helper.make_node("Identity", ["s"], ["t"])
    outputs = [
        helper.make_tensor_value_info("wide", TensorProto.FLOAT, ["N", 2]),
        helper.make_tensor_value_info("t", TensorProto.STRING, ["N", 2]),
    ]
    write_model(tmp_path, "mixed", onnx_model([wide, text], inputs, outputs))
    same = helper.make_tensor_value_info("same", TensorProto.BFLOAT16, ["N", 2])
    same_node = helper.make_node("Identity", ["x"], ["same"])
    write_model(tmp_path, "mixed_out", onnx_model([same_node, text], inputs, [same, outputs[1]]))
    # A string input with an initializer and a fixed first dimension is left out of a batching
    # model's inputs (it always takes its initializer): never fed, so a BF16 output is fine.
    fixed = helper.make_tensor_value_info("s", TensorProto.STRING, [1])
    size = helper.make_node("Size", ["s"], ["n"])
    kept = onnx_model([same_node, size], [inputs[0], fixed], [same])
    kept.graph.initializer.append(helper.make_tensor("s", TensorProto.STRING, [1], [b"hi"]))
    write_model(tmp_path, "kept_text", kept, config_toml="max_batch_size = 8\n")

    async def body(stub, repo) -> None:
        request = pb.ModelInferRequest(model_name="mixed")
        request.inputs.add(name="x", datatype="BF16", shape=[1, 2])
        request.inputs.add(name="s", datatype="BYTES", shape=[1, 2])
        request.raw_input_contents.extend(
            [np.array([0x3FC0, 0xC000], np.uint16).tobytes(), encode_bytes_elements([b"a", b""])]
        )
        answer = await stub.ModelInfer(request)
        np.testing.assert_array_equal(output(answer, "wide"), [[1.5, -2.0]])
        index = await stub.RepositoryIndex(pb.RepositoryIndexRequest())
        states = {m.name: (m.state, m.reason) for m in index.models}
        assert states["mixed"] == states["kept_text"] == ("READY", "")
        assert states["mixed_out"][0] == "UNAVAILABLE"
        reason = states["mixed_out"][1]
        assert "BYTES input 's' and BF16 output 'same' cannot be served together" in reason
        assert "cast output 'same' to FP32 in the model" in reason
        kept_text = infer_request("kept_text", {"x": np.array([[0x3FC0, 1]], np.uint16)})
        kept_text.inputs[0].datatype = "BF16"
        answer = await stub.ModelInfer(kept_text)
        np.testing.assert_array_equal(output(answer, "same"), [[0x3FC0, 1]])

    serve(tmp_path, body)


def test_statistics_and_index_of_all_models_list_only_the_callers_models(
    tmp_path: Path, server_factory
) -> None:
    """With auth on, ModelStatistics('') and RepositoryIndex list only the models the token may
    infer with: a token scoped to m1 got every model's statistics, states and load errors (with
    server paths), though ModelStatistics('other') refused it. Admin still sees them all."""
    for name in ("m1", "other"):
        write_model(tmp_path / "models", name, mlp_model())
    write_model(tmp_path / "models", "broken", b"garbage")
    config = tmp_path / "auth.toml"
    config.write_text(
        "[auth]\nenabled = true\n"
        '[[auth.tokens]]\nname = "m1-only"\ntoken = "m1-secret"\nscopes = ["infer:m1"]\n'
        '[[auth.tokens]]\nname = "ops"\ntoken = "admin-secret"\nscopes = ["admin"]\n'
    )
    server = server_factory("--config", str(config))
    m1 = (("authorization", "Bearer m1-secret"),)
    admin = (("authorization", "Bearer admin-secret"),)
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        stub.ModelInfer(infer_request("m1", {"x": np.ones((1, 32), np.float32)}), metadata=m1)

        def visible(metadata) -> tuple[list[str], list[str], list[str]]:
            stats = stub.ModelStatistics(pb.ModelStatisticsRequest(), metadata=metadata)
            index = stub.RepositoryIndex(pb.RepositoryIndexRequest(), metadata=metadata)
            ready = stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True), metadata=metadata)
            return (
                sorted(s.name for s in stats.model_stats),
                sorted(m.name for m in index.models),
                sorted(m.name for m in ready.models),
            )

        assert visible(m1) == (["m1"], ["m1"], ["m1"])
        assert visible(admin) == (["m1", "other"], ["broken", "m1", "other"], ["m1", "other"])
        [stats] = stub.ModelStatistics(pb.ModelStatisticsRequest(), metadata=m1).model_stats
        assert stats.inference_count == 1
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelStatistics(pb.ModelStatisticsRequest(name="other"), metadata=m1)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
