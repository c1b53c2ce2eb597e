"""The streaming job on a local Flink mini-cluster, writing into a real featureserve process."""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest

from clients.feature_client import FeatureStoreClient
from pipelines.checks import apply_views
from pipelines.config import Pipeline, parse_pipeline
from pipelines.dead_letter import count_by_reason, read_dead_letters
from pipelines.events import (
    EXAMPLE_PIPELINE,
    generate_events,
    reference_latest,
    write_events,
    write_malformed,
)
from pipelines.streaming import JobOptions, run_streaming

pytestmark = pytest.mark.flink


def store_snapshot(target: str, pipeline: Pipeline, keys: np.ndarray) -> dict[str, np.ndarray]:
    """Every feature and event time of every window view, for `keys`."""
    out = {}
    with FeatureStoreClient(target) as client:
        for window in pipeline.windows:
            found = client.get_online_features([window.view], {pipeline.entity_column: keys})
            out[f"{window.view}@ts"] = found.event_timestamps[window.view]
            for agg in window.aggregates:
                name = f"{window.view}:{agg.name}"
                out[name] = found.values[name]
                out[f"{name}@status"] = found.statuses[name]
    return out


def assert_matches_reference(snapshot, events, pipeline: Pipeline) -> None:
    """The store holds each entity's newest window, equal to the NumPy reference."""
    for window in pipeline.windows:
        ref = reference_latest(events, pipeline, window)
        np.testing.assert_array_equal(snapshot[f"{window.view}@ts"], ref.window_end_us)
        for agg in window.aggregates:
            got = snapshot[f"{window.view}:{agg.name}"]
            assert (snapshot[f"{window.view}:{agg.name}@status"] == 1).all(), agg.name
            np.testing.assert_allclose(got, ref.features[agg.name], rtol=1e-9, err_msg=agg.name)


def prepare(tmp_path: Path, target: str, n: int = 20_000):
    """Register the views and write the events in one file (a streaming job reads the files
    already in its folder in no set order, so history in several files is backfill's job)."""
    pipeline = parse_pipeline(tomllib.loads(EXAMPLE_PIPELINE)["pipeline"][0])
    definitions = tmp_path / "features.toml"
    definitions.write_text(EXAMPLE_PIPELINE)
    apply_views(target, [pipeline], "card")
    events = generate_events(n, entities=300, span_s=7200, jitter_ms=1500, seed=3)
    source = tmp_path / "events"
    write_events(events, source, files=1)
    return pipeline, definitions, events, source


def test_bounded_stream_matches_reference_and_replay_changes_nothing(server, tmp_path):
    pipeline, definitions, events, source = prepare(tmp_path, server.target)
    bad = write_malformed(source)
    options = JobOptions(
        source=source, target=server.target, definitions=definitions, bounded=True,
        dead_letter=tmp_path / "dead.jsonl", stats_dir=tmp_path / "stats1",
    )  # fmt: skip
    report = run_streaming(options)

    keys = np.unique(events["card_id"])
    first = store_snapshot(server.target, pipeline, keys)
    assert_matches_reference(first, events, pipeline)
    assert report.dead_letters == {"malformed": bad}
    reasons = [e["reason"] for e in read_dead_letters(tmp_path / "dead.jsonl")]
    assert any("card_id is missing or not a bigint" in r for r in reasons)
    assert any("amount is missing or not a double" in r for r in reasons)
    sink = report.sinks["card_txn_5m"]
    assert sink.written > len(keys) and sink.rejected == 0

    options.dead_letter, options.stats_dir = tmp_path / "dead2.jsonl", tmp_path / "stats2"
    again = run_streaming(options)
    second = store_snapshot(server.target, pipeline, keys)
    for name, values in first.items():
        # Event times, counts and statuses are equal; Flink may sum doubles in another order
        # and the server overwrites on an equal event time, so sums agree to the last bits.
        np.testing.assert_allclose(second[name], values, rtol=1e-12, err_msg=name)
    replay = again.sinks["card_txn_5m"]
    assert replay.rows == sink.rows and replay.rejected == 0
    assert replay.stale >= sink.rows - len(keys)
    assert count_by_reason(tmp_path / "dead2.jsonl") == {"malformed": bad}
