"""Human approval of high-impact actions: hold or defer, decide, grant once.

See :mod:`warden.approvals.service` and docs/approvals.md.
"""

from warden.approvals.model import (
    AlreadyVoted,
    Approval,
    ApprovalConflict,
    ApprovalError,
    ApprovalForbidden,
    ApprovalNotFound,
    ApprovalSettings,
    ApprovalStatus,
    NotAnApprover,
    SelfApproval,
    Vote,
)
from warden.approvals.service import Approvals

__all__ = [
    "AlreadyVoted",
    "Approval",
    "ApprovalConflict",
    "ApprovalError",
    "ApprovalForbidden",
    "ApprovalNotFound",
    "ApprovalSettings",
    "ApprovalStatus",
    "Approvals",
    "NotAnApprover",
    "SelfApproval",
    "Vote",
]
