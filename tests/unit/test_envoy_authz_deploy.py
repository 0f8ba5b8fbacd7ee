"""deploy/envoy/envoy.yaml's ext_authz filter sends Warden whole bodies, at Warden's limit."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from envoy.extensions.filters.http.ext_authz.v3 import ext_authz_pb2
from google.protobuf import json_format

from warden.config import ExtAuthzConfig

ENVOY_YAML = Path(__file__).resolve().parents[2] / "deploy" / "envoy" / "envoy.yaml"


def _ext_authz() -> ext_authz_pb2.ExtAuthz:
    doc = json.loads(json.dumps(yaml.safe_load(ENVOY_YAML.read_text())))
    manager = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    found = next(
        f
        for f in manager["typed_config"]["http_filters"]
        if f["name"] == "envoy.filters.http.ext_authz"
    )
    typed = {k: v for k, v in found["typed_config"].items() if k != "@type"}
    return json_format.ParseDict(typed, ext_authz_pb2.ExtAuthz())


def test_the_example_refuses_bodies_past_the_limit_rather_than_cutting_them() -> None:
    # A cut at exactly max_request_bytes is reported as whole; Envoy forwards the rest.
    body = _ext_authz().with_request_body
    assert body.allow_partial_message is False
    assert body.max_request_bytes == ExtAuthzConfig().max_request_bytes
