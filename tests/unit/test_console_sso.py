"""Trusted-header sign-on: believed only from the configured proxy, mapped to roles."""

from __future__ import annotations

from multidict import CIMultiDict

from warden.config import ConsoleSsoConfig
from warden.console.sso import sso_principal, sso_speaks

CONFIG = ConsoleSsoConfig(
    trusted_proxies=("10.0.0.5", "192.168.7.0/24"),
    roles={"support-leads": ("approver",), "sre": ("admin", "viewer")},
)
HEADERS = {"X-Forwarded-User": "dana@example.com", "X-Forwarded-Groups": "support-leads,other"}


def test_a_trusted_proxy_vouches_for_a_person_and_their_roles() -> None:
    who = sso_principal(CONFIG, "10.0.0.5", HEADERS)
    assert who is not None
    assert who.subject == "dana@example.com"
    assert who.roles == frozenset({"approver"})
    assert who.groups == frozenset({"support-leads", "other"})
    assert sso_principal(CONFIG, "192.168.7.200", HEADERS) == who


def test_headers_from_any_other_peer_are_ignored() -> None:
    assert sso_principal(CONFIG, "10.0.0.6", HEADERS) is None
    assert sso_principal(CONFIG, None, HEADERS) is None
    assert sso_principal(CONFIG, "not an address", HEADERS) is None
    assert sso_principal(None, "10.0.0.5", HEADERS) is None


def test_no_user_no_mapped_group_or_oversized_headers_sign_no_one_in() -> None:
    assert sso_principal(CONFIG, "10.0.0.5", {"X-Forwarded-Groups": "sre"}) is None
    unmapped = {"X-Forwarded-User": "eve", "X-Forwarded-Groups": "marketing"}
    assert sso_principal(CONFIG, "10.0.0.5", unmapped) is None
    huge = {"X-Forwarded-User": "eve", "X-Forwarded-Groups": "sre," + "g," * 5000}
    assert sso_principal(CONFIG, "10.0.0.5", huge) is None
    many = {"X-Forwarded-User": "eve", "X-Forwarded-Groups": ",".join(f"g{i}" for i in range(70))}
    assert sso_principal(CONFIG, "10.0.0.5", many) is None


def test_several_groups_add_up_their_roles() -> None:
    both = {"X-Forwarded-User": "sam", "X-Forwarded-Groups": "sre, support-leads"}
    who = sso_principal(CONFIG, "10.0.0.5", both)
    assert who is not None
    assert who.roles == frozenset({"admin", "viewer", "approver"})


def test_a_header_given_twice_signs_no_one_in() -> None:
    # A proxy that appends its copy to the client's leaves the client's forgery first.
    forged = CIMultiDict(
        [
            ("X-Forwarded-User", "mallory"),
            ("X-Forwarded-Groups", "sre"),
            ("X-Forwarded-User", "eve"),
            ("X-Forwarded-Groups", "marketing"),
        ]
    )
    assert sso_speaks(CONFIG, "10.0.0.5", forged)  # the cookie's session does not carry on
    assert sso_principal(CONFIG, "10.0.0.5", forged) is None
    assert sso_principal(CONFIG, "10.0.0.5", CIMultiDict(HEADERS)) is not None


def test_oauth2_proxy_sends_the_groups_header_once_per_group() -> None:
    per_group = CIMultiDict(
        [("X-Forwarded-User", "sam"), ("X-Forwarded-Groups", "sre"), ("X-Forwarded-Groups", "x")]
    )
    who = sso_principal(CONFIG, "10.0.0.5", per_group)
    assert who is not None
    assert who.groups == frozenset({"sre", "x"})
    assert who.roles == frozenset({"admin", "viewer"})


def test_an_ipv4_peer_of_a_dual_stack_listener_is_matched_as_ipv4() -> None:
    assert sso_principal(CONFIG, "::ffff:10.0.0.5", HEADERS) is not None
    assert sso_principal(CONFIG, "::ffff:192.168.7.9", HEADERS) is not None
    assert sso_principal(CONFIG, "::ffff:10.0.0.6", HEADERS) is None
