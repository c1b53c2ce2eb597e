"""The model repository: version policy, hot load/unload under traffic, failure isolation."""

import asyncio
import logging
import re
import shutil
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from benchmarks.model_zoo import add_sub_model, mlp_model, write_model
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from server.errors import (
    ControlRefusedError,
    InvalidRequestError,
    ModelLoadError,
    ModelNotFoundError,
    ModelUnavailableError,
)
from server.inference_servicer import start_server
from server.model_repository import READY, UNAVAILABLE, ModelRepository, VersionStatus

X = np.ones((2, 32), np.float32)
RELOAD_FAILED = "serving the previously loaded version; reload failed: "


def reference(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """Output y of ONNX Runtime run directly on x, to compare served results with."""
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["y"], {"x": x})[0]


def with_repository(repository: Path, check: Callable[[ModelRepository], Awaitable[None]]) -> None:
    """Start a real ModelRepository over the folder (no watcher), run check(repo), stop it."""

    async def main() -> None:
        repo = ModelRepository(repository, watch=False)
        await repo.start()
        try:
            await check(repo)
        finally:
            await repo.stop()

    asyncio.run(main())


def repository_logs(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    """The repository's log records whose message contains text."""
    return [r for r in caplog.records if r.name == "featureserve.models" and text in r.getMessage()]


def test_latest_policy_serves_highest_version_and_specific_lists(tmp_path: Path) -> None:
    write_model(tmp_path, "mlp", mlp_model(seed=1), version=1)
    write_model(tmp_path, "mlp", mlp_model(seed=2), version=2)
    write_model(
        tmp_path, "pinned", mlp_model(), version=1, config_toml="[version_policy]\nspecific = [1]\n"
    )
    write_model(tmp_path, "pinned", mlp_model(), version=2)

    async def main() -> None:
        repo = ModelRepository(tmp_path, watch=False)
        await repo.start()
        assert repo.versions("mlp") == ["2"]
        assert repo.get("mlp").version == "2"
        assert repo.versions("pinned") == ["1"]
        with pytest.raises(ModelNotFoundError, match="no version '1'"):
            repo.get("mlp", "1")
        with pytest.raises(ModelNotFoundError, match="no model 'nope'"):
            repo.get("nope")
        await repo.stop()

    asyncio.run(main())


def test_corrupt_version_is_reported_and_others_serve(tmp_path: Path) -> None:
    write_model(tmp_path, "good", mlp_model())
    write_model(tmp_path, "bad", b"this is not an onnx model")
    write_model(tmp_path, "badconfig", mlp_model(), config_toml="batch = 4\n")

    async def main() -> None:
        repo = ModelRepository(tmp_path, watch=False)
        await repo.start()
        index = {(s.name, s.version): s for s in repo.index()}
        assert index[("good", "1")].state == READY
        assert index[("bad", "1")].state == UNAVAILABLE
        assert index[("bad", "1")].reason.startswith(str(tmp_path / "bad" / "1" / "model.onnx"))
        assert "INVALID_PROTOBUF" in index[("bad", "1")].reason
        assert index[("badconfig", "")].reason.startswith(
            str(tmp_path / "badconfig" / "config.toml")
        )
        assert "unknown key 'batch'" in index[("badconfig", "")].reason
        assert not repo.is_ready("bad") and not repo.is_ready("badconfig")
        with pytest.raises(ModelUnavailableError, match="not ready"):
            repo.get("bad")
        result = await repo.get("good").batcher.submit({"x": X}, 2)
        assert result["y"].shape == (2, 1)
        write_model(tmp_path, "bad", mlp_model())
        await repo.poll()
        assert repo.is_ready("bad")
        await repo.stop()

    asyncio.run(main())


async def wait_for(condition) -> None:
    """Wait up to 10 s for the repository's watcher to make condition() true."""
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the watcher did not act within 10 s")


def test_watcher_loads_new_versions_and_unloads_removed_ones(tmp_path: Path) -> None:
    write_model(tmp_path, "mlp", mlp_model(seed=1), version=1)

    async def main() -> None:
        repo = ModelRepository(tmp_path, watch=True, poll_interval_s=0.05)
        await repo.start()
        write_model(tmp_path, "mlp", mlp_model(seed=2), version=2)
        await wait_for(lambda: repo.versions("mlp") == ["2"])
        write_model(tmp_path, "other", add_sub_model())
        await wait_for(lambda: repo.is_ready("other"))
        shutil.rmtree(tmp_path / "other")
        await wait_for(lambda: all(s.name != "other" for s in repo.index()))
        with pytest.raises(ModelNotFoundError):
            repo.get("other")
        await repo.stop()

    asyncio.run(main())


def test_files_beside_the_versions_are_watched_and_an_unreadable_one_blocks_nothing(
    tmp_path: Path,
) -> None:
    """Editing a file config.toml may name (notes/readme.txt here) reloads the model; a symlink
    loop beside the versions, which nothing names, neither fails the load nor the watcher."""
    model_dir = write_model(tmp_path, "mlp", mlp_model(seed=1))
    (model_dir / "loop").symlink_to("loop")
    (model_dir / "notes").mkdir()
    (model_dir / "notes" / "readme.txt").write_text("v1")
    (model_dir / ".swap").write_text("ignored")

    async def main() -> None:
        repo = ModelRepository(tmp_path, watch=True, poll_interval_s=0.05)
        await repo.start()
        try:
            assert repo.is_ready("mlp")
            first = repo.get("mlp")
            (model_dir / ".swap").write_text("still ignored")
            await asyncio.sleep(0.3)
            assert repo.get("mlp") is first
            (model_dir / "notes" / "readme.txt").write_text("v2, longer")
            await wait_for(lambda: repo.get("mlp") is not first)
            assert repo.is_ready("mlp")
        finally:
            await repo.stop()

    asyncio.run(main())


def test_model_without_a_servable_version_is_reported_logged_once_and_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="featureserve.models")
    (tmp_path / "empty" / "1").mkdir(parents=True)
    pinned = "[version_policy]\nspecific = [5]\n"
    write_model(tmp_path, "pinned", mlp_model(), version=1, config_toml=pinned)
    write_model(tmp_path, "pinned", mlp_model(), version=2)
    write_model(tmp_path, "good", mlp_model())
    write_model(tmp_path, "gone", mlp_model())
    no_version = f"no version directory (1/, 2/, ...) holding model.onnx in {tmp_path / 'empty'}"
    no_match = (
        f"version_policy specific = [5] in {tmp_path / 'pinned' / 'config.toml'} "
        "selects no existing version; found 1, 2"
    )

    async def main() -> None:
        repo = ModelRepository(tmp_path, watch=False)
        await repo.start()
        index = {(s.name, s.version): s for s in repo.index()}
        assert index[("empty", "")].state == UNAVAILABLE
        assert index[("empty", "")].reason.startswith(no_version)
        assert index[("pinned", "")].state == UNAVAILABLE
        assert index[("pinned", "")].reason.startswith(no_match)
        assert [k for k in index if k[0] == "pinned"] == [("pinned", "")]
        assert not repo.is_ready("empty") and not repo.is_ready("pinned")
        with pytest.raises(ModelUnavailableError, match="no version directory"):
            repo.get("empty")
        with pytest.raises(ModelLoadError, match=r"failed to load: no version directory"):
            await repo.load("empty")
        with pytest.raises(ModelLoadError, match=r"specific = \[5\] .* found 1, 2"):
            await repo.load("pinned")
        await repo.poll()
        for text in (no_version, no_match):
            [record] = repository_logs(caplog, text)
            assert record.levelno == logging.WARNING
        assert repo.is_ready("good")

        shutil.rmtree(tmp_path / "gone" / "1")
        await repo.poll()
        gone = next(s for s in repo.index() if (s.name, s.version) == ("gone", ""))
        assert gone.state == UNAVAILABLE and gone.reason.startswith("no version directory")
        assert not repo.is_ready("gone")

        write_model(tmp_path, "empty", mlp_model())
        write_model(tmp_path, "pinned", mlp_model(), version=5)
        await repo.poll()
        assert repo.versions("empty") == ["1"] and repo.versions("pinned") == ["5"]
        assert {s.state for s in repo.index() if s.name in ("empty", "pinned")} == {READY}
        await repo.stop()

    asyncio.run(main())


def test_failed_reload_keeps_serving_ready_with_the_reason_and_fails_the_load(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="featureserve.models")
    first, fixed = mlp_model(seed=1), mlp_model(seed=2)
    write_model(tmp_path, "m", first)
    onnx_path = tmp_path / "m" / "1" / "model.onnx"
    config_path = tmp_path / "m" / "config.toml"

    async def serves(repo: ModelRepository, model: onnx.ModelProto) -> None:
        assert repo.is_ready("m")
        result = await repo.get("m").batcher.submit({"x": X}, 2)
        np.testing.assert_allclose(result["y"], reference(model, X), rtol=1e-6)

    async def main() -> None:
        repo = ModelRepository(tmp_path, watch=False)
        await repo.start()
        await serves(repo, first)

        write_model(tmp_path, "m", b"this is not an onnx model")
        await repo.poll()
        [entry] = [s for s in repo.index() if s.name == "m"]
        assert (entry.version, entry.state) == ("1", READY)
        assert entry.reason.startswith(f"{RELOAD_FAILED}{onnx_path}: InvalidProtobuf")
        await serves(repo, first)
        with pytest.raises(ModelLoadError, match="failed to load, still serving version 1"):
            await repo.load("m")
        [record] = repository_logs(caplog, f"{RELOAD_FAILED}{onnx_path}")
        assert record.levelno == logging.ERROR

        config_path.write_text("batch = 4\n")
        await repo.poll()
        [entry] = [s for s in repo.index() if s.name == "m"]
        assert (entry.version, entry.state) == ("1", READY)
        assert entry.reason.startswith(f"{RELOAD_FAILED}{config_path}: unknown key 'batch'")
        await serves(repo, first)
        assert repository_logs(caplog, f"{RELOAD_FAILED}{config_path}: unknown key 'batch'")

        config_path.unlink()
        write_model(tmp_path, "m", b"not a model either", version=2)
        await repo.poll()
        index = {s.version: s for s in repo.index() if s.name == "m"}
        assert index["1"].state == READY and index["1"].reason.startswith(RELOAD_FAILED)
        assert index["2"].state == UNAVAILABLE
        assert index["2"].reason.startswith(str(tmp_path / "m" / "2" / "model.onnx"))
        with pytest.raises(ModelUnavailableError, match="version 2 is not ready"):
            repo.get("m", "2")
        await serves(repo, first)

        shutil.rmtree(tmp_path / "m" / "2")
        write_model(tmp_path, "m", fixed)
        await repo.poll()
        assert [(s.version, s.state, s.reason) for s in repo.index()] == [("1", READY, "")]
        await serves(repo, fixed)
        await repo.stop()

    asyncio.run(main())


def test_load_and_unload_under_traffic_finish_in_flight_requests_and_spare_the_staying_model(
    tmp_path: Path,
) -> None:
    stay_config = "[version_policy]\nlatest = 2\n[dynamic_batching]\nmax_queue_delay_us = 500\n"
    write_model(tmp_path, "stay", mlp_model(), config_toml=stay_config)
    churn_config = (
        "[dynamic_batching]\nmax_queue_delay_us = 60000000\n[instance_group]\ninline_max_us = 0\n"
    )
    churn_model = mlp_model(seed=7)
    write_model(tmp_path, "churn", churn_model, config_toml=churn_config)
    stay_models = {"1": mlp_model(), **{str(2 + r): mlp_model(seed=r) for r in range(3)}}
    rng = np.random.default_rng(3)

    async def main() -> None:
        repo = ModelRepository(tmp_path, watch=False)
        await repo.start()
        stop = asyncio.Event()
        served: list[tuple[str, np.ndarray]] = []

        async def traffic() -> None:
            while not stop.is_set():
                model = repo.get("stay")
                result = await model.batcher.submit({"x": X}, 2)
                served.append((model.version, result["y"]))

        clients = [asyncio.create_task(traffic()) for _ in range(8)]
        for round_ in range(3):
            churn = repo.get("churn")
            inputs = [rng.standard_normal((2, 32)).astype(np.float32) for _ in range(20)]
            in_flight = [asyncio.create_task(churn.batcher.submit({"x": x}, 2)) for x in inputs]
            await asyncio.sleep(0.05)
            assert churn.batcher.queued == 20 and not any(t.done() for t in in_flight)
            await repo.unload("churn")
            for task, x in zip(in_flight, inputs, strict=True):
                np.testing.assert_allclose(task.result()["y"], reference(churn_model, x), rtol=1e-5)
            with pytest.raises(ModelUnavailableError, match="unloaded by request"):
                repo.get("churn")
            with pytest.raises(ModelUnavailableError, match="unloading"):
                await churn.batcher.submit({"x": X}, 2)
            await repo.poll()
            assert not repo.is_ready("churn")
            await repo.load("churn")
            write_model(tmp_path, "stay", stay_models[str(2 + round_)], version=2 + round_)
            await repo.poll()
        assert repo.versions("stay") == ["3", "4"]
        await asyncio.sleep(0.05)
        stop.set()
        clients_done = await asyncio.gather(*clients, return_exceptions=True)
        await repo.stop()
        assert [r for r in clients_done if r is not None] == []
        assert {version for version, _ in served} >= {"1", "4"}
        for version, y in served:
            np.testing.assert_allclose(y, reference(stay_models[version], X), rtol=1e-5)

    asyncio.run(main())


def test_an_unreadable_model_folder_is_that_models_load_error_at_start_and_in_the_watcher(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A model.onnx that is a symlink to itself (stat fails with ELOOP, as an unreadable folder
    fails with EACCES) is its own model's load error, at start and in the watcher; models sorted
    after it load, a served one keeps serving, and both recover once the file is fixed.
    Symlinks are swapped by rename so that the watcher never sees the file missing."""
    caplog.set_level(logging.ERROR, logger="featureserve.models")
    (tmp_path / "a_bad" / "1").mkdir(parents=True)
    loop = tmp_path / "a_bad" / "1" / "model.onnx"
    loop.symlink_to("model.onnx")
    write_model(tmp_path, "b_good", mlp_model())
    write_model(tmp_path, "c_served", mlp_model(seed=1))
    broken = tmp_path / "c_served" / "1" / "model.onnx"
    fixed = mlp_model(seed=2)

    def entry(repo: ModelRepository, name: str) -> VersionStatus:
        [status] = [s for s in repo.index() if s.name == name]
        return status

    async def main() -> None:
        repo = ModelRepository(tmp_path, watch=True, poll_interval_s=0.05)
        await repo.start()
        bad = entry(repo, "a_bad")
        assert (bad.version, bad.state) == ("", UNAVAILABLE)
        assert bad.reason.startswith(f"{loop}: cannot be read: Too many levels of symbolic links")
        assert not repo.is_ready("a_bad")
        with pytest.raises(ModelUnavailableError, match="cannot be read"):
            repo.get("a_bad")
        with pytest.raises(ModelLoadError, match=r"a_bad' failed to load: .*cannot be read"):
            await repo.load("a_bad")
        assert repo.is_ready("b_good") and repo.is_ready("c_served")

        swap = broken.with_name("loop.tmp")
        swap.symlink_to("model.onnx")
        swap.replace(broken)
        write_model(tmp_path, "d_new", mlp_model())
        await wait_for(lambda: repo.is_ready("d_new"))
        served = entry(repo, "c_served")
        assert (served.version, served.state) == ("1", READY)
        assert served.reason.startswith(f"{RELOAD_FAILED}{broken}: cannot be read")
        first = repo.get("c_served")
        result = await first.batcher.submit({"x": X}, 2)
        np.testing.assert_allclose(result["y"], reference(mlp_model(seed=1), X), rtol=1e-6)

        write_model(tmp_path, "c_served", fixed)
        write_model(tmp_path, "a_bad", mlp_model())
        await wait_for(lambda: repo.is_ready("a_bad") and repo.get("c_served") is not first)
        assert not entry(repo, "c_served").reason
        result = await repo.get("c_served").batcher.submit({"x": X}, 2)
        np.testing.assert_allclose(result["y"], reference(fixed, X), rtol=1e-6)
        assert {s.state for s in repo.index()} == {READY}
        await repo.stop()
        for path in (loop, broken):
            [record] = repository_logs(caplog, f"{path}: cannot be read")
            assert record.levelno == logging.ERROR

    asyncio.run(main())


def test_a_folder_readable_again_unchanged_clears_its_error_without_a_reload(
    tmp_path: Path,
) -> None:
    """config.toml is a symlink to settings.toml; pointed at itself, the model keeps serving with
    the error as reason; pointed back, the stats match the loaded ones: the error clears and the
    loaded version keeps serving as it is."""
    write_model(tmp_path, "m", mlp_model())
    config = tmp_path / "m" / "config.toml"
    (tmp_path / "m" / "settings.toml").write_text("max_batch_size = 8\n")
    config.symlink_to("settings.toml")

    def point(target: str) -> None:
        swap = config.with_name("swap.tmp")
        swap.symlink_to(target)
        swap.replace(config)

    async def main() -> None:
        repo = ModelRepository(tmp_path, watch=False)
        await repo.start()
        first = repo.get("m")
        assert first.config.max_batch_size == 8
        point("config.toml")
        await repo.poll()
        [entry] = repo.index()
        assert (entry.version, entry.state) == ("1", READY)
        assert entry.reason.startswith(f"{RELOAD_FAILED}{config}: cannot be read")
        point("settings.toml")
        await repo.poll()
        assert [(s.version, s.state, s.reason) for s in repo.index()] == [("1", READY, "")]
        assert repo.get("m") is first
        await repo.stop()

    asyncio.run(main())


def write_version_folder(model_dir: Path, folder: str, model: onnx.ModelProto) -> None:
    """Write <model_dir>/<folder>/model.onnx under any folder name, digits or not."""
    (model_dir / folder).mkdir(parents=True, exist_ok=True)
    (model_dir / folder / "model.onnx").write_bytes(model.SerializeToString())


async def rpc_code(call) -> grpc.StatusCode:
    """The status an awaited gRPC call ends with (OK when it succeeds)."""
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_version_folders_are_numbers_from_1_without_leading_zeros_and_others_spare_the_rest(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A folder of non-ASCII digits ("²", which str.isdigit accepts and int() refuses) is
    ignored, at start and in the watcher, and models sorted after it load; one with a leading
    zero is an UNAVAILABLE entry of its own name saying what to rename it to."""
    caplog.set_level(logging.WARNING, logger="featureserve.models")
    first = mlp_model(seed=1)
    write_model(tmp_path, "alpha", first)
    write_version_folder(tmp_path / "alpha", "²", mlp_model(seed=2))
    write_model(tmp_path, "zeta", mlp_model())
    write_version_folder(tmp_path / "lead", "01", mlp_model())
    lead = tmp_path / "lead"
    renamed = f"{lead / '01'}: ignored: a version folder is named by a number from 1 without "
    renamed += f"leading zeros; rename it to {lead / '1'} to serve it"

    async def main() -> None:
        repo = ModelRepository(tmp_path, watch=True, poll_interval_s=0.05)
        await repo.start()
        assert repo.versions("alpha") == ["1"] and repo.versions("zeta") == ["1"]
        result = await repo.get("alpha").batcher.submit({"x": X}, 2)
        np.testing.assert_allclose(result["y"], reference(first, X), rtol=1e-6)
        index = {(s.name, s.version): s for s in repo.index() if s.name == "lead"}
        assert list(index) == [("lead", ""), ("lead", "01")]
        assert index[("lead", "01")] == VersionStatus("lead", "01", UNAVAILABLE, renamed)
        assert index[("lead", "")].state == UNAVAILABLE
        assert index[("lead", "")].reason.endswith(f"; {renamed}")
        with pytest.raises(ModelLoadError, match=f"failed to load: .*rename it to {lead}"):
            await repo.load("lead")
        await repo.poll()
        [record] = repository_logs(caplog, f"model lead: {renamed}")
        assert record.levelno == logging.WARNING

        write_version_folder(tmp_path / "zeta", "²", mlp_model(seed=3))
        write_model(tmp_path, "zeta", mlp_model(seed=4), version=2)
        write_model(tmp_path, "zz_new", mlp_model())
        await wait_for(lambda: repo.is_ready("zz_new") and repo.versions("zeta") == ["2"])
        (lead / "01").rename(lead / "1")
        await wait_for(lambda: repo.is_ready("lead"))
        assert [(s.version, s.state) for s in repo.index() if s.name == "lead"] == [("1", READY)]
        await repo.stop()

    asyncio.run(main())


def test_a_requested_version_that_is_not_a_version_number_is_not_found(tmp_path: Path) -> None:
    """Versions a request names go through the same rule as folders: "²" (isdigit but not
    int()), "01", "0" and the like are NOT_FOUND over every RPC that takes a version."""
    write_model(tmp_path, "m", mlp_model())
    bad_versions = ["²", "01", "0", "-1", " 1", "1.0", "\u0661"]

    async def main() -> None:
        repo = ModelRepository(tmp_path, watch=False)
        await repo.start()
        assert repo.get("m", "1").version == "1"
        for version in bad_versions:
            message = f"no version {re.escape(repr(version))}: .*served: 1"
            with pytest.raises(ModelNotFoundError, match=message):
                repo.get("m", version)
            assert not repo.is_ready("m", version)
        with pytest.raises(ModelNotFoundError, match="no model 'nope'"):
            repo.get("nope", "²")
        server, port = await start_server(repo)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                infer = pb.ModelInferRequest(model_name="m", model_version="²")
                infer.inputs.add(name="x", datatype="FP32", shape=X.shape)
                infer.raw_input_contents.append(X.tobytes())
                assert await rpc_code(stub.ModelInfer(infer)) == grpc.StatusCode.NOT_FOUND
                for call in (
                    stub.ModelMetadata(pb.ModelMetadataRequest(name="m", version="²")),
                    stub.ModelStatistics(pb.ModelStatisticsRequest(name="m", version="²")),
                    stub.ModelConfig(pb.ModelConfigRequest(name="m", version="²")),
                ):
                    assert await rpc_code(call) == grpc.StatusCode.NOT_FOUND
                ready = await stub.ModelReady(pb.ModelReadyRequest(name="m", version="²"))
                assert not ready.ready
        finally:
            await server.stop(None)
            await repo.stop()

    asyncio.run(main())


def test_load_and_unload_take_only_the_name_of_a_folder_in_the_repository(tmp_path: Path) -> None:
    """A model name is one folder name: paths leading out of the repository (a model anywhere on
    disk), into a version folder or back into it are refused as INVALID_ARGUMENT and leave no
    entry; a symlinked model folder inside the repository loads as the watcher loads it."""
    models = tmp_path / "models"
    write_model(models, "m", mlp_model())
    write_model(tmp_path / "outside", "secret", mlp_model(seed=1))
    write_model(tmp_path / "shared", "linked", mlp_model(seed=2))
    (models / "linked").symlink_to(tmp_path / "shared" / "linked")
    bad_names = ["../outside/secret", str(tmp_path / "outside" / "secret"), "", ".", ".."]
    bad_names += ["m/1", "m/../m", "m/", "m\0"]

    async def main() -> None:
        repo = ModelRepository(models, watch=False)
        await repo.start()
        assert repo.versions("linked") == ["1"]
        for name in bad_names:
            for action in (repo.load, repo.unload):
                message = f"model_name {re.escape(repr(name))} is not a model name"
                with pytest.raises(InvalidRequestError, match=message):
                    await action(name)
        with pytest.raises(ModelNotFoundError, match=f"no model folder 'nope' in {models}"):
            await repo.load("nope")
        await repo.unload("linked")
        await repo.load("linked")
        assert repo.versions("linked") == ["1"]
        assert {s.name for s in repo.index()} == {"m", "linked"}
        server, port = await start_server(repo)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                load = stub.RepositoryModelLoad(
                    pb.RepositoryModelLoadRequest(model_name="../outside/secret")
                )
                assert await rpc_code(load) == grpc.StatusCode.INVALID_ARGUMENT
                unload = stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name=""))
                assert await rpc_code(unload) == grpc.StatusCode.INVALID_ARGUMENT
        finally:
            await server.stop(None)
            await repo.stop()
        assert {s.name for s in repo.index()} == {"m", "linked"}

    asyncio.run(main())


def test_a_load_or_unload_whose_caller_is_cancelled_still_runs_to_its_end(tmp_path: Path) -> None:
    """A client's deadline cancels the RPC's handler mid-change: the unload still drains and
    frees the version, the load still serves it (they stayed UNLOADING / LOADING for good, and
    the unloaded version's instance thread never stopped)."""
    config = (
        "[dynamic_batching]\nmax_queue_delay_us = 60000000\n[instance_group]\ninline_max_us = 0\n"
    )
    write_model(tmp_path, "m", mlp_model(), config_toml=config)

    async def cancelled_soon(change) -> None:
        task = asyncio.create_task(change)
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    async def main() -> None:
        repo = ModelRepository(tmp_path, watch=False)
        await repo.start()
        threads = threading.active_count()
        queued = asyncio.create_task(repo.get("m").batcher.submit({"x": X}, 2))
        await asyncio.sleep(0.01)
        await cancelled_soon(repo.unload("m"))
        await wait_for(
            lambda: repo.index() == [VersionStatus("m", "1", UNAVAILABLE, "unloaded by request")]
        )
        assert queued.result()["y"].shape == (2, 1)
        await wait_for(lambda: threading.active_count() == threads - 1)
        await cancelled_soon(repo.load("m"))
        await wait_for(lambda: repo.is_ready("m"))
        assert repo.index() == [VersionStatus("m", "1", READY)]
        await repo.stop()

    asyncio.run(main())


def test_an_unloaded_model_whose_folder_goes_is_forgotten_and_a_new_folder_loads(
    tmp_path: Path,
) -> None:
    """Unload keeps the watcher off a model while its folder exists; once the folder is gone the
    model leaves the index, and a folder made again under its name is a new model."""
    write_model(tmp_path, "m", mlp_model())

    async def main() -> None:
        repo = ModelRepository(tmp_path, watch=False)
        await repo.start()
        await repo.unload("m")
        await repo.poll()
        assert repo.index() == [VersionStatus("m", "1", UNAVAILABLE, "unloaded by request")]
        shutil.rmtree(tmp_path / "m")
        await repo.poll()
        assert repo.index() == []
        with pytest.raises(ModelNotFoundError, match="no model 'm'"):
            await repo.unload("m")
        write_model(tmp_path, "m", mlp_model(seed=3), version=2)
        await repo.poll()
        assert repo.versions("m") == ["2"]
        await repo.stop()

    asyncio.run(main())


def test_explicit_control_refused_and_overlong_names_are_invalid(tmp_path: Path) -> None:
    """control=False (each of several --workers) refuses load and unload FAILED_PRECONDITION,
    naming the folder to change instead; a name longer than a folder name can be is
    INVALID_ARGUMENT (it was INTERNAL: the file system's ENAMETOOLONG)."""
    write_model(tmp_path, "m", mlp_model())

    async def main() -> None:
        watched = ModelRepository(tmp_path, watch=True, control=False)
        await watched.start()
        for action in (watched.load, watched.unload):
            with pytest.raises(ControlRefusedError, match=f"change the files in {tmp_path / 'm'}"):
                await action("m")
        await watched.stop()
        shared = ModelRepository(tmp_path, watch=False, control=False)
        await shared.start()
        for action in (shared.load, shared.unload):  # no watcher: files change nothing
            with pytest.raises(ControlRefusedError, match="only when the group restarts; set wat"):
                await action("m")
        with pytest.raises(InvalidRequestError, match="at most 255 bytes"):
            await shared.unload("a" * 300)
        assert shared.is_ready("m")
        await shared.stop()
        repo = ModelRepository(tmp_path, watch=False)
        await repo.start()
        server, port = await start_server(repo)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                for name in ("a" * 256, "é" * 128):
                    load = stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=name))
                    assert await rpc_code(load) == grpc.StatusCode.INVALID_ARGUMENT
                    with pytest.raises(InvalidRequestError, match="at most 255 bytes"):
                        await repo.unload(name)
                load = stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="a" * 255))
                assert await rpc_code(load) == grpc.StatusCode.NOT_FOUND
        finally:
            await server.stop(None)
            await repo.stop()

    asyncio.run(main())


def test_a_repository_folder_gone_keeps_models_serving_and_is_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_model(tmp_path / "models", "m", mlp_model())

    async def main() -> None:
        repo = ModelRepository(tmp_path / "models", poll_interval_s=0.02)
        await repo.start()
        (tmp_path / "models").rename(tmp_path / "moved")
        await asyncio.sleep(0.3)
        assert repo.is_ready("m")
        (tmp_path / "moved").rename(tmp_path / "models")
        await asyncio.sleep(0.1)
        (tmp_path / "models").rename(tmp_path / "moved")
        await asyncio.sleep(0.2)
        await repo.stop()

    with caplog.at_level(logging.ERROR, logger="featureserve.models"):
        asyncio.run(main())
    errors = repository_logs(caplog, f"model repository {tmp_path / 'models'} cannot be read")
    assert len(errors) == 2 and all(r.exc_info is None for r in errors)
    assert "served models stay" in errors[0].getMessage()
