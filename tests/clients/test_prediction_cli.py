"""`featureserve predict` argument parsing: request values typed exactly, bad text a usage error."""

import numpy as np
import pytest

from clients.prediction_cli import _keys, _request_value


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
