"""A model's Predict binding: which features and request-time values fill which input columns,
with which defaults and transforms, parsed and compiled once when the model loads.

config.toml:
    [features]
    entity = "user"              # optional: every bound view must belong to this entity
                                 # (without it, the views must still share one entity)
    service = "fraud"            # optional: read the bound features through this feature
                                 # service, at the versions it reads (references unpinned);
                                 # "alias:feature" then reads the service's projection alias
    input = "x"                  # model input to fill (default: the model's only input)
    outputs = ["a", "b"]         # optional: input column order (default: the chain's outputs,
                                 # every column then read by some transform; or the columns
                                 # when there are no transforms)
    [[features.columns]]
    feature = "user_stats:amount_mean"   # or features = [...]; "view@2:f" pins a version
    default = 0.0                        # absent: required (rows without it fail, unscored)
    name = "amount_mean"                 # optional column name (default: the reference)
    [[features.columns]]
    request = "amount"                   # a request-time value, declared in [request_values]
    [request_values]
    amount = "float64"                   # float32 | float64 | int64 | bool | string
    [[transforms]]                       # featurestore.transforms entries, fitted params inline
    op = "standardize"  inputs = ["user_stats:amount_mean"]  params = {mean = 3.1, std = 2.0}

Columns reach float ops as float64. Columns that a time op (int64 µs since the epoch) or a key
op (hash_bucket, one_hot: int64 or strings) reads also travel with their own dtype, so times and
ids stay exact and string features and request values can be hashed or one-hot encoded.
Views and features are resolved against the registry at request time (the registry may change
after the model loads); everything else is checked here so a bad config never serves.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from featurestore.dtypes import DType, FeatureStatus
from featurestore.errors import ConflictError, InvalidArgumentError, NotFoundError
from featurestore.feature_refs import parse_feature_refs
from featurestore.kernels.encoding import StringVocab
from featurestore.online_store import OnlineStore, ReadResult, ViewRead
from featurestore.registry import FeatureService, FeatureView
from featurestore.transforms import Transform, compile_chain, transforms_from_config
from server.model_config import ModelConfig, ModelConfigError

REQUEST_DTYPES: dict[str, DType] = {
    "float32": DType.FLOAT32,
    "float64": DType.FLOAT64,
    "int64": DType.INT64,
    "bool": DType.BOOL,
    "string": DType.STRING,
}
_NUMERIC = (DType.FLOAT32, DType.FLOAT64, DType.INT64, DType.BOOL)
_INTEGER = (DType.INT64, DType.BOOL)
_FEATURES_KEYS = {"entity", "input", "outputs", "columns", "service"}
_COLUMN_KEYS = {"feature", "features", "request", "default", "name"}
_NO_EVENT = np.iinfo(np.int64).max
_INT64 = np.iinfo(np.int64)
_PRESENT = np.uint8(FeatureStatus.PRESENT)


@dataclass(frozen=True)
class FeatureColumn:
    """One input column read from the store."""

    ref: str
    view: str
    version: int
    feature: str
    name: str
    default: float | int | str | None
    where: str = ""


@dataclass(frozen=True)
class RequestColumn:
    """One input column sent by the caller with the request."""

    name: str
    dtype: DType


@dataclass
class BoundRead:
    """One store read per request: a view (version 0 = latest) and the features it fills."""

    view: str
    version: int
    features: list[str]
    columns: list[int]


@dataclass
class _BlockMap:
    """Where one store block's columns go: block column order -> binding column indexes (into
    the float64 block, unless the block holds strings), and which of them also travel typed."""

    dst: np.ndarray
    defaults: np.ndarray
    required: np.ndarray
    refs: list[str]
    fills: list[str]
    numeric: bool
    typed: list[tuple[int, str, Any]]


@dataclass
class Fill:
    """A bound feature that was not present in some rows: per-row statuses and what replaced it."""

    feature: str
    statuses: np.ndarray
    filled_with: str


@dataclass
class Assembled:
    """The raw input block of one request and what the reads said about its rows."""

    block: np.ndarray
    failed: np.ndarray
    first_bad: np.ndarray
    failed_status: np.ndarray
    oldest_event_us: np.ndarray
    failed_features: list[str] = field(default_factory=list)
    fills: list[Fill] = field(default_factory=list)
    views: list[str] = field(default_factory=list)
    typed: dict[str, np.ndarray] = field(default_factory=dict)
    service: str = ""
    aliases: list[str] = field(default_factory=list)
    """Per view, the projection alias it was read under ("" for a plain read); empty when
    nothing was read through a projection."""


def _error(source: str, message: str) -> ModelConfigError:
    return ModelConfigError(f"{source}: {message}")


def _default(source: str, where: str, raw: Any) -> float | int | str | None:
    """A column's default as given: a string, an integer within int64 or a finite float (a
    missing row must not be scored NaN or inf, nor fail or wrap when its int64 column fills)."""
    if raw is None or isinstance(raw, str):
        return raw
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise _error(source, f"{where}.default must be a number, got {raw!r}")
    if isinstance(raw, int) and not _INT64.min <= raw <= _INT64.max:
        raise _error(
            source,
            f"{where}.default {raw} is outside int64 [{_INT64.min}, {_INT64.max}]; give an "
            "integer in that range (or a float such as 1.8e19 for a float column)",
        )
    if isinstance(raw, float) and not math.isfinite(raw):
        raise _error(
            source,
            f"{where}.default is {raw}; give a finite number (a missing row would be scored "
            f"{raw} with status OK)",
        )
    return raw


def _parse_columns(
    source: str, raw: Any, request_dtypes: dict[str, DType]
) -> list[FeatureColumn | RequestColumn]:
    if not isinstance(raw, list) or not raw:
        raise _error(source, "[[features.columns]] is required: list the input columns in order")
    columns: list[FeatureColumn | RequestColumn] = []
    for i, entry in enumerate(raw):
        where = f"features.columns[{i}]"
        if not isinstance(entry, dict):
            raise _error(source, f"{where} must be a table")
        unknown = sorted(set(entry) - _COLUMN_KEYS)
        if unknown:
            raise _error(
                source, f"{where}: unknown key '{unknown[0]}'; allowed: {sorted(_COLUMN_KEYS)}"
            )
        kinds = [k for k in ("feature", "features", "request") if k in entry]
        if len(kinds) != 1:
            raise _error(source, f"{where} needs exactly one of feature, features, request")
        if kinds[0] == "request":
            name = entry["request"]
            if not isinstance(name, str) or name not in request_dtypes:
                raise _error(
                    source,
                    f"{where}.request {name!r} is not declared in [request_values]; add "
                    f'{name} = "float64" (or float32, int64, bool, string) there',
                )
            if "default" in entry or "name" in entry:
                raise _error(source, f"{where}: a request column takes no default or name")
            columns.append(RequestColumn(name, request_dtypes[name]))
            continue
        refs = entry[kinds[0]]
        refs = [refs] if kinds[0] == "feature" else refs
        if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs) or not refs:
            raise _error(source, f"{where}.{kinds[0]} must name 'view:feature' references")
        if "name" in entry and len(refs) != 1:
            raise _error(source, f"{where}.name needs a single feature")
        default = _default(source, where, entry.get("default"))
        for ref in refs:
            try:
                groups = parse_feature_refs([ref])
            except InvalidArgumentError as exc:
                raise _error(source, f"{where}: {exc}") from None
            (view, version), features = next(iter(groups.items()))
            if features is None:
                raise _error(source, f"{where}: {ref!r} names a view; name one feature per column")
            name = entry.get("name", ref)
            if not isinstance(name, str) or not name:
                raise _error(source, f"{where}.name must be a non-empty string")
            columns.append(FeatureColumn(ref, view, version, features[0], name, default, where))
    return columns


def _request_dtypes(source: str, raw: Any) -> dict[str, DType]:
    out: dict[str, DType] = {}
    for name, dtype in (raw or {}).items():
        if dtype not in REQUEST_DTYPES:
            raise _error(
                source,
                f"request_values.{name} = {dtype!r}; use one of {', '.join(REQUEST_DTYPES)}",
            )
        out[name] = REQUEST_DTYPES[dtype]
    return out


class PredictionBinding:
    """A compiled binding: parse with compile_binding(), then per request read each of `reads`,
    assemble() the raw block and transform() it into the model input."""

    def __init__(
        self,
        columns: Sequence[FeatureColumn | RequestColumn],
        transforms: list[dict],
        outputs: list[str] | None,
        input_name: str,
        entity: str | None,
        source: str,
        service: str | None = None,
    ) -> None:
        self.columns = list(columns)
        self.source = source
        self.input_name = input_name
        self.entity = entity
        self.service = service
        self.names = [c.name for c in self.columns]
        dupes = sorted({n for n in self.names if self.names.count(n) > 1})
        if dupes:
            raise _error(source, f"column {dupes[0]!r} is bound twice; give each a unique name")
        self.requests = [(k, c) for k, c in enumerate(self.columns) if isinstance(c, RequestColumn)]
        self.reads: list[BoundRead] = []
        by_view: dict[tuple[str, int], BoundRead] = {}
        for k, c in enumerate(self.columns):
            if isinstance(c, FeatureColumn):
                if service is not None and c.version:
                    raise _error(
                        source,
                        f"{c.where}: {c.ref!r} pins a version, but features.service {service!r} "
                        f"decides the versions read; write '{c.view}:{c.feature}' (pin the "
                        "version in the feature service)",
                    )
                read = by_view.get((c.view, c.version))
                if read is None:
                    read = by_view[(c.view, c.version)] = BoundRead(c.view, c.version, [], [])
                    self.reads.append(read)
                if c.feature in read.features:
                    raise _error(source, f"feature {c.ref!r} is bound twice")
                read.features.append(c.feature)
                read.columns.append(k)
        self.store_reads = [ViewRead(r.view, tuple(r.features), r.version) for r in self.reads]
        try:
            steps = transforms_from_config(transforms)
            chain = compile_chain(steps, outputs) if steps else None
        except InvalidArgumentError as exc:
            raise _error(source, str(exc)) from None
        if chain is None:
            out = outputs or self.names
            missing = [n for n in out if n not in self.names]
            if missing:
                raise _error(source, f"features.outputs names {missing[0]!r}, which is no column")
            index = np.array([self.names.index(n) for n in out], np.int64)
            self.outputs = list(out)
            self._run: Callable[[np.ndarray], np.ndarray] = lambda b: b[:, index].astype(np.float32)
        else:
            self.outputs = chain.outputs
            try:
                self._run = chain.bind(self.names)
            except InvalidArgumentError as exc:
                raise _error(
                    source, f"[[transforms]]: {exc}; bind it in [[features.columns]]"
                ) from None
        self.width = len(self.outputs)
        kinds = _input_kinds(steps, set(self.names))
        self.typed = {n for n, k in kinds.items() if k - {"float"}}
        self._time = {n for n, k in kinds.items() if "time" in k}
        produced = {name for step in steps for name in step.outputs}
        passed_through = set(self.outputs) - produced
        self._key_only = {n for n, k in kinds.items() if k == {"key"}} - passed_through
        self._strings = {n for step in steps if step.reads_strings for n in step.inputs}
        self._vocabs = _vocab_readers(steps, set(self.names))
        self._check_typed(source)
        self._check_float32_defaults(source, passed_through)
        if chain is not None and outputs is None:
            _check_all_used(source, self.names, chain.inputs, chain.outputs, input_name)
        if self.typed:
            position = {n: k for k, n in enumerate(self.names)}
            numeric = [n for n in chain.inputs if n not in self.typed]
            self._run_typed = lambda block, typed: chain(
                {**{n: block[:, position[n]] for n in numeric}, **typed}
            )
        self._maps: dict[tuple, list[_BlockMap]] = {}

    def _check_typed(self, source: str) -> None:
        """Dtypes and defaults of the columns that time and key ops read, as far as the config
        alone tells (feature dtypes are checked when a view is first read)."""
        for c in self.columns:
            name = c.name
            vocab = (
                self._vocab_mismatch(name, c.dtype == DType.STRING)
                if isinstance(c, RequestColumn)
                else None
            )
            if vocab is not None:
                where, kind = vocab
                want = "string" if kind == "strings" else "int64"
                raise _error(
                    source,
                    f"request_values.{name} is {c.dtype.name.lower()}, but {where} reads it "
                    f'against a vocabulary of {kind}; declare {name} = "{want}" or give that '
                    "vocabulary values of the column's type",
                )
            if isinstance(c, RequestColumn):
                if name in self._time and c.dtype != DType.INT64:
                    raise _error(
                        source,
                        f"request_values.{name} is {c.dtype.name.lower()}, but a time op reads "
                        f'it as µs since the epoch; declare {name} = "int64"',
                    )
                if name in self.typed and c.dtype not in (*_INTEGER, DType.STRING):
                    raise _error(
                        source,
                        f"request_values.{name} is {c.dtype.name.lower()}, but hash_bucket / "
                        'one_hot read it as a key; declare it "int64" or "string"',
                    )
                if c.dtype == DType.STRING and name not in self._key_only:
                    raise _error(
                        source,
                        f"request_values.{name} is a string: only hash_bucket / one_hot can read "
                        "it, and it cannot be a model input column itself",
                    )
                continue
            if isinstance(c.default, str) and name not in self._key_only:
                raise _error(
                    source,
                    f"column {name!r}: default must be a number, got {c.default!r} (a string "
                    "default suits only a column that only hash_bucket / one_hot read)",
                )
            vocab = (
                self._vocab_mismatch(name, isinstance(c.default, str))
                if c.default is not None
                else None
            )
            if vocab is not None:
                where, kind = vocab
                raise _error(
                    source,
                    f"column {name!r}: default {c.default!r} must be "
                    + ("a string" if kind == "strings" else "an integer")
                    + f": {where} reads it against a vocabulary of {kind}",
                )
            if name in self.typed and isinstance(c.default, float):
                raise _error(
                    source,
                    f"column {name!r}: default {c.default!r} must be an integer"
                    + (" (µs since the epoch)" if name in self._time else " or a string")
                    + ": a time or key op reads this column",
                )

    def _check_float32_defaults(self, source: str, passed_through: set[str]) -> None:
        """A float default of a column that reaches the FP32 model input untransformed must fit
        float32, else a missing row is scored from inf with status OK."""
        for c in self.columns:
            if not isinstance(c, FeatureColumn) or not isinstance(c.default, float):
                continue
            if c.name not in passed_through:
                continue
            with np.errstate(over="ignore"):
                fits = math.isfinite(np.float32(c.default))
            if not fits:
                raise _error(
                    source,
                    f"{c.where}.default {c.default} overflows float32 (max "
                    f"{np.finfo(np.float32).max:.8g}), and column {c.name!r} is a FP32 model "
                    "input as it is; give a default within float32's range",
                )

    def _vocab_mismatch(self, name: str, strings: bool) -> tuple[str, str] | None:
        """The first transform that reads column `name` against a vocabulary of the other type
        than the column's (strings or not), as (where, "strings" | "ints"); None if none does."""
        for where, vocab_strings in self._vocabs.get(name, ()):
            if vocab_strings != strings:
                return where, "strings" if vocab_strings else "ints"
        return None

    def warmup_typed(self) -> dict[str, np.ndarray]:
        """One-row typed inputs that JIT-compile the typed ops at load: strings where a string
        request value or a string vocabulary says so, else int64."""
        strings = {c.name for _, c in self.requests if c.dtype == DType.STRING} | self._strings
        return {
            n: np.array([""], object) if n in strings else np.zeros(1, np.int64) for n in self.typed
        }

    def transform(
        self, block: np.ndarray, typed: dict[str, np.ndarray] | None = None
    ) -> np.ndarray:
        """The model input (float32 rows x width) from an assembled float64 block and the
        typed columns that time and key ops read."""
        if self.typed:
            return self._run_typed(block, typed)
        return self._run(block)

    def _block_maps(self, read: BoundRead, result: ReadResult) -> list[_BlockMap]:
        """How a view's blocks map to columns; built once per bound read and definition read
        (the view read is named: a projection's alias may name another view from one apply to
        the next, with the same version and update time)."""
        fv: FeatureView = result.view
        key = (read.view, read.version, fv.name, fv.version, fv.updated_us)
        maps = self._maps.get(key)
        if maps is not None:
            return maps
        if self.service is None:  # through a service, every read checks the plain views
            self._check_entities([fv])
        column_of = dict(zip(read.features, read.columns, strict=True))
        maps = []
        for block in result.blocks:
            cols = [self.columns[column_of[f]] for f in block.features]
            numeric = block.dtype in _NUMERIC
            if not numeric and not (
                block.dtype == DType.STRING and all(c.name in self._key_only for c in cols)
            ):
                raise ConflictError(
                    f"feature {block.features[0]!r} of view {fv.name!r} is {block.dtype.name}; "
                    "only numeric scalar features can fill model input columns (strings only "
                    "through hash_bucket / one_hot)"
                )
            typed = []
            for j, c in enumerate(cols):
                if c.name not in self.typed:
                    continue
                if numeric and block.dtype not in _INTEGER:
                    raise ConflictError(
                        f"feature {c.ref!r} is {block.dtype.name}, but a time or key op reads "
                        "it: time ops need int64 µs since the epoch, hash_bucket / one_hot "
                        "int64 or strings; bind such a feature"
                    )
                if c.default is not None and numeric == isinstance(c.default, str):
                    raise ConflictError(
                        f"feature {c.ref!r} is {block.dtype.name}, but its default "
                        f"{c.default!r} is not; fix the default in [[features.columns]]"
                    )
                vocab = self._vocab_mismatch(c.name, not numeric)
                if vocab is not None:
                    where, kind = vocab
                    raise ConflictError(
                        f"feature {c.ref!r} is {block.dtype.name}, but {where} reads it against "
                        f"a vocabulary of {kind}; bind "
                        + ("a STRING" if kind == "strings" else "an INT64")
                        + " feature or give that vocabulary values of the feature's type"
                    )
                typed.append(
                    (j, c.name, c.default if c.default is not None else (0 if numeric else ""))
                )
            defaults = [math.nan if c.default is None or not numeric else c.default for c in cols]
            maps.append(
                _BlockMap(
                    np.array([column_of[f] for f in block.features], np.int64),
                    np.array(defaults, np.float64),
                    np.array([c.default is None for c in cols], np.bool_),
                    [c.ref for c in cols],
                    [
                        "required: row not scored" if c.default is None else f"default={c.default}"
                        for c in cols
                    ],
                    numeric,
                    typed,
                )
            )
        if len(self._maps) > 64:
            self._maps.clear()
        self._maps[key] = maps
        return maps

    def read(
        self, store: OnlineStore, keys: dict[str, np.ndarray]
    ) -> tuple[list[ReadResult], list[str]]:
        """One ReadResult per bound read, from one snapshot, and per read the projection
        alias it was read under ("" for a plain read; an empty list when there is none).
        Views of another entity than features.entity, or of several entities when it is not
        set, are FAILED_PRECONDITION naming them: one set of keys cannot address them all. A
        bound view, version or feature the registry does not have is FAILED_PRECONDITION
        too: the caller's request is fine, the model's binding is not (NOT_FOUND would say
        the model is unknown); the close names it suggests stay on the error's cause, where
        the server keeps those the caller may see."""
        if self.service is not None:
            return self._read_service(store, keys)
        try:
            results = store.read_many(self.store_reads, keys)
        except InvalidArgumentError:
            self._check_entities([store.registry.get_view(r.view, r.version) for r in self.reads])
            raise
        except NotFoundError as exc:
            missing = NotFoundError(exc.problem, exc.what, exc.suggestions)  # no RPC to list them
            raise ConflictError(
                f"the model's [features] binds what the feature store does not have: {missing}; "
                f"apply the view or feature, or bind a version that has it (view@N:feature) in "
                f"{self.source}"
            ) from missing
        if self.entity is None and len(results) > 1:
            self._check_entities([r.view for r in results])
        return results, []

    def _read_service(
        self, store: OnlineStore, keys: dict[str, np.ndarray]
    ) -> tuple[list[ReadResult], list[str]]:
        """The bound reads through features.service, resolved in the read's own snapshot: each
        bound view at the version the service reads it. A service that is not stored, or does
        not read a bound feature (a whole-view reference to a version without it), is
        FAILED_PRECONDITION naming it; keys that do not fit the views read (a projection's
        mapped columns included) are the caller's INVALID_ARGUMENT, unless those views are not
        of the binding's entity. A projection is keyed by its own columns, so features.entity
        and the one-entity rule hold for the views read by their own join keys only. Returns
        read's results and aliases."""
        resolved: list[ViewRead] = []

        def select(service: FeatureService) -> list[ViewRead]:
            resolved[:] = self._service_reads(service)
            return resolved

        try:
            results = store.read_service(self.service, keys, select=select)
        except NotFoundError as exc:
            if exc.what == "feature service":
                problem = f"is not in the feature store ({exc.problem})"
                fix = "apply it"
            else:
                problem = f"does not read a feature the model binds ({exc.problem})"
                fix = "add the feature to the service, or pin the view to a version that has it"
            raise ConflictError(
                f"the model's features.service {self.service!r} {problem}; {fix}, or bind "
                f"another service in {self.source}"
            ) from None
        except InvalidArgumentError:
            plain = [r for r in resolved if not r.alias]
            self._check_entities([store.registry.get_view(r.view, r.version) for r in plain])
            raise
        plain = [r.view for r, read in zip(results, resolved, strict=True) if not read.alias]
        self._check_entities(plain)
        aliases = [read.alias for read in resolved]
        return results, aliases if any(aliases) else []

    def _service_reads(self, service: FeatureService) -> list[ViewRead]:
        """The store reads of the bound features through `service`, in `reads` order. A bound
        name that is one of its projections' aliases reads that projection: its view and
        version, keyed by the request columns its join_key_map names."""
        names = _names_through(service)
        reads = []
        for read in self.reads:
            view, version, alias, key_map, wanted = names.get(read.view, _UNREAD)
            unread = [f for f in read.features if not view or (wanted and f not in wanted)]
            if unread:
                raise ConflictError(
                    f"feature service {service.name!r} does not read {read.view}:{unread[0]}, "
                    f"which the model binds; add it to the service, or bind another service "
                    f"in {self.source}"
                )
            reads.append(ViewRead(view, tuple(read.features), version, alias, key_map))
        return reads

    def views_through(self, service: FeatureService | None) -> set[str]:
        """The views the bound reads read through `service` as _service_reads resolves them (a
        projection's alias stands for its view): what a caller needs read scopes for. A bound
        name `service` does not read, or every name when it is None (not stored), stands for
        no view: the read refuses the binding whatever the caller's scopes."""
        names = _names_through(service) if service is not None else {}
        return {names[r.view][0] for r in self.reads if r.view in names}

    def _check_entities(self, views: Sequence[FeatureView]) -> None:
        """Raise ConflictError unless every view belongs to the binding's one entity."""
        if self.entity is not None:
            for fv in views:
                if fv.entity != self.entity:
                    raise ConflictError(
                        f"view {fv.name!r} belongs to entity {fv.entity!r}, but the model binds "
                        f"entity {self.entity!r}; fix [features] or the view"
                    )
            return
        if len({fv.entity for fv in views}) > 1:
            found = ", ".join(f"{fv.name!r} of entity {fv.entity!r}" for fv in views)
            raise ConflictError(
                f"[features] binds views of more than one entity ({found}), but Predict reads "
                "every view with the same entity keys; bind views of one entity and set "
                "features.entity to it"
            )

    def assemble(
        self,
        results: Sequence[ReadResult],
        request_values: dict[str, np.ndarray],
        rows: int,
        aliases: Sequence[str] = (),
    ) -> Assembled:
        """The float64 rows x columns block from one ReadResult per read (in `reads` order) and
        the decoded request values; non-present values take their default, and rows missing a
        required feature are marked failed (first_bad indexes failed_features, with its status).
        `aliases` are read's, kept for the lineage."""
        block = np.empty((rows, len(self.columns)), np.float64)
        failed = np.zeros(rows, np.bool_)
        first_bad = np.full(rows, -1, np.int64)
        failed_status = np.zeros(rows, np.uint8)
        oldest = np.full(rows, _NO_EVENT, np.int64)
        out = Assembled(
            block,
            failed,
            first_bad,
            failed_status,
            oldest,
            service=self.service or "",
            aliases=list(aliases),
        )
        refs = out.failed_features
        for read, result in zip(self.reads, results, strict=True):
            out.views.append(f"{result.view.name}@{result.view.version}")
            found = result.row_status == _PRESENT
            np.minimum(oldest, np.where(found, result.event_us, _NO_EVENT), out=oldest)
            for bmap, data in zip(self._block_maps(read, result), result.blocks, strict=True):
                values = data.values
                statuses = data.statuses
                missing = statuses != _PRESENT
                if missing.any():
                    if bmap.numeric:
                        values = np.where(missing, bmap.defaults, values)
                    for j in np.flatnonzero(missing.any(axis=0)):
                        out.fills.append(Fill(bmap.refs[j], statuses[:, j].copy(), bmap.fills[j]))
                        if bmap.required[j]:
                            new = missing[:, j] & (first_bad < 0)
                            first_bad[new] = len(refs)
                            failed_status[new] = statuses[new, j]
                            refs.append(bmap.refs[j])
                block[:, bmap.dst] = values if bmap.numeric else math.nan
                for j, name, default in bmap.typed:
                    column = np.where(missing[:, j], default, data.values[:, j])
                    out.typed[name] = column.astype(np.int64) if bmap.numeric else column
        np.greater_equal(first_bad, 0, out=failed)
        oldest[oldest == _NO_EVENT] = 0
        for k, column in self.requests:
            values = request_values[column.name]
            block[:, k] = math.nan if column.dtype == DType.STRING else values
            if column.name in self.typed:
                out.typed[column.name] = values
        return out


_Through = tuple[str, int, str, Mapping[str, str] | None, Sequence[str] | None]
"""How a service reads a name: (view, version, alias or "", join_key_map, the features read
there or None for all)."""
_UNREAD: _Through = ("", 0, "", None, None)
"""What _names_through gives a name its service does not read."""


def _names_through(service: FeatureService) -> dict[str, _Through]:
    """How `service` reads each name a binding may use: a view it references, or one of its
    projections' aliases (the registry keeps the two apart)."""
    names: dict[str, _Through] = {
        view: (view, version, "", None, wanted or None)
        for (view, version), wanted in service.reads.items()
    }
    for p in service.projections:
        view, version = p.view_key
        names[p.alias] = (view, version, p.alias, p.join_key_map, p.features or None)
    return names


def _check_all_used(
    source: str, names: Sequence[str], read: Sequence[str], outputs: Sequence[str], input_name: str
) -> None:
    """Without features.outputs the model gets only the chain's outputs, so a bound column no
    transform reads would silently never reach it: refuse the config, naming the columns."""
    unused = [n for n in names if n not in read]
    if unused:
        which = ", ".join(repr(n) for n in unused)
        raise _error(
            source,
            f"bound column {which}: no transform reads it (a transform that writes the same "
            "name first replaces it unread), and without features.outputs input "
            f"{input_name!r} gets only the transforms' outputs ({', '.join(outputs)}), so it "
            "would never reach the model; list it in [features] outputs = [...] in the order the "
            "model expects, or remove its binding",
        )


def _input_kinds(steps: Sequence[Transform], columns: set[str]) -> dict[str, set[str]]:
    """For each bound column that transforms read before any transform overwrites it, the kinds
    of the ops reading it: float, time (int64 µs) or key (int64 or strings)."""
    kinds: dict[str, set[str]] = {}
    produced: set[str] = set()
    for step in steps:
        for name in step.inputs:
            if name in columns and name not in produced:
                kinds.setdefault(name, set()).add(step.spec.kind)
        produced.update(step.outputs)
    return kinds


def _vocab_readers(
    steps: Sequence[Transform], columns: set[str]
) -> dict[str, list[tuple[str, bool]]]:
    """For each bound column that a one_hot or vocab_index reads before any transform
    overwrites it: (where, whether the vocabulary is strings) per such transform. An empty
    vocabulary matches a column of either type, so it is left out."""
    readers: dict[str, list[tuple[str, bool]]] = {}
    produced: set[str] = set()
    for i, step in enumerate(steps):
        vocab = step.checked.get("vocab")
        strings = isinstance(vocab, StringVocab)
        size = len(vocab.hashes) if strings else len(vocab.values) if vocab is not None else 0
        if size:
            for name in step.inputs:
                if name in columns and name not in produced:
                    readers.setdefault(name, []).append((f"transforms[{i}] ({step.op})", strings))
        produced.update(step.outputs)
    return readers


def compile_binding(config: ModelConfig, source: str) -> PredictionBinding | None:
    """The model's binding, checked against its input tensor and warmed up (JIT compiled), or
    None when the config has no [features] table; ModelConfigError names the bad field."""
    ext = config.extensions
    if "features" not in ext:
        extra = sorted(k for k in ("transforms", "request_values") if k in ext)
        if extra:
            raise _error(source, f"[{extra[0]}] needs a [features] table that binds the inputs")
        return None
    raw = ext["features"]
    unknown = sorted(set(raw) - _FEATURES_KEYS)
    if unknown:
        raise _error(
            source, f"unknown key [features] '{unknown[0]}'; allowed: {sorted(_FEATURES_KEYS)}"
        )
    entity = raw.get("entity")
    if entity is not None and (not isinstance(entity, str) or not entity):
        raise _error(source, "features.entity must be an entity name")
    outputs = raw.get("outputs")
    if outputs is not None and (
        not isinstance(outputs, list) or not all(isinstance(o, str) for o in outputs)
    ):
        raise _error(source, "features.outputs must be a list of column names")
    transforms = ext.get("transforms", [])
    columns = _parse_columns(
        source, raw.get("columns"), _request_dtypes(source, ext.get("request_values"))
    )
    input_name = raw.get("input")
    required = [t.name for t in config.inputs if not t.optional]
    if input_name is None:
        if len(required) != 1:
            names = ", ".join(t.name for t in config.inputs)
            raise _error(source, f"features.input is required: the model has inputs {names}")
        input_name = required[0]
    spec = config.input(input_name)
    if spec is None:
        names = ", ".join(t.name for t in config.inputs)
        raise _error(source, f"features.input {input_name!r} is not a model input ({names})")
    unfilled = [name for name in required if name != input_name]
    if unfilled:
        fix = (
            "an ensemble's inputs cannot be optional, so remove the others from its [[inputs]] "
            "(a step's output can feed what they fed)"
            if config.ensemble
            else "serve a model whose other inputs are optional (ONNX initializers)"
        )
        raise _error(
            source,
            f"Predict fills only features.input {input_name!r}, but the model also requires "
            f"{', '.join(repr(n) for n in unfilled)}; {fix}, or call ModelInfer with every input",
        )
    service = raw.get("service")
    if service is not None and (not isinstance(service, str) or not service):
        raise _error(source, "features.service must be a feature service name")
    binding = PredictionBinding(columns, transforms, outputs, input_name, entity, source, service)
    if spec.datatype != "FP32" or len(spec.shape) != 2 or spec.shape[0] != -1:
        raise _error(
            source,
            f"input {input_name!r} is {spec.datatype} {list(spec.shape)}; Predict fills FP32 "
            "[-1, width] inputs",
        )
    if spec.shape[1] != -1 and spec.shape[1] != binding.width:
        raise _error(
            source,
            f"the binding yields {binding.width} columns ({', '.join(binding.outputs)}), but "
            f"input {input_name!r} is {spec.shape[1]} wide",
        )
    binding.transform(np.zeros((1, len(binding.columns)), np.float64), binding.warmup_typed())
    return binding
