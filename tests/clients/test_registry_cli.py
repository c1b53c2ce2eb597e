"""`featureserve list` and `featureserve describe` run as real subprocesses against a real
server: tables for people, `--json` for scripts, NOT_FOUND as the other client commands print it,
and only what the token may see."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest

from tests.conftest import ServerProcess, featureserve
from tests.server.test_auth import token_toml

ENTITIES = """
[[entity]]
name = "user"
join_keys = [{ name = "user_id", dtype = "int64" }]

[[entity]]
name = "item"
join_keys = [{ name = "item_id", dtype = "string" }, { name = "shop", dtype = "int64" }]
"""


def user_stats(ttl: str, version: int = 0, with_clicks: bool = True) -> str:
    """The `user_stats` view; dropping clicks needs version 2."""
    clicks = '[[feature_view.feature]]\nname = "clicks"\ndtype = "int64"\n' if with_clicks else ""
    return f"""
[[feature_view]]
name = "user_stats"
entity = "user"
ttl = "{ttl}"
version = {version}
owner = "growth"
description = "activity of a user"
tags = {{ tier = "gold", team = "ml" }}

[[feature_view.feature]]
name = "score"
dtype = "float32"
allow_nan = true
description = "model score"

{clicks}
[[feature_view.feature]]
name = "emb"
dtype = "float32_vector"
vector_length = 3
"""


ITEM_STATS = """
[[feature_view]]
name = "item_stats"
entity = "item"
owner = "catalog"

[[feature_view.feature]]
name = "price"
dtype = "float64"

[[feature_view.feature]]
name = "title"
dtype = "string"
"""

SERVICES = """
[[feature_service]]
name = "fraud"
features = ["user_stats", "item_stats@1:price"]
owner = "risk"
description = "fraud model inputs"

[[feature_service]]
name = "ranker"
features = ["user_stats@1:clicks", "user_stats@1:score"]
"""


def run(target: str, *args: str, token: str | None = None):
    """`featureserve ARGS --target TARGET [--token T]` to its end."""
    auth = ("--token", token) if token else ()
    return featureserve(*args, "--target", target, *auth)


def applied(target: str, folder: Path, name: str, text: str, token: str | None = None) -> None:
    path = folder / f"{name}.toml"
    path.write_text(text)
    result = run(target, "apply", str(path), token=token)
    assert result.returncode == 0, result.stderr


def cells(stdout: str) -> list[list[str]]:
    """Printed lines as cells split on runs of 2+ spaces (a table's header first)."""
    return [
        [c.strip() for c in line.strip().split("  ") if c.strip()] for line in stdout.splitlines()
    ]


def iso_us(text: str) -> int:
    """µs since the epoch of an ISO 8601 UTC time ending in Z."""
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    assert moment.utcoffset().total_seconds() == 0
    return round(moment.timestamp() * 1_000_000)


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> str:
    """A server holding user_stats v1 (TTL 1d, then 2h) and v2 (clicks dropped, TTL 6h),
    item_stats v1 (a composite string/int64 key), and services fraud (whole latest view plus
    a pinned feature) and ranker (pinned features)."""
    base = tmp_path_factory.mktemp("registry_cli")
    server = ServerProcess(base / "data", base / "models").start()
    applied(server.target, base, "v1", ENTITIES + user_stats("1d") + ITEM_STATS)
    applied(server.target, base, "ttl", ENTITIES + user_stats("2h"))
    applied(server.target, base, "v2", ENTITIES + user_stats("6h", 2, with_clicks=False))
    applied(server.target, base, "services", SERVICES)
    yield server.target
    server.kill()


def test_list_views_prints_the_latest_version_of_each(registry: str) -> None:
    result = run(registry, "list", "views")
    assert result.returncode == 0, result.stderr
    rows = cells(result.stdout)
    assert rows[0] == ["NAME", "VERSION", "ENTITY", "FEATURES", "TTL", "OWNER", "UPDATED"]
    assert [r[:6] for r in rows[1:]] == [
        ["item_stats", "1", "item", "2", "none", "catalog"],
        ["user_stats", "2", "user", "2", "6h", "growth"],
    ]
    assert all(r[6].endswith("Z") and len(r[6]) == 20 for r in rows[1:])
    header, *lines = result.stdout.splitlines()
    assert [line.index(f" {r[2]} ") + 1 for line, r in zip(lines, rows[1:], strict=True)] == [
        header.index("ENTITY")
    ] * 2


def test_list_views_all_versions_json(registry: str) -> None:
    result = run(registry, "list", "views", "--all-versions", "--json")
    assert result.returncode == 0, result.stderr
    views = json.loads(result.stdout)["views"]
    assert [(v["name"], v["version"]) for v in views] == [
        ("item_stats", 1),
        ("user_stats", 1),
        ("user_stats", 2),
    ]
    v1 = views[1]
    assert [f["name"] for f in v1["features"]] == ["score", "clicks", "emb"]
    assert v1["ttl_seconds"] == 7200
    assert [h["ttl_seconds"] for h in v1["ttl_history"]] == [86400, 7200]
    for view in views:
        assert iso_us(view["created"]) == view["created_us"] > 0
        assert iso_us(view["updated"]) == view["updated_us"] >= view["created_us"]
        for change in view["ttl_history"]:
            assert iso_us(change["from"]) == change["from_us"]
    table_rows = cells(run(registry, "list", "views", "--all-versions").stdout)[1:]
    assert [(r[0], r[1], r[4]) for r in table_rows] == [
        ("item_stats", "1", "none"),
        ("user_stats", "1", "2h"),
        ("user_stats", "2", "6h"),
    ]


def test_prefix_narrows_each_kind(registry: str) -> None:
    views = cells(run(registry, "list", "views", "--prefix", "item").stdout)
    assert [r[0] for r in views[1:]] == ["item_stats"]
    services = cells(run(registry, "list", "services", "--prefix", "ra").stdout)
    assert [r[0] for r in services[1:]] == ["ranker"]
    entities = json.loads(run(registry, "list", "entities", "--prefix", "us", "--json").stdout)
    assert [e["name"] for e in entities["entities"]] == ["user"]
    none = run(registry, "list", "views", "--prefix", "zzz")
    assert none.returncode == 0
    assert "no feature views with a name starting 'zzz' registered" in none.stdout


def test_all_versions_belongs_to_views_only(registry: str) -> None:
    result = run(registry, "list", "services", "--all-versions")
    assert result.returncode == 2
    assert "unrecognized arguments: --all-versions" in result.stderr


def test_list_entities_shows_join_keys_with_types(registry: str) -> None:
    result = run(registry, "list", "entities")
    assert result.returncode == 0, result.stderr
    assert cells(result.stdout) == [
        ["NAME", "JOIN KEYS"],
        ["item", "item_id:string, shop:int64"],
        ["user", "user_id:int64"],
    ]
    document = json.loads(run(registry, "list", "entities", "--json").stdout)
    assert document["entities"][0] == {
        "name": "item",
        "join_keys": [{"name": "item_id", "dtype": "string"}, {"name": "shop", "dtype": "int64"}],
        "description": "",
    }


def test_list_services_table_and_json(registry: str) -> None:
    result = run(registry, "list", "services")
    assert result.returncode == 0, result.stderr
    rows = cells(result.stdout)
    assert rows[0] == ["NAME", "REFERENCES", "VIEWS", "OWNER", "UPDATED"]
    assert [r[:4] for r in rows[1:]] == [
        ["fraud", "2", "user_stats, item_stats@1", "risk"],
        ["ranker", "2", "user_stats@1", "-"],
    ]
    services = json.loads(run(registry, "list", "services", "--json").stdout)["services"]
    fraud = services[0]
    assert fraud["features"] == ["user_stats", "item_stats@1:price"]
    assert fraud["views"] == ["user_stats", "item_stats@1"]
    assert fraud["description"] == "fraud model inputs"
    assert iso_us(fraud["updated"]) == fraud["updated_us"] > 0


def test_describe_view_latest_and_pinned_version(registry: str) -> None:
    latest = run(registry, "describe", "view", "user_stats")
    assert latest.returncode == 0, latest.stderr
    lines = latest.stdout.splitlines()
    assert lines[0] == "feature view user_stats@2"
    assert "  tags:        team=ml, tier=gold" in lines
    assert "  ttl:         6h" in lines
    assert "  description: activity of a user" in lines
    assert "clicks" not in latest.stdout

    old = run(registry, "describe", "view", "user_stats", "--version", "1")
    assert old.returncode == 0, old.stderr
    rows = cells(old.stdout)
    assert rows[0] == ["feature view user_stats@1"]
    history = rows[rows.index(["FROM", "TTL"]) + 1 :][:2]
    assert [h[1] for h in history] == ["1d", "2h"]
    assert iso_us(history[0][0]) < iso_us(history[1][0])
    features = rows[rows.index(["NAME", "DTYPE", "ALLOW NAN", "DESCRIPTION"]) + 1 :]
    assert features == [
        ["score", "float32", "yes", "model score"],
        ["clicks", "int64", "no", "-"],
        ["emb", "float32_vector[3]", "no", "-"],
    ]

    pinned = run(registry, "describe", "view", "user_stats", "--version", "1", "--json")
    document = json.loads(pinned.stdout)
    assert document["version"] == 1
    assert document["tags"] == {"team": "ml", "tier": "gold"}
    assert document["features"][2] == {
        "name": "emb",
        "dtype": "float32_vector",
        "vector_length": 3,
        "allow_nan": False,
        "description": "",
    }
    assert [h["ttl_seconds"] for h in document["ttl_history"]] == [86400, 7200]


def test_describe_service_resolves_each_reference(registry: str) -> None:
    result = run(registry, "describe", "service", "fraud")
    assert result.returncode == 0, result.stderr
    rows = cells(result.stdout)
    assert rows[0] == ["feature service fraud"]
    assert rows[rows.index(["REFERENCE", "READS", "FEATURES"]) + 1 :] == [
        ["user_stats", "user_stats@2", "score, emb"],
        ["item_stats@1:price", "item_stats@1", "price"],
    ]
    document = json.loads(run(registry, "describe", "service", "fraud", "--json").stdout)
    assert document["owner"] == "risk"
    assert document["references"] == [
        {
            "reference": "user_stats",
            "view": "user_stats",
            "pinned_version": None,
            "version": 2,
            "features": ["score", "emb"],
        },
        {
            "reference": "item_stats@1:price",
            "view": "item_stats",
            "pinned_version": 1,
            "version": 1,
            "features": ["price"],
        },
    ]
    ranker = json.loads(run(registry, "describe", "service", "ranker", "--json").stdout)
    assert [(r["version"], r["features"]) for r in ranker["references"]] == [
        (1, ["clicks"]),
        (1, ["score"]),
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["describe", "view", "user_stat"],
            "feature view 'user_stat' is not registered; did you mean 'user_stats'",
        ),
        (
            ["describe", "view", "user_stats", "--version", "7"],
            "feature view 'user_stats' has no version 7; versions: 1, 2",
        ),
        (
            ["describe", "service", "frau"],
            "feature service 'frau' is not registered; did you mean 'fraud'",
        ),
    ],
)
def test_unknown_names_exit_1_with_the_servers_not_found(
    registry: str, args: list[str], message: str
) -> None:
    result = run(registry, *args)
    assert result.returncode == 1
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith(f"featureserve: NOT_FOUND: {message}"), result.stderr


def test_an_empty_registry_says_so(server) -> None:
    for kind, words in (
        ("entities", "no entities registered"),
        ("views", "no feature views registered"),
        ("services", "no feature services registered"),
    ):
        result = run(server.target, "list", kind)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(words), result.stdout
        document = json.loads(run(server.target, "list", kind, "--json").stdout)
        assert document == {kind: []}


def test_a_token_lists_only_the_views_it_may_read(server_factory, tmp_path: Path) -> None:
    config = tmp_path / "featureserve.toml"
    config.write_text(
        "[auth]\nenabled = true\n"
        + token_toml("admin", "a-secret", ["admin"])
        + token_toml("a_reader", "r-secret", ["read:a*"])
    )
    server = server_factory("--config", str(config))
    views = "".join(
        f'[[feature_view]]\nname = "{name}"\nentity = "{entity}"\n'
        '[[feature_view.feature]]\nname = "f"\ndtype = "float32"\n'
        for name, entity in (("alpha", "user"), ("apple", "user"), ("beta", "item"))
    )
    services = (
        '[[feature_service]]\nname = "s_alpha"\nfeatures = ["alpha:f"]\n'
        '[[feature_service]]\nname = "s_beta"\nfeatures = ["beta:f"]\n'
    )
    applied(server.target, tmp_path, "defs", ENTITIES + views + services, token="a-secret")

    everything = cells(run(server.target, "list", "views", token="a-secret").stdout)
    assert [r[0] for r in everything[1:]] == ["alpha", "apple", "beta"]
    seen = cells(run(server.target, "list", "views", token="r-secret").stdout)
    assert [r[0] for r in seen[1:]] == ["alpha", "apple"]
    entities = json.loads(run(server.target, "list", "entities", "--json", token="r-secret").stdout)
    assert [e["name"] for e in entities["entities"]] == ["user"]
    services = cells(run(server.target, "list", "services", token="r-secret").stdout)
    assert [r[0] for r in services[1:]] == ["s_alpha"]
