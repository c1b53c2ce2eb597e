"""Build FeatureStore requests from NumPy and read responses back into NumPy.

The sync and asyncio clients differ only in how they send; everything else is here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from featurestore.feature_refs import written_view_parts
from featurestore.registry import FeatureService
from protos import arrays
from protos.featureserve.v1 import feature_store_pb2 as pb
from protos.featureserve.v1 import types_pb2

POLICIES = {"reject_batch": pb.REJECT_BATCH, "skip_bad_rows": pb.SKIP_BAD_ROWS}


@dataclass
class OnlineFeatures:
    """Features of many entities, in request order of entities.

    Columns are keyed "view:feature", or "view@N:feature" when the reference named version N;
    event_timestamps and versions (the version read) are keyed "view" or "view@N" likewise.
    A lookup by feature service keys them "view:feature" and "view", whatever version the
    service reads (versions says which), and its projections' "alias:feature" and "alias";
    projection_of maps each such alias to the view it read.
    """

    rows: int
    values: dict[str, np.ndarray] = field(default_factory=dict)
    statuses: dict[str, np.ndarray] = field(default_factory=dict)
    event_timestamps: dict[str, np.ndarray] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)
    projection_of: dict[str, str] = field(default_factory=dict)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.values[name]

    def matrix(self, names: list[str], dtype: type = np.float32) -> np.ndarray:
        """The named columns side by side as one rows x len(names) array."""
        return np.column_stack([self.values[n].astype(dtype, copy=False) for n in names])


@dataclass
class WriteSummary:
    """Counts of a write: rows written, stale (an equal or newer event was stored: not applied),
    rejected; errors name each rejected row by its message (`batch`, counted over the stream
    writer's life) and its row in that message."""

    written: int
    stale: int
    rejected: int
    errors: list[types_pb2.RowError] = field(default_factory=list)

    def __add__(self, other: WriteSummary) -> WriteSummary:
        return WriteSummary(
            self.written + other.written,
            self.stale + other.stale,
            self.rejected + other.rejected,
            self.errors + other.errors,
        )


def column(values: object, field: str) -> np.ndarray:
    """`values` (an array, list or Series) as a NumPy column; ArrayError naming `field` for a
    single value. A sequence holding text becomes an object array so every str or bytes stays
    exactly as given (NumPy's fixed-width "U"/"S" dtypes drop trailing NUL characters; a "U"
    array the caller built has already lost them)."""
    if isinstance(values, np.ndarray):
        arr = values
    else:
        arr = np.asarray(values)
        if arr.dtype.kind in "US":
            arr = np.array(values, dtype=object)
    if arr.ndim == 0:
        raise arrays.ArrayError(
            f"{field}: got the single value {values!r}, not a column; send one value per row, "
            f"e.g. [{values!r}]"
        )
    return arr.astype(object) if arr.dtype.kind == "U" else arr


def key_columns(
    keys: Mapping[str, object], keyless_when_empty: bool = True
) -> list[types_pb2.NamedArray]:
    """Entity key columns as NamedArrays (int64 or string); arrays.ArrayError names a key that
    does not fit int64 (an unsigned value over 2**63-1) or is a single value.

    A plain empty sequence carries no dtype, so when no key has a row such keys are left out
    (the method answers an empty request whatever its key types), or, where the method needs
    every key column (`keyless_when_empty` false), sent as empty STRING columns, which the
    server takes for a key of any type.
    """
    cols = {name: column(values, f"keys[{name!r}]") for name, values in keys.items()}
    if all(len(arr) == 0 for arr in cols.values()):
        untyped = [name for name in cols if not isinstance(keys[name], np.ndarray)]
        if keyless_when_empty:
            cols = {name: arr for name, arr in cols.items() if name not in untyped}
        else:
            cols |= {name: np.empty(0, object) for name in untyped}
    return [
        types_pb2.NamedArray(name=name, values=arrays.to_array(arr, field=f"keys[{name!r}]"))
        for name, arr in cols.items()
    ]


_COARSER_THAN_US = frozenset({"Y", "M", "W", "D", "h", "m", "s", "ms"})


def _datetimes_us(times: np.ndarray) -> np.ndarray:
    """datetime64 `times` as int64 µs since the epoch; arrays.ArrayError names the first time
    that int64 µs cannot hold (NumPy's own cast wraps it round to another date)."""
    us = times.astype("datetime64[us]")
    if np.datetime_data(times.dtype)[0] in _COARSER_THAN_US:
        wrapped = (us.astype(times.dtype) != times) & ~np.isnat(times)
        if wrapped.any():
            row = int(np.flatnonzero(wrapped)[0])
            raise arrays.ArrayError.at(
                "event_time",
                row,
                f"{times[row]} is outside what int64 µs since the epoch can hold "
                f"({np.datetime64(-(2**63) + 1, 'us')} to {np.datetime64(2**63 - 1, 'us')}); "
                "check the unit of the times",
            )
    return us.astype(np.int64)


def event_times_us(event_time: object, rows: int) -> np.ndarray:
    """Event times as int64 µs since the epoch from ints or floats (µs, truncated), datetime64
    or one scalar; arrays.ArrayError names the first time outside the int64 (µs) range."""
    arr = np.asarray(event_time)
    if arr.ndim == 0:
        arr = np.full(rows, arr)
    if arr.dtype.kind == "M":
        arr = _datetimes_us(arr)
    if arr.dtype.kind == "f":
        arr = np.trunc(arr)
    return arrays.cast(arr, types_pb2.INT64, "event_time")


def get_request(
    features: Sequence[str] | FeatureService | None,
    keys: Mapping[str, object] | None,
    feature_service: str | FeatureService | None = None,
) -> pb.GetOnlineFeaturesRequest:
    """A GetOnlineFeatures request for the references `features` or for a feature service (a
    FeatureService sends its name: the server reads the definition it holds now); ValueError
    unless exactly one of the two is given, TypeError without keys."""
    if keys is None:
        raise TypeError("get_online_features: keys is required, e.g. {'user_id': [1, 2]}")
    if isinstance(features, FeatureService) and feature_service is None:
        features, feature_service = None, features  # Feast's features=feature_service
    if (features is None) == (feature_service is None):
        got = "neither" if features is None else "both"
        raise ValueError(
            "get_online_features: give features (references such as 'view:feature') or "
            f"feature_service (a service's name), exactly one of the two; got {got}"
        )
    if feature_service is None:
        return pb.GetOnlineFeaturesRequest(entity_keys=key_columns(keys), features=list(features))
    return pb.GetOnlineFeaturesRequest(
        entity_keys=key_columns(keys), feature_service=service_name(feature_service)
    )


def service_name(service: object, field: str = "feature_service") -> str:
    """The name of a feature service given by name or as a FeatureService (whose stored
    definition the server then reads); ValueError naming `field` for anything else."""
    name = service.name if isinstance(service, FeatureService) else service
    if not isinstance(name, str) or not name:
        raise ValueError(
            f"{field}: expected a service's name or a FeatureService, got {service!r}; "
            "list_feature_services() lists the names"
        )
    return name


def online_features(
    response: pb.GetOnlineFeaturesResponse, features: Sequence[str]
) -> OnlineFeatures:
    """Read a GetOnlineFeatures response to the references `features` into NumPy columns.

    Columns are keyed by the view part as the caller wrote it, so "v@1:x" and "v@2:x" stay
    apart while "v:x" keeps its plain key. With no references (a lookup by feature service)
    they are keyed by each answered ViewResult.view: a view's name, a projection's alias (a
    service reads each view at one version by reference, and its aliases are no such view's
    name).
    """
    out = OnlineFeatures(rows=response.rows)
    if features:
        view_parts = written_view_parts(list(features))
    else:
        view_parts = [[view.view] for view in response.views]
    for parts, view in zip(view_parts, response.views, strict=True):
        if view.projection_of:
            out.projection_of[view.view] = view.projection_of
        stamps = np.frombuffer(view.event_timestamps, dtype="<i8")
        columns: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for block in view.blocks:
            values = arrays.from_array(block.values, f"{view.view} block")
            statuses = np.frombuffer(block.statuses, dtype=np.uint8).reshape(
                response.rows, len(block.features)
            )
            for j, name in enumerate(block.features):
                columns[name] = values[:, j], statuses[:, j]
        for part in parts:
            out.event_timestamps[part] = stamps
            out.versions[part] = view.version
            for name, (values, statuses) in columns.items():
                out.values[f"{part}:{name}"] = values
                out.statuses[f"{part}:{name}"] = statuses
    return out


def _block(name: str, values: object, null_mask: object | None) -> types_pb2.FeatureBlock:
    arr = column(values, f"features[{name!r}]")
    vector = arr.ndim == 2 and arr.dtype.kind in "fiu"
    nulls = None if null_mask is None else np.asarray(null_mask, dtype=bool)
    values = arrays.to_array(
        arr,
        types_pb2.FLOAT32_VECTOR if vector else None,
        nulls=nulls,
        field=f"features[{name!r}]",
    )
    return types_pb2.FeatureBlock(features=[name], values=values)


def wire_policy(policy: str) -> int:
    """The WritePolicy of a policy name; ValueError naming the choices for another."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {sorted(POLICIES)}, got {policy!r}")
    return POLICIES[policy]


def write_request(
    view: str,
    keys: Mapping[str, object],
    event_time: object,
    features: Mapping[str, object],
    nulls: Mapping[str, object] | None = None,
    version: int = 0,
    policy: str = "reject_batch",
) -> pb.WriteFeaturesRequest:
    """A WriteFeatures request: one block per feature column (2-D float or integer arrays are
    vectors, integers cast to float32 only when exact).

    Raises arrays.ArrayError naming the column when a value would change on the way to its
    wire dtype (an unsigned key over 2**63-1, a float64 vector element over float32's range),
    a column is a single value, or a text value is neither str nor bytes unless its row is null.
    """
    nulls = nulls or {}
    stray = sorted(set(nulls) - set(features))
    if stray:
        raise ValueError(
            f"nulls[{stray[0]!r}]: no feature column of that name; nulls masks name columns "
            f"of features ({', '.join(features) or 'none given'})"
        )
    entity_keys = key_columns(keys)
    rows = entity_keys[0].values.rows if entity_keys else 0
    return pb.WriteFeaturesRequest(
        view=view,
        version=version,
        entity_keys=entity_keys,
        event_timestamps=event_times_us(event_time, rows).tobytes(),
        blocks=[_block(name, values, nulls.get(name)) for name, values in features.items()],
        policy=wire_policy(policy),
    )


def write_summary(response: pb.WriteFeaturesResponse, first_batch: int = 0) -> WriteSummary:
    """A WriteSummary from a WriteFeatures response; a stream's errors count their batch from
    `first_batch` (the messages its writer sent before the stream)."""
    errors = [
        types_pb2.RowError(row=e.row, column=e.column, reason=e.reason, batch=e.batch + first_batch)
        for e in response.errors
    ]
    return WriteSummary(response.rows_written, response.rows_stale, response.rows_rejected, errors)
