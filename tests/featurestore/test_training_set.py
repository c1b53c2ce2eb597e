"""Training sets: several views joined point-in-time onto labelled rows, each on its own
entity's join keys, equal to point_in_time of each view."""

from pathlib import Path

import numpy as np
import pytest

from featurestore.dtypes import DType
from featurestore.errors import InvalidArgumentError, NotFoundError
from featurestore.history import point_in_time
from featurestore.online_store import OnlineStore, StoreConfig, WriteBatch
from featurestore.registry import Entity, Feature, FeatureService, FeatureView, JoinKey
from featurestore.training_set import by_view_names, training_set

NOW = 1_800_000_000_000_000
SEC = 1_000_000
USER = Entity("user", (JoinKey("user_id", DType.INT64),))
SHOP = Entity("shop", (JoinKey("shop", DType.STRING), JoinKey("region", DType.INT64)))
SPEND = FeatureView(
    "spend",
    "user",
    (Feature("amount", DType.FLOAT64), Feature("note", DType.STRING)),
    ttl_seconds=30,
)
RATING = FeatureView(
    "rating",
    "shop",
    (Feature("stars", DType.FLOAT32), Feature("embedding", DType.FLOAT32_VECTOR, vector_length=2)),
)


@pytest.fixture
def store(tmp_path: Path):
    with OnlineStore(StoreConfig(tmp_path / "db")) as s:
        s.registry.apply([USER, SHOP], [SPEND, RATING])
        rng = np.random.default_rng(5)
        for r in range(4):
            users = rng.integers(0, 6, 8)
            amounts = rng.random(8)
            s.write(
                WriteBatch(
                    "spend",
                    {"user_id": users},
                    NOW - rng.integers(0, 300, 8) * SEC,
                    {"amount": amounts, "note": np.array([f"n{a:.2f}" for a in amounts], object)},
                ),
                now_us=NOW - 250 * SEC + r * SEC,
            )
            s.write(
                WriteBatch(
                    "rating",
                    {"shop": np.array(["a", "b", "a"], object), "region": np.array([1, 1, 2])},
                    np.full(3, NOW - (30 - r) * SEC),
                    {
                        "stars": np.full(3, r, np.float32),
                        "embedding": np.full((3, 2), r, np.float32),
                    },
                ),
                now_us=NOW - 250 * SEC + r * SEC,
            )
        yield s


def labelled(n: int = 40) -> tuple[dict[str, np.ndarray], np.ndarray]:
    rng = np.random.default_rng(9)
    rows = {
        "user_id": rng.integers(0, 8, n),
        "shop": np.array(rng.choice(["a", "b", "c"], n), dtype=object),
        "region": rng.integers(1, 3, n),
        "label": rng.integers(0, 2, n),
    }
    return rows, NOW - rng.integers(-10, 400, n) * SEC


@pytest.mark.parametrize("as_served", [False, True])
def test_each_view_is_joined_on_its_own_entity_as_point_in_time_answers(store, as_served):
    rows, ts = labelled()
    refs = ["rating:stars", "spend", "rating:embedding"]
    got = training_set(store, rows, ts, refs, as_served=as_served)
    assert list(got.values) == ["rating:stars", "spend:amount", "spend:note", "rating:embedding"]
    assert list(got.event_us) == ["rating", "spend"]
    spend = point_in_time(store, "spend", {"user_id": rows["user_id"]}, ts, as_served=as_served)
    shop_keys = {"shop": rows["shop"], "region": rows["region"]}
    rating = point_in_time(store, "rating", shop_keys, ts, as_served=as_served)
    for result, view in ((spend, "spend"), (rating, "rating")):
        assert got.event_us[view].tolist() == result.event_us.tolist()
        for block in result.blocks:
            for j, feature in enumerate(block.features):
                assert got.values[f"{view}:{feature}"].tolist() == block.values[:, j].tolist()
                assert got.statuses[f"{view}:{feature}"].tolist() == block.statuses[:, j].tolist()
    statuses = np.concatenate(list(got.statuses.values()))
    assert set(statuses.tolist()) >= {1, 2, 4}


def test_a_view_named_with_its_version_is_filed_under_the_name_as_written(store):
    rows, ts = labelled(5)
    got = training_set(store, rows, ts, ["spend@1:amount", "spend:amount"])
    assert list(got.values) == ["spend@1:amount", "spend:amount"]
    assert got.values["spend@1:amount"].tolist() == got.values["spend:amount"].tolist()
    assert list(got.event_us) == ["spend@1", "spend"]


@pytest.mark.parametrize(
    ("rows", "features", "error", "message"),
    [
        ({"user_id": np.arange(3)}, ["rating:stars"], InvalidArgumentError, "no column 'shop'"),
        ({"user_id": np.arange(3)}, [], InvalidArgumentError, "give a list of references"),
        ({"user_id": np.arange(3)}, "spend:amount", InvalidArgumentError, "give a list"),
        ({"user_id": np.arange(3)}, ["spend:amout"], NotFoundError, "amout"),
        ({"user_id": np.arange(3)}, ["spends"], NotFoundError, "spends"),
    ],
)
def test_bad_requests_name_what_to_fix(store, rows, features, error, message):
    with pytest.raises(error, match=message):
        training_set(store, rows, np.full(3, NOW), features)


def assert_same(got, want) -> None:
    """Two training sets with the same columns, in the same order, holding the same values."""
    assert list(got.values) == list(want.values) and list(got.event_us) == list(want.event_us)
    for ref, values in want.values.items():
        assert got.values[ref].tolist() == values.tolist()
        assert got.statuses[ref].tolist() == want.statuses[ref].tolist()
    for view, event_us in want.event_us.items():
        assert got.event_us[view].tolist() == event_us.tolist()


@pytest.mark.parametrize("as_served", [False, True])
def test_a_feature_service_reads_what_its_references_read(store, as_served):
    refs = ("rating:stars", "spend", "rating:embedding")
    store.registry.apply([], [], feature_services=[FeatureService("ranker", refs)])
    rows, ts = labelled()
    got = training_set(store, rows, ts, feature_service="ranker", as_served=as_served)
    # a whole-view reference expands to the view's features in its order, as a lookup names them
    assert list(got.values) == ["rating:stars", "spend:amount", "spend:note", "rating:embedding"]
    assert_same(got, training_set(store, rows, ts, list(refs), as_served=as_served))


def test_a_service_object_reads_its_stored_definition(store):
    store.registry.apply(
        [], [], feature_services=[FeatureService("ranker", ("spend@1", "rating:stars"))]
    )
    rows, ts = labelled(6)
    stale = FeatureService("ranker", ("spend:amount",))
    got = training_set(store, rows, ts, feature_service=stale)
    # named as a lookup by the service names them: without the pinned version
    assert list(got.values) == ["spend:amount", "spend:note", "rating:stars"]
    assert list(got.event_us) == ["spend", "rating"]
    by_refs = training_set(store, rows, ts, ["spend@1", "rating:stars"])
    assert list(by_refs.values) == ["spend@1:amount", "spend@1:note", "rating:stars"]
    assert_same(got, by_view_names(by_refs))


@pytest.mark.parametrize(
    ("selection", "error", "message"),
    [
        ({"feature_service": "rankr"}, NotFoundError, "feature service 'rankr' is not registered"),
        (
            {"feature_service": FeatureService("rankr", ("spend",))},
            NotFoundError,
            "'rankr' is not registered; did you mean 'ranker'",
        ),
        ({"feature_service": 3}, InvalidArgumentError, "feature_service: got 3"),
        (
            {"features": ["spend:amount"], "feature_service": "ranker"},
            InvalidArgumentError,
            "features, feature_service: give exactly one",
        ),
        ({}, InvalidArgumentError, "features, feature_service: give exactly one"),
    ],
)
def test_a_service_unknown_or_given_with_features_or_neither_is_refused(
    store, selection, error, message
):
    store.registry.apply([], [], feature_services=[FeatureService("ranker", ("spend",))])
    with pytest.raises(error, match=message):
        training_set(store, {"user_id": np.arange(3)}, np.full(3, NOW), **selection)
