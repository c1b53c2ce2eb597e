"""Hot backup of the store: one read transaction's snapshot of the LMDB environment (registry,
online rows, history) written to a new directory while servers keep writing.

LMDB copies from a read transaction (mdb_env_copy2), so the copy holds every write committed
before the snapshot and none after, and writers go on meanwhile. The copy is written under a
temporary name and renamed once synced, so a crash never leaves a file that looks complete.
A backup holds an exclusive lock on DEST while it writes there, so two never share a DEST.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import lmdb

from featurestore.disk_errors import free_bytes
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
LOCK_FILE = "backup.lock"
"""Locked (flock) by the backup writing into DEST, and removed by it when it ends."""
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
"""The errors of a write that found no room: the file system is full, or the user's quota."""


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

    dest must be a new or empty directory outside data_dir that no other backup is writing to
    (InvalidArgumentError otherwise, as for a data_dir holding no store). compact omits free
    pages (slower, a smaller file). An exception raised in this thread while it copies (Ctrl-C's
    KeyboardInterrupt) stops the copy and removes what the backup wrote.
    """
    start = time.monotonic()
    source = _checked_source(Path(data_dir))
    dest = Path(dest)
    _check_destination(source, dest)
    env = _open_source(source)
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


def _open_source(source: Path) -> LmdbEnv | lmdb.Environment:
    """The store's environment. It is first opened read-only without LMDB's lock file, so a
    data.mdb that is not an LMDB file is refused before a lock.mdb is made beside it. A data
    dir this process cannot write to (a read-only file system, such as a mounted snapshot)
    stays opened that way: safe only while no process writes to the store."""
    writable = os.access(source, os.W_OK)
    unlocked = "" if writable else (
        " (the data dir is not writable, so the backup opened the store read-only without "
        "LMDB's lock file, which is safe only while no process writes there)"
    )  # fmt: skip
    try:
        frozen = lmdb.open(str(source), readonly=True, lock=False, max_dbs=1)
    except (lmdb.InvalidError, lmdb.VersionMismatchError) as exc:
        raise InvalidArgumentError(
            f"data dir {source} holds a {DATA_FILE} that is not a featureserve store ({exc}); "
            "point --data-dir (data_dir) at the store to back up"
        ) from None
    except lmdb.Error as exc:
        raise UnavailableError(
            f"LMDB cannot open the store in data dir {source} ({exc}){unlocked}; point "
            "--data-dir (data_dir) at a featureserve store"
        ) from None
    if not writable:
        return frozen
    frozen.close()
    try:
        return LmdbEnv(StoreConfig(source))
    except lmdb.Error as exc:
        raise UnavailableError(
            f"LMDB cannot open the store in data dir {source} ({exc}); point --data-dir "
            "(data_dir) at a featureserve store"
        ) from None


def _check_destination(source: Path, dest: Path) -> None:
    """InvalidArgumentError unless dest is, or can be made, a new or empty directory outside
    source. Inside is judged by device and inode, so a bind mount of source is inside too."""
    where = f"backup destination DEST {dest}"
    existing = next(path for path in (dest, *dest.parents) if os.path.lexists(path))
    if not existing.is_dir():
        dangling = existing.is_symlink() and not existing.exists()
        what = "a symbolic link to nothing" if dangling else "not a directory"
        if existing != dest:
            where += f" is under {existing}, which"
        raise InvalidArgumentError(f"{where} is {what}; give a new or empty directory")
    resolved = existing.resolve()
    source_id = _file_id(source)
    for path in (resolved, *resolved.parents):
        if _file_id(path) == source_id:
            state = "the" if existing == dest and path == resolved else "inside the"
            raise InvalidArgumentError(
                f"{where} is {state} data dir {source}; give a directory outside it (a copy "
                "there is lost with the store's disk and directory)"
            )
    if existing == dest:
        names = [entry.name for entry in os.scandir(dest)]
        if LOCK_FILE not in names:  # else the lock tells a running backup from a dead one
            _check_empty(dest, names)


def _file_id(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_dev, stat.st_ino


def _check_empty(dest: Path, names: list[str]) -> None:
    """InvalidArgumentError when dest holds anything besides a backup's lock file."""
    names = sorted(name for name in names if name != LOCK_FILE)
    if not names:
        return
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    partial = (
        f"; {PARTIAL_FILE} is what an interrupted backup leaves: delete it"
        if PARTIAL_FILE in names
        else ""
    )
    raise InvalidArgumentError(
        f"backup destination DEST {dest} is not empty (it holds {shown}); give a new or empty "
        f"directory, a backup never overwrites files{partial}"
    )


def _write_copy(
    env: LmdbEnv | lmdb.Environment, dest: Path, compact: bool, mode: int
) -> tuple[int, int]:
    """Make dest, lock it, write the snapshot to dest/PARTIAL_FILE (permissions: mode), sync
    it, check it opens, rename it to dest/DATA_FILE and sync dest; (snapshot transaction id,
    bytes). A failure removes the partial copy, the lock file and the directories it made."""
    partial = dest / PARTIAL_FILE
    made: list[Path] = []
    lock = None
    created = False
    try:
        _make_dirs(dest, made)
        lock = _lock(dest)
        _check_empty(dest, os.listdir(dest))
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        created = True
        try:
            snapshot = _copy_in_thread(env, fd, compact)
            os.fsync(fd)
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        copied = _last_txn_id(partial)
        os.rename(partial, dest / DATA_FILE)  # no other backup renames here: we hold the lock
        created = False
        os.unlink(dest / LOCK_FILE)
        _fsync_dir(dest)
    except BaseException as exc:
        error = _write_failure(dest, exc) if isinstance(exc, OSError | lmdb.Error) else None
        if created:
            partial.unlink(missing_ok=True)
        if lock is not None:
            (dest / LOCK_FILE).unlink(missing_ok=True)
        for path in reversed(made):
            with contextlib.suppress(OSError):  # not empty: something else was put there
                path.rmdir()
        if error is None:
            raise
        raise error from None
    finally:
        if lock is not None:
            os.close(lock)
    return (copied if snapshot is None else snapshot), size


def _lock(dest: Path) -> int:
    """An fd of dest/LOCK_FILE holding its exclusive flock; InvalidArgumentError when another
    backup holds it. The holder removes the file as it ends, so a lock taken on a file removed
    meanwhile is refused too (it locks nothing the next backup would see)."""
    path = dest / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held = os.path.samestat(os.fstat(fd), os.stat(path))
    except (BlockingIOError, FileNotFoundError):
        held = False
    except BaseException:
        os.close(fd)
        raise
    if not held:
        os.close(fd)
        raise InvalidArgumentError(
            f"a backup is already running into DEST {dest}; wait for it to end or give another DEST"
        )
    return fd


def _copy_in_thread(env: LmdbEnv | lmdb.Environment, fd: int, compact: bool) -> int | None:
    """_copy in a thread that blocks SIGINT and SIGTERM, leaving this thread free to take them:
    an exception raised here meanwhile (a signal handler's) makes the copy's next write to fd
    fail, waits for the copy to end its read transaction, and propagates."""
    outcome: list = []

    def run() -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            outcome.append(_copy(env, fd, compact))
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, name="backup copy")
    thread.start()
    try:
        while thread.is_alive():  # a timed wait: a signal another thread took wakes it too
            thread.join(0.1)
    except BaseException:
        _refuse_writes(fd)
        while thread.is_alive():  # a second signal must not leave the copy running
            with contextlib.suppress(BaseException):
                thread.join()
        raise
    (result,) = outcome
    if isinstance(result, BaseException):
        raise result
    return result


def _refuse_writes(fd: int) -> None:
    """Make fd a read-only descriptor of /dev/null: the copy writing to it fails (EBADF) at its
    next write, and fd's number is never another file's meanwhile."""
    null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.dup2(null, fd, inheritable=False)
    finally:
        os.close(null)


def _copy(env: LmdbEnv | lmdb.Environment, fd: int, compact: bool) -> int | None:
    """Write one read transaction's snapshot of the environment to fd; its transaction id when
    compact (LMDB numbers a compact copy's transactions from 1 again), else None: py-lmdb takes
    the snapshot itself for a plain copy (it accepts a transaction only with compact), and the
    copy keeps the id. A read-only environment (lmdb.Environment) has no writer to grow it."""
    if isinstance(env, lmdb.Environment):
        return _copy_once(env, fd, compact)
    while True:
        try:
            with env.gate.shared():
                return _copy_once(env.env, fd, compact)
        except lmdb.MapResizedError:  # another process grew the map: adopt its size, redo
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            env.grow(0)


def _copy_once(env: lmdb.Environment, fd: int, compact: bool) -> int | None:
    if compact:
        with env.begin() as txn:
            env.copyfd(fd, compact=True, txn=txn)
            return txn.id()
    env.copyfd(fd)
    return None


def _last_txn_id(path: Path) -> int:
    """The last transaction committed in a copied data file, read back by opening it."""
    env = lmdb.open(str(path), subdir=False, readonly=True, lock=False)
    try:
        return env.info()["last_txnid"]
    finally:
        env.close()


def _make_dirs(dest: Path, made: list[Path]) -> None:
    """Create dest and its missing parents, each synced into its parent directory; made gets
    each as it is created (outermost first), so a failure midway can remove them."""
    for path in reversed([path for path in (dest, *dest.parents) if not path.exists()]):
        try:
            path.mkdir()
        except FileExistsError:  # made meanwhile, or by an earlier step of a DEST with ".."
            continue
        made.append(path)
        _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_failure(dest: Path, exc: OSError | lmdb.Error) -> FeatureStoreError:
    """The error for a backup that failed writing to dest: a full file system or quota
    (ENOSPC, EDQUOT) or another failure."""
    if not _no_space(exc):
        return StorageFailedError(
            f"writing the backup to DEST {dest} failed ({exc}); fix that or give another DEST, "
            "then run it again; the partial copy was removed"
        )
    existing = next(path for path in (dest, *dest.parents) if path.exists())
    return StorageFullError(
        f"the file system of the backup destination DEST {dest} is full ({free_bytes(existing)} "
        f"bytes free; writing failed with: {exc}): free space there (or raise the quota) or "
        "give another DEST; the partial copy was removed"
    )


def _no_space(exc: OSError | lmdb.Error) -> bool:
    """Whether exc is ENOSPC or EDQUOT: an OSError's errno, or LMDB's error code (py-lmdb
    raises DiskError for ENOSPC, a plain Error with the system's text for EDQUOT)."""
    code = exc.errno if isinstance(exc, OSError) else getattr(exc, "code", None)
    return code in NO_SPACE or any(os.strerror(no) in str(exc) for no in NO_SPACE)
