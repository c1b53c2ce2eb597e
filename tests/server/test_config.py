"""Config loading: TOML keys at the top level or under [server], sections, flags, errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.config import ConfigError, ServerConfig, load_config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "featureserve.toml"
    path.write_text(text)
    return path


def test_defaults_are_the_embedded_single_machine_setup() -> None:
    config = load_config()
    assert (config.data_dir, config.model_repo, config.port) == (
        Path("data"),
        Path("models"),
        50051,
    )
    assert config.extra == {}
    assert config.event_loop == "uvloop"


def test_top_level_server_table_sections_and_flag_overrides(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'port = 7000\ndata_dir = "/srv/d"\n[server]\ngrace_seconds = 3\n'
        '[auth]\nenabled = false\n[tls]\ncert_file = "c.pem"\n',
    )
    config = load_config(path, {"port": 7001, "host": None})
    assert config.port == 7001 and config.host == ServerConfig.host
    assert config.data_dir == Path("/srv/d") and config.grace_seconds == 3.0
    assert config.extra == {"auth": {"enabled": False}, "tls": {"cert_file": "c.pem"}}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("prot = 1\n", "unknown key 'prot'"),
        ("[server]\nextra = 1\n", "unknown key 'extra'"),
        ("[store]\nx = 1\n", "unknown key 'store'"),
        ("port = true\n", "key 'port' must be int, got bool"),
        ("server = 3\n", "[server] must be a table"),
        ("port = \n", "not valid TOML"),
        ('event_loop = "trio"\n', "key 'event_loop' is 'trio'; use one of 'uvloop', 'asyncio'"),
        ("auth = 5\n", "[auth] must be a table"),
        ('tls = "x"\n', "[tls] must be a table"),
        ('log_level = "LOUD"\n', "key 'log_level' is 'LOUD'; use one of DEBUG"),
        ('log_format = "xml"\n', "key 'log_format' is 'xml'; use one of 'json', 'text'"),
        ("port = -1\n", "key 'port' is -1; use 0-65535"),
        ("metrics_port = 70000\n", "key 'metrics_port' is 70000; use 0-65535"),
        ("max_message_bytes = 0\n", "key 'max_message_bytes' is 0; it must be at least 1"),
        ("lmdb_map_bytes = 0\n", "key 'lmdb_map_bytes' is 0; it must be at least 1"),
        ("max_entities_per_request = 0\n", "'max_entities_per_request' is 0; it must be at"),
        ("max_rows_per_write = -3\n", "key 'max_rows_per_write' is -3; it must be at least 1"),
        ("grace_seconds = -5\n", "key 'grace_seconds' is -5.0; it must be at least 0"),
        ("max_concurrent_rpcs = -1\n", "key 'max_concurrent_rpcs' is -1; it must be at least 0"),
        ("lmdb_max_dbs = 2\n", "key 'lmdb_max_dbs' is 2; use 3-32768 (1 database for the"),
        ("lmdb_max_dbs = 32769\n", "key 'lmdb_max_dbs' is 32769; use 3-32768"),
    ],
)
def test_errors_name_the_key_and_the_file(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(str(path)) and message in str(err.value)


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.toml")


def test_a_flag_outside_the_choices_is_named() -> None:
    with pytest.raises(ConfigError, match="command line: key 'event_loop' is 'tokio'"):
        load_config(None, {"event_loop": "tokio"})


def test_bounds_admit_their_edge_values() -> None:
    config = load_config(
        None, {"port": 65535, "metrics_port": 0, "max_message_bytes": 1, "grace_seconds": 0}
    )
    assert (config.port, config.max_message_bytes, config.grace_seconds) == (65535, 1, 0.0)
    assert load_config(None, {"log_level": "debug"}).log_level == "debug"
    assert load_config(None, {"lmdb_max_dbs": 3}).lmdb_max_dbs == 3
    assert load_config(None, {"lmdb_max_dbs": 32768}).lmdb_max_dbs == 32768
