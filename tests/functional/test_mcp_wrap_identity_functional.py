"""``warden mcp wrap`` proves the agent it acts as, like every other door.

With ``identity.require_proof`` (several agents share one configuration), a
wrap took the config's ``agent.id`` on trust: any agent launching it acted,
and was recorded, capped and stopped, as that agent. Driven by the official
MCP client over stdio, as an IDE launches the wrap.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from mcp import types
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.shared.exceptions import MCPError

from tests.functional.stdio_wrap import audit_dir, decisions, tools_called, write_config
from tests.unit.test_identity import AUDIENCE, ISSUER, Issuer
from warden.identity import hash_key

pytestmark = pytest.mark.timeout(60)

TRIAGE_KEY = "wk_triage-key-for-tests"
ALLOW_ALL = """package warden

import rego.v1

default decision := {"effect": "allow", "reason": "every call, for these tests"}
"""
REFUNDS_KEY = "wk_refunds-key-for-tests"


def proof_config(tmp_path: Path) -> Path:
    """The stdio tests' config, with proof required and a key for each of two agents."""
    path = write_config(tmp_path)
    config: dict[str, Any] = orjson.loads(path.read_bytes())
    config["identity"] = {
        "require_proof": True,
        "agents": {
            "support-triage": {"key_sha256": [hash_key(TRIAGE_KEY)]},
            "refunds-bot": {"key_sha256": [hash_key(REFUNDS_KEY)]},
        },
    }
    path.write_bytes(orjson.dumps(config))
    return path


def wrap_command(config: Path, call_log: Path, *wrap_args: str) -> list[str]:
    server = [sys.executable, "-m", "warden.testing.mcp_server", "--call-log", str(call_log)]
    return [
        *("-m", "warden.cli", "mcp", "wrap", "--config", str(config)),
        *("--name", "support-tools", *wrap_args, "--", *server),
    ]


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k in ("PYTHONPATH",) if (v := os.environ.get(k))}
    return {**env, **extra}


async def refused(config: Path, call_log: Path, *wrap_args: str, **env: str) -> tuple[int, str]:
    """Run a wrap that should refuse to start; its exit code and what it said."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *wrap_command(config, call_log, *wrap_args),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**base_env(**env), "PATH": os.environ.get("PATH", "")},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert out == b"", "nothing may reach the MCP channel"
    return proc.returncode or 0, err.decode()


async def call_through(config: Path, call_log: Path, *wrap_args: str, **env: str) -> None:
    params = StdioServerParameters(
        command=sys.executable,
        args=wrap_command(config, call_log, *wrap_args),
        env=base_env(**env),
    )
    async with (
        stdio_client(params) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        result = await session.call_tool("search_kb", {"query": "refund policy"})
        assert not result.is_error


async def test_require_proof_refuses_a_wrap_without_a_credential(tmp_path: Path) -> None:
    config, call_log = proof_config(tmp_path), tmp_path / "calls.jsonl"
    code, said = await refused(config, call_log)
    assert code == 2
    assert "mcp wrap refused the agent" in said
    assert "'support-triage' must be proved" in said
    assert "WARDEN_AGENT_KEY" in said
    assert not call_log.exists() or tools_called(call_log) == []


async def test_a_wrap_acts_as_the_agent_its_key_proves(tmp_path: Path) -> None:
    config, call_log = proof_config(tmp_path), tmp_path / "calls.jsonl"
    await call_through(config, call_log, "--agent", "refunds-bot", WARDEN_AGENT_KEY=REFUNDS_KEY)
    await call_through(config, call_log, WARDEN_AGENT_KEY=TRIAGE_KEY)
    assert tools_called(call_log) == ["search_kb", "search_kb"]
    # One audit directory per config: both runs wrote to it one after the other.
    recorded = [(r["agent"]["id"], r["action"]["tool"]) for r in decisions(audit_dir(tmp_path))]
    assert recorded == [("refunds-bot", "search_kb"), ("support-triage", "search_kb")]


async def test_a_key_of_another_agent_or_none_for_a_named_one_is_refused(tmp_path: Path) -> None:
    config, call_log = proof_config(tmp_path), tmp_path / "calls.jsonl"
    code, said = await refused(
        config, call_log, "--agent", "refunds-bot", WARDEN_AGENT_KEY=TRIAGE_KEY
    )
    assert code == 2
    assert "proves agent 'support-triage', not 'refunds-bot'" in said
    # Without require_proof too: only agent.id is taken on trust.
    plain = write_config(tmp_path, "plain")
    code, said = await refused(plain, call_log, "--agent", "refunds-bot")
    assert code == 2
    assert "refunds-bot" in said
    assert not call_log.exists() or tools_called(call_log) == []


async def test_a_token_file_that_cannot_be_read_is_named(tmp_path: Path) -> None:
    config, call_log = proof_config(tmp_path), tmp_path / "calls.jsonl"
    missing = tmp_path / "no-such-token"
    code, said = await refused(config, call_log, "--token-file", str(missing))
    assert code == 2
    assert f"cannot read --token-file {missing}" in said


async def test_a_token_proves_the_agent_from_a_file_or_the_environment(tmp_path: Path) -> None:
    # WARDEN_AGENT_TOKEN was read as a setting (agent_token: unknown key) and stopped
    # every wrap before its token was looked at.
    issuer = Issuer()
    jwks = tmp_path / "jwks.json"
    jwks.write_bytes(issuer.jwks())
    config_path = proof_config(tmp_path)
    config: dict[str, Any] = orjson.loads(config_path.read_bytes())
    config["identity"]["jwt"] = {"issuer": ISSUER, "audience": AUDIENCE, "jwks_file": str(jwks)}
    config_path.write_bytes(orjson.dumps(config))
    call_log = tmp_path / "calls.jsonl"
    token = issuer.token("refunds-bot")
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    await call_through(config_path, call_log, "--token-file", str(token_file))
    await call_through(config_path, call_log, WARDEN_AGENT_TOKEN=token)
    recorded = [r["agent"]["id"] for r in decisions(audit_dir(tmp_path))]
    assert recorded == ["refunds-bot", "refunds-bot"]
    code, said = await refused(config_path, call_log, WARDEN_AGENT_TOKEN=Issuer().token())
    assert code == 2
    assert "401 unauthenticated" in said


async def test_a_token_is_proved_again_for_every_call_and_read_anew_from_its_file(
    tmp_path: Path,
) -> None:
    # A token was checked once, when the wrap started: a session kept acting for its
    # agent long after the token expired, and a rotated token file was never read.
    issuer = Issuer()
    jwks = tmp_path / "jwks.json"
    jwks.write_bytes(issuer.jwks())
    config_path = proof_config(tmp_path)
    config: dict[str, Any] = orjson.loads(config_path.read_bytes())
    config["identity"]["jwt"] = {
        "issuer": ISSUER,
        "audience": AUDIENCE,
        "jwks_file": str(jwks),
        "leeway_s": 0,
    }
    config_path.write_bytes(orjson.dumps(config))
    call_log = tmp_path / "calls.jsonl"
    token_file = tmp_path / "token"
    token_file.write_text(issuer.token())
    params = StdioServerParameters(
        command=sys.executable,
        args=wrap_command(config_path, call_log, "--token-file", str(token_file)),
        env=base_env(),
    )
    async with (
        stdio_client(params) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        # Started (however long that took): a token that expires in a moment.
        expires = int(time.time()) + 3
        token_file.write_text(issuer.token(exp=expires))
        assert not (await session.call_tool("search_kb", {"query": "first"})).is_error
        await asyncio.sleep(max(0.0, expires + 1 - time.time()))
        with pytest.raises(MCPError, match="Warden refused the agent") as expired:
            await session.call_tool("search_kb", {"query": "after expiry"})
        assert expired.value.error.code == -32001
        # The platform rotates the file (as Kubernetes projects a token): taken up.
        token_file.write_text(issuer.token())
        assert not (await session.call_tool("search_kb", {"query": "rotated"})).is_error
        # A file now proving another agent does not move the session to it.
        token_file.write_text(issuer.token("support-triage"))
        with pytest.raises(MCPError, match="proves agent 'support-triage', not 'refunds-bot'"):
            await session.call_tool("search_kb", {"query": "other agent"})
    assert tools_called(call_log) == ["search_kb", "search_kb"]
    recorded = [r["agent"]["id"] for r in decisions(audit_dir(tmp_path))]
    assert recorded == ["refunds-bot", "refunds-bot"]


async def test_an_expired_token_refuses_the_agents_answers_and_requests_too(
    tmp_path: Path,
) -> None:
    # Re-proved only for calls, an expired token still had its elicitation answers
    # decided and relayed, and tools/list served, where the HTTP doors refuse each.
    issuer = Issuer()
    jwks = tmp_path / "jwks.json"
    jwks.write_bytes(issuer.jwks())
    bundle = tmp_path / "allow"
    bundle.mkdir()
    (bundle / "policy.rego").write_text(ALLOW_ALL)
    config_path = proof_config(tmp_path)
    config: dict[str, Any] = orjson.loads(config_path.read_bytes())
    config["identity"]["jwt"] = {
        "issuer": ISSUER,
        "audience": AUDIENCE,
        "jwks_file": str(jwks),
        "leeway_s": 0,
    }
    config["policy"]["bundles"] = [str(bundle)]
    config_path.write_bytes(orjson.dumps(config))
    call_log = tmp_path / "calls.jsonl"
    token_file = tmp_path / "token"
    token_file.write_text(issuer.token())
    expires = 0.0
    asked: list[str] = []

    async def answer_late(context: Any, params: types.ElicitRequestParams) -> types.ElicitResult:
        asked.append(params.message)
        assert expires, "asked before the call"
        await asyncio.sleep(max(0.0, expires + 1 - time.time()))
        return types.ElicitResult(action="accept", content={"confirm": True})

    params = StdioServerParameters(
        command=sys.executable,
        args=wrap_command(config_path, call_log, "--token-file", str(token_file)),
        env=base_env(),
    )
    async with (
        stdio_client(params) as (read, write),
        ClientSession(read, write, elicitation_callback=answer_late) as session,
    ):
        await session.initialize()
        assert (await session.list_tools()).tools
        # Started: a token that expires while the server's question waits for its answer.
        expires = int(time.time()) + 3
        token_file.write_text(issuer.token(exp=expires))
        # The answer comes after expiry: refused (the retry that carries it, where the
        # server asks by input_required; the answer itself, where it asks by request).
        with pytest.raises(MCPError, match="Warden refused the agent"):
            await session.call_tool("confirm_with_user", {"action": "refund A-1"})
        assert asked, "the server asked nothing"
        assert time.time() > expires
        with pytest.raises(MCPError, match="Warden refused the agent") as listing:
            await session.list_tools()
        assert listing.value.error.code == -32001
    answered = [r for r in decisions(audit_dir(tmp_path)) if r["action"].get("input_responses")]
    assert answered == [], "an answer after expiry was decided"
