"""`featureserve apply`, `ingest` and `get` run as real subprocesses against a real server."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clients.channel import ClientConfig
from clients.feature_client import FeatureStoreClient
from featurestore.definitions import load_definitions
from featurestore.dtypes import FeatureStatus
from featurestore.errors import InvalidArgumentError

REPO = Path(__file__).resolve().parents[2]


def features_toml(view: str, allow_nan: bool = False, extra: str = "") -> str:
    """An int64 `user` entity and a view with float32, int64, string and float32_vector features."""
    return f"""
[[entity]]
name = "user"
join_keys = [{{ name = "user_id", dtype = "int64" }}]

[[feature_view]]
name = "{view}"
entity = "user"
owner = "tests"
{extra}

[[feature_view.feature]]
name = "score"
dtype = "float32"
allow_nan = {str(allow_nan).lower()}

[[feature_view.feature]]
name = "clicks"
dtype = "int64"

[[feature_view.feature]]
name = "city"
dtype = "string"

[[feature_view.feature]]
name = "emb"
dtype = "float32_vector"
vector_length = 3
"""


def us(text: str) -> int:
    """µs since the epoch of an ISO 8601 time (naive means UTC)."""
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp()) * 1_000_000


class Cli:
    """Runs `python -m server.cli` against one server."""

    def __init__(self, target: str, base: Path) -> None:
        self.target, self.base = target, base

    def run(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "server.cli", *args, "--target", self.target]
        env = None if env is None else {**os.environ, **env}
        return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120, env=env)

    def file(self, name: str, text: str) -> Path:
        path = self.base / name
        path.write_text(text, encoding="utf-8")
        return path


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from tests.conftest import ServerProcess

    base = tmp_path_factory.mktemp("feature_cli")
    server = ServerProcess(base / "data", base / "models").start()
    with FeatureStoreClient(ClientConfig(target=server.target, timeout_s=20)) as client:
        yield Cli(server.target, base), client
    server.kill()


def register(served, view: str, allow_nan: bool = False) -> None:
    """Register a view through the client (the apply command has its own tests)."""
    cli, client = served
    defs = load_definitions(cli.file(f"{view}.toml", features_toml(view, allow_nan)))
    assert [r.action for r in client.apply(defs.entities, defs.views)] == ["created"]


def test_apply_creates_then_reports_unchanged(served) -> None:
    cli, client = served
    path = cli.file("applied.toml", features_toml("applied"))
    first = cli.run("apply", str(path))
    assert (first.returncode, first.stdout.strip()) == (0, "applied@1: created")
    again = cli.run("apply", str(path))
    assert (again.returncode, again.stdout.strip()) == (0, "applied@1: unchanged")
    view = client.get_feature_view("applied")
    assert [f.name for f in view.features] == ["score", "clicks", "city", "emb"]


def test_dry_run_changes_nothing(served) -> None:
    cli, client = served
    path = cli.file("dry.toml", features_toml("dry"))
    dry = cli.run("apply", str(path), "--dry-run")
    assert (dry.returncode, dry.stdout.splitlines()) == (
        0,
        [
            "dry@1: would be created",
            "dry run: nothing was written; apply without --dry-run to write",
        ],
    )
    got = cli.run("get", "--view", "dry", "--keys", "1")
    assert got.returncode != 0
    lines = got.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("featureserve: NOT_FOUND: "), got.stderr
    assert "'dry'" in lines[0]
    assert cli.run("apply", str(path)).stdout.strip() == "dry@1: created"
    again = cli.run("apply", str(path), "--dry-run")
    assert again.stdout.splitlines()[0] == "dry@1: unchanged"
    path.write_text(features_toml("dry", extra='description = "more"'), encoding="utf-8")
    updated = cli.run("apply", str(path), "--dry-run")
    assert updated.stdout.splitlines()[0] == "dry@1: would be updated"
    assert client.get_feature_view("dry").description == ""


def test_delete_view_removes_the_version_and_names_a_missing_one(served) -> None:
    cli, client = served
    register(served, "dropped")
    deleted = cli.run("delete-view", "dropped", "--version", "1")
    assert (deleted.returncode, deleted.stdout.strip()) == (0, "dropped@1: deleted")
    assert client.list_feature_views("dropped", all_versions=True)[1] == []
    again = cli.run("delete-view", "dropped", "--version", "1")
    assert again.returncode == 1
    assert again.stderr.startswith("featureserve: NOT_FOUND: "), again.stderr
    assert "'dropped'" in again.stderr and "Traceback" not in again.stderr


def test_apply_unknown_key_names_key_and_file(served) -> None:
    cli, _ = served
    path = cli.file("typo.toml", features_toml("typo", extra='colour = "red"'))
    result = cli.run("apply", str(path))
    assert result.returncode == 2
    assert "colour" in result.stderr and str(path) in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            b"\xff\xfe",
            "not UTF-8 text (invalid start byte at byte 0); save the definitions file as UTF-8",
        ),
        (
            features_toml("ver_neg", extra="version = -1").encode(),
            "feature_view[0] (ver_neg).version: -1 is outside 0 to 4294967295; give 0",
        ),
        (
            features_toml("ver_huge", extra="version = 99999999999999").encode(),
            "feature_view[0] (ver_huge).version: 99999999999999 is outside 0 to 4294967295",
        ),
    ],
)
def test_apply_of_an_unusable_file_exits_2_naming_file_key_and_fix(
    served, content: bytes, message: str
) -> None:
    """A file that is not UTF-8, or a version the wire's uint32 cannot hold, is a one-line
    input error (it was a UnicodeDecodeError or protobuf ValueError traceback)."""
    cli, client = served
    path = cli.base / "unusable.toml"
    path.write_bytes(content)
    result = cli.run("apply", str(path))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"featureserve: {path}: "), result.stderr
    assert message in lines[0], result.stderr
    assert client.list_feature_views("ver_")[1] == []


def test_apply_of_a_missing_file_names_apply_s_file_argument(served) -> None:
    """The hint is apply's own (it said "give its path with --definitions", a pipeline flag)."""
    cli, _ = served
    path = cli.base / "absent.toml"
    result = cli.run("apply", str(path))
    assert result.returncode == 2, result.stderr
    assert result.stderr == (
        f"featureserve: {path}: cannot read the definitions file: No such file or directory; "
        "give the file as apply's FILE argument\n"
    )


def test_client_apply_names_a_number_its_wire_field_cannot_hold(served) -> None:
    """A definition built in code with a version or vector_length outside uint32 is an
    InvalidArgumentError naming the view and field, before anything is sent."""
    cli, client = served
    defs = load_definitions(cli.file("wire_range.toml", features_toml("wire_range")))
    view = defs.views[0]
    too_long = dataclasses.replace(view.features[3], vector_length=2**32)
    for bad, field in (
        (
            dataclasses.replace(view, version=2**32),
            "feature view 'wire_range': version: 4294967296",
        ),
        (dataclasses.replace(view, version=-1), "feature view 'wire_range': version: -1"),
        (
            dataclasses.replace(view, features=(*view.features[:3], too_long)),
            "feature view 'wire_range' feature 'emb': vector_length: 4294967296 is outside 0 to",
        ),
    ):
        with pytest.raises(InvalidArgumentError) as info:
            client.apply(defs.entities, [bad])
        assert str(info.value).startswith(field), info.value
    assert client.list_feature_views("wire_range")[1] == []


CSV_ISO = """user_id,event_timestamp,score,clicks,city,emb
1,2024-05-01T10:00:00Z,0.5,3,Paris,"[0.1, 0.2, 0.3]"
2,2024-05-01T11:00:00+02:00,1.25,7,Oslo,"[1, 2, 3]"
3,2024-05-01 12:00:00,-2.0,0,Lima,"[-1.5, 0, 4.25]"
"""


def read_back(client: FeatureStoreClient, view: str, ids: list[int]):
    return client.get_online_features([view], {"user_id": np.array(ids, dtype=np.int64)})


def test_ingest_csv_with_iso_times_round_trips_and_replay_is_stale(served) -> None:
    cli, client = served
    register(served, "csv_iso")
    path = cli.file("iso.csv", CSV_ISO)
    first = cli.run("ingest", str(path), "--view", "csv_iso")
    assert (first.returncode, first.stdout.strip()) == (0, "written=3 stale=0 rejected=0")
    got = read_back(client, "csv_iso", [1, 2, 3])
    np.testing.assert_array_equal(got["csv_iso:score"], np.float32([0.5, 1.25, -2.0]))
    assert got["csv_iso:clicks"].tolist() == [3, 7, 0]
    assert got["csv_iso:city"].tolist() == ["Paris", "Oslo", "Lima"]
    np.testing.assert_array_equal(
        got["csv_iso:emb"], np.float32([[0.1, 0.2, 0.3], [1, 2, 3], [-1.5, 0, 4.25]])
    )
    times = [us("2024-05-01T10:00:00Z"), us("2024-05-01T09:00:00"), us("2024-05-01T12:00:00")]
    assert got.event_timestamps["csv_iso"].tolist() == times
    assert (got.statuses["csv_iso:city"] == FeatureStatus.PRESENT).all()
    replay = cli.run("ingest", str(path), "--view", "csv_iso")
    assert (replay.returncode, replay.stdout.strip()) == (0, "written=0 stale=3 rejected=0")


def test_ingest_csv_with_int_microseconds_and_empty_cells_as_nulls(served) -> None:
    cli, client = served
    register(served, "csv_us")
    t0 = 1_714_557_600_000_000
    path = cli.file(
        "us.csv",
        f'user_id,ts,score,clicks,city,emb\n10,{t0},0.5,3,Rome,"[1, 1, 1]"\n11,{t0 + 1},,4,,\n',
    )
    result = cli.run("ingest", str(path), "--view", "csv_us", "--event-time-column", "ts")
    assert (result.returncode, result.stdout.strip()) == (0, "written=2 stale=0 rejected=0")
    got = read_back(client, "csv_us", [10, 11])
    assert got.event_timestamps["csv_us"].tolist() == [t0, t0 + 1]
    assert got["csv_us:clicks"].tolist() == [3, 4]
    assert got["csv_us:city"][0] == "Rome"
    for name in ("score", "city", "emb"):
        statuses = got.statuses[f"csv_us:{name}"].tolist()
        assert statuses == [FeatureStatus.PRESENT, FeatureStatus.NULL_VALUE], name


def test_ingest_parquet_round_trips_and_replay_is_stale(served) -> None:
    cli, client = served
    register(served, "pq_view")
    frame = pd.DataFrame(
        {
            "user_id": np.array([21, 22, 23, 24], dtype=np.int64),
            "event_timestamp": pd.to_datetime(
                ["2024-06-01T00:00:00", "2024-06-01T00:00:01", "2024-06-02", "2024-06-03"],
                format="ISO8601",
            ),
            "score": np.float32([0.25, -1.0, 3.5, 1e-3]),
            "clicks": np.array([1, 2, 2**40, -5], dtype=np.int64),
            "city": ["Kyiv", "Quito", "Zürich", ""],
            "emb": [np.float32([i, i + 0.5, -i]) for i in range(4)],
        }
    )
    path = cli.base / "rows.parquet"
    frame.to_parquet(path, engine="pyarrow")
    first = cli.run("ingest", str(path), "--view", "pq_view")
    assert (first.returncode, first.stdout.strip()) == (0, "written=4 stale=0 rejected=0")
    got = read_back(client, "pq_view", frame["user_id"].tolist())
    np.testing.assert_array_equal(got["pq_view:score"], frame["score"].to_numpy())
    assert got["pq_view:clicks"].tolist() == frame["clicks"].tolist()
    assert got["pq_view:city"].tolist() == frame["city"].tolist()
    np.testing.assert_array_equal(got["pq_view:emb"], np.stack(frame["emb"]))
    expected_us = frame["event_timestamp"].to_numpy().astype("datetime64[us]").astype(np.int64)
    assert got.event_timestamps["pq_view"].tolist() == expected_us.tolist()
    replay = cli.run("ingest", str(path), "--view", "pq_view")
    assert (replay.returncode, replay.stdout.strip()) == (0, "written=0 stale=4 rejected=0")


CSV_NAN = """user_id,event_timestamp,score,clicks,city,emb
31,2024-05-01T10:00:00Z,0.5,3,Paris,"[0, 0, 0]"
32,2024-05-01T10:00:00Z,NaN,7,Oslo,"[0, 0, 0]"
33,2024-05-01T10:00:00Z,2.0,0,Lima,"[0, 0, 0]"
"""


def test_nan_under_skip_bad_rows_rejects_that_row_only(served) -> None:
    cli, client = served
    register(served, "nan_skip")
    path = cli.file("nan_skip.csv", CSV_NAN)
    result = cli.run("ingest", str(path), "--view", "nan_skip", "--policy", "skip_bad_rows")
    assert result.returncode == 1
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "written=2 stale=0 rejected=1"
    assert "row 1 score" in lines[1] and "NaN" in lines[1], result.stdout
    got = read_back(client, "nan_skip", [31, 32, 33])
    assert got.statuses["nan_skip:score"].tolist() == [
        FeatureStatus.PRESENT,
        FeatureStatus.NOT_FOUND,
        FeatureStatus.PRESENT,
    ]
    np.testing.assert_array_equal(got["nan_skip:score"][[0, 2]], np.float32([0.5, 2.0]))


def test_nan_under_reject_batch_writes_nothing(served) -> None:
    cli, client = served
    register(served, "nan_reject")
    path = cli.file("nan_reject.csv", CSV_NAN)
    result = cli.run("ingest", str(path), "--view", "nan_reject")
    assert result.returncode != 0
    assert "score" in result.stderr and "row 1" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    got = read_back(client, "nan_reject", [31, 32, 33])
    assert (got.statuses["nan_reject:score"] == FeatureStatus.NOT_FOUND).all()


def test_nan_is_stored_where_the_feature_allows_it(served) -> None:
    cli, client = served
    register(served, "nan_ok", allow_nan=True)
    path = cli.file("nan_ok.csv", CSV_NAN)
    result = cli.run("ingest", str(path), "--view", "nan_ok")
    assert (result.returncode, result.stdout.strip()) == (0, "written=3 stale=0 rejected=0")
    got = read_back(client, "nan_ok", [32])
    assert got.statuses["nan_ok:score"][0] == FeatureStatus.PRESENT
    assert np.isnan(got["nan_ok:score"][0])


def test_missing_join_key_column_exits_2_naming_it(served) -> None:
    cli, _ = served
    register(served, "nokey")
    path = cli.file("nokey.csv", "uid,event_timestamp,score\n1,1714557600000000,0.5\n")
    result = cli.run("ingest", str(path), "--view", "nokey")
    assert result.returncode == 2
    assert "missing columns ['user_id']" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_get_prints_features_and_statuses(served) -> None:
    cli, _ = served
    register(served, "shown")
    path = cli.file("shown.csv", CSV_ISO)
    assert cli.run("ingest", str(path), "--view", "shown").returncode == 0
    result = cli.run("get", "--view", "shown", "--keys", "2,999")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"[user_id=2] event_time_us={us('2024-05-01T09:00:00')}",
        "  shown:score = 1.25 (PRESENT)",
        "  shown:clicks = 7 (PRESENT)",
        "  shown:city = Oslo (PRESENT)",
        "  shown:emb = [1. 2. 3.] (PRESENT)",
        "[user_id=999] event_time_us=0",
        "  shown:score = - (NOT_FOUND)",
        "  shown:clicks = - (NOT_FOUND)",
        "  shown:city = - (NOT_FOUND)",
        "  shown:emb = - (NOT_FOUND)",
    ]
    subset = cli.run("get", "--view", "shown", "--entity", "user_id=3", "--features", "city,clicks")
    assert subset.returncode == 0, subset.stderr
    assert subset.stdout.splitlines() == [
        f"[user_id=3] event_time_us={us('2024-05-01T12:00:00')}",
        "  shown:city = Lima (PRESENT)",
        "  shown:clicks = 0 (PRESENT)",
    ]


def view_toml(view: str, entity: str, key: str, features: dict[str, str]) -> str:
    """features.toml with one entity (join key `key`: "name:dtype") and one view of `features`
    (name -> dtype)."""
    name, dtype = key.split(":")
    lines = [
        "[[entity]]",
        f'name = "{entity}"',
        f'join_keys = [{{ name = "{name}", dtype = "{dtype}" }}]',
    ]
    lines += ["[[feature_view]]", f'name = "{view}"', f'entity = "{entity}"']
    for feature, kind in features.items():
        lines += ["[[feature_view.feature]]", f'name = "{feature}"', f'dtype = "{kind}"']
    return "\n".join(lines) + "\n"


def sku_toml(view: str) -> str:
    """A string-keyed `sku` entity and a view with a string and an int64 feature."""
    return view_toml(view, "sku", "sku_id:string", {"code": "string", "qty": "int64"})


def test_numeric_looking_strings_stay_text_in_ingest_and_get(served) -> None:
    cli, client = served
    defs = load_definitions(cli.file("skus.toml", sku_toml("skus")))
    client.apply(defs.entities, defs.views)
    path = cli.file(
        "skus.csv",
        "sku_id,event_timestamp,code,qty\n"
        "0042,2024-05-01T10:00:00Z,007,1\n"
        "42,2024-05-01T10:00:00Z,1e3, 2 \n",
    )
    result = cli.run("ingest", str(path), "--view", "skus")
    assert (result.returncode, result.stdout.strip()) == (0, "written=2 stale=0 rejected=0")
    got = client.get_online_features(["skus"], {"sku_id": np.array(["0042", "42"], object)})
    assert got["skus:code"].tolist() == ["007", "1e3"]
    assert got["skus:qty"].tolist() == [1, 2]
    frame = pd.DataFrame(
        {
            "sku_id": ["0099"],
            "event_timestamp": pd.to_datetime(["2024-05-01T10:00:00"]),
            "code": ["0100"],
            "qty": np.array([5], dtype=np.int64),
        }
    )
    frame.to_parquet(cli.base / "skus.parquet", engine="pyarrow")
    result = cli.run("ingest", str(cli.base / "skus.parquet"), "--view", "skus")
    assert (result.returncode, result.stdout.strip()) == (0, "written=1 stale=0 rejected=0")
    shown = cli.run("get", "--view", "skus", "--keys", "0099,007")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines() == [
        f"[sku_id=0099] event_time_us={us('2024-05-01T10:00:00')}",
        "  skus:code = 0100 (PRESENT)",
        "  skus:qty = 5 (PRESENT)",
        "[sku_id=007] event_time_us=0",
        "  skus:code = - (NOT_FOUND)",
        "  skus:qty = - (NOT_FOUND)",
    ]


def test_get_rejects_keys_that_are_not_the_join_keys_type(served) -> None:
    cli, _ = served
    register(served, "typed_get")
    result = cli.run("get", "--view", "typed_get", "--keys", "1,abc")
    assert result.returncode == 2
    assert "--keys" in result.stderr and "'user_id' is int64" in result.stderr, result.stderr
    result = cli.run("get", "--view", "typed_get", "--entity", "uid=1")
    assert result.returncode == 2 and "user_id" in result.stderr, result.stderr


CSV_EMPTY_KEY = """user_id,event_timestamp,score,clicks,city,emb
5,2024-05-01T10:00:00Z,0.5,3,Paris,"[0, 0, 0]"
,2024-05-02T10:00:00Z,9.5,9,Intruder,"[9, 9, 9]"
6,2024-05-01T10:00:00Z,1.5,4,Oslo,"[0, 0, 0]"
"""


def test_empty_join_key_is_an_error_and_never_written_to_entity_0(served) -> None:
    cli, client = served
    register(served, "nullkey")
    original = {
        "score": np.float32([1]),
        "clicks": np.array([1]),
        "city": np.array(["Original"], dtype=object),
        "emb": np.float32([[1, 1, 1]]),
    }
    client.write_features("nullkey", {"user_id": [0]}, us("2024-04-01T00:00:00"), original)
    path = cli.file("nullkey.csv", CSV_EMPTY_KEY)
    rejected = cli.run("ingest", str(path), "--view", "nullkey")
    assert rejected.returncode == 2
    assert "column 'user_id' row 1: the join key is empty" in rejected.stderr, rejected.stderr
    assert "--policy skip_bad_rows" in rejected.stderr
    got = read_back(client, "nullkey", [0, 5, 6])
    assert got["nullkey:city"][0] == "Original"
    assert (got.statuses["nullkey:city"][1:] == FeatureStatus.NOT_FOUND).all()

    skipped = cli.run("ingest", str(path), "--view", "nullkey", "--policy", "skip_bad_rows")
    assert skipped.returncode == 1
    assert skipped.stdout.splitlines() == [
        "written=2 stale=0 rejected=1",
        "  row 1 user_id: the join key is empty",
    ]
    got = read_back(client, "nullkey", [0, 5, 6])
    assert got["nullkey:city"].tolist() == ["Original", "Paris", "Oslo"]

    frame = pd.DataFrame(
        {
            "user_id": pd.array([7, None], dtype="Int64"),
            "event_timestamp": pd.to_datetime(["2024-05-03", "2024-05-03"]),
            "city": ["Rome", "Intruder"],
        }
    )
    frame.to_parquet(cli.base / "nullkey.parquet", engine="pyarrow")
    result = cli.run("ingest", str(cli.base / "nullkey.parquet"), "--view", "nullkey")
    assert result.returncode == 2
    assert "column 'user_id' row 1: the join key is empty" in result.stderr, result.stderr
    assert read_back(client, "nullkey", [0])["nullkey:city"][0] == "Original"


def test_bad_rows_are_reported_by_their_row_in_the_file(served) -> None:
    cli, client = served
    register(served, "file_rows")
    lines = ["user_id,event_timestamp,score,clicks,city,emb"]
    for row in range(70):
        user = "" if row == 3 else str(100 + row)
        clicks = "x" if row == 10 else "1"
        score = "NaN" if row == 66 else "0.5"
        lines.append(f'{user},2024-05-01T10:00:00Z,{score},{clicks},c{row},"[0, 0, 0]"')
    path = cli.file("file_rows.csv", "\n".join(lines) + "\n")
    rejected = cli.run("ingest", str(path), "--view", "file_rows", "--batch-rows", "1")
    assert rejected.returncode == 2
    assert "column 'user_id' row 3: the join key is empty" in rejected.stderr, rejected.stderr
    assert "(2 bad rows" in rejected.stderr
    nothing = read_back(client, "file_rows", [100])
    assert nothing.statuses["file_rows:city"][0] == FeatureStatus.NOT_FOUND

    # 1-row messages: the writer starts a new stream every 64 messages, and row 3 is not sent.
    skipped = cli.run(
        "ingest", str(path), "--view", "file_rows", "--batch-rows", "1", "--policy", "skip_bad_rows"
    )
    assert skipped.returncode == 1
    assert skipped.stdout.splitlines() == [
        "written=67 stale=0 rejected=3",
        "  row 3 user_id: the join key is empty",
        "  row 10 clicks: 'x' is not INT64",
        "  row 66 score: NaN but allow_nan is false",
    ]
    got = read_back(client, "file_rows", [165, 166, 167])
    assert got["file_rows:city"][[0, 2]].tolist() == ["c65", "c67"]
    assert got.statuses["file_rows:city"][1] == FeatureStatus.NOT_FOUND


def test_a_row_only_the_server_rejects_is_named_by_its_file_row_with_what_was_written(
    served,
) -> None:
    """2-row messages, and the writer starts a new stream every 64 messages: the NaN of file row
    133 is row 1 of batch 2 of the second stream. The error names row 133 and the 132 rows
    written before its message, which read back; rerun skipping bad rows, they are stale."""
    cli, client = served
    register(served, "late_bad")
    lines = ["user_id,event_timestamp,score,clicks,city,emb"]
    for row in range(140):
        score = "NaN" if row == 133 else str(row)
        lines.append(f'{200 + row},2024-05-01T10:00:00Z,{score},1,c{row},"[0, 0, 0]"')
    path = cli.file("late_bad.csv", "\n".join(lines) + "\n")
    rejected = cli.run("ingest", str(path), "--view", "late_bad", "--batch-rows", "2")
    assert rejected.returncode == 1
    assert rejected.stdout == "" and len(rejected.stderr.splitlines()) == 1, rejected.stderr
    for part in (
        f"featureserve: {path}: INVALID_ARGUMENT: batch 2: column 'score' row 1: NaN but "
        "allow_nan is false; ",
        "in the file: row 133 (rows count from 0 after the header); rows 0..131 (132 rows) were "
        "written and are durable, nothing from row 132 on was written; fix row 133 and run the "
        "command again",
        "--policy skip_bad_rows",
    ):
        assert part in rejected.stderr, rejected.stderr
    got = read_back(client, "late_bad", list(range(200, 340)))
    statuses = got.statuses["late_bad:city"]
    assert (statuses[:132] == FeatureStatus.PRESENT).all()
    assert (statuses[132:] == FeatureStatus.NOT_FOUND).all()
    np.testing.assert_array_equal(got["late_bad:score"][:132], np.arange(132, dtype=np.float32))

    skipped = cli.run(
        "ingest", str(path), "--view", "late_bad", "--batch-rows", "2", "--policy", "skip_bad_rows"
    )
    assert skipped.returncode == 1
    assert skipped.stdout.splitlines() == [
        "written=7 stale=132 rejected=1",
        "  row 133 score: NaN but allow_nan is false",
    ]


def test_ingest_rejects_flags_out_of_range_and_writes_nothing(served) -> None:
    cli, client = served
    register(served, "bad_flags")
    path = cli.file("bad_flags.csv", CSV_ISO)
    for flags, message in (
        (("--batch-rows", "0"), "--batch-rows: '0': give rows per message, an integer >= 1"),
        (("--batch-rows", "-1"), "--batch-rows: '-1': give rows per message, an integer >= 1"),
        (("--version", "-1"), "--version: '-1': give a view version (0: the latest), an integer"),
    ):
        result = cli.run("ingest", str(path), "--view", "bad_flags", *flags)
        assert result.returncode == 2 and result.stdout == "", (flags, result.stdout)
        assert f"argument {message}" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr, result.stderr
    statuses = read_back(client, "bad_flags", [1, 2, 3]).statuses["bad_flags:city"]
    assert (statuses == FeatureStatus.NOT_FOUND).all()


def test_delete_view_rejects_a_version_outside_1_to_2_32(served) -> None:
    cli, client = served
    register(served, "kept")
    for version in ("-1", "0", "4294967296", "v1"):
        result = cli.run("delete-view", "kept", "--version", version)
        assert result.returncode == 2, result.stdout
        expected = f"argument --version: '{version}': give a view version, an integer from 1 to "
        assert expected in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert [v.version for v in client.list_feature_views("kept")[1]] == [1]


def test_get_rejects_keys_outside_int64_and_repeated_keys(served) -> None:
    cli, _ = served
    register(served, "get_range")
    for flags, message in (
        (
            ("--keys", "1,99999999999999999999"),
            "--keys: '1,99999999999999999999': join key 'user_id' is int64: "
            "99999999999999999999 is outside the int64 range "
            "(-9223372036854775808 to 9223372036854775807)",
        ),
        (("--entity", "user_id=-9223372036854775809"), "--entity: '-9223372036854775809': join"),
        (("--entity", "user_id=1", "--entity", "user_id=2"), "--entity user_id= is given twice"),
        (("--keys", "1", "--entity", "user_id=2"), "--keys and --entity user_id= both set"),
        (("--version", "4294967296"), "--version: '4294967296': give a view version"),
        # ingest refuses these cells; Python's int() read them as 10 and 1
        (("--keys", "1_0"), "--keys: '1_0': join key 'user_id' is int64; give comma-separated"),
        (("--entity", "user_id=\u0661"), "--entity: '\u0661': join key 'user_id' is int64;"),
    ):
        result = cli.run("get", "--view", "get_range", *flags)
        assert result.returncode == 2, (flags, result.stdout)
        assert message in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_get_without_keys_is_a_usage_error_with_an_example(served) -> None:
    """Without --keys or --entity there is nothing to look up: exit 2 saying what to give
    (it printed nothing and exited 0)."""
    cli, _ = served
    register(served, "no_keys")
    result = cli.run("get", "--view", "no_keys")
    assert result.returncode == 2, result.stdout
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "featureserve: get needs the entities to look up: give --keys 1,2,3 (keys of the view's "
        "first join key) or --entity NAME=V1,V2 for each join key, e.g. featureserve get "
        "--view no_keys --keys 1,2,3"
    ]


CSV_CHANGED = """user_id,event_timestamp,score,clicks,city,emb
401,2024-05-01T10:00:00Z,1e39,1,a,"[0, 0, 0]"
402,2024-05-01T10:00:00Z,16777217,1,b,"[0, 0, 0]"
403,2024-05-01T10:00:00Z,16777217.0,1,c,"[0, 0, 0]"
404,2024-05-01T10:00:00Z,0.5,1,d,"[1e39, 2, 3]"
405,2024-05-01T10:00:00Z, -7 ,1,e,"[1, 2, 3]"
406,2024-05-01T10:00:00Z,-1e39,1,f,"[0, 0, 0]"
"""


def test_ingest_refuses_values_float32_would_change_by_their_file_row(served) -> None:
    """A finite value that would overflow to inf (a cell or a vector element), or an integer
    FLOAT32 cannot hold exactly, is a bad cell named by column and file row (it was stored as
    inf or 16777216); a float is rounded, as the client's cast rule says."""
    cli, client = served
    register(served, "f32_range")
    path = cli.file("f32_range.csv", CSV_CHANGED)
    rejected = cli.run("ingest", str(path), "--view", "f32_range")
    assert rejected.returncode == 2, rejected.stdout
    assert rejected.stderr.startswith(
        f"featureserve: {path}: column 'score' row 0: 1e+39 overflows FLOAT32"
    ), rejected.stderr
    assert "(4 bad rows" in rejected.stderr, rejected.stderr
    ids = list(range(401, 407))
    assert (
        read_back(client, "f32_range", ids).statuses["f32_range:city"] == FeatureStatus.NOT_FOUND
    ).all()

    skipped = cli.run("ingest", str(path), "--view", "f32_range", "--policy", "skip_bad_rows")
    assert skipped.returncode == 1
    lines = skipped.stdout.splitlines()
    assert lines[0] == "written=2 stale=0 rejected=4", skipped.stdout
    assert [line.split(":")[0] for line in lines[1:]] == [
        "  row 0 score",
        "  row 1 score",
        "  row 3 emb",
        "  row 5 score",
    ], skipped.stdout
    assert "16777217 is not exactly representable as FLOAT32" in lines[2], lines[2]
    assert "1e+39 overflows FLOAT32_VECTOR" in lines[3], lines[3]
    got = read_back(client, "f32_range", ids)
    present = got.statuses["f32_range:score"] == FeatureStatus.PRESENT
    assert present.tolist() == [False, False, True, False, True, False]
    assert got["f32_range:score"][present].tolist() == [16777216.0, -7.0]

    frame = pd.DataFrame(
        {
            "user_id": np.array([411, 412], dtype=np.int64),
            "event_timestamp": pd.to_datetime(["2024-05-01", "2024-05-01"]),
            "score": np.array([1e39, 2.0]),
            "emb": [np.array([1.0, 2.0, 3.0]), np.array([1e39, 2.0, 3.0])],
        }
    )
    frame.to_parquet(cli.base / "f32_range.parquet", engine="pyarrow")
    result = cli.run(
        "ingest",
        str(cli.base / "f32_range.parquet"),
        "--view",
        "f32_range",
        "--policy",
        "skip_bad_rows",
    )
    assert result.returncode == 1
    assert result.stdout.splitlines()[0] == "written=0 stale=0 rejected=2", result.stdout
    assert "row 0 score: 1e+39 overflows FLOAT32" in result.stdout
    assert "row 1 emb: 1e+39 overflows FLOAT32_VECTOR" in result.stdout
    assert (
        read_back(client, "f32_range", [411, 412]).statuses["f32_range:emb"]
        == FeatureStatus.NOT_FOUND
    ).all()


HEADER = "user_id,event_timestamp,score,clicks,city,emb\n"


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.csv", "", "the file is empty; a CSV needs a header row naming its columns"),
        (
            "ragged.csv",
            HEADER + "1,2024-05-01T10:00:00Z,0.5,1,a,\n2,2024-05-01T10:00:00Z,0.5,1,a,,9\n",
            "row 1 has 7 cells but the header has 6 columns (rows count from 0 after the header); "
            "give every row one cell per column",
        ),
        ("absent.csv", None, "cannot read the file ("),
        (
            "int_time_empty.csv",
            HEADER + "1,1714557600000000,0.5,1,a,\n2,,0.5,1,b,\n",
            "column 'event_timestamp' row 1: the event time is empty; fix the file, or pass "
            "--policy skip_bad_rows",
        ),
        (
            "no_times.csv",
            HEADER + "1,,0.5,1,a,\n2,,0.5,1,b,\n",
            "column 'event_timestamp' row 0: the event time is empty; fix the file",
        ),
        (
            "bad_time.csv",
            HEADER + "1,1714557600000000,0.5,1,a,\n2,x,0.5,1,b,\n",
            "column 'event_timestamp' row 1: 'x' is neither an ISO 8601 time nor µs since the",
        ),
        (
            "nan_time.parquet",
            pa.table({"user_id": [1, 2], "event_timestamp": pa.array([1.7e15, float("nan")])}),
            "column 'event_timestamp' row 1: nan is not an integer of µs since the epoch",
        ),
        ("text.parquet", "not parquet", "not a Parquet file ("),
        (
            "secs.csv",
            HEADER + "1,1704153600,0.5,1,a,\n2,1704153600,0.5,1,b,\n",
            "column 'event_timestamp' row 0: 1704153600 is neither an ISO 8601 time nor µs since "
            "the epoch (µs are numbers from 1000000000000000 (2001-09-09) on; a smaller number "
            "looks like seconds or ms: give µs (seconds x 1000000) or ISO 8601 times); fix the "
            "file",
        ),
        (
            "millis.parquet",
            pa.table({"user_id": [1, 2], "event_timestamp": [1714557600000000, 1714557600000]}),
            "column 'event_timestamp' row 1: 1714557600000 is neither an ISO 8601 time nor µs",
        ),
        (
            "secs_float.csv",
            HEADER + "1,1704153600.5,0.5,1,a,\n2,1714557600000000,0.5,1,b,\n",
            "column 'event_timestamp' row 0: 1704153600.5 is not an integer of µs since the epoch "
            "in the int64 range (µs are numbers from 1000000000000000 (2001-09-09) on",
        ),
        (
            "wrapped.parquet",
            pa.table(
                {
                    "user_id": [1, 2],
                    # 18448448227310 s in µs wraps past 2**64 to 2024-01-02 (year ~586,000)
                    "event_timestamp": pa.array([1714557600, 18448448227310], pa.timestamp("s")),
                }
            ),
            # Parquet keeps seconds as ms
            "column 'event_timestamp' row 1: 18448448227310000 ms since the epoch is beyond the "
            "event times int64 µs can hold (about 292,000 years either side of 1970); give a "
            "time within them; fix the file",
        ),
        (
            "dup.csv",
            "user_id,event_timestamp,score,score,clicks,city,emb\n1,2024-05-01T10:00:00Z,1,2,1,a,\n",
            "column 'score' appears 2 times in the header; give each column a name of its own",
        ),
        (
            "dup.parquet",
            pa.Table.from_arrays(
                [pa.array([1, 2]), pa.array([1714557600000000] * 2), pa.array([0.5, 0.5])] * 2,
                names=["user_id", "event_timestamp", "score"] * 2,
            ),
            "column 'user_id' appears 2 times in the schema; give each column a name of its own",
        ),
    ],
)
def test_ingest_of_an_unusable_file_exits_2_naming_file_row_and_fix(
    served, name: str, content, message: str
) -> None:
    """Files pyarrow cannot read, and event times that are empty or not times, are one-line
    input errors naming the file, the row and the fix (they were tracebacks, or blamed row 0
    for the bad cell of row 1), and nothing is written."""
    cli, client = served
    view = f"unusable_{name.replace('.', '_')}"
    register(served, view)
    path = cli.base / name
    if isinstance(content, pa.Table):
        pq.write_table(content, path)
    elif content is not None:
        path.write_text(content, encoding="utf-8")
    result = cli.run("ingest", str(path), "--view", view)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"featureserve: {path}: "), result.stderr
    assert message in lines[0], result.stderr
    assert result.stdout == ""
    got = read_back(client, view, [1, 2])
    assert (got.statuses[f"{view}:score"] == FeatureStatus.NOT_FOUND).all()


def test_ingest_reads_compact_dates_signed_numbers_and_refuses_text_beyond_float64(
    served,
) -> None:
    """In a text time column "20240102" is a date (it became 20 µs after 1970); "+3" is the
    number 3 (it was refused as an integer outside int64); "1e400" overflows FLOAT64 and is a
    bad cell (it was stored as inf), while "inf" spelled out stays infinity."""
    cli, client = served
    register(served, "text_edge")
    path = cli.file(
        "text_edge.csv",
        "user_id,event_timestamp,score,clicks,city,emb\n"
        '501,20240102,+3,1,a,"[0, 0, 0]"\n'
        '502,2024-01-02T00:00:00Z,1e400,1,b,"[0, 0, 0]"\n'
        '503,2024-01-02T00:00:00Z,inf,1,c,"[0, 0, 0]"\n',
    )
    result = cli.run("ingest", str(path), "--view", "text_edge", "--policy", "skip_bad_rows")
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "written=2 stale=0 rejected=1", result.stdout
    assert lines[1].startswith("  row 1 score: '1e400' overflows FLOAT64"), result.stdout
    got = read_back(client, "text_edge", [501, 502, 503])
    assert got.event_timestamps["text_edge"][0] == us("2024-01-02T00:00:00Z")
    assert got["text_edge:score"][0] == 3.0 and np.isinf(got["text_edge:score"][2])
    assert got.statuses["text_edge:score"][1] == FeatureStatus.NOT_FOUND


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_integer_event_times_follow_the_rule_of_text_ones(served, kind: str) -> None:
    """In an integer time column (a CSV of whole numbers, a Parquet int64) a number below 10**15
    is read as a time ("20240102" is a date) or refused naming the column, the row and the fix,
    as in text: epoch seconds and ms were written as µs in 1970 (1704153600 as 00:28:24)."""
    cli, client = served
    view = f"int_times_{kind}"
    register(served, view)
    t0 = us("2024-05-01T10:00:00")
    times = [1704153600, t0, 20240102, 1704153600000]
    ids = [601, 602, 603, 604]
    path = cli.base / f"{view}.{kind}"
    if kind == "csv":
        rows = "".join(f'{i},{t},0.5,1,a,"[0, 0, 0]"\n' for i, t in zip(ids, times, strict=True))
        path.write_text(HEADER + rows, encoding="utf-8")
    else:
        features = {
            "score": [0.5] * 4,
            "clicks": [1] * 4,
            "city": ["a"] * 4,
            "emb": [[0, 0, 0]] * 4,
        }
        pq.write_table(pa.table({"user_id": ids, "event_timestamp": times, **features}), path)
    rejected = cli.run("ingest", str(path), "--view", view)
    assert rejected.returncode == 2, rejected.stdout
    assert rejected.stderr.startswith(
        f"featureserve: {path}: column 'event_timestamp' row 0: 1704153600 is neither an ISO "
        "8601 time nor µs since the epoch (µs are numbers from 1000000000000000 (2001-09-09) on; "
        "a smaller number looks like seconds or ms: give µs (seconds x 1000000) or ISO 8601 "
        "times); fix the file, or pass --policy skip_bad_rows"
    ), rejected.stderr
    skipped = cli.run("ingest", str(path), "--view", view, "--policy", "skip_bad_rows")
    assert skipped.returncode == 1, skipped.stderr
    lines = skipped.stdout.splitlines()
    assert lines[0] == "written=2 stale=0 rejected=2", skipped.stdout
    assert lines[1].startswith("  row 0 event_timestamp: 1704153600 is neither"), skipped.stdout
    assert lines[2].startswith("  row 3 event_timestamp: 1704153600000 is neither"), lines
    got = read_back(client, view, ids)
    assert got.event_timestamps[view][1:3].tolist() == [t0, us("2024-01-02T00:00:00")]
    statuses = got.statuses[f"{view}:score"].tolist()
    assert statuses[0] == statuses[3] == FeatureStatus.NOT_FOUND


def test_a_csv_row_longer_than_pyarrows_block_is_read(served) -> None:
    """A row of several MB (a vector of 700,000 floats as text; up to 1,048,576 are allowed) is
    read and written (pyarrow's 1 MB blocks refused it as a straddling object)."""
    cli, client = served
    length = 700_000
    toml = view_toml("long_rows", "user", "user_id:int64", {"emb": "float32_vector"})
    toml += f"vector_length = {length}\n"
    defs = load_definitions(cli.file("long_rows.toml", toml))
    client.apply(defs.entities, defs.views)
    vector = np.arange(length, dtype=np.float32) % 7 / 4
    cell = " ".join(f"{x:g}" for x in vector)
    path = cli.file(
        "long_rows.csv", f"user_id,event_timestamp,emb\n1,2024-05-01T10:00:00Z,{cell}\n"
    )
    assert path.stat().st_size > 2 * 2**20
    result = cli.run("ingest", str(path), "--view", "long_rows")
    assert (result.returncode, result.stdout.strip()) == (0, "written=1 stale=0 rejected=0"), (
        result.stderr
    )
    got = client.get_online_features(["long_rows:emb"], {"user_id": np.array([1])})
    np.testing.assert_array_equal(got["long_rows:emb"][0], vector)


def flags_toml(view: str) -> str:
    """An int64 `user` entity and a view with a bool and an int64 feature."""
    return view_toml(view, "user", "user_id:int64", {"flag": "bool", "clicks": "int64"})


@pytest.mark.parametrize(
    ("kind", "column", "bad"),
    [
        ("int", pa.array([2, -1, 0, 1, None], pa.int64()), ["2", "-1"]),
        ("uint8", pa.array([0, 1, 0, 1, 7], pa.uint8()), ["7"]),
        ("float", pa.array([0.5, -3.0, 0.0, 1.0, float("nan")]), ["0.5", "-3.0", "nan"]),
    ],
)
def test_ingest_refuses_parquet_numbers_other_than_0_and_1_for_a_bool(
    served, kind: str, column: pa.Array, bad: list[str]
) -> None:
    """A number in a BOOL feature is written only when it is 0 or 1; any other (2, -1, 0.5, NaN)
    is a bad cell handled by --policy (Arrow's cast stored them as true)."""
    cli, client = served
    view = f"bools_{kind}"
    defs = load_definitions(cli.file(f"{view}.toml", flags_toml(view)))
    client.apply(defs.entities, defs.views)
    ids = [701, 702, 703, 704, 705]
    path = cli.base / f"{view}.parquet"
    stamps = pa.array([us("2024-05-01T10:00:00")] * 5, pa.int64())
    clicks = pa.array([1] * 5, pa.int64())
    table = {"user_id": ids, "event_timestamp": stamps, "flag": column, "clicks": clicks}
    pq.write_table(pa.table(table), path)
    rejected = cli.run("ingest", str(path), "--view", view)
    assert rejected.returncode == 2, rejected.stdout
    first = next(row for row, cell in enumerate(column.to_pylist()) if str(cell) == bad[0])
    assert (
        f"column 'flag' row {first}: {bad[0]} is not BOOL (a number must be 0 or 1); fix the file"
    ) in rejected.stderr, rejected.stderr
    got = client.get_online_features([view], {"user_id": np.array(ids)})
    assert (got.statuses[f"{view}:flag"] == FeatureStatus.NOT_FOUND).all()

    skipped = cli.run("ingest", str(path), "--view", view, "--policy", "skip_bad_rows")
    assert skipped.returncode == 1, skipped.stderr
    lines = skipped.stdout.splitlines()
    assert lines[0] == f"written={5 - len(bad)} stale=0 rejected={len(bad)}", skipped.stdout
    assert [line.split(": ", 1)[1].split(" ")[0] for line in lines[1:]] == bad, skipped.stdout
    got = client.get_online_features([view], {"user_id": np.array(ids)})
    cells = column.to_pylist()
    for row, cell in enumerate(cells):
        status = got.statuses[f"{view}:flag"][row]
        if cell is None:
            assert status == FeatureStatus.NULL_VALUE
        elif cell in (0, 1):
            assert (status, got[f"{view}:flag"][row]) == (FeatureStatus.PRESENT, cell == 1)
        else:
            assert status == FeatureStatus.NOT_FOUND, (row, cell)


def test_a_quoted_empty_csv_cell_is_an_empty_string_and_an_unquoted_one_null(served) -> None:
    """In a CSV, "" in a STRING feature is the empty string (it was read as NULL); an unquoted
    empty cell stays NULL, and either kind of empty cell of another dtype stays NULL."""
    cli, client = served
    register(served, "quoted")
    path = cli.file(
        "quoted.csv",
        HEADER + '801,2024-05-01T10:00:00Z,0.5,"","",""\n802,2024-05-01T10:00:00Z,0.5,,,\n',
    )
    result = cli.run("ingest", str(path), "--view", "quoted")
    assert (result.returncode, result.stdout.strip()) == (0, "written=2 stale=0 rejected=0"), (
        result.stderr
    )
    got = read_back(client, "quoted", [801, 802])
    assert got.statuses["quoted:city"].tolist() == [
        FeatureStatus.PRESENT,
        FeatureStatus.NULL_VALUE,
    ]
    assert got["quoted:city"][0] == ""
    for name in ("clicks", "emb"):
        assert (got.statuses[f"quoted:{name}"] == FeatureStatus.NULL_VALUE).all(), name


def test_a_quoted_empty_event_time_leaves_the_others_whole_numbers(served) -> None:
    """A quoted "" among µs event times is an empty event time at its row; the other times stay
    numbers (reading quoted "" as text made the column text, so every row was read as text)."""
    cli, client = served
    register(served, "quoted_time")
    t0 = 1_714_557_600_000_000
    path = cli.file(
        "quoted_time.csv",
        "user_id,event_timestamp,score,clicks,city,emb\n"
        f'811,{t0},0.5,1,a,"[0, 0, 0]"\n'
        '812,"",0.5,1,b,"[0, 0, 0]"\n'
        f'813,{t0 + 1},0.5,1,c,"[0, 0, 0]"\n',
    )
    result = cli.run("ingest", str(path), "--view", "quoted_time", "--policy", "skip_bad_rows")
    assert result.stdout.splitlines()[0] == "written=2 stale=0 rejected=1", result.stderr
    assert "row 1 event_timestamp: the event time is empty" in result.stdout
    got = read_back(client, "quoted_time", [811, 813])
    assert got.event_timestamps["quoted_time"].tolist() == [t0, t0 + 1]


def test_a_server_row_error_in_the_event_times_names_the_files_time_column(served) -> None:
    """An event time only the server refuses (before 1970) is reported under the file's
    event-time column, not the wire's `event_timestamps`, with either policy."""
    cli, _ = served
    register(served, "time_named")
    path = cli.file(
        "time_named.csv",
        "user_id,ts,score,clicks,city,emb\n"
        '901,2024-05-01T10:00:00Z,0.5,1,a,"[0, 0, 0]"\n'
        '902,1960-01-01T00:00:00Z,0.5,1,b,"[0, 0, 0]"\n',
    )
    rejected = cli.run("ingest", str(path), "--view", "time_named", "--event-time-column", "ts")
    assert rejected.returncode == 1, rejected.stdout
    assert "; in the file: column 'ts' row 1 (rows count from 0" in rejected.stderr, rejected.stderr
    skipped = cli.run(
        "ingest",
        str(path),
        "--view",
        "time_named",
        "--event-time-column",
        "ts",
        "--policy",
        "skip_bad_rows",
    )
    assert skipped.returncode == 1
    assert skipped.stdout.splitlines() == [
        "written=1 stale=0 rejected=1",
        "  row 1 ts: event time must be > 0 µs since the epoch",
    ]


def test_get_of_a_key_that_is_not_utf8_exits_2_naming_it(served) -> None:
    """A key from non-UTF-8 argv (a lone surrogate in Python) is one line naming the key and
    row, exit 2 (it was a UnicodeEncodeError traceback)."""
    cli, client = served
    defs = load_definitions(cli.file("skus_argv.toml", sku_toml("skus_argv")))
    client.apply(defs.entities, defs.views)
    # subprocess encodes the surrogate back to the byte 0xff: the argv the shell would pass
    result = cli.run("get", "--view", "skus_argv", "--entity", "sku_id=ok,\udcff")
    assert result.returncode == 2, result.stdout
    assert result.stderr.splitlines() == [
        "featureserve: --keys/--entity: keys['sku_id']: row 1: lone surrogate '\\udcff' at "
        "character 0 is not encodable as UTF-8; send valid Unicode text"
    ]


def test_a_view_name_that_is_not_utf8_exits_2_naming_it(served) -> None:
    """Any other argument from non-UTF-8 argv (here --view) is one line, exit 2 (a
    UnicodeEncodeError traceback from protobuf)."""
    cli, _ = served
    result = cli.run("get", "--view", "bad\udcff", "--keys", "1")
    assert result.returncode == 2, result.stdout
    assert result.stderr.splitlines() == [
        "featureserve: '\\udcff' in an argument is not UTF-8 text"
    ]


def test_output_the_terminal_cannot_encode_is_named_as_such(served) -> None:
    """A stored "café" printed to an ASCII stdout: one line saying the output's encoding cannot
    print it and how to fix that, not that an argument is not UTF-8."""
    cli, client = served
    register(served, "encoded")
    now = np.array([int(time.time() * 1e6)])
    values = {
        "score": np.array([0.5]),
        "clicks": np.array([1]),
        "city": ["café"],
        "emb": np.zeros((1, 3), np.float32),
    }
    client.write_features("encoded", {"user_id": np.array([7])}, now, values)
    result = cli.run("get", "--view", "encoded", "--keys", "7", env={"PYTHONIOENCODING": "ascii"})
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        "featureserve: '\\xe9' cannot be printed in this output's encoding (ascii); set "
        "PYTHONIOENCODING=utf-8 or a UTF-8 locale"
    )


def service_toml(view: str, features: str) -> str:
    """features_toml's view, a `{view}_flags` view (bool `active`) and a feature service
    `{view}_model` reading `features` (a TOML array)."""
    return (
        features_toml(view)
        + f"""
[[feature_view]]
name = "{view}_flags"
entity = "user"

[[feature_view.feature]]
name = "active"
dtype = "bool"

[[feature_service]]
name = "{view}_model"
features = {features}
owner = "tests"
"""
    )


def test_apply_registers_feature_services_and_get_reads_them(served) -> None:
    cli, client = served
    features = '["svc_get:score", "svc_get:city", "svc_get_flags"]'
    path = cli.file("svc_get.toml", service_toml("svc_get", features))
    applied = cli.run("apply", str(path))
    assert (applied.returncode, applied.stdout.splitlines()) == (
        0,
        ["svc_get@1: created", "svc_get_flags@1: created", "service svc_get_model: created"],
    )
    fewer = cli.file("svc_get_fewer.toml", service_toml("svc_get", '["svc_get:score"]'))
    dry = cli.run("apply", str(fewer), "--dry-run")
    assert (dry.returncode, dry.stdout.splitlines()) == (
        0,
        [
            "svc_get@1: unchanged",
            "svc_get_flags@1: unchanged",
            "service svc_get_model: would be updated",
            "dry run: nothing was written; apply without --dry-run to write",
        ],
    )
    assert client.get_feature_service("svc_get_model").features == (
        "svc_get:score",
        "svc_get:city",
        "svc_get_flags",
    )
    assert cli.run("apply", str(path)).stdout.splitlines()[-1] == "service svc_get_model: unchanged"

    ingest = cli.run("ingest", str(cli.file("svc_get.csv", CSV_ISO)), "--view", "svc_get")
    assert ingest.returncode == 0, ingest.stderr
    client.write_features("svc_get_flags", {"user_id": [2]}, 5, {"active": np.array([True])})
    got = cli.run("get", "--feature-service", "svc_get_model", "--keys", "2,999")
    assert got.returncode == 0, got.stderr
    per_view = [
        cli.run("get", "--view", "svc_get", "--features", "score,city", "--keys", "2,999"),
        cli.run("get", "--view", "svc_get_flags", "--keys", "2,999"),
    ]
    # each view's block as --view prints it, headed by the view and the version read
    headers = ["svc_get@1:\n", "svc_get_flags@1:\n"]
    assert got.stdout == "".join(h + run.stdout for h, run in zip(headers, per_view, strict=True))
    assert got.stdout.splitlines()[:4] == [
        "svc_get@1:",
        f"[user_id=2] event_time_us={us('2024-05-01T09:00:00')}",
        "  svc_get:score = 1.25 (PRESENT)",
        "  svc_get:city = Oslo (PRESENT)",
    ]
    assert got.stdout.splitlines()[7:10] == [
        "svc_get_flags@1:",
        "[user_id=2] event_time_us=5",
        "  svc_get_flags:active = True (PRESENT)",
    ]


def test_get_by_feature_service_refuses_view_flags_and_unknown_services(served) -> None:
    cli, _ = served
    path = cli.file("svc_flags.toml", service_toml("svc_flags", '["svc_flags:score"]'))
    assert cli.run("apply", str(path)).returncode == 0
    both = cli.run(
        "get", "--feature-service", "svc_flags_model", "--view", "svc_flags", "--keys", "1"
    )
    assert both.returncode == 2 and "not allowed with argument" in both.stderr, both.stderr
    for flag in (["--features", "score"], ["--version", "0"]):
        result = cli.run("get", "--feature-service", "svc_flags_model", *flag, "--keys", "1")
        assert result.returncode == 2, result.stdout
        assert result.stderr.splitlines() == [
            "featureserve: --feature-service reads the views, versions and features the service "
            "names; drop --version and --features (they go with --view)"
        ]
    for empty in (["get", "--feature-service", "", "--keys", "1"], ["delete-service", ""]):
        refused = cli.run(*empty)
        assert (refused.returncode, refused.stdout) == (2, ""), refused.stderr
        flag = "--feature-service" if empty[0] == "get" else "NAME"
        assert refused.stderr.startswith(f"featureserve: {flag}: empty; name ")
    no_keys = cli.run("get", "--feature-service", "svc_flags_model")
    assert no_keys.returncode == 2
    assert no_keys.stderr.strip().endswith(
        "featureserve get --feature-service svc_flags_model --keys 1,2,3"
    )
    unknown = cli.run("get", "--feature-service", "svc_flags_modl", "--keys", "1")
    assert unknown.returncode == 1
    assert unknown.stderr.startswith("featureserve: NOT_FOUND: feature service 'svc_flags_modl'")
    assert "did you mean 'svc_flags_model'" in unknown.stderr


def test_delete_service_removes_the_service_not_its_views(served) -> None:
    cli, client = served
    path = cli.file("svc_del.toml", service_toml("svc_del", '["svc_del_flags"]'))
    assert cli.run("apply", str(path)).returncode == 0
    refused = cli.run("delete-view", "svc_del_flags", "--version", "1")
    assert refused.returncode == 1
    assert refused.stderr.startswith("featureserve: FAILED_PRECONDITION: "), refused.stderr
    assert "would break feature service 'svc_del_model'" in refused.stderr
    deleted = cli.run("delete-service", "svc_del_model")
    assert (deleted.returncode, deleted.stdout) == (0, "service svc_del_model: deleted\n")
    assert client.list_feature_services("svc_del") == []
    assert client.get_feature_view("svc_del_flags").version == 1
    again = cli.run("delete-service", "svc_del_model")
    assert again.returncode == 1
    assert again.stderr.startswith("featureserve: NOT_FOUND: feature service 'svc_del_model'")
    assert cli.run("delete-view", "svc_del_flags", "--version", "1").returncode == 0


def test_apply_of_a_bad_feature_service_exits_2_naming_file_and_key(served) -> None:
    cli, client = served
    path = cli.file("svc_bad.toml", service_toml("svc_bad", '["svc_bad:score", "svc_bad@1:city"]'))
    result = cli.run("apply", str(path))
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.splitlines() == [
        f"featureserve: {path}: feature_service[0] (svc_bad_model): features[1] 'svc_bad@1:city' "
        "reads view 'svc_bad' at version 1, but features[0] reads it at its latest version; a "
        "service reads each view at one version"
    ]
    assert client.list_feature_views("svc_bad")[1] == []


def test_apply_prune_deletes_what_the_file_no_longer_declares(server_factory, tmp_path) -> None:
    """--prune prints one line per deletion and a count (--dry-run: what would be deleted,
    writing nothing); a file declaring nothing is refused before anything is sent, since it
    would delete everything registered."""
    server = server_factory()
    cli = Cli(server.target, tmp_path)
    driver = (
        '\n[[entity]]\nname = "driver"\njoin_keys = [{ name = "driver_id", dtype = "string" }]\n'
    )
    full = cli.file("full.toml", service_toml("pr", '["pr:score"]') + driver)
    assert cli.run("apply", str(full)).returncode == 0
    fewer = cli.file("fewer.toml", features_toml("pr"))
    deletions = ["pr_flags@1: {}", "service pr_model: {}", "entity driver: {}", "prune: 3 {}"]

    dry = cli.run("apply", str(fewer), "--prune", "--dry-run")
    assert (dry.returncode, dry.stdout.splitlines()) == (
        0,
        [
            "pr@1: unchanged",
            *(line.format("would be deleted") for line in deletions),
            "dry run: nothing was written; apply without --dry-run to write",
        ],
    )
    empty = cli.file("empty.toml", "")
    refused = cli.run("apply", str(empty), "--prune")
    assert (refused.returncode, refused.stdout) == (2, "")
    assert refused.stderr == (
        f"featureserve: {empty}: declares no entity, feature view or feature service, so "
        "--prune would delete everything registered; declare what the registry should hold, or "
        "delete by hand (featureserve delete-view, delete-service)\n"
    )
    with FeatureStoreClient(ClientConfig(target=server.target, timeout_s=20)) as client:
        entities, views = client.list_feature_views()
        assert [v.name for v in views] == ["pr", "pr_flags"]
        assert [e.name for e in entities] == ["driver", "user"]
        assert [s.name for s in client.list_feature_services()] == ["pr_model"]

        pruned = cli.run("apply", str(fewer), "--prune")
        assert (pruned.returncode, pruned.stdout.splitlines()) == (
            0,
            ["pr@1: unchanged", *(line.format("deleted") for line in deletions)],
        )
        entities, views = client.list_feature_views()
        assert [v.name for v in views] == ["pr"] and [e.name for e in entities] == ["user"]
        assert client.list_feature_services() == []
    again = cli.run("apply", str(fewer), "--prune")
    assert again.stdout.splitlines() == ["pr@1: unchanged", "prune: 0 deleted"]
