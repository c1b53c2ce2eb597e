"""Servicers for RPCs whose feature has not landed: UNIMPLEMENTED with a message saying why."""

from __future__ import annotations

import inspect
from typing import Any

import grpc


def unimplemented_servicer(base: type, reason: str) -> Any:
    """An instance of a subclass of a generated servicer base whose every RPC answers
    UNIMPLEMENTED with `reason`, for unary and streaming methods alike."""

    def make(name: str):
        async def method(self, request, context: grpc.aio.ServicerContext):
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{name}: {reason}")

        method.__name__ = name
        return method

    methods = {
        name: make(name)
        for name, _ in inspect.getmembers(base, inspect.isfunction)
        if not name.startswith("_")
    }
    return type(f"Unimplemented{base.__name__}", (base,), methods)()
