import datetime

from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Effect(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EFFECT_UNSPECIFIED: _ClassVar[Effect]
    EFFECT_ALLOW: _ClassVar[Effect]
    EFFECT_DENY: _ClassVar[Effect]
    EFFECT_REQUIRE_APPROVAL: _ClassVar[Effect]

class Mode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODE_UNSPECIFIED: _ClassVar[Mode]
    MODE_ENFORCE: _ClassVar[Mode]
    MODE_OBSERVE: _ClassVar[Mode]
EFFECT_UNSPECIFIED: Effect
EFFECT_ALLOW: Effect
EFFECT_DENY: Effect
EFFECT_REQUIRE_APPROVAL: Effect
MODE_UNSPECIFIED: Mode
MODE_ENFORCE: Mode
MODE_OBSERVE: Mode

class Action(_message.Message):
    __slots__ = ("kind", "tool", "arguments", "protocol", "context", "call_id", "model")
    KIND_FIELD_NUMBER: _ClassVar[int]
    TOOL_FIELD_NUMBER: _ClassVar[int]
    ARGUMENTS_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    kind: str
    tool: str
    arguments: _struct_pb2.Struct
    protocol: str
    context: _struct_pb2.Struct
    call_id: str
    model: str
    def __init__(self, kind: _Optional[str] = ..., tool: _Optional[str] = ..., arguments: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., protocol: _Optional[str] = ..., context: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., call_id: _Optional[str] = ..., model: _Optional[str] = ...) -> None: ...

class CheckRequest(_message.Message):
    __slots__ = ("agent_id", "action", "wait", "session_id")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    action: Action
    wait: bool
    session_id: str
    def __init__(self, agent_id: _Optional[str] = ..., action: _Optional[_Union[Action, _Mapping]] = ..., wait: _Optional[bool] = ..., session_id: _Optional[str] = ...) -> None: ...

class Obligations(_message.Message):
    __slots__ = ("redact", "mode", "risk", "approvers")
    REDACT_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    RISK_FIELD_NUMBER: _ClassVar[int]
    APPROVERS_FIELD_NUMBER: _ClassVar[int]
    redact: _containers.RepeatedScalarFieldContainer[str]
    mode: Mode
    risk: str
    approvers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, redact: _Optional[_Iterable[str]] = ..., mode: _Optional[_Union[Mode, str]] = ..., risk: _Optional[str] = ..., approvers: _Optional[_Iterable[str]] = ...) -> None: ...

class CheckResponse(_message.Message):
    __slots__ = ("decision_id", "effect", "reason", "approval_id", "obligations", "would", "guard", "agent_id")
    DECISION_ID_FIELD_NUMBER: _ClassVar[int]
    EFFECT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    APPROVAL_ID_FIELD_NUMBER: _ClassVar[int]
    OBLIGATIONS_FIELD_NUMBER: _ClassVar[int]
    WOULD_FIELD_NUMBER: _ClassVar[int]
    GUARD_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    decision_id: str
    effect: Effect
    reason: str
    approval_id: str
    obligations: Obligations
    would: str
    guard: str
    agent_id: str
    def __init__(self, decision_id: _Optional[str] = ..., effect: _Optional[_Union[Effect, str]] = ..., reason: _Optional[str] = ..., approval_id: _Optional[str] = ..., obligations: _Optional[_Union[Obligations, _Mapping]] = ..., would: _Optional[str] = ..., guard: _Optional[str] = ..., agent_id: _Optional[str] = ...) -> None: ...

class ReportOutcomeRequest(_message.Message):
    __slots__ = ("decision_id", "result", "is_error", "error", "latency_ms")
    DECISION_ID_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    IS_ERROR_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    decision_id: str
    result: str
    is_error: bool
    error: str
    latency_ms: float
    def __init__(self, decision_id: _Optional[str] = ..., result: _Optional[str] = ..., is_error: _Optional[bool] = ..., error: _Optional[str] = ..., latency_ms: _Optional[float] = ...) -> None: ...

class ReportOutcomeResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Vote(_message.Message):
    __slots__ = ("by", "approve", "comment", "at")
    BY_FIELD_NUMBER: _ClassVar[int]
    APPROVE_FIELD_NUMBER: _ClassVar[int]
    COMMENT_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    by: str
    approve: bool
    comment: str
    at: _timestamp_pb2.Timestamp
    def __init__(self, by: _Optional[str] = ..., approve: _Optional[bool] = ..., comment: _Optional[str] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Approval(_message.Message):
    __slots__ = ("id", "status", "mode", "decision_id", "action_id", "agent_id", "tool", "arguments", "arguments_sha256", "redacted", "reason", "risk", "approvers", "required_approvals", "votes", "created_at", "expires_at", "decided_at", "decided_by", "comment", "consumed_at", "upstream", "method", "answers")
    ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    DECISION_ID_FIELD_NUMBER: _ClassVar[int]
    ACTION_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    TOOL_FIELD_NUMBER: _ClassVar[int]
    ARGUMENTS_FIELD_NUMBER: _ClassVar[int]
    ARGUMENTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    REDACTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    RISK_FIELD_NUMBER: _ClassVar[int]
    APPROVERS_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_APPROVALS_FIELD_NUMBER: _ClassVar[int]
    VOTES_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    DECIDED_AT_FIELD_NUMBER: _ClassVar[int]
    DECIDED_BY_FIELD_NUMBER: _ClassVar[int]
    COMMENT_FIELD_NUMBER: _ClassVar[int]
    CONSUMED_AT_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    ANSWERS_FIELD_NUMBER: _ClassVar[int]
    id: str
    status: str
    mode: str
    decision_id: str
    action_id: str
    agent_id: str
    tool: str
    arguments: _struct_pb2.Value
    arguments_sha256: str
    redacted: _containers.RepeatedScalarFieldContainer[str]
    reason: str
    risk: str
    approvers: _containers.RepeatedScalarFieldContainer[str]
    required_approvals: int
    votes: _containers.RepeatedCompositeFieldContainer[Vote]
    created_at: _timestamp_pb2.Timestamp
    expires_at: _timestamp_pb2.Timestamp
    decided_at: _timestamp_pb2.Timestamp
    decided_by: str
    comment: str
    consumed_at: _timestamp_pb2.Timestamp
    upstream: str
    method: str
    answers: _struct_pb2.Value
    def __init__(self, id: _Optional[str] = ..., status: _Optional[str] = ..., mode: _Optional[str] = ..., decision_id: _Optional[str] = ..., action_id: _Optional[str] = ..., agent_id: _Optional[str] = ..., tool: _Optional[str] = ..., arguments: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., arguments_sha256: _Optional[str] = ..., redacted: _Optional[_Iterable[str]] = ..., reason: _Optional[str] = ..., risk: _Optional[str] = ..., approvers: _Optional[_Iterable[str]] = ..., required_approvals: _Optional[int] = ..., votes: _Optional[_Iterable[_Union[Vote, _Mapping]]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., decided_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., decided_by: _Optional[str] = ..., comment: _Optional[str] = ..., consumed_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., upstream: _Optional[str] = ..., method: _Optional[str] = ..., answers: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ...) -> None: ...

class ListApprovalsRequest(_message.Message):
    __slots__ = ("status",)
    STATUS_FIELD_NUMBER: _ClassVar[int]
    status: str
    def __init__(self, status: _Optional[str] = ...) -> None: ...

class ListApprovalsResponse(_message.Message):
    __slots__ = ("approvals",)
    APPROVALS_FIELD_NUMBER: _ClassVar[int]
    approvals: _containers.RepeatedCompositeFieldContainer[Approval]
    def __init__(self, approvals: _Optional[_Iterable[_Union[Approval, _Mapping]]] = ...) -> None: ...

class WatchApprovalsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ApprovalEvent(_message.Message):
    __slots__ = ("kind", "approval")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[ApprovalEvent.Kind]
        KIND_EXISTING: _ClassVar[ApprovalEvent.Kind]
        KIND_REQUESTED: _ClassVar[ApprovalEvent.Kind]
        KIND_CHANGED: _ClassVar[ApprovalEvent.Kind]
    KIND_UNSPECIFIED: ApprovalEvent.Kind
    KIND_EXISTING: ApprovalEvent.Kind
    KIND_REQUESTED: ApprovalEvent.Kind
    KIND_CHANGED: ApprovalEvent.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    APPROVAL_FIELD_NUMBER: _ClassVar[int]
    kind: ApprovalEvent.Kind
    approval: Approval
    def __init__(self, kind: _Optional[_Union[ApprovalEvent.Kind, str]] = ..., approval: _Optional[_Union[Approval, _Mapping]] = ...) -> None: ...

class DecideApprovalRequest(_message.Message):
    __slots__ = ("approval_id", "approve", "comment")
    APPROVAL_ID_FIELD_NUMBER: _ClassVar[int]
    APPROVE_FIELD_NUMBER: _ClassVar[int]
    COMMENT_FIELD_NUMBER: _ClassVar[int]
    approval_id: str
    approve: bool
    comment: str
    def __init__(self, approval_id: _Optional[str] = ..., approve: _Optional[bool] = ..., comment: _Optional[str] = ...) -> None: ...

class KillSwitch(_message.Message):
    __slots__ = ("id", "scope", "target", "reason", "created_by", "created_at")
    ID_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CREATED_BY_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    id: str
    scope: str
    target: str
    reason: str
    created_by: str
    created_at: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[str] = ..., scope: _Optional[str] = ..., target: _Optional[str] = ..., reason: _Optional[str] = ..., created_by: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class SetKillSwitchRequest(_message.Message):
    __slots__ = ("scope", "target", "reason")
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    scope: str
    target: str
    reason: str
    def __init__(self, scope: _Optional[str] = ..., target: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ListKillSwitchesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListKillSwitchesResponse(_message.Message):
    __slots__ = ("kill_switches",)
    KILL_SWITCHES_FIELD_NUMBER: _ClassVar[int]
    kill_switches: _containers.RepeatedCompositeFieldContainer[KillSwitch]
    def __init__(self, kill_switches: _Optional[_Iterable[_Union[KillSwitch, _Mapping]]] = ...) -> None: ...

class ClearKillSwitchRequest(_message.Message):
    __slots__ = ("id", "reason")
    ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    id: str
    reason: str
    def __init__(self, id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class TailRecordsRequest(_message.Message):
    __slots__ = ("from_seq", "follow")
    FROM_SEQ_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    from_seq: int
    follow: bool
    def __init__(self, from_seq: _Optional[int] = ..., follow: _Optional[bool] = ...) -> None: ...

class Record(_message.Message):
    __slots__ = ("seq", "id", "kind", "time", "json")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    JSON_FIELD_NUMBER: _ClassVar[int]
    seq: int
    id: str
    kind: str
    time: str
    json: bytes
    def __init__(self, seq: _Optional[int] = ..., id: _Optional[str] = ..., kind: _Optional[str] = ..., time: _Optional[str] = ..., json: _Optional[bytes] = ...) -> None: ...
