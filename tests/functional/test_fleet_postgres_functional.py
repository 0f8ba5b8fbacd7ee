"""A fleet of sidecars on one real PostgreSQL: caps, approvals and kill switches are shared.

Three (or two) in-process Wardens on their own ports and audit logs share one
database, as the sidecars of an agent's replicas do. Driven with the official
openai SDK and the admin API, as in the single-sidecar tests.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from tests.functional.conftest import make_config
from tests.pg import APP_PASSWORD, PgServer
from tests.sdk_calls import function_calls
from warden.config import Config
from warden.server import Warden
from warden.testing import Call, Fault, MockLLM, Reply

# A kill switch must reach another sidecar within 1 s: run alone, not beside other tests.
pytestmark = pytest.mark.serial

MESSAGES: Any = [{"role": "user", "content": "refund please"}]
TOKEN = "fleet-admin-token"
ADMIN = {
    "tokens": [
        {
            "subject": "dana",
            "roles": ["admin", "approver"],
            "groups": ["support-leads"],
            "sha256": hashlib.sha256(TOKEN.encode()).hexdigest(),
        }
    ]
}
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ALLOW_ALL = 'package warden\n\nimport rego.v1\n\ndecision := {"effect": "allow"}\n'

Fleet = Callable[..., AsyncIterator[list[Warden]]]


def sidecar_config(
    tmp_path: Path, llm: MockLLM, pg_server: PgServer, pg_url: str, n: int, **overrides: Any
) -> Config:
    return make_config(
        tmp_path,
        llm.url,
        admin=ADMIN,
        audit={"dir": str(tmp_path / f"audit-{n}")},
        state={"url": pg_url, "password_file": str(pg_server.password_file)},
        **overrides,
    )


@pytest.fixture
async def fleet(
    tmp_path: Path, llm: MockLLM, pg_server: PgServer, pg_url: str
) -> AsyncIterator[Callable[..., Any]]:
    async with AsyncExitStack() as stack:

        async def start(count: int, **overrides: Any) -> list[Warden]:
            return [
                await stack.enter_async_context(
                    Warden(sidecar_config(tmp_path, llm, pg_server, pg_url, i, **overrides))
                )
                for i in range(count)
            ]

        yield start


def client(warden: Warden, **kw: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"{warden.proxy_url}/openai/v1", api_key="sk-test", max_retries=0, **kw
    )


async def admin(warden: Warden, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession(headers=AUTH) as http,
        http.request(method, warden.admin_url + path, json=body) as resp,
    ):
        return resp.status, await resp.json()


async def test_sixty_refunds_over_three_sidecars_against_room_for_ten(
    fleet: Callable[..., Any], llm: MockLLM, tmp_path: Path
) -> None:
    llm.on_request(
        lambda _proto, _body: Reply(
            tool_calls=[Call("issue_refund", {"order_id": "A-1", "amount": 50, "currency": "USD"})]
        )
    )
    policy = tmp_path / "allow-all"
    policy.mkdir()
    (policy / "policy.rego").write_text(ALLOW_ALL)
    cap = {
        "name": "refunds",
        "tool": "issue_refund",
        "value": "amount",
        "per": ["agent"],
        "window": "day",
        "limit": 500,
        "over": "deny",
    }
    sidecars = await fleet(3, budgets={"caps": [cap]}, policy={"bundles": [str(policy)]})
    clients = [client(w) for w in sidecars]
    try:
        completions = await asyncio.gather(
            *(
                clients[i % 3].chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
                for i in range(60)
            )
        )
    finally:
        for c in clients:
            await c.close()
    delivered = [x for x in completions if function_calls(x.choices[0].message)]
    assert len(delivered) == 10
    blocked = [x.choices[0].message.content or "" for x in completions if x not in delivered]
    assert all("refunds cap" in text for text in blocked)


async def test_an_approval_raised_on_a_is_decided_through_b(
    fleet: Callable[..., Any], llm: MockLLM
) -> None:
    big = Call("issue_refund", {"order_id": "A-1003", "amount": 450, "currency": "USD"})
    llm.script(Reply(tool_calls=[big]))
    a, b = await fleet(2, approvals={"mode": "hold", "keepalive_s": 0.2})
    async with client(a, timeout=60) as c:
        agent = asyncio.ensure_future(
            c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        )
        async with asyncio.timeout(10):
            while True:
                _, body = await admin(b, "GET", "/v1/approvals?status=pending")
                if body["approvals"]:
                    break
                await asyncio.sleep(0.05)
        (item,) = body["approvals"]
        assert not agent.done()
        status, _ = await admin(b, "POST", f"/v1/approvals/{item['id']}/approve", {})
        assert status == 200
        # Released by the change feed, well before the waiter's backstop re-read (5 s).
        async with asyncio.timeout(3):
            completion = await agent
    calls = function_calls(completion.choices[0].message)
    assert [t.function.name for t in calls] == ["issue_refund"]


async def test_a_kill_switch_thrown_on_b_cuts_a_live_stream_on_a(
    fleet: Callable[..., Any], llm: MockLLM
) -> None:
    llm.script(Reply(text="one two three four five six", fault=Fault("hang", after=3)))
    a, b = await fleet(2)
    received: list[str] = []

    async def read_until_cut(c: openai.AsyncOpenAI) -> None:
        stream = await c.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True
        )
        async with asyncio.timeout(5):
            async for chunk in stream:
                received.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
                if len(received) == 1:
                    kill = {"scope": "agent", "target": "support-triage", "reason": "incident 9"}
                    status, _ = await admin(b, "POST", "/v1/killswitches", kill)
                    assert status == 201

    async with client(a) as c:
        with pytest.raises(openai.APIError, match="incident 9"):
            await read_until_cut(c)
    assert received


async def test_kill_switches_reach_the_other_sidecar_within_a_second(
    fleet: Callable[..., Any],
) -> None:
    a, b = await fleet(2)
    switches = a.killswitches
    assert switches is not None
    for i in range(5):
        kill = {"scope": "tool", "target": f"tool-{i}", "reason": "drill"}
        status, body = await admin(b, "POST", "/v1/killswitches", kill)
        assert status == 201
        async with asyncio.timeout(1):
            while switches.is_killed("any", None, f"tool-{i}") is None:
                await switches.wait_changed()
        status, _ = await admin(b, "DELETE", f"/v1/killswitches/{body['id']}")
        assert status == 200
        async with asyncio.timeout(1):
            while switches.is_killed("any", None, f"tool-{i}") is not None:
                await switches.wait_changed()


async def test_the_password_never_reaches_the_logs(
    fleet: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    (a,) = await fleet(1)
    async with aiohttp.ClientSession() as http, http.get(a.admin_url + "/readyz") as resp:
        assert resp.status == 200
    assert APP_PASSWORD not in caplog.text
