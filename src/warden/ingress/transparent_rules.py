"""What transparent mode does with a host: govern it, tunnel it, or refuse it (sans-I/O).

A connection or request may carry several names for where it goes: the TLS
SNI, the ``CONNECT`` target or the address it was redirected from, and (for
plain HTTP) the ``Host`` header. The first name listed in ``transparent.hosts``
makes it governed: it is decrypted and handed to the base-URL listener as
``/<upstream>/<path>``, so it reaches only that upstream's ``base_url``,
whatever the agent asked for. Any other host follows ``unknown_hosts``. An IP
address matches however it is written (:func:`normalize_host`).

A tunnelled host may only be a public address (:func:`destination_refusal`):
otherwise the proxy would let an agent reach what only Warden's own host
can, its loopback services, the cloud metadata address, the private network.
"""

from __future__ import annotations

import enum
import ipaddress
import re
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import quote

__all__ = [
    "HostRules",
    "Verdict",
    "VerdictKind",
    "destination_refusal",
    "embedded_ipv4",
    "handoff_path",
    "normalize_host",
]


class VerdictKind(enum.StrEnum):
    """``govern``: decrypt and decide; ``tunnel``: pass through untouched; ``deny``: refuse."""

    GOVERN = "govern"
    TUNNEL = "tunnel"
    DENY = "deny"


@dataclass(frozen=True, slots=True)
class Verdict:
    """The rule for one connection or request: what to do, about which host, to which upstream."""

    kind: VerdictKind
    host: str
    """The name the verdict is about (the governed one, else the first one known)."""
    upstream: str | None = None
    """For ``govern``: the upstream whose ``base_url`` the traffic goes to."""


def normalize_host(name: str | None) -> str:
    """A host as the hosts map keys it: lower case, no trailing dot, no IPv6 brackets,
    and an IP address in its standard form, however it was written.

    What a resolver connects to is one address, so it is one key: IPv4 as
    ``inet_aton`` reads it (``2130706434``, ``0x7f000002``, ``127.2``, octal
    ``0177.0.0.2``), an IPv6 address that stands for an IPv4 one
    (``::ffff:127.0.0.2``, NAT64, 6to4) as that one, and IPv6 compressed.
    """
    if not name:
        return ""
    host = name.strip().lower().rstrip(".").removeprefix("[").removesuffix("]")
    return _canonical_ip(host) or host


# The characters of the IPv4 forms: checked first, as inet_aton also reads an address
# followed by a space and anything, which getaddrinfo does not take for an address.
_IPV4_FORMS = re.compile(r"[0-9a-fx.]+")


def _canonical_ip(host: str) -> str | None:
    """The standard form of the IP address ``host`` (lower case) is, or ``None``."""
    if _IPV4_FORMS.fullmatch(host):
        try:
            return str(ipaddress.IPv4Address(socket.inet_aton(host)))
        except OSError:
            return None  # a name, such as "cafe.be"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        return str(embedded_ipv4(ip) or ip)
    return str(ip)


class HostRules:
    """The ``transparent.hosts`` map and the ``unknown_hosts`` rule."""

    def __init__(self, hosts: Mapping[str, str], unknown_hosts: str) -> None:
        self._hosts = {normalize_host(host): upstream for host, upstream in hosts.items()}
        self._unknown = VerdictKind(unknown_hosts)
        if self._unknown is VerdictKind.GOVERN:
            raise ValueError("unknown_hosts is deny or tunnel")

    @property
    def unknown(self) -> VerdictKind:
        """What happens to a host the map does not list."""
        return self._unknown

    def upstream_of(self, name: str | None) -> str | None:
        """The upstream a governed host goes to, or ``None``."""
        return self._hosts.get(normalize_host(name))

    def classify(self, names: Iterable[str | None]) -> Verdict:
        """The first governed name decides; with none, the ``unknown_hosts`` rule."""
        first = ""
        for name in names:
            host = normalize_host(name)
            if not host:
                continue
            upstream = self._hosts.get(host)
            if upstream is not None:
                return Verdict(VerdictKind.GOVERN, host, upstream)
            first = first or host
        return Verdict(self._unknown, first)

    def any_governed(self, names: Iterable[str | None]) -> bool:
        """Whether one of ``names`` is governed (its traffic may only go to Warden)."""
        return any(normalize_host(name) in self._hosts for name in names)


def handoff_path(upstream: str, path: str) -> str:
    """The base-URL listener's path for ``path`` on a governed host: ``/<upstream><path>``.

    ``path`` is the request target as sent (origin form, query included); the
    listener decodes and checks it exactly as it checks an agent's own request.
    Anything else (``*``, an absolute form) is refused with ``ValueError``.
    """
    if not path.startswith("/"):
        raise ValueError(f"request target {path[:64]!r} is not a path")
    return "/" + quote(upstream, safe="") + path


_THIS_NETWORK = ipaddress.IPv4Network("0.0.0.0/8")  # Linux connects 0.0.0.0 to the host itself
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
# Cloud metadata services outside link-local: AWS's IPv6 endpoint (ULA) and Alibaba
# Cloud's (CGNAT), inside ranges private_allowed opens, and Azure's WireServer, in a
# public range (it hands a VM's extension settings to any process on it).
_METADATA = frozenset(
    map(ipaddress.ip_address, ("fd00:ec2::254", "100.100.100.200", "168.63.129.16"))
)
# IETF protocol assignments (Oracle Cloud's legacy metadata at 192.0.0.192): not global,
# but Python before 3.12.4 calls most of it global (CVE-2024-4032).
_PROTOCOL_ASSIGNMENTS = ipaddress.IPv4Network("192.0.0.0/24")


def embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one stands for (mapped, NAT64, 6to4): where it really goes."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip.sixtofour


def destination_refusal(address: str, *, private_allowed: bool = False) -> str | None:
    """Why a tunnel may not go to ``address`` (an IP address), or ``None`` if it may.

    Only public addresses are allowed. ``private_allowed`` lets through the
    ranges an operator may mean to reach (RFC 1918, CGNAT 100.64/10, IPv6
    ULA and the rest that is not globally routable); loopback, link-local
    (169.254.169.254 is cloud metadata), unspecified, multicast and reserved
    addresses, and the cloud metadata services, stay refused whatever it says.
    """
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return "not an address"
    if isinstance(ip, ipaddress.IPv6Address):
        # Python 3.12 classifies ::ffff:127.0.0.1 by its IPv6 prefix, not as loopback.
        ip = embedded_ipv4(ip) or ip
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_unspecified or (isinstance(ip, ipaddress.IPv4Address) and ip in _THIS_NETWORK):
        return "unspecified"
    if ip.is_multicast:
        return "multicast"
    if ip.is_reserved:
        return "reserved"
    if ip in _METADATA:
        return "cloud metadata"
    if isinstance(ip, ipaddress.IPv4Address) and ip in _PROTOCOL_ASSIGNMENTS:
        return "reserved"
    # is_global leaves out CGNAT (which is_private does not cover) and documentation
    # ranges; deprecated IPv6 site-local (fec0::/10) is private in all but name.
    is_site_local = isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local
    if (not ip.is_global or is_site_local) and not private_allowed:
        return "private"
    return None
