"""The load harness against a real bare gRPC server on loopback: figures, JSON, histogram, stops."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import socket
import time
from concurrent import futures

import grpc
import numpy as np
import pytest

from benchmarks import cli, h2load, report
from benchmarks.baseline import METHOD, SERVICE, BaselineScenario
from benchmarks.histogram import Histogram, bucket_index, bucket_indices
from benchmarks.load import BACKLOG_ERROR, CANCELLED_ERROR, OPEN, LoadError, LoadSpec, run_load
from benchmarks.scenarios import RequestFn, ScenarioError, get_scenario, register_scenario

REQUIRED_KEYS = {
    "scenario",
    "mode",
    "throughput_rps",
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "p999_ms",
    "errors",
    "server_cpu_us_per_req",
    "client_cpu_us_per_req",
    "payload_bytes",
}


class EchoScenario(BaselineScenario):
    """The baseline under another name, so --with-baseline has something to compare."""

    name = "test-echo"


class StuckScenario(BaselineScenario):
    """Requests that never return: awaiting (cancellable) or blocking the loop (killable)."""

    name = "test-stuck"

    def make_request_fn(self, args: argparse.Namespace, channel: grpc.aio.Channel) -> RequestFn:
        blocking = args.blocking

        async def request() -> None:
            if blocking:
                time.sleep(60)
            await asyncio.sleep(60)

        return request


register_scenario(EchoScenario())
register_scenario(StuckScenario())


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.configure(parser)
    return parser.parse_args(list(argv))


def test_histogram_percentiles_match_numpy_within_precision() -> None:
    rng = np.random.default_rng(7)
    values = rng.lognormal(mean=13.0, sigma=1.0, size=200_000).astype(np.int64)
    hist = Histogram()
    hist.record_many(values)
    for q in (50, 90, 99, 99.9):
        assert hist.percentile(q) == pytest.approx(np.percentile(values, q), rel=0.01)
    assert hist.count == values.size
    assert hist.mean() == pytest.approx(values.mean())


def test_histogram_merge_scalar_and_round_trip_agree() -> None:
    rng = np.random.default_rng(3)
    values = rng.integers(0, 10**9, size=5_000)
    whole, left, right = Histogram(), Histogram(), Histogram()
    whole.record_many(values)
    for v in values[:2_500].tolist():
        left.record(v)
    right.record_many(values[2_500:])
    left.merge(right)
    assert np.array_equal(left.counts, whole.counts)
    assert (left.min, left.max) == (int(values.min()), int(values.max()))
    assert np.array_equal(bucket_indices(values), [bucket_index(v) for v in values.tolist()])
    copy = Histogram.from_dict(json.loads(json.dumps(whole.to_dict())))
    assert copy.percentiles([50, 99]) == whole.percentiles([50, 99])


def test_baseline_closed_and_open_loop_with_json(tmp_path, capsys) -> None:
    out = tmp_path / "bench.json"
    argv = ["baseline", "--concurrency", "4", "--rate", "200", "--processes", "1"]
    argv += ["--warmup", "0.5", "--duration", "2", "--json", str(out)]
    assert cli.main(argv) == 0
    runs = json.loads(out.read_text())["runs"]
    closed, opened = runs
    for run in runs:
        assert run.keys() >= REQUIRED_KEYS
        assert run["errors"] == {}
        assert run["p50_ms"] <= run["p90_ms"] <= run["p99_ms"] <= run["p999_ms"]
        assert run["server_cpu_us_per_req"] > 0
        assert run["payload_bytes"] == 12800
    assert (closed["mode"], closed["concurrency"]) == ("closed", 4)
    assert closed["throughput_rps"] > 0
    assert (opened["mode"], opened["rate"]) == ("open", 200.0)
    assert opened["throughput_rps"] == pytest.approx(200, rel=0.1)
    table = capsys.readouterr().out
    assert table.startswith("| scenario |")
    assert len(table.strip().splitlines()) == 4


def test_with_baseline_adds_ratio_columns() -> None:
    args = _parse("test-echo", "--concurrency", "2", "--processes", "1", "--payload-bytes", "1024")
    args.warmup, args.duration = 0.2, 1.0
    runs = cli.run_with_baseline(get_scenario("test-echo"), args)
    assert [r["scenario"] for r in runs] == ["test-echo", "baseline"]
    echo, floor = runs
    assert floor["payload_bytes"] == 1024
    assert echo["baseline_throughput_rps"] == floor["throughput_rps"]
    assert echo["throughput_vs_baseline"] == pytest.approx(  # rounded to 2 decimals
        echo["throughput_rps"] / floor["throughput_rps"], abs=0.005
    )
    assert "req/s vs baseline" in report.format_table(runs)


@pytest.mark.parametrize(("blocking", "killed"), [(False, 0), (True, 1)])
def test_stuck_requests_are_stopped(blocking: bool, killed: int) -> None:
    scenario = get_scenario("test-stuck")
    args = _parse("test-stuck", "--processes", "1")
    args.blocking = blocking
    run = scenario.setup(args)
    try:
        # The two requests count as cancelled only if sent inside the window: a window much
        # longer than a client process can lag on a busy machine.
        spec = LoadSpec(concurrency=2, processes=1, warmup_s=0.0, duration_s=2.0, grace_s=1.0)
        started = time.monotonic()
        result = run_load(scenario, args, run.target, spec, run.server_pid)
        assert time.monotonic() - started < 30
    finally:
        scenario.teardown(run)
    assert result.completed == 0
    assert result.processes_killed == killed
    if not blocking:
        assert result.errors == {CANCELLED_ERROR: 2}


def test_refuses_non_loopback_targets_and_unknown_scenarios() -> None:
    args = _parse("baseline")
    with pytest.raises(LoadError, match="loopback"):
        run_load(get_scenario("baseline"), args, "10.1.2.3:50051", LoadSpec())
    with pytest.raises(ScenarioError, match=r"known: .*baseline"):
        get_scenario("no-such-scenario")


def test_h2load_framing_and_log_parsing() -> None:
    assert h2load.frame(b"abc") == b"\x00\x00\x00\x00\x03abc"
    log = h2load.parse_log("1\t200\t250\n2\t-1\t9\n3\t200\t1000\n")
    assert log.latencies_ns.tolist() == [250_000, 1_000_000]
    assert (log.answered, log.stream_failed) == (2, 1)
    spec = LoadSpec(concurrency=8, processes=2, warmup_s=0.3, duration_s=2.0)
    auth = (("authorization", "Bearer t"),)
    argv = h2load.command("127.0.0.1:1", "/s/M", "b", "l", spec, 2.0, auth)
    assert argv[argv.index("-m") + 1] == "4"
    # h2load's own warm-up would add its DATA to the run's total: the warm-up is its own run
    assert argv[argv.index("-D") + 1] == "2000ms" and "--warm-up-time" not in argv
    assert argv[argv.index("authorization: Bearer t") - 1] == "-H"
    assert argv[-1] == "http://127.0.0.1:1/s/M"


def test_h2load_open_loop_counts_latency_from_the_intended_send() -> None:
    # 1000/s: due at 0, 1000, 2000, 3000 µs; the third went out 3 ms late, the fourth 2 ms late
    log = "5000\t200\t300\n1000\t200\t100\n0\t200\t100\n5001\t200\t200\n"
    paced = h2load.parse_log(log, rate=1000.0)
    assert paced.latencies_ns.tolist() == [100_000, 100_000, 3_300_000, 2_201_000]
    assert paced.stream_failed == 0
    # a 2 ms window holds the requests due at 0 and 1 ms; the one answered 0.1 ms in ended inside
    window = h2load.parse_log(log, 0.002, rate=1000.0)
    assert (window.latencies_ns.tolist(), window.logged, window.in_window) == ([100_000] * 2, 2, 2)
    closed = h2load.parse_log(log)
    assert sorted(closed.latencies_ns.tolist()) == [100_000, 100_000, 200_000, 300_000]
    spec = LoadSpec(mode=OPEN, rate=2500.0, processes=4, duration_s=1.0, max_outstanding=5000)
    argv = h2load.command("127.0.0.1:1", "/s/M", "b", "l", spec, 1.0)
    assert [argv[argv.index(flag) + 1] for flag in ("-c", "-t", "-m", "--rps")] == [
        "1",
        "1",
        str(h2load.MAX_OPEN_STREAMS),
        "2500",
    ]


H2LOAD_SPEC = LoadSpec(concurrency=8, processes=1, warmup_s=0.3, duration_s=1.0)


@pytest.fixture
def baseline_run():
    """A bare baseline server answering 1 KiB."""
    scenario = get_scenario("baseline")
    run = scenario.setup(_parse("baseline", "--payload-bytes", "1024"))
    yield run
    scenario.teardown(run)


@pytest.mark.skipif(not h2load.available(), reason="h2load (nghttp2-client) not installed")
def test_h2load_counts_grpc_errors_by_name_and_not_as_throughput(baseline_run) -> None:
    answered = h2load.run_h2load(
        baseline_run.target, METHOD, bytes(64), H2LOAD_SPEC, baseline_run.server_pid
    )
    assert answered.errors == {} and answered.completed > 0
    # gRPC answers UNIMPLEMENTED with HTTP 200: every call failed, and is counted so
    failed = h2load.run_h2load(
        baseline_run.target, f"/{SERVICE}/NoSuchMethod", bytes(64), H2LOAD_SPEC, None
    )
    assert failed.completed == 0 and failed.throughput_rps == 0
    assert failed.errors["UNIMPLEMENTED"] > 0
    assert failed.histogram.count == 0


@pytest.mark.skipif(not h2load.available(), reason="h2load (nghttp2-client) not installed")
def test_h2load_counts_errors_among_answers_from_the_data_they_carry() -> None:
    half = ShedsAfter(after_s=0.0)  # every other call fails from the first
    try:
        result = h2load.run_h2load(half.target, METHOD, bytes(64), H2LOAD_SPEC, None)
    finally:
        half.server.stop(0)
    failed = result.errors[h2load.GRPC_ERROR]
    assert set(result.errors) == {h2load.GRPC_ERROR}
    assert failed == pytest.approx(result.completed, rel=0.05)
    assert result.histogram.count == 0  # the log cannot say which latencies were failures


@pytest.mark.skipif(not h2load.available(), reason="h2load (nghttp2-client) not installed")
def test_h2load_that_cannot_connect_raises_with_its_output() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{probe.getsockname()[1]}"
    with pytest.raises(h2load.H2LoadError, match=r"(?s)logged no request.*requests: 0 total"):
        h2load.run_h2load(closed, METHOD, bytes(64), H2LOAD_SPEC, None)


@pytest.mark.parametrize(("concurrency", "processes"), [(5, 2), (33, 2), (100, 8), (8, 2)])
def test_h2load_closed_loop_keeps_exactly_concurrency_streams_in_flight(
    concurrency: int, processes: int
) -> None:
    """-c clients x -m streams each: rounding streams up ran 6 for 5, 34 for 33, 104 for 100."""
    spec = LoadSpec(concurrency=concurrency, processes=processes)
    argv = h2load.command("127.0.0.1:1", "/s/M", "b", "l", spec, 1.0)
    clients, streams = (int(argv[argv.index(flag) + 1]) for flag in ("-c", "-m"))
    assert clients * streams == concurrency and clients <= processes


def test_h2load_allows_the_data_of_streams_cut_at_the_end() -> None:
    """Streams still receiving when -D expires add DATA but no log line: a surplus up to their
    answers is theirs, not a varying answer size; a shortfall counts the most failures it allows."""
    log = h2load.parse_log("0\t200\t5\n1\t200\t5\n2\t200\t5\n3\t200\t5\n")
    assert h2load.grpc_errors(log, 4 * 100 + 150, 100, None, open_streams=2) == {}
    with pytest.raises(h2load.H2LoadError, match="more than its 2 streams cut"):
        h2load.grpc_errors(log, 4 * 100 + 201, 100, None, open_streams=2)
    # 2 answers short: 2 failed for certain, and 2 more could hide in the cut streams' DATA
    assert h2load.grpc_errors(log, 2 * 100, 100, None, open_streams=2) == {h2load.GRPC_ERROR: 4}
    assert h2load.grpc_errors(log, 3 * 100, 100, None, open_streams=1) == {h2load.GRPC_ERROR: 2}


class ShedsAfter:
    """A real gRPC server answering 1 KiB, that sheds every other call with RESOURCE_EXHAUSTED
    once `after_s` have passed since its first call (a queue that fills under sustained load)."""

    def __init__(self, after_s: float, delay_s: float = 0.0) -> None:
        self.calls = itertools.count()
        self.first: list[float] = []
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=1 if delay_s else 4))

        def echo(request: bytes, context: grpc.ServicerContext) -> bytes:
            now = time.monotonic()
            self.first = self.first or [now]
            time.sleep(delay_s)
            if now - self.first[0] >= after_s and next(self.calls) % 2:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")
            return bytes(1024)

        handler = grpc.method_handlers_generic_handler(
            SERVICE, {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
        )
        self.server.add_generic_rpc_handlers((handler,))
        self.target = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()


@pytest.mark.skipif(not h2load.available(), reason="h2load (nghttp2-client) not installed")
def test_h2load_counts_the_windows_own_failures_when_shedding_starts_after_warm_up() -> None:
    """The window was charged its share of the run's failures (warm-up included), so half the
    window failing showed as a quarter, and throughput a third too high."""
    shed = ShedsAfter(after_s=1.0)
    spec = LoadSpec(concurrency=8, processes=1, warmup_s=1.0, duration_s=1.0)
    try:
        result = h2load.run_h2load(shed.target, METHOD, bytes(64), spec, None)
    finally:
        shed.server.stop(0)
    assert result.errors[h2load.GRPC_ERROR] == pytest.approx(result.completed, rel=0.1)


@pytest.mark.skipif(not h2load.available(), reason="h2load (nghttp2-client) not installed")
def test_h2load_open_loop_counts_requests_due_but_never_answered_as_backlog() -> None:
    """A server of ~100 calls/s offered 300/s: the requests h2load never sent or never saw
    answered were neither timed nor counted."""
    slow = ShedsAfter(after_s=1e9, delay_s=0.01)
    spec = LoadSpec(mode=OPEN, rate=300.0, processes=1, warmup_s=0.0, duration_s=1.0)
    try:
        result = h2load.run_h2load(slow.target, METHOD, bytes(64), spec, None)
    finally:
        slow.server.stop(0)
    assert result.errors[BACKLOG_ERROR] > 0
    assert result.histogram.count + sum(result.errors.values()) == 300
