"""deploy/envoy/envoy.yaml is a valid Envoy Bootstrap, checked with xds-protos (no Envoy here).

Parsed as Envoy would read it: YAML to JSON to the ``Bootstrap`` message, with
unknown fields rejected and every ``typed_config`` resolved to its message.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

# Imported for their descriptors: a typed_config's "@type" resolves through them.
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.extensions.filters.http.ext_authz.v3 import ext_authz_pb2
from envoy.extensions.filters.http.ext_proc.v3 import ext_proc_pb2, processing_mode_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2,
)
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from google.protobuf import json_format

from warden.config import load_config
from warden.ingress.envoy_proc import UPSTREAM_METADATA

ROOT = Path(__file__).resolve().parents[2]
ENVOY_YAML = ROOT / "deploy" / "envoy" / "envoy.yaml"


def _document() -> Any:
    """The YAML as the JSON Envoy would see (YAML-only types would fail here)."""
    return json.loads(json.dumps(yaml.safe_load(ENVOY_YAML.read_text())))


def _bootstrap() -> Any:
    doc = _document()
    bootstrap = bootstrap_pb2.Bootstrap()
    json_format.ParseDict(doc, bootstrap, ignore_unknown_fields=False)
    return bootstrap


def _manager() -> Any:
    listener = _bootstrap().static_resources.listeners[0]
    typed = listener.filter_chains[0].filters[0].typed_config
    manager = http_connection_manager_pb2.HttpConnectionManager()
    assert typed.Unpack(manager)
    return manager


def _filter(name: str, message: Any) -> Any:
    found = next(f for f in _manager().http_filters if f.name == name)
    assert found.typed_config.Unpack(message)
    return message


def test_the_example_parses_with_unknown_fields_rejected() -> None:
    bootstrap = _bootstrap()
    clusters = {c.name: c for c in bootstrap.static_resources.clusters}
    assert set(clusters) == {"warden", "tool_api", "openai"}
    endpoint = clusters["warden"].load_assignment.endpoints[0].lb_endpoints[0].endpoint
    address = endpoint.address.socket_address
    assert (address.address, address.port_value) == ("127.0.0.1", 9090)
    options = http_protocol_options_pb2.HttpProtocolOptions()
    typed = clusters["warden"].typed_extension_protocol_options[
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ]
    assert typed.Unpack(options)
    assert options.explicit_http_config.HasField("http2_protocol_options")  # gRPC needs HTTP/2
    tls = tls_pb2.UpstreamTlsContext()
    assert clusters["openai"].transport_socket.typed_config.Unpack(tls)
    assert tls.sni == "api.openai.com"


def test_ext_authz_goes_to_warden_and_fails_closed() -> None:
    authz = _filter("envoy.filters.http.ext_authz", ext_authz_pb2.ExtAuthz())
    assert authz.grpc_service.envoy_grpc.cluster_name == "warden"
    assert authz.transport_api_version == 2  # V3
    assert authz.failure_mode_allow is False
    assert authz.with_request_body.pack_as_bytes


def test_ext_proc_goes_to_warden_with_bodies_and_fails_closed() -> None:
    proc = _filter("envoy.filters.http.ext_proc", ext_proc_pb2.ExternalProcessor())
    assert proc.grpc_service.envoy_grpc.cluster_name == "warden"
    assert proc.failure_mode_allow is False
    mode = proc.processing_mode
    modes = processing_mode_pb2.ProcessingMode
    assert mode.request_body_mode == modes.BUFFERED
    assert mode.response_body_mode in (modes.BUFFERED, modes.STREAMED)
    names = [f.name for f in _manager().http_filters]
    assert names[-1] == "envoy.filters.http.router"
    assert _filter("envoy.filters.http.router", router_pb2.Router()) is not None


def test_ext_proc_timeouts_match_the_warden_example() -> None:
    # A short message_timeout works only if Warden may extend a held answer to
    # the filter's max_message_timeout: the README's warden.yaml must say so.
    proc = _filter("envoy.filters.http.ext_proc", ext_proc_pb2.ExternalProcessor())
    readme = (ENVOY_YAML.parent / "README.md").read_text()
    example = yaml.safe_load(readme.split("```yaml\n", 1)[1].split("```", 1)[0])
    config = load_config(environ={}, overrides=example | {"policy": {"bundles": []}})
    limit = config.ext_proc.max_message_timeout_s
    assert limit == proc.max_message_timeout.ToTimedelta().total_seconds()
    assert (
        proc.message_timeout.ToTimedelta().total_seconds() * 1000 > config.ext_proc.extend_after_ms
    )


def test_routes_pick_the_filter_per_traffic_kind() -> None:
    routes = _manager().route_config.virtual_hosts[0].routes
    llm, tools = routes[0], routes[1]
    off = ext_authz_pb2.ExtAuthzPerRoute()
    assert llm.typed_per_filter_config["envoy.filters.http.ext_authz"].Unpack(off)
    assert off.disabled
    proc_off = ext_proc_pb2.ExtProcPerRoute()
    assert tools.typed_per_filter_config["envoy.filters.http.ext_proc"].Unpack(proc_off)
    assert proc_off.disabled


def test_the_llm_route_names_its_upstream_to_warden() -> None:
    # ext_proc.upstream_from: route; the README's warden.yaml must have that upstream.
    llm = _manager().route_config.virtual_hosts[0].routes[0]
    named = ext_proc_pb2.ExtProcPerRoute()
    assert llm.typed_per_filter_config["envoy.filters.http.ext_proc"].Unpack(named)
    metadata = {m.key: m.value for m in named.overrides.grpc_initial_metadata}
    assert metadata == {UPSTREAM_METADATA: llm.route.cluster}
    readme = (ENVOY_YAML.parent / "README.md").read_text()
    example = yaml.safe_load(readme.split("```yaml\n", 1)[1].split("```", 1)[0])
    config = load_config(environ={}, overrides=example | {"policy": {"bundles": []}})
    assert config.ext_proc.upstream_from == "route"
    assert config.upstreams[llm.route.cluster].protocol == "openai"


def _http_filter(doc: Any, name: str) -> Any:
    manager = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    return next(f for f in manager["typed_config"]["http_filters"] if f["name"] == name)


@pytest.mark.parametrize("where", ["cluster", "ext_authz", "ext_proc"])
def test_an_unknown_field_would_be_refused(where: str) -> None:
    doc = _document()
    if where == "cluster":
        doc["static_resources"]["clusters"][0]["conect_timeout"] = "1s"  # a typo
    elif where == "ext_authz":
        _http_filter(doc, "envoy.filters.http.ext_authz")["typed_config"]["failure_mode_alow"] = 1
    else:
        mode = _http_filter(doc, "envoy.filters.http.ext_proc")["typed_config"]["processing_mode"]
        mode["response_body_mode"] = "CHUNKED"  # no such mode
    with pytest.raises(json_format.ParseError):
        json_format.ParseDict(doc, bootstrap_pb2.Bootstrap(), ignore_unknown_fields=False)
