"""The `infer` scenario: KServe ModelInfer on infer_bench's small or medium model, batching on/off.

A thin harness wrapper over benchmarks.infer_bench's pieces (its models, configs and request
bytes) so `featureserve bench infer` runs the harness's load shapes, reports and baseline; the
all-in-one sweep with its target checks stays `python -m benchmarks.infer_bench`. One variant per
(--model, --batching) pair, each against a server whose repository holds only that model.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import grpc

from benchmarks.infer_bench import BENCH_MODELS, INFER_METHOD, infer_request_bytes
from benchmarks.model_zoo import write_model
from benchmarks.scenarios import (
    RequestFn,
    ScenarioBase,
    ScenarioError,
    ScenarioRun,
    UnaryRequest,
    comma_choices,
    register_scenario,
)
from benchmarks.server_launch import add_ops_argument, launch_for, ops_metadata
from protos.inference import grpc_service_pb2 as pb

MODELS = ("small", "medium")
BATCHING = ("on", "off")


def model_name(args: argparse.Namespace) -> str:
    """The bench model a single-variant namespace names, e.g. small_on."""
    return f"{args.model[0]}_{args.batching[0]}"


def check_response(
    target: str, model: str, body: bytes, rows: int, timeout_s: float, metadata: tuple = ()
) -> int:
    """Send one ModelInfer; check the output has `rows` rows; returns the response size."""
    with grpc.insecure_channel(target) as channel:
        raw = channel.unary_unary(INFER_METHOD)(body, timeout=timeout_s, metadata=metadata)
    response = pb.ModelInferResponse.FromString(raw)
    if not response.outputs or response.outputs[0].shape[0] != rows:
        raise ScenarioError(f"ModelInfer on {model} did not return {rows} rows: {response}")
    return len(raw)


class InferScenario(ScenarioBase):
    """ModelInfer with raw FP32 input on one bench model per variant."""

    name = "infer"
    help = "KServe ModelInfer on the small/medium bench model with dynamic batching on/off"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """--model, --batching (comma lists: one variant per pair) and --rows."""
        parser.add_argument(
            "--model",
            type=comma_choices(MODELS),
            default=["small"],
            help="small (MLP 32-64-64-1) and/or medium (4 x 1536 dense); default small",
        )
        parser.add_argument(
            "--batching",
            type=comma_choices(BATCHING),
            default=list(BATCHING),
            help="dynamic batching on and/or off (default on,off)",
        )
        parser.add_argument("--rows", type=int, default=1, help="rows per request (default 1)")
        add_ops_argument(parser)

    def variants(self, args: argparse.Namespace) -> list[argparse.Namespace]:
        """One namespace per (model, batching, ops) triple."""
        return [
            argparse.Namespace(**{**vars(args), "model": [m], "batching": [b], "ops": [o]})
            for m in args.model
            for b in args.batching
            for o in args.ops
        ]

    def _body(self, args: argparse.Namespace) -> bytes:
        model = model_name(args)
        return infer_request_bytes(model, BENCH_MODELS[model][1], rows=args.rows)

    def setup(self, args: argparse.Namespace) -> ScenarioRun:
        """Write a repository with the one model and start a server on it (unless --target)."""
        model = model_name(args)
        params = {"model": model, "rows": args.rows, "ops": args.ops[0]}
        server = None
        target = args.target
        if target is None:
            workdir = Path(tempfile.mkdtemp(prefix="featureserve-infer-"))
            build, _, config = BENCH_MODELS[model]
            write_model(workdir / "models", model, build(), config_toml=config)
            server = launch_for(args.ops[0], workdir / "data", workdir / "models", workdir)
            target = server.target
        try:
            size = check_response(
                target, model, self._body(args), args.rows, args.timeout, ops_metadata(args.ops[0])
            )
        except BaseException:
            if server is not None:
                server.stop()
            raise
        return ScenarioRun(
            target=target,
            server_pid=server.pid if server else args.server_pid,
            params=params,
            rows_per_request=args.rows,
            response_bytes=size,
            server=server,
        )

    def make_request_fn(self, args: argparse.Namespace, channel: grpc.aio.Channel) -> RequestFn:
        """One ModelInfer with the pre-serialized request."""
        call = channel.unary_unary(INFER_METHOD)
        body = self._body(args)
        timeout = args.timeout
        metadata = ops_metadata(args.ops[0])

        async def request() -> bytes:
            return await call(body, timeout=timeout, metadata=metadata)

        return request

    def unary_request(self, args: argparse.Namespace) -> UnaryRequest | None:
        """ModelInfer, its raw body and the token of an ops-on server, for h2load."""
        return INFER_METHOD, self._body(args), ops_metadata(args.ops[0])


INFER = register_scenario(InferScenario())
