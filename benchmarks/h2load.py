"""Optional native load generator: h2load (Debian nghttp2-client) driving a unary gRPC method.

The request is pre-framed once (gRPC's 5-byte prefix + serialized message) into a file that h2load
posts on every stream. h2load sees HTTP status only, never the grpc-status trailer, so its errors
are failed streams; check a scenario with the Python generator before trusting h2load's error
count. Open loop runs one h2load client at --rps: it sends on a timer and, when every stream is
busy, later, so its own timings omit the wait. Its log lists each request's send time, so the k-th
request sent is the k-th of the schedule, and its latency is counted from that intended time
(as wrk2 does): no coordinated omission.
"""

from __future__ import annotations

import math
import shutil
import struct
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

from benchmarks import proc_stats
from benchmarks.histogram import Histogram
from benchmarks.load import CLOSED, OPEN, LoadResult, LoadSpec, check_loopback

EXECUTABLE = "h2load"
STREAM_FAILED = "H2_STREAM_FAILED"
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
    """The h2load argv for one load point: clients = min(processes, concurrency)."""
    argv = [
        EXECUTABLE,
        "-D",
        _duration(spec.duration_s),
        "--warm-up-time",
        _duration(spec.warmup_s),
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


def parse_log(text: str, rate: float = 0.0) -> tuple[np.ndarray, int]:
    """Latencies (ns) of HTTP-200 streams, and the count of other streams, from --log-file.

    With rate (one open-loop client), each latency runs from the request's intended send time:
    the schedule is anchored where the requests ran least late, and request k (in send order)
    was due k / rate after that.
    """
    rows = [line.split("\t") for line in text.splitlines() if line.strip()]
    if not rows:
        return np.zeros(0, dtype=np.int64), 0
    start_us = np.array([int(row[0]) for row in rows], dtype=np.int64)
    status = np.array([int(row[1]) for row in rows])
    elapsed_us = np.array([int(row[2]) for row in rows], dtype=np.int64)
    if rate:
        order = np.argsort(start_us, kind="stable")
        start_us, status, elapsed_us = start_us[order], status[order], elapsed_us[order]
        ahead = start_us - np.arange(len(rows)) * 1e6 / rate
        elapsed_us = elapsed_us + np.round(ahead - ahead.min()).astype(np.int64)
    ok = status == 200
    return elapsed_us[ok] * 1000, int((~ok).sum())


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
        latencies, failed = parse_log(log_path.read_text() if log_path.exists() else "", rate)
    histogram = Histogram()
    histogram.record_many(latencies)
    errors = Counter({STREAM_FAILED: failed} if failed else {})
    server_cpu = None
    if server_before and server_after and server_after.processes:
        server_cpu = server_after.cpu_s - server_before.cpu_s
    return LoadResult(
        histogram=histogram,
        completed=int(latencies.size),
        errors=dict(errors),
        duration_s=spec.duration_s,
        client_cpu_s=max(client_after.cpu_s - client_before.cpu_s, 0.0),
        server_cpu_s=server_cpu,
        server_rss_bytes=server_after.rss_bytes if server_after else None,
        processes=1,
        processes_killed=killed,
    )
