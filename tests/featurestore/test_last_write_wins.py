"""Last-write-wins: key order, stored event times and the Numba resolution against the reference."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from featurestore.last_write_wins import (
    MIN_EVENT,
    key_order,
    newest_per_key,
    pick,
    resolve,
    resolve_reference,
    stored_events,
)
from featurestore.row_codec import MISSING_ROW


def resolve_by_key_order(
    keys: list[bytes], events: np.ndarray, stored: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """What _apply_group decides, in arrival order: which rows are applied (resolve) and which
    row of each key ends up stored (its newest row, unless the stored one is as new or newer)."""
    order, starts = key_order(keys)
    applied = np.empty(len(keys), np.bool_)
    applied[order] = resolve(events[order], stored[order], starts)
    newest = order[newest_per_key(events[order], starts)]
    final = np.zeros(len(keys), np.bool_)
    final[newest[events[newest] > stored[newest]]] = True
    return applied, final


def test_key_order_sorts_fixed_width_keys_as_bytes_and_keeps_arrival_order_of_equals():
    keys = [b"\x00\x02", b"\x01\x00", b"\x00\x02", b"\x00\x01", b"\xff\x00"]
    order, starts = key_order(keys)
    assert order.tolist() == [3, 0, 2, 1, 4]
    assert starts.tolist() == [True, True, False, True, True]


def test_key_order_of_wide_and_variable_width_keys_matches_sorted():
    rng = np.random.default_rng(3)
    wide = [rng.integers(0, 3, 19, dtype=np.uint8).tobytes() for _ in range(300)]
    sizes = rng.integers(0, 6, 300)
    variable = [rng.integers(0, 3, size, dtype=np.uint8).tobytes() for size in sizes]
    for keys in (wide, variable):
        order, starts = key_order(keys)
        assert order.tolist() == sorted(range(len(keys)), key=keys.__getitem__)
        ordered = [keys[i] for i in order]
        assert starts.tolist() == [i == 0 or ordered[i] != ordered[i - 1] for i in range(len(keys))]


def test_key_order_of_nothing():
    order, starts = key_order([])
    assert len(order) == 0 and len(starts) == 0


def test_pick_gathers_any_number_of_items():
    items = [b"a", b"b", b"c"]
    assert list(pick(items, [2, 0, 2])) == [b"c", b"a", b"c"]
    assert list(pick(items, [1])) == [b"b"]
    assert list(pick(items, [])) == []


def test_stored_events_reads_the_row_header_and_marks_absent_rows():
    rows = [
        bytes(8) + (5).to_bytes(8, "little", signed=True) + bytes(8),
        None,
        MISSING_ROW,
        bytes(8) + (-7).to_bytes(8, "little", signed=True) + bytes(12),
    ]
    assert stored_events(rows).tolist() == [5, MIN_EVENT, MIN_EVENT, -7]


def test_repeated_keys_resolve_in_arrival_order():
    keys = [b"a", b"b", b"a", b"a", b"b"]
    events = np.array([5, 1, 9, 9, 1], np.int64)
    stored = np.array([6, MIN_EVENT, 6, 6, MIN_EVENT], np.int64)
    applied, final = resolve_by_key_order(keys, events, stored)
    assert applied.tolist() == [False, True, True, False, False]
    assert final.tolist() == [False, True, True, False, False]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 5), st.integers(-3, 3), st.one_of(st.none(), st.integers(-3, 3))),
        max_size=40,
    )
)
def test_resolve_matches_the_sequential_reference(rows):
    keys = [k.to_bytes(8, "big") for k, _, _ in rows]
    events = np.array([e for _, e, _ in rows], np.int64)
    first_stored: dict[bytes, int] = {}
    for key, (_, _, s) in zip(keys, rows, strict=True):
        first_stored.setdefault(key, MIN_EVENT if s is None else s)
    stored = np.array([first_stored[k] for k in keys], np.int64)
    applied, final = resolve_by_key_order(keys, events, stored)
    want_applied, want_final = resolve_reference(keys, events, stored)
    assert applied.tolist() == want_applied.tolist()
    assert final.tolist() == want_final.tolist()
    order, starts = key_order(keys)
    newest = order[newest_per_key(events[order], starts)]
    assert sorted(keys[i] for i in newest) == sorted(set(keys))
