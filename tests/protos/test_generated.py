"""The committed generated code matches the .proto files, and staleness is detected."""

from __future__ import annotations

import shutil
from pathlib import Path

from protos import generate
from protos.featureserve.v1 import feature_store_pb2, prediction_pb2
from protos.inference import grpc_service_pb2


def test_committed_code_is_fresh() -> None:
    assert generate.stale_files() == []


def test_edited_proto_is_detected_as_stale(tmp_path: Path) -> None:
    shutil.copytree(generate.ROOT / "protos", tmp_path / "protos")
    proto = tmp_path / "protos" / "featureserve" / "v1" / "types.proto"
    proto.write_text(proto.read_text() + "\nmessage AddedLater { int32 x = 1; }\n")
    assert "protos/featureserve/v1/types_pb2.py" in generate.stale_files(tmp_path)


def test_services_have_every_rpc_of_the_contract() -> None:
    methods = {
        s.full_name: sorted(m.name for m in s.methods)
        for f in (feature_store_pb2, prediction_pb2, grpc_service_pb2)
        for s in f.DESCRIPTOR.services_by_name.values()
    }
    assert methods["featureserve.v1.FeatureStore"] == sorted(
        ["GetOnlineFeatures", "WriteFeatures", "StreamWriteFeatures", "ListFeatureViews",
         "GetFeatureView", "ApplyFeatureViews", "DeleteFeatureView", "ListFeatureServices",
         "GetFeatureService", "DeleteFeatureService"]
    )  # fmt: skip
    assert methods["featureserve.v1.Prediction"] == ["Predict", "StreamPredict"]
    assert set(methods["inference.GRPCInferenceService"]) >= {
        "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata",
        "ModelInfer", "ModelStreamInfer", "ModelStatistics", "RepositoryIndex",
        "RepositoryModelLoad", "RepositoryModelUnload",
    }  # fmt: skip


def test_kserve_field_numbers_match_the_specification() -> None:
    req = grpc_service_pb2.ModelInferRequest.DESCRIPTOR.fields_by_name
    numbers = {name: req[name].number for name in req}
    assert numbers == {
        "model_name": 1, "model_version": 2, "id": 3, "parameters": 4, "inputs": 5,
        "outputs": 6, "raw_input_contents": 7,
    }  # fmt: skip
    resp = grpc_service_pb2.ModelInferResponse.DESCRIPTOR.fields_by_name
    assert resp["raw_output_contents"].number == 6
    assert resp["outputs"].number == 5
    stream = grpc_service_pb2.ModelStreamInferResponse.DESCRIPTOR.fields_by_name
    assert (stream["error_message"].number, stream["infer_response"].number) == (1, 2)
    stats = grpc_service_pb2.InferStatistics.DESCRIPTOR.fields_by_name
    assert [stats[n].number for n in ("success", "fail", "queue", "compute_input",
            "compute_infer", "compute_output")] == [1, 2, 3, 4, 5, 6]  # fmt: skip
