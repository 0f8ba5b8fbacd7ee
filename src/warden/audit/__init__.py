"""The tamper-evident audit log: hash chain, RFC 6962 tree, signed checkpoints.

Every decision, outcome and governance event becomes one record (schema v1,
docs/audit.md). Records are chained by hash, folded into a Merkle tree whose
heads are signed as C2SP checkpoints, and stored in append-only segment files
with group-committed fsyncs. ``warden audit verify|export|proof|erase`` work
on the directory offline.
"""

from warden.audit.log import AuditLog
from warden.audit.record import ApprovalEvidence, RecordRef, arguments_sha256
from warden.audit.subjects import keyed_digest

__all__ = ["ApprovalEvidence", "AuditLog", "RecordRef", "arguments_sha256", "keyed_digest"]
