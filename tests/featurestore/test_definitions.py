"""features.toml loading: the format, durations and errors that name the file and key."""

import dataclasses
from pathlib import Path

import pytest

from featurestore.definitions import format_duration, load_definitions, parse_duration
from featurestore.dtypes import DType
from featurestore.errors import InvalidArgumentError
from featurestore.registry import FeatureService

GOOD = """
[[entity]]
name = "trip"
join_keys = [{ name = "city", dtype = "string" }, { name = "driver_id", dtype = "INT64" }]
description = "a driver in a city"

[[feature_view]]
name = "driver_stats"
entity = "trip"
ttl = "1h30m"
owner = "ops"
tags = { tier = "gold" }

[[feature_view.feature]]
name = "rating"
dtype = "float64"
allow_nan = true

[[feature_view.feature]]
name = "embedding"
dtype = "float32_vector"
vector_length = 8

[[feature_view]]
name = "driver_flags"
entity = "trip"
ttl_seconds = 30
version = 2

[[feature_view.feature]]
name = "active"
dtype = "bool"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "features.toml"
    path.write_text(text)
    return path


def test_loads_entities_and_views(tmp_path: Path):
    defs = load_definitions(write(tmp_path, GOOD))
    assert [(k.name, k.dtype) for k in defs.entities[0].join_keys] == [
        ("city", DType.STRING),
        ("driver_id", DType.INT64),
    ]
    stats, flags = defs.views
    assert defs.feature_services == ()
    assert stats.ttl_seconds == 5400 and stats.owner == "ops" and stats.tags == {"tier": "gold"}
    assert stats.features[0].allow_nan and stats.features[1].vector_length == 8
    assert stats.features[1].dtype is DType.FLOAT32_VECTOR
    assert (flags.ttl_seconds, flags.version, flags.features[0].dtype) == (30, 2, DType.BOOL)


def test_parse_duration():
    assert parse_duration("90s") == 90
    assert parse_duration("2w1d") == 15 * 86400
    with pytest.raises(ValueError, match="bad duration"):
        parse_duration("1 fortnight")


@pytest.mark.parametrize("seconds", [0, 1, 90, 5400, 86400, 15 * 86400 + 3661])
def test_format_duration_reads_back(seconds):
    assert parse_duration(format_duration(seconds)) == seconds
    assert format_duration(5400) == "1h30m" and format_duration(0) == "0s"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            ('dtype = "bool"', 'dtype = "boolean"'),
            r"feature_view\[1\] \(driver_flags\)\.feature\[0\]\.dtype: unknown dtype 'boolean'",
        ),
        (
            ('ttl = "1h30m"', 'ttl = "soon"'),
            r"feature_view\[0\] \(driver_stats\)\.ttl: bad duration",
        ),
        (('owner = "ops"', 'ownr = "ops"'), r"unknown key\(s\) \['ownr'\]"),
        (("version = 2", 'version = "2"'), r"\.version: expected int, got str"),
        (('name = "trip"', 'name = "trip-1"'), r"entity\[0\]: entity name 'trip-1' is not a valid"),
        (("ttl_seconds = 30", 'ttl_seconds = 30\nttl = "1m"'), "set ttl or ttl_seconds, not both"),
    ],
)
def test_errors_name_file_and_key(tmp_path: Path, edit, message):
    path = write(tmp_path, GOOD.replace(*edit))
    with pytest.raises(InvalidArgumentError, match=message) as info:
        load_definitions(path)
    assert str(path) in str(info.value)


def test_missing_required_and_bad_toml(tmp_path: Path):
    path = write(tmp_path, '[[feature_view]]\nentity = "x"\n')
    with pytest.raises(InvalidArgumentError, match=r"feature_view\[0\]\.name: is required"):
        load_definitions(path)
    with pytest.raises(InvalidArgumentError, match="not valid TOML"):
        load_definitions(write(tmp_path, "[[entity]\n"))
    with pytest.raises(InvalidArgumentError, match="cannot read"):
        load_definitions(tmp_path / "absent.toml")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            ("version = 2", "version = -1"),
            r"\(driver_flags\)\.version: -1 is outside 0 to 4294967295",
        ),
        (
            ("version = 2", "version = 4294967296"),
            r"\(driver_flags\)\.version: 4294967296 is outside 0 to 4294967295; give 0 \(the "
            r"registry decides\) or a version from 1 to 4294967295",
        ),
        (
            ("vector_length = 8", "vector_length = -8"),
            r"\.feature\[1\]\.vector_length: -8 is outside 0 to 4294967295; give the",
        ),
        (
            ("ttl_seconds = 30", "ttl_seconds = -30"),
            r"\(driver_flags\)\.ttl_seconds: -30 is outside 0 to 9223372036854775807; give seconds",
        ),
        (
            ('ttl = "1h30m"', 'ttl = "99999999999999999999s"'),
            r"\(driver_stats\)\.ttl: 99999999999999999999 is outside 0 to 9223372036854775807",
        ),
    ],
)
def test_numbers_outside_their_wire_range_name_file_key_and_range(tmp_path: Path, edit, message):
    """A version, vector_length or TTL the proto's uint32/int64 field cannot hold is an error
    here (it was a protobuf ValueError naming neither file nor key when applied)."""
    path = write(tmp_path, GOOD.replace(*edit))
    with pytest.raises(InvalidArgumentError, match=message) as info:
        load_definitions(path)
    assert str(info.value).startswith(f"{path}: ")


def test_a_file_that_is_not_utf8_names_the_file_and_the_byte(tmp_path: Path):
    path = tmp_path / "features.toml"
    path.write_bytes(GOOD.encode("utf-16"))
    with pytest.raises(InvalidArgumentError) as info:
        load_definitions(path)
    assert str(info.value) == (
        f"{path}: not UTF-8 text (invalid start byte at byte 0); save the definitions file as UTF-8"
    )


DUPLICATE_VIEW = """
[[entity]]
name = "user"
join_keys = [{ name = "user_id", dtype = "int64" }]

[[feature_view]]
name = "dupv"
entity = "user"
[[feature_view.feature]]
name = "a"
dtype = "float32"

[[feature_view]]
name = "dupv"
entity = "user"
[[feature_view.feature]]
name = "a"
dtype = "float32"
[[feature_view.feature]]
name = "b"
dtype = "float32"
"""


def test_a_view_or_entity_declared_twice_names_both_positions(tmp_path: Path):
    """Applied in turn, the second declaration merged into the first (and re-applying the
    same file then failed); now the file is refused, naming both declarations."""
    path = write(tmp_path, DUPLICATE_VIEW)
    with pytest.raises(InvalidArgumentError) as info:
        load_definitions(path)
    assert str(info.value) == (
        f"{path}: feature_view[1]: feature view 'dupv' with no version is declared again (first "
        "at feature_view[0]); declare it once with all its features, or give each declaration "
        "its own explicit version"
    )
    head, tail = DUPLICATE_VIEW.rsplit('entity = "user"\n', 1)
    beside_latest = f'{head}entity = "user"\nversion = 2\n{tail}'
    with pytest.raises(InvalidArgumentError, match="as version 2 here and with no version at"):
        load_definitions(write(tmp_path, beside_latest))  # no version: the latest, maybe 2
    entity = 'entity = "user"\n'
    two_versions = beside_latest.replace(f"{entity}[[", f"{entity}version = 1\n[[", 1)
    assert [v.version for v in load_definitions(write(tmp_path, two_versions)).views] == [1, 2]
    twice = GOOD.split("[[feature_view]]")[0] + GOOD
    with pytest.raises(InvalidArgumentError) as info:
        load_definitions(write(tmp_path, twice))
    assert str(info.value).endswith(
        ": entity[1]: entity 'trip' is declared again (first at entity[0]); declare each "
        "entity once"
    )


def test_a_byte_order_mark_is_skipped(tmp_path: Path):
    path = tmp_path / "features.toml"
    path.write_bytes(GOOD.encode("utf-8-sig"))
    defs = load_definitions(path)
    assert defs.entities[0].name == "trip"
    assert [v.name for v in defs.views] == ["driver_stats", "driver_flags"]


def test_ttl_given_as_a_number_points_to_ttl_seconds(tmp_path: Path):
    path = write(tmp_path, GOOD.replace('ttl = "1h30m"', "ttl = 86400"))
    with pytest.raises(InvalidArgumentError) as info:
        load_definitions(path)
    assert str(info.value) == (
        f'{path}: feature_view[0] (driver_stats).ttl: expected a duration string such as "1d", '
        "got int; for seconds write ttl_seconds = 86400"
    )


def test_a_feature_repeated_in_a_view_names_both_positions(tmp_path: Path):
    """The file check refuses it with its position (only the server's apply caught it, without
    saying where in the file)."""
    first_view = DUPLICATE_VIEW.rsplit("[[feature_view]]", 1)[0]
    path = write(tmp_path, f'{first_view}[[feature_view.feature]]\nname = "a"\ndtype = "int64"\n')
    with pytest.raises(InvalidArgumentError) as info:
        load_definitions(path)
    assert str(info.value) == (
        f"{path}: feature_view[0] (dupv).feature[1].name: 'a' repeats feature[0]; give each "
        "feature of a view its own name"
    )


SERVICES = """
[[feature_service]]
name = "driver_model"
features = ["driver_stats:rating", "driver_flags@2"]
description = "ranks drivers"
owner = "ops"
tags = { tier = "gold" }

[[feature_service]]
name = "rating_only"
features = ["driver_stats:rating"]
"""


def test_loads_feature_services(tmp_path: Path):
    defs = load_definitions(write(tmp_path, GOOD + SERVICES))
    model, rating = defs.feature_services
    assert model == FeatureService(
        "driver_model",
        ("driver_stats:rating", "driver_flags@2"),
        "ranks drivers",
        "ops",
        {"tier": "gold"},
    )
    assert rating == FeatureService("rating_only", ("driver_stats:rating",))
    assert [v.name for v in defs.views] == ["driver_stats", "driver_flags"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        defs.views = ()  # type: ignore[misc]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            ('"driver_flags@2"]', '"driver_flags@2", 3]'),
            r"feature_service\[0\] \(driver_model\)\.features\[2\]: expected a reference string "
            r'such as "view:feature", got int',
        ),
        (
            ('features = ["driver_stats:rating"]', "features = []"),
            r"feature_service\[1\] \(rating_only\)\.features: needs at least one reference",
        ),
        (
            ('features = ["driver_stats:rating"]', 'features = "driver_stats:rating"'),
            r"feature_service\[1\] \(rating_only\)\.features: expected list, got str",
        ),
        (
            ('features = ["driver_stats:rating"]\n', ""),
            r"feature_service\[1\] \(rating_only\)\.features: is required",
        ),
        (
            ('"driver_stats:rating", "driver_flags@2"', '"driver_stats:rating", "driver_flags@"'),
            r"feature_service\[0\] \(driver_model\): features\[1\]: 'driver_flags@' is not a "
            r"feature reference; use 'view:feature'",
        ),
        (
            ('"driver_stats:rating", "driver_flags@2"', '"driver_stats", "driver_stats:rating"'),
            r"feature_service\[0\] \(driver_model\): features\[1\] 'driver_stats:rating' reads "
            r"again what features\[0\] 'driver_stats' reads; name each feature once",
        ),
        (
            ('"driver_flags@2"]', '"driver_stats@1:x"]'),
            r"feature_service\[0\] \(driver_model\): features\[1\] 'driver_stats@1:x' reads "
            r"view 'driver_stats' at version 1, but features\[0\] reads it at its latest",
        ),
        (
            ('tier = "gold"', "tier = 1"),
            r"feature_service\[0\] \(driver_model\)\.tags\.tier: expected str, got int",
        ),
        (
            ('owner = "ops"\ntags', 'ownr = "ops"\ntags'),
            r"feature_service\[0\]: unknown key\(s\) \['ownr'\]",
        ),
        (
            ('name = "rating_only"', 'name = "9lives"'),
            r"feature_service\[1\] \(9lives\): feature service name '9lives' is not a valid name",
        ),
        (
            ('name = "rating_only"', 'name = "driver_model"'),
            r": feature_service\[1\]: feature service 'driver_model' is declared again \(first at "
            r"feature_service\[0\]\); declare each feature service once",
        ),
    ],
)
def test_bad_feature_services_name_file_and_key(tmp_path: Path, edit, message):
    assert edit[0] in SERVICES, edit
    path = write(tmp_path, GOOD + SERVICES.replace(*edit))
    with pytest.raises(InvalidArgumentError, match=message) as info:
        load_definitions(path)
    assert str(info.value).startswith(f"{path}: "), info.value


def test_feature_service_must_be_an_array_of_tables(tmp_path: Path):
    path = write(tmp_path, GOOD.replace("[[entity]]", 'feature_service = "x"\n\n[[entity]]'))
    with pytest.raises(InvalidArgumentError) as info:
        load_definitions(path)
    assert str(info.value) == (
        f"{path}: feature_service: expected an array of tables ([[feature_service]]), got str"
    )
