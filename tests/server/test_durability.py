"""Acknowledged writes survive SIGKILL; SIGTERM lets an in-flight stream finish."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np

from clients.channel import ClientConfig, ClientError
from clients.feature_client import AsyncFeatureStoreClient, FeatureStoreClient
from featurestore.dtypes import DType, FeatureStatus
from featurestore.registry import Entity, Feature, FeatureView, JoinKey
from tests.conftest import alive, children, wait_until

USER = Entity("user", (JoinKey("user_id", DType.INT64),))
WIDE = FeatureView("wide", "user", tuple(Feature(f"f{i}", DType.FLOAT32) for i in range(32)))
BATCH = 500


def batch(start: int) -> tuple[dict, dict]:
    ids = np.arange(start, start + BATCH)
    values = {f"f{i}": (ids * 32 + i).astype(np.float32) for i in range(32)}
    return {"user_id": ids}, values


def group_members(pgid: int) -> list[int]:
    """Living (non-zombie) processes of process group pgid."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) == pgid and alive(int(entry.name)):
                    members.append(int(entry.name))
            except ProcessLookupError:
                pass
    return members


def test_sigkill_loses_no_acknowledged_row(tmp_path, server_factory) -> None:
    """One SIGKILL to the server's process group kills the server and its commit process at
    once, so a row acknowledged before its commit could not be saved by the commit process
    finishing what it was sent: every acknowledged row must read back after a restart."""
    server = server_factory(data_dir=tmp_path / "data", own_group=True)
    pgid = server.proc.pid
    assert os.getpgid(pgid) == pgid != os.getpgrp(), "the server does not lead its own group"
    acked: list[int] = []
    stop = threading.Event()

    def load() -> None:
        with FeatureStoreClient(ClientConfig(target=server.target, max_attempts=1)) as client:
            client.apply([USER], [WIDE])
            now = int(time.time() * 1e6)
            start = 0
            try:
                with client.stream_writer("wide", batch_rows=BATCH, ack_every=1000) as writer:
                    while not stop.is_set():
                        for _ in range(4):
                            keys, values = batch(start)
                            writer.write(keys, now, values)
                            start += BATCH
                        writer.flush()
                        acked.append(start)
            except ClientError:
                pass

    worker = threading.Thread(target=load)
    worker.start()
    deadline = time.monotonic() + 20
    while (not acked or acked[-1] < 20 * BATCH) and time.monotonic() < deadline:
        time.sleep(0.02)
    commit_processes = children(server.proc.pid)
    assert commit_processes, "the server has no commit process"
    assert sorted(group_members(pgid)) == sorted([pgid, *commit_processes])
    os.killpg(pgid, signal.SIGKILL)
    server.proc.wait(10)
    stop.set()
    worker.join(30)
    assert acked, "no write was acknowledged before the kill"
    durable = acked[-1]
    assert wait_until(lambda: not group_members(pgid), timeout=10), group_members(pgid)

    restarted = server_factory(data_dir=tmp_path / "data")
    with FeatureStoreClient(restarted.target) as client:
        ids = np.arange(durable)
        got = client.get_online_features(["wide:f0", "wide:f31"], {"user_id": ids})
    assert (got.statuses["wide:f0"] == FeatureStatus.PRESENT).all()
    np.testing.assert_array_equal(got["wide:f31"], (ids * 32 + 31).astype(np.float32))


def test_the_commit_process_exits_once_the_server_is_killed(server) -> None:
    """SIGKILL to the server alone (say, the OOM killer): its commit process, left without
    input, commits what it has and exits instead of living on."""
    with FeatureStoreClient(server.target) as client:
        client.apply([USER], [WIDE])
        keys, values = batch(0)
        client.write_features("wide", keys, int(time.time() * 1e6), values)
    commit_processes = children(server.proc.pid)
    assert commit_processes, "the server has no commit process"
    server.kill()
    assert wait_until(lambda: not any(map(alive, commit_processes)), timeout=30)


async def until_readable(client: AsyncFeatureStoreClient, user_id: int) -> None:
    """Wait until the server has committed the stream's first batch, so the stream is surely in
    flight (a write returns once the client queued it, maybe before the server saw the call)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        got = await client.get_online_features(["wide:f0"], {"user_id": np.array([user_id])})
        if got.statuses["wide:f0"][0] == FeatureStatus.PRESENT:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the stream's first batch never became readable")


def test_sigterm_lets_an_in_flight_stream_finish(server) -> None:
    async def run() -> int:
        async with AsyncFeatureStoreClient(server.target) as client:
            await client.apply([USER], [WIDE])
            now = int(time.time() * 1e6)
            writer = client.stream_writer("wide", batch_rows=BATCH)
            keys, values = batch(0)
            await writer.write(keys, now, values)
            await until_readable(client, keys["user_id"][-1])
            server.proc.send_signal(15)
            await asyncio.sleep(0.3)
            keys, values = batch(BATCH)
            await writer.write(keys, now, values)
            summary = await writer.flush()
            return summary.written

    assert asyncio.run(run()) == 2 * BATCH
    assert server.proc.wait(30) == 0


def test_a_commit_the_file_system_refuses_is_unavailable_and_loses_nothing(server) -> None:
    """The commit process may not grow the store file (RLIMIT_FSIZE: the write fails as on a
    failing disk): the write is answered UNAVAILABLE naming the data dir and saying nothing of
    it was stored (was INTERNAL "server bug"); earlier rows read back, and once the file may
    grow again the same write succeeds, without a restart."""
    import resource

    import grpc

    now = int(time.time() * 1e6)
    with FeatureStoreClient(ClientConfig(target=server.target, max_attempts=1)) as client:
        client.apply([USER], [WIDE])
        client.write_features("wide", batch(0)[0], now, batch(0)[1])
        (commit_process,) = children(server.proc.pid)
        size = (server.data_dir / "data.mdb").stat().st_size
        resource.prlimit(commit_process, resource.RLIMIT_FSIZE, (size, resource.RLIM_INFINITY))
        keys, values = (
            {"user_id": np.arange(10_000, 60_000)},
            {f"f{i}": np.full(50_000, i, np.float32) for i in range(32)},
        )
        try:
            client.write_features("wide", keys, now, values)
        except ClientError as exc:
            assert exc.code == grpc.StatusCode.UNAVAILABLE, exc
            assert str(server.data_dir) in str(exc) and "nothing of this write was stored" in str(
                exc
            )
        else:
            raise AssertionError("a write the file system refused was acknowledged")
        first = client.get_online_features(["wide:f3"], batch(0)[0])
        assert (first["wide:f3"] == batch(0)[1]["f3"]).all()
        missing = client.get_online_features(["wide:f3"], keys).statuses["wide:f3"]
        assert (missing == FeatureStatus.NOT_FOUND).all()
        resource.prlimit(commit_process, resource.RLIMIT_FSIZE, (-1, -1))
        assert client.write_features("wide", keys, now, values).written == 50_000
    assert alive(commit_process)
