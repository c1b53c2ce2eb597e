"""Predict bindings: config parsing and load-time validation, and block assembly on a real store."""

from __future__ import annotations

import math

import numpy as np
import pytest

from featurestore.dtypes import DType, FeatureStatus
from featurestore.errors import ConflictError
from featurestore.online_store import OnlineStore, StoreConfig, WriteBatch
from featurestore.registry import Entity, Feature, FeatureView, JoinKey
from featurestore.transforms import apply_chain, transforms_from_config
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
        (
            BINDING.replace("[features]", '[features]\nservice = "fraud"').replace(
                "stats:b", "stats@2:b"
            ),
            "'stats@2:b' pins a version, but features.service 'fraud' decides",
        ),
        (BINDING.replace("[features]", "[features]\nservice = 3"), "features.service must be"),
        (BINDING.replace("[features]", '[features]\nservice = ""'), "features.service must be"),
    ],
)
def test_bad_configs_fail_at_load_naming_the_field(text: str, message: str) -> None:
    with pytest.raises(ModelConfigError) as info:
        binding(text)
    assert message in str(info.value) and "m/config.toml" in str(info.value)


def test_width_must_match_the_model_input() -> None:
    with pytest.raises(ModelConfigError, match=r"yields 3 columns .* is 4 wide"):
        binding(BINDING, width=4)


PARTLY_TRANSFORMED = (
    '[[transforms]]\nop = "standardize"\ninputs = ["stats:b"]\nparams = {mean = 1.0, std = 2.0}\n'
    '[[transforms]]\nop = "log1p"\ninputs = ["amount"]\n'
)


@pytest.mark.parametrize("width", [3, -1])
def test_a_bound_column_no_transform_reads_fails_at_load_without_outputs(width: int) -> None:
    # It used to fail as "yields 2 columns, but input 'x' is 3 wide", or, with a variable
    # width, to load and score every row without it.
    with pytest.raises(ModelConfigError) as info:
        binding(BINDING + PARTLY_TRANSFORMED, width=width)
    message = str(info.value)
    assert "bound column 'stats:a': no transform reads it" in message
    assert "list it in [features] outputs = [...] in the order the model expects" in message
    listed = BINDING.replace(
        'entity = "user"', 'entity = "user"\noutputs = ["stats:a", "stats:b", "amount"]'
    )
    b = binding(listed + PARTLY_TRANSFORMED, width=width)
    out = b.transform(np.array([[3.0, 5.0, math.e - 1]]))
    np.testing.assert_allclose(out, np.array([[3.0, 2.0, 1.0]], np.float32))


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


TYPED_HEAD = """
[features]
entity = "user"
[[features.columns]]
feature = "stats:a"
default = 0.5
[[features.columns]]
feature = "profile:merchant"
default = 7
[[features.columns]]
feature = "profile:city"
default = "unknown"
[[features.columns]]
request = "ts"
[[features.columns]]
request = "channel"
[request_values]
ts = "int64"
channel = "string"
"""
TYPED_CHAIN = [
    {"op": "standardize", "inputs": ["stats:a"], "params": {"mean": 0.25, "std": 2.0}},
    {"op": "hash_bucket", "inputs": ["profile:merchant", "channel"],
     "params": {"buckets": [97, 5]}},
    {"op": "one_hot", "inputs": ["profile:city"], "output": "city",
     "params": {"vocabulary": ["oslo", "lima"]}},
    {"op": "hour_cyclical", "inputs": ["ts"], "output": "hour"},
    {"op": "is_weekend", "inputs": ["ts"], "output": "weekend"},
]  # fmt: skip
TYPED_WIDTH = 1 + 2 + 3 + 2 + 1


def _toml(entry: dict) -> str:
    def value(v) -> str:
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + "}"
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return f'"{v}"' if isinstance(v, str) else repr(v)

    return "[[transforms]]\n" + "".join(f"{k} = {value(v)}\n" for k, v in entry.items())


def typed_binding(head: str = TYPED_HEAD, chain: list[dict] = TYPED_CHAIN):
    return binding(head + "".join(_toml(t) for t in chain), width=TYPED_WIDTH)


def test_time_and_key_ops_read_exact_int64_and_string_columns(tmp_path) -> None:
    store = OnlineStore(StoreConfig(path=tmp_path, sync=False))
    profile = (Feature("merchant", DType.INT64), Feature("city", DType.STRING))
    store.registry.apply(
        [Entity("user", (JoinKey("id", DType.INT64),))],
        [
            FeatureView("stats", "user", (Feature("a", DType.FLOAT32),)),
            FeatureView("profile", "user", profile),
        ],
    )
    big = 2**53 + 1
    store.write(WriteBatch("stats", {"id": np.array([1, 2, 3])}, np.array([5, 5, 5]),
                           {"a": np.array([1.0, 2.0, 3.0], np.float32)}))  # fmt: skip
    store.write(WriteBatch("profile", {"id": np.array([1, 2])}, np.array([5, 5]),
                           {"merchant": np.array([big, 42]),
                            "city": np.array(["lima", "paris"], object)}))  # fmt: skip
    b = typed_binding()
    assert b.typed == {"profile:merchant", "profile:city", "ts", "channel"}
    ts = np.array([1_700_000_000_000_000, 1_700_400_000_000_000, 0], np.int64)
    channel = np.array(["web", "app", "web"], object)
    keys = {"id": np.array([1, 2, 3])}
    results = [store.read(r.view, keys, r.features, r.version) for r in b.reads]
    out = b.assemble(results, {"ts": ts, "channel": channel}, 3)
    assert out.typed["profile:merchant"].tolist() == [big, 42, 7]
    assert out.typed["profile:city"].tolist() == ["lima", "paris", "unknown"]
    got = b.transform(out.block, out.typed)

    columns = {
        "stats:a": np.array([1.0, 2.0, 3.0]),
        "profile:merchant": np.array([big, 42, 7], np.int64),
        "profile:city": np.array(["lima", "paris", "unknown"], object),
        "ts": ts,
        "channel": channel,
    }
    steps = transforms_from_config(TYPED_CHAIN)
    expected = apply_chain(steps, columns, b.outputs, use_reference=True)
    assert got.shape == (3, TYPED_WIDTH)
    np.testing.assert_array_equal(got, expected)
    required = typed_binding(TYPED_HEAD.replace('default = "unknown"\n', ""))
    results = [store.read(r.view, keys, r.features, r.version) for r in required.reads]
    out = required.assemble(results, {"ts": ts, "channel": channel}, 3)
    assert out.failed.tolist() == [False, False, True]
    assert out.failed_features[out.first_bad[2]] == "profile:city"
    np.testing.assert_array_equal(required.transform(out.block, out.typed)[:2], expected[:2])

    rounded = {**columns, "profile:merchant": np.array([2**53, 42, 7], np.int64)}
    rounded = apply_chain(steps, rounded, b.outputs, use_reference=True)
    assert (rounded[0] != expected[0]).any(), "2**53 + 1 must not pass through float64"


@pytest.mark.parametrize(
    ("head", "message"),
    [
        (TYPED_HEAD.replace('ts = "int64"', 'ts = "float64"'), 'declare ts = "int64"'),
        (TYPED_HEAD.replace('channel = "string"', 'channel = "float64"'), '"int64" or "string"'),
        (TYPED_HEAD.replace("default = 7", "default = 7.5"), "must be an integer or a string"),
        (TYPED_HEAD.replace("default = 0.5", 'default = "x"'), "default must be a number"),
    ],
)
def test_typed_columns_with_wrong_dtypes_or_defaults_fail_at_load(head: str, message: str) -> None:
    with pytest.raises(ModelConfigError) as info:
        typed_binding(head)
    assert message in str(info.value)


def test_a_string_request_value_cannot_reach_the_model_untransformed() -> None:
    chain = [t for t in TYPED_CHAIN if t["op"] != "hash_bucket"]
    chain.append({"op": "hash_bucket", "inputs": ["profile:merchant"], "params": {"buckets": 97}})
    with pytest.raises(ModelConfigError, match=r"request_values\.channel is a string"):
        binding(TYPED_HEAD + "".join(_toml(t) for t in chain), width=TYPED_WIDTH)


def test_a_float_feature_read_by_a_time_op_is_refused_when_read(tmp_path) -> None:
    store = OnlineStore(StoreConfig(path=tmp_path, sync=False))
    store.registry.apply(
        [Entity("user", (JoinKey("id", DType.INT64),))],
        [FeatureView("stats", "user", (Feature("a", DType.FLOAT32), Feature("t", DType.FLOAT64)))],
    )
    head = '[features]\n[[features.columns]]\nfeature = "stats:t"\ndefault = 0\n'
    chain = [{"op": "hour_of_day", "inputs": ["stats:t"], "output": "hour"}]
    b = binding(head + "".join(_toml(t) for t in chain), width=1)
    keys = {"id": np.array([1])}
    results = [store.read(r.view, keys, r.features, r.version) for r in b.reads]
    with pytest.raises(ConflictError, match=r"'stats:t' is FLOAT64, but a time or key op"):
        b.assemble(results, {}, 1)


def keyed(columns: list[str], k: str | None, *vocabularies: tuple[str, list]):
    """A binding of `columns` ([[features.columns]] bodies; request value k of dtype k) that
    one-hot encodes each (column, vocabulary)."""
    head = "[features]\n" + "".join(f"[[features.columns]]\n{c}\n" for c in columns)
    head += f'[request_values]\nk = "{k}"\n' if k else ""
    chain = [
        {"op": "one_hot", "inputs": [column], "output": f"c{i}", "params": {"vocabulary": vocab}}
        for i, (column, vocab) in enumerate(vocabularies)
    ]
    width = sum(len(vocab) + 1 for _, vocab in vocabularies)
    return binding(head + "".join(_toml(t) for t in chain), width=width)


K = 'request = "k"'
N = 'feature = "profile:n"'
CITY = 'feature = "profile:city"'


@pytest.mark.parametrize(
    ("columns", "k", "vocabularies", "message"),
    [
        ([K], "int64", [("k", ["a", "b"])],
         "request_values.k is int64, but transforms[0] (one_hot) reads it against a vocabulary "
         'of strings; declare k = "string"'),
        ([N, K], "string", [("profile:n", [1]), ("k", [1, 2])],
         "request_values.k is string, but transforms[1] (one_hot) reads it against a vocabulary "
         'of ints; declare k = "int64"'),
        ([K], "bool", [("k", ["yes"])], "request_values.k is bool, but transforms[0] (one_hot)"),
        ([N + '\ndefault = "x"'], None, [("profile:n", [1, 2])],
         "column 'profile:n': default 'x' must be an integer: transforms[0] (one_hot) reads it "
         "against a vocabulary of ints"),
        ([CITY + "\ndefault = 3"], None, [("profile:city", ["a"])],
         "column 'profile:city': default 3 must be a string: transforms[0] (one_hot)"),
    ],
)  # fmt: skip
def test_a_vocabulary_of_the_other_type_than_a_request_value_fails_at_load(
    columns: list[str], k: str | None, vocabularies: list, message: str
) -> None:
    with pytest.raises(ModelConfigError) as info:
        keyed(columns, k, *vocabularies)
    assert message in str(info.value) and "m/config.toml" in str(info.value)


def _profile_store(tmp_path) -> OnlineStore:
    store = OnlineStore(StoreConfig(path=tmp_path, sync=False))
    profile = (Feature("n", DType.INT64), Feature("city", DType.STRING))
    store.registry.apply(
        [Entity("user", (JoinKey("id", DType.INT64),))], [FeatureView("profile", "user", profile)]
    )
    columns = {"n": np.array([1, 2]), "city": np.array(["a", "b"], object)}
    store.write(WriteBatch("profile", {"id": np.array([1, 2])}, np.array([5, 5]), columns))
    return store


@pytest.mark.parametrize(
    ("column", "vocabulary", "message"),
    [
        (N, ["1", "2"],
         "feature 'profile:n' is INT64, but transforms[0] (one_hot) reads it against a vocabulary "
         "of strings; bind a STRING feature"),
        (CITY, [1, 2],
         "feature 'profile:city' is STRING, but transforms[0] (one_hot) reads it against a "
         "vocabulary of ints; bind an INT64 feature"),
    ],
)  # fmt: skip
def test_a_vocabulary_of_the_other_type_than_a_feature_is_refused_when_read(
    tmp_path, column: str, vocabulary: list, message: str
) -> None:
    store = _profile_store(tmp_path)
    b = keyed([column], None, (column.split('"')[1], vocabulary))
    with pytest.raises(ConflictError) as info:
        b.assemble(b.read(store, {"id": np.array([1, 2])})[0], {}, 2)
    assert message in str(info.value)
    store.close()


def test_an_empty_vocabulary_reads_a_column_of_either_type(tmp_path) -> None:
    """An empty vocabulary sends every value to the out-of-vocabulary column, whatever its type."""
    store = _profile_store(tmp_path)
    b = keyed([K, CITY], "string", ("k", []), ("profile:city", []))
    results, _ = b.read(store, {"id": np.array([1, 2])})
    out = b.assemble(results, {"k": np.array(["x", ""], object)}, 2)
    np.testing.assert_array_equal(b.transform(out.block, out.typed), np.ones((2, 2), np.float32))
    b = keyed([K, N], "int64", ("k", []), ("profile:n", []))
    out = b.assemble(b.read(store, {"id": np.array([1, 2])})[0], {"k": np.array([3, 4])}, 2)
    np.testing.assert_array_equal(b.transform(out.block, out.typed), np.ones((2, 2), np.float32))
    store.close()


def test_views_of_two_entities_are_refused_naming_them(tmp_path) -> None:
    """Without features.entity a binding may name views of two entities; whether their keys
    differ (the read fails) or match (it does not), Predict names the views and their entities."""
    store = OnlineStore(StoreConfig(path=tmp_path, sync=False))
    store.registry.apply(
        [Entity("user", (JoinKey("id", DType.INT64),)),
         Entity("shop", (JoinKey("id", DType.INT64),)),
         Entity("card", (JoinKey("pan", DType.STRING),))],
        [FeatureView("stats", "user", (Feature("a", DType.FLOAT32),)),
         FeatureView("shops", "shop", (Feature("s", DType.FLOAT32),)),
         FeatureView("cards", "card", (Feature("c", DType.FLOAT32),))],
    )  # fmt: skip
    head = '[features]\n[[features.columns]]\nfeatures = ["stats:a", "{}"]\ndefault = 0.0\n'
    for other, entity in (("shops:s", "shop"), ("cards:c", "card")):
        b = binding(head.format(other), width=2)
        with pytest.raises(ConflictError) as info:
            b.read(store, {"id": np.array([1, 2])})
        assert (
            f"[features] binds views of more than one entity ('stats' of entity 'user', "
            f"'{other.split(':')[0]}' of entity '{entity}')"
        ) in str(info.value) and "set features.entity" in str(info.value)
    same = binding(head.format("stats:a").replace('"stats:a", "stats:a"', '"stats:a"'), width=1)
    assert len(same.read(store, {"id": np.array([1, 2])})[0]) == 1
    store.close()


AGE_HEAD = TYPED_HEAD.replace(
    "[[features.columns]]\nrequest",
    '[[features.columns]]\nfeature = "profile:seen_us"\ndefault = 0\n[[features.columns]]\nrequest',
    1,
)
AGE_CHAIN = [*TYPED_CHAIN, {"op": "age_seconds", "inputs": ["profile:seen_us"], "output": "age",
                            "params": {"now_us": 1_780_000_000_000_000}}]  # fmt: skip


@pytest.mark.parametrize(
    ("head", "chain", "message"),
    [
        (TYPED_HEAD.replace("default = 7", "default = 18446744073709551616"), TYPED_CHAIN,
         "features.columns[1].default 18446744073709551616 is outside int64 "
         "[-9223372036854775808, 9223372036854775807]"),
        (AGE_HEAD.replace("default = 0\n", "default = 9223372036854775808\n"), AGE_CHAIN,
         "features.columns[3].default 9223372036854775808 is outside int64"),
        (TYPED_HEAD.replace("default = 0.5", "default = nan"), TYPED_CHAIN,
         "features.columns[0].default is nan; give a finite number"),
        (TYPED_HEAD.replace("default = 0.5", "default = -inf"), TYPED_CHAIN,
         "features.columns[0].default is -inf; give a finite number"),
    ],
    ids=["2**64", "2**63-age", "nan", "-inf"],
)  # fmt: skip
def test_defaults_outside_int64_or_not_finite_fail_at_load(head, chain, message) -> None:
    with pytest.raises(ModelConfigError) as info:
        binding(head + "".join(_toml(t) for t in chain), width=TYPED_WIDTH + 1)
    assert message in str(info.value) and "m/config.toml" in str(info.value)


def test_a_default_reaching_the_fp32_input_untransformed_must_fit_float32(tmp_path) -> None:
    with pytest.raises(ModelConfigError) as info:
        binding(BINDING.replace("default = 1.5", "default = 3.4e39"))
    assert "features.columns[0].default 3.4e+39 overflows float32" in str(info.value)
    standardized = binding(
        BINDING.replace("default = 1.5", "default = 3.4e39").replace(
            'entity = "user"', 'entity = "user"\noutputs = ["stats:a", "stats:b", "amount"]'
        )
        + '[[transforms]]\nop = "standardize"\ninputs = ["stats:a", "stats:b"]\n'
        "params = {mean = 0.0, std = 1e10}\n",
    )
    store = OnlineStore(StoreConfig(path=tmp_path, sync=False))
    store.registry.apply(
        [Entity("user", (JoinKey("id", DType.INT64),))],
        [FeatureView("stats", "user", (Feature("a", DType.FLOAT32), Feature("b", DType.INT64)))],
    )
    keys = {"id": np.array([1])}
    results = [store.read(r.view, keys, r.features, r.version) for r in standardized.reads]
    out = standardized.assemble(results, {"amount": np.array([2.0])}, 1)
    scored = standardized.transform(out.block)
    np.testing.assert_array_equal(scored, np.array([[3.4e29, 3.4e29, 2.0]], np.float32))
    store.close()
