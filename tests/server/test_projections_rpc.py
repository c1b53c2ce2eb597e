"""Feature service projections over a real server: apply and lookups on the wire (ViewResult
named by the alias, projection_of the view), the statuses of refusals, visibility under auth,
the CLI's get, list, describe and training-set, and Predict reading a projection."""

from __future__ import annotations

import csv
import json
import re
import time

import grpc
import numpy as np
import pyarrow.parquet as pq
import pytest

from benchmarks.model_zoo import identity_model, write_model
from clients import feature_messages as fm
from clients.channel import ClientConfig, ClientError
from clients.feature_client import FeatureStoreClient
from clients.prediction_client import PredictionClient
from featurestore.dtypes import DType, FeatureStatus
from featurestore.registry import (
    Entity,
    Feature,
    FeatureProjection,
    FeatureService,
    FeatureView,
    JoinKey,
)
from protos import arrays
from protos.featureserve.v1 import feature_store_pb2_grpc as pb_grpc
from tests.conftest import ServerProcess, featureserve
from tests.server.test_auth import token_toml

USER = Entity("user", (JoinKey("user_id", DType.INT64),))
LOCATION = Entity("location", (JoinKey("location_id", DType.INT64),))
USER_STATS = FeatureView("user_stats", "user", (Feature("clicks", DType.FLOAT32),))
LOCATION_STATS = FeatureView(
    "location_stats",
    "location",
    (Feature("avg_amount", DType.FLOAT64), Feature("n_tx", DType.INT64)),
)
ORIGIN = FeatureProjection(
    "location_stats", "origin", ("avg_amount",), {"location_id": "origin_id"}
)
DESTINATION = FeatureProjection("location_stats", "destination", (), {"location_id": "dest_id"})
TRANSFER = FeatureService("transfer", ("user_stats:clicks",), projections=(ORIGIN, DESTINATION))
LOCATIONS = np.arange(10, 20)
KEYS = {
    "user_id": np.array([1, 2, 3]),
    "origin_id": np.array([10, 11, 99]),
    "dest_id": np.array([19, 10, 12]),
}
BY_PROJECTION = (
    '[features]\ninput = "INPUT_FP32"\nservice = "transfer"\n'
    '[[features.columns]]\nfeatures = ["origin:avg_amount"]\n'
)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    base = tmp_path_factory.mktemp("projections")
    write_model(
        base / "models", "by_projection", identity_model(["FP32"], 1), config_toml=BY_PROJECTION
    )
    (base / "auth.toml").write_text(
        "[auth]\nenabled = true\n"
        + token_toml("admin", "a-secret", ["admin"])
        + token_toml("both", "b-secret", ["read:user_stats", "read:location_stats"])
        + token_toml("users", "u-secret", ["read:user_stats"])
    )
    server = ServerProcess(base / "data", base / "models", "--config", str(base / "auth.toml"))
    server.start()
    now = time.time_ns() // 1000
    with FeatureStoreClient(config(server, "a-secret")) as client:
        client.apply([USER, LOCATION], [USER_STATS, LOCATION_STATS], feature_services=[TRANSFER])
        amounts = {"avg_amount": LOCATIONS * 1.5, "n_tx": LOCATIONS * 3}
        client.write_features("location_stats", {"location_id": LOCATIONS}, now - 10**6, amounts)
        clicks = {"clicks": np.arange(5, dtype=np.float32)}
        client.write_features("user_stats", {"user_id": np.arange(5)}, now - 10**6, clicks)
    yield {"server": server, "base": base}
    server.kill()


def config(server: ServerProcess, token: str) -> ClientConfig:
    return ClientConfig(target=server.target, timeout_s=30, token=token)


def admin(served) -> FeatureStoreClient:
    return FeatureStoreClient(config(served["server"], "a-secret"))


def test_apply_round_trip_and_a_lookup_equal_to_plain_lookups(served):
    with admin(served) as client:
        assert client.get_feature_service("transfer") == TRANSFER
        got = client.get_online_features(keys=KEYS, feature_service="transfer")
        origin = client.get_online_features(
            ["location_stats:avg_amount"], {"location_id": KEYS["origin_id"]}
        )
        dest = client.get_online_features(["location_stats"], {"location_id": KEYS["dest_id"]})
    with grpc.insecure_channel(served["server"].target) as channel:
        raw = pb_grpc.FeatureStoreStub(channel).GetOnlineFeatures(
            fm.get_request(None, KEYS, "transfer"),
            metadata=(("authorization", "Bearer a-secret"),),
            timeout=30,
        )
    assert [(v.view, v.version, v.projection_of) for v in raw.views] == [
        ("user_stats", 1, ""),
        ("origin", 1, "location_stats"),
        ("destination", 1, "location_stats"),
    ]
    assert got.projection_of == {"origin": "location_stats", "destination": "location_stats"}
    assert sorted(got.values) == [
        "destination:avg_amount",
        "destination:n_tx",
        "origin:avg_amount",
        "user_stats:clicks",
    ]
    assert got.versions == {"user_stats": 1, "origin": 1, "destination": 1}
    for alias, plain in (("origin", origin), ("destination", dest)):
        for name, values in plain.values.items():
            feature = name.partition(":")[2]
            np.testing.assert_array_equal(got[f"{alias}:{feature}"], values)
            np.testing.assert_array_equal(got.statuses[f"{alias}:{feature}"], plain.statuses[name])
        np.testing.assert_array_equal(
            got.event_timestamps[alias], plain.event_timestamps["location_stats"]
        )
    assert got["origin:avg_amount"][:2].tolist() == [15.0, 16.5]
    assert got["destination:avg_amount"].tolist() == [28.5, 15.0, 18.0]
    assert got.statuses["origin:avg_amount"][2] == FeatureStatus.NOT_FOUND


def keyed_by_view(response) -> tuple[dict[str, list], dict[str, int]]:
    """Columns and versions keyed as a client built before projections keys them (HEAD's
    online_features, a grpcurl script): "ViewResult.view:feature" and ViewResult.view, a later
    result of one name overwriting an earlier one."""
    columns, versions = {}, {}
    for view in response.views:
        versions[view.view] = view.version
        for block in view.blocks:
            values = arrays.from_array(block.values, "block")
            for j, name in enumerate(block.features):
                columns[f"{view.view}:{name}"] = values[:, j].tolist()
    return columns, versions


def test_a_client_keying_by_view_gets_every_column_of_two_projections_and_a_reference(served):
    """Clients built before projections key results by ViewResult.view alone: each projection
    answers its alias there, so two projections of one view and a plain reference to it stay
    apart instead of overwriting each other."""
    mixed = FeatureService("mixed", ("location_stats:n_tx",), projections=(ORIGIN, DESTINATION))
    keys = {
        "location_id": np.array([12, 13, 14]),
        "origin_id": np.array([10, 11, 99]),
        "dest_id": np.array([19, 10, 12]),
    }
    with admin(served) as client:
        client.apply([], [], feature_services=[mixed])
        try:
            with grpc.insecure_channel(served["server"].target) as channel:
                raw = pb_grpc.FeatureStoreStub(channel).GetOnlineFeatures(
                    fm.get_request(None, keys, "mixed"),
                    metadata=(("authorization", "Bearer a-secret"),),
                    timeout=30,
                )
            got = client.get_online_features(keys=keys, feature_service="mixed")
            plain = {
                column: client.get_online_features(["location_stats"], {"location_id": values})
                for column, values in keys.items()
            }
        finally:
            client.delete_feature_service("mixed")
    columns, versions = keyed_by_view(raw)

    def read(column: str, feature: str) -> list:
        return plain[column][f"location_stats:{feature}"].tolist()

    assert columns == {
        "location_stats:n_tx": read("location_id", "n_tx"),
        "origin:avg_amount": read("origin_id", "avg_amount"),
        "destination:avg_amount": read("dest_id", "avg_amount"),
        "destination:n_tx": read("dest_id", "n_tx"),
    }
    assert columns["origin:avg_amount"][:2] == [15.0, 16.5]
    assert versions == {"location_stats": 1, "origin": 1, "destination": 1}
    assert {name: values.tolist() for name, values in got.values.items()} == columns
    assert got.versions == versions
    assert got.projection_of == {"origin": "location_stats", "destination": "location_stats"}


def rpc_error(call) -> ClientError:
    with pytest.raises(ClientError) as info:
        call()
    return info.value


def test_refusals_name_the_projection(served):
    bad = FeatureService(
        "bad", (), projections=(FeatureProjection("location_stats", "o", ("avg_amunt",)),)
    )
    with admin(served) as client:
        refused = rpc_error(lambda: client.apply([], [], feature_services=[bad]))
        assert refused.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "projections[0] (o): feature view 'location_stats' v1 (its latest) has no " in (
            refused.message
        )
        assert "did you mean 'avg_amount'" in refused.message
        assert "fix its view, features or join_key_map, or drop it" in refused.message
        assert "that reference" not in refused.message
        missing = {k: v for k, v in KEYS.items() if k != "origin_id"}
        refused = rpc_error(
            lambda: client.get_online_features(keys=missing, feature_service=TRANSFER)
        )
        assert refused.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "key column 'origin_id' is missing: projection 'origin'" in refused.message
        dropped = FeatureView(
            "location_stats", "location", (Feature("n_tx", DType.INT64),), version=2
        )
        refused = rpc_error(lambda: client.apply([], [dropped]))
        assert refused.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "feature service 'transfer': projections[0] (origin)" in refused.message
        assert 'version that has what it reads (view = "location_stats@1" in its ' in (
            refused.message
        )
        assert "'view@1:feature'" not in refused.message
        pinned = FeatureService(
            "pinned", (), projections=(FeatureProjection("location_stats@1", "o"),)
        )
        client.apply([], [], feature_services=[pinned])
        refused = rpc_error(lambda: client.delete_feature_view("location_stats", 1))
        assert refused.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "break feature service 'pinned': projections[0] (o)" in refused.message
        client.delete_feature_service("pinned")


def test_a_caller_sees_a_service_only_if_it_sees_every_projected_view(served):
    server = served["server"]
    with FeatureStoreClient(config(server, "u-secret")) as users:
        assert [s.name for s in users.list_feature_services()] == []
        hidden = rpc_error(lambda: users.get_feature_service("transfer"))
        assert hidden.code == grpc.StatusCode.NOT_FOUND
        hidden = rpc_error(lambda: users.get_online_features(keys=KEYS, feature_service="transfer"))
        assert hidden.code == grpc.StatusCode.NOT_FOUND
    with FeatureStoreClient(config(server, "b-secret")) as both:
        assert [s.name for s in both.list_feature_services()] == ["transfer"]
        got = both.get_online_features(keys=KEYS, feature_service="transfer")
        assert got["origin:avg_amount"][0] == 15.0


def test_cli_get_and_describe_show_the_projections(served):
    flags = ["--target", served["server"].target, "--token", "a-secret"]
    shown = featureserve(
        "get", "--feature-service", "transfer", *flags,
        "--entity", "user_id=1", "--entity", "origin_id=10", "--entity", "dest_id=19",
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert "origin (location_stats@1):" in shown.stdout
    assert "origin:avg_amount = 15.0 (PRESENT)" in shown.stdout
    assert "destination:avg_amount = 28.5 (PRESENT)" in shown.stdout
    described = featureserve("describe", "service", "transfer", *flags)
    assert described.returncode == 0, described.stderr
    assert "projections (2):" in described.stdout
    assert "location_id=origin_id" in described.stdout
    as_json = json.loads(featureserve("describe", "service", "transfer", "--json", *flags).stdout)
    assert as_json["views"] == ["user_stats"]  # the references' views; projections apart
    assert [p["alias"] for p in as_json["projections"]] == ["origin", "destination"]
    listed = featureserve("list", "services", *flags)
    # REFERENCES counts the projections too: a service of projections only is no empty one
    row = r"^transfer +3 +user_stats, location_stats as origin, location_stats as destination "
    assert re.search(row, listed.stdout, re.MULTILINE), listed.stdout


def test_cli_training_set_matches_the_lookup(served, tmp_path):
    labels = tmp_path / "labels.csv"
    now = time.time_ns() // 1000
    with labels.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["user_id", "origin_id", "dest_id", "event_timestamp"])
        for row in zip(*KEYS.values(), strict=True):
            writer.writerow([*row, now])
    out = tmp_path / "train.parquet"
    made = featureserve(
        "training-set", str(labels), "--feature-service", "transfer", "--out", str(out),
        "--data-dir", str(served["base"] / "data"),
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    table = pq.read_table(out).to_pydict()
    with admin(served) as client:
        served_now = client.get_online_features(keys=KEYS, feature_service="transfer")
    for column in ("origin:avg_amount", "destination:avg_amount", "destination:n_tx"):
        present = served_now.statuses[column] == FeatureStatus.PRESENT
        expected = [
            v if p else None for v, p in zip(served_now[column].tolist(), present, strict=True)
        ]
        assert table[column] == expected
    assert table["origin:avg_amount__status"] == ["PRESENT", "PRESENT", "NOT_FOUND"]
    assert "origin__event_timestamp" in table and "location_stats:avg_amount" not in table
    no_dest = tmp_path / "no_dest.csv"
    no_dest.write_text("user_id,origin_id,event_timestamp\n1,10,0\n")
    refused = featureserve(
        "training-set", str(no_dest), "--feature-service", "transfer", "--out", str(out),
        "--data-dir", str(served["base"] / "data"),
    )  # fmt: skip
    assert refused.returncode == 2
    assert "no column 'dest_id' (a join key column projection 'destination' needs, for join " in (
        refused.stderr
    )
    assert "key 'location_id' of feature view 'location_stats')" in refused.stderr


def test_predict_reads_a_binding_that_names_a_projection_by_its_columns(served):
    """tests/server/test_predict_projections.py covers Predict through projections in full."""
    with PredictionClient(config(served["server"], "a-secret")) as predictor:
        scored = predictor.predict("by_projection", {"origin_id": KEYS["origin_id"]}, {})
    assert scored.scores["OUTPUT_FP32"][:2].tolist() == [[15.0], [16.5]]
    assert scored.ok.tolist() == [True, True, False]
    assert scored.lineage.feature_views == ["location_stats@1"]
    assert scored.lineage.feature_view_aliases == ["origin"]
