"""The asyncio event loop a process serves on: uvloop by default, asyncio's own on request.

grpc.aio runs every call's callbacks, futures and socket wake-ups through the loop; on uvloop
one server process answered ~9% more Predict calls on average (README, "Event loop").
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import uvloop

EVENT_LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "uvloop": uvloop.new_event_loop,
    "asyncio": asyncio.SelectorEventLoop,
}
DEFAULT_EVENT_LOOP = "uvloop"

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T], event_loop: str = DEFAULT_EVENT_LOOP) -> T:
    """asyncio.run(main) on a new loop of the named kind."""
    with asyncio.Runner(loop_factory=EVENT_LOOPS[event_loop]) as runner:
        return runner.run(main)


def running_loop_name() -> str:
    """The kind of the running loop, as named in EVENT_LOOPS."""
    loop = asyncio.get_running_loop()
    return "uvloop" if isinstance(loop, uvloop.Loop) else "asyncio"
