"""Session state on PostgreSQL (:class:`~warden.state.sessions.SessionRepo`), shared by a fleet.

Counters are added to with one ``INSERT ... ON CONFLICT DO UPDATE`` per name,
in name order inside one transaction, so concurrent sidecars never lose an
increment and never deadlock. Decided calls and chain links are insert-only.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

from psycopg import AsyncCursor

from warden.state.postgres import PgDatabase
from warden.state.repos import ErasedSubjects
from warden.state.sessions import (
    ERASED_CALLS,
    MAX_CHAIN,
    CallRecord,
    ChainLink,
    PruneClock,
    chain_names_erased,
    chain_row,
    maker_row,
    merged_entries,
)

__all__ = ["PgSessionStore"]

# A link's first record: a later one for the same answer updates it, or leaves it.
_INSERT_LINK = (
    "INSERT INTO session_responses (response_id, session_id, previous_id, calls, created_at, "
    "agent_id) VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (response_id) DO NOTHING"
)

_NEWEST_SESSION_ROW = (
    "SELECT extract(epoch FROM now())::float8, greatest("
    "(SELECT max(updated_at) FROM session_counters), "
    "(SELECT max(created_at) FROM session_calls), "
    "(SELECT max(created_at) FROM session_responses), "
    "(SELECT max(used_at) FROM id_owners))"
)
"""The database's clock, and the newest stamp in any session table (each indexed)."""


class PgSessionStore:
    """Session counters, decided calls and Responses chains in PostgreSQL."""

    def __init__(self, db: PgDatabase) -> None:
        self._db = db
        self._prune_clock = PruneClock("session state")

    async def close(self) -> None:
        """Nothing of its own to close: the pool belongs to the backend."""

    async def add(self, session_id: str, deltas: Mapping[str, int]) -> dict[str, int]:
        """Add ``deltas`` to the session's counters atomically; return every counter after."""
        items = sorted((str(k), int(v)) for k, v in deltas.items())

        async def run(cur: AsyncCursor[Any]) -> dict[str, int]:
            now = time.time()
            for name, delta in items:
                await cur.execute(
                    "INSERT INTO session_counters (session_id, name, value, updated_at) "
                    "VALUES (%s, %s, %s, %s) ON CONFLICT (session_id, name) DO UPDATE "
                    "SET value = session_counters.value + excluded.value, "
                    "updated_at = excluded.updated_at",
                    (session_id, name, delta, now),
                )
            await cur.execute(
                "SELECT name, value FROM session_counters WHERE session_id = %s", (session_id,)
            )
            return {str(n): int(v) for n, v in await cur.fetchall()}

        return await self._db.tx(run)

    async def counters(self, session_id: str) -> dict[str, int]:
        """The session's counters by name (none: an empty map)."""
        rows = await self._db.read(
            "SELECT name, value FROM session_counters WHERE session_id = %s", (session_id,)
        )
        return {str(n): int(v) for n, v in rows}

    async def record_calls(self, records: Sequence[CallRecord]) -> None:
        """Keep decided calls (a row already there is left as it is)."""
        rows = [
            (
                r.call_id,
                r.decision_id,
                r.tool,
                r.digest,
                r.effect,
                r.session_id,
                r.created_at or time.time(),
            )
            for r in records
        ]
        if not rows:
            return

        async def run(cur: AsyncCursor[Any]) -> None:
            await cur.executemany(
                "INSERT INTO session_calls (call_id, decision_id, tool, digest, effect, "
                "session_id, created_at) VALUES (%s, %s, %s, %s, %s, %s, %s) "
                "ON CONFLICT (call_id, decision_id) DO NOTHING",
                rows,
            )

        await self._db.tx(run)

    async def calls(self, call_ids: Sequence[str]) -> dict[str, list[CallRecord]]:
        """The decided calls with these ids (ids are the upstream's: one may have several)."""
        ids = list(dict.fromkeys(call_ids))
        if not ids:
            return {}
        rows = await self._db.read(
            "SELECT call_id, decision_id, tool, digest, effect, session_id, created_at "
            "FROM session_calls WHERE call_id = ANY(%s) ORDER BY created_at",
            (ids,),
        )
        out: dict[str, list[CallRecord]] = {}
        for row in rows:
            out.setdefault(row[0], []).append(CallRecord(*row))
        return out

    async def record_response(self, link: ChainLink) -> None:
        """Keep a relayed Responses answer (once: the first record of an id stands; but a
        record a fetch made, which names no agent, takes this one's agent, session and
        previous answer, and keeps its calls beside this one's: :func:`merged_entries`)."""

        async def run(cur: AsyncCursor[Any]) -> None:
            await cur.execute(
                _INSERT_LINK,
                chain_row(link),
            )
            if cur.rowcount == 1 or link.agent_id is None:
                return
            await cur.execute(
                "SELECT agent_id, calls, session_id FROM session_responses "
                "WHERE response_id = %s FOR UPDATE",
                (link.response_id,),
            )
            row = await cur.fetchone()
            if row is None or row[0] is not None:
                return  # pruned meanwhile, or its maker's record stands
            await cur.execute(
                "UPDATE session_responses SET agent_id = %s, session_id = %s, "
                "previous_id = %s, calls = %s WHERE response_id = %s",
                maker_row(link, row[1], row[2]),
            )

        await self._db.tx(run)

    async def extend_response(self, link: ChainLink) -> None:
        """Merge ``link.calls`` into the link of ``link.response_id`` (a stored answer
        fetched again; :func:`merged_entries`); keep ``link`` as it is when there is none."""

        async def run(cur: AsyncCursor[Any]) -> None:
            await cur.execute(
                _INSERT_LINK,
                chain_row(link),
            )
            if cur.rowcount == 1:
                return
            await cur.execute(
                "SELECT calls FROM session_responses WHERE response_id = %s FOR UPDATE",
                (link.response_id,),
            )
            row = await cur.fetchone()
            if row is None:  # pruned meanwhile
                return
            merged = merged_entries(row[0], link.calls)
            if merged != row[0]:
                await cur.execute(
                    "UPDATE session_responses SET calls = %s, created_at = %s "
                    "WHERE response_id = %s",
                    (merged, time.time(), link.response_id),
                )

        await self._db.tx(run)

    async def chain(self, response_id: str, *, limit: int = MAX_CHAIN) -> list[ChainLink]:
        """The chain ending at ``response_id``, newest first, at most ``limit`` long."""
        rows = await self._db.read(
            "WITH RECURSIVE chain (response_id, session_id, previous_id, calls, agent_id, depth)"
            " AS ("
            " SELECT response_id, session_id, previous_id, calls, agent_id, 1"
            " FROM session_responses WHERE response_id = %s"
            " UNION ALL"
            " SELECT r.response_id, r.session_id, r.previous_id, r.calls, r.agent_id, c.depth + 1"
            " FROM session_responses r JOIN chain c ON r.response_id = c.previous_id"
            " WHERE c.depth < %s"
            ") SELECT response_id, session_id, previous_id, calls, agent_id"
            " FROM chain ORDER BY depth",
            (response_id, limit),
        )
        return [ChainLink(*row) for row in rows]

    async def claim_id(self, scope: str, owned_id: str, agent_id: str) -> str:
        """The agent that owns ``owned_id`` in ``scope``: ``agent_id`` when no agent did
        yet (it is recorded so), else the first claimant. The owner claiming again keeps
        the row from expiring."""

        async def run(cur: AsyncCursor[Any]) -> str:
            # Always DO UPDATE, so RETURNING gives the row that stands; a claim by the
            # owner again is a use, which keeps the row from expiring.
            await cur.execute(
                "INSERT INTO id_owners (scope, id, agent_id, used_at) "
                "VALUES (%s, %s, %s, %s) ON CONFLICT (scope, id) DO UPDATE SET used_at = "
                "CASE WHEN id_owners.agent_id = excluded.agent_id THEN excluded.used_at "
                "ELSE id_owners.used_at END RETURNING agent_id",
                (scope, owned_id, agent_id, time.time()),
            )
            row = await cur.fetchone()
            assert row is not None
            return str(row[0])

        return await self._db.tx(run)

    async def id_owner(self, scope: str, owned_id: str) -> str | None:
        """The agent that owns ``owned_id`` in ``scope``, if any does."""
        rows = await self._db.read(
            "SELECT agent_id FROM id_owners WHERE scope = %s AND id = %s",
            (scope, owned_id),
        )
        return str(rows[0][0]) if rows else None

    async def release_id(self, scope: str, owned_id: str) -> None:
        """Forget who owns ``owned_id`` (a session the server ended)."""

        async def run(cur: AsyncCursor[Any]) -> None:
            await cur.execute(
                "DELETE FROM id_owners WHERE scope = %s AND id = %s",
                (scope, owned_id),
            )

        await self._db.tx(run)

    async def prune(self, older_than_s: float) -> int:
        """Drop counters, calls, chains and owners not touched for ``older_than_s``; how
        many rows. Counted from no later than the store has seen, nor than the database's
        clock (:class:`~warden.state.sessions.PruneClock`)."""
        now = time.time()

        async def run(cur: AsyncCursor[Any]) -> int:
            await cur.execute(_NEWEST_SESSION_ROW)
            row = await cur.fetchone()
            assert row is not None
            cutoff = self._prune_clock.cutoff(
                now - older_than_s, local=now, newest=row[1], store_now=row[0]
            )
            total = 0
            for statement in (
                "DELETE FROM session_counters WHERE updated_at < %s",
                "DELETE FROM session_calls WHERE created_at < %s",
                "DELETE FROM session_responses WHERE created_at < %s",
                "DELETE FROM id_owners WHERE used_at < %s",
            ):
                await cur.execute(statement, (cutoff,))
                total += cur.rowcount
            return total

        return await self._db.tx(run, slow=True)  # whatever aged out: background upkeep

    async def erase(self, erased: ErasedSubjects) -> int:
        """Empty the chain links that name an erased data subject; how many (see
        :meth:`~warden.state.sessions.SessionRepo.erase`)."""
        # A page at a time (:meth:`PgDatabase.scan`): a week of chains may be large.
        gone = await self._db.scan(
            "SELECT response_id, calls FROM session_responses WHERE response_id > %s "
            "ORDER BY response_id LIMIT %s",
            partial(_named_erased, erased),
        )
        if not gone:
            return 0

        async def run(cur: AsyncCursor[Any]) -> int:
            await cur.execute(
                "UPDATE session_responses SET calls = %s, session_id = '' "
                "WHERE response_id = ANY(%s)",
                (ERASED_CALLS, gone),
            )
            return int(cur.rowcount)

        return await self._db.tx(run, slow=True)


def _named_erased(erased: ErasedSubjects, rows: Sequence[tuple[Any, ...]]) -> list[str]:
    """The response ids of the chain links among ``rows`` that name an erased subject."""
    return [str(r) for r, calls in rows if chain_names_erased(erased, calls)]
