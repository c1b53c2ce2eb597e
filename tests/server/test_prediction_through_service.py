"""Predict through a feature service (features.service): the service decides the versions read,
its lineage names it, and a service that cannot serve the binding fails naming what is wrong."""

from __future__ import annotations

from dataclasses import replace

import grpc
import numpy as np
import pytest

from benchmarks.model_zoo import mlp_model, write_model
from clients.channel import ClientConfig, ClientError
from clients.feature_client import FeatureStoreClient
from clients.prediction_client import PredictionClient
from featurestore.dtypes import DType
from featurestore.registry import Feature, FeatureService, FeatureView
from tests.conftest import featureserve
from tests.server.test_prediction_rpc import (
    NOW_US,
    STATS,
    STATS_REFS,
    USER,
    populate,
    scorer_config,
    start_server,
)

SERVICE = "scorer_features"
STATS_PLUS = replace(STATS, features=(*STATS.features, Feature("unbound", DType.FLOAT32)))
RISK_V2 = FeatureView("risk", "user", (Feature("score", DType.FLOAT64),), version=2)


def through(service: str) -> str:
    """The test scorer's config, its bound features read through `service`."""
    return scorer_config().replace("[features]\n", f'[features]\nservice = "{service}"\n', 1)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    base = tmp_path_factory.mktemp("predict_service")
    models = base / "models"
    write_model(models, "plain", mlp_model(seed=3), config_toml=scorer_config())
    write_model(models, "by_service", mlp_model(seed=3), config_toml=through(SERVICE))
    write_model(models, "pinned", mlp_model(seed=3), config_toml=through("pinned_risk"))
    write_model(models, "no_service", mlp_model(seed=3), config_toml=through("never_applied"))
    write_model(models, "short", mlp_model(seed=3), config_toml=through("short_service"))
    server, target = start_server(base)
    ids = np.arange(1, 201, dtype=np.int64)
    populate(target, ids)
    services = [
        # the whole view, with a feature the model does not bind: it is not read
        FeatureService(SERVICE, ("user_stats", "risk:score")),
        FeatureService("pinned_risk", (*STATS_REFS, "user_stats:n_tx", "risk@1:score")),
        FeatureService("short_service", tuple(STATS_REFS)),
    ]
    with FeatureStoreClient(ClientConfig(target=target, timeout_s=30)) as client:
        client.apply([USER], [STATS_PLUS], feature_services=services)
        client.apply([USER], [RISK_V2])
        client.write_features("risk", {"user_id": ids}, NOW_US, {"score": -ids * 1.0}, version=2)
    yield {"target": target, "ids": ids}
    server.shutdown()


def predict(target: str, model: str, ids: np.ndarray):
    amount = np.linspace(0, 500, len(ids))
    with PredictionClient(ClientConfig(target=target, timeout_s=30)) as client:
        return client.predict(model, {"user_id": ids}, {"amount": amount})


def test_a_service_that_reads_the_latest_scores_as_the_references_do(served) -> None:
    by_service = predict(served["target"], "by_service", served["ids"])
    plain = predict(served["target"], "plain", served["ids"])
    np.testing.assert_array_equal(by_service.scores["y"], plain.scores["y"])
    np.testing.assert_array_equal(by_service.row_status, plain.row_status)
    assert by_service.lineage.feature_service == SERVICE
    assert plain.lineage.feature_service == ""
    assert by_service.lineage.feature_views == ["user_stats@1", "risk@2"]


def test_the_service_decides_the_version_read(served) -> None:
    pinned = predict(served["target"], "pinned", served["ids"])
    latest = predict(served["target"], "plain", served["ids"])
    assert pinned.lineage.feature_views == ["user_stats@1", "risk@1"]
    assert pinned.lineage.feature_service == "pinned_risk"
    assert latest.lineage.feature_views == ["user_stats@1", "risk@2"]
    # risk@1 holds random scores for ~90% of the users (others fail: no default), risk@2 holds
    # -id for every user, so the model scores differ wherever both rows were scored
    both = pinned.ok & latest.ok
    assert both.sum() > 100
    assert not np.array_equal(pinned.scores["y"][both], latest.scores["y"][both])
    assert latest.ok.all() and not pinned.ok.all()


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("no_service", "features.service 'never_applied' is not in the feature store"),
        ("short", "feature service 'short_service' does not read user_stats:n_tx"),
    ],
)
def test_a_service_that_cannot_serve_the_binding_fails_naming_it(served, model, message) -> None:
    with pytest.raises(ClientError) as info:
        predict(served["target"], model, served["ids"][:5])
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert message in info.value.message
    assert f"{model}/config.toml" in info.value.message


def test_the_registry_keeps_a_bound_service_readable(served) -> None:
    """A new view version without a feature the service reads unpinned is refused, so a model
    bound through the service keeps its inputs: what binding by references cannot promise."""
    dropped = FeatureView("risk", "user", (Feature("other", DType.FLOAT64),), version=3)
    config = ClientConfig(target=served["target"], timeout_s=30)
    with FeatureStoreClient(config) as client, pytest.raises(ClientError) as info:
        client.apply([USER], [dropped])
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert SERVICE in info.value.message
    assert predict(served["target"], "by_service", served["ids"]).ok.all()


def test_the_cli_prints_the_service_read_through(served) -> None:
    args = ["--target", served["target"], "--keys", "1,2", "--value", "amount:float64=1,2"]
    shown = featureserve("predict", "--model", "by_service", *args)
    assert shown.returncode == 0, shown.stderr
    assert "views ['user_stats@1', 'risk@2'] through service scorer_features" in shown.stdout
    plain = featureserve("predict", "--model", "plain", *args)
    assert plain.returncode == 0, plain.stderr
    assert "through service" not in plain.stdout
