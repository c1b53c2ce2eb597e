"""The `baseline` scenario: a bare grpc.aio server answering a fixed-size payload.

It has featureserve's server options and thread/loop model but no protobuf and no work, so its
figures are the transport floor that the other scenarios are compared against in the same run.
Run as a subprocess (`python -m benchmarks.baseline`) so its CPU is measured apart from the clients.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal

import grpc

from benchmarks.scenarios import (
    RequestFn,
    ScenarioBase,
    ScenarioRun,
    ServerProcess,
    UnaryRequest,
    python_module_argv,
    register_scenario,
)
from server import event_loop
from server.app import grpc_options
from server.config import ServerConfig

SERVICE = "featureserve.bench.Baseline"
METHOD = f"/{SERVICE}/Echo"
DEFAULT_PAYLOAD_BYTES = 100 * 32 * 4
DEFAULT_REQUEST_BYTES = 64


async def serve(host: str, port: int, payload_bytes: int) -> None:
    """Serve Echo (any bytes in, payload_bytes random bytes out) until SIGTERM or SIGINT."""
    config = ServerConfig()
    server = grpc.aio.server(
        options=grpc_options(config),
        maximum_concurrent_rpcs=config.max_concurrent_rpcs or None,
    )
    payload = os.urandom(payload_bytes)

    async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return payload

    handler = grpc.method_handlers_generic_handler(
        SERVICE, {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
    )
    server.add_generic_rpc_handlers((handler,))
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"READY {bound}", flush=True)
    await stop.wait()
    await server.stop(grace=1.0)


class BaselineScenario(ScenarioBase):
    """Unary bytes-in/bytes-out RPC against the bare server: the transport floor."""

    name = "baseline"
    help = "bare grpc.aio server answering --payload-bytes: the transport floor"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """--payload-bytes (response size) and --request-bytes."""
        parser.add_argument(
            "--payload-bytes",
            type=int,
            default=DEFAULT_PAYLOAD_BYTES,
            help="response size in bytes (default 12800 = 100 x 32 float32)",
        )
        parser.add_argument(
            "--request-bytes",
            type=int,
            default=DEFAULT_REQUEST_BYTES,
            help="request size in bytes (default 64)",
        )

    def setup(self, args: argparse.Namespace) -> ScenarioRun:
        """Start the bare server unless --target names a running one."""
        params = {"payload_bytes": args.payload_bytes, "request_bytes": args.request_bytes}
        if args.target:
            return ScenarioRun(
                target=args.target,
                server_pid=args.server_pid,
                params=params,
                response_bytes=args.payload_bytes,
            )
        server = ServerProcess(
            python_module_argv(
                "benchmarks.baseline", "--port", "0", "--payload-bytes", str(args.payload_bytes)
            )
        )
        return ScenarioRun(
            target=server.target,
            server_pid=server.pid,
            params=params,
            response_bytes=args.payload_bytes,
            server=server,
        )

    def make_request_fn(self, args: argparse.Namespace, channel: grpc.aio.Channel) -> RequestFn:
        """One Echo call with a zero-filled body of --request-bytes."""
        call = channel.unary_unary(METHOD)
        body = bytes(args.request_bytes)
        timeout = args.timeout

        async def request() -> bytes:
            return await call(body, timeout=timeout)

        return request

    def unary_request(self, args: argparse.Namespace) -> UnaryRequest | None:
        """The Echo method and its raw body, for h2load."""
        return METHOD, bytes(args.request_bytes), ()


BASELINE = register_scenario(BaselineScenario())


def main(argv: list[str] | None = None) -> None:
    """`python -m benchmarks.baseline --port 0 --payload-bytes N`: print READY <port>, serve."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.baseline", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--payload-bytes", type=int, default=DEFAULT_PAYLOAD_BYTES)
    args = parser.parse_args(argv)
    event_loop.run(serve(args.host, args.port, args.payload_bytes))


if __name__ == "__main__":
    main()
