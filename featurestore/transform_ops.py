"""The transform op registry: for each named op, how to check its params, run it on the Numba
kernels or the NumPy references, fit it on data and emit it into a fused program.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType, SimpleNamespace
from typing import Any

import numpy as np

from featurestore.errors import InvalidArgumentError
from featurestore.kernels import arithmetic, encoding, reference, scaling, spatial
from featurestore.kernels import time as ktime
from featurestore.kernels.encoding import IntVocab, StringColumn, StringVocab
from featurestore.kernels.fused import (
    OP_BUCKET,
    OP_BUCKET_WIDTH,
    OP_CLIP,
    OP_DIFFERENCE,
    OP_DISTANCE,
    OP_HAVERSINE,
    OP_LOG1P,
    OP_MIN_MAX,
    OP_RATIO,
    OP_STANDARDIZE,
    Program,
)
from featurestore.transform_inputs import as_float
from featurestore.transform_params import jsonable, param_float, param_floats, param_ints


def _namespace(*modules: ModuleType) -> SimpleNamespace:
    return SimpleNamespace(
        **{k: v for m in modules for k, v in vars(m).items() if callable(v) and k[0] != "_"}
    )


MAX_BUCKETS = 2**31
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_BUCKETS_FIX = f"give 1 to {MAX_BUCKETS} buckets"

KERNELS = _namespace(scaling, encoding, ktime, spatial, arithmetic)
REFERENCES = _namespace(reference)


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
    emit: Callable[[Program, dict, list[int], list[int]], None] | None = None
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


def _finite(col: np.ndarray, k: int, op: str) -> np.ndarray:
    """The finite values of input k: fitting skips NaN and ±inf, which have no place in a mean,
    a bound or a quantile."""
    finite = col[np.isfinite(col)]
    if finite.size == 0:
        raise InvalidArgumentError(
            f"fit {op}: input {k} has no finite values to fit on (NaN and ±inf are skipped); "
            "give data with at least one finite value"
        )
    return finite


def _quantiles(d: np.ndarray, qs: Any) -> Any:
    """np.quantile of finite data; a range over the float64 maximum is halved first, else the
    interpolation gives ±inf or NaN."""
    with np.errstate(over="ignore"):
        if np.isfinite(d.max() - d.min()):
            return np.quantile(d, qs)
    return np.quantile(d * 0.5, qs) * 2.0


def _check_standardize(params: dict, n: int, label: str) -> dict:
    std = param_floats(params, "std", n, label)
    if np.any(std < 0):
        raise InvalidArgumentError(f"{label}: params.std[{np.argmax(std < 0)}] is negative")
    return {"mean": param_floats(params, "mean", n, label), "std": std}


def _fit_standardize(cols: list, **kw: Any) -> dict:
    data = [_finite(c, k, "standardize") for k, c in enumerate(cols)]
    return {"mean": [float(np.mean(d)) for d in data], "std": [float(np.std(d)) for d in data]}


def _emit_pairs(op: int, a: str, b: str) -> Callable:
    def emit(prog: Program, norm: dict, ins: list[int], outs: list[int]) -> None:
        for k, (i, o) in enumerate(zip(ins, outs, strict=True)):
            prog.add(op, [i], o, [norm[a][k], norm[b][k]])

    return emit


def _check_lo_hi(params: dict, n: int, label: str, finite: bool = True) -> dict:
    """lo <= hi per input; when finite, hi - lo must be finite too, as the kernels divide by it."""
    lo = param_floats(params, "lo", n, label, finite)
    hi = param_floats(params, "hi", n, label, finite)
    if np.any(hi < lo):
        k = int(np.argmax(hi < lo))
        raise InvalidArgumentError(f"{label}: params.hi[{k}] = {hi[k]} is below lo = {lo[k]}")
    if finite:
        with np.errstate(over="ignore"):
            wide = np.flatnonzero(np.isinf(hi - lo))
        if wide.size:
            k = int(wide[0])
            raise InvalidArgumentError(
                f"{label}: params.hi[{k}] - params.lo[{k}] = {hi[k]} - {lo[k]} overflows float64; "
                f"narrow the range so hi - lo is at most {np.finfo(np.float64).max:.6g}, or "
                "rescale the input first"
            )
    return {"lo": lo, "hi": hi}


def _fit_min_max(cols: list, **kw: Any) -> dict:
    data = [_finite(c, k, "min_max_scale") for k, c in enumerate(cols)]
    return {"lo": [float(d.min()) for d in data], "hi": [float(d.max()) for d in data]}


def _fit_clip(cols: list, lower_quantile: float = 0.01, upper_quantile: float = 0.99) -> dict:
    data = [_finite(c, k, "clip") for k, c in enumerate(cols)]
    return {
        "lo": [float(_quantiles(d, lower_quantile)) for d in data],
        "hi": [float(_quantiles(d, upper_quantile)) for d in data],
    }


def _check_bucket_width(params: dict, n: int, label: str) -> dict:
    buckets = param_ints(params, "buckets", n, label, 1, MAX_BUCKETS, _BUCKETS_FIX)
    return {**_check_lo_hi(params, n, label), "buckets": buckets}


def _fit_bucket_width(cols: list, buckets: int = 10) -> dict:
    return {**_fit_min_max(cols), "buckets": [int(buckets)] * len(cols)}


def _emit_bucket_width(prog: Program, norm: dict, ins: list[int], outs: list[int]) -> None:
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
        arr = param_floats(
            {"boundaries": list(b)}, "boundaries", len(b), f"{label} input {k}", False
        )
        if np.any(np.diff(arr) < 0):
            raise InvalidArgumentError(f"{label}: params.boundaries[{k}] must be sorted ascending")
        out.append(arr)
    return {"boundaries": out}


def _fit_bucketize(cols: list, buckets: int = 10, boundaries: list | None = None) -> dict:
    """Equal-frequency boundaries (quantiles) unless boundaries are given."""
    if boundaries is not None:
        return {"boundaries": boundaries}
    qs = np.linspace(0.0, 1.0, int(buckets) + 1)[1:-1]
    data = [_finite(c, k, "bucketize") for k, c in enumerate(cols)]
    return {"boundaries": [np.unique(_quantiles(d, qs)).tolist() for d in data]}


def _emit_bucketize(prog: Program, norm: dict, ins: list[int], outs: list[int]) -> None:
    for k, (i, o) in enumerate(zip(ins, outs, strict=True)):
        b = norm["boundaries"][k]
        prog.add(OP_BUCKET, [i], o, b, len(b))


def _emit_log1p(prog: Program, norm: dict, ins: list[int], outs: list[int]) -> None:
    for i, o in zip(ins, outs, strict=True):
        prog.add(OP_LOG1P, [i], o, [])


def _check_hash(params: dict, n: int, label: str) -> dict:
    return {"buckets": param_ints(params, "buckets", n, label, 1, MAX_BUCKETS, _BUCKETS_FIX)}


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
    return {"vocabulary": jsonable(keep[:max_size] if max_size is not None else keep)}


def _vocab_positions(
    ns: SimpleNamespace, cols: list, norm: dict, op: str
) -> tuple[np.ndarray, int]:
    """Each value's position in the vocabulary (its size for an unknown value), and the size."""
    (col,) = cols
    vocab = norm["vocab"]
    if isinstance(vocab, StringVocab):
        if not len(vocab.hashes):
            return np.zeros(len(col), np.int64), 0
        if not isinstance(col, StringColumn):
            raise InvalidArgumentError(f"{op}: the vocabulary is strings; the input is not")
        idx = ns.vocab_index_strings(
            col.data, col.offsets, vocab.hashes, vocab.order, vocab.data, vocab.offsets
        )
        return idx, len(vocab.hashes)
    if isinstance(col, StringColumn):
        raise InvalidArgumentError(f"{op}: the vocabulary is ints; the input is strings")
    return ns.vocab_index_int64(col, vocab.values, vocab.order), len(vocab.values)


def _run_one_hot(ns: SimpleNamespace, cols: list, norm: dict) -> np.ndarray:
    idx, size = _vocab_positions(ns, cols, norm, "one_hot")
    return ns.one_hot(idx, size + 1)


def _run_vocab_index(ns: SimpleNamespace, cols: list, norm: dict) -> list[np.ndarray]:
    return [_vocab_positions(ns, cols, norm, "vocab_index")[0]]


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
    fill = param_float(params.get("fill", "nan"), label, "fill")
    return {"fill": fill}


def _emit_ratio(prog: Program, norm: dict, ins: list[int], outs: list[int]) -> None:
    prog.add(OP_RATIO, ins, outs[0], [norm["fill"]])


def _emit_difference(prog: Program, norm: dict, ins: list[int], outs: list[int]) -> None:
    prog.add(OP_DIFFERENCE, ins, outs[0], [])


def _emit_haversine(prog: Program, norm: dict, ins: list[int], outs: list[int]) -> None:
    prog.add(OP_HAVERSINE, ins, outs[0], [])


def _check_point(params: dict, n: int, label: str) -> dict:
    """lat0 in [-90, 90] and lon0 in [-180, 180] degrees: a point off the globe has no distance."""
    out = {}
    for key, bound, what in (("lat0", 90.0, "latitude"), ("lon0", 180.0, "longitude")):
        value = float(param_floats(params, key, 1, label)[0])
        if not -bound <= value <= bound:
            raise InvalidArgumentError(
                f"{label}: params.{key} is {value}; a {what} must be in [{-bound:g}, {bound:g}] "
                "degrees: give the point's coordinates in degrees"
            )
        out[key] = value
    return out


def _emit_distance(prog: Program, norm: dict, ins: list[int], outs: list[int]) -> None:
    prog.add(OP_DISTANCE, ins, outs[0], [norm["lat0"], norm["lon0"]])


def _check_age(params: dict, n: int, label: str) -> dict:
    if n == 1:
        if "now_us" not in params:
            raise InvalidArgumentError(
                f"{label}: params.now_us is required with one input; or give a second input "
                "column holding the reference time"
            )
        fix = "give µs since the Unix epoch that fit int64"
        return {"now_us": int(param_ints(params, "now_us", 1, label, INT64_MIN, INT64_MAX, fix)[0])}
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
        OpSpec(
            "vocab_index", "key", (1,), ("vocabulary",), _check_one_hot, _run_vocab_index,
            _fit_one_hot, _width(1),
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
    `min_count=`). Ops without fitted state return kw. The result is JSON/TOML-friendly and
    checked as loading would check it. Numeric fits use finite values only: NaN and ±inf are
    skipped, and an input with no finite value is an error."""
    spec = TRANSFORMS.get(op)
    if spec is None:
        raise InvalidArgumentError(f"fit: op {op!r} is unknown; known: {', '.join(TRANSFORMS)}")
    cols = _fit_columns(data)
    if spec.fit is not _no_fit and not cols:
        raise InvalidArgumentError(f"fit {op}: data is required (one or more columns)")
    if spec.kind == "float":
        cols = [as_float(c, f"fit {op}", str(k)) for k, c in enumerate(cols)]
    elif spec.kind == "key":
        cols = [c if isinstance(c, StringColumn) else np.asarray(c).reshape(-1) for c in cols]
    missing = [k for k in spec.required if k not in kw]
    if missing:
        raise InvalidArgumentError(f"fit {op}: keyword {missing[0]}= is required")
    try:
        params = jsonable(spec.fit(cols, **kw))
    except TypeError as exc:
        raise InvalidArgumentError(f"fit {op}: {exc}") from None
    if spec.fit is not _no_fit:
        spec.check(params, len(cols), f"fit {op}")
    return params
