"""Transforms: fit, serialise (JSON and TOML), apply on kernels vs references, config errors,
and compiled (fused) chains against the reference chain."""

from __future__ import annotations

import json
import tomllib

import numpy as np
import pytest

from featurestore.errors import InvalidArgumentError
from featurestore.kernels.encoding import pack_strings
from featurestore.transforms import (
    TRANSFORMS,
    Transform,
    apply,
    apply_chain,
    apply_reference,
    compile_chain,
    fit,
    transforms_from_config,
    transforms_to_config,
)

ROWS = 300
NAMES = [f"f{i}" for i in range(32)]


@pytest.fixture
def data() -> dict:
    rng = np.random.default_rng(7)
    block = (rng.standard_normal((ROWS, 32)) * 4 + 1).astype(np.float32)
    block[rng.random(block.shape) < 0.05] = np.nan
    block[0, :4] = [np.finfo(np.float32).max, -np.finfo(np.float32).max, 0.0, -1.0]
    cols = {n: block[:, i] for i, n in enumerate(NAMES)}
    cols["ts"] = rng.integers(0, 2**51, ROWS)
    cols["now"] = cols["ts"] + rng.integers(0, 10**10, ROWS)
    cols["country"] = np.array(rng.choice(["de", "fr", "jp", "br", "zz"], ROWS), dtype=object)
    cols["user"] = rng.integers(0, 10**12, ROWS)
    cols["lat"], cols["lon"] = rng.uniform(-80, 80, ROWS), rng.uniform(-170, 170, ROWS)
    cols["block"] = block
    return cols


def every_op(cols: dict) -> list[Transform]:
    """One configured transform per registered op, fitted on the data where it needs fitting."""
    block = cols["block"]
    return [
        Transform("standardize", ["f0", "f1"], ["s0", "s1"], fit("standardize", block[:, :2])),
        Transform("min_max_scale", ["f2"], "m2", fit("min_max_scale", block[:, 2])),
        Transform("log1p", ["f3", "f4"], ["l3", "l4"], {}),
        Transform("clip", ["f5"], "c5", fit("clip", block[:, 5], lower_quantile=0.05)),
        Transform("bucketize_width", ["f6"], "bw6", fit("bucketize_width", block[:, 6], buckets=5)),
        Transform("bucketize", ["f7", "f8"], ["b7", "b8"], fit("bucketize", block[:, 7:9])),
        Transform("hash_bucket", ["country", "user"], ["hc", "hu"], fit("hash_bucket", buckets=64)),
        Transform("one_hot", ["country"], "country", fit("one_hot", cols["country"], max_size=3)),
        Transform("one_hot", ["user"], "u", fit("one_hot", cols["user"][:5])),
        Transform("vocab_index", ["country"], "v", fit("vocab_index", cols["country"], max_size=3)),
        Transform("vocab_index", ["user"], "ui", fit("vocab_index", cols["user"][:5])),
        Transform("hour_of_day", ["ts"], "hour", {}),
        Transform("day_of_week", ["ts"], "dow", {}),
        Transform("is_weekend", ["ts"], "weekend", {}),
        Transform("hour_cyclical", ["ts"], "hc_", {}),
        Transform("dow_cyclical", ["ts"], "dc_", {}),
        Transform("age_seconds", ["ts"], "age", {"now_us": 2**52}),
        Transform("age_seconds", ["ts", "now"], "age2", {}),
        Transform("ratio", ["f9", "f10"], "r", fit("ratio", fill=0.0)),
        Transform("difference", ["f9", "f10"], "d", {}),
        Transform("haversine_km", ["lat", "lon", "lon", "lat"], "hv", {}),
        Transform("distance_to_point_km", ["lat", "lon"], "dp", {"lat0": 52.5, "lon0": 13.4}),
    ]


def test_every_registered_op_is_covered(data):
    assert {t.op for t in every_op(data)} == set(TRANSFORMS)


def test_apply_matches_reference_for_every_op(data):
    for t in every_op(data):
        out, expected = apply(t, data), apply_reference(t, data)
        assert list(out) == t.outputs == list(expected)
        for name in out:
            np.testing.assert_allclose(out[name], expected[name], rtol=5e-16, atol=1e-15)
            assert len(out[name]) == ROWS


def test_one_hot_vocabulary_by_frequency_and_output_names(data):
    params = fit("one_hot", ["b", "a", "b", "c", "b", "a"], max_size=2)
    assert params == {"vocabulary": ["b", "a"]}
    t = Transform("one_hot", ["x"], "x", params)
    assert t.outputs == ["x_b", "x_a", "x_oov"]
    out = apply(t, {"x": pack_strings(["a", "c", "b"])})
    np.testing.assert_array_equal(np.stack([out[n] for n in t.outputs], 1), np.eye(3)[[1, 2, 0]])


def test_fit_serialise_apply_round_trip_json_and_toml(data):
    transforms = every_op(data)
    config = transforms_to_config(transforms)
    from_json = transforms_from_config(json.loads(json.dumps(config)))
    assert from_json == transforms
    toml_text = "\n".join(
        f"[[transforms]]\nop = {json.dumps(c['op'])}\ninputs = {json.dumps(c['inputs'])}\n"
        f"output = {json.dumps(c['output'])}\nparams = {toml_inline(c['params'])}"
        for c in config
    )
    from_toml = transforms_from_config(tomllib.loads(toml_text)["transforms"])
    assert from_toml == transforms
    for before, after in zip(transforms, from_toml, strict=True):
        for name, col in apply(before, data).items():
            np.testing.assert_array_equal(apply(after, data)[name], col)


def toml_inline(params: dict) -> str:
    return "{" + ", ".join(f"{k} = {json.dumps(v)}" for k, v in params.items()) + "}"


def test_non_finite_params_serialise_as_strings():
    t = Transform("ratio", ["a", "b"], "r", {"fill": float("nan")})
    assert t.to_dict()["params"] == {"fill": "nan"}
    again = Transform.from_dict(json.loads(json.dumps(t.to_dict())))
    out = apply(again, {"a": np.array([1.0, 2.0]), "b": np.array([0.0, 4.0])})["r"]
    np.testing.assert_array_equal(out, [np.nan, 0.5])


def test_config_defaults_inputs_in_place():
    (t,) = transforms_from_config([{"op": "log1p", "columns": ["f1", "f2"]}])
    assert t.inputs == ["f1", "f2"] and t.outputs == ["f1", "f2"]


@pytest.mark.parametrize(
    ("entry", "fragment"),
    [
        ({"op": "standardise", "inputs": ["f1"]}, "op 'standardise' is unknown"),
        ({"op": "standardize", "inputs": ["f1"], "params": {"mean": [0.0]}}, "params.std"),
        (
            {"op": "standardize", "inputs": ["a", "b"], "params": {"mean": [0.0], "std": [1, 2]}},
            "params.mean needs 2 values",
        ),
        ({"op": "log1p", "inputs": ["a"], "params": {"base": 10}}, "params.base is not a param"),
        ({"op": "bucketize", "inputs": ["a"], "params": {"boundaries": [3, 1]}}, "sorted"),
        ({"op": "hash_bucket", "inputs": ["a"], "params": {"buckets": 0}}, "params.buckets"),
        ({"op": "ratio", "inputs": ["a"], "output": "r"}, "inputs has 1 columns"),
        ({"op": "ratio", "inputs": ["a", "b"]}, "field 'output' is required"),
        ({"op": "log1p", "inputs": ["a"], "colour": 1}, "field 'colour' is unknown"),
        ({"op": "one_hot", "inputs": ["a"], "output": "o", "params": {"vocabulary": ["x", 1]}},
         "mixes types"),
        ({"op": "clip", "inputs": ["a"], "params": {"lo": "low", "hi": 1}}, "params.lo must be"),
        ({"op": "min_max_scale", "inputs": ["a"], "params": {"lo": -1e308, "hi": 1e308}},
         "params.hi[0] - params.lo[0] = 1e+308 - -1e+308 overflows float64; narrow the range"),
        ({"op": "bucketize_width", "inputs": ["a", "b"],
          "params": {"lo": [0, -1e308], "hi": [1, 1e308], "buckets": 4}},
         "params.hi[1] - params.lo[1] = 1e+308 - -1e+308 overflows"),
    ],
)  # fmt: skip
def test_bad_config_fails_at_load_naming_entry_and_field(entry, fragment):
    with pytest.raises(InvalidArgumentError, match="transforms\\[1\\]") as err:
        transforms_from_config([{"op": "log1p", "inputs": ["x"]}, entry])
    assert fragment in str(err.value)


def test_bad_inputs_name_the_transform_and_column(data):
    t = Transform("standardize", ["missing"], "m", {"mean": 0, "std": 1})
    with pytest.raises(InvalidArgumentError, match="'missing' is missing"):
        apply(t, data)
    with pytest.raises(InvalidArgumentError, match="'country' has dtype object"):
        apply(Transform("log1p", ["country"], "c", {}), data)
    for hopeless in (np.full(4, np.nan), np.array([np.inf, -np.inf, np.nan])):
        with pytest.raises(InvalidArgumentError, match="input 0 has no finite values to fit on"):
            fit("standardize", hopeless)


@pytest.mark.parametrize(
    ("op", "kw"),
    [
        ("standardize", {}),
        ("min_max_scale", {}),
        ("clip", {}),
        ("bucketize_width", {"buckets": 6}),
        ("bucketize", {"buckets": 8}),
    ],
)
def test_fit_skips_infinities_and_the_params_load_and_apply(op, kw):
    rng = np.random.default_rng(11)
    x = rng.standard_normal(500) * 3
    x[::37], x[5::41], x[9::53] = np.inf, -np.inf, np.nan
    params = fit(op, x, **kw)
    assert params == fit(op, x[np.isfinite(x)], **kw)
    config = json.loads(json.dumps([{"op": op, "inputs": ["x"], "params": params}]))
    (t,) = transforms_from_config(config)
    out = apply(t, {"x": x})["x"]
    np.testing.assert_array_equal(out, apply_reference(t, {"x": x})["x"])
    assert np.isfinite(out[np.isfinite(x)]).all()


def test_fit_on_data_wider_than_the_float64_range():
    x = np.tile([-1e308, -1.0, 0.0, 2.0, 1e308], 20)
    for op in ("bucketize", "clip"):
        t = Transform(op, ["x"], "y", fit(op, x))
        assert np.isfinite(np.concatenate([np.ravel(v) for v in t.checked.values()])).all()
        np.testing.assert_array_equal(apply(t, {"x": x})["y"], apply_reference(t, {"x": x})["y"])
    for op in ("min_max_scale", "bucketize_width"):
        with pytest.raises(InvalidArgumentError, match=rf"fit {op}: params.hi\[0\] - params.lo"):
            fit(op, x)
    wide_clip = Transform("clip", ["x"], "y", {"lo": "-inf", "hi": 1e308})
    np.testing.assert_array_equal(apply(wide_clip, {"x": [np.inf, -np.inf]})["y"], [1e308, -np.inf])


def hot_chain(block: np.ndarray) -> list[Transform]:
    """Every fusable per-column op; bucketize by linear count (9 boundaries) and by binary
    search (40)."""
    fine = fit("bucketize", block[:, 22:24], buckets=41)
    assert all(len(b) == 40 for b in fine["boundaries"])
    return [
        Transform("standardize", NAMES[:12], NAMES[:12], fit("standardize", block[:, :12])),
        Transform("bucketize", NAMES[12:18], NAMES[12:18], fit("bucketize", block[:, 12:18])),
        Transform("bucketize_width", NAMES[18:20], NAMES[18:20],
                  fit("bucketize_width", block[:, 18:20], buckets=7)),
        Transform("bucketize_width", NAMES[20:22], NAMES[20:22],
                  {"lo": [-8e307, 0.5], "hi": [8e307, 0.5], "buckets": [5, 3]}),
        Transform("bucketize", NAMES[22:24], NAMES[22:24], fine),
        Transform("min_max_scale", NAMES[24:26], NAMES[24:26], {"lo": -3.0, "hi": 5.0}),
        Transform("clip", NAMES[26:28], NAMES[26:28], {"lo": -2.0, "hi": "inf"}),
        Transform("log1p", NAMES[28:], NAMES[28:], {}),
        Transform("standardize", NAMES[28:], NAMES[28:], {"mean": 1.0, "std": 2.0}),
    ]  # fmt: skip


def test_fused_chain_equals_reference_chain(data):
    transforms = hot_chain(data["block"])
    block = data["block"].copy()
    f32_max = np.finfo(np.float32).max
    block[1:5, 12:] = np.array([[np.inf], [-np.inf], [f32_max], [-f32_max]])
    data = {**data, **{n: block[:, i] for i, n in enumerate(NAMES)}}
    chain = compile_chain(transforms)
    assert chain.fused and chain.outputs == NAMES and chain.width == 32
    expected = apply_chain(transforms, data, use_reference=True)
    out = chain(data)
    assert out.dtype == np.float32 and out.shape == (ROWS, 32)
    np.testing.assert_allclose(out, expected, rtol=1.2e-7, atol=0)
    np.testing.assert_array_equal(out[:, 12:28], expected[:, 12:28])
    assert len(np.unique(out[:, 22:24])) > 30
    shuffled = NAMES[::-1]
    bound = chain.bind(shuffled)
    np.testing.assert_array_equal(bound(np.ascontiguousarray(block[:, ::-1])), out)
    np.testing.assert_array_equal(bound(np.ascontiguousarray(block[:0, ::-1])).shape, (0, 32))


def test_mixed_chain_equals_reference_chain(data):
    transforms = [
        Transform("ratio", ["f1", "f2"], "r", {"fill": -1.0}),
        Transform("standardize", ["r"], "r", {"mean": 0.5, "std": 3.0}),
        Transform("hour_cyclical", ["ts"], "h", {}),
        Transform("age_seconds", ["ts", "now"], "age", {}),
        Transform("log1p", ["age"], "age", {}),
        Transform("bucketize", ["r"], "rb", {"boundaries": [-1.0, 0.0, 1.0]}),
        Transform("one_hot", ["country"], "c", {"vocabulary": ["de", "fr"]}),
        Transform("haversine_km", ["lat", "lon", "lat", "f3"], "dist", {}),
        Transform("distance_to_point_km", ["lat", "lon"], "dp", {"lat0": 1.0, "lon0": 2.0}),
        Transform("difference", ["dist", "dp"], "dd", {}),
    ]
    outputs = ["f0", "r", "h_sin", "h_cos", "age", "rb", "c_de", "c_oov", "dd"]
    chain = compile_chain(transforms, outputs)
    assert not chain.fused
    assert set(chain.inputs) == {"f0", "f1", "f2", "f3", "ts", "now", "country", "lat", "lon"}
    expected = apply_chain(transforms, data, outputs, use_reference=True)
    np.testing.assert_allclose(chain(data), expected, rtol=1.2e-7, atol=1e-6)
    default = compile_chain(transforms)
    assert default.outputs == ["h_sin", "h_cos", "age", "rb", "c_de", "c_fr", "c_oov", "dd"]


def test_chain_reports_missing_input(data):
    chain = compile_chain(hot_chain(data["block"]))
    with pytest.raises(InvalidArgumentError, match="'f0' is missing"):
        chain({"f1": data["f1"]})
    with pytest.raises(InvalidArgumentError, match="'f0' is not among"):
        chain.bind(NAMES[1:])


def test_equal_frequency_bucketize_fills_its_buckets_evenly():
    rng = np.random.default_rng(4)
    train = rng.standard_normal(10_000)
    t = Transform("bucketize", ["x"], "b", fit("bucketize", train, buckets=4))
    for run in (apply, apply_reference):
        counts = np.bincount(run(t, {"x": train})["b"].astype(np.int64), minlength=4)
        assert counts.tolist() == [2500] * 4
    shifted = apply(t, {"x": train + 10.0})["b"]
    assert (shifted == 3).all(), "values past the fitted range land in the last bucket"


def test_age_seconds_on_a_sentinel_time_is_positive_on_every_chain_path():
    # -2**63 ("unknown") against a 2026 now: the int64 difference wrapped to about -9.2e12 s.
    now = 1_780_000_000_000_000
    cols = {"ts": np.array([-(2**63), now - 1], np.int64), "end": np.full(2, now, np.int64)}
    exact = np.array([(now + 2**63) / 10**6, 1e-6], np.float32)
    for inputs, params in (["ts"], {"now_us": now}), (["ts", "end"], {}):
        steps = transforms_from_config(
            [{"op": "age_seconds", "inputs": inputs, "output": "age", "params": params}]
        )
        for out in (
            apply_chain(steps, cols),
            apply_chain(steps, cols, use_reference=True),
            compile_chain(steps)(cols),
        ):
            np.testing.assert_array_equal(out[:, 0], exact)


@pytest.mark.parametrize(
    ("op", "params", "fragment"),
    [
        ("age_seconds", {"now_us": 2**63}, "params.now_us[0] is 9223372036854775808; it must be "
         "in [-9223372036854775808, 9223372036854775807]"),
        ("age_seconds", {"now_us": 1e30}, "params.now_us[0] is 1e+30; it must be in"),
        ("age_seconds", {"now_us": 1.5}, "params.now_us[0] is 1.5; use a whole number"),
        ("age_seconds", {"now_us": float("nan")}, "params.now_us[0] must be a whole number, got"),
        ("age_seconds", {"now_us": "inf"}, "params.now_us[0] must be a whole number, got 'inf'"),
        ("hash_bucket", {"buckets": 2**63}, "params.buckets[0] is 9223372036854775808; it must "
         "be in [1, 2147483648]: give 1 to 2147483648 buckets"),
        ("hash_bucket", {"buckets": 2**31 + 1}, "params.buckets[0] is 2147483649"),
        ("hash_bucket", {"buckets": [3, 0]}, "params.buckets[1] is 0; it must be in [1, "),
        ("bucketize_width", {"lo": 0, "hi": 1, "buckets": 1e30}, "params.buckets[0] is 1e+30"),
        ("bucketize_width", {"lo": 0, "hi": 1, "buckets": 2.5}, "params.buckets[0] is 2.5"),
        ("distance_to_point_km", {"lat0": 200, "lon0": 0}, "params.lat0 is 200.0; a latitude "
         "must be in [-90, 90] degrees"),
        ("distance_to_point_km", {"lat0": 0, "lon0": -180.5}, "params.lon0 is -180.5; a "
         "longitude must be in [-180, 180] degrees"),
    ],
)  # fmt: skip
def test_out_of_range_params_fail_at_load_naming_the_param(op, params, fragment):
    entry = {"op": op, "inputs": ["a"], "params": params}
    if op == "distance_to_point_km":
        entry.update(inputs=["a", "b"], output="o")
    elif op == "age_seconds":
        entry["output"] = "o"
    elif isinstance(params.get("buckets"), list):
        entry["inputs"] = ["a", "b"]
    with pytest.raises(InvalidArgumentError, match="transforms\\[0\\]") as err:
        transforms_from_config([entry])
    assert fragment in str(err.value)


def test_whole_number_params_stay_exact_up_to_the_int64_bounds():
    for now in (2**53 + 1, 2**63 - 1, -(2**63)):
        entry = {"op": "age_seconds", "inputs": ["t"], "output": "o", "params": {"now_us": now}}
        (step,) = transforms_from_config([entry])
        assert step.checked["now_us"] == now
    for buckets in (1, 2**31, float(2**31)):
        entry = {"op": "hash_bucket", "inputs": ["k"], "params": {"buckets": buckets}}
        (step,) = transforms_from_config([entry])
        assert step.checked["buckets"].tolist() == [int(buckets)]
    entry = {"op": "distance_to_point_km", "inputs": ["a", "b"], "output": "o",
             "params": {"lat0": -90, "lon0": 180}}  # fmt: skip
    (step,) = transforms_from_config([entry])
    assert (step.checked["lat0"], step.checked["lon0"]) == (-90.0, 180.0)


def test_a_list_of_strings_hashes_like_an_object_array_trailing_nuls_included():
    r"""np.asarray made a fixed-width array of the list, which drops trailing NULs: "a\x00"
    hashed like "a", unlike the same keys in Predict or an object array."""
    step = Transform("hash_bucket", ["k"], "h", {"buckets": 1000})
    for keys in (["oslo", "é", "a\x00", "a", ""], [b"a\x00", b"a", b""]):
        want = apply(step, {"k": np.array(keys, object)})["h"]
        assert apply(step, {"k": keys})["h"].tolist() == want.tolist()
        assert apply_reference(step, {"k": keys})["h"].tolist() == want.tolist()
        assert len(set(want.tolist())) == len(keys)


@pytest.mark.parametrize(
    ("op", "params"), [("hash_bucket", {"buckets": 1000}), ("age_seconds", {"now_us": 10**15})]
)
def test_uint64_inputs_over_int64_are_refused_naming_the_input(op, params):
    step = Transform(op, ["k"], "o", params)
    big = np.array([3, 2**63], np.uint64)
    with pytest.raises(InvalidArgumentError, match=r"input 'k' holds 9223372036854775808 at row 1"):
        apply(step, {"k": big})
    fits = np.array([3, 2**63 - 1], np.uint64)
    np.testing.assert_array_equal(
        apply(step, {"k": fits})["o"], apply(step, {"k": fits.astype(np.int64)})["o"]
    )


def test_key_values_that_are_not_strings_are_refused_naming_the_input_and_row():
    """None raised a bare TypeError, an int in an object column hashed as that many NUL bytes
    (bytes(5)), and a lone surrogate a UnicodeEncodeError."""
    step = Transform("hash_bucket", ["k"], "h", {"buckets": 1000})
    for bad, shown in ((None, "None"), (5, "5"), ("\ud800", "'\\ud800'")):
        with pytest.raises(InvalidArgumentError) as info:
            apply(step, {"k": np.array(["a", bad], object)})
        assert str(info.value).endswith(
            f"input 'k' holds {shown} at row 1; give str (UTF-8) or bytes values, or int64 keys"
        ), str(info.value)
