"""Structured logging: one JSON object per line on stderr, so logs are machine-readable."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time

GRPC_AIO_LOGGER = "grpc._cython.cygrpc"
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


def _extra(record: logging.LogRecord) -> dict[str, object]:
    """The fields a log call passed with `extra=`."""
    return {
        key: value
        for key, value in vars(record).items()
        if key not in _STANDARD and not key.startswith("_")
    }


class JsonFormatter(logging.Formatter):
    """Formats a record as a JSON line; extra fields passed with `extra=` become keys."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **_extra(record),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """Formats a record as one text line, its `extra=` fields after the message as key=value
    (values as JSON: text quoted), so text logs say as much as JSON ones."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = " ".join(
            f"{key}={json.dumps(value, default=str)}" for key, value in _extra(record).items()
        )
        if not fields:
            return line
        head, newline, rest = line.partition("\n")  # a traceback stays below the line
        return f"{head} {fields}{newline}{rest}"


class DropShutdownCancellations(logging.Filter):
    """Drops grpc.aio's ERROR record of an RPC task cancelled as the server shut down (its
    shutdown cancels the tasks still finishing; a stream the client cancelled during a drain
    lost that race now and then): a traceback for a call that ended as it should."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (
            isinstance(exc, asyncio.CancelledError)
            and record.getMessage().startswith("Exception not handled by _handle_exceptions")
        )


def drop_shutdown_cancellations(unraisable: sys.UnraisableHookArgs) -> None:
    """sys.unraisablehook: drops a CancelledError raised inside grpc.aio's Cython code as an RPC
    coroutine is torn down at shutdown (written bare to stderr, without a logger, now and then
    when a stream is cancelled during a drain); anything else goes to Python's own hook."""
    tb = unraisable.exc_traceback
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame.f_code.co_filename)
        tb = tb.tb_next
    if issubclass(unraisable.exc_type, asyncio.CancelledError) and any(
        "grpc/_cython" in name for name in frames
    ):
        return
    sys.__unraisablehook__(unraisable)


class Severities(logging.Filter):
    """Passes the records of the severities enabled (DEBUG, INFO, WARNING, ERROR; CRITICAL
    counts as ERROR): Triton's log_info / log_warning / log_error switch each on its own."""

    def __init__(self, enabled: dict[int, bool]) -> None:
        super().__init__()
        self.enabled = enabled

    def filter(self, record: logging.LogRecord) -> bool:
        level = min(record.levelno - record.levelno % 10, logging.ERROR)
        return self.enabled.get(level, True)


class ServerHandler(logging.StreamHandler):
    """The stderr handler configure_logging installs, and the one LogSettings changes."""

    def __init__(self, enabled: dict[int, bool], fmt: str) -> None:
        super().__init__(sys.stderr)
        self.severities = Severities(enabled)
        self.addFilter(self.severities)
        self.setFormatter(formatter(fmt))


def formatter(fmt: str) -> logging.Formatter:
    """The formatter of a log_format: "json" or "text"."""
    return JsonFormatter() if fmt == "json" else TextFormatter()


def enabled_severities(level: str) -> dict[int, bool]:
    """The severities a `log_level` enables: it and those above it."""
    lowest = logging.getLevelName(level.upper())
    return {n: n >= lowest for n in (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR)}


def set_output(enabled: dict[int, bool], fmt: str) -> None:
    """Write the records of the enabled severities, formatted as fmt ("json" or "text"), through
    the handler configure_logging installed (a process without one keeps its logging)."""
    root = logging.getLogger()
    for handler in root.handlers:
        if isinstance(handler, ServerHandler):
            handler.severities.enabled = dict(enabled)
            handler.setFormatter(formatter(fmt))
            on = [level for level, wanted in enabled.items() if wanted]
            root.setLevel(min(on) if on else logging.CRITICAL + 1)


def configure_logging(level: str = "INFO", fmt: str = "json") -> None:
    """Route the root logger to stderr in JSON (or plain text with fmt="text")."""
    root = logging.getLogger()
    root.handlers[:] = [ServerHandler(enabled_severities(level), fmt)]
    root.setLevel(level.upper())
    cygrpc = logging.getLogger(GRPC_AIO_LOGGER)
    if not any(isinstance(f, DropShutdownCancellations) for f in cygrpc.filters):
        cygrpc.addFilter(DropShutdownCancellations())
    sys.unraisablehook = drop_shutdown_cancellations
