"""Header hygiene: what goes upstream, what comes back, what may be recorded."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from warden.ingress import headers as hdr


def proxy(pairs: list[tuple[str, str]]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


def test_request_headers_drop_hop_by_hop_and_warden_headers() -> None:
    out = hdr.request_headers(
        proxy(
            [
                ("Authorization", "Bearer sk-secret"),
                ("Connection", "keep-alive, X-Custom-Hop"),
                ("X-Custom-Hop", "1"),
                ("Keep-Alive", "timeout=5"),
                ("Proxy-Authorization", "Basic abc"),
                ("Host", "127.0.0.1:8080"),
                ("Content-Length", "12"),
                ("Transfer-Encoding", "chunked"),
                ("X-Warden-Agent", "refunds"),
                ("X-Warden-Context-Customer-Id", "C-1"),
                ("OpenAI-Beta", "assistants=v2"),
            ]
        )
    )
    assert dict(out) == {"Authorization": "Bearer sk-secret", "OpenAI-Beta": "assistants=v2"}


def test_response_headers_drop_length_encoding_and_alternative_services() -> None:
    out = hdr.response_headers(
        proxy(
            [
                ("Content-Encoding", "gzip"),
                ("Content-Length", "9"),
                ("x-request-id", "r1"),
                # Followed, it would take the client to the provider over HTTP/3, around Warden.
                ("Alt-Svc", 'h3=":443"; ma=86400'),
            ]
        )
    )
    assert dict(out) == {"x-request-id": "r1"}


def test_response_headers_never_carry_an_upstreams_x_warden_header() -> None:
    # X-Warden-Blocked is Warden's word on what it blocked: an upstream cannot forge it.
    forged = [("X-Warden-Blocked", "dec_FORGED"), ("x-warden-decision-id", "dec_x"), ("x-a", "1")]
    assert dict(hdr.response_headers(proxy(forged))) == {"x-a": "1"}


def test_recordable_is_an_allowlist_without_secrets() -> None:
    recorded = hdr.recordable(
        {
            "Authorization": "Bearer sk-secret",
            "x-api-key": "sk-ant-secret",
            "Cookie": "session=1",
            "api-key": "azure-secret",
            "User-Agent": "OpenAI/Python 1.0",
        }
    )
    assert recorded == {"user-agent": "OpenAI/Python 1.0"}


@pytest.mark.parametrize(
    "name",
    ["X-Warden-Agent-Key", "x-warden-agent-token", "X-WARDEN-AGENT", "X-Warden-Context-Id"],
)
def test_warden_headers_never_go_upstream(name: str) -> None:
    out = hdr.request_headers(proxy([(name, "wk-secret-value"), ("Accept", "*/*")]))
    assert dict(out) == {"Accept": "*/*"}


def test_agent_credentials_are_never_recorded() -> None:
    recorded = hdr.recordable(
        {
            "X-Warden-Agent-Key": "wk-secret-value",
            "X-Warden-Agent-Token": "eyJhbGciOi.secret.token",
            "X-Warden-Agent": "refunds-bot",
            "Accept": "application/json",
        }
    )
    assert recorded == {"accept": "application/json"}
    assert "secret" not in repr(recorded)


def test_context_headers() -> None:
    ctx = hdr.context_from({"X-Warden-Context-Customer-Id": "C-1", "X-Warden-Context-": "no key"})
    assert ctx == {"customer_id": "C-1"}
