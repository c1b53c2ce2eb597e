"""Online store benchmark: batched read latency and durable group-commit ingest throughput.

python -m benchmarks.store_bench [--entities 1000000] [--reads 20000] [--seconds 5]
Runs on a temporary directory with sync on (every acknowledged write is fsynced).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import numpy as np

from featurestore.dtypes import DType
from featurestore.group_commit import GroupCommitter
from featurestore.online_store import OnlineStore, StoreConfig, WriteBatch, WriteResult
from featurestore.registry import Entity, Feature, FeatureView, JoinKey

FEATURES = 32
USER = Entity("user", (JoinKey("user_id", DType.INT64),))
VIEW = FeatureView("bench", "user", tuple(Feature(f"f{i}", DType.FLOAT32) for i in range(FEATURES)))


def make_batch(ids: np.ndarray, event_us: int, rng: np.random.Generator) -> WriteBatch:
    """A batch of random float32 features for `ids`, all with one event time."""
    values = rng.random((FEATURES, len(ids)), dtype=np.float32)
    columns = {f"f{i}": values[i] for i in range(FEATURES)}
    return WriteBatch("bench", {"user_id": ids}, np.full(len(ids), event_us), columns)


def load(store: OnlineStore, entities: int, rng: np.random.Generator) -> float:
    """Write `entities` rows in 100k-row commits; returns seconds taken."""
    start = time.perf_counter()
    event = time.time_ns() // 1000 - 60_000_000
    for lo in range(0, entities, 100_000):
        ids = np.arange(lo, min(lo + 100_000, entities), dtype=np.int64)
        store.write(make_batch(ids, event, rng))
    return time.perf_counter() - start


def bench_reads(
    store: OnlineStore, entities: int, reads: int, rng: np.random.Generator
) -> np.ndarray:
    """Per-read latency (µs) of 100 random entities x 32 float32 features."""
    keys = [rng.integers(0, entities, 100, dtype=np.int64) for _ in range(reads)]
    for ids in keys[:1000]:
        store.read("bench", {"user_id": ids})
    times = np.empty(reads)
    cpu = time.process_time()
    for i, ids in enumerate(keys):
        t0 = time.perf_counter_ns()
        store.read("bench", {"user_id": ids})
        times[i] = (time.perf_counter_ns() - t0) / 1000
    return times, (time.process_time() - cpu) / reads * 1e6


def bench_ingest(
    store: OnlineStore, entities: int, seconds: float, submitters: int, new_keys: bool
) -> tuple[float, int, int, float]:
    """Durable ingest: `submitters` threads each prepare 1000-row batches, submit them to one
    GroupCommitter and wait for their result (as an RPC handler would). Returns rows/s,
    rows, commits and process CPU µs per row. new_keys: each submitter writes fresh ascending
    entity ids (appends) instead of updating random existing entities."""
    committer = GroupCommitter(store)
    cpu = time.process_time()
    stop = time.perf_counter() + seconds
    totals = [0] * submitters

    def submitter(t: int) -> None:
        rng = np.random.default_rng(t)
        next_id = entities + t * 1_000_000_000
        while time.perf_counter() < stop:
            if new_keys:
                ids = np.arange(next_id, next_id + 1000, dtype=np.int64)
                next_id += 1000
            else:
                ids = rng.integers(0, entities, 1000, dtype=np.int64)
            prepared = store.prepare(make_batch(ids, time.time_ns() // 1000, rng))
            future: Future[WriteResult] = committer.submit(prepared)
            result = future.result()
            totals[t] += result.written + result.stale

    start = time.perf_counter()
    threads = [threading.Thread(target=submitter, args=(t,)) for t in range(submitters)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    committer.close()
    rows = sum(totals)
    cpu_us = (time.process_time() - cpu) / max(rows, 1) * 1e6
    return rows / elapsed, rows, committer.commits, cpu_us


def main() -> None:
    """Run both measurements and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entities", type=int, default=1_000_000)
    parser.add_argument("--reads", type=int, default=20_000)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--submitters", type=int, default=8)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"load average before: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    with (
        tempfile.TemporaryDirectory(prefix="store-bench-") as tmp,
        OnlineStore(StoreConfig(Path(tmp) / "db", map_size=1 << 32)) as store,
    ):
        store.registry.apply([USER], [VIEW])
        took = load(store, args.entities, rng)
        print(
            f"load: {args.entities} entities x {FEATURES} float32 in {took:.1f} s "
            f"({args.entities / took:,.0f} rows/s, sync on, 100k rows/commit)"
        )
        times, cpu_us = bench_reads(store, args.entities, args.reads, rng)
        p50, p99 = np.percentile(times, [50, 99])
        print(
            f"read 100 entities x {FEATURES} float32 from {args.entities}: "
            f"mean {times.mean():.1f} µs, p50 {p50:.1f} µs, p99 {p99:.1f} µs, "
            f"CPU {cpu_us:.1f} µs/read ({args.reads} reads)"
        )
        for new_keys, what in ((False, "random updates of existing"), (True, "new")):
            rate, rows, commits, row_cpu = bench_ingest(
                store, args.entities, args.seconds, args.submitters, new_keys
            )
            print(
                f"durable group-commit ingest ({what} entities), {args.submitters} submitters x "
                f"1000-row batches: {rate:,.0f} rows/s ({rows} rows, {commits} commits, "
                f"{rows / max(commits, 1):,.0f} rows/commit, CPU {row_cpu:.1f} µs/row)"
            )


if __name__ == "__main__":
    main()
