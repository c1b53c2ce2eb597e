"""Triton's trace extension (TraceSetting and per-request timestamp traces) on a real server:
settings globally and per model, refusals, sampled records in the trace file, trace_rate and
trace_count, cache hits, streams, start-up config, and one setting across a --workers group."""

from __future__ import annotations

import json
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from benchmarks.model_zoo import mlp_model, write_model
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from server.config import ConfigError
from server.tracing import TraceSettings, parse_trace
from tests.conftest import featureserve, wait_until
from tests.server.test_auth import AUTH_TOML, TOKENS
from tests.server.test_inference_rpc import infer_request

STAMPS = [
    "REQUEST_START",
    "QUEUE_START",
    "COMPUTE_START",
    "COMPUTE_INPUT_END",
    "COMPUTE_OUTPUT_START",
    "COMPUTE_END",
    "REQUEST_END",
]
ROW = np.ones((1, 32), np.float32)


def _request(model: str, settings: dict) -> pb.TraceSettingRequest:
    """None clears a setting; a string is one value; a list is the values."""
    request = pb.TraceSettingRequest(model_name=model)
    for key, value in settings.items():
        values = [] if value is None else [value] if isinstance(value, str) else value
        request.settings[key].value.extend(values)
    return request


def _trace(target: str, model: str = "", token: str | None = None, **settings) -> dict:
    metadata = [("authorization", f"Bearer {token}")] if token else None
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        response = stub.TraceSetting(_request(model, settings), timeout=10, metadata=metadata)
    return {key: list(value.value) for key, value in response.settings.items()}


def _infer(target: str, ids: list[str], model: str = "m", version: str = "") -> None:
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for request_id in ids:
            request = infer_request(model, {"x": ROW}, id=request_id, model_version=version)
            stub.ModelInfer(request, timeout=10)


def _records(path: Path, count: int) -> list[dict]:
    """The trace file's records once it holds `count` (written by a background thread)."""

    def lines() -> list[str]:
        return path.read_text().splitlines() if path.exists() else []

    assert wait_until(lambda: len(lines()) >= count), lines()
    time.sleep(0.2)  # no record beyond `count` follows
    return [json.loads(line) for line in lines()]


def _check_complete(record: dict) -> None:
    """An answered request: seven timestamps, named and ordered as Triton's, never going back."""
    assert record["status"] == "OK", record
    assert [s["name"] for s in record["timestamps"]] == STAMPS, record
    ns = [s["ns"] for s in record["timestamps"]]
    assert ns == sorted(ns) and ns[0] > 0, record


@pytest.fixture
def models(tmp_path: Path) -> Path:
    write_model(tmp_path / "models", "m", mlp_model(seed=1))
    write_model(tmp_path / "models", "n", mlp_model(seed=2))
    return tmp_path / "models"


def _defaults(data_dir: Path) -> dict:
    return {
        "trace_file": [str(data_dir / "trace.jsonl")],
        "trace_level": ["OFF"],
        "trace_rate": ["1000"],
        "trace_count": ["-1"],
        "log_frequency": ["0"],
    }


def test_settings_round_trip_globally_and_per_model(server_factory, models, tmp_path) -> None:
    """A model follows every global setting it does not set itself; clearing a model's
    setting makes it follow the global one again, clearing a global one restores its start-up
    value; the extension is listed."""
    server = server_factory()
    defaults = _defaults(tmp_path / "data")
    assert _trace(server.target) == defaults == _trace(server.target, "m")
    assert _trace(server.target, trace_rate="5")["trace_rate"] == ["5"]
    own = _trace(server.target, "m", trace_level="TIMESTAMPS", trace_rate="2")
    assert own == {**defaults, "trace_level": ["TIMESTAMPS"], "trace_rate": ["2"]}
    assert _trace(server.target, trace_count="7", log_frequency="3") == {
        **defaults,
        "trace_rate": ["5"],
        "trace_count": ["7"],
        "log_frequency": ["3"],
    }
    followed = _trace(server.target, "m")
    assert followed["trace_count"] == ["7"] and followed["log_frequency"] == ["3"]
    assert followed["trace_rate"] == ["2"] and followed["trace_level"] == ["TIMESTAMPS"]
    assert _trace(server.target, "n")["trace_level"] == ["OFF"]  # another model: global
    assert _trace(server.target, "m", trace_rate=None)["trace_rate"] == ["5"]
    assert _trace(server.target, trace_rate=None)["trace_rate"] == ["1000"]
    assert _trace(server.target, "m", trace_level=None)["trace_level"] == ["OFF"]
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        meta = stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=10)
    assert "trace" in meta.extensions


BAD = [
    ({"trace_mode": "triton"}, "unknown trace setting 'trace_mode'"),
    ({"trace_level": "TENSORS"}, "TENSORS is not supported"),
    ({"trace_level": ["OFF", "TIMESTAMPS"]}, "send one of them"),
    ({"trace_level": "LOUD"}, "'LOUD' is not a level"),
    ({"trace_rate": "0"}, "'trace_rate' (global): 0 is outside [1, 4294967295]"),
    ({"trace_rate": "1e3"}, "'trace_rate' (global) takes one integer value"),
    ({"trace_rate": ["1", "2"]}, "takes one integer value"),
    ({"trace_count": "-2"}, "-2 is outside [-1, 2147483647] (-1 = no limit)"),
    ({"log_frequency": "-1"}, "'log_frequency'"),
    ({"trace_file": "/tmp/elsewhere.json"}, "'trace_file' cannot be changed at run time"),
    ({"trace_rate": "3", "trace_level": "TENSORS"}, "TENSORS"),
]


def test_a_bad_setting_is_refused_naming_it_and_changes_nothing(server_factory, models) -> None:
    server = server_factory()
    before = _trace(server.target)
    for settings, named in BAD:
        for model in ("", "m"):
            with pytest.raises(grpc.RpcError) as caught:
                _trace(server.target, model, **settings)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, settings
            assert named.replace("(global)", "(model 'm')" if model else "(global)") in (
                caught.value.details()
            ), caught.value.details()
            assert _trace(server.target, model) == before
    same_file = _trace(server.target, trace_file=before["trace_file"], trace_rate="9")
    assert same_file["trace_rate"] == ["9"]
    with pytest.raises(grpc.RpcError) as caught:
        _trace(server.target, "nope", trace_rate="1")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_trace_setting_needs_admin(server_factory, tmp_path) -> None:
    config = tmp_path / "auth.toml"
    config.write_text(AUTH_TOML)
    server = server_factory("--config", str(config))
    with pytest.raises(grpc.RpcError) as caught:
        _trace(server.target, token=TOKENS["inferer"][0])
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert _trace(server.target, token=TOKENS["admin"][0], trace_rate="4")["trace_rate"] == ["4"]


def test_sampled_requests_unary_and_streamed_are_written_in_order(
    server_factory, models, tmp_path
) -> None:
    """Started tracing every request ([trace] and --trace-rate): each answered request is one
    record with its request id, model, version asked (-1: none) and seven ordered timestamps."""
    config = tmp_path / "trace.toml"
    config.write_text('[trace]\ntrace_level = "TIMESTAMPS"\ntrace_file = "t.jsonl"\n')
    server = server_factory("--config", str(config), "--trace-rate", "1")
    _infer(server.target, ["u0", "u1"])
    _infer(server.target, ["u2"], version="1")
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        requests = [infer_request("m", {"x": ROW}, id=f"s{i}") for i in range(3)]
        answers = list(stub.ModelStreamInfer(iter(requests), timeout=10))
    assert [a.infer_response.id for a in answers] == ["s0", "s1", "s2"]
    records = _records(tmp_path / "data" / "t.jsonl", 6)
    assert [r["request_id"] for r in records[:3]] == ["u0", "u1", "u2"]
    assert sorted(r["request_id"] for r in records[3:]) == ["s0", "s1", "s2"]
    assert [r["model_version"] for r in records[:3]] == [-1, -1, 1]
    assert {r["model_name"] for r in records} == {"m"}
    assert len({r["id"] for r in records}) == 6
    for record in records:
        _check_complete(record)


def test_trace_rate_samples_one_in_n_and_trace_count_stops(server_factory, models, tmp_path):
    """1 in 3 of 10 requests: the 3rd, 6th and 9th; a count of 2 then traces two requests
    and turns tracing off (answering trace_count 0); another model keeps its own settings."""
    server = server_factory()
    path = tmp_path / "data" / "trace.jsonl"
    _trace(server.target, trace_level="TIMESTAMPS", trace_rate="3")
    _infer(server.target, [f"r{i}" for i in range(1, 11)])
    assert [r["request_id"] for r in _records(path, 3)] == ["r3", "r6", "r9"]
    _trace(server.target, trace_rate="1", trace_count="2")
    _infer(server.target, [f"c{i}" for i in range(5)])
    records = _records(path, 5)
    assert [r["request_id"] for r in records[3:]] == ["c0", "c1"]
    assert _trace(server.target)["trace_count"] == ["0"]
    _trace(server.target, "n", trace_count="1")  # its own count: traced while global is done
    _infer(server.target, ["n0", "n1"], model="n")
    _infer(server.target, ["m0"])
    assert [r["request_id"] for r in _records(path, 6)[5:]] == ["n0"]


def test_a_cache_hit_is_traced_without_queue_or_compute(server_factory, tmp_path) -> None:
    write_model(tmp_path / "models", "m", mlp_model(seed=1), config_toml="response_cache = true\n")
    config = tmp_path / "cache.toml"
    config.write_text("response_cache_bytes = 65536\n[trace]\ntrace_level = 'TIMESTAMPS'\n")
    server = server_factory("--config", str(config), "--trace-rate", "1")
    _infer(server.target, ["miss", "hit"])
    miss, hit = _records(tmp_path / "data" / "trace.jsonl", 2)
    _check_complete(miss)
    assert hit["request_id"] == "hit"
    assert [s["name"] for s in hit["timestamps"]] == ["REQUEST_START", "REQUEST_END"]


def test_log_frequency_holds_records_until_that_many_wait(server_factory, models, tmp_path):
    server = server_factory()
    path = tmp_path / "data" / "trace.jsonl"
    _trace(server.target, trace_level="TIMESTAMPS", trace_rate="1", log_frequency="3")
    _infer(server.target, ["a", "b"])
    time.sleep(0.5)
    assert not path.read_text()
    _infer(server.target, ["c"])
    assert [r["request_id"] for r in _records(path, 3)] == ["a", "b", "c"]
    _infer(server.target, ["d"])
    assert server.terminate() == 0  # a stop writes what is held
    assert [r["request_id"] for r in _records(path, 4)][3:] == ["d"]


def test_a_change_through_one_worker_reaches_every_worker(server_factory, models) -> None:
    server = server_factory("--workers", "2")
    assert _trace(server.target, "m", trace_rate="7")["trace_rate"] == ["7"]
    time.sleep(1.0)
    for _ in range(8):  # fresh connections: SO_REUSEPORT spreads them over both workers
        assert _trace(server.target, "m")["trace_rate"] == ["7"]
    logged = [line for line in server.log_lines if "trace settings changed" in line]
    assert len(logged) == 2, logged
    assert {json.loads(line)["worker"] for line in logged} == {0, 1}


def test_trace_table_and_flags_are_checked_at_start_up(tmp_path: Path) -> None:
    assert parse_trace(None).settings == TraceSettings()
    parsed = parse_trace({"trace_level": ["TIMESTAMPS"], "trace_count": 5, "trace_file": "t"})
    assert parsed.settings == TraceSettings(trace_level="TIMESTAMPS", trace_count=5)
    assert parsed.path(tmp_path) == tmp_path / "t"
    for raw, named in [
        ({"rate": 1}, "unknown key 'rate'"),
        ({"trace_rate": 0}, "[trace] trace_rate (--trace-rate): 0 is outside [1, 4294967295]"),
        ({"trace_rate": "5"}, "must be an integer"),
        ({"trace_level": "TENSORS"}, "TENSORS is not supported"),
        ({"log_frequency": True}, "must be an integer, got bool"),
        ({"trace_file": ""}, "[trace] trace_file (--trace-file) must be a file path"),
    ]:
        with pytest.raises(ConfigError, match=None) as caught:
            parse_trace(raw)
        assert named in str(caught.value), caught.value
    common = ["serve", "--port", "0", "--data-dir", str(tmp_path / "d")]
    bad_rate = featureserve(*common, "--trace-rate", "0")
    assert bad_rate.returncode == 1 and "trace_rate (--trace-rate): 0" in bad_rate.stderr
    missing = tmp_path / "no" / "such" / "t.jsonl"
    unopened = featureserve(
        *common, "--trace-level", "TIMESTAMPS", "--trace-file", str(missing), "--workers", "2"
    )
    assert unopened.returncode == 1
    assert f"[trace] trace_file {missing}: No such file or directory" in unopened.stderr


def test_held_records_are_written_when_the_count_ends_or_settings_change(
    server_factory, models, tmp_path
) -> None:
    """The last trace of a trace_count writes every record held, itself included, at once (a
    kill -9 then loses none); so does any change of the settings (log_frequency lowered)."""
    server = server_factory()
    path = tmp_path / "data" / "trace.jsonl"
    _trace(server.target, trace_level="TIMESTAMPS", trace_rate="1", trace_count="3")
    _trace(server.target, log_frequency="5")
    _infer(server.target, ["a", "b", "c", "d"])
    assert [r["request_id"] for r in _records(path, 3)] == ["a", "b", "c"]
    _trace(server.target, trace_count="-1", log_frequency="1000")
    _infer(server.target, ["e", "f"])
    time.sleep(0.3)
    assert len(path.read_text().splitlines()) == 3  # held
    _trace(server.target, log_frequency="1")
    assert [r["request_id"] for r in _records(path, 5)[3:]] == ["e", "f"]


def test_a_renamed_or_removed_trace_file_is_reopened_at_its_path(
    server_factory, models, tmp_path
) -> None:
    server = server_factory("--trace-level", "TIMESTAMPS", "--trace-rate", "1")
    path = tmp_path / "data" / "trace.jsonl"
    _infer(server.target, ["a"])
    _records(path, 1)
    path.rename(path.with_name("trace.jsonl.1"))  # logrotate: rename, the server writes on
    _infer(server.target, ["b"])
    assert [r["request_id"] for r in _records(path, 1)] == ["b"]
    path.unlink()
    _infer(server.target, ["c"])
    assert [r["request_id"] for r in _records(path, 1)] == ["c"]
    assert len(path.with_name("trace.jsonl.1").read_text().splitlines()) == 1


def test_only_setting_trace_count_restarts_it(server_factory, models, tmp_path) -> None:
    """A used-up count stays used up across other changes (a no-op trace_file too); other
    changes keep the sampling position unless trace_rate changes; setting it again restarts
    it, for a model too."""
    server = server_factory()
    path = tmp_path / "data" / "trace.jsonl"
    _trace(server.target, trace_level="TIMESTAMPS", trace_rate="1", trace_count="1")
    _infer(server.target, ["a", "b"])
    assert _trace(server.target, log_frequency="2")["trace_count"] == ["0"]
    assert _trace(server.target, trace_file=str(path))["trace_count"] == ["0"]
    assert _trace(server.target, "m", log_frequency="0")["trace_count"] == ["0"]
    _infer(server.target, ["c"])
    _trace(server.target, trace_count="-1", trace_rate="3")
    _infer(server.target, ["d", "e"])  # the 1st and 2nd of 3
    _trace(server.target, log_frequency="1")
    _infer(server.target, ["f", "g", "h", "i"])  # the 3rd: f, then i
    _trace(server.target, "m", trace_rate="1", trace_count="1")
    _infer(server.target, ["j", "k"])
    _trace(server.target, "m", log_frequency="1")
    _infer(server.target, ["l"])
    _trace(server.target, "m", trace_count="1")
    _infer(server.target, ["n", "o"])
    records = _records(path, 5)
    assert [r["request_id"] for r in records] == ["a", "f", "i", "j", "n"]


def test_refused_requests_are_not_traced_and_leave_the_count(server_factory, tmp_path) -> None:
    """Requests auth refuses, or naming a model that does not exist, take no trace."""
    write_model(tmp_path / "models", "m1", mlp_model(seed=1))
    config = tmp_path / "auth.toml"
    config.write_text(AUTH_TOML)
    server = server_factory("--config", str(config))
    admin = TOKENS["admin"][0]
    _trace(server.target, token=admin, trace_level="TIMESTAMPS", trace_rate="1", trace_count="2")
    calls = [(None, "m1"), (TOKENS["other"][0], "m1"), (TOKENS["other"][0], "other")]
    calls += [(TOKENS["inferer"][0], "m1")] * 2
    codes = []
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for i, (token, model) in enumerate(calls):
            metadata = [("authorization", f"Bearer {token}")] if token else None
            try:
                stub.ModelInfer(
                    infer_request(model, {"x": ROW}, id=f"r{i}"), metadata=metadata, timeout=10
                )
                codes.append("OK")
            except grpc.RpcError as exc:
                codes.append(exc.code().name)
    assert codes == ["UNAUTHENTICATED", "PERMISSION_DENIED", "NOT_FOUND", "OK", "OK"]
    records = _records(tmp_path / "data" / "trace.jsonl", 2)
    assert [(r["model_name"], r["request_id"]) for r in records] == [("m1", "r3"), ("m1", "r4")]
    assert _trace(server.target, token=admin)["trace_count"] == ["0"]


def test_a_request_timed_out_in_the_queue_has_its_queue_start_and_status(
    server_factory, tmp_path
) -> None:
    write_model(
        tmp_path / "models",
        "slow",
        mlp_model(seed=3),
        config_toml="max_batch_size = 8\n[dynamic_batching]\nmax_queue_delay_us = 300000\n"
        "default_timeout_us = 1000\n",
    )
    server = server_factory("--trace-level", "TIMESTAMPS", "--trace-rate", "1")
    with pytest.raises(grpc.RpcError) as caught:
        _infer(server.target, ["late"], model="slow")
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    (record,) = _records(tmp_path / "data" / "trace.jsonl", 1)
    assert record["status"] == "DEADLINE_EXCEEDED"
    names = [s["name"] for s in record["timestamps"]]
    assert names == ["REQUEST_START", "QUEUE_START", "REQUEST_END"], record


def test_trace_ids_do_not_repeat_when_the_server_starts_again(
    server_factory, models, tmp_path
) -> None:
    path = tmp_path / "data" / "trace.jsonl"
    flags = ("--trace-level", "TIMESTAMPS", "--trace-rate", "1")
    first = server_factory(*flags)
    _infer(first.target, ["a", "b"])
    _records(path, 2)
    assert first.terminate() == 0
    _infer(server_factory(*flags).target, ["c", "d"])
    ids = [r["id"] for r in _records(path, 4)]
    assert len(set(ids)) == 4 and max(ids) < 2**53, ids


def test_settings_of_a_model_not_loaded_can_be_set_read_and_cleared(server_factory, models) -> None:
    """Settings are kept by model name: a model in the repository that is not loaded takes
    them, and an unloaded model's own settings can be read and cleared."""
    server = server_factory("--model-control-mode", "explicit", "--load-model", "m")
    assert _trace(server.target, "n", trace_rate="3")["trace_rate"] == ["3"]
    assert _trace(server.target, "m", trace_rate="4")["trace_rate"] == ["4"]
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="m"), timeout=10)
    assert _trace(server.target, "m")["trace_rate"] == ["4"]
    assert _trace(server.target, "m", trace_rate=None)["trace_rate"] == ["1000"]
    assert _trace(server.target, "m")["trace_rate"] == ["1000"]  # cleared, still in the folder
    with pytest.raises(grpc.RpcError) as caught:
        _trace(server.target, "nope", trace_rate="1")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
