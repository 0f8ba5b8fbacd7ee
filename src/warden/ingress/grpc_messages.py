"""Between Warden's types and the ``warden.v1`` protobuf messages: conversion only, no I/O."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from google.protobuf import struct_pb2, timestamp_pb2

from warden.approvals.model import Approval
from warden.audit.tail import StoredRecord
from warden.grpc_api.v1 import governance_pb2 as pb
from warden.killswitch import KillSwitch
from warden.model import (
    Action,
    ActionKind,
    Agent,
    Decision,
    Effect,
    Mode,
    RequestMeta,
    Stage,
    new_id,
)

__all__ = [
    "DEFAULT_PROTOCOL",
    "action_from",
    "approval_message",
    "check_response",
    "from_struct",
    "kill_switch_message",
    "record_message",
]

DEFAULT_PROTOCOL = "grpc"
_EXACT_INT = 2**53  # doubles hold every integer below this exactly (2**53 + 1 reads as 2**53)
# Not a hosted MCP approval request: only a model's response makes one, and Warden's
# record of an allowed one is what lets an approval of it reach the provider.
_KINDS = frozenset(k.value for k in ActionKind) - {
    ActionKind.UNKNOWN_CALL.value,
    ActionKind.MCP_APPROVAL_REQUEST.value,
}
_UNNAMED_KINDS = frozenset({ActionKind.LLM_CALL, ActionKind.HTTP_CALL})
_MAX_TOOL = 256
_EFFECTS = {
    Effect.ALLOW: pb.EFFECT_ALLOW,
    Effect.DENY: pb.EFFECT_DENY,
    Effect.REQUIRE_APPROVAL: pb.EFFECT_REQUIRE_APPROVAL,
}
_MODES = {Mode.ENFORCE: pb.MODE_ENFORCE, Mode.OBSERVE: pb.MODE_OBSERVE}


def _plain(value: struct_pb2.Value) -> Any:
    which = value.WhichOneof("kind")
    if which == "number_value":
        number = value.number_value
        # JSON has one number type; a whole number is an integer to policies and the log.
        if math.isfinite(number) and number.is_integer() and abs(number) < _EXACT_INT:
            return int(number)
        return number
    if which == "string_value":
        return value.string_value
    if which == "bool_value":
        return value.bool_value
    if which == "struct_value":
        return from_struct(value.struct_value)
    if which == "list_value":
        return [_plain(v) for v in value.list_value.values]
    return None


def from_struct(struct: struct_pb2.Struct) -> dict[str, Any]:
    """A ``Struct`` as plain JSON values; whole numbers become ``int``."""
    fields = struct.fields
    # By key: the map's items() is the Python ItemsView mixin, a third slower.
    return {key: _plain(fields[key]) for key in fields}


def _to_value(value: Any) -> struct_pb2.Value:
    out = struct_pb2.Value()
    if value is None:
        out.null_value = struct_pb2.NULL_VALUE
    elif isinstance(value, bool):
        out.bool_value = value
    elif isinstance(value, int | float):
        out.number_value = float(value)
    elif isinstance(value, str):
        out.string_value = value
    elif isinstance(value, Mapping):
        out.struct_value.update({str(k): v for k, v in value.items()})
    elif isinstance(value, list | tuple):
        out.list_value.extend(list(value))
    else:
        out.string_value = str(value)
    return out


def _timestamp(seconds: float | None) -> timestamp_pb2.Timestamp | None:
    if seconds is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(round(seconds * 1e9))
    return stamp


def action_from(
    message: pb.Action, agent: Agent, request: RequestMeta, context: Mapping[str, Any]
) -> Action:
    """The :class:`Action` a ``Check`` asks about; ``ValueError`` names what is wrong.

    ``context`` (from metadata; the action keeps it, so pass a dict of its
    own) is overridden by the message's own context.
    """
    kind_name = message.kind or ActionKind.TOOL_CALL.value
    if kind_name not in _KINDS:
        raise ValueError(f"action.kind must be one of {', '.join(sorted(_KINDS))}")
    kind = ActionKind(kind_name)
    tool = message.tool or None
    if tool is None and kind not in _UNNAMED_KINDS:
        raise ValueError(f"action.tool is required for a {kind.value}")
    if tool is not None and kind in _UNNAMED_KINDS:
        # Caps count tools by their calls: a tool named on a model or HTTP call would
        # reach the policy and the log as that tool, counted as neither.
        raise ValueError(
            f"a {kind.value} names no tool: send kind tool_call (or another call kind) for "
            f"{tool[:64]!r}"
        )
    if tool is not None and len(tool) > _MAX_TOOL:
        raise ValueError(f"action.tool is longer than {_MAX_TOOL} characters")
    return Action(
        action_id=new_id("act"),
        agent=agent,
        kind=kind,
        protocol=message.protocol or DEFAULT_PROTOCOL,
        stage=Stage.EXECUTED,
        request=request,
        tool=tool,
        arguments=from_struct(message.arguments),
        call_id=message.call_id or None,
        model=message.model or None,
        context={**context, **from_struct(message.context)} if message.context.fields else context,
    )


def check_response(decision: Decision, approval_id: str, agent_id: str) -> pb.CheckResponse:
    """What ``Check`` answers: the effect that applies, why, and the obligations."""
    ob = decision.obligations
    return pb.CheckResponse(
        decision_id=decision.decision_id,
        effect=_EFFECTS[decision.enforced],
        reason=decision.reason,
        approval_id=approval_id,
        obligations=pb.Obligations(
            redact=list(ob.redact),
            mode=_MODES[decision.mode],
            risk=ob.risk or "",
            approvers=list(ob.approvers),
        ),
        would=decision.would or "",
        guard=decision.guard,
        agent_id=agent_id,
    )


def approval_message(approval: Approval) -> pb.Approval:
    """An approval as ``ListApprovals``, ``WatchApprovals`` and ``DecideApproval`` show it."""
    return pb.Approval(
        id=approval.id,
        status=approval.status.value,
        mode=approval.mode,
        decision_id=approval.decision_id,
        action_id=approval.action_id,
        agent_id=approval.agent_id,
        tool=approval.tool or "",
        arguments=_to_value(approval.arguments),
        arguments_sha256=approval.shown_sha256 or "",
        redacted=list(approval.redacted),
        reason=approval.reason,
        risk=approval.risk or "",
        approvers=list(approval.approvers),
        required_approvals=approval.required_approvals,
        votes=[
            pb.Vote(by=v.subject, approve=v.approve, comment=v.comment, at=_timestamp(v.at))
            for v in approval.votes
        ],
        created_at=_timestamp(approval.created_at),
        expires_at=_timestamp(approval.expires_at),
        decided_at=_timestamp(approval.decided_at),
        decided_by=approval.decided_by or "",
        comment=approval.comment,
        consumed_at=_timestamp(approval.consumed_at),
        upstream=approval.upstream or "",
        method=approval.method or "",
        answers=_to_value(approval.answers) if approval.answers is not None else None,
    )


def kill_switch_message(switch: KillSwitch) -> pb.KillSwitch:
    """A kill switch as the API shows it."""
    return pb.KillSwitch(
        id=switch.id,
        scope=switch.scope.value,
        target=switch.target,
        reason=switch.reason,
        created_by=switch.created_by,
        created_at=_timestamp(switch.created_at),
    )


def record_message(record: StoredRecord) -> pb.Record:
    """An audit record as ``TailRecords`` streams it: the stored bytes, unchanged."""
    return pb.Record(
        seq=record.seq, id=record.id, kind=record.kind, time=record.time, json=record.payload
    )
