"""Envoy ext_proc, with the real ``ExternalProcessorStub`` from xds-protos playing Envoy's side.

Warden's core runs in-process; the ext_proc service is served by a standalone
``grpc.aio`` server on 127.0.0.1:0. :class:`Envoy` does what Envoy's ext_proc
filter does with each answer: it sends the request headers and body, forwards
the (possibly mutated) request to the mock LLM upstream over real HTTP, then
sends the upstream's response headers and body (as one BUFFERED message or as
STREAMED / FULL_DUPLEX_STREAMED chunks) and applies the mutations it gets back.
What the agent would receive is then parsed with the official SDKs' types.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from hashlib import sha256
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import grpc
import openai
import orjson
import pytest
from aiohttp import web
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from prometheus_client import REGISTRY

from tests.functional.conftest import audit_records, make_config
from tests.functional.test_budgets_functional import wait_for
from tests.functional.test_session_policies_functional import REFUND_A1, bundle_with_lookup
from tests.unit.test_anthropic import accumulate
from warden.admin.auth import Principal
from warden.budgets.caps import window_key
from warden.ingress.envoy_proc import SERVICE_NAME, UPSTREAM_METADATA, ExtProcService
from warden.ingress.grpc_service import GrpcService
from warden.ingress.listen import Listener, admin_refusal, listen
from warden.killswitch import Scope
from warden.protocols.sse import SseParser
from warden.server import Warden
from warden.state import StateStore
from warden.testing import Call, Fault, MockLLM, Reply
from warden.testing._server import LoopbackServer

Mode = processing_mode_pb2.ProcessingMode
OPENAI_HOST = "api.openai.com"
ANTHROPIC_HOST = "api.anthropic.com"
ROUTED = {OPENAI_HOST: "openai", ANTHROPIC_HOST: "anthropic"}
"""Each virtual host's upstream, as Envoy's routes name it (``x-warden-upstream``)."""


def route_metadata(authority: str) -> tuple[tuple[str, str], ...]:
    """The gRPC metadata Envoy's route for ``authority`` sends (none for an unrouted host)."""
    name = ROUTED.get(authority)
    return () if name is None else ((UPSTREAM_METADATA, name),)


KB = Call("search_kb", {"query": "reset password"}, id="call_kb")
EXPORT = Call("export_customers", {"format": "csv"}, id="call_export")
CLOSE = Call("close_account", {"customer_id": "C-7"}, id="toolu_close")
CHAT_PATH = "/v1/chat/completions"
CHAT: dict[str, Any] = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "help"}]}
MESSAGES: dict[str, Any] = {
    "model": "claude-sonnet-4-6",
    "max_tokens": 256,
    "messages": [{"role": "user", "content": "help"}],
}


# -- Envoy's side ----------------------------------------------------------------


def header_map(headers: Mapping[str, str]) -> Any:
    """A HeaderMap as Envoy sends it: lower-case keys, values in ``raw_value``."""
    return base_pb2.HeaderMap(
        headers=[
            # Bytes that are not UTF-8 travel as surrogate escapes (str(bytes, errors=...)).
            base_pb2.HeaderValue(key=k.lower(), raw_value=v.encode("utf-8", "surrogateescape"))
            for k, v in headers.items()
        ]
    )


def apply_headers(headers: dict[str, str], mutation: Any) -> None:
    """As Envoy applies a HeaderMutation: an option appends unless it says to overwrite."""
    overwrite = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
    for option in mutation.set_headers:
        key, value = option.header.key.lower(), option.header.raw_value.decode()
        if key in headers and option.append_action != overwrite:
            value = f"{headers[key]},{value}"
        headers[key] = value
    for name in mutation.remove_headers:
        headers.pop(name.lower(), None)


def body_of(answer: Any, kind: str, chunk: bytes) -> bytes:
    """What Envoy passes on for ``chunk`` given a per-chunk BodyResponse."""
    assert answer.WhichOneof("response") == kind, answer
    common = answer.__getattribute__(kind).response
    if not common.HasField("body_mutation"):
        return chunk
    mutation = common.body_mutation
    which = mutation.WhichOneof("mutation")
    if which == "clear_body":
        return b""
    assert which == "body", mutation
    return bytes(mutation.body)


@dataclass
class Result:
    """What the agent receives once Envoy applied Warden's answers."""

    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    immediate: Any = None
    forwarded_headers: dict[str, str] = field(default_factory=dict)
    forwarded_body: bytes = b""
    pieces: list[bytes] = field(default_factory=list)
    """The response body as Envoy passed it on, one entry per answer."""
    answers: list[Any] = field(default_factory=list)
    extensions: list[float] = field(default_factory=list)
    """Every ``override_message_timeout`` Warden sent, in seconds."""

    def json(self) -> Any:
        return orjson.loads(self.body)


class Envoy:
    """Plays Envoy's ext_proc filter for one HTTP request per :meth:`request` call.

    ``message_timeout``: like Envoy's, how long an answer may take (``None``:
    no limit), unless Warden sends ``override_message_timeout``, which Envoy
    accepts once per message and up to ``max_message_timeout``.
    """

    def __init__(
        self,
        stub: Any,
        upstream_url: str,
        *,
        message_timeout: float | None = None,
        max_message_timeout: float = 0.0,
    ) -> None:
        self.stub = stub
        self.upstream_url = upstream_url
        self.message_timeout = message_timeout
        self.max_message_timeout = max_message_timeout
        self.upstream_adds: dict[str, str] = {}
        """Headers the upstream's answer carries besides its own (Envoy passes them on)."""

    async def request(
        self,
        authority: str,
        path: str,
        body: Any = None,
        *,
        method: str = "POST",
        headers: Mapping[str, str] | None = None,
        raw_body: bytes | None = None,
        request_mode: int = Mode.BUFFERED,
        response_mode: int = Mode.BUFFERED,
        protocol_config: bool = True,
        chunk_size: int = 64,
        before_body: Callable[[], Awaitable[Any]] | None = None,
    ) -> Result:
        """One HTTP request through ext_proc; ``response_mode`` is the response body mode."""
        result = Result()
        data = raw_body if raw_body is not None else (orjson.dumps(body) if body else b"")
        request_headers = {
            ":authority": authority,
            ":path": path,
            ":method": method,
            ":scheme": "https",
            "content-type": "application/json",
            "content-length": str(len(data)),
            "authorization": "Bearer sk-test-secret-123",
            "accept-encoding": "gzip, br",
            **(headers or {}),
        }
        call = self.stub.Process(metadata=route_metadata(authority))
        try:
            first = pb.ProcessingRequest(
                request_headers=pb.HttpHeaders(
                    headers=header_map(request_headers), end_of_stream=not data
                )
            )
            if protocol_config:
                first.protocol_config.CopyFrom(
                    pb.ProtocolConfiguration(
                        request_body_mode=request_mode, response_body_mode=response_mode
                    )
                )
            answer = await self._ask(call, first, result)
            if answer is None:
                return result
            apply_headers(request_headers, answer.request_headers.response.header_mutation)
            if data:
                size = len(data) if request_mode == Mode.BUFFERED else chunk_size
                pieces = [data[i : i + size] for i in range(0, len(data), size)]
                forwarded: list[bytes] = []
                for i, piece in enumerate(pieces):
                    last = i == len(pieces) - 1
                    msg = pb.ProcessingRequest(
                        request_body=pb.HttpBody(body=piece, end_of_stream=last)
                    )
                    answer = await self._ask(call, msg, result)
                    if answer is None:
                        return result
                    forwarded.append(body_of(answer, "request_body", piece))
                    if request_mode == Mode.BUFFERED:
                        apply_headers(request_headers, answer.request_body.response.header_mutation)
                data = b"".join(forwarded)
            result.forwarded_headers = dict(request_headers)
            result.forwarded_body = data
            status, response_headers, raw = await self._upstream(
                path, method, request_headers, data
            )
            await self._response(
                call, result, status, response_headers, raw, response_mode, chunk_size, before_body
            )
            return result
        finally:
            call.cancel()

    async def _ask(self, call: Any, message: Any, result: Result) -> Any:
        await call.write(message)
        answer = await self._answer(call, result)
        result.answers.append(answer)
        if answer.WhichOneof("response") == "immediate_response":
            result.immediate = answer.immediate_response
            result.status = answer.immediate_response.status.code
            result.headers = {}
            apply_headers(result.headers, answer.immediate_response.headers)
            result.body = bytes(answer.immediate_response.body)
            return None
        return answer

    async def _answer(self, call: Any, result: Result) -> Any:
        """The answer to the message just sent, timed as Envoy times it (TimeoutError: too late)."""
        timeout, extended = self.message_timeout, False
        while True:
            answer = await asyncio.wait_for(call.read(), timeout)
            if not answer.HasField("override_message_timeout"):
                return answer
            assert self.max_message_timeout, "Envoy ignores overrides without max_message_timeout"
            assert not extended, "override_message_timeout twice for one message"
            seconds = answer.override_message_timeout.ToTimedelta().total_seconds()
            assert 0.001 <= seconds <= self.max_message_timeout
            result.extensions.append(seconds)
            timeout, extended = seconds, True

    async def _upstream(
        self, path: str, method: str, headers: Mapping[str, str], data: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        send = {k: v for k, v in headers.items() if not k.startswith(":") and k != "content-length"}
        async with (
            aiohttp.ClientSession(auto_decompress=False) as session,
            session.request(
                method, self.upstream_url + path, data=data or None, headers=send
            ) as resp,
        ):
            raw = await resp.read()
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, raw

    async def _response(
        self,
        call: Any,
        result: Result,
        status: int,
        headers: dict[str, str],
        raw: bytes,
        mode: int,
        chunk_size: int,
        before_body: Callable[[], Awaitable[Any]] | None,
    ) -> None:
        response_headers = {":status": str(status), **headers, **self.upstream_adds}
        msg = pb.ProcessingRequest(
            response_headers=pb.HttpHeaders(
                headers=header_map(response_headers), end_of_stream=not raw
            )
        )
        answer = await self._ask(call, msg, result)
        if answer is None:
            return
        apply_headers(response_headers, answer.response_headers.response.header_mutation)
        if answer.HasField("mode_override") and mode != Mode.FULL_DUPLEX_STREAMED:
            # What Envoy does with allow_mode_override: true.
            mode = answer.mode_override.response_body_mode or mode
        result.status = status
        if before_body is not None:
            await before_body()
        if mode == Mode.BUFFERED:
            chunks = [raw]
        else:
            chunks = [raw[i : i + chunk_size] for i in range(0, len(raw), chunk_size)]
        if mode == Mode.FULL_DUPLEX_STREAMED:
            for i, chunk in enumerate(chunks):
                msg = pb.ProcessingRequest(
                    response_body=pb.HttpBody(body=chunk, end_of_stream=i == len(chunks) - 1)
                )
                await call.write(msg)
            while True:
                answer = await call.read()
                result.answers.append(answer)
                if answer.WhichOneof("response") == "immediate_response":
                    result.immediate = answer.immediate_response
                    return
                streamed = answer.response_body.response.body_mutation.streamed_response
                result.pieces.append(bytes(streamed.body))
                if streamed.end_of_stream:
                    break
        else:
            for i, chunk in enumerate(chunks):
                msg = pb.ProcessingRequest(
                    response_body=pb.HttpBody(body=chunk, end_of_stream=i == len(chunks) - 1)
                )
                answer = await self._ask(call, msg, result)
                if answer is None:
                    return
                result.pieces.append(body_of(answer, "response_body", chunk))
                if mode == Mode.BUFFERED:
                    apply_headers(response_headers, answer.response_body.response.header_mutation)
        result.body = b"".join(result.pieces)
        result.headers = {k: v for k, v in response_headers.items() if not k.startswith(":")}


@contextlib.asynccontextmanager
async def envoy_front(envoy: Envoy, authority: str, mode: int) -> AsyncIterator[str]:
    """An HTTP listener that hands each request to :class:`Envoy`: what an SDK would reach."""

    async def handle(request: web.Request) -> web.Response:
        skip = {"host", "content-length", "transfer-encoding", "connection"}
        headers = {k.lower(): v for k, v in request.headers.items() if k.lower() not in skip}
        result = await envoy.request(
            authority,
            request.path_qs,
            method=request.method,
            raw_body=await request.read(),
            headers=headers,
            response_mode=mode,
        )
        drop = {"content-length", "transfer-encoding", "content-encoding", "connection"}
        out = {k: v for k, v in result.headers.items() if k not in drop}
        return web.Response(status=result.status, body=result.body, headers=out)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    listener = Listener("relay", 1, 75, 100, admin_refusal)
    runner, url = await listen(app, "127.0.0.1:0", listener)
    try:
        yield url
    finally:
        await runner.cleanup()


def sse_data(body: bytes) -> list[Any]:
    """The JSON data of each SSE event (``[DONE]`` left out)."""
    return [orjson.loads(e.data) for e in SseParser().feed(body) if e.data != "[DONE]"]


# -- fixtures ---------------------------------------------------------------------


@pytest.fixture
async def warden(tmp_path: Path, llm: MockLLM) -> AsyncIterator[Warden]:
    config = make_config(tmp_path, llm.url)
    async with Warden(config) as running:
        yield running


@pytest.fixture
async def service(warden: Warden) -> GrpcService:
    assert warden.core is not None
    # Typed as what the shared gRPC listener takes: mypy checks the service fits it.
    return ExtProcService(warden.core, warden.config, killswitches=warden.killswitches)


@pytest.fixture
async def envoy(service: GrpcService, llm: MockLLM) -> AsyncIterator[Envoy]:
    async with serve(service, llm) as front:
        yield front


@contextlib.asynccontextmanager
async def serve(service: GrpcService, llm: MockLLM, **options: Any) -> AsyncIterator[Envoy]:
    """``service`` on a gRPC server of its own, and an :class:`Envoy` that calls it."""
    assert service.service_names == (SERVICE_NAME,)
    server = grpc.aio.server()
    service.add_to(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Envoy(pb_grpc.ExternalProcessorStub(channel), llm.url, **options)
    finally:
        await channel.close()
        await service.close()
        await server.stop(None)


def records(tmp_path: Path) -> list[dict[str, Any]]:
    return audit_records(tmp_path / "audit")


def decisions(tmp_path: Path) -> dict[str, dict[str, Any]]:
    """Decision records by tool (``llm_call`` for the model call)."""
    return {
        r["action"].get("tool") or r["action"]["kind"]: r
        for r in records(tmp_path)
        if r.get("kind") == "decision"
    }


# -- OpenAI chat ---------------------------------------------------------------------


async def test_openai_buffered_denied_call_removed_allowed_kept(
    envoy: Envoy, llm: MockLLM, warden: Warden, tmp_path: Path
) -> None:
    llm.script(Reply(text="Checking.", tool_calls=[KB, EXPORT]))
    result = await envoy.request(OPENAI_HOST, "/v1/chat/completions", CHAT)

    assert result.immediate is None
    assert result.status == 200
    completion = openai.types.chat.ChatCompletion.model_validate(result.json())
    message = completion.choices[0].message
    assert [c.function.name for c in message.tool_calls or [] if c.type == "function"] == [
        "search_kb"
    ]
    assert "blocked the tool call `export_customers`" in (message.content or "")
    # BUFFERED: Envoy keeps content-length, which must match the rewritten body.
    assert result.headers["content-length"] == str(len(result.body))
    assert result.headers["content-type"] == "application/json"
    # The agent's credential went upstream; Warden's accept-encoding removal too.
    assert result.forwarded_headers["authorization"] == "Bearer sk-test-secret-123"
    assert "accept-encoding" not in result.forwarded_headers

    await warden.stop()
    by_tool = decisions(tmp_path)
    assert result.headers["x-warden-decision-id"] == by_tool["llm_call"]["decision"]["id"]
    assert by_tool["search_kb"]["decision"]["effect"] == "allow"
    assert by_tool["export_customers"]["decision"]["effect"] == "deny"
    assert result.headers["x-warden-blocked"] == by_tool["export_customers"]["decision"]["id"]
    assert by_tool["llm_call"]["action"]["request"]["upstream"] == "openai"
    assert by_tool["llm_call"]["action"]["request"]["path"] == "/v1/chat/completions"
    dumped = json.dumps(records(tmp_path))
    assert "sk-test-secret-123" not in dumped


async def test_openai_streamed_sse_holds_calls_until_decided_and_text_flows(
    envoy: Envoy, llm: MockLLM, warden: Warden, tmp_path: Path
) -> None:
    llm.script(Reply(text="Let me look that up for you.", tool_calls=[KB, EXPORT]))
    result = await envoy.request(
        OPENAI_HOST,
        "/v1/chat/completions",
        {**CHAT, "stream": True},
        response_mode=Mode.STREAMED,
        chunk_size=41,  # events split across chunks
    )

    assert result.immediate is None
    assert result.headers["content-type"] == "text/event-stream"
    assert "content-length" not in result.headers
    # Warden asked for the usage chunk the agent did not, and fixed the length.
    forwarded = orjson.loads(result.forwarded_body)
    assert forwarded["stream_options"] == {"include_usage": True}
    assert result.forwarded_headers["content-length"] == str(len(result.forwarded_body))

    chunks = [
        openai.types.chat.ChatCompletionChunk.model_validate(d) for d in sse_data(result.body)
    ]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    names = [
        tc.function.name
        for c in chunks
        if c.choices
        for tc in c.choices[0].delta.tool_calls or []
        if tc.function is not None and tc.function.name
    ]
    assert names == ["search_kb"]
    assert text.startswith("Let me look that up for you.")
    assert "blocked the tool call `export_customers`" in text
    assert all(c.usage is None for c in chunks)  # the usage Warden asked for stays hidden
    # Text flows at once: it went out in an answer to an early chunk, not at the end.
    first_text = next(i for i, p in enumerate(result.pieces) if b'"Let' in p)
    assert first_text < len(result.pieces) - 3
    # The allowed call left in one piece, once decided: its name and its last argument
    # bytes in the same answer, though the upstream spread them over several chunks.
    call_piece = next(p for p in result.pieces if b'"name":"search_kb"' in p)
    assert b"password" in call_piece
    # Nothing of the denied call ever left Warden, in any chunk.
    assert all(b'export_customers"' not in p for p in result.pieces)
    assert result.body.endswith(b"data: [DONE]\n\n")

    await warden.stop()
    by_tool = decisions(tmp_path)
    assert by_tool["export_customers"]["decision"]["effect"] == "deny"
    assert result.headers["x-warden-decision-id"] == by_tool["llm_call"]["decision"]["id"]


async def test_streamed_request_body_is_held_until_decided(envoy: Envoy, llm: MockLLM) -> None:
    llm.script(Reply(text="ok"))
    long_chat = {**CHAT, "messages": [{"role": "user", "content": "help " * 40}]}
    result = await envoy.request(
        OPENAI_HOST, "/v1/chat/completions", long_chat, request_mode=Mode.STREAMED, chunk_size=50
    )
    assert result.status == 200
    # Every chunk but the last was answered empty; the last carried the whole body.
    body_answers = [a for a in result.answers if a.WhichOneof("response") == "request_body"]
    assert len(body_answers) > 2
    assert all(
        a.request_body.response.body_mutation.WhichOneof("mutation") == "clear_body"
        for a in body_answers[:-1]
    )
    assert orjson.loads(result.forwarded_body) == long_chat
    assert orjson.loads(llm.requests[0].raw) == long_chat


async def test_full_duplex_streamed_answers_with_streamed_responses(
    envoy: Envoy, llm: MockLLM
) -> None:
    llm.script(Reply(text="One moment.", tool_calls=[EXPORT, KB]))
    result = await envoy.request(
        OPENAI_HOST,
        "/v1/chat/completions",
        {**CHAT, "stream": True},
        response_mode=Mode.FULL_DUPLEX_STREAMED,
        chunk_size=50,
    )
    assert result.immediate is None
    chunks = [
        openai.types.chat.ChatCompletionChunk.model_validate(d) for d in sse_data(result.body)
    ]
    names = [
        tc.function.name
        for c in chunks
        if c.choices
        for tc in c.choices[0].delta.tool_calls or []
        if tc.function is not None and tc.function.name
    ]
    assert names == ["search_kb"]
    assert result.body.endswith(b"data: [DONE]\n\n")
    # Every answer is a streamed_response chunk; the last one ends the stream.
    assert all(
        a.response_body.response.body_mutation.WhichOneof("mutation") == "streamed_response"
        for a in result.answers[3:]
    )


async def test_streamed_json_body_is_held_whole_then_rewritten(envoy: Envoy, llm: MockLLM) -> None:
    """A non-stream answer in STREAMED mode (no mode override honoured): held, then replaced."""
    llm.script(Reply(tool_calls=[EXPORT]))
    result = await envoy.request(
        OPENAI_HOST,
        "/v1/chat/completions",
        CHAT,
        response_mode=Mode.STREAMED,
        chunk_size=30,
    )
    # Warden asked Envoy to buffer JSON (allow_mode_override); the emulator honoured it.
    overrides = [a for a in result.answers if a.HasField("mode_override")]
    assert [o.mode_override.response_body_mode for o in overrides] == [Mode.BUFFERED]
    completion = openai.types.chat.ChatCompletion.model_validate(result.json())
    assert completion.choices[0].message.tool_calls is None
    assert completion.choices[0].finish_reason == "stop"


async def test_json_chunks_without_mode_override(envoy: Envoy, llm: MockLLM) -> None:
    """Envoy without allow_mode_override keeps STREAMED: every chunk is held until the end."""
    llm.script(Reply(tool_calls=[KB, EXPORT]))
    service_envoy = _NoOverride(envoy)
    result = await service_envoy.request(OPENAI_HOST, "/v1/chat/completions", CHAT)
    assert all(p == b"" for p in result.pieces[:-1])
    assert len(result.pieces) > 2
    completion = openai.types.chat.ChatCompletion.model_validate(result.json())
    assert [
        c.function.name
        for c in completion.choices[0].message.tool_calls or []
        if c.type == "function"
    ] == ["search_kb"]


class _NoOverride(Envoy):
    """Envoy configured STREAMED without allow_mode_override."""

    def __init__(self, envoy: Envoy) -> None:
        super().__init__(envoy.stub, envoy.upstream_url)

    async def request(self, *args: Any, **kwargs: Any) -> Result:
        kwargs.setdefault("response_mode", Mode.STREAMED)
        kwargs.setdefault("chunk_size", 40)
        return await super().request(*args, **kwargs)

    async def _ask(self, call: Any, message: Any, result: Result) -> Any:
        answer = await super()._ask(call, message, result)
        if answer is not None and answer.HasField("mode_override"):
            answer.ClearField("mode_override")
        return answer


async def test_official_sdks_through_the_mesh(envoy: Envoy, llm: MockLLM) -> None:
    """The openai and anthropic SDKs, unchanged but for the address Envoy listens on."""
    llm.script(Reply(text="Checking.", tool_calls=[EXPORT, KB]))
    async with (
        envoy_front(envoy, OPENAI_HOST, Mode.STREAMED) as url,
        openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="sk-test", max_retries=0) as client,
    ):
        stream = await client.chat.completions.create(
            model="gpt-4o-mini", messages=CHAT["messages"], stream=True
        )
        names: list[str] = []
        text = ""
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                names += [
                    tc.function.name
                    for tc in chunk.choices[0].delta.tool_calls or []
                    if tc.function is not None and tc.function.name
                ]
    assert names == ["search_kb"]
    assert "blocked the tool call `export_customers`" in text

    llm.script(Reply(tool_calls=[CLOSE]))
    async with (
        envoy_front(envoy, ANTHROPIC_HOST, Mode.STREAMED) as url,
        anthropic.AsyncAnthropic(base_url=url, api_key="sk-ant-test", max_retries=0) as claude,
    ):
        raw = await claude.messages.with_raw_response.create(
            model="claude-sonnet-4-6", max_tokens=256, messages=MESSAGES["messages"]
        )
        message = await raw.parse()
    assert raw.headers["x-warden-decision-id"].startswith("dec_")
    assert [b.type for b in message.content] == ["text"]
    assert message.stop_reason == "end_turn"
    with pytest.raises(openai.PermissionDeniedError, match="named no upstream for this route"):
        async with (
            envoy_front(envoy, "elsewhere.example", Mode.STREAMED) as url,
            openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="sk-test", max_retries=0) as client,
        ):
            await client.chat.completions.create(model="gpt-4o-mini", messages=CHAT["messages"])


# -- Anthropic ---------------------------------------------------------------------


async def test_anthropic_buffered_held_call_removed_allowed_kept(
    envoy: Envoy, llm: MockLLM, warden: Warden, tmp_path: Path
) -> None:
    llm.script(Reply(text="Sure.", tool_calls=[Call("get_order", {"order_id": "A-1"}), CLOSE]))
    result = await envoy.request(
        ANTHROPIC_HOST, "/v1/messages", MESSAGES, headers={"anthropic-version": "2023-06-01"}
    )
    assert result.immediate is None
    message = anthropic.types.Message.model_validate(result.json())
    kinds = [(b.type, getattr(b, "name", None)) for b in message.content]
    assert ("tool_use", "get_order") in kinds
    assert ("tool_use", "close_account") not in kinds
    text = "".join(b.text for b in message.content if b.type == "text")
    assert "held the tool call `close_account` for human approval" in text
    assert result.headers["content-length"] == str(len(result.body))

    await warden.stop()
    by_tool = decisions(tmp_path)
    assert by_tool["close_account"]["decision"]["effect"] == "require_approval"
    assert by_tool["get_order"]["decision"]["effect"] == "allow"


async def test_anthropic_streamed_sse(envoy: Envoy, llm: MockLLM) -> None:
    llm.script(Reply(text="On it.", tool_calls=[CLOSE, Call("get_order", {"order_id": "A-1"})]))
    result = await envoy.request(
        ANTHROPIC_HOST,
        "/v1/messages",
        {**MESSAGES, "stream": True},
        headers={"anthropic-version": "2023-06-01"},
        response_mode=Mode.STREAMED,
        chunk_size=37,
    )
    assert result.immediate is None
    events = list(SseParser().feed(result.body))
    snapshot = accumulate(events)  # as the official SDK's stream accumulator builds it
    names = [b.name for b in snapshot.content if b.type == "tool_use"]
    assert names == ["get_order"]
    text = "".join(b.text for b in snapshot.content if b.type == "text")
    assert "held the tool call `close_account`" in text
    assert events[-1].event == "message_stop"


# -- fail closed -------------------------------------------------------------------


async def test_a_route_that_names_no_upstream_is_refused_before_anything_goes_upstream(
    envoy: Envoy, llm: MockLLM
) -> None:
    result = await envoy.request("api.evil.example:443", "/v1/chat/completions", CHAT)
    assert result.status == 403
    error = result.json()["error"]
    assert error["code"] == "unknown_upstream"
    assert "x-warden-upstream" in error["message"]
    assert llm.requests == []


async def test_the_upstream_is_the_one_envoys_route_names_whatever_the_authority(
    envoy: Envoy, warden: Warden, llm: MockLLM
) -> None:
    # Envoy sends every /v1/ request to one cluster however the agent sets Host: an
    # authority naming another upstream must not pick that upstream's switches or key.
    assert warden.killswitches is not None
    await warden.killswitches.set(Scope.UPSTREAM, "openai", "incident", "ops")
    headers = {":authority": ANTHROPIC_HOST, ":path": "/v1/models", ":method": "GET"}

    async def first_answer(metadata: tuple[tuple[str, str], ...]) -> Any:
        call = envoy.stub.Process(metadata=metadata)
        await call.write(
            pb.ProcessingRequest(
                request_headers=pb.HttpHeaders(headers=header_map(headers), end_of_stream=True),
                protocol_config=pb.ProtocolConfiguration(
                    request_body_mode=Mode.BUFFERED, response_body_mode=Mode.BUFFERED
                ),
            )
        )
        answer = await call.read()
        await call.done_writing()
        return answer

    answer = await first_answer(route_metadata(OPENAI_HOST))
    assert answer.WhichOneof("response") == "immediate_response"
    assert b"stops upstream openai" in answer.immediate_response.body
    # Named twice, it names none.
    twice = await first_answer((*route_metadata(OPENAI_HOST), *route_metadata(ANTHROPIC_HOST)))
    assert b"named no upstream" in twice.immediate_response.body
    assert llm.requests == []


async def test_a_gateways_base_path_in_base_url_is_taken_off_the_path(
    tmp_path: Path, llm: MockLLM
) -> None:
    # Envoy's :path is the provider's whole path; a gateway's own base path (Vertex's
    # OpenAI-compatible endpoint) was read as ids and the route refused, unfixable.
    base = "/v1/projects/p/locations/l/endpoints/openapi"
    results = []
    for name, base_url in (("bare", llm.url), ("based", llm.url + base)):
        upstreams = {"openai": {"protocol": "openai", "base_url": base_url}}
        (tmp_path / name).mkdir()
        async with Warden(make_config(tmp_path / name, llm.url, upstreams=upstreams)) as w:
            assert w.core is not None
            async with serve(ExtProcService(w.core, w.config), llm) as envoy:
                results.append(await envoy.request(OPENAI_HOST, base + "/chat/completions", CHAT))
    refused, governed = results
    assert refused.status == 404
    assert refused.json()["error"]["code"] == "route_not_governed"
    assert "upstreams.openai.base_url" in refused.json()["error"]["message"]
    assert governed.immediate is None  # decided and sent on (the mock has no such path)
    assert governed.forwarded_body


@pytest.mark.parametrize("base", ["/openai", "/openai/deployments/gpt-4o"])
async def test_an_azure_base_url_path_still_names_the_deployment_that_runs(
    tmp_path: Path, llm: MockLLM, base: str
) -> None:
    # The Azure SDK's base_url ends in the deployment: taken off :path, the deployment
    # went unseen and the body's model was decided and priced instead.
    upstreams = {"openai": {"protocol": "openai", "base_url": llm.url + base}}
    llm.script(Reply(text="fine"))
    async with Warden(make_config(tmp_path, llm.url, upstreams=upstreams)) as w:
        assert w.core is not None
        async with serve(ExtProcService(w.core, w.config), llm) as envoy:
            body = {**CHAT, "model": "gpt-4o-mini"}
            path = "/openai/deployments/gpt-4o/chat/completions"
            result = await envoy.request(OPENAI_HOST, path, body)
    assert result.immediate is None, result.body
    assert decisions(tmp_path)["llm_call"]["action"]["model"] == "gpt-4o"


async def test_by_authority_an_unknown_host_is_refused(tmp_path: Path, llm: MockLLM) -> None:
    ext_proc = {"upstream_from": "authority", "hosts": {OPENAI_HOST: "openai"}}
    async with Warden(make_config(tmp_path, llm.url, ext_proc=ext_proc)) as warden:
        assert warden.core is not None
        service = ExtProcService(warden.core, warden.config)
        async with serve(service, llm) as envoy:
            result = await envoy.request("api.evil.example:443", "/v1/chat/completions", CHAT)
    assert result.status == 403
    error = result.json()["error"]
    assert error["code"] == "unknown_upstream"
    assert "api.evil.example" in error["message"]
    assert llm.requests == []


async def test_base_url_host_matches_without_hosts_mapping(tmp_path: Path, llm: MockLLM) -> None:
    """By authority, no ext_proc.hosts: the authority is matched to the one upstream with
    that host."""
    config = make_config(
        tmp_path,
        llm.url,
        upstreams={"openai": {"protocol": "openai", "base_url": "https://api.openai.com"}},
        ext_proc={"upstream_from": "authority"},
    )
    async with Warden(config) as running:
        assert running.core is not None
        service = ExtProcService(running.core, config)
        server = grpc.aio.server()
        service.add_to(server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            envoy = Envoy(pb_grpc.ExternalProcessorStub(channel), llm.url)
            llm.script(Reply(tool_calls=[Call("export_customers", {})]))
            authority = llm.url.removeprefix("http://")  # host:port, the port is ignored
            result = await envoy.request(authority, "/v1/messages", MESSAGES)
            assert result.immediate is None
            message = anthropic.types.Message.model_validate(result.json())
            assert [b.type for b in message.content] == ["text"]
            assert message.stop_reason == "end_turn"
            refused = await envoy.request("localhost", "/v1/messages", MESSAGES)
            assert refused.status == 403
            assert refused.json()["error"]["code"] == "unknown_upstream"
        await server.stop(None)


async def test_unparsable_json_response_fails_closed(envoy: Envoy, llm: MockLLM) -> None:
    llm.script(Reply(tool_calls=[EXPORT], fault="malformed_json"))
    result = await envoy.request(OPENAI_HOST, "/v1/chat/completions", CHAT)
    assert result.status == 502
    assert result.json()["error"]["code"] == "upstream_bad_response"
    assert b"export_customers" not in result.body


async def test_an_upstream_header_that_is_not_utf8_is_the_upstreams_fault(
    envoy: Envoy, llm: MockLLM, tmp_path: Path
) -> None:
    # Answered as the agent's own bad request (400), SDKs would not retry it.
    llm.script(Reply(text="hi"))
    envoy.upstream_adds = {"x-upstream-note": b"caf\xe9".decode("utf-8", "surrogateescape")}
    result = await envoy.request(OPENAI_HOST, "/v1/chat/completions", CHAT)
    assert result.status == 502
    assert result.json()["error"]["code"] == "upstream_bad_response"


async def test_hosted_mcp_servers_a_request_declares_reach_the_policy(
    envoy: Envoy, llm: MockLLM
) -> None:
    # The shipped policy refuses a model request that opens an MCP server not on its
    # allowlist: through the mesh as through the base URL (input.request.tools).
    def responses(url: str) -> dict[str, Any]:
        mcp = {
            "type": "mcp",
            "server_label": "kb",
            "server_url": url,
            "allowed_tools": ["search_kb"],
        }
        return {"model": "gpt-4o-mini", "input": "find it", "tools": [mcp]}

    refused = await envoy.request(
        OPENAI_HOST, "/v1/responses", responses("https://mcp.evil.example/mcp")
    )
    assert refused.status == 403
    assert "not approved for support agents" in refused.json()["error"]["message"]
    assert not llm.requests
    allowed = await envoy.request(
        OPENAI_HOST, "/v1/responses", responses("https://kb.support.example.com/mcp")
    )
    assert allowed.status == 200
    assert len(llm.requests) == 1


@contextlib.asynccontextmanager
async def lookup_mesh(tmp_path: Path, llm: MockLLM) -> AsyncIterator[tuple[Warden, Envoy]]:
    """Warden with refunds that need a lookup in the conversation, behind Envoy for OpenAI."""
    bundle = {"bundles": [str(bundle_with_lookup(tmp_path))], "workers": 1, "watch": False}
    config = make_config(tmp_path, llm.url, policy=bundle)
    async with Warden(config) as warden:
        assert warden.core is not None
        service = ExtProcService(warden.core, warden.config, killswitches=warden.killswitches)
        async with serve(service, llm) as envoy:
            yield warden, envoy


async def test_a_responses_chain_through_the_mesh_is_rebuilt_from_wardens_records(
    tmp_path: Path, llm: MockLLM
) -> None:
    # Refunds need the order looked up in the conversation; the continuation carries
    # only the lookup's output, so its history comes from the recorded first answer.
    async with lookup_mesh(tmp_path, llm) as (warden, envoy):
        assert warden.core is not None
        llm.script(Reply(tool_calls=[Call("get_order", {"order_id": "A-1"})]))
        ask = {"model": "gpt-4.1", "input": "refund A-1 please"}
        first = (await envoy.request(OPENAI_HOST, "/v1/responses", ask)).json()
        (lookup,) = [i for i in first["output"] if i["type"] == "function_call"]
        await warden.core.background.drain()  # the answer's chain link is written
        output = [{"type": "function_call_output", "call_id": lookup["call_id"], "output": "ok"}]
        llm.script(Reply(tool_calls=[REFUND_A1]))
        then = {"model": "gpt-4.1", "input": output, "previous_response_id": first["id"]}
        second = (await envoy.request(OPENAI_HOST, "/v1/responses", then)).json()
    names = [i["name"] for i in second["output"] if i["type"] == "function_call"]
    assert names == ["issue_refund"], second["output"]


async def test_a_background_answer_fetched_through_the_mesh_goes_on_in_its_chain(
    tmp_path: Path, llm: MockLLM
) -> None:
    async with lookup_mesh(tmp_path, llm) as (warden, envoy):
        assert warden.core is not None
        llm.script(Reply(tool_calls=[Call("get_order", {"order_id": "A-1"}, id="c1"), EXPORT]))
        ask = {"model": "gpt-4.1", "input": "refund A-1 please", "background": True}
        queued = (await envoy.request(OPENAI_HOST, "/v1/responses", ask)).json()
        assert queued["status"] == "queued"
        await warden.core.background.drain()
        fetched = await envoy.request(OPENAI_HOST, f"/v1/responses/{queued['id']}", method="GET")
        done = fetched.json()
        assert [i["call_id"] for i in done["output"] if i["type"] == "function_call"] == ["c1"]
        await warden.core.background.drain()  # the fetched calls join the answer's link
        mine = [{"type": "function_call_output", "call_id": "c1", "output": "delivered"}]
        llm.script(Reply(tool_calls=[REFUND_A1]))
        then = {"model": "gpt-4.1", "input": mine, "previous_response_id": done["id"]}
        second = (await envoy.request(OPENAI_HOST, "/v1/responses", then)).json()
    names = [i["name"] for i in second["output"] if i["type"] == "function_call"]
    assert names == ["issue_refund"], second
    sent = llm.requests[-1].body["input"]
    assert {i["call_id"] for i in sent if i["type"] == "function_call_output"} == {
        "c1",
        EXPORT.id,
    }


async def test_another_agents_answer_is_refused_through_the_mesh(
    tmp_path: Path, llm: MockLLM
) -> None:
    keys = {"refunds-bot": "key-refunds", "triage-bot": "key-triage"}
    agents = {a: {"key_sha256": [sha256(k.encode()).hexdigest()]} for a, k in keys.items()}
    config = make_config(
        tmp_path,
        llm.url,
        identity={"agents": agents, "require_proof": True},
    )

    def agent(name: str) -> dict[str, str]:
        return {"x-warden-agent": name, "x-warden-agent-key": keys[name]}

    async with Warden(config) as warden:
        assert warden.core is not None
        service = ExtProcService(warden.core, warden.config, killswitches=warden.killswitches)
        async with serve(service, llm) as envoy:
            llm.script(Reply(text="Queued."))
            ask = {"model": "gpt-4.1", "input": "summarise", "background": True}
            mine = agent("refunds-bot")
            queued = (await envoy.request(OPENAI_HOST, "/v1/responses", ask, headers=mine)).json()
            await warden.core.background.drain()
            path = f"/v1/responses/{queued['id']}"
            then = {"model": "gpt-4.1", "input": "go on", "previous_response_id": queued["id"]}
            theirs = agent("triage-bot")
            for method, where, body in (("GET", path, None), ("POST", "/v1/responses", then)):
                refused = await envoy.request(
                    OPENAI_HOST, where, body, method=method, headers=theirs
                )
                assert refused.status == 403
                assert "made for another agent" in refused.json()["error"]["message"]
            assert len(llm.requests) == 1
            fetched = await envoy.request(OPENAI_HOST, path, method="GET", headers=mine)
            assert fetched.json()["status"] == "completed"


async def test_a_key_given_twice_goes_upstream_as_warden_read_it(
    envoy: Envoy, llm: MockLLM
) -> None:
    hidden = '{"type": "mcp", "server_label": "gh", "server_url": "https://mcp.gh.example/mcp"}'
    body = f'{{"model": "gpt-4.1", "input": "hi", "tools": [{hidden}], "tools": []}}'.encode()
    llm.script(Reply(text="hello"))
    result = await envoy.request(OPENAI_HOST, "/v1/responses", raw_body=body)
    assert result.status == 200
    assert result.forwarded_body.count(b'"tools"') == 1
    assert orjson.loads(result.forwarded_body)["tools"] == []
    assert b"mcp.gh.example" not in result.forwarded_body


async def test_a_continuation_through_the_mesh_answers_the_call_warden_removed(
    tmp_path: Path, llm: MockLLM
) -> None:
    # The provider keeps the blocked call with its answer and wants an output for
    # it; the agent never saw it, so Warden gives the one the agent was told.
    config = make_config(tmp_path, llm.url)
    async with Warden(config) as warden:
        assert warden.core is not None
        service = ExtProcService(warden.core, warden.config, killswitches=warden.killswitches)
        async with serve(service, llm) as envoy:
            llm.script(Reply(tool_calls=[Call("get_order", {"order_id": "A-1"}, id="c1"), EXPORT]))
            ask = {"model": "gpt-4.1", "input": "where is A-1?"}
            first = (await envoy.request(OPENAI_HOST, "/v1/responses", ask)).json()
            assert [i["call_id"] for i in first["output"] if i["type"] == "function_call"] == ["c1"]
            (note,) = [i for i in first["output"] if i["type"] == "message"]
            await warden.core.background.drain()  # the answer's chain link is written
            mine = [{"type": "function_call_output", "call_id": "c1", "output": "shipped"}]
            llm.script(Reply(text="A-1 has shipped."))
            then = {"model": "gpt-4.1", "input": mine, "previous_response_id": first["id"]}
            second = await envoy.request(OPENAI_HOST, "/v1/responses", then)
    assert second.status == 200, second.body
    sent = llm.requests[-1].body["input"]
    assert sent == [
        {
            "type": "function_call_output",
            "call_id": "call_export",
            "output": note["content"][0]["text"],
        },
        *mine,
    ]


async def test_arguments_are_checked_against_the_schemas_the_request_declares(
    envoy: Envoy, llm: MockLLM
) -> None:
    schema = {"type": "object", "properties": {"query": {"type": "string"}}}
    tool = {"type": "function", "function": {"name": "search_kb", "parameters": schema}}
    llm.script(Reply(tool_calls=[Call("search_kb", {"QUERY": "x"}, id="call_kb")]))
    result = await envoy.request(OPENAI_HOST, CHAT_PATH, {**CHAT, "tools": [tool]})
    message = openai.types.chat.ChatCompletion.model_validate(result.json()).choices[0].message
    assert not message.tool_calls
    assert "spelled otherwise than the tool's schema" in (message.content or "")


async def test_a_response_spelled_for_case_blind_clients_fails_closed(
    envoy: Envoy, llm: MockLLM
) -> None:
    # Go's encoding/json would read TOOL_CALLS as tool_calls: Warden never saw that call.
    llm.script(Reply(tool_calls=[EXPORT], fault="case_blind_keys"))
    result = await envoy.request(OPENAI_HOST, "/v1/chat/completions", CHAT)
    assert result.status == 502
    assert result.json()["error"]["code"] == "upstream_bad_response"
    assert "case-blind clients read" in result.json()["error"]["message"]
    assert b"export_customers" not in result.body

    llm.script(Reply(tool_calls=[EXPORT], fault="case_blind_keys"))
    result = await envoy.request(
        ANTHROPIC_HOST,
        "/v1/messages",
        {**MESSAGES, "stream": True},
        headers={"anthropic-version": "2023-06-01"},
        response_mode=Mode.STREAMED,
    )
    events = list(SseParser().feed(result.body))
    assert [e.event for e in events] == ["error"]
    assert "case-blind clients read" in events[0].data
    assert b"export_customers" not in result.body


async def test_broken_sse_ends_with_the_providers_error_event(envoy: Envoy, llm: MockLLM) -> None:
    llm.script(Reply(text="hi", tool_calls=[EXPORT], fault="malformed_json"))
    result = await envoy.request(
        ANTHROPIC_HOST,
        "/v1/messages",
        {**MESSAGES, "stream": True},
        headers={"anthropic-version": "2023-06-01"},
        response_mode=Mode.STREAMED,
        chunk_size=25,
    )
    events = list(SseParser().feed(result.body))
    assert events[-1].event == "error"
    assert b"export_customers" not in result.body
    # After the error event every later chunk is dropped.
    cut = next(i for i, p in enumerate(result.pieces) if b"event: error" in p)
    assert all(p == b"" for p in result.pieces[cut + 1 :])
    assert cut < len(result.pieces) - 1


async def test_kill_switch_thrown_mid_stream_cuts_it(
    envoy: Envoy, llm: MockLLM, warden: Warden
) -> None:
    killswitches = warden.killswitches
    assert killswitches is not None
    llm.script(Reply(text="a long answer " * 5, tool_calls=[KB]))

    async def kill() -> None:
        await killswitches.set(Scope.AGENT, "support-triage", "incident 42", "oncall")

    result = await envoy.request(
        OPENAI_HOST,
        "/v1/chat/completions",
        {**CHAT, "stream": True},
        response_mode=Mode.STREAMED,
        before_body=kill,
    )
    assert result.pieces[0].startswith(b'data: {"error"')
    assert b'"code":"killed"' in result.pieces[0]
    assert all(p == b"" for p in result.pieces[1:])
    assert b"search_kb" not in result.body


@pytest.mark.parametrize("mode", [Mode.STREAMED, Mode.BUFFERED])
async def test_kill_switch_thrown_cuts_a_body_warden_does_not_read(
    envoy: Envoy, llm: MockLLM, warden: Warden, mode: int
) -> None:
    # The model list passes unread; a kill switch still stops the agent there.
    killswitches = warden.killswitches
    assert killswitches is not None

    async def kill() -> None:
        await killswitches.set(Scope.AGENT, "support-triage", "incident 43", "oncall")

    result = await envoy.request(
        OPENAI_HOST, "/v1/models", method="GET", response_mode=mode, before_body=kill
    )
    assert b'"code":"killed"' in result.pieces[0]
    assert b"incident 43" in result.pieces[0]
    assert all(p == b"" for p in result.pieces[1:])
    assert b"gpt-4o" not in result.body
    if mode == Mode.BUFFERED:
        assert result.headers["content-length"] == str(len(result.body))


@pytest.mark.parametrize("mode", [Mode.STREAMED, Mode.BUFFERED, Mode.FULL_DUPLEX_STREAMED])
async def test_embeddings_through_the_mesh_are_charged_to_the_llm_cap(
    tmp_path: Path, llm: MockLLM, mode: int
) -> None:
    # As through the base URL: the request's model, its answer's usage.prompt_tokens,
    # read whole and passed on as they came (the SDK reads every vector).
    config = make_config(tmp_path, llm.url, budgets={"llm": {"limit_usd": 1.0}})
    texts = ["refund policy for damaged goods", "how long do refunds take"]
    async with Warden(config) as w:
        assert w.core is not None
        service = ExtProcService(w.core, w.config, killswitches=w.killswitches)
        async with (
            serve(service, llm) as front,
            envoy_front(front, OPENAI_HOST, mode) as url,
            openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="sk-test", max_retries=0) as client,
        ):
            answer = await client.embeddings.create(model="text-embedding-3-large", input=texts)
        # Settled just after the answer is passed on: read from outside, as it lands.
        store = await StateStore.open(f"sqlite:///{tmp_path}/state.db")
        try:
            key = ("llm", window_key("day", datetime.now(UTC)), "agent:support-triage")
            async with asyncio.timeout(5):
                while (spent := (await store.counters([key]))[0]).reserved or not spent.spent:  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
        finally:
            await store.close()
    words = sum(len(t.split()) for t in texts)
    assert [len(d.embedding) for d in answer.data] == [1536, 1536]
    assert answer.usage.prompt_tokens == words
    assert (spent.spent, spent.reserved) == pytest.approx((words * 0.13 / 1e6, 0.0))


async def test_non_json_request_body_is_refused(envoy: Envoy, llm: MockLLM) -> None:
    result = await envoy.request(OPENAI_HOST, "/v1/chat/completions", raw_body=b"{not json")
    assert result.status == 400
    assert result.json()["error"]["code"] == "invalid_json"
    assert llm.requests == []


@pytest.mark.parametrize("path", [CHAT_PATH, "/v1/embeddings"])
async def test_a_body_declared_in_another_charset_is_refused(
    envoy: Envoy, llm: MockLLM, path: str
) -> None:
    # Envoy forwards the bytes as sent; a server decoding by the charset reads +ACI- as '"'.
    headers = {"content-type": "application/json; charset=utf-7"}
    body = {"model": "gpt-4o-mini", "input": "x"} if "embed" in path else CHAT
    result = await envoy.request(OPENAI_HOST, path, body, headers=headers)
    assert result.status == 415
    assert result.json()["error"]["code"] == "unsupported_media_type"
    assert "charset 'utf-7'" in result.json()["error"]["message"]
    assert llm.requests == []


async def test_route_not_on_the_allowlist_is_refused(envoy: Envoy, llm: MockLLM) -> None:
    result = await envoy.request(OPENAI_HOST, "/v1/chat/completions/x/messages", method="GET")
    assert result.status == 404
    assert result.json()["error"]["code"] == "route_not_governed"


async def test_an_envoy_that_reports_no_body_modes_is_refused_up_front(
    envoy: Envoy, llm: MockLLM
) -> None:
    """Envoy before 1.34 sends no protocol_config: with its response_body_mode at NONE the
    answer, tool calls and all, would go to the agent unread. Refused before anything leaves."""
    call = envoy.stub.Process(metadata=route_metadata(OPENAI_HOST))
    headers = {":authority": OPENAI_HOST, ":path": "/v1/chat/completions", ":method": "POST"}
    await call.write(
        pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=header_map(headers)))
    )
    answer = await call.read()
    assert answer.WhichOneof("response") == "immediate_response"
    assert answer.immediate_response.status.code == 502
    assert b"protocol_config" in answer.immediate_response.body
    assert b"ext_proc.unreported_modes" in answer.immediate_response.body
    call.cancel()
    assert llm.requests == []


async def test_message_out_of_order_fails_closed(tmp_path: Path, llm: MockLLM) -> None:
    """Trusted to send bodies, an Envoy whose request body never comes is refused later."""
    ext_proc = {"unreported_modes": "trust"}
    async with Warden(make_config(tmp_path, llm.url, ext_proc=ext_proc)) as warden:
        assert warden.core is not None
        service = ExtProcService(warden.core, warden.config, killswitches=warden.killswitches)
        async with serve(service, llm) as envoy:
            call = envoy.stub.Process(metadata=route_metadata(OPENAI_HOST))
            headers = {
                ":authority": OPENAI_HOST,
                ":path": "/v1/chat/completions",
                ":method": "POST",
            }
            await call.write(
                pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=header_map(headers)))
            )
            first = await call.read()
            assert first.WhichOneof("response") == "request_headers"
            # Envoy configured with request_body_mode NONE: the response comes without the body.
            response = {":status": "200", "content-type": "application/json"}
            await call.write(
                pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers=header_map(response)))
            )
            answer = await call.read()
            assert answer.WhichOneof("response") == "immediate_response"
            assert answer.immediate_response.status.code == 502
            assert b"request_body_mode" in answer.immediate_response.body
            call.cancel()


async def test_ungovernable_body_mode_is_refused_up_front(envoy: Envoy, llm: MockLLM) -> None:
    result = await envoy.request(
        OPENAI_HOST, "/v1/chat/completions", CHAT, response_mode=Mode.BUFFERED_PARTIAL
    )
    assert result.status == 502
    assert b"BUFFERED_PARTIAL" in result.body
    # Refused at the request headers, from the modes Envoy reported: nothing went
    # upstream (with response headers skipped, Warden would never be asked again).
    assert result.pieces == []
    assert llm.requests == []


async def test_observability_mode_is_rejected(envoy: Envoy) -> None:
    call = envoy.stub.Process(metadata=route_metadata(OPENAI_HOST))
    headers = {":authority": OPENAI_HOST, ":path": "/v1/models", ":method": "GET"}
    await call.write(
        pb.ProcessingRequest(
            request_headers=pb.HttpHeaders(headers=header_map(headers), end_of_stream=True),
            observability_mode=True,
        )
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call.read()
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


# -- identity, request-stage decisions, tool results -------------------------------


async def test_warden_headers_are_stripped_and_identity_is_checked(
    envoy: Envoy, llm: MockLLM
) -> None:
    llm.script(Reply(text="ok"))
    result = await envoy.request(
        OPENAI_HOST,
        "/v1/chat/completions",
        CHAT,
        headers={"x-warden-context-customer-id": "C-1"},
    )
    assert result.status == 200
    assert not [k for k in result.forwarded_headers if k.startswith("x-warden-")]

    unproved = await envoy.request(
        OPENAI_HOST, "/v1/chat/completions", CHAT, headers={"x-warden-agent": "someone-else"}
    )
    assert unproved.status == 403
    assert unproved.json()["error"]["code"] == "forbidden"


async def test_kill_switch_refuses_the_model_call_with_its_decision_id(
    envoy: Envoy, llm: MockLLM, warden: Warden
) -> None:
    assert warden.killswitches is not None
    await warden.killswitches.set(Scope.AGENT, "support-triage", "incident 42", "oncall")
    result = await envoy.request(ANTHROPIC_HOST, "/v1/messages", MESSAGES)
    assert result.status == 403
    body = result.json()
    assert body["type"] == "error"
    assert body["error"]["type"] == "permission_error"
    assert result.headers["x-warden-decision-id"].startswith("dec_")
    assert llm.requests == []


async def test_tool_results_sent_back_are_recorded(
    envoy: Envoy, llm: MockLLM, warden: Warden, tmp_path: Path
) -> None:
    llm.script(Reply(tool_calls=[KB]), Reply(text="Use the reset link."))
    first = await envoy.request(OPENAI_HOST, "/v1/chat/completions", CHAT)
    message = first.json()["choices"][0]["message"]
    history = [
        *CHAT["messages"],
        message,
        {"role": "tool", "tool_call_id": message["tool_calls"][0]["id"], "content": "KB-17"},
    ]
    second = await envoy.request(OPENAI_HOST, "/v1/chat/completions", {**CHAT, "messages": history})
    assert second.status == 200
    await warden.stop()
    recs = records(tmp_path)
    decision = next(r for r in recs if r.get("action", {}).get("tool") == "search_kb")
    outcomes = [
        r
        for r in recs
        if r.get("kind") == "outcome" and r.get("decision_id") == decision["decision"]["id"]
    ]
    assert len(outcomes) == 1
    assert "KB-17" in json.dumps(outcomes[0])


async def test_upstream_errors_pass_unchanged_with_the_decision_id(
    envoy: Envoy, llm: MockLLM
) -> None:
    llm.script(Reply(fault="status"))
    result = await envoy.request(OPENAI_HOST, "/v1/chat/completions", CHAT)
    assert result.status == 500
    assert result.immediate is None
    assert result.headers["x-warden-decision-id"].startswith("dec_")
    assert "error" in result.json()


async def test_an_approved_model_call_lets_only_that_request_through(
    tmp_path: Path, llm: MockLLM
) -> None:
    """A deferred approval of one model call (the spend cap asks for one) binds its body:
    a bigger call on the same path is held again, the approved one goes on."""
    dana = {"subject": "dana", "roles": ["approver"], "sha256": sha256(b"tok-dana").hexdigest()}
    config = make_config(
        tmp_path,
        llm.url,
        approvals={"mode": "defer"},
        admin={"tokens": [dana]},
        budgets={"llm": {"limit_usd": 0.000001, "window": "day", "over": "require_approval"}},
    )
    small = {**CHAT, "max_tokens": 5}
    big = {**small, "model": "gpt-4o", "max_tokens": 100000, "n": 8}
    async with Warden(config) as warden:
        assert warden.core is not None
        service = ExtProcService(warden.core, warden.config, killswitches=warden.killswitches)
        async with (
            serve(service, llm) as front,
            aiohttp.ClientSession(
                warden.admin_url, headers={"Authorization": "Bearer tok-dana"}
            ) as admin,
        ):
            deferred = await front.request(OPENAI_HOST, "/v1/chat/completions", small)
            assert deferred.immediate is not None
            async with admin.get("/v1/approvals?status=pending") as resp:
                (pending,) = (await resp.json())["approvals"]
            async with admin.post(f"/v1/approvals/{pending['id']}/approve", json={}) as resp:
                assert resp.status == 200
            llm.script(Reply(text="Hi."))
            other = await front.request(OPENAI_HOST, "/v1/chat/completions", big)
            assert other.immediate is not None  # held again: not what was approved
            assert llm.requests == []
            approved = await front.request(OPENAI_HOST, "/v1/chat/completions", small)
    assert approved.status == 200, approved.body
    assert len(llm.requests) == 1


@pytest.mark.parametrize(("status", "released"), [(504, False), (408, False), (429, True)])
async def test_only_a_provider_refusal_releases_what_a_model_call_holds(
    tmp_path: Path, llm: MockLLM, status: int, released: bool
) -> None:
    """A 5xx may be Envoy's own answer (its route timed out, the upstream reset) after the
    provider ran and billed the call: it keeps the hold. A 4xx is the provider's refusal."""
    config = make_config(tmp_path, llm.url, budgets={"llm": {"limit_usd": 5.0, "window": "day"}})
    async with Warden(config) as warden:
        assert warden.core is not None
        service = ExtProcService(warden.core, warden.config, killswitches=warden.killswitches)
        async with serve(service, llm) as front:
            forged = {"x-warden-blocked": "dec_FORGED"}  # Warden's word, not the upstream's
            llm.script(Reply(fault=Fault("status", status=status, headers=forged)))
            answer = await front.request(OPENAI_HOST, CHAT_PATH, {**CHAT, "max_tokens": 1000})
            assert answer.status == status
            assert "x-warden-blocked" not in {k.lower() for k in answer.headers}
            assert answer.headers["x-warden-decision-id"].startswith("dec_")
            spent, reserved = await wait_for(
                tmp_path, "llm", "agent:support-triage", lambda c: c[1] == 0
            )
    assert (spent == 0) is released


BATCHES_HELD = """package warden

import rego.v1

default decision := {"effect": "allow", "reason": "fine"}

decision := {"effect": "require_approval", "reason": "batches need a lead"} if {
	input.action.path == "/v1/batches"
}
"""


async def test_an_approval_of_a_request_whose_body_is_not_read_lets_no_other_through(
    tmp_path: Path, llm: MockLLM
) -> None:
    """A route forwarded unread (``passthrough``): the body the person approved cannot be
    told from another, so a deferred approval lets nothing through."""
    bundle = tmp_path / "held"
    bundle.mkdir()
    (bundle / "policy.rego").write_text(BATCHES_HELD)
    dana = {"subject": "dana", "roles": ["approver"], "sha256": sha256(b"tok-dana").hexdigest()}
    openai_upstream = {
        "protocol": "openai", "base_url": llm.url, "timeout_s": 5,
        "passthrough": ["POST v1/batches"],
    }  # fmt: skip
    config = make_config(
        tmp_path,
        llm.url,
        upstreams={"openai": openai_upstream},
        policy={"bundles": [str(bundle)], "workers": 1},
        approvals={"mode": "defer"},
        admin={"tokens": [dana]},
    )
    small = {"input_file_id": "file-small", "endpoint": "/v1/chat/completions"}
    huge = {"input_file_id": "file-HUGE", "endpoint": "/v1/chat/completions"}
    async with Warden(config) as warden:
        assert warden.core is not None
        service = ExtProcService(warden.core, warden.config, killswitches=warden.killswitches)
        bearer = {"Authorization": "Bearer tok-dana"}
        async with (
            serve(service, llm) as front,
            aiohttp.ClientSession(warden.admin_url, headers=bearer) as admin,
        ):
            deferred = await front.request(OPENAI_HOST, "/v1/batches", small)
            assert deferred.immediate is not None
            async with admin.get("/v1/approvals?status=pending") as resp:
                (pending,) = (await resp.json())["approvals"]
            async with admin.post(f"/v1/approvals/{pending['id']}/approve", json={}) as resp:
                assert resp.status == 200
            other = await front.request(OPENAI_HOST, "/v1/batches", huge)
    assert other.immediate is not None
    assert llm.requests == []


SESSION_GATE = """package warden

import rego.v1

default decision := {"effect": "allow", "reason": "fine"}

decision := {"effect": "deny", "reason": "this session is closed"} if {
	input.session.id == "ses-closed"
}
"""


async def test_a_request_whose_body_is_not_read_still_names_its_session(
    tmp_path: Path, llm: MockLLM
) -> None:
    """A stored completion fetched by id (its body is not read) is decided in the session
    its ``X-Warden-Session`` names, as through the base URL."""
    bundle = tmp_path / "gate"
    bundle.mkdir()
    (bundle / "policy.rego").write_text(SESSION_GATE)
    config = make_config(tmp_path, llm.url, policy={"bundles": [str(bundle)], "workers": 1})
    async with Warden(config) as warden:
        assert warden.core is not None
        service = ExtProcService(warden.core, warden.config, killswitches=warden.killswitches)
        async with serve(service, llm) as front:
            stored = f"{CHAT_PATH}/chatcmpl-1"
            closed = {"x-warden-session": "ses-closed"}
            refused = await front.request(OPENAI_HOST, stored, method="GET", headers=closed)
    assert refused.immediate is not None
    assert "this session is closed" in refused.body.decode()
    assert llm.requests == []


# -- timeouts ------------------------------------------------------------------------


async def held_through_envoy(
    tmp_path: Path, llm: MockLLM, ext_proc: dict[str, Any], **envoy_options: Any
) -> tuple[Result, Result]:
    """A quick allowed answer, then a call held for a person for 1.5 s, then approved."""
    approver = {
        "subject": "dana",
        "roles": ["approver"],
        "groups": ["support-leads"],  # whom the shipped policy asks to approve closures
        "sha256": sha256(b"tok-dana").hexdigest(),
    }
    config = make_config(
        tmp_path,
        llm.url,
        ext_proc=ext_proc,
        approvals={"mode": "hold"},
        admin={"tokens": [approver]},
    )
    async with Warden(config) as warden:
        assert warden.core is not None
        service = ExtProcService(warden.core, warden.config, killswitches=warden.killswitches)
        async with serve(service, llm, **envoy_options) as front:
            llm.script(Reply(text="Found it.", tool_calls=[KB]))
            quick = await front.request(OPENAI_HOST, "/v1/chat/completions", CHAT)
            llm.script(Reply(text="Closing.", tool_calls=[CLOSE]))
            holding = asyncio.ensure_future(
                front.request(OPENAI_HOST, "/v1/chat/completions", CHAT)
            )
            bearer = {"Authorization": "Bearer tok-dana"}
            async with aiohttp.ClientSession(warden.admin_url, headers=bearer) as admin:
                pending: list[Any] = []
                while not pending and not holding.done():
                    async with admin.get("/v1/approvals?status=pending") as resp:
                        pending = (await resp.json())["approvals"]
                    await asyncio.sleep(0.02)
                await asyncio.sleep(1.5)  # a person takes longer than message_timeout
                if not holding.done():
                    async with admin.post(f"/v1/approvals/{pending[0]['id']}/approve") as resp:
                        assert resp.status == 200
            held = await holding
    return quick, held


def extensions_counted() -> float:
    return REGISTRY.get_sample_value("warden_ext_proc_timeout_extensions_total") or 0.0


async def test_held_call_asks_envoy_for_more_time_once(tmp_path: Path, llm: MockLLM) -> None:
    before = extensions_counted()
    # Envoy gives each answer 1 s and the person takes 1.5 s: without the
    # override the held answer would time out (TimeoutError in Envoy's stand-in).
    quick, held = await held_through_envoy(
        tmp_path,
        llm,
        {"max_message_timeout_s": 30, "extend_after_ms": 500},
        message_timeout=1.0,
        max_message_timeout=30.0,
    )
    assert quick.extensions == []  # answered in time: nothing asked
    assert [c.function.name for c in tool_calls(quick)] == ["search_kb"]
    # Exactly one override, for the response body that held the call, before its answer.
    assert held.extensions == [30.0]
    assert held.status == 200
    assert [c.function.name for c in tool_calls(held)] == ["close_account"]  # approved
    assert extensions_counted() == before + 1


async def test_no_extension_unless_configured(tmp_path: Path, llm: MockLLM) -> None:
    _, held = await held_through_envoy(tmp_path, llm, {})
    assert held.extensions == []
    assert [c.function.name for c in tool_calls(held)] == ["close_account"]


async def test_without_extension_envoy_times_a_held_answer_out(
    tmp_path: Path, llm: MockLLM
) -> None:
    # What the setting is for: Envoy's message_timeout ends a held answer.
    with pytest.raises(TimeoutError):
        await held_through_envoy(tmp_path, llm, {}, message_timeout=1.0)


def tool_calls(result: Result) -> list[Any]:
    completion = openai.types.chat.ChatCompletion.model_validate(result.json())
    calls = completion.choices[0].message.tool_calls or []
    return [c for c in calls if c.type == "function"]


async def test_under_a_cap_an_unbounded_model_call_goes_with_the_bound_it_is_held_at(
    tmp_path: Path, llm: MockLLM
) -> None:
    """As through the base URL: held at ``unbounded_output_tokens``, sent with it; in
    observe mode, which enforces no cap, sent as written."""
    capped = {"llm": {"limit_usd": 5.0, "unbounded_output_tokens": 3000}}
    for mode, written in (("enforce", 3000), ("observe", None)):
        config = make_config(tmp_path / mode, llm.url, budgets=capped, mode=mode)
        async with Warden(config) as w:
            assert w.core is not None
            service = ExtProcService(w.core, w.config, killswitches=w.killswitches)
            async with serve(service, llm) as front:
                llm.script(Reply(text="ok"))
                body = orjson.dumps({"model": "gpt-4o-mini", "messages": MESSAGES["messages"]})
                result = await front.request(OPENAI_HOST, "/v1/chat/completions", raw_body=body)
        assert result.status == 200
        assert orjson.loads(result.forwarded_body).get("max_completion_tokens") == written
        assert llm.requests[-1].body.get("max_completion_tokens") == written


@pytest.mark.parametrize("scope", [Scope.TOOL, Scope.AGENT])
async def test_a_switch_thrown_while_a_sibling_is_held_keeps_the_chunks_allowed_call(
    tmp_path: Path, llm: MockLLM, scope: Scope
) -> None:
    # One chunk: a lookup allowed, then a refund held for a person. Nothing of the
    # chunk has reached Envoy while the refund waits; a switch thrown meanwhile on
    # the lookup (or the agent) must keep the lookup from going out with it.
    lead = Principal("dana", frozenset({"approver", "support-leads"}))
    refund = Call("issue_refund", {"order_id": "A-1003", "amount": 450, "currency": "USD"})
    llm.script(Reply(tool_calls=[Call("get_order", {"order_id": "A-1"}), refund]))
    async with Warden(make_config(tmp_path, llm.url, approvals={"mode": "hold"})) as warden:
        assert warden.core is not None
        assert warden.killswitches is not None
        approvals = warden._approvals
        assert approvals is not None
        service = ExtProcService(warden.core, warden.config, killswitches=warden.killswitches)
        async with serve(service, llm) as front:
            body = {**CHAT, "stream": True}
            asked = asyncio.create_task(
                front.request(
                    OPENAI_HOST, CHAT_PATH, body, response_mode=Mode.STREAMED, chunk_size=10**7
                )
            )
            async with asyncio.timeout(10):
                while not await approvals.list("pending"):  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
            target = "get_order" if scope is Scope.TOOL else "support-triage"
            await warden.killswitches.set(scope, target, "lookups leak data", "oncall")
            for held in await approvals.list("pending"):
                await approvals.decide(held.id, lead, approve=True, comment="ok")
            result = await asyncio.wait_for(asked, 20)
    proposed = [
        call["function"]["name"]
        for event in sse_data(result.body)
        for choice in event.get("choices", [])
        for call in (choice.get("delta") or {}).get("tool_calls") or []
        if (call.get("function") or {}).get("name")
    ]
    assert proposed == []
    assert b'"code":"killed"' in result.body


class _Mislabelled(LoopbackServer):
    """Answers every request with a whole completion labelled ``text/event-stream``."""

    def _routes(self, app: web.Application) -> None:
        app.router.add_route("*", "/{tail:.*}", self._any)

    async def _any(self, request: web.Request) -> web.Response:
        await request.read()
        calls = [Call("search_kb", {"query": "x"}), Call("export_customers", {})]
        tool_calls = [
            {"id": f"call_{i}", "type": "function", "function": {"name": c.name, "arguments": "{}"}}
            for i, c in enumerate(calls)
        ]
        message = {"role": "assistant", "content": None, "tool_calls": tool_calls}
        body = {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 1,
            "model": "gpt-4o-mini",
            "choices": [{"index": 0, "finish_reason": "tool_calls", "message": message}],
        }
        return web.Response(body=json.dumps(body), headers={"Content-Type": "text/event-stream"})


@pytest.mark.parametrize("mode", [Mode.BUFFERED, Mode.STREAMED])
async def test_an_answer_labelled_as_a_stream_for_a_request_that_asked_for_none_is_read_whole(
    tmp_path: Path, mode: int
) -> None:
    # Both SDKs pick stream-or-not from their own request: read as a stream, the
    # answer reached the agent as a bare string typed as a completion.
    async with _Mislabelled() as upstream, Warden(make_config(tmp_path, upstream.url)) as w:
        assert w.core is not None
        service = ExtProcService(w.core, w.config, killswitches=w.killswitches)
        async with (
            serve(service, upstream) as front,  # type: ignore[arg-type]
            envoy_front(front, OPENAI_HOST, mode) as url,
            openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0) as client,
        ):
            got = await client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
            )
    assert [c.id for c in got.choices[0].message.tool_calls or []] == ["call_0"]
    assert decisions(tmp_path)["export_customers"]["decision"]["enforced"] == "deny"


async def test_a_stream_envoy_keeps_open_ends_within_the_grace_period(tmp_path: Path) -> None:
    # Envoy holds an ext_proc stream open while the provider answers. The service waited
    # the grace for it, and only then did the gRPC server's own stop wait the grace again.
    config = make_config(
        tmp_path, "http://127.0.0.1:9", shutdown_grace_s=4, listen={"grpc": "127.0.0.1:0"}
    )
    warden = Warden(config)
    await warden.start()
    async with grpc.aio.insecure_channel(warden.grpc_address) as channel:
        call = pb_grpc.ExternalProcessorStub(channel).Process(metadata=route_metadata(OPENAI_HOST))
        headers = {":authority": OPENAI_HOST, ":path": "/v1/models", ":method": "GET"}
        request = pb.HttpHeaders(headers=header_map(headers), end_of_stream=True)
        await call.write(pb.ProcessingRequest(request_headers=request))
        assert (await call.read()).WhichOneof("response") == "request_headers"
        started = time.monotonic()
        await warden.stop()
        took = time.monotonic() - started
        call.cancel()
    assert 3 < took < 6.5, took  # the grace, not twice it
