"""The fused transform kernel: one Numba call runs a chain of scaling, bucketing, ratio,
difference and distance ops over a rows x features block, plus the program builder it reads.

Numba's on-disk cache keys run_fused on this file's text only, not on the scaling, arithmetic
and spatial `*_value` functions compiled into it: after changing one of those, delete
featurestore/kernels/__pycache__ (or change this file), or run_fused keeps the old maths.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numba import njit

from featurestore.kernels.arithmetic import ratio_value
from featurestore.kernels.scaling import (
    bucket_value,
    bucket_width_value,
    clip_value,
    log1p_value,
    min_max_value,
    standardize_value,
)
from featurestore.kernels.spatial import haversine_value

OP_STANDARDIZE = 1
OP_MIN_MAX = 2
OP_LOG1P = 3
OP_CLIP = 4
OP_BUCKET_WIDTH = 5
OP_BUCKET = 6
OP_RATIO = 7
OP_DIFFERENCE = 8
OP_HAVERSINE = 9
OP_DISTANCE = 10


@njit(nogil=True, cache=True)
def run_fused(block, in_cols, code, params, n_slots, out_slots, out):
    """Run a fused program: copy block[:, in_cols] into column slots, apply each instruction
    [op, a, b, c, d, dst, param_offset, param_count] over all rows, gather out_slots into out.

    Slots are stored column by column so each instruction is one tight loop over the rows.
    """
    rows = block.shape[0]
    w = np.empty((n_slots, rows), np.float64)
    n_in = in_cols.shape[0]
    for r in range(rows):
        for k in range(n_in):
            w[k, r] = block[r, in_cols[k]]
    for s in range(code.shape[0]):
        op = code[s, 0]
        x = w[code[s, 1]]
        y = w[code[s, 2]]
        dst = w[code[s, 5]]
        p = code[s, 6]
        if op == OP_STANDARDIZE:
            mean, std = params[p], params[p + 1]
            for r in range(rows):
                dst[r] = standardize_value(x[r], mean, std)
        elif op == OP_BUCKET:
            stop = p + code[s, 7]
            for r in range(rows):
                dst[r] = bucket_value(x[r], params, p, stop)
        elif op == OP_LOG1P:
            for r in range(rows):
                dst[r] = log1p_value(x[r])
        elif op == OP_MIN_MAX:
            lo, hi = params[p], params[p + 1]
            for r in range(rows):
                dst[r] = min_max_value(x[r], lo, hi)
        elif op == OP_CLIP:
            lo, hi = params[p], params[p + 1]
            for r in range(rows):
                dst[r] = clip_value(x[r], lo, hi)
        elif op == OP_BUCKET_WIDTH:
            lo, hi, n = params[p], params[p + 1], code[s, 7]
            for r in range(rows):
                dst[r] = bucket_width_value(x[r], lo, hi, n)
        elif op == OP_RATIO:
            fill = params[p]
            for r in range(rows):
                dst[r] = ratio_value(x[r], y[r], fill)
        elif op == OP_DIFFERENCE:
            for r in range(rows):
                dst[r] = x[r] - y[r]
        elif op == OP_HAVERSINE:
            lat2 = w[code[s, 3]]
            lon2 = w[code[s, 4]]
            for r in range(rows):
                dst[r] = haversine_value(x[r], y[r], lat2[r], lon2[r])
        else:
            lat0, lon0 = params[p], params[p + 1]
            for r in range(rows):
                dst[r] = haversine_value(x[r], y[r], lat0, lon0)
    n_out = out_slots.shape[0]
    for r in range(rows):
        for k in range(n_out):
            out[r, k] = w[out_slots[k], r]


class Program:
    """Instructions and parameters of one fused segment, built by the ops' emit functions."""

    def __init__(self) -> None:
        self.code: list[list[int]] = []
        self.params: list[float] = []

    def add(self, op: int, args: Sequence[int], dst: int, params: Sequence[float], count=0):
        slots = [*args, 0, 0, 0, 0][:4]
        self.code.append([op, *slots, dst, len(self.params), count])
        self.params.extend(float(p) for p in params)
