"""Real servers on 127.0.0.1:0: the mock LLM upstream and Warden itself."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import pytest
import pytest_asyncio
from aiohttp import web

from warden.audit.verify import iter_records
from warden.config import Config, load_config
from warden.server import Warden
from warden.testing import MockLLM

if TYPE_CHECKING:
    from playwright.async_api import Browser

ROOT = Path(__file__).resolve().parents[2]
SHIPPED_POLICY = ROOT / "policies" / "customer-support"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
HAVE_CHROMIUM = Path(CHROMIUM).exists()


def make_config(tmp_path: Path, upstream_url: str, **overrides: Any) -> Config:
    """A config for one test: loopback listeners on free ports, files under tmp_path."""
    base: dict[str, Any] = {
        "agent": {"id": "support-triage"},
        "listen": {"proxy": "127.0.0.1:0", "admin": "127.0.0.1:0"},
        "upstreams": {
            "openai": {"protocol": "openai", "base_url": upstream_url, "timeout_s": 5},
            "anthropic": {"protocol": "anthropic", "base_url": upstream_url, "timeout_s": 5},
        },
        "tools": {"search_kb": {"risk": "read_only"}},
        # A generous deadline: these tests are about the proxy, and CI machines are
        # shared; the deadline itself is tested with the policy engine.
        "policy": {
            "bundles": [str(SHIPPED_POLICY)],
            "workers": 1,
            "watch": False,
            "deadline_ms": 5000,
        },
        "audit": {"dir": str(tmp_path / "audit")},
        "state": {"url": f"sqlite:///{tmp_path}/state.db"},
        "shutdown_grace_s": 5,
        # Held calls are answered at once unless a test holds them on purpose.
        "approvals": {"mode": "defer"},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return load_config(environ={}, overrides=base)


def audit_records(directory: Path) -> list[dict[str, Any]]:
    """Every record in an audit directory, decoded."""
    return [orjson.loads(payload) for _, payload in iter_records(directory)]


@pytest.fixture
async def llm() -> AsyncIterator[MockLLM]:
    async with MockLLM() as mock:
        yield mock


@pytest.fixture
async def warden(tmp_path: Path, llm: MockLLM) -> AsyncIterator[Warden]:
    async with Warden(make_config(tmp_path, llm.url)) as running:
        yield running


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def browser() -> AsyncIterator[Browser]:
    """One chromium per test process for the console's tests (Debian's, never a download)."""
    if not HAVE_CHROMIUM:
        pytest.skip(
            "chromium is not installed (make test-tools installs it: apt-get install chromium)"
        )
    from playwright.async_api import async_playwright  # noqa: PLC0415 - browser tests only

    async with async_playwright() as pw:
        launched = await pw.chromium.launch(executable_path=CHROMIUM)
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
def records(tmp_path: Path) -> Callable[[], list[dict[str, Any]]]:
    """Read the audit log of the ``warden`` fixture (call after it wrote)."""
    return lambda: audit_records(tmp_path / "audit")


@contextlib.asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[int]:
    """``app`` on a loopback port of its own, for as long as the block runs; yields the port."""
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()
