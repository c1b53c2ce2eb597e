"""Run the real featureserve server for a benchmark scenario and print `READY <port>` on stdout.

`featureserve serve` announces itself with a JSON log line on stderr; the harness's ServerProcess
waits for `READY <port>` on stdout. This module runs the same FeatureServer in this process (so
the pid the harness samples for CPU is the server's own) and prints the line once it serves.
"""

from __future__ import annotations

import argparse
import shutil
import socket
from pathlib import Path

from benchmarks.scenarios import ScenarioError, ServerProcess, comma_choices, python_module_argv
from server import event_loop
from server.cli import SERVE_FLAGS
from server.config import load_config
from server.logs import configure_logging
from server.runner import serve

DEFAULT_LOG_LEVEL = "WARNING"


def announce(port: int) -> None:
    """Tell the harness's ServerProcess that the server serves."""
    print(f"READY {port}", flush=True)


OPS_TOKEN = "featureserve-bench-token"
OPS_MODES = ("off", "on")


def ops_config(directory: Path, metrics_port: int) -> Path:
    """A server config with the operations layer on (metrics endpoint, bearer-token auth, audit
    log), for measuring its overhead; clients send `ops_metadata()`."""
    path = directory / "ops.toml"
    path.write_text(
        f"metrics_port = {metrics_port}\n"
        "[auth]\nenabled = true\n"
        f'[[auth.tokens]]\nname = "bench"\ntoken = "{OPS_TOKEN}"\n'
        'scopes = ["read:*", "write:*", "infer:*"]\n'
    )
    return path


def ops_metadata(ops: str) -> tuple[tuple[str, str], ...]:
    """Call metadata for a server launched with ops on ("on") or off."""
    return (("authorization", f"Bearer {OPS_TOKEN}"),) if ops == "on" else ()


def add_ops_argument(parser: argparse.ArgumentParser) -> None:
    """--ops off,on: run each point against a plain server and one with metrics, auth and audit."""
    parser.add_argument(
        "--ops",
        type=comma_choices(OPS_MODES),
        default=["off"],
        help="operations layer (metrics endpoint, token auth, audit log): off and/or on; "
        "a comma list runs one variant each, side by side (default off)",
    )


def launch_for(ops: str, data_dir: Path, model_repo: Path, scratch: Path | None = None):
    """Launch a server with the operations layer off or on (config written beside the data)."""
    if ops != "on":
        return launch(data_dir, model_repo, scratch=scratch)
    data_dir.mkdir(parents=True, exist_ok=True)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        metrics_port = probe.getsockname()[1]
    config = ops_config(data_dir, metrics_port)
    return launch(data_dir, model_repo, "--config", str(config), scratch=scratch)


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
    parser.add_argument("--metrics-port", type=int, default=None)
    parser.add_argument("--log-level", default=DEFAULT_LOG_LEVEL)
    args = parser.parse_args(argv)
    # the serve flags this launcher does not take stay as the config file says (None: not given)
    overrides: dict[str, object] = {name: getattr(args, name, None) for name in SERVE_FLAGS}
    overrides["log_level"] = args.log_level
    config = load_config(args.config, overrides)
    configure_logging(config.log_level, config.log_format)
    event_loop.run(serve(config, announce), config.event_loop)


if __name__ == "__main__":
    main()
