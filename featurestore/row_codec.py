"""Packed online rows: encode a batch of columns to row bytes, decode row bytes to NumPy blocks.

Row layout (little-endian, 4-byte words, length a multiple of 4): row_len u32 | nfeat u16 |
reserved u16 | event_us i64 | write_us i64 | null bitmap (ceil(nfeat/32) u32 words) | fixed block
(non-string features < nfeat in view order; BOOL takes a 4-byte cell) | per string feature <
nfeat: u32 length + UTF-8 bytes | zero padding. nfeat records the layout the row was written
with, so rows written before an in-place "add feature" update decode with the added features as
NULL_VALUE. Leading row_len lets the decoder walk a concatenation of rows without offsets.
Decoding never reads past a row's end: a row that does not fit its layout is a CorruptRowError.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numba import njit

from featurestore.dtypes import DType, FeatureStatus, numpy_dtype
from featurestore.errors import CorruptRowError
from featurestore.registry import FeatureView

HEADER_BYTES = 24
MISSING_ROW = (4).to_bytes(4, "little")
"""Stands in for an absent row in a concatenation: a row of length 4 decodes as NOT_FOUND."""
NO_CUTOFF = np.iinfo(np.int64).min


def ttl_cutoff(times_us: np.ndarray | int, ttl_seconds: int) -> np.ndarray | np.int64:
    """Per time (an int64 array or one int), the oldest event time a TTL of ttl_seconds keeps
    (NO_CUTOFF for no TTL), clamped to int64: a TTL beyond the µs range keeps every row (it
    overflowed, failing every read of the view)."""
    if not ttl_seconds:
        return np.full(np.shape(times_us), NO_CUTOFF, np.int64)
    ttl_us = np.int64(min(ttl_seconds * 1_000_000, np.iinfo(np.int64).max))
    return np.maximum(np.asarray(times_us, np.int64), NO_CUTOFF + ttl_us) - ttl_us


_WRONG_LENGTH = 1
_SHORT = 2
_TOO_MANY_FEATURES = 3
_FIXED_PAST_END = 4
_STRING_PAST_END = 5
_TRAILING_BYTES = 6
_UNALIGNED = 7
_BAD_UTF8 = 8
_CORRUPT = {
    _WRONG_LENGTH: "its length field does not match its stored length",
    _SHORT: f"it is shorter than the {HEADER_BYTES}-byte row header",
    _TOO_MANY_FEATURES: "it holds more features than the view version defines",
    _FIXED_PAST_END: "its null bitmap and fixed-width values run past its end",
    _STRING_PAST_END: "a string value's length runs past its end",
    _TRAILING_BYTES: "it has bytes left after its last value",
    _UNALIGNED: "its length is not a multiple of 4 bytes",
    _BAD_UTF8: "a string value is not valid UTF-8",
}
"""Why a stored row does not decode, by the reason code the decoders report."""
_WALK_BY_LENGTH_FIELDS = np.zeros(0, np.int64)
"""The kernel's bounds when rows are walked by their own length fields."""


def _corrupt(view: FeatureView, row: int, n: int, reason: int) -> CorruptRowError:
    return CorruptRowError(
        f"feature view {view.name!r} version {view.version}: stored row {row} of the {n} read "
        f"is corrupt ({_CORRUPT[reason]}), so the read fails rather than return wrong values; "
        "write that entity's features again with a newer event time to replace the row, or "
        "delete the view version",
        row,
    )


def cell_width(dtype: DType, vector_length: int = 0) -> int:
    """Bytes one value takes in a row's fixed block (BOOL is padded to 4); 0 for STRING."""
    dtype = DType(dtype)
    if dtype is DType.STRING:
        return 0
    if dtype is DType.FLOAT32_VECTOR:
        return 4 * vector_length
    return 4 if dtype in (DType.FLOAT32, DType.BOOL) else 8


def row_event_us(row: bytes) -> int:
    """The event time of a packed row."""
    return int.from_bytes(row[8:16], "little", signed=True)


@dataclass
class Block:
    """Values of the requested features sharing one dtype (and vector length).

    values: rows x k (x vector_length); object array of str for STRING. statuses: uint8 rows x k.
    """

    dtype: DType
    features: list[str]
    values: np.ndarray
    statuses: np.ndarray


@dataclass
class Decoded:
    """A decoded batch: per-row event time (0 where not found), row status and blocks."""

    event_us: np.ndarray
    row_status: np.ndarray
    blocks: list[Block]


class RowLayout:
    """Word offsets of a view's features inside its packed rows."""

    def __init__(self, view: FeatureView) -> None:
        self.view = view
        self.widths = np.array(
            [cell_width(f.dtype, f.vector_length) for f in view.features], np.int64
        )
        self.fixed_prefix = np.zeros(len(view.features) + 1, np.int64)
        np.cumsum(self.widths // 4, out=self.fixed_prefix[1:])
        self.string_index = np.array(
            [i for i, f in enumerate(view.features) if f.dtype is DType.STRING], np.int64
        )
        self.index = {f.name: i for i, f in enumerate(view.features)}
        self.runs = _fixed_runs(view, self.widths)


@dataclass(frozen=True)
class _FixedRun:
    """Consecutive fixed-width features of one dtype, encoded with one copy (BOOL: one each,
    its 1-byte value in a 4-byte cell)."""

    lo: int
    hi: int
    names: list[str]
    dtype: np.dtype
    value_bytes: int


def _fixed_runs(view: FeatureView, widths: np.ndarray) -> list[_FixedRun]:
    runs: list[_FixedRun] = []
    for i, feat in enumerate(view.features):
        if widths[i] == 0:
            continue
        dtype = np.dtype(numpy_dtype(feat.dtype))
        value_bytes = dtype.itemsize * (feat.vector_length or 1)
        last = runs[-1] if runs else None
        if (
            last is not None
            and last.hi == i
            and feat.dtype is not DType.BOOL
            and view.features[last.lo].dtype is feat.dtype
            and last.value_bytes == value_bytes
        ):
            last.names.append(feat.name)
            runs[-1] = _FixedRun(last.lo, i + 1, last.names, dtype, value_bytes)
        else:
            runs.append(_FixedRun(i, i + 1, [feat.name], dtype, value_bytes))
    return runs


def encode_rows(
    layout: RowLayout,
    event_us: np.ndarray,
    write_us: int,
    columns: dict[str, np.ndarray | list[bytes]],
    nulls: dict[str, np.ndarray],
) -> list[bytes]:
    """Pack one row per entity from validated columns (fixed features as arrays of the feature's
    NumPy dtype, strings as lists of UTF-8 bytes); null values are stored as zeros/empty.

    Columns of another dtype raise TypeError rather than being cast: converting is the store's
    job, which checks that no value changes (OnlineStore.prepare)."""
    feats = layout.view.features
    n = len(event_us)
    nfeat = len(feats)
    start = HEADER_BYTES + 4 * ((nfeat + 31) // 32)
    fixed_len = start + 4 * int(layout.fixed_prefix[-1])
    mat = np.zeros((n, fixed_len), np.uint8)
    mat[:, 4:6] = np.frombuffer(nfeat.to_bytes(2, "little"), np.uint8)
    mat[:, 8:16] = np.ascontiguousarray(event_us, "<i8").view(np.uint8).reshape(n, 8)
    mat[:, 16:24] = np.frombuffer(int(write_us).to_bytes(8, "little", signed=True), np.uint8)
    null_mat = np.zeros((n, 32 * ((nfeat + 31) // 32)), np.bool_)
    for i, feat in enumerate(feats):
        mask = nulls.get(feat.name)
        if mask is not None:
            null_mat[:, i] = mask
    mat[:, HEADER_BYTES:start] = np.packbits(null_mat, axis=1, bitorder="little")
    for run in layout.runs:
        block = np.stack(
            [columns[name] for name in run.names], axis=1, dtype=run.dtype, casting="equiv"
        )
        block[null_mat[:, run.lo : run.hi]] = 0
        off = start + 4 * int(layout.fixed_prefix[run.lo])
        size = run.value_bytes * (run.hi - run.lo)
        mat[:, off : off + size] = block.view(np.uint8).reshape(n, size)
    if len(layout.string_index) == 0:
        mat[:, 0:4] = np.frombuffer(fixed_len.to_bytes(4, "little"), np.uint8)
        return mat.view(f"V{fixed_len}").ravel().tolist() if n else []
    total = np.full(n, fixed_len, np.int64)
    parts: list[list[bytes]] = [[]]
    for i in layout.string_index:
        feat = feats[i]
        values = [
            b"" if null else v for v, null in zip(columns[feat.name], null_mat[:, i], strict=True)
        ]
        lengths = np.fromiter(map(len, values), np.int64, n)
        total += 4 + lengths
        parts.append(lengths.astype("<u4").view("V4").tolist())
        parts.append(values)
    pad = (-total) % 4
    total += pad
    mat[:, 0:4] = total.astype("<u4").view(np.uint8).reshape(n, 4)
    parts[0] = mat.view(f"V{fixed_len}").ravel().tolist()
    parts.append([bytes(p) for p in pad.tolist()])
    return [b"".join(row) for row in zip(*parts, strict=True)]


@njit(nogil=True, cache=True)
def _decode_kernel(
    words,
    bounds,
    cutoff,
    spec,
    runs,
    fixed_prefix,
    string_index,
    out,
    status,
    str_pos,
    event,
    row_status,
):
    """Decode concatenated rows into out (rows x words), statuses, string (byte start, length)
    pairs, per-row event time (0 where not found) and row status.

    Row r is words[bounds[r]:bounds[r + 1]]; with empty bounds, rows are walked by their length
    fields, and a length that is not whole words or runs past the buffer stops the walk. Every
    read is checked against the row's extent: a row that does not fit its layout is left
    undecoded. Returns (first such row or -1, its _CORRUPT reason, words walked)."""
    n = cutoff.size
    k = spec.shape[0]
    nviewfeat = fixed_prefix.size - 1
    nstr = string_index.size
    width = out.shape[1]
    flat = out.reshape(-1)
    raw = words.view(np.uint8)
    total = words.size
    walk = bounds.size == 0
    starts = np.zeros(nstr, np.int64)
    lens = np.zeros(nstr, np.int64)
    first_bad = -1
    first_reason = 0
    end = 0
    for r in range(n):
        p = end
        if not walk:
            p = bounds[r]
            end = bounds[r + 1]
        elif p < total and words[p] % 4 == 0 and words[p] != 0 and words[p] // 4 <= total - p:
            end = p + (np.int64(words[p]) >> 2)
        else:
            return r, _WRONG_LENGTH, p
        event[r] = 0
        row_status[r] = 0
        reason = _SHORT
        if end > p:
            reason = 0 if np.int64(words[p]) == 4 * (end - p) else _WRONG_LENGTH
        if reason == 0 and end - p == 1:
            row_status[r] = 2
            for j in range(k):
                status[r, j] = 2
            continue
        if reason == 0 and end - p < 6:
            reason = _SHORT
        nfeat = 0
        fstart = p + 6
        if reason == 0:
            nfeat = np.int64(words[p + 1] & 0xFFFF)
            fstart = p + 6 + (nfeat + 31) // 32
            if nfeat > nviewfeat:
                reason = _TOO_MANY_FEATURES
            elif fstart + fixed_prefix[nfeat] > end:
                reason = _FIXED_PAST_END
        if reason == 0:
            pos = 4 * (fstart + fixed_prefix[nfeat])
            stop = 4 * end
            for s in range(nstr):
                if string_index[s] >= nfeat:
                    break
                if stop - pos < 4:
                    reason = _STRING_PAST_END
                    break
                w = np.int64(raw[pos]) | (np.int64(raw[pos + 1]) << 8)
                w |= (np.int64(raw[pos + 2]) << 16) | (np.int64(raw[pos + 3]) << 24)
                if w > stop - pos - 4:
                    reason = _STRING_PAST_END
                    break
                starts[s] = pos + 4
                lens[s] = w
                pos += 4 + w
            if reason == 0 and stop - pos > 3:
                reason = _TRAILING_BYTES
        if reason != 0:
            if first_bad < 0:
                first_bad = r
                first_reason = reason
            continue
        ev = np.int64(np.uint64(words[p + 2]) | (np.uint64(words[p + 3]) << np.uint64(32)))
        event[r] = ev
        if ev < cutoff[r]:
            row_status[r] = 4
            for j in range(k):
                status[r, j] = 4
            continue
        row_status[r] = 1
        bitmap = p + 6
        for m in range(runs.shape[0]):
            lo = runs[m, 0]
            hi = min(runs[m, 1], nfeat)
            src = fstart + fixed_prefix[lo]
            dst = r * width + runs[m, 2]
            for t in range(fixed_prefix[hi] - fixed_prefix[lo]):
                flat[dst + t] = words[src + t]
        clean = nfeat == nviewfeat
        for b in range(fstart - bitmap):
            if words[bitmap + b] != 0:
                clean = False
        if clean and str_pos.shape[1] == 0:
            for j in range(k):
                status[r, j] = 1
        else:
            for j in range(k):
                fi = spec[j, 0]
                if fi >= nfeat or (words[bitmap + (fi >> 5)] >> np.uint32(fi & 31)) & 1:
                    status[r, j] = 3
                    continue
                status[r, j] = 1
                slot = spec[j, 1]
                if slot >= 0:
                    str_pos[r, slot, 0] = starts[spec[j, 2]]
                    str_pos[r, slot, 1] = lens[spec[j, 2]]
    return first_bad, first_reason, end


@dataclass
class _BlockSpec:
    dtype: DType
    vector_length: int
    features: list[str]
    col_lo: int
    col_hi: int
    word_lo: int
    word_hi: int
    slot_lo: int


class DecodePlan:
    """How to decode a chosen list of a view's features into per-dtype blocks (built once)."""

    def __init__(self, layout: RowLayout, features: Sequence[str]) -> None:
        view = layout.view
        self.layout = layout
        groups: dict[tuple[DType, int], list[int]] = {}
        for name in features:
            if name not in layout.index:
                view.feature(name)
            feat = view.features[layout.index[name]]
            groups.setdefault((feat.dtype, feat.vector_length), []).append(layout.index[name])
        spec_rows: list[tuple[int, int, int]] = []
        runs: list[list[int]] = []
        self.blocks: list[_BlockSpec] = []
        string_ordinal = {int(fi): s for s, fi in enumerate(layout.string_index)}
        word, slot = 0, 0
        for (dtype, vlen), idxs in groups.items():
            names = [view.features[i].name for i in idxs]
            spec = _BlockSpec(dtype, vlen, names, len(spec_rows), 0, word, 0, slot)
            for i in idxs:
                if dtype is DType.STRING:
                    spec_rows.append((i, slot, string_ordinal[i]))
                    slot += 1
                    continue
                spec_rows.append((i, -1, 0))
                if runs and runs[-1][1] == i and runs[-1][3] == word:
                    runs[-1][1] = i + 1
                else:
                    runs.append([i, i + 1, word, word])
                word += int(layout.widths[i]) // 4
                runs[-1][3] = word
            spec.col_hi = len(spec_rows)
            spec.word_hi = word
            self.blocks.append(spec)
        self.spec = np.array(spec_rows, np.int64).reshape(-1, 3)
        self.runs = np.array([r[:3] for r in runs], np.int64).reshape(-1, 3)
        self.fixed_words = word
        self.string_slots = slot


def decode_rows(plan: DecodePlan, rows: Sequence[bytes], cutoff_us: np.ndarray) -> Decoded:
    """Decode rows (MISSING_ROW = not found) in one Numba pass; rows with event < cutoff_us[row]
    are withheld as OUTSIDE_MAX_AGE (their event time is still reported).

    A stored row that does not fit the view's layout (length field, feature count or a string
    length past its end, bytes left over, a returned string not UTF-8) is never read past its
    end: it fails the whole read with CorruptRowError naming the view version and the row, as
    none of its values can be trusted and NOT_FOUND would hide the damage. Rows are walked by
    their length fields; only when that walk fails are their lengths taken, to name the row."""
    n = len(rows)
    raw = b"".join(rows)
    decoded = None
    if len(raw) % 4 == 0:
        decoded = _decode(plan, raw, _WALK_BY_LENGTH_FIELDS, cutoff_us)[0]
    if decoded is None:
        lengths = np.fromiter(map(len, rows), np.int64, n)
        unaligned = np.flatnonzero(lengths % 4)
        if unaligned.size:
            raise _corrupt(plan.layout.view, int(unaligned[0]), n, _UNALIGNED)
        bounds = np.zeros(n + 1, np.int64)
        np.cumsum(lengths // 4, out=bounds[1:])
        decoded, bad_row, reason = _decode(plan, raw, bounds, cutoff_us)
        if decoded is None:
            raise _corrupt(plan.layout.view, bad_row, n, reason)
    return decoded


def _decode(
    plan: DecodePlan, raw: bytes, bounds: np.ndarray, cutoff_us: np.ndarray
) -> tuple[Decoded | None, int, int]:
    """One kernel pass: (the decoded rows, -1, 0), or (None, first bad row, its reason); a walk
    that stops short of the buffer's end fails at row n."""
    n = cutoff_us.size
    words = np.frombuffer(raw, np.uint32)
    out = np.zeros((n, plan.fixed_words), np.uint32)
    status = np.empty((n, len(plan.spec)), np.uint8)
    str_pos = np.zeros((n, plan.string_slots, 2), np.int64)
    event = np.empty(n, np.int64)
    row_status = np.empty(n, np.uint8)
    bad_row, reason, walked = _decode_kernel(
        words,
        bounds,
        cutoff_us,
        plan.spec,
        plan.runs,
        plan.layout.fixed_prefix,
        plan.layout.string_index,
        out,
        status,
        str_pos,
        event,
        row_status,
    )
    if bad_row < 0 and walked != words.size:
        bad_row, reason = n, _WRONG_LENGTH
    if bad_row >= 0:
        return None, bad_row, reason
    try:
        blocks = _assemble(plan, raw, out, status, str_pos)
    except UnicodeDecodeError:
        return None, _first_bad_utf8(raw, str_pos), _BAD_UTF8
    return Decoded(event, row_status, blocks), -1, 0


def _assemble(
    plan: DecodePlan, raw: bytes, out: np.ndarray, status: np.ndarray, str_pos: np.ndarray
) -> list[Block]:
    n = out.shape[0]
    blocks = []
    for spec in plan.blocks:
        k = spec.col_hi - spec.col_lo
        statuses = status
        if k != status.shape[1]:
            statuses = np.ascontiguousarray(status[:, spec.col_lo : spec.col_hi])
        if spec.dtype is DType.STRING:
            pos = str_pos[:, spec.slot_lo : spec.slot_lo + k].reshape(-1, 2).tolist()
            values = np.empty(n * k, object)
            values[:] = [raw[s : s + size].decode() for s, size in pos]
            values = values.reshape(n, k)
        elif spec.dtype is DType.BOOL:
            cells = out[:, spec.word_lo : spec.word_hi]
            values = (cells & 0xFF).astype(np.bool_)
        else:
            part = out
            if spec.word_lo != 0 or spec.word_hi != plan.fixed_words:
                part = np.ascontiguousarray(out[:, spec.word_lo : spec.word_hi])
            values = part.view(numpy_dtype(spec.dtype))
            if spec.dtype is DType.FLOAT32_VECTOR:
                values = values.reshape(n, k, spec.vector_length)
            else:
                values = values.reshape(n, k)
        blocks.append(Block(spec.dtype, list(spec.features), values, statuses))
    return blocks


def _first_bad_utf8(raw: bytes, str_pos: np.ndarray) -> int:
    """The first row holding a decoded string that is not UTF-8 (only once one failed)."""
    for row, pairs in enumerate(str_pos.tolist()):
        for start, size in pairs:
            try:
                raw[start : start + size].decode()
            except UnicodeDecodeError:
                return row
    raise AssertionError("no string failed to decode")


def _row_fault(view: FeatureView, row: bytes) -> int:
    """Why a stored row does not fit the view's layout (a _CORRUPT code), 0 if it fits."""
    size = len(row)
    if size == 0:
        return _SHORT
    if int.from_bytes(row[0:4], "little") != size:
        return _WRONG_LENGTH
    if size == len(MISSING_ROW):
        return 0
    if size < HEADER_BYTES:
        return _SHORT
    nfeat = int.from_bytes(row[4:6], "little")
    if nfeat > len(view.features):
        return _TOO_MANY_FEATURES
    feats = view.features[:nfeat]
    pos = HEADER_BYTES + 4 * ((nfeat + 31) // 32)
    pos += sum(cell_width(f.dtype, f.vector_length) for f in feats)
    if pos > size:
        return _FIXED_PAST_END
    for feat in feats:
        if feat.dtype is DType.STRING:
            if pos + 4 > size:
                return _STRING_PAST_END
            pos += 4 + int.from_bytes(row[pos : pos + 4], "little")
            if pos > size:
                return _STRING_PAST_END
    return _TRAILING_BYTES if size - pos > 3 else 0


def decode_rows_reference(
    view: FeatureView, features: Sequence[str], rows: Sequence[bytes], cutoff_us: np.ndarray
) -> Decoded:
    """Plain-Python/NumPy decoder, row by row: the reference the Numba kernel is tested against,
    raising the same CorruptRowError (unaligned rows first, then layout, then UTF-8)."""
    n = len(rows)
    for r, row in enumerate(rows):
        if len(row) % 4:
            raise _corrupt(view, r, n, _UNALIGNED)
    for r, row in enumerate(rows):
        fault = _row_fault(view, row)
        if fault:
            raise _corrupt(view, r, n, fault)
    index = {f.name: i for i, f in enumerate(view.features)}
    event = np.zeros(n, np.int64)
    row_status = np.full(n, FeatureStatus.NOT_FOUND, np.uint8)
    parsed: list[dict[int, object] | None] = []
    for r, row in enumerate(rows):
        if len(row) < HEADER_BYTES:
            parsed.append(None)
            continue
        event[r] = row_event_us(row)
        if event[r] < cutoff_us[r]:
            row_status[r] = FeatureStatus.OUTSIDE_MAX_AGE
            parsed.append(None)
            continue
        row_status[r] = FeatureStatus.PRESENT
        nfeat = int.from_bytes(row[4:6], "little")
        pos = HEADER_BYTES + 4 * ((nfeat + 31) // 32)
        bits = np.unpackbits(np.frombuffer(row[HEADER_BYTES:pos], np.uint8), bitorder="little")
        values: dict[int, object] = {}
        for i, feat in enumerate(view.features[:nfeat]):
            if feat.dtype is DType.STRING:
                continue
            width = cell_width(feat.dtype, feat.vector_length)
            size = numpy_dtype(feat.dtype).itemsize * (feat.vector_length or 1)
            value = np.frombuffer(row[pos : pos + size], numpy_dtype(feat.dtype))
            if feat.dtype is DType.BOOL:
                value = value.view(np.uint8) != 0
            values[i] = None if bits[i] else value
            pos += width
        for i, feat in enumerate(view.features[:nfeat]):
            if feat.dtype is DType.STRING:
                size = int.from_bytes(row[pos : pos + 4], "little")
                values[i] = None if bits[i] else row[pos + 4 : pos + 4 + size]
                pos += 4 + size
        parsed.append(values)
    groups: dict[tuple[DType, int], list[str]] = {}
    for name in features:
        feat = view.feature(name)
        groups.setdefault((feat.dtype, feat.vector_length), []).append(name)
    strings = {index[name] for name in features if view.feature(name).dtype is DType.STRING}
    for r, got in enumerate(parsed):
        for i in strings:
            if got is not None and got.get(i) is not None:
                try:
                    got[i] = got[i].decode()
                except UnicodeDecodeError:
                    raise _corrupt(view, r, n, _BAD_UTF8) from None
    blocks = []
    for (dtype, vlen), names in groups.items():
        k = len(names)
        shape = (n, k, vlen) if dtype is DType.FLOAT32_VECTOR else (n, k)
        values = np.full(shape, "", object) if dtype is DType.STRING else np.zeros(shape)
        values = values.astype(numpy_dtype(dtype))
        statuses = np.zeros((n, k), np.uint8)
        for r in range(n):
            for j, name in enumerate(names):
                got = parsed[r]
                if got is None:
                    statuses[r, j] = row_status[r]
                elif got.get(index[name]) is None:
                    statuses[r, j] = FeatureStatus.NULL_VALUE
                else:
                    statuses[r, j] = FeatureStatus.PRESENT
                    value = got[index[name]]
                    values[r, j] = value if dtype is DType.STRING else value.reshape(shape[2:])
        blocks.append(Block(dtype, names, values, statuses))
    return Decoded(event, row_status, blocks)
