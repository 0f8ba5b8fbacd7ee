"""The MCP streamable HTTP door: Warden between an MCP client and a remote MCP server.

An upstream with ``protocol: mcp`` is served by the proxy listener at
``/<name>`` (and ``/<name>/...``, appended to ``base_url``). The door speaks
the MCP streamable HTTP transport (revisions 2025-03-26 to 2025-11-25) on both
sides and only converts:

* **POST** carries one JSON-RPC message (or a batch). Every ``tools/call`` is
  decided by the core before the server sees it. A denied or deferred call is
  answered by Warden with an ``isError`` tool result; an allowed one is
  forwarded, rebuilt from what was decided, and the server's answer (a JSON
  body, or inside its SSE stream) is relayed as it comes and recorded as the
  decision's trusted outcome. A call held for approval keeps the request
  open; when the client sent a progress token it gets ``notifications/progress``
  every ``approvals.keepalive_s`` meanwhile (an SSE answer), otherwise SSE
  comments. ``tools/list`` answers lose the tools the policy would deny in
  every case (:meth:`warden.core.Governor.hidden_tools`). ``resources/read``,
  ``prompts/get`` and ``completion/complete`` are decided as calls are
  (:data:`warden.protocols.mcp.GOVERNED`), refused with a JSON-RPC error.
  The client's answer to the server's own request (elicitation, sampling,
  roots, asked on a call's POST stream) is decided before it is forwarded:
  each allowed call of that stream is decided again with the answer among its
  ``input_responses`` (:func:`warden.protocols.mcp.with_answer`), and all
  must allow it; an answer tied to no such call, or not allowed, reaches the
  server as Warden's error instead. A ``notifications/cancelled`` for a call
  the server has records the call's outcome then, not trusted (``client_cancelled``):
  the server's answer to a cancelled request is no proof the tool did not run.
  Everything else (initialize, listings, notifications) is forwarded as it
  came; notifications and responses get the server's ``202``.
* **GET** opens the server's SSE stream (with ``Last-Event-ID`` to resume);
  its events are relayed, ``tools/list`` answers filtered there too, and the
  answer to a call whose POST stream ended early (resumption) still becomes
  that call's outcome.
* **DELETE** ends the session.

``Mcp-Session-Id``, ``MCP-Protocol-Version``, ``Last-Event-ID`` and the MCP
auth headers go to the server unchanged (Warden's own ``X-Warden-*`` never
do), and the server's headers come back. Only ``base_url`` is ever reached.
A kill switch thrown while an allowed call runs answers it at once with
``isError``, sends the server ``notifications/cancelled`` and drops its late
answer; for a call whose POST stream ended early, that answer goes on the GET
that resumes that stream. Malformed JSON-RPC gets ``400`` with the spec's error
code; Warden's own failures and upstream faults get a JSON-RPC error body
(``-32000`` with ``data.warden`` naming the cause) at the matching HTTP status.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from warden.credentials import Credentials
from warden.errors import (
    AuditError,
    Overloaded,
    StateUnavailable,
    UnreadableBody,
    UnsupportedMedia,
    UpstreamError,
    UpstreamProtocol,
    UpstreamRedirect,
    WardenError,
)
from warden.ingress import headers as hdr
from warden.ingress.door_mark import door_of
from warden.ingress.request_body import read_request_body
from warden.ingress.upstream_io import MAX_UPSTREAM_BODY, read_body, upstream_error
from warden.model import Action, Agent, Decision, Effect, Outcome
from warden.ops import metrics
from warden.owners import IdOwners
from warden.protocols import http_tool, mcp, mcp_mirror
from warden.protocols._wire import dumps, loads, utf8_only
from warden.protocols.declared_arguments import ListedArguments
from warden.protocols.sse import encode_comment
from warden.protocols.sse_relay import EventSplitter, RawEvent, data_event
from warden.sessions import door_conversation
from warden.tasks import Tasks

if TYPE_CHECKING:
    from warden.config import Config, UpstreamConfig
    from warden.core import Governor
    from warden.killswitch import KillSwitch, KillSwitches
    from warden.state.sessions import SessionRepo

__all__ = ["WARDEN_ERROR", "McpHttp"]

log = logging.getLogger("warden.mcp")

_UNOWNED: Final = web.RequestKey("warden.mcp_unowned_session", str)
"""Request key: the session it names, which no agent owns yet."""
WARDEN_ERROR: Final = -32000
"""JSON-RPC code (server-defined range) for Warden's own failures and upstream faults."""
INTERNAL_ERROR: Final = -32603
SESSION_HEADER: Final = "Mcp-Session-Id"
_JSON = "application/json"
_SSE = "text/event-stream"
WHOLE_WITHIN_S: Final = 0.05
"""How long the server's answer to a POST is gathered before Warden starts relaying it as
a stream: an answer that ends sooner (most calls) goes to the client in one write."""
WHOLE_MAX_BYTES: Final = 1024 * 1024
"""The most of such an answer gathered; a longer one is relayed as it comes."""
_ALLOW = "GET, POST, DELETE"
_RESUMABLE_SESSIONS = 1024
"""Sessions whose unanswered calls are kept for an answer on a resumed stream."""
_CANCEL_TIMEOUT_S = 5.0
_STREAM_IDS = 8
"""Event ids remembered per stream: clients resume from the last one they read, which may
be a little before the last one Warden wrote if the connection broke meanwhile."""

type JsonId = str | int | None
type Identify = Callable[[Mapping[str, str]], Awaitable[Agent]]


@dataclass(slots=True, eq=False)
class _Stream:
    """The server's SSE stream for one POST, which GETs with ``Last-Event-ID`` resume: the
    official client reads any answer on a resumed stream as the one to the request it
    resumed, so Warden's answer to a stopped call goes only on its own stream's GET."""

    ids: deque[str] = field(default_factory=lambda: deque(maxlen=_STREAM_IDS))
    """The last event ids relayed on it (on its POST, then on GETs resuming it)."""


@dataclass(slots=True)
class _Pending:
    """An allowed call on its way to the server: what its answer is recorded against."""

    action: Action
    decision: Decision
    url: URL
    headers: CIMultiDict[str]
    """Where the call went, and with which headers: where its cancellation goes (after
    its POST has ended, if its answer comes on a resumed stream)."""
    started: float = field(default_factory=time.perf_counter)
    stream: _Stream | None = None
    """The stream its answer was owed on when that stream ended (:meth:`McpHttp._unanswered`)."""
    done: bool = False
    """Its outcome is recorded: a question the server asked during it is answered by no
    decision of it any more."""


@dataclass(slots=True)
class _Exchange:
    """One client POST: what Warden still waits for in the server's answer to it."""

    agent: Agent
    upstream: str
    url: URL
    session: str | None
    calls: dict[str | int, _Pending] = field(default_factory=dict)
    listings: set[str | int] = field(default_factory=set)
    filter_all: bool = False
    """Filter every ``tools/list`` answer, whatever its id (a resumed stream)."""
    requests: set[str | int] = field(default_factory=set)
    """Forwarded requests not answered yet."""
    response: web.StreamResponse | None = None
    """Set once Warden has started an SSE answer to the client."""
    opening: asyncio.Lock = field(default_factory=asyncio.Lock)
    """Held while the SSE answer is being opened."""
    client_gone: bool = False
    resumable: bool = False
    """The server's stream gave event ids: its answers may come later on a GET."""
    owed: tuple[str, str] | None = None
    """A resumed stream (GET with ``Last-Event-ID``): the (upstream, session) whose broken
    streams' answers it may carry, each claimed from :attr:`McpHttp._resumable` as it comes."""
    stream: _Stream | None = field(default_factory=_Stream)
    """The stream it carries: a POST's own; for a GET, the one its ``Last-Event-ID`` resumes,
    if Warden knows it."""
    deciding: dict[str | int, asyncio.Task[Any]] = field(default_factory=dict)
    """Calls being decided (held for approval, maybe), by id: each in the task to end
    when the client cancels it."""
    withdrawn: set[str | int] = field(default_factory=set)
    """Ids of calls the client cancelled while they were decided."""


class _Withdrawn(Exception):
    """The client cancelled a call while it was decided: it is neither sent nor answered."""


class McpHttp:
    """Serves ``protocol: mcp`` upstreams for the proxy listener; one per :class:`ProxyApp`."""

    def __init__(
        self,
        config: Config,
        core: Governor,
        session: aiohttp.ClientSession,
        *,
        identify: Identify,
        killswitches: KillSwitches | None = None,
        credentials: Credentials | None = None,
        owners: SessionRepo | None = None,
    ) -> None:
        """``identify`` proves the agent from its request headers (``Identity.resolve``);
        ``credentials`` are the server keys Warden holds in place of the agent's;
        ``owners`` keeps which agent opened each session (the state store's sessions)."""
        self._config = config
        self._core = core
        self._session = session
        self._identify = identify
        self._killswitches = killswitches
        self._credentials = credentials if credentials is not None else Credentials.none()
        self._tasks = Tasks("mcp-http")
        # Requests whose POST stream ended before their answer, by (server, session):
        # their answers may come on a resumed stream (the calls' to be recorded).
        self._resumable: OrderedDict[tuple[str, str], dict[str | int, _Pending | None]] = (
            OrderedDict()
        )
        self._asked: dict[tuple[str, str], set[str]] = {}
        """Request ids (:func:`mcp.id_key`) of POSTs still open, by (server, session): the
        server routes an answer to the stream of its id, so a second POST reusing one would
        take the first's answer (a bogus call's error recorded as a refund's failure)."""
        self._listed: dict[str, ListedArguments] = {}
        """Per upstream: its tools' argument names, from the ``tools/list`` answers seen."""
        self._owners = IdOwners(owners, "mcp", ttl_s=config.sessions.ttl_s)
        """The agent that opened each session: another agent naming it is answered as for
        an unknown session (a server cannot tell agents apart when Warden holds its key)."""
        self._questions: OrderedDict[tuple[str, str | None], mcp.Questions[_Pending]] = (
            OrderedDict()
        )
        """By (server, session): the server's requests waiting for the client's answer, each
        with the calls of the stream it came on (its answer is decided against them)."""
        self._open: dict[tuple[str, str], list[_Exchange]] = {}
        """By (server, session): the open POST (and resumed GET) exchanges, for the client's
        cancellation of a call in flight to find it."""
        self._stopped: OrderedDict[
            tuple[str, str], dict[str | int, tuple[_Stream | None, dict[str, Any]]]
        ] = OrderedDict()
        """By (server, session): Warden's answers to calls a kill switch stopped while their
        answers were owed on a resumed stream, by id, with the stream they were owed on,
        until a GET resuming that stream takes them."""
        # A POST's calls are watched while it runs (_watched); calls whose answers come on
        # a resumed stream outlive it, so they are watched here.
        self._unwatch = killswitches.watch(self._switched) if killswitches is not None else None

    # -- entry -----------------------------------------------------------------

    async def handle(
        self, request: web.Request, name: str, upstream: UpstreamConfig, path: str
    ) -> web.StreamResponse:
        """Serve one request for upstream ``name``; ``path`` is appended to its ``base_url``."""
        target = upstream.base_url + ("/" + path if path else "")
        query = request.rel_url.raw_query_string
        url = URL(target + ("?" + query if query else ""), encoded=True)
        try:
            agent = await self._identify(request.headers)
            refused = await self._session_refused(request, name, agent)
            if refused is not None:
                return refused
            if request.method == "POST":
                return await self._post(request, agent, name, upstream, url)
            if request.method == "GET":
                return await self._get(request, agent, name, upstream, url)
            if request.method == "DELETE":
                return await self._delete(request, name, upstream, url)
            response = _rpc_error(405, None, WARDEN_ERROR, "Method Not Allowed", "method")
            response.headers["Allow"] = _ALLOW
            return response
        except WardenError as exc:
            metrics.child(metrics.ERRORS, exc.code).inc()
            response = _rpc_error(exc.status, None, WARDEN_ERROR, str(exc), exc.code)
            if isinstance(exc, UnreadableBody):
                response.force_close()  # the rest of the body cannot be read past
            return response

    # -- POST ------------------------------------------------------------------

    async def _post(
        self,
        request: web.Request,
        agent: Agent,
        name: str,
        upstream: UpstreamConfig,
        url: URL,
    ) -> web.StreamResponse:
        if request.content_type != _JSON:
            raise UnsupportedMedia(f"expected Content-Type {_JSON}, got {request.content_type!r}")
        utf8_only(request.headers.get("Content-Type", ""))
        json_ok, sse_ok = _accepts(request.headers.get("Accept", ""))
        if not (json_ok and sse_ok):
            return _rpc_error(
                406,
                None,
                WARDEN_ERROR,
                "Not Acceptable: the Accept header must list application/json and "
                "text/event-stream",
                "not_acceptable",
            )
        body = await read_request_body(request, self._config.limits)
        payload = mcp.parse(body)
        mismatch = mcp_mirror.problem(payload, request.headers, self._listed.get(name))
        if mismatch is not None:
            # What acts on the headers after Warden must not read another request.
            first = payload.messages[0].id if not payload.batch else None
            rejected = mcp.error_response(first, mcp_mirror.HEADER_MISMATCH, mismatch)
            return _json(400, rejected)
        exchange = _Exchange(agent, name, url, request.headers.get(SESSION_HEADER))
        busy, taken = self._take_ids(exchange, payload)
        self._opened_exchange(exchange)
        try:
            if not payload.batch:
                (message,) = payload.messages
                if message.error is not None:
                    return _json(400, message.error)
                if message.id in busy:
                    return _json(200, mcp.id_in_use(message.id))
                if message.call is not None:
                    return await self._call(request, exchange, upstream, message)
                assert message.body is not None
                self._expect(exchange, message)
                # The message as Warden read it, not as sent: a key given twice
                # ("method" twice) is read as its last value here, and maybe as its
                # first by the server. (A refused sampling answer is Warden's error.)
                sent = dumps(await self._passed(exchange, message)).encode()
                return await self._forward(request, exchange, upstream, sent, answers=[])
            return await self._batch(request, exchange, upstream, payload, busy)
        finally:
            self._closed_exchange(exchange)
            self._release_ids(exchange, taken)

    def _opened_exchange(self, exchange: _Exchange) -> None:
        if exchange.session is not None:
            key = (self._server(exchange.upstream), exchange.session)
            self._open.setdefault(key, []).append(exchange)

    def _closed_exchange(self, exchange: _Exchange) -> None:
        if exchange.session is None:
            return
        key = (self._server(exchange.upstream), exchange.session)
        open_ = self._open.get(key, [])
        with contextlib.suppress(ValueError):
            open_.remove(exchange)
        if not open_:
            self._open.pop(key, None)

    async def _passed(self, exchange: _Exchange, message: mcp.Message) -> Mapping[str, Any]:
        """What goes to the server for a message that is not a governed request."""
        assert message.body is not None
        if mcp.client_result(message) is not None:
            return await self._decided_answer(exchange, message)
        if "method" not in message.body and message.id is not None:
            # An error answer (or Warden's in a refused answer's place): the server's
            # request fails whatever it says; it is no longer open.
            key = (self._server(exchange.upstream), exchange.session)
            if (questions := self._questions.get(key)) is not None:
                questions.answered(message.id)
        if message.body.get("method") == "notifications/cancelled":
            self._client_cancelled(exchange, message.body)
        return message.body

    def _take_ids(
        self, exchange: _Exchange, payload: mcp.Payload
    ) -> tuple[set[str | int], set[str]]:
        """The request ids of this POST another open POST of the session (or a broken
        stream's unanswered request) still holds, and the ids this POST now holds."""
        session = exchange.session
        if session is None:  # no session: each POST's answers come on its own stream
            return set(), set()
        # By server, not upstream entry: two entries for one server share its sessions.
        key = (self._server(exchange.upstream), session)
        held = self._asked.get(key, set())
        owed = {mcp.id_key(i) for i in self._resumable.get(key, ())}
        owed |= {mcp.id_key(i) for i in self._stopped.get(key, ())}
        busy: set[str | int] = set()
        taken: set[str] = set()
        for message in payload.messages:
            if not message.is_request or message.id is None:
                continue
            id_ = mcp.id_key(message.id)
            if id_ in held or id_ in owed:
                busy.add(message.id)
            else:
                taken.add(id_)
        if taken:  # only sessions with requests in flight are kept
            self._asked[key] = held | taken
        return busy, taken

    def _release_ids(self, exchange: _Exchange, taken: set[str]) -> None:
        if not taken or exchange.session is None:
            return
        key = (self._server(exchange.upstream), exchange.session)
        held = self._asked.get(key)
        if held is not None:
            held -= taken
            if not held:
                del self._asked[key]

    async def _batch(
        self,
        request: web.Request,
        exchange: _Exchange,
        upstream: UpstreamConfig,
        payload: mcp.Payload,
        busy: set[str | int],
    ) -> web.StreamResponse:
        """A batch: its calls decided together, the rest forwarded, one answer per member.

        ``busy``: ids another open POST of the session holds; refused like ids the
        batch gives twice."""
        forward: list[Any] = []
        answers: list[dict[str, Any]] = []
        twice = mcp.ids_used_twice(payload.messages) | busy
        calls = [m for m in payload.messages if m.call is not None and m.id not in twice]
        decided = await asyncio.gather(*(self._decide(request, exchange, m) for m in calls))
        decisions = dict(zip((id(m) for m in calls), decided, strict=True))
        others = [m for m in payload.messages if m.call is None and m.body is not None]
        passed = await asyncio.gather(*(self._passed(exchange, m) for m in others))
        bodies = dict(zip((id(m) for m in others), passed, strict=True))
        for message in payload.messages:
            if message.error is not None:
                answers.append(dict(message.error))
            elif message.is_request and message.id in twice:
                answers.append(mcp.id_in_use(message.id))
            elif message.call is not None:
                sent = decisions[id(message)]
                (forward if "method" in sent else answers).append(sent)
            else:
                assert message.body is not None
                self._expect(exchange, message)
                forward.append(bodies[id(message)])
        if not forward:
            if exchange.response is not None:  # opened while a call was held
                for answer in answers:
                    await self._write(exchange, data_event(dumps(answer)))
                return await _finish(exchange.response)
            return _json(200, answers) if answers else web.Response(status=202)
        # One member left for the server after Warden answered the others: sent
        # on its own, so a server of a revision without batches (2025-06-18 on)
        # can run it; the client still gets one answer per member.
        single = forward[0] if len(forward) == 1 and answers else forward
        return await self._watched(
            request,
            exchange,
            self._forward(request, exchange, upstream, dumps(single).encode(), answers=answers),
        )

    def _expect(self, exchange: _Exchange, message: mcp.Message) -> None:
        """Note a forwarded request whose answer Warden must see."""
        assert message.body is not None
        id_ = message.id
        if not message.is_request or id_ is None:
            return
        exchange.requests.add(id_)
        if message.body.get("method") == "tools/list":
            exchange.listings.add(id_)

    async def _decide(
        self, request: web.Request, exchange: _Exchange, message: mcp.Message
    ) -> dict[str, Any]:
        """A batch member: the request to forward for an allowed call, or Warden's own answer."""
        action = self._action(request, exchange, message)
        try:
            decision = await self._decided(request, exchange, message, action)
        except _Withdrawn:
            return mcp.cancelled_response(message.id)
        except AuditError:
            log.exception("could not record the decision for %s; not forwarded", action.tool)
            return mcp.error_response(
                message.id, INTERNAL_ERROR, "Warden could not record this call"
            )
        except Overloaded as exc:
            # Answered alone: the batch's other members still go on (or get their answers).
            return mcp.error_response(
                message.id, INTERNAL_ERROR, f"Warden is busy; retry shortly ({exc})"
            )
        except Exception:
            log.exception("could not decide the call to %s; not forwarded", action.tool)
            return mcp.error_response(
                message.id, INTERNAL_ERROR, "Warden could not decide this call"
            )
        if decision.enforced is not Effect.ALLOW:
            return mcp.denied_result(message, decision)
        assert message.id is not None
        headers = self._headers(request, exchange.upstream)
        exchange.calls[message.id] = _Pending(action, decision, exchange.url, headers)
        exchange.requests.add(message.id)
        return mcp.forward_call(message)

    def _action(self, request: web.Request, exchange: _Exchange, message: mcp.Message) -> Action:
        assert message.call is not None
        listed = self._listed.get(exchange.upstream)
        answers, sent_meta = mcp.input_responses(message), mcp.request_meta(message)
        action = mcp.action(
            message.call, exchange.agent, exchange.upstream, listed, answers=answers, meta=sent_meta
        )
        meta = dataclasses.replace(
            action.request,
            headers=hdr.recordable(request.headers),
            door=door_of(request.headers),  # handed over by the transparent door, or not
            # input.session: counters by X-Warden-Session, else by the MCP session.
            conversation=door_conversation(request.headers, exchange.session, "mcp"),
        )
        return dataclasses.replace(action, request=meta, context=hdr.context_from(request.headers))

    async def _call(
        self,
        request: web.Request,
        exchange: _Exchange,
        upstream: UpstreamConfig,
        message: mcp.Message,
    ) -> web.StreamResponse:
        """One governed request (``tools/call``, ``resources/read``...): decided (held, with
        progress, if need be), then answered or sent."""
        action = self._action(request, exchange, message)
        try:
            decision = await self._decided(request, exchange, message, action)
        except _Withdrawn:
            return await self._answer(request, exchange, mcp.cancelled_response(message.id))
        except AuditError:
            log.exception("could not record the decision for %s; not forwarded", action.tool)
            answer = mcp.error_response(
                message.id, INTERNAL_ERROR, "Warden could not record this call"
            )
            return await self._answer(request, exchange, answer)
        except WardenError:
            raise  # busy and the like: answered in JSON-RPC by handle()
        except Exception:
            log.exception("could not decide the call to %s; not forwarded", action.tool)
            answer = mcp.error_response(
                message.id, INTERNAL_ERROR, "Warden could not decide this call"
            )
            return await self._answer(request, exchange, answer)
        if decision.enforced is not Effect.ALLOW:
            denied = mcp.denied_result(message, decision)
            return await self._answer(request, exchange, denied, decision.decision_id)
        headers = self._headers(request, exchange.upstream)
        pending = _Pending(action, decision, exchange.url, headers)
        if exchange.client_gone:
            # Nobody is left to read the result: the approved call is not run.
            outcome = Outcome(error="client_disconnected", is_error=True)
            self._core.outcome(action, decision, outcome)
            return exchange.response or web.Response(status=499)
        assert message.id is not None
        exchange.calls[message.id] = pending
        exchange.requests.add(message.id)
        body = dumps(mcp.forward_call(message)).encode()
        forwarding = self._forward(
            request, exchange, upstream, body, answers=[], decision_id=decision.decision_id
        )
        return await self._watched(request, exchange, forwarding)

    async def _decided(
        self, request: web.Request, exchange: _Exchange, message: mcp.Message, action: Action
    ) -> Decision:
        """The core's decision on ``action``, keeping the client informed while it is held.

        Decided in the caller's own task; only a decision that takes longer
        than the keepalive (held for a person) starts a task for the beats.
        """
        beating: asyncio.Task[None] | None = None
        decided = asyncio.Event()

        def start_beating() -> None:
            nonlocal beating
            beats = self._beat(request, exchange, message, action, decided)
            beating = self._tasks.spawn(beats, name="held-beats", awaited=True)

        timer = asyncio.get_running_loop().call_later(
            self._config.approvals.keepalive_s, start_beating
        )
        id_, task = message.id, asyncio.current_task()
        assert id_ is not None
        assert task is not None
        exchange.deciding[id_] = task
        try:
            return await self._core.decide(action)
        except asyncio.CancelledError:
            if id_ not in exchange.withdrawn:
                raise  # the client went away, or Warden is stopping
            # A held call's approval stays decidable, as a deferral (the gate's own
            # doing): approved, only the agent's retry of the same call runs.
            task.uncancel()
            raise _Withdrawn from None
        finally:
            exchange.deciding.pop(id_, None)
            timer.cancel()
            if beating is not None:
                decided.set()  # it stops after the beat it is writing, if any
                await beating

    async def _beat(
        self,
        request: web.Request,
        exchange: _Exchange,
        message: mcp.Message,
        action: Action,
        decided: asyncio.Event,
    ) -> None:
        """Keep a held call's request open, saying so every keepalive, until ``decided``."""
        token = mcp.progress_token(message)
        note = mcp.waiting_note(action.kind, action.tool)
        beats = 0
        while not decided.is_set():
            beats += 1
            async with exchange.opening:  # a batch's held calls share one answer
                if exchange.response is None:
                    exchange.response = await _open_sse(request, {})
            if token is not None:
                beat = data_event(dumps(mcp.progress_notification(token, beats, note)))
            else:
                beat = encode_comment("held for approval")
            await self._write(exchange, beat)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(decided.wait(), self._config.approvals.keepalive_s)

    async def _answer(
        self,
        request: web.Request,
        exchange: _Exchange,
        answer: dict[str, Any],
        decision_id: str | None = None,
    ) -> web.StreamResponse:
        """Warden's own answer to a request: JSON, or an event when an SSE answer is open."""
        if exchange.response is None:
            response = _json(200, answer)
            if decision_id is not None:
                response.headers[hdr.DECISION_HEADER] = decision_id
            return response
        await self._write(exchange, data_event(dumps(answer)))
        return await _finish(exchange.response)

    # -- forwarding ------------------------------------------------------------

    async def _forward(
        self,
        request: web.Request,
        exchange: _Exchange,
        upstream: UpstreamConfig,
        body: bytes,
        *,
        answers: list[dict[str, Any]],
        decision_id: str | None = None,
    ) -> web.StreamResponse:
        """POST ``body`` to the server and relay its answer, settling what ``exchange`` awaits."""
        timeout = aiohttp.ClientTimeout(
            total=None, connect=upstream.connect_timeout_s, sock_read=upstream.timeout_s
        )
        sent = time.perf_counter()
        try:
            resp = await self._session.post(
                exchange.url,
                data=body,
                headers=self._headers(request, exchange.upstream),
                timeout=timeout,
                allow_redirects=False,
            )
        except Exception as exc:
            return await self._failed(request, exchange, _upstream_error(exc, exchange.upstream))
        try:
            metrics.child(metrics.UPSTREAM_LATENCY, exchange.upstream).observe(
                time.perf_counter() - sent
            )
            status = resp.status
            if 300 <= status < 400 or not 200 <= status < 600:
                return await self._failed(
                    request, exchange, _refused_status(status, exchange.upstream)
                )
            headers = hdr.response_headers(resp.headers)
            if decision_id is not None:
                headers[hdr.DECISION_HEADER] = decision_id
            unowned = await self._opened(request, exchange, resp)
            if unowned is not None:
                return await self._failed(request, exchange, unowned)
            is_sse = resp.headers.get("Content-Type", "").lower().startswith(_SSE)
            if status >= 400:
                return await self._refused(request, exchange, resp, headers)
            if is_sse:
                return await self._relay_post_stream(request, exchange, resp, headers, answers)
            raw = await _read_upstream(resp, exchange.upstream)
            if status == 202 or not raw.strip():
                self._unanswered(exchange, "no_answer")
                if answers:
                    return _json(200, answers)
                return web.Response(status=status, headers=headers)
            out = await self._server_json(exchange, raw)
            # A body answering some of the calls (a notification, an error with id null, a
            # part of a batch) answers no more: the others are given up, as when it is empty.
            self._unanswered(exchange, "no_answer")
            if answers:
                out = _merge(out, answers)
            if exchange.response is not None:
                await self._write(exchange, data_event(out.decode()))
                return await _finish(exchange.response)
            headers["Content-Type"] = _JSON  # what Warden wrote, whatever the server said
            return web.Response(status=status, body=out, headers=headers)
        except UpstreamError as exc:
            return await self._failed(request, exchange, exc)
        finally:
            resp.release()

    async def _relay_post_stream(
        self,
        request: web.Request,
        exchange: _Exchange,
        resp: aiohttp.ClientResponse,
        headers: Any,
        answers: list[dict[str, Any]],
    ) -> web.StreamResponse:
        held = [data_event(dumps(answer)) for answer in answers]
        splitter = EventSplitter(MAX_UPSTREAM_BODY)
        try:
            if exchange.response is None:
                if await self._gathered(exchange, resp, splitter, held):
                    # The whole answer came at once (the usual tools/call): one write,
                    # so the client reads it in one go instead of status, event and end.
                    self._unanswered(exchange, "stream_ended")
                    return _whole_sse(resp.status, headers, b"".join(held))
                exchange.response = await _open_sse(request, headers, status=resp.status)
            for event in held:
                await self._write(exchange, event)
            held = []
            await self._relay_events(exchange, resp, splitter)
        except UpstreamError as exc:
            # The status line is sent: the failure travels as JSON-RPC errors in the stream.
            if exchange.response is None:
                exchange.response = await _open_sse(request, headers, status=resp.status)
            for event in held:
                await self._write(exchange, event)
            self._unanswered(exchange, exc.code)
            for id_ in sorted(exchange.requests, key=str):
                error = _error_body(id_, WARDEN_ERROR, str(exc), exc.code)
                await self._write(exchange, data_event(dumps(error)))
            exchange.requests.clear()
        else:
            self._unanswered(exchange, "stream_ended")
        return await _finish(exchange.response)

    async def _gathered(
        self,
        exchange: _Exchange,
        resp: aiohttp.ClientResponse,
        splitter: EventSplitter,
        held: list[bytes],
    ) -> bool:
        """Settle the server's events into ``held`` for up to ``WHOLE_WITHIN_S``.

        True: the stream ended within it, and ``held`` is the whole answer.
        False: it goes on (a slow tool, progress, or more than ``WHOLE_MAX_BYTES``),
        and the caller relays the rest. Only reads are timed, never the
        settling of an event read.
        """
        deadline = asyncio.get_running_loop().time() + WHOLE_WITHIN_S
        size = sum(map(len, held))
        try:
            while size <= WHOLE_MAX_BYTES:
                try:
                    async with asyncio.timeout_at(deadline):
                        chunk = await resp.content.readany()
                except TimeoutError:
                    return False
                if not chunk:
                    return True
                for out in await self._settled_events(exchange, splitter, chunk):
                    held.append(out)
                    size += len(out)
        except Exception as exc:
            raise _upstream_error(exc, exchange.upstream) from None
        return False

    async def _relay_events(
        self,
        exchange: _Exchange,
        resp: aiohttp.ClientResponse,
        splitter: EventSplitter | None = None,
    ) -> None:
        """Relay the server's SSE events as they come, settling answers on the way.

        ``splitter``: one that has read the start of the stream already.
        """
        if splitter is None:
            splitter = EventSplitter(MAX_UPSTREAM_BODY)
        try:
            async for chunk in resp.content.iter_any():
                for out in await self._settled_events(exchange, splitter, chunk):
                    await self._write(exchange, out)
                if exchange.client_gone and not exchange.requests:
                    return  # every outcome is recorded; nobody reads the rest
        except Exception as exc:
            raise _upstream_error(exc, exchange.upstream) from None

    async def _settled_events(
        self, exchange: _Exchange, splitter: EventSplitter, chunk: bytes
    ) -> list[bytes]:
        """The events completed by ``chunk``, settled, as the client gets them."""
        outs = []
        for event in splitter.feed(chunk):
            if event.id:
                exchange.resumable = True
            out = await self._server_event(exchange, event)
            if out is not None:
                outs.append(out)
                if event.id and exchange.stream is not None:
                    # What the client may resume from: ids of events it never got are not.
                    exchange.stream.ids.append(event.id)
        return outs

    async def _server_event(self, exchange: _Exchange, event: RawEvent) -> bytes | None:
        data = event.data
        if not data:
            return event.encode()
        try:
            value = loads(data)
        except (ValueError, UnicodeDecodeError):
            # A lenient client might read it as a result no one recorded or a
            # listing no one filtered: it goes no further (as over stdio).
            log.warning(
                "MCP server %r sent an event that is not JSON-RPC; dropped", exchange.upstream
            )
            metrics.child(metrics.MCP_DROPPED, "unreadable").inc()
            return None
        settled = await self._settle_value(exchange, value)
        if settled is None:
            return None
        if settled is value:
            return event.encode()
        return event.with_data(dumps(settled)).encode()

    async def _server_json(self, exchange: _Exchange, raw: bytes) -> bytes:
        try:
            value = loads(raw)
        except (ValueError, UnicodeDecodeError):
            # Not relayed: the client gets Warden's error for its requests instead.
            raise UpstreamProtocol(
                f"MCP server {exchange.upstream!r} answered with a body that is not JSON-RPC"
            ) from None
        settled = await self._settle_value(exchange, value)
        if settled is None:
            # Not relayed: the client gets Warden's error for its requests instead.
            raise UpstreamProtocol(
                f"MCP server {exchange.upstream!r} answered only ids it was not sent"
            )
        return raw if settled is value else dumps(settled).encode()

    async def _settle_value(self, exchange: _Exchange, value: Any) -> Any:
        """``value`` (a message or batch from the server) as the client gets it.

        ``None``: nothing of it goes to the client.
        """
        if isinstance(value, list):
            items = [await self._settle(exchange, v) if isinstance(v, dict) else v for v in value]
            if any(item is None for item in items):
                kept = [item for item in items if item is not None]
                return kept or None
            changed = any(a is not b for a, b in zip(items, value, strict=True))
            return items if changed else value
        if isinstance(value, dict):
            return await self._settle(exchange, value)
        return value

    async def _settle(self, exchange: _Exchange, message: dict[str, Any]) -> dict[str, Any] | None:
        """Record the answer to an allowed call; filter a ``tools/list`` answer.

        ``None`` for an answer under an id this exchange did not forward (or
        answered already): it could be the id of a call Warden is holding or
        refused, and a client would take it for that call's result. Dropped,
        as over stdio.
        """
        kind = mcp.from_server(message)
        if kind == "request":
            # The server's own request or notification: passes. A request is noted first,
            # with the calls of this stream (the server sends a call's requests on its
            # POST stream), against which the client's answer is decided.
            asked = mcp.server_request(message)
            if asked is not None:
                self._asked_on(exchange, *asked)
            return message
        if kind == "invalid":
            log.warning(
                "MCP server %r sent a message no client can read safely; dropped", exchange.upstream
            )
            metrics.child(metrics.MCP_DROPPED, "invalid").inc()
            return None
        if mcp.unaddressed_error(message):
            return message
        id_ = message.get("id")
        if exchange.owed is not None and id_ not in exchange.requests:
            self._claim(exchange, exchange.owed, id_)
        # An id given as 7.0 or true too: some clients read it as the id it equals.
        if mcp.valid_id(id_) is None or id_ not in exchange.requests:
            log.warning(
                "MCP server %r answered id %r, which this stream did not send; dropped",
                exchange.upstream,
                id_,
            )
            metrics.child(metrics.MCP_DROPPED, "unasked").inc()
            return None
        exchange.requests.discard(id_)
        pending = exchange.calls.pop(id_, None)
        if pending is not None:
            self._record(pending, message)
            return message
        if id_ in exchange.listings or exchange.filter_all:
            exchange.listings.discard(id_)
            return await self._filtered(exchange.agent, exchange.upstream, message)
        return message

    def _asked_on(self, exchange: _Exchange, id_: str | int, method: str) -> None:
        """The server sent request ``id_`` on ``exchange``'s stream."""
        calls = list(exchange.calls.values())
        if exchange.owed is not None:
            # A resumed stream replays one broken stream's events, Warden cannot tell
            # which: the request may belong to any call the session's broken streams owe.
            owed = self._resumable.get(exchange.owed, {})
            calls += [p for p in owed.values() if p is not None]
        key = (self._server(exchange.upstream), exchange.session)
        questions = self._questions.get(key)
        if questions is None:
            questions = self._questions[key] = mcp.Questions()
        self._questions.move_to_end(key)
        questions.asked(id_, method, calls)
        while len(self._questions) > _RESUMABLE_SESSIONS:
            self._questions.popitem(last=False)  # their answers fail closed

    async def _decided_answer(self, exchange: _Exchange, message: mcp.Message) -> dict[str, Any]:
        """What the server gets for the client's answer to its request: the answer, once
        every call it may belong to is allowed again with it, or Warden's error."""
        assert message.body is not None
        questions = self._questions.get((self._server(exchange.upstream), exchange.session))
        opened = mcp.open_question(questions, message)
        if isinstance(opened, dict):
            return opened
        assert questions is not None  # an open question came from them
        async with questions.deciding:
            return await self._decide_answer(exchange, message, opened)

    async def _decide_answer(
        self,
        exchange: _Exchange,
        message: mcp.Message,
        opened: tuple[str | int, Mapping[str, Any], str, tuple[_Pending, ...]],
    ) -> dict[str, Any]:
        assert message.body is not None
        id_, result, method, calls = opened
        running = [p for p in calls if not p.done]
        if not running or any(p.action.agent.id != exchange.agent.id for p in running):
            # Asked outside any call (the GET stream), or its call has ended: no decision
            # covers it.
            why = f"the {method or 'server'} request belongs to no call Warden let through"
            return mcp.untied_answer(id_, why)
        actions = [p.action for p in running]
        decided = await mcp.decide_answer(self._core.decide, actions, method, result)
        refusal = mcp.answer_refusal(id_, method, decided)
        if refusal is None and any(p.done for p in running):
            # A call ended while the answer was decided (a kill switch, a cancellation).
            refusal = mcp.untied_answer(id_, f"its call ended before the {method} answer")
        for pending, (action, decision) in zip(running, decided, strict=True):
            if decision is None or decision.enforced is not Effect.ALLOW:
                continue
            if refusal is not None:
                # Not relayed: what this decision reserved is not used.
                outcome = Outcome(error="answer_refused", is_error=True)
                self._core.outcome(action, decision, outcome, trusted=True)
                continue
            # The call goes on under the decision that saw the answer. The earlier one's
            # outcome is recorded now, trusted: the new decision holds the same
            # reservation, so releasing the earlier one counts the call once; the
            # server's answer to the call becomes the new decision's outcome.
            went_on = Outcome(error="input_answered", result=decision.decision_id, is_error=True)
            self._core.outcome(pending.action, pending.decision, went_on, trusted=True)
            pending.action, pending.decision = action, decision
        return refusal if refusal is not None else dict(message.body)

    def _client_cancelled(self, exchange: _Exchange, body: Mapping[str, Any]) -> None:
        """The client cancelled a request: a call still decided ends there (held for
        approval, its approval stays decidable as a deferral); for a call the server
        has, its outcome now.

        Not trusted: an SDK server answers a cancelled request with an error
        (``Request cancelled``) whether or not its tool already acted, so that
        answer must not release what the call reserved. It is still relayed on
        the call's own stream (the id stays in use until then), unrecorded.
        """
        params = body.get("params")
        target = mcp.valid_id(params.get("requestId")) if isinstance(params, dict) else None
        if target is None or exchange.session is None:
            return
        # Compared as the server reads ids (1 and "1" are one id: mcp.id_key).
        wanted = mcp.id_key(target)
        key = (self._server(exchange.upstream), exchange.session)
        cancelled: list[_Pending] = []
        for other in self._open.get(key, []):
            if other.agent.id != exchange.agent.id:
                continue
            for id_ in [i for i in other.deciding if mcp.id_key(i) == wanted]:
                # Not sent yet (held for approval, maybe): it never will be.
                other.withdrawn.add(id_)
                other.deciding.pop(id_).cancel()
            for id_ in [i for i in other.calls if mcp.id_key(i) == wanted]:
                cancelled.append(other.calls.pop(id_))
        owed = self._resumable.get(key, {})
        for id_ in [i for i, p in owed.items() if p is not None and mcp.id_key(i) == wanted]:
            pending = owed[id_]
            if pending is not None and pending.action.agent.id == exchange.agent.id:
                cancelled.append(pending)
                owed[id_] = None  # still owed (its answer relayed), no longer a call's
        for pending in cancelled:
            pending.done = True
            outcome = Outcome(error="client_cancelled", is_error=True)
            self._core.outcome(pending.action, pending.decision, outcome)

    def _claim(self, exchange: _Exchange, key: tuple[str, str], id_: Any) -> None:
        """Take the answer a broken stream of the session owed under ``id_``, if any."""
        waiting = self._resumable.get(key)
        if waiting is None or mcp.valid_id(id_) is None or id_ not in waiting:
            return
        pending = waiting.pop(id_)
        if not waiting:
            del self._resumable[key]
        exchange.requests.add(id_)
        if pending is not None:
            exchange.calls[id_] = pending

    def _record(self, pending: _Pending, message: Mapping[str, Any]) -> None:
        pending.done = True
        latency = (time.perf_counter() - pending.started) * 1000
        outcome = mcp.result_outcome(message, latency)
        # A request for input releases the hold (its retry takes one of its own) only for
        # a trusted server: another may have acted before asking, and its client need
        # never retry.
        trusted = self._trusts_failures(pending) and mcp.says_whether_it_ran(message)
        self._core.outcome(pending.action, pending.decision, outcome, trusted=trusted)

    def _trusts_failures(self, pending: _Pending) -> bool:
        """Whether a failure the server reports for ``pending`` releases its cap's hold: only
        for a server ``budgets.trusted_failures`` names (SDK servers answer an exception
        raised after the tool acted with ``isError`` too)."""
        return pending.action.request.upstream in self._config.budgets.trusted_failures

    async def _filtered(
        self, agent: Agent, upstream: str, message: dict[str, Any]
    ) -> dict[str, Any]:
        result = message.get("result")
        tools = result.get("tools") if isinstance(result, dict) else None
        if not isinstance(tools, list):
            return message
        self._listed.setdefault(upstream, ListedArguments()).learn(message)
        names = [t["name"] for t in tools if isinstance(t, dict) and isinstance(t.get("name"), str)]
        hidden = await self._core.hidden_tools(agent, upstream, names)
        if not hidden:
            return message
        return dict(mcp.filter_tools(message, hidden.__contains__))

    def _unanswered(self, exchange: _Exchange, error: str) -> None:
        """The server's answer ended without answering these requests."""
        if exchange.resumable and exchange.session is not None and exchange.requests:
            # The answer may still come on a resumed stream (GET with Last-Event-ID).
            key = (self._server(exchange.upstream), exchange.session)
            waiting = self._resumable.setdefault(key, {})
            for pending in exchange.calls.values():
                pending.stream = exchange.stream  # the GET resuming it carries its stop
            waiting.update((id_, exchange.calls.get(id_)) for id_ in exchange.requests)
            self._resumable.move_to_end(key)
            while len(self._resumable) > _RESUMABLE_SESSIONS:
                _, dropped = self._resumable.popitem(last=False)
                self._give_up(dropped.values(), "no_answer")
        else:
            self._give_up(exchange.calls.values(), error)
        exchange.calls.clear()

    def _give_up(self, calls: Iterable[_Pending | None], error: str) -> None:
        for pending in calls:
            if pending is None:
                continue  # not a call: nothing to record
            pending.done = True
            # Not trusted: whether the tool ran is unknown, so nothing is released early.
            outcome = Outcome(error=error, is_error=True)
            self._core.outcome(pending.action, pending.decision, outcome)

    async def _refused(
        self,
        request: web.Request,
        exchange: _Exchange,
        resp: aiohttp.ClientResponse,
        headers: Any,
    ) -> web.StreamResponse:
        """A 4xx or 5xx from the server: relayed as it is (the client's SDK reads it)."""
        raw = await _read_upstream(resp, exchange.upstream)
        status = resp.status
        for pending in exchange.calls.values():
            pending.done = True
            # A 4xx refused the call before it ran (trusted); after a 5xx, or a gateway's
            # 408 or 499, nobody knows.
            outcome = Outcome(status=status, error=f"http_{status}", is_error=True)
            trusted = self._trusts_failures(pending) and http_tool.refused_unrun(status)
            self._core.outcome(pending.action, pending.decision, outcome, trusted=trusted)
        exchange.calls.clear()
        if exchange.response is not None:
            for id_ in sorted(exchange.requests, key=str):
                message = f"the MCP server answered HTTP {status}"
                error = _error_body(id_, WARDEN_ERROR, message, f"http_{status}")
                await self._write(exchange, data_event(dumps(error)))
            return await _finish(exchange.response)
        return web.Response(status=status, body=raw, headers=headers)

    async def _failed(
        self, request: web.Request, exchange: _Exchange, error: WardenError
    ) -> web.StreamResponse:
        """The server could not be reached or answered nonsense (502/504), or Warden cannot
        go on (503), in MCP's shape."""
        metrics.child(metrics.ERRORS, error.code).inc()
        self._give_up(exchange.calls.values(), error.code)
        exchange.calls.clear()
        ids = sorted(exchange.requests, key=str)
        exchange.requests.clear()
        if exchange.response is not None:
            for id_ in ids or (None,):
                body = _error_body(id_, WARDEN_ERROR, str(error), error.code)
                await self._write(exchange, data_event(dumps(body)))
            return await _finish(exchange.response)
        return _rpc_error(
            error.status, ids[0] if len(ids) == 1 else None, WARDEN_ERROR, str(error), error.code
        )

    # -- kill switches ---------------------------------------------------------

    async def _watched(
        self,
        request: web.Request,
        exchange: _Exchange,
        forwarding: Coroutine[Any, Any, web.StreamResponse],
    ) -> web.StreamResponse:
        """Run ``forwarding``; a kill switch covering one of its calls stops it at once."""
        switches = self._killswitches
        if switches is None or not exchange.calls:
            return await forwarding
        switch = _first_switch(switches, exchange)
        if switch is not None:
            forwarding.close()
            return await self._stop(exchange, switch)
        # Forwarded in this request's own task, which a switch thrown meanwhile cancels.
        task = asyncio.current_task()
        assert task is not None
        thrown: list[KillSwitch] = []

        def changed() -> None:
            if not thrown and (found := _first_switch(switches, exchange)) is not None:
                thrown.append(found)
                task.cancel()

        unwatch = switches.watch(changed)
        try:
            return await forwarding
        except asyncio.CancelledError:
            if not thrown:
                raise  # the client went away, or Warden is stopping
            task.uncancel()
            return await self._stop(exchange, thrown[0])
        finally:
            unwatch()

    async def _stop(self, exchange: _Exchange, switch: KillSwitch) -> web.StreamResponse:
        """Answer every call of ``exchange`` as stopped by ``switch`` (its forwarding has ended)."""
        answers = [self._kill(id_, pending, switch) for id_, pending in exchange.calls.items()]
        for id_ in sorted(exchange.requests - exchange.calls.keys(), key=str):
            message = f"Warden stopped this request: {switch.message}"
            answers.append(_error_body(id_, WARDEN_ERROR, message, "killed"))
        exchange.calls.clear()
        exchange.requests.clear()
        metrics.child(metrics.ERRORS, "killed").inc()
        if exchange.response is not None:
            for answer in answers:
                await self._write(exchange, data_event(dumps(answer)))
            return await _finish(exchange.response)
        return _json(200, answers[0] if len(answers) == 1 else answers)

    def _kill(self, id_: str | int, pending: _Pending, switch: KillSwitch) -> dict[str, Any]:
        """Stop call ``id_``, which the server runs, for ``switch``: the server is told to
        cancel it and its outcome recorded; Warden's answer to the client is returned."""
        pending.done = True
        self._tasks.spawn(self._cancel(pending, id_, switch.message), name="cancel")
        outcome = Outcome(error="killed", result=switch.message, is_error=True)
        # Not trusted: whether the tool finished is unknown, so nothing is released.
        self._core.outcome(pending.action, pending.decision, outcome)
        decision_id = pending.decision.decision_id
        return mcp.stopped_result(id_, pending.action, switch.message, decision_id)

    def _switched(self) -> None:
        """The kill switches changed: stop, as :meth:`_stop` does a POST's, the calls whose
        answers would come on a resumed stream (still owed, or claimed by an open GET)."""
        switches = self._killswitches
        assert switches is not None
        stopped: dict[tuple[str, str], dict[str | int, tuple[_Stream | None, dict[str, Any]]]] = {}
        for key, waiting in list(self._resumable.items()):
            for id_, pending in list(waiting.items()):
                if pending is None or (switch := switches.check(pending.action)) is None:
                    continue
                # No longer owed: the server's late answer is dropped as unasked.
                del waiting[id_]
                answer = self._kill(id_, pending, switch)
                stopped.setdefault(key, {})[id_] = (pending.stream, answer)
            if not waiting:
                del self._resumable[key]
        for key, exchanges in self._open.items():
            for exchange in exchanges:
                if exchange.owed is None:
                    continue  # a POST: its own _watched stops it
                for id_, pending in list(exchange.calls.items()):
                    if (switch := switches.check(pending.action)) is not None:
                        del exchange.calls[id_]
                        exchange.requests.discard(id_)
                        answer = self._kill(id_, pending, switch)
                        stopped.setdefault(key, {})[id_] = (exchange.stream, answer)
        for key, answers in stopped.items():
            metrics.child(metrics.ERRORS, "killed").inc()
            self._stopped.setdefault(key, {}).update(answers)
            self._stopped.move_to_end(key)
            self._hand_out(key, {stream for stream, _ in answers.values()})
        while len(self._stopped) > _RESUMABLE_SESSIONS:
            self._stopped.popitem(last=False)  # their calls' outcomes are recorded

    def _hand_out(self, key: tuple[str, str], streams: set[_Stream | None]) -> None:
        """Send the stopped answers of ``streams`` each on an open GET resuming its stream
        (else the next GET that resumes it takes them)."""
        for exchange in self._open.get(key, []):
            resumed = exchange.owed is not None and not exchange.client_gone
            if resumed and exchange.stream is not None and exchange.stream in streams:
                streams.discard(exchange.stream)
                self._tasks.spawn(self._hand_over(exchange, key), name="stopped-answers")

    async def _hand_over(self, exchange: _Exchange, key: tuple[str, str]) -> None:
        """Write Warden's answers to the stopped calls of the stream ``exchange`` resumes on
        it (a client reads any answer there as its resumed request's, so never another
        stream's); what its client does not take waits for the stream's next GET."""
        stopped = self._stopped.get(key, {})
        mine = {i: a for i, (s, a) in stopped.items() if s is not None and s is exchange.stream}
        for id_ in mine:
            del stopped[id_]  # taken before writing: another GET of the stream gets none
        if not stopped:
            self._stopped.pop(key, None)
        for id_, answer in list(mine.items()):
            await self._write(exchange, data_event(dumps(answer)))
            if exchange.client_gone:
                break
            del mine[id_]
        if mine:
            kept = self._stopped.setdefault(key, {})
            kept.update((id_, (exchange.stream, answer)) for id_, answer in mine.items())

    def _resumes(self, key: tuple[str, str], last: str) -> _Stream | None:
        """The stream a GET of session ``key`` with ``Last-Event-ID: last`` resumes, among
        those still owed an answer; ``None`` if Warden cannot tell (an id it never relayed,
        or one that several streams carried)."""
        streams = {p.stream for p in self._resumable.get(key, {}).values() if p is not None}
        streams |= {stream for stream, _ in self._stopped.get(key, {}).values()}
        found = [s for s in streams if s is not None and last in s.ids]
        return found[0] if len(found) == 1 else None

    async def _cancel(self, pending: _Pending, id_: str | int, reason: str) -> None:
        """Tell the server to stop request ``id_`` (its late answer goes nowhere)."""
        url, headers = pending.url, pending.headers
        timeout = aiohttp.ClientTimeout(total=_CANCEL_TIMEOUT_S)
        body = dumps(mcp.cancelled_notification(id_, reason)).encode()
        try:
            async with self._session.post(
                url, data=body, headers=headers, timeout=timeout, allow_redirects=False
            ) as resp:
                await resp.read()
        except Exception as exc:
            # The error text may quote the URL, and its query is the agent's: the kind only.
            log.warning("could not tell the MCP server to cancel %r: %s", id_, type(exc).__name__)

    # -- GET and DELETE --------------------------------------------------------

    async def _get(
        self,
        request: web.Request,
        agent: Agent,
        name: str,
        upstream: UpstreamConfig,
        url: URL,
    ) -> web.StreamResponse:
        """The server's own SSE stream (or a resumed one): relayed, answers settled."""
        if not _accepts(request.headers.get("Accept", ""))[1]:
            return _rpc_error(
                406,
                None,
                WARDEN_ERROR,
                "Not Acceptable: GET needs Accept: text/event-stream",
                "not_acceptable",
            )
        # An open stream may stay quiet for long: only connecting is bounded.
        timeout = aiohttp.ClientTimeout(total=None, connect=upstream.connect_timeout_s)
        try:
            resp = await self._session.get(
                url,
                headers=self._headers(request, name),
                timeout=timeout,
                allow_redirects=False,
            )
        except Exception as exc:
            error = _upstream_error(exc, name)
            return _rpc_error(error.status, None, WARDEN_ERROR, str(error), error.code)
        try:
            status = resp.status
            headers = hdr.response_headers(resp.headers)
            is_sse = resp.headers.get("Content-Type", "").lower().startswith(_SSE)
            if 300 <= status < 400 or not 200 <= status < 600:
                error = _refused_status(status, name)
                return _rpc_error(error.status, None, WARDEN_ERROR, str(error), error.code)
            if 200 <= status < 300 and not is_sse:
                # The TypeScript SDK reads any 2xx answer to GET as SSE, whatever its type:
                # passed on unread, it could answer a held call (see _settle).
                error = UpstreamProtocol(
                    f"MCP server {name!r} answered the GET stream with "
                    f"{resp.headers.get('Content-Type', 'no Content-Type')[:60]!r}, not "
                    f"{_SSE}"
                )
                return _rpc_error(error.status, None, WARDEN_ERROR, str(error), error.code)
            if not is_sse:
                raw = await _read_upstream(resp, name)
                return web.Response(status=status, body=raw, headers=headers)
            session = request.headers.get(SESSION_HEADER)
            exchange = _Exchange(agent, name, url, session, filter_all=True)
            refused = await self._opened(request, exchange, resp)
            if refused is not None:
                return _rpc_error(refused.status, None, WARDEN_ERROR, str(refused), refused.code)
            last = request.headers.get("Last-Event-ID")
            exchange.stream = None  # relays no stream's events unless it resumes one
            if session is not None and last is not None:
                # Only a resumed stream carries answers (the standalone GET stream never
                # does); several may be resumed at once, so each claims its answers.
                exchange.owed = (self._server(name), session)
                exchange.stream = self._resumes(exchange.owed, last)
            exchange.response = await _open_sse(request, headers, status=status)
            self._opened_exchange(exchange)  # the calls it claims can be cancelled
            try:
                if exchange.owed is not None:
                    await self._hand_over(exchange, exchange.owed)
                await self._relay_events(exchange, resp)
            except UpstreamError as exc:
                log.info("MCP stream from %r ended: %s", name, exc)
            finally:
                self._closed_exchange(exchange)
            self._unanswered(exchange, "stream_ended")
            return await _finish(exchange.response)
        finally:
            resp.release()

    async def _delete(
        self, request: web.Request, name: str, upstream: UpstreamConfig, url: URL
    ) -> web.StreamResponse:
        timeout = aiohttp.ClientTimeout(
            total=None, connect=upstream.connect_timeout_s, sock_read=upstream.timeout_s
        )
        try:
            async with self._session.delete(
                url,
                headers=self._headers(request, name),
                timeout=timeout,
                allow_redirects=False,
            ) as resp:
                raw = await _read_upstream(resp, name)
                status = resp.status
                headers = hdr.response_headers(resp.headers)
        except Exception as exc:
            error = _upstream_error(exc, name)
            return _rpc_error(error.status, None, WARDEN_ERROR, str(error), error.code)
        if 300 <= status < 400 or not 200 <= status < 600:
            error = _refused_status(status, name)
            return _rpc_error(error.status, None, WARDEN_ERROR, str(error), error.code)
        session = request.headers.get(SESSION_HEADER)
        if 200 <= status < 300 and session is not None:
            owed = self._resumable.pop((self._server(name), session), {})
            self._give_up(owed.values(), "session_ended")
            self._stopped.pop((self._server(name), session), None)
            self._questions.pop((self._server(name), session), None)
            try:
                await self._owners.ended(self._server(name), session)
            except Exception as exc:  # the row stays until pruned: harmless
                log.warning("cannot forget an MCP session owner: %s", type(exc).__name__)
        return web.Response(status=status, body=raw or None, headers=headers)

    # -- sessions and keys -----------------------------------------------------

    async def _session_refused(
        self, request: web.Request, upstream: str, agent: Agent
    ) -> web.Response | None:
        """The answer to a request naming a session that is not its agent's, if it is so."""
        named = request.headers.getall(SESSION_HEADER, [])
        if len(named) > 1:  # the server might read another one than Warden checks
            return _rpc_error(
                400, None, WARDEN_ERROR, "Mcp-Session-Id given more than once", "ambiguous_header"
            )
        if not named:
            return None
        server = self._server(upstream)
        try:
            owner = await self._owners.owner(server, named[0])
        except Exception as exc:
            log.warning("cannot read MCP session owners: %s", type(exc).__name__)
            if self._config.state.on_unavailable == "deny":  # fail closed: unchecked
                raise StateUnavailable(
                    "cannot check who owns this MCP session: the state store is unavailable"
                ) from None
            return None  # fallback: as the server alone would, for the outage
        if owner is None:
            request[_UNOWNED] = named[0]  # the agent's once the server accepts it
        elif owner != agent.id:
            metrics.child(metrics.ERRORS, "session_not_found").inc()
            return _rpc_error(404, None, WARDEN_ERROR, "Session not found", "session_not_found")
        else:
            self._owners.used(server, named[0], agent.id)
        return None

    def _server(self, upstream: str) -> str:
        """Where an upstream's sessions live: two upstream entries for one server (its
        ``base_url``) share their sessions' owners."""
        found = self._config.upstreams.get(upstream)
        return found.base_url if found is not None else upstream

    async def _opened(
        self, request: web.Request, exchange: _Exchange, resp: aiohttp.ClientResponse
    ) -> WardenError | None:
        """Record that the exchange's agent owns the session the server opened for it (or
        accepted it naming, unowned); the error if that cannot be recorded, or if the
        server handed out a session another agent owns."""
        if resp.status >= 300:
            return None
        if exchange.session is None:
            session = resp.headers.get(SESSION_HEADER)
        else:
            session = request.get(_UNOWNED)
        if session is None:
            return None
        try:
            server = self._server(exchange.upstream)
            mine = await self._owners.claim(server, session, exchange.agent.id)
        except Exception as exc:
            log.warning("cannot record an MCP session owner: %s", type(exc).__name__)
            if self._config.state.on_unavailable != "deny":
                return None  # fallback: the session goes on unbound, for the outage
            # An id nobody owns must not reach the agent.
            return StateUnavailable(
                "cannot record who owns this MCP session: the state store is unavailable"
            )
        if not mine:
            # A server reusing ids, or one an agent named before it was issued.
            return UpstreamProtocol(
                f"MCP server {exchange.upstream!r} gave out a session id another agent holds"
            )
        return None

    def _headers(self, request: web.Request, upstream: str) -> CIMultiDict[str]:
        """The agent's headers for the server: Warden's key in place of the agent's, if held."""
        return hdr.request_headers(request.headers, self._credentials.get(upstream))

    # -- writing ---------------------------------------------------------------

    async def _write(self, exchange: _Exchange, data: bytes) -> None:
        """Write to the client's SSE answer; a client gone is noted, not raised."""
        response = exchange.response
        if response is None or exchange.client_gone:
            return
        try:
            await response.write(data)
        except (ConnectionResetError, aiohttp.ClientConnectionResetError, RuntimeError):
            exchange.client_gone = True

    async def close(self) -> None:
        """Wait for cancellations still being sent."""
        if self._unwatch is not None:
            self._unwatch()
        await self._tasks.drain()


# -- helpers -------------------------------------------------------------------

# The client may have gone away; what it would have read is recorded anyway.
_GONE = (ConnectionResetError, aiohttp.ClientConnectionResetError, RuntimeError)


def _error_body(id_: JsonId, code: int, message: str, cause: str) -> dict[str, Any]:
    """A JSON-RPC error; ``data.warden`` names Warden's cause (a stable error code)."""
    error = {"code": code, "message": message, "data": {"warden": cause}}
    return {"jsonrpc": "2.0", "id": id_, "error": error}


def _json(status: int, value: Any) -> web.Response:
    return web.Response(status=status, body=dumps(value).encode(), content_type=_JSON)


def _rpc_error(status: int, id_: JsonId, code: int, message: str, cause: str) -> web.Response:
    """An HTTP error whose body is a JSON-RPC error, as the MCP SDKs read it."""
    return _json(status, _error_body(id_, code, message, cause))


def _accepts(accept: str) -> tuple[bool, bool]:
    """Whether ``Accept`` takes JSON and SSE (media ranges with wildcards count)."""
    types = {part.split(";", 1)[0].strip().lower() for part in accept.split(",")}
    anything = "*/*" in types
    json_ok = anything or bool(types & {_JSON, "application/*"})
    sse_ok = anything or bool(types & {_SSE, "text/*"})
    return json_ok, sse_ok


def _first_switch(switches: KillSwitches, exchange: _Exchange) -> KillSwitch | None:
    for pending in exchange.calls.values():
        switch = switches.check(pending.action)
        if switch is not None:
            return switch
    return None


def _merge(raw: bytes, answers: list[dict[str, Any]]) -> bytes:
    """The server's answer to a batch with Warden's own answers to its other members."""
    try:
        value = loads(raw)
    except (ValueError, UnicodeDecodeError):
        return raw
    items = value if isinstance(value, list) else [value]
    return dumps([*items, *answers]).encode()


def _whole_sse(status: int, headers: Mapping[str, str], body: bytes) -> web.Response:
    """An SSE answer whose every event is known: sent as one body, with its length."""
    response = web.Response(status=status, headers=dict(headers), body=body)
    response.headers["Content-Type"] = _SSE
    response.headers["Cache-Control"] = "no-cache"
    return response


async def _open_sse(
    request: web.Request, headers: Mapping[str, str], *, status: int = 200
) -> web.StreamResponse:
    response = web.StreamResponse(status=status, headers=dict(headers))
    response.headers["Content-Type"] = _SSE
    response.headers["Cache-Control"] = "no-cache"
    await response.prepare(request)
    return response


async def _finish(response: web.StreamResponse) -> web.StreamResponse:
    with contextlib.suppress(*_GONE):
        await response.write_eof()
    return response


async def _read_upstream(resp: aiohttp.ClientResponse, name: str) -> bytes:
    return await read_body(resp, f"MCP server {name!r}")


def _upstream_error(exc: BaseException, name: str) -> UpstreamError:
    return upstream_error(exc, f"MCP server {name!r}")


def _refused_status(status: int, name: str) -> UpstreamError:
    """A 502 for statuses never relayed: redirects (they would lead around Warden) and odd ones."""
    if 300 <= status < 400:
        return UpstreamRedirect(
            f"MCP server {name!r} answered with a redirect ({status}); Warden never relays "
            "redirects, which would send the agent around it"
        )
    return UpstreamProtocol(f"MCP server {name!r} answered with status {status}")
