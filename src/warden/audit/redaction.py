"""Which fields every record of an action hides, whoever decided the action.

A policy names the fields to hide in its ``redact`` obligation. Records of an
action (its decision, the approval shown to people, the approved decision,
the outcome) all take that list from the decision, so the list must be
there however the decision was made. :func:`resolve` completes a decision's
redactions before it is recorded:

* the policy decided (``guard`` ``policy``, or ``approval``, which follows a
  policy's hold): its own list stands;
* the policy could not see or answer the action (``validation``: arguments
  that are not a JSON object or an input the engine cannot take;
  ``fallback``: it failed or timed out): nothing can say which fields are
  personal, so :data:`REDACT_ALL`;
* another stage decided first (a kill switch, a budget cap, the default):
  the policy is asked for its redactions anyway (obligations only, its
  effect is ignored); if it cannot answer, :data:`REDACT_ALL`.

With :data:`REDACT_ALL` the record keeps no plaintext arguments, answers or
tool result: only their SHA-256 and the argument names (see
:func:`warden.audit.record.action_body`). Fail closed: an unknown list never
means "hide nothing".
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable

from warden.model import Decision

__all__ = ["POLICY_GUARDS", "REDACT_ALL", "UNANSWERED_GUARDS", "resolve"]

log = logging.getLogger("warden.audit")

REDACT_ALL: tuple[str, ...] = ("arguments", "input_responses", "result")
"""The redactions of an action whose list could not be obtained: every argument, every
answer of an MCP retry, and the result. Not the context: the deployment sets it
(``X-Warden-Context-*``), and the records are found by it (a case, a session)."""
POLICY_GUARDS = frozenset({"policy", "approval"})
"""Guards whose decisions carry the policy's own obligations."""
UNANSWERED_GUARDS = frozenset({"validation", "fallback"})
"""Guards that decide because the policy could not see or answer the action."""

Ask = Callable[[], Awaitable[tuple[str, ...] | None]]
"""Asks the policy for the action's redactions; ``None`` when it cannot answer."""


async def resolve(decision: Decision, ask: Ask | None) -> Decision:
    """``decision`` with the redactions every record of its action must apply."""
    if decision.guard in POLICY_GUARDS and decision.error is None:
        return decision
    found: tuple[str, ...] | None = None
    if decision.guard not in UNANSWERED_GUARDS and ask is not None:
        try:
            found = await ask()
        except Exception:
            log.exception("could not ask the policy which fields to redact; redacting all")
    paths = REDACT_ALL if found is None else found
    merged = tuple(dict.fromkeys((*decision.obligations.redact, *paths)))
    if merged == decision.obligations.redact:
        return decision
    return dataclasses.replace(
        decision, obligations=dataclasses.replace(decision.obligations, redact=merged)
    )
