"""Admin API auth: bearer tokens by SHA-256, roles, open operational routes."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.functional.conftest import make_config
from warden.admin.auth import hash_token
from warden.server import Warden
from warden.testing import MockLLM

ADMIN = "admin-token-1"
VIEWER = "viewer-token-1"
TOKENS = {
    "tokens": [
        {"subject": "alice", "roles": ["admin"], "sha256": hash_token(ADMIN)},
        {"subject": "val", "roles": ["viewer"], "sha256": hash_token(VIEWER)},
    ]
}
BODY = {"scope": "agent", "target": "bot", "reason": "testing"}


@pytest.fixture
async def admin(
    tmp_path: Path, llm: MockLLM
) -> AsyncIterator[tuple[Warden, aiohttp.ClientSession]]:
    async with (
        Warden(make_config(tmp_path, llm.url, admin=TOKENS)) as warden,
        aiohttp.ClientSession(base_url=warden.admin_url) as session,
    ):
        yield warden, session


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Basic {ADMIN}"},
        {"Authorization": "Bearer"},
        {"Authorization": f"Bearer {hash_token(ADMIN)}"},  # the hash is not the token
    ],
)
async def test_no_valid_token_is_401(
    admin: tuple[Warden, aiohttp.ClientSession], headers: dict[str, str]
) -> None:
    _, session = admin
    async with session.post("/v1/killswitches", json=BODY, headers=headers) as resp:
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        assert (await resp.json())["error"]["code"] == "unauthorized"
    async with session.get("/v1/killswitches", headers=headers) as resp:
        assert resp.status == 401


async def test_a_token_without_the_role_is_403(
    admin: tuple[Warden, aiohttp.ClientSession],
) -> None:
    warden, session = admin
    async with session.post("/v1/killswitches", json=BODY, headers=bearer(VIEWER)) as resp:
        assert resp.status == 403
        assert (await resp.json())["error"]["code"] == "forbidden"
    assert warden.killswitches is not None
    assert not warden.killswitches.active()
    async with session.get("/v1/killswitches", headers=bearer(VIEWER)) as resp:
        assert resp.status == 200  # reading is open to viewers
    async with session.delete("/v1/killswitches/ks_x", headers=bearer(VIEWER)) as resp:
        assert resp.status == 403


async def test_the_admin_token_works_and_operational_routes_stay_open(
    admin: tuple[Warden, aiohttp.ClientSession],
) -> None:
    _, session = admin
    async with session.post("/v1/killswitches", json=BODY, headers=bearer(ADMIN)) as resp:
        assert resp.status == 201
        assert (await resp.json())["created_by"] == "alice"
    for path in ("/healthz", "/readyz", "/metrics"):
        async with session.get(path) as resp:
            assert resp.status == 200, path


async def test_no_tokens_configured_means_every_admin_route_is_closed(
    tmp_path: Path, llm: MockLLM
) -> None:
    async with (
        Warden(make_config(tmp_path, llm.url)) as warden,
        aiohttp.ClientSession(base_url=warden.admin_url) as session,
        session.get("/v1/killswitches", headers=bearer(ADMIN)) as resp,
    ):
        assert resp.status == 401


async def test_a_token_that_is_not_text_is_401_without_an_error(
    admin: tuple[Warden, aiohttp.ClientSession], caplog: pytest.LogCaptureFixture
) -> None:
    """A raw 0xFF byte in the token (no UTF-8) is no token: 401, not a 500 with a traceback."""
    warden, _ = admin
    host, _, port = warden.admin_url.removeprefix("http://").rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"GET /v1/killswitches HTTP/1.1\r\nHost: x\r\n"
        b"Authorization: Bearer admin-\xfftoken\r\nConnection: close\r\n\r\n"
    )
    await writer.drain()
    answer = await reader.read()
    writer.close()
    assert answer.startswith(b"HTTP/1.1 401 ")
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


@pytest.mark.parametrize(
    ("method", "path", "body", "headers", "status", "code"),
    [
        ("GET", "/v1/nothing", b"", {}, 404, "not_found"),
        ("PUT", "/v1/killswitches", b"{}", {}, 405, "method_not_allowed"),
        ("POST", "/v1/killswitches", io.BytesIO(b"x" * (2 << 20)), {}, 413, "too_large"),
        # Labelled gzip and not gzip: aiohttp's error surfaced as a 500 and a traceback.
        ("POST", "/v1/killswitches", b"{}", {"Content-Encoding": "gzip"}, 400, "invalid_request"),
    ],
)
async def test_the_servers_own_errors_have_the_apis_shape(
    admin: tuple[Warden, aiohttp.ClientSession],
    method: str,
    path: str,
    body: bytes | io.BytesIO,
    headers: dict[str, str],
    status: int,
    code: str,
) -> None:
    _, session = admin
    sent = {"Content-Type": "application/json", **bearer(ADMIN), **headers}
    async with session.request(method, path, data=body, headers=sent) as resp:
        assert resp.status == status
        assert resp.content_type == "application/json"
        assert (await resp.json())["error"]["code"] == code
        if status == 405:
            assert "POST" in resp.headers["Allow"]
