"""Approvals: the repository interface, and its SQLite implementation.

:class:`ApprovalRepo` is what the approvals service needs from storage;
:class:`ApprovalStore` keeps approvals in SQLite, in the same database file as
the state store (:class:`warden.state.pg_approvals.PgApprovalStore` keeps them
in PostgreSQL). The rules shared by both (how a vote changes an approval,
which holds are orphaned, which approvals name an erased data subject) are
the pure functions :func:`apply_vote`, :func:`orphaned_holds` and
:func:`names_erased`.

The SQLite store keeps its own connection, used from one dedicated thread like
:class:`warden.state.sqlite.StateStore`, with the same pragmas (WAL, busy
timeout). Every change is a ``BEGIN IMMEDIATE`` transaction that re-reads the
row under the write lock, so two sidecars sharing the file can never both
approve, both consume or approve what another just expired.
"""

from __future__ import annotations

import builtins
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final, Protocol, TypeVar, runtime_checkable

import orjson
import psycopg

from warden.approvals.model import (
    AlreadyVoted,
    Approval,
    ApprovalConflict,
    ApprovalNotFound,
    ApprovalStatus,
    Vote,
)
from warden.approvals.owner import Owner, provably_dead, silent
from warden.errors import ConfigError, StateUnavailable
from warden.state.base import SqliteStore, immediate
from warden.state.repos import ErasedSubjects

__all__ = [
    "COLUMNS",
    "ERASED_ARGUMENTS",
    "ERASED_BY",
    "ERASED_REASON",
    "STORE_ERRORS",
    "ApprovalRepo",
    "ApprovalStore",
    "ErasedApprovals",
    "PageKey",
    "PagedApprovals",
    "apply_vote",
    "erase_params",
    "erase_statement",
    "from_row",
    "names_erased",
    "orphaned_holds",
    "page_key",
    "page_query",
    "to_row",
]

T = TypeVar("T")

COLUMNS = (
    "id, decision_id, action_id, agent, tool, arguments, arguments_sha256, binding, mode, "
    "reason, risk, approvers, required, redacted, status, created_at, expires_at, votes, "
    "decided_at, decided_by, comment, consumed_at, owner, upstream, method, subjects, answers"
)
_PLACEHOLDERS: Final = ", ".join(["?"] * len(COLUMNS.split(",")))
# Columns added after the first release, created on open when an older file lacks them.
_ADDED_COLUMNS = (("owner", "TEXT"),)

STORE_ERRORS: Final = (sqlite3.Error, psycopg.Error, OSError, StateUnavailable)
"""What a store raises when it cannot answer (a locked SQLite file past its busy timeout,
PostgreSQL unreachable or its pool exhausted): the state is unavailable, not the request
wrong. The admin API answers them ``503 state_unavailable``."""
ERASED_ARGUMENTS: Final = '{"erased":true}'
"""The display arguments of an approval whose data subject was erased (JSON)."""
ERASED_BY: Final = "erasure"
"""``decided_by`` of approvals rejected because their data subject was erased."""
ERASED_REASON: Final = "the data subject was erased"
# One statement, the same on both backends: an approval still pending, or
# approved and not used yet, is rejected (nothing may act for an erased
# subject); every one loses its display arguments and argument hashes
# (binding ''), so it matches no call again, and the pointers of its masked values
# (made of argument keys: a map keyed by e-mail address). Status and ids stay.
_ERASE = (
    "UPDATE approvals SET arguments = {p}, arguments_sha256 = '', binding = '', answers = NULL, "
    "redacted = '[]', "
    "decided_at = CASE WHEN status IN ('pending', 'approved') THEN {p} ELSE decided_at END, "
    "decided_by = CASE WHEN status IN ('pending', 'approved') THEN {p} ELSE decided_by END, "
    "comment = CASE WHEN status IN ('pending', 'approved') THEN {p} ELSE comment END, "
    "status = CASE WHEN status IN ('pending', 'approved') THEN 'rejected' ELSE status END "
    "WHERE id = {p} AND binding = {p}"
)


@dataclass(frozen=True, slots=True)
class ErasedApprovals:
    """What erasing a data subject did to the approvals (:meth:`ApprovalRepo.erase`)."""

    erased: int
    """Approvals whose display arguments and argument hashes were erased."""
    revoked: tuple[Approval, ...] = ()
    """Those of them that were pending, or approved and not used: now rejected."""


class ApprovalRepo(Protocol):
    """Approval rows and the owners of holds, shared by every sidecar using the state.

    Every change is atomic across sidecars: two can never both approve, both
    consume, or approve what another just expired.
    """

    async def get(self, approval_id: str) -> Approval | None:
        """One approval by id."""
        ...

    async def list(self, status: ApprovalStatus | None = None) -> builtins.list[Approval]:
        """Approvals with ``status`` (all when ``None``), oldest first."""
        ...

    async def pending_counts(self) -> dict[tuple[str, str], int]:
        """Pending approvals by ``(agent, tool)``."""
        ...

    async def oldest_pending(self) -> float | None:
        """When the oldest pending approval was requested; ``None`` when none waits."""
        ...

    async def insert(self, approval: Approval, *, room: int = 0) -> bool:
        """Store a new approval; with ``room``, only while its agent has fewer pending.

        ``False`` (nothing stored) when the agent already has ``room`` pending
        approvals: counted and inserted as one step across every process
        sharing the store.
        """
        ...

    async def pending_for(self, binding: str, now: float) -> Approval | None:
        """The oldest pending, unexpired approval with this binding."""
        ...

    async def vote(self, approval_id: str, vote: Vote) -> tuple[Approval, Approval]:
        """Add a vote atomically (:func:`apply_vote`); the approval before and after."""
        ...

    async def expire(
        self, approval_id: str, now: float, *, owner: str | None = None
    ) -> Approval | None:
        """Expire a pending approval; ``None`` when it was not pending.

        With ``owner``, only while it is still a hold of ``owner``, checked by
        the update itself: a sibling may have deferred it meanwhile (``owner``
        looked gone) and another sidecar adopted it, and neither is ``owner``'s
        to end any more.
        """
        ...

    async def to_defer(
        self, approval_id: str, expires_at: float, *, owner: str | None = None
    ) -> Approval | None:
        """Turn a pending hold into a deferral, or an approved hold not yet used into a
        grant (approved as its caller left: the retry takes it); ``None`` otherwise.

        With ``owner``, a hold is changed only while it is ``owner``'s (never the
        live hold of a sidecar that adopted it since).
        """
        ...

    async def expire_due(self, now: float) -> builtins.list[Approval]:
        """Expire every pending approval past its expiry; return them.

        Holds too, by ``now``: the approvals service does not call this, since a
        hold's time is counted by its owner alone (:meth:`Approvals.expire_due`).
        """
        ...

    async def due_deferrals(self, now: float, limit: int) -> builtins.list[str]:
        """The ids of at most ``limit`` pending deferrals whose ``expires_at`` is ``now``
        or earlier, those that ran out first; nothing else is read or changed."""
        ...

    async def expire_deferral(self, approval_id: str, now: float) -> Approval | None:
        """Expire a pending deferral due by ``now``; ``None`` when it is not one any more
        (adopted meanwhile, a hold again, or given more time)."""
        ...

    async def consume_grant(self, binding: str, now: float) -> Approval | None:
        """Consume the oldest approved, unexpired deferral with this binding, once."""
        ...

    async def prune(self, before: float) -> int:
        """Delete approvals that ended before ``before``; return how many.

        Ended: rejected, expired or consumed, and approved grants whose time to
        be taken ran out. Pending approvals and live grants are never touched.
        """
        ...

    async def consume(self, approval_id: str, now: float) -> Approval | None:
        """Consume an approved approval by id; ``None`` when it is not approved."""
        ...

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
        ``tool`` and/or ``upstream`` (all when each is None; an approval kept before its
        upstream was recorded counts as any upstream's)."""
        ...

    async def heartbeat(self, owner: Owner, now: float) -> None:
        """Say that ``owner`` is alive."""
        ...

    async def release(self, owner: Owner) -> None:
        """Drop ``owner``'s row."""
        ...

    async def recover(
        self, me: Owner, now: float, orphan_after_s: float, expires_at: float
    ) -> builtins.list[Approval]:
        """Turn the holds of dead owners into deferrals (:func:`orphaned_holds`); return them."""
        ...

    async def adopt(
        self, binding: str, owner: str, now: float, hold_until: float
    ) -> Approval | None:
        """Hold the oldest pending deferral with this binding in ``owner``."""
        ...

    async def erase(self, erased: ErasedSubjects, now: float) -> ErasedApprovals:
        """Erase the approvals whose display arguments name an erased data subject
        (:func:`names_erased`): arguments become :data:`ERASED_ARGUMENTS`, the
        argument hash and binding are cleared, and a pending or approved-but-unused
        one is rejected (``decided_by`` :data:`ERASED_BY`)."""
        ...

    async def close(self) -> None:
        """Release what this repository holds (a shared pool stays open)."""
        ...


PageKey = tuple[float, str]
"""Where a page of approvals ends (:func:`page_key` of its last one): the next page
starts after it, so approvals decided meanwhile move no other to an unseen page."""


def page_key(approval: Approval, *, pending: bool) -> PageKey:
    """What pages are sorted by: when a pending approval was opened, or (``pending``
    false) when one past pending was decided (opened, if never decided), then the id."""
    if pending or approval.decided_at is None:
        return approval.created_at, approval.id
    return approval.decided_at, approval.id


@runtime_checkable
class PagedApprovals(Protocol):
    """A store that reads one page of approvals without reading the others."""

    async def page(
        self, *, pending: bool, limit: int, after: PageKey | None = None
    ) -> builtins.list[Approval]:
        """At most ``limit`` approvals that sort after ``after`` (:func:`page_key`): the
        pending ones oldest first, or (``pending`` false) those past pending, the last
        decided first."""
        ...


def page_query(
    pending: bool, limit: int, after: PageKey | None, *, columns: str, placeholder: str
) -> tuple[str, tuple[Any, ...]]:
    """The ``SELECT`` of one page's ``columns`` (see :class:`PagedApprovals`), with the
    backend's placeholder (``?`` or ``%s``), and its parameters."""
    p = placeholder
    if pending:
        key, status, beyond, order = "created_at", "= 'pending'", ">", "created_at, id"
    else:
        key = "coalesce(decided_at, created_at)"
        status, beyond, order = "!= 'pending'", "<", f"{key} DESC, id DESC"
    where = f"status {status}"
    params: tuple[Any, ...] = ()
    if after is not None:
        where += f" AND ({key} {beyond} {p} OR ({key} = {p} AND id {beyond} {p}))"
        params = (after[0], after[0], after[1])
    # Only constant text is formatted in: every value is a parameter.
    query = f"SELECT {columns} FROM approvals WHERE {where} ORDER BY {order} LIMIT {p}"  # noqa: S608
    return query, (*params, limit)


def names_erased(erased: ErasedSubjects, approval: Approval) -> bool:
    """Whether an approval names an erased data subject, as far as its row can tell.

    By the subject references kept with it (every configured source the
    action named, context and claims too), else by its display arguments
    (approvals from before the references were kept): there only
    ``action.arguments.<path>`` sources can match, and not through a path the
    policy redacted from the display.
    """
    if approval.binding == "":  # erased already
        return False
    if not erased.refs.isdisjoint(approval.subjects):
        return True
    return isinstance(approval.arguments, Mapping) and erased.names(arguments=approval.arguments)


def erase_params(approval: Approval, now: float) -> tuple[Any, ...]:
    """The parameters of the erasing ``UPDATE`` for one approval (SQLite or PostgreSQL)."""
    return (ERASED_ARGUMENTS, now, ERASED_BY, ERASED_REASON, approval.id, approval.binding)


def erase_statement(placeholder: str) -> str:
    """The erasing ``UPDATE`` with the backend's placeholder (``?`` or ``%s``)."""
    return _ERASE.format(p=placeholder)


def apply_vote(before: Approval, vote: Vote) -> Approval:
    """The approval after ``vote``, as every backend decides it under its row lock.

    One rejection rejects; ``required_approvals`` distinct approvals approve,
    or the vote's ``quorum`` (the configured one when it was cast) when that is
    more: an approval opened before the quorum was raised needs the new one, and
    keeps it (the stores write ``required_approvals`` back with the vote, so a
    sidecar still configured lower counts against it too); a deferral past its
    expiry is expired instead. A hold is not: its time is counted by the
    process that holds the request, on that process's monotonic clock (the
    vote's time is another sidecar's wall clock, which may run ahead or have
    stepped). Raises :class:`ApprovalConflict` when it is not pending and
    :class:`AlreadyVoted` for a second vote by the same subject.
    """
    if before.status is not ApprovalStatus.PENDING:
        raise ApprovalConflict(f"approval {before.id} is already {before.status.value}")
    if before.mode != "hold" and before.expires_at <= vote.at:
        return replace(before, status=ApprovalStatus.EXPIRED, decided_at=vote.at)
    if any(v.subject == vote.subject for v in before.votes):
        raise AlreadyVoted(f"{vote.subject} already voted on approval {before.id}")
    need = max(before.required_approvals, vote.quorum)
    after = replace(before, votes=(*before.votes, vote), required_approvals=need)
    if not vote.approve:
        return replace(
            after,
            status=ApprovalStatus.REJECTED,
            decided_at=vote.at,
            decided_by=vote.subject,
            comment=vote.comment,
        )
    if len(after.approved_by) >= need:
        return replace(
            after,
            status=ApprovalStatus.APPROVED,
            decided_at=vote.at,
            decided_by=vote.subject,
            comment=vote.comment,
        )
    return after


def orphaned_holds(
    me: Owner,
    owners: Mapping[str, tuple[Owner, float]],
    held: Iterable[Sequence[Any]],
    now: float,
    orphan_after_s: float,
) -> tuple[builtins.list[str], set[str]]:
    """Which holds to defer, and which owner rows to drop.

    ``owners`` maps an instance to its row and last heartbeat; ``held`` is
    ``(approval id, owner)`` of every hold still waiting. An owner is dead when
    :func:`provably_dead` or :func:`silent` (judged by ``me``'s watch, on its
    own monotonic clock, when it has one; by ``now`` otherwise); a hold with no
    owner row at all is orphaned too. This process's holds are never touched.
    """
    dead = {
        instance
        for instance, (owner, beat) in owners.items()
        if instance != me.instance
        and (provably_dead(owner, me) or silent(me, instance, beat, now, orphan_after_s))
    }
    if me.watch is not None:
        # Only owners whose rows are gone: should this transaction fail, a dead
        # owner is still known as one next time.
        me.watch.forget(owners)
    ids = [
        str(aid)
        for aid, owner in held
        if owner != me.instance and (owner is None or owner not in owners or owner in dead)
    ]
    return ids, dead


class ApprovalStore(SqliteStore):
    """Approval rows; open with :meth:`open`, close with :meth:`close`."""

    NAME = "approvals"

    @classmethod
    def _connect(cls, path: Path) -> sqlite3.Connection:
        conn = super()._connect(path)
        try:
            with immediate(conn) as cur:
                have = {row[1] for row in cur.execute("PRAGMA table_info(approvals)")}
                for name, kind in _ADDED_COLUMNS:
                    if name not in have:
                        cur.execute(f"ALTER TABLE approvals ADD COLUMN {name} {kind}")
        except sqlite3.Error as exc:
            conn.close()
            raise ConfigError(
                f"state.url: cannot upgrade the approvals table in {path}: {exc}"
            ) from None
        return conn

    # -- reads -------------------------------------------------------------------

    async def get(self, approval_id: str) -> Approval | None:
        """One approval by id."""
        return await self._run(self._get, approval_id)

    def _get(self, approval_id: str) -> Approval | None:
        row = self._conn.execute(
            f"SELECT {COLUMNS} FROM approvals WHERE id = ?",  # noqa: S608 - constant columns
            (approval_id,),
        ).fetchone()
        return from_row(row) if row else None

    async def list(self, status: ApprovalStatus | None = None) -> builtins.list[Approval]:
        """Approvals with ``status`` (all when ``None``), oldest first."""
        return await self._run(self._list, status)

    def _list(self, status: ApprovalStatus | None) -> builtins.list[Approval]:
        if status is None:
            rows = self._conn.execute(
                f"SELECT {COLUMNS} FROM approvals ORDER BY created_at, id"  # noqa: S608
            ).fetchall()
        else:
            rows = self._conn.execute(
                f"SELECT {COLUMNS} FROM approvals WHERE status = ? "  # noqa: S608
                "ORDER BY created_at, id",
                (status.value,),
            ).fetchall()
        return [from_row(r) for r in rows]

    async def page(
        self, *, pending: bool, limit: int, after: PageKey | None = None
    ) -> builtins.list[Approval]:
        """At most ``limit`` approvals that sort after ``after`` (:func:`page_key`): the
        pending ones oldest first, or (``pending`` false) those past pending, the last
        decided first. Only the page's rows are read whole."""
        return await self._run(self._page, pending, limit, after)

    def _page(self, pending: bool, limit: int, after: PageKey | None) -> builtins.list[Approval]:
        query, params = page_query(pending, limit, after, columns="id", placeholder="?")
        ids = [r[0] for r in self._conn.execute(query, params).fetchall()]
        return [a for a in (self._get(i) for i in ids) if a is not None]

    async def pending_counts(self) -> dict[tuple[str, str], int]:
        """Pending approvals by ``(agent, tool)``, for the pending gauge."""
        return await self._run(self._pending_counts)

    def _pending_counts(self) -> dict[tuple[str, str], int]:
        rows = self._conn.execute(
            "SELECT agent, coalesce(tool, ''), count(*) FROM approvals "
            "WHERE status = 'pending' GROUP BY agent, tool"
        ).fetchall()
        return {(str(a), str(t)): int(n) for a, t, n in rows}

    async def oldest_pending(self) -> float | None:
        """When the oldest pending approval was requested; ``None`` when none waits."""
        return await self._run(self._oldest_pending)

    def _oldest_pending(self) -> float | None:
        row = self._conn.execute(
            "SELECT min(created_at) FROM approvals WHERE status = 'pending'"
        ).fetchone()
        return float(row[0]) if row and row[0] is not None else None

    # -- changes -----------------------------------------------------------------

    async def insert(self, approval: Approval, *, room: int = 0) -> bool:
        """Store a new approval (see :meth:`ApprovalRepo.insert`)."""
        return await self._run(self._insert, approval, room)

    def _insert(self, a: Approval, room: int) -> bool:
        # BEGIN IMMEDIATE: one writer at a time, so the count holds until the insert.
        with immediate(self._conn) as cur:
            if room:
                (waiting,) = cur.execute(
                    "SELECT count(*) FROM approvals WHERE status = 'pending' AND agent = ?",
                    (a.agent_id,),
                ).fetchone()
                if waiting >= room:
                    return False
            cur.execute(
                f"INSERT INTO approvals ({COLUMNS}) VALUES ({_PLACEHOLDERS})",  # noqa: S608
                to_row(a),
            )
        return True

    async def erase(self, erased: ErasedSubjects, now: float) -> ErasedApprovals:
        """Erase the approvals that name an erased data subject (see :class:`ApprovalRepo`)."""
        return await self._run(self._erase, erased, now)

    def _erase(self, erased: ErasedSubjects, now: float) -> ErasedApprovals:
        with immediate(self._conn) as cur:
            found = [
                a
                for a in (from_row(r) for r in cur.execute(f"SELECT {COLUMNS} FROM approvals"))  # noqa: S608
                if names_erased(erased, a)
            ]
            cur.executemany(erase_statement("?"), [erase_params(a, now) for a in found])
            after = [self._get(a.id) for a in found]
        revoked = tuple(
            a
            for a, before in zip(after, found, strict=True)
            if a is not None and a.status is not before.status
        )
        return ErasedApprovals(len(found), revoked)

    async def pending_for(self, binding: str, now: float) -> Approval | None:
        """The oldest pending, unexpired approval with this binding, if any."""
        return await self._run(self._pending_for, binding, now)

    def _pending_for(self, binding: str, now: float) -> Approval | None:
        row = self._conn.execute(
            f"SELECT {COLUMNS} FROM approvals "  # noqa: S608
            "WHERE binding = ? AND status = 'pending' AND expires_at > ? "
            "ORDER BY created_at, id LIMIT 1",
            (binding, now),
        ).fetchone()
        return from_row(row) if row else None

    async def vote(self, approval_id: str, vote: Vote) -> tuple[Approval, Approval]:
        """Add a vote atomically; return the approval before and after.

        One rejection rejects; ``required_approvals`` distinct approvals
        approve. Raises :class:`ApprovalNotFound`, :class:`AlreadyVoted`, or
        :class:`ApprovalConflict` when the approval is not pending. A pending
        approval past its expiry is expired instead (``after.status`` says so).
        """
        return await self._run(self._vote, approval_id, vote)

    def _vote(self, approval_id: str, vote: Vote) -> tuple[Approval, Approval]:
        with immediate(self._conn) as cur:
            row = cur.execute(
                f"SELECT {COLUMNS} FROM approvals WHERE id = ?",  # noqa: S608
                (approval_id,),
            ).fetchone()
            if row is None:
                raise ApprovalNotFound(f"no approval {approval_id!r}")
            before = from_row(row)
            after = apply_vote(before, vote)
            _update(cur, after)
            return before, after

    async def expire(
        self, approval_id: str, now: float, *, owner: str | None = None
    ) -> Approval | None:
        """Expire a pending approval (with ``owner``: only while it is that owner's
        hold); ``None`` when it was not."""
        return await self._run(self._expire, approval_id, now, owner)

    def _expire(self, approval_id: str, now: float, owner: str | None) -> Approval | None:
        with immediate(self._conn) as cur:
            cur.execute(
                "UPDATE approvals SET status = 'expired', decided_at = ? "
                "WHERE id = ? AND status = 'pending' "
                "AND (? IS NULL OR (mode = 'hold' AND owner = ?))",
                (now, approval_id, owner, owner),
            )
            if cur.rowcount == 0:
                return None
            return self._get(approval_id)

    async def to_defer(
        self, approval_id: str, expires_at: float, *, owner: str | None = None
    ) -> Approval | None:
        """Turn a pending hold into a defer grant-to-be, or an approved unused hold into a
        grant (with ``owner``: a hold only while it is that owner's); ``None`` when
        neither."""
        return await self._run(self._to_defer, approval_id, expires_at, owner)

    def _to_defer(self, approval_id: str, expires_at: float, owner: str | None) -> Approval | None:
        with immediate(self._conn) as cur:
            cur.execute(
                "UPDATE approvals SET mode = 'defer', expires_at = MAX(expires_at, ?) "
                "WHERE id = ? AND (status = 'pending' OR (status = 'approved' "
                "AND mode = 'hold' AND consumed_at IS NULL)) "
                # With an owner, only its own hold: a deferral a sibling made of it
                # while it stalled is no longer its to defer (or to record again).
                "AND (? IS NULL OR (mode = 'hold' AND owner = ?))",
                (expires_at, approval_id, owner, owner),
            )
            if cur.rowcount == 0:
                return None
            return self._get(approval_id)

    async def due_deferrals(self, now: float, limit: int) -> builtins.list[str]:
        """The ids of at most ``limit`` due pending deferrals, oldest due first."""
        return await self._run(self._due_deferrals, now, limit)

    def _due_deferrals(self, now: float, limit: int) -> builtins.list[str]:
        rows = self._conn.execute(
            "SELECT id FROM approvals WHERE status = 'pending' AND mode <> 'hold' "
            "AND expires_at <= ? ORDER BY expires_at, id LIMIT ?",
            (now, limit),
        ).fetchall()
        return [str(r[0]) for r in rows]

    async def expire_deferral(self, approval_id: str, now: float) -> Approval | None:
        """Expire a pending deferral due by ``now``; ``None`` when it is not one now."""
        return await self._run(self._expire_deferral, approval_id, now)

    def _expire_deferral(self, approval_id: str, now: float) -> Approval | None:
        with immediate(self._conn) as cur:
            cur.execute(
                "UPDATE approvals SET status = 'expired', decided_at = ? WHERE id = ? "
                "AND status = 'pending' AND mode <> 'hold' AND expires_at <= ?",
                (now, approval_id, now),
            )
            if cur.rowcount == 0:
                return None
            return self._get(approval_id)

    async def expire_due(self, now: float) -> builtins.list[Approval]:
        """Expire every pending approval past its expiry; return them."""
        return await self._run(self._expire_due, now)

    def _expire_due(self, now: float) -> builtins.list[Approval]:
        with immediate(self._conn) as cur:
            ids = [
                r[0]
                for r in cur.execute(
                    "SELECT id FROM approvals WHERE status = 'pending' AND expires_at <= ?",
                    (now,),
                ).fetchall()
            ]
            cur.executemany(
                "UPDATE approvals SET status = 'expired', decided_at = ? WHERE id = ?",
                [(now, i) for i in ids],
            )
            return [a for a in (self._get(i) for i in ids) if a is not None]

    async def prune(self, before: float) -> int:
        """Delete approvals that ended before ``before``; return how many."""
        return await self._run(self._prune, before)

    def _prune(self, before: float) -> int:
        with immediate(self._conn) as cur:
            cur.execute(
                "DELETE FROM approvals WHERE (status IN ('rejected', 'expired', 'consumed') "
                "AND coalesce(consumed_at, decided_at, created_at) < ?) "
                "OR (status = 'approved' AND expires_at < ?)",
                (before, before),
            )
            return int(cur.rowcount)

    async def consume_grant(self, binding: str, now: float) -> Approval | None:
        """Consume the oldest approved, unexpired defer-mode grant with this binding."""
        return await self._run(self._consume_grant, binding, now)

    def _consume_grant(self, binding: str, now: float) -> Approval | None:
        with immediate(self._conn) as cur:
            row = cur.execute(
                "SELECT id FROM approvals WHERE binding = ? AND status = 'approved' "
                "AND mode = 'defer' AND expires_at > ? ORDER BY decided_at, id LIMIT 1",
                (binding, now),
            ).fetchone()
            if row is None:
                return None
            cur.execute(
                "UPDATE approvals SET status = 'consumed', consumed_at = ? WHERE id = ?",
                (now, row[0]),
            )
            return self._get(row[0])

    async def consume(self, approval_id: str, now: float) -> Approval | None:
        """Consume an approved approval by id; ``None`` when it is not approved."""
        return await self._run(self._consume, approval_id, now)

    def _consume(self, approval_id: str, now: float) -> Approval | None:
        with immediate(self._conn) as cur:
            cur.execute(
                "UPDATE approvals SET status = 'consumed', consumed_at = ? "
                "WHERE id = ? AND status = 'approved'",
                (now, approval_id),
            )
            if cur.rowcount == 0:
                return None
            return self._get(approval_id)

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
        return await self._run(self._cancel, (agent, tool, upstream), who, reason, now)

    def _cancel(
        self,
        of: tuple[str | None, str | None, str | None],
        who: str,
        reason: str,
        now: float,
    ) -> builtins.list[Approval]:
        agent, tool, upstream = of
        with immediate(self._conn) as cur:
            ids = [
                r[0]
                for r in cur.execute(
                    "SELECT id FROM approvals WHERE status IN ('pending', 'approved') "
                    "AND (? IS NULL OR agent = ?) AND (? IS NULL OR tool = ?) "
                    "AND (? IS NULL OR upstream IS NULL OR upstream = ?)",
                    (agent, agent, tool, tool, upstream, upstream),
                ).fetchall()
            ]
            cur.executemany(
                "UPDATE approvals SET status = 'rejected', decided_at = ?, decided_by = ?, "
                "comment = ? WHERE id = ?",
                [(now, who, reason, i) for i in ids],
            )
            return [a for a in (self._get(i) for i in ids) if a is not None]

    # -- owners of holds -----------------------------------------------------------

    async def heartbeat(self, owner: Owner, now: float) -> None:
        """Say that ``owner`` is alive (creating its row, or re-creating one a sibling dropped)."""
        await self._run(self._heartbeat, owner, now)

    def _heartbeat(self, owner: Owner, now: float) -> None:
        with immediate(self._conn) as cur:
            cur.execute(
                "INSERT INTO approval_owners (instance, host, pid, started, heartbeat_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (instance) DO UPDATE SET heartbeat_at = ?",
                (owner.instance, owner.host, owner.pid, owner.started, now, now),
            )

    async def release(self, owner: Owner) -> None:
        """Drop ``owner``'s row: it stops (its holds were answered as deferred first)."""
        await self._run(self._release, owner)

    def _release(self, owner: Owner) -> None:
        with immediate(self._conn) as cur:
            cur.execute("DELETE FROM approval_owners WHERE instance = ?", (owner.instance,))

    async def recover(
        self, me: Owner, now: float, orphan_after_s: float, expires_at: float
    ) -> builtins.list[Approval]:
        """Turn the holds of dead owners into deferrals; return them.

        A hold is pending (or approved but not yet delivered) in ``hold``
        mode; its owner is dead when :func:`provably_dead` or :func:`silent`
        (see :func:`orphaned_holds`), or has no owner row at all (rows from
        before owners were recorded, or an owner that stopped). Holds of this
        process and of live siblings are left alone. One transaction, so two
        sidecars recovering at once convert each hold once.
        """
        return await self._run(self._recover, me, now, orphan_after_s, expires_at)

    def _recover(
        self, me: Owner, now: float, orphan_after_s: float, expires_at: float
    ) -> builtins.list[Approval]:
        with immediate(self._conn) as cur:
            owners = {
                row[0]: (Owner(row[0], row[1], int(row[2]), row[3]), float(row[4]))
                for row in cur.execute(
                    "SELECT instance, host, pid, started, heartbeat_at FROM approval_owners"
                )
            }
            held = cur.execute(
                "SELECT id, owner FROM approvals "
                "WHERE mode = 'hold' AND status IN ('pending', 'approved')"
            ).fetchall()
            ids, dead = orphaned_holds(me, owners, held, now, orphan_after_s)
            cur.executemany(
                "UPDATE approvals SET mode = 'defer', expires_at = MAX(expires_at, ?) WHERE id = ?",
                [(expires_at, i) for i in ids],
            )
            cur.executemany(
                "DELETE FROM approval_owners WHERE instance = ?", [(i,) for i in sorted(dead)]
            )
            return [a for a in (self._get(i) for i in ids) if a is not None]

    async def adopt(
        self, binding: str, owner: str, now: float, hold_until: float
    ) -> Approval | None:
        """Hold the oldest pending deferral with this binding in ``owner``; ``None`` if none.

        An agent that retries a call whose hold was lost (Warden stopped or
        died) waits on that same approval again instead of raising another.
        ``expires_at`` is never shortened: the deferral stays decidable.
        """
        return await self._run(self._adopt, binding, owner, now, hold_until)

    def _adopt(self, binding: str, owner: str, now: float, hold_until: float) -> Approval | None:
        with immediate(self._conn) as cur:
            row = cur.execute(
                "SELECT id FROM approvals WHERE binding = ? AND status = 'pending' "
                "AND mode = 'defer' AND expires_at > ? ORDER BY created_at, id LIMIT 1",
                (binding, now),
            ).fetchone()
            if row is None:
                return None
            cur.execute(
                "UPDATE approvals SET mode = 'hold', owner = ?, "
                "expires_at = MAX(expires_at, ?) WHERE id = ?",
                (owner, hold_until, row[0]),
            )
            return self._get(row[0])


def _update(cur: sqlite3.Cursor, a: Approval) -> None:
    # The quorum too: a vote cast where approvals.required_approvals is higher raises the
    # approval's own (apply_vote), and every sidecar counts against what is stored.
    cur.execute(
        "UPDATE approvals SET status = ?, votes = ?, decided_at = ?, decided_by = ?, "
        "comment = ?, consumed_at = ?, required = max(required, ?) WHERE id = ?",
        (
            a.status.value,
            _encode_votes(a.votes),
            a.decided_at,
            a.decided_by,
            a.comment,
            a.consumed_at,
            a.required_approvals,
            a.id,
        ),
    )


def to_row(a: Approval) -> tuple[Any, ...]:
    return (
        a.id,
        a.decision_id,
        a.action_id,
        a.agent_id,
        a.tool,
        orjson.dumps(a.arguments).decode(),
        a.arguments_sha256,
        a.binding,
        a.mode,
        a.reason,
        a.risk,
        orjson.dumps(list(a.approvers)).decode(),
        a.required_approvals,
        orjson.dumps(list(a.redacted)).decode(),
        a.status.value,
        a.created_at,
        a.expires_at,
        _encode_votes(a.votes),
        a.decided_at,
        a.decided_by,
        a.comment,
        a.consumed_at,
        a.owner,
        a.upstream,
        a.method,
        " ".join(a.subjects),
        orjson.dumps(a.answers).decode() if a.answers is not None else None,
    )


def from_row(row: Sequence[Any]) -> Approval:
    (
        aid,
        decision_id,
        action_id,
        agent,
        tool,
        arguments,
        args_hash,
        binding,
        mode,
        reason,
        risk,
        approvers,
        required,
        redacted,
        status,
        created_at,
        expires_at,
        votes,
        decided_at,
        decided_by,
        comment,
        consumed_at,
        owner,
        upstream,
        method,
        subjects,
        answers,
    ) = row
    return Approval(
        id=aid,
        decision_id=decision_id,
        action_id=action_id,
        agent_id=agent,
        tool=tool,
        arguments=orjson.loads(arguments),
        arguments_sha256=args_hash,
        binding=binding,
        mode=mode,
        reason=reason,
        risk=risk,
        approvers=tuple(orjson.loads(approvers)),
        required_approvals=int(required),
        redacted=tuple(orjson.loads(redacted)),
        status=ApprovalStatus(status),
        created_at=float(created_at),
        expires_at=float(expires_at),
        votes=tuple(
            Vote(str(s), bool(ok), str(c), float(t)) for s, ok, c, t in orjson.loads(votes)
        ),
        decided_at=None if decided_at is None else float(decided_at),
        decided_by=decided_by,
        comment=comment,
        consumed_at=None if consumed_at is None else float(consumed_at),
        owner=owner,
        upstream=upstream,
        method=method,
        subjects=tuple(str(subjects or "").split()),
        answers=None if answers is None else orjson.loads(answers),
    )


def _encode_votes(votes: Sequence[Vote]) -> str:
    return orjson.dumps([[v.subject, v.approve, v.comment, v.at] for v in votes]).decode()
