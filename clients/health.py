"""Health checks of every featureserve service over grpc.health.v1."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.channel import ClientConfig, call_metadata, create_channel

SERVICES = (
    "",
    "featureserve.v1.FeatureStore",
    "featureserve.v1.Prediction",
    "inference.GRPCInferenceService",
)


def check_health(config: ClientConfig, services: tuple[str, ...] = SERVICES) -> dict[str, str]:
    """Each service's status name (SERVING, NOT_SERVING, SERVICE_UNKNOWN or the error code)."""
    statuses: dict[str, str] = {}
    with create_channel(config) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in services:
            try:
                reply = stub.Check(
                    health_pb2.HealthCheckRequest(service=service),
                    timeout=config.timeout_s,
                    metadata=call_metadata(config),
                )
                statuses[service] = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.RpcError as exc:
                statuses[service] = exc.code().name
    return statuses
