"""Scheduled history retention: every history_compaction_interval_seconds, the server runs
`featureserve compact-history --keep <history_retention_seconds>s` on its store in a child
process (in the server, the compaction's Python would take the GIL from the event loop), and
logs what it did."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("featureserve.retention")
STOP_WAIT_S = 10.0
"""How long stop() waits for a compaction it interrupted to end its write transaction."""


class HistoryRetention:
    """Compacts every view version's history to now minus retention_s, now and then every
    interval_s, until stopped; calls on_compacted after each compaction that succeeded (the
    server shows the views' new sizes)."""

    def __init__(
        self,
        data_dir: Path,
        retention_s: int,
        interval_s: float,
        on_compacted: Callable[[], None] | None = None,
    ) -> None:
        self.command = [
            sys.executable,
            "-m",
            "server.cli",
            "compact-history",
            "--data-dir",
            str(data_dir),
            "--keep",
            f"{retention_s}s",
        ]
        self.interval_s = interval_s
        self.on_compacted = on_compacted
        self.runs = 0
        """Compactions that ended with exit code 0."""
        self._child: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Begin the schedule (the first compaction starts at once)."""
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await self._compact_once()
            await asyncio.sleep(self.interval_s)

    async def _compact_once(self) -> None:
        """Run one compaction child and log its report (or its failure)."""
        try:
            self._child = await asyncio.create_subprocess_exec(
                *self.command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            log.warning("could not start the history compaction", extra={"error": str(exc)})
            return
        out, err = await self._child.communicate()
        code = self._child.returncode
        self._child = None
        if code == 0:
            self.runs += 1
            log.info("history compacted", extra={"report": out.decode().strip()})
            if self.on_compacted is not None:
                self.on_compacted()
        else:
            log.warning(
                "history compaction failed",
                extra={"exit_code": code, "error": err.decode(errors="replace").strip()},
            )

    async def stop(self) -> None:
        """End the schedule; a compaction under way stops after its current write transaction
        (SIGTERM: the log stays consistent), killed if it takes over STOP_WAIT_S."""
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        child, self._child = self._child, None
        if child is None or child.returncode is not None:
            return
        child.terminate()
        try:
            await asyncio.wait_for(child.wait(), STOP_WAIT_S)
        except TimeoutError:
            child.kill()
            await child.wait()
