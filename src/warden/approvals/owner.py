"""Which process owns a hold, and whether that process is gone.

A ``hold`` approval keeps an agent's request open in one process. When that
process dies (``SIGKILL``, OOM, a node reboot), the request is gone but the
approval is still pending in the shared store; ADR 0004 says it must then
become a deferral, so that a person's decision still lets the retried call
through once. Several sidecars may share one SQLite file, so a process may
only convert holds whose owner is dead, never a live sibling's.

Each process has an :class:`Owner`: a random instance id plus, on Linux, the
host it runs on (boot id and PID namespace), its pid and the pid's start time.
An owner is dead when (:func:`provably_dead`):

* it shares this process's host and its pid no longer runs, or runs another
  process (a different start time: the pid was reused); or
* its heartbeat in the store is older than ``approvals.orphan_after_s``
  (:func:`stale`), which covers owners in another container or PID namespace,
  whose pids this process cannot see.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Owner", "process_start", "provably_dead", "stale"]

_PROC = Path("/proc")


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _host() -> str:
    """Boot id and PID namespace: pids are comparable only within both; ``""`` if unknown."""
    boot = _read(_PROC / "sys/kernel/random/boot_id")
    try:
        pidns = os.readlink(_PROC / "self/ns/pid")
    except OSError:
        return ""
    return f"{boot}/{pidns}" if boot else ""


def process_start(pid: int) -> str:
    """The start time of ``pid`` (clock ticks since boot), or ``""`` if it does not run."""
    stat = _read(_PROC / str(pid) / "stat")
    # Field 22; the command name (field 2) may hold spaces and parentheses.
    fields = stat.rpartition(")")[2].split()
    return fields[19] if len(fields) > 19 else ""


@dataclass(frozen=True, slots=True)
class Owner:
    """One Warden process, as recorded beside the holds it keeps open."""

    instance: str
    host: str
    pid: int
    started: str

    @classmethod
    def current(cls) -> Owner:
        """This process, with a fresh instance id."""
        pid = os.getpid()
        host = _host()
        return cls(
            instance=f"own_{secrets.token_hex(8)}",
            host=host,
            pid=pid,
            started=process_start(pid) if host else "",
        )


def provably_dead(other: Owner, me: Owner) -> bool:
    """Whether ``other`` is certainly gone, judged from this host alone."""
    if other.instance == me.instance:
        return False
    if not other.host or other.host != me.host or not other.started:
        return False  # another host or namespace: only the heartbeat can tell
    return process_start(other.pid) != other.started


def stale(heartbeat_at: float | None, now: float, orphan_after_s: float) -> bool:
    """Whether an owner's heartbeat (``None``: no owner row at all) is too old."""
    return heartbeat_at is None or now - heartbeat_at > orphan_after_s
