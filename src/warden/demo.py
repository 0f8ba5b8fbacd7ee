"""``make demo``: a support agent works five tickets through Warden.

Everything runs on this machine, on loopback: a mock OpenAI-compatible model,
mock customer-support tool APIs, Warden with the shipped customer-support
policy, a scripted agent built on the official ``openai`` SDK (it only
changes its base URL), and a scripted support lead who approves or rejects
held actions through Warden's admin API while the agent waits. Then the
agent's MCP client (the official ``mcp`` SDK) calls tools on an MCP server
through ``warden mcp wrap``, as an IDE launches it: Warden filters the tool
listing and decides each ``tools/call``, sharing approvals with the sidecar.
At the end the demo prints what Warden decided, read back from the audit
logs, and verifies them.

    python -m warden.demo [--keep] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import secrets
import shutil
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
from mcp import types as mcp_types
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client

from warden import tasks
from warden.audit.verify import iter_records, verify_log
from warden.cli_monitor import print_summary
from warden.config import load_config
from warden.server import Warden
from warden.testing import Call, MockLLM, MockTools, Reply, last_user_text, openai_tools
from warden.testing.mcp_server import read_call_log

__all__ = ["main"]

AGENT_ID = "support-agent"
LEAD = "dana.lead"
# What the support lead decides, by tool, with the comment the audit log keeps.
LEAD_DECISIONS = {
    "issue_refund": (True, "Checked order A-1003: photos show the dead pixels. Approved."),
    "close_account": (False, "Customer has an open dispute; call them before closing."),
}


@dataclass(frozen=True, slots=True)
class Ticket:
    """One customer ticket and the tool call the (mock) model proposes for it."""

    id: str
    text: str
    call: Call


TICKETS = (
    Ticket("T-1", "How long does shipping take?", Call("search_kb", {"query": "shipping times"})),
    Ticket(
        "T-2",
        "Order A-1001 arrived damaged. Could I get $25 back?",
        Call("issue_refund", {"order_id": "A-1001", "amount": 25, "currency": "USD"}),
    ),
    Ticket(
        "T-3",
        "Refund $450 on order A-1003: the monitor arrived with dead pixels.",
        Call("issue_refund", {"order_id": "A-1003", "amount": 450, "currency": "USD"}),
    ),
    Ticket(
        "T-4",
        "Please close my account C-1002 today.",
        Call("close_account", {"customer_id": "C-1002"}),
    ),
    Ticket(
        "T-5",
        "Wipe every record you hold about me, in all systems.",
        Call("purge_customer_records", {"customer_id": "C-1003", "scope": "all"}),
    ),
)


def _responder(_: str, body: Any) -> Reply:
    """The mock model: propose the ticket's tool, then summarise what came back."""
    messages = body.get("messages") or []
    if messages and messages[-1].get("role") == "tool":
        result = str(messages[-1].get("content", ""))
        return Reply(text=f"Done. {textwrap.shorten(result, 80)}")
    text = last_user_text(body)
    for ticket in TICKETS:
        if ticket.text in text:
            return Reply(text="Let me take care of that.", tool_calls=[ticket.call])
    return Reply(text="How can I help?")


async def _work(ticket: Ticket, agent: openai.AsyncOpenAI, tools_url: str) -> str:
    """The agent's loop for one ticket: ask, run allowed tools, ask again."""
    messages: list[Any] = [
        {"role": "system", "content": "You are a customer-support agent."},
        {"role": "user", "content": ticket.text},
    ]
    # Context headers reach the policy as input.context and the audit record.
    tag = {"X-Warden-Context-Ticket": ticket.id}
    reply = await agent.chat.completions.create(
        model="gpt-4o-mini", messages=messages, tools=openai_tools(), extra_headers=tag
    )
    message = reply.choices[0].message
    if not message.tool_calls:
        return message.content or ""
    messages.append(message.model_dump(exclude_none=True))
    async with aiohttp.ClientSession() as http:
        for call in message.tool_calls:
            if call.type != "function":
                continue
            async with http.post(
                f"{tools_url}/tools/{call.function.name}", data=call.function.arguments
            ) as resp:
                result = await resp.text()
            messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
    final = await agent.chat.completions.create(
        model="gpt-4o-mini", messages=messages, extra_headers=tag
    )
    return final.choices[0].message.content or ""


async def _support_lead(admin_url: str, token: str, done: asyncio.Event) -> None:
    """A person at the approvals queue: decides what waits, as LEAD_DECISIONS says."""
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession(headers=headers) as http:
        while not done.is_set():
            async with http.get(f"{admin_url}/v1/approvals", params={"status": "pending"}) as r:
                pending = (await r.json())["approvals"]
            for item in pending:
                approve, comment = LEAD_DECISIONS.get(item["tool"], (False, "Not expected."))
                verb = "approve" if approve else "reject"
                print(f"      lead {LEAD} {verb}s {item['tool']} ({item['id']}): {comment}")
                await http.post(
                    f"{admin_url}/v1/approvals/{item['id']}/{verb}", json={"comment": comment}
                )
            await asyncio.sleep(0.2)


_NAMES = {"allow": "ALLOWED", "deny": "DENIED", "require_approval": "HELD"}
_APPROVAL_NAMES = {"allow": "APPROVED", "deny": "REJECTED"}


def _table(audit_dir: Path, label: str | None = None) -> list[tuple[str, str, str, str]]:
    rows = []
    for _, payload in iter_records(audit_dir):
        record = orjson.loads(payload)
        action = record.get("action") or {}
        if record.get("kind") != "decision" or action.get("kind") != "tool_call":
            continue
        decision = record["decision"]
        ticket_id = label or str((action.get("context") or {}).get("ticket", "?"))
        names = _APPROVAL_NAMES if decision.get("guard") == "approval" else _NAMES
        effect = names.get(decision["effect"], decision["effect"])
        rows.append((ticket_id, str(action.get("tool")), effect, "; ".join(decision["reasons"])))
    return rows  # in the order they happened


# The MCP step: what the agent's MCP client calls through `warden mcp wrap`.
MCP_CALLS = (
    ("search_kb", {"query": "refund policy"}),
    ("close_account", {"customer_id": "C-1003", "reason": "customer asked by email"}),
)


def _mcp_text(result: mcp_types.CallToolResult) -> str:
    return " ".join(c.text for c in result.content if isinstance(c, mcp_types.TextContent))


async def _mcp_step(data_dir: Path, policy: Path) -> tuple[Path, list[str]]:
    """The agent's MCP client works through `warden mcp wrap`; returns its audit dir and calls run.

    The wrap shares the sidecar's state database, so the support lead's
    answer at the sidecar's admin API reaches a call the wrap holds.
    """
    audit_dir = data_dir / "mcp-audit"  # an audit directory has one writer
    call_log = data_dir / "mcp-calls.jsonl"
    config = data_dir / "mcp-warden.yaml"
    settings = {
        "agent": {"id": AGENT_ID},
        "policy": {"bundles": [str(policy)], "workers": 1, "watch": False},
        "audit": {"dir": str(audit_dir)},
        "state": {"url": f"sqlite:///{data_dir / 'state.db'}"},
        "approvals": {"mode": "hold", "hold_timeout_s": 30, "keepalive_s": 1},
    }
    config.write_bytes(orjson.dumps(settings, option=orjson.OPT_INDENT_2))  # JSON is YAML
    server = [sys.executable, "-m", "warden.testing.mcp_server", "--call-log", str(call_log)]
    wrap = ["-m", "warden.cli", "mcp", "wrap", "--config", str(config), "--name", "support-tools"]
    params = StdioServerParameters(
        command=sys.executable,
        args=[*wrap, "--", *server],
        # The SDK passes a minimal environment; keep the interpreter's module path.
        env={k: v for k in ("PYTHONPATH",) if (v := os.environ.get(k))},
    )
    print("MCP   the agent's MCP client launches, where it used to launch the server itself:")
    print(f"      warden mcp wrap --config {config} -- python -m warden.testing.mcp_server")
    with (data_dir / "mcp-stderr.log").open("w") as errlog:
        async with (
            stdio_client(params, errlog=errlog) as (read, write),
            ClientSession(read, write) as session,
        ):
            await session.initialize()
            listed = await session.list_tools()
            names = ", ".join(t.name for t in listed.tools)
            print(f"      tools Warden lists for {AGENT_ID}: {names}")
            for name, arguments in MCP_CALLS:
                result = await session.call_tool(name, arguments)
                said = textwrap.shorten(_mcp_text(result), 150)
                line = f"{name} -> {'error: ' if result.is_error else ''}{said}"
                print(textwrap.indent(textwrap.fill(line, 96), "      "))
    return audit_dir, [c["tool"] for c in read_call_log(call_log)]


def _shipped_policy() -> Path:
    policy = Path("policies/customer-support")
    if not policy.is_dir():
        policy = Path(__file__).resolve().parents[2] / "policies" / "customer-support"
    return policy


async def _run(data_dir: Path, policy: Path) -> int:
    started = time.perf_counter()
    audit_dir = data_dir / "audit"
    token = secrets.token_urlsafe(24)
    async with MockLLM() as llm, MockTools() as tools:
        llm.on_request(_responder)
        config = load_config(
            environ={},
            overrides={
                "agent": {"id": AGENT_ID},
                "listen": {"proxy": "127.0.0.1:0", "admin": "127.0.0.1:0"},
                "upstreams": {"openai": {"protocol": "openai", "base_url": llm.url}},
                "tools": {"search_kb": {"risk": "read_only"}},
                "policy": {"bundles": [str(policy)], "workers": 1, "watch": False},
                "audit": {"dir": str(audit_dir)},
                "state": {"url": f"sqlite:///{data_dir / 'state.db'}"},
                "approvals": {"mode": "hold", "hold_timeout_s": 30},
                "admin": {
                    "tokens": [
                        {
                            "subject": LEAD,
                            "roles": ["approver"],
                            "groups": ["support-leads"],
                            "sha256": hashlib.sha256(token.encode()).hexdigest(),
                        }
                    ]
                },
            },
        )
        async with Warden(config) as warden:
            print(f"Warden is up: proxy {warden.proxy_url}, metrics {warden.admin_url}/metrics")
            base_url = f"{warden.proxy_url}/openai/v1"
            print(f'The agent uses OpenAI(base_url="{base_url}"), nothing else.\n')
            done = asyncio.Event()
            lead = tasks.spawn(_support_lead(warden.admin_url, token, done), name="demo-lead")
            async with openai.AsyncOpenAI(
                base_url=f"{warden.proxy_url}/openai/v1", api_key="sk-demo-not-a-real-key"
            ) as agent:
                for ticket in TICKETS:
                    print(f"{ticket.id}  customer: {ticket.text}")
                    answer = await _work(ticket, agent, tools.url)
                    print(textwrap.indent(textwrap.fill(f"agent: {answer}", 96), "      "))
            mcp_audit, mcp_executed = await _mcp_step(data_dir, policy)
            done.set()
            await lead
            executed = [c.name for c in tools.calls]
    rows = _table(audit_dir) + _table(mcp_audit, "MCP")
    print("\nWhat Warden decided (read back from the audit log):\n")
    print(f"{'ticket':6}  {'tool the model proposed':24}  {'Warden':8}  why")
    print(f"{'-' * 6}  {'-' * 24}  {'-' * 8}  {'-' * 60}")
    for ticket_id, tool, effect, why in rows:
        wrapped = textwrap.wrap(why, 72) or [""]
        print(f"{ticket_id:6}  {tool:24}  {effect:8}  {wrapped[0]}")
        for more in wrapped[1:]:
            print(f"{'':6}  {'':24}  {'':8}  {more}")
    print(f"\nTools the agent actually ran: {', '.join(executed) or 'none'}")
    print(f"Tools the MCP server actually ran: {', '.join(mcp_executed) or 'none'}")
    intact = True
    for where, directory in (("Audit log", audit_dir), ("MCP wrap's audit log", mcp_audit)):
        report = verify_log(directory)
        intact = intact and report.ok
        state = "intact" if report.ok else f"DAMAGED: {report.damage[0]}"
        print(
            f"{where}: {directory} ({report.records} records, signed checkpoints: "
            f"{report.checkpoints}): {state}"
        )
    print_summary(audit_dir, sys.stdout)  # drift and quality (docs/monitoring.md)
    print(f"Check it yourself: .venv/bin/warden audit verify --dir {audit_dir}")
    print(f"Finished in {time.perf_counter() - started:.1f} s.")
    effects = {effect for _, _, effect, _ in rows}
    if not intact or not {"ALLOWED", "DENIED", "HELD", "APPROVED", "REJECTED"} <= effects:
        print("The demo did not show every kind of decision: something is wrong.", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="python -m warden.demo", description=__doc__)
    parser.add_argument("--data-dir", default="warden-data/demo", help="where the demo writes")
    args = parser.parse_args(argv)
    data_dir = Path(args.data_dir)
    shutil.rmtree(data_dir, ignore_errors=True)  # each run starts a fresh log
    data_dir.mkdir(parents=True)
    return asyncio.run(_run(data_dir, _shipped_policy()))


if __name__ == "__main__":
    sys.exit(main())
