"""Stop signals noted before anything else is imported: `serve` installs them first, so a
SIGTERM or Ctrl-C while the server still imports or starts is a clean stop (standard library
only, to keep that window short)."""

from __future__ import annotations

import signal


class StopSignals:
    """SIGTERM and SIGINT noted, not acted on: `requested` turns true. Installed as the first
    thing `serve` does, so a stop asked for while the server still imports or starts is a clean
    stop once it can be one. The handler only assigns a flag: one that took a lock (Event.set)
    could deadlock the main thread it interrupts while that thread holds the lock."""

    def __init__(self) -> None:
        self.requested = False

    def install(self) -> StopSignals:
        """Route SIGTERM and SIGINT to this flag (call from the main thread); returns self."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._note)
        return self

    def _note(self, signum: int, frame: object) -> None:
        self.requested = True
