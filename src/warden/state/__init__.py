"""Shared, durable state: budget counters, reservations and kill switches."""

from warden.state.sqlite import Counter, Hold, KillSwitchRow, ReserveResult, StateStore

__all__ = ["Counter", "Hold", "KillSwitchRow", "ReserveResult", "StateStore"]
