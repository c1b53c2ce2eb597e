"""Reading the store's data file into the page cache: all of it, or what a time budget allows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from featurestore.dtypes import DType
from featurestore.online_store import DATA_FILE, OnlineStore, StoreConfig, WriteBatch
from featurestore.page_cache import read_into_page_cache
from featurestore.registry import Entity, Feature, FeatureView, JoinKey
from tests.page_residency import evict, resident_fraction

USER = Entity("user", (JoinKey("user_id", DType.INT64),))
VIEW = FeatureView("stats", "user", tuple(Feature(f"f{i}", DType.FLOAT32) for i in range(32)))


@pytest.fixture
def filled_store(tmp_path: Path):
    """A store holding 30k rows of 32 float32 (several MB), its data file evicted from the cache."""
    store = OnlineStore(StoreConfig(tmp_path / "db"))
    store.registry.apply([USER], [VIEW])
    rng = np.random.default_rng(0)
    ids = np.arange(30_000, dtype=np.int64)
    values = rng.random((32, len(ids)), dtype=np.float32)
    columns = {f"f{i}": values[i] for i in range(32)}
    store.write(WriteBatch("stats", {"user_id": ids}, np.full(len(ids), 1_000_000), columns))
    assert evict(tmp_path / "db" / DATA_FILE) < 0.2
    yield store, tmp_path / "db" / DATA_FILE
    store.close()


def test_warming_reads_the_whole_data_file_into_the_cache(filled_store) -> None:
    store, data_file = filled_store
    warmed = store.warm_page_cache()
    assert warmed.complete
    assert warmed.bytes_read == warmed.file_bytes == data_file.stat().st_size > 4 << 20
    assert resident_fraction(data_file) > 0.99


def test_a_spent_budget_stops_the_reading(filled_store) -> None:
    _, data_file = filled_store
    warmed = read_into_page_cache(data_file, budget_s=0.0)
    assert (warmed.bytes_read, warmed.complete) == (0, False)
    assert resident_fraction(data_file) < 0.2


def test_reads_in_chunks_up_to_the_end_of_a_file_of_any_size(tmp_path: Path) -> None:
    path = tmp_path / "odd"
    path.write_bytes(bytes(range(256)) * 1001)
    warmed = read_into_page_cache(path, chunk_bytes=4096)
    assert warmed.complete and warmed.bytes_read == 256 * 1001


def test_max_bytes_caps_the_reading_to_the_front_of_the_file(filled_store) -> None:
    _, data_file = filled_store
    warmed = read_into_page_cache(data_file, max_bytes=1 << 20)
    assert (warmed.bytes_read, warmed.complete) == (1 << 20, False)
    assert 0 < resident_fraction(data_file) < 0.5
