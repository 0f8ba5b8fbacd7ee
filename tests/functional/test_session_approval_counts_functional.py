"""Session counters of held calls, through the proxy with the official openai SDK.

The shipped customer-support bundle holds every account change for a support
lead and allows at most two (let through or held) in one conversation
(``input.session.calls`` plus ``input.session.held``). A held call counts as
held once, however often the agent proposes it again while it waits; once an
approved one goes through it counts as a call instead; a refused one stays held.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from tests.functional.conftest import audit_records, make_config
from warden.server import Warden
from warden.testing import Call, MockLLM, Reply

pytestmark = pytest.mark.timeout(90)

MESSAGES: Any = [{"role": "user", "content": "please update my contact details"}]
EMAIL = Call("update_email", {"customer_id": "C-1", "email": "ann@example.com"})
PHONE = Call("update_phone", {"customer_id": "C-1", "phone": "+1 555 0100"})
ADDRESS = Call("update_address", {"customer_id": "C-1", "address": "1 Main St"})
TOKENS = {"dana": "tok-dana-lead", "lee": "tok-lee-lead"}
LIMIT = "already made 2 account changes"


def config(tmp_path: Path, llm: MockLLM, **approvals: Any) -> Any:
    leads = [
        {
            "subject": who,
            "roles": ["approver"],
            "groups": ["support-leads"],
            "sha256": hashlib.sha256(token.encode()).hexdigest(),
        }
        for who, token in TOKENS.items()
    ]
    return make_config(
        tmp_path,
        llm.url,
        approvals={"mode": "defer", "keepalive_s": 0.2, **approvals},
        admin={"tokens": leads},
    )


async def admin(warden: Warden, method: str, path: str, who: str = "dana") -> Any:
    headers = {"Authorization": f"Bearer {TOKENS[who]}"}
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, warden.admin_url + path, json={}, headers=headers) as resp,
    ):
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def pending(warden: Warden) -> list[dict[str, Any]]:
    """The pending approvals, once there is one."""
    for _ in range(200):
        found = (await admin(warden, "GET", "/v1/approvals?status=pending"))["approvals"]
        if found:
            return list(found)
        await asyncio.sleep(0.05)
    raise AssertionError("no pending approval appeared")


@asynccontextmanager
async def agent(warden: Warden) -> AsyncIterator[openai.AsyncOpenAI]:
    """The agent's client: every request in the conversation ``conv-1``."""
    client = openai.AsyncOpenAI(
        base_url=f"{warden.proxy_url}/openai/v1",
        api_key="sk-test",
        max_retries=0,
        timeout=60,
        default_headers={"X-Warden-Session": "conv-1"},
    )
    async with client:
        yield client


async def propose(client: openai.AsyncOpenAI, llm: MockLLM, call: Call) -> tuple[bool, str]:
    """The model proposes ``call``: whether the agent got it, and what it was told instead."""
    llm.script(Reply(tool_calls=[call]))
    response = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    message = response.choices[0].message
    return bool(message.tool_calls), message.content or ""


async def kept(client: openai.AsyncOpenAI, llm: MockLLM, call: Call) -> str:
    """The model proposes ``call`` and Warden keeps it from the agent: what it says instead."""
    got, told = await propose(client, llm, call)
    assert not got, f"{call.name} reached the agent"
    return told


def policy_inputs(tmp_path: Path) -> list[tuple[str, str, dict[str, Any]]]:
    """(tool, effect, input.session) of every tool call the policy decided, in log order."""
    return [
        (r["action"]["tool"], r["decision"]["effect"], r["decision"]["input"]["session"])
        for r in audit_records(tmp_path / "audit")
        if r["kind"] == "decision"
        and r["action"]["kind"] == "tool_call"
        and r["decision"]["guard"] != "approval"
    ]


def counts(session: dict[str, Any]) -> tuple[dict[str, int], dict[str, int], int]:
    return session["calls"], session["held"], session["approvals"]


async def test_an_approved_retry_counts_as_one_call_not_a_second_hold(
    tmp_path: Path, llm: MockLLM
) -> None:
    async with Warden(config(tmp_path, llm)) as warden, agent(warden) as client:
        told = await kept(client, llm, EMAIL)
        assert "held the tool call `update_email`" in told, told
        (item,) = await pending(warden)
        await admin(warden, "POST", f"/v1/approvals/{item['id']}/approve")
        got, _ = await propose(client, llm, EMAIL)  # the retry passes once
        assert got
        # The conversation's second account change: held for a lead, not over the limit.
        told = await kept(client, llm, PHONE)
        assert "held the tool call `update_phone`" in told, told
    seen = policy_inputs(tmp_path)
    assert [(tool, effect) for tool, effect, _ in seen] == [
        ("update_email", "require_approval"),
        ("update_email", "require_approval"),
        ("update_phone", "require_approval"),
    ]
    # The retry's counts leave out the call being decided, its own hold too.
    assert counts(seen[1][2]) == ({}, {}, 0)
    assert counts(seen[2][2]) == ({"update_email": 1}, {}, 1)


async def test_a_second_approved_change_passes_and_a_third_is_over_the_limit(
    tmp_path: Path, llm: MockLLM
) -> None:
    # The second change's approved retry read its own hold beside the first call:
    # "already made 2 account changes", though only one had been made.
    async with Warden(config(tmp_path, llm)) as warden, agent(warden) as client:
        for call in (EMAIL, PHONE):
            told = await kept(client, llm, call)
            assert f"held the tool call `{call.name}`" in told, told
            (item,) = await pending(warden)
            await admin(warden, "POST", f"/v1/approvals/{item['id']}/approve")
            got, told = await propose(client, llm, call)
            assert got, told
        told = await kept(client, llm, ADDRESS)
        assert LIMIT in told, told
    seen = policy_inputs(tmp_path)
    assert [(tool, effect) for tool, effect, _ in seen] == [
        ("update_email", "require_approval"),
        ("update_email", "require_approval"),
        ("update_phone", "require_approval"),
        ("update_phone", "require_approval"),
        ("update_address", "deny"),
    ]
    assert [counts(s) for _, _, s in seen] == [
        ({}, {}, 0),
        ({}, {}, 0),
        ({"update_email": 1}, {}, 1),
        ({"update_email": 1}, {}, 1),
        ({"update_email": 1, "update_phone": 1}, {}, 2),
    ]


async def test_retries_while_a_quorum_is_gathered_are_not_new_holds(
    tmp_path: Path, llm: MockLLM
) -> None:
    async with (
        Warden(config(tmp_path, llm, required_approvals=2)) as warden,
        agent(warden) as client,
    ):
        await kept(client, llm, EMAIL)
        (item,) = await pending(warden)
        await admin(warden, "POST", f"/v1/approvals/{item['id']}/approve", "dana")
        # One vote of two: the agent's retries wait on the same approval.
        for _ in range(2):
            told = await kept(client, llm, EMAIL)
            assert item["id"] in told, told
        assert [a["id"] for a in await pending(warden)] == [item["id"]]
        await admin(warden, "POST", f"/v1/approvals/{item['id']}/approve", "lee")
        got, told = await propose(client, llm, EMAIL)
        assert got, told  # not "already made 2 account changes": one was asked for
        told = await kept(client, llm, PHONE)
        assert "held the tool call `update_phone`" in told, told
    seen = policy_inputs(tmp_path)
    assert [counts(s) for _, _, s in seen] == [
        ({}, {}, 0),
        ({}, {}, 0),  # the retries leave out their own hold
        ({}, {}, 0),
        ({}, {}, 0),
        ({"update_email": 1}, {}, 1),
    ]


async def test_a_hold_approved_while_waiting_counts_as_a_call_and_a_refused_one_stays_held(
    tmp_path: Path, llm: MockLLM
) -> None:
    async with Warden(config(tmp_path, llm, mode="hold")) as warden, agent(warden) as client:
        waiting = asyncio.create_task(propose(client, llm, EMAIL))
        (item,) = await pending(warden)
        await admin(warden, "POST", f"/v1/approvals/{item['id']}/approve")
        got, _ = await waiting
        assert got
        waiting = asyncio.create_task(propose(client, llm, PHONE))
        (item,) = await pending(warden)
        await admin(warden, "POST", f"/v1/approvals/{item['id']}/reject")
        got, told = await waiting
        assert not got
        assert "rejected" in told, told
        # Let through one, refused one: two account changes, the third is over the limit.
        told = await kept(client, llm, ADDRESS)
        assert LIMIT in told, told
    seen = policy_inputs(tmp_path)
    assert [(tool, counts(s)) for tool, _, s in seen] == [
        ("update_email", ({}, {}, 0)),
        ("update_phone", ({"update_email": 1}, {}, 1)),
        ("update_address", ({"update_email": 1}, {"update_phone": 1}, 2)),
    ]


async def test_the_same_call_after_its_approval_was_used_is_held_anew(
    tmp_path: Path, llm: MockLLM
) -> None:
    async with Warden(config(tmp_path, llm)) as warden, agent(warden) as client:
        await kept(client, llm, EMAIL)
        (item,) = await pending(warden)
        await admin(warden, "POST", f"/v1/approvals/{item['id']}/approve")
        got, _ = await propose(client, llm, EMAIL)
        assert got
        # The approval let one call through: the same call again needs another one.
        told = await kept(client, llm, EMAIL)
        assert "held the tool call `update_email`" in told, told
        (again,) = await pending(warden)
        assert again["id"] != item["id"]
        # One change made, one asked for again: the limit of two is reached.
        told = await kept(client, llm, PHONE)
        assert LIMIT in told, told
    seen = policy_inputs(tmp_path)
    assert [counts(s) for _, _, s in seen] == [
        ({}, {}, 0),
        ({}, {}, 0),  # the retry: its own hold left out
        ({"update_email": 1}, {}, 1),
        ({"update_email": 1}, {"update_email": 1}, 2),
    ]


async def test_the_same_change_for_another_context_is_another_hold(
    tmp_path: Path, llm: MockLLM
) -> None:
    # The same arguments for another customer named by X-Warden-Context-*: another
    # approval, so another hold (counted once per call, never once for both).
    async with Warden(config(tmp_path, llm)) as warden, agent(warden) as client:
        for customer in ("C-1", "C-2"):
            llm.script(Reply(tool_calls=[EMAIL]))
            response = await client.chat.completions.create(
                model="gpt-4o",
                messages=MESSAGES,
                extra_headers={"X-Warden-Context-Customer": customer},
            )
            assert not response.choices[0].message.tool_calls
        told = await kept(client, llm, PHONE)
    assert LIMIT in told, told
    assert [session["held"] for _, _, session in policy_inputs(tmp_path)] == [
        {},
        {"update_email": 1},
        {"update_email": 2},
    ]
