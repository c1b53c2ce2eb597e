"""Deterministic, unambiguous LMDB key encoding of entity keys (int64, string, composite).

INT64 parts are 8 bytes big-endian with the sign bit flipped (byte order = numeric order);
STRING parts are a 4-byte big-endian length then the UTF-8 (or raw bytes) value. Every part is
self-delimiting, so composite keys never collide.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from featurestore.dtypes import DType, wrong_type
from featurestore.errors import InvalidArgumentError
from featurestore.registry import Entity

MAX_KEY_BYTES = 511
INVALID_KEY = b"\xff"
"""Stands in for a row whose key is invalid: one byte, shorter than any real encoding."""

_SIGN = np.uint64(1 << 63)
_KEY_KINDS = {DType.INT64: "iu", DType.STRING: "OUS"}
"""NumPy dtype kinds a key column of each join key dtype may hold."""


@dataclass
class EncodedKeys:
    """The LMDB keys of a batch; rows in `errors` (row, column, reason) hold INVALID_KEY."""

    keys: list[bytes]
    errors: list[tuple[int, str, str]] = field(default_factory=list)


def key_rows(entity: Entity, keys: dict[str, np.ndarray], rows: int | None = None) -> int:
    """Check the key columns (known, 1-D, equal length, right kind, every join key present);
    return the rows. An empty request (no key rows, and `rows`, if given, 0) may leave join keys
    out: it is a valid request for nothing."""
    expected = [k.name for k in entity.join_keys]
    for name in keys:
        if name not in expected:
            raise InvalidArgumentError(
                f"key column {name!r} is not a join key of entity {entity.name!r}; "
                f"join keys: {', '.join(expected)}"
            )
    n = -1
    for key in entity.join_keys:
        if key.name not in keys:
            continue
        col = np.asarray(keys[key.name])
        if col.ndim != 1:
            raise InvalidArgumentError(
                f"key column {key.name!r} must be 1-D, got shape {col.shape}"
            )
        if n == -1:
            n = len(col)
        elif len(col) != n:
            raise InvalidArgumentError(
                f"key column {key.name!r} has {len(col)} rows, the first key column has {n}"
            )
        kind = col.dtype.kind
        if kind not in _KEY_KINDS[key.dtype] and not (kind == "O" and len(col) == 0):
            raise wrong_type(f"join key {key.name!r} of entity {entity.name!r}", key.dtype, col)
    n = max(n, 0)
    missing = [name for name in expected if name not in keys]
    if missing and (n or rows):
        raise InvalidArgumentError(
            f"key column {missing[0]!r} of entity {entity.name!r} is missing; "
            f"send every join key: {', '.join(expected)}"
        )
    return n


def keys_per_entity(
    reads: list[tuple[str, Entity]], keys: dict[str, np.ndarray]
) -> dict[str, dict[str, np.ndarray]]:
    """Split the key columns of a read of views of several entities into each entity's join-key
    columns. `reads` pairs each view read (named as errors name it) with its entity; every
    entity row carries the join keys of all of them, so every column has one value per row."""
    entities = {entity.name: entity for _, entity in reads}
    declared: dict[str, tuple[Entity, DType]] = {}
    for entity in entities.values():
        for key in entity.join_keys:
            other, dtype = declared.setdefault(key.name, (entity, key.dtype))
            if dtype != key.dtype:
                raise InvalidArgumentError(
                    f"key column {key.name!r} is a join key of entity {other.name!r} as "
                    f"{dtype.name} and of entity {entity.name!r} as {key.dtype.name}: one column "
                    "cannot hold both; read the views of these entities in separate lookups"
                )
    expected = list(dict.fromkeys(k.name for e in entities.values() for k in e.join_keys))
    for name in keys:
        if name not in expected:
            raise InvalidArgumentError(
                f"key column {name!r} is a join key of none of the views read; the views read "
                f"expect the join keys {', '.join(expected)} (entities {', '.join(entities)})"
            )
    rows = [(name, len(col)) for name, col in keys.items() if np.ndim(col) == 1]
    for name, m in rows[1:]:
        if m != rows[0][1]:
            raise InvalidArgumentError(
                f"key column {name!r} has {m} rows, key column {rows[0][0]!r} has "
                f"{rows[0][1]}; every key column needs one value per entity row"
            )
    out: dict[str, dict[str, np.ndarray]] = {}
    for view, entity in reads:
        if entity.name in out:
            continue
        names = [k.name for k in entity.join_keys]
        missing = [name for name in names if name not in keys]
        if missing and rows and rows[0][1]:
            raise InvalidArgumentError(
                f"key column {missing[0]!r} is missing: {view} is read by the join keys of "
                f"its entity {entity.name!r} ({', '.join(names)}); add a {missing[0]!r} "
                "column with one value per entity row, or read that view in a separate lookup"
            )
        out[entity.name] = {name: keys[name] for name in names if name in keys}
    return out


def _int_part(col: np.ndarray, name: str, errors: list[tuple[int, str, str]]) -> np.ndarray:
    """n x 8 uint8 big-endian sign-flipped encoding of an integer column."""
    if col.dtype == np.uint64:
        bad = np.flatnonzero(col > np.uint64(np.iinfo(np.int64).max))
        errors.extend((int(r), name, "value exceeds the int64 range") for r in bad)
    as_u = col.astype(np.int64).view(np.uint64) ^ _SIGN
    return as_u.astype(">u8").view(np.uint8).reshape(-1, 8)


def _str_part(col: np.ndarray, name: str, errors: list[tuple[int, str, str]]) -> list[bytes]:
    """Length-prefixed bytes of a string column; bad values become b"" and an error."""
    out: list[bytes] = []
    for row, value in enumerate(col.tolist()):
        if isinstance(value, str):
            try:
                raw = value.encode()
            except UnicodeEncodeError:
                errors.append((row, name, "string is not valid Unicode (lone surrogate)"))
                raw = b""
        elif isinstance(value, bytes):
            raw = value
        else:
            errors.append((row, name, f"expected str or bytes, got {type(value).__name__}"))
            raw = b""
        out.append(len(raw).to_bytes(4, "big") + raw)
    return out


def _oversized_keys(
    entity: Entity, parts: list[np.ndarray | list[bytes]]
) -> list[tuple[int, str, str]]:
    """An error for each row whose key is over MAX_KEY_BYTES, naming its string join keys and
    how many string bytes a key of the entity may hold: the limit less the encoding's fixed
    bytes (8 per INT64 part, a 4-byte length per STRING part)."""
    strings = [
        (key.name, np.fromiter(map(len, part), np.int64, len(part)) - 4)
        for key, part in zip(entity.join_keys, parts, strict=True)
        if isinstance(part, list)
    ]
    overhead = sum(8 if key.dtype is DType.INT64 else 4 for key in entity.join_keys)
    room = MAX_KEY_BYTES - overhead
    total = sum(sizes for _, sizes in strings)
    errors = []
    for row in np.flatnonzero(total > room).tolist():
        sizes = [(name, int(col[row])) for name, col in strings]
        longest = max(sizes, key=lambda item: item[1])[0]
        if len(sizes) == 1:
            sent = f"join key {longest!r}: {sizes[0][1]} bytes"
        else:
            each = ", ".join(f"{name!r} {size}" for name, size in sizes)
            sent = f"join keys {each}: {int(total[row])} bytes of strings"
        errors.append(
            (
                row,
                longest,
                f"{sent}; a key of entity {entity.name!r} holds at most {room} bytes of "
                f"strings (LMDB's {MAX_KEY_BYTES}-byte key limit less the encoding's "
                f"{overhead} bytes); shorten {'it' if len(sizes) == 1 else 'them'}",
            )
        )
    return errors


def encode_keys(entity: Entity, keys: dict[str, np.ndarray]) -> EncodedKeys:
    """Encode a batch of key columns to one LMDB key per row (checks them with key_rows)."""
    if len(keys) == 1 and len(entity.join_keys) == 1 and entity.join_keys[0].dtype is DType.INT64:
        col = keys.get(entity.join_keys[0].name)
        if isinstance(col, np.ndarray) and col.dtype == np.int64 and col.ndim == 1:
            return EncodedKeys((col.view(np.uint64) ^ _SIGN).astype(">u8").view("V8").tolist())
    n = key_rows(entity, keys)
    if n == 0:
        return EncodedKeys([])
    errors: list[tuple[int, str, str]] = []
    parts: list[np.ndarray | list[bytes]] = []
    for key in entity.join_keys:
        col = np.asarray(keys[key.name])
        if key.dtype is DType.INT64:
            parts.append(_int_part(col, key.name, errors))
        else:
            parts.append(_str_part(col, key.name, errors))
    if all(isinstance(p, np.ndarray) for p in parts):
        mat = np.ascontiguousarray(np.hstack(parts)) if len(parts) > 1 else parts[0]
        out = mat.view(f"V{mat.shape[1]}").ravel().tolist()
    else:
        cols = [p if isinstance(p, list) else p.view("V8").ravel().tolist() for p in parts]
        out = [b"".join(row) for row in zip(*cols, strict=True)] if len(cols) > 1 else cols[0]
        errors.extend(_oversized_keys(entity, parts))
    if errors:
        errors.sort()
        first: dict[int, tuple[int, str, str]] = {}
        for err in errors:
            first.setdefault(err[0], err)
        errors = list(first.values())
        for row, _, _ in errors:
            out[row] = INVALID_KEY
    return EncodedKeys(out, errors)


def decode_keys(entity: Entity, encoded: list[bytes]) -> dict[str, np.ndarray]:
    """Inverse of encode_keys: key columns (int64 arrays; object arrays of str, or bytes when
    the stored value is not UTF-8)."""
    cols: dict[str, list] = {k.name: [] for k in entity.join_keys}
    for raw in encoded:
        pos = 0
        for key in entity.join_keys:
            if key.dtype is DType.INT64:
                value = int.from_bytes(raw[pos : pos + 8], "big") ^ (1 << 63)
                cols[key.name].append(value - (1 << 64) if value >= 1 << 63 else value)
                pos += 8
            else:
                size = int.from_bytes(raw[pos : pos + 4], "big")
                text = raw[pos + 4 : pos + 4 + size]
                try:
                    cols[key.name].append(text.decode())
                except UnicodeDecodeError:
                    cols[key.name].append(text)
                pos += 4 + size
    out: dict[str, np.ndarray] = {}
    for key in entity.join_keys:
        if key.dtype is DType.INT64:
            out[key.name] = np.array(cols[key.name], dtype=np.int64)
        else:
            arr = np.empty(len(cols[key.name]), dtype=object)
            arr[:] = cols[key.name]
            out[key.name] = arr
    return out
