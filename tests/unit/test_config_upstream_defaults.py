"""``upstreams``: what a config that names some gets, and what it no longer gets.

An upstream named ``openai`` or ``anthropic`` takes that protocol (and the
provider's base URL) unless it says otherwise; naming any upstream replaces
both defaults, so an operator who lists the upstreams Warden may call gets
those and no others.
"""

from __future__ import annotations

from typing import Any

import pytest

from warden.config import PROVIDER_UPSTREAMS, load_config
from warden.errors import ConfigError


def upstreams(**given: Any) -> dict[str, tuple[str, str]]:
    config = load_config(environ={}, overrides={"upstreams": given})
    return {name: (up.protocol, up.base_url) for name, up in config.upstreams.items()}


def test_no_upstreams_named_gives_both_providers() -> None:
    config = load_config(environ={})
    assert {n: (u.protocol, u.base_url) for n, u in config.upstreams.items()} == {
        "openai": ("openai", "https://api.openai.com"),
        "anthropic": ("anthropic", "https://api.anthropic.com"),
    }
    assert dict(PROVIDER_UPSTREAMS) == {n: u.base_url for n, u in config.upstreams.items()}


def test_a_base_url_alone_on_openai_takes_the_openai_protocol() -> None:
    assert upstreams(openai={"base_url": "http://llm:8000"}) == {
        "openai": ("openai", "http://llm:8000")
    }


def test_the_environment_alone_can_point_openai_elsewhere() -> None:
    config = load_config(environ={"WARDEN_UPSTREAMS__OPENAI__BASE_URL": "http://127.0.0.1:9"})
    assert {n: (u.protocol, u.base_url) for n, u in config.upstreams.items()} == {
        "openai": ("openai", "http://127.0.0.1:9")
    }


def test_a_named_provider_with_nothing_else_is_the_real_provider() -> None:
    assert upstreams(anthropic=None, openai={"protocol": "openai"}) == {
        "anthropic": ("anthropic", "https://api.anthropic.com"),
        "openai": ("openai", "https://api.openai.com"),
    }


def test_a_tuning_alone_adds_no_route_to_the_public_provider() -> None:
    # WARDEN_UPSTREAMS__OPENAI__TIMEOUT_S=600 beside a YAML naming a local model server:
    # the public provider became reachable, unasked and unsaid.
    with pytest.raises(ConfigError, match=r"upstreams\.openai\.base_url: Field required"):
        upstreams(
            llm={"protocol": "openai", "base_url": "http://vllm:8000"}, openai={"timeout_s": 600}
        )


def test_naming_upstreams_replaces_the_defaults() -> None:
    # An operator listing the hosts Warden may call gets no other one silently.
    assert upstreams(anthropic={"base_url": "http://claude:8000"}) == {
        "anthropic": ("anthropic", "http://claude:8000")
    }
    assert upstreams(crm={"protocol": "http", "base_url": "http://crm:80"}) == {
        "crm": ("http", "http://crm:80")
    }


def test_a_protocol_given_is_kept_and_its_url_is_never_guessed() -> None:
    assert upstreams(openai={"protocol": "openai", "base_url": "http://a:1"}) == {
        "openai": ("openai", "http://a:1")
    }
    with pytest.raises(ConfigError, match=r"upstreams\.openai\.base_url: Field required"):
        upstreams(openai={"protocol": "anthropic"})


def test_other_names_still_need_a_protocol() -> None:
    with pytest.raises(ConfigError, match=r"upstreams\.crm\.protocol: Field required"):
        upstreams(crm={"base_url": "http://crm:80"})


def test_an_upstream_that_is_not_a_mapping_is_named_in_the_error() -> None:
    with pytest.raises(ConfigError, match=r"upstreams\.openai"):
        upstreams(openai="https://api.openai.com")
