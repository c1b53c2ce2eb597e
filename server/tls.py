"""TLS and mutual TLS for the gRPC port: the [tls] config and the credentials built from it."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from server.config import ConfigError

_TLS_KEYS = {"cert_file", "key_file", "client_ca_file", "require_client_auth"}


@dataclass(frozen=True)
class TlsConfig:
    """Server certificate chain and key (PEM); with client_ca_file, clients are verified against
    it, and require_client_auth (the default when a client CA is set) makes that mandatory."""

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


def server_credentials(config: TlsConfig) -> grpc.ServerCredentials:
    """grpc.ssl_server_credentials for the config, reading and checking the PEM files and that
    the key belongs to the certificate."""
    pair = (_read(config.key_file, "key_file"), _read(config.cert_file, "cert_file"))
    if b"PRIVATE KEY-----" not in pair[0]:
        raise ConfigError(
            f"[tls] key_file {config.key_file}: holds no PEM private key; set it to the "
            "certificate's private key file"
        )
    _check_pair(config)
    ca = _read(config.client_ca_file, "client_ca_file") if config.client_ca_file else None
    return grpc.ssl_server_credentials(
        [pair], root_certificates=ca, require_client_auth=config.mutual
    )
