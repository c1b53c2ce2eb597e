"""What a failed LMDB commit means for its caller: LMDB reports a file system that ran out of
room as a short write (EIO), so the free space left tells a full disk from a failing one."""

from __future__ import annotations

import os
from pathlib import Path

import lmdb

from featurestore.errors import FeatureStoreError, StorageFailedError, StorageFullError

FULL_BELOW_BYTES = 64 << 20
"""A commit that fails with less than this free on the file system is taken as a full disk."""

NOTHING_LOST = (
    "nothing of this write was stored and rows acknowledged before it are intact; "
    "resending it is safe (writes are idempotent)"
)


def is_file_system_error(exc: lmdb.Error) -> bool:
    """Whether LMDB failed on the file system (an errno such as EIO or ENOSPC, while writing
    pages at the commit or spilling them during a large transaction), not on its own terms."""
    return type(exc) in (lmdb.Error, lmdb.DiskError)


def free_bytes(path: Path) -> int:
    """Bytes the server's user may still write on the file system holding `path`."""
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def commit_failure(path: Path, exc: lmdb.Error, free: int | None = None) -> FeatureStoreError:
    """The error to answer for a commit that failed with `exc` in the environment at `path`;
    `free` is the file system's free space (measured now when not given)."""
    if free is None:
        free = free_bytes(path)
    if free < FULL_BELOW_BYTES:
        return StorageFullError(
            f"the file system of the data dir {path} is full ({free} bytes free; the commit "
            f"failed with: {exc}): free space there, then resend; {NOTHING_LOST}"
        )
    return StorageFailedError(
        f"the commit to the data dir {path} failed in its file system ({exc}; {free} bytes "
        f"free): check the disk and the server's log; {NOTHING_LOST}"
    )
