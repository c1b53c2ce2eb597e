"""Audit log: record format, principal from the authenticated caller, outcomes of failed
actions, whole lines under concurrent appends from several processes, and the real server."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from clients.channel import ClientConfig
from clients.feature_client import FeatureStoreClient
from featurestore.dtypes import DType
from featurestore.errors import InvalidArgumentError
from featurestore.registry import Entity, Feature, FeatureView, JoinKey
from server.audit import AuditConfig, AuditLog, parse_audit
from server.auth import PRINCIPAL, Principal
from server.config import ConfigError


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_records_name_the_principal_target_and_outcome(tmp_path: Path) -> None:
    log = AuditLog.from_config(AuditConfig(), tmp_path)
    assert log.path == tmp_path / "audit.jsonl"
    log.record("model_load", "m1", version="2")
    token = PRINCIPAL.set(Principal("pipeline", frozenset({"write:*"})))
    try:
        with log.action("write_features", "profile") as details:
            details["rows"] = 128
        with pytest.raises(InvalidArgumentError), log.action("write_features", "profile"):
            raise InvalidArgumentError("blocks[0]: 3 rows, expected 4")
    finally:
        PRINCIPAL.reset(token)
    log.close()
    first, ok, failed = lines(tmp_path / "audit.jsonl")
    assert first["principal"] == "anonymous" and first["action"] == "model_load"
    assert first["target"] == "m1" and first["version"] == "2" and first["outcome"] == "OK"
    assert ok["principal"] == "pipeline" and ok["rows"] == 128 and ok["outcome"] == "OK"
    assert failed["outcome"] == "INVALID_ARGUMENT" and "3 rows" in failed["error"]
    assert failed["ts"].endswith("Z") and "rows" not in failed


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
