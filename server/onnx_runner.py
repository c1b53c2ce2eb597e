"""ONNX Runtime sessions of one model version: one session per instance, configured options."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from server.model_config import ModelConfigError, OnnxRuntimeConfig, TensorSpec
from server.tensors import ONNX_TO_KSERVE

_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def session_options(config: OnnxRuntimeConfig) -> ort.SessionOptions:
    """SessionOptions from [onnxruntime]; idle threads sleep instead of spinning (shared cores)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = config.intra_op_threads
    options.inter_op_num_threads = config.inter_op_threads
    options.graph_optimization_level = _LEVELS[config.graph_optimization_level]
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.log_severity_level = 3
    return options


def _spec(arg: ort.NodeArg) -> TensorSpec:
    """A session input/output as a TensorSpec (symbolic or unknown dims become -1)."""
    datatype = ONNX_TO_KSERVE.get(arg.type)
    if datatype is None:
        raise ModelConfigError(f"tensor '{arg.name}' has type {arg.type}, which is not served")
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or ()))
    return TensorSpec(arg.name, datatype, shape)


class OnnxRunner:
    """N InferenceSessions over one model file; run(instance, ...) is safe from N threads."""

    def __init__(self, model_path: Path, config: OnnxRuntimeConfig, instances: int) -> None:
        options = session_options(config)
        data = Path(model_path).read_bytes()
        self.sessions = [
            ort.InferenceSession(data, sess_options=options, providers=["CPUExecutionProvider"])
            for _ in range(instances)
        ]
        first = self.sessions[0]
        self.inputs = [_spec(a) for a in first.get_inputs()]
        self.outputs = [_spec(a) for a in first.get_outputs()]

    def run(
        self, instance: int, inputs: dict[str, np.ndarray], outputs: list[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Execute one batch on one instance; returns the requested outputs by name."""
        names = outputs or [o.name for o in self.outputs]
        results = self.sessions[instance].run(names, inputs)
        return dict(zip(names, results, strict=True))

    def close(self) -> None:
        """Drop the sessions (ONNX Runtime frees them when unreferenced)."""
        self.sessions.clear()
