"""`featureserve compact-history` beside a running server, and the server's scheduled history
retention: rows no query at or after the horizon needs are dropped, serving and rebuilds are
unchanged, earlier labels are refused, bad flags exit 2, a stop signal leaves a consistent log."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from clients.channel import ClientConfig
from clients.feature_client import FeatureStoreClient
from featurestore.dtypes import DType
from featurestore.errors import InvalidArgumentError
from featurestore.history import point_in_time, rebuild_online
from featurestore.online_store import OnlineStore, StoreConfig, WriteBatch
from featurestore.registry import Entity, Feature, FeatureView, JoinKey
from tests.conftest import featureserve, wait_until

SEC = 1_000_000
ITEM = Entity("item", (JoinKey("item_id", DType.INT64),))
PRICE = FeatureView("price", "item", (Feature("price", DType.FLOAT64),))
KEYS = np.arange(50)
RECORDS = 2000
REPORT = re.compile(
    r"price v1: dropped (?P<dropped>\d+) of (?P<rows>\d+) logged rows \((?P<rewritten>\d+) "
    r"records rewritten, (?P<deleted>\d+) deleted\); horizon \S+\n"
)


def write_rounds(client: FeatureStoreClient, rounds: int) -> int:
    """Every key written `rounds` times with newer event times; returns the newest event."""
    now = time.time_ns() // 1000 - rounds * SEC
    for r in range(rounds):
        client.write_features(
            "price", {"item_id": KEYS}, np.full(len(KEYS), now + r * SEC), {"price": KEYS + r}
        )
    return now + (rounds - 1) * SEC


def logged_rows(store: OnlineStore) -> int:
    return sum(int.from_bytes(b[:4], "little") for b in store.history_records("price", 1).blobs)


def test_compact_history_beside_a_serving_server_drops_only_what_no_query_needs(server):
    with FeatureStoreClient(ClientConfig(target=server.target, timeout_s=20)) as client:
        client.apply([ITEM], [PRICE])
        newest = write_rounds(client, 4)
        before = client.get_online_features(["price:price"], {"item_id": KEYS})
        done = featureserve("compact-history", "--data-dir", str(server.data_dir), "--keep", "0s")
        assert done.returncode == 0, done.stderr
        report = REPORT.fullmatch(done.stdout)
        assert report is not None, done.stdout
        assert (int(report["dropped"]), int(report["rows"])) == (150, 200)
        assert (int(report["rewritten"]), int(report["deleted"])) == (0, 3)
        after = client.get_online_features(["price:price"], {"item_id": KEYS})
        assert (
            after["price:price"].tolist() == before["price:price"].tolist() == (KEYS + 3).tolist()
        )
        client.write_features("price", {"item_id": KEYS[:1]}, [newest + SEC], {"price": [-1.0]})
    assert server.terminate() == 0
    with OnlineStore(StoreConfig(server.data_dir)) as store:
        horizon = store.history_records("price", 1).horizon_us
        assert horizon > newest
        label = np.full(len(KEYS), horizon)
        got = point_in_time(store, "price", {"item_id": KEYS}, label)
        assert got.blocks[0].values[:, 0].tolist() == [-1.0, *(KEYS[1:] + 3)]
        assert rebuild_online(store, "price") == 51
        with pytest.raises(InvalidArgumentError, match="before the history's horizon"):
            point_in_time(store, "price", {"item_id": KEYS}, label - 1)


def test_the_server_compacts_on_its_schedule_and_stops_cleanly(server_factory, tmp_path):
    config = tmp_path / "retention.toml"
    config.write_text("history_retention_seconds = 1\nhistory_compaction_interval_seconds = 1.0\n")
    server = server_factory("--config", str(config))
    with FeatureStoreClient(ClientConfig(target=server.target, timeout_s=20)) as client:
        client.apply([ITEM], [PRICE])
        write_rounds(client, 3)

        def compacted() -> bool:
            with OnlineStore(StoreConfig(server.data_dir)) as store:
                return logged_rows(store) == 50

        assert wait_until(compacted, timeout=30, interval=0.5), "\n".join(server.log_lines)
        reports = [r["report"] for r in server.logs() if r["msg"] == "history compacted"]
        assert any("price v1: dropped" in report for report in reports), reports
        got = client.get_online_features(["price:price"], {"item_id": KEYS})
        assert got["price:price"].tolist() == (KEYS + 2).tolist()
    assert server.terminate() == 0
    assert not [r for r in server.logs() if r["msg"] == "history compaction failed"]
    assert [line for line in server.log_lines if not line.startswith("{")] == []  # JSON only
    with OnlineStore(StoreConfig(server.data_dir)) as store:
        assert store.history_records("price", 1).horizon_us > 0
        assert rebuild_online(store, "price") == 50


def test_the_history_gauge_follows_a_scheduled_compaction(server_factory, tmp_path):
    """The history-bytes gauge is sampled on writes; a compaction shrinks the log without one,
    so the server shows every view's sizes again once its scheduled compaction ends (the gauge
    kept the size before compaction until the view's next sampled write)."""
    from tests.conftest import free_port
    from tests.server.test_metrics import key, scrape

    config = tmp_path / "retention.toml"
    config.write_text("history_retention_seconds = 1\nhistory_compaction_interval_seconds = 1.0\n")
    port = free_port()
    server = server_factory("--config", str(config), "--metrics-port", str(port))
    gauge = key("featureserve_view_history_bytes", view="price")
    with FeatureStoreClient(ClientConfig(target=server.target, timeout_s=20)) as client:
        client.apply([ITEM], [PRICE])
        write_rounds(client, 17)  # the 1st and the 17th write are sampled
    full = scrape(port)[gauge]

    def compacted() -> bool:
        with OnlineStore(StoreConfig(server.data_dir)) as store:
            return logged_rows(store) == 50

    assert wait_until(compacted, timeout=30, interval=0.5), "\n".join(server.log_lines)
    with OnlineStore(StoreConfig(server.data_dir)) as store:
        now = store.history_bytes("price")
    assert now < full
    assert wait_until(lambda: scrape(port)[gauge] == now, timeout=10), (scrape(port)[gauge], now)


def test_a_stop_signal_ends_a_compaction_between_transactions(tmp_path: Path):
    """SIGTERM midway (RECORDS synced transactions of one record each take seconds): exit 143
    with one line, and what is left answers as before."""
    data = tmp_path / "data"
    start = time.time_ns() // 1000 - 3600 * SEC
    with OnlineStore(StoreConfig(data)) as store:
        store.registry.apply([ITEM], [PRICE])
        batches = [
            store.prepare(
                WriteBatch(
                    "price", {"item_id": KEYS}, np.full(len(KEYS), start + r), {"price": KEYS + r}
                ),
                now_us=start + r,
            )
            for r in range(RECORDS)
        ]
        for i in range(0, RECORDS, 100):  # one history record per batch
            store.write_prepared(batches[i : i + 100])
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "compact-history", "--data-dir", str(data),
         "--keep", "0s", "--rows-per-txn", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    with OnlineStore(StoreConfig(data)) as store:
        assert wait_until(lambda: store.history_records("price", 1).horizon_us > 0, timeout=60)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, (out, err)
    assert err.strip().endswith("stopped by SIGTERM; the log is consistent and what was "
                                "compacted stays so (run it again to finish)")  # fmt: skip
    with OnlineStore(StoreConfig(data)) as store:
        records = store.history_records("price", 1)
        assert 1 < len(records.seqs) < RECORDS
        got = point_in_time(store, "price", {"item_id": KEYS}, np.full(50, records.horizon_us))
        assert got.blocks[0].values[:, 0].tolist() == (KEYS + RECORDS - 1).tolist()
        assert rebuild_online(store, "price") > 50


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--before", "yesterday"], "--before: 'yesterday' is not an ISO 8601 time"),
        (["--before", "2999-01-01T00:00:00Z"], "is in the future"),
        (["--keep", "3 parsecs"], "--keep: bad duration"),
        (["--keep", "1d", "--version", "1"], "--version needs a VIEW"),
        (["--keep", "1d", "--rows-per-txn", "0"], "--rows-per-txn 0: give at least 1"),
        (["--keep", "100000d"], "--keep: 100000d reaches back before 1970; keep less"),
        (["--before", "1969-12-31"], "--before: 1969-12-31 is not after 1970-01-01T00:00:00Z"),
        (["price", "--version", "0", "--keep", "1d"], "--version 0: give a version from 1"),
    ],
)
def test_bad_flags_exit_2_naming_the_flag(tmp_path: Path, args, message):
    with OnlineStore(StoreConfig(tmp_path / "data")) as store:
        store.registry.apply([ITEM], [PRICE])
    done = featureserve("compact-history", "--data-dir", str(tmp_path / "data"), *args)
    assert done.returncode == 2
    assert message in done.stderr


def test_an_unknown_view_or_a_missing_store_is_named(tmp_path: Path):
    done = featureserve("compact-history", "--data-dir", str(tmp_path / "none"), "--keep", "1d")
    assert (done.returncode, done.stderr.strip()) == (
        2,
        f"featureserve: --data-dir {tmp_path / 'none'} holds no store (no data.mdb)",
    )
    with OnlineStore(StoreConfig(tmp_path / "data")) as store:
        store.registry.apply([ITEM], [PRICE])
    done = featureserve(
        "compact-history", "prices", "--data-dir", str(tmp_path / "data"), "--keep", "1d"
    )
    assert done.returncode == 1
    assert "'prices'" in done.stderr and "price" in done.stderr
