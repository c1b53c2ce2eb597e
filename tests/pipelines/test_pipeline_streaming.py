"""The streaming job on a local Flink mini-cluster, writing into a real featureserve process."""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest

from clients.feature_client import FeatureStoreClient
from featurestore.errors import InvalidArgumentError
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


def prepare(
    tmp_path: Path, target: str, n: int = 20_000, entities: int = 300, span_s: float = 7200,
    jitter_ms: int = 1500, seed: int = 3,
):  # fmt: skip
    """Register the views and write the events in one file (a streaming job reads the files
    already in its folder in no set order, so history in several files is backfill's job)."""
    pipeline = parse_pipeline(tomllib.loads(EXAMPLE_PIPELINE)["pipeline"][0])
    definitions = tmp_path / "features.toml"
    definitions.write_text(EXAMPLE_PIPELINE)
    apply_views(target, [pipeline], "card")
    events = generate_events(n, entities, span_s=span_s, jitter_ms=jitter_ms, seed=seed)
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
    assert sum("amount is not a finite double" in r for r in reasons) == 2  # NaN and 1e400
    assert any("card_id is not a bigint" in r for r in reasons)  # 7.5, not truncated to 7
    assert any("event_time is not a bigint" in r for r in reasons)
    sink = report.sinks["card_txn_5m"]
    assert sink.written > len(keys) and sink.rejected == 0

    options.stats_dir = tmp_path / "stats2"  # same dead-letter file: counts are per run
    again = run_streaming(options)
    second = store_snapshot(server.target, pipeline, keys)
    for name, values in first.items():
        # Event times, counts and statuses are equal; Flink may sum doubles in another order
        # and the server overwrites on an equal event time, so sums agree to the last bits.
        np.testing.assert_allclose(second[name], values, rtol=1e-12, err_msg=name)
    replay = again.sinks["card_txn_5m"]
    assert replay.rows == sink.rows and replay.rejected == 0
    assert replay.stale >= sink.rows - len(keys)
    assert again.dead_letters == {"malformed": bad}
    assert count_by_reason(tmp_path / "dead.jsonl") == {"malformed": 2 * bad}


def test_non_utf8_input_names_the_file_and_line(server, tmp_path):
    _, definitions, _, source = prepare(tmp_path, server.target, n=50)
    good_then_bad = b"3,12.5,m001,food,48.1,2.3,1700000000000\n3,1,m\xff,f,1,2,3\n"
    (source / "bad.csv").write_bytes(good_then_bad)
    options = JobOptions(
        source=source, target=server.target, definitions=definitions, bounded=True,
        dead_letter=tmp_path / "dead.jsonl", stats_dir=tmp_path / "stats",
    )  # fmt: skip
    with pytest.raises(InvalidArgumentError, match=r"bad\.csv line 2 is not valid UTF-8"):
        run_streaming(options)


def test_late_events_are_dead_lettered_or_counted_never_both(server, tmp_path):
    pipeline, definitions, events, source = prepare(
        tmp_path, server.target, n=20_000, entities=10, span_s=900, jitter_ms=30_000, seed=7
    )
    options = JobOptions(
        source=source, target=server.target, definitions=definitions, bounded=True,
        dead_letter=tmp_path / "dead.jsonl", stats_dir=tmp_path / "stats",
    )  # fmt: skip
    run_streaming(options)
    # Which rows are late depends on when Flink emits watermarks; whichever they are, the
    # windows must hold exactly the rows that were not dead-lettered.
    late = {
        (int(e["event"]["card_id"]), int(e["event"]["event_time"]), float(e["event"]["amount"]))
        for e in read_dead_letters(tmp_path / "dead.jsonl")
        if e["reason"].startswith("late:")
    }
    rows = zip(
        events["card_id"].tolist(),
        events["event_time"].tolist(),
        events["amount"].tolist(),
        strict=True,
    )
    kept = np.array([r not in late for r in rows])
    kept_events = {c: v[kept] for c, v in events.items()}
    keys = np.unique(events["card_id"])
    assert_matches_reference(store_snapshot(server.target, pipeline, keys), kept_events, pipeline)
