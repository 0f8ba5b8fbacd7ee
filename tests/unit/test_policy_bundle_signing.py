"""Bundle signatures in OPA's .signatures.json format."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import replace
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from warden.config import SigningConfig
from warden.policy.bundle import BundleError, load_bundle, merge_bundles
from warden.policy.bundle.order import SignedMark, check_order
from warden.policy.bundle.sign import sign_bundle
from warden.policy.bundle.signatures import file_digest

POLICY = 'package warden\n\ndecision := {"effect": "allow"}\n'


def keypair(kind: str) -> tuple[bytes, str]:
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
    if kind == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    elif kind == "ec":
        key = ec.generate_private_key(ec.SECP256R1())
    else:
        key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, public.decode()


@pytest.fixture(scope="module")
def rsa_keys() -> tuple[bytes, str]:
    return keypair("rsa")


def make_bundle(root: Path) -> Path:
    (root / "warden").mkdir(parents=True)
    (root / "warden" / "policy.rego").write_text(POLICY)
    (root / "warden" / "data.json").write_text('{"b": 1, "a": [true, null, "x"]}')
    (root / ".manifest").write_text('{"revision": "7", "roots": ["warden"]}')
    return root


@pytest.mark.parametrize(("kind", "alg"), [("rsa", "RS256"), ("ec", "ES256"), ("ed", "EdDSA")])
def test_signed_bundle_verifies(tmp_path: Path, kind: str, alg: str) -> None:
    private, public = keypair(kind) if kind != "rsa" else keypair("rsa")
    root = make_bundle(tmp_path / "b")
    sign_bundle(root, private, "release", alg)
    doc = json.loads((root / ".signatures.json").read_text())
    token = doc["signatures"][0]
    assert jwt.get_unverified_header(token)["kid"] == "release"
    names = {f["name"] for f in jwt.decode(token, options={"verify_signature": False})["files"]}
    assert names == {".manifest", "warden/data.json", "warden/policy.rego"}
    bundle = load_bundle(root, signing=SigningConfig(required=True, keys={"release": public}))
    assert bundle.signed_by == "release"
    assert bundle.revision == "7"


def test_key_may_be_given_as_a_file(tmp_path: Path, rsa_keys: tuple[bytes, str]) -> None:
    private, public = rsa_keys
    root = make_bundle(tmp_path / "b")
    sign_bundle(root, private, "k1")
    key_file = tmp_path / "k1.pem"
    key_file.write_text(public)
    signing = SigningConfig(required=True, keys={"k1": f"@{key_file}"})
    assert load_bundle(root, signing=signing).signed_by == "k1"


def test_reformatted_json_keeps_its_signature(tmp_path: Path, rsa_keys: tuple[bytes, str]) -> None:
    private, public = rsa_keys
    root = make_bundle(tmp_path / "b")
    sign_bundle(root, private, "k1")
    (root / "warden" / "data.json").write_text('{\n  "a": [true, null, "x"],\n  "b": 1\n}\n')
    load_bundle(root, signing=SigningConfig(required=True, keys={"k1": public}))


def test_structured_files_hash_like_opa() -> None:
    # OPA hashes JSON by its sorted, whitespace-free form; other files by their bytes.
    canonical = b'{"a":[true,null,"x"],"b":1}'
    assert file_digest("data.json", b'{"b": 1,\n "a": [true, null, "x"]}') == (
        hashlib.sha256(canonical).hexdigest()
    )
    assert file_digest("x/data.json", b'{"n": 1.50, "s": "<\\u2028>"}') == (
        hashlib.sha256(b'{"n":1.50,"s":"<\\u2028>"}').hexdigest()
    )
    assert file_digest("p.rego", b"package x\n") == hashlib.sha256(b"package x\n").hexdigest()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("tamper", "digest does not match"),
        ("extra", "not listed in the bundle signature"),
        ("remove", "signed files missing from the bundle"),
    ],
)
def test_changed_bundles_are_refused(
    tmp_path: Path, rsa_keys: tuple[bytes, str], change: str, message: str
) -> None:
    private, public = rsa_keys
    root = make_bundle(tmp_path / "b")
    sign_bundle(root, private, "k1")
    if change == "tamper":
        (root / "warden" / "policy.rego").write_text(POLICY.replace("allow", "deny"))
    elif change == "extra":
        (root / "warden" / "extra.rego").write_text("package warden\nx := 1\n")
    else:
        (root / "warden" / "data.json").unlink()
    with pytest.raises(BundleError, match=message):
        load_bundle(root, signing=SigningConfig(required=True, keys={"k1": public}))


def test_unsigned_bundle(tmp_path: Path, rsa_keys: tuple[bytes, str]) -> None:
    root = make_bundle(tmp_path / "b")
    with pytest.raises(BundleError, match="not signed"):
        load_bundle(root, signing=SigningConfig(required=True, keys={"k1": rsa_keys[1]}))
    assert load_bundle(root, signing=SigningConfig(keys={"k1": rsa_keys[1]})).signed_by is None


def test_required_without_keys(tmp_path: Path, rsa_keys: tuple[bytes, str]) -> None:
    root = make_bundle(tmp_path / "b")
    sign_bundle(root, rsa_keys[0], "k1")
    with pytest.raises(BundleError, match="no keys are configured"):
        load_bundle(root, signing=SigningConfig(required=True))


def test_wrong_or_unknown_key(tmp_path: Path, rsa_keys: tuple[bytes, str]) -> None:
    root = make_bundle(tmp_path / "b")
    sign_bundle(root, rsa_keys[0], "k1")
    other = keypair("rsa")[1]
    with pytest.raises(BundleError, match="signature check failed"):
        load_bundle(root, signing=SigningConfig(required=True, keys={"k1": other}))
    with pytest.raises(BundleError, match="unknown key id 'k1'"):
        load_bundle(root, signing=SigningConfig(required=True, keys={"k2": other, "k3": other}))


def test_algorithm_must_fit_the_key(tmp_path: Path, rsa_keys: tuple[bytes, str]) -> None:
    root = make_bundle(tmp_path / "b")
    # A token "signed" with HMAC using the public key text as the secret.
    token = jwt.encode({"files": []}, "x" * 32, algorithm="HS256", headers={"kid": "k1"})
    (root / ".signatures.json").write_text(json.dumps({"signatures": [token]}))
    with pytest.raises(BundleError, match="does not fit key"):
        load_bundle(root, signing=SigningConfig(required=True, keys={"k1": rsa_keys[1]}))


def test_malformed_signatures_file(tmp_path: Path, rsa_keys: tuple[bytes, str]) -> None:
    root = make_bundle(tmp_path / "b")
    signing = SigningConfig(required=True, keys={"k1": rsa_keys[1]})
    (root / ".signatures.json").write_text('{"signatures": []}')
    with pytest.raises(BundleError, match="exactly one signature"):
        load_bundle(root, signing=signing)
    (root / ".signatures.json").write_text('{"signatures": ["not.a.jwt"]}')
    with pytest.raises(BundleError, match="malformed signature"):
        load_bundle(root, signing=signing)


def test_sign_bundle_rejects_bad_input(tmp_path: Path) -> None:
    root = make_bundle(tmp_path / "b")
    with pytest.raises(BundleError, match="unsupported signing algorithm"):
        sign_bundle(root, b"", "k", "HS256")
    with pytest.raises(BundleError, match="cannot sign"):
        sign_bundle(root, b"not a key", "k", "RS256")


def test_signing_times_are_kept_checked_and_merged(
    tmp_path: Path, rsa_keys: tuple[bytes, str]
) -> None:
    """``iat`` is the signing time; one in the future beyond the clock skew is refused."""
    private, public = rsa_keys
    signing = SigningConfig(required=True, keys={"k1": public})
    support = make_bundle(tmp_path / "support")
    sign_bundle(support, private, "k1", issued_at=1_700_000_000)
    assert load_bundle(support, signing=signing).signed_at == {"support": 1_700_000_000}
    billing = tmp_path / "billing"
    (billing / "billing").mkdir(parents=True)
    (billing / "billing" / "p.rego").write_text("package billing\n\nx := 1\n")
    (billing / ".manifest").write_text('{"roots": ["billing"]}')
    sign_bundle(billing, private, "k1", issued_at=1_700_000_500)
    merged = merge_bundles(
        [load_bundle(support, signing=signing), load_bundle(billing, signing=signing)]
    )
    assert merged.signed_at == {"support": 1_700_000_000, "billing": 1_700_000_500}
    assert load_bundle(support).signed_at is None  # not verified: no time claimed
    sign_bundle(support, private, "k1", issued_at=int(time.time()) + 3600)
    with pytest.raises(BundleError, match="signature check failed.*not yet valid"):
        load_bundle(support, signing=signing)


def test_check_order_refuses_older_and_untimed_once_a_mark_exists(tmp_path: Path) -> None:
    bundle = load_bundle(make_bundle(tmp_path / "support"))
    marks = {"support": SignedMark("support", 1_000, "rev-9", 0.0)}
    check_order(replace(bundle, signed_at={"support": 1_000}), marks)  # the same time: fine
    check_order(replace(bundle, signed_at={"other": 5}), marks)  # no mark for its name
    with pytest.raises(BundleError, match=r"support: signed at .* \(revision rev-9\)"):
        check_order(replace(bundle, signed_at={"support": 999}), marks)
    with pytest.raises(BundleError, match="carries no signing time"):
        check_order(replace(bundle, signed_at={"support": None}), marks)
