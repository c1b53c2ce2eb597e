"""ModelStatistics under `featureserve serve --workers 2`: the totals of the whole group, whichever
worker answers, read from each worker's statistics socket in the group's private folder and
merged per (model, version) and per batch size."""

from __future__ import annotations

import asyncio
import socket
import stat
import time
from pathlib import Path

import grpc
import numpy as np

from benchmarks.model_zoo import mlp_model, write_model
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from server.batcher import BatcherStats, BatchSizeStats
from server.inference_servicer import statistics_proto
from server.worker_stats import SIBLING_TIMEOUT_S, merge_statistics, read_statistics, socket_address
from server.workers import stats_socket
from tests.conftest import free_port, wait_until
from tests.server.test_inference_rpc import batch_sizes, infer_request
from tests.server.test_workers import per_pid

CHANNELS = 16
CALLS_PER_CHANNEL = 3
ROWS = 2


def batcher_stats(last_inference_ms: int, executions: dict[int, int]) -> BatcherStats:
    """BatcherStats after `executions` (batch size -> count) of one request each, 1 µs apiece."""
    stats = BatcherStats(last_inference_ms=last_inference_ms)
    for size, count in executions.items():
        stats.inference_count += size * count
        stats.execution_count += count
        stats.success.add(1000 * count, count)
        stats.compute_infer.add(1000 * count, count)
        entry = stats.batch_sizes.setdefault(size, BatchSizeStats())
        entry.compute_infer.add(1000 * count, count)
    return stats


def test_merge_sums_per_version_and_batch_size_and_keeps_the_latest_inference() -> None:
    first = [
        statistics_proto("m", "1", batcher_stats(100, {1: 2, 4: 1})),
        statistics_proto("m", "2", batcher_stats(50, {8: 1})),
    ]
    second = [statistics_proto("m", "1", batcher_stats(300, {4: 2, 2: 1}))]
    merged = merge_statistics([first, second])
    assert [(s.name, s.version) for s in merged] == [("m", "1"), ("m", "2")]
    one, two = merged
    assert (one.last_inference, one.inference_count, one.execution_count) == (300, 16, 6)
    assert (one.inference_stats.success.count, one.inference_stats.success.ns) == (6, 6000)
    assert one.inference_stats.compute_infer.count == 6
    assert [b.batch_size for b in one.batch_stats] == [1, 2, 4]
    assert batch_sizes(one) == {1: 2, 2: 1, 4: 3}
    assert [b.compute_infer.ns for b in one.batch_stats] == [2000, 1000, 3000]
    assert two == first[1]  # a version only one worker serves comes from that worker alone


def served_by_each(metrics_port: int, pids: set[int]) -> bool:
    """Whether every worker has handled an RPC (the parent's merged per-pid gauge)."""
    rpcs = per_pid(metrics_port, "featureserve_process_rpcs")
    return {int(pid) for pid, n in rpcs.items() if n > 0} == pids


def fresh_channels(target: str, n: int) -> list[grpc.Channel]:
    """n channels with connections of their own, which the kernel spreads over the workers."""
    options = [("grpc.use_local_subchannel_pool", 1)]
    return [grpc.insecure_channel(target, options=options) for _ in range(n)]


def statistics(channel: grpc.Channel, **request: str) -> list[pb.ModelStatistics]:
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    return list(stub.ModelStatistics(pb.ModelStatisticsRequest(**request), timeout=10).model_stats)


def test_model_statistics_are_the_totals_of_every_worker(
    server_factory, tmp_path: Path, monkeypatch
) -> None:
    """Each worker batches on its own; ModelStatistics answered only the share of the worker
    that took the call. Now any worker answers the group's totals, and a sibling socket that
    refuses or does not answer is left out within the timeout, not an error."""
    tmp = tmp_path / "tmp"  # a long $TMPDIR: the sockets' paths exceed sun_path's 107 bytes
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    write_model(tmp_path / "models", "mlp", mlp_model())
    metrics_port = free_port()
    server = server_factory("--workers", "2", "--metrics-port", str(metrics_port))
    assert wait_until(lambda: sum('"msg": "serving"' in line for line in server.log_lines) == 2)
    pids = {int(e["pid"]) for e in server.logs() if e.get("msg") == "worker started"}

    x = np.ones((ROWS, 32), np.float32)
    channels = fresh_channels(server.target, CHANNELS)
    try:
        for channel in channels:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            for _ in range(CALLS_PER_CHANNEL):
                stub.ModelInfer(infer_request("mlp", {"x": x}), timeout=10)
    finally:
        for channel in channels:
            channel.close()
    calls = CHANNELS * CALLS_PER_CHANNEL
    assert wait_until(lambda: served_by_each(metrics_port, pids), timeout=15)

    channels = fresh_channels(server.target, 8)
    try:
        for channel in channels:
            for request in ({"name": "mlp"}, {"name": "mlp", "version": "1"}, {}):
                (mlp,) = statistics(channel, **request)
                assert (mlp.inference_count, mlp.execution_count) == (ROWS * calls, calls)
                assert mlp.inference_stats.success.count == calls
                assert batch_sizes(mlp) == {ROWS: calls}
    finally:
        for channel in channels:
            channel.close()

    (folder,) = tmp.glob("featureserve-metrics-*")
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    shares = [asyncio.run(read_statistics(stats_socket(folder, pid))) for pid in pids]
    counts = [share.model_stats[0].execution_count for share in shares]
    assert all(counts) and sum(counts) == calls, counts

    # A worker gone without removing its socket (refuses), and one that never answers.
    with socket.socket(socket.AF_UNIX) as gone, socket.socket(socket.AF_UNIX) as stuck:
        for sock, pid in ((gone, 999_998), (stuck, 999_999)):
            with socket_address(stats_socket(folder, pid)) as address:
                sock.bind(address)
        stuck.listen()
        with grpc.insecure_channel(server.target) as channel:
            started = time.monotonic()
            (mlp,) = statistics(channel, name="mlp")
            assert time.monotonic() - started < 2 * SIBLING_TIMEOUT_S + 1
        assert (mlp.inference_count, mlp.execution_count) == (ROWS * calls, calls)
    assert server.terminate(timeout=60) == 0
    assert not folder.exists()
