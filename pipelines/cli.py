"""`featureserve pipeline run streaming|backfill`: run the definitions' window jobs.

By default the job runs on a local Flink mini-cluster inside this process. With
`--jobmanager HOST:PORT` it is submitted to a running Flink cluster (for example one started
with the pip package's own `bin/start-cluster.sh`); the task managers need this repository's
packages and Python, which the job ships as python.files. Kafka: pass the connector jar
(flink-sql-connector-kafka, matching Flink 2.x) with --kafka-jar, plus --kafka-topic and
--bootstrap-servers; the events are then read from the topic instead of --source.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from clients.cli import add_connection_flags, client_config, connection_problem
from pipelines.streaming import JobOptions

_KINDS = {int: "an integer", float: "a number"}


def _number(kind: type, meaning: str, low: float) -> Callable[[str], float]:
    """An argparse type: a finite number >= low; argparse prints the message and exits 2 for
    another, before any Flink job starts."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or value < low:
            raise argparse.ArgumentTypeError(f"{text!r}: give {meaning}, {_KINDS[kind]} >= {low:g}")
        return value

    return parse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `pipeline` command group."""
    pipeline = subparsers.add_parser("pipeline", help="PyFlink feature pipelines")
    actions = pipeline.add_subparsers(dest="pipeline_command", required=True, metavar="ACTION")
    run = actions.add_parser(
        "run",
        help="run the streaming or backfill job",
        description="Compute the [[pipeline]] windows of a features.toml and write them.",
    )
    run.add_argument("mode", choices=["streaming", "backfill"])
    run.add_argument("--source", type=Path, required=True, help="folder of CSV/JSON event files")
    add_connection_flags(run)
    run.add_argument("--definitions", type=Path, default=Path("features.toml"))
    run.add_argument(
        "--parallelism", type=_number(int, "the number of parallel tasks", 1), default=1
    )
    run.add_argument(
        "--jobmanager", help="submit to this Flink cluster (HOST:PORT of its REST API)"
    )
    run.add_argument("--bounded", action="store_true", help="streaming: read the folder once")
    run.add_argument(
        "--monitor-interval",
        type=_number(float, "seconds between scans of the folder", 0.001),
        default=1.0,
        help="seconds between scans",
    )
    run.add_argument("--dead-letter", type=Path, help="default: <source>.dead-letter.jsonl")
    run.add_argument(
        "--retry-bound",
        type=_number(float, "seconds a batch may retry", 0),
        default=30.0,
        help="seconds a batch may retry",
    )
    run.add_argument(
        "--message-rows",
        type=_number(int, "rows per StreamWriteFeatures message", 1),
        default=2000,
        help="rows per message the sink starts with; halved while the server finds one too large",
    )
    run.add_argument(
        "--max-clock-skew",
        type=_number(float, "seconds an event time may be ahead of now", 0),
        default=300.0,
        help="dead-letter events later than now + this (the server's max_clock_skew_seconds)",
    )
    run.add_argument("--kafka-jar", type=Path, help="Kafka SQL connector jar (enables Kafka)")
    run.add_argument("--kafka-topic")
    run.add_argument("--bootstrap-servers")
    run.set_defaults(func=cmd_run)


def options_from_args(args: argparse.Namespace) -> JobOptions:
    """JobOptions from parsed flags; target carries the connection flags (TLS, token)."""
    return JobOptions(
        source=args.source, target=client_config(args), definitions=args.definitions,
        bounded=args.bounded, parallelism=args.parallelism,
        monitor_interval_s=args.monitor_interval, dead_letter=args.dead_letter,
        message_rows=args.message_rows, max_clock_skew_s=args.max_clock_skew,
        jobmanager=args.jobmanager, kafka_jar=args.kafka_jar, kafka_topic=args.kafka_topic,
        bootstrap_servers=args.bootstrap_servers, retry_bound_s=args.retry_bound,
    )  # fmt: skip


def flag_problem(args: argparse.Namespace) -> str | None:
    """What makes the flags unusable together or with the files they name, naming the flag and
    the fix; None when they can run."""
    if args.kafka_jar and not (args.kafka_topic and args.bootstrap_servers):
        return "--kafka-jar needs --kafka-topic and --bootstrap-servers"
    if not args.kafka_jar and not args.source.exists():
        return f"--source {args.source}: does not exist; give the folder of CSV/JSON event files"
    if args.dead_letter is not None and args.dead_letter.is_dir():
        return (
            f"--dead-letter {args.dead_letter}: is a folder; give a file path such as "
            f"{args.dead_letter / 'dead-letter.jsonl'}"
        )
    if args.jobmanager is not None:
        host, _, port = args.jobmanager.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            return f"--jobmanager {args.jobmanager}: give HOST:PORT of its REST API, e.g. host:8081"
    return connection_problem(args)


def cmd_run(args: argparse.Namespace) -> int:
    """Run the job to its end (bounded input) or until stopped; print its report as JSON.
    Unusable flags or definitions exit 2 with one line, before any Flink job starts."""
    from featurestore.errors import InvalidArgumentError
    from pipelines.backfill import run_backfill
    from pipelines.config import load_pipelines
    from pipelines.streaming import run_streaming

    problem = flag_problem(args)
    if problem is None:
        try:
            load_pipelines(args.definitions)
        except InvalidArgumentError as exc:
            problem = str(exc)
    if problem is not None:
        print(f"featureserve: {problem}", file=sys.stderr)
        return 2
    options = options_from_args(args)
    report = run_backfill(options) if args.mode == "backfill" else run_streaming(options)
    print(json.dumps(asdict(report), default=str))
    return 0
