"""Triton's trace extension: per-request timestamp traces, sampled 1 in `trace_rate` requests
(up to `trace_count` of them), written as JSON lines to the trace file, with settings read and
changed at run time through the TraceSetting RPC, globally or per model, and kept alike in every
worker of a `--workers` group.

Settings (Triton's names; every value travels as strings): `trace_file` (set at start-up only),
`trace_level` (["OFF"] or ["TIMESTAMPS"]), `trace_rate`, `trace_count` (remaining; -1 = no
limit) and `log_frequency` (records held before a write; 0 = write each as it comes). A model's
settings are the global ones but those it sets itself; clearing one (no values) makes the model
follow the global one again, and clearing a global one restores its start-up value. Setting or
clearing trace_count restarts the count; other changes keep what remains of it (and the
sampling position, unless trace_rate changes).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import queue
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.audit import AppendFile
from server.config import ConfigError
from server.errors import InvalidRequestError, status_for
from server.group_file import Follower, GroupFile

log = logging.getLogger("featureserve.tracing")

OFF, TIMESTAMPS, TENSORS = "OFF", "TIMESTAMPS", "TENSORS"
KNOWN = ("trace_file", "trace_level", "trace_rate", "trace_count", "log_frequency")
DEFAULT_FILE = "trace.jsonl"
GROUP_STEM = "trace-settings"
_BOUNDS = {
    "trace_rate": (1, 2**32 - 1, "1 traces every request"),
    "trace_count": (-1, 2**31 - 1, "-1 = no limit"),
    "log_frequency": (0, 2**32 - 1, "0 writes each record as it comes"),
}
"""Inclusive bounds of the integer settings (Triton's types: uint32 rate and frequency, int32
count)."""
_FLAGS = {
    "trace_file": "--trace-file",
    "trace_level": "--trace-level",
    "trace_rate": "--trace-rate",
}
_INTEGER = re.compile(r"-?[0-9]+")
_OPEN_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
_FLUSH = object()
_STOP = object()


@dataclass(frozen=True)
class TraceSettings:
    """What is traced: the level, 1 in how many requests, how many more, how records are
    written."""

    trace_level: str = OFF
    trace_rate: int = 1000
    trace_count: int = -1
    log_frequency: int = 0


@dataclass(frozen=True)
class TraceConfig:
    """The [trace] table: the start-up settings and the trace file (relative: in data_dir)."""

    settings: TraceSettings = TraceSettings()
    file: Path | None = None

    def path(self, data_dir: Path) -> Path:
        """The trace file of a server with this data dir."""
        path = self.file or Path(DEFAULT_FILE)
        return path if path.is_absolute() else data_dir / path

    def check_file(self, path: Path) -> None:
        """Open and close the trace file when these settings trace (OSError when it cannot
        be), so a --workers group reports a bad one once."""
        if self.settings.trace_level != OFF:
            os.close(os.open(path, _OPEN_FLAGS, 0o640))


def _level_problem(levels: list[str]) -> str:
    """Why levels is not a trace level this server takes ("" when it is)."""
    unknown = [v for v in levels if v not in (OFF, TIMESTAMPS, TENSORS)]
    if unknown:
        return f"{unknown[0]!r} is not a level; use OFF or TIMESTAMPS"
    if TENSORS in levels:
        return "TENSORS is not supported (featureserve traces timestamps only); use TIMESTAMPS"
    if OFF in levels and TIMESTAMPS in levels:
        return "OFF and TIMESTAMPS contradict each other; send one of them"
    return ""


def _bounds_problem(key: str, value: int) -> str:
    """Why value is out of the integer setting's bounds ("" when it is not)."""
    low, high, meaning = _BOUNDS[key]
    return "" if low <= value <= high else f"{value} is outside [{low}, {high}] ({meaning})"


def parse_trace(raw: dict[str, Any] | None, source: str = "config") -> TraceConfig:
    """The [trace] table (ServerConfig.extra["trace"], where the --trace-* flags land too);
    ConfigError names the key, its flag, and the fix."""
    if raw is None:
        return TraceConfig()
    unknown = sorted(set(raw) - set(KNOWN))
    if unknown:
        raise ConfigError(
            f"{source}: [trace] has unknown key '{unknown[0]}'; the keys are {', '.join(KNOWN)}"
        )
    values: dict[str, Any] = {}
    for key, value in raw.items():
        where = f"{source}: [trace] {key}" + (f" ({_FLAGS[key]})" if key in _FLAGS else "")
        if key == "trace_file":
            if not isinstance(value, str) or not value:
                raise ConfigError(f"{where} must be a file path string")
            continue
        if key == "trace_level":
            levels = [value] if isinstance(value, str) else value
            if not isinstance(levels, list) or not all(isinstance(v, str) for v in levels):
                raise ConfigError(f'{where} must be "OFF" or "TIMESTAMPS"')
            problem = _level_problem(levels)
            value = TIMESTAMPS if TIMESTAMPS in levels else OFF
        elif not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{where} must be an integer, got {type(value).__name__}")
        else:
            problem = _bounds_problem(key, value)
        if problem:
            raise ConfigError(f"{where}: {problem}")
        values[key] = value
    file = raw.get("trace_file")
    return TraceConfig(TraceSettings(**values), Path(file) if file else None)


def _parse_setting(key: str, values: list[str], model: str) -> str | int:
    """A TraceSetting value list (not empty) as the setting's value; InvalidRequestError names
    the setting, the scope and the fix."""
    scope = f"model '{model}'" if model else "global"
    if key == "trace_level":
        problem = _level_problem(values)
        if problem:
            raise InvalidRequestError(f"settings: 'trace_level' ({scope}): {problem}")
        return TIMESTAMPS if TIMESTAMPS in values else OFF
    if len(values) != 1 or not _INTEGER.fullmatch(values[0]):
        raise InvalidRequestError(
            f"settings: '{key}' ({scope}) takes one integer value as a string, such as "
            f'["{TraceSettings.__dataclass_fields__[key].default}"]; got {values[:3]}'
        )
    value = int(values[0])
    problem = _bounds_problem(key, value)
    if problem:
        raise InvalidRequestError(f"settings: '{key}' ({scope}): {problem}")
    return value


@dataclass(eq=False, slots=True)
class Trace:
    """One sampled request's timestamps (ns, CLOCK_MONOTONIC as Triton's; 0 = not reached)."""

    id: int
    model_name: str
    model_version: str
    request_id: str
    log_frequency: int
    request_start: int
    queue_start: int = 0
    compute: tuple[int, int, int, int] | None = None
    request_end: int = 0
    status: str = "OK"

    def ran(self, start_ns: int, input_ns: int, infer_ns: int, out_ns: int) -> None:
        """The batcher's times of the batch this request ran in (shared by its requests; no
        compute times when start_ns is 0: the batch failed)."""
        if start_ns:
            input_end = start_ns + input_ns
            output_start = input_end + infer_ns
            self.compute = (start_ns, input_end, output_start, output_start + out_ns)

    def failed(self, exc: BaseException) -> None:
        """The request ended with exc: its record names the gRPC status the caller gets."""
        cancelled = isinstance(exc, asyncio.CancelledError)
        self.status = "CANCELLED" if cancelled else status_for(exc).name

    def record(self, worker: int | None) -> dict[str, Any]:
        """The trace as its JSON record (Triton's field names, the timestamps in order)."""
        stamps = [("REQUEST_START", self.request_start), ("QUEUE_START", self.queue_start)]
        if self.compute is not None:
            names = ("COMPUTE_START", "COMPUTE_INPUT_END", "COMPUTE_OUTPUT_START", "COMPUTE_END")
            stamps.extend(zip(names, self.compute, strict=True))
        stamps.append(("REQUEST_END", self.request_end))
        version = self.model_version
        entry = {
            "id": self.id,
            "model_name": self.model_name,
            "model_version": int(version) if version.isdigit() else -1,
            "request_id": self.request_id,
            "status": self.status,
            "timestamps": [{"name": n, "ns": ns} for n, ns in stamps if ns],
        }
        if worker is not None:
            entry["worker"] = worker
        return entry


class TraceWriter:
    """Appends records to the trace file from its own thread, so the event loop never waits
    for the file: one write() of whole lines per batch to an AppendFile (as the audit log), so
    the lines of a --workers group's processes never interleave and a file renamed or removed
    (logrotate) is reopened at its path before the next batch."""

    def __init__(self, path: Path, worker: int | None) -> None:
        self.path = path
        self._worker = worker
        self._file = AppendFile(path)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._failing = False

    def open(self) -> None:
        """Open the file (OSError when it cannot be) and start the writing thread, once."""
        if self._thread is not None:
            return
        self._file.open()
        self._thread = threading.Thread(target=self._run, name="trace-writer", daemon=True)
        self._thread.start()

    def put(self, trace: Trace) -> None:
        """Queue a finished trace (written once its log_frequency records wait)."""
        self._queue.put(trace)

    def flush(self) -> None:
        """Write every queued record now."""
        if self._thread is not None:
            self._queue.put(_FLUSH)

    def close(self) -> None:
        """Write what is queued, stop the thread and close the file (blocks: call off the
        loop)."""
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join()
            self._thread = None
        self._file.close()

    def _run(self) -> None:
        pending: list[str] = []
        while True:
            item = self._queue.get()
            if item is _STOP:
                self._write(pending)
                return
            if item is not _FLUSH:
                pending.append(json.dumps(item.record(self._worker)) + "\n")
                waiting = item.log_frequency
                if (len(pending) < waiting) or (not waiting and not self._queue.empty()):
                    continue
            self._write(pending)
            pending = []

    def _write(self, lines: list[str]) -> None:
        """Write lines in one call; a failure drops them and is logged once until a write
        succeeds again (tracing never fails a request)."""
        if not lines:
            return
        try:
            self._file.write("".join(lines).encode())
            self._failing = False
        except OSError as exc:
            if not self._failing:
                self._failing = True
                log.error(
                    "trace records not written",
                    extra={"path": str(self.path), "error": exc.strerror, "records": len(lines)},
                )


@dataclass(eq=False, slots=True)
class _Scope:
    """The sampling state of the global settings or of one model's own: `epoch` names the
    trace_count setting its `remaining` counts down (it restarts when that is set again), and
    `seen` counts requests since its trace_rate last changed."""

    settings: TraceSettings
    epoch: tuple[str, int]
    remaining: int
    seen: int = 0

    @property
    def on(self) -> bool:
        """Whether this scope may still sample a request."""
        return self.settings.trace_level != OFF and self.remaining != 0

    def following(self, settings: TraceSettings, epoch: tuple[str, int]) -> _Scope:
        """This scope under new settings: what remains of its count while its epoch stays,
        its sampling position while its trace_rate does."""
        same_count = epoch == self.epoch
        same_rate = settings.trace_rate == self.settings.trace_rate
        return _Scope(
            settings,
            epoch,
            self.remaining if same_count else settings.trace_count,
            self.seen if same_rate else 0,
        )


def _first_id() -> int:
    """Where this process's trace ids start: its start time in ms shifted 10 bits, so a worker
    started again never repeats an earlier one's ids (that one would have had to take over 1024
    traces per ms it ran); ids stay below 2**53, exact in any JSON reader."""
    return (time.time_ns() // 1_000_000) << 10


class TraceControl:
    """This process's trace settings and sampler; in a worker group, the group's settings (a
    file in its folder that every worker follows), each worker sampling its own requests and
    counting its own trace_count.

    State (the group file's JSON): {"global": settings, "models": {name: own settings},
    "counts": {"": n, name: n}}; counts[scope] moves each time that scope's trace_count is set
    or cleared, restarting the count of the scopes that follow it."""

    def __init__(
        self,
        config: TraceConfig,
        path: Path,
        group_folder: Path | None = None,
        worker: int | None = None,
    ) -> None:
        self.path = path
        self._worker = worker
        self.active = False
        """Whether any scope may sample: with it false, ModelInfer pays this one check."""
        self._startup = config.settings
        self._writer = TraceWriter(path, worker)
        self._group = GroupFile(group_folder, GROUP_STEM) if group_folder is not None else None
        self._state: dict[str, Any] = {
            "global": dataclasses.asdict(config.settings),
            "models": {},
            "counts": {"": 0},
        }
        self._global = _Scope(config.settings, ("", 0), config.settings.trace_count)
        self._models: dict[str, _Scope] = {}
        self._next_id = _first_id()
        self._follower = Follower(self._follow_once, "trace settings")

    def start(self) -> None:
        """Take the group's settings, open the file when they trace (OSError names it) and
        follow the group from then on."""
        self._open_if_tracing(self._state)
        self._refresh_active()
        self._apply(self._stored())
        if self._group is not None:
            self._follower.start()

    async def stop(self) -> None:
        """Stop following the group and write the records still held."""
        await self._follower.stop()
        await asyncio.to_thread(self._writer.close)

    def begin(
        self, model_name: str, model_version: str, request_id: str, start_ns: int
    ) -> Trace | None:
        """A new trace starting at start_ns (time.perf_counter_ns()) when this request is
        sampled (the trace_rate-th of its scope, while trace_count lasts), else None."""
        scope = self._models.get(model_name, self._global) if self._models else self._global
        if not scope.on:
            return None
        scope.seen += 1
        if scope.seen % scope.settings.trace_rate:
            return None
        if scope.remaining > 0:
            scope.remaining -= 1
            if not scope.remaining:
                self._refresh_active()
        self._next_id += 1
        return Trace(
            self._next_id,
            model_name,
            model_version,
            request_id,
            scope.settings.log_frequency,
            start_ns,
        )

    def end(self, trace: Trace) -> None:
        """The request was answered (or failed): hand its record to the writer, and write
        every record held once its scope traces no more (as Triton: the last trace of a count
        writes them all)."""
        trace.request_end = time.perf_counter_ns()
        self._writer.put(trace)
        if not self._models.get(trace.model_name, self._global).on:
            self._writer.flush()

    def has_own(self, model: str) -> bool:
        """Whether model has settings of its own (which stay, loaded or not, until cleared)."""
        self._follow_once()
        return model in self._state["models"]

    def current(self, model: str = "") -> dict[str, list[str]]:
        """Every setting of the global scope or of a model, as the RPC answers them (a model
        without settings of its own answers the global ones; trace_count: those remaining in
        this process)."""
        self._follow_once()
        scope = self._models.get(model, self._global)
        settings = scope.settings
        return {
            "trace_file": [str(self.path)],
            "trace_level": [settings.trace_level],
            "trace_rate": [str(settings.trace_rate)],
            "trace_count": [str(scope.remaining)],
            "log_frequency": [str(settings.log_frequency)],
        }

    def update(self, changes: Mapping[str, list[str]], model: str = "") -> None:
        """Make `changes` to the global settings or a model's (validated first: on a bad one,
        or a trace file that cannot be opened, nothing changes), here and in the group."""
        if self._group is None:
            state = self._changed(self._state, changes, model)
            self._open_for_request(state)
        else:
            with self._group.locked():
                stored = self._stored()
                state = self._changed(stored, changes, model)
                self._open_for_request(state)
                if state != stored:
                    self._group.write(state)
        self._apply(state)

    def _stored(self) -> dict[str, Any]:
        """The group's state (this process's own outside a group or before any change)."""
        stored = self._group.read() if self._group is not None else None
        return stored if stored is not None else self._state

    def _changed(
        self, state: dict[str, Any], changes: Mapping[str, list[str]], model: str
    ) -> dict[str, Any]:
        """state with `changes` made to the global settings (model "") or to model's."""
        own = dict(state["models"].get(model, {})) if model else dict(state["global"])
        for key, values in changes.items():
            if key not in KNOWN:
                raise InvalidRequestError(
                    f"settings: unknown trace setting '{key}'; the settings are {', '.join(KNOWN)}"
                )
            if key == "trace_file":
                if values and values != [str(self.path)]:
                    raise InvalidRequestError(
                        f"settings: 'trace_file' cannot be changed at run time (as in Triton): "
                        f"it is {str(self.path)!r}; set [trace] trace_file (--trace-file) in the "
                        "server's config and restart it"
                    )
                continue
            if values:
                own[key] = _parse_setting(key, values, model)
            elif model:
                own.pop(key, None)
            else:
                own[key] = getattr(self._startup, key)
        models = dict(state["models"])
        if model:
            models[model] = own
            if not own:
                del models[model]
        counts = {
            k: n for k, n in state["counts"].items() if not k or "trace_count" in models.get(k, ())
        }
        if "trace_count" in changes and (not model or "trace_count" in own):
            counts[model] = counts.get(model, 0) + 1
        return {
            "global": own if not model else state["global"],
            "models": models,
            "counts": counts,
        }

    def _open_if_tracing(self, state: dict[str, Any]) -> None:
        """Open the trace file when state traces anything (OSError when it cannot be)."""
        levels = [state["global"]["trace_level"]]
        levels += [own.get("trace_level") for own in state["models"].values()]
        if TIMESTAMPS in levels:
            self._writer.open()

    def _open_for_request(self, state: dict[str, Any]) -> None:
        """_open_if_tracing for a TraceSetting call: InvalidRequestError names the file."""
        try:
            self._open_if_tracing(state)
        except OSError as exc:
            raise InvalidRequestError(
                f"the trace file {self.path} cannot be opened: {exc.strerror}; set [trace] "
                "trace_file (--trace-file) to a writable file and restart the server"
            ) from None

    def _apply(self, state: dict[str, Any]) -> None:
        """Follow state (OSError, and nothing changes, when it traces and the file cannot be
        opened); on a change, write the records held (as Triton does when settings change).
        A model's scope starts from the global one (the scope it sampled under)."""
        if state == self._state:
            return
        self._open_if_tracing(state)
        base = TraceSettings(**state["global"])
        counts = state["counts"]
        top = ("", counts[""])
        self._global = self._global.following(base, top)
        models = {}
        for name, own in state["models"].items():
            epoch = (name, counts[name]) if "trace_count" in own else top
            scope = self._models.get(name, self._global)
            models[name] = scope.following(dataclasses.replace(base, **own), epoch)
        self._models = models
        self._state = state
        self._refresh_active()
        self._writer.flush()
        log.warning(
            "trace settings changed", extra={"trace_settings": state, "worker": self._worker}
        )

    def _refresh_active(self) -> None:
        self.active = self._global.on or any(s.on for s in self._models.values())

    def _follow_once(self) -> None:
        if self._group is not None and (stored := self._group.changed()) is not None:
            self._apply(stored)
