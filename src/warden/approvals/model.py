"""Approval data types, settings and errors: frozen values, no I/O.

An approval is one high-impact action waiting for people. Its life::

    pending ──approve (N distinct approvers)──▶ approved ──take_grant / mark_executed──▶ consumed
       │  └──reject (any one approver, or a kill switch)──▶ rejected
       └──timeout / TTL passed──▶ expired

Only a person's vote moves an approval to ``approved``: a timeout always
expires it. ``binding`` ties an approval to one exact agent, tool and
argument set, so an approval for a refund of 10 never lets a refund of 1000
through.
"""

from __future__ import annotations

import enum
import time
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from warden.approvals.shown import CUT, MORE
from warden.audit.record import ApprovalEvidence
from warden.errors import WardenError

__all__ = [
    "MAX_COMMENT",
    "AlreadyVoted",
    "Approval",
    "ApprovalConflict",
    "ApprovalError",
    "ApprovalForbidden",
    "ApprovalNotFound",
    "ApprovalSettings",
    "ApprovalStatus",
    "NotAnApprover",
    "SelfApproval",
    "TooManyPending",
    "Vote",
    "hidden_paths",
    "rfc3339",
]

MAX_COMMENT = 2000
MODES = frozenset({"hold", "defer"})
FORMATS = frozenset({"json", "slack"})


class ApprovalStatus(enum.StrEnum):
    """Where an approval is in its life (see the module docstring)."""

    PENDING = "pending"
    APPROVED = "approved"
    REJECTED = "rejected"
    EXPIRED = "expired"
    CONSUMED = "consumed"


@dataclass(frozen=True, slots=True)
class ApprovalSettings:
    """How approvals behave; every field has a safe default.

    ``mode`` ``hold`` keeps the agent's request open until people decide (at
    most ``hold_timeout_s``, unless the decision's obligations say otherwise);
    ``defer`` answers at once and lets the same call through once when the
    agent retries it after approval, within ``defer_ttl_s`` of the request.
    """

    hold_timeout_s: float = 120.0
    defer_ttl_s: float = 86400.0
    mode: str = "hold"
    required_approvals: int = 1
    webhook_url: str | None = None
    webhook_secret: str | None = None
    webhook_format: str = "json"
    webhook_tries: int = 3
    webhook_backoff_s: float = 0.5
    webhook_timeout_s: float = 5.0
    poll_interval_s: float = 0.5
    sweep_interval_s: float = 5.0
    orphan_after_s: float = 30.0
    """A hold whose process sent no heartbeat for this long is deferred by another."""
    max_pending_per_agent: int = 100
    """Approvals one agent may have waiting at once; more are denied (0: no bound)."""
    keep_decided_s: float = 30 * 86400.0
    """How long an approval that ended stays in the store (the audit log keeps it for good)."""
    bind_context: tuple[str, ...] | None = None
    """The context keys an approval is bound to; ``None``: all of them."""
    bind_claims: tuple[str, ...] | None = None
    """The token claims an approval is bound to; ``None``: all but each token's own."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"approvals.mode must be hold or defer, not {self.mode!r}")
        if self.webhook_format not in FORMATS:
            raise ValueError(
                f"approvals.webhook.format must be json or slack, not {self.webhook_format!r}"
            )
        if self.required_approvals < 1:
            raise ValueError("approvals.required_approvals must be at least 1")
        if self.hold_timeout_s <= 0 or self.defer_ttl_s <= 0:
            raise ValueError("approval timeouts must be positive")
        if self.orphan_after_s <= 0:
            raise ValueError("approvals.orphan_after_s must be positive")
        if self.keep_decided_s <= 0:
            raise ValueError("approvals.keep_decided_s must be positive")
        if self.max_pending_per_agent < 0:
            raise ValueError("approvals.max_pending_per_agent must be 0 (no bound) or more")
        if self.webhook_tries < 1:
            raise ValueError("approvals.webhook.tries must be at least 1")
        if self.webhook_url is not None:
            parts = urllib.parse.urlsplit(self.webhook_url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError("approvals.webhook.url must be an http:// or https:// URL")


@dataclass(frozen=True, slots=True)
class Vote:
    """One person's verdict on an approval."""

    subject: str
    approve: bool
    comment: str
    at: float
    quorum: int = field(default=1, compare=False)
    """The fewest approvals that approve when the vote is cast (``approvals.required_approvals``
    then): an approval opened under a smaller quorum needs this one, and keeps it as its
    ``required_approvals``. Not stored with the vote."""

    def to_json(self) -> dict[str, Any]:
        """The vote as the admin API and the webhooks show it."""
        return {
            "by": self.subject,
            "verdict": "approved" if self.approve else "rejected",
            "comment": self.comment,
            "at": self.at,
        }


@dataclass(frozen=True, slots=True)
class Approval:
    """One action waiting for (or past) human approval.

    ``arguments`` is the display form only: credentials masked and the
    decision's redaction paths replaced with ``"[redacted]"``; the real
    arguments are never stored, only their hash (``arguments_sha256``).
    ``redacted`` lists every value so hidden: the policy's dotted paths and
    the masked ones as JSON pointers (:func:`hidden_paths` for people), and
    those cut for length as ``cut:`` and a pointer (:mod:`warden.approvals.shown`).
    """

    id: str
    decision_id: str
    action_id: str
    agent_id: str
    tool: str | None
    arguments: Any
    arguments_sha256: str
    binding: str
    mode: str
    reason: str
    created_at: float
    expires_at: float
    status: ApprovalStatus = ApprovalStatus.PENDING
    risk: str | None = None
    approvers: tuple[str, ...] = ()
    required_approvals: int = 1
    redacted: tuple[str, ...] = ()
    votes: tuple[Vote, ...] = field(default_factory=tuple)
    decided_at: float | None = None
    decided_by: str | None = None
    comment: str = ""
    consumed_at: float | None = None
    owner: str | None = None
    """The instance id of the process keeping a ``hold`` open (:mod:`warden.approvals.owner`)."""
    upstream: str | None = None
    """The upstream the held call goes to (``None`` for approvals from before it was kept)."""
    method: str | None = None
    """The method of the held request (``POST``, ``tools/call``...)."""
    subjects: tuple[str, ...] = ()
    """Keyed references of the data subjects the action names (``audit.subjects``), so an
    erasure finds the approval whatever source named the subject; never the ids themselves."""
    answers: Any = None
    """An MCP retry's answers to the server's questions, in display form like ``arguments``
    (the server acts on them too); ``None`` for every other action."""

    @property
    def shown_sha256(self) -> str | None:
        """``arguments_sha256`` where the arguments are shown whole, else ``None``.

        With a value hidden, its plain digest would let anyone who reads the
        approval (a viewer, a webhook's channel) test guesses of it: a PIN, a
        date of birth. The store keeps it to bind the approval; the audit log
        keys it.
        """
        return None if self.redacted else self.arguments_sha256

    @property
    def hidden(self) -> list[str]:
        """What the approver cannot see, as :func:`hidden_paths` words it."""
        return hidden_paths(self.redacted)

    @property
    def approved_by(self) -> tuple[str, ...]:
        """The subjects who approved, in vote order."""
        return tuple(v.subject for v in self.votes if v.approve)

    def waiting_s(self, now: float | None = None) -> float:
        """Seconds from the request to the decision, or to now while pending."""
        end = self.decided_at if self.decided_at is not None else (now or time.time())
        return max(0.0, end - self.created_at)

    def evidence(self) -> ApprovalEvidence:
        """What the decision record of the approved action carries (``approval``)."""
        return ApprovalEvidence(
            approval_id=self.id,
            approver=",".join(self.approved_by) or (self.decided_by or ""),
            decided_at=rfc3339(self.decided_at) if self.decided_at is not None else "",
            arguments_sha256=self.arguments_sha256,
            verdict="approved"
            if self.status in (ApprovalStatus.APPROVED, ApprovalStatus.CONSUMED)
            else self.status.value,
        )

    def to_json(self, now: float | None = None) -> dict[str, Any]:
        """The approval as the admin API, the CLI and the webhooks show it."""
        return {
            "id": self.id,
            "status": self.status.value,
            "mode": self.mode,
            "decision_id": self.decision_id,
            "action_id": self.action_id,
            "agent": self.agent_id,
            "tool": self.tool,
            "upstream": self.upstream,
            "method": self.method,
            "arguments": self.arguments,
            "arguments_sha256": self.shown_sha256,
            "redacted": list(self.redacted),
            "reason": self.reason,
            "risk": self.risk,
            "approvers": list(self.approvers),
            "required_approvals": self.required_approvals,
            "approvals": len(self.approved_by),
            "votes": [v.to_json() for v in self.votes],
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "waiting_s": round(self.waiting_s(now), 3),
            "decided_at": self.decided_at,
            "decided_by": self.decided_by,
            "comment": self.comment,
            "consumed_at": self.consumed_at,
            **({"answers": self.answers} if self.answers is not None else {}),
        }


_ANSWERS = "input_responses"


def hidden_paths(redacted: Iterable[str]) -> list[str]:
    """An approval's ``redacted`` as approvers read it: one JSON pointer per hidden value.

    ``redacted`` mixes the policy's dotted paths (``customer.phone``) with
    the pointers of masked credentials (``/password``); both become
    pointers (``/customer/phone``), so a value hidden twice is named once.
    An MCP retry's answers read ``answers /...``; a whole hidden object
    reads ``all arguments`` or ``all answers``. A value cut for length
    (:mod:`warden.approvals.shown`) reads ``/note (cut: too long to show)``.
    An approver who needs one of these values to decide should refuse the call.
    """
    out: dict[str, None] = {}  # ordered, without repeats
    for entry in redacted:
        if entry.startswith(CUT):
            out[_cut_path(entry[len(CUT) :])] = None
        elif entry in ("arguments", "raw_arguments"):
            out["all arguments"] = None
        elif entry == _ANSWERS:
            out["all answers"] = None
        elif entry.startswith(f"{_ANSWERS}/"):
            out[f"answers {entry[len(_ANSWERS) :]}"] = None
        elif entry.startswith(f"{_ANSWERS}."):
            out[f"answers {_dotted_pointer(entry[len(_ANSWERS) + 1 :])}"] = None
        elif entry.startswith("/"):
            out[entry] = None
        else:
            out[_dotted_pointer(entry)] = None
    return list(out)


def _cut_path(where: str) -> str:
    if where == MORE[len(CUT) :]:
        return "more values (cut: too long to show)"
    if where.startswith(_ANSWERS):
        return f"answers {where[len(_ANSWERS) :] or '(all)'} (cut: too long to show)"
    return f"{where or 'the arguments'} (cut: too long to show)"


def _dotted_pointer(path: str) -> str:
    # A policy path is split on "." to be applied: each part is one key or index.
    return "".join("/" + p.replace("~", "~0").replace("/", "~1") for p in path.split("."))


def rfc3339(ts: float) -> str:
    """A UTC RFC 3339 timestamp with microseconds, like the audit log's."""
    whole = int(ts)
    micros = round((ts - whole) * 1_000_000)
    if micros >= 1_000_000:
        whole, micros = whole + 1, 0
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{micros:06d}Z"


class ApprovalError(WardenError):
    """Base of the approval errors; ``status`` is the admin API's HTTP status."""

    code: ClassVar[str] = "approval_error"
    status: ClassVar[int] = 400


class ApprovalNotFound(ApprovalError):
    """No approval has this id."""

    code = "not_found"
    status = 404


class ApprovalConflict(ApprovalError):
    """The approval is no longer pending (decided, expired, consumed), or this person voted."""

    code = "approval_not_pending"
    status = 409


class TooManyPending(ApprovalError):
    """The agent already has ``approvals.max_pending_per_agent`` approvals waiting."""

    code = "approvals_full"
    status = 429


class ApprovalForbidden(ApprovalError):
    """This person may not decide this approval."""

    code = "approval_forbidden"
    status = 403


class SelfApproval(ApprovalForbidden):
    """Separation of duties: an agent's own identity cannot decide its actions."""

    code = "self_approval"


class NotAnApprover(ApprovalForbidden):
    """The decision names approver groups and this person is in none of them."""

    code = "not_an_approver"


class AlreadyVoted(ApprovalConflict):
    """This person already voted on the approval: votes must come from distinct people."""

    code = "already_voted"
