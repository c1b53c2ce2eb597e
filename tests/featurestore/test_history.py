"""History log: written with every accepted write, rebuilds the online store, answers
point-in-time queries (checked against a brute-force scan)."""

import dataclasses
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

import lmdb
import numpy as np
import pytest

from clients.channel import ClientConfig
from clients.feature_client import FeatureStoreClient
from featurestore import registry
from featurestore.dtypes import DType, FeatureStatus
from featurestore.errors import InvalidArgumentError
from featurestore.history import (
    history_rows,
    point_in_time,
    rebuild_online,
    unpack_batch,
)
from featurestore.online_store import OnlineStore, StoreConfig, WriteBatch
from featurestore.registry import (
    Entity,
    Feature,
    FeatureView,
    JoinKey,
    history_db_name,
    view_db_name,
)

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
    store.replace_online_rows("spend", 1, lambda records: [])
    emptied = store.read("spend", {"user_id": np.array(["a"], dtype=object)}, now_us=NOW)
    assert emptied.row_status.tolist() == [FeatureStatus.NOT_FOUND]
    assert rebuild_online(store, "spend", 1) == 3
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


def test_rebuild_online_keeps_writes_committed_while_it_runs(tmp_path: Path):
    """rebuild_online read the log, then emptied and refilled the online rows in a later
    transaction: rows another thread committed in between vanished online (acknowledged, and
    kept in the history only)."""
    with OnlineStore(StoreConfig(tmp_path / "db", sync=False)) as s:
        s.registry.apply([USER], [VIEW])
        old = [f"old{i}" for i in range(20_000)]
        s.write(batch(old, np.full(len(old), NOW), np.arange(len(old))), now_us=NOW)
        acked: list[str] = []
        stop = threading.Event()

        def writer() -> None:
            while not stop.is_set():
                s.write(batch([f"new{len(acked)}"], [NOW], [len(acked)]), now_us=NOW)
                acked.append(f"new{len(acked)}")

        thread = threading.Thread(target=writer)
        thread.start()
        try:
            while len(acked) < 10:
                time.sleep(0.001)
            for _ in range(5):
                rebuild_online(s, "spend")
        finally:
            stop.set()
            thread.join()
        got = s.read("spend", {"user_id": np.array(old + acked, dtype=object)}, now_us=NOW)
        statuses = zip(old + acked, got.row_status.tolist(), strict=True)
        assert [key for key, status in statuses if status != FeatureStatus.PRESENT] == []
        expected = list(range(len(old))) + list(range(len(acked)))
        assert got.blocks[0].values[:, 0].tolist() == expected


def test_replayed_rows_are_logged_once_and_late_rows_still_are(store):
    """Re-running an ingest (each row stale with an equal event time) changes nothing online,
    yet appended every row to the history again: 3 runs logged 3x the rows."""
    for _ in range(3):
        store.write(batch(["a", "b", "c"], [NOW, NOW - SEC, NOW], [1, 2, 3]), now_us=NOW)
    assert len(store.history_records("spend", 1).blobs) == 1
    # a late row for a (logged), a replay of b, and d twice at one event time (the first wins)
    mixed = batch(["a", "b", "d", "d"], [NOW - 5 * SEC, NOW - SEC, NOW, NOW], [4, 5, 6, 7])
    result = store.write(mixed, now_us=NOW)
    assert (result.written, result.stale) == (1, 3)
    keys, events, blocks = history_rows(store, "spend")
    assert keys["user_id"].tolist() == ["a", "b", "c", "a", "d"]
    assert events.tolist() == [NOW, NOW - SEC, NOW, NOW - 5 * SEC, NOW]
    assert blocks[0].values[:, 0].tolist() == [1, 2, 3, 4, 6]


def test_history_logs_every_accepted_row_but_replays_in_any_commit(store):
    """Random commits of several batches with repeated keys and event times: the log holds, in
    write order, each row but those stale with the event time they lost to (a plain-Python
    last-write-wins over arrival order)."""
    rng = np.random.default_rng(5)
    current: dict[str, int] = {}
    expected = []
    for _ in range(20):
        batches = []
        for _ in range(int(rng.integers(1, 4))):
            ids = [f"u{i}" for i in rng.integers(0, 6, 8)]
            events = NOW - rng.integers(0, 5, 8) * SEC
            amounts = rng.integers(0, 1000, 8).astype(float)
            batches.append(store.prepare(batch(ids, events, amounts), now_us=NOW))
            for key, event, amount in zip(ids, events.tolist(), amounts.tolist(), strict=True):
                if event != current.get(key):
                    expected.append((key, event, amount))
                current[key] = max(event, current.get(key, event))
        store.write_prepared(batches)
    keys, events, blocks = history_rows(store, "spend")
    amounts = blocks[0].values[:, 0].tolist()
    assert list(zip(keys["user_id"].tolist(), events.tolist(), amounts, strict=True)) == expected


def served(result) -> list[tuple]:
    """(amount, its status, event time, row status) per row of a read or point_in_time."""
    values, statuses = result.blocks[0].values[:, 0], result.blocks[0].statuses[:, 0]
    return list(
        zip(
            values.tolist(),
            statuses.tolist(),
            result.event_us.tolist(),
            result.row_status.tolist(),
            strict=True,
        )
    )


def test_point_in_time_as_served_answers_what_the_online_read_answered(store):
    """By event time, a future-dated row (accepted within max_clock_skew_seconds) was served
    PRESENT online but NOT_FOUND at the same instant, and a row that arrived after the label
    (or late, refused stale) was used where serving answered another value. as_served replays
    serving: random writes (future-dated, late, replays, expired by the TTL), each followed by
    reads at two instants before the next write, then point_in_time at those instants."""
    rng = np.random.default_rng(11)
    ids = np.array(["a", "b", "c", "d", "e"], dtype=object)
    labels, answers = [], []
    wall = NOW
    for step in range(60):
        key = ids[rng.integers(0, len(ids), 2)]
        events = wall + rng.integers(-200, 250, 2) * SEC
        if step % 7 == 3:  # a replay of a key's stored event time, with another value
            stored = store.read("spend", {"user_id": key[:1]}, now_us=wall).event_us[0]
            events[0] = stored or events[0]
        store.write(batch(key, events, rng.integers(0, 1000, 2).astype(float)), now_us=wall)
        gap = int(rng.integers(1, 150)) * SEC
        for label in (wall, wall + gap - 1):
            labels.append(np.full(len(ids), label))
            answers.extend(served(store.read("spend", {"user_id": ids}, now_us=label)))
        wall += gap
    query = {"user_id": np.tile(ids, len(labels))}
    label_times = np.concatenate(labels)
    as_served = point_in_time(store, "spend", query, label_times, ["amount"], as_served=True)
    assert served(as_served) == answers
    assert {a[3] for a in answers} == {1, 2, 4}  # PRESENT, NOT_FOUND, OUTSIDE_MAX_AGE
    times = label_times.tolist()
    assert any(a[3] == 1 and a[2] > t for a, t in zip(answers, times, strict=True))  # future
    by_event = served(point_in_time(store, "spend", query, label_times, ["amount"]))
    assert all(e[3] != 1 or e[2] <= t for e, t in zip(by_event, times, strict=True))
    assert by_event != answers


def test_point_in_time_refuses_a_string_for_features(store):
    """features="amount" was taken as list("amount"): the features a, m, o, ..."""
    keys = {"user_id": np.array(["a"], dtype=object)}
    with pytest.raises(InvalidArgumentError, match=r"features: got the string 'amount'; give a"):
        point_in_time(store, "spend", keys, np.array([NOW]), "amount")


ACCOUNT = Entity("account", (JoinKey("account_id", DType.INT64),))
LIMITS = FeatureView("limits", "account", (Feature("limit", DType.FLOAT64),))


@pytest.mark.parametrize(
    ("view", "keys", "message"),
    [
        (
            "spend",
            {"user_id": np.array(["a", None], dtype=object)},
            r"join key 'user_id' row 1: expected str or bytes, got NoneType",
        ),
        (
            "spend",
            {"user_id": np.array(["a", "b", "\ud800"], dtype=object)},
            r"join key 'user_id' row 2: string is not valid Unicode \(lone surrogate\)",
        ),
        (
            "limits",
            {"account_id": np.array([1, 2**64 - 1], np.uint64)},
            r"join key 'account_id' row 1: value exceeds the int64 range",
        ),
    ],
)
def test_point_in_time_refuses_a_bad_join_key_naming_its_column_and_row(store, view, keys, message):
    """A key encode_keys marks invalid silently answered NOT_FOUND."""
    store.registry.apply([ACCOUNT], [LIMITS])
    with pytest.raises(InvalidArgumentError, match=message):
        point_in_time(store, view, keys, np.full(len(next(iter(keys.values()))), NOW))


def test_point_in_time_as_served_equals_get_online_features_of_a_real_server(server):
    """Through a real server: GetOnlineFeatures answers recorded with their wall times are what
    point_in_time(as_served=True) answers at those times, for a future-dated row, a late row
    refused stale, an equal-time replay, a row written after a read, a row past its TTL."""
    now = time.time_ns() // 1000
    views = [dataclasses.replace(VIEW, ttl_seconds=3600)]
    ids = np.array(["a", "b", "c", "d"], dtype=object)
    reads = []
    with FeatureStoreClient(ClientConfig(target=server.target, timeout_s=20)) as client:
        client.apply([USER], views)

        def write(keys: list[str], events: list[int], amounts: list[float]) -> None:
            cols = {"amount": np.array(amounts), "note": [f"n{a}" for a in amounts]}
            client.write_features("spend", {"user_id": np.array(keys, dtype=object)}, events, cols)

        def read() -> None:
            got = client.get_online_features(["spend:amount", "spend:note"], {"user_id": ids})
            event_us = got.event_timestamps["spend"].astype("datetime64[us]").astype(np.int64)
            reads.append((time.time_ns() // 1000, got, event_us.tolist()))

        write(["a", "c"], [now - 2 * SEC, now - 7200 * SEC], [1, 2])  # c: past the TTL
        read()
        write(["a", "b", "d"], [now - 3 * SEC, now + 60 * SEC, now - SEC], [3, 4, 5])
        read()  # a late (stale), b future-dated, d written after the first read
        write(["a", "a"], [now - 2 * SEC, now - SEC], [6, 7])  # a replay, then newer
        read()
    assert server.terminate() == 0
    with OnlineStore(StoreConfig(server.data_dir)) as store:
        for label, got, event_us in reads:
            labels = np.full(len(ids), label)
            past = point_in_time(store, "spend", {"user_id": ids}, labels, as_served=True)
            amount, note = past.blocks[0], past.blocks[1]
            assert amount.values[:, 0].tolist() == got["spend:amount"].tolist()
            assert amount.statuses[:, 0].tolist() == got.statuses["spend:amount"].tolist()
            assert note.values[:, 0].tolist() == list(got["spend:note"])
            assert note.statuses[:, 0].tolist() == got.statuses["spend:note"].tolist()
            assert past.event_us.tolist() == event_us
        by_event = point_in_time(store, "spend", {"user_id": ids}, labels)
        assert by_event.row_status.tolist() == [1, 2, 4, 1]  # b's future row: NOT_FOUND
        assert [s.tolist() for s in reads[1][1].statuses.values()] == [[1, 1, 4, 1]] * 2


def test_as_served_applies_the_ttl_in_force_at_each_label_of_a_real_server(server):
    """The TTL changed twice in place (3600 s, then 50 s, then 500 s) while the view was written:
    as_served withheld every past label's rows by the TTL of today, so it answered PRESENT where
    GetOnlineFeatures had answered OUTSIDE_MAX_AGE and the reverse. Answers recorded live with
    their wall times, before and after each change, are what as_served answers at those times."""
    now = time.time_ns() // 1000
    ids = np.array(["a", "b", "c", "d"], dtype=object)
    reads = []
    with FeatureStoreClient(ClientConfig(target=server.target, timeout_s=20)) as client:

        def apply(ttl_seconds: int) -> str:
            view = dataclasses.replace(VIEW, ttl_seconds=ttl_seconds)
            return client.apply([USER], [view])[0].action

        def write(keys: list[str], events: list[int], amounts: list[float]) -> None:
            cols = {"amount": np.array(amounts), "note": [f"n{a}" for a in amounts]}
            client.write_features("spend", {"user_id": np.array(keys, dtype=object)}, events, cols)

        def read() -> None:
            got = client.get_online_features(["spend:amount"], {"user_id": ids})
            reads.append((time.time_ns() // 1000, got.statuses["spend:amount"].tolist()))

        assert apply(3600) == "created"
        write(["a", "b", "c"], [now - 10 * SEC, now - 100 * SEC, now - 1000 * SEC], [1, 2, 3])
        read()
        assert apply(50) == "updated"
        read()
        write(["a", "d"], [now - 5 * SEC, now - 200 * SEC], [4, 5])
        read()
        assert apply(500) == "updated"
        read()
        assert apply(500) == "unchanged"
        read()
    assert server.terminate() == 0
    present, missing, outside = 1, 2, 4
    assert [statuses for _, statuses in reads] == [
        [present, present, present, missing],
        [present, outside, outside, missing],
        [present, outside, outside, outside],
        [present, present, outside, present],
        [present, present, outside, present],
    ]
    with OnlineStore(StoreConfig(server.data_dir)) as store:
        labels = np.repeat([label for label, _ in reads], len(ids))
        query = {"user_id": np.tile(ids, len(reads))}
        past = point_in_time(store, "spend", query, labels, ["amount"], as_served=True)
        assert past.blocks[0].statuses[:, 0].tolist() == [s for _, st in reads for s in st]
        by_event = point_in_time(store, "spend", {"user_id": ids}, labels[:4], ["amount"])
        assert by_event.row_status.tolist() == [present, present, outside, present]  # TTL today
        assert [ttl for _, ttl in store.registry.get_view("spend").ttl_changes()] == [3600, 50, 500]


def test_as_served_takes_the_new_ttl_from_the_microsecond_it_came_into_force(store, monkeypatch):
    """A label at a change's time takes the new TTL, one a microsecond before it the old one.
    By event time every label takes today's TTL (as Feast)."""
    view = store.registry.get_view("spend")
    store.write(batch(["a"], [NOW - 150 * SEC], [1]), now_us=NOW - 150 * SEC)
    first, second = NOW + 10 * SEC, NOW + 20 * SEC
    for since, ttl in ((first, 200), (second, 50)):
        monkeypatch.setattr(registry.time, "time_ns", lambda since=since: since * 1000)
        store.registry.apply([], [dataclasses.replace(VIEW, ttl_seconds=ttl)])
    monkeypatch.undo()
    labels = np.array([first - 1, first, second - 1, second])
    keys = {"user_id": np.full(len(labels), "a", dtype=object)}
    outside, present = FeatureStatus.OUTSIDE_MAX_AGE, FeatureStatus.PRESENT
    past = point_in_time(store, "spend", keys, labels, as_served=True)
    assert past.row_status.tolist() == [outside, present, present, outside]
    assert point_in_time(store, "spend", keys, labels).row_status.tolist() == [outside] * 4
    changes = store.registry.get_view("spend").ttl_changes()
    assert changes == ((view.created_us, 100), (first, 200), (second, 50))


def test_rebuild_online_holds_the_write_lock_only_for_the_log_tail(tmp_path: Path):
    """rebuild_online read and decoded the whole log inside the store's one write transaction:
    with millions of logged rows every view's writes waited seconds (clients' deadlines
    expired). Now a write waits at most for the records logged during the rebuild."""
    rows, per_batch = 1_500_000, 100_000
    with OnlineStore(StoreConfig(tmp_path / "db", sync=False)) as s:
        s.registry.apply([USER, ACCOUNT], [VIEW, LIMITS])
        for start in range(0, rows, per_batch):
            keys = {"account_id": np.arange(per_batch) % 1000}
            events = NOW + start + np.arange(per_batch)
            s.write(WriteBatch("limits", keys, events, {"limit": np.ones(per_batch)}), now_us=NOW)
        waits: list[float] = []
        stop = threading.Event()

        def writer() -> None:
            while not stop.is_set():
                began = time.perf_counter()
                s.write(batch([f"w{len(waits)}"], [NOW], [1.0]), now_us=NOW)
                waits.append(time.perf_counter() - began)
                time.sleep(0.005)

        thread = threading.Thread(target=writer)
        thread.start()
        try:
            while not waits:
                time.sleep(0.001)
            began = time.perf_counter()
            assert rebuild_online(s, "limits") == rows
            took = time.perf_counter() - began
            time.sleep(0.05)
        finally:
            stop.set()
            thread.join()
        assert took >= 1.0, f"the log must take >= 1 s to rebuild for this test, took {took:.2f}"
        assert max(waits) < took / 2, (max(waits), took)
        got = s.read("limits", {"account_id": np.array([0, 999])}, now_us=NOW)
        assert got.event_us.tolist() == [NOW + rows - 1000, NOW + rows - 1]


def newest_rows(records: list[bytes]) -> list[tuple[bytes, bytes]]:
    """Plain-Python reduction of history records: each key's newest row by event time (row
    bytes 8:16), the earliest logged among equal ones."""

    def event(row: bytes) -> int:
        return int.from_bytes(row[8:16], "little", signed=True)

    newest: dict[bytes, bytes] = {}
    for record in records:
        for key, row in zip(*unpack_batch(record), strict=True):
            if key not in newest or event(row) > event(newest[key]):
                newest[key] = row
    return sorted(newest.items())


def test_replace_online_rows_merges_the_rows_logged_while_it_reduced(store):
    """The log is reduced outside the write transaction; rows committed meanwhile (here by
    another thread while the reduction runs) are merged in by event time: a newer row wins, a
    late one loses, a new key is added."""
    store.write(batch(["a", "b", "d"], [NOW, NOW, NOW], [1, 2, 3]), now_us=NOW)
    meanwhile = batch(["a", "b", "c"], [NOW + SEC, NOW - 5 * SEC, NOW], [4, 5, 6])
    committed = []

    def reduce(records: list[bytes]) -> list[tuple[bytes, bytes]]:
        if not committed:  # the first reduction: the write must not wait for it
            thread = threading.Thread(target=store.write, args=(meanwhile,), kwargs={"now_us": NOW})
            thread.start()
            thread.join(10)
            committed.append(not thread.is_alive())
        return newest_rows(records)

    store.replace_online_rows("spend", 1, reduce)
    assert committed == [True]
    keys = {"user_id": np.array(["a", "b", "c", "d"], dtype=object)}
    got = store.read("spend", keys, now_us=NOW)
    assert got.blocks[0].values[:, 0].tolist() == [4, 2, 6, 3]
    assert got.event_us.tolist() == [NOW + SEC, NOW, NOW, NOW]


def test_as_served_leaves_out_a_late_row_stamped_before_a_newer_one_that_committed_first(store):
    """Write times are stamped at prepare, before the commit: a late batch stamped at T and
    committed after a newer row stamped at T + 0.1 s was refused online, yet as_served picked
    it for labels between the two stamps (online answered 30 then 50, as_served gave 40)."""
    t = NOW + 1000 * SEC
    keys = {"user_id": np.array(["u"], dtype=object)}
    store.write(batch(["u"], [t - 50 * SEC], [30]), now_us=t - 40 * SEC)
    late = store.prepare(batch(["u"], [t - 30 * SEC], [40]), now_us=t)
    newer = store.prepare(batch(["u"], [t - 10 * SEC], [50]), now_us=t + 100_000)
    answers = []
    for label, prepared in ((t + 50_000, newer), (t + 150_000, late)):
        store.write_prepared([prepared])
        answers.append(store.read("spend", keys, now_us=label).blocks[0].values[0, 0])
    assert answers == [50, 50]  # the late row was stale online
    labels = np.array([t - 1, t, t + 50_000, t + 99_999, t + 100_000, t + 200_000])
    query = {"user_id": np.full(len(labels), "u", dtype=object)}
    past = point_in_time(store, "spend", query, labels, ["amount"], as_served=True)
    assert past.blocks[0].values[:, 0].tolist() == [30, 30, 30, 30, 50, 50]


def test_as_served_with_commits_out_of_stamp_order_matches_a_plain_python_replay(store):
    """Batches prepared (stamped) in one order and committed in another, as workers do: per
    label, the newest event among the rows applied in commit order and stamped by then."""
    rng = np.random.default_rng(3)
    ids = ["a", "b", "c"]
    prepared, rows = [], []
    for _ in range(40):
        key, stamp = ids[int(rng.integers(0, 3))], NOW + int(rng.integers(0, 100)) * SEC
        event, amount = stamp - int(rng.integers(0, 60)) * SEC, float(rng.integers(0, 1000))
        prepared.append(store.prepare(batch([key], [event], [amount]), now_us=stamp))
        rows.append((key, event, stamp, amount))
    stored: dict[str, int] = {}
    applied = []
    for i in rng.permutation(len(rows)).tolist():
        store.write_prepared([prepared[i]])
        key, event, _, _ = rows[i]
        if event > stored.get(key, -1):
            stored[key] = event
            applied.append(rows[i])
    labels = NOW + rng.integers(-5, 250, 300) * SEC
    keys = [ids[int(k)] for k in rng.integers(0, 3, 300)]
    query = {"user_id": np.array(keys, dtype=object)}
    past = point_in_time(store, "spend", query, labels, ["amount"], as_served=True)
    assert {int(s) for s in past.row_status} == {1, 2, 4}
    for i, (key, label) in enumerate(zip(keys, labels.tolist(), strict=True)):
        seen = [r for r in applied if r[0] == key and r[2] <= label]
        want = max(seen, key=lambda r: r[1]) if seen else None
        if want is None:
            assert (past.event_us[i], past.row_status[i]) == (0, FeatureStatus.NOT_FOUND)
            continue
        assert past.event_us[i] == want[1]
        if want[1] < label - VIEW.ttl_seconds * SEC:
            assert past.row_status[i] == FeatureStatus.OUTSIDE_MAX_AGE
        else:
            assert past.row_status[i] == FeatureStatus.PRESENT
            assert past.blocks[0].values[i, 0] == want[3]


def stored_rows(s: OnlineStore) -> dict[bytes, bytes]:
    """The raw online rows of spend v1, read through LMDB."""
    db = s._lmdb.existing_db(view_db_name("spend", 1))
    with s._lmdb.read_txn() as txn:
        return dict(txn.cursor(db=db))


def tamper(s: OnlineStore, change: Callable[[lmdb.Transaction, lmdb._Database], None]) -> None:
    """Change spend v1's online rows behind the store's back (not logged), through LMDB."""
    s._lmdb.run_write(lambda txn: change(txn, s._lmdb.view_db("spend", 1, txn)))


def with_event(row: bytes, event_us: int) -> bytes:
    """row with its event time (bytes 8:16) set to event_us."""
    return row[:8] + event_us.to_bytes(8, "little", signed=True) + row[16:]


def test_rebuild_online_writes_only_the_rows_that_differ(tmp_path: Path):
    """rebuild_online emptied the view and wrote every row again in one write transaction, even
    when the online rows already equalled the log (all writers waited ~0.2 s per 200k keys).
    Now a healthy view commits nothing, and a damaged one only its difference, in transactions
    of at most max_rows_per_txn rows."""
    ids = [f"u{i}" for i in range(2000)]
    with OnlineStore(StoreConfig(tmp_path / "db", sync=False)) as s:
        s.registry.apply([USER], [VIEW])
        s.write(batch(ids, np.full(len(ids), NOW - SEC), np.arange(len(ids))), now_us=NOW)
        s.write(batch(ids[::2], np.full(1000, NOW), np.arange(1000) + 5000), now_us=NOW)
        s.write(batch(ids[::3], np.full(667, NOW - 2 * SEC), np.zeros(667)), now_us=NOW)  # late
        healthy = stored_rows(s)
        txnid = s._lmdb.env.info()["last_txnid"]
        assert rebuild_online(s, "spend") == 2000 + 1000 + 667
        assert s._lmdb.env.info()["last_txnid"] == txnid  # nothing committed
        assert stored_rows(s) == healthy

        def damage(txn: lmdb.Transaction, db: lmdb._Database) -> None:
            for key in list(healthy)[:150]:
                txn.delete(key, db=db)
            for key in list(healthy)[150:200]:
                txn.put(key, with_event(healthy[key], NOW + 10**6 * SEC), db=db)
            for i in range(50):
                txn.put(f"stray{i}".encode(), healthy[next(iter(healthy))], db=db)

        tamper(s, damage)
        txnid = s._lmdb.env.info()["last_txnid"]
        rebuild_online(s, "spend", max_rows_per_txn=100)
        assert s._lmdb.env.info()["last_txnid"] == txnid + 3  # 250 rows differed
        assert stored_rows(s) == healthy


def test_rebuild_online_in_many_transactions_keeps_every_write_made_meanwhile(tmp_path: Path):
    """A rebuild whose difference spans many write transactions, while a writer writes the
    same keys (repaired ones and untouched ones, newer, late and equal event times): afterwards
    the online rows are exactly a full replay of the log, and each key holds its newest
    acknowledged row (the earliest among equal event times)."""
    ids = [f"u{i}" for i in range(3000)]
    expected: dict[str, tuple[int, float]] = {}
    with OnlineStore(StoreConfig(tmp_path / "db", sync=False)) as s:
        s.registry.apply([USER], [VIEW])

        def write(keys: list[str], events: list[int], amounts: list[float]) -> None:
            s.write(batch(keys, events, amounts), now_us=NOW)
            for key, event, amount in zip(keys, events, amounts, strict=True):
                if key not in expected or event > expected[key][0]:
                    expected[key] = (event, amount)

        write(ids, [NOW - 100 * SEC] * len(ids), [float(i) for i in range(len(ids))])
        write(ids, [NOW - 50 * SEC] * len(ids), [float(i + 10_000) for i in range(len(ids))])
        first = dict(zip(*unpack_batch(s.history_records("spend", 1).blobs[0]), strict=True))
        stop = threading.Event()
        errors: list[BaseException] = []
        rng = np.random.default_rng(5)

        def writer() -> None:
            try:
                n = 0
                while not stop.is_set():
                    n += 1
                    keys = [ids[i] for i in rng.choice(len(ids), 5, replace=False)]
                    events = [NOW + int(e) * SEC for e in rng.integers(-120, 60, 5)]
                    write(keys, events, [float(20_000 + n)] * 5)
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=writer)
        thread.start()
        try:
            for round_ in range(3):

                def damage(txn: lmdb.Transaction, db: lmdb._Database, round_: int = round_) -> None:
                    if round_ == 0:
                        txn.drop(db, delete=False)  # emptied
                        return
                    stored = dict(txn.cursor(db=db))
                    for key in list(stored)[:1000]:
                        txn.delete(key, db=db)
                    for key in list(stored)[1000:1500]:  # far newer than any write
                        txn.put(key, with_event(stored[key], NOW + 10**6 * SEC), db=db)
                    for key in list(stored)[1500:2000]:  # the key's first, older, row
                        txn.put(key, first[key], db=db)
                    for i in range(300):
                        txn.put(f"stray{i}".encode(), first[next(iter(first))], db=db)

                for _ in range(20):  # until the writer thread got a write in during one
                    tamper(s, damage)
                    logged = len(s.history_records("spend", 1).blobs)
                    rebuild_online(s, "spend", max_rows_per_txn=100)
                    if len(s.history_records("spend", 1).blobs) > logged:
                        break
                else:
                    pytest.fail("no write landed during any of 20 rebuilds")
        finally:
            stop.set()
            thread.join()
        assert errors == []
        assert stored_rows(s) == dict(newest_rows(s.history_records("spend", 1).blobs))
        got = s.read("spend", {"user_id": np.array(ids, dtype=object)}, now_us=NOW)
        assert got.event_us.tolist() == [expected[k][0] for k in ids]
        assert got.blocks[0].values[:, 0].tolist() == [expected[k][1] for k in ids]


@pytest.mark.parametrize(
    ("rows", "message"),
    [(0, "got 0; give at least 1"), (2.5, "got 2.5; give a whole"), (True, "got True; give a")],
)
def test_rebuild_online_needs_a_whole_number_of_rows_per_transaction(store, rows, message):
    """A rebuild of 0 rows per transaction could never finish; 2.5 failed with a bare TypeError
    after the whole difference was computed, and True ran as 1 row per transaction."""
    with pytest.raises(InvalidArgumentError, match=f"max_rows_per_txn: {message}"):
        rebuild_online(store, "spend", max_rows_per_txn=rows)


def test_rebuilding_a_view_never_written_commits_nothing(store):
    """It committed a transaction that created the view's history database."""
    txnid = store._lmdb.env.info()["last_txnid"]
    assert rebuild_online(store, "spend") == 0
    assert store._lmdb.env.info()["last_txnid"] == txnid
    assert store._lmdb.existing_db(history_db_name("spend", 1)) is None


def test_as_served_without_a_version_replays_the_version_lookups_read_at_each_label(store):
    """Lookups without a version read the latest version of their moment: a label from before
    v2 was created is answered from v1's log, a later one from v2's."""
    now = time.time_ns() // 1000
    store.write(batch(["a", "b"], [now - 10 * SEC, now - 10 * SEC], [1, 2]))
    before_v2 = time.time_ns() // 1000
    time.sleep(0.002)
    store.registry.apply([], [dataclasses.replace(VIEW, version=2)])
    store.write(batch(["a"], [now - 5 * SEC], [3]))
    after = time.time_ns() // 1000
    keys = {"user_id": np.array(["a", "b", "a", "b", "a"], dtype=object)}
    labels = [before_v2, before_v2, after, after, now - 3600 * SEC]
    got = point_in_time(store, "spend", keys, labels, ["amount"], as_served=True)
    assert got.blocks[0].values[:4, 0].tolist() == [1.0, 2.0, 3.0, 0.0]
    # b was never written to v2; the last label is before any version: NOT_FOUND
    assert got.row_status.tolist() == [1, 1, 1, 2, 2]
    v2 = point_in_time(store, "spend", keys, labels, ["amount"], as_served=True, version=2)
    assert v2.row_status.tolist() == [2, 2, 1, 2, 2]


@pytest.mark.parametrize(
    ("v2", "features", "message"),
    [
        (
            FeatureView("spend", "user", (Feature("amount", DType.FLOAT32),), version=2),
            ["amount"],
            "'amount' is missing from view 'spend' v1, which lookups read at label row 0, or "
            "has another type than in v2",
        ),
        (
            FeatureView("spend", "card", (Feature("amount", DType.FLOAT64),), version=2),
            ["amount"],
            "v1, which lookups read at label row 0, is keyed by entity 'user', not 'card'",
        ),
        (
            FeatureView("spend", "user", (Feature("amount", DType.FLOAT64),), version=2),
            ["note"],
            "'note' is not in view 'spend' v2, the latest version, which types each column; "
            "pass version=N (a 'view@N:feature' reference)",
        ),
    ],
)
def test_as_served_without_a_version_refuses_versions_that_cannot_share_a_column(
    store, v2, features, message
):
    card = Entity("card", (JoinKey("user_id", DType.STRING),))
    label = time.time_ns() // 1000
    time.sleep(0.002)
    store.registry.apply([card], [v2])
    keys = {"user_id": np.array(["a", "b"], dtype=object)}
    with pytest.raises(InvalidArgumentError, match=re.escape(message)):
        point_in_time(
            store, "spend", keys, [label, time.time_ns() // 1000], features, as_served=True
        )
