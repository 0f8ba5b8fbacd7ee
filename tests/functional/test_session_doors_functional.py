"""Session counters at the doors that carry no conversation: gRPC ``Check``, HTTP tool
routes and Envoy ext_authz.

A session rule proved through the base URL must hold wherever the agent's
calls come in. Each test makes the same three calls in one named session
and checks that the third meets the session limit, that a new session starts
from zero, and that calls naming no session are not counted together.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc.aio
import pytest
from aiohttp import web
from google.protobuf import struct_pb2

from tests.functional.conftest import audit_records, make_config
from tests.functional.test_envoy_authz_functional import _request as authz_request
from tests.functional.test_envoy_authz_functional import _serving as authz_serving
from warden.client import (
    ApprovalPending,
    AsyncWardenClient,
    ToolDenied,
    WardenClient,
    govern,
    session,
)
from warden.grpc_api.v1 import governance_pb2 as pb
from warden.grpc_api.v1 import governance_pb2_grpc as pb_grpc
from warden.server import Warden
from warden.testing._server import LoopbackServer

pytestmark = pytest.mark.timeout(90)

GRPC_OK, GRPC_PERMISSION_DENIED = 0, 7
# The shipped customer-support bundle: at most two account changes (allowed or
# held) in one conversation; the third is denied.
LIMIT = "at most 2 are allowed in one conversation"


def _sessions(tmp_path: Path) -> list[tuple[str, str | None, dict[str, Any]]]:
    """(tool, session id, input.session) of every tool-call decision, in log order."""
    out = []
    for record in audit_records(tmp_path / "audit"):
        if record["kind"] == "decision" and record["action"]["kind"] == "tool_call":
            facts = record["decision"]["input"]
            out.append((record["action"]["tool"], facts["session"].get("id"), facts["session"]))
    return out


# -- gRPC Check ---------------------------------------------------------------------------


@pytest.fixture
async def grpc_warden(tmp_path: Path) -> AsyncIterator[Warden]:
    config = make_config(
        tmp_path,
        "http://127.0.0.1:9",
        listen={"proxy": "127.0.0.1:0", "admin": "127.0.0.1:0", "grpc": "127.0.0.1:0"},
    )
    async with Warden(config) as running:
        yield running


def _close(customer: str, session_id: str = "") -> pb.CheckRequest:
    args = struct_pb2.Struct()
    args.update({"customer_id": customer})
    return pb.CheckRequest(
        action=pb.Action(tool="close_account", arguments=args), session_id=session_id
    )


async def test_check_counts_a_session_named_in_the_request_or_the_metadata(
    grpc_warden: Warden,
) -> None:
    async with grpc.aio.insecure_channel(grpc_warden.grpc_address) as channel:
        stub = pb_grpc.GovernanceStub(channel)
        # Three account changes (one held call proposed again is one hold).
        named = [await stub.Check(_close(f"C-{n}", "ticket-1")) for n in range(3)]
        # The same session named in metadata (x-warden-session) is the same session,
        # and metadata wins over the field.
        by_metadata = await stub.Check(
            _close("C-7", "another"), metadata=(("x-warden-session", "ticket-1"),)
        )
        fresh = await stub.Check(_close("C-1", "ticket-2"))
        unnamed = [await stub.Check(_close("C-1")) for _ in range(3)]
    assert [r.effect for r in named] == [
        pb.EFFECT_REQUIRE_APPROVAL,
        pb.EFFECT_REQUIRE_APPROVAL,
        pb.EFFECT_DENY,
    ]
    assert LIMIT in named[2].reason
    assert by_metadata.effect == pb.EFFECT_DENY
    assert fresh.effect == pb.EFFECT_REQUIRE_APPROVAL
    # No session: no conversation to count in (the limit is per conversation).
    assert {r.effect for r in unnamed} == {pb.EFFECT_REQUIRE_APPROVAL}


async def test_the_clients_session_scope_names_the_session_of_governed_calls(
    grpc_warden: Warden,
) -> None:
    ran: list[str] = []
    async with AsyncWardenClient(grpc_warden.grpc_address) as client:

        @govern(client, wait=False)
        async def update_email(customer_id: str, email: str) -> str:
            ran.append(email)
            return "updated"

        async def conversation(name: str) -> list[str]:
            outcomes = []
            with session(name):
                for n in range(3):
                    try:
                        await update_email("C-9", f"n{n}@example.com")
                        outcomes.append("ran")
                    except ToolDenied as exc:
                        outcomes.append(exc.reason)
                    except ApprovalPending:  # a lead decides
                        outcomes.append("held")
            return outcomes

        # Two conversations at once, in tasks of their own: each keeps its own session.
        first, second = await asyncio.gather(conversation("chat-a"), conversation("chat-b"))
        explicit = await client.check(
            "update_email", {"customer_id": "C-9", "email": "x@example.com"}, session="chat-a"
        )
    for outcomes in (first, second):
        assert outcomes[:2] == ["held", "held"]
        assert LIMIT in outcomes[2]
    assert ran == []
    assert not explicit.allowed
    assert LIMIT in explicit.reason


async def test_the_sync_client_carries_the_session_too(grpc_warden: Warden) -> None:
    # A sync client from a thread of its own (Warden's loop runs in this one).
    address = grpc_warden.grpc_address

    def run() -> list[str]:
        with WardenClient(address) as client, session("sync-chat"):
            return [
                client.check("close_account", {"customer_id": f"C-3{n}"}).effect.value
                for n in range(3)
            ]

    effects = await asyncio.to_thread(run)
    assert effects == ["require_approval", "require_approval", "deny"]


# -- HTTP tool routes -----------------------------------------------------------------------


class Accounts(LoopbackServer):
    """An account service: records every request that reached it."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, dict[str, str]]] = []

    def _routes(self, app: web.Application) -> None:
        app.router.add_route("*", "/{tail:.*}", self._any)

    async def _any(self, request: web.Request) -> web.StreamResponse:
        self.seen.append((request.path, dict(request.headers)))
        return web.json_response({"ok": True})


ACCOUNT_ROUTES = [
    {
        "method": "POST",
        "path": "/accounts/{customer_id}/email",
        "tool": "update_email",
        "arguments": {"customer_id": "{customer_id}", "email": "/email"},
    },
]


async def test_http_tool_routes_count_the_session_a_request_names(tmp_path: Path) -> None:
    async with Accounts() as accounts:
        config = make_config(
            tmp_path,
            "http://127.0.0.1:9",
            upstreams={
                "accounts": {
                    "protocol": "http",
                    "base_url": accounts.url,
                    "routes": ACCOUNT_ROUTES,
                }
            },
            # Held calls pass once approved; here every call is decided at once.
            approvals={"mode": "defer"},
        )
        async with Warden(config) as warden, aiohttp.ClientSession() as http:
            url = f"{warden.proxy_url}/accounts/accounts/C-5/email"

            async def change(session_id: str | None, email: str) -> tuple[int, Any]:
                headers = {"X-Warden-Session": session_id} if session_id else {}
                async with http.post(url, json={"email": email}, headers=headers) as r:
                    return r.status, await r.json(content_type=None)

            # Three changes (one held call proposed again is one hold).
            named = [await change("case-7", f"a{n}@example.com") for n in range(3)]
            fresh = await change("case-8", "a0@example.com")
            unnamed = [await change(None, f"a{n}@example.com") for n in range(3)]
    codes = [(status, body["code"]) for status, body in named]
    assert codes == [(403, "approval_required"), (403, "approval_required"), (403, "denied")]
    assert LIMIT in named[2][1]["detail"]
    assert fresh[1]["code"] == "approval_required"
    assert {body["code"] for _, body in unnamed} == {"approval_required"}
    # Warden's own header never reaches the service.
    assert all("X-Warden-Session" not in headers for _, headers in accounts.seen)
    decided = [(s, facts.get("held")) for tool, s, facts in _sessions(tmp_path)]
    assert decided == [
        ("case-7", {}),
        ("case-7", {"update_email": 1}),
        ("case-7", {"update_email": 2}),
        ("case-8", {}),
        *[(None, None)] * 3,
    ]


# -- Envoy ext_authz ------------------------------------------------------------------------

AUTHZ_POLICY = """package envoy.authz

import rego.v1

default allow := {"allowed": true}

allow := {"allowed": false, "http_status": 429, "body": msg} if {
	input.parsed_path[2] == "refunds"
	used := object.get(input.session.calls, "issue_refund", 0)
	used >= 2
	msg := sprintf("%v refunds already in conversation %v; at most 2", [used, input.session.id])
}
"""


async def test_ext_authz_counts_the_session_the_checked_request_names(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "policy.rego").write_text(AUTHZ_POLICY)
    body = b'{"amount": 10}'

    def refund(session_id: str | None) -> Any:
        headers = {"content-type": "application/json"}
        if session_id:
            headers["x-warden-session"] = session_id
        return authz_request("POST", "/orders/A-1/refunds", headers, body)

    # Envoy's side: xds-protos stubs; the route rule makes each check an issue_refund.
    async with authz_serving(tmp_path, policy={"bundles": [str(bundle)]}) as stub:
        named = [await stub.Check(refund("conv-1")) for _ in range(3)]
        fresh = await stub.Check(refund("conv-2"))
        unnamed = [await stub.Check(refund(None)) for _ in range(3)]
    assert [r.status.code for r in named] == [GRPC_OK, GRPC_OK, GRPC_PERMISSION_DENIED]
    assert named[2].denied_response.status.code == 429
    assert named[2].denied_response.body == "2 refunds already in conversation conv-1; at most 2"
    assert fresh.status.code == GRPC_OK
    assert {r.status.code for r in unnamed} == {GRPC_OK}
