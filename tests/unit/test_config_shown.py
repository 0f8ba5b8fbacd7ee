"""``warden config``'s view: secrets that are set are masked, unset ones stay null."""

from __future__ import annotations

from warden.config import load_config
from warden.config_shown import shown_config

UPSTREAM = {"protocol": "openai", "base_url": "https://api.openai.com"}


def test_unset_secrets_are_null_not_redacted() -> None:
    shown = shown_config(load_config(environ={}, overrides={"upstreams": {"openai": UPSTREAM}}))
    assert shown["upstreams"]["openai"]["credential"] is None
    assert shown["identity"]["jwt"] is None
    assert shown["approvals"]["webhook"]["secret"] is None
    assert shown["state"]["password"] is None
    assert shown["state"]["password_file"] is None


def test_set_secrets_are_still_masked() -> None:
    overrides = {
        "upstreams": {"openai": {**UPSTREAM, "credential": {"env": "OPENAI_API_KEY"}}},
        "approvals": {"webhook": {"url": "https://hooks.example/x", "secret": "whsec-s3cret"}},
        "state": {"password": "pg-s3cret", "password_file": "/run/secrets/pg"},
    }
    shown = shown_config(load_config(environ={}, overrides=overrides))
    assert shown["approvals"]["webhook"]["secret"] == "[redacted]"
    assert shown["state"]["password"] == "[redacted]"
    assert shown["state"]["password_file"] == "[redacted]"
    assert shown["upstreams"]["openai"]["credential"]["env"] == "OPENAI_API_KEY"  # walked
    assert "s3cret" not in repr(shown)


def test_a_sqlite_url_is_shown_as_written() -> None:
    config = load_config(environ={}, overrides={"state": {"url": "sqlite:///./data/state.db"}})
    assert shown_config(config)["state"]["url"] == "sqlite:///./data/state.db"
    config = load_config(environ={}, overrides={"state": {"url": "sqlite:////var/w/state.db"}})
    assert shown_config(config)["state"]["url"] == "sqlite:////var/w/state.db"
