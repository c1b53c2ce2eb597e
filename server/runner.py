"""Run a FeatureServer until SIGTERM or SIGINT, then drain it and exit 0."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
from collections.abc import Callable

from server import event_loop
from server.app import FeatureServer
from server.config import ServerConfig

log = logging.getLogger("featureserve.server")

GC_THRESHOLDS = (10_000, 50, 50)
"""Collections of generation 0, 1 and 2 run after 10k allocations, 50 and 50 younger runs."""


async def serve(config: ServerConfig, on_ready: Callable[[int], None] | None = None) -> None:
    """Start the server, call on_ready(port), wait for a stop signal, then shut down gracefully
    (in-flight calls finish within the grace period; pending writes are committed).

    Once started, everything loaded so far (modules, JIT-compiled kernels, sessions) is moved out
    of the garbage collector's view (gc.freeze), so its full collections stop rescanning it:
    measured here, p99.9 of 100-entity lookups at one in flight fell from ~2.0 to ~1.6 ms.

    The collector's thresholds are raised to GC_THRESHOLDS while serving: a full collection walks
    every in-flight write batch (lists of a thousand rows each), and with the default thresholds
    it took ~15% of the event loop under durable ingest (measured: +12-14% rows/s)."""
    server = FeatureServer(config)
    defaults = gc.get_threshold()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        starting = asyncio.ensure_future(server.start())
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            # A stop while the store warms or models load ends the load at the next await,
            # rather than after it (a long load outlasted the grace before SIGKILL).
            log.info("stop requested while starting; abandoning start-up")
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
            return
        stopping.cancel()
        port = starting.result()
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)
        if on_ready is not None:
            on_ready(port)
        await stop.wait()
    finally:
        gc.set_threshold(*defaults)
        await server.stop()


def run(config: ServerConfig, stop_requested: Callable[[], bool] = lambda: False) -> None:
    """Blocking entry point of `featureserve serve`, on the configured event loop.

    stop_requested() says whether a stop signal came before serve() took SIGTERM and SIGINT
    over (see stop_signals.StopSignals): then the server does not start, or, if the signal came
    while it started, the signal is sent again once it serves, so it drains and exits 0."""
    if stop_requested():
        log.info("stopped before serving")
        return

    def on_ready(port: int) -> None:
        if stop_requested():
            os.kill(os.getpid(), signal.SIGTERM)

    event_loop.run(serve(config, on_ready), config.event_loop)
