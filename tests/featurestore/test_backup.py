"""Hot backup: a copy of the LMDB environment from one read transaction that opens as a store
with the same registry, online rows and history; refusals name the argument and the fix."""

from __future__ import annotations

import dataclasses
import resource
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import lmdb
import numpy as np
import pytest

from featurestore.backup import PARTIAL_FILE, back_up
from featurestore.dtypes import DType, FeatureStatus
from featurestore.errors import InvalidArgumentError, StorageFailedError
from featurestore.history import history_rows, point_in_time, rebuild_online
from featurestore.online_store import DATA_FILE, OnlineStore, StoreConfig, WriteBatch
from featurestore.registry import Entity, Feature, FeatureView, JoinKey

NOW = 1_800_000_000_000_000
SEC = 1_000_000
USER = Entity("user", (JoinKey("user_id", DType.INT64),))
SPEND = FeatureView(
    "spend", "user", (Feature("amount", DType.FLOAT64), Feature("note", DType.STRING))
)
IDS = np.arange(50)


def write_spend(
    store: OnlineStore, event_us: int, amounts: np.ndarray, version: int = 0, ids=IDS
) -> None:
    notes = np.array([f"n{a:g}" for a in amounts], dtype=object)
    batch = WriteBatch(
        "spend",
        {"user_id": ids},
        np.full(len(ids), event_us),
        {"amount": amounts, "note": notes},
        version=version,
    )
    store.write(batch, now_us=NOW)


def last_txn_id(data_dir: Path) -> int:
    env = lmdb.open(str(data_dir), readonly=True, lock=False)
    try:
        return env.info()["last_txnid"]
    finally:
        env.close()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A store with two writes to spend v1 (the second newer for even users only)."""
    path = tmp_path / "data"
    with OnlineStore(StoreConfig(path)) as store:
        store.registry.apply([USER], [SPEND])
        write_spend(store, NOW - 10 * SEC, IDS * 1.0)
        amounts = np.where(IDS % 2 == 0, IDS + 100.0, IDS - 100.0)
        events = np.where(IDS % 2 == 0, NOW, NOW - 20 * SEC)
        notes = np.array([f"n{a:g}" for a in amounts], dtype=object)
        store.write(
            WriteBatch("spend", {"user_id": IDS}, events, {"amount": amounts, "note": notes}),
            now_us=NOW,
        )
    return path


@pytest.mark.parametrize("compact", [False, True])
def test_the_backup_opens_as_a_store_with_its_registry_rows_and_history(
    data_dir: Path, tmp_path: Path, compact: bool
) -> None:
    dest = tmp_path / "backups" / "today"
    done = back_up(data_dir, dest, compact)
    assert done.path == dest / DATA_FILE
    assert done.size_bytes == done.path.stat().st_size > 0
    assert done.txn_id == last_txn_id(data_dir)
    assert sorted(p.name for p in dest.iterdir()) == [DATA_FILE]
    keys = {"user_id": IDS}
    labels = np.full(len(IDS), NOW - 5 * SEC)
    with OnlineStore(StoreConfig(data_dir)) as source:
        want = source.read("spend", keys, now_us=NOW)
        want_history = history_rows(source, "spend")
        want_past = point_in_time(source, "spend", keys, labels)
        views = source.registry.list_views(all_versions=True)
    with OnlineStore(StoreConfig(dest)) as restored:
        warmed = restored.warm_page_cache()
        assert warmed.complete and warmed.file_bytes == done.size_bytes
        assert restored.registry.list_views(all_versions=True) == views
        got = restored.read("spend", keys, now_us=NOW)
        assert got.row_status.tolist() == [FeatureStatus.PRESENT] * len(IDS)
        assert got.event_us.tolist() == want.event_us.tolist()
        for block, expected in zip(got.blocks, want.blocks, strict=True):
            assert block.values.tolist() == expected.values.tolist()
        history = history_rows(restored, "spend")
        assert history[0]["user_id"].tolist() == want_history[0]["user_id"].tolist()
        assert history[1].tolist() == want_history[1].tolist()
        past = point_in_time(restored, "spend", keys, labels)
        assert past.blocks[0].values.tolist() == want_past.blocks[0].values.tolist()
        assert past.blocks[0].values[:2, 0].tolist() == [0.0, 1.0]  # v at NOW - 10 s
        assert rebuild_online(restored, "spend") == 2 * len(IDS)
        again = restored.read("spend", keys, now_us=NOW)
        assert again.blocks[0].values.tolist() == want.blocks[0].values.tolist()
        write_spend(restored, NOW + SEC, IDS + 0.5)  # the restored store takes writes
        assert restored.read("spend", keys, now_us=NOW).blocks[0].values[0, 0] == 0.5


def test_a_compact_backup_leaves_out_the_pages_a_deleted_version_freed(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with OnlineStore(StoreConfig(data_dir)) as store:
        store.registry.apply([USER], [SPEND])
        store.registry.apply([], [dataclasses.replace(SPEND, version=2)])
        many = np.arange(5000)
        for step in range(4):
            write_spend(store, NOW - (10 - step) * SEC, many + step / 10, 1, many)
        write_spend(store, NOW, IDS * 2.0, 2)
        store.registry.delete_view("spend", 1)
    plain = back_up(data_dir, tmp_path / "plain")
    compact = back_up(data_dir, tmp_path / "compact", compact=True)
    assert compact.txn_id == plain.txn_id == last_txn_id(data_dir)
    assert compact.size_bytes < plain.size_bytes / 2
    with OnlineStore(StoreConfig(compact.path.parent)) as restored:
        assert [v.version for v in restored.registry.list_views(all_versions=True)] == [2]
        got = restored.read("spend", {"user_id": IDS}, now_us=NOW)
        assert got.blocks[0].values[:, 0].tolist() == (IDS * 2.0).tolist()


@pytest.mark.parametrize(
    ("dest", "message"),
    [
        ("data", r"backup destination DEST .*/data is the data dir .*; give a directory outside"),
        ("data/sub/dir", r"DEST .*/data/sub/dir is inside the data dir .*; give a directory"),
        ("full", r"DEST .*/full is not empty \(it holds a.txt\); give a new or empty directory"),
        ("file", r"DEST .*/file is not a directory; give a new or empty directory"),
        ("interrupted", rf"{PARTIAL_FILE} is what an interrupted backup leaves: delete it"),
        ("dangling", r"DEST .*/dangling is a symbolic link to nothing; give a new or empty"),
        ("file/sub", r"DEST .*/file/sub is under .*/file, which is not a directory; give a new"),
    ],
)
def test_a_destination_that_is_not_new_or_empty_or_is_in_the_data_dir_is_refused(
    data_dir: Path, tmp_path: Path, dest: str, message: str
) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "a.txt").write_text("keep me")
    (tmp_path / "file").write_text("keep me")
    (tmp_path / "interrupted").mkdir()
    (tmp_path / "interrupted" / PARTIAL_FILE).write_bytes(b"x")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(InvalidArgumentError, match=message):
        back_up(data_dir, tmp_path / dest)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("missing", r"data dir .*/missing does not exist; point --data-dir \(data_dir\) at"),
        ("empty", r"data dir .*/empty holds no featureserve store \(no data.mdb\); point"),
    ],
)
def test_a_data_dir_without_a_store_is_refused_and_left_alone(
    tmp_path: Path, source: str, message: str
) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidArgumentError, match=message):
        back_up(tmp_path / source, tmp_path / "dest")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


@contextmanager
def mounted(*args: str) -> Iterator[None]:
    """`mount *args` (its last argument the mount point) for the block. The tests run as root
    with CAP_SYS_ADMIN (.ci/run installs system packages, so CI is root too); a machine where
    mounting is refused fails the test, so the behaviour it checks is never silently untested."""
    done = subprocess.run(["mount", *args], capture_output=True, text=True)
    assert done.returncode == 0, f"mount {' '.join(args)} failed: {done.stderr.strip()}"
    try:
        yield
    finally:
        subprocess.run(["umount", args[-1]], check=True)


@contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """Writes past `limit` bytes of a file fail with EFBIG (RLIMIT_FSIZE, SIGXFSZ ignored): a
    real write failure that is not a full disk."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


@pytest.mark.parametrize("small_fs", [False, True])
def test_a_write_failure_that_is_not_a_full_disk_is_reported_as_such_and_cleaned_up(
    data_dir: Path, tmp_path: Path, small_fs: bool
) -> None:
    """EFBIG is a failed write, not a full file system, even on one with little room left
    (small_fs: a 16 MB tmpfs); the partial copy and the directories the backup made go."""
    root = tmp_path / "small"
    root.mkdir()
    dest = root / "made" / "by" / "backup"
    with (
        mounted("-t", "tmpfs", "-o", "size=16m", "tmpfs", str(root)) if small_fs else nullcontext()
    ):
        with file_size_limit(16 << 10), pytest.raises(StorageFailedError) as failed:
            back_up(data_dir, dest)
        assert list(root.iterdir()) == []
    assert str(failed.value).startswith(f"writing the backup to DEST {dest} failed (")
    assert "File too large" in str(failed.value)


def test_a_store_on_a_read_only_file_system_is_backed_up_without_a_lock_file(
    data_dir: Path, tmp_path: Path
) -> None:
    """A read-only mount (a file-system snapshot): LMDB cannot make lock.mdb there, so the
    store is opened read-only without it, safe as nothing writes to it."""
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    (data_dir / "lock.mdb").unlink()
    with mounted("--bind", "-o", "ro", str(data_dir), str(snapshot)):
        done = back_up(snapshot, tmp_path / "dest")
        assert sorted(p.name for p in snapshot.iterdir()) == [DATA_FILE]
    assert done.txn_id == last_txn_id(data_dir)
    with OnlineStore(StoreConfig(tmp_path / "dest")) as restored:
        assert restored.read("spend", {"user_id": IDS}, now_us=NOW).row_status.tolist() == (
            [FeatureStatus.PRESENT] * len(IDS)
        )


def test_a_dest_inside_the_data_dir_through_a_bind_mount_is_refused(
    data_dir: Path, tmp_path: Path
) -> None:
    alias = tmp_path / "alias"
    alias.mkdir()
    with mounted("--bind", str(data_dir), str(alias)):
        with pytest.raises(InvalidArgumentError, match=r"DEST .*/alias/in is inside the data"):
            back_up(data_dir, alias / "in")
        assert sorted(p.name for p in data_dir.iterdir()) == [DATA_FILE, "lock.mdb"]
