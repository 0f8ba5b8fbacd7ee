"""Prometheus metrics for the audit log, on the default registry."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

__all__ = ["ERASED_STATE", "ERASURES", "SUBJECT_KEYS", "SUBJECT_KEYS_REFUSED"]

SUBJECT_KEYS = Gauge(
    "warden_audit_subject_keys",
    "Data subject keys in the audit directory, as this process counts them.",
)
SUBJECT_KEYS_REFUSED = Counter(
    "warden_audit_subject_keys_refused_total",
    "Records whose personal fields were redacted, not sealed, by reason: "
    "full (audit.subjects.max_keys reached) or unusable (a subject value that is not text).",
    ["reason"],
)
ERASURES = Counter(
    "warden_audit_erasures_total",
    "Data subject erasures, by result: done (key and state store), or state_unavailable "
    "(the state store could not be reached; tried again at each checkpoint).",
    ["result"],
)
ERASED_STATE = Counter(
    "warden_audit_erased_state_total",
    "What erasures removed beyond the log, by what: call_links, approvals "
    "(arguments replaced), approvals_revoked (pending or unused, now rejected), session_chains.",
    ["what"],
)
