"""Personal data and credentials stay out of the audit log, whatever the verdict.

* The shipped customer-support bundle masks a personal-data change it denies
  (an argument of the wrong type) as it masks one it holds: driven through
  the real proxy with the openai SDK, the value is nowhere in the audit
  directory afterwards. Only the customer id stays in clear: an argument of
  another name (``new_email``, ``Email``) is masked too, and so are the answers
  of an MCP retry (one carrying the new email is denied, and recorded masked).
* Credentials inside argument values (a URL's password, ``?api_key=``) are
  masked in the record only: the policy decides on the URL as sent and the
  agent gets it whole; a replay counts the masked decision inexact. So are a
  token used as a URL's user name, SAS and function-key parameters
  (``?sig=``, ``?code=``), and a URL used as an argument's name.
* A baseline pinned by ``warden monitor baseline`` keeps no exact number of a
  customer that ``warden audit erase`` erases afterwards.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import openai
from aiohttp import web

from tests.functional.conftest import audit_records, make_config, serving
from warden.audit import AuditLog
from warden.cli import main as warden_main
from warden.config import AuditConfig
from warden.policy.authoring.policy_set import load_policy_set
from warden.policy.authoring.replay import replay
from warden.server import Warden
from warden.testing import Call, MockLLM, Reply
from warden.testing.audit import sample_action, sample_decision

MESSAGES: Any = [{"role": "user", "content": "update my details"}]


def files_containing(root: Path, needle: str) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle.encode() in p.read_bytes()]


def tool_decisions(audit: Path) -> list[dict[str, Any]]:
    return [r for r in audit_records(audit) if r["kind"] == "decision" and r["action"]["tool"]]


async def test_the_shipped_bundle_masks_a_personal_data_change_it_denies(
    tmp_path: Path, llm: MockLLM
) -> None:
    # The model writes the phone as a number, a customer id as a number: each call is
    # denied for its types, before the rule that holds personal-data changes.
    calls = [
        (Call("update_phone", {"customer_id": "C-1", "phone": 4915112345678}), "4915112345678"),
        (
            Call("update_email", {"customer_id": 1042, "email": "ann.smith@example.com"}),
            "ann.smith@example.com",
        ),
        (
            Call("update_address", {"customer_id": 7, "address": {"street": "1 Main St"}}),
            "1 Main St",
        ),
    ]
    async with (
        Warden(make_config(tmp_path, llm.url)) as warden,
        openai.AsyncOpenAI(
            base_url=f"{warden.proxy_url}/openai/v1", api_key="sk-test", max_retries=0
        ) as agent,
    ):
        for call, _ in calls:
            llm.script(Reply(tool_calls=[call]))
            answer = await agent.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
            assert not answer.choices[0].message.tool_calls  # the denied call is taken out
    audit = tmp_path / "audit"
    records = tool_decisions(audit)
    assert [r["action"]["tool"] for r in records] == [c.name for c, _ in calls]
    for record, (call, value) in zip(records, calls, strict=True):
        assert isinstance(call.arguments, dict)
        name = next(k for k in call.arguments if k != "customer_id")
        assert record["decision"]["effect"] == "deny"
        assert "needs" in record["decision"]["reasons"][0]
        # A customer id of the wrong type could hold anything: masked with the value.
        masked = sorted(
            {name} | ({"customer_id"} if call.arguments["customer_id"] != "C-1" else set())
        )
        assert record["decision"]["obligations"]["redact"] == [
            *(f"action.arguments.{n}" for n in masked),
            "action.input_responses",
        ]
        assert record["action"]["arguments"][name] == "[redacted]"
        assert record["action"]["arguments_sha256"] is not None
        assert files_containing(audit, value) == []


async def test_the_shipped_bundle_keeps_only_the_customer_id_of_a_contact_change(
    tmp_path: Path, llm: MockLLM
) -> None:
    # The new value under another name than the one data.json types: beside it, or
    # instead of it. Neither name is one a list of personal names would have had.
    calls = [
        Call(
            "update_email",
            {
                "customer_id": "C-1",
                "email": "ann.new@example.com",
                "new_email": "ann.alt@example.com",
            },
        ),
        Call("update_email", {"customer_id": "C-1", "Email": "ann.caps@example.com"}),
        Call(
            "update_phone", {"customer_id": "C-1", "phone": "+1 555 0100", "mobile": "+1 555 0199"}
        ),
    ]
    async with (
        Warden(make_config(tmp_path, llm.url)) as warden,
        openai.AsyncOpenAI(
            base_url=f"{warden.proxy_url}/openai/v1", api_key="sk-test", max_retries=0
        ) as agent,
    ):
        for call in calls:
            llm.script(Reply(tool_calls=[call]))
            await agent.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    audit = tmp_path / "audit"
    records = tool_decisions(audit)
    assert [(r["action"]["tool"], r["decision"]["effect"]) for r in records] == [
        ("update_email", "require_approval"),
        ("update_email", "deny"),
        ("update_phone", "require_approval"),
    ]
    for record in records:
        # A name data.json does not type hides every argument: its path would spell it.
        assert record["decision"]["obligations"]["redact"] == [
            "action.arguments",
            "action.input_responses",
        ]
        assert record["action"]["arguments"] == "[redacted]"
        assert record["action"]["arguments_sha256"] is not None
    for value in ("ann.new@", "ann.alt@", "ann.caps@", "555 0100", "555 0199"):
        assert files_containing(audit, value) == [], value


async def test_an_mcp_retry_answering_with_the_new_email_is_recorded_masked(
    tmp_path: Path,
) -> None:
    # 2026-07-28: the client retries update_email with its answers (inputResponses).
    # The shipped bundle lets an answer carry only "confirm": this one carries the new
    # email, so the retry is denied, and its record must not show the email either.
    received: list[dict[str, Any]] = []

    async def mcp_endpoint(request: web.Request) -> web.StreamResponse:
        if request.method in ("GET", "DELETE"):
            return web.Response(status=405 if request.method == "GET" else 200)
        body = await request.json()
        received.append(body)
        if body.get("method") == "initialize":
            result = {
                "protocolVersion": body["params"]["protocolVersion"],
                "capabilities": {"tools": {}},
                "serverInfo": {"name": "crm", "version": "1"},
            }
            answer = {"jsonrpc": "2.0", "id": body["id"], "result": result}
            return web.json_response(answer, headers={"Mcp-Session-Id": "s-1"})
        if "id" not in body:
            return web.Response(status=202)
        done = {"resultType": "complete", "content": [{"type": "text", "text": "updated"}]}
        return web.json_response({"jsonrpc": "2.0", "id": body["id"], "result": done})

    app = web.Application()
    app.router.add_route("*", "/mcp", mcp_endpoint)
    accept = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
    async with serving(app) as port:
        upstream = {"protocol": "mcp", "base_url": f"http://127.0.0.1:{port}/mcp"}
        config = make_config(tmp_path, "http://127.0.0.1:9", upstreams={"crm": upstream})
        async with Warden(config) as warden, aiohttp.ClientSession() as http:
            target = f"{warden.proxy_url}/crm"
            init = {
                "jsonrpc": "2.0",
                "id": 0,
                "method": "initialize",
                "params": {
                    "protocolVersion": "2026-07-28",
                    "capabilities": {},
                    "clientInfo": {"name": "raw", "version": "1"},
                },
            }
            async with http.post(target, json=init, headers=accept) as resp:
                headers = {**accept, "Mcp-Session-Id": resp.headers["Mcp-Session-Id"]}
            answers = {
                "new_email": {"action": "accept", "content": {"email": "ann.typed@example.com"}}
            }
            params = {
                "name": "update_email",
                "arguments": {"customer_id": "C-1", "email": "ann.arg@example.com"},
                "inputResponses": answers,
                "requestState": "st",
            }
            retry = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": params}
            async with http.post(target, json=retry, headers=headers) as resp:
                await resp.read()
    assert [m.get("method") for m in received if "id" in m] == ["initialize"]  # never ran
    audit = tmp_path / "audit"
    (record,) = tool_decisions(audit)
    assert record["decision"]["effect"] == "deny"
    assert "carry email" in record["decision"]["reasons"][0]
    assert record["decision"]["obligations"]["redact"] == [
        "action.arguments.email",
        "action.input_responses",
    ]
    assert record["action"]["input_responses"] == "[redacted]"
    assert record["action"]["arguments"] == {"customer_id": "C-1", "email": "[redacted]"}
    for value in ("ann.typed@", "ann.arg@"):
        assert files_containing(audit, value) == [], value


FETCHED = (
    "https://svc:Hunter2Secret@internal.example.com/export"
    "?api_key=sk-live-ABCDEF123456&page=2&access_token=ya29.XYZ#id_token=eyJ.idtok.sig"
)
COMMAND = "curl -s 'https://bot:CurlPass77@files.example.com/a.csv?x_api_key=xk-998877' | head"
SECRETS = ("Hunter2Secret", "sk-live-ABCDEF123456", "ya29.XYZ", "eyJ.idtok.sig", "CurlPass77")
# The policy allows the call only if it sees the URL and the command as the agent sent them.
SEES_THE_REAL_URL = f"""package warden

import rego.v1

default decision := {{"effect": "deny", "reason": "the policy did not see the URL as sent"}}

decision := {{"effect": "allow", "reason": "model call"}} if input.action.kind == "llm_call"

decision := {{"effect": "allow", "reason": "the URL as sent"}} if {{
    input.action.tool == "fetch_url"
    input.action.arguments.url == {json.dumps(FETCHED)}
    input.action.arguments.command == {json.dumps(COMMAND)}
    input.context.source == "https://kb.example.com/a?session_token=ctx-tok-4455"
}}
"""


async def test_credentials_in_argument_urls_are_masked_in_the_record_only(
    tmp_path: Path, llm: MockLLM
) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "policy.rego").write_text(SEES_THE_REAL_URL)
    config = make_config(tmp_path, llm.url, policy={"bundles": [str(bundle)]})
    arguments = {"url": FETCHED, "command": COMMAND, "note": "see https://example.com/help"}
    llm.script(Reply(tool_calls=[Call("fetch_url", arguments)]))
    async with (
        Warden(config) as warden,
        openai.AsyncOpenAI(
            base_url=f"{warden.proxy_url}/openai/v1",
            api_key="sk-test",
            max_retries=0,
            default_headers={
                "X-Warden-Context-Source": "https://kb.example.com/a?session_token=ctx-tok-4455"
            },
        ) as agent,
    ):
        answer = await agent.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    # The policy decided on the real values, and the agent got them whole.
    (got,) = answer.choices[0].message.tool_calls or []
    assert got.type == "function"
    assert json.loads(got.function.arguments) == arguments
    audit = tmp_path / "audit"
    (record,) = tool_decisions(audit)
    assert record["decision"]["effect"] == "allow", record["decision"]["reasons"]
    action = record["action"]
    assert action["arguments"] == {
        "url": "https://svc:[redacted]@internal.example.com/export"
        "?api_key=[redacted]&page=2&access_token=[redacted]#id_token=[redacted]",
        "command": "curl -s 'https://bot:[redacted]@files.example.com/a.csv?x_api_key=[redacted]'"
        " | head",
        "note": "see https://example.com/help",
    }
    assert action["context"]["source"] == "https://kb.example.com/a?session_token=[redacted]"
    # Listed for approvers and replay, and the record still binds what was sent.
    assert sorted(action["redacted"]) == ["/command", "/url"]
    assert action["arguments_sha256"] is not None
    for secret in (*SECRETS, "xk-998877", "ctx-tok-4455"):
        assert files_containing(audit, secret) == [], secret

    # Replayed with the same bundle, the masked URL is what the policy sees: the
    # decision changes, and replay says it could not rebuild it exactly (the model
    # call's decision too: its context holds the masked URL).
    report = replay(audit, load_policy_set([bundle]), config.policy)
    assert report.errors == 0
    assert report.inexact == 2
    assert [(c.label, c.count, c.inexact) for c in report.changes] == [("allow→deny", 1, 1)]


# Credentials no password rule finds: a token as the user name, Azure SAS and Functions
# keys, a Google API key, an AWS presigned signature, and a URL used as an argument's name.
URL_ARGUMENTS = {
    "repo": "https://ghp_TokAsUser123@github.com/org/repo.git",
    "blob": "https://acct.blob.core.windows.net/c/b?sv=2022-11-02&sp=rw&sig=SasSig%2B456",
    "hook": "https://fn.azurewebsites.net/api/x?code=AzFnKey789&name=a",
    "maps": "https://maps.googleapis.com/maps/api/geocode/json?address=Lyon&key=AIzaGoog012",
    "s3": "https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIAAWS345%2F20260101&X-Amz-Signature=AwsSig678",
    "https://svc:KeyPass901@api.example.com/": "a URL as an argument's name",
}
URL_SECRETS = (
    "TokAsUser123",
    "SasSig",
    "AzFnKey789",
    "AIzaGoog012",
    "AKIAAWS345",
    "AwsSig678",
    "KeyPass901",
)


async def test_tokens_signatures_and_url_keys_are_masked_in_the_record(
    tmp_path: Path, llm: MockLLM
) -> None:
    llm.script(Reply(tool_calls=[Call("fetch_url", URL_ARGUMENTS)]))
    async with (
        Warden(make_config(tmp_path, llm.url)) as warden,
        openai.AsyncOpenAI(
            base_url=f"{warden.proxy_url}/openai/v1", api_key="sk-test", max_retries=0
        ) as agent,
    ):
        answer = await agent.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    (got,) = answer.choices[0].message.tool_calls or []
    assert got.type == "function"
    assert json.loads(got.function.arguments) == URL_ARGUMENTS  # the agent gets them whole
    audit = tmp_path / "audit"
    (record,) = tool_decisions(audit)
    assert record["decision"]["effect"] == "allow"  # fetch_url is read-only
    action = record["action"]
    assert action["arguments"] == {
        "repo": "https://[redacted]@github.com/org/repo.git",
        "blob": "https://acct.blob.core.windows.net/c/b?sv=2022-11-02&sp=rw&sig=[redacted]",
        "hook": "https://fn.azurewebsites.net/api/x?code=[redacted]&name=a",
        "maps": "https://maps.googleapis.com/maps/api/geocode/json?address=Lyon&key=[redacted]",
        "s3": "https://b.s3.amazonaws.com/k?X-Amz-Credential=[redacted]&X-Amz-Signature=[redacted]",
        "https://svc:[redacted]@api.example.com/": "a URL as an argument's name",
    }
    assert sorted(action["redacted"]) == [
        "/blob",
        "/hook",
        "/https:~1~1svc:[redacted]@api.example.com~1",
        "/maps",
        "/repo",
        "/s3",
    ]
    for secret in URL_SECRETS:
        assert files_containing(audit, secret) == [], secret


async def write_phone_changes(audit: Path) -> dict[str, int]:
    """40 phone changes of customers, each sealed for its customer; their phone numbers."""
    log = await AuditLog.open(AuditConfig(dir=str(audit), fsync="never"))
    phones = {}
    try:
        # C-ann's phone among other customers' (numbers as close as phone numbers are),
        # with amounts far apart, which round edges bin exactly as their values would.
        for i in range(40):
            customer = "C-ann" if i % 4 == 0 else f"C-{i}"
            phone = 4915100000006 if customer == "C-ann" else 4915100000000 + i
            phones[customer] = phone
            args = {"customer_id": customer, "phone": phone, "amount": 10.0 * (1 + i % 5) + 0.37}
            action = sample_action(i, tool="update_phone", customer=customer, arguments=args)
            await log.record_decision(action, sample_decision())
    finally:
        await log.close()
    return phones


def test_a_pinned_baseline_keeps_no_exact_number_of_an_erased_customer(tmp_path: Path) -> None:
    audit, pinned = tmp_path / "audit", tmp_path / "baseline.json"
    phones = asyncio.run(write_phone_changes(audit))
    # Sealed in the log: the phone numbers are not readable there.
    assert files_containing(audit, "4915100000006") == []
    assert warden_main(["monitor", "baseline", "--audit", str(audit), "--since", "1d",
                        "--out", str(pinned)]) == 0  # fmt: skip
    assert warden_main(["audit", "erase", "--dir", str(audit), "--subject", "C-ann"]) == 0

    text = pinned.read_text()
    profiles = json.loads(text)["profiles"]
    assert len(profiles) == 2  # the agent's version, and the agent over all versions
    for profile in profiles:
        numbers = profile["numbers"]
        for customer, phone in phones.items():
            assert str(phone) not in text, customer
            assert float(phone) not in numbers["update_phone.phone"]["edges"], customer
        assert sum(numbers["update_phone.phone"]["counts"]) == 40  # still counted
        # The amounts 10.37 ... 50.37 are cut between them, at round figures, in five bins.
        amounts = numbers["update_phone.amount"]
        assert amounts["edges"] == [20.0, 30.0, 40.0, 50.0]
        assert amounts["counts"] == [8, 8, 8, 8, 8]
