"""Audit log: record format, principal from the authenticated caller, outcomes of failed
actions, whole lines under concurrent appends from several processes, and the real server."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from clients.channel import ClientConfig
from clients.feature_client import FeatureStoreClient
from featurestore.dtypes import DType, FeatureStatus
from featurestore.errors import InvalidArgumentError
from featurestore.registry import Entity, Feature, FeatureView, JoinKey
from server.audit import AuditConfig, AuditLog, parse_audit
from server.auth import PRINCIPAL, Principal
from server.config import ConfigError
from tests.conftest import free_port, wait_until


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_records_name_the_principal_target_and_outcome(tmp_path: Path) -> None:
    log = AuditLog.from_config(AuditConfig(), tmp_path)
    assert log.path == tmp_path / "audit.jsonl"
    log.record("model_load", "m1", version="2")

    async def rows(record: dict) -> None:
        record["rows"] = 128

    async def bad(record: dict) -> None:
        raise InvalidArgumentError("blocks[0]: 3 rows, expected 4")

    async def main() -> None:
        await log.change("write_features", "profile", None, rows)
        with pytest.raises(InvalidArgumentError):
            await log.change("write_features", "profile", None, bad)

    token = PRINCIPAL.set(Principal("pipeline", frozenset({"write:*"})))
    try:
        asyncio.run(main())
    finally:
        PRINCIPAL.reset(token)
    log.close()
    first, ok, failed = lines(tmp_path / "audit.jsonl")
    assert first["principal"] == "anonymous" and first["action"] == "model_load"
    assert first["target"] == "m1" and first["version"] == "2" and first["outcome"] == "OK"
    assert ok["principal"] == "pipeline" and ok["rows"] == 128 and ok["outcome"] == "OK"
    assert failed["outcome"] == "INVALID_ARGUMENT" and "3 rows" in failed["error"]
    assert failed["ts"].endswith("Z") and "rows" not in failed


def test_a_change_whose_caller_gives_up_runs_on_and_records_what_happened(tmp_path: Path) -> None:
    """A client's deadline cancels the handler awaiting a change: the change goes on and its
    record says how it ended (it said CANCELLED after an apply or a write had gone through)."""
    log = AuditLog.from_config(AuditConfig(), tmp_path)

    async def main() -> None:
        gate = asyncio.Event()

        async def slow(record: dict) -> str:
            await gate.wait()
            record["written"] = 5
            return "done"

        caller = asyncio.create_task(log.change("write_features", "profile", None, slow))
        await asyncio.sleep(0.01)
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        assert not (tmp_path / "audit.jsonl").read_text()
        gate.set()
        await log.changes_done()

    asyncio.run(main())
    log.close()
    (record,) = lines(tmp_path / "audit.jsonl")
    assert record["outcome"] == "OK" and record["written"] == 5


def test_disabled_and_custom_path(tmp_path: Path) -> None:
    off = AuditLog.from_config(parse_audit({"enabled": False}), tmp_path)
    off.record("apply_feature_views", "profile")
    off.close()
    assert not (tmp_path / "audit.jsonl").exists()
    custom = AuditLog.from_config(parse_audit({"path": "logs/ops.jsonl"}), tmp_path)
    custom.record("apply_feature_views", "profile")
    custom.close()
    assert lines(tmp_path / "logs" / "ops.jsonl")[0]["target"] == "profile"
    with pytest.raises(ConfigError, match="unknown key 'file'"):
        parse_audit({"file": "x"})


WRITER = """
import sys
from pathlib import Path
from server.audit import AuditLog
log = AuditLog(Path(sys.argv[1]))
for i in range(int(sys.argv[2])):
    log.record("write_features", "v" * 3000, worker=sys.argv[3], i=i)
"""


def test_lines_from_concurrent_processes_never_interleave(tmp_path: Path) -> None:
    """Two processes appending 3 KB records at once: every line parses and none is lost."""
    path = tmp_path / "audit.jsonl"
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(path), "400", name])
        for name in ("a", "b")
    ]
    assert [p.wait(60) for p in procs] == [0, 0]
    records = lines(path)
    assert len(records) == 800
    for name in ("a", "b"):
        assert [r["i"] for r in records if r["worker"] == name] == list(range(400))


def test_real_server_audits_applies_and_writes(server_factory, tmp_path: Path) -> None:
    """The server writes one audit line per apply and per write batch into its data dir."""
    server = server_factory()
    user = Entity("user", (JoinKey("user_id", DType.INT64),))
    view = FeatureView("profile", "user", (Feature("score", DType.FLOAT32),))
    with FeatureStoreClient(ClientConfig(target=server.target, timeout_s=20)) as client:
        client.apply([user], [view])
        client.write_features(
            "profile",
            {"user_id": np.arange(5)},
            np.full(5, int(time.time() * 1e6)),
            {"score": np.ones(5, np.float32)},
        )
    records = lines(server.data_dir / "audit.jsonl")
    actions = [(r["action"], r["target"], r["outcome"]) for r in records]
    assert ("apply_feature_views", "profile", "OK") in actions
    assert ("write_features", "profile", "OK") in actions
    assert all(r["principal"] == "anonymous" for r in records)


def test_real_server_audits_each_stream_batch(server_factory) -> None:
    """A StreamWriteFeatures writes one audit line per batch, with its index in the stream and
    its counts, and the failed batch's status and message; the unary write has no index."""
    import grpc

    from clients import feature_messages as fm
    from protos.featureserve.v1 import feature_store_pb2_grpc as pb_grpc

    server = server_factory()
    user = Entity("user", (JoinKey("user_id", DType.INT64),))
    view = FeatureView("profile", "user", (Feature("score", DType.FLOAT32),))
    now = int(time.time() * 1e6)

    def batch(i: int, score: float = 1.0) -> object:
        ids = np.arange(10 * i, 10 * i + 10)
        return fm.write_request("profile", {"user_id": ids}, now, {"score": np.full(10, score)})

    with FeatureStoreClient(ClientConfig(target=server.target, timeout_s=20)) as client:
        client.apply([user], [view])
        stub = pb_grpc.FeatureStoreStub(client._channel)
        answer = stub.StreamWriteFeatures(iter([batch(0), batch(1), batch(0)]), timeout=20)
        assert (answer.rows_written, answer.rows_stale) == (20, 10)
        with pytest.raises(grpc.RpcError) as err:
            stub.StreamWriteFeatures(iter([batch(2), batch(3, float("nan"))]), timeout=20)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    writes = [r for r in lines(server.data_dir / "audit.jsonl") if r["action"] == "write_features"]
    summary = [(r["batch"], r["outcome"], r.get("written"), r.get("stale")) for r in writes]
    assert summary[:3] == [(0, "OK", 10, 0), (1, "OK", 10, 0), (2, "OK", 0, 10)]
    # a bad message is recorded when it is read, before the batch ahead of it has committed
    assert sorted(summary[3:]) == [(0, "OK", 10, 0), (1, "INVALID_ARGUMENT", None, None)]
    failed = next(r for r in writes[3:] if r["outcome"] != "OK")
    assert "column 'score' row 0: NaN" in failed["error"]
    assert all(r["target"] == "profile" and r["peer"] for r in writes)


def test_an_audit_file_that_fails_at_runtime_changes_no_answer(server_factory, tmp_path) -> None:
    """/dev/full opens but every write to it fails ENOSPC, as a disk that fills while serving:
    an apply and a write that committed answered INTERNAL, and a NaN write's INVALID_ARGUMENT
    was replaced by INTERNAL. Now each answers as it would without the audit log, and the
    failure is logged and counted."""
    import grpc

    from clients.channel import ClientError

    config = tmp_path / "audit.toml"
    config.write_text('[audit]\npath = "/dev/full"\n')
    server = server_factory("--config", str(config))
    user = Entity("user", (JoinKey("user_id", DType.INT64),))
    view = FeatureView("profile", "user", (Feature("score", DType.FLOAT32),))
    now = np.full(2, int(time.time() * 1e6))
    with FeatureStoreClient(ClientConfig(target=server.target, timeout_s=20)) as client:
        assert [r.action for r in client.apply([user], [view])] == ["created"]
        written = client.write_features(
            "profile", {"user_id": np.arange(2)}, now, {"score": np.ones(2, np.float32)}
        )
        assert written.written == 2
        with pytest.raises(ClientError) as bad:
            client.write_features(
                "profile", {"user_id": np.arange(2)}, now, {"score": np.full(2, np.nan)}
            )
        assert bad.value.code == grpc.StatusCode.INVALID_ARGUMENT, bad.value
    failures = [r for r in server.logs() if r.get("msg") == "audit record not written"]
    assert len(failures) == 1 and failures[0]["level"] == "error", failures
    assert failures[0]["error"] == "No space left on device"


def test_calls_refused_by_auth_are_recorded_for_the_audited_methods_only(
    server_factory, tmp_path
) -> None:
    """A delete, write, apply or model load refused UNAUTHENTICATED or PERMISSION_DENIED (by the
    method's scope class, or by the servicer's per-view check) is recorded with the principal,
    the target the request names and the code; only calls that passed auth were recorded. A
    refused lookup is not an audited method, and an admitted call gets no refusal record."""
    import grpc

    from protos.featureserve.v1 import feature_store_pb2 as pb
    from protos.featureserve.v1 import feature_store_pb2_grpc as pb_grpc
    from protos.inference import grpc_service_pb2 as ks
    from protos.inference import grpc_service_pb2_grpc as ks_grpc
    from tests.server.test_auth import AUTH_TOML, TOKENS

    config = tmp_path / "auth.toml"
    config.write_text(AUTH_TOML)
    server = server_factory("--config", str(config))
    store = pb_grpc.FeatureStoreStub(grpc.insecure_channel(server.target))
    infer = ks_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(server.target))
    write = pb.WriteFeaturesRequest(view="profile")
    calls = [
        (store.DeleteFeatureView, pb.DeleteFeatureViewRequest(name="profile", version=1), None),
        (store.DeleteFeatureView, pb.DeleteFeatureViewRequest(name="profile", version=1), "writer"),
        (store.WriteFeatures, write, "reader"),
        (store.WriteFeatures, write, "other"),
        (store.StreamWriteFeatures, iter([write]), None),
        (store.StreamWriteFeatures, iter([write]), "other"),
        (store.ApplyFeatureViews, pb.ApplyFeatureViewsRequest(), "bogus"),
        (infer.RepositoryModelLoad, ks.RepositoryModelLoadRequest(model_name="m1"), "inferer"),
        (store.WriteFeatures, pb.WriteFeaturesRequest(view="v" * 5000), None),
        (store.ApplyFeatureViews, pb.ApplyFeatureViewsRequest(dry_run=True), None),
        (store.GetOnlineFeatures, pb.GetOnlineFeaturesRequest(features=["profile:f"]), None),
        (store.WriteFeatures, write, "admin"),
    ]
    codes = []
    for rpc, request, who in calls:
        secret = TOKENS[who][0] if who in TOKENS else who
        metadata = () if secret is None else (("authorization", f"Bearer {secret}"),)
        try:
            rpc(request, metadata=metadata, timeout=20)
            codes.append("OK")
        except grpc.RpcError as exc:
            codes.append(exc.code().name)
    unauth, denied = "UNAUTHENTICATED", "PERMISSION_DENIED"
    assert codes == [unauth, denied, denied, denied, unauth, denied, unauth, denied, unauth,
                     unauth, unauth, "OK"]  # fmt: skip
    records = lines(server.data_dir / "audit.jsonl")
    refused = [(r["principal"], r["action"], r["target"], r["outcome"]) for r in records]
    assert refused == [
        ("unauthenticated", "delete_feature_view", "profile@1", unauth),
        ("writer", "delete_feature_view", "profile@1", denied),
        ("reader", "write_features", "profile", denied),
        ("other", "write_features", "profile", denied),
        ("unauthenticated", "write_features", "", unauth),  # a stream's view is in its messages
        ("other", "write_features", "profile", denied),
        ("unauthenticated", "apply_feature_views", "", unauth),
        ("inferer", "model_load", "m1", denied),
        ("unauthenticated", "write_features", "v" * 300 + "...(+4700 chars)", unauth),
        ("unauthenticated", "apply_feature_views", "", unauth),
        ("admin", "write_features", "profile", "OK"),
    ]
    assert all(r["peer"] and r["error"] for r in records[:-1])
    assert "lacks scope 'write:profile'" in records[3]["error"]
    assert records[5]["batch"] == 0  # the stream's batch the servicer refused
    assert records[9]["dry_run"] is True and "dry_run" not in records[6]


def test_a_stream_cancelled_during_its_commits_records_them_written(server_factory) -> None:
    """A client that gives up on a StreamWriteFeatures while its batches commit: each batch is
    recorded with how its commit ended once it ends (they were recorded CANCELLED, 'it may have
    been written', though the commit process wrote them)."""
    import threading

    from clients import feature_messages as fm
    from protos.featureserve.v1 import feature_store_pb2_grpc as pb_grpc

    server = server_factory()
    user = Entity("user", (JoinKey("user_id", DType.INT64),))
    view = FeatureView("profile", "user", (Feature("score", DType.FLOAT32),))
    now = int(time.time() * 1e6)
    rows = 100_000
    sent = threading.Event()
    hold = threading.Event()

    def messages():
        for i in range(3):
            ids = np.arange(rows * i, rows * (i + 1))
            yield fm.write_request("profile", {"user_id": ids}, now, {"score": np.ones(rows)})
        sent.set()
        hold.wait(30)

    with FeatureStoreClient(ClientConfig(target=server.target, timeout_s=20)) as client:
        client.apply([user], [view])
        call = pb_grpc.FeatureStoreStub(client._channel).StreamWriteFeatures.future(
            messages(), timeout=30
        )
        assert sent.wait(20)
        time.sleep(0.05)
        call.cancel()
        hold.set()

        def recorded() -> list[dict]:
            audit = lines(server.data_dir / "audit.jsonl")
            return [r for r in audit if r.get("batch") is not None]

        # The batches the server had read before the cancel (usually all 3) settle in seconds.
        assert wait_until(lambda: len(recorded()) >= 1, timeout=20)
        time.sleep(2)
        records = recorded()
        assert [(r["outcome"], r.get("written")) for r in records] == [("OK", rows)] * len(records)
        ends = np.array([r["batch"] for r in records]) * rows + rows - 1
        got = client.get_online_features(["profile:score"], {"user_id": ends})
        assert (got.statuses["profile:score"] == FeatureStatus.PRESENT).all()


def _big_stream(rows: int, count: int) -> list:
    from clients import feature_messages as fm

    now = int(time.time() * 1e6)
    return [
        fm.write_request(
            "profile",
            {"user_id": np.arange(rows * i, rows * (i + 1))},
            now,
            {"score": np.ones(rows)},
        )
        for i in range(count)
    ]


def _stream_records(data_dir: Path) -> list[tuple[int, str, int | None]]:
    audit = lines(data_dir / "audit.jsonl")
    return sorted((r["batch"], r["outcome"], r.get("written")) for r in audit if "batch" in r)


def _written_rows(metrics_port: int) -> float:
    """featureserve_view_rows_written_total of view 'profile', from the server's /metrics."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    url = f"http://127.0.0.1:{metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "featureserve_view_rows_written_total"
        and sample.labels.get("view") == "profile"
    )


def test_a_stream_whose_deadline_passes_while_it_settles_records_every_batch(
    server_factory,
) -> None:
    """The client half-closes, then its deadline passes while the server awaits the commits: each
    batch is recorded and counted once it commits (the one being awaited lost both). On a busy
    machine the deadline can pass before the last batches are sent; those never reach the
    server, so the check is that exactly the batches committed (read back) are recorded and
    counted."""
    import grpc

    from protos.featureserve.v1 import feature_store_pb2_grpc as pb_grpc

    metrics_port = free_port()
    server = server_factory("--metrics-port", str(metrics_port))
    rows, count = 100_000, 6
    user = Entity("user", (JoinKey("user_id", DType.INT64),))
    view = FeatureView("profile", "user", (Feature("score", DType.FLOAT32),))
    with FeatureStoreClient(ClientConfig(target=server.target, timeout_s=20)) as client:
        client.apply([user], [view])
        stub = pb_grpc.FeatureStoreStub(client._channel)
        with pytest.raises(grpc.RpcError):
            stub.StreamWriteFeatures(iter(_big_stream(rows, count)), timeout=0.6)

        def recorded_as_committed() -> int | None:
            """How many batches committed, if exactly those are recorded and counted."""
            first_keys = {"user_id": np.arange(count) * rows}  # a batch commits whole
            got = client.get_online_features(["profile:score"], first_keys)
            committed = np.flatnonzero(got.statuses["profile:score"] == FeatureStatus.PRESENT)
            expected = [(i, "OK", rows) for i in committed.tolist()]
            if _stream_records(server.data_dir) != expected:
                return None
            return len(expected) if _written_rows(metrics_port) == rows * len(expected) else None

        seen: list[int | None] = []

        def settled() -> bool:
            """The same batches (at least the first, sent long before the deadline) committed,
            recorded and counted at two looks a second apart: the commits have ended."""
            seen.append(recorded_as_committed())
            return len(seen) > 1 and seen[-1] is not None and seen[-1] >= 1 and seen[-1] == seen[-2]

        assert wait_until(settled, timeout=30, interval=1.0), (
            seen,
            _stream_records(server.data_dir),
        )


def test_a_server_stopped_while_a_stream_commits_records_its_batches_first(
    server_factory, tmp_path: Path
) -> None:
    """SIGTERM with grace_seconds = 0 while a stream's batches commit: the server waits for them,
    records each, and only then closes the store (their records were lost and an error logged
    against the closed store)."""
    import threading

    from protos.featureserve.v1 import feature_store_pb2_grpc as pb_grpc

    config = tmp_path / "server.toml"
    config.write_text("grace_seconds = 0\n")
    server = server_factory("--config", str(config))
    rows = 100_000
    sent, hold = threading.Event(), threading.Event()
    messages = _big_stream(rows, 8)

    def stream():
        yield from messages
        sent.set()
        hold.wait(30)

    user = Entity("user", (JoinKey("user_id", DType.INT64),))
    view = FeatureView("profile", "user", (Feature("score", DType.FLOAT32),))
    with FeatureStoreClient(ClientConfig(target=server.target, timeout_s=20)) as client:
        client.apply([user], [view])
        call = pb_grpc.FeatureStoreStub(client._channel).StreamWriteFeatures.future(
            stream(), timeout=30
        )
        assert sent.wait(20)

        def first_batch_stored() -> bool:
            got = client.get_online_features(["profile:score"], {"user_id": np.array([rows - 1])})
            return got.statuses["profile:score"][0] == FeatureStatus.PRESENT

        assert wait_until(first_batch_stored, timeout=20)
        assert server.terminate(timeout=60) == 0
        hold.set()
        call.cancel()
    records = _stream_records(server.data_dir)
    assert records and [r[1:] for r in records] == [("OK", rows)] * len(records)
    assert not [e for e in server.logs() if e.get("level") in ("error", "critical")]


def test_records_after_the_file_is_rotated_or_removed_land_in_a_new_file(server_factory) -> None:
    """A logrotate-style rename, then a removal, between audited calls of a real server: each
    next record goes to a new file at the configured path (they went to the old inode, so the
    renamed file took them, and after the removal they vanished, uncounted), and nothing is
    counted as a failure."""
    from tests.server.test_metrics import key, scrape

    port = free_port()
    server = server_factory("--metrics-port", str(port))
    path = server.data_dir / "audit.jsonl"
    user = Entity("user", (JoinKey("user_id", DType.INT64),))
    view = FeatureView("profile", "user", (Feature("score", DType.FLOAT32),))
    now = np.full(2, int(time.time() * 1e6))

    def write(client: FeatureStoreClient, score: float) -> None:
        ids = {"user_id": np.arange(2)}
        client.write_features("profile", ids, now + int(score), {"score": np.full(2, score)})

    with FeatureStoreClient(ClientConfig(target=server.target, timeout_s=20)) as client:
        client.apply([user], [view])
        path.rename(path.with_name("audit.jsonl.1"))
        write(client, 1.0)
        rotated = lines(path.with_name("audit.jsonl.1"))
        assert [r["action"] for r in rotated] == ["apply_feature_views"]
        assert [(r["action"], r["outcome"]) for r in lines(path)] == [("write_features", "OK")]
        path.unlink()
        path.with_name("audit.jsonl.1").unlink()
        write(client, 2.0)
        write(client, 3.0)
    assert [(r["action"], r["outcome"]) for r in lines(path)] == [("write_features", "OK")] * 2
    assert scrape(port)[key("featureserve_audit_failures_total")] == 0
    assert not [r for r in server.logs() if r.get("msg") == "audit record not written"]


def test_a_removed_audit_file_that_cannot_be_reopened_is_counted(server_factory, tmp_path) -> None:
    """The audit file's folder is removed while serving, so the file cannot be reopened: the
    write still answers OK, and the lost record is counted and logged at ERROR."""
    import shutil

    from tests.server.test_metrics import key, scrape

    folder = tmp_path / "audit"
    config = tmp_path / "audit.toml"
    config.write_text(f'[audit]\npath = "{folder / "audit.jsonl"}"\n')
    port = free_port()
    server = server_factory("--config", str(config), "--metrics-port", str(port))
    user = Entity("user", (JoinKey("user_id", DType.INT64),))
    view = FeatureView("profile", "user", (Feature("score", DType.FLOAT32),))
    with FeatureStoreClient(ClientConfig(target=server.target, timeout_s=20)) as client:
        client.apply([user], [view])
        shutil.rmtree(folder)
        written = client.write_features(
            "profile",
            {"user_id": np.arange(2)},
            np.full(2, int(time.time() * 1e6)),
            {"score": np.ones(2, np.float32)},
        )
    assert written.written == 2
    assert scrape(port)[key("featureserve_audit_failures_total")] == 1
    failures = [r for r in server.logs() if r.get("msg") == "audit record not written"]
    assert len(failures) == 1 and failures[0]["error"] == "No such file or directory", failures
