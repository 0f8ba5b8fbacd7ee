"""A policy's ``required_approvals`` is what the held call needs, whatever the config says.

A real Warden with real Rego; the call is asked about through gRPC ``Check``
(answered at once, the approval pending) and decided in-process by two
approvers, as the admin API and console decide.
"""

from __future__ import annotations

from pathlib import Path

import grpc.aio
from google.protobuf import struct_pb2

from tests.functional.conftest import make_config
from warden.admin.auth import Principal
from warden.approvals.model import ApprovalStatus
from warden.grpc_api.v1 import governance_pb2 as pb
from warden.grpc_api.v1 import governance_pb2_grpc as pb_grpc
from warden.server import Warden

POLICY = """package warden

import rego.v1

default decision := {"effect": "allow", "reason": "fine"}

decision := {
	"effect": "require_approval",
	"reason": "a large refund needs two people",
	"required_approvals": 2,
} if input.action.arguments.amount > 1000
"""

ALICE = Principal("alice", frozenset({"approver"}), frozenset())
BOB = Principal("bob", frozenset({"approver"}), frozenset())


async def test_two_people_must_approve_when_the_policy_says_two(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "policy.rego").write_text(POLICY)
    config = make_config(
        tmp_path,
        "http://127.0.0.1:9",
        listen={"proxy": "127.0.0.1:0", "admin": "127.0.0.1:0", "grpc": "127.0.0.1:0"},
        policy={"bundles": [str(bundle)]},
        approvals={"mode": "defer", "required_approvals": 1},  # the config says one
    )
    async with Warden(config) as warden, grpc.aio.insecure_channel(warden.grpc_address) as ch:
        stub = pb_grpc.GovernanceStub(ch)
        args = struct_pb2.Struct()
        args.update({"order_id": "A-1", "amount": 5000})
        request = pb.CheckRequest(action=pb.Action(tool="issue_refund", arguments=args))
        held = await stub.Check(request)
        assert held.effect == pb.EFFECT_REQUIRE_APPROVAL
        approvals = warden._approvals
        assert approvals is not None
        approval = await approvals.get(held.approval_id)
        assert approval is not None
        assert approval.required_approvals == 2
        after_one = await approvals.decide(held.approval_id, ALICE, True, "ok")
        assert after_one.status is ApprovalStatus.PENDING
        still = await stub.Check(request)
        assert still.effect == pb.EFFECT_REQUIRE_APPROVAL  # one approval is not enough
        after_two = await approvals.decide(held.approval_id, BOB, True, "ok too")
        assert after_two.status is ApprovalStatus.APPROVED
        passed = await stub.Check(request)
    assert passed.effect == pb.EFFECT_ALLOW
