"""Health checks of every featureserve service over grpc.health.v1."""

from __future__ import annotations

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.channel import ClientConfig, ClientError, call_metadata, client_error, create_channel

SERVICES = (
    "",
    "featureserve.v1.FeatureStore",
    "featureserve.v1.Prediction",
    "inference.GRPCInferenceService",
)


def _check_all(
    config: ClientConfig, services: tuple[str, ...] = SERVICES
) -> tuple[dict[str, str], dict[str, ClientError]]:
    """Each service's status name (SERVING, NOT_SERVING, SERVICE_UNKNOWN or the error code),
    and the error of each check that failed (its details say why: connection refused, TLS)."""
    statuses: dict[str, str] = {}
    errors: dict[str, ClientError] = {}
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
                errors[service] = client_error(exc, config.tls)
    return statuses, errors


def check_health(config: ClientConfig, services: tuple[str, ...] = SERVICES) -> dict[str, str]:
    """Each service's status name (SERVING, NOT_SERVING, SERVICE_UNKNOWN or the error code)."""
    return _check_all(config, services)[0]


def print_health(config: ClientConfig) -> int:
    """`featureserve health`: each service's status on stdout, then each distinct error once on
    stderr (one line when every check failed the same way); 0 only when all are SERVING."""
    statuses, errors = _check_all(config)
    for service, status in statuses.items():
        print(f"{service or '(server)':40s} {status}")
    for line in dict.fromkeys(f"featureserve: {exc}" for exc in errors.values()):
        print(line, file=sys.stderr)
    return 0 if all(s == "SERVING" for s in statuses.values()) else 1
