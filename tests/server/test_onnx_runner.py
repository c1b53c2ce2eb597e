"""ONNX Runtime sessions: load-time calibration of a version's run time, and its stand-in inputs."""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from benchmarks.model_zoo import identity_model, medium_model, mlp_model
from server.model_config import ModelConfig, OnnxRuntimeConfig, TensorSpec, complete_config
from server.onnx_runner import OnnxRunner, zero_inputs


def runner_and_config(tmp_path: Path, model: onnx.ModelProto, max_batch_size: int = 64):
    path = tmp_path / f"m{id(model)}.onnx"
    path.write_bytes(model.SerializeToString())
    runner = OnnxRunner(path, OnnxRuntimeConfig(), 1)
    config = ModelConfig(name="m", max_batch_size=max_batch_size)
    return runner, complete_config(config, runner.inputs, runner.outputs, source=str(path))


def test_calibration_measures_a_fixed_and_a_per_row_cost(tmp_path: Path) -> None:
    small = runner_and_config(tmp_path, mlp_model())
    slow = runner_and_config(tmp_path, medium_model(width=1024, layers=4))
    small_cost = small[0].calibrate(small[1])
    slow_cost = slow[0].calibrate(slow[1])
    assert small_cost is not None and slow_cost is not None
    assert slow_cost.per_row_us > small_cost.per_row_us > 0
    assert slow_cost.predict_us(64) > slow_cost.predict_us(1) > small_cost.predict_us(1) > 0


def test_a_model_without_made_up_inputs_is_not_timed(tmp_path: Path) -> None:
    runner, config = runner_and_config(tmp_path, identity_model(["BYTES"]), max_batch_size=8)
    assert runner.calibrate(config) is None


def test_zero_inputs_fill_the_batch_dimension_only() -> None:
    specs = [TensorSpec("x", "FP32", (-1, 3)), TensorSpec("k", "INT64", (2,))]
    feed = zero_inputs(specs, 5)
    assert feed["x"].shape == (5, 3) and feed["x"].dtype == np.float32 and not feed["x"].any()
    assert feed["k"].shape == (2,) and feed["k"].dtype == np.int64
    assert zero_inputs([TensorSpec("x", "FP32", (-1, -1))], 5) is None
    assert zero_inputs([TensorSpec("s", "BYTES", (-1, 1))], 5) is None


def test_onnxruntime_config_reaches_every_instance_session(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(mlp_model().SerializeToString())
    config = OnnxRuntimeConfig(
        intra_op_threads=2, inter_op_threads=3, graph_optimization_level="basic"
    )
    runner = OnnxRunner(path, config, 2)
    assert len(runner.sessions) == 2
    for session in runner.sessions:
        options = session.get_session_options()
        assert (options.intra_op_num_threads, options.inter_op_num_threads) == (2, 3)
        assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    x = np.ones((3, 32), np.float32)
    np.testing.assert_array_equal(runner.run(0, {"x": x})["y"], runner.run(1, {"x": x})["y"])
