"""ONNX Runtime sessions of one model version: one session per instance, configured options."""

from __future__ import annotations

import contextlib
import ctypes
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from server.errors import InvalidRequestError
from server.model_config import (
    CONFIG_FILENAME,
    ModelConfig,
    ModelConfigError,
    OnnxRuntimeConfig,
    TensorSpec,
    WarmupInput,
)
from server.tensors import NUMPY_DTYPES, ONNX_TO_KSERVE, decode_raw, unserved_type

CALIBRATION_RUNS = 5
CALIBRATION_ROWS = 64
_ONNX_BFLOAT16 = 16  # onnx.TensorProto.BFLOAT16 (importing onnx costs every start ~50 ms)
WARMUP_FOLDER = "warmup"
"""The model folder's subfolder holding warmup input_data_file files, as in Triton."""

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


def check_feedable(config: ModelConfig) -> None:
    """Refuse a model that takes strings and gives BF16: ONNX Runtime's Python API takes strings
    only as NumPy arrays and gives bfloat16 only through OrtValue feeds. An optional string input
    the config leaves out (it always takes its initializer) is never fed, so it does not count."""
    text = [t.name for t in config.inputs if t.datatype == "BYTES"]
    bf16 = [t.name for t in config.outputs if t.datatype == "BF16"]
    if text and bf16:
        raise ModelConfigError(
            f"BYTES input '{text[0]}' and BF16 output '{bf16[0]}' cannot be served together "
            "(ONNX Runtime's Python API takes strings only as NumPy arrays and gives bfloat16 "
            f"only as OrtValues): cast output '{bf16[0]}' to FP32 in the model"
        )


class WarmupFailedError(Exception):
    """A warmup sample failed in ONNX Runtime; the message names the sample and the instance."""


class WarmupStoppedError(WarmupFailedError):
    """A warmup was stopped before its runs ended (the server is stopping)."""


def _bits(value: ort.OrtValue) -> np.ndarray:
    """A bfloat16 OrtValue's elements as uint16 bit patterns (a copy of its buffer)."""
    data = ctypes.string_at(value.data_ptr(), value.tensor_size_in_bytes())
    return np.frombuffer(data, np.uint16).reshape(value.shape())


def _spec(arg: ort.NodeArg, optional: bool = False) -> TensorSpec:
    """A session input/output as a TensorSpec (symbolic or unknown dims become -1)."""
    datatype = ONNX_TO_KSERVE.get(arg.type)
    if datatype is None:
        raise ModelConfigError(unserved_type(arg.name, arg.type))
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or ()))
    return TensorSpec(arg.name, datatype, shape, optional)


@dataclass(frozen=True)
class RunCost:
    """A version's measured execution time, fixed plus per row, in microseconds."""

    fixed_us: float
    per_row_us: float

    def predict_us(self, rows: int) -> float:
        """Expected wall time of one run of `rows` rows."""
        return self.fixed_us + self.per_row_us * rows


def zero_inputs(specs: list[TensorSpec], rows: int) -> dict[str, np.ndarray] | None:
    """Zero-filled inputs of `rows` rows for the given specs, or None when a non-batch dimension
    is variable or an input holds strings (no stand-in data can be made up for those)."""
    feed = {}
    for spec in specs:
        dims = spec.shape[1:] if spec.shape and spec.shape[0] == -1 else spec.shape
        dtype = NUMPY_DTYPES.get(spec.datatype)
        if any(d < 0 for d in dims) or dtype is None or dtype.kind in "OSU":
            return None
        batch = (rows,) if spec.shape and spec.shape[0] == -1 else ()
        feed[spec.name] = np.zeros(batch + tuple(dims), dtype)
    return feed


def warmup_feeds(config: ModelConfig, model_dir: Path) -> list[dict[str, np.ndarray]]:
    """The input arrays of each of config's warmup samples (resolved by resolve_warmup), with
    input_data_file files read from model_dir/warmup. Random data is seeded, so that a sample
    that fails does so on every load."""
    source = model_dir / CONFIG_FILENAME
    rng = np.random.default_rng(0)
    feeds = []
    for index, sample in enumerate(config.model_warmup):
        rows = (sample.batch_size,) if config.max_batch_size else ()
        feed = {}
        for name, spec in sample.inputs.items():
            shape = rows + spec.dims
            if spec.data == "input_data_file":
                key = f"model_warmup[{index}].inputs.{name}.input_data_file"
                feed[name] = _file_data(f"{source}: {key}", model_dir, name, spec, rows)
            elif spec.data == "random_data":
                feed[name] = _random_data(rng, spec.datatype, shape)
            elif spec.datatype == "BYTES":
                feed[name] = np.full(shape, "", dtype=object)
            else:
                feed[name] = np.zeros(shape, NUMPY_DTYPES[spec.datatype])
        feeds.append(feed)
    return feeds


def _file_data(
    where: str, model_dir: Path, name: str, spec: WarmupInput, rows: tuple
) -> np.ndarray:
    """An input_data_file's raw little-endian contents (BYTES: 4-byte lengths and UTF-8 bytes)
    as the batch's array: the file holds all rows, or one row that every row repeats (Triton's
    reading, whose files hold a single row)."""
    path = model_dir / WARMUP_FOLDER / spec.file
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ModelConfigError(
            f"{where}: cannot read {path}: {exc.strerror or exc}; put the sample's raw "
            "little-endian data there"
        ) from None
    shape = rows + spec.dims
    try:
        return decode_raw(name, spec.datatype, shape, raw)
    except InvalidRequestError as exc:
        problem = str(exc)
    if rows and rows[0] > 1:
        with contextlib.suppress(InvalidRequestError):
            row = decode_raw(name, spec.datatype, spec.dims, raw)
            return np.ascontiguousarray(np.broadcast_to(row, shape))
        problem += f", or one row of dims {list(spec.dims)} that every row repeats"
    raise ModelConfigError(
        f"{where}: {path}: {problem}; write the file to match (raw little-endian values in "
        "row-major order)"
    )


def _random_data(rng: np.random.Generator, datatype: str, shape: tuple) -> np.ndarray:
    """Random values: floats in [0, 1) (BF16 as their bit patterns), integers over their type's
    whole range, booleans."""
    dtype = NUMPY_DTYPES[datatype]
    if datatype == "BF16":
        return (rng.random(shape, np.float32).view(np.uint32) >> 16).astype(np.uint16)
    if dtype.kind == "f":
        return rng.random(shape).astype(dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, shape).astype(bool)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)


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
        # A graph input with an initializer (IR >= 4) is an overridable initializer: the model
        # runs on the initializer when a request leaves the input out, as Triton's optional.
        self.inputs = [_spec(a) for a in first.get_inputs()] + [
            _spec(a, optional=True) for a in first.get_overridable_initializers()
        ]
        self.outputs = [_spec(a) for a in first.get_outputs()]
        self._output_names = [o.name for o in self.outputs]
        self._bf16 = {t.name for t in self.inputs + self.outputs if t.datatype == "BF16"}

    def run(
        self, instance: int, inputs: dict[str, np.ndarray], outputs: list[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Execute one batch on one instance; returns the requested outputs by name."""
        names = outputs or self._output_names
        if self._bf16:
            return self._run_bf16(instance, inputs, names)
        results = self.sessions[instance].run(names, inputs)
        return dict(zip(names, results, strict=True))

    def _run_bf16(
        self, instance: int, inputs: dict[str, np.ndarray], names: list[str]
    ) -> dict[str, np.ndarray]:
        """A run for a model with BF16 tensors, which ONNX Runtime neither takes nor returns as
        NumPy arrays: they go in and come out as OrtValues over their uint16 bit patterns."""
        feed = {
            name: ort.OrtValue.ortvalue_from_numpy_with_onnx_type(
                np.ascontiguousarray(array),
                _ONNX_BFLOAT16,  # it ignores strides
            )
            if name in self._bf16
            else array
            for name, array in inputs.items()
        }
        session = self.sessions[instance]
        if self._bf16.isdisjoint(names):
            return dict(zip(names, session.run(names, feed), strict=True))
        # IOBinding, not run_with_ort_values: that wrapper's loop over its results alone costs
        # ~70 µs a run here, the whole binding ~25 µs.
        binding = session.io_binding()
        for name, value in feed.items():
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, value)
        for name in names:
            binding.bind_output(name)
        session.run_with_iobinding(binding)
        results = binding.get_outputs()
        # Copies: an output that is also a graph input comes back as the feed's own buffer,
        # the batch's array, which is gone once the batch is answered.
        return {
            name: _bits(results[i]) if name in self._bf16 else np.array(results[i].numpy())
            for i, name in enumerate(names)
        }

    def calibrate(self, config: ModelConfig) -> RunCost | None:
        """Time runs on zero inputs of 1 row and of up to CALIBRATION_ROWS rows (the best of
        CALIBRATION_RUNS each, after one warm-up run that also pays ONNX Runtime's first-run
        set-up before any request does); None when the model takes no made-up input or fails.
        Optional inputs are left out, so they keep their initializers, as most requests would."""
        big = min(config.max_batch_size or 1, CALIBRATION_ROWS)
        required = [spec for spec in config.inputs if not spec.optional]
        times = []
        for rows in (1, big):
            feed = zero_inputs(required, rows)
            if feed is None:
                return None
            try:
                self.run(0, feed)
                best = float("inf")
                for _ in range(CALIBRATION_RUNS):
                    start = time.perf_counter()
                    self.run(0, feed)
                    best = min(best, time.perf_counter() - start)
            except Exception:
                return None
            times.append(best * 1e6)
        per_row = max(0.0, (times[1] - times[0]) / (big - 1)) if big > 1 else 0.0
        return RunCost(max(0.0, times[0] - per_row), per_row)

    def warm_up(self, config: ModelConfig, model_dir: Path, stop: threading.Event) -> int:
        """Run every warmup sample of config count times on every instance, so that no request
        pays ONNX Runtime's first-run costs on any session; returns the runs made. stop, once
        set, ends it before the next run (a long warmup must not outlast a server's stop).

        Raises ModelConfigError for a sample's data (an input_data_file missing or of the wrong
        size), WarmupFailedError for a run that fails, naming the sample and ORT's message, or
        for a warmup stopped."""
        runs = 0
        feeds = warmup_feeds(config, model_dir)
        for index, (sample, feed) in enumerate(zip(config.model_warmup, feeds, strict=True)):
            for instance in range(len(self.sessions)):
                try:
                    for _ in range(sample.count):
                        if stop.is_set():
                            raise WarmupStoppedError(
                                f"{model_dir / CONFIG_FILENAME}: model_warmup[{index}] "
                                f"'{sample.name}' stopped after {runs} runs: the load was "
                                "abandoned (the server is stopping)"
                            )
                        self.run(instance, feed)
                        runs += 1
                except WarmupStoppedError:
                    raise
                except Exception as exc:
                    raise WarmupFailedError(
                        f"{model_dir / CONFIG_FILENAME}: model_warmup[{index}] '{sample.name}' "
                        f"failed in ONNX Runtime on instance {instance}: {exc}; fix the sample's "
                        "data or the model"
                    ) from None
        return runs

    def close(self) -> None:
        """Drop the sessions (ONNX Runtime frees them when unreferenced)."""
        self.sessions.clear()
