"""Feature services in the registry: validation, resolution against the views, and the refusal
of any apply or delete that would leave a stored service unreadable."""

import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from featurestore.dtypes import DType
from featurestore.errors import ConflictError, InvalidArgumentError, NotFoundError
from featurestore.online_store import OnlineStore, StoreConfig
from featurestore.registry import Entity, Feature, FeatureService, FeatureView, JoinKey

USER = Entity("user", (JoinKey("user_id", DType.INT64),))
CLICKS = Feature("clicks", DType.FLOAT32)
COUNTRY = Feature("country", DType.STRING)
AGE = Feature("age", DType.INT64)
STATS = FeatureView("user_stats", "user", (CLICKS, COUNTRY))
PROFILE = FeatureView("profile", "user", (AGE,))
FRAUD = FeatureService("fraud", ("user_stats:clicks", "profile"), "fraud model", "risk")


@pytest.fixture
def store(tmp_path: Path):
    with OnlineStore(StoreConfig(tmp_path / "db")) as s:
        s.registry.apply([USER], [STATS, PROFILE])
        yield s


def test_apply_get_list_and_reads(store):
    results = store.registry.apply([], [], feature_services=[FRAUD])
    assert [(r.feature_service, r.view, r.version, r.action) for r in results] == [
        ("fraud", "", 0, "created")
    ]
    got = store.registry.get_service("fraud")
    assert got == FRAUD and got.owner == "risk" and got.created_us == got.updated_us > 0
    assert got.reads == {("user_stats", 0): ["clicks"], ("profile", 0): None}
    assert store.registry.list_services() == [got]
    assert store.registry.list_services("fr") == [got] and store.registry.list_services("x") == []
    assert store.registry.apply([], [], feature_services=[FRAUD])[0].action == "unchanged"
    changed = replace(FRAUD, features=("user_stats", "profile:age"), tags={"tier": "1"})
    assert store.registry.apply([], [], feature_services=[changed])[0].action == "updated"
    now = store.registry.get_service("fraud")
    assert now.features == ("user_stats", "profile:age") and now.tags == {"tier": "1"}
    assert now.created_us == got.created_us < now.updated_us


def test_view_and_its_service_apply_together(store):
    spend = FeatureView("spend", "user", (Feature("total", DType.FLOAT64),))
    service = FeatureService("spend_model", ("spend:total",))
    results = store.registry.apply([], [spend], feature_services=[service])
    assert [(r.view, r.feature_service, r.action) for r in results] == [
        ("spend", "", "created"),
        ("", "spend_model", "created"),
    ]


def test_dry_run_writes_nothing(store):
    (result,) = store.registry.apply([], [], dry_run=True, feature_services=[FRAUD])
    assert result.action == "created"
    with pytest.raises(NotFoundError, match="feature service 'fraud' is not registered"):
        store.registry.get_service("fraud")


@pytest.mark.parametrize(
    ("features", "match"),
    [
        ((), r"features must list at least one reference"),
        ("user_stats:clicks", r"features must list at least one reference"),
        (("user_stats:",), r"features\[0\]: 'user_stats:' is not a feature reference"),
        (
            ("user_stats:clicks", "user_stats@1:country"),
            r"features\[1\] 'user_stats@1:country' reads view 'user_stats' at version 1, but "
            r"features\[0\] reads it at its latest version",
        ),
        (
            ("user_stats:clicks", "user_stats:clicks"),
            r"features\[1\] 'user_stats:clicks' reads again what features\[0\]",
        ),
        (("user_stats", "user_stats:clicks"), r"features\[1\].*reads again what features\[0\]"),
        (("user_stats:clicks", "user_stats"), r"features\[1\].*reads again what features\[0\]"),
        (("user_stats:clicks", 3), r"features\[1\]: expected str, got 3"),
    ],
)
def test_malformed_services_are_refused(store, features, match):
    with pytest.raises(InvalidArgumentError, match=match):
        store.registry.apply([], [], feature_services=[FeatureService("svc", features)])
    assert store.registry.list_services() == []


def test_bad_name_and_repeated_service_are_refused(store):
    with pytest.raises(InvalidArgumentError, match="feature service name '9x' is not a valid"):
        store.registry.apply([], [], feature_services=[FeatureService("9x", ("profile",))])
    with pytest.raises(
        InvalidArgumentError,
        match=r"feature_services\[1\]: feature service 'fraud' is declared again \(first at "
        r"feature_services\[0\]\)",
    ):
        store.registry.apply([], [], feature_services=[FRAUD, FRAUD])


@pytest.mark.parametrize(
    ("ref", "match"),
    [
        ("user_stat:clicks", r"feature view 'user_stat' is not registered; did you mean "),
        ("user_stats@2:clicks", r"feature view 'user_stats' has no version 2; versions: 1"),
        (
            "user_stats:click",
            r"feature view 'user_stats' v1 \(its latest\) has no feature 'click'; did you mean "
            r"'clicks'",
        ),
    ],
)
def test_unresolvable_references_are_refused(store, ref, match):
    with pytest.raises(
        InvalidArgumentError, match=rf"feature service 'svc': features\[0\].*{match}"
    ):
        store.registry.apply([], [], feature_services=[FeatureService("svc", (ref,))])


def test_new_version_dropping_a_read_feature_is_refused_unless_pinned(store):
    store.registry.apply([], [], feature_services=[FRAUD])
    v2 = replace(STATS, version=2, features=(COUNTRY,))
    with pytest.raises(
        ConflictError,
        match=r"this apply would break feature service 'fraud': features\[0\] 'user_stats:clicks'"
        r": feature view 'user_stats' v2 \(its latest\) has no feature 'clicks'",
    ):
        store.registry.apply([], [v2])
    assert store.registry.get_view("user_stats").version == 1
    pinned = replace(FRAUD, features=("user_stats@1:clicks", "profile"))
    results = store.registry.apply([], [v2], feature_services=[pinned])
    assert [r.action for r in results] == ["created", "updated"]
    assert store.registry.get_service("fraud").reads[("user_stats", 1)] == ["clicks"]


def test_deleting_a_view_a_service_reads_is_refused(store):
    store.registry.apply([], [replace(STATS, version=2)], feature_services=[FRAUD])
    pinned = FeatureService("pinned", ("user_stats@1:country",))
    store.registry.apply([], [], feature_services=[pinned])
    with pytest.raises(
        ConflictError,
        match=r"deleting feature view 'user_stats' v1 would break feature service 'pinned'.*; "
        r"first apply the service without that reference or with it pinned to another version "
        r"of 'user_stats' \(2\), or delete the service \(DeleteFeatureService\)\Z",
    ):
        store.registry.delete_view("user_stats", 1)
    # the latest may go while an older version still holds what "fraud" reads
    store.registry.delete_view("user_stats", 2)
    with pytest.raises(
        ConflictError,
        match=r"deleting feature view 'profile' v1 would break feature service 'fraud': "
        r"features\[1\] 'profile': feature view 'profile' is not registered; first apply the "
        r"service without that reference, or delete the service \(DeleteFeatureService\)\Z",
    ):
        store.registry.delete_view("profile", 1)
    store.registry.delete_service("fraud")
    store.registry.delete_view("profile", 1)
    with pytest.raises(NotFoundError, match=r"feature service 'fraud' is not registered"):
        store.registry.delete_service("fraud")


def test_prune_deletes_undeclared_services_and_refuses_to_break_a_declared_one(store):
    """Prune deletes the services an apply does not declare (a stored one a new version would
    break included: it goes rather than blocks), and refuses, writing nothing, to delete a view
    a declared service reads, naming the service and its reference."""
    spare = FeatureService("spare", ("profile:age",))
    store.registry.apply([], [], feature_services=[FRAUD, spare])
    before = (store.registry.list_views(all_versions=True), store.registry.list_services())
    with pytest.raises(
        ConflictError,
        match=r"pruning feature views this apply does not declare \('profile'\) would break "
        r"feature service 'fraud': features\[1\] 'profile': feature view 'profile' is not "
        r"registered; declare the view it reads in this apply \(prune keeps declared views\), "
        r"or apply the service without that reference\Z",
    ):
        store.registry.apply([USER], [STATS], feature_services=[FRAUD], prune=True)
    assert (store.registry.list_views(all_versions=True), store.registry.list_services()) == (
        before
    )
    results = store.registry.apply([USER], [STATS, PROFILE], feature_services=[FRAUD], prune=True)
    assert [(r.view, r.feature_service, r.action) for r in results] == [
        ("user_stats", "", "unchanged"),
        ("profile", "", "unchanged"),
        ("", "fraud", "unchanged"),
        ("", "spare", "deleted"),
    ]
    assert [s.name for s in store.registry.list_services()] == ["fraud"]
    v2 = replace(STATS, version=2, features=(COUNTRY,))
    with pytest.raises(ConflictError, match="would break feature service 'fraud'"):
        store.registry.apply([USER], [v2, PROFILE])
    results = store.registry.apply([USER], [v2, PROFILE], prune=True)
    assert [(r.view, r.version, r.feature_service, r.action) for r in results] == [
        ("user_stats", 2, "", "created"),
        ("profile", 1, "", "unchanged"),
        ("", 0, "fraud", "deleted"),
    ]
    assert store.registry.list_services() == []


DELETE_IN_CHILD = """
import sys
from featurestore.online_store import OnlineStore, StoreConfig
with OnlineStore(StoreConfig(sys.argv[1])) as store:
    print(store.registry.get_service("fraud").features)
    store.registry.delete_service("fraud")
"""


def test_services_survive_reopening_and_other_processes_see_changes(tmp_path: Path):
    """LMDB allows one environment handle per process, so the other process is a child."""
    path = tmp_path / "db"
    with OnlineStore(StoreConfig(path)) as first:
        first.registry.apply([USER], [STATS, PROFILE], feature_services=[FRAUD])
    with OnlineStore(StoreConfig(path)) as again:
        assert again.registry.get_service("fraud") == FRAUD
        child = subprocess.run(
            [sys.executable, "-c", DELETE_IN_CHILD, str(path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert child.returncode == 0, child.stderr
        assert child.stdout.strip() == "('user_stats:clicks', 'profile')"
        assert again.registry.list_services() == []


def test_unknown_service_suggests_close_names(store):
    store.registry.apply([], [], feature_services=[FRAUD])
    with pytest.raises(NotFoundError, match=r"'frud' is not registered; did you mean 'fraud'"):
        store.registry.get_service("frud")


def test_a_service_cannot_read_entities_typing_one_join_key_two_ways(store):
    """A lookup sends one column per join key name: a service reading views of two entities
    that type `user_id` differently could never be looked up, so it is refused, and so is a
    new version that would make a stored service do so."""
    text_user = Entity("text_user", (JoinKey("user_id", DType.STRING),))
    store.registry.apply([text_user], [FeatureView("tags", "text_user", (COUNTRY,))])
    with pytest.raises(
        InvalidArgumentError,
        match=r"feature service 'svc': features\[1\] 'tags': feature view 'tags' v1 is keyed by "
        r"entity 'text_user', whose join key 'user_id' is STRING, but features\[0\] reads "
        r"entity 'user', whose 'user_id' is INT64",
    ):
        store.registry.apply([], [], feature_services=[FeatureService("svc", ("profile", "tags"))])
    store.registry.apply([], [], feature_services=[FRAUD])
    moved = replace(PROFILE, entity="text_user", version=2)
    with pytest.raises(ConflictError, match=r"this apply would break feature service 'fraud'"):
        store.registry.apply([], [moved])
    assert store.registry.get_view("profile").version == 1


def test_a_name_no_service_can_have_is_invalid_not_missing(store):
    with pytest.raises(InvalidArgumentError, match=r"feature service name 'a:b' is not a valid"):
        store.registry.get_service("a:b")


def test_hidden_services_are_not_found_and_not_suggested(store):
    store.registry.apply([], [], feature_services=[FRAUD, FeatureService("fraud2", ("profile",))])
    only_fraud2 = lambda service: service.name == "fraud2"  # noqa: E731
    with pytest.raises(NotFoundError) as missing:
        store.registry.get_service("fraud", visible=only_fraud2)
    assert missing.value.suggestions == ("fraud2",)
    assert store.registry.get_service("fraud2", visible=only_fraud2).name == "fraud2"


def test_a_lookup_by_service_sees_a_view_and_its_service_change_together(store):
    """An apply swaps, in one transaction, a new version of user_stats with and without
    `clicks` and the service pinned or not; read_service resolves the service in the read's
    own snapshot, so no read sees the service of one apply with the views of another (with
    the service read in a snapshot of its own, this failed NOT_FOUND in each of 3 runs)."""
    keys = {"user_id": np.arange(10)}
    store.registry.apply([], [], feature_services=[FRAUD])
    store.read_service("fraud", keys)  # compiles the decoders before the race starts
    errors: list[Exception] = []
    reads = 0
    stop = threading.Event()

    def churn() -> None:
        try:
            # at least 60 swaps, and on until the reader has raced 300 reads (bounded: each
            # swap adds two versions)
            for swap in range(600):
                if swap >= 60 and reads >= 300:
                    break
                latest = store.registry.get_view("user_stats").version
                without = replace(STATS, version=latest + 1, features=(COUNTRY,))
                pinned = replace(FRAUD, features=(f"user_stats@{latest}:clicks", "profile"))
                store.registry.apply([], [without], feature_services=[pinned])
                again = replace(STATS, version=latest + 2)
                store.registry.apply([], [again], feature_services=[FRAUD])
        finally:
            stop.set()

    writer = threading.Thread(target=churn)
    writer.start()
    while not stop.is_set():
        try:
            results = store.read_service("fraud", keys)
            assert [r.view.name for r in results] == ["user_stats", "profile"]
        except NotFoundError as exc:
            errors.append(exc)
        reads += 1
    writer.join()
    assert reads >= 300 and errors == []
