"""Predict bindings: config parsing and load-time validation, and block assembly on a real store."""

from __future__ import annotations

import numpy as np
import pytest

from featurestore.dtypes import DType, FeatureStatus
from featurestore.online_store import OnlineStore, StoreConfig, WriteBatch
from featurestore.registry import Entity, Feature, FeatureView, JoinKey
from server.model_config import ModelConfigError, TensorSpec, parse_model_config
from server.prediction_binding import compile_binding

HEAD = 'max_batch_size = 8\n[[inputs]]\nname = "x"\ndtype = "FP32"\nshape = [-1, 3]\n'
BINDING = """
[features]
entity = "user"
[[features.columns]]
features = ["stats:a", "stats:b"]
default = 1.5
[[features.columns]]
request = "amount"
[request_values]
amount = "float64"
"""


def binding(text: str, width: int = 3):
    head = HEAD.replace("-1, 3", f"-1, {width}")
    config = parse_model_config(head + text, source="m/config.toml", default_name="m")
    config = type(config)(**{**config.__dict__, "outputs": (TensorSpec("y", "FP32", (-1, 1)),)})
    return compile_binding(config, "m/config.toml")


def test_no_features_table_means_no_binding() -> None:
    assert binding("") is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (BINDING + '[[transforms]]\nop = "nope"\ninputs = ["amount"]\n', "transforms[0]"),
        (BINDING.replace('amount = "float64"', 'amount = "text"'), "request_values.amount"),
        (BINDING.replace('request = "amount"', 'request = "amt"'), "'amt' is not declared"),
        (BINDING.replace("stats:a", "stats"), "names a view"),
        (BINDING.replace("default = 1.5", 'default = "x"'), "default must be a number"),
        (BINDING.replace('entity = "user"', 'colour = "red"'), "'colour'"),
        ('[[transforms]]\nop = "log1p"\ninputs = ["a"]\n', "needs a [features] table"),
        (BINDING + '[[transforms]]\nop = "log1p"\ninputs = ["other"]\n', "'other'"),
    ],
)
def test_bad_configs_fail_at_load_naming_the_field(text: str, message: str) -> None:
    with pytest.raises(ModelConfigError) as info:
        binding(text)
    assert message in str(info.value) and "m/config.toml" in str(info.value)


def test_width_must_match_the_model_input() -> None:
    with pytest.raises(ModelConfigError, match=r"yields 3 columns .* is 4 wide"):
        binding(BINDING, width=4)


def test_transform_outputs_are_the_input_columns() -> None:
    b = binding(
        BINDING + '[[transforms]]\nop = "clip"\ninputs = ["amount"]\nparams = {lo = 0, hi = 2}\n'
        '[[transforms]]\nop = "standardize"\ninputs = ["stats:a", "stats:b"]\n'
        "params = {mean = 1.0, std = 2.0}\n"
    )
    assert b.outputs == ["amount", "stats:a", "stats:b"]
    out = b.transform(np.array([[3.0, 5.0, 7.0]]))
    np.testing.assert_array_equal(out, np.array([[2.0, 1.0, 2.0]], np.float32))


def test_assemble_fills_defaults_fails_required_rows_and_tracks_event_times(tmp_path) -> None:
    store = OnlineStore(StoreConfig(path=tmp_path, sync=False))
    store.registry.apply(
        [Entity("user", (JoinKey("id", DType.INT64),))],
        [
            FeatureView("stats", "user", (Feature("a", DType.FLOAT32), Feature("b", DType.INT64))),
            FeatureView("risk", "user", (Feature("r", DType.FLOAT64),)),
        ],
    )
    store.write(WriteBatch("stats", {"id": np.array([1, 2])}, np.array([100, 50]),
                           {"a": np.array([0.5, 0.25], np.float32), "b": np.array([7, 8])},
                           {"a": np.array([False, True])}))  # fmt: skip
    store.write(WriteBatch("risk", {"id": np.array([1, 3])}, np.array([70, 90]),
                           {"r": np.array([0.1, 0.2])}))  # fmt: skip
    b = binding(
        BINDING.replace("[[features.columns]]\nrequest", '[[features.columns]]\nfeature = "risk:r"'
                        "\n[[features.columns]]\nrequest"),
        width=4,
    )  # fmt: skip
    keys = {"id": np.array([1, 2, 3])}
    results = [store.read(r.view, keys, r.features, r.version) for r in b.reads]
    out = b.assemble(results, {"amount": np.array([9.0, 8.0, 7.0])}, 3)
    assert out.block[0].tolist() == [0.5, 7.0, 0.1, 9.0]
    assert out.block[1, [0, 1, 3]].tolist() == [1.5, 8.0, 8.0]
    assert out.block[2].tolist() == [1.5, 1.5, 0.2, 7.0]
    assert out.failed.tolist() == [False, True, False]
    assert out.failed_features[out.first_bad[1]] == "risk:r"
    assert out.failed_status[1] == FeatureStatus.NOT_FOUND
    assert out.oldest_event_us.tolist() == [70, 50, 90]
    assert out.views == ["stats@1", "risk@1"]
    fills = {f.feature: f for f in out.fills}
    assert (
        fills["stats:a"].statuses.tolist() == [1, 3, 2]
        and fills["stats:a"].filled_with == "default=1.5"
    )
    assert fills["risk:r"].filled_with == "required: row not scored"
    store.close()
