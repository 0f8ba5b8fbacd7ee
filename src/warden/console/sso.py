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
    if isinstance(peer, ipaddress.IPv6Address) and peer.ipv4_mapped is not None:
        # An IPv4 client of a dual-stack listener ("[::]:8081") shows as ::ffff:a.b.c.d.
        peer = peer.ipv4_mapped
    for proxy in proxies:
        try:
            if peer in ipaddress.ip_network(proxy, strict=False):
                return True
        except ValueError:
            continue
    return False


def _values(headers: Mapping[str, str], name: str) -> list[str]:
    """Every copy of a header. A proxy that appends its own copy to the client's,
    instead of replacing it, leaves two: the first may be the client's forgery."""
    getall = getattr(headers, "getall", None)
    if getall is not None:
        return list(getall(name, []))
    value = headers.get(name)
    return [] if value is None else [value]


def sso_speaks(
    config: ConsoleSsoConfig | None, remote: str | None, headers: Mapping[str, str]
) -> bool:
    """Whether a trusted auth proxy names the person making this request.

    When it does, its word decides who is signed in, whatever the browser's
    cookie says: a person it names with no role here is signed in as no one.
    A user header given twice counts as naming someone (that no one is
    signed in as), so a cookie's session does not carry on beside it.
    """
    if config is None or not _trusted(remote, config.trusted_proxies):
        return False
    users = _values(headers, config.user_header)
    return len(users) > 1 or any(u.strip() for u in users)


def sso_principal(
    config: ConsoleSsoConfig | None, remote: str | None, headers: Mapping[str, str]
) -> Principal | None:
    """The person the auth proxy vouches for, or ``None``.

    ``None`` when SSO is off, the peer is not a trusted proxy, the user header
    is missing, oversized or given twice, or none of the person's groups maps
    to a role. The groups header may come once per group.
    """
    if config is None or not _trusted(remote, config.trusted_proxies):
        return None
    users = _values(headers, config.user_header)
    if len(users) != 1:
        return None
    user = users[0].strip()
    if not user or len(user) > 256:
        return None
    # oauth2-proxy sends the groups header once per group: every copy counts.
    raw = ",".join(_values(headers, config.groups_header))
    if len(raw) > _MAX_HEADER:
        return None
    groups = frozenset(g.strip() for g in raw.split(",") if g.strip())
    if len(groups) > MAX_GROUPS:
        return None
    roles = frozenset(role for g in groups for role in config.roles.get(g, ()))
    if not roles:
        return None
    return Principal(user, roles, groups)
