"""Compaction benchmark: how long writers wait while compact_history drops old history rows.

python -m benchmarks.compaction_bench [--entities 200000] [--rounds 5] [--rows-per-txn 10000]
    [--memory]
Writes every entity `rounds` times in 1000-row batches (newer event times each round, so all
but the last round's rows are droppable), then compacts the log up to now while another
process commits a 1-row write every 5 ms (sync on, as served). Side by side in one run:
compaction in transactions of --rows-per-txn rows, and in one transaction. Prints, for each,
the time, the rows dropped and the longest, p99 and median wait of the writes made meanwhile,
and the log's size (LMDB pages); --memory adds the compaction's peak Python memory (traced
with tracemalloc, which slows it).
"""

from __future__ import annotations

import argparse
import multiprocessing
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

from benchmarks.rebuild_bench import writer
from benchmarks.store_bench import USER, VIEW, make_batch
from featurestore.history import REBUILD_ROWS_PER_TXN
from featurestore.history_retention import compact_history
from featurestore.online_store import OnlineStore, StoreConfig

ONE_TRANSACTION = 2**62
BATCH_ROWS = 1000


def fill(store: OnlineStore, entities: int, rounds: int) -> None:
    """Every entity written `rounds` times, one event time per round, in commits of 100
    batches of BATCH_ROWS rows (as ingest streams send them: one history record per batch)."""
    rng = np.random.default_rng(0)
    event = time.time_ns() // 1000 - 60_000_000
    for r in range(rounds):
        batches = [
            store.prepare(make_batch(np.arange(lo, min(lo + BATCH_ROWS, entities)), event + r, rng))
            for lo in range(0, entities, BATCH_ROWS)
        ]
        for i in range(0, len(batches), 100):
            store.write_prepared(batches[i : i + 100])


def measure(entities: int, rounds: int, rows_per_txn: int, memory: bool = False) -> str:
    """One compaction beside a writer process, on a fresh store; its report line."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "db"
        with OnlineStore(StoreConfig(path)) as store:
            store.registry.apply([USER], [VIEW])
            fill(store, entities, rounds)
            log_bytes = store.history_bytes(VIEW.name)
            spawn = multiprocessing.get_context("spawn")
            ready, stop = spawn.Event(), spawn.Event()
            receive, send = spawn.Pipe(duplex=False)
            proc = spawn.Process(target=writer, args=(path, entities, ready, stop, send))
            proc.start()
            ready.wait()
            time.sleep(0.5)
            if memory:
                tracemalloc.start()
            began = time.time()
            done = compact_history(
                store, VIEW.name, horizon_us=time.time_ns() // 1000, max_rows_per_txn=rows_per_txn
            )
            ended = time.time()
            peak = tracemalloc.get_traced_memory()[1] if memory else 0
            tracemalloc.stop()
            time.sleep(0.5)
            stop.set()
            spans = np.array(receive.recv())
            proc.join()
    during = (spans[:, 1] > began) & (spans[:, 0] < ended)
    waits = spans[during, 1] - spans[during, 0]
    how = "one transaction" if rows_per_txn == ONE_TRANSACTION else f"{rows_per_txn} rows/txn"
    return (
        f"compaction ({how}): dropped {done.rows_dropped} of {done.rows_before} logged rows in "
        f"{ended - began:.2f} s; {len(waits)} writes meanwhile, longest wait "
        f"{waits.max() * 1000:.0f} ms, p99 {np.percentile(waits, 99) * 1000:.0f} ms, median "
        f"{np.median(waits) * 1000:.1f} ms; log {log_bytes / 1e6:.1f} MB"
        + (f", peak Python memory {peak / 1e6:.1f} MB (traced)" if memory else "")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entities", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rows-per-txn", type=int, default=REBUILD_ROWS_PER_TXN)
    parser.add_argument(
        "--memory", action="store_true", help="trace the peak Python memory (slower)"
    )
    args = parser.parse_args()
    for rows_per_txn in (args.rows_per_txn, ONE_TRANSACTION):
        print(measure(args.entities, args.rounds, rows_per_txn, args.memory), flush=True)


if __name__ == "__main__":
    main()
