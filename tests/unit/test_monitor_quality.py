"""Quality figures, baselines and the record-to-event reading, on generated records."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from warden.audit import AuditLog
from warden.audit.segments import list_segments
from warden.config import AuditConfig
from warden.monitor import drift, quality
from warden.monitor.baseline import load_baseline, save_baseline
from warden.monitor.events import ApprovalEvent, DecisionEvent, OutcomeEvent, collect
from warden.monitor.live import first_seq_since
from warden.monitor.quality import p95
from warden.monitor.windows import Window, parse_duration, parse_instant
from warden.testing.audit import sample_action, sample_decision


def decision(
    i: int, effect: str, *, conv: str | None = None, guard: str = "policy"
) -> dict[str, Any]:
    return {
        "kind": "decision",
        "time": f"2026-11-30T10:00:{i:02d}.000000Z",
        "agent": {"id": "bot", "version": "v1"},
        "action": {
            "id": f"act_{i}",
            "kind": "tool_call",
            "tool": "issue_refund",
            "arguments": {"amount": 10 * i, "flag": True, "note": "x"},
            "context": {"session_id": conv} if conv else {},
        },
        "decision": {"id": f"dec_{i}", "effect": effect, "guard": guard, "elapsed_us": 1000 * i},
    }


def outcome(
    i: int,
    *,
    stage: str,
    failed: bool = False,
    cost: float | None = None,
    reported_by: str | None = None,
) -> dict[str, Any]:
    said = {"reported_by": reported_by} if reported_by else {}
    return {
        "kind": "outcome",
        "time": f"2026-11-30T10:01:{i:02d}.000000Z",
        "agent": {"id": "bot", "version": "v1"},
        "action": {"id": f"act_{i}", "kind": "tool_call", "tool": "issue_refund", "stage": stage},
        "decision_id": f"dec_{i}",
        "outcome": {"status": 500 if failed else 200, "cost": cost, "latency_ms": 5.0, **said},
    }


def approval(kind: str, i: int, verdict: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"approval_id": f"apr_{i}", "decision_id": f"dec_{i}"}
    if verdict is not None:
        body["verdict"] = verdict
    return {"kind": kind, "time": "2026-11-30T10:02:00.000000Z", "body": body}


def test_every_quality_figure_from_records() -> None:
    records = [
        decision(1, "allow", conv="c1"),
        decision(2, "deny", conv="c1"),
        decision(3, "require_approval", conv="c2"),
        decision(4, "require_approval"),
        decision(3, "allow", guard="approval"),  # the approval's follow-up: not counted again
        approval("approval_decided", 3, "approved"),
        approval("approval_decided", 4, "approved"),
        approval("approval_decided", 4, "rejected"),  # the last verdict stands
        outcome(1, stage="executed"),
        outcome(3, stage="executed", failed=True),
        outcome(1, stage="proposed", failed=True),  # the agent's own report: not trusted
        # gRPC ReportOutcome on an executed action: a runner's report is trusted, the
        # agent's own is its word.
        outcome(2, stage="executed", failed=True, reported_by="agent"),
        outcome(4, stage="executed", reported_by="runner"),
        outcome(2, stage="proposed", cost=0.3),
        outcome(3, stage="proposed", cost=0.1),
        outcome(4, stage="proposed", cost=1.0),  # no conversation: in the total only
        {"kind": "kill_switch", "time": "2026-11-30T10:03:00Z", "body": {}},
    ]
    events = collect(records)
    assert len(events.decisions) == 5
    [every, v1] = quality.compute(events)
    assert every.version == drift.ALL_VERSIONS
    assert v1 == quality.Quality(
        agent="bot",
        version="v1",
        decisions=4,
        deny_rate=0.25,
        hold_rate=0.5,
        approvals=2,
        approval_rejection_rate=0.5,
        trusted_outcomes=3,
        tool_error_rate=pytest.approx(1 / 3),  # type: ignore[arg-type]
        conversations=2,
        cost_usd=pytest.approx(1.4),  # type: ignore[arg-type]
        cost_per_conversation_usd=pytest.approx(0.2),  # type: ignore[arg-type]
        added_latency_p95_ms=4.0,
    )
    assert v1.as_dict()["deny_rate"] == 0.25
    assert quality.compute(events, agent="nobody") == []


def test_events_keep_numbers_not_arguments() -> None:
    [event] = collect([decision(2, "allow")]).decisions
    assert isinstance(event, DecisionEvent)
    assert event.numbers == (("issue_refund.amount", 20.0),)  # booleans and text are not numbers
    assert event.ts == parse_instant("2026-11-30T10:00:02Z")
    assert isinstance(collect([outcome(1, stage="executed")]).outcomes[0], OutcomeEvent)
    assert collect([approval("approval_expired", 1)]).approvals == (
        ApprovalEvent(parse_instant("2026-11-30T10:02:00Z"), "apr_1", "dec_1", "expired"),
    )


def test_p95_is_the_nearest_rank() -> None:
    assert p95([]) is None
    assert p95([5.0]) == 5.0
    assert p95([float(v) for v in range(1, 101)]) == 95.0


@given(st.lists(st.floats(allow_nan=False), min_size=1, max_size=300))
def test_p95_is_the_sorted_values_nearest_rank(values: list[float]) -> None:
    ordered = sorted(values)
    assert p95(values) == ordered[math.ceil(0.95 * len(ordered)) - 1]


def test_a_baseline_round_trips_and_bad_files_are_refused(tmp_path: Path) -> None:
    events = collect([decision(i, "allow") for i in range(1, 40)]).decisions
    profiles = drift.profiles(events)
    path = tmp_path / "pins" / "baseline.json"
    save_baseline(path, profiles, Window(0, 86400), "audit")
    loaded = load_baseline(path)
    assert loaded.profiles == profiles
    assert loaded.window == Window(0, 86400)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a drift baseline"):
        load_baseline(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="cannot read"):
        load_baseline(tmp_path / "missing.json")


def test_durations() -> None:
    assert parse_duration("7d") == 7 * 86400
    assert parse_duration("30m") == 1800
    for bad in ("7", "0d", "-1d", "week"):
        with pytest.raises(ValueError, match="duration"):
            parse_duration(bad)
    with pytest.raises(ValueError, match="not a date"):
        parse_instant("yesterday")


async def test_the_live_reader_skips_segments_older_than_its_windows(tmp_path: Path) -> None:
    log = await AuditLog.open(AuditConfig(dir=str(tmp_path), segment_max_bytes=4096))
    try:
        for i in range(40):
            await log.record_decision(sample_action(i), sample_decision())
    finally:
        await log.close()
    segments = list_segments(tmp_path / "segments")
    assert len(segments) > 2
    assert first_seq_since(tmp_path, 0.0) == 0  # everything may be in the windows
    # Nothing written after now: only the last segment needs reading.
    assert first_seq_since(tmp_path, time.time() + 60) == int(segments[-1].stem)
