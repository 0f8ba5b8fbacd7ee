"""One contract for every state backend: SQLite and a real PostgreSQL behave the same.

Each test runs once per backend, through the repository interfaces
(:mod:`warden.state.repos`) that Warden's services use, on a backend opened
the way ``warden serve`` opens it (:func:`warden.state.backend.open_state`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import orjson
import pytest

from tests.pg import PgServer, state_config
from warden.approvals.model import (
    AlreadyVoted,
    Approval,
    ApprovalConflict,
    ApprovalNotFound,
    ApprovalStatus,
    Vote,
)
from warden.approvals.owner import Owner
from warden.config import SessionsConfig, StateConfig
from warden.model import Action, ActionKind, Agent, Decision, Effect, Mode, RequestMeta, Stage
from warden.pipeline import GuardContext
from warden.policy.bundle.order import SignedMark
from warden.sessions import SessionGuard
from warden.state import Hold, KillSwitchRow
from warden.state.backend import StateBackend, open_state
from warden.state.links import CallLinks, Link, LinkOp
from warden.state.repos import APPROVALS, KILLSWITCHES, Change
from warden.state.sessions import CallRecord, ChainLink

BACKENDS = ["sqlite", "postgresql"]
Opener = Callable[[], Awaitable[StateBackend]]


@pytest.fixture(params=BACKENDS)
async def open_backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Opener]:
    """Opens backends on one shared database (as sidecars would); closes them after."""
    config = state_config(request, tmp_path)
    opened: list[StateBackend] = []

    async def opener() -> StateBackend:
        backend = await open_state(config)
        opened.append(backend)
        return backend

    yield opener
    for backend in reversed(opened):
        await backend.close()


@pytest.fixture
async def state(open_backend: Opener) -> StateBackend:
    return await open_backend()


# -- budgets and reservations ---------------------------------------------------------------


async def test_reserve_settle_and_counters(state: StateBackend) -> None:
    budgets = state.budgets
    hold = Hold("refunds", "day:2026-11-30", "agent:a", 40.0, limit=100.0)
    first = await budgets.reserve("r1", [hold])
    assert first.reserved
    assert first.over == ()
    assert [(c.spent, c.reserved) for c in first.before] == [(0.0, 0.0)]
    second = await budgets.reserve("r2", [replace(hold, amount=50.0)])
    assert second.reserved
    assert [(c.spent, c.reserved) for c in second.before] == [(0.0, 40.0)]
    refused = await budgets.reserve("r3", [replace(hold, amount=20.0)])
    assert not refused.reserved
    assert refused.over == (replace(hold, amount=20.0),)
    # Settling at a lower actual value frees the difference.
    after = await budgets.settle("r1", {"refunds": 30.0})
    assert [(c.spent, c.reserved) for c in after] == [(30.0, 50.0)]
    assert await budgets.settle("r1", {"refunds": 30.0}) == ()  # once only
    # None spends what was held; a counter missing from actual is released.
    await budgets.settle("r2", None)
    (counter,) = await budgets.counters([("refunds", "day:2026-11-30", "agent:a")])
    assert (counter.spent, counter.reserved) == (80.0, 0.0)
    (missing,) = await budgets.counters([("refunds", "day:2026-11-30", "nobody")])
    assert (missing.spent, missing.reserved) == (0.0, 0.0)


async def test_a_reservation_is_all_or_nothing_across_counters(state: StateBackend) -> None:
    budgets = state.budgets
    roomy = Hold("refunds", "day", "agent:a", 10.0, limit=1000.0)
    tight = Hold("refunds", "day", "customer:c", 10.0, limit=5.0)
    refused = await budgets.reserve("r1", [roomy, tight])
    assert not refused.reserved
    assert refused.over == (tight,)
    counters = await budgets.counters(
        [("refunds", "day", "agent:a"), ("refunds", "day", "customer:c")]
    )
    assert [c.reserved for c in counters] == [0.0, 0.0]
    forced = await budgets.reserve("r2", [roomy, tight], force=True)
    assert forced.reserved
    assert forced.over == (tight,)
    counters = await budgets.counters(
        [("refunds", "day", "agent:a"), ("refunds", "day", "customer:c")]
    )
    assert [c.reserved for c in counters] == [10.0, 10.0]


async def test_a_zero_hold_is_refused_once_the_cap_is_used_up(state: StateBackend) -> None:
    budgets = state.budgets
    assert (await budgets.reserve("r1", [Hold("llm", "day", "a", 5.0, limit=5.0)])).reserved
    assert not (await budgets.reserve("r2", [Hold("llm", "day", "a", 0.0, limit=5.0)])).reserved


async def test_expire_settles_old_reservations_at_their_held_value(state: StateBackend) -> None:
    budgets = state.budgets
    await budgets.reserve("old", [Hold("refunds", "day", "a", 25.0, limit=100.0)])
    assert await budgets.expire(3600) == 0
    await asyncio.sleep(0.05)
    assert await budgets.expire(0.01) == 1
    (counter,) = await budgets.counters([("refunds", "day", "a")])
    assert (counter.spent, counter.reserved) == (25.0, 0.0)
    assert await budgets.settle("old", None) == ()


async def test_sixty_concurrent_reservations_against_room_for_ten_on_three_sidecars(
    open_backend: Opener,
) -> None:
    sidecars = [await open_backend() for _ in range(3)]
    hold = Hold("refunds", "day", "agent:a", 50.0, limit=500.0)
    results = await asyncio.gather(
        *(sidecars[i % 3].budgets.reserve(f"r{i}", [hold]) for i in range(60))
    )
    assert sum(r.reserved for r in results) == 10
    (counter,) = await sidecars[0].budgets.counters([("refunds", "day", "agent:a")])
    assert counter.reserved == 500.0


# -- kill switches ----------------------------------------------------------------------------


def switch(sid: str, at: float, scope: str = "agent", target: str = "bot") -> KillSwitchRow:
    return KillSwitchRow(sid, scope, target, "incident", "alice", at)


async def test_killswitches_add_list_and_clear(state: StateBackend) -> None:
    repo = state.killswitches
    await repo.add_killswitch(switch("ks_2", 2.0))
    await repo.add_killswitch(switch("ks_1", 1.0, "global", "*"))
    assert [s.id for s in await repo.active_killswitches()] == ["ks_1", "ks_2"]
    cleared = await repo.clear_killswitch("ks_2", "bob")
    assert cleared is not None
    assert cleared.cleared_by == "bob"
    assert cleared.cleared_at is not None
    assert await repo.clear_killswitch("ks_2", "bob") is None
    assert await repo.clear_killswitch("ks_unknown", "bob") is None
    assert [s.id for s in await repo.active_killswitches()] == ["ks_1"]


# -- signed bundles ------------------------------------------------------------------------------


async def test_signed_marks_only_move_up_and_are_shared(open_backend: Opener) -> None:
    one, two = await open_backend(), await open_backend()
    assert one.signed_marks is not None
    assert two.signed_marks is not None
    assert await one.signed_marks.signed_marks(["support"]) == {}
    await one.signed_marks.raise_signed_marks([SignedMark("support", 200, "rev-2", 1.0)])
    # An older mark (a sidecar activating late) never lowers it; a newer one raises it.
    await two.signed_marks.raise_signed_marks(
        [SignedMark("support", 100, "rev-1", 2.0), SignedMark("billing", 50, "b-1", 2.0)]
    )
    assert await one.signed_marks.signed_marks(["support", "billing", "other"]) == {
        "support": SignedMark("support", 200, "rev-2", 1.0),
        "billing": SignedMark("billing", 50, "b-1", 2.0),
    }
    await two.signed_marks.raise_signed_marks([SignedMark("support", 300, "rev-3", 3.0)])
    assert (await one.signed_marks.signed_marks(["support"]))["support"].revision == "rev-3"


# -- approvals ---------------------------------------------------------------------------------


def approval(aid: str, *, binding: str = "b1", mode: str = "hold", ttl: float = 60.0) -> Approval:
    now = time.time()
    return Approval(
        id=aid,
        decision_id=f"dec_{aid}",
        action_id=f"act_{aid}",
        agent_id="refunds-bot",
        tool="issue_refund",
        arguments={"amount": 450},
        arguments_sha256="0" * 64,
        binding=binding,
        mode=mode,
        reason="large refund",
        risk="high",
        approvers=("support-leads",),
        required_approvals=2,
        redacted=(),
        created_at=now,
        expires_at=now + ttl,
        owner="me" if mode == "hold" else None,
    )


async def test_approvals_create_vote_list_and_consume(state: StateBackend) -> None:
    repo = state.approvals
    a = approval("apr_1")
    await repo.insert(a)
    assert await repo.get("apr_1") == a
    assert await repo.get("apr_none") is None
    assert await repo.pending_counts() == {("refunds-bot", "issue_refund"): 1}
    assert await repo.oldest_pending() == pytest.approx(a.created_at)
    now = time.time()
    before, after = await repo.vote("apr_1", Vote("dana", True, "ok", now))
    assert before.status is after.status is ApprovalStatus.PENDING
    with pytest.raises(AlreadyVoted):
        await repo.vote("apr_1", Vote("dana", True, "again", now))
    _, approved = await repo.vote("apr_1", Vote("erin", True, "fine", now))
    assert approved.status is ApprovalStatus.APPROVED
    assert approved.approved_by == ("dana", "erin")
    with pytest.raises(ApprovalConflict):
        await repo.vote("apr_1", Vote("finn", False, "late", now))
    with pytest.raises(ApprovalNotFound):
        await repo.vote("apr_none", Vote("finn", False, "", now))
    assert [x.id for x in await repo.list(ApprovalStatus.APPROVED)] == ["apr_1"]
    assert await repo.get("apr_1") == approved
    consumed = await repo.consume("apr_1", now)
    assert consumed is not None
    assert consumed.status is ApprovalStatus.CONSUMED
    assert await repo.consume("apr_1", now) is None
    assert await repo.pending_counts() == {}
    assert await repo.oldest_pending() is None


async def test_an_agents_approval_room_is_counted_with_the_insert_across_sidecars(
    open_backend: Opener,
) -> None:
    """``insert(room=N)`` stores only while the agent has fewer than N pending, and
    two sidecars inserting at once for one agent take turns: one of them is refused."""
    here, there = await open_backend(), await open_backend()
    assert await here.approvals.insert(approval("apr_1", binding="b1"), room=2)
    outcomes = await asyncio.gather(
        *(
            (here if i % 2 else there).approvals.insert(
                approval(f"apr_{i}", binding=f"b{i}"), room=2
            )
            for i in range(2, 12)
        )
    )
    assert sorted(outcomes) == [False] * 9 + [True]
    assert await here.approvals.pending_counts() == {("refunds-bot", "issue_refund"): 2}
    # Another agent has room of its own; no room asked means no limit.
    other = replace(approval("apr_x", binding="bx"), agent_id="triage-bot")
    assert await there.approvals.insert(other, room=1)
    assert await there.approvals.insert(approval("apr_y", binding="by"))


async def test_approvals_reject_expire_cancel_and_defer(state: StateBackend) -> None:
    repo = state.approvals
    for aid in ("apr_r", "apr_e", "apr_d", "apr_c"):
        await repo.insert(approval(aid))
    await repo.insert(approval("apr_due", ttl=-1.0))
    now = time.time()
    _, rejected = await repo.vote("apr_r", Vote("dana", False, "no", now))
    assert rejected.status is ApprovalStatus.REJECTED
    expired = await repo.expire("apr_e", now)
    assert expired is not None
    assert expired.status is ApprovalStatus.EXPIRED
    assert await repo.expire("apr_e", now) is None
    deferred = await repo.to_defer("apr_d", now + 3600)
    assert deferred is not None
    assert deferred.mode == "defer"
    assert deferred.expires_at >= now + 3600
    assert [x.id for x in await repo.expire_due(now)] == ["apr_due"]
    cancelled = await repo.cancel("refunds-bot", None, "kill_switch", "incident", now)
    assert sorted(x.id for x in cancelled) == ["apr_c", "apr_d"]
    assert {x.status for x in cancelled} == {ApprovalStatus.REJECTED}
    assert await repo.list(ApprovalStatus.PENDING) == []
    assert len(await repo.list()) == 5


async def test_an_approved_unused_hold_becomes_a_grant_when_deferred(state: StateBackend) -> None:
    # Approved as its caller left: the retry takes it as a grant, never a second approval.
    repo = state.approvals
    await repo.insert(replace(approval("apr_h"), required_approvals=1))
    now = time.time()
    _, approved = await repo.vote("apr_h", Vote("dana", True, "ok", now))
    assert approved.status is ApprovalStatus.APPROVED
    granted = await repo.to_defer("apr_h", now + 3600)
    assert granted is not None
    assert (granted.status, granted.mode) == (ApprovalStatus.APPROVED, "defer")
    taken = await repo.consume_grant("b1", now)
    assert taken is not None
    assert taken.id == "apr_h"
    # Used (or rejected) it is no one's grant: nothing moves.
    assert await repo.to_defer("apr_h", now + 3600) is None


async def test_an_upstream_cancel_takes_that_upstreams_and_those_of_no_known_upstream(
    state: StateBackend,
) -> None:
    repo = state.approvals
    await repo.insert(replace(approval("apr_live"), upstream="refunds"))
    await repo.insert(replace(approval("apr_sandbox"), upstream="sandbox"))
    await repo.insert(approval("apr_unknown"))  # kept before approvals named their upstream
    cancelled = await repo.cancel(
        None, None, "kill_switch", "incident", time.time(), upstream="refunds"
    )
    assert sorted(x.id for x in cancelled) == ["apr_live", "apr_unknown"]
    assert [x.id for x in await repo.list(ApprovalStatus.PENDING)] == ["apr_sandbox"]


async def test_approvals_that_ended_long_ago_are_pruned(state: StateBackend) -> None:
    repo = state.approvals
    for aid in ("apr_rejected", "apr_expired", "apr_consumed", "apr_pending", "apr_recent"):
        await repo.insert(approval(aid))
    await repo.insert(approval("apr_grant", binding="g", mode="defer", ttl=3600))
    now = time.time()
    lapsed = replace(
        approval("apr_lapsed", binding="l", mode="defer", ttl=-1),
        status=ApprovalStatus.APPROVED,
        decided_at=now - 5,
    )
    await repo.insert(lapsed)  # approved, but its time to be taken ran out
    await repo.vote("apr_rejected", Vote("dana", False, "no", now))
    await repo.expire("apr_expired", now)
    for aid in ("apr_consumed", "apr_grant"):
        await repo.vote(aid, Vote("dana", True, "", now))
        await repo.vote(aid, Vote("erin", True, "", now))
    assert await repo.consume("apr_consumed", now) is not None
    await asyncio.sleep(0.01)
    cut = time.time()
    await repo.vote("apr_recent", Vote("dana", False, "no", time.time()))
    assert await repo.prune(cut) == 4
    kept = sorted(a.id for a in await repo.list())
    # Pending, a grant still to be taken and one that ended after the cut stay.
    assert kept == ["apr_grant", "apr_pending", "apr_recent"]
    assert await repo.prune(cut) == 0


async def test_a_deferred_grant_is_consumed_once_across_sidecars(open_backend: Opener) -> None:
    one, two = await open_backend(), await open_backend()
    await one.approvals.insert(approval("apr_g", binding="bind-g", mode="defer"))
    assert (await one.approvals.pending_for("bind-g", time.time())) is not None
    now = time.time()
    await one.approvals.vote("apr_g", Vote("dana", True, "", now))
    await one.approvals.vote("apr_g", Vote("erin", True, "", now))
    grants = await asyncio.gather(
        *(s.approvals.consume_grant("bind-g", time.time()) for s in (one, two, one, two))
    )
    assert [g.id for g in grants if g is not None] == ["apr_g"]


async def test_orphaned_holds_become_deferrals_and_can_be_adopted(state: StateBackend) -> None:
    repo = state.approvals
    me = Owner("me-instance", "host-a", 1, "t0")
    gone = Owner("gone-instance", "host-b", 2, "t0")
    now = time.time()
    await repo.heartbeat(me, now)
    await repo.heartbeat(gone, now - 600)
    mine = replace(approval("apr_mine", binding="b-mine"), owner=me.instance)
    theirs = replace(approval("apr_theirs", binding="b-theirs"), owner=gone.instance)
    await repo.insert(mine)
    await repo.insert(theirs)
    recovered = await repo.recover(me, now, 30.0, now + 3600)
    assert [a.id for a in recovered] == ["apr_theirs"]
    assert recovered[0].mode == "defer"
    assert await repo.recover(me, now, 30.0, now + 3600) == []
    adopted = await repo.adopt("b-theirs", me.instance, now, now + 60)
    assert adopted is not None
    assert (adopted.mode, adopted.owner) == ("hold", me.instance)
    assert await repo.adopt("b-theirs", me.instance, now, now + 60) is None
    await repo.release(me)


# -- call links ----------------------------------------------------------------------------------


def action(call_id: str) -> Action:
    return Action(
        action_id=f"act_{call_id}",
        agent=Agent("refunds-bot", "1", {}),
        kind=ActionKind.TOOL_CALL,
        protocol="openai",
        stage=Stage.PROPOSED,
        request=RequestMeta("POST", "openai", "/v1/chat/completions", {}),
        tool="issue_refund",
        arguments={"amount": 5},
        call_id=call_id,
    )


async def test_links_put_take_tombstone_and_prune(open_backend: Opener) -> None:
    one, two = await open_backend(), await open_backend()
    now = time.time()
    link = Link(action("call_1"), "dec_1")
    assert await one.links.apply([LinkOp("put", "call_1", link, at=now)], prune_before=None) == []
    # Another sidecar proposing the same id makes it a tombstone.
    clash = [LinkOp("put", "call_1", link, at=now)]
    assert await two.links.apply(clash, prune_before=None) == ["call_1"]
    links, tombs = await one.links.take(["call_1"], newer_than=now - 60)
    assert (links, tombs) == ({}, {"call_1"})
    await one.links.apply(
        [LinkOp("put", "call_2", Link(action("call_2"), "dec_2"), at=now)], prune_before=None
    )
    links, tombs = await two.links.take(["call_2", "call_none"], newer_than=now - 60)
    assert list(links) == ["call_2"]
    assert links["call_2"].decision_id == "dec_2"
    assert links["call_2"].action == action("call_2")
    assert tombs == set()
    assert await one.links.take(["call_2"], newer_than=now - 60) == ({}, set())
    old = [
        LinkOp("put", f"old_{i}", Link(action(f"old_{i}"), "d"), at=now - 100 + i) for i in range(5)
    ]
    await one.links.apply(old, prune_before=None)
    assert await one.links.count() == 6
    await one.links.apply([], prune_before=now - 97.5, keep=2)
    assert await one.links.count() == 2


async def test_links_batch_applies_its_ops_in_order(open_backend: Opener) -> None:
    """One batch of puts, tombstones and drops is applied in the order given."""
    store = await open_backend()
    now = time.time()

    def put(call_id: str) -> LinkOp:
        return LinkOp("put", call_id, Link(action(call_id), f"dec_{call_id}"), at=now)

    batch = [
        put("a"),
        put("b"),
        put("a"),  # the same id twice in one batch: a tombstone
        LinkOp("drop", "b"),  # its result came back
        put("c"),
        LinkOp("tomb", "d", at=now),
        put("d"),  # over a tombstone: stays one
        put("e"),
    ]
    clashed = await store.links.apply(batch, prune_before=None)
    assert sorted(clashed) == ["a", "d"]
    links, tombs = await store.links.take(["a", "b", "c", "d", "e"], newer_than=now - 60)
    assert sorted(links) == ["c", "e"]
    assert links["e"].action == action("e")
    assert tombs == {"a", "d"}


async def test_an_id_postgresql_cannot_store_never_holds_up_the_others(state: StateBackend) -> None:
    # A model named a call with NUL: PostgreSQL text refuses it, and its write failed
    # every batch after it, for good (links and decided calls alike).
    links = CallLinks(state.links)
    links.link("call_\x00x", Link(action("call_\x00x"), "dec_nul"))
    links.link("call_\ud800", Link(action("call_\ud800"), "dec_surrogate"))
    links.link("call_ok", Link(action("call_ok"), "dec_ok"))
    await links.flush()
    found, _ = await state.links.take(["call_ok"], newer_than=0)
    assert list(found) == ["call_ok"]
    assert links.waiting("call_\x00x")  # still linked in this process's memory
    # Its result, sent to a replica that never saw it, is not looked for in the store.
    other = CallLinks(state.links)
    assert other.take(["call_\x00x"]) == ({}, [])
    await links.close()

    assert state.sessions is not None
    guard = SessionGuard(state.sessions, SessionsConfig(), {})
    for call_id in ("call_\x00y", "call_\udc00", "call_ok2"):
        call = replace(action(call_id), tool="search_kb")
        await guard.admit(call, GuardContext(mode=Mode.ENFORCE))
        await guard.decided(
            call, Decision(f"dec_{call_id[-1]}", Effect.ALLOW, (), Mode.ENFORCE, "policy")
        )
    await guard.close()
    assert list(await state.sessions.calls(["call_ok2"])) == ["call_ok2"]


# -- the change feed -----------------------------------------------------------------------------


async def next_change(
    sub_get: Callable[[], Awaitable[Change]], want: Callable[[Change], bool]
) -> Change:
    async with asyncio.timeout(5):
        while True:
            change = await sub_get()
            if want(change):
                return change


async def test_watch_delivers_changes_made_by_another_sidecar(open_backend: Opener) -> None:
    here, there = await open_backend(), await open_backend()
    with here.feed.watch(KILLSWITCHES) as switches, here.feed.watch(APPROVALS) as approvals:
        await there.killswitches.add_killswitch(switch("ks_w", 1.0))
        got = await next_change(switches.get, lambda c: c.key in ("ks_w", None))
        assert got.channel == KILLSWITCHES
        await there.approvals.insert(approval("apr_w"))
        got = await next_change(approvals.get, lambda c: c.key in ("apr_w", None))
        assert got.channel == APPROVALS
    if here.kind == "postgresql":
        # PostgreSQL names the row that changed; SQLite can only say something did.
        with here.feed.watch(APPROVALS) as approvals:
            await there.approvals.vote("apr_w", Vote("dana", False, "no", time.time()))
            assert (await next_change(approvals.get, lambda c: True)).key == "apr_w"


async def test_watch_rejects_unknown_channels(state: StateBackend) -> None:
    with pytest.raises(ValueError, match="channel"):
        state.feed.watch("nope")


async def test_the_postgresql_feed_reconnects_and_asks_for_a_re_read(
    pg_server: PgServer, pg_url: str
) -> None:
    config = StateConfig(url=pg_url, password_file=str(pg_server.password_file))
    here, there = await open_state(config), await open_state(config)
    try:
        with here.feed.watch(KILLSWITCHES) as switches:
            # Every server connection is cut (as a failover would): the feed
            # reconnects by itself and tells watchers to re-read everything.
            with pg_server.admin() as admin:
                admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE usename = 'warden_app'"
                )
            assert (await next_change(switches.get, lambda c: True)).key is None
            # A pooled connection that was cut fails once; the pool replaces it.
            for attempt in range(3):
                try:
                    await there.killswitches.add_killswitch(switch(f"ks_after{attempt}", 1.0))
                    break
                except Exception:  # noqa: BLE001 - the cut connection's error
                    continue
            got = await next_change(switches.get, lambda c: c.key is not None)
            assert got.key is not None
            assert got.key.startswith("ks_after")
    finally:
        await here.close()
        await there.close()


# -- sessions: counters, decided calls, Responses chains, MCP owners -------------------------


async def test_session_counters_add_atomically_across_sidecars(open_backend: Opener) -> None:
    sidecars = [await open_backend() for _ in range(3)]
    repos = [s.sessions for s in sidecars]
    assert all(r is not None for r in repos)
    first = repos[0]
    assert first is not None
    assert await first.counters("bot\x1fs1") == {}
    await asyncio.gather(
        *(
            repo.add("bot\x1fs1", {"calls:refund": 1, "denials": i % 2})
            for i, repo in enumerate(r for r in repos * 10 if r is not None)
        )
    )
    after = await first.add("bot\x1fs1", {"taint:untrusted_output": 1})
    assert after == {"calls:refund": 30, "denials": 15, "taint:untrusted_output": 1}
    assert await first.counters("bot\x1fs2") == {}


async def test_decided_calls_are_kept_once_and_found_by_call_id(state: StateBackend) -> None:
    repo = state.sessions
    assert repo is not None
    a = CallRecord("call_1", "dec_1", "get_order", "d1", "allow", "bot\x1fs1", 10.0)
    b = CallRecord("call_1", "dec_2", "get_order", "d2", "deny", None, 11.0)
    await repo.record_calls([a, b])
    await repo.record_calls([a])  # again: nothing doubles
    found = await repo.calls(["call_1", "call_2", "call_1"])
    assert found == {"call_1": [a, b]}
    assert await repo.calls([]) == {}


async def test_a_responses_chain_is_followed_newest_first(state: StateBackend) -> None:
    repo = state.sessions
    assert repo is not None
    await repo.record_response(ChainLink("resp_1", "ses_a", None, "[1]"))
    await repo.record_response(ChainLink("resp_2", "ses_a", "resp_1", "[2]", "bot-a"))
    await repo.record_response(ChainLink("resp_3", "ses_a", "resp_2", "[3]", "bot-b"))
    # The first record of an id stands, the agent it was made for too.
    await repo.record_response(ChainLink("resp_3", "ses_b", None, "[9]", "bot-c"))
    # ...but a record that named no agent (a fetch made it) takes the maker's: its agent,
    # session and previous answer, and its calls beside the fetched ones.
    await repo.record_response(ChainLink("resp_1", "ses_z", "resp_0", "[8]", "bot-a"))
    chain = await repo.chain("resp_3")
    assert [(c.response_id, c.calls, c.agent_id) for c in chain] == [
        ("resp_3", "[3]", "bot-b"),
        ("resp_2", "[2]", "bot-a"),
        ("resp_1", "[8,1]", "bot-a"),
    ]
    assert (chain[2].session_id, chain[2].previous_id) == ("ses_z", "resp_0")
    assert [c.response_id for c in await repo.chain("resp_3", limit=2)] == ["resp_3", "resp_2"]
    assert await repo.chain("resp_unknown") == []
    # A cycle (ids are the upstream's) ends the walk instead of looping.
    await repo.record_response(ChainLink("loop_a", "ses_c", "loop_b", "[]"))
    await repo.record_response(ChainLink("loop_b", "ses_c", "loop_a", "[]"))
    assert len(await repo.chain("loop_a")) <= 256


async def test_a_stored_answer_fetched_again_adds_its_calls_once(state: StateBackend) -> None:
    repo = state.sessions
    assert repo is not None
    await repo.record_response(
        ChainLink("resp_q", "ses_a", "resp_p", '[{"call_id": "c0"}]', "bot-a")
    )
    fetched = ChainLink(
        "resp_q", "ses_other", None, '[{"call_id": "c1"}, {"call_id": "c2"}]', "bot-b"
    )
    await repo.extend_response(fetched)
    await repo.extend_response(fetched)  # fetched twice: each entry once
    (link,) = await repo.chain("resp_q", limit=1)
    # The link's own session, previous answer and agent stand; the calls are added.
    assert (link.session_id, link.previous_id, link.agent_id) == ("ses_a", "resp_p", "bot-a")
    assert orjson.loads(link.calls) == [{"call_id": "c0"}, {"call_id": "c1"}, {"call_id": "c2"}]
    # Fetched again, its refusal names another decision: the latest replaces it.
    refusal = '[{"call_id": "c2", "refused": {"type": "function_call", "output": "%s"}}]'
    await repo.extend_response(ChainLink("resp_q", "ses_a", None, refusal % "dec_1"))
    await repo.extend_response(ChainLink("resp_q", "ses_a", None, refusal % "dec_2"))
    (link,) = await repo.chain("resp_q", limit=1)
    entries = orjson.loads(link.calls)
    assert [e["call_id"] for e in entries] == ["c0", "c1", "c2", "c2"]  # the call, its refusal
    assert entries[-1]["refused"]["output"] == "dec_2"
    # An answer Warden never saw asked for: the fetched calls make its link.
    await repo.extend_response(ChainLink("resp_new", "ses_b", None, '[{"call_id": "c3"}]', "bot-b"))
    (made,) = await repo.chain("resp_new")
    assert (made.session_id, made.previous_id, made.calls, made.agent_id) == (
        "ses_b",
        None,
        '[{"call_id": "c3"}]',
        "bot-b",
    )


async def test_session_rows_are_pruned_by_age(state: StateBackend) -> None:
    repo = state.sessions
    assert repo is not None
    await repo.add("bot\x1fold", {"denials": 1})
    await repo.record_calls([CallRecord("c", "d", "t", "x", "allow", None, time.time())])
    await repo.claim_id("tools", "mcp-1", "bot")
    assert await repo.prune(3600) == 0
    await asyncio.sleep(0.05)
    assert await repo.prune(0.01) == 3
    assert await repo.counters("bot\x1fold") == {}
    assert await repo.calls(["c"]) == {}
    assert await repo.claim_id("tools", "mcp-1", "other") == "other"  # unowned again


async def test_an_mcp_session_is_its_first_claimants_on_every_sidecar(
    open_backend: Opener,
) -> None:
    sidecars = [await open_backend() for _ in range(3)]
    repos = [s.sessions for s in sidecars if s.sessions is not None]
    assert len(repos) == 3
    # Three agents claim one session at once, on three sidecars: exactly one owns it.
    owners = await asyncio.gather(
        *(repo.claim_id("tools", "mcp-1", f"agent-{i}") for i, repo in enumerate(repos))
    )
    assert len(set(owners)) == 1
    owner = owners[0]
    assert await repos[2].claim_id("tools", "mcp-1", "agent-x") == owner
    assert await repos[1].id_owner("tools", "mcp-1") == owner
    assert await repos[1].id_owner("tools", "mcp-2") is None
    # Sessions are per upstream: the same id of another server is another session.
    assert await repos[1].claim_id("crm", "mcp-1", "agent-x") == "agent-x"
    # The owner claiming again is a use: its row outlives a prune of older rows.
    await asyncio.sleep(0.3)
    await repos[0].claim_id("tools", "mcp-1", owner)
    assert await repos[0].prune(0.15) == 1  # crm's, not used since
    assert await repos[1].id_owner("tools", "mcp-1") == owner
    assert await repos[1].claim_id("crm", "mcp-1", "agent-w") == "agent-w"
    # The server ended it: the id is nobody's, and the next claimant's.
    await repos[1].release_id("tools", "mcp-1")
    assert await repos[0].claim_id("tools", "mcp-1", "agent-y") == "agent-y"
    assert await repos[2].claim_id("crm", "mcp-1", "agent-z") == "agent-w"
