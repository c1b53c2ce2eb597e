"""`featureserve serve --workers N`: a parent that spawns N single-process servers on one port
(SO_REUSEPORT), serves their merged metrics, restarts a crashed worker, and drains all of them
on SIGTERM. Workers are fresh interpreters (spawned, never forked after gRPC is imported)."""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from server.config import ServerConfig
from server.metrics import MULTIPROC_ENV, WORKER_ENV

log = logging.getLogger("featureserve.workers")

WORKERS_ENV = "FEATURESERVE_WORKERS"
PARENT_ENV = "FEATURESERVE_PARENT_PID"
MIN_UPTIME_S = 5.0
POLL_S = 0.2
KILL_AFTER_GRACE_S = 10.0
PR_SET_PDEATHSIG = 1


def worker_index() -> int | None:
    """This process's worker index when it runs under run_workers, else None."""
    value = os.environ.get(WORKER_ENV)
    return int(value) if value is not None else None


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind (without listening) a SO_REUSEPORT socket: it fixes the port all workers share when
    port is 0. A port something already listens on is refused first with a plain bind, because
    a SO_REUSEPORT bind succeeds beside another worker group of the same user."""
    from server.app import StartupError, check_port_free

    check_port_free(host, port)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


@dataclass
class Worker:
    """One spawned worker process."""

    index: int
    proc: subprocess.Popen
    started: float


class Supervisor:
    """Spawns, watches and stops the worker processes of one server."""

    def __init__(self, config: ServerConfig, n: int, metrics_dir: Path) -> None:
        self.config = config
        self.n = n
        self.metrics_dir = metrics_dir
        self.workers: list[Worker] = []
        self.stopping = threading.Event()

    def spawn(self, index: int) -> Worker:
        """Start worker `index`, handing it the config over its stdin."""
        env = dict(os.environ)
        env.update(
            {
                MULTIPROC_ENV: str(self.metrics_dir),
                WORKER_ENV: str(index),
                WORKERS_ENV: str(self.n),
                PARENT_ENV: str(os.getpid()),
            }
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", "server.workers"], stdin=subprocess.PIPE, env=env
        )
        assert proc.stdin is not None
        proc.stdin.write(pickle.dumps(self.config))
        proc.stdin.close()
        log.info("worker started", extra={"worker": index, "pid": proc.pid})
        return Worker(index, proc, time.monotonic())

    def run(self) -> int:
        """Run until a stop signal (exit 0 after all workers drained) or a worker that dies
        within MIN_UPTIME_S of its start (startup failure: stop the rest, exit 1)."""
        self.workers = [self.spawn(i) for i in range(self.n)]
        while not self.stopping.wait(POLL_S):
            for slot, worker in enumerate(self.workers):
                code = worker.proc.poll()
                if code is None:
                    continue
                self._forget(worker)
                uptime = time.monotonic() - worker.started
                log.error(
                    "worker exited",
                    extra={"worker": worker.index, "pid": worker.proc.pid, "code": code},
                )
                if uptime < MIN_UPTIME_S:
                    self.stop()
                    return 1
                self.workers[slot] = self.spawn(worker.index)
        return self.stop()

    def stop(self) -> int:
        """SIGTERM every worker, wait for them to drain, SIGKILL stragglers; 0 if all exited 0."""
        live = [w for w in self.workers if w.proc.poll() is None]
        for worker in live:
            worker.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.config.grace_seconds + KILL_AFTER_GRACE_S
        status = 0
        for worker in live:
            try:
                code = worker.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.proc.kill()
                code = worker.proc.wait()
            self._forget(worker)
            # Killed by our SIGTERM means it had not installed its handler yet: still starting,
            # nothing opened, so nothing to drain.
            if code == -signal.SIGTERM:
                log.info("worker stopped before serving", extra={"worker": worker.index})
            status = status or code not in (0, -signal.SIGTERM)
        log.info("workers stopped", extra={"workers": len(live), "clean": status == 0})
        return int(status)

    def _forget(self, worker: Worker) -> None:
        """Drop a dead worker's live-only gauges from the shared metrics."""
        from prometheus_client.multiprocess import mark_process_dead

        mark_process_dead(worker.proc.pid, str(self.metrics_dir))


def run_workers(config: ServerConfig, n: int) -> int:
    """Serve `config` from n worker processes on one port; returns the exit code.

    The port is fixed before spawning (port 0 picks one), workers get metrics_port 0 and this
    process serves /metrics for all of them from the shared multiprocess directory.
    """
    from server.app import preflight
    from server.metrics import serve_metrics

    preflight(config)
    reservation = reserve_port(config.host, config.port)
    port = reservation.getsockname()[1]
    metrics_dir = Path(tempfile.mkdtemp(prefix="featureserve-metrics-"))
    supervisor = Supervisor(dataclasses.replace(config, port=port, metrics_port=0), n, metrics_dir)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: supervisor.stopping.set())
    try:
        if config.metrics_port > 0:
            serve_metrics(config.host, config.metrics_port, metrics_dir)
        log.info("workers", extra={"address": f"{config.host}:{port}", "workers": n})
        return supervisor.run()
    finally:
        reservation.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM this worker when its parent dies, so no orphan keeps the port."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if str(os.getppid()) != os.environ.get(PARENT_ENV):
        sys.exit(1)


def worker_main() -> int:
    """Entry point of a worker: read the config from stdin, serve until SIGTERM."""
    from server.app import StartupError
    from server.logs import configure_logging
    from server.runner import run

    _die_with_parent()
    config: ServerConfig = pickle.loads(sys.stdin.buffer.read())
    configure_logging(config.log_level, config.log_format)
    log.info("worker starting", extra={"worker": worker_index(), "pid": os.getpid()})
    try:
        run(config)
    except StartupError as exc:
        print(f"featureserve worker {worker_index()}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(worker_main())
