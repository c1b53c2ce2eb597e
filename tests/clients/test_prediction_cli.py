"""`featureserve predict` argument parsing: request values typed exactly, bad text a usage error."""

import numpy as np
import pytest

from clients.prediction_cli import _keys, _pairs, _request_value, _request_values


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
    with pytest.raises(SystemExit) as info:
        _request_value(spec, text)
    assert spec.partition(":")[0] in str(info.value)


def test_key_type_keeps_numeric_looking_string_keys() -> None:
    assert _keys("007,8", "string", "--keys", "id").tolist() == ["007", "8"]
    assert _keys("007,8", "auto", "--keys", "id").tolist() == [7, 8]
    assert _keys("7,8", "int64", "--keys", "id").dtype == np.int64
    with pytest.raises(SystemExit, match="--keys: 'a7': join key 'id' is int64"):
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
    with pytest.raises(SystemExit) as info:
        _request_value(spec, text)
    assert message in str(info.value)


def test_infinity_is_a_value_not_an_overflow() -> None:
    values = _request_value("x:float32", "inf,-Infinity,3e38")[1]
    assert values.dtype == np.float32 and values.tolist()[:2] == [np.inf, -np.inf]
    assert _request_value("x", "-inf")[1].tolist() == [-np.inf]


def test_a_request_value_or_entity_given_twice_is_a_usage_error() -> None:
    assert list(_request_values(["a=1", "b:int64=2"])) == ["a", "b"]
    with pytest.raises(SystemExit, match="--value 'a' is given twice"):
        _request_values(["a=1", "a:int64=2"])
    with pytest.raises(SystemExit, match="--entity user_id= is given twice"):
        _pairs(["user_id=1", "user_id=2"], "--entity")


@pytest.mark.parametrize("key_type", ["auto", "int64"])
def test_keys_outside_int64_are_usage_errors_naming_the_flag(key_type: str) -> None:
    outside = r"--keys: .* 99999999999999999999 is outside the int64 range .*; (pass|give)"
    with pytest.raises(SystemExit, match=outside):
        _keys("1,99999999999999999999", key_type, "--keys", "id")
    assert _keys("99999999999999999999", "string", "--keys", "id").tolist() == [
        "99999999999999999999"
    ]
