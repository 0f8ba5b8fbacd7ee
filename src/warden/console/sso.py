"""Single sign-on through an auth proxy: trusted headers to a console principal.

oauth2-proxy (and similar) authenticate people and pass ``X-Forwarded-User``
and ``X-Forwarded-Groups`` on. Anyone can send those headers, so they are
believed only on a connection whose peer address is one of
``console.sso.trusted_proxies``; the groups map to roles through
``console.sso.roles`` and double as approver groups.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping

from warden.admin.auth import Principal
from warden.config import ConsoleSsoConfig

__all__ = ["MAX_GROUPS", "sso_principal", "sso_speaks"]

MAX_GROUPS = 64
_MAX_HEADER = 4096


def _trusted(remote: str | None, proxies: tuple[str, ...]) -> bool:
    if not remote:
        return False
    try:
        peer = ipaddress.ip_address(remote)
    except ValueError:
        return False
    for proxy in proxies:
        try:
            if peer in ipaddress.ip_network(proxy, strict=False):
                return True
        except ValueError:
            continue
    return False


def sso_speaks(
    config: ConsoleSsoConfig | None, remote: str | None, headers: Mapping[str, str]
) -> bool:
    """Whether a trusted auth proxy names the person making this request.

    When it does, its word decides who is signed in, whatever the browser's
    cookie says: a person it names with no role here is signed in as no one.
    """
    if config is None or not _trusted(remote, config.trusted_proxies):
        return False
    return bool((headers.get(config.user_header) or "").strip())


def sso_principal(
    config: ConsoleSsoConfig | None, remote: str | None, headers: Mapping[str, str]
) -> Principal | None:
    """The person the auth proxy vouches for, or ``None``.

    ``None`` when SSO is off, the peer is not a trusted proxy, the user header
    is missing or oversized, or none of the person's groups maps to a role.
    """
    if config is None or not _trusted(remote, config.trusted_proxies):
        return None
    user = (headers.get(config.user_header) or "").strip()
    if not user or len(user) > 256:
        return None
    raw = headers.get(config.groups_header) or ""
    if len(raw) > _MAX_HEADER:
        return None
    groups = frozenset(g.strip() for g in raw.split(",") if g.strip())
    if len(groups) > MAX_GROUPS:
        return None
    roles = frozenset(role for g in groups for role in config.roles.get(g, ()))
    if not roles:
        return None
    return Principal(user, roles, groups)
