"""Encoding kernels: stable FNV-1a 64 hashing of strings and int64, hash buckets, vocabulary
lookup and one-hot.

Hashes depend only on the bytes (UTF-8 for strings, 8 little-endian bytes for int64), never on
PYTHONHASHSEED, so Flink jobs, offline jobs and the server agree. Strings reach the kernels as one
uint8 buffer plus int64 offsets (string i is data[offsets[i]:offsets[i+1]]), the layout of
featureserve.v1.Array STRING.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from numba import njit

from featurestore.errors import InvalidArgumentError

FNV_OFFSET = np.uint64(0xCBF29CE484222325)
FNV_PRIME = np.uint64(0x100000001B3)


class StringColumn(NamedTuple):
    """A column of strings as UTF-8 bytes plus int64 offsets (len(offsets) == rows + 1)."""

    data: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return self.offsets.shape[0] - 1


def pack_strings(values: object) -> StringColumn:
    """A StringColumn from a sequence of str or bytes (or a StringColumn, returned as is).

    TypeError for an item that is neither (bytes(5) would be five NUL bytes), UnicodeEncodeError
    for a str that is not valid UTF-8 (a lone surrogate)."""
    if isinstance(values, StringColumn):
        return values
    items = values.ravel() if isinstance(values, np.ndarray) else values
    encoded = [v.encode() if isinstance(v, str) else memoryview(v).tobytes() for v in items]
    lengths = np.fromiter((len(b) for b in encoded), np.int64, count=len(encoded))
    offsets = np.zeros(len(encoded) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    data = np.frombuffer(bytearray(b"".join(encoded)), np.uint8)
    return StringColumn(data, offsets)


@njit(nogil=True, cache=True)
def fnv1a_strings(data: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """FNV-1a 64 hash of every string in (data, offsets), as uint64."""
    n = offsets.shape[0] - 1
    out = np.empty(max(n, 0), np.uint64)
    for i in range(n):
        h = FNV_OFFSET
        for j in range(offsets[i], offsets[i + 1]):
            h = (h ^ np.uint64(data[j])) * FNV_PRIME
        out[i] = h
    return out


@njit(nogil=True, cache=True)
def fnv1a_int64(values: np.ndarray) -> np.ndarray:
    """FNV-1a 64 hash of the 8 little-endian bytes of every int64, as uint64."""
    bits = values.view(np.uint64)
    out = np.empty(values.shape[0], np.uint64)
    mask = np.uint64(0xFF)
    for i in range(values.shape[0]):
        v = bits[i]
        h = FNV_OFFSET
        for k in range(8):
            h = (h ^ ((v >> np.uint64(8 * k)) & mask)) * FNV_PRIME
        out[i] = h
    return out


@njit(nogil=True, cache=True)
def hash_bucket_strings(data: np.ndarray, offsets: np.ndarray, n: int) -> np.ndarray:
    """Bucket fnv1a(string) % n in 0..n-1 for every string."""
    hashes = fnv1a_strings(data, offsets)
    out = np.empty(hashes.shape[0], np.int64)
    nu = np.uint64(n)
    for i in range(hashes.shape[0]):
        out[i] = np.int64(hashes[i] % nu)
    return out


@njit(nogil=True, cache=True)
def hash_bucket_int64(values: np.ndarray, n: int) -> np.ndarray:
    """Bucket fnv1a(value) % n in 0..n-1 for every int64."""
    hashes = fnv1a_int64(values)
    out = np.empty(hashes.shape[0], np.int64)
    nu = np.uint64(n)
    for i in range(hashes.shape[0]):
        out[i] = np.int64(hashes[i] % nu)
    return out


@njit(nogil=True, cache=True)
def vocab_index_strings(
    data: np.ndarray,
    offsets: np.ndarray,
    vocab_hashes: np.ndarray,
    vocab_order: np.ndarray,
    vocab_data: np.ndarray,
    vocab_offsets: np.ndarray,
) -> np.ndarray:
    """Index of every string in a vocabulary (see StringVocab), len(vocab) when absent.

    Looks the hash up in the sorted vocabulary hashes, then compares bytes, so a hash collision
    with an unknown string still gives the out-of-vocabulary index.
    """
    hashes = fnv1a_strings(data, offsets)
    size = vocab_hashes.shape[0]
    out = np.empty(hashes.shape[0], np.int64)
    for i in range(hashes.shape[0]):
        h = hashes[i]
        pos = np.searchsorted(vocab_hashes, h)
        out[i] = size
        if pos < size and vocab_hashes[pos] == h:
            idx = vocab_order[pos]
            a, b = offsets[i], offsets[i + 1]
            va, vb = vocab_offsets[idx], vocab_offsets[idx + 1]
            if b - a == vb - va:
                same = True
                for k in range(b - a):
                    if data[a + k] != vocab_data[va + k]:
                        same = False
                        break
                if same:
                    out[i] = idx
    return out


@njit(nogil=True, cache=True)
def vocab_index_int64(values: np.ndarray, vocab_sorted: np.ndarray, vocab_order: np.ndarray):
    """Index of every int64 in a vocabulary (sorted, with original order), len when absent."""
    size = vocab_sorted.shape[0]
    out = np.empty(values.shape[0], np.int64)
    for i in range(values.shape[0]):
        pos = np.searchsorted(vocab_sorted, values[i])
        if pos < size and vocab_sorted[pos] == values[i]:
            out[i] = vocab_order[pos]
        else:
            out[i] = size
    return out


@njit(nogil=True, cache=True)
def one_hot(indices: np.ndarray, width: int) -> np.ndarray:
    """A rows x width float32 block, 1 at each row's index (an index out of range: all 0)."""
    out = np.zeros((indices.shape[0], width), np.float32)
    for i in range(indices.shape[0]):
        k = indices[i]
        if 0 <= k < width:
            out[i, k] = 1.0
    return out


@dataclass(frozen=True)
class StringVocab:
    """A string vocabulary prepared for vocab_index_strings: hashes sorted, with original order."""

    hashes: np.ndarray
    order: np.ndarray
    data: np.ndarray
    offsets: np.ndarray

    @classmethod
    def build(cls, vocabulary: list[str], field: str = "vocabulary") -> StringVocab:
        """Hash and sort a vocabulary once; duplicate entries or 64-bit collisions are errors."""
        packed = pack_strings(vocabulary)
        hashes = fnv1a_strings(packed.data, packed.offsets)
        order = np.argsort(hashes, kind="stable")
        sorted_hashes = hashes[order]
        dup = np.flatnonzero(sorted_hashes[1:] == sorted_hashes[:-1])
        if dup.size:
            first = sorted(order[dup[0] : dup[0] + 2])
            raise InvalidArgumentError(
                f"{field}: entries {first[0]} and {first[1]} ({vocabulary[first[1]]!r}) are "
                "duplicates or share a 64-bit hash; remove one"
            )
        return cls(sorted_hashes, order.astype(np.int64), packed.data, packed.offsets)

    def lookup(self, column: StringColumn) -> np.ndarray:
        """The vocabulary index of every string, len(vocabulary) when absent."""
        return vocab_index_strings(
            column.data, column.offsets, self.hashes, self.order, self.data, self.offsets
        )


@dataclass(frozen=True)
class IntVocab:
    """An int64 vocabulary prepared for vocab_index_int64."""

    values: np.ndarray
    order: np.ndarray

    @classmethod
    def build(cls, vocabulary: list[int], field: str = "vocabulary") -> IntVocab:
        """Sort a vocabulary once; duplicate entries are errors."""
        vocab = np.asarray(vocabulary, dtype=np.int64).reshape(-1)
        order = np.argsort(vocab, kind="stable")
        ordered = vocab[order]
        dup = np.flatnonzero(ordered[1:] == ordered[:-1])
        if dup.size:
            raise InvalidArgumentError(f"{field}: {int(ordered[dup[0]])} appears twice; remove one")
        return cls(ordered, order.astype(np.int64))

    def lookup(self, values: np.ndarray) -> np.ndarray:
        """The vocabulary index of every value, len(vocabulary) when absent."""
        return vocab_index_int64(values, self.values, self.order)
