"""MessageSizeInterceptor over a real featureserve server: bytes that are not the method's request
message, on every kind of method, and the advice a response over max_message_bytes gives."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from benchmarks.model_zoo import identity_model, write_model
from featurestore.errors import ResourceExhaustedError
from protos.featureserve.v1 import prediction_pb2
from protos.inference import grpc_service_pb2 as pb
from server.message_size import MessageLimit

GARBAGE = b"\xff\xff\xff"
"""Not a protobuf message of any type: a field tag that is a truncated varint."""
FIX = "check that the client sends this method's request message type"


def identity(raw: bytes) -> bytes:
    return raw


@pytest.mark.parametrize(
    ("method", "message_type", "client_streaming"),
    [
        ("/inference.GRPCInferenceService/ModelInfer", "inference.ModelInferRequest", False),
        ("/featureserve.v1.Prediction/Predict", "featureserve.v1.PredictRequest", False),
        (
            "/featureserve.v1.FeatureStore/StreamWriteFeatures",
            "featureserve.v1.WriteFeaturesRequest",
            True,
        ),
    ],
)
def test_an_unparseable_request_ends_the_call_invalid_argument(
    server_factory, method: str, message_type: str, client_streaming: bool
) -> None:
    """A unary or client-streaming call whose request is not its message type ends
    INVALID_ARGUMENT naming the method and the type (it ended UNKNOWN "DecodeError")."""
    server = server_factory()
    with grpc.insecure_channel(server.target) as channel:
        if client_streaming:
            call, request = channel.stream_unary(method), iter([GARBAGE])
        else:
            call, request = channel.unary_unary(method), GARBAGE
        with pytest.raises(grpc.RpcError) as info:
            call(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    details = info.value.details()
    assert method.lstrip("/") in details and f"not a valid {message_type}" in details
    assert FIX in details


def test_an_unparseable_stream_request_is_answered_in_its_place(tmp_path, server_factory) -> None:
    """On ModelStreamInfer and StreamPredict an unparseable request gets an error answer naming
    its position, and the requests around it are answered in order."""
    write_model(tmp_path / "models", "m", identity_model(["FP32"]))
    server = server_factory()
    infer = pb.ModelInferRequest(model_name="m", id="good")
    infer.inputs.add(name="INPUT_FP32", datatype="FP32", shape=[1, 3])
    infer.raw_input_contents.append(np.ones((1, 3), np.float32).tobytes())
    good = infer.SerializeToString()
    predict = [
        prediction_pb2.PredictRequest(model="nope", request_id=f"p{i}").SerializeToString()
        for i in range(2)
    ]
    with grpc.insecure_channel(server.target) as channel:
        model_stream = channel.stream_stream(
            "/inference.GRPCInferenceService/ModelStreamInfer",
            request_serializer=identity,
            response_deserializer=pb.ModelStreamInferResponse.FromString,
        )
        answers = list(model_stream(iter([good, GARBAGE, good]), timeout=60))
        predict_stream = channel.stream_stream(
            "/featureserve.v1.Prediction/StreamPredict",
            request_serializer=identity,
            response_deserializer=prediction_pb2.PredictResponse.FromString,
        )
        predictions = list(predict_stream(iter([predict[0], GARBAGE, predict[1]]), timeout=60))
    assert [a.infer_response.id for a in answers] == ["good", "", "good"]
    assert not answers[0].error_message and not answers[2].error_message
    bad = answers[1].error_message
    assert "ModelStreamInfer" in bad and "not a valid inference.ModelInferRequest" in bad
    assert FIX in bad and "it answers request 1 of the stream" in bad
    assert [p.request_id for p in predictions] == ["p0", "", "p1"]
    not_found = grpc.StatusCode.NOT_FOUND.value[0]
    assert [p.error_code for p in predictions] == [
        not_found,
        grpc.StatusCode.INVALID_ARGUMENT.value[0],
        not_found,
    ]
    bad = predictions[1].error_message
    assert "StreamPredict" in bad and "not a valid featureserve.v1.PredictRequest" in bad
    assert "it answers request 1 of the stream" in bad


@pytest.mark.parametrize(
    ("method", "advice"),
    [
        (
            "/inference.GRPCInferenceService/ModelInfer",
            "send fewer rows per request or request fewer outputs",
        ),
        (
            "/inference.GRPCInferenceService/ModelStreamInfer",
            "send fewer rows per request or request fewer outputs",
        ),
        ("/featureserve.v1.Prediction/Predict", "send fewer entities per request"),
        (
            "/featureserve.v1.FeatureStore/GetOnlineFeatures",
            "ask for fewer entities or features per call (max_entities_per_request=500",
        ),
    ],
)
def test_a_response_over_the_limit_gives_its_services_advice(method: str, advice: str) -> None:
    """The response advice fits the service: only the feature store's names its entity cap."""
    error = MessageLimit(limit=1000, max_entities=500).error(method, "response", 2000)
    assert isinstance(error, ResourceExhaustedError)
    message = str(error)
    assert message.startswith(f"{method.lstrip('/')}: the response is 2000 bytes")
    assert advice in message and "raise max_message_bytes in the server config" in message
    if "FeatureStore" not in method:
        assert "max_entities_per_request" not in message
