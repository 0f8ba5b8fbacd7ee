"""What transparent mode logs of a failure: what went wrong, never the client's bytes.

mitmproxy's and h2's messages quote what they could not read after a colon
(a header value, a ClientHello in hex), and an API key can be in it.
"""

from __future__ import annotations

import logging

import pytest
from mitmproxy import flow, tls
from mitmproxy.options import Options
from mitmproxy.proxy.context import Context
from mitmproxy.test import tflow

from warden.ingress.transparent import GoverningAddon
from warden.ingress.transparent_rules import HostRules

SECRET = "sk-proj-s3cret"


def addon() -> GoverningAddon:
    return GoverningAddon(
        HostRules({"api.openai.com": "openai"}, "deny"), ("127.0.0.1", 1), "regular"
    )


def logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "warden.transparent"]


@pytest.mark.parametrize(
    ("message", "kind"),
    [
        (
            f"HTTP/2 protocol error: Received header value surrounded by whitespace "
            f"b'Bearer {SECRET} '",
            "HTTP/2 protocol error",
        ),
        (
            f"Client closed connection before completing request headers: b'{SECRET}'",
            "Client closed connection before completing request headers",
        ),
        (f"Received b'Bearer {SECRET}' without a colon", "Received b'...' without a colon"),
        ("stream reset by client (CANCEL)", "stream reset by client (CANCEL)"),
    ],
)
def test_a_failed_governed_request_logs_what_failed_not_what_it_quotes(
    caplog: pytest.LogCaptureFixture, message: str, kind: str
) -> None:
    failed = tflow.tflow()
    failed.metadata["warden_governed"] = "api.openai.com"
    failed.error = flow.Error(message)
    with caplog.at_level(logging.WARNING, logger="warden.transparent"):
        addon().error(failed)
    lines = logged(caplog)
    assert lines == [f"governed request to api.openai.com failed in transparent mode: {kind}"]
    assert SECRET not in lines[0]


def test_a_tls_failure_logs_no_client_bytes(caplog: pytest.LogCaptureFixture) -> None:
    client = tflow.tclient_conn()
    client.sni = "api.openai.com"
    client.error = f"Cannot parse ClientHello: {f'Bearer {SECRET}'.encode().hex()}"
    data = tls.TlsData(client, Context(client, Options()))
    with caplog.at_level(logging.WARNING, logger="warden.transparent"):
        addon().tls_failed_client(data)
    [line] = logged(caplog)
    assert "(Cannot parse ClientHello)" in line
    assert SECRET.encode().hex() not in line
