"""Build Prediction requests from NumPy and read responses back into NumPy.

The sync and asyncio prediction clients differ only in how they send; everything else is here.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import grpc
import numpy as np

from clients.channel import ClientError, stalled_error
from clients.feature_messages import column, key_columns
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
    """Where the scores came from: model version, views read, oldest event time per row (µs),
    and the feature service the model reads through (empty when it names its references);
    feature_view_aliases is empty unless a view was read through a projection of that service,
    then one per feature_views entry (the alias, "" for a view read by its own name)."""

    model_version: str
    feature_views: list[str]
    oldest_event_us: np.ndarray
    fills: list[FeatureFill] = field(default_factory=list)
    feature_service: str = ""
    feature_view_aliases: list[str] = field(default_factory=list)


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


def predict_request(
    model: str,
    keys: Mapping[str, object],
    request_values: Mapping[str, object] | None = None,
    version: str = "",
    request_id: str = "",
    outputs: list[str] | None = None,
) -> pb.PredictRequest:
    """A PredictRequest: one key column per join key, one column per request-time value
    (its NumPy dtype chooses the wire dtype: float64, float32, int64, bool); arrays.ArrayError
    names a column that is a single value or does not fit its wire dtype."""
    return pb.PredictRequest(
        model=model,
        model_version=str(version),
        entity_keys=key_columns(keys, keyless_when_empty=False),
        request_values=[
            types_pb2.NamedArray(
                name=name,
                values=arrays.to_array(
                    column(values, f"request_values[{name!r}]"), field=f"request_values[{name!r}]"
                ),
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
            feature_service=lineage.feature_service,
            feature_view_aliases=list(lineage.feature_view_aliases),
        ),
    )
    if response.error_code:
        code = _CODES.get(response.error_code, grpc.StatusCode.UNKNOWN)
        result.error = ClientError(code, response.error_message)
    return result


StreamItem = pb.PredictRequest | Mapping


class StreamOrder:
    """Builds a StreamPredict's requests from the caller's items and hands out results in item
    order. An item that builds no request (bad arrays, a misspelled argument) is sent as an
    empty placeholder, which the server answers with an error in its place, and its result is
    that item's own error, INVALID_ARGUMENT: so it comes back in its turn, and a caller that
    waits for each result before sending the next item is never left waiting. An error raised
    while iterating the items ends the requests and is raised after the results of those
    before it (finish).

    With `stall_s` (ClientConfig.timeout_s) set, overdue() tells a watcher when the caller has
    waited `stall_s` seconds for a result that a request sent is owed (counted from the later of
    the request's sending and the start of the wait; waiting while no request is unanswered, or
    not waiting, is no stall); the watcher cancels the call and sets `stalled`.

    Both twins share it; the sync twin's requests run on gRPC's thread, so the two threads share
    only a deque (appended before its request is sent) and `failure` (set before the requests
    end); the watcher only reads.
    """

    def __init__(self, stall_s: float | None = None) -> None:
        # one (placeholder, monotonic time sent) per request sent and not yet answered
        self._placeholders: deque[tuple[PredictionResult | None, float]] = deque()
        self._taken = 0  # items taken from the caller
        self._waiting_since: float | None = None  # monotonic time the caller began to wait
        self.failure: Exception | None = None
        self.stall_s = stall_s
        self.stalled = False

    def _request(self, item: StreamItem) -> pb.PredictRequest:
        index, self._taken = self._taken, self._taken + 1
        if isinstance(item, pb.PredictRequest):
            self._placeholders.append((None, time.monotonic()))
            return item
        try:
            request = predict_request(**item)
        except Exception as exc:  # whatever the item's own arguments raise is its answer
            self._placeholders.append((_unsent_result(item, index, exc), time.monotonic()))
            return pb.PredictRequest(request_id=f"unsent-{index}")
        self._placeholders.append((None, time.monotonic()))
        return request

    def requests(self, items: Iterable[StreamItem]) -> Iterator[pb.PredictRequest]:
        """The requests of `items`, for the sync stub; never raises."""
        iterator = iter(items)
        while True:
            try:
                item = next(iterator)
            except StopIteration:
                return
            except Exception as exc:
                self.failure = exc
                return
            yield self._request(item)

    async def arequests(
        self, items: Iterable[StreamItem] | AsyncIterable[StreamItem]
    ) -> AsyncIterator[pb.PredictRequest]:
        """The requests of `items` (sync or async), for the asyncio stub; never raises."""
        iterator = aiter(items) if isinstance(items, AsyncIterable) else _as_async(items)
        while True:
            try:
                item = await anext(iterator)
            except StopAsyncIteration:
                return
            except Exception as exc:
                self.failure = exc
                return
            yield self._request(item)

    def waiting(self) -> None:
        """The caller now waits for the next result (until result())."""
        self._waiting_since = time.monotonic()

    def result(self, response: pb.PredictResponse) -> PredictionResult:
        """The result of the item the server's next `response` answers."""
        self._waiting_since = None
        unsent, _ = self._placeholders.popleft()
        return prediction_result(response) if unsent is None else unsent

    def overdue(self) -> float:
        """Seconds until the caller has waited stall_s for a result owed (<= 0: it has);
        stall_s while the caller is not waiting or no request is unanswered."""
        since = self._waiting_since
        try:
            _, sent = self._placeholders[0]
        except IndexError:
            return self.stall_s
        if since is None:
            return self.stall_s
        return max(sent, since) + self.stall_s - time.monotonic()

    def stall_error(self) -> ClientError | None:
        """DEADLINE_EXCEEDED once a watcher has cancelled the stream as stalled, else None."""
        if not self.stalled:
            return None
        return stalled_error(
            "StreamPredict", self.stall_s, "result", "the requests still waiting get no result"
        )

    def finish(self) -> None:
        """Raise the error met while iterating the items, if any, once every answer is out."""
        if self.failure is not None:
            raise self.failure


async def _as_async(items: Iterable[StreamItem]) -> AsyncIterator[StreamItem]:
    for item in items:
        yield item


def _unsent_result(item: object, index: int, exc: Exception) -> PredictionResult:
    """The result of stream item `index`, which raised `exc` when built and was not sent."""
    fields = item if isinstance(item, Mapping) else {}
    error = ClientError(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"stream request {index} was not sent: {type(exc).__name__}: {exc}; a stream item is a "
        "PredictRequest or a dict of predict_request's arguments (model, keys, request_values, "
        "version, request_id, outputs)",
    )
    error.__cause__ = exc
    return PredictionResult(
        request_id=str(fields.get("request_id", "")),
        model=str(fields.get("model", "")),
        rows=0,
        scores={},
        row_status=np.zeros(0, np.uint8),
        row_errors=[],
        lineage=Lineage("", [], np.zeros(0, np.int64)),
        error=error,
    )
