"""A log started again with another signing key (a changed ``audit.signing_key_file``).

A log keeps the key it began with: the start is refused, the folder is left
exactly as it was (the verifier key above all, which auditors check the log
with), and the refusal says how to go back or how to move to the new key (a
new log folder). A verifier key an older Warden overwrote that way is put
right by the next start with the key that signed the log.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from warden.audit import AuditLog
from warden.audit.checkpoint import NoteSigner, NoteVerifier, generate_signing_key, load_signing_key
from warden.audit.layout import Layout
from warden.audit.verify import key_fingerprint, verify_log
from warden.config import AuditConfig
from warden.errors import AuditError
from warden.testing.audit import fill

REFUSED = "was signed with another key than the one configured"


def _config(root: Path, key: Path | None) -> AuditConfig:
    return AuditConfig(
        dir=str(root),
        checkpoint_interval_s=3600,
        signing_key_file=str(key) if key is not None else None,
    )


def _key(folder: Path, name: str) -> Path:
    folder.mkdir(exist_ok=True)
    generate_signing_key(folder / name)
    return folder / name


async def _log(root: Path, key: Path | None, records: int = 4) -> str:
    """A log of ``records`` records, stopped cleanly; its verifier key."""
    log = await AuditLog.open(_config(root, key))
    await fill(log, records)
    vkey = log.verifier_key
    await log.close()
    return vkey


def _snapshot(root: Path) -> dict[str, bytes]:
    """Every file of the folder (the lock file aside), and every folder as empty."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes() if p.is_file() else b"<folder>"
        for p in root.rglob("*")
        if p.name != "LOCK"
    }


def _vkey_of(key: Path, root: Path) -> str:
    return NoteSigner(Layout(root).read_meta().origin, load_signing_key(key)).verifier.vkey


@pytest.mark.parametrize(
    ("before", "after"),
    [("a.pem", "b.pem"), (None, "b.pem"), ("a.pem", None)],
    ids=["supplied-to-another", "generated-to-supplied", "supplied-to-generated"],
)
async def test_a_start_with_another_key_is_refused_and_leaves_the_folder_as_it_was(
    tmp_path: Path, before: str | None, after: str | None
) -> None:
    secrets = tmp_path / "secrets"
    old = _key(secrets, before) if before else None
    new = _key(secrets, after) if after else None
    root = tmp_path / "audit"
    vkey = await _log(root, old)
    kept = _snapshot(root)

    with pytest.raises(AuditError, match=REFUSED) as refused:
        await AuditLog.open(_config(root, new))

    assert _snapshot(root) == kept, "a refused start writes nothing: no key, no verifier key"
    assert (root / "keys" / "checkpoint.vkey").read_text().strip() == vkey
    report = verify_log(root)
    assert report.ok, report.damage
    assert report.key == vkey
    message = str(refused.value)
    assert "A log keeps the key it began with" in message
    assert "start a new log: set audit.dir to a new folder" in message
    assert "--key <the verifier key published for it>" in message


async def test_the_refusal_names_both_keys_as_verify_prints_them(tmp_path: Path) -> None:
    a, b = _key(tmp_path / "s", "a.pem"), _key(tmp_path / "s", "b.pem")
    root = tmp_path / "audit"
    vkey = await _log(root, a)
    with pytest.raises(AuditError, match=REFUSED) as refused:
        await AuditLog.open(_config(root, b))
    message = str(refused.value)
    assert f"verifier key {root / 'keys' / 'checkpoint.vkey'}" in message
    assert f"fingerprint SHA256:{key_fingerprint(vkey)}" in message
    assert f"fingerprint SHA256:{key_fingerprint(_vkey_of(b, root))}, " in message
    assert f"audit.signing_key_file: {b}" in message
    assert "To go on with this log, configure the key that signed it again." in message


async def test_from_a_generated_key_the_way_back_is_to_leave_the_setting_out(
    tmp_path: Path,
) -> None:
    root = tmp_path / "audit"
    vkey = await _log(root, None)
    supplied = _key(tmp_path / "s", "b.pem")
    with pytest.raises(AuditError, match="leave audit.signing_key_file out") as refused:
        await AuditLog.open(_config(root, supplied))
    assert str(root / "keys" / "checkpoint.pem") in str(refused.value)

    log = await AuditLog.open(_config(root, None))  # as the refusal says
    assert log.verifier_key == vkey
    await log.close()
    assert verify_log(root, verifier=NoteVerifier.from_vkey(vkey)).ok


async def test_a_lost_generated_key_is_not_replaced_by_a_new_one(tmp_path: Path) -> None:
    root = tmp_path / "audit"
    await _log(root, None)
    (root / "keys" / "checkpoint.pem").unlink()
    kept = _snapshot(root)
    with pytest.raises(AuditError, match=r"a new one: audit.signing_key_file is not set"):
        await AuditLog.open(_config(root, None))
    assert _snapshot(root) == kept, "no key generated for a log another key signed"


async def test_moving_to_a_new_key_is_a_new_log_folder_and_the_old_one_stays_verifiable(
    tmp_path: Path,
) -> None:
    a, b = _key(tmp_path / "s", "a.pem"), _key(tmp_path / "s", "b.pem")
    old_root, new_root = tmp_path / "audit", tmp_path / "audit-2"
    old_vkey = await _log(old_root, a)
    with pytest.raises(AuditError, match=REFUSED):
        await AuditLog.open(_config(old_root, b))

    new_vkey = await _log(new_root, b)  # audit.dir set to a new folder, as the refusal says
    assert new_vkey == _vkey_of(b, new_root)
    assert verify_log(new_root, verifier=NoteVerifier.from_vkey(new_vkey)).ok
    assert verify_log(old_root, verifier=NoteVerifier.from_vkey(old_vkey)).ok
    assert Layout(old_root).read_meta().origin != Layout(new_root).read_meta().origin


async def test_a_verifier_key_an_older_start_overwrote_is_put_right_with_the_signing_key(
    tmp_path: Path,
) -> None:
    """What a refused start of an older Warden left: the new key's verifier key in the
    folder. `verify --key` with the published key still passes; a start with the key
    that signed the log is accepted and writes that key's verifier key back."""
    a, b = _key(tmp_path / "s", "a.pem"), _key(tmp_path / "s", "b.pem")
    root = tmp_path / "audit"
    vkey = await _log(root, a)
    layout = Layout(root)
    wrong = NoteSigner(layout.read_meta().origin, load_signing_key(b)).verifier
    (root / "keys" / "checkpoint.vkey").write_text(wrong.vkey + "\n")
    (root / "keys" / "checkpoint.pub.pem").write_bytes(wrong.public_pem)
    assert not verify_log(root).ok, "checked with the overwritten key: a false alarm"
    assert verify_log(root, verifier=NoteVerifier.from_vkey(vkey)).ok

    log = await AuditLog.open(_config(root, a))
    await fill(log, 2)
    await log.close()
    assert (root / "keys" / "checkpoint.vkey").read_text() == vkey + "\n"
    assert layout.verifier().vkey == vkey
    assert verify_log(root).ok


async def test_a_new_log_still_gets_its_generated_key_and_verifier_key(tmp_path: Path) -> None:
    root = tmp_path / "audit"
    vkey = await _log(root, None, records=1)
    pem = root / "keys" / "checkpoint.pem"
    assert pem.stat().st_mode & 0o777 == 0o600
    assert _vkey_of(pem, root) == vkey
    assert (root / "keys" / "checkpoint.vkey").read_text() == vkey + "\n"
    assert (root / "keys" / "checkpoint.pub.pem").is_file()


def _warden(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``warden ...`` as its own process (what an operator runs, what a pod runs)."""
    return subprocess.run(
        [sys.executable, "-m", "warden.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _serve_config(folder: Path, **audit: Any) -> Path:
    config = {
        "listen": {"proxy": "127.0.0.1:0", "admin": "127.0.0.1:0"},
        "audit": {"dir": str(folder / "data" / "audit"), **audit},
        "state": {"url": f"sqlite:///{folder}/data/state.db"},
    }
    path = folder / "warden.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


async def test_warden_serve_with_a_changed_key_exits_2_and_verify_still_passes(
    tmp_path: Path,
) -> None:
    """A `helm upgrade` that sets a signing key on a volume whose log generated its own."""
    root = tmp_path / "data" / "audit"
    vkey = await _log(root, None)
    kept = _snapshot(root)
    config = _serve_config(tmp_path, signing_key_file=str(_key(tmp_path / "s", "b.pem")))

    done = _warden("serve", "--config", str(config), "--log-format", "text", cwd=tmp_path)

    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert REFUSED in done.stderr
    assert "leave audit.signing_key_file out" in done.stderr
    assert _snapshot(root) == kept
    for key in ([], ["--key", vkey]):
        verify = _warden("audit", "verify", "--dir", str(root), *key, cwd=tmp_path)
        assert verify.returncode == 0, verify.stdout + verify.stderr
        assert "intact" in verify.stdout
