"""Registry: validation, versioning rules, deletion and cache refresh across store instances."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from featurestore import registry
from featurestore.dtypes import DType
from featurestore.errors import ConflictError, InvalidArgumentError, NotFoundError
from featurestore.online_store import OnlineStore, StoreConfig, WriteBatch
from featurestore.registry import Entity, Feature, FeatureView, JoinKey

USER = Entity("user", (JoinKey("user_id", DType.INT64),), "a user")
CLICKS = Feature("clicks", DType.FLOAT32)
COUNTRY = Feature("country", DType.STRING)


def view(*features: Feature, **kw) -> FeatureView:
    return FeatureView("user_stats", "user", tuple(features), **kw)


@pytest.fixture
def store(tmp_path: Path):
    with OnlineStore(StoreConfig(tmp_path / "db")) as s:
        yield s


def test_create_then_unchanged(store):
    first = store.registry.apply([USER], [view(CLICKS, ttl_seconds=60)])
    assert [(r.view, r.version, r.action) for r in first] == [("user_stats", 1, "created")]
    again = store.registry.apply([USER], [view(CLICKS, ttl_seconds=60)])
    assert again[0].action == "unchanged"
    got = store.registry.get_view("user_stats")
    assert got.version == 1 and got.ttl_seconds == 60 and got.features == (CLICKS,)
    assert got.created_us > 0 and store.registry.get_entity("user") == USER


def test_add_feature_and_metadata_update_in_place(store):
    store.registry.apply([USER], [view(CLICKS)])
    res = store.registry.apply([], [view(COUNTRY, CLICKS, owner="growth", tags={"tier": "gold"})])
    assert (res[0].version, res[0].action) == (1, "updated")
    got = store.registry.get_view("user_stats", 1)
    assert [f.name for f in got.features] == ["clicks", "country"]
    assert got.owner == "growth" and got.tags == {"tier": "gold"}


def test_drop_and_retype_need_new_version(store):
    store.registry.apply([USER], [view(CLICKS, COUNTRY)])
    with pytest.raises(ConflictError, match=r"dropping feature 'country'.*version=2"):
        store.registry.apply([], [view(CLICKS)])
    with pytest.raises(ConflictError, match=r"retyping feature 'clicks'.*version=2"):
        store.registry.apply([], [view(Feature("clicks", DType.INT64), COUNTRY)])
    res = store.registry.apply([], [view(Feature("clicks", DType.INT64), version=2)])
    assert (res[0].version, res[0].action) == (2, "created")
    assert store.registry.get_view("user_stats").version == 2
    assert store.registry.get_view("user_stats", 1).features == (CLICKS, COUNTRY)
    assert [v.version for v in store.registry.list_views(all_versions=True)] == [1, 2]
    assert [v.version for v in store.registry.list_views()] == [2]


def test_version_gaps_and_unknown_versions(store):
    store.registry.apply([USER], [view(CLICKS)])
    with pytest.raises(InvalidArgumentError, match="next new version is 2"):
        store.registry.apply([], [view(CLICKS, version=5)])
    with pytest.raises(NotFoundError, match=r"no version 3; versions: 1"):
        store.registry.get_view("user_stats", 3)
    with pytest.raises(NotFoundError, match=r"'nope' is not registered; registered: user_stats"):
        store.registry.get_view("nope")
    with pytest.raises(NotFoundError, match="entity 'ghost'"):
        store.registry.get_entity("ghost")


@pytest.mark.parametrize(
    ("entities", "views", "message"),
    [
        ([Entity("1bad", (JoinKey("id", DType.INT64),))], [], "'1bad' is not a valid name"),
        ([Entity("e", (JoinKey("id", DType.FLOAT32),))], [], "join key 'id': dtype must be"),
        ([Entity("e", ())], [], "join_keys must not be empty"),
        ([USER], [FeatureView("v", "ghost", (CLICKS,))], "entity 'ghost' is not registered"),
        ([USER], [view(Feature("e", DType.FLOAT32_VECTOR))], "needs vector_length > 0"),
        ([USER], [view(Feature("e", DType.FLOAT32, vector_length=3))], "only for FLOAT32_VECTOR"),
        ([USER], [view(CLICKS, CLICKS)], "feature 'clicks' repeated"),
        ([USER], [view(Feature("user_id", DType.INT64))], "name of a join key"),
        ([USER], [view(Feature("bad-name", DType.INT64))], "'bad-name' is not a valid name"),
        ([USER], [view()], "features must not be empty"),
        ([USER], [view(CLICKS, ttl_seconds=-1)], "ttl_seconds must be >= 0"),
        (
            [USER],
            [view(CLICKS, Feature("score", 0))],
            "feature view 'user_stats' feature 'score': unknown dtype 0; use one of "
            "DType.FLOAT32, DType.FLOAT64, DType.INT64, DType.BOOL, DType.STRING, "
            "DType.FLOAT32_VECTOR",
        ),
        ([USER], [view(Feature("score", "FLOAT32"))], "'score': unknown dtype 'FLOAT32'"),
    ],
)
def test_validation_names_the_field(store, entities, views, message):
    with pytest.raises(InvalidArgumentError, match=message):
        store.registry.apply(entities, views)
    assert store.registry.list_views() == []


def test_entity_join_keys_cannot_change(store):
    store.registry.apply([USER], [])
    with pytest.raises(ConflictError, match="join keys cannot change"):
        store.registry.apply([Entity("user", (JoinKey("user_id", DType.STRING),))], [])


def test_dry_run_writes_nothing(store):
    res = store.registry.apply([USER], [view(CLICKS)], dry_run=True)
    assert res[0].action == "created"
    assert store.registry.list_views() == [] and store.registry.list_entities() == []


def test_list_prefix_and_delete(store):
    other = FeatureView("item_stats", "user", (CLICKS,))
    store.registry.apply([USER], [view(CLICKS), other])
    assert [v.name for v in store.registry.list_views("user_")] == ["user_stats"]
    store.registry.delete_view("user_stats", 1)
    assert [v.name for v in store.registry.list_views()] == ["item_stats"]
    with pytest.raises(NotFoundError):
        store.registry.delete_view("user_stats", 1)


def test_lookups_parse_definitions_again_only_after_a_change(store, monkeypatch):
    """The cache is refreshed by generation: reads parse no definition until an apply."""
    parsed: list[bytes] = []

    def counting(decode):
        def wrapper(raw: bytes):
            parsed.append(raw)
            return decode(raw)

        return wrapper

    for name in ("_view_from_json", "_entity_from_json"):
        monkeypatch.setattr(registry, name, counting(getattr(registry, name)))
    store.registry.apply([USER], [view(CLICKS)])
    ids = {"user_id": np.array([1, 2])}
    store.write(WriteBatch("user_stats", ids, np.full(2, 10**15), {"clicks": np.ones(2)}))
    parsed.clear()
    for _ in range(50):
        store.registry.get_view("user_stats")
        store.registry.get_entity("user")
        store.registry.list_views()
        store.registry.list_entities()
        assert store.read("user_stats", ids).row_status.tolist() == [1, 1]
    assert parsed == []
    store.registry.apply([], [view(CLICKS, COUNTRY)])
    parsed.clear()
    assert [f.name for f in store.registry.get_view("user_stats").features] == [
        "clicks",
        "country",
    ]
    assert len(parsed) == 2, "one entity and one view, parsed once after the apply"
    store.read("user_stats", ids)
    store.registry.get_view("user_stats")
    assert len(parsed) == 2


APPLY_IN_CHILD = """
import sys
from pathlib import Path
from featurestore.dtypes import DType
from featurestore.online_store import OnlineStore, StoreConfig, WriteBatch
from featurestore.registry import Feature, FeatureView
feats = [Feature(n, DType.FLOAT32 if n == "clicks" else DType.STRING) for n in sys.argv[2:]]
with OnlineStore(StoreConfig(Path(sys.argv[1]))) as store:
    print(store.registry.apply([], [FeatureView("user_stats", "user", tuple(feats))])[0].action)
"""


def test_cache_refreshes_when_another_process_applies(tmp_path: Path):
    """LMDB allows one environment handle per process, so the second instance is a child."""
    config = StoreConfig(tmp_path / "db")
    with OnlineStore(config) as store:
        store.registry.apply([USER], [view(CLICKS)])
        assert store.registry.get_view("user_stats").features == (CLICKS,)
        child = subprocess.run(
            [sys.executable, "-c", APPLY_IN_CHILD, str(config.path), "clicks", "country"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert child.stdout.strip() == "updated"
        assert [f.name for f in store.registry.get_view("user_stats").features] == [
            "clicks",
            "country",
        ]


def test_created_us_identifies_a_definition(store, monkeypatch):
    """An in-place update keeps created_us (a write checked before it still fits); a version
    deleted and created again gets a later one, even on a clock that stands still."""
    monkeypatch.setattr(registry.time, "time_ns", lambda: 1_800_000_000_000_000_000)
    store.registry.apply([USER], [view(CLICKS)])
    first = store.registry.get_view("user_stats", 1)
    store.registry.apply([], [view(CLICKS, COUNTRY)])
    assert store.registry.get_view("user_stats", 1).created_us == first.created_us
    store.registry.delete_view("user_stats", 1)
    store.registry.apply([], [view(CLICKS)])
    again = store.registry.get_view("user_stats", 1)
    assert again.created_us > first.created_us
    assert store.registry.find_view("user_stats", 1) == again
    assert store.registry.find_view("user_stats", 2) is None
