"""Triton's logging extension: the server's log settings, read and changed at run time through
the LogSettings RPC, and kept alike in every worker of a `--workers` group.

Settings (Triton's names): `log_info`, `log_warning`, `log_error` (bool: whether records of that
severity are written), `log_verbose_level` (uint32: 0 = no DEBUG records, 1 or more = DEBUG
records; featureserve has one verbose level), `log_format` ("json" or "text") and `log_file`
(always "": logs go to stderr, and the RPC cannot redirect them).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from server import logs
from server.errors import InvalidRequestError
from server.group_file import Follower, GroupFile

log = logging.getLogger("featureserve.log_settings")

GROUP_STEM = "log-settings"
SettingValue = bool | int | str
FORMATS = ("json", "text")
KNOWN = ("log_file", "log_info", "log_warning", "log_error", "log_verbose_level", "log_format")
SETTING_PARAMS = {bool: "bool_param", int: "uint32_param", str: "string_param"}
"""The SettingValue field that carries each setting type."""


@dataclass(frozen=True)
class LogSettings:
    """Which severities are written, and how."""

    log_info: bool = True
    log_warning: bool = True
    log_error: bool = True
    log_verbose_level: int = 0
    log_format: str = "json"

    @classmethod
    def of_level(cls, level: str, fmt: str) -> LogSettings:
        """The settings a server started with `log_level` and `log_format` has."""
        enabled = logs.enabled_severities(level)
        return cls(
            log_info=enabled[logging.INFO],
            log_warning=enabled[logging.WARNING],
            log_error=enabled[logging.ERROR],
            log_verbose_level=int(enabled[logging.DEBUG]),
            log_format=fmt,
        )

    def updated(self, changes: Mapping[str, SettingValue]) -> LogSettings:
        """These settings with `changes` made; InvalidRequestError names an unknown setting, a
        value of the wrong type or out of range, and log_file (which cannot change)."""
        for key, value in changes.items():
            if key not in KNOWN:
                raise InvalidRequestError(
                    f"settings: unknown log setting '{key}'; the settings are {', '.join(KNOWN)}"
                )
            _check_type(key, value, str if key == "log_file" else type(getattr(self, key)))
            if key == "log_file":
                if value != "":
                    raise InvalidRequestError(
                        "settings: 'log_file' cannot be changed at run time: featureserve logs "
                        "to stderr (redirect it, or let systemd or the container runtime keep it)"
                    )
                continue
            if key == "log_format" and value not in FORMATS:
                raise InvalidRequestError(
                    f"settings: 'log_format' is {value!r}; use one of {', '.join(FORMATS)}"
                )
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if k != "log_file"})

    def as_dict(self) -> dict[str, SettingValue]:
        """Every setting, log_file included, as the RPC answers them."""
        return {"log_file": "", **dataclasses.asdict(self)}

    def apply(self) -> None:
        """Make this process's logging follow these settings (the handler configure_logging
        installed; a process without one, such as a test's, keeps its own logging)."""
        enabled = {
            logging.DEBUG: self.log_verbose_level > 0,
            logging.INFO: self.log_info,
            logging.WARNING: self.log_warning,
            logging.ERROR: self.log_error,
        }
        logs.set_output(enabled, self.log_format)


def _check_type(key: str, value: SettingValue, wanted: type) -> None:
    """InvalidRequestError unless value has the setting's type (an int for a bool is not one)."""
    if type(value) is not wanted:
        raise InvalidRequestError(
            f"settings: '{key}' takes a value of type {wanted.__name__}; send it as "
            f"{SETTING_PARAMS[wanted]}"
        )


class LogControl:
    """This process's log settings; in a worker group, the group's (a file in its folder that
    every worker follows, so a change made through one worker reaches them all)."""

    def __init__(self, settings: LogSettings, group_folder: Path | None = None) -> None:
        self.settings = settings
        self._group = GroupFile(group_folder, GROUP_STEM) if group_folder is not None else None
        self._follower = Follower(self._follow_once, "log settings")

    def current(self) -> LogSettings:
        """The settings in force (in a group: its latest, applied here first)."""
        self._follow_once()
        return self.settings

    def update(self, changes: Mapping[str, SettingValue]) -> LogSettings:
        """Make `changes` (validated first: nothing changes on a bad one), here and, in a group,
        in the group's file; returns the settings now in force."""
        if self._group is None:
            self._set(self.settings.updated(changes))
            return self.settings
        with self._group.locked():
            stored = self._group.read()
            base = LogSettings(**stored) if stored is not None else self.settings
            settings = base.updated(changes)
            self._group.write(dataclasses.asdict(settings))
        self._set(settings)
        return settings

    def start(self) -> None:
        """Take the group's settings (a worker started again keeps what the group was set to)
        and follow them from then on."""
        if self._group is not None:
            self._follow_once()
            self._follower.start()

    async def stop(self) -> None:
        """Stop following the group's settings."""
        await self._follower.stop()

    def _follow_once(self) -> None:
        if self._group is not None and (stored := self._group.changed()) is not None:
            self._set(LogSettings(**stored))

    def _set(self, settings: LogSettings) -> None:
        changed = settings != self.settings
        self.settings = settings
        settings.apply()
        if changed:  # announced as the new settings write records
            log.warning("log settings changed", extra=dataclasses.asdict(settings))
