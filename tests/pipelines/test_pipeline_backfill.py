"""Backfill (batch mode) then streaming leaves the same latest values as streaming alone (the
events here are never later than the watermark delay)."""

from __future__ import annotations

import tomllib

import numpy as np
import pytest

from clients.feature_client import FeatureStoreClient
from featurestore.errors import NotFoundError
from pipelines.backfill import run_backfill
from pipelines.checks import apply_views
from pipelines.config import parse_pipeline
from pipelines.events import (
    EXAMPLE_PIPELINE,
    generate_events,
    reference_latest,
    rows_ahead,
    splice_csv,
    write_events,
)
from pipelines.streaming import JobOptions, run_streaming

pytestmark = pytest.mark.flink
NO_TTL = EXAMPLE_PIPELINE.replace("[[pipeline.window]]\n", "[[pipeline.window]]\nttl_s = 0\n")
"""The example pipeline whose views keep every window: the events are from 2023, and under the
windows' TTL each would read as expired."""


def snapshot(target, pipeline, keys):
    with FeatureStoreClient(target) as client:
        out = {}
        for w in pipeline.windows:
            got = client.get_online_features([w.view], {pipeline.entity_column: keys})
            out[w.view] = got.event_timestamps[w.view]
            out.update({k: v for k, v in got.values.items()})
        return out


def test_backfill_then_streaming_equals_reference(server, tmp_path):
    pipeline = parse_pipeline(tomllib.loads(NO_TTL)["pipeline"][0])
    definitions = tmp_path / "features.toml"
    definitions.write_text(NO_TTL)
    events = generate_events(15_000, entities=200, span_s=5400, jitter_ms=1500, seed=5)
    history, recent = tmp_path / "history", tmp_path / "recent"
    paths = write_events(events, history, files=3)
    ahead_keys = [10_001, 10_002]
    splice_csv(paths[0], [], rows_ahead(ahead_keys, 240))  # windows ending after now: skipped
    write_events(events, recent, files=1)
    options = JobOptions(source=history, target=server.target, definitions=definitions)

    with pytest.raises(NotFoundError, match=r"card_txn_5m.*not registered"):
        run_backfill(options)
    apply_views(server.target, [pipeline], "card")
    report = run_backfill(options)
    keys = np.unique(events["card_id"])
    after_backfill = snapshot(server.target, pipeline, keys)
    for window in pipeline.windows:
        ref = reference_latest(events, pipeline, window)
        np.testing.assert_array_equal(after_backfill[window.view], ref.window_end_us)
        for agg in window.aggregates:
            got = after_backfill[f"{window.view}:{agg.name}"]
            np.testing.assert_array_equal(got, ref.features[agg.name], err_msg=agg.name)
    assert report.sinks["card_txn_1h"].rejected == 0
    assert report.incomplete_windows == {"card_txn_5m": 10, "card_txn_1h": 2}
    assert report.sinks["card_txn_5m"].written >= len(keys)

    options.source, options.bounded = recent, True
    run_streaming(options)
    after_stream = snapshot(server.target, pipeline, keys)
    for name, values in after_backfill.items():
        # Batch and streaming see each window's events in other orders: the sums are exact.
        np.testing.assert_array_equal(after_stream[name], values, err_msg=name)
