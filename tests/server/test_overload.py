"""The concurrency cap over a real grpc.aio server: excess calls end RESOURCE_EXHAUSTED while
admitted ones are still running, the cap holds wave after wave (grpc.aio's own
maximum_concurrent_rpcs does not: grpc/grpc#41531), deadlines free slots, health stays open."""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.featureserve.v1 import feature_store_pb2 as pb
from protos.featureserve.v1 import feature_store_pb2_grpc as pb_grpc
from protos.featureserve.v1 import prediction_pb2, prediction_pb2_grpc
from server.handler_wrapping import InterceptingRegistrar
from server.health import Health
from server.overload import OverloadInterceptor

LIMIT = 2
WAVE = 5


class Gate(pb_grpc.FeatureStoreServicer):
    """GetFeatureView blocks until the gate opens; `running` counts calls inside."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.running = 0
        self.peak = 0

    async def GetFeatureView(self, request, context):
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            await self.gate.wait()
        finally:
            self.running -= 1
        return pb.FeatureView(name=request.name)


class Stream(prediction_pb2_grpc.PredictionServicer):
    def __init__(self, gate: asyncio.Event) -> None:
        self.gate = gate

    async def StreamPredict(self, request_iterator, context):
        await self.gate.wait()
        async for request in request_iterator:
            yield prediction_pb2.PredictResponse(request_id=request.request_id)


async def codes_of(tasks) -> list[str]:
    results = await asyncio.gather(*tasks, return_exceptions=True)
    return sorted("OK" if not isinstance(r, Exception) else r.code().name for r in results)


async def scenario() -> dict[str, object]:
    servicer = Gate()
    interceptor = OverloadInterceptor(LIMIT)
    server = grpc.aio.server()
    registrar = InterceptingRegistrar(server, [interceptor])
    pb_grpc.add_FeatureStoreServicer_to_server(servicer, registrar)
    prediction_pb2_grpc.add_PredictionServicer_to_server(Stream(servicer.gate), registrar)
    health = Health([])
    health.register(registrar)
    await health.set_all(True)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    seen: dict[str, object] = {}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.FeatureStoreStub(channel)
        predict = prediction_pb2_grpc.PredictionStub(channel)
        for wave in range(2):
            servicer.gate.clear()
            admitted = [
                asyncio.ensure_future(stub.GetFeatureView(pb.GetFeatureViewRequest(name="a")))
                for _ in range(LIMIT)
            ]
            while servicer.running < LIMIT:
                await asyncio.sleep(0.01)
            excess = [stub.GetFeatureView(pb.GetFeatureViewRequest(name="b")) for _ in range(WAVE)]
            seen[f"excess wave {wave}"] = await codes_of(excess)
            streamed = predict.StreamPredict(iter([prediction_pb2.PredictRequest(request_id="1")]))
            seen[f"stream while full {wave}"] = await codes_of([_drain(streamed)])
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            seen[f"health while full {wave}"] = reply.status
            seen[f"admitted still running {wave}"] = all(not t.done() for t in admitted)
            servicer.gate.set()
            seen[f"admitted wave {wave}"] = await codes_of(admitted)
        servicer.gate.clear()
        expired = stub.GetFeatureView(pb.GetFeatureViewRequest(name="slow"), timeout=0.2)
        seen["deadline"] = await codes_of([expired])
        await asyncio.sleep(0.05)
        seen["active after deadline"] = interceptor.active
        servicer.gate.set()
        streamed = predict.StreamPredict(iter([prediction_pb2.PredictRequest(request_id="2")]))
        seen["stream when free"] = await codes_of([_drain(streamed)])
    await server.stop(0)
    seen["peak"] = servicer.peak
    seen["rejected"] = interceptor.rejected
    return seen


async def _drain(call) -> list:
    return [r async for r in call]


def test_cap_rejects_at_once_and_holds_across_waves() -> None:
    seen = asyncio.run(scenario())
    for wave in range(2):
        assert seen[f"excess wave {wave}"] == ["RESOURCE_EXHAUSTED"] * WAVE
        # grpcio 1.65's core sometimes loses the status of a bidi stream ended before it read
        # the client's messages ("Internal error from Core", about 1 run in 40); the server-side
        # rejection itself is asserted through interceptor.rejected below.
        assert seen[f"stream while full {wave}"] in (["RESOURCE_EXHAUSTED"], ["INTERNAL"])
        assert seen[f"health while full {wave}"] == health_pb2.HealthCheckResponse.SERVING
        assert seen[f"admitted still running {wave}"] is True
        assert seen[f"admitted wave {wave}"] == ["OK"] * LIMIT
    assert seen["peak"] == LIMIT
    assert seen["rejected"] == 2 * (WAVE + 1)
    assert seen["deadline"] == ["DEADLINE_EXCEEDED"]
    assert seen["active after deadline"] == 0
    assert seen["stream when free"] == ["OK"]
