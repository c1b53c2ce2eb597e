"""The Predict benchmark's target report."""

from argparse import Namespace

from benchmarks.predict_bench import channels_per_process, summary


def run(scenario: str, generator: str, rps: float, workers: int = 1) -> dict:
    return {
        "scenario": scenario,
        "generator": generator,
        "throughput_rps": rps,
        "workers": workers,
        "concurrency": 64,
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
