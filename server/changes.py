"""Changes that run to their end: whoever awaits one may give up (a client's deadline cancels its
handler, the server stops), but the change goes on. A change stopped halfway left a model version
LOADING for good with its threads running, and a registry apply or a write that went through in
its thread or commit process was recorded CANCELLED in the audit log."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

log = logging.getLogger("featureserve.changes")


def _log_failure(task: asyncio.Task) -> None:
    """Log how a change nobody awaits failed (its outcome has nowhere else to go)."""
    if not task.cancelled() and task.exception() is not None:
        log.error("a change nobody awaited failed", exc_info=task.exception())


class Changes:
    """The changes under way, so that shutdown can wait for them before it frees what they use."""

    def __init__(self) -> None:
        self._running: set[asyncio.Task] = set()

    def _track(self, change: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """`change` as a task, counted as under way until it ends."""
        task = asyncio.ensure_future(change)
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        return task

    def run(self, change: Coroutine[Any, Any, T]) -> asyncio.Future[T]:
        """Start `change` as a task of its own; the returned future (await it) is shielded, so
        cancelling the awaiting caller leaves the change running (and a failure it then ends
        with is marked retrieved by the shield: it is already where the change reports it)."""
        return asyncio.shield(self._track(change))

    def start(self, change: Coroutine[Any, Any, None]) -> None:
        """Start `change` with nobody to await it; a failure it ends with is logged."""
        self._track(change).add_done_callback(_log_failure)

    async def wait(self) -> None:
        """Until every change started so far has ended."""
        await asyncio.gather(*self._running, return_exceptions=True)
