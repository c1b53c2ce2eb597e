"""Feature service projections (Feast's with_name / with_join_key_map): one view read under
aliases by request columns of their own, validated and kept resolvable as references are,
looked up in one snapshot and joined into training sets as a lookup reads them."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from clients import registry_messages as rm
from featurestore import registry
from featurestore.definitions import load_definitions
from featurestore.dtypes import DType, FeatureStatus
from featurestore.errors import ConflictError, InvalidArgumentError, NotFoundError
from featurestore.online_store import OnlineStore, StoreConfig, ViewRead, WriteBatch
from featurestore.registry import (
    Entity,
    Feature,
    FeatureProjection,
    FeatureService,
    FeatureView,
    JoinKey,
)
from featurestore.training_set import training_set

NOW = time.time_ns() // 1000 - 3600 * 1_000_000
SEC = 1_000_000
USER = Entity("user", (JoinKey("user_id", DType.INT64),))
LOCATION = Entity("location", (JoinKey("location_id", DType.INT64),))
MERCHANT = Entity("merchant", (JoinKey("merchant_id", DType.STRING),))
ROUTE = Entity("route", (JoinKey("from_id", DType.INT64), JoinKey("to_id", DType.INT64)))
USER_STATS = FeatureView("user_stats", "user", (Feature("clicks", DType.FLOAT32),))
LOCATION_STATS = FeatureView(
    "location_stats",
    "location",
    (Feature("avg_amount", DType.FLOAT64), Feature("n_tx", DType.INT64)),
)
MERCHANT_STATS = FeatureView("merchant_stats", "merchant", (Feature("risk", DType.FLOAT32),))
ROUTE_STATS = FeatureView("route_stats", "route", (Feature("trips", DType.INT64),))
ORIGIN = FeatureProjection(
    "location_stats", "origin", ("avg_amount",), {"location_id": "origin_id"}
)
DESTINATION = FeatureProjection("location_stats", "destination", (), {"location_id": "dest_id"})
TRANSFER = FeatureService(
    "transfer", ("user_stats:clicks",), "transfers", "risk", projections=(ORIGIN, DESTINATION)
)
LOCATIONS = np.arange(10, 20)


def at(rows: int) -> np.ndarray:
    """Event times of `rows` rows written at NOW."""
    return np.full(rows, NOW)


def location_rows(version: int = 1) -> dict[str, np.ndarray]:
    """Distinct values per location (and per version), so a wrong key or version shows."""
    return {
        "avg_amount": LOCATIONS * 1.5 + version * 1000,
        "n_tx": LOCATIONS * 3 + version * 1000,
    }


@pytest.fixture
def store(tmp_path: Path):
    with OnlineStore(StoreConfig(tmp_path / "db")) as s:
        s.registry.apply(
            [USER, LOCATION, MERCHANT, ROUTE],
            [USER_STATS, LOCATION_STATS, MERCHANT_STATS, ROUTE_STATS],
        )
        s.write(WriteBatch("location_stats", {"location_id": LOCATIONS}, at(10), location_rows()))
        users = np.arange(5)
        clicks = {"clicks": users.astype(np.float32) * 2}
        s.write(WriteBatch("user_stats", {"user_id": users}, at(5), clicks))
        yield s


def test_round_trip_through_python_toml_and_proto(store, tmp_path):
    (result,) = store.registry.apply([], [], feature_services=[TRANSFER])
    assert (result.feature_service, result.action) == ("transfer", "created")
    stored = store.registry.get_service("transfer")
    assert stored == TRANSFER and stored.projections == (ORIGIN, DESTINATION)
    assert stored.view_names == {"user_stats", "location_stats"}
    assert rm.service_from_proto(rm.service_to_proto(stored)) == stored
    toml = tmp_path / "features.toml"
    toml.write_text(
        '[[feature_service]]\nname = "transfer"\ndescription = "transfers"\nowner = "risk"\n'
        'features = ["user_stats:clicks"]\n'
        "[[feature_service.projection]]\n"
        'view = "location_stats"\nalias = "origin"\nfeatures = ["avg_amount"]\n'
        'join_key_map = { location_id = "origin_id" }\n'
        "[[feature_service.projection]]\n"
        'view = "location_stats"\nalias = "destination"\n'
        'join_key_map = { location_id = "dest_id" }\n'
    )
    assert load_definitions(toml).feature_services == (TRANSFER,)
    assert store.registry.apply([], [], feature_services=[TRANSFER])[0].action == "unchanged"
    as_lists = replace(
        TRANSFER, projections=[replace(ORIGIN, features=["avg_amount"]), DESTINATION]
    )
    assert store.registry.apply([], [], feature_services=[as_lists])[0].action == "unchanged"


def stored_record(store: OnlineStore, name: str) -> dict:
    """A service's record as the registry stored it in LMDB."""
    with store._lmdb.read_txn() as txn:
        return json.loads(txn.get(registry._service_key(name), db=store._lmdb.registry_db()))


def test_a_service_without_projections_is_stored_as_before_them(store):
    """A build from before projections reads the record (its FeatureService takes no
    "projections" field), so a rollback keeps every such service readable."""
    plain = FeatureService("plain", ("user_stats:clicks",))
    store.registry.apply([], [], feature_services=[plain, TRANSFER])
    assert "projections" not in stored_record(store, "plain")
    assert stored_record(store, "transfer")["projections"][0][:2] == ["location_stats", "origin"]
    assert store.registry.get_service("plain") == plain
    assert store.registry.get_service("transfer") == TRANSFER


@pytest.mark.parametrize(
    ("projection", "field", "local", "client"),
    [
        (replace(ORIGIN, features=None), "features", "None; give a list of feature names", None),
        (replace(ORIGIN, features=3), "features", "3; give a list of feature names", None),
        (
            replace(ORIGIN, join_key_map=None),
            "join_key_map",
            "None; give a table of join key -> request column",
            "None; give a dict of join key -> request column",
        ),
        (
            replace(ORIGIN, join_key_map=[("location_id", "origin_id")]),
            "join_key_map",
            r"\[\('location_id', 'origin_id'\)\]; give a table",
            r"\[\('location_id', 'origin_id'\)\]; give a dict",
        ),
        (replace(ORIGIN, view=None), "view", "None is not a view reference", "expected str"),
        (replace(ORIGIN, alias=None), "alias", "None is not a valid name", "expected str"),
    ],
)
def test_a_projection_field_of_the_wrong_type_is_named(store, projection, field, local, client):
    """Not a bare TypeError from deep in apply, nor a None sent as ''."""
    service = FeatureService("typed", ("user_stats:clicks",), projections=(projection,))
    at = rf"feature service 'typed': projections\[0\]\.{field}:? "
    with pytest.raises(InvalidArgumentError, match=at + local):
        store.registry.apply([], [], feature_services=[service])
    with pytest.raises(TypeError, match=at + (client or local)):
        rm.service_to_proto(service)


@pytest.mark.parametrize("field", ["features", "projections"])
def test_a_service_field_that_is_no_list_is_named(store, field):
    service = replace(TRANSFER, **{field: None})
    with pytest.raises(InvalidArgumentError, match=rf"feature service 'transfer': {field}"):
        store.registry.apply([], [], feature_services=[service])
    with pytest.raises(TypeError, match=rf"feature service 'transfer': {field}"):
        rm.service_to_proto(service)


def test_a_service_of_projections_only_loads_from_toml(tmp_path):
    toml = tmp_path / "features.toml"
    toml.write_text(
        '[[feature_service]]\nname = "routes"\n[[feature_service.projection]]\n'
        'view = "location_stats@2"\nalias = "pickup"\n'
    )
    (service,) = load_definitions(toml).feature_services
    assert service.features == () and service.projections[0].view_key == ("location_stats", 2)


@pytest.mark.parametrize(
    ("projections", "match"),
    [
        (
            (replace(ORIGIN, alias="1st"),),
            r"projections\[0\]\.alias '1st' is not a valid name",
        ),
        (
            (ORIGIN, replace(DESTINATION, alias="origin")),
            r"projections\[1\]: alias 'origin' is the alias of projections\[0\] too",
        ),
        (
            (replace(ORIGIN, alias="user_stats"),),
            r"alias 'user_stats' is a view the service's features read",
        ),
        (
            (replace(ORIGIN, view="location_stats:avg"),),
            r"projections\[0\]\.view: 'location_stats:avg' is not a view reference",
        ),
        (
            (replace(ORIGIN, features=("avg_amount", "avg_amount")),),
            r"projections\[0\]\.features: 'avg_amount' is named twice",
        ),
        (
            (replace(ORIGIN, join_key_map={"location_id": "origin id"}),),
            r"join_key_map\['location_id'\] 'origin id' is not a valid name",
        ),
    ],
)
def test_malformed_projections_are_refused(projections, match):
    from featurestore.registry import validate_service

    with pytest.raises(InvalidArgumentError, match=match):
        validate_service(replace(TRANSFER, projections=projections))


@pytest.mark.parametrize(
    ("projection", "match"),
    [
        (
            replace(ORIGIN, view="location_stat"),
            r"projections\[0\] \(origin\): feature view 'location_stat' is not registered; "
            r"did you mean 'location_stats'",
        ),
        (
            replace(ORIGIN, view="location_stats@7"),
            r"projections\[0\] \(origin\): feature view 'location_stats' has no version 7",
        ),
        (
            replace(ORIGIN, features=("avg_amunt",)),
            r"projections\[0\] \(origin\): feature view 'location_stats' v1 \(its latest\) has "
            r"no feature 'avg_amunt'; did you mean 'avg_amount'",
        ),
        (
            replace(ORIGIN, join_key_map={"loc_id": "origin_id"}),
            r"projections\[0\] \(origin\): join_key_map key 'loc_id' is not a join key of "
            r"entity 'location'",
        ),
        (
            # location_id is INT64; merchant_stats reads merchant_id as STRING
            replace(ORIGIN, join_key_map={"location_id": "merchant_id"}),
            r"projections\[0\] \(origin\): feature view 'location_stats' v1 is keyed by entity "
            r"'location', whose join key 'location_id' \(request column 'merchant_id'\) is "
            r"INT64, but features\[1\] reads entity 'merchant', whose 'merchant_id' is STRING",
        ),
        (
            FeatureProjection("route_stats", "back", (), {"from_id": "to_id"}),
            r"projections\[0\] \(back\): join keys 'from_id' and 'to_id' of entity 'route' are "
            r"both read from request column 'to_id'",
        ),
    ],
)
def test_projections_that_do_not_resolve_are_refused(store, projection, match):
    service = FeatureService(
        "bad", ("user_stats:clicks", "merchant_stats"), projections=(projection,)
    )
    with pytest.raises(InvalidArgumentError, match=r"feature service 'bad': " + match):
        store.registry.apply([], [], feature_services=[service])
    with pytest.raises(NotFoundError):
        store.registry.get_service("bad")


def test_a_later_reference_clashing_with_a_mapped_column_is_refused(store):
    """The type rule holds across the service whichever read names the column first."""
    clash = FeatureService(
        "clash",
        ("merchant_stats",),
        projections=(replace(ORIGIN, join_key_map={"location_id": "merchant_id"}),),
    )
    with pytest.raises(InvalidArgumentError, match=r"\(request column 'merchant_id'\) is INT64"):
        store.registry.apply([], [], feature_services=[clash])


def lookup_keys(origins, dests) -> dict[str, np.ndarray]:
    return {
        "user_id": np.arange(len(origins)),
        "origin_id": np.asarray(origins),
        "dest_id": np.asarray(dests),
    }


def assert_same(got, want) -> None:
    assert (got.view.name, got.view.version) == (want.view.name, want.view.version)
    np.testing.assert_array_equal(got.event_us, want.event_us)
    np.testing.assert_array_equal(got.row_status, want.row_status)
    assert [b.features for b in got.blocks] == [b.features for b in want.blocks]
    for mine, theirs in zip(got.blocks, want.blocks, strict=True):
        np.testing.assert_array_equal(mine.values, theirs.values)
        np.testing.assert_array_equal(mine.statuses, theirs.statuses)


def test_one_view_read_twice_equals_two_plain_reads(store):
    store.registry.apply([], [], feature_services=[TRANSFER])
    origins, dests = [10, 11, 99, 19], [19, 12, 13, 98]
    keys = lookup_keys(origins, dests)
    clicks, origin, dest = store.read_service("transfer", keys, NOW)
    assert_same(clicks, store.read("user_stats", {"user_id": keys["user_id"]}, now_us=NOW))
    plain_origin = store.read("location_stats", {"location_id": keys["origin_id"]}, ["avg_amount"])
    plain_dest = store.read("location_stats", {"location_id": keys["dest_id"]})
    assert_same(origin, plain_origin)
    assert_same(dest, plain_dest)
    # the keys differ, so do the answers: a projection read by the wrong column would not
    assert origin.blocks[0].values[0, 0] == 10 * 1.5 + 1000
    assert dest.blocks[0].values[0, 0] == 19 * 1.5 + 1000
    assert list(dest.row_status) == [FeatureStatus.PRESENT] * 3 + [FeatureStatus.NOT_FOUND]
    reads = ViewRead.of_service(store.registry.get_service("transfer"))
    assert [(r.view, r.alias) for r in reads] == [
        ("user_stats", ""),
        ("location_stats", "origin"),
        ("location_stats", "destination"),
    ]


def test_lookup_key_columns_are_named_with_the_projection(store):
    store.registry.apply([], [], feature_services=[TRANSFER])
    keys = lookup_keys([10], [11])
    del keys["dest_id"]
    with pytest.raises(InvalidArgumentError, match=r"key column 'dest_id' is missing: projection "
                       r"'destination' \(feature view 'location_stats' v1\)"):  # fmt: skip
        store.read_service("transfer", keys)
    with pytest.raises(InvalidArgumentError, match=r"key column 'location_id' is a join key of "
                       r"none of the views read; the views read expect the join keys user_id, "
                       r"origin_id, dest_id"):  # fmt: skip
        store.read_service("transfer", {**lookup_keys([10], [11]), "location_id": np.array([1])})
    only = FeatureService("only", (), projections=(ORIGIN,))
    store.registry.apply([], [], feature_services=[only])
    (got,) = store.read_service("only", {"origin_id": np.array([12])})
    assert got.blocks[0].values[0, 0] == 12 * 1.5 + 1000
    with pytest.raises(InvalidArgumentError, match="location as projection origin"):
        store.read_service("only", {"location_id": np.array([12])})


def test_a_pinned_projection_reads_its_version(store):
    v2 = replace(LOCATION_STATS, version=2)
    store.registry.apply([], [v2])
    store.write(
        WriteBatch(
            "location_stats", {"location_id": LOCATIONS}, at(10), location_rows(2), version=2
        )
    )
    pinned = replace(TRANSFER, projections=(replace(ORIGIN, view="location_stats@1"), DESTINATION))
    store.registry.apply([], [], feature_services=[pinned])
    _, origin, dest = store.read_service("transfer", lookup_keys([10, 11], [10, 11]))
    assert (origin.view.version, dest.view.version) == (1, 2)
    assert origin.blocks[0].values[:, 0].tolist() == [10 * 1.5 + 1000, 11 * 1.5 + 1000]
    assert dest.blocks[0].values[0, 0] == 10 * 1.5 + 2000


def test_changes_that_would_break_a_projection_are_refused(store):
    store.registry.apply([], [], feature_services=[TRANSFER])
    without = replace(LOCATION_STATS, version=2, features=(Feature("n_tx", DType.INT64),))
    with pytest.raises(ConflictError, match=r"would break feature service 'transfer': "
                       r"projections\[0\] \(origin\): feature view 'location_stats' v2 \(its "
                       r"latest\) has no feature 'avg_amount'"):  # fmt: skip
        store.registry.apply([], [without])
    pinned = replace(TRANSFER, projections=(replace(ORIGIN, view="location_stats@1"),))
    store.registry.apply([], [replace(LOCATION_STATS, version=2)], feature_services=[pinned])
    broken = r"break feature service 'transfer': projections\[0\] \(origin\)"
    with pytest.raises(ConflictError, match=r"deleting feature view 'location_stats' v1 would "
                       + broken):  # fmt: skip
        store.registry.delete_view("location_stats", 1)
    store.registry.delete_view("location_stats", 2)  # the pinned projection does not read v2
    with pytest.raises(ConflictError, match=r"pruning feature views this apply does not declare "
                       r"\('location_stats', 'merchant_stats', 'route_stats'\) would break "
                       r"feature service 'transfer': projections\[0\] \(origin\)"):  # fmt: skip
        store.registry.apply([USER], [USER_STATS], feature_services=[pinned], prune=True)
    assert store.registry.get_view("location_stats", 1).version == 1
    results = store.registry.apply(
        [USER], [USER_STATS], feature_services=[replace(pinned, projections=())], prune=True
    )
    assert ("location_stats", 1, "deleted") in [(r.view, r.version, r.action) for r in results]


def refusal(call) -> str:
    """The message of the FeatureStoreError `call` raises."""
    with pytest.raises((ConflictError, InvalidArgumentError)) as info:
        call()
    return str(info.value)


def test_a_broken_projection_is_told_to_pin_its_view_not_a_reference(store):
    """A projection is mended by its `view` ("location_stats@1") or its features, not by a
    reference 'view@1:feature': each refusal suggests the version that would mend it."""
    store.registry.apply([], [], feature_services=[TRANSFER])
    without = replace(LOCATION_STATS, version=2, features=(Feature("n_tx", DType.INT64),))
    told = refusal(lambda: store.registry.apply([], [without]))
    assert 'pinned to a version that has what it reads (view = "location_stats@1" in its ' in told
    assert "[[feature_service.projection]]) or reading other features" in told
    assert "'view@1:feature'" not in told and "that reference" not in told
    # a plain reference still gets the reference's fix
    plain = FeatureService("plain", ("location_stats:avg_amount",))
    store.registry.apply([], [], feature_services=[plain, replace(TRANSFER, projections=())])
    assert "'view@1:feature'" in refusal(lambda: store.registry.apply([], [without]))

    store.registry.apply([], [without], feature_services=[replace(plain, features=("user_stats",))])
    told = refusal(lambda: store.registry.apply([], [], feature_services=[TRANSFER]))
    assert "projections[0] (origin): feature view 'location_stats' v2 (its latest) has no " in told
    assert 'pin that projection to a version that has it (view = "location_stats@1" in its ' in told
    assert "fix its view, features or join_key_map, or drop it" in told
    assert "drop or fix that reference" not in told
    typo = replace(ORIGIN, features=("avg_amunt",))
    told = refusal(lambda: store.registry.apply([], [], feature_services=[
        replace(TRANSFER, projections=(typo,))]))  # fmt: skip
    assert "; fix its view, features or join_key_map, or drop it, or apply the view" in told

    pinned = replace(TRANSFER, projections=(replace(DESTINATION, view="location_stats@2"),))
    store.registry.apply([], [], feature_services=[pinned])
    told = refusal(lambda: store.registry.delete_view("location_stats", 2))
    assert "would break feature service 'transfer': projections[0] (destination)" in told
    assert "first apply the service without that projection or with it pinned to another " in told
    assert 'version (view = "location_stats@1" in its [[feature_service.projection]])' in told
    assert "that reference" not in told


def reference_point_in_time(writes, keys, label_us):
    """The latest write of each key at or before its label time, in plain Python: (value or
    None, event time or 0) per label row."""
    out = []
    for key, label in zip(keys, label_us, strict=True):
        seen = [(event, value) for k, event, value in writes if k == key and event <= label]
        out.append(max(seen) if seen else (0, None))
    return out


def test_a_training_set_joins_each_projection_on_its_mapped_columns(store):
    rng = np.random.default_rng(3)
    writes = []
    for _ in range(3):
        ids = rng.choice(LOCATIONS, 6, replace=False)
        events = NOW - rng.choice(np.arange(1, 500), 6, replace=False) * SEC
        amounts = rng.random(6)
        store.write(
            WriteBatch(
                "location_stats",
                {"location_id": ids},
                events,
                {"avg_amount": amounts, "n_tx": np.zeros(6, np.int64)},
            )
        )
        writes += zip(ids.tolist(), events.tolist(), amounts.tolist(), strict=True)
    store.registry.apply([], [], feature_services=[TRANSFER])
    n = 40
    labels = {
        "user_id": rng.integers(0, 8, n),
        "origin_id": rng.integers(9, 21, n),
        "dest_id": rng.integers(9, 21, n),
    }
    label_us = NOW - rng.integers(0, 600, n) * SEC
    got = training_set(store, labels, label_us, feature_service="transfer")
    assert list(got.values) == [
        "user_stats:clicks",
        "origin:avg_amount",
        "destination:avg_amount",
        "destination:n_tx",
    ]
    assert list(got.event_us) == ["user_stats", "origin", "destination"]
    for alias, column in (("origin", "origin_id"), ("destination", "dest_id")):
        expected = reference_point_in_time(writes, labels[column].tolist(), label_us.tolist())
        present = got.statuses[f"{alias}:avg_amount"] == FeatureStatus.PRESENT
        assert present.tolist() == [value is not None for _, value in expected]
        assert got.event_us[alias].tolist() == [event for event, _ in expected]
        want = [value for _, value in expected if value is not None]
        assert got.values[f"{alias}:avg_amount"][present].tolist() == want
    assert 0 < present.sum() < n  # some labels precede every write of their location
    with pytest.raises(InvalidArgumentError, match=r"no column 'dest_id', which feature "
                       r"service projection 'destination' reads"):  # fmt: skip
        training_set(
            store, {k: labels[k] for k in ("user_id", "origin_id")}, label_us,
            feature_service="transfer",
        )  # fmt: skip
