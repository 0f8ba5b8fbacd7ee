"""MCP (JSON-RPC 2.0) without I/O: what every MCP door (stdio, streamable HTTP) shares.

A door hands :func:`parse` the bytes one client message came in (a single
message or a batch) and gets each message classified:

* a ``tools/call`` request carries a :class:`~warden.model.ToolCall`; the door
  asks the core, then forwards :func:`forward_call` (the call re-rendered from
  what was decided, so the server runs exactly the arguments the policy saw)
  or answers :func:`denied_result` itself. So do the other requests that read
  or render something at the server (:data:`GOVERNED`: ``resources/read``,
  ``prompts/get``, ``completion/complete``), as actions of their own kind
  whose tool is the method and whose arguments are the request's params;
* a message that is not valid JSON-RPC carries the error response to send
  back (-32700 parse error, -32600 invalid request, -32602 invalid params);
* a client's answer to the server's own request (elicitation, sampling, roots
  under the revisions before 2026-07-28) is a decision too: the door ties it to
  the decided calls in flight when the server asked, and decides each again
  with the answer among its ``input_responses`` (:func:`with_answer`), as a
  2026-07-28 retry's ``inputResponses`` are decided; one it cannot tie, or that
  is not allowed, reaches the server as an error (:func:`refused_answer`);
* everything else (other requests, notifications) passes unchanged.

:func:`result_outcome` turns the server's response into the trusted
:class:`~warden.model.Outcome`, and :func:`filter_tools` is the ``tools/list``
hook: it drops the tools a door was told to hide.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import re
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from warden.model import (
    Action,
    ActionKind,
    Agent,
    Decision,
    Effect,
    Outcome,
    RequestMeta,
    Stage,
    ToolCall,
    new_id,
)
from warden.protocols._wire import (
    dumps,
    keys_fold_apart,
    loads,
    parse_arguments,
    policy_safe,
)
from warden.protocols.declared_arguments import ListedArguments

__all__ = [
    "ACCEPTED",
    "GOVERNED",
    "INPUT_REQUIRED",
    "INVALID_PARAMS",
    "INVALID_REQUEST",
    "MAX_ANSWERS",
    "MAX_ANSWER_FIELDS",
    "MAX_BATCH",
    "NOTIFICATIONS",
    "PARSE_ERROR",
    "PASSED",
    "PROTOCOL",
    "REFUSED",
    "Message",
    "Payload",
    "Questions",
    "action",
    "answer_refusal",
    "cancelled_notification",
    "client_result",
    "decide_answer",
    "denied_result",
    "encode",
    "error_response",
    "filter_tools",
    "forward_call",
    "from_server",
    "id_key",
    "input_responses",
    "open_question",
    "parse",
    "ping_answer",
    "progress_notification",
    "progress_token",
    "refused_answer",
    "request_meta",
    "result_outcome",
    "says_whether_it_ran",
    "server_request",
    "stopped_result",
    "unaddressed_error",
    "untied_answer",
    "valid_id",
    "waiting_note",
    "with_answer",
]

log = logging.getLogger("warden.mcp")

PROTOCOL: Final = "mcp"
PARSE_ERROR: Final = -32700
INVALID_REQUEST: Final = -32600
INVALID_PARAMS: Final = -32602
_MESSAGE_FIELDS: Final = frozenset({"jsonrpc", "id", "method", "params", "result", "error"})
_CALL_PARAMS: Final = frozenset(
    {"name", "arguments", "_meta", "task", "inputResponses", "requestState"}
)
"""What ``tools/call`` params hold (MCP 2025-11-25; ``task`` asks for a task-augmented call;
``inputResponses`` and ``requestState`` retry a multi-round-trip request, 2026-07-28)."""
_RETRY_PARAMS: Final = frozenset({"inputResponses", "requestState"})
_RETRY_ALIASES: Final = frozenset({"input_responses", "request_state"})
_ANSWER_FIELDS: Final = frozenset(
    {"action", "content", "_meta", "role", "model", "stopReason", "roots", "resultType"}
)
"""The fields of the answers in ``inputResponses`` (elicitation, sampling and roots results)."""
MAX_ANSWERS: Final = 16
"""Answers one retry may carry in ``inputResponses`` (a server asks a question or two)."""
MAX_ANSWER_FIELDS: Final = 32
"""Fields one answer, and its content, may hold (an elicitation form's fields)."""
_ANSWERS_TOO_MANY: Final = (
    f"Invalid params: inputResponses holds more than {MAX_ANSWERS} answers, or an answer "
    f"or its content more than {MAX_ANSWER_FIELDS} fields"
)
_ANSWERS_UNREADABLE: Final = (
    "Invalid params: inputResponses holds keys equal but for case, or values no policy can "
    "take as they are"
)
_RETRY_TOOLS: Final = (
    "Invalid params: an answer in inputResponses proposes tool calls (tool_use), which "
    "this server would run with no decision; Warden does not govern tool use in sampling"
)
GOVERNED: Final[Mapping[str, tuple[ActionKind, frozenset[str]]]] = {
    "tools/call": (ActionKind.TOOL_CALL, _CALL_PARAMS),
    "resources/read": (ActionKind.RESOURCE_READ, frozenset({"uri", "_meta", *_RETRY_PARAMS})),
    "prompts/get": (
        ActionKind.PROMPT_GET,
        frozenset({"name", "arguments", "_meta", *_RETRY_PARAMS}),
    ),
    "completion/complete": (
        ActionKind.ARGUMENT_COMPLETION,
        frozenset({"ref", "argument", "context", "_meta"}),
    ),
}
"""Client requests decided before they reach the server: each method's action kind and the
params it holds (only those are forwarded). A resource or prompt can hand the agent what a
denied tool would (a customer's records, a file), so none passes undecided."""
PASSED: Final = frozenset(
    {
        "initialize",
        "ping",
        "server/discover",
        "subscriptions/listen",
        "logging/setLevel",
        "tools/list",
        "resources/list",
        "resources/templates/list",
        "resources/subscribe",
        "resources/unsubscribe",
        "prompts/list",
        "tasks/get",
        "tasks/result",
        "tasks/list",
        "tasks/cancel",
    }
)
"""Client requests MCP defines that pass undecided: the connection's own (``initialize``,
``ping``, ``server/discover``, ``logging/setLevel``), listings (filtered per agent for
``tools/list``), subscriptions, whose updates name what changed and are read through a
decided request, and tasks (Warden refuses task-augmented calls; a call a server runs as
a task anyway is recorded as accepted, see :func:`result_outcome`). A request of
any other method (a server's own extension) is decided as an ``mcp_request`` action, and
one spelled otherwise than MCP spells a method (``TOOLS/CALL``) is refused: a lenient
server could run it as that method."""
NOTIFICATIONS: Final = frozenset(
    {
        "notifications/initialized",
        "notifications/cancelled",
        "notifications/progress",
        "notifications/roots/list_changed",
    }
)
"""The client notifications MCP defines: the only ones that go on (none acts on anything)."""
_KNOWN: Final = frozenset({*PASSED, *NOTIFICATIONS, *GOVERNED})
_PRINTABLE: Final = re.compile(r"[\x21-\x7e]+")
ACCEPTED: Final = 202
"""The outcome status of a call the server answered with a shape a client extension claims
(a task handle): accepted and going on at the server, neither completed nor failed."""
REFUSED: Final = -32001
"""The JSON-RPC error code of a request other than ``tools/call`` that Warden did not let
through (a tool call gets a tool result with ``isError``, which the model reads)."""
_CASE_VARIANT: Final = "Invalid Request: keys that differ only in case"
MAX_BATCH: Final = 100
"""Messages in one JSON-RPC batch (clients send a handful; 2025-06-18 sends none)."""

type JsonId = str | int | None


@dataclass(frozen=True, slots=True)
class Message:
    """One message of a client payload, classified.

    ``body`` is the message (``None`` when it is not valid JSON-RPC, and
    ``error`` is then the response to send). ``call`` is set for a
    ``tools/call`` request: it must be decided before it goes on.
    """

    body: Mapping[str, Any] | None
    error: Mapping[str, Any] | None = None
    call: ToolCall | None = None

    @property
    def id(self) -> JsonId:
        """The JSON-RPC id, or ``None`` (notifications, invalid messages)."""
        return valid_id(self.body.get("id")) if self.body is not None else None

    @property
    def is_request(self) -> bool:
        """True for a valid message that expects a response."""
        return self.body is not None and "method" in self.body and "id" in self.body


@dataclass(frozen=True, slots=True)
class Payload:
    """What one client write carried: one message, or a batch (a JSON array)."""

    messages: tuple[Message, ...]
    batch: bool


def id_key(id_: str | int) -> str:
    """An id as servers tell requests apart: the Python SDK's HTTP server routes an
    answer by ``str(id)``, so ``1`` and ``"1"`` are one id, and its dispatcher files a
    request under ``int(id)`` where that reads it (as the TypeScript SDK does), so
    ``"01"``, ``" 1"`` and ``"+1"`` are that id too."""
    if isinstance(id_, str):
        try:
            return str(int(id_))
        except ValueError:  # not a number (or too long to convert): the string itself
            return id_
    return str(id_)


def ids_used_twice(messages: Sequence[Message]) -> set[str | int]:
    """Request ids that more than one request of a batch carries (by :func:`id_key`).

    The server's answer names only the id, so Warden could not tell which of
    them it answers: a bogus request's error would be recorded as a refund's
    trusted failure. Such requests are refused (``-32600``), none decided.
    """
    ids = [m.id for m in messages if m.is_request and m.id is not None]
    counts = Counter(id_key(i) for i in ids)
    return {i for i in ids if counts[id_key(i)] > 1}


def id_in_use(id_: JsonId) -> dict[str, Any]:
    """The answer to a request whose id another request still waiting for its answer carries."""
    return error_response(id_, INVALID_REQUEST, "Invalid Request: id in use")


REQUEST_CANCELLED: Final = -32800
"""The error the SDK's HTTP servers answer a request the client cancelled with."""


def cancelled_response(id_: JsonId) -> dict[str, Any]:
    """The answer to a request the client cancelled before it was sent on."""
    return error_response(id_, REQUEST_CANCELLED, "Request cancelled")


def error_response(id_: JsonId, code: int, message: str) -> dict[str, Any]:
    """A JSON-RPC error response."""
    return {"jsonrpc": "2.0", "id": id_, "error": {"code": code, "message": message}}


def parse(data: bytes | str) -> Payload:
    """Classify a client payload; never raises (bad input becomes error messages)."""
    try:
        value = loads(data)
    except (ValueError, UnicodeDecodeError):
        return Payload((Message(None, error_response(None, PARSE_ERROR, "Parse error")),), False)
    if isinstance(value, list):
        if not value:
            # JSON-RPC: an empty batch is one invalid request, answered singly.
            invalid = error_response(None, INVALID_REQUEST, "Invalid Request: empty batch")
            return Payload((Message(None, invalid),), False)
        if len(value) > MAX_BATCH:
            # One request must not become thousands of decisions and records at once.
            why = f"Invalid Request: a batch holds at most {MAX_BATCH} messages"
            too_many = error_response(None, INVALID_REQUEST, why)
            return Payload((Message(None, too_many),), False)
        return Payload(tuple(_message(v, i) for i, v in enumerate(value)), True)
    return Payload((_message(value, 0),), False)


MAX_SAFE_ID: Final = 2**53 - 1
"""Integer ids beyond this are refused: a server reading JSON numbers as doubles (JavaScript's
``JSON.parse``) sees 2**53 and 2**53 + 1 as one id, and would answer a bogus request under a
tool call's id (a trusted failure that releases the call's budget reservation)."""


def from_server(message: Mapping[str, Any]) -> Literal["request", "response", "invalid"]:
    """What a client makes of a server's message: its own ``request`` (or
    notification), a ``response`` to one of the client's, or ``invalid`` (dropped).

    Read as the SDKs read it, not by ``method`` alone: ``{"id": 7, "method":
    null, "result": ...}`` is a response to request 7 for the Python client, so
    a message with ``result`` or ``error`` is a response, and one that also
    carries ``method`` is invalid. Keys that differ only in case (``"ID"``)
    are invalid, as from a client.
    """
    if not _spelled_apart(message, _MESSAGE_FIELDS):
        return "invalid"
    answers = "result" in message or "error" in message
    if "method" not in message:
        return "response" if answers else "invalid"
    method = message["method"]
    if answers or not isinstance(method, str) or not method:
        return "invalid"
    return "request"


def unaddressed_error(message: Mapping[str, Any]) -> bool:
    """Whether a response is an error with ``id: null``: about a request its sender
    could not read, so it answers no request in particular (and passes as it is)."""
    return message.get("id") is None and "error" in message and "result" not in message


def valid_id(value: object) -> JsonId:
    """``value`` if it is a JSON-RPC id Warden takes (a string, or an integer within
    2^53), else ``None``: a decimal (``7.0``), a boolean or a huge integer is none,
    though some clients would read it as the integer it equals. (A string that
    reads as another number, ``"01"``, is an id: :func:`id_key` tells it apart.)"""
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) <= MAX_SAFE_ID:
        return value
    return None


_INTERNAL_ERROR: Final = -32603
_SAMPLING_TOOLS: Final = (
    "Warden did not relay the client's answer: it proposes tool calls (tool_use), which "
    "this server would run with no decision; Warden does not govern tool use in sampling"
)
_ANSWER_UNREADABLE: Final = (
    "Warden did not relay the client's answer: its result is not an object a policy can "
    "read as a server does (keys equal but for case, a field spelled otherwise than MCP "
    f"spells it, more than {MAX_ANSWER_FIELDS} fields, or values no policy can take as they are)"
)


def _proposes_tool_use(result: object) -> bool:
    """Whether a client's answer carries ``tool_use`` content (sampling with tools).

    The server runs those calls itself, so the answer is a tool call Warden
    would pass undecided: it goes to the server as an error instead. Keys are
    compared case-blind, as a Go server binds them.
    """
    if not isinstance(result, dict):
        return False
    for key, content in result.items():
        if not (isinstance(key, str) and key.casefold() == "content"):
            continue
        for item in content if isinstance(content, list) else [content]:
            if isinstance(item, dict) and any(
                isinstance(k, str) and k.casefold() == "type" and v == "tool_use"
                for k, v in item.items()
            ):
                return True
    return False


def _client_answer(value: dict[str, Any], id_: JsonId) -> Message:
    """A response to a request the server made (sampling, elicitation, roots).

    Its result is decided by the door (:func:`with_answer`); one the policy
    could not read as the server does goes to the server as an error instead.
    """
    if id_ is None or ("result" in value) == ("error" in value):
        return Message(None, error_response(id_, INVALID_REQUEST, "Invalid Request"))
    result = value.get("result")
    if _proposes_tool_use(result):
        # Sent to the server in the answer's place; the client is told nothing.
        return Message(error_response(id_, _INTERNAL_ERROR, _SAMPLING_TOOLS))
    if "result" in value and not _readable_answer(result):
        # As a retry's inputResponses are refused: "CONTENT", or "Amount" beside
        # "amount", would be read one way by the policy and another by the server.
        return Message(error_response(id_, _INTERNAL_ERROR, _ANSWER_UNREADABLE))
    return Message(value)


def _readable_answer(answer: object) -> bool:
    """Whether a policy can decide on ``answer`` (a result) as the server reads it."""
    return (
        isinstance(answer, dict)
        and not _too_wide(answer)
        and policy_safe(answer)
        and _spelled_apart(answer, _ANSWER_FIELDS)
    )


def client_result(message: Message) -> Mapping[str, Any] | None:
    """The result of a client's answer to the server's own request, or ``None``.

    ``None`` too for an error answer: the server's request fails whatever it
    says, so there is nothing to decide in it (it passes as it is).
    """
    body = message.body
    if body is None or "method" in body or "id" not in body:
        return None
    result = body.get("result")
    return result if isinstance(result, dict) else None


def server_request(message: Mapping[str, Any]) -> tuple[str | int, str] | None:
    """The id and method of a server's request (one :func:`from_server` reads as
    ``"request"``) that waits for the client's answer; ``None`` for a notification."""
    id_ = valid_id(message.get("id"))
    method = message.get("method")
    if id_ is None or not isinstance(method, str):
        return None
    return id_, method


MAX_QUESTIONS: Final = 256
"""The server's requests a door keeps waiting for an answer (per session over HTTP)."""


class Questions[T]:
    """The server's requests waiting for the client's answer, each with the decided calls
    it may belong to (``T``: a door's record of one call in flight when it was asked).

    Kept by :func:`id_key`, as the server routes the answer. The oldest are
    forgotten past :data:`MAX_QUESTIONS`: their answers then fail closed.
    """

    def __init__(self, limit: int = MAX_QUESTIONS) -> None:
        self._open: OrderedDict[str, tuple[str, tuple[T, ...]]] = OrderedDict()
        self._limit = limit
        self.deciding = asyncio.Lock()
        """Held while an answer is decided: two answers to one call's questions, decided
        together, would each start from the call before the other (neither seeing both)."""

    def asked(self, id_: str | int, method: str, calls: Sequence[T]) -> None:
        """The server sent request ``id_`` while ``calls`` were running."""
        key = id_key(id_)
        if key in self._open:
            # Two requests under one id, unanswered: the answer could be either's, so
            # it is tied to no call, and fails closed.
            self._open[key] = ("", ())
            return
        self._open[key] = (method, tuple(calls))
        while len(self._open) > self._limit:
            self._open.popitem(last=False)

    def answered(self, id_: str | int) -> tuple[str, tuple[T, ...]] | None:
        """The method of request ``id_`` and the calls it may belong to; ``None``: unknown."""
        return self._open.pop(id_key(id_), None)

    def __len__(self) -> int:
        return len(self._open)


_ANSWER_KEY: Final = re.compile(r"(?:elicitation/create|sampling/createMessage|roots/list)#\d+")
"""How :func:`with_answer` names an answer of the revisions before 2026-07-28."""
_ANSWERS_NAMED_AS_WARDENS: Final = (
    "Invalid params: inputResponses names an answer as Warden names the answers to the "
    "server's own requests (elicitation/create#1)"
)


def with_answer(action: Action, method: str, answer: Mapping[str, Any]) -> Action | None:
    """A running call's ``action`` again, with the client's answer to the server's
    ``method`` request among its ``input_responses``: decided anew before the answer
    goes on.

    Under the revisions before 2026-07-28 a server asks mid-call (``elicitation/create``)
    and runs on what the answer says (an amount the user typed), as a 2026-07-28
    server reads a retry's ``inputResponses``; so the same policy input, and the same
    rules, apply. The key names the method and the answer's place among the call's
    answers (``elicitation/create#1``), not the request's id, which differs every
    time: a retry of the call gets the same keys, so an approval can match it.
    ``None`` when the call would hold more than :data:`MAX_ANSWERS` answers. The
    action is a fresh one (its own id, so its own reservation), and the session
    guard's per-decision memo starts empty.
    """
    answers = dict(action.input_responses or {})
    if len(answers) >= MAX_ANSWERS:
        return None
    place = len(answers) + 1
    while f"{method}#{place}" in answers:
        place += 1
    answers[f"{method}#{place}"] = dict(answer)
    request = action.request
    if request.conversation is not None:
        fresh = dataclasses.replace(request.conversation, memo={})
        request = dataclasses.replace(request, conversation=fresh)
    return dataclasses.replace(
        action, action_id=new_id("act"), input_responses=answers, request=request
    )


def refused_answer(id_: str | int, method: str, decision: Decision) -> dict[str, Any]:
    """Warden's error to the server in place of the client's answer to its ``method``
    request, which ``decision`` did not allow. The server's tool fails with it, and its
    error (which the client reads) gives Warden's reason."""
    what = f"the client's answer to {method}"
    if decision.effect is Effect.REQUIRE_APPROVAL:
        what = f"held {what} for human approval; it was not relayed"
    else:
        what = f"blocked {what}; it was not relayed"
    text = f"[Warden] {what}. Reason: {decision.reason}. (decision {decision.decision_id})"
    error = {"code": REFUSED, "message": text, "data": {"warden/decision": decision.decision_id}}
    return {"jsonrpc": "2.0", "id": id_, "error": error}


def untied_answer(id_: str | int, why: str) -> dict[str, Any]:
    """Warden's error to the server in place of a client's answer it could not decide."""
    return error_response(id_, REFUSED, f"[Warden] did not relay the client's answer: {why}")


async def decide_answer(
    decide: Callable[[Action], Awaitable[Decision]],
    actions: Sequence[Action],
    method: str,
    answer: Mapping[str, Any],
) -> list[tuple[Action, Decision | None]]:
    """Each running call's action decided again with the client's ``answer`` to the
    server's ``method`` request (:func:`with_answer`), together.

    ``None`` for a decision that could not be made (too many answers, or the
    core failing): the answer must not go on.
    """

    async def one(action: Action) -> tuple[Action, Decision | None]:
        again = with_answer(action, method, answer)
        if again is None:
            return action, None
        try:
            return again, await decide(again)
        except Exception:
            # Fail closed: an answer Warden could not decide never reaches the server.
            log.exception("could not decide the answer to %s for %s", method, action.tool)
            return again, None

    return list(await asyncio.gather(*(one(a) for a in actions)))


def answer_refusal(
    id_: str | int, method: str, decided: Sequence[tuple[Action, Decision | None]]
) -> dict[str, Any] | None:
    """Warden's error in place of an answer that not every decision of
    :func:`decide_answer` allowed; ``None``: every one did, and the answer goes on."""
    for _, decision in decided:
        if decision is None:
            return untied_answer(id_, f"Warden could not decide the answer to {method}")
        if decision.enforced is not Effect.ALLOW:
            return refused_answer(id_, method, decision)
    return None


def open_question[T](
    questions: Questions[T] | None, message: Message
) -> tuple[str | int, Mapping[str, Any], str, tuple[T, ...]] | dict[str, Any]:
    """The server's request a client's answer (``message``, with a result) answers: its
    id, the answer's result, the request's method and the calls it may belong to; or,
    instead, what the server gets without a decision (a ping's empty answer, or
    Warden's error for a request that is not open)."""
    id_ = message.id
    result = client_result(message)
    assert id_ is not None
    assert result is not None
    question = questions.answered(id_) if questions is not None else None
    if question is None:
        log.warning("the MCP client answered request %r, which is not open; refused", id_)
        return untied_answer(id_, "the server has no request open under its id")
    method, calls = question
    if method == "ping":
        return ping_answer(id_)
    return id_, result, method, calls


def ping_answer(id_: str | int) -> dict[str, Any]:
    """The answer to the server's ``ping``, rebuilt empty: it shapes nothing, so it needs
    no call to decide it against (whatever else the client put in it stays out)."""
    return {"jsonrpc": "2.0", "id": id_, "result": {}}


def _spelled_apart(obj: Mapping[str, Any], fields: frozenset[str]) -> bool:
    """No two keys equal but for case, and none a case variant of one of ``fields``.

    Go servers bind JSON-RPC and MCP fields case-insensitively, the last key
    winning: ``"method": "ping", "METHOD": "tools/call"`` runs a tool there.
    """
    folded = _folded(fields)
    return keys_fold_apart(obj) and not any(
        isinstance(k, str) and k not in fields and k.casefold() in folded for k in obj
    )


@functools.cache
def _folded(fields: frozenset[str]) -> frozenset[str]:
    """``fields`` case-folded (``inputResponses`` as ``inputresponses``); a few sets, once."""
    return frozenset(f.casefold() for f in fields)


def _message(value: object, index: int) -> Message:
    if not isinstance(value, dict) or value.get("jsonrpc") != "2.0":
        id_ = valid_id(value.get("id")) if isinstance(value, dict) else None
        return Message(None, error_response(id_, INVALID_REQUEST, "Invalid Request"))
    if not _spelled_apart(value, _MESSAGE_FIELDS):
        id_ = valid_id(value.get("id"))
        return Message(None, error_response(id_, INVALID_REQUEST, _CASE_VARIANT))
    has_id = "id" in value
    id_ = valid_id(value.get("id"))
    if has_id and id_ is None:
        # MCP: ids are strings or integers, never null.
        return Message(None, error_response(None, INVALID_REQUEST, "Invalid Request: bad id"))
    method = value.get("method")
    if method is None and "method" in value:
        # Neither a request nor an answer: read as an answer by a lenient server (the
        # SDK's), it would reach the server without the answer's decision.
        return Message(None, error_response(id_, INVALID_REQUEST, "Invalid Request: method"))
    if method is None:
        return _client_answer(value, id_ if has_id else None)
    if not isinstance(method, str) or "result" in value or "error" in value:
        return Message(None, error_response(id_, INVALID_REQUEST, "Invalid Request"))
    params = value.get("params")
    if params is not None and not isinstance(params, dict | list):
        return Message(None, error_response(id_, INVALID_REQUEST, "Invalid Request: params"))
    governed = GOVERNED.get(method)
    if governed is None:
        settled = _not_governed(value, method, id_, has_id=has_id)
        if settled is not None:
            return settled
    if not has_id:
        # A call sent as a notification would run undecided on a lenient server.
        return Message(None, error_response(None, INVALID_REQUEST, "Invalid Request: no id"))
    kind, fields = governed if governed is not None else (ActionKind.MCP_REQUEST, None)
    refused = _refused_params(params, fields)
    if refused is not None:
        return Message(None, error_response(id_, INVALID_PARAMS, refused))
    if kind is not ActionKind.TOOL_CALL:
        return _governed_request(value, id_, params, index, kind=kind, fields=fields)
    return _tool_call(value, id_, params, index)


def _tool_call(value: dict[str, Any], id_: JsonId, params: object, index: int) -> Message:
    """A ``tools/call`` request, carrying its call; one no server could read is refused."""
    name = params.get("name") if isinstance(params, dict) else None
    if not isinstance(name, str) or not name:
        return Message(None, error_response(id_, INVALID_PARAMS, "Invalid params: tool name"))
    assert isinstance(params, dict)
    if "task" in params:
        # A task-augmented call is answered at once and runs on: no kill switch could stop
        # it and its result (fetched later by tasks/result) would never be recorded.
        why = "Invalid params: Warden does not relay task-augmented tool calls; call without task"
        return Message(None, error_response(id_, INVALID_PARAMS, why))
    raw, arguments = parse_arguments(params.get("arguments", {}))
    return _carrying(value, id_, name, raw, arguments, index=index)


def _not_governed(
    value: dict[str, Any], method: str, id_: JsonId, *, has_id: bool
) -> Message | None:
    """A message of a method :data:`GOVERNED` does not name: passed, refused, or ``None``
    for a request to decide as an ``mcp_request`` (see :data:`PASSED`)."""
    if method in PASSED or (not has_id and method in NOTIFICATIONS):
        return Message(value)
    if not _PRINTABLE.fullmatch(method):
        # A server that trims or drops such characters would run the method it resembles.
        why = "Invalid Request: a method holds spaces, control or non-ASCII characters"
        return Message(None, error_response(id_, INVALID_REQUEST, why))
    folded = method.casefold()
    alias = next((m for m in _KNOWN if m.casefold() == folded), None)
    if alias is not None:
        why = f"Invalid Request: method {method[:60]!r} is spelled otherwise than {alias!r}"
        return Message(None, error_response(id_, INVALID_REQUEST, why))
    if not has_id:
        # Only MCP's own notifications go on: a server's extension could act on one,
        # and a notification cannot be answered with a decision.
        why = "Invalid Request: a notification MCP does not define"
        return Message(None, error_response(None, INVALID_REQUEST, why))
    return None


def _refused_params(params: object, fields: frozenset[str] | None) -> str | None:
    """Why a governed request's params are refused before anything else, if they are.

    ``fields``: what the method's params hold; ``None`` for a method MCP does not define.
    """
    if not isinstance(params, dict):
        return None
    if not _spelled_apart(params, fields or _RETRY_PARAMS | {"_meta"}):
        return "Invalid params: keys that differ only in case"
    if any(isinstance(k, str) and k.casefold() in _RETRY_ALIASES for k in params):
        # The SDKs' params models take their Python names too (populate_by_name).
        return "Invalid params: inputResponses and requestState are spelled in camelCase"
    meta = params.get("_meta")
    if meta is not None and not (isinstance(meta, dict) and policy_safe(meta)):
        # The policy sees it (input.action.meta), and a server may act on its keys.
        return "Invalid params: _meta must be an object a policy can read as it is"
    # A retry of a multi-round-trip request (2026-07-28) carries the client's answers
    # to the server's input requests, as the earlier revisions' client answers do:
    # one that proposes tool calls (sampling with tools) would have the server run
    # them undecided. The request itself is decided again, as every round is.
    responses = params.get("inputResponses")
    if responses is not None and not isinstance(responses, dict):
        return "Invalid params: inputResponses"
    if responses and any(_proposes_tool_use(answer) for answer in responses.values()):
        return _RETRY_TOOLS
    if responses and any(_ANSWER_KEY.fullmatch(str(name)) for name in responses):
        # The names Warden gives the answers of earlier revisions (with_answer): a client
        # filling one in first would have a rule reading it by name see its answer.
        return _ANSWERS_NAMED_AS_WARDENS
    if responses and (
        len(responses) > MAX_ANSWERS or any(_too_wide(a) for a in responses.values())
    ):
        # A policy reads every answer and field (the shipped one does): bounded work.
        return _ANSWERS_TOO_MANY
    if responses and not (
        policy_safe(responses)
        and all(_spelled_apart(a, _ANSWER_FIELDS) for a in responses.values() if type(a) is dict)
    ):
        # The policy decides on them (input.action.input_responses): a field a Go or .NET
        # server binds case-blind ("CONTENT", "Amount" beside "amount") would say otherwise.
        return _ANSWERS_UNREADABLE
    if not isinstance(params.get("requestState", ""), str):
        return "Invalid params: requestState"
    return None


def _too_wide(answer: object) -> bool:
    if not isinstance(answer, dict):
        return False
    content = answer.get("content")
    return len(answer) > MAX_ANSWER_FIELDS or (
        isinstance(content, dict | list) and len(content) > MAX_ANSWER_FIELDS
    )


def _governed_request(
    value: dict[str, Any],
    id_: JsonId,
    params: object,
    index: int,
    *,
    kind: ActionKind,
    fields: frozenset[str] | None,
) -> Message:
    """A request of :data:`GOVERNED` other than ``tools/call``, or of a method MCP does
    not define (``fields`` ``None``), carrying its call.

    The call's arguments are the params the method holds but ``_meta``; a
    request the server could not read as the method's is refused, not passed.
    """
    if params is None and fields is None:
        params = {}  # an extension's request without params: nothing to decide on but it
    if not isinstance(params, dict):
        return Message(None, error_response(id_, INVALID_PARAMS, "Invalid params"))
    method = value["method"]
    # A retry's answers and state ride along as for a tool call; they are no argument.
    arguments = {
        k: v
        for k, v in params.items()
        if (fields is None or k in fields) and k != "_meta" and k not in _RETRY_PARAMS
    }
    problem = _params_problem(kind, arguments)
    if problem is not None:
        return Message(None, error_response(id_, INVALID_PARAMS, f"Invalid params: {problem}"))
    # As a tool call's arguments: keys equal but for case inside (a Go server reads
    # "NAME" as "name"), or text no policy can take as it is, make them malformed,
    # and the call is denied (and recorded).
    raw, checked = parse_arguments(arguments)
    return _carrying(value, id_, method, raw, checked, index=index, kind=kind)


def _carrying(
    value: dict[str, Any],
    id_: JsonId,
    name: str,
    raw: str,
    arguments: Mapping[str, Any] | None,
    *,
    index: int,
    kind: ActionKind = ActionKind.TOOL_CALL,
) -> Message:
    """The request, carrying the call the door has decided before it goes on."""
    method = value["method"]
    call = ToolCall(
        call_id=str(id_),
        name=name,
        raw_arguments=raw,
        arguments=arguments,
        index=index,
        key=f"message:{index}",
        kind=kind,
        wire_type=method,
    )
    return Message(value, call=call)


def _params_problem(kind: ActionKind, arguments: Mapping[str, Any]) -> str | None:
    """What makes ``arguments`` unreadable as the params of ``kind``'s method, if anything."""
    if kind is ActionKind.MCP_REQUEST:
        return None  # an extension's params are whatever it defines
    if kind is ActionKind.RESOURCE_READ:
        uri = arguments.get("uri")
        return None if isinstance(uri, str) and uri else "uri"
    if kind is ActionKind.PROMPT_GET:
        name = arguments.get("name")
        if not (isinstance(name, str) and name):
            return "prompt name"
        given = arguments.get("arguments")
        given = {} if given is None else given  # null: none given
        strings = isinstance(given, dict) and all(isinstance(v, str) for v in given.values())
        return None if strings else "prompt arguments (an object of strings)"
    for field in ("ref", "argument"):
        if not isinstance(arguments.get(field), dict):
            return field
    return None if isinstance(arguments.get("context"), dict | None) else "context"


def input_responses(message: Message) -> Mapping[str, Any] | None:
    """A governed retry's answers (``inputResponses``, 2026-07-28), or ``None``.

    The server reads them with the arguments (a confirmation, an amount the
    user typed), so they are part of what is decided. Parsing has checked
    they are an object.
    """
    body = message.body
    params = body.get("params") if body is not None else None
    answers = params.get("inputResponses") if isinstance(params, dict) else None
    governed = GOVERNED.get(str(body.get("method"))) if body is not None else None
    if governed is not None and "inputResponses" not in governed[1]:
        return None  # not forwarded for this method (completion/complete): nothing to decide
    return answers if isinstance(answers, dict) and answers else None


def request_meta(message: Message) -> Mapping[str, Any] | None:
    """A governed request's ``_meta`` as sent (MCP's own keys, a client's or vendor's),
    or ``None``: it rides along to the server, which may act on its keys, so the
    policy sees it too. Parsing has checked it is an object a policy can read."""
    body = message.body
    params = body.get("params") if body is not None else None
    meta = params.get("_meta") if isinstance(params, dict) else None
    return meta if isinstance(meta, dict) and meta else None


def action(
    call: ToolCall,
    agent: Agent,
    upstream: str,
    listed: ListedArguments | None = None,
    *,
    answers: Mapping[str, Any] | None = None,
    meta: Mapping[str, Any] | None = None,
) -> Action:
    """The action for a ``tools/call`` about to execute at ``upstream``.

    Arguments spelled otherwise than the server's listing declares them
    (``Amount`` for ``amount``) count as malformed: the validation guard
    denies the call (:mod:`warden.protocols.declared_arguments`).
    ``answers``: the retry's :func:`input_responses`; ``meta``: the request's
    :func:`request_meta`.
    """
    arguments = call.arguments
    if (
        arguments is not None
        and listed is not None
        and call.kind is ActionKind.TOOL_CALL
        and listed.misspelled(call.name, arguments) is not None
    ):
        arguments = None
    return Action(
        action_id=new_id("act"),
        agent=agent,
        kind=call.kind,
        wire_type=call.wire_type or None,
        protocol=PROTOCOL,
        stage=Stage.EXECUTED,
        request=RequestMeta(method=call.wire_type or "tools/call", upstream=upstream, path=""),
        tool=call.name,
        arguments=arguments,
        raw_arguments=call.raw_arguments,
        input_responses=answers,
        meta=meta,
    )


def forward_call(message: Message) -> dict[str, Any]:
    """The ``tools/call`` request to send on: rebuilt from the decided name and arguments.

    Only called for an allowed call, whose arguments are a policy-safe object.
    """
    assert message.body is not None
    assert message.call is not None
    assert message.call.arguments is not None
    method = message.body["method"]
    # Only the fields the method has: nothing the decision did not see rides along.
    fields = GOVERNED[method][1] if method in GOVERNED else None
    sent = message.body.get("params") or {}
    params = {k: v for k, v in sent.items() if fields is None or k in fields}
    if message.call.kind is ActionKind.TOOL_CALL:
        params["name"] = message.call.name
        params["arguments"] = dict(message.call.arguments)
    else:
        # The decided arguments, and what rides along as for a tool call (_meta, a retry's
        # answers and state).
        kept = {k: v for k, v in params.items() if k == "_meta" or k in _RETRY_PARAMS}
        params = kept | dict(message.call.arguments)
    return {"jsonrpc": "2.0", "id": message.body["id"], "method": method, "params": params}


def denied_result(message: Message, decision: Decision) -> dict[str, Any]:
    """The answer to a call Warden did not let through.

    For a tool call, a tool result with ``isError`` rather than a JSON-RPC
    error, so the model reads why; for any other request, a JSON-RPC error
    (:data:`REFUSED`), which is what its client can read.
    """
    assert message.call is not None
    what = _what(message.call.kind, message.call.name)
    if decision.effect is Effect.REQUIRE_APPROVAL:
        what = f"held {what} for human approval; it was not performed"
    else:
        what = f"blocked {what}; it was not performed"
    text = f"[Warden] {what}. Reason: {decision.reason}. (decision {decision.decision_id})"
    return _refusal(message.id, message.call.kind, text, decision.decision_id)


def _what(kind: ActionKind, tool: str | None) -> str:
    """How Warden's messages name an action of this door."""
    return f"the tool call `{tool}`" if kind is ActionKind.TOOL_CALL else f"the request `{tool}`"


def waiting_note(kind: ActionKind, tool: str | None) -> str:
    """What a held request's progress notifications say while it waits for a person."""
    return f"[Warden] waiting for a person to approve {_what(kind, tool)}"


def _refusal(id_: JsonId, kind: ActionKind, text: str, decision_id: str) -> dict[str, Any]:
    """Warden's answer in a request's place: a tool result with ``isError`` for a tool call
    (the model reads why), a JSON-RPC error (:data:`REFUSED`) for any other request."""
    meta = {"warden/decision": decision_id}
    if kind is not ActionKind.TOOL_CALL:
        error = {"code": REFUSED, "message": text, "data": meta}
        return {"jsonrpc": "2.0", "id": id_, "error": error}
    # resultType: required from 2026-07-28 on; earlier revisions' clients ignore it.
    result = {
        "resultType": "complete",
        "content": [{"type": "text", "text": text}],
        "isError": True,
        "_meta": meta,
    }
    return {"jsonrpc": "2.0", "id": id_, "result": result}


INPUT_REQUIRED: Final = "input_required"
"""The outcome error of a call the server answered with a request for input (2026-07-28):
it did not complete, and its retry, with the answers, holds what a cap holds for it."""
_BEFORE_RUNNING: Final = frozenset({-32601, INVALID_PARAMS})
"""Errors a server gives before running anything: no such method, arguments refused."""


def says_whether_it_ran(response: Mapping[str, Any]) -> bool:
    """Whether the server's answer to a call is its word on whether the call ran, so a
    failure it reports may release what a cap holds for the call.

    A result is (``isError`` is the tool's own word that it failed: a tool should
    report it only when it did not act), and so are the errors a server gives
    before running anything. Any other error (``-32603`` when a handler raised,
    a server's own codes) or a malformed answer may come after the tool acted.
    """
    error = response.get("error")
    if isinstance(error, dict):
        code = error.get("code")
        return isinstance(code, int) and not isinstance(code, bool) and code in _BEFORE_RUNNING
    return isinstance(response.get("result"), dict)


def result_outcome(response: Mapping[str, Any], latency_ms: float = 0.0) -> Outcome:
    """The server's answer to a governed request as its outcome.

    A tool result that is text alone is recorded as its text (joined); one that gives
    the client more (``structuredContent`` its text does not say, an image, a resource)
    is recorded whole, as JSON, as any other result is. A task handle (``resultType``
    other than ``complete``, or a 2025-11-25 ``CreateTaskResult``: a ``task`` object
    and no ``resultType``) is recorded as accepted (status 202).
    """
    error = response.get("error")
    if isinstance(error, dict):
        return Outcome(
            latency_ms=latency_ms,
            error=f"jsonrpc_{error.get('code')}",
            result=str(error.get("message", "")),
            is_error=True,
        )
    result = response.get("result")
    if not isinstance(result, dict):
        return Outcome(latency_ms=latency_ms, error="malformed_result", is_error=True)
    shape = result.get("resultType")
    if shape == "input_required":
        # The server asks the client for input first (2026-07-28): the request did not
        # complete; its retry, with the answers, is decided as a request of its own.
        return Outcome(latency_ms=latency_ms, error=INPUT_REQUIRED, is_error=True)
    if shape not in (None, "complete") or (shape is None and isinstance(result.get("task"), dict)):
        # A task handle: the call goes on at the server, and what it does there later
        # does not come back through this answer. Recorded as accepted (202), not
        # failed: what a cap holds for it stays spent.
        return Outcome(status=ACCEPTED, latency_ms=latency_ms, result=dumps(result))
    return Outcome(
        latency_ms=latency_ms,
        result=_recorded_result(result),
        is_error=result.get("isError") is True,
    )


def _recorded_result(result: Mapping[str, Any]) -> str:
    """All a client reads of ``result``: its text when that is all, else the whole result.

    A client's code reads ``structuredContent``, and a model is shown images and
    resources: a record of the text alone could say "no refund made" of a call whose
    structured content says it refunded 900. SDK servers send structured content beside
    a text that says it (:func:`_repeats`), so such results keep their readable text.
    """
    content = result.get("content")
    if not isinstance(content, list) or not content:
        return dumps(result)
    texts = []
    for block in content:
        if not (
            isinstance(block, dict)
            and block.get("type") == "text"
            and isinstance(text := block.get("text"), str)
        ):
            return dumps(result)
        texts.append(text)
    joined = "\n".join(texts)
    structured = result.get("structuredContent")
    if structured is None or _repeats(texts, structured):
        return joined
    return dumps(result)


def _repeats(texts: list[str], structured: Any) -> bool:
    """Whether ``structured`` says what the text blocks say: the same JSON value, or that
    value (or the text itself) as ``{"result": ...}``, as SDK servers wrap a value that is
    no object; or, for a list in ``{"result": [...]}``, one block per item, each saying it
    (the official Python SDK's text of a list). Compared as JSON text, so ``1``, ``1.0``
    and ``true`` differ, as to a reader."""
    text = "\n".join(texts)
    values = [structured]
    if isinstance(structured, dict) and structured.keys() == {"result"}:
        wrapped = structured["result"]
        if wrapped == text:
            return True  # a tool's string, as it is
        if (
            isinstance(wrapped, list)
            and len(wrapped) == len(texts)
            and all(_says(t, item) for t, item in zip(texts, wrapped, strict=True))
        ):
            return True  # a list, one block per item
        values.append(wrapped)
    try:
        said = _canonical(loads(text))
        return any(_canonical(value) == said for value in values)
    except (RecursionError, TypeError, ValueError):
        return False  # not JSON, or nested too deeply to compare: recorded whole


def _says(text: str, item: Any) -> bool:
    """Whether one text block says ``item``: a string as it is, any other value as JSON."""
    if isinstance(item, str) and item == text:
        return True
    try:
        return _canonical(loads(text)) == _canonical(item)
    except (RecursionError, TypeError, ValueError):
        return False


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def filter_tools(response: Mapping[str, Any], hide: Callable[[str], bool]) -> Mapping[str, Any]:
    """A ``tools/list`` response without the tools ``hide`` names; anything else unchanged."""
    result = response.get("result")
    if not isinstance(result, dict) or not isinstance(result.get("tools"), list):
        return response
    kept = [
        t
        for t in result["tools"]
        if not (isinstance(t, dict) and isinstance(t.get("name"), str) and hide(t["name"]))
    ]
    return {**response, "result": {**result, "tools": kept}}


def encode(value: Any) -> bytes:
    """One newline-terminated JSON-RPC line (the stdio framing)."""
    return dumps(value).encode() + b"\n"


def progress_token(message: Message) -> str | int | None:
    """The ``params._meta.progressToken`` a client sent with a request, if any."""
    params = message.body.get("params") if message.body is not None else None
    meta = params.get("_meta") if isinstance(params, dict) else None
    token = meta.get("progressToken") if isinstance(meta, dict) else None
    return valid_id(token) if token is not None else None


def progress_notification(token: str | int, progress: int, message: str) -> dict[str, Any]:
    """``notifications/progress`` for a request still waiting (``progress`` must increase)."""
    params = {"progressToken": token, "progress": progress, "message": message}
    return {"jsonrpc": "2.0", "method": "notifications/progress", "params": params}


def cancelled_notification(id_: str | int, reason: str) -> dict[str, Any]:
    """``notifications/cancelled``: tells the server to stop working on request ``id_``."""
    params = {"requestId": id_, "reason": reason}
    return {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": params}


def stopped_result(
    id_: JsonId, action: Action, reason: str, decision_id: str, *, sent: bool = True
) -> dict[str, Any]:
    """The answer to an allowed call a kill switch stopped (``isError``, or an error).

    ``sent``: the call had reached the server, so it may have completed.
    """
    what = _what(action.kind, action.tool)
    if sent:
        what = f"stopped {what} while it ran; it may or may not have completed"
    else:
        what = f"stopped {what} before it was sent; it was not performed"
    text = f"[Warden] {what}. Reason: {reason}. (decision {decision_id})"
    return _refusal(id_, action.kind, text, decision_id)
