"""Build Prediction requests from NumPy and read responses back into NumPy.

The sync and asyncio prediction clients differ only in how they send; everything else is here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import grpc
import numpy as np

from clients.channel import ClientError
from clients.feature_messages import key_columns
from protos import arrays
from protos.featureserve.v1 import prediction_pb2 as pb
from protos.featureserve.v1 import types_pb2

OK = pb.OK
FAILED = pb.FAILED
_CODES = {code.value[0]: code for code in grpc.StatusCode}


@dataclass
class FeatureFill:
    """A feature that was not present in some rows: per-row FeatureStatus and its replacement."""

    feature: str
    statuses: np.ndarray
    filled_with: str


@dataclass
class Lineage:
    """Where the scores came from: model version, views read, oldest event time per row (µs)."""

    model_version: str
    feature_views: list[str]
    oldest_event_us: np.ndarray
    fills: list[FeatureFill] = field(default_factory=list)


@dataclass
class PredictionResult:
    """One Predict answer: scores by output (rows x width), per-row status (OK = 1, FAILED = 2)
    and errors, lineage; `error` is set instead when a stream request failed as a whole."""

    request_id: str
    model: str
    rows: int
    scores: dict[str, np.ndarray]
    row_status: np.ndarray
    row_errors: list[types_pb2.RowError]
    lineage: Lineage
    error: ClientError | None = None

    @property
    def ok(self) -> np.ndarray:
        """Mask of the rows that were scored."""
        return self.row_status == OK


def _column(values: object) -> np.ndarray:
    arr = values if isinstance(values, np.ndarray) else np.asarray(values)
    return arr.astype(object) if arr.dtype.kind == "U" else arr


def predict_request(
    model: str,
    keys: Mapping[str, object],
    request_values: Mapping[str, object] | None = None,
    version: str = "",
    request_id: str = "",
    outputs: list[str] | None = None,
) -> pb.PredictRequest:
    """A PredictRequest: one key column per join key, one column per request-time value
    (its NumPy dtype chooses the wire dtype: float64, float32, int64, bool)."""
    return pb.PredictRequest(
        model=model,
        model_version=str(version),
        entity_keys=key_columns(keys),
        request_values=[
            types_pb2.NamedArray(
                name=name,
                values=arrays.to_array(_column(values), field=f"request_values[{name!r}]"),
            )
            for name, values in (request_values or {}).items()
        ],
        request_id=request_id,
        outputs=list(outputs or []),
    )


def prediction_result(response: pb.PredictResponse) -> PredictionResult:
    """Read a PredictResponse into NumPy (a failed stream request sets only `error`)."""
    lineage = response.lineage
    result = PredictionResult(
        request_id=response.request_id,
        model=response.model,
        rows=response.rows,
        scores={o.name: arrays.from_array(o.values, f"outputs {o.name}") for o in response.outputs},
        row_status=np.frombuffer(response.row_statuses, np.uint8),
        row_errors=list(response.row_errors),
        lineage=Lineage(
            model_version=lineage.model_version,
            feature_views=list(lineage.feature_views),
            oldest_event_us=np.frombuffer(lineage.oldest_event_timestamps, "<i8"),
            fills=[
                FeatureFill(f.feature, np.frombuffer(f.statuses, np.uint8), f.filled_with)
                for f in lineage.fills
            ],
        ),
    )
    if response.error_code:
        code = _CODES.get(response.error_code, grpc.StatusCode.UNKNOWN)
        result.error = ClientError(code, response.error_message)
    return result
