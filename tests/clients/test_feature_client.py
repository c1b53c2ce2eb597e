"""FeatureStoreClient and AsyncFeatureStoreClient against a real server: streams the server
rejects mid-way, versioned references, and the async twin's methods."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import re
import threading
import time
from concurrent import futures

import grpc
import numpy as np
import pandas as pd
import pytest

from clients import feature_messages as fm
from clients.channel import ClientConfig, ClientError
from clients.feature_client import (
    AsyncFeatureStoreClient,
    AsyncStreamWriter,
    FeatureStoreClient,
    StreamWriter,
)
from featurestore.dtypes import DType, FeatureStatus
from featurestore.registry import Entity, Feature, FeatureService, FeatureView, JoinKey
from protos.arrays import ArrayError
from protos.featureserve.v1 import feature_store_pb2 as pb
from protos.featureserve.v1 import feature_store_pb2_grpc as pb_grpc
from tests.conftest import raised_when_closed_midway

USER = Entity("user", (JoinKey("user_id", DType.INT64),))
WIDTH = 16
ROWS = 2000  # rows per message: 200 messages are far more than the writer and gRPC buffer
MESSAGES = 200
BAD_BATCH, BAD_ROW = 3, 7
NOW_US = int(time.time() * 1e6)


def strict_view(name: str) -> FeatureView:
    """float32 features f0..f15 that forbid NaN."""
    return FeatureView(name, "user", tuple(Feature(f"f{i}", DType.FLOAT32) for i in range(WIDTH)))


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    from tests.conftest import ServerProcess

    base = tmp_path_factory.mktemp("feature_client")
    server = ServerProcess(base / "data", base / "models").start()
    yield server.target
    server.kill()


@pytest.fixture(scope="module")
def client(target):
    with FeatureStoreClient(ClientConfig(target=target, timeout_s=20)) as c:
        yield c


def rows_with_nan() -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """MESSAGES x ROWS rows whose values are their user id; f3 is NaN in one row of BAD_BATCH."""
    ids = np.arange(MESSAGES * ROWS, dtype=np.int64)
    features = {f"f{i}": ids.astype(np.float32) for i in range(WIDTH)}
    features["f3"][BAD_BATCH * ROWS + BAD_ROW] = np.nan
    return ids, features


def assert_rejected_midway(client: FeatureStoreClient, view: str, error: ClientError) -> None:
    """The server's error names the column, row and batch; batches before it are readable and
    nothing from the bad batch on was written."""
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT, error
    assert f"batch {BAD_BATCH}:" in error.message and "'f3'" in error.message, error
    assert f"row {BAD_ROW}:" in error.message and "NaN" in error.message, error
    assert (error.batch, error.row) == (BAD_BATCH, BAD_ROW)
    acked = np.arange(BAD_BATCH * ROWS)
    got = client.get_online_features([f"{view}:f15"], {"user_id": acked})
    assert (got.statuses[f"{view}:f15"] == FeatureStatus.PRESENT).all()
    np.testing.assert_array_equal(got[f"{view}:f15"], acked.astype(np.float32))
    later = np.array([BAD_BATCH * ROWS, BAD_BATCH * ROWS + BAD_ROW, (BAD_BATCH + 1) * ROWS])
    got = client.get_online_features([f"{view}:f15"], {"user_id": later})
    assert (got.statuses[f"{view}:f15"] == FeatureStatus.NOT_FOUND).all()


def in_thread(work, timeout: float = 120) -> BaseException | None:
    """Run work() in a daemon thread; what it raised (None if nothing). A writer that hangs
    fails the test instead of hanging it."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            work()
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout)
    assert outcome, f"the stream writer still blocked after {timeout} s"
    return outcome[0]


def test_sync_stream_rejected_midway_raises_the_servers_error(client) -> None:
    client.apply([USER], [strict_view("sync_strict")])
    ids, features = rows_with_nan()

    def stream() -> None:
        with client.stream_writer("sync_strict", batch_rows=ROWS, ack_every=1000) as writer:
            writer.write({"user_id": ids}, NOW_US, features)

    error = in_thread(stream)
    assert isinstance(error, ClientError), error
    assert_rejected_midway(client, "sync_strict", error)


def async_stream_error(config: ClientConfig, view: str) -> ClientError:
    """Stream rows_with_nan() to `view` with the async client's stream_writer; the error raised."""
    ids, features = rows_with_nan()

    async def stream() -> None:
        async with (
            AsyncFeatureStoreClient(config) as aclient,
            aclient.stream_writer(view, batch_rows=ROWS, ack_every=1000) as writer,
        ):
            await writer.write({"user_id": ids}, NOW_US, features)

    with pytest.raises(ClientError) as caught:
        asyncio.run(asyncio.wait_for(stream(), 120))
    return caught.value


def test_async_stream_rejected_midway_raises_the_servers_error(target, client) -> None:
    client.apply([USER], [strict_view("async_strict")])
    error = async_stream_error(ClientConfig(target=target, timeout_s=20), "async_strict")
    assert_rejected_midway(client, "async_strict", error)


def test_batch_numbers_in_errors_count_over_the_writers_life(client) -> None:
    client.apply([USER], [strict_view("numbered")])
    ids = np.arange(10, dtype=np.int64)
    features = {f"f{i}": ids.astype(np.float32) for i in range(WIDTH)}
    features["f0"][8] = np.nan
    with client.stream_writer("numbered", batch_rows=2, ack_every=3, policy="skip_bad_rows") as w:
        w.write({"user_id": ids}, NOW_US, features)
    assert (w.summary.written, w.summary.rejected) == (9, 1)
    [error] = w.summary.errors
    assert (error.batch, error.row, error.column) == (4, 0, "f0")
    features["f0"][8] = 0.0
    features["f1"][9] = np.nan
    with (
        pytest.raises(ClientError) as caught,
        client.stream_writer("numbered", batch_rows=2, ack_every=3) as w,
    ):
        w.write({"user_id": ids + 100}, NOW_US, features)
    assert "batch 1:" in caught.value.message, caught.value
    assert "message 3 of this writer" in caught.value.message, caught.value
    assert (caught.value.batch, caught.value.row) == (4, 1)


class SilentServer(pb_grpc.FeatureStoreServicer):
    """A server that takes a stream but never reads it ("deaf") or never answers ("mute"):
    the real server cannot be made to stall on purpose."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.release = threading.Event()

    def StreamWriteFeatures(self, request_iterator, context):
        if self.mode == "mute":
            for _ in request_iterator:
                pass
        self.release.wait()
        return pb.WriteFeaturesResponse()


@pytest.fixture(params=["deaf", "mute"])
def silent(request):
    servicer = SilentServer(request.param)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_FeatureStoreServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    servicer.release.set()
    server.stop(0)


def test_sync_stream_gives_up_after_timeout_when_the_server_stalls(silent) -> None:
    ids, features = rows_with_nan()

    def stream() -> None:
        config = ClientConfig(target=silent, timeout_s=1, max_attempts=1)
        with (
            FeatureStoreClient(config) as c,
            c.stream_writer("any", batch_rows=ROWS, ack_every=1000) as writer,
        ):
            writer.write({"user_id": ids}, NOW_US, features)

    error = in_thread(stream)
    assert isinstance(error, ClientError), error
    assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "timeout_s" in error.message and "'any'" in error.message


def test_async_stream_gives_up_after_timeout_when_the_server_stalls(silent) -> None:
    error = async_stream_error(ClientConfig(target=silent, timeout_s=1, max_attempts=1), "any")
    assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "timeout_s" in error.message


def test_versioned_references_keep_each_version(client) -> None:
    v1 = FeatureView("scores", "user", (Feature("x", DType.FLOAT32),), version=1)
    v2 = FeatureView("scores", "user", (Feature("x", DType.FLOAT64),), version=2)
    client.apply([USER], [v1])
    client.apply([USER], [v2])
    ids = np.array([1, 2], dtype=np.int64)
    client.write_features("scores", {"user_id": ids}, NOW_US, {"x": np.float32([1, 2])}, version=1)
    client.write_features(
        "scores", {"user_id": ids}, NOW_US + 5, {"x": np.float64([10, 20])}, version=2
    )
    got = client.get_online_features(["scores@1:x", "scores@2:x", "scores:x"], {"user_id": ids})
    assert sorted(got.values) == ["scores:x", "scores@1:x", "scores@2:x"]
    assert got["scores@1:x"].tolist() == [1.0, 2.0] and got["scores@1:x"].dtype == np.float32
    assert got["scores@2:x"].tolist() == [10.0, 20.0] and got["scores@2:x"].dtype == np.float64
    assert got["scores:x"].tolist() == [10.0, 20.0]
    assert got.event_timestamps["scores@1"].tolist() == [NOW_US, NOW_US]
    assert got.event_timestamps["scores@2"].tolist() == [NOW_US + 5] * 2
    assert got.event_timestamps["scores"].tolist() == [NOW_US + 5] * 2
    assert got.versions == {"scores@1": 1, "scores@2": 2, "scores": 2}
    for name in got.values:
        assert (got.statuses[name] == FeatureStatus.PRESENT).all(), name
    whole = client.get_online_features(["scores@1"], {"user_id": ids})
    assert list(whole.values) == ["scores@1:x"] and list(whole.event_timestamps) == ["scores@1"]


def public_methods(cls: type) -> set[str]:
    return {name for name, _ in inspect.getmembers(cls, inspect.isfunction) if name[0] != "_"}


def test_sync_and_async_twins_have_the_same_methods() -> None:
    assert public_methods(FeatureStoreClient) == public_methods(AsyncFeatureStoreClient)
    assert public_methods(StreamWriter) == public_methods(AsyncStreamWriter)
    for name in public_methods(AsyncFeatureStoreClient) - {"stream_writer"}:
        assert inspect.iscoroutinefunction(getattr(AsyncFeatureStoreClient, name)), name


def test_async_client_writes_lists_and_gets_views(target) -> None:
    view = FeatureView("async_view", "user", (Feature("a", DType.INT64),), owner="tests")

    async def run():
        async with AsyncFeatureStoreClient(ClientConfig(target=target, timeout_s=20)) as c:
            await c.apply([USER], [view])
            summary = await c.write_features(
                "async_view", {"user_id": [7, 8]}, NOW_US, {"a": np.array([70, 80])}
            )
            got = await c.get_online_features(["async_view:a"], {"user_id": [8, 7, 9]})
            entities, views = await c.list_feature_views("async_view")
            return summary, got, entities, views, await c.get_feature_view("async_view")

    summary, got, entities, views, fetched = asyncio.run(run())
    assert (summary.written, summary.stale, summary.rejected) == (2, 0, 0)
    assert got["async_view:a"][:2].tolist() == [80, 70]
    assert got.statuses["async_view:a"][2] == FeatureStatus.NOT_FOUND
    assert [v.name for v in views] == ["async_view"] and USER in entities
    assert (fetched.name, fetched.version, fetched.owner) == ("async_view", 1, "tests")
    assert [(f.name, f.dtype) for f in fetched.features] == [("a", DType.INT64)]


def test_async_client_prunes_what_the_apply_no_longer_declares(server_factory) -> None:
    """The async twin sends prune too (own server: a prune deletes every other view)."""
    server = server_factory()
    kept, gone = (FeatureView(name, "user", (Feature("a", DType.INT64),)) for name in "kg")

    async def run():
        async with AsyncFeatureStoreClient(ClientConfig(target=server.target)) as c:
            await c.apply([USER], [kept, gone])
            dry = await c.apply([USER], [kept], dry_run=True, prune=True)
            pruned = await c.apply([USER], [kept], prune=True)
            return dry, pruned, (await c.list_feature_views())[1]

    dry, pruned, views = asyncio.run(run())
    assert [(r.view, r.version, r.action) for r in pruned] == [
        ("k", 1, "unchanged"),
        ("g", 1, "deleted"),
    ]
    assert dry == pruned and [v.name for v in views] == ["k"]


def test_unsigned_keys_and_values_over_int64_are_rejected_not_written_to_other_entities(
    client,
) -> None:
    view = FeatureView("unsigned", "user", (Feature("x", DType.INT64), Feature("f", DType.FLOAT32)))
    client.apply([USER], [view])
    big = np.array([2**63, 2**64 - 1], dtype=np.uint64)
    small = np.array([5, 6], dtype=np.uint64)
    with pytest.raises(ArrayError, match=r"keys\['user_id'\]: row 0: 9223372036854775808 exceeds"):
        client.write_features("unsigned", {"user_id": big}, NOW_US, {"x": small, "f": [1, 2]})
    with pytest.raises(ArrayError, match=r"features\['x'\]: row 1: 18446744073709551615 exceeds"):
        client.write_features(
            "unsigned", {"user_id": [-1, 7]}, NOW_US, {"x": np.uint64([1, 2**64 - 1]), "f": [1, 2]}
        )
    with (
        pytest.raises(ArrayError, match=r"keys\['user_id'\]: row 0: .* the int64 range"),
        client.stream_writer("unsigned") as writer,
    ):
        writer.write({"user_id": big}, NOW_US, {"x": small, "f": [1, 2]})
    got = client.get_online_features(["unsigned:x"], {"user_id": [-(2**63), -1, 7]})
    assert (got.statuses["unsigned:x"] == FeatureStatus.NOT_FOUND).all()
    fits = {"x": small, "f": [1, 2]}
    assert client.write_features("unsigned", {"user_id": small}, NOW_US, fits).written == 2
    got = client.get_online_features(["unsigned:x"], {"user_id": [5, 6]})
    assert got["unsigned:x"].tolist() == [5, 6]


def test_float64_vectors_over_float32_are_rejected_like_scalars(client) -> None:
    view = FeatureView(
        "wide_vectors",
        "user",
        (Feature("e", DType.FLOAT32_VECTOR, vector_length=2), Feature("f", DType.FLOAT32)),
    )
    client.apply([USER], [view])
    with pytest.raises(ClientError, match=r"1e\+300 overflows FLOAT32 \(largest finite"):
        client.write_features(
            "wide_vectors", {"user_id": [1]}, NOW_US, {"e": np.float32([[1, 1]]), "f": [1e300]}
        )
    with pytest.raises(
        ArrayError,
        match=r"features\['e'\]: row 1: a vector element overflows FLOAT32_VECTOR \(largest "
        r"finite 3.4028235e\+38\); send a smaller value",
    ):
        client.write_features(
            "wide_vectors", {"user_id": [1, 2]}, NOW_US, {"e": [[1, 1], [1e300, 1]], "f": [1, 2]}
        )
    got = client.get_online_features(["wide_vectors:e"], {"user_id": [1, 2]})
    assert (got.statuses["wide_vectors:e"] == FeatureStatus.NOT_FOUND).all()
    fine = np.array([[0.1, -2.5], [3e38, np.inf]])
    client.write_features("wide_vectors", {"user_id": [1, 2]}, NOW_US, {"e": fine, "f": [1, 2]})
    got = client.get_online_features(["wide_vectors:e"], {"user_id": [1, 2]})
    np.testing.assert_array_equal(got["wide_vectors:e"], fine.astype(np.float32))


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"batch_rows": 0}, r"batch_rows must be an integer >= 1 \(rows per message\), got 0"),
        ({"batch_rows": -5}, "batch_rows must be an integer >= 1 .* got -5"),
        ({"batch_rows": 2.5}, "batch_rows must be an integer >= 1 .* got 2.5"),
        ({"ack_every": 0}, r"ack_every must be an integer >= 1 \(messages per ack\), got 0"),
        ({"policy": "skip"}, "policy must be one of"),
    ],
)
def test_stream_writer_rejects_bad_arguments_when_made(target, client, arguments, message) -> None:
    with pytest.raises(ValueError, match=message):
        client.stream_writer("any", **arguments)

    async def make() -> None:
        async with AsyncFeatureStoreClient(target) as aclient:
            aclient.stream_writer("any", **arguments)

    with pytest.raises(ValueError, match=message):
        asyncio.run(make())


def test_stream_writer_without_keys_does_what_write_features_does(target, client) -> None:
    client.apply([USER], [FeatureView("keyless", "user", (Feature("a", DType.INT64),))])
    assert client.write_features("keyless", {}, NOW_US, {}).written == 0
    with client.stream_writer("keyless") as writer:
        writer.write({}, NOW_US, {})
    assert writer.summary.written == 0
    rows = {"a": np.array([1, 2])}
    times = np.array([NOW_US, NOW_US])
    with pytest.raises(ClientError) as direct:
        client.write_features("keyless", {}, times, rows)
    with pytest.raises(ClientError) as streamed, client.stream_writer("keyless") as writer:
        writer.write({}, times, rows)
    assert "user_id" in direct.value.message, direct.value
    assert direct.value.code == streamed.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert direct.value.message in streamed.value.message, streamed.value

    async def write_async() -> None:
        async with (
            AsyncFeatureStoreClient(target) as aclient,
            aclient.stream_writer("keyless") as awriter,
        ):
            await awriter.write({}, times, rows)

    with pytest.raises(ClientError, match="user_id"):
        asyncio.run(write_async())


def test_null_masks_must_name_a_feature_column(client) -> None:
    client.apply([USER], [FeatureView("masked", "user", (Feature("a", DType.INT64),))])
    with pytest.raises(ValueError, match=r"nulls\['b'\]: no feature column of that name"):
        client.write_features("masked", {"user_id": [1]}, NOW_US, {"a": [1]}, nulls={"b": [True]})


ITEM = Entity("item", (JoinKey("item_id", DType.STRING),))
MIXED = FeatureView(
    "mixed",
    "user",
    (
        Feature("f", DType.FLOAT32),
        Feature("s", DType.STRING),
        Feature("e", DType.FLOAT32_VECTOR, vector_length=3),
    ),
)


def mixed_rows(n: int) -> dict[str, object]:
    return {"f": np.ones(n, np.float32), "s": ["t"] * n, "e": np.zeros((n, 3), np.float32)}


def async_write(target: str, view: str, batch_rows: int, *write_args: object) -> None:
    """One write through the async client's stream_writer."""

    async def run() -> None:
        async with (
            AsyncFeatureStoreClient(ClientConfig(target=target, timeout_s=20)) as aclient,
            aclient.stream_writer(view, batch_rows=batch_rows) as writer,
        ):
            await writer.write(*write_args)

    asyncio.run(run())


@pytest.mark.parametrize(
    ("keys", "times", "features", "nulls", "column", "got", "rows"),
    [
        (np.arange(100, 104), NOW_US, mixed_rows(6), None, "features['f']", 6, 4),
        (np.arange(110, 114), NOW_US + np.arange(7), mixed_rows(4), None, "event_time", 7, 4),
        (np.arange(120, 126), NOW_US, mixed_rows(4), None, "features['f']", 4, 6),
        (np.arange(130, 134), NOW_US, mixed_rows(4), {"s": [False] * 3}, "nulls['s']", 3, 4),
    ],
)
def test_stream_writer_rejects_columns_of_another_length_before_sending_any(
    target, client, keys, times, features, nulls, column, got, rows
) -> None:
    """Every column must have the keys' rows: no row is dropped, shifted or half written."""
    client.apply([USER], [MIXED])
    expected = f"{column} has {got} rows, expected {rows} like keys['user_id']: one value per key"
    for batch_rows in (2, 3):
        with (
            pytest.raises(ClientError, match=re.escape(expected)) as caught,
            client.stream_writer("mixed", batch_rows=batch_rows) as writer,
        ):
            writer.write({"user_id": keys}, times, features, nulls)
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(ClientError, match=re.escape(expected)) as caught:
            async_write(target, "mixed", batch_rows, {"user_id": keys}, times, features, nulls)
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    stored = client.get_online_features(["mixed:f"], {"user_id": keys})
    assert (stored.statuses["mixed:f"] == FeatureStatus.NOT_FOUND).all()


NUL_KEYS = ["a\x00", "b\x00c", "\x00", "a"]
NUL_VALUES = ["x\x00", "y\x00z", "é\x00", "plain"]


def test_text_with_nul_characters_is_written_and_read_as_given(target, client) -> None:
    """Lists of str or bytes keep trailing NULs (NumPy's "U"/"S" dtypes would drop them)."""
    view = FeatureView("labels", "item", (Feature("s", DType.STRING),))
    client.apply([ITEM], [view])
    client.write_features("labels", {"item_id": NUL_KEYS[:2]}, NOW_US, {"s": NUL_VALUES[:2]})
    with client.stream_writer("labels", batch_rows=1) as writer:
        writer.write({"item_id": NUL_KEYS[2:3]}, NOW_US, {"s": NUL_VALUES[2:3]})
    async_write(target, "labels", 1, {"item_id": NUL_KEYS[3:]}, NOW_US, {"s": NUL_VALUES[3:]})
    got = client.get_online_features(["labels:s"], {"item_id": [*NUL_KEYS, "b"]})
    assert got["labels:s"].tolist() == [*NUL_VALUES, ""]
    assert got.statuses["labels:s"].tolist() == [1, 1, 1, 1, FeatureStatus.NOT_FOUND]
    client.write_features("labels", {"item_id": [b"k\x00"]}, NOW_US, {"s": [b"v\x00"]})
    got = client.get_online_features(["labels:s"], {"item_id": [b"k\x00", b"k"]})
    assert got["labels:s"].tolist() == ["v\x00", ""]
    assert got.statuses["labels:s"].tolist() == [1, FeatureStatus.NOT_FOUND]


def test_missing_text_is_null_where_masked_and_an_error_naming_the_row_elsewhere(client) -> None:
    client.apply([USER], [MIXED])
    ids = np.array([200, 201, 202])
    rows = mixed_rows(3) | {"s": ["a", None, pd.NA]}
    summary = client.write_features(
        "mixed", {"user_id": ids}, NOW_US, rows, nulls={"s": [False, True, True]}
    )
    assert summary.written == 3
    got = client.get_online_features(["mixed:s"], {"user_id": ids})
    assert got.statuses["mixed:s"].tolist() == [
        1,
        FeatureStatus.NULL_VALUE,
        FeatureStatus.NULL_VALUE,
    ]
    unmasked = r"features\['s'\]: row 1: None is not a str or bytes; send text \(a feature value"
    with pytest.raises(ArrayError, match=unmasked + r".*mark its row in nulls"):
        client.write_features("mixed", {"user_id": ids + 10}, NOW_US, rows, nulls={"s": [0, 0, 1]})
    with (
        pytest.raises(ArrayError, match=r"features\['s'\]: row 2: <NA> is not a str or bytes"),
        client.stream_writer("mixed") as writer,
    ):
        writer.write({"user_id": ids + 10}, NOW_US, rows, nulls={"s": [0, 1, 0]})
    number = mixed_rows(2) | {"s": np.array(["a", 5], dtype=object)}
    with pytest.raises(ArrayError, match=r"features\['s'\]: row 1: 5 is not a str or bytes"):
        client.write_features("mixed", {"user_id": ids[:2] + 10}, NOW_US, number)
    with pytest.raises(ArrayError, match=r"keys\['item_id'\]: row 1: None is not a str or bytes"):
        client.get_online_features(["labels:s"], {"item_id": ["a", None]})
    got = client.get_online_features(["mixed:s"], {"user_id": ids + 10})
    assert (got.statuses["mixed:s"] == FeatureStatus.NOT_FOUND).all()


def test_a_single_value_for_a_column_is_rejected_naming_it(target, client) -> None:
    client.apply([USER], [MIXED])
    single = r"keys\['user_id'\]: got the single value np.int64\(5\), not a column; send one"
    with pytest.raises(ArrayError, match=single):
        client.get_online_features(["mixed:f"], {"user_id": np.int64(5)})
    with pytest.raises(ArrayError, match=single):
        client.write_features("mixed", {"user_id": np.int64(5)}, NOW_US, mixed_rows(1))
    with pytest.raises(ArrayError, match=single), client.stream_writer("mixed") as writer:
        writer.write({"user_id": np.int64(5)}, NOW_US, mixed_rows(1))
    with pytest.raises(ArrayError, match=r"features\['f'\]: got the single value 1.5, not a"):
        client.write_features("mixed", {"user_id": [5]}, NOW_US, mixed_rows(1) | {"f": 1.5})
    with pytest.raises(ArrayError, match=single):
        async_write(target, "mixed", 10, {"user_id": np.int64(5)}, NOW_US, mixed_rows(1))


def test_empty_key_lists_get_an_empty_answer_whatever_the_key_type(target, client) -> None:
    client.apply(
        [USER, ITEM], [MIXED, FeatureView("labels", "item", (Feature("s", DType.STRING),))]
    )
    for ref, key in (("labels:s", "item_id"), ("mixed:e", "user_id")):
        got = client.get_online_features([ref], {key: []})
        assert got.rows == 0 and got[ref].shape[0] == 0
    assert client.write_features("labels", {"item_id": []}, NOW_US, {"s": []}).written == 0

    async def lookup() -> int:
        async with AsyncFeatureStoreClient(target) as aclient:
            return (await aclient.get_online_features(["labels:s"], {"item_id": []})).rows

    assert asyncio.run(lookup()) == 0


def test_integer_vectors_are_written_when_float32_holds_them_exactly(target, client) -> None:
    client.apply([USER], [MIXED])
    ints = np.array([[1, -2, 3], [2**24, 0, 7]])
    client.write_features("mixed", {"user_id": [300, 301]}, NOW_US, mixed_rows(2) | {"e": ints})
    got = client.get_online_features(["mixed:e"], {"user_id": [300, 301]})
    np.testing.assert_array_equal(got["mixed:e"], ints.astype(np.float32))
    inexact = r"features\['e'\]: row 1: a vector element is not exactly representable as FLOAT32"
    with pytest.raises(ArrayError, match=inexact):
        client.write_features(
            "mixed", {"user_id": [302, 303]}, NOW_US, mixed_rows(2) | {"e": ints + 1}
        )
    with pytest.raises(ArrayError, match=inexact):  # batch_rows=1: row 1 is the second message
        async_write(
            target, "mixed", 1, {"user_id": [302, 303]}, NOW_US, mixed_rows(2) | {"e": ints + 1}
        )


def test_a_closed_client_raises_the_same_error_sync_and_async(target) -> None:
    closed = "FAILED_PRECONDITION: the client was closed"
    client = FeatureStoreClient(target)
    client.close()
    errors = []
    for call in (
        lambda: client.get_online_features(["mixed:f"], {"user_id": [1]}),
        lambda: client.write_features("mixed", {"user_id": [1]}, NOW_US, {"f": [1.0]}),
        lambda: client.list_feature_views(),
    ):
        with pytest.raises(ClientError, match=closed) as caught:
            call()
        errors.append(str(caught.value))
    with pytest.raises(ClientError, match=closed), client.stream_writer("mixed") as writer:
        writer.write({"user_id": [1]}, NOW_US, {"f": [1.0]})

    async def use_closed() -> list[str]:
        aclient = AsyncFeatureStoreClient(target)
        await aclient.close()
        out = []
        for call in (
            aclient.get_online_features(["mixed:f"], {"user_id": [1]}),
            aclient.write_features("mixed", {"user_id": [1]}, NOW_US, {"f": [1.0]}),
            aclient.list_feature_views(),
        ):
            with pytest.raises(ClientError, match=closed) as caught:
                await call
            out.append(str(caught.value))
        with pytest.raises(ClientError, match=closed):
            async with aclient.stream_writer("mixed") as awriter:
                await awriter.write({"user_id": [1]}, NOW_US, {"f": [1.0]})
        return out

    assert asyncio.run(use_closed()) == errors


def test_event_times_int64_microseconds_cannot_hold_are_rejected_not_wrapped(client) -> None:
    """datetime64[s] 18448448227310 (year 586578) was written as 2024-01-02: the cast to µs
    wrapped round int64."""
    client.apply([USER], [FeatureView("far_times", "user", (Feature("a", DType.INT64),))])
    times = np.array([1704153600, 18448448227310, 1704153600], "datetime64[s]")
    rows = ({"user_id": [1, 2, 3]}, times, {"a": [1, 2, 3]})
    bad = r"event_time: row 1: 586578-01-19T08:01:50 is outside what int64 µs since the epoch"
    with pytest.raises(ArrayError, match=bad):
        client.write_features("far_times", *rows)
    with pytest.raises(ArrayError, match=bad), client.stream_writer("far_times") as writer:
        writer.write(*rows)
    with pytest.raises(ArrayError, match=r"event_time: row 0: -400000 is outside"):
        client.write_features("far_times", *rows[:1], np.datetime64("-400000", "Y"), rows[2])
    got = client.get_online_features(["far_times:a"], {"user_id": [1, 2, 3]})
    assert (got.statuses["far_times:a"] == FeatureStatus.NOT_FOUND).all()
    days = np.array(["2024-01-02"] * 3, "datetime64[D]")
    assert client.write_features("far_times", rows[0], days, rows[2]).written == 3
    got = client.get_online_features(["far_times:a"], {"user_id": [1, 2, 3]})
    assert (got.event_timestamps["far_times"] == 1704153600 * 10**6).all()


def test_calls_in_flight_when_the_async_client_closes_raise_client_error_cancelled(
    target, client
) -> None:
    """They raised a bare CancelledError (a TaskGroup or gather took it for a cancel), and a
    stream write pending at close() waited for timeout_s; the sync twin raises ClientError."""
    client.apply([USER], [MIXED])
    ids = np.arange(200_000)
    config = ClientConfig(target=target, timeout_s=30)

    def closed_midway(work, settle):
        return raised_when_closed_midway(AsyncFeatureStoreClient(config), work, settle)

    async def get(aclient) -> None:
        await aclient.get_online_features(["mixed:f"], {"user_id": ids})

    flushing = []

    async def stream(aclient, messages: int) -> None:
        async with aclient.stream_writer("mixed", batch_rows=100) as writer:
            for _ in range(0, messages, 10):
                await writer.write({"user_id": ids[:1000]}, NOW_US, mixed_rows(1000))
            flushing.append(True)
            await writer.flush()

    def after_turns(turns: int):
        """A settle() that is true after `turns` more turns of the event loop."""
        left = iter(range(turns))
        return lambda: next(left, None) is None

    started = time.monotonic()

    async def main() -> list[BaseException]:
        errors = [await closed_midway(get, after_turns(0))]
        # a send pending at close() never finished in grpc.aio: it waited for timeout_s
        errors.append(await closed_midway(lambda c: stream(c, 10), after_turns(1)))
        writing = asyncio.create_task(asyncio.sleep(0.05))
        errors.append(await closed_midway(lambda c: stream(c, 10_000), writing.done))
        flushing.clear()
        errors.append(await closed_midway(lambda c: stream(c, 10), lambda: bool(flushing)))
        # the caller's own cancel is still a cancel, even when the client closes meanwhile
        aclient = AsyncFeatureStoreClient(config)
        task = asyncio.create_task(get(aclient))
        await asyncio.sleep(0)
        task.cancel()
        await aclient.close()
        with pytest.raises(asyncio.CancelledError):
            await task
        return errors

    errors = asyncio.run(main())
    assert time.monotonic() - started < 10
    for error in errors:  # get, stream writes, stream flush
        assert isinstance(error, ClientError), errors
        assert error.code == grpc.StatusCode.CANCELLED, errors
        assert "the client was closed while this call was in flight" in error.message


def test_a_sync_stream_writer_whose_client_closes_says_so(target, client) -> None:
    """It raised gRPC's own "CANCELLED: Channel closed!" where every other call says the client
    was closed while the call was in flight."""
    client.apply([USER], [MIXED])
    ids = np.arange(1000)
    writes = FeatureStoreClient(ClientConfig(target=target, timeout_s=30))
    for end in ("write", "flush"):
        writer = writes.stream_writer("mixed", batch_rows=100)
        writer.write({"user_id": ids}, NOW_US, mixed_rows(1000))
        writes.close()
        with pytest.raises(ClientError) as info:
            if end == "write":
                for _ in range(100):
                    writer.write({"user_id": ids}, NOW_US, mixed_rows(1000))
            writer.flush()
        assert info.value.code == grpc.StatusCode.CANCELLED
        assert "the client was closed while this call was in flight" in info.value.message
        writes = FeatureStoreClient(ClientConfig(target=target, timeout_s=30))
    writes.close()


def service_views(prefix: str) -> tuple[FeatureView, FeatureView, FeatureView]:
    """`{prefix}_stats` (clicks, country) and `{prefix}_profile` at versions 1 and 2 (age)."""
    stats_features = (Feature("clicks", DType.FLOAT32), Feature("country", DType.STRING))
    stats = FeatureView(f"{prefix}_stats", "user", stats_features)
    profile = FeatureView(f"{prefix}_profile", "user", (Feature("age", DType.INT64),), version=1)
    return stats, profile, dataclasses.replace(profile, version=2)


def service_rows(prefix: str) -> list[tuple[str, int, dict[str, np.ndarray]]]:
    """(view, version, features) of users 1 and 2 (3 is never written): profile v1 and v2 hold
    different ages."""
    stats = {"clicks": np.float32([1.5, 2.5]), "country": np.array(["fr", "no"], dtype=object)}
    return [
        (f"{prefix}_stats", 0, stats),
        (f"{prefix}_profile", 1, {"age": np.array([31, 32])}),
        (f"{prefix}_profile", 2, {"age": np.array([41, 42])}),
    ]


def assert_same_lookup(by_service, by_refs, renamed: dict[str, str]) -> None:
    """by_service holds by_refs' columns (renamed: reference key -> service key), values,
    statuses and event times alike."""
    assert sorted(by_service.values) == sorted(renamed.values())
    for ref_name, name in renamed.items():
        np.testing.assert_array_equal(by_service[name], by_refs[ref_name])
        np.testing.assert_array_equal(by_service.statuses[name], by_refs.statuses[ref_name])
        ref_view, view = ref_name.split(":")[0], name.split(":")[0]
        np.testing.assert_array_equal(
            by_service.event_timestamps[view], by_refs.event_timestamps[ref_view]
        )


def test_feature_services_round_trip_sync(client) -> None:
    stats, profile, profile2 = service_views("sync_svc")
    fraud = FeatureService(
        "sync_svc_fraud", ("sync_svc_stats:clicks", "sync_svc_profile@1"), "fraud", "risk"
    )
    other = FeatureService("sync_svc_other", ("sync_svc_stats",), tags={"tier": "1"})
    results = client.apply([USER], [stats, profile], feature_services=[fraud, other])
    assert [(r.view, r.version, r.feature_service, r.action) for r in results] == [
        ("sync_svc_stats", 1, "", "created"),
        ("sync_svc_profile", 1, "", "created"),
        ("", 0, "sync_svc_fraud", "created"),
        ("", 0, "sync_svc_other", "created"),
    ]
    client.apply([USER], [profile2])
    ids = np.array([2, 1, 3], dtype=np.int64)
    for view, version, features in service_rows("sync_svc"):
        client.write_features(view, {"user_id": [1, 2]}, NOW_US, features, version=version)

    assert client.list_feature_services("sync_svc_") == [fraud, other]
    assert client.list_feature_services("sync_svc_o") == [other]
    got = client.get_feature_service("sync_svc_fraud")
    assert got == fraud and got.owner == "risk" and got.created_us == got.updated_us > 0

    by_refs = client.get_online_features(
        ["sync_svc_stats:clicks", "sync_svc_profile@1:age"], {"user_id": ids}
    )
    by_name = client.get_online_features(keys={"user_id": ids}, feature_service="sync_svc_fraud")
    by_object = client.get_online_features(None, {"user_id": ids}, feature_service=got)
    renamed = {
        "sync_svc_stats:clicks": "sync_svc_stats:clicks",
        "sync_svc_profile@1:age": "sync_svc_profile:age",  # the service pins v1
    }
    for found in (by_name, by_object):
        assert_same_lookup(found, by_refs, renamed)
        assert found.versions == {"sync_svc_stats": 1, "sync_svc_profile": 1}
    assert by_name["sync_svc_profile:age"][:2].tolist() == [32, 31]  # v1, not the latest
    statuses = by_name.statuses["sync_svc_stats:clicks"].tolist()
    assert statuses == [FeatureStatus.PRESENT] * 2 + [FeatureStatus.NOT_FOUND]

    with pytest.raises(ClientError) as refused:
        client.delete_feature_view("sync_svc_profile", 1)
    assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "would break feature service 'sync_svc_fraud'" in refused.value.message
    client.delete_feature_service("sync_svc_fraud")
    assert client.list_feature_services("sync_svc_") == [other]
    for call in (
        lambda: client.get_feature_service("sync_svc_fraud"),
        lambda: client.get_online_features(keys={"user_id": ids}, feature_service="sync_svc_fraud"),
        lambda: client.delete_feature_service("sync_svc_fraud"),
    ):
        with pytest.raises(ClientError) as missing:
            call()
        assert missing.value.code == grpc.StatusCode.NOT_FOUND
        assert "feature service 'sync_svc_fraud' is not registered" in missing.value.message
    client.delete_feature_view("sync_svc_profile", 1)  # no service reads it now


def test_feature_services_round_trip_async(target) -> None:
    stats, profile, profile2 = service_views("async_svc")
    model = FeatureService("async_svc_model", ("async_svc_stats", "async_svc_profile:age"))
    ids = np.array([1, 2, 3], dtype=np.int64)

    async def run():
        async with AsyncFeatureStoreClient(ClientConfig(target=target, timeout_s=20)) as c:
            applied = await c.apply([USER], [stats, profile, profile2], feature_services=[model])
            for view, version, features in service_rows("async_svc"):
                await c.write_features(view, {"user_id": [1, 2]}, NOW_US, features, version=version)
            listed = await c.list_feature_services("async_svc")
            got = await c.get_feature_service("async_svc_model")
            by_refs = await c.get_online_features(
                ["async_svc_stats", "async_svc_profile:age"], {"user_id": ids}
            )
            by_name = await c.get_online_features(
                keys={"user_id": ids}, feature_service="async_svc_model"
            )
            by_object = await c.get_online_features(keys={"user_id": ids}, feature_service=got)
            await c.delete_feature_service("async_svc_model")
            with pytest.raises(ClientError) as missing:
                await c.get_online_features(keys={"user_id": ids}, feature_service=model)
            return applied, listed, got, by_refs, by_name, by_object, missing.value

    applied, listed, got, by_refs, by_name, by_object, missing = asyncio.run(run())
    assert [(r.feature_service, r.action) for r in applied][-1] == ("async_svc_model", "created")
    assert listed == [model] and got == model and got.created_us > 0
    names = ["async_svc_stats:clicks", "async_svc_stats:country", "async_svc_profile:age"]
    for found in (by_name, by_object):
        assert_same_lookup(found, by_refs, {name: name for name in names})
        assert found.versions == {"async_svc_stats": 1, "async_svc_profile": 2}
    assert by_name["async_svc_profile:age"][:2].tolist() == [41, 42]  # the latest, v2
    assert missing.code == grpc.StatusCode.NOT_FOUND


def test_features_and_feature_service_are_exclusive(target, client) -> None:
    stats, _, _ = service_views("both_svc")
    service = FeatureService("both_svc_model", ("both_svc_stats",))
    client.apply([USER], [stats], feature_services=[service])
    keys = {"user_id": [1]}
    for features, feature_service, got in (
        (["both_svc_stats"], "both_svc_model", "both"),
        (None, None, "neither"),
    ):
        with pytest.raises(ValueError) as info:
            client.get_online_features(features, keys, feature_service=feature_service)
        assert "features" in str(info.value) and "feature_service" in str(info.value)
        assert str(info.value).endswith(f"got {got}")
    request = pb.GetOnlineFeaturesRequest(
        entity_keys=[fm.key_columns(keys)[0]],
        features=["both_svc_stats"],
        feature_service="both_svc_model",
    )
    with grpc.insecure_channel(target) as channel, pytest.raises(grpc.RpcError) as refused:
        pb_grpc.FeatureStoreStub(channel).GetOnlineFeatures(request, timeout=20)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "send one or the other" in refused.value.details()
    with pytest.raises(ClientError) as unknown:
        client.get_online_features(keys=keys, feature_service="both_svc_modle")
    assert unknown.value.code == grpc.StatusCode.NOT_FOUND
    assert "did you mean 'both_svc_model'" in unknown.value.message


def test_feature_service_slips_raise_before_anything_is_sent(client) -> None:
    """A service given where a list belongs, references as one string, non-text tags: each a
    TypeError naming the argument before any call (the string went as one reference per
    character). A FeatureService stands for its name in get, delete and lookups (Feast passes
    the service as `features`)."""
    stats, _, _ = service_views("slip_svc")
    service = FeatureService("slip_svc_model", ("slip_svc_stats:clicks",))
    for kwargs, message in (
        ({"feature_services": service}, "feature_services: give a list of FeatureService"),
        ({"feature_services": ["slip_svc_model"]}, r"feature_services\[0\]: expected a Feature"),
        (
            {"feature_services": [FeatureService("slip_svc_x", "slip_svc_stats:clicks")]},
            "features is the str 'slip_svc_stats:clicks'; give a list of references",
        ),
        (
            {"feature_services": [FeatureService("slip_svc_x", ("a",), tags={"t": 1})]},
            r"tags\['t'\] = 1; tags map str to str",
        ),
    ):
        with pytest.raises(TypeError, match=message):
            client.apply([USER], [stats], **kwargs)
    assert client.list_feature_services("slip_svc") == []
    client.apply([USER], [stats], feature_services=[service])
    assert client.get_feature_service(service).features == ("slip_svc_stats:clicks",)
    client.write_features(
        "slip_svc_stats", {"user_id": [1]}, 5, {"clicks": [2.5], "country": ["x"]}
    )
    got = client.get_online_features(service, {"user_id": [1]})
    assert got["slip_svc_stats:clicks"].tolist() == [2.5]
    client.delete_feature_service(service)
    assert client.list_feature_services("slip_svc") == []
