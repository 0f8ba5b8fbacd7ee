"""Shipping a running Warden's audit log to PostgreSQL, and surviving a PostgreSQL outage.

Warden runs in-process on real ports and is driven with the official openai
SDK. The outage test starts a PostgreSQL server of its own (tests/pg.py), so
it can stop and restart it without disturbing the session's server: Warden
keeps both its state and its central audit store there.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, cast

import aiohttp
import openai
import pytest

from tests import pg
from tests.functional.conftest import make_config
from tests.pg import APP_PASSWORD, PgServer
from tests.sdk_calls import function_calls
from warden.audit.verify import iter_records
from warden.cli_audit import main as audit_cli
from warden.server import Warden
from warden.testing import Call, MockLLM, Reply

MESSAGES: Any = [{"role": "user", "content": "refund please"}]
CLOSE: Any = [{"role": "user", "content": "close the account"}]
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


def client(warden: Warden) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"{warden.proxy_url}/openai/v1", api_key="sk-test", max_retries=0, timeout=30
    )


async def readyz(warden: Warden) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http, http.get(warden.admin_url + "/readyz") as resp:
        return resp.status, await resp.json()


async def metrics(warden: Warden) -> str:
    async with aiohttp.ClientSession() as http, http.get(warden.admin_url + "/metrics") as resp:
        return await resp.text()


def central_rows(server: PgServer, db: str) -> list[tuple[int, bytes]]:
    with server.admin(db) as conn:
        rows = conn.execute("SELECT idx, line FROM audit_records ORDER BY idx").fetchall()
    return [(int(cast("int", i)), bytes(cast("bytes", line))) for i, line in rows]


async def verify_cli(url: str, password_file: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """``warden audit verify --url`` (it runs its own event loop: in a thread here)."""
    argv = ["verify", "--url", url, "--password-file", str(password_file)]
    code = await asyncio.to_thread(audit_cli, argv)
    out = capsys.readouterr().out
    assert code == 0, out
    return out


def llm_replies(llm: MockLLM) -> None:
    def reply(_proto: str, body: Any) -> Reply:
        text = str(body.get("messages", [{}])[-1].get("content", ""))
        if "close" in text:
            return Reply(tool_calls=[Call("close_account", {"customer_id": "C-1"})])
        return Reply(tool_calls=[Call("issue_refund", {"order_id": "A-1", "amount": 50})])

    llm.on_request(reply)


@pytest.fixture
def policy(tmp_path: Path) -> Path:
    folder = tmp_path / "policy"
    folder.mkdir()
    (folder / "policy.rego").write_text(POLICY)
    return folder


async def test_a_running_warden_ships_every_record_and_its_final_checkpoint(
    tmp_path: Path,
    llm: MockLLM,
    pg_server: PgServer,
    pg_url: str,
    policy: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    llm_replies(llm)
    config = make_config(
        tmp_path,
        llm.url,
        policy={"bundles": [str(policy)]},
        audit={
            "dir": str(tmp_path / "audit"),
            "ship": {
                "url": pg_url,
                "password_file": str(pg_server.password_file),
                "interval_s": 0.05,
            },
        },
    )
    async with Warden(config) as warden, client(warden) as c:
        for _ in range(5):
            completion = await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
            assert function_calls(completion.choices[0].message)
        async with asyncio.timeout(10):
            while True:
                _, body = await readyz(warden)
                if body["audit"]["ship"]["connected"] and not body["audit"]["ship"]["lag_records"]:
                    break
                await asyncio.sleep(0.05)
        assert "warden_audit_shipped_total" in await metrics(warden)
    local = list(iter_records(tmp_path / "audit"))
    assert len(local) >= 5
    assert central_rows(pg_server, pg_url.rsplit("/", 1)[1]) == local
    out = await verify_cli(pg_url, pg_server.password_file, capsys)
    assert f"{len(local)} records" in out
    assert f"the latest at size {len(local)}" in out  # the final checkpoint, shipped at stop
    assert APP_PASSWORD not in out


async def test_records_another_writer_holds_stop_shipping(
    tmp_path: Path,
    llm: MockLLM,
    pg_server: PgServer,
    pg_url: str,
    policy: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A cloned audit volume (or another sidecar) shipping under this log's origin: its
    records at the same positions are not counted as this log's, and shipping stops."""
    llm_replies(llm)
    ship = {"url": pg_url, "password_file": str(pg_server.password_file), "interval_s": 0.05}
    audit = {"dir": str(tmp_path / "audit"), "ship": ship}
    config = make_config(tmp_path, llm.url, policy={"bundles": [str(policy)]}, audit=audit)
    async with Warden(config) as warden, client(warden) as c:
        await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    local = list(iter_records(tmp_path / "audit"))
    db = pg_url.rsplit("/", 1)[1]
    last = len(local) - 1
    with pg_server.admin(db) as conn:  # the other writer's record in place of this log's
        conn.execute("SET session_replication_role = replica")  # past the append-only trigger
        conn.execute("UPDATE audit_records SET line = 'forged'::bytea WHERE idx = %s", (last,))
    async with Warden(config) as warden:
        async with asyncio.timeout(20):
            while "another record at position" not in caplog.text:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        _, body = await readyz(warden)
        assert body["audit"]["ship"]["connected"] is False
        assert 'warden_audit_ship_errors_total{stage="store"}' in await metrics(warden)
    assert "another writer uses this log's origin" in caplog.text
    rows = dict(central_rows(pg_server, db))
    assert rows[last] == b"forged"  # not overwritten, and not counted as shipped


# -- outages -----------------------------------------------------------------------------------


@pytest.fixture
def own_pg() -> Iterator[PgServer]:
    """A PostgreSQL server for one test, which it may stop and start again."""
    found = pg.start()
    if isinstance(found, str):
        pytest.skip(found)
    try:
        yield found
    finally:
        found.stop()


def pg_stop(server: PgServer) -> None:
    server.pg_ctl("-m", "fast", "-w", "-t", "30", "stop")


def pg_start(server: PgServer) -> None:
    """Start the server again on the same port, with the options tests/pg.py gave it."""
    options = (
        f"-k {server.base} -c listen_addresses=127.0.0.1 -p {server.port} -c fsync=off "
        "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
    )
    server.pg_ctl("-o", options, "-l", str(server.base / "server.log"), "-w", "-t", "30", "start")


@pytest.fixture
async def outage_warden(
    tmp_path: Path, llm: MockLLM, own_pg: PgServer, policy: Path
) -> AsyncIterator[tuple[Warden, str]]:
    url = own_pg.url(own_pg.create_database())
    llm_replies(llm)
    pw = str(own_pg.password_file)
    config = make_config(
        tmp_path,
        llm.url,
        policy={"bundles": [str(policy)]},
        budgets={"caps": [CAP]},
        approvals={"mode": "hold", "hold_timeout_s": 5},
        state={"url": url, "password_file": pw, "pool_timeout_s": 0.5},
        audit={
            "dir": str(tmp_path / "audit"),
            "ship": {"url": url, "password_file": pw, "interval_s": 0.05, "max_backoff_s": 0.3},
        },
    )
    warden = Warden(config)
    await warden.start()
    try:
        yield warden, url
    finally:
        await warden.stop()


async def refund(c: openai.AsyncOpenAI) -> tuple[bool, str]:
    completion = await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    message = completion.choices[0].message
    return bool(function_calls(message)), message.content or ""


async def wait_for(warden: Warden, check: Any, seconds: float = 20) -> Any:
    async with asyncio.timeout(seconds):
        while True:
            status, body = await readyz(warden)
            if check(body):
                return status, body
            await asyncio.sleep(0.05)


async def test_postgresql_stopped_and_restarted_mid_run(
    outage_warden: tuple[Warden, str],
    own_pg: PgServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    warden, url = outage_warden
    delivered = 0
    async with client(warden) as c:
        for _ in range(4):
            ok, _ = await refund(c)
            delivered += ok
        assert delivered == 4

        await asyncio.to_thread(pg_stop, own_pg)
        status, body = await wait_for(warden, lambda b: not b["state"]["up"])
        # Degraded, not unready: decisions that need no shared state still work.
        assert status == 200
        assert (body["state"]["backend"], body["state"]["up"]) == ("postgresql", False)
        down = await asyncio.gather(*(refund(c) for _ in range(5)))
        assert not any(ok for ok, _ in down)
        assert all("state store is unavailable" in text for _, text in down), down
        held = await c.chat.completions.create(model="gpt-4o-mini", messages=CLOSE)
        assert not function_calls(held.choices[0].message)
        assert "approval store is unavailable" in (held.choices[0].message.content or "")
        scraped = await metrics(warden)
        assert "warden_state_up 0.0" in scraped
        _, body = await readyz(warden)
        assert body["audit"]["ship"]["lag_records"] > 0  # the denials spool locally
        assert not body["audit"]["ship"]["connected"]

        await asyncio.to_thread(pg_start, own_pg)
        await wait_for(warden, lambda b: b["state"]["up"])
        # The cap had room for 10 and 4 were delivered: exactly 6 more pass.
        for _ in range(12):
            ok, text = await refund(c)
            if ok:
                delivered += 1
            else:
                assert "refunds cap" in text or "unavailable" in text, text
        assert delivered == 10
        await wait_for(
            warden,
            lambda b: b["audit"]["ship"]["connected"] and not b["audit"]["ship"]["lag_records"],
        )
        assert "warden_state_up 1.0" in await metrics(warden)
    await warden.stop()
    local = list(iter_records(tmp_path / "audit"))
    db = url.rsplit("/", 1)[1]
    assert central_rows(own_pg, db) == local  # no acknowledged record is missing
    out = await verify_cli(url, own_pg.password_file, capsys)
    assert f"{len(local)} records" in out
    with own_pg.admin(db) as conn:
        spent = conn.execute("SELECT spent + reserved FROM budget_counters").fetchall()
    assert spent == [(500.0,)]  # the cap never overshot


async def test_a_store_that_never_answers_does_not_stop_warden_from_starting(
    tmp_path: Path, llm: MockLLM
) -> None:
    port = pg._free_port()  # nothing listens there
    config = make_config(
        tmp_path,
        llm.url,
        audit={
            "dir": str(tmp_path / "audit"),
            "ship": {"url": f"postgresql://w@127.0.0.1:{port}/db", "max_backoff_s": 0.2},
        },
    )
    llm.on_request(lambda _p, _b: Reply(text="hello"))
    async with Warden(config) as warden, client(warden) as c:
        completion = await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        assert completion.choices[0].message.content == "hello"
        status, body = await readyz(warden)
        assert status == 200
        assert body["audit"]["ship"]["connected"] is False
        assert "warden_audit_ship_errors_total" in await metrics(warden)
