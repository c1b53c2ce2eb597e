"""Registry definitions <-> protobuf: the output-only TTL history."""

from __future__ import annotations

from clients.registry_messages import view_from_proto, view_to_proto
from featurestore.dtypes import DType
from featurestore.registry import Feature, FeatureView

DEFINITION = FeatureView("stats", "user", (Feature("a", DType.FLOAT32),), ttl_seconds=60)


def test_a_stored_view_carries_its_ttl_history_both_ways() -> None:
    stored = FeatureView(
        "stats",
        "user",
        DEFINITION.features,
        version=1,
        ttl_seconds=30,
        created_us=10,
        updated_us=20,
        ttl_history=((10, 60), (20, 30)),
    )
    msg = view_to_proto(stored)
    assert [(c.since_us, c.ttl_seconds) for c in msg.ttl_history] == [(10, 60), (20, 30)]
    assert view_from_proto(msg).ttl_changes() == ((10, 60), (20, 30))


def test_a_view_stored_before_the_history_was_kept_shows_one_entry() -> None:
    """Its current TTL since created_us; a definition not yet applied has no history to send."""
    legacy = FeatureView("stats", "user", DEFINITION.features, 1, 60, created_us=10)
    msg = view_to_proto(legacy)
    assert [(c.since_us, c.ttl_seconds) for c in msg.ttl_history] == [(10, 60)]
    assert view_from_proto(msg).ttl_changes() == ((10, 60),)
    assert len(view_to_proto(DEFINITION).ttl_history) == 0
