"""What the gRPC listener serves: each service registers itself on the one server.

The gRPC door (:mod:`warden.ingress.grpc`) owns one ``grpc.aio`` server on
``listen.grpc``. Warden's API, Envoy ext_authz and Envoy ext_proc are each a
:class:`GrpcService`: built with the core and what else it needs, added to the
server before it starts, and named for health and reflection.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import grpc.aio

__all__ = ["GrpcService"]


class GrpcService(Protocol):
    """One gRPC service served on the shared listener."""

    service_names: tuple[str, ...]
    """Full names, e.g. ``envoy.service.auth.v3.Authorization``: reported SERVING, reflected."""

    def add_to(self, server: grpc.aio.Server) -> None:
        """Register the servicer(s) on ``server`` (called once, before it starts)."""
        ...

    async def close(self) -> None:
        """Finish open streams (called when the listener stops, before the grace period ends)."""
        ...
