"""CPU time and resident memory of a process tree, read from /proc (Linux only)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")
_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
_PROC = Path("/proc")


@dataclass(frozen=True)
class ProcSample:
    """CPU seconds (user + system) and RSS bytes summed over a process and its descendants."""

    cpu_s: float
    rss_bytes: int
    processes: int


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name, or None if the process is gone."""
    try:
        raw = (_PROC / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return raw[raw.rindex(")") + 2 :].split()


def _children(pid: int) -> list[int]:
    """Direct children of pid, from each process's parent field."""
    kids = []
    for entry in _PROC.iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None and int(fields[1]) == pid:
                kids.append(int(entry.name))
    return kids


def process_tree(pid: int) -> list[int]:
    """pid and all its living descendants (a multi-worker server forks its workers)."""
    tree, frontier = [pid], [pid]
    while frontier:
        frontier = [kid for parent in frontier for kid in _children(parent)]
        tree.extend(frontier)
    return tree


def sample(pid: int, include_children: bool = True) -> ProcSample:
    """CPU time (utime + stime, fields 14 and 15 of /proc/<pid>/stat) and RSS of pid's tree.

    Resolution is one clock tick (10 ms at 100 Hz), so measure over seconds, not milliseconds.
    """
    pids = process_tree(pid) if include_children else [pid]
    ticks = rss_pages = alive = 0
    for each in pids:
        fields = _stat_fields(each)
        if fields is None:
            continue
        # After the name: state is index 0, so utime (field 14) is index 11, rss (24) index 21.
        ticks += int(fields[11]) + int(fields[12])
        rss_pages += int(fields[21])
        alive += 1
    return ProcSample(ticks / _TICKS_PER_SECOND, rss_pages * _PAGE_BYTES, alive)


def pid_alive(pid: int) -> bool:
    """Whether /proc still lists pid."""
    return _stat_fields(pid) is not None
