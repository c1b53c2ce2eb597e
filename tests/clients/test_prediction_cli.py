"""`featureserve predict` argument parsing: request values typed exactly, bad text a usage error
(exit 2)."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from clients.feature_cli import _InputError
from clients.prediction_cli import _keys, _pairs, _request_value, _request_values

REPO = Path(__file__).resolve().parents[2]


def test_request_values_parse_exactly_by_dtype() -> None:
    name, values = _request_value("n:int64", "9007199254740993,-1")
    assert name == "n" and values.dtype == np.int64
    assert values.tolist() == [9007199254740993, -1]
    assert _request_value("flag:bool", "true,0")[1].tolist() == [True, False]
    assert _request_value("city:string", "Oslo, Lima")[1].tolist() == ["Oslo", "Lima"]
    assert _request_value("amount", "1.5")[1].dtype == np.float64


@pytest.mark.parametrize(
    ("spec", "text"), [("a", "x1"), ("n:int64", "1.5"), ("flag:bool", "maybe"), ("a:int8", "1")]
)
def test_bad_request_values_are_usage_errors_naming_the_value(spec: str, text: str) -> None:
    with pytest.raises(_InputError) as info:
        _request_value(spec, text)
    assert spec.partition(":")[0] in str(info.value)


def test_key_type_keeps_numeric_looking_string_keys() -> None:
    assert _keys("007,8", "string", "--keys", "id").tolist() == ["007", "8"]
    assert _keys("007,8", "auto", "--keys", "id").tolist() == [7, 8]
    assert _keys("7,8", "int64", "--keys", "id").dtype == np.int64
    with pytest.raises(_InputError, match="--keys: 'a7': join key 'id' is int64"):
        _keys("a7", "int64", "--keys", "id")


@pytest.mark.parametrize(
    ("spec", "text", "message"),
    [
        (
            "ts:int64",
            "1,9223372036854775808",
            "--value ts:int64=1,9223372036854775808: 9223372036854775808 is outside the int64 "
            "range (-9223372036854775808 to 9223372036854775807)",
        ),
        ("ts:int64", "-9223372036854775809", "-9223372036854775809 is outside the int64 range"),
        (
            "x:float32",
            "1,1e39",
            "--value x:float32=1,1e39: a value overflows float32 (largest finite "
            "3.4028235e+38); send a smaller value or use float64",
        ),
        ("x", "1e400", "--value x:float64=1e400: a value overflows float64 (largest finite"),
    ],
)
def test_request_values_outside_their_dtype_are_usage_errors(spec, text, message) -> None:
    with pytest.raises(_InputError) as info:
        _request_value(spec, text)
    assert message in str(info.value)


def test_infinity_is_a_value_not_an_overflow() -> None:
    values = _request_value("x:float32", "inf,-Infinity,3e38")[1]
    assert values.dtype == np.float32 and values.tolist()[:2] == [np.inf, -np.inf]
    assert _request_value("x", "-inf")[1].tolist() == [-np.inf]


def test_a_request_value_or_entity_given_twice_is_a_usage_error() -> None:
    assert list(_request_values(["a=1", "b:int64=2"])) == ["a", "b"]
    with pytest.raises(_InputError, match="--value 'a' is given twice"):
        _request_values(["a=1", "a:int64=2"])
    with pytest.raises(_InputError, match="--entity user_id= is given twice"):
        _pairs(["user_id=1", "user_id=2"], "--entity")


@pytest.mark.parametrize("key_type", ["auto", "int64"])
def test_keys_outside_int64_are_usage_errors_naming_the_flag(key_type: str) -> None:
    outside = r"--keys: .* 99999999999999999999 is outside the int64 range .*; (pass|give)"
    with pytest.raises(_InputError, match=outside):
        _keys("1,99999999999999999999", key_type, "--keys", "id")
    assert _keys("99999999999999999999", "string", "--keys", "id").tolist() == [
        "99999999999999999999"
    ]


@pytest.mark.parametrize("text", ["1_0", "\u0661", "+1", "1.0"])
def test_integers_are_read_as_ingest_reads_them(text: str) -> None:
    """ASCII digits after an optional "-", as ingest reads an int64 cell; Python's int() read
    "1_0" as 10 and "\u0661" (an Arabic-Indic 1) as 1, which ingest refuses."""
    message = f"--value x:int64={text}: not comma-separated int64 values (ASCII digits"
    with pytest.raises(_InputError, match=re.escape(message)):
        _request_value("x:int64", text)
    with pytest.raises(_InputError, match="join key 'id' is int64; give comma-separated integers"):
        _keys(text, "int64", "--keys", "id")
    assert _keys(f"{text},2", "auto", "--keys", "id").tolist() == [text, "2"]
    assert _keys(" -7 ,2", "int64", "--keys", "id").tolist() == [-7, 2]


@pytest.mark.parametrize("text", ["1_0", "\u0661"])
def test_floats_are_read_as_ingest_reads_them(text: str) -> None:
    """NumPy read "1_0" as 10.0 and "\u0661" as 1.0; ingest refuses both cells."""
    with pytest.raises(_InputError, match=f"--value x:float64={text}: not comma-separated"):
        _request_value("x", text)
    assert _request_value("x", "+3,.5,1e3")[1].tolist() == [3.0, 0.5, 1000.0]


def predict(target: str, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "server.cli", "predict", "--model", "m", "--target", target]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, cwd=REPO, timeout=60)


def test_input_predict_cannot_send_exits_2_in_one_line(server) -> None:
    """Keys or values that cannot be sent exit 2 with one line, as get and ingest do: a key or
    string value that is not UTF-8 was an ArrayError traceback, and the other input errors
    exited 1, as a FAILED row does."""
    # subprocess encodes the surrogate back to the byte 0xff: the argv the shell would pass
    for args, message in (
        (("--keys", "\udcff"), "featureserve predict: keys['user_id']: row 0: lone surrogate"),
        (
            ("--keys", "1", "--value", "c:string=\udcff"),
            "featureserve predict: request_values['c']: row 0: lone surrogate",
        ),
        (("--keys", "1", "--value", "x:int64=1_0"), "featureserve predict: --value x:int64=1_0:"),
        (("--keys", "1", "--value", "x"), "featureserve predict: --value 'x': use NAME"),
        (("--entity", "user_id"), "featureserve predict: --entity 'user_id': use NAME=V1,V2"),
    ):
        result = predict(server.target, *args)
        assert result.returncode == 2, (args, result.stderr)
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith(message), (args, result.stderr)
    unknown = predict(server.target, "--keys", "1")
    assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr, unknown.stderr
