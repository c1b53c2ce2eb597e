"""answer_in_order: answers in request order, concurrently, with at most a window in flight."""

from __future__ import annotations

import asyncio
import random

from server.ordered_stream import answer_in_order, unparsed


class Requests:
    """An endless request stream that counts how many requests were taken from it."""

    def __init__(self, limit: int | None = None) -> None:
        self.taken = 0
        self.limit = limit

    def __aiter__(self) -> Requests:
        return self

    async def __anext__(self) -> int:
        if self.limit is not None and self.taken == self.limit:
            raise StopAsyncIteration
        self.taken += 1
        return self.taken - 1


def test_answers_keep_the_request_order_while_running_concurrently() -> None:
    running = 0
    most = 0

    async def answer(request: int, position: int) -> tuple[int, int]:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await asyncio.sleep(random.Random(request).random() / 100)
        running -= 1
        return request, position

    async def main() -> list[tuple[int, int]]:
        return [a async for a in answer_in_order(Requests(limit=50), answer, window=8)]

    assert asyncio.run(main()) == [(k, k) for k in range(50)]
    assert most == 8


def test_a_reader_that_stops_reading_stops_the_stream_at_the_window() -> None:
    async def answer(request: int, position: int) -> int:
        return request

    async def main() -> tuple[int, int, int]:
        requests = Requests()
        answers = answer_in_order(requests, answer, window=5)
        assert await anext(answers) == 0
        await asyncio.sleep(0.05)
        held = requests.taken
        assert await anext(answers) == 1
        await asyncio.sleep(0.05)
        after_one_more = requests.taken
        await answers.aclose()
        await asyncio.sleep(0.05)
        return held, after_one_more, requests.taken

    assert asyncio.run(main()) == (5, 6, 6)


def test_closing_the_stream_cancels_the_answers_still_running() -> None:
    cancelled = []

    async def answer(request: int, position: int) -> int:
        try:
            await asyncio.sleep(0 if request == 0 else 60)
        except asyncio.CancelledError:
            cancelled.append(request)
            raise
        return request

    async def main() -> None:
        answers = answer_in_order(Requests(), answer, window=4)
        assert await anext(answers) == 0
        await answers.aclose()
        await asyncio.sleep(0.05)

    asyncio.run(main())
    assert sorted(cancelled) == [1, 2, 3]


def test_an_unparsed_request_is_named_by_its_position() -> None:
    assert "it answers request 7 of the stream (from 0" in unparsed(7)
