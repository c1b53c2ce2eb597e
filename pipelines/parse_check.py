"""Rows Flink's file readers drop without a trace, found in the driver by reproducing their
decisions, so each can be dead-lettered.

With `ignore-parse-errors` and every column a STRING, Flink drops only rows it cannot split.
CSV (Jackson's CSV reader, Flink 2.3 / jackson-dataformat-csv 2.20): a record with more
fields than declared (one extra field that is blank after trimming is allowed), text after a
closing quote (spaces and tabs are allowed), and a quote left open, which swallows the lines
up to the next quote (or the end of the file). Lines end at LF, CR or CR LF. After a dropped
record Jackson skips the rest of its line; an error while skipping (an unclosed or misused
quote there) fails the whole job, so such a file is refused up front, naming the line.
JSON (one value per LF-ended line): a line whose first value is not a strict JSON object
(NaN, a leading zero or '+', an invalid escape, over 1000 levels or a number over 1000
characters, an empty line) is dropped; text after the first value is ignored, control
characters inside strings are allowed. A top-level array emits its leading objects: one whose
first element is not an object (or that is empty) is dropped whole. The probe corpus in
tests/pipelines/test_parse_check.py pins these rules against a real job.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featurestore.errors import InvalidArgumentError
from pipelines.dead_letter import StageError

_BLOCK = 16 << 20  # files are read and scanned a block at a time: memory is a few blocks
_RAW_LIMIT = 1 << 20
_ROOM = 1 << 16  # free bytes before a block read ahead, for the line carried over to it
_QUOTE, _COMMA, _CR, _LF = 34, 44, 13, 10
_EOF = 1  # Jackson's "pending line feed" marker for the end of input
_JSON_DEPTH = 1000
_JSON_NUMBER = 1000
_JSON_WS = " \t\r\n"


@dataclass(frozen=True)
class Unparseable:
    """One input record Flink's reader drops: where it starts and ends, why, and its text."""

    path: Path
    line: int
    last_line: int
    reason: str
    raw: str


def input_files(folder: Path) -> list[Path]:
    """The files Flink's file source reads under folder: hidden ('.', '_') names skipped and
    symlinked folders followed (each real folder once, so a link loop ends)."""
    root = Path(folder)
    if root.is_file():
        return [root]
    found, visited = [], set()
    for top, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(top)
        if real in visited:
            dirs.clear()
            continue
        visited.add(real)
        dirs[:] = [d for d in dirs if d[0] not in "._"]
        found += [p for name in files if name[0] not in "._" and (p := Path(top, name)).is_file()]
    return sorted(found)


class FileChangedError(OSError):
    """The file changed while it was read: scan it again once it is complete."""


def scan_file(path: Path, fmt: str, columns: int) -> Iterator[Unparseable]:
    """Yields, in file order, every record of the file that Flink's `fmt` reader drops; raises
    InvalidArgumentError naming the line when the reader would fail the whole job on the file,
    FileChangedError when the file is shorter than its size when opened (read, not mapped: a
    truncation is not fatal). The file is read in blocks of _BLOCK bytes and its records are
    yielded as found, so memory does not grow with it (a JSON line longer than a block is held
    whole)."""
    path = Path(path)
    with path.open("rb") as f:
        reader = _Reader(f, _BLOCK)
        found = _scan_csv(reader, columns) if fmt == "csv" else _scan_json(reader)
        for line, last_line, reason, raw, fatal in found:
            if fatal:
                reader.check()  # a file truncated meanwhile is scanned again, not refused
                raise InvalidArgumentError(
                    f"input {path} line {line}: {reason}, which fails Flink's CSV reader (the "
                    "whole job); fix the quoting or remove the row, then rerun the job"
                )
            yield Unparseable(path, line, last_line, f"unparseable: {reason}", raw)


class _Reader:
    """The file read in blocks up to its size when opened: buf holds its bytes from offset base
    on. The next block is read (ahead, after _ROOM free bytes) before buf is scanned, so a file
    of up to two blocks is read at once: truncating it during its scan changes nothing, as when
    files were read whole."""

    def __init__(self, f, block: int) -> None:
        self.f, self.block = f, block
        self.size = self.left = os.fstat(f.fileno()).st_size
        self.buf, self.base, self.ahead = bytearray(), 0, self._next()

    def read(self, keep: int) -> bool:
        """Drop the bytes before buf[keep] and append the next block; False at the end."""
        if not self.more():
            return False
        rest, ahead = len(self.buf) - keep, self.ahead
        if rest <= _ROOM:  # the carried part of a line goes in the room: no block copied
            ahead[_ROOM - rest : _ROOM] = memoryview(self.buf)[keep:]
            del ahead[: _ROOM - rest]  # only moves the bytearray's start
        else:
            ahead = self.buf[keep:] + memoryview(ahead)[_ROOM:]
        self.buf, self.base, self.ahead = ahead, self.base + keep, self._next()
        return True

    def more(self) -> bool:
        """Whether the file has bytes after buf."""
        return len(self.ahead) > _ROOM

    def _next(self) -> bytearray:
        n = min(self.block, self.left)
        data = bytearray(_ROOM + n)
        if self.f.readinto(memoryview(data)[_ROOM:]) != n:
            raise FileChangedError(f"input {self.f.name} was truncated while it was read")
        self.left -= n
        return data

    def check(self) -> None:
        """Raise FileChangedError if the file is now shorter than when it was opened."""
        if os.fstat(self.f.fileno()).st_size < self.size:
            raise FileChangedError(f"input {self.f.name} was truncated while it was read")


def _whole_lines(reader: _Reader, start: int, limit: int | None) -> tuple[int, int | None]:
    """(start, end) in reader.buf of the whole lines from buf[start] on (the end of the file ends
    a line), reading on until one ends; end is None when that line runs past limit bytes."""
    while True:
        end = reader.buf.rfind(b"\n", start) + 1
        if end:
            return start, end
        if limit is not None and len(reader.buf) - start > limit:
            return start, None
        if not reader.read(start):
            return start, len(reader.buf)
        start = 0


def _raw(data, start: int, end: int) -> str:
    text = bytes(data[start : min(end, start + _RAW_LIMIT)])
    return text.rstrip(b"\r\n").decode("utf-8", "replace")


def _text_end(data, start: int, end: int) -> int:
    """The end of data[start:end] without its trailing CR and LF bytes."""
    while end > start:
        low = max(start, end - 4096)
        kept = len(data[low:end].rstrip(b"\r\n"))
        if kept:
            return low + kept
        end = low
    return start


# CSV ------------------------------------------------------------------------------------------


class _CsvError(Exception):
    pass


_FIELD_END = re.compile(rb"[,\r\n]")
_NOT_BLANK = re.compile(rb"[^\x00-\x20]")


class _CsvDecoder:
    """Jackson's CsvDecoder (no escape character, no trimming, no comments) over a file read in
    blocks. At the end of the buffer it reads the next block and drops what it has passed, so a
    record (an open quote swallows the rest of the file) is never held whole: fields are only
    told blank or not, and of the current record it keeps its first _RAW_LIMIT bytes and its
    line numbers."""

    def __init__(self, reader: _Reader, pos: int, line: int) -> None:
        self.reader, self.data, self.size = reader, reader.buf, len(reader.buf)
        self.pos, self.pending, self.prev = pos, 0, _LF  # prev: the byte before data[0]
        self.mark, self.line = pos, line  # data[mark] is on line `line`
        self.at, self.head, self.text_line = pos, b"", line

    def line_at(self, pos: int) -> int:
        """The line of data[pos]; pos never moves back between calls."""
        self.line += self.data.count(b"\n", self.mark, pos)
        self.mark = pos
        return self.line

    def begin(self) -> int:
        """Start a record at pos; returns its first line."""
        self.at, self.head = self.pos, b""
        self.text_line = self.line_at(self.pos)
        return self.text_line

    def dropped(self) -> tuple[int, str]:
        """The record's last line (of its text without trailing CR and LF) and raw text."""
        self._keep()
        return self.text_line, self.head.rstrip(b"\r\n").decode("utf-8", "replace")

    def at_line_start(self) -> bool:
        """Whether the last record ended at a LF or at the end of the file."""
        if self.pos >= self.size and not self.reader.more():
            return True
        return (self.data[self.pos - 1] if self.pos else self.prev) == _LF

    def next_field(self) -> bool | None:
        """None at the end of the record, else whether the next field is blank (bytes up to a
        space only): all the record's check needs of it."""
        if self.pending:
            if self.pending != _EOF:
                self._handle_lf()
            return None
        if self.pos >= self.size and not self._more():
            self.pending = _EOF
            return True
        c = self.data[self.pos]
        self.pos += 1
        if c in (_CR, _LF):
            self.pending = c
            return True
        if c == _QUOTE:
            return self._quoted()
        if c == _COMMA:
            return True
        blank = c <= 32
        while True:
            data, start = self.data, self.pos
            end = _FIELD_END.search(data, start)
            if end is not None:
                i = end.start()
                blank = blank and not _NOT_BLANK.search(data, start, i)
                self.pos = i + 1
                if data[i] != _COMMA:
                    self.pending = data[i]
                return blank
            blank = blank and not _NOT_BLANK.search(data, start)
            self.pos = self.size
            if not self._more():
                self.pending = _EOF
                return blank

    def _quoted(self) -> bool:
        blank = True
        while True:
            end = self.data.find(b'"', self.pos)
            if end < 0:
                blank = blank and not _NOT_BLANK.search(self.data, self.pos)
                self.pos = self.size
                if self._more():
                    continue
                self.pending = _EOF
                raise _CsvError("a quote is not closed before the end of the file")
            blank = blank and not _NOT_BLANK.search(self.data, self.pos, end)
            self.pos = end + 1
            if (self.pos < self.size or self._more()) and self.data[self.pos] == _QUOTE:
                blank = False
                self.pos += 1
                continue
            break
        while self.pos < self.size or self._more():
            c = self.data[self.pos]
            self.pos += 1
            if c == _COMMA:
                return blank
            if c <= 32:
                if c in (_CR, _LF):
                    self.pending = c
                    return blank
                continue
            raise _CsvError("text after a closing quote")
        self.pending = _EOF
        return blank

    def _handle_lf(self) -> None:
        more = self.pending == _CR and (self.pos < self.size or self._more())
        if more and self.data[self.pos] == _LF:
            self.pos += 1
        self.pending = 0

    def _more(self) -> bool:
        """Read the next block once pos is at the end of the buffer, dropping the buffer (after
        noting what the record needs of it); False at the end of the file."""
        if not self.reader.more():
            return False
        self._keep()
        self.line_at(self.pos)
        self.prev = self.data[self.pos - 1]
        self.reader.read(self.pos)
        self.at -= self.pos
        self.data, self.size, self.pos, self.mark = self.reader.buf, len(self.reader.buf), 0, 0
        return True

    def _keep(self) -> None:
        """Note what the record needs of data[at:pos]: its first _RAW_LIMIT bytes and the line
        its text (without trailing CR and LF) ends on."""
        start = max(self.at, 0)
        end = _text_end(self.data, start, self.pos)
        if end > start:
            self.text_line = self.line_at(end)
        if len(self.head) < _RAW_LIMIT:
            self.head += self.data[start : min(self.pos, start + _RAW_LIMIT - len(self.head))]


def _csv_record(dec: _CsvDecoder, columns: int) -> tuple[str | None, bool]:
    """Parse one record as Jackson's CsvParser and Flink's reader do: (why it is dropped or
    None, whether skipping the rest of its line failed the job). Leaves dec at the next record."""
    fields, reason = 0, None
    try:
        while True:
            blank = dec.next_field()
            if blank is None:
                return None, False
            fields += 1
            if fields <= columns:
                continue
            if blank:
                if dec.next_field() is None:
                    return None, False
                fields += 1
            reason = "columns"
            break
    except _CsvError as exc:
        reason = str(exc)
    try:
        while dec.next_field() is not None:
            fields += 1
    except _CsvError as exc:
        return str(exc), True
    if reason == "columns":
        reason = f"{fields} columns, {columns} declared"
    return reason, False


def _csv_records(dec: _CsvDecoder, columns: int):
    """(line, last line, reason, raw, fatal) of each record the reader drops from dec's position
    until a record ends at a LF (a lone CR ends one mid-line) or at the end of the file; returns
    whether it stopped at a fatal one."""
    while True:
        first = dec.begin()
        reason, fatal = _csv_record(dec, columns)
        if reason is not None:
            last, raw = dec.dropped()
            yield first, last, reason, raw, fatal
            if fatal:
                return True
        if dec.at_line_start():
            return False


def _scan_csv(reader: _Reader, columns: int):
    """(line, last line, reason, raw, fatal) of each record the reader drops. Lines without a
    quote or lone CR are split by NumPy, a block of whole lines at a time; a record touching one,
    or a line longer than a block, is parsed as Jackson does, reading on as far as it runs."""
    while len(reader.buf) < 3 and reader.read(0):
        pass
    bom = 3 if reader.buf[:3] == b"\xef\xbb\xbf" else 0
    start, line0 = 0, 1  # the next line to scan: its index in reader.buf and its number
    while True:
        start, end = _whole_lines(reader, start, reader.block)
        if end is None:
            dec = _CsvDecoder(reader, max(start, bom - reader.base), line0)
            if (yield from _csv_records(dec, columns)):
                return
            start, line0 = dec.pos, dec.line_at(dec.pos)
            continue
        if start == end:
            return
        data, base, resume = reader.buf, reader.base, 0  # resume: after the last parsed record
        block = np.frombuffer(data, np.uint8, end - start, start)
        ends = np.flatnonzero(block == _LF)
        n = len(ends) + (1 if (len(ends) == 0 or ends[-1] != len(block) - 1) else 0)
        starts = np.concatenate(([0], ends + 1))[:n] + start
        commas = np.bincount(np.searchsorted(ends, np.flatnonzero(block == _COMMA)), minlength=n)
        lone_cr = block == _CR  # a CR LF ends a line as a LF does: only a lone CR is special
        lone_cr[:-1] &= block[1:] != _LF
        special = np.zeros(n, np.bool_)
        special[np.searchsorted(ends, np.flatnonzero((block == _QUOTE) | lone_cr))] = True
        for i in np.flatnonzero(special | (commas[:n] >= columns)).tolist():
            at = max(int(starts[i]), bom - base)
            if base + at < resume:
                continue
            if not special[i]:
                stop = int(starts[i + 1]) if i + 1 < n else end
                fields = int(commas[i]) + 1
                last = bytes(data[data.rfind(b",", at, stop) + 1 : stop]).rstrip(b"\n")
                if fields == columns + 1 and not last.strip(bytes(range(33))):
                    continue
                reason = f"{fields} columns, {columns} declared"
                yield line0 + i, line0 + i, reason, _raw(data, at, stop), False
                continue
            dec = _CsvDecoder(reader, at, line0 + i)
            if (yield from _csv_records(dec, columns)):
                return
            resume, resume_line = reader.base + dec.pos, dec.line_at(dec.pos)
        if resume >= base + end:  # the last record parsed ran to or past the block's end
            start, line0 = resume - reader.base, resume_line
        else:
            start, line0 = end, line0 + len(ends)


# JSON -----------------------------------------------------------------------------------------


class _JsonLimit(Exception):
    pass


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _int_text(text: str) -> str:
    if len(text.lstrip("-")) > _JSON_NUMBER:
        raise ValueError("number too long")
    return text


def _float_text(text: str) -> str:
    if len(text) > _JSON_NUMBER + 2:
        raise ValueError("number too long")
    if len(text) > _JSON_NUMBER - 2:
        raise _JsonLimit(text)  # Jackson's exact bound for long decimals is not pinned here
    return text


_SHORT = _JSON_NUMBER - 100
_SHORT_DECODER = json.JSONDecoder(strict=False, parse_constant=_no_constant)
_DECODER = json.JSONDecoder(
    strict=False, parse_constant=_no_constant, parse_int=_int_text, parse_float=_float_text
)


_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def _json_depth(text: str) -> int:
    """The deepest nesting of brackets outside strings."""
    codes = np.frombuffer(_JSON_STRING.sub("", text).encode(), np.uint8)
    steps = np.isin(codes, (91, 123)).astype(np.int64) - np.isin(codes, (93, 125))
    return int(np.cumsum(steps).max(initial=0))


def _json_drop(line: str) -> str | None:
    """Why Flink's JSON reader reads no row from the line, None when it reads one or more; raises
    _JsonLimit when this checker cannot tell."""
    text = line.removeprefix("\ufeff").lstrip(_JSON_WS)  # Jackson skips a BOM, then spaces
    if not text.strip(_JSON_WS):
        return "an empty line, not a JSON object"
    if text.count("[") + text.count("{") > _JSON_DEPTH - 50:
        depth = _json_depth(text)
        if depth > _JSON_DEPTH:
            return f"nested deeper than {_JSON_DEPTH} levels"
        if depth > _JSON_DEPTH - 50:
            raise _JsonLimit(text)  # Python's own recursion limit is near: not decided here
    array = text[0] == "["
    pos = len(text) - len(text[1:].lstrip(_JSON_WS)) if array else 0
    if array and text[pos : pos + 1] == "]":
        return "an empty JSON array, no object"
    try:
        value, _ = _DECODER.raw_decode(text, pos)
    except ValueError as exc:
        return f"not valid JSON ({str(exc).split(':')[0]})"
    except RecursionError as exc:
        raise _JsonLimit(text) from exc
    if isinstance(value, dict):
        return None
    return "a JSON array whose first element is not an object" if array else "not a JSON object"


def _scan_json(reader: _Reader):
    """(line, last line, reason, raw, fatal) of each line the JSON reader drops, a block of whole
    lines at a time (a line longer than a block is read whole: its text is parsed)."""
    line, end = 0, 0
    while True:
        start, end = _whole_lines(reader, end, None)
        if start == end:
            return
        chunk = bytes(memoryview(reader.buf)[start:end])
        try:
            lines: list = chunk.decode().split("\n")
        except UnicodeDecodeError:
            lines = chunk.split(b"\n")
        if chunk.endswith(b"\n"):
            lines.pop()  # no line after a final LF
        for text in lines:
            line += 1
            if len(text) < _SHORT and text[:1] == "{":  # no number or nesting near the limits
                try:
                    if type(_SHORT_DECODER.raw_decode(text)[0]) is dict:
                        continue
                except ValueError:
                    pass
            if isinstance(text, bytes):
                try:
                    text = text.decode()
                except UnicodeDecodeError:
                    continue  # what Flink does with it is not pinned: not decided here
            try:
                reason = _json_drop(text)
            except _JsonLimit:
                continue
            if reason is not None:
                yield line, line, reason, text[:_RAW_LIMIT].rstrip("\r"), False


# The job's side -------------------------------------------------------------------------------


class ParseChecker:
    """Dead-letters, for each pipeline, the records its file reader will drop: the folder's files
    once, then (watch) each file that appears later, once, as Flink's monitor finds it. A file
    whose size or modification time changed is scanned again (earlier entries stay written)."""

    def __init__(self, folder: Path, formats: dict[str, tuple[str, int]], writer) -> None:
        self.folder, self.formats, self.writer = Path(folder), formats, writer
        self.seen: set[tuple[Path, int, int]] = set()
        self.failure: InvalidArgumentError | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def scan_new(self) -> int:
        """Scan the files not scanned yet in their current size and mtime; returns the records
        dead-lettered. Raises InvalidArgumentError naming a file Flink's reader would fail the
        job on, and then writes nothing: the job is refused, and a retry must not write twice.
        The records found are staged on disk and appended once every file is scanned, so memory
        does not grow with them."""
        scanned = []
        with self.writer.staged() as stage:
            for path in input_files(self.folder):
                mark = stage.mark()
                try:
                    before = path.stat()
                    key = (path, before.st_size, before.st_mtime_ns)
                    if key in self.seen:
                        continue
                    for name, (fmt, columns) in self.formats.items():
                        for u in scan_file(path, fmt, columns):
                            stage.add(u.reason, {"pipeline": name, "file": str(u.path),
                                                 "line": u.line, "last_line": u.last_line,
                                                 "raw": u.raw})  # fmt: skip
                    after = path.stat()
                except StageError:
                    raise  # the dead-letter side failed, not this input: write nothing
                except OSError:  # removed, renamed or truncated mid-scan: looked at next time
                    stage.rollback(mark)
                    continue
                if (after.st_size, after.st_mtime_ns) == key[1:]:  # else still being written
                    scanned.append(key)
                else:
                    stage.rollback(mark)
            rows = stage.commit()
        self.seen.update(scanned)
        return rows

    def watch(self, interval_s: float) -> None:
        """Scan new files every interval_s in a daemon thread until stop()."""
        self._thread = threading.Thread(
            target=self._poll, args=(interval_s,), name="parse-check", daemon=True
        )
        self._thread.start()

    def _poll(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                self.scan_new()
            except InvalidArgumentError as exc:  # the job fails on that file: name it then
                self.failure = exc
            except OSError:
                continue  # the folder or the dead-letter file is unreachable now: next poll

    def stop(self) -> None:
        """Stop watching (and wait for a scan in progress)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
