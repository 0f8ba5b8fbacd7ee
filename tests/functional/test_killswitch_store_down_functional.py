"""Kill switches while the SQLite state store refuses writes (another process holds it
with ``BEGIN EXCLUSIVE``): throwing still stops this sidecar, clearing fails closed."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from tests.functional.conftest import audit_records, make_config
from warden import cli
from warden.admin.auth import hash_token
from warden.config import Config
from warden.server import Warden
from warden.state import StateStore
from warden.testing import MockLLM

TOKEN = "admin-token-1"
ADMIN = {"tokens": [{"subject": "alice", "roles": ["admin"], "sha256": hash_token(TOKEN)}]}
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MESSAGES: Any = [{"role": "user", "content": "help"}]
AGENT = "support-triage"  # the sidecar's own agent


def client(warden: Warden) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"{warden.proxy_url}/openai/v1", api_key="sk-test", max_retries=0
    )


@contextlib.contextmanager
def locked(db: Path) -> Iterator[None]:
    """Another connection holds the database's write lock for as long as the block runs."""
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("BEGIN EXCLUSIVE")
        yield
        conn.execute("ROLLBACK")
    finally:
        conn.close()


def stored(db: Path, switch_id: str) -> bool:
    """Whether the switch is saved, and not cleared, in the state store."""
    conn = sqlite3.connect(db)
    try:
        row = conn.execute(
            "SELECT 1 FROM killswitches WHERE id = ? AND cleared_at IS NULL", (switch_id,)
        ).fetchone()
    finally:
        conn.close()
    return row is not None


def killswitch_records(audit: Path) -> list[tuple[str, str]]:
    records = [r for r in audit_records(audit) if r.get("kind") == "killswitch"]
    return [(r["body"]["action"], r["body"]["who"]) for r in records]


def config(tmp_path: Path, llm: MockLLM, audit: str = "audit") -> Config:
    return make_config(tmp_path, llm.url, admin=ADMIN, audit={"dir": str(tmp_path / audit)})


async def test_a_switch_thrown_while_the_store_is_locked_stops_this_sidecar_then_the_fleet(
    tmp_path: Path, llm: MockLLM
) -> None:
    db = tmp_path / "state.db"
    async with (
        Warden(config(tmp_path, llm)) as warden,
        aiohttp.ClientSession(base_url=warden.admin_url, headers=AUTH) as admin,
        client(warden) as agent,
    ):
        await agent.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        body = {"scope": "agent", "target": AGENT, "reason": "paying out twice"}
        with locked(db):
            async with admin.post("/v1/killswitches", json=body) as resp:
                assert resp.status == 503
                assert resp.content_type == "application/json"
                error = (await resp.json())["error"]
            assert error["code"] == "state_unavailable"
            for words in ("in force on this sidecar only", "not saved", "other sidecars"):
                assert words in error["message"]
            assert "restart" in error["message"]
            # Throwing it again here would be a second switch, cleared apart from this one.
            assert "Do not throw it again here" in error["message"]
            # In force here at once, though the store has not saved it, and a re-read of
            # the store (without it) does not lift it.
            assert warden.killswitches is not None
            await warden.killswitches.refresh()
            with pytest.raises(openai.PermissionDeniedError, match="paying out twice"):
                await agent.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
            async with admin.get("/v1/killswitches") as resp:
                (listed,) = (await resp.json())["killswitches"]
            assert listed["id"] in error["message"]
            assert not stored(db, listed["id"])

        # Once the store is back, the background saving gets it there ...
        async with asyncio.timeout(60):
            while warden.killswitches.unsaved():  # noqa: ASYNC110 - bounded by the timeout
                await asyncio.sleep(0.1)
        assert stored(db, listed["id"])
        with pytest.raises(openai.PermissionDeniedError, match="paying out twice"):
            await agent.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        # ... where every sidecar sharing it sees it.
        async with Warden(config(tmp_path, llm, "audit2")) as other, client(other) as there:
            with pytest.raises(openai.PermissionDeniedError, match="paying out twice"):
                await there.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        await warden.stop()
    # The fleet saw it late: the log says when.
    assert killswitch_records(tmp_path / "audit") == [("set", "alice"), ("saved", "warden")]


async def test_a_switch_never_saved_is_recorded_as_lapsed_when_warden_stops(
    tmp_path: Path, llm: MockLLM
) -> None:
    # Its "set" record read like any switch's, and a restart lifted it without a word.
    db = tmp_path / "state.db"
    warden = Warden(config(tmp_path, llm))
    await warden.start()
    async with aiohttp.ClientSession(base_url=warden.admin_url, headers=AUTH) as admin:
        body = {"scope": "agent", "target": AGENT, "reason": "drill"}
        with locked(db):
            async with admin.post("/v1/killswitches", json=body) as resp:
                assert resp.status == 503
            await warden.stop()
    assert killswitch_records(tmp_path / "audit") == [("set", "alice"), ("lapsed", "warden")]


async def test_two_clears_at_once_of_a_saved_switch_record_one_clearing(
    tmp_path: Path, llm: MockLLM
) -> None:
    async with (
        Warden(config(tmp_path, llm)) as warden,
        aiohttp.ClientSession(base_url=warden.admin_url, headers=AUTH) as admin,
    ):
        body = {"scope": "agent", "target": AGENT, "reason": "drill"}
        async with admin.post("/v1/killswitches", json=body) as resp:
            assert resp.status == 201
            path = f"/v1/killswitches/{(await resp.json())['id']}"

        async def clear() -> int:
            async with admin.delete(path) as resp:
                return resp.status

        statuses = sorted(await asyncio.gather(clear(), clear()))
        await warden.stop()
    assert statuses == [200, 404]
    assert killswitch_records(tmp_path / "audit") == [("set", "alice"), ("cleared", "alice")]


async def test_two_clears_at_once_of_an_unsaved_switch_record_one_clearing(
    tmp_path: Path, llm: MockLLM
) -> None:
    db = tmp_path / "state.db"
    async with (
        Warden(config(tmp_path, llm)) as warden,
        aiohttp.ClientSession(base_url=warden.admin_url, headers=AUTH) as admin,
    ):
        body = {"scope": "agent", "target": AGENT, "reason": "drill"}
        with locked(db):
            async with admin.post("/v1/killswitches", json=body) as resp:
                assert resp.status == 503
            assert warden.killswitches is not None
            (switch,) = warden.killswitches.active()
            path = f"/v1/killswitches/{switch.id}"

            async def clear() -> int:
                async with admin.delete(path) as resp:
                    return resp.status

            statuses = sorted(await asyncio.gather(clear(), clear()))
        await warden.stop()
    assert statuses == [200, 404]  # a double click: cleared once, then no such switch
    assert killswitch_records(tmp_path / "audit") == [("set", "alice"), ("cleared", "alice")]


async def test_clearing_while_the_store_is_locked_fails_closed(
    tmp_path: Path, llm: MockLLM
) -> None:
    db = tmp_path / "state.db"
    async with (
        Warden(config(tmp_path, llm)) as warden,
        aiohttp.ClientSession(base_url=warden.admin_url, headers=AUTH) as admin,
        client(warden) as agent,
    ):
        body = {"scope": "upstream", "target": "openai", "reason": "provider incident"}
        async with admin.post("/v1/killswitches", json=body) as resp:
            assert resp.status == 201
            switch = await resp.json()
        with locked(db):
            async with admin.delete(f"/v1/killswitches/{switch['id']}") as resp:
                assert resp.status == 503
                assert resp.content_type == "application/json"
                error = (await resp.json())["error"]
            assert error["code"] == "state_unavailable"
            assert "stays in force" in error["message"]
            with pytest.raises(openai.PermissionDeniedError, match="provider incident"):
                await agent.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        assert stored(db, switch["id"])
        async with admin.delete(f"/v1/killswitches/{switch['id']}") as resp:
            assert resp.status == 200
        await agent.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        await warden.stop()
    assert killswitch_records(tmp_path / "audit") == [
        ("set", "alice"),
        ("cleared", "alice"),
        ("clear_failed", "alice"),
        ("cleared", "alice"),
    ]


async def test_the_cli_says_a_switch_holds_here_only_and_clears_it_here(
    tmp_path: Path,
    llm: MockLLM,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    db = tmp_path / "state.db"
    async with Warden(config(tmp_path, llm)) as warden, client(warden) as agent:
        monkeypatch.setenv("WARDEN_ADMIN_URL", warden.admin_url)
        monkeypatch.setenv("WARDEN_TOKEN", TOKEN)

        async def run(*argv: str) -> int:
            return await asyncio.to_thread(cli.main, list(argv))

        assert warden.killswitches is not None
        with locked(db):
            assert await run("kill", "agent", AGENT, "--reason", "looping") == 1
            err = capsys.readouterr().err
            assert "503" in err
            assert "in force on this sidecar only" in err
            (switch,) = warden.killswitches.unsaved()
            assert switch.id in err
            assert warden.killswitches.is_killed(AGENT) == switch
            # Never saved, so clearing it here needs no store: nothing else has it.
            assert await run("unkill", switch.id) == 0
            assert warden.killswitches.is_killed(AGENT) is None
            assert warden.killswitches.unsaved() == ()
        await agent.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        assert not stored(db, switch.id)
        await warden.stop()
    assert killswitch_records(tmp_path / "audit") == [("set", "alice"), ("cleared", "alice")]


async def test_any_other_failure_is_the_admin_apis_json_error(
    tmp_path: Path, llm: MockLLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*_: Any) -> None:
        raise RuntimeError("an unexpected store failure")

    async with (
        Warden(config(tmp_path, llm)) as warden,
        aiohttp.ClientSession(base_url=warden.admin_url, headers=AUTH) as admin,
        client(warden) as agent,
    ):
        body = {"scope": "global", "reason": "incident"}
        async with admin.post("/v1/killswitches", json=body) as resp:
            switch = await resp.json()
        monkeypatch.setattr(StateStore, "clear_killswitch", broken)
        async with admin.delete(f"/v1/killswitches/{switch['id']}") as resp:
            assert resp.status == 500
            assert resp.content_type == "application/json"
            error = (await resp.json())["error"]
        assert error["code"] == "internal_error"
        assert "unexpected store failure" not in error["message"]
        with pytest.raises(openai.PermissionDeniedError, match="incident"):
            await agent.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
