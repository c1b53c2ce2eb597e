"""Triton's response cache: a byte-bounded LRU of model outputs, shared by every model version
that enables it (config.toml `response_cache = true`) and sized by the server's
`response_cache_bytes`.

A key is a blake2b digest of the loaded version's load token, the requested output names and each
decoded input's name, dtype, shape and bytes, so raw and typed contents of the same values share
an entry, and a version loaded again (a new model.onnx under the same number) never reads the
entries of its earlier load. It lives on the event loop: no locks.

Inputs sent in shared memory are keyed like any other, by the bytes copied out of their regions
when the request was decoded (never by region name and offset, whose bytes the client can
rewrite), and the servicer writes a hit's outputs into the request's own regions: such requests
are cached with the same guarantee.
"""

from __future__ import annotations

import hashlib
import itertools
import struct
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from server.tensors import encode_raw

_LENGTH = struct.Struct("<Q")
ENTRY_OVERHEAD_BYTES = 512
"""Bytes each entry is charged beside its outputs: its key, entry, dict, array headers and LRU
node (measured with tracemalloc: ~509 bytes for one small output), so response_cache_bytes
bounds the memory the cache holds, and an answer of empty outputs still takes room."""


@dataclass(frozen=True, slots=True)
class _Entry:
    """One cached answer: whose load it belongs to, the outputs, and the bytes they count."""

    token: int
    outputs: dict[str, np.ndarray]
    nbytes: int


def outputs_nbytes(outputs: dict[str, np.ndarray]) -> int:
    """The bytes the outputs hold (BYTES outputs: their raw encoding, not their pointers)."""
    return sum(
        len(encode_raw("BYTES", a)) if a.dtype == object else a.nbytes for a in outputs.values()
    )


class ResponseCache:
    """A server-wide LRU of model outputs bounded by capacity_bytes (output bytes counted)."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self.used_bytes = 0
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self._keys_of: dict[int, set[bytes]] = {}
        """Each load's keys, so dropping a load touches only its own entries."""
        self._tokens = itertools.count(1)

    def __len__(self) -> int:
        return len(self._entries)

    def for_load(self) -> VersionCache:
        """The cache as one load of a model version sees it: a token of its own."""
        return VersionCache(self, next(self._tokens))

    def get(self, key: bytes) -> dict[str, np.ndarray] | None:
        """The outputs stored under key (now the most recently used), or None."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry.outputs

    def put(self, key: bytes, token: int, outputs: dict[str, np.ndarray]) -> None:
        """Store read-only copies of outputs under key, evicting the least recently used entries
        to make room; an entry is charged its output bytes plus ENTRY_OVERHEAD_BYTES, and one
        bigger than the whole cache is not stored."""
        nbytes = outputs_nbytes(outputs) + ENTRY_OVERHEAD_BYTES
        if nbytes > self.capacity_bytes:
            return
        self._remove(key)
        while self.used_bytes + nbytes > self.capacity_bytes:
            self._remove(next(iter(self._entries)))
        # Batch results are views of the whole batch's arrays: copy so an entry holds its own rows.
        owned = {name: _frozen_copy(array) for name, array in outputs.items()}
        self._entries[key] = _Entry(token, owned, nbytes)
        self._keys_of.setdefault(token, set()).add(key)
        self.used_bytes += nbytes

    def _remove(self, key: bytes) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.used_bytes -= entry.nbytes
            keys = self._keys_of[entry.token]
            keys.discard(key)
            if not keys:
                del self._keys_of[entry.token]

    def drop(self, token: int) -> None:
        """Remove every entry of one load (its version is unloading or was replaced)."""
        for key in list(self._keys_of.get(token, ())):
            self._remove(key)


def _frozen_copy(array: np.ndarray) -> np.ndarray:
    """A contiguous copy that no one can write to (hits hand the same arrays to every caller)."""
    copy = np.array(array, copy=True, order="C")
    copy.flags.writeable = False
    return copy


class VersionCache:
    """One load of a model version's view of the ResponseCache; stores nothing once closed."""

    __slots__ = ("_cache", "_closed", "_token")

    def __init__(self, cache: ResponseCache, token: int) -> None:
        self._cache = cache
        self._token = token
        self._closed = False

    def key(self, inputs: dict[str, np.ndarray], outputs: list[str]) -> bytes:
        """The digest of this load, the requested outputs, and the inputs (in name order)."""
        digest = hashlib.blake2b(_LENGTH.pack(self._token), digest_size=16)
        digest.update(_LENGTH.pack(len(outputs)))
        for name in outputs:
            _add_text(digest, name)
        for name in sorted(inputs):
            array = inputs[name]
            _add_text(digest, name)
            _add_text(digest, array.dtype.str)
            digest.update(_LENGTH.pack(array.ndim))
            digest.update(struct.pack(f"<{array.ndim}q", *array.shape))
            # dtype and shape fix the length of a numeric input; BYTES elements carry their own.
            if array.dtype == object:
                digest.update(encode_raw("BYTES", array))
            else:
                digest.update(np.ascontiguousarray(array))
        return digest.digest()

    def get(self, key: bytes) -> dict[str, np.ndarray] | None:
        """The cached outputs for key, or None."""
        return self._cache.get(key)

    def put(self, key: bytes, outputs: dict[str, np.ndarray]) -> None:
        """Store a successful result (after close, a request that was in flight stores nothing)."""
        if not self._closed:
            self._cache.put(key, self._token, outputs)

    def close(self) -> None:
        """Drop this load's entries and store no more: its version unloads or was replaced."""
        self._closed = True
        self._cache.drop(self._token)


def _add_text(digest: hashlib.blake2b, text: str) -> None:
    """Length-prefixed UTF-8, so that adjacent names cannot run into each other."""
    data = text.encode("utf-8", "surrogatepass")
    digest.update(_LENGTH.pack(len(data)))
    digest.update(data)
