"""The `featureserve` command line: each command is registered by the module the table names,
and a command imports only its own module."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys

import pytest

from server.cli import COMMAND_MODULES, build_parser


def _choices(parser: argparse.ArgumentParser) -> list[str]:
    """The command names a parser offers."""
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return list(commands.choices)


@pytest.mark.parametrize("module", sorted(set(COMMAND_MODULES.values())))
def test_the_table_names_exactly_the_commands_each_module_registers(module: str) -> None:
    parser = argparse.ArgumentParser()
    importlib.import_module(module).register(parser.add_subparsers())
    assert _choices(parser) == [c for c, m in COMMAND_MODULES.items() if m == module]


def test_the_overview_lists_every_command_and_a_command_only_its_modules() -> None:
    assert _choices(build_parser()) == ["serve", *COMMAND_MODULES]
    assert _choices(build_parser("serve")) == ["serve"]
    assert _choices(build_parser("get")) == [
        "apply",
        "delete-view",
        "delete-service",
        "ingest",
        "get",
    ]
    args = build_parser("get").parse_args(["get", "--view", "v", "--keys", "1,2"])
    assert (args.command, args.view, args.keys) == ("get", "v", "1,2")


def test_a_client_command_imports_neither_the_server_nor_pyflink_nor_the_benchmarks() -> None:
    script = (
        "import sys\n"
        "from server.cli import main\n"
        "try:\n"
        "    main(['get', '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = ['server.app', 'pipelines.streaming', 'benchmarks.cli', 'pandas', 'onnxruntime']\n"
        "print([m for m in heavy if m in sys.modules])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert "--keys" in done.stdout
    assert done.stdout.splitlines()[-1] == "[]"
