"""The one place that builds channels: target, TLS, bearer token, deadline, retries, keepalive.

Every client (sync and asyncio) gets its channel and call metadata from here, so the two
twins cannot drift apart.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import grpc

RETRYABLE = ("UNAVAILABLE",)


@dataclass
class ClientConfig:
    """How to reach a featureserve server."""

    target: str = "127.0.0.1:50051"
    tls: bool = False
    root_certificates: Path | None = None
    client_certificate: Path | None = None
    client_key: Path | None = None
    token: str | None = field(default=None, repr=False)
    timeout_s: float | None = 10.0
    max_attempts: int = 4
    initial_backoff_s: float = 0.05
    max_backoff_s: float = 2.0
    keepalive_ms: int = 30_000
    max_message_bytes: int = 64 * 1024 * 1024


def service_config(config: ClientConfig) -> str:
    """gRPC service config JSON: retry UNAVAILABLE with exponential backoff on every method.

    Writes are idempotent (last-write-wins by event time), so retrying them is safe.
    """
    policy = {
        "methodConfig": [
            {
                "name": [{}],
                "retryPolicy": {
                    "maxAttempts": max(2, config.max_attempts),
                    "initialBackoff": f"{config.initial_backoff_s}s",
                    "maxBackoff": f"{config.max_backoff_s}s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": list(RETRYABLE),
                },
            }
        ]
    }
    return json.dumps(policy)


def channel_options(config: ClientConfig) -> list[tuple[str, object]]:
    """Channel arguments shared by the sync and asyncio channels."""
    options: list[tuple[str, object]] = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.keepalive_time_ms", config.keepalive_ms),
        ("grpc.keepalive_permit_without_calls", 1),
    ]
    if config.max_attempts > 1:
        options += [("grpc.enable_retries", 1), ("grpc.service_config", service_config(config))]
    else:
        options.append(("grpc.enable_retries", 0))
    return options


def _read(path: Path | None) -> bytes | None:
    return Path(path).read_bytes() if path is not None else None


def channel_credentials(config: ClientConfig) -> grpc.ChannelCredentials:
    """TLS (or mTLS when a client certificate is set) credentials."""
    return grpc.ssl_channel_credentials(
        root_certificates=_read(config.root_certificates),
        private_key=_read(config.client_key),
        certificate_chain=_read(config.client_certificate),
    )


def call_metadata(config: ClientConfig) -> tuple[tuple[str, str], ...]:
    """Metadata sent with every call: the bearer token when one is configured."""
    if config.token:
        return (("authorization", f"Bearer {config.token}"),)
    return ()


def create_channel(config: ClientConfig) -> grpc.Channel:
    """A synchronous channel."""
    if config.tls:
        return grpc.secure_channel(
            config.target, channel_credentials(config), options=channel_options(config)
        )
    return grpc.insecure_channel(config.target, options=channel_options(config))


def create_aio_channel(config: ClientConfig) -> grpc.aio.Channel:
    """An asyncio channel."""
    if config.tls:
        return grpc.aio.secure_channel(
            config.target, channel_credentials(config), options=channel_options(config)
        )
    return grpc.aio.insecure_channel(config.target, options=channel_options(config))


BATCH_KEY = "featureserve-batch"
ROW_KEY = "featureserve-row"
"""Trailing metadata of a failed write: the stream message and the row of its batch that failed."""


class ClientError(Exception):
    """A failed call, with its gRPC status code and the server's message; for a failed write,
    `batch` (the stream message, from 0) and `row` (from 0 in that batch) say where, when the
    server says so."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        batch: int | None = None,
        row: int | None = None,
    ) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.batch = batch
        self.row = row


def status_error(code: grpc.StatusCode, details: str | None, trailing_metadata) -> ClientError:
    """A ClientError from a finished call's status, details and trailing metadata (where a
    write failed)."""
    where = dict(tuple(trailing_metadata or ()))  # aio's Metadata iterates as pairs
    batch, row = where.get(BATCH_KEY), where.get(ROW_KEY)
    return ClientError(
        code,
        details or "",
        None if batch is None else int(batch),
        None if row is None else int(row),
    )


def closed_error() -> ClientError:
    """The error every client, sync or asyncio, raises when called after close()."""
    return ClientError(
        grpc.StatusCode.FAILED_PRECONDITION,
        "the client was closed (close() or the end of its with block); make a new client to "
        "call the server again",
    )


def client_error(exc: grpc.RpcError) -> ClientError:
    """Turn a grpc.RpcError (sync or aio) into a ClientError."""
    return status_error(exc.code(), exc.details(), exc.trailing_metadata())
