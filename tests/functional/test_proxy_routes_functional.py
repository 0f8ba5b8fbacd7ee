"""Routes and responses an SDK reads tool calls from: decided, or blocked (issue 9, class 1).

The upstream here is a small loopback server answering crafted bytes, as a
misbehaving OpenAI-compatible server would; the agent is the official SDK.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
from aiohttp import web
from prometheus_client import REGISTRY
from yarl import URL

from tests.functional.conftest import audit_records, make_config
from warden.server import Warden
from warden.testing import Call, MockLLM, Reply
from warden.testing._server import LoopbackServer

MESSAGES: Any = [{"role": "user", "content": "help"}]
EXPORT = ("export_customers", {"format": "csv"})
KB = ("search_kb", {"query": "reset password"})
REFUND_BIG = ("issue_refund", {"order_id": "A-1003", "amount": 450, "currency": "USD"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Crafted(LoopbackServer):
    """An upstream that answers whatever the test says, and records what reached it."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, str]] = []
        self.handler: Handler = _not_found

    def _routes(self, app: web.Application) -> None:
        app.router.add_route("*", "/{tail:.*}", self._any)

    async def _any(self, request: web.Request) -> web.StreamResponse:
        self.seen.append((request.method, request.raw_path))
        await request.read()
        return await self.handler(request)


async def _not_found(request: web.Request) -> web.StreamResponse:
    return web.json_response({"error": {"message": "no such route"}}, status=404)


def completion(*calls: tuple[str, dict[str, Any]]) -> dict[str, Any]:
    """A ChatCompletion proposing ``calls``."""
    tool_calls = [
        {
            "id": f"call_{i}",
            "type": "function",
            "function": {"name": name, "arguments": json.dumps(args)},
        }
        for i, (name, args) in enumerate(calls)
    ]
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "gpt-4o-mini",
        "choices": [
            {
                "index": 0,
                "finish_reason": "tool_calls",
                "message": {"role": "assistant", "content": None, "tool_calls": tool_calls},
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10},
    }


def chunks(name: str, args: dict[str, Any]) -> list[bytes]:
    """A chat completion stream: some text, then one tool call in two deltas."""
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        body = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return b"data: " + json.dumps(body).encode() + b"\n\n"

    start = {"index": 0, "id": "call_0", "type": "function"}
    return [
        chunk({"role": "assistant", "content": "Checking."}),
        chunk({"tool_calls": [{**start, "function": {"name": name, "arguments": ""}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": json.dumps(args)}}]}),
        chunk({}, "tool_calls"),
        b"data: [DONE]\n\n",
    ]


def call_names(message: Any) -> list[str]:
    """Names of the tool calls in a parsed chat message, function or custom."""
    return [
        t.function.name if t.type == "function" else t.custom.name for t in message.tool_calls or []
    ]


def answer(body: Any, status: int = 200, content_type: str = "application/json") -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        return web.Response(status=status, body=raw, headers={"Content-Type": content_type})

    return handler


def stream(
    events: list[bytes], status: int = 200, content_type: str = "text/event-stream"
) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=status, headers={"Content-Type": content_type})
        await response.prepare(request)
        for event in events:
            await response.write(event)
        await response.write_eof()
        return response

    return handler


@pytest.fixture
async def upstream() -> AsyncIterator[Crafted]:
    async with Crafted() as server:
        yield server


async def start(tmp_path: Path, upstream: Crafted, **overrides: Any) -> Warden:
    warden = Warden(make_config(tmp_path, upstream.url, **overrides))
    await warden.start()
    return warden


@pytest.fixture
async def warden(tmp_path: Path, upstream: Crafted) -> AsyncIterator[Warden]:
    async with Warden(make_config(tmp_path, upstream.url)) as running:
        yield running


def oai(warden: Warden) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"{warden.proxy_url}/openai/v1", api_key="sk-test", max_retries=0, timeout=20
    )


def counter(name: str, upstream: str = "openai") -> float:
    """A Warden counter's value now (the proxy runs in this process)."""
    return REGISTRY.get_sample_value(name, {"upstream": upstream}) or 0.0


def decisions(tmp_path: Path) -> list[dict[str, Any]]:
    return [r for r in audit_records(tmp_path / "audit") if r["kind"] == "decision"]


def tool_decisions(tmp_path: Path) -> dict[str, str]:
    return {
        r["action"]["tool"]: r["decision"]["enforced"]
        for r in decisions(tmp_path)
        if r["action"]["tool"] is not None
    }


# -- any 2xx an SDK parses goes through the adapter -----------------------------


@pytest.mark.parametrize(
    ("status", "content_type"),
    [(200, "application/json"), (201, "application/json"), (203, "text/plain")],
)
async def test_any_2xx_json_body_is_decided(
    warden: Warden, upstream: Crafted, tmp_path: Path, status: int, content_type: str
) -> None:
    upstream.handler = answer(completion(KB, EXPORT), status, content_type)
    async with oai(warden) as c:
        raw = await c.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=MESSAGES
        )
    message = raw.parse().choices[0].message
    assert call_names(message) == ["search_kb"]
    assert "blocked the tool call `export_customers`" in (message.content or "")
    assert "csv" not in raw.http_response.text
    await warden.stop()
    assert tool_decisions(tmp_path) == {"search_kb": "allow", "export_customers": "deny"}


@pytest.mark.parametrize(
    ("status", "content_type"),
    [(203, "text/event-stream"), (200, "application/json"), (201, "text/plain")],
)
async def test_a_requested_stream_is_read_as_sse_whatever_its_content_type(
    warden: Warden, upstream: Crafted, tmp_path: Path, status: int, content_type: str
) -> None:
    upstream.handler = stream(chunks(*EXPORT), status, content_type)
    names: list[str] = []
    text = ""
    async with oai(warden) as c:
        events = await c.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True
        )
        async for chunk in events:
            for choice in chunk.choices:
                text += choice.delta.content or ""
                names += [
                    t.function.name or "" for t in choice.delta.tool_calls or [] if t.function
                ]
    assert "export_customers" not in [n for n in names if n]
    assert "blocked the tool call `export_customers`" in text
    await warden.stop()
    assert tool_decisions(tmp_path) == {"export_customers": "deny"}


@pytest.mark.parametrize("body", [b"not json at all", b"[1, 2]", b""])
async def test_a_2xx_that_is_not_a_json_object_is_a_502(
    warden: Warden, upstream: Crafted, body: bytes
) -> None:
    upstream.handler = answer(body, 200, "text/plain")
    async with oai(warden) as c:
        with pytest.raises(openai.InternalServerError) as caught:
            await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert caught.value.status_code == 502
    assert caught.value.code == "upstream_bad_response"


async def test_lenient_json_is_parsed_as_the_sdk_parses_it(
    warden: Warden, upstream: Crafted
) -> None:
    # Python-based servers write NaN; the SDK parses it, so Warden must too.
    body = json.dumps(completion(KB, EXPORT)).encode().replace(b'"created": 1', b'"created": NaN')
    upstream.handler = answer(body)
    async with oai(warden) as c:
        got = await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert call_names(got.choices[0].message) == ["search_kb"]


async def test_upstream_errors_pass_as_errors(warden: Warden, upstream: Crafted) -> None:
    upstream.handler = answer({"error": {"message": "slow down", "code": "rate"}}, 429)
    async with oai(warden) as c:
        with pytest.raises(openai.RateLimitError) as caught:
            await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert "slow down" in str(caught.value)


# -- redirects are never relayed -------------------------------------------------


@pytest.mark.parametrize("status", [301, 302, 307, 308])
async def test_a_redirect_becomes_a_502_and_its_target_is_never_contacted(
    warden: Warden, upstream: Crafted, status: int
) -> None:
    async with Crafted() as elsewhere:

        async def redirect(request: web.Request) -> web.StreamResponse:
            location = elsewhere.url + request.path
            return web.Response(status=status, headers={"Location": location})

        upstream.handler = redirect
        async with oai(warden) as c:
            with pytest.raises(openai.InternalServerError) as caught:
                await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
            assert caught.value.status_code == 502
            assert caught.value.code == "upstream_redirect"
            with pytest.raises(openai.InternalServerError):
                await c.models.list()
        assert elsewhere.seen == []


# -- stored completions and responses ----------------------------------------------


async def test_a_stored_completion_is_decided_like_a_fresh_one(
    warden: Warden, upstream: Crafted, tmp_path: Path
) -> None:
    upstream.handler = answer(completion(KB, EXPORT))
    async with oai(warden) as c:
        got = await c.chat.completions.retrieve("chatcmpl-1")
    assert call_names(got.choices[0].message) == ["search_kb"]
    assert upstream.seen == [("GET", "/v1/chat/completions/chatcmpl-1")]
    await warden.stop()
    assert tool_decisions(tmp_path) == {"search_kb": "allow", "export_customers": "deny"}
    paths = {r["action"]["request"]["path"] for r in decisions(tmp_path)}
    assert paths == {"/v1/chat/completions/chatcmpl-1"}


async def test_routes_that_carry_calls_warden_does_not_parse_are_refused(
    warden: Warden, upstream: Crafted
) -> None:
    upstream.handler = answer({"object": "list", "data": [completion(EXPORT)]})
    async with oai(warden) as c:
        with pytest.raises(openai.NotFoundError) as listed:
            await c.chat.completions.list()
        with pytest.raises(openai.NotFoundError) as messages:
            await c.chat.completions.messages.list("chatcmpl-1")
    for caught in (listed, messages):
        assert caught.value.code == "route_not_governed"
        assert "passthrough" not in str(caught.value)  # listing it would not help
    assert upstream.seen == []


async def test_an_id_spelled_like_a_governed_resource_does_not_route_there(
    warden: Warden, upstream: Crafted
) -> None:
    # The provider names the ids: a conversation or run called "responses" made its
    # items and required actions look like a Responses answer, passed on unread.
    call = {"type": "function_call", "id": "fc_1", "call_id": "call_1"}
    call |= {"name": "export_customers", "arguments": "{}", "status": "completed"}
    upstream.handler = answer({"object": "list", "data": [call], "has_more": False})
    async with oai(warden) as c:
        with pytest.raises(openai.NotFoundError) as items:
            await c.conversations.items.list("responses")
        with (
            pytest.warns(DeprecationWarning, match="Assistants API"),
            pytest.raises(openai.NotFoundError) as run,
        ):
            await c.beta.threads.runs.update("responses", thread_id="thread_1")
    for caught in (items, run):
        assert caught.value.code == "route_not_governed"
    assert upstream.seen == []


# -- the allowlist -----------------------------------------------------------------


async def test_an_unknown_route_is_refused_with_a_clear_error(
    warden: Warden, upstream: Crafted
) -> None:
    async with oai(warden) as c:
        with pytest.raises(openai.NotFoundError) as caught:
            await c.files.list()
    assert caught.value.code == "route_not_governed"
    assert "upstreams.openai.passthrough" in str(caught.value)
    assert '"GET v1/files"' in str(caught.value)
    client = anthropic.AsyncAnthropic(
        base_url=f"{warden.proxy_url}/anthropic", api_key="sk-ant-test", max_retries=0
    )
    async with client:
        with pytest.raises(anthropic.NotFoundError):
            await client.messages.batches.list()
    assert upstream.seen == []


async def test_a_listed_passthrough_route_is_forwarded(tmp_path: Path, upstream: Crafted) -> None:
    upstream.handler = answer({"object": "list", "data": [], "has_more": False})
    openai_upstream = {
        "protocol": "openai",
        "base_url": upstream.url,
        "timeout_s": 5,
        "passthrough": ["GET v1/files"],
    }
    async with (
        Warden(make_config(tmp_path, upstream.url, upstreams={"openai": openai_upstream})) as w,
        oai(w) as c,
    ):
        files = await c.files.list()
        assert files.data == []
        with pytest.raises(openai.NotFoundError):
            await c.files.retrieve("file-1")  # not listed
    assert upstream.seen == [("GET", "/v1/files")]
    kinds = [r["action"]["kind"] for r in decisions(tmp_path)]
    assert kinds == ["llm_call"]


# -- the request target is decoded exactly once -----------------------------------


async def raw_request(warden: Warden, method: str, target: str, body: bytes = b"") -> bytes:
    """Send a request target byte for byte: HTTP clients would normalise it."""
    address, port = warden.proxy_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(address, int(port))
    head = (
        f"{method} {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    writer.write(head.encode("latin-1") + body)
    await writer.drain()
    async with asyncio.timeout(10):
        got = await reader.read()
    writer.close()
    await writer.wait_closed()
    return got


async def test_an_encoded_route_reaches_its_adapter(
    warden: Warden, upstream: Crafted, tmp_path: Path
) -> None:
    upstream.handler = answer(completion(EXPORT))
    body = json.dumps({"model": "gpt-4o-mini", "messages": MESSAGES}).encode()
    got = await raw_request(warden, "POST", "/openai/v1/chat/complet%69ons", body)
    assert got.startswith(b"HTTP/1.1 200"), got[:200]
    assert b"blocked the tool call `export_customers`" in got
    assert b"csv" not in got
    assert upstream.seen == [("POST", "/v1/chat/completions")]
    await warden.stop()
    assert tool_decisions(tmp_path) == {"export_customers": "deny"}
    assert {r["action"]["request"]["path"] for r in decisions(tmp_path)} == {"/v1/chat/completions"}


@pytest.mark.parametrize(
    "target",
    [
        "/openai/v1/models/a%2Fb",
        "/openai/v1/models/a%2fb",
        "/openai/v1/models/a%5Cb",
        "/openai/v1/models/a%00b",
        "/openai/v1/models/a%0Ab",
        "/openai/v1/%2e%2E/models",
        "/openai/v1/models/%2E",
        "/openai/v1/models/a%zzb",
        "/openai/v1/models/%C3%28",
        "/openai%2Fv1/models",
    ],
)
async def test_encoded_slashes_dots_and_controls_are_refused_after_decoding(
    warden: Warden, upstream: Crafted, target: str
) -> None:
    got = await raw_request(warden, "GET", target)
    assert got.startswith(b"HTTP/1.1 4"), got[:200]
    assert upstream.seen == []


async def test_a_double_encoded_path_is_decoded_only_once(
    tmp_path: Path, upstream: Crafted
) -> None:
    upstream.handler = answer({"ok": True})
    tools = {"protocol": "http", "base_url": upstream.url, "timeout_s": 5}
    bundle = tmp_path / "allow-all"
    bundle.mkdir()
    (bundle / "policy.rego").write_text('package warden\n\ndecision := {"effect": "allow"}\n')
    policy = {"bundles": [str(bundle)]}
    config = make_config(tmp_path, upstream.url, upstreams={"tools": tools}, policy=policy)
    async with Warden(config) as w:
        # "%2569" is the literal text "%69" to Warden, so this is no chat route.
        got = await raw_request(w, "POST", "/openai/v1/chat/complet%2569ons", b"{}")
        assert got.startswith(b"HTTP/1.1 404"), got[:200]
        assert b"route_not_governed" in got
        assert upstream.seen == []
        # On a plain HTTP upstream the same literal reaches the upstream, re-encoded.
        got = await raw_request(w, "GET", "/tools/items/a%2569b")
        assert got.startswith(b"HTTP/1.1 200"), got[:200]
    assert upstream.seen == [("GET", "/items/a%2569b")]
    records = decisions(tmp_path)
    assert [r["action"]["request"]["path"] for r in records] == ["/items/a%69b"]


async def get(url: URL) -> int:
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        return resp.status


async def test_the_path_a_policy_sees_is_the_decoded_one(tmp_path: Path, upstream: Crafted) -> None:
    upstream.handler = answer({"object": "model", "id": "gpt-4o", "created": 1, "owned_by": "x"})
    url = "/openai/v1/mod%65ls/gpt%2D4o"
    async with Warden(make_config(tmp_path, upstream.url)) as w:
        status = await get(URL(w.proxy_url + url, encoded=True))
    assert status == 200
    assert upstream.seen == [("GET", "/v1/models/gpt-4o")]
    assert [r["action"]["request"]["path"] for r in decisions(tmp_path)] == ["/v1/models/gpt-4o"]


# -- streams: nothing of an undecided call, cut on a violation ---------------------


async def test_nothing_of_an_undecided_call_reaches_the_agent(
    tmp_path: Path, upstream: Crafted
) -> None:
    # A refund over the limit is held for a person: while it waits, only
    # keep-alive comments may follow the text that came before it.
    upstream.handler = stream(chunks(*REFUND_BIG))
    config = make_config(tmp_path, upstream.url, approvals={"mode": "hold", "keepalive_s": 0.1})
    body = {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True}
    received = b""
    async with Warden(config) as w, aiohttp.ClientSession() as session:
        url = w.proxy_url + "/openai/v1/chat/completions"
        async with session.post(url, json=body) as resp:
            assert resp.status == 200
            async with asyncio.timeout(10):
                while received.count(b": warden: waiting") < 3:
                    received += await resp.content.readany()
    assert b"Checking." in received  # text before the call was not held back
    before_call = received[: received.index(b"Checking.")]
    after_text = received[len(before_call) :].split(b"\n\n", 1)[1]
    assert b"issue_refund" not in received
    assert b"A-1003" not in received
    assert b"call_0" not in received
    # After the text event: keep-alive comments and nothing else.
    lines = [line for line in after_text.split(b"\n") if line]
    assert lines
    assert all(line.startswith(b": warden: waiting") for line in lines), lines


async def test_an_unparseable_event_in_a_governed_stream_cuts_it(
    warden: Warden, upstream: Crafted, tmp_path: Path
) -> None:
    events = chunks(*EXPORT)
    events.insert(2, b"data: {this is not json\n\n")
    upstream.handler = stream(events)
    violations = counter("warden_stream_violations_total")
    names: list[str] = []
    async with oai(warden) as c:
        got = await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)

        async def read() -> None:
            async for chunk in got:
                for choice in chunk.choices:
                    names.extend(
                        t.function.name or "" for t in choice.delta.tool_calls or [] if t.function
                    )

        with pytest.raises(openai.APIError) as caught:
            await read()
    assert "upstream_stream_violation" in str(caught.value.body)
    assert "export_customers" not in names
    assert counter("warden_stream_violations_total") == violations + 1
    await warden.stop()
    outcomes = [r for r in audit_records(tmp_path / "audit") if r["kind"] == "outcome"]
    assert [o["outcome"]["error"] for o in outcomes] == ["upstream_stream_violation"]


# -- results link to decisions only when the call id is unambiguous ----------------


def tool_outcomes(tmp_path: Path) -> list[dict[str, Any]]:
    return [
        r
        for r in audit_records(tmp_path / "audit")
        if r["kind"] == "outcome" and r["action"]["tool"] is not None
    ]


@pytest.mark.parametrize("shared", [False, True])
async def test_a_result_links_to_its_decision_only_when_its_call_id_is_unique(
    warden: Warden, upstream: Crafted, tmp_path: Path, shared: bool
) -> None:
    body = completion(KB, ("search_kb", {"query": "other"}))
    calls = body["choices"][0]["message"]["tool_calls"]
    if shared:
        for call in calls:
            call["id"] = "call_same"  # an upstream's choice: which decision would it be?
    upstream.handler = answer(body)
    ambiguous = counter("warden_ambiguous_call_ids_total")
    async with oai(warden) as c:
        got = await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        assert len(got.choices[0].message.tool_calls or []) == 2
        assert counter("warden_ambiguous_call_ids_total") - ambiguous == (1 if shared else 0)
        upstream.handler = answer({**completion(), "choices": []})
        follow = [
            *MESSAGES,
            {"role": "assistant", "content": None, "tool_calls": calls},
            {"role": "tool", "tool_call_id": calls[0]["id"], "content": "found it"},
        ]
        await c.chat.completions.create(model="gpt-4o-mini", messages=follow)
    await warden.stop()
    linked = [o["outcome"]["result"] for o in tool_outcomes(tmp_path)]
    assert linked == ([] if shared else ["found it"])


# -- stored responses ----------------------------------------------------------------


async def recorded_stream(reply: Reply) -> bytes:
    """The bytes MockLLM streams for a Responses request answered with ``reply``."""
    async with MockLLM() as llm, aiohttp.ClientSession() as http:
        llm.script(reply)
        body = {"model": "gpt-4o-mini", "input": "help", "stream": True}
        async with http.post(llm.url + "/v1/responses", json=body) as resp:
            return await resp.read()


async def test_a_stored_response_is_decided_streamed_or_not(
    warden: Warden, upstream: Crafted, tmp_path: Path
) -> None:
    export = Call("export_customers", {"format": "csv"})
    raw = await recorded_stream(Reply(text="Here.", tool_calls=[Call(*KB), export]))
    # Asked with ?stream=true, the SDK reads SSE whatever the content type says.
    upstream.handler = answer(raw, 200, "application/json")
    kinds: list[str] = []
    async with oai(warden) as c:
        events = await c.responses.retrieve("resp_1", stream=True)
        async for event in events:
            kinds.append(event.type)
            if event.type == "response.completed":
                names = [i.name for i in event.response.output if i.type == "function_call"]
                assert names == ["search_kb"]
    assert "response.completed" in kinds
    assert upstream.seen[-1][1].startswith("/v1/responses/resp_1?")
    await warden.stop()
    assert tool_decisions(tmp_path) == {"search_kb": "allow", "export_customers": "deny"}


async def test_an_answer_labelled_as_a_stream_for_a_request_that_asked_for_none(
    warden: Warden, upstream: Crafted, tmp_path: Path
) -> None:
    # Both SDKs pick stream-or-not from their own request: relayed as a 200 stream,
    # they returned a bare string typed as a completion, and the agent crashed on it.
    # Read whole instead: JSON is decided as any answer, events are not JSON (502).
    upstream.handler = answer(completion(KB), 200, "text/event-stream")
    async with oai(warden) as c:
        got = await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        upstream.handler = answer(
            b"data: " + json.dumps(completion(KB)).encode() + b"\n\n", 200, "text/event-stream"
        )
        with pytest.raises(openai.InternalServerError) as openai_error:
            await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    [proposed] = got.choices[0].message.tool_calls or []
    assert proposed.type == "function"
    assert proposed.function.name == "search_kb"
    assert openai_error.value.status_code == 502
    assert openai_error.value.code == "upstream_bad_response"
    await warden.stop()
    assert tool_decisions(tmp_path) == {"search_kb": "allow"}
