"""Error bodies and mid-stream errors, checked against the official SDKs' own handling."""

from __future__ import annotations

from typing import Any

import anthropic
import httpx2
import openai
import orjson
import pytest
from anthropic.types.shared import ErrorResponse

from warden.protocols.errors import render_error, render_stream_error
from warden.protocols.sse import SseEvent, SseParser

OPENAI_TEXT_CHUNK = (
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1752840000,'
    b'"model":"gpt-4o","choices":[{"index":0,"delta":{"role":"assistant","content":"Hi"},'
    b'"logprobs":null,"finish_reason":null}]}\n\n'
)
ANTHROPIC_START = (
    b"event: message_start\n"
    b'data: {"type":"message_start","message":{"id":"msg_1","type":"message",'
    b'"role":"assistant","model":"claude-sonnet-4-20250514","content":[],"stop_reason":null,'
    b'"stop_sequence":null,"usage":{"input_tokens":3,"output_tokens":1}}}\n\n'
)


def transport(status: int, payload: bytes, content_type: str) -> httpx2.Client:
    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(status, content=payload, headers={"content-type": content_type})

    return httpx2.Client(transport=httpx2.MockTransport(handler))


def openai_client(status: int, payload: bytes, content_type: str) -> openai.OpenAI:
    return openai.OpenAI(
        api_key="sk-test",
        base_url="http://warden.test/v1",
        http_client=transport(status, payload, content_type),
        max_retries=0,
    )


def anthropic_client(status: int, payload: bytes, content_type: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        api_key="sk-ant-test",
        base_url="http://warden.test",
        http_client=transport(status, payload, content_type),
        max_retries=0,
    )


@pytest.mark.parametrize(
    ("status", "error_type"),
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (403, "permission_error"),
        (404, "invalid_request_error"),
        (413, "invalid_request_error"),
        (415, "invalid_request_error"),
        (429, "rate_limit_error"),
        (500, "api_error"),
        (502, "api_error"),
        (503, "api_error"),
        (504, "api_error"),
    ],
)
def test_openai_error_body(status: int, error_type: str) -> None:
    rendered = render_error("openai", status, "policy_error", "The policy bundle failed.")
    assert orjson.loads(rendered) == {
        "error": {
            "message": "The policy bundle failed.",
            "type": error_type,
            "param": None,
            "code": "policy_error",
        }
    }


@pytest.mark.parametrize(
    ("status", "error_type"),
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (403, "permission_error"),
        (404, "not_found_error"),
        (413, "request_too_large"),
        (415, "invalid_request_error"),
        (429, "rate_limit_error"),
        (500, "api_error"),
        (502, "api_error"),
        (503, "overloaded_error"),
        (504, "timeout_error"),
        (529, "overloaded_error"),
    ],
)
def test_anthropic_error_body(status: int, error_type: str) -> None:
    rendered = render_error("anthropic", status, "upstream_timeout", "The provider timed out.")
    body = orjson.loads(rendered)
    assert body == {
        "type": "error",
        "error": {"type": error_type, "message": "The provider timed out."},
    }
    if error_type != "request_too_large":  # documented by the API, not in the SDK's model
        ErrorResponse.model_validate(body)


@pytest.mark.parametrize("family", ["openai", "http", ""])
def test_other_families_get_the_openai_shape(family: str) -> None:
    # Plain HTTP upstreams (and a request that failed before routing) still get JSON errors.
    assert orjson.loads(render_error(family, 413, "body_too_large", "Too big.")) == {
        "error": {
            "message": "Too big.",
            "type": "invalid_request_error",
            "param": None,
            "code": "body_too_large",
        }
    }
    [event] = SseParser().feed(render_stream_error(family, "upstream_timeout", "Slow."))
    assert event.event is None
    assert orjson.loads(event.data)["error"]["code"] == "upstream_timeout"


def test_messages_are_escaped() -> None:
    tricky = 'quote " newline \n backslash \\ unicode ☕ </script>'
    for family in ("openai", "anthropic"):
        body: Any = orjson.loads(render_error(family, 400, "invalid_json", tricky))
        assert body["error"]["message"] == tricky
        [event] = SseParser().feed(render_stream_error(family, "invalid_json", tricky))
        assert orjson.loads(event.data)["error"]["message"] == tricky


@pytest.mark.parametrize(
    ("status", "exception"),
    [
        (400, openai.BadRequestError),
        (403, openai.PermissionDeniedError),
        (413, openai.APIStatusError),
        (429, openai.RateLimitError),
        (502, openai.InternalServerError),
    ],
)
def test_openai_sdk_raises_on_error_body(status: int, exception: type[Exception]) -> None:
    client = openai_client(
        status, render_error("openai", status, "body_too_large", "Too big."), "application/json"
    )
    with pytest.raises(exception) as raised:
        client.chat.completions.create(model="gpt-4o", messages=[])
    assert isinstance(raised.value, openai.APIStatusError)
    assert raised.value.status_code == status
    assert raised.value.code == "body_too_large"
    assert "Too big." in raised.value.message


@pytest.mark.parametrize(
    ("status", "exception"),
    [
        (400, anthropic.BadRequestError),
        (404, anthropic.NotFoundError),
        (413, anthropic.APIStatusError),
        (502, anthropic.InternalServerError),
        (529, anthropic.OverloadedError),
    ],
)
def test_anthropic_sdk_raises_on_error_body(status: int, exception: type[Exception]) -> None:
    client = anthropic_client(
        status,
        render_error("anthropic", status, "unknown_route", "No such route."),
        "application/json",
    )
    with pytest.raises(exception) as raised:
        client.messages.create(model="claude-sonnet-4-20250514", max_tokens=8, messages=[])
    assert isinstance(raised.value, anthropic.APIStatusError)
    assert raised.value.status_code == status
    assert "No such route." in raised.value.message


def test_openai_stream_error_is_a_data_chunk() -> None:
    rendered = render_stream_error("openai", "upstream_timeout", "The provider timed out.")
    [event] = SseParser().feed(rendered)
    assert event == SseEvent(
        data='{"error":{"message":"The provider timed out.","type":"api_error",'
        '"param":null,"code":"upstream_timeout"}}'
    )


def test_openai_sdk_raises_mid_stream() -> None:
    payload = OPENAI_TEXT_CHUNK + render_stream_error("openai", "upstream_timeout", "Timed out.")
    client = openai_client(200, payload, "text/event-stream")
    stream = client.chat.completions.create(model="gpt-4o", messages=[], stream=True)
    assert next(stream).choices[0].delta.content == "Hi"
    with pytest.raises(openai.APIError) as raised:
        next(stream)
    assert raised.value.message == "Timed out."
    assert raised.value.body == {
        "message": "Timed out.",
        "type": "api_error",
        "param": None,
        "code": "upstream_timeout",
    }


def test_anthropic_stream_error_is_an_error_event() -> None:
    rendered = render_stream_error("anthropic", "upstream_timeout", "The provider timed out.")
    [event] = SseParser().feed(rendered)
    assert event.event == "error"
    assert orjson.loads(event.data) == {
        "type": "error",
        "error": {"type": "api_error", "message": "The provider timed out."},
    }


def test_anthropic_sdk_raises_mid_stream() -> None:
    payload = ANTHROPIC_START + render_stream_error("anthropic", "audit_unavailable", "No log.")
    client = anthropic_client(200, payload, "text/event-stream")
    stream = client.messages.create(
        model="claude-sonnet-4-20250514", max_tokens=8, messages=[], stream=True
    )
    assert next(stream).type == "message_start"
    with pytest.raises(anthropic.APIStatusError) as raised:
        next(stream)
    assert raised.value.body == {
        "type": "error",
        "error": {"type": "api_error", "message": "No log."},
    }


def test_anthropic_stream_helper_raises_mid_stream() -> None:
    payload = ANTHROPIC_START + render_stream_error("anthropic", "audit_unavailable", "No log.")
    client = anthropic_client(200, payload, "text/event-stream")
    with (
        pytest.raises(anthropic.APIStatusError),
        client.messages.stream(
            model="claude-sonnet-4-20250514", max_tokens=8, messages=[]
        ) as stream,
    ):
        stream.get_final_message()
