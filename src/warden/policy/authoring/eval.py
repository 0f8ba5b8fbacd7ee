"""``warden policy eval``: one evaluation on the production path, with timings."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from warden.policy.authoring.child import (
    DEFAULT_TEST_TIMEOUT_S,
    Child,
    Crash,
    init_doc,
    parse_output,
)
from warden.policy.authoring.policy_set import PolicySet
from warden.policy.authoring.tables import enforced

__all__ = ["EvalResult", "evaluate_input"]


@dataclass(frozen=True, slots=True)
class EvalResult:
    """One evaluation on the production path, with timings in microseconds."""

    result: Any
    undefined: bool
    error: str
    compile_ms: float
    first_us: float
    times_us: tuple[float, ...] = field(default_factory=tuple)
    printed: str = ""
    """What the policy's ``print()`` calls wrote during the first evaluation."""
    invalid: str = ""
    """Why the proxy would refuse this result of the decision query (it then denies the
    call as a policy error), or ``""``."""

    def to_json(self, *, query: str, revision: str) -> dict[str, Any]:
        """The document ``warden policy eval`` prints."""
        doc: dict[str, Any] = {"query": query, "revision": revision}
        if self.error:
            doc["error"] = self.error
        else:
            doc["result"] = None if self.undefined else self.result
            doc["undefined"] = self.undefined
        if self.invalid:
            doc["invalid"] = self.invalid
        timing: dict[str, Any] = {
            "compile_ms": round(self.compile_ms, 2),
            "first_us": round(self.first_us, 1),
        }
        if self.times_us:
            ordered = sorted(self.times_us)
            timing["runs"] = len(ordered)
            timing["p50_us"] = round(ordered[len(ordered) // 2], 1)
            timing["p99_us"] = round(ordered[min(len(ordered) - 1, (len(ordered) * 99) // 100)], 1)
            timing["min_us"] = round(ordered[0], 1)
        doc["timing"] = timing
        return doc


def evaluate_input(
    policy: PolicySet,
    doc: Any,
    *,
    query: str = "data.warden.decision",
    repeat: int = 0,
    timeout_s: float = DEFAULT_TEST_TIMEOUT_S,
    decision: bool = False,
) -> EvalResult:
    """Evaluate ``query`` for the input ``doc`` as the engine does, in a child process.

    ``repeat`` further evaluations of the same input measure the warm cost.
    ``decision``: ``query`` is the decision query, so its result is read as the
    proxy reads it, and :attr:`EvalResult.invalid` says if the proxy would refuse it.
    """
    with Child(init_doc(policy), timeout_s) as child:
        reply = child.request({"op": "decide", "query": query, "input": doc, "repeat": repeat})
    outcome = parse_output(reply, policy.production)
    if isinstance(reply, Crash):
        return EvalResult(None, False, outcome.error, 0.0, 0.0)
    times = tuple(t / 1000 for t in reply.get("times", ()))
    invalid = ""
    if decision and not outcome.error:
        facts = doc if isinstance(doc, Mapping) else {}
        invalid = enforced(str(reply["text"]), facts, policy.production).invalid
    return EvalResult(
        outcome.result,
        outcome.undefined,
        outcome.error,
        int(reply.get("compile_ns", 0)) / 1e6,
        int(reply.get("ns", 0)) / 1000,
        times,
        outcome.printed,
        invalid,
    )
