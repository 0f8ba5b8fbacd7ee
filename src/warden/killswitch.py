"""Kill switches: stop an agent, a tool, an upstream or everything, at once.

A switch is set or cleared through the admin API (or ``warden kill``), stored
in the state store and recorded in the audit log. Every sidecar sharing the
store re-reads the active switches when the state's change feed reports a
change (LISTEN/NOTIFY on PostgreSQL, polling on SQLite), or without a feed
every :data:`POLL_INTERVAL_S`, so a switch thrown anywhere takes effect
everywhere within a second.

When the feed reports a change the store cannot be read for (a busy or
locked database), the switches are read again within a second until they
are, and the store is reported down meanwhile (``/readyz``). Every sidecar
that learns of a switch from the store rejects the approvals it covers, as
the sidecar that threw it did: a grant approved before a switch the store
saved late does not outlive it.

A switch is in force here before the store answers. When the store cannot
save it (a locked SQLite file, PostgreSQL down), it stays in force on this
sidecar, :class:`KillSwitchNotSaved` says so, and a background task keeps
saving it, with a bounded backoff, until it is saved or cleared: the fleet
sees it once the store is back. A clearing the store cannot save fails, and
the switch stays in force.

The hot path only ever calls :meth:`KillSwitches.is_killed`: four dictionary
lookups on an in-memory index, no I/O. The pipeline's :class:`KillSwitchGuard`
calls it first for every new action; the proxy calls it between stream chunks
to cut responses that are streaming when a switch is thrown.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from warden import tasks
from warden.budgets import metrics
from warden.errors import AuditError, StateUnavailable, failure_summary
from warden.model import Action, Decision, Effect, Mode, new_id
from warden.pipeline import AuditSink, GuardContext
from warden.state import ChangeFeed, KillSwitchRepo, KillSwitchRow
from warden.state.repos import KILLSWITCHES

__all__ = [
    "POLL_INTERVAL_S",
    "KillSwitch",
    "KillSwitchGuard",
    "KillSwitchNotSaved",
    "KillSwitches",
    "Scope",
    "target_problem",
]

log = logging.getLogger("warden.killswitch")

POLL_INTERVAL_S = 0.5
FEED_BACKSTOP_S = 5.0
"""With a change feed, the switches are still re-read this often, in case a change was missed."""
READ_TIMEOUT_S = 5.0
"""How long one re-read may take: a connection the network dropped without a word would
otherwise hold the loop (and every later switch) until TCP gives up, minutes on."""
STALE_AFTER_S = 15.0
"""Switches not read for longer may be missing one another sidecar threw: the state store
is then reported down (``/readyz``, ``warden_state_up``), as in an outage."""
REREAD_FIRST_S = 0.25
REREAD_MAX_S = 1.0
"""A change the feed reported that could not be read is read again after 0.25, 0.5, then
every 1 s until it is, not at the next backstop: a switch thrown elsewhere is waiting."""
SAVE_TIMEOUT_S = 8.0
"""How long a switch thrown waits for the store to save it before the answer says it is not
saved (the attempt goes on; a store that fails answers sooner: SQLite's busy timeout is 5 s)."""
RETRY_FIRST_S = 1.0
RETRY_MAX_S = 15.0
"""A switch the store could not save is saved again after 1, 2, 4 ... s, then every 15 s."""
MAX_TARGET = 128
MAX_REASON = 1000


def target_problem(scope: Scope, target: str) -> str | None:
    """Why ``target`` cannot name a ``scope``'s agent, tool or upstream; ``None``: it can.

    ``"support-triage "`` would be set, listed and recorded, and stop nothing.
    No name starts or ends with a space or holds a control or invisible
    character, and an agent's id holds no space at all; a tool's name may
    (``Issue Refund`` in an HTTP route rule or an MCP server's listing).
    """
    if not 1 <= len(target) <= MAX_TARGET:
        return f"target must be the {scope.value}'s name, 1-{MAX_TARGET} characters"
    spaced = target != target.strip() or (scope is Scope.AGENT and any(c.isspace() for c in target))
    if spaced or not target.isprintable():
        return (
            f"target {target[:40]!r} holds a space or a control character where no "
            f"{scope.value}'s name does: such a switch would stop nothing"
        )
    return None


class Scope(enum.StrEnum):
    """What a switch stops: every action, or those of one agent, tool or upstream."""

    GLOBAL = "global"
    AGENT = "agent"
    TOOL = "tool"
    UPSTREAM = "upstream"


@dataclass(frozen=True, slots=True)
class KillSwitch:
    """One switch in force. ``target`` is ``*`` for the global scope."""

    id: str
    scope: Scope
    target: str
    reason: str
    created_by: str
    created_at: float

    @property
    def message(self) -> str:
        """Why actions are stopped, in words for agents and people."""
        what = "all actions" if self.scope is Scope.GLOBAL else f"{self.scope} {self.target}"
        return f"kill switch {self.id} stops {what}: {self.reason}"

    def to_json(self) -> dict[str, Any]:
        """The switch as the admin API shows it."""
        return {
            "id": self.id,
            "scope": self.scope.value,
            "target": self.target,
            "reason": self.reason,
            "created_by": self.created_by,
            "created_at": self.created_at,
        }

    @classmethod
    def from_row(cls, row: KillSwitchRow) -> KillSwitch:
        """From the state store's row."""
        return cls(
            id=row.id,
            scope=Scope(row.scope),
            target=row.target,
            reason=row.reason,
            created_by=row.created_by,
            created_at=row.created_at,
        )

    def to_row(self) -> KillSwitchRow:
        """As the state store keeps it."""
        return KillSwitchRow(
            id=self.id,
            scope=self.scope.value,
            target=self.target,
            reason=self.reason,
            created_by=self.created_by,
            created_at=self.created_at,
        )


class KillSwitchNotSaved(StateUnavailable):
    """A switch thrown and in force on this sidecar that the state store could not save.

    Other sidecars do not see it and it ends with this process, until the
    background saving succeeds. ``unrecorded``: the audit log refused its
    record too.
    """

    def __init__(self, switch: KillSwitch, unrecorded: AuditError | None = None) -> None:
        message = (
            f"kill switch {switch.id} is in force on this sidecar only and is not saved: the "
            "state store is unavailable, so other sidecars do not see it and it does not "
            "survive a restart; this sidecar keeps trying to save it. Do not throw it again "
            "here (each throw is a switch of its own); throw it on the other sidecars that "
            "must stop now"
        )
        if unrecorded is not None:
            message += f". It is not recorded in the audit log either: {unrecorded}"
        super().__init__(message)
        self.switch = switch
        self.unrecorded = unrecorded


@dataclass(slots=True)
class _Unsaved:
    """A switch in force here that the store has not taken (yet)."""

    switch: KillSwitch
    saving: asyncio.Lock = field(default_factory=asyncio.Lock)
    """Held while a save is awaited: a clearing waits, so it never overtakes a save."""
    attempt: asyncio.Task[None] | None = None
    """The store call on its way, if any: waited for, never cancelled (a call given up on
    may still land, and a second one beside it would only collide with it)."""
    attempts: int = 0
    failed: bool = False


class KillSwitches:
    """The switches in force, kept in memory and in sync with the state store."""

    def __init__(
        self,
        store: KillSwitchRepo,
        audit: AuditSink | None,
        *,
        poll_interval_s: float = POLL_INTERVAL_S,
        feed: ChangeFeed | None = None,
    ) -> None:
        """``feed``: re-read the switches when the state's change feed says they changed
        (and at least every :data:`FEED_BACKSTOP_S`), instead of every ``poll_interval_s``."""
        self._store = store
        self._feed = feed
        self._audit = audit
        self._interval = poll_interval_s
        self._active: tuple[KillSwitch, ...] = ()
        self._global: KillSwitch | None = None
        self._index: dict[tuple[Scope, str], KillSwitch] = {}
        self._poller: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self._on_set: list[Callable[[KillSwitch], Awaitable[object]]] = []
        self._watchers: dict[int, Callable[[], None]] = {}
        self._next_watcher = 0
        self._read_at = time.monotonic()
        self._unsaved: dict[str, _Unsaved] = {}
        self._clearing = asyncio.Lock()
        self._saves = 0  # switches saved late: a re-read started before one is read again
        self._saver: asyncio.Task[None] | None = None
        self._told: set[str] = set()  # switches the on_set listeners have been run for
        self._telling = tasks.Tasks("killswitch-tell")
        self._unread_since: float | None = None
        self._closed = False
        self.generation = 0
        """Increases whenever the set of active switches changes."""

    async def start(self) -> None:
        """Load the active switches, then keep polling the store."""
        await self.refresh()
        if self._poller is None:
            self._poller = tasks.spawn(self._poll(), name="killswitch-poll")

    async def close(self) -> None:
        """Stop polling, and saving switches the store has not taken after one last attempt
        (a store call on its way ends with the store)."""
        self._closed = True
        for task in (self._poller, self._saver):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._poller = self._saver = None
        await self._telling.cancel()
        if self._unsaved:
            # A last attempt, bounded: a switch saved now outlives the restart this may be.
            await asyncio.gather(*(self._save(u) for u in list(self._unsaved.values())))
        for unsaved in list(self._unsaved.values()):
            # Its "set" record reads like any switch's: the log says how it ends. A save
            # still on its way may yet land as the store closes ("saved" follows then).
            on_its_way = unsaved.attempt is not None and not unsaved.attempt.done()
            action, why = (
                ("save_pending", "not yet saved in the state store when Warden stopped")
                if on_its_way
                else ("lapsed", "never saved in the state store: it ends with this process")
            )
            log.warning("kill switch %s: %s", unsaved.switch.id, why)
            with contextlib.suppress(AuditError):
                await self._record(unsaved.switch, "warden", why, action)

    # -- the hot path --------------------------------------------------------------

    def is_killed(
        self, agent: str, upstream: str | None = None, tool: str | None = None
    ) -> KillSwitch | None:
        """The switch that stops this agent, upstream or tool, or ``None``. O(1), no I/O.

        When several apply, the global one wins, then agent, upstream, tool.
        """
        if self._global is not None:
            return self._global
        if not self._index:
            return None
        index = self._index
        found = index.get((Scope.AGENT, agent))
        if found is None and upstream is not None:
            found = index.get((Scope.UPSTREAM, upstream))
        if found is None and tool is not None:
            found = index.get((Scope.TOOL, tool))
        return found

    def covering(
        self, agent: str, upstream: str | None, tools: Iterable[str | None]
    ) -> KillSwitch | None:
        """:meth:`is_killed` for each of ``tools`` (``None``: the agent and upstream alone),
        the first switch found: the calls a stream has let through so far."""
        for tool in tools:
            if (switch := self.is_killed(agent, upstream, tool)) is not None:
                return switch
        return None

    def check(self, action: Action) -> KillSwitch | None:
        """:meth:`is_killed` for an action."""
        return self.is_killed(action.agent.id, action.request.upstream, action.tool)

    async def wait_changed(self) -> None:
        """Return the next time the set of active switches changes."""
        await self._changed.wait()

    def watch(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` on the event loop each time the active switches change.

        Cheaper than a task waiting in :meth:`wait_changed` for a caller that
        watches one short request. Returns the function that stops watching.
        """
        key = self._next_watcher
        self._next_watcher += 1
        self._watchers[key] = callback

        def unwatch() -> None:
            self._watchers.pop(key, None)

        return unwatch

    # -- administration ----------------------------------------------------------------

    def active(self) -> tuple[KillSwitch, ...]:
        """The switches in force, oldest first."""
        return self._active

    def unsaved(self) -> tuple[KillSwitch, ...]:
        """The switches in force on this sidecar only: the state store has not saved them."""
        return tuple(u.switch for u in self._unsaved.values())

    async def set(self, scope: Scope, target: str, reason: str, who: str) -> KillSwitch:
        """Throw a switch; it is in force on this sidecar before the store is asked.

        The switch is saved while it is recorded. Either may fail and the
        switch still holds here: :class:`KillSwitchNotSaved` when the state
        store could not save it (it is then saved in the background until it
        is, or is cleared), else :class:`warden.errors.AuditError` when the
        audit log refused its record.
        """
        if scope is Scope.GLOBAL:
            target = "*"
        elif (problem := target_problem(scope, target)) is not None:
            raise ValueError(problem)
        switch = KillSwitch(
            id=new_id("ks"),
            scope=scope,
            target=target,
            reason=reason,
            created_by=who,
            created_at=time.time(),
        )
        # In force before the store answers: an emergency stop does not wait for a
        # store that is down. Unsaved until it says otherwise, so no re-read lifts it.
        unsaved = self._unsaved[switch.id] = _Unsaved(switch)
        self._told.add(switch.id)  # its listeners run below, not again when it is read back
        self._install((*self._active, switch))
        saving = tasks.spawn(self._save(unsaved), name="killswitch-save", awaited=True)
        unrecorded: AuditError | None = None
        try:
            await self._record(switch, who, reason, "set")
        except AuditError as exc:
            unrecorded = exc
        finally:
            # Even when the record fails: the switch holds, so no grant may outlive it.
            failed = False
            for listener in self._on_set:
                try:
                    await listener(switch)
                except Exception as exc:
                    failed = True
                    log.warning(
                        "kill switch %s: a listener failed (%s); trying again",
                        switch.id,
                        failure_summary(exc),
                    )
            if failed:
                self._tell(switch, again=True)  # idempotent: all again, until none fails
        if not await saving:
            raise KillSwitchNotSaved(switch, unrecorded)
        if unrecorded is not None:
            raise unrecorded
        return switch

    def on_set(self, listener: Callable[[KillSwitch], Awaitable[object]]) -> None:
        """Call ``listener`` after each switch thrown here (held approvals are rejected so),
        and for each switch learned from the store or saved late (again, until it does not
        fail): ``listener`` must be idempotent."""
        self._on_set.append(listener)

    async def clear(self, switch_id: str, who: str, reason: str = "") -> KillSwitch | None:
        """Clear a switch by id; ``None`` when no such switch is in force.

        The clearing is recorded before it takes effect: a switch is never
        lifted without a record. When the state store cannot save the
        clearing, its error propagates and the switch stays in force. Clears
        run one at a time: a double click records one clearing, not two.
        """
        async with self._clearing:
            return await self._clear(switch_id, who, reason)

    async def _clear(self, switch_id: str, who: str, reason: str) -> KillSwitch | None:
        current = next((s for s in self._active if s.id == switch_id), None)
        if current is None:
            await self.refresh()
            current = next((s for s in self._active if s.id == switch_id), None)
            if current is None:
                return None
        if (unsaved := self._unsaved.get(switch_id)) is not None:
            async with unsaved.saving:
                if all(s.id != switch_id for s in self._active):
                    return None  # cleared by another caller while this one waited
                if switch_id in self._unsaved:
                    if unsaved.attempt is not None and not unsaved.attempt.done():
                        # It may yet land in the store: lifted here, it would come back.
                        raise StateUnavailable(
                            f"kill switch {switch_id} is still being saved; it stays in force"
                        )
                    # Never reached the store: this sidecar is the only one it stops.
                    await self._record(current, who, reason, "cleared")
                    del self._unsaved[switch_id]
                    self._install(tuple(s for s in self._active if s.id != switch_id))
                    return current
            # Saved meanwhile: cleared in the store like any other.
        await self._record(current, who, reason, "cleared")
        try:
            row = await self._store.clear_killswitch(switch_id, who)
        except Exception:
            # Recorded as cleared but still in force: the log must not be left saying so.
            with contextlib.suppress(Exception):
                await self._record(current, who, "the state store did not take it", "clear_failed")
            raise
        self._install(tuple(s for s in self._active if s.id != switch_id))
        return current if row is not None else None

    async def refresh(self) -> None:
        """Re-read the active switches from the state store.

        A read that a change here overtook (a switch thrown, cleared or saved
        late on this sidecar, or another re-read installed, while it was on its
        way) may predate that change: it is read again rather than installed,
        so an older snapshot never lifts a newer switch. Switches the store has
        not saved stay in force beside those read.
        """
        for _ in range(_REREADS):
            seen = (self.generation, self._saves)
            rows = await self._store.active_killswitches()
            if (self.generation, self._saves) == seen:
                switches = tuple(KillSwitch.from_row(r) for r in rows if r.scope in _SCOPES)
                if self._unsaved:
                    switches = self._with_unsaved(switches)
                if {s.id for s in switches} != {s.id for s in self._active}:
                    self._install(switches)
                self._learn()
                break
        else:
            # Changes keep landing here: what is installed is at least as new.
            return
        self._read_at = time.monotonic()
        metrics.KILLSWITCHES_READ.set(time.time())

    def unread_for(self) -> float:
        """Seconds since the switches were last read from the state store."""
        return time.monotonic() - self._read_at

    def change_unread_for(self) -> float | None:
        """Seconds since the change feed reported a change the switches could not be read
        for since; ``None`` when every reported change was read."""
        since = self._unread_since
        return None if since is None else time.monotonic() - since

    def stale(self) -> bool:
        """Whether the switches were not read for longer than :data:`STALE_AFTER_S` (or three
        polls): one thrown on another sidecar may be missing here."""
        return self.unread_for() > max(STALE_AFTER_S, 3 * self._interval)

    # -- internals ---------------------------------------------------------------------

    def _learn(self) -> None:
        """Run the ``on_set`` listeners for the switches in force that they have not seen
        (thrown on another sidecar; those in force at start predate the listeners)."""
        new = [s for s in self._active if s.id not in self._told]
        self._told = {s.id for s in self._active}
        if self._on_set:
            for switch in new:
                self._tell(switch)

    def _tell(self, switch: KillSwitch, *, again: bool = False) -> None:
        if not self._closed:
            self._telling.spawn(self._telling_of(switch, again), name="killswitch-tell")

    async def _telling_of(self, switch: KillSwitch, again: bool) -> None:
        """Each listener once without failing (the store may be back soon), while in force;
        ``again``: they just failed, so not at once."""
        pending = list(self._on_set)
        delay = RETRY_FIRST_S
        if again:
            await asyncio.sleep(delay)
            delay *= 2
        while pending and any(s.id == switch.id for s in self._active):
            failed = []
            for listener in pending:
                try:
                    await listener(switch)
                except Exception as exc:
                    failed.append(listener)
                    log.warning(
                        "kill switch %s: a listener failed (%s); trying again",
                        switch.id,
                        failure_summary(exc),
                    )
            pending = failed
            if pending:
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)

    def _with_unsaved(self, stored: tuple[KillSwitch, ...]) -> tuple[KillSwitch, ...]:
        """``stored`` and the switches in force here only, oldest first."""
        ids = {s.id for s in stored}
        for switch_id in [i for i in self._unsaved if i in ids]:
            # A save whose answer was lost (it timed out, then landed) is saved all the same.
            self._landed(self._unsaved.pop(switch_id))
        if not self._unsaved:
            return stored
        merged = (*stored, *(u.switch for u in self._unsaved.values()))
        return tuple(sorted(merged, key=lambda s: (s.created_at, s.id)))

    async def _save(self, unsaved: _Unsaved) -> bool:
        """Save a switch in force here, or wait on for the attempt still on its way, at most
        :data:`SAVE_TIMEOUT_S`; whether it is saved (or cleared) now."""
        switch = unsaved.switch
        async with unsaved.saving:
            if switch.id not in self._unsaved:
                return True  # cleared, or read back from the store, meanwhile
            if unsaved.attempt is None or unsaved.attempt.done():
                unsaved.attempts += 1
                unsaved.attempt = attempt = tasks.spawn(
                    self._store.add_killswitch(switch.to_row()),
                    name="killswitch-save",
                    awaited=True,
                )
                attempt.add_done_callback(lambda done: self._answered(unsaved, done))
            done, _ = await asyncio.wait((unsaved.attempt,), timeout=SAVE_TIMEOUT_S)
            if not done:
                self._failed(unsaved, f"no answer within {SAVE_TIMEOUT_S:g} s")
            return switch.id not in self._unsaved

    def _answered(self, unsaved: _Unsaved, attempt: asyncio.Task[None]) -> None:
        """The store's answer to one attempt (run before whoever waits on it resumes)."""
        if attempt.cancelled():
            return
        if (exc := attempt.exception()) is not None:
            self._failed(unsaved, failure_summary(exc))  # no credential
            return
        if self._unsaved.pop(unsaved.switch.id, None) is None:
            return
        self._saves += 1
        self._landed(unsaved)

    def _landed(self, unsaved: _Unsaved) -> None:
        """A switch the store took, after the thrower was told it had not: say so."""
        if not unsaved.failed:
            return
        log.info(
            "kill switch %s is saved in the state store at attempt %d: every sidecar "
            "sharing it sees it now",
            unsaved.switch.id,
            unsaved.attempts,
        )
        # The thrower was told it held here only: the log says when the fleet saw it.
        why = f"saved in the state store at attempt {unsaved.attempts}"
        tasks.spawn(self._record(unsaved.switch, "warden", why, "saved"), name="ks-saved")
        # What its listeners did as it was thrown may have failed with the store (approvals
        # it covers still granted): again, now that the store took it.
        self._tell(unsaved.switch)

    def _failed(self, unsaved: _Unsaved, why: str) -> None:
        """One log line per failed attempt, and the background saving goes on."""
        unsaved.failed = True
        switch = unsaved.switch
        log.warning(
            "kill switch %s (%s %s) is in force on this sidecar only: the state store "
            "could not save it (attempt %d: %s); trying again",
            switch.id,
            switch.scope.value,
            switch.target,
            unsaved.attempts,
            why,
        )
        self._keep_saving()

    def _keep_saving(self) -> None:
        if not self._closed and (self._saver is None or self._saver.done()):
            self._saver = tasks.spawn(self._save_unsaved(), name="killswitch-save-unsaved")

    async def _save_unsaved(self) -> None:
        """Save the switches the store has not taken until none is left (saved or cleared)."""
        delay = RETRY_FIRST_S
        while self._unsaved:
            await asyncio.sleep(delay)
            for unsaved in list(self._unsaved.values()):
                await self._save(unsaved)
            delay = min(delay * 2, RETRY_MAX_S)

    def _install(self, switches: tuple[KillSwitch, ...]) -> None:
        index: dict[tuple[Scope, str], KillSwitch] = {}
        first_global: KillSwitch | None = None
        for switch in switches:
            if switch.scope is Scope.GLOBAL:
                first_global = first_global or switch
            else:
                index.setdefault((switch.scope, switch.target), switch)
        # Swap whole objects: readers never see a half-built index.
        self._active = switches
        self._index = index
        self._global = first_global
        self.generation += 1
        for scope in Scope:
            metrics.KILLSWITCHES_ACTIVE.labels(scope.value).set(
                sum(1 for s in switches if s.scope is scope)
            )
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        for callback in list(self._watchers.values()):
            try:
                callback()
            except Exception:
                log.exception("a kill switch watcher failed")

    async def _record(self, switch: KillSwitch, who: str, why: str, action: str) -> None:
        if self._audit is None:
            return
        await self._audit.append(
            "killswitch",
            {
                "id": switch.id,
                "action": action,
                "scope": switch.scope.value,
                "target": switch.target,
                "who": who,
                "why": why or switch.reason,
            },
        )

    async def _poll(self) -> None:
        if self._feed is not None:
            await self._watch(self._feed)
            return
        while True:
            await asyncio.sleep(self._interval)
            await self._reread()

    async def _watch(self, feed: ChangeFeed) -> None:
        with feed.watch(KILLSWITCHES) as changes:
            retry = 0.0
            while True:
                notified = True
                try:
                    await asyncio.wait_for(changes.get(), retry or FEED_BACKSTOP_S)
                except TimeoutError:
                    notified = False
                if await self._reread(quiet=retry > 0):
                    if self._unread_since is not None:
                        log.info(
                            "kill switches read again, %.1f s after a change was reported",
                            time.monotonic() - self._unread_since,
                        )
                    self._unread_since = None
                    retry = 0.0
                elif notified or self._unread_since is not None:
                    # A change is waiting (a switch thrown elsewhere, perhaps): soon, not
                    # at the next backstop; /readyz says the store is down meanwhile.
                    if self._unread_since is None:
                        self._unread_since = time.monotonic()
                        log.warning(
                            "a kill switch change was reported and cannot be read yet; "
                            "reading again every %g s until it is",
                            REREAD_MAX_S,
                        )
                    retry = min(REREAD_MAX_S, retry * 2 or REREAD_FIRST_S)

    async def _reread(self, *, quiet: bool = False) -> bool:
        """Re-read the switches; whether that worked (a failure is logged, at debug level
        when ``quiet``: a retry within the second)."""
        level = logging.DEBUG if quiet else logging.WARNING
        try:
            await asyncio.wait_for(self.refresh(), READ_TIMEOUT_S)
        except asyncio.CancelledError:
            raise
        except TimeoutError:
            log.log(
                level,
                "could not read kill switches from the state store within %.0f s (%.0f s since "
                "the last read)",
                READ_TIMEOUT_S,
                self.unread_for(),
            )
        except Exception as exc:
            # Keep the last known switches: failing open here would lift them. One line,
            # no traceback (a driver's error may quote its connection string).
            log.log(
                level,
                "could not read kill switches from the state store (%.0f s since the last "
                "read): %s",
                self.unread_for(),
                failure_summary(exc),
            )
        else:
            return True
        return False


_SCOPES = frozenset(s.value for s in Scope)
_REREADS = 3  # reads a refresh makes while changes here overtake them


class KillSwitchGuard:
    """The first pipeline stage: deny anything a kill switch covers.

    Its decisions are enforced even in observe mode: a kill switch is an
    emergency stop, not a rule being tried out.
    """

    name = "kill_switch"
    last_word = True
    """The pipeline asks again after the other guards: a switch thrown while they decided
    (a policy evaluation waiting for a worker) still stops the action."""

    def __init__(self, switches: KillSwitches) -> None:
        self.switches = switches

    async def check(self, action: Action, ctx: GuardContext) -> Decision | None:
        """Deny when a switch covers the action's agent, upstream or tool."""
        switch = self.switches.check(action)
        if switch is None:
            return None
        return Decision(
            decision_id=new_id("dec"),
            effect=Effect.DENY,
            reasons=(switch.message,),
            mode=Mode.ENFORCE,
            guard="kill_switch",
        )
