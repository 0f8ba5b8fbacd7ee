"""Agents prove who they are: proxy keys and JWTs through the real proxy, with the SDKs.

The proven id is the one in the audit log, in kill switch checks and in the
policy input (with the token's claims); an unproven id is a 403 and a bad
credential a 401, before anything reaches the upstream.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
from aiohttp import web

from tests.functional.conftest import audit_records, make_config
from tests.unit.test_identity import AUDIENCE, ISSUER, Issuer
from warden.admin.auth import hash_token
from warden.config import Config
from warden.identity import AGENT_KEY_HEADER, AGENT_TOKEN_HEADER, AGENT_VERSION_HEADER, hash_key
from warden.server import Warden
from warden.testing import Call, MockLLM, Reply

MESSAGES: Any = [{"role": "user", "content": "refund order A-1"}]
REFUNDS_KEY = "wk_functional_refunds_key"
ADMIN_TOKEN = "admin-token-identity"
ADMIN = {"tokens": [{"subject": "alice", "roles": ["admin"], "sha256": hash_token(ADMIN_TOKEN)}]}
KEYS = {"agents": {"refunds-bot": {"key_sha256": [hash_key(REFUNDS_KEY)]}}}
# Refunds need a token whose claims put the agent in the payments team.
POLICY = """package warden

import rego.v1

default decision := {"effect": "allow"}

decision := {"effect": "deny", "reason": "refunds need team payments"} if {
    input.action.tool == "issue_refund"
    not payments
}

payments if input.agent.claims.team == "payments"
"""
REFUND = Call("issue_refund", {"order_id": "A-1", "amount": 5, "currency": "USD"})


def client(warden: Warden, **headers: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"{warden.proxy_url}/openai/v1",
        api_key="sk-test",
        max_retries=0,
        default_headers=headers,
    )


def identity_config(tmp_path: Path, llm: MockLLM, **identity: Any) -> Config:
    bundle = tmp_path / "bundle"
    bundle.mkdir(exist_ok=True)
    (bundle / "policy.rego").write_text(POLICY)
    return make_config(
        tmp_path,
        llm.url,
        admin=ADMIN,
        identity={**KEYS, **identity},
        policy={"bundles": [str(bundle)]},
    )


async def tools_called(c: openai.AsyncOpenAI, llm: MockLLM, *calls: Call) -> list[str]:
    llm.script(Reply(tool_calls=list(calls)))
    completion = await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    return [
        t.function.name if t.type == "function" else t.custom.name
        for t in completion.choices[0].message.tool_calls or []
    ]


def decisions(tmp_path: Path) -> list[dict[str, Any]]:
    return [r for r in audit_records(tmp_path / "audit") if r.get("kind") == "decision"]


def raw_log(tmp_path: Path) -> bytes:
    return b"".join(p.read_bytes() for p in (tmp_path / "audit").rglob("*") if p.is_file())


@asynccontextmanager
async def jwks_server(body: bytes) -> AsyncIterator[tuple[str, list[int]]]:
    """A JWKS endpoint on 127.0.0.1:0; yields its URL and a list counting fetches.

    The body goes out in two writes a moment apart, as a large or slow one
    would: a reader must read to the end.
    """
    fetches: list[int] = []

    async def jwks(request: web.Request) -> web.StreamResponse:
        fetches.append(1)
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        await response.write(body[:40])
        await asyncio.sleep(0.1)
        await response.write(body[40:])
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/openid/v1/jwks", jwks)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}/openid/v1/jwks", fetches
    finally:
        await runner.cleanup()


async def test_a_proven_agent_is_the_agent_of_record_and_of_its_kill_switch(
    tmp_path: Path, llm: MockLLM
) -> None:
    async with (
        Warden(identity_config(tmp_path, llm)) as warden,
        aiohttp.ClientSession(
            base_url=warden.admin_url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
        ) as admin,
        client(warden, **{"X-Warden-Agent": "refunds-bot", AGENT_KEY_HEADER: REFUNDS_KEY}) as bot,
        client(warden, **{AGENT_KEY_HEADER: REFUNDS_KEY}) as key_only,
        client(warden) as own,
    ):
        assert await tools_called(bot, llm, Call("search_kb", {"query": "refunds"})) == [
            "search_kb"
        ]
        body = {"scope": "agent", "target": "refunds-bot", "reason": "paying out twice"}
        async with admin.post("/v1/killswitches", json=body) as resp:
            assert resp.status == 201
        for stopped in (bot, key_only):  # the key alone names its agent, so no escape
            with pytest.raises(openai.PermissionDeniedError, match="paying out twice"):
                await stopped.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        await own.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        await warden.stop()
    agents = [r["agent"]["id"] for r in decisions(tmp_path)]
    assert agents[0] == "refunds-bot"
    assert agents[-1] == "support-triage"
    assert REFUNDS_KEY.encode() not in raw_log(tmp_path)
    # The key is Warden's, not the provider's: it never goes upstream.
    assert all(AGENT_KEY_HEADER not in r.headers for r in llm.requests)


async def test_a_stated_agent_version_is_the_version_of_record_and_never_goes_upstream(
    tmp_path: Path, llm: MockLLM
) -> None:
    """A canary states its version where the sidecar's config names none."""
    config = identity_config(tmp_path, llm)
    config = config.model_copy(update={"agent": config.agent.model_copy(update={"version": ""})})
    async with (
        Warden(config) as warden,
        client(warden, **{AGENT_VERSION_HEADER: "2.5.0-canary"}) as canary,
        client(warden) as stable,
        client(warden, **{AGENT_VERSION_HEADER: "not a version"}) as garbled,
    ):
        assert await tools_called(canary, llm, Call("search_kb", {"query": "q"})) == ["search_kb"]
        await stable.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        with pytest.raises(openai.BadRequestError, match=AGENT_VERSION_HEADER):
            await garbled.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    versions = [r["agent"]["version"] for r in decisions(tmp_path)]
    assert versions[0] == "2.5.0-canary"
    assert versions[-1] == ""
    assert all(AGENT_VERSION_HEADER not in r.headers for r in llm.requests)


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({"X-Warden-Agent": "refunds-bot"}, "'refunds-bot' must be proved"),
        ({"X-Warden-Agent": "fresh-bot"}, "'fresh-bot' is not this sidecar's agent"),
        (
            {"X-Warden-Agent": "support-triage", AGENT_KEY_HEADER: REFUNDS_KEY},
            "proves agent 'refunds-bot', not 'support-triage'",
        ),
    ],
)
async def test_an_unproven_agent_gets_403_before_the_upstream_is_asked(
    tmp_path: Path, llm: MockLLM, headers: dict[str, str], message: str
) -> None:
    async with Warden(identity_config(tmp_path, llm)) as warden, client(warden, **headers) as c:
        with pytest.raises(openai.PermissionDeniedError, match=message):
            await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert llm.requests == []


async def test_an_unproven_agent_gets_the_anthropic_sdks_403(tmp_path: Path, llm: MockLLM) -> None:
    async with (
        Warden(identity_config(tmp_path, llm)) as warden,
        anthropic.AsyncAnthropic(
            base_url=f"{warden.proxy_url}/anthropic",
            api_key="sk-ant-test",
            max_retries=0,
            default_headers={"X-Warden-Agent": "refunds-bot"},
        ) as c,
    ):
        with pytest.raises(anthropic.PermissionDeniedError, match="must be proved"):
            await c.messages.create(model="claude-sonnet-4-6", max_tokens=64, messages=MESSAGES)
    assert llm.requests == []


async def test_require_proof_refuses_the_sidecars_own_agent_without_a_credential(
    tmp_path: Path, llm: MockLLM
) -> None:
    cfg = identity_config(tmp_path, llm, require_proof=True)
    async with Warden(cfg) as warden, client(warden) as c:
        with pytest.raises(openai.PermissionDeniedError, match="'support-triage' must be proved"):
            await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)


async def test_a_bad_key_or_token_gets_401(tmp_path: Path, llm: MockLLM) -> None:
    issuer = Issuer()
    jwks = tmp_path / "jwks.json"
    jwks.write_bytes(issuer.jwks())
    jwt_cfg = {"issuer": ISSUER, "audience": AUDIENCE, "jwks_file": str(jwks)}
    expired = issuer.token("refunds-bot", exp=1_700_000_000)
    forged = Issuer().token("refunds-bot")
    async with Warden(identity_config(tmp_path, llm, jwt=jwt_cfg)) as warden:
        for headers in (
            {AGENT_KEY_HEADER: "wk_guessed"},
            {"X-Warden-Agent": "refunds-bot", AGENT_TOKEN_HEADER: expired},
            {AGENT_TOKEN_HEADER: forged},
            {AGENT_TOKEN_HEADER: "not-a-token"},
        ):
            async with client(warden, **headers) as c:
                with pytest.raises(openai.AuthenticationError):
                    await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        # A key or token that is not UTF-8 text is a bad one too (not a 500).
        host, _, port = warden.proxy_url.removeprefix("http://").rpartition(":")
        body = b'{"model": "gpt-4o-mini", "messages": []}'
        for header in (AGENT_KEY_HEADER, AGENT_TOKEN_HEADER):
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(
                b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                + header.encode()
                + b": wk_\xff\xfe\r\nContent-Type: application/json\r\n"
                + b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
            )
            await writer.drain()
            answer = await reader.read()
            writer.close()
            assert answer.startswith(b"HTTP/1.1 401 "), (header, answer[:80])
    assert llm.requests == []


async def test_jwt_claims_from_a_jwks_file_reach_the_policy(tmp_path: Path, llm: MockLLM) -> None:
    issuer = Issuer(kind="ec")
    jwks = tmp_path / "jwks.json"
    jwks.write_bytes(issuer.jwks())
    jwt_cfg = {
        "issuer": ISSUER,
        "audience": AUDIENCE,
        "algorithms": ["ES256"],
        "jwks_file": str(jwks),
        "agents": {"system:serviceaccount:payments:refunds": "refunds-bot"},
    }
    payments = issuer.token("system:serviceaccount:payments:refunds", team="payments")
    support = issuer.token("system:serviceaccount:payments:refunds", team="support")
    async with (
        Warden(identity_config(tmp_path, llm, jwt=jwt_cfg)) as warden,
        client(warden, **{AGENT_TOKEN_HEADER: payments}) as paying,
        client(warden, **{"X-Warden-Agent": "refunds-bot", AGENT_TOKEN_HEADER: support}) as other,
    ):
        assert await tools_called(paying, llm, REFUND) == ["issue_refund"]
        assert await tools_called(other, llm, REFUND) == []
        await warden.stop()
    refunds = [r for r in decisions(tmp_path) if r["action"]["tool"] == "issue_refund"]
    assert [(r["agent"]["id"], r["decision"]["effect"]) for r in refunds] == [
        ("refunds-bot", "allow"),
        ("refunds-bot", "deny"),
    ]
    assert "refunds need team payments" in json.dumps(refunds[1]["decision"])
    # The record keeps the proof: the verified claims behind each id.
    assert [r["agent"]["claims"]["team"] for r in refunds] == ["payments", "support"]
    log = raw_log(tmp_path)
    assert payments.encode() not in log
    assert support.encode() not in log


async def test_jwt_keys_from_a_jwks_url_are_fetched_once_and_verify(
    tmp_path: Path, llm: MockLLM
) -> None:
    issuer = Issuer()
    async with jwks_server(issuer.jwks()) as (url, fetches):
        jwt_cfg = {"issuer": ISSUER, "audience": AUDIENCE, "jwks_url": url}
        token = issuer.token("refunds-bot", team="payments")
        async with (
            Warden(identity_config(tmp_path, llm, jwt=jwt_cfg)) as warden,
            client(warden, **{AGENT_TOKEN_HEADER: token}) as c,
            client(warden, **{AGENT_TOKEN_HEADER: Issuer().token("refunds-bot")}) as forged,
        ):
            assert await tools_called(c, llm, REFUND) == ["issue_refund"]
            assert await tools_called(c, llm, REFUND) == ["issue_refund"]
            with pytest.raises(openai.AuthenticationError):
                await forged.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
            await warden.stop()
        assert len(fetches) == 1
    assert {r["agent"]["id"] for r in decisions(tmp_path)} == {"refunds-bot"}
