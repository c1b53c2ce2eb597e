"""featureserve.v1.FeatureStore: lookups on the event loop, writes through group commit."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from clients import registry_messages as rm
from featurestore.dtypes import FeatureStatus
from featurestore.errors import (
    ConflictError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
)
from featurestore.feature_refs import parse_feature_refs
from featurestore.group_commit import Committer
from featurestore.online_store import (
    OnlineStore,
    ReadResult,
    RowError,
    ViewRead,
    WriteBatch,
    WriteResult,
)
from featurestore.registry import ApplyResult, FeatureService, FeatureView
from protos import arrays
from protos.featureserve.v1 import feature_store_pb2 as pb
from protos.featureserve.v1 import feature_store_pb2_grpc as pb_grpc
from protos.featureserve.v1 import types_pb2
from server.audit import MAX_MESSAGE_CHARS, AuditLog, apply_target
from server.auth import AuthConfig, Authorizer, schema_scopes
from server.drift import DriftMonitor
from server.errors import abort, is_domain_error, maps_errors, status_for
from server.metrics import ViewMetrics

MAX_ROW_ERRORS = 1000
"""Row errors listed per WriteFeatures response (a stream's whole answer included), so a batch
of bad rows cannot make the answer too large to send; rows_rejected still counts every one."""
MAX_STREAM_BATCHES_IN_FLIGHT = 16
"""Batches of one StreamWriteFeatures waiting for their commit before the next is read (flow
control: a stream holds at most this many prepared batches). At 8, a stream of 10 batches always
spanned two commits, waiting for the first before sending the rest; at 16 it fits one. Measured
with the commit thread in the server, 32 streams: 240k rows/s against 196-208k at 8."""
LOOKUP_SAMPLE_EVERY = 256
WRITE_SAMPLE_EVERY = 16
SWEEP_OBSERVERS_AT = 16
"""Observers held before the first sweep for those of views deleted by another worker; each
sweep doubles the next threshold, so sweeping costs O(1) per view first seen."""


class _Sampler:
    """Says yes to the first offer and then to every `every`-th."""

    def __init__(self, every: int) -> None:
        self.every = every
        self._offers = 0

    def __call__(self) -> bool:
        self._offers += 1
        return (self._offers - 1) % self.every == 0


class ViewObserver:
    """Metrics and drift of one feature view. Value ages and drift are sampled: a sampled lookup
    block costs ~0.3 ms (32 histograms and gauges), which at every 16th lookup was the p99 of a
    lookup at one in flight; every 256th still feeds drift ~800 rows/s at 2k lookups/s of 100
    entities. Writes carry 1000-row blocks, so every 16th of them is sampled."""

    def __init__(self, view: str) -> None:
        self.view = view
        self.metrics = ViewMetrics(view)
        self.drift = DriftMonitor(view)
        self.sized_version = 0
        self._sample_lookup = _Sampler(LOOKUP_SAMPLE_EVERY)
        self._sample_write = _Sampler(WRITE_SAMPLE_EVERY)

    def lookup(self, result: ReadResult, now_us: int) -> None:
        """Count hits, misses and expired rows; sample ages and values."""
        counts = np.bincount(result.row_status, minlength=len(FeatureStatus) + 1)
        self.metrics.observe_lookup(
            int(counts[FeatureStatus.PRESENT]),
            int(counts[FeatureStatus.NOT_FOUND]),
            int(counts[FeatureStatus.OUTSIDE_MAX_AGE]),
        )
        if counts[FeatureStatus.PRESENT] and self._sample_lookup():
            present = result.row_status == FeatureStatus.PRESENT
            self.metrics.observe_ages((now_us - result.event_us[present]) / 1e6)
            columns = {}
            for block in result.blocks:
                values = block.values[present]
                columns.update((name, values[:, j]) for j, name in enumerate(block.features))
            self.drift.observe(columns)

    def write(self, store: OnlineStore, batch: WriteBatch, result: WriteResult) -> None:
        """Count written, stale and rejected rows; sample ingested values and the store size."""
        self.metrics.observe_write(result.written, result.stale, result.rejected)
        if result.written and self._sample_write():
            self.drift.observe(batch.columns)
            with contextlib.suppress(NotFoundError):  # deleted since its commit: no size left
                self.resize(store, batch.version or store.registry.get_view(self.view).version)

    def resize(self, store: OnlineStore, version: int) -> None:
        """Show the size of one version of the view (online rows, history) on the gauges."""
        self.metrics.store_bytes(
            store.view_bytes(self.view, version), store.history_bytes(self.view, version)
        )
        self.sized_version = version

    def version_deleted(
        self, store: OnlineStore, version: int, remaining: list[FeatureView]
    ) -> None:
        """Drop what only a deleted version had, while `remaining` versions of the view stay:
        the drift of features none of them has, and a size the gauge took from that version."""
        kept = {feature.name for view in remaining for feature in view.features}
        self.drift.drop([name for name in self.drift.features if name not in kept])
        if self.sized_version == version:
            with contextlib.suppress(NotFoundError):
                self.resize(store, max(view.version for view in remaining))

    def close(self) -> None:
        """Remove the view's label values and drift (its last version was deleted)."""
        self.metrics.remove()
        self.drift.drop(list(self.drift.features))


def decode_keys(columns, max_rows: int) -> tuple[dict[str, np.ndarray], int]:
    """Entity key columns of a lookup as 1-D arrays of equal length, checked against the entity
    limit; a key that does not decode, or is null, fails the request naming its column and row."""
    keys, rows, _ = _decode_keys(columns, None)
    if rows > max_rows:
        raise ResourceExhaustedError(
            f"entity_keys: {rows} entities exceed the limit of {max_rows} per request "
            "(max_entities_per_request); split the request"
        )
    return keys, rows


def _decode_keys(
    columns, row_errors: list[RowError] | None
) -> tuple[dict[str, np.ndarray], int, dict[str, np.ndarray]]:
    """Key columns, their rows and null masks. With row_errors (a write), a key that does not
    decode is listed there and null masks are returned for the store to reject those rows alone;
    without, either fails the request. No row limit here: a lookup's is max_entities_per_request
    (decode_keys), a write's max_rows_per_write (the store checks it)."""
    keys: dict[str, np.ndarray] = {}
    nulls: dict[str, np.ndarray] = {}
    rows = None
    for i, column in enumerate(columns):
        field = f"entity_keys[{i}] ({column.name or 'unnamed'})"
        if not column.name:
            raise InvalidArgumentError(f"{field}: name is empty; set it to the join key's name")
        if column.name in keys:
            raise InvalidArgumentError(f"{field}: join key {column.name!r} appears twice")
        if row_errors is None:
            values, bad = arrays.from_array(column.values, field), []
        else:
            values, bad = arrays.from_array_lenient(column.values, field)
        if values.ndim != 2 or values.shape[1] != 1:
            raise InvalidArgumentError(f"{field}: keys must be one column (width 1)")
        if rows is not None and values.shape[0] != rows:
            raise InvalidArgumentError(
                f"{field}: {values.shape[0]} keys, but entity_keys[0] has {rows}; "
                "every key column needs one value per entity"
            )
        rows = values.shape[0]
        keys[column.name] = values[:, 0]
        mask = arrays.nulls_of(column.values, field)
        if mask is not None and mask.any():
            if row_errors is None:
                raise InvalidArgumentError(
                    f"{field}: key row {int(np.argmax(mask))} is null; join keys cannot be "
                    "null: send a key for every entity"
                )
            nulls[column.name] = mask[:, 0]
        if row_errors is not None:
            row_errors.extend(RowError(row, column.name, f"key {why}") for row, why in bad)
    return keys, rows or 0, nulls


def write_batch(request: pb.WriteFeaturesRequest) -> WriteBatch:
    """A store WriteBatch from a WriteFeatures message, checking shapes before the store does
    (which also bounds its rows by max_rows_per_write).

    Values and keys that do not decode (invalid UTF-8, a BOOL byte other than 0 or 1) and null
    keys become row errors, so skip_bad_rows drops only their rows; the store reports them and
    its own under the wire's field names (event_timestamps)."""
    if request.policy not in pb.BatchPolicy.values():
        choices = " or ".join(f"{name} ({number})" for name, number in pb.BatchPolicy.items())
        raise InvalidArgumentError(f"policy: {request.policy} is not a BatchPolicy; use {choices}")
    row_errors: list[RowError] = []
    keys, rows, nulls = _decode_keys(request.entity_keys, row_errors)
    if not keys and len(request.event_timestamps) % 8 == 0:
        # no key columns: rows come from the events, so a non-empty batch fails in the store
        # naming the missing join key, and an empty one is a valid write of nothing
        rows = len(request.event_timestamps) // 8
    if len(request.event_timestamps) != rows * 8:
        raise InvalidArgumentError(
            f"event_timestamps: {len(request.event_timestamps)} bytes, expected {rows * 8} "
            f"({rows} little-endian int64 microsecond timestamps)"
        )
    columns: dict[str, np.ndarray] = {}
    block_of: dict[str, int] = {}
    for i, block in enumerate(request.blocks):
        field = f"blocks[{i}]"
        values, bad = arrays.from_array_lenient(block.values, field)
        mask = arrays.nulls_of(block.values, field)
        if values.shape[0] != rows:
            sent = values.shape[0]
            first = f"first missing row: {sent}" if sent < rows else f"first extra row: {rows}"
            raise InvalidArgumentError(
                f"{field} ({', '.join(block.features) or 'no features named'}): {sent} rows, "
                f"expected {rows}: one value per entity row (of entity_keys and "
                f"event_timestamps); {first}"
            )
        width = len(block.features)
        if values.shape[1] != width:
            raise InvalidArgumentError(
                f"{field}: values are {values.shape[1]} wide but {width} "
                "features are named; name one feature per column"
            )
        for j, name in enumerate(block.features):
            if name in block_of:
                where = (
                    "twice in this block"
                    if block_of[name] == i
                    else f"in blocks[{block_of[name]}] too"
                )
                raise InvalidArgumentError(
                    f"{field}: feature {name!r} appears {where}; send each feature once"
                )
            block_of[name] = i
            columns[name] = values[:, j]
            if mask is not None:
                nulls[name] = mask[:, j]
        row_errors.extend(
            RowError(k // width, block.features[k % width], f"value {why}") for k, why in bad
        )
    return WriteBatch(
        view=request.view,
        keys=keys,
        event_us=np.frombuffer(request.event_timestamps, dtype="<i8"),
        columns=columns,
        nulls=nulls,
        version=request.version,
        skip_bad_rows=request.policy == pb.SKIP_BAD_ROWS,
        row_errors=row_errors,
        event_column="event_timestamps",
    )


def add_result(response: pb.WriteFeaturesResponse, result: WriteResult, batch: int = 0) -> None:
    """Add one batch's outcome to a (possibly summed) response: every count, and row errors up
    to MAX_ROW_ERRORS per response."""
    response.rows_written += result.written
    response.rows_stale += result.stale
    response.rows_rejected += result.rejected
    room = MAX_ROW_ERRORS - len(response.errors)
    for err in result.errors[: max(room, 0)]:
        response.errors.append(
            types_pb2.RowError(row=err.row, column=err.column, reason=err.reason, batch=batch)
        )


@dataclass(slots=True)
class InFlight:
    """A stream's batch awaiting its commit: its index in the stream, the batch, the commit."""

    index: int
    batch: WriteBatch
    commit: asyncio.Future[WriteResult]


async def settle(
    pending: deque[InFlight],
    limit: int,
    response: pb.WriteFeaturesResponse,
    failures: list[tuple[int, Exception]],
) -> None:
    """Await a stream's oldest batches in flight until at most `limit` are left, adding each
    outcome to the response, or to failures with its batch index: a failure never stops the
    rest from being awaited. A cancelled wait leaves the commit itself alone (shielded)."""
    while len(pending) > limit:
        item = pending.popleft()
        try:
            result = await asyncio.shield(item.commit)
        except Exception as exc:
            failures.append((item.index, exc))
        else:
            add_result(response, result, item.index)


def stream_failure(batch: int, exc: Exception) -> str:
    """The message that ends a stream at its first failed batch: what failed, what was written
    and where to resend from."""
    if batch == 0:
        written = ""
    elif batch == 1:
        written = "batch 0 was written, "
    else:
        written = f"batches 0 to {batch - 1} were written, "
    return (
        f"batch {batch}: {exc}; {written}batch {batch} and later ones were not acknowledged: "
        f"resend from batch {batch} (writes are idempotent, so resending is safe)"
    )


def _deleted_target(results: list[ApplyResult]) -> str:
    """What a prune deleted, as its audit record lists it (apply_target's form): `view@version`,
    `feature_service:name` and `entity:name`, comma-separated."""
    return ",".join(_deleted_name(r) for r in results if r.action == "deleted")


def _deleted_name(result: ApplyResult) -> str:
    if result.entity:
        return f"entity:{result.entity}"
    if result.feature_service:
        return f"feature_service:{result.feature_service}"
    return f"{result.view}@{result.version}"


class FeatureStoreServicer(pb_grpc.FeatureStoreServicer):
    """Serves lookups, writes and the registry of one OnlineStore."""

    def __init__(
        self,
        store: OnlineStore,
        committer: Committer,
        max_entities_per_request: int,
        authorizer: Authorizer | None = None,
        audit: AuditLog | None = None,
    ) -> None:
        self.auth = authorizer or Authorizer(AuthConfig())
        self.audit = audit or AuditLog(None)
        self.store = store
        self.committer = committer
        self.max_rows = max_entities_per_request
        self._observers: dict[str, ViewObserver] = {}
        self._sweep_at = SWEEP_OBSERVERS_AT

    def observer(self, view: str) -> ViewObserver | None:
        """The metrics and drift observer of a view, created on first use; None for a view
        deleted meanwhile, so a call that raced its deletion cannot label it again."""
        found = self._observers.get(view)
        if found is None:
            try:
                self.store.registry.get_view(view)
            except NotFoundError:
                return None
            if len(self._observers) >= self._sweep_at:
                self._sweep()
                self._sweep_at = 2 * max(len(self._observers), SWEEP_OBSERVERS_AT)
            found = self._observers[view] = ViewObserver(view)
        return found

    def refresh_sizes(self) -> None:
        """Show every registered view's sizes again, as sampled now: a compaction shrank
        their history logs, which the gauges otherwise learn only at the next sampled write."""
        for view in self.store.registry.list_views():
            observer = self.observer(view.name)
            if observer is not None:
                with contextlib.suppress(NotFoundError):  # deleted meanwhile
                    observer.resize(self.store, observer.sized_version or view.version)

    def _sweep(self) -> None:
        """Close the observers of views no longer registered (deleted through any worker)."""
        registered = {view.name for view in self.store.registry.list_views()}
        for name in [name for name in self._observers if name not in registered]:
            self._observers.pop(name).close()

    def _view_deleted(self, name: str, version: int) -> None:
        """After a delete: close the view's observer if no version is left (and any other
        worker's deletions), else drop only what belonged to the deleted version."""
        remaining = [
            view
            for view in self.store.registry.list_views(name, all_versions=True)
            if view.name == name
        ]
        found = self._observers.get(name)
        if not remaining:
            self._sweep()
        elif found is not None:
            found.version_deleted(self.store, version, remaining)

    def _visible(self) -> Callable[[FeatureService], bool] | None:
        """With auth on, which feature services the caller may see: those whose every view it
        may read or write (others are answered as not registered)."""
        return self.auth.sees_service if self.auth.enabled else None

    def lookup(self, request: pb.GetOnlineFeaturesRequest) -> pb.GetOnlineFeaturesResponse:
        """Read every referenced view (listed, or those of a feature service) for the request's
        entities (the hot path)."""
        service = request.feature_service
        if service and request.features:
            raise InvalidArgumentError(
                f"features: {len(request.features)} references sent with feature_service "
                f"{service!r}; send one or the other"
            )
        if not service:
            refs = parse_feature_refs(list(request.features))
            if self.auth.enabled:
                self.auth.require(*{f"read:{view}" for view, _ in refs})
        keys, rows = decode_keys(request.entity_keys, self.max_rows)
        response = pb.GetOnlineFeaturesResponse(rows=rows)
        now_us = time.time_ns() // 1000
        if service:
            reads: list[ViewRead] = []

            def select(resolved: FeatureService) -> list[ViewRead]:
                reads[:] = ViewRead.of_service(resolved)
                return reads

            # resolved in the read's own snapshot, so the scopes are checked on what it read
            results = self.store.read_service(service, keys, now_us, self._visible(), select)
            if self.auth.enabled:
                self.auth.require(*{f"read:{result.view.name}" for result in results})
        else:
            reads = [ViewRead(view, wanted, version) for (view, version), wanted in refs.items()]
            results = self.store.read_many(reads, keys, now_us)
        for read, result in zip(reads, results, strict=True):
            observer = self.observer(result.view.name)
            if observer is not None:
                observer.lookup(result, now_us)
            # a projection's results are named by its alias, so clients that key by `view`
            # keep two projections of one view apart
            out = response.views.add(
                view=read.alias or result.view.name,
                version=result.view.version,
                event_timestamps=result.event_us.astype("<i8", copy=False).tobytes(),
            )
            if read.alias:
                out.projection_of = result.view.name
            for block in result.blocks:
                msg = out.blocks.add(features=block.features, statuses=block.statuses.tobytes())
                arrays.to_array(block.values, int(block.dtype), out=msg.values)
        return response

    @maps_errors
    async def GetOnlineFeatures(self, request, context):
        return self.lookup(request)

    def _submit(
        self, batch: WriteBatch, pins: dict[tuple[str, int], int] | None = None
    ) -> asyncio.Future[WriteResult]:
        """Prepare a checked batch and queue it for the group commit. A batch of zero rows is
        answered at once, without resolving its view: an empty request, even one naming no
        view, gets an empty, valid answer. pins (a stream's) holds the definition each view
        version had at the stream's first batch to it: a later batch to one deleted and created
        again since is ConflictError, as a unary write encoded for a replaced definition is."""
        if not len(batch.event_us):
            empty = asyncio.get_running_loop().create_future()
            empty.set_result(WriteResult(0, 0, 0, []))
            return empty
        prepared = self.store.prepare(batch)
        if pins is not None:
            view = prepared.view
            first = pins.setdefault((view.name, view.version), view.created_us)
            if first != view.created_us:
                raise ConflictError(
                    f"feature view {view.name!r} v{view.version} was deleted and created again "
                    "during this stream, so the rows its earlier batches wrote went with the "
                    "deleted view and nothing more is written; resend them on a new stream"
                )
        return asyncio.wrap_future(self.committer.submit(prepared))

    async def _write(self, request: pb.WriteFeaturesRequest, record: dict) -> WriteResult:
        """Check and commit one WriteFeatures batch, counted in its view's metrics and drift and
        in its audit record."""
        batch = write_batch(request)
        result = await self._submit(batch)
        observer = self.observer(batch.view) if len(batch.event_us) else None
        if observer is not None:
            observer.write(self.store, batch, result)
        record.update(written=result.written, stale=result.stale, rejected=result.rejected)
        return result

    @maps_errors
    async def WriteFeatures(self, request, context):
        self.auth.require(f"write:{request.view}")
        response = pb.WriteFeaturesResponse()
        result = await self.audit.change(
            "write_features", request.view, context, lambda record: self._write(request, record)
        )
        add_result(response, result)
        return response

    def _stream_batch_done(
        self,
        peer: str,
        index: int,
        view: str,
        outcome: WriteResult | BaseException,
        batch: WriteBatch | None = None,
    ) -> None:
        """Count a stream's batch in its view's metrics and drift and write its audit record,
        as WriteFeatures does for its one batch."""
        fields = {"peer": peer, "batch": index}
        if isinstance(outcome, WriteResult):
            observer = self.observer(view) if batch is not None and len(batch.event_us) else None
            if observer is not None:
                observer.write(self.store, batch, outcome)
            self.audit.record(
                "write_features",
                view,
                "OK",
                written=outcome.written,
                stale=outcome.stale,
                rejected=outcome.rejected,
                **fields,
            )
            return
        if isinstance(outcome, asyncio.CancelledError):
            code = "CANCELLED"
        else:
            code = status_for(outcome).name
        self.audit.record(
            "write_features", view, code, error=str(outcome)[:MAX_MESSAGE_CHARS], **fields
        )

    @maps_errors
    async def StreamWriteFeatures(self, request_iterator, context):
        """Write each message as it arrives, up to MAX_STREAM_BATCHES_IN_FLIGHT awaiting their
        commit, and answer the summed counts. The first batch that fails (an earlier commit
        failure wins over a later bad message) ends the stream with its status, once every
        batch in flight has settled. Each batch is counted in its view's metrics and audited
        (one record, with its index in the stream) once its commit ends, by a change of its own
        that the stream's end, a client that gives up and the server's shutdown all wait for."""
        response = pb.WriteFeaturesResponse()
        pending: deque[InFlight] = deque()
        failures: list[tuple[int, Exception]] = []
        pins: dict[tuple[str, int], int] = {}
        peer = context.peer()

        async def record(item: InFlight) -> None:
            try:
                outcome: WriteResult | BaseException = await item.commit
            except Exception as exc:
                outcome = exc
            self._stream_batch_done(peer, item.index, item.batch.view, outcome, item.batch)

        index = 0
        try:
            async for request in request_iterator:
                self.auth.require(f"write:{request.view}", batch=index)
                try:
                    checked = write_batch(request)
                    item = InFlight(index, checked, self._submit(checked, pins))
                except Exception as exc:
                    self._stream_batch_done(peer, index, request.view, exc)
                    raise
                self.audit.settle_later(record(item))
                pending.append(item)
                index += 1
                await settle(pending, MAX_STREAM_BATCHES_IN_FLIGHT, response, failures)
                if failures:
                    break
        except Exception as exc:
            failures.append((index, exc))
        await settle(pending, 0, response, failures)
        if failures:
            await request_iterator.aclose()  # stop reading: lets go of the last request
            batch, exc = min(failures, key=lambda failure: failure[0])
            # Each failure's traceback holds this frame, whose locals held the failures: a
            # reference cycle that kept every failed stream's batches until a full collection
            # (hundreds of MB between two, under the server's GC thresholds).
            failures.clear()
            try:
                if not is_domain_error(exc):
                    raise exc  # maps_errors answers INTERNAL and logs it
                await abort(context, exc, stream_failure(batch, exc), batch)
            finally:
                del exc
        return response

    @maps_errors
    async def ListFeatureViews(self, request, context):
        """The views matching name_prefix that the caller may read or write, and the entities
        any version of them uses (a writer of an older version needs its entity too). Every
        entity, those of no view included, when the caller may see every view and sent no
        prefix."""
        registry = self.store.registry
        prefix = request.name_prefix
        seen = [v for v in registry.list_views(prefix, True) if self.auth.sees_view(v.name)]
        # listed by name, then version: the last of each name is its latest version
        views = seen if request.all_versions else list({v.name: v for v in seen}.values())
        entities = registry.list_entities()
        if prefix or not self.auth.sees_view("*"):
            used = {v.entity for v in seen}
            entities = [e for e in entities if e.name in used]
        return pb.ListFeatureViewsResponse(
            views=[rm.view_to_proto(v) for v in views],
            entities=[rm.entity_to_proto(e) for e in entities],
        )

    @maps_errors
    async def GetFeatureView(self, request, context):
        self.auth.require_any(*schema_scopes(request.name))
        return rm.view_to_proto(self.store.registry.get_view(request.name, request.version))

    @maps_errors
    async def ApplyFeatureViews(self, request, context):
        """Apply the request's definitions; with prune, its record lists what was deleted,
        and each deleted view version's observer state is dropped as DeleteFeatureView does."""
        entities = [
            rm.entity_from_proto(e, f"entities[{i}]") for i, e in enumerate(request.entities)
        ]
        self.auth.require("admin")
        views = [rm.view_from_proto(v, f"views[{i}]") for i, v in enumerate(request.views)]
        services = [rm.service_from_proto(s) for s in request.feature_services]

        async def apply(record: dict) -> list[ApplyResult]:
            results = await asyncio.to_thread(
                self.store.registry.apply,
                entities,
                views,
                request.dry_run,
                services,
                request.prune,
            )
            if request.prune:
                record["would_delete" if request.dry_run else "deleted"] = _deleted_target(results)
            if not request.dry_run:
                # inside the change: it runs to its end when the caller gives up
                for result in results:
                    if result.action == "deleted" and result.view:
                        self._view_deleted(result.view, result.version)
            return results

        fields = {"prune": True} if request.prune else {}
        results = await self.audit.change(
            "apply_feature_views",
            apply_target(request),
            context,
            apply,
            dry_run=request.dry_run,
            **fields,
        )
        return pb.ApplyFeatureViewsResponse(results=[rm.apply_result_to_proto(r) for r in results])

    @maps_errors
    async def DeleteFeatureView(self, request, context):
        self.auth.require("admin")
        if not request.name:
            raise InvalidArgumentError("name: empty; name the view whose version to delete")
        if not request.version:
            raise InvalidArgumentError(
                f"version: 0; name the version of {request.name!r} to delete "
                "(ListFeatureViews with all_versions lists them)"
            )
        target = f"{request.name}@{request.version}"

        async def delete(_: dict) -> None:
            await asyncio.to_thread(self.store.registry.delete_view, request.name, request.version)
            self._view_deleted(request.name, request.version)  # in the change, as in apply

        await self.audit.change("delete_feature_view", target, context, delete)
        return pb.DeleteFeatureViewResponse()

    @maps_errors
    async def ListFeatureServices(self, request, context):
        """The services matching name_prefix whose every view the caller may read or write."""
        services = self.store.registry.list_services(request.name_prefix)
        return pb.ListFeatureServicesResponse(
            feature_services=[rm.service_to_proto(s) for s in services if self.auth.sees_service(s)]
        )

    @maps_errors
    async def GetFeatureService(self, request, context):
        if not request.name:
            raise InvalidArgumentError("name: empty; name the feature service to fetch")
        service = self.store.registry.get_service(request.name, visible=self._visible())
        return rm.service_to_proto(service)

    @maps_errors
    async def DeleteFeatureService(self, request, context):
        self.auth.require("admin")
        if not request.name:
            raise InvalidArgumentError("name: empty; name the feature service to delete")
        await self.audit.change(
            "delete_feature_service",
            request.name,
            context,
            lambda _: asyncio.to_thread(self.store.registry.delete_service, request.name),
        )
        return pb.DeleteFeatureServiceResponse()
