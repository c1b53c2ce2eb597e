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

_BLOCK = 16 << 20
_RAW_LIMIT = 1 << 20
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


def scan_file(path: Path, fmt: str, columns: int) -> list[Unparseable]:
    """Every record of the file that Flink's `fmt` reader drops; raises InvalidArgumentError
    naming the line when the reader would fail the whole job on the file, FileChangedError when
    the file is shorter than its size when opened (read, not mapped: a truncation is not fatal)."""
    path = Path(path)
    with path.open("rb") as f:
        data = bytearray(os.fstat(f.fileno()).st_size)
        if f.readinto(data) != len(data):
            raise FileChangedError(f"input {path} was truncated while it was read")
    if not data:
        return []
    found = list(_scan_csv(data, columns) if fmt == "csv" else _scan_json(data))
    out = []
    for line, last_line, reason, raw, fatal in found:
        if fatal:
            raise InvalidArgumentError(
                f"input {path} line {line}: {reason}, which fails Flink's CSV reader (the whole "
                "job); fix the quoting or remove the row, then rerun the job"
            )
        out.append(Unparseable(path, line, last_line, f"unparseable: {reason}", raw))
    return out


def _raw(data, start: int, end: int) -> str:
    text = bytes(data[start : min(end, start + _RAW_LIMIT)])
    return text.rstrip(b"\r\n").decode("utf-8", "replace")


def _blocks(data) -> Iterator[tuple[int, np.ndarray]]:
    """(offset, bytes) blocks of whole lines."""
    start, size = 0, len(data)
    while start < size:
        end = min(start + _BLOCK, size)
        if end < size:
            cut = data.rfind(b"\n", start, end)
            end = cut + 1 if cut >= start else (data.find(b"\n", end) + 1 or size)
        yield start, np.frombuffer(data, np.uint8, end - start, start)
        start = end


# CSV ------------------------------------------------------------------------------------------


class _CsvError(Exception):
    pass


class _CsvDecoder:
    """Jackson's CsvDecoder (no escape character, no trimming, no comments) over bytes."""

    def __init__(self, data, pos: int) -> None:
        self.data, self.pos, self.size, self.pending = data, pos, len(data), 0

    def next_string(self) -> bytes | None:
        data, size = self.data, self.size
        if self.pending:
            if self.pending != _EOF:
                self._handle_lf()
            return None
        if self.pos >= size:
            self.pending = _EOF
            return b""
        c = data[self.pos]
        self.pos += 1
        if c in (_CR, _LF):
            self.pending = c
            return b""
        if c == _QUOTE:
            return self._quoted()
        if c == _COMMA:
            return b""
        start = self.pos - 1
        i = start
        while i < size:
            c = data[i]
            if c == _COMMA:
                self.pos = i + 1
                return bytes(data[start:i])
            if c in (_CR, _LF):
                self.pos, self.pending = i + 1, c
                return bytes(data[start:i])
            i += 1
        self.pos, self.pending = size, _EOF
        return bytes(data[start:size])

    def _quoted(self) -> bytes:
        data, size = self.data, self.size
        parts = []
        while True:
            end = data.find(b'"', self.pos)
            if end < 0:
                self.pos, self.pending = size, _EOF
                raise _CsvError("a quote is not closed before the end of the file")
            parts.append(bytes(data[self.pos : end]))
            self.pos = end + 1
            if self.pos < size and data[self.pos] == _QUOTE:
                parts.append(b'"')
                self.pos += 1
                continue
            break
        while self.pos < size:
            c = data[self.pos]
            self.pos += 1
            if c == _COMMA:
                return b"".join(parts)
            if c <= 32:
                if c in (_CR, _LF):
                    self.pending = c
                    return b"".join(parts)
                continue
            raise _CsvError("text after a closing quote")
        self.pending = _EOF
        return b"".join(parts)

    def _handle_lf(self) -> None:
        if self.pending == _CR and self.pos < self.size and self.data[self.pos] == _LF:
            self.pos += 1
        self.pending = 0


def _csv_record(dec: _CsvDecoder, columns: int) -> tuple[str | None, bool]:
    """Parse one record as Jackson's CsvParser and Flink's reader do: (why it is dropped or
    None, whether skipping the rest of its line failed the job). Leaves dec at the next record."""
    fields, reason = 0, None
    try:
        while True:
            value = dec.next_string()
            if value is None:
                return None, False
            fields += 1
            if fields <= columns:
                continue
            if not value.strip(bytes(range(33))):
                value = dec.next_string()
                if value is None:
                    return None, False
                fields += 1
            reason = "columns"
            break
    except _CsvError as exc:
        reason = str(exc)
    try:
        while dec.next_string() is not None:
            fields += 1
    except _CsvError as exc:
        return str(exc), True
    if reason == "columns":
        reason = f"{fields} columns, {columns} declared"
    return reason, False


def _scan_csv(data, columns: int):
    """(line, last line, reason, raw, fatal) of each record the reader drops. Lines without a
    quote or lone CR are split by NumPy; a record touching one is parsed as Jackson does."""
    size = len(data)
    bom = 3 if data[:3] == b"\xef\xbb\xbf" else 0
    resume, line0 = 0, 1
    for offset, block in _blocks(data):
        ends = np.flatnonzero(block == _LF)
        n = len(ends) + (1 if (len(ends) == 0 or ends[-1] != len(block) - 1) else 0)
        starts = np.concatenate(([0], ends + 1))[:n] + offset
        commas = np.bincount(np.searchsorted(ends, np.flatnonzero(block == _COMMA)), minlength=n)
        lone_cr = block == _CR  # a CR LF ends a line as a LF does: only a lone CR is special
        lone_cr[:-1] &= block[1:] != _LF
        special = np.zeros(n, np.bool_)
        special[np.searchsorted(ends, np.flatnonzero((block == _QUOTE) | lone_cr))] = True
        for i in np.flatnonzero(special | (commas[:n] >= columns)).tolist():
            start = max(int(starts[i]), bom)
            if start < resume:
                continue
            end = int(starts[i + 1]) if i + 1 < n else offset + len(block)
            if not special[i]:
                fields = int(commas[i]) + 1
                last = bytes(data[data.rfind(b",", start, end) + 1 : end]).rstrip(b"\n")
                if fields == columns + 1 and not last.strip(bytes(range(33))):
                    continue
                reason = f"{fields} columns, {columns} declared"
                yield line0 + i, line0 + i, reason, _raw(data, start, end), False
                continue
            dec = _CsvDecoder(data, start)
            while True:  # records until one ends at a LF (a lone CR ends a record mid-line)
                at = dec.pos
                reason, fatal = _csv_record(dec, columns)
                if reason is not None:
                    first = line0 + i + data[start:at].count(b"\n")
                    last = first + data[at : dec.pos].rstrip(b"\r\n").count(b"\n")
                    yield first, last, reason, _raw(data, at, dec.pos), fatal
                    if fatal:
                        return
                if dec.pos >= size or data[dec.pos - 1] == _LF:
                    break
            resume = dec.pos
        line0 += len(ends)


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


def _scan_json(data):
    """(line, last line, reason, raw, fatal) of each line the JSON reader drops."""
    line = 0
    for _, block in _blocks(data):
        chunk = bytes(block)
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
        job on, and then writes nothing: the job is refused, and a retry must not write twice."""
        found: list[tuple[str, Unparseable]] = []
        scanned = []
        for path in input_files(self.folder):
            try:
                before = path.stat()
                key = (path, before.st_size, before.st_mtime_ns)
                if key in self.seen:
                    continue
                entries = [(name, u) for name, (fmt, columns) in self.formats.items()
                           for u in scan_file(path, fmt, columns)]  # fmt: skip
                after = path.stat()
            except OSError:
                continue  # removed, renamed or truncated mid-scan: looked at again next time
            if (after.st_size, after.st_mtime_ns) == key[1:]:  # else still being written
                found += entries
                scanned.append(key)
        rows = self.writer.write(
            [u.reason for _, u in found],
            {"pipeline": [name for name, _ in found], "file": [str(u.path) for _, u in found],
             "line": [u.line for _, u in found], "last_line": [u.last_line for _, u in found],
             "raw": [u.raw for _, u in found]},
        )  # fmt: skip
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
