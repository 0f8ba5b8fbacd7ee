"""Transparent mode's pure parts: host rules, the hand-over path, the door mark, config, CA."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import trustme
from cryptography import x509

from warden import cli
from warden.config import TransparentConfig, load_config
from warden.errors import ConfigError
from warden.ingress.door_mark import VIA_HEADER, door_of, mark
from warden.ingress.transparent_ca import ca_certificate_pem, ensure_ca, load_store
from warden.ingress.transparent_rules import (
    HostRules,
    Verdict,
    VerdictKind,
    destination_refusal,
    handoff_path,
    normalize_host,
)

HOSTS = {"api.openai.com": "openai", "refunds.internal": "refunds"}


def test_the_first_governed_name_decides() -> None:
    rules = HostRules(HOSTS, "deny")
    assert rules.classify(["API.OpenAI.com.", None]) == Verdict(
        VerdictKind.GOVERN, "api.openai.com", "openai"
    )
    # An SNI naming an unknown host does not hide a governed CONNECT target, and
    # the other way round: either way the traffic may only go to Warden.
    assert rules.classify(["evil.example", "refunds.internal"]).upstream == "refunds"
    assert rules.classify(["api.openai.com", "10.0.0.1"]).upstream == "openai"


@pytest.mark.parametrize("unknown", ["deny", "tunnel"])
def test_unknown_hosts_follow_the_rule_and_name_the_first_host(unknown: str) -> None:
    rules = HostRules(HOSTS, unknown)
    verdict = rules.classify(["", None, "Other.Example", "10.0.0.1"])
    assert verdict == Verdict(VerdictKind(unknown), "other.example")
    assert rules.classify([]) == Verdict(VerdictKind(unknown), "")


def test_govern_is_not_an_unknown_hosts_rule() -> None:
    with pytest.raises(ValueError, match="deny or tunnel"):
        HostRules(HOSTS, "govern")
    with pytest.raises(ValueError, match="is not a valid VerdictKind"):
        HostRules(HOSTS, "allow")


def test_any_governed_and_normalize() -> None:
    rules = HostRules(HOSTS, "tunnel")
    assert rules.any_governed([None, "REFUNDS.internal"])
    assert not rules.any_governed([None, "", "127.0.0.1"])
    assert normalize_host("[::1]") == "::1"
    assert normalize_host(None) == ""
    assert rules.upstream_of("api.openai.com.") == "openai"


@pytest.mark.parametrize(
    "written",
    [
        "127.0.0.2",
        "2130706434",  # what inet_aton and getaddrinfo read: decimal, hex, octal, short forms
        "0x7f000002",
        "0X7F.2",
        "127.2",
        "127.0.0.02",
        "0177.0.0.2",
        "127.0.0.2.",
        "::ffff:127.0.0.2",  # IPv6 forms of the IPv4 address: mapped, NAT64
        "[::FFFF:7f00:2]",
        "64:ff9b::7f00:2",
    ],
)
def test_a_governed_address_is_governed_however_it_is_written(written: str) -> None:
    rules = HostRules({"127.0.0.2": "openai", "2001:db8::2": "openai"}, "tunnel")
    assert rules.classify([written]) == Verdict(VerdictKind.GOVERN, "127.0.0.2", "openai")
    assert rules.any_governed([written])
    for ipv6 in ("2001:0db8::0002", "2001:DB8:0:0:0:0:0:2", "[2001:db8::2]"):
        assert rules.upstream_of(ipv6) == "openai"
    # The hosts map's own keys are read the same way.
    assert HostRules({written: "openai"}, "tunnel").upstream_of("127.0.0.2") == "openai"


def test_names_that_only_look_like_addresses_stay_names() -> None:
    for name in ("cafe.be", "deadbeef", "999.1.1.1", "08.1.1.1", "1e100.net"):
        assert normalize_host(name) == name
    # inet_aton reads "127.0.0.2 x" as 127.0.0.2; getaddrinfo takes it for no address.
    assert normalize_host("127.0.0.2 x") == "127.0.0.2 x"
    assert normalize_host("012.0.0.5") == "10.0.0.5"  # octal, as a resolver reads it


def test_handoff_path_prefixes_the_upstream_and_keeps_the_query() -> None:
    assert handoff_path("openai", "/v1/chat/completions?x=1") == "/openai/v1/chat/completions?x=1"
    # The listener decodes and checks the rest exactly as for an agent's own request.
    assert handoff_path("openai", "/v1/../admin") == "/openai/v1/../admin"
    for target in ("*", "http://elsewhere/v1", ""):
        with pytest.raises(ValueError, match="is not a path"):
            handoff_path("openai", target)


@pytest.mark.parametrize(
    ("address", "reason", "with_private"),
    [
        # Refused whatever tunnel_private_networks says.
        ("127.0.0.1", "loopback", "loopback"),
        ("127.1.2.3", "loopback", "loopback"),
        ("::1", "loopback", "loopback"),
        ("::ffff:127.0.0.1", "loopback", "loopback"),  # IPv4-mapped
        ("64:ff9b::7f00:1", "loopback", "loopback"),  # NAT64
        ("2002:7f00:1::", "loopback", "loopback"),  # 6to4
        ("169.254.169.254", "link-local", "link-local"),  # cloud metadata
        ("::ffff:169.254.169.254", "link-local", "link-local"),
        ("fe80::1", "link-local", "link-local"),
        ("fe80::1%eth0", "link-local", "link-local"),
        ("0.0.0.0", "unspecified", "unspecified"),
        ("0.1.2.3", "unspecified", "unspecified"),
        ("::", "unspecified", "unspecified"),
        ("224.0.0.1", "multicast", "multicast"),
        ("ff02::1", "multicast", "multicast"),
        ("240.0.0.1", "reserved", "reserved"),
        ("::127.0.0.1", "reserved", "reserved"),  # IPv4-compatible, deprecated
        ("fd00:ec2::254", "cloud metadata", "cloud metadata"),  # AWS, in ULA
        ("100.100.100.200", "cloud metadata", "cloud metadata"),  # Alibaba, in CGNAT
        ("168.63.129.16", "cloud metadata", "cloud metadata"),  # Azure WireServer, public
        ("192.0.0.192", "reserved", "reserved"),  # Oracle Cloud; "global" before 3.12.4
        ("localhost", "not an address", "not an address"),
        # Private: refused unless tunnel_private_networks.
        ("10.0.0.1", "private", None),
        ("172.16.0.1", "private", None),
        ("192.168.1.1", "private", None),
        ("100.64.0.1", "private", None),  # CGNAT
        ("fd00::1", "private", None),  # ULA
        ("fec0::1", "private", None),  # site-local, deprecated
        ("::ffff:10.0.0.1", "private", None),
        ("192.0.2.1", "private", None),  # documentation
        # Public.
        ("8.8.8.8", None, None),
        ("2606:4700:4700::1111", None, None),
        ("::ffff:8.8.8.8", None, None),
        ("64:ff9b::808:808", None, None),  # a public host behind DNS64
    ],
)
def test_a_tunnel_goes_only_to_a_public_address(
    address: str, reason: str | None, with_private: str | None
) -> None:
    assert destination_refusal(address) == reason
    assert destination_refusal(address, private_allowed=True) == with_private


def test_only_this_process_can_mark_a_door() -> None:
    value = mark("transparent")
    assert door_of({VIA_HEADER: value}) == "transparent"
    assert door_of({}) == ""
    # What an agent could send: the door's name, a guess, or an empty secret.
    for forged in ("transparent", "transparent ", "transparent guess", value + "x", "http x"):
        assert door_of({VIA_HEADER: forged}) == ""
    with pytest.raises(ValueError, match="unknown door"):
        mark("http")


def test_config_validates_hosts_upstreams_and_the_ca_pair() -> None:
    cfg = load_config(
        environ={},
        overrides={"transparent": {"listen": "127.0.0.1:0", "hosts": {"API.openai.com": "openai"}}},
    )
    assert cfg.transparent is not None
    assert cfg.transparent.hosts == {"api.openai.com": "openai"}
    assert cfg.transparent.unknown_hosts == "deny"
    assert cfg.transparent.tunnel_private_networks is False
    assert load_config(environ={}).transparent is None  # off when unset
    addresses = {"127.2": "openai", "[2001:0DB8::0002]": "anthropic"}
    listed = TransparentConfig(hosts=addresses).hosts
    assert listed == {"127.0.0.2": "openai", "2001:db8::2": "anthropic"}
    bad: list[tuple[dict[str, object], str]] = [
        ({"hosts": {"api.example.com": "nope"}}, "no upstream named 'nope'"),
        ({"hosts": {"https://api.openai.com": "openai"}}, "is not a host name"),
        ({"hosts": {"api.openai.com:443": "openai"}}, "is not a host name"),
        ({"hosts": {"a.com": "openai", "A.com": "openai"}}, "listed twice"),
        ({"hosts": {"127.0.0.2": "openai", "0x7f000002": "anthropic"}}, "listed twice"),
        ({"listen": "8888"}, "is not host:port"),
        ({"unknown_hosts": "allow"}, "unknown_hosts"),
        ({"mode": "socks5"}, "mode"),
        ({"ca_cert_file": "ca.pem"}, "go together"),
    ]
    for section, message in bad:
        with pytest.raises(ConfigError, match=message):
            load_config(environ={}, overrides={"transparent": section})


def test_the_ca_is_generated_once_with_a_private_key(tmp_path: Path) -> None:
    cfg = TransparentConfig(ca_dir=str(tmp_path / "ca"))
    directory = ensure_ca(cfg)
    key = directory / "mitmproxy-ca.pem"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    pem = ca_certificate_pem(cfg)
    assert b"PRIVATE KEY" not in pem
    cert = x509.load_pem_x509_certificate(pem)
    assert "Warden" in cert.subject.rfc4514_string()
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # Not generated again; a key loosened by hand is tightened.
    key.chmod(0o644)
    assert ca_certificate_pem(cfg) == pem
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert load_store(cfg).default_ca.to_pem() == pem


def test_a_configured_ca_is_used_where_it_is(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert, key = tmp_path / "ca.crt", tmp_path / "ca.key"
    ca.cert_pem.write_to_path(str(cert))
    ca.private_key_pem.write_to_path(str(key))
    cfg = TransparentConfig(
        ca_dir=str(tmp_path / "ca"), ca_cert_file=str(cert), ca_key_file=str(key)
    )
    assert ca_certificate_pem(cfg) == ca.cert_pem.bytes()
    store = load_store(cfg)
    assert store.default_ca.to_pem() == ca.cert_pem.bytes()
    assert not (tmp_path / "ca" / "mitmproxy-ca.pem").exists()  # no second CA made

    other = trustme.CA()
    other.private_key_pem.write_to_path(str(key))
    with pytest.raises(ConfigError, match="is not the key of"):
        load_store(cfg)
    key.write_text("not a key")
    with pytest.raises(ConfigError, match="not a PEM certificate"):
        ca_certificate_pem(cfg)
    key.unlink()
    with pytest.raises(ConfigError, match="cannot read"):
        ca_certificate_pem(cfg)


def test_cli_exports_the_certificate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "warden.yaml"
    config.write_text(f"transparent:\n  ca_dir: {tmp_path / 'ca'}\n")
    assert cli.main(["ca", "export", "--config", str(config)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("-----BEGIN CERTIFICATE-----")
    out = tmp_path / "exported.pem"
    assert cli.main(["ca", "export", "--config", str(config), "--out", str(out)]) == 0
    assert out.read_text() == printed
    assert cli.main(["ca", "export", "--config", str(config), "--out", str(tmp_path)]) == 2
    assert "cannot write" in capsys.readouterr().err
    config.write_text("transparent:\n  ca_cert_file: /nonexistent.pem\n  ca_key_file: /x.key\n")
    assert cli.main(["ca", "export", "--config", str(config)]) == 2
    assert "cannot read /nonexistent.pem" in capsys.readouterr().err
