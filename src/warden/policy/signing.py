"""Bundle signatures in OPA's ``.signatures.json`` format.

The file holds ``{"signatures": ["<JWT>"]}``; the JWT's payload lists every
file of the bundle with its digest::

    {"files": [{"name": "authz/tools.rego", "hash": "<hex>", "algorithm": "SHA-256"}],
     "keyid": "release-2025", "scope": "..."}

Digests follow OPA (``bundle/hash.go``): structured files (``data.json``,
``data.yaml``, ``.manifest``) are hashed over a normalised JSON form -- object
keys sorted, no whitespace, numbers as written, strings escaped as Go's
``encoding/json`` does without HTML escaping -- so re-indenting a data file
does not break its signature. Every other file is hashed over its raw bytes.
YAML numbers are rendered as Go renders float64 and int values, which matches
OPA for ordinary numbers; sign ``data.json`` rather than YAML if you rely on
exotic number spellings.

Only asymmetric algorithms are accepted (RS*, PS*, ES*, EdDSA), and only the
ones that fit the configured key's type, so a token cannot pick its own
verification method.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
from collections.abc import Callable, Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any

import jwt
import orjson
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from warden.config import SigningConfig
from warden.policy.bundle import MANIFEST_FILE, SIGNATURES_FILE, BundleError, read_bundle_files

__all__ = [
    "SIGNING_ALGORITHMS",
    "file_digest",
    "sign_bundle",
    "signed_files_payload",
    "verify_bundle_files",
]

SIGNING_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
_HASHES: dict[str, Callable[[], Any]] = {
    "SHA-224": hashlib.sha224,
    "SHA-256": hashlib.sha256,
    "SHA-384": hashlib.sha384,
    "SHA-512": hashlib.sha512,
}
_STRUCTURED = frozenset({"data.json", "data.yaml", MANIFEST_FILE})


class _Number(str):
    """A JSON number kept as written, as Go's ``json.Number`` keeps it."""

    __slots__ = ()


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _go_string(value: str) -> str:
    out = ['"']
    for ch in value:
        code = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif code < 0x20:
            out.append(
                {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b", "\f": "\\f"}.get(
                    ch, f"\\u{code:04x}"
                )
            )
        elif ch in "\u2028\u2029":
            out.append(f"\\u{code:04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _go_float(value: float) -> str:
    if math.isnan(value) or math.isinf(value):
        raise ValueError("NaN and infinities are not valid JSON")
    if value == 0 or 1e-6 <= abs(value) < 1e21:
        text = format(Decimal(repr(value)), "f")
        return text.rstrip("0").rstrip(".") if "." in text else text
    text = repr(value)
    mantissa, _, exponent = text.partition("e")
    sign = exponent[0] if exponent[0] in "+-" else "+"
    digits = exponent.lstrip("+-").lstrip("0") or "0"
    if len(digits) == 1 and sign == "+":
        digits = "0" + digits  # Go prints at least two exponent digits, then trims e-0X only
    return f"{mantissa}e{sign}{digits}"


def _scalar(value: Any) -> str:
    if isinstance(value, _Number):
        return str(value)
    if value is True:
        return "true"
    if value is False:
        return "false"
    if value is None:
        return "null"
    if isinstance(value, str):
        return _go_string(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _go_float(value)
    raise ValueError(f"cannot hash a value of type {type(value).__name__}")


def _canonical(value: Any, out: list[str]) -> None:
    if isinstance(value, dict):
        out.append("{")
        for i, key in enumerate(sorted(value)):
            if i:
                out.append(",")
            out.append(_go_string(str(key)))
            out.append(":")
            _canonical(value[key], out)
        out.append("}")
    elif isinstance(value, list):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _canonical(item, out)
        out.append("]")
    else:
        out.append(_scalar(value))


def _structured_value(name: str, body: bytes) -> Any:
    base = name.rsplit("/", 1)[-1]
    if base == "data.yaml":
        return yaml.safe_load(body)
    return json.loads(body, parse_int=_Number, parse_float=_Number, parse_constant=_reject_constant)


def file_digest(name: str, body: bytes, algorithm: str = "SHA-256") -> str:
    """The hex digest OPA computes for a bundle file (see the module docstring)."""
    factory = _HASHES.get(algorithm)
    if factory is None:
        raise BundleError(f"{name}: unsupported hashing algorithm {algorithm!r}")
    digest = factory()
    if name.rsplit("/", 1)[-1] in _STRUCTURED:
        try:
            parts: list[str] = []
            _canonical(_structured_value(name, body), parts)
        except (ValueError, yaml.YAMLError) as exc:
            raise BundleError(f"{name}: cannot hash structured file: {exc}") from None
        digest.update("".join(parts).encode("utf-8"))
    else:
        digest.update(body)
    return str(digest.hexdigest())


def signed_files_payload(
    files: Mapping[str, bytes], algorithm: str = "SHA-256"
) -> list[dict[str, str]]:
    """The ``files`` claim for a bundle: every file except ``.signatures.json``."""
    return [
        {"name": name, "hash": file_digest(name, body, algorithm), "algorithm": algorithm}
        for name, body in sorted(files.items())
        if name != SIGNATURES_FILE
    ]


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
        payload = jwt.decode(token, key, algorithms=allowed, options={"verify_aud": False})
    except jwt.PyJWTError as exc:
        raise BundleError(f"{where}: signature check failed with key {key_id!r}: {exc}") from None
    return key_id, payload


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
) -> str | None:
    """Check ``.signatures.json`` against the configured keys; return the key id used.

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
    return key_id


def sign_bundle(
    directory: str | Path,
    private_key_pem: str | bytes,
    key_id: str,
    algorithm: str = "RS256",
    *,
    scope: str | None = None,
) -> None:
    """Write ``.signatures.json`` for a bundle directory, as ``opa sign`` does.

    Every file in the directory (hidden ones aside) is listed with its SHA-256
    digest; the key id goes in the JWT header (``kid``) and, for older OPA
    versions, in the payload (``keyid``).
    """
    if algorithm not in SIGNING_ALGORITHMS:
        raise BundleError(f"unsupported signing algorithm {algorithm!r}")
    root = Path(directory)
    if not root.is_dir():
        raise BundleError(f"{root}: sign_bundle needs a bundle directory")
    files = read_bundle_files(root)
    payload: dict[str, Any] = {"files": signed_files_payload(files), "keyid": key_id}
    if scope is not None:
        payload["scope"] = scope
    pem = private_key_pem.encode() if isinstance(private_key_pem, str) else private_key_pem
    try:
        key = serialization.load_pem_private_key(pem, password=None)
        token = jwt.encode(payload, key, algorithm=algorithm, headers={"kid": key_id})  # type: ignore[arg-type]
    except (ValueError, TypeError, jwt.PyJWTError) as exc:
        raise BundleError(f"cannot sign with the given key and {algorithm}: {exc}") from None
    body = json.dumps({"signatures": [token]}, indent=2) + "\n"
    (root / SIGNATURES_FILE).write_text(body, encoding="utf-8")
