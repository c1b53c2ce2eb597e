"""Rebuild benchmark: how long writers wait while rebuild_online refills a view from its log.

python -m benchmarks.rebuild_bench [--entities 1000000] [--rows-per-txn 50000] [--healthy]
    [--memory]
Loads `entities` rows (one logged row each), empties the view's online rows (unless --healthy),
then rebuilds it while another process commits a 1-row write every 5 ms (sync on, as served).
Prints the rebuild time, the longest, p99 and median wait of the writes made meanwhile and the
log's size (LMDB pages); --memory adds the rebuild's peak Python memory (traced with
tracemalloc, which slows it).
"""

from __future__ import annotations

import argparse
import multiprocessing
import tempfile
import time
import tracemalloc
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event
from pathlib import Path

import numpy as np

from benchmarks.store_bench import USER, VIEW, load, make_batch
from featurestore.history import REBUILD_ROWS_PER_TXN, rebuild_online
from featurestore.online_store import OnlineStore, StoreConfig


def writer(path: Path, entities: int, ready: Event, stop: Event, out: Connection) -> None:
    """Commit a 1-row write to a random entity every 5 ms until stop; send (start, end) of
    each (time.time(), comparable across processes), after a first write that warms up."""
    rng = np.random.default_rng(1)
    spans = []
    with OnlineStore(StoreConfig(path)) as store:
        store.write(make_batch(rng.integers(0, entities, 1), time.time_ns() // 1000, rng))
        ready.set()
        while not stop.is_set():
            batch = make_batch(rng.integers(0, entities, 1), time.time_ns() // 1000, rng)
            began = time.time()
            store.write(batch)
            spans.append((began, time.time()))
            time.sleep(0.005)
    out.send(spans)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entities", type=int, default=1_000_000)
    parser.add_argument("--rows-per-txn", type=int, default=REBUILD_ROWS_PER_TXN)
    parser.add_argument("--healthy", action="store_true", help="leave the online rows as logged")
    parser.add_argument(
        "--memory", action="store_true", help="trace the peak Python memory (slower)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "db"
        with OnlineStore(StoreConfig(path)) as store:
            store.registry.apply([USER], [VIEW])
            load(store, args.entities, np.random.default_rng(0))
            log_bytes = store.history_bytes(VIEW.name)
            if not args.healthy:
                store.replace_online_rows(VIEW.name, 1, lambda records: [])
            spawn = multiprocessing.get_context("spawn")
            ready, stop = spawn.Event(), spawn.Event()
            receive, send = spawn.Pipe(duplex=False)
            proc = spawn.Process(target=writer, args=(path, args.entities, ready, stop, send))
            proc.start()
            ready.wait()
            time.sleep(0.5)
            if args.memory:
                tracemalloc.start()
            began = time.time()
            replayed = rebuild_online(store, VIEW.name, max_rows_per_txn=args.rows_per_txn)
            ended = time.time()
            peak = tracemalloc.get_traced_memory()[1] if args.memory else 0
            tracemalloc.stop()
            time.sleep(0.5)
            stop.set()
            spans = np.array(receive.recv())
            proc.join()
    took = ended - began
    during = (spans[:, 1] > began) & (spans[:, 0] < ended)
    waits = spans[during, 1] - spans[during, 0]
    print(
        f"rebuild of {replayed} logged rows ({'healthy' if args.healthy else 'emptied'} online "
        f"rows, {args.rows_per_txn} rows/txn): {took:.2f} s; {len(waits)} writes meanwhile, "
        f"longest wait {waits.max() * 1000:.0f} ms, p99 {np.percentile(waits, 99) * 1000:.0f} ms, "
        f"median {np.median(waits) * 1000:.1f} ms; log {log_bytes / 1e6:.1f} MB"
        + (f", peak Python memory {peak / 1e6:.1f} MB (traced)" if args.memory else "")
    )


if __name__ == "__main__":
    main()
