"""`featureserve serve --workers 2`: two processes on one port both serve traffic, the parent's
/metrics merges them (per-pid gauges), writes through one share the LMDB environment with the
other, explicit model loads and unloads are refused (each worker would change only itself),
SIGTERM to the parent drains every worker and exits 0, and so does a Ctrl-C to the whole group."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from clients import feature_messages as fm
from clients.channel import ClientConfig
from clients.feature_client import FeatureStoreClient
from featurestore.dtypes import DType
from featurestore.registry import Entity, Feature, FeatureView, JoinKey
from protos.featureserve.v1 import feature_store_pb2 as pb
from protos.featureserve.v1 import feature_store_pb2_grpc as pb_grpc
from protos.inference import grpc_service_pb2 as inference_pb
from protos.inference import grpc_service_pb2_grpc as inference_grpc
from server.workers import MIN_UPTIME_S, remove_orphan_metrics_dirs
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


def test_the_groups_metrics_drop_deleted_views_and_their_versions_drift(server_factory) -> None:
    """prometheus_client cannot remove series from the workers' shared files, so the parent's
    scrape drops them: once a view's last version is deleted none of its samples are left, and
    deleting one of several versions drops the drift of features only it had, as in one
    process; other views keep their series."""
    from tests.server.test_metrics import key, scrape, view_series

    metrics_port = free_port()
    server = server_factory("--workers", "2", "--metrics-port", str(metrics_port))
    assert wait_until(lambda: sum('"msg": "serving"' in line for line in server.log_lines) == 2)
    worker_pids = {
        str(entry["pid"]) for entry in server.logs() if entry.get("msg") == "worker started"
    }
    user = Entity("user", (JoinKey("user_id", DType.INT64),))
    x, y = Feature("x", DType.FLOAT32), Feature("y", DType.FLOAT32)
    ids = np.arange(100)
    now = int(time.time() * 1e6)
    with FeatureStoreClient(ClientConfig(target=server.target, timeout_s=20)) as client:
        client.apply([user], [FeatureView(n, "user", (x,)) for n in ("gone", "kept")])
        client.apply([], [FeatureView("multi", "user", (x, y))])
        client.apply([], [FeatureView("multi", "user", (x,), version=2)])
        for name in ("gone", "kept"):
            client.write_features(name, {"user_id": ids}, now, {"x": np.ones(100)})
        features = {"x": np.ones(100), "y": np.ones(100)}
        client.write_features("multi", {"user_id": ids}, now, features, version=1)
        # Separate connections, spread by the kernel over both workers: each one labels the
        # views (and drift features) it serves in its own file.
        request = fm.get_request(["gone:x", "kept:x", "multi@1:x", "multi@1:y"], {"user_id": ids})
        channels = [
            grpc.insecure_channel(server.target, options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(CHANNELS)
        ]
        try:
            for channel in channels:
                pb_grpc.FeatureStoreStub(channel).GetOnlineFeatures(request, timeout=20)
        finally:
            for channel in channels:
                channel.close()

        def both_served() -> bool:
            rpcs = per_pid(metrics_port, "featureserve_process_rpcs")
            return {pid for pid, n in rpcs.items() if n > 0} == worker_pids

        assert wait_until(both_served, timeout=15)
        before = scrape(metrics_port)
        assert len(view_series(before, "gone")) > 20
        psi = "featureserve_feature_psi"
        assert {key(psi, view="multi", feature=f) for f in "xy"} <= set(before)
        client.delete_feature_view("gone", 1)
        client.delete_feature_view("multi", 1)
    samples = scrape(metrics_port)
    assert view_series(samples, "gone") == {}
    assert view_series(samples, "kept") == view_series(before, "kept")
    assert key(psi, view="multi", feature="y") not in samples
    assert key(psi, view="multi", feature="x") in samples
    hits = samples[key("featureserve_view_lookup_rows_total", view="multi", result="hit")]
    assert hits == 100 * CHANNELS
    assert server.terminate(timeout=60) == 0


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


class Group:
    """`serve --workers 2` leading a process group of its own, as a terminal's foreground job
    does, so one killpg reaches the parent and its workers at once, as Ctrl-C does."""

    def __init__(self, tmp_path: Path, *extra: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve", "--workers", "2", "--port", "0",
             "--data-dir", str(tmp_path / "d"), "--model-repo", str(tmp_path / "m"), *extra],
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, start_new_session=True,
        )  # fmt: skip
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip())

    def count(self, msg: str) -> int:
        return sum(f'"msg": "{msg}"' in line for line in self.lines)

    def ctrl_c(self) -> None:
        os.killpg(self.proc.pid, signal.SIGINT)

    def wait(self, timeout: float = 60.0) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(10)
        return code

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


@pytest.mark.parametrize("phase", ["starting", "serving", "draining"])
def test_ctrl_c_to_the_group_is_a_clean_stop(tmp_path: Path, phase: str) -> None:
    """SIGINT reaches the parent and every worker at once. Workers must not act on it (a
    traceback while importing, or an exit the parent takes for a crash and replaces): the parent
    relays it as SIGTERM, so the group drains and exits 0 whenever Ctrl-C comes, twice too."""
    config = tmp_path / "grace.toml"
    config.write_text("grace_seconds = 3\n")
    group = Group(tmp_path, "--config", str(config))
    try:
        if phase == "starting":
            assert wait_until(lambda: group.count("worker started") == 2, timeout=60)
            group.ctrl_c()
        else:
            assert wait_until(lambda: group.count("serving") == 2, timeout=60), group.lines
            (port,) = {json.loads(line)["address"] for line in group.lines if '"serving"' in line}
        if phase == "serving":
            group.ctrl_c()
        if phase == "draining":
            # A Watch stream stays open, so its worker drains for grace_seconds; NOT_SERVING on
            # it says the drain has begun. Ctrl-C again then.
            with grpc.insecure_channel(port) as channel:
                watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
                assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
                group.ctrl_c()
                assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
                group.ctrl_c()
                assert group.count("stopped") < 2, "the drain ended before the second Ctrl-C"
        code = group.wait()
    finally:
        if group.proc.poll() is None:
            group.kill()
    output = "\n".join(group.lines)
    assert code == 0, output
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output
    assert group.count("worker started") == 2, output
    assert group.count("worker exited") == 0, output
    (stopped,) = [json.loads(line) for line in group.lines if '"msg": "workers stopped"' in line]
    assert stopped["clean"] is True
    if phase != "starting":
        # Both drained on the parent's SIGTERM, not killed by it after a SIGINT of their own.
        assert group.count("stopped") == 2 and group.count("worker stopped before serving") == 0


def test_a_worker_stopped_on_its_own_is_replaced(server_factory) -> None:
    """A worker sent SIGTERM alone drains and exits 0; the parent keeps its worker count (as
    gunicorn and uvicorn do) and logs the exit as a warning, not a crash."""
    server = server_factory("--workers", "2")
    assert wait_until(lambda: sum('"msg": "serving"' in line for line in server.log_lines) == 2)
    first, _ = [int(e["pid"]) for e in server.logs() if e.get("msg") == "worker started"]
    os.kill(first, signal.SIGTERM)

    def started() -> list[dict]:
        return [e for e in server.logs() if e.get("msg") == "worker started"]

    assert wait_until(lambda: len(started()) == 3, timeout=30), [
        (e.get("msg"), e.get("pid"), e.get("code")) for e in server.logs()[-8:]
    ]
    (exited,) = [e for e in server.logs() if e.get("msg") == "worker exited"]
    assert int(exited["pid"]) == first and exited["code"] == 0 and exited["level"] == "warning"
    assert wait_until(lambda: sum('"msg": "serving"' in line for line in server.log_lines) == 3)
    with FeatureStoreClient(ClientConfig(target=server.target, timeout_s=20)) as client:
        assert client.list_feature_views() == ([], [])
    assert server.terminate(timeout=60) == 0, server.log_lines


def test_a_killed_groups_metrics_folder_is_removed_by_the_next_group(
    server_factory, tmp_path: Path, monkeypatch
) -> None:
    """A parent killed with SIGKILL never ran its clean-up, and its shared metrics folder stayed
    in $TMPDIR for good; the next group removes the folders whose live lock nobody holds."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))

    def serving(server, workers: int) -> bool:
        return sum('"msg": "serving"' in line for line in server.log_lines) == workers

    first = server_factory("--workers", "2")
    assert wait_until(lambda: serving(first, 2), timeout=60)
    workers = [int(e["pid"]) for e in first.logs() if e.get("msg") == "worker started"]
    (orphan,) = tmp.glob("featureserve-metrics-*")
    assert (orphan / ".live").is_file()
    first.proc.kill()
    first.proc.wait(10)
    assert wait_until(lambda: not any(alive(pid) for pid in workers), timeout=30)
    assert orphan.is_dir()
    second = server_factory("--workers", "2")
    assert wait_until(lambda: serving(second, 2), timeout=60)
    (kept,) = tmp.glob("featureserve-metrics-*")
    assert kept != orphan
    assert second.terminate(timeout=60) == 0
    assert list(tmp.glob("featureserve-metrics-*")) == []


HOLD_METRICS_DIR = """
import sys, time
from pathlib import Path
from server.workers import make_metrics_dir
print(make_metrics_dir(Path(sys.argv[1]))[0], flush=True)
time.sleep(60)
"""


def test_a_metrics_folder_is_kept_while_its_lock_is_held_whatever_its_pid(tmp_path: Path):
    """The sweep judged a folder by the parent's pid in its name, so a group started in another
    pid namespace sharing $TMPDIR (containers) deleted a live group's folder: its /metrics went
    empty. A held lock is what keeps a folder now, as long as its holder lives."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_METRICS_DIR, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        folder = Path(holder.stdout.readline().strip())
        (folder / "counter_1.db").write_bytes(b"series")
        remove_orphan_metrics_dirs(tmp_path)
        assert (folder / "counter_1.db").read_bytes() == b"series"
        holder.kill()
        holder.wait(10)
        remove_orphan_metrics_dirs(tmp_path)
        assert not folder.exists()
    finally:
        holder.kill()
        holder.stdout.close()
