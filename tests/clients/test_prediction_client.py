"""PredictionClient, AsyncPredictionClient and `featureserve predict` against a real server."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import queue
import re
import socket
import threading
import time

import grpc
import numpy as np
import pytest

from benchmarks.model_zoo import mlp_model, write_model
from clients.channel import ClientConfig, ClientError
from clients.prediction_cli import register
from clients.prediction_client import AsyncPredictionClient, PredictionClient
from protos.arrays import ArrayError
from tests.conftest import raised_when_closed_midway
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


OK_ITEM = {"model": "scorer", "keys": {"user_id": [1, 2]}, "request_values": {"amount": [1.0, 2.0]}}
ITEMS = [
    {**OK_ITEM, "request_id": "r0"},
    {**OK_ITEM, "request_id": "r1"},
    {**OK_ITEM, "keys": {"user_id": np.array([2**63], np.uint64)}, "request_id": "big"},
    {**OK_ITEM, "request_id": "r3"},
    {"model": "scorer", "key": {"user_id": [1]}, "request_id": "typo"},
    {**OK_ITEM, "request_id": "r5"},
]


def check_bad_items_answered_in_place(results: list) -> None:
    assert [r.request_id for r in results] == ["r0", "r1", "big", "r3", "typo", "r5"]
    for i in (0, 1, 3, 5):
        assert results[i].error is None and results[i].ok.all(), results[i].error
    big, typo = results[2].error, results[4].error
    assert big.code == typo.code == grpc.StatusCode.INVALID_ARGUMENT
    assert big.message.startswith("stream request 2 was not sent: ArrayError: keys['user_id']")
    assert "exceeds the int64 range" in big.message
    assert "stream request 4 was not sent: TypeError" in typo.message and "'key'" in typo.message


def broken_source():
    yield {**OK_ITEM, "request_id": "r0"}
    yield {**OK_ITEM, "request_id": "r1"}
    raise RuntimeError("the source broke")


def test_stream_items_that_cannot_be_built_fail_in_their_place(target) -> None:
    with PredictionClient(ClientConfig(target=target)) as client:
        check_bad_items_answered_in_place(list(client.stream(ITEMS, timeout_s=30)))
        got = []
        with pytest.raises(RuntimeError, match="the source broke"):
            got.extend(client.stream(broken_source(), timeout_s=30))
        assert [r.request_id for r in got] == ["r0", "r1"]

    async def main() -> tuple[list, list]:
        async with AsyncPredictionClient(ClientConfig(target=target)) as aclient:
            results = [r async for r in aclient.stream(ITEMS, timeout_s=30)]
            before = []
            with pytest.raises(RuntimeError, match="the source broke"):
                async for r in aclient.stream(broken_source(), timeout_s=30):
                    before.append(r)
            return results, before

    results, before = asyncio.run(main())
    check_bad_items_answered_in_place(results)
    assert [r.request_id for r in before] == ["r0", "r1"]


def test_a_bad_item_is_answered_without_waiting_for_a_later_item(target) -> None:
    """Lock-step use: the caller sends an item only after the previous result came. A bad
    item's result must come on its own turn; it was held back until a later answer, forever."""
    items = [{**OK_ITEM, "request_id": "a"}, {**ITEMS[2]}, {**OK_ITEM, "request_id": "c"}]
    with PredictionClient(ClientConfig(target=target)) as client:
        pending: queue.Queue = queue.Queue()
        results = client.stream(iter(pending.get, None), timeout_s=30)
        got = []
        for item in items:
            pending.put(item)
            got.append(next(results))
        pending.put(None)
        assert list(results) == []
    assert [r.request_id for r in got] == ["a", "big", "c"]
    assert [r.error is None for r in got] == [True, False, True]

    async def main() -> list:
        async with AsyncPredictionClient(ClientConfig(target=target)) as aclient:
            pending: asyncio.Queue = asyncio.Queue()

            async def source():
                while (item := await pending.get()) is not None:
                    yield item

            stream = aclient.stream(source(), timeout_s=30)
            answered = []
            for item in items:
                await pending.put(item)
                answered.append(await asyncio.wait_for(anext(stream), 20))
            await pending.put(None)
            assert [r async for r in stream] == []
            return answered

    answered = asyncio.run(main())
    assert [(r.request_id, r.error is None) for r in answered] == [
        ("a", True),
        ("big", False),
        ("c", True),
    ]


def test_single_values_are_rejected_naming_the_argument(target) -> None:
    single = r"request_values\['amount'\]: got the single value"
    with (
        PredictionClient(ClientConfig(target=target)) as client,
        pytest.raises(ArrayError, match=single),
    ):
        client.predict("scorer", {"user_id": [1]}, {"amount": 1.0})


def test_zero_entities_as_plain_empty_lists_get_an_empty_answer(target) -> None:
    # Like FeatureStoreClient.get_online_features({"user_id": []}); an empty list has no dtype.
    empty = {"model": "scorer", "keys": {"user_id": []}, "request_values": {"amount": []}}
    with PredictionClient(ClientConfig(target=target)) as client:
        typed = client.predict("scorer", {"user_id": np.array([], np.int64)}, {"amount": []})
        results = [client.predict(**empty), *client.stream([{**empty, "request_id": "z"}])]

    async def main() -> list:
        async with AsyncPredictionClient(ClientConfig(target=target)) as aclient:
            return [await aclient.predict(**empty), *[r async for r in aclient.stream([empty])]]

    results += asyncio.run(main())
    assert typed.rows == 0 and typed.error is None and typed.scores
    for result in results:
        assert result.error is None and result.rows == 0
        assert {n: s.shape for n, s in result.scores.items()} == {
            n: s.shape for n, s in typed.scores.items()
        }
        assert result.row_status.size == 0
    assert results[1].request_id == "z"


def test_a_closed_client_raises_the_same_error_sync_and_async(target) -> None:
    client = PredictionClient(target)
    client.close()
    with pytest.raises(ClientError, match="FAILED_PRECONDITION: the client was closed") as sync:
        client.predict(**OK_ITEM)
    with pytest.raises(ClientError, match="FAILED_PRECONDITION: the client was closed"):
        list(client.stream([OK_ITEM]))

    async def main() -> list[str]:
        aclient = AsyncPredictionClient(target)
        await aclient.close()
        out = []
        with pytest.raises(ClientError) as caught:
            await aclient.predict(**OK_ITEM)
        out.append(str(caught.value))
        with pytest.raises(ClientError) as caught:
            [r async for r in aclient.stream([OK_ITEM])]
        out.append(str(caught.value))
        return out

    assert asyncio.run(main()) == [str(sync.value)] * 2


def endless(pulled: list[int]):
    """Stream items without end, counting those gRPC has pulled."""
    for i in itertools.count():
        pulled[0] += 1
        yield {**OK_ITEM, "request_id": str(i)}


def test_leaving_a_stream_early_cancels_its_call(target) -> None:
    """After break and aclose() the asyncio call went on: gRPC kept pulling the caller's items
    and the server kept scoring them for nobody."""
    config = ClientConfig(target=target, timeout_s=30)

    def settled(pulled: list[int]) -> int:
        time.sleep(0.3)
        before = pulled[0]
        time.sleep(1.0)
        assert pulled[0] == before, f"{pulled[0] - before} items pulled after the stream ended"
        return before

    pulled = [0]
    with PredictionClient(config) as client:
        results = client.stream(endless(pulled))
        assert next(results).error is None
        results.close()
        settled(pulled)

    async def main() -> int:
        async with AsyncPredictionClient(config) as aclient:
            results = aclient.stream(endless(apulled))
            async for result in results:
                assert result.error is None
                break
            await results.aclose()
            return await asyncio.to_thread(settled, apulled)

    apulled = [0]
    asyncio.run(main())


def test_a_stream_whose_server_never_answers_fails_after_timeout_s_unless_idle(target) -> None:
    """A server that accepts the connection and never answers held stream() forever: the
    per-call timeout_s was not applied."""
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(8)
    config = ClientConfig(target=f"127.0.0.1:{hung.getsockname()[1]}", timeout_s=1)
    stalled = r"DEADLINE_EXCEEDED: StreamPredict: no result from the server within 1 s"
    outcome: queue.Queue = queue.Queue()

    def sync_stream() -> None:
        try:
            with PredictionClient(config) as client:
                outcome.put(list(client.stream([OK_ITEM])))
        except Exception as exc:
            outcome.put(exc)

    async def async_stream() -> list:
        async with AsyncPredictionClient(config) as aclient:
            return [r async for r in aclient.stream([OK_ITEM])]

    try:
        started = time.monotonic()
        threading.Thread(target=sync_stream, daemon=True).start()
        error = outcome.get(timeout=10)
        assert isinstance(error, ClientError) and re.match(stalled, str(error)), error
        assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED
        with pytest.raises(ClientError, match=stalled):
            asyncio.run(asyncio.wait_for(async_stream(), 10))
        assert time.monotonic() - started < 8
    finally:
        hung.close()

    # Neither a source that sends nothing for longer than timeout_s nor a caller slow to take
    # the result of a request it sent is a stall.
    names = ["a", "b", "after a pause"]
    items = [{**OK_ITEM, "request_id": name} for name in names]

    def paused_source():
        yield from items[:2]
        time.sleep(2.0)
        yield items[2]

    async def apaused_source():
        for item in items[:2]:
            yield item
        await asyncio.sleep(2.0)
        yield items[2]

    idle_config = ClientConfig(target=target, timeout_s=0.75)
    with PredictionClient(idle_config) as client:
        got = []
        for result in client.stream(paused_source()):
            got.append(result.request_id)
            time.sleep(1.0 if len(got) == 1 else 0)
    assert got == names

    async def async_paused() -> list:
        got = []
        async with AsyncPredictionClient(idle_config) as aclient:
            async for result in aclient.stream(apaused_source()):
                got.append(result.request_id)
                await asyncio.sleep(1.0 if len(got) == 1 else 0)
        return got

    assert asyncio.run(async_paused()) == names


def test_calls_in_flight_when_the_async_client_closes_raise_client_error_cancelled(
    target,
) -> None:
    """They raised a bare CancelledError, as if the caller's task had been cancelled."""

    def closed_midway(work):
        config = ClientConfig(target=target, timeout_s=30)
        return raised_when_closed_midway(AsyncPredictionClient(config), work)

    ids = np.arange(1, 100_000) % 100 + 1

    async def predict(aclient) -> None:
        await aclient.predict("scorer", {"user_id": ids}, {"amount": np.ones(len(ids))})

    async def stream(aclient) -> None:
        async for _ in aclient.stream(endless([0])):
            pass

    async def main() -> list[BaseException]:
        return [await closed_midway(predict), await closed_midway(stream)]

    for error in asyncio.run(main()):
        assert isinstance(error, ClientError), repr(error)
        assert error.code == grpc.StatusCode.CANCELLED
        assert "the client was closed while this call was in flight" in error.message
