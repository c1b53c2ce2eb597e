"""Triton's classification extension: an output requested with the "classification" parameter
(int64 k) is answered, per row, with its k highest-valued classes as BYTES strings
"<value>:<index>[:<label>]" instead of its raw values.

As Triton's frontends do: each row is flattened (the index counts over all of a row's elements,
whatever its shape), k is cut to the row's element count, values print as C++ std::to_string
prints them (six decimals for FP32 and FP64, integers in full), and a class with no label (an
empty line, or an index past the labels file's end) has no ":<label>". Where Triton's order is
undefined (its std::sort is not stable, and NaN breaks its comparison), equal values keep the
lower index first and NaN ranks below every number, -inf included.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from protos.inference import grpc_service_pb2 as pb
from server.errors import InvalidRequestError

if TYPE_CHECKING:
    from server.model_config import TensorSpec

CLASSIFICATION = "classification"
"""The requested output's parameter that asks for classes (Triton's class_count)."""
CLASSIFIABLE_DATATYPES = (
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP32",
    "FP64",
)
"""The output datatypes Triton classifies (TopkClassifications); it refuses the others."""
# A row this short, or a k over 1/8 of the row, is sorted whole: partitioning first pays only
# for long rows (64 rows of 1,000 FP32 scores, k = 5: ~0.5 ms against ~4 ms for a stable sort;
# 1 row of 10: ~40 µs against ~3 µs).
_SORT_WHOLE_ROWS = 128
_PARTITION_FROM = 8


def check_classification(output_name: str, parameter: pb.InferParameter, output: TensorSpec) -> int:
    """The class count k that a requested output's "classification" parameter asks for, checked
    before the request joins a batch: an int64_param >= 1, on a numeric output."""
    where = f"output '{output_name}': parameter '{CLASSIFICATION}'"
    kind = parameter.WhichOneof("parameter_choice")
    if kind != "int64_param":
        raise InvalidRequestError(
            f"{where} must be int64_param (the number of classes to return), got "
            f"{kind or 'no value'}; send int64_param = k, e.g. class_count=3 in tritonclient"
        )
    count = parameter.int64_param
    if count < 1:
        raise InvalidRequestError(
            f"{where} is {count}; the number of classes to return must be >= 1"
        )
    if output.datatype not in CLASSIFIABLE_DATATYPES:
        raise InvalidRequestError(
            f"{where}: '{output_name}' is {output.datatype}, and classes are taken only from "
            f"{', '.join(CLASSIFIABLE_DATATYPES)} outputs; request the output without the "
            "parameter, or cast it in the model"
        )
    return count


def classify(
    scores: np.ndarray, class_count: int, labels: tuple[str, ...], *, batched: bool
) -> np.ndarray:
    """The top class_count classes of each row of scores, best first, as an object array of
    bytes "<value>:<index>[:<label>]": shape [rows, k] when batched (the first dimension is the
    batch), else [k] over all of scores; k is class_count cut to a row's element count."""
    shape = (len(scores), math.prod(scores.shape[1:])) if batched else (1, scores.size)
    rows = scores.reshape(shape)
    k = min(class_count, rows.shape[1])
    index = _top(rows, k)
    values = np.take_along_axis(rows, index, axis=1)
    form = "%f:%d" if rows.dtype.kind == "f" else "%d:%d"
    count = len(labels)
    texts = []
    for value, i in zip(values.ravel().tolist(), index.ravel().tolist(), strict=True):
        label = labels[i] if i < count else ""
        texts.append((form % (value, i) + (f":{label}" if label else "")).encode())
    out = np.empty(len(texts), dtype=object)
    out[:] = texts
    return out.reshape(index.shape if batched else (k,))


def _top(rows: np.ndarray, k: int) -> np.ndarray:
    """Per row, the indices of the k highest values, highest first; equal values by index, NaN
    last. A long row with a small k is partitioned first, so only its top k are sorted."""
    # Ascending keys for descending values: ~x never overflows an integer, -x keeps NaN a NaN
    # (which NumPy's sort and partition put after every number).
    key = -rows if rows.dtype.kind == "f" else ~rows
    width = rows.shape[1]
    if k == 0 or width <= _SORT_WHOLE_ROWS or k * _PARTITION_FROM > width:
        return np.argsort(key, axis=1, kind="stable")[:, :k]
    kth = np.partition(key, k - 1, axis=1)[:, k - 1 : k]
    below = key < kth
    tied = key == kth
    if rows.dtype.kind == "f":
        # A NaN k-th key (fewer than k numbers in the row): every number is below it.
        nan, nan_kth = np.isnan(key), np.isnan(kth)
        below |= nan_kth & ~nan
        tied |= nan_kth & nan
    room = k - np.count_nonzero(below, axis=1).reshape(-1, 1)
    if (np.count_nonzero(tied, axis=1).reshape(-1, 1) > room).any():
        tied &= np.cumsum(tied, axis=1) <= room  # more ties than room: the lowest indices
    index = np.nonzero(below | tied)[1].reshape(len(rows), k)
    order = np.argsort(np.take_along_axis(key, index, axis=1), axis=1, kind="stable")
    return np.take_along_axis(index, order, axis=1)
