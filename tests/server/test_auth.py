"""Bearer tokens and scopes: config parsing, scope semantics, the interceptor and require()
over an in-test grpc.aio server, and the full matrix over every RPC of the real server."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from clients import feature_messages as fm
from clients import registry_messages as rm
from featurestore.dtypes import DType
from featurestore.registry import Entity, Feature, FeatureService, FeatureView, JoinKey
from protos.featureserve.v1 import feature_store_pb2 as pb
from protos.featureserve.v1 import feature_store_pb2_grpc as pb_grpc
from protos.featureserve.v1 import prediction_pb2, prediction_pb2_grpc
from protos.inference import grpc_service_pb2 as ks
from protos.inference import grpc_service_pb2_grpc as ks_grpc
from server.app import SERVICES
from server.auth import (
    DEFAULT_OPEN_METHODS,
    AuthConfig,
    AuthInterceptor,
    Authorizer,
    Principal,
    bearer_token,
    parse_auth,
)
from server.config import ConfigError
from server.errors import maps_errors
from server.handler_wrapping import InterceptingRegistrar
from server.health import Health

TOKENS = {
    "reader": ("r-secret", ["read:profile"]),
    "writer": ("w-secret", ["write:profile"]),
    "inferer": ("i-secret", ["infer:m1"]),
    "admin": ("a-secret", ["admin"]),
    "other": ("o-secret", ["read:other", "write:other", "infer:other"]),
}


def token_toml(name: str, secret: str, scopes: list[str]) -> str:
    digest = hashlib.sha256(secret.encode()).hexdigest()
    quoted = ", ".join(f'"{scope}"' for scope in scopes)
    return f'[[auth.tokens]]\nname = "{name}"\ntoken_sha256 = "{digest}"\nscopes = [{quoted}]\n'


AUTH_TOML = "[auth]\nenabled = true\n" + "".join(
    token_toml(name, secret, scopes) for name, (secret, scopes) in TOKENS.items()
)
UNAUTH = grpc.StatusCode.UNAUTHENTICATED
DENIED = grpc.StatusCode.PERMISSION_DENIED


def auth_config(services=None, **overrides):
    raw = {"tokens": [{"name": "t", "token": "s", "scopes": ["read:*"]}], **overrides}
    return parse_auth(raw, "featureserve.toml", services)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"tokens": []}, "has no [[auth.tokens]]"),
        ({"token": []}, "unknown key 'token'"),
        ({"tokens": [{"name": "t", "scopes": ["admin"]}]}, "exactly one of token"),
        (
            {"tokens": [{"name": "t", "token": "s", "token_sha256": "ab", "scopes": ["admin"]}]},
            "exactly one of token",
        ),
        ({"tokens": [{"name": "t", "token_sha256": "xyz", "scopes": ["admin"]}]}, "64 hex digits"),
        ({"tokens": [{"name": "t", "token": "s", "scopes": ["read"]}]}, "scope 'read' is not"),
        ({"tokens": [{"name": "t", "token": "s", "scopes": ["delete:x"]}]}, "is not admin"),
        ({"tokens": [{"name": "t", "token": "s", "scopes": []}]}, "non-empty list"),
        (
            {"tokens": [{"name": "t", "token_env": "FS_TEST_UNSET_TOKEN", "scopes": ["admin"]}]},
            "FS_TEST_UNSET_TOKEN is unset",
        ),
        (
            {
                "tokens": [
                    {"name": "a", "token": "s", "scopes": ["admin"]},
                    {"name": "b", "token": "s", "scopes": ["admin"]},
                ]
            },
            "same token",
        ),
        (
            {"tokens": [{"name": "t", "token": " spaced-secret ", "scopes": ["admin"]}]},
            "#0 (t): 'token' has leading or trailing whitespace",
        ),
        (
            {"tokens": [{"name": "t", "token": "pässwörd", "scopes": ["admin"]}]},
            "#0 (t): 'token' holds a character other than printable ASCII",
        ),
        (
            {"tokens": [{"name": "t", "token": "tab\tinside", "scopes": ["admin"]}]},
            "#0 (t): 'token' holds a character other than printable ASCII",
        ),
    ],
)
def test_bad_auth_config_names_the_key(raw, message) -> None:
    with pytest.raises(ConfigError, match=r"featureserve\.toml") as info:
        parse_auth(raw, "featureserve.toml")
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (" padded", "FS_TEST_ENV_TOKEN (token_env) has leading or trailing whitespace"),
        ("two\nlines", "FS_TEST_ENV_TOKEN (token_env) holds a character other than printable"),
        ("\n", "FS_TEST_ENV_TOKEN is unset or empty"),
    ],
)
def test_token_env_no_client_can_send_is_refused(monkeypatch, value: str, message: str) -> None:
    monkeypatch.setenv("FS_TEST_ENV_TOKEN", value)
    raw = {"tokens": [{"name": "e", "token_env": "FS_TEST_ENV_TOKEN", "scopes": ["admin"]}]}
    with pytest.raises(ConfigError, match=r"#0 \(e\)") as info:
        parse_auth(raw, "featureserve.toml")
    assert message in str(info.value)


def test_config_keeps_digests_only_and_defaults_open_methods(monkeypatch) -> None:
    """Plain, hashed and environment tokens all become SHA-256 digests; health stays open."""
    monkeypatch.setenv("FS_TEST_TOKEN", "from-env")
    config = parse_auth(
        {
            "tokens": [
                {"name": "plain", "token": "plain-secret-123", "scopes": ["read:*"]},
                {
                    "name": "hashed",
                    "token_sha256": hashlib.sha256(b"h").hexdigest(),
                    "scopes": ["admin"],
                },
                {"name": "env", "token_env": "FS_TEST_TOKEN", "scopes": ["infer:m"]},
            ]
        }
    )
    assert config.enabled
    assert [t.digest for t in config.tokens] == [
        hashlib.sha256(s).digest() for s in (b"plain-secret-123", b"h", b"from-env")
    ]
    assert "plain-secret" not in repr(config) and "grpc.health.v1.Health" in config.open_methods
    authorizer = Authorizer(config)
    assert authorizer.authenticate([("authorization", "Bearer from-env")]).name == "env"
    assert authorizer.authenticate([("authorization", "bearer h")]).name == "hashed"
    assert authorizer.authenticate([("authorization", "Bearer nope")]) is None
    assert authorizer.authenticate([("x-other", "Bearer p")]) is None
    assert parse_auth(None).enabled is False


SERVED = [*SERVICES, "grpc.health.v1.Health", reflection.SERVICE_NAME]


@pytest.mark.parametrize(
    ("entry", "suggestion"),
    [
        ("grpc.health.v1.Healthz", "grpc.health.v1.Health"),
        (
            "featureserve.v1.FeatureStore/ListFeatureView",
            "featureserve.v1.FeatureStore/ListFeatureViews",
        ),
        ("no.such.Service", None),
    ],
)
def test_open_methods_must_name_a_served_service_or_method(entry: str, suggestion) -> None:
    """A misspelt open_methods entry is refused, with the nearest served name when one is
    close, instead of silently leaving health checks closed."""
    with pytest.raises(ConfigError, match=f"open_methods entry '{entry}' is no service") as info:
        auth_config(open_methods=["grpc.health.v1.Health", entry], services=SERVED)
    assert "featureserve.toml" in str(info.value)
    assert ("did you mean" in str(info.value)) == (suggestion is not None)
    if suggestion is not None:
        assert f"did you mean '{suggestion}'?" in str(info.value)


def test_open_methods_accepts_served_services_methods_and_the_defaults() -> None:
    entries = [
        "grpc.health.v1.Health",
        "/featureserve.v1.FeatureStore/GetFeatureView",
        "inference.GRPCInferenceService",
        *DEFAULT_OPEN_METHODS,
    ]
    config = auth_config(open_methods=entries, services=SERVED)
    assert "featureserve.v1.FeatureStore/GetFeatureView" in config.open_methods
    assert auth_config(services=SERVED).open_methods == DEFAULT_OPEN_METHODS


def test_scope_semantics() -> None:
    """Exact scopes, kind wildcards, name globs, and admin over everything."""
    p = Principal("p", frozenset({"read:*", "write:fraud_*", "infer:m1"}))
    assert p.grants("read:anything") and p.grants("write:fraud_v2") and p.grants("infer:m1")
    assert not p.grants("write:profile") and not p.grants("infer:m2") and not p.grants("admin")
    assert p.may("read") and p.may("write") and p.may("infer") and not p.may("admin")
    admin = Principal("a", frozenset({"admin"}))
    assert admin.grants("write:x") and admin.may("infer") and admin.may("admin")
    assert bearer_token([("authorization", "Basic abc")]) is None
    assert bearer_token([("authorization", "Bearer  tok ")]) == "tok"


class Store(pb_grpc.FeatureStoreServicer):
    """A FeatureStore whose handlers do only the servicer's share of authorization."""

    def __init__(self, authorizer: Authorizer) -> None:
        self.auth = authorizer

    @maps_errors
    async def WriteFeatures(self, request, context):
        self.auth.require(f"write:{request.view}")
        return pb.WriteFeaturesResponse(rows_written=1)

    @maps_errors
    async def StreamWriteFeatures(self, request_iterator, context):
        rows = 0
        async for request in request_iterator:
            self.auth.require(f"write:{request.view}")
            rows += 1
        return pb.WriteFeaturesResponse(rows_written=rows)

    @maps_errors
    async def ApplyFeatureViews(self, request, context):
        self.auth.require("admin")
        return pb.ApplyFeatureViewsResponse()


async def in_process_matrix() -> dict[tuple[str, str], grpc.StatusCode]:
    config = parse_auth(
        {
            "tokens": [
                {"name": "w", "token": "w-tok", "scopes": ["write:profile"]},
                {"name": "r", "token": "r-tok", "scopes": ["read:*"]},
                {"name": "a", "token": "a-tok", "scopes": ["admin"]},
            ]
        }
    )
    authorizer = Authorizer(config)
    server = grpc.aio.server()
    registrar = InterceptingRegistrar(server, [AuthInterceptor(authorizer)])
    pb_grpc.add_FeatureStoreServicer_to_server(Store(authorizer), registrar)
    health = Health([])
    health.register(registrar)
    await health.set_all(True)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    outcomes = {}
    # Streams go through the sync client (in a thread): grpc.aio's client can turn a stream the
    # server has already answered into INTERNAL when its next send then fails (its own race).
    sync_channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    sync_stub = pb_grpc.FeatureStoreStub(sync_channel)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.FeatureStoreStub(channel)
        calls = {
            "write profile": lambda md: stub.WriteFeatures(
                pb.WriteFeaturesRequest(view="profile"), metadata=md
            ),
            "write other": lambda md: stub.WriteFeatures(
                pb.WriteFeaturesRequest(view="other"), metadata=md
            ),
            "stream profile": lambda md: asyncio.to_thread(
                sync_stub.StreamWriteFeatures,
                iter([pb.WriteFeaturesRequest(view="profile")] * 2),
                metadata=md,
            ),
            "stream mixed": lambda md: asyncio.to_thread(
                sync_stub.StreamWriteFeatures,
                iter([pb.WriteFeaturesRequest(view="profile"), pb.WriteFeaturesRequest(view="x")]),
                metadata=md,
            ),
            "apply": lambda md: stub.ApplyFeatureViews(pb.ApplyFeatureViewsRequest(), metadata=md),
            "health": lambda md: health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), metadata=md
            ),
        }
        for call, make in calls.items():
            for who in ("none", "bad", "w", "r", "a"):
                md = () if who == "none" else (("authorization", f"Bearer {who}-tok"),)
                try:
                    await make(md)
                    outcomes[call, who] = grpc.StatusCode.OK
                except grpc.RpcError as exc:
                    outcomes[call, who] = exc.code()
    sync_channel.close()
    await server.stop(0)
    return outcomes


async def apply_status(config: AuthConfig, token: str) -> grpc.StatusCode:
    """The status of ApplyFeatureViews sent with `token` to an in-test server enforcing
    `config`."""
    authorizer = Authorizer(config)
    server = grpc.aio.server()
    registrar = InterceptingRegistrar(server, [AuthInterceptor(authorizer)])
    pb_grpc.add_FeatureStoreServicer_to_server(Store(authorizer), registrar)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await pb_grpc.FeatureStoreStub(channel).ApplyFeatureViews(
                pb.ApplyFeatureViewsRequest(),
                metadata=(("authorization", f"Bearer {token}"),),
                timeout=20,
            )
        return grpc.StatusCode.OK
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    finally:
        await server.stop(0)


def test_token_env_filled_from_a_secret_file_authenticates(monkeypatch) -> None:
    """An environment token ending in a line break (filled from a secret file) is the token
    without it, which is what a client can send."""
    monkeypatch.setenv("FS_TEST_FILE_TOKEN", "from-file\r\n")
    raw = {"tokens": [{"name": "f", "token_env": "FS_TEST_FILE_TOKEN", "scopes": ["admin"]}]}
    assert asyncio.run(apply_status(parse_auth(raw), "from-file")) == grpc.StatusCode.OK


def test_interceptor_and_require_over_a_real_aio_server() -> None:
    """Missing or unknown tokens: UNAUTHENTICATED; wrong class (interceptor) or wrong view
    (servicer's require): PERMISSION_DENIED; the right scope or admin: OK; health: open."""
    got = asyncio.run(in_process_matrix())
    ok = grpc.StatusCode.OK
    for call in ("write profile", "write other", "stream profile", "stream mixed", "apply"):
        assert got[call, "none"] == UNAUTH and got[call, "bad"] == UNAUTH, call
        assert got[call, "a"] == ok, call
    assert got["write profile", "w"] == ok and got["stream profile", "w"] == ok
    assert got["write other", "w"] == DENIED and got["stream mixed", "w"] == DENIED
    assert got["write profile", "r"] == DENIED and got["stream profile", "r"] == DENIED
    assert got["apply", "w"] == DENIED and got["apply", "r"] == DENIED
    assert all(got["health", who] == ok for who in ("none", "bad", "w", "r", "a"))


def request_of(rpc: str):
    """One request (or request iterator) per RPC, naming view 'profile' or model 'm1'."""
    return {
        "GetOnlineFeatures": pb.GetOnlineFeaturesRequest(features=["profile:f"]),
        "WriteFeatures": pb.WriteFeaturesRequest(view="profile"),
        "StreamWriteFeatures": iter([pb.WriteFeaturesRequest(view="profile")]),
        "ListFeatureViews": pb.ListFeatureViewsRequest(),
        "GetFeatureView": pb.GetFeatureViewRequest(name="profile"),
        "ApplyFeatureViews": pb.ApplyFeatureViewsRequest(),
        "DeleteFeatureView": pb.DeleteFeatureViewRequest(name="profile", version=9),
        "ListFeatureServices": pb.ListFeatureServicesRequest(),
        "GetFeatureService": pb.GetFeatureServiceRequest(name="svc"),
        "DeleteFeatureService": pb.DeleteFeatureServiceRequest(name="absent"),
        "Predict": prediction_pb2.PredictRequest(model="m1"),
        "StreamPredict": iter([prediction_pb2.PredictRequest(model="m1")]),
        "ServerLive": ks.ServerLiveRequest(),
        "ServerReady": ks.ServerReadyRequest(),
        "ServerMetadata": ks.ServerMetadataRequest(),
        "ModelReady": ks.ModelReadyRequest(name="m1"),
        "ModelMetadata": ks.ModelMetadataRequest(name="m1"),
        "ModelConfig": ks.ModelConfigRequest(name="m1"),
        "ModelStatistics": ks.ModelStatisticsRequest(name="m1"),
        "RepositoryIndex": ks.RepositoryIndexRequest(),
        "ModelInfer": ks.ModelInferRequest(model_name="m1"),
        "ModelStreamInfer": iter([ks.ModelInferRequest(model_name="m1")]),
        "RepositoryModelLoad": ks.RepositoryModelLoadRequest(model_name="m1"),
        "RepositoryModelUnload": ks.RepositoryModelUnloadRequest(model_name="m1"),
    }[rpc]


# rpc -> (token with the right scope, token lacking the scope class, token with the class
# but for another view/model: the servicer's require() must refuse it)
MATRIX: dict[str, tuple[str, str | None, str | None]] = {
    "GetOnlineFeatures": ("reader", "writer", "other"),
    "WriteFeatures": ("writer", "reader", "other"),
    "StreamWriteFeatures": ("writer", "reader", "other"),
    "ListFeatureViews": ("reader", "inferer", None),
    "GetFeatureView": ("reader", "inferer", "other"),
    "ApplyFeatureViews": ("admin", "writer", None),
    "DeleteFeatureView": ("admin", "writer", None),
    "ListFeatureServices": ("reader", "inferer", None),
    "GetFeatureService": ("writer", "inferer", None),
    "DeleteFeatureService": ("admin", "writer", None),
    "Predict": ("inferer", "reader", "other"),
    "StreamPredict": ("inferer", "reader", "other"),
    "ServerLive": ("reader", None, None),
    "ServerReady": ("writer", None, None),
    "ServerMetadata": ("inferer", None, None),
    "ModelReady": ("inferer", "reader", "other"),
    "ModelMetadata": ("inferer", "reader", "other"),
    "ModelConfig": ("inferer", "reader", "other"),
    "ModelStatistics": ("inferer", "reader", "other"),
    "RepositoryIndex": ("inferer", "reader", None),
    "ModelInfer": ("inferer", "reader", "other"),
    "ModelStreamInfer": ("inferer", "reader", "other"),
    "RepositoryModelLoad": ("admin", "inferer", None),
    "RepositoryModelUnload": ("admin", "inferer", None),
}
STUBS = {
    **dict.fromkeys(list(MATRIX)[:10], pb_grpc.FeatureStoreStub),
    **dict.fromkeys(list(MATRIX)[10:12], prediction_pb2_grpc.PredictionStub),
    **dict.fromkeys(list(MATRIX)[12:], ks_grpc.GRPCInferenceServiceStub),
}
CASES = [
    (rpc, case)
    for rpc, (_, wrong_kind, wrong_name) in MATRIX.items()
    for case in ("no token", "unknown token", "right scope", "admin")
    + (("wrong scope class",) if wrong_kind else ())
    + (("scope for another name",) if wrong_name else ())
]


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    from tests.conftest import ServerProcess

    base = tmp_path_factory.mktemp("auth")
    config = base / "featureserve.toml"
    config.write_text(AUTH_TOML)
    server = ServerProcess(base / "data", base / "models", "--config", str(config)).start()
    channel = grpc.insecure_channel(server.target)
    pb_grpc.FeatureStoreStub(channel).ApplyFeatureViews(
        rm.apply_request(
            [Entity("user", (JoinKey("user_id", DType.INT64),))],
            [FeatureView("profile", "user", (Feature("f", DType.FLOAT32),))],
            feature_services=[FeatureService("svc", ("profile:f",))],
        ),
        metadata=(("authorization", f"Bearer {TOKENS['admin'][0]}"),),
        timeout=20,
    )
    yield channel
    channel.close()
    server.kill()


def call(channel: grpc.Channel, rpc: str, token: str | None) -> grpc.StatusCode:
    """The status of one call of `rpc` with `token`. Streams are read to the end, and an
    in-band error counts as the call's status: StreamPredict's error_code, and
    ModelStreamInfer's error_message (KServe streams report failures per response)."""
    stub = STUBS[rpc](channel)
    metadata = () if token is None else (("authorization", f"Bearer {token}"),)
    method: Callable = getattr(stub, rpc)
    try:
        result = method(request_of(rpc), metadata=metadata, timeout=20)
        responses = list(result) if rpc in ("StreamPredict", "ModelStreamInfer") else []
    except grpc.RpcError as exc:
        return exc.code()
    for response in responses:
        if rpc == "StreamPredict" and response.error_code:
            return next(c for c in grpc.StatusCode if c.value[0] == response.error_code)
        if rpc == "ModelStreamInfer" and response.error_message:
            for code, error in ((DENIED, "PermissionDenied"), (UNAUTH, "Unauthenticated")):
                if response.error_message.startswith(error):
                    return code
    return grpc.StatusCode.OK


@pytest.mark.parametrize(("rpc", "case"), CASES, ids=[f"{r}-{c}" for r, c in CASES])
def test_every_rpc_of_the_real_server_enforces_its_scope(secured, rpc: str, case: str) -> None:
    right, wrong_kind, wrong_name = MATRIX[rpc]
    token = {
        "no token": None,
        "unknown token": "not-a-configured-token",
        "right scope": TOKENS[right][0],
        "admin": TOKENS["admin"][0],
        "wrong scope class": TOKENS[wrong_kind][0] if wrong_kind else None,
        "scope for another name": TOKENS[wrong_name][0] if wrong_name else None,
    }[case]
    code = call(secured, rpc, token)
    if case in ("no token", "unknown token"):
        assert code == UNAUTH
    elif case in ("right scope", "admin"):
        assert code not in (UNAUTH, DENIED)
    else:
        assert code == DENIED


def test_health_and_reflection_stay_open(secured) -> None:
    reply = health_pb2_grpc.HealthStub(secured).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize(
    ("token", "scope", "message"),
    [
        ("t", "root", "scope 'root' is not admin"),
        (" spaced-secret ", "admin", "(x): 'token' has leading or trailing whitespace"),
    ],
)
def test_bad_auth_section_stops_the_server_with_the_key_named(
    tmp_path: Path, token: str, scope: str, message: str
) -> None:
    from tests.conftest import ServerProcess

    config = tmp_path / "bad.toml"
    config.write_text(
        f'[auth]\n[[auth.tokens]]\nname = "x"\ntoken = "{token}"\nscopes = ["{scope}"]\n'
    )
    server = ServerProcess(tmp_path / "d", tmp_path / "m", "--config", str(config))
    try:
        with pytest.raises(AssertionError, match="server exited") as info:
            server.start()
    finally:
        server.kill()
    assert message in str(info.value) and "Traceback" not in str(info.value)


def serve_with_views(tmp_path: Path, config_text: str, entities: list, views: list):
    """A real server started with `config_text` as its config and the entities and views
    applied by the admin token: (server, the admin's ClientConfig). The caller kills it."""
    from clients.channel import ClientConfig
    from clients.feature_client import FeatureStoreClient
    from tests.conftest import ServerProcess

    config = tmp_path / "featureserve.toml"
    config.write_text(config_text)
    server = ServerProcess(tmp_path / "data", tmp_path / "models", "--config", str(config)).start()
    admin = ClientConfig(target=server.target, timeout_s=20, token=TOKENS["admin"][0])
    try:
        with FeatureStoreClient(admin) as client:
            client.apply(entities, views)
    except BaseException:
        server.kill()
        raise
    return server, admin


def test_open_methods_are_open_through_the_servicers_checks(tmp_path: Path) -> None:
    """Methods listed in open_methods answer without a token even where the servicer checks
    a per-view scope (GetFeatureView, ListFeatureViews); unlisted ones stay closed."""
    opened = ["featureserve.v1.FeatureStore/GetFeatureView",
              "featureserve.v1.FeatureStore/ListFeatureViews",
              "inference.GRPCInferenceService"]  # fmt: skip
    server, _ = serve_with_views(
        tmp_path,
        AUTH_TOML.replace("enabled = true\n", f"open_methods = {opened!r}\n"),
        [Entity("user", (JoinKey("user_id", DType.INT64),))],
        [FeatureView("profile", "user", (Feature("score", DType.FLOAT32),))],
    )
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.FeatureStoreStub(channel)
            view = stub.GetFeatureView(pb.GetFeatureViewRequest(name="profile"), timeout=20)
            listed = stub.ListFeatureViews(pb.ListFeatureViewsRequest(), timeout=20)
            assert view.name == "profile" and [v.name for v in listed.views] == ["profile"]
            kserve = ks_grpc.GRPCInferenceServiceStub(channel)
            assert kserve.ServerLive(ks.ServerLiveRequest(), timeout=20).live
            assert call(channel, "GetOnlineFeatures", None) == UNAUTH
            assert call(channel, "ApplyFeatureViews", None) == UNAUTH
    finally:
        server.kill()


def test_a_write_only_token_reads_the_schema_it_writes_to(tmp_path: Path) -> None:
    """A token with write:card_* only can run `featureserve ingest` (which reads the view's
    definition first) and lists the views it may write, with only their entities; it still
    cannot read another view's definition or any feature values. ListFeatureViews lists only
    the entities of the views listed, except for a caller who may see every view and sent no
    prefix (entities without a view included)."""
    import subprocess
    import sys

    from clients.feature_client import FeatureStoreClient

    server, admin = serve_with_views(
        tmp_path,
        AUTH_TOML + token_toml("pipeline", "p-secret", ["write:card_*"]),
        [
            Entity("card", (JoinKey("card_id", DType.INT64),)),
            Entity("user", (JoinKey("user_id", DType.INT64),)),
            Entity("merchant", (JoinKey("merchant_id", DType.STRING),)),
        ],
        [
            FeatureView("card_stats", "card", (Feature("spend", DType.FLOAT32),)),
            FeatureView("profile", "user", (Feature("score", DType.FLOAT32),)),
        ],
    )
    try:
        with FeatureStoreClient(admin) as client:
            every = client.list_feature_views()
            prefixed = client.list_feature_views("card")
        assert [e.name for e in every[0]] == ["card", "merchant", "user"]
        assert [e.name for e in prefixed[0]] == ["card"]
        assert [v.name for v in prefixed[1]] == ["card_stats"]

        cards = tmp_path / "cards.csv"
        cards.write_text("card_id,event_timestamp,spend\n1,2024-05-01T10:00:00Z,12.5\n")
        ingest = subprocess.run(
            [sys.executable, "-m", "server.cli", "ingest", str(cards), "--view", "card_stats",
             "--token", "p-secret", "--target", server.target],
            capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2], timeout=120,
        )  # fmt: skip
        assert (ingest.returncode, ingest.stdout.strip()) == (0, "written=1 stale=0 rejected=0"), (
            ingest.stderr
        )

        for who, views, entities in (
            ("p-secret", ["card_stats"], ["card"]),
            (TOKENS["reader"][0], ["profile"], ["user"]),
        ):
            with FeatureStoreClient(dataclasses.replace(admin, token=who)) as client:
                listed_entities, listed_views = client.list_feature_views()
            assert [v.name for v in listed_views] == views
            assert [e.name for e in listed_entities] == entities

        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.FeatureStoreStub(channel)
            writer = (("authorization", "Bearer p-secret"),)
            view = stub.GetFeatureView(
                pb.GetFeatureViewRequest(name="card_stats"), metadata=writer, timeout=20
            )
            assert view.name == "card_stats"
            with pytest.raises(grpc.RpcError) as denied:
                stub.GetFeatureView(
                    pb.GetFeatureViewRequest(name="profile"), metadata=writer, timeout=20
                )
            assert denied.value.code() == DENIED
            assert "'read:profile' or 'write:profile'" in denied.value.details()
            lookup = pb.GetOnlineFeaturesRequest(features=["card_stats:spend"])
            with pytest.raises(grpc.RpcError) as no_read:
                stub.GetOnlineFeatures(lookup, metadata=writer, timeout=20)
            assert no_read.value.code() == DENIED
    finally:
        server.kill()


def test_feature_services_show_and_serve_only_what_the_token_may_read(tmp_path: Path) -> None:
    """A service is listed, fetched and looked up only by a caller who may see every view it
    reads; to others it is NOT_FOUND as an unknown name, never suggested, so neither its name
    nor its views leak. A lookup by a visible service still needs read on each view."""
    server, admin = serve_with_views(
        tmp_path,
        AUTH_TOML + token_toml("mixed", "m-secret", ["read:other", "write:profile"]),
        [Entity("user", (JoinKey("user_id", DType.INT64),))],
        [
            FeatureView("profile", "user", (Feature("score", DType.FLOAT32),)),
            FeatureView("secret", "user", (Feature("risk", DType.FLOAT32),)),
        ],
    )
    reader = (("authorization", f"Bearer {TOKENS['reader'][0]}"),)
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.FeatureStoreStub(channel)
            services = [
                FeatureService("scoring", ("profile:score",)),
                FeatureService("scoring_plus", ("profile", "secret:risk")),
            ]
            stub.ApplyFeatureViews(
                rm.apply_request([], [], feature_services=services),
                metadata=(("authorization", f"Bearer {admin.token}"),),
                timeout=20,
            )
            listed = stub.ListFeatureServices(pb.ListFeatureServicesRequest(), metadata=reader)
            assert [s.name for s in listed.feature_services] == ["scoring"]
            keys = fm.key_columns({"user_id": [1]})
            got = stub.GetOnlineFeatures(
                pb.GetOnlineFeaturesRequest(entity_keys=keys, feature_service="scoring"),
                metadata=reader,
            )
            assert [v.view for v in got.views] == ["profile"]
            for name in ("scoring_plus", "scoring_plu"):
                for call in (
                    lambda n=name: stub.GetOnlineFeatures(
                        pb.GetOnlineFeaturesRequest(entity_keys=keys, feature_service=n),
                        metadata=reader,
                    ),
                    lambda n=name: stub.GetFeatureService(
                        pb.GetFeatureServiceRequest(name=n), metadata=reader
                    ),
                ):
                    with pytest.raises(grpc.RpcError) as missing:
                        call()
                    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
                    message = missing.value.details()
                    assert message.startswith(f"feature service '{name}' is not registered")
                    assert "did you mean 'scoring'?" in message
                    assert "scoring_plus'?" not in message and "secret" not in message
            writer = (("authorization", "Bearer m-secret"),)
            with pytest.raises(grpc.RpcError) as denied:
                stub.GetOnlineFeatures(
                    pb.GetOnlineFeaturesRequest(entity_keys=keys, feature_service="scoring"),
                    metadata=writer,
                )
            assert denied.value.code() == DENIED
            assert "lacks scope 'read:profile'" in denied.value.details()
    finally:
        server.kill()
