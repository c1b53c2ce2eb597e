"""Feature services over a real server: apply, list, get, delete, lookups by service name, and
the statuses of every bad request (raw stubs, so the wire is what is tested)."""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest

from clients import feature_messages as fm
from clients import registry_messages as rm
from featurestore.dtypes import DType
from featurestore.registry import Entity, Feature, FeatureService, FeatureView, JoinKey
from protos import arrays
from protos.featureserve.v1 import feature_store_pb2 as pb
from protos.featureserve.v1 import feature_store_pb2_grpc as pb_grpc

USER = Entity("user", (JoinKey("user_id", DType.INT64),))
STATS = FeatureView(
    "stats", "user", (Feature("clicks", DType.FLOAT32), Feature("country", DType.STRING))
)
PROFILE = FeatureView("profile", "user", (Feature("age", DType.INT64),))
FRAUD = FeatureService("fraud", ("stats:clicks", "profile"), "fraud model", "risk", {"t": "1"})
IDS = np.array([3, 1, 2, 99])


@pytest.fixture(scope="module")
def stub(tmp_path_factory):
    from tests.conftest import ServerProcess

    base = tmp_path_factory.mktemp("services")
    server = ServerProcess(base / "data", base / "models").start()
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.FeatureStoreStub(channel)
        stub.ApplyFeatureViews(rm.apply_request([USER], [STATS, PROFILE]), timeout=20)
        now = time.time_ns() // 1000
        for view, columns in (
            ("stats", {"clicks": np.array([1.5, 2.5, 3.5], np.float32),
                       "country": np.array(["fr", "de", "é"], object)}),
            ("profile", {"age": np.array([30, 40, 50])}),
        ):  # fmt: skip
            request = fm.write_request(
                view, {"user_id": [1, 2, 3]}, now, columns, None, 0, "reject_batch"
            )
            stub.WriteFeatures(request, timeout=20)
        yield stub
    server.kill()


def apply(stub, *services: FeatureService, views=(), dry_run=False) -> pb.ApplyFeatureViewsResponse:
    return stub.ApplyFeatureViews(rm.apply_request([], views, dry_run, services), timeout=20)


def code_and_message(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def lookup(stub, **fields) -> pb.GetOnlineFeaturesResponse:
    keys = fm.key_columns({"user_id": IDS})
    return stub.GetOnlineFeatures(pb.GetOnlineFeaturesRequest(entity_keys=keys, **fields))


def test_apply_list_get_and_lookup_by_service(stub):
    response = apply(stub, FRAUD)
    assert [(r.view, r.version, r.feature_service, r.action) for r in response.results] == [
        ("", 0, "fraud", pb.ApplyResult.CREATED)
    ]
    got = stub.GetFeatureService(pb.GetFeatureServiceRequest(name="fraud"), timeout=20)
    assert rm.service_from_proto(got) == FRAUD and got.created_us > 0
    listed = stub.ListFeatureServices(pb.ListFeatureServicesRequest(name_prefix="fr"))
    assert [s.name for s in listed.feature_services] == ["fraud"]
    assert not stub.ListFeatureServices(
        pb.ListFeatureServicesRequest(name_prefix="x")
    ).feature_services
    by_service = lookup(stub, feature_service="fraud")
    assert by_service == lookup(stub, features=list(FRAUD.features))
    assert [(v.view, v.version) for v in by_service.views] == [("stats", 1), ("profile", 1)]
    assert by_service.rows == 4 and list(by_service.views[0].blocks[0].features) == ["clicks"]
    values = arrays.from_array(by_service.views[1].blocks[0].values)[:, 0]
    assert values[:3].tolist() == [50, 30, 40]


def test_lookup_follows_the_latest_version_of_an_unpinned_view(stub):
    apply(stub, FeatureService("whole", ("profile",)), FeatureService("pinned", ("profile@1",)))
    features = (Feature("vip", DType.BOOL), Feature("age", DType.INT64))
    v2 = FeatureView("profile", "user", features, version=2)
    stub.ApplyFeatureViews(rm.apply_request([], [v2]), timeout=20)
    (latest,) = lookup(stub, feature_service="whole").views
    assert latest.version == 2 and [list(b.features) for b in latest.blocks] == [["vip"], ["age"]]
    (pinned,) = lookup(stub, feature_service="pinned").views
    assert pinned.version == 1 and [list(b.features) for b in pinned.blocks] == [["age"]]


def test_bad_lookups(stub):
    apply(stub, FRAUD)
    code, message = code_and_message(
        lambda: lookup(stub, feature_service="fraud", features=["stats:clicks"])
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert message == (
        "features: 1 references sent with feature_service 'fraud'; send one or the other"
    )
    code, message = code_and_message(lambda: lookup(stub, feature_service="frad"))
    assert code == grpc.StatusCode.NOT_FOUND
    assert "feature service 'frad' is not registered; did you mean 'fraud'" in message
    assert "ListFeatureServices lists the services" in message


def test_bad_definitions_are_refused_whole(stub):
    cases = [
        (FeatureService("svc", ()), "features must list at least one reference"),
        (FeatureService("svc", ("stats:nope",)), "has no feature 'nope'"),
        (FeatureService("svc", ("nostats",)), "feature view 'nostats' is not registered"),
        (FeatureService("svc", ("stats", "stats:clicks")), r"reads again what features[0]"),
    ]
    for service, expected in cases:
        code, message = code_and_message(lambda s=service: apply(stub, FRAUD, s))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and expected in message, message
    names = [
        s.name for s in stub.ListFeatureServices(pb.ListFeatureServicesRequest()).feature_services
    ]
    assert "svc" not in names


def test_changes_that_would_break_a_service_are_refused(stub):
    apply(stub, FRAUD)
    v2 = FeatureView("stats", "user", (Feature("country", DType.STRING),), version=2)
    code, message = code_and_message(
        lambda: stub.ApplyFeatureViews(rm.apply_request([], [v2]), timeout=20)
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "would break feature service 'fraud'" in message and "'stats:clicks'" in message
    request = pb.DeleteFeatureViewRequest(name="stats", version=1)
    code, message = code_and_message(lambda: stub.DeleteFeatureView(request, timeout=20))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "deleting feature view 'stats' v1 would break feature service 'fraud'" in message
    assert stub.GetFeatureView(pb.GetFeatureViewRequest(name="stats")).version == 1


def test_get_and_delete(stub):
    apply(stub, FeatureService("temp", ("stats:country",)), dry_run=True)
    get = pb.GetFeatureServiceRequest(name="temp")
    assert code_and_message(lambda: stub.GetFeatureService(get))[0] == grpc.StatusCode.NOT_FOUND
    apply(stub, FeatureService("temp", ("stats:country",)))
    assert stub.GetFeatureService(get).features == ["stats:country"]
    stub.DeleteFeatureService(pb.DeleteFeatureServiceRequest(name="temp"), timeout=20)
    assert code_and_message(lambda: stub.GetFeatureService(get))[0] == grpc.StatusCode.NOT_FOUND
    again = pb.DeleteFeatureServiceRequest(name="temp")
    assert (
        code_and_message(lambda: stub.DeleteFeatureService(again))[0] == grpc.StatusCode.NOT_FOUND
    )
    for call in (
        lambda: stub.GetFeatureService(pb.GetFeatureServiceRequest()),
        lambda: stub.DeleteFeatureService(pb.DeleteFeatureServiceRequest()),
    ):
        code, message = code_and_message(call)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and message.startswith("name: empty")
