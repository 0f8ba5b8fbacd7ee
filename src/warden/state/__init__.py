"""Shared, durable state: budget counters, reservations, kill switches, approvals, call links.

Repository interfaces per domain (:mod:`warden.state.repos`), implemented on
SQLite (the embedded default) and PostgreSQL (fleets of sidecars); open the
configured one with :func:`warden.state.backend.open_state`.
"""

from warden.state.records import Counter, Hold, KillSwitchRow, ReserveResult
from warden.state.repos import BudgetRepo, Change, ChangeFeed, KillSwitchRepo
from warden.state.sqlite import StateStore

__all__ = [
    "BudgetRepo",
    "Change",
    "ChangeFeed",
    "Counter",
    "Hold",
    "KillSwitchRepo",
    "KillSwitchRow",
    "ReserveResult",
    "StateStore",
]
