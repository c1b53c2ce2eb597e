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


def test_flags_of_a_section_override_its_file_keys(tmp_path: Path) -> None:
    """The --trace-* flags land in the [trace] table over the file's keys (None: not given)."""
    path = write(tmp_path, '[trace]\ntrace_rate = 10\ntrace_file = "t.jsonl"\n')
    flags = {"trace_rate": 1, "trace_level": "TIMESTAMPS", "trace_file": None}
    config = load_config(path, None, {"trace": flags})
    assert config.extra["trace"] == {
        "trace_rate": 1,
        "trace_level": "TIMESTAMPS",
        "trace_file": "t.jsonl",
    }
    assert "trace" not in load_config(None, None, {"trace": {"trace_rate": None}}).extra
    with pytest.raises(ConfigError, match=r"\[trace\] must be a table"):
        load_config(write(tmp_path, "trace = 1\n"))


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
        ("max_message_bytes = 0\n", "key 'max_message_bytes' is 0; use 1-2147483647 (gRPC's"),
        ("max_message_bytes = 2147483648\n", "key 'max_message_bytes' is 2147483648; use 1-2"),
        ("lmdb_map_bytes = 0\n", "key 'lmdb_map_bytes' is 0; it must be at least 1"),
        ("max_entities_per_request = 0\n", "'max_entities_per_request' is 0; it must be at"),
        ("max_rows_per_write = -3\n", "key 'max_rows_per_write' is -3; it must be at least 1"),
        ("grace_seconds = -5\n", "key 'grace_seconds' is -5.0; it must be at least 0"),
        ("max_concurrent_rpcs = -1\n", "key 'max_concurrent_rpcs' is -1; it must be at least 0"),
        ("lmdb_max_dbs = 2\n", "key 'lmdb_max_dbs' is 2; use 3-32768 (1 database for the"),
        ("lmdb_max_dbs = 32769\n", "key 'lmdb_max_dbs' is 32769; use 3-32768"),
        ("grace_seconds = nan\n", "key 'grace_seconds' is nan; use a finite number"),
        ("warm_store_seconds = -inf\n", "key 'warm_store_seconds' is -inf; use a finite number"),
        ("model_poll_interval_s = 0\n", "'model_poll_interval_s' is 0.0; it must be at least 0.05"),
        ("model_poll_interval_s = -1.5\n", "'model_poll_interval_s' is -1.5; it must be at least"),
        ("model_poll_interval_s = inf\n", "'model_poll_interval_s' is inf; use a finite number"),
        ("history_retention_seconds = -1\n", "'history_retention_seconds' is -1; use 0-3153600000"),
        ("history_retention_seconds = 9000000000000\n", "0 keeps all; at most 100 years"),
        ("history_retention_seconds = 1.5\n", "'history_retention_seconds' must be int, got float"),
        (
            "history_compaction_interval_seconds = 0.5\n",
            "'history_compaction_interval_seconds' is 0.5; it must be at least 1.0",
        ),
        ("port = 9000\nmetrics_port = 9000\n", "'metrics_port' is 9000, the same as 'port'; give"),
    ],
)
def test_errors_name_the_key_and_the_file(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(str(path)) and message in str(err.value)


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the config file: No such file"):
        load_config(tmp_path / "absent.toml")


def test_a_directory_or_a_file_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path)
    readable = "give --config a readable TOML file"
    assert str(err.value) == f"{tmp_path}: cannot read the config file: Is a directory; {readable}"
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'log_format = "caf\xe9"\n')
    with pytest.raises(ConfigError) as err:
        load_config(path)
    bad_byte = "invalid continuation byte at byte 17"
    assert str(err.value) == f"{path}: not UTF-8 text ({bad_byte}); save the config file as UTF-8"


def test_metrics_port_equal_to_port_is_named_where_it_was_set(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "port = 9000\n"), {"metrics_port": 9000})
    assert str(err.value).startswith("command line: key 'metrics_port' is 9000, the same as")
    assert load_config(None, {"port": 0, "metrics_port": 0}).metrics_port == 0


@pytest.mark.parametrize("host", ["::1", "[::1]"])
def test_an_ipv6_host_is_bracketed_in_the_address(host: str) -> None:
    config = load_config(None, {"host": host, "port": 7000})
    assert (config.host, config.address) == ("::1", "[::1]:7000")
    assert load_config(None, {"host": "10.0.0.1", "port": 7000}).address == "10.0.0.1:7000"


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
    assert load_config(None, {"max_message_bytes": 2**31 - 1}).max_message_bytes == 2**31 - 1
    assert load_config(None, {"model_poll_interval_s": 0.05}).model_poll_interval_s == 0.05


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('model_control_mode = "EXPLICIT"\n', "'model_control_mode' is 'EXPLICIT'; use one of"),
        ('startup_models = "a"\n', "key 'startup_models' must be a list of model names"),
        ("startup_models = [1]\n", "key 'startup_models' must be a list of model names"),
        (
            'model_control_mode = "explicit"\nstartup_models = ["../x"]\n',
            "key 'startup_models' lists '../x', which is not a model name: give the name of a",
        ),
        (
            'model_control_mode = "explicit"\nstartup_models = ["a", "*"]\n',
            'lists "*" beside other names; give ["*"] alone',
        ),
        (
            'model_control_mode = "poll"\nstartup_models = ["a"]\n',
            "key 'startup_models' is given while 'model_control_mode' is 'poll': only explicit",
        ),
    ],
)
def test_model_control_errors_name_the_keys(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    assert str(err.value).startswith(str(tmp_path)) and message in str(err.value)


def test_model_control_mode_and_startup_models_from_file_and_flags(tmp_path: Path) -> None:
    assert (load_config().model_control_mode, load_config().startup_models) == ("poll", [])
    path = write(tmp_path, 'model_control_mode = "explicit"\nstartup_models = ["a", "b", "a"]\n')
    assert load_config(path).startup_models == ["a", "b"]
    config = load_config(path, {"startup_models": ["*"], "model_control_mode": None})
    assert (config.model_control_mode, config.startup_models) == ("explicit", ["*"])
    config = load_config(None, {"model_control_mode": "none"})
    assert (config.model_control_mode, config.startup_models) == ("none", [])
