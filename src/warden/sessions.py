"""Session-aware policies: ``input.history``, ``input.session`` and taint labels.

A model request carries the conversation so far; :func:`conversation_of`
reads it (bounded, :mod:`warden.protocols.history`) together with the
session it belongs to:

1. the ``X-Warden-Session`` header;
2. ``sessions.pointer``, a JSON pointer into the request body
   (``/metadata/session_id``);
3. a Responses API chain: a request continuing ``previous_response_id`` is in
   the session of the response it continues, as Warden recorded it; a
   request starting a chain starts a session of its own.

(The MCP doors name their own session: ``Mcp-Session-Id`` over HTTP, the wrap
run over stdio.) Session ids are the agent's to choose, so counters are kept
per agent and session id.

:class:`SessionGuard` is a pipeline stage that runs just before the policy:

* it checks every prior call of the conversation against Warden's record of
  the calls it decided (memory, then the state store): a call with no
  decision of the same tool, same arguments (by digest) that let it through
  is ``verified: false``; an agent that rewrote or invented history cannot
  make it look like something Warden allowed. The decision must also be of
  this conversation: made in the same session (by any agent: a handoff
  passes the history on), or, for a request in no session, made for the
  same agent in none. A call copied from another conversation reads
  unverified;
* it reads the session's counters from the state store (calls by tool,
  denials, approvals, taints) and hands the policy ``input.history``,
  ``input.session`` and the tool's ``input.action.labels``;
* once the decision is final it records the call (its id, tool, argument
  digest and effect) and adds to the session's counters;
* for a Responses answer it keeps the chain link, so the next request naming
  it gets its history back from Warden's records, not from the agent.

Taints: a tool labelled ``untrusted_output`` (``tools.<name>.labels``) taints
the session once its output can have entered the conversation: when its
result is in the history, or once Warden let a call of it through in this
session. A call the provider ran itself (a hosted tool, the provider's MCP
call) ran before Warden saw it, whatever Warden then decides: it taints the
session, and the other calls of the same answer, which the model may have
proposed after reading its output. ``input.session.taints`` lists every
label so gathered.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
from collections import Counter, OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

import orjson

from warden import tasks
from warden.config import SessionsConfig, ToolConfig
from warden.model import (
    Action,
    ActionKind,
    Conversation,
    Decision,
    Effect,
    HostedApproval,
    Mode,
    Outcome,
    PriorCall,
    PriorResult,
    Stage,
    new_id,
)
from warden.owners import IdOwners
from warden.pipeline import UNCHECKED, GuardContext, input_problem
from warden.pointers import pointer_get
from warden.protocols import history
from warden.protocols.base import refusal_text
from warden.state.links import MAX_CALL_ID_CHARS
from warden.state.sessions import (
    MAX_CHAIN,
    CallRecord,
    ChainLink,
    SessionRepo,
    merged_entries,
)

__all__ = [
    "SESSION_HEADER",
    "SessionGuard",
    "conversation_of",
    "door_conversation",
    "owed_outputs",
    "session_from",
    "stored_answer_conversation",
    "usable_session",
]

log = logging.getLogger("warden.sessions")

SESSION_HEADER: Final = "X-Warden-Session"
MAX_SESSION_ID: Final = 200
"""Longer session ids are refused (the session is then unnamed)."""
UNTRUSTED: Final = "untrusted_output"
SENSITIVE: Final = "sensitive_sink"
MAX_STREAMING: Final = 10_000
"""Answers still streaming whose agent is remembered before their link is written."""
MAX_KNOWN: Final = 100_000
"""Decided calls remembered in memory (the state store keeps them all, until ``ttl_s``)."""
_OWNED_KEPT: Final = 1024
"""Sessions whose counters are kept in memory (a wrap run has one)."""
MAX_PER_CALL_ID: Final = 16
"""Records kept in memory per call id, newest last. Ids are the upstream's choice and
may repeat without end; a history entry whose record fell out reads unverified."""
PRUNE_EVERY_S: Final = 3600.0
NEW_CHAIN: Final = "responses_chain"
"""``input.session.source`` of a Responses chain's session (a new one, or the one continued)."""
WRITE_COALESCE_S: Final = 0.02
"""How long decided calls wait for more to share their store transaction (memory has them)."""
_ADD_RETRY_S: Final = 0.05  # doubled after each failed counter add, up to the most below
_ADD_RETRY_MAX_S: Final = 5.0


# -- what the ingress calls -------------------------------------------------------------------


def usable_session(value: Any) -> str | None:
    """A session id as every door takes one, trimmed; ``None`` when it is not usable.

    Usable: a string (or integer) of 1 to ``MAX_SESSION_ID`` printable
    characters once trimmed. A door that reads an unusable id names no session.
    """
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None
    text = str(value).strip()
    if not text or len(text) > MAX_SESSION_ID or not text.isprintable():
        return None
    return text


def session_from(
    headers: Mapping[str, str], body: Mapping[str, Any] | None, pointer: str | None
) -> tuple[str | None, str | None]:
    """The session a request names and where from (``header``, ``pointer``); else ``None``s."""
    given = usable_session(headers.get(SESSION_HEADER) or headers.get(SESSION_HEADER.lower()))
    if given is not None:
        return given, "header"
    if pointer and body is not None:
        found = usable_session(pointer_get(body, pointer)[1])
        if found is not None:
            return found, "pointer"
    return None, None


def conversation_of(
    protocol: str,
    body: Mapping[str, Any],
    headers: Mapping[str, str],
    config: SessionsConfig,
) -> Conversation:
    """The conversation and session of a model request (``protocol``: the adapter's name)."""
    conversation = history.extract(
        _EXTRACTOR.get(protocol, protocol),
        body,
        history.Bounds(
            max_calls=config.max_calls,
            max_messages=config.max_messages,
            max_result_chars=config.max_result_chars,
            max_ms=config.max_history_ms,
        ),
    )
    session_id, source = session_from(headers, body, config.pointer)
    provider_conversation: str | None = None
    if protocol == _RESPONSES:
        named = body.get("conversation")
        raw = named.get("id") if isinstance(named, Mapping) else named
        if isinstance(raw, str) and raw:  # anything else the provider refuses itself
            provider_conversation = raw
        if session_id is None:
            # The Conversations API: the provider's own conversation is the session.
            session_id = usable_session(raw)
            source = "responses_conversation" if session_id is not None else None
    if session_id is None and protocol == _RESPONSES and conversation.previous_response_id is None:
        # A new Responses chain: its own session, which its continuations inherit
        # (unless its input carries calls Warden decided in a session: see _build).
        session_id, source = new_id("ses"), NEW_CHAIN
    return dataclasses.replace(
        conversation,
        session_id=session_id,
        session_source=source,
        provider_conversation=provider_conversation,
    )


def owed_outputs(conversation: Conversation | None) -> Mapping[str, tuple[str, str]]:
    """Calls of the answer a Responses request continues that Warden kept from the agent.

    The provider stored those calls with its answer and refuses a
    continuation that gives no output for each ("No tool output found for
    function call"). By call id: the call's item type and the text the agent
    saw in its place, which the door sends the model as the call's output.
    Known once the request's first decision was made (the session guard
    reads the chain); empty for other requests.
    """
    if conversation is None:
        return {}
    owed = conversation.memo.get("owed")
    return owed if isinstance(owed, dict) else {}


def door_conversation(
    headers: Mapping[str, str], door_session: str | None = None, source: str = "door"
) -> Conversation | None:
    """The session of a request that carries no conversation.

    ``X-Warden-Session`` (header or gRPC metadata) wins; else the door's own
    session, named ``source`` (MCP: ``Mcp-Session-Id``, gRPC ``Check``: its
    ``session_id``). ``None`` when neither names a session.
    """
    session_id, found = session_from(headers, None, None)
    if session_id is None:
        session_id, found = usable_session(door_session), source
    if session_id is None:
        return None
    return Conversation(session_id=session_id, session_source=found, carried=False)


def stored_answer_conversation(headers: Mapping[str, str], response_id: str) -> Conversation:
    """The conversation of a stored Responses answer fetched by id (a ``background`` one).

    It goes on where the request that made the answer left off: its history
    and session come from that answer's chain link, unless ``X-Warden-Session``
    names the session; the calls decided in what it returns join that link.
    """
    session_id, found = session_from(headers, None, None)
    return Conversation(
        session_id=session_id,
        session_source=found,
        previous_response_id=response_id,
        retrieved_id=response_id,
    )


_RESPONSES: Final = "openai.responses"
_EXTRACTOR: Final = {
    "openai.chat": "openai_chat",
    "openai.responses": "openai_responses",
    "anthropic.messages": "anthropic",
}


# -- the guard --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class _Prepared:
    """What one request's actions share: the verified history and the session's key."""

    history: tuple[Mapping[str, Any], ...]
    key: str | None
    """The counters' key (agent and session id); ``None`` when there is no session."""
    session_id: str | None
    source: str | None
    taints: frozenset[str]
    verified: bool
    not_theirs: str | None = None
    """What the request names that belongs to another agent (a Responses answer it
    continues or fetches, a provider conversation), as the denial says it."""
    unread: str | None = None
    """What of that could not be read from the state store, as the denial says it."""
    unapproved: str | None = None
    """A hosted MCP call the request approves that Warden did not allow as the request
    (or its chain) carries it, as the denial names it: the provider would run it."""
    unknown_results: bool = False
    """The request sends back a result of a call neither it nor Warden's records know:
    the policy reads the history as ``truncated`` (what entered it is unknown)."""


@dataclasses.dataclass(frozen=True, slots=True)
class _Chain:
    """What Warden's records say of the Responses chain a request continues."""

    calls: list[PriorCall]
    session_id: str | None
    agent_id: str | None
    """The agent the continued answer was made for (``None``: not known)."""
    unread: bool = False
    approval_requests: Mapping[str, Sequence[PriorCall]] = dataclasses.field(default_factory=dict)
    """Every copy of each hosted MCP approval request in the chain, by id: the ones
    Warden decided in its answers and the ones its requests carried."""
    approval_requests_cut: bool = False
    """The chain's copies of approval requests cannot be relied on: a request of the
    chain carried more than were kept, or the chain could not be read back to its first
    answer (a link pruned, erased, never written, or past the chain limit)."""


_BY_TOOL: Final = ("calls:", "held:")
"""Session counters named after a tool."""
_WAITING: Final = "waiting:"
"""Counters of held calls by call (:func:`_waiting`), which policies do not see."""


class SessionGuard:
    """The pipeline stage that gives policies ``input.history`` and ``input.session``."""

    name = "session"

    def __init__(
        self,
        repo: SessionRepo | None,
        config: SessionsConfig,
        tools: Mapping[str, ToolConfig],
        *,
        deny_when_unavailable: bool = True,
    ) -> None:
        """``repo`` ``None``: nothing is kept beyond this process's memory (tests, tools).

        ``deny_when_unavailable``: a decision in a session whose counters cannot be
        read is denied (``state.on_unavailable: deny``); else the policy sees
        ``input.session.available: false`` and no counts.
        """
        self._repo = repo
        self._config = config
        self._labels = {name: tuple(t.labels) for name, t in tools.items() if t.labels}
        self._deny = deny_when_unavailable
        self._known: OrderedDict[str, tuple[CallRecord, ...]] = OrderedDict()
        self._pruner: asyncio.Task[None] | None = None
        self._writes = tasks.Tasks("sessions")
        """The writer of decided calls to the store (memory already has them)."""
        self._unwritten: list[CallRecord] = []
        self._unadded: dict[str, Counter[str]] = {}
        """Counter deltas decided here and not yet confirmed added in the store, by key:
        reads add them, so this process never sees fewer than it decided."""
        self._owned: OrderedDict[str, Counter[str]] = OrderedDict()
        """Counters of sessions this process alone adds to (``Conversation.owned``), by key:
        read from the store once, then kept here as decided."""
        self._adding = tasks.Tasks("session-counters")
        self._adding_now: dict[str, asyncio.Event] = {}
        """By session key, the add on its way to the store, set once its deltas are counted
        there and no longer here: a read meanwhile could find them in both."""
        self._closing = asyncio.Event()
        """Set by :meth:`close`: a counter add that fails then is not tried again."""
        self._unwritten_links: dict[str, tuple[ChainLink, asyncio.Event]] = {}
        """Chain links on their way to the store, by response id: a request continuing
        (or fetching) the answer before the write commits still finds its chain."""
        self._failed_links: OrderedDict[str, ChainLink] = OrderedDict()
        """Links whose write failed, for a fetch of their answer to rebuild (the latest)."""
        self._unwritten_calls: dict[str, list[str]] = {}
        """Entries a fetched answer adds to its link, by response id, until written."""
        self._conversations = IdOwners(repo, "conversation", ttl_s=config.ttl_s)
        """Who owns each provider conversation (Responses ``conversation``)."""
        self._answers = IdOwners(repo, "answer", ttl_s=config.ttl_s)
        """Who owns each streamed answer, from its first event (its link comes at its end):
        for the other sidecars of a fleet, which do not share :attr:`_streaming`."""
        self._streaming: OrderedDict[str, str] = OrderedDict()
        """The agent of each answer still streaming to it, by response id, from the event
        that names the id until its link is written: until then it is that agent's too."""
        self._turns: dict[str, tuple[asyncio.Lock, list[int]]] = {}
        """Per session key: the lock one counted decision holds from reading the counters
        until adding to them, and how many decisions use it (dropped at none)."""
        self._holding: dict[str, str] = {}
        """Session keys locked, by the action id whose decision holds the lock."""

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        """Prune old session rows in the background (hourly)."""
        if self._pruner is None and self._repo is not None:
            self._pruner = tasks.spawn(self._prune_loop(), name="session-prune")

    async def close(self) -> None:
        """Finish writing decided calls and counters, and stop pruning."""
        self._closing.set()
        await self._writes.drain()
        await self._adding.drain()
        if self._pruner is not None:
            self._pruner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pruner
            self._pruner = None

    async def _prune_loop(self) -> None:
        assert self._repo is not None
        while True:
            try:
                await self._repo.prune(self._config.ttl_s)
            except Exception as exc:
                log.warning("could not prune session state: %s", type(exc).__name__)
            await asyncio.sleep(PRUNE_EVERY_S)

    def labels_of(self, tool: str | None) -> tuple[str, ...]:
        """The tool's configured labels."""
        return self._labels.get(tool or "", ())

    # -- pipeline hooks ----------------------------------------------------------

    async def check(self, action: Action, ctx: GuardContext) -> Decision | None:
        """See :meth:`admit`; nothing is held afterwards."""
        try:
            decision, _ = await self.admit(action, ctx)
        finally:
            self._leave(action.action_id)
        return decision

    async def admit(
        self, action: Action, ctx: GuardContext
    ) -> tuple[Decision | None, GuardContext]:
        """Add the history, the session's counters and the tool's labels to the context.

        A proposed tool call in a session holds the session until :meth:`decided`
        (which the pipeline always calls after ``admit``, whatever happened).
        """
        labels = self.labels_of(action.tool)
        conversation = action.request.conversation
        if conversation is None:
            if not labels:
                return None, ctx
            return None, dataclasses.replace(ctx, labels=labels)
        prepared = await self._prepare(conversation, action.agent.id)
        if prepared.not_theirs is not None:
            return _not_theirs(ctx, prepared.not_theirs), ctx
        if prepared.unapproved is not None:
            return _unapproved(ctx, prepared.unapproved), ctx
        if prepared.unread is not None and self._deny:
            return _unavailable(ctx, prepared.unread), ctx
        counters: dict[str, int] = {}
        available = True
        if prepared.key is not None and self._repo is not None and self._config.counters:
            if _counted(action):
                # One counted decision per session at a time, from this read until its
                # deltas are added: calls of one response (or of parallel requests)
                # cannot all read the count from before any of them.
                await self._enter(prepared.key, action.action_id)
            try:
                counters = await self._counters(prepared.key, conversation.owned)
            except Exception as exc:
                log.warning("could not read session counters: %s", type(exc).__name__)
                available = False
                if self._deny:
                    return _unavailable(ctx, "this session's counters"), ctx
        if counters.get(f"held:{action.tool}", 0) > 0 and counters.get(_waiting(action), 0) > 0:
            # Proposed again while held (a deferred call's retry, its approval perhaps
            # granted): the counts exclude the call being decided, its own hold too.
            counters = {**counters, f"held:{action.tool}": counters[f"held:{action.tool}"] - 1}
            counters["approvals"] = counters.get("approvals", 0) - 1
        session = _session_doc(prepared, counters, available, conversation)
        return None, dataclasses.replace(
            ctx, history=prepared.history, session=session, labels=labels
        )

    async def _counters(self, key: str, owned: bool) -> dict[str, int]:
        """The session's counters, this process's decisions not yet in the store included."""
        kept = self._owned.get(key) if owned else None
        if kept is not None:
            self._owned.move_to_end(key)
            return dict(kept)  # no one else adds to them: no read from the store
        while (adding := self._adding_now.get(key)) is not None:
            # The store may have them already while they are still counted here: a
            # read now would count them twice, and deny what the policy allows.
            await adding.wait()
        counters = await self._repo.counters(key) if self._repo is not None else {}
        unadded = self._unadded.get(key)
        if unadded:
            # Not yet on their way to the store: counted here, never short.
            for name, delta in unadded.items():
                counters[name] = counters.get(name, 0) + delta
        if owned:
            self._owned[key] = Counter(counters)
            while len(self._owned) > _OWNED_KEPT:
                self._owned.popitem(last=False)
        return counters

    async def decided(self, action: Action, decision: Decision | None) -> None:
        """Record a decided tool call, and add it to its session's counters.

        A held call counts as held once: proposed again while it still waits (a
        retry the approval gate answers with the approval it already has), it
        adds nothing. What becomes of it is :meth:`settled`'s to count.
        """
        try:
            if decision is None or action.tool is None or not _counted(action):
                return
            conversation = action.request.conversation
            prepared = conversation.memo.get("prepared") if conversation is not None else None
            key = prepared.key if isinstance(prepared, _Prepared) else None
            if action.call_id and len(action.call_id) <= MAX_CALL_ID_CHARS:
                # A longer id (the agent's own, at gRPC and MCP) is kept nowhere: a 3 MB
                # one would sit in memory and in the state store for sessions.ttl_s.
                await self._record(action, decision, conversation, key)
            deltas = self._deltas(action.tool, decision.enforced, provider_ran(action))
            counted = self._repo is not None and self._config.counters
            if decision.enforced is Effect.REQUIRE_APPROVAL and key is not None and counted:
                owned = conversation is not None and conversation.owned
                deltas = await self._hold_deltas(action, key, owned, deltas)
            self._count(key, _named(action.tool, deltas))
        finally:
            self._leave(action.action_id)

    async def _hold_deltas(
        self, action: Action, key: str, owned: bool, deltas: dict[str, int]
    ) -> dict[str, int]:
        """``deltas`` of a held call, once per call: nothing held again while it waits.

        Read under the session's turn (``admit`` took it, ``decided`` has not let
        go), so the calls of one answer see each other's holds. A counter that an
        approved call took below zero (two holds of one call let through, one
        counted) is brought back first.
        """
        assert action.tool is not None
        waiting = _waiting(action)
        try:
            counters = await self._counters(key, owned)
        except Exception as exc:
            log.warning("could not read session counters: %s", type(exc).__name__)
            return deltas  # a new hold, then: never fewer than held
        if counters.get(waiting, 0) > 0:
            # The same call is held already (waiting, refused or expired): no second hold.
            return {k: n for k, n in deltas.items() if k.startswith("taint:")}
        held = f"held:{action.tool}"
        return {
            **deltas,
            held: 1 - min(0, counters.get(held, 0)),
            waiting: 1 - counters.get(waiting, 0),
        }

    async def _enter(self, key: str, action_id: str) -> None:
        lock, users = self._turns.setdefault(key, (asyncio.Lock(), [0]))
        users[0] += 1
        try:
            await lock.acquire()
        except BaseException:
            self._release(key, held=False)
            raise
        self._holding[action_id] = key

    def _leave(self, action_id: str) -> None:
        key = self._holding.pop(action_id, None)
        if key is not None:
            self._release(key, held=True)

    def _release(self, key: str, *, held: bool) -> None:
        lock, users = self._turns[key]
        if held:
            lock.release()
        users[0] -= 1
        if users[0] == 0:
            del self._turns[key]

    def _count(self, key: str | None, deltas: Mapping[str, int]) -> None:
        """Add ``deltas`` to the session's counters, off the decision path: the next
        decision in this process counts them from memory until the store has them."""
        if key is None or self._repo is None or not self._config.counters:
            return
        self._unadded.setdefault(key, Counter()).update(deltas)
        if key in self._owned:
            self._owned[key].update(deltas)
        if len(self._adding) == 0:
            self._adding.spawn(self._add_counters(), name="session-counters")

    async def _add_counters(self) -> None:
        """Add every key's pending deltas to the store, one key at a time, until none are left.

        A failed add keeps its deltas (decisions here go on counting them) and is
        tried again after a pause; only a store still failing when Warden stops
        loses them, and says so.
        """
        assert self._repo is not None
        await asyncio.sleep(0)  # the other calls of this response join the first add
        failures = 0
        while self._unadded:
            key = next(iter(self._unadded))
            deltas = Counter(self._unadded[key])
            adding = self._adding_now[key] = asyncio.Event()
            error: Exception | None = None
            try:
                await self._repo.add(key, deltas)
            except Exception as exc:
                error = exc
            else:
                left = self._unadded.pop(key, None)
                if left is not None:
                    left.subtract(deltas)  # what was decided meanwhile stays
                    # Negative ones too (an approved call no longer held): not ``+left``.
                    if remaining := Counter({n: d for n, d in left.items() if d}):
                        self._unadded[key] = remaining
            finally:
                del self._adding_now[key]
                adding.set()
            if error is None:
                failures = 0
                continue
            failures += 1
            if self._closing.is_set():
                log.error(
                    "session counters of %d session(s) not stored, the store failing as "
                    "Warden stops: %s",
                    len(self._unadded),
                    type(error).__name__,
                )
                self._unadded.clear()
                return
            log.warning("could not add to session counters: %s", type(error).__name__)
            self._unadded[key] = self._unadded.pop(key)  # the others first, next time
            with contextlib.suppress(TimeoutError):
                pause = min(_ADD_RETRY_MAX_S, _ADD_RETRY_S * 2 ** min(failures, 8))
                await asyncio.wait_for(self._closing.wait(), pause)

    def settled(self, action: Action, decision: Decision) -> None:
        """The final word on a held call: approved (let through), refused or deferred.

        A held call reaches the agent only once a person approves it, so only
        then may a conversation carrying it read it as verified, and only then
        can its output taint the session. It was counted as held when first
        held (:meth:`decided`); let through, it counts as a call instead, once.
        Refused, it stays held; deferred, it still waits.
        """
        if action.tool is None or action.kind is ActionKind.LLM_CALL:
            return
        if decision.enforced is Effect.REQUIRE_APPROVAL:
            return  # still waiting (deferred): its hold is on record already
        conversation = action.request.conversation
        prepared = conversation.memo.get("prepared") if conversation is not None else None
        key = prepared.key if isinstance(prepared, _Prepared) else None
        if action.call_id and len(action.call_id) <= MAX_CALL_ID_CHARS:
            self._keep(
                CallRecord(
                    call_id=action.call_id,
                    decision_id=decision.decision_id,
                    tool=action.tool,
                    digest=history.arguments_digest(
                        action.arguments, action.raw_arguments or "", action.kind.value
                    ),
                    effect=decision.enforced.value,
                    session_id=_scope(action.agent.id, key),
                )
            )
        if decision.enforced is not Effect.ALLOW or not _counted(action):
            return
        # Let through: a call now, no longer held. Tainted now too, even if the agent
        # leaves the output out of its history.
        deltas = {
            f"calls:{action.tool}": 1,
            f"held:{action.tool}": -1,
            _waiting(action): -1,
            **{f"taint:{label}": 1 for label in self.labels_of(action.tool) if label == UNTRUSTED},
        }
        self._count(key, _named(action.tool, deltas))

    async def _record(
        self,
        action: Action,
        decision: Decision,
        conversation: Conversation | None,
        key: str | None,
    ) -> None:
        digest = history.arguments_digest(
            action.arguments, action.raw_arguments or "", action.kind.value
        )
        record = CallRecord(
            call_id=action.call_id or "",
            decision_id=decision.decision_id,
            tool=action.tool or "",
            digest=digest,
            effect=decision.enforced.value,
            session_id=_scope(action.agent.id, key),
        )
        if conversation is not None:
            # What the chain link needs, not the action: its request holds the
            # conversation, and that cycle left every request to the garbage collector.
            decided = (
                action.call_id,
                action.tool,
                action.arguments,
                action.raw_arguments,
                digest,
                action.kind.value,
            )
            conversation.memo.setdefault("decided", []).append(decided)
        self._keep(record)

    def _keep(self, record: CallRecord) -> None:
        """Remember a decided call, and queue it for the state store."""
        self._remember(record)
        # Not a call named with a control character or a lone surrogate (denied, but its
        # decision is recorded here too): PostgreSQL cannot store NUL, UTF-8 no
        # surrogate, and one such record failed the whole batch of other calls' records.
        if self._repo is not None and (record.call_id + record.tool).isprintable():
            # Off the decision path, as call links are (ADR 0005): this process
            # verifies from memory at once; the store serves restarts and other
            # sidecars, whose next request comes after the agent ran the tool.
            # One writer, one transaction for whatever queued while the last one ran.
            self._unwritten.append(record)
            if len(self._writes) == 0:
                self._writes.spawn(self._write_calls(), name="record-calls")

    async def _write_calls(self) -> None:
        assert self._repo is not None
        await asyncio.sleep(WRITE_COALESCE_S)  # the next decisions' calls join this transaction
        while self._unwritten:
            batch, self._unwritten = self._unwritten, []
            try:
                await self._repo.record_calls(batch)
            except Exception as exc:
                log.warning("could not record %d decided calls: %s", len(batch), type(exc).__name__)

    def _deltas(self, tool: str, effect: Effect, ran: bool = False) -> dict[str, int]:
        """The counters a decided call adds to; those named after its tool start
        with one of ``_BY_TOOL``. ``ran``: the provider ran it whatever the effect."""
        if effect is Effect.DENY:
            deltas = {"denials": 1}
        elif effect is Effect.REQUIRE_APPROVAL:
            deltas = {"approvals": 1, f"held:{tool}": 1}
        else:
            deltas = {f"calls:{tool}": 1}
        if effect is Effect.ALLOW or ran:
            for label in self.labels_of(tool):
                if label == UNTRUSTED:
                    deltas[f"taint:{label}"] = 1
        return deltas

    def proposed(self, actions: Sequence[Action]) -> None:
        """Calls of one answer, before any is decided: the labels of those the provider ran
        (:func:`provider_ran`) taint what every call of the answer, and the next ones of
        its request's stream, see as ``input.session.taints``."""
        for action in actions:
            conversation = action.request.conversation
            if conversation is not None and provider_ran(action):
                labels = self.labels_of(action.tool)
                if labels:
                    conversation.memo.setdefault("answer_taints", set()).update(labels)

    # -- Responses chains ----------------------------------------------------------

    async def settle(
        self, action: Action, outcome: Outcome, *, trusted: bool = False
    ) -> float | None:
        """Nothing to settle: counters count decisions, not outcomes."""
        return None

    def answer_started(self, response_id: str, agent_id: str) -> None:
        """A streamed answer named its id (before the agent sees it): it is ``agent_id``'s
        from now on, in this process, and in the store once its link is written."""
        if response_id not in self._streaming:
            self._streaming[response_id] = agent_id
            while len(self._streaming) > MAX_STREAMING:
                self._streaming.popitem(last=False)
            if self._repo is not None:
                self._writes.spawn(self._claim_answer(response_id, agent_id), name="answer-owner")

    async def _claim_answer(self, response_id: str, agent_id: str) -> None:
        try:
            await self._answers.claim("", response_id, agent_id)
        except Exception as exc:  # this sidecar still holds it; its link comes at the end
            log.warning("could not record a streamed answer's owner: %s", type(exc).__name__)

    async def record_response(
        self, conversation: Conversation, response_id: str, agent_id: str
    ) -> None:
        """Keep the link from a relayed Responses answer to the request and calls behind it,
        and to ``agent_id``, the agent it was made for."""
        if self._repo is None:
            return
        prepared = conversation.memo.get("prepared")
        session = prepared.session_id if isinstance(prepared, _Prepared) else None
        session = session or conversation.session_id
        if session is None:
            return
        entries: list[dict[str, Any]] = [_stored(c) for c in conversation.calls]
        entries += [{"call_id": i, "result": _result_doc(r)} for i, r in conversation.results]
        for call_id, tool, arguments, raw, digest, kind in conversation.memo.get("decided", ()):
            if call_id and tool is not None:
                entries.append(
                    {
                        "call_id": call_id,
                        "tool": tool,
                        "arguments": dict(arguments) if arguments is not None else None,
                        "raw": raw or "",
                        "digest": digest,
                        "kind": kind,
                    }
                )
        # Every approval request item the request carried: the provider may keep them, and
        # an approval continuing this answer names one by id (only copies of that kind count).
        entries += [
            {"approval_request": {"call_id": c.call_id, "tool": c.tool, "digest": c.digest}}
            for c in conversation.approval_requests
        ]
        if conversation.approval_requests_cut or conversation.provider_conversation is not None:
            # A provider conversation keeps items Warden does not collect: an answer made in
            # one is no whole chain for an approval continuing it.
            entries.append({"approval_requests_cut": True})
        for call_id, tool, wire_type, decision in conversation.memo.get("refused", ()):
            # Kept from the agent, not from the provider: what the request
            # continuing this answer must tell the model instead (owed_outputs).
            entries.append(
                {
                    "call_id": call_id,
                    "refused": {"type": wire_type, "output": refusal_text(tool, decision)},
                }
            )
        calls = orjson.dumps(entries).decode()
        if conversation.retrieved_id == response_id:
            await self._extend(response_id, session, calls)
            return
        link = ChainLink(response_id, session, conversation.previous_response_id, calls, agent_id)
        if response_id in self._unwritten_links:
            return  # the first record of an id stands
        written = asyncio.Event()
        self._unwritten_links[response_id] = (link, written)
        try:
            await self._repo.record_response(link)
            self._streaming.pop(response_id, None)
        except BaseException:
            # A fetch waiting for this write rebuilds the link from it instead.
            self._failed_links[response_id] = link
            while len(self._failed_links) > _FAILED_LINKS_KEPT:
                self._failed_links.popitem(last=False)
            raise
        finally:
            del self._unwritten_links[response_id]
            written.set()

    async def _extend(self, response_id: str, session: str, calls: str) -> None:
        """A stored answer fetched again: its calls join the link its request made."""
        assert self._repo is not None
        pending = self._unwritten_calls.setdefault(response_id, [])
        pending.append(calls)  # seen by requests continuing it from now on
        try:
            # A link this fetch makes names no agent: the agent that fetched an answer Warden
            # has no record of did not make it (its maker's record may still come).
            link = ChainLink(response_id, session, None, calls)
            writing = self._unwritten_links.get(response_id)
            if writing is not None:
                # Its first record stands, so that must be written first. Only should it
                # fail does this one rebuild the whole link: once written, the stored link
                # is merged with the fetch's calls alone (an erasure since then holds).
                await writing[1].wait()
            failed = self._failed_links.pop(response_id, None)
            if failed is not None:
                link = dataclasses.replace(failed, calls=merged_entries(failed.calls, calls))
            await self._repo.extend_response(link)
        finally:
            pending.remove(calls)
            if not pending and self._unwritten_calls.get(response_id) is pending:
                del self._unwritten_calls[response_id]

    # -- internals ---------------------------------------------------------------

    async def _prepare(self, conversation: Conversation, agent: str) -> _Prepared:
        found = conversation.memo.get("prepared")
        if isinstance(found, _Prepared):
            return found
        lock = conversation.memo.setdefault("lock", asyncio.Lock())
        async with lock:  # the calls of one response are decided together: prepare once
            found = conversation.memo.get("prepared")
            if isinstance(found, _Prepared):
                return found
            prepared = await self._build(conversation, agent)
            if self._config.handoffs:
                prepared = dataclasses.replace(prepared, not_theirs=None)
            elif conversation.provider_conversation is not None and prepared.not_theirs is None:
                prepared = await self._own_conversation(prepared, conversation, agent)
            conversation.memo["prepared"] = prepared
            return prepared

    async def _build(self, conversation: Conversation, agent: str) -> _Prepared:
        calls = list(conversation.calls)
        session_id, source = conversation.session_id, conversation.session_source
        not_theirs: str | None = None
        unread: str | None = None
        chained: Mapping[str, Sequence[PriorCall]] = {}
        # A provider conversation keeps every earlier request's items, which Warden does not
        # collect: approvals in one cannot be checked against all the copies the provider holds.
        cut = conversation.approval_requests_cut or conversation.provider_conversation is not None
        if conversation.previous_response_id is not None:
            chain = await self._chain(conversation)
            chained, cut = chain.approval_requests, cut or chain.approval_requests_cut
            calls = _merge(chain.calls, conversation)
            if session_id is None:
                # An answer Warden has no link for: a session of its own from here, so the
                # answers after it are linked (and bound to their agent) again.
                session_id, source = chain.session_id or new_id("ses"), NEW_CHAIN
            if chain.agent_id is not None and chain.agent_id != agent:
                named = conversation.retrieved_id or conversation.previous_response_id
                not_theirs = f"the Responses answer {named} was made for another agent"
            if chain.unread:
                unread = "the Responses answer this request continues"
        asked = [a.request_id for a in conversation.approvals if a.request_id is not None]
        # Results whose call the request does not carry (a refused call the provider ran,
        # whose separate result item reached the agent): Warden's record names the tool.
        carried_ids = {c.call_id for c in calls}
        orphans = [i for i, _ in conversation.results if i not in carried_ids]
        records = await self._records([c.call_id for c in calls] + asked + orphans)
        if source in (None, NEW_CHAIN) and conversation.previous_response_id is None:
            # A request that names no session and continues no chain, whose input
            # carries calls Warden decided in one (an agent that sends the whole
            # conversation every turn): it goes on in that session.
            carried = _carried_session(calls, records, agent)
            if carried is not None:
                session_id, source = carried, "calls"
        docs: list[Mapping[str, Any]] = []
        taints: set[str] = set()
        verified_all = True
        key = f"{agent}\x1f{session_id}" if session_id is not None else None
        scope = _scope(agent, key)
        for call in calls:
            mine = [r for r in records.get(call.call_id, ()) if _same_conversation(r, scope)]
            match = _matching(mine, call)
            verified = match is not None and match.effect == Effect.ALLOW.value
            verified_all = verified_all and verified
            labels = self.labels_of(call.tool)
            if call.result is not None:
                taints.update(labels)
            docs.append(_entry(call, match, verified, labels))
        for tool in conversation.answered_tools:
            # Calls past the kept window: their output entered the conversation too.
            taints.update(self.labels_of(tool))
        unknown_results = False
        for call_id in orphans:
            # A call by that id, whoever decided it (a handoff passes the input on),
            # whatever became of it: its output is here. With no record at all (pruned,
            # never kept, the store unread) what it was is unknown, as past the bounds.
            found = records.get(call_id, ())
            unknown_results = unknown_results or not found
            for record in found:
                taints.update(self.labels_of(record.tool))
        unapproved = _unapproved_request(
            conversation.approvals,
            chained,
            cut,
            records,
            scope,
            agent=None if self._config.handoffs else agent,
        )
        return _Prepared(
            tuple(docs),
            key,
            session_id,
            source,
            frozenset(taints),
            verified_all,
            not_theirs,
            unread,
            unapproved,
            unknown_results,
        )

    async def _own_conversation(
        self, prepared: _Prepared, conversation: Conversation, agent: str
    ) -> _Prepared:
        """``prepared``, refused if the provider conversation the request names is another
        agent's; the first agent to use one through Warden owns it."""
        named = conversation.provider_conversation
        assert named is not None
        if usable_session(named) != named:
            # Not an id a provider gives (conv_ and some fifty characters): claimed, a
            # 3 MB one would be kept in memory and in the state store for days.
            return dataclasses.replace(
                prepared,
                not_theirs=(
                    f"the conversation id is not one a provider gives (1 to {MAX_SESSION_ID} "
                    "printable characters)"
                ),
            )
        try:
            # Conversation ids are the provider's, not an upstream entry's: one scope.
            mine = await self._conversations.claim("", named, agent)
        except Exception as exc:
            log.warning("could not check a conversation's owner: %s", type(exc).__name__)
            return dataclasses.replace(prepared, unread=f"the owner of conversation {named}")
        if mine:
            self._conversations.used("", named, agent)
            return prepared
        return dataclasses.replace(
            prepared, not_theirs=f"the conversation {named} belongs to another agent"
        )

    async def _chain(self, conversation: Conversation) -> _Chain:
        """The calls a Responses chain carried before this request, from Warden's records."""
        head = conversation.previous_response_id
        if self._repo is None or head is None:
            return _Chain([], None, self._streaming.get(head) if head else None)
        links: list[ChainLink] = []
        seen: set[str] = set()
        start: str | None = head
        # Answered a moment ago, not in the store yet: from memory, newest first.
        while start is not None and start not in seen and len(links) < MAX_CHAIN:
            writing = self._unwritten_links.get(start)
            if writing is None:
                break
            seen.add(start)
            links.append(writing[0])
            start = writing[0].previous_id
        whole = True
        try:
            if start is not None and start not in seen and len(links) < MAX_CHAIN:
                links += await self._repo.chain(start, limit=MAX_CHAIN - len(links))
        except Exception as exc:
            log.warning("could not read a Responses chain: %s", type(exc).__name__)
            if not links:
                return _Chain([], None, self._streaming.get(head), unread=True)
            whole = False
        # Read to its first answer, which Warden relayed itself (a link a fetch made for an
        # answer it had no record of names no agent): else the provider may keep items
        # (approval requests an agent carried) that no link here shows.
        whole = whole and bool(links) and links[-1].previous_id is None and bool(links[-1].agent_id)
        links = [self._with_unwritten_calls(link) for link in links]
        calls: dict[str, PriorCall] = {}
        owed: dict[str, tuple[str, str]] = {}
        copies: dict[str, list[PriorCall]] = {}
        cut = False
        for link in reversed(links):  # oldest first
            try:
                entries = orjson.loads(link.calls)
            except orjson.JSONDecodeError:
                continue
            continued = link.response_id == head
            for entry in entries if isinstance(entries, list) else ():
                _apply_stored(calls, entry, self._config.max_result_chars)
                cut = _approval_copy(copies, entry) or cut
                if continued:
                    _owed(owed, entry)
        if owed:
            conversation.memo["owed"] = owed
        newest = links[0] if links else None
        owner, unread = await self._owner_of(head, newest)
        return _Chain(
            list(calls.values()),
            (newest.session_id or None) if newest is not None else None,  # erased: none
            owner,
            unread=unread,
            approval_requests=copies,
            approval_requests_cut=cut or not whole,
        )

    async def _owner_of(self, head: str, newest: ChainLink | None) -> tuple[str | None, bool]:
        """The agent the answer ``head`` was made for, and whether that could not be read.

        Its link says, when there is one that names an agent. Without one (the answer
        still streams to its agent, here or on another sidecar, or is not Warden's), or
        with one naming none (a fetch made it, maybe mid-stream, or it predates agents),
        the owner row written at the stream's first event decides.
        """
        if newest is not None and newest.response_id == head and newest.agent_id is not None:
            return newest.agent_id, False
        if newest is not None and newest.response_id != head:
            return None, False  # the chain goes on past what Warden kept: not bound
        return await self._streaming_owner(head)

    async def _streaming_owner(self, response_id: str) -> tuple[str | None, bool]:
        """The agent an answer was made for by its owner row (written at its stream's first
        event), and whether the store could not be read."""
        owner = self._streaming.get(response_id)
        if owner is not None:
            return owner, False
        try:
            return await self._answers.owner("", response_id), False
        except Exception as exc:
            log.warning("could not read an answer's owner: %s", type(exc).__name__)
            return None, True

    def _with_unwritten_calls(self, link: ChainLink) -> ChainLink:
        for calls in self._unwritten_calls.get(link.response_id, ()):
            link = dataclasses.replace(link, calls=merged_entries(link.calls, calls))
        return link

    async def _records(self, call_ids: Sequence[str]) -> dict[str, tuple[CallRecord, ...]]:
        out: dict[str, tuple[CallRecord, ...]] = {}
        missing: list[str] = []
        for call_id in call_ids:
            known = self._known.get(call_id)
            if known is None:
                missing.append(call_id)
            else:
                out[call_id] = known
        if missing and self._repo is not None:
            try:
                stored = await self._repo.calls(missing)
            except Exception as exc:
                # Unverifiable is unverified: a policy that needs verified history holds.
                log.warning("could not read decided calls: %s", type(exc).__name__)
                stored = {}
            for call_id, rows in stored.items():
                out[call_id] = kept = tuple(rows[-MAX_PER_CALL_ID:])
                self._known[call_id] = kept
            self._trim()
        return out

    def _remember(self, record: CallRecord) -> None:
        earlier = self._known.get(record.call_id, ())[-(MAX_PER_CALL_ID - 1) :]
        self._known[record.call_id] = (*earlier, record)
        self._known.move_to_end(record.call_id)
        self._trim()

    def _trim(self) -> None:
        while len(self._known) > MAX_KNOWN:
            self._known.popitem(last=False)


def _carried_session(
    calls: Sequence[PriorCall], records: Mapping[str, Sequence[CallRecord]], agent: str
) -> str | None:
    """The session of the latest of ``calls`` that Warden decided for ``agent`` in one."""
    mine = f"{agent}\x1f"
    for call in reversed(calls):
        match = _matching(records.get(call.call_id, ()), call)
        decided_in = match.session_id if match is not None else None
        # The agent and separator alone: decided in no session, nothing to carry.
        if decided_in and decided_in.startswith(mine) and (session := decided_in[len(mine) :]):
            return session
    return None


def _named(tool: str, deltas: dict[str, int]) -> dict[str, int]:
    """``deltas`` without the counters named after ``tool`` when it cannot name one.

    Such a row would hold the name for ``ttl_s``, and a store cannot keep NUL or
    a lone surrogate (its add was retried for good); the session's denials,
    approvals and taints still count the call.
    """
    if len(tool) <= MAX_SESSION_ID and tool.isprintable():
        return deltas
    return {k: n for k, n in deltas.items() if not k.startswith(_BY_TOOL)}


def _waiting(action: Action) -> str:
    """The counter that says a call is held in its session (1) or not (0 or less).

    Named after a digest of what makes it the same call when the agent proposes
    it again (tool, arguments, where it goes, its context, an MCP retry's
    answers), like the digest the call's record keeps; never after the tool name
    or the arguments. At least as fine as the approval's binding on the same
    terms: the same change for another customer (``X-Warden-Context-*``) is
    another hold, never one counted already.
    """
    request = action.request
    answers = action.input_responses
    same = "\x1f".join(
        (
            action.tool or "",
            history.arguments_digest(
                action.arguments, action.raw_arguments or "", action.kind.value
            ),
            request.upstream,
            request.method,
            action.request_sha256 or "",
            history.arguments_digest(answers) if answers else "",
            history.arguments_digest(action.context) if action.context else "",
        )
    ).encode("utf-8", "surrogatepass")
    return _WAITING + hashlib.sha256(same).hexdigest()[:32]


def _counted(action: Action) -> bool:
    """Whether deciding ``action`` adds to its session's counters (a proposed tool call).

    Not a model call, a listing, or an MCP argument completion (sent as the user
    types: counted, each keystroke would take the session's turn and its count).
    """
    return (
        action.kind not in (ActionKind.LLM_CALL, ActionKind.ARGUMENT_COMPLETION)
        and action.stage is not Stage.LIST
    )


def _scope(agent: str, key: str | None) -> str:
    """Where a call is decided, as its record keeps it: the session's key (agent and
    session id, joined by a unit separator), or the agent and separator alone in none."""
    return key if key is not None else f"{agent}\x1f"


def _same_conversation(record: CallRecord, scope: str) -> bool:
    """Whether ``record`` was decided in the conversation whose scope is ``scope``.

    In a session: the same session id, whichever agent decided it (an agent
    handing off passes the history on). In none: the same agent, in none.
    A record from before records named their scope (``None``) matches nothing.
    """
    if record.session_id is None:
        return False
    agent, _, session = scope.partition("\x1f")
    decided_by, _, decided_in = record.session_id.partition("\x1f")
    if session:
        return decided_in == session
    return not decided_in and decided_by == agent


def _matching(records: Iterable[CallRecord], call: PriorCall) -> CallRecord | None:
    """The newest record of the same tool and arguments, preferring one that let it through."""
    matches = [r for r in records if r.tool == call.tool and r.digest == call.digest]
    for record in reversed(matches):
        if record.effect == Effect.ALLOW.value:
            return record
    return matches[-1] if matches else None


def _result_doc(result: PriorResult) -> dict[str, Any]:
    return {
        "content": result.content,
        "size": result.size,
        "digest": result.digest,
        "is_error": result.is_error,
    }


def _entry(
    call: PriorCall, record: CallRecord | None, verified: bool, labels: tuple[str, ...]
) -> Mapping[str, Any]:
    arguments = dict(call.arguments) if call.arguments is not None else None
    if arguments is not None and input_problem(arguments) is not None:
        arguments = None  # what the engine cannot take exactly is not shown at all
    return {
        "call_id": call.call_id,
        "tool": call.tool,
        "arguments": arguments,
        "result": _result_doc(call.result) if call.result is not None else None,
        "decision": (
            {"id": record.decision_id, "effect": record.effect} if record is not None else None
        ),
        "verified": verified,
        "labels": list(labels),
    }


def provider_ran(action: Action) -> bool:
    """Whether the provider ran ``action`` before Warden saw it: a hosted tool, the
    provider's MCP call, or a shell call unless the request gave only the agent's own
    shell, in a model's answer. Warden's decision only keeps its call from the agent."""
    if action.stage is not Stage.PROPOSED:
        return False
    if action.kind in (ActionKind.HOSTED_TOOL_CALL, ActionKind.MCP_CALL):
        return True
    if action.wire_type != "shell_call":
        return False
    # The agent's own shell only where the request says so: a local shell declared, and
    # no other (a container, or a stored prompt's unknown tools). A request declaring
    # none (a background answer fetched by id) cannot tell: the provider's, for taint.
    shells = [t for t in action.request.tools if t.get("type") in ("shell", "prompt")]
    return not shells or any(
        tool.get("type") == "prompt" or history.hosted_environment(tool.get("environment"))
        for tool in shells
    )


def _session_doc(
    prepared: _Prepared, counters: Mapping[str, int], available: bool, conversation: Conversation
) -> dict[str, Any]:
    calls = {k.removeprefix("calls:"): v for k, v in counters.items() if k.startswith("calls:")}
    # Held and not let through: none once approved calls went (never below none).
    held = {
        k.removeprefix("held:"): v for k, v in counters.items() if k.startswith("held:") and v > 0
    }
    taints = set(prepared.taints)
    taints.update(k.removeprefix("taint:") for k, v in counters.items() if k.startswith("taint:"))
    taints.update(conversation.memo.get("answer_taints", ()))
    return {
        "conversation": conversation.carried,
        "id": prepared.session_id,
        "source": prepared.source,
        "calls": calls,
        "held": held,
        "calls_total": sum(calls.values()),
        "denials": counters.get("denials", 0),
        "approvals": counters.get("approvals", 0),
        "taints": sorted(taints),
        "verified": prepared.verified,
        "truncated": conversation.truncated or prepared.unknown_results,
        "available": available,
    }


def _unavailable(ctx: GuardContext, what: str) -> Decision:
    return Decision(
        decision_id=new_id("dec"),
        effect=Effect.DENY,
        reasons=(
            f"the state store is unavailable, so {what} cannot be read "
            "(state.on_unavailable: deny)",
        ),
        mode=ctx.mode if ctx.mode is Mode.ENFORCE else Mode.OBSERVE,
        guard="session",
        error="state_unavailable",
    )


_FAILED_LINKS_KEPT: Final = 256


def _unapproved_request(
    approvals: Sequence[HostedApproval],
    chained: Mapping[str, Sequence[PriorCall]],
    cut: bool,
    records: Mapping[str, Sequence[CallRecord]],
    scope: str,
    *,
    agent: str | None,
) -> str | None:
    """The first approval naming a hosted MCP call Warden did not allow, as the denial says it.

    Every copy of the approval request with the approval's id, the ones the
    input carries and the ones in the chain the request continues (decided in
    its answers, or carried by its requests), must match a decided approval
    request (the tool, and the arguments by their kind-prefixed digest) that
    Warden let through in this conversation, for ``agent`` (``None``: any
    agent, with ``sessions.handoffs``). No copy at all, an approval naming no
    request by text, and any approval when more copies came than were kept
    (``cut``) are named too.
    """
    if approvals and cut:
        return (
            "hosted MCP calls whose copies the provider keeps Warden cannot check whole "
            "(more than 256 approval requests in a request, a provider conversation, or a "
            "chain Warden cannot read back to its first answer)"
        )
    for approval in approvals:
        request_id = approval.request_id
        if request_id is None:
            return "an approval naming no request by its id"
        requests = [*approval.requests, *chained.get(request_id, ())]
        mine = [
            r
            for r in records.get(request_id, ())
            if _same_conversation(r, scope) and (agent is None or _decided_by(r) == agent)
        ]
        if not requests or not all(
            (match := _matching(mine, request)) is not None and match.effect == Effect.ALLOW.value
            for request in requests
        ):
            return f"the hosted MCP call {request_id[:80]}"
    return None


def _decided_by(record: CallRecord) -> str | None:
    """The agent a record's call was decided for (its scope's first part)."""
    return record.session_id.partition("\x1f")[0] if record.session_id is not None else None


def _unapproved(ctx: GuardContext, what: str) -> Decision:
    """An approval the provider would act on, of a hosted MCP call Warden never let through:
    one the agent wrote itself, rewrote, or that Warden denied."""
    return _session_denial(
        ctx,
        f"the request approves {what}, which Warden did not allow with these arguments "
        "in this conversation; the provider would run it",
    )


def _not_theirs(ctx: GuardContext, what: str) -> Decision:
    """Another agent's stored answer or conversation: with one upstream key for all
    (Warden's), the provider cannot keep agents apart, so Warden does. The owner is not
    named."""
    return _session_denial(
        ctx,
        f"{what}; an agent may only continue, fetch or delete its own answers and conversations",
    )


def _session_denial(ctx: GuardContext, reason: str) -> Decision:
    # Unchecked: the policy then sees no history or session of this request.
    return Decision(
        decision_id=new_id("dec"),
        effect=Effect.DENY,
        reasons=(reason,),
        error=UNCHECKED,
        mode=ctx.mode,
        guard="session",
    )


def _stored(call: PriorCall) -> dict[str, Any]:
    out: dict[str, Any] = {
        "call_id": call.call_id,
        "tool": call.tool,
        "arguments": dict(call.arguments) if call.arguments is not None else None,
        "digest": call.digest,
    }
    if call.result is not None:
        out["result"] = _result_doc(call.result)
    return out


def _apply_stored(calls: dict[str, PriorCall], entry: Any, limit: int) -> None:
    """Replay one stored chain entry (a call, or a result for an earlier call)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("call_id"), str):
        return
    call_id = entry["call_id"]
    result = entry.get("result")
    found = (
        PriorResult(
            content=str(result.get("content", ""))[:limit],
            size=int(result.get("size", 0)),
            digest=str(result.get("digest", "")),
            is_error=result.get("is_error") is True,
        )
        if isinstance(result, dict)
        else None
    )
    tool = entry.get("tool")
    if isinstance(tool, str):
        arguments = entry.get("arguments")
        arguments = arguments if isinstance(arguments, dict) else None
        digest = entry.get("digest")
        if not isinstance(digest, str):
            digest = history.arguments_digest(arguments, str(entry.get("raw", "")))
        calls.pop(call_id, None)
        calls[call_id] = PriorCall(call_id, tool, arguments, digest, found)
    elif found is not None and call_id in calls:
        old = calls[call_id]
        calls[call_id] = PriorCall(old.call_id, old.tool, old.arguments, old.digest, found)


def _approval_copy(copies: dict[str, list[PriorCall]], entry: Any) -> bool:
    """Keep a stored entry that is a hosted MCP approval request (decided in an answer, or
    carried by a request); True for the mark of a request that carried too many."""
    if not isinstance(entry, dict):
        return False
    if entry.get("approval_requests_cut") is True:
        return True
    stored = entry.get("approval_request")
    if stored is None and entry.get("kind") == history.APPROVAL_REQUEST:
        stored = entry
    if not isinstance(stored, dict):
        return False
    call_id, tool, digest = stored.get("call_id"), stored.get("tool"), stored.get("digest")
    if isinstance(call_id, str) and isinstance(tool, str) and isinstance(digest, str):
        arguments = stored.get("arguments")
        copy = PriorCall(call_id, tool, arguments if isinstance(arguments, dict) else None, digest)
        copies.setdefault(call_id, []).append(copy)
    return False


def _owed(owed: dict[str, tuple[str, str]], entry: Any) -> None:
    """Collect a stored entry of a call Warden kept from the agent: id -> (item type, text)."""
    refused = entry.get("refused") if isinstance(entry, dict) else None
    if not isinstance(refused, dict):
        return
    kind, text = refused.get("type"), refused.get("output")
    if isinstance(kind, str) and isinstance(text, str):
        owed[entry["call_id"]] = (kind, text)


def _merge(earlier: list[PriorCall], conversation: Conversation) -> list[PriorCall]:
    """The chain's calls, then this request's; this request's results answer either."""
    calls = {c.call_id: c for c in earlier}
    for call_id, result in conversation.results:
        old = calls.get(call_id)
        if old is not None:
            calls[call_id] = PriorCall(old.call_id, old.tool, old.arguments, old.digest, result)
    for call in conversation.calls:
        calls.pop(call.call_id, None)
        calls[call.call_id] = call
    return list(calls.values())
