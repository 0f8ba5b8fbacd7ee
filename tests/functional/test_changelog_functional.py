"""Change-management records in the export: a hot reload, an eval run, the config load.

A real Warden watches a bundle folder; the openai SDK makes a refund before
and after the folder changes (a new revision), then ``warden eval run``
records a run of the shipped suite into the same log, and ``warden audit
export`` must list all of it in its change log and link each decision to the
activation in force when it was made.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import jwt
import openai
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from tests.functional.conftest import audit_records, make_config
from tests.functional.test_challenger_functional import candidate
from warden.audit.changes import config_sha256
from warden.cli import main as warden_main
from warden.config import Config
from warden.server import Warden
from warden.testing import Call, MockLLM, Reply

ROOT = Path(__file__).resolve().parents[2]
SUITE = ROOT / "policies" / "customer-support-evals" / "suite.jsonl"
MESSAGES: Any = [{"role": "user", "content": "refund my order"}]


async def refund(warden: Warden, llm: MockLLM, amount: int) -> None:
    llm.script(Reply(tool_calls=[Call("issue_refund", {"order_id": "A-1", "amount": amount})]))
    async with openai.AsyncOpenAI(
        base_url=f"{warden.proxy_url}/openai/v1", api_key="sk-test", max_retries=0
    ) as client:
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)


async def test_reload_and_eval_run_appear_in_the_export_change_log(
    llm: MockLLM, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = candidate(tmp_path, 100, "rev-1")
    config = make_config(
        tmp_path, llm.url, policy={"bundles": [str(bundle)], "watch": True, "poll_interval_s": 0.05}
    )
    async with Warden(config) as warden:
        await refund(warden, llm, 75)
        # A new revision lands in the watched folder: hot reload.
        data = json.loads((bundle / "data.json").read_text())
        data["warden"]["limits"]["issue_refund"]["auto"] = 50
        (bundle / "data.json").write_text(json.dumps(data))
        (bundle / ".manifest").write_text(json.dumps({"revision": "rev-2", "roots": ["warden"]}))
        # The folder watcher is what is tested: wait for it (bounded by the test timeout).
        while warden.readiness()[1]["policy"]["revision"] != "rev-2":  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        await refund(warden, llm, 75)
    audit = tmp_path / "audit"
    # The eval run is recorded in the same log (Warden has stopped and released it).
    # In a thread: the command runs its own event loop, as it does from a shell.
    code = await asyncio.to_thread(
        warden_main, ["eval", "run", str(SUITE), "--bundle", str(bundle), "--audit", str(audit)]
    )
    assert code == 1  # rev-2 holds 75 USD refunds: the shipped suite's expectations fail
    assert "recorded as rec_" in capsys.readouterr().out
    # A replay of the log against the current revision, recorded in the log it replayed.
    replayed = await asyncio.to_thread(
        warden_main,
        ["policy", "replay", "--audit", str(audit), "--bundle", str(bundle), "--record"],
    )
    assert replayed == 0  # no threshold set
    assert "recorded as rec_" in capsys.readouterr().out
    assert warden_main(["audit", "verify", "--dir", str(audit)]) == 0
    out = tmp_path / "evidence"
    assert warden_main(["audit", "export", "--dir", str(audit), "--out", str(out)]) == 0

    changes = [orjson.loads(line) for line in (out / "changelog.jsonl").read_bytes().splitlines()]
    kinds = [c["kind"] for c in changes]
    assert kinds == [
        "config_load",
        "policy_activation",
        "policy_activation",
        "eval_run",
        "replay_run",
    ]
    assert changes[0]["body"]["config_sha256"] == config_sha256(config)
    first, second = changes[1], changes[2]
    assert (first["body"]["revision"], first["body"]["previous_revision"]) == ("rev-1", None)
    assert (second["body"]["revision"], second["body"]["previous_revision"]) == ("rev-2", "rev-1")
    assert second["body"]["manifest_sha256"] != first["body"]["manifest_sha256"]
    assert second["body"]["source"] == str(bundle)
    assert second["body"]["signed_by"] is None
    run = changes[3]["body"]
    assert run["suite_sha256"] == hashlib.sha256(SUITE.read_bytes()).hexdigest()
    assert (run["bundle_revision"], run["result"]) == ("rev-2", "fail")
    assert "refund-at-limit" in run["failed_ids"]
    replay_run = changes[4]["body"]
    assert replay_run["bundle_revision"] == "rev-2"
    # The first refund (75, allowed under rev-1) is held under rev-2.
    assert replay_run["changes"] == {"allow→require_approval": 1}
    assert replay_run["result"] == "pass"

    decisions = {
        r["id"]: r
        for r in audit_records(audit)
        if r["kind"] == "decision" and r["action"]["tool"] == "issue_refund"
    }
    links = [orjson.loads(line) for line in (out / "activations.jsonl").read_bytes().splitlines()]
    refund_links = [link for link in links if link["record_id"] in decisions]
    assert [link["bundle_revision"] for link in refund_links] == ["rev-1", "rev-2"]
    assert [decisions[link["record_id"]]["decision"]["effect"] for link in refund_links] == [
        "allow",
        "require_approval",
    ]
    assert [link["activation_id"] for link in refund_links] == [first["id"], second["id"]]
    summary = (out / "SUMMARY.md").read_text()
    assert "## Change log" in summary
    assert "champion revision rev-2 (was rev-1)" in summary
    # The package still verifies offline, the new files included in its manifest.
    manifest = (out / "MANIFEST.sha256").read_text()
    assert "changelog.jsonl" in manifest
    assert "activations.jsonl" in manifest
    key = (out / "log-key.vkey").read_text().strip()
    checked = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, str(out / "verify_evidence.py"), str(out), "--key", key],
        capture_output=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_config_hash_leaves_secrets_out(tmp_path: Path) -> None:
    base = {"ship": {"url": "postgresql://warden:hunter2@db:5432/audit", "password": "s3cret"}}
    one = make_config(tmp_path, "http://127.0.0.1:9", audit={**base, "dir": str(tmp_path)})
    other = make_config(
        tmp_path,
        "http://127.0.0.1:9",
        audit={
            "dir": str(tmp_path),
            "ship": {"url": "postgresql://warden:other@db:5432/audit", "password": "different"},
        },
    )
    assert config_sha256(one) == config_sha256(other)
    changed = make_config(tmp_path, "http://127.0.0.1:9", mode="observe")
    assert config_sha256(changed) != config_sha256(one)


def test_warden_config_shows_no_secret(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``warden config`` prints the effective config with every kind of secret masked.

    Each one once went through: a webhook's signing secret and its Slack path,
    a database password in a URL (the authority and libpq's sslpassword), a
    token in a bundle server's query.
    """
    secrets = ("whsec-s3cret", "T0001/B0002/XyZhook", "db-s3cret", "ssl-s3cret", "qs-s3cret")
    config = {
        "upstreams": {"openai": {"protocol": "openai", "base_url": "http://127.0.0.1:9/v1"}},
        "approvals": {
            "webhook": {
                "url": "https://hooks.slack.com/services/T0001/B0002/XyZhook",
                "secret": "whsec-s3cret",
            }
        },
        "state": {
            "url": "postgresql://warden:db-s3cret@db/w?sslmode=require&sslpassword=ssl-s3cret"
        },
        "policy": {"bundle_url": "https://bundles.example/support.tar.gz?token=qs-s3cret"},
    }
    path = tmp_path / "warden.yaml"
    path.write_text(json.dumps(config))
    assert warden_main(["config", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    shown = json.loads(out)
    for secret in secrets:
        assert secret not in out
    assert shown["approvals"]["webhook"]["url"] == "https://hooks.slack.com/***"
    assert shown["state"]["url"] == "postgresql://warden:***@db/w?sslmode=require&sslpassword=***"
    assert shown["policy"]["bundle_url"] == "https://bundles.example/support.tar.gz?token=***"


def test_the_config_hash_sees_sections_with_credential_like_names() -> None:
    """A change inside ``identity.jwt`` (the trusted issuer), or to a tool whose name
    ends in ``token``, changes ``config_sha256``: such names are walked, not hidden whole.
    A secret value under such a name (the webhook's) still changes nothing."""

    def hashed(**sections: Any) -> str:
        base: dict[str, Any] = {
            "upstreams": {"openai": {"protocol": "openai", "base_url": "http://127.0.0.1:9/v1"}}
        }
        return config_sha256(Config.model_validate({**base, **sections}))

    tokens = {"issuer": "https://issuer.example", "audience": ["warden"], "jwks_file": "/k.json"}
    trusted = hashed(identity={"jwt": tokens})
    assert hashed(identity={"jwt": {**tokens, "issuer": "https://evil.example"}}) != trusted
    risky = hashed(tools={"revoke_api_token": {"risk": "high"}})
    assert hashed(tools={"revoke_api_token": {"risk": "read_only"}}) != risky
    hook = {"url": "https://hooks.example/x", "secret": "one"}
    assert hashed(approvals={"webhook": hook}) == hashed(
        approvals={"webhook": {**hook, "secret": "two"}}
    )


async def refused(warden: Warden, message: str) -> None:
    """Wait until the bundle watcher reports ``message``; revision rev-1 must stay active."""
    while message not in str((status := warden.readiness()[1]["policy"])["last_error"]):
        assert status["revision"] == "rev-1"
        await asyncio.sleep(0.05)


def signing_key(path: Path) -> tuple[Path, Path, str]:
    """A new Ed25519 key pair under ``path``: private PEM, public PEM, and a key id from it."""
    key = ed25519.Ed25519PrivateKey.generate()
    private, public = path.with_suffix(".pem"), path.with_suffix(".pub")
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return private, public, f"release-{hashlib.sha256(raw).hexdigest()[:16]}"


def policy_files_sha256(bundle: Path) -> str:
    """The manifest hash as docs/audit.md defines it, from the files on disk.

    SHA-256 of one ``"<file sha256>  <path>"`` line per policy file (the
    manifest, data files and modules; not the signature), sorted by path.
    """
    digests = {
        file.relative_to(bundle).as_posix(): hashlib.sha256(file.read_bytes()).hexdigest()
        for file in bundle.rglob("*")
        if file.is_file()
        and (file.name in (".manifest", "data.json", "data.yaml") or file.suffix == ".rego")
    }
    body = "".join(f"{digests[path]}  {path}\n" for path in sorted(digests))
    return hashlib.sha256(body.encode()).hexdigest()


async def test_signed_activations_carry_the_signer_and_refused_bundles_leave_no_record(
    llm: MockLLM, tmp_path: Path
) -> None:
    """A signed hot reload records revision, manifest hash, signer key id, source and previous.

    With ``policy.signing.required``, a bundle signed with ``warden policy
    sign`` activates with the key id recorded as ``signed_by``; a tampered,
    forged (right key id, wrong key) or unsigned revision is refused, the last
    good revision keeps deciding, and no activation record is written for it.
    """
    private, public, key_id = signing_key(tmp_path / "release")
    forger, _, _ = signing_key(tmp_path / "forger")
    bundle = candidate(tmp_path, 100, "rev-1")

    signed_at: list[int] = []

    def sign(key: Path) -> None:
        args = ["policy", "sign", str(bundle), "--key", str(key), "--key-id", key_id]
        assert warden_main(args) == 0
        token = json.loads((bundle / ".signatures.json").read_text())["signatures"][0]
        signed_at.append(jwt.decode(token, options={"verify_signature": False})["iat"])

    sign(private)
    rev1_sha256 = policy_files_sha256(bundle)
    signing = {"required": True, "keys": {key_id: f"@{public}"}}
    policy = {"bundles": [str(bundle)], "watch": True, "poll_interval_s": 0.05, "signing": signing}
    async with Warden(make_config(tmp_path, llm.url, policy=policy)) as warden:
        assert warden.readiness()[1]["policy"]["signed_by"] == key_id
        await refund(warden, llm, 75)
        # rev-2 lands without a new signature: the old one no longer matches its files.
        data = json.loads((bundle / "data.json").read_text())
        data["warden"]["limits"]["issue_refund"]["auto"] = 50
        (bundle / "data.json").write_text(json.dumps(data))
        (bundle / ".manifest").write_text(json.dumps({"revision": "rev-2", "roots": ["warden"]}))
        await refused(warden, "does not match the signature")
        sign(forger)  # the trusted key id, signed with another key
        await refused(warden, f"signature check failed with key {key_id!r}")
        (bundle / ".signatures.json").unlink()
        await refused(warden, "bundle is not signed")
        await refund(warden, llm, 75)  # still decided by rev-1
        sign(private)
        while warden.readiness()[1]["policy"]["revision"] != "rev-2":  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        assert warden.readiness()[1]["policy"]["signed_by"] == key_id
        await refund(warden, llm, 75)
    rev2_sha256 = policy_files_sha256(bundle)
    assert rev2_sha256 != rev1_sha256

    audit = tmp_path / "audit"
    refunds = [
        r["decision"]
        for r in audit_records(audit)
        if r["kind"] == "decision" and r["action"]["tool"] == "issue_refund"
    ]
    assert [(d["bundle_revision"], d["effect"]) for d in refunds] == [
        ("rev-1", "allow"),
        ("rev-1", "allow"),
        ("rev-2", "require_approval"),
    ]
    out = tmp_path / "evidence"
    assert warden_main(["audit", "export", "--dir", str(audit), "--out", str(out)]) == 0
    changes = [orjson.loads(line) for line in (out / "changelog.jsonl").read_bytes().splitlines()]
    # The three refused revisions left no record: one activation at start, one at the reload.
    assert [c["kind"] for c in changes] == ["config_load", "policy_activation", "policy_activation"]
    common = {"role": "champion", "signed_by": key_id, "source": str(bundle), "name": "rev-1"}
    assert changes[1]["body"] == {
        **common,
        "revision": "rev-1",
        "previous_revision": None,
        "manifest_sha256": rev1_sha256,
        "signed_at": {"rev-1": signed_at[0]},
    }
    assert changes[2]["body"] == {
        **common,
        "revision": "rev-2",
        "previous_revision": "rev-1",
        "manifest_sha256": rev2_sha256,
        "signed_at": {"rev-1": signed_at[-1]},
    }
    summary = (out / "SUMMARY.md").read_text()
    for revision, previous, digest in (
        ("rev-1", "none", rev1_sha256),
        ("rev-2", "rev-1", rev2_sha256),
    ):
        assert (
            f"champion revision {revision} (was {previous}) from {bundle}, signed by {key_id}; "
            f"manifest {digest[:16]}"
        ) in summary


async def test_a_key_rotation_is_recorded_as_an_activation_by_the_new_signer(
    llm: MockLLM, tmp_path: Path
) -> None:
    """The same files re-signed with another trusted key activate again, naming the new signer.

    Nothing about the policy changed, but the change log must show who signs
    what is in force: an auditor reads the rotation there, not in a key store.
    """
    old_key, old_public, old_id = signing_key(tmp_path / "old")
    new_key, new_public, new_id = signing_key(tmp_path / "new")
    bundle = candidate(tmp_path, 100, "rev-1")

    def sign(key: Path, key_id: str) -> None:
        assert (
            warden_main(["policy", "sign", str(bundle), "--key", str(key), "--key-id", key_id]) == 0
        )

    sign(old_key, old_id)
    keys = {old_id: f"@{old_public}", new_id: f"@{new_public}"}
    signing = {"required": True, "keys": keys}
    policy = {"bundles": [str(bundle)], "watch": True, "poll_interval_s": 0.05, "signing": signing}
    async with Warden(make_config(tmp_path, llm.url, policy=policy)) as warden:
        assert warden.readiness()[1]["policy"]["signed_by"] == old_id
        sign(new_key, new_id)
        while warden.readiness()[1]["policy"]["signed_by"] != new_id:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        await refund(warden, llm, 75)
    changes = [r for r in audit_records(tmp_path / "audit") if r["kind"] == "policy_activation"]
    assert [
        (c["body"]["revision"], c["body"]["previous_revision"], c["body"]["signed_by"])
        for c in changes
    ] == [("rev-1", None, old_id), ("rev-1", "rev-1", new_id)]
    # A decision made after the rotation links to the new signer's activation.
    out = tmp_path / "evidence"
    assert (
        warden_main(["audit", "export", "--dir", str(tmp_path / "audit"), "--out", str(out)]) == 0
    )
    refunds = {
        r["id"]
        for r in audit_records(tmp_path / "audit")
        if r["kind"] == "decision" and r["action"]["tool"] == "issue_refund"
    }
    links = [orjson.loads(line) for line in (out / "activations.jsonl").read_bytes().splitlines()]
    refund_links = [link["activation_id"] for link in links if link["record_id"] in refunds]
    assert refund_links == [changes[1]["id"]]
