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
    create_aio_channel,
    create_channel,
)
from protos.featureserve.v1 import prediction_pb2 as pb
from protos.featureserve.v1 import prediction_pb2_grpc as pb_grpc

StreamItem = pb.PredictRequest | Mapping


def _config(config: ClientConfig | str | None) -> ClientConfig:
    if isinstance(config, str):
        return ClientConfig(target=config)
    return config or ClientConfig()


def _message(item: StreamItem) -> pb.PredictRequest:
    """A stream item as a request: a PredictRequest, or predict_request's keyword arguments."""
    return item if isinstance(item, pb.PredictRequest) else pm.predict_request(**item)


class PredictionClient:
    """Synchronous Prediction client."""

    def __init__(self, config: ClientConfig | str | None = None) -> None:
        self.config = _config(config)
        self._channel = create_channel(self.config)
        self._stub = pb_grpc.PredictionStub(self._channel)
        self._metadata = call_metadata(self.config)

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
        request's result has `error` set and the stream goes on."""
        responses = self._stub.StreamPredict(
            (_message(r) for r in requests), timeout=timeout_s, metadata=self._metadata
        )
        try:
            for response in responses:
                yield pm.prediction_result(response)
        except grpc.RpcError as exc:
            raise client_error(exc) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> PredictionClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def _aiter(requests: Iterable[StreamItem] | AsyncIterable[StreamItem]):
    if isinstance(requests, AsyncIterable):
        async for item in requests:
            yield _message(item)
    else:
        for item in requests:
            yield _message(item)


class AsyncPredictionClient:
    """asyncio Prediction client; same methods as PredictionClient, awaited."""

    def __init__(self, config: ClientConfig | str | None = None) -> None:
        self.config = _config(config)
        self._channel = create_aio_channel(self.config)
        self._stub = pb_grpc.PredictionStub(self._channel)
        self._metadata = call_metadata(self.config)

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
        """Send many requests over one StreamPredict; yield their results in order."""
        call = self._stub.StreamPredict(
            _aiter(requests), timeout=timeout_s, metadata=self._metadata
        )
        try:
            async for response in call:
                yield pm.prediction_result(response)
        except grpc.RpcError as exc:
            raise client_error(exc) from None

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncPredictionClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
