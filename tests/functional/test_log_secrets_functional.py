"""What reaches Warden's logs when a client sends bytes it cannot parse.

aiohttp's server logs a request it cannot parse with the offending line, and
that line can be a header holding a provider key or a Warden agent token.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.functional.conftest import make_config
from warden.ops.logging import configure_logging
from warden.server import Warden


@pytest.fixture
def json_logs(capsys: pytest.CaptureFixture[str]) -> Iterator[None]:
    """Warden's own log set-up for the test (to the captured stderr), undone after it."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    configure_logging("info", "json")
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.usefixtures("json_logs")
async def test_a_header_line_aiohttp_cannot_parse_is_not_logged(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with Warden(make_config(tmp_path, "http://127.0.0.1:9")) as warden:
        host, port = warden.proxy_url.removeprefix("http://").split(":")
        for header in (b"Authorization: Bearer sk-SECRETKEY1\x01", b"X-Warden-Agent-Key: k3y\x00"):
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + header)
            writer.write(b"\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
            status = await asyncio.wait_for(reader.readline(), 10)
            writer.close()
            assert b" 400 " in status, status
    logged = capsys.readouterr().err
    assert "details withheld" in logged
    assert "SECRETKEY1" not in logged
    assert "k3y" not in logged


@pytest.mark.usefixtures("json_logs")
async def test_a_body_aiohttp_cannot_decode_is_a_400_and_one_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Labelled gzip and not gzip: a 500 and a traceback of some 6 KB per request,
    # which any client of either listener could ask for.
    async with Warden(make_config(tmp_path, "http://127.0.0.1:9")) as warden:
        answers = []
        for url, path, kind in (
            (warden.proxy_url, "/openai/v1/chat/completions", "application/json"),
            (warden.admin_url, "/console/login", "application/x-www-form-urlencoded"),
        ):
            host, port = url.removeprefix("http://").split(":")
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(
                f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {kind}\r\n"
                "Content-Encoding: gzip\r\nContent-Length: 2\r\n"
                "Connection: close\r\n\r\n{}".encode()
            )
            await writer.drain()
            answers.append(await asyncio.wait_for(reader.read(), 10))
            writer.close()
    # The console refuses a compressed form before reading it (browsers never send one).
    assert [a.split(b" ", 2)[1] for a in answers] == [b"400", b"415"]
    assert b'"code":"invalid_request"' in answers[0]
    server = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert {r.getMessage().partition(";")[0] for r in server} <= {
        "aiohttp could not parse a request (ContentEncodingError)"
    }
    assert not [r for r in server if r.exc_info]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR and r.exc_info]
