"""Changes run to their end whoever stops awaiting them, and shutdown can wait for them."""

from __future__ import annotations

import asyncio
import gc

import pytest

from server.changes import Changes


def test_a_change_outlives_its_cancelled_caller_and_wait_waits_for_it() -> None:
    async def main() -> list[str]:
        changes = Changes()
        done: list[str] = []
        gate = asyncio.Event()

        async def change() -> str:
            await gate.wait()
            done.append("changed")
            return "result"

        caller = asyncio.ensure_future(changes.run(change()))
        await asyncio.sleep(0)
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        assert done == []
        waiting = asyncio.create_task(changes.wait())
        await asyncio.sleep(0.01)
        assert not waiting.done()
        gate.set()
        await waiting
        assert await changes.run(change()) == "result"
        return done

    assert asyncio.run(main()) == ["changed", "changed"]


def test_a_failure_nobody_awaits_is_not_reported_unretrieved_and_one_awaited_is_raised() -> None:
    unretrieved: list[dict] = []

    async def fail() -> None:
        await asyncio.sleep(0)
        raise ValueError("bad files")

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _, ctx: unretrieved.append(ctx))
        changes = Changes()
        caller = asyncio.ensure_future(changes.run(fail()))
        await asyncio.sleep(0)
        caller.cancel()
        await asyncio.sleep(0.01)
        del caller
        gc.collect()
        with pytest.raises(ValueError, match="bad files"):
            await changes.run(fail())

    asyncio.run(main())
    assert unretrieved == []
