"""Property tests through the ext_proc door: generated answers, cut anywhere, as Envoy sends them.

In a mesh the agent never talks to Warden: Envoy sends Warden the request,
then the upstream's answer in whatever pieces the network made of it, and
applies Warden's answer to each piece. Here the answers of
``test_properties.py`` (allowed and denied calls, odd ids, unknown call
types, extra fields, lenient literals, late deltas) are cut at random and
fed to one :class:`~warden.ingress.envoy_proc.ExtProcService` on the suite's
Warden, in the order Envoy sends them: ``STREAMED`` response bodies (a JSON
answer switched to ``BUFFERED`` as Envoy does with ``allow_mode_override``)
or ``FULL_DUPLEX_STREAMED`` ones.
What the agent would receive is read by the official SDKs. The invariants
are the base-URL door's, which is the point: one core, the same guarantees.

(a) no denied tool (and no call of an unknown type) reaches the agent;
(b) every call the SDK parsed has its allow record with the same arguments;
(c) no byte of a call leaves Warden before its decision is recorded: checked
    on every answer Warden gives, against the audit log at that moment.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import anthropic
import httpx2
import openai
import orjson
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.adversarial import wire
from tests.adversarial.conftest import (
    API_KEY,
    CASE_HEADER,
    Harness,
    chat_messages,
    new_case,
)
from tests.adversarial.test_properties import (
    PROPERTY,
    SDK_ERRORS,
    UNKNOWN,
    anthropic_body,
    anthropic_content,
    anthropic_events,
    calls,
    chat_events,
    chat_tool_calls,
    check,
    decided,
    delivery,
)
from tests.functional.test_envoy_proc_functional import Mode, body_of, header_map
from warden.config import ExtProcConfig
from warden.ingress.envoy_proc import ExtProcService
from warden.testing.raw_upstream import split_at, sse_bytes

EXAMPLES = int(os.environ.get("WARDEN_ADVERSARIAL_EXAMPLES", "2000")) // 2
EXT_PROC = settings(PROPERTY, max_examples=EXAMPLES)
OPENAI_HOST = "api.openai.com"
ANTHROPIC_HOST = "api.anthropic.com"
ROUTED = {OPENAI_HOST: "openai", ANTHROPIC_HOST: "anthropic"}
"""Each host's upstream, as Envoy's routes name it."""
modes = st.sampled_from([Mode.STREAMED, Mode.FULL_DUPLEX_STREAMED])
# A call's name as it appears in a chunk the agent receives (argument text is escaped).
NAME = re.compile(rb'"name"\s*:\s*"([^"\\]*)"')


@pytest.fixture(scope="module")
def proc(harness: Harness) -> ExtProcService:
    config = harness.warden.config.model_copy(update={"ext_proc": ExtProcConfig()})
    assert harness.warden.core is not None
    return ExtProcService(harness.warden.core, config, killswitches=harness.warden.killswitches)


@dataclass
class Received:
    """What the agent gets once Envoy applied every answer of Warden's."""

    status: int
    body: bytes
    names: list[str]
    """Every call name in the bytes released, in order."""


def through_envoy(
    h: Harness,
    proc: ExtProcService,
    case: str,
    host: str,
    path: str,
    request: dict[str, Any],
    answer: tuple[str, bytes],
    cuts: list[int],
    mode: int = Mode.STREAMED,
) -> Received:
    """One exchange as Envoy drives it; (c) is checked on each body answer as it comes.

    ``mode``: the response body mode Envoy is configured with (``STREAMED``,
    which Warden switches to ``BUFFERED`` for a JSON answer, or
    ``FULL_DUPLEX_STREAMED``, answered with ``streamed_response`` chunks).
    """
    content_type, body = answer
    duplex = mode == Mode.FULL_DUPLEX_STREAMED

    async def exchange() -> Received:
        answers: list[Any] = []
        pending: list[bytes] = []  # response pieces sent, not yet answered
        released = bytearray()
        names: list[str] = []

        async def send(reply: Any) -> None:
            answers.append(reply)
            if reply.WhichOneof("response") != "response_body":
                return
            if duplex:  # released as Warden decides, not one answer per piece
                mutation = reply.response_body.response.body_mutation
                released.extend(mutation.streamed_response.body)
            else:
                released.extend(body_of(reply, "response_body", pending.pop(0)))
            counts: Counter[str] = Counter()
            for found in NAME.finditer(released):
                name = found.group(1).decode()
                counts[name] += 1
                decided(h, case, name, counts[name])  # (c), at the moment it is released
            names[:] = list(counts.elements())

        async def messages() -> AsyncIterator[Any]:
            headers = {
                ":authority": host,
                ":path": path,
                ":method": "POST",
                ":scheme": "https",
                "content-type": "application/json",
                "authorization": f"Bearer {API_KEY}",
                CASE_HEADER: case,
            }
            first = pb.ProcessingRequest(
                request_headers=pb.HttpHeaders(headers=header_map(headers))
            )
            first.protocol_config.request_body_mode = Mode.BUFFERED
            first.protocol_config.response_body_mode = mode
            yield first
            data = orjson.dumps(request)
            yield pb.ProcessingRequest(request_body=pb.HttpBody(body=data, end_of_stream=True))
            status = {":status": "200", "content-type": content_type}
            yield pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers=header_map(status)))
            override = answers[-1].mode_override.response_body_mode
            whole = override == Mode.BUFFERED and not duplex  # as allow_mode_override does
            pieces = [body] if whole else split_at(body, cuts)
            for i, piece in enumerate(pieces):
                pending.append(piece)
                last = i == len(pieces) - 1
                yield pb.ProcessingRequest(
                    response_body=pb.HttpBody(body=piece, end_of_stream=last)
                )

        # Envoy's route names the upstream, as deploy/envoy/envoy.yaml does.
        await proc.process(messages(), send, ROUTED[host])
        refused = [a for a in answers if a.WhichOneof("response") == "immediate_response"]
        if refused:
            return Received(refused[0].immediate_response.status.code, b"", [])
        return Received(200, bytes(released), names)

    return h.run(exchange())


def sdk(make: Callable[..., Any], received: Received, content_type: str) -> Any:
    """An official SDK client whose transport answers with what the agent received."""

    def handler(request: httpx2.Request) -> httpx2.Response:
        headers = {"content-type": content_type}
        return httpx2.Response(received.status, content=received.body, headers=headers)

    http = httpx2.Client(transport=httpx2.MockTransport(handler))
    return make(api_key=API_KEY, base_url="http://agent.test", http_client=http, max_retries=0)


# -- OpenAI chat -----------------------------------------------------------------------


@EXT_PROC
@given(cs=calls(), how=delivery(), mode=modes)
def test_openai_chat(
    harness: Harness, proc: ExtProcService, cs: Any, how: dict[str, Any], mode: int
) -> None:
    case = new_case()
    late = bool(how["late"] and how["stream"] and cs)
    if how["stream"]:
        answer = ("text/event-stream", sse_bytes(chat_events(cs, how, late=late), done=True))
    else:
        body = wire.chat_body(chat_tool_calls(cs, how), "ok", "tool_calls" if cs else "stop")
        answer = ("application/json", orjson.dumps(body))
    request = {"model": wire.MODEL, "messages": chat_messages(case), "stream": how["stream"]}
    received = through_envoy(
        harness, proc, case, OPENAI_HOST, "/v1/chat/completions", request, answer, how["cuts"], mode
    )

    parsed: list[tuple[str, Any]] = []
    raised = False
    try:
        with sdk(openai.OpenAI, received, answer[0]) as client:
            if how["stream"]:
                with client.chat.completions.stream(model=wire.MODEL, messages=[]) as s:
                    final = s.get_final_completion()
            else:
                final = client.chat.completions.create(model=wire.MODEL, messages=[])
        for tc in final.choices[0].message.tool_calls or []:
            if tc.type != "function":
                received.names.append(UNKNOWN)
                continue
            parsed.append((tc.function.name, json.loads(tc.function.arguments)))
    except SDK_ERRORS:
        raised = True
    assert raised or not late, "a late fragment did not end the stream with an error"
    check(harness, case, parsed, received.names, raised)


# -- Anthropic Messages ----------------------------------------------------------------


@EXT_PROC
@given(cs=calls(), how=delivery(), mode=modes)
def test_anthropic_messages(
    harness: Harness, proc: ExtProcService, cs: Any, how: dict[str, Any], mode: int
) -> None:
    case = new_case()
    content = anthropic_content(cs, how)
    late = bool(how["late"] and how["stream"] and cs)
    if how["stream"]:
        answer = ("text/event-stream", sse_bytes(anthropic_events(content, how, late=late)))
    else:
        answer = ("application/json", anthropic_body(content))
    request = {
        "model": wire.CLAUDE,
        "max_tokens": 10,
        "messages": [{"role": "user", "content": case}],
        "stream": how["stream"],
    }
    received = through_envoy(
        harness, proc, case, ANTHROPIC_HOST, "/v1/messages", request, answer, how["cuts"], mode
    )

    parsed: list[tuple[str, Any]] = []
    raised = False
    try:
        with sdk(anthropic.Anthropic, received, answer[0]) as client:
            if how["stream"]:
                with client.messages.stream(model=wire.CLAUDE, max_tokens=10, messages=[]) as s:
                    message = s.get_final_message()
            else:
                message = client.messages.create(model=wire.CLAUDE, max_tokens=10, messages=[])
        for b in message.content:
            if b.type == "tool_use":
                parsed.append((b.name, b.input))
            elif b.type == "teleport_use":
                received.names.append(UNKNOWN)
    except SDK_ERRORS:
        raised = True
    assert raised or not late, "a late input delta did not end the stream with an error"
    check(harness, case, parsed, received.names, raised)
