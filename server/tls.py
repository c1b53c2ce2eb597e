"""TLS and mutual TLS for the gRPC port: the [tls] config and the credentials built from it."""

from __future__ import annotations

import logging
import re
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc

from server.config import ConfigError

log = logging.getLogger("featureserve.tls")
_TLS_KEYS = {"cert_file", "key_file", "client_ca_file", "require_client_auth"}
_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)
_UTC_TIME, _EXPLICIT_VERSION = 0x17, 0xA0


@dataclass(frozen=True)
class TlsConfig:
    """Server certificate chain and key (PEM); with client_ca_file, every client must present a
    certificate signed by it (require_client_auth, true whenever a client CA is set)."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None
    require_client_auth: bool | None = None

    @property
    def mutual(self) -> bool:
        """Whether client certificates are required."""
        if self.require_client_auth is None:
            return self.client_ca_file is not None
        return self.require_client_auth


def parse_tls(
    raw: dict[str, Any] | None, source: str = "config", base: Path | None = None
) -> TlsConfig | None:
    """The [tls] table (ServerConfig.extra["tls"]) as a TlsConfig, or None when absent.

    Relative paths are resolved against `base` (the config file's folder) when given.
    """
    if raw is None:
        return None
    unknown = set(raw) - _TLS_KEYS
    if unknown:
        raise ConfigError(f"{source}: [tls] has unknown key '{sorted(unknown)[0]}'")

    def path(key: str, required: bool) -> Path | None:
        value = raw.get(key)
        if value is None:
            if required:
                raise ConfigError(f"{source}: [tls] needs '{key}' (a PEM file path)")
            return None
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{source}: [tls] '{key}' must be a file path string")
        p = Path(value)
        return base / p if base is not None and not p.is_absolute() else p

    require = raw.get("require_client_auth")
    if require is not None and not isinstance(require, bool):
        raise ConfigError(f"{source}: [tls] require_client_auth must be true or false")
    config = TlsConfig(
        path("cert_file", True), path("key_file", True), path("client_ca_file", False), require
    )
    if config.mutual and config.client_ca_file is None:
        raise ConfigError(
            f"{source}: [tls] require_client_auth = true needs client_ca_file (the CA that "
            "signed the client certificates)"
        )
    if config.client_ca_file is not None and not config.mutual:
        # gRPC then never asks for a client certificate: the CA would check nothing.
        raise ConfigError(
            f"{source}: [tls] client_ca_file is set but require_client_auth = false, so client "
            "certificates would not be requested nor checked; remove require_client_auth "
            "(mutual TLS) or remove client_ca_file (server-only TLS)"
        )
    return config


def _read(path: Path, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"[tls] {what} {path}: {exc.strerror}; set {what} to a readable PEM file"
        ) from None
    if b"-----BEGIN" not in data:
        raise ConfigError(f"[tls] {what} {path}: not a PEM file; set {what} to a PEM file")
    return data


def _check_pair(config: TlsConfig) -> None:
    """Refuse a key that is not the private key of the certificate, before gRPC reports it as a
    port it cannot bind."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(config.cert_file, config.key_file, password=lambda: b"")
    except ssl.SSLError as exc:
        raise ConfigError(
            f"[tls] cert_file {config.cert_file} and key_file {config.key_file} do not form a "
            f"pair ({exc.reason or exc}); set key_file to the certificate's own unencrypted "
            "private key"
        ) from None


def _der_elements(der: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    """(tag, content start, content end) of each DER element in der[start:end]."""
    elements = []
    while start < end:
        tag, length, start = der[start], der[start + 1], start + 2
        if length & 0x80:
            size = length & 0x7F
            length, start = int.from_bytes(der[start : start + size], "big"), start + size
        elements.append((tag, start, start + length))
        start += length
    return elements


def _not_after(der: bytes) -> datetime:
    """When a DER X.509 certificate expires (validity.notAfter of its tbsCertificate); the
    standard library decodes only CA and peer certificates, not a server's own."""
    _, start, end = _der_elements(der, 0, len(der))[0]
    _, start, end = _der_elements(der, start, end)[0]
    fields = _der_elements(der, start, end)
    if fields[0][0] == _EXPLICIT_VERSION:
        fields = fields[1:]
    _, start, end = fields[3]  # after serialNumber, signature and issuer: validity
    tag, start, end = _der_elements(der, start, end)[1]
    text = der[start:end].decode("ascii")
    if tag == _UTC_TIME:  # two-digit years: 50-99 are 19xx, 00-49 are 20xx (RFC 5280)
        text = f"{19 if int(text[:2]) >= 50 else 20}{text}"
    return datetime.strptime(text, "%Y%m%d%H%M%SZ").replace(tzinfo=UTC)


def _check_not_expired(path: Path, pem: bytes) -> None:
    """Refuse a cert_file whose certificate has expired: gRPC serves it, and then every client
    fails the handshake. An expired certificate further up its chain only warns: a client stops
    at the first certificate it trusts (an expired cross-signed root in an old bundle is
    harmless to clients that trust the new root)."""
    now = datetime.now(UTC)
    for index, block in enumerate(_CERTIFICATE.findall(pem)):
        try:
            expiry = _not_after(ssl.PEM_cert_to_DER_cert(block.decode("ascii")))
        except (IndexError, ValueError):
            raise ConfigError(
                f"[tls] cert_file {path}: certificate #{index + 1} cannot be decoded; set "
                "cert_file to a PEM certificate chain"
            ) from None
        if expiry > now:
            continue
        when = f"{expiry:%Y-%m-%d %H:%M:%S} UTC"
        if index == 0:
            raise ConfigError(
                f"[tls] cert_file {path}: the certificate expired on {when}, so every client "
                "would fail the TLS handshake; set cert_file to a renewed certificate"
            )
        log.warning(
            "an expired certificate in the TLS chain",
            extra={
                "cert_file": str(path),
                "certificate": index + 1,
                "expired": when,
                "fix": "clients that do not trust a certificate below it will fail the "
                "handshake; drop it from cert_file",
            },
        )


def _check_client_ca(path: Path) -> None:
    """Refuse a client_ca_file holding no certificate, before gRPC reports it as a port it
    cannot bind."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_verify_locations(cafile=path)
    except ssl.SSLError as exc:
        raise ConfigError(
            f"[tls] client_ca_file {path}: holds no usable certificate ({exc.reason or exc}); "
            "set client_ca_file to the PEM certificate of the CA that signs client certificates"
        ) from None


def server_credentials(config: TlsConfig) -> grpc.ServerCredentials:
    """grpc.ssl_server_credentials for the config, reading and checking the PEM files, that the
    key belongs to the certificate, that the certificate has not expired and that the client
    CA file holds a certificate."""
    pair = (_read(config.key_file, "key_file"), _read(config.cert_file, "cert_file"))
    if b"PRIVATE KEY-----" not in pair[0]:
        raise ConfigError(
            f"[tls] key_file {config.key_file}: holds no PEM private key; set it to the "
            "certificate's private key file"
        )
    _check_pair(config)
    _check_not_expired(config.cert_file, pair[1])
    ca = None
    if config.client_ca_file is not None:
        ca = _read(config.client_ca_file, "client_ca_file")
        _check_client_ca(config.client_ca_file)
    return grpc.ssl_server_credentials(
        [pair], root_certificates=ca, require_client_auth=config.mutual
    )
