"""Sans-I/O pieces of the MCP streamable HTTP door: the SSE relay splitter and MCP helpers."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from warden.model import Agent
from warden.protocols import mcp
from warden.protocols.sse import SseTooLarge
from warden.protocols.sse_relay import EventSplitter, RawEvent, data_event

STREAM = (
    b"\xef\xbb\xbfid: 7\r\nretry: 1000\r\ndata:\r\n\r\n"  # a priming event: id, retry, empty data
    b": keep-alive\n\n"
    b'event: message\nid: 8\ndata: {"jsonrpc":"2.0",\ndata: "id":1}\n\n'
    b"data: last\r\r"
)


def split(chunks: list[bytes]) -> list[RawEvent]:
    splitter = EventSplitter()
    return [event for chunk in chunks for event in splitter.feed(chunk)]


def test_blocks_keep_what_a_relay_must_not_lose() -> None:
    priming, comment, message, last = split([STREAM])
    assert priming.lines == ("id: 7", "retry: 1000", "data:")
    assert (priming.id, priming.data) == ("7", "")
    assert comment.lines == (": keep-alive",)
    assert comment.data is None
    assert message.id == "8"
    assert orjson.loads(message.data or "") == {"jsonrpc": "2.0", "id": 1}
    assert last.data == "last"
    assert comment.encode() == b": keep-alive\n\n"


@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=8))
def test_blocks_are_the_same_however_the_stream_is_cut(cuts: list[int]) -> None:
    points = [0, *sorted(cuts), len(STREAM)]
    chunks = [STREAM[a:b] for a, b in zip(points, points[1:], strict=False)]
    assert split(chunks) == split([STREAM])


def test_with_data_replaces_only_the_data() -> None:
    (event,) = split([b"event: message\nid: 3\ndata: old\ndata: more\n\n"])
    new = event.with_data('{"a":\n1}')
    assert new.lines == ("event: message", "id: 3", 'data: {"a":', "data: 1}")
    assert split([new.encode()]) == [new]


def test_data_event_is_a_message_event() -> None:
    (event,) = split([data_event('{"id":1}')])
    assert event.lines == ("event: message", 'data: {"id":1}')


def test_an_endless_event_is_refused() -> None:
    splitter = EventSplitter(max_event=64)
    splitter.feed(b"data: " + b"x" * 40 + b"\n")
    with pytest.raises(SseTooLarge):
        splitter.feed(b"data: " + b"y" * 40 + b"\n")


def call(**params: object) -> mcp.Message:
    body = {"jsonrpc": "2.0", "id": 5, "method": "tools/call", "params": {"name": "t", **params}}
    (message,) = mcp.parse(orjson.dumps(body)).messages
    return message


def test_progress_token_is_read_from_meta() -> None:
    assert mcp.progress_token(call(_meta={"progressToken": "tok"})) == "tok"
    assert mcp.progress_token(call(_meta={"progressToken": 3})) == 3
    assert mcp.progress_token(call(_meta={"progressToken": True})) is None
    assert mcp.progress_token(call(_meta="nope")) is None
    assert mcp.progress_token(call()) is None


def test_notifications_and_stopped_result_shapes() -> None:
    progress = mcp.progress_notification("tok", 2, "waiting")
    assert progress == {
        "jsonrpc": "2.0",
        "method": "notifications/progress",
        "params": {"progressToken": "tok", "progress": 2, "message": "waiting"},
    }
    cancelled = mcp.cancelled_notification(5, "incident")
    assert cancelled["params"] == {"requestId": 5, "reason": "incident"}
    call = mcp.parse(
        b'{"jsonrpc": "2.0", "id": 5, "method": "tools/call", "params": {"name": "get_order"}}'
    )
    assert call.messages[0].call is not None
    action = mcp.action(call.messages[0].call, Agent("a"), "support-tools")
    stopped = mcp.stopped_result(5, action, "incident 9", "dec_1")
    assert stopped["id"] == 5
    assert stopped["result"]["isError"] is True
    assert (
        "stopped the tool call `get_order` while it ran" in stopped["result"]["content"][0]["text"]
    )
    assert "incident 9" in stopped["result"]["content"][0]["text"]
    # Any other request is stopped with a JSON-RPC error its client can read.
    read = mcp.parse(
        b'{"jsonrpc": "2.0", "id": 6, "method": "resources/read", "params": {"uri": "kb://a"}}'
    )
    assert read.messages[0].call is not None
    action = mcp.action(read.messages[0].call, Agent("a"), "support-tools")
    stopped = mcp.stopped_result(6, action, "incident 9", "dec_2", sent=False)
    assert stopped["error"]["code"] == mcp.REFUSED
    assert "stopped the request `resources/read` before it was sent" in stopped["error"]["message"]
    assert stopped["error"]["data"] == {"warden/decision": "dec_2"}
