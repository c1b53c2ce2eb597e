"""Run the real featureserve server for a benchmark scenario and print `READY <port>` on stdout.

`featureserve serve` announces itself with a JSON log line on stderr; the harness's ServerProcess
waits for `READY <port>` on stdout. This module runs the same FeatureServer in this process (so
the pid the harness samples for CPU is the server's own) and prints the line once it serves.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
from pathlib import Path

from benchmarks.scenarios import ScenarioError, ServerProcess, python_module_argv
from server.app import FeatureServer
from server.cli import SERVE_FLAGS
from server.config import load_config
from server.logs import configure_logging

DEFAULT_LOG_LEVEL = "WARNING"


async def serve(config_path: Path | None, overrides: dict[str, object]) -> None:
    """Start FeatureServer with the config file and flag overrides, print READY, serve until
    SIGTERM or SIGINT, then stop it gracefully (pending writes are committed)."""
    config = load_config(config_path, overrides)
    configure_logging(config.log_level, config.log_format)
    server = FeatureServer(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        port = await server.start()
        print(f"READY {port}", flush=True)
        await stop.wait()
    finally:
        await server.stop(grace=1.0)


class LaunchedServer(ServerProcess):
    """A launched server that may own a scratch directory, deleted when the server stops."""

    def __init__(self, argv: list[str], scratch: Path | None) -> None:
        self.scratch = scratch
        try:
            super().__init__(argv, ready_timeout_s=120.0)
        except ScenarioError:
            self._remove_scratch()
            raise

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL), then delete its scratch directory."""
        super().stop(timeout_s)
        self._remove_scratch()

    def _remove_scratch(self) -> None:
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)


def launch(
    data_dir: Path, model_repo: Path, *extra: str, scratch: Path | None = None
) -> LaunchedServer:
    """Start a featureserve server subprocess on a free loopback port; returns once it serves.

    extra: more flags for this module (e.g. "--config", "server.toml"); scratch: a directory
    (holding the store or models) to delete once the server has stopped.
    """
    argv = python_module_argv(
        "benchmarks.server_launch",
        "--port",
        "0",
        "--data-dir",
        str(data_dir),
        "--model-repo",
        str(model_repo),
        *extra,
    )
    return LaunchedServer(argv, scratch)


def main(argv: list[str] | None = None) -> None:
    """`python -m benchmarks.server_launch --data-dir D --model-repo M [--port 0] [--config F]`."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.server_launch", description=__doc__)
    parser.add_argument("--config", type=Path, default=None, help="TOML config file")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--model-repo", type=Path, required=True)
    parser.add_argument("--metrics-port", type=int, default=0)
    parser.add_argument("--log-level", default=DEFAULT_LOG_LEVEL)
    args = parser.parse_args(argv)
    overrides: dict[str, object] = {name: getattr(args, name) for name in SERVE_FLAGS}
    overrides["log_level"] = args.log_level
    asyncio.run(serve(args.config, overrides))


if __name__ == "__main__":
    main()
