"""Kill switches: the in-memory index, the guard, persistence, polling, records."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any, cast

import pytest
from prometheus_client import REGISTRY

from warden import killswitch
from warden.core import Governor
from warden.errors import AuditError
from warden.killswitch import KillSwitches, KillSwitchGuard, Scope
from warden.model import (
    Action,
    ActionKind,
    Agent,
    Decision,
    Effect,
    Mode,
    RequestMeta,
    Stage,
    new_id,
)
from warden.pipeline import AuditSink, GuardContext, Pipeline
from warden.state import StateStore
from warden.state.postgres import PgTarget
from warden.testing.memory_audit import MemoryAudit


class Audit:
    """A partial sink: kill switches only append events (passed as ``sink(audit)``)."""

    def __init__(self) -> None:
        self.records: list[tuple[str, Mapping[str, Any]]] = []

    async def append(self, kind: str, body: Mapping[str, Any]) -> None:
        self.records.append((kind, dict(body)))


def sink(audit: Audit) -> AuditSink:
    return cast("AuditSink", audit)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[StateStore]:
    s = await StateStore.open(f"sqlite:///{tmp_path}/state.db")
    yield s
    await s.close()


def action(
    agent: str = "bot", tool: str | None = "issue_refund", upstream: str = "openai"
) -> Action:
    return Action(
        action_id=new_id("act"),
        agent=Agent(agent),
        kind=ActionKind.TOOL_CALL if tool else ActionKind.LLM_CALL,
        protocol="openai.chat",
        stage=Stage.PROPOSED,
        request=RequestMeta("POST", upstream, "/v1/chat/completions"),
        tool=tool,
        arguments={} if tool else None,
    )


async def test_each_scope_stops_what_it_names(store: StateStore) -> None:
    switches = KillSwitches(store, sink(Audit()))
    await switches.start()
    try:
        assert switches.is_killed("bot", "openai", "issue_refund") is None
        tool = await switches.set(Scope.TOOL, "issue_refund", "double payouts", "alice")
        assert switches.is_killed("bot", "openai", "issue_refund") == tool
        assert switches.is_killed("bot", "openai", "search_kb") is None
        assert switches.is_killed("bot", "openai") is None
        agent = await switches.set(Scope.AGENT, "bot", "looping", "alice")
        assert switches.is_killed("bot", "anthropic") == agent
        upstream = await switches.set(Scope.UPSTREAM, "anthropic", "provider incident", "alice")
        assert switches.is_killed("other", "anthropic") == upstream
        everything = await switches.set(Scope.GLOBAL, "ignored", "incident 4711", "alice")
        assert everything.target == "*"
        assert switches.is_killed("other", "openai") == everything
        assert await switches.clear(everything.id, "bob") == everything
        assert switches.is_killed("other", "openai") is None
        assert await switches.clear(everything.id, "bob") is None
        assert [s.id for s in switches.active()] == [tool.id, agent.id, upstream.id]
        sample = REGISTRY.get_sample_value("warden_killswitches_active", {"scope": "agent"})
        assert sample == 1.0
    finally:
        await switches.close()


async def test_the_guard_denies_in_enforce_even_in_observe_mode(store: StateStore) -> None:
    switches = KillSwitches(store, None)
    guard = KillSwitchGuard(switches)
    ctx = GuardContext(mode=Mode.OBSERVE)
    assert await guard.check(action(), ctx) is None
    switch = await switches.set(Scope.AGENT, "bot", "looping", "alice")
    decision = await guard.check(action(), ctx)
    assert decision is not None
    assert decision.effect is Effect.DENY
    assert decision.enforced is Effect.DENY
    assert decision.guard == "kill_switch"
    assert switch.id in decision.reason
    assert "looping" in decision.reason


@pytest.mark.parametrize("said", [Effect.ALLOW, Effect.DENY], ids=["allowed", "observed-deny"])
async def test_a_switch_thrown_while_the_policy_decides_has_the_last_word(
    store: StateStore, said: Effect
) -> None:
    # A decision waits for a policy worker (3,000 calls queued in a flood): the switch
    # checked first said nothing, the one thrown meanwhile must still stop the call.
    switches = KillSwitches(store, None)
    deciding, thrown = asyncio.Event(), asyncio.Event()

    class SlowPolicy:
        name = "policy"

        async def check(self, action: Action, ctx: GuardContext) -> Decision | None:
            deciding.set()
            await thrown.wait()
            # A denial in observe mode is enforced as an allow: the switch must still stop it.
            mode = Mode.ENFORCE if said is Effect.ALLOW else Mode.OBSERVE
            return Decision(new_id("dec"), said, ("fine",), mode, guard="policy")

    audit = MemoryAudit()
    pipeline = Pipeline(
        [KillSwitchGuard(switches), SlowPolicy()],
        audit,
        mode_for=lambda _a: Mode.ENFORCE,
        risk_of=lambda _t: "write",
    )
    decided = asyncio.ensure_future(pipeline.decide(action()))
    await deciding.wait()
    await switches.set(Scope.AGENT, "bot", "looping", "alice")
    thrown.set()
    decision = await decided
    assert (decision.enforced, decision.guard) == (Effect.DENY, "kill_switch")
    assert [d.guard for _, d in audit.decisions] == ["kill_switch"]


async def test_a_switch_thrown_while_the_decision_is_written_stops_the_action(
    store: StateStore,
) -> None:
    # The allow is being made durable (its fdatasync) when the switch lands: the door
    # must not act on it.
    switches = KillSwitches(store, None)
    writing, thrown = asyncio.Event(), asyncio.Event()

    class SlowDisk(MemoryAudit):
        async def record_decision(
            self, action: Action, decision: Decision, *, approval: Any = None
        ) -> None:
            await super().record_decision(action, decision, approval=approval)
            if decision.guard != "kill_switch":
                writing.set()
                await thrown.wait()

    class Allow:
        name = "policy"

        async def check(self, action: Action, ctx: GuardContext) -> Decision | None:
            return Decision(new_id("dec"), Effect.ALLOW, ("fine",), Mode.ENFORCE, guard="policy")

    audit = SlowDisk()
    pipeline = Pipeline(
        [KillSwitchGuard(switches), Allow()],
        audit,
        mode_for=lambda _a: Mode.ENFORCE,
        risk_of=lambda _t: "write",
    )
    core = Governor(pipeline)
    decided = asyncio.ensure_future(core.decide(action()))
    await writing.wait()
    await switches.set(Scope.AGENT, "bot", "looping", "alice")
    thrown.set()
    decision = await decided
    assert (decision.enforced, decision.guard) == (Effect.DENY, "kill_switch")
    assert [d.guard for _, d in audit.decisions] == ["policy", "kill_switch"]
    (killed,) = audit.outcomes
    assert killed.outcome.error == "killed"  # the allowed one never acted: nothing held


async def test_switches_are_recorded_with_who_and_why(store: StateStore) -> None:
    audit = Audit()
    switches = KillSwitches(store, sink(audit))
    switch = await switches.set(Scope.AGENT, "bot", "looping", "alice")
    await switches.clear(switch.id, "bob", "fixed")
    assert audit.records == [
        (
            "killswitch",
            {
                "id": switch.id,
                "action": "set",
                "scope": "agent",
                "target": "bot",
                "who": "alice",
                "why": "looping",
            },
        ),
        (
            "killswitch",
            {
                "id": switch.id,
                "action": "cleared",
                "scope": "agent",
                "target": "bot",
                "who": "bob",
                "why": "fixed",
            },
        ),
    ]


class FailingAudit(Audit):
    async def append(self, kind: str, body: Mapping[str, Any]) -> None:
        raise AuditError("disk full")


async def test_a_switch_whose_record_fails_still_tells_its_listeners(store: StateStore) -> None:
    # The switch holds though its record failed: a grant must not outlive it either.
    switches = KillSwitches(store, sink(FailingAudit()))
    told: list[str] = []

    async def listener(switch: Any) -> None:
        told.append(switch.target)

    switches.on_set(listener)
    with pytest.raises(AuditError):
        await switches.set(Scope.AGENT, "bot", "looping", "alice")
    assert told == ["bot"]
    assert switches.is_killed("bot", "openai", "issue_refund") is not None


async def test_a_clearing_the_store_refuses_is_recorded_as_failed(store: StateStore) -> None:
    # Recorded as cleared first (never lifted without a record); when the store then
    # fails, the switch still holds and the log must say the clearing failed.
    audit = Audit()
    switches = KillSwitches(store, sink(audit))
    switch = await switches.set(Scope.AGENT, "bot", "looping", "alice")

    async def refuse(*_: Any) -> None:
        raise OSError("database is locked")

    store.clear_killswitch = refuse  # type: ignore[method-assign,assignment]
    with pytest.raises(OSError, match="locked"):
        await switches.clear(switch.id, "bob", "fixed")
    assert [(body["action"], body["who"]) for _, body in audit.records] == [
        ("set", "alice"),
        ("cleared", "bob"),
        ("clear_failed", "bob"),
    ]
    assert switches.is_killed("bot", "openai", "issue_refund") is not None


@pytest.mark.parametrize("target", ["bot ", " bot", "b ot", "bot\n", "bot\u200b", "bot\x00"])
async def test_a_target_no_name_can_match_is_refused(store: StateStore, target: str) -> None:
    # Set, listed and recorded, "bot " would stop nothing: agent ids hold no spaces,
    # and no name control or invisible characters.
    switches = KillSwitches(store, sink(Audit()))
    with pytest.raises(ValueError, match="stop nothing"):
        await switches.set(Scope.AGENT, target, "looping", "alice")
    assert switches.active() == ()


async def test_a_tool_named_with_a_space_can_be_switched_off(store: StateStore) -> None:
    # An HTTP route rule or an MCP server may name a tool "Issue Refund".
    switches = KillSwitches(store, sink(Audit()))
    await switches.set(Scope.TOOL, "Issue Refund", "paying twice", "alice")
    assert switches.is_killed("bot", "refunds", "Issue Refund") is not None
    with pytest.raises(ValueError, match="stop nothing"):
        await switches.set(Scope.TOOL, "Issue Refund ", "paying twice", "alice")


async def test_switches_survive_a_restart(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/state.db"
    store = await StateStore.open(url)
    switch = await KillSwitches(store, None).set(Scope.GLOBAL, "", "incident", "alice")
    await store.close()
    store = await StateStore.open(url)
    try:
        switches = KillSwitches(store, None)
        await switches.start()
        assert switches.is_killed("anyone") == switch
        await switches.close()
    finally:
        await store.close()


async def test_a_switch_thrown_by_another_sidecar_holds_within_a_second(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/state.db"
    here_store, there_store = await StateStore.open(url), await StateStore.open(url)
    here = KillSwitches(here_store, None, poll_interval_s=0.1)
    there = KillSwitches(there_store, None, poll_interval_s=0.1)
    await here.start()
    await there.start()
    try:
        switch = await there.set(Scope.AGENT, "bot", "looping", "alice")
        async with asyncio.timeout(1):
            while here.is_killed("bot") is None:
                await here.wait_changed()
        assert here.is_killed("bot") == switch
        await there.clear(switch.id, "bob")
        async with asyncio.timeout(1):
            while here.is_killed("bot") is not None:
                await here.wait_changed()
        # Clearing on one sidecar a switch the other set works too.
        again = await there.set(Scope.TOOL, "issue_refund", "again", "alice")
        async with asyncio.timeout(1):
            while here.is_killed("bot", tool="issue_refund") is None:
                await here.wait_changed()
        assert await here.clear(again.id, "bob") is not None
    finally:
        await here.close()
        await there.close()
        await here_store.close()
        await there_store.close()


class DeafStore:
    """A state store whose reads of the switches never come back (a connection the
    network dropped without a reset), once ``deaf`` is set."""

    def __init__(self, store: StateStore) -> None:
        self.store = store
        self.deaf = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    async def active_killswitches(self) -> Any:
        if self.deaf:
            await asyncio.Event().wait()
        return await self.store.active_killswitches()


class SlowReadStore:
    """A state store whose next read of the switches takes its snapshot at once and
    returns it only when ``release`` is set: a re-read a local change overtakes."""

    def __init__(self, store: StateStore) -> None:
        self.store = store
        self.reading = asyncio.Event()
        self.release = asyncio.Event()
        self.slow = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    async def active_killswitches(self) -> Any:
        rows = await self.store.active_killswitches()
        if self.slow:
            self.slow = False
            self.reading.set()
            await self.release.wait()
        return rows


async def test_a_re_read_older_than_a_switch_thrown_here_does_not_lift_it(
    store: StateStore,
) -> None:
    """A re-read in flight when a switch is thrown here comes back without it: it is
    read again, not installed (the switch would be lifted until the next read)."""
    slow = SlowReadStore(store)
    switches = KillSwitches(cast("Any", slow), None)
    slow.slow = True
    stale = asyncio.create_task(switches.refresh())
    await slow.reading.wait()
    switch = await switches.set(Scope.AGENT, "bot", "looping", "alice")
    assert switches.is_killed("bot") == switch
    slow.release.set()
    await stale
    assert switches.is_killed("bot") == switch
    # A clear overtaking a read is not undone either.
    slow.slow, slow.release = True, asyncio.Event()
    stale = asyncio.create_task(switches.refresh())
    await slow.reading.wait()
    assert await switches.clear(switch.id, "bob") is not None
    slow.release.set()
    await stale
    assert switches.is_killed("bot") is None


async def test_a_store_that_stops_answering_does_not_hold_the_loop_and_is_seen(
    store: StateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(killswitch, "READ_TIMEOUT_S", 0.05)
    monkeypatch.setattr(killswitch, "STALE_AFTER_S", 0.3)
    deaf = DeafStore(store)
    switches = KillSwitches(cast("Any", deaf), None, poll_interval_s=0.05)
    await switches.start()
    try:
        assert not switches.stale()
        deaf.deaf = True
        # Each re-read gives up in time, so the loop goes on trying, and says how long
        # the switches went unread (readiness reports the state store down then) ...
        async with asyncio.timeout(2):
            while not switches.stale():  # noqa: ASYNC110 - bounded by the timeout
                await asyncio.sleep(0.02)
        assert switches.unread_for() > 0.3
        # ... and once the store answers again, a switch thrown meanwhile is read.
        thrown = await KillSwitches(store, None).set(Scope.AGENT, "bot", "meanwhile", "alice")
        deaf.deaf = False
        async with asyncio.timeout(2):
            while switches.is_killed("bot") is None:  # noqa: ASYNC110 - bounded by the timeout
                await asyncio.sleep(0.02)
        assert switches.is_killed("bot") == thrown
        assert not switches.stale()
    finally:
        await switches.close()


def test_connections_to_postgresql_find_a_silent_drop_in_seconds() -> None:
    kwargs = PgTarget("postgresql://warden@db.example/warden", None, 5.0).kwargs()
    assert kwargs["keepalives"] == 1
    assert (
        kwargs["keepalives_idle"] + kwargs["keepalives_interval"] * kwargs["keepalives_count"] <= 30
    )
    assert kwargs["tcp_user_timeout"] <= 30_000
