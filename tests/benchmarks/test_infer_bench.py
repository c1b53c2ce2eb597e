"""The inference benchmark's open-loop driver and its target report."""

import asyncio

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from benchmarks.infer_bench import (
    CACHE_TWINS,
    ENSEMBLE_TWINS,
    INFER_METHOD,
    PARSE_METHOD,
    RESPONSE_CACHE_BYTES,
    PointResult,
    check_targets,
    infer_request_bytes,
    measure_point,
    open_loop,
    start_server_process,
    twin_lines,
    twin_sweep,
    write_bench_repository,
)
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc


def test_open_loop_sends_at_the_rate_and_times_from_the_intended_send() -> None:
    started: list[float] = []

    async def call() -> None:
        started.append(asyncio.get_running_loop().time())
        await asyncio.sleep(0.002)

    latencies, errors, completed = asyncio.run(open_loop(call, 500, 0.4, 0.1))
    assert completed == len(started) == 250
    assert errors == 0
    assert 195 <= len(latencies) <= 205
    assert min(latencies) >= 0.002
    assert started[-1] - started[0] >= 0.49


def point(
    target: str,
    concurrency: int,
    throughput: float,
    p99_ms: float,
    rate: float = 0.0,
    errors: int = 0,
):
    return PointResult(target, concurrency, 100, errors, 1.0, throughput, 1.0, p99_ms, rate=rate)


def test_targets_check_the_p99_bound_on_open_loop_points_only() -> None:
    results = [
        point("medium_on", 64, 2500, 80.0),
        point("medium_off", 64, 400, 150.0),
        point("medium_on", 0, 1250, 12.0, rate=1250),
        point("medium_on", 0, 2000, 45.0, rate=2000),
        point("echo", 8, 5000, 2.0),
        point("parse", 8, 4000, 2.0),
        point("small_on", 8, 3600, 3.0),
    ]
    lines = check_targets(results, medium_batch_ms=14.0)
    assert lines[0].startswith("medium c=64: batching on/off = 6.2x") and "MET" in lines[0]
    assert "1250/s" in lines[1] and lines[1].endswith("30.0 ms MET")
    assert "2000/s" in lines[2] and lines[2].endswith("30.0 ms MISSED")
    assert lines[3].startswith("small c=8") and "72%" in lines[3] and "MET" in lines[3]
    assert lines[3].endswith("the parse floor 80% of echo")


def test_no_target_is_met_by_points_with_errors() -> None:
    results = [
        point("medium_on", 64, 2500, 80.0, errors=3),
        point("medium_off", 64, 400, 150.0),
        point("medium_on", 0, 1250, 12.0, rate=1250, errors=1),
        point("echo", 8, 5000, 2.0),
        point("small_on", 8, 3600, 3.0, errors=1),
    ]
    lines = check_targets(results, medium_batch_ms=14.0)
    assert len(lines) == 3 and all("MISSED" in line and "MET" not in line for line in lines)


def test_h2load_drives_closed_and_open_loop_points_against_the_bench_server(tmp_path) -> None:
    repo = write_bench_repository(tmp_path / "models")
    server = start_server_process(repo, tmp_path)

    async def measure(target: str, concurrency: int, rate: float = 0.0) -> PointResult:
        addresses = (server.infer_address, server.address("parse"))
        channels = {a: grpc.aio.insecure_channel(a) for a in addresses}
        try:
            return await measure_point(
                server, channels, target, concurrency, 1.0, 0.2, rate, "h2load"
            )
        finally:
            for channel in channels.values():
                await channel.close()

    async def parse_once() -> pb.ModelInferResponse:
        async with grpc.aio.insecure_channel(server.address("parse")) as channel:
            answer = await channel.unary_unary(PARSE_METHOD)(infer_request_bytes("small_on", 32))
            return pb.ModelInferResponse.FromString(answer)

    try:
        floor = asyncio.run(parse_once())
        echo, parse = asyncio.run(measure("echo", 4)), asyncio.run(measure("parse", 4))
        small = asyncio.run(measure("small_on", 4))
        paced = asyncio.run(measure("small_on", 0, rate=200.0))
    finally:
        server.stop()
    for p in (echo, parse, small, paced):
        assert p.requests > 0 and p.errors == 0 and p.throughput > 0
        assert 0 < p.p50_ms <= p.p99_ms and p.server_cpu_us_per_req > 0
    assert small.avg_batch >= 1.0
    assert list(floor.outputs[0].shape) == [32, 1] and len(floor.raw_output_contents[0]) == 128
    assert paced.rate == 200.0 and 150 <= paced.requests <= 210


def test_model_infer_is_served_by_the_featureserve_server(tmp_path) -> None:
    """Health, and a 5 MiB request past gRPC's default 4 MiB limit, answered as featureserve
    answers them (the bare server answered UNIMPLEMENTED and gRPC's RESOURCE_EXHAUSTED)."""
    server = start_server_process(write_bench_repository(tmp_path / "models"), tmp_path)
    big = pb.ModelInferRequest(model_name="small_on")
    big.inputs.add(name="x", datatype="FP32", shape=[40_960, 32])
    big.raw_input_contents.append(np.zeros((40_960, 32), np.float32).tobytes())
    options = [("grpc.max_send_message_length", 1 << 27), ("grpc.max_receive_message_length", -1)]
    try:
        with grpc.insecure_channel(server.infer_address, options=options) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            with pytest.raises(grpc.RpcError) as refused:
                channel.unary_unary(INFER_METHOD)(big.SerializeToString(), timeout=30)
    finally:
        server.stop()
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_batch_size=64" in refused.value.details()


def test_the_twin_sweeps_set_each_model_beside_its_cached_twin_and_its_ensemble(tmp_path) -> None:
    """--response-cache: the twins answer from the cache (h2load repeats one request), and the
    summary puts each model's throughput off and on side by side. --ensemble: the one-step
    ensembles answer through their model's batcher, summed up beside it."""
    repo = write_bench_repository(tmp_path / "models", cached=True, ensembles=True)
    server = start_server_process(repo, tmp_path, RESPONSE_CACHE_BYTES)
    try:
        results = asyncio.run(twin_sweep(server, CACHE_TWINS, [2], 1.0, 0.2, "h2load"))
        ensembled = asyncio.run(twin_sweep(server, ENSEMBLE_TWINS, [2], 0.5, 0.1, "h2load"))
        with grpc.insecure_channel(server.infer_address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            request = pb.ModelStatisticsRequest(name="medium_cached")
            (stats,) = stub.ModelStatistics(request).model_stats
            request = pb.ModelStatisticsRequest(name="small_ensemble")
            (ensemble_stats,) = stub.ModelStatistics(request).model_stats
    finally:
        server.stop()
    # one fixed request body: the first call ran the model, every later one was a hit
    assert stats.execution_count == 1 and stats.inference_stats.cache_miss.count == 1
    assert stats.inference_stats.cache_hit.count > 0
    assert [r.target for r in results] == ["small_on", "small_cached", "medium_on", "medium_cached"]
    assert all(r.requests > 0 and r.errors == 0 for r in results + ensembled)
    lines = twin_lines(results, CACHE_TWINS)
    assert [line.split(":")[0] for line in lines] == ["small_on c=2", "medium_on c=2"]
    assert all("cache off" in line and "on" in line for line in lines)
    assert [r.target for r in ensembled] == [
        "small_on", "small_ensemble", "medium_on", "medium_ensemble"
    ]  # fmt: skip
    assert ensemble_stats.inference_stats.success.count >= ensembled[1].requests
    lines = twin_lines(ensembled, ENSEMBLE_TWINS)
    assert [line.split(":")[0] for line in lines] == ["small_on c=2", "medium_on c=2"]
    assert all("direct" in line and "ensemble" in line for line in lines)
