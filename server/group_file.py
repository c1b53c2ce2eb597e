"""A JSON file shared by the workers of a `--workers` group, in the group's private folder.

Writes go to a temporary file renamed over the old one (a reader sees the old file or the new
one, never a torn one), read-modify-writes hold an flock of a lock file beside it, and a reader
follows changes with one stat: a replaced file has a new inode, so no change goes unseen for a
coarse modification time.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("featureserve.group_file")

FOLLOW_INTERVAL_S = 0.25
"""How often a Follower checks: a group-wide setting reaches every worker within this."""


def write_json(path: Path, value: Any) -> None:
    """Replace path with value as JSON, atomically: a reader sees the old file or the new."""
    staged = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    staged.write_text(json.dumps(value))
    os.replace(staged, path)


def read_json(path: Path) -> Any | None:
    """path's JSON value, or None when there is no such file."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


class GroupFile:
    """One shared JSON file (`<stem>.json`) and its lock (`<stem>.lock`) in a group folder."""

    def __init__(self, folder: Path, stem: str) -> None:
        self.path = folder / f"{stem}.json"
        self._lock_path = folder / f"{stem}.lock"
        self._seen: tuple[int, int, int] | None = None

    def read(self) -> Any | None:
        """The file's value, or None when there is none yet."""
        return read_json(self.path)

    def write(self, value: Any) -> None:
        """Replace the file's value (hold `locked()` around a read-modify-write)."""
        write_json(self.path, value)

    def changed(self) -> Any | None:
        """The file's value when it changed since the last call (or appeared); None when it did
        not, or does not exist."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        seen = (st.st_ino, st.st_mtime_ns, st.st_size)
        if seen == self._seen:
            return None
        value = self.read()
        self._seen = seen  # after the read: a read that failed is tried again
        return value

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the file's lock (held for a read and a small write: microseconds)."""
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


class Follower:
    """Runs `check` (a worker following a group file) every FOLLOW_INTERVAL_S on the event loop
    until stopped; a failing check is logged, never fatal."""

    def __init__(self, check: Callable[[], None], what: str) -> None:
        self._check = check
        self._what = what
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        """Start following (on the running event loop)."""
        self._task = asyncio.create_task(self._run(), name=f"{self._what} follower")

    async def stop(self) -> None:
        """Stop following."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(FOLLOW_INTERVAL_S)
            try:
                self._check()
            except Exception:
                log.exception("following the group's %s failed", self._what)
