"""Rules proved in the core hold at every front door: gRPC ``Check``, HTTP tool routes, ext_authz.

A real Warden (real Rego: the shipped customer-support bundle, plus an
ext_authz query that allows everything) fronts a real tool API
(:class:`~warden.testing.mock_tools.MockTools`). Each door is driven as its
clients drive it: stubs generated from Warden's ``governance.proto``, aiohttp
for the HTTP route, xds-protos stubs playing Envoy for ext_authz.

* Arguments with keys equal but for case (a Go or .NET tool binds the last)
  were allowed by gRPC ``Check`` as the policy read them; the adapters denied them.
* NUL in an argument made the engine fail at these doors: a fallback denial in
  enforce mode, and in observe mode the call went through to the tool API.
* ext_authz never asked the policy which fields to redact: a routed call's
  email reached the audit log in clear.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import grpc.aio
import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc
from google.protobuf import struct_pb2

from tests.functional.conftest import SHIPPED_POLICY, audit_records, make_config
from tests.functional.test_envoy_authz_functional import _request as authz_request
from warden.grpc_api.v1 import governance_pb2 as pb
from warden.grpc_api.v1 import governance_pb2_grpc as pb_grpc
from warden.killswitch import Scope
from warden.server import Warden
from warden.testing.mock_tools import MockTools

# What the shipped bundle redacts on update_email: all but customer_id, and the answers.
CONTACT_REDACTED = ["action.arguments.email", "action.input_responses"]

EMAIL = "victim.secret@example.org"
GRPC_OK, GRPC_PERMISSION_DENIED = 0, 7
ROUTES = [
    {
        "method": "POST",
        "path": "/tools/issue_refund",
        "tool": "issue_refund",
        "arguments": {"order_id": "/order_id", "amount": "/amount"},
    },
    {
        "method": "POST",
        "path": "/customers/{customer_id}/email",
        "tool": "update_email",
        "arguments": {"customer_id": "{customer_id}", "email": "/email"},
    },
]
ALLOW_ALL = """package envoy.authz

import rego.v1

default allow := true
"""


@asynccontextmanager
async def _doors(tmp_path: Path, mode: str = "enforce") -> AsyncIterator[tuple[Warden, MockTools]]:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    for name in ("policy.rego", "data.json"):
        shutil.copy(SHIPPED_POLICY / name, bundle / name)
    (bundle / "authz.rego").write_text(ALLOW_ALL)
    async with MockTools() as tools:
        config = make_config(
            tmp_path,
            "http://127.0.0.1:9",
            mode=mode,
            listen={"proxy": "127.0.0.1:0", "admin": "127.0.0.1:0", "grpc": "127.0.0.1:0"},
            upstreams={
                "tools": {
                    "protocol": "http",
                    "base_url": tools.url,
                    "routes": ROUTES,
                    "unmatched": "deny",
                }
            },
            policy={"bundles": [str(bundle)], "workers": 1, "watch": False, "deadline_ms": 5000},
            ext_authz={"upstream": "tools"},
        )
        async with Warden(config) as warden:
            yield warden, tools


async def _check(warden: Warden, arguments: dict[str, Any], tool: str = "issue_refund") -> Any:
    """gRPC ``Check``, as an agent framework that runs its own tools asks."""
    struct = struct_pb2.Struct()
    struct.update(arguments)
    async with grpc.aio.insecure_channel(warden.grpc_address) as channel:
        stub = pb_grpc.GovernanceStub(channel)
        return await stub.Check(pb.CheckRequest(action=pb.Action(tool=tool, arguments=struct)))


async def _authz(warden: Warden, path: str, body: dict[str, Any]) -> Any:
    """ext_authz ``Check``, as Envoy asks for a request on its way to the tool API."""
    request = authz_request(
        "POST", path, {"content-type": "application/json"}, json.dumps(body).encode()
    )
    async with grpc.aio.insecure_channel(warden.grpc_address) as channel:
        return await external_auth_pb2_grpc.AuthorizationStub(channel).Check(request)


def _decisions(tmp_path: Path) -> dict[str, dict[str, Any]]:
    records = audit_records(tmp_path / "audit")
    return {r["decision"]["id"]: r for r in records if r["kind"] == "decision"}


@pytest.mark.parametrize("mode", ["enforce", "observe"])
@pytest.mark.parametrize(
    ("arguments", "where"),
    [
        ({"order_id": "A-1001", "amount": 50, "Amount": 5000}, "input.action.arguments"),
        (
            {"order_id": "A-1001", "amount": 50, "meta": {"note": "a", "NOTE": "b"}},
            "input.action.arguments.meta",
        ),
    ],
    ids=["flat", "nested"],
)
async def test_grpc_check_denies_arguments_with_keys_equal_but_for_case(
    tmp_path: Path, mode: str, arguments: dict[str, Any], where: str
) -> None:
    # The shipped policy allows a refund of 50; a Go or .NET tool binds "Amount": 5000.
    async with _doors(tmp_path, mode) as (warden, _):
        answer = await _check(warden, arguments)
        fine = await _check(warden, {"order_id": "A-1001", "amount": 50})
    assert (answer.effect, answer.guard, answer.would) == (pb.EFFECT_DENY, "validation", "")
    assert answer.reason.startswith(f"{where} holds two keys equal but for case")
    assert fine.guard == "policy"
    assert fine.effect == pb.EFFECT_ALLOW
    record = _decisions(tmp_path)[answer.decision_id]
    assert (record["decision"]["guard"], record["decision"]["enforced"]) == ("validation", "deny")
    assert record["decision"]["mode"] == "enforce"


async def test_nul_in_an_argument_is_refused_at_every_door_in_observe_mode(
    tmp_path: Path,
) -> None:
    arguments = {"order_id": "A-1001\x00; DROP", "amount": 5}
    async with _doors(tmp_path, "observe") as (warden, tools):
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"{warden.proxy_url}/tools/tools/issue_refund", json=arguments) as routed,
        ):
            routed_status = routed.status
            routed_body = await routed.text()
        authz = await _authz(warden, "/tools/issue_refund", arguments)
        checked = await _check(warden, arguments)
        called = list(tools.calls)
    # In observe mode the engine's failure was only observed: the refund reached the API.
    assert called == []
    assert routed_status == 403, routed_body
    assert "input.action.arguments.order_id holds NUL" in routed_body
    assert authz.status.code == GRPC_PERMISSION_DENIED
    assert authz.denied_response.status.code == 400
    assert "input.action.arguments.order_id holds NUL" in authz.denied_response.body
    assert (checked.effect, checked.guard, checked.would) == (pb.EFFECT_DENY, "validation", "")
    records = [r for r in _decisions(tmp_path).values() if r["action"]["tool"] == "issue_refund"]
    assert sorted(r["action"]["protocol"] for r in records) == ["envoy_authz", "grpc", "http"]
    for record in records:
        decision = record["decision"]
        # Validation, enforced: not the fallback, whose alert an agent could fire at will.
        assert (decision["guard"], decision["mode"], decision["enforced"]) == (
            "validation",
            "enforce",
            "deny",
        )
        assert decision["error"] is None


async def test_nul_in_the_context_of_a_grpc_check_is_refused_in_observe_mode(
    tmp_path: Path,
) -> None:
    context = struct_pb2.Struct()
    context.update({"customer_id": "C-1001\x00"})
    arguments = struct_pb2.Struct()
    arguments.update({"query": "refund policy"})
    request = pb.CheckRequest(
        action=pb.Action(tool="search_kb", arguments=arguments, context=context)
    )
    async with (
        _doors(tmp_path, "observe") as (warden, _),
        grpc.aio.insecure_channel(warden.grpc_address) as channel,
    ):
        answer = await pb_grpc.GovernanceStub(channel).Check(request)
    assert (answer.effect, answer.guard) == (pb.EFFECT_DENY, "validation")
    assert "input.context.customer_id holds NUL" in answer.reason


async def test_ext_authz_records_a_routed_call_with_the_policys_redactions(
    tmp_path: Path,
) -> None:
    # The shipped policy redacts update_email's email; ext_authz's own query allows.
    async with _doors(tmp_path) as (warden, _):
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"{warden.proxy_url}/tools/customers/C-1001/email", json={"email": EMAIL}
            ) as routed,
        ):
            assert routed.status == 403  # held for approval at the HTTP route
        allowed = await _authz(warden, "/customers/C-1001/email", {"email": EMAIL})
        assert warden.killswitches is not None
        await warden.killswitches.set(Scope.TOOL, "update_email", "stop", "oncall")
        stopped = await _authz(warden, "/customers/C-1001/email", {"email": EMAIL})
    assert allowed.status.code == GRPC_OK
    assert stopped.status.code == GRPC_PERMISSION_DENIED
    records = _decisions(tmp_path)
    by_id = {
        "allowed": records[allowed.dynamic_metadata["decision_id"]],
        "stopped": records[stopped.dynamic_metadata["decision_id"]],
    }
    assert by_id["allowed"]["decision"]["guard"] == "policy"
    assert by_id["stopped"]["decision"]["guard"] == "kill_switch"
    for record in by_id.values():
        action = record["action"]
        assert action["protocol"] == "envoy_authz"
        assert record["decision"]["obligations"]["redact"] == CONTACT_REDACTED
        assert action["arguments"] == {"customer_id": "C-1001", "email": "[redacted]"}
        assert action["request"]["path"] == "[redacted]"  # it may spell the arguments
    # As the HTTP route door records the same call.
    routed_record = next(r for r in records.values() if r["action"]["protocol"] == "http")
    assert routed_record["decision"]["obligations"]["redact"] == CONTACT_REDACTED
    assert EMAIL not in json.dumps(audit_records(tmp_path / "audit"))
