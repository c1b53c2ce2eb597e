"""`featureserve serve --workers 2`: two processes on one port both serve traffic, the parent's
/metrics merges them (per-pid gauges), writes through one share the LMDB environment with the
other, explicit model loads and unloads are refused (each worker would change only itself), and
SIGTERM to the parent drains every worker and exits 0."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from clients.channel import ClientConfig
from clients.feature_client import FeatureStoreClient
from featurestore.dtypes import DType
from featurestore.registry import Entity, Feature, FeatureView, JoinKey
from protos.featureserve.v1 import feature_store_pb2 as pb
from protos.featureserve.v1 import feature_store_pb2_grpc as pb_grpc
from protos.inference import grpc_service_pb2 as inference_pb
from protos.inference import grpc_service_pb2_grpc as inference_grpc
from server.workers import MIN_UPTIME_S
from tests.conftest import alive, free_port, wait_until

CHANNELS = 16


def per_pid(port: int, name: str) -> dict[str, float]:
    """The per-process samples of one gauge on the parent's merged /metrics page."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        s.labels["pid"]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    }


def total(port: int, name: str, **labels: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def test_two_workers_share_port_store_and_metrics_and_drain_on_sigterm(server_factory) -> None:
    metrics_port = free_port()
    server = server_factory("--workers", "2", "--metrics-port", str(metrics_port))
    assert wait_until(lambda: sum('"msg": "serving"' in line for line in server.log_lines) == 2)
    worker_pids = {
        int(entry["pid"]) for entry in server.logs() if entry.get("msg") == "worker started"
    }
    assert len(worker_pids) == 2 and server.proc.pid not in worker_pids

    user = Entity("user", (JoinKey("user_id", DType.INT64),))
    view = FeatureView("profile", "user", (Feature("score", DType.FLOAT32),))
    with FeatureStoreClient(ClientConfig(target=server.target, timeout_s=20)) as client:
        client.apply([user], [view])
        client.write_features(
            "profile",
            {"user_id": np.arange(10)},
            np.full(10, int(time.time() * 1e6)),
            {"score": np.arange(10, dtype=np.float32)},
        )

    # Separate connections (no shared subchannel pool) so the kernel spreads them over workers;
    # every one must see the registry and rows written through whichever worker took the write.
    channels = [
        grpc.insecure_channel(server.target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(CHANNELS)
    ]
    try:
        for channel in channels:
            stub = pb_grpc.FeatureStoreStub(channel)
            reply = stub.GetFeatureView(pb.GetFeatureViewRequest(name="profile"), timeout=20)
            assert reply.name == "profile"
            # Each worker holds its own repository state: an explicit unload would change one.
            unload = inference_grpc.GRPCInferenceServiceStub(channel).RepositoryModelUnload
            with pytest.raises(grpc.RpcError) as refused:
                unload(inference_pb.RepositoryModelUnloadRequest(model_name="m"), timeout=20)
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "one of several --workers processes" in refused.value.details()
    finally:
        for channel in channels:
            channel.close()

    def both_served() -> bool:
        rpcs = per_pid(metrics_port, "featureserve_process_rpcs")
        return {int(pid) for pid, n in rpcs.items() if n > 0} == worker_pids

    assert wait_until(both_served, timeout=15)
    method = "featureserve.v1.FeatureStore/GetFeatureView"
    requests = total(metrics_port, "featureserve_rpc_requests_total", method=method, code="OK")
    assert requests == CHANNELS
    assert set(per_pid(metrics_port, "featureserve_process_cpu_seconds")) == {
        str(pid) for pid in worker_pids
    }

    assert server.terminate(timeout=60) == 0
    assert not any(alive(pid) for pid in worker_pids)
    assert sum('"msg": "stopped"' in line for line in server.log_lines) == 2


def test_parent_refuses_a_port_in_use(server_factory, tmp_path: Path) -> None:
    """A worker group cannot start on a port another program listens on."""
    from tests.conftest import ServerProcess

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = ServerProcess(tmp_path / "d", tmp_path / "m", "--workers", "2")
        server.extra += ["--port", str(port)]
        try:
            server.start()
        except AssertionError as exc:
            assert f"cannot listen on 127.0.0.1:{port}" in str(exc)
        else:
            raise AssertionError("the worker group started on a port in use")
        finally:
            server.kill()


def test_a_crashed_worker_is_replaced(server_factory) -> None:
    """A worker killed after its start-up window is respawned; the group keeps serving."""
    server = server_factory("--workers", "2")
    assert wait_until(lambda: sum('"msg": "serving"' in line for line in server.log_lines) == 2)
    first = [e for e in server.logs() if e.get("msg") == "worker started"]
    victim = int(first[0]["pid"])
    time.sleep(MIN_UPTIME_S + 0.5)
    os.kill(victim, signal.SIGKILL)

    def replaced() -> bool:
        started = [e for e in server.logs() if e.get("msg") == "worker started"]
        return len(started) == 3 and started[-1]["worker"] == first[0]["worker"]

    assert wait_until(replaced, timeout=30)
    assert wait_until(lambda: sum('"msg": "serving"' in line for line in server.log_lines) == 3)
    exited = [e for e in server.logs() if e.get("msg") == "worker exited"]
    assert [(int(e["pid"]), e["code"]) for e in exited] == [(victim, -signal.SIGKILL)]
    with FeatureStoreClient(ClientConfig(target=server.target, timeout_s=20)) as client:
        assert client.list_feature_views() == ([], [])
    assert server.terminate(timeout=60) == 0


def test_a_second_group_on_a_served_port_is_refused(server_factory, tmp_path: Path) -> None:
    """SO_REUSEPORT would let a second group (another data dir) share the first one's port."""
    first = server_factory("--workers", "2")
    assert wait_until(lambda: sum('"msg": "serving"' in line for line in first.log_lines) == 2)
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "serve", "--workers", "2", "--port", str(first.port),
         "--data-dir", str(tmp_path / "other"), "--model-repo", str(tmp_path / "m")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"featureserve: cannot listen on 127.0.0.1:{first.port}: Address already in use"
    ]


def test_sigterm_while_workers_start_is_a_clean_stop(tmp_path: Path) -> None:
    """Workers still importing when the parent is told to stop die of SIGTERM's default
    action before their handler exists; that is a clean stop (exit 0), not a failed one."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--workers", "2", "--port", "0",
         "--data-dir", str(tmp_path / "d"), "--model-repo", str(tmp_path / "m")],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        lines: list[str] = []
        for line in proc.stderr:
            lines.append(line)
            if sum('"msg": "worker started"' in seen for seen in lines) == 2:
                break
        proc.send_signal(signal.SIGTERM)
        lines += proc.communicate(timeout=60)[1].splitlines()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0, "".join(lines)
    (stopped,) = [json.loads(line) for line in lines if '"msg": "workers stopped"' in line]
    assert stopped["clean"] is True


def test_of_two_groups_started_together_on_one_port_one_serves(tmp_path: Path) -> None:
    """Both parents probe the free port before either group's workers listen, and SO_REUSEPORT
    would admit both groups' workers: the port lock lets the first serve and refuses the other
    in one line naming the port, before it starts a worker."""
    port = free_port()
    logs = [tmp_path / f"group{i}.log" for i in range(2)]
    groups = []
    for i, log in enumerate(logs):
        command = [sys.executable, "-m", "server.cli", "serve", "--workers", "2", "--port",
                   str(port), "--data-dir", str(tmp_path / f"d{i}"), "--model-repo",
                   str(tmp_path / "m")]  # fmt: skip
        with log.open("w") as stderr:
            groups.append(subprocess.Popen(command, stderr=stderr, stdout=subprocess.DEVNULL))
    try:
        exited = wait_until(lambda: any(g.poll() is not None for g in groups), timeout=60)
        assert exited, f"both groups still run on port {port}"
        (loser,) = [i for i, g in enumerate(groups) if g.poll() is not None]
        winner = groups[1 - loser]
        stderr = logs[loser].read_text()
        assert groups[loser].returncode == 1, stderr
        lines = [line for line in stderr.splitlines() if not line.startswith("{")]
        assert len(lines) == 1, stderr
        assert lines[0].startswith(f"featureserve: cannot listen on 127.0.0.1:{port}: "), stderr
        assert '"msg": "worker started"' not in stderr

        def serving() -> int:
            return logs[1 - loser].read_text().count('"msg": "serving"')

        assert wait_until(lambda: serving() == 2, timeout=60), logs[1 - loser].read_text()
        with FeatureStoreClient(ClientConfig(target=f"127.0.0.1:{port}", timeout_s=30)) as client:
            assert client.list_feature_views() == ([], [])
        winner.send_signal(signal.SIGTERM)
        assert winner.wait(60) == 0, logs[1 - loser].read_text()
    finally:
        for group in groups:
            if group.poll() is None:
                group.kill()
                group.wait(10)
