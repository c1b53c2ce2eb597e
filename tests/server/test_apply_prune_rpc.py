"""ApplyFeatureViews with prune over a real server: what it deletes (definitions, rows, LMDB
databases, metrics), its dry run, its refusals and its audit record."""

from __future__ import annotations

import json
import time
from pathlib import Path

import grpc
import lmdb
import numpy as np

from clients.channel import ClientConfig, ClientError
from clients.feature_client import FeatureStoreClient
from featurestore.dtypes import DType
from featurestore.registry import (
    Entity,
    Feature,
    FeatureService,
    FeatureView,
    JoinKey,
    history_db_name,
    view_db_name,
)
from tests.conftest import free_port, wait_until
from tests.server.test_auth import AUTH_TOML, TOKENS
from tests.server.test_feature_store_rpc import expect_error
from tests.server.test_metrics import scrape, view_series

USER = Entity("user", (JoinKey("user_id", DType.INT64),))
ITEM = Entity("item", (JoinKey("item_id", DType.INT64),))
X = Feature("x", DType.FLOAT32)
KEEP = FeatureView("keep", "user", (X,))
KEEP_V2 = FeatureView("keep", "user", (Feature("x", DType.INT64),))
GONE = FeatureView("gone", "item", (X,))
READS_GONE = FeatureService("reads_gone", ("gone:x",))
NOW_US = int(time.time() * 1e6)
USERS, ITEMS = {"user_id": np.arange(4)}, {"item_id": np.arange(4)}


def databases(data_dir: Path) -> set[bytes]:
    """The names of the named databases the server's environment holds."""
    env = lmdb.open(str(data_dir), readonly=True, lock=False, max_dbs=1)
    try:
        with env.begin() as txn:
            return {name for name, _ in txn.cursor()}
    finally:
        env.close()


def outcomes(results) -> list[tuple[str, int, str, str, str]]:
    return [(r.view, r.version, r.feature_service, r.entity, r.action) for r in results]


def test_prune_deletes_exactly_what_the_request_no_longer_declares(
    server_factory, tmp_path: Path
) -> None:
    """With the admin token, prune deletes every version of the undeclared view (rows, LMDB
    databases, metrics series), the undeclared service and the entity nothing uses, keeps the
    declared view's older version, reports the same in a dry run that writes nothing, refuses
    a prune that would break a declared service, and audits prune and what it deleted. Another
    token's prune is PERMISSION_DENIED and writes nothing."""
    auth = tmp_path / "auth.toml"
    auth.write_text(AUTH_TOML)
    port = free_port()
    server = server_factory("--config", str(auth), "--metrics-port", str(port))
    admin = ClientConfig(target=server.target, timeout_s=20, token=TOKENS["admin"][0])
    writer = ClientConfig(target=server.target, timeout_s=20, token=TOKENS["writer"][0])
    with FeatureStoreClient(admin) as client, FeatureStoreClient(writer) as other:
        client.apply([USER, ITEM], [KEEP, GONE], feature_services=[READS_GONE])
        client.apply([], [FeatureView("keep", "user", KEEP_V2.features, version=2)])
        client.apply([], [FeatureView("gone", "item", (X,), version=2)])
        for version in (1, 2):
            client.write_features("gone", ITEMS, NOW_US, {"x": np.ones(4)}, version=version)
        client.write_features("keep", USERS, NOW_US, {"x": np.ones(4)}, version=1)
        client.get_online_features(["gone:x"], ITEMS)
        assert view_series(scrape(port), "gone")
        gone_dbs = {
            name("gone", version) for name in (view_db_name, history_db_name) for version in (1, 2)
        }
        assert gone_dbs <= databases(server.data_dir)

        with expect_error(grpc.StatusCode.PERMISSION_DENIED, "admin"):
            other.apply([USER], [KEEP_V2], prune=True)
        with expect_error(
            grpc.StatusCode.FAILED_PRECONDITION,
            "would break feature service 'reads_gone'",
            "features[0] 'gone:x'",
        ):
            client.apply([USER], [KEEP_V2], feature_services=[READS_GONE], prune=True)
        dry = client.apply([USER], [KEEP_V2], dry_run=True, prune=True)
        deleted = [
            ("gone", 1, "", "", "deleted"),
            ("gone", 2, "", "", "deleted"),
            ("", 0, "reads_gone", "", "deleted"),
            ("", 0, "", "item", "deleted"),
        ]
        assert outcomes(dry) == [("keep", 2, "", "", "unchanged"), *deleted]
        assert client.get_online_features(["gone@1:x"], ITEMS)["gone@1:x"].tolist() == [1] * 4
        assert client.get_feature_service("reads_gone").features == ("gone:x",)

        assert client.apply([USER], [KEEP_V2], prune=True) == dry
        with expect_error(grpc.StatusCode.NOT_FOUND, "'gone'"):
            client.get_online_features(["gone:x"], ITEMS)
        with expect_error(grpc.StatusCode.NOT_FOUND, "'reads_gone'"):
            client.get_feature_service("reads_gone")
        entities, views = client.list_feature_views(all_versions=True)
        assert [(v.name, v.version) for v in views] == [("keep", 1), ("keep", 2)]
        assert [e.name for e in entities] == ["user"]
        assert client.get_online_features(["keep@1:x"], USERS)["keep@1:x"].tolist() == [1] * 4
        assert not gone_dbs & databases(server.data_dir)
        assert view_series(scrape(port), "gone") == {}
        assert client.apply([USER], [KEEP_V2], prune=True) == dry[:1]

    records = [
        json.loads(line)
        for line in (server.data_dir / "audit.jsonl").read_text().splitlines()
        if '"apply_feature_views"' in line
    ]
    (dry_record,) = [r for r in records if r.get("would_delete")]
    (pruned,) = [r for r in records if r.get("deleted")]
    expected = "gone@1,gone@2,feature_service:reads_gone,entity:item"
    assert (dry_record["dry_run"], dry_record["prune"], dry_record["would_delete"]) == (
        True,
        True,
        expected,
    )
    assert "deleted" not in dry_record  # a dry run deletes nothing
    assert (pruned["outcome"], pruned["dry_run"], pruned["prune"]) == ("OK", False, True)
    assert pruned["deleted"] == expected and pruned["target"] == "keep"
    assert "prune" not in records[0] and records[-1]["deleted"] == ""
    refused = next(r for r in records if r["outcome"] == "FAILED_PRECONDITION")
    assert refused["prune"] is True and "deleted" not in refused
    denied = next(r for r in records if r["outcome"] == "PERMISSION_DENIED")
    assert denied["prune"] is True


def test_a_prune_whose_caller_gave_up_still_drops_the_deleted_views_series(
    server_factory,
) -> None:
    """The prune runs to its end when its caller's deadline passes first, and so does the
    clean-up of the deleted view's metrics (it ran after the change, in the cancelled handler:
    the series, and the drift reference fitted on deleted rows, stayed)."""
    port = free_port()
    server = server_factory("--metrics-port", str(port))
    config = ClientConfig(target=server.target, timeout_s=20)
    hit = 0
    with FeatureStoreClient(config) as client:
        for deadline in (0.001, 0.002, 0.004, 0.008, 0.016, 0.032) * 3:
            client.apply([USER, ITEM], [KEEP, GONE])
            client.write_features("gone", ITEMS, NOW_US, {"x": np.ones(4)})
            client.get_online_features(["gone:x"], ITEMS)
            assert view_series(scrape(port), "gone")
            hurried = ClientConfig(target=server.target, timeout_s=deadline)
            try:
                with FeatureStoreClient(hurried) as impatient:
                    impatient.apply([USER], [KEEP], prune=True)
                continue
            except ClientError as exc:
                assert exc.code == grpc.StatusCode.DEADLINE_EXCEEDED
            if not wait_until(lambda: not client.list_feature_views("gone")[1], timeout=10):
                continue  # the call never reached the server: nothing was pruned
            hit += 1
            assert wait_until(lambda: not view_series(scrape(port), "gone"), timeout=10)
    assert hit, "no prune outlived its caller's deadline"
