"""Held approvals over stdio: ``warden mcp wrap`` with ``approvals.mode: hold``.

The official MCP client calls through the wrap; a support lead decides through
the admin API of a ``warden serve`` (run in this process) that shares the
wrap's state database, as sidecars on one store do. A held call blocks nothing
else of the session, its client hears progress while it waits, and it runs at
the server exactly once when approved, never when rejected or abandoned.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.functional.conftest import make_config
from tests.functional.stdio_wrap import (
    audit_dir,
    decisions,
    state_url,
    text,
    tools_called,
    wrapped,
    write_config,
)
from warden import tasks
from warden.server import Warden

pytestmark = pytest.mark.timeout(90)

TOKEN = "lead-token-for-tests"
HOLD = {"mode": "hold", "hold_timeout_s": 60, "keepalive_s": 0.2}


@pytest.fixture
async def admin(tmp_path: Path) -> AsyncIterator[str]:
    """The admin API of a Warden sharing the wrap's state database; yields its URL."""
    config = make_config(
        tmp_path,
        "http://127.0.0.1:9",  # no model traffic in these tests
        audit={"dir": str(tmp_path / "audit-serve")},
        state={"url": state_url(tmp_path)},
        admin={
            "tokens": [
                {
                    "subject": "dana.lead",
                    "roles": ["approver"],
                    "groups": ["support-leads"],
                    "sha256": hashlib.sha256(TOKEN.encode()).hexdigest(),
                }
            ]
        },
    )
    async with Warden(config) as serve:
        yield serve.admin_url


async def pending(admin_url: str, tool: str) -> dict[str, Any]:
    """Wait until an approval for ``tool`` is pending; return it."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession(headers=headers) as http:
        for _ in range(300):
            url = f"{admin_url}/v1/approvals"
            async with http.get(url, params={"status": "pending"}) as resp:
                assert resp.status == 200, await resp.text()
                found = [a for a in (await resp.json())["approvals"] if a["tool"] == tool]
            if found:
                return dict(found[0])
            await asyncio.sleep(0.05)
    raise AssertionError(f"no approval for {tool} became pending")


async def decide(admin_url: str, approval_id: str, verb: str, comment: str) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with (
        aiohttp.ClientSession(headers=headers) as http,
        http.post(
            f"{admin_url}/v1/approvals/{approval_id}/{verb}", json={"comment": comment}
        ) as resp,
    ):
        assert resp.status == 200, await resp.text()
        return dict(await resp.json())


async def approval(admin_url: str, approval_id: str) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with (
        aiohttp.ClientSession(headers=headers) as http,
        http.get(f"{admin_url}/v1/approvals/{approval_id}") as resp,
    ):
        assert resp.status == 200, await resp.text()
        return dict(await resp.json())


async def test_a_held_call_runs_once_after_approval_and_blocks_nothing_meanwhile(
    tmp_path: Path, admin: str
) -> None:
    calls = tmp_path / "calls.jsonl"
    heard_so_far: list[tuple[float, str | None]] = []
    twice = asyncio.Event()

    async def heard(progress: float, total: float | None, message: str | None) -> None:
        heard_so_far.append((progress, message))
        if len(heard_so_far) >= 2:
            twice.set()

    async with wrapped(write_config(tmp_path, approvals=HOLD), calls) as session:
        args: dict[str, Any] = {"order_id": "A-1003", "amount": 450}
        held = tasks.spawn(
            session.call_tool("issue_refund", args, progress_callback=heard), name="held-refund"
        )
        waiting = await pending(admin, "issue_refund")
        # While the refund waits for a person, the session goes on.
        await session.send_ping()
        found = await session.call_tool("search_kb", {"query": "refund policy"})
        assert not held.done()
        assert tools_called(calls) == ["search_kb"]
        await asyncio.wait_for(twice.wait(), 30)
        assert not held.done()
        await decide(admin, waiting["id"], "approve", "photos checked")
        result = await asyncio.wait_for(held, 30)
        again = await session.call_tool("search_kb", {"query": "shipping"})
    assert not found.is_error
    assert not again.is_error
    assert not result.is_error, text(result)
    assert "A-1003" in text(result)
    assert tools_called(calls) == ["search_kb", "issue_refund", "search_kb"]
    values = [v for v, _ in heard_so_far]
    assert values == sorted(set(values))  # progress only grows
    assert "waiting for a person to approve the tool call `issue_refund`" in (
        heard_so_far[0][1] or ""
    )
    refund = [d for d in decisions(audit_dir(tmp_path)) if d["action"]["tool"] == "issue_refund"]
    assert [(d["decision"]["effect"], d["decision"]["guard"]) for d in refund] == [
        ("require_approval", "policy"),
        ("allow", "approval"),
    ]
    assert (await approval(admin, waiting["id"]))["status"] == "consumed"


async def test_a_rejected_call_never_runs(tmp_path: Path, admin: str) -> None:
    calls = tmp_path / "calls.jsonl"
    async with wrapped(write_config(tmp_path, approvals=HOLD), calls) as session:
        held = tasks.spawn(
            session.call_tool("close_account", {"customer_id": "C-1002", "reason": "asked"}),
            name="held-closure",
        )
        waiting = await pending(admin, "close_account")
        await decide(admin, waiting["id"], "reject", "open dispute; call the customer first")
        result = await asyncio.wait_for(held, 30)
    assert result.is_error
    assert "blocked the tool call `close_account`" in text(result)
    assert "open dispute" in text(result)
    assert tools_called(calls) == []
    effects = [d["decision"]["effect"] for d in decisions(audit_dir(tmp_path))]
    assert effects == ["require_approval", "deny"]


async def test_a_held_call_the_client_abandons_never_runs(tmp_path: Path, admin: str) -> None:
    calls = tmp_path / "calls.jsonl"
    async with wrapped(write_config(tmp_path, approvals=HOLD), calls) as session:
        args = {"order_id": "A-1003", "amount": 450}
        held = tasks.spawn(session.call_tool("issue_refund", args), name="abandoned-refund")
        waiting = await pending(admin, "issue_refund")
        held.cancel()  # the SDK tells the server: notifications/cancelled
        # The hold ends and its approval stays decidable, as a deferral.
        for _ in range(200):
            deferred = await approval(admin, waiting["id"])
            if deferred["mode"] == "defer":
                break
            await asyncio.sleep(0.05)
        assert deferred["mode"] == "defer"
        assert deferred["status"] == "pending"
        await decide(admin, waiting["id"], "approve", "approved after the agent gave up")
        await session.send_ping()
        # Only the agent's retry of the very same call runs, once.
        retried = await session.call_tool("issue_refund", args)
    assert held.cancelled()
    assert (await approval(admin, waiting["id"]))["status"] in ("approved", "consumed")
    assert not retried.is_error, text(retried)
    assert tools_called(calls) == ["issue_refund"]
