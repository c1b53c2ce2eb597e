"""What every featureserve interceptor shares: each method's handler wrapped once, when the
services are registered, and a handler rebuilt around a new behavior with the same streaming
shape.

The interceptors are applied here rather than handed to grpc.aio, whose interceptor pipeline
runs every interceptor's intercept_service coroutine on every call to find the handler again:
with the same interceptors, Predict (100 entities, h2load, c=64) served 17% more requests/s
wrapped at registration (README, "Where the time goes").
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Sequence
from functools import partial

import grpc


class WrappingInterceptor:
    """An interceptor that wraps each method's handler with wrap(), once per method; methods
    starting with one of `exempt` pass through unwrapped."""

    exempt: tuple[str, ...] = ()

    def applies(self, method: str) -> bool:
        """Whether this interceptor wraps `method`."""
        return not method.startswith(self.exempt)

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        """The handler of `method` as this interceptor serves it."""
        raise NotImplementedError


def intercept(
    handler: grpc.RpcMethodHandler, method: str, interceptors: Sequence[WrappingInterceptor]
) -> grpc.RpcMethodHandler:
    """`handler` wrapped by every interceptor that applies, the first one outermost, and then
    by release_aborts."""
    for interceptor in reversed(interceptors):
        if interceptor.applies(method):
            handler = interceptor.wrap(handler, method)
    return rewrap(handler, release_aborts)


def release_aborts(behavior: Callable, response_streaming: bool) -> Callable:
    """The behavior, with the AbortError of a call it ends by context.abort released from its
    traceback once the call is done. grpc.aio keeps that error on the call's state, and its
    traceback holds every frame it passed (handler, interceptors, grpc.aio's own), with the
    request and the context, which holds the call's state: a reference cycle that kept each
    failed call's request (and decoded batch) until a garbage collection, ~250 failed calls
    apart here, so a caller sending large bad or unauthenticated requests could pile up GBs."""
    if inspect.isasyncgenfunction(behavior):

        async def streamed(request: object, context: grpc.aio.ServicerContext):
            try:
                async for response in behavior(request, context):
                    yield response
            except grpc.aio.AbortError as exc:
                context.add_done_callback(partial(_forget, exc))
                raise

        return streamed

    async def called(request: object, context: grpc.aio.ServicerContext) -> object:
        try:
            return await behavior(request, context)
        except grpc.aio.AbortError as exc:
            context.add_done_callback(partial(_forget, exc))
            raise

    return called


def _forget(exc: BaseException, _context: object) -> None:
    """Drop what an ended call's error refers to: its frames and the errors it ended."""
    exc.__traceback__ = exc.__context__ = exc.__cause__ = None


class InterceptedHandlers(grpc.GenericRpcHandler):
    """A generic handler serving another's methods through the interceptors, each method's
    wrapped handler built on its first call and kept; it is rebuilt if the inner generic
    handler hands over a different handler for the method."""

    def __init__(
        self, inner: grpc.GenericRpcHandler, interceptors: Sequence[WrappingInterceptor]
    ) -> None:
        self._inner = inner
        self._interceptors = tuple(interceptors)
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = self._inner.service(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = intercept(handler, method, self._interceptors)
        self._wrapped[method] = (handler, wrapped)
        return wrapped


class InterceptingRegistrar:
    """Stands in for the grpc.aio server while services register (the generated
    add_*Servicer_to_server functions), adding their handlers wrapped by the interceptors."""

    def __init__(self, server: grpc.aio.Server, interceptors: Sequence[WrappingInterceptor]):
        self._server = server
        self._interceptors = tuple(interceptors)

    def add_generic_rpc_handlers(self, generic_handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        """Register the generic handlers, intercepted."""
        self._server.add_generic_rpc_handlers(
            tuple(InterceptedHandlers(h, self._interceptors) for h in generic_handlers)
        )

    def add_registered_method_handlers(
        self, service: str, method_handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        """Register the method handlers, intercepted (grpc.aio 1.65 ignores them and serves the
        generic handlers registered beside them)."""
        self._server.add_registered_method_handlers(
            service,
            {
                name: intercept(handler, f"/{service}/{name}", self._interceptors)
                for name, handler in method_handlers.items()
            },
        )


def coroutine_behavior(behavior: Callable) -> Callable:
    """A handler's behavior as a coroutine function (or async generator function, unchanged),
    so a wrapper awaits it directly instead of asking on every call whether it returned an
    awaitable."""
    if inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior):
        return behavior

    async def awaited(request: object, context: object) -> object:
        result = behavior(request, context)
        if inspect.isawaitable(result):
            result = await result
        return result

    return awaited


_KINDS = (
    ("unary_unary", grpc.unary_unary_rpc_method_handler),
    ("stream_unary", grpc.stream_unary_rpc_method_handler),
    ("unary_stream", grpc.unary_stream_rpc_method_handler),
    ("stream_stream", grpc.stream_stream_rpc_method_handler),
)
"""The four handler kinds: the RpcMethodHandler attribute holding the behavior, and the
function that builds a handler of that kind."""


def rewrap(
    handler: grpc.RpcMethodHandler,
    wrap: Callable[[Callable, bool], Callable],
    request_deserializer: Callable | None = None,
    response_serializer: Callable | None = None,
) -> grpc.RpcMethodHandler:
    """The same kind of handler with its behavior replaced by wrap(behavior, response_streaming),
    where behavior is the old one as a coroutine_behavior, and its serializers unless others
    are given."""
    serde = {
        "request_deserializer": request_deserializer or handler.request_deserializer,
        "response_serializer": response_serializer or handler.response_serializer,
    }
    for kind, make in _KINDS:
        behavior = getattr(handler, kind)
        if behavior is not None:
            return make(wrap(coroutine_behavior(behavior), handler.response_streaming), **serde)
    raise ValueError("the handler has no behavior")
