"""The pure helpers of the Envoy ext_proc door: authority, header maps, mutations, errors."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from envoy.config.core.v3 import base_pb2

from warden.config import Config, load_config
from warden.errors import ConfigError, RequestError
from warden.ingress.envoy_proc import (
    UnknownUpstream,
    UpstreamHosts,
    authority_host,
    header_map,
    header_mutation,
    immediate_response,
)


def config(**overrides: Any) -> Config:
    base: dict[str, Any] = {
        "upstreams": {
            "openai": {"protocol": "openai", "base_url": "https://api.openai.com/v1"},
            "anthropic": {"protocol": "anthropic", "base_url": "https://API.anthropic.com"},
            "azure-a": {"protocol": "openai", "base_url": "https://shared.example:8443/a"},
            "azure-b": {"protocol": "openai", "base_url": "https://shared.example/b"},
        }
    }
    return load_config(environ={}, overrides={**base, **overrides})


@pytest.mark.parametrize(
    ("authority", "host"),
    [
        ("api.openai.com", "api.openai.com"),
        ("API.OpenAI.com:443", "api.openai.com"),
        ("api.openai.com.", "api.openai.com"),
        ("127.0.0.1:8080", "127.0.0.1"),
        ("[::1]:8443", "::1"),
        ("[2001:db8::1]", "2001:db8::1"),
        ("", ""),
    ],
)
def test_authority_host(authority: str, host: str) -> None:
    assert authority_host(authority) == host


def test_upstream_by_base_url_host_ignoring_port_and_case() -> None:
    hosts = UpstreamHosts(config())
    assert hosts.resolve("api.openai.com:443")[0] == "openai"
    assert hosts.resolve("api.anthropic.com")[0] == "anthropic"


def test_unknown_and_ambiguous_hosts_are_refused() -> None:
    hosts = UpstreamHosts(config())
    with pytest.raises(UnknownUpstream, match="matches no upstream"):
        hosts.resolve("api.openai.com.evil.example")
    with pytest.raises(UnknownUpstream, match="azure-a, azure-b; name one in ext_proc.hosts"):
        hosts.resolve("shared.example")
    assert UnknownUpstream.status == 403


def test_hosts_mapping_overrides_base_url_hosts() -> None:
    hosts = UpstreamHosts(
        config(
            ext_proc={
                "upstream_from": "authority",
                "hosts": {"Shared.Example": "azure-b", "gateway.internal": "openai"},
            }
        )
    )
    assert hosts.resolve("shared.example:8443")[0] == "azure-b"
    assert hosts.resolve("gateway.internal")[0] == "openai"
    assert hosts.resolve("api.openai.com")[0] == "openai"


def test_hosts_mapping_must_name_an_upstream() -> None:
    with pytest.raises(ConfigError, match=r"ext_proc.hosts.x.example: no upstream named 'nope'"):
        UpstreamHosts(
            config(ext_proc={"upstream_from": "authority", "hosts": {"x.example": "nope"}})
        )


def test_header_map_keeps_repeats_and_reads_raw_value_then_value() -> None:
    headers = header_map(
        base_pb2.HeaderMap(
            headers=[
                base_pb2.HeaderValue(key=":authority", raw_value=b"api.openai.com"),
                base_pb2.HeaderValue(key="x-warden-agent", raw_value=b"a"),
                base_pb2.HeaderValue(key="x-warden-agent", raw_value=b"b"),
                base_pb2.HeaderValue(key="user-agent", value="old-envoy"),
            ]
        )
    )
    assert headers.getall("X-Warden-Agent") == ["a", "b"]
    assert headers[":authority"] == "api.openai.com"
    assert headers["user-agent"] == "old-envoy"


def test_header_map_refuses_non_utf8() -> None:
    with pytest.raises(RequestError, match="not UTF-8"):
        header_map(base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key="x", raw_value=b"\xff")]))


def test_header_mutation_overwrites_and_removes() -> None:
    mutation = header_mutation({"Content-Length": "12"}, remove=["b", "a", "b"])
    assert list(mutation.remove_headers) == ["a", "b"]
    (option,) = mutation.set_headers
    assert option.header.key == "content-length"
    assert option.header.raw_value == b"12"
    assert option.append_action == base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


@pytest.mark.parametrize(
    ("family", "shape"),
    [("openai", ("error", "code")), ("anthropic", ("error", "type"))],
)
def test_immediate_response_in_the_providers_shape(family: str, shape: tuple[str, str]) -> None:
    answer = immediate_response(family, 403, "denied", "no", decision_id="dec_1")
    immediate = answer.immediate_response
    assert immediate.status.code == 403
    body = orjson.loads(immediate.body)
    assert shape[1] in body[shape[0]]
    headers = {o.header.key: o.header.raw_value for o in immediate.headers.set_headers}
    assert headers == {"content-type": b"application/json", "x-warden-decision-id": b"dec_1"}
    assert immediate.details == "warden_denied"
