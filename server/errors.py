"""The server's own errors, and the one place where every domain error becomes a gRPC status."""

from __future__ import annotations

import functools
import logging

import grpc

from clients.channel import BATCH_KEY, ROW_KEY
from featurestore import errors as fs
from protos.arrays import ArrayError

log = logging.getLogger("featureserve.errors")


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


async def abort(
    context: grpc.aio.ServicerContext,
    exc: BaseException,
    message: str | None = None,
    batch: int | None = None,
) -> None:
    """End the RPC with the status of a domain error, its message (or `message`) and where a
    write failed as trailing metadata."""
    await context.abort(
        status_for(exc), str(exc) if message is None else message, error_metadata(exc, batch)
    )


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
                f"{handler.__name__}: unexpected {type(exc).__name__}: {exc}; this is a server "
                "bug: the server log holds its traceback",
            )

    return wrapper
