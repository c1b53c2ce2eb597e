"""Online store on real LMDB files: round trips, last-write-wins, TTL, validation, map growth."""

import gc
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import lmdb
import numpy as np
import pytest

from featurestore.dtypes import DType, FeatureStatus
from featurestore.errors import (
    ConflictError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)
from featurestore.keys import decode_keys, encode_keys
from featurestore.online_store import OnlineStore, RowError, StoreConfig, ViewRead, WriteBatch
from featurestore.registry import Entity, Feature, FeatureView, JoinKey

NOW = 1_800_000_000_000_000
USER = Entity("user", (JoinKey("user_id", DType.INT64),))
NAMED = Entity("named", (JoinKey("name", DType.STRING),))
TRIP = Entity("trip", (JoinKey("city", DType.STRING), JoinKey("driver", DType.INT64)))
ALL = FeatureView(
    "all_types",
    "user",
    (
        Feature("f32", DType.FLOAT32),
        Feature("s", DType.STRING),
        Feature("f64", DType.FLOAT64, allow_nan=True),
        Feature("i64", DType.INT64),
        Feature("flag", DType.BOOL),
        Feature("vec", DType.FLOAT32_VECTOR, vector_length=3),
        Feature("t", DType.STRING),
        Feature("g32", DType.FLOAT32),
    ),
)
SCORE = FeatureView("score", "user", (Feature("score", DType.FLOAT32),), ttl_seconds=60)
SCORE_TEXT = FeatureView("score", "user", (Feature("score", DType.STRING),))


@pytest.fixture
def store(tmp_path: Path):
    with OnlineStore(StoreConfig(tmp_path / "db", map_size=1 << 20)) as s:
        s.registry.apply([USER, NAMED, TRIP], [ALL, SCORE])
        yield s


def all_batch(ids, event, **kw) -> WriteBatch:
    n = len(ids)
    cols = {
        "f32": np.arange(n, dtype=np.float32) + 0.5,
        "s": np.array([f"s{i}é" for i in range(n)], dtype=object),
        "f64": np.array([np.nan] + [1e300] * (n - 1)),
        "i64": np.array([-(2**63)] + [2**62] * (n - 1), dtype=np.int64),
        "flag": np.arange(n) % 2 == 0,
        "vec": np.arange(3 * n, dtype=np.float32).reshape(n, 3),
        "t": np.array([""] * n, dtype=object),
        "g32": np.full(n, 7, np.float32),
    }
    return WriteBatch("all_types", {"user_id": np.asarray(ids)}, np.full(n, event), cols, **kw)


def score_batch(ids, events, scores, **kw) -> WriteBatch:
    return WriteBatch(
        "score",
        {"user_id": np.asarray(ids, np.int64)},
        np.asarray(events, np.int64),
        {"score": np.asarray(scores, np.float32)},
        **kw,
    )


def column(result, name):
    for block in result.blocks:
        if name in block.features:
            j = block.features.index(name)
            return block.values[:, j], block.statuses[:, j]
    raise KeyError(name)


def test_round_trip_every_dtype_with_nulls(store):
    nulls = {
        "i64": np.array([False, True, False]),
        "s": np.array([False, True, False]),
        "flag": np.array([True, False, False]),
        "vec": np.array([False, False, True]),
    }
    batch = all_batch([10, 11, 12], NOW, nulls=nulls)
    assert store.write(batch, now_us=NOW).written == 3
    res = store.read("all_types", {"user_id": np.array([12, 99, 10, 11])}, now_us=NOW)
    assert res.row_status.tolist() == [1, 2, 1, 1]
    assert res.event_us.tolist() == [NOW, 0, NOW, NOW]
    assert [(b.dtype, b.features) for b in res.blocks] == [
        (DType.FLOAT32, ["f32", "g32"]),
        (DType.STRING, ["s", "t"]),
        (DType.FLOAT64, ["f64"]),
        (DType.INT64, ["i64"]),
        (DType.BOOL, ["flag"]),
        (DType.FLOAT32_VECTOR, ["vec"]),
    ]
    values, statuses = column(res, "f32")
    assert values.tolist() == [2.5, 0.0, 0.5, 1.5] and statuses.tolist() == [1, 2, 1, 1]
    values, statuses = column(res, "s")
    assert values.tolist() == ["s2é", "", "s0é", ""] and statuses.tolist() == [1, 2, 1, 3]
    assert column(res, "t")[0].tolist() == ["", "", "", ""]
    f64 = column(res, "f64")[0]
    assert np.isnan(f64[2]) and f64[0] == 1e300
    values, statuses = column(res, "i64")
    assert values.tolist() == [2**62, 0, -(2**63), 0] and statuses.tolist() == [1, 2, 1, 3]
    values, statuses = column(res, "flag")
    assert values.tolist() == [True, False, False, False] and statuses.tolist() == [1, 2, 3, 1]
    values, statuses = column(res, "vec")
    assert values.tolist() == [[0, 0, 0], [0, 0, 0], [0, 1, 2], [3, 4, 5]]
    assert statuses.tolist() == [3, 2, 1, 1]


def test_read_subset_in_requested_order(store):
    store.write(all_batch([1], NOW), now_us=NOW)
    res = store.read("all_types", {"user_id": np.array([1])}, ["g32", "i64", "f32"])
    assert [(b.features, b.values.tolist()) for b in res.blocks] == [
        (["g32", "f32"], [[7.0, 0.5]]),
        (["i64"], [[-(2**63)]]),
    ]
    with pytest.raises(NotFoundError, match="'nope' is not in view 'all_types'"):
        store.read("all_types", {"user_id": np.array([1])}, ["nope"])


def test_last_write_wins_by_event_time(store):
    first = store.write(score_batch([1, 2, 3], [NOW, NOW, NOW], [1, 2, 3]), now_us=NOW)
    assert (first.written, first.stale) == (3, 0)
    older = store.write(score_batch([1, 2], [NOW - 5, NOW + 5], [10, 20]), now_us=NOW)
    assert (older.written, older.stale) == (1, 1)
    replay = store.write(score_batch([3], [NOW], [30]), now_us=NOW)
    assert (replay.written, replay.stale) == (0, 1)
    res = store.read("score", {"user_id": np.array([1, 2, 3])}, now_us=NOW)
    assert res.blocks[0].values[:, 0].tolist() == [1, 20, 3]
    assert res.event_us.tolist() == [NOW, NOW + 5, NOW]


def test_out_of_order_batches_in_one_commit_keep_the_newest(store):
    batches = [
        store.prepare(score_batch([1, 1, 2], [NOW, NOW - 9, NOW], [1, 0, 2]), now_us=NOW),
        store.prepare(score_batch([1, 2, 2], [NOW - 1, NOW + 1, NOW + 1], [9, 5, 6]), now_us=NOW),
    ]
    results = store.write_prepared(batches)
    assert [(r.written, r.stale) for r in results] == [(2, 1), (1, 2)]
    res = store.read("score", {"user_id": np.array([1, 2])}, now_us=NOW)
    assert res.blocks[0].values[:, 0].tolist() == [1, 5]


def test_the_commit_runs_inside_the_committing_context(store):
    """The context is entered once the rows are applied but not yet committed (another thread
    still reads the old value) and left once they are."""
    seen = []

    def read_elsewhere() -> None:
        reader = threading.Thread(
            target=lambda: seen.append(store.read("score", {"user_id": np.array([1])}).event_us[0])
        )
        reader.start()
        reader.join()

    @contextmanager
    def committing():
        read_elsewhere()
        yield
        read_elsewhere()

    store.write(score_batch([1], [NOW], [1]), now_us=NOW)
    newer = store.prepare(score_batch([1], [NOW + 1], [2]), now_us=NOW)
    assert store.write_prepared([newer], committing())[0].written == 1
    assert seen == [NOW, NOW + 1]
    empty = store.prepare(score_batch([], [], []), now_us=NOW)
    assert store.write_prepared([empty], committing())[0].written == 0
    assert seen == [NOW, NOW + 1]


def test_a_commit_that_finds_the_map_full_is_retried_in_the_same_committing_context(store):
    class FullOnce:
        """Fails the first commit as a full map would; counts the commits it surrounds."""

        entered = 0

        def __enter__(self) -> None:
            self.entered += 1
            if self.entered == 1:
                raise lmdb.MapFullError("simulated")

        def __exit__(self, *exc: object) -> None:
            pass

    committing = FullOnce()
    size = store.map_size
    batch = store.prepare(score_batch([1, 2], [NOW, NOW], [1, 2]), now_us=NOW)
    assert store.write_prepared([batch], committing)[0].written == 2
    assert committing.entered == 2 and store.map_size == 2 * size
    values, _ = column(store.read("score", {"user_id": np.array([1, 2])}, now_us=NOW), "score")
    assert values.tolist() == [1, 2]


def test_ttl_withholds_old_rows(store):
    store.write(score_batch([1, 2], [NOW - 61_000_000, NOW - 59_000_000], [1, 2]), now_us=NOW)
    res = store.read("score", {"user_id": np.array([1, 2, 3])}, now_us=NOW)
    assert res.row_status.tolist() == [
        FeatureStatus.OUTSIDE_MAX_AGE,
        FeatureStatus.PRESENT,
        FeatureStatus.NOT_FOUND,
    ]
    assert res.blocks[0].values[:, 0].tolist() == [0, 2, 0]
    assert res.blocks[0].statuses[:, 0].tolist() == [4, 1, 2]
    later = store.read("score", {"user_id": np.array([2])}, now_us=NOW + 2_000_000)
    assert later.row_status.tolist() == [FeatureStatus.OUTSIDE_MAX_AGE]


def test_schema_evolution_across_versions(store):
    store.write(score_batch([1], [NOW], [1.5]), now_us=NOW)
    added = FeatureView(
        "score",
        "user",
        (Feature("score", DType.FLOAT32), Feature("label", DType.STRING)),
        ttl_seconds=60,
    )
    assert store.registry.apply([], [added])[0].action == "updated"
    res = store.read("score", {"user_id": np.array([1])}, now_us=NOW)
    assert column(res, "score")[0].tolist() == [1.5]
    assert column(res, "label")[1].tolist() == [FeatureStatus.NULL_VALUE]
    batch = score_batch([2], [NOW], [2.5])
    batch.columns["label"] = np.array(["new"], dtype=object)
    store.write(batch, now_us=NOW)
    assert column(store.read("score", {"user_id": np.array([2])}, now_us=NOW), "label")[0] == "new"
    v2 = FeatureView("score", "user", (Feature("score", DType.INT64),), version=2)
    assert store.registry.apply([], [v2])[0].action == "created"
    store.write(
        WriteBatch("score", {"user_id": np.array([1])}, np.array([NOW]), {"score": np.array([7])}),
        now_us=NOW,
    )
    assert store.read("score", {"user_id": np.array([1])}).blocks[0].values.tolist() == [[7]]
    old = store.read("score", {"user_id": np.array([1, 2])}, version=1, now_us=NOW)
    assert column(old, "score")[0].tolist() == [1.5, 2.5]


def test_reject_batch_names_first_bad_row(store):
    batch = score_batch([1, 2, 3, 4], [NOW] * 4, [1, np.nan, 3, np.nan])
    with pytest.raises(InvalidArgumentError, match=r"column 'score' row 1: NaN"):
        store.write(batch, now_us=NOW)
    assert store.read("score", {"user_id": np.array([1])}, now_us=NOW).row_status.tolist() == [2]


def test_skip_bad_rows_drops_and_reports(store):
    batch = score_batch(
        [1, 2, 3, 4], [NOW, NOW, NOW + 10**12, NOW], [1, np.nan, 3, 4], skip_bad_rows=True
    )
    result = store.write(batch, now_us=NOW)
    assert (result.written, result.rejected) == (2, 2)
    assert [(e.row, e.column) for e in result.errors] == [(1, "score"), (2, "event_us")]
    assert "max_clock_skew_seconds=300" in result.errors[1].reason
    res = store.read("score", {"user_id": np.array([1, 2, 3, 4])}, now_us=NOW)
    assert res.row_status.tolist() == [1, 2, 2, 1]


@pytest.mark.parametrize(
    ("mutate", "error", "message"),
    [
        (lambda b: b.columns.update(extra=np.zeros(2)), NotFoundError, "'extra' is not in view"),
        (lambda b: b.columns.pop("score"), InvalidArgumentError, "'score' .* is missing"),
        (
            lambda b: b.columns.update(score=np.array(["a", "b"])),
            InvalidArgumentError,
            "feature 'score' of view 'score' is declared FLOAT32 but the column holds STRING "
            r"values; send FLOAT32 values \(NumPy float32\)",
        ),
        (
            lambda b: b.columns.update(score=np.zeros(3)),
            InvalidArgumentError,
            r"shape \(3,\), expected \(2,\)",
        ),
        (
            lambda b: b.keys.update(user_id=np.array(["a", "b"])),
            InvalidArgumentError,
            "join key 'user_id' of entity 'user' is declared INT64 but the column holds STRING "
            r"values; send INT64 values \(NumPy int64\)",
        ),
        (
            lambda b: b.keys.update(user_id=np.array([1])),
            InvalidArgumentError,
            "key columns have 1 rows",
        ),
        (
            lambda b: b.keys.update(other=np.array([1, 2])),
            InvalidArgumentError,
            "'other' is not a join key",
        ),
        (
            lambda b: b.keys.pop("user_id"),
            InvalidArgumentError,
            "'user_id' of entity 'user' is missing",
        ),
        (
            lambda b: b.nulls.update(score=np.array([1, 0])),
            InvalidArgumentError,
            r"nulls\['score'\] must be a bool",
        ),
    ],
)
def test_batch_level_errors(store, mutate, error, message):
    batch = score_batch([1, 2], [NOW, NOW], [1, 2], skip_bad_rows=True)
    mutate(batch)
    with pytest.raises(error, match=message):
        store.prepare(batch, now_us=NOW)


@pytest.mark.parametrize(
    ("name", "sent", "message"),
    [
        (
            "i64",
            np.ones(2),
            "'i64' of view 'all_types' is declared INT64 but the column holds FLOAT64",
        ),
        ("flag", np.array([1, 0]), "declared BOOL but the column holds INT64 values; send BOOL"),
        ("s", np.array([1, 2], np.int32), "holds NumPy int32 values; send STRING values"),
        ("f32", np.array([True, False]), "declared FLOAT32 but the column holds BOOL values"),
        ("vec", np.array([["a"] * 3] * 2), "declared FLOAT32_VECTOR but the column holds STRING"),
    ],
)
def test_wrong_dtype_names_the_declared_and_sent_types(store, name, sent, message):
    batch = all_batch([1, 2], NOW)
    batch.columns[name] = sent
    with pytest.raises(InvalidArgumentError, match=message):
        store.prepare(batch, now_us=NOW)


def test_wrong_key_dtype_names_the_declared_and_sent_types(store):
    store.registry.apply([], [FeatureView("tag", "named", (Feature("n", DType.INT64),))])
    batch = WriteBatch("tag", {"name": np.array([1, 2])}, np.full(2, NOW), {"n": np.arange(2)})
    with pytest.raises(
        InvalidArgumentError,
        match="join key 'name' of entity 'named' is declared STRING but the column holds INT64 "
        r"values; send STRING values \(str, or UTF-8 bytes\)",
    ):
        store.prepare(batch, now_us=NOW)


def test_limits(tmp_path: Path):
    config = StoreConfig(tmp_path / "db", max_rows_per_write=3, max_entities_per_read=2)
    with OnlineStore(config) as store:
        store.registry.apply([USER], [SCORE])
        with pytest.raises(ResourceExhaustedError, match="max_rows_per_write=3"):
            store.write(score_batch([1, 2, 3, 4], [NOW] * 4, [0] * 4), now_us=NOW)
        with pytest.raises(ResourceExhaustedError, match="max_entities_per_read=2"):
            store.read("score", {"user_id": np.array([1, 2, 3])})


def test_map_grows_from_a_tiny_map(tmp_path: Path):
    with OnlineStore(StoreConfig(tmp_path / "db", map_size=64 * 1024)) as store:
        store.registry.apply([USER], [SCORE])
        start = store.map_size
        for chunk in range(5):
            ids = np.arange(chunk * 5000, (chunk + 1) * 5000)
            assert (
                store.write(score_batch(ids, np.full(5000, NOW), ids), now_us=NOW).written == 5000
            )
        assert store.map_size > start
        res = store.read("score", {"user_id": np.array([0, 12_345, 24_999])}, now_us=NOW)
        assert res.blocks[0].values[:, 0].tolist() == [0, 12_345, 24_999]


def test_garbage_string_keys_never_touch_neighbours(store):
    view = FeatureView("tag", "named", (Feature("n", DType.INT64),))
    store.registry.apply([], [view])
    keys = np.array(
        ["a", b"\x00\xff", "a\x00", "", "\x00", "x" * 400, "é", b"\xc3\xa9x"], dtype=object
    )
    n = len(keys)
    batch = WriteBatch("tag", {"name": keys}, np.full(n, NOW), {"n": np.arange(n)})
    assert store.write(batch, now_us=NOW).written == n
    res = store.read("tag", {"name": keys[::-1].copy()}, now_us=NOW)
    assert res.blocks[0].values[:, 0].tolist() == list(range(n))[::-1]
    long_key = np.array(["y" * 600, 5, "ok"], dtype=object)
    bad = WriteBatch("tag", {"name": long_key}, np.full(3, NOW), {"n": np.arange(3)})
    too_long = r"column 'name' row 0: join key 'name': 600 bytes; .* at most 507 bytes"
    with pytest.raises(InvalidArgumentError, match=too_long):
        store.write(bad, now_us=NOW)
    bad.skip_bad_rows = True
    result = store.write(bad, now_us=NOW)
    assert (result.written, [e.row for e in result.errors]) == (1, [0, 1])
    res = store.read("tag", {"name": long_key}, now_us=NOW)
    assert res.row_status.tolist() == [2, 2, 1]
    again = store.read("tag", {"name": keys}, now_us=NOW)
    assert again.blocks[0].values[:, 0].tolist() == list(range(n))


def test_composite_keys(store):
    view = FeatureView("trip_stats", "trip", (Feature("n", DType.INT64),))
    store.registry.apply([], [view])
    cities = np.array(["ab", "a", "a"], dtype=object)
    drivers = np.array([1, -1, 2**40])
    batch = WriteBatch(
        "trip_stats", {"city": cities, "driver": drivers}, np.full(3, NOW), {"n": np.arange(3)}
    )
    store.write(batch, now_us=NOW)
    res = store.read(
        "trip_stats",
        {
            "city": np.array(["a", "a", "ab", "b"], dtype=object),
            "driver": np.array([2**40, -1, 1, 1]),
        },
    )
    assert res.blocks[0].values[:, 0].tolist() == [2, 1, 0, 0]
    assert res.row_status.tolist() == [1, 1, 1, 2]


def test_empty_reads_and_writes(store):
    result = store.write(score_batch([], [], []), now_us=NOW)
    assert (result.written, result.stale, result.rejected) == (0, 0, 0)
    res = store.read("score", {"user_id": np.zeros(0, np.int64)})
    assert res.row_status.shape == (0,) and res.blocks[0].values.shape == (0, 1)
    fresh = store.read("all_types", {"user_id": np.array([5])})
    assert fresh.row_status.tolist() == [FeatureStatus.NOT_FOUND]
    assert store.write_prepared([]) == []


def test_closed_store_is_unavailable(tmp_path: Path):
    store = OnlineStore(StoreConfig(tmp_path / "db"))
    store.registry.apply([USER], [SCORE])
    store.close()
    with pytest.raises(UnavailableError):
        store.read("score", {"user_id": np.array([1])})


def test_key_encoding_orders_ints_and_separates_composites():
    ints = np.array([-(2**63), -5, -1, 0, 1, 7, 2**63 - 1])
    encoded = encode_keys(USER, {"user_id": ints[::-1].copy()}).keys[::-1]
    assert encoded == sorted(encoded) and len(set(encoded)) == len(ints)
    pair = Entity("pair", (JoinKey("a", DType.STRING), JoinKey("b", DType.STRING)))
    left = np.array(["ab", "a", "", "a\x00\x00\x00\x01b"], dtype=object)
    right = np.array(["", "b", "ab", ""], dtype=object)
    keys = encode_keys(pair, {"a": left, "b": right}).keys
    assert len(set(keys)) == 4
    decoded = decode_keys(pair, keys)
    assert decoded["a"].tolist() == left.tolist() and decoded["b"].tolist() == right.tolist()
    assert decode_keys(USER, encoded)["user_id"].tolist() == ints.tolist()


def test_values_a_feature_dtype_cannot_hold_are_rejected_per_row(store):
    n = 6
    batch = all_batch(range(20, 20 + n), NOW, skip_bad_rows=True)
    batch.columns["f32"] = np.array([0.1, 1e300, -np.inf, 3.5e38, 2.0, 1e-50])
    batch.columns["g32"] = np.array([2**24, 3, 2**24 + 1, 4, 5, 6], np.int64)
    batch.columns["f64"] = np.array([1, 2, 3, 4, 2**53 + 1, 6], np.uint64)
    batch.columns["vec"] = np.array([[0, 0, 0]] * 5 + [[0, -1e39, 0]])
    batch.nulls["f32"] = np.array([False, False, False, True, False, False])
    result = store.write(batch, now_us=NOW)
    assert [(e.row, e.column) for e in result.errors] == [
        (1, "f32"), (2, "g32"), (4, "f64"), (5, "vec")
    ]  # fmt: skip
    assert "1e+300 overflows FLOAT32" in result.errors[0].reason
    assert "16777217 is not exactly representable as FLOAT32" in result.errors[1].reason
    assert "9007199254740993 is not exactly representable as FLOAT64" in result.errors[2].reason
    assert "vector element overflows FLOAT32" in result.errors[3].reason
    assert (result.written, result.rejected) == (2, 4)
    res = store.read("all_types", {"user_id": np.arange(20, 20 + n)}, now_us=NOW)
    assert res.row_status.tolist() == [1, 2, 2, 1, 2, 2]
    values, statuses = column(res, "f32")
    assert values[0] == np.float32(0.1) and statuses[3] == FeatureStatus.NULL_VALUE
    assert column(res, "g32")[0][0] == 2**24
    batch = all_batch([30, 31], NOW)
    batch.columns["f32"] = np.array([np.inf, 1e39])
    with pytest.raises(InvalidArgumentError, match=r"column 'f32' row 1: 1e\+39 overflows FLOAT32"):
        store.write(batch, now_us=NOW)
    batch.columns["f32"] = np.array([np.inf, -(2.0**24)])
    batch.columns["i64"] = np.array([2**64 - 1, 5], np.uint64)
    with pytest.raises(InvalidArgumentError, match=r"'i64' row 0: 18446744073709551615 exceeds"):
        store.write(batch, now_us=NOW)
    batch.columns["i64"] = np.array([2**63 - 1, 5], np.uint64)
    assert store.write(batch, now_us=NOW).written == 2
    res = store.read("all_types", {"user_id": np.array([30, 31])}, ["f32", "i64"], now_us=NOW)
    assert [b.values[:, 0].tolist() for b in res.blocks] == [[np.inf, -(2.0**24)], [2**63 - 1, 5]]


def test_a_zero_row_write_or_read_may_leave_out_every_column(store):
    empty = WriteBatch("all_types", {}, np.zeros(0, np.int64), {})
    result = store.write(empty, now_us=NOW)
    assert (result.written, result.stale, result.rejected) == (0, 0, 0)
    res = store.read("all_types", {}, ["f32", "s"])
    assert res.row_status.shape == (0,)
    assert [(b.features, b.values.shape) for b in res.blocks] == [
        (["f32"], (0, 1)),
        (["s"], (0, 1)),
    ]
    pair = FeatureView("pair_stats", "trip", (Feature("n", DType.INT64),))
    store.registry.apply([], [pair])
    assert store.read("pair_stats", {"city": np.array([], object)}).row_status.shape == (0,)
    with pytest.raises(
        InvalidArgumentError, match="key column 'driver' of entity 'trip' is missing"
    ):
        store.read("pair_stats", {"city": np.array(["a"], object)})
    with pytest.raises(
        InvalidArgumentError, match="key column 'user_id' of entity 'user' is missing"
    ):
        store.write(WriteBatch("score", {}, np.array([NOW]), {"score": np.ones(1)}), now_us=NOW)
    with pytest.raises(InvalidArgumentError, match=r"'score' has shape \(1,\), expected \(0,\)"):
        store.write(WriteBatch("score", {}, np.zeros(0, np.int64), {"score": np.ones(1)}))


def test_null_keys_and_caller_found_bad_rows_are_rejected(store):
    batch = score_batch([1, 2, 3, 4], [NOW] * 4, [1, 2, 3, 4], skip_bad_rows=True)
    batch.nulls["user_id"] = np.array([False, True, False, False])
    batch.row_errors = [RowError(2, "score", "value is not valid UTF-8")]
    batch.event_column = "event_timestamps"
    batch.event_us[3] = NOW + 10**12
    result = store.write(batch, now_us=NOW)
    assert [(e.row, e.column) for e in result.errors] == [
        (1, "user_id"), (2, "score"), (3, "event_timestamps")
    ]  # fmt: skip
    assert "keys cannot be null" in result.errors[0].reason
    assert store.read("score", {"user_id": np.arange(1, 5)}, now_us=NOW).row_status.tolist() == [
        1, 2, 2, 2
    ]  # fmt: skip
    batch.skip_bad_rows = False
    with pytest.raises(InvalidArgumentError, match="column 'user_id' row 1: join key is null"):
        store.write(batch, now_us=NOW)


def test_read_many_answers_each_view_as_a_single_read_would(store):
    store.write(all_batch([1, 2], NOW), now_us=NOW)
    keys = {"user_id": np.array([2, 9, 1])}
    reads = [ViewRead("all_types", ["vec", "f32"]), ViewRead("score")]
    subset, score = store.read_many(reads, keys)
    alone = store.read("all_types", keys, ["vec", "f32"])
    assert subset.view.name == "all_types" and score.view.name == "score"
    np.testing.assert_array_equal(subset.event_us, alone.event_us)
    np.testing.assert_array_equal(subset.row_status, alone.row_status)
    for got, want in zip(subset.blocks, alone.blocks, strict=True):
        assert got.features == want.features
        np.testing.assert_array_equal(got.values, want.values)
    assert (score.row_status == FeatureStatus.NOT_FOUND).all()
    assert store.read_many([], keys) == []


def test_read_many_of_two_entities_needs_one_value_per_row_in_every_key_column(store):
    """Views of two entities read the same entity rows, so every key column must have one value
    per row; a read of no rows may leave every key out."""
    store.registry.apply([], [FeatureView("trips", "trip", (Feature("n", DType.INT64),))])
    reads = [ViewRead("score"), ViewRead("trips")]
    keys = {"user_id": np.int64([1, 2]), "city": np.array(["oslo"], object), "driver": [7]}
    with pytest.raises(InvalidArgumentError, match="'city' has 1 rows, key column 'user_id' has 2"):
        store.read_many(reads, keys)
    score, trips = store.read_many(reads, {})
    assert len(score.row_status) == len(trips.row_status) == 0


def test_read_many_of_entities_typing_one_join_key_two_ways_is_refused(store):
    """user_id INT64 in one entity and STRING in another: each dtype sent was refused as the
    other's, so the message told the caller to send the dtype that failed next."""
    suser = Entity("suser", (JoinKey("user_id", DType.STRING),))
    store.registry.apply([suser], [FeatureView("s_score", "suser", (Feature("n", DType.INT64),))])
    reads = [ViewRead("score"), ViewRead("s_score")]
    for ids in (np.int64([1]), np.array(["1"], object)):
        with pytest.raises(InvalidArgumentError) as info:
            store.read_many(reads, {"user_id": ids})
        assert str(info.value) == (
            "key column 'user_id' is a join key of entity 'user' as INT64 and of entity 'suser' "
            "as STRING: one column cannot hold both; read the views of these entities in "
            "separate lookups"
        )


def test_read_many_reads_every_view_from_one_snapshot(tmp_path: Path):
    views = [FeatureView(name, "user", (Feature("n", DType.INT64),)) for name in ("a", "b")]
    with OnlineStore(StoreConfig(tmp_path / "db", sync=False)) as store:
        store.registry.apply([USER], views)
        ids = {"user_id": np.arange(50, dtype=np.int64)}

        def batch(view: str, i: int) -> WriteBatch:
            return WriteBatch(view, ids, np.full(50, NOW + i), {"n": np.full(50, i, np.int64)})

        def write() -> None:
            for i in range(1, 300):
                store.write_prepared([store.prepare(batch(v, i), NOW) for v in ("a", "b")])

        writer = threading.Thread(target=write)
        writer.start()
        reads = [ViewRead("a"), ViewRead("b")]
        mismatches = checked = 0
        while writer.is_alive() or not checked:
            a, b = store.read_many(reads, ids, now_us=NOW)
            mismatches += int((a.blocks[0].values != b.blocks[0].values).any())
            checked += 1
        writer.join()
    assert checked > 10 and mismatches == 0


def text_batch(ids, values) -> WriteBatch:
    """Rows for SCORE_TEXT (score v1 deleted and created again with score as STRING)."""
    return WriteBatch(
        "score",
        {"user_id": np.asarray(ids, np.int64)},
        np.full(len(ids), NOW, np.int64),
        {"score": np.array(values, dtype=object)},
    )


def test_a_batch_checked_before_its_view_version_was_re_created_fails_alone(store):
    """The batch is checked and encoded against score v1 (FLOAT32); v1 is then deleted and
    created again with score as STRING. Its FLOAT32 rows must not land under the STRING layout;
    the batches beside it in the same commit, of that version and of another view, are written."""
    stale = store.prepare(score_batch([1, 2], [NOW] * 2, [1.5, 2.5]), now_us=NOW)
    store.registry.delete_view("score", 1)
    store.registry.apply([], [SCORE_TEXT])
    fresh = store.prepare(text_batch([2, 3], ["b", "c"]), now_us=NOW)
    other = store.prepare(all_batch([7], NOW), now_us=NOW)
    results = store.write_prepared([stale, fresh, other])
    assert isinstance(results[0], ConflictError)
    assert "'score' v1 was deleted and re-created since this batch was checked" in str(results[0])
    assert "resend the batch" in str(results[0])
    assert [(r.written, r.stale) for r in results[1:]] == [(2, 0), (1, 0)]
    res = store.read("score", {"user_id": np.array([1, 2, 3])}, now_us=NOW)
    values, statuses = column(res, "score")
    assert values.tolist() == ["", "b", "c"] and statuses.tolist() == [2, 1, 1]
    assert len(store.history_records("score", 1).blobs) == 1


def test_a_batch_checked_before_its_view_version_was_deleted_fails_and_creates_nothing(store):
    gone = store.prepare(score_batch([1], [NOW], [1.0]), now_us=NOW)
    store.registry.delete_view("score", 1)
    [result] = store.write_prepared([gone])
    assert isinstance(result, NotFoundError)
    assert "'score' v1 was deleted after this batch was checked" in str(result)
    with store._lmdb.env.begin() as txn:
        assert (txn.get(b"v:score@1"), txn.get(b"h:score@1")) == (None, None)


def test_a_batch_checked_before_features_were_added_in_place_is_written(store):
    """Adding a feature keeps the version's identity (created_us); the row records its own
    feature count, so it reads back with the new feature missing."""
    early = store.prepare(score_batch([1], [NOW], [1.5]), now_us=NOW)
    wider = FeatureView("score", "user", (*SCORE.features, Feature("label", DType.STRING)))
    assert store.registry.apply([], [wider])[0].action == "updated"
    assert store.write_prepared([early])[0].written == 1
    res = store.read("score", {"user_id": np.array([1])}, now_us=NOW)
    assert column(res, "score")[0].tolist() == [1.5]
    assert column(res, "label")[1].tolist() == [FeatureStatus.NULL_VALUE]


def int_view(name: str, dtype: DType = DType.INT64) -> FeatureView:
    return FeatureView(name, "user", (Feature("x", dtype),))


def one_row(view: str, value: object) -> WriteBatch:
    """One row for user 1 of an int_view."""
    column = np.array([value], dtype=object if isinstance(value, str) else np.int64)
    return WriteBatch(view, {"user_id": np.array([1])}, np.array([NOW]), {"x": column})


def read_x(store: OnlineStore, view: str) -> list:
    return store.read(view, {"user_id": np.array([1])}, now_us=NOW).blocks[0].values[:, 0].tolist()


def test_deleted_versions_free_their_databases_and_their_handles_are_never_reused(tmp_path):
    """max_dbs=8 holds the registry and three view versions (two databases each). Twenty
    cycles create, write and read a version and delete the oldest. LMDB gives a deleted
    database's handle slot to the next database opened, so a handle of v0 kept in a cache would
    read another view's rows once another process has created v0 again."""
    config = StoreConfig(tmp_path / "db", max_dbs=8, sync=False)
    with OnlineStore(config) as store:
        store.registry.apply([USER], [])
        live: list[tuple[str, object]] = []
        for i in range(20):
            name, value = f"v{i}", (i, f"s{i}")[i % 2]
            store.registry.apply([], [int_view(name, (DType.INT64, DType.STRING)[i % 2])])
            assert store.write(one_row(name, value), now_us=NOW).written == 1
            live.append((name, value))
            assert [read_x(store, view) for view, _ in live] == [[v] for _, v in live]
            if len(live) == 3:
                store.registry.delete_view(live.pop(0)[0], 1)
        in_child(config, "+v0")
        assert read_x(store, "v0") == [99]
        with store._lmdb.env.begin() as txn:
            names = [key for key, _ in txn.cursor()]
    assert names == [
        b"__registry__",
        b"h:v0@1",
        b"h:v18@1",
        b"h:v19@1",
        b"v:v0@1",
        b"v:v18@1",
        b"v:v19@1",
    ]


def test_a_new_view_version_beyond_max_dbs_is_resource_exhausted(tmp_path):
    """max_dbs=8: the registry and v0..v2's online rows and history fill 7; a fourth version
    would need 9, so its apply is refused whole (it was applied, then its first write failed
    and the store could not be reopened with that max_dbs); a deletion makes room."""
    with OnlineStore(StoreConfig(tmp_path / "db", max_dbs=8, sync=False)) as store:
        store.registry.apply([USER], [int_view(f"v{i}") for i in range(3)])
        for i in range(3):
            store.write(one_row(f"v{i}", i), now_us=NOW)
        with pytest.raises(ResourceExhaustedError, match="lmdb_max_dbs = 8") as refused:
            store.registry.apply([], [int_view("v3"), int_view("v4")])
        assert "set lmdb_max_dbs" in str(refused.value)
        for name in ("v3", "v4"):
            with pytest.raises(NotFoundError):
                store.registry.get_view(name)
        store.registry.delete_view("v0", 1)
        store.registry.apply([], [int_view("v3")])
        assert store.write(one_row("v3", 3), now_us=NOW).written == 1
        assert read_x(store, "v3") == [3]
    with OnlineStore(StoreConfig(tmp_path / "db", max_dbs=8, sync=False)) as reopened:
        assert read_x(reopened, "v3") == [3]


IN_CHILD = f"""
import sys
import numpy as np
from featurestore.dtypes import DType
from featurestore.online_store import OnlineStore, StoreConfig, WriteBatch
from featurestore.registry import Feature, FeatureView
with OnlineStore(StoreConfig(sys.argv[1], max_dbs=int(sys.argv[2]), sync=False)) as store:
    for op in sys.argv[3:]:
        kind, name = op[0], op[1:]
        if kind == "-":
            store.registry.delete_view(name, 1)
            continue
        dtype = DType.INT64 if kind == "+" else DType.STRING
        store.registry.apply([], [FeatureView(name, "user", (Feature("x", dtype),))])
        if kind == "+":
            columns = {{"x": np.array([99])}}
            batch = WriteBatch(name, {{"user_id": np.array([1])}}, np.array([{NOW}]), columns)
            store.write(batch, now_us={NOW})
"""


def in_child(config: StoreConfig, *ops: str) -> None:
    """Run ops in a second process (LMDB allows one environment per process): "-v" deletes
    v1 of v, "+v" creates v (INT64 x) and writes 99 for user 1, "*v" creates v (STRING x)."""
    subprocess.run(
        [sys.executable, "-c", IN_CHILD, str(config.path), str(config.max_dbs), *ops],
        check=True,
        timeout=60,
    )


def test_a_version_another_process_deleted_and_re_created_is_written_through_a_new_handle(
    tmp_path,
):
    """This process's handle of v's history database outlives the database (another process
    deleted it, and creating v again does not create it); LMDB would fail a write through it,
    and hands out the same handle when the name is opened again."""
    config = StoreConfig(tmp_path / "db", sync=False)
    with OnlineStore(config) as store:
        store.registry.apply([USER], [int_view("v")])
        store.write(one_row("v", 1), now_us=NOW)
        in_child(config, "-v", "*v")
        assert store.write(one_row("v", "new"), now_us=NOW).written == 1
        assert read_x(store, "v") == ["new"]
        assert len(store.history_records("v", 1).blobs) == 1


def test_handles_of_databases_another_process_deleted_are_freed_once_max_dbs_is_reached(
    tmp_path,
):
    """Handles of databases deleted by another process keep their slots here until the
    environment is reopened, which happens when opening a database (to write, or to read)
    finds max_dbs=8 full (at most 3 view versions live at a time: apply refuses more)."""
    config = StoreConfig(tmp_path / "db", max_dbs=8, sync=False)
    with OnlineStore(config) as store:
        store.registry.apply([USER], [int_view(f"v{i}") for i in range(3)])
        for i in range(3):
            store.write(one_row(f"v{i}", i), now_us=NOW)
        in_child(config, "-v0", "-v1", "-v2", "+w")
        store.registry.apply([], [int_view("v3")])
        assert store.write(one_row("v3", 3), now_us=NOW).written == 1
        in_child(config, "-w")
        store.registry.apply([], [int_view("v4"), int_view("v5")])
        store.write(one_row("v4", 4), now_us=NOW)
        store.write(one_row("v5", 5), now_us=NOW)
        in_child(config, "-v3", "-v4", "-v5", "+x", "+y", "+z")
        assert [read_x(store, name) for name in ("x", "y", "z")] == [[99], [99], [99]]
        assert read_x(store, "x") == [99]


def test_reads_racing_to_open_a_view_in_a_fresh_process_all_succeed(tmp_path: Path) -> None:
    """A handle one thread caches after another thread's read txn began is not used by that txn
    (LMDB answers EINVAL for it): 8 threads read a view at once in a store just opened whose
    handle is not cached yet, 20 times over (most rounds failed before)."""
    view = FeatureView("v", "user", (Feature("x", DType.INT64),))
    with OnlineStore(StoreConfig(path=tmp_path, sync=False)) as store:
        store.registry.apply([USER], [view])
        batch = WriteBatch("v", {"user_id": np.array([1])}, np.array([NOW]), {"x": np.array([7])})
        store.write(batch, now_us=NOW)
    failures: list[BaseException] = []
    values: list[int] = []
    for _ in range(20):
        with OnlineStore(StoreConfig(path=tmp_path, sync=False)) as store:
            start = threading.Barrier(8)

            def read(store: OnlineStore = store, start: threading.Barrier = start) -> None:
                start.wait()
                try:
                    got = store.read("v", {"user_id": np.array([1])}, now_us=NOW)
                    values.append(int(got.blocks[0].values[0, 0]))
                except Exception as exc:
                    failures.append(exc)

            threads = [threading.Thread(target=read) for _ in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
    assert failures == []
    assert values == [7] * 160


def test_failed_reads_give_their_reader_slots_back_at_once(tmp_path: Path) -> None:
    """A read that fails (an unknown view) frees its LMDB reader slot right away, not when the
    garbage collector frees its traceback: 300 failures leave no slot taken (max_readers is
    1024, so slots held until a late GC could fill the table)."""
    with OnlineStore(StoreConfig(path=tmp_path, sync=False)) as store:
        failures = []
        gc.disable()
        try:
            for _ in range(300):
                with pytest.raises(NotFoundError) as info:
                    store.read("nope", {"user_id": np.array([1])})
                failures.append(info.value)
            table = store._lmdb.env.readers()
        finally:
            gc.enable()
    assert len(failures) == 300
    assert len(table.splitlines()) <= 2, table
