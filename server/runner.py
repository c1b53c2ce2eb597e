"""Run a FeatureServer until SIGTERM or SIGINT, then drain it and exit 0."""

from __future__ import annotations

import asyncio
import signal

from server.app import FeatureServer
from server.config import ServerConfig


async def serve(config: ServerConfig, ready: asyncio.Event | None = None) -> None:
    """Start the server, wait for a stop signal, then shut down gracefully."""
    server = FeatureServer(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await server.start()
        if ready is not None:
            ready.set()
        await stop.wait()
    finally:
        await server.stop()


def run(config: ServerConfig) -> None:
    """Blocking entry point of `featureserve serve`."""
    asyncio.run(serve(config))
