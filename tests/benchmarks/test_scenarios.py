"""The lookup, ingest and infer scenarios, each run briefly through `featureserve bench` against a
real featureserve server on loopback, at tiny sizes."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from benchmarks import cli
from benchmarks.baseline import BaselineScenario
from benchmarks.scenario_lookup import JOIN_KEY, MARKER, VIEW, bench_definitions, load_store
from benchmarks.scenarios import (
    RequestFn,
    ScenarioError,
    get_scenario,
    register_scenario,
)
from clients.feature_client import FeatureStoreClient

SHORT = ["--processes", "1", "--warmup", "0.3", "--duration", "1", "--grace", "3"]


INGEST_WARMUP = ("--warmup", "2")
"""A fresh server's first durable streams took over a second here, past SHORT's warm-up."""


def _bench(tmp_path: Path, *argv: str, extra: tuple[str, ...] = ()) -> list[dict]:
    """Run `featureserve bench ...` with --json (extra overrides SHORT) and return its records."""
    out = tmp_path / "runs.json"
    assert cli.main([*argv, *SHORT, *extra, "--json", str(out)]) == 0
    return json.loads(out.read_text())["runs"]


class TimedEcho(BaselineScenario):
    """The baseline under another name whose client processes each keep, in a file of their own
    in $TIMED_ECHO_DIR, when they sent their first and their latest request."""

    name = "test-timed-echo"

    def make_request_fn(self, args: argparse.Namespace, channel: grpc.aio.Channel) -> RequestFn:
        echo = super().make_request_fn(args, channel)
        path = Path(os.environ["TIMED_ECHO_DIR"]) / f"sent-{os.getpid()}"
        fd = os.open(path, os.O_CREAT | os.O_WRONLY)
        times = np.zeros(2, "<i8")

        async def request() -> object:
            times[1] = time.monotonic_ns()
            times[0] = times[0] or times[1]
            os.pwrite(fd, times.tobytes(), 0)
            return await echo()

        return request


register_scenario(TimedEcho())


def _assert_clean(record: dict) -> None:
    assert record["throughput_rps"] > 0, record
    assert record["requests"] > 0, record
    assert record["errors"] == {}, record
    assert record["server_cpu_us_per_req"] is not None, record


def test_lookup_runs_one_variant_per_entity_count_beside_the_baseline(tmp_path) -> None:
    data = tmp_path / "data"
    runs = _bench(
        tmp_path,
        "lookup",
        "--entities", "1,50",
        "--entities-total", "2000",
        "--data-dir", str(data),
        "--concurrency", "2",
        "--with-baseline",
    )  # fmt: skip
    lookups = [r for r in runs if r["scenario"] == "lookup"]
    floors = [r for r in runs if r["scenario"] == "baseline"]
    assert [r["entities"] for r in lookups] == [1, 50]
    assert [r["keys"] for r in lookups] == ["random", "random"]
    assert lookups[0]["response_bytes"] < lookups[1]["response_bytes"]
    assert [r["payload_bytes"] for r in floors] == [r["response_bytes"] for r in lookups]
    for record in runs:
        _assert_clean(record)
    assert all(r["server_cpu_vs_baseline"] is not None for r in lookups)
    assert json.loads((data / MARKER).read_text())["entities_total"] == 2000


def test_lookup_through_h2load_names_its_one_fixed_request(tmp_path) -> None:
    """By reference and through the feature service that reads the view, side by side: both
    answer every lookup in full (the harness checks each response is whole and PRESENT)."""
    runs = _bench(
        tmp_path,
        "lookup",
        "--entities", "20",
        "--entities-total", "2000",
        "--data-dir", str(tmp_path / "data"),
        "--concurrency", "2",
        "--generator", "h2load",
        "--by", "refs,service",
    )  # fmt: skip
    for record in runs:
        _assert_clean(record)
    assert [(r["generator"], r["keys"], r["by"]) for r in runs] == [
        ("h2load", "fixed", "refs"),
        ("h2load", "fixed", "service"),
    ]
    assert runs[0]["response_bytes"] == runs[1]["response_bytes"]


def test_lookup_refuses_a_data_dir_loaded_with_another_data_set(tmp_path) -> None:
    load_store(tmp_path, 300, 4)
    assert load_store(tmp_path, 300, 4) == 0.0
    with pytest.raises(ScenarioError, match="another data set"):
        load_store(tmp_path, 400, 4)


def _ingest(tmp_path, key_space: int, concurrency: int) -> dict:
    """One clean ingest point of 600-row streams (3 messages of 200 rows)."""
    (record,) = _bench(
        tmp_path,
        "ingest",
        "--rows-per-message", "200",
        "--messages-per-stream", "3",
        "--key-space", str(key_space),
        "--concurrency", str(concurrency),
        extra=INGEST_WARMUP,
    )  # fmt: skip
    _assert_clean(record)
    return record


def test_ingest_counts_rows_of_whole_durable_streams_and_removes_its_store(tmp_path) -> None:
    scratch = set(Path(tempfile.gettempdir()).glob("featureserve-ingest-*"))
    record = _ingest(tmp_path, key_space=5000, concurrency=2)
    assert record["rows_per_request"] == 600
    assert record["rows_per_s"] == pytest.approx(record["throughput_rps"] * 600)
    assert set(Path(tempfile.gettempdir()).glob("featureserve-ingest-*")) <= scratch


def test_ingest_writes_no_stale_row_with_a_stream_in_flight_per_key_slice(tmp_path) -> None:
    """4 streams in flight on a key space of exactly 4 streams' rows: random keys collided
    (a concurrent stream's newer row, or a later message of the same stream) and the stale rows
    counted as ingested; now each stream holds a slice of its own."""
    record = _ingest(tmp_path, key_space=2400, concurrency=4)
    assert (record["rows_stale"], record["rows_rejected"]) == (0, 0), record
    assert record["rows_written"] >= record["requests"] * 600
    assert record["rows_written"] % 600 == 0


def test_ingest_counts_only_rows_written_and_names_the_stale_ones(tmp_path, server) -> None:
    """Every key already holds a newer row, so every row sent is stale: no stream counts toward
    rows/s and the record says how many rows were stale."""
    entity, view = bench_definitions(4)
    keys = np.arange(1200, dtype=np.int64)
    future_us = time.time_ns() // 1000 + 240 * 10**6  # within the 300 s clock skew allowed
    with FeatureStoreClient(server.target) as client:
        client.apply([entity], [view])
        values = {f"f{j}": np.ones(len(keys), np.float32) for j in range(4)}
        client.write_features(VIEW, {JOIN_KEY: keys}, future_us, values)
    runs = _bench(
        tmp_path,
        "ingest",
        "--features", "4",
        "--rows-per-message", "200",
        "--messages-per-stream", "3",
        "--key-space", "1200",
        "--concurrency", "2",
        "--target", server.target,
        extra=INGEST_WARMUP,
    )  # fmt: skip
    (record,) = runs
    assert record["requests"] == 0 and record["rows_per_s"] == 0, record
    assert set(record["errors"]) == {"CLIENT_IngestRowsError"}, record
    assert record["rows_written"] == 0 and record["rows_stale"] >= 600, record


def test_ingest_refuses_more_streams_in_flight_than_key_slices(tmp_path) -> None:
    argv = ["ingest", "--rows-per-message", "200", "--messages-per-stream", "3"]
    argv += ["--key-space", "1200", "--concurrency", "3", *SHORT]
    assert cli.main(argv) == 2


def test_ingest_refuses_rate_and_with_baseline_in_one_line(capsys) -> None:
    """An open loop ran out of key slices; the echo floor has no size to match a row count."""
    assert cli.main(["ingest", "--rate", "50", *SHORT]) == 2
    assert cli.main(["ingest", "--concurrency", "1", "--with-baseline", *SHORT]) == 2
    rate, baseline = capsys.readouterr().err.strip().splitlines()
    assert "--rate" in rate and "--concurrency" in rate
    assert (
        "it takes" in baseline
        and "lookup" in baseline
        and "ingest" not in baseline.split("takes")[1]
    )


def test_with_baseline_runs_each_floor_point_right_after_its_scenario_point(
    tmp_path, monkeypatch
) -> None:
    """The floor of c=1 runs between the scenario's c=1 and c=2 points, not after both: so the
    scenario's c=2 starts at least one whole floor point (warm-up + window) after c=1 ends."""
    monkeypatch.setenv("TIMED_ECHO_DIR", str(tmp_path))
    argv = ["test-timed-echo", "--concurrency", "1,2", "--processes", "1"]
    argv += ["--warmup", "0.3", "--duration", "3", "--with-baseline"]
    assert cli.main([*argv, "--json", str(tmp_path / "runs.json")]) == 0
    runs = json.loads((tmp_path / "runs.json").read_text())["runs"]
    assert [(r["scenario"], r["concurrency"]) for r in runs] == [
        ("test-timed-echo", 1),
        ("test-timed-echo", 2),
        ("baseline", 1),
        ("baseline", 2),
    ]
    assert runs[1]["baseline_throughput_rps"] == runs[3]["throughput_rps"]
    points = sorted(np.frombuffer(p.read_bytes(), "<i8").tolist() for p in tmp_path.glob("sent-*"))
    assert len(points) == 2
    (_, first_ends), (second_starts, _) = points
    gap_s = (second_starts - first_ends) / 1e9
    assert gap_s >= 3.3, f"c=2 started {gap_s:.2f} s after c=1 ended: no floor point between"


def test_infer_runs_small_model_with_batching_on(tmp_path) -> None:
    runs = _bench(tmp_path, "infer", "--model", "small", "--batching", "on", "--concurrency", "2")
    (record,) = runs
    _assert_clean(record)
    assert record["model"] == "small_on"
    assert record["response_bytes"] > 0


def test_infer_variants_cover_every_model_and_batching_pair() -> None:
    parser = argparse.ArgumentParser()
    cli.configure(parser)
    args = parser.parse_args(["infer", "--model", "small,medium", "--batching", "on,off"])
    names = [f"{v.model[0]}_{v.batching[0]}" for v in get_scenario("infer").variants(args)]
    assert names == ["small_on", "small_off", "medium_on", "medium_off"]
