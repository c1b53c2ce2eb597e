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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
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


@dataclass(frozen=True)
class _Edit:
    """A record to change: its length and CRC-32 when planned (a record found changed is left
    alone: another compaction rewrote it), its row count, the positions of its rows that are
    their key's newest before the horizon, and whether it goes (nothing kept, and not the last
    compacted record)."""

    size: int
    crc: int
    rows: int
    newest: list[int]
    delete: bool


def _newest_before(keys: list[bytes], event_us: np.ndarray, horizon_us: int) -> np.ndarray:
    """Positions of each key's newest row with an event time before the horizon (the earliest
    logged among equal event times)."""
    early = np.flatnonzero(event_us < horizon_us)
    order, starts = key_order(list(pick(keys, early.tolist())))
    return early[order[newest_per_key(event_us[early][order], starts)]]


@dataclass
class _Scan:
    """What the plan keeps of a log read record by record: the rows of the whole log; per
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


def _scan(records: Iterable[tuple[int, bytes]], horizon_us: int) -> _Scan:
    """Read the log once, a group of records at a time, keeping only what the plan needs."""
    scan = _Scan(horizon_us)
    compacting = True
    for group in grouped(records, lambda record: record_rows(record[1]), STREAM_ROWS):
        scan.rows += sum(record_rows(blob) for _, blob in group)
        compacting = compacting and scan.take(group)
    return scan


def _plan(scan: _Scan) -> dict[int, _Edit]:
    """Sequence number -> edit, for the compacted records that lose rows: a row stays if its
    event time is at or after the horizon or it is its key's newest before it. The last
    compacted record is emptied rather than deleted, so that the log's last sequence number
    never goes back (a rebuild reads records logged after the last one it saw)."""
    counts = np.asarray(scan.counts, np.int64)
    starts = np.cumsum(counts) - counts
    positions = np.sort(np.fromiter((p for _, p in scan.newest.values()), np.int64))
    holder = np.searchsorted(starts + counts, positions, "right")
    newest: dict[int, list[int]] = {}
    for record, row in zip(holder.tolist(), (positions - starts[holder]).tolist(), strict=True):
        newest.setdefault(record, []).append(row)
    edits: dict[int, _Edit] = {}
    last = len(scan.seqs) - 1
    for i, seq in enumerate(scan.seqs):
        kept = scan.later[i] + len(newest.get(i, ()))
        if kept < scan.counts[i]:
            delete = kept == 0 and i < last
            rows = scan.counts[i]
            edits[seq] = _Edit(scan.sizes[i], scan.crcs[i], rows, newest.get(i, []), delete)
    return edits


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

    The log is read record by record in one read transaction (writers go on beside it), keeping
    per key its newest row before the horizon and per compacted record a few numbers, so memory
    grows with the keys of the compacted part, not with the log's rows or bytes. Then the
    records that lose rows are rewritten, each record's kept rows worked out as it is, in write
    transactions of records holding at most max_rows_per_txn rows, so writers wait for one of
    them at most; stop() is asked between them (the log is consistent after each). Safe beside
    live writers, rebuilds, queries and another compaction. InvalidArgumentError for a bad
    horizon_us or max_rows_per_txn.
    """
    for name, value in (("horizon_us", horizon_us), ("max_rows_per_txn", max_rows_per_txn)):
        if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < 1:
            raise InvalidArgumentError(f"{name}: got {value!r}; give a whole number of at least 1")
    fv = store.registry.get_view(view, version)
    with store.history_stream(fv.name, fv.version) as history:
        horizon_us = max(int(horizon_us), history.horizon_us)
        scan = _scan(history.records, horizon_us)
    rows_before, edits = scan.rows, _plan(scan)
    del scan
    # by record, the edit made and the rows it kept: a rerun transaction overwrites its own
    outcome: dict[int, tuple[_Edit, int] | None] = {}

    def rewrite(seq: int, record: bytes) -> bytes | None:
        edit = edits[seq]
        if len(record) != edit.size or zlib.crc32(record) != edit.crc:
            outcome[seq] = None
            return record
        if edit.delete:
            outcome[seq] = (edit, 0)
            return None
        log = log_of([record])
        keep = log.event_us >= horizon_us
        keep[edit.newest] = True
        kept = np.flatnonzero(keep).tolist()
        outcome[seq] = (edit, len(kept))
        return pack_batch(pick(log.keys, kept), pick(log.rows, kept))

    store.rewrite_history(
        fv.name,
        fv.version,
        history.created_us,
        horizon_us,
        list(grouped(edits, lambda seq: edits[seq].rows, int(max_rows_per_txn))),
        rewrite,
        stop,
    )
    done = [change for change in outcome.values() if change is not None]
    return Compaction(
        fv.name,
        fv.version,
        horizon_us,
        rows_before,
        sum(edit.rows - kept for edit, kept in done),
        sum(not edit.delete for edit, _ in done),
        sum(edit.delete for edit, _ in done),
    )


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
