"""The state repositories: one interface per domain, implemented by each backend.

* :class:`BudgetRepo`: budget counters and reservations;
* :class:`KillSwitchRepo`: kill switches;
* :class:`warden.state.links.LinkRepo`: call-to-decision links;
* :class:`warden.approvals.store.ApprovalRepo`: approvals and the owners of holds;
* :class:`warden.policy.bundle.order.MarkRepo`: the newest signing time
  activated per policy bundle (rollback protection);
* :class:`ChangeFeed`: who changed what, for the sidecars that keep a copy in
  memory (kill switches) or wait on a row (held approvals).

Repositories that keep a data subject's personal data (call links, approvals,
Responses chains) erase it on request, given an :class:`ErasedSubjects`
(:mod:`warden.erasure`).

SQLite (:mod:`warden.state.sqlite`, one file shared by the processes of one
machine) and PostgreSQL (:mod:`warden.state.postgres`, shared by a fleet)
implement each; one contract test suite runs against both.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Protocol, Self

from warden.state.records import Counter, Hold, KillSwitchRow, ReserveResult

__all__ = [
    "APPROVALS",
    "KILLSWITCHES",
    "BudgetRepo",
    "Change",
    "ChangeFeed",
    "ErasedSubjects",
    "KillSwitchRepo",
    "Subscription",
]

KILLSWITCHES: Final = "killswitches"
"""The change feed's channel for kill switches (key: the switch id)."""
APPROVALS: Final = "approvals"
"""The change feed's channel for approvals (key: the approval id)."""


class ErasedSubjects(Protocol):
    """Which stored content names a data subject being erased
    (:class:`warden.audit.subjects.SubjectMatch`, by the configured subject sources)."""

    @property
    def refs(self) -> frozenset[str]:
        """The keyed references of the subjects being erased."""
        ...

    def names(self, *, arguments: Any = None, context: Any = None, claims: Any = None) -> bool:
        """Whether an action with these arguments, context and agent claims names one.

        Pass what the row keeps; a part it does not keep is ``None`` and names nobody.
        """
        ...


class BudgetRepo(Protocol):
    """Budget counters keyed by ``(counter, window, subject)`` and the reservations on them."""

    async def reserve(
        self, reservation_id: str, holds: Sequence[Hold], *, force: bool = False
    ) -> ReserveResult:
        """Hold every amount atomically (across every sidecar), or none if any would pass.

        ``force`` holds even over a limit (observe mode); ``over`` still says so.
        """
        ...

    async def settle(
        self, reservation_id: str, actual: Mapping[str, float] | None
    ) -> tuple[Counter, ...]:
        """Turn a reservation into spend and drop it; return the counters after.

        ``actual`` maps a counter name to the value really spent (others are
        released); ``None`` spends each held amount. Unknown ids change nothing.
        """
        ...

    async def expire(self, older_than_s: float) -> int:
        """Settle reservations older than ``older_than_s`` at their held value; how many."""
        ...

    async def prune_windows(self, before: Mapping[str, str]) -> int:
        """Delete the counters of windows closed long ago; how many.

        ``before`` maps a window kind (``day``) to the key its deleted windows
        sort below (``day:2026-11-30``): :func:`warden.budgets.caps.windows_closed_before`.
        """
        ...

    async def counters(self, keys: Iterable[tuple[str, str, str]]) -> tuple[Counter, ...]:
        """Read counters by ``(counter, window, subject)``; missing ones read as zero."""
        ...

    async def window_counters(
        self, counter: str, window: str, *, limit: int = 50
    ) -> tuple[Counter, ...]:
        """Every subject's totals of ``counter`` in ``window`` (``day:2026-11-30``).

        The most used first (spent plus reserved), at most ``limit`` rows: what
        the console's Operations view shows against each cap.
        """
        ...


class KillSwitchRepo(Protocol):
    """Kill switches: active until cleared, kept afterwards for the record."""

    async def add_killswitch(self, row: KillSwitchRow) -> None:
        """Store a new, active kill switch."""
        ...

    async def clear_killswitch(self, switch_id: str, who: str) -> KillSwitchRow | None:
        """Clear an active switch; ``None`` when there is no active switch with that id."""
        ...

    async def active_killswitches(self) -> tuple[KillSwitchRow, ...]:
        """Every switch not yet cleared, oldest first."""
        ...


@dataclass(frozen=True, slots=True)
class Change:
    """Something changed on ``channel``: the row ``key``, or (``None``) anything."""

    channel: str
    key: str | None = None


class Subscription:
    """One watcher's changes, oldest first; use as a context manager, then :meth:`get`.

    The queue is bounded: a watcher that falls behind gets one change with
    ``key`` ``None`` (re-read everything) instead of an ever longer backlog.
    """

    LIMIT: Final = 1024

    def __init__(self, channel: str, on_close: Callable[[Subscription], None]) -> None:
        self.channel = channel
        self._queue: asyncio.Queue[Change] = asyncio.Queue()
        self._on_close = on_close

    def put(self, change: Change) -> None:
        """Deliver a change (the feed calls this)."""
        if self._queue.qsize() >= self.LIMIT:
            while not self._queue.empty():
                self._queue.get_nowait()
            change = Change(self.channel, None)
        self._queue.put_nowait(change)

    async def get(self) -> Change:
        """The next change; cancelling the wait loses nothing."""
        return await self._queue.get()

    def close(self) -> None:
        """Stop receiving changes."""
        self._on_close(self)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class ChangeFeed(Protocol):
    """Changes made by any process sharing the state, as they happen.

    PostgreSQL delivers them with LISTEN/NOTIFY (published by triggers, so a
    change made with ``psql`` counts too); SQLite polls. A feed that may have
    missed changes (a lost connection, a full queue) says so with a change
    whose ``key`` is ``None``: re-read everything.
    """

    def watch(self, channel: str) -> Subscription:
        """Changes on ``channel`` from now on, until the subscription is closed."""
        ...
