"""FeatureSink against a real server: batches land, replays are stale, an absent server fails,
a message over the server's row limit is split, and a token reaches a server with auth."""

from __future__ import annotations

import numpy as np
import pytest

from clients.channel import ClientConfig
from clients.feature_client import FeatureStoreClient
from featurestore.dtypes import DType
from featurestore.errors import InvalidArgumentError, UnavailableError
from featurestore.registry import Entity, Feature, FeatureView, JoinKey
from pipelines.dead_letter import DeadLetterWriter, count_by_reason, read_dead_letters
from pipelines.sink import FeatureSink, SinkConfig, read_stats
from tests.conftest import free_port

T0 = 1_700_000_000_000_000
AUTH_TOML = (
    '[auth]\nenabled = true\n[[auth.tokens]]\nname = "pipe"\ntoken = "s3cret"\n'
    'scopes = ["admin", "read:*", "write:*"]\n'
)


def test_sink_writes_newest_and_replay_changes_nothing(server, tmp_path):
    view = FeatureView("sink_v", "card", (Feature("n", DType.INT64), Feature("x", DType.FLOAT64)))
    with FeatureStoreClient(server.target) as client:
        client.apply([Entity("card", (JoinKey("card_id", DType.INT64),))], [view])
    config = SinkConfig(server.target, "sink_v", "card_id", message_rows=7, stats_dir=tmp_path)
    sink = FeatureSink(config)
    keys = np.array([3, 1, 3, 2, 1], dtype=np.int64)
    times = T0 + np.array([20, 10, 10, 5, 30], dtype=np.int64)
    feats = {"n": np.arange(5, dtype=np.int64), "x": np.arange(5) * 1.5}
    sink.write(keys, times, feats)
    sink.write(keys[:2], times[:2] - 1, {k: v[:2] + 100 for k, v in feats.items()})
    sink.close()

    with FeatureStoreClient(server.target) as client:
        got = client.get_online_features(["sink_v"], {"card_id": np.array([1, 2, 3])})
    np.testing.assert_array_equal(got["sink_v:n"], [4, 3, 0])
    np.testing.assert_array_equal(got.event_timestamps["sink_v"], T0 + np.array([30, 5, 20]))
    stats = read_stats(tmp_path, "sink_v")
    assert stats.rows == 7 and stats.batches == 2
    assert stats.written == 5 and stats.stale == 2 and stats.rejected == 0


def register_view(config: str | ClientConfig) -> None:
    """One INT64 feature `n` in view sink_v, keyed by card_id."""
    view = FeatureView("sink_v", "card", (Feature("n", DType.INT64),))
    with FeatureStoreClient(config) as client:
        client.apply([Entity("card", (JoinKey("card_id", DType.INT64),))], [view])


def test_sink_halves_messages_over_the_servers_row_limit(server_factory, tmp_path):
    (tmp_path / "server.toml").write_text("max_rows_per_write = 5\n")
    server = server_factory("--config", str(tmp_path / "server.toml"))
    register_view(server.target)
    config = SinkConfig(server.target, "sink_v", "card_id", message_rows=16, retry_bound_s=1.0)
    sink = FeatureSink(config)
    keys = np.arange(40, dtype=np.int64)
    sink.write(keys, T0 + keys, {"n": keys * 10})
    sink.write(keys, T0 + keys + 1, {"n": keys * 20})
    sink.close()

    assert sink.message_rows == 4 and sink.counters.splits == 2 and sink.counters.retries == 0
    assert sink.counters.written == 80
    with FeatureStoreClient(server.target) as client:
        got = client.get_online_features(["sink_v"], {"card_id": keys})
    np.testing.assert_array_equal(got["sink_v:n"], keys * 20)


def test_sink_and_its_errors_reach_a_server_with_tokens(server_factory, tmp_path):
    (tmp_path / "server.toml").write_text(AUTH_TOML)
    server = server_factory("--config", str(tmp_path / "server.toml"))
    with_token = ClientConfig(target=server.target, token="s3cret")
    register_view(with_token)
    sink = FeatureSink(SinkConfig(with_token, "sink_v", "card_id"))
    sink.write(np.array([7]), np.array([T0]), {"n": np.array([70])})
    sink.close()
    with FeatureStoreClient(with_token) as client:
        got = client.get_online_features(["sink_v"], {"card_id": np.array([7])})
    np.testing.assert_array_equal(got["sink_v:n"], [70])

    sink = FeatureSink(SinkConfig(server.target, "sink_v", "card_id"))
    with pytest.raises(InvalidArgumentError, match="UNAUTHENTICATED") as info:
        sink.write(np.array([7]), np.array([T0 + 1]), {"n": np.array([71])})
    sink.close()
    assert "--token" in str(info.value) and "s3cret" not in str(info.value)


def test_sink_retries_with_backoff_then_fails_naming_the_target():
    target = f"127.0.0.1:{free_port()}"
    config = SinkConfig(target, "v", "card_id", retry_bound_s=0.6, initial_backoff_s=0.05)
    sink = FeatureSink(config)
    with pytest.raises(UnavailableError, match=target) as info:
        sink.write(np.array([1]), np.array([T0]), {"x": np.array([1.0])})
    assert "within 0.6 s" in str(info.value)
    assert 2 <= sink.counters.retries <= 8
    sink.close()


def test_dead_letters_are_appended_and_counted(tmp_path):
    path = tmp_path / "dl" / "dead.jsonl"
    first, second = DeadLetterWriter(path), DeadLetterWriter(path)
    first.write(["malformed: amount is missing"], {"amount": [None], "card_id": ["1"]})
    second.write(
        ["late: 5 s behind", "malformed: x"], {"amount": ["1", "2"], "card_id": ["a", "b"]}
    )
    entries = read_dead_letters(path)
    assert [e["event"]["card_id"] for e in entries] == ["1", "a", "b"]
    assert count_by_reason(path) == {"malformed": 2, "late": 1}
