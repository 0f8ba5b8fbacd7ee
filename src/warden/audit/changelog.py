"""The change log of an audit log, and the activation each decision was made under. Pure.

Fed the records in log order (:meth:`ChangeLog.feed`), it keeps the
change-management records (:data:`warden.audit.changes.CHANGE_KINDS`) and
links every decision record to the ``policy_activation`` record in force when
it was made: the latest champion activation *before* it in the log whose
revision is the decision's ``bundle_revision``. Matching the revision as well
as the order keeps a decision that was already being evaluated by the old
revision when a new one was swapped in linked to the old activation.
A decision whose revision was activated before the log began (or that no
policy made) links to nothing (``None``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from warden.audit.changes import ACTIVATION, CHANGE_KINDS

__all__ = ["ChangeEntry", "ChangeLog", "DecisionLink", "describe"]


@dataclass(frozen=True, slots=True)
class ChangeEntry:
    """One change-management record."""

    seq: int
    id: str
    time: str
    kind: str
    body: Mapping[str, Any]

    def as_dict(self) -> dict[str, Any]:
        """The ``changelog.jsonl`` line."""
        return {
            "seq": self.seq,
            "id": self.id,
            "time": self.time,
            "kind": self.kind,
            "body": dict(self.body),
        }


@dataclass(frozen=True, slots=True)
class DecisionLink:
    """A decision record and the activation record in force when it was made."""

    record_id: str
    decision_id: str
    bundle_revision: str
    activation_id: str | None

    def as_dict(self) -> dict[str, Any]:
        """The ``activations.jsonl`` line."""
        return {
            "record_id": self.record_id,
            "decision_id": self.decision_id,
            "bundle_revision": self.bundle_revision,
            "activation_id": self.activation_id,
        }


@dataclass
class ChangeLog:
    """Accumulates change entries and the revision → activation map, in log order."""

    entries: list[ChangeEntry] = field(default_factory=list)
    _in_force: dict[str, str] = field(default_factory=dict)

    def feed(self, seq: int, record: Mapping[str, Any]) -> None:
        """Take the next record of the log (every record, in order)."""
        kind = record.get("kind")
        if kind not in CHANGE_KINDS:
            return
        body = record.get("body")
        body = body if isinstance(body, Mapping) else {}
        rid = str(record.get("id", ""))
        self.entries.append(ChangeEntry(seq, rid, str(record.get("time", "")), str(kind), body))
        if kind == ACTIVATION and body.get("role", "champion") == "champion":
            self._in_force[str(body.get("revision", ""))] = rid

    def link(self, record: Mapping[str, Any]) -> DecisionLink | None:
        """The activation in force for a decision ``record`` fed so far; ``None`` for others."""
        if record.get("kind") != "decision":
            return None
        decision = record.get("decision") or {}
        revision = str(decision.get("bundle_revision") or "")
        return DecisionLink(
            record_id=str(record.get("id", "")),
            decision_id=str(decision.get("id", "")),
            bundle_revision=revision,
            activation_id=self._in_force.get(revision) if revision else None,
        )


def describe(entry: ChangeEntry) -> str:
    """One line for people: what changed or what was checked."""
    body = entry.body
    if entry.kind == ACTIVATION:
        signed = f", signed by {body['signed_by']}" if body.get("signed_by") else ", unsigned"
        previous = body.get("previous_revision") or "none"
        return (
            f"{body.get('role', 'champion')} revision {body.get('revision')} "
            f"(was {previous}) from {body.get('source')}{signed}; "
            f"manifest {str(body.get('manifest_sha256') or '')[:16]}"
        )
    if entry.kind == "config_load":
        return f"config {str(body.get('config_sha256', ''))[:16]} from {body.get('source') or '-'}"
    if entry.kind == "eval_run":
        return (
            f"eval {body.get('suite')} ({str(body.get('suite_sha256', ''))[:16]}) on revision "
            f"{body.get('bundle_revision')}: {body.get('passed')} passed, "
            f"{body.get('failed')} failed: {body.get('result')}"
        )
    return (
        f"replay of revision {body.get('bundle_revision')}: {body.get('changed')} of "
        f"{body.get('replayed')} decisions change: {body.get('result')}"
    )
