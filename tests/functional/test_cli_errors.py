"""The ``warden`` command's failures, as a user meets them: one line, no traceback.

Start-up failures name the setting and exit 2; a closed pipe (``| head``) ends
the command quietly; hints it prints run as printed.
"""

from __future__ import annotations

import asyncio
import logging
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from warden import cli
from warden.audit import AuditLog
from warden.config import AuditConfig, load_config
from warden.testing.audit import fill


def warden(*args: str, cwd: Path, **kw: Any) -> subprocess.CompletedProcess[str]:
    """``warden ...`` as its own process (what a user runs)."""
    return subprocess.run(
        [sys.executable, "-m", "warden.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        **kw,
    )


def write_config(folder: Path, **sections: Any) -> Path:
    base: dict[str, Any] = {
        "listen": {"proxy": "127.0.0.1:0", "admin": "127.0.0.1:0"},
        "audit": {"dir": str(folder / "data" / "audit")},
        "state": {"url": f"sqlite:///{folder}/data/state.db"},
    }
    for name, section in sections.items():
        base[name] = {**base.get(name, {}), **section}
    path = folder / "warden.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


async def make_log(root: Path, records: int = 40) -> None:
    log = await AuditLog.open(AuditConfig(dir=str(root), checkpoint_interval_s=3600))
    await fill(log, records)
    await log.close()


def refused(done: subprocess.CompletedProcess[str], message: str) -> None:
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert f"warden: {message}" in done.stderr


def test_a_missing_signing_key_names_the_setting(tmp_path: Path) -> None:
    config = write_config(tmp_path, audit={"signing_key_file": "./nope.pem"})
    done = warden("serve", "--config", str(config), "--log-format", "text", cwd=tmp_path)
    refused(done, "audit.signing_key_file: ./nope.pem is not a file")
    (tmp_path / "bad.pem").write_text("not a key\n")
    config = write_config(tmp_path, audit={"signing_key_file": "bad.pem"})
    done = warden("serve", "--config", str(config), "--log-format", "text", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert "audit.signing_key_file: bad.pem is not an unencrypted Ed25519 private key" in (
        done.stderr
    )


def test_folders_that_cannot_be_made_name_the_setting(tmp_path: Path) -> None:
    (tmp_path / "blocker").write_text("a file where a folder should be\n")
    config = write_config(tmp_path, audit={"dir": "blocker/audit"})
    done = warden("serve", "--config", str(config), "--log-format", "text", cwd=tmp_path)
    refused(done, "audit.dir: cannot create blocker/audit: blocker is a file, not a folder")
    config = write_config(tmp_path, state={"url": "sqlite:///blocker/state.db"})
    done = warden("serve", "--config", str(config), "--log-format", "text", cwd=tmp_path)
    refused(done, "state.url: cannot create the SQLite database's folder: blocker is a file")


def test_a_second_warden_on_the_same_audit_log_is_one_line(tmp_path: Path) -> None:
    config = write_config(tmp_path)

    async def hold_the_log() -> subprocess.CompletedProcess[str]:
        log = await AuditLog.open(AuditConfig(dir=str(tmp_path / "data" / "audit")))
        try:
            return await asyncio.to_thread(
                warden, "serve", "--config", str(config), "--log-format", "text", cwd=tmp_path
            )
        finally:
            await log.close()

    done = asyncio.run(hold_the_log())
    refused(done, "cannot open the audit log in")
    assert "another process is writing the audit log" in done.stderr


def test_an_os_error_of_any_command_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "taken").write_text("a file\n")
    assert cli.main(["init", str(tmp_path / "taken")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"warden: {tmp_path / 'taken'}: file exists"


def into_a_closed_pipe(cwd: Path, *args: str) -> tuple[int, str]:
    """``warden ...`` whose reader is gone before anything is written (``| head -0``)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "warden.cli", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    proc.stdout.close()
    with proc.stderr:
        err = proc.stderr.read()
    return proc.wait(timeout=120), err


def test_a_closed_pipe_ends_the_command_quietly(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    assert into_a_closed_pipe(tmp_path, "config", "--config", str(config)) == (1, "")
    root = tmp_path / "data" / "audit"
    asyncio.run(make_log(root))
    verify = ("audit", "verify", "--dir", str(root), "--json")
    assert into_a_closed_pipe(tmp_path, *verify) == (1, "")
    assert into_a_closed_pipe(tmp_path, "monitor", "report", "--audit", str(root)) == (1, "")


def test_the_export_hint_is_a_command_that_works(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "audit"
    asyncio.run(make_log(root, 5))
    out = tmp_path / "evidence package"
    assert cli.main(["audit", "export", "--dir", str(root), "--out", str(out)]) == 0
    said = capsys.readouterr().out
    hint = re.search(r"auditors check it with their own Warden: (.*?) \(or ", said)
    assert hint is not None
    # Never a key from the package or the log's folder: whoever could rewrite the log
    # could have put theirs there; the one published when the log began. Nor the
    # package's own verify_evidence.py, which whoever made the package could replace.
    vkey = (root / "keys" / "checkpoint.vkey").read_text().strip()
    assert vkey not in said
    assert "not the package's log-key.vkey" in said
    command = shlex.split(hint.group(1).replace("<the verifier key>", vkey))
    assert command[:3] == ["warden", "audit", "verify-evidence"]
    assert cli.main(command[1:]) == 0, capsys.readouterr()


def test_db_status_names_a_sqlite_database_by_its_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path)
    assert cli.main(["db", "status", "--config", str(config)]) == 0
    assert f"database: {tmp_path}/data/state.db\n" in capsys.readouterr().out
    assert cli.main(["db", "migrate", "--config", str(config)]) == 0
    assert capsys.readouterr().out.startswith(f"{tmp_path}/data/state.db: applied ")


def test_serve_warns_when_nobody_can_decide_approvals(caplog: pytest.LogCaptureFixture) -> None:
    approver = {"subject": "dana", "roles": ["approver"], "sha256": "0" * 64}
    viewer = {"subject": "grafana", "roles": ["viewer"], "sha256": "1" * 64}
    sso = {"trusted_proxies": ["127.0.0.1"], "roles": {"leads": ["approver"]}}
    cases: list[tuple[dict[str, Any], bool]] = [
        ({}, True),
        ({"admin": {"tokens": [viewer]}}, True),
        ({"admin": {"tokens": [approver]}}, False),
        ({"admin": {"tokens": [approver]}, "approvals": {"required_approvals": 2}}, True),
        ({"console": {"sso": sso}}, False),
        ({"console": {"sso": sso, "enabled": False}}, True),
    ]
    for overrides, warned in cases:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="warden.cli"):
            cli._warn_if_nobody_decides(load_config(environ={}, overrides=overrides))
        assert ("nobody can decide" in caplog.text) is warned, overrides


def one_line(capsys: pytest.CaptureFixture[str], start: str) -> str:
    """What the command printed to stderr: a single line starting with ``start``."""
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(start), err
    return err


@pytest.mark.parametrize(
    ("content", "said"),
    [
        (b"mode: observe\n\xff\xfe\n", "not UTF-8 text"),
        (b"x: " + b"[" * 20_000 + b"]" * 20_000 + b"\n", "nest too deeply"),
        (b"limits: {max_connections: " + b"9" * 5000 + b"}\n", "more than 4300 digits"),
        (b'state: {url: "postgresql://ops:S3CRETPW@[::1/db"}\n', "state.url: Value error"),
        (b"policy: {bundle_url: /local/file}\n", "policy.bundle_url: Value error"),
    ],
)
def test_a_config_file_that_cannot_be_read_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes, said: str
) -> None:
    path = tmp_path / "warden.yaml"
    path.write_bytes(content)
    code = cli.main(["config", "--config", str(path)])
    err = capsys.readouterr().err
    assert code == 2
    assert said in err
    assert "S3CRETPW" not in err
    assert "Traceback" not in err


def test_audit_verify_on_a_damaged_identity_or_key_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "audit"
    asyncio.run(make_log(root, 5))
    meta = (root / "log.json").read_bytes()
    (root / "log.json").write_text("[]")
    assert cli.main(["audit", "verify", "--dir", str(root)]) == 2
    one_line(capsys, f"error: {root}/log.json is unusable: log.json is not a log's identity")
    (root / "log.json").write_bytes(meta)
    (root / "keys" / "checkpoint.vkey").write_bytes(b"\xff\xfe\x00")
    assert cli.main(["audit", "verify", "--dir", str(root)]) == 2
    one_line(capsys, "error: unusable verifier key: ")


def test_audit_reindex_into_something_not_an_index_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "audit"
    asyncio.run(make_log(root, 5))
    junk = tmp_path / "junk.sqlite"
    junk.write_text("not a database, only text " * 200)
    assert cli.main(["audit", "reindex", "--dir", str(root), "--index", str(junk)]) == 2
    one_line(capsys, f"error: the decision index {junk} cannot be used: file is not a database")
    assert cli.main(["audit", "reindex", "--dir", str(root), "--index", str(tmp_path)]) == 2
    one_line(capsys, f"error: the decision index: {tmp_path} is not a file")


def test_db_commands_on_a_folder_or_junk_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "data" / "state.db").mkdir(parents=True)
    config = write_config(tmp_path)
    assert cli.main(["db", "status", "--config", str(config)]) == 2
    one_line(capsys, f"warden: state.url: {tmp_path}/data/state.db is a folder")
    assert cli.main(["db", "migrate", "--config", str(config)]) == 2
    one_line(capsys, f"warden: state.url: {tmp_path}/data/state.db is not a file")
    (tmp_path / "data" / "state.db").rmdir()
    (tmp_path / "data" / "state.db").write_text("not a database, only text " * 200)
    assert cli.main(["db", "status", "--config", str(config)]) == 2
    one_line(capsys, "warden: state.url: cannot use ")


def test_a_password_file_that_is_not_utf8_is_one_line_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The decoder's own message quotes a byte of the password: the error names the file."""
    secret = tmp_path / "pw"
    secret.write_bytes(b"\xe9S3CRET\n")  # Latin-1, as an editor may save it
    url = "postgresql://warden@127.0.0.1:1/warden"
    config = write_config(tmp_path, state={"url": url, "password_file": str(secret)})
    assert cli.main(["db", "status", "--config", str(config)]) == 2
    said = one_line(capsys, f"warden: state.password_file: {secret} is not UTF-8 text")
    export = ["audit", "export", "--url", url, "--out", str(tmp_path / "x")]
    assert cli.main([*export, "--password-file", str(secret)]) == 2
    said += capsys.readouterr().err
    assert f"--password-file: {secret} is not UTF-8 text" in said
    shipping = write_config(tmp_path, audit={"ship": {"url": url, "password_file": str(secret)}})
    done = warden("serve", "--config", str(shipping), "--log-format", "text", cwd=tmp_path)
    refused(done, f"audit.ship.password_file: {secret} is not UTF-8 text")
    for text in (said, done.stderr):
        assert "0xe9" not in text
        assert "S3CRET" not in text
        assert "codec" not in text
