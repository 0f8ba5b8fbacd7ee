"""Call links: which decision let a tool call through, kept until its result comes back.

When a model proposes a call and Warden allows it, the agent later sends the
call's result back (by the upstream's call id) in another request, possibly
to a Warden that restarted meanwhile. :class:`CallLinks` remembers each
allowed call's :class:`~warden.model.Action` and decision id by call id, so
the result is recorded as that decision's outcome, once.

Call ids are the upstream's choice: an id seen twice while a call with it
still waits (in one response, or across responses, or across a restart) is
a *tombstone*, linked to no decision, until it ages out. An id whose result
was recorded is free again.

Hot path: :meth:`CallLinks.link` and :meth:`CallLinks.take` touch memory
only. Writes go to SQLite (:class:`CallLinkStore`, table ``call_links``) from
one background task, batched: a batch starts :data:`COALESCE_S` after the
first link queued for it, and whatever queued by then (or while the previous
batch was written) goes in one transaction, so busy sidecars write dozens of
links per transaction, not one. The window in which a link is not yet
durable is that delay plus one batch (about 25 ms after the decision); a
crash in it loses the link, and the result is then recorded as no decision's
outcome, which is what happened to every link before it was stored. A
graceful stop flushes first. A result whose id is not in memory (after a
restart) is looked up in SQLite off the response path.

The table holds the action as the pipeline saw it (arguments and context
included, like the approvals table) and is bounded by age
(:data:`LINK_TTL_S`) and size (:data:`MAX_LINKS`). Erasing a data subject
(:meth:`CallLinks.erase`) deletes their links, in memory and stored: the
result of such a call is then linked to no decision, so it is not recorded
(the budget it reserved is settled at its held amount when the reservation
expires).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

import orjson

from warden import tasks
from warden.model import Action, ActionKind, Agent, RequestMeta, Stage
from warden.state.base import SqliteStore, immediate
from warden.state.repos import ErasedSubjects
from warden.state.sessions import PruneClock

__all__ = [
    "COALESCE_S",
    "LINK_TTL_S",
    "MAX_LINKS",
    "CallLinkStore",
    "CallLinks",
    "Link",
    "LinkOp",
    "LinkRepo",
    "decode_action",
    "encode_action",
    "names_erased",
]

log = logging.getLogger("warden.state.links")

LINK_TTL_S: Final = 24 * 3600.0
"""How long an unanswered call stays linked (and a tombstone stays)."""
MAX_LINKS: Final = 100_000
"""How many links (and tombstones) are kept, in memory and on disk; the oldest go first."""
MAX_CALL_ID_CHARS: Final = 256
"""Longer ids are nobody's call (providers' ids are tens of characters): never linked or kept."""
_PRUNE_EVERY_S: Final = 60.0
COALESCE_S: Final = 0.02
"""How long a batch of link writes waits for more links to share its transaction."""


@dataclass(frozen=True, slots=True)
class Link:
    """An allowed call: the action as decided and the decision that let it through."""

    action: Action
    decision_id: str


_TOMBSTONE: Final = "tombstone"  # an id seen twice: linked to nothing
_TAKEN: Final = "taken"  # its result was recorded (or it is known to be unlinked)

_Entry = tuple[Link | str, float]  # (link or marker, created_at)


@dataclass(frozen=True, slots=True)
class _Op:
    kind: str  # "put" | "tomb" | "drop"
    call_id: str
    link: Link | None = None
    at: float = 0.0


LinkOp = _Op
"""One queued change to the links table: ``put``, ``tomb`` or ``drop``."""


class LinkRepo(Protocol):
    """Where call links are kept beyond memory (SQLite or PostgreSQL)."""

    async def apply(
        self, ops: Sequence[LinkOp], *, prune_before: float | None, keep: int = MAX_LINKS
    ) -> list[str]:
        """Write a batch in one transaction; return ids that became tombstones on disk.

        A ``put`` over a row already there makes a tombstone instead. Links older
        than ``prune_before`` (by this machine's clock) go, and the oldest past
        ``keep``; the store moves ``prune_before`` back when this clock is ahead of
        what it has seen (:class:`~warden.state.sessions.PruneClock`).
        """
        ...

    async def take(
        self, call_ids: Sequence[str], *, newer_than: float
    ) -> tuple[dict[str, Link], set[str]]:
        """Remove and return the links of ``call_ids``; also say which are tombstones."""
        ...

    async def count(self) -> int:
        """How many rows (links and tombstones) the table holds."""
        ...

    async def erase(self, erased: ErasedSubjects) -> list[str]:
        """Delete the links whose action names an erased data subject; return their call ids."""
        ...


class CallLinkStore(SqliteStore):
    """The ``call_links`` table in the state database."""

    NAME = "links"

    def __init__(self, path: Path, conn: sqlite3.Connection, io: ThreadPoolExecutor) -> None:
        super().__init__(path, conn, io)
        self._prune_clock = PruneClock("call links")

    async def apply(
        self, ops: Sequence[_Op], *, prune_before: float | None, keep: int = MAX_LINKS
    ) -> list[str]:
        """Write a batch in one transaction; return ids that became tombstones on disk.

        A ``put`` over a row already there (a link this process no longer
        remembers, or one from before a restart) makes a tombstone instead.
        ``prune_before`` is moved back as far as this machine's clock is past the
        newest link stored before the batch, less an hour (:class:`PruneClock`).
        """
        return await self._run(self._apply, tuple(ops), prune_before, keep)

    def _apply(self, ops: tuple[_Op, ...], prune_before: float | None, keep: int) -> list[str]:
        clashed: list[str] = []
        with immediate(self._conn) as cur:
            if prune_before is not None:
                # Before the batch goes in: its own stamps say nothing of the others' clocks.
                (newest,) = cur.execute("SELECT max(created_at) FROM call_links").fetchone()
                now = time.time()
                prune_before = self._prune_clock.cutoff(prune_before, local=now, newest=newest)
            for op in ops:
                if op.kind == "drop":
                    cur.execute(
                        "DELETE FROM call_links WHERE call_id = ? AND decision_id IS NOT NULL",
                        (op.call_id,),
                    )
                    continue
                found = cur.execute(
                    "SELECT 1 FROM call_links WHERE call_id = ?", (op.call_id,)
                ).fetchone()
                if op.kind == "put" and found is None and op.link is not None:
                    cur.execute(
                        "INSERT INTO call_links (call_id, decision_id, action, created_at) "
                        "VALUES (?, ?, ?, ?)",
                        (op.call_id, op.link.decision_id, encode_action(op.link.action), op.at),
                    )
                    continue
                if op.kind == "put":
                    clashed.append(op.call_id)
                cur.execute(
                    "INSERT INTO call_links (call_id, decision_id, action, created_at) "
                    "VALUES (?, NULL, NULL, ?) ON CONFLICT (call_id) DO UPDATE "
                    "SET decision_id = NULL, action = NULL, created_at = excluded.created_at",
                    (op.call_id, op.at),
                )
            if prune_before is not None:
                cur.execute("DELETE FROM call_links WHERE created_at < ?", (prune_before,))
                cur.execute(
                    "DELETE FROM call_links WHERE call_id IN (SELECT call_id FROM call_links "
                    "ORDER BY created_at DESC LIMIT -1 OFFSET ?)",
                    (keep,),
                )
        return clashed

    async def take(
        self, call_ids: Sequence[str], *, newer_than: float
    ) -> tuple[dict[str, Link], set[str]]:
        """Remove and return the links of ``call_ids``; also say which are tombstones."""
        return await self._run(self._take, tuple(call_ids), newer_than)

    def _take(
        self, call_ids: tuple[str, ...], newer_than: float
    ) -> tuple[dict[str, Link], set[str]]:
        links: dict[str, Link] = {}
        tombs: set[str] = set()
        with immediate(self._conn) as cur:
            for call_id in call_ids:
                row = cur.execute(
                    "SELECT decision_id, action FROM call_links "
                    "WHERE call_id = ? AND created_at >= ?",
                    (call_id, newer_than),
                ).fetchone()
                if row is None:
                    continue
                if row[0] is None:
                    tombs.add(call_id)
                    continue
                cur.execute("DELETE FROM call_links WHERE call_id = ?", (call_id,))
                try:
                    links[call_id] = Link(decode_action(row[1]), row[0])
                except (ValueError, KeyError, TypeError):
                    log.warning("call link %r is unreadable; its result is not linked", call_id)
        return links, tombs

    async def count(self) -> int:
        """How many rows (links and tombstones) the table holds."""
        return await self._run(self._count)

    def _count(self) -> int:
        return int(self._conn.execute("SELECT count(*) FROM call_links").fetchone()[0])

    async def erase(self, erased: ErasedSubjects) -> list[str]:
        """Delete the links whose action names an erased data subject; return their call ids."""
        return await self._run(self._erase, erased)

    def _erase(self, erased: ErasedSubjects) -> list[str]:
        with immediate(self._conn) as cur:
            rows = self._conn.execute(
                "SELECT call_id, action FROM call_links WHERE action IS NOT NULL"
            )
            gone = [call_id for call_id, action in rows if names_erased(erased, action)]
            cur.executemany("DELETE FROM call_links WHERE call_id = ?", [(c,) for c in gone])
        return gone


class CallLinks:
    """Links from call ids to decisions: memory first, the store behind (write-behind, batched)."""

    def __init__(
        self,
        store: LinkRepo | None,
        *,
        ttl_s: float = LINK_TTL_S,
        max_links: int = MAX_LINKS,
        clock: Any = time.time,
    ) -> None:
        self._store = store
        self._ttl = ttl_s
        self._max = max_links
        self._clock = clock
        self._memory: OrderedDict[str, _Entry] = OrderedDict()
        self._queue: list[_Op] = []
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._writing = asyncio.Lock()
        """Held for each batch's transaction: a batch is never cancelled halfway (below)."""
        self._pruned = 0.0
        self._closed = False

    def start(self) -> None:
        """Start the background writer (nothing to do without a store)."""
        if self._store is not None and self._writer is None:
            self._writer = tasks.spawn(self._write_loop(), name="call-links")

    def waiting(self, call_id: str) -> bool:
        """True when ``call_id`` is linked, or a tombstone, in memory."""
        entry = self._live(call_id, self._clock())
        return entry is not None and entry[0] != _TAKEN

    def link(self, call_id: str, link: Link) -> None:
        """Remember an allowed call until its result comes back."""
        if len(call_id) > MAX_CALL_ID_CHARS:
            return  # its result cannot be told from a forged one: not linked
        now = self._clock()
        self._put(call_id, (link, now))
        self._queue_op(_Op("put", call_id, link, at=now))

    def tombstone(self, call_id: str) -> bool:
        """Make ``call_id`` link to nothing; ``True`` if it dropped a link."""
        now = self._clock()
        entry = self._live(call_id, now)
        self._put(call_id, (_TOMBSTONE, now))
        self._queue_op(_Op("tomb", call_id, at=now))
        return entry is not None and isinstance(entry[0], Link)

    def take(
        self, call_ids: Iterable[str], *, agent: str | None = None
    ) -> tuple[dict[str, Link], list[str]]:
        """Remove and return the links of returned results, memory only.

        ``agent``: only links of that agent's calls are taken; another's stay.
        Also returns the ids memory knows nothing of: with a store, ask
        :meth:`take_stored` for them (off the response path).
        """
        now = self._clock()
        links: dict[str, Link] = {}
        unknown: dict[str, None] = {}  # ordered, and a set: an agent sends any number of ids
        for call_id in call_ids:
            if len(call_id) > MAX_CALL_ID_CHARS:
                continue  # never linked; not kept in memory either
            entry = self._live(call_id, now)
            if entry is None:
                if self._store is not None and call_id.isprintable():  # else never stored
                    unknown[call_id] = None
                continue
            value, at = entry
            if isinstance(value, Link) and (agent is None or value.action.agent.id == agent):
                self._memory[call_id] = (_TAKEN, at)
                self._queue_op(_Op("drop", call_id))
                links[call_id] = value
        return links, list(unknown)

    async def take_stored(self, call_ids: Sequence[str]) -> dict[str, Link]:
        """Links of results this process does not remember (after a restart), removed."""
        if self._store is None or not call_ids:
            return {}
        now = self._clock()
        links, tombs = await self._store.take(call_ids, newer_than=now - self._ttl)
        for call_id in call_ids:
            # Known from now on: a resent result does not ask the store again.
            if call_id not in self._memory:
                self._put(call_id, (_TOMBSTONE if call_id in tombs else _TAKEN, now))
        return links

    async def erase(self, erased: ErasedSubjects) -> int:
        """Forget every link whose action names an erased data subject; how many.

        Memory, the links still queued for the store, and the store. Between
        batches, so a batch in flight cannot write one back. A result for such
        a call is then linked to no decision, as after :meth:`take`.
        """
        async with self._writing:
            held = {k: v for k, (v, _) in self._memory.items() if isinstance(v, Link)}
            # Matching hashes what each action names: up to MAX_LINKS, not on the event loop.
            named = await asyncio.to_thread(
                lambda: [
                    (k, link) for k, link in held.items() if _action_names(erased, link.action)
                ]
            )
            gone: set[str] = set()
            for call_id, link in named:
                entry = self._memory.get(call_id)
                if entry is not None and entry[0] is link:  # not taken or replaced meanwhile
                    self._memory[call_id] = (_TAKEN, entry[1])
                    gone.add(call_id)
            self._queue = [
                op
                for op in self._queue
                if op.link is None or not _action_names(erased, op.link.action)
            ]
            if self._store is not None:
                gone.update(await self._store.erase(erased))
        return len(gone)

    async def flush(self) -> None:
        """Write whatever is queued now (graceful stop, tests)."""
        if self._store is None:
            self._queue.clear()
            return
        while self._queue:
            await self._write_batch()

    async def close(self) -> None:
        """Flush, then stop the writer."""
        if self._closed:
            return
        self._closed = True
        if self._writer is not None:
            # Not in the middle of a batch: the store would finish the cancelled
            # transaction in its thread, the batch would be queued again, and its
            # links written a second time would clash with themselves (tombstones).
            async with self._writing:
                self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)
        try:
            await self.flush()
        except Exception:
            log.exception("could not write the last call links")

    # -- internals ---------------------------------------------------------------

    def _live(self, call_id: str, now: float) -> _Entry | None:
        entry = self._memory.get(call_id)
        if entry is not None and entry[1] < now - self._ttl:
            del self._memory[call_id]
            return None
        return entry

    def _put(self, call_id: str, entry: _Entry) -> None:
        self._memory[call_id] = entry
        self._memory.move_to_end(call_id)
        while len(self._memory) > self._max:
            self._memory.popitem(last=False)

    def _queue_op(self, op: _Op) -> None:
        if self._store is None or not op.call_id.isprintable():
            # PostgreSQL cannot store NUL, UTF-8 no lone surrogate: one such id (an
            # observe-mode call, let through) failed every batch after it. Memory
            # still links it in this process.
            return
        self._queue.append(op)
        if len(self._queue) > self._max:
            # The store is away (each batch rolled back and requeued): the oldest go.
            del self._queue[: len(self._queue) - self._max]
        self._wake.set()

    async def _write_loop(self) -> None:
        while True:
            await self._wake.wait()
            await asyncio.sleep(COALESCE_S)  # the next decisions' links join this batch
            self._wake.clear()
            try:
                await self._write_batch()
            except asyncio.CancelledError:
                raise
            except Exception:
                # Links are best effort beyond memory: the next batch tries again.
                log.exception("could not write call links")
                await asyncio.sleep(1.0)

    async def _write_batch(self) -> None:
        assert self._store is not None
        async with self._writing:
            batch, self._queue = self._queue, []
            if not batch:
                return
            now = self._clock()
            prune = None
            if now - self._pruned >= _PRUNE_EVERY_S:
                prune, self._pruned = now - self._ttl, now
            try:
                clashed = await self._store.apply(batch, prune_before=prune, keep=self._max)
            except Exception:
                # Rolled back: kept for the next try, in order. (A cancelled wait
                # is not requeued: the store's thread may still commit the batch.)
                self._queue[:0] = batch
                del self._queue[: max(0, len(self._queue) - self._max)]
                raise
        for call_id in clashed:
            # Linked before a restart (or evicted from memory) and proposed again.
            self._put(call_id, (_TOMBSTONE, now))


def encode_action(action: Action) -> bytes:
    """An action as stored in a link (JSON)."""
    return orjson.dumps(
        {
            "action_id": action.action_id,
            "agent": {
                "id": action.agent.id,
                "version": action.agent.version,
                "claims": dict(action.agent.claims),
            },
            "kind": action.kind.value,
            "protocol": action.protocol,
            "stage": action.stage.value,
            "request": {
                "method": action.request.method,
                "upstream": action.request.upstream,
                "path": action.request.path,
                "headers": dict(action.request.headers),
            },
            "tool": action.tool,
            "arguments": dict(action.arguments) if action.arguments is not None else None,
            "raw_arguments": action.raw_arguments,
            "call_id": action.call_id,
            "model": action.model,
            "context": dict(action.context),
            "wire_type": action.wire_type,
        }
    )


def _action_names(erased: ErasedSubjects, action: Action) -> bool:
    return erased.names(
        arguments=action.arguments, context=action.context, claims=action.agent.claims
    )


def names_erased(erased: ErasedSubjects, raw: bytes | str) -> bool:
    """Whether an action as stored (:func:`encode_action`) names an erased data subject.

    One that cannot be read is erased too: no result can be linked to it
    anyway, and it may be the subject's.
    """
    try:
        doc = orjson.loads(raw)
        return erased.names(
            arguments=doc["arguments"], context=doc["context"], claims=doc["agent"]["claims"]
        )
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return True


def decode_action(raw: bytes | str) -> Action:
    """The action :func:`encode_action` stored."""
    doc: Mapping[str, Any] = orjson.loads(raw)
    agent, request = doc["agent"], doc["request"]
    return Action(
        action_id=doc["action_id"],
        agent=Agent(agent["id"], agent["version"], agent["claims"]),
        kind=ActionKind(doc["kind"]),
        protocol=doc["protocol"],
        stage=Stage(doc["stage"]),
        request=RequestMeta(
            request["method"], request["upstream"], request["path"], request["headers"]
        ),
        tool=doc["tool"],
        arguments=doc["arguments"],
        raw_arguments=doc["raw_arguments"],
        call_id=doc["call_id"],
        model=doc["model"],
        context=doc["context"],
        wire_type=doc["wire_type"],
    )
