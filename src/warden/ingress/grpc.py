"""The gRPC door: one ``grpc.aio`` server on ``listen.grpc`` for every gRPC service.

It serves the :class:`~warden.ingress.grpc_service.GrpcService` values it is
given (Warden's own API, Envoy ext_authz and ext_proc), plus
``grpc.health.v1.Health`` (each service ``SERVING``; ``NOT_SERVING`` from the
moment it starts stopping) and, unless ``grpc.reflection`` is off, server
reflection. TLS comes from ``grpc.tls``; with ``client_ca`` a client must
present a certificate signed by it (mTLS). Stopping ends the services' open
streams, then lets in-flight calls finish within ``shutdown_grace_s``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from warden.config import GrpcConfig, LimitsConfig, parse_listen
from warden.errors import ConfigError
from warden.ingress.grpc_service import GrpcService

if TYPE_CHECKING:
    from warden.core import Governor

__all__ = ["KEYS_REFUSED", "GrpcDoor", "peer_names", "told_keys"]

KEYS_REFUSED = (
    "Warden holds the key of upstream {upstream!r} and tells it only to an Envoy whose "
    "client certificate grpc.envoy_peers names (mTLS); this caller proved no such name"
)

log = logging.getLogger("warden.grpc")


class GrpcDoor:
    """Serves the gRPC services on one port; a :class:`~warden.ingress.base.FrontDoor`."""

    name = "grpc"

    def __init__(
        self,
        where: str,
        settings: GrpcConfig,
        services: Sequence[GrpcService],
        *,
        shutdown_grace_s: float,
        limits: LimitsConfig | None = None,
    ) -> None:
        """``where``: ``host:port`` (port 0 picks a free port; see :attr:`address`);
        ``limits``: the connection cap and idle timeout (``limits``), as the HTTP
        listeners have them."""
        self._where = where
        self._limits = limits if limits is not None else LimitsConfig()
        self._settings = settings
        self._services = tuple(services)
        self._grace_s = shutdown_grace_s
        self._server: grpc.aio.Server | None = None
        self._health: Any = None
        self.address = ""
        """``host:port`` the listener is bound to, once started."""

    @property
    def service_names(self) -> tuple[str, ...]:
        """Every service the door serves, health and reflection included."""
        names = [n for s in self._services for n in s.service_names]
        names.append(health.SERVICE_NAME)
        if self._settings.reflection:
            names.append(reflection.SERVICE_NAME)
        return tuple(names)

    async def start(self, core: Governor) -> None:
        """Bind, register every service and start serving.

        The services were built with the core already; ``core`` is not used here.
        """
        host, port = parse_listen(self._where)
        limit = self._settings.max_message_bytes
        idle_ms = int(self._limits.idle_timeout_s * 1000)
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                # Two processes must never share the port silently (gRPC's default on Linux).
                ("grpc.so_reuseport", 0),
                # Each connection holds a descriptor the audit log and state store need
                # too: past the cap gRPC closes new ones; idle ones, and ones still in
                # their handshake, are closed after limits.idle_timeout_s.
                ("grpc.max_allowed_incoming_connections", self._limits.max_connections),
                ("grpc.max_connection_idle_ms", idle_ms),
                ("grpc.server_handshake_timeout_ms", idle_ms),
            ]
        )
        for service in self._services:
            service.add_to(server)
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        names = self.service_names
        for name in names:
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self._settings.reflection:
            reflection.enable_server_reflection(names, server)
        shown = f"[{host}]" if ":" in host else host
        try:
            credentials = self._credentials()
            if credentials is None:
                bound = server.add_insecure_port(f"{shown}:{port}")
            else:
                bound = server.add_secure_port(f"{shown}:{port}", credentials)
        except RuntimeError as exc:
            raise ConfigError(f"cannot listen on {self._where} (listen.grpc): {exc}") from None
        if not bound:
            raise ConfigError(f"cannot listen on {self._where} (listen.grpc)")
        await server.start()
        self._server = server
        self.address = f"{shown}:{bound}"
        log.info(
            "gRPC listening on %s (%s): %s",
            self.address,
            "mTLS" if self._mtls else ("TLS" if self._settings.tls else "plaintext"),
            ", ".join(names),
        )

    @property
    def _mtls(self) -> bool:
        return self._settings.tls is not None and self._settings.tls.client_ca is not None

    def _credentials(self) -> grpc.ServerCredentials | None:
        tls = self._settings.tls
        if tls is None:
            return None

        def read(path: str, key: str) -> bytes:
            try:
                return Path(path).read_bytes()
            except OSError as exc:
                raise ConfigError(f"grpc.tls.{key}: cannot read {path}: {exc.strerror}") from None

        pair = (read(tls.key, "key"), read(tls.cert, "cert"))
        client_ca = read(tls.client_ca, "client_ca") if tls.client_ca is not None else None
        return grpc.ssl_server_credentials(
            [pair], root_certificates=client_ca, require_client_auth=client_ca is not None
        )

    async def stop(self) -> None:
        """Report NOT_SERVING, end open streams, then stop within the grace period."""
        server, self._server = self._server, None
        if server is None:
            return
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        # Together: a service waits for its streams in flight, which the server's stop
        # cancels once the grace is over; one after the other they took twice the grace.
        await asyncio.gather(
            *(self._close(service) for service in self._services), server.stop(self._grace_s)
        )
        log.info("gRPC listener on %s stopped", self.address)

    @staticmethod
    async def _close(service: GrpcService) -> None:
        try:
            await service.close()
        except Exception:
            log.exception("a gRPC service failed to close")


def peer_names(context: grpc.aio.ServicerContext[Any, Any]) -> frozenset[str]:
    """The names of the caller's verified client certificate (its SANs and common name).

    Empty without mTLS: gRPC puts a certificate's names in the auth context only
    after verifying it against ``grpc.tls.client_ca``.
    """
    try:
        auth = context.auth_context() or {}
    except Exception:
        return frozenset()
    found = [*auth.get("x509_subject_alternative_name", ()), *auth.get("x509_common_name", ())]
    return frozenset(
        n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n) for n in found
    )


def told_keys(context: grpc.aio.ServicerContext[Any, Any], settings: GrpcConfig) -> bool:
    """True when the caller may be told the upstream keys Warden holds: its client
    certificate carries a name in ``grpc.envoy_peers``."""
    return bool(settings.envoy_peers) and not peer_names(context).isdisjoint(settings.envoy_peers)
