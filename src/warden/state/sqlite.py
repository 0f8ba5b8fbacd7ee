"""The SQLite state store: budget counters, reservations, kill switches and signed-bundle marks.

One connection, used only from one dedicated thread, so SQLite writes never
block the event loop and never interleave. Every change is one ``BEGIN
IMMEDIATE`` transaction: it takes the database's write lock before reading,
so a check-then-reserve is atomic even when several Warden processes share
the file. The journal is WAL, so readers in other processes are not blocked.

Counters are keyed by ``(counter, window, subject)``: ``refunds``,
``day:2026-11-27``, ``agent:support-triage``. ``spent`` is settled value,
``reserved`` is value held for actions still in flight.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Final, TypeVar

from warden.policy.bundle.order import SignedMark
from warden.state.base import SqliteStore, immediate, sqlite_path
from warden.state.records import (
    Counter,
    Hold,
    KillSwitchRow,
    ReserveResult,
    decode_holds,
    encode_holds,
    passes,
)
from warden.state.sessions import PruneClock

__all__ = [
    "Counter",
    "Hold",
    "KillSwitchRow",
    "ReserveResult",
    "StateStore",
    "sqlite_path",
]

T = TypeVar("T")


_NEWEST_STAMP: Final = (
    "SELECT max(t) FROM (SELECT max(created_at) AS t FROM budget_reservations "
    "UNION ALL SELECT max(updated_at) FROM session_counters "
    "UNION ALL SELECT max(created_at) FROM session_calls "
    "UNION ALL SELECT max(created_at) FROM session_responses "
    "UNION ALL SELECT max(used_at) FROM id_owners "
    "UNION ALL SELECT max(created_at) FROM call_links)"
)
"""The newest row stamp in the state file (one schema, one machine's clock): a store
whose only counters are monthly still knows what day it is."""


class StateStore(SqliteStore):
    """The SQLite state store; open with :meth:`open`, close with :meth:`close`."""

    NAME = "state"

    def __init__(self, path: Path, conn: sqlite3.Connection, io: ThreadPoolExecutor) -> None:
        super().__init__(path, conn, io)
        self._prune_clock = PruneClock("budget counters")

    # -- budgets ---------------------------------------------------------------

    async def reserve(
        self, reservation_id: str, holds: Sequence[Hold], *, force: bool = False
    ) -> ReserveResult:
        """Hold every amount atomically, or none if any would pass its limit.

        ``force`` holds even over a limit (observe mode: the action goes
        through, so its value must still be counted); ``over`` still says so.
        """
        return await self._run(self._reserve, reservation_id, tuple(holds), force)

    def _reserve(self, reservation_id: str, holds: tuple[Hold, ...], force: bool) -> ReserveResult:
        with immediate(self._conn) as cur:
            before: list[Counter] = []
            over: list[Hold] = []
            for hold in holds:
                row = cur.execute(
                    "SELECT spent, reserved FROM budget_counters "
                    "WHERE counter = ? AND window = ? AND subject = ?",
                    (hold.counter, hold.window, hold.subject),
                ).fetchone()
                spent, reserved = (float(row[0]), float(row[1])) if row else (0.0, 0.0)
                before.append(Counter(hold.counter, hold.window, hold.subject, spent, reserved))
                if hold.limit is not None and passes(spent + reserved, hold.amount, hold.limit):
                    over.append(hold)
            if over and not force:
                return ReserveResult(reserved=False, before=tuple(before), over=tuple(over))
            for hold in holds:
                cur.execute(
                    "INSERT INTO budget_counters (counter, window, subject, reserved) "
                    "VALUES (?, ?, ?, ?) ON CONFLICT (counter, window, subject) "
                    "DO UPDATE SET reserved = reserved + excluded.reserved",
                    (hold.counter, hold.window, hold.subject, hold.amount),
                )
            cur.execute(
                "INSERT OR REPLACE INTO budget_reservations (id, created_at, holds) "
                "VALUES (?, ?, ?)",
                (reservation_id, time.time(), encode_holds(holds)),
            )
            return ReserveResult(reserved=True, before=tuple(before), over=tuple(over))

    async def settle(
        self, reservation_id: str, actual: Mapping[str, float] | None
    ) -> tuple[Counter, ...]:
        """Turn a reservation into spend and drop it; return the counters after.

        ``actual`` maps a counter name to the value really spent; counters not
        in it are released (spend 0). ``None`` spends each held amount as is.
        An unknown or already settled reservation changes nothing.
        """
        return await self._run(self._settle, reservation_id, actual)

    def _settle(
        self, reservation_id: str, actual: Mapping[str, float] | None
    ) -> tuple[Counter, ...]:
        with immediate(self._conn) as cur:
            row = cur.execute(
                "SELECT holds FROM budget_reservations WHERE id = ?", (reservation_id,)
            ).fetchone()
            if row is None:
                return ()
            cur.execute("DELETE FROM budget_reservations WHERE id = ?", (reservation_id,))
            return _apply(cur, decode_holds(row[0]), actual)

    async def expire(self, older_than_s: float) -> int:
        """Settle reservations older than ``older_than_s`` at their held value.

        A delivered tool call whose result never came back is assumed done:
        counting it errs on the side of the cap.
        """
        return await self._run(self._expire, time.time() - older_than_s)

    def _expire(self, cutoff: float) -> int:
        with immediate(self._conn) as cur:
            rows = cur.execute(
                "SELECT id, holds FROM budget_reservations WHERE created_at < ?", (cutoff,)
            ).fetchall()
            for rid, holds in rows:
                cur.execute("DELETE FROM budget_reservations WHERE id = ?", (rid,))
                _apply(cur, decode_holds(holds), None)
            return len(rows)

    async def prune_windows(self, before: Mapping[str, str]) -> int:
        """Delete the counters of windows closed long ago; how many.

        None of the day before the newest data stored, or later: a forward step of
        this machine's clock deletes nothing counted in now, yet a kind nothing counts
        in any more goes on time (:class:`~warden.state.sessions.PruneClock`).
        """
        return await self._run(self._prune_windows, dict(before))

    def _prune_windows(self, before: dict[str, str]) -> int:
        with immediate(self._conn) as cur:
            newest = [
                str(top)
                for (top,) in cur.execute(
                    "SELECT max(window) FROM budget_counters "
                    "GROUP BY substr(window, 1, instr(window, ':') - 1)"
                ).fetchall()
            ]
            (stamp,) = cur.execute(_NEWEST_STAMP).fetchone()
            cutoffs = self._prune_clock.window_cutoffs(
                before, local=time.time(), newest=newest, newest_stamp=stamp
            )
            deleted = 0
            for kind, cutoff in sorted(cutoffs.items()):
                cur.execute(
                    "DELETE FROM budget_counters WHERE window LIKE ? AND window < ?",
                    (f"{kind}:%", cutoff),
                )
                deleted += cur.rowcount
            return deleted

    async def counters(self, keys: Iterable[tuple[str, str, str]]) -> tuple[Counter, ...]:
        """Read counters by ``(counter, window, subject)``; missing ones read as zero."""
        return await self._run(self._counters, tuple(keys))

    def _counters(self, keys: tuple[tuple[str, str, str], ...]) -> tuple[Counter, ...]:
        out = []
        for counter, window, subject in keys:
            row = self._conn.execute(
                "SELECT spent, reserved FROM budget_counters "
                "WHERE counter = ? AND window = ? AND subject = ?",
                (counter, window, subject),
            ).fetchone()
            spent, reserved = (float(row[0]), float(row[1])) if row else (0.0, 0.0)
            out.append(Counter(counter, window, subject, spent, reserved))
        return tuple(out)

    async def window_counters(
        self, counter: str, window: str, *, limit: int = 50
    ) -> tuple[Counter, ...]:
        """Every subject's totals of ``counter`` in ``window``, the most used first."""
        return await self._run(self._window_counters, counter, window, max(1, min(limit, 1000)))

    def _window_counters(self, counter: str, window: str, limit: int) -> tuple[Counter, ...]:
        rows = self._conn.execute(
            "SELECT subject, spent, reserved FROM budget_counters "
            "WHERE counter = ? AND window = ? ORDER BY spent + reserved DESC, subject LIMIT ?",
            (counter, window, limit),
        ).fetchall()
        return tuple(Counter(counter, window, str(s), float(sp), float(rs)) for s, sp, rs in rows)

    # -- kill switches ---------------------------------------------------------

    async def add_killswitch(self, row: KillSwitchRow) -> None:
        """Store a new, active kill switch."""
        await self._run(self._add_killswitch, row)

    def _add_killswitch(self, row: KillSwitchRow) -> None:
        with immediate(self._conn) as cur:
            cur.execute(
                "INSERT INTO killswitches (id, scope, target, reason, created_by, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (row.id, row.scope, row.target, row.reason, row.created_by, row.created_at),
            )

    async def clear_killswitch(self, switch_id: str, who: str) -> KillSwitchRow | None:
        """Clear an active switch; ``None`` when there is no active switch with that id."""
        return await self._run(self._clear_killswitch, switch_id, who)

    def _clear_killswitch(self, switch_id: str, who: str) -> KillSwitchRow | None:
        with immediate(self._conn) as cur:
            now = time.time()
            cur.execute(
                "UPDATE killswitches SET cleared_by = ?, cleared_at = ? "
                "WHERE id = ? AND cleared_at IS NULL",
                (who, now, switch_id),
            )
            if cur.rowcount == 0:
                return None
            found = cur.execute(
                "SELECT id, scope, target, reason, created_by, created_at, cleared_by, "
                "cleared_at FROM killswitches WHERE id = ?",
                (switch_id,),
            ).fetchone()
            return KillSwitchRow(*found)

    async def active_killswitches(self) -> tuple[KillSwitchRow, ...]:
        """Every switch not yet cleared, oldest first."""
        return await self._run(self._active_killswitches)

    def _active_killswitches(self) -> tuple[KillSwitchRow, ...]:
        rows = self._conn.execute(
            "SELECT id, scope, target, reason, created_by, created_at, cleared_by, cleared_at "
            "FROM killswitches WHERE cleared_at IS NULL ORDER BY created_at, id"
        ).fetchall()
        return tuple(KillSwitchRow(*r) for r in rows)

    # -- signed bundles --------------------------------------------------------

    async def signed_marks(self, bundles: Sequence[str]) -> dict[str, SignedMark]:
        """The newest signing time activated for each of these bundle names."""
        return await self._run(self._signed_marks, tuple(bundles))

    def _signed_marks(self, bundles: tuple[str, ...]) -> dict[str, SignedMark]:
        marks = {}
        for name in bundles:
            row = self._conn.execute(
                "SELECT bundle, signed_at, revision, activated_at FROM policy_signed_marks "
                "WHERE bundle = ?",
                (name,),
            ).fetchone()
            if row is not None:
                marks[name] = SignedMark(*row)
        return marks

    async def raise_signed_marks(self, marks: Sequence[SignedMark]) -> None:
        """Store each mark unless its bundle's stored signing time is newer."""
        await self._run(self._raise_signed_marks, tuple(marks))

    def _raise_signed_marks(self, marks: tuple[SignedMark, ...]) -> None:
        with immediate(self._conn) as cur:
            cur.executemany(
                "INSERT INTO policy_signed_marks (bundle, signed_at, revision, activated_at) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (bundle) DO UPDATE SET "
                "signed_at = excluded.signed_at, revision = excluded.revision, "
                "activated_at = excluded.activated_at "
                "WHERE excluded.signed_at >= policy_signed_marks.signed_at",
                [(m.bundle, m.signed_at, m.revision, m.activated_at) for m in marks],
            )


def _apply(
    cur: sqlite3.Cursor, holds: Sequence[Hold], actual: Mapping[str, float] | None
) -> tuple[Counter, ...]:
    out = []
    for hold in holds:
        spend = hold.amount if actual is None else max(0.0, actual.get(hold.counter, 0.0))
        cur.execute(
            "UPDATE budget_counters SET reserved = max(0, reserved - ?), spent = spent + ? "
            "WHERE counter = ? AND window = ? AND subject = ?",
            (hold.amount, spend, hold.counter, hold.window, hold.subject),
        )
        row = cur.execute(
            "SELECT spent, reserved FROM budget_counters "
            "WHERE counter = ? AND window = ? AND subject = ?",
            (hold.counter, hold.window, hold.subject),
        ).fetchone()
        if row is not None:
            out.append(
                Counter(hold.counter, hold.window, hold.subject, float(row[0]), float(row[1]))
            )
    return tuple(out)
