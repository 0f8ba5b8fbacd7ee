"""Checking a bundle's ``.signatures.json`` against the configured public keys.

Only the algorithms that fit the configured key's type are accepted, so a
token cannot pick its own verification method. The format is described in
:mod:`warden.policy.bundle.signatures`.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jwt
import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from warden.policy.bundle.files import SIGNATURES_FILE
from warden.policy.bundle.model import BundleError, BundleSignature
from warden.policy.bundle.signatures import SIGNING_ALGORITHMS, file_digest

if TYPE_CHECKING:
    from warden.config import SigningConfig

__all__ = ["verify_bundle_files"]

# How far ahead of this clock a signing time may be: a signer's clock a little
# fast must not make a fresh bundle unusable.
_CLOCK_SKEW_S = 300


def _load_public_key(key_id: str, value: str) -> Any:
    text = value
    if value.startswith("@"):
        try:
            text = Path(value[1:]).read_text(encoding="utf-8")
        except OSError as exc:
            raise BundleError(
                f"policy.signing.keys.{key_id}: cannot read {value[1:]}: {exc.strerror}"
            ) from None
    try:
        return serialization.load_pem_public_key(text.encode())
    except ValueError as exc:
        raise BundleError(f"policy.signing.keys.{key_id}: not a PEM public key: {exc}") from None


def _algorithms_for(key: Any) -> list[str]:
    if isinstance(key, rsa.RSAPublicKey):
        return ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"]
    if isinstance(key, ec.EllipticCurvePublicKey):
        by_curve = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
        alg = by_curve.get(key.curve.name)
        return [alg] if alg else []
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return ["EdDSA"]
    return []


def _strip(name: str) -> str:
    return name.lstrip("/").removeprefix("./")


def _read_token(raw: bytes, where: str) -> str:
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BundleError(f"{where}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    tokens = doc.get("signatures") if isinstance(doc, dict) else None
    if not isinstance(tokens, list) or len(tokens) != 1 or not isinstance(tokens[0], str):
        raise BundleError(f"{where}: must hold exactly one signature (a JWT string)")
    return tokens[0]


def _verified_payload(token: str, signing: SigningConfig, where: str) -> tuple[str, dict[str, Any]]:
    try:
        header = jwt.get_unverified_header(token)
        unverified = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError as exc:
        raise BundleError(f"{where}: malformed signature: {exc}") from None
    key_id = header.get("kid") or unverified.get("keyid")
    if not key_id and len(signing.keys) == 1:
        key_id = next(iter(signing.keys))
    if not isinstance(key_id, str) or key_id not in signing.keys:
        raise BundleError(f"{where}: signed with unknown key id {key_id!r}")
    key = _load_public_key(key_id, signing.keys[key_id])
    allowed = [a for a in _algorithms_for(key) if a in SIGNING_ALGORITHMS]
    alg = header.get("alg")
    if alg not in allowed:
        raise BundleError(f"{where}: algorithm {alg!r} does not fit key {key_id!r} ({allowed})")
    try:
        payload = jwt.decode(
            token,
            key,
            algorithms=allowed,
            options={"verify_aud": False},
            leeway=_CLOCK_SKEW_S,
        )
    except jwt.PyJWTError as exc:
        raise BundleError(f"{where}: signature check failed with key {key_id!r}: {exc}") from None
    return key_id, payload


def _issued_at(payload: Mapping[str, Any], where: str) -> int | None:
    """The signing time (``iat``); PyJWT has checked it is an integer not in the future."""
    iat = payload.get("iat")
    if iat is None:
        return None
    if isinstance(iat, bool) or not isinstance(iat, int | float):
        raise BundleError(f"{where}: iat must be a number of seconds")
    return int(iat)


def _listed_files(payload: Mapping[str, Any], where: str) -> dict[str, tuple[str, str]]:
    entries = payload.get("files")
    if not isinstance(entries, list):
        raise BundleError(f"{where}: signature payload has no files list")
    listed: dict[str, tuple[str, str]] = {}
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise BundleError(f"{where}: malformed files entry {entry!r}")
        digest = (str(entry.get("hash", "")), str(entry.get("algorithm") or "SHA-256"))
        listed[_strip(entry["name"])] = digest
    return listed


def verify_bundle_files(
    files: Mapping[str, bytes], signing: SigningConfig, *, label: str = "bundle"
) -> BundleSignature | None:
    """Check ``.signatures.json`` against the configured keys; return what verified it.

    Returns ``None`` for an unsigned bundle when signatures are not required
    (or when no keys are configured to check one). Raises :class:`BundleError`
    for a missing signature when required, an unknown key, a bad signature, a
    digest mismatch, a file not listed, or a listed file that is missing.
    """
    raw = files.get(SIGNATURES_FILE)
    if raw is None:
        if signing.required:
            raise BundleError(f"{label}: bundle is not signed ({SIGNATURES_FILE} missing)")
        return None
    if not signing.keys:
        if signing.required:
            raise BundleError(f"{label}: policy.signing.required is set but no keys are configured")
        return None
    where = f"{label}/{SIGNATURES_FILE}"
    key_id, payload = _verified_payload(_read_token(raw, where), signing, where)
    listed = _listed_files(payload, where)
    for name in sorted(files):
        if name == SIGNATURES_FILE:
            continue
        if name not in listed:
            raise BundleError(f"{label}/{name}: file is not listed in the bundle signature")
        want, algorithm = listed.pop(name)
        got = file_digest(f"{label}/{name}", files[name], algorithm)
        if not hmac.compare_digest(got, want.lower()):
            raise BundleError(f"{label}/{name}: digest does not match the signature")
    if listed:
        missing = ", ".join(sorted(listed))
        raise BundleError(f"{where}: signed files missing from the bundle: {missing}")
    return BundleSignature(key_id, _issued_at(payload, where))
