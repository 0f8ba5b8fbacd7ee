"""The policy's redactions hold in every record of an action, whoever decided it.

Driven through the real proxy with the openai SDK: the policy, a kill switch,
the validation guard and the fallback each decide an ``update_email`` call;
the email address must not be anywhere in the audit directory afterwards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson

from tests.functional.conftest import audit_records, make_config
from warden.admin.auth import hash_token
from warden.audit import arguments_sha256, keyed_digest
from warden.server import Warden
from warden.testing import Call, MockLLM, Reply

TOKEN = "admin-token-redaction"
ADMIN = {"tokens": [{"subject": "alice", "roles": ["admin"], "sha256": hash_token(TOKEN)}]}
MESSAGES: Any = [{"role": "user", "content": "change my email"}]
POLICY = """package warden

import rego.v1

decision := {"effect": "allow"} if input.action.kind == "llm_call"

decision := {"effect": "allow", "redact": ["action.arguments.email"]} if {
    input.action.tool == "update_email"
}

# An effect the engine does not know: a policy error, so the fallback decides.
decision := {"effect": "perhaps"} if input.action.tool == "broken_update_email"
"""


def update(email: str, tool: str = "update_email") -> Call:
    return Call(tool, {"customer_id": "C-1", "email": email})


def files_containing(root: Path, needle: str) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle.encode() in p.read_bytes()]


def decision_for(records: list[dict[str, Any]], tool: str, guard: str) -> dict[str, Any]:
    found = [
        r
        for r in records
        if r["kind"] == "decision"
        and r["action"]["tool"] == tool
        and r["decision"]["guard"] == guard
    ]
    assert len(found) == 1, [r["decision"]["guard"] for r in records if r["kind"] == "decision"]
    return found[0]


async def test_every_deciding_stage_keeps_the_email_out_of_the_log(
    tmp_path: Path, llm: MockLLM
) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "policy.rego").write_text(POLICY)
    cfg = make_config(tmp_path, llm.url, policy={"bundles": [str(bundle)]}, admin=ADMIN)
    emails = {
        "policy": "ann.policy@example.com",
        "kill_switch": "ann.killed@example.com",
        "validation": "ann.garbled@example.com",
        "fallback": "ann.fallback@example.com",
    }
    async with (
        Warden(cfg) as warden,
        openai.AsyncOpenAI(
            base_url=f"{warden.proxy_url}/openai/v1", api_key="sk-test", max_retries=0
        ) as agent,
        aiohttp.ClientSession(
            base_url=warden.admin_url, headers={"Authorization": f"Bearer {TOKEN}"}
        ) as admin,
    ):

        async def propose(call: Call) -> list[str]:
            llm.script(Reply(tool_calls=[call]))
            done = await agent.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
            calls: list[Any] = list(done.choices[0].message.tool_calls or [])
            return [t.function.name for t in calls]

        # The policy decides: the agent gets the call, the log hides the email.
        assert await propose(update(emails["policy"])) == ["update_email"]
        # The validation guard decides: arguments that are not JSON.
        garbled = Call("update_email", '{"customer_id": "C-1", "email": "' + emails["validation"])
        assert await propose(garbled) == []
        # The fallback decides: the policy fails for this tool.
        assert await propose(update(emails["fallback"], "broken_update_email")) == []
        # A kill switch decides, before the policy is reached.
        body = {"scope": "tool", "target": "update_email", "reason": "mail system down"}
        async with admin.post("/v1/killswitches", json=body) as resp:
            assert resp.status == 201
        assert await propose(update(emails["kill_switch"])) == []

    records = audit_records(tmp_path / "audit")
    for stage, email in emails.items():
        assert files_containing(tmp_path / "audit", email) == [], stage

    by_policy = decision_for(records, "update_email", "policy")["action"]
    assert by_policy["arguments"] == {"customer_id": "C-1", "email": "[redacted]"}
    # The kill switch decided, yet the policy's own list applies: only the email is hidden.
    killed = decision_for(records, "update_email", "kill_switch")
    assert killed["action"]["arguments"] == {"customer_id": "C-1", "email": "[redacted]"}
    assert killed["decision"]["obligations"]["redact"] == ["action.arguments.email"]
    # No list could be had: nothing in plaintext, only the hash and the names.
    failed = decision_for(records, "broken_update_email", "fallback")["action"]
    assert failed["arguments"] == "[redacted]"
    # Keyed: hashing guessed emails does not find the one hidden here.
    claimed = arguments_sha256({"customer_id": "C-1", "email": emails["fallback"]})
    assert failed["arguments_sha256"] == keyed_digest(tmp_path / "audit", claimed)
    assert claimed not in orjson.dumps(records).decode()
    assert failed["argument_keys"] == ["customer_id", "email"]
    unparsed = decision_for(records, "update_email", "validation")["action"]
    assert unparsed["raw_arguments"] == "[redacted]"
    assert unparsed["arguments_sha256"] is not None


async def test_invented_header_values_grow_no_key_file(tmp_path: Path, llm: MockLLM) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "policy.rego").write_text(POLICY)
    cfg = make_config(
        tmp_path,
        llm.url,
        policy={"bundles": [str(bundle)]},
        audit={
            "dir": str(tmp_path / "audit"),
            "subjects": {"sources": ["action.arguments.customer_id"], "max_keys": 2},
        },
    )
    keys = tmp_path / "audit" / "subjects"
    async with (
        Warden(cfg) as warden,
        openai.AsyncOpenAI(
            base_url=f"{warden.proxy_url}/openai/v1", api_key="sk-test", max_retries=0
        ) as agent,
    ):
        for i in range(10):
            llm.script(Reply(text="hello"))
            await agent.chat.completions.create(
                model="gpt-4o-mini",
                messages=MESSAGES,
                extra_headers={"X-Warden-Context-Customer-Id": f"invented-{i}"},
            )
        assert list(keys.rglob("*.key")) == []
        for customer in ("cust-first", "cust-second", "cust-third-past-the-bound"):
            llm.script(Reply(tool_calls=[Call("update_email", {"customer_id": customer})]))
            await agent.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert len(list(keys.rglob("*.key"))) == 2
    for customer in ("cust-first", "cust-second", "cust-third-past-the-bound"):
        assert files_containing(tmp_path / "audit", customer) == [], customer
    third = [
        r
        for r in audit_records(tmp_path / "audit")
        if r["kind"] == "decision" and r["action"]["tool"] == "update_email"
    ][2]
    assert third["subject"] is not None
    assert third["sealed"] is None
    assert third["action"]["arguments"] == "[redacted]"
