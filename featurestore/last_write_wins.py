"""Last-write-wins by event time for one commit's rows: key order, stored event times and the
sequential resolution of repeated keys, as array passes instead of per-row Python.

A commit of random updates touches one B-tree leaf per row, so durable ingest throughput comes
from large commits; at 64k-200k rows a commit, per-row Python here would cost as much as LMDB.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise
from operator import itemgetter
from typing import TypeVar

import numpy as np
from numba import njit

T = TypeVar("T")
MIN_EVENT = np.iinfo(np.int64).min
EVENT_OFFSET = 8
"""Byte offset of the little-endian int64 event time in a packed row (see row_codec)."""


def key_order(keys: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Indices that visit `keys` in byte order (stable: equal keys keep arrival order), and for
    each visited position whether it starts a run of equal keys."""
    n = len(keys)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.bool_)
    lengths = np.fromiter(map(len, keys), np.int64, n)
    width = int(lengths[0])
    if width and (lengths == width).all():
        return _fixed_width_order(b"".join(keys), n, width)
    order = np.array(sorted(range(n), key=keys.__getitem__), np.int64)
    ordered = [keys[i] for i in order.tolist()]
    starts = np.ones(n, np.bool_)
    starts[1:] = [a != b for a, b in pairwise(ordered)]
    return order, starts


def _fixed_width_order(joined: bytes, n: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """key_order for keys of one width: compare them as big-endian 64-bit words."""
    words = -(-width // 8)
    padded = np.zeros((n, words * 8), np.uint8)
    padded[:, :width] = np.frombuffer(joined, np.uint8).reshape(n, width)
    columns = padded.view(">u8").astype(np.uint64)
    order = np.lexsort(columns.T[::-1]) if words > 1 else np.argsort(columns[:, 0], kind="stable")
    ordered = columns[order]
    starts = np.ones(n, np.bool_)
    starts[1:] = np.any(ordered[1:] != ordered[:-1], axis=1)
    return order.astype(np.int64), starts


def pick(items: list[T], indices: list[int]) -> Sequence[T]:
    """items[i] for each i, gathered in one C call: over a commit's rows, visited in key order
    (random in memory), ~10% faster than mapping items.__getitem__ along the apply."""
    if len(indices) == 1:
        return (items[indices[0]],)
    return itemgetter(*indices)(items) if indices else ()


def stored_events(values: list[bytes | None]) -> np.ndarray:
    """Event time of each stored row (MIN_EVENT where there is none)."""
    present = [v or b"" for v in values]
    lengths = np.fromiter(map(len, present), np.int64, len(present))
    blob = np.frombuffer(b"".join(present), np.uint8)
    return _events_kernel(blob, lengths)


@njit(nogil=True, cache=True)
def _events_kernel(blob: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    out = np.empty(len(lengths), np.int64)
    pos = 0
    for i in range(len(lengths)):
        if lengths[i] >= EVENT_OFFSET + 8:
            value = np.int64(0)
            for b in range(8):
                value |= np.int64(blob[pos + EVENT_OFFSET + b]) << np.int64(8 * b)
            out[i] = value
        else:
            out[i] = MIN_EVENT
        pos += lengths[i]
    return out


@njit(nogil=True, cache=True)
def newest_per_key(events: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """For rows in key order, the position of each key's newest row (the first of equal newest
    ones): the only row of the key that can end up stored."""
    out = np.empty(int(starts.sum()), np.int64)
    k = -1
    for i in range(len(events)):
        if starts[i]:
            k += 1
            out[k] = i
        elif events[i] > events[out[k]]:
            out[k] = i
    return out


@njit(nogil=True, cache=True)
def resolve(events: np.ndarray, stored: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Sequential last-write-wins over rows in key order (equal keys adjacent, arrival order
    within a key): whether each row is applied, i.e. its event is newer than everything before
    it for its key (the stored row, then earlier rows of the commit); an equal event is stale.
    The row that ends up stored is the key's newest (newest_per_key) when it is applied."""
    applied = np.zeros(len(events), np.bool_)
    current = MIN_EVENT
    for i in range(len(events)):
        if starts[i]:
            current = stored[i]
        if events[i] > current:
            applied[i] = True
            current = events[i]
    return applied


def resolve_reference(
    keys: list[bytes], events: np.ndarray, stored: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Plain-Python last-write-wins in arrival order, the reference `resolve` is tested against.

    stored[i] is the event time stored for keys[i] before the commit. Returns (applied, final)
    in arrival order.
    """
    applied = np.zeros(len(keys), np.bool_)
    current: dict[bytes, tuple[int, int]] = {}
    for i, key in enumerate(keys):
        base, _ = current.get(key, (int(stored[i]), -1))
        if int(events[i]) > base:
            applied[i] = True
            current[key] = (int(events[i]), i)
        else:
            current.setdefault(key, (base, -1))
    final = np.zeros(len(keys), np.bool_)
    final[[i for _, i in current.values() if i >= 0]] = True
    return applied, final
