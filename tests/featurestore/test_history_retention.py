"""History retention: a compacted log answers every query at or after its horizon, and every
rebuild, exactly as the whole log did, beside writers, rebuilds and other compactions."""

import dataclasses
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from featurestore import history_retention
from featurestore.dtypes import DType
from featurestore.errors import ConflictError, InvalidArgumentError
from featurestore.history import history_rows, point_in_time, rebuild_online, unpack_batch
from featurestore.history_retention import Recreated, compact_history, compact_views
from featurestore.online_store import OnlineStore, StoreConfig, WriteBatch
from featurestore.registry import Entity, Feature, FeatureView, JoinKey, view_db_name

NOW = 1_800_000_000_000_000
SEC = 1_000_000
HORIZON = NOW + 50 * SEC
USER = Entity("user", (JoinKey("user_id", DType.STRING),))
VIEW = FeatureView("spend", "user", (Feature("amount", DType.FLOAT64),), ttl_seconds=30)
KEYS = ["a", "b", "c", "d"]


def batch(ids: list[str], events: list[int], amounts: list[float]) -> WriteBatch:
    return WriteBatch(
        "spend",
        {"user_id": np.array(ids, dtype=object)},
        np.asarray(events, np.int64),
        {"amount": np.asarray(amounts, np.float64)},
    )


@pytest.fixture
def store(tmp_path: Path):
    with OnlineStore(StoreConfig(tmp_path / "db")) as s:
        s.registry.apply([USER], [VIEW])
        yield s


def write_shuffled(store: OnlineStore, seed: int, batches: int = 80, shuffle: bool = True) -> None:
    """Batches stamped (write time) over 100 s and committed in another order (as workers do)
    or in stamp order, with late and future-dated rows, ties of event times and replays."""
    rng = np.random.default_rng(seed)
    prepared, stamps = [], []
    for _ in range(batches):
        n = int(rng.integers(1, 4))
        stamp = NOW + int(rng.integers(0, 100)) * SEC
        ids = [KEYS[int(k)] for k in rng.integers(0, len(KEYS), n)]
        events = (stamp + rng.integers(-60, 20, n) * SEC).tolist()
        amounts = rng.integers(0, 5, n).astype(float).tolist()
        prepared.append(store.prepare(batch(ids, events, amounts), now_us=stamp))
        stamps.append(stamp)
    order = rng.permutation(len(prepared)) if shuffle else np.argsort(stamps, kind="stable")
    order = order.tolist()
    for start in range(0, len(order), 3):
        store.write_prepared([prepared[i] for i in order[start : start + 3]])


def answers(store: OnlineStore, labels: np.ndarray) -> list[tuple]:
    """Both modes' answers for every key (and an unknown one) at every label."""
    keys = [k for k in [*KEYS, "zz"] for _ in labels]
    ts = np.tile(labels, len(KEYS) + 1)
    query = {"user_id": np.array(keys, dtype=object)}
    out = []
    for as_served in (False, True):
        got = point_in_time(store, "spend", query, ts, as_served=as_served)
        out.append((got.event_us.tolist(), got.row_status.tolist(), got.blocks[0].values.tolist()))
    return out


def online_rows(store: OnlineStore) -> list:
    got = store.read("spend", {"user_id": np.array(KEYS, dtype=object)}, now_us=NOW)
    return [got.event_us.tolist(), got.blocks[0].values.tolist()]


def logged_rows(store: OnlineStore) -> int:
    return len(history_rows(store, "spend")[1])


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("rows_per_txn", [1, 10_000])
def test_a_compacted_log_answers_every_label_at_or_after_its_horizon_as_before(
    store, seed, shuffle, rows_per_txn
):
    write_shuffled(store, seed, shuffle=shuffle)
    labels = HORIZON + np.arange(0, 120, 3) * SEC
    before, online, rows = answers(store, labels), online_rows(store), logged_rows(store)
    done = compact_history(store, "spend", horizon_us=HORIZON, max_rows_per_txn=rows_per_txn)
    assert done.rows_before == rows
    assert 0 < done.rows_dropped < rows
    assert logged_rows(store) == rows - done.rows_dropped
    assert answers(store, labels) == before
    assert rebuild_online(store, "spend") == rows - done.rows_dropped
    assert online_rows(store) == online


def test_a_label_before_the_horizon_is_refused_naming_its_row(store):
    write_shuffled(store, 4)
    compact_history(store, "spend", horizon_us=HORIZON)
    query = {"user_id": np.array(["a", "b", "c"], dtype=object)}
    with pytest.raises(InvalidArgumentError, match=r"timestamps: row 1 is .* horizon") as exc:
        point_in_time(store, "spend", query, [HORIZON, HORIZON - 1, HORIZON - 2])
    assert "2 labels are" in str(exc.value)
    assert f"at or after {HORIZON}" in str(exc.value)


def test_the_horizon_only_moves_forward_and_a_second_run_finds_nothing(store):
    write_shuffled(store, 5)
    first = compact_history(store, "spend", horizon_us=HORIZON)
    again = compact_history(store, "spend", horizon_us=HORIZON - 40 * SEC)
    assert again.horizon_us == HORIZON
    assert (again.rows_dropped, again.records_rewritten, again.records_deleted) == (0, 0, 0)
    assert again.rows_before == first.rows_before - first.rows_dropped
    assert store.history_records("spend", 1).horizon_us == HORIZON


def test_compaction_keeps_the_rows_written_between_its_transactions(store):
    """Writes committed between two of its write transactions (stop() runs there) are kept,
    and the online rows stay what the log rebuilds."""
    write_shuffled(store, 6, shuffle=False)
    late = iter(range(100))

    def write_meanwhile() -> bool:
        i = next(late)
        events = [HORIZON + i * SEC, NOW + i]
        store.write(batch(["f", "e"], events, [i, i]), now_us=HORIZON + i * SEC)
        return False

    done = compact_history(
        store, "spend", horizon_us=HORIZON, max_rows_per_txn=1, stop=write_meanwhile
    )
    assert done.rows_dropped > 0
    writes = next(late)
    keys, events, _ = history_rows(store, "spend")
    for i in range(writes):
        assert ((keys["user_id"] == "f") & (events == HORIZON + i * SEC)).sum() == 1
    assert (keys["user_id"] == "e").sum() == writes
    query = {"user_id": np.array(["f", "e"], dtype=object)}
    online = store.read("spend", query, now_us=NOW)
    rebuild_online(store, "spend")
    again = store.read("spend", query, now_us=NOW)
    newest = [HORIZON + (writes - 1) * SEC, NOW + writes - 1]
    assert again.event_us.tolist() == online.event_us.tolist() == newest


def test_a_compaction_racing_a_later_one_leaves_the_later_ones_answers(store):
    """A second compaction (later horizon) runs between the first one's transactions: the
    first skips the records the second rewrote, and the log answers from the later horizon."""
    write_shuffled(store, 7, shuffle=False)
    later = HORIZON + 20 * SEC
    labels = later + np.arange(0, 100, 3) * SEC
    before = answers(store, labels)
    ran = []

    def race() -> bool:
        if not ran:
            ran.append(compact_history(store, "spend", horizon_us=later))
        return False

    compact_history(store, "spend", horizon_us=HORIZON, max_rows_per_txn=1, stop=race)
    assert ran[0].rows_dropped > 0
    assert store.history_records("spend", 1).horizon_us == later
    assert answers(store, labels) == before


def test_the_last_record_is_emptied_not_deleted_so_numbers_never_go_back(store):
    """A rebuild reads the records numbered after the last one it saw: a number reused after
    the last record was deleted would hide a write from it."""
    store.write(batch(["a"], [NOW], [1.0]), now_us=NOW)
    store.write(batch(["a"], [NOW + SEC], [2.0]), now_us=NOW + SEC)
    store.write(batch(["a"], [NOW - SEC], [3.0]), now_us=NOW + 2 * SEC)
    done = compact_history(store, "spend", horizon_us=NOW + 10 * SEC)
    assert (done.rows_dropped, done.records_deleted, done.records_rewritten) == (2, 1, 1)
    records = store.history_records("spend", 1)
    assert records.seqs == [2, 3]
    assert [len(unpack_batch(b)[0]) for b in records.blobs] == [1, 0]
    store.write(batch(["a"], [NOW + 20 * SEC], [4.0]), now_us=NOW + 20 * SEC)
    assert store.history_records("spend", 1).seqs == [2, 3, 4]


def test_rows_written_at_or_after_the_horizon_stop_the_compacted_prefix(store):
    """Records are compacted only up to the first one holding a row written at or after the
    horizon: a later record written before it is kept whole (the next run takes it)."""
    store.write(batch(["a"], [NOW], [1.0]), now_us=NOW)
    store.write(batch(["a"], [NOW + SEC], [2.0]), now_us=NOW + 30 * SEC)
    store.write(batch(["a"], [NOW + 2 * SEC], [3.0]), now_us=NOW + 2 * SEC)
    store.write(batch(["a"], [NOW + 3 * SEC], [4.0]), now_us=NOW + 3 * SEC)
    done = compact_history(store, "spend", horizon_us=NOW + 10 * SEC)
    assert done.rows_dropped == 0
    assert done.records_rewritten == 0
    later = compact_history(store, "spend", horizon_us=NOW + 40 * SEC)
    assert later.rows_dropped == 3


def test_a_view_deleted_and_created_again_meanwhile_is_a_conflict(store):
    write_shuffled(store, 8)

    def recreate() -> bool:
        store.registry.delete_view("spend", 1)
        store.registry.apply([USER], [VIEW])
        return False

    with pytest.raises(ConflictError, match="run the compaction again"):
        compact_history(store, "spend", horizon_us=HORIZON, max_rows_per_txn=1, stop=recreate)


def test_an_empty_log_compacts_to_nothing_and_still_stores_its_horizon(store):
    done = compact_history(store, "spend", horizon_us=HORIZON)
    assert (done.rows_before, done.rows_dropped) == (0, 0)
    assert store.history_records("spend", 1).horizon_us == HORIZON
    with pytest.raises(InvalidArgumentError, match="before the history's horizon"):
        point_in_time(store, "spend", {"user_id": np.array(["a"], dtype=object)}, [HORIZON - 1])


def test_compacting_every_view_passes_one_created_again_meanwhile(store):
    """A version deleted and created again during its compaction is reported and passed; the
    views after it are still compacted."""
    store.registry.apply([], [dataclasses.replace(VIEW, name="tips")])
    write_shuffled(store, 9, shuffle=False)
    tips = batch(["a", "a"], [NOW, NOW + SEC], [1.0, 2.0])
    store.write(dataclasses.replace(tips, view="tips"), now_us=NOW + SEC)
    churned = []

    def recreate_spend() -> bool:
        if not churned:
            store.registry.delete_view("spend", 1)
            store.registry.apply([], [VIEW])
            churned.append(True)
        return False

    done = list(compact_views(store, HORIZON, max_rows_per_txn=1, stop=recreate_spend))
    assert done[0] == Recreated("spend", 1)
    assert (done[1].view, done[1].rows_dropped) == ("tips", 1)
    with pytest.raises(ConflictError):
        churned.clear()
        list(compact_views(store, HORIZON, "spend", stop=recreate_spend))


def times(row: bytes) -> tuple[int, int]:
    """A packed row's event and write times (bytes 8:24, see row_codec)."""
    return tuple(int.from_bytes(row[a : a + 8], "little", signed=True) for a in (8, 16))


def logged(store: OnlineStore) -> list[tuple[int, list[tuple[bytes, bytes]]]]:
    """spend v1's log as (sequence number, [(key, row)]) per record."""
    records = store.history_records("spend", 1)
    return [
        (seq, list(zip(*unpack_batch(blob), strict=True)))
        for seq, blob in zip(records.seqs, records.blobs, strict=True)
    ]


def compacted_by_hand(log: list, horizon_us: int) -> tuple[list, int, int]:
    """The log after compaction to horizon_us, in plain Python: records up to the first holding
    a row written at or after the horizon keep the rows with event times at or after it and
    each key's newest before it (the first logged among ties); a record that lost rows and
    kept none goes unless it is the last of them. Also the records rewritten and deleted."""
    prefix = []
    for seq, pairs in log:
        if any(times(row)[1] >= horizon_us for _, row in pairs):
            break
        prefix.append((seq, pairs))
    newest: dict[bytes, tuple[int, int, int]] = {}
    for seq, pairs in prefix:
        for i, (key, row) in enumerate(pairs):
            event = times(row)[0]
            if event < horizon_us and (key not in newest or event > newest[key][0]):
                newest[key] = (event, seq, i)
    winners = {(seq, i) for _, seq, i in newest.values()}
    out, rewritten, deleted = [], 0, 0
    for n, (seq, pairs) in enumerate(prefix):
        kept = [
            pair
            for i, pair in enumerate(pairs)
            if times(pair[1])[0] >= horizon_us or (seq, i) in winners
        ]
        if len(kept) == len(pairs):
            out.append((seq, pairs))
        elif kept or n == len(prefix) - 1:
            out.append((seq, kept))
            rewritten += 1
        else:
            deleted += 1
    return out + log[len(prefix) :], rewritten, deleted


def rebuilt_by_hand(log: list) -> dict[bytes, bytes]:
    """Each key's row after replaying the log: the newest event time, the first logged of ties."""
    newest: dict[bytes, bytes] = {}
    for _, pairs in log:
        for key, row in pairs:
            if key not in newest or times(row)[0] > times(newest[key])[0]:
                newest[key] = row
    return newest


def online_bytes(store: OnlineStore) -> dict[bytes, bytes]:
    """spend v1's raw online rows."""
    db = store._lmdb.existing_db(view_db_name("spend", 1))
    with store._lmdb.read_txn() as txn:
        return dict(txn.cursor(db=db))


@pytest.mark.parametrize("seed", [11, 12, 13])
@pytest.mark.parametrize("stream_rows", [1, 7, 2048])
def test_compaction_and_rebuild_match_a_plain_python_replay(store, monkeypatch, seed, stream_rows):
    """Random logs of many records over 40 keys (late, future-dated and tied event times,
    batches committed a little out of stamp order), compacted twice and rebuilt, read in groups of
    stream_rows rows: the log, the counts and the online rows are what plain Python gives."""
    monkeypatch.setattr("featurestore.history.STREAM_ROWS", stream_rows)
    monkeypatch.setattr("featurestore.history_retention.STREAM_ROWS", stream_rows)
    rng = np.random.default_rng(seed)
    ids = np.array([f"k{i}" for i in range(40)], dtype=object)
    prepared, stamps = [], []
    for _ in range(400):
        n = int(rng.integers(1, 12))
        stamp = NOW + int(rng.integers(0, 100)) * SEC
        events = stamp + rng.integers(-60, 20, n) * SEC  # whole seconds: many ties
        amounts = rng.random(n).tolist()
        prepared.append(
            store.prepare(
                batch(ids[rng.integers(0, 40, n)].tolist(), events, amounts), now_us=stamp
            )
        )
        stamps.append(stamp)
    # stamp order but for a few seconds' jitter, as with several workers
    order = np.argsort(np.array(stamps) + rng.integers(0, 3 * SEC, len(stamps))).tolist()
    for start in range(0, len(order), 4):
        store.write_prepared([prepared[i] for i in order[start : start + 4]])
    for horizon in (NOW + 30 * SEC, NOW + 70 * SEC):
        log = logged(store)
        expected, rewritten, deleted = compacted_by_hand(log, horizon)
        done = compact_history(store, "spend", horizon_us=horizon, max_rows_per_txn=50)
        rows = sum(len(pairs) for _, pairs in log)
        left = sum(len(pairs) for _, pairs in expected)
        assert logged(store) == expected
        assert (done.rows_before, done.rows_dropped) == (rows, rows - left)
        assert (done.records_rewritten, done.records_deleted) == (rewritten, deleted)
        assert deleted > 0
        store.replace_online_rows("spend", 1, lambda records: [])
        assert rebuild_online(store, "spend", max_rows_per_txn=7) == left
        assert online_bytes(store) == rebuilt_by_hand(log) == rebuilt_by_hand(expected)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"horizon_us": 0}, "horizon_us: got 0"),
        ({"horizon_us": 1.5}, "horizon_us: got 1.5"),
        ({"horizon_us": True}, "horizon_us: got True"),
        ({"horizon_us": HORIZON, "max_rows_per_txn": 0}, "max_rows_per_txn: got 0"),
    ],
)
def test_bad_arguments_are_refused_naming_them(store, kwargs, message):
    with pytest.raises(InvalidArgumentError, match=message):
        compact_history(store, "spend", **kwargs)


def test_compaction_and_rebuild_hold_the_keys_not_the_log(store):
    """300k logged rows over 1,000 keys in 300 records: a rebuild and a compaction keep per key
    its newest row so far and per record a few numbers, so their peak Python memory stays far
    below the log's size (both used to read the whole log into memory: 99.7 MB at the peak for
    this log of 16 MB; now about 1.2 MB)."""
    rng = np.random.default_rng(0)
    ids = np.array([f"user{i}" for i in range(1000)], dtype=object)
    prepared = [
        store.prepare(
            batch(
                ids[rng.integers(0, len(ids), 1000)].tolist(),
                (NOW - rng.integers(0, 50, 1000) * SEC).tolist(),
                rng.random(1000).tolist(),
            ),
            now_us=NOW + r,
        )
        for r in range(300)
    ]
    for start in range(0, len(prepared), 50):
        store.write_prepared(prepared[start : start + 50])
    del prepared
    online = store.read("spend", {"user_id": ids}, now_us=NOW)
    blobs = store.history_records("spend", 1).blobs
    logged, log_bytes = logged_rows(store), sum(map(len, blobs))
    del blobs
    store.replace_online_rows("spend", 1, lambda records: [])
    tracemalloc.start()
    try:
        replayed = rebuild_online(store, "spend")
        rebuild_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        done = compact_history(store, "spend", horizon_us=HORIZON)
        compaction_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert replayed == logged > 290_000  # ties of a key's stored event time are not logged
    assert (done.rows_before, done.rows_dropped) == (logged, logged - len(ids))
    again = store.read("spend", {"user_id": ids}, now_us=NOW)
    assert again.event_us.tolist() == online.event_us.tolist()
    assert again.blocks[0].values.tolist() == online.blocks[0].values.tolist()
    assert max(rebuild_peak, compaction_peak) < log_bytes / 4, (
        f"peaks {rebuild_peak} and {compaction_peak} bytes for a log of {log_bytes} bytes"
    )


def test_compaction_reads_the_log_in_short_transactions_not_one_snapshot(store, monkeypatch):
    """The log is read a chunk at a time, each chunk in its own read transaction, not in one
    held while the whole log is reduced (LMDB reuses no page freed while a snapshot is held, so
    beside a writer the file grew with the log): a row committed while the first chunk is
    reduced (log_of, wrapped to write once and call through, places the write there without
    timing) is read by a later chunk, counted and kept."""
    monkeypatch.setattr("featurestore.history_retention.STREAM_ROWS", 4)
    write_shuffled(store, 10, shuffle=False)
    rows = logged_rows(store)
    reduce = history_retention.log_of
    written = []

    def write_meanwhile(blobs: list[bytes]) -> object:
        if not written:
            store.write(batch(["meanwhile"], [HORIZON], [1.0]), now_us=HORIZON)
            written.append(True)
        return reduce(blobs)

    monkeypatch.setattr(history_retention, "log_of", write_meanwhile)
    done = compact_history(store, "spend", horizon_us=HORIZON)
    assert written
    assert done.rows_before == rows + 1
    assert done.rows_dropped > 0
    assert list(history_rows(store, "spend")[0]["user_id"]).count("meanwhile") == 1


def test_compaction_holds_a_few_numbers_per_compacted_record(store):
    """50k one-row records (single-row writes) over 10 keys, nearly all deleted: the plan
    keeps per record columns of numbers, not an object, list and dict entry each: its peak
    was 3.4 MB here (69 bytes a record) against 21.0 MB (420) before."""
    records = 50_000
    ids = np.array([f"user{i}" for i in range(10)], dtype=object)
    for start in range(0, records, 5000):
        store.write_prepared(
            [
                store.prepare(
                    batch([ids[i % 10]], [NOW - 50 * SEC + i], [float(i)]),
                    now_us=NOW + i,
                )
                for i in range(start, start + 5000)
            ]
        )
    tracemalloc.start()
    try:
        done = compact_history(store, "spend", horizon_us=HORIZON)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert done.rows_before == records
    assert (done.rows_dropped, done.records_deleted) == (records - 10, records - 10)
    assert peak < 100 * records, f"peak {peak} bytes for {records} one-row records"
