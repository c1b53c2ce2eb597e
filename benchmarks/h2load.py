"""Optional native load generator: h2load (Debian nghttp2-client) driving a unary gRPC method.

The request is pre-framed once (gRPC's 5-byte prefix + serialized message) into a file that h2load
posts on every stream. h2load sees HTTP status only, never the grpc-status trailer, and a gRPC
error comes as HTTP 200; but an error carries no DATA and an answer to the one fixed request
carries exactly the DATA of one real call made before the run, so the calls that failed are the
200 streams that h2load's total of DATA bytes ("traffic: ... data") does not cover. The warm-up is
an h2load process of its own, so the measured run's DATA total is its own. When -D expires,
h2load adds the DATA of streams still receiving (started - done in its "requests:" line) but logs
no latency for them: the total may exceed the logged answers by up to that many answers, which
leaves up to that many failed calls uncertain. A run whose DATA covers every logged answer counts
no failed call; one that does not counts the most failed calls its DATA allows. h2load 1.52's log
has no per-request sizes, so a point with failed calls reports no latencies.
Closed loop runs `concurrency` streams in flight exactly: as many clients as the largest divisor
of it not above --processes. Open loop runs one h2load client at --rps: it sends on a timer and,
when every stream is busy, later, so its own timings omit the wait. Its log lists each request's
send time, so the k-th request sent is the k-th of the schedule, and its latency is counted from
that intended time (as wrk2 does): no coordinated omission. The run goes on for a tail after the
window so requests due in it can finish; those due but not answered by then are CLIENT_BACKLOG.
"""

from __future__ import annotations

import re
import resource
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from benchmarks import proc_stats
from benchmarks.histogram import Histogram
from benchmarks.load import (
    BACKLOG_ERROR,
    CLOSED,
    OPEN,
    LoadResult,
    LoadSpec,
    check_loopback,
)

EXECUTABLE = "h2load"
STREAM_FAILED = "H2_STREAM_FAILED"
GRPC_ERROR = "grpc_error"
"""Calls that got a gRPC error under load: h2load cannot say which status."""
CHECK_TIMEOUT_S = 30.0
OPEN_TAIL_S = 1.0
"""Open loop: how long after the window requests due in it may still finish (capped by grace)."""
DATA_BYTES = re.compile(r"^traffic: .*\((\d+)\) data$", re.MULTILINE)
REQUESTS = re.compile(r"^requests: \d+ total, (\d+) started, (\d+) done", re.MULTILINE)
MAX_OPEN_STREAMS = 1024
"""Streams one open-loop client keeps in flight; past that, requests wait in h2load, and the
intended-time latencies count the wait."""


class H2LoadError(Exception):
    """h2load is missing or failed; the message says how to install it or what it printed."""


def available() -> bool:
    """Whether h2load is on PATH."""
    return shutil.which(EXECUTABLE) is not None


def frame(message: bytes) -> bytes:
    """A gRPC length-prefixed message: uncompressed flag, 4-byte big-endian length, body."""
    return struct.pack(">BI", 0, len(message)) + message


def _duration(seconds: float) -> str:
    """h2load's <DURATION>: an integer with a unit ("0.3" is refused, "300ms" is not)."""
    return f"{round(seconds * 1000)}ms"


def closed_clients(concurrency: int, processes: int) -> int:
    """The largest divisor of concurrency not above processes: h2load runs the same streams on
    every client, so only a divisor keeps exactly `concurrency` in flight."""
    return max(d for d in range(1, min(concurrency, processes) + 1) if concurrency % d == 0)


def command(
    target: str,
    method: str,
    body_path: Path,
    log_path: Path | None,
    spec: LoadSpec,
    seconds: float,
    metadata: tuple[tuple[str, str], ...] = (),
) -> list[str]:
    """The h2load argv of one run of `seconds` at spec's load, logging to log_path if given."""
    argv = [
        EXECUTABLE,
        "-D",
        _duration(seconds),
        "-d",
        str(body_path),
        "-H",
        "content-type: application/grpc",
        "-H",
        "te: trailers",
    ]
    if log_path is not None:
        argv += ["--log-file", str(log_path)]
    for key, value in metadata:
        argv += ["-H", f"{key}: {value}"]
    if spec.mode == CLOSED:
        clients = closed_clients(spec.concurrency, spec.processes)
        streams = spec.concurrency // clients
        argv += ["-c", str(clients), "-t", str(clients), "-m", str(streams)]
    else:
        streams = min(spec.max_outstanding, MAX_OPEN_STREAMS)
        rps = max(round(spec.rate), 1)
        argv += ["-c", "1", "-t", "1", "-m", str(streams), "--rps", str(rps)]
    return [*argv, f"http://{target}{method}"]


@dataclass(frozen=True)
class RequestLog:
    """The measured run's --log-file."""

    latencies_ns: np.ndarray
    """Latencies of the window's HTTP-200 streams (answers and gRPC errors alike)."""
    in_window: int
    """Of those, the ones that ended inside the window (the open loop's tail excluded)."""
    answered: int
    """HTTP-200 streams of the whole run, tail included (the span of h2load's DATA total)."""
    stream_failed: int
    """Streams of the window that failed below gRPC (reset, connection lost)."""
    logged: int
    """Streams of the window h2load logged at all (open loop: due in it)."""


def parse_log(text: str, duration_s: float | None = None, rate: float = 0.0) -> RequestLog:
    """Parse --log-file of a measured run. Closed loop: every request is the window's. Open loop
    (rate): the window's requests are those due in the first duration_s, and each latency runs
    from the request's intended send time: the schedule is anchored where the requests ran least
    late, and request k (in send order) was due k / rate after that."""
    rows = [line.split("\t") for line in text.splitlines() if line.strip()]
    if not rows:
        return RequestLog(np.zeros(0, dtype=np.int64), 0, 0, 0, 0)
    start_us = np.array([int(row[0]) for row in rows], dtype=np.int64)
    status = np.array([int(row[1]) for row in rows])
    elapsed_us = np.array([int(row[2]) for row in rows], dtype=np.int64)
    order = np.argsort(start_us, kind="stable")
    start_us, status, elapsed_us = start_us[order], status[order], elapsed_us[order]
    ok = status == 200
    measured = np.ones(len(rows), dtype=bool)
    ended_inside = measured
    if rate:
        due_us = np.arange(len(rows)) * 1e6 / rate
        ahead = start_us - due_us
        elapsed_us = elapsed_us + np.round(ahead - ahead.min()).astype(np.int64)
        if duration_s is not None:
            measured = due_us < duration_s * 1e6
            ended_inside = due_us + elapsed_us < duration_s * 1e6
    return RequestLog(
        latencies_ns=elapsed_us[ok & measured] * 1000,
        in_window=int((ok & measured & ended_inside).sum()),
        answered=int(ok.sum()),
        stream_failed=int((~ok & measured).sum()),
        logged=int(measured.sum()),
    )


def check_call(
    target: str, method: str, message: bytes, metadata: tuple[tuple[str, str], ...] = ()
) -> tuple[int | None, str | None]:
    """Make one real call of the request h2load will send: (DATA bytes of its answer, None), or
    (None, the status name) when it fails."""
    with grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", -1)]) as chan:
        try:
            answer = chan.unary_unary(method)(message, timeout=CHECK_TIMEOUT_S, metadata=metadata)
        except grpc.RpcError as exc:
            return None, exc.code().name
    return len(frame(answer)), None


def data_bytes(output: str) -> int:
    """The DATA bytes of the run, from h2load's summary line "traffic: ... (N) data"."""
    found = DATA_BYTES.search(output)
    if found is None:
        raise H2LoadError(f"h2load printed no 'traffic: ... data' line: {output.strip()[-2000:]}")
    return int(found.group(1))


def unfinished(output: str) -> int:
    """Streams still open when -D expired (started - done of h2load's "requests:" line): their
    DATA is in the total, their latency in no log."""
    found = REQUESTS.search(output)
    if found is None:
        raise H2LoadError(f"h2load printed no 'requests: ...' line: {output.strip()[-2000:]}")
    return int(found.group(1)) - int(found.group(2))


def grpc_errors(
    log: RequestLog,
    data: int,
    response_bytes: int | None,
    check_error: str | None,
    open_streams: int = 0,
) -> dict[str, int]:
    """gRPC errors among the window's HTTP-200 streams, by status name when known.

    An error carries no DATA and an answer exactly response_bytes; the open_streams cut at the
    end carried up to that much each. DATA covering every answered stream leaves no certain
    failed call (at most open_streams hidden ones); DATA short of it makes failures certain, and
    the window is charged the most the DATA allows, never more than its answered streams. When
    the check call failed (check_error), a run with no DATA failed throughout with that status."""
    window = log.latencies_ns.size
    if response_bytes is None:
        if data:
            raise H2LoadError(
                f"the check call failed with {check_error} but {data} bytes of answers came back "
                "during the run, so h2load's failed calls cannot be counted; rerun, or use "
                "--generator python"
            )
        return {check_error: window} if window else {}
    surplus = data - log.answered * response_bytes
    if surplus > open_streams * response_bytes:
        raise H2LoadError(
            f"the run's DATA exceeds its {log.answered} logged answers x {response_bytes} bytes "
            f"(the check call's answer) by {surplus} bytes, more than its {open_streams} streams "
            "cut at the end can carry: the answer size varies, so h2load's failed calls cannot "
            "be counted; use --generator python"
        )
    if surplus >= 0:
        return {}
    most = (open_streams * response_bytes - surplus) // response_bytes
    charged = min(most, window)
    return {GRPC_ERROR: charged} if charged else {}


def _run(argv: list[str], timeout_s: float) -> tuple[str, int]:
    """Run h2load to its end (killed after timeout_s): (its output, 1 if killed else 0)."""
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.communicate()[0], 1
    if process.returncode != 0:
        raise H2LoadError(f"h2load exited {process.returncode}: {output.strip()[-2000:]}")
    return output, 0


def run_h2load(
    target: str,
    method: str,
    message: bytes,
    spec: LoadSpec,
    server_pid: int | None,
    metadata: tuple[tuple[str, str], ...] = (),
) -> LoadResult:
    """Run h2load for one load point (a warm-up process, then the measured one) and return the
    same figures as the Python generator; metadata is sent as headers on every stream."""
    if not available():
        raise H2LoadError(
            "h2load not found: apt-get install -y nghttp2-client, or use --generator python"
        )
    spec.validate()
    check_loopback(target)
    response_bytes, check_error = check_call(target, method, message, metadata)
    tail_s = min(OPEN_TAIL_S, spec.grace_s) if spec.mode == OPEN else 0.0
    with tempfile.TemporaryDirectory(prefix="bench-h2load-") as tmp:
        body_path = Path(tmp) / "body.bin"
        log_path = Path(tmp) / "requests.log"
        body_path.write_bytes(frame(message))
        if spec.warmup_s > 0:
            warmup = command(target, method, body_path, None, spec, spec.warmup_s, metadata)
            _run(warmup, spec.warmup_s + spec.grace_s)
        argv = command(
            target, method, body_path, log_path, spec, spec.duration_s + tail_s, metadata
        )
        server_before = proc_stats.sample(server_pid) if server_pid else None
        client_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        output, killed = _run(argv, spec.duration_s + tail_s + spec.grace_s)
        client_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        server_after = proc_stats.sample(server_pid) if server_pid else None
        text = log_path.read_text() if log_path.exists() else ""
    if not text.strip():
        raise H2LoadError(f"h2load logged no request (cannot connect?): {output.strip()[-2000:]}")
    rate = spec.rate if spec.mode == OPEN else 0.0
    log = parse_log(text, spec.duration_s, rate)
    errors = grpc_errors(log, data_bytes(output), response_bytes, check_error, unfinished(output))
    completed = max(log.in_window - sum(errors.values()), 0)
    histogram = Histogram()
    if not errors:
        histogram.record_many(log.latencies_ns)
    if log.stream_failed:
        errors[STREAM_FAILED] = log.stream_failed
    if rate and int(spec.duration_s * rate) > log.logged:
        errors[BACKLOG_ERROR] = int(spec.duration_s * rate) - log.logged
    server_cpu = None
    if server_before and server_after and server_after.processes:
        server_cpu = server_after.cpu_s - server_before.cpu_s
    client_cpu = sum(
        getattr(client_after, f) - getattr(client_before, f) for f in ("ru_utime", "ru_stime")
    )
    return LoadResult(
        histogram=histogram,
        completed=completed,
        errors=errors,
        duration_s=spec.duration_s,
        client_cpu_s=max(client_cpu, 0.0),
        server_cpu_s=server_cpu,
        server_rss_bytes=server_after.rss_bytes if server_after else None,
        processes=1,
        processes_killed=killed,
    )
