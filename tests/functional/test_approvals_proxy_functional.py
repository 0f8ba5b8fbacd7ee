"""Human approval through the real proxy: the openai SDK waits while a person decides."""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from prometheus_client import REGISTRY

from tests.functional.conftest import SHIPPED_POLICY, audit_records, make_config
from tests.sdk_calls import function_calls
from warden.audit import arguments_sha256, keyed_digest
from warden.server import Warden
from warden.testing import Call, Fault, MockLLM, Reply

MESSAGES: Any = [{"role": "user", "content": "refund please"}]
BIG = Call("issue_refund", {"order_id": "A-1003", "amount": 450, "currency": "USD"})
TOKENS = {"dana": "tok-dana-approver", "vic": "tok-vic-viewer", "bot": "tok-agent-itself"}


def admin_tokens() -> list[dict[str, Any]]:
    def entry(subject: str, token: str, roles: list[str]) -> dict[str, Any]:
        sha = hashlib.sha256(token.encode()).hexdigest()
        return {"subject": subject, "roles": roles, "groups": ["support-leads"], "sha256": sha}

    return [
        entry("dana", TOKENS["dana"], ["approver"]),
        entry("vic", TOKENS["vic"], ["viewer"]),
        # The agent's own id as a subject: separation of duties must refuse it.
        entry("support-triage", TOKENS["bot"], ["approver", "admin"]),
    ]


def config(tmp_path: Path, llm: MockLLM, **approvals: Any) -> Any:
    return make_config(
        tmp_path,
        llm.url,
        approvals={"mode": "hold", "keepalive_s": 0.2, **approvals},
        admin={"tokens": admin_tokens()},
    )


async def admin(
    warden: Warden, method: str, path: str, who: str = "dana", body: Any = None
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {TOKENS[who]}"}
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, warden.admin_url + path, json=body, headers=headers) as resp,
    ):
        return resp.status, await resp.json()


async def pending_one(warden: Warden) -> dict[str, Any]:
    """The single pending approval, once it exists."""
    for _ in range(200):
        _, body = await admin(warden, "GET", "/v1/approvals?status=pending")
        if body["approvals"]:
            return dict(body["approvals"][0])
        await asyncio.sleep(0.05)
    raise AssertionError("no pending approval appeared")


@pytest.fixture
async def held(tmp_path: Path, llm: MockLLM) -> AsyncIterator[Warden]:
    async with Warden(config(tmp_path, llm)) as running:
        yield running


def client(warden: Warden) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"{warden.proxy_url}/openai/v1", api_key="sk-test", max_retries=0, timeout=60
    )


async def test_held_call_is_delivered_once_a_person_approves(
    held: Warden, llm: MockLLM, tmp_path: Path
) -> None:
    llm.script(Reply(tool_calls=[BIG]))
    async with client(held) as c:
        agent = asyncio.create_task(
            c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        )
        item = await pending_one(held)
        assert not agent.done()  # the agent is waiting on the person
        assert item["tool"] == "issue_refund"
        assert item["arguments"]["amount"] == 450
        assert "450.00 USD is above" in item["reason"]
        # Wrong token, wrong role and self-approval are refused while it waits.
        bad = {"Authorization": "Bearer nope"}
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"{held.admin_url}/v1/approvals/{item['id']}/approve", headers=bad, json={}
            ) as resp,
        ):
            assert resp.status == 401
        status, _ = await admin(held, "POST", f"/v1/approvals/{item['id']}/approve", "vic", {})
        assert status == 403
        status, body = await admin(held, "POST", f"/v1/approvals/{item['id']}/approve", "bot", {})
        assert status == 403
        assert body["error"]["code"] == "self_approval"
        status, _ = await admin(
            held, "POST", f"/v1/approvals/{item['id']}/approve", "dana", {"comment": "ok"}
        )
        assert status == 200
        completion = await agent
    calls = function_calls(completion.choices[0].message)
    assert [c.function.name for c in calls] == ["issue_refund"]
    assert json.loads(calls[0].function.arguments)["amount"] == 450
    status, _ = await admin(held, "POST", f"/v1/approvals/{item['id']}/approve", "dana", {})
    assert status == 409  # already decided
    await held.stop()
    records = audit_records(tmp_path / "audit")
    kinds = [r["kind"] for r in records]
    assert "approval_requested" in kinds
    assert "approval_decided" in kinds
    approved = [r for r in records if r.get("decision", {}).get("guard") == "approval"]
    assert approved[0]["decision"]["effect"] == "allow"
    evidence = approved[0]["approval"]
    assert evidence["approver"] == "dana"
    assert evidence["verdict"] == "approved"
    # What ran is what the person saw: the same argument digest (keyed, as every one
    # the log keeps), the same as the approval's own records keep.
    assert not isinstance(BIG.arguments, str)  # narrows: BIG's arguments are a mapping
    digest = keyed_digest(tmp_path / "audit", arguments_sha256(dict(BIG.arguments)))
    assert evidence["arguments_sha256"] == digest
    decided = [r for r in records if r["kind"] == "approval_decided"]
    assert [r["body"]["arguments_sha256"] for r in decided] == [digest]


async def until_deferred(warden: Warden) -> None:
    """Until the pending approval is a deferral (the admin API has no event to wait on)."""
    async with asyncio.timeout(5):
        while (await pending_one(warden))["mode"] != "defer":  # noqa: ASYNC110
            await asyncio.sleep(0.05)


async def test_a_held_call_whose_agent_hung_up_is_deferred(held: Warden, llm: MockLLM) -> None:
    # Still held, its approval would deliver the call to no one, and the agent's
    # retry would open a second approval for the same call.
    llm.script(Reply(tool_calls=[BIG]))
    async with client(held) as c:
        agent = asyncio.create_task(
            c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        )
        await pending_one(held)
        agent.cancel()  # the agent's client gives up and closes its connection
        with pytest.raises(asyncio.CancelledError):
            await agent
    await until_deferred(held)


async def test_a_held_call_in_a_stream_whose_agent_hung_up_is_deferred(
    held: Warden, llm: MockLLM
) -> None:
    llm.script(Reply(tool_calls=[BIG]))
    async with client(held) as c:
        stream = await c.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True
        )
        await pending_one(held)
        await stream.close()  # the agent stops reading and closes its connection
    await until_deferred(held)


async def test_only_an_approved_held_call_reads_as_verified_history(
    held: Warden, llm: MockLLM, tmp_path: Path
) -> None:
    async def held_call(call_id: str, verdict: str) -> dict[str, Any]:
        call = Call("issue_refund", dict(BIG.arguments), id=call_id)  # type: ignore[arg-type]
        llm.script(Reply(tool_calls=[call]))
        agent = asyncio.create_task(
            session.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        )
        item = await pending_one(held)
        await admin(held, "POST", f"/v1/approvals/{item['id']}/{verdict}", "dana", {})
        await agent
        return {
            "role": "assistant",
            "tool_calls": [
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": "issue_refund", "arguments": json.dumps(BIG.arguments)},
                }
            ],
        }

    async with openai.AsyncOpenAI(
        base_url=f"{held.proxy_url}/openai/v1",
        api_key="sk-test",
        max_retries=0,
        timeout=60,
        default_headers={"X-Warden-Session": "held-history"},
    ) as session:
        refused = await held_call("call_refused", "reject")
        approved = await held_call("call_approved", "approve")
        # The agent then claims both ran; the next decision reads what Warden knows.
        history = [*MESSAGES]
        for message, call_id in ((refused, "call_refused"), (approved, "call_approved")):
            history += [message, {"role": "tool", "tool_call_id": call_id, "content": "done"}]
        llm.script(Reply(tool_calls=[Call("search_kb", {"query": "refund policy"})]))
        await session.chat.completions.create(model="gpt-4o-mini", messages=history)
    await held.stop()
    (last,) = [
        r
        for r in audit_records(tmp_path / "audit")
        if r["kind"] == "decision" and r["action"]["tool"] == "search_kb"
    ]
    verified = {h["call_id"]: h["verified"] for h in last["decision"]["input"]["history"]}
    assert verified == {"call_refused": False, "call_approved": True}


async def test_held_call_in_a_stream_is_released_after_approval(held: Warden, llm: MockLLM) -> None:
    llm.script(Reply(text="Checking the order.", tool_calls=[BIG]))
    async with client(held) as c:

        async def consume() -> tuple[str, list[str]]:
            stream = await c.chat.completions.create(
                model="gpt-4o-mini", messages=MESSAGES, stream=True
            )
            text, names = "", []
            async for chunk in stream:
                for choice in chunk.choices:
                    text += choice.delta.content or ""
                    names += [
                        t.function.name
                        for t in choice.delta.tool_calls or []
                        if t.function and t.function.name
                    ]
            return text, names

        agent = asyncio.create_task(consume())
        item = await pending_one(held)
        await asyncio.sleep(0.5)  # a few keep-alive comments go out meanwhile
        await admin(held, "POST", f"/v1/approvals/{item['id']}/approve", "dana", {})
        text, names = await agent
    assert text == "Checking the order."
    assert names == ["issue_refund"]


async def test_rejection_reaches_the_agent_as_an_explanation(held: Warden, llm: MockLLM) -> None:
    llm.script(Reply(tool_calls=[BIG]))
    async with client(held) as c:
        agent = asyncio.create_task(
            c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        )
        item = await pending_one(held)
        await admin(
            held, "POST", f"/v1/approvals/{item['id']}/reject", "dana", {"comment": "duplicate"}
        )
        completion = await agent
    message = completion.choices[0].message
    assert not message.tool_calls
    assert "rejected by dana: duplicate" in (message.content or "")
    assert completion.choices[0].finish_reason == "stop"


async def test_timeout_denies_and_never_approves(tmp_path: Path, llm: MockLLM) -> None:
    policy = tmp_path / "policy"
    policy.mkdir()
    (policy / "policy.rego").write_text(
        "package warden\n\nimport rego.v1\n\n"
        'decision := {"effect": "require_approval", "reason": "check it", "hold_timeout_s": 0.5} '
        'if input.action.kind == "tool_call"\n\n'
        'decision := {"effect": "allow"} if input.action.kind == "llm_call"\n'
    )
    cfg = make_config(
        tmp_path,
        llm.url,
        policy={"bundles": [str(policy)]},
        approvals={"mode": "hold"},
        admin={"tokens": admin_tokens()},
    )
    async with Warden(cfg) as w, client(w) as c:
        llm.script(Reply(tool_calls=[BIG]))
        completion = await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        assert not completion.choices[0].message.tool_calls
        assert "no one approved it within the hold time" in (
            completion.choices[0].message.content or ""
        )
        _, body = await admin(w, "GET", "/v1/approvals?status=expired")
        assert len(body["approvals"]) == 1
        status, _ = await admin(w, "POST", f"/v1/approvals/{body['approvals'][0]['id']}/approve")
        assert status == 409


async def test_defer_passes_the_same_call_once_after_approval(tmp_path: Path, llm: MockLLM) -> None:
    async with Warden(config(tmp_path, llm, mode="defer")) as w, client(w) as c:
        llm.script(Reply(tool_calls=[BIG]))
        first = await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        text = first.choices[0].message.content or ""
        assert not first.choices[0].message.tool_calls
        item = await pending_one(w)
        assert f"approval {item['id']} is pending" in text
        await admin(w, "POST", f"/v1/approvals/{item['id']}/approve", "dana", {})
        # The same call passes once...
        llm.script(Reply(tool_calls=[BIG]))
        again = await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        assert [t.function.name for t in function_calls(again.choices[0].message)] == [
            "issue_refund"
        ]
        # ...and only once.
        llm.script(Reply(tool_calls=[BIG]))
        third = await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        assert not third.choices[0].message.tool_calls
        # A changed amount is another action: not covered by that approval.
        changed = Call("issue_refund", {"order_id": "A-1003", "amount": 451, "currency": "USD"})
        llm.script(Reply(tool_calls=[changed]))
        fourth = await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        assert not fourth.choices[0].message.tool_calls


async def test_an_approval_for_one_customer_does_not_pass_the_call_for_another(
    tmp_path: Path, llm: MockLLM
) -> None:
    def for_customer(w: Warden, customer: str) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            base_url=f"{w.proxy_url}/openai/v1",
            api_key="sk-test",
            max_retries=0,
            timeout=60,
            default_headers={"X-Warden-Context-Customer-Id": customer},
        )

    async with (
        Warden(config(tmp_path, llm, mode="defer")) as w,
        for_customer(w, "C-1") as one,
        for_customer(w, "C-2") as two,
    ):
        llm.script(Reply(tool_calls=[BIG]))
        first = await one.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        assert not first.choices[0].message.tool_calls
        item = await pending_one(w)
        await admin(w, "POST", f"/v1/approvals/{item['id']}/approve", "dana", {})
        # The very same arguments for another customer: held again, on an approval of its own.
        llm.script(Reply(tool_calls=[BIG]))
        other = await two.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        assert not other.choices[0].message.tool_calls
        assert "is pending" in (other.choices[0].message.content or "")
        _, body = await admin(w, "GET", "/v1/approvals?status=pending")
        assert [a["id"] for a in body["approvals"]] != [item["id"]]
        assert len(body["approvals"]) == 1
        # The approved customer's call still passes, once.
        llm.script(Reply(tool_calls=[BIG]))
        again = await one.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        assert [t.function.name for t in function_calls(again.choices[0].message)] == [
            "issue_refund"
        ]


async def test_bound_context_keys_leave_per_request_context_out(
    tmp_path: Path, llm: MockLLM
) -> None:
    cfg = config(tmp_path, llm, mode="defer", bind_context=["customer_id"])
    async with Warden(cfg) as w, client(w) as c:

        async def ask(customer: str, request_id: str) -> Any:
            llm.script(Reply(tool_calls=[BIG]))
            headers = {
                "X-Warden-Context-Customer-Id": customer,
                "X-Warden-Context-Request-Id": request_id,
            }
            return await c.chat.completions.create(
                model="gpt-4o-mini", messages=MESSAGES, extra_headers=headers
            )

        assert not (await ask("C-1", "req-1")).choices[0].message.tool_calls
        item = await pending_one(w)
        await admin(w, "POST", f"/v1/approvals/{item['id']}/approve", "dana", {})
        # Another customer still needs its own approval; the same one, a new request id, passes.
        assert not (await ask("C-2", "req-2")).choices[0].message.tool_calls
        passed = (await ask("C-1", "req-3")).choices[0].message
        assert [t.function.name for t in function_calls(passed)] == ["issue_refund"]


async def test_an_agent_cannot_open_approvals_without_bound(tmp_path: Path, llm: MockLLM) -> None:
    """Past approvals.max_pending_per_agent, a call that needs a person is denied and recorded.

    A looping or hostile agent would otherwise file thousands, each a row approvers
    wade through; deciding one makes room again.
    """
    cfg = config(tmp_path, llm, mode="defer", max_pending_per_agent=2)
    async with Warden(cfg) as w, client(w) as c:
        texts = []
        for amount in (450, 451, 452):
            refund = Call("issue_refund", {"order_id": "A-1003", "amount": amount})
            llm.script(Reply(tool_calls=[refund]))
            got = await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
            assert not got.choices[0].message.tool_calls
            texts.append(got.choices[0].message.content or "")
        _, listed = await admin(w, "GET", "/v1/approvals?status=pending")
        assert len(listed["approvals"]) == 2
        assert "is pending" in texts[0]
        assert "is pending" in texts[1]
        assert "already has 2 approvals waiting" in texts[2]
        # A decision makes room.
        await admin(w, "POST", f"/v1/approvals/{listed['approvals'][0]['id']}/reject", "dana", {})
        llm.script(Reply(tool_calls=[Call("issue_refund", {"order_id": "A-1003", "amount": 453})]))
        got = await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        assert "is pending" in (got.choices[0].message.content or "")
    refunds = [
        r["decision"]
        for r in audit_records(tmp_path / "audit")
        if r["kind"] == "decision" and r["action"]["tool"] == "issue_refund"
    ]
    full = [d for d in refunds if d.get("error") == "approvals_full"]
    assert len(full) == 1
    assert full[0]["effect"] == "deny"


async def test_pending_approval_survives_a_restart(tmp_path: Path, llm: MockLLM) -> None:
    cfg = config(tmp_path, llm)
    first = Warden(cfg)
    await first.start()
    llm.script(Reply(tool_calls=[BIG]))
    async with client(first) as c:
        agent = asyncio.create_task(
            c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        )
        item = await pending_one(first)
        await first.stop()  # the held request is answered as deferred
        completion = await agent
    assert f"approval {item['id']} is pending" in (completion.choices[0].message.content or "")
    async with Warden(cfg) as second, client(second) as c:
        status, _ = await admin(second, "POST", f"/v1/approvals/{item['id']}/approve", "dana", {})
        assert status == 200
        llm.script(Reply(tool_calls=[BIG]))
        retry = await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        assert [t.function.name for t in function_calls(retry.choices[0].message)] == [
            "issue_refund"
        ]


async def test_kill_switch_rejects_held_approvals(held: Warden, llm: MockLLM) -> None:
    llm.script(Reply(tool_calls=[BIG]))
    async with client(held) as c:
        agent = asyncio.create_task(
            c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        )
        await pending_one(held)
        status, _ = await admin(
            held,
            "POST",
            "/v1/killswitches",
            "bot",  # holds the admin role; throwing a switch is not approving
            {"scope": "agent", "target": "support-triage", "reason": "incident 42"},
        )
        assert status in (200, 201)
        completion = await agent
    text = completion.choices[0].message.content or ""
    assert not completion.choices[0].message.tool_calls
    assert "incident 42" in text


async def test_kill_switch_cuts_a_live_stream_within_a_second(held: Warden, llm: MockLLM) -> None:
    # The upstream sends a little and then stalls, as a long generation would.
    llm.script(Reply(text="one two three four five six", fault=Fault("hang", after=3)))
    received: list[str] = []

    async def read_until_cut(c: openai.AsyncOpenAI) -> None:
        stream = await c.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True
        )
        async with asyncio.timeout(5):  # the cut must come well within this
            async for chunk in stream:
                received.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
                if len(received) == 1:
                    kill = {"scope": "agent", "target": "support-triage", "reason": "incident 7"}
                    await admin(held, "POST", "/v1/killswitches", "bot", kill)

    async with client(held) as c:
        with pytest.raises(openai.APIError, match="incident 7"):
            await read_until_cut(c)
    assert received


async def test_a_held_call_approved_after_a_policy_reload_that_denies_it_is_denied(
    tmp_path: Path, llm: MockLLM
) -> None:
    # The shipped policy holds a refund of 450; the emergency change (its data alone: the
    # manifest's revision stays) denies refunds over 100 outright. The person who approves
    # does not know: the call must meet the policy now in force.
    bundle = tmp_path / "bundle"
    shutil.copytree(SHIPPED_POLICY, bundle)
    cfg = make_config(
        tmp_path,
        llm.url,
        approvals={"mode": "hold", "keepalive_s": 0.2},
        policy={"bundles": [str(bundle)], "watch": True, "poll_interval_s": 0.2},
        admin={"tokens": admin_tokens()},
    )
    llm.script(Reply(tool_calls=[BIG]))
    async with Warden(cfg) as running, client(running) as c:
        agent = asyncio.create_task(
            c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        )
        item = await pending_one(running)
        loaded = running.readiness()[1]["policy"]["last_reload_at"]
        data = json.loads((bundle / "data.json").read_text())
        data["warden"]["limits"]["issue_refund"]["ceiling"] = 100
        (bundle / "data.json").write_text(json.dumps(data))
        for _ in range(200):  # until the new bundle is the one in force
            if running.readiness()[1]["policy"]["last_reload_at"] != loaded:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the changed bundle was not activated")
        status, _ = await admin(running, "POST", f"/v1/approvals/{item['id']}/approve", "dana", {})
        assert status == 200
        completion = await agent
    assert not completion.choices[0].message.tool_calls
    assert "policy now denies it" in (completion.choices[0].message.content or "")
    decided = [
        r["decision"]
        for r in audit_records(tmp_path / "audit")
        if r["kind"] == "decision" and r["action"].get("tool") == "issue_refund"
    ]
    assert [d["effect"] for d in decided] == ["require_approval", "allow", "deny"]
    assert "hard ceiling of 100.00 USD" in " ".join(decided[-1]["reasons"])


HOLD_REFUNDS = """package warden
import rego.v1
default decision := {"effect": "allow"}
decision := {"effect": "require_approval", "reason": "refunds need a lead"} if {
	input.action.tool == "issue_refund"
}
"""


async def test_a_deferred_call_is_counted_once(tmp_path: Path, llm: MockLLM) -> None:
    # The gate answers a deferral with the held decision and a note: counted again,
    # one held call was two in warden_agent_decisions_total (the deny-spike alert's
    # denominator) against one decision record.
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "policy.rego").write_text(HOLD_REFUNDS)
    agent = "counted-once"
    config = make_config(tmp_path, llm.url, agent={"id": agent}, policy={"bundles": [str(bundle)]})

    def held() -> float:
        sample = {"agent": agent, "effect": "require_approval"}
        return REGISTRY.get_sample_value("warden_agent_decisions_total", sample) or 0.0

    llm.script(Reply(tool_calls=[Call("issue_refund", {"order_id": "A-1"})]))
    async with Warden(config) as warden, client(warden) as c:
        before = held()
        await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        counted = held() - before
    recorded = [
        r
        for r in audit_records(tmp_path / "audit")
        if r["kind"] == "decision" and r["action"].get("tool") == "issue_refund"
    ]
    assert [r["decision"]["effect"] for r in recorded] == ["require_approval"]
    assert counted == 1
