"""FeatureStoreClient and AsyncFeatureStoreClient: NumPy in, NumPy out, over one message core."""

from __future__ import annotations

import queue
from collections.abc import Mapping, Sequence

import grpc
import numpy as np

from clients import feature_messages as fm
from clients import registry_messages as rm
from clients.channel import (
    ClientConfig,
    call_metadata,
    client_error,
    create_aio_channel,
    create_channel,
)
from featurestore.registry import ApplyResult, Entity, FeatureView
from protos.featureserve.v1 import feature_store_pb2 as pb
from protos.featureserve.v1 import feature_store_pb2_grpc as pb_grpc

_END = object()


def _config(config: ClientConfig | str | None) -> ClientConfig:
    if isinstance(config, str):
        return ClientConfig(target=config)
    return config or ClientConfig()


class _Buffer:
    """Rows waiting to be sent by a stream writer, cut into messages of batch_rows."""

    def __init__(self, view: str, batch_rows: int, version: int, policy: str) -> None:
        self.view, self.batch_rows, self.version, self.policy = view, batch_rows, version, policy

    def requests(
        self,
        keys: Mapping[str, object],
        event_time: object,
        features: Mapping[str, object],
        nulls: Mapping[str, object] | None,
    ) -> list[pb.WriteFeaturesRequest]:
        cols = {k: np.asarray(v) for k, v in keys.items()}
        rows = len(next(iter(cols.values())))
        times = fm.event_times_us(event_time, rows)
        feats = {k: np.asarray(v) for k, v in features.items()}
        masks = {k: np.asarray(v) for k, v in (nulls or {}).items()}
        out = []
        for start in range(0, rows, self.batch_rows):
            part = slice(start, start + self.batch_rows)
            out.append(
                fm.write_request(
                    self.view,
                    {k: v[part] for k, v in cols.items()},
                    times[part],
                    {k: v[part] for k, v in feats.items()},
                    {k: v[part] for k, v in masks.items()},
                    self.version,
                    self.policy,
                )
            )
        return out


class StreamWriter:
    """Sends batches over StreamWriteFeatures; flush() closes the stream and waits for the ack.

    Rows are durable once flush() (or leaving the `with` block) returns; a stream is also
    flushed every `ack_every` messages so unacknowledged data stays bounded.
    """

    def __init__(self, client: FeatureStoreClient, buffer: _Buffer, ack_every: int) -> None:
        self._client, self._buffer, self._ack_every = client, buffer, ack_every
        self._queue: queue.Queue | None = None
        self._future: grpc.Future | None = None
        self._sent = 0
        self.summary = fm.WriteSummary(0, 0, 0)

    def write(
        self,
        keys: Mapping[str, object],
        event_time: object,
        features: Mapping[str, object],
        nulls: Mapping[str, object] | None = None,
    ) -> None:
        """Queue rows; they are sent in messages of batch_rows."""
        for request in self._buffer.requests(keys, event_time, features, nulls):
            if self._queue is None:
                self._queue = queue.Queue(maxsize=64)
                self._future = self._client._stub.StreamWriteFeatures.future(
                    iter(self._queue.get, _END), metadata=self._client._metadata
                )
            self._queue.put(request)
            self._sent += 1
            if self._sent >= self._ack_every:
                self.flush()

    def flush(self) -> fm.WriteSummary:
        """End the current stream, wait until the server has made it durable; total so far."""
        if self._queue is not None and self._future is not None:
            self._queue.put(_END)
            future, self._queue, self._future, self._sent = self._future, None, None, 0
            try:
                self.summary += fm.write_summary(future.result())
            except grpc.RpcError as exc:
                raise client_error(exc) from None
        return self.summary

    def __enter__(self) -> StreamWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.flush()
        elif self._queue is not None:
            self._queue.put(_END)


class FeatureStoreClient:
    """Synchronous FeatureStore client."""

    def __init__(self, config: ClientConfig | str | None = None) -> None:
        self.config = _config(config)
        self._channel = create_channel(self.config)
        self._stub = pb_grpc.FeatureStoreStub(self._channel)
        self._metadata = call_metadata(self.config)

    def _call(self, method, request):
        try:
            return method(request, timeout=self.config.timeout_s, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise client_error(exc) from None

    def get_online_features(
        self, features: Sequence[str], keys: Mapping[str, object]
    ) -> fm.OnlineFeatures:
        """Look up `features` ("view:feature", "view", "view@2:feature") for entity `keys`."""
        request = fm.get_request(list(features), keys)
        return fm.online_features(self._call(self._stub.GetOnlineFeatures, request))

    def write_features(
        self,
        view: str,
        keys: Mapping[str, object],
        event_time: object,
        features: Mapping[str, object],
        nulls: Mapping[str, object] | None = None,
        version: int = 0,
        policy: str = "reject_batch",
    ) -> fm.WriteSummary:
        """Write one batch; returns once the rows are durable."""
        request = fm.write_request(view, keys, event_time, features, nulls, version, policy)
        return fm.write_summary(self._call(self._stub.WriteFeatures, request))

    def stream_writer(
        self,
        view: str,
        batch_rows: int = 1000,
        version: int = 0,
        policy: str = "reject_batch",
        ack_every: int = 64,
    ) -> StreamWriter:
        """A context manager that batches rows over StreamWriteFeatures and flushes on exit."""
        return StreamWriter(self, _Buffer(view, batch_rows, version, policy), ack_every)

    def apply(
        self, entities: Sequence[Entity], views: Sequence[FeatureView], dry_run: bool = False
    ) -> list[ApplyResult]:
        """Register entities and feature views."""
        request = rm.apply_request(entities, views, dry_run)
        response = self._call(self._stub.ApplyFeatureViews, request)
        return [rm.apply_result_from_proto(r) for r in response.results]

    def list_feature_views(
        self, name_prefix: str = "", all_versions: bool = False
    ) -> tuple[list[Entity], list[FeatureView]]:
        """Registered entities and views."""
        request = pb.ListFeatureViewsRequest(name_prefix=name_prefix, all_versions=all_versions)
        response = self._call(self._stub.ListFeatureViews, request)
        return (
            [rm.entity_from_proto(e) for e in response.entities],
            [rm.view_from_proto(v) for v in response.views],
        )

    def get_feature_view(self, name: str, version: int = 0) -> FeatureView:
        """One view definition (latest version unless one is named)."""
        request = pb.GetFeatureViewRequest(name=name, version=version)
        return rm.view_from_proto(self._call(self._stub.GetFeatureView, request))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> FeatureStoreClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncStreamWriter:
    """The asyncio twin of StreamWriter."""

    def __init__(self, client: AsyncFeatureStoreClient, buffer: _Buffer, ack_every: int) -> None:
        self._client, self._buffer, self._ack_every = client, buffer, ack_every
        self._call: grpc.aio.StreamUnaryCall | None = None
        self._sent = 0
        self.summary = fm.WriteSummary(0, 0, 0)

    async def write(
        self,
        keys: Mapping[str, object],
        event_time: object,
        features: Mapping[str, object],
        nulls: Mapping[str, object] | None = None,
    ) -> None:
        """Send rows in messages of batch_rows."""
        try:
            for request in self._buffer.requests(keys, event_time, features, nulls):
                if self._call is None:
                    self._call = self._client._stub.StreamWriteFeatures(
                        metadata=self._client._metadata
                    )
                await self._call.write(request)
                self._sent += 1
                if self._sent >= self._ack_every:
                    await self.flush()
        except grpc.RpcError as exc:
            raise client_error(exc) from None

    async def flush(self) -> fm.WriteSummary:
        """End the current stream and wait until it is durable; total so far."""
        if self._call is not None:
            call, self._call, self._sent = self._call, None, 0
            try:
                await call.done_writing()
                self.summary += fm.write_summary(await call)
            except grpc.RpcError as exc:
                raise client_error(exc) from None
        return self.summary

    async def __aenter__(self) -> AsyncStreamWriter:
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            await self.flush()
        elif self._call is not None:
            self._call.cancel()


class AsyncFeatureStoreClient:
    """asyncio FeatureStore client; same methods as FeatureStoreClient, awaited."""

    def __init__(self, config: ClientConfig | str | None = None) -> None:
        self.config = _config(config)
        self._channel = create_aio_channel(self.config)
        self._stub = pb_grpc.FeatureStoreStub(self._channel)
        self._metadata = call_metadata(self.config)

    async def _call(self, method, request):
        try:
            return await method(request, timeout=self.config.timeout_s, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise client_error(exc) from None

    async def get_online_features(
        self, features: Sequence[str], keys: Mapping[str, object]
    ) -> fm.OnlineFeatures:
        """Look up `features` for entity `keys`."""
        request = fm.get_request(list(features), keys)
        return fm.online_features(await self._call(self._stub.GetOnlineFeatures, request))

    async def write_features(
        self,
        view: str,
        keys: Mapping[str, object],
        event_time: object,
        features: Mapping[str, object],
        nulls: Mapping[str, object] | None = None,
        version: int = 0,
        policy: str = "reject_batch",
    ) -> fm.WriteSummary:
        """Write one batch; returns once the rows are durable."""
        request = fm.write_request(view, keys, event_time, features, nulls, version, policy)
        return fm.write_summary(await self._call(self._stub.WriteFeatures, request))

    def stream_writer(
        self,
        view: str,
        batch_rows: int = 1000,
        version: int = 0,
        policy: str = "reject_batch",
        ack_every: int = 64,
    ) -> AsyncStreamWriter:
        """An async context manager batching rows over StreamWriteFeatures."""
        return AsyncStreamWriter(self, _Buffer(view, batch_rows, version, policy), ack_every)

    async def apply(
        self, entities: Sequence[Entity], views: Sequence[FeatureView], dry_run: bool = False
    ) -> list[ApplyResult]:
        """Register entities and feature views."""
        request = rm.apply_request(entities, views, dry_run)
        response = await self._call(self._stub.ApplyFeatureViews, request)
        return [rm.apply_result_from_proto(r) for r in response.results]

    async def get_feature_view(self, name: str, version: int = 0) -> FeatureView:
        """One view definition."""
        request = pb.GetFeatureViewRequest(name=name, version=version)
        return rm.view_from_proto(await self._call(self._stub.GetFeatureView, request))

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncFeatureStoreClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
