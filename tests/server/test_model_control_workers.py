"""explicit and none model control under `featureserve serve --workers 2`: one model state for the
group (server/model_control.py). A load or unload reaches one worker and every worker follows it
before the call answers; a worker the parent starts again after a crash follows the group's state,
and never serves a model folder whose files changed after the group loaded it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import grpc
import numpy as np
import pytest

from benchmarks.model_zoo import mlp_model, write_model
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from server.errors import ModelLoadError, ModelUnavailableError
from server.model_control import ACK_FILE, GroupControl
from server.model_repository import READY, UNAVAILABLE, ModelRepository
from server.worker_stats import read_statistics
from server.workers import MIN_UPTIME_S, stats_socket
from tests.conftest import wait_until
from tests.server.test_model_control import (
    fast_poll_config,
    index,
    infer,
    load,
    ready,
    reference,
    unload,
)
from tests.server.test_worker_statistics import fresh_channels

CHANNELS = 16
"""Fresh connections per check: the kernel spreads them over the workers (SO_REUSEPORT)."""


def serving(server) -> int:
    """How many workers have logged `serving` so far (restarted ones included)."""
    return sum('"msg": "serving"' in line for line in server.log_lines)


def live_workers(server) -> list[int]:
    """The pids of the group's workers now, in start order."""
    logs = server.logs()
    exited = {int(e["pid"]) for e in logs if e.get("msg") == "worker exited"}
    started = [int(e["pid"]) for e in logs if e.get("msg") == "worker started"]
    return [pid for pid in started if pid not in exited]


def served(folder: Path, pid: int) -> dict[str, int]:
    """The models worker `pid` serves, each with the rows it inferred: its own figures, read from
    its statistics socket in the group's folder."""
    answer = asyncio.run(read_statistics(stats_socket(folder, pid)))
    return {s.name: s.inference_count for s in answer.model_stats}


def on_fresh_channels(target: str, call: Callable[[pb_grpc.GRPCInferenceServiceStub], object]):
    """call(stub) on CHANNELS fresh connections: its results, an RpcError standing for a failure."""
    results = []
    for channel in fresh_channels(target, CHANNELS):
        with channel:
            try:
                results.append(call(pb_grpc.GRPCInferenceServiceStub(channel)))
            except grpc.RpcError as exc:
                results.append(exc)
    return results


def kill_worker(server, pid: int) -> int:
    """SIGKILL one worker once it is past the start-up window (a worker that dies within it stops
    the group); returns the pid of the worker the parent started in its place, once it serves."""
    started = {int(e["pid"]): e["ts"] for e in server.logs() if e.get("msg") == "worker started"}
    born = datetime.strptime(started[pid], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    time.sleep(max(0.0, MIN_UPTIME_S + 0.5 - (time.time() - born.timestamp())))
    workers = serving(server)
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: serving(server) == workers + 1, timeout=60), server.log_lines[-20:]
    (new,) = set(live_workers(server)) - set(started)
    return new


def old_files_or_refused(target: str, model_dir: Path, loaded, fix: str) -> list[grpc.RpcError]:
    """On fresh channels, some workers answer with the files the group loaded (`loaded`) and
    the others refuse UNAVAILABLE, naming the changed folder and the fix (returned); none
    serves other files."""
    answers = on_fresh_channels(target, lambda stub: infer(stub, model_dir.name))
    refusals = [a for a in answers if isinstance(a, grpc.RpcError)]
    served_old = [a for a in answers if not isinstance(a, grpc.RpcError)]
    assert refusals and served_old, answers
    assert all(np.allclose(y, reference(loaded)) for _, y in served_old)
    for refusal in refusals:
        assert refusal.code() == grpc.StatusCode.UNAVAILABLE
        assert str(model_dir) in refusal.details() and fix in refusal.details()
    return refusals


@pytest.fixture
def tmp(tmp_path: Path, monkeypatch) -> Path:
    """The $TMPDIR of the servers a test starts, where a --workers group makes its metrics
    folder (and keeps its model state): the test reads the group's files there."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setenv("TMPDIR", str(folder))
    return folder


def test_explicit_loads_and_unloads_reach_every_worker_and_a_restarted_one_follows(
    server_factory, tmp_path: Path, tmp: Path
) -> None:
    models = tmp_path / "models"
    first_c, second_c = mlp_model(seed=3), mlp_model(seed=4)
    write_model(models, "a", mlp_model(seed=1))
    write_model(models, "b", mlp_model(seed=2))
    write_model(models, "c", first_c)
    server = server_factory(
        "--workers", "2", "--config", fast_poll_config(tmp_path),
        "--model-control-mode", "explicit", "--load-model", "a", "--load-model", "b",
    )  # fmt: skip
    assert wait_until(lambda: serving(server) == 2, timeout=60)
    (folder,) = tmp.glob("featureserve-metrics-*")
    workers = live_workers(server)
    assert [set(served(folder, pid)) for pid in workers] == [{"a", "b"}] * 2

    # One worker takes each call; it answers once every worker has followed.
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        load(stub, "c")
        unload(stub, "b")
    assert [set(served(folder, pid)) for pid in workers] == [{"a", "c"}] * 2
    answers = on_fresh_channels(server.target, lambda stub: infer(stub, "c"))
    assert all(np.allclose(y, reference(first_c)) for _, y in answers), answers
    assert all(served(folder, pid)["c"] > 0 for pid in workers)
    assert not any(on_fresh_channels(server.target, lambda stub: ready(stub, "b")))

    # Started again after a crash, a worker serves what the group loaded: a (a startup model) and
    # c (loaded by request), not b (a startup model, unloaded by request).
    restarted = kill_worker(server, workers[0])
    workers = live_workers(server)
    assert [set(served(folder, pid)) for pid in workers] == [{"a", "c"}] * 2
    answers = on_fresh_channels(server.target, lambda stub: infer(stub, "c"))
    assert all(np.allclose(y, reference(first_c)) for _, y in answers), answers
    assert served(folder, restarted)["c"] > 0

    # c's files change after its load: a worker started again then does not serve them beside
    # the other worker, which keeps serving the files the group loaded; it says why and the fix.
    write_model(models, "c", second_c)
    survivor = next(pid for pid in workers if pid != restarted)
    refusing = kill_worker(server, survivor)
    assert set(served(folder, refusing)) == {"a"}
    assert set(served(folder, restarted)) == {"a", "c"}
    refusals = old_files_or_refused(server.target, models / "c", first_c, "RepositoryModelLoad")
    indexes = on_fresh_channels(server.target, index)
    refused = [i[("c", "")] for i in indexes if ("c", "") in i]
    assert refused and all(i[("c", "1")][0] == READY for i in indexes if ("c", "") not in i)
    assert refused[0][0] == UNAVAILABLE and refusals[0].details().endswith(refused[0][1])

    # Loading it again puts the new files on every worker.
    with grpc.insecure_channel(server.target) as channel:
        load(pb_grpc.GRPCInferenceServiceStub(channel), "c")
    assert [set(served(folder, pid)) for pid in (restarted, refusing)] == [{"a", "c"}] * 2
    answers = on_fresh_channels(server.target, lambda stub: infer(stub, "c"))
    assert all(np.allclose(y, reference(second_c)) for _, y in answers), answers
    assert server.terminate(timeout=60) == 0


def test_none_mode_a_restarted_worker_serves_only_the_files_the_group_loaded(
    server_factory, tmp_path: Path, tmp: Path
) -> None:
    models = tmp_path / "models"
    first_a = mlp_model(seed=1)
    write_model(models, "a", first_a)
    write_model(models, "b", mlp_model(seed=2))
    server = server_factory("--workers", "2", "--model-control-mode", "none")
    assert wait_until(lambda: serving(server) == 2, timeout=60)
    (folder,) = tmp.glob("featureserve-metrics-*")
    workers = live_workers(server)

    write_model(models, "a", mlp_model(seed=5))
    write_model(models, "d", mlp_model(seed=6))
    restarted = kill_worker(server, workers[0])
    assert set(served(folder, restarted)) == {"b"}
    assert set(served(folder, workers[1])) == {"a", "b"}
    old_files_or_refused(server.target, models / "a", first_a, "restart the whole server")
    assert not any(on_fresh_channels(server.target, lambda stub: ready(stub, "d")))
    with grpc.insecure_channel(server.target) as channel, pytest.raises(grpc.RpcError) as err:
        load(pb_grpc.GRPCInferenceServiceStub(channel), "a")
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "model_control_mode is 'none'" in err.value.details()
    assert server.terminate(timeout=60) == 0


def test_a_load_answers_once_every_worker_confirmed_or_names_those_that_did_not(
    tmp_path: Path,
) -> None:
    """The worker taking a load waits for the others' acknowledgements (their files in the
    group's folder, written here as workers 1 and 2 would): it names a worker that failed, with
    its reason, and within the caller's deadline one that did not answer. A single process has
    no group state at all."""
    models, folder = tmp_path / "models", tmp_path / "group"
    folder.mkdir()
    write_model(models, "a", mlp_model(seed=1))

    def acks(worker: int, **by_model: list) -> None:
        (folder / ACK_FILE.format(index=worker)).write_text(json.dumps(by_model))

    async def main() -> None:
        repository = ModelRepository(models, mode="explicit", startup_models=["a"])
        assert GroupControl.of_this_worker(repository) is None
        group = GroupControl(repository, folder, 0, 3)
        await group.start()
        try:
            assert repository.is_ready("a")
            # Start-up recorded a as seq 1, so the next load is seq 2.
            acks(1, a=[2, False, "models/a changed after the group's workers loaded it"])
            acks(2, a=[2, True, ""])
            with pytest.raises(ModelLoadError, match=r"failed on worker 1: models/a changed"):
                await group.load("a", lambda: 10.0)
            acks(1, a=[3, True, ""])
            acks(2, a=[3, True, ""])
            await group.load("a", lambda: 10.0)
            started = time.monotonic()
            with pytest.raises(ModelUnavailableError, match=r"but worker 1, 2 did not confirm"):
                await group.unload("a", lambda: 0.5)
            assert time.monotonic() - started < 1.0
            assert not repository.is_ready("a")
        finally:
            await group.stop()
            await repository.stop()

    asyncio.run(main())


def warmed(count: int, *extra: str) -> str:
    """config.toml of a model warmed up count times (a load that takes a while)."""
    return "\n".join(("[[model_warmup]]", 'name = "zeros"', f"count = {count}", *extra)) + "\n"


def two_workers(models: Path, folder: Path) -> tuple[GroupControl, GroupControl]:
    """Workers 0 and 1 of a group of two, in this process: each its own repository of
    `models`, one shared state folder."""
    folder.mkdir(exist_ok=True)
    groups = []
    for worker in (0, 1):
        repository = ModelRepository(models, mode="explicit", startup_models=["m"])
        repository.group = GroupControl(repository, folder, worker, 2)
        groups.append(repository.group)
    return groups[0], groups[1]


async def stop_all(*groups: GroupControl) -> None:
    for group in groups:
        await group.stop()
        await group.repository.stop()


def test_a_load_whose_files_changed_while_it_ran_is_not_recorded(tmp_path: Path) -> None:
    """The files changed on disk while worker 0 loaded them: its load is not recorded (it would
    have ordered every worker to serve files no longer there, after a newer record), the
    worker goes back to the group's record, and the caller is told to load again, which
    then reaches both workers."""
    models = tmp_path / "models"
    write_model(models, "m", mlp_model(seed=1), config_toml=warmed(1))

    async def main() -> None:
        a, b = two_workers(models, tmp_path / "group")
        await a.start()
        await b.start()
        try:
            write_model(models, "m", mlp_model(seed=1), config_toml=warmed(100_000))
            loading = asyncio.ensure_future(a.load("m", lambda: 30.0))
            await asyncio.sleep(0.5)  # its files are read at once; it warms up for seconds
            assert not loading.done()
            write_model(models, "m", mlp_model(seed=2), config_toml=warmed(1))
            with pytest.raises(ModelUnavailableError, match="changed on disk while worker 0"):
                await loading
            # back to the record (the start-up files), which the folder no longer holds
            assert not a.repository.is_ready("m")
            assert b.repository.is_ready("m")
            await a.load("m", lambda: 30.0)
            assert a.repository.is_ready("m") and b.repository.is_ready("m")
            assert a.repository.loaded_files("m") == b.repository.loaded_files("m")
        finally:
            await stop_all(a, b)

    asyncio.run(main())


def test_a_reload_that_fails_on_a_follower_leaves_it_serving_nothing(tmp_path: Path) -> None:
    """Worker 1 cannot load what worker 0 loaded (the model file went bad in between, keeping
    its size and modification time, which is all the fingerprint compares): it must not keep
    serving the old version beside the new one on worker 0, so it serves none, with the
    reason, and the caller hears which worker."""
    models = tmp_path / "models"
    model_dir = write_model(
        models,
        "m",
        mlp_model(seed=1),
        config_toml=warmed(1, "[model_warmup.inputs.x]", 'input_data_file = "x.bin"'),
    )
    (model_dir / "warmup").mkdir()
    (model_dir / "warmup" / "x.bin").write_bytes(np.zeros(32, np.float32).tobytes())

    async def main() -> None:
        a, b = two_workers(models, tmp_path / "group")
        await a.start()
        await b.start()
        try:
            assert a.repository.is_ready("m") and b.repository.is_ready("m")
            write_model(
                models,
                "m",
                mlp_model(seed=2),
                config_toml=warmed(1, "[model_warmup.inputs.x]", 'input_data_file = "x.bin"'),
            )
            seq = await a._changes.run(a._change("m", a.repository.load))
            onnx_file = model_dir / "1" / "model.onnx"  # bad before worker 1 follows
            st = onnx_file.stat()
            onnx_file.write_bytes(b"\0" * st.st_size)
            os.utime(onnx_file, ns=(st.st_atime_ns, st.st_mtime_ns))
            with pytest.raises(ModelLoadError, match=r"failed on worker 1: not served by this"):
                await a._confirmed("m", seq, "load", lambda: 10.0)
            assert a.repository.is_ready("m")
            assert not b.repository.is_ready("m")
            ((_, reason),) = [(s.state, s.reason) for s in b.repository.index() if s.name == "m"]
            assert "loading the files the group loaded failed here" in reason
        finally:
            await stop_all(a, b)

    asyncio.run(main())


def test_a_stop_ends_the_wait_for_the_other_workers(tmp_path: Path) -> None:
    """A load waiting for a worker that never confirms answers as soon as its own worker begins
    to stop, rather than holding the drain up to 30 s (and being killed)."""
    models = tmp_path / "models"
    write_model(models, "m", mlp_model(seed=1))

    async def main() -> None:
        a, _ = two_workers(models, tmp_path / "group")
        await a.start()
        try:
            loading = asyncio.ensure_future(a.load("m", lambda: 30.0))
            await asyncio.sleep(0.3)
            started = time.monotonic()
            a.repository.begin_stop()
            with pytest.raises(ModelUnavailableError, match="before worker 0 began to stop"):
                await loading
            assert time.monotonic() - started < 1.0
        finally:
            await stop_all(a)

    asyncio.run(main())


def test_a_load_cut_short_by_a_stop_is_unavailable_not_a_file_error(tmp_path: Path) -> None:
    models = tmp_path / "models"
    write_model(models, "m", mlp_model(seed=1), config_toml=warmed(2**32 - 1))

    async def main() -> None:
        repository = ModelRepository(models, mode="explicit")
        await repository.start()
        try:
            loading = asyncio.ensure_future(repository.load("m"))
            await asyncio.sleep(0.5)
            repository.begin_stop()
            with pytest.raises(ModelUnavailableError, match="abandoned, the server is stopping"):
                await loading
        finally:
            await repository.stop()

    asyncio.run(main())
