"""Clean-up of shared state by a sidecar whose clock runs ahead deletes nothing in use.

Each sidecar prunes old budget windows, session rows and call links by its own
clock. One whose clock is days ahead (or one forward step) used to delete what
the rest of the fleet counts in now: today's budget counters, session counters
and the owners of MCP session ids, call links waiting for their result. A prune
now counts from no later than the store has seen (and, on PostgreSQL, than the
database's clock). Each test runs on SQLite and on a real PostgreSQL, two
backends opened on one database as two sidecars would be.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.pg import PgServer, state_config
from warden.budgets.caps import window_key, windows_closed_before
from warden.config import StateConfig
from warden.model import Action, ActionKind, Agent, RequestMeta, Stage
from warden.state import Hold
from warden.state.backend import StateBackend, open_state
from warden.state.links import Link, LinkOp
from warden.state.sessions import CallRecord, PruneClock, SessionRepo

DAY = 86400.0
WEEK = 7 * DAY
Opener = Callable[[], Awaitable[StateBackend]]


@pytest.fixture(params=["sqlite", "postgresql"])
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
async def pg_backends(pg_server: PgServer, pg_url: str) -> AsyncIterator[list[StateBackend]]:
    """Two sidecars on one PostgreSQL database."""
    config = StateConfig(url=pg_url, password_file=str(pg_server.password_file))
    backends = [await open_state(config), await open_state(config)]
    yield backends
    for backend in backends:
        await backend.close()


@contextmanager
def clock_ahead(monkeypatch: pytest.MonkeyPatch, seconds: float) -> Iterator[None]:
    """This machine's wall clock ``seconds`` ahead (a fast sidecar, or a forward step)."""
    real = time.time
    with monkeypatch.context() as patched:
        patched.setattr(time, "time", lambda: real() + seconds)
        yield


def day_key(at: float) -> str:
    return window_key("day", datetime.fromtimestamp(at, UTC))


def closed_before(at: float) -> dict[str, str]:
    """The cut-offs a budget guard whose clock reads ``at`` prunes with."""
    return windows_closed_before(datetime.fromtimestamp(at, UTC))


async def spend(backend: StateBackend, window: str, amount: float) -> None:
    reservation = f"r-{window}-{amount}"
    await backend.budgets.reserve(reservation, [Hold("refunds", window, "agent:bot", amount)])
    await backend.budgets.settle(reservation, None)


async def spent(backend: StateBackend, window: str) -> float:
    rows = await backend.budgets.window_counters("refunds", window)
    return rows[0].spent if rows else 0.0


def sessions(backend: StateBackend) -> SessionRepo:
    assert backend.sessions is not None
    return backend.sessions


def action(call_id: str) -> Action:
    return Action(
        action_id=f"act_{call_id}",
        agent=Agent("bot"),
        kind=ActionKind.TOOL_CALL,
        protocol="openai.chat",
        stage=Stage.PROPOSED,
        request=RequestMeta("POST", "openai", "/v1/chat/completions"),
        tool="search_kb",
        arguments={"q": call_id},
    )


def put(call_id: str, at: float) -> LinkOp:
    return LinkOp("put", call_id, Link(action(call_id), f"dec_{call_id}"), at=at)


# -- budget windows -------------------------------------------------------------------------


async def test_a_guard_days_ahead_keeps_todays_budget_counters(open_backend: Opener) -> None:
    a, b = await open_backend(), await open_backend()
    now = time.time()
    await spend(a, day_key(now), 500.0)  # today's cap used up, on sidecar A
    await spend(a, day_key(now - 10 * DAY), 80.0)  # a window closed long ago
    # B's budget guard reads a clock three days ahead: its cut-off is after today.
    await b.budgets.prune_windows(closed_before(now + 3 * DAY))
    assert await spent(a, day_key(now)) == 500.0  # the cap still holds for the fleet
    assert await spent(a, day_key(now - 10 * DAY)) == 0.0  # what was closed still goes
    # A correct clock's prune is the one it always was.
    await spend(a, day_key(now - 3 * DAY), 40.0)
    await a.budgets.prune_windows(closed_before(now))
    assert await spent(a, day_key(now - 3 * DAY)) == 0.0
    assert await spent(a, day_key(now)) == 500.0


async def test_todays_windows_are_kept_and_the_hold_back_logged_once(
    open_backend: Opener, caplog: pytest.LogCaptureFixture
) -> None:
    a = await open_backend()
    now = time.time()
    month = datetime.fromtimestamp(now, UTC).strftime("month:%Y-%m")
    await spend(a, month, 7.0)
    await spend(a, day_key(now), 9.0)
    ahead = closed_before(now + 70 * DAY)  # over two months ahead: this month's cut too
    with caplog.at_level(logging.WARNING, logger="warden.state"):
        assert await a.budgets.prune_windows(ahead) == 0
        assert await a.budgets.prune_windows(ahead) == 0
    assert await spent(a, month) == 7.0
    assert await spent(a, day_key(now)) == 9.0
    held = [r.getMessage() for r in caplog.records if "budget counters" in r.getMessage()]
    assert len(held) == 1, held  # once, not at every prune nor for every kind
    assert "is past the day before the store's present" in held[0]


async def test_a_window_kind_nothing_counts_in_any_more_is_deleted_on_time(
    open_backend: Opener,
) -> None:
    # A per-customer cap changed from hourly to daily ten days ago, on a correct clock:
    # its last hour's counters name a customer, and go two days after their day.
    a = await open_backend()
    now = time.time()
    old_hour = window_key("hour", datetime.fromtimestamp(now - 10 * DAY, UTC))
    await a.budgets.reserve("r-h", [Hold("refunds", old_hour, "customer:c-7", 5.0)])
    await a.budgets.settle("r-h", None)
    await spend(a, day_key(now), 9.0)
    await a.budgets.prune_windows(closed_before(now))
    assert await a.budgets.window_counters("refunds", old_hour) == ()
    assert await spent(a, day_key(now)) == 9.0


async def test_a_store_counting_only_monthly_still_deletes_old_hours(
    open_backend: Opener,
) -> None:
    # Only monthly caps count now; an hourly one was dropped three days ago. On SQLite
    # the day comes from the session rows written today, not only from the month.
    a = await open_backend()
    now = time.time()
    month = datetime.fromtimestamp(now, UTC).strftime("month:%Y-%m")
    old_hour = window_key("hour", datetime.fromtimestamp(now - 3 * DAY, UTC))
    await spend(a, old_hour, 5.0)
    await spend(a, month, 7.0)
    await sessions(a).add("bot\x1flive", {"calls:issue_refund": 1})
    await a.budgets.prune_windows(closed_before(now))
    assert await spent(a, old_hour) == 0.0
    assert await spent(a, month) == 7.0


async def test_a_sidecar_ahead_of_the_databases_clock_prunes_no_window(
    pg_backends: list[StateBackend],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # On PostgreSQL the database's clock bounds every sidecar, even one that has
    # already written counters in the window its own clock says is today.
    a, b = pg_backends
    now = time.time()
    await spend(a, day_key(now), 500.0)
    with clock_ahead(monkeypatch, 3 * DAY), caplog.at_level(logging.WARNING, "warden.state"):
        await spend(b, day_key(time.time()), 100.0)
        assert await b.budgets.prune_windows(closed_before(time.time())) == 0
    assert await spent(a, day_key(now)) == 500.0
    assert any("ahead of the database's" in r.getMessage() for r in caplog.records)


# -- session state --------------------------------------------------------------------------


async def test_session_state_outlives_a_prune_by_a_clock_days_ahead(
    open_backend: Opener, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = await open_backend(), await open_backend()
    with clock_ahead(monkeypatch, -8 * DAY):  # a session last used eight days ago
        await sessions(a).add("bot\x1fold", {"account_change": 1})
    await sessions(a).add("bot\x1flive", {"account_change": 2})
    await sessions(a).record_calls(
        [CallRecord("call_1", "dec_1", "update_email", "d", "allow", None, time.time())]
    )
    assert await sessions(a).claim_id("mcp:https://crm", "mcp-sess-abc", "agent-A") == "agent-A"
    with clock_ahead(monkeypatch, 8 * DAY), caplog.at_level(logging.WARNING, "warden.state"):
        await sessions(b).prune(WEEK)
        await sessions(b).prune(WEEK)
    # What is in use stays: the counters, the decided call, the session id's owner.
    assert await sessions(a).counters("bot\x1flive") == {"account_change": 2}
    assert list(await sessions(a).calls(["call_1"])) == ["call_1"]
    assert await sessions(a).claim_id("mcp:https://crm", "mcp-sess-abc", "agent-B") == "agent-A"
    # What was untouched for longer than sessions.ttl_s still goes.
    assert await sessions(a).counters("bot\x1fold") == {}
    held = [r.getMessage() for r in caplog.records if "session state" in r.getMessage()]
    assert len(held) == 1, held  # once, not at every prune


async def test_a_sidecar_ahead_of_the_databases_clock_frees_no_session_id(
    pg_backends: list[StateBackend], monkeypatch: pytest.MonkeyPatch
) -> None:
    # B writes with its fast clock too: its own rows are the newest the store holds,
    # yet the database's clock bounds its prune.
    a, b = pg_backends
    await sessions(a).add("bot\x1flive", {"account_change": 2})
    assert await sessions(a).claim_id("mcp:https://crm", "mcp-sess-abc", "agent-A") == "agent-A"
    with clock_ahead(monkeypatch, 8 * DAY):
        await sessions(b).add("bot\x1fother", {"account_change": 1})
        await sessions(b).prune(WEEK)
    assert await sessions(a).counters("bot\x1flive") == {"account_change": 2}
    assert await sessions(a).claim_id("mcp:https://crm", "mcp-sess-abc", "agent-B") == "agent-A"


async def test_a_short_session_ttl_keeps_the_newest_rows_through_a_forward_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # SQLite has no database clock: with sessions.ttl_s under the hour of grace, the
    # cut-off used to land past the newest row, and one forward step emptied the tables.
    config = StateConfig(url=f"sqlite:///{tmp_path}/state.db")
    a = await open_state(config)
    try:
        await sessions(a).add("bot\x1flive", {"account_change": 2})
        assert await sessions(a).claim_id("mcp:https://crm", "mcp-sess-abc", "agent-A") == (
            "agent-A"
        )
        with clock_ahead(monkeypatch, 3 * DAY):
            assert await sessions(a).prune(1800.0) == 0
        assert await sessions(a).counters("bot\x1flive") == {"account_change": 2}
        assert await sessions(a).claim_id("mcp:https://crm", "mcp-sess-abc", "agent-B") == (
            "agent-A"
        )
    finally:
        await a.close()


@pytest.mark.parametrize("ttl", [60.0, 1800.0, 3600.0])
def test_a_prune_cut_off_never_passes_the_newest_row(ttl: float) -> None:
    # However far past it the clock here is, and a correct clock's cut-off is left as it
    # is while the store is written to.
    clock, newest = PruneClock("test rows"), 1_000_000.0
    for local in (newest + 1.0, newest + 3601.0, newest + 3 * DAY):
        assert clock.cutoff(local - ttl, local=local, newest=newest) < newest
    assert clock.cutoff(newest + 1.0 - ttl, local=newest + 1.0, newest=newest) == (
        newest + 1.0 - ttl
    )


# -- call links -----------------------------------------------------------------------------


async def test_call_links_outlive_a_batch_from_a_clock_days_ahead(
    open_backend: Opener, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = await open_backend(), await open_backend()
    now = time.time()
    await a.links.apply([put("call_old", now - 2 * DAY), put("call_a", now)], prune_before=None)
    # B's link writer prunes with its batch, by its clock: links older than a day.
    with clock_ahead(monkeypatch, 2 * DAY):
        ahead = time.time()
        await b.links.apply([put("call_b", ahead)], prune_before=ahead - DAY)
    assert await a.links.count() == 2  # call_a and call_b: only call_old went
    links, _ = await a.links.take(["call_a"], newer_than=now - DAY)
    assert list(links) == ["call_a"]  # its result, when it comes, is still linked
