"""Upstream keys Warden holds: reading them, putting them in place of the agent's, rotation."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from multidict import CIMultiDict, CIMultiDictProxy
from prometheus_client import REGISTRY

from warden.config import UpstreamConfig, load_config
from warden.credentials import Credentials
from warden.errors import ConfigError
from warden.ingress.headers import request_headers

KEY = "sk-held-by-warden-0123456789"


def upstreams(**credentials: dict[str, Any]) -> dict[str, UpstreamConfig]:
    protocols = {"openai": "openai", "anthropic": "anthropic", "tools": "http", "mcp": "mcp"}
    return {
        name: UpstreamConfig(
            protocol=protocols[name], base_url="http://127.0.0.1:9", credential=credential
        )
        for name, credential in credentials.items()
    }


def sent(held: Credentials, upstream: str) -> tuple[str, str]:
    """The header and value Warden sends ``upstream``."""
    credential = held.get(upstream)
    assert credential is not None
    return credential.header, credential.value


def agent_headers(**extra: str) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict({"Content-Type": "application/json", **extra}))


def reloads(upstream: str, result: str) -> float:
    value = REGISTRY.get_sample_value(
        "warden_credential_reloads_total", {"upstream": upstream, "result": result}
    )
    return value or 0.0


def test_defaults_follow_the_protocol() -> None:
    env = {"OPENAI_KEY": KEY, "ANTHROPIC_KEY": KEY + "-a", "TOOLS_KEY": KEY + "-t"}
    held = Credentials.load(
        upstreams(
            openai={"env": "OPENAI_KEY"},
            anthropic={"env": "ANTHROPIC_KEY"},
            tools={"env": "TOOLS_KEY", "header": "X-Api-Token"},
        ),
        env,
    )
    assert sent(held, "openai") == ("Authorization", f"Bearer {KEY}")
    assert sent(held, "anthropic") == ("x-api-key", KEY + "-a")
    # Another header carries the key bare unless a scheme is named.
    assert sent(held, "tools") == ("X-Api-Token", KEY + "-t")
    assert held.get("mcp") is None
    assert held
    assert not held.watched


def test_scheme_can_be_named_or_left_out() -> None:
    env = {"K": KEY}
    held = Credentials.load(
        upstreams(
            openai={"env": "K", "scheme": ""},
            tools={"env": "K", "header": "X-T", "scheme": "Token"},
        ),
        env,
    )
    assert sent(held, "openai") == ("Authorization", KEY)
    assert sent(held, "tools") == ("X-T", f"Token {KEY}")


def test_the_key_is_never_shown() -> None:
    held = Credentials.load(upstreams(openai={"env": "K"}), {"K": KEY})
    assert KEY not in repr(held.get("openai"))
    assert KEY not in repr(held)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "upstreams.openai.credential.env: K is not set in Warden's environment"),
        ({"K": "  \n"}, "upstreams.openai.credential.env (K) holds no key"),
        ({"K": "sk-abc\x01def"}, "the key holds characters a header cannot carry"),
        ({"K": "sk-abc déf"}, "the key holds characters a header cannot carry"),
    ],
)
def test_an_unusable_key_stops_the_start_naming_the_setting(
    env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        Credentials.load(upstreams(openai={"env": "K"}), env)
    assert message in str(caught.value)
    assert "abc" not in str(caught.value)  # never the text itself


def test_a_key_file_is_read_to_its_first_line(tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.write_text(f"{KEY}\nignored\n")
    held = Credentials.load(upstreams(openai={"file": str(path)}), {})
    assert sent(held, "openai")[1] == f"Bearer {KEY}"
    assert held.watched
    with pytest.raises(ConfigError, match=r"credential.file: cannot read .*missing"):
        Credentials.load(upstreams(openai={"file": str(tmp_path / "missing")}), {})


def test_a_changed_file_is_read_again_and_a_broken_one_keeps_the_last_key(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "key"
    path.write_text(KEY)
    held = Credentials.load(upstreams(openai={"file": str(path)}), {})
    assert held.reread() == {}  # unchanged: not read again
    ok, failed = reloads("openai", "ok"), reloads("openai", "failed")

    path.write_text("sk-rotated-1")
    changed = held.reread()
    held.apply(changed)
    assert sent(held, "openai")[1] == "Bearer sk-rotated-1"
    assert reloads("openai", "ok") == ok + 1

    # Emptied (a Secret being rewritten, an operator's mistake): the last key stays.
    path.write_text("")
    assert held.reread() == {}
    assert held.reread() == {}  # warned and counted once, not at every check
    assert sent(held, "openai")[1] == "Bearer sk-rotated-1"
    assert reloads("openai", "failed") == failed + 1
    os.unlink(path)
    assert held.reread() == {}

    path.write_text("sk-rotated-2\n")
    held.apply(held.reread())
    assert sent(held, "openai")[1] == "Bearer sk-rotated-2"
    assert "sk-rotated" not in caplog.text
    assert "the last key stays in use" in caplog.text


def test_the_agents_credentials_are_dropped_and_wardens_sent() -> None:
    held = Credentials.load(upstreams(openai={"env": "K"}), {"K": KEY}).get("openai")
    incoming = agent_headers(
        Authorization="Bearer sk-agent-own",
        **{"x-api-key": "agent", "api-key": "agent", "X-Goog-Api-Key": "agent"},
        **{"X-Warden-Agent-Key": "k", "OpenAI-Beta": "assistants=v2", "Cookie": "lb=a"},
        **{"OpenAI-Organization": "org-other", "OpenAI-Project": "proj-other"},
    )
    sent = request_headers(incoming, held)
    assert sent.getall("Authorization") == [f"Bearer {KEY}"]
    dropped = ("x-api-key", "api-key", "x-goog-api-key", "x-warden-agent-key")
    for name in (*dropped, "openai-organization", "openai-project"):
        assert name not in sent
    assert sent["OpenAI-Beta"] == "assistants=v2"
    assert sent["Cookie"] == "lb=a"  # a load balancer's stickiness is no credential
    # Without a held key the agent's own goes through, as before.
    assert request_headers(incoming)["Authorization"] == "Bearer sk-agent-own"


def test_a_custom_header_of_the_agents_is_replaced_too() -> None:
    held = Credentials.load(upstreams(tools={"env": "K", "header": "X-Api-Token"}), {"K": KEY}).get(
        "tools"
    )
    sent = request_headers(agent_headers(**{"x-api-token": "agent-forged"}), held)
    assert sent.getall("X-Api-Token") == [KEY]


@pytest.mark.parametrize(
    ("credential", "message"),
    [
        ({}, "set exactly one of env and file"),
        ({"env": "K", "file": "/k"}, "set exactly one of env and file"),
        ({"env": "K", "header": "Bad Header"}, "is not a valid header name"),
        ({"env": "K", "header": "X-Warden-Agent-Key"}, "X-Warden-* headers are Warden's own"),
        ({"env": "K", "scheme": "Bearer x"}, "must be one word"),
        ({"env": "K", "header": "Host"}, "frames or routes the request"),
        ({"env": "K", "header": "transfer-encoding"}, "frames or routes the request"),
    ],
)
def test_the_config_names_what_is_wrong(credential: dict[str, Any], message: str) -> None:
    upstream = {"protocol": "openai", "base_url": "http://127.0.0.1:9", "credential": credential}
    with pytest.raises(ConfigError, match=message.replace("*", r"\*")):
        load_config(environ={}, overrides={"upstreams": {"openai": upstream}})
