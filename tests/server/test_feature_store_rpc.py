"""FeatureStore over a real server process: round trips, ordering, TTL and every bad input."""

from __future__ import annotations

import fcntl
import hashlib
import os
import queue
import signal
import struct
import termios
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest

from clients import feature_messages as fm
from clients.channel import ClientConfig, ClientError
from clients.feature_client import FeatureStoreClient
from featurestore.dtypes import DType, FeatureStatus
from featurestore.registry import Entity, Feature, FeatureView, JoinKey
from protos.featureserve.v1 import feature_store_pb2 as pb
from protos.featureserve.v1 import feature_store_pb2_grpc as pb_grpc
from server.feature_servicer import MAX_ROW_ERRORS
from tests.conftest import children, wait_until

USER = Entity("user", (JoinKey("user_id", DType.INT64),))
ALL_TYPES = FeatureView(
    name="profile",
    entity="user",
    features=(
        Feature("f32", DType.FLOAT32),
        Feature("f64", DType.FLOAT64, allow_nan=True),
        Feature("i64", DType.INT64),
        Feature("flag", DType.BOOL),
        Feature("city", DType.STRING),
        Feature("emb", DType.FLOAT32_VECTOR, vector_length=4),
    ),
)
NOW_US = int(time.time() * 1e6)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from tests.conftest import ServerProcess

    base = tmp_path_factory.mktemp("featurestore")
    server = ServerProcess(base / "data", base / "models").start()
    with FeatureStoreClient(ClientConfig(target=server.target, timeout_s=20)) as c:
        c.apply([USER], [ALL_TYPES])
        yield c
    server.kill()


def columns(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "f32": rng.random(n, dtype=np.float32),
        "f64": rng.random(n),
        "i64": rng.integers(-(2**62), 2**62, n),
        "flag": rng.random(n) > 0.5,
        "city": np.array([f"city-{i}-é" for i in range(n)], dtype=object),
        "emb": rng.random((n, 4), dtype=np.float32),
    }


def test_every_dtype_round_trips_with_nulls(client) -> None:
    ids = np.arange(100, 150)
    cols = columns(len(ids))
    row = np.arange(len(ids))
    nulls = {"f64": row % 7 == 0, "city": row % 5 == 1, "flag": row % 3 == 2, "emb": row % 4 == 3}
    summary = client.write_features("profile", {"user_id": ids}, NOW_US, cols, nulls)
    assert (summary.written, summary.stale, summary.rejected) == (50, 0, 0)
    got = client.get_online_features(["profile"], {"user_id": np.append(ids, 999_999)})
    assert got.rows == 51
    for name, expected in cols.items():
        values = got[f"profile:{name}"][:50]
        statuses = got.statuses[f"profile:{name}"][:50]
        null = nulls.get(name, np.zeros(50, bool))
        assert (statuses[null] == FeatureStatus.NULL_VALUE).all(), name
        assert (statuses[~null] == FeatureStatus.PRESENT).all(), name
        if name == "city":
            assert values[~null].tolist() == expected[~null].tolist()
            assert values[null].tolist() == [""] * null.sum()
        else:
            np.testing.assert_array_equal(values[~null], expected[~null])
            assert not values[null].any(), name
    assert got.statuses["profile:f32"][50] == FeatureStatus.NOT_FOUND
    assert got.event_timestamps["profile"][:50].tolist() == [NOW_US] * 50
    assert got.event_timestamps["profile"][50] == 0


def test_selected_features_and_string_keys(client) -> None:
    merchant = Entity("merchant", (JoinKey("merchant_id", DType.STRING),))
    view = FeatureView("merchant_stats", "merchant", (Feature("score", DType.FLOAT32),))
    client.apply([merchant], [view])
    keys = np.array(["m-1", "m-\x00-2", "ü" * 200], dtype=object)
    client.write_features(
        "merchant_stats", {"merchant_id": keys}, NOW_US, {"score": np.float32([1, 2, 3])}
    )
    got = client.get_online_features(["merchant_stats:score"], {"merchant_id": keys[::-1]})
    assert got["merchant_stats:score"].tolist() == [3.0, 2.0, 1.0]
    longest = np.array(["ok", "x" * 507], dtype=object)
    summary = client.write_features(
        "merchant_stats", {"merchant_id": longest}, NOW_US, {"score": np.float32([1, 2])}
    )
    assert summary.written == 2
    too_long = np.array(["ok", "x" * 508], dtype=object)
    with expect_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        "'merchant_id' row 1: join key 'merchant_id': 508 bytes; a key of entity 'merchant' "
        "holds at most 507 bytes of strings (LMDB's 511-byte key limit less the encoding's "
        "4 bytes)",
    ):
        client.write_features(
            "merchant_stats", {"merchant_id": too_long}, NOW_US, {"score": np.float32([1, 2])}
        )


def test_older_event_is_stale_and_newest_wins(client) -> None:
    ids = np.array([1, 2])
    new = columns(2, seed=1)
    old = columns(2, seed=2)
    client.write_features("profile", {"user_id": ids}, NOW_US, new)
    summary = client.write_features("profile", {"user_id": ids}, NOW_US - 1_000_000, old)
    assert (summary.written, summary.stale) == (0, 2)
    got = client.get_online_features(["profile:i64"], {"user_id": ids})
    assert got["profile:i64"].tolist() == new["i64"].tolist()


def test_expired_rows_are_withheld(client) -> None:
    view = FeatureView("fresh", "user", (Feature("x", DType.FLOAT32),), ttl_seconds=600)
    client.apply([], [view])
    ids = np.array([1, 2])
    now = int(time.time() * 1e6)
    times = np.array([now - 3_600_000_000, now])
    client.write_features("fresh", {"user_id": ids}, times, {"x": np.float32([5, 6])})
    got = client.get_online_features(["fresh:x"], {"user_id": ids})
    assert got.statuses["fresh:x"].tolist() == [
        FeatureStatus.OUTSIDE_MAX_AGE,
        FeatureStatus.PRESENT,
    ]
    assert got["fresh:x"].tolist() == [0.0, 6.0]


def test_stream_writer_sums_counts(client) -> None:
    ids = np.arange(10_000, 15_000)
    with client.stream_writer("profile", batch_rows=700, ack_every=3) as writer:
        writer.write({"user_id": ids}, NOW_US, columns(len(ids), seed=3))
    assert (writer.summary.written, writer.summary.rejected) == (5000, 0)
    got = client.get_online_features(["profile:f32"], {"user_id": ids})
    np.testing.assert_array_equal(got["profile:f32"], columns(len(ids), seed=3)["f32"])


def test_registry_rpcs(client) -> None:
    entities, views = client.list_feature_views()
    assert {e.name for e in entities} >= {"user"}
    assert {v.name for v in views} >= {"profile"}
    assert client.get_feature_view("profile").features == ALL_TYPES.features


def test_apply_refuses_to_drop_or_retype_a_feature_in_place(client) -> None:
    a, b = Feature("a", DType.FLOAT32), Feature("b", DType.STRING)
    client.apply([], [FeatureView("evolving", "user", (a, b))])
    conflict = grpc.StatusCode.FAILED_PRECONDITION
    with expect_error(conflict, "dropping feature 'b'", "apply with version=2"):
        client.apply([], [FeatureView("evolving", "user", (a,))])
    retyped = FeatureView("evolving", "user", (Feature("a", DType.INT64), b))
    with expect_error(conflict, "retyping feature 'a' from FLOAT32", "apply with version=2"):
        client.apply([], [retyped])
    assert client.get_feature_view("evolving").features == (a, b)
    assert client.apply([], [FeatureView("evolving", "user", (a,), version=2)])[0].version == 2


def test_list_feature_views_all_versions(client) -> None:
    first = FeatureView("versioned", "user", (Feature("a", DType.FLOAT32),))
    second = FeatureView("versioned", "user", (Feature("a", DType.INT64),), version=2)
    client.apply([], [first])
    client.apply([], [second])
    _, latest = client.list_feature_views("versioned")
    assert [(v.version, v.features) for v in latest] == [(2, second.features)]
    _, every = client.list_feature_views("versioned", all_versions=True)
    assert [(v.version, v.features) for v in every] == [(1, first.features), (2, second.features)]


def ttl_history(view: pb.FeatureView) -> list[tuple[int, int]]:
    return [(c.since_us, c.ttl_seconds) for c in view.ttl_history]


def test_views_show_their_ttl_history_and_apply_ignores_one_sent(client) -> None:
    """GetFeatureView and ListFeatureViews show when each TTL came into force, oldest first;
    ttl_history is output only: ApplyFeatureViews ignores one it is sent."""
    stub = pb_grpc.FeatureStoreStub(client._channel)
    get = pb.GetFeatureViewRequest(name="ttl_changing")
    view = FeatureView("ttl_changing", "user", (Feature("a", DType.FLOAT32),), ttl_seconds=60)
    client.apply([], [view])
    created = stub.GetFeatureView(get)
    assert ttl_history(created) == [(created.created_us, 60)]
    client.apply([], [replace(view, ttl_seconds=30)])
    got = stub.GetFeatureView(get)
    assert got.created_us < got.updated_us
    expected = [(got.created_us, 60), (got.updated_us, 30)]
    assert ttl_history(got) == expected
    listed = stub.ListFeatureViews(pb.ListFeatureViewsRequest(name_prefix="ttl_changing"))
    assert [ttl_history(v) for v in listed.views] == [expected]
    assert client.get_feature_view("ttl_changing").ttl_changes() == tuple(expected)

    sent = pb.FeatureView()
    sent.CopyFrom(got)
    del sent.ttl_history[:]
    sent.ttl_history.add(since_us=1, ttl_seconds=5)
    sent.ttl_history.add(since_us=2, ttl_seconds=7)
    applied = stub.ApplyFeatureViews(pb.ApplyFeatureViewsRequest(views=[sent]))
    assert [r.action for r in applied.results] == [pb.ApplyResult.UNCHANGED]
    assert stub.GetFeatureView(get) == got
    sent.version = 2
    applied = stub.ApplyFeatureViews(pb.ApplyFeatureViewsRequest(views=[sent]))
    assert [r.action for r in applied.results] == [pb.ApplyResult.CREATED]
    second = stub.GetFeatureView(pb.GetFeatureViewRequest(name="ttl_changing", version=2))
    assert ttl_history(second) == [(second.created_us, 30)]


def test_delete_feature_view_removes_one_version(client) -> None:
    first = FeatureView("doomed", "user", (Feature("a", DType.FLOAT32),))
    second = FeatureView("doomed", "user", (Feature("a", DType.INT64),), version=2)
    client.apply([], [first])
    client.apply([], [second])
    ids = {"user_id": np.arange(3)}
    client.write_features("doomed", ids, NOW_US, {"a": np.float32([1, 2, 3])}, version=1)
    client.write_features("doomed", ids, NOW_US, {"a": np.arange(3)})
    client.delete_feature_view("doomed", 1)
    with expect_error(grpc.StatusCode.NOT_FOUND, "doomed", "version 1"):
        client.get_online_features(["doomed@1:a"], ids)
    got = client.get_online_features(["doomed:a"], ids)
    np.testing.assert_array_equal(got["doomed:a"], np.arange(3))
    _, left = client.list_feature_views("doomed", all_versions=True)
    assert [v.version for v in left] == [2]
    with expect_error(grpc.StatusCode.NOT_FOUND, "doomed", "version 7"):
        client.delete_feature_view("doomed", 7)
    with expect_error(grpc.StatusCode.INVALID_ARGUMENT, "version: 0", "all_versions"):
        client.delete_feature_view("doomed", 0)
    with expect_error(grpc.StatusCode.INVALID_ARGUMENT, "name: empty"):
        client.delete_feature_view("", 1)
    client.delete_feature_view("doomed", 2)
    assert client.list_feature_views("doomed", all_versions=True)[1] == []


def expect_error(code: grpc.StatusCode, *fragments: str):
    """Expect a ClientError with `code` and every fragment in its message; `.value` holds it."""

    class Check:
        value: ClientError

        def __enter__(self):
            return self

        def __exit__(self, exc_type, exc, tb):
            assert isinstance(exc, ClientError), f"expected {code.name}, got {exc!r}"
            assert exc.code == code, exc
            for fragment in fragments:
                assert fragment in exc.message, exc.message
            self.value = exc
            return True

    return Check()


def test_unknown_view_and_feature_are_not_found(client) -> None:
    with expect_error(grpc.StatusCode.NOT_FOUND, "nope"):
        client.get_online_features(["nope:x"], {"user_id": [1]})
    with expect_error(grpc.StatusCode.NOT_FOUND, "missing_feature"):
        client.get_online_features(["profile:missing_feature"], {"user_id": [1]})
    with expect_error(grpc.StatusCode.NOT_FOUND, "nope"):
        client.write_features("nope", {"user_id": [1]}, NOW_US, {"x": [1.0]})


def test_bad_reference_and_key_type_are_invalid(client) -> None:
    with expect_error(grpc.StatusCode.INVALID_ARGUMENT, "features[0]", "view:feature"):
        client.get_online_features(["profile@x:f32"], {"user_id": [1]})
    for ref in ("profile@\u00b2:f32", "profile@\uff11:f32"):
        with expect_error(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"features[1]: {ref!r} is not a feature reference",
            "'view@VERSION:feature'",
            "VERSION in ASCII digits",
        ):
            client.get_online_features(["profile:f32", ref], {"user_id": [1]})
    with expect_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        "join key 'user_id' of entity 'user' is declared INT64 but the column holds STRING "
        "values; send INT64 values",
    ):
        client.get_online_features(["profile"], {"user_id": np.array(["a"], dtype=object)})


def test_bad_batch_is_rejected_whole_by_default(client) -> None:
    ids = np.array([500, 501, 502])
    cols = columns(3)
    cols["f32"] = np.float32([1.0, np.nan, 2.0])
    with expect_error(grpc.StatusCode.INVALID_ARGUMENT, "f32", "row 1") as err:
        client.write_features("profile", {"user_id": ids}, NOW_US, cols)
    assert (err.value.batch, err.value.row) == (None, 1)
    got = client.get_online_features(["profile:f32"], {"user_id": ids})
    assert (got.statuses["profile:f32"] == FeatureStatus.NOT_FOUND).all()


def test_skip_bad_rows_writes_the_good_ones(client) -> None:
    ids = np.array([600, 601, 602])
    cols = columns(3)
    cols["f32"] = np.float32([1.0, np.nan, 2.0])
    summary = client.write_features(
        "profile", {"user_id": ids}, NOW_US, cols, policy="skip_bad_rows"
    )
    assert (summary.written, summary.rejected) == (2, 1)
    assert (summary.errors[0].row, summary.errors[0].column) == (1, "f32")
    got = client.get_online_features(["profile:f32"], {"user_id": ids})
    assert got.statuses["profile:f32"].tolist() == [
        FeatureStatus.PRESENT, FeatureStatus.NOT_FOUND, FeatureStatus.PRESENT
    ]  # fmt: skip


def test_event_time_errors_name_the_wire_field(client) -> None:
    future = NOW_US + 3_600_000_000
    with expect_error(grpc.StatusCode.INVALID_ARGUMENT, "'event_timestamps' row 0"):
        client.write_features("profile", {"user_id": [1]}, future, columns(1))
    summary = client.write_features(
        "profile", {"user_id": [1, 2]}, [NOW_US, future], columns(2), policy="skip_bad_rows"
    )
    assert [(e.row, e.column) for e in summary.errors] == [(1, "event_timestamps")]


def test_unequal_lengths_and_wrong_dtype_name_the_column(client) -> None:
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    expected = "expected 3: one value per entity row"
    cols = columns(3)
    cols["i64"] = cols["i64"][:2]
    with expect_error(invalid, "blocks[2] (i64): 2 rows", expected, "first missing row: 2"):
        client.write_features("profile", {"user_id": [1, 2, 3]}, NOW_US, cols)
    cols = columns(3)
    cols["city"] = np.append(cols["city"], "extra")
    with expect_error(invalid, "blocks[4] (city): 4 rows", expected, "first extra row: 3"):
        client.write_features("profile", {"user_id": [1, 2, 3]}, NOW_US, cols)
    declared = "feature 'i64' of view 'profile' is declared INT64 but the column holds"
    strings = np.array(["a", "b", "c"], dtype=object)
    for sent, wire in ((strings, "STRING"), (np.ones(3), "FLOAT64")):
        cols = columns(3)
        cols["i64"] = sent
        with expect_error(invalid, f"{declared} {wire} values; send INT64 values"):
            client.write_features("profile", {"user_id": [1, 2, 3]}, NOW_US, cols)


def test_raw_bytes_that_do_not_match_are_invalid(client) -> None:
    stub = pb_grpc.FeatureStoreStub(client._channel)
    request = pb.GetOnlineFeaturesRequest(features=["profile"])
    key = request.entity_keys.add(name="user_id")
    key.values.dtype, key.values.rows, key.values.data = 3, 4, b"\x00" * 10
    with pytest.raises(grpc.RpcError) as err:
        stub.GetOnlineFeatures(request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "entity_keys[0]" in err.value.details() and "expected 32" in err.value.details()


def test_a_feature_sent_twice_or_an_unknown_policy_is_invalid(client) -> None:
    stub = pb_grpc.FeatureStoreStub(client._channel)
    ids = np.array([950, 951])
    cols = columns(2)

    def invalid(request: pb.WriteFeaturesRequest, *fragments: str) -> None:
        for call in (stub.WriteFeatures, lambda r: stub.StreamWriteFeatures(iter([r]))):
            with pytest.raises(grpc.RpcError) as err:
                call(request)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            for fragment in fragments:
                assert fragment in err.value.details(), err.value.details()

    twice = fm.write_request("profile", {"user_id": ids}, NOW_US, cols)
    twice.blocks[0].features[:] = ["f64"]
    invalid(twice, "blocks[1]: feature 'f64' appears in blocks[0] too; send each feature once")
    in_one = fm.write_request("profile", {"user_id": ids}, NOW_US, cols)
    f64 = in_one.blocks[1].values
    in_one.blocks[1].features[:] = ["f64", "f64"]
    f64.width, f64.data = 2, np.repeat(cols["f64"], 2).tobytes()
    invalid(in_one, "blocks[1]: feature 'f64' appears twice in this block; send each feature once")
    policy = fm.write_request("profile", {"user_id": ids}, NOW_US, cols)
    policy.policy = 7
    invalid(policy, "policy: 7 is not a BatchPolicy; use REJECT_BATCH (0) or SKIP_BAD_ROWS (1)")
    got = client.get_online_features(["profile:f64"], {"user_id": ids})
    assert (got.statuses["profile:f64"] == FeatureStatus.NOT_FOUND).all()


def test_a_corrupt_stored_row_fails_its_lookups_and_the_server_survives(server_factory) -> None:
    """A stored row whose string length runs past its end (planted through LMDB) is never read
    past it: lookups that include it fail naming the view, version and row, others succeed,
    and writing the entity again with a newer event time repairs it."""
    import lmdb

    from featurestore.keys import encode_keys
    from featurestore.registry import view_db_name

    server = server_factory()
    strings = Feature("s", DType.STRING), Feature("t", DType.STRING)
    notes = FeatureView("notes", "user", (Feature("n", DType.INT64), *strings))
    ids = np.array([1, 2, 3])
    with FeatureStoreClient(ClientConfig(target=server.target, timeout_s=20)) as client:
        client.apply([USER], [notes])
        text = np.array(["a", "bb", "ccc"], dtype=object)
        cols = {"n": ids, "s": text, "t": text}
        client.write_features("notes", {"user_id": ids}, NOW_US, cols)
        env = lmdb.open(str(server.data_dir), max_dbs=8)
        key = encode_keys(USER, {"user_id": ids[1:2]}).keys[0]
        with env.begin(write=True) as txn:
            db = env.open_db(view_db_name("notes", 1), txn=txn, create=False)
            row = bytearray(txn.get(key, db=db))
            row[36:40] = (1 << 31).to_bytes(4, "little")  # after header, bitmap and n: s's length
            txn.put(key, bytes(row), db=db)
        env.close()
        for refs in (["notes"], ["notes:n"]):
            with expect_error(
                grpc.StatusCode.DATA_LOSS,
                "feature view 'notes' version 1: stored row 1 of the 3 read is corrupt "
                "(a string value's length runs past its end)",
                "write that entity's features again with a newer event time",
            ):
                client.get_online_features(refs, {"user_id": ids})
        got = client.get_online_features(["notes"], {"user_id": ids[[0, 2]]})
        assert got["notes:s"].tolist() == ["a", "ccc"]
        cols = {"n": [5], "s": ["b"], "t": ["b"]}
        client.write_features("notes", {"user_id": ids[1:2]}, NOW_US + 1, cols)
        got = client.get_online_features(["notes"], {"user_id": ids})
        assert got["notes:s"].tolist() == got["notes:t"].tolist() == ["a", "b", "ccc"]
    assert server.proc.poll() is None


def test_empty_request_is_an_empty_answer(client) -> None:
    got = client.get_online_features([], {"user_id": np.array([], dtype=np.int64)})
    assert got.rows == 0 and got.values == {}
    got = client.get_online_features(["profile"], {"user_id": np.array([], dtype=np.int64)})
    assert got.rows == 0 and got["profile:f32"].shape == (0,)


def test_lookups_are_capped_by_max_entities_and_writes_by_max_rows_per_write(
    tmp_path, server_factory
) -> None:
    """Writes of 50 rows were refused as over max_entities_per_request = 10."""
    config = tmp_path / "small.toml"
    config.write_text("max_entities_per_request = 10\nmax_rows_per_write = 100\n")
    server = server_factory("--config", str(config))
    with FeatureStoreClient(server.target) as small:
        small.apply([USER], [ALL_TYPES])
        with expect_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "10", "max_entities_per_request"):
            small.get_online_features(["profile"], {"user_id": np.arange(11)})
        assert small.write_features("profile", {"user_id": np.arange(100)}, NOW_US, columns(100))
        with small.stream_writer("profile", batch_rows=100) as writer:
            writer.write({"user_id": np.arange(100, 200)}, np.full(100, NOW_US), columns(100))
        assert small.get_online_features(["profile"], {"user_id": np.arange(190, 200)}).rows
        for write in (
            lambda: small.write_features(
                "profile", {"user_id": np.arange(101)}, NOW_US, columns(101)
            ),
            lambda: stream_one(small, "profile", 101),
        ):
            with expect_error(
                grpc.StatusCode.RESOURCE_EXHAUSTED, "101 rows, over max_rows_per_write=100"
            ) as refused:
                write()
            assert "max_entities_per_request" not in refused.value.message


def stream_one(client: FeatureStoreClient, view: str, rows: int) -> None:
    """One StreamWriteFeatures batch of `rows` rows of ALL_TYPES."""
    with client.stream_writer(view, batch_rows=rows) as writer:
        writer.write({"user_id": np.arange(rows)}, np.full(rows, NOW_US), columns(rows))


def test_definitions_no_row_could_be_stored_under_are_refused_at_apply(client) -> None:
    """Names over 255 bytes failed the apply INTERNAL (LMDB's key limit); 65,536 features and
    vectors of 2**32-1 floats were applied, then every write (INTERNAL) or read (out of memory)
    of the view failed."""
    x = (Feature("x", DType.INT64),)
    for entities, views, fragments in (
        ([], [FeatureView("v" * 505, "user", x)], ("feature view name", "505 bytes", "255")),
        ([Entity("e" * 510, USER.join_keys)], [], ("entity name 'eee", "510 bytes long")),
        (
            [],
            [
                FeatureView(
                    "wide", "user", tuple(Feature(f"f{i}", DType.INT64) for i in range(2**16))
                )
            ],
            ("'wide': features has 65536 entries, over the limit of 65535 per view",),
        ),
        (
            [],
            [FeatureView("huge", "user", (Feature("emb", DType.FLOAT32_VECTOR, 2**32 - 1),))],
            ("'huge' feature 'emb': vector_length 4294967295", "over the limit of 1048576"),
        ),
    ):
        with expect_error(grpc.StatusCode.INVALID_ARGUMENT, *fragments):
            client.apply(entities, views)
    names = [view.name for view in client.list_feature_views()[0]]
    assert not {"wide", "huge"} & set(names) and not any(len(name) > 255 for name in names)


def test_apply_refuses_versions_beyond_lmdb_max_dbs_and_the_store_restarts(
    tmp_path, server_factory
) -> None:
    """lmdb_max_dbs = 5 holds 2 view versions: a third and fourth were applied, could not be
    written, and the server then refused to start on its own data dir."""
    config = tmp_path / "maxdbs.toml"
    config.write_text("lmdb_max_dbs = 5\n")
    server = server_factory("--config", str(config))

    def write(name: str) -> int:
        ids = {"user_id": np.array([1])}
        return small.write_features(name, ids, NOW_US, {"x": np.array([1])}).written

    views = [FeatureView(f"v{i}", "user", (Feature("x", DType.INT64),)) for i in range(3)]
    with FeatureStoreClient(server.target) as small:
        small.apply([USER], views[:2])
        with expect_error(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "3 view versions would need 7 LMDB databases",
            "over lmdb_max_dbs = 5; set lmdb_max_dbs in the server config",
            "to at least 7",
        ):
            small.apply([], views[2:])
        assert [write("v0"), write("v1")] == [1, 1]
        small.delete_feature_view("v0", 1)
        small.apply([], views[2:])
        assert write("v2") == 1
    assert server.terminate() == 0
    restarted = server_factory("--config", str(config), data_dir=server.data_dir)
    with FeatureStoreClient(restarted.target) as small:
        assert small.get_online_features(["v2:x"], {"user_id": np.array([1])})["v2:x"] == [1]


def test_values_the_feature_dtype_cannot_hold_are_invalid(client) -> None:
    ids = np.array([700, 701, 702, 703])
    cols = columns(4)
    cols["f32"] = np.array([0.5, 1e300, 2.0, 3.0])
    cols["f64"] = np.array([1, 2, 2**53 + 1, 4])
    with expect_error(grpc.StatusCode.INVALID_ARGUMENT, "'f32' row 1", "overflows FLOAT32"):
        client.write_features("profile", {"user_id": ids}, NOW_US, cols)
    summary = client.write_features(
        "profile", {"user_id": ids}, NOW_US, cols, policy="skip_bad_rows"
    )
    assert (summary.written, summary.rejected) == (2, 2)
    assert [(e.row, e.column) for e in summary.errors] == [(1, "f32"), (2, "f64")]
    got = client.get_online_features(["profile:f32", "profile:f64"], {"user_id": ids})
    assert got["profile:f32"].tolist() == [0.5, 0.0, 0.0, 3.0]
    assert got["profile:f64"].tolist() == [1.0, 0.0, 0.0, 4.0]


def test_garbage_strings_reject_only_their_rows(client) -> None:
    tag = Entity("tag", (JoinKey("name", DType.STRING),))
    view = FeatureView("labels", "tag", (Feature("label", DType.STRING), Feature("n", DType.INT64)))
    client.apply([tag], [view])
    keys = np.array(["k0", b"\xff\xfe", "k2", "k3", "k4"], dtype=object)
    cols = {"label": np.array(["a", "b", b"c\xc3", "dé", "e"], dtype=object), "n": np.arange(5)}
    good = ["k0", "k2", "k3", "k4"]
    with expect_error(grpc.StatusCode.INVALID_ARGUMENT, "'name' row 1", "not valid UTF-8"):
        client.write_features("labels", {"name": keys}, NOW_US, cols)
    got = client.get_online_features(["labels"], {"name": good})
    assert (got.statuses["labels:n"] == FeatureStatus.NOT_FOUND).all()
    summary = client.write_features("labels", {"name": keys}, NOW_US, cols, policy="skip_bad_rows")
    assert (summary.written, summary.rejected) == (3, 2)
    assert [(e.row, e.column) for e in summary.errors] == [(1, "name"), (2, "label")]
    assert "not valid UTF-8" in summary.errors[1].reason
    got = client.get_online_features(["labels"], {"name": good})
    assert got["labels:label"].tolist() == ["a", "", "dé", "e"]
    assert got["labels:n"].tolist() == [0, 0, 3, 4]
    assert got.statuses["labels:n"].tolist() == [1, 2, 1, 1]


def test_zero_row_requests_get_empty_answers(client) -> None:
    stub = pb_grpc.FeatureStoreStub(client._channel)
    empty = [pb.WriteFeaturesRequest(view="profile"), pb.WriteFeaturesRequest()]
    for request in [*empty, fm.write_request("nope", {}, np.zeros(0, np.int64), {})]:
        answer = stub.WriteFeatures(request)
        assert (answer.rows_written, answer.rows_stale, answer.rows_rejected) == (0, 0, 0)
    ids = np.array([900, 901])
    batch = fm.write_request("profile", {"user_id": ids}, NOW_US, columns(2))
    answer = stub.StreamWriteFeatures(iter([empty[1], batch, empty[1], empty[0]]))
    assert (answer.rows_written, answer.rows_stale, answer.rows_rejected) == (2, 0, 0)
    got = client.get_online_features(["profile:f32", "profile:city"], {})
    assert got.rows == 0
    assert got["profile:f32"].shape == (0,) and got["profile:city"].shape == (0,)
    with expect_error(grpc.StatusCode.INVALID_ARGUMENT, "key column 'user_id'", "missing"):
        client.write_features("profile", {}, np.array([NOW_US]), columns(1))


def test_empty_writes_still_need_the_write_scope(tmp_path, server_factory) -> None:
    config = tmp_path / "auth.toml"
    digest = hashlib.sha256(b"w-secret").hexdigest()
    config.write_text(
        '[auth]\nenabled = true\n[[auth.tokens]]\nname = "writer"\n'
        f'token_sha256 = "{digest}"\nscopes = ["write:profile"]\n'
    )
    server = server_factory("--config", str(config))
    token = (("authorization", "Bearer w-secret"),)
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.FeatureStoreStub(channel)
        answer = stub.WriteFeatures(pb.WriteFeaturesRequest(view="profile"), metadata=token)
        assert (answer.rows_written, answer.rows_rejected) == (0, 0)
        for request in (pb.WriteFeaturesRequest(), pb.WriteFeaturesRequest(view="other")):
            with pytest.raises(grpc.RpcError) as err:
                stub.WriteFeatures(request, metadata=token)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            with pytest.raises(grpc.RpcError) as err:
                stub.StreamWriteFeatures(iter([request]), metadata=token)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_null_keys_are_rejected(client) -> None:
    stub = pb_grpc.FeatureStoreStub(client._channel)
    lookup = fm.get_request(["profile:f32"], {"user_id": [1, 2]})
    lookup.entity_keys[0].values.nulls = b"\x00\x01"
    with pytest.raises(grpc.RpcError) as err:
        stub.GetOnlineFeatures(lookup)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "(user_id): key row 1 is null" in err.value.details()
    ids = np.array([800, 801, 802])
    write = fm.write_request("profile", {"user_id": ids}, NOW_US, columns(3))
    write.entity_keys[0].values.nulls = b"\x00\x01\x00"
    with pytest.raises(grpc.RpcError) as err:
        stub.WriteFeatures(write)
    assert "column 'user_id' row 1: join key is null" in err.value.details()
    write.policy = pb.SKIP_BAD_ROWS
    answer = stub.WriteFeatures(write)
    assert answer.rows_written == 2
    assert [(e.row, e.column) for e in answer.errors] == [(1, "user_id")]
    got = client.get_online_features(["profile:f32"], {"user_id": ids})
    assert got.statuses["profile:f32"].tolist() == [1, 2, 1]


def test_row_errors_are_capped_but_every_rejected_row_is_counted(client) -> None:
    n = MAX_ROW_ERRORS + 500
    cols = columns(n)
    cols["f32"] = np.full(n, np.nan, np.float32)
    summary = client.write_features(
        "profile", {"user_id": np.arange(n)}, NOW_US, cols, policy="skip_bad_rows"
    )
    assert (summary.written, summary.rejected) == (0, n)
    assert [e.row for e in summary.errors] == list(range(MAX_ROW_ERRORS))


def test_oversized_messages_and_batches_name_their_limit(tmp_path, server_factory) -> None:
    config = tmp_path / "small.toml"
    config.write_text("max_message_bytes = 100000\nmax_rows_per_write = 2500\n")
    server = server_factory("--config", str(config))
    roomy = ClientConfig(target=server.target, timeout_s=20, max_message_bytes=1 << 26)
    with FeatureStoreClient(roomy) as small:
        narrow = FeatureView("narrow", "user", (Feature("flag", DType.BOOL),))
        small.apply([USER], [ALL_TYPES, narrow])
        ids = np.arange(2000)
        request = fm.write_request("profile", {"user_id": ids}, NOW_US, columns(len(ids)))
        assert request.ByteSize() > 100_000
        fix = ("max_message_bytes=100000", "raise max_message_bytes in the server config")
        with expect_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "request is", "split", *fix):
            small.write_features("profile", {"user_id": ids}, NOW_US, columns(len(ids)))
        stub = pb_grpc.FeatureStoreStub(small._channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.StreamWriteFeatures(iter([request]))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "batch 0:" in err.value.details() and fix[0] in err.value.details()
        with expect_error(
            grpc.StatusCode.RESOURCE_EXHAUSTED, "response is", "max_entities_per_request", *fix
        ):
            small.get_online_features(["profile"], {"user_id": ids})
        assert small.get_online_features(["profile"], {"user_id": ids[:100]}).rows == 100
        many = np.arange(2501)
        with expect_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "max_rows_per_write=2500"):
            small.write_features("narrow", {"user_id": many}, NOW_US, {"flag": many % 2 == 0})


def narrow_batch(i: int) -> pb.WriteFeaturesRequest:
    """Batch i of a stream into the view `narrow`: users 10i..10i+9, x = user id."""
    ids = np.arange(10 * i, 10 * i + 10)
    return fm.write_request("narrow", {"user_id": ids}, NOW_US, {"x": ids.astype(np.float32)})


def test_a_bad_stream_message_ends_the_stream_naming_its_batch(client) -> None:
    client.apply([], [FeatureView("narrow", "user", (Feature("x", DType.FLOAT32),))])
    bad = narrow_batch(2)
    bad.blocks[0].values.data = np.float32([0, np.nan, *range(2, 10)]).tobytes()
    stub = pb_grpc.FeatureStoreStub(client._channel)
    with pytest.raises(grpc.RpcError) as err:
        stub.StreamWriteFeatures(iter([narrow_batch(0), narrow_batch(1), bad, narrow_batch(3)]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for fragment in (
        "batch 2: column 'x' row 1: NaN",
        "batches 0 to 1 were written, batch 2 and later ones were not acknowledged",
        "resend from batch 2 (writes are idempotent, so resending is safe)",
    ):
        assert fragment in err.value.details()
    assert dict(err.value.trailing_metadata()) == {
        "featureserve-batch": "2",
        "featureserve-row": "1",
    }
    got = client.get_online_features(["narrow:x"], {"user_id": np.arange(40)})
    assert (
        got.statuses["narrow:x"].tolist()
        == [FeatureStatus.PRESENT] * 20 + [FeatureStatus.NOT_FOUND] * 20
    )


def test_a_stream_spanning_a_delete_and_recreate_of_its_view_fails_there(client) -> None:
    """Batches written before the view was deleted and created again went with the deleted
    view: a later batch of the same stream is refused, not acknowledged as if all were kept."""
    churn = FeatureView("churn", "user", (Feature("x", DType.FLOAT32),))
    client.apply([], [churn])

    def batch(i: int) -> pb.WriteFeaturesRequest:
        ids = np.arange(10 * i, 10 * i + 10)
        return fm.write_request("churn", {"user_id": ids}, NOW_US, {"x": ids.astype(np.float32)})

    def requests() -> Iterator[pb.WriteFeaturesRequest]:
        yield from (batch(i) for i in range(3))
        keys = {"user_id": np.arange(30)}
        assert wait_until(
            lambda: (client.get_online_features(["churn:x"], keys).statuses["churn:x"] == 1).all()
        )
        client.delete_feature_view("churn", 1)
        client.apply([], [churn])
        yield from (batch(i) for i in range(3, 6))

    stub = pb_grpc.FeatureStoreStub(client._channel)
    with pytest.raises(grpc.RpcError) as err:
        stub.StreamWriteFeatures(requests())
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "batch 3: feature view 'churn' v1 was deleted and created again during this stream" in (
        err.value.details()
    )
    got = client.get_online_features(["churn:x"], {"user_id": np.arange(60)})
    assert (got.statuses["churn:x"] == FeatureStatus.NOT_FOUND).all()


def commit_process(server_pid: int) -> int:
    """The pid of the server's commit process (started by its first write)."""
    found = [
        pid
        for pid in children(server_pid)
        if b"featurestore.commit_process" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]
    assert len(found) == 1, f"expected one commit process, found {found}"
    return found[0]


@contextmanager
def unread_requests(pid: int) -> Iterator[Callable[[], int]]:
    """A function counting the bytes the server has sent the commit process and it has not
    read, through a handle on its request pipe (argv[3] of `-m featurestore.commit_process`)
    that is never read from."""
    requests_fd = int(Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[3])
    fd = os.open(f"/proc/{pid}/fd/{requests_fd}", os.O_RDONLY | os.O_NONBLOCK)
    try:
        yield lambda: struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, bytes(4)))[0]
    finally:
        os.close(fd)


def test_a_failed_commit_ends_the_stream_unavailable_at_the_first_lost_batch(
    server_factory,
) -> None:
    """Batch 0 commits; batches 1 and 2 reach the commit process while it is stopped, and it is
    killed: both fail, and the stream ends UNAVAILABLE at batch 1 (the second failure must not
    escape as UNKNOWN). The client must not retry: gRPC would replay the stream on UNAVAILABLE.
    Each small message is one atomic pipe write, so a growing count of unread bytes shows the
    server has handed that batch over."""
    server = server_factory()
    no_retries = ClientConfig(target=server.target, timeout_s=60, max_attempts=1)
    with FeatureStoreClient(no_retries) as client:
        client.apply([USER], [FeatureView("narrow", "user", (Feature("x", DType.FLOAT32),))])

        def committed(user_id: int) -> bool:
            got = client.get_online_features(["narrow:x"], {"user_id": [user_id]})
            return got.statuses["narrow:x"][0] == FeatureStatus.PRESENT

        requests: queue.SimpleQueue[pb.WriteFeaturesRequest | None] = queue.SimpleQueue()
        stub = pb_grpc.FeatureStoreStub(client._channel)
        call = stub.StreamWriteFeatures.future(iter(requests.get, None), timeout=120)
        requests.put(narrow_batch(0))
        assert wait_until(lambda: committed(9), timeout=60), "batch 0 never committed"
        child = commit_process(server.proc.pid)
        os.kill(child, signal.SIGSTOP)
        try:
            with unread_requests(child) as unread:
                for i in (1, 2):
                    before = unread()
                    requests.put(narrow_batch(i))
                    assert wait_until(lambda before=before: unread() > before, timeout=60)
                    assert unread() < 4096, "a message over PIPE_BUF may be seen half-written"
        finally:
            os.kill(child, signal.SIGKILL)
        requests.put(None)
        error = call.exception(timeout=120)
        assert error is not None and error.code() == grpc.StatusCode.UNAVAILABLE, error
        for fragment in (
            "batch 1: the commit process exited",
            "batch 0 was written, batch 1 and later ones were not acknowledged",
            "resend from batch 1 (writes are idempotent, so resending is safe)",
        ):
            assert fragment in error.details(), error.details()
        resent = stub.StreamWriteFeatures(iter([narrow_batch(1), narrow_batch(2)]), timeout=60)
        assert (resent.rows_written, resent.rows_stale) == (20, 0)
        got = client.get_online_features(["narrow:x"], {"user_id": np.arange(30)})
        assert (got.statuses["narrow:x"] == FeatureStatus.PRESENT).all()
        assert got["narrow:x"].tolist() == list(range(30))


def resident_anon_mb(pid: int) -> float:
    """The process's anonymous resident memory (its heap), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no RssAnon")


def test_failed_calls_do_not_pile_up_in_the_servers_heap(server_factory) -> None:
    """A call ended by context.abort left its AbortError on grpc.aio's call state, with a
    traceback through every frame that held the request, and a stream that stopped reading at
    a bad batch left grpc.aio's receiver paused on it: reference cycles freed only by a garbage
    collection, which the server's GC thresholds make rare. 300 WriteFeatures of 1 MB with a bad
    row kept 361 MB, not given back while idle; each failed stream kept its last request."""
    server = server_factory()
    wide = FeatureView("wide", "user", tuple(Feature(f"f{i}", DType.FLOAT32) for i in range(32)))
    rng = np.random.default_rng(1)
    with FeatureStoreClient(ClientConfig(target=server.target, timeout_s=20)) as c:
        c.apply([USER], [wide])
        stub = pb_grpc.FeatureStoreStub(c._channel)

        def bad_request(rows: int) -> pb.WriteFeaturesRequest:
            values = {f"f{i}": rng.random(rows, dtype=np.float32) for i in range(32)}
            values["f0"][7] = np.nan
            return fm.write_request("wide", {"user_id": np.arange(rows)}, NOW_US, values)

        def failed(n: int, call: Callable[[pb.WriteFeaturesRequest], object], rows: int) -> float:
            """The server's heap growth over n failed calls, in MB."""
            before = resident_anon_mb(server.proc.pid)
            request = bad_request(rows)
            for _ in range(n):
                with pytest.raises(grpc.RpcError) as err:
                    call(request)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            return resident_anon_mb(server.proc.pid) - before

        unary = failed(300, stub.WriteFeatures, 8000)
        streams = failed(300, lambda r: stub.StreamWriteFeatures(iter([r])), 8000)
    assert unary < 30, f"300 failed 1 MB WriteFeatures grew the server's heap {unary:.0f} MB"
    assert streams < 30, (
        f"300 streams failed on a 1 MB batch grew the server's heap {streams:.0f} MB"
    )
