"""The Predict benchmark's target report, and its points against a server whose calls fail."""

from argparse import Namespace
from types import SimpleNamespace

import pytest

from benchmarks import h2load
from benchmarks.load import CLOSED, LoadSpec
from benchmarks.predict_bench import (
    PREDICT_SCENARIO,
    STREAM_SCENARIO,
    channels_per_process,
    run_point,
    summary,
)


def run(
    scenario: str, generator: str, rps: float, workers: int = 1, errors: dict | None = None
) -> dict:
    return {
        "scenario": scenario,
        "generator": generator,
        "throughput_rps": rps,
        "workers": workers,
        "concurrency": 64,
        "errors": errors or {},
    }


def test_stream_is_compared_with_unary_only_under_one_generator() -> None:
    (same,) = summary([run("predict", "python", 2400), run("stream-predict", "python", 3840)])
    assert same.endswith("predict 2400 req/s (target >= 2500) MISSED; stream-predict 3840 req/s "
                         "= 1.60x unary (target >= 1.5x) MET")  # fmt: skip
    (mixed,) = summary([run("predict", "h2load", 2600), run("stream-predict", "python", 3000)])
    assert "predict 2600 req/s (target >= 2500) MET" in mixed
    assert "(python) against unary by h2load: not compared" in mixed
    assert "x unary" not in mixed


def test_two_workers_are_measured_against_one_process() -> None:
    lines = summary([run("predict", "h2load", 2000), run("predict", "h2load", 3500, workers=2)])
    assert lines[-1] == "workers=2 c=64: predict 1.75x one process (target >= 1.7x for 2) MET"


def test_a_sweep_past_one_worker_opens_four_connections_per_worker() -> None:
    args = Namespace(processes=2, channels=2)
    assert channels_per_process(args, 1) == 2
    assert channels_per_process(args, 2) == 4
    assert channels_per_process(Namespace(processes=8, channels=1), 2) == 1
    assert channels_per_process(Namespace(processes=3, channels=1), 4) == 6


def test_no_target_is_met_by_a_run_with_errors() -> None:
    (line,) = summary(
        [run("predict", "python", 3000), run("stream-predict", "python", 6000, errors={"X": 1})]
    )
    assert "predict 3000 req/s (target >= 2500) MET" in line
    assert line.endswith("stream-predict 6000 req/s, 1 errors (X: 1) = 2.00x unary "
                         "(target >= 1.5x) MISSED")  # fmt: skip
    (failing,) = summary([run("predict", "python", 0, errors={"NOT_FOUND": 9}),
                          run("stream-predict", "python", 0)])  # fmt: skip
    assert "predict 0 req/s, 9 errors (NOT_FOUND: 9) (target >= 2500) MISSED" in failing
    assert failing.endswith("against no unary answer (target >= 1.5x unary) MISSED")
    two = run("predict", "h2load", 3500, workers=2, errors={"grpc_error": 1})
    lines = summary([run("predict", "h2load", 2000), two])
    assert lines[-1].endswith("1.75x one process (target >= 1.7x for 2) MISSED")


SPEC = LoadSpec(mode=CLOSED, concurrency=8, processes=1, warmup_s=0.3, duration_s=1.0,
                channels_per_process=1)  # fmt: skip


def points_against(server, generator: str) -> list[dict]:
    """Both scenarios' points against a server with no model 'scorer': every call fails."""
    target = SimpleNamespace(target=server.target, pid=server.proc.pid)
    args = Namespace(generator=generator, entities=10)
    floor = {"cpu_us_per_req": 0.0}
    return [run_point(args, s, SPEC, target, 1, floor) for s in (PREDICT_SCENARIO, STREAM_SCENARIO)]


def test_failed_stream_predict_calls_are_errors_not_throughput(server) -> None:
    unary, stream = points_against(server, "python")
    for record in (unary, stream):
        assert record["throughput_rps"] == 0 and sum(record["errors"].values()) > 0
    assert set(stream["errors"]) == set(unary["errors"]) == {"NOT_FOUND"}
    (line,) = summary([unary, stream])
    assert "MET" not in line.replace("MISSED", "")


@pytest.mark.skipif(not h2load.available(), reason="h2load (nghttp2-client) not installed")
def test_failed_unary_predict_through_h2load_is_named_and_missed(server) -> None:
    unary, _ = points_against(server, "h2load")
    assert unary["generator"] == "h2load"
    assert unary["throughput_rps"] == 0 and unary["errors"]["NOT_FOUND"] > 0
    (line,) = summary([unary])
    assert line.endswith("(target >= 2500) MISSED")
