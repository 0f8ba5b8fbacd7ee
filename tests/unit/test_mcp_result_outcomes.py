"""What the record of an MCP call keeps of the server's answer (``mcp.result_outcome``).

The record must hold what the client gets: a task handle is no completed call, and a
tool result's ``structuredContent`` or non-text content (what the agent's code and
model read) is no less part of it than its text.
"""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest

from warden.audit.record import MAX_RESULT_CHARS, REDACTED, outcome_body
from warden.model import Outcome
from warden.protocols import mcp


def answer(result: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": 1, "result": result}


ORDER = {"order_id": "A-1", "amount": 5.0}


def text_block(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


# -- task handles ---------------------------------------------------------------


def test_a_2025_11_25_task_handle_is_accepted_not_completed() -> None:
    # CreateTaskResult (mcp_types 2025-11-25): {"task": Task}, no resultType.
    task = {"taskId": "t-1", "status": "working", "createdAt": "2026-01-01T00:00:00Z",
            "lastUpdatedAt": "2026-01-01T00:00:00Z", "ttl": 60000}  # fmt: skip
    outcome = mcp.result_outcome(answer({"task": task}))
    assert (outcome.status, outcome.error, outcome.is_error) == (mcp.ACCEPTED, None, False)
    assert outcome.result is not None
    assert orjson.loads(outcome.result) == {"task": task}


def test_a_task_handle_with_result_type_is_still_accepted() -> None:
    handle = {"resultType": "task", "task": {"taskId": "t-1", "status": "working"}}
    assert mcp.result_outcome(answer(handle)).status == mcp.ACCEPTED


def test_a_result_saying_it_is_complete_is_no_task_handle() -> None:
    # A 2026-07-28 client reads resultType first: this is a tool result to it.
    done = {"resultType": "complete", "content": [text_block("ok")], "task": {"taskId": "t"}}
    outcome = mcp.result_outcome(answer(done))
    assert (outcome.status, outcome.result) == (None, "ok")


def test_a_task_field_that_is_no_object_is_no_task_handle() -> None:
    odd = {"content": [text_block("ok")], "task": "t-1"}
    assert mcp.result_outcome(answer(odd)).status is None


# -- what of a tool result is recorded ------------------------------------------------


def test_a_text_result_is_recorded_as_its_text() -> None:
    result = {"content": [text_block("first"), text_block("second")], "isError": False}
    outcome = mcp.result_outcome(answer(result))
    assert (outcome.result, outcome.is_error) == ("first\nsecond", False)


def test_structured_content_the_text_does_not_say_is_recorded() -> None:
    result = {
        "content": [text_block("no refund made")],
        "structuredContent": {"refunded": 900, "order_id": "A-1001"},
    }
    outcome = mcp.result_outcome(answer(result))
    assert outcome.result is not None
    assert orjson.loads(outcome.result) == result
    assert not outcome.is_error


@pytest.mark.parametrize(
    ("text", "structured"),
    [
        # What SDK servers send: the value as JSON text, and as structured content.
        (json.dumps(ORDER, indent=2), {"amount": 5.0, "order_id": "A-1"}),
        ("3", {"result": 3}),  # a value that is no object, wrapped
        ("plain words", {"result": "plain words"}),  # a string, as it is
        ('["a", "b"]', {"result": ["a", "b"]}),
    ],
)
def test_structured_content_repeating_the_text_keeps_the_readable_text(
    text: str, structured: Any
) -> None:
    result = {"content": [text_block(text)], "structuredContent": structured}
    assert mcp.result_outcome(answer(result)).result == text


@pytest.mark.parametrize(
    ("text", "structured"),
    [
        ("1", {"result": True}),  # equal in Python, not to a reader
        ('{"amount": 1}', {"amount": 1.0}),
        ('{"amount": 1}', {"amount": 1, "extra": 2}),
        ("3", {"result": 4}),
        ("not json", {"note": "not json"}),
    ],
)
def test_structured_content_saying_anything_else_is_recorded(text: str, structured: Any) -> None:
    result = {"content": [text_block(text)], "structuredContent": structured}
    outcome = mcp.result_outcome(answer(result))
    assert outcome.result is not None
    assert orjson.loads(outcome.result) == result


@pytest.mark.parametrize(
    "block",
    [
        {"type": "resource_link", "uri": "file:///refunds/A-1001.pdf", "name": "refund"},
        {"type": "resource", "resource": {"uri": "kb://r", "text": "refunded 900"}},
        {"type": "image", "data": "aGk=", "mimeType": "image/png"},
        {"type": "text", "text": 900},  # not text: what a lenient client shows is unknown
        "refunded 900",
    ],
)
def test_content_that_is_not_text_is_recorded(block: Any) -> None:
    result = {"content": [text_block("done"), block]}
    outcome = mcp.result_outcome(answer(result))
    assert outcome.result is not None
    assert orjson.loads(outcome.result) == result


def test_a_result_without_text_is_recorded_as_json() -> None:
    result = {"structuredContent": {"a": 1}, "content": []}
    assert mcp.result_outcome(answer(result)).result == '{"structuredContent":{"a":1},"content":[]}'


def test_a_tool_error_recorded_whole_is_still_an_error() -> None:
    result = {"content": [text_block("failed")], "structuredContent": {"code": 7}, "isError": True}
    assert mcp.result_outcome(answer(result)).is_error


# -- the record's own rules hold for a result recorded whole --------------------------


def structured(value: dict[str, Any]) -> Outcome:
    return mcp.result_outcome(answer({"content": [text_block("done")], "structuredContent": value}))


def test_credentials_in_structured_content_are_masked_in_the_record() -> None:
    body = outcome_body(structured({"api_key": "sk-live-123", "refunded": 900}))
    recorded = orjson.loads(body["result"])
    assert recorded["structuredContent"] == {"api_key": REDACTED, "refunded": 900}
    assert "sk-live-123" not in body["result"]


@pytest.mark.parametrize(
    "path", ["result.structuredContent.email", "result.email", "result.content.0.text", "result"]
)
def test_any_result_path_hides_a_result_recorded_whole(path: str) -> None:
    # The text block says the value too, where no path reaches it.
    outcome = mcp.result_outcome(
        answer(
            {
                "content": [text_block("Email changed to ann@example.com")],
                "structuredContent": {"email": "ann@example.com", "refunded": 900},
            }
        )
    )
    body = outcome_body(outcome, redact=[path])
    assert (body["result"], body["redacted"]) == (REDACTED, ["result"])
    assert body["result_sha256"] is not None


# -- an SDK server's list: one text block per item ------------------------------------

KEYS = [{"name": "ci", "api_token": "tok-LIVE-1"}, {"name": "cd", "api_token": "tok-LIVE-2"}]


def sdk_list(items: list[Any]) -> dict[str, Any]:
    """What the official Python SDK sends for a tool returning ``items``."""
    blocks = [text_block(i if isinstance(i, str) else json.dumps(i, indent=2)) for i in items]
    return {"content": blocks, "structuredContent": {"result": items}, "isError": False}


@pytest.mark.parametrize("items", [KEYS[:1], KEYS, ["a", "b"], [1, {"x": [2]}, "c"]])
def test_a_list_one_block_per_item_keeps_the_readable_text(items: list[Any]) -> None:
    result = sdk_list(items)
    outcome = mcp.result_outcome(answer(result))
    assert outcome.result == "\n".join(b["text"] for b in result["content"])


@pytest.mark.parametrize(
    ("texts", "items"),
    [
        (['{"n": 1}'], [{"n": 1}, {"n": 2}]),  # a block short
        (['{"n": 1}', '{"n": 3}'], [{"n": 1}, {"n": 2}]),  # a block saying otherwise
        (['"a"'], ["b"]),
        (["1"], [True]),
    ],
)
def test_a_list_its_blocks_do_not_say_is_recorded_whole(texts: list[str], items: Any) -> None:
    result = {"content": [text_block(t) for t in texts], "structuredContent": {"result": items}}
    outcome = mcp.result_outcome(answer(result))
    assert outcome.result is not None
    assert orjson.loads(outcome.result) == result


@pytest.mark.parametrize("items", [KEYS[:1], KEYS])
def test_tokens_in_an_sdk_list_are_in_no_record(items: list[Any]) -> None:
    body = outcome_body(mcp.result_outcome(answer(sdk_list(items))))
    assert "tok-LIVE" not in orjson.dumps(body).decode()


# -- text blocks of a result recorded whole -------------------------------------------


def whole(blocks: list[Any], structured_content: Any = None) -> Outcome:
    result = {"content": blocks, "structuredContent": structured_content or {"other": 1}}
    outcome = mcp.result_outcome(answer(result))
    assert outcome.result is not None
    assert orjson.loads(outcome.result) == result
    return outcome


def test_credentials_in_a_text_blocks_json_are_masked() -> None:
    text = json.dumps({"name": "ci", "api_token": "tok-LIVE-1"}, indent=2)
    body = outcome_body(whole([text_block(text), text_block("done")]))
    assert "tok-LIVE-1" not in body["result"]
    recorded = orjson.loads(body["result"])
    assert orjson.loads(recorded["content"][0]["text"]) == {"name": "ci", "api_token": REDACTED}
    assert recorded["content"][1] == text_block("done")
    assert recorded["structuredContent"] == {"other": 1}


def test_a_text_block_naming_a_credential_it_cannot_read_hides_the_result() -> None:
    # JSON cut short (or not JSON at all, yet looking so): its credential cannot be found.
    body = outcome_body(whole([text_block('{"api_token": "tok-LIVE-1", "n": ')]))
    assert (body["result"], body["redacted"]) == (REDACTED, ["result"])
    assert body["result_sha256"] is not None


def test_text_blocks_without_credentials_are_kept_as_sent() -> None:
    text = json.dumps({"token_count": 3}, indent=2)  # "token" in it, no credential
    outcome = whole([text_block(text), text_block("the key point: done")])
    body = outcome_body(outcome)
    assert body["result"] == outcome.result


def test_a_result_recorded_whole_is_cut_at_the_cap_with_its_hash() -> None:
    body = outcome_body(structured({"log": "x" * (MAX_RESULT_CHARS + 10)}))
    assert len(body["result"]) == MAX_RESULT_CHARS
    assert body["result_sha256"] is not None
