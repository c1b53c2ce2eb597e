"""The dead-letter file: malformed and too-late events, one JSON line each with its reason.

Flink's Python workers append batches with one O_APPEND write each, so several workers and
runs can share the file; each entry carries its run's id and a run's counts are read back from
the file itself, so nothing is counted twice, lost, or taken from another run.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np


def _plain(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and value != value:
        return None
    return value


class DeadLetterWriter:
    """Appends rejected events with their reason (and the run's id, when given) to a JSON-lines
    file."""

    def __init__(self, path: Path | str, run: str | None = None) -> None:
        self.path, self.run = Path(path), run
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.count = 0

    def write(self, reasons: Sequence[str], records: Mapping[str, Sequence[object]]) -> int:
        """Append one line per reason: {"run": ..., "reason": ..., "event": {column: value}};
        returns rows."""
        names = list(records)
        columns = [list(records[n]) for n in names]
        head = {} if self.run is None else {"run": self.run}
        lines = []
        for i, reason in enumerate(reasons):
            event = {n: _plain(col[i]) for n, col in zip(names, columns, strict=True)}
            lines.append(json.dumps({**head, "reason": str(reason), "event": event}) + "\n")
        if lines:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, "".join(lines).encode())
            finally:
                os.close(fd)
        self.count += len(lines)
        return len(lines)


def dead_letter_size(path: Path | str) -> int:
    """The file's size in bytes now (0 when absent): where this run's entries will start."""
    p = Path(path)
    return p.stat().st_size if p.exists() else 0


def read_dead_letters(path: Path | str, start: int = 0) -> list[dict]:
    """Every entry of a dead-letter file from byte `start` on (empty when the file is absent)."""
    p = Path(path)
    if not p.exists():
        return []
    with p.open("rb") as f:
        f.seek(start)
        text = f.read().decode()
    return [json.loads(line) for line in text.splitlines() if line]


def count_by_reason(path: Path | str, start: int = 0, run: str | None = None) -> dict[str, int]:
    """Dead letters per reason kind (the text before the first ':'), from byte `start` on; with
    `run`, only that run's (other runs may append to the same file meanwhile)."""
    entries = read_dead_letters(path, start)
    if run is not None:
        entries = [e for e in entries if e.get("run") == run]
    return dict(Counter(e["reason"].split(":", 1)[0] for e in entries))
