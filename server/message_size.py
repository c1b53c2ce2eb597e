"""Request and response size limits that answer RESOURCE_EXHAUSTED naming max_message_bytes, and
requests that do not parse answered INVALID_ARGUMENT naming the message type.

gRPC's own limit answers "Received message larger than max (N vs. M)", which names neither the
server option nor the fix, so gRPC is given a higher ceiling (app.grpc_receive_limit) and this
interceptor applies the configured one; a request gRPC cannot parse would end the call UNKNOWN
"DecodeError". On a bidirectional stream such a message fails only its own request: the servicer
answers it in its place (usable), and the stream goes on.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError, Message

from featurestore.errors import ResourceExhaustedError
from server.config import ServerConfig
from server.errors import InvalidRequestError, abort
from server.handler_wrapping import WrappingInterceptor, rewrap

_RESPONSE_FIXES = {
    "inference.GRPCInferenceService": "send fewer rows per request or request fewer outputs",
    "featureserve.v1.Prediction": "send fewer entities per request",
}
"""How to shrink a response, per service; the feature store's (default) names its entity cap."""


class Unusable:
    """What MessageSizeInterceptor's deserializer hands on for a request it cannot pass on: over
    max_message_bytes, or bytes that are not the method's request message. `error` says which;
    a bidirectional stream's servicer answers it in the request's place (usable)."""

    __slots__ = ("error",)

    def __init__(self, error: ResourceExhaustedError | InvalidRequestError) -> None:
        self.error = error


_REJECTIONS = (ResourceExhaustedError, InvalidRequestError)
"""The errors an Unusable request carries, and a response over the limit raises."""


def usable(request: object) -> object:
    """The request, or the error of an Unusable one raised."""
    if type(request) is Unusable:
        raise request.error
    return request


def _request_type(parse: Callable | None) -> str:
    """The full name of the message a deserializer parses (a generated class's FromString)."""
    descriptor = getattr(getattr(parse, "__self__", None), "DESCRIPTOR", None)
    return descriptor.full_name if descriptor is not None else "request message of the method"


def _unparseable(method: str, message_type: str, size: int) -> InvalidRequestError:
    """INVALID_ARGUMENT for `size` bytes that do not parse as `message_type`."""
    return InvalidRequestError(
        f"{method.lstrip('/')}: the request ({size} bytes) is not a valid {message_type}; check "
        "that the client sends this method's request message type, built from the same .proto "
        "version as the server's"
    )


@dataclass(frozen=True)
class MessageLimit:
    """max_message_bytes, and the error that names it and the fix."""

    limit: int
    max_entities: int

    @classmethod
    def of(cls, config: ServerConfig) -> MessageLimit:
        """The limit a server config sets."""
        return cls(config.max_message_bytes, config.max_entities_per_request)

    def error(self, method: str, what: str, size: int) -> ResourceExhaustedError:
        """RESOURCE_EXHAUSTED for a `what` ("request" or "response") of `size` bytes."""
        name = method.lstrip("/")
        if what == "request":
            fix = "split it into smaller requests (fewer rows or entities per message)"
        else:
            fix = _RESPONSE_FIXES.get(name.split("/")[0]) or (
                "ask for fewer entities or features per call (max_entities_per_request="
                f"{self.max_entities} caps entities, not bytes)"
            )
        return ResourceExhaustedError(
            f"{name}: the {what} is {size} bytes, over the server's limit of "
            f"max_message_bytes={self.limit}; {fix}, or raise max_message_bytes in the server "
            "config"
        )

    def response(self, method: str, response: Message) -> Message:
        """A streamed response, or the error of one over the limit (gRPC's own send limit
        would end the whole stream)."""
        size = response.ByteSize()
        if size > self.limit:
            raise self.error(method, "response", size)
        return response


def _passthrough(raw: bytes) -> bytes:
    return raw


class MessageSizeInterceptor(WrappingInterceptor):
    """Ends a call whose request message, or unary response, is over max_message_bytes with
    RESOURCE_EXHAUSTED naming the limit and the fix (gRPC's own check names neither), and one
    whose request does not parse with INVALID_ARGUMENT naming the message type.

    A request is measured as raw bytes before it is parsed (an oversized one never is); a unary
    response is serialized here instead of by gRPC, once, so each check costs a len(). The
    bidirectional streams named in `in_place` receive an unusable request as Unusable and
    check their streamed responses themselves (MessageLimit), so one message fails only its own
    request. Put it last, so it wraps the servicers directly.
    """

    def __init__(self, limit: MessageLimit, in_place: frozenset[str] = frozenset()) -> None:
        super().__init__()
        self.limit = limit
        self.in_place = in_place

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        """The handler with its requests measured and, for a unary response, its response."""
        limits = self.limit
        limit = limits.limit
        parse = handler.request_deserializer
        serialize = handler.response_serializer
        message_type = _request_type(parse)

        def deserialize(raw: bytes) -> object:
            if len(raw) > limit:
                return Unusable(limits.error(method, "request", len(raw)))
            if parse is None:
                return raw
            try:
                return parse(raw)
            except DecodeError:
                return Unusable(_unparseable(method, message_type, len(raw)))

        async def checked(requests: AsyncIterator) -> AsyncIterator:
            received = aiter(requests)
            try:
                async for request in received:
                    yield usable(request)
            finally:
                # A handler that stops reading early (a stream failed on a bad batch) left
                # grpc.aio's receiver paused on its last message, in a reference cycle that only
                # a full collection freed: each failed stream kept its last request.
                await received.aclose()

        def adapt(request: object) -> object:
            if handler.request_streaming:
                return request if method in self.in_place else checked(request)
            return usable(request)

        def measured(behavior: Callable, streaming: bool) -> Callable:
            if not streaming:

                async def unary(request, context):
                    try:
                        response = await behavior(adapt(request), context)
                        raw = serialize(response) if serialize is not None else response
                        if len(raw) > limit:
                            raise limits.error(method, "response", len(raw))
                    except _REJECTIONS as exc:
                        await abort(context, exc)
                    return raw

                return unary
            if inspect.isasyncgenfunction(behavior):

                async def generator(request, context):
                    try:
                        async for response in behavior(adapt(request), context):
                            yield response
                    except _REJECTIONS as exc:
                        await abort(context, exc)

                return generator

            async def writer(request, context):
                try:
                    await behavior(adapt(request), context)
                except _REJECTIONS as exc:
                    await abort(context, exc)

            return writer

        unary_response = not handler.response_streaming
        return rewrap(
            handler,
            measured,
            request_deserializer=deserialize,
            response_serializer=_passthrough if unary_response else None,
        )
