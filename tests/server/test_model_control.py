"""Triton's model control modes (model_control_mode poll | explicit | none) on a real server."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from benchmarks.model_zoo import mlp_model, write_model
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from server.config import ConfigError
from server.model_repository import READY, UNAVAILABLE, ModelRepository
from tests.conftest import featureserve

X = np.ones((2, 32), np.float32)
WATCHER_WOULD_HAVE_SEEN_IT_S = 0.6
"""Sleep this long after changing files: 12 polls at the test config's 0.05 s interval."""


def fast_poll_config(tmp_path: Path) -> str:
    """A config file polling every 0.05 s, so that a server that watched would have acted
    within WATCHER_WOULD_HAVE_SEEN_IT_S."""
    path = tmp_path / "featureserve.toml"
    path.write_text("model_poll_interval_s = 0.05\nwarm_store_seconds = 0\n")
    return str(path)


def reference(model: onnx.ModelProto) -> np.ndarray:
    """Output y of ONNX Runtime run directly on X."""
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["y"], {"x": X})[0]


def infer(stub: pb_grpc.GRPCInferenceServiceStub, model: str) -> tuple[str, np.ndarray]:
    """The version that answered and its output y for X."""
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="x", datatype="FP32", shape=X.shape)
    request.raw_input_contents.append(X.tobytes())
    response = stub.ModelInfer(request, timeout=10)
    y = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(
        response.outputs[0].shape
    )
    return response.model_version, y


def ready(stub: pb_grpc.GRPCInferenceServiceStub, model: str, version: str = "") -> bool:
    return stub.ModelReady(pb.ModelReadyRequest(name=model, version=version), timeout=10).ready


def index(stub: pb_grpc.GRPCInferenceServiceStub) -> dict[tuple[str, str], tuple[str, str]]:
    """RepositoryIndex as {(name, version): (state, reason)}."""
    models = stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10).models
    return {(m.name, m.version): (m.state, m.reason) for m in models}


def load(stub: pb_grpc.GRPCInferenceServiceStub, model: str) -> None:
    stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=model), timeout=30)


def unload(stub: pb_grpc.GRPCInferenceServiceStub, model: str) -> None:
    stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name=model), timeout=30)


def test_explicit_mode_loads_startup_models_then_changes_only_on_request(
    tmp_path: Path, server_factory
) -> None:
    models = tmp_path / "models"
    first, second = mlp_model(seed=1), mlp_model(seed=2)
    write_model(models, "a", first)
    write_model(models, "b", mlp_model(seed=3))
    server = server_factory(
        "--config", fast_poll_config(tmp_path),
        "--model-control-mode", "explicit", "--load-model", "a",
    )  # fmt: skip
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert ready(stub, "a") and not ready(stub, "b")
        state, reason = index(stub)[("b", "")]
        assert state == UNAVAILABLE and "RepositoryModelLoad" in reason
        with pytest.raises(grpc.RpcError) as err:
            infer(stub, "b")
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE

        # Nothing watches the folder: a new model and a new version wait for a load.
        write_model(models, "c", mlp_model(seed=4))
        write_model(models, "a", second, version=2)
        time.sleep(WATCHER_WOULD_HAVE_SEEN_IT_S)
        assert not ready(stub, "c") and index(stub)[("c", "")][0] == UNAVAILABLE
        version, y = infer(stub, "a")
        assert version == "1" and np.allclose(y, reference(first))

        load(stub, "a")
        version, y = infer(stub, "a")
        assert version == "2" and np.allclose(y, reference(second))
        assert not ready(stub, "a", "1")
        load(stub, "c")
        assert ready(stub, "c") and index(stub)[("c", "1")][0] == READY

        # A removed folder's model serves until it is unloaded, then leaves the index; a load
        # meanwhile says it still serves.
        shutil.rmtree(models / "c")
        time.sleep(WATCHER_WOULD_HAVE_SEEN_IT_S)
        assert infer(stub, "c")[0] == "1"
        with pytest.raises(grpc.RpcError) as gone:
            load(stub, "c")
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND
        still = "model 'c' still serves version 1 from memory, but its folder"
        assert still in gone.value.details()
        unload(stub, "c")
        assert not ready(stub, "c")
        assert not [key for key in index(stub) if key[0] == "c"]

        unload(stub, "a")
        assert not ready(stub, "a")
        assert index(stub)[("a", "2")] == (UNAVAILABLE, "unloaded by request")
        # An unloaded model whose folder goes leaves the index (no watcher does it here); a
        # folder made again under its name is a model never loaded.
        shutil.rmtree(models / "a")
        assert not [key for key in index(stub) if key[0] == "a"]
        write_model(models, "a", first, version=7)
        assert [key for key in index(stub) if key[0] == "a"] == [("a", "")]
        load(stub, "a")
        assert infer(stub, "a")[0] == "7"
    assert server.terminate() == 0


@pytest.mark.parametrize("mode", ["poll", "explicit"])
def test_a_folder_whose_name_is_not_utf8_is_skipped(tmp_path: Path, server_factory, mode) -> None:
    """No client can name it, and listing it failed the whole RepositoryIndex (UNKNOWN)."""
    models = tmp_path / "models"
    write_model(models, "a", mlp_model(seed=1))
    os.mkdir(os.fsencode(models) + b"/bad\xff")
    flags = ["--load-model", "*"] if mode == "explicit" else []
    server = server_factory("--model-control-mode", mode, *flags, model_repo=models)
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert list(index(stub)) == [("a", "1")] and ready(stub, "a")
    assert server.terminate() == 0
    assert any("is not UTF-8" in line for line in server.log_lines)


def test_none_mode_loads_every_model_once_and_refuses_control(
    tmp_path: Path, server_factory
) -> None:
    models = tmp_path / "models"
    first = mlp_model(seed=1)
    write_model(models, "a", first)
    write_model(models, "b", mlp_model(seed=2))
    server = server_factory("--config", fast_poll_config(tmp_path), "--model-control-mode", "none")
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert ready(stub, "a") and ready(stub, "b")
        write_model(models, "a", mlp_model(seed=5), version=2)
        write_model(models, "c", mlp_model(seed=6))
        time.sleep(WATCHER_WOULD_HAVE_SEEN_IT_S)
        version, y = infer(stub, "a")
        assert version == "1" and np.allclose(y, reference(first))
        assert not ready(stub, "c")
        assert "restart the server" in index(stub)[("c", "")][1]
        for action in (load, unload):
            for model in ("a", "c"):
                with pytest.raises(grpc.RpcError) as err:
                    action(stub, model)
                assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert "model_control_mode is 'none'" in err.value.details()
                assert 'set model_control_mode = "explicit"' in err.value.details()
        assert ready(stub, "a") and infer(stub, "b")[0] == "1"
    assert server.terminate() == 0


def test_explicit_star_loads_every_model_and_a_missing_startup_model_is_named(
    tmp_path: Path,
) -> None:
    write_model(tmp_path, "a", mlp_model(seed=1))
    write_model(tmp_path, "b", mlp_model(seed=2))

    async def main() -> None:
        every = ModelRepository(tmp_path, mode="explicit", startup_models=["*"])
        await every.start()
        assert every.is_ready("a") and every.is_ready("b") and not every.watch
        await every.stop()
        missing = ModelRepository(tmp_path, mode="explicit", startup_models=["a", "nope"])
        named = r"'startup_models' \(--load-model\) names 'nope', which is not a model folder"
        with pytest.raises(ConfigError, match=named):
            await missing.start()
        assert not missing.loaded()

    asyncio.run(main())


def test_a_missing_startup_model_stops_serve(tmp_path: Path) -> None:
    result = featureserve(
        "serve", "--port", "0", "--data-dir", str(tmp_path / "data"),
        "--model-repo", str(tmp_path / "models"), "--log-format", "text",
        "--model-control-mode", "explicit", "--load-model", "ghost",
    )  # fmt: skip
    assert result.returncode == 1
    assert "key 'startup_models' (--load-model) names 'ghost'" in result.stderr
    assert f"add {tmp_path / 'models' / 'ghost'}" in result.stderr


@pytest.mark.parametrize(
    ("config", "flags", "message"),
    [
        (
            'startup_models = ["a"]\n',
            [],
            "key 'startup_models' is given while 'model_control_mode' is 'poll' (the default)",
        ),
        (
            'model_control_mode = "none"\n',
            ["--load-model", "a"],
            "command line: key 'startup_models' is given while 'model_control_mode' is 'none'",
        ),
        ('model_control_mode = "manual"\n', [], "key 'model_control_mode' is 'manual'; use one"),
        (
            'model_control_mode = "explicit"\n',
            ["--load-model", "*", "--load-model", "a"],
            "command line: key 'startup_models' lists \"*\" beside other names",
        ),
    ],
)
def test_serve_refuses_bad_modes_and_combinations_naming_the_keys(
    tmp_path: Path, config: str, flags: list[str], message: str
) -> None:
    path = tmp_path / "featureserve.toml"
    path.write_text(config)
    result = featureserve(
        "serve", "--port", "0", "--config", str(path), "--data-dir", str(tmp_path / "d"), *flags
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert not (tmp_path / "d").exists()
