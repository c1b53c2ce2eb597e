"""History log: written with every accepted write, rebuilds the online store, answers
point-in-time queries (checked against a brute-force scan)."""

from pathlib import Path

import numpy as np
import pytest

from featurestore.dtypes import DType, FeatureStatus
from featurestore.errors import InvalidArgumentError
from featurestore.history import history_rows, point_in_time, rebuild_online
from featurestore.online_store import OnlineStore, StoreConfig, WriteBatch
from featurestore.registry import Entity, Feature, FeatureView, JoinKey

NOW = 1_800_000_000_000_000
SEC = 1_000_000
USER = Entity("user", (JoinKey("user_id", DType.STRING),))
VIEW = FeatureView(
    "spend",
    "user",
    (Feature("amount", DType.FLOAT64), Feature("note", DType.STRING)),
    ttl_seconds=100,
)


def batch(ids, events, amounts, **kw) -> WriteBatch:
    return WriteBatch(
        "spend",
        {"user_id": np.array(ids, dtype=object)},
        np.asarray(events, np.int64),
        {
            "amount": np.asarray(amounts, np.float64),
            "note": np.array([f"n{a}" for a in amounts], dtype=object),
        },
        **kw,
    )


@pytest.fixture
def store(tmp_path: Path):
    with OnlineStore(StoreConfig(tmp_path / "db")) as s:
        s.registry.apply([USER], [VIEW])
        yield s


def test_history_keeps_every_valid_row_in_write_order(store):
    store.write(batch(["a", "b"], [NOW, NOW], [1, 2]), now_us=NOW)
    store.write(batch(["a"], [NOW - SEC], [3]), now_us=NOW)
    store.write(batch(["c", "d"], [NOW, -5], [4, 5], skip_bad_rows=True), now_us=NOW)
    keys, events, blocks = history_rows(store, "spend")
    assert keys["user_id"].tolist() == ["a", "b", "a", "c"]
    assert events.tolist() == [NOW, NOW, NOW - SEC, NOW]
    assert blocks[0].values[:, 0].tolist() == [1, 2, 3, 4]
    assert blocks[1].values[:, 0].tolist() == ["n1", "n2", "n3", "n4"]


def test_rebuild_online_restores_latest_values(store):
    store.write(batch(["a", "b"], [NOW, NOW], [1, 2]), now_us=NOW)
    store.write(batch(["a", "b"], [NOW - SEC, NOW], [3, 4]), now_us=NOW)
    before = store.read("spend", {"user_id": np.array(["a", "b"], dtype=object)}, now_us=NOW)
    store.replace_online_rows("spend", 1, [])
    emptied = store.read("spend", {"user_id": np.array(["a"], dtype=object)}, now_us=NOW)
    assert emptied.row_status.tolist() == [FeatureStatus.NOT_FOUND]
    assert rebuild_online(store, "spend", 1) == 4
    after = store.read("spend", {"user_id": np.array(["a", "b"], dtype=object)}, now_us=NOW)
    assert after.blocks[0].values[:, 0].tolist() == before.blocks[0].values[:, 0].tolist() == [1, 2]
    assert after.event_us.tolist() == before.event_us.tolist()


def brute_force(log, key, ts, ttl):
    best = None
    for i, (k, e, _) in enumerate(log):
        if k == key and e <= ts and (best is None or e > log[best][1]):
            best = i
    if best is None:
        return FeatureStatus.NOT_FOUND, 0.0
    if log[best][1] < ts - ttl * SEC:
        return FeatureStatus.OUTSIDE_MAX_AGE, 0.0
    return FeatureStatus.PRESENT, log[best][2]


def test_point_in_time_matches_brute_force(store):
    rng = np.random.default_rng(7)
    log = []
    for _ in range(6):
        ids = [f"u{i}" for i in rng.integers(0, 5, 30)]
        events = NOW - rng.integers(0, 4000, 30) * SEC
        amounts = rng.integers(0, 1000, 30).astype(float)
        store.write(batch(ids, events, amounts), now_us=NOW)
        log.extend(zip(ids, events.tolist(), amounts.tolist(), strict=True))
    query_ids = [f"u{i}" for i in rng.integers(0, 6, 300)]
    query_ts = NOW - rng.integers(-10, 4500, 300) * SEC
    result = point_in_time(
        store, "spend", {"user_id": np.array(query_ids, dtype=object)}, query_ts, ["amount"]
    )
    for i, (key, ts) in enumerate(zip(query_ids, query_ts.tolist(), strict=True)):
        status, value = brute_force(log, key, ts, VIEW.ttl_seconds)
        assert result.row_status[i] == status, (key, ts)
        assert result.blocks[0].values[i, 0] == value
    assert {int(s) for s in result.row_status} == {1, 2, 4}


def test_point_in_time_equal_event_times_first_write_wins(store):
    store.write(batch(["a"], [NOW], [1]), now_us=NOW)
    store.write(batch(["a"], [NOW], [2]), now_us=NOW)
    result = point_in_time(store, "spend", {"user_id": np.array(["a"], dtype=object)}, [NOW])
    assert result.blocks[0].values.tolist() == [[1.0]]
    assert result.blocks[1].values.tolist() == [["n1"]]


def test_a_ttl_beyond_the_microsecond_range_keeps_every_row(tmp_path: Path) -> None:
    """ttl_seconds = 2**62 is a valid TTL; its cutoff overflowed int64, failing every read of
    the view, online and point-in-time (OverflowError, INTERNAL over gRPC)."""
    long = FeatureView("long", "user", (Feature("amount", DType.FLOAT64),), ttl_seconds=2**62)
    with OnlineStore(StoreConfig(tmp_path / "db")) as s:
        s.registry.apply([USER], [long])
        keys = {"user_id": np.array(["a"], dtype=object)}
        batch = WriteBatch("long", keys, np.array([NOW - 5 * SEC]), {"amount": np.ones(1)})
        s.write(batch, now_us=NOW)
        online = s.read("long", keys, now_us=NOW)
        assert online.row_status.tolist() == [FeatureStatus.PRESENT]
        past = point_in_time(s, "long", keys, np.array([NOW]))
        assert past.row_status.tolist() == [FeatureStatus.PRESENT]


@pytest.mark.parametrize(
    ("timestamps", "message"),
    [
        (np.array([NOW]), r"timestamps: shape \[1\], expected \[2\]"),
        (np.array([NOW, NOW, NOW]), r"timestamps: shape \[3\], expected \[2\]"),
        (np.array([[NOW, NOW]]), r"timestamps: shape \[1, 2\], expected \[2\]"),
        (np.array([NOW + 0.7, NOW]), "timestamps: dtype float64; send int64"),
    ],
)
def test_point_in_time_needs_one_whole_label_time_per_key_row(store, timestamps, message):
    """Fewer timestamps than keys silently dropped key rows; more failed without naming the
    argument; fractions were truncated."""
    keys = {"user_id": np.array(["a", "b"], dtype=object)}
    with pytest.raises(InvalidArgumentError, match=message):
        point_in_time(store, "spend", keys, timestamps)
