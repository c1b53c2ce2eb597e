"""`featureserve serve --workers N`: a parent that spawns N single-process servers on one port
(SO_REUSEPORT), serves their merged metrics, restarts a crashed worker, and drains all of them
on SIGTERM. Workers are fresh interpreters (spawned, never forked after gRPC is imported).

It imports the metrics module (NumPy, prometheus_client) only where it is used."""

from __future__ import annotations

import ctypes
import dataclasses
import fcntl
import glob
import logging
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from server.config import ServerConfig, host_port
from server.stop_signals import StopSignals

log = logging.getLogger("featureserve.workers")

WORKERS_ENV = "FEATURESERVE_WORKERS"
PARENT_ENV = "FEATURESERVE_PARENT_PID"
MIN_UPTIME_S = 5.0
POLL_S = 0.2
KILL_AFTER_GRACE_S = 10.0
PR_SET_PDEATHSIG = 1
METRICS_DIR_PREFIX = "featureserve-metrics-"
"""A group's shared metrics folder in $TMPDIR: this prefix and random characters."""
LIVE_LOCK = ".live"
"""A file in a group's metrics folder whose exclusive flock the parent holds while it runs."""
STATS_SOCKET_GLOB = "stats-*.sock"
"""The unix sockets in a group's metrics folder on which workers serve their ModelStatistics."""


def worker_index() -> int | None:
    """This process's worker index when it runs under run_workers, else None."""
    from server.metrics import WORKER_ENV

    value = os.environ.get(WORKER_ENV)
    return int(value) if value is not None else None


def stats_socket(metrics_dir: Path, pid: int) -> Path:
    """The socket on which worker `pid` serves its ModelStatistics (see server.worker_stats)."""
    return metrics_dir / STATS_SOCKET_GLOB.replace("*", str(pid))


def port_lock_path(port: int) -> Path:
    """The lock file a worker group holds while it owns `port` (keyed by the port alone: groups
    on 0.0.0.0:P and 127.0.0.1:P would share P just the same)."""
    return Path(tempfile.gettempdir()) / f"featureserve-port-{port}.lock"


@dataclass
class PortClaim:
    """A worker group's hold on its port, kept by the parent until its workers are gone."""

    sock: socket.socket
    lock_fd: int

    @property
    def port(self) -> int:
        """The port the group serves on (the one the kernel picked for port 0)."""
        return self.sock.getsockname()[1]

    def close(self) -> None:
        """Release the port and the lock."""
        self.sock.close()
        os.close(self.lock_fd)


def claim_port(host: str, port: int) -> PortClaim:
    """Refuse a port another server uses and hold it for this group's workers.

    A plain bind refuses a port something listens on, and a bound, non-listening SO_REUSEPORT
    socket fixes the port (when port is 0) that the workers then share. Neither excludes another
    worker group starting at the same moment: Linux admits every SO_REUSEPORT socket of the same
    user, so the kernel cannot tell our workers from theirs, and a probe, then a bind, is a race.
    What excludes it is an exclusive flock on port_lock_path(port), taken after the bind and
    held by this parent: the first group to take it serves, any other fails here with one line.
    The kernel drops the lock when the parent dies, so a crash leaves no stale claim (the file
    stays; it is empty)."""
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
        raise StartupError(f"cannot listen on {host_port(host, port)}: {exc.strerror}") from None
    bound = sock.getsockname()[1]
    path = port_lock_path(bound)
    try:
        lock_fd = _open_lock(path)
    except OSError as exc:
        sock.close()
        raise StartupError(
            f"cannot lock {path} for port {bound}: {exc.strerror}; set TMPDIR to a writable "
            "directory shared by every featureserve on this machine"
        ) from None
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        sock.close()
        os.close(lock_fd)
        raise StartupError(
            f"cannot listen on {host_port(host, bound)}: another featureserve --workers group is "
            f"starting or serving on port {bound} (it holds {path}); stop it or choose another "
            "--port"
        ) from None
    return PortClaim(sock, lock_fd)


def _open_lock(path: Path) -> int:
    """Open (creating if needed) the lock file read-only: flock needs no write access, so a
    file another user left behind still opens."""
    try:
        return os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)


@dataclass
class Worker:
    """One spawned worker process."""

    index: int
    proc: subprocess.Popen
    started: float


class Supervisor:
    """Spawns, watches and stops the worker processes of one server."""

    def __init__(
        self, config: ServerConfig, n: int, metrics_dir: Path, signals: StopSignals
    ) -> None:
        self.config = config
        self.n = n
        self.metrics_dir = metrics_dir
        self.workers: list[Worker] = []
        self.signals = signals

    def spawn(self, index: int) -> Worker:
        """Start worker `index`, handing it the config over its stdin."""
        from server.metrics import MULTIPROC_ENV, WORKER_ENV

        env = dict(os.environ)
        env.update(
            {
                MULTIPROC_ENV: str(self.metrics_dir),
                WORKER_ENV: str(index),
                WORKERS_ENV: str(self.n),
                PARENT_ENV: str(os.getpid()),
            }
        )
        # Born with SIGINT blocked (exec keeps the signal mask), a worker never sees a Ctrl-C to
        # the process group, not even while its interpreter starts: this process relays it as
        # SIGTERM. Blocked, not ignored, here: a SIGINT meanwhile stays pending for the parent.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "server.workers"], stdin=subprocess.PIPE, env=env
            )
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        assert proc.stdin is not None
        proc.stdin.write(pickle.dumps(self.config))
        proc.stdin.close()
        log.info("worker started", extra={"worker": index, "pid": proc.pid})
        return Worker(index, proc, time.monotonic())

    def run(self) -> int:
        """Run until a stop signal (exit 0 after all workers drained; none is started once
        one has come) or a worker that dies within MIN_UPTIME_S of its start (startup failure:
        stop the rest, exit 1). A worker that crashes later, or exits 0 at any time (stopped
        alone), is replaced, as gunicorn and uvicorn keep their worker count."""
        for index in range(self.n):
            if self.signals.requested:
                break
            self.workers.append(self.spawn(index))
        while not self.signals.requested:
            time.sleep(POLL_S)
            for slot, worker in enumerate(self.workers):
                code = worker.proc.poll()
                # Read after the poll: a worker that ended because of the same signal as this
                # process (a SIGTERM to the whole group, as systemd sends) did not crash.
                if code is None or self.signals.requested:
                    continue
                self._forget(worker)
                uptime = time.monotonic() - worker.started
                (log.warning if code == 0 else log.error)(
                    "worker exited",
                    extra={"worker": worker.index, "pid": worker.proc.pid, "code": code},
                )
                if code != 0 and uptime < MIN_UPTIME_S:
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
        """Drop a dead worker's live-only gauges from the shared metrics, and its statistics
        socket, which a worker that crashed left behind."""
        from prometheus_client.multiprocess import mark_process_dead

        mark_process_dead(worker.proc.pid, glob.escape(str(self.metrics_dir)))  # it globs
        stats_socket(self.metrics_dir, worker.proc.pid).unlink(missing_ok=True)


def make_metrics_dir(root: Path) -> tuple[Path, int]:
    """A new metrics folder in root and the descriptor of its live lock, held until closed
    (the kernel drops it when the process dies, however it dies)."""
    folder = Path(tempfile.mkdtemp(prefix=METRICS_DIR_PREFIX, dir=root))
    staged = folder / f"{LIVE_LOCK}.new"
    fd = os.open(staged, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.rename(staged, folder / LIVE_LOCK)  # locked before a sweep can find it
    return folder, fd


def remove_orphan_metrics_dirs(root: Path) -> None:
    """Remove the metrics folders whose live lock no process holds: a parent killed with
    SIGKILL never ran its clean-up, and its folder stayed in $TMPDIR for good. A lock, not a
    pid, tells a live group: a group in another pid namespace sharing $TMPDIR (containers)
    has a pid this process cannot see."""
    for lock in root.glob(f"{METRICS_DIR_PREFIX}*/{LIVE_LOCK}"):
        try:
            fd = os.open(lock, os.O_RDWR)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue
        else:
            shutil.rmtree(lock.parent, ignore_errors=True)
        finally:
            os.close(fd)


def run_workers(config: ServerConfig, n: int, signals: StopSignals | None = None) -> int:
    """Serve `config` from n worker processes on one port; returns the exit code.

    The port is fixed before spawning (port 0 picks one), workers get metrics_port 0 and this
    process serves /metrics for all of them from the shared multiprocess directory, without
    the series of views deleted meanwhile (read from the registry at each scrape; the store is
    opened read-only at the first one: workers are exec'd, so none inherits it). `signals`
    are the caller's, installed before its imports; by default they are installed here.
    """
    from featurestore.registry import RegistryReader
    from server.app import preflight
    from server.metrics import serve_metrics

    if signals is None:
        signals = StopSignals().install()
    preflight(config)
    claim = claim_port(config.host, config.port)
    remove_orphan_metrics_dirs(Path(tempfile.gettempdir()))
    metrics_dir, live_lock = make_metrics_dir(Path(tempfile.gettempdir()))
    supervisor = Supervisor(
        dataclasses.replace(config, port=claim.port, metrics_port=0), n, metrics_dir, signals
    )
    try:
        if config.metrics_port > 0:
            registered = RegistryReader(config.data_dir).view_features
            serve_metrics(config.host, config.metrics_port, metrics_dir, registered)
        log.info("workers", extra={"address": host_port(config.host, claim.port), "workers": n})
        return supervisor.run()
    finally:
        claim.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
        os.close(live_lock)


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM this worker when its parent dies, so no orphan keeps the port."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if str(os.getppid()) != os.environ.get(PARENT_ENV):
        sys.exit(1)


def worker_main() -> int:
    """Entry point of a worker: read the config from stdin, serve until SIGTERM."""
    from server.app import StartupError
    from server.log_settings import LogControl, LogSettings
    from server.logs import configure_logging
    from server.metrics import multiprocess_dir
    from server.runner import run

    _die_with_parent()
    config: ServerConfig = pickle.loads(sys.stdin.buffer.read())
    configure_logging(config.log_level, config.log_format)
    # a worker started again writes as its group does (LogSettings) from its first record
    start_up = LogSettings.of_level(config.log_level, config.log_format)
    LogControl(start_up, multiprocess_dir()).current()
    log.info("worker starting", extra={"worker": worker_index(), "pid": os.getpid()})
    try:
        run(config)
    except StartupError as exc:
        print(f"featureserve worker {worker_index()}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(worker_main())
