"""Envoy ext_authz at its body limits: a body cut at ``max_request_bytes``, and checks
that must fit ``grpc.max_message_bytes``. xds-protos stubs play Envoy's side."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import grpc.aio
import pytest
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

from tests.functional.conftest import make_config
from tests.functional.test_envoy_authz_functional import ORDERS
from warden.errors import ConfigError
from warden.ingress.envoy_authz import ExtAuthzService
from warden.ingress.grpc import GrpcDoor
from warden.protocols.envoy_authz import CHECK_ROOM
from warden.server import Warden

GRPC_OK = 0
GRPC_PERMISSION_DENIED = 7
MIB = 1024 * 1024  # deploy/envoy/envoy.yaml's max_request_bytes, and Warden's default

# Allows what it can read whole.
POLICY = """package envoy.authz

import rego.v1

default allow := false

allow if not input.truncated_body
"""


def _check(path: str, body: bytes, headers: dict[str, str] | None = None) -> Any:
    """A POST as Envoy checks it over HTTP/2: no content-length unless given."""
    request = external_auth_pb2.CheckRequest()
    http = request.attributes.request.http
    http.method, http.path, http.host, http.protocol = "POST", path, "orders.internal", "HTTP/2"
    http.headers.update(
        {
            ":method": "POST",
            ":path": path,
            "content-type": "application/x-www-form-urlencoded",
            "x-envoy-auth-partial-body": "false",
            **(headers or {}),
        }
    )
    http.raw_body = body
    return request


def _config(tmp_path: Path, **overrides: Any) -> Any:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "policy.rego").write_text(POLICY)
    policy = {"bundles": [str(bundle)], "workers": 1, "watch": False, "deadline_ms": 5000}
    return make_config(tmp_path, "http://127.0.0.1:9", policy=policy, **overrides)


@asynccontextmanager
async def _serving(config: Any) -> AsyncIterator[Any]:
    """Warden's core behind a real gRPC door (its message limit included); yields a stub."""
    async with Warden(config, listeners=False) as warden:
        assert warden.core is not None
        service = ExtAuthzService(warden.core, config)
        door = GrpcDoor("127.0.0.1:0", config.grpc, [service], shutdown_grace_s=1)
        await door.start(warden.core)
        try:
            async with grpc.aio.insecure_channel(door.address) as channel:
                yield external_auth_pb2_grpc.AuthorizationStub(channel)
        finally:
            await door.stop()


async def test_a_body_envoy_cut_exactly_at_max_request_bytes_is_not_decided_as_whole(
    tmp_path: Path,
) -> None:
    # Envoy checks once it holds max_request_bytes, says partial-body "false" when the
    # cut lands exactly there, and then forwards the rest: "&_method=DELETE".
    head = b"amount=50&pad="
    prefix = head.ljust(MIB, b"x")
    config = _config(tmp_path, upstreams={"orders": ORDERS}, ext_authz={"upstream": "orders"})
    assert config.ext_authz.max_request_bytes == MIB
    async with _serving(config) as stub:
        unruled = await stub.Check(_check("/orders/A-1", prefix))
        ruled = await stub.Check(_check("/orders/A-1/refunds", prefix))
        # content-length, whose framing Envoy enforces, says the body ends there.
        whole = await stub.Check(_check("/orders/A-1", prefix, {"content-length": str(MIB)}))
    for cut in (unruled, ruled):
        assert cut.status.code == GRPC_PERMISSION_DENIED
        assert cut.denied_response.status.code == 400
        assert "only part of the body" in cut.denied_response.body
    assert whole.status.code == GRPC_OK


async def test_the_policy_reads_a_body_that_fills_max_request_bytes_as_truncated(
    tmp_path: Path,
) -> None:
    config = _config(tmp_path, ext_authz={"max_request_bytes": 1024})
    async with _serving(config) as stub:
        cut = await stub.Check(_check("/upload", b"a=1&b=".ljust(1024, b"x")))
        short = await stub.Check(_check("/upload", b"a=1&b=".ljust(1023, b"x")))
    assert cut.status.code == GRPC_PERMISSION_DENIED
    assert short.status.code == GRPC_OK


async def test_a_check_at_max_request_bytes_fits_the_grpc_message_limit(tmp_path: Path) -> None:
    # The largest body Envoy sends, with headers at Envoy's default limit (60 KiB) and the
    # path again in its own field, still reaches Warden rather than gRPC's own refusal.
    limit = 64 * 1024
    config = _config(
        tmp_path,
        ext_authz={"max_request_bytes": limit},
        grpc={"max_message_bytes": limit + CHECK_ROOM},
    )
    path = "/upload?" + "q" * (8 * 1024)
    padding = {f"x-pad-{i}": "v" * 1000 for i in range(50)}
    body = b"a=1&b=".ljust(limit - 1, b"x")
    async with _serving(config) as stub:
        answered = await stub.Check(_check(path, body, padding))
    assert answered.status.code == GRPC_OK


def test_a_max_request_bytes_grpc_cannot_carry_stops_the_start(tmp_path: Path) -> None:
    # gRPC would refuse such checks with RESOURCE_EXHAUSTED before Warden reads them,
    # and an Envoy with failure_mode_allow: true would let them through undecided.
    def service(max_message_bytes: int) -> ExtAuthzService:
        config = make_config(
            tmp_path,
            "http://127.0.0.1:9",
            ext_authz={"max_request_bytes": 10 * MIB},
            grpc={"max_message_bytes": max_message_bytes},
        )
        return ExtAuthzService(cast(Any, None), config)

    with pytest.raises(ConfigError, match=r"ext_authz.max_request_bytes: .*grpc.max_message"):
        service(10 * MIB + CHECK_ROOM - 1)
    assert service(10 * MIB + CHECK_ROOM) is not None
