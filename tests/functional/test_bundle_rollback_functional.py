"""Signed bundles only move forward: putting back an older signed bundle is refused.

A real Warden watches a signed bundle folder and decides refunds made through
the openai SDK. Whoever can write the folder puts back the files and
signature of an older release: Warden keeps the newer revision, says why, and
records no activation. A restart on the older bundle (the same state
database) starts without a policy, so every action is denied, until the
older files are signed again (a rollback on purpose) or
``policy.signing.allow_older`` is set. A signature without a signing time
(as ``opa sign`` writes) is refused once a timed one was activated.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path
from typing import Any

import jwt
import openai
import pytest
from cryptography.hazmat.primitives import serialization

from tests.functional.conftest import audit_records, make_config
from tests.functional.test_challenger_functional import candidate
from tests.functional.test_changelog_functional import MESSAGES, refund, signing_key
from warden.policy.bundle.files import read_bundle_files
from warden.policy.bundle.sign import sign_bundle
from warden.policy.bundle.signatures import signed_files_payload
from warden.server import Warden
from warden.testing import MockLLM


def release(
    tmp_path: Path, name: str, auto: int, revision: str, key: Path, key_id: str, at: int
) -> Path:
    """The shipped bundle as ``revision`` (refunds up to ``auto`` allowed), signed at ``at``."""
    made = candidate(tmp_path / name, auto, revision)
    sign_bundle(made, key.read_bytes(), key_id, "EdDSA", issued_at=at)
    return made


def put_in_place(source: Path, folder: Path) -> None:
    """Replace the watched folder's files with ``source``'s (as a deploy or an attacker would)."""
    shutil.copytree(source, folder, dirs_exist_ok=True)


def activations(tmp_path: Path) -> list[str]:
    return [
        r["body"]["revision"]
        for r in audit_records(tmp_path / "audit")
        if r["kind"] == "policy_activation"
    ]


async def status_error(warden: Warden, message: str) -> Any:
    """Wait until the policy status reports ``message``; return the status."""
    while message not in str((status := warden.readiness()[1]["policy"])["last_error"]):  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    return status


def watched(tmp_path: Path, first: Path, public: Path, key_id: str) -> tuple[Path, dict[str, Any]]:
    """A watched bundle folder holding ``first``, and the policy config that requires
    signatures by ``key_id``."""
    folder = tmp_path / "live" / "support"
    folder.parent.mkdir()
    shutil.copytree(first, folder)
    signing = {"required": True, "keys": {key_id: f"@{public}"}}
    return folder, {
        "bundles": [str(folder)],
        "watch": True,
        "poll_interval_s": 0.05,
        "signing": signing,
    }


async def test_an_older_signed_bundle_is_refused_live_and_after_a_restart(
    llm: MockLLM, tmp_path: Path
) -> None:
    private, public, key_id = signing_key(tmp_path / "release")
    now = int(time.time())
    old = release(tmp_path, "old", 100, "rev-1", private, key_id, now - 3600)
    new = release(tmp_path, "new", 50, "rev-2", private, key_id, now - 60)
    folder, policy = watched(tmp_path, old, public, key_id)

    async with Warden(make_config(tmp_path, llm.url, policy=policy)) as warden:
        await refund(warden, llm, 75)  # rev-1: allowed
        put_in_place(new, folder)
        while warden.readiness()[1]["policy"]["revision"] != "rev-2":  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        # The older release's files and signature, put back.
        put_in_place(old, folder)
        status = await status_error(warden, "before the newest bundle of this name")
        assert status["revision"] == "rev-2"
        assert "support: signed at" in str(status["last_error"])
        await refund(warden, llm, 75)  # still rev-2: held for approval

    refunds = [
        (r["decision"]["bundle_revision"], r["decision"]["effect"])
        for r in audit_records(tmp_path / "audit")
        if r["kind"] == "decision" and r["action"]["tool"] == "issue_refund"
    ]
    assert refunds == [("rev-1", "allow"), ("rev-2", "require_approval")]
    assert activations(tmp_path) == ["rev-1", "rev-2"]

    # A restart on the older bundle, same state database: no policy, every action denied.
    async with Warden(make_config(tmp_path, llm.url, policy=policy)) as warden:
        status = warden.readiness()[1]["policy"]
        assert status["ready"] is False
        assert "before the newest bundle of this name" in str(status["last_error"])
        async with openai.AsyncOpenAI(
            base_url=f"{warden.proxy_url}/openai/v1", api_key="sk-test", max_retries=0
        ) as client:
            with pytest.raises(openai.PermissionDeniedError):
                await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        # Signing the older files again is a rollback on purpose: it activates.
        sign_bundle(folder, private.read_bytes(), key_id, "EdDSA")
        while warden.readiness()[1]["policy"]["revision"] != "rev-1":  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        await refund(warden, llm, 75)
    assert activations(tmp_path) == ["rev-1", "rev-2", "rev-1"]


async def test_allow_older_activates_it_and_an_untimed_signature_needs_it(
    llm: MockLLM, tmp_path: Path
) -> None:
    private, public, key_id = signing_key(tmp_path / "release")
    now = int(time.time())
    new = release(tmp_path, "new", 50, "rev-2", private, key_id, now - 60)
    folder, policy = watched(tmp_path, new, public, key_id)
    signing = policy["signing"]
    async with Warden(make_config(tmp_path, llm.url, policy=policy)):
        pass  # rev-2 activated: its signing time is the mark

    # An older release signed as `opa sign` does: a valid signature with no iat.
    shutil.rmtree(folder)
    shutil.copytree(candidate(tmp_path / "untimed", 100, "rev-1"), folder)
    (folder / ".signatures.json").unlink(missing_ok=True)
    pem = serialization.load_pem_private_key(private.read_bytes(), password=None)
    claims = {"files": signed_files_payload(read_bundle_files(folder)), "keyid": key_id}
    token = jwt.encode(claims, pem, algorithm="EdDSA", headers={"kid": key_id})  # type: ignore[arg-type]
    (folder / ".signatures.json").write_text(json.dumps({"signatures": [token]}))
    async with Warden(make_config(tmp_path, llm.url, policy=policy)) as warden:
        status = warden.readiness()[1]["policy"]
        assert status["ready"] is False
        assert "carries no signing time" in str(status["last_error"])

    allowed = {**policy, "signing": {**signing, "allow_older": True}}
    async with Warden(make_config(tmp_path, llm.url, policy=allowed)) as warden:
        assert warden.readiness()[1]["policy"]["revision"] == "rev-1"
        await refund(warden, llm, 75)
    assert activations(tmp_path) == ["rev-2", "rev-1"]
