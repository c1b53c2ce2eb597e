"""Coalesces concurrent Predict requests of one model version: the requests that arrive within a
few event-loop turns share one store read per view, one assembly, one transform run and one batcher
submission, and each caller gets exactly its own rows back. A read, its key encoding and the
Numba kernels cost much of their time per call rather than per row, so eight requests of 100
entities cost about half of eight separate calls. A model with max_batch_size = 0 declares no
batch dimension, so its output rows may depend on other input rows: its requests are never
merged (each must still get one output row per entity)."""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable
from dataclasses import dataclass, replace
from typing import TypeVar

import numpy as np

from featurestore.dtypes import FeatureStatus
from featurestore.online_store import OnlineStore
from server.batcher import DynamicBatcher, check_rows, select_outputs, union_outputs
from server.errors import ModelUnavailableError
from server.model_repository import LoadedModel
from server.prediction_binding import Assembled
from server.tensors import NUMPY_DTYPES

T = TypeVar("T")
_PRESENT = np.uint8(FeatureStatus.PRESENT)
OPEN_TURNS = 8
"""Event-loop turns a group stays open. grpc.aio starts about one new call per turn, and a turn
with nothing else to do takes microseconds, so a few turns let concurrent callers join. Measured
with 64 callers (predict_bench, h2load): 8 turns gave 2,720-2,820 Predict/s against 2,000-2,200
with 4; 16 was no better than 8."""


@dataclass(slots=True)
class Scored:
    """One request's share of a coalesced run: its model outputs and what the reads said."""

    scores: dict[str, np.ndarray]
    assembled: Assembled


@dataclass(slots=True)
class _Pending:
    """One request waiting for its group: validated columns and where its answer goes."""

    keys: dict[str, np.ndarray]
    values: dict[str, np.ndarray]
    rows: int
    outputs: list[str] | None
    deadline: float | None
    future: asyncio.Future


@dataclass(slots=True)
class _Group:
    """The task scoring a group of requests and how many of their callers still wait."""

    waiting: int
    task: asyncio.Task | None = None

    def left(self, future: asyncio.Future) -> None:
        """A caller's future is done: once every caller has gone, stop the run (a chunk still
        queued in the batcher leaves the queue, freeing its slot)."""
        if future.cancelled():
            self.waiting -= 1
            if not self.waiting and self.task is not None:
                self.task.cancel()


class PredictCoalescer:
    """Gathers the Predict requests of one model version that arrive within OPEN_TURNS loop
    turns and runs them as one, up to max_rows entities per group.

    Requests group only with requests whose entity key columns have the same names and dtypes,
    so a request with wrong keys fails alone, with the store's message. Each request holds the
    version's batcher from arrival until its group's run ends, so a version that unloads
    meanwhile still scores it. A group whose callers have all gone is stopped. `requests` and
    `groups` count what ran; their ratio is the mean group size. The model is held weakly, so a
    coalescer kept per version never keeps an unloaded version alive.
    """

    def __init__(self, store: OnlineStore, model: LoadedModel, max_rows: int) -> None:
        self.store = store
        self._model = weakref.ref(model)
        self.max_rows = max_rows
        self._merges = bool(model.config.max_batch_size)
        self._row_shapes: dict[str, tuple[int, ...]] = {}
        self._waiting: dict[tuple, list[_Pending]] = {}
        self._kicked = False
        self._tasks: set[asyncio.Task] = set()
        self.requests = 0
        self.groups = 0

    async def predict(
        self,
        keys: dict[str, np.ndarray],
        values: dict[str, np.ndarray],
        rows: int,
        outputs: list[str] | None,
        deadline: float | None,
    ) -> Scored:
        """This request's scores and read facts, computed together with its concurrent peers."""
        model = self._model()
        if model is None:
            raise ModelUnavailableError("the model version was unloaded; retry")
        model.batcher.hold()
        loop = asyncio.get_running_loop()
        pending = _Pending(keys, values, rows, outputs, deadline, loop.create_future())
        signature = tuple((name, column.dtype.str) for name, column in keys.items())
        self._waiting.setdefault(signature, []).append(pending)
        if not self._kicked:
            self._kicked = True
            loop.call_soon(self._flush, OPEN_TURNS)
        return await pending.future

    def _flush(self, turns: int) -> None:
        """After `turns` more loop turns, start one run per group of waiting requests; requests
        whose callers have gone are dropped."""
        if turns > 1:
            asyncio.get_running_loop().call_soon(self._flush, turns - 1)
            return
        self._kicked = False
        waiting, self._waiting = self._waiting, {}
        model = self._model()
        for requests in waiting.values():
            live = [r for r in requests if not r.future.done()]
            if model is None:
                for request in live:
                    request.future.set_exception(
                        ModelUnavailableError("the model version was unloaded; retry")
                    )
                continue
            if len(live) < len(requests):
                model.batcher.release(len(requests) - len(live))
            for requests_of_group in self._groups(live):
                self._start(requests_of_group, model.batcher)

    def _start(self, requests: list[_Pending], batcher: DynamicBatcher) -> None:
        """Run one group in its own task, which ends its requests' holds on the batcher."""
        self.requests += len(requests)
        self.groups += 1
        group = _Group(len(requests))
        task = group.task = asyncio.create_task(self._run(requests))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda _: batcher.release(len(requests)))
        for request in requests:
            request.future.add_done_callback(group.left)

    def _groups(self, requests: list[_Pending]) -> list[list[_Pending]]:
        """Consecutive requests, split so that no group holds more than max_rows entities, or
        one request per group for a model that is not batched."""
        if not self._merges:
            return [[request] for request in requests]
        groups: list[list[_Pending]] = [[]]
        rows = 0
        for request in requests:
            if groups[-1] and rows + request.rows > self.max_rows:
                groups.append([])
                rows = 0
            groups[-1].append(request)
            rows += request.rows
        return [group for group in groups if group]

    async def _run(self, group: list[_Pending]) -> None:
        """Read, assemble, transform and score the group; hand each request its rows."""
        try:
            shares = await self._score_group(group)
        except Exception as exc:
            for request in group:
                if not request.future.done():
                    request.future.set_exception(exc)
            return
        for request, share in zip(group, shares, strict=True):
            if not request.future.done():
                request.future.set_result(share)

    async def _score_group(self, group: list[_Pending]) -> list[Scored]:
        """Each request's Scored share of one run over the group's concatenated rows."""
        model = self._model()
        if model is None:
            raise ModelUnavailableError("the model version was unloaded; retry")
        binding = model.binding
        if len(group) == 1:
            keys, values, rows = group[0].keys, group[0].values, group[0].rows
        else:
            keys = {name: np.concatenate([r.keys[name] for r in group]) for name in group[0].keys}
            values = {
                name: np.concatenate([r.values[name] for r in group]) for name in group[0].values
            }
            rows = sum(r.rows for r in group)
        results, aliases = binding.read(self.store, keys)
        assembled = binding.assemble(results, values, rows, aliases)
        tensor = binding.transform(assembled.block, assembled.typed)
        outputs = union_outputs(r.outputs for r in group)
        deadlines = [r.deadline for r in group]
        deadline = None if None in deadlines else max(deadlines)
        scores = await score(model, tensor, assembled.failed, outputs, deadline, self._row_shapes)
        if len(group) == 1:
            return [Scored(select_outputs(scores, group[0].outputs), assembled)]
        shares = []
        start = 0
        for request in group:
            stop = start + request.rows
            part = {name: column[start:stop] for name, column in scores.items()}
            part = select_outputs(part, request.outputs)
            shares.append(Scored(part, _rows_of(assembled, start, stop)))
            start = stop
        return shares


async def score(
    model: LoadedModel,
    tensor: np.ndarray,
    failed: np.ndarray,
    outputs: list[str] | None,
    deadline: float | None,
    row_shapes: dict[str, tuple[int, ...]],
) -> dict[str, np.ndarray]:
    """Model outputs for every row (zeros where failed); only scorable rows are submitted to the
    model's batcher with the callers' deadline. row_shapes keeps each output's per-row shape
    from the last run, to shape the zeros of a request none of whose rows could be scored."""
    any_failed = bool(failed.any())
    x = tensor[~failed] if any_failed else tensor
    n = x.shape[0]
    names = outputs or model.output_names
    if n == 0:
        return {name: _zeros(model, name, len(failed), row_shapes) for name in names}
    merged = await _submit(model, x, deadline, outputs)
    check_rows(
        model.name,
        merged,
        n,
        "Predict answers each entity with one row of each output, so its first dimension is "
        "the entity dimension",
        "Predict needs a model whose outputs keep one row per input row, whatever its "
        "max_batch_size; call ModelInfer to run this model on whole tensors",
    )
    for name in names:
        row_shapes[name] = merged[name].shape[1:]
    if not any_failed:
        return merged
    full = {}
    for name in names:
        values = merged[name]
        out = np.zeros((len(failed), *values.shape[1:]), values.dtype)
        out[~failed] = values
        full[name] = out
    return full


async def _submit(
    model: LoadedModel, x: np.ndarray, deadline: float | None, outputs: list[str] | None
) -> dict[str, np.ndarray]:
    """The model's outputs for the rows of x, submitted in chunks of max_batch_size. Chunks go
    in waves that fit the queue's free room (at least one each), so a large group is never
    refused for its size alone; a failed chunk cancels the rest and fails the group."""
    batcher = model.batcher
    name = model.binding.input_name
    n = x.shape[0]
    step = model.config.max_batch_size or n
    if n <= step:
        return await batcher.submit({name: x}, n, deadline=deadline, outputs=outputs)
    starts = list(range(0, n, step))
    parts: list[dict[str, np.ndarray]] = []
    while len(parts) < len(starts):
        room = batcher.room()
        wave = starts[len(parts) : len(parts) + max(room, 1)] if room is not None else starts
        parts += await _all(
            [
                batcher.submit({name: x[i : i + step]}, min(step, n - i), deadline=deadline,
                               outputs=outputs)
                for i in wave
            ]
        )  # fmt: skip
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


async def _all(calls: list[Awaitable[T]]) -> list[T]:
    """The results of calls run concurrently, in order. The first failure, or the caller's
    cancellation, cancels the others, so none is left queued."""
    tasks = [asyncio.ensure_future(call) for call in calls]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for task in tasks:
            task.cancel()
    errors = [t.exception() for t in tasks if t.done() and not t.cancelled()]
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise first
    return [t.result() for t in tasks]


def _zeros(
    model: LoadedModel, name: str, rows: int, row_shapes: dict[str, tuple[int, ...]]
) -> np.ndarray:
    """An all-zero output for rows that were not scored: shaped as the last run gave this
    output, or else by the model's config with each variable dimension 1."""
    spec = model.config.output(name)
    dtype = NUMPY_DTYPES.get(spec.datatype, np.float32) if spec is not None else np.float32
    shape = row_shapes.get(name)
    if shape is None:
        shape = tuple(max(d, 1) for d in spec.shape[1:]) if spec is not None else (1,)
    return np.zeros((rows, *shape), dtype)


def _rows_of(assembled: Assembled, start: int, stop: int) -> Assembled:
    """One request's rows of a group's Assembled: its fills are the features missing in them."""
    fills = [
        replace(fill, statuses=statuses)
        for fill in assembled.fills
        if ((statuses := fill.statuses[start:stop]) != _PRESENT).any()
    ]
    return Assembled(
        block=assembled.block[start:stop],
        failed=assembled.failed[start:stop],
        first_bad=assembled.first_bad[start:stop],
        failed_status=assembled.failed_status[start:stop],
        oldest_event_us=assembled.oldest_event_us[start:stop],
        failed_features=assembled.failed_features,
        fills=fills,
        views=assembled.views,
        service=assembled.service,
        aliases=assembled.aliases,
        typed={name: column[start:stop] for name, column in assembled.typed.items()},
    )
