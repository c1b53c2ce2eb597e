"""The streaming job on a local Flink mini-cluster, writing into a real featureserve process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from clients.feature_client import FeatureStoreClient
from featurestore.errors import InvalidArgumentError
from featurestore.window_features import WindowSpec, window_features
from pipelines.checks import apply_views
from pipelines.config import Pipeline, parse_pipeline
from pipelines.dead_letter import DeadLetterWriter, count_by_reason, read_dead_letters
from pipelines.events import (
    EVENT_TIME_CSV,
    EXAMPLE_PIPELINE,
    generate_events,
    reference_latest,
    rows_ahead,
    splice_csv,
    write_events,
    write_malformed,
)
from pipelines.streaming import JobOptions, run_streaming
from tests.conftest import wait_until

pytestmark = pytest.mark.flink


def store_snapshot(target: str, pipeline: Pipeline, keys: np.ndarray) -> dict[str, np.ndarray]:
    """Every feature and event time of every window view, for `keys`."""
    out = {}
    with FeatureStoreClient(target) as client:
        for window in pipeline.windows:
            found = client.get_online_features([window.view], {pipeline.entity_column: keys})
            out[f"{window.view}@ts"] = found.event_timestamps[window.view]
            for agg in window.aggregates:
                name = f"{window.view}:{agg.name}"
                out[name] = found.values[name]
                out[f"{name}@status"] = found.statuses[name]
    return out


def assert_matches_reference(snapshot, events, pipeline: Pipeline) -> None:
    """The store holds each entity's newest window, equal to the NumPy reference."""
    for window in pipeline.windows:
        ref = reference_latest(events, pipeline, window)
        np.testing.assert_array_equal(snapshot[f"{window.view}@ts"], ref.window_end_us)
        for agg in window.aggregates:
            got = snapshot[f"{window.view}:{agg.name}"]
            assert (snapshot[f"{window.view}:{agg.name}@status"] == 1).all(), agg.name
            np.testing.assert_array_equal(got, ref.features[agg.name], err_msg=agg.name)


def prepare(
    tmp_path: Path, target: str, n: int = 20_000, entities: int = 300, span_s: float = 7200,
    jitter_ms: int = 1500, seed: int = 3, fmt: str = "csv",
):  # fmt: skip
    """Register the views and write the events in one file (a streaming job reads the files
    already in its folder in no set order, so history in several files is backfill's job)."""
    text = EXAMPLE_PIPELINE.replace('format = "csv"', f'format = "{fmt}"')
    # The events are hours to years old: under the windows' TTL every one would read as expired.
    text = text.replace("[[pipeline.window]]\n", "[[pipeline.window]]\nttl_s = 0\n")
    pipeline = parse_pipeline(tomllib.loads(text)["pipeline"][0])
    definitions = tmp_path / "features.toml"
    definitions.write_text(text)
    apply_views(target, [pipeline], "card")
    events = generate_events(n, entities, span_s=span_s, jitter_ms=jitter_ms, seed=seed)
    source = tmp_path / "events"
    write_events(events, source, files=1, fmt=fmt)
    return pipeline, definitions, events, source


class ForeignWriter(threading.Thread):
    """Another run appending to the same dead-letter file until stopped."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.writer, self.stop, self.rows = (
            DeadLetterWriter(path, "other-run"),
            threading.Event(),
            0,
        )

    def run(self) -> None:
        while True:
            self.rows += self.writer.write(["malformed: other run"], {"card_id": ["x"]})
            if self.stop.wait(0.2):
                return


def test_bounded_stream_matches_reference_and_replay_changes_nothing(server, tmp_path):
    pipeline, definitions, events, source = prepare(tmp_path, server.target)
    # Mid-file rows with bad event times must not move the watermark (which would make every
    # later row late); the last rows' windows end after now (within the server's clock skew
    # allowance as rows, but incomplete as windows) and are counted, not written. Two finite
    # amounts whose sum overflows make each of that key's 6 windows a dead letter.
    ahead_keys = np.array([10_001, 10_002, 10_003])
    mid_ms = events["event_time"][: len(events["event_time"]) // 2].max()
    overflow = [f"10010,1e308,m001,food,48.1,2.3,{mid_ms}"] * 2
    middle = [*EVENT_TIME_CSV, *overflow]
    splice_csv(source / "events-00000.csv", middle, rows_ahead(ahead_keys, 240))
    bad = write_malformed(source) + len(EVENT_TIME_CSV)
    options = JobOptions(
        source=source, target=server.target, definitions=definitions, bounded=True,
        dead_letter=tmp_path / "dead.jsonl", stats_dir=tmp_path / "stats1",
    )  # fmt: skip
    report = run_streaming(options)

    keys = np.unique(events["card_id"])
    first = store_snapshot(server.target, pipeline, keys)
    assert_matches_reference(first, events, pipeline)
    assert report.dead_letters == {"malformed": bad, "overflow": 6}
    reasons = [e["reason"] for e in read_dead_letters(tmp_path / "dead.jsonl")]
    assert any("card_id is missing or not a bigint" in r for r in reasons)
    assert any("amount is missing or not a double" in r for r in reasons)
    assert sum("amount is not a finite double" in r for r in reasons) == 2  # NaN and 1e400
    assert any("card_id is not a bigint" in r for r in reasons)  # 7.5, not truncated to 7
    assert any("event_time is not a bigint" in r for r in reasons)
    assert sum("event_time" in r and "after now + 300 s" in r for r in reasons) == 2  # 2100, µs
    assert any("epoch milliseconds > 0 expected" in r for r in reasons)
    sink = report.sinks["card_txn_5m"]
    assert sink.written > len(keys) and sink.rejected == 0
    incomplete = {"card_txn_5m": 5 * len(ahead_keys), "card_txn_1h": len(ahead_keys)}
    assert report.incomplete_windows == incomplete
    unwritten = store_snapshot(server.target, pipeline, np.append(ahead_keys, 10_010))
    assert not any((unwritten[f"{w.view}:txn_count@status"] == 1).any() for w in pipeline.windows)

    options.stats_dir = tmp_path / "stats2"  # same dead-letter file: counts are per run
    foreign = ForeignWriter(tmp_path / "dead.jsonl")
    foreign.start()
    try:
        again = run_streaming(options)
    finally:
        foreign.stop.set()
        foreign.join()
    second = store_snapshot(server.target, pipeline, keys)
    for name, values in first.items():
        # A replay sees each window's events in another order: its sums are exact, so equal.
        np.testing.assert_array_equal(second[name], values, err_msg=name)
    replay = again.sinks["card_txn_5m"]
    assert replay.rows == sink.rows and replay.rejected == 0
    assert replay.stale >= sink.rows - len(keys)
    assert again.dead_letters == {"malformed": bad, "overflow": 6}
    assert again.incomplete_windows == incomplete
    assert foreign.rows > 1
    total = {"malformed": 2 * bad + foreign.rows, "overflow": 12}
    assert count_by_reason(tmp_path / "dead.jsonl") == total


JSON_EVENT = b'{"card_id":3,"amount":1.5,"merchant":"m1","category":"f","lat":1,"lon":2,'
JSON_EVENT += b'"event_time":1700000000000}\n'


@pytest.mark.parametrize(
    ("fmt", "name", "data"),
    [
        ("csv", "bad.csv", b"3,12.5,m001,food,48.1,2.3,1700000000000\n3,1,m\xff,f,1,2,3\n"),
        ("json", "bad.json", JSON_EVENT + JSON_EVENT.replace(b"m1", b"m\xff")),
    ],
)
def test_non_utf8_input_stops_the_job_naming_the_file_and_line(server, tmp_path, fmt, name, data):
    _, definitions, _, source = prepare(tmp_path, server.target, n=50, fmt=fmt)
    (source / name).write_bytes(data)
    options = JobOptions(
        source=source, target=server.target, definitions=definitions, bounded=True,
        dead_letter=tmp_path / "dead.jsonl", stats_dir=tmp_path / "stats",
    )  # fmt: skip
    with pytest.raises(InvalidArgumentError, match=rf"{name.replace('.', '[.]')} line 2 is not"):
        run_streaming(options)


def test_window_sums_are_exact_whatever_the_order_and_equal_the_offline_kernels(server, tmp_path):
    # Card 1's amounts cancel (Flink's SUM gave 0.0 in arrival order), card 2 holds ten 0.1
    # (0.9999999999999999 in arrival order), card 3 mixes magnitudes; all in one hour, 3 h ago.
    hour_ms = 3_600_000
    start_ms = (int(time.time() * 1000) // hour_ms - 3) * hour_ms + 60_000
    rng = np.random.default_rng(11)
    amounts = {1: [1e16, 1.0, -1e16], 2: [0.1] * 10, 3: list(rng.standard_normal(40) * 1e12)}
    amounts[3] += [1e-3, 7e15, -7e15]
    cards = np.concatenate([[k] * len(v) for k, v in amounts.items()]).astype(np.int64)
    events = generate_events(len(cards), entities=1, seed=6)
    events["card_id"] = cards
    events["amount"] = np.concatenate(list(amounts.values()))
    events["event_time"] = start_ms + np.arange(len(cards), dtype=np.int64) * 1000
    pipeline, definitions, _, source = prepare(tmp_path, server.target, n=1)
    write_events(events, source, files=1)
    options = JobOptions(
        source=source, target=server.target, definitions=definitions, bounded=True,
        dead_letter=tmp_path / "dead.jsonl", stats_dir=tmp_path / "stats",
    )  # fmt: skip
    run_streaming(options)

    keys = np.array(list(amounts), np.int64)
    stored = store_snapshot(server.target, pipeline, keys)
    np.testing.assert_array_equal(stored["card_txn_1h:amount_sum"][:2], [1.0, 1.0])
    offline = window_features(
        cards, events["event_time"] * 1000, {"amount": events["amount"]},
        [WindowSpec("amt", "window", "amount", 3600)],
    )  # fmt: skip
    last = np.cumsum([len(v) for v in amounts.values()]) - 1  # each card's newest event
    np.testing.assert_array_equal(stored["card_txn_1h:amount_sum"], offline["amt_sum"][last])
    np.testing.assert_array_equal(stored["card_txn_1h:txn_count"], offline["amt_count"][last])
    assert_matches_reference(stored, events, pipeline)


@contextmanager
def unbounded_job(
    source: Path, target: str, definitions: Path, dead_letter: Path, log: Path, parallelism: int
) -> Iterator[subprocess.Popen]:
    """An unbounded streaming job in its own process group, which must still run at the end
    of the block (it watches its folder for good); killed then."""
    script = (
        "import sys; from pathlib import Path; "
        "from pipelines.streaming import JobOptions, run_streaming; "
        "run_streaming(JobOptions(source=Path(sys.argv[1]), target=sys.argv[2], "
        "definitions=Path(sys.argv[3]), dead_letter=Path(sys.argv[4]), "
        "parallelism=int(sys.argv[5])))"
    )
    args = [str(source), target, str(definitions), str(dead_letter), str(parallelism)]
    root = Path(__file__).resolve().parents[2]
    # A job run earlier in this process leaves PyFlink's own variables set (the gateway's port,
    # "gateway disabled"): the job's process must launch its own gateway.
    env = {k: v for k, v in os.environ.items() if "PYFLINK" not in k}
    job = subprocess.Popen(
        [sys.executable, "-c", script, *args], cwd=root, env=env, stdout=subprocess.DEVNULL,
        stderr=log.open("w"), start_new_session=True,
    )  # fmt: skip
    try:
        yield job
        assert job.poll() is None, f"the job ended: {log.read_text()[-3000:]}"
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()


def test_an_event_dated_ahead_does_not_make_the_events_after_it_late(server, tmp_path):
    # Within the clock skew allowance, card 50's event is 200 s ahead. It used to move the
    # watermark to now + 170 s, so card 2's on-time event, read after it, was dead-lettered.
    text = EXAMPLE_PIPELINE.replace("out_of_orderness_s = 2.0", "out_of_orderness_s = 30.0")
    definitions = tmp_path / "features.toml"
    definitions.write_text(text)
    apply_views(server.target, [parse_pipeline(tomllib.loads(text)["pipeline"][0])], "card")
    source, dead = tmp_path / "events", tmp_path / "dead.jsonl"
    source.mkdir()

    def row(card: int, ahead_s: float) -> str:
        return f"{card},10.0,m001,food,48.1,2.3,{int((time.time() + ahead_s) * 1000)}"

    def dead_letters() -> list[dict]:
        return read_dead_letters(dead) if dead.exists() else []

    (source / "a.csv").write_text("\n".join([row(1, -60), row(50, 200), "x,1"]) + "\n")
    # One source subtask: the watermark that judges file b is the one file a's rows moved.
    with unbounded_job(source, server.target, definitions, dead, tmp_path / "job.log", 1):
        assert wait_until(lambda: len(dead_letters()) == 1, timeout=180, interval=0.5)
        time.sleep(3)  # a watermark is emitted every 200 ms after a row is read
        marker = row(3, -7200)  # late under any watermark since card 1's event: read last
        (source / "b.csv").write_text("\n".join([row(2, -5), marker]) + "\n")
        assert wait_until(lambda: len(dead_letters()) >= 2, timeout=60, interval=0.5)
        time.sleep(2)
        late = [e["event"]["card_id"] for e in dead_letters() if e["reason"].startswith("late")]
        assert late == ["3"], dead_letters()


def test_unbounded_stream_at_parallelism_2_over_one_file_writes_windows(server, tmp_path):
    # Unbounded (the default): the source subtask without a split must not hold the watermark.
    pipeline, definitions, events, source = prepare(
        tmp_path, server.target, n=300, entities=20, span_s=1800, jitter_ms=0, seed=4
    )
    log = tmp_path / "job.log"
    keys = np.unique(events["card_id"])

    def written() -> bool:
        got = store_snapshot(server.target, pipeline, keys)
        return bool((got["card_txn_5m:txn_count@status"] == 1).all())

    with unbounded_job(source, server.target, definitions, tmp_path / "dead.jsonl", log, 2):
        reached = wait_until(written, timeout=240, interval=2)
        assert reached, f"not every key's window reached the store: {log.read_text()[-3000:]}"


def test_late_events_are_dead_lettered_or_counted_never_both(server, tmp_path):
    pipeline, definitions, events, source = prepare(
        tmp_path, server.target, n=20_000, entities=10, span_s=900, jitter_ms=30_000, seed=7
    )
    options = JobOptions(
        source=source, target=server.target, definitions=definitions, bounded=True,
        dead_letter=tmp_path / "dead.jsonl", stats_dir=tmp_path / "stats",
    )  # fmt: skip
    run_streaming(options)
    # Which rows are late depends on when Flink emits watermarks; whichever they are, the
    # windows must hold exactly the rows that were not dead-lettered.
    late = {
        (int(e["event"]["card_id"]), int(e["event"]["event_time"]), float(e["event"]["amount"]))
        for e in read_dead_letters(tmp_path / "dead.jsonl")
        if e["reason"].startswith("late:")
    }
    rows = zip(
        events["card_id"].tolist(),
        events["event_time"].tolist(),
        events["amount"].tolist(),
        strict=True,
    )
    kept = np.array([r not in late for r in rows])
    kept_events = {c: v[kept] for c, v in events.items()}
    keys = np.unique(events["card_id"])
    assert_matches_reference(store_snapshot(server.target, pipeline, keys), kept_events, pipeline)
