"""PredictionClient and AsyncPredictionClient: keys and request values in, scores out, over one
message core (clients/prediction_messages.py)."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Mapping

import grpc

from clients import prediction_messages as pm
from clients.channel import (
    ClientConfig,
    call_metadata,
    client_error,
    closed_error,
    create_aio_channel,
    create_channel,
)
from protos.featureserve.v1 import prediction_pb2_grpc as pb_grpc

StreamItem = pm.StreamItem


def _config(config: ClientConfig | str | None) -> ClientConfig:
    if isinstance(config, str):
        return ClientConfig(target=config)
    return config or ClientConfig()


class PredictionClient:
    """Synchronous Prediction client."""

    def __init__(self, config: ClientConfig | str | None = None) -> None:
        self.config = _config(config)
        self._channel = create_channel(self.config)
        self._stub = pb_grpc.PredictionStub(self._channel)
        self._metadata = call_metadata(self.config)
        self._closed = False

    def predict(
        self,
        model: str,
        keys: Mapping[str, object],
        request_values: Mapping[str, object] | None = None,
        version: str = "",
        request_id: str = "",
        outputs: list[str] | None = None,
    ) -> pm.PredictionResult:
        """Score entities `keys` ({join key: values}) with `model` in one hop."""
        request = pm.predict_request(model, keys, request_values, version, request_id, outputs)
        if self._closed:
            raise closed_error()
        try:
            response = self._stub.Predict(
                request, timeout=self.config.timeout_s, metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise client_error(exc) from None
        return pm.prediction_result(response)

    def stream(
        self, requests: Iterable[StreamItem], timeout_s: float | None = None
    ) -> Iterator[pm.PredictionResult]:
        """Send many requests over one StreamPredict and yield their results in order; a failed
        request's result has `error` set and the stream goes on (an item that cannot be built
        is not sent and fails INVALID_ARGUMENT in its place)."""
        if self._closed:
            raise closed_error()
        order = pm.StreamOrder()
        responses = self._stub.StreamPredict(
            order.requests(requests), timeout=timeout_s, metadata=self._metadata
        )
        try:
            for response in responses:
                yield order.result(response)
        except grpc.RpcError as exc:
            raise client_error(exc) from None
        order.finish()

    def close(self) -> None:
        """Close the channel; later calls raise ClientError FAILED_PRECONDITION."""
        self._closed = True
        self._channel.close()

    def __enter__(self) -> PredictionClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncPredictionClient:
    """asyncio Prediction client; same methods as PredictionClient, awaited."""

    def __init__(self, config: ClientConfig | str | None = None) -> None:
        self.config = _config(config)
        self._channel = create_aio_channel(self.config)
        self._stub = pb_grpc.PredictionStub(self._channel)
        self._metadata = call_metadata(self.config)
        self._closed = False

    async def predict(
        self,
        model: str,
        keys: Mapping[str, object],
        request_values: Mapping[str, object] | None = None,
        version: str = "",
        request_id: str = "",
        outputs: list[str] | None = None,
    ) -> pm.PredictionResult:
        """Score entities `keys` with `model` in one hop."""
        request = pm.predict_request(model, keys, request_values, version, request_id, outputs)
        if self._closed:
            raise closed_error()
        try:
            response = await self._stub.Predict(
                request, timeout=self.config.timeout_s, metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise client_error(exc) from None
        return pm.prediction_result(response)

    async def stream(
        self,
        requests: Iterable[StreamItem] | AsyncIterable[StreamItem],
        timeout_s: float | None = None,
    ) -> AsyncIterator[pm.PredictionResult]:
        """Send many requests over one StreamPredict; yield their results in order, as the sync
        twin does."""
        if self._closed:
            raise closed_error()
        order = pm.StreamOrder()
        call = self._stub.StreamPredict(
            order.arequests(requests), timeout=timeout_s, metadata=self._metadata
        )
        try:
            async for response in call:
                yield order.result(response)
        except grpc.RpcError as exc:
            raise client_error(exc) from None
        order.finish()

    async def close(self) -> None:
        """Close the channel; later calls raise ClientError FAILED_PRECONDITION."""
        self._closed = True
        await self._channel.close()

    async def __aenter__(self) -> AsyncPredictionClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
