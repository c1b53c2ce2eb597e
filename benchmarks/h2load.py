"""Optional native load generator: h2load (Debian nghttp2-client) driving a unary gRPC method.

The request is pre-framed once (gRPC's 5-byte prefix + serialized message) into a file that h2load
posts on every stream. h2load sees HTTP status only, never the grpc-status trailer, and a gRPC
error comes as HTTP 200; but an error carries no DATA and an answer to the one fixed request
carries exactly the DATA of one real call made before the run, so the calls that failed are the
200 streams that h2load's total of DATA bytes ("traffic: ... data") does not cover. That total
includes h2load's own warm-up, so the run has none: it lasts warm-up + duration, the warm-up
requests are dropped from the log here, and the measured window is charged its share of the
run's failed calls. h2load 1.52's log has no per-request sizes, so a point
with failed calls reports no latencies (failed calls are usually the fast ones).
Open loop runs one h2load client at --rps: it sends on a timer and, when every stream is
busy, later, so its own timings omit the wait. Its log lists each request's send time, so the k-th
request sent is the k-th of the schedule, and its latency is counted from that intended time
(as wrk2 does): no coordinated omission.
"""

from __future__ import annotations

import math
import re
import shutil
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from benchmarks import proc_stats
from benchmarks.histogram import Histogram
from benchmarks.load import CLOSED, OPEN, LoadResult, LoadSpec, check_loopback

EXECUTABLE = "h2load"
STREAM_FAILED = "H2_STREAM_FAILED"
GRPC_ERROR = "grpc_error"
"""Calls that got a gRPC error under load: h2load cannot say which status."""
CHECK_TIMEOUT_S = 30.0
DATA_BYTES = re.compile(r"^traffic: .*\((\d+)\) data$", re.MULTILINE)
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


def command(
    target: str,
    method: str,
    body_path: Path,
    log_path: Path,
    spec: LoadSpec,
    metadata: tuple[tuple[str, str], ...] = (),
) -> list[str]:
    """The h2load argv for one load point: clients = min(processes, concurrency); one run of
    warm-up + duration (h2load's own warm-up would add its DATA to the run's total)."""
    argv = [
        EXECUTABLE,
        "-D",
        _duration(spec.warmup_s + spec.duration_s),
        "-d",
        str(body_path),
        "-H",
        "content-type: application/grpc",
        "-H",
        "te: trailers",
        "--log-file",
        str(log_path),
    ]
    for key, value in metadata:
        argv += ["-H", f"{key}: {value}"]
    if spec.mode == CLOSED:
        clients = min(spec.processes, spec.concurrency)
        streams = math.ceil(spec.concurrency / clients)
        argv += ["-c", str(clients), "-t", str(clients), "-m", str(streams)]
    else:
        streams = min(spec.max_outstanding, MAX_OPEN_STREAMS)
        rps = max(round(spec.rate), 1)
        argv += ["-c", "1", "-t", "1", "-m", str(streams), "--rps", str(rps)]
    return [*argv, f"http://{target}{method}"]


@dataclass(frozen=True)
class RequestLog:
    """h2load's --log-file, split at the end of the warm-up."""

    latencies_ns: np.ndarray
    """Latencies of the measured window's HTTP-200 streams (answers and gRPC errors alike)."""
    answered: int
    """HTTP-200 streams of the run, warm-up included (the span of h2load's DATA total)."""
    stream_failed: int
    """Streams of the measured window that failed below gRPC (reset, connection lost)."""


def parse_log(text: str, warmup_s: float = 0.0, rate: float = 0.0) -> RequestLog:
    """Parse --log-file; a request belongs to the measured window when it was sent (closed loop)
    or due (open loop) warmup_s or more after the first.

    With rate (one open-loop client), each latency runs from the request's intended send time:
    the schedule is anchored where the requests ran least late, and request k (in send order)
    was due k / rate after that.
    """
    rows = [line.split("\t") for line in text.splitlines() if line.strip()]
    if not rows:
        return RequestLog(np.zeros(0, dtype=np.int64), 0, 0)
    start_us = np.array([int(row[0]) for row in rows], dtype=np.int64)
    status = np.array([int(row[1]) for row in rows])
    elapsed_us = np.array([int(row[2]) for row in rows], dtype=np.int64)
    order = np.argsort(start_us, kind="stable")
    start_us, status, elapsed_us = start_us[order], status[order], elapsed_us[order]
    if rate:
        due_us = np.arange(len(rows)) * 1e6 / rate
        ahead = start_us - due_us
        elapsed_us = elapsed_us + np.round(ahead - ahead.min()).astype(np.int64)
        measured = due_us >= warmup_s * 1e6
    else:
        measured = start_us >= start_us[0] + warmup_s * 1e6
    ok = status == 200
    return RequestLog(
        latencies_ns=elapsed_us[ok & measured] * 1000,
        answered=int(ok.sum()),
        stream_failed=int((~ok & measured).sum()),
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


def grpc_errors(
    log: RequestLog, data: int, response_bytes: int | None, check_error: str | None
) -> dict[str, int]:
    """gRPC errors among the window's HTTP-200 streams, by status name when known.

    An error carries no DATA and an answer exactly response_bytes, so the run's failed calls are
    the answered streams its DATA does not cover. That count spans the warm-up too, and the log
    cannot say which calls failed, so the window is charged its share of them, rounded up (one
    failed call anywhere leaves the window at least one error). When the check call failed
    (check_error), a run with no DATA failed throughout with that status."""
    window = log.latencies_ns.size
    if response_bytes is None:
        if data:
            raise H2LoadError(
                f"the check call failed with {check_error} but {data} bytes of answers came back "
                "during the run, so h2load's failed calls cannot be counted; rerun, or use "
                "--generator python"
            )
        return {check_error: window} if window else {}
    missing = log.answered * response_bytes - data
    if missing < 0:
        raise H2LoadError(
            f"the run's answers carried {-missing} bytes more than {log.answered} x "
            f"{response_bytes} (the check call's answer): the answer size varies, so h2load's "
            "failed calls cannot be counted; use --generator python"
        )
    failed = -(-missing // response_bytes)
    charged = -(-failed * window // log.answered) if log.answered else 0
    return {GRPC_ERROR: charged} if charged else {}


def run_h2load(
    target: str,
    method: str,
    message: bytes,
    spec: LoadSpec,
    server_pid: int | None,
    metadata: tuple[tuple[str, str], ...] = (),
) -> LoadResult:
    """Run h2load for one load point and return the same figures as the Python generator;
    metadata is sent as headers on every stream (e.g. the bearer token)."""
    if not available():
        raise H2LoadError(
            "h2load not found: apt-get install -y nghttp2-client, or use --generator python"
        )
    spec.validate()
    check_loopback(target)
    response_bytes, check_error = check_call(target, method, message, metadata)
    with tempfile.TemporaryDirectory(prefix="bench-h2load-") as tmp:
        body_path = Path(tmp) / "body.bin"
        log_path = Path(tmp) / "requests.log"
        body_path.write_bytes(frame(message))
        argv = command(target, method, body_path, log_path, spec, metadata)
        process = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        start = time.monotonic()
        time.sleep(spec.warmup_s)
        server_before = proc_stats.sample(server_pid) if server_pid else None
        client_before = proc_stats.sample(process.pid)
        time.sleep(max(start + spec.warmup_s + spec.duration_s - time.monotonic(), 0.0))
        server_after = proc_stats.sample(server_pid) if server_pid else None
        client_after = proc_stats.sample(process.pid)
        killed = 0
        try:
            output, _ = process.communicate(timeout=spec.grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
            killed = 1
        if process.returncode not in (0, None) and not killed:
            raise H2LoadError(f"h2load exited {process.returncode}: {output.strip()[-2000:]}")
        rate = spec.rate if spec.mode == OPEN else 0.0
        text = log_path.read_text() if log_path.exists() else ""
        log = parse_log(text, spec.warmup_s, rate)
    if not text.strip():
        raise H2LoadError(f"h2load logged no request (cannot connect?): {output.strip()[-2000:]}")
    errors = grpc_errors(log, data_bytes(output), response_bytes, check_error)
    completed = log.latencies_ns.size - sum(errors.values())
    histogram = Histogram()
    if not errors:
        histogram.record_many(log.latencies_ns)
    if log.stream_failed:
        errors[STREAM_FAILED] = log.stream_failed
    server_cpu = None
    if server_before and server_after and server_after.processes:
        server_cpu = server_after.cpu_s - server_before.cpu_s
    return LoadResult(
        histogram=histogram,
        completed=completed,
        errors=errors,
        duration_s=spec.duration_s,
        client_cpu_s=max(client_after.cpu_s - client_before.cpu_s, 0.0),
        server_cpu_s=server_cpu,
        server_rss_bytes=server_after.rss_bytes if server_after else None,
        processes=1,
        processes_killed=killed,
    )
