"""Which process owns a hold, and whether that process is gone.

A ``hold`` approval keeps an agent's request open in one process. When that
process dies (``SIGKILL``, OOM, a node reboot), the request is gone but the
approval is still pending in the shared store; ADR 0004 says it must then
become a deferral, so that a person's decision still lets the retried call
through once. Several sidecars may share one store, so a process may only
convert holds whose owner is dead, never a live sibling's.

Each process has an :class:`Owner`: a random instance id plus, on Linux, the
host it runs on (boot id and PID namespace), its pid and the pid's start time.
An owner is dead when (:func:`provably_dead`, :func:`silent`):

* it shares this process's host and its pid no longer runs, or runs another
  process (a different start time: the pid was reused); or
* its heartbeat in the store has stood still for ``approvals.orphan_after_s``,
  which covers owners in another container, PID namespace or host, whose pids
  this process cannot see.

The heartbeat is judged without comparing clocks. Two hosts' wall clocks may
differ by any amount, and either may step (NTP, a resumed VM): reading another
host's heartbeat against this one's wall clock took a live sibling for dead
(its holds recovered) whenever this clock ran ahead. So the owner writes
:class:`Heartbeat` values that never go back and advance at least as fast as
time passes, and the observer times them on its own monotonic clock
(:class:`Watch`): from what it saw, a lower bound of how long ago the owner
last beat, whatever either wall clock reads. An observer that has only just
started has seen too little to bound anything: it judges an owner after
watching it for ``orphan_after_s``.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Heartbeat", "Owner", "Watch", "process_start", "provably_dead", "silent", "stale"]

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


class Heartbeat:
    """The values this process writes as its heartbeat.

    Its wall clock, but never less than the last value plus the time passed
    on its monotonic clock: a wall clock stepped back must not make the
    heartbeat go back (observers would take the owner for one that stopped
    beating long ago), and every beat advances by at least the time passed,
    which is what a :class:`Watch` relies on.
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self._monotonic = monotonic
        self._last: tuple[float, float] | None = None  # (value, monotonic time written)

    def next(self) -> float:
        """The value to write now."""
        now, mono = self._clock(), self._monotonic()
        if self._last is not None:
            value, at = self._last
            now = max(now, value + (mono - at))
        self._last = (now, mono)
        return now


class Watch:
    """What this process saw of other owners' heartbeats, timed on its monotonic clock.

    For each owner it keeps the last heartbeat value, when it first saw that
    value, and the latest moment by which the owner surely wrote it. A live
    owner's heartbeat advances at least as fast as time passes
    (:class:`Heartbeat`), so when a value ``d`` higher than the one before
    shows up, the new one was written no later than ``d`` after the old one
    was first seen. Only differences between one owner's own values and
    differences on this process's monotonic clock are used: neither host's
    wall clock, nor the offset between them, nor a step of either, counts.
    """

    def __init__(self, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._monotonic = monotonic
        self._seen: dict[str, tuple[float, float, float]] = {}
        """instance -> (heartbeat value, first seen, surely written by), monotonic times."""

    def age(self, instance: str, heartbeat_at: float) -> float:
        """At least how long ago ``instance`` wrote ``heartbeat_at``, its heartbeat now.

        ``0`` the first time an owner is seen: nothing bounds it yet.
        """
        now = self._monotonic()
        seen = self._seen.get(instance)
        if seen is None:
            self._seen[instance] = (heartbeat_at, now, now)
        elif heartbeat_at != seen[0]:
            value, first_seen, _ = seen
            # From the previous value's first sighting, not its own bound: an error of
            # the two clocks' rates then spans one beat, never adds up beat after beat.
            written_by = min(now, first_seen + (heartbeat_at - value))
            self._seen[instance] = (heartbeat_at, now, written_by)
        return max(0.0, now - self._seen[instance][2])

    def forget(self, keep: Iterable[str]) -> None:
        """Drop every owner but those in ``keep`` (the others' rows are gone)."""
        kept = set(keep)
        for instance in [i for i in self._seen if i not in kept]:
            del self._seen[instance]


@dataclass(frozen=True, slots=True)
class Owner:
    """One Warden process, as recorded beside the holds it keeps open.

    ``watch`` is what this process saw of other owners' heartbeats
    (:class:`Watch`); an owner read from the store has none.
    """

    instance: str
    host: str
    pid: int
    started: str
    watch: Watch | None = field(default=None, compare=False, repr=False)

    @classmethod
    def current(cls) -> Owner:
        """This process, with a fresh instance id and a watch of its own."""
        pid = os.getpid()
        host = _host()
        return cls(
            instance=f"own_{secrets.token_hex(8)}",
            host=host,
            pid=pid,
            started=process_start(pid) if host else "",
            watch=Watch(),
        )


def provably_dead(other: Owner, me: Owner) -> bool:
    """Whether ``other`` is certainly gone, judged from this host alone."""
    if other.instance == me.instance:
        return False
    if not other.host or other.host != me.host or not other.started:
        return False  # another host or namespace: only the heartbeat can tell
    return process_start(other.pid) != other.started


def silent(
    me: Owner, instance: str, heartbeat_at: float, now: float, orphan_after_s: float
) -> bool:
    """Whether owner ``instance`` stopped beating, as ``me`` sees it.

    By ``me``'s :class:`Watch` when it has one (no clock but its own monotonic
    one counts, see the module's docstring); without one, by :func:`stale`,
    which reads the heartbeat against ``now`` and so trusts both wall clocks.
    """
    if me.watch is None:
        return stale(heartbeat_at, now, orphan_after_s)
    return me.watch.age(instance, heartbeat_at) > orphan_after_s


def stale(heartbeat_at: float | None, now: float, orphan_after_s: float) -> bool:
    """Whether an owner's heartbeat (``None``: no owner row at all) is older than
    ``orphan_after_s`` by the wall clock ``now``: only where both share one clock."""
    return heartbeat_at is None or now - heartbeat_at > orphan_after_s
