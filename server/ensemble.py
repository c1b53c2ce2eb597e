"""Triton's ensembles: a model whose requests run a pipeline of composing models.

An ensemble's config (server/model_config.py) names steps; each step feeds ensemble tensors to a
composing model and names its outputs as ensemble tensors. check_steps holds the steps against
the composing models served now (at load); EnsembleScheduler runs requests: each step starts as
soon as its inputs exist (independent steps concurrently) and joins its composing version's own
dynamic batcher, so ensemble traffic batches with direct traffic. It has the interface of
DynamicBatcher that the servicers use (submit, hold, release, room, stats, metrics, close), so
Predict, the response cache, classification, shared memory and tracing treat an ensemble as any
model.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from server.batcher import BatcherStats
from server.errors import (
    InferenceFailedError,
    InvalidRequestError,
    ModelNotFoundError,
    ModelUnavailableError,
    QueueFullError,
    RequestTimeoutError,
    ServerError,
)
from server.metrics import ModelMetrics
from server.model_config import LATEST_VERSION, EnsembleStep, ModelConfig, TensorSpec
from server.tensors import NUMPY_DTYPES

if TYPE_CHECKING:
    from server.model_repository import LoadedModel
    from server.tracing import Trace

Resolve = Callable[[str, str], "LoadedModel"]
"""The served version of a model (name, version "" = highest), as ModelRepository.get: raises
ModelNotFoundError or ModelUnavailableError."""


class EnsembleLoadError(Exception):
    """An ensemble's steps do not fit the composing models served now (the repository tries
    again whenever one of them loads)."""


def step_version(step: EnsembleStep) -> str:
    """The version a step asks the repository for ("" = the highest served)."""
    return "" if step.model_version == LATEST_VERSION else str(step.model_version)


def composing_models(config: ModelConfig) -> list[str]:
    """The models an ensemble's steps run, each once, in step order."""
    return list(dict.fromkeys(step.model_name for step in config.ensemble))


def _fits(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    """Whether two full shapes can hold the same tensor (-1 = any size on either side)."""
    return len(a) == len(b) and all(x == y or -1 in (x, y) for x, y in zip(a, b, strict=True))


def check_steps(config: ModelConfig, resolve: Resolve) -> dict[int, ModelConfig]:
    """Hold each step against its composing model as served now: served, every mapped tensor
    exists there with the ensemble tensor's datatype and a compatible shape, and batching agrees
    (the ensemble's max_batch_size at most the composing model's; a composing model that does not
    batch needs an ensemble that does not either). Returns the composing config each step was
    checked against, by step index; raises EnsembleLoadError naming the step, the model, the
    tensor and the fix."""
    checked: dict[int, ModelConfig] = {}
    shapes: dict[str, TensorSpec] = {t.name: t for t in config.inputs}
    declared = {t.name: t for t in config.outputs}
    for index in plan_order(config):
        step = config.ensemble[index]
        where = step.label(index)
        try:
            model = resolve(step.model_name, step_version(step))
        except ModelNotFoundError as exc:
            raise EnsembleLoadError(
                f"{where}: {exc}; fix model_name / model_version, or add what they name (the "
                "ensemble loads once it serves)"
            ) from None
        except ModelUnavailableError as exc:
            raise EnsembleLoadError(
                f"{where}: the composing model is not served ({exc}); load model "
                f"'{step.model_name}' (the ensemble loads once it serves), or fix model_name / "
                "model_version"
            ) from None
        composing = checked[index] = model.config
        limit = composing.max_batch_size or 0
        if config.max_batch_size and not limit:
            raise EnsembleLoadError(
                f"{where}: model '{step.model_name}' does not batch (max_batch_size = 0) but the "
                f"ensemble does (max_batch_size = {config.max_batch_size}); set the ensemble's "
                "max_batch_size = 0 and give its tensors full shapes"
            )
        rows = row_limit(composing, resolve)
        if rows and not config.max_batch_size and "features" in config.extensions:
            raise EnsembleLoadError(
                f"{where}: model '{step.model_name}' takes at most {rows} rows a request (its "
                "own max_batch_size, or its steps' through a nested ensemble), but the ensemble "
                "does not batch (max_batch_size = 0), so Predict, which splits a group by the "
                "ensemble's max_batch_size, would send it every row at once; set the "
                f"ensemble's max_batch_size to {rows} or less"
            )
        if config.max_batch_size > limit > 0:
            raise EnsembleLoadError(
                f"{where}: the ensemble's max_batch_size = {config.max_batch_size} exceeds model "
                f"'{step.model_name}''s {limit}; lower the ensemble's max_batch_size to {limit}"
            )
        for name, tensor in step.input_map.items():
            spec = _composing_tensor(where, step, composing, "input", name)
            _agree(where, step, name, spec, shapes[tensor], tensor)
        for name, tensor in step.output_map.items():
            spec = _composing_tensor(where, step, composing, "output", name)
            if tensor in declared:
                _agree(where, step, name, spec, declared[tensor], tensor)
            shapes[tensor] = spec
        mapped = set(step.input_map)
        for spec in composing.inputs:
            if spec.name not in mapped and not spec.optional:
                raise EnsembleLoadError(
                    f"{where}: model '{step.model_name}''s input '{spec.name}' is not in "
                    f'input_map; map it to an ensemble tensor ({spec.name} = "<tensor>")'
                )
    return checked


def row_limit(config: ModelConfig, resolve: Resolve) -> int:
    """The most rows one request to this model may carry (0: no limit): its max_batch_size, or
    for an ensemble that does not batch, the least of its steps' limits (nested ensembles too;
    cycles are refused before this runs). A step whose model does not serve counts no limit."""
    if config.max_batch_size or not config.ensemble:
        return config.max_batch_size or 0
    limits = []
    for step in config.ensemble:
        try:
            limits.append(row_limit(resolve(step.model_name, step_version(step)).config, resolve))
        except ServerError:
            continue
    return min((n for n in limits if n), default=0)


def check_no_cycle(
    name: str, config: ModelConfig, config_of: Callable[[str], ModelConfig | None]
) -> None:
    """Follow an ensemble's steps through the ensembles they run (config_of: a model's ensemble
    config, None when it is not an ensemble) and raise EnsembleLoadError naming the path when
    they come back to the ensemble: each request would run it again, without end."""
    path = [name]
    seen: set[str] = set()

    def back_to_name(runs: ModelConfig) -> bool:
        for model in composing_models(runs):
            if model == name:
                path.append(model)
                return True
            inner = None if model in seen else config_of(model)
            seen.add(model)
            if inner is not None:
                path.append(model)
                if back_to_name(inner):
                    return True
                path.pop()
        return False

    if back_to_name(config):
        raise EnsembleLoadError(
            f"steps form a cycle across ensembles: {' -> '.join(path)}; an ensemble cannot run "
            f"itself, directly or through other ensembles: fix the step of '{path[-2]}' that "
            f"runs '{name}' (its model_name)"
        )


def _composing_tensor(
    where: str, step: EnsembleStep, composing: ModelConfig, kind: str, name: str
) -> TensorSpec:
    """The composing model's input or output a step maps, or EnsembleLoadError naming its own."""
    spec = composing.input(name) if kind == "input" else composing.output(name)
    if spec is None:
        have = composing.inputs if kind == "input" else composing.outputs
        raise EnsembleLoadError(
            f"{where}: {kind}_map names {kind} '{name}', which model '{step.model_name}' does "
            f"not have; use one of {', '.join(t.name for t in have)}"
        )
    return spec


def _agree(
    where: str, step: EnsembleStep, name: str, spec: TensorSpec, tensor: TensorSpec, label: str
) -> None:
    """A composing model's tensor and the ensemble tensor it is mapped to hold the same data."""
    what = f"{where}: model '{step.model_name}''s '{name}' mapped to ensemble tensor '{label}'"
    if spec.datatype != tensor.datatype:
        raise EnsembleLoadError(
            f"{what}: datatypes differ ({spec.datatype} there, {tensor.datatype} here); make "
            f"ensemble tensor '{label}' {spec.datatype}, or map another tensor"
        )
    if not _fits(spec.shape, tensor.shape):
        raise EnsembleLoadError(
            f"{what}: shapes differ ({list(spec.shape)} there, {list(tensor.shape)} here, -1 = "
            f"any size); give ensemble tensor '{label}' shape {list(spec.shape)}"
        )


def plan_order(config: ModelConfig) -> list[int]:
    """The step indices in an order where every step comes after the steps it reads from (the
    config is checked acyclic at parse time)."""
    producer = {t: i for i, s in enumerate(config.ensemble) for t in s.output_map.values()}
    order: list[int] = []

    def visit(index: int) -> None:
        if index in order:
            return
        for tensor in config.ensemble[index].input_map.values():
            if tensor in producer:
                visit(producer[tensor])
        order.append(index)

    for index in range(len(config.ensemble)):
        visit(index)
    return order


class _Plan:
    """What a request for some outputs runs: the steps whose outputs are needed (a step no one
    needs is skipped) and, per step, the composing outputs to ask for."""

    def __init__(self, config: ModelConfig, outputs: list[str]) -> None:
        needed = set(outputs)
        steps: list[int] = []
        for index in reversed(plan_order(config)):
            step = config.ensemble[index]
            if needed & set(step.output_map.values()):
                steps.append(index)
                needed |= set(step.input_map.values())
        self.steps = sorted(steps)
        self.wanted = {
            i: [n for n, t in config.ensemble[i].output_map.items() if t in needed]
            for i in self.steps
        }


class EnsembleScheduler:
    """Runs an ensemble version's requests through its composing models' batchers, with the
    interface of DynamicBatcher the servicers use. Counts its own requests in stats (each a
    success or failure, one execution of its rows); the steps count in the composing models'."""

    def __init__(
        self,
        config: ModelConfig,
        resolve: Resolve,
        *,
        name: str,
        metrics: ModelMetrics,
        checked: dict[int, ModelConfig],
    ) -> None:
        self.config = config
        self.name = name
        self.metrics = metrics
        self.stats = BatcherStats()
        self._resolve = resolve
        self.checked = checked
        """The composing config each step was last checked against (check_steps), by index: a
        step whose model serves another config was reloaded after the check."""
        self._uses = Counter((s.model_name, step_version(s)) for s in config.ensemble)
        self._all_outputs = [t.name for t in config.outputs]
        self._plans: dict[frozenset[str], _Plan] = {}
        self._running = 0
        self._holds = 0
        self._closed = False
        self._drained = asyncio.Event()

    def start(self) -> None:
        """Nothing to start (DynamicBatcher's interface): the steps run on the composing models'
        batchers."""

    def room(self, priority: int | None = None) -> int | None:
        """The requests this ensemble can take now (None: no step's queue has a limit): the
        least free room of its composing models' queues, each divided by the steps that submit
        to it (one request puts that many there). An ensemble has no queue of its own, so
        Predict sends its chunks in waves that every step can take. A step whose model does not
        serve is left to submit, which names it."""
        rooms = []
        for (name, version), uses in self._uses.items():
            try:
                model = self._resolve(name, version)
            except ServerError:
                continue
            room = model.batcher.room(priority)
            if room is not None:
                rooms.append(room // uses)
        return min(rooms, default=None)

    def hold(self) -> None:
        """As DynamicBatcher.hold: keep the version open for a request that submits later (a
        Predict waiting for its group); raises ModelUnavailableError once the version unloads."""
        if self._closed:
            raise ModelUnavailableError(f"model '{self.name}' is unloading; retry")
        self._holds += 1

    def release(self, count: int = 1) -> None:
        """End `count` holds taken with hold()."""
        self._holds -= count
        self._maybe_drained()

    def _maybe_drained(self) -> None:
        """Signal close() once nothing runs or is held."""
        if self._closed and not self._running and not self._holds:
            self._drained.set()

    async def close(self) -> None:
        """Stop taking requests and wait for the running and held ones to end."""
        self._closed = True
        self._maybe_drained()
        await self._drained.wait()

    async def submit(
        self,
        inputs: dict[str, np.ndarray],
        rows: int,
        *,
        priority: int | None = None,
        deadline: float | None = None,
        timeout_us: int | None = None,
        outputs: list[str] | None = None,
        trace: Trace | None = None,
    ) -> dict[str, np.ndarray]:
        """Run the steps that the requested outputs (None = all) need and return those outputs.
        Each step joins its composing model's batcher with this request's priority, deadline
        and timeout. A failing step fails the request with its status, its message prefixed by
        the ensemble and the step; the other steps under way are cancelled. While the version
        unloads, only requests of holders (see hold) are still taken."""
        if self._closed and not self._holds:
            raise ModelUnavailableError(f"model '{self.name}' is unloading; retry")
        wanted = outputs if outputs is not None else self._all_outputs
        started = time.monotonic_ns()
        if trace is not None:
            trace.queue_start = started
        self._running += 1
        try:
            tensors = await self._run(
                inputs, rows, self._plan(wanted), (priority, deadline, timeout_us)
            )
        except BaseException as exc:
            self.stats.fail.add(time.monotonic_ns() - started)
            self.metrics.fail(_failure_reason(exc))
            raise
        finally:
            self._running -= 1
            self._maybe_drained()
        elapsed = time.monotonic_ns() - started
        if trace is not None:
            trace.ran(started, 0, elapsed, 0)
        self._count_success(rows, elapsed)
        return {name: tensors[name] for name in wanted}

    def _plan(self, outputs: list[str]) -> _Plan:
        """The (cached) plan of a request for these outputs: keyed by the set, not the order a
        caller names them in, so the cache holds at most one plan per subset of the outputs."""
        key = frozenset(outputs)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = _Plan(self.config, outputs)
        return plan

    def _count_success(self, rows: int, elapsed_ns: int) -> None:
        """One request answered: Triton counts an ensemble request as one execution."""
        stats = self.stats
        stats.success.add(elapsed_ns)
        stats.queue.add(0)
        stats.inference_count += rows
        stats.execution_count += 1
        stats.last_inference_ms = int(time.time() * 1000)
        self.metrics.observe_requests(1, rows)

    async def _run(
        self,
        inputs: dict[str, np.ndarray],
        rows: int,
        plan: _Plan,
        schedule: tuple[int | None, float | None, int | None],
    ) -> dict[str, np.ndarray]:
        """The ensemble tensors after running the plan's steps, each as soon as its inputs
        exist; on any failure the steps still running are cancelled and awaited."""
        tensors = dict(inputs)
        waiting = list(plan.steps)
        running: dict[asyncio.Task, int] = {}
        try:
            while waiting or running:
                ready = [i for i in waiting if self._ready(i, tensors)]
                if len(ready) == 1 and not running:
                    # Alone (a chain's next step): awaited in place, sparing a task.
                    waiting.remove(ready[0])
                    step = self._step(ready[0], plan.wanted[ready[0]], tensors, rows, schedule)
                    tensors.update(await step)
                    continue
                for index in ready:
                    waiting.remove(index)
                    step = self._step(index, plan.wanted[index], tensors, rows, schedule)
                    running[asyncio.ensure_future(step)] = index
                done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    del running[task]
                    tensors.update(task.result())
        finally:
            for task in running:
                task.cancel()
            if running:
                await asyncio.gather(*running, return_exceptions=True)
        return tensors

    def _ready(self, index: int, tensors: dict[str, np.ndarray]) -> bool:
        """Whether every tensor a step reads exists."""
        return all(t in tensors for t in self.config.ensemble[index].input_map.values())

    async def _step(
        self,
        index: int,
        wanted: list[str],
        tensors: dict[str, np.ndarray],
        rows: int,
        schedule: tuple[int | None, float | None, int | None],
    ) -> dict[str, np.ndarray]:
        """One step on its composing model's batcher; its outputs as ensemble tensors."""
        step = self.config.ensemble[index]
        where = f"ensemble '{self.config.name}' step {index} (model '{step.model_name}')"
        priority, deadline, timeout_us = schedule
        try:
            model = self._resolve(step.model_name, step_version(step))
            feed = {name: tensors[tensor] for name, tensor in step.input_map.items()}
            reloaded = model.config is not self.checked.get(index, model.config)
            step_rows = _rows(model.config, feed, reloaded)
            if deadline is not None and time.monotonic() >= deadline:
                raise RequestTimeoutError(
                    "the caller's deadline passed before the step could start; give the call a "
                    "longer deadline (it covers every step of the ensemble)"
                )
            result = await model.batcher.submit(
                feed,
                step_rows,
                priority=priority,
                deadline=deadline,
                timeout_us=timeout_us,
                outputs=wanted,
            )
        except ServerError as exc:
            raise type(exc)(f"{where}: {exc}") from exc
        produced = {step.output_map[name]: array for name, array in result.items()}
        for tensor, array in produced.items():
            spec = self.config.output(tensor)
            if spec is not None:
                self._check_output(where, spec, array, rows)
        return produced

    def _check_output(self, where: str, spec: TensorSpec, array: np.ndarray, rows: int) -> None:
        """A step's output that is an ensemble output has the ensemble's declared datatype and
        shape (its batch dimension: the request's rows)."""
        expected = spec.shape
        if self.config.max_batch_size:
            expected = (rows, *spec.shape[1:])
        dtype = NUMPY_DTYPES[spec.datatype]
        if (spec.datatype != "BYTES" and array.dtype != dtype) or not _fits(array.shape, expected):
            raise InferenceFailedError(
                f"{where}: ensemble output '{spec.name}' came back as {array.dtype} "
                f"{list(array.shape)}, but the ensemble declares {spec.datatype} "
                f"{list(spec.shape)}; fix the ensemble's [[outputs]] entry to what the "
                "composing model returns"
            )


def _rows(composing: ModelConfig, feed: dict[str, np.ndarray], reloaded: bool) -> int:
    """The rows a step sends its composing model (1 for one that does not batch), its inputs
    checked against the model's shapes first (an ensemble tensor's -1 may be fixed there). A
    misfit is the caller's tensor, which the ensemble's looser shapes let through
    (INVALID_ARGUMENT), unless the model was reloaded after the ensemble's check: then the
    repository is checking the ensemble again and the request is UNAVAILABLE, to retry."""
    for name, array in feed.items():
        spec = composing.input(name)
        if spec is not None and _fits(array.shape, spec.shape):
            continue
        if reloaded or spec is None:
            takes = f"takes {list(spec.shape)}" if spec is not None else f"has no input '{name}'"
            raise ModelUnavailableError(
                f"model '{composing.name}' now {takes}, not the {list(array.shape)} the ensemble "
                "feeds it: it was reloaded with another signature and the ensemble is being "
                "checked again; retry"
            )
        raise InvalidRequestError(
            f"input '{name}' of model '{composing.name}' gets shape {list(array.shape)}, which "
            f"does not fit its {list(spec.shape)} (-1 = any size); send ensemble inputs that "
            "give it that shape"
        )
    if not composing.max_batch_size:
        return 1
    return next(iter(feed.values())).shape[0]


def _failure_reason(exc: BaseException) -> str:
    """The featureserve_model_failures_total reason of a failed ensemble request."""
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled"
    if isinstance(exc, RequestTimeoutError):
        return "timed_out"
    if isinstance(exc, QueueFullError):
        return "rejected"
    return "error"
