"""Triton's response cache on ModelInfer and ModelStreamInfer: hits, misses, statistics, reloads,
config keys, and the LRU's byte accounting."""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from prometheus_client import REGISTRY

from benchmarks.model_zoo import add_sub_model, gather_model, graph_model, write_model
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from server.config import ConfigError, load_config
from server.model_config import ModelConfigError, parse_model_config
from server.model_repository import ModelRepository
from server.response_cache import ENTRY_OVERHEAD_BYTES, ResponseCache
from tests.conftest import featureserve
from tests.server.test_auth import AUTH_TOML, TOKENS
from tests.server.test_inference_rpc import infer_request, output
from tests.server.test_inference_rpc import serve as serve_models

CACHED = "response_cache = true\n"
WIDTH = 4
Body = Callable[[pb_grpc.GRPCInferenceServiceStub, ModelRepository], Awaitable[None]]


def serve(tmp_path: Path, body: Body, cache_bytes: int = 1 << 20) -> None:
    """Run body against a fresh server whose repository has a response cache of cache_bytes."""
    serve_models(tmp_path, body, response_cache_bytes=cache_bytes)


def mul_sub_model() -> onnx.ModelProto:
    """add_sub_model's signature with OUTPUT0 = INPUT0 * INPUT1: another model.onnx for a reload."""
    inputs = [
        helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", WIDTH])
        for n in ("INPUT0", "INPUT1")
    ]
    outputs = [
        helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", WIDTH])
        for n in ("OUTPUT0", "OUTPUT1")
    ]
    nodes = [
        helper.make_node("Mul", ["INPUT0", "INPUT1"], ["OUTPUT0"]),
        helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"]),
    ]
    return graph_model(nodes, inputs, outputs)


def pair(offset: float = 0.0) -> dict[str, np.ndarray]:
    """INPUT0 and INPUT1 of one row each."""
    a = np.arange(WIDTH, dtype=np.float32).reshape(1, WIDTH) + offset
    return {"INPUT0": a, "INPUT1": a + 10}


def typed_request(model: str, arrays: dict[str, np.ndarray], **kwargs) -> pb.ModelInferRequest:
    """The same FP32 inputs as infer_request, in typed contents (fp32_contents)."""
    request = pb.ModelInferRequest(model_name=model, **kwargs)
    for name, array in arrays.items():
        tensor = request.inputs.add(name=name, datatype="FP32", shape=array.shape)
        tensor.contents.fp32_contents.extend(array.ravel().tolist())
    return request


async def statistics(stub: pb_grpc.GRPCInferenceServiceStub, model: str) -> pb.ModelStatistics:
    """The model's (single version's) ModelStatistics."""
    response = await stub.ModelStatistics(pb.ModelStatisticsRequest(name=model))
    [stats] = response.model_stats
    return stats


def test_repeated_request_is_answered_from_cache_with_its_own_id(tmp_path: Path) -> None:
    write_model(tmp_path, "m", add_sub_model(WIDTH), config_toml=CACHED)
    inputs = pair()

    def counted(result: str) -> float:
        labels = {"model": "m", "version": "1", "result": result}
        return REGISTRY.get_sample_value("featureserve_model_response_cache_total", labels) or 0

    async def body(stub, repo) -> None:
        before = counted("hit"), counted("miss")
        first = await stub.ModelInfer(infer_request("m", inputs, id="first"))
        second = await stub.ModelInfer(infer_request("m", inputs, id="second"))
        # on /metrics too: hits never reach featureserve_model_requests_total
        assert (counted("hit") - before[0], counted("miss") - before[1]) == (1, 1)
        assert (first.id, second.id) == ("first", "second")
        for name in ("OUTPUT0", "OUTPUT1"):
            np.testing.assert_array_equal(output(second, name), output(first, name))
        np.testing.assert_array_equal(output(second, "OUTPUT0"), inputs["INPUT0"] * 2 + 10)
        stats = await statistics(stub, "m")
        infer = stats.inference_stats
        assert (infer.cache_hit.count, infer.cache_miss.count) == (1, 1)
        assert infer.cache_hit.ns > 0 and infer.cache_miss.ns > 0
        # Triton's rules: a hit is a success that queued for nothing and ran nothing.
        assert (stats.execution_count, stats.inference_count) == (1, 1)
        assert (infer.success.count, infer.queue.count, infer.compute_infer.count) == (2, 2, 1)
        assert [b.compute_infer.count for b in stats.batch_stats] == [1]
        assert len(repo.response_cache) == 1
        # what perf_analyzer reads to show hits in its server-side breakdown
        config = await stub.ModelConfig(pb.ModelConfigRequest(name="m"))
        assert config.config.response_cache.enable

    serve(tmp_path, body)


def test_raw_and_typed_contents_hit_and_other_values_or_outputs_miss(tmp_path: Path) -> None:
    write_model(tmp_path, "m", add_sub_model(WIDTH), config_toml=CACHED)

    async def body(stub, repo) -> None:
        await stub.ModelInfer(infer_request("m", pair()))
        typed = await stub.ModelInfer(typed_request("m", pair(), id="typed"))
        assert typed.id == "typed"
        np.testing.assert_array_equal(output(typed, "OUTPUT1"), np.full((1, WIDTH), -10))
        assert (await statistics(stub, "m")).inference_stats.cache_hit.count == 1

        other = await stub.ModelInfer(infer_request("m", pair(offset=1.0)))
        np.testing.assert_array_equal(output(other, "OUTPUT0"), pair(1.0)["INPUT0"] * 2 + 10)
        subset = infer_request("m", pair())
        subset.outputs.add(name="OUTPUT1")
        only = await stub.ModelInfer(subset)
        assert [o.name for o in only.outputs] == ["OUTPUT1"]
        stats = await statistics(stub, "m")
        assert (stats.inference_stats.cache_hit.count, stats.execution_count) == (1, 3)

        again = await stub.ModelInfer(subset)
        assert [o.name for o in again.outputs] == ["OUTPUT1"]
        np.testing.assert_array_equal(output(again, "OUTPUT1"), np.full((1, WIDTH), -10))
        stats = await statistics(stub, "m")
        assert (stats.inference_stats.cache_hit.count, stats.execution_count) == (2, 3)

    serve(tmp_path, body)


def test_validation_runs_before_the_lookup_and_errors_are_not_cached(tmp_path: Path) -> None:
    write_model(tmp_path, "m", add_sub_model(WIDTH), config_toml=CACHED)
    write_model(tmp_path, "gather", gather_model(), config_toml=CACHED)

    async def body(stub, repo) -> None:
        await stub.ModelInfer(infer_request("m", pair()))
        bad = infer_request("m", pair())
        bad.parameters["priority"].string_param = "high"
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ModelInfer(bad)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "parameter 'priority'" in info.value.details()
        assert (await statistics(stub, "m")).inference_stats.cache_hit.count == 0

        outside = infer_request("gather", {"idx": np.array([[99]], np.int64)})
        for _ in range(2):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.ModelInfer(outside)
            assert info.value.code() == grpc.StatusCode.INTERNAL
        infer = (await statistics(stub, "gather")).inference_stats
        assert (infer.fail.count, infer.cache_hit.count, infer.cache_miss.count) == (2, 0, 0)
        assert len(repo.response_cache) == 1  # m's answer only

    serve(tmp_path, body)


def test_model_without_response_cache_never_caches(tmp_path: Path) -> None:
    write_model(tmp_path, "plain", add_sub_model(WIDTH))

    async def body(stub, repo) -> None:
        for _ in range(2):
            await stub.ModelInfer(infer_request("plain", pair()))
        stats = await statistics(stub, "plain")
        assert stats.execution_count == 2
        assert (stats.inference_stats.cache_hit.count, stats.inference_stats.cache_miss.count) == (
            0,
            0,
        )
        assert len(repo.response_cache) == 0
        config = await stub.ModelConfig(pb.ModelConfigRequest(name="plain"))
        assert not config.config.response_cache.enable

    serve(tmp_path, body)


def test_server_without_cache_bytes_runs_cached_models_uncached_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="featureserve.models")
    write_model(tmp_path, "m", add_sub_model(WIDTH), config_toml=CACHED)

    async def body(stub, repo) -> None:
        assert repo.response_cache is None
        for _ in range(2):
            await stub.ModelInfer(infer_request("m", pair()))
        stats = await statistics(stub, "m")
        assert (stats.execution_count, stats.inference_stats.cache_hit.count) == (2, 0)

    serve(tmp_path, body, cache_bytes=0)
    warnings = [r.getMessage() for r in caplog.records if "response_cache" in r.getMessage()]
    assert len(warnings) == 1
    assert "model m version 1" in warnings[0] and "response_cache_bytes" in warnings[0]


def test_reloaded_version_answers_from_its_new_model_and_unload_drops_entries(
    tmp_path: Path,
) -> None:
    write_model(tmp_path, "m", add_sub_model(WIDTH), config_toml=CACHED)
    inputs = pair()

    async def body(stub, repo) -> None:
        for _ in range(2):
            before = await stub.ModelInfer(infer_request("m", inputs))
        np.testing.assert_array_equal(output(before, "OUTPUT0"), inputs["INPUT0"] * 2 + 10)
        assert (await statistics(stub, "m")).inference_stats.cache_hit.count == 1

        write_model(tmp_path, "m", mul_sub_model())
        await stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="m"))
        after = await stub.ModelInfer(infer_request("m", inputs))
        np.testing.assert_array_equal(output(after, "OUTPUT0"), inputs["INPUT0"] * inputs["INPUT1"])
        infer = (await statistics(stub, "m")).inference_stats
        assert (infer.cache_hit.count, infer.cache_miss.count) == (0, 1)
        assert len(repo.response_cache) == 1  # the old load's entry went with it

        await stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="m"))
        assert len(repo.response_cache) == 0 and repo.response_cache.used_bytes == 0

    serve(tmp_path, body)


def test_stream_requests_hit_with_their_own_ids(tmp_path: Path) -> None:
    write_model(tmp_path, "m", add_sub_model(WIDTH), config_toml=CACHED)

    async def body(stub, repo) -> None:
        call = stub.ModelStreamInfer()
        answers = []
        for request_id in ("s1", "s2"):
            await call.write(infer_request("m", pair(), id=request_id))
            answers.append(await call.read())
        await call.done_writing()
        assert [a.error_message for a in answers] == ["", ""]
        assert [a.infer_response.id for a in answers] == ["s1", "s2"]
        np.testing.assert_array_equal(
            output(answers[1].infer_response, "OUTPUT0"),
            output(answers[0].infer_response, "OUTPUT0"),
        )
        stats = await statistics(stub, "m")
        assert (stats.inference_stats.cache_hit.count, stats.execution_count) == (1, 1)

    serve(tmp_path, body)


def test_served_process_takes_the_server_key_and_a_hit_still_needs_the_scope(
    tmp_path: Path, server_factory
) -> None:
    write_model(tmp_path / "models", "m1", add_sub_model(WIDTH), config_toml=CACHED)
    config = tmp_path / "featureserve.toml"
    config.write_text("response_cache_bytes = 65536\n" + AUTH_TOML)
    server = server_factory("--config", str(config))
    channel = grpc.insecure_channel(server.target)
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    allowed = [("authorization", f"Bearer {TOKENS['inferer'][0]}")]
    denied = [("authorization", f"Bearer {TOKENS['other'][0]}")]
    try:
        for _ in range(2):
            stub.ModelInfer(infer_request("m1", pair()), metadata=allowed, timeout=30)
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(infer_request("m1", pair()), metadata=denied, timeout=30)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        request = pb.ModelStatisticsRequest(name="m1")
        [stats] = stub.ModelStatistics(request, metadata=allowed, timeout=30).model_stats
        assert (stats.inference_stats.cache_hit.count, stats.execution_count) == (1, 1)
    finally:
        channel.close()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("response_cache_bytes = -1\n", "key 'response_cache_bytes' is -1; use 0-1099511627776"),
        (f"response_cache_bytes = {2**40 + 1}\n", "key 'response_cache_bytes' is 1099511627777"),
        ('response_cache_bytes = "1G"\n', "key 'response_cache_bytes' must be int, got str"),
        ("response_cache_bytes = true\n", "key 'response_cache_bytes' must be int, got bool"),
    ],
)
def test_bad_response_cache_bytes_is_refused_naming_the_key(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "featureserve.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert message in str(info.value)


def test_serve_exits_2_naming_response_cache_bytes(tmp_path: Path) -> None:
    config = tmp_path / "featureserve.toml"
    config.write_text("response_cache_bytes = -5\n")
    result = featureserve("serve", "--config", str(config), "--data-dir", str(tmp_path / "d"))
    assert result.returncode == 2
    assert f"{config}: key 'response_cache_bytes' is -5" in result.stderr


def test_model_response_cache_key_is_a_bool_or_triton_s_table() -> None:
    def parsed(text: str) -> bool:
        return parse_model_config(text, source="c.toml", default_name="m").response_cache

    assert parsed(CACHED) and not parsed("")
    assert parsed("[response_cache]\nenable = true\n")
    assert not parsed("[response_cache]\nenable = false\n")
    for text, message in (
        ('response_cache = "on"\n', "key 'response_cache' must be bool, got str; write "),
        ("[response_cache]\nenabled = true\n", "key 'response_cache.enabled' is unknown"),
        ('[response_cache]\nenable = "yes"\n', "'response_cache.enable' must be bool, got str"),
    ):
        with pytest.raises(ModelConfigError, match=re.escape(message)):
            parse_model_config(text, source="c.toml", default_name="m")


def test_lru_evicts_least_recently_used_within_the_byte_bound() -> None:
    row = np.zeros((1, 4), np.float32)  # 16 bytes
    entry = 16 + ENTRY_OVERHEAD_BYTES
    cache = ResponseCache(3 * entry)
    version = cache.for_load()
    keys = [version.key({"x": row + i}, ["y"]) for i in range(5)]
    assert len(set(keys)) == 5
    for key in keys[:3]:
        version.put(key, {"y": row})
    assert (len(cache), cache.used_bytes) == (3, 3 * entry)
    assert version.get(keys[0]) is not None  # now the most recently used
    version.put(keys[3], {"y": row})
    assert version.get(keys[1]) is None and version.get(keys[0]) is not None
    version.put(keys[4], {"y": row})
    assert version.get(keys[2]) is None
    assert (len(cache), cache.used_bytes) == (3, 3 * entry)

    too_big = np.zeros((1, 3 * entry // 4), np.float32)  # over the whole cache: never stored
    version.put(keys[1], {"y": too_big})
    assert version.get(keys[1]) is None and cache.used_bytes == 3 * entry


def test_empty_answers_are_charged_their_overhead_and_evicted() -> None:
    """An answer of empty outputs (a filter that found nothing) takes room too: 10,000 of them
    in a cache of 10 entries' room leave 10 (they were never evicted, and grew without end)."""
    cache = ResponseCache(10 * ENTRY_OVERHEAD_BYTES)
    version = cache.for_load()
    empty = {"y": np.zeros((0,), np.float32)}
    for i in range(10_000):
        version.put(version.key({"x": np.full((1, 1), i, np.float32)}, ["y"]), empty)
    assert (len(cache), cache.used_bytes) == (10, 10 * ENTRY_OVERHEAD_BYTES)


def test_closing_a_load_drops_only_its_entries() -> None:
    cache = ResponseCache(1 << 20)
    loads = [cache.for_load() for _ in range(3)]
    for i in range(300):
        load = loads[i % 3]
        load.put(load.key({"x": np.full((1, 1), i, np.float32)}, ["y"]), {"y": np.ones(1)})
    loads[1].close()
    assert len(cache) == 200
    assert cache.used_bytes == 200 * (8 + ENTRY_OVERHEAD_BYTES)


def test_entries_own_read_only_copies_and_strings_count_their_bytes() -> None:
    cache = ResponseCache(1 << 12)
    version = cache.for_load()
    batch = np.arange(8, dtype=np.float32).reshape(4, 2)
    key = version.key({"x": batch[:1]}, ["y"])
    version.put(key, {"y": batch[:1]})
    batch[0] = -1
    stored = version.get(key)["y"]
    np.testing.assert_array_equal(stored, [[0, 1]])
    assert not stored.flags.writeable and stored.base is None

    words = np.array(["héllo", "x"], dtype=object).reshape(1, 2)
    text_key = version.key({"s": words}, ["t"])
    assert text_key != version.key(
        {"s": np.array(["hé", "llox"], dtype=object).reshape(1, 2)}, ["t"]
    )
    version.put(text_key, {"t": words})
    assert cache.used_bytes == 8 + (4 + 6) + (4 + 1) + 2 * ENTRY_OVERHEAD_BYTES


def test_loads_have_their_own_keys_and_a_closed_load_stores_nothing() -> None:
    cache = ResponseCache(1 << 10)
    old, new = cache.for_load(), cache.for_load()
    inputs = {"x": np.ones((1, 2), np.float32)}
    assert old.key(inputs, ["y"]) != new.key(inputs, ["y"])
    assert old.key(inputs, ["y"]) != old.key(inputs, ["y", "z"])
    old.put(old.key(inputs, ["y"]), {"y": inputs["x"]})
    new.put(new.key(inputs, ["y"]), {"y": inputs["x"]})
    old.close()
    assert (len(cache), cache.used_bytes) == (1, 8 + ENTRY_OVERHEAD_BYTES)
    old.put(old.key(inputs, ["y"]), {"y": inputs["x"]})
    assert len(cache) == 1 and new.get(new.key(inputs, ["y"])) is not None
