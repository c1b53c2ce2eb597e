"""Triton-style dynamic batcher: one per model version, N instance threads running ONNX Runtime.

Requests queue on the event loop, one queue per priority level with its own queue policy
(Triton's ModelQueuePolicy: size limit, timeout, REJECT or DELAY); when an instance is idle, a
batch is formed at once if the queued requests make up a preferred size or the batch cannot
grow, and otherwise once the oldest request waited max_queue_delay_us (see _next_batch).
Batches go to dedicated instance threads through a SimpleQueue and come back with
call_soon_threadsafe, so ONNX Runtime (which releases the GIL) never blocks the loop for long:
only a batch that the version's load-time calibration expects to run within
instance_group.inline_max_us runs on the loop itself, where it costs no thread hand-off and no
contention for the GIL, and once such a batch is measured running longer, none does again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from server.errors import (
    InferenceFailedError,
    InvalidRequestError,
    ModelUnavailableError,
    QueueFullError,
    RequestTimeoutError,
)
from server.metrics import ModelMetrics
from server.model_config import ModelConfig, QueuePolicy
from server.onnx_runner import RunCost
from server.precise_timer import PRECISE_TIMER, PreciseHandle

if TYPE_CHECKING:
    from server.tracing import Trace

log = logging.getLogger("featureserve.batcher")

INLINE_WEIGHT = 0.25
"""Weight of each batch run on the loop in the running average of its time over inline_max_us.
A run counts at most twice the limit, so it takes three slow runs in a row to end inline
running. A run counts its CPU time (times the session's intra-op threads) where that is less than
its wall time: time the loop thread spent descheduled (a busy host, a paused process) is not the
model's cost, and counting it ended inline running for good under a profiler."""
TIMER_RESOLUTION_S = 1e-3
"""asyncio waits on epoll, which rounds a timeout up to whole milliseconds, and uvloop counts its
timers in whole milliseconds, so a loop timer fires up to 1 ms late (a 200 µs queue delay
became ~1 ms). Alarms are armed that much early on the loop and their last part, shorter than
this, is kept by server.precise_timer (re-checking on every loop turn kept a core busy)."""
DEADLINE_GRACE_S = 1e-3
"""A queued request cancelled this close to its deadline counts timed_out, not cancelled: a
client's gRPC deadline also cancels the call from the client's side, and that cancel can reach
the server a little before the server's own copy of the deadline passes."""
JOINING = "joining the batch's inputs"
"""The stage of a batch that failed before ONNX Runtime ran it (no execution to count)."""

RunFn = Callable[[int, dict[str, np.ndarray], list[str] | None], dict[str, np.ndarray]]


@dataclass
class Duration:
    """A cumulative count and nanoseconds, as in Triton's StatisticDuration."""

    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        """Record count occurrences lasting ns in total."""
        self.count += count
        self.ns += ns


@dataclass
class BatchSizeStats:
    """Executions of one batch size (rows)."""

    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass
class BatcherStats:
    """Triton's per-model-version statistics, cumulative since load."""

    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    cache_hit: Duration = field(default_factory=Duration)
    cache_miss: Duration = field(default_factory=Duration)
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    batch_sizes: dict[int, BatchSizeStats] = field(default_factory=dict)

    def count_cache_hit(self, lookup_ns: int, total_ns: int) -> None:
        """A request answered from the response cache, by Triton's rules: a success (lasting
        total_ns) that waited in no queue, with no inference or execution counted."""
        self.cache_hit.add(lookup_ns)
        self.success.add(total_ns)
        self.queue.add(0)
        self.last_inference_ms = int(time.time() * 1000)

    def count_undelivered(self, ns: int, hit: bool) -> None:
        """A request already counted as a success (and a cache hit when hit) whose response
        then failed (its outputs could not be written to shared memory): a failure lasting ns
        instead. Its own share of the moved durations is not kept, so their mean is taken."""
        for moved in (self.success, self.cache_hit) if hit else (self.success,):
            moved.ns -= moved.ns // moved.count
            moved.count -= 1
        self.fail.add(ns)


@dataclass(eq=False, slots=True)
class _Request:
    """One queued request: its rows, where its result goes, and its scheduling facts.

    Times are time.monotonic(), not loop.time(): uvloop's loop time moves in whole milliseconds.
    deadline: when it is dropped unexecuted (the caller's deadline, and the
    queue-policy timeout under REJECT); late: when it moves behind the others (the queue-policy
    timeout under DELAY; None once delayed).
    """

    inputs: dict[str, np.ndarray]
    rows: int
    outputs: list[str] | None
    deadline: float | None
    late: float | None
    future: asyncio.Future
    enqueued: float
    key: tuple
    dispatched: float = 0.0
    limit: str = ""
    """What set the deadline when a queue timeout did (empty: the caller's deadline), to name
    in the error of a request dropped for it."""
    trace: Trace | None = None
    """Where its timestamps go when it is traced (server/tracing.py)."""


@dataclass(slots=True)
class _Alarm:
    """A scheduled callback and the time.monotonic() it is due; it may run early (see
    TIMER_RESOLUTION_S), so the callbacks check the time again."""

    handle: asyncio.Handle | PreciseHandle
    when: float


@dataclass(slots=True)
class _Outcome:
    """What executing one batch hands back; results None = the batch failed and its requests
    are still to run one by one."""

    results: list[dict[str, np.ndarray] | BaseException] | None
    input_ns: int
    infer_ns: int
    output_ns: int
    alone_ns: list[int] | None = None
    """When the batch failed and its requests then ran one by one: each one's run time."""
    ran: bool = True
    """Whether the failed batch reached ONNX Runtime (one more execution) or failed joining."""
    start_ns: int = 0
    """time.perf_counter_ns() when the batch started (0: the batch failed)."""


@dataclass(eq=False, slots=True)
class _Level:
    """One priority level's queue (Triton's PolicyQueue): its policy, its waiting requests, and
    those delayed by timeout_action "delay", which batch only after every waiting one."""

    number: int
    max_queue: int
    default_timeout_us: int
    override: bool
    delay: bool
    waiting: deque[_Request] = field(default_factory=deque)
    delayed: deque[_Request] = field(default_factory=deque)

    @classmethod
    def of(cls, number: int, policy: QueuePolicy) -> _Level:
        """An empty queue applying policy."""
        return cls(
            number,
            policy.max_queue_size,
            policy.default_timeout_us,
            policy.allow_timeout_override,
            policy.timeout_action == "delay",
        )

    def timeout_limit(self, timeout: int) -> str:
        """The queue timeout `timeout` (from timeout_us) in a dropped request's error: which
        setting it is and how to give requests more time."""
        queue = f"priority level {self.number} queue" if self.number else "queue"
        more = "add instances (instance_group.count) or lower the load"
        if timeout != self.default_timeout_us:
            cap = self.default_timeout_us
            upto = f" (up to default_timeout_us = {cap})" if cap else ""
            return f'its "timeout" of {timeout} µs passed; send a longer one{upto}, or {more}'

        return (
            f"default_timeout_us = {timeout} of the {queue} passed; raise it in the model's "
            f"config.toml, or {more}"
        )

    def timeout_us(self, requested: int | None) -> int:
        """The queue timeout (µs, 0 = none) of a request whose "timeout" parameter is
        `requested`: the default, which an allowed override may shorten but never extend."""
        default = self.default_timeout_us
        if requested and self.override and (not default or requested < default):
            return requested
        return default


def _batch_key(inputs: dict[str, np.ndarray]) -> tuple:
    """Requests batch together only when their inputs have the same names and per-row shapes."""
    return tuple((name, a.shape[1:]) for name, a in inputs.items())


class DynamicBatcher:
    """Queues requests, forms batches under Triton's rules, and runs them on N instance threads."""

    def __init__(
        self,
        config: ModelConfig,
        run: RunFn,
        *,
        name: str = "",
        metrics: ModelMetrics | None = None,
        cost: RunCost | None = None,
    ) -> None:
        self.config = config
        self.name = name or config.name
        self.metrics = metrics or ModelMetrics(config.name, "")
        self._run = run
        policy = config.dynamic_batching
        self._batching = config.batching
        self._max_rows = config.max_batch_size or 0
        self._delay_s = policy.max_queue_delay_us / 1e6 if self._batching else 0.0
        self._preferred = frozenset(policy.preferred_batch_sizes) if self._batching else frozenset()
        self._max_preferred = max(self._preferred, default=0)
        self._levels = policy.priority_levels
        default_level = (policy.default_priority_level or 1) if self._levels else 1
        numbers = range(1, self._levels + 1) if self._levels else (0,)
        self._queues = [_Level.of(n, policy.queue_policy(n)) for n in numbers]
        self._default_queue = self._queues[default_level - 1]
        self._queued = 0
        self._queued_rows = 0
        self._instances = config.instance_group.count
        self._cost = cost if config.instance_group.inline_max_us else None
        self._inline_us = config.instance_group.inline_max_us
        self._inline_ns = self._inline_us * 1000
        self._inline_load = 0.0
        self._run_threads = config.onnxruntime.intra_op_threads or os.cpu_count() or 1
        self._idle = self._instances
        self._in_flight = 0
        self._holds = 0
        self._closed = False
        self._drained: asyncio.Event | None = None
        self._kicked = False
        self._delay_alarm: _Alarm | None = None
        self._expiry_alarm: _Alarm | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self.stats = BatcherStats()

    @property
    def queued(self) -> int:
        """Requests waiting in the queue."""
        return self._queued

    def room(self, priority: int | None = None) -> int | None:
        """Requests the queue of `priority` can take now before it is full (None: no limit)."""
        level = self._level(priority)
        if not level.max_queue:
            return None
        return max(level.max_queue - len(level.waiting) - len(level.delayed), 0)

    def hold(self) -> None:
        """Keep the version open for a request that resolved it but submits later (a Predict
        waiting for its coalesced group): until release(), close() waits and submit() accepts.
        Raises ModelUnavailableError once the version is unloading."""
        if self._closed or self._loop is None:
            raise ModelUnavailableError(f"model '{self.name}' is unloading; retry")
        self._holds += 1

    def release(self, count: int = 1) -> None:
        """End `count` holds taken with hold()."""
        self._holds -= count
        self._maybe_drained()

    @property
    def busy_instances(self) -> int:
        """Instances executing a batch right now."""
        return self._instances - self._idle

    def start(self) -> None:
        """Bind to the running loop and start the instance threads."""
        self._loop = asyncio.get_running_loop()
        for instance in range(self._instances):
            thread = threading.Thread(
                target=self._worker, args=(instance,), name=f"{self.name}-i{instance}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

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
        """Queue rows for batched execution and return exactly this request's output rows.

        priority: 1 = highest, up to priority_levels; any other value (None, 0, negative or
        above priority_levels) = the default level, as in Triton's InferenceRequest::SetPriority.
        deadline: time.monotonic() at which the caller is gone: the request is dropped unexecuted,
        whatever its level's timeout_action.
        timeout_us: the request's own queue timeout, applied as its level's policy allows.
        trace: gets the request's queue start now and its compute timestamps once its batch
        ran.
        A request cancelled while queued leaves its queue at once, freeing its max_queue_size slot.
        While the version unloads, only requests of holders (see hold) are still taken.
        Raises QueueFullError, RequestTimeoutError, InferenceFailedError, ModelUnavailableError.
        """
        if self._loop is None or (self._closed and not self._holds):
            raise ModelUnavailableError(f"model '{self.name}' is unloading; retry")
        level = self._level(priority)
        if level.max_queue and len(level.waiting) + len(level.delayed) >= level.max_queue:
            raise self._queue_full(level)
        if self._max_rows and rows > self._max_rows:
            raise oversized_request(self.name, list(inputs), rows, self._max_rows)
        now = time.monotonic()
        late = None
        limit = ""
        timeout = level.timeout_us(timeout_us)
        if timeout and level.delay:
            late = now + timeout / 1e6
        elif timeout and (deadline is None or now + timeout / 1e6 <= deadline):
            deadline = now + timeout / 1e6
            limit = level.timeout_limit(timeout)
        future = self._loop.create_future()
        request = _Request(
            inputs,
            rows,
            outputs,
            deadline,
            late,
            future,
            now,
            _batch_key(inputs),
            limit=limit,
            trace=trace,
        )
        if trace is not None:
            trace.queue_start = int(now * 1e9)
        level.waiting.append(request)
        self._queued += 1
        self._queued_rows += rows
        self.metrics.queue_depth(self._queued)
        if not self._delay_s and self._runs_inline(self._queued_rows):
            self._dispatch()
            if future.done():
                return future.result()
        if deadline is not None:
            self._arm_expiry(deadline)
        if not self._kicked:
            self._kicked = True
            self._loop.call_soon(self._dispatch)
        try:
            return await future
        except asyncio.CancelledError:
            self._withdraw(level, request)
            raise

    def _level(self, priority: int | None) -> _Level:
        """The queue of a priority: levels 1 to priority_levels; any other value, or no levels
        at all, goes to the default level's queue."""
        if priority and 0 < priority <= self._levels:
            return self._queues[priority - 1]
        return self._default_queue

    def _withdraw(self, level: _Level, request: _Request) -> None:
        """Drop a cancelled request from its level's queue, if it is still there (counted
        cancelled, or timed_out when its deadline had come: gRPC cancels a call at its
        deadline)."""
        for q in (level.waiting, level.delayed):
            if request in q:
                q.remove(request)
                self._unqueue(request)
                self._expire(request, time.monotonic())
                return

    def _queue_full(self, level: _Level) -> QueueFullError:
        """Count a request refused by a full queue and name the queue and its limit."""
        self.stats.fail.add(0)
        self.metrics.fail("rejected")
        queue = f"priority level {level.number} queue" if level.number else "queue"
        return QueueFullError(
            f"model '{self.name}': {queue} holds max_queue_size={level.max_queue} requests; "
            "retry after a short wait, or raise max_queue_size in the model's config.toml"
        )

    def _dispatch(self) -> None:
        """Hand batches to idle instances (or run tiny ones inline) while the rules allow."""
        self._kicked = False
        while self._idle and self._queued:
            batch = self._next_batch(time.monotonic())
            if not batch:
                break
            self._idle -= 1
            self._in_flight += 1
            rows = sum(r.rows for r in batch)
            if not self._runs_inline(rows):
                self._jobs.put((batch, None))
                continue
            cpu_start = time.thread_time_ns()
            outcome = self._execute(0, batch, retry=False)
            cpu_ns = (time.thread_time_ns() - cpu_start) * self._run_threads
            ran_ns = min(outcome.input_ns + outcome.infer_ns + outcome.output_ns, cpu_ns)
            load = min(ran_ns / self._inline_ns, 2.0)
            self._inline_load += INLINE_WEIGHT * (load - self._inline_load)
            if self._inline_load > 1.0:
                self._stop_inline(rows, ran_ns)
            if outcome.results is None:
                self._jobs.put((batch, outcome))
            else:
                self._finish(batch, outcome)
        self._maybe_drained()

    def _runs_inline(self, rows: int) -> bool:
        """Whether a batch of `rows` rows is expected to run within inline_max_us."""
        return self._cost is not None and self._cost.predict_us(rows) <= self._inline_us

    def _stop_inline(self, rows: int, ran_ns: int) -> None:
        """Batches held the loop longer than inline_max_us on average: the load-time calibration
        (on zero inputs) misjudged this version, so none of its batches runs on the loop any
        more."""
        self._cost = None
        log.warning(
            "model '%s': batches ran longer than instance_group.inline_max_us=%d µs on the "
            "event loop on average (the last, of %d rows, %.0f µs); its batches now run on the "
            "instance threads",
            self.name,
            self._inline_us,
            rows,
            ran_ns / 1e3,
        )

    def _next_batch(self, now: float) -> list[_Request]:
        """Take the batch to run now under Triton's rules, or [] to wait for the queue delay.

        Requests join in priority then arrival order and are never split. The head batch goes
        at once when its first k requests add up to a preferred size (the largest such k), when
        it cannot grow (it holds max_batch_size rows, the next request would overflow it or the
        largest preferred size, or has other per-row shapes), when there is no queue delay, or
        when the oldest request has waited max_queue_delay_us; otherwise a timer is armed for
        that moment. As in Triton's GetDynamicBatch, a batch that the next request would push
        past the largest preferred size leaves as it is rather than wait for the delay.
        """
        head, preferred, closed = self._scan(now)
        if not head:
            return []
        due = min(q[0].enqueued for q in self._deques() if q) + self._delay_s
        if preferred and not (self._delay_s and now >= due):
            batch = head[:preferred]
        elif closed or now >= due or self._closed:
            batch = head
        else:
            self._arm_delay(due)
            return []
        taken = 0
        for q in self._deques():
            while q and taken < len(batch):
                request = q.popleft()
                self._unqueue(request)
                request.dispatched = now
                taken += 1
        return batch

    def _scan(self, now: float) -> tuple[list[_Request], int, bool]:
        """The longest run of queued requests that can form one batch, without dequeuing it.

        Returns (head, preferred, closed): head in priority then arrival order; preferred = how
        many of its first requests make the largest preferred batch size (0 = none); closed =
        the head cannot grow. Expired or cancelled requests met on the way are failed and
        removed, and late ones (timeout_action "delay") move behind their level's waiting ones,
        where this scan meets them again, so the head is exactly the front of the queues.
        """
        head: list[_Request] = []
        rows = 0
        preferred = 0
        closed = False
        dead: list[tuple[deque[_Request], _Request]] = []
        moved: list[tuple[deque[_Request], _Request]] = []
        for level, q, request in self._in_order():
            if request.future.done() or (request.deadline is not None and request.deadline <= now):
                dead.append((q, request))
                continue
            if request.late is not None and request.late <= now:
                request.late = None
                level.delayed.append(request)
                moved.append((q, request))
                continue
            if head and (
                not self._batching
                or rows + request.rows > self._max_rows
                or (self._max_preferred and rows + request.rows > self._max_preferred)
                or request.key != head[0].key
            ):
                closed = True
                break
            head.append(request)
            rows += request.rows
            if rows in self._preferred:
                preferred = len(head)
        for q, request in moved:
            q.remove(request)
        for q, request in dead:
            q.remove(request)
            self._unqueue(request)
            self._expire(request, now)
        full = rows >= self._max_rows or (self._max_preferred and rows > self._max_preferred)
        return head, preferred, closed or not self._batching or bool(full)

    def _in_order(self) -> Iterator[tuple[_Level, deque[_Request], _Request]]:
        """Every queued request with its level and queue, in batching order (see _deques)."""
        for level in self._queues:
            for q in (level.waiting, level.delayed):
                for request in q:
                    yield level, q, request

    def _deques(self) -> Iterator[deque[_Request]]:
        """The queues in batching order: highest priority first, each level's waiting requests
        (oldest first) before its delayed ones (in the order they were delayed)."""
        for level in self._queues:
            yield level.waiting
            yield level.delayed

    def _arm_delay(self, due: float) -> None:
        """Make sure _on_delay runs by `due`."""
        self._delay_alarm = self._rearm(self._delay_alarm, due, self._on_delay)

    def _on_delay(self) -> None:
        """The oldest request waited max_queue_delay: dispatch what is there."""
        self._delay_alarm = None
        self._dispatch()

    def _unqueue(self, request: _Request) -> None:
        """Account for a request leaving the queue."""
        self._queued -= 1
        self._queued_rows -= request.rows

    def _expire(self, request: _Request, now: float) -> None:
        """Fail a request, already taken off its queue, whose deadline passed before it ran, or
        drop one its caller cancelled before its deadline."""
        self.stats.fail.add(int((now - request.enqueued) * 1e9))
        timed_out = request.deadline is not None and request.deadline <= now + DEADLINE_GRACE_S
        self.metrics.fail("timed_out" if timed_out else "cancelled")
        self.metrics.queue_depth(self._queued)
        if not request.future.done():
            waited = f"{(now - request.enqueued) * 1e3:.3f} ms"
            limit = request.limit or (
                "the caller's deadline passed; call with a longer deadline, or lower the load"
            )
            request.future.set_exception(
                RequestTimeoutError(
                    f"model '{self.name}': request dropped after {waited} in the queue, before "
                    f"it ran: {limit}"
                )
            )
        self._maybe_drained()

    def _arm_expiry(self, deadline: float) -> None:
        """Make sure a timer fires by this deadline to drop expired queued requests."""
        self._expiry_alarm = self._rearm(self._expiry_alarm, deadline, self._on_expiry)

    def _rearm(self, alarm: _Alarm | None, due: float, callback: Callable[[], None]) -> _Alarm:
        """An alarm that runs callback by `due`: `alarm` itself when it is due no later."""
        if alarm is not None:
            if alarm.when <= due:
                return alarm
            alarm.handle.cancel()
        wait = due - time.monotonic()
        if wait <= 0 or (wait < TIMER_RESOLUTION_S and self._in_flight):
            # Due, or due soon while batches run: the loop turns often anyway, so re-check then
            # (the timer thread's hand-offs cost the busy loop the GIL: -15% Predict throughput).
            handle = self._loop.call_soon(callback)
        elif wait < TIMER_RESOLUTION_S:
            handle = PRECISE_TIMER.call_at(self._loop, due, callback)
        else:  # the loop's timer may fire up to TIMER_RESOLUTION_S late: ask it that much early
            handle = self._loop.call_at(due - TIMER_RESOLUTION_S, callback)
        return _Alarm(handle, due)

    def _on_expiry(self) -> None:
        """Drop every queued request whose deadline passed; re-arm for the next one."""
        self._expiry_alarm = None
        now = time.monotonic()
        for level in self._queues:
            level.waiting = self._drop_expired(level.waiting, now)
            level.delayed = self._drop_expired(level.delayed, now)
        upcoming = min(
            (r.deadline for q in self._deques() for r in q if r.deadline is not None),
            default=None,
        )
        if upcoming is not None:
            self._arm_expiry(upcoming)

    def _drop_expired(self, q: deque[_Request], now: float) -> deque[_Request]:
        """The requests of q whose deadline has not passed; the others are failed."""
        kept: deque[_Request] = deque()
        for request in q:
            if request.deadline is not None and request.deadline <= now:
                self._unqueue(request)
                self._expire(request, now)
            else:
                kept.append(request)
        return kept

    def _worker(self, instance: int) -> None:
        """Instance thread: execute batches (or, for a batch that failed on the loop, its
        requests one by one) until the sentinel None arrives."""
        while True:
            job = self._jobs.get()
            if job is None:
                return
            batch, failed = job
            if failed is not None:
                outcome = self._run_each(instance, batch, failed)
            else:
                outcome = self._execute(instance, batch)
            self._loop.call_soon_threadsafe(self._complete, batch, outcome)

    def _execute(self, instance: int, batch: list[_Request], *, retry: bool = True) -> _Outcome:
        """Join, run, check and cut a batch. Any error fails a lone request; a batch of several
        is run again one request at a time (here, or with retry=False by an instance thread:
        results None), so one bad request cannot fail or misroute its batch-mates' rows."""
        t0 = time.perf_counter_ns()
        t1 = t2 = 0
        stage = JOINING
        results: list[dict[str, np.ndarray] | BaseException] | None
        try:
            wanted = union_outputs(r.outputs for r in batch)
            if len(batch) == 1:
                rows = batch[0].rows
                feed = batch[0].inputs
            else:
                rows = sum(r.rows for r in batch)
                feed = {
                    name: np.concatenate([r.inputs[name] for r in batch])
                    for name in batch[0].inputs
                }
            t1 = time.perf_counter_ns()
            stage = "ONNX Runtime"
            merged = self._run(instance, feed, wanted)
            t2 = time.perf_counter_ns()
            stage = "splitting the batch's outputs"
            if self._max_rows:
                self._check_rows(merged, rows)
            if len(batch) == 1:
                results = [select_outputs(merged, batch[0].outputs)]
            else:
                results = []
                start = 0
                for r in batch:
                    stop = start + r.rows
                    results.append(
                        select_outputs({k: v[start:stop] for k, v in merged.items()}, r.outputs)
                    )
                    start = stop
        except Exception as exc:
            t1 = t1 or time.perf_counter_ns()
            t2 = time.perf_counter_ns()
            failed = _Outcome(None, t1 - t0, t2 - t1, 0, ran=stage != JOINING)
            if len(batch) == 1:
                failed.results = [self._failure(stage, exc)]
                return failed
            return self._run_each(instance, batch, failed) if retry else failed
        t3 = time.perf_counter_ns()
        return _Outcome(results, t1 - t0, t2 - t1, t3 - t2, start_ns=t0)

    def _run_each(self, instance: int, batch: list[_Request], failed: _Outcome) -> _Outcome:
        """The failed batch `failed` (its stage times) with its requests run one by one."""
        failed.results, failed.alone_ns = [], []
        for request in batch:
            start = time.perf_counter_ns()
            failed.results.append(self._run_alone(instance, request))
            failed.alone_ns.append(time.perf_counter_ns() - start)
        return failed

    def _run_alone(self, instance: int, request: _Request) -> dict[str, np.ndarray] | BaseException:
        """Run one request of a failed batch on its own; any error becomes its failure."""
        stage = "ONNX Runtime"
        try:
            result = self._run(instance, request.inputs, request.outputs)
            stage = "checking the outputs"
            if self._max_rows:
                self._check_rows(result, request.rows)
            return result
        except Exception as exc:
            return self._failure(stage, exc)

    def _check_rows(self, outputs: dict[str, np.ndarray], rows: int) -> None:
        """Raise InferenceFailedError unless every output's first dimension is `rows`: only then
        can a batch's outputs be cut into its requests' rows."""
        check_rows(
            self.name,
            outputs,
            rows,
            "max_batch_size > 0 makes its first dimension the batch dimension",
            "if the model's outputs do not keep one row per input row, set max_batch_size = 0 "
            "in its config.toml to turn batching off",
        )

    def _failure(self, stage: str, exc: Exception) -> InferenceFailedError:
        """What failed, as this request's InferenceFailedError (INTERNAL)."""
        if isinstance(exc, InferenceFailedError):
            return exc
        if stage == "ONNX Runtime":
            return InferenceFailedError(f"model '{self.name}': ONNX Runtime failed: {exc}")
        return InferenceFailedError(
            f"model '{self.name}': {stage} failed: {type(exc).__name__}: {exc}"
        )

    def _complete(self, batch: list[_Request], outcome: _Outcome) -> None:
        """On the loop: finish a batch an instance thread ran, then dispatch what waits."""
        self._finish(batch, outcome)
        if self._queued:
            self._dispatch()
        else:
            self._maybe_drained()

    def _finish(self, batch: list[_Request], outcome: _Outcome) -> None:
        """Deliver each request's result, record statistics, free the instance."""
        now = time.monotonic()
        stats = self.stats
        rows = sum(r.rows for r in batch)
        ok = ok_rows = 0
        for request, result in zip(batch, outcome.results, strict=True):
            total_ns = int((now - request.enqueued) * 1e9)
            if request.trace is not None:
                request.trace.ran(
                    outcome.start_ns,
                    outcome.input_ns,
                    outcome.infer_ns,
                    outcome.output_ns,
                )
            if isinstance(result, BaseException):
                stats.fail.add(total_ns)
                if not request.future.done():
                    request.future.set_exception(result)
                continue
            ok += 1
            ok_rows += request.rows
            stats.success.add(total_ns)
            stats.queue.add(int((request.dispatched - request.enqueued) * 1e9))
            stats.inference_count += request.rows
            if not request.future.done():
                request.future.set_result(result)
        if ok < len(batch):
            self.metrics.fail("error", len(batch) - ok)
        queue_s = max(r.dispatched - r.enqueued for r in batch)
        compute_ns = outcome.input_ns + outcome.infer_ns + outcome.output_ns
        compute_s = (compute_ns + sum(outcome.alone_ns or ())) / 1e9
        self.metrics.observe_batch(ok, ok_rows, rows, queue_s, compute_s)
        self.metrics.queue_depth(self._queued)
        stats.last_inference_ms = int(time.time() * 1000)
        if outcome.alone_ns is None:
            if ok:
                stats.compute_input.add(outcome.input_ns * ok, ok)
                stats.compute_infer.add(outcome.infer_ns * ok, ok)
                stats.compute_output.add(outcome.output_ns * ok, ok)
            if outcome.ran:
                self._count_execution(rows, outcome.input_ns, outcome.infer_ns, outcome.output_ns)
        else:
            # A failed attempt that ran is an execution of no batch size; each request ran alone.
            stats.execution_count += outcome.ran
            for request, result, ns in zip(batch, outcome.results, outcome.alone_ns, strict=True):
                if not isinstance(result, BaseException):
                    stats.compute_infer.add(ns)
                self._count_execution(request.rows, 0, ns, 0)
        self._idle += 1
        self._in_flight -= 1

    def _count_execution(self, rows: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        """One ONNX Runtime run of `rows` rows in ModelStatistics' execution and batch counts."""
        self.stats.execution_count += 1
        size = self.stats.batch_sizes.get(rows)
        if size is None:
            size = self.stats.batch_sizes[rows] = BatchSizeStats()
        size.compute_input.add(input_ns)
        size.compute_infer.add(infer_ns)
        size.compute_output.add(output_ns)

    def _maybe_drained(self) -> None:
        """Signal close() once nothing is queued, running or held."""
        if (
            self._drained is not None
            and not self._queued
            and not self._in_flight
            and not self._holds
        ):
            self._drained.set()

    async def close(self) -> None:
        """Stop taking requests, let queued, running and held ones finish, then stop the
        threads."""
        if self._loop is None:
            return
        self._closed = True
        self._drained = asyncio.Event()
        self._maybe_drained()
        if self._queued:
            self._dispatch()
        await self._drained.wait()
        for alarm in (self._delay_alarm, self._expiry_alarm):
            if alarm is not None:
                alarm.handle.cancel()
        for _ in self._threads:
            self._jobs.put(None)
        threads, self._threads = self._threads, []
        await asyncio.to_thread(lambda: [t.join() for t in threads])


def oversized_request(
    model: str, tensors: list[str], rows: int, max_batch_size: int
) -> InvalidRequestError:
    """The INVALID_ARGUMENT for inputs whose batch (first) dimension exceeds max_batch_size,
    naming each such tensor, the limit, and the fix."""
    names = ", ".join(f"'{name}'" for name in tensors)
    label = "input" if len(tensors) == 1 else "inputs"
    return InvalidRequestError(
        f"{label} {names}: batch dimension {rows} exceeds max_batch_size={max_batch_size} of "
        f"model '{model}'; split the request into parts of at most {max_batch_size} rows"
    )


def check_rows(model: str, outputs: dict[str, np.ndarray], rows: int, why: str, fix: str) -> None:
    """Raise InferenceFailedError (INTERNAL) naming the first output whose first dimension is
    not `rows`, why it must be, and the fix."""
    for name, array in outputs.items():
        if array.ndim and array.shape[0] == rows:
            continue
        raise InferenceFailedError(
            f"model '{model}': output '{name}' has shape {list(array.shape)}, but {why}, which "
            f"must equal the input rows ({rows}); {fix}"
        )


def union_outputs(requested: Iterable[list[str] | None]) -> list[str] | None:
    """The outputs any of several requests wants (None = all), each named once."""
    wanted: list[str] = []
    for outputs in requested:
        if outputs is None:
            return None
        wanted.extend(o for o in outputs if o not in wanted)
    return wanted


def select_outputs(
    results: dict[str, np.ndarray], outputs: list[str] | None
) -> dict[str, np.ndarray]:
    """Only the outputs a request asked for."""
    if outputs is None:
        return results
    return {name: results[name] for name in outputs}
