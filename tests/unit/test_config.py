"""Config loading: defaults, file, environment overrides, errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from warden.config import DEFAULT_MAX_BODY_BYTES, load_config, parse_listen
from warden.errors import ConfigError
from warden.model import Effect, Mode


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "warden.yaml"
    path.write_text(text)
    return path


def test_every_key_has_a_safe_default() -> None:
    config = load_config(environ={})
    assert config.mode is Mode.ENFORCE
    assert config.policy.default_effect is Effect.DENY
    assert config.listen.proxy == "127.0.0.1:8080"
    assert config.listen.admin == "127.0.0.1:8081"
    assert config.limits.max_body_bytes == DEFAULT_MAX_BODY_BYTES
    assert config.audit.fsync == "always"
    assert set(config.upstreams) == {"openai", "anthropic"}
    # Fail closed unless a tool is declared read-only.
    assert config.policy.fallback[config.risk_of("issue_refund")] is Effect.DENY


def test_issue_example_file_loads(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
agent: {id: support-triage}
listen: {proxy: 127.0.0.1:8080, admin: 127.0.0.1:8081}
upstreams:
  openai:    {protocol: openai,    base_url: https://api.openai.com}
  anthropic: {protocol: anthropic, base_url: https://api.anthropic.com/}
policy: {bundles: [policies/customer-support], query: data.warden.decision}
audit: {dir: ./warden-data/audit}
state: {url: sqlite:///./warden-data/state.db}
tools: {search_kb: {risk: read_only}}
""",
    )
    config = load_config(path, environ={})
    assert config.agent.id == "support-triage"
    assert config.upstreams["anthropic"].base_url == "https://api.anthropic.com"
    assert config.policy.fallback[config.risk_of("search_kb")] is Effect.ALLOW


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("policy: {deadline_ms: -1}", "policy.deadline_ms"),
        ("listen: {proxy: nonsense}", "listen.proxy"),
        ("upstreams: {x: {protocol: openai, base_url: ftp://a}}", "upstreams.x.base_url"),
        ("upstreams: {x: {protocol: smtp, base_url: http://a}}", "upstreams.x.protocol"),
        ("audit: {fsync: sometimes}", "audit.fsync"),
        ("polcy: {}", "polcy"),
        ("mode: shadow", "mode"),
        ("state: {url: mysql://x}", "state.url"),
        ("limits: {max_body_bytes: 10}", "limits.max_body_bytes"),
        ("ext_proc: {max_message_timeout_s: 0.1, extend_after_ms: 100}", "ext_proc"),
        ("approvals: {bind_context: []}", "approvals.bind_context"),
    ],
)
def test_invalid_values_name_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), environ={})
    assert f"{key}:" in str(info.value)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("console: {public_url: 'https://admin:PLANTED-pw@warden.example'}", "console.public_url"),
        ("console: {public_url: 'ftp://PLANTED-pw@x'}", "console.public_url"),
        (
            "upstreams: {x: {protocol: openai, base_url: 'http://u:PLANTED-pw@a'}}",
            "upstreams.x.base_url",
        ),
    ],
)
def test_a_url_with_a_password_is_refused_without_being_quoted(
    tmp_path: Path, text: str, key: str
) -> None:
    """Config errors go to stderr and the log pipeline: they name the key, not the value."""
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), environ={})
    assert f"{key}:" in str(info.value)
    assert "PLANTED" not in str(info.value)


def test_not_a_mapping_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"), environ={})
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "a: [\n"), environ={})
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml", environ={})


def test_a_yaml_error_says_where_without_quoting_the_line(tmp_path: Path) -> None:
    """A broken line may hold a secret: the error names its line and column, not its text."""
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, 'state:\n  password: "hunter2\n'), environ={})
    assert "not valid YAML" in str(info.value)
    assert "line 3, column 1" in str(info.value)
    assert "hunter2" not in str(info.value)
    # A text setting is not read as YAML at all (tests/unit/test_config_env.py); one that
    # takes a list is, and its error names the variable, not what it holds.
    env = {"WARDEN_POLICY__BUNDLES": '["a", "s3cret'}
    with pytest.raises(ConfigError) as info:
        load_config(None, environ=env)
    assert "WARDEN_POLICY__BUNDLES: not a valid value for policy.bundles" in str(info.value)
    assert "s3cret" not in str(info.value)


def test_environment_overrides_file(tmp_path: Path) -> None:
    path = write(tmp_path, "mode: enforce\nlisten: {proxy: 127.0.0.1:9000}\n")
    env = {
        "WARDEN_MODE": "observe",
        "WARDEN_LISTEN__ADMIN": "127.0.0.1:9001",
        "WARDEN_POLICY__DEADLINE_MS": "25",
        "WARDEN_TOKEN": "not-config",  # reserved for the CLI, never an override
        "OTHER": "ignored",
    }
    config = load_config(path, environ=env)
    assert config.mode is Mode.OBSERVE
    assert config.listen.proxy == "127.0.0.1:9000"
    assert config.listen.admin == "127.0.0.1:9001"
    assert config.policy.deadline_ms == 25


def test_kubernetes_service_links_are_no_settings(tmp_path: Path) -> None:
    # Set in every pod of a namespace with a Service named warden (or warden-admin).
    env = {
        "WARDEN_SERVICE_HOST": "10.0.0.7",
        "WARDEN_SERVICE_PORT": "8080",
        "WARDEN_SERVICE_PORT_PROXY": "8080",
        "WARDEN_PORT": "tcp://10.0.0.7:8080",
        "WARDEN_PORT_8080_TCP": "tcp://10.0.0.7:8080",
        "WARDEN_PORT_8080_TCP_PROTO": "tcp",
        "WARDEN_ADMIN_PORT_8081_TCP_ADDR": "10.0.0.8",
        "WARDEN_ADMIN_SERVICE_HOST": "10.0.0.8",
        "WARDEN_MODE": "observe",
    }
    assert load_config(None, environ=env).mode is Mode.OBSERVE


def test_a_key_given_twice_in_the_file_is_an_error(tmp_path: Path) -> None:
    # YAML would take the last: observe, silently.
    text = "mode: enforce\ntools: {a: {risk: high}}\nmode: observe\n"
    with pytest.raises(ConfigError, match=r"the key 'mode' is given twice \(line 3"):
        load_config(write(tmp_path, text), environ={})
    merged = "base: &b {risk: high}\ntools:\n  a:\n    <<: *b\n    risk: read_only\n"
    with pytest.raises(ConfigError, match="base: unknown key"):  # a merge may be overridden
        load_config(write(tmp_path, merged), environ={})


def test_environment_typo_is_an_error() -> None:
    with pytest.raises(ConfigError, match="lsten: unknown key"):
        load_config(environ={"WARDEN_LSTEN__PROXY": "127.0.0.1:1"})


def test_mode_per_agent() -> None:
    config = load_config(
        environ={},
        overrides={
            "mode": "enforce",
            "agent": {"id": "triage", "mode": "observe"},
            "agents": {"refunds": {"mode": "enforce"}, "drafts": {"mode": "observe"}},
        },
    )
    assert config.mode_for("triage") is Mode.OBSERVE
    assert config.mode_for("drafts") is Mode.OBSERVE
    assert config.mode_for("refunds") is Mode.ENFORCE
    assert config.mode_for("anyone-else") is Mode.ENFORCE


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:0", ("127.0.0.1", 0)),
        ("[::1]:8080", ("::1", 8080)),
        ("0.0.0.0:80", ("0.0.0.0", 80)),
    ],
)
def test_parse_listen(value: str, expected: tuple[str, int]) -> None:
    assert parse_listen(value) == expected


@pytest.mark.parametrize("value", ["8080", ":8080", "host:", "host:99999", "host:http"])
def test_parse_listen_rejects(value: str) -> None:
    with pytest.raises(ValueError, match="host:port"):
        parse_listen(value)


def test_bound_context_keys_are_spelled_as_policies_see_them(tmp_path: Path) -> None:
    text = "approvals: {bind_context: [Customer-Id, ' tenant_id ']}"
    config = load_config(write(tmp_path, text), environ={})
    assert config.approvals.bind_context == ("customer_id", "tenant_id")


def test_a_runner_no_one_need_prove_cannot_report_trusted_outcomes() -> None:
    # Without require_proof any caller is the sidecar's own agent: it would release caps.
    own = {
        "agent": {"id": "support-triage"},
        "grpc": {"outcome_reporters": {"support-triage": ["bot"]}},
    }
    with pytest.raises(ConfigError, match="outcome_reporters: 'support-triage' is this sidecar"):
        load_config(environ={}, overrides=own)
    proved = {**own, "identity": {"require_proof": True}}
    assert load_config(environ={}, overrides=proved).grpc.outcome_reporters
    runner = {"grpc": {"outcome_reporters": {"tool-runner": ["bot"]}}}
    assert load_config(environ={}, overrides=runner).grpc.outcome_reporters


def test_ext_proc_hosts_without_upstream_from_authority_is_an_error() -> None:
    # Read only by authority: with the route default it would be ignored, refusing traffic.
    with pytest.raises(ConfigError, match="only upstream_from: authority reads"):
        load_config(environ={}, overrides={"ext_proc": {"hosts": {"127.0.0.1": "openai"}}})
    by_authority = {"ext_proc": {"upstream_from": "authority", "hosts": {"127.0.0.1": "openai"}}}
    assert load_config(environ={}, overrides=by_authority).ext_proc.hosts
