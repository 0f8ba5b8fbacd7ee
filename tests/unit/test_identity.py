"""Agent identity: proxy keys and JWTs, without sockets (JWKS from a file or a fake fetch)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from multidict import CIMultiDict
from prometheus_client import REGISTRY

from warden import cli
from warden.config import Config, load_config
from warden.errors import ConfigError, Forbidden, RequestError, Unauthenticated
from warden.identity import (
    AGENT_KEY_HEADER,
    AGENT_TOKEN_HEADER,
    AGENT_VERSION_HEADER,
    Identity,
    hash_key,
)

ISSUER = "https://kubernetes.default.svc"
AUDIENCE = "warden"
REFUNDS_KEY = "wk_refunds_secret_1"
TRIAGE_KEY = "wk_triage_secret_1"


@dataclass
class Issuer:
    """A token issuer for tests: an RSA or EC key pair and its JWKS."""

    kid: str = "k1"
    kind: str = "rsa"
    jwk_alg: str | None = None
    private: Any = field(init=False)

    def __post_init__(self) -> None:
        if self.kind == "rsa":
            self.private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        else:
            self.private = ec.generate_private_key(ec.SECP256R1())

    @property
    def alg(self) -> str:
        return "RS256" if self.kind == "rsa" else "ES256"

    def jwk(self) -> dict[str, Any]:
        algo = jwt.algorithms.RSAAlgorithm if self.kind == "rsa" else jwt.algorithms.ECAlgorithm
        out: dict[str, Any] = algo.to_jwk(self.private.public_key(), as_dict=True)
        out.update(kid=self.kid, use="sig")
        if self.jwk_alg:
            out["alg"] = self.jwk_alg
        return out

    def jwks(self, *more: Issuer) -> bytes:
        return json.dumps({"keys": [self.jwk(), *(m.jwk() for m in more)]}).encode()

    def token(
        self,
        sub: str = "refunds-bot",
        *,
        alg: str | None = None,
        kid: str | None = "",
        extra: dict[str, Any] | None = None,
        **claims: Any,
    ) -> str:
        now = int(time.time())
        body: dict[str, Any] = {"iss": ISSUER, "aud": AUDIENCE, "sub": sub, "iat": now}
        body["exp"] = now + 600
        body.update(extra or {}, **claims)
        headers = {} if kid is None else {"kid": kid or self.kid}
        return jwt.encode(body, self.private, algorithm=alg or self.alg, headers=headers)

    def public_pem(self) -> bytes:
        return bytes(
            self.private.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )


def unsigned(claims: dict[str, Any], header: dict[str, Any]) -> tuple[str, str]:
    def b64(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return b64(header), b64(claims)


def claims_now(**extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"iss": ISSUER, "aud": AUDIENCE, "sub": "refunds-bot", "exp": now + 600, **extra}


def config(**identity: Any) -> Config:
    base: dict[str, Any] = {
        "agent": {"id": "support-triage", "version": "v7"},
        "agents": {"refunds-bot": {"version": "r2"}},
        "identity": {
            "agents": {
                "refunds-bot": {"key_sha256": [hash_key(REFUNDS_KEY)]},
                "support-triage": {"key_sha256": hash_key(TRIAGE_KEY)},
            },
            **identity,
        },
    }
    return load_config(environ={}, overrides=base)


def jwt_config(tmp_path: Path, issuer: Issuer, **jwt_extra: Any) -> Config:
    jwks = tmp_path / "jwks.json"
    jwks.write_bytes(issuer.jwks())
    section = {"issuer": ISSUER, "audience": AUDIENCE, "jwks_file": str(jwks), **jwt_extra}
    return config(jwt=section)


def failures(reason: str) -> float:
    value = REGISTRY.get_sample_value("warden_identity_failures_total", {"reason": reason})
    return value or 0.0


@pytest.fixture(scope="module")
def issuer() -> Issuer:
    return Issuer()


# -- the configured agent ------------------------------------------------------


async def test_no_header_is_the_sidecars_own_agent() -> None:
    agent = await Identity(config()).resolve({})
    assert (agent.id, agent.version, dict(agent.claims)) == ("support-triage", "v7", {})


async def test_naming_the_sidecars_own_agent_needs_no_proof() -> None:
    agent = await Identity(config()).resolve({"X-Warden-Agent": "support-triage"})
    assert agent.id == "support-triage"


async def test_require_proof_covers_the_sidecars_own_agent_too() -> None:
    ident = Identity(config(require_proof=True))
    with pytest.raises(Forbidden, match=AGENT_KEY_HEADER):
        await ident.resolve({})
    agent = await ident.resolve({AGENT_KEY_HEADER: TRIAGE_KEY})
    assert agent.id == "support-triage"


# -- other agents: proxy keys ----------------------------------------------------


async def test_another_agent_without_proof_is_forbidden_and_told_what_is_missing() -> None:
    before = failures("missing_proof")
    with pytest.raises(Forbidden) as err:
        await Identity(config()).resolve({"X-Warden-Agent": "refunds-bot"})
    assert "'refunds-bot' must be proved" in str(err.value)
    assert AGENT_KEY_HEADER in str(err.value)
    assert AGENT_TOKEN_HEADER in str(err.value)
    assert failures("missing_proof") == before + 1


async def test_an_unknown_agent_is_forbidden_naming_the_config_it_lacks() -> None:
    before = failures("unknown_agent")
    with pytest.raises(Forbidden, match=r"identity\.agents\.<id>\.key_sha256"):
        await Identity(config()).resolve({"X-Warden-Agent": "new-bot"})
    assert failures("unknown_agent") == before + 1


async def test_a_proxy_key_proves_its_agent() -> None:
    headers = {"X-Warden-Agent": "refunds-bot", AGENT_KEY_HEADER: REFUNDS_KEY}
    agent = await Identity(config()).resolve(headers)
    assert (agent.id, agent.version) == ("refunds-bot", "r2")


async def test_a_proxy_key_alone_names_its_agent() -> None:
    agent = await Identity(config()).resolve({AGENT_KEY_HEADER: REFUNDS_KEY})
    assert agent.id == "refunds-bot"


async def test_another_agents_key_does_not_prove_the_named_one() -> None:
    headers = {"X-Warden-Agent": "refunds-bot", AGENT_KEY_HEADER: TRIAGE_KEY}
    with pytest.raises(Forbidden, match="proves agent 'support-triage', not 'refunds-bot'"):
        await Identity(config()).resolve(headers)


@pytest.mark.parametrize("agent", [None, "support-triage", "refunds-bot"])
async def test_a_wrong_key_is_refused_even_where_no_proof_was_needed(agent: str | None) -> None:
    headers = {AGENT_KEY_HEADER: "wk_guess"}
    if agent:
        headers["X-Warden-Agent"] = agent
    before = failures("bad_key")
    with pytest.raises(Unauthenticated) as err:
        await Identity(config()).resolve(headers)
    assert "wk_guess" not in str(err.value)
    assert failures("bad_key") == before + 1


async def test_a_key_hashed_in_config_is_not_itself_a_key() -> None:
    with pytest.raises(Unauthenticated):
        await Identity(config()).resolve({AGENT_KEY_HEADER: hash_key(REFUNDS_KEY)})


@pytest.mark.parametrize("value", ["", "bad agent", "-x", "a" * 129, "ok\u00e9"])
async def test_a_malformed_agent_id_is_a_bad_request(value: str) -> None:
    with pytest.raises(RequestError, match="X-Warden-Agent must be"):
        await Identity(config()).resolve({"X-Warden-Agent": value})


@pytest.mark.parametrize(
    "name", ["X-Warden-Agent", AGENT_KEY_HEADER, AGENT_TOKEN_HEADER, AGENT_VERSION_HEADER]
)
async def test_an_identity_header_sent_twice_is_refused(name: str) -> None:
    headers: CIMultiDict[str] = CIMultiDict()
    headers.add(name, "support-triage")
    headers.add(name.lower(), "refunds-bot")
    with pytest.raises(RequestError, match="sent once"):
        await Identity(config()).resolve(headers)


# -- the agent's version ---------------------------------------------------------


async def test_a_stated_version_is_taken_where_the_config_names_none() -> None:
    unversioned = load_config(environ={}, overrides={"agent": {"id": "support-triage"}})
    agent = await Identity(unversioned).resolve({AGENT_VERSION_HEADER: " 2.4.0-canary "})
    assert (agent.id, agent.version) == ("support-triage", "2.4.0-canary")
    assert (await Identity(unversioned).resolve({})).version == ""


async def test_a_configured_version_wins_and_a_different_stated_one_is_refused() -> None:
    ident = Identity(config())
    assert (await ident.resolve({AGENT_VERSION_HEADER: "v7"})).version == "v7"
    headers = {AGENT_KEY_HEADER: REFUNDS_KEY, AGENT_VERSION_HEADER: "r2"}
    assert (await ident.resolve(headers)).version == "r2"
    before = failures("version_mismatch")
    with pytest.raises(Forbidden, match="'support-triage' is version 'v7' by configuration"):
        await ident.resolve({AGENT_VERSION_HEADER: "v8"})
    assert failures("version_mismatch") == before + 1


@pytest.mark.parametrize("value", ["", "two words", "-rc1", "v" * 65, "v1/../v2", "v\u00e9"])
async def test_a_malformed_version_is_a_bad_request(value: str) -> None:
    unversioned = load_config(environ={}, overrides={"agent": {"id": "support-triage"}})
    before = failures("malformed_agent_version")
    with pytest.raises(RequestError, match=f"{AGENT_VERSION_HEADER} must be"):
        await Identity(unversioned).resolve({AGENT_VERSION_HEADER: value})
    assert failures("malformed_agent_version") == before + 1


# -- JWTs ------------------------------------------------------------------------


async def test_a_jwt_from_a_jwks_file_proves_its_subject_and_attaches_claims(
    tmp_path: Path, issuer: Issuer
) -> None:
    token = issuer.token("refunds-bot", team="payments")
    ident = Identity(jwt_config(tmp_path, issuer))
    agent = await ident.resolve({"X-Warden-Agent": "refunds-bot", AGENT_TOKEN_HEADER: token})
    assert agent.id == "refunds-bot"
    assert agent.claims["team"] == "payments"
    assert agent.claims["iss"] == ISSUER
    alone = await ident.resolve({AGENT_TOKEN_HEADER: token})
    assert alone.id == "refunds-bot"


async def test_a_jwt_for_the_sidecars_own_agent_still_attaches_its_claims(
    tmp_path: Path, issuer: Issuer
) -> None:
    token = issuer.token("support-triage", tier="gold")
    agent = await Identity(jwt_config(tmp_path, issuer)).resolve({AGENT_TOKEN_HEADER: token})
    assert (agent.id, agent.claims["tier"]) == ("support-triage", "gold")


async def test_a_kubernetes_service_account_token_maps_to_an_agent(tmp_path: Path) -> None:
    issuer = Issuer(kind="ec")
    sa: dict[str, Any] = {"namespace": "support", "serviceaccount": {"name": "triage"}}
    token = issuer.token("system:serviceaccount:support:triage", extra={"kubernetes.io": sa})
    by_sub = jwt_config(
        tmp_path,
        issuer,
        algorithms=["ES256"],
        agents={"system:serviceaccount:support:triage": "support-triage"},
    )
    assert (await Identity(by_sub).resolve({AGENT_TOKEN_HEADER: token})).id == "support-triage"
    agent = await Identity(by_sub).resolve({AGENT_TOKEN_HEADER: token})
    assert agent.claims["kubernetes.io"]["namespace"] == "support"
    # A service account's, pod's or secret's name alone is the same in every namespace,
    # and the pod spec sets its token's audience: refused.
    for claim in ("serviceaccount", "pod", "node", "secret"):
        with pytest.raises(ConfigError, match="same in every namespace"):
            jwt_config(
                tmp_path, issuer, algorithms=["ES256"], agent_claim=f"kubernetes.io.{claim}.name"
            )
    assert jwt_config(tmp_path, issuer, agent_claim="kubernetes.io.pod.uid").identity.jwt


async def test_a_subject_missing_from_the_mapping_is_forbidden(
    tmp_path: Path, issuer: Issuer
) -> None:
    cfg = jwt_config(tmp_path, issuer, agents={"system:serviceaccount:a:b": "refunds-bot"})
    with pytest.raises(Forbidden, match=r"identity\.jwt\.agents"):
        await Identity(cfg).resolve({AGENT_TOKEN_HEADER: issuer.token("refunds-bot")})


async def test_a_subject_with_a_trailing_newline_is_no_agent_id(
    tmp_path: Path, issuer: Issuer
) -> None:
    # "refunds-bot\n" would be an agent no kill switch or cap on refunds-bot covers.
    with pytest.raises(Forbidden, match="not a valid agent id"):
        await Identity(jwt_config(tmp_path, issuer)).resolve(
            {AGENT_TOKEN_HEADER: issuer.token("refunds-bot\n")}
        )


async def test_a_token_without_the_agent_claim_is_forbidden(tmp_path: Path, issuer: Issuer) -> None:
    cfg = jwt_config(tmp_path, issuer, agent_claim="agent")
    with pytest.raises(Forbidden, match="no 'agent' claim"):
        await Identity(cfg).resolve({AGENT_TOKEN_HEADER: issuer.token()})


async def test_a_token_for_another_agent_does_not_prove_the_named_one(
    tmp_path: Path, issuer: Issuer
) -> None:
    headers = {"X-Warden-Agent": "support-triage", AGENT_TOKEN_HEADER: issuer.token("refunds-bot")}
    with pytest.raises(Forbidden, match="proves agent 'refunds-bot', not 'support-triage'"):
        await Identity(jwt_config(tmp_path, issuer)).resolve(headers)


async def test_a_key_and_a_token_must_prove_the_same_agent(tmp_path: Path, issuer: Issuer) -> None:
    ident = Identity(jwt_config(tmp_path, issuer))
    both = {AGENT_KEY_HEADER: REFUNDS_KEY, AGENT_TOKEN_HEADER: issuer.token("refunds-bot")}
    assert (await ident.resolve(both)).id == "refunds-bot"
    both[AGENT_TOKEN_HEADER] = issuer.token("support-triage")
    with pytest.raises(Forbidden, match="proves agent"):
        await ident.resolve(both)


def _bad_tokens(issuer: Issuer) -> dict[str, str]:
    other = Issuer(kid=issuer.kid)
    now = int(time.time())
    header, body = unsigned(claims_now(), {"alg": "HS256", "kid": issuer.kid, "typ": "JWT"})
    mac = hmac.new(issuer.public_pem(), f"{header}.{body}".encode(), hashlib.sha256).digest()
    hs256 = f"{header}.{body}." + base64.urlsafe_b64encode(mac).rstrip(b"=").decode()
    none_header, none_body = unsigned(claims_now(), {"alg": "none", "kid": issuer.kid})
    return {
        "expired": issuer.token(exp=now - 120),
        "not yet valid": issuer.token(nbf=now + 600),
        "wrong issuer": issuer.token(iss="https://evil.example"),
        "wrong audience": issuer.token(aud="someone-else"),
        "no audience": issuer.token(aud=None),
        "no expiry": jwt.encode(
            {"iss": ISSUER, "aud": AUDIENCE, "sub": "refunds-bot"},
            issuer.private,
            algorithm="RS256",
            headers={"kid": issuer.kid},
        ),
        "signed by another key": other.token(),
        "unknown kid": issuer.token(kid="k-unknown"),
        "alg none": f"{none_header}.{none_body}.",
        "HS256 keyed with the public key": hs256,
        "PS256 not allowed": issuer.token(alg="PS256"),
        "not a JWT": "definitely.not.ajwt",
        "garbage": "x",
        "tampered": issuer.token()[:-4] + "AAAA",
    }


@pytest.mark.parametrize(
    "case",
    [
        "expired",
        "not yet valid",
        "wrong issuer",
        "wrong audience",
        "no audience",
        "no expiry",
        "signed by another key",
        "unknown kid",
        "alg none",
        "HS256 keyed with the public key",
        "PS256 not allowed",
        "not a JWT",
        "garbage",
        "tampered",
    ],
)
async def test_a_token_that_does_not_verify_is_unauthenticated(
    tmp_path: Path, issuer: Issuer, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    token = _bad_tokens(issuer)[case]
    ident = Identity(jwt_config(tmp_path, issuer))
    caplog.set_level(logging.DEBUG)
    # Even for the sidecar's own agent, which needs no proof: a bad credential is never ignored.
    with pytest.raises(Unauthenticated) as err:
        await ident.resolve({AGENT_TOKEN_HEADER: token})
    assert token not in str(err.value)
    assert token not in caplog.text


async def test_an_expired_token_is_counted_as_expired(tmp_path: Path, issuer: Issuer) -> None:
    before = failures("expired_token")
    token = issuer.token(exp=int(time.time()) - 120)
    with pytest.raises(Unauthenticated, match="expired"):
        await Identity(jwt_config(tmp_path, issuer)).resolve({AGENT_TOKEN_HEADER: token})
    assert failures("expired_token") == before + 1


async def test_clock_skew_within_the_leeway_is_accepted(tmp_path: Path, issuer: Issuer) -> None:
    now = int(time.time())
    token = issuer.token(exp=now - 5, nbf=now + 5)
    agent = await Identity(jwt_config(tmp_path, issuer)).resolve({AGENT_TOKEN_HEADER: token})
    assert agent.id == "refunds-bot"
    strict = jwt_config(tmp_path, issuer, leeway_s=0)
    with pytest.raises(Unauthenticated):
        await Identity(strict).resolve({AGENT_TOKEN_HEADER: token})


async def test_a_keys_own_alg_binds_it(tmp_path: Path) -> None:
    # PS256 is allowed, but this key is published for RS256 only.
    issuer = Issuer(jwk_alg="RS256")
    cfg = jwt_config(tmp_path, issuer, algorithms=["RS256", "PS256"])
    ident = Identity(cfg)
    assert (await ident.resolve({AGENT_TOKEN_HEADER: issuer.token()})).id == "refunds-bot"
    with pytest.raises(Unauthenticated):
        await ident.resolve({AGENT_TOKEN_HEADER: issuer.token(alg="PS256")})


async def test_a_token_without_kid_is_verified_only_against_a_single_key(tmp_path: Path) -> None:
    one = Issuer(kid="a")
    ident = Identity(jwt_config(tmp_path, one))
    assert (await ident.resolve({AGENT_TOKEN_HEADER: one.token(kid=None)})).id == "refunds-bot"
    jwks = tmp_path / "two.json"
    jwks.write_bytes(one.jwks(Issuer(kid="b")))
    two = config(jwt={"issuer": ISSUER, "audience": AUDIENCE, "jwks_file": str(jwks)})
    with pytest.raises(Unauthenticated, match="no key id"):
        await Identity(two).resolve({AGENT_TOKEN_HEADER: one.token(kid=None)})


async def test_private_and_encryption_keys_in_a_jwks_are_ignored(tmp_path: Path) -> None:
    issuer = Issuer()
    private = jwt.algorithms.RSAAlgorithm.to_jwk(issuer.private, as_dict=True)
    enc = {**issuer.jwk(), "use": "enc"}
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [{**private, "kid": "k1"}, enc]}))
    cfg = config(jwt={"issuer": ISSUER, "audience": AUDIENCE, "jwks_file": str(jwks)})
    with pytest.raises(Unauthenticated, match="unknown key id"):
        await Identity(cfg).resolve({AGENT_TOKEN_HEADER: issuer.token()})


async def test_a_token_without_jwt_config_is_refused() -> None:
    with pytest.raises(Unauthenticated, match=r"identity\.jwt is not configured"):
        await Identity(config()).resolve({AGENT_TOKEN_HEADER: Issuer().token()})


async def test_an_unreadable_jwks_file_fails_closed(tmp_path: Path, issuer: Issuer) -> None:
    cfg = config(
        jwt={"issuer": ISSUER, "audience": AUDIENCE, "jwks_file": str(tmp_path / "missing.json")}
    )
    before = failures("jwks_unavailable")
    with pytest.raises(Unauthenticated, match="cannot be verified"):
        await Identity(cfg).resolve({AGENT_TOKEN_HEADER: issuer.token()})
    assert failures("jwks_unavailable") == before + 1


# -- JWKS from a URL: caching, rotation, outages ---------------------------------


class FakeFetch:
    """The JWKS endpoint at the outer edge: serves ``body`` or fails, counts calls."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.calls = 0
        self.fail = False

    async def __call__(self, url: str, timeout_s: float) -> bytes:
        assert url == "https://issuer.example/jwks"
        self.calls += 1
        if self.fail:
            raise OSError("connection refused")
        return self.body


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def url_identity(fetch: FakeFetch, clock: Clock) -> Identity:
    cfg = config(
        jwt={
            "issuer": ISSUER,
            "audience": AUDIENCE,
            "jwks_url": "https://issuer.example/jwks",
            "jwks_ttl_s": 60,
        }
    )
    return Identity(cfg, fetch=fetch, clock=clock)


async def test_jwks_from_a_url_is_cached_for_its_ttl(issuer: Issuer) -> None:
    fetch, clock = FakeFetch(issuer.jwks()), Clock()
    ident = url_identity(fetch, clock)
    token = {AGENT_TOKEN_HEADER: issuer.token()}
    for _ in range(3):
        assert (await ident.resolve(token)).id == "refunds-bot"
    assert fetch.calls == 1
    clock.now += 61
    await ident.resolve(token)
    assert fetch.calls == 2


async def test_a_new_kid_refetches_the_jwks_but_not_more_than_every_few_seconds(
    issuer: Issuer,
) -> None:
    fetch, clock = FakeFetch(issuer.jwks()), Clock()
    ident = url_identity(fetch, clock)
    await ident.resolve({AGENT_TOKEN_HEADER: issuer.token()})
    rotated = Issuer(kid="k2")
    fetch.body = issuer.jwks(rotated)
    clock.now += 11
    assert (await ident.resolve({AGENT_TOKEN_HEADER: rotated.token()})).id == "refunds-bot"
    assert fetch.calls == 2
    # Random kids cannot make Warden hammer the issuer.
    for n in range(5):
        with pytest.raises(Unauthenticated, match="unknown key id"):
            await ident.resolve({AGENT_TOKEN_HEADER: rotated.token(kid=f"junk{n}")})
    assert fetch.calls == 2


async def test_an_outage_keeps_the_last_good_keys(issuer: Issuer) -> None:
    fetch, clock = FakeFetch(issuer.jwks()), Clock()
    ident = url_identity(fetch, clock)
    token = {AGENT_TOKEN_HEADER: issuer.token()}
    await ident.resolve(token)
    fetch.fail = True
    clock.now += 61
    assert (await ident.resolve(token)).id == "refunds-bot"
    assert fetch.calls == 2
    await ident.resolve(token)
    assert fetch.calls == 2  # backs off after a failure


@pytest.mark.parametrize("body", [b"", b"{", b"[]", b'{"keys": 1}'])
async def test_no_keys_at_all_fails_closed(issuer: Issuer, body: bytes) -> None:
    fetch = FakeFetch(body)
    fetch.fail = not body
    with pytest.raises(Unauthenticated, match="cannot be verified"):
        await url_identity(fetch, Clock()).resolve({AGENT_TOKEN_HEADER: issuer.token()})


# -- configuration ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"algorithms": ["HS256"]}, "only public-key algorithms"),
        ({"algorithms": ["none"]}, "only public-key algorithms"),
        ({"algorithms": []}, "only public-key algorithms"),
        ({"jwks_url": "https://x.example/jwks"}, "exactly one of jwks_file and jwks_url"),
        ({"jwks_file": None}, "exactly one of jwks_file and jwks_url"),
        ({"jwks_url": "file:///etc/jwks", "jwks_file": None}, "http"),
        # Keys in cleartext could be swapped on the way: every agent's token forged.
        ({"jwks_url": "http://issuer.example/jwks", "jwks_file": None}, "must be https://"),
        ({"jwks_url": "http://10.0.0.7/jwks", "jwks_file": None}, "loopback"),
        ({"audience": []}, "identity.jwt.audience"),
        ({"agents": {"x": "bad agent"}}, "must be 1-128"),
    ],
)
def test_invalid_jwt_config_is_refused_naming_the_key(
    section: dict[str, Any], message: str
) -> None:
    base = {"issuer": ISSUER, "audience": AUDIENCE, "jwks_file": "/j.json", **section}
    with pytest.raises(ConfigError, match=message):
        load_config(environ={}, overrides={"identity": {"jwt": base}})


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"agent": {"id": "Support Bot"}}, r"agent\.id"),
        ({"agents": {"support-bot ": {"mode": "observe"}}}, r"agents\b"),
    ],
)
def test_an_agent_id_a_kill_switch_could_not_name_is_refused(
    overrides: dict[str, Any], key: str
) -> None:
    # A kill switch refuses targets with spaces: such an agent could never be stopped.
    with pytest.raises(ConfigError, match=key) as refused:
        load_config(environ={}, overrides=overrides)
    assert "must be 1-128" in str(refused.value)


@pytest.mark.parametrize("digest", ["abc", "A" * 64, "g" * 64])
def test_a_key_digest_must_be_a_sha256(digest: str) -> None:
    with pytest.raises(ConfigError, match=r"identity\.agents\.bot\.key_sha256"):
        load_config(environ={}, overrides={"identity": {"agents": {"bot": {"key_sha256": digest}}}})


def test_identity_is_off_by_default() -> None:
    cfg = load_config(environ={})
    assert (cfg.identity.require_proof, cfg.identity.agents, cfg.identity.jwt) == (False, {}, None)


# -- the CLI ---------------------------------------------------------------------


def test_cli_new_key_prints_a_key_and_the_digest_to_configure(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main(["identity", "new-key", "refunds-bot"]) == 0
    out, err = capsys.readouterr()
    key = out.strip()
    assert key.startswith("wk_")
    assert len(key) > 40
    assert f"refunds-bot:\n#       key_sha256: [{hash_key(key)}]" in err
    assert cli.main(["identity", "new-key", "refunds-bot"]) == 0
    assert capsys.readouterr().out.strip() != key


def test_cli_hash_key_reads_stdin(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(REFUNDS_KEY + "\n"))
    assert cli.main(["identity", "hash-key"]) == 0
    assert capsys.readouterr().out.strip() == hash_key(REFUNDS_KEY)


def test_cli_check_resolves_a_token_as_the_proxy_would(
    tmp_path: Path, issuer: Issuer, capsys: pytest.CaptureFixture[str]
) -> None:
    jwks = tmp_path / "jwks.json"
    jwks.write_bytes(issuer.jwks())
    conf = tmp_path / "warden.yaml"
    conf.write_text(
        json.dumps(
            {"identity": {"jwt": {"issuer": ISSUER, "audience": AUDIENCE, "jwks_file": str(jwks)}}}
        )
    )
    token = tmp_path / "token"
    token.write_text(issuer.token("refunds-bot", team="payments"))
    assert cli.main(["identity", "check", "--config", str(conf), "--token-file", str(token)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["agent"], out["claims"]["team"]) == ("refunds-bot", "payments")
    token.write_text(Issuer().token("refunds-bot"))
    assert cli.main(["identity", "check", "--config", str(conf), "--token-file", str(token)]) == 1
    assert "refused (401 unauthenticated)" in capsys.readouterr().err


async def test_require_proof_with_no_proof_configured_says_what_to_configure() -> None:
    cfg = load_config(environ={}, overrides={"identity": {"require_proof": True}})
    with pytest.raises(Forbidden, match=r"must be proved \(identity\.require_proof\)"):
        await Identity(cfg).resolve({})


async def test_an_issuer_down_from_the_start_is_not_asked_once_per_token(issuer: Issuer) -> None:
    fetch, clock = FakeFetch(issuer.jwks()), Clock()
    fetch.fail = True
    ident = url_identity(fetch, clock)
    token = {AGENT_TOKEN_HEADER: issuer.token()}
    for _ in range(3):
        with pytest.raises(Unauthenticated, match="cannot be verified"):
            await ident.resolve(token)
    assert fetch.calls == 1
    fetch.fail = False
    clock.now += 2
    assert (await ident.resolve(token)).id == "refunds-bot"
    assert fetch.calls == 2


async def test_a_failed_jwks_fetch_is_logged_without_the_urls_credentials(
    issuer: Issuer, caplog: pytest.LogCaptureFixture
) -> None:
    """The JWKS URL may carry a token or a password; the warning shows neither."""
    url = "https://warden:hunter2@issuer.example/jwks?access_token=t0p-s3cret"

    async def failing(got: str, timeout_s: float) -> bytes:
        raise ValueError(f"cannot connect to {got}")  # errors may quote the URL

    cfg = config(jwt={"issuer": ISSUER, "audience": AUDIENCE, "jwks_url": url})
    ident = Identity(cfg, fetch=failing, clock=Clock())
    with caplog.at_level(logging.WARNING), pytest.raises(Unauthenticated):
        await ident.resolve({AGENT_TOKEN_HEADER: issuer.token()})
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "cannot load JWKS from https://warden:***@issuer.example/jwks?access_token=***" in logged
    assert "hunter2" not in logged
    assert "t0p-s3cret" not in logged
