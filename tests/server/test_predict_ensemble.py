"""Predict and StreamPredict on an ensemble (features -> transforms -> scale -> clf), over one real
server in explicit mode (real LMDB, real ONNX Runtime): scores equal the reference path step by
step, lineage, defaults and failed rows, the stream, a composing model unloaded, the ensemble
unloaded under waiting groups, and a binding error failing the ensemble's load."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from benchmarks.model_zoo import graph_model, write_model
from clients.channel import ClientConfig, ClientError
from clients.feature_client import FeatureStoreClient
from clients.prediction_client import AsyncPredictionClient, PredictionClient
from clients.prediction_messages import predict_request
from featurestore.dtypes import FeatureStatus
from featurestore.transforms import apply_chain, transforms_from_config
from protos.inference import grpc_service_pb2 as ipb
from protos.inference import grpc_service_pb2_grpc as ipb_grpc
from tests.server.test_ensemble import (
    RAW,
    clf_model,
    ensemble_toml,
    run_onnx,
    scale_model,
    write_ensemble,
)
from tests.server.test_inference_rpc import infer_request
from tests.server.test_prediction_rpc import (
    MEANS,
    STATS_DEFAULT,
    STDS,
    binding_lines,
    populate,
    start_server,
)

REFS = ["user_stats:f0", "user_stats:f1", "risk:score"]
OUTPUTS = [*REFS, "amount"]
TRANSFORMS = [
    {"op": "standardize", "inputs": REFS[:2], "params": {"mean": MEANS[:2], "std": STDS[:2]}},
    {"op": "min_max_scale", "inputs": ["amount"], "params": {"lo": 0, "hi": 500}},
]
STEPS = [
    ("scale", {"INPUT0": "raw"}, {"OUTPUT0": "scaled"}),
    ("clf", {"x": "scaled"}, {"y": "scores"}),
]
QUEUE_DELAY_US = 100_000
"""scale's queue delay: long enough that an unload finds Predict groups waiting in it."""


def binding(input_name: str = "raw") -> str:
    """Predict's tables for the ensemble: two stats features (defaults), a required risk score
    and a request-time amount, transformed into the ensemble's FP32 [-1, 4] input."""
    return "\n".join(binding_lines(input_name, OUTPUTS, REFS[:2], TRANSFORMS))


def ensemble(
    input_name: str = "raw", max_batch_size: int = 16, steps: tuple[str, str] = ("scale", "clf")
) -> str:
    """max_batch_size 16: a Predict of more entities goes to the ensemble in chunks. steps
    names the two composing models (a scale model, then a classifier)."""
    scores = [("scores", "FP32", [-1, 3])]
    renamed = [(model, *maps) for model, (_, *maps) in zip(steps, STEPS, strict=True)]
    raw = [("raw", "FP32", [-1, 4])]
    return ensemble_toml(renamed, raw, scores, max_batch_size, binding(input_name))


def dynamic_identity_model() -> bytes:
    """x FP32 [N, D] -> y = x, any width."""
    tensor = helper.make_tensor_value_info
    return graph_model(
        [helper.make_node("Identity", ["x"], ["y"])],
        [tensor("x", TensorProto.FLOAT, ["N", "D"])],
        [tensor("y", TensorProto.FLOAT, ["N", "D"])],
    ).SerializeToString()


def wide_clf_model() -> bytes:
    """clf's signature with another width: x FP32 [N, 5] -> y [N, 3]."""
    tensor = helper.make_tensor_value_info
    weights = numpy_helper.from_array(np.ones((5, 3), np.float32), "W")
    return graph_model(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        [tensor("x", TensorProto.FLOAT, ["N", 5])],
        [tensor("y", TensorProto.FLOAT, ["N", 3])],
        [weights],
    ).SerializeToString()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    base = tmp_path_factory.mktemp("predict_ensemble")
    models = base / "models"
    delay = f"[dynamic_batching]\nmax_queue_delay_us = {QUEUE_DELAY_US}\n"
    write_model(models, "scale", scale_model(), config_toml=delay)
    write_model(models, "clf", clf_model())
    write_ensemble(models, "ens", ensemble())
    write_ensemble(models, "badens", ensemble(input_name="nope"))
    inputs = [("raw", "FP32", [-1, 4]), ("aux", "FP32", [-1, 4])]
    steps = [*STEPS, ("scale", {"INPUT0": "aux"}, {"OUTPUT0": "aux_scaled"})]
    scores = [("scores", "FP32", [-1, 3])]
    write_ensemble(models, "ens2in", ensemble_toml(steps, inputs, scores, 16, binding()))
    # A first step that batches 4 rows and queues 2 requests: Predict must send waves.
    small_queue = (
        "max_batch_size = 4\n[dynamic_batching]\nmax_queue_size = 2\nmax_queue_delay_us = 2000\n"
    )
    write_model(models, "scaleq", scale_model(), config_toml=small_queue)
    write_ensemble(models, "ensq", ensemble(max_batch_size=4, steps=("scaleq", "clf")))
    write_ensemble(models, "ens0", ensemble(max_batch_size=0))
    scores = [("scores", "FP32", [-1, 3])]
    write_ensemble(models, "inner0", ensemble_toml(STEPS, RAW, scores, 0))
    runs_inner0 = [("inner0", {"raw": "raw"}, {"scores": "scores"})]
    write_ensemble(models, "outer0", ensemble_toml(runs_inner0, RAW, scores, 0, binding()))
    # Two steps on scaleq: one request of the ensemble puts two in its queue of 2.
    fan = [("scaleq", {"INPUT0": "raw"}, {"OUTPUT0": "twice"}), *STEPS]
    fan[1] = ("scaleq", *STEPS[0][1:])
    fan_outputs = [*scores, ("twice", "FP32", [-1, 4])]
    write_ensemble(models, "fanq", ensemble_toml(fan, RAW, fan_outputs, 4, binding()))
    # A width-keeping step ahead of scale, under an input declared [-1, -1].
    write_model(models, "dynid", dynamic_identity_model())
    loose = [
        ("dynid", {"x": "raw"}, {"y": "same"}),
        ("scale", {"INPUT0": "same"}, {"OUTPUT0": "scaled"}),
    ]
    any_width, scaled = [("raw", "FP32", [-1, -1])], [("scaled", "FP32", [-1, 4])]
    write_ensemble(models, "loose", ensemble_toml(loose, any_width, scaled, 16))
    # Its own classifier, reloaded with another signature while a Predict waits in scaler.
    write_model(models, "scaler", scale_model(), config_toml=delay)
    write_model(models, "clfr", clf_model())
    write_ensemble(models, "ensr", ensemble(steps=("scaler", "clfr")))
    server, target = start_server(base, model_control_mode="explicit", startup_models=["*"])
    ids = np.arange(1, 81, dtype=np.int64)
    facts = populate(target, ids)
    yield {"server": server, "target": target, "ids": ids, **facts}
    server.shutdown()


def reference(target: str, ids: np.ndarray, amount: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """GetOnlineFeatures + the NumPy reference transforms + ONNX Runtime run step by step: the
    scores (zeros where risk:score is missing) and which rows are scored."""
    with FeatureStoreClient(ClientConfig(target=target)) as client:
        got = client.get_online_features(REFS, {"user_id": ids})
    ok = got.statuses["risk:score"] == FeatureStatus.PRESENT
    columns = {
        ref: np.where(got.statuses[ref] == FeatureStatus.PRESENT, got[ref], STATS_DEFAULT)[ok]
        for ref in REFS
    }
    columns = {k: v.astype(np.float64) for k, v in columns.items()}
    columns["amount"] = amount[ok]
    x = apply_chain(transforms_from_config(TRANSFORMS), columns, OUTPUTS, use_reference=True)
    scaled = run_onnx(scale_model(), {"INPUT0": x})
    scores = np.zeros((len(ids), 3), np.float32)
    scores[ok] = run_onnx(clf_model(), {"x": scaled})
    return scores, ok


async def until_queued(batcher) -> None:
    """Wait (up to 2 s) until a request waits in the queue of a step's batcher."""
    for _ in range(400):
        if batcher.queued:
            return
        await asyncio.sleep(0.005)
    raise AssertionError("no Predict reached the ensemble's first step")


def pick(served) -> tuple[np.ndarray, int, int]:
    """30 entities with every feature, then one without stats (defaults) and one without its
    required risk score: 32 rows, two chunks of the ensemble's max_batch_size."""
    full = np.flatnonzero(served["has_stats"] & ~served["expired"] & served["has_risk"])[:30]
    no_stats = np.flatnonzero(~served["has_stats"] & served["has_risk"])[0]
    no_risk = np.flatnonzero(~served["has_risk"])[0]
    return served["ids"][[*full, no_stats, no_risk]], 30, 31


def test_predict_on_an_ensemble_equals_lookup_plus_reference_plus_each_step(served) -> None:
    ids, defaulted, failed = pick(served)
    amount = np.random.default_rng(2).random(len(ids)) * 600
    with PredictionClient(ClientConfig(target=served["target"])) as client:
        result = client.predict("ens", {"user_id": ids}, {"amount": amount}, request_id="e1")
    expected, ok = reference(served["target"], ids, amount)
    assert result.request_id == "e1" and result.model == "ens" and result.rows == len(ids)
    np.testing.assert_array_equal(result.scores["scores"], expected)
    assert ok.sum() == len(ids) - 1 and not ok[failed]
    np.testing.assert_array_equal(result.ok, ok)
    assert [e.row for e in result.row_errors] == [failed]
    assert result.row_errors[0].column == "risk:score"
    assert result.lineage.model_version == "1"
    assert result.lineage.feature_views == ["user_stats@1", "risk@1"]
    fills = {f.feature: f for f in result.lineage.fills}
    assert fills["user_stats:f0"].filled_with == f"default={STATS_DEFAULT}"
    assert fills["user_stats:f0"].statuses[defaulted] == FeatureStatus.NOT_FOUND
    assert fills["risk:score"].filled_with == "required: row not scored"


def test_stream_predict_on_an_ensemble_keeps_order_and_answers_an_error_in_stream(
    served,
) -> None:
    ids = served["ids"]
    requests = [
        predict_request(
            "ens",
            {"user_id": ids[k : k + 3]},
            {"amount": np.full(3, float(k), np.float32 if k == 5 else np.float64)},
            request_id=f"s{k}",
        )
        for k in range(12)
    ]
    with PredictionClient(ClientConfig(target=served["target"])) as client:
        results = list(client.stream(requests, timeout_s=60))
        unary = client.predict("ens", {"user_id": ids[:3]}, {"amount": np.zeros(3)})
    assert [r.request_id for r in results] == [f"s{k}" for k in range(12)]
    error = results[5].error
    assert error is not None and error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "amount" in error.message and "FLOAT32" in error.message
    assert all(r.error is None for k, r in enumerate(results) if k != 5)
    np.testing.assert_array_equal(results[0].scores["scores"], unary.scores["scores"])
    for k in (1, 11):
        expected, _ = reference(served["target"], ids[k : k + 3], np.full(3, float(k)))
        np.testing.assert_array_equal(results[k].scores["scores"], expected)


@pytest.mark.parametrize(
    ("model", "parts"),
    [
        ("badens", ["features.input 'nope' is not a model input (raw)", "badens/config.toml"]),
        ("ens2in", ["also requires 'aux'; an ensemble's inputs cannot be optional"]),
        ("ens0", ["does not batch (max_batch_size = 0)", "max_batch_size to 64 or less"]),
        ("outer0", ["model 'inner0'", "through a nested ensemble", "max_batch_size to 64 or less"]),
    ],
)
def test_a_bound_ensemble_that_fails_its_load_answers_unavailable_naming_the_fix(
    served, model: str, parts: list[str]
) -> None:
    keys, values = {"user_id": served["ids"][:2]}, {"amount": np.ones(2)}
    with (
        PredictionClient(ClientConfig(target=served["target"])) as client,
        pytest.raises(ClientError) as info,
    ):
        client.predict(model, keys, values)
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    for part in parts:
        assert part in info.value.message


def test_composing_model_and_ensemble_unloads(served) -> None:
    """A composing model unloaded: Predict UNAVAILABLE naming it, served again once it loads.
    The ensemble unloaded while Predict groups wait in a step's queue: they finish, later ones
    are UNAVAILABLE, and the unload returns (the groups' holds end)."""
    ids = served["ids"][:4]
    keys, values = {"user_id": ids}, {"amount": np.ones(4)}
    repository = served["server"].models

    async def main() -> None:
        async with (
            grpc.aio.insecure_channel(served["target"]) as channel,
            AsyncPredictionClient(ClientConfig(target=served["target"])) as client,
        ):
            stub = ipb_grpc.GRPCInferenceServiceStub(channel)
            await stub.RepositoryModelUnload(ipb.RepositoryModelUnloadRequest(model_name="clf"))
            with pytest.raises(ClientError) as info:
                await client.predict("ens", keys, values)
            assert info.value.code == grpc.StatusCode.UNAVAILABLE
            assert "composing model 'clf' is not served" in info.value.message
            await stub.RepositoryModelLoad(ipb.RepositoryModelLoadRequest(model_name="clf"))
            before = await client.predict("ens", keys, values)
            assert before.ok.all()

            calls = [asyncio.ensure_future(client.predict("ens", keys, values)) for _ in range(8)]
            scale = repository.get("scale").batcher
            await until_queued(scale)
            unload = ipb.RepositoryModelUnloadRequest(model_name="ens")
            await asyncio.wait_for(stub.RepositoryModelUnload(unload), 20)
            outcomes = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 20)
            answered = [o for o in outcomes if not isinstance(o, BaseException)]
            assert answered, outcomes
            for result in answered:
                np.testing.assert_array_equal(result.scores["scores"], before.scores["scores"])
            for failure in (o for o in outcomes if isinstance(o, BaseException)):
                assert isinstance(failure, ClientError), failure
                assert failure.code == grpc.StatusCode.UNAVAILABLE, failure
            with pytest.raises(ClientError) as info:
                await client.predict("ens", keys, values)
            assert info.value.code == grpc.StatusCode.UNAVAILABLE
            await stub.RepositoryModelLoad(ipb.RepositoryModelLoadRequest(model_name="ens"))
            again = await client.predict("ens", keys, values)
            np.testing.assert_array_equal(again.scores["scores"], before.scores["scores"])

    asyncio.run(main())


@pytest.mark.parametrize("model", ["ensq", "fanq"])
def test_a_large_predict_goes_in_waves_that_every_steps_queue_takes(served, model: str) -> None:
    """40 entities in chunks of 4 through a first step whose queue holds 2 (fanq: two steps on
    it, so one chunk puts two requests there): the chunks go in waves of the steps' free room,
    as to a plain model, not all at once into a full queue."""
    ids = served["ids"][:40]
    amount = np.random.default_rng(3).random(len(ids)) * 600
    with PredictionClient(ClientConfig(target=served["target"])) as client:
        result = client.predict(model, {"user_id": ids}, {"amount": amount})
    expected, ok = reference(served["target"], ids, amount)
    np.testing.assert_array_equal(result.ok, ok)
    np.testing.assert_array_equal(result.scores["scores"], expected)


def test_a_callers_tensor_a_looser_ensemble_input_let_through_is_invalid_argument(served) -> None:
    """raw is declared [-1, -1]; dynid keeps its width, which scale refuses: the caller's
    tensor is at fault (INVALID_ARGUMENT), not a reload (UNAVAILABLE, which clients retry)."""
    with grpc.insecure_channel(served["target"]) as channel:
        stub = ipb_grpc.GRPCInferenceServiceStub(channel)
        x = np.ones((3, 4), np.float32)
        stub.ModelInfer(infer_request("loose", {"raw": x}), timeout=10)
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(infer_request("loose", {"raw": np.ones((3, 5), np.float32)}))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input 'INPUT0' of model 'scale' gets shape [3, 5]" in caught.value.details()


def test_a_step_whose_model_changed_signature_under_a_waiting_predict_is_unavailable(
    served, tmp_path
) -> None:
    """A Predict waits in scaler's queue while clfr is reloaded taking [N, 5]: the request is
    UNAVAILABLE (which clients retry), not INVALID_ARGUMENT (which told the caller to fix a
    valid request), and the ensemble stops serving, naming why."""
    keys, values = {"user_id": served["ids"][:4]}, {"amount": np.ones(4)}
    repository = served["server"].models

    async def main() -> None:
        async with (
            grpc.aio.insecure_channel(served["target"]) as channel,
            AsyncPredictionClient(ClientConfig(target=served["target"])) as client,
        ):
            call = asyncio.ensure_future(client.predict("ensr", keys, values))
            scaler = repository.get("scaler").batcher
            await until_queued(scaler)
            write_model(repository.path, "clfr", wide_clf_model())
            stub = ipb_grpc.GRPCInferenceServiceStub(channel)
            await stub.RepositoryModelLoad(ipb.RepositoryModelLoadRequest(model_name="clfr"))
            with pytest.raises(ClientError) as info:
                await asyncio.wait_for(call, 20)
            # The client retries UNAVAILABLE: its last attempt finds the ensemble stopped.
            assert info.value.code == grpc.StatusCode.UNAVAILABLE, info.value
            assert "ensr" in info.value.message and "[-1, 5]" in info.value.message
            with pytest.raises(ClientError) as info:
                await client.predict("ensr", keys, values)
            assert info.value.code == grpc.StatusCode.UNAVAILABLE
            assert "shapes differ" in info.value.message

    asyncio.run(main())
