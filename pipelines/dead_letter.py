"""The dead-letter file: malformed and too-late events, one JSON line each with its reason.

Flink's Python workers append batches with one O_APPEND write each, so several workers and
runs can share the file; each entry carries its run's id and a run's counts are read back from
the file itself, so nothing is counted twice, lost, or taken from another run. The parse
checker stages its entries in a temporary file and appends them in batches of whole lines.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

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
        lines = [
            self._line(reason, {n: _plain(col[i]) for n, col in zip(names, columns, strict=True)})
            for i, reason in enumerate(reasons)
        ]
        if lines:
            _append(self.path, [b"".join(lines)])
        self.count += len(lines)
        return len(lines)

    def staged(self) -> StagedDeadLetters:
        """An empty stage whose entries reach this file only when committed."""
        return StagedDeadLetters(self)

    def _line(self, reason: str, event: Mapping[str, object]) -> bytes:
        head = {} if self.run is None else {"run": self.run}
        return (json.dumps({**head, "reason": str(reason), "event": event}) + "\n").encode()


class StageError(OSError):
    """Staged dead letters could not be written (the folder is gone, the disk is full): told
    apart from the errors of the input being scanned."""


class StagedDeadLetters:
    """Entries held in an unnamed temporary file beside the dead-letter file until commit()
    appends them to it, so memory stays bounded however many there are, and entries never
    committed (a failed scan, a killed driver) leave nothing behind. Not /tmp: it may be RAM."""

    def __init__(self, writer: DeadLetterWriter) -> None:
        self.writer, self.rows = writer, 0
        self._file: BinaryIO | None = None  # created by the first entry

    def add(self, reason: str, event: Mapping[str, object]) -> None:
        """Stage one entry, its event's values plain JSON ones (str, int, float, None)."""
        folder = self.writer.path.parent
        try:
            if self._file is None:
                self._file = tempfile.TemporaryFile(  # noqa: SIM115 (closed by close())
                    dir=folder, prefix=".dead-letters-"
                )
            self._file.write(self.writer._line(reason, event))
        except OSError as exc:
            raise StageError(exc.errno, f"staging dead letters in {folder}: {exc}") from exc
        self.rows += 1

    def mark(self) -> tuple[int, int]:
        """Where the stage ends now, for rollback()."""
        return (0 if self._file is None else self._file.tell()), self.rows

    def rollback(self, mark: tuple[int, int]) -> None:
        """Drop the entries staged since mark() returned `mark`."""
        size, self.rows = mark
        if self._file is not None:
            self._file.truncate(size)
            self._file.seek(size)

    def commit(self) -> int:
        """Append the staged entries, in order, to the dead-letter file, then empty the stage;
        returns rows. Each append is one O_APPEND write of whole lines (about _BATCH bytes, or
        one longer line), so other writers' lines may fall between batches, never in a line."""
        rows = self.rows
        if self._file is not None and rows:
            self._file.seek(0)
            _append(self.writer.path, _line_batches(self._file))
            self.writer.count += rows
        self.rollback((0, 0))
        return rows

    def close(self) -> None:
        """Drop the stage and whatever it holds uncommitted."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self.rows = 0

    def __enter__(self) -> StagedDeadLetters:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_BATCH = 4 << 20


def _line_batches(f: BinaryIO) -> Iterator[memoryview]:
    """The LF-ended lines of f from its position on, in pieces of about _BATCH bytes."""
    carry = b""
    while chunk := f.read(_BATCH):
        data = carry + chunk
        end = data.rfind(b"\n") + 1
        if end:
            yield memoryview(data)[:end]
        carry = data[end:]


def _append(path: Path, pieces: Iterable[bytes | memoryview]) -> None:
    """Append each piece to path with one O_APPEND write (looping only on a short write)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        for piece in pieces:
            view = memoryview(piece)
            while view:
                view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


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
