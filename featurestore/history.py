"""Offline history: every accepted write batch, appended in the online write's transaction.

Each view version has a named database b"h:<name>@<version>" keyed by a big-endian sequence
number; a value packs one batch's LMDB keys and packed rows. Every row that passed validation
is logged, including rows that were stale online (late data still matters to training).
Replaying it rebuilds the online store, and it answers point-in-time-correct training queries.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from featurestore.errors import InvalidArgumentError
from featurestore.keys import INVALID_KEY, decode_keys, encode_keys
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


@dataclass
class HistoryLog:
    """Every logged row of a view version, in write order: LMDB keys, event times, rows."""

    keys: list[bytes]
    event_us: np.ndarray
    rows: list[bytes]


def read_log(store: OnlineStore, view: str, version: int = 0) -> HistoryLog:
    """All history records of a view version, concatenated in write order."""
    fv = store.registry.get_view(view, version)
    keys: list[bytes] = []
    rows: list[bytes] = []
    for blob in store.history_blobs(fv.name, fv.version):
        k, r = unpack_batch(blob)
        keys.extend(k)
        rows.extend(r)
    events = np.frombuffer(b"".join(r[8:16] for r in rows), "<i8").astype(np.int64)
    return HistoryLog(keys, events, rows)


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


def rebuild_online(store: OnlineStore, view: str, version: int = 0) -> int:
    """Empty the online rows of a view version and replay its history; returns rows replayed."""
    fv = store.registry.get_view(view, version)
    log = read_log(store, fv.name, fv.version)
    events = log.event_us.tolist()
    latest: dict[bytes, int] = {}
    for i, key in enumerate(log.keys):
        prev = latest.get(key)
        if prev is None or events[i] > events[prev]:
            latest[key] = i
    pairs = [(log.keys[i], log.rows[i]) for i in sorted(latest.values())]
    store.replace_online_rows(fv.name, fv.version, pairs)
    return len(log.keys)


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


def point_in_time(
    store: OnlineStore,
    view: str,
    entity_keys: dict[str, np.ndarray],
    timestamps: np.ndarray,
    features: Sequence[str] | None = None,
    version: int = 0,
) -> PointInTimeResult:
    """For each (entity, timestamp): the latest logged row with event time <= timestamp.

    Rows older than timestamp - ttl_seconds are withheld as OUTSIDE_MAX_AGE; among rows with the
    same event time the earlier write wins, as in the online store.
    """
    fv = store.registry.get_view(view, version)
    entity = store.registry.get_entity(fv.entity)
    log = read_log(store, fv.name, fv.version)
    query_keys = encode_keys(entity, entity_keys).keys
    ts = _label_times(timestamps, len(query_keys))
    ids: dict[bytes, int] = {}
    log_id = np.fromiter((ids.setdefault(k, len(ids)) for k in log.keys), np.int64, len(log.keys))
    query_id = np.fromiter(
        (ids.get(k, -1) if k != INVALID_KEY else -1 for k in query_keys), np.int64, len(ts)
    )
    order = np.lexsort((-np.arange(len(log_id)), log.event_us, log_id))
    sorted_id = log_id[order]
    sorted_ev = log.event_us[order]
    times = np.concatenate([sorted_ev, ts])
    _, rank = np.unique(times, return_inverse=True)
    width = np.int64(len(times) + 1)
    log_code = sorted_id * width + rank[: len(sorted_ev)]
    query_code = query_id * width + rank[len(sorted_ev) :]
    pos = np.searchsorted(log_code, query_code, side="right") - 1
    safe = np.clip(pos, 0, max(len(order) - 1, 0))
    hit = (query_id >= 0) & (pos >= 0) & (sorted_id[safe] == query_id if len(order) else False)
    rows = [log.rows[order[p]] if h else MISSING_ROW for p, h in zip(safe, hit, strict=True)]
    cutoff = ttl_cutoff(ts, fv.ttl_seconds)
    names = list(features) if features is not None else [f.name for f in fv.features]
    decoded = decode_rows(DecodePlan(RowLayout(fv), names), rows, cutoff)
    return PointInTimeResult(decoded.event_us, decoded.row_status, decoded.blocks)
