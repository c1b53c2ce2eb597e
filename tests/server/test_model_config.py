"""config.toml parsing, unknown-key rejection, extension tables, and completion from ONNX."""

import dataclasses
from pathlib import Path

import pytest

from benchmarks.model_zoo import mlp_model, write_model
from server.model_config import (
    DEFAULT_MAX_BATCH_SIZE,
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
        ('name = "other"', "differs"),
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
            "'dynamic_batching.priority_queue_policy.1.max_queue_size' must be >= 0",
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
