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
from dataclasses import asdict
from pathlib import Path

from pipelines.streaming import JobOptions


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
    run.add_argument("--target", required=True, help="featureserve HOST:PORT")
    run.add_argument("--definitions", type=Path, default=Path("features.toml"))
    run.add_argument("--parallelism", type=int, default=1)
    run.add_argument(
        "--jobmanager", help="submit to this Flink cluster (HOST:PORT of its REST API)"
    )
    run.add_argument("--bounded", action="store_true", help="streaming: read the folder once")
    run.add_argument("--monitor-interval", type=float, default=1.0, help="seconds between scans")
    run.add_argument("--dead-letter", type=Path, help="default: <source>.dead-letter.jsonl")
    run.add_argument("--retry-bound", type=float, default=30.0, help="seconds a batch may retry")
    run.add_argument("--kafka-jar", type=Path, help="Kafka SQL connector jar (enables Kafka)")
    run.add_argument("--kafka-topic")
    run.add_argument("--bootstrap-servers")
    run.set_defaults(func=cmd_run)


def options_from_args(args: argparse.Namespace) -> JobOptions:
    """JobOptions from parsed flags."""
    return JobOptions(
        source=args.source, target=args.target, definitions=args.definitions,
        bounded=args.bounded, parallelism=args.parallelism,
        monitor_interval_s=args.monitor_interval, dead_letter=args.dead_letter,
        jobmanager=args.jobmanager, kafka_jar=args.kafka_jar, kafka_topic=args.kafka_topic,
        bootstrap_servers=args.bootstrap_servers, retry_bound_s=args.retry_bound,
    )  # fmt: skip


def cmd_run(args: argparse.Namespace) -> int:
    """Run the job to its end (bounded input) or until stopped; print its report as JSON."""
    from pipelines.backfill import run_backfill
    from pipelines.streaming import run_streaming

    if args.kafka_jar and not (args.kafka_topic and args.bootstrap_servers):
        raise SystemExit("--kafka-jar needs --kafka-topic and --bootstrap-servers")
    options = options_from_args(args)
    report = run_backfill(options) if args.mode == "backfill" else run_streaming(options)
    print(json.dumps(asdict(report), default=str))
    return 0
