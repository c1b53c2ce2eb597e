"""Offline history: every accepted write batch, appended in the online write's transaction.

Each view version has a named database b"h:<name>@<version>" keyed by a big-endian sequence
number from 1; a value packs one batch's LMDB keys and packed rows. Key 0, once the history has
been compacted (history_retention), holds its horizon: the earliest label time it still answers.
Every row that passed validation is logged, including late rows that were stale online (late
data still matters to training), but not a row stale with the very event time stored (a replay
or retry): the earlier write wins ties, so no query could select it. Replaying the log rebuilds
the online store, and it answers point-in-time-correct training queries, by event time or as
served.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from featurestore.errors import InvalidArgumentError
from featurestore.keys import decode_keys, encode_keys
from featurestore.last_write_wins import (
    MIN_EVENT,
    key_order,
    newest_per_key,
    pick,
    resolve,
    stored_events,
)
from featurestore.registry import Entity, FeatureView
from featurestore.row_codec import (
    MISSING_ROW,
    NO_CUTOFF,
    Block,
    DecodePlan,
    RowLayout,
    decode_rows,
    ttl_cutoff,
)

if TYPE_CHECKING:
    from featurestore.online_store import OnlineStore

T = TypeVar("T")
HORIZON_KEY = bytes(8)
FIRST_RECORD = (1).to_bytes(8, "big")
REBUILD_ROWS_PER_TXN = 10_000
"""Rows a rebuild changes per write transaction by default: a writer waited 14 ms at most here
while 1M rows were refilled (0.6-0.8 s when they were replaced in one transaction)."""
STREAM_ROWS = 2048
"""Rows of consecutive records that a rebuild or a compaction reduces at a time as it streams
the log: enough to keep the per-group array passes cheap, few enough to keep memory small."""


def pack_batch(keys: Sequence[bytes], rows: Sequence[bytes]) -> bytes:
    """One history record: n u32 | key lengths u32[n] | row lengths u32[n] | keys | rows."""
    n = len(keys)
    key_lens = np.fromiter(map(len, keys), np.int64, n).astype("<u4")
    row_lens = np.fromiter(map(len, rows), np.int64, n).astype("<u4")
    return b"".join((n.to_bytes(4, "little"), key_lens.tobytes(), row_lens.tobytes(), *keys, *rows))


def unpack_batch(blob: bytes) -> tuple[list[bytes], list[bytes]]:
    """Inverse of pack_batch."""
    n = int.from_bytes(blob[:4], "little")
    lens = np.frombuffer(blob, "<u4", 2 * n, 4).astype(np.int64)
    ends = np.cumsum(lens) + 4 + 8 * n
    starts = ends - lens
    pairs = list(zip(starts.tolist(), ends.tolist(), strict=True))
    items = [blob[a:b] for a, b in pairs]
    return items[:n], items[n:]


def record_rows(blob: bytes) -> int:
    """Rows in one history record (its header)."""
    return int.from_bytes(blob[:4], "little")


def grouped(items: Iterable[T], rows: Callable[[T], int], max_rows: int) -> Iterator[list[T]]:
    """Consecutive items in groups holding at most max_rows rows (a bigger item goes alone)."""
    group: list[T] = []
    held = 0
    for item in items:
        n = rows(item)
        if group and held + n > max_rows:
            yield group
            group, held = [], 0
        group.append(item)
        held += n
    if group:
        yield group


@dataclass
class HistoryChunks:
    """A view version's history read a chunk at a time (OnlineStore.history_chunks): its
    definition's created_us and horizon (µs, 0 = never compacted) as the first chunk's read
    transaction saw them, and its chunks of consecutive records in write order as (sequence
    number, record), each read in its own transaction when the iteration reaches it."""

    created_us: int
    horizon_us: int
    chunks: Iterator[list[tuple[int, bytes]]]


@dataclass
class HistoryRecords:
    """A view version's history as stored, read in one transaction: its definition's
    created_us, its horizon (µs, 0 = never compacted), and its records in write order with
    their sequence numbers."""

    created_us: int
    horizon_us: int
    seqs: list[int]
    blobs: list[bytes]


@dataclass
class HistoryLog:
    """Every logged row of a view version, in write order: LMDB keys, event and write times
    (µs) and rows; horizon_us is the earliest label time the log still answers (0: any)."""

    keys: list[bytes]
    event_us: np.ndarray
    write_us: np.ndarray
    rows: list[bytes]
    horizon_us: int = 0


def log_of(blobs: Sequence[bytes], horizon_us: int = 0) -> HistoryLog:
    """History records concatenated in write order."""
    keys: list[bytes] = []
    rows: list[bytes] = []
    for blob in blobs:
        k, r = unpack_batch(blob)
        keys.extend(k)
        rows.extend(r)
    # row header bytes 8:24: event_us i64, write_us i64 (see row_codec)
    times = np.frombuffer(b"".join(r[8:24] for r in rows), "<i8").reshape(-1, 2)
    times = times.astype(np.int64)
    return HistoryLog(keys, times[:, 0], times[:, 1], rows, horizon_us)


def read_log(store: OnlineStore, view: str, version: int = 0) -> HistoryLog:
    """All history records of a view version, concatenated in write order, with its horizon."""
    fv = store.registry.get_view(view, version)
    records = store.history_records(fv.name, fv.version)
    return log_of(records.blobs, records.horizon_us)


def history_rows(
    store: OnlineStore, view: str, version: int = 0
) -> tuple[dict[str, np.ndarray], np.ndarray, list[Block]]:
    """Every logged row: key columns, event times (µs) and the feature values as blocks."""
    fv = store.registry.get_view(view, version)
    entity = store.registry.get_entity(fv.entity)
    log = read_log(store, fv.name, fv.version)
    plan = DecodePlan(RowLayout(fv), [f.name for f in fv.features])
    decoded = decode_rows(plan, log.rows, np.full(len(log.rows), NO_CUTOFF, np.int64))
    return decode_keys(entity, log.keys), log.event_us, decoded.blocks


def _latest_rows(log: HistoryLog) -> list[tuple[bytes, bytes]]:
    """(key, row) of each key's row the online store keeps after the logged writes: the newest
    event time, the earliest logged among equal ones (last-write-wins); in key order."""
    order, starts = key_order(log.keys)
    newest = order[newest_per_key(log.event_us[order], starts)].tolist()
    return list(zip(pick(log.keys, newest), pick(log.rows, newest), strict=True))


def keep_newest(logged: dict[bytes, bytes], rows: Sequence[tuple[bytes, bytes]]) -> None:
    """Merge rows (one per key, logged after those in `logged`) into logged by last-write-wins:
    a row replaces its key's kept row only with a newer event time."""
    kept = stored_events([logged.get(key) for key, _ in rows])
    newer = stored_events([row for _, row in rows]) > kept
    logged.update(pair for pair, take in zip(rows, newer.tolist(), strict=True) if take)


def rebuild_online(
    store: OnlineStore,
    view: str,
    version: int = 0,
    max_rows_per_txn: int = REBUILD_ROWS_PER_TXN,
) -> int:
    """Make the online rows of a view version what replaying its history gives; returns rows
    replayed.

    The log and the online rows are read in one read transaction (writers go on beside it):
    the log is streamed record by record and reduced as it comes to each key's newest row so
    far, so memory grows with the view's keys (as the online rows do), not with the log; the
    difference from the online rows is computed after the read ends. The difference needs one
    snapshot of both, so that read transaction is held while the whole log is reduced, and
    LMDB reuses no page that writers free meanwhile until it ends: the data file grows by what
    they rewrite during that time (compaction, which needs no such snapshot, reads the log in
    short transactions instead). Only keys whose stored row differs from the rebuilt one are
    written (or deleted: stored with no logged row), in write transactions of at most
    max_rows_per_txn rows, so writers wait for one such transaction, not for the whole view
    (a rebuild of a healthy store writes nothing).

    This is exact beside live writers because every change to a view's online rows is logged
    in the transaction that makes it: an accepted row is logged, a row refused stale is logged
    but changes nothing, and a replay (stale with the very event time stored) changes nothing
    and is not logged. So a key with no record logged after the read still holds, when its
    transaction writes, the row the read saw; a key with such records gets, in the transaction
    that writes it, the newest of its rebuilt row and those records by event time, the earlier
    logged winning ties (as online); and a key outside the difference that was written since
    already holds exactly that, as the write applied the same rule to the rebuilt row. No
    acknowledged write is lost.

    The price: when the difference exceeds max_rows_per_txn, readers between two transactions
    see a partly rebuilt view (each key holds its old row or its rebuilt one, never a mix),
    where replacing every row in one transaction swapped the view at once; set max_rows_per_txn
    above the view's key count to keep that, at the cost of holding every writer for the
    whole refill. InvalidArgumentError if max_rows_per_txn < 1.
    """
    fv = store.registry.get_view(view, version)
    replayed = 0

    def latest(records: Iterable[bytes]) -> list[tuple[bytes, bytes]]:
        nonlocal replayed
        newest: dict[bytes, bytes] = {}
        for group in grouped(records, record_rows, STREAM_ROWS):
            log = log_of(group)
            replayed += len(log.keys)
            keep_newest(newest, _latest_rows(log))
        return list(newest.items())

    store.replace_online_rows(fv.name, fv.version, latest, max_rows_per_txn)
    return replayed


@dataclass
class PointInTimeResult:
    """Per query row: the event time of the value used (0 if none), row status and blocks."""

    event_us: np.ndarray
    row_status: np.ndarray
    blocks: list[Block]


def _label_times(timestamps: object, rows: int) -> np.ndarray:
    """The query's timestamps as int64 µs, one per key row; InvalidArgumentError otherwise (a
    shorter column silently dropped key rows, fractions were truncated)."""
    ts = np.asarray(timestamps)
    if ts.ndim != 1 or len(ts) != rows:
        raise InvalidArgumentError(
            f"timestamps: shape {list(ts.shape)}, expected [{rows}]: one label time per entity "
            "key row"
        )
    if len(ts) and (
        ts.dtype.kind not in "iu" or (ts.dtype.kind == "u" and ts.max() > np.iinfo(np.int64).max)
    ):
        raise InvalidArgumentError(
            f"timestamps: dtype {ts.dtype}; send int64 µs since the epoch (whole numbers)"
        )
    return ts.astype(np.int64)


def _check_horizon(ts: np.ndarray, horizon_us: int) -> None:
    """InvalidArgumentError naming the first label before the log's horizon: history retention
    dropped rows that such a label could select, so its answer would be wrong."""
    early = np.flatnonzero(ts < horizon_us)
    if len(early):
        row = int(early[0])
        raise InvalidArgumentError(
            f"timestamps: row {row} is {int(ts[row])} µs, before the history's horizon "
            f"{horizon_us} µs ({len(early)} labels are): history retention compacted the log "
            f"up to it, so rows older labels need may be gone; give label times at or after "
            f"{horizon_us}"
        )


def _feature_names(fv: FeatureView, features: Sequence[str] | None) -> list[str]:
    """The features to return (default all); a bare string is refused (list("x") splits it)."""
    if features is None:
        return [f.name for f in fv.features]
    if isinstance(features, str | bytes):
        raise InvalidArgumentError(
            f"features: got the string {features!r}; give a list of feature names, e.g. "
            f"[{features!r}]"
        )
    return list(features)


def _query_keys(entity: Entity, entity_keys: dict[str, np.ndarray]) -> list[bytes]:
    """The LMDB key of each query row; InvalidArgumentError naming the join key column and the
    first bad row (a None, a lone surrogate, a uint64 over the int64 range) rather than a
    silent NOT_FOUND."""
    encoded = encode_keys(entity, entity_keys)
    if encoded.errors:
        row, column, reason = encoded.errors[0]
        raise InvalidArgumentError(
            f"entity_keys: join key {column!r} row {row}: {reason}; fix the key "
            f"({len(encoded.errors)} bad rows)"
        )
    return encoded.keys


def _last_at_or_before(
    group: np.ndarray, time: np.ndarray, query_group: np.ndarray, query_time: np.ndarray
) -> np.ndarray:
    """Log rows sorted by (group, time); for each query, the sorted position of the last row of
    its group with time <= its time, or -1 where there is none (query group -1: no row)."""
    n = len(group)
    _, rank = np.unique(np.concatenate([time, query_time]), return_inverse=True)
    width = np.int64(len(rank) + 1)
    pos = np.searchsorted(group * width + rank[:n], query_group * width + rank[n:], "right") - 1
    if n == 0:
        return pos
    hit = (query_group >= 0) & (pos >= 0) & (group[np.maximum(pos, 0)] == query_group)
    return np.where(hit, pos, -1)


def _by_event_time(
    log: HistoryLog, log_id: np.ndarray, query_id: np.ndarray, ts: np.ndarray
) -> np.ndarray:
    """Per query, the log index of the latest row with event time <= its label (the earliest
    logged among equal event times), -1 if none."""
    order = np.lexsort((-np.arange(len(log_id)), log.event_us, log_id))
    pos = _last_at_or_before(log_id[order], log.event_us[order], query_id, ts)
    return np.where(pos >= 0, order[pos] if len(order) else pos, -1)


def _applied(event_us: np.ndarray, log_id: np.ndarray) -> np.ndarray:
    """Whether the online store applied each logged row: in log (commit) order, its event time
    beats every earlier logged row of its key (an equal one loses, as online)."""
    order = np.argsort(log_id, kind="stable")
    ids = log_id[order]
    starts = np.ones(len(ids), np.bool_)
    starts[1:] = ids[1:] != ids[:-1]
    applied = np.empty(len(ids), np.bool_)
    applied[order] = resolve(event_us[order], np.full(len(ids), MIN_EVENT), starts)
    return applied


def _as_served(
    log: HistoryLog, log_id: np.ndarray, query_id: np.ndarray, ts: np.ndarray
) -> np.ndarray:
    """Per query, the log index of the row serving held at its label: among the rows applied
    online (decided in commit order: write times are stamped before the commit, so a late row
    stamped before a newer one that committed first was refused) and written (write time) by
    then, the latest event time; -1 if none. A running best per key over write order, looked
    up at the label."""
    applied = np.flatnonzero(_applied(log.event_us, log_id))
    n = len(applied)
    if n == 0:
        return np.full(len(ts), -1, np.int64)
    key, event, written = log_id[applied], log.event_us[applied], log.write_us[applied]
    by_event = np.argsort(event, kind="stable")  # a key's applied rows have distinct events
    preference = np.empty(n, np.int64)
    preference[by_event] = np.arange(n)
    order = np.lexsort((written, key))
    # keys ascend along `order`, so a running maximum of key * n + preference restarts per key
    best = np.maximum.accumulate(key[order] * n + preference[order]) % n
    pos = _last_at_or_before(key[order], written[order], query_id, ts)
    return np.where(pos >= 0, applied[by_event[best[pos]]], -1)


def _ttl_cutoffs(fv: FeatureView, ts: np.ndarray) -> np.ndarray:
    """Per label, the oldest event time kept by the TTL in force at it (see ttl_cutoff): that of
    the view version's last TTL change at or before the label, so a label at a change's time
    takes the new TTL; a label before the version was created, its first TTL."""
    changes = fv.ttl_changes()
    since = np.array([from_us for from_us, _ in changes], np.int64)
    in_force = np.maximum(np.searchsorted(since, ts, "right") - 1, 0)
    cutoff = np.empty(len(ts), np.int64)
    for i in np.unique(in_force).tolist():
        at = in_force == i
        cutoff[at] = ttl_cutoff(ts[at], changes[i][1])
    return cutoff


def point_in_time(
    store: OnlineStore,
    view: str,
    entity_keys: dict[str, np.ndarray],
    timestamps: np.ndarray,
    features: Sequence[str] | None = None,
    version: int = 0,
    *,
    as_served: bool = False,
) -> PointInTimeResult:
    """For each (entity, label time): the logged row a training example sees then.

    By default (event time, as Feast): the latest row with event time <= the label. as_served:
    what GetOnlineFeatures answered at the label: the latest event time among the rows the
    online store applied (decided in commit order) and wrote by then (a row's write time,
    stamped when it was prepared, before its commit), future-dated rows included, late rows
    only if nothing newer was committed before them. Either way the earlier write wins among
    equal event times, as online, and rows older than label - TTL are withheld as
    OUTSIDE_MAX_AGE.

    The TTL: by event time, the view's current ttl_seconds for every label (as Feast: a
    training set matches what serving answers from now on); as_served, the TTL in force at each
    label (FeatureView.ttl_changes: a label at or after a change's time takes the new TTL, as
    it does a row written by then).

    version=0: by event time, the latest version today; as_served, at each label the version a
    lookup without a version read then (_served_versions), each label answered from that
    version's log. InvalidArgumentError for a label before the history's horizon
    (history_retention).
    """
    if as_served and version == 0:
        return _as_served_by_version(store, view, entity_keys, timestamps, features)
    fv = store.registry.get_view(view, version)
    entity = store.registry.get_entity(fv.entity)
    query_keys = _query_keys(entity, entity_keys)
    ts = _label_times(timestamps, len(query_keys))
    return _replay(store, fv, query_keys, ts, _feature_names(fv, features), as_served)


def _replay(
    store: OnlineStore,
    fv: FeatureView,
    query_keys: list[bytes],
    ts: np.ndarray,
    names: list[str],
    as_served: bool,
) -> PointInTimeResult:
    """point_in_time over one view version's log."""
    log = read_log(store, fv.name, fv.version)
    _check_horizon(ts, log.horizon_us)
    ids: dict[bytes, int] = {}
    log_id = np.fromiter((ids.setdefault(k, len(ids)) for k in log.keys), np.int64, len(log.keys))
    query_id = np.fromiter((ids.get(k, -1) for k in query_keys), np.int64, len(ts))
    chosen = (_as_served if as_served else _by_event_time)(log, log_id, query_id, ts)
    rows = [log.rows[i] if i >= 0 else MISSING_ROW for i in chosen.tolist()]
    cutoff = _ttl_cutoffs(fv, ts) if as_served else ttl_cutoff(ts, fv.ttl_seconds)
    decoded = decode_rows(DecodePlan(RowLayout(fv), names), rows, cutoff)
    return PointInTimeResult(decoded.event_us, decoded.row_status, decoded.blocks)


def _served_versions(
    store: OnlineStore, latest: FeatureView, ts: np.ndarray
) -> tuple[list[FeatureView], np.ndarray]:
    """The view's stored versions and, per label, the index of the one a lookup without a
    version read then: the highest version number among those created at or before it (the
    earliest created for a label before any: its log answers NOT_FOUND there)."""
    stored = store.registry.list_views(latest.name, all_versions=True)
    versions = [fv for fv in stored if fv.name == latest.name]
    by_creation = sorted(range(len(versions)), key=lambda i: versions[i].created_us)
    created = np.array([versions[i].created_us for i in by_creation], np.int64)
    highest = np.maximum.accumulate([versions[i].version for i in by_creation])
    index_of = {fv.version: i for i, fv in enumerate(versions)}
    at = np.maximum(np.searchsorted(created, ts, "right") - 1, 0)
    return versions, np.array([index_of[int(v)] for v in highest], np.int64)[at]


def _as_served_by_version(
    store: OnlineStore,
    view: str,
    entity_keys: dict[str, np.ndarray],
    timestamps: object,
    features: Sequence[str] | None,
) -> PointInTimeResult:
    """point_in_time(as_served=True, version=0): each label answered from the log of the
    version a lookup without a version read then. InvalidArgumentError when one of those
    versions has another entity, or lacks a requested feature or types it otherwise."""
    latest = store.registry.get_view(view)
    query_keys = _query_keys(store.registry.get_entity(latest.entity), entity_keys)
    ts = _label_times(timestamps, len(query_keys))
    names = _feature_names(latest, features)
    wanted = {f.name: (f.dtype, f.vector_length) for f in latest.features}
    one_version = "pass version=N (a 'view@N:feature' reference) to replay one version"
    versions, served = _served_versions(store, latest, ts)
    older = {f.name for fv in versions for f in fv.features} - set(wanted)
    for name in names:
        if name in older:  # a name no version has is NotFoundError, as by event time
            raise InvalidArgumentError(
                f"features: {name!r} is not in view {latest.name!r} v{latest.version}, the "
                f"latest version, which types each column; {one_version}"
            )
    parts = []
    for i in np.unique(served).tolist():
        fv, rows = versions[i], np.flatnonzero(served == i)
        where = f"view {latest.name!r} v{fv.version}, which lookups read at label row {rows[0]}"
        if fv.entity != latest.entity:
            raise InvalidArgumentError(
                f"{where}, is keyed by entity {fv.entity!r}, not {latest.entity!r}; {one_version}"
            )
        has = {f.name: (f.dtype, f.vector_length) for f in fv.features}
        for name in names:
            if name in wanted and has.get(name) != wanted[name]:
                raise InvalidArgumentError(
                    f"features: {name!r} is missing from {where}, or has another type than in "
                    f"v{latest.version}; leave it out, or {one_version}"
                )
        keys = list(pick(query_keys, rows.tolist()))
        parts.append((rows, _replay(store, fv, keys, ts[rows], names, True)))
    if not parts:
        return _replay(store, latest, [], ts, names, True)
    return _merged(len(ts), parts)


def _merged(n: int, parts: list[tuple[np.ndarray, PointInTimeResult]]) -> PointInTimeResult:
    """The results of disjoint sets of query rows (their positions) as one result of n rows;
    their blocks match (same features and types, checked by the caller)."""
    first = parts[0][1]
    event_us = np.zeros(n, np.int64)
    row_status = np.zeros(n, first.row_status.dtype)
    blocks = [
        Block(
            b.dtype,
            b.features,
            np.empty((n, *b.values.shape[1:]), b.values.dtype),
            np.empty((n, *b.statuses.shape[1:]), b.statuses.dtype),
        )
        for b in first.blocks
    ]
    for rows, part in parts:
        event_us[rows] = part.event_us
        row_status[rows] = part.row_status
        for block, got in zip(blocks, part.blocks, strict=True):
            block.values[rows] = got.values
            block.statuses[rows] = got.statuses
    return PointInTimeResult(event_us, row_status, blocks)
