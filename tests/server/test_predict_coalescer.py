"""Coalesced Predict runs on a real store and real ONNX Runtime: requests of one loop turn run
as one group, and each gets exactly what it gets when it runs alone."""

from __future__ import annotations

import asyncio
import gc
import weakref
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper

from benchmarks.model_zoo import graph_model, mlp_model, write_model
from featurestore.dtypes import DType, FeatureStatus
from featurestore.errors import InvalidArgumentError
from featurestore.online_store import OnlineStore, StoreConfig, WriteBatch
from featurestore.registry import Entity, Feature, FeatureView, JoinKey
from server.errors import QueueFullError
from server.model_repository import ModelRepository
from server.predict_coalescer import PredictCoalescer, Scored, _all

WIDTH = 32
FEATURES = [f"f{i}" for i in range(WIDTH - 2)]
CONFIG = f"""max_batch_size = 64
[features]
entity = "user"
input = "x"
outputs = {[*(f"stats:{f}" for f in FEATURES), "risk:r", "amount"]!r}
[[features.columns]]
features = {[f"stats:{f}" for f in FEATURES]!r}
default = 0.5
[[features.columns]]
feature = "risk:r"
[[features.columns]]
request = "amount"
[request_values]
amount = "float64"
[[transforms]]
op = "clip"
inputs = ["amount"]
params = {{lo = 0.0, hi = 10.0}}
""".replace("'", '"')


@pytest.fixture
def setup(tmp_path: Path):
    """A store where ids 1-40 have stats (21-25 null in f0), ids 1-30 and 36-40 a risk score."""
    store = OnlineStore(StoreConfig(path=tmp_path / "data", sync=False))
    store.registry.apply(
        [Entity("user", (JoinKey("id", DType.INT64),))],
        [
            FeatureView("stats", "user", tuple(Feature(f, DType.FLOAT32) for f in FEATURES)),
            FeatureView("risk", "user", (Feature("r", DType.FLOAT64),)),
        ],
    )
    rng = np.random.default_rng(3)
    ids = np.arange(1, 41)
    columns = {f: rng.normal(size=40).astype(np.float32) for f in FEATURES}
    store.write(WriteBatch("stats", {"id": ids}, np.full(40, 1000), columns,
                           {"f0": (ids >= 21) & (ids <= 25)}))  # fmt: skip
    risky = np.concatenate([ids[:30], ids[35:]])
    store.write(WriteBatch("risk", {"id": risky}, np.arange(len(risky)) + 500,
                           {"r": rng.random(len(risky))}))  # fmt: skip
    write_model(tmp_path / "models", "scorer", mlp_model(seed=2), config_toml=CONFIG)
    yield store, tmp_path / "models"
    store.close()


def run(store: OnlineStore, repo: Path, requests: list[tuple], together: bool) -> tuple:
    """Each request's Scored (or exception), run in one gather or one after another."""

    async def main() -> tuple[list, PredictCoalescer]:
        models = ModelRepository(repo, watch=False)
        await models.start()
        coalescer = PredictCoalescer(store, models.get("scorer", ""), max_rows=1000)
        calls = [coalescer.predict(keys, {"amount": amount}, len(amount), None, None)
                 for keys, amount in requests]  # fmt: skip
        if together:
            out = await asyncio.gather(*calls, return_exceptions=True)
        else:
            out = [await call for call in calls]
        await models.stop()
        return out, coalescer

    return asyncio.run(main())


def requests_of(*id_lists: list[int]) -> list[tuple]:
    return [
        ({"id": np.array(ids, np.int64)}, np.arange(len(ids), dtype=np.float64)) for ids in id_lists
    ]


def assert_same(a: Scored, b: Scored) -> None:
    np.testing.assert_allclose(a.scores["y"], b.scores["y"], rtol=1e-5, atol=1e-6)
    for field in ("failed", "first_bad", "failed_status", "oldest_event_us"):
        np.testing.assert_array_equal(getattr(a.assembled, field), getattr(b.assembled, field))
    assert a.assembled.views == b.assembled.views
    fills_a = [(f.feature, f.statuses.tolist(), f.filled_with) for f in a.assembled.fills]
    fills_b = [(f.feature, f.statuses.tolist(), f.filled_with) for f in b.assembled.fills]
    assert fills_a == fills_b
    refs_a = [a.assembled.failed_features[i] for i in a.assembled.first_bad if i >= 0]
    refs_b = [b.assembled.failed_features[i] for i in b.assembled.first_bad if i >= 0]
    assert refs_a == refs_b


def test_one_turn_runs_as_one_group_and_each_gets_its_own_rows(setup) -> None:
    store, repo = setup
    requests = requests_of([1, 2, 3], [21, 22, 4, 50], [31, 32, 5], [], [36, 23, 40, 7, 8])
    together, coalescer = run(store, repo, requests, together=True)
    alone, single = run(store, repo, requests, together=False)
    assert (coalescer.groups, coalescer.requests) == (1, 5)
    assert (single.groups, single.requests) == (5, 5)
    for a, b in zip(together, alone, strict=True):
        assert_same(a, b)
    assert together[0].assembled.fills == []
    fills = {f.feature: f.statuses.tolist() for f in together[1].assembled.fills}
    assert fills["stats:f0"] == [FeatureStatus.NULL_VALUE] * 2 + [1, FeatureStatus.NOT_FOUND]
    assert together[2].assembled.failed.tolist() == [True, True, False]
    assert together[3].scores["y"].shape == (0, 1)
    assert (together[2].scores["y"][:2] == 0).all() and (together[4].scores["y"] != 0).all()


def test_a_request_with_wrong_keys_fails_alone(setup) -> None:
    store, repo = setup
    requests = requests_of([1, 2], [3, 4])
    requests.insert(1, ({"id": np.array(["a", "b"], object)}, np.ones(2)))
    out, coalescer = run(store, repo, requests, together=True)
    assert isinstance(out[1], InvalidArgumentError) and "id" in str(out[1])
    assert isinstance(out[0], Scored) and isinstance(out[2], Scored)
    assert (coalescer.groups, coalescer.requests) == (2, 3)


def test_groups_hold_at_most_max_rows(setup) -> None:
    store, repo = setup

    async def main() -> tuple[list, PredictCoalescer]:
        models = ModelRepository(repo, watch=False)
        await models.start()
        coalescer = PredictCoalescer(store, models.get("scorer", ""), max_rows=5)
        out = await asyncio.gather(
            *(coalescer.predict({"id": np.array([1, 2, 3])}, {"amount": np.ones(3)}, 3, None, None)
              for _ in range(4))
        )  # fmt: skip
        await models.stop()
        return out, coalescer

    out, coalescer = asyncio.run(main())
    assert (coalescer.groups, coalescer.requests) == (4, 4)
    assert all(s.scores["y"].shape == (3, 1) for s in out)


def test_the_coalescer_does_not_keep_an_unloaded_version_alive(setup) -> None:
    store, repo = setup

    async def main() -> tuple[weakref.ref, PredictCoalescer]:
        models = ModelRepository(repo, watch=False)
        await models.start()
        model = models.get("scorer", "")
        coalescer = PredictCoalescer(store, model, max_rows=100)
        await coalescer.predict({"id": np.array([1, 2])}, {"amount": np.ones(2)}, 2, None, None)
        ref = weakref.ref(model)
        del model
        await models.stop()
        return ref, coalescer

    ref, coalescer = asyncio.run(main())
    gc.collect()
    assert ref() is None and coalescer.groups == 1


def _request(*ids: int) -> tuple[dict, dict, int]:
    return {"id": np.array(ids, np.int64)}, {"amount": np.ones(len(ids))}, len(ids)


def test_a_request_waiting_for_its_group_is_served_by_a_version_that_unloads(setup) -> None:
    """A reload drains the old version while a request that resolved it waits for its group:
    the request holds the version, so it is scored there, and the drain waits for it."""
    store, repo = setup

    async def main() -> Scored:
        models = ModelRepository(repo, watch=False)
        await models.start()
        model = models.get("scorer", "")
        coalescer = PredictCoalescer(store, model, max_rows=100)
        waiting = asyncio.create_task(coalescer.predict(*_request(1, 2, 3), None, None))
        await asyncio.sleep(0)
        await model.batcher.close()
        assert waiting.done()
        await models.stop()
        return waiting.result()

    scored = asyncio.run(main())
    assert scored.scores["y"].shape == (3, 1) and (scored.scores["y"] != 0).all()


SLOW = CONFIG.replace("max_batch_size = 64\n", "max_batch_size = 64\n[dynamic_batching]\n"
                      "max_queue_delay_us = 60000000\n")  # fmt: skip


def test_a_group_whose_callers_all_left_leaves_the_batcher_queue(setup) -> None:
    """Callers gone (their calls cancelled) while their group waits in the batcher's queue (a
    60 s queue delay): the group's submission is withdrawn at once, freeing its queue slot."""
    store, repo = setup
    write_model(repo, "slow", mlp_model(seed=2), config_toml=SLOW)

    async def main() -> None:
        models = ModelRepository(repo, watch=False)
        await models.start()
        batcher = models.get("slow", "").batcher
        coalescer = PredictCoalescer(store, models.get("slow", ""), max_rows=100)
        callers = [
            asyncio.create_task(coalescer.predict(*_request(1, 2), None, None)) for _ in range(2)
        ]
        for _ in range(1000):
            if batcher.queued:
                break
            await asyncio.sleep(0.001)
        assert batcher.queued == 1 and coalescer.groups == 1
        for caller in callers:
            caller.cancel()
        await asyncio.gather(*callers, return_exceptions=True)
        for _ in range(10):
            await asyncio.sleep(0)
        assert batcher.queued == 0
        await models.stop()

    asyncio.run(main())


def test_a_failed_chunk_cancels_the_groups_other_chunks(setup) -> None:
    """Chunks of one group run together; when one fails, the others are cancelled, so a chunk
    waiting in the queue (60 s queue delay) leaves it instead of running for nobody."""
    _, repo = setup
    write_model(repo, "slow", mlp_model(seed=2), config_toml=SLOW)

    async def refused() -> dict:
        raise QueueFullError("queue full")

    async def main() -> None:
        models = ModelRepository(repo, watch=False)
        await models.start()
        batcher = models.get("slow", "").batcher
        queued = batcher.submit({"x": np.zeros((1, WIDTH), np.float32)}, 1)
        with pytest.raises(QueueFullError):
            await _all([queued, refused()])
        for _ in range(10):
            await asyncio.sleep(0)
        assert batcher.queued == 0
        await models.stop()

    asyncio.run(main())


def echo_model() -> object:
    """x [N, W] -> y, the same: an output whose width the model does not fix."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "W"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "W"])
    return graph_model([helper.make_node("Identity", ["x"], ["y"])], [x], [y])


ECHO = """max_batch_size = 64
[features]
entity = "user"
[[features.columns]]
features = ["stats:f0", "risk:r"]
"""


def test_a_request_whose_rows_all_failed_gets_outputs_as_wide_as_scored_ones(setup) -> None:
    """ids 31-35 have no risk score, so none of their rows is scored: their zeros are as wide as
    the version's last scored output (2), and 1 wide for a variable dimension before any."""
    store, repo = setup
    write_model(repo, "echo", echo_model(), config_toml=ECHO)

    async def main() -> list[Scored]:
        models = ModelRepository(repo, watch=False)
        await models.start()
        fresh = PredictCoalescer(store, models.get("echo", ""), max_rows=100)
        coalescer = PredictCoalescer(store, models.get("echo", ""), max_rows=100)
        out = [
            await fresh.predict({"id": np.array([31, 32])}, {}, 2, None, None),
            await coalescer.predict({"id": np.array([1, 2])}, {}, 2, None, None),
            await coalescer.predict({"id": np.array([31, 32, 33])}, {}, 3, None, None),
        ]
        await models.stop()
        return out

    before, scored, failed = asyncio.run(main())
    assert before.scores["y"].shape == (2, 1)
    assert scored.scores["y"].shape == (2, 2) and scored.assembled.failed.tolist() == [0, 0]
    assert failed.assembled.failed.all()
    assert failed.scores["y"].shape == (3, 2) and (failed.scores["y"] == 0).all()
