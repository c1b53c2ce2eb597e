"""PredictionClient, AsyncPredictionClient and `featureserve predict` against a real server."""

from __future__ import annotations

import argparse
import asyncio

import grpc
import numpy as np
import pytest

from benchmarks.model_zoo import mlp_model, write_model
from clients.channel import ClientConfig
from clients.prediction_cli import register
from clients.prediction_client import AsyncPredictionClient, PredictionClient
from tests.server.test_prediction_rpc import populate, scorer_config, start_server


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    base = tmp_path_factory.mktemp("predict_client")
    write_model(base / "models", "scorer", mlp_model(seed=3), config_toml=scorer_config())
    server, address = start_server(base)
    facts = populate(address, np.arange(1, 101))
    assert facts["has_risk"][:3].all()
    yield address
    server.shutdown()


def test_async_stream_matches_sync_predict(target) -> None:
    rng = np.random.default_rng(4)
    calls = [
        {"model": "scorer", "keys": {"user_id": rng.integers(1, 101, 8)},
         "request_values": {"amount": rng.random(8)}, "request_id": f"a{k}"}
        for k in range(40)
    ]  # fmt: skip
    calls[3] = {**calls[3], "model": "missing"}

    async def main() -> list:
        async with AsyncPredictionClient(ClientConfig(target=target)) as client:
            return [r async for r in client.stream(calls, timeout_s=30)]

    streamed = asyncio.run(main())
    assert [r.request_id for r in streamed] == [c["request_id"] for c in calls]
    assert streamed[3].error is not None and streamed[3].error.code == grpc.StatusCode.NOT_FOUND
    with PredictionClient(ClientConfig(target=target)) as client:
        for call, got in zip(calls[:3], streamed[:3], strict=True):
            unary = client.predict(**call)
            np.testing.assert_allclose(got.scores["y"], unary.scores["y"], rtol=1e-5, atol=1e-6)
            np.testing.assert_array_equal(got.row_status, unary.row_status)
            assert (
                got.lineage.feature_views
                == unary.lineage.feature_views
                == [
                    "user_stats@1",
                    "risk@1",
                ]
            )


def test_cli_predict_prints_scores_and_lineage(target, capsys) -> None:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(
        ["predict", "--model", "scorer", "--keys", "1,2,3", "--value", "amount=10,20,30",
         "--target", target]
    )  # fmt: skip
    code = args.func(args)
    out = capsys.readouterr().out
    assert code == 0, out
    assert "model scorer version 1" in out and "['user_stats@1', 'risk@1']" in out
    assert out.count(" OK y=[") == 3
