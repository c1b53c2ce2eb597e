"""Bidirectional streams answered in order (StreamPredict, ModelStreamInfer): a stream's requests
run concurrently, so they can batch together, while its answers keep the requests' order; at most
a window of requests is in flight, so a slow reader stops the reading instead of a backlog
growing in the server."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import TypeVar

Request = TypeVar("Request")
Answer = TypeVar("Answer")


async def answer_in_order(
    requests: AsyncIterable[Request],
    answer: Callable[[Request, int], Awaitable[Answer]],
    window: int,
) -> AsyncIterator[Answer]:
    """Yield answer(request, position) for each request in request order (position from 0).
    The next request is read only while fewer than `window` answers are running or waiting to
    be handed to gRPC; gRPC's own flow control then bounds what waits for the reader."""
    slots = asyncio.Semaphore(window)
    pending: asyncio.Queue[asyncio.Task | None] = asyncio.Queue()

    async def read() -> None:
        iterator = requests.__aiter__()
        try:
            for position in itertools.count():
                await slots.acquire()
                try:
                    request = await iterator.__anext__()
                except StopAsyncIteration:
                    return
                pending.put_nowait(asyncio.ensure_future(answer(request, position)))
        finally:
            pending.put_nowait(None)

    reader = asyncio.ensure_future(read())
    try:
        while (task := await pending.get()) is not None:
            yield await task
            slots.release()
        await reader
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await reader
        while not pending.empty():
            task = pending.get_nowait()
            if task is not None:
                task.cancel()


def unparsed(position: int) -> str:
    """What an error answer to a request that was not parsed (over max_message_bytes, or not a
    valid message) says in place of its request id."""
    return (
        f"; it was not parsed, so this answer has no request id: it answers request {position} "
        "of the stream (from 0; answers keep the requests' order)"
    )
