"""Named, parameterised feature transforms that a model config refers to: a registry of ops,
fitting, JSON/TOML-friendly parameters, and chains compiled to one fused Numba call.

A model config lists transforms in order, e.g. `[[transforms]] op = "standardize",
inputs = ["f1", "f2"], params = {mean = [...], std = [...]}`; outputs default to the inputs
(in place). Unknown ops, inputs or parameters raise InvalidArgumentError when the Transform is
built, so a bad config fails at load, not at the first request.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import ModuleType, SimpleNamespace
from typing import Any

import numpy as np
from numba import njit

from featurestore.errors import InvalidArgumentError
from featurestore.kernels import arithmetic, encoding, reference, scaling, spatial
from featurestore.kernels import time as ktime
from featurestore.kernels.arithmetic import ratio_value
from featurestore.kernels.encoding import IntVocab, StringColumn, StringVocab, pack_strings
from featurestore.kernels.scaling import (
    bucket_value,
    bucket_width_value,
    clip_value,
    log1p_value,
    min_max_value,
    standardize_value,
)
from featurestore.kernels.spatial import haversine_value


def _namespace(*modules: ModuleType) -> SimpleNamespace:
    return SimpleNamespace(
        **{k: v for m in modules for k, v in vars(m).items() if callable(v) and k[0] != "_"}
    )


KERNELS = _namespace(scaling, encoding, ktime, spatial, arithmetic)
REFERENCES = _namespace(reference)

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


class _Program:
    """Instructions and parameters of one fused segment, built by the ops' emit functions."""

    def __init__(self) -> None:
        self.code: list[list[int]] = []
        self.params: list[float] = []

    def add(self, op: int, args: Sequence[int], dst: int, params: Sequence[float], count=0):
        slots = [*args, 0, 0, 0, 0][:4]
        self.code.append([op, *slots, dst, len(self.params), count])
        self.params.extend(float(p) for p in params)


# ---- parameter parsing -------------------------------------------------------------------


def _float(value: Any, label: str, key: str) -> float:
    if isinstance(value, str) and value.strip().lower() in ("nan", "inf", "+inf", "-inf"):
        return float(value)
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise InvalidArgumentError(f"{label}: params.{key} must be a number, got {value!r}")
    return float(value)


def _floats(params: dict, key: str, n: int, label: str, finite: bool = True) -> np.ndarray:
    """params[key] as n float64 values: a list with one per input, or one number for all."""
    if key not in params:
        raise InvalidArgumentError(f"{label}: params.{key} is required (fit the transform)")
    raw = params[key]
    items = list(raw) if isinstance(raw, list | tuple | np.ndarray) else [raw] * n
    if len(items) != n:
        raise InvalidArgumentError(
            f"{label}: params.{key} needs {n} values (one per input), got {len(items)}"
        )
    values = np.array([_float(v, label, key) for v in items], np.float64)
    bad = np.flatnonzero(np.isnan(values) | (~np.isfinite(values) if finite else False))
    if bad.size:
        raise InvalidArgumentError(
            f"{label}: params.{key}[{bad[0]}] is {values[bad[0]]}; it must be finite"
        )
    return values


def _ints(params: dict, key: str, n: int, label: str, minimum: int) -> np.ndarray:
    values = _floats(params, key, n, label)
    bad = np.flatnonzero((values != np.floor(values)) | (values < minimum))
    if bad.size:
        raise InvalidArgumentError(
            f"{label}: params.{key}[{bad[0]}] is {values[bad[0]]}; use a whole number >= {minimum}"
        )
    return values.astype(np.int64)


def _jsonable(value: Any) -> Any:
    """Lists, ints, floats and strings only; NaN and infinities as "nan", "inf", "-inf"."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [_jsonable(v) for v in value]
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        f = float(value)
        return f if math.isfinite(f) else str(f)
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, str):
        return str(value)
    return value


# ---- input conversion ----------------------------------------------------------------------


def _as_float(x: Any, label: str, name: str) -> np.ndarray:
    arr = x if isinstance(x, np.ndarray) else np.asarray(x)
    if arr.dtype.kind not in "fiub":
        raise InvalidArgumentError(
            f"{label}: input {name!r} has dtype {arr.dtype}; this op needs numbers"
        )
    return np.ascontiguousarray(arr.reshape(-1), dtype=np.float64)


def _as_time(x: Any, label: str, name: str) -> np.ndarray:
    arr = x if isinstance(x, np.ndarray) else np.asarray(x)
    if arr.dtype.kind == "M":
        return np.ascontiguousarray(arr.astype("datetime64[us]").view(np.int64).reshape(-1))
    if arr.dtype.kind not in "iu":
        raise InvalidArgumentError(
            f"{label}: input {name!r} has dtype {arr.dtype}; time ops need int64 microseconds "
            "since the epoch (UTC) or datetime64"
        )
    return np.ascontiguousarray(arr.reshape(-1), dtype=np.int64)


def _as_key(x: Any, label: str, name: str) -> np.ndarray | StringColumn:
    if isinstance(x, StringColumn):
        return x
    arr = x if isinstance(x, np.ndarray) else np.asarray(x)
    if arr.dtype.kind in "iub":
        return np.ascontiguousarray(arr.reshape(-1), dtype=np.int64)
    if arr.dtype.kind in "USO":
        return pack_strings(arr)
    raise InvalidArgumentError(
        f"{label}: input {name!r} has dtype {arr.dtype}; this op needs strings or int64"
    )


_CONVERT = {"float": _as_float, "time": _as_time, "key": _as_key}


# ---- ops -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class OpSpec:
    """One transform op: how to check its params, run it (kernels or references), fit it, how
    wide its output is and, when it can join a fused chain, how to emit its instructions."""

    name: str
    kind: str
    arity: tuple[int, ...] | None
    param_names: tuple[str, ...]
    check: Callable[[dict, int, str], dict]
    run: Callable[[SimpleNamespace, list, dict], list[np.ndarray] | np.ndarray]
    fit: Callable[..., dict]
    width: Callable[[dict, int], int]
    emit: Callable[[_Program, dict, list[int], list[int]], None] | None = None
    suffixes: Callable[[dict], list[str]] | None = None
    required: tuple[str, ...] = ()

    @property
    def kernel(self) -> Callable[[list, dict], Any]:
        """Run on the Numba kernels: (input columns, checked params) -> outputs."""
        return lambda cols, norm: self.run(KERNELS, cols, norm)

    @property
    def reference(self) -> Callable[[list, dict], Any]:
        """Run on the NumPy references: (input columns, checked params) -> outputs."""
        return lambda cols, norm: self.run(REFERENCES, cols, norm)


def _no_params(params: dict, n: int, label: str) -> dict:
    return {}


def _no_fit(cols: list, **kw: Any) -> dict:
    return dict(kw)


def _each(n_params: dict, n: int) -> int:
    return n


def _nonempty(col: np.ndarray, k: int, op: str) -> np.ndarray:
    finite = col[~np.isnan(col)]
    if finite.size == 0:
        raise InvalidArgumentError(f"fit {op}: input {k} has no non-NaN values to fit on")
    return finite


def _check_standardize(params: dict, n: int, label: str) -> dict:
    std = _floats(params, "std", n, label)
    if np.any(std < 0):
        raise InvalidArgumentError(f"{label}: params.std[{np.argmax(std < 0)}] is negative")
    return {"mean": _floats(params, "mean", n, label), "std": std}


def _fit_standardize(cols: list, **kw: Any) -> dict:
    data = [_nonempty(c, k, "standardize") for k, c in enumerate(cols)]
    return {"mean": [float(np.mean(d)) for d in data], "std": [float(np.std(d)) for d in data]}


def _emit_pairs(op: int, a: str, b: str) -> Callable:
    def emit(prog: _Program, norm: dict, ins: list[int], outs: list[int]) -> None:
        for k, (i, o) in enumerate(zip(ins, outs, strict=True)):
            prog.add(op, [i], o, [norm[a][k], norm[b][k]])

    return emit


def _check_lo_hi(params: dict, n: int, label: str, finite: bool = True) -> dict:
    lo = _floats(params, "lo", n, label, finite)
    hi = _floats(params, "hi", n, label, finite)
    if np.any(hi < lo):
        k = int(np.argmax(hi < lo))
        raise InvalidArgumentError(f"{label}: params.hi[{k}] = {hi[k]} is below lo = {lo[k]}")
    return {"lo": lo, "hi": hi}


def _fit_min_max(cols: list, **kw: Any) -> dict:
    data = [_nonempty(c, k, "min_max_scale") for k, c in enumerate(cols)]
    return {"lo": [float(d.min()) for d in data], "hi": [float(d.max()) for d in data]}


def _fit_clip(cols: list, lower_quantile: float = 0.01, upper_quantile: float = 0.99) -> dict:
    data = [_nonempty(c, k, "clip") for k, c in enumerate(cols)]
    return {
        "lo": [float(np.quantile(d, lower_quantile)) for d in data],
        "hi": [float(np.quantile(d, upper_quantile)) for d in data],
    }


def _check_bucket_width(params: dict, n: int, label: str) -> dict:
    return {**_check_lo_hi(params, n, label), "buckets": _ints(params, "buckets", n, label, 1)}


def _fit_bucket_width(cols: list, buckets: int = 10) -> dict:
    return {**_fit_min_max(cols), "buckets": [int(buckets)] * len(cols)}


def _emit_bucket_width(prog: _Program, norm: dict, ins: list[int], outs: list[int]) -> None:
    for k, (i, o) in enumerate(zip(ins, outs, strict=True)):
        prog.add(OP_BUCKET_WIDTH, [i], o, [norm["lo"][k], norm["hi"][k]], int(norm["buckets"][k]))


def _check_bucketize(params: dict, n: int, label: str) -> dict:
    raw = params.get("boundaries")
    if not isinstance(raw, list | tuple | np.ndarray):
        raise InvalidArgumentError(
            f"{label}: params.boundaries must be a list of sorted numbers, or one list per input"
        )
    per_input = len(raw) > 0 and all(isinstance(b, list | tuple | np.ndarray) for b in raw)
    lists = list(raw) if per_input else [raw] * n
    if len(lists) != n:
        raise InvalidArgumentError(
            f"{label}: params.boundaries has {len(lists)} lists; give one per input ({n})"
        )
    out = []
    for k, b in enumerate(lists):
        arr = _floats({"boundaries": list(b)}, "boundaries", len(b), f"{label} input {k}", False)
        if np.any(np.diff(arr) < 0):
            raise InvalidArgumentError(f"{label}: params.boundaries[{k}] must be sorted ascending")
        out.append(arr)
    return {"boundaries": out}


def _fit_bucketize(cols: list, buckets: int = 10, boundaries: list | None = None) -> dict:
    """Equal-frequency boundaries (quantiles) unless boundaries are given."""
    if boundaries is not None:
        return {"boundaries": boundaries}
    qs = np.linspace(0.0, 1.0, int(buckets) + 1)[1:-1]
    data = [_nonempty(c, k, "bucketize") for k, c in enumerate(cols)]
    return {"boundaries": [np.unique(np.quantile(d, qs)).tolist() for d in data]}


def _emit_bucketize(prog: _Program, norm: dict, ins: list[int], outs: list[int]) -> None:
    for k, (i, o) in enumerate(zip(ins, outs, strict=True)):
        b = norm["boundaries"][k]
        prog.add(OP_BUCKET, [i], o, b, len(b))


def _emit_log1p(prog: _Program, norm: dict, ins: list[int], outs: list[int]) -> None:
    for i, o in zip(ins, outs, strict=True):
        prog.add(OP_LOG1P, [i], o, [])


def _check_hash(params: dict, n: int, label: str) -> dict:
    return {"buckets": _ints(params, "buckets", n, label, 1)}


def _run_hash(ns: SimpleNamespace, cols: list, norm: dict) -> list[np.ndarray]:
    out = []
    for c, n in zip(cols, norm["buckets"], strict=True):
        if isinstance(c, StringColumn):
            out.append(ns.hash_bucket_strings(c.data, c.offsets, int(n)))
        else:
            out.append(ns.hash_bucket_int64(c, int(n)))
    return out


def _check_one_hot(params: dict, n: int, label: str) -> dict:
    vocab = params.get("vocabulary")
    if not isinstance(vocab, list | tuple):
        raise InvalidArgumentError(f"{label}: params.vocabulary must be a list of strings or ints")
    if all(isinstance(v, str) for v in vocab):
        return {"vocab": StringVocab.build(list(vocab), f"{label}: params.vocabulary")}
    if all(isinstance(v, int) and not isinstance(v, bool) for v in vocab):
        return {"vocab": IntVocab.build(list(vocab), f"{label}: params.vocabulary")}
    raise InvalidArgumentError(
        f"{label}: params.vocabulary mixes types; use all strings or all ints"
    )


def _fit_one_hot(cols: list, max_size: int | None = None, min_count: int = 1) -> dict:
    """Most frequent values first (ties by value), at least min_count occurrences each."""
    (col,) = cols
    if isinstance(col, StringColumn):
        data = bytes(col.data)
        col = np.array(
            [data[a:b].decode() for a, b in zip(col.offsets[:-1], col.offsets[1:], strict=True)]
        )
    values, counts = np.unique(col, return_counts=True)
    order = np.lexsort((values, -counts))
    keep = [v for v, c in zip(values[order], counts[order], strict=True) if c >= min_count]
    return {"vocabulary": _jsonable(keep[:max_size] if max_size is not None else keep)}


def _run_one_hot(ns: SimpleNamespace, cols: list, norm: dict) -> np.ndarray:
    (col,) = cols
    vocab = norm["vocab"]
    if isinstance(vocab, StringVocab):
        if not isinstance(col, StringColumn):
            raise InvalidArgumentError("one_hot: the vocabulary is strings; the input is not")
        idx = ns.vocab_index_strings(
            col.data, col.offsets, vocab.hashes, vocab.order, vocab.data, vocab.offsets
        )
        size = len(vocab.hashes)
    else:
        if isinstance(col, StringColumn):
            raise InvalidArgumentError("one_hot: the vocabulary is ints; the input is strings")
        idx = ns.vocab_index_int64(col, vocab.values, vocab.order)
        size = len(vocab.values)
    return ns.one_hot(idx, size + 1)


def _one_hot_width(norm: dict, n: int) -> int:
    vocab = norm["vocab"]
    return (len(vocab.hashes) if isinstance(vocab, StringVocab) else len(vocab.values)) + 1


def _one_hot_suffixes(norm: dict) -> list[str]:
    vocab = norm["vocab"]
    if isinstance(vocab, StringVocab):
        data = bytes(vocab.data)
        offs = vocab.offsets
        names = [data[offs[k] : offs[k + 1]].decode() for k in range(len(offs) - 1)]
    else:
        names = [str(v) for v in vocab.values[np.argsort(vocab.order)]]
    return [*names, "oov"]


def _check_ratio(params: dict, n: int, label: str) -> dict:
    fill = _float(params.get("fill", "nan"), label, "fill")
    return {"fill": fill}


def _emit_ratio(prog: _Program, norm: dict, ins: list[int], outs: list[int]) -> None:
    prog.add(OP_RATIO, ins, outs[0], [norm["fill"]])


def _emit_difference(prog: _Program, norm: dict, ins: list[int], outs: list[int]) -> None:
    prog.add(OP_DIFFERENCE, ins, outs[0], [])


def _emit_haversine(prog: _Program, norm: dict, ins: list[int], outs: list[int]) -> None:
    prog.add(OP_HAVERSINE, ins, outs[0], [])


def _check_point(params: dict, n: int, label: str) -> dict:
    return {
        "lat0": _floats(params, "lat0", 1, label)[0],
        "lon0": _floats(params, "lon0", 1, label)[0],
    }


def _emit_distance(prog: _Program, norm: dict, ins: list[int], outs: list[int]) -> None:
    prog.add(OP_DISTANCE, ins, outs[0], [norm["lat0"], norm["lon0"]])


def _check_age(params: dict, n: int, label: str) -> dict:
    if n == 1:
        if "now_us" not in params:
            raise InvalidArgumentError(
                f"{label}: params.now_us is required with one input; or give a second input "
                "column holding the reference time"
            )
        return {"now_us": int(_ints(params, "now_us", 1, label, -(2**62))[0])}
    if "now_us" in params:
        raise InvalidArgumentError(f"{label}: params.now_us conflicts with a second input")
    return {}


def _run_age(ns: SimpleNamespace, cols: list, norm: dict) -> list[np.ndarray]:
    if len(cols) == 1:
        return [ns.age_seconds(cols[0], norm["now_us"])]
    return [ns.elapsed_seconds(cols[0], cols[1])]


def _per_column(fn: str, *keys: str) -> Callable:
    def run(ns: SimpleNamespace, cols: list, norm: dict) -> list[np.ndarray]:
        f = getattr(ns, fn)
        return [f(c, *(norm[k][j] for k in keys)) for j, c in enumerate(cols)]

    return run


def _fixed(fn: str, *keys: str) -> Callable:
    def run(ns: SimpleNamespace, cols: list, norm: dict) -> Any:
        out = getattr(ns, fn)(*cols, *(norm[k] for k in keys))
        return [out] if out.ndim == 1 else out

    return run


def _width(w: int) -> Callable[[dict, int], int]:
    return lambda norm, n: w


def _cyclical(fn: str) -> OpSpec:
    return OpSpec(
        fn, "time", (1,), (), _no_params, _fixed(fn), _no_fit, _width(2),
        suffixes=lambda norm: ["sin", "cos"],
    )  # fmt: skip


TRANSFORMS: dict[str, OpSpec] = {
    s.name: s
    for s in [
        OpSpec(
            "standardize", "float", None, ("mean", "std"), _check_standardize,
            _per_column("standardize", "mean", "std"), _fit_standardize, _each,
            _emit_pairs(OP_STANDARDIZE, "mean", "std"),
        ),
        OpSpec(
            "min_max_scale", "float", None, ("lo", "hi"), _check_lo_hi,
            _per_column("min_max_scale", "lo", "hi"), _fit_min_max, _each,
            _emit_pairs(OP_MIN_MAX, "lo", "hi"),
        ),
        OpSpec(
            "log1p", "float", None, (), _no_params, _per_column("log1p"), _no_fit, _each,
            _emit_log1p,
        ),
        OpSpec(
            "clip", "float", None, ("lo", "hi"),
            lambda p, n, label: _check_lo_hi(p, n, label, finite=False),
            _per_column("clip", "lo", "hi"), _fit_clip, _each, _emit_pairs(OP_CLIP, "lo", "hi"),
        ),
        OpSpec(
            "bucketize_width", "float", None, ("lo", "hi", "buckets"), _check_bucket_width,
            _per_column("bucketize_width", "lo", "hi", "buckets"), _fit_bucket_width, _each,
            _emit_bucket_width,
        ),
        OpSpec(
            "bucketize", "float", None, ("boundaries",), _check_bucketize,
            _per_column("bucketize", "boundaries"), _fit_bucketize, _each, _emit_bucketize,
        ),
        OpSpec(
            "hash_bucket", "key", None, ("buckets",), _check_hash, _run_hash, _no_fit, _each,
            required=("buckets",),
        ),
        OpSpec(
            "one_hot", "key", (1,), ("vocabulary",), _check_one_hot, _run_one_hot,
            _fit_one_hot, _one_hot_width, suffixes=_one_hot_suffixes,
        ),
        OpSpec("hour_of_day", "time", None, (), _no_params, _per_column("hour_of_day"),
               _no_fit, _each),
        OpSpec("day_of_week", "time", None, (), _no_params, _per_column("day_of_week"),
               _no_fit, _each),
        OpSpec("is_weekend", "time", None, (), _no_params, _per_column("is_weekend"),
               _no_fit, _each),
        _cyclical("hour_cyclical"),
        _cyclical("dow_cyclical"),
        OpSpec("age_seconds", "time", (1, 2), ("now_us",), _check_age, _run_age, _no_fit,
               _width(1)),
        OpSpec("ratio", "float", (2,), ("fill",), _check_ratio, _fixed("ratio", "fill"),
               _no_fit, _width(1), _emit_ratio),
        OpSpec("difference", "float", (2,), (), _no_params, _fixed("difference"), _no_fit,
               _width(1), _emit_difference),
        OpSpec("haversine_km", "float", (4,), (), _no_params, _fixed("haversine_km"), _no_fit,
               _width(1), _emit_haversine),
        OpSpec(
            "distance_to_point_km", "float", (2,), ("lat0", "lon0"), _check_point,
            _fixed("distance_to_point_km", "lat0", "lon0"), _no_fit, _width(1), _emit_distance,
            required=("lat0", "lon0"),
        ),
    ]
}  # fmt: skip


# ---- transforms ----------------------------------------------------------------------------


@dataclass
class Transform:
    """One configured op: input column names, output name(s) and its (fitted) params.

    Per-column ops (standardize, bucketize, ...) take any number of inputs and give one output
    each; `output` then lists one name per input. A str output of a wider op (one_hot,
    hour_cyclical) expands to `<output>_<suffix>` names. Validated on construction.
    """

    op: str
    inputs: list[str]
    output: str | list[str]
    params: dict = field(default_factory=dict)
    checked: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        label = f"transform {self.op!r} on {self.inputs}"
        spec = TRANSFORMS.get(self.op)
        if spec is None:
            raise InvalidArgumentError(
                f"{label}: op {self.op!r} is unknown; known ops: {', '.join(sorted(TRANSFORMS))}"
            )
        if isinstance(self.inputs, str):
            self.inputs = [self.inputs]
        self.inputs = list(self.inputs)
        n = len(self.inputs)
        if not all(isinstance(i, str) and i for i in self.inputs):
            raise InvalidArgumentError(f"{label}: inputs must be non-empty column names")
        if spec.arity is None and n == 0:
            raise InvalidArgumentError(f"{label}: inputs is empty; name at least one column")
        if spec.arity is not None and n not in spec.arity:
            raise InvalidArgumentError(
                f"{label}: inputs has {n} columns; op {self.op} takes "
                + " or ".join(str(a) for a in spec.arity)
            )
        if not isinstance(self.params, dict):
            raise InvalidArgumentError(f"{label}: params must be a table/dict")
        unknown = sorted(set(self.params) - set(spec.param_names))
        if unknown:
            raise InvalidArgumentError(
                f"{label}: params.{unknown[0]} is not a parameter of {self.op}; "
                f"expected: {', '.join(spec.param_names) or 'none'}"
            )
        self.params = _jsonable(self.params)
        self.checked = spec.check(self.params, n, label)
        names = self.outputs
        if len(set(names)) != len(names):
            raise InvalidArgumentError(f"{label}: output names repeat: {names}")

    @property
    def spec(self) -> OpSpec:
        """The registry entry of this op."""
        return TRANSFORMS[self.op]

    @property
    def width(self) -> int:
        """Number of output columns."""
        return self.spec.width(self.checked, len(self.inputs))

    @property
    def outputs(self) -> list[str]:
        """The output column names, one per output column."""
        width = self.width
        label = f"transform {self.op!r} on {self.inputs}"
        if isinstance(self.output, str):
            if width == 1:
                return [self.output]
            if self.spec.suffixes is None:
                raise InvalidArgumentError(f"{label}: output needs a list of {width} names")
            return [f"{self.output}_{s}" for s in self.spec.suffixes(self.checked)]
        names = list(self.output)
        if len(names) != width or not all(isinstance(x, str) and x for x in names):
            raise InvalidArgumentError(
                f"{label}: output must list {width} non-empty names, got {names!r}"
            )
        return names

    def to_dict(self) -> dict:
        """A JSON/TOML-friendly dict that from_dict reads back."""
        return {
            "op": self.op,
            "inputs": list(self.inputs),
            "output": self.output if isinstance(self.output, str) else list(self.output),
            "params": _jsonable(self.params),
        }

    @classmethod
    def from_dict(cls, entry: dict, where: str = "transform") -> Transform:
        """Read a config entry; `columns` is accepted for `inputs`, and `output` defaults to
        the inputs (in place) for per-column ops."""
        if not isinstance(entry, dict):
            raise InvalidArgumentError(f"{where}: expected a table, got {type(entry).__name__}")
        unknown = sorted(set(entry) - {"op", "inputs", "columns", "output", "params"})
        if unknown:
            raise InvalidArgumentError(
                f"{where}: field {unknown[0]!r} is unknown; use op, inputs, output, params"
            )
        op = entry.get("op")
        if not isinstance(op, str):
            raise InvalidArgumentError(f"{where}: field 'op' is required (a string)")
        inputs = entry.get("inputs", entry.get("columns"))
        if inputs is None:
            raise InvalidArgumentError(f"{where}: field 'inputs' (or 'columns') is required")
        inputs = [inputs] if isinstance(inputs, str) else list(inputs)
        output = entry.get("output")
        if output is None:
            spec = TRANSFORMS.get(op)
            if spec is not None and spec.arity is not None:
                raise InvalidArgumentError(f"{where}: field 'output' is required for op {op}")
            output = inputs[0] if len(inputs) == 1 else inputs
        try:
            return cls(op, inputs, output, dict(entry.get("params", {})))
        except InvalidArgumentError as exc:
            raise InvalidArgumentError(f"{where}: {exc}") from None


def transforms_from_config(entries: Sequence[dict]) -> list[Transform]:
    """Transforms from a config's [[transforms]] tables; errors name the entry index."""
    return [Transform.from_dict(e, f"transforms[{i}]") for i, e in enumerate(entries)]


def transforms_to_config(transforms: Sequence[Transform]) -> list[dict]:
    """The [[transforms]] tables that transforms_from_config reads back."""
    return [t.to_dict() for t in transforms]


def _fit_columns(data: Any) -> list:
    if data is None:
        return []
    if isinstance(data, StringColumn):
        return [data]
    if isinstance(data, np.ndarray):
        if data.ndim == 2:
            return [data[:, j] for j in range(data.shape[1])]
        return [data]
    items = list(data)
    if items and not isinstance(items[0], np.ndarray | list | tuple | StringColumn):
        return [np.asarray(items)]
    return items


def fit(op: str, data: Any = None, **kw: Any) -> dict:
    """Fit an op's params on data (one column, a rows x columns array or a list of columns):
    means and stds, bounds, quantile boundaries (`buckets=`), vocabularies (`max_size=`,
    `min_count=`). Ops without fitted state return kw. The result is JSON/TOML-friendly."""
    spec = TRANSFORMS.get(op)
    if spec is None:
        raise InvalidArgumentError(f"fit: op {op!r} is unknown; known: {', '.join(TRANSFORMS)}")
    cols = _fit_columns(data)
    if spec.fit is not _no_fit and not cols:
        raise InvalidArgumentError(f"fit {op}: data is required (one or more columns)")
    if spec.kind == "float":
        cols = [_as_float(c, f"fit {op}", str(k)) for k, c in enumerate(cols)]
    elif spec.kind == "key":
        cols = [c if isinstance(c, StringColumn) else np.asarray(c).reshape(-1) for c in cols]
    missing = [k for k in spec.required if k not in kw]
    if missing:
        raise InvalidArgumentError(f"fit {op}: keyword {missing[0]}= is required")
    try:
        return _jsonable(spec.fit(cols, **kw))
    except TypeError as exc:
        raise InvalidArgumentError(f"fit {op}: {exc}") from None


def _inputs(transform: Transform, columns: dict) -> list:
    label = f"transform {transform.op!r} on {transform.inputs}"
    convert = _CONVERT[transform.spec.kind]
    cols = []
    for name in transform.inputs:
        if name not in columns:
            raise InvalidArgumentError(
                f"{label}: input column {name!r} is missing; given: {sorted(columns)}"
            )
        cols.append(convert(columns[name], label, name))
    lengths = {len(c) for c in cols}
    if len(lengths) > 1:
        raise InvalidArgumentError(f"{label}: input columns differ in length: {sorted(lengths)}")
    return cols


def _run(transform: Transform, columns: dict, use_reference: bool) -> dict[str, np.ndarray]:
    spec = transform.spec
    runner = spec.reference if use_reference else spec.kernel
    result = runner(_inputs(transform, columns), transform.checked)
    names = transform.outputs
    if isinstance(result, np.ndarray):
        return {name: result[:, k] for k, name in enumerate(names)}
    return dict(zip(names, result, strict=True))


def apply(transform: Transform, columns: dict[str, Any]) -> dict[str, np.ndarray]:
    """Run one transform on the Numba kernels; returns only its output columns."""
    return _run(transform, columns, use_reference=False)


def apply_reference(transform: Transform, columns: dict[str, Any]) -> dict[str, np.ndarray]:
    """Run one transform on the plain-NumPy references; returns only its output columns."""
    return _run(transform, columns, use_reference=True)


def _default_outputs(transforms: Sequence[Transform]) -> list[str]:
    """Names produced and not consumed later, in order of their last production."""
    live: dict[str, None] = {}
    for t in transforms:
        for name in t.inputs:
            live.pop(name, None)
        for name in t.outputs:
            live.pop(name, None)
            live[name] = None
    return list(live)


def _stack(columns: dict, names: list[str], dtype: type, label: str) -> np.ndarray:
    rows = len(columns[names[0]]) if names else 0
    out = np.empty((rows, len(names)), dtype)
    for k, name in enumerate(names):
        col = columns[name]
        if isinstance(col, StringColumn) or np.asarray(col).dtype.kind not in "fiub":
            raise InvalidArgumentError(f"{label}: column {name!r} is not numeric")
        out[:, k] = col
    return out


def apply_chain(
    transforms: Sequence[Transform],
    columns: dict[str, Any],
    outputs: Sequence[str] | None = None,
    use_reference: bool = False,
) -> np.ndarray:
    """Run transforms one by one (kernels, or references) and return the outputs as a float32
    rows x width block; the unfused path that compile_chain must match."""
    env = dict(columns)
    for t in transforms:
        env.update(_run(t, env, use_reference))
    names = list(outputs) if outputs is not None else _default_outputs(transforms)
    missing = [n for n in names if n not in env]
    if missing:
        raise InvalidArgumentError(f"chain: output {missing[0]!r} is neither input nor produced")
    return _stack(env, names, np.float32, "chain output")


@dataclass
class _Segment:
    """Consecutive fusable transforms as one program over slots (inputs first)."""

    inputs: list[str]
    exports: list[str]
    code: np.ndarray
    params: np.ndarray
    n_slots: int
    out_slots: np.ndarray


def _external_inputs(transforms: Sequence[Transform], extra: Sequence[str] = ()) -> list[str]:
    """Names read before any transform in the sequence produces them, in first-read order."""
    produced: set[str] = set()
    names: dict[str, None] = {}
    for t in transforms:
        names.update((n, None) for n in t.inputs if n not in produced)
        produced.update(t.outputs)
    names.update((n, None) for n in extra if n not in produced)
    return list(names)


def _fuse(transforms: Sequence[Transform], needed: Sequence[str]) -> _Segment:
    """One program for fusable transforms; exports the names in `needed` it can supply."""
    inputs = _external_inputs(transforms)
    slots = {name: k for k, name in enumerate(inputs)}
    n_slots = len(inputs)
    prog = _Program()
    for t in transforms:
        ins = [slots[name] for name in t.inputs]
        outs = list(range(n_slots, n_slots + t.width))
        n_slots += t.width
        t.spec.emit(prog, t.checked, ins, outs)
        slots.update(zip(t.outputs, outs, strict=True))
    exports = [n for n in dict.fromkeys(needed) if n in slots]
    code = np.array(prog.code, np.int64).reshape(-1, 8)
    return _Segment(
        inputs, exports, code, np.array(prog.params, np.float64), n_slots,
        np.array([slots[n] for n in exports], np.int64),
    )  # fmt: skip


class CompiledChain:
    """A transform chain ready for the hot path: call it with a dict of columns, or bind it to a
    block's column names and call it with rows x features blocks; returns float32 rows x width.

    Runs of fusable ops (scaling, bucketing, ratio, difference, distances) become one Numba call
    each, computing in float64 and rounding once to float32; other ops run their own kernels.
    """

    def __init__(self, transforms: Sequence[Transform], outputs: Sequence[str] | None = None):
        self.transforms = list(transforms)
        self.outputs = list(outputs) if outputs is not None else _default_outputs(transforms)
        self.inputs = _external_inputs(self.transforms, self.outputs)
        groups: list[list[Transform] | Transform] = []
        for t in self.transforms:
            if t.spec.emit is None:
                groups.append(t)
            elif groups and isinstance(groups[-1], list):
                groups[-1].append(t)
            else:
                groups.append([t])
        self.steps: list[_Segment | Transform] = []
        for g, group in enumerate(groups):
            if isinstance(group, Transform):
                self.steps.append(group)
                continue
            later = [
                t for grp in groups[g + 1 :] for t in (grp if isinstance(grp, list) else [grp])
            ]
            self.steps.append(_fuse(group, self.outputs + [n for t in later for n in t.inputs]))
        self.width = len(self.outputs)
        self.fused = (
            len(self.steps) == 1
            and isinstance(self.steps[0], _Segment)
            and self.steps[0].exports == self.outputs
        )

    def __call__(self, columns: dict[str, Any]) -> np.ndarray:
        """Apply the chain to a dict of columns; returns float32 rows x width."""
        missing = [n for n in self.inputs if n not in columns]
        if missing:
            raise InvalidArgumentError(
                f"chain: input column {missing[0]!r} is missing; given: {sorted(columns)}"
            )
        if self.fused:
            seg = self.steps[0]
            block = _stack(columns, seg.inputs, np.float64, "chain input")
            return self._run_segment(seg, block, np.arange(len(seg.inputs)), np.float32)
        env = dict(columns)
        for step in self.steps:
            if isinstance(step, Transform):
                env.update(apply(step, env))
                continue
            block = _stack(env, step.inputs, np.float64, "chain input")
            out = self._run_segment(step, block, np.arange(len(step.inputs)), np.float64)
            env.update({name: out[:, k] for k, name in enumerate(step.exports)})
        return _stack(env, self.outputs, np.float32, "chain output")

    @staticmethod
    def _run_segment(seg: _Segment, block: np.ndarray, in_cols: np.ndarray, dtype) -> np.ndarray:
        out = np.empty((block.shape[0], len(seg.exports)), dtype)
        run_fused(block, in_cols, seg.code, seg.params, seg.n_slots, seg.out_slots, out)
        return out

    def bind(self, names: Sequence[str]) -> Callable[[np.ndarray], np.ndarray]:
        """A function of a rows x len(names) block (float32 or float64, C order) whose columns
        are `names`: one Numba call when the chain is fused, else via the dict path."""
        index = {n: k for k, n in enumerate(names)}
        missing = [n for n in self.inputs if n not in index]
        if missing:
            raise InvalidArgumentError(f"chain: input {missing[0]!r} is not among {list(names)}")
        if not self.fused:
            return lambda block: self({n: block[:, index[n]] for n in self.inputs})
        seg = self.steps[0]
        in_cols = np.array([index[n] for n in seg.inputs], np.int64)
        code, params, n_slots, out_slots = seg.code, seg.params, seg.n_slots, seg.out_slots
        width = len(seg.exports)

        def run(block: np.ndarray) -> np.ndarray:
            out = np.empty((block.shape[0], width), np.float32)
            run_fused(block, in_cols, code, params, n_slots, out_slots, out)
            return out

        return run


def compile_chain(
    transforms: Sequence[Transform], outputs: Sequence[str] | None = None
) -> CompiledChain:
    """Compile a transform chain; outputs default to the names produced and not consumed later."""
    return CompiledChain(transforms, outputs)
