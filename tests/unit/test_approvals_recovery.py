"""Holds whose process is gone become deferrals; a live sibling's holds stay holds."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from tests.unit.test_approvals_service import ALICE, SETTINGS, action, decision, records
from warden.approvals import Approval, Approvals, ApprovalStatus
from warden.approvals.owner import Owner, process_start, provably_dead, stale
from warden.approvals.store import ApprovalStore
from warden.audit.log import AuditLog
from warden.config import AuditConfig

ME = Owner.current()
linux_only = pytest.mark.skipif(not ME.host, reason="process identity needs Linux /proc")


@pytest.fixture
async def audit(tmp_path: Path) -> AsyncIterator[AuditLog]:
    log = await AuditLog.open(AuditConfig(dir=str(tmp_path / "audit")))
    yield log
    await log.close()


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/state.db"


def dead_owner() -> Owner:
    """An owner on this host whose process has exited."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        started = process_start(child.pid)
    finally:
        child.kill()
        child.wait()
    return Owner("own_dead", ME.host, child.pid, started)


async def hold_owned_by(url: str, audit: AuditLog, owner: Owner, *, beat: float) -> Approval:
    """A hold left in the store by ``owner``, as if its process stopped without closing."""
    store = await ApprovalStore.open(url)
    try:
        await store.heartbeat(owner, beat)
        service = Approvals(store, audit, SETTINGS, owner=owner)
        return await service.request(action(), decision(), mode="hold")
    finally:
        await store.close()


@linux_only
def test_process_identity() -> None:
    assert process_start(ME.pid) == ME.started != ""
    assert not provably_dead(ME, ME)
    sibling = replace(ME, instance="own_sibling")  # another service in a live process
    assert not provably_dead(sibling, ME)
    assert provably_dead(dead_owner(), ME)
    # Another host or PID namespace: pids mean nothing here, only the heartbeat tells.
    assert not provably_dead(replace(dead_owner(), host="other-boot/pid:[1]"), ME)
    assert stale(None, 100.0, 30.0)
    assert stale(60.0, 100.0, 30.0)
    assert not stale(80.0, 100.0, 30.0)


@linux_only
async def test_a_dead_process_hold_becomes_a_deferral_that_grants_once(
    url: str, audit: AuditLog
) -> None:
    held = await hold_owned_by(url, audit, dead_owner(), beat=time.time())
    assert held.mode == "hold"
    service = await Approvals.open(url, audit, SETTINGS)
    try:
        recovered = await service.get(held.id)
        assert recovered is not None
        assert (recovered.mode, recovered.status) == ("defer", ApprovalStatus.PENDING)
        assert recovered.expires_at >= time.time() + SETTINGS.defer_ttl_s - 60
        (body,) = records(audit, "approval_deferred")
        assert body["approval_id"] == held.id
        assert body["decision_id"] == held.decision_id
        await service.decide(held.id, ALICE, True, "after the crash")
        same_call = action()
        grant = await service.take_grant(same_call, decision())
        assert grant is not None
        assert grant.id == held.id
        assert await service.take_grant(same_call, decision()) is None  # once
    finally:
        await service.close()


@linux_only
async def test_an_approved_but_undelivered_hold_is_deferred_too(url: str, audit: AuditLog) -> None:
    held = await hold_owned_by(url, audit, dead_owner(), beat=time.time())
    store = await ApprovalStore.open(url)
    try:
        # Approved just before the process died, so it never delivered the call.
        await Approvals(store, audit, SETTINGS, owner=ME).decide(held.id, ALICE, True, "")
    finally:
        await store.close()
    service = await Approvals.open(url, audit, SETTINGS)
    try:
        grant = await service.take_grant(action(), decision())
        assert grant is not None
        assert grant.id == held.id
    finally:
        await service.close()


async def test_a_live_siblings_hold_is_left_alone(url: str, audit: AuditLog) -> None:
    sibling = await Approvals.open(url, audit, SETTINGS)
    try:
        held = await sibling.request(action(), decision(), mode="hold")
        other = await Approvals.open(url, audit, SETTINGS)
        try:
            assert await other.recover() == 0
            found = await other.get(held.id)
            assert found is not None
            assert found.mode == "hold"
        finally:
            await other.close()
    finally:
        await sibling.close()


async def test_a_remote_owner_is_deferred_only_once_its_heartbeat_is_stale(
    url: str, audit: AuditLog
) -> None:
    # Another container: a pid this process cannot check.
    remote = Owner("own_remote", "other-boot/pid:[1]", 1, "12345")
    fresh = await hold_owned_by(url, audit, remote, beat=time.time())
    service = await Approvals.open(url, audit, SETTINGS)
    try:
        assert await service.recover() == 0
        assert (await service.get(fresh.id)).mode == "hold"  # type: ignore[union-attr]
        store = await ApprovalStore.open(url)
        try:
            await store.heartbeat(remote, time.time() - SETTINGS.orphan_after_s - 1)
        finally:
            await store.close()
        assert await service.recover() == 1
        assert (await service.get(fresh.id)).mode == "defer"  # type: ignore[union-attr]
    finally:
        await service.close()


async def test_a_retry_adopts_the_lost_hold_instead_of_asking_again(
    url: str, audit: AuditLog
) -> None:
    service = await Approvals.open(url, audit, SETTINGS)
    try:
        first = await service.request(action(), decision(), mode="hold")
        await service.defer(first.id)  # its request went away
        adopted = await service.adopt(action(), decision(), 5)
        assert adopted is not None
        assert adopted.id == first.id
        assert (adopted.mode, adopted.owner) == ("hold", service.owner.instance)
        assert adopted.expires_at >= first.expires_at  # never shortened
        assert await service.adopt(action(), decision(), 5) is None  # one waiter per approval
        assert await service.adopt(action(amount=11), decision(), 5) is None  # another call
        # An undecided wait leaves it pending, for the gate to defer again.
        waited = await service.wait(first.id, 0.05, expire=False)
        assert waited.status is ApprovalStatus.PENDING
        assert len(records(audit, "approval_requested")) == 1
    finally:
        await service.close()
