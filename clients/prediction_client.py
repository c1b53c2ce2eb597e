"""PredictionClient and AsyncPredictionClient: keys and request values in, scores out, over one
message core (clients/prediction_messages.py)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Mapping

import grpc

from clients import prediction_messages as pm
from clients.channel import (
    CallErrors,
    ClientConfig,
    call_metadata,
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


def _watch(order: pm.StreamOrder, call: grpc.Future, ended: threading.Event) -> None:
    """Cancel `call` once its caller has waited order.stall_s for a result owed."""
    while (left := order.overdue()) > 0:
        if ended.wait(left):
            return
    order.stalled = True
    call.cancel()


async def _awatch(order: pm.StreamOrder, call: grpc.aio.StreamStreamCall) -> None:
    """The asyncio twin of _watch, cancelled when the stream ends."""
    while (left := order.overdue()) > 0:
        await asyncio.sleep(left)
    order.stalled = True
    call.cancel()


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
        with CallErrors(self):
            response = self._stub.Predict(
                request, timeout=self.config.timeout_s, metadata=self._metadata
            )
        return pm.prediction_result(response)

    def stream(
        self, requests: Iterable[StreamItem], timeout_s: float | None = None
    ) -> Iterator[pm.PredictionResult]:
        """Send many requests over one StreamPredict and yield their results in order; a failed
        request's result has `error` set and the stream goes on (an item that cannot be built
        is not sent and fails INVALID_ARGUMENT in its place).

        `timeout_s` is a deadline for the whole stream (None: none); ClientConfig.timeout_s
        bounds each wait for a result owed to a request sent (DEADLINE_EXCEEDED), so a source
        that pauses or a caller slow between results is no stall.
        Leaving the loop early and closing the generator cancels the call."""
        if self._closed:
            raise closed_error()
        order = pm.StreamOrder(self.config.timeout_s)
        responses = self._stub.StreamPredict(
            order.requests(requests), timeout=timeout_s, metadata=self._metadata
        )
        ended = threading.Event()
        if order.stall_s is not None:
            threading.Thread(target=_watch, args=(order, responses, ended), daemon=True).start()
        try:
            with CallErrors(self, order.stall_error):
                order.waiting()
                for response in responses:
                    yield order.result(response)
                    order.waiting()
        finally:
            ended.set()
            responses.cancel()
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
        with CallErrors(self):
            response = await self._stub.Predict(
                request, timeout=self.config.timeout_s, metadata=self._metadata
            )
        return pm.prediction_result(response)

    async def stream(
        self,
        requests: Iterable[StreamItem] | AsyncIterable[StreamItem],
        timeout_s: float | None = None,
    ) -> AsyncIterator[pm.PredictionResult]:
        """Send many requests over one StreamPredict; yield their results in order, with the
        sync twin's timeouts; leaving the loop early and closing (aclose()) the generator cancels
        the call."""
        if self._closed:
            raise closed_error()
        order = pm.StreamOrder(self.config.timeout_s)
        call = self._stub.StreamPredict(
            order.arequests(requests), timeout=timeout_s, metadata=self._metadata
        )
        watch = asyncio.ensure_future(_awatch(order, call)) if order.stall_s is not None else None
        try:
            with CallErrors(self, order.stall_error):
                order.waiting()
                async for response in call:
                    yield order.result(response)
                    order.waiting()
        finally:
            call.cancel()
            if watch is not None:
                watch.cancel()
        order.finish()

    async def close(self) -> None:
        """Close the channel; later calls raise ClientError FAILED_PRECONDITION."""
        self._closed = True
        await self._channel.close()

    async def __aenter__(self) -> AsyncPredictionClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
