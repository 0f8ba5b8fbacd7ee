"""Writing a bundle's ``.signatures.json``, as ``opa sign`` does (``warden policy sign``)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization

from warden.policy.bundle.files import SIGNATURES_FILE, read_bundle_files
from warden.policy.bundle.model import BundleError
from warden.policy.bundle.signatures import SIGNING_ALGORITHMS, signed_files_payload

__all__ = ["sign_bundle"]


def sign_bundle(
    directory: str | Path,
    private_key_pem: str | bytes,
    key_id: str,
    algorithm: str = "RS256",
    *,
    scope: str | None = None,
    issued_at: int | None = None,
) -> int:
    """Write ``.signatures.json`` for a bundle directory, as ``opa sign`` does.

    Every file in the directory (hidden ones aside) is listed with its SHA-256
    digest; the key id goes in the JWT header (``kid``) and, for older OPA
    versions, in the payload (``keyid``). The signing time goes in ``iat``
    (``issued_at``, Unix seconds; now by default): Warden refuses a bundle
    signed before the newest one of its name it activated (ADR 0014).
    Returns the signing time written.
    """
    if algorithm not in SIGNING_ALGORITHMS:
        raise BundleError(f"unsupported signing algorithm {algorithm!r}")
    root = Path(directory)
    if not root.is_dir():
        raise BundleError(f"{root}: sign_bundle needs a bundle directory")
    files = read_bundle_files(root)
    signed_at = int(time.time()) if issued_at is None else issued_at
    payload: dict[str, Any] = {
        "files": signed_files_payload(files),
        "keyid": key_id,
        "iat": signed_at,
    }
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
    return signed_at
