"""grpc.health.v1.Health with one status per featureserve service."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from server.handler_wrapping import InterceptingRegistrar

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Health:
    """Owns the health servicer and the status of each registered service."""

    def __init__(self, service_names: list[str]) -> None:
        self.servicer = health_aio.HealthServicer()
        self.service_names = list(service_names)

    def register(self, server: grpc.aio.Server | InterceptingRegistrar) -> None:
        """Add the Health service to a server (or to its registrar)."""
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)

    async def set(self, service: str, serving: bool) -> None:
        """Set one service's status ("" is the whole server)."""
        await self.servicer.set(service, SERVING if serving else NOT_SERVING)

    async def set_all(self, serving: bool) -> None:
        """Set every service's status and the overall one."""
        for name in ["", *self.service_names]:
            await self.set(name, serving)

    async def shutdown(self) -> None:
        """Report NOT_SERVING everywhere and refuse further changes (graceful shutdown)."""
        await self.servicer.enter_graceful_shutdown()
