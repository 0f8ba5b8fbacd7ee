"""``warden mcp wrap`` around the MCP test server, driven by the official ``mcp`` client.

Shared by the stdio tests of tools/list filtering and held approvals: each
session gets its own config (agent, policy, approvals) and audit directory,
while the state database (approvals, kill switches) is shared, as between
sidecars.
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
from mcp import types
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client

from tests.functional.conftest import SHIPPED_POLICY, audit_records
from warden.killswitch import KillSwitches, Scope
from warden.state import StateStore
from warden.testing.mcp_server import read_call_log
from warden.testing.memory_audit import MemoryAudit


def write_config(
    tmp_path: Path,
    agent: str = "support-triage",
    *,
    bundle: Path = SHIPPED_POLICY,
    approvals: dict[str, Any] | None = None,
) -> Path:
    """A warden.yaml (JSON is YAML) for one wrap session of ``agent``; its audit dir is its own."""
    config = {
        "agent": {"id": agent},
        "listen": {"proxy": "127.0.0.1:0", "admin": "127.0.0.1:0"},
        "policy": {"bundles": [str(bundle)], "workers": 1, "watch": False, "deadline_ms": 5000},
        "audit": {"dir": str(audit_dir(tmp_path, agent))},
        "state": {"url": state_url(tmp_path)},
        "approvals": approvals or {"mode": "defer"},
        "shutdown_grace_s": 5,
    }
    path = tmp_path / f"warden-{agent}.yaml"
    path.write_bytes(orjson.dumps(config))
    return path


def state_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/state.db"


def audit_dir(tmp_path: Path, agent: str = "support-triage") -> Path:
    return tmp_path / f"audit-{agent}"


def wrap_params(config: Path, call_log: Path, *server_args: str) -> StdioServerParameters:
    """``warden mcp wrap`` around the test server, as an MCP client config would launch it."""
    server = [sys.executable, "-m", "warden.testing.mcp_server", "--call-log", str(call_log)]
    return StdioServerParameters(
        command=sys.executable,
        args=["-m", "warden.cli", "mcp", "wrap", "--config", str(config)]
        + ["--name", "support-tools", "--", *server, *server_args],
        # The SDK passes only a safe default environment; keep the interpreter's path.
        env={k: v for k in ("PYTHONPATH",) if (v := os.environ.get(k))},
    )


@asynccontextmanager
async def wrapped(config: Path, call_log: Path, *server_args: str) -> AsyncIterator[ClientSession]:
    """An initialised MCP client session through ``warden mcp wrap``."""
    async with (
        stdio_client(wrap_params(config, call_log, *server_args)) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        yield session


def text(result: types.CallToolResult) -> str:
    return "\n".join(c.text for c in result.content if isinstance(c, types.TextContent))


def tools_called(call_log: Path) -> list[str]:
    return [c["tool"] for c in read_call_log(call_log)]


def decisions(directory: Path) -> list[dict[str, Any]]:
    return [r for r in audit_records(directory) if r.get("kind") == "decision"]


async def throw_switch(tmp_path: Path, scope: Scope, target: str, reason: str) -> None:
    """Throw a kill switch in the shared store, as `warden kill` at any sidecar does."""
    store = await StateStore.open(state_url(tmp_path))
    try:
        await KillSwitches(store, MemoryAudit()).set(scope, target, reason, "oncall")
    finally:
        await store.close()
