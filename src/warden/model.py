"""The core data types: one frozen type per concept, no I/O.

Every entry point (base-URL proxy, later mitmproxy and gRPC) turns traffic into
:class:`Action` values, the guard pipeline turns each into one :class:`Decision`,
and the audit log stores both. Adapters, guards and sinks only exchange these.
"""

from __future__ import annotations

import enum
import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Action",
    "ActionKind",
    "Agent",
    "CallSize",
    "Conversation",
    "Decision",
    "Effect",
    "Mode",
    "Obligations",
    "Outcome",
    "PolicyView",
    "PriorCall",
    "PriorResult",
    "RequestMeta",
    "Stage",
    "ToolCall",
    "ToolResult",
    "Usage",
    "new_id",
    "request_sha256",
]


# Random tails are drawn from the OS CSPRNG a block at a time: one ``getrandom``
# call per id showed in profiles. The block never leaves this module, and a
# forked child drops its parent's so the two never hand out the same tails.
_TAILS_PER_BLOCK = 512
_time_ns = time.time_ns


def _tails() -> Iterator[str]:
    while True:
        block = os.urandom(6 * _TAILS_PER_BLOCK).hex()
        for start in range(0, len(block), 12):
            yield block[start : start + 12]


_next_tail = _tails().__next__
_tail_lock = threading.Lock()  # a generator must not be resumed by two threads at once


def _reseed_after_fork() -> None:
    global _next_tail, _tail_lock  # noqa: PLW0603 - the one per-process random source
    _next_tail = _tails().__next__
    _tail_lock = threading.Lock()


os.register_at_fork(after_in_child=_reseed_after_fork)


def new_id(prefix: str) -> str:
    """A sortable, unguessable id such as ``dec_0193c1f2a8b4_5f1c2e9a7d3b``.

    The hex millisecond timestamp first keeps ids roughly time-ordered in logs;
    the random tail (48 bits from the OS CSPRNG) makes them
    unguessable, which matters for approval ids.
    """
    with _tail_lock:
        tail = _next_tail()
    return f"{prefix}_{_time_ns() // 1_000_000:012x}_{tail}"


class ActionKind(enum.StrEnum):
    """What sort of thing the agent is doing.

    Calls found in a model's response get the kind of the wire item or block
    the SDK dispatches on, so a policy can tell a shell command from a
    function. A call-bearing item whose type Warden does not know is
    ``unknown_call`` and is decided like any other (denied by default).
    """

    TOOL_CALL = "tool_call"
    """A function call the agent runs (``function``, ``function_call``, ``tool_use``)."""
    CUSTOM_TOOL_CALL = "custom_tool_call"
    """A custom (free-text input) tool call the agent runs."""
    SHELL_CALL = "shell_call"
    """A shell command the agent runs (``local_shell_call``, ``shell_call``)."""
    COMPUTER_CALL = "computer_call"
    """A computer-use action the agent performs (``computer_call``)."""
    APPLY_PATCH_CALL = "apply_patch_call"
    """A file patch the agent applies (``apply_patch_call``)."""
    HOSTED_TOOL_CALL = "hosted_tool_call"
    """A tool the provider runs (web search, code execution, ``server_tool_use``)."""
    MCP_CALL = "mcp_call"
    """An MCP tool call (the provider's ``mcp_call`` / ``mcp_tool_use``, or Warden's MCP door)."""
    MCP_APPROVAL_REQUEST = "mcp_approval_request"
    """The provider asks the agent to approve an MCP call."""
    UNKNOWN_CALL = "unknown_call"
    """An item or block of a type Warden does not know: never passed undecided."""
    RESOURCE_READ = "resource_read"
    """An MCP ``resources/read`` (tool ``resources/read``, arguments ``{"uri": ...}``)."""
    PROMPT_GET = "prompt_get"
    """An MCP ``prompts/get`` (tool ``prompts/get``, arguments ``name`` and ``arguments``)."""
    ARGUMENT_COMPLETION = "argument_completion"
    """An MCP ``completion/complete`` (arguments ``ref``, ``argument`` and ``context``)."""
    MCP_REQUEST = "mcp_request"
    """An MCP request of a method MCP does not define (a server's own extension): tool the
    method, arguments its params. Decided like the others, never passed undecided."""
    LLM_CALL = "llm_call"
    HTTP_CALL = "http_call"


class Stage(enum.StrEnum):
    """``proposed``: a model asked for it; ``executed``: it is being sent to an API.

    ``list``: not an action at all; a tool offered in a listing (MCP
    ``tools/list``), asked about by name alone, so a tool the policy would
    deny in every case can be hidden. Never recorded.
    """

    PROPOSED = "proposed"
    EXECUTED = "executed"
    LIST = "list"


class Effect(enum.StrEnum):
    """What a decision says should happen to the action."""

    ALLOW = "allow"
    DENY = "deny"
    REQUIRE_APPROVAL = "require_approval"


class Mode(enum.StrEnum):
    """``observe`` records what would have happened and lets the action through."""

    ENFORCE = "enforce"
    OBSERVE = "observe"


@dataclass(frozen=True, slots=True)
class Agent:
    """Who acts: a proven agent id, its version, and the claims that proved it.

    The id is the sidecar's configured agent, or one proved by a proxy key or
    a verified JWT (:mod:`warden.identity`). ``claims`` are the verified JWT's
    claims, seen by policies as ``input.agent.claims``.
    """

    id: str
    version: str = ""
    claims: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, weakref_slot=True)
class RequestMeta:
    """The HTTP request an action came from, with secrets already removed.

    ``tools``: what a model request declares the model may use (function
    tools by name, the provider's hosted tools, remote MCP servers with their
    allowed tools), as policies see it in ``input.request.tools``; built by
    the adapter without credentials (:mod:`warden.protocols.declared_tools`).

    Weakly referenceable: the audit log remembers which requests' tools it has
    written (:meth:`warden.audit.AuditLog.record_decision`) without keeping them.
    """

    method: str
    upstream: str
    path: str
    headers: Mapping[str, str] = field(default_factory=dict)
    tools: tuple[Mapping[str, Any], ...] = ()
    door: str = ""
    """The front door that handed the request to the base-URL listener (``transparent``);
    empty when the agent called the listener itself. Recorded as ``request.door``."""
    conversation: Conversation | None = None
    """What a model request carries of the conversation so far (the prior tool calls and
    their results) and the session it belongs to; ``None`` where there is no conversation
    (MCP, gRPC, plain HTTP tools). Policies see it as ``input.history`` / ``input.session``
    (:mod:`warden.sessions`). Not recorded: the request's own messages are the agent's."""


@dataclass(frozen=True, slots=True)
class PriorResult:
    """The result an agent sent back for an earlier tool call, bounded.

    ``content`` is at most ``sessions.max_result_chars`` characters of it;
    ``size`` and ``digest`` (SHA-256 hex) describe the whole.
    """

    content: str
    size: int
    digest: str
    is_error: bool = False


@dataclass(frozen=True, slots=True)
class PriorCall:
    """A tool call earlier in the conversation, as the agent's request carries it.

    ``digest`` is the SHA-256 of the arguments in canonical JSON (sorted keys),
    the same digest Warden keeps for the calls it decides, so a call the agent
    rewrote does not match its record. ``arguments`` is ``None`` when they are
    not a JSON object.
    """

    call_id: str
    tool: str
    arguments: Mapping[str, Any] | None
    digest: str
    result: PriorResult | None = None


@dataclass(frozen=True, slots=True)
class HostedApproval:
    """An approval of a hosted MCP call in a model request (Responses ``mcp_approval_response``
    whose ``approve`` is not ``false``): the provider then runs the call it names.

    ``request_id`` is ``None`` when the approval names no request by text. ``requests``
    are the ``mcp_approval_request`` items with that id the input carries (an agent that
    stores nothing sends them back itself); none when the provider keeps it (a chain).
    """

    request_id: str | None
    requests: tuple[PriorCall, ...] = ()


@dataclass(frozen=True, slots=True)
class Conversation:
    """The conversation a model request carries, and the session it belongs to.

    Built by :mod:`warden.protocols.history` (bounded in size and time:
    ``truncated`` says a bound cut it). ``session_id`` comes from
    ``X-Warden-Session`` or ``sessions.pointer`` (``session_source`` says
    which); ``previous_response_id`` is a Responses API chain to rebuild
    from Warden's own records. ``memo`` is the session guard's per-request
    cache (the verified history is built once for all of a response's calls).
    """

    calls: tuple[PriorCall, ...] = ()
    results: tuple[tuple[str, PriorResult], ...] = ()
    """Results (by call id) for calls the request does not carry itself: a Responses
    request continuing ``previous_response_id`` answers calls of an earlier response."""
    messages: int = 0
    truncated: bool = False
    answered_tools: frozenset[str] = frozenset()
    """Every tool whose result the request carries, the calls ``calls`` leaves out
    (past ``max_calls``) included: their output entered the conversation all the same
    (``input.session.taints``)."""
    session_id: str | None = None
    session_source: str | None = None
    previous_response_id: str | None = None
    carried: bool = True
    """Whether the request carried its conversation (model requests); ``False`` for a door
    that only names the session (MCP): ``input.session.conversation``."""
    retrieved_id: str | None = None
    """A stored Responses answer fetched by id (``GET responses/{id}``, a ``background``
    one): the request goes on in that answer's chain, and the calls decided in what it
    returns are added to that answer's link."""
    provider_conversation: str | None = None
    """The Responses API conversation the request goes on in (its ``conversation``):
    only the agent that first used it through Warden may."""
    owned: bool = False
    """The session is this process's alone (a ``warden mcp wrap`` run's fresh id): nothing
    else adds to its counters, so after one read from the store they are kept in memory."""
    approvals: tuple[HostedApproval, ...] = ()
    """The hosted MCP calls the request approves (Responses ``mcp_approval_response``):
    the provider runs each, so each must be one Warden allowed. Read from the whole
    input, whatever the history's bounds."""
    approval_requests: tuple[PriorCall, ...] = ()
    """Every hosted MCP approval request item the input carries (the provider may keep
    them, and a later request approve one by id), read whole up to a bound."""
    approval_requests_cut: bool = False
    """More approval request items than that bound: none of them can be relied on."""
    memo: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class PolicyView:
    """A door's own policy question about an action (Envoy ext_authz, in OPA-Envoy's shape).

    The policy guard evaluates ``query`` instead of ``policy.query``, with
    ``input`` merged into the usual input document (Warden's own keys win),
    and passes the query's value to ``read``, which says whether it allows
    the action and what the door will render of it (kept as
    ``obligations.result``), and raises ``ValueError`` for a value of the
    wrong shape (the action is then denied). ``input`` may carry credentials, as OPA-Envoy
    policies expect (the request's headers): it is never recorded.
    ``problem``: the door could not build the input (an unparsable body); the
    action is denied before any guard runs, in every mode, unless
    ``problem_is_rule`` (a configured rule refused it, ``unmatched: deny``: then
    observe mode lets it through). ``observe``: decided in observe mode whatever
    the configured mode (ext_authz ``dry_run``).
    """

    query: str
    input: Mapping[str, Any]
    read: Callable[[Any], tuple[bool, Any]]
    problem: str | None = None
    problem_is_rule: bool = False
    observe: bool = False


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A tool call as a protocol carries it, before it becomes an :class:`Action`.

    ``arguments`` is the parsed JSON object, or ``None`` when ``raw_arguments``
    is not a JSON object (the pipeline then denies the call: fail closed).
    ``index`` is the call's position in the message as the provider sent it.

    ``key`` names the call by its position in the response (choice and tool
    index, output item, content block), never by an id the upstream chose:
    decisions are looked up by it, so two calls sharing an id (or having
    none) are still decided one by one. ``kind`` and ``wire_type`` say what
    sort of call it is (``wire_type`` is the item or block type as sent).
    """

    call_id: str
    name: str
    raw_arguments: str
    arguments: Mapping[str, Any] | None
    index: int = 0
    key: str = ""
    kind: ActionKind = ActionKind.TOOL_CALL
    wire_type: str = ""


@dataclass(frozen=True, slots=True)
class ToolResult:
    """The result of an earlier tool call that the agent sends back to the model."""

    call_id: str
    content: str
    is_error: bool = False
    tool: str | None = None


@dataclass(frozen=True, slots=True)
class Usage:
    """Token usage reported by the provider for one response."""

    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    """Input written to the provider's prompt cache for five minutes (Anthropic counts
    it apart from ``input_tokens``, and bills it above input)."""
    cache_write_1h_tokens: int = 0
    """Input written to the prompt cache for an hour (billed higher still)."""
    rate: float = 1.0
    """The multiple of the model's standard price the call is billed at: a premium tier
    the answer says it ran on (OpenAI ``service_tier``, Anthropic fast mode)."""
    hosted_calls: tuple[tuple[str, int], ...] = ()
    """Tools the provider ran itself and bills per call, by kind (``web_search``,
    ``file_search``, ``code_interpreter``) with their counts."""
    model: str | None = field(default=None, compare=False)
    """The model the answer says ran (an Azure deployment's, a stored prompt's), which a
    spend cap prices the call at when it is dearer than the request's. Not compared: two
    usages are equal when they count the same."""


@dataclass(frozen=True, slots=True)
class CallSize:
    """What a model request says of its own size, before the provider answers.

    A spend cap holds what the call can cost from it: input priced from the body's
    size, output from the request's bound (``None``: it sets none), ``choices``
    answers of it.
    """

    input_bytes: int
    max_output_tokens: int | None = None
    choices: int = 1
    rate: float = 1.0
    """The multiple of the standard price the request asks to be billed at (a premium tier)."""
    hosted_calls: int = 0
    """The most calls of tools the provider runs and bills per call the request allows."""
    continued: bool = False
    """The request continues input the provider keeps (a stored chain or conversation)."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened after an action was let through.

    For an LLM call: the upstream status, latency and tokens. For a tool call:
    the result the agent later sent back (``result``), which may be redacted
    before it is recorded. ``error`` is a stable error code when it failed.
    """

    status: int | None = None
    latency_ms: float = 0.0
    usage: Usage | None = None
    error: str | None = None
    result: str | None = None
    is_error: bool = False
    reported_by: str | None = None
    """Whose word it is when Warden did not see it itself: ``agent`` (the agent's own
    report of its tool's result) or ``runner`` (one ``grpc.outcome_reporters`` names)."""


@dataclass(frozen=True, slots=True)
class Action:
    """One thing an agent proposes or does, in protocol-neutral form.

    This is what policies see as ``input.action`` (plus ``input.agent`` and
    ``input.context``); see :func:`warden.pipeline.policy_input`.
    """

    action_id: str
    agent: Agent
    kind: ActionKind
    protocol: str
    stage: Stage
    request: RequestMeta
    tool: str | None = None
    arguments: Mapping[str, Any] | None = None
    raw_arguments: str | None = None
    call_id: str | None = None
    model: str | None = None
    context: Mapping[str, Any] = field(default_factory=dict)
    wire_type: str | None = None
    """The item or block type the call came as (``function_call``, ``local_shell_call``)."""
    view: PolicyView | None = None
    """Set by a door that asks the policy its own question (see :class:`PolicyView`)."""
    input_responses: Mapping[str, Any] | None = None
    """An MCP retry's answers to the server's questions (``inputResponses``, 2026-07-28):
    what the user or client answered shapes what the server executes, so the policy sees
    them (``input.action.input_responses``), the record keeps them and an approval binds
    them. ``None`` for every other action."""
    meta: Mapping[str, Any] | None = None
    """An MCP request's ``_meta`` as sent (protocol version, client capabilities and
    info, a progress token, a vendor's keys): it reaches the server, which may act on
    its keys, so the policy sees it (``input.action.meta``) and the record keeps it.
    Not bound by approvals (a progress token differs every time). ``None`` for every
    other action."""
    size: CallSize | None = None
    """A model call's size as its request states it (``None``: the door cannot read it)."""
    request_sha256: str | None = None
    """Set by a door whose action is an HTTP request it forwards: :func:`request_sha256` of
    it. An approval binds it, so a deferred approval lets only these very bytes through, not
    a body field or query parameter the arguments leave out. Not recorded, not in the input."""

    @property
    def target(self) -> str:
        """The tool name for tool calls, else the request path: a short label for logs."""
        return self.tool if self.tool is not None else self.request.path


def request_sha256(method: str, target: str, body: bytes) -> str:
    """SHA-256 (hex) of an HTTP request: its method, target (path and query) and body."""
    digest = hashlib.sha256(f"{method} {target}\n".encode())
    digest.update(body)
    return digest.hexdigest()


@dataclass(frozen=True, slots=True)
class Obligations:
    """What a decision asks of the rest of Warden beyond allow or deny."""

    redact: tuple[str, ...] = ()
    approvers: tuple[str, ...] = ()
    hold_timeout_s: float | None = None
    risk: str | None = None
    hold: str | None = None
    """How to wait for approval: ``hold`` (keep the request open) or ``defer``."""
    required_approvals: int | None = None
    """Distinct approvers needed, when the policy says; else ``approvals.required_approvals``."""
    result: Any = None
    """For an action with a :class:`PolicyView`: the query's value as its ``read`` gave it,
    for the door to render (ext_authz headers, status, body). Not recorded."""


@dataclass(frozen=True, slots=True)
class Decision:
    """The one result every entry point returns and every record carries.

    ``effect`` is what the deciding stage said. In ``observe`` mode the action
    goes through regardless; :attr:`enforced` is what actually happens.
    ``guard`` names the stage that decided (``policy``, ``kill_switch``,
    ``budget``, ``approval``, ``validation``, ``fallback``).
    """

    decision_id: str
    effect: Effect
    reasons: tuple[str, ...]
    mode: Mode
    guard: str
    bundle_revision: str = ""
    obligations: Obligations = field(default_factory=Obligations)
    error: str | None = None
    elapsed_us: int = 0
    input: Mapping[str, Any] | None = None
    """The facts of the policy ``input`` the rest of the decision record does not carry
    (budget counters, configured mode and risk, declared tools, wire type), set by the
    pipeline so ``warden policy replay`` can rebuild the exact input (ADR 0012)."""

    @property
    def enforced(self) -> Effect:
        """The effect that is applied: always ``allow`` in observe mode."""
        return self.effect if self.mode is Mode.ENFORCE else Effect.ALLOW

    @property
    def would(self) -> str | None:
        """``would_deny`` / ``would_hold`` when observe mode let a non-allow through."""
        if self.mode is Mode.OBSERVE and self.effect is not Effect.ALLOW:
            return "would_deny" if self.effect is Effect.DENY else "would_hold"
        return None

    @property
    def reason(self) -> str:
        """All reasons joined, for messages shown to agents and people."""
        return "; ".join(self.reasons) if self.reasons else "no reason given"
