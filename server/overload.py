"""A cap on concurrent RPCs that answers RESOURCE_EXHAUSTED at once, replacing grpc.aio's
maximum_concurrent_rpcs, whose counter underflows after the first rejections in grpcio 1.65
(grpc/grpc#41531, fixed upstream after the version apache-flink lets us pin), lifting the cap."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import grpc

from server.handler_wrapping import WrappingInterceptor, rewrap

EXEMPT = ("/grpc.health.v1.Health/",)


class OverloadInterceptor(WrappingInterceptor):
    """Admits at most `limit` RPCs of this process at a time; the next ones end at once with
    RESOURCE_EXHAUSTED (clients back off and retry) instead of queueing. Health checks are
    exempt so a busy server is not mistaken for a dead one."""

    def __init__(self, limit: int, exempt: tuple[str, ...] = EXEMPT) -> None:
        super().__init__()
        self.limit = limit
        self.active = 0
        self.rejected = 0
        self.exempt = exempt
        self._message = (
            f"server is at its limit of {limit} concurrent RPCs (max_concurrent_rpcs); "
            "retry with backoff"
        )

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        """The handler, run only while a slot is free."""
        return rewrap(handler, self._guard)

    def _guard(self, behavior: Callable, streaming: bool) -> Callable:
        """The behavior, run only when a slot is free, holding the slot until it ends."""
        if streaming and inspect.isasyncgenfunction(behavior):

            async def guarded_generator(request, context):
                if self.active >= self.limit:
                    self.rejected += 1
                    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, self._message)
                self.active += 1
                try:
                    async for response in behavior(request, context):
                        yield response
                finally:
                    self.active -= 1

            return guarded_generator

        async def guarded(request, context):
            if self.active >= self.limit:
                self.rejected += 1
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, self._message)
            self.active += 1
            try:
                return await behavior(request, context)
            finally:
                self.active -= 1

        return guarded
