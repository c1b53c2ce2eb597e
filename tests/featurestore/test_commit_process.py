"""The commit process: batches are committed durably by a child process, each answered with its
own counts; a dead child fails only what it had not answered and is replaced."""

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from featurestore.commit_process import CommitProcess, _Received, _Unpacker
from featurestore.dtypes import DType
from featurestore.errors import ConflictError, NotFoundError, UnavailableError
from featurestore.history import pack_batch, read_log
from featurestore.online_store import OnlineStore, PreparedBatch, StoreConfig, WriteBatch
from featurestore.registry import Entity, Feature, FeatureView, JoinKey
from tests.featurestore.test_group_commit import submit_concurrently

NOW = 1_800_000_000_000_000
USER = Entity("user", (JoinKey("user_id", DType.INT64),))
SCORE = FeatureView("score", "user", (Feature("score", DType.FLOAT32),))


def batch(ids, event, value, skip_bad_rows: bool = False) -> WriteBatch:
    ids = np.asarray(ids, np.int64)
    return WriteBatch(
        "score",
        {"user_id": ids},
        np.full(len(ids), event, np.int64),
        {"score": np.full(len(ids), value, np.float32)},
        skip_bad_rows=skip_bad_rows,
    )


def scores(store: OnlineStore, ids) -> list[float]:
    return store.read("score", {"user_id": np.asarray(ids)}).blocks[0].values[:, 0].tolist()


@pytest.fixture
def store(tmp_path: Path):
    with OnlineStore(StoreConfig(tmp_path / "db")) as store:
        store.registry.apply([USER], [SCORE])
        yield store


def test_concurrent_batches_get_their_own_counts_and_are_readable(store: OnlineStore):
    committer = CommitProcess(store.config)
    try:
        submit_concurrently(store, committer)
    finally:
        committer.close()
    assert len(read_log(store, "score").keys) == 400 + 8 * 100


def test_rejected_rows_are_reported_and_an_empty_batch_needs_no_child(store: OnlineStore):
    committer = CommitProcess(store.config)
    try:
        empty = committer.submit(store.prepare(batch([], NOW, 1.0), now_us=NOW)).result(5)
        assert (empty.written, empty.stale, empty.rejected) == (0, 0, 0)
        assert committer.pid is None
        late = batch([1, 2, 3], NOW, 1.0, skip_bad_rows=True)
        late.event_us[1] = NOW + 3_600_000_000
        result = committer.submit(store.prepare(late, now_us=NOW)).result(60)
        assert (result.written, result.rejected) == (2, 1)
        assert [(e.row, e.column) for e in result.errors] == [(1, "event_us")]
        assert committer.pid is not None
    finally:
        committer.close()
    assert scores(store, [1, 3]) == [1.0, 1.0]


def test_a_failing_batch_fails_alone(store: OnlineStore):
    committer = CommitProcess(store.config)
    good = store.prepare(batch([1], NOW, 1.0), now_us=NOW)
    doomed = store.prepare(batch([2], NOW, 2.0), now_us=NOW)
    broken = PreparedBatch(
        doomed.view, [b""], doomed.rows, doomed.event_us, pack_batch([b""], doomed.rows), 0, []
    )
    try:
        futures = [committer.submit(good), committer.submit(broken)]
        assert futures[0].result(60).written == 1
        assert futures[1].exception(60) is not None
    finally:
        committer.close()
    with pytest.raises(UnavailableError, match="closed"):
        committer.submit(good)


def test_a_killed_child_fails_what_it_had_not_committed_and_is_replaced(store: OnlineStore):
    """The test holds LMDB's write lock, so the child cannot commit the batch before it is
    killed; the next batch starts a new child."""
    committer = CommitProcess(store.config)
    try:
        assert (
            committer.submit(store.prepare(batch([1], NOW, 1.0), now_us=NOW)).result(60).written
            == 1
        )
        first = committer.pid
        blocker = store._lmdb.env.begin(write=True)
        stuck = committer.submit(store.prepare(batch([2], NOW, 2.0), now_us=NOW))
        os.kill(first, signal.SIGKILL)
        error = stuck.exception(60)
        blocker.abort()
        assert isinstance(error, UnavailableError)
        assert "exit code -9" in str(error) and "resend" in str(error)
        again = committer.submit(store.prepare(batch([2], NOW, 3.0), now_us=NOW)).result(60)
        assert again.written == 1
        assert committer.pid not in (None, first)
    finally:
        committer.close()
    assert scores(store, [1, 2]) == [1.0, 3.0]


def test_close_commits_everything_already_sent(store: OnlineStore):
    committer = CommitProcess(store.config)
    futures = [
        committer.submit(store.prepare(batch(range(i * 50, i * 50 + 50), NOW, i), now_us=NOW))
        for i in range(20)
    ]
    child = committer.pid
    committer.close()
    assert [f.result(0).written for f in futures] == [50] * 20
    assert scores(store, [0, 999]) == [0.0, 19.0]
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)


def test_batches_are_unpacked_only_while_a_commit_is_being_written():
    keys = [i.to_bytes(8, "big") for i in range(1000)]
    rows = [bytes([i % 256]) * (i % 40) for i in range(1000)]
    history = pack_batch(keys, rows)
    batches = [
        _Received("score", 1, NOW, 1000, np.zeros(1000, np.int64), history) for _ in range(3)
    ]
    unpacker = _Unpacker()
    try:
        for received in batches:
            unpacker.add(received)
        time.sleep(0.05)
        assert [received.unpacked for received in batches] == [None] * 3
        with unpacker:
            deadline = time.monotonic() + 5
            while any(b.unpacked is None for b in batches) and time.monotonic() < deadline:
                time.sleep(0.001)
        assert [received.unpacked for received in batches] == [(keys, rows)] * 3
    finally:
        unpacker.close()


def test_a_batch_held_while_its_view_version_is_re_created_fails_and_new_rows_read_back(
    store: OnlineStore,
):
    """The server checked and encoded `stale` against score v1 (FLOAT32) and sent it; v1 is
    deleted and created again with score as STRING before the child commits it (SIGSTOP holds
    the child). The child fails stale, writes the batch checked against the new definition,
    and a batch for a version deleted meanwhile creates nothing."""
    store.registry.apply([], [FeatureView("gone", "user", SCORE.features)])
    committer = CommitProcess(store.config)
    try:
        assert committer.submit(store.prepare(batch([1], NOW, 1.0), now_us=NOW)).result(60).written
        child = committer.pid
        os.kill(child, signal.SIGSTOP)
        try:
            stale = committer.submit(store.prepare(batch([2, 3], NOW, 2.0), now_us=NOW))
            gone = batch([1], NOW, 1.0)
            gone.view = "gone"
            orphan = committer.submit(store.prepare(gone, now_us=NOW))
            store.registry.delete_view("score", 1)
            store.registry.delete_view("gone", 1)
            store.registry.apply(
                [], [FeatureView("score", "user", (Feature("score", DType.STRING),))]
            )
            text = {"score": np.array(["c", "d"], dtype=object)}
            fresh = WriteBatch("score", {"user_id": np.array([3, 4])}, np.full(2, NOW), text)
            written = committer.submit(store.prepare(fresh, now_us=NOW))
        finally:
            os.kill(child, signal.SIGCONT)
        error = stale.exception(60)
        assert isinstance(error, ConflictError)
        assert "'score' v1 was deleted and re-created since this batch was checked" in str(error)
        assert isinstance(orphan.exception(60), NotFoundError)
        assert written.result(60).written == 2
        assert committer.pid == child
    finally:
        committer.close()
    read = store.read("score", {"user_id": np.array([1, 2, 3, 4])}, now_us=NOW)
    assert read.blocks[0].values[:, 0].tolist() == ["", "", "c", "d"]
    assert read.row_status.tolist() == [2, 2, 1, 1]
    with store._lmdb.env.begin() as txn:
        assert (txn.get(b"v:gone@1"), txn.get(b"h:gone@1")) == (None, None)
