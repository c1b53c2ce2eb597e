"""Fixtures shared by the whole suite: a real featureserve server process on a free port."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

STARTUP_TIMEOUT_S = 60.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`featureserve serve` in a subprocess; start() returns once it logs that it serves."""

    def __init__(
        self, data_dir: Path, model_repo: Path, *extra: str, own_group: bool = False
    ) -> None:
        self.data_dir = data_dir
        self.model_repo = model_repo
        self.extra = list(extra)
        self.own_group = own_group  # lead a new session, so one killpg reaches its children
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.log_lines: list[str] = []
        self._ready = threading.Event()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> ServerProcess:
        cmd = [
            sys.executable, "-m", "server.cli", "serve", "--port", "0",
            "--data-dir", str(self.data_dir), "--model-repo", str(self.model_repo), *self.extra,
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd,
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            env=os.environ,
            start_new_session=self.own_group,
        )
        threading.Thread(target=self._read_logs, daemon=True).start()
        if not self._ready.wait(STARTUP_TIMEOUT_S):
            self.kill()
            raise AssertionError("server did not start:\n" + "\n".join(self.log_lines))
        if self.port == 0:
            raise AssertionError("server exited:\n" + "\n".join(self.log_lines))
        return self

    def _read_logs(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log_lines.append(line.rstrip())
            if not self._ready.is_set() and '"msg": "serving"' in line:
                self.port = int(json.loads(line)["address"].rsplit(":", 1)[1])
                self._ready.set()
        self._ready.set()

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM, then wait for the exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL: no chance to clean up."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def logs(self) -> list[dict]:
        return [json.loads(line) for line in self.log_lines if line.startswith("{")]


def featureserve(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the `featureserve` command line to its end, capturing its output as text."""
    return subprocess.run(
        [sys.executable, "-m", "server.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def float32_to_bf16(values: np.ndarray) -> np.ndarray:
    """float32 values (finite) as BF16 bit patterns, rounded to nearest, ties to even."""
    u = np.asarray(values, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05) -> bool:
    """Poll predicate until it is true or timeout passes; returns its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


async def raised_when_closed_midway(aclient, work, settle=None) -> BaseException:
    """Run work(aclient) in a task, close the async client once settle() is true (default: after
    10 ms, time for the call to start); what the task raised (AssertionError if nothing)."""
    task = asyncio.create_task(work(aclient))
    await asyncio.sleep(0 if settle else 0.01)
    while settle is not None and not settle():
        await asyncio.sleep(0)
    await aclient.close()
    try:
        await asyncio.wait_for(task, 10)
    except (Exception, asyncio.CancelledError) as exc:
        return exc
    raise AssertionError("the call finished before the client closed")


def _state_and_parent(pid: int) -> tuple[str, int] | None:
    """A process's state letter and parent pid from /proc, or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    state, parent = stat[stat.rindex(")") + 2 :].split()[:2]
    return state, int(parent)


def alive(pid: int) -> bool:
    """Whether the process exists and is not a zombie."""
    found = _state_and_parent(pid)
    return found is not None and found[0] != "Z"


def children(pid: int) -> list[int]:
    """Living (non-zombie) processes whose parent is pid."""
    kids = []
    for entry in Path("/proc").iterdir():
        found = _state_and_parent(int(entry.name)) if entry.name.isdigit() else None
        if found is not None and found[1] == pid and found[0] != "Z":
            kids.append(int(entry.name))
    return kids


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator:
    """Start featureserve processes on free ports; all are killed at teardown."""
    started: list[ServerProcess] = []

    def start(
        *extra: str,
        data_dir: Path | None = None,
        model_repo: Path | None = None,
        own_group: bool = False,
    ):
        server = ServerProcess(
            data_dir or tmp_path / "data",
            model_repo or tmp_path / "models",
            *extra,
            own_group=own_group,
        )
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.kill()


@pytest.fixture
def server(server_factory) -> ServerProcess:
    """One running featureserve server with an empty store and model repository."""
    return server_factory()
