"""LiveMonitor reads new records a little at a time, between its recomputes."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import time
from pathlib import Path
from typing import Any

from prometheus_client import REGISTRY

from warden.audit import AuditLog
from warden.config import AuditConfig, MonitorConfig
from warden.monitor import drift, events, live, quality
from warden.monitor.events import ApprovalEvent, DecisionEvent, Events, OutcomeEvent
from warden.monitor.live import LiveMonitor
from warden.monitor.psi import Level
from warden.monitor.windows import recent
from warden.testing.audit import fill, sample_action, sample_decision


async def test_records_are_read_between_recomputes(tmp_path: Path) -> None:
    log = await AuditLog.open(AuditConfig(dir=str(tmp_path), checkpoint_interval_s=3600))
    monitor = LiveMonitor(MonitorConfig(interval_s=3600), tmp_path)
    try:
        monitor.start(lambda: log.size)
        for _ in range(200):  # the first recompute is done
            if monitor.last is not None:
                break
            await asyncio.sleep(0.01)
        assert monitor.last is not None
        first = monitor.last
        for i in range(3 * live._YIELD_EVERY + 5):  # several read batches
            await log.record_decision(sample_action(i), sample_decision())
        for _ in range(500):  # read within about READ_EVERY_S, long before the next recompute
            if len(monitor._decisions) == 3 * live._YIELD_EVERY + 5:
                break
            await asyncio.sleep(0.01)
        assert len(monitor._decisions) == 3 * live._YIELD_EVERY + 5
        assert monitor.last is first  # not recomputed: only read
        # A recompute asked for meanwhile waits its turn and sees every record.
        snapshot = await monitor.refresh()
        assert sum(q.decisions for q in snapshot.quality if q.version == "*") == len(
            monitor._decisions
        )
    finally:
        await monitor.close()
        await log.close()


async def _events_of(monitor: LiveMonitor, log: AuditLog) -> tuple[list[Any], ...]:
    monitor.start(lambda: log.size)
    await monitor.refresh()  # reads whatever is durable, then recomputes
    await monitor.close()
    return (
        [DecisionEvent(*row) for row in monitor._decisions],
        [OutcomeEvent(*row) for row in monitor._outcomes],
        [ApprovalEvent(*row) for row in monitor._approvals],
    )


async def _approval(log: AuditLog, verdict: str) -> None:
    body = {"approval_id": "apr_1", "decision_id": "dec_1", "verdict": verdict}
    await log.append("approval_decided", body)


async def test_fed_records_make_the_same_events_as_records_read_back(tmp_path: Path) -> None:
    log = await AuditLog.open(AuditConfig(dir=str(tmp_path), checkpoint_interval_s=3600))
    try:
        await fill(log, 6, customer="C-1")  # before the feed: read from the log
        fed = LiveMonitor(MonitorConfig(interval_s=3600), tmp_path)
        log.follow(fed.feed)
        first_fed = log.size
        # Personal fields sealed for their subject, outcomes and verdicts: every kind it uses.
        await fill(log, 40, customer="C-2")
        await fill(log, 10)
        await _approval(log, "approved")
        await _approval(log, "rejected")
        await asyncio.sleep(0)  # followers run after the appenders they released
        assert fed._tail is None
        assert len(fed._fed) > 0

        got = await _events_of(fed, log)
        expected = await _events_of(LiveMonitor(MonitorConfig(interval_s=3600), tmp_path), log)
        assert got == expected
        assert [len(events) for events in got] == [28, 28, 2]
        assert {e.numbers for e in got[0]} == {(("issue_refund.amount", 250.0),)}  # unsealed
        # The log was read back only up to where the feed began.
        assert fed._tail is not None
        assert fed._tail.position == first_fed
    finally:
        await log.close()


async def test_batches_dropped_from_a_full_feed_are_read_back(tmp_path: Path) -> None:
    log = await AuditLog.open(AuditConfig(dir=str(tmp_path), checkpoint_interval_s=3600))
    try:
        config = MonitorConfig(interval_s=3600, max_events=1000)
        fed = LiveMonitor(config, tmp_path)
        log.follow(fed.feed)
        for i in range(1010):  # one record per batch: the 10 oldest batches fall out
            await log.record_decision(sample_action(i), sample_decision())
        await asyncio.sleep(0)  # followers run after the appenders they released
        assert len(fed._fed) == 1000
        assert fed._fed[0][0] == 10

        got = await _events_of(fed, log)
        assert got == await _events_of(LiveMonitor(config, tmp_path), log)
        assert len(got[0]) == 1000  # the events' own bound
        assert fed._tail is not None
        assert fed._tail.position == 10
    finally:
        await log.close()


async def test_a_closed_monitor_keeps_no_batches(tmp_path: Path) -> None:
    log = await AuditLog.open(AuditConfig(dir=str(tmp_path), checkpoint_interval_s=3600))
    try:
        monitor = LiveMonitor(MonitorConfig(interval_s=3600), tmp_path)
        log.follow(monitor.feed)
        await log.record_decision(sample_action(1), sample_decision())
        await asyncio.sleep(0)  # followers run after the appenders they released
        assert len(monitor._fed) == 1
        await monitor.close()
        await log.record_decision(sample_action(2), sample_decision())
        await asyncio.sleep(0)
        assert len(monitor._fed) == 0  # still followed, but nothing is kept
    finally:
        await log.close()


async def test_kept_events_are_not_walked_by_the_garbage_collector(tmp_path: Path) -> None:
    # A busy sidecar keeps up to max_events of each kind; tracked objects made each
    # full collection walk them all (about 230 ms for 500,000 decisions and outcomes).
    log = await AuditLog.open(AuditConfig(dir=str(tmp_path), checkpoint_interval_s=3600))
    now = [0.0]
    try:
        # A one-second current window: what was written a second earlier is the reference.
        config = MonitorConfig(interval_s=3600, current="1s", reference="1h", min_samples=1)
        monitor = LiveMonitor(config, tmp_path, clock=lambda: now[0])
        log.follow(monitor.feed)
        await fill(log, 12, customer="C-1")
        await _approval(log, "rejected")
        await asyncio.sleep(1.1)
        await fill(log, 16)
        await _approval(log, "approved")
        await asyncio.sleep(0)  # the last batch reaches the monitor after its appender
        now[0] = time.time() + 0.01
        decisions, outcomes, approvals = await _events_of(monitor, log)
        # The collector stops tracking a plain tuple when a pass finds it holds nothing
        # tracked; a row holds a tuple of tuples (its numbers): at worst a pass a level.
        for _ in range(3):
            gc.collect()
        kept = [*monitor._decisions, *monitor._outcomes, *monitor._approvals]
        assert len(kept) == len(decisions) + len(outcomes) + len(approvals) > 20
        assert [row for row in kept if gc.is_tracked(row)] == []
        # The figures from the rows are the figures of the events, both windows used.
        snapshot = await monitor.refresh()
        current = recent(now[0], 1.0)
        events = Events(tuple(decisions), tuple(outcomes), tuple(approvals)).within(current)
        earlier = [d for d in decisions if d.ts < current.start]
        assert earlier  # both windows hold decisions
        assert events.decisions
        assert list(snapshot.quality) == quality.compute(events)
        assert list(snapshot.drift) == drift.compute(earlier, events.decisions, min_samples=1)
        assert any(
            d.level is not Level.INSUFFICIENT for r in snapshot.drift for d in r.distributions
        )
    finally:
        await log.close()


def test_row_positions_are_the_event_fields_positions() -> None:
    positions = {
        DecisionEvent: {"ts": events.TS, "agent": events.D_AGENT, "version": events.D_VERSION}
        | {"decision_id": events.D_DECISION_ID, "kind": events.D_KIND, "tool": events.D_TOOL}
        | {"effect": events.D_EFFECT, "elapsed_us": events.D_ELAPSED_US}
        | {"numbers": events.D_NUMBERS, "conversation": events.D_CONVERSATION}
        | {"first": events.D_FIRST},
        OutcomeEvent: {"ts": events.TS, "agent": events.O_AGENT, "version": events.O_VERSION}
        | {"decision_id": events.O_DECISION_ID, "kind": events.O_KIND}
        | {"stage": events.O_STAGE, "failed": events.O_FAILED, "cost": events.O_COST},
        ApprovalEvent: {"ts": events.TS, "approval_id": events.A_APPROVAL_ID}
        | {"decision_id": events.A_DECISION_ID, "verdict": events.A_VERDICT},
    }
    for kind, named in positions.items():
        names = [f.name for f in dataclasses.fields(kind)]
        assert {name: names.index(name) for name in named} == named
    event = DecisionEvent(1.0, "a", "v", "act", "dec", "tool_call", "t", "allow", "policy", 5)
    assert event.row() == dataclasses.astuple(event)
    assert DecisionEvent(*event.row()) == event


async def test_an_agents_stated_versions_fold_past_the_bound_and_spare_another_agents(
    tmp_path: Path,
) -> None:
    # An agent states its own version when the config pins none: each one was a group
    # every round computed and gauged, and a shared label budget (500) let one agent's
    # flood push another's canary into "_other".
    log = await AuditLog.open(AuditConfig(dir=str(tmp_path), checkpoint_interval_s=3600))
    monitor = LiveMonitor(MonitorConfig(interval_s=3600), tmp_path)
    try:
        for i in range(live.MAX_VERSIONS + 40):
            flood = dataclasses.replace(sample_action(i, agent="noisy-bot"))
            flood = dataclasses.replace(
                flood, agent=dataclasses.replace(flood.agent, version=f"v{i}")
            )
            await log.record_decision(flood, sample_decision())
        canary = sample_action(agent="refunds-bot")
        canary = dataclasses.replace(
            canary, agent=dataclasses.replace(canary.agent, version="canary")
        )
        await log.record_decision(canary, sample_decision())
        monitor.start(lambda: log.size)
        snapshot = await monitor.refresh()
        noisy = {q.version for q in snapshot.quality if q.agent == "noisy-bot"} - {"*"}
        assert len(noisy) == live.MAX_VERSIONS + 1
        assert "_other" in noisy
        assert {q.version for q in snapshot.quality if q.agent == "refunds-bot"} >= {"canary"}
        assert live._version_label("refunds-bot", "canary") == "canary"
    finally:
        await monitor.close()
        await log.close()


def test_long_tool_and_argument_names_give_no_number_distribution() -> None:
    # The agent's names: a 2 MiB one would be kept in up to max_events rows.
    assert events._numbers("t", {"a" * 200: 1, "b": 2}) == (("t.b", 2.0),)
    assert events._numbers("t" * 200, {"b": 2}) == ()


def test_a_long_tool_name_is_kept_short_in_a_row() -> None:
    # Rows are kept up to max_events: a tool name of a megabyte in each held the memory.
    long_name, other = "t" * 1_000_000, "t" * 999_999 + "u"
    rows = []
    for tool in (long_name, other):
        record = {
            "kind": "decision",
            "time": "2026-12-02T00:00:00+00:00",
            "agent": {"id": "bot", "version": "1"},
            "action": {
                "id": "act",
                "kind": "tool_call",
                "tool": tool,
                "arguments": {},
                "context": {"session_id": tool},  # a conversation id is the agent's too
            },
            "decision": {"id": "dec", "effect": "deny", "guard": "policy"},
        }
        found = events.row_of(record)
        assert found is not None
        assert found[0] == events.DECISION
        event = DecisionEvent(*found[1])
        rows.append(event.tool)
        assert event.conversation is not None
        assert len(event.conversation) < 100
    assert all(isinstance(r, str) and len(r) < 100 for r in rows)
    assert rows[0] != rows[1]  # still told apart


def test_a_group_with_too_few_samples_reads_minus_one(tmp_path: Path) -> None:
    # Folded groups show their worst level; one alone with too few samples stays -1.
    monitor = LiveMonitor(MonitorConfig(interval_s=3600), tmp_path)
    starved = drift.DriftResult("starved-bot", "v1", ())
    monitor._set_gauges(live.Snapshot(0.0, [starved], []))
    labels = {"agent": "starved-bot", "version": "v1"}
    assert REGISTRY.get_sample_value("warden_drift_level", labels) == -1


def test_junk_numeric_arguments_do_not_push_a_known_one_out() -> None:
    """Past the 32 numbers kept per action, the arguments kept before win: 40 numeric
    arguments named to sort first (``a00``...) no longer hide ``amount`` from drift."""
    tool = "refund_junk_test"  # a tool of its own: the names kept are remembered process-wide
    assert events._numbers(tool, {"order_id": "A-1", "amount": 20}) == ((f"{tool}.amount", 20.0),)
    junk = {f"a{i:02d}": i for i in range(40)}
    kept = events._numbers(tool, {**junk, "amount": 900})
    assert len(kept) == 32
    assert (f"{tool}.amount", 900.0) in kept
    assert [k for k, _ in kept][:2] == [f"{tool}.a00", f"{tool}.a01"]  # argument order
    # The names kept now are known too; ones added later still rank after them.
    later = events._numbers(tool, {**{f"b{i:02d}": i for i in range(40)}, **junk, "amount": 5})
    assert {k for k, _ in later} == {f"{tool}.amount", *(f"{tool}.a{i:02d}" for i in range(31))}
