"""GetOnlineFeatures over views of several entities in one call, on a real server: each view is
read by its own entity's join keys, rows stay aligned, and Predict (one entity) is unchanged."""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest

from benchmarks.model_zoo import identity_model, write_model
from clients.channel import ClientConfig, ClientError
from clients.feature_client import FeatureStoreClient
from clients.prediction_client import PredictionClient
from featurestore.dtypes import DType, FeatureStatus
from featurestore.registry import Entity, Feature, FeatureView, JoinKey

DRIVER = Entity("driver", (JoinKey("driver_id", DType.INT64),))
CUSTOMER = Entity(
    "customer", (JoinKey("region", DType.STRING), JoinKey("customer_no", DType.INT64))
)
VIEWS = [
    FeatureView("t6_driver", "driver", (Feature("rating", DType.FLOAT32),)),
    FeatureView("t6_customer", "customer", (Feature("spend", DType.FLOAT64),)),
    FeatureView("trip", "driver", (Feature("x", DType.INT64),), version=1),
    FeatureView("trip", "customer", (Feature("x", DType.INT64),), version=2),
]
NOW_US = int(time.time() * 1e6)
PRESENT, NOT_FOUND = FeatureStatus.PRESENT, FeatureStatus.NOT_FOUND
ROWS = {
    "driver_id": np.array([1, 2, 99], np.int64),
    "region": np.array(["eu", "us", "eu"], object),
    "customer_no": np.array([10, 11, 12], np.int64),
}
"""Three entity rows, each carrying both entities' keys: drivers 1 and 2 and customers
(eu, 10) and (eu, 12) are stored, so the views find different rows."""


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from tests.conftest import ServerProcess

    base = tmp_path_factory.mktemp("entities")
    write_model(base / "models", "rater", identity_model(["FP32"], 1), config_toml=(
        '[features]\nentity = "driver"\ninput = "INPUT_FP32"\n'
        '[[features.columns]]\nfeature = "t6_driver:rating"\ndefault = -1.0\n'
    ))  # fmt: skip
    server = ServerProcess(base / "data", base / "models").start()
    config = ClientConfig(target=server.target, timeout_s=20)
    with FeatureStoreClient(config) as client:
        client.apply([DRIVER, CUSTOMER], VIEWS)
        drivers = {"driver_id": np.array([1, 2], np.int64)}
        customers = {"region": np.array(["eu", "eu"], object), "customer_no": np.int64([10, 12])}
        client.write_features("t6_driver", drivers, NOW_US, {"rating": np.float32([4.5, 3.0])})
        client.write_features("t6_customer", customers, NOW_US - 5, {"spend": [7.25, 100.0]})
        client.write_features("trip", drivers, NOW_US, {"x": np.int64([21, 22])}, version=1)
        client.write_features("trip", customers, NOW_US, {"x": np.int64([310, 312])}, version=2)
        yield config
    server.kill()


def test_one_lookup_reads_views_of_two_entities_row_by_row(served) -> None:
    with FeatureStoreClient(served) as client:
        got = client.get_online_features(["t6_driver:rating", "t6_customer:spend"], ROWS)
        trips = client.get_online_features(["trip@1:x", "trip@2:x"], ROWS)
    assert got.rows == 3
    np.testing.assert_array_equal(got["t6_driver:rating"][:2], np.float32([4.5, 3.0]))
    assert got.statuses["t6_driver:rating"].tolist() == [PRESENT, PRESENT, NOT_FOUND]
    assert got.event_timestamps["t6_driver"].tolist() == [NOW_US, NOW_US, 0]
    assert got["t6_customer:spend"][[0, 2]].tolist() == [7.25, 100.0]
    assert got.statuses["t6_customer:spend"].tolist() == [PRESENT, NOT_FOUND, PRESENT]
    assert got.event_timestamps["t6_customer"].tolist() == [NOW_US - 5, 0, NOW_US - 5]
    assert trips["trip@1:x"][:2].tolist() == [21, 22]
    assert trips.statuses["trip@1:x"].tolist() == [PRESENT, PRESENT, NOT_FOUND]
    assert trips["trip@2:x"][[0, 2]].tolist() == [310, 312]
    assert trips.statuses["trip@2:x"].tolist() == [PRESENT, NOT_FOUND, PRESENT]
    assert trips.versions == {"trip@1": 1, "trip@2": 2}


def test_a_missing_or_unknown_key_column_is_named(served) -> None:
    features = ["t6_driver:rating", "t6_customer:spend"]
    missing = {"driver_id": ROWS["driver_id"], "customer_no": ROWS["customer_no"]}
    unknown = {**ROWS, "store_id": np.int64([1, 2, 3])}
    with FeatureStoreClient(served) as client:
        with pytest.raises(ClientError) as info:
            client.get_online_features(features, missing)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        for fragment in ("'region' is missing", "'t6_customer' v1", "add a 'region' column"):
            assert fragment in info.value.message
        with pytest.raises(ClientError) as info:
            client.get_online_features(features, unknown)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "'store_id' is a join key of none of the views read" in info.value.message
        assert "driver_id, region, customer_no" in info.value.message


def test_predict_reads_its_one_entity_as_before(served) -> None:
    with PredictionClient(served) as client:
        result = client.predict("rater", {"driver_id": ROWS["driver_id"]})
        with pytest.raises(ClientError) as info:
            client.predict("rater", ROWS)
    assert result.ok.all()
    np.testing.assert_array_equal(result.scores["OUTPUT_FP32"][:, 0], [4.5, 3.0, -1.0])
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a join key of entity 'driver'" in info.value.message
