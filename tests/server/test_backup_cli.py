"""`featureserve backup`: a consistent copy of a store that a running server keeps writing to,
taken without blocking its writers; restored by serving from it; refusals exit 2."""

from __future__ import annotations

import dataclasses
import fcntl
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import lmdb
import numpy as np
import pytest

from clients.channel import ClientConfig
from clients.feature_client import FeatureStoreClient
from featurestore.backup import LOCK_FILE, PARTIAL_FILE
from featurestore.dtypes import DType, FeatureStatus
from featurestore.history import history_rows
from featurestore.online_store import DATA_FILE, OnlineStore, StoreConfig, WriteBatch
from featurestore.registry import Entity, Feature, FeatureView, JoinKey
from server.cli import main
from tests.conftest import featureserve, wait_until

ITEM = Entity("item", (JoinKey("item_id", DType.INT64),))
SEQ = FeatureView(
    "seq",
    "item",
    (Feature("seq", DType.INT64), Feature("double", DType.FLOAT64), Feature("tag", DType.STRING)),
)
PAD = FeatureView("pad", "item", (Feature("vec", DType.FLOAT32_VECTOR, vector_length=256),))
KEYS = np.arange(200)
PAD_ROWS = 20_000
MAX_WRITE_LATENCY_S = 5.0
REPORT = re.compile(
    r"backed up (?P<src>\S+) to (?P<path>\S+): transaction (?P<txn>\d+), (?P<bytes>\d+) "
    r"bytes(?P<compact> \(compact\))?, (?P<seconds>[\d.]+) s\n"
)


def seq_columns(seq: int) -> dict[str, object]:
    """Every key's row of write number `seq`: its features all derive from seq, so a row mixed
    from two writes shows."""
    return {
        "seq": np.full(len(KEYS), seq),
        "double": np.full(len(KEYS), 2.0 * seq),
        "tag": np.array([f"s{seq}"] * len(KEYS), dtype=object),
    }


def test_backup_during_writes_is_a_snapshot_of_acknowledged_writes_that_serves(
    server, server_factory, tmp_path: Path
) -> None:
    """A writer keeps sending WriteFeatures (write n sets every key to n, event time base + n)
    while `featureserve backup` runs beside the server: writes keep being acknowledged, none
    waits long, and the copy holds one write's rows for every key (writes are atomic, so a
    snapshot shows no mix), at least the last acknowledged before the backup started, with the
    history of exactly the writes up to it; a server started on it serves those rows."""
    base = time.time_ns() // 1000 - 3600 * 1_000_000
    acked: list[tuple[int, float, float]] = []  # (seq, sent, acknowledged), monotonic seconds
    stop = threading.Event()
    failures: list[BaseException] = []
    config = ClientConfig(target=server.target, timeout_s=30)
    with FeatureStoreClient(config) as client:
        client.apply([ITEM], [SEQ, PAD])
        vectors = np.random.default_rng(0).random((5000, 256), np.float32)
        for start in range(0, PAD_ROWS, 5000):  # ~40 MB of rows and history to copy
            ids = np.arange(start, start + 5000)
            client.write_features("pad", {"item_id": ids}, np.full(5000, base), {"vec": vectors})

    def write_continuously() -> None:
        try:
            with FeatureStoreClient(config) as writer:
                seq = 0
                while not stop.is_set():
                    seq += 1
                    sent = time.monotonic()
                    keys = {"item_id": KEYS}
                    events = np.full(len(KEYS), base + seq)
                    writer.write_features("seq", keys, events, seq_columns(seq))
                    acked.append((seq, sent, time.monotonic()))
        except BaseException as exc:
            failures.append(exc)

    thread = threading.Thread(target=write_continuously)
    thread.start()
    try:
        assert wait_until(lambda: len(acked) >= 5 or bool(failures), timeout=30)
        acked_before = acked[-1][0]
        started = time.monotonic()
        dest = tmp_path / "backups" / "now"
        result = featureserve("backup", str(dest), "--data-dir", str(server.data_dir))
        finished = time.monotonic()
        wait_until(lambda: acked[-1][2] > finished or bool(failures), timeout=30)
    finally:
        stop.set()
        thread.join(60)
    assert not failures
    assert result.returncode == 0, result.stderr
    report = REPORT.fullmatch(result.stdout)
    assert report is not None, result.stdout
    assert report["path"] == str(dest / DATA_FILE)
    assert int(report["bytes"]) == (dest / DATA_FILE).stat().st_size > PAD_ROWS * 1024
    assert [p.name for p in dest.iterdir()] == [DATA_FILE]
    during = [seq for seq, sent, ack in acked if started < ack and sent < finished]
    assert len(during) >= 3, "writers were not acknowledged while the backup ran"
    slowest = max(ack - sent for _, sent, ack in acked)
    assert slowest < MAX_WRITE_LATENCY_S

    with OnlineStore(StoreConfig(dest)) as backup:
        got = backup.read("seq", {"item_id": KEYS})
        assert got.row_status.tolist() == [FeatureStatus.PRESENT] * len(KEYS)
        (snapshot,) = set(got.blocks[0].values[:, 0].tolist())  # int64 block: seq
        assert acked_before <= snapshot <= acked[-1][0]
        assert got.event_us.tolist() == [base + snapshot] * len(KEYS)
        assert got.blocks[1].values[:, 0].tolist() == [2.0 * snapshot] * len(KEYS)
        assert got.blocks[2].values[:, 0].tolist() == [f"s{snapshot}"] * len(KEYS)
        _, events, _ = history_rows(backup, "seq")
        assert events.tolist() == np.repeat(base + np.arange(1, snapshot + 1), len(KEYS)).tolist()
        pad = backup.read("pad", {"item_id": np.arange(PAD_ROWS)})
        assert (pad.row_status == FeatureStatus.PRESENT).all()

    restored = server_factory(data_dir=dest)
    (warmed,) = [e for e in restored.logs() if e["msg"] == "store read into the page cache"]
    assert warmed["complete"] is True
    with FeatureStoreClient(ClientConfig(target=restored.target)) as client:
        served = client.get_online_features(["seq:seq", "seq:tag"], {"item_id": KEYS})
        assert served["seq:seq"].tolist() == [snapshot] * len(KEYS)
        assert served["seq:tag"].tolist() == [f"s{snapshot}"] * len(KEYS)
        client.write_features("seq", {"item_id": KEYS}, np.full(len(KEYS), base + 10**6),
                              seq_columns(10**6))  # fmt: skip


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A store with one view version whose rows were deleted (freed pages), and one live."""
    path = tmp_path / "data"
    now = time.time_ns() // 1000
    ids = np.arange(5000)
    with OnlineStore(StoreConfig(path)) as store:
        store.registry.apply([ITEM], [SEQ])
        store.registry.apply([], [dataclasses.replace(SEQ, version=2)])
        for seq in range(3):
            columns = {
                "seq": np.full(len(ids), seq),
                "double": np.full(len(ids), 2.0 * seq),
                "tag": np.array([f"s{seq}"] * len(ids), dtype=object),
            }
            events = np.full(len(ids), now - 10 + seq)
            store.write(WriteBatch("seq", {"item_id": ids}, events, columns, version=1))
        store.write(WriteBatch("seq", {"item_id": KEYS}, np.full(len(KEYS), now), seq_columns(7)))
        store.registry.delete_view("seq", 1)
    return path


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """featureserve in this process: exit code, stdout, stderr."""
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_compact_leaves_out_freed_pages_and_the_copy_serves(
    data_dir: Path, tmp_path: Path, capsys
) -> None:
    code, plain, _ = run_cli(capsys, "backup", str(tmp_path / "plain"), "--data-dir", str(data_dir))
    assert code == 0
    code, compact, _ = run_cli(
        capsys, "backup", str(tmp_path / "compact"), "--data-dir", str(data_dir), "--compact"
    )
    assert code == 0
    plain_report, compact_report = REPORT.fullmatch(plain), REPORT.fullmatch(compact)
    assert compact_report["compact"] and not plain_report["compact"]
    assert compact_report["txn"] == plain_report["txn"]
    compact_bytes = (tmp_path / "compact" / DATA_FILE).stat().st_size
    assert compact_bytes == int(compact_report["bytes"]) < int(plain_report["bytes"]) / 2
    with OnlineStore(StoreConfig(tmp_path / "compact")) as restored:
        got = restored.read("seq", {"item_id": KEYS})
        assert got.blocks[0].values[:, 0].tolist() == [7] * len(KEYS)


@pytest.mark.parametrize(
    ("dest", "source", "message"),
    [
        ("full", "data", r"backup destination DEST \S+/full is not empty \(it holds a.txt\); "
                         "give a new or empty directory"),
        ("data/backup", "data", r"backup destination DEST \S+/data/backup is inside the data dir "
                                r"\S+/data; give a directory outside it"),
        ("dest", "missing", r"data dir \S+/missing does not exist; point --data-dir \(data_dir\) "
                            "at the store to back up"),
        ("dest", "garbage", r"data dir \S+/garbage holds a data.mdb that is not a featureserve "
                            r"store \(.*\); point --data-dir \(data_dir\) at the store"),
    ],
)  # fmt: skip
def test_refusals_exit_2_naming_the_argument_and_write_nothing(
    data_dir: Path, tmp_path: Path, capsys, dest: str, source: str, message: str
) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "a.txt").write_text("keep me")
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / DATA_FILE).write_bytes(np.random.default_rng(0).bytes(10_000))
    before = sorted(tmp_path.rglob("*"))
    args = ("backup", str(tmp_path / dest), "--data-dir", str(tmp_path / source))
    code, out, err = run_cli(capsys, *args)
    assert code == 2
    assert re.match(f"featureserve: {message}", err), err
    assert err.count("\n") == 1 and out == ""
    assert sorted(tmp_path.rglob("*")) == before


def test_backup_help_says_how_to_restore(capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["backup", "--help"])
    assert exited.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "usage: featureserve backup" in out and "Restore by serving with" in out


def start_backup(dest: Path, data_dir: Path) -> subprocess.Popen:
    """`featureserve backup` in a subprocess, started while the caller holds LMDB's writer lock
    (a write transaction): opening the store takes that lock a moment, so the backup waits."""
    args = ["backup", str(dest), "--data-dir", str(data_dir)]
    return subprocess.Popen(
        [sys.executable, "-m", "server.cli", *args], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def opened_store(proc: subprocess.Popen, data_dir: Path) -> bool:
    """Whether proc has opened the store's LMDB environment: it holds a lock on its lock.mdb."""
    holder = (str(proc.pid), str((data_dir / "lock.mdb").stat().st_ino))
    for line in Path("/proc/locks").read_text().splitlines():
        pid, file = line.replace("->", "").split()[4:6]  # file: major:minor:inode
        if (pid, file.rsplit(":", 1)[1]) == holder:
            return True
    return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_is_one_line_and_exit_128_plus_it_and_leaves_nothing(
    data_dir: Path, tmp_path: Path, sig: signal.Signals
) -> None:
    """A SIGTERM (timeout, systemd, a Job's deadline) or Ctrl-C stops the backup with one line
    and no traceback, leaving no directory it made."""
    dest = tmp_path / "backups" / "now"
    env = lmdb.open(str(data_dir), max_dbs=8)
    try:
        txn = env.begin(write=True)
        try:
            proc = start_backup(dest, data_dir)
            assert wait_until(lambda: opened_store(proc, data_dir) or proc.poll() is not None, 30)
            proc.send_signal(sig)
        finally:
            txn.abort()
        out, err = proc.communicate(timeout=30)
    finally:
        env.close()
    assert proc.returncode == 128 + sig, err
    assert err == (
        f"featureserve: backup to DEST {dest} stopped by {sig.name}; its partial copy was "
        "removed (run it again to back up)\n"
    )
    assert out == ""
    assert not (tmp_path / "backups").exists()


def test_a_backup_into_a_dest_another_backup_is_writing_is_refused_and_leaves_it_alone(
    data_dir: Path, tmp_path: Path, capsys
) -> None:
    """A running backup holds an exclusive flock on DEST/backup.lock: a second one into that
    DEST is told so (not to delete the first one's live partial copy) and touches nothing."""
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / PARTIAL_FILE).write_bytes(b"being written")
    with open(dest / LOCK_FILE, "w") as running:
        fcntl.flock(running, fcntl.LOCK_EX)
        code, out, err = run_cli(capsys, "backup", str(dest), "--data-dir", str(data_dir))
        assert sorted(p.name for p in dest.iterdir()) == [LOCK_FILE, PARTIAL_FILE]
    assert code == 2 and out == ""
    assert err == (
        f"featureserve: a backup is already running into DEST {dest}; wait for it to end or "
        "give another DEST\n"
    )
