"""maps_errors over a real grpc.aio server: domain errors get their status, a handler's own
abort stands, and anything unexpected is INTERNAL (grpc.aio alone would answer UNKNOWN)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from featurestore.errors import BadRowError, NotFoundError
from server.errors import maps_errors

SERVICE = "test.Errors"


class Raising:
    """Each method fails in its own way (the request names nothing: bytes in, bytes out)."""

    @maps_errors
    async def NotFound(self, request: bytes, context) -> bytes:
        raise NotFoundError("feature view 'v' is not registered")

    @maps_errors
    async def BadRow(self, request: bytes, context) -> bytes:
        raise BadRowError("column 'x' row 3: NaN", 3)

    @maps_errors
    async def Aborts(self, request: bytes, context) -> bytes:
        await context.abort(grpc.StatusCode.OUT_OF_RANGE, "the handler's own status")

    @maps_errors
    async def Bug(self, request: bytes, context) -> bytes:
        return b"" + {}["missing"]

    @maps_errors
    async def StreamBug(self, requests, context) -> bytes:
        async for _ in requests:
            raise RuntimeError("lost track of a batch")
        return b""


async def outcomes() -> dict[str, tuple[grpc.StatusCode, str, dict]]:
    raising = Raising()
    names = ("NotFound", "BadRow", "Aborts", "Bug")
    handlers = {n: grpc.unary_unary_rpc_method_handler(getattr(raising, n)) for n in names}
    handlers["StreamBug"] = grpc.stream_unary_rpc_method_handler(raising.StreamBug)
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    got = {}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        for name in names:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await channel.unary_unary(f"/{SERVICE}/{name}")(b"", timeout=10)
            trailing = dict(tuple(info.value.trailing_metadata() or ()))
            got[name] = (info.value.code(), info.value.details(), trailing)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await channel.stream_unary(f"/{SERVICE}/StreamBug")(iter([b""]), timeout=10)
        got["StreamBug"] = (info.value.code(), info.value.details(), {})
    await server.stop(0)
    return got


def test_every_failure_gets_its_status() -> None:
    got = asyncio.run(outcomes())
    assert got["NotFound"][:2] == (grpc.StatusCode.NOT_FOUND, "feature view 'v' is not registered")
    code, _, trailing = got["BadRow"]
    assert code == grpc.StatusCode.INVALID_ARGUMENT and trailing["featureserve-row"] == "3"
    assert got["Aborts"][:2] == (grpc.StatusCode.OUT_OF_RANGE, "the handler's own status")
    code, message, _ = got["Bug"]
    assert code == grpc.StatusCode.INTERNAL
    assert "Bug: unexpected KeyError: 'missing'" in message and "server log" in message
    code, message, _ = got["StreamBug"]
    assert code == grpc.StatusCode.INTERNAL
    assert "StreamBug: unexpected RuntimeError: lost track of a batch" in message
