"""`featureserve training-set`: a labelled CSV or Parquet file joined point-in-time with views
of two entities, written as Parquet equal to training_set; refused inputs exit 2 naming them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from featurestore.dtypes import DType, FeatureStatus
from featurestore.online_store import OnlineStore, StoreConfig, WriteBatch
from featurestore.registry import Entity, Feature, FeatureService, FeatureView, JoinKey
from featurestore.training_set import training_set
from tests.conftest import featureserve

NOW = 1_800_000_000_000_000
SEC = 1_000_000
USER = Entity("user", (JoinKey("user_id", DType.INT64),))
SHOP = Entity("shop", (JoinKey("shop", DType.STRING),))
SPEND = FeatureView(
    "spend",
    "user",
    (Feature("amount", DType.FLOAT64), Feature("vip", DType.BOOL)),
    ttl_seconds=60,
)
RATING = FeatureView(
    "rating",
    "shop",
    (Feature("name", DType.STRING), Feature("vec", DType.FLOAT32_VECTOR, vector_length=2)),
)
ODD = FeatureView("odd", "user", (Feature("y", DType.FLOAT64), Feature("y__status", DType.FLOAT64)))
REFS = ["spend:amount", "rating", "spend:vip"]


@pytest.fixture
def data(tmp_path: Path) -> Path:
    with OnlineStore(StoreConfig(tmp_path / "data")) as store:
        store.registry.apply([USER, SHOP], [SPEND, RATING, ODD])
        for r in range(3):
            users = np.array([1, 2, 3])
            store.write(
                WriteBatch(
                    "spend",
                    {"user_id": users},
                    np.full(3, NOW + r * 100 * SEC),
                    {"amount": users * 10.0 + r, "vip": users == 2},
                ),
                now_us=NOW + r * 100 * SEC,
            )
        late = {"amount": np.array([99.0]), "vip": np.array([True])}
        batch = WriteBatch("spend", {"user_id": np.array([2])}, np.array([NOW + 230 * SEC]), late)
        store.write(batch, now_us=NOW + 260 * SEC)  # after the label at +250 s
        shops = np.array(["007", "b"], dtype=object)
        store.write(
            WriteBatch(
                "rating",
                {"shop": shops},
                np.full(2, NOW),
                {"name": np.array(["seven", "bee"], object), "vec": np.ones((2, 2), np.float32)},
            ),
            now_us=NOW,
        )
    return tmp_path / "data"


def build(labels: str | Path, features: str, out: str | Path, data: Path, *flags: str):
    """Run `featureserve training-set --features` to its end."""
    return build_with(labels, out, data, "--features", features, *flags)


def build_with(labels: str | Path, out: str | Path, data: Path, *flags: str):
    """Run `featureserve training-set` with these flags choosing the features."""
    return featureserve(
        "training-set", str(labels), "--out", str(out), "--data-dir", str(data), *flags
    )


def labels() -> dict[str, list]:
    return {
        "user_id": [1, 2, 3, 9, 1],
        "shop": ["007", "b", "zz", "007", "b"],
        "label": [0, 1, 0, 1, 1],
        "event_timestamp": [NOW + 150 * SEC, NOW + 250 * SEC, NOW - SEC, NOW, NOW + 400 * SEC],
    }


def expected(data: Path, refs: list[str], as_served: bool = False):
    rows = labels()
    keys = {
        "user_id": np.array(rows["user_id"]),
        "shop": np.array(rows["shop"], dtype=object),
    }
    with OnlineStore(StoreConfig(data)) as store:
        ts = np.array(rows["event_timestamp"])
        return training_set(store, keys, ts, refs, as_served=as_served)


def test_a_csv_of_labels_becomes_a_parquet_training_set(data: Path, tmp_path: Path):
    rows = labels()
    iso = [
        np.datetime_as_string(np.datetime64(t, "us"), unit="us") + "Z"
        for t in rows["event_timestamp"]
    ]
    csv = tmp_path / "labels.csv"
    columns = [rows["user_id"], rows["shop"], rows["label"], iso]
    lines = [",".join(map(str, row)) for row in zip(*columns, strict=True)]
    csv.write_text("user_id,shop,label,event_timestamp\n" + "\n".join(lines) + "\n")
    out = tmp_path / "train.parquet"
    done = build(csv, ",".join(REFS), out, data)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"wrote 5 rows x 4 features to {out} (")
    table = pq.read_table(out)
    assert table.column_names == [
        "user_id", "shop", "label", "event_timestamp",
        "spend:amount", "spend:amount__status", "rating:name", "rating:name__status",
        "rating:vec", "rating:vec__status", "spend:vip", "spend:vip__status",
        "spend__event_timestamp", "rating__event_timestamp",
    ]  # fmt: skip
    assert table.column("shop").to_pylist() == rows["shop"]  # "007" stays text
    assert table.column("label").to_pylist() == [str(label) for label in rows["label"]]
    want = expected(data, REFS)
    for ref, values in want.values.items():
        present = want.statuses[ref] == FeatureStatus.PRESENT
        got = table.column(ref).to_pylist()
        assert [g for g, p in zip(got, present, strict=True) if not p] == [None] * (~present).sum()
        assert [g for g, p in zip(got, present, strict=True) if p] == values[present].tolist()
        names = [FeatureStatus(s).name for s in want.statuses[ref]]
        assert table.column(f"{ref}__status").to_pylist() == names
    assert table.column("spend:amount").to_pylist() == [11.0, 99.0, None, None, None]
    assert table.column("spend:amount__status").to_pylist()[3:] == ["NOT_FOUND", "OUTSIDE_MAX_AGE"]
    stamps = table.column("spend__event_timestamp").cast(pa.int64()).to_pylist()
    assert stamps == [NOW + 100 * SEC, NOW + 230 * SEC, None, None, NOW + 200 * SEC]


def test_parquet_labels_with_timestamp_values_and_as_served(data: Path, tmp_path: Path):
    rows = labels()
    table = pa.table(
        {**rows, "event_timestamp": pa.array(rows["event_timestamp"], pa.timestamp("us", "UTC"))}
    )
    source = tmp_path / "labels.parquet"
    pq.write_table(table, source)
    out = tmp_path / "served.parquet"
    done = build(source, "spend:amount", out, data, "--as-served")
    assert done.returncode == 0, done.stderr
    served = pq.read_table(out)
    want = expected(data, ["spend:amount"], as_served=True)
    statuses = want.statuses["spend:amount"]
    assert served.column("spend:amount__status").to_pylist() == [
        FeatureStatus(s).name for s in statuses
    ]
    # user 2's row of +230 s was written at +260 s: its label at +250 s was served the +200 one
    assert served.column("spend:amount").to_pylist()[:2] == [11.0, 22.0]


@pytest.mark.parametrize(
    ("csv", "features", "code", "message"),
    [
        ("user_id,t\n1,5\n", "rating:name", 2, "no column 'shop' (a join key column"),
        ("user_id,shop\n1,a\n", "spend:amount", 2, "no column 'event_timestamp'"),
        ("user_id,event_timestamp\n,5\n", "spend:amount", 2, "'user_id' row 0: a join key"),
        ("user_id,event_timestamp\n1,1.5\n", "spend:amount", 2, "double values; give"),
        ("user_id,event_timestamp\nx,5\n", "spend:amount", 2, "LABELS labels.csv"),
        (
            "user_id,event_timestamp,spend:amount\n1,5,0\n",
            "spend:amount",
            2,
            "LABELS has the column name 'spend:amount'",
        ),
        ("user_id,event_timestamp\n1,5\n", "spend:amout", 1, "amout"),
        ("user_id,event_timestamp\n1,5\n", "odd", 2, "two outputs take the column name 'odd:y__"),
        ("user_id,user_id,event_timestamp\n1,1,5\n", "spend", 2, "two columns are named 'user"),
        ("user_id,event_timestamp,n,n\n1,5,a,b\n", "spend", 2, "two columns are named 'n'"),
        ("user_id,event_timestamp\ntrue,5\n", "spend", 2, "conversion error to int64"),
        ("user_id,event_timestamp\n1,5\n", " , ", 2, "--features: give at least one"),
    ],
)
def test_refused_inputs_name_what_to_fix(data, tmp_path, monkeypatch, csv, features, code, message):
    monkeypatch.chdir(tmp_path)
    Path("labels.csv").write_text(csv)
    done = build("labels.csv", features, "out.parquet", data)
    assert (done.returncode, done.stdout) == (code, ""), done.stderr
    assert message in done.stderr
    assert not Path("out.parquet").exists()


def test_empty_parquet_and_uppercase_names_and_a_directory_out(data: Path, tmp_path: Path):
    """A file of no rows still types the columns it adds; Parquet is known by its magic, not
    its name; an OUT that cannot be replaced leaves no partial file."""
    empty = pa.table(
        {"user_id": pa.array([], pa.int64()), "event_timestamp": pa.array([], pa.int64())}
    )
    source = tmp_path / "LABELS.PARQUET"
    pq.write_table(empty, source)
    out = tmp_path / "empty.parquet"
    done = build(source, "spend", out, data)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"wrote 0 rows x 2 features to {out}\n"
    written = pq.read_table(out)
    assert written.num_rows == 0
    assert written.schema.field("spend:amount__status").type == pa.string()
    (tmp_path / "taken").mkdir()
    done = build(source, "spend", tmp_path / "taken", data)
    assert done.returncode == 1
    assert "--out" in done.stderr and done.stderr.count("\n") == 1
    assert not list(tmp_path.glob(".*partial"))
    pq.write_table(pa.table({"user_id": [True], "event_timestamp": [5]}), source)
    done = build(source, "spend", out, data)
    assert done.returncode == 2
    assert "'user_id': bool values, expected INT64 join keys" in done.stderr


def test_labels_before_the_history_horizon_are_refused_naming_the_column(data: Path, tmp_path):
    compacted = featureserve("compact-history", "--data-dir", str(data), "--before", "2026-01-01")
    assert compacted.returncode == 0, compacted.stderr
    (tmp_path / "old.csv").write_text("user_id,event_timestamp\n1,2025-06-01T00:00:00Z\n")
    done = build(tmp_path / "old.csv", "spend:amount", tmp_path / "o.parquet", data)
    assert done.returncode == 2
    assert "LABELS column 'event_timestamp': row 0 is" in done.stderr
    assert "before the history's horizon" in done.stderr


def test_a_csv_with_a_byte_order_mark_keeps_its_other_columns_as_text(data: Path, tmp_path):
    """Excel's "CSV UTF-8" starts with a byte order mark (and a blank first line is skipped):
    the header must still be read as pyarrow reads it, so `007` stays text."""
    source = tmp_path / "excel.csv"
    source.write_bytes(b"\xef\xbb\xbf\nnote,user_id,event_timestamp\n007,1,5\n")
    out = tmp_path / "excel.parquet"
    done = build(source, "spend:amount", out, data)
    assert done.returncode == 0, done.stderr
    assert pq.read_table(out).column("note").to_pylist() == ["007"]


def labels_csv(path: Path) -> Path:
    rows = labels()
    columns = [rows["user_id"], rows["shop"], rows["label"], rows["event_timestamp"]]
    lines = [",".join(map(str, row)) for row in zip(*columns, strict=True)]
    path.write_text("user_id,shop,label,event_timestamp\n" + "\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("as_served", [False, True])
def test_a_feature_service_writes_what_its_references_write(data: Path, tmp_path, as_served):
    ranker = FeatureService("ranker", ("spend@1:amount", "rating", "spend@1:vip"))
    with OnlineStore(StoreConfig(data)) as store:
        store.registry.apply([], [], feature_services=[ranker])
    source = labels_csv(tmp_path / "labels.csv")
    flags = ["--as-served"] if as_served else []
    served = tmp_path / "service.parquet"
    done = build_with(source, served, data, "--feature-service", "ranker", *flags)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"wrote 5 rows x 4 features to {served} (")
    listed = tmp_path / "listed.parquet"
    done = build(source, "spend@1:amount,rating,spend@1:vip", listed, data, *flags)
    assert done.returncode == 0, done.stderr
    table = pq.read_table(served)
    # the values of the references, named as a lookup by the service names them (no "@1")
    listed_table = pq.read_table(listed)
    assert table.column_names[4:] == [
        "spend:amount", "spend:amount__status", "rating:name", "rating:name__status",
        "rating:vec", "rating:vec__status", "spend:vip", "spend:vip__status",
        "spend__event_timestamp", "rating__event_timestamp",
    ]  # fmt: skip
    assert table.rename_columns(listed_table.column_names).equals(listed_table)
    assert listed_table.column_names[4:6] == ["spend@1:amount", "spend@1:amount__status"]
    assert table.column("spend:amount").to_pylist()[:2] == (
        [11.0, 22.0] if as_served else [11.0, 99.0]
    )


@pytest.mark.parametrize(
    ("flags", "code", "message"),
    [
        (["--feature-service", "rankr"], 1, "feature service 'rankr' is not registered; did you "),
        (["--feature-service", ""], 2, "--feature-service: empty; name a feature service"),
        (
            ["--features", "spend", "--feature-service", "ranker"],
            2,
            "argument --feature-service: not allowed with argument --features",
        ),
        ([], 2, "one of the arguments --features --feature-service is required"),
    ],
)
def test_a_refused_feature_service_names_the_flag(data, tmp_path, flags, code, message):
    with OnlineStore(StoreConfig(data)) as store:
        store.registry.apply([], [], feature_services=[FeatureService("ranker", ("spend",))])
    out = tmp_path / "out.parquet"
    done = build_with(labels_csv(tmp_path / "labels.csv"), out, data, *flags)
    assert (done.returncode, done.stdout) == (code, ""), done.stderr
    assert message in done.stderr
    assert not out.exists()
