"""``WARDEN_*`` overrides: text kept as written, errors that name the variable, not its value."""

from __future__ import annotations

from pathlib import Path

import pytest

from warden.config import load_config
from warden.errors import ConfigError
from warden.model import Mode

# Each of these, read as YAML, became something else or an error quoting part of it.
AWKWARD = ("012345", "yes", "&anchor pw", "p@ss: word", "*secret", '"quoted', "null", "0x1F")


@pytest.mark.parametrize("value", AWKWARD)
def test_a_secret_from_the_environment_is_taken_as_written(value: str) -> None:
    env = {
        "WARDEN_STATE__PASSWORD": value,
        "WARDEN_AUDIT__SHIP__URL": "postgresql://warden@db/audit",
        "WARDEN_AUDIT__SHIP__PASSWORD": value,
        "WARDEN_APPROVALS__WEBHOOK__SECRET": value,
        "WARDEN_POLICY__SIGNING__KEYS__K1": value,
    }
    config = load_config(environ=env)
    assert config.state.password is not None
    assert config.state.password.get_secret_value() == value
    assert config.audit.ship is not None
    assert config.audit.ship.password is not None
    assert config.audit.ship.password.get_secret_value() == value
    assert config.approvals.webhook.secret == value
    assert config.policy.signing.keys == {"k1": value}


def test_other_text_settings_are_taken_as_written() -> None:
    env = {"WARDEN_AGENT__VERSION": "1.10", "WARDEN_AUDIT__DIR": "yes", "WARDEN_MODE": "observe"}
    config = load_config(environ=env)
    assert config.agent.version == "1.10"  # YAML: the float 1.1, refused as text
    assert config.audit.dir == "yes"
    assert config.mode is Mode.OBSERVE


def test_numbers_booleans_lists_and_maps_are_still_read_as_yaml() -> None:
    env = {
        "WARDEN_POLICY__DEADLINE_MS": "25",
        "WARDEN_CONSOLE__ENABLED": "false",
        "WARDEN_POLICY__BUNDLES": "[a, b]",
        "WARDEN_TOOLS__ISSUE_REFUND": "{risk: high}",
        "WARDEN_GRPC__OUTCOME_REPORTERS__RUNNER": "[refunds-bot]",
    }
    config = load_config(environ=env)
    assert config.policy.deadline_ms == 25
    assert config.console.enabled is False
    assert config.policy.bundles == ("a", "b")
    assert config.tools["issue_refund"].risk == "high"
    assert config.grpc.outcome_reporters == {"runner": ["refunds-bot"]}


def test_a_bad_yaml_value_names_the_variable_and_never_the_value() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(environ={"WARDEN_POLICY__BUNDLES": "[a, *s3cret-alias"})
    message = str(info.value)
    assert message.startswith("WARDEN_POLICY__BUNDLES: not a valid value for policy.bundles")
    assert "a list" in message
    assert "s3cret" not in message


def test_the_agent_key_variable_is_the_sdks_not_a_setting() -> None:
    # README and docs/identity.md give the agent its key in WARDEN_AGENT_KEY.
    config = load_config(environ={"WARDEN_AGENT_KEY": "wk_s3cret", "WARDEN_MODE": "observe"})
    assert config.mode is Mode.OBSERVE


def test_a_validation_error_names_the_variable_that_set_the_key() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(environ={"WARDEN_AGENT_KEYS": "wk_s3cret"})
    assert "agent_keys: unknown key (set by WARDEN_AGENT_KEYS)" in str(info.value)
    assert "s3cret" not in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config(environ={"WARDEN_POLICY__DEADLINE_MS": "soon"})
    assert "policy.deadline_ms: " in str(info.value)
    assert "(set by WARDEN_POLICY__DEADLINE_MS)" in str(info.value)
    # A section the variable wrote into is named too (the check is the section's).
    env = {
        "WARDEN_UPSTREAMS__X__PROTOCOL": "openai",
        "WARDEN_UPSTREAMS__X__BASE_URL": "https://api.example",
        "WARDEN_UPSTREAMS__X__CREDENTIAL__HEADER": "X-Api-Key",
    }
    with pytest.raises(ConfigError) as info:
        load_config(environ=env)
    assert "upstreams.x.credential: Value error, set exactly one of env and file" in str(info.value)
    assert "(set by WARDEN_UPSTREAMS__X__CREDENTIAL__HEADER)" in str(info.value)


def test_a_key_set_elsewhere_names_no_variable() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(environ={"WARDEN_MODE": "observe"}, overrides={"agent_keys": "x"})
    assert "agent_keys: unknown key" in str(info.value)
    assert "set by" not in str(info.value)


def test_a_file_yaml_error_quotes_no_alias_or_tag_it_read(tmp_path: Path) -> None:
    # An alias or tag the parser could not resolve may be a secret written unquoted.
    for text in ("state:\n  password: *Hunter2SecretPw\n", "state:\n  password: !S3cr3t x\n"):
        path = tmp_path / "warden.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError) as info:
            load_config(path, environ={})
        assert "Hunter2SecretPw" not in str(info.value)
        assert "S3cr3t" not in str(info.value)
        assert "line 2" in str(info.value)
