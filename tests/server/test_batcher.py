"""The dynamic batcher over real ONNX Runtime sessions: routing, batching rules, queue policy."""

import asyncio
import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from benchmarks.model_zoo import (
    add_sub_model,
    gather_model,
    graph_model,
    medium_model,
    mlp_model,
)
from server.batcher import DynamicBatcher
from server.errors import (
    InferenceFailedError,
    InvalidRequestError,
    ModelUnavailableError,
    QueueFullError,
    RequestTimeoutError,
)
from server.event_loop import EVENT_LOOPS
from server.model_config import (
    DynamicBatchingConfig,
    InstanceGroupConfig,
    ModelConfig,
    QueuePolicy,
    complete_config,
)
from server.onnx_runner import OnnxRunner
from server.precise_timer import PreciseHandle

SLOW_ROWS = 256


@pytest.fixture(autouse=True, params=list(EVENT_LOOPS))
def event_loop_kind(request: pytest.FixtureRequest) -> Iterator[str]:
    """Each test runs on every loop the server can serve on (their timer handles differ):
    asyncio.run takes its new loop from the policy set here."""
    before = asyncio.get_event_loop_policy()
    policy = asyncio.DefaultEventLoopPolicy()
    policy.new_event_loop = EVENT_LOOPS[request.param]
    asyncio.set_event_loop_policy(policy)
    yield request.param
    asyncio.set_event_loop_policy(before)


def make_batcher(
    tmp_path: Path,
    model: onnx.ModelProto,
    *,
    max_batch_size: int = 64,
    instances: int = 1,
    inline_max_us: int = 0,
    ran_on: list[str] | None = None,
    before_run: Callable[[dict[str, np.ndarray]], None] | None = None,
    **batching,
) -> DynamicBatcher:
    """A batcher over a real ONNX Runtime session; ran_on collects the executing thread names,
    and before_run sees each batch's inputs before ONNX Runtime runs it."""
    path = tmp_path / f"model-{id(model)}.onnx"
    path.write_bytes(model.SerializeToString())
    config = ModelConfig(
        name="m",
        max_batch_size=max_batch_size,
        dynamic_batching=DynamicBatchingConfig(**batching),
        instance_group=InstanceGroupConfig(count=instances, inline_max_us=inline_max_us),
    )
    runner = OnnxRunner(path, config.onnxruntime, instances)
    config = complete_config(config, runner.inputs, runner.outputs, source=str(path))
    cost = runner.calibrate(config)
    if ran_on is None and before_run is None:
        return DynamicBatcher(config, runner.run, cost=cost)

    def run(instance, feed, outputs):
        if ran_on is not None:
            ran_on.append(threading.current_thread().name)
        if before_run is not None:
            before_run(feed)
        return runner.run(instance, feed, outputs)

    return DynamicBatcher(config, run, cost=cost)


def slow_model() -> onnx.ModelProto:
    """Wide enough that SLOW_ROWS rows keep the single instance busy for a long while."""
    return medium_model(width=2048, layers=4)


async def occupy(batcher: DynamicBatcher) -> asyncio.Task:
    """Start a long batch and return once it is executing."""
    x = np.ones((SLOW_ROWS, 2048), np.float32)
    task = asyncio.create_task(batcher.submit({"x": x}, SLOW_ROWS))
    while batcher.busy_instances == 0:
        await asyncio.sleep(0.001)
    return task


def test_500_concurrent_requests_get_exactly_their_rows(tmp_path: Path) -> None:
    model = mlp_model()
    reference = ort.InferenceSession(model.SerializeToString())
    rng = np.random.default_rng(7)
    requests = [
        rng.standard_normal((int(rng.integers(1, 5)), 32)).astype(np.float32) for _ in range(500)
    ]

    async def main() -> tuple[list, DynamicBatcher]:
        batcher = make_batcher(tmp_path, model, instances=2, max_queue_delay_us=2000)
        batcher.start()
        results = await asyncio.gather(*(batcher.submit({"x": x}, len(x)) for x in requests))
        await batcher.close()
        return results, batcher

    results, batcher = asyncio.run(main())
    for x, result in zip(requests, results, strict=True):
        np.testing.assert_allclose(result["y"], reference.run(None, {"x": x})[0], rtol=1e-5)
    stats = batcher.stats
    assert stats.success.count == 500
    assert stats.inference_count == sum(len(x) for x in requests)
    assert stats.execution_count < 500
    assert sum(stats.batch_sizes) > 1 and max(stats.batch_sizes) <= 64


def preferred_batcher(tmp_path: Path, sizes: tuple[int, ...]) -> DynamicBatcher:
    """A started MLP batcher of max_batch_size 16 whose queue delay (60 s) never fires in a
    test: only its preferred sizes, or a batch that cannot grow, make it dispatch."""
    batcher = make_batcher(
        tmp_path,
        mlp_model(),
        max_batch_size=16,
        max_queue_delay_us=60_000_000,
        preferred_batch_sizes=sizes,
    )
    batcher.start()
    return batcher


def test_preferred_batch_size_dispatches_without_waiting_for_the_delay(tmp_path: Path) -> None:
    async def main() -> DynamicBatcher:
        batcher = preferred_batcher(tmp_path, (4,))
        xs = [np.full((1, 32), i, np.float32) for i in range(4)]
        await asyncio.wait_for(asyncio.gather(*(batcher.submit({"x": x}, 1) for x in xs)), 30)
        await batcher.close()
        return batcher

    batcher = asyncio.run(main())
    assert set(batcher.stats.batch_sizes) == {4}
    assert batcher.stats.execution_count == 1


def test_a_request_that_would_pass_the_largest_preferred_size_closes_the_batch(
    tmp_path: Path,
) -> None:
    """Triton's GetDynamicBatch: two 3-row requests with preferred size 4 cannot make 4 without
    splitting one, and together they pass 4, so the first leaves at once as a batch of 3 (not
    after the 60 s queue delay) while the second waits for batch-mates or the delay."""

    async def main() -> DynamicBatcher:
        batcher = preferred_batcher(tmp_path, (4,))
        first, second = [
            asyncio.ensure_future(batcher.submit({"x": np.full((3, 32), i, np.float32)}, 3))
            for i in range(2)
        ]
        assert (await asyncio.wait_for(first, 30))["y"].shape == (3, 1)
        assert batcher.queued == 1 and not second.done()
        await batcher.close()
        assert (await second)["y"].shape == (3, 1)
        return batcher

    batcher = asyncio.run(main())
    assert batcher.stats.batch_sizes.keys() == {3}
    assert batcher.stats.execution_count == 2


def test_multi_row_requests_forming_a_preferred_size_dispatch_at_once(tmp_path: Path) -> None:
    """Rows 1 + 3 make the preferred size 4 without splitting a request: that batch leaves at
    once despite a 60 s queue delay, while the 2-row request behind it keeps waiting."""

    async def main() -> DynamicBatcher:
        batcher = preferred_batcher(tmp_path, (4, 8))
        *first, rest = [
            asyncio.ensure_future(batcher.submit({"x": np.ones((n, 32), np.float32)}, n))
            for n in (1, 3, 2)
        ]
        await asyncio.wait_for(asyncio.gather(*first), 30)
        assert batcher.stats.batch_sizes.keys() == {4}
        assert batcher.queued == 1 and not rest.done()
        await batcher.close()
        assert (await rest)["y"].shape == (2, 1)
        return batcher

    batcher = asyncio.run(main())
    assert batcher.stats.batch_sizes.keys() == {4, 2}


def test_a_request_over_max_batch_size_names_its_inputs(tmp_path: Path) -> None:
    async def main() -> None:
        batcher = make_batcher(tmp_path, add_sub_model(4), max_batch_size=8)
        batcher.start()
        a = np.ones((9, 4), np.float32)
        with pytest.raises(InvalidRequestError) as info:
            await batcher.submit({"INPUT0": a, "INPUT1": a}, 9)
        await batcher.close()
        assert str(info.value) == (
            "inputs 'INPUT0', 'INPUT1': batch dimension 9 exceeds max_batch_size=8 of model "
            "'m'; split the request into parts of at most 8 rows"
        )

    asyncio.run(main())


def test_full_queue_rejects_at_once(tmp_path: Path) -> None:
    async def main() -> None:
        batcher = make_batcher(tmp_path, slow_model(), max_batch_size=SLOW_ROWS, max_queue_size=2)
        batcher.start()
        blocker = await occupy(batcher)
        x = np.ones((1, 2048), np.float32)
        queued = [asyncio.create_task(batcher.submit({"x": x}, 1)) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(QueueFullError, match="max_queue_size=2"):
            await batcher.submit({"x": x}, 1)
        await asyncio.gather(blocker, *queued)
        await batcher.close()
        assert batcher.stats.success.count == 3
        assert batcher.stats.fail.count == 1

    asyncio.run(main())


def test_expired_requests_are_dropped_before_they_run(tmp_path: Path) -> None:
    async def main() -> None:
        batcher = make_batcher(
            tmp_path, slow_model(), max_batch_size=SLOW_ROWS, default_timeout_us=10_000
        )
        batcher.start()
        blocker = await occupy(batcher)
        x = np.ones((3, 2048), np.float32)
        policy = "before it ran: default_timeout_us = 10000 of the queue passed; raise it in"
        with pytest.raises(RequestTimeoutError, match=policy):
            await batcher.submit({"x": x}, 3)
        with pytest.raises(RequestTimeoutError, match='its "timeout" of 2000 µs passed; send a'):
            await batcher.submit({"x": x}, 3, timeout_us=2_000)
        with pytest.raises(RequestTimeoutError, match="the caller's deadline passed; call with"):
            await batcher.submit({"x": x}, 3, deadline=time.monotonic() + 0.005)
        await blocker
        await batcher.close()
        stats = batcher.stats
        assert stats.execution_count == 1
        assert stats.inference_count == SLOW_ROWS
        assert stats.fail.count == 3

    asyncio.run(main())


def test_higher_priority_runs_first(tmp_path: Path) -> None:
    async def main() -> list[str]:
        batcher = make_batcher(
            tmp_path,
            slow_model(),
            max_batch_size=SLOW_ROWS,
            priority_levels=2,
            default_priority_level=2,
            enabled=False,
        )
        batcher.start()
        blocker = await occupy(batcher)
        order: list[str] = []
        x = np.ones((1, 2048), np.float32)

        async def run(label: str, priority: int | None) -> None:
            await batcher.submit({"x": x}, 1, priority=priority)
            order.append(label)

        low = asyncio.create_task(run("default", None))
        await asyncio.sleep(0)
        high = asyncio.create_task(run("high", 1))
        await asyncio.gather(blocker, low, high)
        await batcher.close()
        assert set(batcher.stats.batch_sizes) == {SLOW_ROWS, 1}
        return order

    assert asyncio.run(main()) == ["high", "default"]


def test_failed_batch_is_retried_one_by_one(tmp_path: Path) -> None:
    """The three requests run as one batch of 3 (preferred size, 60 s queue delay), which ONNX
    Runtime fails on the out-of-range index; then each runs alone."""
    ran: list[int] = []

    async def main() -> list:
        batcher = make_batcher(
            tmp_path,
            gather_model(),
            max_queue_delay_us=60_000_000,
            preferred_batch_sizes=(3,),
            before_run=lambda feed: ran.append(len(feed["idx"])),
        )
        batcher.start()
        idx = [np.array([[1]]), np.array([[99]]), np.array([[2]])]
        results = await asyncio.gather(
            *(batcher.submit({"idx": i}, 1) for i in idx), return_exceptions=True
        )
        await batcher.close()
        stats = batcher.stats
        assert stats.success.count == 2 and stats.fail.count == 1
        # The failed batch counts as an execution of no batch size, each rerun as one of 1 row
        # (it was one execution of a batch of 3 that never completed).
        assert stats.execution_count == 4 and stats.inference_count == 2
        assert {rows: size.compute_infer.count for rows, size in stats.batch_sizes.items()} == {
            1: 3
        }
        assert stats.compute_infer.count == 2
        return results

    good1, bad, good2 = asyncio.run(main())
    assert ran == [3, 1, 1, 1]
    np.testing.assert_array_equal(good1["y"], [[4, 5, 6, 7]])
    np.testing.assert_array_equal(good2["y"], [[8, 9, 10, 11]])
    assert isinstance(bad, InferenceFailedError)
    assert "ONNX Runtime failed" in str(bad)


def pairs(name: str, first: str = "N") -> onnx.ValueInfoProto:
    """An FP32 [first, 2] tensor."""
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, [first, 2])


def flatten_model() -> onnx.ModelProto:
    """x [N, 2] -> y [2N]: Reshape to [-1] keeps no row per input row, yet its dims are all -1."""
    shape = numpy_helper.from_array(np.array([-1], np.int64), "flat")
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M"])
    return graph_model(
        [helper.make_node("Reshape", ["x", "flat"], ["y"])], [pairs("x")], [y], [shape]
    )


def filter_model() -> onnx.ModelProto:
    """x [N, 2] -> y [K, 2]: the rows whose first value is positive (Compress), so a batch's
    output has fewer rows than the batch whenever one is dropped."""
    zero = numpy_helper.from_array(np.array(0, np.float32), "zero")
    first = numpy_helper.from_array(np.array(0, np.int64), "first")
    nodes = [
        helper.make_node("Gather", ["x", "first"], ["x0"], axis=1),
        helper.make_node("Greater", ["x0", "zero"], ["keep"]),
        helper.make_node("Compress", ["x", "keep"], ["y"], axis=0),
    ]
    return graph_model(nodes, [pairs("x")], [pairs("y", "K")], [zero, first])


def misshaped(output: str, shape: list[int], rows: int) -> str:
    """The error of a request whose output does not have its rows."""
    return (
        f"model 'm': output '{output}' has shape {shape}, but max_batch_size > 0 makes its first "
        f"dimension the batch dimension, which must equal the input rows ({rows}); if the "
        "model's outputs do not keep one row per input row, set max_batch_size = 0 in its "
        "config.toml to turn batching off"
    )


def two_in_one_batch(
    tmp_path: Path, model: onnx.ModelProto, xs: list[np.ndarray]
) -> tuple[list, list[int]]:
    """Submit xs so that they run as one batch (their rows make the preferred size; 60 s queue
    delay), then each alone if it fails; the results and the rows of every ONNX Runtime run."""
    ran: list[int] = []

    async def main() -> list:
        batcher = make_batcher(
            tmp_path,
            model,
            max_queue_delay_us=60_000_000,
            preferred_batch_sizes=(sum(len(x) for x in xs),),
            before_run=lambda feed: ran.append(len(feed["x"])),
        )
        batcher.start()
        results = await asyncio.wait_for(
            asyncio.gather(*(batcher.submit({"x": x}, len(x)) for x in xs), return_exceptions=True),
            30,
        )
        await batcher.close()
        assert batcher.stats.execution_count == 1 + len(xs)  # the batch, then each alone
        return results

    return asyncio.run(main()), ran


def test_a_batch_whose_outputs_lost_rows_is_rerun_one_by_one(tmp_path: Path) -> None:
    """The filter drops the first request's row, so the batch's y has 2 rows for 3: cut by rows,
    the first request would get the second one's first row. Run alone, the second request gets
    exactly its rows and the first a clear error."""
    dropped = np.array([[-1, 0]], np.float32)
    kept = np.array([[1, 2], [3, 4]], np.float32)
    (first, second), ran = two_in_one_batch(tmp_path, filter_model(), [dropped, kept])
    assert ran == [3, 1, 2]
    assert isinstance(first, InferenceFailedError)
    assert str(first) == misshaped("y", [0, 2], 1)
    np.testing.assert_array_equal(second["y"], kept)


def test_outputs_without_a_batch_dimension_fail_each_request_clearly(tmp_path: Path) -> None:
    """The flattening model in one batch of 1 + 2 rows made y [6]: cut by rows, the requests got
    [1.] and [2., 3.]; now each is run alone and fails, naming y, its shape and the fix, which
    works: with max_batch_size = 0 the same model answers the whole tensor."""
    xs = [np.array([[1, 2]], np.float32), np.array([[3, 4], [5, 6]], np.float32)]
    (first, second), ran = two_in_one_batch(tmp_path, flatten_model(), xs)
    assert ran == [3, 1, 2]
    assert isinstance(first, InferenceFailedError) and isinstance(second, InferenceFailedError)
    assert str(first) == misshaped("y", [2], 1)
    assert str(second) == misshaped("y", [4], 2)

    async def unbatched() -> dict:
        batcher = make_batcher(tmp_path, flatten_model(), max_batch_size=0)
        batcher.start()
        result = await batcher.submit({"x": xs[1]}, 1)
        await batcher.close()
        return result

    np.testing.assert_array_equal(asyncio.run(unbatched())["y"], [3, 4, 5, 6])


def test_an_error_joining_a_batch_fails_only_its_cause_and_keeps_the_instance(
    tmp_path: Path,
) -> None:
    """Inputs that cannot be joined (datetime64 beside float32: NumPy has no common type) used to
    kill the only instance thread, leaving the batch unanswered. Now the batch runs one by one:
    the float request gets its rows, the other ONNX Runtime's error; and the instance then runs
    the next batch."""
    reference = ort.InferenceSession(mlp_model().SerializeToString())
    ran: list[int] = []

    async def main() -> tuple[list, list]:
        batcher = make_batcher(
            tmp_path,
            mlp_model(),
            max_queue_delay_us=60_000_000,
            preferred_batch_sizes=(2,),
            before_run=lambda feed: ran.append(len(feed["x"])),
        )
        batcher.start()
        dates = np.zeros((1, 32), "datetime64[s]")
        mixed = [{"x": row(1)}, {"x": dates}]
        results = await asyncio.wait_for(
            asyncio.gather(*(batcher.submit(f, 1) for f in mixed), return_exceptions=True), 30
        )
        later = await asyncio.wait_for(
            asyncio.gather(*(batcher.submit({"x": row(i)}, 1) for i in (2, 3))), 30
        )
        await batcher.close()
        # The failed join ran nothing: the executions are the two alone and the later batch.
        assert batcher.stats.batch_sizes.keys() == {1, 2}
        assert batcher.stats.execution_count == 3
        return results, later

    (good, bad), later = asyncio.run(main())
    assert ran == [1, 1, 2]
    np.testing.assert_allclose(good["y"], reference.run(None, {"x": row(1)})[0], rtol=1e-6)
    assert isinstance(bad, InferenceFailedError) and "ONNX Runtime failed" in str(bad)
    for marker, result in zip((2, 3), later, strict=True):
        expected = reference.run(None, {"x": row(marker)})[0]
        np.testing.assert_allclose(result["y"], expected, rtol=1e-6)


@pytest.mark.parametrize("settings", [{"max_batch_size": 0}, {"enabled": False}])
def test_batching_off_runs_each_request_alone(tmp_path: Path, settings: dict) -> None:
    async def main() -> DynamicBatcher:
        batcher = make_batcher(tmp_path, mlp_model(), **settings)
        if not batcher.config.max_batch_size:
            assert not batcher.config.batching
        batcher.start()
        xs = [np.full((1, 32), i, np.float32) for i in range(20)]
        await asyncio.gather(*(batcher.submit({"x": x}, 1) for x in xs))
        await batcher.close()
        return batcher

    batcher = asyncio.run(main())
    assert set(batcher.stats.batch_sizes) == {1}
    assert batcher.stats.execution_count == 20


def test_requested_outputs_only(tmp_path: Path) -> None:
    async def main() -> list:
        batcher = make_batcher(tmp_path, add_sub_model(4), max_queue_delay_us=1000)
        batcher.start()
        a = np.ones((2, 4), np.float32)
        results = await asyncio.gather(
            batcher.submit({"INPUT0": a, "INPUT1": a}, 2, outputs=["OUTPUT1"]),
            batcher.submit({"INPUT0": a, "INPUT1": 2 * a}, 2, outputs=["OUTPUT0"]),
        )
        await batcher.close()
        return results

    first, second = asyncio.run(main())
    assert list(first) == ["OUTPUT1"] and list(second) == ["OUTPUT0"]
    np.testing.assert_array_equal(first["OUTPUT1"], np.zeros((2, 4)))
    np.testing.assert_array_equal(second["OUTPUT0"], np.full((2, 4), 3))


def test_close_lets_queued_requests_finish(tmp_path: Path) -> None:
    async def main() -> tuple[list, DynamicBatcher]:
        batcher = make_batcher(tmp_path, mlp_model(), max_queue_delay_us=100_000)
        batcher.start()
        tasks = [
            asyncio.create_task(batcher.submit({"x": np.ones((1, 32), np.float32)}, 1))
            for _ in range(10)
        ]
        await asyncio.sleep(0)
        await batcher.close()
        return await asyncio.gather(*tasks), batcher

    results, batcher = asyncio.run(main())
    assert len(results) == 10 and all(r["y"].shape == (1, 1) for r in results)
    assert dataclasses.asdict(batcher.stats)["success"]["count"] == 10


def run_one_at_a_time(batcher: DynamicBatcher, xs: list[np.ndarray]) -> list[dict]:
    """Submit each input after the previous answer, so every request is its own batch."""

    async def main() -> list[dict]:
        batcher.start()
        results = [await batcher.submit({"x": x}, len(x)) for x in xs]
        await batcher.close()
        return results

    return asyncio.run(main())


def test_batches_expected_within_inline_max_us_run_on_the_loop(tmp_path: Path) -> None:
    model = mlp_model()
    reference = ort.InferenceSession(model.SerializeToString())
    xs = [np.full((2, 32), i / 10, np.float32) for i in range(12)]
    ran_on: list[str] = []
    batcher = make_batcher(tmp_path, model, inline_max_us=100_000, ran_on=ran_on)
    results = run_one_at_a_time(batcher, xs)
    assert ran_on == [threading.current_thread().name] * len(xs)
    for x, result in zip(xs, results, strict=True):
        np.testing.assert_allclose(result["y"], reference.run(None, {"x": x})[0], rtol=1e-6)
    assert batcher.stats.execution_count == len(xs)


@pytest.mark.parametrize(
    ("model", "width", "inline_max_us"),
    [(mlp_model(), 32, 0), (medium_model(width=1024, layers=4), 1024, 50)],
    ids=["inline-off", "slow-model"],
)
def test_batches_stay_on_instance_threads(
    tmp_path: Path, model: onnx.ModelProto, width: int, inline_max_us: int
) -> None:
    ran_on: list[str] = []
    batcher = make_batcher(tmp_path, model, inline_max_us=inline_max_us, ran_on=ran_on)
    run_one_at_a_time(batcher, [np.ones((8, width), np.float32) for _ in range(8)])
    assert len(ran_on) == 8
    assert threading.current_thread().name not in ran_on


def test_a_failed_inline_batch_is_retried_on_an_instance_thread(tmp_path: Path) -> None:
    """The batch of 3 is expected to be fast, so it runs on the loop and fails there; its one
    ONNX Runtime call per request then runs on the instance thread, not on the loop."""
    ran_on: list[str] = []
    stats: dict = {}

    async def main() -> list:
        batcher = make_batcher(
            tmp_path,
            gather_model(),
            inline_max_us=100_000,
            ran_on=ran_on,
            max_queue_delay_us=60_000_000,
            preferred_batch_sizes=(3,),
        )
        batcher.start()
        idx = [np.array([[1]]), np.array([[99]]), np.array([[2]])]
        results = await asyncio.wait_for(
            asyncio.gather(*(batcher.submit({"idx": i}, 1) for i in idx), return_exceptions=True),
            30,
        )
        await batcher.close()
        stats["executions"] = batcher.stats.execution_count
        stats["sizes"] = {
            rows: s.compute_infer.count for rows, s in batcher.stats.batch_sizes.items()
        }
        return results

    good1, bad, good2 = asyncio.run(main())
    assert ran_on == [threading.current_thread().name] + ["m-i0"] * 3
    assert stats["executions"] == 4 and stats["sizes"] == {1: 3}
    np.testing.assert_array_equal(good1["y"], [[4, 5, 6, 7]])
    np.testing.assert_array_equal(good2["y"], [[8, 9, 10, 11]])
    assert isinstance(bad, InferenceFailedError)


SLOW_RANGE = 5_000_000


def sum_to_model() -> onnx.ModelProto:
    """n [N, 1] -> y [N, 1], each row the sum 0 + 1 + ... + (max(n) - 1) (Range, ReduceSum):
    instant on the zero inputs of load-time calibration, milliseconds for n = SLOW_RANGE."""
    n = helper.make_tensor_value_info("n", TensorProto.INT64, ["N", 1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])
    constants = [
        numpy_helper.from_array(np.array(value, np.float32), name)
        for name, value in (("zero", 0), ("one", 1))
    ]
    nodes = [
        helper.make_node("ReduceMax", ["n"], ["top"], keepdims=0),
        helper.make_node("Cast", ["top"], ["limit"], to=TensorProto.FLOAT),
        helper.make_node("Range", ["zero", "limit", "one"], ["steps"]),
        helper.make_node("ReduceSum", ["steps"], ["total"], keepdims=0),
        helper.make_node("Cast", ["n"], ["nf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["nf", "zero"], ["zeros"]),
        helper.make_node("Add", ["zeros", "total"], ["y"]),
    ]
    return graph_model(nodes, [n], [y], constants)


def test_a_batch_measured_over_inline_max_us_ends_running_on_the_loop(tmp_path: Path) -> None:
    """Calibrated on zeros, the model looks fast enough to run on the loop; real batches take
    milliseconds there, over twice the 1 ms inline_max_us. One slow run is not enough (it might
    have been preempted); after three, even the fast batches run on the instance thread."""
    ran_on: list[str] = []
    batcher = make_batcher(tmp_path, sum_to_model(), inline_max_us=1000, ran_on=ran_on)
    assert batcher._runs_inline(1)
    ns = [np.full((1, 1), n, np.int64) for n in (SLOW_RANGE, 0, SLOW_RANGE, SLOW_RANGE, 0, 0)]

    async def main() -> list[dict]:
        batcher.start()
        results = [await batcher.submit({"n": n}, 1) for n in ns]
        await batcher.close()
        return results

    results = asyncio.run(main())
    loop_thread = threading.current_thread().name
    assert ran_on == [loop_thread] * 4 + ["m-i0", "m-i0"]
    assert [float(r["y"][0, 0]) for r in results[-2:]] == [0.0, 0.0]


def test_time_the_loop_thread_is_descheduled_does_not_end_running_on_the_loop(
    tmp_path: Path,
) -> None:
    """Each run sleeps 3 ms before ONNX Runtime (wall time without CPU, as when the host takes
    the core away or a profiler pauses the process): three times the 1 ms inline_max_us by the
    clock, yet the model's cost is its CPU time, so every batch still runs on the loop."""
    ran_on: list[str] = []
    batcher = make_batcher(
        tmp_path,
        mlp_model(),
        inline_max_us=1000,
        ran_on=ran_on,
        before_run=lambda feed: time.sleep(0.003),
    )
    results = run_one_at_a_time(batcher, [np.ones((1, 32), np.float32)] * 6)
    assert ran_on == [threading.current_thread().name] * 6
    assert len(results) == 6


def test_a_sub_millisecond_queue_delay_is_kept_by_the_precise_timer(tmp_path):
    """Loop timers fire in whole milliseconds (asyncio's epoll; uvloop's loop.time() moves in
    whole milliseconds too), so a 900 µs delay is not left to one: the precise timer thread
    wakes the loop when it is due, measured by time.monotonic(), and the partial batch waits
    the full delay, by the wall clock and in the statistics (under uvloop a lone request ran
    after 0.05-1 ms, and its queue time was counted in whole milliseconds). 900 µs, not less:
    the three loop turns below must end before it is due, even on a busy machine."""

    async def main():
        batcher = make_batcher(tmp_path, mlp_model(), max_queue_delay_us=900)
        batcher.start()
        waits = []
        for _ in range(5):
            start = time.perf_counter()
            task = asyncio.ensure_future(batcher.submit({"x": np.ones((1, 32), np.float32)}, 1))
            for _ in range(3):
                await asyncio.sleep(0)
            armed = batcher._delay_alarm
            assert armed is not None and isinstance(armed.handle, PreciseHandle)
            await task
            waits.append(time.perf_counter() - start)
        stats = batcher.stats
        await batcher.close()
        return waits, stats

    waits, stats = asyncio.run(main())
    assert min(waits) >= 900e-6, waits
    assert stats.queue.ns >= 5 * 900_000
    assert stats.success.ns >= stats.queue.ns + stats.compute_infer.ns > stats.queue.ns


class Gate:
    """A before_run hook that records each batch's first x value, then holds the batch on its
    instance thread until opened: requests queue up behind it, and `ran` shows the order in
    which the queued ones then run."""

    def __init__(self) -> None:
        self.ran: list[float] = []
        self.threads: list[str] = []
        self._opened = threading.Event()

    def __call__(self, feed: dict[str, np.ndarray]) -> None:
        self.ran.append(float(feed["x"][0, 0]))
        self.threads.append(threading.current_thread().name)
        self._opened.wait(30)

    def open(self) -> None:
        """Let the held batch and every later one run."""
        self._opened.set()


def row(value: float) -> np.ndarray:
    """One MLP input row filled with value, which Gate records as the row's marker."""
    return np.full((1, 32), value, np.float32)


def gated_batcher(tmp_path: Path, gate: Gate, **batching) -> DynamicBatcher:
    """A started single-instance MLP batcher that runs every request alone, held by gate."""
    batcher = make_batcher(tmp_path, mlp_model(), enabled=False, before_run=gate, **batching)
    batcher.start()
    return batcher


async def hold(batcher: DynamicBatcher) -> asyncio.Task:
    """Start a request (marker -1) that the gate holds on the only instance; return once it
    is executing, so later requests queue."""
    task = asyncio.create_task(batcher.submit({"x": row(-1)}, 1))
    while batcher.busy_instances == 0:
        await asyncio.sleep(0.001)
    return task


def two_levels(**level_one) -> dict:
    """Batching settings with priority levels 1 and 2 (default 2), level 1 with its own policy."""
    return {
        "priority_levels": 2,
        "default_priority_level": 2,
        "priority_queue_policy": ((1, QueuePolicy(**level_one)),),
    }


def test_each_priority_level_has_its_own_max_queue_size(tmp_path: Path) -> None:
    """As in Triton, max_queue_size counts one level's queue: level 1 (its own limit 1) is full
    while level 2 (the default policy's 2) still accepts, and then fills up too."""

    async def main() -> None:
        gate = Gate()
        batcher = gated_batcher(tmp_path, gate, max_queue_size=2, **two_levels(max_queue_size=1))
        blocker = await hold(batcher)
        queued = [asyncio.create_task(batcher.submit({"x": row(1)}, 1, priority=1))]
        await asyncio.sleep(0)
        with pytest.raises(QueueFullError, match="priority level 1 queue holds max_queue_size=1"):
            await batcher.submit({"x": row(1)}, 1, priority=1)
        queued += [asyncio.create_task(batcher.submit({"x": row(2)}, 1)) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(QueueFullError, match="priority level 2 queue holds max_queue_size=2"):
            await batcher.submit({"x": row(2)}, 1, priority=2)
        with pytest.raises(QueueFullError, match="raise max_queue_size in the model's config"):
            await batcher.submit({"x": row(2)}, 1)
        gate.open()
        await asyncio.wait_for(asyncio.gather(blocker, *queued), 30)
        await batcher.close()
        assert gate.ran == [-1, 1, 2, 2]
        assert (batcher.stats.success.count, batcher.stats.fail.count) == (4, 3)

    asyncio.run(main())


def test_a_level_timeout_rejects_only_that_levels_requests(tmp_path: Path) -> None:
    async def main() -> None:
        gate = Gate()
        batcher = gated_batcher(tmp_path, gate, **two_levels(default_timeout_us=5_000))
        blocker = await hold(batcher)
        patient = asyncio.create_task(batcher.submit({"x": row(2)}, 1))
        with pytest.raises(RequestTimeoutError, match="before it ran"):
            await asyncio.wait_for(batcher.submit({"x": row(1)}, 1, priority=1), 10)
        assert not patient.done()
        gate.open()
        await asyncio.wait_for(asyncio.gather(blocker, patient), 30)
        await batcher.close()
        assert gate.ran == [-1, 2]

    asyncio.run(main())


def test_delay_runs_a_timed_out_request_after_its_level_and_before_lower_ones(
    tmp_path: Path,
) -> None:
    """Level 1 delays timed-out requests: `late` (its 1 ms request timeout passed while the
    instance was held) runs after the level-1 request queued behind it, yet before level 2,
    and gets its own output."""
    reference = ort.InferenceSession(mlp_model().SerializeToString())

    async def main() -> tuple[Gate, list[dict]]:
        gate = Gate()
        policy = {"default_timeout_us": 60_000_000, "timeout_action": "delay"}
        batcher = gated_batcher(tmp_path, gate, **two_levels(**policy))
        blocker = await hold(batcher)
        late = asyncio.create_task(batcher.submit({"x": row(1)}, 1, priority=1, timeout_us=1000))
        await asyncio.sleep(0.02)
        on_time = asyncio.create_task(batcher.submit({"x": row(2)}, 1, priority=1))
        lower = asyncio.create_task(batcher.submit({"x": row(3)}, 1, priority=2))
        await asyncio.sleep(0)
        assert batcher.queued == 3
        gate.open()
        results = await asyncio.wait_for(asyncio.gather(late, on_time, lower), 30)
        await blocker
        await batcher.close()
        return gate, results

    gate, results = asyncio.run(main())
    assert gate.ran == [-1, 2, 1, 3]
    for marker, result in zip((1, 2, 3), results, strict=True):
        expected = reference.run(None, {"x": row(marker)})[0]
        np.testing.assert_allclose(result["y"], expected, rtol=1e-6)


@pytest.mark.parametrize(
    ("allow", "default_us", "request_us", "rejected"),
    [
        (True, 60_000_000, 5_000, True),
        (True, 5_000, 60_000_000, True),
        (False, 0, 5_000, False),
        (False, 60_000_000, 5_000, False),
    ],
    ids=[
        "shorter-applies",
        "longer-does-not-extend",
        "ignored-no-default",
        "ignored-longer-default",
    ],
)
def test_allow_timeout_override(
    tmp_path: Path, allow: bool, default_us: int, request_us: int, rejected: bool
) -> None:
    """Triton's allow_timeout_override: a request's timeout may shorten the level's default,
    never extend it; when not allowed it is ignored. The instance is held for 50 ms: ten times
    the 5 ms timeout where that applies, far less than the 60 s one."""

    async def main() -> None:
        gate = Gate()
        batcher = gated_batcher(
            tmp_path, gate, default_timeout_us=default_us, allow_timeout_override=allow
        )
        blocker = await hold(batcher)
        task = asyncio.create_task(batcher.submit({"x": row(1)}, 1, timeout_us=request_us))
        await asyncio.sleep(0)
        await asyncio.sleep(0.05)
        assert task.done() == rejected
        gate.open()
        if rejected:
            with pytest.raises(RequestTimeoutError):
                await task
        else:
            assert (await asyncio.wait_for(task, 30))["y"].shape == (1, 1)
        await blocker
        await batcher.close()
        assert gate.ran == ([-1] if rejected else [-1, 1])

    asyncio.run(main())


def test_the_callers_deadline_drops_a_delayed_request(tmp_path: Path) -> None:
    """timeout_action "delay" never drops a request for its queue timeout, but the caller's
    deadline (the gRPC deadline: the caller is gone) still does."""

    async def main() -> None:
        gate = Gate()
        batcher = gated_batcher(tmp_path, gate, default_timeout_us=1_000, timeout_action="delay")
        blocker = await hold(batcher)
        delayed = asyncio.create_task(batcher.submit({"x": row(1)}, 1))
        dropped = batcher.submit({"x": row(2)}, 1, deadline=time.monotonic() + 0.02)
        with pytest.raises(RequestTimeoutError, match="before it ran"):
            await asyncio.wait_for(dropped, 10)
        assert not delayed.done()
        gate.open()
        assert (await asyncio.wait_for(delayed, 30))["y"].shape == (1, 1)
        await blocker
        await batcher.close()
        assert gate.ran == [-1, 1]

    asyncio.run(main())


def test_two_instances_execute_at_once_while_the_loop_keeps_answering(tmp_path: Path) -> None:
    """Both instance threads hold a batch at the same time, and meanwhile the event loop still
    turns: a ping task completes and a timer fires while neither batch has finished."""

    async def main() -> None:
        gate = Gate()
        batcher = make_batcher(tmp_path, mlp_model(), instances=2, enabled=False, before_run=gate)
        batcher.start()
        tasks = [asyncio.create_task(batcher.submit({"x": row(i)}, 1)) for i in (1, 2)]

        async def both_held() -> None:
            while len(gate.threads) < 2:
                await asyncio.sleep(0.001)

        await asyncio.wait_for(both_held(), 30)
        assert sorted(gate.threads) == ["m-i0", "m-i1"]
        assert batcher.busy_instances == 2

        async def ping() -> str:
            await asyncio.sleep(0)
            return "pong"

        assert await asyncio.wait_for(ping(), 10) == "pong"
        await asyncio.sleep(0.01)
        assert batcher.busy_instances == 2 and not any(t.done() for t in tasks)
        gate.open()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
        await batcher.close()
        assert sorted(gate.ran) == [1, 2]

    asyncio.run(main())


def test_cancelled_requests_free_their_queue_slots_at_once(tmp_path: Path) -> None:
    """While the only instance is busy, two requests fill max_queue_size=2 and their callers
    give up (no deadline): their slots free at once, so a live request is queued, not refused."""

    async def main() -> None:
        gate = Gate()
        batcher = gated_batcher(tmp_path, gate, max_queue_size=2)
        blocker = await hold(batcher)
        gone = [asyncio.create_task(batcher.submit({"x": row(1)}, 1)) for _ in range(2)]
        await asyncio.sleep(0)
        assert batcher.queued == 2
        for task in gone:
            task.cancel()
        await asyncio.gather(*gone, return_exceptions=True)
        assert batcher.queued == 0
        live = asyncio.create_task(batcher.submit({"x": row(2)}, 1))
        await asyncio.sleep(0)
        assert batcher.queued == 1 and not live.done()
        gate.open()
        assert (await asyncio.wait_for(live, 30))["y"].shape == (1, 1)
        await blocker
        await batcher.close()
        assert gate.ran == [-1, 2]
        assert (batcher.stats.success.count, batcher.stats.fail.count) == (2, 2)

    asyncio.run(main())


def test_a_priority_outside_the_levels_goes_to_the_default_level(tmp_path: Path) -> None:
    """As Triton's InferenceRequest::SetPriority: priority 0, negative or above priority_levels
    means default_priority_level (here 2), so those requests run after level 1's and in arrival
    order with the level-2 request."""

    async def main() -> None:
        gate = Gate()
        batcher = gated_batcher(tmp_path, gate, **two_levels())
        blocker = await hold(batcher)
        tasks = [
            asyncio.create_task(batcher.submit({"x": row(marker)}, 1, priority=priority))
            for marker, priority in ((3, 3), (4, -1), (2, 2), (5, 0), (1, 1))
        ]
        await asyncio.sleep(0)
        assert batcher.queued == 5
        gate.open()
        await asyncio.wait_for(asyncio.gather(blocker, *tasks), 30)
        await batcher.close()
        assert gate.ran == [-1, 1, 3, 4, 2, 5]

    asyncio.run(main())


def test_a_hold_keeps_a_closing_version_open_until_released(tmp_path: Path) -> None:
    """A caller that resolved the version before it began to unload (a Predict waiting for its
    coalesced group) still submits and gets its answer; close() returns only after release(),
    and no new hold or request is taken once closing."""

    async def main() -> None:
        batcher = make_batcher(tmp_path, mlp_model())
        batcher.start()
        batcher.hold()
        closing = asyncio.create_task(batcher.close())
        await asyncio.sleep(0)
        with pytest.raises(ModelUnavailableError, match="unloading"):
            batcher.hold()
        result = await batcher.submit({"x": row(1)}, 1)
        assert result["y"].shape == (1, 1)
        await asyncio.sleep(0.05)
        assert not closing.done()
        batcher.release()
        await asyncio.wait_for(closing, 30)
        with pytest.raises(ModelUnavailableError, match="unloading"):
            await batcher.submit({"x": row(2)}, 1)

    asyncio.run(main())


def test_room_is_what_a_level_can_still_queue(tmp_path: Path) -> None:
    """room() counts the free slots of max_queue_size in a priority level's queue, None when the
    queue has no limit."""

    async def main() -> None:
        gate = Gate()
        batcher = gated_batcher(tmp_path, gate, **two_levels(max_queue_size=1), max_queue_size=3)
        assert (batcher.room(), batcher.room(1)) == (3, 1)
        blocker = await hold(batcher)
        tasks = [asyncio.create_task(batcher.submit({"x": row(1)}, 1)) for _ in range(2)]
        await asyncio.sleep(0)
        assert (batcher.room(), batcher.room(2), batcher.room(1)) == (1, 1, 1)
        gate.open()
        await asyncio.wait_for(asyncio.gather(blocker, *tasks), 30)
        await batcher.close()
        unlimited = make_batcher(tmp_path, mlp_model())
        assert unlimited.room() is None

    asyncio.run(main())
