"""config.toml parsing, unknown-key rejection, extension tables, and completion from ONNX."""

import dataclasses
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from benchmarks.model_zoo import add_sub_model, graph_model, mlp_model, write_model
from server.inference_servicer import config_proto
from server.model_config import (
    DEFAULT_MAX_BATCH_SIZE,
    INT32_MAX,
    MAX_INSTANCES,
    MAX_PRIORITY_LEVELS,
    UINT32_MAX,
    ModelConfig,
    ModelConfigError,
    QueuePolicy,
    TensorSpec,
    VersionPolicy,
    complete_config,
    load_model_config,
    parse_model_config,
)
from server.onnx_runner import OnnxRunner

FULL = """
name = "m"
max_batch_size = 32

[[inputs]]
name = "x"
dtype = "FP32"
shape = [-1, 32]

[[outputs]]
name = "y"
dtype = "FP32"
shape = [-1, 1]

[dynamic_batching]
enabled = true
max_queue_delay_us = 500
preferred_batch_sizes = [8, 16]
max_queue_size = 100
default_timeout_us = 2000
priority_levels = 2
default_priority_level = 2

[instance_group]
count = 2
inline_max_us = 0

[onnxruntime]
intra_op_threads = 2
inter_op_threads = 1
graph_optimization_level = "basic"

[version_policy]
specific = [1, 3]

[features]
view = "users"
columns = ["age", "spend"]
"""


def test_full_config_parses_every_section() -> None:
    config = parse_model_config(FULL, source="m/config.toml", default_name="m")
    assert config.max_batch_size == 32
    assert config.inputs == (TensorSpec("x", "FP32", (-1, 32)),)
    assert config.dynamic_batching.preferred_batch_sizes == (8, 16)
    assert config.dynamic_batching.default_timeout_us == 2000
    assert config.dynamic_batching.default_priority_level == 2
    assert config.instance_group.count == 2
    assert config.instance_group.inline_max_us == 0
    assert config.onnxruntime.graph_optimization_level == "basic"
    assert config.version_policy.select([1, 2, 3, 4]) == [1, 3]
    assert config.extensions == {"features": {"view": "users", "columns": ["age", "spend"]}}
    assert config.batching


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("max_batch = 3", "'max_batch'"),
        ("[dynamic_batching]\nmax_delay_us = 3", "[dynamic_batching] 'max_delay_us'"),
        ("[onnxruntime]\nthreads = 1", "[onnxruntime] 'threads'"),
        ("[labels]\na = 1", "'labels'"),
        ('[[inputs]]\nname = "x"\ndtype = "FP32"\nshape = [-1]\nformat = "nchw"', "'format'"),
        (
            '[[inputs]]\nname = "x"\ndtype = "FP32"\nshape = [-1]\nlabel_filename = "l.txt"',
            "[inputs] 'label_filename'",
        ),
    ],
)
def test_unknown_keys_fail_naming_key_and_file(text: str, needle: str) -> None:
    with pytest.raises(ModelConfigError) as info:
        parse_model_config(text, source="models/m/config.toml", default_name="m")
    assert needle in str(info.value)
    assert "models/m/config.toml" in str(info.value)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('[onnxruntime]\ngraph_optimization_level = "max"', "graph_optimization_level"),
        ("max_batch_size = -1", "max_batch_size"),
        ('max_batch_size = "8"', "must be int"),
        ("max_batch_size = 8\n[dynamic_batching]\npreferred_batch_sizes = [16]", "16"),
        ('max_batch_size = 8\n[[inputs]]\nname="x"\ndtype="FP32"\nshape=[4]', "must start"),
        ('[[inputs]]\nname="x"\ndtype="FLOAT"\nshape=[4]', "FLOAT"),
        ("[dynamic_batching]\npriority_levels = 2", "default_priority_level"),
        ("[instance_group]\ninline_max_us = -1", "inline_max_us"),
        ("[version_policy]\nlatest = 1\nall = true", "exactly one"),
        ("[version_policy]\nall = false", "version_policy.all = false selects nothing"),
        ('name = "other"', "differs"),
        (
            '[[outputs]]\nname="y"\ndtype="FP32"\nshape=[4]\nlabel_filename=3',
            "key 'outputs.label_filename' must be str, got int",
        ),
        (
            '[[outputs]]\nname="y"\ndtype="BYTES"\nshape=[4]\nlabel_filename="l.txt"',
            "outputs 'y' has label_filename but is BYTES; labels serve the classification of "
            "UINT8, UINT16, UINT32, UINT64, INT8, INT16, INT32, INT64, FP32, FP64 outputs only: "
            "remove label_filename",
        ),
        (
            '[[outputs]]\nname="y"\ndtype="FP32"\nshape=[4]\nlabel_filename="a/../../l.txt"',
            "label_filename 'a/../../l.txt' must name a file inside the model folder",
        ),
    ],
)
def test_invalid_values_fail_with_the_field(text: str, needle: str) -> None:
    with pytest.raises(ModelConfigError) as info:
        parse_model_config(text, source="c.toml", default_name="m")
    assert needle in str(info.value)


def test_missing_config_is_completed_from_the_onnx_signature(tmp_path: Path) -> None:
    model_dir = write_model(tmp_path, "mlp", mlp_model())
    config = load_model_config(model_dir)
    assert config.inputs == () and config.max_batch_size is None
    runner = OnnxRunner(model_dir / "1" / "model.onnx", config.onnxruntime, 1)
    completed = complete_config(config, runner.inputs, runner.outputs, source="x")
    assert completed.inputs == (TensorSpec("x", "FP32", (-1, 32)),)
    assert completed.outputs == (TensorSpec("y", "FP32", (-1, 1)),)
    assert completed.max_batch_size == DEFAULT_MAX_BATCH_SIZE
    assert completed.version_policy == VersionPolicy()


def test_declared_tensors_must_match_the_model() -> None:
    signature = [TensorSpec("x", "FP32", (-1, 32))]
    out = [TensorSpec("y", "FP32", (-1, 1))]
    wrong_type = parse_model_config(
        '[[inputs]]\nname="x"\ndtype="FP64"\nshape=[-1, 32]', source="c.toml", default_name="m"
    )
    with pytest.raises(ModelConfigError, match="FP64 in the config but FP32"):
        complete_config(wrong_type, signature, out, source="c.toml")
    wrong_name = parse_model_config(
        '[[outputs]]\nname="z"\ndtype="FP32"\nshape=[-1, 1]', source="c.toml", default_name="m"
    )
    with pytest.raises(ModelConfigError, match="'z' is not in the model"):
        complete_config(wrong_name, signature, out, source="c.toml")
    wrong_shape = parse_model_config(
        '[[inputs]]\nname="x"\ndtype="FP32"\nshape=[-1, 16]', source="c.toml", default_name="m"
    )
    with pytest.raises(ModelConfigError, match="does not fit"):
        complete_config(wrong_shape, signature, out, source="c.toml")


def test_version_policies_select_versions() -> None:
    assert VersionPolicy().select([3, 1, 2]) == [3]
    assert VersionPolicy(latest=2).select([3, 1, 2]) == [2, 3]
    assert VersionPolicy(latest=None, all=True).select([2, 1]) == [1, 2]
    assert VersionPolicy(latest=None, specific=(1, 9)).select([1, 2]) == [1]


QUEUE_POLICIES = """
[dynamic_batching]
max_queue_size = 256
default_timeout_us = 50000
priority_levels = 3
default_priority_level = 3

[dynamic_batching.priority_queue_policy.1]
max_queue_size = 16
default_timeout_us = 1000
timeout_action = "delay"
allow_timeout_override = false

[dynamic_batching.priority_queue_policy.2]
max_queue_size = 32
"""


def test_priority_queue_policies_take_missing_keys_from_the_default_policy() -> None:
    batching = parse_model_config(
        QUEUE_POLICIES, source="c.toml", default_name="m"
    ).dynamic_batching
    default = QueuePolicy(256, 50000, "reject", True)
    assert batching.default_queue_policy == default
    assert batching.queue_policy(1) == QueuePolicy(16, 1000, "delay", False)
    assert batching.queue_policy(2) == QueuePolicy(32, 50000, "reject", True)
    assert batching.queue_policy(3) == default
    assert hash(batching) == hash(dataclasses.replace(batching))


def test_queue_policy_defaults_keep_todays_behaviour() -> None:
    batching = parse_model_config("", source="c.toml", default_name="m").dynamic_batching
    assert batching.default_queue_policy == QueuePolicy(0, 0, "reject", True)
    assert batching.priority_queue_policy == ()


LEVELS = "[dynamic_batching]\npriority_levels = 2\ndefault_priority_level = 1\n"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (
            LEVELS + "[dynamic_batching.priority_queue_policy.1]\nmax_queue = 3",
            "unknown key [dynamic_batching.priority_queue_policy.1] 'max_queue'",
        ),
        (
            LEVELS + "[dynamic_batching.priority_queue_policy.3]\nmax_queue_size = 3",
            "level 3 is outside [1, 2] (priority_levels)",
        ),
        (
            LEVELS + "[dynamic_batching.priority_queue_policy.0]\nmax_queue_size = 3",
            "level 0 is outside [1, 2]",
        ),
        (
            LEVELS + "[dynamic_batching.priority_queue_policy.high]\nmax_queue_size = 3",
            "'high' is not a priority level",
        ),
        (
            "[dynamic_batching.priority_queue_policy.1]\nmax_queue_size = 3",
            "dynamic_batching.priority_queue_policy needs dynamic_batching.priority_levels",
        ),
        (
            '[dynamic_batching]\ntimeout_action = "drop"',
            "dynamic_batching.timeout_action 'drop'; use one of reject, delay",
        ),
        (
            LEVELS + '[dynamic_batching.priority_queue_policy.2]\ntimeout_action = "DELAY"',
            "dynamic_batching.priority_queue_policy.2.timeout_action 'DELAY'",
        ),
        (
            LEVELS + "[dynamic_batching.priority_queue_policy.1]\nmax_queue_size = -1",
            "'dynamic_batching.priority_queue_policy.1.max_queue_size' must be in [0, 4294967295]",
        ),
        (
            LEVELS + "[dynamic_batching.priority_queue_policy.1]\ndefault_timeout_us = -5",
            "'dynamic_batching.priority_queue_policy.1.default_timeout_us' must be >= 0",
        ),
        (
            "[dynamic_batching]\nallow_timeout_override = 1",
            "'dynamic_batching.allow_timeout_override' must be bool",
        ),
        (
            LEVELS + "priority_queue_policy = 3",
            "'dynamic_batching.priority_queue_policy' must be dict",
        ),
    ],
    ids=[
        "unknown-key",
        "level-above-priority-levels",
        "level-zero",
        "level-not-an-integer",
        "without-priority-levels",
        "unknown-timeout-action",
        "unknown-level-timeout-action",
        "negative-max-queue-size",
        "negative-timeout",
        "override-not-bool",
        "policy-not-a-table",
    ],
)
def test_invalid_queue_policies_fail_naming_file_and_key(text: str, needle: str) -> None:
    with pytest.raises(ModelConfigError) as info:
        parse_model_config(text, source="models/m/config.toml", default_name="m")
    assert needle in str(info.value)
    assert str(info.value).startswith("models/m/config.toml: ")


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (f"max_batch_size = {INT32_MAX + 1}", "'max_batch_size' must be in [0, 2147483647]"),
        (
            f"[dynamic_batching]\nmax_queue_size = {UINT32_MAX + 1}",
            "'dynamic_batching.max_queue_size' must be in [0, 4294967295]",
        ),
        (
            LEVELS
            + f"[dynamic_batching.priority_queue_policy.1]\nmax_queue_size = {UINT32_MAX + 1}",
            "'dynamic_batching.priority_queue_policy.1.max_queue_size' must be in [0, 4294967295]",
        ),
        (
            f"[version_policy]\nlatest = {UINT32_MAX + 1}",
            "'version_policy.latest' must be in [1, 4294967295]",
        ),
    ],
    ids=["max-batch-size", "max-queue-size", "level-max-queue-size", "latest"],
)
def test_values_beyond_the_model_config_proto_fail_at_load(text: str, needle: str) -> None:
    with pytest.raises(ModelConfigError) as info:
        parse_model_config(text, source="c.toml", default_name="m")
    assert needle in str(info.value)
    assert "model_config.proto" in str(info.value)
    assert "use a value in that range" in str(info.value)


def test_the_largest_accepted_values_convert_to_the_model_config_proto() -> None:
    text = f"""
max_batch_size = {INT32_MAX}
[dynamic_batching]
preferred_batch_sizes = [{INT32_MAX}]
max_queue_size = {UINT32_MAX}
max_queue_delay_us = 9223372036854775807
default_timeout_us = 9223372036854775807
priority_levels = {MAX_PRIORITY_LEVELS}
default_priority_level = {MAX_PRIORITY_LEVELS}
[dynamic_batching.priority_queue_policy.{MAX_PRIORITY_LEVELS}]
max_queue_size = {UINT32_MAX}
[instance_group]
count = {MAX_INSTANCES}
[version_policy]
latest = {UINT32_MAX}
"""
    message = config_proto(parse_model_config(text, source="c.toml", default_name="m"))
    assert message.max_batch_size == INT32_MAX
    assert message.dynamic_batching.default_queue_policy.max_queue_size == UINT32_MAX
    assert message.dynamic_batching.priority_levels == MAX_PRIORITY_LEVELS
    assert message.version_policy.latest.num_versions == UINT32_MAX


def test_priority_levels_are_capped() -> None:
    text = f"[dynamic_batching]\npriority_levels = {MAX_PRIORITY_LEVELS + 1}\n"
    text += "default_priority_level = 1\n"
    with pytest.raises(ModelConfigError) as info:
        parse_model_config(text, source="c.toml", default_name="m")
    assert f"'dynamic_batching.priority_levels' must be in [0, {MAX_PRIORITY_LEVELS}]" in str(
        info.value
    )


def test_specific_versions_start_at_one() -> None:
    with pytest.raises(ModelConfigError) as info:
        parse_model_config("[version_policy]\nspecific = [2, 0]", source="c.toml", default_name="m")
    assert "version_policy.specific lists 0: versions are numbers from 1" in str(info.value)


@pytest.mark.parametrize("count", [-1, 0, MAX_INSTANCES + 1])
def test_instance_count_out_of_range_fails_with_one_message(count: int) -> None:
    with pytest.raises(ModelConfigError) as info:
        parse_model_config(f"[instance_group]\ncount = {count}", source="c.toml", default_name="m")
    assert f"'instance_group.count' must be in [1, {MAX_INSTANCES}] (" in str(info.value)
    assert f"got {count};" in str(info.value)


def _identity(shape: list) -> onnx.ModelProto:
    """x -> y unchanged, both of the given ONNX shape (strings are symbolic dims)."""
    return graph_model(
        [helper.make_node("Identity", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
    )


def _complete(tmp_path: Path, model: onnx.ModelProto, text: str) -> ModelConfig:
    """The config text completed against the real ONNX Runtime signature of model."""
    model_dir = write_model(tmp_path, "m", model, config_toml=text)
    config = load_model_config(model_dir)
    runner = OnnxRunner(model_dir / "1" / "model.onnx", config.onnxruntime, 1)
    return complete_config(config, runner.inputs, runner.outputs, source="c.toml")


def _tensors(shape: list[int]) -> str:
    """[[inputs]] x and [[outputs]] y, FP32 of the given config shape."""
    return (
        f'[[inputs]]\nname = "x"\ndtype = "FP32"\nshape = {shape}\n'
        f'[[outputs]]\nname = "y"\ndtype = "FP32"\nshape = {shape}\n'
    )


@pytest.mark.parametrize(
    ("model_shape", "text", "needle"),
    [
        (
            [4, 3],
            "max_batch_size = 8\n" + _tensors([-1, 3]),
            "cannot be batched, but max_batch_size is 8; set max_batch_size = 0 and shape = [4, 3]",
        ),
        ([4, 3], "max_batch_size = 8\n", "cannot be batched, but max_batch_size is 8; set "),
        (
            [4, 3],
            "max_batch_size = 0\n" + _tensors([-1, 3]),
            "input 'x' shape [-1, 3] does not fit the model's [4, 3]: a dimension the model "
            "fixes cannot be -1 or another size in the config; set shape = [4, 3]",
        ),
        (
            ["N", 3],
            _tensors([-1, -1]),
            "input 'x' shape [-1, -1] does not fit the model's [-1, 3]",
        ),
        (["N", 3], _tensors([-1, 4]), "set shape = [-1, 3]"),
        (["N", 3], _tensors([-1, 3, 1]), "the ranks differ; declare 2 dimensions"),
    ],
    ids=["batch-over-fixed", "batch-undeclared", "minus-one-over-fixed", "looser", "other", "rank"],
)
def test_config_shapes_must_keep_the_models_fixed_dims(
    tmp_path: Path, model_shape: list, text: str, needle: str
) -> None:
    with pytest.raises(ModelConfigError) as info:
        _complete(tmp_path, _identity(model_shape), text)
    assert needle in str(info.value)
    assert str(info.value).startswith("c.toml: ")


def test_config_shapes_may_narrow_the_models_variable_dims(tmp_path: Path) -> None:
    fixed = _complete(tmp_path / "a", _identity([4, 3]), "")
    assert fixed.max_batch_size == 0
    assert fixed.inputs == (TensorSpec("x", "FP32", (4, 3)),)
    narrowed = _complete(tmp_path / "b", _identity(["N", "M"]), _tensors([2, 3]))
    assert narrowed.max_batch_size == 0
    assert narrowed.inputs == (TensorSpec("x", "FP32", (2, 3)),)
    batched = _complete(tmp_path / "c", _identity(["N", "M"]), _tensors([-1, 3]))
    assert batched.max_batch_size == DEFAULT_MAX_BATCH_SIZE


def test_an_input_the_model_requires_cannot_be_optional(tmp_path: Path) -> None:
    text = (
        '[[inputs]]\nname = "INPUT0"\ndtype = "FP32"\nshape = [-1, 16]\n'
        '[[inputs]]\nname = "INPUT1"\ndtype = "FP32"\nshape = [-1, 16]\noptional = true\n'
    )
    with pytest.raises(ModelConfigError) as info:
        _complete(tmp_path, add_sub_model(), text)
    assert "input 'INPUT1' is optional in the config but the model requires it" in str(info.value)
    assert "remove optional = true" in str(info.value)
    output = '[[outputs]]\nname = "OUTPUT0"\ndtype = "FP32"\nshape = [-1, 16]\noptional = true\n'
    with pytest.raises(ModelConfigError, match="output 'OUTPUT0' is optional in the config"):
        _complete(tmp_path / "out", add_sub_model(), output)
