"""Kill switches through the admin API and the CLI, against real SDK traffic."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import aiohttp.web
import openai
import pytest

from tests.adversarial.wire import fn_item, response_body
from tests.functional.conftest import audit_records, make_config
from tests.sdk_calls import function_calls
from warden import cli
from warden.admin.auth import Principal, hash_token
from warden.identity import hash_key
from warden.killswitch import Scope
from warden.server import Warden
from warden.testing import Call, MockLLM, Reply
from warden.testing.raw_upstream import RawReply, RawUpstream, sse_bytes

TOKEN = "admin-token-1"
ADMIN = {"tokens": [{"subject": "alice", "roles": ["admin"], "sha256": hash_token(TOKEN)}]}
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MESSAGES: Any = [{"role": "user", "content": "help"}]
# Agents other than the sidecar's own prove their ids with proxy keys.
IDENTITY = {
    "agents": {
        name: {"key_sha256": [hash_key(f"key-{name}")]} for name in ("refunds-bot", "other-bot")
    }
}


def client(warden: Warden, agent: str = "support-triage") -> openai.AsyncOpenAI:
    headers = {"X-Warden-Agent": agent}
    if agent in IDENTITY["agents"]:
        headers["X-Warden-Agent-Key"] = f"key-{agent}"
    return openai.AsyncOpenAI(
        base_url=f"{warden.proxy_url}/openai/v1",
        api_key="sk-test",
        max_retries=0,
        default_headers=headers,
    )


async def test_switches_set_listed_and_cleared_through_the_admin_api(
    tmp_path: Path, llm: MockLLM
) -> None:
    async with (
        Warden(make_config(tmp_path, llm.url, admin=ADMIN, identity=IDENTITY)) as warden,
        aiohttp.ClientSession(base_url=warden.admin_url, headers=AUTH) as admin,
        client(warden, "refunds-bot") as bot,
        client(warden, "other-bot") as other,
    ):
        body = {"scope": "agent", "target": "refunds-bot", "reason": "paying out twice"}
        async with admin.post("/v1/killswitches", json=body) as resp:
            assert resp.status == 201
            switch = await resp.json()
        with pytest.raises(openai.PermissionDeniedError) as denied:
            await bot.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        assert "paying out twice" in str(denied.value)
        assert switch["id"] in str(denied.value)
        await other.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)

        # A tool switch removes that tool's calls from every agent's responses.
        tool = {"scope": "tool", "target": "issue_refund", "reason": "refund API broken"}
        async with admin.post("/v1/killswitches", json=tool) as resp:
            tool_switch = await resp.json()
        refund = Call("issue_refund", {"order_id": "A-1", "amount": 10, "currency": "USD"})
        llm.script(Reply(tool_calls=[refund, Call("get_order", {"order_id": "A-1"})]))
        completion = await other.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        message = completion.choices[0].message
        assert [t.function.name for t in function_calls(message)] == ["get_order"]
        assert "refund API broken" in (message.content or "")

        async with admin.get("/v1/killswitches") as resp:
            listed = (await resp.json())["killswitches"]
        assert [s["id"] for s in listed] == [switch["id"], tool_switch["id"]]

        # A reason longer than any other door takes is refused, and the switch stays.
        long_reason = {"reason": "x" * 1001}
        async with admin.delete(f"/v1/killswitches/{switch['id']}", params=long_reason) as resp:
            assert resp.status == 400
        async with admin.delete(f"/v1/killswitches/{switch['id']}") as resp:
            assert resp.status == 200
        async with admin.delete(f"/v1/killswitches/{switch['id']}") as resp:
            assert resp.status == 404
        await bot.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)

        for bad in (
            {"scope": "planet", "target": "x", "reason": "r"},
            {"scope": "agent", "reason": "r"},
            {"scope": "agent", "target": "x", "reason": " "},
            {"scope": "agent", "target": "refunds-bot ", "reason": "r"},  # stops nothing
        ):
            async with admin.post("/v1/killswitches", json=bad) as resp:
                assert resp.status == 400, bad
        async with admin.post("/v1/killswitches", data=b"[") as resp:
            assert resp.status == 400
        await warden.stop()
    records = [r for r in audit_records(tmp_path / "audit") if r.get("kind") == "killswitch"]
    assert [(r["body"]["action"], r["body"]["who"]) for r in records] == [
        ("set", "alice"),
        ("set", "alice"),
        ("cleared", "alice"),
    ]
    assert records[0]["body"]["why"] == "paying out twice"


async def test_a_global_switch_survives_a_restart(tmp_path: Path, llm: MockLLM) -> None:
    config = make_config(tmp_path, llm.url, admin=ADMIN)
    async with (
        Warden(config) as warden,
        aiohttp.ClientSession(base_url=warden.admin_url, headers=AUTH) as admin,
        admin.post("/v1/killswitches", json={"scope": "global", "reason": "incident"}) as resp,
    ):
        assert resp.status == 201
    async with Warden(config) as warden, client(warden) as c:
        with pytest.raises(openai.PermissionDeniedError, match="incident"):
            await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)


async def test_a_switch_thrown_on_one_sidecar_stops_another_within_a_second(
    tmp_path: Path, llm: MockLLM
) -> None:
    # Two sidecars sharing one state store, each with its own audit log.
    first = make_config(tmp_path, llm.url, admin=ADMIN)
    second = make_config(tmp_path, llm.url, admin=ADMIN, audit={"dir": str(tmp_path / "audit2")})
    async with (
        Warden(first) as one,
        Warden(second) as two,
        aiohttp.ClientSession(base_url=one.admin_url, headers=AUTH) as admin,
        client(two) as c,
    ):
        body = {"scope": "upstream", "target": "openai", "reason": "provider incident"}
        async with admin.post("/v1/killswitches", json=body) as resp:
            assert resp.status == 201
        switches = two.killswitches
        assert switches is not None
        async with asyncio.timeout(1):
            while switches.is_killed("any-agent", "openai") is None:
                await switches.wait_changed()
        with pytest.raises(openai.PermissionDeniedError, match="provider incident"):
            await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)


async def test_the_cli_sets_lists_and_clears(
    tmp_path: Path,
    llm: MockLLM,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    async with Warden(make_config(tmp_path, llm.url, admin=ADMIN)) as warden:
        monkeypatch.setenv("WARDEN_ADMIN_URL", warden.admin_url)
        monkeypatch.setenv("WARDEN_TOKEN", TOKEN)

        async def run(*argv: str) -> int:
            return await asyncio.to_thread(cli.main, list(argv))

        assert await run("kill", "agent", "refunds-bot", "--reason", "looping") == 0
        switch_id = capsys.readouterr().out.split()[0]
        assert switch_id.startswith("ks_")
        assert warden.killswitches is not None
        assert warden.killswitches.is_killed("refunds-bot") is not None
        assert await run("killswitches") == 0
        assert "refunds-bot" in capsys.readouterr().out
        assert await run("unkill", switch_id) == 0
        assert warden.killswitches.is_killed("refunds-bot") is None
        assert await run("unkill", switch_id) == 1
        assert await run("kill", "agent", "--reason", "no name") == 2
        monkeypatch.setenv("WARDEN_TOKEN", "wrong")
        assert await run("kill", "global", "--reason", "x") == 1
        assert "401" in capsys.readouterr().err
        monkeypatch.delenv("WARDEN_TOKEN")
        assert await run("killswitches") == 2


async def test_the_cli_never_sends_its_token_after_a_redirect(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An admin URL that redirects (an ingress, a sign-in proxy) does not get the token resent."""
    seen: list[str | None] = []

    async def elsewhere(request: aiohttp.web.Request) -> aiohttp.web.Response:
        seen.append(request.headers.get("Authorization"))
        return aiohttp.web.json_response({"switches": []})

    async def redirect(request: aiohttp.web.Request) -> aiohttp.web.Response:
        raise aiohttp.web.HTTPFound(f"{other}{request.path}")

    runners = []
    urls = []
    for handler in (elsewhere, redirect):
        app = aiohttp.web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        runner = aiohttp.web.AppRunner(app)
        await runner.setup()
        await aiohttp.web.TCPSite(runner, "127.0.0.1", 0).start()
        runners.append(runner)
        urls.append(f"http://127.0.0.1:{runner.addresses[0][1]}")
    other, redirecting = urls
    try:
        monkeypatch.setenv("WARDEN_ADMIN_URL", redirecting)
        monkeypatch.setenv("WARDEN_TOKEN", TOKEN)
        assert await asyncio.to_thread(cli.main, ["killswitches"]) == 1
    finally:
        for runner in runners:
            await runner.cleanup()
    assert seen == []
    assert "redirects to" in capsys.readouterr().err


async def test_the_cli_never_sends_its_token_through_a_proxy(
    tmp_path: Path, llm: MockLLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``http_proxy`` in an operator's shell is for other traffic: the admin token goes
    straight to the admin URL, never to a proxy in clear text."""
    seen: list[str | None] = []

    async def proxy(request: aiohttp.web.Request) -> aiohttp.web.Response:
        seen.append(request.headers.get("Authorization"))
        return aiohttp.web.json_response({"switches": []})

    app = aiohttp.web.Application()
    app.router.add_route("*", "/{tail:.*}", proxy)
    runner = aiohttp.web.AppRunner(app)
    await runner.setup()
    await aiohttp.web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        async with Warden(make_config(tmp_path, llm.url, admin=ADMIN)) as warden:
            for name in ("http_proxy", "HTTP_PROXY", "all_proxy"):
                monkeypatch.setenv(name, f"http://127.0.0.1:{runner.addresses[0][1]}")
            for name in ("no_proxy", "NO_PROXY"):
                monkeypatch.delenv(name, raising=False)
            monkeypatch.setenv("WARDEN_ADMIN_URL", warden.admin_url)
            monkeypatch.setenv("WARDEN_TOKEN", TOKEN)
            assert await asyncio.to_thread(cli.main, ["killswitches"]) == 0
    finally:
        await runner.cleanup()
    assert seen == []


async def test_a_switch_thrown_while_a_sibling_call_is_held_stops_the_allowed_call(
    tmp_path: Path, llm: MockLLM
) -> None:
    # One answer: a refund held for a person, and a lookup allowed at once. The
    # answer goes out when the refund is decided; a switch on the lookup thrown
    # in between must keep the lookup from the agent.
    lead = Principal("dana", frozenset({"approver", "support-leads"}))
    config = make_config(tmp_path, llm.url, admin=ADMIN, approvals={"mode": "hold"})
    refund = Call("issue_refund", {"order_id": "A-1003", "amount": 450, "currency": "USD"})
    llm.script(Reply(tool_calls=[refund, Call("get_order", {"order_id": "A-1"})]))
    async with (
        Warden(config) as warden,
        aiohttp.ClientSession(base_url=warden.admin_url, headers=AUTH) as admin,
        client(warden) as agent,
    ):
        approvals = warden._approvals
        assert approvals is not None
        asked = asyncio.create_task(
            agent.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        )
        async with asyncio.timeout(10):
            while not await approvals.list("pending"):  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        tool = {"scope": "tool", "target": "get_order", "reason": "lookups leak data"}
        async with admin.post("/v1/killswitches", json=tool) as resp:
            assert resp.status == 201
        (held,) = await approvals.list("pending")
        await approvals.decide(held.id, lead, approve=True, comment="ok")
        message = (await asked).choices[0].message
    assert [t.function.name for t in function_calls(message)] == ["issue_refund"]
    assert "lookups leak data" in (message.content or "")
    lookups = [
        r["decision"]
        for r in audit_records(tmp_path / "audit")
        if r.get("kind") == "decision" and r["action"]["tool"] == "get_order"
    ]
    assert [(d["effect"], d["guard"]) for d in lookups] == [
        ("allow", "policy"),
        ("deny", "kill_switch"),
    ]


async def test_a_switch_thrown_while_a_sibling_is_held_cuts_a_stream_that_holds_the_call(
    tmp_path: Path,
) -> None:
    # Both calls only in the final snapshot: the lookup is decided and held back
    # until the refund is decided. A switch on the lookup thrown in between must
    # cut the stream before the snapshot carries the lookup to the agent.
    lead = Principal("dana", frozenset({"approver", "support-leads"}))
    output = [
        fn_item("get_order", {"order_id": "A-1"}, "call_1", "fc_1"),
        fn_item(
            "issue_refund",
            {"order_id": "A-1003", "amount": 450, "currency": "USD"},
            "call_2",
            "fc_2",
        ),
    ]
    events = [
        (
            "response.created",
            {
                "type": "response.created",
                "sequence_number": 0,
                "response": response_body([], status="in_progress"),
            },
        ),
        (
            "response.completed",
            {"type": "response.completed", "sequence_number": 1, "response": response_body(output)},
        ),
    ]
    async with RawUpstream() as upstream:
        upstream.script(RawReply(body=[sse_bytes(events)], content_type="text/event-stream"))
        config = make_config(tmp_path, upstream.url, admin=ADMIN, approvals={"mode": "hold"})
        async with Warden(config) as warden, client(warden) as agent:
            approvals = warden._approvals
            assert approvals is not None
            assert warden.killswitches is not None
            seen: list[Any] = []

            async def read() -> None:
                stream = await agent.responses.create(
                    model="gpt-4o-mini", input="help", stream=True
                )
                async for event in stream:
                    seen.append(event)

            reading = asyncio.create_task(read())
            async with asyncio.timeout(10):
                while not await approvals.list("pending"):  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
            await warden.killswitches.set(Scope.TOOL, "get_order", "lookups leak data", "oncall")
            (held,) = await approvals.list("pending")
            await approvals.decide(held.id, lead, approve=True, comment="ok")
            with pytest.raises(openai.APIError, match="lookups leak data"):
                await reading
    assert "response.completed" not in [e.type for e in seen]
