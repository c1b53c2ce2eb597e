"""What every featureserve interceptor shares: a method's handler wrapped once and cached, and
a handler rebuilt around a new behavior with the same streaming shape."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable

import grpc


class HandlerCache:
    """Wrapped handlers per method, so interceptors build a wrapper once, not per call; an entry
    is rebuilt when the server hands over a different handler for the method."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def get(
        self,
        method: str,
        handler: grpc.RpcMethodHandler,
        build: Callable[[], grpc.RpcMethodHandler],
    ) -> grpc.RpcMethodHandler:
        """The wrapper of `handler`, built with `build` on first use."""
        cached = self._entries.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = build()
        self._entries[method] = (handler, wrapped)
        return wrapped


class WrappingInterceptor(grpc.aio.ServerInterceptor):
    """An interceptor that wraps each method's handler with wrap(), once per method; methods
    starting with one of `exempt` pass through unwrapped."""

    exempt: tuple[str, ...] = ()

    def __init__(self) -> None:
        self._cache = HandlerCache()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(self.exempt):
            return handler
        return self._cache.get(method, handler, lambda: self.wrap(handler, method))

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        """The handler of `method` as this interceptor serves it."""
        raise NotImplementedError


def rewrap(
    handler: grpc.RpcMethodHandler,
    wrap: Callable[[Callable, bool], Callable],
    request_deserializer: Callable | None = None,
    response_serializer: Callable | None = None,
) -> grpc.RpcMethodHandler:
    """The same kind of handler with its behavior replaced by wrap(behavior, response_streaming),
    and its serializers unless others are given."""
    serde = {
        "request_deserializer": request_deserializer or handler.request_deserializer,
        "response_serializer": response_serializer or handler.response_serializer,
    }
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(wrap(handler.unary_unary, False), **serde)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(wrap(handler.stream_unary, False), **serde)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(wrap(handler.unary_stream, True), **serde)
    return grpc.stream_stream_rpc_method_handler(wrap(handler.stream_stream, True), **serde)


async def call_behavior(behavior: Callable, request: object, context: object) -> object:
    """Run a handler's behavior, which may be a plain function or a coroutine function (a
    response-writing one returns None)."""
    result = behavior(request, context)
    if inspect.isawaitable(result):
        result = await result
    return result
