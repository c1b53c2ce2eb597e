"""The `featureserve` command: serve here; client, benchmark and pipeline commands registered
from their own packages."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import resource
import sys
from collections.abc import Callable
from pathlib import Path

SERVE_FLAGS = (
    "host",
    "port",
    "data_dir",
    "model_repo",
    "metrics_port",
    "model_control_mode",
    "startup_models",
)
TRACE_FLAGS = ("trace_file", "trace_level", "trace_rate")
"""Flags that set keys of the config's [trace] table."""


def add_serve(subparsers: argparse._SubParsersAction) -> None:
    """The `serve` subcommand."""
    from server.config import MODEL_CONTROL_MODES
    from server.event_loop import DEFAULT_EVENT_LOOP, EVENT_LOOPS

    p = subparsers.add_parser(
        "serve",
        help="run the featureserve gRPC server",
        description="Run the featureserve gRPC server. Flags override the config file.",
    )
    p.add_argument("--config", type=Path, help="TOML config file (default: embedded defaults)")
    p.add_argument("--host", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to bind (default 50051; 0 picks a free one)")
    p.add_argument("--data-dir", type=Path, help="LMDB and history directory (default ./data)")
    p.add_argument("--model-repo", type=Path, help="model repository (default ./models)")
    p.add_argument("--metrics-port", type=int, help="Prometheus /metrics port (0 = off)")
    p.add_argument(
        "--model-control-mode",
        choices=list(MODEL_CONTROL_MODES),
        help="poll: follow the model repository (default); explicit: load --load-model models, "
        "then only on RepositoryModelLoad/Unload; none: load every model once",
    )
    p.add_argument(
        "--load-model",
        dest="startup_models",
        action="append",
        metavar="NAME",
        help="with --model-control-mode explicit: a model to load at start-up (repeatable; "
        "'*' = every model)",
    )
    p.add_argument("--log-format", choices=["json", "text"], help="log format (default json)")
    p.add_argument(
        "--trace-file",
        help="[trace] trace_file: where request traces go (default DATA_DIR/trace.jsonl)",
    )
    p.add_argument(
        "--trace-level",
        choices=["OFF", "TIMESTAMPS"],
        help="[trace] trace_level: TIMESTAMPS traces sampled requests (default OFF)",
    )
    p.add_argument(
        "--trace-rate", type=int, help="[trace] trace_rate: trace 1 in N requests (default 1000)"
    )
    p.add_argument(
        "--event-loop",
        choices=list(EVENT_LOOPS),
        help=f"asyncio event loop to serve on (default {DEFAULT_EVENT_LOOP})",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="server processes sharing the port with SO_REUSEPORT (default 1)",
    )
    p.set_defaults(func=cmd_serve)


def raise_open_files_limit() -> None:
    """Raise this process's soft open-file limit (RLIMIT_NOFILE, often 1024) to its hard limit,
    as network servers do, so connections and shared-memory regions meet their own limits
    first; workers inherit it. A limit that cannot be raised is left as it is."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError):
        return
    logging.getLogger("featureserve.server").info(
        "raised the open-file limit (RLIMIT_NOFILE) from %d to %d", soft, hard
    )


def cmd_serve(args: argparse.Namespace) -> int:
    """Load the config, then run the server until a stop signal (args.signals, installed by
    main; one that came while the server was starting is a clean stop too: exit 0)."""
    from server.app import StartupError
    from server.config import ConfigError, load_config
    from server.logs import configure_logging

    overrides = {name: getattr(args, name) for name in SERVE_FLAGS}
    overrides["log_format"] = args.log_format
    overrides["event_loop"] = args.event_loop
    if args.workers < 1:
        print("featureserve: --workers must be at least 1", file=sys.stderr)
        return 2
    trace = {name: getattr(args, name) for name in TRACE_FLAGS}
    try:
        config = load_config(args.config, overrides, {"trace": trace})
    except ConfigError as exc:
        print(f"featureserve: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log_level, config.log_format)
    raise_open_files_limit()
    try:
        if args.workers > 1:
            from server.workers import run_workers

            return run_workers(config, args.workers, args.signals)
        from server.runner import run

        run(config, lambda: args.signals.requested)
    except (StartupError, ConfigError) as exc:
        print(f"featureserve: {exc}", file=sys.stderr)
        return 1
    return 0


COMMAND_MODULES = {
    "backup": "server.store_cli",
    "compact-history": "server.store_cli",
    "training-set": "server.training_cli",
    "health": "clients.cli",
    "apply": "clients.feature_cli",
    "delete-view": "clients.feature_cli",
    "delete-service": "clients.feature_cli",
    "ingest": "clients.feature_cli",
    "get": "clients.feature_cli",
    "list": "clients.registry_cli",
    "describe": "clients.registry_cli",
    "predict": "clients.prediction_cli",
    "pipeline": "pipelines.cli",
    "bench": "benchmarks.cli",
}
"""The module whose register() adds each command besides serve, in help order. A command line
imports only its command's module: importing them all (the server, PyFlink's pandas, the
benchmarks) cost every client command ~1.5 s before it parsed its first flag."""


def _registrars(command: str | None) -> list[Callable[[argparse._SubParsersAction], None]]:
    """The registrar of `command` (serve's own, or its module's), or of every command when it
    is none of them (the overview help, or a typo that argparse answers with the choices)."""
    if command == "serve":
        return [add_serve]
    if command in COMMAND_MODULES:
        return [importlib.import_module(COMMAND_MODULES[command]).register]
    modules = dict.fromkeys(COMMAND_MODULES.values())
    return [add_serve, *(importlib.import_module(module).register for module in modules)]


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The command-line parser: of `command` alone when it names one, else of every command."""
    parser = argparse.ArgumentParser(
        prog="featureserve",
        description="Serve ML features and batched ONNX predictions over gRPC.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in _registrars(command):
        register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `featureserve` console script."""
    argv = sys.argv[1:] if argv is None else argv
    signals = None
    if argv[:1] == ["serve"]:
        # Before any other import (this module imports only the standard library): from here
        # on a SIGTERM or Ctrl-C to `serve` is a clean stop, not the signal's default action.
        from server.stop_signals import StopSignals

        signals = StopSignals().install()
        # Read as grpc is imported. The server's children (commit process, compactions,
        # workers) exec at once and never use gRPC across a fork, and gRPC's fork handlers
        # wrote a non-JSON line into the log at each one.
        os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
    from clients.channel import ClientError
    from featurestore.errors import FeatureStoreError

    args = build_parser(argv[0] if argv else None).parse_args(argv)
    if signals is not None:
        args.signals = signals
    try:
        return args.func(args)
    except (ClientError, FeatureStoreError) as exc:
        print(f"featureserve: {exc}", file=sys.stderr)
        return 1
    except UnicodeEncodeError as exc:
        bad = exc.object[exc.start : exc.end]
        if all("\ud800" <= char <= "\udfff" for char in bad):  # how Python holds non-UTF-8 argv
            print(f"featureserve: {bad!r} in an argument is not UTF-8 text", file=sys.stderr)
            return 2
        print(
            f"featureserve: {bad!r} cannot be printed in this output's encoding ({exc.encoding}); "
            "set PYTHONIOENCODING=utf-8 or a UTF-8 locale",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
