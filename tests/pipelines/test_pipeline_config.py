"""Pipeline definitions and `featureserve pipeline run` flags: every mistake is refused before
any Flink job starts, in one line naming the file or flag, the key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from featurestore.errors import InvalidArgumentError
from pipelines.config import load_pipelines
from pipelines.events import EXAMPLE_PIPELINE
from server.cli import main

HOP = 'view = "card_txn_5m"\nkind = "hop"\nsize_s = 300\nslide_s = 60'
TUMBLE = 'kind = "tumble"\nsize_s = 3600'
OTHER = EXAMPLE_PIPELINE.replace("card_txn_5m", "other_5m").replace("card_txn_1h", "other_1h")

BROKEN = {
    "size_s = nan": (EXAMPLE_PIPELINE.replace(TUMBLE, 'kind = "tumble"\nsize_s = nan'),
                     "window[1].size_s: give a number of seconds"),
    "size_s over 99 days": (EXAMPLE_PIPELINE.replace(TUMBLE, 'kind = "tumble"\nsize_s = 1e8'),
                            "window[1].size_s: give a number of seconds from 0.001 to 8553600"),
    "size_s below 1 ms": (EXAMPLE_PIPELINE.replace(TUMBLE, 'kind = "tumble"\nsize_s = 0.0001'),
                          "window[1].size_s: give a number of seconds from 0.001"),
    "out_of_orderness_s = inf": (
        EXAMPLE_PIPELINE.replace("out_of_orderness_s = 2.0", "out_of_orderness_s = inf"),
        "card_txn.out_of_orderness_s: give a number of seconds",
    ),
    "pipeline is a string": ('pipeline = "x"\n', "pipeline: expected an array of tables"),
    "point of strings": (EXAMPLE_PIPELINE.replace("[48.8566, 2.3522]", '["a", "b"]'),
                         "derived[0].point: must be [latitude, longitude]"),
    "source column named reason": (
        EXAMPLE_PIPELINE.replace('category = "string"', 'reason = "string"'),
        "columns.reason: 'reason' is a column the job adds itself",
    ),
    "source column named window_end": (
        EXAMPLE_PIPELINE.replace('category = "string"', 'window_end = "string"'),
        "columns.window_end: 'window_end' is a column the job adds itself",
    ),
    "derived named like a source column": (
        EXAMPLE_PIPELINE.replace('name = "distance_km"', 'name = "amount"'),
        "derived[0].name: 'amount' is already a source column",
    ),
    "two pipelines with one name": (EXAMPLE_PIPELINE + OTHER, "names ['card_txn'] are used twice"),
    "typo slide": (EXAMPLE_PIPELINE.replace(HOP, HOP.replace("slide_s", "slide")),
                   "window[0]: unknown key(s) ['slide']; the known keys are"),
    "slide_s on a tumble": (EXAMPLE_PIPELINE.replace(TUMBLE, TUMBLE + "\nslide_s = 60"),
                            "window[1].slide_s: is for hop windows only"),
    "count of a column": (EXAMPLE_PIPELINE.replace('txn_count = "count"', 'n = "count(x)"', 1),
                          'features.n: count takes no column'),
    "ttl_s = nan": (EXAMPLE_PIPELINE.replace(TUMBLE, TUMBLE + "\nttl_s = nan"),
                    "window[1].ttl_s: give whole seconds from 0 (no limit) to 315360000"),
    "ttl_s negative": (EXAMPLE_PIPELINE.replace(HOP, HOP + "\nttl_s = -1"),
                       "window[0].ttl_s: give whole seconds from 0 (no limit)"),
    "ttl_s over 10 years": (EXAMPLE_PIPELINE.replace(HOP, HOP + "\nttl_s = 1e10"),
                            "window[0].ttl_s: give whole seconds from 0 (no limit)"),
    "ttl_s fractional": (EXAMPLE_PIPELINE.replace(HOP, HOP + "\nttl_s = 90.5"),
                         "window[0].ttl_s: give whole seconds"),
    "ttl_s a string": (EXAMPLE_PIPELINE.replace(HOP, HOP + '\nttl_s = "90"'),
                       "window[0].ttl_s: give whole seconds"),
}  # fmt: skip


@pytest.mark.parametrize("case", BROKEN, ids=list(BROKEN))
def test_broken_definitions_name_the_file_and_the_key(case, tmp_path):
    text, expected = BROKEN[case]
    path = tmp_path / "features.toml"
    path.write_text(text)
    with pytest.raises(InvalidArgumentError) as info:
        load_pipelines(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert expected in message


def test_one_file_holds_pipelines_beside_views_and_feature_services(tmp_path):
    """`featureserve apply` and `pipeline run` read the same features.toml: each accepts the
    other's tables (a [[feature_service]] used to stop every pipeline of its file)."""
    from featurestore.definitions import load_definitions

    path = tmp_path / "features.toml"
    service = '[[feature_service]]\nname = "fraud"\nfeatures = ["card_txn_5m"]\n'
    path.write_text(EXAMPLE_PIPELINE + service)
    assert [p.name for p in load_pipelines(path)] == ["card_txn"]
    assert [s.name for s in load_definitions(path).feature_services] == ["fraud"]


def test_hop_slides_in_fractions_of_a_second_divide_exactly(tmp_path):
    path = tmp_path / "features.toml"
    path.write_text(EXAMPLE_PIPELINE.replace(HOP, HOP.replace("300", "0.3").replace("60", "0.1")))
    window = load_pipelines(path)[0].windows[0]
    assert (window.size_s, window.slide_s) == (0.3, 0.1)


def test_window_ttl_is_the_slide_plus_the_watermark_delay_plus_a_margin(tmp_path):
    """Flink writes no empty window: a quiet entity's last window must expire once the next
    one would have been written (slide + watermark delay, rounded up, + 10 s)."""
    path = tmp_path / "features.toml"
    text = EXAMPLE_PIPELINE.replace("allowed_lateness_s = 1.0", "allowed_lateness_s = 1.5")
    path.write_text(text)
    pipeline = load_pipelines(path)[0]
    assert [pipeline.ttl_seconds(w) for w in pipeline.windows] == [60 + 4 + 10, 3600 + 4 + 10]
    path.write_text(
        text.replace(HOP, HOP + "\nttl_s = 0").replace(TUMBLE, TUMBLE + "\nttl_s = 900")
    )
    pipeline = load_pipelines(path)[0]
    assert [pipeline.ttl_seconds(w) for w in pipeline.windows] == [0, 900]


def run_cli(tmp_path: Path, *flags: str, definitions: str | None = EXAMPLE_PIPELINE) -> int:
    """`featureserve pipeline run backfill` in process, against a port nothing listens on."""
    (tmp_path / "src").mkdir(exist_ok=True)
    if definitions is not None:
        (tmp_path / "features.toml").write_text(definitions)
    argv = ["pipeline", "run", "backfill", "--source", str(tmp_path / "src"), "--target",
            "127.0.0.1:1", "--definitions", str(tmp_path / "features.toml"), *flags]  # fmt: skip
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


@pytest.mark.parametrize(
    ("flags", "definitions", "expected"),
    [
        ((), None, "features.toml: cannot read the definitions file: No such file"),
        ((), "[[pipeline]\nname = 1", "features.toml: not valid TOML: "),
        (("--dead-letter", "."), EXAMPLE_PIPELINE, "--dead-letter .: is a folder; give a file"),
        (("--parallelism", "0"), EXAMPLE_PIPELINE, "argument --parallelism: '0': give the number"),
        (("--retry-bound", "nan"), EXAMPLE_PIPELINE, "argument --retry-bound: 'nan': give"),
        (("--message-rows", "0"), EXAMPLE_PIPELINE, "argument --message-rows: '0': give rows"),
        (("--cert", "c.pem"), EXAMPLE_PIPELINE, "--cert is given without --key: mTLS needs"),
        (("--ca", "nope.pem"), EXAMPLE_PIPELINE, "root_certificates (--ca): cannot read 'nope"),
        (("--timeout", "inf"), EXAMPLE_PIPELINE, "argument --timeout: 'inf': give the deadline"),
    ],
    ids=[
        "missing file",
        "bad TOML",
        "dead letter is a folder",
        "parallelism 0",
        "nan bound",
        "message rows 0",
        "half an mTLS pair",
        "unreadable CA",
        "infinite timeout",
    ],
)
def test_cli_refuses_before_any_job_in_one_line(tmp_path, capsys, flags, definitions, expected):
    assert run_cli(tmp_path, *flags, definitions=definitions) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert expected in err[-1] and "Traceback" not in "".join(err)


def test_sink_and_event_time_flags_reach_the_job_options(tmp_path: Path) -> None:
    from pipelines.cli import options_from_args
    from server.cli import build_parser

    argv = ["pipeline", "run", "streaming", "--source", str(tmp_path), "--token", "t0k",
            "--message-rows", "500", "--max-clock-skew", "60"]  # fmt: skip
    options = options_from_args(build_parser().parse_args(argv))
    assert (options.message_rows, options.max_clock_skew_s) == (500, 60.0)
    assert options.target.token == "t0k" and options.target.target == "127.0.0.1:50051"
