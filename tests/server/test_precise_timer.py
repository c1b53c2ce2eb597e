"""The precise timer runs callbacks on their loop at their time.monotonic() instant, in order,
not before it, and drops cancelled ones; a batcher waiting on it does not keep a core busy."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks.model_zoo import mlp_model
from server.precise_timer import PRECISE_TIMER, PreciseHandle
from tests.server.test_batcher import event_loop_kind, make_batcher  # noqa: F401 (autouse)


def test_callbacks_run_on_their_loop_in_order_never_early_and_cancelled_ones_not_at_all():
    async def main() -> tuple[list, dict[str, float]]:
        loop = asyncio.get_running_loop()
        ran: list[tuple[str, float, int]] = []
        start = time.monotonic()
        dues = {name: start + us / 1e6 for name, us in (("a", 600), ("b", 200), ("c", 400))}
        handles = {
            name: PRECISE_TIMER.call_at(
                loop, due, lambda name=name: ran.append((name, time.monotonic(), id(loop)))
            )
            for name, due in dues.items()
        }
        handles["c"].cancel()
        await asyncio.sleep(0.02)
        return ran, dues

    ran, dues = asyncio.run(main())
    assert [name for name, _, _ in ran] == ["b", "a"]
    assert all(at >= dues[name] for name, at, _ in ran)
    assert threading.current_thread() is threading.main_thread()


def test_a_lone_request_waiting_out_its_queue_delay_does_not_spin_the_loop(tmp_path: Path):
    """20 lone requests, each waiting its 900 µs queue delay: the loop thread spends far less
    CPU than the waits (re-checking the batch on every loop turn spent all of them)."""

    async def main() -> tuple[float, float]:
        batcher = make_batcher(tmp_path, mlp_model(), max_queue_delay_us=900)
        batcher.start()
        x = {"x": np.ones((1, 32), np.float32)}
        await batcher.submit(x, 1)
        cpu, wall = time.thread_time(), time.perf_counter()
        for _ in range(20):
            await batcher.submit(x, 1)
        cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
        await batcher.close()
        return cpu, wall

    cpu, wall = asyncio.run(main())
    assert wall >= 20 * 900e-6
    assert cpu < 0.5 * 20 * 900e-6, f"loop thread CPU {cpu * 1e3:.1f} ms for 18 ms of delays"


def test_while_a_batch_runs_a_partial_batch_is_rechecked_on_each_loop_turn(tmp_path: Path):
    """With a batch executing on one of two instances, the loop turns often anyway: a partial
    batch's last sub-ms of delay is re-checked on the loop (a loop handle), not handed to the
    timer thread, whose hand-offs cost a busy loop the GIL; it still waits its full delay."""
    from tests.server.test_batcher import Gate, row

    async def main() -> tuple[object, float]:
        gate = Gate()
        batcher = make_batcher(
            tmp_path, mlp_model(), instances=2, max_queue_delay_us=900, before_run=gate
        )
        batcher.start()
        running = asyncio.create_task(batcher.submit({"x": row(-1)}, 1))
        while batcher.busy_instances == 0:
            await asyncio.sleep(0.001)
        start = time.perf_counter()
        waiting = asyncio.create_task(batcher.submit({"x": row(1)}, 1))
        for _ in range(3):
            await asyncio.sleep(0)
        handle = batcher._delay_alarm.handle
        gate.open()
        await asyncio.wait_for(waiting, 30)
        waited = time.perf_counter() - start
        await running
        await batcher.close()
        return handle, waited

    handle, waited = asyncio.run(main())
    assert not isinstance(handle, PreciseHandle)
    assert waited >= 900e-6
