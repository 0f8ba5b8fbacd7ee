"""The approvals sweep: what it reads, what it expires, and the heartbeat beside it.

A sweep reads the due deferrals' ids and expires each with an update that
checks it again, recording it before the next: the deferrals that are not due
are not read (a fleet may keep thousands), a deferral adopted meanwhile
(another sidecar's live hold now) is not expired, and a stop leaves no expiry
unrecorded. The heartbeat is written by a task of its own, so a
sweep that takes long (a backlog of deferrals, their audit records) never
makes a live owner look gone to its siblings.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tests.unit import test_approval_clocks as approval_clocks
from tests.unit.test_approval_clocks import Clock, Spy
from tests.unit.test_approvals_service import SETTINGS, action, decision, records
from warden.approvals import Approvals, ApprovalStatus
from warden.approvals.model import Approval
from warden.approvals.store import ApprovalRepo, ApprovalStore
from warden.audit.log import AuditLog
from warden.model import new_id

# The same stores and log as the clock tests (a fleet's sidecars on one database).
audit = approval_clocks.audit
store = approval_clocks.store


async def deferrals(repo: ApprovalRepo, template: Approval, count: int, *, due: bool) -> None:
    """Store ``count`` more pending deferrals like ``template``, past their expiry or not."""
    now = time.time()
    for i in range(count):
        await repo.insert(
            replace(
                template,
                id=new_id("apr"),
                binding=f"{template.binding}-{due}-{i}",
                mode="defer",
                owner=None,
                created_at=now - 90000 if due else now,
                expires_at=now - 1 if due else now + 86400,
            )
        )


async def test_a_sweep_reads_only_the_deferrals_that_are_due(
    store: Callable[[], Awaitable[ApprovalRepo]], audit: AuditLog
) -> None:
    spy = Spy(await store())
    service = await Approvals.open(spy.repo, audit, replace(SETTINGS, max_pending_per_agent=0))
    try:
        template = await service.request(action(), decision(), mode="defer")
        await deferrals(spy.inner, template, 200, due=False)
        await deferrals(spy.inner, template, 3, due=True)
        spy.rows = 0
        assert await service.expire_due() == 3
        # The three it expired, not the 201 that wait: no sweep reads every pending row.
        assert spy.rows == 3
        spy.rows = 0
        assert await service.expire_due() == 0
        assert spy.rows == 0
        assert len(await service.list("pending")) == 201
        assert len(records(audit, "approval_expired")) == 3
    finally:
        await service.close()


async def test_a_backlog_of_due_deferrals_expires_a_batch_at_a_time(
    store: Callable[[], Awaitable[ApprovalRepo]], audit: AuditLog
) -> None:
    repo = await store()
    service = await Approvals.open(repo, audit, replace(SETTINGS, max_pending_per_agent=0))
    try:
        template = await service.request(action(), decision(), mode="defer")
        await deferrals(repo, template, 5, due=True)
        held = await service.request(action(amount=2), decision(hold_timeout_s=300), mode="hold")
        assert await service.expire_due(limit=2) == 2
        assert await service.expire_due(limit=2) == 2
        assert await service.expire_due(limit=2) == 1
        assert await service.expire_due(limit=2) == 0
        assert len(records(audit, "approval_expired")) == 5
        # A hold past its stored expiry (another wall clock's) is its owner's to end.
        assert await repo.due_deferrals(time.time() + 600, 100) == []
        assert await repo.expire_deferral(held.id, time.time() + 600) is None
        assert {a.id for a in await service.list("pending")} == {template.id, held.id}
        found = await service.get(held.id)
        assert found is not None
        assert (found.mode, found.status) == ("hold", ApprovalStatus.PENDING)
    finally:
        await service.close()


@pytest.mark.parametrize("adopted", ["before", "after"])
async def test_a_deferral_adopted_as_a_sibling_sweeps_is_never_expired_as_a_hold(
    store: Callable[[], Awaitable[ApprovalRepo]],
    audit: AuditLog,
    monkeypatch: pytest.MonkeyPatch,
    adopted: str,
) -> None:
    # Sidecar S's wall clock runs a minute ahead, so it takes a deferral due in 30 s
    # for due. Z's agent retries the call just then, before or after S's first store
    # call of the sweep: Z holds that approval again, for 120 s.
    clock = Clock()
    monkeypatch.setattr("warden.approvals.service.time", clock)
    settings = replace(SETTINGS, defer_ttl_s=30)
    spy = Spy(await store())
    s = await Approvals.open(spy.repo, audit, settings)
    z = await Approvals.open(await store(), audit, settings)
    try:
        act, dec = action(), decision(hold_timeout_s=120)
        deferred = await z.request(act, dec, mode="defer")
        took: list[Approval | None] = []

        async def retry_at_z() -> None:
            clock.ahead = 0.0  # Z's clock
            took.append(await z.adopt(act, dec, 120))
            clock.ahead = 60.0

        (spy.before if adopted == "before" else spy.after)["*"] = retry_at_z
        clock.ahead = 60.0  # S's clock
        expired = await s.expire_due()
        clock.ahead = 0.0
        (hold,) = took
        found = await z.get(deferred.id)
        assert found is not None
        if hold is not None:  # Z holds it: a live hold, whatever S's clock says
            assert expired == 0
            assert (found.status, found.mode, found.owner) == (
                ApprovalStatus.PENDING,
                "hold",
                z.owner.instance,
            )
            waiter = asyncio.create_task(z.wait(deferred.id, 0.2, expire=False))
            assert (await asyncio.wait_for(waiter, 5)).status is ApprovalStatus.PENDING
            assert records(audit, "approval_expired") == []
        else:  # S expired it first, as the deferral it was: Z's retry found none to hold
            assert expired == 1
            assert (found.status, found.mode) == (ApprovalStatus.EXPIRED, "defer")
    finally:
        await z.close()
        await s.close()


class SlowAudit:
    """The audit log, on a disk that stalls writing expiry records until released."""

    def __init__(self, inner: AuditLog) -> None:
        self.inner = inner
        self.writing = asyncio.Event()
        self.released = asyncio.Event()

    async def append(self, kind: str, body: Mapping[str, Any]) -> object:
        if kind == "approval_expired":
            self.writing.set()
            await self.released.wait()
        return await self.inner.append(kind, body)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_a_long_sweep_does_not_keep_the_heartbeat_still(
    store: Callable[[], Awaitable[ApprovalRepo]], audit: AuditLog
) -> None:
    # Sidecar A holds a call; a backlog of deferrals ran out together, and writing their
    # records takes A's sweep longer than orphan_after_s. Sibling B (another container:
    # only A's heartbeat tells it A is alive) must not defer A's live hold meanwhile.
    orphan_after_s = 1.0
    settings = replace(
        SETTINGS, sweep_interval_s=0.05, orphan_after_s=orphan_after_s, max_pending_per_agent=0
    )
    slow = SlowAudit(audit)
    spy = Spy(await store())
    a = await Approvals.open(spy.repo, slow, settings)
    b = await Approvals.open(await store(), audit, replace(settings, sweep_interval_s=3600))
    try:
        held = await a.request(action(), decision(hold_timeout_s=300), mode="hold")
        await deferrals(spy.inner, held, 50, due=True)
        await asyncio.wait_for(slow.writing.wait(), 10)  # A's sweep is busy with them
        beats = spy.calls.count("heartbeat")
        recovered = 0
        began = time.monotonic()
        while time.monotonic() - began < 2 * orphan_after_s:
            await asyncio.sleep(0.05)
            recovered += await b.recover()
        assert recovered == 0
        # A beat on while its sweep was stuck (about every 0.05 s: at least a few times).
        assert spy.calls.count("heartbeat") - beats >= 3
        found = await b.get(held.id)
        assert found is not None
        assert (found.mode, found.status, found.owner) == (
            "hold",
            ApprovalStatus.PENDING,
            a.owner.instance,
        )
        slow.released.set()
        for _ in range(200):
            if len(records(audit, "approval_expired")) == 50:
                break
            await asyncio.sleep(0.05)
        assert len(records(audit, "approval_expired")) == 50
        assert records(audit, "approval_deferred") == []
    finally:
        slow.released.set()
        await b.close()
        await a.close()


async def test_a_stop_during_a_sweep_leaves_no_expiry_unrecorded(
    store: Callable[[], Awaitable[ApprovalRepo]], audit: AuditLog
) -> None:
    # A batch expired in one statement, its records written after: a stop between them
    # (SIGTERM cancels the sweeper) left hundreds expired with no record, for good.
    repo = await store()
    settings = replace(SETTINGS, max_pending_per_agent=0, sweep_interval_s=0.05)
    service = await Approvals.open(repo, audit, settings)
    template = await service.request(action(), decision(), mode="defer")
    await deferrals(repo, template, 200, due=True)
    try:
        for _ in range(6000):  # the sweeper's first records are on their way: stop now
            if records(audit, "approval_expired"):
                break
            await asyncio.sleep(0.005)
    finally:
        await service.close()
    checker = await Approvals.open(await store(), audit, settings)
    try:
        expired = {a.id for a in await checker.list("expired")}
    finally:
        await checker.close()
    recorded = {r["approval_id"] for r in records(audit, "approval_expired")}
    assert expired
    assert expired <= recorded


async def test_no_deferral_expires_while_the_audit_log_cannot_record_it(
    store: Callable[[], Awaitable[ApprovalRepo]], audit: AuditLog
) -> None:
    repo = await store()
    service = await Approvals.open(repo, audit, replace(SETTINGS, max_pending_per_agent=0))
    try:
        template = await service.request(action(), decision(), mode="defer")
        await deferrals(repo, template, 20, due=True)
        audit._fail(OSError(28, "No space left on device"))  # the log fails closed
        for _ in range(2):
            assert await service.expire_due() == 0
        assert await service.list("expired") == []
    finally:
        await service.close()


async def test_a_stalled_owner_does_not_defer_again_what_a_sibling_deferred(
    store: Callable[[], Awaitable[ApprovalRepo]], audit: AuditLog
) -> None:
    a = await Approvals.open(await store(), audit, SETTINGS)
    b = await Approvals.open(await store(), audit, SETTINGS)
    try:
        held = await a.request(action(), decision(hold_timeout_s=300), mode="hold")
        # B found A gone (stalled past orphan_after_s) and deferred A's hold; A resumes and
        # its gate, finding the request gone, defers it again.
        assert await b._store.to_defer(held.id, time.time() + 60) is not None
        before = await b.get(held.id)
        assert await a.defer(held.id) is None
        after = await b.get(held.id)
        assert before is not None
        assert after is not None
        assert after.expires_at == before.expires_at
        assert records(audit, "approval_deferred") == []
    finally:
        await b.close()
        await a.close()


async def test_a_stop_while_one_expiry_is_in_the_store_still_records_it(
    tmp_path: Path, audit: AuditLog
) -> None:
    # The update commits even when the sweep is cancelled while it is in the store's
    # thread (a busy disk): cancelled before its record was queued, the expiry stayed
    # unrecorded for good (no later sweep looks at an expired row).
    url = f"sqlite:///{tmp_path}/state.db"
    repo = await ApprovalStore.open(url)
    service = await Approvals.open(repo, audit, replace(SETTINGS, max_pending_per_agent=0))
    template = await service.request(action(), decision(), mode="defer")
    await deferrals(repo, template, 3, due=True)
    entered = asyncio.Event()
    loop = asyncio.get_running_loop()
    real = repo._expire_deferral

    def slow(approval_id: str, now: float) -> Approval | None:
        loop.call_soon_threadsafe(entered.set)
        time.sleep(0.3)
        return real(approval_id, now)

    repo._expire_deferral = slow  # type: ignore[method-assign]
    sweep = asyncio.ensure_future(service.expire_due())
    await asyncio.wait_for(entered.wait(), 10)
    sweep.cancel()  # close(): a stop during the sweep
    with contextlib.suppress(asyncio.CancelledError):
        await sweep
    await service.close()
    check = await ApprovalStore.open(url)
    try:
        expired = {a.id for a in await check.list(ApprovalStatus.EXPIRED)}
    finally:
        await check.close()
    assert len(expired) == 1
    assert expired <= {r["approval_id"] for r in records(audit, "approval_expired")}


async def test_no_hold_expires_in_a_sweep_while_the_audit_log_cannot_record_it(
    tmp_path: Path, audit: AuditLog
) -> None:
    service = await Approvals.open(
        await ApprovalStore.open(f"sqlite:///{tmp_path}/state.db"), audit, SETTINGS
    )
    try:
        held = await service.request(action(), decision(hold_timeout_s=0.05), mode="hold")
        audit._fail(OSError(28, "No space left on device"))
        await asyncio.sleep(0.1)
        assert await service.expire_due() == 0
        found = await service.get(held.id)
        assert found is not None
        assert found.status is ApprovalStatus.PENDING
    finally:
        await service.close()
