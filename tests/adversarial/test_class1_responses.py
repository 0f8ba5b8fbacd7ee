"""Class 1: every response an SDK can read a tool call from is parsed and decided, or blocked.

A crafted upstream answers with 2xx statuses other than 200, redirects, stored
objects fetched with GET, and the proxy is reached through encoded paths.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import openai
import pytest

from tests.adversarial import wire
from tests.adversarial.conftest import (
    API_KEY,
    Harness,
    case_headers,
    chat_messages,
    new_case,
)
from warden.testing.raw_upstream import RawReply

EXPORT_ARGS = {"format": "csv", "all": True}


def parsed_tool_names(completion: Any) -> list[str]:
    names: list[str] = []
    for choice in completion.choices:
        for tc in choice.message.tool_calls or []:
            fn = getattr(tc, "function", None) or getattr(tc, "custom", None)
            assert fn is not None
            names.append(fn.name)
    return names


def streamed(oai: openai.OpenAI, case: str) -> Any:
    """The final completion the SDK's stream helper assembles for ``case``."""
    with oai.chat.completions.stream(
        model=wire.MODEL,
        messages=chat_messages(case),  # type: ignore[arg-type]
        extra_headers=case_headers(case),
    ) as stream:
        return stream.get_final_completion()


def denied_record(h: Harness, case: str, tool: str) -> bool:
    return any(
        r["action"]["tool"] == tool and r["decision"]["enforced"] == "deny"
        for r in h.audit.decisions(case)
    )


@pytest.mark.parametrize("status", [201, 203, 206])
def test_non_200_json_body_with_a_call_is_decided(
    harness: Harness, oai: openai.OpenAI, status: int
) -> None:
    case = new_case()
    body = wire.chat_body(
        [
            wire.chat_call("search_kb", {"q": "x"}, "c1"),
            wire.chat_call("export_customers", EXPORT_ARGS, "c2"),
        ]
    )
    harness.answer(case, RawReply.json(body, status=status))
    completion = oai.chat.completions.create(
        model=wire.MODEL,
        messages=chat_messages(case),  # type: ignore[arg-type]
        extra_headers=case_headers(case),
    )
    assert parsed_tool_names(completion) == ["search_kb"]
    assert denied_record(harness, case, "export_customers")


@pytest.mark.parametrize("status", [201, 203])
def test_non_200_event_stream_with_a_call_is_decided(
    harness: Harness, oai: openai.OpenAI, status: int
) -> None:
    case = new_case()
    events = wire.chat_stream(wire.chat_call_chunks(0, "export_customers", EXPORT_ARGS, "c1"))
    harness.answer(case, RawReply.sse(events, status=status, done=True))
    names = parsed_tool_names(streamed(oai, case))
    assert "export_customers" not in names
    assert denied_record(harness, case, "export_customers")


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_upstream_redirect_is_never_relayed(
    harness: Harness, oai: openai.OpenAI, status: int
) -> None:
    case = new_case()
    elsewhere = new_case()
    # The redirect points at a place that would answer with a denied call.
    harness.answer(
        case,
        RawReply(
            status=status,
            headers=[("Location", f"{harness.upstream.url}/v1/chat/completions?x={elsewhere}")],
        ),
    )
    harness.answer(
        elsewhere, RawReply.json(wire.chat_body([wire.chat_call("export_customers", EXPORT_ARGS)]))
    )
    with pytest.raises(openai.APIStatusError) as info:
        oai.chat.completions.create(
            model=wire.MODEL,
            messages=chat_messages(case),  # type: ignore[arg-type]
            extra_headers=case_headers(case),
        )
    assert info.value.status_code == 502
    assert "location" not in {k.lower() for k in info.value.response.headers}
    assert elsewhere in harness.replies  # never fetched, by Warden or by the SDK


def test_stored_chat_completion_get_is_decided_or_refused(
    harness: Harness, oai: openai.OpenAI
) -> None:
    case = new_case()
    body = wire.chat_body([wire.chat_call("export_customers", EXPORT_ARGS)])
    harness.answer(case, RawReply.json(body))
    refused: int | None
    try:
        completion = oai.chat.completions.retrieve(case, extra_headers=case_headers(case))
    except openai.APIStatusError as exc:
        refused = exc.status_code
    else:
        refused = None
    if refused is not None:
        assert refused in (403, 404, 502)  # refused: fine, nothing reached the agent
        return
    assert "export_customers" not in parsed_tool_names(completion)
    assert denied_record(harness, case, "export_customers")


async def _raw(
    harness: Harness, method: str, target: str, case: str, body: bytes | None = None
) -> tuple[int, bytes]:
    # yarl would normalise %69 to "i" and collapse dot segments: send the target as is.
    reader, writer = await asyncio.open_connection("127.0.0.1", harness.warden_port)
    head = (
        f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\n"
        f"X-Warden-Context-Case: {case}\r\nConnection: close\r\n"
    )
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    writer.write(head.encode() + b"\r\n" + (body or b""))
    await writer.drain()
    raw = await reader.read()
    writer.close()
    status_line, _, rest = raw.partition(b"\r\n")
    _, _, payload = rest.partition(b"\r\n\r\n")
    return int(status_line.split()[1]), payload


def _request_body(case: str) -> bytes:
    return json.dumps({"model": wire.MODEL, "messages": chat_messages(case)}).encode()


def test_percent_encoded_route_reaches_the_adapter(harness: Harness) -> None:
    case = new_case()
    harness.answer(
        case, RawReply.json(wire.chat_body([wire.chat_call("export_customers", EXPORT_ARGS)]))
    )
    status, payload = harness.run(
        _raw(harness, "POST", "/openai/v1/chat/complet%69ons", case, _request_body(case))
    )
    assert b"export_customers" not in payload or b'"tool_calls"' not in payload
    if 200 <= status < 300:
        assert denied_record(harness, case, "export_customers")
        llm = [r for r in harness.audit.records(case) if r["action"]["kind"] == "llm_call"]
        assert llm
        assert llm[0]["action"]["request"]["path"] == "/v1/chat/completions"


@pytest.mark.parametrize(
    "target",
    [
        "/openai/v1/chat%2Fcompletions",
        "/openai/v1/chat%2fcompletions",
        "/openai/v1/x/../chat/completions",
        "/openai/v1/x/%2e%2e/chat/completions",
        "/openai/v1/./chat/completions",
        "/openai/v1/chat/completions%2F..%2F..%2Fresponses",
        "/openai/v1/chat/complet%2569ons",
    ],
)
def test_encoded_slashes_and_dot_segments_are_refused(harness: Harness, target: str) -> None:
    case = new_case()
    harness.answer(
        case, RawReply.json(wire.chat_body([wire.chat_call("export_customers", EXPORT_ARGS)]))
    )
    status, payload = harness.run(_raw(harness, "POST", target, case, _request_body(case)))
    assert 400 <= status < 500
    assert b"export_customers" not in payload
    assert case in harness.replies  # the upstream was never asked


@pytest.mark.parametrize(
    ("method", "tail"),
    [
        ("POST", "/openai/v1/threads/runs"),
        ("POST", "/openai/v1/assistants"),
        ("POST", "/anthropic/v1/complete"),
    ],
)
def test_unparsed_llm_route_is_refused_by_default(harness: Harness, method: str, tail: str) -> None:
    case = new_case()
    harness.answer(
        case, RawReply.json(wire.chat_body([wire.chat_call("export_customers", EXPORT_ARGS)]))
    )
    status, payload = harness.run(_raw(harness, method, tail, case, _request_body(case)))
    assert 400 <= status < 500, payload
    assert case in harness.replies


_EVIL_MESSAGE = {
    "role": "assistant",
    "content": None,
    "tool_calls": [wire.chat_call("export_customers", EXPORT_ARGS, "call_x")],
}


def _chunk(choices: list[dict[str, Any]], obj: str = "chat.completion.chunk") -> dict[str, Any]:
    return {"id": "c", "object": obj, "created": 1, "model": wire.MODEL, "choices": choices}


@pytest.mark.parametrize(
    "chunks",
    [
        # The helper's first snapshot keeps, as sent, a position no choice's index names.
        [
            _chunk(
                [
                    {"index": 0, "delta": {"role": "assistant", "content": "hi"}},
                    {"index": 0, "delta": {}, "message": _EVIL_MESSAGE},
                ]
            ),
            _chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}]),
        ],
        # A chunk the helper skips ("object": "") counts choice 0 as seen for no one.
        [
            _chunk([{"index": 0, "delta": {"role": "assistant"}}], obj=""),
            _chunk(
                [
                    {"index": 1, "delta": {}, "message": _EVIL_MESSAGE},
                    {"index": 1, "delta": {"content": ""}},
                ]
            ),
            _chunk([{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]),
        ],
    ],
    ids=["repeated-index", "skipped-chunk"],
)
def test_a_call_smuggled_into_the_stream_helpers_snapshot_is_refused(
    harness: Harness, oai: openai.OpenAI, chunks: list[dict[str, Any]]
) -> None:
    case = new_case()
    harness.answer(case, RawReply.sse([(None, c) for c in chunks], done=True))
    # Without the refusal the helper hands the agent export_customers, never decided.
    with pytest.raises(openai.APIError, match="message|twice|choice 1 in an answer"):
        streamed(oai, case)


def test_a_call_in_a_chunk_the_stream_helper_skips_is_refused(
    harness: Harness, oai: openai.OpenAI
) -> None:
    case = new_case()
    start, *rest = wire.chat_call_chunks(0, "search_kb", {"q": "x"}, "c1")
    skipped = (start[0], {**start[1], "object": ""})
    harness.answer(case, RawReply.sse(wire.chat_stream([skipped, *rest]), done=True))
    with pytest.raises(openai.APIError, match="not a chat.completion.chunk"):
        for _ in oai.chat.completions.create(
            model=wire.MODEL,
            messages=chat_messages(case),  # type: ignore[arg-type]
            extra_headers=case_headers(case),
            stream=True,
        ):
            pass


def _in_choice(event: wire.Event, choice: int) -> wire.Event:
    name, chunk = event
    return name, {**chunk, "choices": [{**chunk["choices"][0], "index": choice}]}


@pytest.mark.parametrize("n", [1, 2])
def test_a_choice_the_request_did_not_ask_for_is_refused(
    harness: Harness, oai: openai.OpenAI, n: int
) -> None:
    """Frameworks that read ``choices[0]`` of every chunk (LangChain) merge a second
    choice's call into the first's: ``dan`` + ``ger_wipe``, a call nobody decided."""
    case = new_case()
    first = wire.chat_call_chunks(0, "search_kb", {"q": "a"}, "call_1")
    second = [_in_choice(e, 1) for e in wire.chat_call_chunks(0, "lookup_order", {}, "call_1")]
    harness.answer(case, RawReply.sse(wire.chat_stream([*first, *second]), done=True))

    def run() -> list[Any]:
        chunks = oai.chat.completions.create(
            model=wire.MODEL,
            messages=chat_messages(case),  # type: ignore[arg-type]
            extra_headers=case_headers(case),
            stream=True,
            n=n,
        )
        return list(chunks)

    if n == 1:
        with pytest.raises(openai.APIError, match="choice 1 in an answer to a request for 1"):
            run()
    else:  # asked for: each choice is decided on its own
        indexes = {c.index for chunk in run() for c in chunk.choices}
        assert indexes == {0, 1}


@pytest.mark.parametrize("stream", [False, True], ids=["body", "stream"])
@pytest.mark.parametrize("shared", ["id", "call_id"])
def test_two_calls_sharing_an_item_or_call_id_are_refused(
    harness: Harness, oai: openai.OpenAI, stream: bool, shared: str
) -> None:
    """LangChain pins an item id to the output it first saw, and merges chunks of one call
    id: two calls sharing either become ``dan`` + ``ger_wipe``, which nobody decided."""
    case = new_case()
    first = wire.fn_item("search_kb", {"q": "a"}, call_id="call_1", item_id="fc_1")
    second = wire.fn_item(
        "lookup_order",
        {},
        call_id="call_1" if shared == "call_id" else "call_2",
        item_id="fc_1" if shared == "id" else "fc_2",
    )
    if stream:
        harness.answer(case, RawReply.sse(wire.responses_stream([first, second])))
    else:
        harness.answer(case, RawReply.json(wire.response_body([first, second])))

    def ask() -> None:
        headers = case_headers(case)
        if stream:
            for _ in oai.responses.create(
                model=wire.MODEL, input=case, extra_headers=headers, stream=True
            ):
                pass
        else:
            oai.responses.create(model=wire.MODEL, input=case, extra_headers=headers)

    with pytest.raises(openai.APIError, match=f"{shared} 'c|{shared} 'f|merge"):
        ask()
