"""A process's tree, state, CPU time, resident memory and command line, from /proc (Linux): what the tests
that kill a job's workers and the benchmarks that measure a job's processes read."""

from __future__ import annotations

import os
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def _stat_fields(stat: Path) -> list[str]:
    """The fields of a ``/proc/<pid>/stat`` after the command name (which may hold spaces and brackets)."""
    return stat.read_text().rsplit(")", 1)[1].split()


def descendants(pid: int) -> list[int]:
    """The processes under ``pid`` (children, grandchildren, ...). The tree is walked from the parent
    links, since pids wrap around and a child's pid may be smaller than its parent's."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            children.setdefault(int(_stat_fields(stat)[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    found, pending = [], [pid]
    while pending:
        for child in children.get(pending.pop(), []):
            found.append(child)
            pending.append(child)
    return found


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of process ``pid`` so far; OSError once it is gone."""
    fields = _stat_fields(Path(f"/proc/{pid}/stat"))
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs: it exists and is not a zombie (ended, not yet reaped by its parent)."""
    try:
        return _stat_fields(Path(f"/proc/{pid}/stat"))[0] != "Z"
    except OSError:
        return False


def resident_bytes(pid: int | str = "self") -> int:
    """Process ``pid``'s resident memory (RSS: shared pages counted in every process that maps them); OSError
    once it is gone."""
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_BYTES


def command_line(pid: int) -> str:
    """Process ``pid``'s command line, its arguments joined by spaces (a Ray worker's shows its actor or task,
    e.g. ``ray::MapWorker(MapBatches(Segmenter))``); OSError once it is gone."""
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
