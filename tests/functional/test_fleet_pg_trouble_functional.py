"""A fleet on PostgreSQL in trouble: a lock another session holds, a read-only server,
connections PostgreSQL dropped. Decisions fail closed in time, the kill switches keep
reaching every sidecar, and `/readyz` says what is wrong.

The trouble is made as an operator makes it: a second psycopg session (an SRE's psql)
holds a row or table lock in a transaction left open, or ends Warden's sessions.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp
import openai
import psycopg
import pytest

from tests.functional.conftest import make_config
from tests.pg import APP_USER, SUPERUSER, PgServer
from tests.sdk_calls import function_calls
from warden.config import Config
from warden.server import Warden
from warden.testing import Call, MockLLM, Reply, last_user_text

# Each test changes what the shared server lets Warden's role do: alone, not beside others.
pytestmark = pytest.mark.serial

AGENT = "support-triage"
TOKEN = "trouble-admin-token"
ADMIN = {
    "tokens": [
        {
            "subject": "dana",
            "roles": ["admin", "approver"],
            "sha256": hashlib.sha256(TOKEN.encode()).hexdigest(),
        }
    ]
}
AUTH = {"Authorization": f"Bearer {TOKEN}"}
POLICY = """package warden

import rego.v1

default decision := {"effect": "allow"}

decision := {"effect": "require_approval", "reasons": ["closing needs a person"]} if {
    input.action.tool == "close_account"
}
"""
CAP = {
    "name": "refunds",
    "tool": "issue_refund",
    "value": "amount",
    "per": ["agent"],
    "window": "day",
    "limit": 500,
    "over": "deny",
}
UNAVAILABLE = "state store is unavailable"


def answer(_protocol: str, body: Any) -> Reply:
    text = last_user_text(body)
    if "refund" in text:
        return Reply(tool_calls=[Call("issue_refund", {"order_id": "A-1", "amount": 10})])
    if "delete" in text:
        return Reply(tool_calls=[Call("delete_customer", {"customer_id": "C-9"})])
    if "close" in text:
        return Reply(tool_calls=[Call("close_account", {"customer_id": "C-1"})])
    return Reply(text="hello")


def dbname(pg_url: str) -> str:
    return pg_url.rsplit("/", 1)[1]


@contextlib.contextmanager
def held(pg_server: PgServer, db: str, *statements: str) -> Iterator[None]:
    """An operator's session runs ``statements`` in a transaction it leaves open for as
    long as the block runs (its locks held), then rolls back."""
    conn = psycopg.connect(host=str(pg_server.base), port=pg_server.port, user=SUPERUSER, dbname=db)
    try:
        for statement in statements:
            conn.execute(statement.encode())
        yield
    finally:
        conn.rollback()
        conn.close()


def rows(pg_server: PgServer, db: str, query: str) -> list[tuple[Any, ...]]:
    with pg_server.admin(db) as conn:
        return list(conn.execute(query.encode()).fetchall())


def holds(pg_server: PgServer, db: str) -> tuple[Any, ...]:
    """What the caps count: every counter, and the reservations held."""
    return (
        rows(pg_server, db, "SELECT counter, spent, reserved FROM budget_counters ORDER BY 1"),
        rows(pg_server, db, "SELECT id FROM budget_reservations ORDER BY 1"),
    )


SESSIONS = f"FROM pg_stat_activity WHERE datname = current_database() AND usename = '{APP_USER}'"


async def until(check: Callable[[], Any], within: float = 10) -> None:
    """Wait until ``check()`` (or what it awaits) is true; fail after ``within`` s."""
    async with asyncio.timeout(within):
        while True:
            found = check()
            if inspect.isawaitable(found):
                found = await found
            if found:
                return
            await asyncio.sleep(0.05)


async def end_sessions(pg_server: PgServer, db: str) -> None:
    """End Warden's sessions, as an SRE (or a failover) does, and wait until they are gone."""
    ended = {pid for (pid,) in rows(pg_server, db, f"SELECT pid {SESSIONS}")}
    rows(pg_server, db, f"SELECT pg_terminate_backend(pid) {SESSIONS}")
    await until(
        lambda: not {pid for (pid,) in rows(pg_server, db, f"SELECT pid {SESSIONS}")} & ended
    )


@pytest.fixture
async def fleet(
    tmp_path: Path, llm: MockLLM, pg_server: PgServer, pg_url: str
) -> AsyncIterator[Callable[..., Any]]:
    llm.on_request(answer)
    policy = tmp_path / "policy"
    policy.mkdir()
    (policy / "policy.rego").write_text(POLICY)
    count = 0

    def config(state: dict[str, Any]) -> Config:
        nonlocal count
        count += 1
        return make_config(
            tmp_path,
            llm.url,
            admin=ADMIN,
            audit={"dir": str(tmp_path / f"audit-{count}")},
            policy={"bundles": [str(policy)]},
            budgets={"caps": [CAP]},
            state={"url": pg_url, "password_file": str(pg_server.password_file), **state},
        )

    async with AsyncExitStack() as stack:

        async def start(n: int = 1, **state: Any) -> list[Warden]:
            return [await stack.enter_async_context(Warden(config(state))) for _ in range(n)]

        yield start


def client(warden: Warden) -> openai.AsyncOpenAI:
    # Bounded: a call left waiting on a lock fails the test instead of hanging it.
    return openai.AsyncOpenAI(
        base_url=f"{warden.proxy_url}/openai/v1", api_key="sk-test", max_retries=0, timeout=15
    )


async def ask(warden: Warden, text: str) -> tuple[list[str], str]:
    """The tool calls let through, and the assistant's text."""
    async with client(warden) as c:
        completion = await c.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": text}]
        )
    message = completion.choices[0].message
    return [t.function.name for t in function_calls(message)], message.content or ""


async def admin(warden: Warden, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession(headers=AUTH) as http,
        http.request(method, warden.admin_url + path, json=body) as resp,
    ):
        return resp.status, await resp.json(content_type=None)


async def state_of(warden: Warden) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(warden.admin_url + "/readyz") as resp,
    ):
        state: dict[str, Any] = (await resp.json())["state"]
    return state


async def state_up_metric(warden: Warden) -> str:
    async with (
        aiohttp.ClientSession(headers=AUTH) as http,
        http.get(warden.admin_url + "/metrics") as resp,
    ):
        text = await resp.text()
    return next(line for line in text.splitlines() if line.startswith("warden_state_up "))


async def test_a_capped_call_behind_a_held_counter_row_is_denied_in_time_and_holds_nothing(
    fleet: Callable[..., Any], pg_server: PgServer, pg_url: str
) -> None:
    (warden,) = await fleet()
    db = dbname(pg_url)
    assert (await ask(warden, "refund please"))[0] == ["issue_refund"]
    before = holds(pg_server, db)
    with held(pg_server, db, "SELECT * FROM budget_counters FOR UPDATE"):
        # Before: it waited for as long as the lock was held, then was decided for a
        # caller long gone and its value held against the cap for a day.
        calls, text = await ask(warden, "refund please")
        assert calls == []
        assert UNAVAILABLE in text
        # A store that fails its calls is not reported up.
        state = await state_of(warden)
        assert state["up"] is False
        assert (await state_up_metric(warden)).endswith(" 0.0")
    assert holds(pg_server, db) == before  # the denied call holds nothing
    assert (await ask(warden, "refund please"))[0] == ["issue_refund"]


async def test_a_reservation_landing_after_its_caller_was_answered_is_released(
    fleet: Callable[..., Any], pg_server: PgServer, pg_url: str
) -> None:
    # The lock outlasts the call's deadline, and is released before the lock timeout: the
    # reservation lands after the caller was told the store is unavailable.
    (warden,) = await fleet(call_timeout_s=0.5, lock_timeout_s=10, statement_timeout_s=10)
    db = dbname(pg_url)
    assert (await ask(warden, "refund please"))[0] == ["issue_refund"]
    before = holds(pg_server, db)
    reserving = (
        "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
        "AND query LIKE '%warden_reserve%' AND pid <> pg_backend_pid()"
    )
    with held(pg_server, db, "SELECT * FROM budget_counters FOR UPDATE"):
        calls, text = await ask(warden, "refund please")
        assert calls == []
        assert UNAVAILABLE in text
        assert rows(pg_server, db, reserving) == [(1,)]  # still on its way, behind the lock
    await until(lambda: rows(pg_server, db, reserving) == [(0,)])
    # It landed; no decision uses it, so it is released, not held against the cap for a day.
    await until(lambda: holds(pg_server, db) == before)


async def test_a_switch_saved_elsewhere_reaches_a_sidecar_whose_pool_waits_on_a_lock(
    fleet: Callable[..., Any], pg_server: PgServer, pg_url: str
) -> None:
    a, c = await fleet(2, pool_max_size=2)
    assert (await ask(a, "refund please"))[0] == ["issue_refund"]
    assert (await ask(a, "delete the customer"))[0] == ["delete_customer"]
    switches = a.killswitches
    assert switches is not None
    with held(pg_server, dbname(pg_url), "SELECT * FROM budget_counters FOR UPDATE"):
        stop = asyncio.Event()

        async def keep_refunding() -> None:
            # Capped calls keep A's pool busy, all waiting on the counter row.
            while not stop.is_set():
                with contextlib.suppress(openai.APIError):
                    await ask(a, "refund please")

        busy = [asyncio.ensure_future(keep_refunding()) for _ in range(4)]
        try:
            await asyncio.sleep(0.5)
            kill = {"scope": "tool", "target": "delete_customer", "reason": "incident 12"}
            status, _ = await admin(c, "POST", "/v1/killswitches", kill)
            assert status == 201
            async with asyncio.timeout(8):
                while switches.is_killed(AGENT, None, "delete_customer") is None:
                    await switches.wait_changed()
            calls, text = await ask(a, "delete the customer")
            assert calls == []
            assert "incident 12" in text
        finally:
            stop.set()
            for task in busy:
                task.cancel()
            await asyncio.gather(*busy, return_exceptions=True)


async def test_a_reported_change_that_cannot_be_read_says_so_in_readyz(
    fleet: Callable[..., Any], pg_server: PgServer, pg_url: str
) -> None:
    (warden,) = await fleet()
    db = dbname(pg_url)
    assert (await state_of(warden))["up"] is True

    async def unread() -> bool:
        return "killswitch_change_unread_s" in await state_of(warden)

    async def read() -> bool:
        return not await unread()

    with held(pg_server, db, "LOCK TABLE killswitches IN ACCESS EXCLUSIVE MODE"):
        with pg_server.admin(db) as conn:
            conn.execute("SELECT pg_notify('warden_killswitches', 'ks_elsewhere')")
        await until(unread)
        assert (await state_of(warden))["up"] is False
    # Read again once the lock is gone, and said so.
    await until(read)


async def test_a_store_that_refuses_writes_is_not_reported_up(
    fleet: Callable[..., Any], pg_server: PgServer, pg_url: str
) -> None:
    (warden,) = await fleet()
    db = dbname(pg_url)
    assert (await ask(warden, "refund please"))[0] == ["issue_refund"]
    with pg_server.admin(db) as conn:
        conn.execute(
            f'ALTER ROLE {APP_USER} IN DATABASE "{db}" SET default_transaction_read_only = on'
        )
    await end_sessions(pg_server, db)
    try:
        # The change feed is back (it only reads): before, that was all /readyz looked at.
        listening = f"SELECT count(*) {SESSIONS} AND query LIKE 'LISTEN%'"
        await until(lambda: rows(pg_server, db, listening) != [(0,)])
        calls, text = await ask(warden, "refund please")
        assert calls == []
        assert UNAVAILABLE in text
        assert (await state_of(warden))["up"] is False
        assert (await state_up_metric(warden)).endswith(" 0.0")
    finally:
        with pg_server.admin(db) as conn:
            conn.execute(
                f'ALTER ROLE {APP_USER} IN DATABASE "{db}" RESET default_transaction_read_only'
            )


async def test_connections_postgresql_dropped_are_replaced_before_a_call_uses_them(
    fleet: Callable[..., Any], pg_server: PgServer, pg_url: str
) -> None:
    (warden,) = await fleet()
    db = dbname(pg_url)
    refunds = await asyncio.gather(*(ask(warden, "refund please") for _ in range(4)))
    assert all(calls == ["issue_refund"] for calls, _ in refunds)
    await end_sessions(pg_server, db)
    # Before: the first calls were given the dead connections, and denied.
    assert (await ask(warden, "refund please"))[0] == ["issue_refund"]
    kill = {"scope": "tool", "target": "x_tool", "reason": "drill"}
    status, _ = await admin(warden, "POST", "/v1/killswitches", kill)
    assert status == 201


async def test_a_grant_does_not_outlive_a_switch_the_store_saved_late(
    fleet: Callable[..., Any], pg_server: PgServer, pg_url: str
) -> None:
    a, b = await fleet(2)
    db = dbname(pg_url)
    calls, _ = await ask(a, "close the account")
    assert calls == []
    _, body = await admin(b, "GET", "/v1/approvals?status=pending")
    (item,) = body["approvals"]
    status, _ = await admin(b, "POST", f"/v1/approvals/{item['id']}/approve", {})
    assert status == 200
    # Neither the switch nor the rejection of what it covers can be saved as it is thrown.
    with held(
        pg_server,
        db,
        "LOCK TABLE killswitches IN SHARE MODE",
        "SELECT * FROM approvals FOR UPDATE",
    ):
        kill = {"scope": "agent", "target": AGENT, "reason": "incident 7"}
        status, body = await admin(b, "POST", "/v1/killswitches", kill)
        assert status == 503
        assert body["error"]["code"] == "state_unavailable"
    # Saved in the background once the lock is gone: the grant is rejected with it.
    query = f"SELECT status FROM approvals WHERE id = '{item['id']}'"
    await until(lambda: rows(pg_server, db, query) == [("rejected",)])
    _, listed = await admin(b, "GET", "/v1/killswitches")
    (switch,) = listed["killswitches"]
    status, _ = await admin(b, "DELETE", f"/v1/killswitches/{switch['id']}?reason=resolved")
    assert status == 200
    switches = a.killswitches
    assert switches is not None
    async with asyncio.timeout(5):
        while switches.active():
            await switches.wait_changed()
    calls, _ = await ask(a, "close the account")
    assert calls == []  # held for a new approval, not let through on the old grant


def restart_options(pg_server: PgServer) -> str:
    """How tests/pg.py started the server (same port and socket folder)."""
    return (
        f"-k {pg_server.base} -c listen_addresses=127.0.0.1 -p {pg_server.port} -c fsync=off "
        "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
    )


async def test_calls_are_served_once_postgresql_is_back_from_an_outage(
    fleet: Callable[..., Any], pg_server: PgServer, pg_url: str
) -> None:
    (warden,) = await fleet(pool_timeout_s=0.5)
    db = dbname(pg_url)
    assert (await ask(warden, "refund please"))[0] == ["issue_refund"]
    await asyncio.to_thread(pg_server.pg_ctl, "-m", "fast", "-w", "-t", "30", "stop")
    try:
        # Calls while it is down: the pool's reconnection backs off (1, 2, 4, 8 s ...).
        for _ in range(8):
            calls, text = await ask(warden, "refund please")
            assert calls == []
            assert UNAVAILABLE in text
            await asyncio.sleep(0.5)
    finally:
        log = str(pg_server.base / "server.log")
        options = restart_options(pg_server)
        await asyncio.to_thread(
            pg_server.pg_ctl, "-o", options, "-l", log, "-w", "-t", "30", "start"
        )
    listening = f"SELECT count(*) {SESSIONS} AND query LIKE 'LISTEN%'"
    await until(lambda: rows(pg_server, db, listening) != [(0,)])
    # Before: denied until the pool's next attempt, tens of seconds on after a long outage.
    assert (await ask(warden, "refund please"))[0] == ["issue_refund"]


def row_held(switch_id: str) -> str:
    """An operator's lock on one switch's row: a clearing of it waits (a call stuck on the
    kill switches' connection, as behind a frozen backend)."""
    return f"SELECT * FROM killswitches WHERE id = '{switch_id}' FOR UPDATE"


async def test_a_switch_call_stuck_on_its_connection_leaves_the_switches_working(
    fleet: Callable[..., Any], pg_server: PgServer, pg_url: str
) -> None:
    a, b = await fleet(2, call_timeout_s=1, lock_timeout_s=60, statement_timeout_s=60)
    switches = a.killswitches
    assert switches is not None
    kill = {"scope": "tool", "target": "issue_refund", "reason": "incident 3"}
    status, switch = await admin(a, "POST", "/v1/killswitches", kill)
    assert status == 201
    with held(pg_server, dbname(pg_url), row_held(switch["id"])):
        status, _ = await admin(a, "DELETE", f"/v1/killswitches/{switch['id']}")
        assert status == 503
        # Before: the clearing kept A's switch connection for as long as it waited, and
        # every switch read and save on A waited behind it.
        other = {"scope": "tool", "target": "delete_customer", "reason": "incident 4"}
        status, _ = await admin(b, "POST", "/v1/killswitches", other)
        assert status == 201
        async with asyncio.timeout(10):
            while switches.is_killed(AGENT, None, "delete_customer") is None:
                await switches.wait_changed()
        own = {"scope": "agent", "target": "other-bot", "reason": "drill"}
        status, _ = await admin(a, "POST", "/v1/killswitches", own)
        assert status == 201


async def test_a_clearing_answered_as_failed_leaves_the_switch_in_force_everywhere(
    fleet: Callable[..., Any], pg_server: PgServer, pg_url: str
) -> None:
    a, b = await fleet(2, call_timeout_s=1, lock_timeout_s=60, statement_timeout_s=60)
    db = dbname(pg_url)
    kill = {"scope": "tool", "target": "issue_refund", "reason": "incident 5"}
    status, switch = await admin(a, "POST", "/v1/killswitches", kill)
    assert status == 201
    with held(pg_server, db, row_held(switch["id"])):
        status, body = await admin(a, "DELETE", f"/v1/killswitches/{switch['id']}")
        assert status == 503
        assert "stays in force" in body["error"]["message"]
    # Before: the clearing given up on went on, and landed once the lock was gone.
    clearing = (
        f"SELECT count(*) {SESSIONS} AND query LIKE 'UPDATE killswitches%' AND state <> 'idle'"
    )
    await until(lambda: rows(pg_server, db, clearing) == [(0,)])
    query = f"SELECT cleared_at FROM killswitches WHERE id = '{switch['id']}'"
    assert rows(pg_server, db, query) == [(None,)]
    for warden in (a, b):
        calls, text = await ask(warden, "refund please")
        assert calls == []
        assert "incident 5" in text


async def test_a_grant_consumed_after_its_call_was_refused_is_put_back(
    fleet: Callable[..., Any], pg_server: PgServer, pg_url: str
) -> None:
    (warden,) = await fleet(call_timeout_s=1, lock_timeout_s=60, statement_timeout_s=60)
    db = dbname(pg_url)
    assert (await ask(warden, "close the account"))[0] == []
    _, body = await admin(warden, "GET", "/v1/approvals?status=pending")
    (item,) = body["approvals"]
    status, _ = await admin(warden, "POST", f"/v1/approvals/{item['id']}/approve", {})
    assert status == 200
    with held(pg_server, db, "LOCK TABLE approvals IN SHARE MODE"):
        calls, _ = await ask(warden, "close the account")  # the grant cannot be taken now
        assert calls == []
    # The consumption given up on lands once the lock is gone: before, the grant was
    # used up by a call that never ran, and the retry needed a new approval.
    consuming = (
        f"SELECT count(*) {SESSIONS} AND query LIKE '%status = ''consumed''%' AND state <> 'idle'"
    )
    approved = f"SELECT status FROM approvals WHERE id = '{item['id']}'"
    await until(lambda: rows(pg_server, db, consuming) == [(0,)])
    await until(lambda: rows(pg_server, db, approved) == [("approved",)])
    assert (await ask(warden, "close the account"))[0] == ["close_account"]
