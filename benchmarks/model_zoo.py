"""ONNX models built in code for tests and benchmarks (nothing downloaded); a repository writer."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 9

# KServe datatype -> ONNX element type, for the identity model.
ONNX_TYPES: dict[str, int] = {
    "BOOL": TensorProto.BOOL,
    "UINT8": TensorProto.UINT8,
    "UINT16": TensorProto.UINT16,
    "UINT32": TensorProto.UINT32,
    "UINT64": TensorProto.UINT64,
    "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16,
    "INT32": TensorProto.INT32,
    "INT64": TensorProto.INT64,
    "FP16": TensorProto.FLOAT16,
    "BF16": TensorProto.BFLOAT16,
    "FP32": TensorProto.FLOAT,
    "FP64": TensorProto.DOUBLE,
    "BYTES": TensorProto.STRING,
}

MEDIUM_WIDTH = 1536
MEDIUM_LAYERS = 4


def graph_model(
    nodes: list, inputs: list, outputs: list, initializers: list | None = None
) -> onnx.ModelProto:
    """A checked ModelProto at the opset and IR version this ONNX Runtime reads."""
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=initializers or [])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def identity_model(datatypes: list[str], width: int = 3) -> onnx.ModelProto:
    """INPUT_<DT> [N, width] -> OUTPUT_<DT> unchanged, one pair per given KServe datatype."""
    nodes, inputs, outputs = [], [], []
    for dt in datatypes:
        inputs.append(helper.make_tensor_value_info(f"INPUT_{dt}", ONNX_TYPES[dt], ["N", width]))
        outputs.append(helper.make_tensor_value_info(f"OUTPUT_{dt}", ONNX_TYPES[dt], ["N", width]))
        nodes.append(helper.make_node("Identity", [f"INPUT_{dt}"], [f"OUTPUT_{dt}"]))
    return graph_model(nodes, inputs, outputs)


def add_sub_model(width: int = 16) -> onnx.ModelProto:
    """Triton's "simple" model in FP32: OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 - INPUT1."""
    inputs = [
        helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", width])
        for n in ("INPUT0", "INPUT1")
    ]
    outputs = [
        helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", width])
        for n in ("OUTPUT0", "OUTPUT1")
    ]
    nodes = [
        helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"]),
        helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"]),
    ]
    return graph_model(nodes, inputs, outputs)


def _dense_stack(widths: list[int], seed: int, relu_last: bool = False) -> onnx.ModelProto:
    """x [N, widths[0]] through dense layers (MatMul + bias, ReLU between) to y [N, widths[-1]]."""
    rng = np.random.default_rng(seed)
    nodes, initializers = [], []
    current = "x"
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
        w = (rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)).astype(np.float32)
        b = (rng.standard_normal(fan_out) * 0.01).astype(np.float32)
        initializers += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes.append(helper.make_node("MatMul", [current, f"w{i}"], [f"m{i}"]))
        last = i == len(widths) - 2
        added = "y" if last and not relu_last else f"a{i}"
        nodes.append(helper.make_node("Add", [f"m{i}", f"b{i}"], [added]))
        if not last or relu_last:
            out = "y" if last else f"h{i}"
            nodes.append(helper.make_node("Relu", [added], [out]))
            added = out
        current = added
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", widths[0]])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", widths[-1]])]
    return graph_model(nodes, inputs, outputs, initializers)


def mlp_model(seed: int = 0) -> onnx.ModelProto:
    """The small MLP: 32 -> 64 -> 64 -> 1, ReLU between layers."""
    return _dense_stack([32, 64, 64, 1], seed)


def medium_model(
    width: int = MEDIUM_WIDTH, layers: int = MEDIUM_LAYERS, seed: int = 1
) -> onnx.ModelProto:
    """A stack of wide dense layers: ~1-2 ms at batch 1, far less than 64x that at batch 64."""
    return _dense_stack([width] * (layers + 1), seed)


def gather_model(table_rows: int = 10, width: int = 4) -> onnx.ModelProto:
    """idx INT64 [N, 1] -> rows of a constant table; an index outside the table fails in ORT."""
    table = np.arange(table_rows * width, dtype=np.float32).reshape(table_rows, width)
    nodes = [
        helper.make_node("Gather", ["table", "idx"], ["g"], axis=0),
        helper.make_node("Reshape", ["g", "shape"], ["y"]),
    ]
    initializers = [
        numpy_helper.from_array(table, "table"),
        numpy_helper.from_array(np.array([-1, width], dtype=np.int64), "shape"),
    ]
    inputs = [helper.make_tensor_value_info("idx", TensorProto.INT64, ["N", 1])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width])]
    return graph_model(nodes, inputs, outputs, initializers)


def write_model(
    repository: Path,
    name: str,
    model: onnx.ModelProto | bytes,
    *,
    version: int = 1,
    config_toml: str | None = None,
) -> Path:
    """Write <name>/<version>/model.onnx (and config.toml when given); returns the model dir."""
    model_dir = Path(repository) / name
    version_dir = model_dir / str(version)
    version_dir.mkdir(parents=True, exist_ok=True)
    data = model if isinstance(model, bytes) else model.SerializeToString()
    tmp = version_dir / "model.onnx.tmp"
    tmp.write_bytes(data)
    tmp.replace(version_dir / "model.onnx")
    if config_toml is not None:
        (model_dir / "config.toml").write_text(config_toml)
    return model_dir
