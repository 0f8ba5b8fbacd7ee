"""The ``.signatures.json`` format: file digests as OPA computes them, and the token.

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

Only asymmetric algorithms are accepted (RS*, PS*, ES*, EdDSA).
:mod:`warden.policy.bundle.verify` checks a signature,
:mod:`warden.policy.bundle.sign` writes one.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any

import yaml

from warden.policy.bundle.files import MANIFEST_FILE, SIGNATURES_FILE
from warden.policy.bundle.model import BundleError
from warden.policy.bundle.yaml_data import load_data_yaml

__all__ = ["SIGNING_ALGORITHMS", "file_digest", "signed_files_payload"]

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
        return load_data_yaml(body)
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
