"""Named, parameterised feature transforms that a model config refers to: the public API for
building, fitting, serialising and applying them, and chains compiled to one fused Numba call.
The ops live in transform_ops, the fused kernel in kernels/fused.

A model config lists transforms in order, e.g. `[[transforms]] op = "standardize",
inputs = ["f1", "f2"], params = {mean = [...], std = [...]}`; outputs default to the inputs
(in place). Unknown ops, inputs or parameters raise InvalidArgumentError when the Transform is
built, so a bad config fails at load, not at the first request.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from featurestore.errors import InvalidArgumentError
from featurestore.kernels.encoding import StringColumn, StringVocab
from featurestore.kernels.fused import Program, run_fused
from featurestore.transform_inputs import CONVERTERS
from featurestore.transform_ops import TRANSFORMS, OpSpec, fit
from featurestore.transform_params import jsonable

__all__ = [
    "TRANSFORMS",
    "CompiledChain",
    "Transform",
    "apply",
    "apply_chain",
    "apply_reference",
    "compile_chain",
    "fit",
    "transforms_from_config",
    "transforms_to_config",
]


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
        self.params = jsonable(self.params)
        self.checked = spec.check(self.params, n, label)
        names = self.outputs
        if len(set(names)) != len(names):
            raise InvalidArgumentError(f"{label}: output names repeat: {names}")

    @property
    def spec(self) -> OpSpec:
        """The registry entry of this op."""
        return TRANSFORMS[self.op]

    @property
    def reads_strings(self) -> bool:
        """Whether the op reads its inputs as strings (a one_hot over a string vocabulary)."""
        return isinstance(self.checked.get("vocab"), StringVocab)

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
            "params": jsonable(self.params),
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


def _inputs(transform: Transform, columns: dict) -> list:
    label = f"transform {transform.op!r} on {transform.inputs}"
    convert = CONVERTERS[transform.spec.kind]
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
    prog = Program()
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
