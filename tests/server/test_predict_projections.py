"""Predict through a feature service that reads one view twice, under two aliases (a transfer's
sender and receiver accounts): scores equal GetOnlineFeatures by the same service + the NumPy
reference transforms + ONNX Runtime run directly; lineage, defaults, pinned versions, key
errors and read scopes (the projection's view, never its alias); an alias re-pointed to
another view, a bound alias the service drops, and keys of mixed types from the CLI."""

from __future__ import annotations

import time

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from benchmarks.model_zoo import graph_model, identity_model, write_model
from clients.channel import ClientConfig, ClientError
from clients.feature_client import FeatureStoreClient
from clients.prediction_client import PredictionClient
from featurestore.dtypes import DType, FeatureStatus, numpy_dtype
from featurestore.registry import (
    Entity,
    Feature,
    FeatureProjection,
    FeatureService,
    FeatureView,
    JoinKey,
)
from featurestore.transforms import apply_chain, transforms_from_config
from tests.conftest import ServerProcess, featureserve
from tests.server.test_auth import token_toml

USER = Entity("user", (JoinKey("user_id", DType.INT64),))
ACCOUNT = Entity("account", (JoinKey("account_id", DType.INT64),))
USER_STATS = FeatureView("user_stats", "user", (Feature("clicks", DType.FLOAT32),))
ACCOUNT_FEATURES = (Feature("balance", DType.FLOAT64), Feature("n_tx", DType.INT64))
ACCOUNTS_V1 = FeatureView(
    "account_stats",
    "account",
    (*ACCOUNT_FEATURES, Feature("risk", DType.FLOAT32)),
    ttl_seconds=3600,
)
ACCOUNTS_V2 = FeatureView(
    "account_stats",
    "account",
    (*ACCOUNT_FEATURES, Feature("risk", DType.FLOAT64)),  # retyped: a new version
    ttl_seconds=3600,
    version=2,
)


def transfer(name: str, view: str) -> FeatureService:
    """The user's clicks, and `view` read as the sender's and the receiver's account."""
    return FeatureService(
        name,
        ("user_stats:clicks",),
        projections=tuple(
            FeatureProjection(view, alias, ("balance", "n_tx"), {"account_id": f"{alias}_id"})
            for alias in ("sender", "receiver")
        ),
    )


TRANSFORMS = [
    {"op": "standardize", "inputs": ["sender:balance", "receiver:balance"],
     "params": {"mean": [100.0, 100.0], "std": [50.0, 50.0]}},
    {"op": "clip", "inputs": ["sender:n_tx", "receiver:n_tx"], "params": {"lo": 0, "hi": 40}},
    {"op": "log1p", "inputs": ["amount"]},
]  # fmt: skip
OUTPUTS = [
    "sender:balance", "receiver:balance", "sender:n_tx", "receiver:n_tx", "user_stats:clicks",
    "amount",
]  # fmt: skip
CLICKS_DEFAULT = -1.0
DEFAULTS = {
    "sender:balance": 0.0, "receiver:balance": 0.0, "sender:n_tx": 1.0,
    "user_stats:clicks": CLICKS_DEFAULT,
}  # fmt: skip
"""receiver:n_tx has none: a row without it fails."""


def config(service: str) -> str:
    """The fraud model's config: both accounts' stats and the user's clicks through `service`."""
    lines = [
        "max_batch_size = 64",
        "[dynamic_batching]",
        "max_queue_delay_us = 200",
        "[features]",
        'input = "x"',
        f'service = "{service}"',
        f"outputs = {OUTPUTS!r}".replace("'", '"'),
        "[[features.columns]]",
        'features = ["sender:balance", "receiver:balance"]',
        "default = 0.0",
        "[[features.columns]]",
        'feature = "sender:n_tx"',
        "default = 1",
        "[[features.columns]]",
        'feature = "receiver:n_tx"',
        "[[features.columns]]",
        'feature = "user_stats:clicks"',
        f"default = {CLICKS_DEFAULT}",
        "[[features.columns]]",
        'request = "amount"',
        "[request_values]",
        'amount = "float64"',
    ]
    for t in TRANSFORMS:
        lines += [
            "[[transforms]]",
            f'op = "{t["op"]}"',
            f"inputs = {t['inputs']!r}".replace("'", '"'),
        ]
        if "params" in t:
            params = ", ".join(f"{k} = {v!r}" for k, v in t["params"].items())
            lines.append(f"params = {{ {params} }}")
    return "\n".join(lines) + "\n"


def dense_model() -> bytes:
    """x [N, 6] -> y [N, 2] = x @ W + b."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((6, 2)).astype(np.float32)
    b = rng.standard_normal(2).astype(np.float32)
    model = graph_model(
        [
            helper.make_node("MatMul", ["x", "w"], ["m"]),
            helper.make_node("Add", ["m", "b"], ["y"]),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    return model.SerializeToString()


def stray(refs: list[str], service: str) -> str:
    """An identity model's config binding `refs` (default 0.0) through `service`."""
    columns = "".join(f'[[features.columns]]\nfeature = "{r}"\ndefault = 0.0\n' for r in refs)
    return f'[features]\ninput = "INPUT_FP32"\nservice = "{service}"\n' + columns


BOUND = {
    "unread": ("transfer", ["sender:risk"]),
    "unknown": ("transfer", ["payer:balance"]),
    "moved": ("moving", ["payee:balance", "payee:fee", "payee:x"]),
    "dropping": ("dropping", ["user_stats:clicks", "receiver:balance"]),
    "own": ("own", ["account_stats:balance"]),
    "shop": ("shop", ["user_stats:clicks", "payee:score"]),
}
"""Identity models: model -> (service, bound features)."""


ACCOUNTS = np.arange(100, 140, dtype=np.int64)
EXPIRED = ACCOUNTS[-5:]
"""Written two hours ago, past the view's one-hour ttl: OUTSIDE_MAX_AGE."""
NULL_N_TX = ACCOUNTS[:3]
"""n_tx is null at account_stats@2: a receiver's row fails, a sender's takes the default."""
ROWS = 30
RNG = np.random.default_rng(17)
KEYS = {
    "user_id": np.arange(ROWS, dtype=np.int64),  # users 20.. have no clicks
    # 7 and 8 were never written; receivers 9 (unknown), 100 (null n_tx) and 135 (expired) fail
    "sender_id": np.concatenate([[7, 8, EXPIRED[0], EXPIRED[1], 100], RNG.choice(ACCOUNTS, 25)]),
    "receiver_id": np.concatenate([[110, 111, 112, 9, 100, 135], RNG.choice(ACCOUNTS[3:], 24)]),
}
AMOUNT = RNG.random(ROWS) * 900


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    base = tmp_path_factory.mktemp("predict_projections")
    models = base / "models"
    model = dense_model()
    write_model(models, "fraud", model, config_toml=config("transfer"))
    write_model(models, "fraud_v1", model, config_toml=config("transfer_v1"))
    for name, (service, refs) in BOUND.items():
        identity = identity_model(["FP32"], len(refs))
        write_model(models, name, identity, config_toml=stray(refs, service))
    (base / "auth.toml").write_text(
        "[auth]\nenabled = true\n"
        + token_toml("admin", "a-secret", ["admin"])
        + token_toml("scorer", "s-secret", ["infer:fraud", "infer:dropping", "read:user_stats",
                                            "read:account_stats"])
        + token_toml("aliases", "x-secret", ["infer:fraud", "infer:dropping", "read:user_stats",
                                             "read:sender", "read:receiver"])
    )  # fmt: skip
    server = ServerProcess(base / "data", models, "--config", str(base / "auth.toml")).start()
    now = time.time_ns() // 1000
    times = np.where(np.isin(ACCOUNTS, EXPIRED), now - 2 * 3600 * 10**6, now - 10**6)
    with FeatureStoreClient(
        ClientConfig(target=server.target, timeout_s=30, token="a-secret")
    ) as c:
        services = [
            transfer("transfer", "account_stats"),
            transfer("transfer_v1", "account_stats@1"),
        ]
        c.apply([USER, ACCOUNT], [USER_STATS, ACCOUNTS_V1], feature_services=services)
        c.apply([ACCOUNT], [ACCOUNTS_V2])
        for version, scale in ((1, 1.0), (2, -3.0)):
            values = {
                "balance": ACCOUNTS * 10.0 * scale,
                "n_tx": ACCOUNTS - 90,
                "risk": np.zeros(len(ACCOUNTS), np.float32 if version == 1 else np.float64),
            }
            c.write_features(
                "account_stats", {"account_id": ACCOUNTS}, times, values, version=version
            )
        c.write_features(
            "account_stats", {"account_id": NULL_N_TX}, now, {"balance": NULL_N_TX * 1.0,
            "n_tx": np.zeros(3, np.int64), "risk": np.zeros(3)}, {"n_tx": np.ones(3, bool)},
            version=2,
        )  # fmt: skip
        clicks = {"clicks": np.arange(20, dtype=np.float32)}
        c.write_features("user_stats", {"user_id": np.arange(20)}, now, clicks)
    yield {"server": server, "base": base}
    server.kill()


def client_config(served, token: str = "a-secret") -> ClientConfig:
    return ClientConfig(target=served["server"].target, timeout_s=30, token=token)


def predict(served, model: str, keys=KEYS, token: str = "a-secret", values=None):
    with PredictionClient(client_config(served, token)) as client:
        return client.predict(model, keys, {"amount": AMOUNT} if values is None else values)


def reference(served, service: str):
    """GetOnlineFeatures by `service` + defaults + NumPy reference transforms + ORT directly."""
    with FeatureStoreClient(client_config(served)) as client:
        got = client.get_online_features(keys=KEYS, feature_service=service)
    columns = {}
    for ref in OUTPUTS[:-1]:
        present = got.statuses[ref] == FeatureStatus.PRESENT
        columns[ref] = np.where(present, got[ref].astype(np.float64), DEFAULTS.get(ref, np.nan))
    ok = got.statuses["receiver:n_tx"] == FeatureStatus.PRESENT
    columns = {k: v[ok] for k, v in columns.items()}
    columns["amount"] = AMOUNT[ok]
    x = apply_chain(transforms_from_config(TRANSFORMS), columns, OUTPUTS, use_reference=True)
    session = ort.InferenceSession(
        (served["base"] / "models" / "fraud" / "1" / "model.onnx").read_bytes(),
        providers=["CPUExecutionProvider"],
    )
    scores = np.zeros((ROWS, 2), np.float32)
    scores[ok] = session.run(["y"], {"x": x})[0]
    return scores, ok, got


def rpc_error(call) -> ClientError:
    with pytest.raises(ClientError) as info:
        call()
    return info.value


def test_predict_equals_the_service_lookup_plus_reference_transforms_plus_ort(served) -> None:
    result = predict(served, "fraud")
    expected, ok, got = reference(served, "transfer")
    np.testing.assert_array_equal(result.ok, ok)
    assert 0 < ok.sum() < ROWS
    np.testing.assert_array_equal(result.scores["y"], expected)
    lineage = result.lineage
    assert lineage.feature_service == "transfer"
    assert lineage.feature_views == ["account_stats@2", "account_stats@2", "user_stats@1"]
    assert lineage.feature_view_aliases == ["sender", "receiver", ""]
    found = [
        np.where(
            got.statuses[ref] == FeatureStatus.PRESENT,  # never null: the row was read
            got.event_timestamps[ref.partition(":")[0]],
            np.iinfo(np.int64).max,
        )
        for ref in ("sender:balance", "receiver:balance", "user_stats:clicks")
    ]
    oldest = np.minimum.reduce(found)
    oldest[oldest == np.iinfo(np.int64).max] = 0
    np.testing.assert_array_equal(lineage.oldest_event_us, oldest)
    failed = np.flatnonzero(~ok).tolist()
    assert [e.row for e in result.row_errors] == failed
    assert {e.column for e in result.row_errors} == {"receiver:n_tx"}


def test_missing_and_expired_projected_features_take_the_bindings_defaults(served) -> None:
    result = predict(served, "fraud")
    fills = {f.feature: f for f in result.lineage.fills}
    sender = fills["sender:balance"]
    assert sender.filled_with == "default=0.0"
    np.testing.assert_array_equal(
        sender.statuses == FeatureStatus.NOT_FOUND, np.isin(KEYS["sender_id"], [7, 8])
    )
    np.testing.assert_array_equal(
        sender.statuses == FeatureStatus.OUTSIDE_MAX_AGE, np.isin(KEYS["sender_id"], EXPIRED)
    )
    n_tx = fills["sender:n_tx"]
    assert n_tx.filled_with == "default=1"
    assert n_tx.statuses[4] == FeatureStatus.NULL_VALUE
    assert fills["receiver:n_tx"].filled_with == "required: row not scored"
    assert fills["user_stats:clicks"].filled_with == f"default={CLICKS_DEFAULT}"
    # unknown, expired and null senders are scored from the defaults; the receivers fail
    assert result.ok[[0, 1, 2]].all()
    assert not result.ok[[3, 4, 5]].any()
    reasons = {e.row: e.reason for e in result.row_errors}
    assert (
        reasons[3] == "required feature receiver:n_tx is NOT_FOUND and has no default; not scored"
    )
    assert "receiver:n_tx is NULL_VALUE" in reasons[4] and "OUTSIDE_MAX_AGE" in reasons[5]


def test_a_projection_pinned_to_an_older_version_reads_it(served) -> None:
    pinned = predict(served, "fraud_v1")
    latest = predict(served, "fraud")
    expected, ok, _ = reference(served, "transfer_v1")
    np.testing.assert_array_equal(pinned.ok, ok)
    np.testing.assert_array_equal(pinned.scores["y"], expected)
    assert pinned.lineage.feature_views == ["account_stats@1", "account_stats@1", "user_stats@1"]
    assert pinned.lineage.feature_view_aliases == ["sender", "receiver", ""]
    both = pinned.ok & latest.ok
    assert both.any()
    assert not np.array_equal(pinned.scores["y"][both], latest.scores["y"][both])


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        (
            {k: v for k, v in KEYS.items() if k != "receiver_id"},
            "key column 'receiver_id' is missing: projection 'receiver'",
        ),
        (
            {**KEYS, "receiver_id": KEYS["receiver_id"].astype(str)},
            "join key 'receiver_id' of entity 'account as projection receiver'",
        ),
    ],
    ids=["missing", "wrong_type"],
)
def test_bad_projection_keys_are_invalid_argument_naming_column_and_projection(
    served, keys, message
) -> None:
    refused = rpc_error(lambda: predict(served, "fraud", keys))
    assert refused.code == grpc.StatusCode.INVALID_ARGUMENT
    assert message in refused.message


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("unread", "feature service 'transfer' does not read sender:risk"),
        ("unknown", "feature service 'transfer' does not read payer:balance"),
    ],
)
def test_a_name_the_service_does_not_read_is_failed_precondition(served, model, message) -> None:
    refused = rpc_error(lambda: predict(served, model, {"sender_id": KEYS["sender_id"]}, values={}))
    assert refused.code == grpc.StatusCode.FAILED_PRECONDITION
    assert message in refused.message
    assert f"{model}/config.toml" in refused.message


def test_a_projection_needs_read_scope_on_its_view_never_its_alias(served) -> None:
    refused = rpc_error(lambda: predict(served, "fraud", token="x-secret"))
    assert refused.code == grpc.StatusCode.PERMISSION_DENIED
    assert "lacks scope 'read:account_stats'" in refused.message
    scored = predict(served, "fraud", token="s-secret")
    np.testing.assert_array_equal(scored.scores["y"], predict(served, "fraud").scores["y"])


def test_the_cli_shows_each_projections_alias(served) -> None:
    shown = featureserve(
        "predict", "--model", "fraud", "--target", served["server"].target, "--token", "a-secret",
        "--entity", "user_id=1", "--entity", "sender_id=100", "--entity", "receiver_id=110",
        "--value", "amount:float64=5",
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert (
        "views ['account_stats@2 as sender', 'account_stats@2 as receiver', 'user_stats@1'] "
        "through service transfer"
    ) in shown.stdout


def test_an_alias_re_pointed_to_another_view_fills_each_feature_its_own_column(served) -> None:
    """One apply made both views (same version, same update time); their features group into
    dtype blocks in another order, so column maps kept for the first view scrambled the
    second's features (or failed INTERNAL)."""
    payee = Entity("payee", (JoinKey("payee_id", DType.INT64),))
    f32, f64 = DType.FLOAT32, DType.FLOAT64
    views = [
        FeatureView("payee_a", "payee", (Feature("balance", f64), Feature("fee", f32),
                                         Feature("x", f64))),
        FeatureView("payee_e", "payee", (Feature("balance", f64), Feature("fee", f64),
                                         Feature("x", f32))),
    ]  # fmt: skip

    def moving(view: str) -> FeatureService:
        return FeatureService("moving", (), projections=(FeatureProjection(view, "payee"),))

    keys = {"payee_id": np.array([1, 2], np.int64)}
    with FeatureStoreClient(client_config(served)) as client:
        client.apply([payee], views, feature_services=[moving("payee_a")])
        for scale, view in enumerate(views, 1):
            values = {
                f.name: np.array([1, 2], numpy_dtype(f.dtype)) * 10**scale * (k + 1)
                for k, f in enumerate(view.features)
            }
            client.write_features(view.name, keys, time.time_ns() // 1000, values)
        for view in views:
            client.apply([], [], feature_services=[moving(view.name)])
            got = client.get_online_features(keys=keys, feature_service="moving")
            result = predict(served, "moved", keys, values={})
            expected = np.stack([got[f"payee:{f.name}"] for f in view.features], axis=1)
            np.testing.assert_array_equal(result.scores["OUTPUT_FP32"], expected)
            assert result.lineage.feature_views == [f"{view.name}@1"]
            assert result.lineage.feature_view_aliases == ["payee"]


def test_a_bound_alias_the_service_no_longer_projects_is_failed_precondition(served) -> None:
    """Whether the caller holds read:<view> (as it should) or read:<alias> (which is no
    scope): the alias stands for no view, and the binding is the model's problem."""
    keys = {"user_id": KEYS["user_id"], "receiver_id": KEYS["receiver_id"]}

    def refused_to_both(message: str) -> None:
        for token in ("s-secret", "x-secret"):
            refused = rpc_error(lambda t=token: predict(served, "dropping", keys, t, {}))
            assert refused.code == grpc.StatusCode.FAILED_PRECONDITION, (token, refused.message)
            assert message in refused.message

    sender_only = FeatureService(
        "dropping",
        ("user_stats:clicks",),
        projections=(FeatureProjection("account_stats", "sender", (), {"account_id": "s"}),),
    )
    with FeatureStoreClient(client_config(served)) as client:
        client.apply([], [], feature_services=[transfer("dropping", "account_stats")])
        assert predict(served, "dropping", keys, "s-secret", {}).ok.any()
        client.apply([], [], feature_services=[sender_only])
        refused_to_both("feature service 'dropping' does not read receiver:balance")
        client.delete_feature_service("dropping")
        refused_to_both("features.service 'dropping' is not in the feature store")


def test_an_alias_named_as_its_own_view_is_in_the_lineage(served) -> None:
    own = FeatureService(
        "own",
        (),
        projections=(
            FeatureProjection("account_stats", "account_stats", (), {"account_id": "payer_id"}),
        ),
    )
    keys = {"payer_id": ACCOUNTS[3:6]}
    with FeatureStoreClient(client_config(served)) as client:
        client.apply([], [], feature_services=[own])
        got = client.get_online_features(keys=keys, feature_service="own")
    result = predict(served, "own", keys, values={})
    np.testing.assert_array_equal(result.scores["OUTPUT_FP32"][:, 0], got["account_stats:balance"])
    assert result.lineage.feature_views == ["account_stats@2"]
    assert result.lineage.feature_view_aliases == ["account_stats"]


def test_the_cli_types_each_key_column_for_an_int_and_a_numeric_looking_string_key(
    served,
) -> None:
    merchant = Entity("merchant", (JoinKey("merchant_id", DType.STRING),))
    stats = FeatureView("merchant_stats", "merchant", (Feature("score", DType.FLOAT64),))
    shop = FeatureService(
        "shop",
        ("user_stats:clicks",),
        projections=(FeatureProjection("merchant_stats", "payee", (), {"merchant_id": "code"}),),
    )
    with FeatureStoreClient(client_config(served)) as client:
        client.apply([merchant], [stats], feature_services=[shop])
        codes = np.array(["007", "7"], object)
        now = time.time_ns() // 1000
        client.write_features("merchant_stats", {"merchant_id": codes}, now, {"score": [7.5, 7.0]})
    shown = featureserve(
        "predict", "--model", "shop", "--target", served["server"].target, "--token", "a-secret",
        "--entity", "user_id=3", "--entity", "code:string=007",
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert "[user_id=3, code=007] OK OUTPUT_FP32=[3.0, 7.5]" in shown.stdout
