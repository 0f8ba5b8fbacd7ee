"""What transparent mode does with a host: govern it, tunnel it, or refuse it (sans-I/O).

A connection or request may carry several names for where it goes: the TLS
SNI, the ``CONNECT`` target or the address it was redirected from, and (for
plain HTTP) the ``Host`` header. The first name listed in ``transparent.hosts``
makes it governed: it is decrypted and handed to the base-URL listener as
``/<upstream>/<path>``, so it reaches only that upstream's ``base_url``,
whatever the agent asked for. Any other host follows ``unknown_hosts``.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import quote

__all__ = ["HostRules", "Verdict", "VerdictKind", "handoff_path", "normalize_host"]


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
    """A host name as the hosts map keys it: lower case, no trailing dot, no IPv6 brackets."""
    if not name:
        return ""
    return name.strip().lower().rstrip(".").removeprefix("[").removesuffix("]")


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
