"""The ingress's route lookup: cached per method and path, errors never cached."""

from __future__ import annotations

from typing import Any, cast

import orjson
import pytest
from aiohttp.test_utils import make_mocked_request

from warden.config import Config
from warden.errors import WardenError
from warden.ingress import http as ingress
from warden.ingress.http import ProxyApp


def proxy_app() -> ProxyApp:
    config = Config.model_validate(
        {"upstreams": {"openai": {"protocol": "openai", "base_url": "http://127.0.0.1:9"}}}
    )
    # Routing touches neither the core nor the upstream session.
    return ProxyApp(config, cast(Any, None), cast(Any, None))


def test_a_route_is_looked_up_once_per_method_and_path() -> None:
    app = proxy_app()
    first = app._route(make_mocked_request("POST", "/openai/v1/chat/completions?a=1"))
    again = app._route(make_mocked_request("POST", "/openai/v1/chat/completions"))
    assert again is first
    assert first.match.adapter is not None
    fetch = app._route(make_mocked_request("GET", "/openai/v1/chat/completions/cmpl-1"))
    assert fetch is not first
    assert fetch.segments == ("v1", "chat", "completions", "cmpl-1")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/openai/v1/%2e%2e/x"),
        ("POST", "/nowhere/v1/chat/completions"),
        ("PUT", "/openai/v1/x"),
    ],
)
def test_refused_routes_are_refused_every_time(method: str, path: str) -> None:
    app = proxy_app()
    for _ in range(2):
        with pytest.raises(WardenError):
            app._route(make_mocked_request(method, path))
    assert app._routes == {}


def test_the_cache_stays_bounded() -> None:
    app = proxy_app()
    for i in range(ingress._ROUTE_CACHE_SIZE + 5):
        app._route(make_mocked_request("GET", f"/openai/v1/chat/completions/cmpl-{i}"))
    assert 0 < len(app._routes) <= ingress._ROUTE_CACHE_SIZE


@pytest.mark.parametrize(
    ("line", "shape"),
    [
        (b"POST /openai/v1/chat/completions HTTP/1.1", "openai"),
        (b"POST /anthropic/v1/messages?beta=true HTTP/1.1", "anthropic"),
        (b"POST /tools/mcp HTTP/1.1", "mcp"),
        (b"POST /%61nthropic/v1/messages HTTP/1.1", "anthropic"),
        (b"POST /nowhere HTTP/1.1", "openai"),
        (b"", "openai"),
        (b"\xff\xfe garbage", "openai"),
    ],
)
def test_a_refused_connection_is_answered_in_its_upstreams_shape(line: bytes, shape: str) -> None:
    config = Config.model_validate(
        {
            "upstreams": {
                "openai": {"protocol": "openai", "base_url": "http://127.0.0.1:9"},
                "anthropic": {"protocol": "anthropic", "base_url": "http://127.0.0.1:9"},
                "tools": {"protocol": "mcp", "base_url": "http://127.0.0.1:9"},
            }
        }
    )
    head, _, body = ingress._refusal(config.upstreams)(line).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert b"\r\nRetry-After: 1\r\n" in head
    assert f"\r\nContent-Length: {len(body)}\r\n".encode() in head
    error = orjson.loads(body)
    if shape == "anthropic":
        assert error["error"]["type"] == "overloaded_error"
    elif shape == "mcp":
        assert error["jsonrpc"] == "2.0"
        assert error["error"]["data"]["warden"] == "overloaded"
    else:
        assert error["error"]["code"] == "overloaded"
