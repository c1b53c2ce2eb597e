"""Pipeline benchmark: events/s end to end into the store, and freshness in streaming mode.

Throughput: N generated events in CSV files, the bounded streaming job (JVM and mini-cluster
start included) until every window is durable in a real featureserve process.
Freshness: the unbounded job watches a folder that receives a file of fresh events every
--file-period seconds; a poller reads GetOnlineFeatures and records, for every event, the time
from its event time until a window holding it is readable. Samples start once the first window
is readable (job start-up is excluded) and cover --freshness-seconds.

    python -m benchmarks.pipeline_bench --events 200000 --freshness-seconds 30
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import numpy as np

from clients.feature_client import FeatureStoreClient
from pipelines.checks import apply_views
from pipelines.config import parse_pipeline
from pipelines.events import EXAMPLE_PIPELINE, generate_events, write_events
from pipelines.streaming import JobOptions, run_streaming

FRESH_PIPELINE = """
[[pipeline]]
name = "fresh"
entity_column = "card_id"
event_time_column = "event_time"
out_of_orderness_s = 0.2

[pipeline.columns]
card_id = "bigint"
amount = "double"
merchant = "string"
category = "string"
lat = "double"
lon = "double"
event_time = "bigint"

[[pipeline.window]]
view = "fresh_10s"
kind = "hop"
size_s = 10
slide_s = {slide}

[pipeline.window.features]
txn_count = "count"
amount_sum = "sum(amount)"
"""


def start_server(root: Path) -> tuple[subprocess.Popen, str]:
    """A featureserve process on a free port; returns it and its address."""
    cmd = [sys.executable, "-m", "server.cli", "serve", "--port", "0",
           "--data-dir", str(root / "data"), "--model-repo", str(root / "models")]  # fmt: skip
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if '"msg": "serving"' in line:
            return proc, json.loads(line)["address"]
    raise RuntimeError("featureserve did not start")


def throughput(root: Path, target: str, events: int, parallelism: int) -> dict:
    """Bounded run over `events` events; events/s counts from job build to the last ack."""
    pipeline = parse_pipeline(tomllib.loads(EXAMPLE_PIPELINE)["pipeline"][0])
    definitions = root / "throughput.toml"
    definitions.write_text(EXAMPLE_PIPELINE)
    apply_views(target, [pipeline], "card")
    data = generate_events(events, entities=10_000, span_s=events / 100, jitter_ms=1000)
    write_events(data, root / "events", files=1)
    options = JobOptions(source=root / "events", target=target, definitions=definitions,
                         bounded=True, parallelism=parallelism)  # fmt: skip
    started = time.monotonic()
    report = run_streaming(options)
    seconds = time.monotonic() - started
    rows = sum(s.rows for s in report.sinks.values())
    return {"events": events, "seconds": round(seconds, 2),
            "events_per_s": round(events / seconds), "window_rows_written": rows}  # fmt: skip


def freshness(root: Path, target: str, seconds: float, slide: float, period: float) -> dict:
    """Unbounded job over a folder fed every `period` s; event time -> readable, in seconds."""
    text = FRESH_PIPELINE.replace("{slide}", str(slide))
    pipeline = parse_pipeline(tomllib.loads(text)["pipeline"][0])
    definitions = root / "fresh.toml"
    definitions.write_text(text)
    apply_views(target, [pipeline], "card")
    source = root / "fresh"
    source.mkdir()
    code = (
        "from pathlib import Path; from pipelines.streaming import JobOptions, run_streaming; "
        f"run_streaming(JobOptions(source=Path({str(source)!r}), target={target!r}, "
        f"definitions=Path({str(definitions)!r}), monitor_interval_s=0.5))"
    )
    log = open(root / "job.log", "w")  # noqa: SIM115
    # An in-process PyFlink job leaves PYFLINK_GATEWAY_DISABLED set; a child must start its own.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYFLINK", "_PYFLINK"))}
    job = subprocess.Popen([sys.executable, "-c", code], stderr=log, stdout=log, env=env)
    keys = np.arange(50, dtype=np.int64)
    pending: dict[int, list[int]] = {int(k): [] for k in keys}
    samples: list[float] = []
    slide_ms = int(slide * 1000)
    client = FeatureStoreClient(target)
    warm_until = time.monotonic() + 120.0
    end = warm_until + seconds
    next_file, i = 0.0, 0
    while time.monotonic() < end or (any(pending.values()) and time.monotonic() < end + 30):
        now = time.time()
        if time.monotonic() < warm_until and samples:
            warm_until, end = time.monotonic(), time.monotonic() + seconds
            samples.clear()
            pending = {int(k): [] for k in keys}
        if time.monotonic() < end and time.monotonic() >= next_file:
            n = 200
            ev = generate_events(n, entities=len(keys), start_ms=int(now * 1000), span_s=0.001,
                                 seed=i)  # fmt: skip
            ev["event_time"] = np.full(n, int(now * 1000), dtype=np.int64)
            write_events(ev, source, prefix=f"f{i:06d}")
            for k in np.unique(ev["card_id"]):
                pending[int(k)].append(int(now * 1000))
            next_file, i = time.monotonic() + period, i + 1
        got = client.get_online_features(["fresh_10s"], {"card_id": keys})
        seen = time.time()
        stored_ms = got.event_timestamps["fresh_10s"] // 1000
        for k, w in zip(keys, stored_ms, strict=True):
            left = []
            for t in pending[int(k)]:
                first_end = (t // slide_ms) * slide_ms + slide_ms
                (samples.append(seen - t / 1000) if w >= first_end else left.append(t))
            pending[int(k)] = left
        time.sleep(0.05)
    job.kill()
    client.close()
    arr = np.array(samples)
    return {"slide_s": slide, "samples": len(arr), "unresolved": sum(map(len, pending.values())),
            "p50_s": round(float(np.percentile(arr, 50)), 3) if len(arr) else None,
            "p99_s": round(float(np.percentile(arr, 99)), 3) if len(arr) else None}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Run both measurements against a fresh server and print JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument(
        "--parallelism", type=int, default=2, help="Flink parallelism (default 2: one per core)"
    )
    parser.add_argument("--freshness-seconds", type=float, default=30.0)
    parser.add_argument("--slide", type=float, default=2.0)
    parser.add_argument("--file-period", type=float, default=0.25)
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="pipeline-bench-"))
    server, target = start_server(root)
    try:
        result = {"throughput": throughput(root, target, args.events, args.parallelism)}
        if args.freshness_seconds > 0:
            result["freshness"] = freshness(
                root, target, args.freshness_seconds, args.slide, args.file_period
            )
    finally:
        server.kill()
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
