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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from featurestore.errors import ConflictError, InvalidArgumentError, NotFoundError
from featurestore.history import REBUILD_ROWS_PER_TXN, log_of, pack_batch, unpack_batch
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
    alone: another compaction rewrote it), its row count and the row positions to keep (None:
    delete it)."""

    size: int
    crc: int
    rows: int
    keep: list[int] | None


def _newest_before(keys: list[bytes], event_us: np.ndarray, horizon_us: int) -> np.ndarray:
    """Positions of each key's newest row with an event time before the horizon (the earliest
    logged among equal event times)."""
    early = np.flatnonzero(event_us < horizon_us)
    order, starts = key_order(list(pick(keys, early.tolist())))
    return early[order[newest_per_key(event_us[early][order], starts)]]


def _plan(blobs: list[bytes], horizon_us: int) -> dict[int, _Edit]:
    """Record index -> edit, for the oldest records whose rows were all written before the
    horizon; the last of them is emptied rather than deleted, so that the log's last sequence
    number never goes back (a rebuild reads records logged after the last one it saw)."""
    counts = [int.from_bytes(blob[:4], "little") for blob in blobs]
    log = log_of(blobs)
    ends = np.cumsum(counts)
    late = np.flatnonzero(log.write_us >= horizon_us)
    prefix = int(np.searchsorted(ends, late[0], "right")) if len(late) else len(blobs)
    rows = int(ends[prefix - 1]) if prefix else 0
    if rows == 0:
        return {}
    event_us = log.event_us[:rows]
    keep = event_us >= horizon_us
    keep[_newest_before(log.keys[:rows], event_us, horizon_us)] = True
    edits: dict[int, _Edit] = {}
    for i in range(prefix):
        start = int(ends[i]) - counts[i]
        kept = np.flatnonzero(keep[start : int(ends[i])]).tolist()
        if len(kept) < counts[i]:
            delete = not kept and i < prefix - 1
            edit = _Edit(len(blobs[i]), zlib.crc32(blobs[i]), counts[i], None if delete else kept)
            edits[i] = edit
    return edits


def _chunks(edits: dict[int, _Edit], max_rows: int) -> list[list[int]]:
    """The edited sequence numbers, grouped so that each group's records hold at most max_rows
    rows (a bigger record goes alone)."""
    chunks: list[list[int]] = []
    rows = max_rows
    for seq, edit in edits.items():
        if rows + edit.rows > max_rows:
            chunks.append([])
            rows = 0
        chunks[-1].append(seq)
        rows += edit.rows
    return chunks


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

    The log is read in one read transaction (held in memory while the plan is made, as a
    rebuild holds it) and rewritten in write transactions of records holding at most
    max_rows_per_txn rows, so writers wait for one of them at most; stop() is asked between
    them (the log is consistent after each). Safe beside live writers, rebuilds, queries and
    another compaction. InvalidArgumentError for a bad horizon_us or max_rows_per_txn.
    """
    for name, value in (("horizon_us", horizon_us), ("max_rows_per_txn", max_rows_per_txn)):
        if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < 1:
            raise InvalidArgumentError(f"{name}: got {value!r}; give a whole number of at least 1")
    fv = store.registry.get_view(view, version)
    records = store.history_records(fv.name, fv.version)
    horizon_us = max(int(horizon_us), records.horizon_us)
    rows_before = sum(int.from_bytes(blob[:4], "little") for blob in records.blobs)
    plan = _plan(records.blobs, horizon_us)
    edits = {records.seqs[i]: edit for i, edit in plan.items()}
    created_us = records.created_us
    del records, plan
    outcome: dict[int, _Edit | None] = {}  # by record: a rerun transaction overwrites its own

    def rewrite(seq: int, record: bytes) -> bytes | None:
        edit = edits[seq]
        if len(record) != edit.size or zlib.crc32(record) != edit.crc:
            outcome[seq] = None
            return record
        outcome[seq] = edit
        if edit.keep is None:
            return None
        keys, rows = unpack_batch(record)
        return pack_batch(pick(keys, edit.keep), pick(rows, edit.keep))

    store.rewrite_history(
        fv.name,
        fv.version,
        created_us,
        horizon_us,
        _chunks(edits, int(max_rows_per_txn)),
        rewrite,
        stop,
    )
    done = [edit for edit in outcome.values() if edit is not None]
    return Compaction(
        fv.name,
        fv.version,
        horizon_us,
        rows_before,
        sum(edit.rows - len(edit.keep or ()) for edit in done),
        sum(edit.keep is not None for edit in done),
        sum(edit.keep is None for edit in done),
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
