"""Two reader processes see consistent snapshots while the test process writes and grows the map."""

import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from featurestore.dtypes import DType
from featurestore.online_store import LmdbEnv, OnlineStore, StoreConfig, WriteBatch
from featurestore.registry import Entity, Feature, FeatureView, JoinKey

NOW = 1_800_000_000_000_000
KEYS = 300
GENERATIONS = 15
USER = Entity("user", (JoinKey("user_id", DType.INT64),))
VIEW = FeatureView(
    "gen",
    "user",
    (
        Feature("gen", DType.INT64),
        Feature("check", DType.INT64),
        Feature("pad", DType.STRING),
    ),
)

COMMON = f"""
import sys
from pathlib import Path
import numpy as np
from featurestore.online_store import OnlineStore, StoreConfig, WriteBatch
NOW, KEYS, GENERATIONS = {NOW}, {KEYS}, {GENERATIONS}
path = Path(sys.argv[1])
ids = np.arange(KEYS)
"""

READER = (
    COMMON
    + """
import time
deadline = time.monotonic() + 60
seen = []
with OnlineStore(StoreConfig(path / "db", map_size=128 * 1024)) as store:
    while True:
        finished = (path / "done").exists()
        res = store.read("gen", {"user_id": ids}, ["gen", "check"], now_us=NOW)
        values = res.blocks[0].values
        gens = values[:, 0]
        assert (res.row_status == 1).all()
        assert (gens == gens[0]).all(), "a read saw two commits"
        assert (values[:, 1] == gens * 7 + ids).all(), "a row mixes two writes"
        assert (res.event_us == NOW + gens).all()
        assert not seen or gens[0] >= seen[-1], "went back in time"
        seen.append(int(gens[0]))
        (path / f"ready-{sys.argv[2]}").touch()
        if finished or time.monotonic() > deadline:
            break
        time.sleep(0.002)
    print(len(seen), len(set(seen)), seen[-1], store.map_size)
"""
)


def test_two_readers_while_a_third_process_writes(tmp_path: Path):
    config = StoreConfig(tmp_path / "db", map_size=128 * 1024)
    readers = []
    with OnlineStore(config) as store:
        store.registry.apply([USER], [VIEW])
        ids = np.arange(KEYS)
        cols = {"gen": np.ones(KEYS, np.int64), "check": 7 + ids, "pad": np.array([""] * KEYS)}
        store.write(WriteBatch("gen", {"user_id": ids}, np.full(KEYS, NOW + 1), cols), now_us=NOW)
        start_size = store.map_size
        readers = [
            subprocess.Popen(
                [sys.executable, "-c", READER, str(tmp_path), str(i)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i in range(2)
        ]
        deadline = time.monotonic() + 60
        while not all((tmp_path / f"ready-{i}").exists() for i in range(2)):
            assert time.monotonic() < deadline and all(r.poll() is None for r in readers)
            time.sleep(0.01)
        for gen in range(2, GENERATIONS + 1):
            pad = np.array(["x" * 600] * KEYS, dtype=object)
            cols = {"gen": np.full(KEYS, gen), "check": gen * 7 + ids, "pad": pad}
            batch = WriteBatch("gen", {"user_id": ids}, np.full(KEYS, NOW + gen), cols)
            assert store.write(batch, now_us=NOW + gen).written == KEYS
            time.sleep(0.01)
        assert store.map_size > start_size
        (tmp_path / "done").touch()
        for reader in readers:
            out, err = reader.communicate(timeout=60)
            assert reader.returncode == 0, err
            reads, distinct, last, map_size = map(int, out.split())
            assert last == GENERATIONS and reads >= distinct >= 1
            assert map_size > start_size, "the reader did not adopt the grown map"


HOLDER = """
import sys, time
from pathlib import Path
from featurestore.online_store import LmdbEnv, StoreConfig
lmdb_env = LmdbEnv(StoreConfig(Path(sys.argv[1])))
txn = lmdb_env.env.begin()  # a read snapshot held when the process dies, as in a killed lookup
print("holding", flush=True)
time.sleep(60)
"""


def test_a_reader_killed_mid_read_frees_its_slot_when_the_store_is_next_opened(tmp_path):
    """Its stale snapshot kept LMDB from reusing pages freed after it while the other processes
    ran (a --workers group's store grew twice as fast after a worker was killed mid-lookup)."""
    survivor = LmdbEnv(StoreConfig(tmp_path))  # keeps the lock file's reader table alive
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        assert f"{holder.pid:>10}" in survivor.env.readers()
        holder.kill()
        holder.wait(10)
        assert f"{holder.pid:>10}" in survivor.env.readers()
        replacement = "import sys; from pathlib import Path; from featurestore.online_store import "
        replacement += "LmdbEnv, StoreConfig; LmdbEnv(StoreConfig(Path(sys.argv[1]))).close()"
        subprocess.run([sys.executable, "-c", replacement, str(tmp_path)], check=True, timeout=60)
        assert f"{holder.pid:>10}" not in survivor.env.readers()
    finally:
        holder.kill()
        holder.stdout.close()
        survivor.close()


def test_a_writer_frees_a_dead_readers_slot_within_reader_check_s(tmp_path, monkeypatch):
    """A killed `featureserve backup` (or offline reader) kept its slot, and so its snapshot,
    until some process opened the store again: a running server's file grew meanwhile. Each
    writing process now frees such slots every READER_CHECK_S (0 here: at its next write)."""
    monkeypatch.setattr("featurestore.online_store.READER_CHECK_S", 0.0, raising=False)
    writer = LmdbEnv(StoreConfig(tmp_path))
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        holder.kill()
        holder.wait(10)
        assert f"{holder.pid:>10}" in writer.env.readers()
        writer.run_write(lambda txn: txn.put(b"k", b"v", db=writer.db_in_write(b"t", txn)))
        assert f"{holder.pid:>10}" not in writer.env.readers()
    finally:
        holder.kill()
        holder.stdout.close()
        writer.close()
