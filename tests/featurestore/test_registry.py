"""Registry: validation, versioning rules, deletion and cache refresh across store instances."""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from featurestore import registry
from featurestore.dtypes import DType
from featurestore.errors import (
    ConflictError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
)
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
    with pytest.raises(NotFoundError, match=r"'nope' is not registered; ListFeatureViews lists"):
        store.registry.get_view("nope")
    with pytest.raises(NotFoundError, match=r"'user_stat' is not registered; did you mean 'user_"):
        store.registry.get_view("user_stat")
    with pytest.raises(NotFoundError, match="entity 'ghost'"):
        store.registry.get_entity("ghost")


@pytest.mark.parametrize(
    ("entities", "views", "message"),
    [
        ([Entity("1bad", (JoinKey("id", DType.INT64),))], [], "'1bad' is not a valid name"),
        ([Entity("e", (JoinKey("id", DType.FLOAT32),))], [], "'id': dtype must be .*got FLOAT32$"),
        ([Entity("e", (JoinKey("id", DType.BOOL),))], [], "'id': dtype must be .*, got BOOL$"),
        (
            [USER, replace(USER, description="again")],
            [],
            r"^entities\[1\]: entity 'user' is declared again \(first at entities\[0\]\); "
            "declare each entity once$",
        ),
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
        ([Entity("e", (JoinKey("id", 0),))], [], "'id': dtype must be INT64 or STRING, got 0$"),
        (
            [USER],
            [FeatureView("v" * 256, "user", (CLICKS,))],
            "feature view name 'vvvv.*is 256 bytes long; use a name of at most 255 bytes",
        ),
        ([Entity("e" * 256, USER.join_keys)], [], "entity name 'eee.*is 256 bytes long"),
        ([Entity("e", (JoinKey("k" * 256, DType.INT64),))], [], "join key 'kkk.*256 bytes"),
        ([USER], [view(Feature("c" * 256, DType.INT64))], "feature 'ccc.*is 256 bytes long"),
        (
            [USER],
            [view(Feature("e", DType.FLOAT32_VECTOR, vector_length=2**32 - 1))],
            "feature 'e': vector_length 4294967295 brings the view's vectors to 4294967295 "
            r"floats per row, over the limit of 1048576 \(4 MiB\)",
        ),
        (
            [USER],
            [
                view(
                    Feature("a", DType.FLOAT32_VECTOR, vector_length=2**19),
                    Feature("b", DType.FLOAT32_VECTOR, vector_length=2**19 + 1),
                )
            ],
            "feature 'b': vector_length 524289 brings the view's vectors to 1048577 floats",
        ),
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


def test_names_of_255_bytes_are_stored_and_written(store):
    """The longest names fit LMDB's 511-byte keys: the registry's and the view's database."""
    entity = Entity("e" * 255, (JoinKey("k" * 255, DType.INT64),))
    long_view = FeatureView("v" * 255, entity.name, (Feature("f" * 255, DType.INT64),))
    store.registry.apply([entity], [long_view])
    store.registry.apply([], [replace(long_view, version=2)])
    keys = {"k" * 255: np.array([1])}
    batch = WriteBatch("v" * 255, keys, np.array([10**15]), {"f" * 255: np.array([7])})
    assert store.write(batch).written == 1
    assert store.read("v" * 255, keys).blocks[0].values.tolist() == [[7]]


def test_a_view_holds_at_most_65535_features_also_when_added_in_place(store):
    """A row records its feature count in 16 bits: beyond it no row could be written."""
    most = tuple(Feature(f"f{i}", DType.INT64) for i in range(65_535))
    store.registry.apply([USER], [view(*most[:-1])])
    assert store.registry.apply([], [view(*most)])[0].action == "updated"
    for wider in (view(*most, CLICKS), view(*most, CLICKS, version=2)):
        with pytest.raises(
            InvalidArgumentError,
            match="'user_stats': features has 65536 entries, over the limit of 65535 per view",
        ):
            store.registry.apply([], [wider])
    assert len(store.registry.get_view("user_stats").features) == 65_535


def test_vectors_of_1048576_floats_per_row_are_written(store):
    emb = Feature("emb", DType.FLOAT32_VECTOR, vector_length=2**20)
    store.registry.apply([USER], [view(emb)])
    ids = {"user_id": np.array([1])}
    values = np.arange(2**20, dtype=np.float32).reshape(1, -1)
    assert store.write(WriteBatch("user_stats", ids, np.array([10**15]), {"emb": values})).written
    np.testing.assert_array_equal(store.read("user_stats", ids).blocks[0].values[:, 0], values)


def test_apply_refuses_versions_beyond_max_dbs_until_one_is_deleted(tmp_path: Path):
    """max_dbs=5 holds the registry and 2 view versions (online rows and history each): a third
    is refused at apply, atomically and in a dry run too, not at its first write."""
    with OnlineStore(StoreConfig(tmp_path / "db", max_dbs=5, sync=False)) as store:
        store.registry.apply([USER], [view(CLICKS), FeatureView("a", "user", (CLICKS,))])
        full = (
            r"views: 3 view versions would need 7 LMDB databases .* over lmdb_max_dbs = 5; "
            r"set lmdb_max_dbs in the server config \(StoreConfig.max_dbs\) to at least 7, or "
            "delete view versions no longer used"
        )
        for views, dry_run in (
            ([FeatureView("b", "user", (CLICKS,))], False),
            ([FeatureView("b", "user", (CLICKS,))], True),
            ([view(CLICKS, version=2)], False),
            ([view(CLICKS, COUNTRY), FeatureView("b", "user", (CLICKS,))], False),
        ):
            with pytest.raises(ResourceExhaustedError, match=full):
                store.registry.apply([], views, dry_run=dry_run)
        assert [v.name for v in store.registry.list_views()] == ["a", "user_stats"]
        assert store.registry.get_view("user_stats").features == (CLICKS,)
        assert store.registry.apply([], [view(CLICKS, COUNTRY)])[0].action == "updated"
        store.registry.delete_view("a", 1)
        assert store.registry.apply([], [FeatureView("b", "user", (CLICKS,))])[0].action == (
            "created"
        )
        ids, at, clicks = {"user_id": np.array([1])}, np.array([10**15]), np.ones(1)
        both = {"clicks": clicks, "country": np.array(["x"], dtype=object)}
        assert store.write(WriteBatch("user_stats", ids, at, both)).written == 1
        assert store.write(WriteBatch("b", ids, at, {"clicks": clicks})).written == 1


def test_one_apply_refuses_a_view_version_twice_but_takes_two_versions(store):
    """A view given twice merged silently (created, then updated: re-applying the same
    definitions then failed); two versions of it in one apply are still fine."""
    twice = [view(CLICKS), FeatureView("other", "user", (CLICKS,)), view(CLICKS, COUNTRY)]
    with pytest.raises(InvalidArgumentError) as info:
        store.registry.apply([USER], twice)
    assert str(info.value) == (
        "views[2]: feature view 'user_stats' with no version is declared again (first at "
        "views[0]); declare it once with all its features, or give each declaration its own "
        "explicit version"
    )
    # no version means the latest, which the other declaration may be: v0 beside v2 became v1
    # and v2, and re-applying them then failed as v0 now meant v2
    for versions, said in (((0, 2), "as version 2 here and with no version"),
                           ((1, 0), "with no version here and as version 1")):  # fmt: skip
        pair = [view(CLICKS, version=versions[0]), view(COUNTRY, version=versions[1])]
        with pytest.raises(InvalidArgumentError) as info:
            store.registry.apply([USER], pair)
        assert str(info.value) == (
            f"views[1]: feature view 'user_stats' is declared {said} at views[0]; with no "
            "version a declaration means the latest, which the other one may be: give each "
            "declaration its own explicit version"
        )
    assert store.registry.list_views() == []
    res = store.registry.apply([USER], [view(CLICKS, version=1), view(COUNTRY, version=2)])
    assert [(r.version, r.action) for r in res] == [(1, "created"), (2, "created")]


def test_not_found_suggests_a_few_close_names_and_cuts_the_input(store):
    """On a realistic registry (800 features, 700 views) a typo's message names the closest
    few names and counts the rest, instead of listing them all (which outgrew gRPC's 16 KiB
    metadata limit); the suggestions are also data, for a server to filter."""
    wide = FeatureView(
        "wide", "user", tuple(Feature(f"txn_amount_sum_{i:04d}", DType.FLOAT32) for i in range(800))
    )
    teams = [FeatureView(f"team_view_{i:04d}", "user", (CLICKS,)) for i in range(700)]
    store.registry.apply([USER], [wide, *teams])
    with pytest.raises(NotFoundError) as info:
        store.registry.get_view("wide").feature("txn_amount_sum_0799x")
    err = info.value
    assert err.what == "feature" and err.suggestions[0] == "txn_amount_sum_0799"
    assert str(err).startswith(
        "feature 'txn_amount_sum_0799x' is not in view 'wide' v1; did you mean "
        "'txn_amount_sum_0799', "
    )
    assert f" (or {len(err.suggestions) - 5} more close names)? GetFeatureView lists" in str(err)
    assert len(str(err)) < 400

    with pytest.raises(NotFoundError) as info:
        store.registry.get_view("team_view_0042_")
    err = info.value
    assert err.what == "view" and err.suggestions[0] == "team_view_0042"
    assert "ListFeatureViews lists the views" in str(err) and len(str(err)) < 400

    with pytest.raises(NotFoundError) as info:
        store.registry.get_view("team_view_" + "x" * 10_000)
    assert "'team_view_xxxx" in str(info.value) and "... (10010 characters)" in str(info.value)
    assert len(str(info.value)) < 400

    with pytest.raises(NotFoundError) as info:
        store.registry.get_entity("usr")
    assert info.value.what == "entity" and "did you mean 'user'?" in str(info.value)


def test_not_found_compares_a_bounded_number_of_names(store):
    """Past MAX_COMPARED_NAMES registered names, a typo is compared with those beside it in
    sorted order, and still finds its view."""
    many = [f"v{i:05d}" for i in range(3 * registry.MAX_COMPARED_NAMES)]
    assert registry.close_names("v02500x", many)[0] == "v02500"
    assert registry.close_names("v00000x", many)[0] == "v00000"
    assert registry.close_names("v02999x", many)[0] == "v02999"


def test_ttl_changes_are_kept_per_version_and_survive_a_reopen(tmp_path: Path, monkeypatch):
    """A TTL changed in place is recorded with the time it came into force (what as_served
    replays), stored with the view and read back by a new store instance; re-applying the same
    definition, or one changing no TTL, adds nothing, and equality ignores the history."""
    clock = iter(range(1_800_000_000, 1_800_000_010))
    monkeypatch.setattr(registry.time, "time_ns", lambda: next(clock) * 1_000_000_000)
    config = StoreConfig(tmp_path / "db")
    with OnlineStore(config) as store:
        store.registry.apply([USER], [view(CLICKS, ttl_seconds=60)])
        created = store.registry.get_view("user_stats").created_us
        assert store.registry.get_view("user_stats").ttl_changes() == ((created, 60),)
        assert store.registry.apply([], [view(CLICKS, COUNTRY, ttl_seconds=60)])[0].action == (
            "updated"
        )
        assert store.registry.get_view("user_stats").ttl_changes() == ((created, 60),)
        for ttl in (120, 0):
            assert store.registry.apply([], [view(CLICKS, COUNTRY, ttl_seconds=ttl)])[0].action == (
                "updated"
            )
        again = store.registry.apply([], [view(CLICKS, COUNTRY, ttl_seconds=0)])
        assert again[0].action == "unchanged"
        got = store.registry.get_view("user_stats")
        changes = ((created, 60), (created + 2_000_000, 120), (got.updated_us, 0))
        assert got.ttl_changes() == got.ttl_history == changes
        assert got.updated_us == created + 3_000_000
        assert got == replace(got, ttl_history=())
        assert registry._view_from_json(registry._view_to_json(got)).ttl_history == changes
    with OnlineStore(config) as store:
        assert store.registry.get_view("user_stats").ttl_history == changes


def test_ttl_change_times_increase_when_the_clock_steps_back(store, monkeypatch):
    """Labels find the TTL in force by bisecting the change times, so they never repeat."""
    monkeypatch.setattr(registry.time, "time_ns", lambda: 1_800_000_000_000_000_000)
    store.registry.apply([USER], [view(CLICKS, ttl_seconds=60)])
    monkeypatch.setattr(registry.time, "time_ns", lambda: 1_700_000_000_000_000_000)
    store.registry.apply([], [view(CLICKS, ttl_seconds=30)])
    store.registry.apply([], [view(CLICKS, ttl_seconds=90)])
    since = [from_us for from_us, _ in store.registry.get_view("user_stats").ttl_changes()]
    assert since == [1_800_000_000_000_000, 1_800_000_000_000_001, 1_800_000_000_000_002]


def test_a_record_without_ttl_history_reads_as_its_ttl_since_creation(store):
    """Records written before the history was kept have no ttl_history: they read as before,
    meaning the current TTL since created_us, and a TTL change extends that history."""
    store.registry.apply([USER], [view(CLICKS, ttl_seconds=60)])
    stored = store.registry.get_view("user_stats")
    record = json.loads(registry._view_to_json(stored))
    del record["ttl_history"]
    old_format = json.dumps(record).encode()
    assert registry._view_from_json(old_format) == stored

    def put(txn) -> None:
        db = store._lmdb.registry_db()
        txn.put(registry._view_key("user_stats", 1), old_format, db=db)
        registry._bump_generation(txn, db)

    store._lmdb.run_write(put)
    old = store.registry.get_view("user_stats")
    assert old.ttl_history == () and old.ttl_changes() == ((stored.created_us, 60),)
    assert store.registry.apply([], [view(CLICKS, ttl_seconds=60)])[0].action == "unchanged"
    store.registry.apply([], [view(CLICKS, ttl_seconds=30)])
    updated = store.registry.get_view("user_stats")
    assert updated.ttl_history == ((stored.created_us, 60), (updated.updated_us, 30))


def _databases(store) -> set[bytes]:
    """The names of the named databases the environment holds (the main database's keys)."""
    with store._lmdb.read_txn() as txn:
        return {key for key, _ in txn.cursor()}


def test_prune_deletes_undeclared_views_all_versions_and_unused_entities(store):
    """Prune deletes every version of a view the apply does not name (definition, online rows,
    history) and the entities no remaining version uses; a named view keeps its older versions
    (and the entity one of them uses). A dry run reports the same and writes nothing."""
    account = Entity("account", (JoinKey("user_id", DType.INT64),))
    item = Entity("item", (JoinKey("item_id", DType.INT64),))
    device = Entity("device", (JoinKey("device_id", DType.STRING),))
    items = FeatureView("item_stats", "item", (CLICKS,))
    store.registry.apply(
        [USER, account, item, device], [replace(view(CLICKS), entity="account"), items]
    )
    store.registry.apply([], [view(CLICKS, version=2), replace(items, version=2)])
    ids, at = {"item_id": np.array([1, 2])}, np.array([10**15, 10**15])
    for version in (1, 2):
        batch = WriteBatch("item_stats", ids, at, {"clicks": np.ones(2)}, version=version)
        assert store.write(batch).written == 2
    users = {"user_id": np.array([1])}
    batch = WriteBatch("user_stats", users, at[:1], {"clicks": np.ones(1)}, version=1)
    assert store.write(batch).written == 1
    item_dbs = {
        name(view, version)
        for name in (registry.view_db_name, registry.history_db_name)
        for view, version in (("item_stats", 1), ("item_stats", 2))
    }
    assert item_dbs <= _databases(store)
    before = (store.registry.list_views(all_versions=True), store.registry.list_entities())

    declared = ([USER], [view(CLICKS)])
    dry = store.registry.apply(*declared, dry_run=True, prune=True)
    assert [(r.view, r.version, r.action, r.entity) for r in dry] == [
        ("user_stats", 2, "unchanged", ""),
        ("item_stats", 1, "deleted", ""),
        ("item_stats", 2, "deleted", ""),
        ("", 0, "deleted", "device"),
        ("", 0, "deleted", "item"),
    ]
    assert (store.registry.list_views(all_versions=True), store.registry.list_entities()) == (
        before
    )
    assert item_dbs <= _databases(store)

    assert store.registry.apply(*declared, prune=True) == dry
    assert [(v.name, v.version) for v in store.registry.list_views(all_versions=True)] == [
        ("user_stats", 1),
        ("user_stats", 2),
    ]
    assert [e.name for e in store.registry.list_entities()] == ["account", "user"]
    assert not item_dbs & _databases(store)
    with pytest.raises(NotFoundError, match="'item_stats' is not registered"):
        store.read("item_stats", ids)
    assert store.read("user_stats", users, version=1).blocks[0].values.tolist() == [[1.0]]
    # the name is free again, and its old rows are gone with the databases
    assert store.registry.apply([item], [items])[0].action == "created"
    assert (store.read("item_stats", ids).event_us == 0).all()
    assert store.registry.apply(*declared, prune=True)[1:] == dry[1:2] + dry[-1:]
