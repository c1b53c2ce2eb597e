"""The Scenario interface every benchmark plugs into, its registry, and a server-subprocess helper.

A scenario is a stateless object. The harness calls `setup(args)` once in the parent (it may start a
server subprocess and load data) and `make_request_fn(args, channel)` inside each client process,
which rebuilds the scenario by importing its module and looking its name up in the registry: only
`args` (an argparse.Namespace) crosses the process boundary, never live objects.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import grpc

RequestFn = Callable[[], Awaitable[object]]
"""One request: awaits the RPC and raises grpc.aio.AioRpcError on a non-OK status."""

SCENARIO_MODULE_PREFIX = "scenario_"
EXTRA_MODULES_ENV = "FEATURESERVE_BENCH_SCENARIOS"


class ScenarioError(Exception):
    """A scenario is unknown, misconfigured, or its server failed to start."""


@dataclass
class ScenarioRun:
    """What setup() returns: where to send load and what to report beside the figures."""

    target: str
    server_pid: int | None = None
    params: dict[str, Any] = field(default_factory=dict)
    rows_per_request: int = 1
    response_bytes: int | None = None
    server: ServerProcess | None = None
    client_args: argparse.Namespace | None = None


UnaryRequest = tuple[str, bytes, tuple[tuple[str, str], ...]]
"""A unary call for native generators: method path, serialized request, metadata to send."""


@runtime_checkable
class Scenario(Protocol):
    """A named load shape: its flags, its setup and teardown, and its request."""

    name: str
    help: str

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Add the scenario's own flags; their dest names are the JSON parameter names."""

    def setup(self, args: argparse.Namespace) -> ScenarioRun:
        """Prepare the target: start a server unless args.target names one, load data."""

    def make_request_fn(self, args: argparse.Namespace, channel: grpc.aio.Channel) -> RequestFn:
        """Build, inside a client process, the coroutine function that sends one request."""

    def unary_request(self, args: argparse.Namespace) -> UnaryRequest | None:
        """(method path, serialized request, call metadata) for native generators, or None if
        not unary."""

    def teardown(self, run: ScenarioRun) -> None:
        """Stop what setup started."""


class ScenarioBase:
    """Defaults for Scenario's optional parts: no flags, not unary, teardown stops the server."""

    name = ""
    help = ""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """No scenario-specific flags."""

    def unary_request(self, args: argparse.Namespace) -> UnaryRequest | None:
        """Not available to native generators unless overridden."""
        return None

    def variants(self, args: argparse.Namespace) -> list[argparse.Namespace]:
        """The argument sets swept besides load (each set up and reported on its own); [args]."""
        return [args]

    def finish_point(self, run: ScenarioRun, record: dict[str, Any]) -> None:
        """Add what the scenario alone knows about the load point just run to its record;
        nothing by default."""

    def teardown(self, run: ScenarioRun) -> None:
        """Stop the server subprocess setup() started, if any."""
        if run.server is not None:
            run.server.stop()


_REGISTRY: dict[str, Scenario] = {}


def register_scenario(scenario: Scenario) -> Scenario:
    """Add a scenario under its name (re-registering the same class is a no-op)."""
    existing = _REGISTRY.get(scenario.name)
    if existing is not None and type(existing) is not type(scenario):
        raise ScenarioError(
            f"scenario name '{scenario.name}' is taken by {type(existing).__module__}; pick another"
        )
    _REGISTRY[scenario.name] = scenario
    return scenario


def get_scenario(name: str) -> Scenario:
    """The registered scenario called name."""
    load_scenarios()
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY)) or "none"
        raise ScenarioError(f"unknown scenario '{name}'; known: {known}") from None


def scenario_names() -> list[str]:
    """Names of all registered scenarios, sorted."""
    load_scenarios()
    return sorted(_REGISTRY)


def load_scenarios() -> None:
    """Import the built-in scenarios, every benchmarks/scenario_*.py module, and the modules named
    (comma-separated) in $FEATURESERVE_BENCH_SCENARIOS; importing a module registers its scenarios.
    """
    import benchmarks

    modules = ["benchmarks.baseline"]
    modules += [
        f"benchmarks.{info.name}"
        for info in pkgutil.iter_modules(benchmarks.__path__)
        if info.name.startswith(SCENARIO_MODULE_PREFIX)
    ]
    modules += [m.strip() for m in os.environ.get(EXTRA_MODULES_ENV, "").split(",") if m.strip()]
    for module in modules:
        importlib.import_module(module)


class ServerProcess:
    """A server subprocess that prints `READY <port>` on stdout once it is listening.

    A daemon thread keeps draining its stdout so a chatty server never blocks on a full pipe.
    """

    def __init__(self, argv: Sequence[str], ready_timeout_s: float = 30.0) -> None:
        self.process = subprocess.Popen(
            list(argv), stdout=subprocess.PIPE, stderr=None, text=True, bufsize=1
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._drain, daemon=True).start()
        self.port = self._wait_ready(ready_timeout_s)

    def _drain(self) -> None:
        """Forward stdout lines to the queue until EOF (None marks the end)."""
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _wait_ready(self, timeout_s: float) -> int:
        """Wait for the READY line; fail with the command line if it never comes."""
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                break
            if line.startswith("READY "):
                return int(line.split()[1])
        self.stop()
        raise ScenarioError(
            f"server {' '.join(self.process.args)} did not print 'READY <port>' within "
            f"{timeout_s:.0f} s (exit code {self.process.returncode}); run it by hand to see why"
        )

    @property
    def pid(self) -> int:
        """The server's process id, for CPU accounting."""
        return self.process.pid

    @property
    def target(self) -> str:
        """Loopback host:port the server listens on."""
        return f"127.0.0.1:{self.port}"

    def stop(self, timeout_s: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after timeout_s."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def python_module_argv(module: str, *args: str) -> list[str]:
    """argv running `python -m module args...` with this interpreter."""
    return [sys.executable, "-m", module, *args]


def comma_choices(allowed: tuple[str, ...]):
    """argparse type for a comma-separated subset of `allowed`."""

    def parse(text: str) -> list[str]:
        values = [part.strip() for part in text.split(",") if part.strip()]
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"expected a comma list of {allowed}, got '{text}'")
        return values

    return parse
