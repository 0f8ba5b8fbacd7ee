"""Warden's Python client for its gRPC API (``listen.grpc``), sync and async.

For agent frameworks that run tools in-process: ask Warden before a tool
runs, report what it did after. :func:`govern` does both around any tool
function::

    from warden.client import WardenClient, govern

    warden = WardenClient("127.0.0.1:9090", agent="refunds-bot", agent_key=KEY)

    @govern(warden)
    def issue_refund(order_id: str, amount: int) -> dict:
        ...

    issue_refund("A-1", 40)    # runs only if Warden allows it; raises ToolDenied otherwise

    with session("ticket-4711"):   # checks in here count toward one conversation
        issue_refund("A-2", 10)   # (input.session: per-session limits and taints)

The admin calls (approvals, kill switches, the audit tail) need an admin
token with the right role (``admin_token=``). Credentials go only in the
calls that need them, as gRPC metadata; they are never logged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import decimal
import enum
import functools
import inspect
import logging
import math
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ParamSpec, Self, TypeVar, overload

import grpc
import grpc.aio
import orjson
from google.protobuf import struct_pb2

from warden.grpc_api import ERROR_CODE
from warden.grpc_api.v1 import governance_pb2 as pb
from warden.model import Effect, Mode

__all__ = [
    "ApprovalPending",
    "AsyncWardenClient",
    "ToolDenied",
    "Verdict",
    "WardenClient",
    "govern",
    "session",
]

log = logging.getLogger("warden.client")

_SERVICE = "/warden.v1.Governance/"
_EFFECTS = {
    pb.EFFECT_ALLOW: Effect.ALLOW,
    pb.EFFECT_DENY: Effect.DENY,
    pb.EFFECT_REQUIRE_APPROVAL: Effect.REQUIRE_APPROVAL,
}
_MODES = {pb.MODE_ENFORCE: Mode.ENFORCE, pb.MODE_OBSERVE: Mode.OBSERVE}

Metadata = tuple[tuple[str, str], ...]

_SESSION: ContextVar[str] = ContextVar("warden_session", default="")


@contextlib.contextmanager
def session(session_id: str) -> Iterator[None]:
    """Name the conversation that checks in this context belong to.

    Every ``check`` (and so every :func:`govern`-ed call) made inside the
    block, in this thread or in asyncio tasks started inside it (not in
    threads it starts: context variables do not pass to them), carries
    ``session_id``:
    Warden keeps session counters and taints per agent and session id
    (``input.session`` in policies), as it does for a base-URL agent's
    ``X-Warden-Session``. A ``check(session=...)`` argument wins.
    """
    token = _SESSION.set(session_id)
    try:
        yield
    finally:
        _SESSION.reset(token)


_NO_PROXY = (("grpc.enable_http_proxy", 0),)
"""The agent key, token and admin token go to Warden only: gRPC would otherwise tunnel
them through a proxy named in ``http_proxy`` (in clear text, without TLS)."""


class ToolDenied(Exception):
    """Warden denied the tool call; it was not run."""

    def __init__(self, tool: str, reason: str, decision_id: str) -> None:
        super().__init__(f"Warden denied {tool}: {reason} (decision {decision_id})")
        self.tool = tool
        self.reason = reason
        self.decision_id = decision_id


class ApprovalPending(Exception):
    """The tool call waits for a person's approval; it was not run.

    Once approved, the same call (same tool, same arguments) passes once.
    ``approval_id`` is empty when a waiting check ran out of time.
    """

    def __init__(self, tool: str, reason: str, decision_id: str, approval_id: str) -> None:
        where = f" (approval {approval_id})" if approval_id else ""
        super().__init__(f"{tool} needs approval{where}: {reason}")
        self.tool = tool
        self.reason = reason
        self.decision_id = decision_id
        self.approval_id = approval_id


@dataclass(frozen=True, slots=True)
class Verdict:
    """Warden's answer to one ``check``."""

    decision_id: str
    effect: Effect
    """What applies: always ``allow`` in observe mode (see :attr:`would`)."""
    reason: str
    approval_id: str = ""
    redact: tuple[str, ...] = ()
    mode: Mode = Mode.ENFORCE
    risk: str = ""
    would: str = ""
    guard: str = ""
    agent_id: str = ""

    @property
    def allowed(self) -> bool:
        """Whether the tool may run now."""
        return self.effect is Effect.ALLOW

    @classmethod
    def from_message(cls, answer: pb.CheckResponse) -> Verdict:
        """From the ``CheckResponse``; an effect this client does not know is a deny."""
        ob = answer.obligations
        return cls(
            decision_id=answer.decision_id,
            effect=_EFFECTS.get(answer.effect, Effect.DENY),
            reason=answer.reason,
            approval_id=answer.approval_id,
            redact=tuple(ob.redact),
            mode=_MODES.get(ob.mode, Mode.ENFORCE),
            risk=ob.risk,
            would=answer.would,
            guard=answer.guard,
            agent_id=answer.agent_id,
        )


_EXACT_INT = 2**53 - 1
"""Struct numbers are doubles: a larger whole number would reach the policy rounded."""
_MAX_DEPTH = 32
"""Protobuf's parser refuses a Struct nested much deeper (each level is three messages)."""
_AS_JSON = (datetime.date, datetime.time, uuid.UUID)
"""Values orjson writes as the strings a JSON API would (ISO 8601, UUID text)."""


def _json_safe(value: Any, depth: int = 0) -> Any:
    """``value`` as the JSON the policy will see, refusing what would read otherwise.

    A tool's arguments are often pydantic models, dataclasses, enums or dates. A
    value with no faithful JSON form is refused (the tool does not run) rather than
    sent as its ``str()``: the policy would then decide on text (``"amount=5000.0"``)
    while the tool acts on the number. So are NaN and infinities (JSON has none), and
    whole numbers past 2**53 (a Struct's doubles would round them).
    """
    if depth > _MAX_DEPTH:
        raise ValueError(f"arguments nested deeper than {_MAX_DEPTH} levels cannot be checked")
    if isinstance(value, Mapping):
        out = {_json_key(k): _json_safe(v, depth + 1) for k, v in value.items()}
        if len(out) < len(value):
            raise ValueError("two keys of the arguments read as one in JSON (1 and '1')")
        return out
    names = getattr(type(value), "_fields", None)
    if isinstance(value, tuple) and isinstance(names, tuple):
        # A named tuple: a rule names its fields, as the tool does.
        return _json_safe(dict(zip(names, value, strict=True)), depth)
    if isinstance(value, list | tuple):
        return [_json_safe(item, depth + 1) for item in value]
    plain = _plain(value)
    if plain is not value:
        return _json_safe(plain, depth)
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > _EXACT_INT:
        raise ValueError(
            f"the whole number {value} is past 2**53 - 1 and would reach the policy rounded; "
            "send it as a string"
        )
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{value} has no JSON form, so no policy could check it")
    return value


def _json_key(key: Any) -> str:
    key = key.value if isinstance(key, enum.Enum) else key
    if isinstance(key, str):
        return str.__str__(key)  # a subclass's text, not its __str__
    if isinstance(key, int) and not isinstance(key, bool):
        return str(int.__index__(key))
    raise TypeError(f"a key of type {type(key).__name__} has no JSON form")


def _plain(value: Any) -> Any:
    """A JSON scalar as itself; anything else as plain values, or :class:`TypeError`."""
    if isinstance(value, enum.Enum):
        return value.value
    if value is None or type(value) in (bool, str, int, float):
        return value
    if isinstance(value, decimal.Decimal):
        number = float(value)
        if not math.isfinite(number) or decimal.Decimal(repr(number)) != value:
            raise ValueError(f"the decimal {value} has no exact JSON number; send it as a string")
        return int(number) if value == value.to_integral_value() else number
    # A subclass (an id type) as the value it holds, not as its own __str__ or __int__
    # say: the tool reads the value.
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__index__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, _AS_JSON):
        return orjson.loads(orjson.dumps(value))
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    fields = getattr(type(value), "model_fields", None)
    if isinstance(fields, Mapping) and callable(getattr(value, "model_dump", None)):
        # A pydantic model: the values the tool reads, not its serializers' output (a
        # masked number, an excluded field), and any extra fields it was given.
        plain = {name: getattr(value, name) for name in fields}
        return {**plain, **(getattr(value, "model_extra", None) or {})}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    raise TypeError(
        f"an argument of type {type(value).__name__} has no faithful JSON form for the "
        "policy; pass plain values (or a pydantic model or dataclass of them)"
    )


def _struct(value: Mapping[str, Any] | None) -> struct_pb2.Struct | None:
    if value is None:
        return None
    out = struct_pb2.Struct()
    out.update(_json_safe(dict(value)))
    return out


def _check_request(
    tool: str,
    arguments: Mapping[str, Any] | None,
    *,
    kind: str,
    context: Mapping[str, Any] | None,
    protocol: str,
    call_id: str,
    model: str,
    wait: bool,
    agent_id: str,
    session_id: str | None,
) -> pb.CheckRequest:
    return pb.CheckRequest(
        agent_id=agent_id,
        session_id=_SESSION.get() if session_id is None else session_id,
        action=pb.Action(
            kind=kind,
            tool=tool,
            arguments=_struct(arguments or {}),
            protocol=protocol,
            context=_struct(context),
            call_id=call_id,
            model=model,
        ),
        wait=wait,
    )


def _result_text(result: Any) -> str:
    if isinstance(result, str):
        return result
    try:
        return orjson.dumps(result, default=str, option=orjson.OPT_NON_STR_KEYS).decode()
    except TypeError:
        return str(result)


def _credentials(
    root_certificates: bytes | None,
    certificate_chain: bytes | None,
    private_key: bytes | None,
    tls: bool,
) -> grpc.ChannelCredentials | None:
    if not (tls or root_certificates or certificate_chain):
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=root_certificates,
        private_key=private_key,
        certificate_chain=certificate_chain,
    )


class _Settings:
    """What both clients share: who they speak for, and how long calls may take."""

    def __init__(
        self,
        agent: str | None,
        agent_key: str | None,
        agent_token: str | None,
        admin_token: str | None,
        timeout_s: float | None,
    ) -> None:
        agent_md: list[tuple[str, str]] = []
        if agent:
            agent_md.append(("x-warden-agent", agent))
        if agent_key:
            agent_md.append(("x-warden-agent-key", agent_key))
        if agent_token:
            agent_md.append(("x-warden-agent-token", agent_token))
        self.agent: Metadata = tuple(agent_md)
        self.admin: Metadata = (("authorization", f"Bearer {admin_token}"),) if admin_token else ()
        self.timeout_s = timeout_s


class WardenClient:
    """A blocking client; one channel, safe to share between threads."""

    def __init__(
        self,
        target: str = "127.0.0.1:9090",
        *,
        agent: str | None = None,
        agent_key: str | None = None,
        agent_token: str | None = None,
        admin_token: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        certificate_chain: bytes | None = None,
        private_key: bytes | None = None,
        timeout_s: float | None = 30.0,
        channel: grpc.Channel | None = None,
    ) -> None:
        """``target``: Warden's ``listen.grpc``. TLS when ``tls`` or certificates are given;
        ``certificate_chain`` and ``private_key`` are the client's own, for mTLS.
        ``timeout_s``: the deadline of each unary call (a waiting check may pass its own).
        ``channel``: one of the caller's own, used as it is (the client's own channels
        never go through a proxy from the environment; a given one is the caller's to set).
        """
        if channel is None:
            creds = _credentials(root_certificates, certificate_chain, private_key, tls)
            channel = (
                grpc.secure_channel(target, creds, options=_NO_PROXY)
                if creds is not None
                else grpc.insecure_channel(target, options=_NO_PROXY)
            )
        self._channel = channel
        self._s = _Settings(agent, agent_key, agent_token, admin_token, timeout_s)
        c = channel
        self._check = c.unary_unary(
            _SERVICE + "Check", pb.CheckRequest.SerializeToString, pb.CheckResponse.FromString
        )
        self._report = c.unary_unary(
            _SERVICE + "ReportOutcome",
            pb.ReportOutcomeRequest.SerializeToString,
            pb.ReportOutcomeResponse.FromString,
        )
        self._list_approvals = c.unary_unary(
            _SERVICE + "ListApprovals",
            pb.ListApprovalsRequest.SerializeToString,
            pb.ListApprovalsResponse.FromString,
        )
        self._watch = c.unary_stream(
            _SERVICE + "WatchApprovals",
            pb.WatchApprovalsRequest.SerializeToString,
            pb.ApprovalEvent.FromString,
        )
        self._decide = c.unary_unary(
            _SERVICE + "DecideApproval",
            pb.DecideApprovalRequest.SerializeToString,
            pb.Approval.FromString,
        )
        self._set_switch = c.unary_unary(
            _SERVICE + "SetKillSwitch",
            pb.SetKillSwitchRequest.SerializeToString,
            pb.KillSwitch.FromString,
        )
        self._list_switches = c.unary_unary(
            _SERVICE + "ListKillSwitches",
            pb.ListKillSwitchesRequest.SerializeToString,
            pb.ListKillSwitchesResponse.FromString,
        )
        self._clear_switch = c.unary_unary(
            _SERVICE + "ClearKillSwitch",
            pb.ClearKillSwitchRequest.SerializeToString,
            pb.KillSwitch.FromString,
        )
        self._tail = c.unary_stream(
            _SERVICE + "TailRecords",
            pb.TailRecordsRequest.SerializeToString,
            pb.Record.FromString,
        )

    def check(
        self,
        tool: str = "",
        arguments: Mapping[str, Any] | None = None,
        *,
        kind: str = "tool_call",
        context: Mapping[str, Any] | None = None,
        protocol: str = "",
        call_id: str = "",
        model: str = "",
        wait: bool = False,
        agent_id: str = "",
        session: str | None = None,
        timeout_s: float | None = None,
    ) -> Verdict:
        """Ask whether ``tool`` may run with ``arguments``; the decision is on record.

        ``tool`` names the tool of every ``kind`` but ``llm_call`` and
        ``http_call``, which name none (Warden refuses one there).

        ``wait``: hold a require_approval until people decide, up to
        ``timeout_s`` (then ``grpc.RpcError`` with ``DEADLINE_EXCEEDED``).
        ``session``: the conversation the call belongs to; by default the
        one :func:`session` names, if any (``""``: none).
        """
        request = _check_request(
            tool,
            arguments,
            kind=kind,
            context=context,
            protocol=protocol,
            call_id=call_id,
            model=model,
            wait=wait,
            agent_id=agent_id,
            session_id=session,
        )
        answer = self._check(
            request, timeout=timeout_s or self._s.timeout_s, metadata=self._s.agent
        )
        return Verdict.from_message(answer)

    def report_outcome(
        self,
        decision_id: str,
        *,
        result: str = "",
        is_error: bool = False,
        error: str = "",
        latency_ms: float = 0.0,
    ) -> None:
        """Report what an allowed tool call did (a trusted outcome), once per decision."""
        request = pb.ReportOutcomeRequest(
            decision_id=decision_id,
            result=result,
            is_error=is_error,
            error=error,
            latency_ms=latency_ms,
        )
        self._report(request, timeout=self._s.timeout_s, metadata=self._s.agent)

    def list_approvals(self, status: str = "") -> list[pb.Approval]:
        """Approvals with ``status`` (every one when empty), oldest first."""
        request = pb.ListApprovalsRequest(status=status)
        answer = self._list_approvals(request, timeout=self._s.timeout_s, metadata=self._s.admin)
        return list(answer.approvals)

    def watch_approvals(self) -> Iterator[pb.ApprovalEvent]:
        """Pending approvals, then each new one and each change; until the iterator is closed."""
        call = self._watch(pb.WatchApprovalsRequest(), metadata=self._s.admin)
        try:
            yield from call
        finally:
            call.cancel()

    def decide_approval(self, approval_id: str, approve: bool, comment: str = "") -> pb.Approval:
        """Vote on an approval (role ``approver``); the approval after the vote."""
        request = pb.DecideApprovalRequest(
            approval_id=approval_id, approve=approve, comment=comment
        )
        return self._decide(request, timeout=self._s.timeout_s, metadata=self._s.admin)

    def set_kill_switch(self, scope: str, target: str, reason: str) -> pb.KillSwitch:
        """Throw a kill switch (``global``, ``agent``, ``tool``, ``upstream``); role ``admin``."""
        request = pb.SetKillSwitchRequest(scope=scope, target=target, reason=reason)
        return self._set_switch(request, timeout=self._s.timeout_s, metadata=self._s.admin)

    def list_kill_switches(self) -> list[pb.KillSwitch]:
        """The kill switches in force."""
        request = pb.ListKillSwitchesRequest()
        answer = self._list_switches(request, timeout=self._s.timeout_s, metadata=self._s.admin)
        return list(answer.kill_switches)

    def clear_kill_switch(self, switch_id: str, reason: str = "") -> pb.KillSwitch:
        """Lift a kill switch; role ``admin``."""
        request = pb.ClearKillSwitchRequest(id=switch_id, reason=reason)
        return self._clear_switch(request, timeout=self._s.timeout_s, metadata=self._s.admin)

    def tail_records(self, from_seq: int = 0, *, follow: bool = True) -> Iterator[pb.Record]:
        """Audit records from ``from_seq``, then new ones as written (``follow``)."""
        call = self._tail(
            pb.TailRecordsRequest(from_seq=from_seq, follow=follow), metadata=self._s.admin
        )
        try:
            yield from call
        finally:
            call.cancel()

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncWardenClient:
    """The asyncio client (``grpc.aio``); create and use it inside one event loop."""

    def __init__(
        self,
        target: str = "127.0.0.1:9090",
        *,
        agent: str | None = None,
        agent_key: str | None = None,
        agent_token: str | None = None,
        admin_token: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        certificate_chain: bytes | None = None,
        private_key: bytes | None = None,
        timeout_s: float | None = 30.0,
        channel: grpc.aio.Channel | None = None,
    ) -> None:
        """The same settings as :class:`WardenClient`."""
        if channel is None:
            creds = _credentials(root_certificates, certificate_chain, private_key, tls)
            channel = (
                grpc.aio.secure_channel(target, creds, options=_NO_PROXY)
                if creds is not None
                else grpc.aio.insecure_channel(target, options=_NO_PROXY)
            )
        self._channel = channel
        self._s = _Settings(agent, agent_key, agent_token, admin_token, timeout_s)
        c = channel
        self._check = c.unary_unary(
            _SERVICE + "Check", pb.CheckRequest.SerializeToString, pb.CheckResponse.FromString
        )
        self._report = c.unary_unary(
            _SERVICE + "ReportOutcome",
            pb.ReportOutcomeRequest.SerializeToString,
            pb.ReportOutcomeResponse.FromString,
        )
        self._list_approvals = c.unary_unary(
            _SERVICE + "ListApprovals",
            pb.ListApprovalsRequest.SerializeToString,
            pb.ListApprovalsResponse.FromString,
        )
        self._watch = c.unary_stream(
            _SERVICE + "WatchApprovals",
            pb.WatchApprovalsRequest.SerializeToString,
            pb.ApprovalEvent.FromString,
        )
        self._decide = c.unary_unary(
            _SERVICE + "DecideApproval",
            pb.DecideApprovalRequest.SerializeToString,
            pb.Approval.FromString,
        )
        self._set_switch = c.unary_unary(
            _SERVICE + "SetKillSwitch",
            pb.SetKillSwitchRequest.SerializeToString,
            pb.KillSwitch.FromString,
        )
        self._list_switches = c.unary_unary(
            _SERVICE + "ListKillSwitches",
            pb.ListKillSwitchesRequest.SerializeToString,
            pb.ListKillSwitchesResponse.FromString,
        )
        self._clear_switch = c.unary_unary(
            _SERVICE + "ClearKillSwitch",
            pb.ClearKillSwitchRequest.SerializeToString,
            pb.KillSwitch.FromString,
        )
        self._tail = c.unary_stream(
            _SERVICE + "TailRecords",
            pb.TailRecordsRequest.SerializeToString,
            pb.Record.FromString,
        )

    async def check(
        self,
        tool: str = "",
        arguments: Mapping[str, Any] | None = None,
        *,
        kind: str = "tool_call",
        context: Mapping[str, Any] | None = None,
        protocol: str = "",
        call_id: str = "",
        model: str = "",
        wait: bool = False,
        agent_id: str = "",
        session: str | None = None,
        timeout_s: float | None = None,
    ) -> Verdict:
        """See :meth:`WardenClient.check`."""
        request = _check_request(
            tool,
            arguments,
            kind=kind,
            context=context,
            protocol=protocol,
            call_id=call_id,
            model=model,
            wait=wait,
            agent_id=agent_id,
            session_id=session,
        )
        answer = await self._check(
            request, timeout=timeout_s or self._s.timeout_s, metadata=self._s.agent
        )
        return Verdict.from_message(answer)

    async def report_outcome(
        self,
        decision_id: str,
        *,
        result: str = "",
        is_error: bool = False,
        error: str = "",
        latency_ms: float = 0.0,
    ) -> None:
        """See :meth:`WardenClient.report_outcome`."""
        request = pb.ReportOutcomeRequest(
            decision_id=decision_id,
            result=result,
            is_error=is_error,
            error=error,
            latency_ms=latency_ms,
        )
        await self._report(request, timeout=self._s.timeout_s, metadata=self._s.agent)

    async def list_approvals(self, status: str = "") -> list[pb.Approval]:
        """See :meth:`WardenClient.list_approvals`."""
        request = pb.ListApprovalsRequest(status=status)
        answer = await self._list_approvals(
            request, timeout=self._s.timeout_s, metadata=self._s.admin
        )
        return list(answer.approvals)

    async def watch_approvals(self) -> AsyncIterator[pb.ApprovalEvent]:
        """See :meth:`WardenClient.watch_approvals`."""
        call = self._watch(pb.WatchApprovalsRequest(), metadata=self._s.admin)
        try:
            async for event in call:
                yield event
        finally:
            call.cancel()

    async def decide_approval(
        self, approval_id: str, approve: bool, comment: str = ""
    ) -> pb.Approval:
        """See :meth:`WardenClient.decide_approval`."""
        request = pb.DecideApprovalRequest(
            approval_id=approval_id, approve=approve, comment=comment
        )
        return await self._decide(request, timeout=self._s.timeout_s, metadata=self._s.admin)

    async def set_kill_switch(self, scope: str, target: str, reason: str) -> pb.KillSwitch:
        """See :meth:`WardenClient.set_kill_switch`."""
        request = pb.SetKillSwitchRequest(scope=scope, target=target, reason=reason)
        return await self._set_switch(request, timeout=self._s.timeout_s, metadata=self._s.admin)

    async def list_kill_switches(self) -> list[pb.KillSwitch]:
        """See :meth:`WardenClient.list_kill_switches`."""
        request = pb.ListKillSwitchesRequest()
        answer = await self._list_switches(
            request, timeout=self._s.timeout_s, metadata=self._s.admin
        )
        return list(answer.kill_switches)

    async def clear_kill_switch(self, switch_id: str, reason: str = "") -> pb.KillSwitch:
        """See :meth:`WardenClient.clear_kill_switch`."""
        request = pb.ClearKillSwitchRequest(id=switch_id, reason=reason)
        return await self._clear_switch(request, timeout=self._s.timeout_s, metadata=self._s.admin)

    async def tail_records(
        self, from_seq: int = 0, *, follow: bool = True
    ) -> AsyncIterator[pb.Record]:
        """See :meth:`WardenClient.tail_records`."""
        call = self._tail(
            pb.TailRecordsRequest(from_seq=from_seq, follow=follow), metadata=self._s.admin
        )
        try:
            async for record in call:
                yield record
        finally:
            call.cancel()

    async def close(self) -> None:
        """Close the channel."""
        await self._channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


# -- govern --------------------------------------------------------------------------

P = ParamSpec("P")
R = TypeVar("R")


def _arguments(
    signature: inspect.Signature, args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> dict[str, Any]:
    """The call's arguments by parameter name, as the policy sees them."""
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    out: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        param = signature.parameters[name]
        if name in ("self", "cls") and param.kind is param.POSITIONAL_OR_KEYWORD:
            continue
        if param.kind is param.VAR_KEYWORD:
            out.update(value)
        else:
            out[name] = list(value) if param.kind is param.VAR_POSITIONAL else value
    return out


def _admit(verdict: Verdict, tool: str) -> None:
    if verdict.allowed:
        return
    if verdict.effect is Effect.REQUIRE_APPROVAL:
        raise ApprovalPending(tool, verdict.reason, verdict.decision_id, verdict.approval_id)
    raise ToolDenied(tool, verdict.reason, verdict.decision_id)


def _no_decision_in_time(exc: grpc.RpcError, tool: str) -> ApprovalPending | None:
    code = exc.code() if isinstance(exc, grpc.Call) else None
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return ApprovalPending(tool, "no one decided within the deadline", "", "")
    return None


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000


@overload
def govern(
    client: WardenClient,
    *,
    tool: str | None = ...,
    kind: str = ...,
    context: Mapping[str, Any] | None = ...,
    protocol: str = ...,
    wait: bool = ...,
    timeout_s: float | None = ...,
) -> Callable[[Callable[P, R]], Callable[P, R]]: ...
@overload
def govern(
    client: AsyncWardenClient,
    *,
    tool: str | None = ...,
    kind: str = ...,
    context: Mapping[str, Any] | None = ...,
    protocol: str = ...,
    wait: bool = ...,
    timeout_s: float | None = ...,
) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Awaitable[R]]]: ...
def govern(
    client: WardenClient | AsyncWardenClient,
    *,
    tool: str | None = None,
    kind: str = "tool_call",
    context: Mapping[str, Any] | None = None,
    protocol: str = "python",
    wait: bool = False,
    timeout_s: float | None = None,
) -> Any:
    """Make a tool function ask Warden before it runs and report its outcome after.

    The call's arguments (by parameter name) are the action's arguments;
    ``tool`` defaults to the function's name. A denied call raises
    :class:`ToolDenied` and the function never runs; one that needs approval
    raises :class:`ApprovalPending` (or, with ``wait``, waits up to
    ``timeout_s`` for people to decide). After an allowed call its return
    value (or exception, which is re-raised) is reported as the outcome.
    A sync function needs a :class:`WardenClient`, an ``async def`` one an
    :class:`AsyncWardenClient`.
    """

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        name = tool or fn.__name__
        signature = inspect.signature(fn)
        if inspect.iscoroutinefunction(fn):
            if not isinstance(client, AsyncWardenClient):
                raise TypeError(f"govern: async {name} needs an AsyncWardenClient")
            aclient = client

            @functools.wraps(fn)
            async def governed_async(*args: Any, **kwargs: Any) -> Any:
                try:
                    verdict = await aclient.check(
                        name,
                        _arguments(signature, args, kwargs),
                        kind=kind,
                        context=context,
                        protocol=protocol,
                        wait=wait,
                        timeout_s=timeout_s,
                    )
                except grpc.RpcError as exc:
                    raise _no_decision_in_time(exc, name) or exc from None
                _admit(verdict, name)
                started = time.perf_counter()
                try:
                    result = await fn(*args, **kwargs)
                except Exception as exc:
                    await _report_async(aclient, verdict, started, exc, None)
                    raise
                await _report_async(aclient, verdict, started, None, result)
                return result

            return governed_async
        if not isinstance(client, WardenClient):
            raise TypeError(f"govern: {name} is not async, so it needs a WardenClient")
        sclient = client

        @functools.wraps(fn)
        def governed(*args: Any, **kwargs: Any) -> Any:
            try:
                verdict = sclient.check(
                    name,
                    _arguments(signature, args, kwargs),
                    kind=kind,
                    context=context,
                    protocol=protocol,
                    wait=wait,
                    timeout_s=timeout_s,
                )
            except grpc.RpcError as exc:
                raise _no_decision_in_time(exc, name) or exc from None
            _admit(verdict, name)
            started = time.perf_counter()
            try:
                result = fn(*args, **kwargs)
            except Exception as exc:
                _report_sync(sclient, verdict, started, exc, None)
                raise
            _report_sync(sclient, verdict, started, None, result)
            return result

        return governed

    return decorate


def _outcome(
    verdict: Verdict, started: float, exc: BaseException | None, result: Any
) -> dict[str, Any]:
    if exc is not None:
        name = type(exc).__name__
        return {
            "result": str(exc),
            "is_error": True,
            # A code, as ReportOutcome takes it (the message goes in result, sealed).
            "error": name if ERROR_CODE.fullmatch(name) else "exception",
            "latency_ms": _ms(started),
        }
    return {"result": _result_text(result), "latency_ms": _ms(started)}


def _report_sync(
    client: WardenClient, verdict: Verdict, started: float, exc: BaseException | None, result: Any
) -> None:
    try:
        client.report_outcome(verdict.decision_id, **_outcome(verdict, started, exc, result))
    except grpc.RpcError as error:
        # The tool has run: its result stands even if the report did not arrive.
        log.warning("could not report the outcome of decision %s: %s", verdict.decision_id, error)


async def _report_async(
    client: AsyncWardenClient,
    verdict: Verdict,
    started: float,
    exc: BaseException | None,
    result: Any,
) -> None:
    try:
        await client.report_outcome(verdict.decision_id, **_outcome(verdict, started, exc, result))
    except grpc.RpcError as error:
        log.warning("could not report the outcome of decision %s: %s", verdict.decision_id, error)
