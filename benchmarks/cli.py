"""`featureserve bench SCENARIO ...`: sweep a scenario's load points, print and save the report."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from benchmarks import h2load, report
from benchmarks.baseline import BASELINE, DEFAULT_PAYLOAD_BYTES
from benchmarks.load import CLOSED, OPEN, LoadError, LoadSpec, run_load
from benchmarks.scenarios import (
    Scenario,
    ScenarioError,
    ScenarioRun,
    get_scenario,
    scenario_names,
)

PYTHON = "python"
H2LOAD = "h2load"


def _numbers(kind: type) -> Any:
    """argparse type for a comma-separated list of numbers."""

    def parse(text: str) -> list[Any]:
        try:
            return [kind(part) for part in text.split(",") if part.strip()]
        except ValueError:
            message = f"expected numbers like 1,8,32, got '{text}'"
            raise argparse.ArgumentTypeError(message) from None

    return parse


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The load-shape, target and output flags every scenario shares."""
    load = parser.add_argument_group("load")
    load.add_argument(
        "--concurrency",
        type=_numbers(int),
        default=None,
        help="closed loop: in-flight requests to sweep, e.g. 1,8,32,64 (default 1,8,32)",
    )
    load.add_argument(
        "--rate",
        type=_numbers(float),
        default=None,
        help="open loop: requests/s to sweep, e.g. 2000,4000; latency from the intended send",
    )
    load.add_argument(
        "--processes",
        type=int,
        default=os.cpu_count() or 2,
        help="client processes (default: CPU count)",
    )
    load.add_argument("--channels", type=int, default=1, help="channels per client process")
    load.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring")
    load.add_argument("--duration", type=float, default=5.0, help="measured seconds per point")
    load.add_argument(
        "--grace",
        type=float,
        default=5.0,
        help="seconds after the window before client processes are killed",
    )
    load.add_argument("--timeout", type=float, default=10.0, help="per-request deadline, s")
    load.add_argument(
        "--max-outstanding",
        type=int,
        default=10_000,
        help="open loop: in-flight cap per process; requests over it count as CLIENT_BACKLOG",
    )
    load.add_argument(
        "--generator",
        choices=(PYTHON, H2LOAD),
        default=PYTHON,
        help="load generator: Python grpc.aio processes, or h2load for unary scenarios",
    )
    where = parser.add_argument_group("target")
    where.add_argument(
        "--target", default=None, help="HOST:PORT of a running loopback server (default: start one)"
    )
    where.add_argument(
        "--server-pid", type=int, default=None, help="pid of --target's server, for its CPU"
    )
    out = parser.add_argument_group("output")
    out.add_argument(
        "--with-baseline",
        action="store_true",
        help="also run `baseline` at the same points and payload size; add ratio columns",
    )
    out.add_argument("--json", type=Path, default=None, help="write {'runs': [...]} here")


def configure(parser: argparse.ArgumentParser) -> None:
    """Add one sub-command per registered scenario, each with its own and the common flags."""
    scenarios = parser.add_subparsers(dest="scenario", metavar="SCENARIO", required=True)
    for name in scenario_names():
        scenario = get_scenario(name)
        sub = scenarios.add_parser(name, help=scenario.help, description=scenario.help)
        scenario.add_arguments(sub.add_argument_group(f"{name} scenario"))
        add_common_arguments(sub)
    parser.set_defaults(func=run_bench)


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `bench` to the featureserve CLI; the parsed namespace's func is run_bench."""
    bench = subparsers.add_parser(
        "bench", help="load-test a scenario", description="Load-test a featureserve scenario."
    )
    configure(bench)
    return bench


def load_specs(args: argparse.Namespace) -> list[LoadSpec]:
    """One LoadSpec per sweep point: each --concurrency, then each --rate."""
    common = {
        "processes": args.processes,
        "warmup_s": args.warmup,
        "duration_s": args.duration,
        "grace_s": args.grace,
        "channels_per_process": args.channels,
        "max_outstanding": args.max_outstanding,
    }
    concurrency = args.concurrency
    if concurrency is None and args.rate is None:
        concurrency = [1, 8, 32]
    specs = [LoadSpec(mode=CLOSED, concurrency=c, **common) for c in concurrency or []]
    specs += [LoadSpec(mode=OPEN, rate=r, **common) for r in args.rate or []]
    return specs


def run_point(
    scenario: Scenario, run: ScenarioRun, spec: LoadSpec, args: argparse.Namespace
) -> dict[str, Any]:
    """Run one load point against a set-up scenario and return its record."""
    server_pid = args.server_pid or run.server_pid
    client_args = run.client_args or args
    if args.generator == H2LOAD:
        unary = scenario.unary_request(client_args)
        if unary is None:
            raise ScenarioError(f"scenario '{scenario.name}' is not unary; use python")
        method, body, metadata = unary
        result = h2load.run_h2load(run.target, method, body, spec, server_pid, metadata)
        latency_from = "send"
    else:
        result = run_load(scenario, client_args, run.target, spec, server_pid)
        latency_from = None
    record = report.make_run(scenario.name, spec, run, result, args.generator, latency_from)
    finish_point = getattr(scenario, "finish_point", None)
    if finish_point is not None:
        finish_point(run, record)
    return record


def run_scenario(scenario: Scenario, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Set the scenario up once, run every load point against it, tear it down."""
    specs = load_specs(args)
    run = scenario.setup(args)
    try:
        return [run_point(scenario, run, spec, args) for spec in specs]
    finally:
        scenario.teardown(run)


def baseline_args(args: argparse.Namespace, payload_bytes: int) -> argparse.Namespace:
    """args for `baseline` at args' load points and generator, with its own server."""
    parser = argparse.ArgumentParser()
    BASELINE.add_arguments(parser)
    add_common_arguments(parser)
    derived = parser.parse_args([])
    for key in vars(derived):
        if key in vars(args) and key not in ("payload_bytes", "request_bytes"):
            setattr(derived, key, getattr(args, key))
    derived.target = None
    derived.server_pid = None
    derived.payload_bytes = payload_bytes
    return derived


def run_with_baseline(scenario: Scenario, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run scenario and baseline at the same points and response size; annotate with ratios.

    Refuses a scenario with no response size (response_sized False): no floor matches it.
    Each baseline point runs right after the scenario's point of the same load, so a machine
    whose speed drifts over the sweep skews a ratio as little as it can. Returns the scenario's
    records (with baseline_* and *_vs_baseline keys) then the baseline's.
    """
    if scenario.name == BASELINE.name:
        return run_scenario(scenario, args)
    if not getattr(scenario, "response_sized", True):
        takers = [
            name for name in scenario_names() if getattr(get_scenario(name), "response_sized", True)
        ]
        raise ScenarioError(
            f"--with-baseline matches the baseline's payload to the response size, and "
            f"'{scenario.name}' has none; it takes {', '.join(takers)}"
        )
    specs = load_specs(args)
    run = scenario.setup(args)
    try:
        payload = (
            run.response_bytes or getattr(args, "payload_bytes", None) or DEFAULT_PAYLOAD_BYTES
        )
        floor_args = baseline_args(args, payload)
        floor_run = BASELINE.setup(floor_args)
        try:
            records, floor = [], []
            for spec in specs:
                record = run_point(scenario, run, spec, args)
                reference = run_point(BASELINE, floor_run, spec, floor_args)
                report.add_baseline(record, reference)
                records.append(record)
                floor.append(reference)
        finally:
            BASELINE.teardown(floor_run)
    finally:
        scenario.teardown(run)
    return records + floor


def variants_of(scenario: Scenario, args: argparse.Namespace) -> list[argparse.Namespace]:
    """The scenario's argument variants (e.g. lookup's entities per request), else [args]."""
    variants = getattr(scenario, "variants", None)
    return [args] if variants is None else variants(args)


def run_bench(args: argparse.Namespace) -> int:
    """Run the parsed `bench` command: 0 when every point ran, 2 on a setup or load error."""
    try:
        scenario = get_scenario(args.scenario)
        runner = run_with_baseline if args.with_baseline else run_scenario
        runs = [
            record
            for variant in variants_of(scenario, args)
            for record in runner(scenario, variant)
        ]
    except (LoadError, ScenarioError, h2load.H2LoadError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    print(report.format_table(runs))
    if args.json is not None:
        report.write_json(runs, args.json)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m benchmarks.cli SCENARIO ...`, the same as `featureserve bench SCENARIO ...`."""
    parser = argparse.ArgumentParser(prog="featureserve bench", description=__doc__)
    configure(parser)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
