"""Predict through a feature service (features.service): the service decides the versions read,
its lineage names it, and a service that cannot serve the binding fails naming what is wrong."""

from __future__ import annotations

from dataclasses import replace

import grpc
import numpy as np
import pytest

from benchmarks.model_zoo import identity_model, mlp_model, write_model
from clients.channel import ClientConfig, ClientError
from clients.feature_client import FeatureStoreClient
from clients.prediction_client import PredictionClient
from featurestore.dtypes import DType
from featurestore.registry import Entity, Feature, FeatureService, FeatureView, JoinKey
from tests.conftest import featureserve
from tests.server.test_auth import token_toml
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


def bound(service: str, *refs: str) -> str:
    """An identity model's config: its input columns are `refs`, read through `service`."""
    columns = ", ".join(f'"{ref}"' for ref in refs)
    return (
        f'[features]\nentity = "user"\ninput = "INPUT_FP32"\nservice = "{service}"\n'
        f"[[features.columns]]\nfeatures = [{columns}]\n"
    )


RATED = bound("rate_all", "rate:a", "rate:b")
TIERED = bound("tier_v1", "tier:t")


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
    write_model(models, "rated", identity_model(["FP32"], 2), config_toml=RATED)
    write_model(models, "tiered", identity_model(["FP32"], 1), config_toml=TIERED)
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


def test_a_whole_view_service_whose_version_lost_a_bound_feature_names_it(served) -> None:
    """A whole-view reference reads whatever the view's latest version holds, so the registry
    lets a version drop a feature the model binds; Predict then names that feature."""
    rate = FeatureView("rate", "user", (Feature("a", DType.FLOAT32), Feature("b", DType.FLOAT32)))
    ids = served["ids"][:3]
    config = ClientConfig(target=served["target"], timeout_s=30)
    with FeatureStoreClient(config) as client:
        client.apply([USER], [rate], feature_services=[FeatureService("rate_all", ("rate",))])
        values = {"a": np.ones(3, np.float32), "b": np.full(3, 2, np.float32)}
        client.write_features("rate", {"user_id": ids}, NOW_US, values)
        with PredictionClient(config) as predictor:
            scored = predictor.predict("rated", {"user_id": ids}, {})
        assert scored.scores["OUTPUT_FP32"].tolist() == [[1.0, 2.0]] * 3
        client.apply([USER], [replace(rate, features=rate.features[:1], version=2)])
        with PredictionClient(config) as predictor, pytest.raises(ClientError) as info:
            predictor.predict("rated", {"user_id": ids}, {})
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert info.value.message.startswith(
        "the model's features.service 'rate_all' does not read a feature the model binds "
        "(feature 'b' is not in view 'rate' v2"
    )
    assert "rated/config.toml" in info.value.message


def test_bad_keys_are_the_callers_error_at_the_version_the_service_reads(served) -> None:
    """The service pins tier@1 (entity user); the latest, tier@2, is another entity's. Keys
    that do not fit user are the caller's INVALID_ARGUMENT, not the binding's fault."""
    shop = Entity("shop", (JoinKey("shop_id", DType.INT64),))
    tier = FeatureView("tier", "user", (Feature("t", DType.FLOAT32),))
    config = ClientConfig(target=served["target"], timeout_s=30)
    with FeatureStoreClient(config) as client:
        client.apply(
            [USER, shop], [tier], feature_services=[FeatureService("tier_v1", ("tier@1:t",))]
        )
        client.apply([shop], [replace(tier, entity="shop", version=2)])
    with PredictionClient(config) as predictor:
        assert predictor.predict("tiered", {"user_id": served["ids"][:2]}, {}).rows == 2
        with pytest.raises(ClientError) as info:
            predictor.predict("tiered", {"uid": served["ids"][:2]}, {})
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "'uid' is not a join key of entity 'user'" in info.value.message


def test_a_service_the_caller_may_not_see_is_not_named_in_its_lineage(
    server_factory, tmp_path
) -> None:
    """The service also reads a view the caller may not read: to that caller the service does
    not exist (GetFeatureService is NOT_FOUND), so its lineage names none; an admin's does."""
    write_model(tmp_path / "models", "rated", identity_model(["FP32"], 2), config_toml=RATED)
    (tmp_path / "auth.toml").write_text(
        "[auth]\nenabled = true\n"
        + token_toml("admin", "a-secret", ["admin"])
        + token_toml("scorer", "s-secret", ["infer:rated", "read:rate"])
    )
    server = server_factory("--config", str(tmp_path / "auth.toml"))
    admin = ClientConfig(target=server.target, timeout_s=30, token="a-secret")
    scorer = ClientConfig(target=server.target, timeout_s=30, token="s-secret")
    rate = FeatureView("rate", "user", (Feature("a", DType.FLOAT32), Feature("b", DType.FLOAT32)))
    secret = FeatureView("secret", "user", (Feature("x", DType.FLOAT32),))
    service = FeatureService("rate_all", ("rate", "secret:x"))
    keys = {"user_id": np.arange(2)}
    with FeatureStoreClient(admin) as client:
        client.apply([USER], [rate, secret], feature_services=[service])
        client.write_features("rate", keys, NOW_US, {"a": np.ones(2), "b": np.ones(2)})
    with PredictionClient(admin) as as_admin, PredictionClient(scorer) as as_scorer:
        assert as_admin.predict("rated", keys, {}).lineage.feature_service == "rate_all"
        hidden = as_scorer.predict("rated", keys, {})
    assert hidden.lineage.feature_service == ""
    assert hidden.lineage.feature_views == ["rate@1"]
    with FeatureStoreClient(scorer) as client, pytest.raises(ClientError) as info:
        client.get_feature_service("rate_all")
    assert info.value.code == grpc.StatusCode.NOT_FOUND
