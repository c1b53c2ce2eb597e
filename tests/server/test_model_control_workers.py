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


def test_explicit_loads_and_unloads_reach_every_worker_and_a_restarted_one_follows(
    server_factory, tmp_path: Path, monkeypatch
) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
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
    answers = on_fresh_channels(server.target, lambda stub: infer(stub, "c"))
    refusals = [a for a in answers if isinstance(a, grpc.RpcError)]
    served_c = [a for a in answers if not isinstance(a, grpc.RpcError)]
    assert refusals and served_c, answers
    assert all(np.allclose(y, reference(first_c)) for _, y in served_c)
    for refusal in refusals:
        assert refusal.code() == grpc.StatusCode.UNAVAILABLE
        assert str(models / "c") in refusal.details() and "RepositoryModelLoad" in refusal.details()
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
    server_factory, tmp_path: Path, monkeypatch
) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
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
    answers = on_fresh_channels(server.target, lambda stub: infer(stub, "a"))
    refusals = [a for a in answers if isinstance(a, grpc.RpcError)]
    served_a = [a for a in answers if not isinstance(a, grpc.RpcError)]
    assert refusals and served_a, answers
    assert all(np.allclose(y, reference(first_a)) for _, y in served_a)
    for refusal in refusals:
        assert refusal.code() == grpc.StatusCode.UNAVAILABLE
        assert str(models / "a") in refusal.details()
        assert "restart the whole server" in refusal.details()
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
