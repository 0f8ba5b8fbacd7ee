"""The one protocol every front door implements: started with the core, stopped once.

A front door turns some wire traffic (base-URL HTTP, gRPC, MCP, mitmproxy
flows) into calls on the :class:`~warden.core.Governor` and renders its
decisions back. It decides nothing itself. The server starts the doors the
configuration names, in one lifecycle, and stops them in reverse order
before the core drains and the audit log signs its final checkpoint.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from warden.core import Governor

__all__ = ["FrontDoor"]


class FrontDoor(Protocol):
    """A way in for agents' traffic."""

    name: str
    """Short label for logs, e.g. ``http``."""

    async def start(self, core: Governor) -> None:
        """Begin accepting traffic; every action goes to ``core``."""
        ...

    async def stop(self) -> None:
        """Stop accepting and finish what is in flight (bounded by the grace period)."""
        ...
