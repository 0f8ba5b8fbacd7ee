"""Who the agent is: proven, never taken on trust.

A sidecar serves its configured agent (``agent.id``). Any other agent id
named in ``X-Warden-Agent`` must be proved, by a per-agent proxy key
(``X-Warden-Agent-Key``, stored in config as SHA-256) or by a JWT such as a
Kubernetes projected service-account token (``X-Warden-Agent-Token``).
Kill switches, modes and caps all use the proven id.

The rules, for any combination of headers:

- the id is ``X-Warden-Agent``; without it, the agent a credential proves;
  without either, ``agent.id``;
- every credential sent must verify (a bad one is ``401`` even where none
  was needed), and all of them must prove that same id (else ``403``);
- an id other than ``agent.id`` (or any id, with ``identity.require_proof``)
  needs at least one credential (else ``403``).

The version (``input.agent.version``, the drift and quality figures) is the
configured one (``agent.version``, ``agents.<id>.version``); where the config
names none, an agent may state it in ``X-Warden-Agent-Version``, and where it
names one, a different stated version is refused (``403``).

Keys and tokens are never logged, recorded or echoed in errors.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import orjson

from warden.config import Config, JwtConfig
from warden.errors import Forbidden, RequestError, Unauthenticated, WardenError
from warden.ingress.headers import AGENT_HEADER
from warden.model import Agent
from warden.ops import metrics
from warden.urls import scrub, shown_url, url_secrets

__all__ = [
    "AGENT_KEY_HEADER",
    "AGENT_TOKEN_HEADER",
    "AGENT_VERSION_HEADER",
    "Fetch",
    "Identity",
    "hash_key",
]

AGENT_KEY_HEADER = "X-Warden-Agent-Key"
AGENT_TOKEN_HEADER = "X-Warden-Agent-Token"  # noqa: S105 (a header name, not a secret)
AGENT_VERSION_HEADER = "X-Warden-Agent-Version"

Fetch = Callable[[str, float], Awaitable[bytes]]
"""``fetch(url, timeout_s)``: the body of a ``200`` answer; raises on anything else."""

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@/-]{0,127}\Z")
_VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")
# A token naming an unknown kid may trigger a refetch (key rotation), but no
# more often than this, so random kids cannot turn Warden into a JWKS flooder.
_MIN_REFETCH_S = 10.0
_MIN_RETRY_S = 1.0  # after a failed first load, before trying again
_MAX_JWKS_BYTES = 1024 * 1024

log = logging.getLogger(__name__)


def hash_key(key: str) -> str:
    """The hex SHA-256 of a proxy key, as ``identity.agents.<id>.key_sha256`` stores it.

    A key that is not text (raw bytes a server kept as surrogates) hashes its
    bytes as given: no configured key matches it.
    """
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def _fail[E: WardenError](reason: str, error: E) -> E:
    metrics.IDENTITY_FAILURES.labels(reason).inc()
    return error


def _single(headers: Mapping[str, str], name: str) -> str | None:
    # Two copies of an identity header could be read differently by two
    # layers; refuse rather than pick one.
    getall = getattr(headers, "getall", None)
    if getall is not None:
        values: list[str] = getall(name, [])
        if len(values) > 1:
            raise _fail("ambiguous_header", RequestError(f"{name} must be sent once"))
        return values[0] if values else None
    return headers.get(name)


def _claim(claims: Mapping[str, Any], path: str) -> Any:
    """The value at a dotted claim path; a key may itself hold dots (``kubernetes.io``)."""
    if path in claims:
        return claims[path]
    parts = path.split(".")
    node: Any = claims
    while parts:
        if not isinstance(node, Mapping):
            return None
        # The longest prefix that is a key wins, so "kubernetes.io" is one step.
        for end in range(len(parts), 0, -1):
            key = ".".join(parts[:end])
            if key in node:
                node, parts = node[key], parts[end:]
                break
        else:
            return None
    return node


@dataclass(frozen=True, slots=True)
class _KeySet:
    """One JWKS as loaded: signing keys by ``kid``, and the keys with none."""

    by_kid: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    unnamed: tuple[Mapping[str, Any], ...] = ()
    loaded_at: float = 0.0

    @property
    def size(self) -> int:
        return len(self.by_kid) + len(self.unnamed)


def _parse_jwks(raw: bytes, loaded_at: float) -> _KeySet:
    doc = orjson.loads(raw)
    keys = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(keys, list):
        raise ValueError('not a JWKS: no "keys" list')
    by_kid: dict[str, Mapping[str, Any]] = {}
    unnamed: list[Mapping[str, Any]] = []
    for entry in keys:
        if not isinstance(entry, dict) or not isinstance(entry.get("kty"), str):
            continue
        if entry.get("use", "sig") != "sig" or "d" in entry:
            # Encryption keys verify nothing; a private key does not belong here.
            continue
        kid = entry.get("kid")
        if isinstance(kid, str):
            by_kid[kid] = entry
        else:
            unnamed.append(entry)
    return _KeySet(by_kid=by_kid, unnamed=tuple(unnamed), loaded_at=loaded_at)


async def _http_get(url: str, timeout_s: float) -> bytes:
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    # One short-lived session per fetch: fetches are rare (once per TTL), and
    # nothing is left to close when the server stops.
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.get(url, allow_redirects=False) as resp,
    ):
        if resp.status != 200:
            raise ValueError(f"HTTP {resp.status}")
        # Read to the end: one read returns what has arrived so far, and a JWKS sent
        # in several pieces would be cut short (every token refused, rotation stalled).
        body = bytearray()
        async for chunk in resp.content.iter_any():
            body += chunk
            if len(body) > _MAX_JWKS_BYTES:
                raise ValueError("JWKS larger than 1 MiB")
        return bytes(body)


class _Jwks:
    """The verification keys, read from a file or URL and cached for ``jwks_ttl_s``."""

    def __init__(self, config: JwtConfig, fetch: Fetch, clock: Callable[[], float]) -> None:
        self._config = config
        self._fetch = fetch
        self._clock = clock
        self._keys: _KeySet | None = None
        self._tried_at = float("-inf")
        self._lock = asyncio.Lock()

    async def key_for(self, kid: str | None) -> Mapping[str, Any]:
        """The JWK for ``kid``; raises ``Unauthenticated`` when there is none."""
        keys = await self._current(kid)
        if kid is not None:
            found = keys.by_kid.get(kid)
            if found is None:
                raise _fail("bad_token", Unauthenticated(f"{AGENT_TOKEN_HEADER}: unknown key id"))
            return found
        if keys.size != 1:
            raise _fail(
                "bad_token",
                Unauthenticated(f"{AGENT_TOKEN_HEADER}: no key id (kid), and the JWKS has several"),
            )
        return next(iter(keys.by_kid.values()), None) or keys.unnamed[0]

    def _fresh(self, keys: _KeySet | None, kid: str | None, now: float) -> bool:
        if keys is None:
            return False
        if now - keys.loaded_at >= self._config.jwks_ttl_s:
            return now - self._tried_at < _MIN_REFETCH_S  # a failed refetch backs off
        return kid is None or kid in keys.by_kid or now - self._tried_at < _MIN_REFETCH_S

    async def _current(self, kid: str | None) -> _KeySet:
        if self._fresh(self._keys, kid, self._clock()):
            assert self._keys is not None
            return self._keys
        async with self._lock:
            # Another request may have loaded them while this one waited.
            now = self._clock()
            if self._fresh(self._keys, kid, now):
                assert self._keys is not None
                return self._keys
            if self._keys is None and now - self._tried_at < _MIN_RETRY_S:
                # Down from the start: every token fails fast instead of each fetching.
                raise self._unavailable()
            self._tried_at = now
            try:
                self._keys = _parse_jwks(await self._load(), now)
            except Exception as exc:  # any failure: keep the last good keys
                url = self._config.jwks_url
                source = shown_url(url) if url else self._config.jwks_file
                why = scrub(str(exc), url_secrets(url)) if url else exc
                log.warning("cannot load JWKS from %s: %s", source, why)
                if self._keys is None:
                    raise self._unavailable() from None
            return self._keys

    @staticmethod
    def _unavailable() -> Unauthenticated:
        return _fail(
            "jwks_unavailable",
            Unauthenticated("agent tokens cannot be verified now: no signing keys"),
        )

    async def _load(self) -> bytes:
        if self._config.jwks_url is not None:
            return await self._fetch(self._config.jwks_url, self._config.jwks_timeout_s)
        assert self._config.jwks_file is not None
        return await asyncio.to_thread(Path(self._config.jwks_file).read_bytes)


class Identity:
    """Resolves the proven :class:`Agent` of a request from its headers."""

    def __init__(
        self,
        config: Config,
        *,
        fetch: Fetch = _http_get,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config
        ident = config.identity
        self._digests = [
            (agent_id, digest)
            for agent_id, keys in ident.agents.items()
            for digest in keys.key_sha256
        ]
        self._jwks = _Jwks(ident.jwt, fetch, clock) if ident.jwt is not None else None

    async def resolve(self, headers: Mapping[str, str]) -> Agent:
        """The proven agent; raises ``Unauthenticated`` (401) or ``Forbidden`` (403).

        A malformed ``X-Warden-Agent`` (or an identity header sent twice) is a
        ``RequestError`` (400).
        """
        named = _single(headers, AGENT_HEADER)
        if named is not None:
            named = named.strip()
            if not _ID_RE.match(named):
                raise _fail(
                    "malformed_agent_id",
                    RequestError(f"{AGENT_HEADER} must be 1-128 characters of [A-Za-z0-9._:@/-]"),
                )
        key = _single(headers, AGENT_KEY_HEADER)
        token = _single(headers, AGENT_TOKEN_HEADER)
        proofs: list[tuple[str, str]] = []  # (what proved it, agent id)
        if key is not None:
            proofs.append((AGENT_KEY_HEADER, self._by_key(key.strip())))
        claims: Mapping[str, Any] = {}
        if token is not None:
            token_agent, claims = await self._by_token(token.strip())
            proofs.append((AGENT_TOKEN_HEADER, token_agent))
        configured = self._config.agent.id
        agent_id = named or (proofs[0][1] if proofs else configured)
        for header, proved in proofs:
            if proved != agent_id:
                raise _fail(
                    "credential_mismatch",
                    Forbidden(f"{header} proves agent {proved!r}, not {agent_id!r}"),
                )
        if not proofs and (agent_id != configured or self._config.identity.require_proof):
            raise self._unproven(agent_id)
        version = self._version(agent_id)
        told = _single(headers, AGENT_VERSION_HEADER)
        if told is not None:
            version = self._told_version(agent_id, version, told.strip())
        return Agent(id=agent_id, version=version, claims=claims)

    @staticmethod
    def _told_version(agent_id: str, configured: str, told: str) -> str:
        """The version an agent states: taken where the config names none, else checked."""
        if not _VERSION_RE.fullmatch(told):
            raise _fail(
                "malformed_agent_version",
                RequestError(f"{AGENT_VERSION_HEADER} must be 1-64 characters of [A-Za-z0-9._+-]"),
            )
        if configured and told != configured:
            # The platform team pinned it: an agent cannot move its decisions or
            # its drift figures to another version by saying so.
            raise _fail(
                "version_mismatch",
                Forbidden(
                    f"agent {agent_id!r} is version {configured!r} by configuration, "
                    f"not {told!r} ({AGENT_VERSION_HEADER})"
                ),
            )
        return told

    def _by_key(self, key: str) -> str:
        digest = hash_key(key)
        found: str | None = None
        # Compare against every digest, so timing says nothing about which matched.
        for agent_id, stored in self._digests:
            if hmac.compare_digest(digest, stored) and found is None:
                found = agent_id
        if found is None:
            raise _fail("bad_key", Unauthenticated(f"{AGENT_KEY_HEADER} is not a configured key"))
        return found

    async def _by_token(self, token: str) -> tuple[str, Mapping[str, Any]]:
        if self._jwks is None:
            raise _fail(
                "jwt_not_configured",
                Unauthenticated(f"{AGENT_TOKEN_HEADER} sent, but identity.jwt is not configured"),
            )
        cfg = self._config.identity.jwt
        assert cfg is not None
        try:
            if not token.isascii():  # a JWT is base64url and dots; raw bytes are none
                raise jwt.DecodeError("not ASCII")
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise _fail(
                "bad_token", Unauthenticated(f"{AGENT_TOKEN_HEADER} is not a JWT")
            ) from None
        alg, kid = header.get("alg"), header.get("kid")
        if not isinstance(alg, str) or alg not in cfg.algorithms:
            allowed = ", ".join(cfg.algorithms)
            raise _fail(
                "bad_token",
                Unauthenticated(
                    f"{AGENT_TOKEN_HEADER}: algorithm not allowed (allowed: {allowed})"
                ),
            )
        if kid is not None and not isinstance(kid, str):
            raise _fail("bad_token", Unauthenticated(f"{AGENT_TOKEN_HEADER}: kid is not a string"))
        jwk = await self._jwks.key_for(kid)
        if jwk.get("alg", alg) != alg:
            # A key published for one algorithm verifies nothing else (PyJWK
            # would let the algorithm passed to it override the key's own).
            raise _fail(
                "bad_token",
                Unauthenticated(f"{AGENT_TOKEN_HEADER}: its key is not for algorithm {alg}"),
            )
        try:
            key = jwt.PyJWK(dict(jwk), algorithm=alg)
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=list(cfg.audience),
                issuer=cfg.issuer,
                leeway=cfg.leeway_s,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise _fail("expired_token", Unauthenticated(f"{AGENT_TOKEN_HEADER} expired")) from None
        except (jwt.PyJWTError, ValueError, TypeError) as exc:
            # PyJWT's messages name the failed check, never the token itself.
            raise _fail(
                "bad_token", Unauthenticated(f"{AGENT_TOKEN_HEADER} does not verify: {exc}")
            ) from None
        return self._agent_of(cfg, claims), claims

    def _agent_of(self, cfg: JwtConfig, claims: Mapping[str, Any]) -> str:
        value = _claim(claims, cfg.agent_claim)
        if not isinstance(value, str):
            raise _fail(
                "unmapped_subject",
                Forbidden(f"{AGENT_TOKEN_HEADER} verifies but has no {cfg.agent_claim!r} claim"),
            )
        if cfg.agents:
            mapped = cfg.agents.get(value)
            if mapped is None:
                raise _fail(
                    "unmapped_subject",
                    Forbidden(
                        f"{AGENT_TOKEN_HEADER} verifies, but its {cfg.agent_claim} {value!r} "
                        "is no agent in identity.jwt.agents"
                    ),
                )
            return mapped
        if not _ID_RE.match(value):
            raise _fail(
                "unmapped_subject",
                Forbidden(
                    f"{AGENT_TOKEN_HEADER}: its {cfg.agent_claim} is not a valid agent id; "
                    "map it with identity.jwt.agents"
                ),
            )
        return value

    def _unproven(self, agent_id: str) -> Forbidden:
        ident = self._config.identity
        how = f"send {AGENT_KEY_HEADER} (a proxy key) or {AGENT_TOKEN_HEADER} (a JWT)"
        if agent_id in ident.agents or ident.jwt is not None:
            return _fail("missing_proof", Forbidden(f"agent {agent_id!r} must be proved: {how}"))
        if agent_id == self._config.agent.id:  # identity.require_proof, and nothing can prove it
            return _fail(
                "missing_proof",
                Forbidden(
                    f"agent {agent_id!r} must be proved (identity.require_proof), but no proof "
                    f"is configured: set identity.agents.{agent_id}.key_sha256 or identity.jwt"
                ),
            )
        return _fail(
            "unknown_agent",
            Forbidden(
                f"agent {agent_id!r} is not this sidecar's agent and no proof for it is "
                f"configured (identity.agents.<id>.key_sha256 or identity.jwt); {how}"
            ),
        )

    def _version(self, agent_id: str) -> str:
        if agent_id == self._config.agent.id:
            return self._config.agent.version
        own = self._config.agents.get(agent_id)
        return own.version if own is not None else ""
