"""Request and response size limits that answer RESOURCE_EXHAUSTED naming max_message_bytes.

gRPC's own limit answers "Received message larger than max (N vs. M)", which names neither the
server option nor the fix, so gRPC is given a higher ceiling (app.grpc_receive_limit) and this
interceptor applies the configured one. On a bidirectional stream an oversized message fails only
its own request: the servicer answers it in its place with MessageLimit, and the stream goes on.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc
from google.protobuf.message import Message

from featurestore.errors import ResourceExhaustedError
from server.config import ServerConfig
from server.errors import abort
from server.handler_wrapping import WrappingInterceptor, rewrap


class Oversized:
    """What MessageSizeInterceptor's deserializer hands on for a request over the limit (a
    bidirectional stream's servicer receives it, and answers it with MessageLimit.request)."""

    __slots__ = ("size",)

    def __init__(self, size: int) -> None:
        self.size = size


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
        if what == "request":
            fix = "split it into smaller requests (fewer rows or entities per message)"
        else:
            fix = (
                "ask for fewer entities or features per call (max_entities_per_request="
                f"{self.max_entities} caps entities, not bytes)"
            )
        return ResourceExhaustedError(
            f"{method.lstrip('/')}: the {what} is {size} bytes, over the server's limit of "
            f"max_message_bytes={self.limit}; {fix}, or raise max_message_bytes in the server "
            "config"
        )

    def request(self, method: str, request: object) -> object:
        """The request, or the error of an Oversized one."""
        if type(request) is Oversized:
            raise self.error(method, "request", request.size)
        return request

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
    RESOURCE_EXHAUSTED naming the limit and the fix (gRPC's own check names neither).

    A request is measured as raw bytes before it is parsed (an oversized one never is); a unary
    response is serialized here instead of by gRPC, once, so each check costs a len(). The
    bidirectional streams named in `in_place` receive an oversized request as Oversized and
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

        def deserialize(raw: bytes) -> object:
            if len(raw) > limit:
                return Oversized(len(raw))
            return parse(raw) if parse is not None else raw

        def check(request: object) -> object:
            return limits.request(method, request)

        async def checked(requests: AsyncIterator) -> AsyncIterator:
            async for request in requests:
                yield check(request)

        def adapt(request: object) -> object:
            if handler.request_streaming:
                return request if method in self.in_place else checked(request)
            return check(request)

        def measured(behavior: Callable, streaming: bool) -> Callable:
            if not streaming:

                async def unary(request, context):
                    try:
                        response = await behavior(adapt(request), context)
                        raw = serialize(response) if serialize is not None else response
                        if len(raw) > limit:
                            raise limits.error(method, "response", len(raw))
                    except ResourceExhaustedError as exc:
                        await abort(context, exc)
                    return raw

                return unary
            if inspect.isasyncgenfunction(behavior):

                async def generator(request, context):
                    try:
                        async for response in behavior(adapt(request), context):
                            yield response
                    except ResourceExhaustedError as exc:
                        await abort(context, exc)

                return generator

            async def writer(request, context):
                try:
                    await behavior(adapt(request), context)
                except ResourceExhaustedError as exc:
                    await abort(context, exc)

            return writer

        unary_response = not handler.response_streaming
        return rewrap(
            handler,
            measured,
            request_deserializer=deserialize,
            response_serializer=_passthrough if unary_response else None,
        )
