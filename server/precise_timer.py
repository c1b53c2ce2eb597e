"""Sub-millisecond timers for event loops. uvloop counts its timers in whole milliseconds and
asyncio's epoll rounds a wait up to one, so a shorter wait is kept here instead: one thread
sleeps on a condition (microsecond wake-ups) and hands each due callback to its loop. The
batcher used to re-check such waits on every loop turn, which kept a core busy for the whole
wait of a lone request."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import threading
import time
from collections.abc import Callable


class PreciseHandle:
    """A callback due at a time.monotonic() instant; cancel() before it runs drops it."""

    __slots__ = ("callback", "cancelled", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
        self.loop = loop
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        """Drop the callback (call on its loop's thread)."""
        self.cancelled = True

    def _run(self) -> None:
        if not self.cancelled:
            self.callback()


class PreciseTimer:
    """call_at(loop, due, callback): runs callback on loop at time.monotonic() `due`, within the
    thread's wake-up latency (tens of µs) rather than the loop's millisecond timers."""

    def __init__(self) -> None:
        self._due: list[tuple[float, int, PreciseHandle]] = []
        self._order = itertools.count()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None

    def call_at(
        self, loop: asyncio.AbstractEventLoop, due: float, callback: Callable[[], None]
    ) -> PreciseHandle:
        """Schedule callback on loop at `due`; the thread starts with the first call."""
        handle = PreciseHandle(loop, callback)
        with self._wake:
            heapq.heappush(self._due, (due, next(self._order), handle))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._serve, name="precise-timer", daemon=True
                )
                self._thread.start()
            elif self._due[0][2] is handle:
                self._wake.notify()
        return handle

    def _serve(self) -> None:
        with self._wake:
            while True:
                if not self._due:
                    self._wake.wait()
                    continue
                due, _, handle = self._due[0]
                wait = due - time.monotonic()
                if wait > 0:
                    self._wake.wait(wait)
                    continue
                heapq.heappop(self._due)
                if not handle.cancelled:
                    with contextlib.suppress(RuntimeError):  # its loop closed meanwhile
                        handle.loop.call_soon_threadsafe(handle._run)


PRECISE_TIMER = PreciseTimer()
"""The process's one timer thread, shared by every batcher."""
