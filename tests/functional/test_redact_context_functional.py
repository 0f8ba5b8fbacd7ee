"""A policy's ``redact`` reaches the context (``X-Warden-Context-*`` headers) too, and a path
Warden cannot mask is said to be unapplied, not listed as if it were.

Through the real proxy, driven by the official openai SDK, with a Rego bundle written
here: the audit records, the approval row (SQLite) and the policy's log lines are read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import openai

from tests.functional.conftest import audit_records, make_config
from tests.sdk_calls import function_calls
from warden.server import Warden
from warden.testing import Call, MockLLM, Reply

MESSAGES: Any = [{"role": "user", "content": "change my email"}]
OLD_EMAIL = "old.ann@example.com"
NEW_EMAIL = "new.ann@example.com"
TOKEN = "tok-dana-redact"
POLICY = """package warden

import rego.v1

# The context rides on every request of the conversation: each decision names it.
decision := {"effect": "allow", "redact": ["context.customer_email"]} if {
    input.action.kind == "llm_call"
}

decision := {
    "effect": "require_approval",
    "reason": "changing a customer's email address needs a support lead",
    "approvers": ["support-leads"],
    "redact": ["action.arguments.email", "context.customer_email"],
} if input.action.tool == "update_email"

decision := {"effect": "allow", "redact": ["input.context", "agent.claims.email"]} if {
    input.action.tool == "lookup_customer"
}
"""


def bundle(tmp_path: Path) -> Path:
    folder = tmp_path / "bundle"
    folder.mkdir()
    manifest = {"revision": f"redact-{tmp_path.name}", "roots": ["warden"]}
    (folder / ".manifest").write_text(json.dumps(manifest))
    (folder / "policy.rego").write_text(POLICY)
    return folder


def config(tmp_path: Path, llm: MockLLM) -> Any:
    sha = hashlib.sha256(TOKEN.encode()).hexdigest()
    dana = {"subject": "dana", "roles": ["approver"], "groups": ["support-leads"], "sha256": sha}
    return make_config(
        tmp_path,
        llm.url,
        policy={"bundles": [str(bundle(tmp_path))]},
        admin={"tokens": [dana]},
    )


def files_containing(root: Path, needle: str) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle.encode() in p.read_bytes()]


def decisions(tmp_path: Path, tool: str) -> list[dict[str, Any]]:
    return [
        r
        for r in audit_records(tmp_path / "audit")
        if r["kind"] == "decision" and r["action"]["tool"] == tool
    ]


async def test_a_redacted_context_value_is_masked_in_the_records_and_the_approval(
    tmp_path: Path, llm: MockLLM
) -> None:
    async with (
        Warden(config(tmp_path, llm)) as warden,
        openai.AsyncOpenAI(
            base_url=f"{warden.proxy_url}/openai/v1", api_key="sk-test", max_retries=0
        ) as agent,
        aiohttp.ClientSession(
            base_url=warden.admin_url, headers={"Authorization": f"Bearer {TOKEN}"}
        ) as admin,
    ):

        async def propose(old_email: str) -> list[str]:
            llm.script(
                Reply(tool_calls=[Call("update_email", {"customer_id": "C-1", "email": NEW_EMAIL})])
            )
            headers = {
                "X-Warden-Context-Ticket": "T-7",
                "X-Warden-Context-Customer-Email": old_email,
            }
            done = await agent.chat.completions.create(
                model="gpt-4o-mini", messages=MESSAGES, extra_headers=headers
            )
            return [t.function.name for t in function_calls(done.choices[0].message)]

        # Held (deferred): the agent gets no call, a support lead gets an approval.
        assert await propose(OLD_EMAIL) == []
        async with admin.get("/v1/approvals?status=pending") as resp:
            (shown,) = (await resp.json())["approvals"]
        # Approvers are shown the arguments only: the context's path is no hidden argument.
        assert shown["arguments"] == {"customer_id": "C-1", "email": "[redacted]"}
        assert shown["redacted"] == ["email"]
        async with admin.post(f"/v1/approvals/{shown['id']}/approve", json={}) as resp:
            assert resp.status == 200
        # The approval is bound to the real context: another customer email is another call
        # (both would read "[redacted]"), the approved one passes.
        assert await propose("someone.else@example.com") == []
        assert await propose(OLD_EMAIL) == ["update_email"]

    assert files_containing(tmp_path / "audit", OLD_EMAIL) == []
    assert files_containing(tmp_path / "audit", NEW_EMAIL) == []
    records = decisions(tmp_path, "update_email")
    # Held, held again (another email), and the approved call: asked again, then let through.
    assert [r["decision"]["guard"] for r in records] == ["policy", "policy", "policy", "approval"]
    for record in records:
        assert record["action"]["context"] == {"ticket": "T-7", "customer_email": "[redacted]"}
        assert record["action"]["redacted"] == ["email", "context.customer_email"]
        assert "redact_not_applied" not in record["decision"]["obligations"]

    with sqlite3.connect(tmp_path / "state.db") as db:
        rows = db.execute("SELECT arguments, redacted, status FROM approvals").fetchall()
    assert sorted(r[2] for r in rows) == ["consumed", "pending"]
    for arguments, redacted, _ in rows:
        assert OLD_EMAIL not in arguments + redacted
        assert NEW_EMAIL not in arguments + redacted
        assert redacted == '["email"]'


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


async def test_a_path_warden_cannot_mask_is_recorded_as_not_applied(
    tmp_path: Path, llm: MockLLM
) -> None:
    warnings = _Warnings()
    logging.getLogger("warden.policy").addHandler(warnings)
    try:
        async with (
            Warden(config(tmp_path, llm)) as warden,
            openai.AsyncOpenAI(
                base_url=f"{warden.proxy_url}/openai/v1", api_key="sk-test", max_retries=0
            ) as agent,
        ):
            for _ in range(2):
                llm.script(Reply(tool_calls=[Call("lookup_customer", {"customer_id": "C-1"})]))
                done = await agent.chat.completions.create(
                    model="gpt-4o-mini",
                    messages=MESSAGES,
                    extra_headers={"X-Warden-Context-Customer-Email": OLD_EMAIL},
                )
                assert [t.function.name for t in function_calls(done.choices[0].message)] == [
                    "lookup_customer"
                ]
    finally:
        logging.getLogger("warden.policy").removeHandler(warnings)

    for record in decisions(tmp_path, "lookup_customer"):
        obligations = record["decision"]["obligations"]
        assert obligations["redact"] == ["input.context", "agent.claims.email"]
        assert obligations["redact_not_applied"] == ["agent.claims.email"]
        # The whole context hidden: its keys stay, so readers still find an object.
        assert record["action"]["context"] == {"customer_email": "[redacted]"}
        assert record["action"]["redacted"] == ["context"]
    assert files_containing(tmp_path / "audit", OLD_EMAIL) == []
    said = [line for line in warnings.lines if "agent.claims.email" in line]
    assert len(said) == 1, warnings.lines  # once per path and bundle revision
    assert f"redact-{tmp_path.name}" in said[0]
    assert OLD_EMAIL not in "".join(warnings.lines)
