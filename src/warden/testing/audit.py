"""Helpers for testing code that writes or checks the audit log.

Sample actions and decisions, a quick way to fill a log, and segment surgery
(read every frame, write them back changed) to simulate tampering and damage.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from warden.audit.log import AuditLog
from warden.audit.merkle import CompactRange, leaf_hash
from warden.audit.segments import (
    MAGIC,
    FrameScanner,
    TreeState,
    frame,
    list_segments,
    parse_header,
    segment_name,
)
from warden.model import (
    Action,
    ActionKind,
    Agent,
    Decision,
    Effect,
    Mode,
    Obligations,
    Outcome,
    RequestMeta,
    Stage,
    Usage,
    new_id,
)

__all__ = [
    "Segment",
    "fill",
    "read_segments",
    "rechain",
    "reencode",
    "rewrite",
    "sample_action",
    "sample_decision",
]


def sample_action(
    i: int = 0,
    *,
    agent: str = "support-triage",
    tool: str | None = "issue_refund",
    customer: str | None = None,
    arguments: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> Action:
    """A tool-call action as an OpenAI chat request would produce it."""
    context: dict[str, Any] = {"session_id": f"sess-{i}"}
    if customer is not None:
        context["customer_id"] = customer
    return Action(
        action_id=new_id("act"),
        agent=Agent(agent, "2026-11-20"),
        kind=ActionKind.TOOL_CALL,
        protocol="openai.chat",
        stage=Stage.PROPOSED,
        request=RequestMeta("POST", "openai", "/v1/chat/completions", headers or {}),
        tool=tool,
        arguments=arguments
        if arguments is not None
        else {"order_id": f"A-{i}", "amount": 250, "currency": "USD"},
        call_id=f"call_{i}",
        model="gpt-4o",
        context=context,
    )


def sample_decision(
    effect: Effect = Effect.ALLOW,
    *,
    reasons: tuple[str, ...] = ("within the refund limit",),
    redact: tuple[str, ...] = (),
    mode: Mode = Mode.ENFORCE,
) -> Decision:
    """A policy decision."""
    return Decision(
        decision_id=new_id("dec"),
        effect=effect,
        reasons=reasons,
        mode=mode,
        guard="policy",
        bundle_revision="rev-1",
        obligations=Obligations(redact=redact),
    )


async def fill(log: AuditLog, count: int, *, customer: str | None = None) -> None:
    """Record ``count`` decisions and outcomes alternately (``count`` records in all)."""
    for i in range(count):
        action = sample_action(i, customer=customer)
        if i % 2 == 0:
            effect = (Effect.ALLOW, Effect.DENY, Effect.REQUIRE_APPROVAL)[(i // 2) % 3]
            await log.record_decision(action, sample_decision(effect))
        else:
            outcome = Outcome(status=200, latency_ms=20.0, usage=Usage(10, 5), result='{"ok":1}')
            await log.record_outcome(action, f"dec_{i}", outcome)


@dataclass(slots=True)
class Segment:
    """One segment file taken apart: the bytes before the first record, and each record."""

    path: Path
    head: bytes
    records: list[bytes]

    def write(self) -> None:
        """Write the segment back, framing every record afresh (valid CRCs)."""
        self.path.write_bytes(self.head + b"".join(frame(r) for r in self.records))


def read_segments(root: Path) -> list[Segment]:
    """Every segment of the log in ``root``, taken apart."""
    out = []
    for path in list_segments(root / "segments"):
        data = path.read_bytes()
        parsed = parse_header(data)
        assert parsed is not None, f"{path} has no valid header"
        records = [payload for _, payload in FrameScanner(data, parsed[1])]
        out.append(Segment(path, data[: parsed[1]], records))
    return out


def reencode(record: bytes, **changes: Any) -> bytes:
    """A record's bytes with some top-level fields changed, encoded as Warden does."""
    value = orjson.loads(record)
    value.update(changes)
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def rewrite(root: Path, records: Sequence[bytes], per_segment: int) -> None:
    """Replace the whole log with ``records``, headers and frames all made valid.

    What a forger with write access could do; only signed checkpoints kept
    elsewhere (or in the log, if the key is safe) can catch it.
    """
    for old in list_segments(root / "segments"):
        old.unlink()
    compact = CompactRange()
    last = bytes(32)
    for start in range(0, len(records), per_segment):
        state = TreeState(compact.size, last, compact.hashes)
        chunk = records[start : start + per_segment]
        head = MAGIC + frame(orjson.dumps(state.header()))
        path = root / "segments" / segment_name(start)
        path.write_bytes(head + b"".join(frame(r) for r in chunk))
        for record in chunk:
            last = leaf_hash(record)
            compact.append(last)


def rechain(records: Sequence[bytes], prev: str) -> list[bytes]:
    """Records with their ``prev`` hashes recomputed from ``prev`` on: a forger's rewrite."""
    out = []
    for record in records:
        fixed = reencode(record, prev=prev)
        out.append(fixed)
        prev = leaf_hash(fixed).hex()
    return out
