"""Session state: counters per session, the calls Warden decided, Responses chains.

* **Counters** (``session_counters``): named integers per session
  (``calls:<tool>``, ``denials``, ``approvals``, ``taint:<label>``), added to
  atomically, so two sidecars sharing the store count together.
* **Decided calls** (``session_calls``): for every tool call Warden decided,
  its call id, decision id, tool, argument digest and effect. A conversation's
  history is checked against it: a prior call with no matching row is one
  Warden never let through (``input.history[i].verified: false``).
* **Responses chains** (``session_responses``): for a Responses API answer
  Warden relayed, its session, the response it continued and the calls it
  carried, so a request naming ``previous_response_id`` gets its history back
  from Warden's own records, not from the agent.

All three are pruned by age (``sessions.ttl_s``). Erasing a data subject
deletes the chain links whose calls' arguments name them
(:func:`chain_names_erased`): a request continuing such an answer then gets
no history from Warden, as if it started the chain. Decided calls keep an
argument digest, not arguments, and counters no arguments at all: they stay. SQLite
(:class:`SessionStore`) and PostgreSQL
(:class:`warden.state.pg_sessions.PgSessionStore`) implement
:class:`SessionRepo`; the contract suite runs against both.
"""

from __future__ import annotations

import functools
import logging
import re
import sqlite3
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, Final, Protocol

import orjson

from warden.state.base import SqliteStore, immediate
from warden.state.repos import ErasedSubjects

__all__ = [
    "ERASED_CALLS",
    "PRUNE_GRACE_S",
    "CallRecord",
    "ChainLink",
    "PruneClock",
    "SessionRepo",
    "SessionStore",
    "chain_names_erased",
    "chain_row",
    "maker_row",
    "merged_entries",
]

log = logging.getLogger("warden.state")

PRUNE_GRACE_S: Final = 3600.0
"""How far past the newest row the store holds the clock may be before a prune counts from
that row instead, plus at most this (or half the retention) (:class:`PruneClock`)."""

MAX_CHAIN: Final = 256
_INSERT_LINK: Final = (
    "INSERT INTO session_responses (response_id, session_id, previous_id, calls, created_at, "
    "agent_id) VALUES (?, ?, ?, ?, ?, ?)"
)
"""How many responses back a ``previous_response_id`` chain is followed."""


@dataclass(frozen=True, slots=True)
class CallRecord:
    """A tool call Warden decided: what a conversation's history is checked against."""

    call_id: str
    decision_id: str
    tool: str
    digest: str
    """SHA-256 of the arguments in canonical JSON (``history.arguments_digest``)."""
    effect: str
    """The decision's enforced effect: ``allow``, ``deny`` or ``require_approval``."""
    session_id: str | None = None
    """Where it was decided: the session's key (agent and session id joined by a unit
    separator), or the agent and separator alone in no session; ``None`` in records from
    before it was kept for those."""
    created_at: float = 0.0


@dataclass(frozen=True, slots=True)
class ChainLink:
    """One Responses API answer Warden relayed, as a chain is rebuilt from it."""

    response_id: str
    session_id: str
    previous_id: str | None
    calls: str
    """The history entries this answer and its request added (JSON text)."""
    agent_id: str | None = None
    """The agent the answer was made for: the only one that may continue, fetch or delete
    it through Warden. ``None`` in links kept before it was recorded."""


class SessionRepo(Protocol):
    """Where session counters, decided calls, Responses chains and MCP session owners
    are kept."""

    async def add(self, session_id: str, deltas: Mapping[str, int]) -> dict[str, int]:
        """Add ``deltas`` to the session's counters atomically; return every counter after."""
        ...

    async def counters(self, session_id: str) -> dict[str, int]:
        """The session's counters by name (none: an empty map)."""
        ...

    async def record_calls(self, records: Sequence[CallRecord]) -> None:
        """Keep decided calls (a row already there is left as it is)."""
        ...

    async def calls(self, call_ids: Sequence[str]) -> dict[str, list[CallRecord]]:
        """The decided calls with these ids (ids are the upstream's: one may have several)."""
        ...

    async def record_response(self, link: ChainLink) -> None:
        """Keep a relayed Responses answer (once: the first record of an id stands, but
        for the agent, which a record that named none takes from this one)."""
        ...

    async def extend_response(self, link: ChainLink) -> None:
        """Merge ``link.calls`` into the link of ``link.response_id`` (a stored answer
        fetched again; :func:`merged_entries`); keep ``link`` as it is when there is none."""
        ...

    async def chain(self, response_id: str, *, limit: int = MAX_CHAIN) -> list[ChainLink]:
        """The chain ending at ``response_id``, newest first, at most ``limit`` long."""
        ...

    async def claim_id(self, scope: str, owned_id: str, agent_id: str) -> str:
        """The agent that owns ``owned_id`` in ``scope``: ``agent_id`` when no agent did
        yet (it is recorded so), else the first claimant. The owner claiming again keeps
        the row from expiring."""
        ...

    async def id_owner(self, scope: str, owned_id: str) -> str | None:
        """The agent that owns ``owned_id`` in ``scope``, if any does."""
        ...

    async def release_id(self, scope: str, owned_id: str) -> None:
        """Forget who owns ``owned_id`` (a session the server ended)."""
        ...

    async def prune(self, older_than_s: float) -> int:
        """Drop counters, calls, chains and owners not touched for ``older_than_s``; how
        many rows."""
        ...

    async def erase(self, erased: ErasedSubjects) -> int:
        """Empty the chain links that name an erased data subject (:func:`chain_names_erased`)
        of their calls and session; how many. The link stays, with the agent it was made
        for: the provider still keeps the answer, and only that agent may fetch it."""
        ...


class PruneClock:
    """Where a prune of shared state counts back from: never later than the store has seen.

    Rows are stamped by the clock of whichever sidecar wrote them, and each sidecar
    prunes by its own. One whose clock runs days ahead (or one forward step) would
    delete what the others use now: budget counters of today's window, session
    counters, the owners of MCP session ids, call links still waiting for a result. So
    a prune counts from the local clock, but never from later than the store's
    present: for rows, once the clock is over :data:`PRUNE_GRACE_S` past the newest
    row it holds, that row plus a grace (an hour, at most half the retention, so the
    cut-off stays before that row); for budget windows, the newest data it holds
    (SQLite) or the database's clock (PostgreSQL). A correct clock under traffic
    prunes as before; a store idle for longer than the grace is pruned once it is
    written to again.

    One per store. It warns once when it holds a prune back (the local clock over
    :data:`PRUNE_GRACE_S` ahead of the database's, a prune that would have emptied
    the table, or a window cut-off past the store's present), and again only after a
    prune it did not.
    """

    __slots__ = ("_holding", "_what")

    def __init__(self, what: str) -> None:
        self._what = what
        self._holding = False

    def cutoff(
        self,
        cutoff: float,
        *,
        local: float,
        newest: float | None,
        store_now: float | None = None,
    ) -> float:
        """``cutoff`` (counted back from ``local``, the local clock), moved back by however
        far ``local`` is past the store's present: ``store_now`` (the database's clock),
        and ``newest`` (the newest stamp stored, ``None`` for none) plus a grace once
        the clock is over :data:`PRUNE_GRACE_S` past it.

        The grace is :data:`PRUNE_GRACE_S`, or half the retention (``local - cutoff``)
        when that is shorter: the cut-off then stays before ``newest``, and a forward
        step deletes at most the older half of what a short ``sessions.ttl_s`` keeps.
        Within :data:`PRUNE_GRACE_S` of ``newest`` the clock is taken as it is: an idle
        store is pruned exactly, emptied if everything in it is older than kept.
        """
        present = local if store_now is None else min(local, store_now)
        why = self._skew(local, store_now)
        if newest is not None and present - newest > PRUNE_GRACE_S:
            present = newest + min(PRUNE_GRACE_S, max(local - cutoff, 0.0) / 2)
            if not why and local - newest > local - cutoff:
                why = (
                    f"its newest row is {local - newest:.0f} s old by the clock here, more "
                    f"than rows are kept ({local - cutoff:.0f} s): the clock here is ahead, "
                    "or nothing was written since"
                )
        self._note(why)
        return cutoff - (local - present)

    def window_cutoffs(
        self,
        before: Mapping[str, str],
        *,
        local: float,
        newest: Iterable[str] = (),
        newest_stamp: float | None = None,
        store_now: float | None = None,
    ) -> dict[str, str]:
        """Budget-window cut-offs (``day`` -> ``day:2026-11-28``), none past the day before
        the store's present day, so that a sidecar whose clock is days ahead keeps the
        windows the fleet counts in now.

        The store's present is the clock here (``local``), but no later than the
        database's (``store_now``) on PostgreSQL, or than the newest data the store
        holds on SQLite: the newest window of any kind (``newest``, one per kind:
        ``hour:2026-11-28T10+0100``, ``month:2026-11``) or the newest row stamp
        (``newest_stamp``). Taken across kinds, not per kind: a kind nothing counts
        in any more (a cap changed from hourly to daily) is pruned like the rest.
        The day before is kept too, for zones behind UTC (windows carry the zone's
        date, stamps are UTC). None at all while the clock here is over the grace
        ahead of the database's: the sidecars whose clocks agree with it prune.
        """
        skew = self._skew(local, store_now)
        if skew:
            self._note(skew)
            return {}
        present = datetime.fromtimestamp(
            local if store_now is None else min(local, store_now), UTC
        ).date()
        origin = "the database's clock" if store_now is not None else "the clock here"
        cause = "the clock here is ahead"
        if store_now is None:
            seen = [d for d in map(_window_day, newest) if d is not None]
            if newest_stamp is not None:
                seen.append(datetime.fromtimestamp(newest_stamp, UTC).date())
            if not seen:
                self._note("")
                return {}  # nothing stored: nothing to delete
            if max(seen) < present:
                present, origin = max(seen), "the newest data stored"
                cause += ", or nothing was written since"
        keep = present - timedelta(days=1)
        out: dict[str, str] = {}
        held: list[str] = []
        for kind, key in before.items():
            bound = f"month:{keep:%Y-%m}" if kind == "month" else f"{kind}:{keep:%Y-%m-%d}"
            out[kind] = min(key, bound)
            if key > bound:
                held.append(key)
        why = ""
        if held:
            why = (
                f"the cut-off {min(held)} is past the day before the store's present, "
                f"{present} ({origin}): {cause}"
            )
        self._note(why)
        return out

    @staticmethod
    def _skew(local: float, store_now: float | None) -> str:
        if store_now is None or local - store_now <= PRUNE_GRACE_S:
            return ""
        return f"the clock here is {local - store_now:.0f} s ahead of the database's"

    def _note(self, why: str) -> None:
        if why and not self._holding:
            log.warning("pruning %s no further than the store has seen: %s", self._what, why)
        self._holding = bool(why)


_WINDOW_DAY: Final = re.compile(r"[a-z]+:(\d{4})-(\d{2})(?:-(\d{2}))?")


def _window_day(window: str) -> date | None:
    """The (first) day of a budget window's key, in its zone; ``None`` for no such key."""
    found = _WINDOW_DAY.match(window)
    if found is None:
        return None
    year, month, day = found.groups()
    try:
        return date(int(year), int(month), int(day or 1))
    except ValueError:
        return None


ERASED_CALLS: Final = '[{"approval_requests_cut": true}]'
"""The entries of a link an erasure emptied: nothing of the subject, and a mark that the
approval request copies it held are gone (an approval continuing it is refused)."""


def maker_row(link: ChainLink, calls: object, session_id: object) -> tuple[Any, ...]:
    """The values a maker's record sets on a link a fetch made first (agent, session,
    previous answer, calls merged); an erased link keeps its emptied calls and session."""
    if session_id == "":
        return (link.agent_id, "", link.previous_id, str(calls), link.response_id)
    merged = merged_entries(link.calls, str(calls))
    return (link.agent_id, link.session_id, link.previous_id, merged, link.response_id)


def merged_entries(kept: str, added: str) -> str:
    """``kept``'s entries (JSON list text) with ``added``'s put in: one entry per call id
    and kind (a call, its result, the refusal the agent saw instead), the newest winning.

    A stored answer fetched again is decided again, and a refusal names its
    decision: the link keeps the latest, and does not grow with each fetch.
    """
    try:
        entries = orjson.loads(kept)
    except orjson.JSONDecodeError:
        return added  # an unreadable link is no use to any chain: the new entries stand
    try:
        more = orjson.loads(added)
    except orjson.JSONDecodeError:
        return kept
    if not isinstance(entries, list):
        return added
    if not isinstance(more, list):
        return kept
    where = {_entry_key(e): i for i, e in enumerate(entries)}
    for entry in more:
        key = _entry_key(entry)
        if key in where:
            entries[where[key]] = entry
        else:
            where[key] = len(entries)
            entries.append(entry)
    return orjson.dumps(entries).decode()


def _entry_key(entry: object) -> tuple[str, str]:
    if not isinstance(entry, dict) or not isinstance(entry.get("call_id"), str):
        # Not an entry any chain replays: kept once, by its content.
        return "", orjson.dumps(entry, option=orjson.OPT_SORT_KEYS).decode()
    kind = "refused" if "refused" in entry else "call" if "tool" in entry else "result"
    return entry["call_id"], kind


def chain_names_erased(erased: ErasedSubjects, calls: str) -> bool:
    """Whether a chain link's entries (:attr:`ChainLink.calls`) name an erased data subject.

    Entries keep a call's arguments (parsed, or the raw text), never the
    request's context or the agent's claims: only ``action.arguments.<path>``
    sources can match. Unreadable entries are erased too (no chain uses them).
    """
    try:
        entries = orjson.loads(calls)
    except orjson.JSONDecodeError:
        return True
    for entry in entries if isinstance(entries, list) else ():
        if not isinstance(entry, dict):
            continue
        arguments = entry.get("arguments")
        raw = entry.get("raw")
        if arguments is None and isinstance(raw, str) and raw:
            try:
                arguments = orjson.loads(raw)
            except orjson.JSONDecodeError:
                continue
        if isinstance(arguments, dict) and erased.names(arguments=arguments):
            return True
    return False


_SELECT_CALLS: Final = (
    "SELECT call_id, decision_id, tool, digest, effect, session_id, created_at "
    "FROM session_calls WHERE call_id IN (?) ORDER BY created_at"
)


def chain_row(link: ChainLink) -> tuple[Any, ...]:
    """A chain link's columns in insert order (``created_at`` now)."""
    return (
        link.response_id,
        link.session_id,
        link.previous_id,
        link.calls,
        time.time(),
        link.agent_id,
    )


_NEWEST_SESSION_ROW: Final = (
    "SELECT max(t) FROM (SELECT max(updated_at) AS t FROM session_counters "
    "UNION ALL SELECT max(created_at) FROM session_calls "
    "UNION ALL SELECT max(created_at) FROM session_responses "
    "UNION ALL SELECT max(used_at) FROM id_owners)"
)
"""The newest stamp in any session table (each indexed): a prune counts from no later."""


class SessionStore(SqliteStore):
    """:class:`SessionRepo` in the SQLite state database."""

    NAME = "sessions"

    def __init__(self, path: Path, conn: sqlite3.Connection, io: ThreadPoolExecutor) -> None:
        super().__init__(path, conn, io)
        self._prune_clock = PruneClock("session state")

    async def add(self, session_id: str, deltas: Mapping[str, int]) -> dict[str, int]:
        """Add ``deltas`` to the session's counters atomically; return every counter after."""
        return await self._run(self._add, session_id, dict(deltas))

    def _add(self, session_id: str, deltas: dict[str, int]) -> dict[str, int]:
        now = time.time()
        with immediate(self._conn) as cur:
            for name, delta in sorted(deltas.items()):
                cur.execute(
                    "INSERT INTO session_counters (session_id, name, value, updated_at) "
                    "VALUES (?, ?, ?, ?) ON CONFLICT (session_id, name) DO UPDATE "
                    "SET value = value + excluded.value, updated_at = excluded.updated_at",
                    (session_id, name, int(delta), now),
                )
            rows = cur.execute(
                "SELECT name, value FROM session_counters WHERE session_id = ?", (session_id,)
            ).fetchall()
        return {str(n): int(v) for n, v in rows}

    async def counters(self, session_id: str) -> dict[str, int]:
        """The session's counters by name (none: an empty map)."""
        return await self._read(functools.partial(_counters, session_id=session_id))

    async def record_calls(self, records: Sequence[CallRecord]) -> None:
        """Keep decided calls (a row already there is left as it is)."""
        if records:
            await self._run(self._record_calls, tuple(records))

    def _record_calls(self, records: tuple[CallRecord, ...]) -> None:
        with immediate(self._conn) as cur:
            cur.executemany(
                "INSERT OR IGNORE INTO session_calls (call_id, decision_id, tool, digest, "
                "effect, session_id, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
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
                ],
            )

    async def calls(self, call_ids: Sequence[str]) -> dict[str, list[CallRecord]]:
        """The decided calls with these ids (ids are the upstream's: one may have several)."""
        ids = list(dict.fromkeys(call_ids))
        if not ids:
            return {}
        return await self._run(self._calls, ids)

    def _calls(self, ids: list[str]) -> dict[str, list[CallRecord]]:
        out: dict[str, list[CallRecord]] = {}
        for start in range(0, len(ids), 500):  # SQLite's bound on parameters
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            query = _SELECT_CALLS.replace("(?)", f"({marks})")
            rows = self._conn.execute(
                query,
                chunk,
            ).fetchall()
            for row in rows:
                out.setdefault(row[0], []).append(CallRecord(*row))
        return out

    async def record_response(self, link: ChainLink) -> None:
        """Keep a relayed Responses answer (once: the first record of an id stands; but a
        record a fetch made, which names no agent, takes this one's agent, session and
        previous answer, and keeps its calls beside this one's: :func:`merged_entries`)."""
        await self._run(self._record_response, link)

    def _record_response(self, link: ChainLink) -> None:
        with immediate(self._conn) as cur:
            row = cur.execute(
                "SELECT agent_id, calls, session_id FROM session_responses WHERE response_id = ?",
                (link.response_id,),
            ).fetchone()
            if row is None:
                cur.execute(
                    _INSERT_LINK,
                    chain_row(link),
                )
            elif row[0] is None and link.agent_id is not None:
                cur.execute(
                    "UPDATE session_responses SET agent_id = ?, session_id = ?, "
                    "previous_id = ?, calls = ? WHERE response_id = ?",
                    maker_row(link, row[1], row[2]),
                )

    async def extend_response(self, link: ChainLink) -> None:
        """Merge ``link.calls`` into the link of ``link.response_id`` (a stored answer
        fetched again; :func:`merged_entries`); keep ``link`` as it is when there is none."""
        await self._run(self._extend_response, link)

    def _extend_response(self, link: ChainLink) -> None:
        with immediate(self._conn) as cur:
            row = cur.execute(
                "SELECT calls FROM session_responses WHERE response_id = ?", (link.response_id,)
            ).fetchone()
            if row is None:
                cur.execute(
                    _INSERT_LINK,
                    chain_row(link),
                )
                return
            merged = merged_entries(row[0], link.calls)
            if merged != row[0]:
                cur.execute(
                    "UPDATE session_responses SET calls = ?, created_at = ? WHERE response_id = ?",
                    (merged, time.time(), link.response_id),
                )

    async def chain(self, response_id: str, *, limit: int = MAX_CHAIN) -> list[ChainLink]:
        """The chain ending at ``response_id``, newest first, at most ``limit`` long."""
        return await self._run(self._chain, response_id, limit)

    def _chain(self, response_id: str, limit: int) -> list[ChainLink]:
        out: list[ChainLink] = []
        seen: set[str] = set()
        current: str | None = response_id
        while current is not None and current not in seen and len(out) < limit:
            seen.add(current)
            row = self._conn.execute(
                "SELECT response_id, session_id, previous_id, calls, agent_id "
                "FROM session_responses WHERE response_id = ?",
                (current,),
            ).fetchone()
            if row is None:
                break
            out.append(ChainLink(*row))
            current = row[2]
        return out

    async def claim_id(self, scope: str, owned_id: str, agent_id: str) -> str:
        """The agent that owns ``owned_id`` in ``scope``: ``agent_id`` when no agent did
        yet (it is recorded so), else the first claimant. The owner claiming again keeps
        the row from expiring."""
        return await self._run(self._claim_id, scope, owned_id, agent_id)

    def _claim_id(self, scope: str, owned_id: str, agent_id: str) -> str:
        with immediate(self._conn) as cur:
            # A claim by the owner again is a use: it keeps the row from expiring.
            cur.execute(
                "INSERT INTO id_owners (scope, id, agent_id, used_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (scope, id) DO UPDATE SET used_at = excluded.used_at "
                "WHERE id_owners.agent_id = excluded.agent_id",
                (scope, owned_id, agent_id, time.time()),
            )
            row = cur.execute(
                "SELECT agent_id FROM id_owners WHERE scope = ? AND id = ?",
                (scope, owned_id),
            ).fetchone()
        return str(row[0])

    async def id_owner(self, scope: str, owned_id: str) -> str | None:
        """The agent that owns ``owned_id`` in ``scope``, if any does."""
        return await self._run(self._id_owner, scope, owned_id)

    def _id_owner(self, scope: str, owned_id: str) -> str | None:
        row = self._conn.execute(
            "SELECT agent_id FROM id_owners WHERE scope = ? AND id = ?",
            (scope, owned_id),
        ).fetchone()
        return str(row[0]) if row is not None else None

    async def release_id(self, scope: str, owned_id: str) -> None:
        """Forget who owns ``owned_id`` (a session the server ended)."""
        await self._run(self._release_id, scope, owned_id)

    def _release_id(self, scope: str, owned_id: str) -> None:
        with immediate(self._conn) as cur:
            cur.execute(
                "DELETE FROM id_owners WHERE scope = ? AND id = ?",
                (scope, owned_id),
            )

    async def prune(self, older_than_s: float) -> int:
        """Drop counters, calls, chains and owners not touched for ``older_than_s``; how
        many rows. Counted from no later than the store has seen (:class:`PruneClock`)."""
        return await self._run(self._prune, time.time(), older_than_s)

    async def erase(self, erased: ErasedSubjects) -> int:
        """Empty the chain links that name an erased data subject; how many (see
        :meth:`SessionRepo.erase`)."""
        return await self._run(self._erase, erased)

    def _erase(self, erased: ErasedSubjects) -> int:
        with immediate(self._conn) as cur:
            rows = self._conn.execute("SELECT response_id, calls FROM session_responses")
            gone = [(r,) for r, calls in rows if chain_names_erased(erased, calls)]
            # The link keeps its id, previous answer and agent: nothing of the subject. Its
            # approval request copies go too, so the mark says none can be relied on.
            cur.executemany(
                "UPDATE session_responses SET calls = ?, session_id = '' WHERE response_id = ?",
                [(ERASED_CALLS, r) for (r,) in gone],
            )
        return len(gone)

    def _prune(self, now: float, older_than_s: float) -> int:
        with immediate(self._conn) as cur:
            (newest,) = cur.execute(_NEWEST_SESSION_ROW).fetchone()
            cutoff = self._prune_clock.cutoff(now - older_than_s, local=now, newest=newest)
            total = 0
            for table, column in (
                ("session_counters", "updated_at"),
                ("session_calls", "created_at"),
                ("session_responses", "created_at"),
                ("id_owners", "used_at"),
            ):
                cur.execute(f"DELETE FROM {table} WHERE {column} < ?", (cutoff,))  # noqa: S608
                total += cur.rowcount
            return total


def _counters(conn: sqlite3.Connection, session_id: str) -> dict[str, int]:
    rows = conn.execute(
        "SELECT name, value FROM session_counters WHERE session_id = ?", (session_id,)
    ).fetchall()
    return {str(n): int(v) for n, v in rows}
