"""The MCP stdio door: Warden between an MCP client and a stdio server it launches.

``warden mcp wrap -- <command>`` puts this door where the client expected the
server: the client writes newline-delimited JSON-RPC to Warden's stdin, the
door runs ``command`` as a child and relays both ways. Every ``tools/call`` is
decided by the core before the child sees it; a denied or held one is answered
by Warden with an ``isError`` tool result, so the child never receives it. So
are ``resources/read``, ``prompts/get`` and ``completion/complete``
(:data:`warden.protocols.mcp.GOVERNED`), refused with a JSON-RPC error. The
child's answer to an allowed call is recorded as its trusted outcome. A kill
switch thrown while a call runs answers it at once and tells the child to
cancel it (``notifications/cancelled``); the child's late answer is dropped.
A request the child never answers, as it exited or Warden stopped, gets
Warden's error (:data:`SERVER_GONE`) and a call its outcome, not trusted.

The child's own requests (elicitation, sampling, roots) reach the client, and
the client's answer to one is decided before it reaches the child: each
allowed call running when the child asked is decided again with the answer
among its ``input_responses`` (:func:`warden.protocols.mcp.with_answer`),
and all must allow it; an answer tied to no such call, or not allowed, goes
to the child as Warden's error instead.

``tools/list`` answers from the child are filtered for the agent: a tool the
policy denies in every case is left out (:meth:`Governor.hidden_tools`).

Calls are decided concurrently, each in its own task, so a call held for
approval blocks nothing else of the session (pings, other calls). Every
other client message goes to the child at once, in the order sent. While a
call is held, a client that sent ``params._meta.progressToken`` gets
``notifications/progress`` every ``keepalive_s``. A cancellation never
overtakes its call: one for a call still being decided ends the decision
(a held approval stays decidable, as a deferral) and neither reaches the
child; an allowed call is written to the child before its decision task
ends, so a cancellation read after that follows it.

Every call of the connection belongs to one session (``input.session``),
named by ``session`` (``warden mcp wrap`` gives a fresh id per run, or the
one ``--session`` names): one stdio connection is one MCP client session,
as ``Mcp-Session-Id`` is over HTTP, and both doors hand it to the session
guard the same way (:func:`warden.sessions.door_conversation`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from warden import tasks
from warden.errors import AuditError, Overloaded, WardenError
from warden.killswitch import KillSwitch, KillSwitches
from warden.model import Action, Agent, Decision, Effect, Outcome, ToolCall
from warden.ops import metrics
from warden.protocols import mcp
from warden.protocols._wire import loads
from warden.protocols.declared_arguments import ListedArguments
from warden.sessions import door_conversation

if TYPE_CHECKING:
    from warden.core import Governor

__all__ = ["StdioDoor"]

log = logging.getLogger("warden.mcp")

MAX_LINE = 64 * 1024 * 1024
"""The longest JSON-RPC line relayed (tool results can carry large documents)."""
CANCELLED_KEPT = 1024
"""Cancelled requests whose late answers are still told apart (and their ids kept in use)."""
DRAIN_S = 5.0
"""How long a stop goes on relaying what the child wrote before it exited: moments, as
it is all in the pipe by then, unless a process the child started holds its stdout open."""
SERVER_GONE = -32000
"""The JSON-RPC error code of a request the server never answered, as it exited or Warden
stopped it: the code the HTTP door answers a server it lost with (``WARDEN_ERROR``)."""
_UNANSWERED = {
    "server_exited": "[Warden] the MCP server exited before it answered",
    "wrap_stopped": "[Warden] Warden stopped before the MCP server answered",
}


@dataclass(slots=True)
class _Pending:
    """An allowed call on its way to the child: what its answer is recorded against."""

    action: Action
    decision: Decision
    started: float


@dataclass(slots=True)
class _Batch:
    """A client batch partly answered by Warden: merged into the child's batch answer."""

    ids: set[str | int]
    answers: list[dict[str, Any]] = field(default_factory=list)


class StdioDoor:
    """Relays one stdio MCP session between ``client`` streams and a child server."""

    name = "mcp-stdio"

    def __init__(
        self,
        command: Sequence[str],
        *,
        agent: Agent,
        prove: Callable[[], Awaitable[Agent]] | None = None,
        upstream: str,
        client_in: asyncio.StreamReader,
        client_out: asyncio.WriteTransport | asyncio.StreamWriter,
        grace_s: float = 5.0,
        killswitches: Callable[[], KillSwitches | None] = lambda: None,
        keepalive_s: float = 10.0,
        session: str | None = None,
        session_source: str = "mcp",
        session_owned: bool = False,
        trusts_failures: bool = False,
        withheld_env: Collection[str] = (),
    ) -> None:
        """``killswitches``: where to find the switches in force once Warden runs.

        ``prove``: proves ``agent`` again before each tool call (raising
        :class:`~warden.errors.WardenError` when it no longer can, as for an expired
        token); ``None``: proved once for the whole session.

        ``keepalive_s``: how often a held call's client hears progress.
        ``session``: the session every call of this connection is counted in
        (``input.session.id``; ``session_source`` is its ``source``); ``None``: none.
        ``session_owned``: no other process counts calls in it (a fresh id), so its
        counters are kept in memory after one read (:attr:`Conversation.owned`).
        ``trusts_failures``: the server reports a failure only when its tool did not act
        (``budgets.trusted_failures``), so one releases what a cap holds for the call.
        ``withheld_env``: variables of Warden's the child must not inherit (the
        upstream keys Warden holds), beside every ``WARDEN_*`` one.
        """
        self._command = tuple(command)
        self._withheld_env = frozenset(withheld_env)
        self._agent = agent
        self._prove = prove
        self._upstream = upstream
        self._trusts_failures = trusts_failures
        self._in = client_in
        self._out = client_out
        self._grace_s = grace_s
        self._killswitches = killswitches
        self._killed: set[str | int] = set()
        self._core: Governor | None = None
        self._child: asyncio.subprocess.Process | None = None
        self._pending: dict[str | int, _Pending] = {}
        self._batches: list[_Batch] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._reader: asyncio.Task[None] | None = None
        """The task relaying the child's output, read to its end before the door stops."""
        self._keepalive_s = keepalive_s
        self._session = session
        self._session_source = session_source
        self._session_owned = session_owned
        self._deciding: dict[str | int, asyncio.Task[Any]] = {}
        self._in_batches: dict[str | int, asyncio.Task[dict[str, Any]]] = {}
        """Calls of a batch still decided together: a stop sends the answers of those
        already decided (a denial) that the batch would have sent."""
        """Calls being decided, by id: a cancellation for one ends its decision."""
        self._calls = tasks.Tasks("mcp-stdio-calls")
        self._listing: set[str | int] = set()
        """Ids of the client's ``tools/list`` requests the child has not answered yet."""
        self._tools = ListedArguments()
        """The child's tools' argument names, from its ``tools/list`` answers."""
        self._asked: set[str | int] = set()
        """Ids of the client's other requests the child has not answered yet."""
        self._cancelled: OrderedDict[str | int, None] = OrderedDict()
        """Ids of requests the client cancelled after the child got them (the latest
        :data:`CANCELLED_KEPT`): still in use, as the child may answer late."""
        self._unsent: set[str | int] = set()
        """Calls of a batch still being decided: allowed ones wait here for the others."""
        self._questions: mcp.Questions[tuple[str | int, _Pending]] = mcp.Questions()
        """The child's requests waiting for the client's answer, each with the allowed
        calls (id, pending) that were running when it asked: one of them asked."""
        self.done = asyncio.Event()
        """Set when the session is over: the client closed its end, or the child exited."""
        self.returncode: int | None = None

    async def start(self, core: Governor) -> None:
        """Launch the child and begin relaying."""
        self._core = core
        self._child = await asyncio.create_subprocess_exec(
            *self._command,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=MAX_LINE,
            env=child_env(os.environ, self._withheld_env),
        )
        self._reader = tasks.spawn(self._from_child(), name="mcp-from-child")
        self._tasks = [
            tasks.spawn(self._from_client(), name="mcp-from-client"),
            self._reader,
            tasks.spawn(self._watch_switches(), name="mcp-kill-switches"),
        ]

    async def stop(self) -> None:
        """Close the child's stdin, give it the grace period to exit, then kill it.

        What the child wrote before it exited still goes out; every request it
        left unanswered is then answered with Warden's error (:meth:`_unanswered`).
        """
        child = self._child
        reader = self._reader
        # Still reading: Warden stops the server, rather than the server ending first.
        stopping = reader is not None and not reader.done()
        if child is not None:
            if child.stdin is not None and not child.stdin.is_closing():
                child.stdin.close()
            try:
                await asyncio.wait_for(child.wait(), self._grace_s)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    child.kill()
                await child.wait()
            self.returncode = child.returncode
        if reader is not None:
            # The child's last answers (to calls, to listings being filtered) go out and
            # settle their calls before anything is taken as unanswered.
            await asyncio.wait([reader], timeout=DRAIN_S)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # Decisions still waiting (held calls are answered as deferred before this).
        undecided = list(self._deciding)
        await self._calls.cancel()
        self._unanswered("wrap_stopped" if stopping else "server_exited", undecided)
        self.done.set()

    def _unanswered(self, error: str, undecided: list[str | int]) -> None:
        """Answer the client's requests the child never answered; record each call's outcome.

        ``error``: ``server_exited`` (the server's output ended first) or
        ``wrap_stopped``. Not trusted for a call sent to the server: it may have
        acted before it went, so what a cap holds for the call is not released.
        Trusted (``not_sent``) for an allowed call still held back with its batch:
        Warden knows it never ran. ``undecided``: calls whose decision the stop cut.
        """
        why = _UNANSWERED[error]
        for task in self._in_batches.values():
            # Decided (a denial) before the stop cut its batch: the batch would have sent it.
            decided = task.done() and not task.cancelled() and task.exception() is None
            if decided and "method" not in (answer := task.result()):
                self._to_client(answer)
        self._in_batches.clear()
        for batch in self._batches:
            if batch.answers:  # Warden's own answers to a batch the child never answered
                self._to_client(batch.answers)
        for id_, pending in self._pending.items():
            sent = id_ not in self._unsent
            if self._core is not None:
                latency = (time.perf_counter() - pending.started) * 1000
                outcome = Outcome(
                    error=error if sent else "not_sent", is_error=True, latency_ms=latency
                )
                self._core.outcome(pending.action, pending.decision, outcome, trusted=not sent)
            said = f"{why}; it may have run" if sent else f"{why}; it was not sent to the server"
            self._to_client(mcp.error_response(id_, SERVER_GONE, said))
        for id_ in undecided:
            if id_ not in self._pending:
                said = "[Warden] Warden stopped before it decided this call; it did not run"
                self._to_client(mcp.error_response(id_, SERVER_GONE, said))
        for id_ in (*self._asked, *self._listing):
            self._to_client(mcp.error_response(id_, SERVER_GONE, why))
        self._batches.clear()
        self._pending.clear()
        self._asked.clear()
        self._listing.clear()

    # -- client to child -------------------------------------------------------

    async def _from_client(self) -> None:
        try:
            while line := await self._in.readline():
                if line.strip():
                    await self._client_payload(line)
        except (ValueError, asyncio.LimitOverrunError):
            log.error("mcp client sent a line longer than %d bytes; closing", MAX_LINE)
        finally:
            # The client is gone: the child's stdin closes, and it exits in its own time,
            # up to the grace period (a child, or a process it started, holding its
            # stdout open would keep the wrap running for good).
            if self._child is not None and self._child.stdin is not None:
                self._child.stdin.close()
                asyncio.get_running_loop().call_later(self._grace_s, self.done.set)

    async def _client_payload(self, line: bytes) -> None:
        payload = mcp.parse(line)
        if payload.batch:
            if any(m.call is not None for m in payload.messages):
                # Decided in its own task; the batch is answered as one, as before.
                self._calls.spawn(self._client_batch(payload), name="batch")
                return
            refused, left = await self._screened(payload.messages)
            forward, answers = self._pass_through(left)
            if forward:
                await self._to_child(forward)
            if answers or refused:
                self._to_client([*refused, *answers])
            return
        (message,) = payload.messages
        if message.error is not None:
            self._to_client(dict(message.error))
        elif message.call is not None:
            self._start_call(message)
        else:
            refused, left = await self._screened(payload.messages)
            if refused:
                self._to_client(refused[0])
                return
            forward, answers = self._pass_through(left)
            if forward:
                await self._to_child(forward[0])
            if answers:
                self._to_client(answers[0])

    def _pass_through(self, messages: Sequence[mcp.Message]) -> tuple[list[Any], list[Any]]:
        """Messages other than calls: what to forward, and Warden's answers to invalid ones."""
        forward: list[Any] = []
        answers: list[Any] = []
        for message in messages:
            if message.error is not None:
                # JSON-RPC answers no error for an invalid notification, but one without
                # an id cannot be told from one; each invalid message gets its answer.
                answers.append(dict(message.error))
            elif message.call is None and mcp.client_result(message) is not None:
                # An answer to the child's request: decided in its own task (a held
                # approval must not stop the session), then sent on its own.
                self._calls.spawn(self._relay_answer(message), name="answer")
            elif message.call is None:
                assert message.body is not None
                id_ = message.body.get("id") if "method" in message.body else None
                if "method" not in message.body and message.id is not None:
                    # An error answer (or Warden's in a refused answer's place): the
                    # child's request fails whatever it says; it is no longer open.
                    self._questions.answered(message.id)
                if id_ is not None and self._in_use(id_):
                    answers.append(mcp.id_in_use(id_))
                elif self._forwardable(message.body):
                    forward.append(message.body)
        return forward, answers

    def _in_use(self, id_: str | int) -> bool:
        """Whether a request with this id still waits for the child's answer.

        The child's answer names only the id: a second request with it would
        have its answer recorded as the first's (a bogus request's error as a
        refund's trusted failure, which releases the refund's reservation).
        """
        # Compared as the server routes answers (mcp.id_key): 1 and "1" are one id there.
        key = mcp.id_key(id_)
        return any(
            mcp.id_key(held) == key
            for held in itertools.chain(
                self._pending,
                self._killed,
                self._deciding,
                self._asked,
                self._listing,
                self._cancelled,
            )
        )

    def _forwardable(self, body: Mapping[str, Any]) -> bool:
        """Note what the child's answer needs; False for a cancellation that must not go on."""
        method = body.get("method")
        if method == "tools/list" and "id" in body:
            self._listing.add(body["id"])
        elif method is not None and "id" in body:
            self._asked.add(body["id"])
        elif method == "notifications/cancelled":
            params = body.get("params")
            target = mcp.valid_id(params.get("requestId")) if isinstance(params, dict) else None
            if target is None:
                return True
            # The child reads the id as the SDKs do (1 and "1" are one id: mcp.id_key).
            deciding = _held(self._deciding, target)
            if deciding is not None:
                # The child never saw the call: end its decision, and tell the child nothing.
                self._deciding[deciding].cancel()
                return False
            self._cancel_sent(target)
        return True

    def _cancel_sent(self, target: str | int) -> None:
        """The client cancelled a request the child has: nobody waits for its answer.

        A child need not answer a cancelled request, so the call's outcome is
        recorded now (not trusted: it may have run), and a late answer dropped.
        """
        # The request as it was sent: the child answers under that id.
        found = _held(self._pending, target)
        if found is None:
            found = _held(self._asked, target)
        if found is None:
            return
        target = found
        pending = self._pending.pop(target, None)
        self._asked.discard(target)
        if pending is not None and self._core is not None:
            outcome = Outcome(error="client_cancelled", is_error=True)
            self._core.outcome(pending.action, pending.decision, outcome)
        self._cancelled[target] = None
        while len(self._cancelled) > CANCELLED_KEPT:
            self._cancelled.popitem(last=False)

    def _start_call(self, message: mcp.Message) -> None:
        id_ = message.id
        assert id_ is not None
        if self._in_use(id_):
            # Its answer could not be told from the earlier request's: refused, undecided.
            self._to_client(mcp.id_in_use(id_))
            return
        self._deciding[id_] = self._calls.spawn(self._call(message), name="call")

    async def _call(self, message: mcp.Message) -> None:
        """Decide one call, then forward it or answer it; see the module docstring."""
        sent = await self._decided(message)
        if "method" in sent:
            # Written before this task ends (no await in between): a cancellation
            # read from now on finds the call gone from ``_deciding`` and follows it.
            await self._to_child(sent)
        else:
            self._to_client(sent)

    async def _client_batch(self, payload: mcp.Payload) -> None:
        """A batch with calls: decide them together, then forward and answer as one batch."""
        # Requests of one batch sharing an id: none is decided or sent (mcp.ids_used_twice).
        twice = mcp.ids_used_twice(payload.messages)
        shared = [m for m in payload.messages if m.is_request and m.id in twice]
        answers = [mcp.id_in_use(m.id) for m in shared]
        kept = [m for m in payload.messages if not (m.is_request and m.id in twice)]
        forward, passed = self._pass_through(kept)
        answers += passed
        calls = [m for m in kept if m.call is not None]
        deciding: list[asyncio.Task[dict[str, Any]]] = []
        members: list[str | int] = []
        for message in calls:
            id_ = message.id
            assert id_ is not None
            if self._in_use(id_):
                answers.append(mcp.id_in_use(id_))
                continue
            task = self._calls.spawn(self._decided(message), name="batch-call", awaited=True)
            self._deciding[id_] = task
            self._in_batches[id_] = task
            self._unsent.add(id_)
            members.append(id_)
            deciding.append(task)
        if deciding:
            await asyncio.wait(deciding)
        for id_, task in zip(members, deciding, strict=True):
            self._in_batches.pop(id_, None)
            self._unsent.discard(id_)
            if task.cancelled():
                continue  # the client cancelled it: neither forwarded nor answered
            sent = task.result()
            if "method" in sent and id_ not in self._pending:
                continue  # a kill switch stopped it while the others were decided
            (forward if "method" in sent else answers).append(sent)
        ids = {m["id"] for m in forward if "method" in m and "id" in m}
        if forward and ids and answers:
            self._batches.append(_Batch(ids, answers))
            answers = []
        if len(forward) == 1:
            # Sent on its own, so a server of a revision without batches (2025-06-18
            # removed them) still runs it; its answer is merged with Warden's.
            await self._to_child(forward[0])
        elif forward:
            await self._to_child(forward)
        if answers:
            self._to_client(answers)

    async def _decided(self, message: mcp.Message) -> dict[str, Any]:
        """:meth:`_decide` with progress while it waits; the call leaves ``_deciding`` at once.

        Leaving ``_deciding`` and the caller's write to the child happen with no
        await between them, so no cancellation can slip in unseen.
        """
        id_ = message.id
        assert id_ is not None
        token = mcp.progress_token(message)
        assert message.call is not None
        ticker = (
            self._calls.spawn(self._progress(token, message.call), name="progress")
            if token is not None
            else None
        )
        try:
            return await self._decide(message)
        finally:
            if ticker is not None:
                ticker.cancel()
            self._deciding.pop(id_, None)

    async def _progress(self, token: str | int, call: ToolCall) -> None:
        """``notifications/progress`` every ``keepalive_s`` while a call waits for its decision.

        Only approvals take that long (the policy has a deadline of milliseconds).
        """
        waiting = mcp.waiting_note(call.kind, call.name)
        sent = 0
        while True:
            await asyncio.sleep(self._keepalive_s)
            sent += 1
            self._to_client(mcp.progress_notification(token, sent, waiting))

    async def _decide(self, message: mcp.Message) -> dict[str, Any]:
        """The request to forward for an allowed call, or Warden's own answer."""
        assert message.call is not None
        assert self._core is not None
        id_ = message.id
        assert id_ is not None
        agent = await self._reproved()
        if isinstance(agent, str):
            return mcp.error_response(id_, mcp.REFUSED, agent)
        answers, sent_meta = mcp.input_responses(message), mcp.request_meta(message)
        action = mcp.action(
            message.call, agent, self._upstream, self._tools, answers=answers, meta=sent_meta
        )
        # input.session: the connection's session, as Mcp-Session-Id over HTTP. A fresh
        # conversation per call: the session guard memoises one request's work on it.
        conversation = door_conversation({}, self._session, self._session_source)
        if conversation is not None:
            if self._session_owned:
                conversation = dataclasses.replace(conversation, owned=True)
            meta = dataclasses.replace(action.request, conversation=conversation)
            action = dataclasses.replace(action, request=meta)
        try:
            decision = await self._core.decide(action)
        except AuditError:
            log.exception("could not record the decision for %s; not forwarded", action.tool)
            return mcp.error_response(id_, -32603, "Warden could not record this call")
        except Overloaded as exc:
            return mcp.error_response(id_, -32603, f"Warden is busy; retry shortly ({exc})")
        except Exception:
            # Fail closed: a call Warden could not decide never reaches the server.
            log.exception("could not decide the call to %s; not forwarded", action.tool)
            return mcp.error_response(id_, -32603, "Warden could not decide this call")
        if decision.enforced is not Effect.ALLOW:
            return mcp.denied_result(message, decision)
        # The core asked the kill switches last, after the record, with no await since:
        # a switch thrown from here on finds the call among the pending ones.
        self._pending[id_] = _Pending(action, decision, time.perf_counter())
        return mcp.forward_call(message)

    async def _reproved(self) -> Agent | str:
        """The session's agent, proved again if it is to be (``prove``); else the refusal."""
        if self._prove is None:
            return self._agent
        try:
            agent = await self._prove()
        except WardenError as exc:
            return f"Warden refused the agent: {exc}"
        if agent.id != self._agent.id:
            # One session, one agent: its records and counters are this agent's.
            return (
                "Warden refused the agent: the credential now proves agent "
                f"{agent.id!r}, not {self._agent.id!r}"
            )
        return agent

    async def _screened(
        self, messages: Sequence[mcp.Message]
    ) -> tuple[list[Any], Sequence[mcp.Message]]:
        """Warden's refusals of the client's requests (not calls: ``tools/list``, ...) when
        its agent can no longer be proved, as the HTTP doors refuse each request, and the
        messages left to pass through (notifications; answers, which are decided)."""
        if self._prove is None:
            return [], messages
        asked = [
            m for m in messages if m.body is not None and "method" in m.body and m.id is not None
        ]
        if not asked:
            return [], messages
        refusal = await self._reproved()
        if not isinstance(refusal, str):
            return [], messages
        refused = [mcp.error_response(m.id, mcp.REFUSED, refusal) for m in asked]
        kept = {id(m) for m in asked}
        return refused, [m for m in messages if id(m) not in kept]

    async def _relay_answer(self, message: mcp.Message) -> None:
        await self._to_child(await self._decided_answer(message))

    async def _decided_answer(self, message: mcp.Message) -> dict[str, Any]:
        """What the child gets for the client's answer to its request: the answer, once
        every call it may belong to is allowed again with it, or Warden's error."""
        assert self._core is not None
        assert message.body is not None
        opened = mcp.open_question(self._questions, message)
        if isinstance(opened, dict):
            return opened
        if isinstance(proved := await self._reproved(), str):
            # The answer is the agent's act too: not relayed once it cannot be proved.
            return mcp.error_response(opened[0], mcp.REFUSED, proved)
        async with self._questions.deciding:
            return await self._decide_answer(message, opened)

    async def _decide_answer(
        self,
        message: mcp.Message,
        opened: tuple[str | int, Mapping[str, Any], str, tuple[tuple[str | int, _Pending], ...]],
    ) -> dict[str, Any]:
        assert self._core is not None
        assert message.body is not None
        id_, result, method, calls = opened
        running = [(i, p) for i, p in calls if self._pending.get(i) is p]
        if not running:
            # Asked outside any call (or its call has ended): no decision covers it.
            why = f"the {method or 'server'} request belongs to no call Warden let through"
            return mcp.untied_answer(id_, why)
        actions = [p.action for _, p in running]
        decided = await mcp.decide_answer(self._core.decide, actions, method, result)
        refusal = mcp.answer_refusal(id_, method, decided)
        if refusal is None and any(self._pending.get(i) is not p for i, p in running):
            # A call ended while the answer was decided (a kill switch, a cancellation).
            refusal = mcp.untied_answer(id_, f"its call ended before the {method} answer")
        for (_, pending), (action, decision) in zip(running, decided, strict=True):
            if decision is None or decision.enforced is not Effect.ALLOW:
                continue
            if refusal is not None:
                # Not relayed: what this decision reserved is not used.
                outcome = Outcome(error="answer_refused", is_error=True)
                self._core.outcome(action, decision, outcome, trusted=True)
            else:
                _go_on(self._core, pending, action, decision)
        return refusal if refusal is not None else dict(message.body)

    async def _to_child(self, value: Any) -> None:
        child = self._child
        if child is None or child.stdin is None or child.stdin.is_closing():
            return
        child.stdin.write(mcp.encode(value))
        with contextlib.suppress(ConnectionError):
            await child.stdin.drain()

    # -- child to client -------------------------------------------------------

    async def _from_child(self) -> None:
        child = self._child
        assert child is not None
        assert child.stdout is not None
        try:
            while line := await child.stdout.readline():
                await self._child_line(line)
        except (ValueError, asyncio.LimitOverrunError):
            log.error("mcp server sent a line longer than %d bytes; closing", MAX_LINE)
        finally:
            self.done.set()

    async def _child_line(self, line: bytes) -> None:
        try:
            value = loads(line)
        except (ValueError, UnicodeDecodeError):
            # MCP servers write nothing but messages to stdout. A line Warden
            # cannot read may still be read by a lenient client, as a tool result
            # no one recorded or a tool list no one filtered: it goes no further.
            log.warning("mcp server wrote a non-JSON-RPC line (%d bytes); dropped", len(line))
            metrics.child(metrics.MCP_DROPPED, "unreadable").inc()
            return
        if isinstance(value, list) and all(isinstance(v, dict) for v in value):
            kept = [await self._listed(v) for v in value if self._answer(v)]
            if kept:
                self._to_client(self._merge(kept))
        elif not isinstance(value, dict):
            # Not a message, nor a batch of them: Warden cannot tell what it answers,
            # so it goes no further (a lenient client might read it as an answer).
            log.warning("mcp server wrote JSON that is not a JSON-RPC message; dropped")
            metrics.child(metrics.MCP_DROPPED, "unreadable").inc()
        elif self._answer(value):
            answer = await self._listed(value)
            if "method" in value:  # the server's own request or notification (_answer kept it)
                self._to_client(answer)
                return
            merged = self._merge([answer])  # the lone member of a batch the client sent
            self._to_client(merged if len(merged) > 1 else answer)

    async def _listed(self, response: dict[str, Any]) -> Any:
        """A ``tools/list`` answer without the tools the policy denies this agent in every case."""
        id_ = response.get("id")
        if "method" in response or not isinstance(id_, str | int) or id_ not in self._listing:
            return response
        self._listing.discard(id_)
        self._tools.learn(response)
        result = response.get("result")
        tools = result.get("tools") if isinstance(result, dict) else None
        if self._core is None or not isinstance(tools, list):
            return response
        names = [t["name"] for t in tools if isinstance(t, dict) and isinstance(t.get("name"), str)]
        hidden = await self._core.hidden_tools(self._agent, self._upstream, names)
        return mcp.filter_tools(response, hidden.__contains__) if hidden else response

    def _answer(self, item: dict[str, Any]) -> bool:
        kind = mcp.from_server(item)
        if kind == "invalid":
            log.warning("the MCP server sent a message no client can read safely; dropped")
            metrics.child(metrics.MCP_DROPPED, "invalid").inc()
            return False
        if kind == "request":
            asked = mcp.server_request(item)
            if asked is not None:
                # Noted before the client can read it. Stdio does not say which call
                # asked: the answer is decided against every call running now.
                running = [(i, p) for i, p in self._pending.items() if i not in self._unsent]
                self._questions.asked(*asked, running)
            return True
        return self._settle(item)

    def _settle(self, response: dict[str, Any]) -> bool:
        """Record the answer to an allowed call; False when it must not reach the client.

        Only answers to requests the child was sent reach the client: one under
        any other id (a call still being decided or held, a denied one, an id
        never used) would read as the result of a call Warden did not let run.
        """
        if mcp.unaddressed_error(response):
            return True
        id_ = response.get("id")
        if mcp.valid_id(id_) is None:
            # 7.0 or true: some clients read it as the id it equals (a held call's).
            log.warning("mcp server answered under id %r, which it was never sent; dropped", id_)
            metrics.child(metrics.MCP_DROPPED, "unasked").inc()
            return False
        assert id_ is not None
        if id_ in self._asked:
            self._asked.discard(id_)
            return True
        if id_ in self._listing:
            return True  # filtered by _listed
        if id_ in self._killed:
            # The client already got Warden's answer when a kill switch stopped the call.
            self._killed.discard(id_)
            return False
        if id_ in self._cancelled:
            del self._cancelled[id_]  # the client cancelled it, and reads no answer
            return False
        pending = self._pending.pop(id_, None)
        if pending is None:
            log.warning("mcp server answered id %r, which it was never sent; dropped", id_)
            metrics.child(metrics.MCP_DROPPED, "unasked").inc()
            return False
        if self._core is None:
            return True
        latency = (time.perf_counter() - pending.started) * 1000
        outcome = mcp.result_outcome(response, latency)
        # A request for input releases the hold (its retry takes one of its own) only for
        # a trusted server: another may have acted before asking, and its client need
        # never retry.
        trusted = self._trusts_failures and mcp.says_whether_it_ran(response)
        self._core.outcome(pending.action, pending.decision, outcome, trusted=trusted)
        return True

    # -- kill switches ---------------------------------------------------------

    async def _watch_switches(self) -> None:
        switches = self._killswitches()
        if switches is None:
            return
        while True:
            await switches.wait_changed()
            for id_, pending in list(self._pending.items()):
                if (switch := switches.check(pending.action)) is not None:
                    await self._stop_call(id_, pending, switch)

    async def _stop_call(self, id_: str | int, pending: _Pending, switch: KillSwitch) -> None:
        del self._pending[id_]
        if id_ in self._unsent:
            # Allowed in a batch still being decided: it never reaches the child.
            decision_id = pending.decision.decision_id
            stopped = mcp.stopped_result(
                id_, pending.action, switch.message, decision_id, sent=False
            )
            self._to_client(stopped)
            if self._core is not None:
                # Trusted: Warden knows the tool never ran, so its reservation goes back.
                outcome = Outcome(error="killed", result=switch.message, is_error=True)
                self._core.outcome(pending.action, pending.decision, outcome, trusted=True)
            return
        self._killed.add(id_)
        self._to_client(
            mcp.stopped_result(id_, pending.action, switch.message, pending.decision.decision_id)
        )
        await self._to_child(
            {
                "jsonrpc": "2.0",
                "method": "notifications/cancelled",
                "params": {"requestId": id_, "reason": switch.message},
            }
        )
        if self._core is not None:
            # Not trusted: whether the tool finished is unknown, so nothing is released.
            outcome = Outcome(error="killed", result=switch.message, is_error=True)
            self._core.outcome(pending.action, pending.decision, outcome)

    def _merge(self, answer: list[Any]) -> list[Any]:
        ids = {item.get("id") for item in answer if isinstance(item, dict)}
        for batch in self._batches:
            if batch.ids & ids:
                self._batches.remove(batch)
                return [*answer, *batch.answers]
        return answer

    def _to_client(self, value: Any) -> None:
        self._write(mcp.encode(value))

    def _write(self, data: bytes) -> None:
        if not self._out.is_closing():
            self._out.write(data)


def child_env(environ: Mapping[str, str], withheld: Collection[str]) -> dict[str, str]:
    """The server's environment: Warden's, less its settings and the keys it holds.

    ``WARDEN_*`` and ``PG*`` carry the state store's password, ``WARDEN_TOKEN``
    the admin token, ``OTEL_*`` the trace exporter's headers; a tool
    server the agent drives (a shell, a file reader) could hand them back, and
    with them clear kill switches or approve its own calls. (Nor can it read
    them from Warden's ``/proc`` entries: ``warden mcp wrap`` is not dumpable.)
    """
    return {
        k: v for k, v in environ.items() if not k.startswith(_WARDENS_ENV) and k not in withheld
    }


_WARDENS_ENV = ("WARDEN_", "PG", "OTEL_")
"""Warden's settings, libpq's (``PGPASSWORD`` for the state store and audit shipping) and
the trace exporter's (``OTEL_EXPORTER_OTLP_HEADERS`` may carry a token)."""


def _held(held: Collection[str | int], target: str | int) -> str | int | None:
    """The id among ``held`` that the server reads ``target`` as (mcp.id_key), if any."""
    if target in held:
        return target
    key = mcp.id_key(target)
    return next((i for i in held if mcp.id_key(i) == key), None)


def _go_on(core: Governor, pending: _Pending, action: Action, decision: Decision) -> None:
    """The call goes on under the decision that saw the answer.

    Its earlier decision's outcome is recorded now (trusted: the decision with
    the answer holds the same reservation, so releasing the earlier one counts
    the call once), and the server's answer to the call becomes the new
    decision's outcome, as a 2026-07-28 retry's does.
    """
    went_on = Outcome(error="input_answered", result=decision.decision_id, is_error=True)
    core.outcome(pending.action, pending.decision, went_on, trusted=True)
    pending.action, pending.decision = action, decision
