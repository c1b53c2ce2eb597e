"""Prediction over a real grpc.aio server (real LMDB, real ONNX Runtime): one-hop scores equal the
reference path, defaults and lineage, failed rows, errors, concurrency and StreamPredict."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from benchmarks.model_zoo import identity_model, mlp_model, write_model
from clients.channel import ClientConfig, ClientError
from clients.feature_client import FeatureStoreClient
from clients.prediction_client import AsyncPredictionClient, PredictionClient
from clients.prediction_messages import predict_request
from featurestore.dtypes import DType, FeatureStatus
from featurestore.registry import Entity, Feature, FeatureView, JoinKey
from featurestore.transforms import apply_chain, transforms_from_config
from protos.featureserve.v1 import feature_store_pb2_grpc, prediction_pb2_grpc
from protos.inference import grpc_service_pb2 as ipb
from protos.inference import grpc_service_pb2_grpc
from server.app import FeatureServer
from server.config import ServerConfig
from server.feature_servicer import FeatureStoreServicer
from server.inference_servicer import InferenceServicer
from server.prediction_servicer import STREAM_WINDOW, PredictionServicer
from server.tensors import bf16_to_float32
from tests.conftest import float32_to_bf16, wait_until

N_STATS = 29
USER = Entity("user", (JoinKey("user_id", DType.INT64),))
STATS = FeatureView(
    "user_stats",
    "user",
    (*(Feature(f"f{i}", DType.FLOAT32) for i in range(N_STATS)), Feature("n_tx", DType.INT64)),
    ttl_seconds=3600,
)
RISK = FeatureView("risk", "user", (Feature("score", DType.FLOAT64),))
STATS_REFS = [f"user_stats:f{i}" for i in range(N_STATS)]
NOW_US = int(time.time() * 1e6)
RNG = np.random.default_rng(7)
MEANS = RNG.normal(size=N_STATS).round(3).tolist()
STDS = (RNG.random(N_STATS) + 0.5).round(3).tolist()
STATS_DEFAULT = 0.25
TRANSFORMS = [
    {"op": "standardize", "inputs": STATS_REFS, "params": {"mean": MEANS, "std": STDS}},
    {"op": "clip", "inputs": ["user_stats:n_tx"], "params": {"lo": 0, "hi": 50}},
    {"op": "min_max_scale", "inputs": ["amount"], "params": {"lo": 0, "hi": 500}},
]
OUTPUTS = [*STATS_REFS, "user_stats:n_tx", "risk:score", "amount"]
PROFILE = FeatureView(
    "profile", "user", (Feature("city", DType.STRING), Feature("signup_us", DType.INT64))
)
CITIES = ["oslo", "lima", "pune"]
TYPED_TRANSFORMS = [
    {"op": "standardize", "inputs": STATS_REFS[:20],
     "params": {"mean": MEANS[:20], "std": STDS[:20]}},
    {"op": "hash_bucket", "inputs": ["user_stats:n_tx", "channel"], "params": {"buckets": [64, 8]}},
    {"op": "one_hot", "inputs": ["profile:city"], "output": "city",
     "params": {"vocabulary": CITIES}},
    {"op": "hour_cyclical", "inputs": ["ts"], "output": "hour"},
    {"op": "hour_of_day", "inputs": ["ts"], "output": "hour_of_day"},
    {"op": "day_of_week", "inputs": ["ts"], "output": "dow"},
    {"op": "is_weekend", "inputs": ["ts"], "output": "weekend"},
    {"op": "age_seconds", "inputs": ["profile:signup_us", "ts"], "output": "account_age"},
]  # fmt: skip
TYPED_OUTPUTS = [
    *STATS_REFS[:20], "user_stats:n_tx", "channel", *(f"city_{c}" for c in [*CITIES, "oov"]),
    "hour_sin", "hour_cos", "hour_of_day", "dow", "weekend", "account_age",
]  # fmt: skip
TYPED_DEFAULTS = {"user_stats:n_tx": 3, "profile:city": "unknown", "profile:signup_us": 0}


def _toml_value(v) -> str:
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    return repr(v)


def binding_lines(
    input_name: str, outputs: list[str], stats: list[str], transforms: list[dict]
) -> list[str]:
    """Predict's tables binding user features to input_name: the stats features (defaulted),
    user_stats:n_tx (default 3) when outputs read it, a required risk score and a request-time
    float64 amount, then the transforms."""
    lines = [
        "[features]",
        'entity = "user"',
        f'input = "{input_name}"',
        f"outputs = {_toml_value(outputs)}",
        "[[features.columns]]",
        f"features = {_toml_value(stats)}",
        f"default = {STATS_DEFAULT}",
    ]
    if "user_stats:n_tx" in outputs:
        lines += ["[[features.columns]]", 'feature = "user_stats:n_tx"', "default = 3"]
    lines += [
        "[[features.columns]]",
        'feature = "risk:score"',
        "[[features.columns]]",
        'request = "amount"',
        "[request_values]",
        'amount = "float64"',
    ]
    for t in transforms:
        lines += ["[[transforms]]", *(f"{k} = {_toml_value(v)}" for k, v in t.items())]
    return lines


def scorer_config(transforms: list[dict] = TRANSFORMS, extra: str = "") -> str:
    """The test model's config: 29 + 1 stats features (defaults), a required risk score and a
    request-time amount, standardized/clipped/scaled to the MLP's 32 inputs."""
    lines = [
        "max_batch_size = 256",
        "[dynamic_batching]",
        "max_queue_delay_us = 500",
        *binding_lines("x", OUTPUTS, STATS_REFS, transforms),
    ]
    return "\n".join(lines) + "\n" + extra


def typed_config() -> str:
    """A model whose chain reads int64 times and ids and string categories exactly: hashing,
    one-hot, calendar and age ops over features and request values, 32 columns."""
    lines = [
        "max_batch_size = 256",
        "[features]",
        'entity = "user"',
        f"outputs = {_toml_value(TYPED_OUTPUTS)}",
        "[[features.columns]]",
        f"features = {_toml_value(STATS_REFS[:20])}",
        f"default = {STATS_DEFAULT}",
        *(
            line
            for ref, default in TYPED_DEFAULTS.items()
            for line in (
                "[[features.columns]]",
                f'feature = "{ref}"',
                f"default = {_toml_value(default)}",
            )
        ),
        "[[features.columns]]",
        'request = "ts"',
        "[[features.columns]]",
        'request = "channel"',
        "[request_values]",
        'ts = "int64"',
        'channel = "string"',
    ]
    for t in TYPED_TRANSFORMS:
        lines += ["[[transforms]]", *(f"{k} = {_toml_value(v)}" for k, v in t.items())]
    return "\n".join(lines) + "\n"


class PredictServer(FeatureServer):
    """The real server on its own event loop in a thread, so tests can reach its internals."""

    def run_in_thread(self) -> str:
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()

        def main() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(self.start())
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=main, daemon=True)
        self.thread.start()
        assert ready.wait(60), "server did not start"
        return f"127.0.0.1:{self.port}"

    def shutdown(self) -> None:
        asyncio.run_coroutine_threadsafe(self.stop(0), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def start_server(
    base: Path, cls: type[PredictServer] = PredictServer, **settings
) -> tuple[PredictServer, str]:
    config = ServerConfig(
        port=0, data_dir=base / "data", model_repo=base / "models", watch_model_repo=False,
        **settings,
    )  # fmt: skip
    server = cls(config)
    return server, server.run_in_thread()


def populate(target: str, ids: np.ndarray) -> dict:
    """Write random features for most ids: some rows expired, some missing in either view."""
    n = len(ids)
    rng = np.random.default_rng(11)
    stats = {f"f{i}": rng.normal(size=n).astype(np.float32) for i in range(N_STATS)}
    stats["n_tx"] = rng.integers(0, 100, n)
    nulls = {"f3": rng.random(n) < 0.1}
    has_stats = rng.random(n) < 0.8
    expired = has_stats & (rng.random(n) < 0.15)
    has_risk = rng.random(n) < 0.9
    times = np.where(expired, NOW_US - 2 * 3600 * 1_000_000, NOW_US - rng.integers(1, 10**8, n))
    with FeatureStoreClient(ClientConfig(target=target, timeout_s=30)) as client:
        client.apply([USER], [STATS, RISK])
        client.write_features(
            "user_stats",
            {"user_id": ids[has_stats]},
            times[has_stats],
            {k: v[has_stats] for k, v in stats.items()},
            {k: v[has_stats] for k, v in nulls.items()},
        )
        client.write_features(
            "risk", {"user_id": ids[has_risk]}, NOW_US, {"score": rng.random(n)[has_risk]}
        )
    return {"has_stats": has_stats, "expired": expired, "has_risk": has_risk, "times": times}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    base = tmp_path_factory.mktemp("predict")
    write_model(base / "models", "scorer", mlp_model(seed=3), config_toml=scorer_config())
    bad = [{"op": "no_such_op", "inputs": ["amount"]}]
    write_model(base / "models", "broken", mlp_model(), config_toml=scorer_config(bad))
    write_model(base / "models", "plain", mlp_model())
    write_model(base / "models", "typed", mlp_model(seed=5), config_toml=typed_config())
    write_model(base / "models", "request_only", identity_model(["FP32"], 1), config_toml=(
        '[features]\nentity = "user"\ninput = "INPUT_FP32"\n'
        '[[features.columns]]\nrequest = "amount"\n[request_values]\namount = "float64"\n'
    ))  # fmt: skip
    server, target = start_server(base)
    ids = np.arange(1, 401, dtype=np.int64)
    facts = populate(target, ids)
    yield {"target": target, "ids": ids, "base": base, **facts}
    server.shutdown()


def reference(target: str, base: Path, ids: np.ndarray, amount: np.ndarray):
    """GetOnlineFeatures + NumPy reference transforms + ONNX Runtime run directly."""
    refs = [*STATS_REFS, "user_stats:n_tx", "risk:score"]
    with FeatureStoreClient(ClientConfig(target=target)) as client:
        got = client.get_online_features(refs, {"user_id": ids})
    columns = {}
    for ref in refs:
        present = got.statuses[ref] == FeatureStatus.PRESENT
        default = 3.0 if ref.endswith("n_tx") else STATS_DEFAULT
        columns[ref] = np.where(present, got[ref].astype(np.float64), default)
    ok = got.statuses["risk:score"] == FeatureStatus.PRESENT
    columns = {k: v[ok] for k, v in columns.items()}
    columns["amount"] = amount[ok]
    x = apply_chain(transforms_from_config(TRANSFORMS), columns, OUTPUTS, use_reference=True)
    session = ort.InferenceSession(
        (base / "models" / "scorer" / "1" / "model.onnx").read_bytes(),
        providers=["CPUExecutionProvider"],
    )
    scores = np.zeros((len(ids), 1), np.float32)
    scores[ok] = session.run(["y"], {"x": x})[0]
    return scores, ok, got


def test_predict_equals_lookup_plus_reference_transforms_plus_ort(served) -> None:
    ids = np.concatenate([served["ids"][:150], [10_000, 10_001]])
    amount = np.random.default_rng(1).random(len(ids)) * 600
    with PredictionClient(ClientConfig(target=served["target"])) as client:
        result = client.predict("scorer", {"user_id": ids}, {"amount": amount}, request_id="r1")
    expected, ok, got = reference(served["target"], served["base"], ids, amount)
    assert result.request_id == "r1" and result.rows == len(ids)
    np.testing.assert_array_equal(result.ok, ok)
    assert 0 < ok.sum() < len(ids)
    np.testing.assert_array_equal(result.scores["y"], expected)
    assert result.lineage.model_version == "1"
    assert result.lineage.feature_views == ["user_stats@1", "risk@1"]
    found = [got.event_timestamps[v] for v in ("user_stats", "risk")]
    present = [
        got.statuses[f"{v}:{f}"] != FeatureStatus.NOT_FOUND
        for v, f in (("user_stats", "f0"), ("risk", "score"))
    ]
    stats_ok = got.statuses["user_stats:f0"] == FeatureStatus.PRESENT
    oldest = np.where(stats_ok, found[0], np.iinfo(np.int64).max)
    oldest = np.minimum(oldest, np.where(present[1], found[1], np.iinfo(np.int64).max))
    oldest[oldest == np.iinfo(np.int64).max] = 0
    np.testing.assert_array_equal(result.lineage.oldest_event_us, oldest)


def test_time_and_categorical_transforms_equal_the_reference_exactly(served) -> None:
    target, ids = served["target"], served["ids"][:120]
    rng = np.random.default_rng(3)
    known = ids[:90]
    cities = np.array([*CITIES, "paris"], object)[rng.integers(0, 4, len(known))]
    signup = NOW_US - rng.integers(0, 10**13, len(known))
    with FeatureStoreClient(ClientConfig(target=target)) as client:
        client.apply([USER], [PROFILE])
        client.write_features(
            "profile", {"user_id": known}, NOW_US, {"city": cities, "signup_us": signup}
        )
    ts = NOW_US + rng.integers(-(10**12), 10**12, len(ids))
    channel = np.array(["web", "app", "store"], object)[rng.integers(0, 3, len(ids))]
    with PredictionClient(ClientConfig(target=target)) as client:
        result = client.predict("typed", {"user_id": ids}, {"ts": ts, "channel": channel})
        # Zero entities as plain lists: the empty values carry no dtype, which is no error.
        empty = client.predict("typed", {"user_id": []}, {"ts": [], "channel": []})
    assert empty.error is None and empty.rows == 0 and empty.row_status.size == 0

    refs = [*STATS_REFS[:20], *TYPED_DEFAULTS]
    with FeatureStoreClient(ClientConfig(target=target)) as client:
        got = client.get_online_features(refs, {"user_id": ids})
    columns: dict = {"ts": ts, "channel": channel}
    for ref in refs:
        present = got.statuses[ref] == FeatureStatus.PRESENT
        default = TYPED_DEFAULTS.get(ref, STATS_DEFAULT)
        values = got[ref] if ref in TYPED_DEFAULTS else got[ref].astype(np.float64)
        columns[ref] = np.where(present, values, default)
    assert set(columns["profile:city"][90:]) == {"unknown"}
    steps = transforms_from_config(TYPED_TRANSFORMS)
    x = apply_chain(steps, columns, TYPED_OUTPUTS, use_reference=True)
    session = ort.InferenceSession(
        (served["base"] / "models" / "typed" / "1" / "model.onnx").read_bytes(),
        providers=["CPUExecutionProvider"],
    )
    assert result.ok.all()
    np.testing.assert_array_equal(result.scores["y"], session.run(["y"], {"x": x})[0])
    fills = {f.feature: f.filled_with for f in result.lineage.fills}
    assert fills["profile:city"] == "default=unknown"

    async def in_parts() -> list:
        async with AsyncPredictionClient(ClientConfig(target=target)) as client:
            return await asyncio.gather(
                *(
                    client.predict("typed", {"user_id": ids[k::12]},
                                   {"ts": ts[k::12], "channel": channel[k::12]})
                    for k in range(12)
                )
            )  # fmt: skip

    for k, part in enumerate(asyncio.run(in_parts())):
        np.testing.assert_allclose(part.scores["y"], result.scores["y"][k::12], rtol=1e-5)


def test_missing_and_expired_features_take_defaults_and_are_reported(served) -> None:
    ids = served["ids"]
    expired = served["expired"]
    missing = ~served["has_stats"]
    pick = np.concatenate([np.flatnonzero(expired & served["has_risk"])[:5],
                           np.flatnonzero(missing & served["has_risk"])[:5]])  # fmt: skip
    with PredictionClient(ClientConfig(target=served["target"])) as client:
        result = client.predict("scorer", {"user_id": ids[pick]}, {"amount": np.ones(len(pick))})
    assert result.ok.all()
    fills = {f.feature: f for f in result.lineage.fills}
    f0 = fills["user_stats:f0"]
    assert f0.filled_with == f"default={STATS_DEFAULT}"
    assert f0.statuses[:5].tolist() == [FeatureStatus.OUTSIDE_MAX_AGE] * 5
    assert f0.statuses[5:].tolist() == [FeatureStatus.NOT_FOUND] * 5
    assert fills["user_stats:n_tx"].filled_with == "default=3"
    assert "risk:score" not in fills
    assert (result.lineage.oldest_event_us == NOW_US).all()


def test_required_feature_missing_fails_only_that_row(served) -> None:
    ids = served["ids"]
    no_risk = np.flatnonzero(~served["has_risk"])[:3]
    with_risk = np.flatnonzero(served["has_risk"] & served["has_stats"] & ~served["expired"])[:4]
    pick = np.concatenate([with_risk[:2], no_risk, with_risk[2:]])
    with PredictionClient(ClientConfig(target=served["target"])) as client:
        result = client.predict("scorer", {"user_id": ids[pick]}, {"amount": np.ones(len(pick))})
    assert result.row_status.tolist() == [1, 1, 2, 2, 2, 1, 1]
    assert [e.row for e in result.row_errors] == [2, 3, 4]
    assert all(e.column == "risk:score" and "NOT_FOUND" in e.reason for e in result.row_errors)
    assert (result.scores["y"][2:5] == 0).all() and (result.scores["y"][result.ok] != 0).all()
    fills = {f.feature: f for f in result.lineage.fills}
    assert fills["risk:score"].filled_with == "required: row not scored"


def test_a_requested_output_subset_is_checked_and_answered(served) -> None:
    keys, values = {"user_id": served["ids"][:4]}, {"amount": np.ones(4)}
    with PredictionClient(ClientConfig(target=served["target"])) as client:
        assert list(client.predict("scorer", keys, values, outputs=["y"]).scores) == ["y"]
        with pytest.raises(ClientError) as info:
            client.predict("scorer", keys, values, outputs=["z"])
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "'z' is not an output of model 'scorer'" in info.value.message


def test_errors_name_the_problem(served) -> None:
    with PredictionClient(ClientConfig(target=served["target"])) as client:
        keys = {"user_id": np.array([1, 2])}
        cases = [
            (("nope", keys, {"amount": np.ones(2)}), grpc.StatusCode.NOT_FOUND, "nope"),
            (("scorer", keys, None), grpc.StatusCode.INVALID_ARGUMENT, "'amount' is missing"),
            (("scorer", keys, {"amount": np.ones(2, np.float32)}),
             grpc.StatusCode.INVALID_ARGUMENT, "FLOAT32"),
            (("scorer", keys, {"amount": np.ones(3)}), grpc.StatusCode.INVALID_ARGUMENT, "[2, 1]"),
            (("scorer", keys, {"amount": np.ones(2), "amt": np.ones(2)}),
             grpc.StatusCode.INVALID_ARGUMENT, "amt"),
            (("scorer", keys, {"amount": np.array([1.0, np.nan])}),
             grpc.StatusCode.INVALID_ARGUMENT, "request_values[0] (amount): row 1 is NaN"),
            (("scorer", {"user_id": np.array(["a", "b"], object)}, {"amount": np.ones(2)}),
             grpc.StatusCode.INVALID_ARGUMENT, "user_id"),
            (("plain", keys, None), grpc.StatusCode.FAILED_PRECONDITION, "binds no features"),
            (("broken", keys, {"amount": np.ones(2)}), grpc.StatusCode.UNAVAILABLE, "no_such_op"),
        ]  # fmt: skip
        for args, code, text in cases:
            with pytest.raises(ClientError) as info:
                client.predict(*args)
            assert info.value.code == code, (args[0], info.value)
            assert text in info.value.message, info.value.message


def test_request_values_edge_cases_over_the_wire(served) -> None:
    """Zero entities get an empty answer; an all-zero null mask is no null; an unknown dtype or
    a real null is INVALID_ARGUMENT naming the field (they were UNKNOWN or refused wrongly)."""
    stub = prediction_pb2_grpc.PredictionStub(grpc.insecure_channel(served["target"]))
    empty = predict_request("scorer", {"user_id": np.array([], np.int64)}, {"amount": np.ones(0)})
    answer = stub.Predict(empty, timeout=20)
    assert answer.rows == 0 and [o.name for o in answer.outputs] == ["y"]
    assert all(o.values.rows == 0 for o in answer.outputs)
    request = predict_request("scorer", {"user_id": np.array([1, 2])}, {"amount": np.ones(2)})
    request.request_values[0].values.nulls = bytes(2)
    assert stub.Predict(request, timeout=20).rows == 2
    request.request_values[0].values.nulls = bytes([0, 1])
    with pytest.raises(grpc.RpcError) as info:
        stub.Predict(request, timeout=20)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request_values[0] (amount): row 1 is null" in info.value.details()
    request.request_values[0].values.nulls = b""
    request.request_values[0].values.dtype = 99
    with pytest.raises(grpc.RpcError) as info:
        stub.Predict(request, timeout=20)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request_values[0] (amount)" in info.value.details()


def test_keys_are_checked_against_the_entity_when_no_view_is_read(served) -> None:
    """A binding of request values alone still names its entity: keys must be its join keys."""
    amount = {"amount": np.array([2.5])}
    with PredictionClient(ClientConfig(target=served["target"])) as client:
        got = client.predict("request_only", {"user_id": np.array([7])}, amount)
        np.testing.assert_array_equal(got.scores["OUTPUT_FP32"], [[2.5]])
        for keys, text in (
            ({"bogus": np.array([7])}, "'bogus' is not a join key of entity 'user'"),
            ({"user_id": np.array([7.0])}, "join key 'user_id' of entity 'user' is declared INT64"),
        ):
            with pytest.raises(ClientError) as info:
                client.predict("request_only", keys, amount)
            assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert text in info.value.message, info.value.message


def test_unknown_transform_keeps_the_model_out_of_service(served) -> None:
    channel = grpc.insecure_channel(served["target"])
    stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
    assert not stub.ModelReady(ipb.ModelReadyRequest(name="broken")).ready
    assert stub.ModelReady(ipb.ModelReadyRequest(name="scorer")).ready
    index = stub.RepositoryIndex(ipb.RepositoryIndexRequest()).models
    reason = next(m.reason for m in index if m.name == "broken")
    assert "transforms[0]" in reason and "no_such_op" in reason
    channel.close()


def test_1000_concurrent_predicts_each_get_their_own_scores(served) -> None:
    ids = served["ids"]
    amounts = np.random.default_rng(5).random((1000, 20)) * 500
    picks = np.random.default_rng(6).integers(0, len(ids), (1000, 20))
    expected, ok, _ = reference(
        served["target"], served["base"], ids[picks.ravel()], amounts.ravel()
    )
    expected = expected.reshape(1000, 20)
    ok = ok.reshape(1000, 20)

    async def main() -> list:
        clients = [AsyncPredictionClient(ClientConfig(target=served["target"])) for _ in range(4)]
        try:
            return await asyncio.gather(
                *(
                    clients[i % 4].predict(
                        "scorer", {"user_id": ids[picks[i]]}, {"amount": amounts[i]}
                    )
                    for i in range(1000)
                )
            )
        finally:
            await asyncio.gather(*(c.close() for c in clients))

    results = asyncio.run(main())
    for i, result in enumerate(results):
        np.testing.assert_array_equal(result.ok, ok[i])
        np.testing.assert_allclose(result.scores["y"][:, 0], expected[i], rtol=1e-5, atol=1e-6)


def _stream_requests(
    ids: np.ndarray, n: int, bad: set[int] = frozenset(), invalid: set[int] = frozenset()
) -> list:
    """n Predict requests of 10 entities; `bad` name an unknown model, `invalid` send the
    amount as float32 where the model binds float64."""
    rng = np.random.default_rng(9)
    out = []
    for k in range(n):
        pick = ids[rng.integers(0, len(ids), 10)]
        model = "nope" if k in bad else "scorer"
        amount = rng.random(10).astype(np.float32 if k in invalid else np.float64)
        out.append(predict_request(model, {"user_id": pick}, {"amount": amount},
                                   request_id=f"q{k}"))  # fmt: skip
    return out


def test_stream_keeps_order_and_survives_a_bad_request(served) -> None:
    requests = _stream_requests(served["ids"], 120, bad={7, 50}, invalid={30})
    with PredictionClient(ClientConfig(target=served["target"])) as client:
        results = list(client.stream(requests, timeout_s=60))
        unary = [
            client.predict(
                "scorer",
                {"user_id": np.frombuffer(r.entity_keys[0].values.data, "<i8")},
                {"amount": np.frombuffer(r.request_values[0].values.data, "<f8")},
            )
            for r in requests[:5]
        ]
    assert [r.request_id for r in results] == [f"q{k}" for k in range(120)]
    for k in (7, 50):
        assert results[k].error is not None and results[k].error.code == grpc.StatusCode.NOT_FOUND
    invalid = results[30].error
    assert invalid is not None and invalid.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "amount" in invalid.message and "FLOAT32" in invalid.message
    assert all(r.error is None for k, r in enumerate(results) if k not in (7, 30, 50))
    for a, b in zip(results[:5], unary, strict=True):
        np.testing.assert_allclose(a.scores["y"], b.scores["y"], rtol=1e-5, atol=1e-6)


def test_an_oversized_stream_message_fails_only_its_own_request(tmp_path) -> None:
    """max_message_bytes = 10000: an answer of 400 entities (their fills make it ~17 KB) and a
    request of 1000 entities (16 KB) each get an error in their place; the stream goes on. The
    oversized request is never parsed, so its answer has no request id but names its position;
    a request parsed but over max_entities_per_request keeps its id."""
    write_model(tmp_path / "models", "scorer", mlp_model(seed=3), config_toml=scorer_config())
    server, target = start_server(tmp_path)
    try:
        ids = np.arange(1, 401)
        populate(target, ids)
    finally:
        server.shutdown()
    server, target = start_server(tmp_path, max_message_bytes=10_000, max_entities_per_request=450)
    try:

        def request(n: int, request_id: str):
            keys, amount = {"user_id": ids[np.arange(n) % 400]}, np.ones(n)
            return predict_request("scorer", keys, {"amount": amount}, request_id=request_id)

        requests = [request(10, "before"), request(400, "big-answer"),
                    request(1000, "big-request"), request(500, "too-many"),
                    request(10, "after")]  # fmt: skip
        assert requests[1].ByteSize() < 10_000 < requests[2].ByteSize()
        assert requests[3].ByteSize() < 10_000
        with PredictionClient(ClientConfig(target=target, max_message_bytes=1 << 24)) as client:
            results = list(client.stream(requests, timeout_s=60))
    finally:
        server.shutdown()
    assert [r.request_id for r in results] == ["before", "big-answer", "", "too-many", "after"]
    assert results[0].error is None and results[4].error is None
    assert results[0].scores["y"].shape[0] == 10
    limit = "over the server's limit of max_message_bytes=10000"
    for result, what in ((results[1], "response"), (results[2], "request")):
        assert result.error is not None
        assert result.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"the {what} is" in result.error.message and limit in result.error.message
    assert "no request id: it answers request 2 of the stream" in results[2].error.message
    too_many = results[3].error
    assert too_many is not None and too_many.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "500 entities exceed the limit of 450" in too_many.message


class CountingServer(PredictServer):
    """Counts the stream requests the servicer has consumed (to observe flow control)."""

    consumed = 0

    def _register(self, server: grpc.aio.Server) -> None:
        feature_store_pb2_grpc.add_FeatureStoreServicer_to_server(
            FeatureStoreServicer(self.store, self.committer, self.config.max_entities_per_request),
            server,
        )
        prediction_pb2_grpc.add_PredictionServicer_to_server(self.prediction_servicer(), server)
        grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(self.models), server
        )

    def prediction_servicer(self) -> PredictionServicer:
        owner = self
        base = PredictionServicer(self.store, self.models, self.config.max_entities_per_request)

        class Counting(type(base)):
            async def StreamPredict(self, request_iterator, context):
                async def counted():
                    async for request in request_iterator:
                        owner.consumed += 1
                        yield request

                async for response in super().StreamPredict(counted(), context):
                    yield response

        base.__class__ = Counting
        return base


def test_stream_flow_control_bounds_what_the_server_runs_ahead(tmp_path) -> None:
    write_model(tmp_path / "models", "scorer", mlp_model(seed=3), config_toml=scorer_config())
    server, target = start_server(tmp_path, CountingServer)
    try:
        ids = np.arange(1, 200)
        populate(target, ids)
        total = 2000
        rng = np.random.default_rng(2)
        requests = [
            predict_request("scorer", {"user_id": ids}, {"amount": rng.random(len(ids))},
                            request_id=f"q{k}")
            for k in range(total)
        ]  # fmt: skip
        # A fixed 64 KiB HTTP/2 receive window (no BDP growth) bounds what the transport buffers.
        options = [("grpc.http2.bdp_probe", 0)]
        with grpc.insecure_channel(target, options=options) as channel:
            stub = prediction_pb2_grpc.PredictionStub(channel)
            responses = stub.StreamPredict(iter(requests), timeout=60)
            assert wait_until(lambda: server.consumed > 0, timeout=30), "the stream never started"
            previous = -1
            while server.consumed != previous:
                previous = server.consumed
                time.sleep(1.0)
            stalled = server.consumed
            read = [r for r in responses]
    finally:
        server.shutdown()
    size = read[0].ByteSize()
    # Unread answers stop the server once its window of requests in flight is full: it has read
    # the window's worth, plus what the answers the transport buffers freed, and no more.
    assert STREAM_WINDOW <= stalled <= STREAM_WINDOW + 2 * 65536 // size + 2, (stalled, size)
    assert server.consumed == total
    assert [r.request_id for r in read] == [f"q{k}" for k in range(total)]


def sum_rows_model():
    """x [N, 1] -> y [1, 1], the sum over the rows: an output that keeps no row per input row."""
    from onnx import TensorProto, helper, numpy_helper

    from benchmarks.model_zoo import graph_model

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])
    axes = numpy_helper.from_array(np.array([0], np.int64), "axes")
    node = helper.make_node("ReduceSum", ["x", "axes"], ["y"], keepdims=1)
    return graph_model([node], [x], [y], [axes])


ONE_VALUE_CONFIG = """max_batch_size = 0
[features]
entity = "user"
[[features.columns]]
request = "v"
[request_values]
v = "float64"
"""


def test_a_model_that_is_not_batched_scores_each_predict_alone(tmp_path) -> None:
    """max_batch_size = 0: concurrent Predicts are never merged into one run, so a model whose
    output keeps no row per input row (a sum over rows) answers each 1-entity call with its own
    value; a call whose output has fewer rows than its entities fails INTERNAL, saying why."""
    write_model(tmp_path / "models", "total", sum_rows_model(), config_toml=ONE_VALUE_CONFIG)
    server, target = start_server(tmp_path)
    try:
        with FeatureStoreClient(ClientConfig(target=target)) as client:
            client.apply([USER], [])

        async def main() -> tuple[list, ClientError]:
            async with AsyncPredictionClient(ClientConfig(target=target)) as client:

                def one(k: int):
                    return client.predict("total", {"user_id": [k]}, {"v": np.array([10.0**k])})

                rounds = [await asyncio.gather(*(one(k) for k in range(8))) for _ in range(3)]
                with pytest.raises(ClientError) as info:
                    await client.predict("total", {"user_id": [1, 2, 3]}, {"v": np.ones(3)})
            return rounds, info.value

        rounds, error = asyncio.run(main())
    finally:
        server.shutdown()
    for results in rounds:
        assert [r.scores["y"].tolist() for r in results] == [[[10.0**k]] for k in range(8)]
    assert error.code == grpc.StatusCode.INTERNAL
    assert "output 'y' has shape [1, 1]" in error.message and "input rows (3)" in error.message
    assert "one row per input row, whatever its max_batch_size" in error.message


def test_a_bf16_output_is_scored_as_the_float32_values_it_holds(tmp_path) -> None:
    """Predict answers a BF16 model output with the float32 values of its bit patterns."""
    from onnx import TensorProto, helper

    from benchmarks.model_zoo import graph_model

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1])
    y = helper.make_tensor_value_info("y", TensorProto.BFLOAT16, ["N", 1])
    model = graph_model([helper.make_node("Cast", ["x"], ["y"], to=TensorProto.BFLOAT16)], [x], [y])
    config = ONE_VALUE_CONFIG.replace("max_batch_size = 0", "max_batch_size = 8")
    write_model(tmp_path / "models", "half", model, config_toml=config)
    server, target = start_server(tmp_path)
    try:
        with FeatureStoreClient(ClientConfig(target=target)) as client:
            client.apply([USER], [])
        v = np.array([1.0, np.pi, -1e-3, 3e38])
        with PredictionClient(ClientConfig(target=target)) as client:
            result = client.predict("half", {"user_id": [1, 2, 3, 4]}, {"v": v})
    finally:
        server.shutdown()
    assert result.scores["y"].dtype == np.float32
    expected = bf16_to_float32(float32_to_bf16(v.astype(np.float32)))
    np.testing.assert_array_equal(result.scores["y"].reshape(-1), expected)
    assert expected[1] != np.float32(np.pi)  # rounded to BF16's 8 bits


def test_a_predict_larger_than_the_batcher_queue_runs_in_waves(tmp_path) -> None:
    """max_batch_size = 8, max_queue_size = 4: a Predict of 100 entities (13 chunks of 8) and five
    concurrent ones of 8 (merged into one group of 5 chunks) are scored on an idle server, as
    with no queue limit, instead of being refused for the queue room their chunks take."""
    small = scorer_config().replace("max_batch_size = 256", "max_batch_size = 8")
    small = small.replace(
        "max_queue_delay_us = 500", "max_queue_delay_us = 500\nmax_queue_size = 4"
    )
    write_model(tmp_path / "models", "small", mlp_model(seed=3), config_toml=small)
    write_model(tmp_path / "models", "scorer", mlp_model(seed=3), config_toml=scorer_config())
    server, target = start_server(tmp_path)
    ids = np.arange(1, 101)
    amount = np.random.default_rng(4).random(100) * 500
    try:
        populate(target, ids)
        with PredictionClient(ClientConfig(target=target)) as client:
            big = client.predict("small", {"user_id": ids}, {"amount": amount})
            expected = client.predict("scorer", {"user_id": ids}, {"amount": amount})

        async def merged() -> list:
            async with AsyncPredictionClient(ClientConfig(target=target)) as client:
                return await asyncio.gather(
                    *(client.predict("small", {"user_id": ids[k : k + 8]},
                                     {"amount": amount[k : k + 8]})
                      for k in range(0, 40, 8))
                )  # fmt: skip

        parts = asyncio.run(merged())
    finally:
        server.shutdown()
    np.testing.assert_array_equal(big.ok, expected.ok)
    np.testing.assert_allclose(big.scores["y"], expected.scores["y"], rtol=1e-5, atol=1e-6)
    got = np.concatenate([part.scores["y"] for part in parts])
    np.testing.assert_allclose(got, expected.scores["y"][:40], rtol=1e-5, atol=1e-6)


def test_a_cancelled_predict_frees_its_batcher_queue_slot(tmp_path) -> None:
    """A 60 s queue delay keeps a Predict in the batcher's queue (max_queue_size = 1); when its
    client cancels the call, the slot frees at once, so the next Predict is queued, not refused."""
    slow = scorer_config().replace(
        "max_queue_delay_us = 500", "max_queue_delay_us = 60000000\nmax_queue_size = 1"
    )
    write_model(tmp_path / "models", "slow", mlp_model(seed=3), config_toml=slow)
    server, target = start_server(tmp_path)
    try:
        ids = np.arange(1, 11)
        populate(target, ids)
        batcher = server.models.get("slow").batcher
        request = predict_request("slow", {"user_id": ids}, {"amount": np.ones(10)})
        with grpc.insecure_channel(target) as channel:
            predict = prediction_pb2_grpc.PredictionStub(channel).Predict
            first = predict.future(request)
            assert wait_until(lambda: batcher.queued == 1, timeout=30), "never queued"
            first.cancel()
            assert wait_until(lambda: batcher.queued == 0, timeout=20), "slot still taken"
            second = predict.future(request)
            assert wait_until(lambda: batcher.queued == 1, timeout=30), "second never queued"
            assert not second.done()
            second.cancel()
    finally:
        server.shutdown()


def test_a_bound_feature_the_store_no_longer_has_is_failed_precondition(tmp_path) -> None:
    """A new view version without a bound feature, or the view deleted, answered NOT_FOUND,
    which says the model itself is unknown; the request is fine, the model's binding is not."""
    stats = FeatureView("stats", "user", (Feature("a", DType.FLOAT32), Feature("b", DType.FLOAT32)))
    write_model(tmp_path / "models", "ident", identity_model(["FP32"], 2), config_toml=(
        '[features]\nentity = "user"\ninput = "INPUT_FP32"\n'
        '[[features.columns]]\nfeatures = ["stats:a", "stats:b"]\n'
    ))  # fmt: skip
    server, target = start_server(tmp_path)
    try:
        config = ClientConfig(target=target)
        with FeatureStoreClient(config) as store, PredictionClient(config) as client:
            store.apply([USER], [stats])
            keys = {"user_id": np.array([1])}
            store.write_features("stats", keys, NOW_US, {"a": [1.0], "b": [2.0]})
            assert client.predict("ident", keys).scores["OUTPUT_FP32"].tolist() == [[1.0, 2.0]]
            v2 = FeatureView("stats", "user", (Feature("a", DType.FLOAT32),), version=2)
            store.apply([], [v2])
            errors = []
            for change in ("v2 without b", "view deleted"):
                if change == "view deleted":
                    store.delete_feature_view("stats", 2)
                    store.delete_feature_view("stats", 1)
                with pytest.raises(ClientError) as info:
                    client.predict("ident", keys)
                errors.append(info.value)
    finally:
        server.shutdown()
    source = tmp_path / "models" / "ident" / "config.toml"
    problems = ("feature 'b' is not in view 'stats' v2", "feature view 'stats' is not registered")
    for error, problem in zip(errors, problems, strict=True):
        assert error.code == grpc.StatusCode.FAILED_PRECONDITION, error
        assert error.message == (
            f"the model's [features] binds what the feature store does not have: {problem}; "
            f"apply the view or feature, or bind a version that has it (view@N:feature) in "
            f"{source}"
        )
