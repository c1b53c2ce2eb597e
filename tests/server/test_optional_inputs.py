"""Optional inputs (ONNX graph inputs with initializers) served as Triton serves `optional: true`:
reported by the runner, filled into the config, omitted or overridden by requests, batched apart."""

import asyncio
from pathlib import Path

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from benchmarks.model_zoo import add_sub_model, graph_model, write_model
from featurestore.dtypes import DType
from featurestore.online_store import OnlineStore, StoreConfig
from featurestore.registry import Entity, JoinKey
from protos.inference import grpc_service_pb2 as pb
from server.model_config import (
    DEFAULT_MAX_BATCH_SIZE,
    ModelConfig,
    ModelConfigError,
    OnnxRuntimeConfig,
    TensorSpec,
    complete_config,
    load_model_config,
)
from server.model_repository import ModelRepository
from server.onnx_runner import OnnxRunner, zero_inputs
from server.predict_coalescer import PredictCoalescer
from server.prediction_binding import compile_binding
from tests.server.test_inference_rpc import infer_request, output, serve

SCALE = np.array([[2.0, 3.0, 4.0]], np.float32)
BIAS = np.array([10.0, 20.0, 30.0], np.float32)


def scaled_model(width: int = 3, scale_dims: tuple | None = None) -> onnx.ModelProto:
    """y = x * scale + bias: x [N, width] is required; scale (declared scale_dims, else
    [N, width]; initializer [1, width]) and bias (declared [width]) are graph inputs with
    initializers, so optional."""
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width]),
        helper.make_tensor_value_info("scale", TensorProto.FLOAT, list(scale_dims or ("N", width))),
        helper.make_tensor_value_info("bias", TensorProto.FLOAT, [width]),
    ]
    initializers = [
        numpy_helper.from_array(SCALE[:, :width], "scale"),
        numpy_helper.from_array(BIAS[:width], "bias"),
    ]
    nodes = [
        helper.make_node("Mul", ["x", "scale"], ["scaled"]),
        helper.make_node("Add", ["scaled", "bias"], ["y"]),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width])]
    return graph_model(nodes, inputs, outputs, initializers)


def completed(tmp_path: Path, model: onnx.ModelProto, text: str = "") -> ModelConfig:
    """config.toml text completed against the real ONNX Runtime signature of model."""
    model_dir = write_model(tmp_path, "m", model, config_toml=text)
    config = load_model_config(model_dir)
    runner = OnnxRunner(model_dir / "1" / "model.onnx", config.onnxruntime, 1)
    return complete_config(config, runner.inputs, runner.outputs, source="c.toml")


def direct(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> np.ndarray:
    """y from ONNX Runtime run directly on feed, without the server."""
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["y"], feed)[0]


def test_the_runner_reports_overridable_initializers_as_optional_inputs(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(scaled_model().SerializeToString())
    runner = OnnxRunner(path, OnnxRuntimeConfig(), 1)
    assert runner.inputs == [
        TensorSpec("x", "FP32", (-1, 3)),
        TensorSpec("scale", "FP32", (-1, 3), optional=True),
        TensorSpec("bias", "FP32", (3,), optional=True),
    ]
    # Before IR version 4 an initializer listed among the inputs is a constant: not an input.
    old = scaled_model()
    old.ir_version = 3
    path.write_bytes(old.SerializeToString())
    assert OnnxRunner(path, OnnxRuntimeConfig(), 1).inputs == [TensorSpec("x", "FP32", (-1, 3))]


def test_filling_takes_the_optional_inputs_a_batch_can_carry(tmp_path: Path) -> None:
    """Batching keeps its default; an optional input without a batch dimension is left out of a
    batching model (it always runs on its initializer) and kept in one that does not batch."""
    batched = completed(tmp_path / "a", scaled_model())
    assert batched.max_batch_size == DEFAULT_MAX_BATCH_SIZE
    assert batched.inputs == (
        TensorSpec("x", "FP32", (-1, 3)),
        TensorSpec("scale", "FP32", (-1, 3), optional=True),
    )
    unbatched = completed(tmp_path / "b", scaled_model(), "max_batch_size = 0\n")
    assert [(t.name, t.optional) for t in unbatched.inputs] == [
        ("x", False),
        ("scale", True),
        ("bias", True),
    ]
    declared = completed(
        tmp_path / "c",
        scaled_model(),
        '[[inputs]]\nname = "x"\ndtype = "FP32"\nshape = [-1, 3]\n'
        '[[inputs]]\nname = "scale"\ndtype = "FP32"\nshape = [-1, 3]\noptional = true\n',
    )
    assert [(t.name, t.optional) for t in declared.inputs] == [("x", False), ("scale", True)]
    declare = 'max_batch_size = 8\n[[inputs]]\nname = "x"\ndtype = "FP32"\nshape = [-1, 3]\n'
    declare += '[[inputs]]\nname = "bias"\ndtype = "FP32"\noptional = true\nshape = '
    for shape, needle in (("[3]", "must start with -1"), ("[-1]", "cannot be batched")):
        with pytest.raises(ModelConfigError) as info:
            completed(tmp_path / f"d{len(shape)}", scaled_model(), f"{declare}{shape}\n")
        assert needle in str(info.value) and f"'bias' shape {shape}" in str(info.value)
        assert "leave 'bias' out of [[inputs]] so that it always takes its initializer" in str(
            info.value
        )


def test_calibration_leaves_optional_inputs_to_their_initializers(tmp_path: Path) -> None:
    """An optional input no zeros can stand in for (a variable non-batch dimension) does not keep
    the version from being timed: calibration runs on the required inputs only."""
    config = completed(tmp_path, scaled_model(scale_dims=("N", "K")))
    assert config.input("scale") == TensorSpec("scale", "FP32", (-1, -1), optional=True)
    assert zero_inputs(list(config.inputs), 1) is None
    runner = OnnxRunner(tmp_path / "m" / "1" / "model.onnx", config.onnxruntime, 1)
    cost = runner.calibrate(config)
    assert cost is not None and cost.predict_us(1) > 0


def test_a_request_may_omit_an_optional_input_or_override_it(tmp_path: Path) -> None:
    model = scaled_model()
    write_model(tmp_path, "scaled", model)
    write_model(tmp_path, "unbatched", model, config_toml="max_batch_size = 0\n")
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    scale = np.full((2, 3), -1.0, np.float32)
    bias = np.array([0.5, 0.25, 0.125], np.float32)

    async def body(stub, repo) -> None:
        meta = await stub.ModelMetadata(pb.ModelMetadataRequest(name="scaled"))
        assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
            ("x", "FP32", [-1, 3]),
            ("scale", "FP32", [-1, 3]),
        ]
        for name, expected in (
            ("scaled", [("x", False, [3]), ("scale", True, [3])]),
            ("unbatched", [("x", False, [-1, 3]), ("scale", True, [-1, 3]), ("bias", True, [3])]),
        ):
            config = (await stub.ModelConfig(pb.ModelConfigRequest(name=name))).config
            assert [(i.name, i.optional, list(i.dims)) for i in config.input] == expected

        async def y(name: str, arrays: dict[str, np.ndarray]) -> np.ndarray:
            return output(await stub.ModelInfer(infer_request(name, arrays)), "y")

        np.testing.assert_array_equal(await y("scaled", {"x": x}), direct(model, {"x": x}))
        np.testing.assert_array_equal(await y("scaled", {"x": x}), x * SCALE + BIAS)
        overridden = await y("scaled", {"x": x, "scale": scale})
        np.testing.assert_array_equal(overridden, direct(model, {"x": x, "scale": scale}))
        np.testing.assert_array_equal(overridden, -x + BIAS)
        both = {"x": x, "scale": scale, "bias": bias}
        np.testing.assert_array_equal(await y("unbatched", both), direct(model, both))
        np.testing.assert_array_equal(await y("unbatched", {"x": x}), x * SCALE + BIAS)
        for name, arrays, needle in (
            ("scaled", {"scale": scale}, "input 'x' (FP32) is missing"),
            ("scaled", {"x": x, "bias": bias}, "unknown input 'bias'; model 'scaled' takes x, "),
            ("scaled", {"x": x, "scale": scale[:1]}, "input 'scale': batch dimension 1, but"),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.ModelInfer(infer_request(name, arrays))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert needle in info.value.details()

    serve(tmp_path, body)


def test_requests_that_omit_and_supply_an_optional_input_never_share_a_batch(
    tmp_path: Path,
) -> None:
    """Each request waits in the queue when the next arrives (the queue delay is far longer than
    the test): one that leaves scale out is never joined to one that sends it, whose scale would
    be lost, yet requests that agree still batch."""
    model = scaled_model()
    write_model(
        tmp_path,
        "mixed",
        model,
        config_toml=(
            "max_batch_size = 4\n[dynamic_batching]\nmax_queue_delay_us = 5000000\n"
            "preferred_batch_sizes = [2]\n"
        ),
    )
    xs = [np.full((1, 3), i + 1, np.float32) for i in range(5)]
    scale = np.full((1, 3), 7.0, np.float32)
    plan = [False, True, True, False, False]  # whether request i sends scale

    async def body(stub, repo) -> None:
        batcher = repo.get("mixed").batcher
        calls = []
        for x, sends in zip(xs, plan, strict=True):
            arrays = {"x": x, "scale": scale} if sends else {"x": x}
            call = asyncio.ensure_future(stub.ModelInfer(infer_request("mixed", arrays)))
            calls.append(call)
            while not call.done() and batcher.stats.inference_count + batcher.queued < len(calls):
                await asyncio.sleep(0.001)
        responses = await asyncio.gather(*calls)
        for x, sends, response in zip(xs, plan, responses, strict=True):
            feed = {"x": x, "scale": scale} if sends else {"x": x}
            np.testing.assert_array_equal(output(response, "y"), direct(model, feed))
        stats = await stub.ModelStatistics(pb.ModelStatisticsRequest(name="mixed"))
        sizes = {b.batch_size: b.compute_infer.count for b in stats.model_stats[0].batch_stats}
        assert sizes == {1: 1, 2: 2}

    serve(tmp_path, body)


def test_predict_binds_the_one_required_input_and_refuses_to_leave_one_unfilled(
    tmp_path: Path,
) -> None:
    """Predict fills one input: a model whose other inputs are optional loads and scores on their
    initializers; a model with a second required input is refused at load, naming it."""
    columns = '[[features.columns]]\nrequest = "amount"\n[request_values]\namount = "float64"\n'
    binding = '[features]\nentity = "user"\n' + columns
    model_dir = write_model(tmp_path / "models", "scaled", scaled_model(width=1))
    (model_dir / "config.toml").write_text(binding)
    store = OnlineStore(StoreConfig(path=tmp_path / "data", sync=False))
    store.registry.apply([Entity("user", (JoinKey("id", DType.INT64),))], [])
    amount = np.array([1.0, 2.0, 5.0])

    async def main() -> np.ndarray:
        models = ModelRepository(tmp_path / "models", watch=False)
        await models.start()
        try:
            model = models.get("scaled")
            assert model.binding is not None and model.binding.input_name == "x"
            coalescer = PredictCoalescer(store, model, max_rows=100)
            keys = {"id": np.array([1, 2, 3], np.int64)}
            scored = await coalescer.predict(keys, {"amount": amount}, 3, None, None)
            return scored.scores["y"]
        finally:
            await models.stop()

    try:
        y = asyncio.run(main())
    finally:
        store.close()
    np.testing.assert_array_equal(y, amount[:, None].astype(np.float32) * SCALE[:, :1] + BIAS[:1])
    config = completed(
        tmp_path / "two", add_sub_model(1), binding.replace("\n", '\ninput = "INPUT0"\n', 1)
    )
    with pytest.raises(ModelConfigError) as info:
        compile_binding(config, "c.toml")
    assert "Predict fills only features.input 'INPUT0', but the model also requires 'INPUT1'" in (
        str(info.value)
    )
