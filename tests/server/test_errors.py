"""maps_errors over a real grpc.aio server: domain errors get their status, a handler's own
abort stands, and anything unexpected is INTERNAL (grpc.aio alone would answer UNKNOWN)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from featurestore.errors import BadRowError, InvalidArgumentError, NotFoundError
from server.errors import CUT_MARK, MAX_STATUS_BYTES, capped, maps_errors

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
    async def HugeNotFound(self, request: bytes, context) -> bytes:
        raise NotFoundError("feature view 'v' is not registered; registered: " + "v, " * 20_000)

    @maps_errors
    async def HugeAccented(self, request: bytes, context) -> bytes:
        raise InvalidArgumentError("é" * 20_000)

    @maps_errors
    async def HugeBug(self, request: bytes, context) -> bytes:
        raise RuntimeError("x" * 100_000)

    @maps_errors
    async def StreamBug(self, requests, context) -> bytes:
        async for _ in requests:
            raise RuntimeError("lost track of a batch")
        return b""


async def outcomes() -> dict[str, tuple[grpc.StatusCode, str, dict]]:
    raising = Raising()
    names = ("NotFound", "BadRow", "Aborts", "Bug", "HugeNotFound", "HugeAccented", "HugeBug")
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


def test_long_messages_are_cut_to_fit_the_metadata_limit() -> None:
    """A status message over gRPC's metadata limit reached the client as RESOURCE_EXHAUSTED
    ("received metadata size exceeds hard limit"); now it is cut, marked, and keeps its status."""
    got = asyncio.run(outcomes())
    for name, code in [
        ("HugeNotFound", grpc.StatusCode.NOT_FOUND),
        ("HugeAccented", grpc.StatusCode.INVALID_ARGUMENT),
        ("HugeBug", grpc.StatusCode.INTERNAL),
    ]:
        got_code, message, _ = got[name]
        assert got_code == code, (name, got_code, message[:200])
        assert message.endswith(CUT_MARK)
    assert got["HugeNotFound"][1].startswith("feature view 'v' is not registered; registered: v,")
    assert set(got["HugeAccented"][1].removesuffix(CUT_MARK)) == {"é"}
    assert got["HugeBug"][1].startswith("HugeBug: unexpected RuntimeError: xxx")


def test_capped_counts_bytes_as_sent_and_cuts_between_characters() -> None:
    fits = "a" * MAX_STATUS_BYTES
    assert capped(fits) == fits
    cut = capped(fits + "a")
    assert cut == "a" * (MAX_STATUS_BYTES - len(CUT_MARK)) + CUT_MARK
    # "é" is 2 UTF-8 bytes, each sent percent-encoded as 3 ("%C3%A9"), and so is "%"
    accented = capped("é" * MAX_STATUS_BYTES)
    assert accented == "é" * ((MAX_STATUS_BYTES - len(CUT_MARK)) // 6) + CUT_MARK
    assert capped("%" * (MAX_STATUS_BYTES // 3)) == "%" * (MAX_STATUS_BYTES // 3)
    assert capped("%" * (MAX_STATUS_BYTES // 3 + 1)).endswith(CUT_MARK)
