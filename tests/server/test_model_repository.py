"""The model repository: version policy, hot load/unload under traffic, failure isolation."""

import asyncio
import shutil
from pathlib import Path

import numpy as np
import pytest

from benchmarks.model_zoo import add_sub_model, mlp_model, write_model
from server.errors import ModelNotFoundError, ModelUnavailableError
from server.model_repository import READY, UNAVAILABLE, ModelRepository

X = np.ones((2, 32), np.float32)


def test_latest_policy_serves_highest_version_and_specific_lists(tmp_path: Path) -> None:
    write_model(tmp_path, "mlp", mlp_model(seed=1), version=1)
    write_model(tmp_path, "mlp", mlp_model(seed=2), version=2)
    write_model(
        tmp_path, "pinned", mlp_model(), version=1, config_toml="[version_policy]\nspecific = [1]\n"
    )
    write_model(tmp_path, "pinned", mlp_model(), version=2)

    async def main() -> None:
        repo = ModelRepository(tmp_path, watch=False)
        await repo.start()
        assert repo.versions("mlp") == ["2"]
        assert repo.get("mlp").version == "2"
        assert repo.versions("pinned") == ["1"]
        with pytest.raises(ModelNotFoundError, match="no version '1'"):
            repo.get("mlp", "1")
        with pytest.raises(ModelNotFoundError, match="no model 'nope'"):
            repo.get("nope")
        await repo.stop()

    asyncio.run(main())


def test_corrupt_version_is_reported_and_others_serve(tmp_path: Path) -> None:
    write_model(tmp_path, "good", mlp_model())
    write_model(tmp_path, "bad", b"this is not an onnx model")
    write_model(tmp_path, "badconfig", mlp_model(), config_toml="batch = 4\n")

    async def main() -> None:
        repo = ModelRepository(tmp_path, watch=False)
        await repo.start()
        index = {(s.name, s.version): s for s in repo.index()}
        assert index[("good", "1")].state == READY
        assert index[("bad", "1")].state == UNAVAILABLE
        assert "model.onnx" in index[("bad", "1")].reason or "Invalid" in index[("bad", "1")].reason
        assert "'batch'" in index[("badconfig", "")].reason
        assert not repo.is_ready("bad") and not repo.is_ready("badconfig")
        with pytest.raises(ModelUnavailableError, match="not ready"):
            repo.get("bad")
        result = await repo.get("good").batcher.submit({"x": X}, 2)
        assert result["y"].shape == (2, 1)
        write_model(tmp_path, "bad", mlp_model())
        await repo.poll()
        assert repo.is_ready("bad")
        await repo.stop()

    asyncio.run(main())


def test_watcher_loads_new_versions_and_unloads_removed_ones(tmp_path: Path) -> None:
    write_model(tmp_path, "mlp", mlp_model(seed=1), version=1)

    async def wait_for(condition) -> None:
        for _ in range(1000):
            if condition():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("the watcher did not act within 10 s")

    async def main() -> None:
        repo = ModelRepository(tmp_path, watch=True, poll_interval_s=0.05)
        await repo.start()
        write_model(tmp_path, "mlp", mlp_model(seed=2), version=2)
        await wait_for(lambda: repo.versions("mlp") == ["2"])
        write_model(tmp_path, "other", add_sub_model())
        await wait_for(lambda: repo.is_ready("other"))
        shutil.rmtree(tmp_path / "other")
        await wait_for(lambda: all(s.name != "other" for s in repo.index()))
        with pytest.raises(ModelNotFoundError):
            repo.get("other")
        await repo.stop()

    asyncio.run(main())


def test_load_and_unload_under_traffic_fail_no_request_on_the_staying_model(
    tmp_path: Path,
) -> None:
    write_model(
        tmp_path,
        "stay",
        mlp_model(),
        config_toml="[version_policy]\nlatest = 2\n[dynamic_batching]\nmax_queue_delay_us = 500\n",
    )
    write_model(tmp_path, "churn", mlp_model())

    async def main() -> None:
        repo = ModelRepository(tmp_path, watch=False)
        await repo.start()
        stop = asyncio.Event()
        served: list[str] = []

        async def traffic() -> None:
            while not stop.is_set():
                model = repo.get("stay")
                result = await model.batcher.submit({"x": X}, 2)
                served.append(model.version)
                assert result["y"].shape == (2, 1)

        clients = [asyncio.create_task(traffic()) for _ in range(8)]
        churn = repo.get("churn")
        in_flight = [asyncio.create_task(churn.batcher.submit({"x": X}, 2)) for _ in range(20)]
        await asyncio.sleep(0)
        for round_ in range(3):
            await repo.unload("churn")
            assert not repo.is_ready("churn")
            await repo.poll()
            assert not repo.is_ready("churn")
            await repo.load("churn")
            write_model(tmp_path, "stay", mlp_model(seed=round_), version=2 + round_)
            await repo.poll()
        assert repo.versions("stay") == ["3", "4"]
        stop.set()
        clients_done = await asyncio.gather(*clients, return_exceptions=True)
        await repo.stop()
        assert [r for r in clients_done if r is not None] == []
        results = await asyncio.gather(*in_flight)
        assert all(r["y"].shape == (2, 1) for r in results)
        assert served

    asyncio.run(main())
