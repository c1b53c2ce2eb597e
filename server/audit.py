"""Audit log: one JSON line per write batch, registry apply, view deletion, and model load or
unload, naming the principal (the token's name, never the token), the target and the outcome;
calls of these methods that authentication or authorization refused are recorded too."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc

from server.auth import current_principal
from server.changes import Changes
from server.config import ConfigError
from server.errors import status_for
from server.metrics import AUDIT_FAILURES

DEFAULT_FILE = "audit.jsonl"
ANONYMOUS = "anonymous"
MAX_MESSAGE_CHARS = 500
MAX_REFUSED_TARGET_CHARS = 300
"""The longest target a refused call's record keeps (names are at most 255 bytes)."""
FAILURE_LOG_INTERVAL_S = 60.0

log = logging.getLogger("featureserve.audit")

T = TypeVar("T")


def apply_target(request: Any) -> str:
    """An ApplyFeatureViews record's target: the names of its views, then of its services,
    each marked `feature_service:` (a view and a service may share a name)."""
    services = [f"feature_service:{s.name}" for s in request.feature_services]
    return ",".join([v.name for v in request.views] + services)


UNAUTHENTICATED = "unauthenticated"
_FS = "/featureserve.v1.FeatureStore/"
_KS = "/inference.GRPCInferenceService/"
AUDITED_METHODS: dict[str, tuple[str, Callable[[Any], str] | None]] = {
    _FS + "WriteFeatures": ("write_features", lambda r: r.view),
    _FS + "StreamWriteFeatures": ("write_features", None),
    _FS + "ApplyFeatureViews": ("apply_feature_views", apply_target),
    _FS + "DeleteFeatureView": ("delete_feature_view", lambda r: f"{r.name}@{r.version}"),
    _FS + "DeleteFeatureService": ("delete_feature_service", lambda r: r.name),
    _KS + "RepositoryModelLoad": ("model_load", lambda r: r.model_name),
    _KS + "RepositoryModelUnload": ("model_unload", lambda r: r.model_name),
}
"""The audited methods: the action their records name (the servicers' own), and the target
their request names; None for a stream, whose messages a refused call never gets to read."""


@dataclass(frozen=True)
class AuditConfig:
    """The [audit] table: on by default, writing to data_dir/audit.jsonl unless `path` is set."""

    enabled: bool = True
    path: Path | None = None


def parse_audit(raw: dict[str, Any] | None, source: str = "config") -> AuditConfig:
    """The [audit] table (ServerConfig.extra["audit"]); absent means enabled at the default path."""
    if raw is None:
        return AuditConfig()
    unknown = set(raw) - {"enabled", "path"}
    if unknown:
        raise ConfigError(f"{source}: [audit] has unknown key '{sorted(unknown)[0]}'")
    enabled = raw.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ConfigError(f"{source}: [audit] enabled must be true or false")
    path = raw.get("path")
    if path is not None and (not isinstance(path, str) or not path):
        raise ConfigError(f"{source}: [audit] path must be a file path string")
    return AuditConfig(enabled, Path(path) if path else None)


def _timestamp() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"


class AppendFile:
    """An O_APPEND descriptor of `path` that follows the path: like
    logging.handlers.WatchedFileHandler, a file renamed (logrotate) or removed is reopened at
    `path` before the next write, so records never go to a file nobody reads. One write() per
    call, so whole lines from several processes never interleave."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._identity: tuple[int, int] | None = None

    def open(self) -> None:
        """Open (creating) the file at path in place of any descriptor held now (OSError when
        it cannot be)."""
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        fd = os.open(self.path, flags, 0o640)
        if self._fd is not None:
            os.close(self._fd)
        self._fd = fd
        stat = os.fstat(fd)
        self._identity = (stat.st_dev, stat.st_ino)

    def write(self, data: bytes) -> None:
        """Append data in one write(), first reopening the path when the file there is no
        longer the one held open (one stat() per call); OSError when either fails."""
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            self.open()
        else:
            if (stat.st_dev, stat.st_ino) != self._identity:
                self.open()
        os.write(self._fd, data)

    def close(self) -> None:
        """Close the descriptor (if open)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class AuditLog:
    """Appends audit records to a file (an AppendFile: one write() of one line per record, so
    lines from several worker processes never interleave, and a file renamed or removed is
    reopened at `path` before the next record). path None: disabled."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._file: AppendFile | None = None
        self._last_failure_log = -FAILURE_LOG_INTERVAL_S
        self._changes = Changes()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = AppendFile(path)
            self._file.open()

    @classmethod
    def from_config(cls, config: AuditConfig, data_dir: Path) -> AuditLog:
        """The log a server with this config and data dir writes (relative paths: in data_dir)."""
        if not config.enabled:
            return cls(None)
        path = config.path or Path(DEFAULT_FILE)
        return cls(path if path.is_absolute() else data_dir / path)

    def record(
        self,
        action: str,
        target: str,
        outcome: str = "OK",
        principal: str | None = None,
        **fields: Any,
    ) -> None:
        """Write one record; principal defaults to the current caller's token name."""
        if self._file is None:
            return
        if principal is None:
            caller = current_principal()
            principal = caller.name if caller is not None else ANONYMOUS
        entry = {
            "ts": _timestamp(),
            "principal": principal,
            "action": action,
            "target": target,
            "outcome": outcome,
            **fields,
        }
        try:
            self._file.write((json.dumps(entry, default=str) + "\n").encode())
        except OSError as exc:
            self._failed(exc)

    def audits(self, method: str) -> bool:
        """Whether calls of `method` are recorded (and so are refused ones)."""
        return self._file is not None and method in AUDITED_METHODS

    def refused(
        self,
        method: str,
        request: Any,
        context: grpc.aio.ServicerContext,
        principal: str | None,
        code: grpc.StatusCode,
        message: str,
        target: str | None = None,
        **fields: Any,
    ) -> None:
        """Record a call of an audited method that auth refused with `code`: the principal
        (None: unauthenticated), and the target `request` names unless `target` is given, cut
        to MAX_REFUSED_TARGET_CHARS (a caller without a token chooses it: a 3 MB view name
        grew the file by 3 MB per call). An apply's dry_run and prune are kept, as its admitted
        record keeps them."""
        action, target_of = AUDITED_METHODS[method]
        if target is None:
            target = target_of(request) if target_of is not None else ""
        extra = len(target) - MAX_REFUSED_TARGET_CHARS
        if extra > 0:
            target = f"{target[:MAX_REFUSED_TARGET_CHARS]}...(+{extra} chars)"
        for flag in ("dry_run", "prune"):  # only ApplyFeatureViewsRequest has them
            if getattr(request, flag, False):
                fields[flag] = True
        self.record(
            action,
            target,
            code.name,
            principal or UNAUTHENTICATED,
            peer=context.peer(),
            error=message[:MAX_MESSAGE_CHARS],
            **fields,
        )

    def _failed(self, exc: OSError) -> None:
        """A record that cannot be written never changes the outcome of what it records (that
        is done, and the caller must hear how it went): it is counted in
        featureserve_audit_failures_total and logged at ERROR, at most once a minute."""
        AUDIT_FAILURES.inc()
        now = time.monotonic()
        if now - self._last_failure_log >= FAILURE_LOG_INTERVAL_S:
            self._last_failure_log = now
            log.error(
                "audit record not written",
                extra={"path": str(self.path), "error": exc.strerror or str(exc)},
            )

    async def change(
        self,
        action: str,
        target: str,
        context: grpc.aio.ServicerContext | None,
        work: Callable[[dict[str, Any]], Awaitable[T]],
        **fields: Any,
    ) -> T:
        """Run work(record) and record its outcome (see _recording) as a change that runs to its
        end (server/changes.py): a caller that gives up neither stops it halfway nor gets it
        recorded CANCELLED after it took effect; its record says what happened."""

        async def audited() -> T:
            with self._recording(action, target, context, **fields) as record:
                return await work(record)

        return await self._changes.run(audited())

    def settle_later(self, work: Coroutine[Any, Any, None]) -> None:
        """Run work, which records what it awaits (a stream batch's commit), as a change: nobody
        awaits it, and shutdown waits for it before it closes the store."""
        self._changes.start(work)

    async def changes_done(self) -> None:
        """Until every audited change under way has ended and been recorded."""
        await self._changes.wait()

    @contextmanager
    def _recording(
        self,
        action: str,
        target: str,
        context: grpc.aio.ServicerContext | None = None,
        **fields: Any,
    ) -> Iterator[dict[str, Any]]:
        """Record `action` on `target` when the block ends: OK, or the status the error maps to
        with its message. Keys put in the yielded dict (e.g. rows) join the record."""
        details: dict[str, Any] = dict(fields)
        if context is not None:
            details["peer"] = context.peer()
        try:
            yield details
        except BaseException as exc:
            code = context.code() if context is not None else None
            if isinstance(code, grpc.StatusCode):
                outcome = code.name
            elif isinstance(exc, asyncio.CancelledError):
                outcome = "CANCELLED"
            else:
                outcome = status_for(exc).name
            message = str(exc)[:MAX_MESSAGE_CHARS]
            self.record(action, target, outcome, error=message, **details)
            raise
        self.record(action, target, "OK", **details)

    def close(self) -> None:
        """Close the file."""
        if self._file is not None:
            self._file.close()
            self._file = None
