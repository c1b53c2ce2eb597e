"""The lookup, ingest and infer scenarios, each run briefly through `featureserve bench` against a
real featureserve server on loopback, at tiny sizes."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import pytest

from benchmarks import cli
from benchmarks.scenario_lookup import MARKER, load_store
from benchmarks.scenarios import ScenarioError, get_scenario

SHORT = ["--processes", "1", "--warmup", "0.3", "--duration", "1", "--grace", "3"]


def _bench(tmp_path: Path, *argv: str) -> list[dict]:
    """Run `featureserve bench ...` with --json and return its records."""
    out = tmp_path / "runs.json"
    assert cli.main([*argv, *SHORT, "--json", str(out)]) == 0
    return json.loads(out.read_text())["runs"]


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
    runs = _bench(
        tmp_path,
        "lookup",
        "--entities", "20",
        "--entities-total", "2000",
        "--data-dir", str(tmp_path / "data"),
        "--concurrency", "2",
        "--generator", "h2load",
    )  # fmt: skip
    (record,) = runs
    _assert_clean(record)
    assert (record["generator"], record["keys"]) == ("h2load", "fixed")


def test_lookup_refuses_a_data_dir_loaded_with_another_data_set(tmp_path) -> None:
    load_store(tmp_path, 300, 4)
    assert load_store(tmp_path, 300, 4) == 0.0
    with pytest.raises(ScenarioError, match="another data set"):
        load_store(tmp_path, 400, 4)


def test_ingest_counts_rows_of_whole_durable_streams_and_removes_its_store(tmp_path) -> None:
    scratch = set(Path(tempfile.gettempdir()).glob("featureserve-ingest-*"))
    runs = _bench(
        tmp_path,
        "ingest",
        "--rows-per-message", "200",
        "--messages-per-stream", "3",
        "--key-space", "5000",
        "--concurrency", "2",
    )  # fmt: skip
    (record,) = runs
    _assert_clean(record)
    assert record["rows_per_request"] == 600
    assert record["rows_per_s"] == pytest.approx(record["throughput_rps"] * 600)
    assert set(Path(tempfile.gettempdir()).glob("featureserve-ingest-*")) <= scratch


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
