"""History retention: compact a view version's history log up to a horizon, keeping exactly the
rows that a rebuild and every training query with a label at or after the horizon select.

The log grows with every accepted row. Compaction looks at its oldest records, up to the first
record holding a row written at or after the horizon (records are in commit order), and keeps,
among their rows, every row with an event time at or after the horizon and, per key, the newest
row with an event time before it (the earliest logged among equal event times): all that an
event-time query at or after the horizon can select from them. Each key's newest row overall
(the row the online store held after them) is among those kept: it decides, as before, whether
each later row was applied, and it is what serving answered from then on, so rebuilds and
as-served queries at or after the horizon (whose labels follow every write time in them) are
unchanged. The rest is dropped. point_in_time refuses label times before the horizon, which is
stored with the log (key 0) in the first write transaction, before any row goes.
"""

from __future__ import annotations

import zlib
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from typing import TYPE_CHECKING

import numpy as np

from featurestore.errors import ConflictError, InvalidArgumentError, NotFoundError
from featurestore.history import (
    REBUILD_ROWS_PER_TXN,
    STREAM_ROWS,
    grouped,
    log_of,
    pack_batch,
    record_rows,
)
from featurestore.last_write_wins import key_order, newest_per_key, pick

if TYPE_CHECKING:
    from featurestore.online_store import OnlineStore

CHUNK_BYTES = 4 << 20
"""Bytes of records (and STREAM_ROWS rows) that compaction copies out of the map per read
transaction at most, reducing each chunk after its transaction ends (a bigger record goes
alone)."""


@dataclass(frozen=True)
class Compaction:
    """What compact_history did to one view version's log."""

    view: str
    version: int
    horizon_us: int
    rows_before: int
    rows_dropped: int
    records_rewritten: int
    records_deleted: int


def _newest_before(keys: list[bytes], event_us: np.ndarray, horizon_us: int) -> np.ndarray:
    """Positions of each key's newest row with an event time before the horizon (the earliest
    logged among equal event times)."""
    early = np.flatnonzero(event_us < horizon_us)
    order, starts = key_order(list(pick(keys, early.tolist())))
    return early[order[newest_per_key(event_us[early][order], starts)]]


@dataclass
class _Scan:
    """What the plan keeps of a log read a chunk at a time: the rows of the whole log; per
    compacted record (the oldest ones, up to the first holding a row written at or after the
    horizon) its sequence number, length, CRC-32, row count and rows with an event time at or
    after the horizon; per key its newest row before the horizon so far (event time, position
    among the compacted rows), the earliest logged among equal event times."""

    horizon_us: int
    rows: int = 0
    compacted_rows: int = 0
    seqs: array = field(default_factory=lambda: array("q"))
    sizes: array = field(default_factory=lambda: array("q"))
    crcs: array = field(default_factory=lambda: array("q"))
    counts: array = field(default_factory=lambda: array("q"))
    later: array = field(default_factory=lambda: array("q"))
    newest: dict[bytes, tuple[int, int]] = field(default_factory=dict)

    def take(self, group: list[tuple[int, bytes]]) -> bool:
        """Add the group's records up to the first holding a row written at or after the
        horizon; whether the compacted part may go on past the group."""
        blobs = [blob for _, blob in group]
        counts = [record_rows(blob) for blob in blobs]
        ends = np.cumsum(counts)
        log = log_of(blobs)
        late = np.flatnonzero(log.write_us >= self.horizon_us)
        taken = int(np.searchsorted(ends, late[0], "right")) if len(late) else len(blobs)
        rows = int(ends[taken - 1]) if taken else 0
        event_us = log.event_us[:rows]
        for i in range(taken):
            self.seqs.append(group[i][0])
            self.sizes.append(len(blobs[i]))
            self.crcs.append(zlib.crc32(blobs[i]))
            self.counts.append(counts[i])
        # rows with event times at or after the horizon, counted up to each record's end
        later = np.concatenate(([0], np.cumsum(event_us >= self.horizon_us)))[ends[:taken]]
        self.later.extend(np.diff(later, prepend=0).tolist())
        at = _newest_before(log.keys[:rows], event_us, self.horizon_us)
        for key, event, position in zip(
            pick(log.keys, at.tolist()),
            event_us[at].tolist(),
            (at + self.compacted_rows).tolist(),
            strict=True,
        ):
            held = self.newest.get(key)
            if held is None or event > held[0]:
                self.newest[key] = (event, position)
        self.compacted_rows += rows
        return taken == len(blobs)


def _scan(chunks: Iterable[list[tuple[int, bytes]]], horizon_us: int) -> _Scan:
    """Read the log once, a chunk of records at a time, keeping only what the plan needs."""
    scan = _Scan(horizon_us)
    compacting = True
    for chunk in chunks:
        scan.rows += sum(record_rows(blob) for _, blob in chunk)
        compacting = compacting and scan.take(chunk)
    return scan


class _Chunks(Sequence[list[int]]):
    """Sequence numbers in the consecutive groups `grouped` makes of them by rows (at most
    max_rows rows, a bigger record alone), kept as group bounds and each listed only when its
    write transaction reaches it."""

    def __init__(self, seqs: np.ndarray, rows: np.ndarray, max_rows: int) -> None:
        self._seqs = seqs
        sizes = (len(group) for group in grouped(rows, int, max_rows))
        self._bounds = array("q", accumulate(sizes, initial=0))

    def __len__(self) -> int:
        return len(self._bounds) - 1

    def __getitem__(self, i: int) -> list[int]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self._seqs[self._bounds[i] : self._bounds[i + 1]].tolist()


@dataclass
class _Edits:
    """The compacted records that lose rows, as parallel columns in log order (about 50 bytes
    a record): sequence number; length and CRC-32 when planned (a record found changed is left
    alone: another compaction rewrote it); rows; position of its first row among the compacted
    rows; rows it keeps. Also the sorted positions of the compacted rows that are their key's
    newest before the horizon, the last compacted record's number, and per record whether it
    was changed as planned (each run of its transaction sets it again)."""

    horizon_us: int
    seqs: np.ndarray
    sizes: np.ndarray
    crcs: np.ndarray
    rows: np.ndarray
    starts: np.ndarray
    kept: np.ndarray
    newest: np.ndarray
    last_seq: int
    done: bytearray = field(init=False)

    def __post_init__(self) -> None:
        self.done = bytearray(len(self.seqs))

    def goes(self) -> np.ndarray:
        """Per record, whether it is deleted: it keeps nothing and is not the last compacted
        record (emptied instead, so that the log's last sequence number never goes back: a
        rebuild reads records logged after the last one it saw)."""
        return (self.kept == 0) & (self.seqs != self.last_seq)

    def rewrite(self, seq: int, record: bytes) -> bytes | None:
        """What to store for the record numbered seq (see OnlineStore.rewrite_history): its
        rows with event times at or after the horizon and those that are their key's newest
        before it; None if it goes; the record itself if it changed since it was planned."""
        i = int(np.searchsorted(self.seqs, seq))
        planned = len(record) == self.sizes[i] and zlib.crc32(record) == self.crcs[i]
        self.done[i] = bool(planned)
        if not planned:
            return record
        if self.kept[i] == 0 and seq != self.last_seq:
            return None
        log = log_of([record])
        keep = log.event_us >= self.horizon_us
        start = int(self.starts[i])
        lo, hi = np.searchsorted(self.newest, [start, start + int(self.rows[i])]).tolist()
        keep[self.newest[lo:hi] - start] = True
        kept = np.flatnonzero(keep).tolist()
        return pack_batch(pick(log.keys, kept), pick(log.rows, kept))

    def outcome(self) -> tuple[int, int, int]:
        """Rows dropped, records rewritten and records deleted by the changes made."""
        done = np.frombuffer(self.done, np.bool_)
        goes = self.goes()
        dropped = int((self.rows - self.kept)[done].sum())
        return dropped, int((done & ~goes).sum()), int((done & goes).sum())


def _filtered(column: array, lose: np.ndarray) -> np.ndarray:
    """A scan column's values at the records that lose rows; the column is emptied (freed)."""
    values = np.frombuffer(column, np.int64)[lose]
    del column[:]
    return values


def _plan(scan: _Scan) -> _Edits:
    """The edits of the compacted records that lose rows: a row stays if its event time is at
    or after the horizon or it is its key's newest before it. Consumes the scan, emptying its
    columns as they are filtered, so the peak stays near the scan's own size."""
    newest = np.sort(np.fromiter((p for _, p in scan.newest.values()), np.int64, len(scan.newest)))
    scan.newest.clear()
    rows = np.frombuffer(scan.counts, np.int64)
    ends = np.cumsum(rows)
    kept = np.frombuffer(scan.later, np.int64)  # scan.later becomes the rows kept
    np.add.at(kept, np.searchsorted(ends, newest, "right"), 1)
    lose = kept < rows
    ends -= rows
    starts = ends[lose]
    del rows, ends, kept  # the views of the columns: _filtered empties them
    last_seq = scan.seqs[-1] if scan.seqs else 0
    return _Edits(
        scan.horizon_us,
        _filtered(scan.seqs, lose),
        _filtered(scan.sizes, lose),
        _filtered(scan.crcs, lose),
        _filtered(scan.counts, lose),
        starts,
        _filtered(scan.later, lose),
        newest,
        last_seq,
    )


def compact_history(
    store: OnlineStore,
    view: str,
    version: int = 0,
    *,
    horizon_us: int,
    max_rows_per_txn: int = REBUILD_ROWS_PER_TXN,
    stop: Callable[[], bool] = lambda: False,
) -> Compaction:
    """Drop the logged rows of a view version that no query at or after horizon_us (µs since
    the epoch) and no rebuild selects; set the log's horizon (it only moves forward: an earlier
    horizon_us compacts up to the stored one).

    The log is read in chunks (STREAM_ROWS rows, CHUNK_BYTES at most), each copied out in its
    own short read transaction and reduced after it ends, so no snapshot pins the pages
    writers free meanwhile; records logged meanwhile are read too, and a record another
    compaction changed between chunks is left alone when found changed at rewrite. It keeps
    per key its newest row before the horizon and per compacted record a few numbers in
    columns (about 40 bytes; about 50 for those that lose rows), not an object per record.
    Then the records that lose rows are rewritten, each record's kept rows worked out as it
    is, in write transactions of records holding at most max_rows_per_txn rows, so writers
    wait for one of them at most; stop() is asked between them (the log is consistent after
    each). Safe beside live writers, rebuilds, queries and another compaction. ConflictError
    if the version is deleted and created again meanwhile; InvalidArgumentError for a bad
    horizon_us or max_rows_per_txn.
    """
    for name, value in (("horizon_us", horizon_us), ("max_rows_per_txn", max_rows_per_txn)):
        if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < 1:
            raise InvalidArgumentError(f"{name}: got {value!r}; give a whole number of at least 1")
    fv = store.registry.get_view(view, version)
    history = store.history_chunks(fv.name, fv.version, STREAM_ROWS, CHUNK_BYTES)
    horizon_us = max(int(horizon_us), history.horizon_us)
    scan = _scan(history.chunks, horizon_us)
    rows_before, edits = scan.rows, _plan(scan)
    del scan
    store.rewrite_history(
        fv.name,
        fv.version,
        history.created_us,
        horizon_us,
        _Chunks(edits.seqs, edits.rows, int(max_rows_per_txn)),
        edits.rewrite,
        stop,
    )
    return Compaction(fv.name, fv.version, horizon_us, rows_before, *edits.outcome())


@dataclass(frozen=True)
class Recreated:
    """A view version deleted and created again while it was compacted: the new definition's
    history is left for the next run."""

    view: str
    version: int


def compact_views(
    store: OnlineStore,
    horizon_us: int,
    view: str | None = None,
    version: int | None = None,
    *,
    max_rows_per_txn: int = REBUILD_ROWS_PER_TXN,
    stop: Callable[[], bool] = lambda: False,
) -> Iterator[Compaction | Recreated]:
    """compact_history of every version of `view` (one version when given; of every view when
    view is None), yielding each outcome as it ends. NotFoundError for a view or version given
    that is not registered. Without a view, a version deleted meanwhile is skipped, and one
    created again meanwhile is reported (Recreated) and passed, so one churning view does not
    keep the others from being compacted."""
    if view is not None:
        store.registry.get_view(view, version or 0)
    targets = [
        (fv.name, fv.version)
        for fv in store.registry.list_views(all_versions=True)
        if view in (None, fv.name) and version in (None, fv.version)
    ]
    for name, number in targets:
        try:
            yield compact_history(
                store,
                name,
                number,
                horizon_us=horizon_us,
                max_rows_per_txn=max_rows_per_txn,
                stop=stop,
            )
        except NotFoundError:
            if view is not None:
                raise
        except ConflictError:
            if view is not None:
                raise
            yield Recreated(name, number)
