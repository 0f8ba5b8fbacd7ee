"""With no policy active, every action is denied; a refusal that is over stops showing.

A real Warden fronts an HTTP tool (a CRM's ``GET /customers/{id}``, a
``read_only`` tool whose fallback is allow) and requires signed bundles. A
restart on an older signed release (refused as a rollback) leaves it without
a policy: the lookup is denied, not given the ``read_only`` fallback, the CRM
is never reached, and the fallback is counted as ``no_policy``. And when a
watched store is put back to the bundle that decides, after an older one was
refused, ``/readyz`` stops reporting the refusal.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import REGISTRY

from tests.functional.conftest import audit_records, make_config
from tests.functional.test_bundle_rollback_functional import (
    put_in_place,
    release,
    status_error,
    watched,
)
from tests.functional.test_changelog_functional import signing_key
from warden.server import Warden
from warden.testing import MockLLM

ROLLBACK = "before the newest bundle of this name"


@pytest.fixture
async def crm() -> AsyncIterator[tuple[str, list[str]]]:
    """A CRM answering customer lookups with personal data; yields its URL and the ids asked."""
    asked: list[str] = []

    async def customer(request: web.Request) -> web.Response:
        asked.append(request.match_info["id"])
        return web.json_response({"id": request.match_info["id"], "email": "alice@example.com"})

    app = web.Application()
    app.router.add_get("/customers/{id}", customer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}", asked
    finally:
        await runner.cleanup()


def crm_upstream(url: str) -> dict[str, object]:
    return {
        "crm": {
            "protocol": "http",
            "base_url": url,
            "timeout_s": 5,
            "routes": [
                {
                    "method": "GET",
                    "path": "/customers/{id}",
                    "tool": "get_customer",
                    "arguments": {"id": "{id}"},
                }
            ],
        }
    }


def no_policy_fallbacks() -> float:
    labels = {"reason": "no_policy", "risk": "read_only"}
    return REGISTRY.get_sample_value("warden_policy_fallbacks_total", labels) or 0.0


async def lookup(warden: Warden, customer: str) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{warden.proxy_url}/crm/customers/{customer}") as response,
    ):
        return response.status, await response.text()


async def test_a_restart_on_a_refused_bundle_denies_read_only_tools_too(
    llm: MockLLM, tmp_path: Path, crm: tuple[str, list[str]]
) -> None:
    url, asked = crm
    private, public, key_id = signing_key(tmp_path / "release")
    now = int(time.time())
    old = release(tmp_path, "old", 100, "rev-1", private, key_id, now - 3600)
    new = release(tmp_path, "new", 50, "rev-2", private, key_id, now - 60)
    folder, policy = watched(tmp_path, new, public, key_id)
    config = make_config(
        tmp_path,
        llm.url,
        policy={**policy, "watch": False},
        upstreams=crm_upstream(url),
        tools={"get_customer": {"risk": "read_only"}},
    )

    async with Warden(config) as warden:
        code, body = await lookup(warden, "C-1")
        assert code == 200, body  # rev-2 allows customer lookups
    assert asked == ["C-1"]

    put_in_place(old, folder)  # the older signed release put back, then a restart
    before = no_policy_fallbacks()
    async with Warden(config) as warden:
        status = warden.readiness()[1]["policy"]
        assert status["ready"] is False
        assert ROLLBACK in str(status["last_error"])
        code, body = await lookup(warden, "C-2")
        assert code == 403, body
        assert "alice@example.com" not in body
    assert asked == ["C-1"]  # the CRM never saw the lookup
    assert no_policy_fallbacks() == before + 1

    [record] = [
        r
        for r in audit_records(tmp_path / "audit")
        if r["kind"] == "decision" and r["action"].get("tool") == "get_customer"
    ][1:]
    decision = record["decision"]
    assert decision["effect"] == "deny"
    assert decision["guard"] == "fallback"
    assert decision["error"] == "policy_not_ready"
    assert "no policy is active" in " ".join(decision["reasons"])


async def test_readyz_forgets_a_refusal_once_the_store_holds_the_active_bundle_again(
    llm: MockLLM, tmp_path: Path
) -> None:
    private, public, key_id = signing_key(tmp_path / "release")
    now = int(time.time())
    old = release(tmp_path, "old", 100, "rev-1", private, key_id, now - 3600)
    new = release(tmp_path, "new", 50, "rev-2", private, key_id, now - 60)
    folder, policy = watched(tmp_path, new, public, key_id)

    async with Warden(make_config(tmp_path, llm.url, policy=policy)) as warden:
        assert warden.readiness()[1]["policy"]["revision"] == "rev-2"
        put_in_place(old, folder)
        await status_error(warden, ROLLBACK)
        put_in_place(new, folder)  # the store is back to what decides
        async with asyncio.timeout(30):
            while (status := warden.readiness()[1]["policy"])["last_error"] is not None:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        assert status["revision"] == "rev-2"
        assert status["last_error_at"] is None
        assert warden.readiness()[0] is True
