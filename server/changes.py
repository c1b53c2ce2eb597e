"""Changes that run to their end: whoever awaits one may give up (a client's deadline cancels its
handler, the server stops), but the change goes on. A change stopped halfway left a model version
LOADING for good with its threads running, and a registry apply or a write that went through in
its thread or commit process was recorded CANCELLED in the audit log."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class Changes:
    """The changes under way, so that shutdown can wait for them before it frees what they use."""

    def __init__(self) -> None:
        self._running: set[asyncio.Task] = set()

    def run(self, change: Coroutine[Any, Any, T]) -> asyncio.Future[T]:
        """Start `change` as a task of its own; the returned future (await it) is shielded, so
        cancelling the awaiting caller leaves the change running (and a failure it then ends
        with is marked retrieved by the shield: it is already where the change reports it)."""
        task = asyncio.ensure_future(change)
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        return asyncio.shield(task)

    async def wait(self) -> None:
        """Until every change started so far has ended."""
        await asyncio.gather(*self._running, return_exceptions=True)
