"""Registry errors as a real server sends them: NOT_FOUND on a large registry stays short and
suggests the closest names (only those the caller's token may see), and one apply that declares
an entity, or a view and version, twice is refused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

from benchmarks.model_zoo import identity_model, write_model
from clients.channel import ClientConfig, ClientError
from clients.feature_client import FeatureStoreClient
from clients.prediction_client import PredictionClient
from featurestore.dtypes import DType
from featurestore.registry import Entity, Feature, FeatureView, JoinKey
from protos.featureserve.v1 import feature_store_pb2 as pb
from protos.featureserve.v1 import feature_store_pb2_grpc as pb_grpc
from tests.server.test_auth import token_toml

REPO = Path(__file__).resolve().parents[2]
USER = Entity("user", (JoinKey("user_id", DType.INT64),))
CLICKS = Feature("clicks", DType.FLOAT32)
TOKENS = {
    "admin": ("admin-secret", ["admin"]),
    "growth": ("growth-secret", ["read:user_*", "write:user_*"]),
    "scorer": ("scorer-secret", ["infer:rater", "read:user_*"]),
}
RATER = (  # bound to a misspelt view: each Predict fails NOT_FOUND, suggesting views
    '[features]\nentity = "user"\ninput = "INPUT_FP32"\n'
    '[[features.columns]]\nfeature = "user_stat:clicks"\ndefault = -1.0\n'
)


def failure(call) -> ClientError:
    with pytest.raises(ClientError) as info:
        call()
    return info.value


def test_a_typo_on_a_large_registry_gets_a_short_not_found(server) -> None:
    """With 800 features in a view and 700 views, the NOT_FOUND message listed them all and the
    client saw RESOURCE_EXHAUSTED (metadata over 16 KiB); now it names the closest few."""
    wide = FeatureView(
        "wide", "user", tuple(Feature(f"txn_amount_sum_{i:04d}", DType.FLOAT32) for i in range(800))
    )
    teams = [FeatureView(f"team_view_{i:04d}", "user", (CLICKS,)) for i in range(700)]
    with FeatureStoreClient(ClientConfig(target=server.target, timeout_s=60)) as client:
        client.apply([USER], [wide, *teams])
        keys = {"user_id": np.array([1])}
        typo_feature = failure(
            lambda: client.get_online_features(["wide:txn_amount_sum_0799x"], keys)
        )
        typo_view = failure(lambda: client.get_feature_view("team_view_0042_"))
        typo_write = failure(
            lambda: client.write_features(
                "team_view_0042_", keys, np.datetime64("now"), {"clicks": np.float32([1])}
            )
        )
        long_name = failure(lambda: client.get_feature_view("team_view_" + "x" * 100_000))
    assert typo_feature.code == grpc.StatusCode.NOT_FOUND, typo_feature.message[:200]
    assert typo_feature.message.startswith(
        "feature 'txn_amount_sum_0799x' is not in view 'wide' v1; did you mean "
        "'txn_amount_sum_0799', "
    )
    for error in (typo_view, typo_write):
        assert error.code == grpc.StatusCode.NOT_FOUND, error.message[:200]
        assert error.message.startswith(
            "feature view 'team_view_0042_' is not registered; did you mean 'team_view_0042', "
        )
        assert "more close names)? ListFeatureViews lists the views" in error.message
    assert long_name.code == grpc.StatusCode.NOT_FOUND, long_name.message[:200]
    assert "... (100010 characters) is not registered" in long_name.message
    for error in (typo_feature, typo_view, typo_write, long_name):
        assert len(error.message) < 600


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    """A server with auth on: `admin` holds admin, `growth` only read:user_* and write:user_*,
    `scorer` infer:rater and read:user_*; model `rater` reads the unknown view user_stat."""
    from tests.conftest import ServerProcess

    base = tmp_path_factory.mktemp("registry_errors")
    write_model(base / "models", "rater", identity_model(["FP32"], 1), config_toml=RATER)
    config = base / "featureserve.toml"
    config.write_text(
        "[auth]\nenabled = true\n"
        + "".join(token_toml(name, secret, scopes) for name, (secret, scopes) in TOKENS.items())
    )
    server = ServerProcess(base / "data", base / "models", "--config", str(config)).start()
    yield server
    server.kill()


def client_as(server, token: str) -> FeatureStoreClient:
    return FeatureStoreClient(
        ClientConfig(target=server.target, timeout_s=20, token=TOKENS[token][0])
    )


def test_suggestions_name_only_views_the_token_may_see(secured) -> None:
    """A token with read:user_* that misspelt a view heard of fraud_user_stats, which
    ListFeatureViews hides from it (also in a stream's failure, which quotes the error); an
    admin still hears of both."""
    keys = {"user_id": np.array([1])}

    def stream_write(client: FeatureStoreClient) -> None:
        with client.stream_writer("user_stat") as writer:
            writer.write(keys, np.datetime64("now"), {"clicks": np.float32([1])})

    with client_as(secured, "admin") as admin, client_as(secured, "growth") as growth:
        admin.apply(
            [USER], [FeatureView(n, "user", (CLICKS,)) for n in ("user_stats", "fraud_user_stats")]
        )
        assert [v.name for v in growth.list_feature_views()[1]] == ["user_stats"]
        seen = failure(lambda: growth.get_online_features(["user_stat:clicks"], keys))
        by_admin = failure(lambda: admin.get_online_features(["user_stat:clicks"], keys))
        unseen_only = failure(lambda: growth.get_feature_view("user_fraud_user_stats"))
        streamed = failure(lambda: stream_write(growth))
    assert seen.code == by_admin.code == grpc.StatusCode.NOT_FOUND
    assert seen.message == (
        "feature view 'user_stat' is not registered; did you mean 'user_stats'? "
        "ListFeatureViews lists the views"
    )
    assert "'user_stats'" in by_admin.message and "'fraud_user_stats'" in by_admin.message
    for error in (unseen_only, streamed):
        assert error.code == grpc.StatusCode.NOT_FOUND, error.message[:200]
        assert "did you mean 'user_stats'?" in error.message
        assert "'fraud_user_stats'" not in error.message


def test_predict_errors_suggest_only_views_the_token_may_see(secured) -> None:
    """StreamPredict (and ModelStreamInfer) put the error in the answer, where it quoted every
    close view; unary Predict's status already kept to the token's views."""
    views = [FeatureView(n, "user", (CLICKS,)) for n in ("user_stats", "fraud_user_stats")]
    with client_as(secured, "admin") as admin:
        admin.apply([USER], views)
    config = ClientConfig(target=secured.target, timeout_s=20, token=TOKENS["scorer"][0])
    keys = {"user_id": np.array([1])}
    with PredictionClient(config) as client:
        unary = failure(lambda: client.predict("rater", keys))
        (streamed,) = list(client.stream([{"model": "rater", "keys": keys}]))
    # the request is fine, the model's binding is not: FAILED_PRECONDITION quoting the NOT_FOUND
    assert unary.code == streamed.error.code == grpc.StatusCode.FAILED_PRECONDITION
    for message in (unary.message, streamed.error.message):
        assert "did you mean 'user_stats'?" in message
        assert "fraud_user_stats" not in message


def test_apply_refuses_an_entity_or_view_given_twice(secured) -> None:
    """ApplyFeatureViews merged a view declared twice (created, then updated) and kept the
    last of two entities of one name; now it is INVALID_ARGUMENT naming both positions."""

    def apply(request: pb.ApplyFeatureViewsRequest) -> grpc.RpcError:
        with grpc.insecure_channel(secured.target) as channel:
            stub = pb_grpc.FeatureStoreStub(channel)
            metadata = (("authorization", f"Bearer {TOKENS['admin'][0]}"),)
            with pytest.raises(grpc.RpcError) as info:
                stub.ApplyFeatureViews(request, metadata=metadata, timeout=20)
        return info.value

    entity = pb.Entity(name="dupe", join_keys=[pb.JoinKey(name="k", dtype=DType.INT64)])
    a, b = (pb.FeatureSpec(name=name, dtype=DType.FLOAT32) for name in "ab")
    first = pb.FeatureView(name="dupv", entity="dupe", features=[a])
    second = pb.FeatureView(name="dupv", entity="dupe", features=[a, b])
    views = apply(pb.ApplyFeatureViewsRequest(entities=[entity], views=[first, second]))
    assert views.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert views.details().startswith(
        "views[1]: feature view 'dupv' with no version is declared again (first at views[0])"
    )
    entities = apply(pb.ApplyFeatureViewsRequest(entities=[entity, entity], dry_run=True))
    assert entities.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert entities.details() == (
        "entities[1]: entity 'dupe' is declared again (first at entities[0]); declare each "
        "entity once"
    )
    with client_as(secured, "admin") as admin:
        assert admin.list_feature_views("dupv")[1] == []


def test_apply_command_refuses_a_file_declaring_a_view_twice(secured, tmp_path: Path) -> None:
    path = tmp_path / "features.toml"
    declaration = '[[feature_view]]\nname = "dupf"\nentity = "user"\n'
    path.write_text(
        '[[entity]]\nname = "user"\njoin_keys = [{ name = "user_id", dtype = "int64" }]\n'
        + declaration
        + '[[feature_view.feature]]\nname = "a"\ndtype = "float32"\n'
        + declaration
        + '[[feature_view.feature]]\nname = "b"\ndtype = "float32"\n'
    )
    token = TOKENS["admin"][0]
    cmd = [sys.executable, "-m", "server.cli", "apply", str(path), "--target", secured.target]
    result = subprocess.run(
        [*cmd, "--token", token], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (
        f"featureserve: {path}: feature_view[1]: feature view 'dupf' with no version is declared "
        "again (first at feature_view[0]); declare it once with all its features, or give each "
        "declaration its own explicit version"
    )
    with client_as(secured, "admin") as admin:
        assert admin.list_feature_views("dupf")[1] == []
