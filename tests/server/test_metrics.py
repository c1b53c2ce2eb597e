"""Metrics: the interceptor over a real grpc.aio server (unary and streaming, every outcome), the
hot-path recorders, the vectorised histogram, and a real server's /metrics scraped over HTTP."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
import urllib.request
import warnings
from pathlib import Path

import grpc
import numpy as np
from prometheus_client import REGISTRY, CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from clients.channel import ClientConfig, ClientError
from clients.feature_client import FeatureStoreClient
from featurestore.dtypes import DType
from featurestore.registry import Entity, Feature, FeatureView, JoinKey
from protos.featureserve.v1 import feature_store_pb2 as pb
from protos.featureserve.v1 import feature_store_pb2_grpc as pb_grpc
from protos.featureserve.v1 import prediction_pb2, prediction_pb2_grpc
from server.handler_wrapping import InterceptingRegistrar
from server.metrics import (
    AGE_BUCKETS,
    ModelMetrics,
    ViewMetrics,
    add_to_histogram,
    serve_metrics,
)
from server.metrics_interceptor import MetricsInterceptor
from tests.conftest import free_port, wait_until

FS = "featureserve.v1.FeatureStore/"


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    """Every sample of a /metrics page, keyed by name and labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def key(name: str, **labels: str) -> tuple[str, frozenset]:
    return name, frozenset(labels.items())


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


class Views(pb_grpc.FeatureStoreServicer):
    """GetFeatureView answers by name: ok, missing (NOT_FOUND), crash (unhandled error)."""

    async def GetFeatureView(self, request, context):
        if request.name == "missing":
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such view")
        if request.name == "crash":
            raise RuntimeError("bug")
        if request.name == "slow":
            await asyncio.sleep(5)
        return pb.FeatureView(name=request.name)

    async def StreamWriteFeatures(self, request_iterator, context):
        rows = 0
        async for _ in request_iterator:
            rows += 1
        return pb.WriteFeaturesResponse(rows_written=rows)


class Echo(prediction_pb2_grpc.PredictionServicer):
    async def StreamPredict(self, request_iterator, context):
        async for request in request_iterator:
            yield prediction_pb2.PredictResponse(request_id=request.request_id)


async def exercise_interceptor() -> int:
    interceptor = MetricsInterceptor()
    server = grpc.aio.server()
    registrar = InterceptingRegistrar(server, [interceptor])
    pb_grpc.add_FeatureStoreServicer_to_server(Views(), registrar)
    prediction_pb2_grpc.add_PredictionServicer_to_server(Echo(), registrar)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        views = pb_grpc.FeatureStoreStub(channel)
        for name, code in [("a", None), ("missing", "NOT_FOUND"), ("crash", "UNKNOWN")]:
            try:
                await views.GetFeatureView(pb.GetFeatureViewRequest(name=name))
            except grpc.aio.AioRpcError as exc:
                assert exc.code().name == code
        try:
            await views.GetFeatureView(pb.GetFeatureViewRequest(name="slow"), timeout=0.2)
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        reply = await views.StreamWriteFeatures(iter([pb.WriteFeaturesRequest()] * 3))
        assert reply.rows_written == 3
        predictions = prediction_pb2_grpc.PredictionStub(channel)
        requests = [prediction_pb2.PredictRequest(request_id=str(i)) for i in range(4)]
        ids = [r.request_id async for r in predictions.StreamPredict(iter(requests))]
        assert ids == ["0", "1", "2", "3"]
    await asyncio.sleep(0.1)
    await server.stop(0)
    return interceptor.count


def test_interceptor_counts_every_method_and_status_code() -> None:
    """Unary OK / abort / crash / deadline, client-streaming and bidi calls all land in the
    counters with their status, and in the duration histogram of their method."""
    get = FS + "GetFeatureView"
    codes = ["OK", "NOT_FOUND", "UNKNOWN", "DEADLINE_EXCEEDED"]
    before = {c: value("featureserve_rpc_requests_total", method=get, code=c) for c in codes}
    calls = asyncio.run(exercise_interceptor())
    assert calls == 6
    for code in codes:
        after = value("featureserve_rpc_requests_total", method=get, code=code)
        assert after - before[code] == 1, code
    stream = value("featureserve_rpc_requests_total", method=FS + "StreamWriteFeatures", code="OK")
    bidi = value(
        "featureserve_rpc_requests_total",
        method="featureserve.v1.Prediction/StreamPredict",
        code="OK",
    )
    assert stream >= 1 and bidi >= 1
    assert value("featureserve_rpc_duration_seconds_count", method=get) >= 4
    # The deadline-exceeded call is timed until its deadline: grpc-timeout carries the time left
    # when the request was sent, a little under 0.2 s; the other three calls take milliseconds.
    assert value("featureserve_rpc_duration_seconds_sum", method=get) > 0.15


def test_vectorised_histogram_equals_one_observe_per_value() -> None:
    """add_to_histogram fills the same buckets and sum as observe() in a loop, bounds included."""
    registry = CollectorRegistry()
    fast = Histogram("fast", "x", buckets=AGE_BUCKETS, registry=registry)
    slow = Histogram("slow", "x", buckets=AGE_BUCKETS, registry=registry)
    rng = np.random.default_rng(3)
    ages = np.concatenate([rng.exponential(2000.0, 5000), np.array(AGE_BUCKETS, float), [0.0]])
    add_to_histogram(fast, ages)
    for age in ages:
        slow.observe(age)
    for bound in [*AGE_BUCKETS, float("inf")]:
        le = str(float(bound)) if bound != float("inf") else "+Inf"
        got = registry.get_sample_value("fast_bucket", {"le": le})
        assert got == registry.get_sample_value("slow_bucket", {"le": le}), le
    assert np.isclose(registry.get_sample_value("fast_sum"), registry.get_sample_value("slow_sum"))
    assert registry.get_sample_value("fast_count") == len(ages)


def test_model_and_view_recorders_move_their_families() -> None:
    """The pre-bound recorders the batcher and the store servicer call."""
    model = ModelMetrics("recorder_model", 3)
    model.observe_batch(requests=5, rows=30, batch_rows=40, queue_s=0.002, compute_s=0.0005)
    model.fail("rejected", 2)
    model.fail("timed_out")
    model.fail("cancelled")
    model.queue_depth(7)
    labels = {"model": "recorder_model", "version": "3"}
    assert value("featureserve_model_requests_total", **labels) == 5
    assert value("featureserve_model_rows_total", **labels) == 30
    assert value("featureserve_model_batch_rows_bucket", le="64.0", **labels) == 1
    assert value("featureserve_model_batch_rows_bucket", le="32.0", **labels) == 0
    assert value("featureserve_model_queue_duration_seconds_sum", **labels) == 0.002
    assert value("featureserve_model_failures_total", reason="rejected", **labels) == 2
    assert value("featureserve_model_failures_total", reason="timed_out", **labels) == 1
    assert value("featureserve_model_failures_total", reason="cancelled", **labels) == 1
    assert value("featureserve_model_queue_depth", **labels) == 7

    view = ViewMetrics("recorder_view")
    view.observe_write(written=10, stale=2, rejected=1)
    view.observe_lookup(hits=8, misses=3, expired=1)
    view.observe_ages(np.array([0.5, 30.0, 7200.0]))
    view.store_bytes(4096, 8192)
    assert value("featureserve_view_rows_written_total", view="recorder_view") == 10
    assert value("featureserve_view_rows_stale_total", view="recorder_view") == 2
    assert value("featureserve_view_lookup_rows_total", view="recorder_view", result="miss") == 3
    assert value("featureserve_view_value_age_seconds_bucket", view="recorder_view", le="60.0") == 2
    assert value("featureserve_view_value_age_seconds_count", view="recorder_view") == 3
    assert value("featureserve_view_store_bytes", view="recorder_view") == 4096
    assert value("featureserve_view_history_bytes", view="recorder_view") == 8192


def test_metrics_endpoint_serves_this_process_registry() -> None:
    """serve_metrics answers GET /metrics with the text format, including process metrics."""
    ModelMetrics("http_model", 1).observe_batch(1, 4, 4, 0.001, 0.001)
    samples = scrape(serve_metrics("127.0.0.1", 0))
    assert samples[key("featureserve_model_rows_total", model="http_model", version="1")] == 4
    assert samples[key("process_cpu_seconds_total")] > 0


WORKER_SERIES = """
from server.metrics import FEATURE_PSI, RPC_REQUESTS, VIEW_ROWS_WRITTEN
for view in ("kept", "gone"):
    VIEW_ROWS_WRITTEN.labels(view).inc()
for feature in ("x", "dropped"):
    FEATURE_PSI.labels("kept", feature).set(0.5)
RPC_REQUESTS.labels("m", "OK").inc()
"""


def test_a_groups_scrape_keeps_registered_views_and_is_whole_while_no_store_reads(
    tmp_path,
) -> None:
    """The merged scrape of --workers reads the registry each time: it keeps only the samples
    of registered views and the drift of their features, and serves every sample while the
    registry cannot be read (no store yet) rather than failing /metrics."""
    from featurestore.online_store import OnlineStore, StoreConfig
    from featurestore.registry import RegistryReader
    from server.metrics import MULTIPROC_ENV, scrape_registry

    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    env = {**os.environ, MULTIPROC_ENV: str(metrics_dir)}
    subprocess.run([sys.executable, "-c", WORKER_SERIES], env=env, check=True)
    registry = scrape_registry(metrics_dir, RegistryReader(tmp_path / "data").view_features)

    def samples() -> set[tuple[str, frozenset]]:
        text = generate_latest(registry).decode()
        return {
            (s.name, frozenset(s.labels.items()))
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    rows = "featureserve_view_rows_written_total"
    psi = "featureserve_feature_psi"
    every = {
        key(rows, view="kept"),
        key(rows, view="gone"),
        key(psi, view="kept", feature="x"),
        key(psi, view="kept", feature="dropped"),
        key("featureserve_rpc_requests_total", method="m", code="OK"),
    }
    assert samples() >= every
    with OnlineStore(StoreConfig(tmp_path / "data")) as store:
        user = Entity("user", (JoinKey("user_id", DType.INT64),))
        store.registry.apply([user], [FeatureView("kept", "user", (Feature("x", DType.FLOAT32),))])
    assert samples() & every == every - {
        key(rows, view="gone"),
        key(psi, view="kept", feature="dropped"),
    }


def test_a_groups_scrape_reads_a_folder_whose_path_holds_glob_characters(tmp_path) -> None:
    """A $TMPDIR with `[`, `*` or `?` in it: prometheus_client globbed the folder's path itself,
    so the merged /metrics of a --workers group was empty."""
    from server.metrics import MULTIPROC_ENV, scrape_registry

    metrics_dir = tmp_path / "t[1]*?" / "metrics"
    metrics_dir.mkdir(parents=True)
    env = {**os.environ, MULTIPROC_ENV: str(metrics_dir)}
    subprocess.run([sys.executable, "-c", WORKER_SERIES], env=env, check=True)
    text = generate_latest(scrape_registry(metrics_dir)).decode()
    assert 'featureserve_view_rows_written_total{view="kept"} 1.0' in text


def test_real_server_metrics_scrape_moves_with_traffic(server_factory) -> None:
    """A `featureserve serve --metrics-port` process: its scrape shows RPC counts by method and
    code, latency, and the per-process gauges, and they move with traffic."""
    port = free_port()
    server = server_factory("--metrics-port", str(port))
    with FeatureStoreClient(ClientConfig(target=server.target, timeout_s=10)) as client:
        for _ in range(3):
            client.list_feature_views()
        try:
            client.get_feature_view("no_such_view")
        except ClientError as exc:
            assert exc.code == grpc.StatusCode.NOT_FOUND
    listed = key("featureserve_rpc_requests_total", method=FS + "ListFeatureViews", code="OK")
    missing = key("featureserve_rpc_requests_total", method=FS + "GetFeatureView", code="NOT_FOUND")
    assert wait_until(lambda: scrape(port).get(listed) == 3)
    samples = scrape(port)
    assert samples[missing] == 1
    assert (
        samples[key("featureserve_rpc_duration_seconds_count", method=FS + "ListFeatureViews")] == 3
    )
    assert wait_until(lambda: scrape(port).get(key("featureserve_process_rpcs"), 0) >= 4)
    assert samples[key("featureserve_process_resident_memory_bytes")] > 10e6
    assert samples[key("featureserve_process_cpu_seconds")] > 0
    assert samples[key("process_cpu_seconds_total")] > 0


def test_a_stream_whose_deadline_passes_while_the_server_reads_counts_deadline_exceeded(
    server_factory,
) -> None:
    """The deadlines of StreamWriteFeatures calls pass while the server waits for their next
    message: grpc.aio either cancels the handler (or sees the client's cancel first) or ends
    its request stream as if half-closed and the handler returns its counts. None is counted
    OK: the clients were answered DEADLINE_EXCEEDED."""
    from clients import feature_messages as fm

    port = free_port()
    server = server_factory("--metrics-port", str(port))
    user = Entity("user", (JoinKey("user_id", DType.INT64),))
    view = FeatureView("profile", "user", (Feature("score", DType.FLOAT32),))
    now = int(time.time() * 1e6)
    first = fm.write_request("profile", {"user_id": np.arange(3)}, now, {"score": np.ones(3)})
    DEADLINE_EXCEEDED = grpc.StatusCode.DEADLINE_EXCEEDED

    def stalls():
        yield first
        time.sleep(1.5)

    with FeatureStoreClient(ClientConfig(target=server.target, timeout_s=10)) as client:
        client.apply([user], [view])
        stub = pb_grpc.FeatureStoreStub(client._channel)
        calls = [stub.StreamWriteFeatures.future(stalls(), timeout=0.5) for _ in range(24)]
        assert [call.exception().code() for call in calls] == [DEADLINE_EXCEEDED] * 24
    codes = ("OK", "DEADLINE_EXCEEDED", "CANCELLED")
    counted = {
        code: key("featureserve_rpc_requests_total", method=FS + "StreamWriteFeatures", code=code)
        for code in codes
    }

    def by_code() -> dict[str, float]:
        samples = scrape(port)
        return {code: samples.get(counted[code], 0) for code in codes}

    assert wait_until(lambda: sum(by_code().values()) == 24)
    assert by_code()["OK"] == 0


def test_view_model_and_drift_families_move_with_real_traffic(tmp_path, server_factory) -> None:
    """Writes (unary and streamed), lookups and inferences on a real server move the per-view,
    per-model and drift families (ages and drift are sampled from the first block of a view
    on)."""
    from benchmarks.model_zoo import mlp_model, write_model
    from protos.inference import grpc_service_pb2 as ipb
    from protos.inference import grpc_service_pb2_grpc as ipb_grpc

    write_model(tmp_path / "models", "mlp", mlp_model())
    port = free_port()
    server = server_factory("--metrics-port", str(port), model_repo=tmp_path / "models")
    user = Entity("user", (JoinKey("user_id", DType.INT64),))
    view = FeatureView("stats", "user", (Feature("x", DType.FLOAT32),))
    now = int(time.time() * 1e6)
    rng = np.random.default_rng(0)
    with FeatureStoreClient(ClientConfig(target=server.target, timeout_s=10)) as client:
        client.apply([user], [view])
        for i in range(20):
            ids = np.arange(i * 100, i * 100 + 100)
            client.write_features("stats", {"user_id": ids}, now, {"x": rng.normal(size=100)})
        with client.stream_writer("stats", batch_rows=100) as writer:
            ids = np.arange(3000, 3500)
            writer.write({"user_id": ids}, now, {"x": rng.normal(size=500)})
            writer.write({"user_id": ids[:100]}, now, {"x": rng.normal(size=100)})
        for _ in range(40):
            client.get_online_features(["stats:x"], {"user_id": rng.integers(0, 2500, 100)})
    with grpc.insecure_channel(server.target) as channel:
        stub = ipb_grpc.GRPCInferenceServiceStub(channel)
        x = np.ones((3, 32), np.float32)
        request = ipb.ModelInferRequest(model_name="mlp", raw_input_contents=[x.tobytes()])
        request.inputs.add(name="x", datatype="FP32", shape=[3, 32])
        stub.ModelInfer(request)
    samples = scrape(port)
    assert samples[key("featureserve_view_rows_written_total", view="stats")] == 2500
    assert samples[key("featureserve_view_rows_stale_total", view="stats")] == 100
    hits = samples[key("featureserve_view_lookup_rows_total", view="stats", result="hit")]
    misses = samples[key("featureserve_view_lookup_rows_total", view="stats", result="miss")]
    assert hits + misses == 4000 and hits > 0 and misses > 0
    assert samples[key("featureserve_view_value_age_seconds_count", view="stats")] > 0
    assert samples[key("featureserve_view_store_bytes", view="stats")] >= 4096
    assert samples[key("featureserve_view_history_bytes", view="stats")] >= 4096
    assert key("featureserve_feature_psi", view="stats", feature="x") in samples
    assert samples[key("featureserve_model_rows_total", model="mlp", version="1")] == 3
    assert samples[key("featureserve_model_batch_rows_count", model="mlp", version="1")] == 1
    dashboard = Path(__file__).parents[2] / "ops" / "grafana" / "featureserve.json"
    charted = set(re.findall(r"featureserve_[a-z_]+", dashboard.read_text()))
    assert len(charted) >= 15
    assert charted - {name for name, _ in samples} == set()  # every chart has a series to show


def test_view_observer_samples_the_first_lookup_block_then_every_256th(tmp_path) -> None:
    """Ages (and drift) come from the first lookup block and every LOOKUP_SAMPLE_EVERY-th after
    it, so a sampled block's cost stays out of the lookup p99."""
    from featurestore.online_store import OnlineStore, StoreConfig, WriteBatch
    from server.feature_servicer import LOOKUP_SAMPLE_EVERY, ViewObserver

    view = FeatureView("sampled_view", "user", (Feature("x", DType.FLOAT32),))
    now = int(time.time() * 1e6)
    with OnlineStore(StoreConfig(tmp_path / "data")) as store:
        store.registry.apply([Entity("user", (JoinKey("user_id", DType.INT64),))], [view])
        ids = np.array([1, 2])
        store.write(WriteBatch("sampled_view", {"user_id": ids}, np.full(2, now), {"x": ids}))
        result = store.read("sampled_view", {"user_id": np.array([1, 2, 3])}, now_us=now)
    observer = ViewObserver("sampled_view")
    ages = "featureserve_view_value_age_seconds_count"
    observer.lookup(result, now)
    assert value(ages, view="sampled_view") == 2
    for _ in range(LOOKUP_SAMPLE_EVERY - 1):
        observer.lookup(result, now)
    assert value(ages, view="sampled_view") == 2
    observer.lookup(result, now)
    assert value(ages, view="sampled_view") == 4
    assert value("featureserve_view_lookup_rows_total", view="sampled_view", result="hit") == (
        2 * (LOOKUP_SAMPLE_EVERY + 1)
    )


def view_series(samples: dict[tuple[str, frozenset], float], view: str) -> dict:
    """The samples of a scrape labelled with one view."""
    return {k: v for k, v in samples.items() if ("view", view) in k[1]}


def test_deleting_a_views_last_version_removes_its_series_and_recreating_starts_clean(
    server_factory,
) -> None:
    """Once a view's last version is deleted none of its series are left (cycling temporary
    views used to add ~21 series each for good); a view re-created under the name records again,
    from zero, and other views keep theirs."""
    port = free_port()
    server = server_factory("--metrics-port", str(port))
    user = Entity("user", (JoinKey("user_id", DType.INT64),))
    now = int(time.time() * 1e6)
    ids = np.arange(100)
    with FeatureStoreClient(ClientConfig(target=server.target, timeout_s=10)) as client:
        client.apply(
            [user],
            [
                FeatureView(name, "user", (Feature("x", DType.FLOAT32),))
                for name in ("gone", "kept")
            ],
        )
        for name in ("gone", "kept"):
            client.write_features(name, {"user_id": ids}, now, {"x": np.ones(100)})
            client.get_online_features([f"{name}:x"], {"user_id": ids})
        before = scrape(port)
        assert len(view_series(before, "gone")) > 20
        assert before[key("featureserve_feature_psi", view="gone", feature="x")] == 0
        client.delete_feature_view("gone", 1)
        assert view_series(scrape(port), "gone") == {}
        assert view_series(scrape(port), "kept") == view_series(before, "kept")

        client.apply([], [FeatureView("gone", "user", (Feature("x", DType.FLOAT32),))])
        client.write_features("gone", {"user_id": ids[:30]}, now, {"x": np.ones(30)})
        client.get_online_features(["gone:x"], {"user_id": ids[:10]})
    samples = scrape(port)
    assert samples[key("featureserve_view_rows_written_total", view="gone")] == 30
    assert samples[key("featureserve_view_lookup_rows_total", view="gone", result="hit")] == 10
    assert samples[key("featureserve_view_value_age_seconds_count", view="gone")] == 10
    assert samples[key("featureserve_view_store_bytes", view="gone")] >= 4096
    assert samples[key("featureserve_view_history_bytes", view="gone")] >= 4096
    assert key("featureserve_feature_psi", view="gone", feature="x") in samples


def test_deleting_one_version_drops_only_what_that_version_alone_had(server_factory) -> None:
    """While other versions remain the view keeps its series; the drift of a feature only the
    deleted version had goes, and a size taken from that version is replaced by the latest
    remaining version's (0: it holds no rows)."""
    port = free_port()
    server = server_factory("--metrics-port", str(port))
    user = Entity("user", (JoinKey("user_id", DType.INT64),))
    both = (Feature("x", DType.FLOAT32), Feature("y", DType.FLOAT32))
    now = int(time.time() * 1e6)
    ids = np.arange(100)
    with FeatureStoreClient(ClientConfig(target=server.target, timeout_s=10)) as client:
        client.apply([user], [FeatureView("multi", "user", both)])
        client.apply([], [FeatureView("multi", "user", both[:1], version=2)])
        features = {"x": np.ones(100), "y": np.ones(100)}
        client.write_features("multi", {"user_id": ids}, now, features, version=1)
        psi_y = key("featureserve_feature_psi", view="multi", feature="y")
        size = key("featureserve_view_store_bytes", view="multi")
        before = scrape(port)
        assert psi_y in before and before[size] >= 4096
        client.delete_feature_view("multi", 1)
    samples = scrape(port)
    assert psi_y not in samples
    assert key("featureserve_feature_psi", view="multi", feature="x") in samples
    assert samples[key("featureserve_view_rows_written_total", view="multi")] == 100
    assert samples[size] == 0


def test_forgetting_label_values_across_workers_is_a_silent_no_op(monkeypatch, tmp_path) -> None:
    """prometheus_client cannot remove a label set from the workers' shared files and only
    warns (a line of non-JSON on the server's stderr), so forget() leaves them alone there."""
    from server.metrics import MULTIPROC_ENV, VIEW_ROWS_WRITTEN, forget

    VIEW_ROWS_WRITTEN.labels("shared_view").inc()
    monkeypatch.setenv(MULTIPROC_ENV, str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        forget(VIEW_ROWS_WRITTEN, "shared_view")
    monkeypatch.delenv(MULTIPROC_ENV)
    assert value("featureserve_view_rows_written_total", view="shared_view") == 1
    forget(VIEW_ROWS_WRITTEN, "shared_view")
    assert (
        REGISTRY.get_sample_value("featureserve_view_rows_written_total", {"view": "shared_view"})
        is None
    )


def test_observers_of_views_another_worker_deleted_are_swept(tmp_path) -> None:
    """A worker that did not serve a view's deletion drops its observer (and series) once it
    has met enough new views, and a call racing the deletion does not label the view again."""
    from featurestore.group_commit import GroupCommitter
    from featurestore.online_store import OnlineStore, StoreConfig
    from server.feature_servicer import SWEEP_OBSERVERS_AT, FeatureStoreServicer

    user = Entity("user", (JoinKey("user_id", DType.INT64),))
    names = [f"swept{i}" for i in range(SWEEP_OBSERVERS_AT + 2)]
    views = [FeatureView(name, "user", (Feature("x", DType.FLOAT32),)) for name in names]
    with OnlineStore(StoreConfig(tmp_path / "data")) as store:
        store.registry.apply([user], views)
        committer = GroupCommitter(store)
        try:
            servicer = FeatureStoreServicer(store, committer, 100)
            servicer.observer("swept0").metrics.observe_write(5)
            store.registry.delete_view("swept0", 1)
            store.registry.delete_view("swept1", 1)
            assert servicer.observer("swept1") is None
            assert value("featureserve_view_rows_written_total", view="swept0") == 5
            for name in names[2:]:
                servicer.observer(name)
        finally:
            committer.close()
    for name in ("swept0", "swept1"):
        assert (
            REGISTRY.get_sample_value("featureserve_view_rows_written_total", {"view": name})
            is None
        )


def test_model_failures_by_reason_and_rows_of_successes_only(tmp_path, server_factory) -> None:
    """On a real server: a batch where one request fails counts only the others' requests and
    rows (its rows counted as executed while it was not); a request past its deadline counts
    timed_out, and one its caller cancels while queued counts cancelled (it counted
    timed_out)."""
    from benchmarks.model_zoo import gather_model, write_model
    from protos.inference import grpc_service_pb2 as ipb
    from protos.inference import grpc_service_pb2_grpc as ipb_grpc

    write_model(
        tmp_path / "models",
        "gather",
        gather_model(),
        config_toml="max_batch_size = 8\n[dynamic_batching]\nmax_queue_delay_us = 200000\n",
    )
    port = free_port()
    server = server_factory("--metrics-port", str(port), model_repo=tmp_path / "models")
    labels = {"model": "gather", "version": "1"}

    def request(*idx: int) -> ipb.ModelInferRequest:
        array = np.array(idx, np.int64).reshape(-1, 1)
        message = ipb.ModelInferRequest(model_name="gather", raw_input_contents=[array.tobytes()])
        message.inputs.add(name="idx", datatype="INT64", shape=array.shape)
        return message

    def failures() -> dict[str, float]:
        samples = scrape(port)
        reasons = ("rejected", "timed_out", "cancelled", "error")
        return {
            reason: samples.get(key("featureserve_model_failures_total", reason=reason, **labels))
            for reason in reasons
        }

    with grpc.insecure_channel(server.target) as channel:
        stub = ipb_grpc.GRPCInferenceServiceStub(channel)
        calls = [stub.ModelInfer.future(request(*idx), timeout=10) for idx in ([1, 2], [3], [99])]
        assert [c.exception() is None for c in calls] == [True, True, False]
        samples = scrape(port)
        assert samples[key("featureserve_model_batch_rows_sum", **labels)] == 4
        assert samples[key("featureserve_model_requests_total", **labels)] == 2
        assert samples[key("featureserve_model_rows_total", **labels)] == 3
        assert failures() == {"rejected": 0, "timed_out": 0, "cancelled": 0, "error": 1}

        late = stub.ModelInfer.future(request(1), timeout=0.05)
        assert late.exception().code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert wait_until(lambda: failures()["timed_out"] == 1)

        gone = stub.ModelInfer.future(request(1), timeout=10)
        time.sleep(0.05)
        assert gone.cancel()
        assert wait_until(lambda: failures()["cancelled"] == 1)
        time.sleep(0.3)
        assert failures() == {"rejected": 0, "timed_out": 1, "cancelled": 1, "error": 1}
        assert scrape(port)[key("featureserve_model_rows_total", **labels)] == 3
