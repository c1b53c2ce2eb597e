"""`featureserve serve` as a real process: startup, health, reflection, shutdown, bad input."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import onnx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from onnx import TensorProto, helper

from benchmarks.model_zoo import write_model
from clients.channel import ClientConfig
from clients.health import check_health
from protos.inference import grpc_service_pb2 as ks
from protos.inference import grpc_service_pb2_grpc
from server.config import ServerConfig
from server.runner import GC_THRESHOLDS, serve
from tests.conftest import free_port, wait_until
from tests.page_residency import evict, resident_fraction

SERVICES = {"featureserve.v1.FeatureStore", "featureserve.v1.Prediction",
            "inference.GRPCInferenceService"}  # fmt: skip


def featureserve(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "server.cli", *args],
        capture_output=True, text=True, timeout=60, cwd=cwd,
    )  # fmt: skip


def test_every_service_reports_serving(server) -> None:
    statuses = check_health(ClientConfig(target=server.target))
    assert statuses == {"": "SERVING", **{name: "SERVING" for name in SERVICES}}


def test_reflection_lists_the_three_services(server) -> None:
    with grpc.insecure_channel(server.target) as channel:
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert services >= SERVICES | {"grpc.health.v1.Health"}


@pytest.mark.parametrize(
    ("flags", "loop"), [((), "uvloop"), (("--event-loop", "asyncio"), "asyncio")]
)
def test_the_server_runs_on_the_chosen_event_loop(server_factory, flags, loop) -> None:
    server = server_factory(*flags)
    assert check_health(ClientConfig(target=server.target))[""] == "SERVING"
    (serving,) = [e for e in server.logs() if e["msg"] == "serving"]
    assert serving["event_loop"] == loop


def test_sigterm_exits_zero_and_logs_the_drain(server) -> None:
    assert server.terminate() == 0
    messages = [entry["msg"] for entry in server.logs()]
    assert messages[-2:] == ["stopping", "stopped"]


def test_health_command_prints_each_service(server) -> None:
    result = featureserve("health", "--target", server.target)
    assert result.returncode == 0, result.stderr
    for name in SERVICES:
        assert f"{name}" in result.stdout and "SERVING" in result.stdout


def test_health_command_fails_when_nothing_listens() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = featureserve("health", "--target", f"127.0.0.1:{port}", "--timeout", "1")
    assert result.returncode == 1
    assert "UNAVAILABLE" in result.stdout or "DEADLINE_EXCEEDED" in result.stdout


def test_unknown_config_key_names_the_key_and_file(tmp_path: Path) -> None:
    config = tmp_path / "featureserve.toml"
    config.write_text("port = 0\nmax_batch = 3\n")
    result = featureserve("serve", "--config", str(config))
    assert result.returncode == 2
    assert f"{config}: unknown key 'max_batch'" in result.stderr
    assert "Traceback" not in result.stderr


def test_wrongly_typed_config_value_is_named(tmp_path: Path) -> None:
    config = tmp_path / "featureserve.toml"
    config.write_text('[server]\nport = "fifty"\n')
    result = featureserve("serve", "--config", str(config))
    assert result.returncode == 2
    assert "key 'port' must be int, got str" in result.stderr


def test_port_in_use_is_one_line_and_non_zero(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = featureserve("serve", "--port", str(port), "--data-dir", str(tmp_path / "d"))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"featureserve: cannot listen on 127.0.0.1:{port}: Address already in use"
    ]


@pytest.mark.parametrize("kind", ["directory", "not-utf8"])
def test_a_config_that_cannot_be_read_as_text_is_one_line(tmp_path: Path, kind: str) -> None:
    config = tmp_path / "featureserve.toml"
    if kind == "directory":
        config.mkdir()
        message = (
            f"featureserve: {config}: cannot read the config file: Is a directory; give "
            "--config a readable TOML file"
        )
    else:
        config.write_bytes(b"port = 1\xff\n")
        message = (
            f"featureserve: {config}: not UTF-8 text (invalid start byte at byte 8); save the "
            "config file as UTF-8"
        )
    result = featureserve("serve", "--port", "0", "--config", str(config),
                          "--data-dir", str(tmp_path / "d"))  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [message]


def _ipv6_loopback_port() -> int | None:
    """A free port on ::1, or None where the machine has no IPv6 loopback."""
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
            return probe.getsockname()[1]
    except OSError:
        return None


@pytest.mark.parametrize("host", ["::1", "[::1]"])
def test_an_ipv6_host_serves_on_a_fixed_port(server_factory, tmp_path: Path, host: str) -> None:
    """--host ::1 used to bind "::1:P", which gRPC refuses; --host [::1] failed the port check.
    Without an IPv6 loopback, the server refuses the address in one line."""
    port = _ipv6_loopback_port()
    if port is None:
        result = featureserve("serve", "--host", host, "--port", "0", "--data-dir", str(tmp_path))
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert "cannot listen on [::1]:" in result.stderr
        return
    server = server_factory("--host", host, "--port", str(port))
    assert check_health(ClientConfig(target=f"[::1]:{port}"))[""] == "SERVING"
    (serving,) = [e for e in server.logs() if e["msg"] == "serving"]
    assert serving["address"] == f"[::1]:{port}"


def test_data_dir_that_is_a_file_is_a_clear_error(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    result = featureserve("serve", "--port", "0", "--data-dir", str(not_a_dir))
    assert result.returncode == 1
    assert f"data dir {not_a_dir}" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "command",
    [[], ["serve"], ["health"], ["apply"], ["ingest"], ["get"], ["predict"], ["pipeline"],
     ["pipeline", "run"], ["bench"], ["bench", "baseline"], ["bench", "lookup"],
     ["bench", "ingest"], ["bench", "infer"]],
)  # fmt: skip
def test_help_on_every_command(command: list[str]) -> None:
    result = featureserve(*command, "--help")
    assert result.returncode == 0
    assert "usage: featureserve" in result.stdout


def test_serve_freezes_start_up_objects_raises_gc_thresholds_and_drains_on_sigterm(
    tmp_path: Path,
) -> None:
    frozen: list[int] = []
    thresholds: list[tuple[int, int, int]] = []
    defaults = gc.get_threshold()

    def on_ready(port: int) -> None:
        frozen.append(gc.get_freeze_count())
        thresholds.append(gc.get_threshold())
        asyncio.get_running_loop().call_later(0.2, os.kill, os.getpid(), signal.SIGTERM)

    config = ServerConfig(port=0, data_dir=tmp_path / "data", model_repo=tmp_path / "models")
    try:
        asyncio.run(asyncio.wait_for(serve(config, on_ready), 60))
    finally:
        gc.unfreeze()
    assert frozen and frozen[0] > 10_000
    assert thresholds == [GC_THRESHOLDS]
    assert gc.get_threshold() == defaults


def _evicted_store(data_dir: Path) -> Path:
    """A store of 20k rows x 32 float32 written, closed and dropped from the page cache."""
    import numpy as np

    from featurestore.dtypes import DType
    from featurestore.online_store import DATA_FILE, OnlineStore, StoreConfig, WriteBatch
    from featurestore.registry import Entity, Feature, FeatureView, JoinKey

    features = tuple(Feature(f"f{i}", DType.FLOAT32) for i in range(32))
    with OnlineStore(StoreConfig(data_dir)) as store:
        store.registry.apply(
            [Entity("user", (JoinKey("user_id", DType.INT64),))],
            [FeatureView("stats", "user", features)],
        )
        ids = np.arange(20_000, dtype=np.int64)
        columns = {f.name: np.full(len(ids), 0.5, np.float32) for f in features}
        store.write(WriteBatch("stats", {"user_id": ids}, np.full(len(ids), 1_000_000), columns))
    assert evict(data_dir / DATA_FILE) < 0.2
    return data_dir / DATA_FILE


def test_the_store_is_read_into_the_page_cache_before_serving(server_factory, tmp_path) -> None:
    data_file = _evicted_store(tmp_path / "data")
    server = server_factory(data_dir=tmp_path / "data")
    assert resident_fraction(data_file) > 0.99
    (warmed,) = [e for e in server.logs() if e["msg"] == "store read into the page cache"]
    assert warmed["complete"] is True and warmed["of_mb"] > 3


def test_warm_store_seconds_0_leaves_the_cache_alone(server_factory, tmp_path) -> None:
    data_file = _evicted_store(tmp_path / "data")
    config = tmp_path / "featureserve.toml"
    config.write_text("warm_store_seconds = 0\n")
    server = server_factory("--config", str(config), data_dir=tmp_path / "data")
    assert resident_fraction(data_file) < 0.2
    assert not [e for e in server.logs() if e["msg"] == "store read into the page cache"]


def _held_port() -> socket.socket:
    """A listening socket on a free port, so the port is in use while it is open."""
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    return held


@pytest.mark.parametrize("workers", [(), ("--workers", "2")], ids=["single", "workers"])
@pytest.mark.parametrize(
    ("toml", "flags", "code", "message"),
    [
        ("", ("--metrics-port", "{held}"), 1, "cannot serve /metrics on 127.0.0.1:{held}"),
        ('[tls]\ncert_file = "{tmp}/no.crt"\nkey_file = "{tmp}/no.key"\n', (), 1,
         "[tls] key_file {tmp}/no.key: No such file or directory"),
        ('[audit]\npath = "{tmp}"\n', (), 1, "[audit] path {tmp}: Is a directory"),
        ("auth = 5\n", (), 2, "[auth] must be a table"),
        ('tls = "x"\n', (), 2, "[tls] must be a table"),
        ('log_level = "LOUD"\n', (), 2, "key 'log_level' is 'LOUD'"),
        ("max_message_bytes = 0\n", (), 2, "key 'max_message_bytes' is 0"),
        ("", ("--port", "70000"), 2, "command line: key 'port' is 70000; use 0-65535"),
        ("", ("--metrics-port", "-1"), 2, "command line: key 'metrics_port' is -1"),
        ("lmdb_max_dbs = 2\n", (), 2, "key 'lmdb_max_dbs' is 2; use 3-32768 (1 database for"),
        ("grace_seconds = nan\n", (), 2, "key 'grace_seconds' is nan; use a finite number"),
        ("model_poll_interval_s = 0\n", (), 2,
         "key 'model_poll_interval_s' is 0.0; it must be at least 0.05"),
        ("max_message_bytes = 2147483648\n", (), 2,
         "key 'max_message_bytes' is 2147483648; use 1-2147483647 (gRPC's largest message)"),
        (f"lmdb_map_bytes = {1 << 60}\n", (), 1,
         f"lmdb_map_bytes = {1 << 60} cannot be mapped ({{tmp}}/d: Cannot allocate memory); "
         "set lmdb_map_bytes lower"),
        ("", ("--port", "{held}", "--metrics-port", "{held}"), 2,
         "command line: key 'metrics_port' is {held}, the same as 'port'; give /metrics another"),
    ],
    ids=["metrics-port-in-use", "tls-file-missing", "audit-dir", "auth-not-table",
         "tls-not-table", "log-level", "max-message-bytes", "port", "metrics-port",
         "lmdb-max-dbs", "grace-nan", "poll-0", "max-message-bytes-over-int", "lmdb-map-huge",
         "metrics-port-is-port"],
)  # fmt: skip
def test_start_up_errors_are_one_line_without_a_traceback(
    tmp_path: Path, workers, toml: str, flags, code: int, message: str
) -> None:
    with _held_port() as held:
        fill = {"tmp": tmp_path, "held": held.getsockname()[1]}
        config = tmp_path / "featureserve.toml"
        config.write_text(toml.format(**fill))
        result = featureserve(
            "serve", "--port", "0", "--config", str(config), "--data-dir", str(tmp_path / "d"),
            "--model-repo", str(tmp_path / "m"), *(f.format(**fill) for f in flags), *workers,
        )  # fmt: skip
    lines = [line for line in result.stderr.splitlines() if not line.startswith("{")]
    assert "Traceback" not in result.stderr
    assert lines == [lines[0]] and lines[0].startswith("featureserve: ")
    assert message.format(**fill) in lines[0]
    assert result.returncode == code


def _catches_sigterm(pid: int) -> bool:
    """Whether the process has a handler for SIGTERM (its SigCgt mask in /proc)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    (mask,) = [line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")]
    return bool(int(mask, 16) >> (signal.SIGTERM - 1) & 1)


def _in_session(sid: int) -> list[int]:
    """Processes of session `sid` that still exist (not zombies)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text() if entry.name.isdigit() else ""
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split() if stat else []
        if fields and fields[0] != "Z" and int(fields[3]) == sid:
            found.append(int(entry.name))
    return found


def test_the_command_module_imports_nothing_before_it_catches_stop_signals() -> None:
    """`serve` installs its SIGTERM and SIGINT handlers first thing in main(), so what importing
    server.cli costs is time in which a stop signal still kills the process (SIGTERM) or prints
    a KeyboardInterrupt traceback (Ctrl-C): it imported asyncio, uvloop and featurestore (~60
    ms), now only the standard library's argparse."""
    heavy = {"asyncio", "uvloop", "numpy", "grpc", "onnxruntime", "lmdb", "featurestore", "protos"}
    code = "import sys, server.cli; print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert heavy.isdisjoint(result.stdout.split()), result.stdout


@pytest.mark.parametrize("workers", [(), ("--workers", "2")], ids=["single", "workers"])
@pytest.mark.parametrize("delay", [0.0, 0.05, 0.2, 0.5])
def test_sigterm_during_start_up_is_a_clean_stop(tmp_path: Path, workers, delay: float) -> None:
    """SIGTERM `delay` s after the start, or once the process catches SIGTERM if that is later:
    before the interpreter runs featureserve's first lines nothing can catch it (nor has
    anything started). Exit 0, no traceback, no process of its session left. At 0.0 the signal
    comes before the server's modules are imported, so no worker starts and nothing serves."""
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--port", "0", "--data-dir",
         str(tmp_path / "d"), "--model-repo", str(tmp_path / "m"), *workers],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        assert wait_until(lambda: _catches_sigterm(proc.pid), timeout=60, interval=0.002)
        time.sleep(max(0.0, started + delay - time.monotonic()))
        proc.send_signal(signal.SIGTERM)
        stderr = proc.communicate(timeout=60)[1]
        assert wait_until(lambda: not _in_session(proc.pid)), _in_session(proc.pid)
    finally:
        for pid in _in_session(proc.pid):
            os.kill(pid, signal.SIGKILL)
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
    if delay == 0.0:
        messages = [json.loads(line)["msg"] for line in stderr.splitlines()]
        assert "worker started" not in messages and "serving" not in messages, messages


@pytest.mark.parametrize("workers", [(), ("--workers", "2")])
def test_lmdb_max_dbs_below_what_the_store_holds_refuses_to_start(
    server_factory, tmp_path, workers: tuple[str, ...]
) -> None:
    """A store with 3 view versions needs 7 databases: restarted with lmdb_max_dbs = 5 it
    served, with some views unreadable and others unwritable; now start-up names the minimum,
    once (a --workers group's parent checks it before starting any worker)."""
    from clients.feature_client import FeatureStoreClient
    from featurestore.dtypes import DType
    from featurestore.registry import Entity, Feature, FeatureView, JoinKey

    server = server_factory()
    user = Entity("user", (JoinKey("user_id", DType.INT64),))
    views = [FeatureView(f"v{i}", "user", (Feature("x", DType.INT64),)) for i in range(3)]
    with FeatureStoreClient(ClientConfig(target=server.target, timeout_s=20)) as client:
        client.apply([user], views)
    assert server.terminate() == 0
    config = tmp_path / "small.toml"
    config.write_text("lmdb_max_dbs = 5\n")
    result = featureserve(
        "serve", "--port", "0", "--config", str(config), "--data-dir", str(tmp_path / "data"),
        "--model-repo", str(tmp_path / "models"), *workers,
    )  # fmt: skip
    lines = [line for line in result.stderr.splitlines() if not line.startswith("{")]
    assert result.returncode == 1, result.stderr
    assert lines == [
        f"featureserve: lmdb_max_dbs = 5 is too small for the store in {tmp_path / 'data'}: its 3 "
        "view versions need 7 LMDB databases; set lmdb_max_dbs to at least 7"
    ], result.stderr


def test_lmdb_max_dbs_bounds_the_view_versions_apply_creates(server_factory, tmp_path) -> None:
    """lmdb_max_dbs = 8 holds the registry and 3 view versions (online rows and history each):
    a fourth is refused at apply, RESOURCE_EXHAUSTED naming the setting and the value to set
    (it was applied, its first write failed, and the server could not restart on the store).
    Deleted versions free their room, and the commit process, whose handles of the deleted
    databases stay open, reopens its environment to write the new ones."""
    import numpy as np

    from clients.channel import ClientError
    from clients.feature_client import FeatureStoreClient
    from featurestore.dtypes import DType
    from featurestore.registry import Entity, Feature, FeatureView, JoinKey

    config = tmp_path / "featureserve.toml"
    config.write_text("lmdb_max_dbs = 8\n")
    server = server_factory("--config", str(config))
    user = Entity("user", (JoinKey("user_id", DType.INT64),))

    def view(name: str) -> FeatureView:
        return FeatureView(name, "user", (Feature("x", DType.INT64),))

    def write(client: FeatureStoreClient, name: str) -> None:
        now = np.array([int(time.time() * 1e6)])
        client.write_features(name, {"user_id": np.array([1])}, now, {"x": np.array([1])})

    with FeatureStoreClient(ClientConfig(target=server.target, timeout_s=20)) as client:
        client.apply([user], [view(f"v{i}") for i in range(3)])
        for name in ("v0", "v1", "v2"):
            write(client, name)
        with pytest.raises(ClientError) as applied:
            client.apply([], [view("v3")])
        assert applied.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "lmdb_max_dbs = 8" in applied.value.message
        assert "to at least 9" in applied.value.message
        for name in ("v0", "v1", "v2"):
            client.delete_feature_view(name, 1)
        client.apply([], [view(f"v{i}") for i in range(3, 6)])
        for name in ("v3", "v4", "v5"):
            write(client, name)
    assert server.terminate() == 0
    restarted = server_factory("--config", str(config))
    with FeatureStoreClient(ClientConfig(target=restarted.target, timeout_s=20)) as client:
        got = client.get_online_features(["v5:x"], {"user_id": np.array([1])})
        assert got["v5:x"].tolist() == [1]


def slow_loading_model(iterations: int) -> onnx.ModelProto:
    """y = x + iterations, one Add per Loop iteration: cheap to build, slow to run, so the
    repository's load (which times a dozen runs) takes seconds."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond"], ["cond_out"]),
         helper.make_node("Add", ["acc", "one"], ["acc_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, None)],
        [helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])],
    )  # fmt: skip
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trips", "go", "x"], ["y"], body=body)],
        "slow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1])],
        [helper.make_tensor("trips", TensorProto.INT64, [], [iterations]),
         helper.make_tensor("go", TensorProto.BOOL, [], [True])],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _log_records(proc: subprocess.Popen) -> queue.Queue:
    """The server's log records, read from its stderr by a thread (None once it closes)."""
    records: queue.Queue = queue.Queue()

    def read() -> None:
        for line in proc.stderr:
            records.put(json.loads(line))
        records.put(None)

    threading.Thread(target=read, daemon=True).start()
    return records


def _wait_for_log(records: queue.Queue, msg: str, timeout: float = 60.0) -> dict:
    """The next log record whose message is `msg`."""
    deadline = time.monotonic() + timeout
    while (record := records.get(timeout=max(deadline - time.monotonic(), 0.01))) is not None:
        if record["msg"] == msg:
            return record
    raise AssertionError(f"the server exited before logging {msg!r}")


def test_liveness_answers_while_models_load_and_readiness_waits(tmp_path: Path) -> None:
    """The port opens before the models load, as Triton's does: ServerLive true, ServerReady
    false, health NOT_SERVING and ModelInfer UNAVAILABLE (for a model whose newest version is
    loading, which an older one answered, and for one not reached yet, which was NOT_FOUND)
    until the repository has loaded; loads and unloads are refused meanwhile."""
    repo = tmp_path / "models"
    both = "max_batch_size = 8\n[version_policy]\nlatest = 2\n"
    write_model(repo, "slow", slow_loading_model(1), config_toml=both)  # version 1 loads first
    write_model(repo, "slow", slow_loading_model(100_000), version=2)
    write_model(repo, "zz", slow_loading_model(1))  # loaded after "slow": not yet known
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--port", str(port),
         "--data-dir", str(tmp_path / "data"), "--model-repo", str(repo)],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    infer = ks.ModelInferRequest(model_name="slow", raw_input_contents=[bytes(4)])
    infer.inputs.add(name="x", datatype="FP32", shape=[1, 1])
    records = _log_records(proc)
    try:
        _wait_for_log(records, "listening")
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            kserve = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            assert kserve.ServerLive(ks.ServerLiveRequest(), timeout=5).live
            assert not kserve.ServerReady(ks.ServerReadyRequest(), timeout=5).ready
            status = health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.RpcError) as info:  # version 1 is loaded: not the newest
                kserve.ModelInfer(infer, timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "loading" in info.value.details().lower()
            for change, request in (
                (kserve.RepositoryModelUnload, ks.RepositoryModelUnloadRequest(model_name="slow")),
                (kserve.RepositoryModelLoad, ks.RepositoryModelLoadRequest(model_name="slow")),
            ):
                with pytest.raises(grpc.RpcError) as info:  # they waited, then applied later
                    change(request, timeout=5)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "still loading its model repository" in info.value.details()
            infer.model_name = "zz"
            with pytest.raises(grpc.RpcError) as info:
                kserve.ModelInfer(infer, timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "still loading its model repository" in info.value.details()
            _wait_for_log(records, "serving")
            assert kserve.ServerReady(ks.ServerReadyRequest(), timeout=5).ready
            status = health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING
            assert kserve.ModelReady(ks.ModelReadyRequest(name="slow"), timeout=5).ready
            infer.model_name = "slow"
            assert kserve.ModelInfer(infer, timeout=30).model_version == "2"
    finally:
        proc.terminate()
    assert proc.wait(30) == 0


def test_a_stop_while_models_load_abandons_the_load(tmp_path: Path) -> None:
    """A SIGTERM during start-up waited for every model to load (a long load then outlasted the
    grace before SIGKILL); now the load stops at the version in hand and the server exits 0
    without serving."""
    repo = tmp_path / "models"
    for name in ("a1", "a2", "a3"):
        write_model(repo, name, slow_loading_model(100_000), config_toml="max_batch_size = 8\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--port", str(free_port()),
         "--data-dir", str(tmp_path / "data"), "--model-repo", str(repo)],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    records = _log_records(proc)
    try:
        _wait_for_log(records, "listening")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        proc.kill()
    messages = [r["msg"] for r in iter(records.get, None)]
    assert "stop requested while starting; abandoning start-up" in messages, messages
    assert "serving" not in messages
    assert sum(m.startswith("loaded model") for m in messages) < 3, messages


def test_a_worker_takes_connections_only_once_its_models_are_loaded(tmp_path: Path) -> None:
    """Under --workers, SO_REUSEPORT hands new connections to any worker bound to the port: a
    worker that bound before loading answered ServerReady false and failed inference while the
    others served. Reachable workers are ready ones."""
    repo = tmp_path / "models"
    write_model(repo, "slow", slow_loading_model(100_000), config_toml="max_batch_size = 8\n")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--port", str(port), "--workers", "2",
         "--data-dir", str(tmp_path / "data"), "--model-repo", str(repo)],
        stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    answers = []
    try:
        deadline = time.monotonic() + 120
        while not answers.count(True) >= 5 and time.monotonic() < deadline:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                kserve = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
                try:
                    answers.append(kserve.ServerReady(ks.ServerReadyRequest(), timeout=2).ready)
                except grpc.RpcError as exc:
                    assert exc.code() in (
                        grpc.StatusCode.UNAVAILABLE,
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                    ), exc
            time.sleep(0.02)
        proc.terminate()
        assert proc.wait(60) == 0
    finally:
        proc.kill()
    assert answers.count(True) >= 5 and False not in answers, answers
