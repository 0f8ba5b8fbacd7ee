"""Transparent mode with real clients through the real proxy (mitmproxy) to mock upstreams.

The agents keep their SDKs' default base URLs (``https://api.openai.com``,
``https://api.anthropic.com``); the transparent listener's hosts map sends
those names to the mock LLM on loopback, through Warden's base-URL listener.
Each answer is compared with what the same scripted reply gives in base-URL
mode, in the same test.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from tests.functional.conftest import ROOT, audit_records, make_config
from tests.sdk_calls import function_calls
from warden.config import Config
from warden.ingress.door_mark import VIA_HEADER
from warden.ingress.transparent_ca import ca_certificate_pem
from warden.killswitch import Scope
from warden.server import Warden
from warden.testing import Call, Fault, MockLLM, Reply
from warden.testing.mock_tools import MockTools

HOSTS = {"api.openai.com": "openai", "api.anthropic.com": "anthropic"}
KB = Call("search_kb", {"query": "reset password"})
EXPORT = Call("export_customers", {"format": "csv"})
REFUND_ARGS = {"order_id": "A-1001", "amount": 25, "currency": "USD"}
REFUND = Call("issue_refund", REFUND_ARGS)
MESSAGES: Any = [{"role": "user", "content": "help"}]
API_KEY = "sk-test-secret-123"


def transparent_config(tmp_path: Path, upstream_url: str, **overrides: Any) -> Config:
    """make_config plus a transparent listener on a free port, its CA under tmp_path."""
    section = {
        "listen": "127.0.0.1:0",
        "hosts": HOSTS,
        "ca_dir": str(tmp_path / "ca"),
        **overrides.pop("transparent", {}),
    }
    return make_config(tmp_path, upstream_url, transparent=section, **overrides)


def export_ca(warden: Warden, directory: Path) -> Path:
    """The CA certificate as ``warden ca export`` prints it, in a file."""
    assert warden.config.transparent is not None
    path = directory / "warden-ca.pem"
    path.write_bytes(ca_certificate_pem(warden.config.transparent))
    return path


@pytest.fixture
async def tw(tmp_path: Path, llm: MockLLM) -> AsyncIterator[Warden]:
    async with Warden(transparent_config(tmp_path, llm.url)) as running:
        yield running


@pytest.fixture
def ca(tw: Warden, tmp_path: Path) -> Path:
    return export_ca(tw, tmp_path)


def proxied_http(tw: Warden, ca: Path, **kw: Any) -> openai.DefaultAsyncHttpxClient:
    """The SDKs' own httpx client, through the transparent proxy, trusting Warden's CA."""
    return openai.DefaultAsyncHttpxClient(
        proxy=f"http://{tw.transparent_address}",
        verify=ssl.create_default_context(cafile=str(ca)),
        **kw,
    )


def oai_transparent(tw: Warden, ca: Path) -> openai.AsyncOpenAI:
    # No base_url: the SDK's default, https://api.openai.com/v1.
    return openai.AsyncOpenAI(api_key=API_KEY, max_retries=0, http_client=proxied_http(tw, ca))


def oai_base_url(tw: Warden) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{tw.proxy_url}/openai/v1", api_key=API_KEY, max_retries=0)


def ant_transparent(tw: Warden, ca: Path) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(
        api_key=API_KEY,
        max_retries=0,
        http_client=anthropic.DefaultAsyncHttpxClient(
            proxy=f"http://{tw.transparent_address}",
            verify=ssl.create_default_context(cafile=str(ca)),
        ),
    )


def ant_base_url(tw: Warden) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(
        base_url=f"{tw.proxy_url}/anthropic", api_key=API_KEY, max_retries=0
    )


_VARIABLE = [
    (re.compile(r"dec_[0-9a-f]+_[0-9a-f]+"), "dec_ID"),
    (re.compile(r"mock[0-9A-Za-z]+"), "mockID"),
    (re.compile(r'"created(_at)?": ?[0-9.]+'), '"created": 0'),
]


def same_shape(value: Any) -> str:
    """A JSON rendering with ids and times that differ between two requests made equal."""
    text = json.dumps(value, sort_keys=True, default=str)
    for pattern, replacement in _VARIABLE:
        text = pattern.sub(replacement, text)
    return text


async def openai_stream(client: openai.AsyncOpenAI) -> dict[str, Any]:
    stream = await client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    text, finish = "", None
    calls: dict[int, dict[str, str]] = {}
    async for chunk in stream:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            for tc in choice.delta.tool_calls or []:
                entry = calls.setdefault(tc.index, {"name": "", "arguments": ""})
                entry["name"] += (tc.function.name if tc.function else None) or ""
                entry["arguments"] += (tc.function.arguments if tc.function else None) or ""
            finish = choice.finish_reason or finish
    return {"text": text, "finish": finish, "calls": calls}


async def test_openai_chat_behaves_as_in_base_url_mode(tw: Warden, ca: Path, llm: MockLLM) -> None:
    async with oai_transparent(tw, ca) as through, oai_base_url(tw) as direct:
        answers = []
        for client in (through, direct):
            llm.script(Reply(text="Let me help.", tool_calls=[KB, EXPORT]))
            raw = await client.chat.completions.with_raw_response.create(
                model="gpt-4o-mini", messages=MESSAGES
            )
            answers.append((raw.parse(), raw.headers))
        (completion, headers), (reference, _) = answers
        message = completion.choices[0].message
        assert [c.function.name for c in function_calls(message)] == ["search_kb"]
        assert "blocked the tool call `export_customers`" in (message.content or "")
        assert headers["x-warden-decision-id"].startswith("dec_")
        assert headers["x-warden-blocked"] in (message.content or "")
        assert same_shape(completion.model_dump()) == same_shape(reference.model_dump())

        streamed = []
        for client in (through, direct):
            llm.script(Reply(text="Checking your order now.", tool_calls=[REFUND, EXPORT]))
            streamed.append(await openai_stream(client))
        assert streamed[0]["text"].startswith("Checking your order now.")
        assert "blocked the tool call `export_customers`" in streamed[0]["text"]
        assert [c["name"] for c in streamed[0]["calls"].values()] == ["issue_refund"]
        assert same_shape(streamed[0]) == same_shape(streamed[1])
    # The agent's key reached the upstream; Warden's hand-over mark did not.
    sent = llm.requests[0].headers
    assert sent["Authorization"] == f"Bearer {API_KEY}"
    assert VIA_HEADER not in sent


async def test_anthropic_messages_behave_as_in_base_url_mode(
    tw: Warden, ca: Path, llm: MockLLM
) -> None:
    async with ant_transparent(tw, ca) as through, ant_base_url(tw) as direct:
        answers = []
        for client in (through, direct):
            llm.script(Reply(text="Let me help.", tool_calls=[KB, EXPORT]))
            answers.append(
                await client.messages.create(
                    model="claude-sonnet-4-6", max_tokens=100, messages=MESSAGES
                )
            )
        names = [b.name for b in answers[0].content if b.type == "tool_use"]
        assert names == ["search_kb"]
        assert same_shape(answers[0].model_dump()) == same_shape(answers[1].model_dump())

        finals = []
        for client in (through, direct):
            llm.script(Reply(text="On it.", tool_calls=[REFUND, EXPORT]))
            async with client.messages.stream(
                model="claude-sonnet-4-6", max_tokens=100, messages=MESSAGES
            ) as stream:
                finals.append(await stream.get_final_message())
        text = "".join(b.text for b in finals[0].content if b.type == "text")
        assert "blocked the tool call `export_customers`" in text
        assert [b.name for b in finals[0].content if b.type == "tool_use"] == ["issue_refund"]
        assert same_shape(finals[0].model_dump()) == same_shape(finals[1].model_dump())


async def test_provider_error_shapes_come_back_unchanged(
    tw: Warden, ca: Path, llm: MockLLM
) -> None:
    async with oai_transparent(tw, ca) as through, ant_transparent(tw, ca) as ant:
        with pytest.raises(openai.NotFoundError) as missing:
            await through.post("/nope", cast_to=object, body={})
        assert missing.value.code == "route_not_governed"
        llm.script(Reply(fault=Fault("status", status=429)))
        with pytest.raises(openai.RateLimitError):
            await through.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        with pytest.raises(anthropic.BadRequestError) as bad:
            await ant.post("/v1/messages", cast_to=object, body=[1])  # not a JSON object
        assert bad.value.body == {
            "type": "error",
            "error": {
                "type": "invalid_request_error",
                "message": "request body must be a JSON object",
            },
        }


async def test_text_flows_before_the_stream_ends(tw: Warden, ca: Path, llm: MockLLM) -> None:
    # The upstream sends its first events and stalls: if mitmproxy or Warden held
    # the stream back, the agent would see nothing and this would time out.
    llm.script(Reply(text="one two three four five six", fault=Fault("hang", after=3)))
    async with oai_transparent(tw, ca) as client:
        stream = await client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True
        )
        received = ""
        async with asyncio.timeout(10):
            async for chunk in stream:
                received += chunk.choices[0].delta.content or "" if chunk.choices else ""
                if received:
                    break
        assert received
        await stream.close()


async def test_a_kill_switch_cuts_a_transparent_stream(tw: Warden, ca: Path, llm: MockLLM) -> None:
    switches = tw.killswitches
    assert switches is not None
    llm.script(Reply(text="one two three four five six", fault=Fault("hang", after=3)))
    async with oai_transparent(tw, ca) as client:
        stream = await client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True
        )

        async def read_and_kill() -> None:
            async with asyncio.timeout(20):
                async for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        await switches.set(Scope.AGENT, "support-triage", "incident 42", "oncall")

        with pytest.raises(openai.APIError) as cut:
            await read_and_kill()
        assert "incident 42" in str(cut.value)


async def test_records_name_the_transparent_door_and_keep_no_secret(
    tmp_path: Path, tw: Warden, ca: Path, llm: MockLLM
) -> None:
    async with oai_transparent(tw, ca) as through, oai_base_url(tw) as direct:
        llm.script(Reply(tool_calls=[KB]))
        await through.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        # An agent calling the base-URL listener cannot claim the transparent door.
        llm.script(Reply(tool_calls=[KB]))
        await direct.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, extra_headers={VIA_HEADER: "transparent x"}
        )
    await tw.stop()
    decisions = [r for r in audit_records(tmp_path / "audit") if r.get("kind") == "decision"]
    doors = [(r["action"]["kind"], r["action"]["request"].get("door")) for r in decisions]
    assert doors == [
        ("llm_call", "transparent"),
        ("tool_call", "transparent"),
        ("llm_call", None),
        ("tool_call", None),
    ]
    assert decisions[0]["action"]["request"]["upstream"] == "openai"
    assert decisions[0]["action"]["request"]["path"] == "/v1/chat/completions"
    dump = json.dumps(audit_records(tmp_path / "audit"))
    assert API_KEY not in dump
    assert VIA_HEADER.lower() not in dump.lower()


async def test_http2_from_the_agent(tw: Warden, ca: Path, llm: MockLLM) -> None:
    llm.script(Reply(text="over h2", tool_calls=[KB, EXPORT]))
    async with proxied_http(tw, ca, http2=True) as http:
        response = await http.post(
            "https://api.openai.com/v1/chat/completions",
            json={"model": "gpt-4o-mini", "messages": MESSAGES},
            headers={"Authorization": f"Bearer {API_KEY}"},
        )
        assert response.http_version == "HTTP/2"
        assert response.status_code == 200
        content = response.json()["choices"][0]["message"]["content"]
        assert "blocked the tool call `export_customers`" in content

        llm.script(Reply(text="streamed over h2", tool_calls=[EXPORT]))
        body = {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True}
        async with http.stream(
            "POST", "https://api.openai.com/v1/chat/completions", json=body
        ) as streamed:
            assert streamed.http_version == "HTTP/2"
            events = [line async for line in streamed.aiter_lines() if line.startswith("data:")]
    assert events[-1] == "data: [DONE]"
    assert any("blocked the tool call" in e for e in events)


async def test_an_http2_body_without_a_length_is_one_request(
    tmp_path: Path, tw: Warden, ca: Path, llm: MockLLM
) -> None:
    """HTTP/2 frames a body itself; a streamed one carries no content-length. Handed to
    the listener over HTTP/1.1 it is framed there too: read as this request's body, never
    as a request of its own (to another upstream, unmarked as transparent)."""
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    whole = json.dumps({"model": "gpt-4o-mini", "messages": MESSAGES}).encode()
    inner = json.dumps({"model": "claude", "max_tokens": 5, "messages": MESSAGES}).encode()
    smuggled = (
        b"POST /anthropic/v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
        b"\r\nContent-Length: %d\r\n\r\n%s" % (len(inner), inner)
    )

    async def pieces(body: bytes) -> AsyncIterator[bytes]:
        yield body[:7]
        yield body[7:]

    url = "https://api.openai.com/v1/chat/completions"
    llm.script(Reply(text="one request"))
    async with proxied_http(tw, ca, http2=True) as http:
        response = await http.post(url, content=pieces(whole), headers=headers)
        assert response.http_version == "HTTP/2"
        assert response.status_code == 200
        assert response.json()["choices"][0]["message"]["content"] == "one request"
        refused = await http.post(url, content=pieces(smuggled), headers=headers)
        assert refused.status_code == 400
        assert refused.json()["error"]["code"] == "invalid_json"
    await asyncio.sleep(0.2)  # what the listener might still read, it reads now
    assert [r.path for r in llm.requests] == ["/v1/chat/completions"]
    await tw.stop()
    decisions = [r for r in audit_records(tmp_path / "audit") if r.get("kind") == "decision"]
    assert [
        (r["action"]["request"]["upstream"], r["action"]["request"].get("door")) for r in decisions
    ] == [("openai", "transparent")]


_SUBPROCESS_AGENT = """
import json, anthropic, openai
oai = openai.OpenAI(api_key="sk-sub-1", max_retries=0)
done = oai.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
stream = oai.chat.completions.create(
    model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}], stream=True)
text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
ant = anthropic.Anthropic(api_key="sk-sub-2", max_retries=0)
msg = ant.messages.create(
    model="claude-sonnet-4-6", max_tokens=50, messages=[{"role": "user", "content": "x"}])
tools = [b.name for b in msg.content if b.type == "tool_use"]
print(json.dumps({"openai": done.choices[0].message.content, "stream": text, "anthropic": tools}))
"""


async def test_https_proxy_and_ssl_cert_file_in_a_subprocess(
    tw: Warden, ca: Path, llm: MockLLM
) -> None:
    llm.script(
        Reply(text="first", tool_calls=[EXPORT]),
        Reply(text="second streamed"),
        Reply(tool_calls=[KB, EXPORT]),
    )
    # Only what the agent's environment would say: the proxy and the CA to trust.
    drop = {"no_proxy", "all_proxy", "http_proxy", "openai_base_url", "anthropic_base_url"}
    env = {k: v for k, v in os.environ.items() if k.lower() not in drop}
    env |= {"HTTPS_PROXY": f"http://{tw.transparent_address}", "SSL_CERT_FILE": str(ca)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _SUBPROCESS_AGENT,
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 90)
    assert proc.returncode == 0, err.decode()
    result = json.loads(out)
    assert "blocked the tool call `export_customers`" in result["openai"]
    assert result["stream"] == "second streamed"
    assert result["anthropic"] == ["search_kb"]
    # Each SDK's own key went to the upstream, through the proxy, unchanged.
    keys = [r.headers["Authorization"] for r in llm.requests]
    assert keys == ["Bearer sk-sub-1", "Bearer sk-sub-1", "Bearer sk-sub-2"]


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_curl_against_a_governed_http_tool_api(tmp_path: Path, llm: MockLLM) -> None:
    routes = [
        {
            "method": "POST",
            "path": "/tools/issue_refund",
            "tool": "issue_refund",
            "arguments": {"order_id": "/order_id", "amount": "/amount", "currency": "/currency"},
        },
        {
            "method": "POST",
            "path": "/tools/export_customers",
            "tool": "export_customers",
            "arguments": {"format": "/format"},
        },
    ]
    async with MockTools() as tools:
        upstreams = {
            "openai": {"protocol": "openai", "base_url": llm.url},
            "refunds": {"protocol": "http", "base_url": tools.url, "routes": routes},
        }
        cfg = transparent_config(
            tmp_path,
            llm.url,
            upstreams=upstreams,
            transparent={"hosts": {"refunds.internal": "refunds"}},
        )
        async with Warden(cfg) as warden:
            ca = export_ca(warden, tmp_path)

            async def curl(tool: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
                proc = await asyncio.create_subprocess_exec(
                    "curl", "-sS", "--proxy", f"http://{warden.transparent_address}",
                    "--cacert", str(ca), "-H", "Content-Type: application/json",
                    "-d", json.dumps(body), "-w", "\n%{http_code}",
                    f"https://refunds.internal/tools/{tool}",
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                )  # fmt: skip
                out, err = await asyncio.wait_for(proc.communicate(), 30)
                assert proc.returncode == 0, err.decode()
                text, _, status = out.decode().rpartition("\n")
                return int(status), json.loads(text)

            status, refund = await curl("issue_refund", REFUND_ARGS)
            assert status == 200, refund
            status, problem = await curl("export_customers", {"format": "csv"})
            assert status == 403
            assert problem["code"] == "denied"
            assert problem["decision_id"].startswith("dec_")
        assert [c.name for c in tools.calls] == ["issue_refund"]
    decisions = [r for r in audit_records(tmp_path / "audit") if r.get("kind") == "decision"]
    assert [(r["action"]["tool"], r["action"]["request"]["door"]) for r in decisions] == [
        ("issue_refund", "transparent"),
        ("export_customers", "transparent"),
    ]


async def test_a_request_while_warden_stops_is_refused_in_the_providers_shape(
    tmp_path: Path, llm: MockLLM
) -> None:
    # The doors stop together: a request on an agent's open connection could be handed to
    # a base-URL listener already closed, and the agent got mitmproxy's HTML 502.
    words = " ".join(["word"] * 40)
    llm.on_request(
        lambda _p, body: (
            Reply(text=words, fault=Fault("slow_stream", seconds=0.25))
            if body["messages"][-1]["content"] == "slow"
            else Reply(text="ok")
        )
    )
    warden = Warden(transparent_config(tmp_path, llm.url, shutdown_grace_s=4))
    await warden.start()
    ca = export_ca(warden, tmp_path)
    slow_client, client = oai_transparent(warden, ca), oai_transparent(warden, ca)
    async with slow_client, client:
        assert (await client.chat.completions.create(model="m", messages=MESSAGES)).choices
        slow = await slow_client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "slow"}], stream=True
        )
        await anext(aiter(slow))  # a stream in flight keeps Warden stopping for a while
        stopping = asyncio.create_task(warden.stop())
        await asyncio.sleep(0.5)
        with pytest.raises(openai.InternalServerError) as refused:
            await client.chat.completions.create(model="m", messages=MESSAGES)
        await stopping
        await slow.close()
    assert refused.value.status_code == 503
    assert refused.value.code == "shutting_down"
    assert refused.value.response.headers["retry-after"] == "1"
