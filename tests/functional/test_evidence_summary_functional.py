"""SUMMARY.md of a real evidence package: each approval once, observe-mode verdicts apart.

A real Warden holds a refund (the openai SDK waiting) until two approvers approve it
through the admin API; the same log then takes observe-mode traffic from a Warden in
``mode: observe``. ``warden audit export`` makes the package, ``warden audit
verify-evidence`` checks it, and its SUMMARY.md is read as an auditor reads it.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

import aiohttp
import openai

from tests.functional.conftest import audit_records, make_config
from tests.sdk_calls import function_calls
from warden.cli import main as warden_main
from warden.server import Warden
from warden.testing import Call, MockLLM, Reply

MESSAGES: Any = [{"role": "user", "content": "refund please"}]
BIG = Call("issue_refund", {"order_id": "A-1003", "amount": 450, "currency": "USD"})
EXPORT = Call("export_customers", {"format": "csv"})
TOKENS = {"dana": "tok-dana-approver", "sam": "tok-sam-approver"}


def config(tmp_path: Path, llm: MockLLM, **overrides: Any) -> Any:
    """Held calls wait for two approvers; both may approve through the admin API."""
    tokens = [
        {
            "subject": subject,
            "roles": ["approver"],
            "groups": ["support-leads"],
            "sha256": hashlib.sha256(token.encode()).hexdigest(),
        }
        for subject, token in TOKENS.items()
    ]
    return make_config(
        tmp_path,
        llm.url,
        approvals={"mode": "hold", "keepalive_s": 0.2, "required_approvals": 2},
        admin={"tokens": tokens},
        **overrides,
    )


def client(warden: Warden) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"{warden.proxy_url}/openai/v1", api_key="sk-test", max_retries=0, timeout=60
    )


async def admin(warden: Warden, method: str, path: str, who: str) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {TOKENS[who]}"}
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, warden.admin_url + path, json={}, headers=headers) as resp,
    ):
        return resp.status, await resp.json()


async def pending_id(warden: Warden) -> str:
    """The id of the single pending approval, once it exists."""
    for _ in range(200):
        _, body = await admin(warden, "GET", "/v1/approvals?status=pending", "dana")
        if body["approvals"]:
            return str(body["approvals"][0]["id"])
        await asyncio.sleep(0.05)
    raise AssertionError("no pending approval appeared")


def table(summary: str, title: str) -> tuple[list[str], list[dict[str, str]]]:
    """The header and rows of the Markdown table under ``## title``."""
    section = summary.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]

    def cells(line: str) -> list[str]:
        return [cell.strip() for cell in line.strip().strip("|").split("|")]

    head = cells(lines[0])
    return head, [dict(zip(head, cells(line), strict=True)) for line in lines[2:]]


async def scenario(llm: MockLLM, tmp_path: Path) -> Path:
    """A refund two people approve, then observe-mode traffic; the audit log's folder."""
    async with Warden(config(tmp_path, llm)) as warden, client(warden) as c:
        llm.script(Reply(tool_calls=[BIG]))
        agent = asyncio.create_task(
            c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        )
        approval = await pending_id(warden)
        for who in ("dana", "sam"):
            status, _ = await admin(warden, "POST", f"/v1/approvals/{approval}/approve", who)
            assert status == 200
        completion = await agent
        assert [f.function.name for f in function_calls(completion.choices[0].message)] == [
            "issue_refund"
        ]
    # The same log, now in observe mode: a denial and a hold that both go through.
    async with Warden(config(tmp_path, llm, mode="observe")) as warden, client(warden) as c:
        for call in (EXPORT, BIG):
            llm.script(Reply(tool_calls=[call]))
            done = await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
            assert [f.function.name for f in function_calls(done.choices[0].message)] == [call.name]
    return tmp_path / "audit"


async def export(audit: Path, out: Path, *options: str) -> str:
    """``warden audit export`` of ``audit`` to ``out``, checked by ``warden audit
    verify-evidence``; the package's SUMMARY.md."""
    # In a thread: the commands run their own event loop, as they do from a shell.
    exported = await asyncio.to_thread(
        warden_main, ["audit", "export", "--dir", str(audit), "--out", str(out), *options]
    )
    assert exported == 0
    vkey = (audit / "keys" / "checkpoint.vkey").read_text().strip()
    verified = await asyncio.to_thread(
        warden_main, ["audit", "verify-evidence", str(out), "--key", vkey]
    )
    assert verified == 0
    return (out / "SUMMARY.md").read_text()


async def test_summary_lists_each_approval_once_per_approver(llm: MockLLM, tmp_path: Path) -> None:
    audit = await scenario(llm, tmp_path)
    records = audit_records(audit)
    # The log holds one vote per approver and a follow-up decision naming both.
    assert [r["body"]["who"] for r in records if r["kind"] == "approval_decided"] == [
        "dana",
        "sam",
    ]
    (followed,) = [r for r in records if r["kind"] == "decision" and r.get("approval")]
    assert followed["approval"]["approver"] == "dana,sam"
    expected = [("dana", "approved", "issue_refund"), ("sam", "approved", "issue_refund")]

    summary = await export(audit, tmp_path / "whole")
    _, approvals = table(summary, "Approvals")
    assert [(r["approver"], r["verdict"], r["tool"]) for r in approvals] == expected

    # A period starting at the follow-up decision holds no vote: its approval is the
    # only word of the two approvers, one row each.
    summary = await export(audit, tmp_path / "after", "--from", followed["time"])
    _, approvals = table(summary, "Approvals")
    assert [(r["approver"], r["verdict"], r["tool"]) for r in approvals] == expected
    assert {r["decided at"] for r in approvals} == {followed["approval"]["decided_at"]}


async def test_summary_counts_observe_mode_apart_by_agent_and_tool(
    llm: MockLLM, tmp_path: Path
) -> None:
    summary = await export(await scenario(llm, tmp_path), tmp_path / "evidence")
    _, by_effect = table(summary, "Decisions by effect")
    effects = {r["effect"]: int(r["decisions"]) for r in by_effect}
    assert effects["require_approval"] == 1
    assert effects["deny (observe)"] == 1
    assert effects["require_approval (observe)"] == 1
    assert "deny" not in effects
    head, by_agent = table(summary, "Decisions by agent")
    assert head[:4] == ["agent", "allow", "deny", "require_approval"]
    assert {"deny (observe)", "require_approval (observe)"} <= set(head)
    # Every column is one label of the effect table, so each adds up to it.
    for label, count in effects.items():
        assert sum(int(r[label]) for r in by_agent) == count
    (triage,) = by_agent
    assert (triage["agent"], triage["deny"], triage["require_approval"]) == (
        "support-triage",
        "0",
        "1",
    )
    assert (triage["deny (observe)"], triage["require_approval (observe)"]) == ("1", "1")
    _, by_tool = table(summary, "Decisions by tool")
    tools = {r["tool"]: r for r in by_tool}
    refund, bulk = tools["issue_refund"], tools["export_customers"]
    # The hold, the decision once both approved, and the observed hold.
    assert (refund["allow"], refund["require_approval"], refund["require_approval (observe)"]) == (
        "1",
        "1",
        "1",
    )
    assert (bulk["deny"], bulk["deny (observe)"]) == ("0", "1")
    for label, count in effects.items():
        assert sum(int(r[label]) for r in by_tool) == count
