"""Rows Flink's CSV and JSON readers cannot split: the driver's checker must agree with the real
reader on every crafted case, so each input line is counted or dead-lettered, exactly once."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import tomllib
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from clients.feature_client import FeatureStoreClient
from featurestore.errors import InvalidArgumentError
from pipelines import dead_letter, parse_check
from pipelines.checks import apply_views
from pipelines.config import parse_pipeline
from pipelines.dead_letter import DeadLetterWriter, read_dead_letters
from pipelines.events import EXAMPLE_PIPELINE
from pipelines.parse_check import ParseChecker, input_files, scan_file
from pipelines.streaming import JobOptions, run_streaming
from tests.conftest import wait_until
from tests.pipelines.test_pipeline_streaming import unbounded_job

# Each case is one file: {k} numbers its lines' keys; G is a good row. Lines Flink drops are
# marked by the case's expected (first line, reason start) pairs, found with the probe job.
G = "{k},10.0,m001,food,48.1,2.3,{t}"
CSV_CASES: dict[str, tuple[list[str], list[tuple[int, str]]]] = {
    "extra_blank": ([G, G + ",", G], []),
    "two_extra_blanks": ([G, G + ",,", G], [(2, "9 columns, 7 declared")]),
    "extra_value": ([G, G + ",x", G], [(2, "8 columns, 7 declared")]),
    "extra_space_and_quoted_empty": ([G + ", ", G + ',""', G + ",\t"], []),
    "many_columns": ([G, G + "," + G], [(2, "14 columns, 7 declared")]),
    "quoted_then_text": ([G, '{k},"1"0,m,c,1,2,{t}', G], [(2, "text after a closing quote")]),
    "quoted_then_space_then_text": ([G, '{k},"1" 0,m,c,1,2,{t}', G], [(2, "text after")]),
    "quoted_then_spaces": ([G, '{k},"10.0" \t,m001,food,48.1,2.3,"{t}" ', G], []),
    "doubled_quotes_and_newline": ([G, '{k},10.0,"m""1\nx",food,48.1,2.3,{t}', G], []),
    "quote_not_first": ([G, '{k},10.0, "m",food,48.1,2.3,{t}', '{k},10.0,m"1,f,48.1,2.3,{t}'], []),
    "empty_and_blank_lines": ([G, "", "   ", G, ",,,,,,"], []),
    "few_columns": ([G, "{k},1,m", G], []),
    "unclosed_then_closed": ([G, '{k},"10,m,c,1,2,{t}', G, '{k}",m,c,1,2,{t}', G], []),
    "unclosed_at_end": ([G, '{k},"10,m,c,1,2,{t}', G, G], [(2, "a quote is not closed")]),
    "quoted_then_text_then_extra": ([G, '{k},"1"0,m,c,1,2,{t},4,5', G], [(2, "text after")]),
    "two_bad_in_a_row": ([G, G + ",x", '{k},"1"0,m,c,1,2,{t}', G], [(2, "8 col"), (3, "text")]),
    "trailing_spaces": ([G + "   ", "#" + G, G], []),
}
CSV_RAW = {  # line ends other than LF
    "crlf": ("{G}\r\n{G},x\r\n{G},\r\n{G},,\r\n{G}\r\n", [(2, "8 columns"), (4, "9 columns")]),
    "lone_cr": ("{G}\r{G},x\r{G}\n", [(1, "8 columns")]),  # lines count LFs
    "no_final_newline": ("{G}\n{G},x", [(2, "8 columns")]),
    "unclosed_last_no_newline": ('{G}\n{k},"10', [(2, "a quote is not closed")]),
}
J = '{"card_id":{k},"amount":10.0,"merchant":"m1","category":"f","lat":48.1,"lon":2.3,'
J += '"event_time":{t}}'
DEEP = '{"card_id":{k},"z":' + "[" * 1000 + "]" * 1000 + "}"  # 1001 levels: Jackson's limit is 1000
JSON_CASES: dict[str, tuple[list[str], list[tuple[int, str]]]] = {
    "array_scalar_null": (
        [J, "[1,2]", "3", '"s"', "null", "true", J],
        [(2, "a JSON array"), *((i, "not a JSON object") for i in range(3, 7))],
    ),
    "arrays": ([J, "[]", f"[{J}]", f"[1,{J}]", J], [(2, "an empty"), (4, "a JSON array")]),
    "invalid": (
        [J, J[:-1], '{"card_id":{k},"amount":NaN}', "{'card_id':{k}}", J],
        [(2, "not valid"), (3, "not valid"), (4, "not valid")],
    ),
    "trailing_text": ([J + " trailing", J + '{"x":1}', J + " // c", J + '{"x":'], []),
    "empty_lines": ([J, "", "  \t", J], [(2, "an empty line"), (3, "an empty line")]),
    "nested_and_odd": ([J.replace('"m1"', '{"a":[1,2]}'), J.replace('"m1"', '"a\tb"'), J], []),
    "numbers": (
        [J, *(J.replace("10.0", n) for n in ("01", "+1", ".5", "1e400"))],
        [(2, "not valid"), (3, "not valid"), (4, "not valid")],
    ),
    "deep": ([J, DEEP, J], [(2, "nested deeper")]),
    "crlf_and_cr": ([J + "\r", "[1]\r", J + '\r"tail"'], [(2, "a JSON array")]),
}


def write_corpus(folder: Path, fmt: str, t_ms: int) -> dict[str, list[tuple[int, str]]]:
    """The cases as files with a unique key at each {k}; returns each file's expected drops."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = iter(range(70_001, 80_000))
    cases = CSV_CASES if fmt == "csv" else JSON_CASES
    texts = {name: ("\n".join(lines) + "\n", drops) for name, (lines, drops) in cases.items()}
    if fmt == "csv":
        texts |= {name: (text.replace("{G}", G), drops) for name, (text, drops) in CSV_RAW.items()}
    expected = {}
    for name, (text, drops) in texts.items():
        text = re.sub(r"\{k\}", lambda _: str(next(keys)), text).replace("{t}", str(t_ms))
        (folder / f"{name}.{fmt}").write_text(text, newline="")
        expected[f"{name}.{fmt}"] = drops
    return expected


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_the_checker_finds_exactly_the_crafted_drops(tmp_path, fmt):
    expected = write_corpus(tmp_path, fmt, 1_700_000_000_000)
    for name, drops in expected.items():
        found = scan_file(tmp_path / name, fmt, 7)
        got = [(u.line, u.reason) for u in found]
        assert len(got) == len(drops), (name, got)
        for (line, reason), (want_line, want) in zip(got, drops, strict=True):
            assert line == want_line and reason.startswith(f"unparseable: {want}"), (name, got)


def test_a_quote_that_fails_flinks_reader_stops_the_job_naming_the_line(tmp_path):
    # After the bad quote on line 2 the reader skips the rest of that line, opens a quote at
    # the end of it and meets the end of the file: Flink fails the job, naming no file.
    source = tmp_path / "events"
    source.mkdir()
    (source / "a.csv").write_text('1,2,3\n1,"a"x",2,3\n4,5,6\n')
    definitions = tmp_path / "features.toml"
    definitions.write_text(EXAMPLE_PIPELINE)
    options = JobOptions(source=source, target="127.0.0.1:1", definitions=definitions,
                         bounded=True, check_views=False)  # fmt: skip
    with pytest.raises(InvalidArgumentError, match=r"a[.]csv line 2: .*fails Flink's CSV reader"):
        run_streaming(options)


@pytest.mark.flink
@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_every_line_is_counted_or_dead_lettered_exactly_once(server, tmp_path, fmt):
    text = EXAMPLE_PIPELINE.replace('format = "csv"', f'format = "{fmt}"')
    text = text.replace("[[pipeline.window]]\n", "[[pipeline.window]]\nttl_s = 0\n")
    pipeline = parse_pipeline(tomllib.loads(text)["pipeline"][0])
    definitions = tmp_path / "features.toml"
    definitions.write_text(text)
    apply_views(server.target, [pipeline], "card")
    source = tmp_path / "events"
    write_corpus(source, fmt, int(time.time() * 1000) - 7_200_000)
    options = JobOptions(
        source=source, target=server.target, definitions=definitions, bounded=True,
        dead_letter=tmp_path / "dead.jsonl", stats_dir=tmp_path / "stats",
    )  # fmt: skip
    report = run_streaming(options)

    entries = read_dead_letters(tmp_path / "dead.jsonl")
    unparseable = [e for e in entries if e["reason"].startswith("unparseable:")]
    assert report.dead_letters.get("unparseable") == len(unparseable) > 0
    keys = sorted(
        {int(k) for p in source.iterdir() for k in re.findall(r"\b7\d{4}\b", p.read_text())}
    )
    with FeatureStoreClient(server.target) as client:
        found = client.get_online_features(["card_txn_1h"], {"card_id": np.array(keys)})
    counted = dict(zip(keys, (found.statuses["card_txn_1h:txn_count"] == 1).tolist(), strict=True))
    for key in keys:
        hits = sum(str(key) in json.dumps(e["event"]) for e in entries) + counted[key]
        assert hits == 1, (key, counted[key], [e for e in entries if str(key) in json.dumps(e)])
    for e in unparseable:
        raw_keys = re.findall(r"\b7\d{4}\b", e["event"]["raw"])
        assert e["event"]["file"].startswith(str(source)) and e["event"]["line"] >= 1, e
        assert not any(counted[int(k)] for k in raw_keys), e


@pytest.mark.flink
def test_a_file_added_to_a_watched_folder_is_checked_once(server, tmp_path):
    definitions = tmp_path / "features.toml"
    definitions.write_text(EXAMPLE_PIPELINE)
    apply_views(
        server.target, [parse_pipeline(tomllib.loads(EXAMPLE_PIPELINE)["pipeline"][0])], "card"
    )
    source, dead = tmp_path / "events", tmp_path / "dead.jsonl"
    source.mkdir()
    now_ms = int(time.time() * 1000)
    (source / "a.csv").write_text(f"1,10.0,m001,food,48.1,2.3,{now_ms}\n")

    def unparseable() -> list[dict]:
        entries = read_dead_letters(dead) if dead.exists() else []
        return [e for e in entries if e["reason"].startswith("unparseable:")]

    with unbounded_job(source, server.target, definitions, dead, tmp_path / "job.log", 1):
        time.sleep(15)  # the folder's first scan is over: only the watcher can find b.csv
        assert unparseable() == []
        row = f"2,10.0,m001,food,48.1,2.3,{now_ms},x"
        (tmp_path / "b.csv").write_text(f"3,10.0,m001,food,48.1,2.3,{now_ms}\n{row}\n")
        (tmp_path / "b.csv").rename(source / "b.csv")
        assert wait_until(lambda: len(unparseable()) == 1, timeout=60, interval=0.5)
        time.sleep(3)  # a few more polls: the file is checked once
        [entry] = unparseable()
    assert entry["reason"] == "unparseable: 8 columns, 7 declared"
    assert entry["event"] == {"pipeline": "card_txn", "file": str(source / "b.csv"), "line": 2,
                              "last_line": 2, "raw": row}  # fmt: skip


def test_a_file_truncated_while_it_is_scanned_does_not_kill_the_process(tmp_path):
    # Mapped, the truncated pages raised SIGBUS in the driver; read, the scan ends normally.
    big = tmp_path / "big.csv"
    big.write_bytes((G.format(k=1, t=1) + "\r\n").encode() * 600_000)  # slow when it was mapped
    code = f"from pipelines.parse_check import scan_file; list(scan_file({str(big)!r}, 'csv', 7))"
    child = subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).parents[2])
    time.sleep(1.5)
    with big.open("r+b") as f:
        f.truncate(1000)
    assert child.wait(timeout=120) == 0


def test_the_watcher_stops_when_the_table_environment_cannot_start(tmp_path):
    source = tmp_path / "events"
    source.mkdir()
    (tmp_path / "features.toml").write_text(EXAMPLE_PIPELINE)
    code = f"""
import threading
from pathlib import Path
from pipelines.streaming import JobOptions, run_streaming
root = Path({str(tmp_path)!r})
try:
    run_streaming(JobOptions(source=root / "events", target="127.0.0.1:1", check_views=False,
                             definitions=root / "features.toml", dead_letter=root / "dead.jsonl"))
except BaseException:
    pass
print([t.name for t in threading.enumerate()])
"""
    env = {**os.environ, "JAVA_HOME": "/nonexistent-java", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[2], env=env,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0 and "MainThread" in out.stdout, out.stderr[-2000:]
    assert "parse-check" not in out.stdout


def test_a_refused_folder_dead_letters_nothing(tmp_path):
    (tmp_path / "a.csv").write_text(G.format(k=1, t=1) + ",x\n")
    (tmp_path / "b.csv").write_text('1,2,3\n1,"a"x",2,3\n4,5,6\n')
    dead = tmp_path / "dead" / "dead.jsonl"
    checker = ParseChecker(tmp_path, {"p": ("csv", 7)}, DeadLetterWriter(dead))
    for _ in range(2):  # a retry refuses it again, still writing nothing
        with pytest.raises(InvalidArgumentError, match=r"b[.]csv line 2"):
            checker.scan_new()
    assert not dead.exists()


def test_symlinked_folders_are_read_once_and_hidden_names_skipped(tmp_path):
    source, other = tmp_path / "events", tmp_path / "elsewhere"
    (other / "sub").mkdir(parents=True)
    source.mkdir()
    for path in (other / "b.csv", other / "sub" / "c.csv", other / "_x.csv", source / "a.csv"):
        path.write_text("x\n")
    (source / "linked").symlink_to(other)
    (source / ".hidden").symlink_to(other)
    (other / "sub" / "loop").symlink_to(other)  # a loop: its files are listed once
    found = [p.relative_to(source).as_posix() for p in input_files(source)]
    assert found == ["a.csv", "linked/b.csv", "linked/sub/c.csv"]


def test_a_json_line_with_many_shallow_brackets_is_decided(tmp_path):
    many = '{"a":[' + "[]," * 999 + '[]],"amount":'
    (tmp_path / "a.json").write_text(many + "10.0}\n" + many + "NaN}\n")
    found = scan_file(tmp_path / "a.json", "json", 7)
    assert [(u.line, u.reason) for u in found] == [
        (2, "unparseable: not valid JSON (NaN is not JSON)")
    ]


def test_a_file_completed_after_a_scan_is_scanned_again(tmp_path):
    dead = tmp_path / "dead" / "dead.jsonl"
    source = tmp_path / "events"
    source.mkdir()
    checker = ParseChecker(source, {"p": ("csv", 7)}, DeadLetterWriter(dead))
    path = source / "a.csv"
    path.write_text("")  # created empty, written later
    assert checker.scan_new() == 0
    with path.open("a") as f:
        f.write(G.format(k=1, t=1) + ",x\n")
    os.utime(path, ns=(1, 1))  # a new mtime even on a coarse clock
    assert checker.scan_new() == 1
    assert checker.scan_new() == 0
    assert [e["event"]["line"] for e in read_dead_letters(dead)] == [1]


def test_a_files_dead_letters_are_not_held_in_memory(tmp_path, monkeypatch):
    # 40,000 dead letters in one file: held until the folder's scan ended, they peaked at ~50 MB
    # of Python objects; staged on disk as found, memory is the blocks and a write buffer.
    monkeypatch.setattr(parse_check, "_BLOCK", 1 << 16)
    monkeypatch.setattr(dead_letter, "_BATCH", 1 << 16)
    source, dead = tmp_path / "events", tmp_path / "dead" / "dead.jsonl"
    source.mkdir()
    rows, row = 40_000, G.format(k=1, t=1) + ",x"
    (source / "a.csv").write_text((row + "\n") * rows)
    checker = ParseChecker(source, {"p": ("csv", 7)}, DeadLetterWriter(dead, "run"))
    tracemalloc.start()
    try:
        assert checker.scan_new() == rows
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, peak
    entries = read_dead_letters(dead)
    assert [e["event"]["line"] for e in entries] == list(range(1, rows + 1))
    assert entries[-1] == {"run": "run", "reason": "unparseable: 8 columns, 7 declared",
                           "event": {"pipeline": "p", "file": str(source / "a.csv"),
                                     "line": rows, "last_line": rows, "raw": row}}  # fmt: skip
    assert [p.name for p in dead.parent.iterdir()] == ["dead.jsonl"]  # no stage left behind


def test_staged_dead_letters_reach_the_file_in_order_only_when_committed(tmp_path, monkeypatch):
    # Appended in batches of whole lines however the lines fall across batches (one is longer
    # than two batches); an entry rolled back or never committed is not written.
    monkeypatch.setattr(dead_letter, "_BATCH", 100)
    path = tmp_path / "dead.jsonl"
    writer = DeadLetterWriter(path, "run")
    with writer.staged() as stage:
        stage.add("a", {"raw": "x"})
        mark = stage.mark()
        stage.add("dropped", {"raw": "y"})
        stage.rollback(mark)
        for i in range(30):
            stage.add(f"r{i}", {"raw": "z" * (250 if i == 20 else i * 7)})
        assert not path.exists()
        assert stage.commit() == 31
        assert stage.commit() == 0  # committed entries are not appended twice
        stage.add("uncommitted", {"raw": "w"})
    entries = read_dead_letters(path)
    assert [e["reason"] for e in entries] == ["a", *(f"r{i}" for i in range(30))]
    assert len(entries[21]["event"]["raw"]) == 250 and writer.count == 31


def test_a_large_file_is_scanned_in_bounded_memory(tmp_path):
    # 200 MB of rows, a bad row, then a quote left open over 64 MB more: the driver's peak
    # memory grows by a few blocks (of 1 MiB here); reading the file whole, by over 264 MB.
    row = (G.format(k=1, t=1) + "\n").encode()
    rows, swallowed = (200 << 20) // len(row), (64 << 20) // len(row)
    path = tmp_path / "big.csv"
    with path.open("wb") as f:
        f.write(row * rows)
        f.write(row[:-1] + b",x\n" + b'2,"10.0,m001\n')
        f.write(row * swallowed)
    code = f"""
import json, re
from pipelines import parse_check
def peak():
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read())[1]) << 10
parse_check._BLOCK = 1 << 20
before = peak()
found = list(parse_check.scan_file({str(path)!r}, "csv", 7))
print(json.dumps([peak() - before, [(u.line, u.last_line, u.reason, len(u.raw)) for u in found]]))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[2],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    grown, found = json.loads(out.stdout)
    assert grown < 48 << 20, grown  # the file is 264 MB
    assert found == [
        [rows + 1, rows + 1, "unparseable: 8 columns, 7 declared", len(row) + 1],
        [rows + 2, rows + 2 + swallowed, "unparseable: a quote is not closed before the end "
         "of the file", 1 << 20],
    ]  # fmt: skip


R = G.format(k=1, t=1)  # a good row
BLOCK_CASES = {  # format, text, (line, last line, reason, raw) of each dropped record
    "quoted_lines_then_extra": (
        "csv", f'{R}\n2,"a\nb\r\nc",f,1,2,3,4,x\n{R}\n',
        [(2, 4, "8 columns, 7 declared", '2,"a\nb\r\nc",f,1,2,3,4,x')],
    ),
    "crlf_and_lone_cr": (
        "csv", f'"q",2,3,4,5,6,7,8\r\n{R}\r\n1,2\r"q",2,3,4,5,6,7,8\r\n{R}\r\n',
        [(1, 1, "8 columns, 7 declared", '"q",2,3,4,5,6,7,8'),
         (3, 3, "8 columns, 7 declared", '"q",2,3,4,5,6,7,8')],
    ),
    "open_quote_to_the_end": (
        "csv", f'{R}\n2,"open\n' + f"{R}\n" * 40 + "\r\n\n",
        [(2, 42, "a quote is not closed before the end of the file",
          '2,"open\n' + f"{R}\n" * 39 + R)],
    ),
    "bom": (
        "csv", f'\ufeff"a",2,3,4,5,6,7,8\n{R}\n',
        [(1, 1, "8 columns, 7 declared", '"a",2,3,4,5,6,7,8')],
    ),
    "bom_and_long_line": (
        "csv", "\ufeff1," + "a" * 90 + f",3,4,5,6,7,8\n{R}\n",
        [(1, 1, "8 columns, 7 declared", "1," + "a" * 90 + ",3,4,5,6,7,8")],
    ),
    "blank_extra_fields": (
        "csv", '"a",2,3,4,5,6,7\n"b",2,3,4,5,6,7, \n"c",2,3,4,5,6,7,\t \r\n"d",2,3,4,5,6,7,,\n',
        [(4, 4, "9 columns, 7 declared", '"d",2,3,4,5,6,7,,')],
    ),
    "json_line_over_blocks": (
        "json", f'{{"a":1}}\n{{"a":"{"x" * 90}","b":NaN}}\n[1]\n{{"a":2}}',
        [(2, 2, "not valid JSON (NaN is not JSON)", f'{{"a":"{"x" * 90}","b":NaN}}'),
         (3, 3, "a JSON array whose first element is not an object", "[1]")],
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", BLOCK_CASES)
def test_records_across_block_edges_are_decided_as_in_one_block(tmp_path, monkeypatch, case):
    # Every block size from 1 byte to the whole file puts an edge at every position of every
    # record: inside a quoted field, between a CR and its LF, in a BOM, in a long line.
    fmt, text, expected = BLOCK_CASES[case]
    path = tmp_path / f"a.{fmt}"
    path.write_bytes(text.encode())
    for block in range(1, path.stat().st_size + 2):
        monkeypatch.setattr(parse_check, "_BLOCK", block)
        found = scan_file(path, fmt, 7)
        got = [(u.line, u.last_line, u.reason, u.raw) for u in found]
        assert got == [(a, b, f"unparseable: {r}", raw) for a, b, r, raw in expected], block


def test_a_long_open_quote_keeps_the_first_bytes_and_exact_lines(tmp_path, monkeypatch):
    # The record runs over many blocks: its raw text is its first _RAW_LIMIT bytes and its last
    # line is that of its last text, however the trailing empty lines fall across blocks.
    text = f'{R}\n2,"open\n' + f"{R}\n" * 30 + "\n" * 20
    path = tmp_path / "a.csv"
    path.write_bytes(text.encode())
    monkeypatch.setattr(parse_check, "_RAW_LIMIT", 50)
    for block in (1, 2, 3, 7, 16, 33):
        monkeypatch.setattr(parse_check, "_BLOCK", block)
        [found] = scan_file(path, "csv", 7)
        assert (found.line, found.last_line, found.raw) == (2, 32, text[28:78]), block


def test_a_quote_that_fails_the_job_is_named_across_block_edges(tmp_path, monkeypatch):
    path = tmp_path / "a.csv"
    path.write_bytes(b'1,2,3\n1,"a"x",2,3\n4,5,6\n')
    for block in range(1, 26):
        monkeypatch.setattr(parse_check, "_BLOCK", block)
        with pytest.raises(InvalidArgumentError, match=r"a[.]csv line 2: a quote is not closed"):
            list(scan_file(path, "csv", 7))
