"""Row codec: the Numba decoder and the plain-Python reference agree with the encoded input."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from featurestore.dtypes import DType, FeatureStatus, numpy_dtype
from featurestore.registry import Feature, FeatureView
from featurestore.row_codec import (
    MISSING_ROW,
    NO_CUTOFF,
    DecodePlan,
    RowLayout,
    decode_rows,
    decode_rows_reference,
    encode_rows,
    row_event_us,
)

FLOATS = st.floats(allow_nan=True, allow_infinity=True, width=32)
VALUES = {
    DType.FLOAT32: FLOATS,
    DType.FLOAT64: st.floats(allow_nan=True, allow_infinity=True),
    DType.INT64: st.integers(-(2**63), 2**63 - 1),
    DType.BOOL: st.booleans(),
    DType.STRING: st.text(max_size=12),
}


@st.composite
def batches(draw):
    """A random view, a batch of rows for it (values, nulls) and a random feature request."""
    n_feats = draw(st.integers(1, 40))
    feats = []
    for i in range(n_feats):
        dtype = draw(st.sampled_from(list(DType)))
        vlen = draw(st.integers(1, 3)) if dtype is DType.FLOAT32_VECTOR else 0
        feats.append(Feature(f"f{i}", dtype, vlen))
    view = FeatureView("v", "e", tuple(feats), version=1)
    n = draw(st.integers(0, 6))
    columns, nulls = {}, {}
    for feat in feats:
        if feat.dtype is DType.FLOAT32_VECTOR:
            flat = draw(
                st.lists(FLOATS, min_size=n * feat.vector_length, max_size=n * feat.vector_length)
            )
            columns[feat.name] = np.array(flat, np.float32).reshape(n, feat.vector_length)
        else:
            values = draw(st.lists(VALUES[feat.dtype], min_size=n, max_size=n))
            if feat.dtype is DType.STRING:
                columns[feat.name] = values
            else:
                columns[feat.name] = np.array(values, numpy_dtype(feat.dtype)).reshape(n)
        nulls[feat.name] = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)), bool)
    events = np.array(draw(st.lists(st.integers(1, 2**62), min_size=n, max_size=n)), np.int64)
    requested = draw(st.permutations([f.name for f in feats]))
    requested = requested[: draw(st.integers(1, len(requested)))]
    missing = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    cutoff = draw(st.integers(0, 2**62))
    return view, columns, nulls, events, requested, missing, cutoff


def by_feature(decoded):
    out = {}
    for block in decoded.blocks:
        for j, name in enumerate(block.features):
            out[name] = (block.dtype, block.values[:, j], block.statuses[:, j])
    return out


@settings(max_examples=150, deadline=None)
@given(batches())
def test_kernel_and_reference_decode_what_was_encoded(case):
    view, columns, nulls, events, requested, missing, cutoff = case
    layout = RowLayout(view)
    encoded = {k: [s.encode() for s in v] if isinstance(v, list) else v for k, v in columns.items()}
    rows = encode_rows(layout, events, 7, encoded, nulls)
    assert all(len(r) % 4 == 0 for r in rows)
    assert [row_event_us(r) for r in rows] == events.tolist()
    rows = [MISSING_ROW if m else r for r, m in zip(rows, missing, strict=True)]
    cut = np.full(len(rows), cutoff, np.int64)
    fast = decode_rows(DecodePlan(layout, requested), rows, cut)
    slow = decode_rows_reference(view, requested, rows, cut)
    np.testing.assert_array_equal(fast.row_status, slow.row_status)
    np.testing.assert_array_equal(fast.event_us, slow.event_us)
    got, ref = by_feature(fast), by_feature(slow)
    assert [name for b in fast.blocks for name in b.features] == [
        name for b in slow.blocks for name in b.features
    ]
    for r in range(len(rows)):
        if missing[r]:
            expected_row = FeatureStatus.NOT_FOUND
        elif events[r] < cutoff:
            expected_row = FeatureStatus.OUTSIDE_MAX_AGE
        else:
            expected_row = FeatureStatus.PRESENT
        assert fast.row_status[r] == expected_row
        for name in requested:
            dtype, values, statuses = got[name]
            np.testing.assert_array_equal(values[r], ref[name][1][r])
            assert statuses[r] == ref[name][2][r]
            if expected_row != FeatureStatus.PRESENT:
                assert statuses[r] == expected_row
            elif nulls[name][r]:
                assert statuses[r] == FeatureStatus.NULL_VALUE
            else:
                assert statuses[r] == FeatureStatus.PRESENT
                want = columns[name][r]
                if dtype is DType.STRING:
                    assert values[r] == want
                else:
                    np.testing.assert_array_equal(values[r], np.asarray(want, values.dtype))
            if statuses[r] != FeatureStatus.PRESENT:
                empty = "" if dtype is DType.STRING else 0
                assert np.all(values[r] == empty)


def test_rows_of_an_older_layout_read_added_features_as_null():
    old = FeatureView(
        "v", "e", (Feature("a", DType.FLOAT32), Feature("s", DType.STRING)), version=1
    )
    new = FeatureView(
        "v",
        "e",
        (*old.features, Feature("b", DType.INT64), Feature("t", DType.STRING)),
        version=1,
    )
    rows = encode_rows(
        RowLayout(old),
        np.array([5, 6]),
        9,
        {"a": np.array([1.5, 2.5], np.float32), "s": [b"x", "ü".encode()]},
        {},
    )
    names = ["t", "a", "b", "s"]
    cut = np.full(2, NO_CUTOFF, np.int64)
    for decoded in (
        decode_rows(DecodePlan(RowLayout(new), names), rows, cut),
        decode_rows_reference(new, names, rows, cut),
    ):
        got = by_feature(decoded)
        assert got["a"][1].tolist() == [1.5, 2.5] and got["s"][1].tolist() == ["x", "ü"]
        assert got["b"][2].tolist() == [FeatureStatus.NULL_VALUE] * 2
        assert got["t"][2].tolist() == [FeatureStatus.NULL_VALUE] * 2
        assert got["t"][1].tolist() == ["", ""] and got["b"][1].tolist() == [0, 0]


def test_empty_batch_decodes_to_empty_blocks():
    view = FeatureView("v", "e", (Feature("a", DType.FLOAT64), Feature("s", DType.STRING)))
    decoded = decode_rows(DecodePlan(RowLayout(view), ["a", "s"]), [], np.zeros(0, np.int64))
    assert decoded.event_us.shape == (0,)
    assert [b.values.shape for b in decoded.blocks] == [(0, 1), (0, 1)]


def test_encoding_refuses_a_column_not_of_the_feature_dtype():
    layout = RowLayout(FeatureView("v", "e", (Feature("a", DType.FLOAT32),)))
    with pytest.raises(TypeError, match="equiv"):
        encode_rows(layout, np.array([1]), 9, {"a": np.array([1e300])}, {})
    big_endian = np.array([1.5], ">f4")
    rows = encode_rows(layout, np.array([1]), 9, {"a": big_endian}, {})
    decoded = decode_rows(DecodePlan(layout, ["a"]), rows, np.full(1, NO_CUTOFF, np.int64))
    assert decoded.blocks[0].values.tolist() == [[1.5]]
