"""Holds and clocks: a sibling's wall clock, or a step of this one, never ends a live hold.

A hold's time is counted by the process that keeps its request open, on its
monotonic clock; another sidecar defers it only once that process is gone,
judged from heartbeats timed on the observer's own monotonic clock. A
sibling whose wall clock runs ahead is played here by the approvals module
reading a clock that many seconds ahead (the owner's heartbeat was written
before, by the true clock); the same with real processes is in
``tests/functional/test_approval_clocks_functional.py``.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import orjson
import pytest

from tests.pg import state_config
from tests.unit.test_approvals_service import ALICE, SETTINGS, action, decision, records
from warden.approvals import Approvals, ApprovalStatus
from warden.approvals.gate import ApprovalGate
from warden.approvals.model import Approval, Vote
from warden.approvals.owner import Owner
from warden.approvals.store import ApprovalRepo, ApprovalStore, apply_vote, orphaned_holds
from warden.audit.log import AuditLog
from warden.audit.verify import iter_records
from warden.config import ApprovalsConfig, AuditConfig
from warden.model import Effect
from warden.state.backend import StateBackend, open_state

_REAL_TIME = time.time
REMOTE = Owner("own_remote", "other-boot/pid:[1]", 1, "12345")
"""An owner in another container or host: its pid cannot be checked from here."""


class Clock:
    """The ``time`` module as the approvals service reads it, ``ahead`` seconds off."""

    def __init__(self, ahead: float = 0.0) -> None:
        self.ahead = ahead

    def time(self) -> float:
        return _REAL_TIME() + self.ahead

    @staticmethod
    def monotonic() -> float:
        return time.monotonic()


Step = Callable[[], Awaitable[None]]


class Spy:
    """An approval repository as one sidecar uses it, watched: it counts the approvals
    its calls return, and runs another sidecar's step just before or after one of its
    calls (``before``/``after``, by method name, once; ``"*"``: the next call of any),
    or keeps calls waiting while this sidecar is stalled (``stalled``, by name)."""

    def __init__(self, inner: ApprovalRepo) -> None:
        self.inner = inner
        self.rows = 0
        self.calls: list[str] = []
        self.before: dict[str, Step] = {}
        self.after: dict[str, Step] = {}
        self.stalled: dict[str, asyncio.Event] = {}

    @property
    def repo(self) -> ApprovalRepo:
        return cast(ApprovalRepo, self)

    def __getattr__(self, name: str) -> Any:
        found = getattr(self.inner, name)
        if not inspect.iscoroutinefunction(found):
            return found

        async def call(*args: Any, **kwargs: Any) -> Any:
            if (resumed := self.stalled.get(name)) is not None:
                await resumed.wait()
            if (step := self.before.pop(name, None) or self.before.pop("*", None)) is not None:
                await step()
            result = await found(*args, **kwargs)
            self.calls.append(name)
            self.rows += _rows(result)
            if (step := self.after.pop(name, None) or self.after.pop("*", None)) is not None:
                await step()
            return result

        return call


def _rows(result: object) -> int:
    """How many approvals a repository call returned."""
    if isinstance(result, Approval):
        return 1
    if isinstance(result, list | tuple):
        return sum(_rows(r) for r in result)
    return 0


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr("warden.approvals.service.time", fake)
    return fake


@pytest.fixture
async def audit(tmp_path: Path) -> AsyncIterator[AuditLog]:
    log = await AuditLog.open(AuditConfig(dir=str(tmp_path / "audit")))
    yield log
    await log.close()


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[Callable[[], Awaitable[ApprovalRepo]]]:
    """Opens approval stores on one shared database, as the sidecars of a fleet do."""
    config = state_config(request, tmp_path)
    opened: list[StateBackend] = []

    async def one() -> ApprovalRepo:
        if request.param == "sqlite":
            return await ApprovalStore.open(config.url)
        opened.append(await open_state(config))
        return opened[-1].approvals

    yield one
    for backend in opened:
        await backend.close()


@pytest.mark.parametrize(
    ("ahead", "hold_s"),
    [
        (60.0, 120.0),  # ahead by more than orphan_after_s: the hold looked orphaned
        (25.0, 20.0),  # ahead by more than the hold time left: it looked expired
    ],
)
async def test_a_sibling_whose_clock_runs_ahead_leaves_a_live_hold_alone(
    store: Callable[[], Awaitable[ApprovalRepo]],
    audit: AuditLog,
    clock: Clock,
    ahead: float,
    hold_s: float,
) -> None:
    owner = await Approvals.open(await store(), audit, SETTINGS)
    try:
        held = await owner.request(action(), decision(hold_timeout_s=hold_s), mode="hold")
        waiter = asyncio.create_task(owner.wait(held.id, hold_s))
        clock.ahead = ahead
        sibling = await Approvals.open(await store(), audit, SETTINGS)
        try:
            assert await sibling.recover() == 0
            assert await sibling.expire_due() == 0
            found = await sibling.get(held.id)
            assert found is not None
            assert (found.mode, found.status) == ("hold", ApprovalStatus.PENDING)
            assert not waiter.done()
            # A person decides through the sibling: its clock is not the hold's either.
            approved = await sibling.decide(held.id, ALICE, True, "ok")
            assert approved.status is ApprovalStatus.APPROVED
        finally:
            await sibling.close()
        assert (await asyncio.wait_for(waiter, 5)).status is ApprovalStatus.APPROVED
        assert records(audit, "approval_deferred") == []
        assert records(audit, "approval_expired") == []
    finally:
        await owner.close()


async def test_a_step_of_the_wall_clock_does_not_end_a_hold(
    tmp_path: Path, audit: AuditLog, clock: Clock
) -> None:
    # An NTP step or a resumed VM: 130 s on the wall clock in an instant, 120 s hold.
    service = await Approvals.open(f"sqlite:///{tmp_path}/state.db", audit, SETTINGS)
    try:
        held = await service.request(action(), decision(), mode="hold")
        waiter = asyncio.create_task(service.wait(held.id, 120))
        clock.ahead = 130.0
        assert await service.expire_due() == 0
        assert await service.recover() == 0
        assert not waiter.done()
        await service.decide(held.id, ALICE, True, "ok")
        assert (await asyncio.wait_for(waiter, 5)).status is ApprovalStatus.APPROVED
        assert records(audit, "approval_expired") == []
    finally:
        await service.close()


async def test_a_hold_nobody_waits_on_ends_on_its_owners_monotonic_clock(
    tmp_path: Path, audit: AuditLog, clock: Clock
) -> None:
    service = await Approvals.open(f"sqlite:///{tmp_path}/state.db", audit, SETTINGS)
    try:
        held = await service.request(action(), decision(hold_timeout_s=0.05), mode="hold")
        # The wall clock stepped back an hour: the hold's time still runs out.
        clock.ahead = -3600.0
        await asyncio.sleep(0.1)
        assert await service.expire_due() == 1
        found = await service.get(held.id)
        assert found is not None
        assert found.status is ApprovalStatus.EXPIRED
    finally:
        await service.close()


@pytest.mark.parametrize("ahead", [3600.0, -3600.0])
async def test_a_remote_owner_that_stopped_is_recovered_whatever_its_clock_read(
    tmp_path: Path, audit: AuditLog, ahead: float
) -> None:
    url = f"sqlite:///{tmp_path}/state.db"
    left = await ApprovalStore.open(url)
    try:
        # Its last heartbeat, by a wall clock an hour off, then it was killed.
        await left.heartbeat(REMOTE, time.time() + ahead)
        gone = await Approvals(left, audit, SETTINGS, owner=REMOTE).request(
            action(), decision(), mode="hold"
        )
    finally:
        await left.close()
    # The sweeper recovers (every orphan_after_s / 3) once it saw the heartbeat stand still.
    settings = replace(SETTINGS, orphan_after_s=0.2)
    service = await Approvals.open(url, audit, settings)
    try:
        found = await service.get(gone.id)
        assert found is not None
        assert found.mode == "hold"  # only just seen: nothing bounds its age yet
        for _ in range(200):
            found = await service.get(gone.id)
            assert found is not None
            # The sweeper records the deferral just after the store takes it.
            if found.mode == "defer" and records(audit, "approval_deferred"):
                break
            await asyncio.sleep(0.05)
        assert (found.mode, found.status) == ("defer", ApprovalStatus.PENDING)
        (body,) = records(audit, "approval_deferred")
        assert body["approval_id"] == gone.id
    finally:
        await service.close()


def test_an_owners_heartbeat_is_timed_on_the_observers_monotonic_clock() -> None:
    me = Owner.current()
    held = [("apr_1", REMOTE.instance)]

    def dead(beat: float, *, now: float) -> bool:
        ids, gone = orphaned_holds(me, {REMOTE.instance: (REMOTE, beat)}, held, now, 0.5)
        assert bool(ids) == bool(gone)
        return bool(gone)

    now = time.time()
    # A day behind this host's wall clock, or a day ahead: only its own progress counts.
    for offset in (-86400.0, 86400.0):
        beat, at = now + offset, time.monotonic()
        assert not dead(beat, now=now)
        for _ in range(4):
            time.sleep(0.1)
            beat, at = beat + time.monotonic() - at, time.monotonic()  # it beats on
            assert not dead(beat, now=now + 3600)  # this wall clock stepped: no matter
        time.sleep(0.6)  # it stopped
        assert dead(beat, now=now)


def test_a_vote_cast_on_a_clock_past_a_holds_expiry_does_not_expire_it() -> None:
    now = time.time()
    vote = Vote("alice", True, "", now + 3600, 1)
    hold = replace(_approval(now), mode="hold", expires_at=now + 20)
    after = apply_vote(hold, vote)
    assert after.status is ApprovalStatus.APPROVED
    # A deferral's expiry is a wall-clock time: past it, the vote expires it.
    deferral = replace(hold, mode="defer")
    assert apply_vote(deferral, vote).status is ApprovalStatus.EXPIRED


def _approval(now: float) -> Approval:
    return Approval(
        id="apr_1",
        decision_id="dec_1",
        action_id="act_1",
        agent_id="refunds-bot",
        tool="issue_refund",
        arguments={"amount": 450},
        arguments_sha256="0" * 64,
        binding="b1",
        mode="hold",
        reason="large refund",
        risk="high",
        approvers=(),
        required_approvals=1,
        redacted=(),
        created_at=now,
        expires_at=now + 60,
        owner=REMOTE.instance,
    )


async def test_a_stalled_owner_leaves_alone_the_hold_a_sibling_took_over(
    store: Callable[[], Awaitable[ApprovalRepo]], audit: AuditLog
) -> None:
    # Owner A stalled (a long GC pause, a stopped container) past orphan_after_s: sibling
    # B deferred its hold, and the agent's retry at B holds that approval again. When A
    # resumes, its hold's time has run out on its monotonic clock: it must not end B's.
    a = await Approvals.open(await store(), audit, SETTINGS)
    b_repo = await store()
    b = await Approvals.open(b_repo, audit, SETTINGS)
    try:
        act, dec = action(), decision(hold_timeout_s=0.05)
        held = await a.request(act, dec, mode="hold")
        assert await b_repo.to_defer(held.id, time.time() + 3600) is not None  # B's recover
        adopted = await b.adopt(act, dec, 120)
        assert adopted is not None
        assert adopted.owner == b.owner.instance
        await asyncio.sleep(0.1)  # A's hold time is over
        assert await a.expire_due() == 0
        waited = await a.wait(held.id, 0.05)
        assert (waited.status, waited.mode, waited.owner) == (
            ApprovalStatus.PENDING,
            "hold",
            b.owner.instance,
        )
        # A answers its agent's first request as deferred; B's hold stays B's.
        assert await a.defer(held.id) is None
        found = await b.get(held.id)
        assert found is not None
        assert (found.status, found.mode, found.owner) == (
            ApprovalStatus.PENDING,
            "hold",
            b.owner.instance,
        )
        waiter = asyncio.create_task(b.wait(held.id, 120, expire=False))
        await b.decide(held.id, ALICE, True, "ok")
        assert (await asyncio.wait_for(waiter, 5)).status is ApprovalStatus.APPROVED
        assert records(audit, "approval_expired") == []
        assert records(audit, "approval_deferred") == []
    finally:
        await b.close()
        await a.close()


@pytest.mark.parametrize("used", ["while_it_waited", "as_it_went_to_use_it"])
async def test_a_stalled_owner_says_the_retry_used_the_approval_not_that_it_was_rejected(
    store: Callable[[], Awaitable[ApprovalRepo]], audit: AuditLog, used: str
) -> None:
    # Owner A holds the agent's call and stalls; sibling B defers the hold, the agent's
    # retry at B waits on it (or takes it as a grant), dana approves and the retry goes
    # through. A's request must be refused as what happened: approved, and used.
    spy = Spy(await store())
    a = await Approvals.open(spy.repo, audit, SETTINGS)
    b_repo = await store()
    b = await Approvals.open(b_repo, audit, SETTINGS)
    gate = ApprovalGate(a, ApprovalsConfig(mode="hold"), audit)
    act, dec = action(), decision(hold_timeout_s=120)
    try:
        settling = asyncio.create_task(gate.settle(act, dec))
        for _ in range(200):
            if pending := await b.list("pending"):
                break
            await asyncio.sleep(0.02)
        (held,) = pending
        resumed = asyncio.Event()
        spy.stalled["get"] = resumed  # A's waiter reads nothing until A resumes
        assert await b_repo.to_defer(held.id, time.time() + 3600) is not None  # B's recover
        if used == "while_it_waited":
            assert await b.adopt(act, dec, 120) is not None
            await b.decide(held.id, ALICE, True, "ok")
            await b.mark_executed(held.id, "act_retry")
        else:
            await b.decide(held.id, ALICE, True, "ok")  # a grant now: A reads it approved

            async def retry() -> None:  # ... and the retry at B takes it first
                assert await b.take_grant(act, dec) is not None

            spy.before["consume"] = retry
        resumed.set()
        final = await asyncio.wait_for(settling, 10)
        assert final.effect is Effect.DENY
        assert final.error is None  # not "the approval store is unavailable"
        why = final.reasons[-1]
        assert "approved by alice" in why
        assert "already used by another request for the same call" in why
        assert "rejected" not in why
        (recorded,) = [
            r
            for r in (orjson.loads(raw) for _, raw in iter_records(audit.directory))
            if r["kind"] == "decision" and r["decision"]["guard"] == "approval"
        ]
        assert recorded["decision"]["effect"] == "deny"
        assert recorded["decision"]["reasons"][-1] == why
        assert recorded["approval"]["verdict"] == "approved"
        found = await b.get(held.id)
        assert found is not None
        assert found.status is ApprovalStatus.CONSUMED
        (executed,) = records(audit, "approval_executed")  # once: the retry's
        assert executed["approval_id"] == held.id
    finally:
        await b.close()
        await a.close()
