"""The one place that builds channels: target, TLS, bearer token, deadline, retries, keepalive.

Every client (sync and asyncio) gets its channel and call metadata from here, so the two
twins cannot drift apart.
"""

from __future__ import annotations

import asyncio
import json
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

RETRYABLE = ("UNAVAILABLE",)
MAX_TIMEOUT_S = 1e9
"""gRPC takes a deadline as int64 nanoseconds since the epoch: about 7.4e9 s from now is the end."""


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

    def __post_init__(self) -> None:
        """Refuse settings that would fail later and further away: a deadline gRPC cannot take,
        half of an mTLS pair (gRPC aborts the whole process on it). A CA or a client certificate
        turns TLS on: over plaintext they were ignored and the token went in clear."""
        t = self.timeout_s
        if t is not None and (
            isinstance(t, bool) or not isinstance(t, numbers.Real) or not 0 < t <= MAX_TIMEOUT_S
        ):
            raise ConfigError(
                f"timeout_s (--timeout) must be a number of seconds above 0 and at most "
                f"{MAX_TIMEOUT_S:g}, or None for no deadline; got {t!r}"
            )
        if (self.client_certificate is None) != (self.client_key is None):
            given, missing = ("client_certificate", "client_key")
            if self.client_certificate is None:
                given, missing = missing, given
            raise ConfigError(
                f"{given} is set but {missing} is not (--cert and --key): mTLS needs the client "
                "certificate and its private key; set both, or neither for TLS without a client "
                "certificate"
            )
        if self.root_certificates is not None or self.client_certificate is not None:
            self.tls = True


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


PEM_FILES = {  # ClientConfig option: (CLI flag, what its file holds, the PEM block it needs)
    "root_certificates": ("--ca", "a CA certificate", "CERTIFICATE"),
    "client_certificate": ("--cert", "a client certificate", "CERTIFICATE"),
    "client_key": ("--key", "a private key", "PRIVATE KEY"),
}


def read_pem(path: Path | None, option: str) -> bytes | None:
    """The PEM file of ClientConfig.`option`; ConfigError naming the option, its CLI flag and the
    path when it cannot be read or holds no PEM block of its kind (gRPC then failed every call
    with "empty address list" after pages of C-core log)."""
    if path is None:
        return None
    flag, holds, block = PEM_FILES[option]
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"{option} ({flag}): cannot read {str(path)!r}: {exc.strerror or exc}; give the path "
            "of a readable PEM file"
        ) from None
    if f"{block}-----".encode() not in data:  # "-----BEGIN [EC ]PRIVATE KEY-----" too
        raise ConfigError(
            f"{option} ({flag}): {str(path)!r} holds no PEM {block}; give the PEM file of {holds}"
        )
    return data


def channel_credentials(config: ClientConfig) -> grpc.ChannelCredentials:
    """TLS (or mTLS when a client certificate is set) credentials."""
    return grpc.ssl_channel_credentials(
        root_certificates=read_pem(config.root_certificates, "root_certificates"),
        private_key=read_pem(config.client_key, "client_key"),
        certificate_chain=read_pem(config.client_certificate, "client_certificate"),
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


class ConfigError(ClientError, ValueError):
    """A ClientConfig that cannot work (INVALID_ARGUMENT), raised before any call: the message
    names the option and its CLI flag."""

    def __init__(self, message: str) -> None:
        super().__init__(grpc.StatusCode.INVALID_ARGUMENT, message)


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


PLAINTEXT_HINT = (
    "; the server closed the connection at once, as a server that serves only TLS does to a "
    "plaintext client: connect with TLS (--tls, with --ca for a private CA; ClientConfig.tls)"
)


def client_error(exc: grpc.RpcError, tls: bool = True) -> ClientError:
    """Turn a grpc.RpcError (sync or aio) into a ClientError; a plaintext channel (tls False)
    that the server closed at once is told that the server may want TLS (gRPC says only
    "Socket closed")."""
    details = exc.details() or ""
    if not tls and exc.code() == grpc.StatusCode.UNAVAILABLE and "Socket closed" in details:
        details += PLAINTEXT_HINT
    return status_error(exc.code(), details, exc.trailing_metadata())


def closed_in_flight_error() -> ClientError:
    """The error of a call that was in flight when its client was closed, sync or asyncio."""
    return ClientError(
        grpc.StatusCode.CANCELLED,
        "the client was closed while this call was in flight; close a client only after its "
        "calls have finished",
    )


def stalled_error(stream: str, timeout: float, waiting_for: str, lost: str) -> ClientError:
    """DEADLINE_EXCEEDED for a stream whose server gave no `waiting_for` within `timeout`
    (ClientConfig.timeout_s); the caller has cancelled the stream, so `lost`."""
    return ClientError(
        grpc.StatusCode.DEADLINE_EXCEEDED,
        f"{stream}: no {waiting_for} from the server within {timeout:g} s "
        f"(ClientConfig.timeout_s); the stream was cancelled and {lost}; check the server's "
        "load or raise timeout_s",
    )


class CallErrors:
    """`with CallErrors(client):` around a call, sync or asyncio, raises what the call raised as
    a ClientError. A call cancelled on our side (its client closed, or `cancelled()` gives the
    reason, such as a stalled stream) ends with gRPC's CANCELLED or, in asyncio, a bare
    CancelledError; it becomes that reason instead. A cancel of the calling task itself still
    propagates as CancelledError."""

    __slots__ = ("_cancelled", "_client")

    def __init__(
        self, client: object, cancelled: Callable[[], ClientError | None] | None = None
    ) -> None:
        self._client = client  # a client, whose `_closed` is read when the call ends
        self._cancelled = cancelled

    def _reason(self) -> ClientError | None:
        if self._client._closed:
            return closed_in_flight_error()
        return self._cancelled() if self._cancelled is not None else None

    def error(self, exc: grpc.RpcError) -> ClientError:
        """The ClientError of a failed call: our reason when we cancelled it, else its status."""
        reason = self._reason() if exc.code() == grpc.StatusCode.CANCELLED else None
        return reason or client_error(exc, self._client.config.tls)

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: object) -> None:
        if exc_type is None:
            return
        if issubclass(exc_type, grpc.RpcError):
            raise self.error(exc) from None
        if issubclass(exc_type, asyncio.CancelledError):
            task = asyncio.current_task()
            reason = self._reason() if task is not None and task.cancelling() == 0 else None
            if reason is not None:
                raise reason from None
