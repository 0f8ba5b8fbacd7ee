"""Approvals on PostgreSQL (:class:`~warden.approvals.store.ApprovalRepo`), shared by a fleet.

Each change is one transaction that locks the rows it decides on
(``FOR UPDATE``), so two sidecars can never both approve, both consume, or
approve what another just expired; consuming a grant skips rows another
sidecar is consuming (``SKIP LOCKED``). The rules themselves are the ones the
SQLite store applies (:func:`~warden.approvals.store.apply_vote`,
:func:`~warden.approvals.store.orphaned_holds`). Every change to a row is
published to the fleet by the table's trigger (the change feed).
"""

from __future__ import annotations

import builtins
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any, Final

from psycopg import AsyncCursor

from warden.approvals.model import Approval, ApprovalNotFound, ApprovalStatus, Vote
from warden.approvals.owner import Owner
from warden.approvals.store import (
    COLUMNS,
    ERASED_BY,
    ErasedApprovals,
    PageKey,
    apply_vote,
    erase_params,
    erase_statement,
    from_row,
    names_erased,
    orphaned_holds,
    page_query,
    to_row,
)
from warden.state.postgres import PgDatabase
from warden.state.repos import ErasedSubjects

__all__ = ["PgApprovalStore"]

_SELECT: Final = f"SELECT {COLUMNS} FROM approvals "  # noqa: S608 - constant columns
_RETURNING: Final = f" RETURNING {COLUMNS}"
_PLACEHOLDERS: Final = ", ".join(["%s"] * len(COLUMNS.split(",")))
# pg_advisory_xact_lock key for recovering orphaned holds, one sidecar at a time.
_RECOVER_LOCK: Final = 0x7761726465_6E7263
# First key of pg_advisory_xact_lock(int4, int4) for one agent's approval room.
_ROOM_LOCK: Final = 0x61707072


class PgApprovalStore:
    """Approval rows and the owners of holds, in PostgreSQL."""

    def __init__(self, db: PgDatabase) -> None:
        self._db = db

    async def close(self) -> None:
        """Nothing of its own to close: the pool belongs to the backend."""

    # -- reads -------------------------------------------------------------------

    async def get(self, approval_id: str) -> Approval | None:
        """One approval by id."""
        rows = await self._db.read(_SELECT + "WHERE id = %s", (approval_id,))
        return from_row(rows[0]) if rows else None

    async def list(self, status: ApprovalStatus | None = None) -> builtins.list[Approval]:
        """Approvals with ``status`` (all when ``None``), oldest first."""
        if status is None:
            rows = await self._db.read(_SELECT + "ORDER BY created_at, id")
        else:
            rows = await self._db.read(
                _SELECT + "WHERE status = %s ORDER BY created_at, id", (status.value,)
            )
        return [from_row(r) for r in rows]

    async def page(
        self, *, pending: bool, limit: int, after: PageKey | None = None
    ) -> builtins.list[Approval]:
        """One page of approvals (see :class:`~warden.approvals.store.PagedApprovals`)."""
        query, params = page_query(pending, limit, after, columns=COLUMNS, placeholder="%s")
        return [from_row(r) for r in await self._db.read(query, params)]

    async def pending_counts(self) -> dict[tuple[str, str], int]:
        """Pending approvals by ``(agent, tool)``."""
        rows = await self._db.read(
            "SELECT agent, coalesce(tool, ''), count(*) FROM approvals "
            "WHERE status = 'pending' GROUP BY agent, coalesce(tool, '')"
        )
        return {(str(a), str(t)): int(n) for a, t, n in rows}

    async def oldest_pending(self) -> float | None:
        """When the oldest pending approval was requested; ``None`` when none waits."""
        rows = await self._db.read("SELECT min(created_at) FROM approvals WHERE status = 'pending'")
        return float(rows[0][0]) if rows and rows[0][0] is not None else None

    async def pending_for(self, binding: str, now: float) -> Approval | None:
        """The oldest pending, unexpired approval with this binding."""
        rows = await self._db.read(
            _SELECT + "WHERE binding = %s AND status = 'pending' AND expires_at > %s "
            "ORDER BY created_at, id LIMIT 1",
            (binding, now),
        )
        return from_row(rows[0]) if rows else None

    # -- changes -----------------------------------------------------------------

    async def insert(self, approval: Approval, *, room: int = 0) -> bool:
        """Store a new approval (see :meth:`~warden.approvals.store.ApprovalRepo.insert`).

        With ``room``, the agent's pending approvals are counted under a
        transaction-scoped advisory lock of that agent, so sidecars opening
        approvals for it at once take turns.
        """

        async def run(cur: AsyncCursor[Any]) -> bool:
            if room:
                await cur.execute(
                    "SELECT pg_advisory_xact_lock(%s, hashtext(%s))",
                    (_ROOM_LOCK, approval.agent_id),
                )
                await cur.execute(
                    "SELECT count(*) FROM approvals WHERE status = 'pending' AND agent = %s",
                    (approval.agent_id,),
                )
                row = await cur.fetchone()
                if row is not None and int(row[0]) >= room:
                    return False
            await cur.execute(
                f"INSERT INTO approvals ({COLUMNS}) VALUES ({_PLACEHOLDERS})",  # noqa: S608
                to_row(approval),
            )
            return True

        return await self._db.tx(run)

    async def vote(self, approval_id: str, vote: Vote) -> tuple[Approval, Approval]:
        """Add a vote under the row's lock; return the approval before and after."""

        async def run(cur: AsyncCursor[Any]) -> tuple[Approval, Approval]:
            await cur.execute(_SELECT + "WHERE id = %s FOR UPDATE", (approval_id,))
            row = await cur.fetchone()
            if row is None:
                raise ApprovalNotFound(f"no approval {approval_id!r}")
            before = from_row(row)
            after = apply_vote(before, vote)
            await cur.execute(
                "UPDATE approvals SET status = %s, votes = %s, decided_at = %s, "
                "decided_by = %s, comment = %s, consumed_at = %s, "
                "required = greatest(required, %s) WHERE id = %s",
                _decision(after),
            )
            return before, after

        return await self._db.tx(run)

    async def _one(
        self,
        query: str,
        params: tuple[Any, ...],
        *,
        landed: Callable[[Approval | None], Awaitable[object]] | None = None,
    ) -> Approval | None:
        async def run(cur: AsyncCursor[Any]) -> Approval | None:
            await cur.execute(query.encode(), params)
            row = await cur.fetchone()
            return from_row(row) if row else None

        return await self._db.tx(run, landed=landed)

    async def _many(self, query: str, params: tuple[Any, ...]) -> builtins.list[Approval]:
        async def run(cur: AsyncCursor[Any]) -> builtins.list[Approval]:
            await cur.execute(query.encode(), params)
            rows = sorted(await cur.fetchall(), key=lambda r: (r[15], r[0]))
            return [from_row(r) for r in rows]

        return await self._db.tx(run)

    async def expire(
        self, approval_id: str, now: float, *, owner: str | None = None
    ) -> Approval | None:
        """Expire a pending approval (with ``owner``: only while it is that owner's
        hold); ``None`` when it was not."""
        return await self._one(
            "UPDATE approvals SET status = 'expired', decided_at = %s "  # noqa: S608 - constant columns
            "WHERE id = %s AND status = 'pending' "
            "AND (%s::text IS NULL OR (mode = 'hold' AND owner = %s))" + _RETURNING,
            (now, approval_id, owner, owner),
        )

    async def to_defer(
        self, approval_id: str, expires_at: float, *, owner: str | None = None
    ) -> Approval | None:
        """Turn a pending hold into a deferral, or an approved unused hold into a grant
        (with ``owner``: a hold only while it is that owner's); ``None`` when neither."""
        return await self._one(
            "UPDATE approvals SET mode = 'defer', expires_at = greatest(expires_at, %s) "  # noqa: S608 - constant columns
            "WHERE id = %s AND (status = 'pending' OR (status = 'approved' "
            "AND mode = 'hold' AND consumed_at IS NULL)) "
            "AND (%s::text IS NULL OR (mode = 'hold' AND owner = %s))" + _RETURNING,
            (expires_at, approval_id, owner, owner),
        )

    async def due_deferrals(self, now: float, limit: int) -> builtins.list[str]:
        """The ids of at most ``limit`` due pending deferrals, oldest due first."""

        async def run(cur: AsyncCursor[Any]) -> builtins.list[str]:
            await cur.execute(
                b"SELECT id FROM approvals WHERE status = 'pending' AND mode <> 'hold' "
                b"AND expires_at <= %s ORDER BY expires_at, id LIMIT %s",
                (now, limit),
            )
            return [str(r[0]) for r in await cur.fetchall()]

        return await self._db.tx(run)

    async def expire_deferral(self, approval_id: str, now: float) -> Approval | None:
        """Expire a pending deferral due by ``now``; ``None`` when it is not one now."""
        return await self._one(
            "UPDATE approvals SET status = 'expired', decided_at = %s WHERE id = %s "  # noqa: S608 - constant columns
            "AND status = 'pending' AND mode <> 'hold' AND expires_at <= %s" + _RETURNING,
            (now, approval_id, now),
        )

    async def expire_due(self, now: float) -> builtins.list[Approval]:
        """Expire every pending approval past its expiry; return them."""
        return await self._many(
            "UPDATE approvals SET status = 'expired', decided_at = %s "  # noqa: S608 - constant columns
            "WHERE status = 'pending' AND expires_at <= %s" + _RETURNING,
            (now, now),
        )

    async def prune(self, before: float) -> int:
        """Delete approvals that ended before ``before``; return how many."""

        async def run(cur: AsyncCursor[Any]) -> int:
            await cur.execute(
                "DELETE FROM approvals WHERE (status IN ('rejected', 'expired', 'consumed') "
                "AND coalesce(consumed_at, decided_at, created_at) < %s) "
                "OR (status = 'approved' AND expires_at < %s)",
                (before, before),
            )
            return int(cur.rowcount)

        return await self._db.tx(run, slow=True)  # whatever aged out: background upkeep

    async def consume_grant(self, binding: str, now: float) -> Approval | None:
        """Consume the oldest approved, unexpired deferral with this binding, once.

        A grant consumed after its caller stopped waiting (the call timed out, its
        client left) is put back: no call used it, and the agent's retry may.
        """

        async def put_back(grant: Approval | None) -> None:
            if grant is None:
                return

            async def run(cur: AsyncCursor[Any]) -> None:
                await cur.execute(
                    "UPDATE approvals SET status = 'approved', consumed_at = NULL "
                    "WHERE id = %s AND status = 'consumed' AND consumed_at = %s",
                    (grant.id, now),
                )

            await self._db.tx(run)

        return await self._one(
            "UPDATE approvals SET status = 'consumed', consumed_at = %s WHERE id = ("  # noqa: S608 - constant columns
            "SELECT id FROM approvals WHERE binding = %s AND status = 'approved' "
            "AND mode = 'defer' AND expires_at > %s ORDER BY decided_at, id LIMIT 1 "
            "FOR UPDATE SKIP LOCKED)" + _RETURNING,
            (now, binding, now),
            landed=put_back,
        )

    async def consume(self, approval_id: str, now: float) -> Approval | None:
        """Consume an approved approval by id; ``None`` when it is not approved."""
        return await self._one(
            "UPDATE approvals SET status = 'consumed', consumed_at = %s "  # noqa: S608 - constant columns
            "WHERE id = %s AND status = 'approved'" + _RETURNING,
            (now, approval_id),
        )

    async def cancel(
        self,
        agent: str | None,
        tool: str | None,
        who: str,
        reason: str,
        now: float,
        *,
        upstream: str | None = None,
    ) -> builtins.list[Approval]:
        """Reject every pending, and every approved but unused, approval of ``agent``,
        ``tool`` and/or ``upstream`` (all when each is None): a grant must not outlive a
        kill switch."""
        return await self._many(
            "UPDATE approvals SET status = 'rejected', decided_at = %s, decided_by = %s, "  # noqa: S608 - constant columns
            "comment = %s WHERE status IN ('pending', 'approved') "
            "AND (%s::text IS NULL OR agent = %s) AND (%s::text IS NULL OR tool = %s) "
            "AND (%s::text IS NULL OR upstream IS NULL OR upstream = %s)" + _RETURNING,
            (now, who, reason, agent, agent, tool, tool, upstream, upstream),
        )

    async def erase(self, erased: ErasedSubjects, now: float) -> ErasedApprovals:
        """Erase the approvals that name an erased data subject (see
        :class:`~warden.approvals.store.ApprovalRepo`).

        Read a page at a time (:meth:`~warden.state.postgres.PgDatabase.scan`): every
        approval kept, in one statement, may outlast the statement timeout.
        """
        found = await self._db.scan(
            _SELECT + "WHERE id > %s ORDER BY id LIMIT %s", partial(_naming, erased)
        )
        if not found:
            return ErasedApprovals(0)
        found.sort(key=lambda a: (a.created_at, a.id))  # as listed: oldest first
        # Each row is changed only while it keeps the binding read (no sidecar
        # erased it meanwhile); its status is decided by the statement itself.
        statement = erase_statement("%s") + _RETURNING

        async def run(cur: AsyncCursor[Any]) -> ErasedApprovals:
            erased_now, revoked = 0, []
            for before in found:
                await cur.execute(statement.encode(), erase_params(before, now))
                row = await cur.fetchone()
                if row is None:
                    continue
                after = from_row(row)
                erased_now += 1
                if after.decided_by == ERASED_BY and after.decided_at == now:
                    revoked.append(after)  # this statement rejected it
            return ErasedApprovals(erased_now, tuple(revoked))

        return await self._db.tx(run, slow=True)

    # -- owners of holds -----------------------------------------------------------

    async def heartbeat(self, owner: Owner, now: float) -> None:
        """Say that ``owner`` is alive (creating its row, or re-creating one a sibling dropped)."""

        async def run(cur: AsyncCursor[Any]) -> None:
            await cur.execute(
                "INSERT INTO approval_owners (instance, host, pid, started, heartbeat_at) "
                "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (instance) "
                "DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
                (owner.instance, owner.host, owner.pid, owner.started, now),
            )

        await self._db.tx(run)

    async def release(self, owner: Owner) -> None:
        """Drop ``owner``'s row: it stops."""

        async def run(cur: AsyncCursor[Any]) -> None:
            await cur.execute("DELETE FROM approval_owners WHERE instance = %s", (owner.instance,))

        await self._db.tx(run)

    async def recover(
        self, me: Owner, now: float, orphan_after_s: float, expires_at: float
    ) -> builtins.list[Approval]:
        """Turn the holds of dead owners into deferrals; return them.

        One sidecar at a time (an advisory lock), so each hold is converted once.
        Note that :func:`~warden.approvals.owner.provably_dead` can only prove
        death on this host; elsewhere a stale heartbeat decides.
        """

        async def run(cur: AsyncCursor[Any]) -> builtins.list[Approval]:
            await cur.execute("SELECT pg_advisory_xact_lock(%s)", (_RECOVER_LOCK,))
            await cur.execute(
                "SELECT instance, host, pid, started, heartbeat_at FROM approval_owners"
            )
            owners = {
                r[0]: (Owner(r[0], r[1], int(r[2]), r[3]), float(r[4]))
                for r in await cur.fetchall()
            }
            await cur.execute(
                "SELECT id, owner FROM approvals "
                "WHERE mode = 'hold' AND status IN ('pending', 'approved')"
            )
            ids, dead = orphaned_holds(me, owners, await cur.fetchall(), now, orphan_after_s)
            found: builtins.list[Approval] = []
            if ids:
                await cur.execute(
                    "UPDATE approvals SET mode = 'defer', expires_at = greatest(expires_at, %s) "  # noqa: S608 - constant columns
                    "WHERE id = ANY(%s)" + _RETURNING,
                    (expires_at, ids),
                )
                found = [from_row(r) for r in await cur.fetchall()]
            if dead:
                await cur.execute(
                    "DELETE FROM approval_owners WHERE instance = ANY(%s)", (sorted(dead),)
                )
            order = {aid: i for i, aid in enumerate(ids)}
            return sorted(found, key=lambda a: order[a.id])

        return await self._db.tx(run)

    async def adopt(
        self, binding: str, owner: str, now: float, hold_until: float
    ) -> Approval | None:
        """Hold the oldest pending deferral with this binding in ``owner``; ``None`` if none."""
        return await self._one(
            "UPDATE approvals SET mode = 'hold', owner = %s, "  # noqa: S608 - constant columns
            "expires_at = greatest(expires_at, %s) WHERE id = ("
            "SELECT id FROM approvals WHERE binding = %s AND status = 'pending' "
            "AND mode = 'defer' AND expires_at > %s ORDER BY created_at, id LIMIT 1 "
            "FOR UPDATE SKIP LOCKED)" + _RETURNING,
            (owner, hold_until, binding, now),
        )


def _naming(erased: ErasedSubjects, rows: Sequence[tuple[Any, ...]]) -> builtins.list[Approval]:
    """The approvals among ``rows`` that name an erased data subject."""
    return [a for a in map(from_row, rows) if names_erased(erased, a)]


def _decision(a: Approval) -> tuple[Any, ...]:
    row = to_row(a)
    # status, votes, decided_at, decided_by, comment, consumed_at, required, id (see
    # COLUMNS): the quorum a vote raised (apply_vote) is the approval's from then on.
    return (row[14], row[17], row[18], row[19], row[20], row[21], row[12], row[0])
