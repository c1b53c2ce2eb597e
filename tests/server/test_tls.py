"""TLS and mTLS with certificates generated here: config parsing, an in-test grpc.aio server on
server_credentials(), and the real server started with a [tls] section."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.channel import ClientConfig, ClientError
from clients.feature_client import FeatureStoreClient
from server.config import ConfigError
from server.health import Health
from server.tls import TlsConfig, parse_tls, server_credentials


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_pem(path: Path, key, cert: x509.Certificate) -> None:
    path.with_suffix(".key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def make_ca(folder: Path, cn: str):
    """A self-signed CA, written to folder/cn.crt and folder/cn.key."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    _write_pem(folder / cn, key, cert)
    return key, cert


def issue(
    folder: Path,
    cn: str,
    ca,
    server: bool,
    expires: datetime.timedelta = datetime.timedelta(days=1),
) -> None:
    """A leaf certificate signed by `ca` (for 127.0.0.1 / localhost when server), expiring
    `expires` from now (in the past when negative)."""
    ca_key, ca_cert = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    start = min(now, now + expires) - datetime.timedelta(minutes=5)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(now + expires)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if server:
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    _write_pem(folder / cn, key, builder.sign(ca_key, hashes.SHA256()))


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """ca.crt, server.{crt,key}, client.{crt,key} from ca; rogue.{crt,key} from another CA;
    expired.{crt,key} expired yesterday, long.{crt,key} expires in 2060 (a GeneralizedTime)."""
    folder = tmp_path_factory.mktemp("pki")
    ca = make_ca(folder, "ca")
    issue(folder, "server", ca, server=True)
    issue(folder, "expired", ca, server=True, expires=-datetime.timedelta(days=1))
    issue(folder, "long", ca, server=True, expires=datetime.timedelta(days=365 * 34))
    issue(folder, "client", ca, server=False)
    issue(folder, "rogue", make_ca(folder, "other-ca"), server=False)
    return folder


def test_parse_tls_defaults_and_errors(tmp_path: Path) -> None:
    assert parse_tls(None) is None
    plain = parse_tls({"cert_file": "s.crt", "key_file": "s.key"}, base=tmp_path)
    assert plain.cert_file == tmp_path / "s.crt" and not plain.mutual
    mutual = parse_tls({"cert_file": "a", "key_file": "b", "client_ca_file": "/ca.crt"})
    assert mutual.mutual and mutual.client_ca_file == Path("/ca.crt")
    with pytest.raises(ConfigError, match="would not be requested nor checked"):
        parse_tls(
            {"cert_file": "a", "key_file": "b", "client_ca_file": "c", "require_client_auth": False}
        )
    with pytest.raises(ConfigError, match="needs 'key_file'"):
        parse_tls({"cert_file": "a"})
    with pytest.raises(ConfigError, match="needs client_ca_file"):
        parse_tls({"cert_file": "a", "key_file": "b", "require_client_auth": True})
    with pytest.raises(ConfigError, match="unknown key 'ca'"):
        parse_tls({"cert_file": "a", "key_file": "b", "ca": "c"})
    (tmp_path / "junk.crt").write_text("not a certificate")
    with pytest.raises(ConfigError, match="not a PEM file"):
        server_credentials(TlsConfig(tmp_path / "junk.crt", tmp_path / "junk.crt"))
    with pytest.raises(ConfigError, match=r"missing\.key"):
        server_credentials(TlsConfig(tmp_path / "junk.crt", tmp_path / "missing.key"))


async def handshake_outcomes(pki: Path, config: TlsConfig) -> dict[str, grpc.StatusCode]:
    """Health checks over TLS from clients with no, a trusted, and an untrusted certificate."""
    server = grpc.aio.server()
    health = Health([])
    health.register(server)
    await health.set_all(True)
    port = server.add_secure_port("127.0.0.1:0", server_credentials(config))
    await server.start()
    ca = (pki / "ca.crt").read_bytes()
    clients = {
        "no client cert": grpc.ssl_channel_credentials(ca),
        "trusted client cert": grpc.ssl_channel_credentials(
            ca, (pki / "client.key").read_bytes(), (pki / "client.crt").read_bytes()
        ),
        "untrusted client cert": grpc.ssl_channel_credentials(
            ca, (pki / "rogue.key").read_bytes(), (pki / "rogue.crt").read_bytes()
        ),
        "client not trusting the server": grpc.ssl_channel_credentials(
            (pki / "other-ca.crt").read_bytes()
        ),
    }
    outcomes = {}
    for name, credentials in clients.items():
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
            try:
                await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=5
                )
                outcomes[name] = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as exc:
                outcomes[name] = exc.code()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=2
            )
            outcomes["plaintext"] = grpc.StatusCode.OK
        except grpc.aio.AioRpcError as exc:
            outcomes["plaintext"] = exc.code()
    await server.stop(0)
    return outcomes


def test_tls_serves_clients_that_trust_the_ca_only(pki: Path) -> None:
    got = asyncio.run(handshake_outcomes(pki, TlsConfig(pki / "server.crt", pki / "server.key")))
    assert got["no client cert"] == grpc.StatusCode.OK
    assert got["trusted client cert"] == grpc.StatusCode.OK
    assert got["client not trusting the server"] == grpc.StatusCode.UNAVAILABLE
    assert got["plaintext"] == grpc.StatusCode.UNAVAILABLE


def test_mtls_requires_a_client_certificate_signed_by_the_client_ca(pki: Path) -> None:
    config = TlsConfig(pki / "server.crt", pki / "server.key", client_ca_file=pki / "ca.crt")
    got = asyncio.run(handshake_outcomes(pki, config))
    assert got["trusted client cert"] == grpc.StatusCode.OK
    assert got["no client cert"] == grpc.StatusCode.UNAVAILABLE
    assert got["untrusted client cert"] == grpc.StatusCode.UNAVAILABLE
    assert got["plaintext"] == grpc.StatusCode.UNAVAILABLE


def test_real_server_with_mtls_section(pki: Path, server_factory, tmp_path: Path) -> None:
    """`featureserve serve --config` with [tls]: the client library gets through with its
    certificate and is refused without one. The config names its files relative to its own
    folder, not the server's working directory."""
    config = pki / "mtls.toml"
    config.write_text(
        '[tls]\ncert_file = "server.crt"\nkey_file = "server.key"\nclient_ca_file = "ca.crt"\n'
    )
    assert Path.cwd() != pki
    server = server_factory("--config", str(config))
    good = ClientConfig(
        target=server.target,
        tls=True,
        root_certificates=pki / "ca.crt",
        client_certificate=pki / "client.crt",
        client_key=pki / "client.key",
        timeout_s=10,
        max_attempts=1,
    )
    with FeatureStoreClient(good) as client:
        assert client.list_feature_views() == ([], [])
    anonymous = ClientConfig(
        target=server.target,
        tls=True,
        root_certificates=pki / "ca.crt",
        timeout_s=5,
        max_attempts=1,
    )
    with FeatureStoreClient(anonymous) as client, pytest.raises(ClientError) as info:
        client.list_feature_views()
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    plaintext = ClientConfig(target=server.target, timeout_s=5, max_attempts=1)
    with FeatureStoreClient(plaintext) as client, pytest.raises(ClientError) as info:
        client.list_feature_views()  # gRPC said only "Socket closed"
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert "connect with TLS (--tls" in str(info.value)


def test_credentials_refuse_a_key_that_is_not_the_certificates(pki: Path) -> None:
    with pytest.raises(ConfigError, match="do not form a pair") as info:
        server_credentials(TlsConfig(pki / "server.crt", pki / "client.key"))
    assert "server.crt" in str(info.value) and "client.key" in str(info.value)
    with pytest.raises(ConfigError, match="holds no PEM private key"):
        server_credentials(TlsConfig(pki / "server.crt", pki / "server.crt"))


def test_credentials_refuse_an_expired_certificate(pki: Path, tmp_path: Path, caplog) -> None:
    """An expired certificate is refused naming cert_file and the date, rather than served to
    clients that all fail the handshake; an expired one later in the chain (an old
    cross-signed root) only warns, since clients stop at the first certificate they trust."""
    with pytest.raises(ConfigError, match="the certificate expired on") as info:
        server_credentials(TlsConfig(pki / "expired.crt", pki / "expired.key"))
    expiry = x509.load_pem_x509_certificate((pki / "expired.crt").read_bytes())
    assert f"{expiry.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC" in str(info.value)
    assert f"[tls] cert_file {pki / 'expired.crt'}" in str(info.value)
    chain = tmp_path / "chain.crt"
    chain.write_bytes((pki / "server.crt").read_bytes() + (pki / "expired.crt").read_bytes())
    with caplog.at_level("WARNING", logger="featureserve.tls"):
        assert server_credentials(TlsConfig(chain, pki / "server.key")) is not None
    (warned,) = [r for r in caplog.records if r.name == "featureserve.tls"]
    assert (
        warned.certificate == 2
        and warned.expired == f"{expiry.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC"
    )
    assert server_credentials(TlsConfig(pki / "long.crt", pki / "long.key")) is not None


def test_credentials_refuse_a_client_ca_file_without_a_certificate(pki: Path) -> None:
    config = TlsConfig(pki / "server.crt", pki / "server.key", client_ca_file=pki / "ca.key")
    with pytest.raises(ConfigError, match="holds no usable certificate") as info:
        server_credentials(config)
    assert f"[tls] client_ca_file {pki / 'ca.key'}" in str(info.value)


def serve_refused(config: Path, tmp_path: Path, *extra: str) -> list[str]:
    """The lines other than JSON logs that `featureserve serve --config` printed before exiting
    with status 1 (the status of a section the server cannot start with)."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "serve", "--port", "0", "--config", str(config),
         "--data-dir", str(tmp_path / "d"), "--model-repo", str(tmp_path / "m"), *extra],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    return [line for line in result.stderr.splitlines() if not line.startswith("{")]


@pytest.mark.parametrize("workers", [(), ("--workers", "2")])
def test_a_mismatched_pair_stops_the_server_with_one_line(
    pki: Path, tmp_path: Path, workers: tuple[str, ...]
) -> None:
    config = tmp_path / "featureserve.toml"
    config.write_text(
        f'[tls]\ncert_file = "{pki / "server.crt"}"\nkey_file = "{pki / "rogue.key"}"\n'
    )
    lines = serve_refused(config, tmp_path, *workers)
    assert len(lines) == 1 and "[tls] cert_file" in lines[0] and "do not form a pair" in lines[0]
    assert str(pki / "rogue.key") in lines[0]


@pytest.mark.parametrize(
    ("cert", "client_ca", "message"),
    [
        ("expired", None, "[tls] cert_file {pki}/expired.crt: the certificate expired on"),
        ("server", "server.key", "[tls] client_ca_file {pki}/server.key: holds no usable"),
    ],
)
def test_an_expired_certificate_or_a_ca_file_without_one_stops_the_server_with_one_line(
    pki: Path, tmp_path: Path, cert: str, client_ca: str | None, message: str
) -> None:
    config = tmp_path / "featureserve.toml"
    body = f'[tls]\ncert_file = "{pki / cert}.crt"\nkey_file = "{pki / cert}.key"\n'
    if client_ca is not None:
        body += f'client_ca_file = "{pki / client_ca}"\n'
    config.write_text(body)
    lines = serve_refused(config, tmp_path)
    assert len(lines) == 1 and message.format(pki=pki) in lines[0], lines
