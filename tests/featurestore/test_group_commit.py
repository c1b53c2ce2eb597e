"""Group commit: concurrent submitters share commits and each gets its own result."""

import threading
from pathlib import Path

import numpy as np
import pytest

from featurestore.dtypes import DType
from featurestore.errors import ConflictError, NotFoundError, UnavailableError
from featurestore.group_commit import Committer, GroupCommitter
from featurestore.online_store import OnlineStore, PreparedBatch, StoreConfig, WriteBatch
from featurestore.registry import Entity, Feature, FeatureView, JoinKey

NOW = 1_800_000_000_000_000
USER = Entity("user", (JoinKey("user_id", DType.INT64),))
SCORE = FeatureView("score", "user", (Feature("score", DType.FLOAT32),))


def batch(ids, event, value) -> WriteBatch:
    n = len(ids)
    return WriteBatch(
        "score",
        {"user_id": np.asarray(ids, np.int64)},
        np.full(n, event, np.int64),
        {"score": np.full(n, value, np.float32)},
    )


def submit_concurrently(store: OnlineStore, committer: Committer) -> None:
    """8 threads x 5 batches of 20 rows over 400 stored rows: odd threads write newer events
    (all written), even ones older (half stale: the stored half of their rows). Checks each
    batch's counts, then what reads back (shared with the commit process's tests)."""
    store.write(batch(range(0, 800, 2), NOW, -1.0), now_us=NOW)
    results: dict[int, list] = {}

    def submitter(t: int) -> None:
        futures = []
        for i in range(5):
            ids = np.arange(t * 100 + i * 20, t * 100 + i * 20 + 20)
            event = NOW + 1 if t % 2 else NOW - 1
            futures.append(committer.submit(store.prepare(batch(ids, event, t), now_us=NOW)))
        results[t] = [f.result(timeout=60) for f in futures]

    threads = [threading.Thread(target=submitter, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for t in range(8):
        expected = (20, 0) if t % 2 else (10, 10)
        assert [(r.written, r.stale) for r in results[t]] == [expected] * 5
    read = store.read("score", {"user_id": np.arange(800)}).blocks[0].values[:, 0]
    owner = np.arange(800) // 100
    expected = np.where((owner % 2 == 1) | (np.arange(800) % 2 == 1), owner, -1)
    assert read.tolist() == expected.tolist()


def test_concurrent_submitters_get_their_own_counts(tmp_path: Path):
    with OnlineStore(StoreConfig(tmp_path / "db")) as store:
        store.registry.apply([USER], [SCORE])
        committer = GroupCommitter(store, max_delay_s=0.005)
        try:
            submit_concurrently(store, committer)
        finally:
            committer.close()
        assert 1 <= committer.commits < 40


def test_failure_resolves_only_the_bad_batch(tmp_path: Path):
    with OnlineStore(StoreConfig(tmp_path / "db")) as store:
        store.registry.apply([USER], [SCORE, FeatureView("gone", "user", SCORE.features)])
        good = store.prepare(batch([1], NOW, 1.0), now_us=NOW)
        doomed = store.prepare(
            WriteBatch("gone", {"user_id": np.array([1])}, np.array([NOW]), {"score": np.ones(1)}),
            now_us=NOW,
        )
        broken = PreparedBatch(doomed.view, [b""], doomed.rows, doomed.event_us, b"", 0, [])
        committer = GroupCommitter(store, max_delay_s=0.05)
        futures = [committer.submit(good), committer.submit(broken)]
        committer.close()
        assert futures[0].result().written == 1
        assert futures[1].exception() is not None
        with pytest.raises(UnavailableError):
            committer.submit(good)
        with pytest.raises(NotFoundError):
            store.prepare(WriteBatch("nope", {}, np.zeros(0, np.int64), {}))


def test_after_a_large_commit_the_next_one_lingers_for_more_rows(tmp_path: Path):
    with OnlineStore(StoreConfig(tmp_path / "db")) as store:
        store.registry.apply([USER], [SCORE])
        committer = GroupCommitter(
            store, linger_fraction=1000.0, linger_min_rows=1000, linger_max_s=1.0
        )
        large = committer.submit(store.prepare(batch(range(1000), NOW, 1.0), now_us=NOW))
        large.result(timeout=30)
        first = committer.submit(store.prepare(batch([5000], NOW, 2.0), now_us=NOW))
        threading.Event().wait(0.05)
        second = committer.submit(store.prepare(batch([5001], NOW, 3.0), now_us=NOW))
        assert (first.result(timeout=30).written, second.result(timeout=30).written) == (1, 1)
        assert committer.commits == 2
        committer.close()


def test_a_lone_write_after_small_commits_does_not_linger(tmp_path: Path):
    """A large commit sets a 30 s linger; the small commits after it must clear it, so a lone
    write then commits at once. Ordering, not timing, drives the commits: the batch after the
    large commit stops lingering as soon as a second one fills max_batch_rows. A linger that
    survived would hold the lone write for 30 s, far past the 10 s wait below."""
    linger_s = 30.0
    with OnlineStore(StoreConfig(tmp_path / "db")) as store:
        store.registry.apply([USER], [SCORE])
        committer = GroupCommitter(
            store,
            max_batch_rows=1000,
            linger_fraction=1e9,
            linger_min_rows=1000,
            linger_max_s=linger_s,
        )
        try:
            large = committer.submit(store.prepare(batch(range(1000), NOW, 1.0), now_us=NOW))
            assert large.result(timeout=linger_s / 3).written == 1000
            small = [
                committer.submit(store.prepare(batch(range(lo, lo + 600), NOW, 2.0), now_us=NOW))
                for lo in (1000, 2000)
            ]
            assert [f.result(timeout=linger_s / 3).written for f in small] == [600, 600]
            lone = committer.submit(store.prepare(batch([5000], NOW, 3.0), now_us=NOW))
            assert lone.result(timeout=linger_s / 3).written == 1
            assert committer.commits == 4
        finally:
            committer.close()


def test_a_batch_checked_before_its_view_version_was_re_created_fails_alone(tmp_path: Path):
    """stale is encoded for score v1 (FLOAT32), which is then deleted and created again with
    score as STRING. max_batch_rows (5, the three batches' rows) and a long max_delay_s put the
    three batches in one commit: stale fails, the others are written."""
    with OnlineStore(StoreConfig(tmp_path / "db")) as store:
        store.registry.apply([USER], [SCORE, FeatureView("other", "user", SCORE.features)])
        stale = store.prepare(batch([1, 2], NOW, 1.0), now_us=NOW)
        store.registry.delete_view("score", 1)
        store.registry.apply([], [FeatureView("score", "user", (Feature("score", DType.STRING),))])
        fresh = WriteBatch(
            "score",
            {"user_id": np.array([2, 3])},
            np.full(2, NOW),
            {"score": np.array(["b", "c"], dtype=object)},
        )
        other = batch([1], NOW, 4.0)
        other.view = "other"
        prepared = [stale, store.prepare(fresh, now_us=NOW), store.prepare(other, now_us=NOW)]
        committer = GroupCommitter(store, max_batch_rows=5, max_delay_s=60.0)
        try:
            futures = [committer.submit(b) for b in prepared]
            error = futures[0].exception(timeout=60)
            assert isinstance(error, ConflictError) and "deleted and re-created" in str(error)
            assert [f.result(timeout=60).written for f in futures[1:]] == [2, 1]
            assert committer.commits == 1
        finally:
            committer.close()
        read = store.read("score", {"user_id": np.array([1, 2, 3])}, now_us=NOW)
        assert read.blocks[0].values[:, 0].tolist() == ["", "b", "c"]
        assert read.row_status.tolist() == [2, 1, 1]
