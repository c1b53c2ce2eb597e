"""Triton's logging extension (LogSettings) on a real server: read, change, refuse, and keep one
setting across a --workers group."""

from __future__ import annotations

import json
import time

import grpc
import pytest

from benchmarks.model_zoo import mlp_model, write_model
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc

DEFAULTS = {
    "log_file": "",
    "log_info": True,
    "log_warning": True,
    "log_error": True,
    "log_verbose_level": 0,
    "log_format": "json",
}


def _request(**settings) -> pb.LogSettingsRequest:
    request = pb.LogSettingsRequest()
    for key, value in settings.items():
        param = {bool: "bool_param", int: "uint32_param", str: "string_param"}[type(value)]
        setattr(request.settings[key], param, value)
    return request


def _settings(response: pb.LogSettingsResponse) -> dict:
    return {
        key: getattr(value, value.WhichOneof("parameter_choice"))
        for key, value in response.settings.items()
    }


def _log_settings(target: str, **settings) -> dict:
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        return _settings(stub.LogSettings(_request(**settings), timeout=10))


BAD = [
    ({"log_level": "INFO"}, "unknown log setting 'log_level'"),
    ({"log_info": 0}, "'log_info' takes a value of type bool"),
    ({"log_file": False}, "'log_file' takes a value of type str"),
    ({"log_verbose_level": True}, "uint32_param"),
    ({"log_format": "ISO8601"}, "use one of json, text"),
    ({"log_file": "/tmp/x.log"}, "'log_file' cannot"),
    ({"log_info": False, "bogus": 1}, "'bogus'"),
]


def test_a_bad_setting_is_refused_naming_it_and_changes_nothing(server) -> None:
    for settings, named in BAD:
        with pytest.raises(grpc.RpcError) as caught:
            _log_settings(server.target, **settings)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, settings
        assert named in caught.value.details()
        assert _log_settings(server.target) == DEFAULTS


def test_settings_are_read_and_changed_at_run_time(server_factory, tmp_path) -> None:
    """log_info off withholds INFO records (a model's load) while errors still pass (a model
    that fails to load); log_format changes how the next records are written; the answer
    holds every setting."""
    models = tmp_path / "models"
    write_model(models, "a", mlp_model(seed=1))
    (models / "bad" / "1").mkdir(parents=True)
    (models / "bad" / "1" / "model.onnx").write_bytes(b"not an onnx model")
    server = server_factory("--model-control-mode", "explicit")
    assert _log_settings(server.target) == DEFAULTS
    assert _log_settings(server.target, log_info=False) == {**DEFAULTS, "log_info": False}
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="a"), timeout=30)
        with pytest.raises(grpc.RpcError):
            stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="bad"), timeout=30)
    changed = _log_settings(server.target, log_info=True, log_format="text", log_verbose_level=2)
    assert changed == {**DEFAULTS, "log_format": "text", "log_verbose_level": 2}
    assert server.terminate() == 0
    changes = [i for i, line in enumerate(server.log_lines) if "log settings changed" in line]
    assert len(changes) == 2, server.log_lines
    while_quiet = [json.loads(line) for line in server.log_lines[changes[0] + 1 : changes[1]]]
    assert {record["level"] for record in while_quiet} == {"error"}, while_quiet
    assert any("model bad version 1 failed to load" in r["msg"] for r in while_quiet)
    as_text = server.log_lines[changes[1] + 1 :]
    assert any(" INFO featureserve.server stopping " in line for line in as_text), as_text
    assert not any(line.startswith("{") for line in as_text), as_text


def test_a_change_through_one_worker_reaches_every_worker(server_factory) -> None:
    """The setting is the group's: the worker that did not take the call follows it, so both
    workers' last records are text; fresh connections (either worker) read the new value."""
    server = server_factory("--workers", "2")
    assert _log_settings(server.target, log_format="text")["log_format"] == "text"
    time.sleep(1.0)
    assert all(_log_settings(server.target)["log_format"] == "text" for _ in range(6))
    assert server.terminate() == 0
    stopping = [line for line in server.log_lines if "stopping" in line and "grace" in line]
    assert len(stopping) == 2 and not any(line.startswith("{") for line in stopping), stopping
