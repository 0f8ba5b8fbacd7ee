"""The SQLite state store: atomic reservations, settlement, restart, shared files."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from warden.errors import ConfigError
from warden.state import Hold, KillSwitchRow, StateStore
from warden.state.sqlite import sqlite_path


def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/state.db"


def refund(amount: float, limit: float = 100.0, subject: str = "agent:a") -> Hold:
    return Hold("refunds", "day:2026-11-27", subject, amount, limit)


async def test_reserve_checks_every_hold_and_holds_all_or_none(tmp_path: Path) -> None:
    store = await StateStore.open(url(tmp_path))
    try:
        ok = await store.reserve("r1", [refund(60), refund(60, 1000, "customer:c")])
        assert ok.reserved
        assert not ok.over
        assert [c.reserved for c in ok.before] == [0.0, 0.0]
        # The agent hold would pass 100; the customer one fits: neither is taken.
        no = await store.reserve("r2", [refund(50), refund(50, 1000, "customer:c")])
        assert not no.reserved
        assert [h.subject for h in no.over] == ["agent:a"]
        counters = await store.counters(
            [("refunds", "day:2026-11-27", "agent:a"), ("refunds", "day:2026-11-27", "customer:c")]
        )
        assert [c.reserved for c in counters] == [60.0, 60.0]
    finally:
        await store.close()


async def test_settle_release_and_unknown_reservations(tmp_path: Path) -> None:
    store = await StateStore.open(url(tmp_path))
    try:
        await store.reserve("r1", [refund(40)])
        await store.reserve("r2", [refund(30)])
        after = await store.settle("r1", {"refunds": 25.0})
        assert (after[0].spent, after[0].reserved) == (25.0, 30.0)
        after = await store.settle("r2", {})
        assert (after[0].spent, after[0].reserved) == (25.0, 0.0)
        assert await store.settle("r2", None) == ()  # already settled: no change
        assert await store.settle("nope", None) == ()
    finally:
        await store.close()


async def test_zero_value_hold_is_refused_once_the_cap_is_used_up(tmp_path: Path) -> None:
    store = await StateStore.open(url(tmp_path))
    try:
        await store.reserve("r1", [refund(100)])
        await store.settle("r1", None)
        assert not (await store.reserve("r2", [refund(0)])).reserved
    finally:
        await store.close()


async def test_force_holds_over_the_limit_and_says_so(tmp_path: Path) -> None:
    store = await StateStore.open(url(tmp_path))
    try:
        result = await store.reserve("r1", [refund(500)], force=True)
        assert result.reserved
        assert result.over
    finally:
        await store.close()


async def test_concurrent_reservations_never_pass_the_limit(tmp_path: Path) -> None:
    store = await StateStore.open(url(tmp_path))
    try:
        results = await asyncio.gather(*(store.reserve(f"r{i}", [refund(10)]) for i in range(50)))
        assert sum(r.reserved for r in results) == 10
    finally:
        await store.close()


async def test_two_stores_on_one_file_share_the_cap(tmp_path: Path) -> None:
    # Two connections, as two Warden processes would have: BEGIN IMMEDIATE
    # serialises the check-then-reserve across them.
    first = await StateStore.open(url(tmp_path))
    second = await StateStore.open(url(tmp_path))
    try:
        results = await asyncio.gather(
            *((first if i % 2 else second).reserve(f"r{i}", [refund(10)]) for i in range(40))
        )
        assert sum(r.reserved for r in results) == 10
    finally:
        await first.close()
        await second.close()


async def test_counters_and_reservations_survive_a_restart(tmp_path: Path) -> None:
    store = await StateStore.open(url(tmp_path))
    await store.reserve("r1", [refund(40)])
    await store.reserve("r2", [refund(20)])
    await store.settle("r1", None)
    await store.close()
    store = await StateStore.open(url(tmp_path))
    try:
        (counter,) = await store.counters([("refunds", "day:2026-11-27", "agent:a")])
        assert (counter.spent, counter.reserved) == (40.0, 20.0)
        after = await store.settle("r2", None)
        assert (after[0].spent, after[0].reserved) == (60.0, 0.0)
    finally:
        await store.close()


async def test_expire_settles_old_reservations_at_their_value(tmp_path: Path) -> None:
    store = await StateStore.open(url(tmp_path))
    try:
        await store.reserve("r1", [refund(40)])
        assert await store.expire(3600) == 0
        assert await store.expire(-1) == 1
        (counter,) = await store.counters([("refunds", "day:2026-11-27", "agent:a")])
        assert (counter.spent, counter.reserved) == (40.0, 0.0)
    finally:
        await store.close()


async def test_wal_mode_and_killswitch_rows(tmp_path: Path) -> None:
    store = await StateStore.open(url(tmp_path))
    try:
        row = KillSwitchRow("ks_1", "agent", "bot", "why", "alice", 1.0)
        await store.add_killswitch(row)
        assert await store.active_killswitches() == (row,)
        cleared = await store.clear_killswitch("ks_1", "bob")
        assert cleared is not None
        assert cleared.cleared_by == "bob"
        assert await store.clear_killswitch("ks_1", "bob") is None
        assert await store.active_killswitches() == ()
    finally:
        await store.close()
    with sqlite3.connect(tmp_path / "state.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_only_sqlite_urls_are_supported() -> None:
    assert sqlite_path("sqlite:///./x/state.db") == Path("x/state.db")
    assert sqlite_path("sqlite:////abs/state.db") == Path("/abs/state.db")
    with pytest.raises(ConfigError, match="state.url"):
        sqlite_path("postgresql://db/warden")


async def test_a_closed_store_refuses_work(tmp_path: Path) -> None:
    store = await StateStore.open(url(tmp_path))
    await store.close()
    await store.close()
    with pytest.raises(RuntimeError):
        await store.counters([])


async def test_session_counters_are_read_on_the_loop_and_through_the_thread_when_it_cannot(
    tmp_path: Path,
) -> None:
    from warden.state.sessions import SessionStore  # noqa: PLC0415 - this test's store only

    store = await SessionStore.open(url(tmp_path))
    try:
        await store.add("agent\x1fs1", {"issue_refund": 2})
        reads: list[str] = []
        real = store._run

        async def counted(fn: object, *args: object) -> object:
            reads.append("thread")
            return await real(fn, *args)  # type: ignore[arg-type]

        store._run = counted  # type: ignore[method-assign,assignment]
        assert await store.counters("agent\x1fs1") == {"issue_refund": 2}
        assert reads == []  # a point read: no thread round trip
        # A read the loop's connection cannot make at once (here: it opened another
        # file, so it finds no table) goes through the I/O thread instead.
        store._loop_conn = sqlite3.connect(tmp_path / "other.db", isolation_level=None)
        assert await store.counters("agent\x1fs1") == {"issue_refund": 2}
        assert reads == ["thread"]
    finally:
        await store.close()
