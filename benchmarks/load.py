"""Closed- and open-loop gRPC load from several client processes, merged into one LoadResult.

Each client process runs a grpc.aio event loop with its own channel(s). All processes share one
timeline on CLOCK_MONOTONIC: t0, then `warmup_s`, then the measured window of `duration_s`.
Throughput counts the successful requests that complete inside the window, in both modes.
Closed loop: `concurrency` callers each send a request as soon as the previous one returns; the
latencies are those of the requests completing inside the window. Open loop: requests are due on a
fixed schedule of `rate` per second and their latency runs from the due time, so a slow server is
charged for the requests it delayed (no coordinated omission); the latencies are those of the
requests due inside the window, however late they complete (up to the grace period).
Since event-loop timers are ms-granular, a request may leave up to 1 ms before its due time; its
latency then runs from the actual send, so a late send is charged and an early one is not credited.
Every loop is bounded by count and time; processes that overrun window + grace are killed.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import multiprocessing as mp
import multiprocessing.connection
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import grpc

from benchmarks import proc_stats
from benchmarks.histogram import Histogram
from benchmarks.scenarios import RequestFn, Scenario, get_scenario
from server import event_loop
from server.config import ServerConfig

CLOSED = "closed"
OPEN = "open"
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "[::1]", "::1"}
BACKLOG_ERROR = "CLIENT_BACKLOG"
CANCELLED_ERROR = "CLIENT_CANCELLED_AT_STOP"
_NS = 1_000_000_000
_START_DELAY_NS = 100_000_000
_READY_TIMEOUT_S = 60.0
# epoll waits in whole milliseconds, rounded up: wake up to 1 ms early rather than late.
_TIMER_SLACK_NS = 1_000_000


class LoadError(Exception):
    """Load could not run: bad spec, non-loopback target, or a client process failed to start."""


@dataclass
class LoadSpec:
    """How much load, of which shape, for how long, from how many processes."""

    mode: str = CLOSED
    concurrency: int = 1
    rate: float = 0.0
    processes: int = 2
    warmup_s: float = 1.0
    duration_s: float = 5.0
    grace_s: float = 5.0
    channels_per_process: int = 1
    max_outstanding: int = 10_000
    max_requests_per_process: int = 10_000_000

    def validate(self) -> None:
        """Raise LoadError naming the first bad field."""
        if self.mode not in (CLOSED, OPEN):
            raise LoadError(f"mode must be '{CLOSED}' or '{OPEN}', got '{self.mode}'")
        if self.mode == CLOSED and self.concurrency < 1:
            raise LoadError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.mode == OPEN and not self.rate > 0:
            raise LoadError(f"rate must be > 0 requests/s, got {self.rate}")
        if self.processes < 1 or self.channels_per_process < 1:
            raise LoadError("processes and channels_per_process must be >= 1")
        if self.duration_s <= 0 or self.warmup_s < 0 or self.grace_s <= 0:
            raise LoadError("duration_s and grace_s must be > 0 and warmup_s >= 0")

    def shares(self) -> list[float]:
        """Per-process concurrency (closed) or rate (open); never more processes than callers."""
        if self.mode == CLOSED:
            n = min(self.processes, self.concurrency)
            base, extra = divmod(self.concurrency, n)
            return [float(base + (i < extra)) for i in range(n)]
        return [self.rate / self.processes] * self.processes


@dataclass
class LoadResult:
    """Merged figures of one load run."""

    histogram: Histogram
    completed: int
    errors: dict[str, int]
    duration_s: float
    client_cpu_s: float
    server_cpu_s: float | None
    server_rss_bytes: int | None
    processes: int
    processes_killed: int
    send_lag: Histogram = field(default_factory=Histogram)

    @property
    def throughput_rps(self) -> float:
        """Successful requests completed per second of the measured window."""
        return self.completed / self.duration_s

    def cpu_us_per_request(self, cpu_s: float | None) -> float | None:
        """CPU microseconds per successful request, None when unknown or nothing completed."""
        if cpu_s is None or self.completed == 0:
            return None
        return cpu_s * 1e6 / self.completed


@dataclass
class _Job:
    """What a client process receives: only picklable values, never live objects."""

    index: int
    scenario_module: str
    scenario_name: str
    args: argparse.Namespace
    target: str
    spec: LoadSpec
    share: float


def check_loopback(target: str) -> None:
    """Refuse any target that is not on this machine's loopback interface."""
    host = target.rsplit(":", 1)[0]
    if host not in LOOPBACK_HOSTS:
        raise LoadError(
            f"target '{target}' is not a loopback address; the harness only loads "
            f"127.0.0.1, localhost or [::1]"
        )


def channel_options() -> list[tuple[str, Any]]:
    """Client channel options matching the server's message limits; one connection per channel."""
    limit = ServerConfig().max_message_bytes
    return [
        ("grpc.max_send_message_length", limit),
        ("grpc.max_receive_message_length", limit),
        ("grpc.use_local_subchannel_pool", 1),
    ]


def run_load(
    scenario: Scenario,
    args: argparse.Namespace,
    target: str,
    spec: LoadSpec,
    server_pid: int | None = None,
) -> LoadResult:
    """Run one load point from spec.processes client processes and merge their results."""
    spec.validate()
    check_loopback(target)
    ctx = mp.get_context("spawn")
    workers: list[tuple[mp.process.BaseProcess, mp.connection.Connection]] = []
    try:
        for index, share in enumerate(spec.shares()):
            job = _Job(index, type(scenario).__module__, scenario.name, args, target, spec, share)
            parent_end, child_end = ctx.Pipe()
            process = ctx.Process(target=_worker_main, args=(job, child_end), daemon=True)
            process.start()
            child_end.close()
            workers.append((process, parent_end))
        _await_ready(workers)
        t0 = time.monotonic_ns() + _START_DELAY_NS
        for _, conn in workers:
            conn.send(t0)
        return _observe(workers, spec, t0, server_pid)
    finally:
        for process, conn in workers:
            process.join(timeout=1.0)
            if process.is_alive():
                process.kill()
                process.join()
            conn.close()


def _await_ready(workers: list[tuple[mp.process.BaseProcess, mp.connection.Connection]]) -> None:
    """Wait until every client process has connected; raise the first failure."""
    deadline = time.monotonic() + _READY_TIMEOUT_S
    for process, conn in workers:
        if not conn.poll(max(deadline - time.monotonic(), 0.0)):
            raise LoadError(
                f"client process {process.pid} not ready after {_READY_TIMEOUT_S:.0f} s "
                "(is the target up?)"
            )
        try:
            kind, payload = conn.recv()
        except EOFError:
            raise LoadError(
                f"client process {process.pid} exited during start (code {process.exitcode})"
            ) from None
        if kind != "ready":
            raise LoadError(f"client process {process.pid} failed to start: {payload}")


def _sleep_until_ns(deadline_ns: int) -> None:
    """Block the calling thread until CLOCK_MONOTONIC reaches deadline_ns."""
    left = deadline_ns - time.monotonic_ns()
    if left > 0:
        time.sleep(left / _NS)


def _observe(
    workers: list[tuple[mp.process.BaseProcess, mp.connection.Connection]],
    spec: LoadSpec,
    t0: int,
    server_pid: int | None,
) -> LoadResult:
    """Sample the server over the window, then gather results until window end + grace."""
    window_start = t0 + int(spec.warmup_s * _NS)
    window_end = window_start + int(spec.duration_s * _NS)
    _sleep_until_ns(window_start)
    before = proc_stats.sample(server_pid) if server_pid else None
    _sleep_until_ns(window_end)
    after = proc_stats.sample(server_pid) if server_pid else None
    server_cpu = after.cpu_s - before.cpu_s if before and after and after.processes else None
    hard_stop = window_end + int(spec.grace_s * _NS)
    merged = Histogram()
    lag = Histogram()
    errors: Counter[str] = Counter()
    completed = 0
    client_cpu = 0.0
    killed = 0
    for process, conn in workers:
        left = max(hard_stop - time.monotonic_ns(), 0) / _NS
        message = conn.recv() if conn.poll(left) else None
        if message is None or message[0] != "result":
            killed += 1
            if message is not None:
                errors[f"CLIENT_PROCESS_FAILED: {message[1]}"] += 1
            process.kill()
            continue
        result = message[1]
        merged.merge(Histogram.from_dict(result["histogram"]))
        lag.merge(Histogram.from_dict(result["send_lag"]))
        errors.update(result["errors"])
        completed += result["completed"]
        client_cpu += result["cpu_s"]
    return LoadResult(
        histogram=merged,
        completed=completed,
        errors=dict(errors),
        duration_s=spec.duration_s,
        client_cpu_s=client_cpu,
        server_cpu_s=server_cpu,
        server_rss_bytes=after.rss_bytes if after and after.processes else None,
        processes=len(workers),
        processes_killed=killed,
        send_lag=lag,
    )


def _worker_main(job: _Job, conn: mp.connection.Connection) -> None:
    """Entry point of a client process: run the job and send back its result or its failure."""
    try:
        event_loop.run(_worker(job, conn))
    except Exception as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


async def _worker(job: _Job, conn: mp.connection.Connection) -> None:
    """Connect, report ready, wait for t0, run the load and send the result."""
    __import__(job.scenario_module)
    scenario = get_scenario(job.scenario_name)
    channels = [
        grpc.aio.insecure_channel(job.target, options=channel_options())
        for _ in range(job.spec.channels_per_process)
    ]
    try:
        for channel in channels:
            await asyncio.wait_for(channel.channel_ready(), timeout=_READY_TIMEOUT_S / 2)
        fns = [scenario.make_request_fn(job.args, channel) for channel in channels]
        conn.send(("ready", None))
        t0 = conn.recv()
        window = _Window(job, t0)
        cpu_task = asyncio.create_task(window.sample_cpu())
        if job.spec.mode == CLOSED:
            await _closed_loop(fns, window, job)
        else:
            await _open_loop(fns, window, job)
        await cpu_task
        conn.send(("result", window.result()))
    finally:
        for channel in channels:
            await channel.close(grace=None)


class _Window:
    """One client process's measured window: its bounds and what was recorded inside it."""

    def __init__(self, job: _Job, t0: int) -> None:
        self.t0 = t0
        self.start = t0 + int(job.spec.warmup_s * _NS)
        self.end = self.start + int(job.spec.duration_s * _NS)
        self.stop = self.end + int(job.spec.grace_s * _NS / 2)
        self.histogram = Histogram()
        self.send_lag = Histogram()
        self.errors: Counter[str] = Counter()
        self.completed = 0
        self.cpu = [0.0, 0.0]

    def inside(self, t_ns: int) -> bool:
        """Whether t_ns falls in the measured window."""
        return self.start <= t_ns < self.end

    async def sample_cpu(self) -> None:
        """Read this process's CPU time (all threads, gRPC's included) at window start and end."""
        await _sleep_until(self.start)
        self.cpu[0] = time.process_time()
        await _sleep_until(self.end)
        self.cpu[1] = time.process_time()

    def result(self) -> dict[str, Any]:
        """Picklable summary sent to the parent."""
        return {
            "histogram": self.histogram.to_dict(),
            "send_lag": self.send_lag.to_dict(),
            "errors": dict(self.errors),
            "completed": self.completed,
            "cpu_s": max(self.cpu[1] - self.cpu[0], 0.0),
        }


async def _sleep_until(deadline_ns: int) -> None:
    """Sleep on the event loop until CLOCK_MONOTONIC reaches deadline_ns."""
    left = deadline_ns - time.monotonic_ns()
    if left > 0:
        await asyncio.sleep(left / _NS)


async def _call(fn: RequestFn) -> str | None:
    """Send one request; None on success, else the gRPC status name or the exception type."""
    try:
        await fn()
    except grpc.aio.AioRpcError as exc:
        return exc.code().name
    except Exception as exc:
        return f"CLIENT_{type(exc).__name__}"
    return None


async def _finish(tasks: set[asyncio.Task[None]], window: _Window) -> None:
    """Let in-flight requests end until the process's stop time, then cancel the rest."""
    timeout = max(window.stop - time.monotonic_ns(), 0) / _NS
    if tasks:
        _, late = await asyncio.wait(tasks, timeout=timeout)
        for task in late:
            task.cancel()
        if late:
            await asyncio.wait(late, timeout=1.0)


async def _closed_loop(fns: list[RequestFn], window: _Window, job: _Job) -> None:
    """job.share callers, each sending its next request when the previous one returns."""
    callers = int(job.share)
    budget = max(job.spec.max_requests_per_process // callers, 1)

    async def caller(fn: RequestFn) -> None:
        for _ in range(budget):
            sent = time.monotonic_ns()
            if sent >= window.end:
                return
            try:
                code = await _call(fn)
            except asyncio.CancelledError:
                if window.inside(sent):
                    window.errors[CANCELLED_ERROR] += 1
                raise
            done = time.monotonic_ns()
            if not window.inside(done):
                continue
            if code is None:
                window.histogram.record(done - sent)
                window.completed += 1
            else:
                window.errors[code] += 1

    await _sleep_until(window.t0)
    tasks = {asyncio.create_task(caller(fns[i % len(fns)])) for i in range(callers)}
    await _finish(tasks, window)


async def _open_loop(fns: list[RequestFn], window: _Window, job: _Job) -> None:
    """Send requests due every 1/job.share seconds; latency runs from each request's due time."""
    interval_ns = _NS / job.share
    processes = len(job.spec.shares())
    first = window.t0 + int(interval_ns * job.index / processes)
    total = min(math.ceil((window.end - first) / interval_ns), job.spec.max_requests_per_process)
    pending: set[asyncio.Task[None]] = set()

    async def one(fn: RequestFn, due: int) -> None:
        sent = time.monotonic_ns()
        if window.inside(due):
            window.send_lag.record(max(sent - due, 0))
        try:
            code = await _call(fn)
        except asyncio.CancelledError:
            if window.inside(due):
                window.errors[CANCELLED_ERROR] += 1
            raise
        done = time.monotonic_ns()
        if code is None and window.inside(done):
            window.completed += 1
        if not window.inside(due):
            return
        if code is None:
            window.histogram.record(done - min(due, sent))
        else:
            window.errors[code] += 1

    for k in range(total):
        due = first + int(k * interval_ns)
        now = time.monotonic_ns()
        if now >= window.stop:
            window.errors[BACKLOG_ERROR] += sum(
                window.inside(first + int(j * interval_ns)) for j in range(k, total)
            )
            break
        if due - now > _TIMER_SLACK_NS:
            await asyncio.sleep((due - now - _TIMER_SLACK_NS) / _NS)
        elif k % 32 == 0:
            await asyncio.sleep(0)
        if len(pending) >= job.spec.max_outstanding:
            if window.inside(due):
                window.errors[BACKLOG_ERROR] += 1
            continue
        task = asyncio.create_task(one(fns[k % len(fns)], due))
        pending.add(task)
        task.add_done_callback(pending.discard)
    await _finish(set(pending), window)
