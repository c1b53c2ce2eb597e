"""FeatureStoreClient and AsyncFeatureStoreClient: NumPy in, NumPy out, over one message core."""

from __future__ import annotations

import asyncio
import contextlib
import numbers
import threading
from collections import deque
from collections.abc import Coroutine, Iterator, Mapping, Sequence

import grpc

from clients import feature_messages as fm
from clients import registry_messages as rm
from clients.channel import (
    CallErrors,
    ClientConfig,
    ClientError,
    call_metadata,
    closed_error,
    create_aio_channel,
    create_channel,
    stalled_error,
    status_error,
)
from featurestore.registry import ApplyResult, Entity, FeatureService, FeatureView
from protos.arrays import ArrayError
from protos.featureserve.v1 import feature_store_pb2 as pb
from protos.featureserve.v1 import feature_store_pb2_grpc as pb_grpc

_END = object()


def _config(config: ClientConfig | str | None) -> ClientConfig:
    if isinstance(config, str):
        return ClientConfig(target=config)
    return config or ClientConfig()


def _count(value: object, name: str, meaning: str) -> int:
    """`value` as an int >= 1, else ValueError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(
            f"stream_writer: {name} must be an integer >= 1 ({meaning}), got {value!r}"
        )
    return int(value)


class _Buffer:
    """Rows waiting to be sent by a stream writer, cut into messages of batch_rows."""

    def __init__(self, view: str, batch_rows: int, version: int, policy: str) -> None:
        fm.wire_policy(policy)
        batch_rows = _count(batch_rows, "batch_rows", "rows per message")
        self.view, self.batch_rows, self.version, self.policy = view, batch_rows, version, policy

    def requests(
        self,
        keys: Mapping[str, object],
        event_time: object,
        features: Mapping[str, object],
        nulls: Mapping[str, object] | None,
    ) -> list[pb.WriteFeaturesRequest]:
        """The messages of one write(), built before any is sent; ClientError INVALID_ARGUMENT
        if a column's length differs from the keys' (as write_features gets from the server)."""
        if not keys:
            # no key column to cut by: one message, which the server rejects naming the
            # missing join key unless it holds no rows, as write_features does
            return [
                fm.write_request(
                    self.view, keys, event_time, features, nulls, self.version, self.policy
                )
            ]
        cols = {k: fm.column(v, f"keys[{k!r}]") for k, v in keys.items()}
        first = next(iter(cols))
        rows = len(cols[first])
        times = fm.event_times_us(event_time, rows)
        feats = {k: fm.column(v, f"features[{k!r}]") for k, v in features.items()}
        masks = {k: fm.column(v, f"nulls[{k!r}]") for k, v in (nulls or {}).items()}
        columns = {
            **{f"keys[{k!r}]": v for k, v in cols.items()},
            "event_time": times,
            **{f"features[{k!r}]": v for k, v in feats.items()},
            **{f"nulls[{k!r}]": v for k, v in masks.items()},
        }
        for name, values in columns.items():
            if len(values) != rows:
                raise ClientError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"stream_writer({self.view!r}).write: {name} has {len(values)} rows, "
                    f"expected {rows} like keys[{first!r}]: one value per key row; nothing of "
                    "this write was sent",
                )
        out = []
        for start in range(0, rows, self.batch_rows):
            part = slice(start, start + self.batch_rows)
            try:
                request = fm.write_request(
                    self.view,
                    {k: v[part] for k, v in cols.items()},
                    times[part],
                    {k: v[part] for k, v in feats.items()},
                    {k: v[part] for k, v in masks.items()},
                    self.version,
                    self.policy,
                )
            except ArrayError as exc:
                raise exc.shifted(start) from None
            out.append(request)
        return out


class _Outbox:
    """Messages waiting for gRPC's sending thread, at most `size` of them.

    A plain bounded queue hangs its writer once the call has ended (gRPC stops reading);
    close(), run when the call ends, wakes both the writer and gRPC's reader instead.
    """

    def __init__(self, size: int) -> None:
        self._items: deque = deque()
        self._size = size
        self._closed = False
        self._cond = threading.Condition()

    def put(self, item: object, timeout: float | None) -> bool:
        """Queue item; False if the call has ended; TimeoutError if no room came in time."""
        with self._cond:
            room = self._cond.wait_for(
                lambda: self._closed or len(self._items) < self._size, timeout
            )
            if self._closed:
                return False
            if not room:
                raise TimeoutError
            self._items.append(item)
            self._cond.notify_all()
            return True

    def close(self) -> None:
        """The call has ended: wake everyone and queue nothing more."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def __iter__(self) -> Iterator[pb.WriteFeaturesRequest]:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed or self._items)
                if self._closed:
                    return
                item = self._items.popleft()
                self._cond.notify_all()
            if item is _END:
                return
            yield item


def _stalled(view: str, timeout: float | None, waiting_for: str) -> ClientError:
    """DEADLINE_EXCEEDED for a stream whose server gave no `waiting_for` within timeout."""
    return stalled_error(
        f"stream_writer({view!r})", timeout, waiting_for, "unacknowledged rows may not be written"
    )


def _stream_error(error: ClientError, first: int) -> ClientError:
    """The error that ended a stream whose first message was message `first` of its writer
    (the server numbers batches from the stream's start)."""
    if first == 0:
        return error
    return ClientError(
        error.code,
        f"{error.message} (batches count from message {first} of this writer)",
        None if error.batch is None else first + error.batch,
        error.row,
    )


class StreamWriter:
    """Sends batches over StreamWriteFeatures; flush() closes the stream and waits for the ack.

    Rows are durable once flush() (or leaving the `with` block) returns; a stream is also
    flushed every `ack_every` messages so unacknowledged data stays bounded. If the server ends
    the stream (a bad batch), the next write, flush or exit raises its error; no single wait
    for the server lasts longer than the client's timeout_s. Leaving the block by an exception
    cancels the stream.
    """

    def __init__(self, client: FeatureStoreClient, buffer: _Buffer, ack_every: int) -> None:
        self._client, self._buffer, self._ack_every = client, buffer, ack_every
        self._outbox: _Outbox | None = None
        self._future: grpc.Future | None = None
        self._first = 0  # the current stream's first message, counted over the writer's life
        self._sent = 0  # messages of the current stream
        self.summary = fm.WriteSummary(0, 0, 0)

    def _open(self) -> None:
        if self._client._closed:
            raise closed_error()
        outbox = _Outbox(64)
        self._future = self._client._stub.StreamWriteFeatures.future(
            iter(outbox), metadata=self._client._metadata
        )
        self._future.add_done_callback(lambda _: outbox.close())
        self._outbox = outbox

    def _end(self) -> tuple[grpc.Future, int]:
        """Forget the current stream; its call and first message."""
        future, first = self._future, self._first
        self._outbox, self._future, self._first, self._sent = None, None, first + self._sent, 0
        return future, first

    def _put(self, item: object, waiting_for: str) -> None:
        """Queue item, or raise the error that ended the call (or DEADLINE_EXCEEDED)."""
        timeout = self._client.config.timeout_s
        try:
            accepted = self._outbox.put(item, timeout)
        except TimeoutError:
            self._end()[0].cancel()
            raise _stalled(self._buffer.view, timeout, waiting_for) from None
        if not accepted:
            future, first = self._end()
            raise _stream_error(CallErrors(self._client).error(future.exception()), first) from None

    def write(
        self,
        keys: Mapping[str, object],
        event_time: object,
        features: Mapping[str, object],
        nulls: Mapping[str, object] | None = None,
    ) -> None:
        """Queue rows; they are sent in messages of batch_rows."""
        for request in self._buffer.requests(keys, event_time, features, nulls):
            if self._outbox is None:
                self._open()
            self._put(request, "room for a message")
            self._sent += 1
            if self._sent >= self._ack_every:
                self.flush()

    def flush(self) -> fm.WriteSummary:
        """End the current stream, wait until the server has made it durable; total so far."""
        if self._outbox is None:
            return self.summary
        self._put(_END, "room for the end of the stream")
        future, first = self._end()
        timeout = self._client.config.timeout_s
        try:
            self.summary += fm.write_summary(future.result(timeout), first)
        except grpc.FutureTimeoutError:
            future.cancel()
            raise _stalled(self._buffer.view, timeout, "acknowledgement") from None
        except grpc.RpcError as exc:
            raise _stream_error(CallErrors(self._client).error(exc), first) from None
        return self.summary

    def __enter__(self) -> StreamWriter:
        return self

    def __exit__(self, exc_type: type | None, exc: object, tb: object) -> None:
        if exc_type is None:
            self.flush()
        elif self._future is not None:
            self._end()[0].cancel()


class FeatureStoreClient:
    """Synchronous FeatureStore client."""

    def __init__(self, config: ClientConfig | str | None = None) -> None:
        self.config = _config(config)
        self._channel = create_channel(self.config)
        self._stub = pb_grpc.FeatureStoreStub(self._channel)
        self._metadata = call_metadata(self.config)
        self._closed = False

    def _call(self, method, request):
        if self._closed:
            raise closed_error()
        with CallErrors(self):
            return method(request, timeout=self.config.timeout_s, metadata=self._metadata)

    def get_online_features(
        self,
        features: Sequence[str] | FeatureService | None = None,
        keys: Mapping[str, object] | None = None,
        *,
        feature_service: str | FeatureService | None = None,
    ) -> fm.OnlineFeatures:
        """Look up `features` ("view:feature", "view", "view@2:feature"), or the features of a
        feature service (by name or FeatureService, as feature_service or, as in Feast, as
        features), for entity `keys`; ValueError unless exactly one of them is given."""
        request = fm.get_request(features, keys, feature_service)
        response = self._call(self._stub.GetOnlineFeatures, request)
        return fm.online_features(response, request.features)

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
        """A context manager that batches rows over StreamWriteFeatures and flushes on exit;
        ValueError if batch_rows or ack_every is below 1 or policy is unknown."""
        buffer = _Buffer(view, batch_rows, version, policy)
        return StreamWriter(self, buffer, _count(ack_every, "ack_every", "messages per ack"))

    def apply(
        self,
        entities: Sequence[Entity],
        views: Sequence[FeatureView],
        dry_run: bool = False,
        feature_services: Sequence[FeatureService] = (),
        prune: bool = False,
    ) -> list[ApplyResult]:
        """Register entities, feature views and feature services; the results are the views',
        then the services' (feature_service set). prune (admin) also deletes every service,
        view (all versions) and unused entity not given; their "deleted" results follow."""
        request = rm.apply_request(entities, views, dry_run, feature_services, prune)
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

    def delete_feature_view(self, name: str, version: int) -> None:
        """Delete one version of a view (definition, online rows, history); needs `admin`."""
        request = pb.DeleteFeatureViewRequest(name=name, version=version)
        self._call(self._stub.DeleteFeatureView, request)

    def list_feature_services(self, name_prefix: str = "") -> list[FeatureService]:
        """Registered feature services whose name starts with name_prefix, by name (those
        whose every view the caller may see)."""
        request = pb.ListFeatureServicesRequest(name_prefix=name_prefix)
        response = self._call(self._stub.ListFeatureServices, request)
        return [rm.service_from_proto(s) for s in response.feature_services]

    def get_feature_service(self, name: str | FeatureService) -> FeatureService:
        """One feature service definition, as stored (a FeatureService is looked up by name)."""
        request = pb.GetFeatureServiceRequest(name=fm.service_name(name, "name"))
        return rm.service_from_proto(self._call(self._stub.GetFeatureService, request))

    def delete_feature_service(self, name: str | FeatureService) -> None:
        """Delete one feature service (the views it reads stay); needs `admin`."""
        request = pb.DeleteFeatureServiceRequest(name=fm.service_name(name, "name"))
        self._call(self._stub.DeleteFeatureService, request)

    def close(self) -> None:
        """Close the channel; later calls raise ClientError FAILED_PRECONDITION."""
        self._closed = True
        self._channel.close()

    def __enter__(self) -> FeatureStoreClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_CORE_SEND_FAILED = (grpc.StatusCode.INTERNAL, "Internal error from Core")


def _result_now(coroutine: Coroutine) -> object:
    """Run a coroutine that returns without suspending (a finished call's code() or details())."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    coroutine.close()
    raise RuntimeError("grpc.aio: the status of a finished call was not available at once")


class AsyncStreamWriter:
    """The asyncio twin of StreamWriter.

    When the server ends the stream while a write is in flight, grpc.aio replaces the server's
    status with INTERNAL "Internal error from Core"; the writer records each status the call
    is given and raises the server's. A send still pending when its channel closes never
    finishes in grpc.aio, so the call's end cancels it.
    """

    def __init__(self, client: AsyncFeatureStoreClient, buffer: _Buffer, ack_every: int) -> None:
        self._client, self._buffer, self._ack_every = client, buffer, ack_every
        self._call: grpc.aio.StreamUnaryCall | None = None
        self._sending: asyncio.Future | None = None  # the current call's pending send
        self._statuses: list[ClientError] = []  # every status the current call was given
        self._first = 0  # the current stream's first message, counted over the writer's life
        self._sent = 0  # messages of the current stream
        self.summary = fm.WriteSummary(0, 0, 0)

    def _open(self) -> grpc.aio.StreamUnaryCall:
        if self._client._closed:
            raise closed_error()
        statuses: list[ClientError] = []
        call = self._client._stub.StreamWriteFeatures(metadata=self._client._metadata)

        def ended(c: grpc.aio.StreamUnaryCall) -> None:
            statuses.append(
                status_error(
                    _result_now(c.code()),
                    _result_now(c.details()),
                    _result_now(c.trailing_metadata()),
                )
            )
            if self._call is c and self._sending is not None:
                self._sending.cancel()

        call.add_done_callback(ended)
        self._call, self._statuses = call, statuses
        return call

    def _end(self) -> tuple[grpc.aio.StreamUnaryCall, int]:
        """Forget the current stream; its call and first message."""
        call, first = self._call, self._first
        self._call, self._first, self._sent = None, first + self._sent, 0
        return call, first

    async def _failed(self) -> ClientError:
        """End the current stream, whose call has failed: its status, preferring the server's
        over a failed send's."""
        statuses = self._statuses
        call, first = self._end()
        with contextlib.suppress(grpc.RpcError, TimeoutError):
            await asyncio.wait_for(call, self._client.config.timeout_s)
        for error in statuses:
            if (error.code, error.message) != _CORE_SEND_FAILED:
                return _stream_error(error, first)
        return _stream_error(statuses[-1], first)

    async def _send(self, sending: Coroutine, waiting_for: str) -> None:
        """Await a send on the current call for at most timeout_s; the call's error if it ended."""
        timeout = self._client.config.timeout_s
        self._sending = asyncio.ensure_future(sending)
        try:
            await asyncio.wait_for(self._sending, timeout)
        except TimeoutError:
            self._end()[0].cancel()
            raise _stalled(self._buffer.view, timeout, waiting_for) from None
        except (grpc.RpcError, asyncio.InvalidStateError):
            raise await self._failed() from None
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():
                raise
            raise await self._failed() from None  # the call ended (see _open)
        finally:
            self._sending = None

    async def write(
        self,
        keys: Mapping[str, object],
        event_time: object,
        features: Mapping[str, object],
        nulls: Mapping[str, object] | None = None,
    ) -> None:
        """Send rows in messages of batch_rows."""
        for request in self._buffer.requests(keys, event_time, features, nulls):
            call = self._call or self._open()
            with CallErrors(self._client):
                await self._send(call.write(request), "room for a message")
            self._sent += 1
            if self._sent >= self._ack_every:
                await self.flush()

    async def flush(self) -> fm.WriteSummary:
        """End the current stream and wait until it is durable; total so far."""
        if self._call is None:
            return self.summary
        call, first = self._call, self._first
        timeout = self._client.config.timeout_s
        with CallErrors(self._client):
            await self._send(call.done_writing(), "room for the end of the stream")
            try:
                response = await asyncio.wait_for(call, timeout)
            except TimeoutError:
                self._end()
                call.cancel()
                raise _stalled(self._buffer.view, timeout, "acknowledgement") from None
            except grpc.RpcError:
                raise await self._failed() from None
        self._end()
        self.summary += fm.write_summary(response, first)
        return self.summary

    async def __aenter__(self) -> AsyncStreamWriter:
        return self

    async def __aexit__(self, exc_type: type | None, exc: object, tb: object) -> None:
        if exc_type is None:
            await self.flush()
        elif self._call is not None:
            self._end()[0].cancel()


class AsyncFeatureStoreClient:
    """asyncio FeatureStore client; same methods as FeatureStoreClient, awaited."""

    def __init__(self, config: ClientConfig | str | None = None) -> None:
        self.config = _config(config)
        self._channel = create_aio_channel(self.config)
        self._stub = pb_grpc.FeatureStoreStub(self._channel)
        self._metadata = call_metadata(self.config)
        self._closed = False

    async def _call(self, method, request):
        if self._closed:
            raise closed_error()
        with CallErrors(self):
            return await method(request, timeout=self.config.timeout_s, metadata=self._metadata)

    async def get_online_features(
        self,
        features: Sequence[str] | FeatureService | None = None,
        keys: Mapping[str, object] | None = None,
        *,
        feature_service: str | FeatureService | None = None,
    ) -> fm.OnlineFeatures:
        """Look up `features` ("view:feature", "view", "view@2:feature"), or the features of a
        feature service (by name or FeatureService, as feature_service or, as in Feast, as
        features), for entity `keys`; ValueError unless exactly one of them is given."""
        request = fm.get_request(features, keys, feature_service)
        response = await self._call(self._stub.GetOnlineFeatures, request)
        return fm.online_features(response, request.features)

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
        """An async context manager batching rows over StreamWriteFeatures; ValueError if
        batch_rows or ack_every is below 1 or policy is unknown."""
        buffer = _Buffer(view, batch_rows, version, policy)
        return AsyncStreamWriter(self, buffer, _count(ack_every, "ack_every", "messages per ack"))

    async def apply(
        self,
        entities: Sequence[Entity],
        views: Sequence[FeatureView],
        dry_run: bool = False,
        feature_services: Sequence[FeatureService] = (),
        prune: bool = False,
    ) -> list[ApplyResult]:
        """Register entities, feature views and feature services; the results are the views',
        then the services' (feature_service set). prune (admin) also deletes every service,
        view (all versions) and unused entity not given; their "deleted" results follow."""
        request = rm.apply_request(entities, views, dry_run, feature_services, prune)
        response = await self._call(self._stub.ApplyFeatureViews, request)
        return [rm.apply_result_from_proto(r) for r in response.results]

    async def list_feature_views(
        self, name_prefix: str = "", all_versions: bool = False
    ) -> tuple[list[Entity], list[FeatureView]]:
        """Registered entities and views."""
        request = pb.ListFeatureViewsRequest(name_prefix=name_prefix, all_versions=all_versions)
        response = await self._call(self._stub.ListFeatureViews, request)
        return (
            [rm.entity_from_proto(e) for e in response.entities],
            [rm.view_from_proto(v) for v in response.views],
        )

    async def get_feature_view(self, name: str, version: int = 0) -> FeatureView:
        """One view definition (latest version unless one is named)."""
        request = pb.GetFeatureViewRequest(name=name, version=version)
        return rm.view_from_proto(await self._call(self._stub.GetFeatureView, request))

    async def delete_feature_view(self, name: str, version: int) -> None:
        """Delete one version of a view (definition, online rows, history); needs `admin`."""
        request = pb.DeleteFeatureViewRequest(name=name, version=version)
        await self._call(self._stub.DeleteFeatureView, request)

    async def list_feature_services(self, name_prefix: str = "") -> list[FeatureService]:
        """Registered feature services whose name starts with name_prefix, by name (those
        whose every view the caller may see)."""
        request = pb.ListFeatureServicesRequest(name_prefix=name_prefix)
        response = await self._call(self._stub.ListFeatureServices, request)
        return [rm.service_from_proto(s) for s in response.feature_services]

    async def get_feature_service(self, name: str | FeatureService) -> FeatureService:
        """One feature service definition, as stored (a FeatureService is looked up by name)."""
        request = pb.GetFeatureServiceRequest(name=fm.service_name(name, "name"))
        return rm.service_from_proto(await self._call(self._stub.GetFeatureService, request))

    async def delete_feature_service(self, name: str | FeatureService) -> None:
        """Delete one feature service (the views it reads stay); needs `admin`."""
        request = pb.DeleteFeatureServiceRequest(name=fm.service_name(name, "name"))
        await self._call(self._stub.DeleteFeatureService, request)

    async def close(self) -> None:
        """Close the channel; later calls raise ClientError FAILED_PRECONDITION."""
        self._closed = True
        await self._channel.close()

    async def __aenter__(self) -> AsyncFeatureStoreClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
