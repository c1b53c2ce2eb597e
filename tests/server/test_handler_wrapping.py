"""Interceptors applied at registration: order, exemptions, one wrapper per method, and plain
behaviors made awaitable; the interceptors themselves are tested over real servers in
test_metrics, test_auth, test_overload and test_inference_rpc."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import grpc

from server.handler_wrapping import (
    InterceptedHandlers,
    InterceptingRegistrar,
    WrappingInterceptor,
    rewrap,
)

METHOD = "/svc.S/Call"


class Tag(WrappingInterceptor):
    """Appends its name to the response, so the order of wrapping shows in the answer."""

    def __init__(self, name: str, exempt: tuple[str, ...] = ()) -> None:
        self.name = name
        self.exempt = exempt
        self.wraps = 0

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        self.wraps += 1

        def tagged(behavior, streaming):
            async def call(request, context):
                return await behavior(request, context) + [self.name]

            return call

        return rewrap(handler, tagged)


class Swappable(grpc.GenericRpcHandler):
    """Serves METHOD with whichever handler it holds now."""

    def __init__(self, handler: grpc.RpcMethodHandler) -> None:
        self.handler = handler

    def service(self, handler_call_details):
        return self.handler if handler_call_details.method == METHOD else None


def plain(request, context):
    return [request]


def call(handlers: grpc.GenericRpcHandler, method: str = METHOD) -> object:
    handler = handlers.service(SimpleNamespace(method=method, invocation_metadata=()))
    if handler is None:
        return None
    return asyncio.run(handler.unary_unary("req", None))


def test_the_first_interceptor_is_outermost_and_plain_behaviors_are_awaited() -> None:
    inner = Swappable(grpc.unary_unary_rpc_method_handler(plain))
    assert call(InterceptedHandlers(inner, [Tag("outer"), Tag("inner")])) == [
        "req",
        "inner",
        "outer",
    ]


def test_exempt_methods_pass_through_and_unknown_methods_stay_unknown() -> None:
    inner = Swappable(grpc.unary_unary_rpc_method_handler(plain))
    handlers = InterceptedHandlers(inner, [Tag("a", exempt=("/svc.S/",)), Tag("b")])
    assert call(handlers) == ["req", "b"]
    assert call(handlers, "/svc.S/Other") is None


def test_a_method_is_wrapped_once_and_again_only_for_a_new_handler() -> None:
    tag = Tag("t")
    inner = Swappable(grpc.unary_unary_rpc_method_handler(plain))
    handlers = InterceptedHandlers(inner, [tag])
    for _ in range(3):
        assert call(handlers) == ["req", "t"]
    assert tag.wraps == 1

    async def other(request, context):
        return ["other"]

    inner.handler = grpc.unary_unary_rpc_method_handler(other)
    assert call(handlers) == ["other", "t"]
    assert tag.wraps == 2


async def served_over_loopback() -> bytes:
    server = grpc.aio.server()
    registrar = InterceptingRegistrar(server, [BytesTag(b"t")])
    echo = grpc.unary_unary_rpc_method_handler(echo_bytes)
    registrar.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("svc.S", {"Call": echo})]
    )
    registrar.add_registered_method_handlers("svc.S", {"Call": echo})
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            return await channel.unary_unary(METHOD)(b"req", timeout=10)
    finally:
        await server.stop(0)


class BytesTag(WrappingInterceptor):
    """Appends its tag to a bytes response."""

    def __init__(self, tag: bytes) -> None:
        self.tag = tag

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        def tagged(behavior, streaming):
            async def call(request, context):
                return await behavior(request, context) + self.tag

            return call

        return rewrap(handler, tagged)


async def echo_bytes(request: bytes, context) -> bytes:
    return request


def test_the_registrar_serves_the_intercepted_handlers_over_a_real_server() -> None:
    assert asyncio.run(served_over_loopback()) == b"reqt"
