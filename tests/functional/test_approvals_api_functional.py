"""The approvals admin API, its webhook and the ``warden approvals`` CLI, over real sockets."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web

from tests.functional.conftest import audit_records, make_config
from warden import cli
from warden.admin.approval_routes import add_approval_routes
from warden.admin.auth import TokenAuth, hash_token
from warden.approvals import Approvals, ApprovalSettings
from warden.approvals.model import rfc3339
from warden.approvals.notify import SIGNATURE_HEADER, TIMESTAMP_HEADER, verify_signature
from warden.audit.log import AuditLog
from warden.audit.verify import iter_records
from warden.config import AdminToken, AuditConfig
from warden.model import (
    Action,
    ActionKind,
    Agent,
    Decision,
    Effect,
    Mode,
    Obligations,
    RequestMeta,
    Stage,
    new_id,
)
from warden.server import Warden
from warden.testing import Call, MockLLM, Reply

SECRET = "whsec-functional"
TOKENS = {
    "alice": ("tok-alice", ("approver",)),
    "bob": ("tok-bob", ("approver",)),
    "refunds-bot": ("tok-bot", ("approver",)),
    "vic": ("tok-vic", ("viewer",)),
}


def bearer(subject: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[subject][0]}"}


def action(amount: float = 10) -> Action:
    return Action(
        action_id=new_id("act"),
        agent=Agent("refunds-bot"),
        kind=ActionKind.TOOL_CALL,
        protocol="openai",
        stage=Stage.PROPOSED,
        request=RequestMeta("POST", "openai", "/v1/chat/completions"),
        tool="issue_refund",
        arguments={"order_id": "A-1", "amount": amount, "email": "jo@example.com"},
    )


def decision() -> Decision:
    return Decision(
        decision_id=new_id("dec"),
        effect=Effect.REQUIRE_APPROVAL,
        reasons=("refunds over 5 need a person",),
        mode=Mode.ENFORCE,
        guard="policy",
        obligations=Obligations(redact=("action.arguments.email",), risk="high"),
    )


@dataclass
class Env:
    url: str
    approvals: Approvals
    audit: AuditLog
    hooks: list[tuple[bytes, dict[str, str]]]


async def start(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}"


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    hooks: list[tuple[bytes, dict[str, str]]] = []

    async def receive(request: web.Request) -> web.Response:
        hooks.append((await request.read(), dict(request.headers)))
        return web.Response(status=204)

    hook_app = web.Application()
    hook_app.router.add_post("/hook", receive)
    hook_runner, hook_url = await start(hook_app)
    audit = await AuditLog.open(AuditConfig(dir=str(tmp_path / "audit")))
    settings = ApprovalSettings(
        webhook_url=f"{hook_url}/hook", webhook_secret=SECRET, poll_interval_s=0.05
    )
    approvals = await Approvals.open(f"sqlite:///{tmp_path}/state.db", audit, settings)
    auth = TokenAuth(
        [
            AdminToken(subject=s, roles=roles, sha256=hash_token(tok))
            for s, (tok, roles) in TOKENS.items()
        ]
    )
    admin = web.Application()
    add_approval_routes(admin, approvals, auth)
    admin_runner, admin_url = await start(admin)
    try:
        yield Env(admin_url, approvals, audit, hooks)
    finally:
        await admin_runner.cleanup()
        await approvals.close()
        await audit.close()
        await hook_runner.cleanup()


async def call(
    env: Env, method: str, path: str, who: str | None = None, **kw: Any
) -> tuple[int, Any]:
    headers = bearer(who) if who else {}
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, env.url + path, headers=headers, **kw) as resp,
    ):
        return resp.status, await resp.json()


async def test_decide_through_the_admin_api(env: Env) -> None:
    approval = await env.approvals.request(action(), decision(), mode="hold")
    waiter = asyncio.create_task(env.approvals.wait(approval.id, 10))
    path = f"/v1/approvals/{approval.id}"

    status, body = await call(env, "GET", "/v1/approvals?status=pending")
    assert status == 401
    assert body["error"]["code"] == "unauthorized"
    async with (
        aiohttp.ClientSession() as session,
        session.get(env.url + "/v1/approvals", headers={"Authorization": "Bearer nope"}) as resp,
    ):
        assert resp.status == 401

    status, body = await call(env, "GET", "/v1/approvals?status=pending", "vic")
    assert status == 200
    (listed,) = body["approvals"]
    assert listed["id"] == approval.id
    assert listed["agent"] == "refunds-bot"
    assert listed["tool"] == "issue_refund"
    assert listed["risk"] == "high"
    assert listed["arguments"]["email"] == "[redacted]"
    assert listed["arguments"]["amount"] == 10
    assert listed["reason"] == "refunds over 5 need a person"
    assert listed["waiting_s"] >= 0
    assert listed["required_approvals"] == 1
    assert listed["approvals"] == 0
    assert listed["votes"] == []
    assert (await call(env, "GET", "/v1/approvals?status=nope", "vic"))[0] == 400
    assert (await call(env, "GET", "/v1/approvals/apr_unknown", "vic"))[0] == 404

    status, body = await call(env, "POST", f"{path}/approve", "vic", json={})
    assert status == 403
    assert body["error"]["code"] == "forbidden"
    status, body = await call(env, "POST", f"{path}/approve", "refunds-bot", json={})
    assert status == 403
    assert body["error"]["code"] == "self_approval"
    status, body = await call(env, "POST", f"{path}/approve", "alice", data=b"{not json")
    assert status == 400
    assert body["error"]["code"] == "invalid_request"
    status, _ = await call(env, "POST", f"{path}/approve", "alice", json={"comment": "x" * 2001})
    assert status == 400
    assert (await call(env, "POST", "/v1/approvals/apr_unknown/approve", "alice", json={}))[
        0
    ] == 404
    assert not waiter.done()

    status, body = await call(
        env, "POST", f"{path}/approve", "alice", json={"comment": "customer confirmed"}
    )
    assert status == 200
    assert body["status"] == "approved"
    assert body["votes"][0]["by"] == "alice"
    assert (await asyncio.wait_for(waiter, 2)).status == "approved"
    status, body = await call(env, "POST", f"{path}/reject", "bob", json={})
    assert status == 409
    assert body["error"]["code"] == "approval_not_pending"

    assert (await call(env, "GET", "/v1/approvals?status=pending", "vic"))[1]["approvals"] == []
    status, body = await call(env, "GET", "/v1/approvals?status=approved", "vic")
    assert [a["id"] for a in body["approvals"]] == [approval.id]
    status, body = await call(env, "GET", path, "bob")
    assert status == 200
    assert body["comment"] == "customer confirmed"

    # The webhook got the request and the decision, signed.
    await env.approvals.drain_notifications()
    events = []
    for raw, headers in env.hooks:
        assert verify_signature(SECRET, raw, headers[SIGNATURE_HEADER])
        payload = orjson.loads(raw)
        assert payload["timestamp"] == int(headers[TIMESTAMP_HEADER])
        assert payload["approval"]["arguments"]["email"] == "[redacted]"
        events.append(payload["event"])
    assert events == ["approval.requested", "approval.approved"]

    kinds = [orjson.loads(r)["kind"] for _, r in iter_records(env.audit.directory)]
    assert kinds.count("approval_requested") == 1
    assert kinds.count("approval_decided") == 1
    assert kinds.count("approval_notified") == 2


async def test_cli_lists_and_approves(
    env: Env, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    approval = await env.approvals.request(action(), decision(), mode="defer")
    monkeypatch.setenv("WARDEN_ADMIN_URL", env.url)
    monkeypatch.setenv("WARDEN_TOKEN", TOKENS["alice"][0])
    # The CLI blocks on urllib: run it off the loop that serves the API.
    assert await asyncio.to_thread(cli.main, ["approvals", "list"]) == 0
    out = capsys.readouterr().out
    assert approval.id in out
    assert "issue_refund" in out
    assert "0/1" in out

    assert await asyncio.to_thread(cli.main, ["approvals", "show", approval.id]) == 0
    assert "[redacted]" in capsys.readouterr().out

    code = await asyncio.to_thread(
        cli.main, ["approvals", "approve", approval.id, "--comment", "ok"]
    )
    assert code == 0
    assert f"{approval.id}: approved" in capsys.readouterr().out
    code = await asyncio.to_thread(cli.main, ["approvals", "reject", approval.id])
    assert code == 1
    assert "409" in capsys.readouterr().err

    monkeypatch.setenv("WARDEN_TOKEN", TOKENS["vic"][0])
    code = await asyncio.to_thread(cli.main, ["approvals", "list", "--status", "approved"])
    assert code == 0
    assert approval.id in capsys.readouterr().out
    assert await env.approvals.take_grant(action(), decision()) is not None

    monkeypatch.delenv("WARDEN_TOKEN")
    assert await asyncio.to_thread(cli.main, ["approvals", "list"]) == 2


async def test_cli_show_names_the_upstream_method_and_expiry(
    env: Env, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The same refund held for a sandbox and for production: the approver must tell them apart.
    approval = await env.approvals.request(action(), decision(), mode="defer")
    monkeypatch.setenv("WARDEN_ADMIN_URL", env.url)
    monkeypatch.setenv("WARDEN_TOKEN", TOKENS["alice"][0])
    assert await asyncio.to_thread(cli.main, ["approvals", "show", approval.id]) == 0
    out = capsys.readouterr().out
    assert "\nupstream    openai\n" in out
    assert "\nmethod      POST\n" in out
    assert f"\nexpires     {rfc3339(approval.expires_at)} (in " in out


async def test_a_store_failure_is_503_in_the_api_shape(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    approval = await env.approvals.request(action(), decision(), mode="defer")

    async def locked(*_: Any, **__: Any) -> Any:
        raise sqlite3.OperationalError("database is locked")

    store = env.approvals._store
    for method in ("vote", "get", "list"):
        monkeypatch.setattr(store, method, locked)
    for verb, path in (
        ("POST", f"/v1/approvals/{approval.id}/approve"),
        ("POST", f"/v1/approvals/{approval.id}/reject"),
        ("GET", f"/v1/approvals/{approval.id}"),
        ("GET", "/v1/approvals?status=pending"),
    ):
        async with (
            aiohttp.ClientSession() as session,
            session.request(verb, env.url + path, headers=bearer("alice"), json={}) as resp,
        ):
            assert resp.status == 503, path
            assert resp.content_type == "application/json"
            body = await resp.json()
        assert body["error"]["code"] == "state_unavailable", path
        assert "locked" not in body["error"]["message"]  # the driver's words stay in the log
    monkeypatch.undo()
    pending = await env.approvals.get(approval.id)
    assert pending is not None
    assert pending.status.value == "pending"


# A held call whose important values sit under credential-like names: the agent
# must not be able to hide them from the approver without the approver knowing.
SNEAKY = {
    "customer_id": "ceo",
    "email": "new@example.com",
    "password_reset_email": "attacker@evil.example",
    "pre_authorization_amount": 50000,
    "note": {"x_credential_hint": {"to_iban": "XX00ATTACKER"}},
}
HIDDEN = [
    "/password_reset_email",
    "/pre_authorization_amount",
    "/note/x_credential_hint",
]
# Held by the shipped policy, which redacts none of its arguments (a contact change's
# would all be hidden: it names what may stay in clear), so each masked value shows.
SNEAKY_TOOL = "close_account"


async def test_a_held_call_names_every_value_hidden_from_the_approver(
    tmp_path: Path,
    llm: MockLLM,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    tokens = [
        {"subject": s, "roles": list(roles), "sha256": hash_token(tok)}
        for s, (tok, roles) in TOKENS.items()
    ]
    cfg = make_config(tmp_path, llm.url, admin={"tokens": tokens}, approvals={"mode": "defer"})
    llm.script(Reply(tool_calls=[Call(SNEAKY_TOOL, SNEAKY)]))
    async with (
        Warden(cfg) as warden,
        openai.AsyncOpenAI(
            base_url=f"{warden.proxy_url}/openai/v1", api_key="sk-test", max_retries=0, timeout=60
        ) as agent,
    ):
        await agent.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "update my email"}]
        )
        async with aiohttp.ClientSession(headers=bearer("alice")) as http:
            async with http.get(f"{warden.admin_url}/v1/approvals?status=pending") as resp:
                (pending,) = (await resp.json())["approvals"]
            async with http.get(f"{warden.admin_url}/v1/approvals/{pending['id']}") as resp:
                assert resp.status == 200
                shown = await resp.json()
        assert shown["tool"] == SNEAKY_TOOL
        assert shown["arguments"] == {
            "customer_id": "ceo",
            "email": "new@example.com",
            "password_reset_email": "[redacted]",
            "pre_authorization_amount": "[redacted]",
            "note": {"x_credential_hint": "[redacted]"},
        }
        assert shown["redacted"] == HIDDEN
        assert shown["arguments_sha256"] is None  # its plain hash would test guesses of them
        assert "XX00ATTACKER" not in orjson.dumps(shown).decode()

        monkeypatch.setenv("WARDEN_ADMIN_URL", warden.admin_url)
        monkeypatch.setenv("WARDEN_TOKEN", TOKENS["alice"][0])
        assert await asyncio.to_thread(cli.main, ["approvals", "show", pending["id"]]) == 0
        out = capsys.readouterr().out
        assert "hidden      3 value(s) you cannot see" in out
        for path in HIDDEN:
            assert f"\n              {path}\n" in out
    # The decision record lists them too, and never holds the values.
    records = audit_records(tmp_path / "audit")
    (decided,) = [
        r for r in records if r["kind"] == "decision" and r["action"]["tool"] == SNEAKY_TOOL
    ]
    assert decided["action"]["redacted"] == HIDDEN
    assert decided["action"]["arguments"]["note"] == {"x_credential_hint": "[redacted]"}
    assert "XX00ATTACKER" not in orjson.dumps(records).decode()
