"""The server's own errors, and the one place where every domain error becomes a gRPC status."""

from __future__ import annotations

import functools
import logging

import grpc

from clients.channel import BATCH_KEY, ROW_KEY
from featurestore import errors as fs
from protos.arrays import ArrayError

log = logging.getLogger("featureserve.errors")

MAX_STATUS_BYTES = 4096
"""Most bytes a status message takes in its grpc-message header (percent-encoded, as sent):
gRPC refuses metadata over 16 KiB, and may over 8 KiB, which the client would see as
RESOURCE_EXHAUSTED instead of the status sent."""
CUT_MARK = " [... cut: the message was longer than 4 KiB]"
_SHORT = MAX_STATUS_BYTES // 12
"""A message of at most this many characters fits: one character is at most 12 bytes sent
(4 UTF-8 bytes, each percent-encoded as 3)."""


class ServerError(Exception):
    """Base of the server's own errors."""


class ModelNotFoundError(ServerError):
    """No such model, or no such version of it."""


class InvalidRequestError(ServerError):
    """A request that can never succeed as sent; the message names the field and the fix."""


class QueueFullError(ServerError):
    """The model's queue (or the server's concurrency cap) is full: retry later."""


class RequestTimeoutError(ServerError):
    """The request's timeout or the caller's deadline passed before it ran."""


class ModelUnavailableError(ServerError):
    """The model exists but is not ready (loading, unloading or failed to load)."""


class ModelLoadError(ServerError):
    """RepositoryModelLoad found files it cannot serve: loading again fails until they change."""


class ControlRefusedError(ServerError):
    """RepositoryModelLoad / Unload cannot take effect on this server as it runs (one of several
    --workers processes): change the model's files instead."""


class InferenceFailedError(ServerError):
    """Executing this request's rows failed (ONNX Runtime, or outputs without the batch rows)."""


class RegionExistsError(ServerError):
    """SystemSharedMemoryRegister of a region name already registered (Triton's rule)."""


class RegionNotFoundError(ServerError):
    """SystemSharedMemoryStatus of a region name nobody registered."""


class RegionChangedError(ServerError):
    """The shared-memory region a request's output goes to was unregistered (or registered
    again) while the request ran."""


class SharedMemoryLimitError(ServerError):
    """A shared-memory request over one of the server's limits: the regions it registers, the
    descriptors it may open, or max_message_bytes for a BYTES input read from a region."""


class PermissionDeniedError(ServerError):
    """The caller's token lacks the scope the RPC needs."""


class UnauthenticatedError(ServerError):
    """No token, or a token the server does not know."""


_STATUS: dict[type[Exception], grpc.StatusCode] = {
    fs.NotFoundError: grpc.StatusCode.NOT_FOUND,
    fs.InvalidArgumentError: grpc.StatusCode.INVALID_ARGUMENT,
    fs.ResourceExhaustedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    fs.ConflictError: grpc.StatusCode.FAILED_PRECONDITION,
    fs.UnavailableError: grpc.StatusCode.UNAVAILABLE,
    fs.CorruptRowError: grpc.StatusCode.DATA_LOSS,
    ArrayError: grpc.StatusCode.INVALID_ARGUMENT,
    ModelNotFoundError: grpc.StatusCode.NOT_FOUND,
    InvalidRequestError: grpc.StatusCode.INVALID_ARGUMENT,
    QueueFullError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    RequestTimeoutError: grpc.StatusCode.DEADLINE_EXCEEDED,
    ModelUnavailableError: grpc.StatusCode.UNAVAILABLE,
    ModelLoadError: grpc.StatusCode.FAILED_PRECONDITION,
    ControlRefusedError: grpc.StatusCode.FAILED_PRECONDITION,
    InferenceFailedError: grpc.StatusCode.INTERNAL,
    RegionExistsError: grpc.StatusCode.ALREADY_EXISTS,
    RegionNotFoundError: grpc.StatusCode.NOT_FOUND,
    RegionChangedError: grpc.StatusCode.FAILED_PRECONDITION,
    SharedMemoryLimitError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    PermissionDeniedError: grpc.StatusCode.PERMISSION_DENIED,
    UnauthenticatedError: grpc.StatusCode.UNAUTHENTICATED,
}


def status_for(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status for a domain error (its nearest mapped base class), INTERNAL otherwise."""
    for cls in type(exc).__mro__:
        code = _STATUS.get(cls)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


def is_domain_error(exc: BaseException) -> bool:
    """Whether exc is one of the errors that map to a specific status."""
    return status_for(exc) is not grpc.StatusCode.INTERNAL or isinstance(exc, InferenceFailedError)


def error_metadata(exc: BaseException, batch: int | None = None) -> tuple[tuple[str, str], ...]:
    """Where a failed write failed, as trailing metadata: its batch of a stream (when given) and
    the bad row of a batch rejected whole."""
    where = () if batch is None else ((BATCH_KEY, str(batch)),)
    if isinstance(exc, fs.BadRowError):
        where += ((ROW_KEY, str(exc.row)),)
    return where


def _sent_bytes(char: str) -> int:
    """Bytes a character takes in a grpc-message header, which percent-encodes every byte but
    printable ASCII other than %."""
    if " " <= char <= "~" and char != "%":
        return 1
    return 3 * len(char.encode("utf-8", "surrogatepass"))


def capped(message: str) -> str:
    """The message, or when it would take more than MAX_STATUS_BYTES sent, its start cut on a
    character boundary and marked with CUT_MARK."""
    if len(message) <= _SHORT:
        return message
    sent, cut = 0, 0
    for i, char in enumerate(message[: MAX_STATUS_BYTES + 1]):
        sent += _sent_bytes(char)
        if sent <= MAX_STATUS_BYTES - len(CUT_MARK):
            cut = i + 1
        elif sent > MAX_STATUS_BYTES:
            return message[:cut] + CUT_MARK
    return message


def _visible(exc: fs.NotFoundError) -> str:
    """A NotFoundError's message with only the suggested views the calling principal may
    read or write (every suggestion when auth is off, or for features, entities, versions)."""
    from server.auth import current_principal, schema_scopes  # server.auth imports this module

    principal = current_principal()
    if principal is None or exc.what != "view":
        return str(exc)
    seen = [
        name
        for name in exc.suggestions
        if any(principal.grants(scope) for scope in schema_scopes(name))
    ]
    return exc.message(seen)


def status_message(exc: BaseException, message: str | None = None) -> str:
    """What the caller is told of exc: `message` (default: str(exc)) with the suggestions of a
    NotFoundError (exc, or the cause an error quotes) narrowed to the views the caller may
    access, capped at MAX_STATUS_BYTES."""
    text = str(exc) if message is None else message
    missing = exc if isinstance(exc, fs.NotFoundError) else exc.__cause__
    if isinstance(missing, fs.NotFoundError) and missing.suggestions:
        text = text.replace(str(missing), _visible(missing))
    return capped(text)


async def abort(
    context: grpc.aio.ServicerContext,
    exc: BaseException,
    message: str | None = None,
    batch: int | None = None,
) -> None:
    """End the RPC with the status of a domain error, its message (or `message`, which may
    quote it) as status_message renders it, and where a write failed as trailing metadata."""
    await context.abort(status_for(exc), status_message(exc, message), error_metadata(exc, batch))


def maps_errors(handler):
    """Decorate an async unary-response RPC handler so domain errors end the call with their
    mapped status and message, and anything unexpected with INTERNAL (logged with its traceback;
    left to grpc.aio, it would answer UNKNOWN)."""

    @functools.wraps(handler)
    async def wrapper(self, request, context: grpc.aio.ServicerContext):
        try:
            return await handler(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            if is_domain_error(exc):
                await abort(context, exc)
            log.exception("%s failed unexpectedly", handler.__qualname__)
            await context.abort(
                grpc.StatusCode.INTERNAL,
                capped(
                    f"{handler.__name__}: unexpected {type(exc).__name__}: {exc}; this is a "
                    "server bug: the server log holds its traceback"
                ),
            )

    return wrapper
