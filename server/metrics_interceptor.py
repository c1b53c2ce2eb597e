"""Interceptor counting every RPC by method and status code and timing it, for unary and
streaming methods alike; handlers are wrapped once, at registration, so a call pays no set-up."""

from __future__ import annotations

import asyncio
import inspect
from time import perf_counter

import grpc

from server.handler_wrapping import WrappingInterceptor, rewrap
from server.metrics import RPC_DURATION, RPC_REQUESTS

OK = "OK"
CANCELLED = "CANCELLED"
DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
UNKNOWN = "UNKNOWN"


class MethodRecorder:
    """Pre-bound counter and histogram children of one method; rarer codes bound on first use."""

    __slots__ = ("by_code", "duration", "method", "ok", "owner")

    def __init__(self, method: str, owner: MetricsInterceptor) -> None:
        self.method = method
        self.owner = owner
        self.duration = RPC_DURATION.labels(method)
        self.ok = RPC_REQUESTS.labels(method, OK)
        self.by_code: dict[str, object] = {OK: self.ok}

    def finish(self, start: float, context: grpc.aio.ServicerContext, exc: BaseException | None):
        """Record one finished call: its duration and its status code."""
        self.duration.observe(perf_counter() - start)
        self.owner.count += 1
        code = context.code()
        if code is not None:
            name = code.name if isinstance(code, grpc.StatusCode) else grpc.StatusCode(code).name
        elif exc is None or isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
            # A request stream whose deadline passes ends like a half-close and its handler
            # returns normally; the client was answered DEADLINE_EXCEEDED all the same.
            remaining = context.time_remaining()
            if remaining is not None and remaining <= 0:
                name = DEADLINE_EXCEEDED
            elif exc is None:
                self.ok.inc()
                return
            else:
                name = CANCELLED
        else:
            name = UNKNOWN
        child = self.by_code.get(name)
        if child is None:
            child = self.by_code[name] = RPC_REQUESTS.labels(self.method, name)
        child.inc()


class MetricsInterceptor(WrappingInterceptor):
    """Records featureserve_rpc_requests_total{method,code} and featureserve_rpc_duration_seconds.

    Put it first in the interceptor list so calls refused by later interceptors (auth) count too.
    `count` is the number of RPCs this process finished, for the per-process gauge.
    """

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        """The handler timed and its status counted."""
        return wrap_handler(handler, MethodRecorder(method.lstrip("/"), self))


def wrap_handler(handler: grpc.RpcMethodHandler, rec: MethodRecorder) -> grpc.RpcMethodHandler:
    """The same handler with its behavior timed and its status recorded."""
    return rewrap(handler, lambda b, streaming: _streaming(b, rec) if streaming else _unary(b, rec))


def _unary(behavior, rec: MethodRecorder):
    """Wrap a unary-response behavior (request or request iterator in, one response out)."""

    async def timed(request, context):
        start = perf_counter()
        try:
            response = await behavior(request, context)
        except BaseException as exc:
            rec.finish(start, context, exc)
            raise
        rec.finish(start, context, None)
        return response

    return timed


def _streaming(behavior, rec: MethodRecorder):
    """Wrap a streaming-response behavior: an async generator, or a coroutine that writes."""
    if inspect.isasyncgenfunction(behavior):

        async def timed_generator(request, context):
            start = perf_counter()
            try:
                async for response in behavior(request, context):
                    yield response
            except BaseException as exc:
                rec.finish(start, context, exc)
                raise
            rec.finish(start, context, None)

        return timed_generator

    async def timed_writer(request, context):
        start = perf_counter()
        try:
            await behavior(request, context)
        except BaseException as exc:
            rec.finish(start, context, exc)
            raise
        rec.finish(start, context, None)

    return timed_writer
