"""A failed LMDB commit becomes an error the caller can act on: a full disk or a failing one."""

from __future__ import annotations

from pathlib import Path

import lmdb

from featurestore.disk_errors import (
    FULL_BELOW_BYTES,
    commit_failure,
    free_bytes,
    is_file_system_error,
)
from featurestore.errors import (
    ResourceExhaustedError,
    StorageFailedError,
    StorageFullError,
    UnavailableError,
)

EIO = lmdb.Error("mdb_txn_commit: Input/output error")


def test_a_commit_failing_with_little_space_left_is_a_full_disk(tmp_path: Path) -> None:
    """LMDB reports a full file system as EIO (a short write): the free space tells."""
    error = commit_failure(tmp_path, EIO, free=FULL_BELOW_BYTES - 1)
    assert isinstance(error, StorageFullError) and isinstance(error, ResourceExhaustedError)
    text = str(error)
    assert str(tmp_path) in text and "is full" in text and "free space there" in text
    assert "Input/output error" in text and "resending it is safe" in text


def test_a_commit_failing_with_room_left_is_a_failing_disk(tmp_path: Path) -> None:
    error = commit_failure(tmp_path, EIO, free=FULL_BELOW_BYTES)
    assert isinstance(error, StorageFailedError) and isinstance(error, UnavailableError)
    assert str(tmp_path) in str(error) and "check the disk" in str(error)


def test_free_space_is_measured_on_the_data_dirs_file_system(tmp_path: Path) -> None:
    assert free_bytes(tmp_path) > 0
    measured = commit_failure(tmp_path, EIO)
    assert isinstance(measured, (StorageFullError, StorageFailedError))


def test_only_errno_failures_count_as_the_file_systems() -> None:
    """LMDB's own conditions (map full, bad value size, corruption) stay what they are."""
    assert is_file_system_error(EIO) and is_file_system_error(lmdb.DiskError("x"))
    for own in (lmdb.MapFullError, lmdb.BadValsizeError, lmdb.CorruptedError, lmdb.PanicError):
        assert not is_file_system_error(own("x"))
