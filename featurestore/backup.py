"""Hot backup of the store: one read transaction's snapshot of the LMDB environment (registry,
online rows, history) written to a new directory while servers keep writing.

LMDB copies from a read transaction (mdb_env_copy2), so the copy holds every write committed
before the snapshot and none after, and writers go on meanwhile. The copy is written under a
temporary name and renamed once synced, so a crash never leaves a file that looks complete.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import lmdb

from featurestore.disk_errors import FULL_BELOW_BYTES, free_bytes
from featurestore.errors import (
    FeatureStoreError,
    InvalidArgumentError,
    StorageFailedError,
    StorageFullError,
    UnavailableError,
)
from featurestore.online_store import DATA_FILE, LmdbEnv, StoreConfig

PARTIAL_FILE = DATA_FILE + ".partial"
"""The copy's name until it is complete and synced."""


@dataclass(frozen=True)
class Backup:
    """A finished backup: its data file, the last transaction committed in the snapshot, the
    bytes written and the seconds taken."""

    path: Path
    txn_id: int
    size_bytes: int
    seconds: float
    compact: bool


def back_up(data_dir: Path, dest: Path, compact: bool = False) -> Backup:
    """Copy the store in data_dir to dest/data.mdb as of one read transaction, while servers
    keep serving and writing; serving with dest as the data dir restores it.

    dest must be a new or empty directory outside data_dir (InvalidArgumentError otherwise, as
    for a data_dir holding no store). compact omits free pages (slower, a smaller file).
    """
    start = time.monotonic()
    source = _checked_source(Path(data_dir))
    dest = Path(dest)
    _check_destination(source, dest)
    try:
        env = LmdbEnv(StoreConfig(source))
    except lmdb.Error as exc:
        raise UnavailableError(
            f"LMDB cannot open the store in data dir {source} ({exc}); point --data-dir "
            "(data_dir) at a featureserve store"
        ) from None
    try:
        mode = (source / DATA_FILE).stat().st_mode & 0o777
        txn_id, size = _write_copy(env, dest, compact, mode)
    finally:
        env.close()
    return Backup(dest / DATA_FILE, txn_id, size, time.monotonic() - start, compact)


def _checked_source(data_dir: Path) -> Path:
    """data_dir resolved, or InvalidArgumentError when it holds no LMDB store."""
    fix = "point --data-dir (data_dir) at the store to back up"
    if not data_dir.is_dir():
        state = "is not a directory" if data_dir.exists() else "does not exist"
        raise InvalidArgumentError(f"data dir {data_dir} {state}; {fix}")
    if not (data_dir / DATA_FILE).is_file():
        raise InvalidArgumentError(
            f"data dir {data_dir} holds no featureserve store (no {DATA_FILE}); {fix}"
        )
    return data_dir.resolve()


def _check_destination(source: Path, dest: Path) -> None:
    """InvalidArgumentError unless dest is a new or empty directory outside source."""
    where = f"backup destination DEST {dest}"
    resolved = dest.resolve()
    if resolved == source or source in resolved.parents:
        raise InvalidArgumentError(
            f"{where} is {'the' if resolved == source else 'inside the'} data dir {source}; "
            "give a directory outside it (a copy there is lost with the store's disk and "
            "directory)"
        )
    if not dest.exists():
        return
    if not dest.is_dir():
        raise InvalidArgumentError(f"{where} is not a directory; give a new or empty directory")
    names = sorted(entry.name for entry in os.scandir(dest))
    if names:
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        partial = (
            f"; {PARTIAL_FILE} is what an interrupted backup leaves: delete it"
            if PARTIAL_FILE in names
            else ""
        )
        raise InvalidArgumentError(
            f"{where} is not empty (it holds {shown}); give a new or empty directory, a backup "
            f"never overwrites files{partial}"
        )


def _write_copy(env: LmdbEnv, dest: Path, compact: bool, mode: int) -> tuple[int, int]:
    """Write the snapshot to dest/PARTIAL_FILE (permissions: mode), sync it, check it opens,
    rename it to dest/DATA_FILE and sync dest; (snapshot transaction id, bytes). A failure
    removes the partial copy."""
    partial = dest / PARTIAL_FILE
    created = False
    try:
        _make_dirs(dest)
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        created = True
        try:
            snapshot = _copy(env, fd, compact)
            os.fsync(fd)
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        copied = _last_txn_id(partial)
        os.rename(partial, dest / DATA_FILE)
        _fsync_dir(dest)
    except BaseException as exc:
        error = _write_failure(dest, exc) if isinstance(exc, OSError | lmdb.Error) else None
        if created:
            partial.unlink(missing_ok=True)
        if error is None:
            raise
        raise error from None
    return (copied if snapshot is None else snapshot), size


def _copy(env: LmdbEnv, fd: int, compact: bool) -> int | None:
    """Write one read transaction's snapshot of the environment to fd; its transaction id when
    compact (LMDB numbers a compact copy's transactions from 1 again), else None: py-lmdb takes
    the snapshot itself for a plain copy (it accepts a transaction only with compact), and the
    copy keeps the id."""
    if compact:
        with env.read_txn() as txn:
            env.env.copyfd(fd, compact=True, txn=txn)
            return txn.id()
    while True:
        try:
            with env.gate.shared():
                env.env.copyfd(fd)
            return None
        except lmdb.MapResizedError:  # another process grew the map: adopt its size, redo
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            env.grow(0)


def _last_txn_id(path: Path) -> int:
    """The last transaction committed in a copied data file, read back by opening it."""
    env = lmdb.open(str(path), subdir=False, readonly=True, lock=False)
    try:
        return env.info()["last_txnid"]
    finally:
        env.close()


def _make_dirs(dest: Path) -> None:
    """Create dest and its missing parents, each synced into its parent directory."""
    missing = [path for path in (dest, *dest.parents) if not path.exists()]
    dest.mkdir(parents=True, exist_ok=True)
    for path in reversed(missing):
        _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_failure(dest: Path, exc: OSError | lmdb.Error) -> FeatureStoreError:
    """The error for a backup that failed writing to dest: a full file system (measured while
    the partial copy still takes its room) or another failure."""
    existing = next(path for path in (dest, *dest.parents) if path.exists())
    free = free_bytes(existing)
    if free < FULL_BELOW_BYTES:
        return StorageFullError(
            f"the file system of the backup destination DEST {dest} is full ({free} bytes "
            f"free; writing failed with: {exc}): free space there or give another DEST; "
            "the partial copy was removed"
        )
    return StorageFailedError(
        f"writing the backup to DEST {dest} failed ({exc}); fix that or give another DEST, then "
        "run it again; the partial copy was removed"
    )
