"""Property tests through the MCP door: generated ``tools/call`` requests, as any client may send.

An MCP client speaks to Warden directly, so here the attacker writes the
request: hypothesis generates JSON-RPC bodies with one ``tools/call`` or a
batch of them (tools the suite's policy allows and denies, arguments with
lenient literals such as ``NaN`` or integers past 64 bits, a key given
twice, odd ids, a notification beside them) and POSTs them to Warden's
streamable-HTTP door over real HTTP. The MCP server is the suite's raw
upstream, which answers every call it receives and records it. Every case
must keep:

(a) no call of a denied tool reaches the server, and every call the client
    sent gets exactly one answer (a result, or a tool error saying why);
(b) every call the server received has exactly one allow record with the
    very arguments the server got (canonical JSON), and nothing allowed was
    left unsent;
(c) no call reaches the server before its decision is recorded: checked by
    the server itself, against the audit log, when the call arrives.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any

import httpx2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.adversarial.conftest import CASE_HEADER, Harness, is_denied, new_case
from tests.adversarial.test_properties import (
    PROPERTY,
    allowed_calls,
    call_keys,
    calls,
    decided,
)
from warden.testing.raw_upstream import RawReply, RawRequest

EXAMPLES = int(os.environ.get("WARDEN_ADVERSARIAL_EXAMPLES", "2000")) // 4
MCP = settings(PROPERTY, max_examples=EXAMPLES)
ACCEPT = "application/json, text/event-stream"


@pytest.fixture(scope="module")
def client(harness: Harness) -> Any:
    with httpx2.Client(base_url=harness.proxy_url, timeout=30) as http:
        yield http


@st.composite
def requests(draw: st.DrawFn) -> list[tuple[str, str, str]]:
    """(tool name, arguments text, id text) per ``tools/call``; a text may repeat a key."""
    out = []
    for name, text, _ in draw(calls(max_calls=3)):
        args = text
        given = json.loads(text)  # Python's parser reads the lenient literals too
        if draw(st.integers(0, 5)) == 0 and given:
            # The same key twice: which value would the server's parser keep?
            key = json.dumps(next(iter(given)))
            args = "{" + f"{key}: {draw(st.sampled_from(['1', 'null', '[2]']))}, " + text[1:]
        out.append((name, args, draw(st.sampled_from(["str", "int"]))))
    return out


def _body(case: str, members: list[tuple[str, str, str]], batch: bool, note: bool) -> bytes:
    texts = []
    for i, (name, args, kind) in enumerate(members):
        rpc_id = json.dumps(f"{case}-{i}") if kind == "str" else str(i)
        # The case id rides in _meta too, so the server finds its case whatever the id.
        meta = json.dumps({"case": case})
        params = f'{{"name": {json.dumps(name)}, "arguments": {args}, "_meta": {meta}}}'
        texts.append(
            f'{{"jsonrpc": "2.0", "id": {rpc_id}, "method": "tools/call", "params": {params}}}'
        )
    if note:
        params = json.dumps({"_meta": {"case": case}})
        texts.append(
            f'{{"jsonrpc": "2.0", "method": "notifications/progress", "params": {params}}}'
        )
    text = f"[{', '.join(texts)}]" if batch or len(texts) != 1 else texts[0]
    return text.encode()


def _server(h: Harness, case: str, received: list[tuple[str, Any]]) -> Any:
    """The MCP server's answer: a result for every call, after checking (c)."""

    def reply(req: RawRequest) -> RawReply:
        body = req.json()
        members = body if isinstance(body, list) else [body]
        answers = []
        counts: Counter[str] = Counter()
        for m in members:
            if m.get("method") != "tools/call":
                continue
            name, args = m["params"]["name"], m["params"].get("arguments")
            counts[name] += 1
            decided(h, case, name, counts[name])  # (c): the record exists as it arrives
            received.append((name, args))
            result = {"content": [{"type": "text", "text": "done"}], "isError": False}
            answers.append({"jsonrpc": "2.0", "id": m["id"], "result": result})
        if not answers:  # notifications only: accepted, nothing to answer
            return RawReply(status=202, body=b"", content_type="application/json")
        out = answers if isinstance(body, list) else answers[0]
        return RawReply(body=json.dumps(out).encode(), content_type="application/json")

    return reply


@MCP
@given(members=requests(), batch=st.booleans(), note=st.booleans())
def test_tools_call(
    harness: Harness, client: Any, members: list[tuple[str, str, str]], batch: bool, note: bool
) -> None:
    if not members:
        return
    case = new_case()
    received: list[tuple[str, Any]] = []
    harness.answer(case, _server(harness, case, received))
    body = _body(case, members, batch, note)
    headers = {"Content-Type": "application/json", "Accept": ACCEPT, CASE_HEADER: case}
    response = client.post("/tools", content=body, headers=headers)
    harness.replies.pop(case, None)  # not called when Warden answered everything itself

    assert response.status_code in (200, 202, 400), response.text
    answers = _answers(response)
    # (a) a denied tool never reached the server; each call got one answer.
    for name, _ in received:
        assert not is_denied(name), f"denied tool {name!r} reached the MCP server"
    if response.status_code == 200:
        ids = Counter(str(a.get("id")) for a in answers)
        assert all(n == 1 for n in ids.values()), f"answers repeat an id: {ids}"
        assert len(answers) == len(members), (members, answers)
    # (b) what the server ran is exactly what was allowed, arguments and all.
    allowed, ran = allowed_calls(harness, case), call_keys(harness, received)
    assert ran == allowed, f"the server ran {ran}, the allow records say {allowed}"


def _answers(response: Any) -> list[dict[str, Any]]:
    if response.status_code == 202 or not response.content:
        return []
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        out = []
        for line in response.text.splitlines():
            if line.startswith("data:"):
                out.append(json.loads(line[5:]))
        flat: list[dict[str, Any]] = []
        for item in out:
            flat.extend(item if isinstance(item, list) else [item])
        return flat
    doc = response.json()
    return doc if isinstance(doc, list) else [doc]
