"""CPU seconds of a server's processes, read from /proc (Linux): what a load phase cost the server, apart from the
load generator that shares its cores.

A process is keyed by (pid, start time), so a pid reused during a phase is not taken for the process before it.
A process that exits during a phase takes the CPU time it spent in that phase with it (none should, under load).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Process:
    pid: int
    ppid: int
    start: int  # clock ticks after boot: with pid, names the process
    name: str  # the executable's name (comm), e.g. "haproxy", "raylet"
    title: str  # the command line as the process shows it; Ray workers set "ray::<Actor>..."
    cpu_s: float  # user + system time so far

    @property
    def key(self) -> tuple[int, int]:
        return self.pid, self.start


def _read(pid: int) -> Process | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None  # gone meanwhile
    name, rest = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
    # rest[0] is field 3 (state): ppid is field 4, utime 14, stime 15, starttime 22
    return Process(pid=pid, ppid=int(rest[1]), start=int(rest[19]), name=name, title=title,
                   cpu_s=(int(rest[11]) + int(rest[12])) / TICKS_PER_SECOND)


def snapshot() -> dict[tuple[int, int], Process]:
    """Every process on the machine now."""
    table = (_read(int(entry)) for entry in os.listdir("/proc") if entry.isdigit())
    return {process.key: process for process in table if process is not None}


def descendants(root: int, table: dict[tuple[int, int], Process]) -> list[Process]:
    """The processes below `root` in `table` (not `root` itself)."""
    children: dict[int, list[Process]] = {}
    for process in table.values():
        children.setdefault(process.ppid, []).append(process)
    found, pending = [], [root]
    while pending:
        for child in children.get(pending.pop(), []):
            found.append(child)
            pending.append(child.pid)
    return found


def marked(marker: str | None, table: dict[tuple[int, int], Process]) -> list[Process]:
    """Processes whose command line holds `marker` (a PostgreSQL server's data directory: pg_ctl's server leaves the
    tree of whoever started it), with their descendants (its backends, whose titles do not name the directory)."""
    roots = [process for process in table.values() if marker and marker in process.title]
    return roots + [process for root in roots for process in descendants(root.pid, table) if process not in roots]


def cpu_seconds(before: dict, after: dict, keys) -> float:
    """CPU seconds the processes `keys` spent between two snapshots (a process started meanwhile counts whole)."""
    return sum(after[key].cpu_s - (before[key].cpu_s if key in before else 0.0) for key in keys if key in after)


def serve_role(process: Process) -> str:
    """What a process of a Ray Serve instance is, from its title: "replica:<application>" for a Serve replica, "ingress"
    for Serve's proxy actor or HAProxy (with its manager actor), "ray" for the rest (GCS, raylet, controller, idle
    workers ...)."""
    if process.name == "haproxy" or process.title.startswith(("ray::ProxyActor", "ray::HAProxyManager")):
        return "ingress"
    if process.title.startswith("ray::ServeReplica:"):  # "ray::ServeReplica:<app>:<deployment>"
        return "replica:" + process.title.split(":")[3]
    return "ray"
