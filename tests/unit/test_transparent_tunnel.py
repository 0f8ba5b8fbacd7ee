"""Where a tunnel may go: every address a name has is checked, and the connection is pinned.

The resolver is replaced here, so that public addresses can be named without
any traffic; the functional tests (test_transparent_tunnel_functional.py) run
the same checks through the real proxy on loopback.
"""

from __future__ import annotations

import ipaddress
import socket

import pytest
from mitmproxy import connection
from mitmproxy.proxy import server_hooks

from warden.ingress import transparent
from warden.ingress.transparent import GoverningAddon
from warden.ingress.transparent_rules import HostRules

TARGET = ("127.0.0.1", 8080)


def addon(*, private_allowed: bool = False) -> GoverningAddon:
    rules = HostRules({"api.openai.com": "openai"}, "tunnel")
    return GoverningAddon(rules, TARGET, "regular", private_allowed=private_allowed)


def resolving_to(monkeypatch: pytest.MonkeyPatch, *addresses: str) -> list[str]:
    """Make every name resolve to ``addresses``; the names asked for, in order."""
    asked: list[str] = []

    async def resolve(host: str, port: int) -> list[str]:
        asked.append(host)
        return list(addresses)

    monkeypatch.setattr(transparent, "_resolve", resolve)
    return asked


def hook_data(host: str, port: int = 443) -> server_hooks.ServerConnectionHookData:
    client = connection.Client(peername=("127.0.0.1", 50000), sockname=("127.0.0.1", 8888))
    server = connection.Server(address=(host, port))
    return server_hooks.ServerConnectionHookData(server=server, client=client)


async def test_a_tunnel_is_pinned_to_the_address_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    asked = resolving_to(monkeypatch, "93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c")
    data = hook_data("example.com")
    await addon().server_connect(data)
    assert data.server.error is None
    assert data.server.address == ("93.184.215.14", 443)  # DNS is not asked again
    assert data.server.sni == "example.com"  # the name, not the address
    assert asked == ["example.com"]


@pytest.mark.parametrize(
    "addresses",
    [
        ("127.0.0.1",),
        ("93.184.215.14", "127.0.0.1"),  # any address refused refuses the name
        ("93.184.215.14", "::ffff:169.254.169.254"),
        ("10.0.0.1",),
    ],
)
async def test_a_name_with_any_refused_address_is_blocked(
    monkeypatch: pytest.MonkeyPatch, addresses: tuple[str, ...]
) -> None:
    resolving_to(monkeypatch, *addresses)
    data = hook_data("rebinding.example")
    await addon().server_connect(data)
    assert data.server.error is not None
    assert "tunnels only to public addresses" in data.server.error
    assert data.server.address == ("rebinding.example", 443)


async def test_a_name_for_a_governed_address_is_never_tunnelled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # An alias of the API, or a name the agent controls, that resolves to an address
    # hosts lists: a tunnel would carry its traffic undecided.
    rules = HostRules({"api.openai.com": "openai", "162.159.140.245": "openai"}, "tunnel")
    governing = GoverningAddon(rules, TARGET, "regular")
    resolving_to(monkeypatch, "93.184.215.14", "::ffff:162.159.140.245")
    data = hook_data("openai-alias.example")
    await governing.server_connect(data)
    assert data.server.error is not None
    assert "162.159.140.245 is governed" in data.server.error
    assert data.server.address == ("openai-alias.example", 443)
    resolving_to(monkeypatch, "93.184.215.14")
    data = hook_data("example.com")
    await governing.server_connect(data)
    assert data.server.error is None


async def test_private_networks_are_an_opt_in_loopback_is_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    resolving_to(monkeypatch, "10.0.0.1")
    data = hook_data("internal.example", 80)
    await addon(private_allowed=True).server_connect(data)
    assert data.server.error is None
    assert data.server.address == ("10.0.0.1", 80)
    resolving_to(monkeypatch, "10.0.0.1", "127.0.0.1")
    data = hook_data("internal.example", 80)
    await addon(private_allowed=True).server_connect(data)
    assert data.server.error is not None


async def test_a_name_that_does_not_resolve_is_blocked(monkeypatch: pytest.MonkeyPatch) -> None:
    resolving_to(monkeypatch)  # no address at all
    data = hook_data("nowhere.example")
    await addon().server_connect(data)
    assert data.server.error is not None


async def test_wardens_own_listener_is_reached_only_by_a_hand_over() -> None:
    # An agent that names Warden's base-URL listener itself gets no tunnel to it;
    # a governed request handed over does.
    data = hook_data(*TARGET)
    governing = addon()
    await governing.server_connect(data)
    assert data.server.error is not None
    data = hook_data(*TARGET)
    governing._by_client[data.client.id] = {"flow-1"}
    await governing.server_connect(data)
    assert data.server.error is None
    assert data.server.address == TARGET


def _an_address_of_this_host() -> str | None:
    """A non-loopback address of this host: the source of a route (a UDP connect sends
    nothing), or ``None`` if it has no route."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))
        except OSError:
            return None
        address = str(probe.getsockname()[0])
    return None if address.startswith("127.") else address


def test_this_hosts_own_addresses_are_refused_even_when_private_ones_are_allowed() -> None:
    own = _an_address_of_this_host()
    if own is None:
        pytest.skip("this host has no non-loopback address")
    assert transparent._why_refused(own, private_allowed=True) == "an address of this host"
    # Its IPv6 forms may lead back to it too (a NAT64 gateway, 6to4).
    packed = ipaddress.IPv4Address(own).packed
    nat64 = str(ipaddress.IPv6Address(b"\x00\x64\xff\x9b" + bytes(8) + packed))
    sixtofour = str(ipaddress.IPv6Address(b"\x20\x02" + packed + bytes(10)))
    for form in (f"::ffff:{own}", nat64, sixtofour):
        assert transparent._why_refused(form, private_allowed=True) == "an address of this host"
    assert transparent._why_refused("8.8.8.8", private_allowed=True) is None
