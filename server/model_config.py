"""A model's config.toml as dataclasses: parsing, validation, completion from the ONNX signature.

`shape` in config.toml is the full tensor shape as the model sees it, -1 for a variable
dimension; when max_batch_size > 0 the first dimension is the batch and must be -1.
`optional = true` marks an input the model can run without: an ONNX graph input that also has an
initializer, which ONNX Runtime uses when a request leaves the input out.
`[[model_warmup]]` tables are Triton's ModelWarmup samples, run at load before the version serves;
their dims leave the batch dimension out, as in Triton.
`label_filename = "labels.txt"` on an output names its class labels, a file in the model folder
read at load, for Triton's classification extension (server/classification.py).
`platform = "ensemble"` makes the folder an ensemble (Triton's): no model.onnx, declared inputs and
outputs, and `[[ensemble_scheduling.step]]` tables chaining composing models (server/ensemble.py);
parse_model_config checks the steps' structure, the load checks them against the composing models.
An ensemble may carry Predict's binding tables as an ONNX model does, filling one of its inputs.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.classification import CLASSIFIABLE_DATATYPES
from server.config import model_name_problem
from server.tensors import NUMPY_DTYPES, TRITON_TYPE_NAMES

log = logging.getLogger("featureserve.model_config")

CONFIG_FILENAME = "config.toml"
MODEL_FILENAME = "model.onnx"
ONNX_PLATFORM = "onnxruntime_onnx"
ENSEMBLE_PLATFORM = "ensemble"
LATEST_VERSION = -1
"""A step's model_version that follows the composing model's highest served version."""
DEFAULT_MAX_BATCH_SIZE = 64

# Top-level tables that other parts of the server own (Predict's feature bindings and transforms);
# they are kept raw in ModelConfig.extensions for those parts to parse.
MODEL_CONFIG_EXTENSIONS: frozenset[str] = frozenset({"features", "transforms", "request_values"})
# Extensions written as arrays of tables ([[transforms]]); the others are tables.
_LIST_EXTENSIONS = frozenset({"transforms"})

GRAPH_OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")
TIMEOUT_ACTIONS = ("reject", "delay")

INT32_MAX = 2**31 - 1
UINT32_MAX = 2**32 - 1
# Every priority level is a queue built at load and scanned by every dispatch (~0.4 µs a level),
# so 256 levels cost at most ~0.1 ms a batch; Triton deployments use a handful of levels.
MAX_PRIORITY_LEVELS = 256
# Every instance is an ONNX Runtime session (its own copy of the weights) and a thread, all
# built at load: more than a few per core only costs memory.
MAX_INSTANCES = 64
_PROTO = "ModelConfig reports it in Triton's model_config.proto as"
# Inclusive ranges of the int keys (by the key's last part) that have more bounds than >= 0.
_RANGES: dict[str, tuple[int, int, str]] = {
    "max_batch_size": (0, INT32_MAX, f"{_PROTO} int32"),
    "count": (1, MAX_INSTANCES, "each instance is an ONNX Runtime session and a thread"),
    "max_queue_size": (0, UINT32_MAX, f"{_PROTO} uint32"),
    "latest": (1, UINT32_MAX, f"{_PROTO} uint32 num_versions"),
    "priority_levels": (0, MAX_PRIORITY_LEVELS, "each level is a queue every dispatch scans"),
}


# Where a warmup input's data comes from: one of these keys (Triton's oneof input_data_type).
WARMUP_DATA = ("zero_data", "random_data", "input_data_file")
MAX_WARMUP_INPUT_BYTES = 2**31 - 1
"""The most one warmup input may hold: the largest gRPC message, so no real request is bigger
(a typo of dims such as 2^40 tried to allocate 4 TiB at load)."""
# A warmup data_type in our spelling ("FP32") or Triton's ("TYPE_FP32") -> ours.
_WARMUP_DATATYPES = {**{t: t for t in NUMPY_DTYPES}, **{v: k for k, v in TRITON_TYPE_NAMES.items()}}


# The fix for an optional input that cannot be batched: requests then never send it.
_LEAVE_OUT = ", or leave '{}' out of [[inputs]] so that it always takes its initializer"


class ModelConfigError(Exception):
    """A config.toml that cannot be served; the message names the file and the key."""


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: name, KServe datatype and full shape (-1 = variable). An output may
    name a labels file in the model folder (label_filename, Triton's field): its lines, read at
    load, are the class labels of the classification extension (server/classification.py)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    optional: bool = False
    label_filename: str = ""
    labels: tuple[str, ...] = ()


@dataclass(frozen=True)
class QueuePolicy:
    """Triton's ModelQueuePolicy for one priority level's queue: how many requests it holds
    (0 = no limit), how long one may wait (µs, 0 = no limit), whether a request's "timeout"
    may shorten that, and whether a timed-out request is rejected or delayed behind the rest."""

    max_queue_size: int = 0
    default_timeout_us: int = 0
    timeout_action: str = "reject"
    allow_timeout_override: bool = True


@dataclass(frozen=True)
class DynamicBatchingConfig:
    """[dynamic_batching]: Triton's dynamic batcher settings. The flat queue keys are the
    default queue policy; priority_queue_policy holds (level, policy) for levels with their own."""

    enabled: bool = True
    max_queue_delay_us: int = 0
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_size: int = 0
    default_timeout_us: int = 0
    timeout_action: str = "reject"
    allow_timeout_override: bool = True
    priority_levels: int = 0
    default_priority_level: int = 0
    priority_queue_policy: tuple[tuple[int, QueuePolicy], ...] = ()

    @property
    def default_queue_policy(self) -> QueuePolicy:
        """The policy of every level without its own."""
        return QueuePolicy(
            self.max_queue_size,
            self.default_timeout_us,
            self.timeout_action,
            self.allow_timeout_override,
        )

    def queue_policy(self, level: int) -> QueuePolicy:
        """The policy applied to a priority level's queue."""
        return dict(self.priority_queue_policy).get(level, self.default_queue_policy)


@dataclass(frozen=True)
class InstanceGroupConfig:
    """[instance_group]: how many ONNX Runtime sessions execute batches concurrently, and the
    longest expected run (µs, from the load-time calibration) that executes on the event loop
    instead: such a batch pays no thread hand-off (~90 µs of CPU) and no contention for the GIL.
    The default, 1 ms, is asyncio's own timer resolution; 0 = always on the instance threads."""

    count: int = 1
    inline_max_us: int = 1000


@dataclass(frozen=True)
class OnnxRuntimeConfig:
    """[onnxruntime]: session options (0 threads = ONNX Runtime's own default)."""

    intra_op_threads: int = 1
    inter_op_threads: int = 1
    graph_optimization_level: str = "all"


@dataclass(frozen=True)
class VersionPolicy:
    """[version_policy]: serve the latest N versions, the listed ones, or all."""

    latest: int | None = 1
    specific: tuple[int, ...] = ()
    all: bool = False

    def select(self, available: list[int]) -> list[int]:
        """The versions to serve among those on disk, ascending."""
        ordered = sorted(available)
        if self.all:
            return ordered
        if self.specific:
            return [v for v in ordered if v in self.specific]
        return ordered[-(self.latest or 1) :]


@dataclass(frozen=True)
class WarmupInput:
    """One [model_warmup.inputs.<name>] table: the datatype and the dims without the batch
    dimension (None: the input's, until resolve_warmup fills them in), and where the data comes
    from: data is one of WARMUP_DATA, file a file in the model folder's warmup/ subfolder."""

    datatype: str | None = None
    dims: tuple[int, ...] | None = None
    data: str = "zero_data"
    file: str = ""


@dataclass(frozen=True)
class WarmupSample:
    """A [[model_warmup]] table (Triton's ModelWarmup): one request of batch_size rows (0 or 1
    for a model that does not batch), run count times on every instance before the version is
    READY, so that no request pays ONNX Runtime's first-run costs."""

    name: str
    batch_size: int = 1
    count: int = 1
    inputs: dict[str, WarmupInput] = field(default_factory=dict)


@dataclass(frozen=True)
class EnsembleStep:
    """One [[ensemble_scheduling.step]] (Triton's ModelEnsembling.Step): the composing model and
    version (LATEST_VERSION = its highest served), and which ensemble tensor feeds each of its
    inputs and which ensemble tensor each of its outputs becomes."""

    model_name: str
    model_version: int = LATEST_VERSION
    input_map: dict[str, str] = field(default_factory=dict)
    output_map: dict[str, str] = field(default_factory=dict)

    def label(self, index: int) -> str:
        """How messages name the step."""
        return f"ensemble_scheduling.step[{index}] (model '{self.model_name}')"


@dataclass(frozen=True)
class ModelConfig:
    """Everything that decides how a model is served."""

    name: str
    platform: str = ONNX_PLATFORM
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    max_batch_size: int | None = None
    dynamic_batching: DynamicBatchingConfig = field(default_factory=DynamicBatchingConfig)
    instance_group: InstanceGroupConfig = field(default_factory=InstanceGroupConfig)
    onnxruntime: OnnxRuntimeConfig = field(default_factory=OnnxRuntimeConfig)
    version_policy: VersionPolicy = field(default_factory=VersionPolicy)
    response_cache: bool = False
    """Answer a request equal to an earlier one from the server's response cache (Triton's
    response_cache.enable); needs the server's response_cache_bytes > 0."""
    model_warmup: tuple[WarmupSample, ...] = ()
    extensions: dict[str, Any] = field(default_factory=dict)
    ensemble: tuple[EnsembleStep, ...] = ()
    """The steps of an ensemble (platform "ensemble"); empty for an ONNX model."""

    @property
    def batching(self) -> bool:
        """Whether requests may be merged into batches."""
        return bool(self.max_batch_size) and self.dynamic_batching.enabled

    def input(self, name: str) -> TensorSpec | None:
        """The input called name, if any."""
        return next((t for t in self.inputs if t.name == name), None)

    def output(self, name: str) -> TensorSpec | None:
        """The output called name, if any."""
        return next((t for t in self.outputs if t.name == name), None)


_TOP_KEYS = {
    "name",
    "platform",
    "max_batch_size",
    "inputs",
    "outputs",
    "response_cache",
    "model_warmup",
}
_ENSEMBLE_KEY = "ensemble_scheduling"
# Keys an ensemble has no use for: it runs no session and batches nothing itself (each step joins
# its composing model's batcher). Predict's bindings apply: they fill an ensemble input.
_NOT_FOR_ENSEMBLES = ("dynamic_batching", "instance_group", "onnxruntime", "model_warmup")
_TENSOR_KEYS = {"name", "dtype", "shape", "optional"}
_OUTPUT_KEYS = _TENSOR_KEYS | {"label_filename"}


def _check_keys(source: str, table: str, raw: dict[str, Any], allowed: set[str]) -> None:
    """Reject keys the table does not define, naming the first unknown key."""
    for key in raw:
        if key not in allowed:
            where = f"[{table}] " if table else ""
            raise ModelConfigError(
                f"{source}: unknown key {where}'{key}'; allowed: {', '.join(sorted(allowed))}"
            )


def _typed(source: str, key: str, value: Any, kind: type) -> Any:
    """value if it has the expected TOML type (bool is not an int here)."""
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ModelConfigError(
            f"{source}: key '{key}' must be {kind.__name__}, got {type(value).__name__}"
        )
    return value


def _response_cache(source: str, value: Any) -> bool:
    """`response_cache = true`, or Triton's form as a table: `[response_cache] enable = true`."""
    if isinstance(value, dict):
        unknown = sorted(set(value) - {"enable"})
        if unknown:
            raise ModelConfigError(
                f"{source}: key 'response_cache.{unknown[0]}' is unknown; the table takes only "
                "enable = true|false (or write response_cache = true at the top)"
            )
        return _typed(source, "response_cache.enable", value.get("enable", False), bool)
    if not isinstance(value, bool):
        raise ModelConfigError(
            f"{source}: key 'response_cache' must be bool, got {type(value).__name__}; write "
            "response_cache = true at the top of config.toml (or [response_cache] enable = true)"
        )
    return value


def _non_negative(source: str, key: str, value: Any) -> int:
    """An int >= 0, and within the key's _RANGES entry when it has one."""
    _typed(source, key, value, int)
    bounds = _RANGES.get(key.rpartition(".")[2])
    if bounds is None:
        if value < 0:
            raise ModelConfigError(f"{source}: key '{key}' must be >= 0, got {value}")
        return value
    low, high, why = bounds
    if not low <= value <= high:
        raise ModelConfigError(
            f"{source}: key '{key}' must be in [{low}, {high}] ({why}), got {value}; "
            f"use a value in that range"
        )
    return value


def _int_list(source: str, key: str, value: Any) -> tuple[int, ...]:
    """A list of ints."""
    return tuple(_typed(source, key, v, int) for v in _typed(source, key, value, list))


def _dataclass_from(source: str, table: str, raw: Any, cls: type, base: Any = None) -> Any:
    """Build a flat dataclass from a TOML table whose keys are its fields; keys the table
    lacks take base's values when given, else the defaults."""
    raw = _typed(source, table, raw, dict)
    names = {f.name for f in dataclasses.fields(cls)}
    _check_keys(source, table, raw, names)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            continue
        value = raw[f.name]
        key = f"{table}.{f.name}"
        if f.type in ("int", "int | None"):
            values[f.name] = _non_negative(source, key, value)
        elif f.type == "bool":
            values[f.name] = _typed(source, key, value, bool)
        elif f.type == "str":
            values[f.name] = _typed(source, key, value, str)
        else:
            values[f.name] = _int_list(source, key, value)
    return cls(**values) if base is None else dataclasses.replace(base, **values)


def _tensor(source: str, key: str, raw: Any) -> TensorSpec:
    """One [[inputs]] / [[outputs]] entry."""
    raw = _typed(source, key, raw, dict)
    _check_keys(source, key, raw, _OUTPUT_KEYS if key == "outputs" else _TENSOR_KEYS)
    for required in ("name", "dtype", "shape"):
        if required not in raw:
            raise ModelConfigError(f"{source}: {key} entry lacks '{required}'")
    name = _typed(source, f"{key}.name", raw["name"], str)
    datatype = _typed(source, f"{key}.dtype", raw["dtype"], str)
    if datatype not in NUMPY_DTYPES:
        raise ModelConfigError(
            f"{source}: {key} '{name}' has dtype '{datatype}'; use one of {', '.join(NUMPY_DTYPES)}"
        )
    shape = _int_list(source, f"{key}.shape", raw["shape"])
    if any(d < -1 for d in shape):
        raise ModelConfigError(f"{source}: {key} '{name}' shape {list(shape)}: dims are -1 or >= 0")
    optional = _typed(source, f"{key}.optional", raw.get("optional", False), bool)
    label_filename = _typed(source, f"{key}.label_filename", raw.get("label_filename", ""), str)
    if "label_filename" in raw and not _inside_folder(label_filename):
        raise ModelConfigError(
            f"{source}: {key} '{name}' label_filename '{label_filename}' must name a file inside "
            'the model folder, relative to it, e.g. label_filename = "labels.txt"'
        )
    if label_filename and datatype not in CLASSIFIABLE_DATATYPES:
        raise ModelConfigError(
            f"{source}: {key} '{name}' has label_filename but is {datatype}; labels serve the "
            f"classification of {', '.join(CLASSIFIABLE_DATATYPES)} outputs only: remove "
            "label_filename"
        )
    return TensorSpec(name, datatype, shape, optional, label_filename)


def _inside_folder(file: str) -> bool:
    """Whether a file name from config.toml stays inside the folder it is relative to."""
    path = Path(file)
    return bool(file) and "\x00" not in file and not path.is_absolute() and ".." not in path.parts


def parse_model_config(text: str, *, source: str, default_name: str) -> ModelConfig:
    """Parse config.toml text; unknown keys fail, naming the key and the source file."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ModelConfigError(f"{source}: not valid TOML: {exc}") from None
    sections = {"instance_group": InstanceGroupConfig, "onnxruntime": OnnxRuntimeConfig}
    own = {"dynamic_batching", "version_policy", _ENSEMBLE_KEY}
    _check_keys(source, "", raw, _TOP_KEYS | set(sections) | own | MODEL_CONFIG_EXTENSIONS)
    name = _typed(source, "name", raw.get("name", default_name), str)
    if name != default_name:
        raise ModelConfigError(
            f"{source}: name '{name}' differs from its folder '{default_name}'; make them equal"
        )
    platform = _platform(source, raw)
    values: dict[str, Any] = {"name": name, "platform": platform}
    if platform == ENSEMBLE_PLATFORM:
        values["max_batch_size"] = 0
        values["ensemble"] = _ensemble_steps(source, raw[_ENSEMBLE_KEY])
    if "max_batch_size" in raw:
        values["max_batch_size"] = _non_negative(source, "max_batch_size", raw["max_batch_size"])
    if "response_cache" in raw:
        values["response_cache"] = _response_cache(source, raw["response_cache"])
    for key in ("inputs", "outputs"):
        if key in raw:
            entries = _typed(source, key, raw[key], list)
            values[key] = tuple(_tensor(source, key, e) for e in entries)
    for key, cls in sections.items():
        if key in raw:
            values[key] = _dataclass_from(source, key, raw[key], cls)
    if "dynamic_batching" in raw:
        values["dynamic_batching"] = _dynamic_batching(source, raw["dynamic_batching"])
    if "version_policy" in raw:
        values["version_policy"] = _version_policy(source, raw["version_policy"])
    if "model_warmup" in raw:
        values["model_warmup"] = _warmup_samples(source, raw["model_warmup"])
    values["extensions"] = {
        key: _typed(source, key, raw[key], list if key in _LIST_EXTENSIONS else dict)
        for key in MODEL_CONFIG_EXTENSIONS
        if key in raw
    }
    config = ModelConfig(**values)
    _check_semantics(source, config)
    if platform == ENSEMBLE_PLATFORM:
        check_ensemble(source, config)
    return config


def _platform(source: str, raw: dict[str, Any]) -> str:
    """The model's platform: ONNX_PLATFORM (the default) or ENSEMBLE_PLATFORM, whose keys differ
    (an ensemble needs ensemble_scheduling and its tensors, and takes no session settings)."""
    platform = _typed(source, "platform", raw.get("platform", ONNX_PLATFORM), str)
    if platform not in (ONNX_PLATFORM, ENSEMBLE_PLATFORM):
        raise ModelConfigError(
            f"{source}: platform '{platform}' is not served here; use \"{ONNX_PLATFORM}\" (the "
            f'default: a model.onnx in each version folder) or "{ENSEMBLE_PLATFORM}"'
        )
    if platform == ONNX_PLATFORM:
        if _ENSEMBLE_KEY in raw:
            raise ModelConfigError(
                f"{source}: key '{_ENSEMBLE_KEY}' belongs to ensembles; add platform = "
                f'"{ENSEMBLE_PLATFORM}" (and drop model.onnx), or remove [{_ENSEMBLE_KEY}]'
            )
        return platform
    for key in _NOT_FOR_ENSEMBLES:
        if key in raw:
            raise ModelConfigError(
                f"{source}: key '{key}' does not apply to an ensemble (platform = "
                f'"{ENSEMBLE_PLATFORM}"): its steps run on their composing models, which hold '
                f"their own settings; remove '{key}'"
            )
    for key in (_ENSEMBLE_KEY, "inputs", "outputs"):
        if key not in raw:
            what = "[[ensemble_scheduling.step]] tables" if key == _ENSEMBLE_KEY else f"[[{key}]]"
            raise ModelConfigError(
                f"{source}: an ensemble needs key '{key}' (there is no model file to take it "
                f"from); declare its {what}"
            )
    for entry in _typed(source, "inputs", raw["inputs"], list):
        if isinstance(entry, dict) and entry.get("optional"):
            raise ModelConfigError(
                f"{source}: ensemble input '{entry.get('name')}' is optional = true, which "
                "ensembles do not take here; remove optional (every request sends the input)"
            )
    return platform


def _ensemble_steps(source: str, raw: Any) -> tuple[EnsembleStep, ...]:
    """[[ensemble_scheduling.step]] tables, each typed (structure: check_ensemble)."""
    raw = _typed(source, _ENSEMBLE_KEY, raw, dict)
    _check_keys(source, _ENSEMBLE_KEY, raw, {"step"})
    tables = _typed(source, f"{_ENSEMBLE_KEY}.step", raw.get("step", []), list)
    if not tables:
        raise ModelConfigError(
            f"{source}: {_ENSEMBLE_KEY} has no step; add [[{_ENSEMBLE_KEY}.step]] tables, each "
            "with model_name, input_map and output_map"
        )
    return tuple(_ensemble_step(source, index, table) for index, table in enumerate(tables))


def _ensemble_step(source: str, index: int, raw: Any) -> EnsembleStep:
    """One step: model_name, model_version (-1 or absent: the latest served), and the maps."""
    key = f"{_ENSEMBLE_KEY}.step[{index}]"
    raw = _typed(source, key, raw, dict)
    _check_keys(source, key, raw, {"model_name", "model_version", "input_map", "output_map"})
    model = _typed(source, f"{key}.model_name", raw.get("model_name", ""), str)
    if not model:
        raise ModelConfigError(
            f"{source}: {key} has no model_name; name the composing model it runs"
        )
    problem = model_name_problem(model)
    if problem:
        raise ModelConfigError(
            f"{source}: {key}.model_name {model[:80]!r} is not a model name (a step runs only "
            f"models of this repository): {problem}"
        )
    version = _typed(source, f"{key}.model_version", raw.get("model_version", -1), int)
    if version != LATEST_VERSION and not 1 <= version <= 2**63 - 1:
        raise ModelConfigError(
            f"{source}: {key}.model_version {version}: give a version from 1, or -1 (or leave it "
            "out) for the latest served version"
        )
    maps = {}
    for part in ("input_map", "output_map"):
        table = _typed(source, f"{key}.{part}", raw.get(part, {}), dict)
        if not table:
            side = "input" if part == "input_map" else "output"
            raise ModelConfigError(
                f"{source}: {key}.{part} is missing or empty; map at least one of model "
                f"'{model}''s {side}s, e.g. {part} = {{ {side.upper()}0 = \"tensor\" }}"
            )
        maps[part] = {
            _typed(source, f"{key}.{part}", k, str): _typed(source, f"{key}.{part}.{k}", v, str)
            for k, v in table.items()
        }
    return EnsembleStep(model, version, maps["input_map"], maps["output_map"])


def check_ensemble(source: str, config: ModelConfig) -> None:
    """An ensemble's structure, as Triton checks it (no repository needed): every tensor a step
    reads is an ensemble input or some step's output, each tensor is written once, never over an
    ensemble input, every ensemble input is read and every ensemble output written, and the steps
    form no cycle."""
    inputs = {t.name for t in config.inputs}
    producer: dict[str, int] = {}
    for index, step in enumerate(config.ensemble):
        for output, tensor in step.output_map.items():
            where = f'{source}: {step.label(index)} output_map {output} = "{tensor}"'
            if tensor in inputs:
                raise ModelConfigError(
                    f"{where}: '{tensor}' is an ensemble input, which no step may write; map "
                    "the output to a tensor of its own"
                )
            if tensor in producer:
                first = config.ensemble[producer[tensor]].label(producer[tensor])
                raise ModelConfigError(
                    f"{where}: {first} already writes '{tensor}'; an ensemble tensor is written "
                    "by one step only, so give one of them another tensor name"
                )
            producer[tensor] = index
    read = set()
    for index, step in enumerate(config.ensemble):
        for name, tensor in step.input_map.items():
            read.add(tensor)
            if tensor not in inputs and tensor not in producer:
                raise ModelConfigError(
                    f'{source}: {step.label(index)} input_map {name} = "{tensor}": no '
                    f"ensemble input and no step output is called '{tensor}'; map the input to "
                    f"one of {', '.join(sorted(inputs | set(producer)))}"
                )
    for spec in config.inputs:
        if spec.name not in read:
            raise ModelConfigError(
                f"{source}: ensemble input '{spec.name}' is not used by any step; map it in a "
                "step's input_map, or remove it from [[inputs]]"
            )
    for spec in config.outputs:
        if spec.name not in producer:
            raise ModelConfigError(
                f"{source}: ensemble output '{spec.name}' is written by no step; map a step's "
                f'output to it (output_map = {{ OUTPUT0 = "{spec.name}" }}) or remove it from '
                "[[outputs]]"
            )
    _check_acyclic(source, config, producer)


def _check_acyclic(source: str, config: ModelConfig, producer: dict[str, int]) -> None:
    """Refuse steps that wait on each other (a cycle), naming the steps in it."""
    state: dict[int, str] = {}

    def visit(index: int, path: list[int]) -> None:
        if state.get(index) == "done":
            return
        if state.get(index) == "open":
            cycle = [*path[path.index(index) :], index]
            steps = " -> ".join(config.ensemble[i].label(i) for i in cycle)
            raise ModelConfigError(
                f"{source}: the steps form a cycle, so none of them can start: {steps}; break it "
                "by feeding one of them from an ensemble input or an earlier step"
            )
        state[index] = "open"
        for tensor in config.ensemble[index].input_map.values():
            if tensor in producer:
                visit(producer[tensor], [*path, index])
        state[index] = "done"

    for index in range(len(config.ensemble)):
        visit(index, [])


def _dynamic_batching(source: str, raw: Any) -> DynamicBatchingConfig:
    """[dynamic_batching] and its [dynamic_batching.priority_queue_policy.<level>] tables, whose
    missing keys take the default policy's (the flat keys') values."""
    raw = dict(_typed(source, "dynamic_batching", raw, dict))
    key = "dynamic_batching.priority_queue_policy"
    tables = _typed(source, key, raw.pop("priority_queue_policy", {}), dict)
    config = _dataclass_from(source, "dynamic_batching", raw, DynamicBatchingConfig)
    default = config.default_queue_policy
    levels = sorted(
        (
            _priority_level(source, level),
            _dataclass_from(source, f"{key}.{level}", table, QueuePolicy, default),
        )
        for level, table in tables.items()
    )
    return dataclasses.replace(config, priority_queue_policy=tuple(levels))


def _priority_level(source: str, key: str) -> int:
    """A [dynamic_batching.priority_queue_policy.<level>] table's level, written as an integer."""
    if not key.isdecimal() or str(int(key)) != key:
        raise ModelConfigError(
            f"{source}: [dynamic_batching.priority_queue_policy.{key}]: '{key}' is not a priority "
            f"level; name the table by its level, e.g. [dynamic_batching.priority_queue_policy.1]"
        )
    return int(key)


def _version_policy(source: str, raw: Any) -> VersionPolicy:
    """[version_policy]: exactly one of latest = N, specific = [..], all = true."""
    raw = _typed(source, "version_policy", raw, dict)
    _check_keys(source, "version_policy", raw, {"latest", "specific", "all"})
    if len(raw) != 1:
        raise ModelConfigError(
            f"{source}: [version_policy] needs exactly one of latest, specific, all"
        )
    if "latest" in raw:
        return VersionPolicy(latest=_non_negative(source, "version_policy.latest", raw["latest"]))
    if "specific" in raw:
        specific = _int_list(source, "version_policy.specific", raw["specific"])
        if not specific:
            raise ModelConfigError(f"{source}: version_policy.specific lists no version")
        if min(specific) < 1:
            raise ModelConfigError(
                f"{source}: version_policy.specific lists {min(specific)}: versions are numbers "
                "from 1 (the version folders' names); list those"
            )
        return VersionPolicy(latest=None, specific=specific)
    if _typed(source, "version_policy.all", raw["all"], bool) is not True:
        raise ModelConfigError(
            f"{source}: version_policy.all = false selects nothing: write all = true to serve "
            "every version, or latest = N or specific = [...] instead"
        )
    return VersionPolicy(latest=None, all=True)


def _warmup_samples(source: str, raw: Any) -> tuple[WarmupSample, ...]:
    """The [[model_warmup]] tables, each with a name of its own; what depends on the model's inputs
    and max_batch_size is checked once they are known (resolve_warmup)."""
    samples: list[WarmupSample] = []
    for index, table in enumerate(_typed(source, "model_warmup", raw, list)):
        key = f"model_warmup[{index}]"
        table = _typed(source, key, table, dict)
        _check_keys(source, key, table, {"name", "batch_size", "count", "inputs"})
        name = _typed(source, f"{key}.name", table.get("name", ""), str)
        if not name:
            raise ModelConfigError(
                f"{source}: {key}.name is missing or empty; give the sample a name, "
                'e.g. name = "zeros" (the load log and errors name samples by it)'
            )
        if any(s.name == name for s in samples):
            raise ModelConfigError(
                f"{source}: {key}.name '{name}' is already an earlier sample's; give every "
                "sample its own name"
            )
        batch_size = _non_negative(source, f"{key}.batch_size", table.get("batch_size", 1))
        count = _typed(source, f"{key}.count", table.get("count", 1), int)
        if not 1 <= count <= UINT32_MAX:
            raise ModelConfigError(
                f"{source}: {key}.count must be in [1, {UINT32_MAX}] (runs of the sample on each "
                f"instance; Triton's count = 0, one run, is count = 1 here), got {count}"
            )
        inputs = _typed(source, f"{key}.inputs", table.get("inputs", {}), dict)
        parsed = {n: _warmup_input(source, f"{key}.inputs.{n}", t) for n, t in inputs.items()}
        samples.append(WarmupSample(name, batch_size, count, parsed))
    return tuple(samples)


def _warmup_input(source: str, key: str, raw: Any) -> WarmupInput:
    """One [model_warmup.inputs.<name>] table: optional data_type and dims, and exactly one of
    zero_data = true, random_data = true, input_data_file = "<file in warmup/>"."""
    raw = _typed(source, key, raw, dict)
    _check_keys(source, key, raw, {"data_type", "dims", *WARMUP_DATA})
    given = [k for k in WARMUP_DATA if k in raw]
    if len(given) != 1:
        raise ModelConfigError(
            f"{source}: {key} needs exactly one of zero_data = true, random_data = true, "
            f'input_data_file = "<file in the model\'s warmup/ folder>"; it has '
            f"{', '.join(given) or 'none'}"
        )
    data = given[0]
    file = ""
    if data == "input_data_file":
        file = _typed(source, f"{key}.{data}", raw[data], str)
        if not _inside_folder(file):
            raise ModelConfigError(
                f"{source}: {key}.{data} '{file}' must name a file inside the model folder's "
                'warmup/ subfolder, relative to it, e.g. input_data_file = "x.bin"'
            )
    elif _typed(source, f"{key}.{data}", raw[data], bool) is not True:
        raise ModelConfigError(
            f"{source}: {key}.{data} = false gives the input no data; write {data} = true, or "
            "use zero_data, random_data or input_data_file instead"
        )
    datatype = None
    if "data_type" in raw:
        spelled = _typed(source, f"{key}.data_type", raw["data_type"], str)
        datatype = _WARMUP_DATATYPES.get(spelled)
        if datatype is None:
            raise ModelConfigError(
                f"{source}: {key}.data_type '{spelled}' is not a datatype; use one of "
                f"{', '.join(NUMPY_DTYPES)} (or Triton's TYPE_ names), or leave it out"
            )
    dims = None
    if "dims" in raw:
        dims = _int_list(source, f"{key}.dims", raw["dims"])
        if any(d < 0 for d in dims):
            raise ModelConfigError(
                f"{source}: {key}.dims {list(dims)}: each dim is a size >= 0 (the batch "
                "dimension left out); give sizes, or leave dims out for the input's own"
            )
    return WarmupInput(datatype, dims, data, file)


def resolve_warmup(config: ModelConfig, *, source: str) -> ModelConfig:
    """Check each warmup sample against the completed config (inputs, max_batch_size) and fill
    in what it leaves out: each input's data_type and dims (the input's, -1 read as 1), and zero
    data for each required input it does not name (optional ones keep their initializers, as in
    a request that leaves them out)."""
    samples = tuple(
        _resolve_sample(source, f"model_warmup[{index}]", sample, config)
        for index, sample in enumerate(config.model_warmup)
    )
    return dataclasses.replace(config, model_warmup=samples)


def _resolve_sample(
    source: str, key: str, sample: WarmupSample, config: ModelConfig
) -> WarmupSample:
    """One sample checked and completed (see resolve_warmup)."""
    limit = config.max_batch_size or 0
    if limit and not 1 <= sample.batch_size <= limit:
        raise ModelConfigError(
            f"{source}: {key}.batch_size {sample.batch_size} is outside [1, "
            f"max_batch_size={limit}]; a sample is one request, so give it 1 to {limit} rows"
        )
    if not limit and sample.batch_size > 1:
        raise ModelConfigError(
            f"{source}: {key}.batch_size {sample.batch_size}: model '{config.name}' does not batch "
            "(max_batch_size = 0), so a sample is one run of its inputs' dims; set batch_size = 1"
        )
    for name in sample.inputs:
        if config.input(name) is None:
            raise ModelConfigError(
                f"{source}: {key}.inputs.{name}: model '{config.name}' has no input '{name}'; "
                f"name one of {', '.join(t.name for t in config.inputs)}"
            )
    inputs = {
        spec.name: _resolve_input(
            source, f"{key}.inputs.{spec.name}", sample.inputs.get(spec.name), spec, bool(limit)
        )
        for spec in config.inputs
        if spec.name in sample.inputs or not spec.optional
    }
    for name, given in inputs.items():
        size = math.prod(given.dims) * (sample.batch_size or 1)
        if size * NUMPY_DTYPES[given.datatype].itemsize > MAX_WARMUP_INPUT_BYTES:
            raise ModelConfigError(
                f"{source}: {key}.inputs.{name}.dims {list(given.dims)} x batch_size "
                f"{sample.batch_size} takes {size * NUMPY_DTYPES[given.datatype].itemsize} "
                f"bytes, over the {MAX_WARMUP_INPUT_BYTES} a warmup input may take (no request "
                "can carry more: gRPC messages stop at 2 GiB); give smaller dims"
            )
    return dataclasses.replace(sample, inputs=inputs)


def _resolve_input(
    source: str, key: str, given: WarmupInput | None, spec: TensorSpec, batched: bool
) -> WarmupInput:
    """A sample's input with its datatype and dims filled in (zero data when not given)."""
    given = given or WarmupInput()
    if given.datatype not in (None, spec.datatype):
        raise ModelConfigError(
            f"{source}: {key}.data_type {given.datatype} differs from input '{spec.name}', which "
            f'is {spec.datatype}; write data_type = "{spec.datatype}" or leave it out'
        )
    if spec.datatype == "BYTES" and given.data == "random_data":
        raise ModelConfigError(
            f"{source}: {key}.random_data: input '{spec.name}' is BYTES (strings), for which no "
            "random data is made; use zero_data = true (empty strings) or input_data_file"
        )
    shape = spec.shape[1:] if batched else spec.shape
    dims = given.dims if given.dims is not None else tuple(1 if d == -1 else d for d in shape)
    if len(dims) != len(shape) or any(s not in (-1, d) for d, s in zip(dims, shape, strict=True)):
        raise ModelConfigError(
            f"{source}: {key}.dims {list(dims)} does not fit input '{spec.name}', whose dims are "
            f"{list(shape)} (-1 = any size; the batch dimension is left out); set dims to fit, "
            "or leave dims out"
        )
    return WarmupInput(spec.datatype, dims, given.data, given.file)


def _check_semantics(source: str, config: ModelConfig) -> None:
    """Cross-field rules: thread counts, optimization level, priorities and queue policies, batch
    shapes."""
    batching = config.dynamic_batching
    level = config.onnxruntime.graph_optimization_level
    if level not in GRAPH_OPTIMIZATION_LEVELS:
        raise ModelConfigError(
            f"{source}: onnxruntime.graph_optimization_level '{level}'; use one of "
            f"{', '.join(GRAPH_OPTIMIZATION_LEVELS)}"
        )
    if batching.priority_levels and not (
        1 <= batching.default_priority_level <= batching.priority_levels
    ):
        raise ModelConfigError(
            f"{source}: dynamic_batching.default_priority_level must be in "
            f"[1, {batching.priority_levels}] (priority_levels)"
        )
    _check_queue_policies(source, batching)
    if config.max_batch_size:
        for size in batching.preferred_batch_sizes:
            if not 1 <= size <= config.max_batch_size:
                raise ModelConfigError(
                    f"{source}: dynamic_batching.preferred_batch_sizes has {size}, outside "
                    f"[1, max_batch_size={config.max_batch_size}]"
                )
        for tensor in (*config.inputs, *config.outputs):
            if not _batchable(tensor):
                drop = _LEAVE_OUT.format(tensor.name) if tensor.optional else ""
                raise ModelConfigError(
                    f"{source}: tensor '{tensor.name}' shape {list(tensor.shape)} must start "
                    f"with -1 (the batch dimension) because max_batch_size > 0; make the first "
                    f"dimension -1 or set max_batch_size = 0{drop}"
                )


def _check_queue_policies(source: str, batching: DynamicBatchingConfig) -> None:
    """Each timeout_action is known; per-level policies need priority_levels and a level in
    [1, priority_levels]."""
    key = "dynamic_batching.priority_queue_policy"
    policies = [("dynamic_batching", batching.default_queue_policy)]
    policies += [(f"{key}.{level}", policy) for level, policy in batching.priority_queue_policy]
    for table, policy in policies:
        if policy.timeout_action not in TIMEOUT_ACTIONS:
            raise ModelConfigError(
                f"{source}: {table}.timeout_action '{policy.timeout_action}'; use one of "
                f"{', '.join(TIMEOUT_ACTIONS)}"
            )
    levels = batching.priority_levels
    if batching.priority_queue_policy and not levels:
        raise ModelConfigError(
            f"{source}: {key} needs dynamic_batching.priority_levels; set priority_levels (and "
            f"default_priority_level) or move the policy to the [dynamic_batching] keys"
        )
    for level, _ in batching.priority_queue_policy:
        if not 1 <= level <= levels:
            raise ModelConfigError(
                f"{source}: [{key}.{level}]: level {level} is outside [1, {levels}] "
                f"(priority_levels); use a level in that range or raise priority_levels"
            )


def load_model_config(model_dir: Path) -> ModelConfig:
    """Read <model_dir>/config.toml, or defaults when the file is absent."""
    path = model_dir / CONFIG_FILENAME
    try:
        text = path.read_text()
    except FileNotFoundError:
        text = ""
    config = parse_model_config(text, source=str(path), default_name=model_dir.name)
    outputs = tuple(_with_labels(str(path), model_dir, spec) for spec in config.outputs)
    return dataclasses.replace(config, outputs=outputs)


def _with_labels(source: str, model_dir: Path, spec: TensorSpec) -> TensorSpec:
    """The output with its labels file read: UTF-8, one label per line (as Triton reads it, an
    empty line is a class without a label; a trailing newline and CRLF endings are ignored)."""
    if not spec.label_filename:
        return spec
    path = model_dir / spec.label_filename
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ModelConfigError(
            f"{source}: output '{spec.name}' label_filename: {path} does not exist; put the "
            "labels there, one per line, or fix the name (it is relative to the model folder)"
        ) from None
    except OSError as exc:
        raise ModelConfigError(
            f"{source}: output '{spec.name}' label_filename: {path} cannot be read: "
            f"{exc.strerror or exc}"
        ) from None
    except UnicodeDecodeError as exc:
        raise ModelConfigError(
            f"{source}: output '{spec.name}' label_filename: {path} is not UTF-8 (byte "
            f"{exc.start}); save the labels file as UTF-8"
        ) from None
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    while lines and lines[-1] == "":
        lines.pop()
    labels = tuple(lines)
    return dataclasses.replace(spec, labels=labels)


def complete_config(
    config: ModelConfig,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    *,
    source: str,
) -> ModelConfig:
    """Fill missing inputs, outputs and max_batch_size from the ONNX signature, and check the rest.

    Declared tensors must exist in the model with the same datatype and rank, keep every dimension
    the model fixes, and be optional only where the model is. An absent max_batch_size becomes
    DEFAULT_MAX_BATCH_SIZE when every required input's and every output's first dim is variable;
    a model whose first dim is fixed cannot batch (Triton's onnxruntime backend fails such loads
    the same way). Filled optional inputs (initializers the model also takes as inputs) are those
    a batch can carry: with max_batch_size > 0, one whose first dim is fixed is left out and
    always runs on its initializer, rather than keeping the model from batching.
    """
    required = tuple(t for t in inputs if not t.optional)
    declared_out = config.outputs or tuple(outputs)
    max_batch = config.max_batch_size
    if max_batch is None:
        shaping = (*(config.inputs or required), *declared_out)
        max_batch = DEFAULT_MAX_BATCH_SIZE if all(_batchable(t) for t in shaping) else 0
    declared_in = config.inputs or tuple(
        t for t in inputs if not t.optional or not max_batch or _batchable(t)
    )
    _match(source, "input", declared_in, inputs, max_batch, every=bool(config.inputs))
    _match(source, "output", declared_out, outputs, max_batch, every=False)
    completed = dataclasses.replace(
        config, inputs=tuple(declared_in), outputs=tuple(declared_out), max_batch_size=max_batch
    )
    _check_semantics(source, completed)
    _check_label_counts(source, completed)
    return completed


def _check_label_counts(source: str, config: ModelConfig) -> None:
    """Warn when an output whose rows have a fixed number of classes (all of a row's elements,
    as Triton classifies it) has another number of labels: Triton loads such a model (an
    ImageNet labels file often has a 'background' line more), so it loads here too."""
    skip = 1 if config.max_batch_size else 0
    for spec in config.outputs:
        row = spec.shape[skip:]
        if not spec.label_filename or -1 in row:
            continue
        classes = math.prod(row)
        if classes != len(spec.labels):
            log.warning(
                "%s: output '%s' label_filename '%s' holds %d labels, but each row of the output "
                "has %d classes (dims %s): classes past the file's end get no label, and labels "
                "past the row's classes are never used; give one label per class, one per line",
                source,
                spec.name,
                spec.label_filename,
                len(spec.labels),
                classes,
                list(row),
            )


def _batchable(tensor: TensorSpec) -> bool:
    """Whether the tensor's first dimension is variable, so that it can be the batch dimension."""
    return bool(tensor.shape) and tensor.shape[0] == -1


def _match(
    source: str,
    kind: str,
    declared: tuple[TensorSpec, ...],
    model: list[TensorSpec],
    max_batch: int,
    every: bool,
) -> None:
    """Each declared tensor must match the model's; with every, each model input is declared."""
    by_name = {t.name: t for t in model}
    for tensor in declared:
        actual = by_name.get(tensor.name)
        if actual is None:
            raise ModelConfigError(
                f"{source}: {kind} '{tensor.name}' is not in the model; it has "
                f"{', '.join(by_name) or 'none'}"
            )
        if actual.datatype != tensor.datatype:
            raise ModelConfigError(
                f"{source}: {kind} '{tensor.name}' is {tensor.datatype} in the config but "
                f"{actual.datatype} in the model"
            )
        if tensor.optional and not actual.optional:
            why = "a graph input without an initializer" if kind == "input" else "every output is"
            raise ModelConfigError(
                f"{source}: {kind} '{tensor.name}' is optional in the config but the model "
                f"requires it ({why}); remove optional = true"
            )
        _match_shape(source, kind, tensor, actual, max_batch)
    if every:
        names = {t.name for t in declared}
        for tensor in model:
            if tensor.name not in names and not tensor.optional:
                raise ModelConfigError(
                    f"{source}: the model's input '{tensor.name}' is missing from [[inputs]]; "
                    f"declare it"
                )


def _match_shape(
    source: str, kind: str, tensor: TensorSpec, actual: TensorSpec, max_batch: int
) -> None:
    """The declared shape has the model's rank and keeps each dimension the model fixes (a -1 may
    be narrowed to a size, never the reverse); with max_batch > 0 the model's first dim is -1."""
    where = f"{source}: {kind} '{tensor.name}' shape {list(tensor.shape)}"
    if len(actual.shape) != len(tensor.shape):
        raise ModelConfigError(
            f"{where} does not fit the model's {list(actual.shape)}: the ranks differ; declare "
            f"{len(actual.shape)} dimensions"
        )
    fitted = [d if a == -1 else a for a, d in zip(actual.shape, tensor.shape, strict=True)]
    shape_fix = f"shape = {fitted}" if fitted != list(tensor.shape) else ""
    if max_batch and not _batchable(actual):
        fixes = " and ".join(filter(None, ("max_batch_size = 0", shape_fix)))
        if actual.optional:
            fixes += _LEAVE_OUT.format(tensor.name)
        raise ModelConfigError(
            f"{where}: the model's shape {list(actual.shape)} has no variable first (batch) "
            f"dimension, so it cannot be batched, but max_batch_size is {max_batch}; set {fixes}"
        )
    if shape_fix:
        raise ModelConfigError(
            f"{where} does not fit the model's {list(actual.shape)}: a dimension the model fixes "
            f"cannot be -1 or another size in the config; set {shape_fix}"
        )
