"""`featureserve predict`: score a few entities with a model that binds features."""

from __future__ import annotations

import argparse
import sys
from itertools import zip_longest

import numpy as np

from clients.cli import add_connection_flags, client_config
from clients.feature_cli import _InputError, _int64_array, _integers, _key_values, _typed_keys
from clients.prediction_client import PredictionClient
from featurestore.dtypes import DType, FeatureStatus
from featurestore.registry import JoinKey
from protos import arrays

_VALUE_DTYPES = {
    "float64": np.float64,
    "float32": np.float32,
    "int64": np.int64,
    "bool": np.bool_,
    "string": np.object_,
}
_BOOLS = {"1": True, "true": True, "0": False, "false": False}


def _floats(parts: list[str], kind: type) -> np.ndarray:
    """Decimal text as `kind` (float64 or float32), read as ingest reads a float cell (Arrow's
    cast: NumPy also reads "1_0" as 10); OverflowError for a finite number outside its range
    (NumPy would store it as inf)."""
    import pyarrow as pa

    wide = np.asarray(pa.array(parts, pa.string()).cast(pa.float64()))
    exact = np.array([p.lstrip("+-").lower() in ("inf", "infinity") for p in parts])
    if (np.isinf(wide) & ~exact).any():
        raise OverflowError
    with np.errstate(over="ignore"):
        narrow = wide.astype(kind)
    if (np.isinf(narrow) & np.isfinite(wide)).any():
        raise OverflowError
    return narrow


def _request_value(name: str, text: str) -> tuple[str, np.ndarray]:
    """NAME[:DTYPE] and comma-separated values (float64 unless a dtype is given); int64 values
    are parsed exactly, not through float, and a value outside its dtype's range is an
    _InputError, not a wrap or an inf."""
    name, _, dtype = name.partition(":")
    dtype = dtype or "float64"
    kind = _VALUE_DTYPES.get(dtype)
    if kind is None:
        raise _InputError(f"--value {name}:{dtype}: use {list(_VALUE_DTYPES)}")
    parts = [p.strip() for p in text.split(",")]
    flag = f"--value {name}:{dtype}={text}"
    try:
        if kind is np.bool_:
            return name, np.array([_BOOLS[p.lower()] for p in parts])
        if kind is np.int64:
            ints = _integers(parts)
            return name, _int64_array(ints, flag, "give values in that range or use float64")
        if kind is np.object_:
            return name, np.array(parts, object)
        return name, _floats(parts, kind)
    except (KeyError, ValueError):
        spelled = {"int64": " (ASCII digits, optionally after a -)", "bool": " (true/false/1/0)"}
        raise _InputError(
            f"{flag}: not comma-separated {dtype} values{spelled.get(dtype, '')}"
        ) from None
    except OverflowError:
        wider = " or use float64" if kind is np.float32 else ""
        raise _InputError(
            f"{flag}: a value overflows {dtype} (largest finite {np.finfo(kind).max:.8g}); send "
            f"a smaller value{wider}"
        ) from None


def _request_values(items: list[str]) -> dict[str, np.ndarray]:
    """Every --value NAME[:DTYPE]=V1,V2, by name; a name given twice is an error, not a
    silent overwrite."""
    values: dict[str, np.ndarray] = {}
    for item in items:
        spec, sep, text = item.partition("=")
        if not sep or not spec:
            raise _InputError(f"--value {item!r}: use NAME[:DTYPE]=V1,V2")
        name, array = _request_value(spec, text)
        if name in values:
            raise _InputError(f"--value {name!r} is given twice; give each request value once")
        values[name] = array
    return values


_KEY_TYPES = ("auto", "int64", "string")


def _pairs(items: list[str], flag: str) -> dict[str, tuple[str, str]]:
    """Each NAME[:TYPE]=V1,V2 as NAME -> (TYPE, or "" when not given, and the values); a name
    given twice (whatever its TYPE) is an error."""
    out = {}
    for item in items:
        spec, sep, values = item.partition("=")
        name, _, key_type = spec.partition(":")
        if not sep or not name:
            raise _InputError(f"{flag} {item!r}: use NAME=V1,V2 (NAME:TYPE=V1,V2 to type it)")
        if key_type and key_type not in _KEY_TYPES[1:]:
            raise _InputError(f"{flag} {spec}: TYPE is int64 or string, got {key_type!r}")
        if name in out:
            raise _InputError(f"{flag} {name}= is given twice; give it once")
        out[name] = (key_type, values)
    return out


def _keys(text: str, key_type: str, flag: str, name: str) -> np.ndarray:
    """Comma-separated keys: int64 or strings as `key_type` says (auto: all integers is
    int64)."""
    if key_type == "auto":
        return _key_values(text, flag)
    dtype = DType.STRING if key_type == "string" else DType.INT64
    return _typed_keys(text, JoinKey(name, dtype), flag)


def _inputs(args: argparse.Namespace) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The keys and request values of the command line, typed; _InputError for bad ones."""
    entities = _pairs(args.entity, "--entity")
    keys = {
        name: _keys(text, key_type or args.key_type, "--entity", name)
        for name, (key_type, text) in entities.items()
    }
    if args.keys is not None:
        if args.join_key in keys:
            raise _InputError(
                f"--keys and --entity {args.join_key}= both set {args.join_key!r}; give one"
            )
        keys[args.join_key] = _keys(args.keys, args.key_type, "--keys", args.join_key)
    return keys, _request_values(args.value)


def cmd_predict(args: argparse.Namespace) -> int:
    """Print each entity's scores, status, oldest feature time and fills; exit 2 for input
    that cannot be sent (as get and ingest do), 1 if a row FAILED."""
    try:
        keys, values = _inputs(args)
        with PredictionClient(client_config(args)) as client:
            result = client.predict(args.model, keys, values, version=args.version)
    except (_InputError, arrays.ArrayError) as exc:
        # An ArrayError names the key or value the client could not send (text not UTF-8).
        print(f"featureserve predict: {exc}", file=sys.stderr)
        return 2
    lineage = result.lineage
    through = f" through service {lineage.feature_service}" if lineage.feature_service else ""
    views = [
        f"{view} as {alias}" if alias else view
        for view, alias in zip_longest(lineage.feature_views, lineage.feature_view_aliases)
    ]
    print(f"model {result.model} version {lineage.model_version}; views {views}" + through)
    errors = {e.row: e.reason for e in result.row_errors}
    for row in range(result.rows):
        key_text = ", ".join(f"{k}={v[row]}" for k, v in keys.items())
        scores = " ".join(f"{n}={s[row].tolist()}" for n, s in result.scores.items())
        status = "OK" if result.ok[row] else f"FAILED ({errors.get(row, '')})"
        print(f"[{key_text}] {status} {scores} oldest_event_us={lineage.oldest_event_us[row]}")
    for fill in lineage.fills:
        counts = {
            FeatureStatus(int(s)).name: int(n)
            for s, n in zip(*np.unique(fill.statuses, return_counts=True), strict=True)
        }
        print(f"  fill {fill.feature}: {counts} -> {fill.filled_with}")
    return 0 if result.ok.all() else 1


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `predict`."""
    p = subparsers.add_parser(
        "predict",
        help="score entities with a feature-bound model",
        description="One-hop prediction: the server reads features, transforms them and scores.",
    )
    p.add_argument("--model", required=True, help="model name")
    p.add_argument("--version", default="", help="model version (default: latest)")
    p.add_argument("--keys", help="comma-separated keys of --join-key")
    p.add_argument("--join-key", default="user_id", help="join key that --keys fills")
    p.add_argument(
        "--key-type",
        choices=_KEY_TYPES,
        default="auto",
        help="type of the key values (auto: all integers is int64; string keeps '007'); "
        "--entity NAME:TYPE=... sets one column's",
    )
    p.add_argument(
        "--entity",
        action="append",
        default=[],
        metavar="NAME[:TYPE]=V1,V2",
        help="keys of one key column (repeat for composite keys and each projection's columns); "
        "TYPE int64 or string overrides --key-type for this column",
    )
    p.add_argument(
        "--value",
        action="append",
        default=[],
        metavar="NAME[:DTYPE]=V1,V2",
        help="request-time values, one per entity; DTYPE float64 (default), float32, int64, "
        "bool, string",
    )
    add_connection_flags(p)
    p.set_defaults(func=cmd_predict)
