"""Which front door a request reached the base-URL listener through.

The transparent door (mitmproxy) hands each governed request to Warden's own
base-URL listener. It marks the request with :data:`VIA_HEADER`, whose value
carries a secret drawn once per process: only code inside this process can
set it, so an agent that sends the header itself to the base-URL listener is
not believed (its request is recorded as the base-URL door's, as it is).
The header is an ``X-Warden-*`` header: never forwarded, never recorded.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Mapping

__all__ = ["VIA_HEADER", "door_of", "mark"]

VIA_HEADER = "X-Warden-Via"
_SECRET = secrets.token_urlsafe(32)
_DOORS = frozenset({"transparent"})


def mark(door: str) -> str:
    """The :data:`VIA_HEADER` value that names ``door`` (one of the doors that hand over)."""
    if door not in _DOORS:
        raise ValueError(f"unknown door {door!r}")
    return f"{door} {_SECRET}"


def door_of(headers: Mapping[str, str]) -> str:
    """The door named by a genuine mark, else ``""`` (the base-URL listener itself)."""
    value = headers.get(VIA_HEADER)
    if not value:
        return ""
    door, _, secret = value.partition(" ")
    if door in _DOORS and hmac.compare_digest(secret.encode(), _SECRET.encode()):
        return door
    return ""
