"""`warden audit verify|export|proof|erase`, run as a user runs them."""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.unit.test_audit_export import remanifest
from warden.audit import AuditLog
from warden.audit.checkpoint import NoteSigner
from warden.audit.export import BODY_IS_CHECKPOINT, PEM_FROM_KEY
from warden.audit.merkle import verify_inclusion
from warden.audit.subjects import SubjectKeys
from warden.audit.verify import iter_records, key_fingerprint, verify_log
from warden.cli_audit import main, register
from warden.config import AuditConfig
from warden.model import Obligations
from warden.testing.audit import fill, read_segments, sample_action, sample_decision


def _subprocess(*args: str) -> subprocess.CompletedProcess[str]:
    """The CLI as its own process: ``python -m warden.cli_audit ...``."""
    return subprocess.run(
        [sys.executable, "-m", "warden.cli_audit", *args],
        capture_output=True,
        text=True,
        check=False,
    )


Cli = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Cli:
    """The CLI in this process (much faster than a new interpreter per call)."""

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        code = main(list(args))
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(list(args), code, out, err)

    return run


async def _log(root: Path, records: int = 12, **kw: float) -> None:
    log = await AuditLog.open(AuditConfig(dir=str(root), checkpoint_interval_s=3600, **kw))
    await fill(log, records)
    await log.record_decision(sample_action(customer="cus_ann"), sample_decision())
    await log.close()


def test_verify_reports_intact_and_damaged_logs(tmp_path: Path, cli: Cli) -> None:
    root = tmp_path / "audit"
    asyncio.run(_log(root))
    done = _subprocess("audit", "verify", "--dir", str(root))
    assert done.returncode == 0, done.stderr
    assert "intact: 13 records" in done.stdout
    as_json = orjson.loads(cli("verify", "--dir", str(root), "--json").stdout)
    assert as_json["ok"] is True
    assert as_json["records"] == 13

    seg = read_segments(root)[0]
    del seg.records[4]
    seg.write()
    done = cli("verify", "--dir", str(root))
    assert done.returncode == 1
    assert done.stdout.startswith("DAMAGED deleted: record 4")


def test_verify_against_a_checkpoint_kept_elsewhere(tmp_path: Path, cli: Cli) -> None:
    root = tmp_path / "audit"
    asyncio.run(_log(root))
    kept = tmp_path / "kept"
    kept.write_bytes((root / "checkpoint").read_bytes())
    seg = read_segments(root)[-1]
    seg.records = seg.records[:-2]
    seg.write()
    for path in (root / "checkpoints").iterdir():
        path.unlink()
    (root / "checkpoint").unlink()
    assert cli("verify", "--dir", str(root)).returncode == 0
    done = cli("verify", "--dir", str(root), "--checkpoint", str(kept))
    assert done.returncode == 1
    assert done.stdout.startswith("DAMAGED truncated: record 11")


def test_verify_with_config_keys_and_pinned_verifier(tmp_path: Path, cli: Cli) -> None:
    root = tmp_path / "audit"
    asyncio.run(_log(root))
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WARDEN_AUDIT__DIR", str(root))
        assert cli("verify").returncode == 0
    vkey = (root / "keys" / "checkpoint.vkey").read_text().strip()
    assert cli("verify", "--dir", str(root), "--key", vkey).returncode == 0
    other = vkey[:-8] + ("A" if vkey[-8] != "A" else "B") + vkey[-7:]
    done = cli("verify", "--dir", str(root), "--key", other)
    assert done.returncode == 2
    assert "unusable verifier key" in done.stderr
    stranger = NoteSigner(vkey.split("+")[0], Ed25519PrivateKey.generate()).verifier.vkey
    done = cli("verify", "--dir", str(root), "--key", stranger)
    assert done.returncode == 1
    assert done.stdout.startswith("DAMAGED checkpoint")
    done = cli("verify", "--dir", str(tmp_path / "nowhere"))
    assert done.returncode == 2
    assert "holds no Warden audit log" in done.stderr


def test_export_and_proof(tmp_path: Path, cli: Cli) -> None:
    root = tmp_path / "audit"
    asyncio.run(_log(root))
    vkey = (root / "keys" / "checkpoint.vkey").read_text().strip()

    def export(out: Path, *period: str) -> tuple[str, subprocess.CompletedProcess[str]]:
        done = cli("export", "--dir", str(root), "--from", "2000-01-01", *period, "--out", str(out))
        assert done.returncode == 0, done.stderr
        assert "exported 13 records" in done.stdout
        check = subprocess.run(
            [sys.executable, "-I", str(out / "verify_evidence.py"), "--key", vkey],
            capture_output=True,
            text=True,
            check=False,
        )
        return done.stdout, check

    said, check = export(tmp_path / "evidence")
    assert check.returncode == 0, check.stdout
    assert "the checkpoint was signed at" in check.stdout
    assert "before the end of the period" not in said
    # A period not over when the checkpoint was signed: declared, and proven, up to it.
    said, early = export(tmp_path / "early", "--to", "2999-12-31")
    assert "before the end of the period asked for" in said
    assert early.returncode == 0, early.stdout
    declared = orjson.loads((tmp_path / "early" / "selection.json").read_bytes())["to"]
    assert declared < "2999"
    assert f"to {declared}" in early.stdout
    for fmt in ("csv", "ocsf"):
        target = tmp_path / f"audit.{fmt}"
        assert (
            cli("export", "--dir", str(root), "--format", fmt, "--out", str(target)).returncode == 0
        )
        assert len(target.read_text().splitlines()) == 13 + (fmt == "csv")
    done = cli("export", "--dir", str(root), "--from", "yesterday", "--out", str(tmp_path / "x"))
    assert done.returncode == 1
    assert "is not a date" in done.stderr

    proof = orjson.loads(cli("proof", "--dir", str(root), "--record", "7").stdout)
    assert verify_inclusion(
        base64.b64decode(proof["leaf_hash"]),
        7,
        proof["tree_size"],
        [base64.b64decode(p) for p in proof["proof"]],
        base64.b64decode(proof["root"]),
    )
    assert proof["checkpoint"].split("\n")[1] == "13"
    by_id = orjson.loads(cli("proof", "--dir", str(root), "--record", proof["record_id"]).stdout)
    assert by_id == proof
    assert cli("proof", "--dir", str(root), "--record", "999").returncode == 1


def test_erase_offline_records_the_erasure(tmp_path: Path, cli: Cli) -> None:
    root = tmp_path / "audit"
    asyncio.run(_log(root))
    done = cli("erase", "--dir", str(root), "--subject", "cus_ann")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("erased")
    records = [orjson.loads(p) for _, p in iter_records(root)]
    assert records[-1]["kind"] == "erasure"
    keys = SubjectKeys.open(root, create=False)
    assert keys.unseal(records[-2]) is None
    assert verify_log(root).ok
    assert "nothing to erase" in cli("erase", "--dir", str(root), "--subject", "cus_ann").stdout


async def test_erase_while_warden_runs(tmp_path: Path) -> None:
    root = tmp_path / "audit"
    log = await AuditLog.open(AuditConfig(dir=str(root), checkpoint_interval_s=0.1))
    try:
        await log.record_decision(sample_action(customer="cus_ann"), sample_decision())
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "warden.cli_audit",
            "erase",
            "--dir",
            str(root),
            "--subject",
            "cus_ann",
            stdout=asyncio.subprocess.PIPE,
        )
        stdout, _ = await proc.communicate()
        assert proc.returncode == 0
        assert b"Warden is running" in stdout
        for _ in range(50):
            kinds = [orjson.loads(p)["kind"] for _, p in iter_records(root)]
            if "erasure" in kinds:
                break
            await asyncio.sleep(0.05)
        assert kinds[-1] == "erasure", "the running log did not record the erasure"
        # A returning customer gets a fresh key; the erased records stay unreadable.
        await log.record_decision(sample_action(customer="cus_ann"), sample_decision())
        records = [orjson.loads(p) for _, p in iter_records(root)]
        keys = SubjectKeys.open(root, create=False)
        assert keys.unseal(records[0]) is None
        assert keys.unseal(records[-1]) is not None
    finally:
        await log.close()
    assert verify_log(root).ok


def test_register_plugs_into_a_main_parser(tmp_path: Path) -> None:
    asyncio.run(_log(tmp_path / "audit", records=3))
    parser = argparse.ArgumentParser(prog="warden")
    parser.add_argument("--config")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["audit", "verify", "--dir", str(tmp_path / "audit")])
    assert args.func(args) == 0
    assert main(["verify", "--dir", str(tmp_path / "audit")]) == 0
    with pytest.raises(SystemExit):
        main(["audit", "frobnicate"])


def test_digest_checks_claimed_arguments_against_a_record(tmp_path: Path, cli: Cli) -> None:
    root = tmp_path / "audit"

    async def redacted() -> None:
        log = await AuditLog.open(AuditConfig(dir=str(root), checkpoint_interval_s=3600))
        hidden = dataclasses.replace(
            sample_decision(), obligations=Obligations(redact=("action.arguments",))
        )
        await log.record_decision(sample_action(arguments={"pin": "4071"}), hidden)
        # A 64-bit id RFC 8785 cannot write: the record keeps the prefixed fallback.
        big = sample_action(arguments={"order_id": 2**62 + 1})
        await log.record_decision(big, hidden)
        await log.close()

    asyncio.run(redacted())
    [record, other] = [orjson.loads(p) for _, p in iter_records(root)]
    kept = record["action"]["arguments_sha256"]
    right = cli("digest", "--dir", str(root), "--arguments", '{"pin": "4071"}')
    wrong = cli("digest", "--dir", str(root), "--arguments", '{"pin": "4072"}')
    assert right.returncode == 0, right.stderr
    assert (right.stdout.strip() == kept, wrong.stdout.strip() == kept) == (True, False)
    claimed = cli("digest", "--dir", str(root), "--arguments", f'{{"order_id": {2**62 + 1}}}')
    assert claimed.returncode == 0, claimed.stderr
    assert claimed.stdout.strip() == other["action"]["arguments_sha256"]
    bad = cli("digest", "--dir", str(root), "--arguments", "[1]")
    assert bad.returncode == 2
    assert "must be a JSON object" in bad.stderr


def _resign(root: Path) -> NoteSigner:
    """What whoever can write the directory does: a key of their own in keys/, every
    checkpoint signed again with it under the log's name."""
    origin = orjson.loads((root / "log.json").read_bytes())["origin"]
    signer = NoteSigner(origin, Ed25519PrivateKey.generate())
    for path in [*(root / "checkpoints").iterdir(), root / "checkpoint"]:
        text = path.read_text().rpartition("\n\n")[0] + "\n"
        path.write_text(signer.sign(text))
    (root / "keys" / "checkpoint.vkey").write_text(signer.verifier.vkey + "\n")
    return signer


def test_verify_names_the_key_it_trusted_and_where_it_came_from(tmp_path: Path, cli: Cli) -> None:
    root = tmp_path / "audit"
    asyncio.run(_log(root))
    vkey = (root / "keys" / "checkpoint.vkey").read_text().strip()
    pinned = cli("verify", "--dir", str(root), "--key", vkey)
    assert pinned.returncode == 0, pinned.stdout
    fingerprint = key_fingerprint(vkey)
    name = vkey.partition("+")[0]
    assert f"checked with the key {name}, fingerprint SHA256:{fingerprint} (--key)" in (
        pinned.stdout
    )
    assert "warning: checked with" not in pinned.stdout
    forged = _resign(root)
    done = cli("verify", "--dir", str(root))
    assert done.returncode == 0  # the directory's own key: damage only, and it says so
    assert f"SHA256:{key_fingerprint(forged.verifier.vkey)}" in done.stdout
    assert "in the directory itself" in done.stdout
    as_json = orjson.loads(cli("verify", "--dir", str(root), "--json").stdout)
    assert as_json["key"]["source"] == "directory"
    assert as_json["key"]["vkey"] == forged.verifier.vkey
    assert cli("verify", "--dir", str(root), "--key", vkey).returncode == 1


def test_verify_with_a_key_is_not_intact_when_the_key_signed_nothing_there(
    tmp_path: Path, cli: Cli
) -> None:
    root, other = tmp_path / "audit", tmp_path / "other"
    asyncio.run(_log(root))
    asyncio.run(_log(other))
    vkey = (root / "keys" / "checkpoint.vkey").read_text().strip()
    for path in [*(root / "checkpoints").iterdir(), root / "checkpoint"]:
        path.unlink()
    assert cli("verify", "--dir", str(root)).returncode == 0  # no checkpoint yet: a warning
    done = cli("verify", "--dir", str(root), "--key", vkey)
    assert done.returncode == 1
    assert "intact" not in done.stdout
    assert "DAMAGED checkpoint: no checkpoint here is signed by the key given" in done.stdout
    # Another log's directory, its checkpoints gone, offered as this log.
    for path in [*(other / "checkpoints").iterdir(), other / "checkpoint"]:
        path.unlink()
    done = cli("verify", "--dir", str(other), "--key", vkey)
    assert done.returncode == 1
    assert "DAMAGED checkpoint: log.json says this is log" in done.stdout


def test_verify_evidence_runs_this_installations_verifier(tmp_path: Path, cli: Cli) -> None:
    """Whoever makes a package can replace the verify_evidence.py inside it."""
    root = tmp_path / "audit"
    asyncio.run(_log(root))
    vkey = (root / "keys" / "checkpoint.vkey").read_text().strip()
    out = tmp_path / "evidence"
    done = cli("export", "--dir", str(root), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert f"warden audit verify-evidence {out}" in done.stdout
    assert f"{out}/verify_evidence.py" not in done.stdout
    assert "python3 verify_evidence.py" not in (out / "VERIFY.md").read_text()
    checked = cli("verify-evidence", str(out), "--key", vkey)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "OK: 13 records" in checked.stdout
    assert "not the package's own verify_evidence.py" in checked.stdout
    (tmp_path / "key.vkey").write_text(vkey + "\n")
    assert cli("verify-evidence", str(out), "--key", str(tmp_path / "key.vkey")).returncode == 0
    # The forger's package: its own "verifier" that says OK, records that prove nothing.
    (out / "verify_evidence.py").write_text('print("OK: 9999 records included")\n')
    (out / "records.jsonl").write_bytes(b'{"seq":0,"kind":"whatever"}\n')
    remanifest(out)
    forged = cli("verify-evidence", str(out), "--key", vkey)
    assert forged.returncode == 1
    assert "FAILED" in forged.stdout
    assert "9999" not in forged.stdout
    assert cli("verify-evidence", str(out), "--key", "nonsense").returncode == 2
    unreadable = cli("verify-evidence", str(tmp_path / "nowhere"), "--key", vkey)
    assert unreadable.returncode == 2
    assert "cannot be read" in unreadable.stderr


def test_a_key_is_never_read_from_a_file_the_package_or_log_holds(
    tmp_path: Path, cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A key's text is also a relative path: checked from inside the package, a file
    planted there would give the forger's key in place of the one typed."""
    root = tmp_path / "audit"
    asyncio.run(_log(root))
    vkey = (root / "keys" / "checkpoint.vkey").read_text().strip()
    out = tmp_path / "evidence"
    assert cli("export", "--dir", str(root), "--out", str(out)).returncode == 0
    forger = tmp_path / "forger"
    asyncio.run(_log(forger))  # another log's key: what the forger signs with
    theirs = (forger / "keys" / "checkpoint.vkey").read_text().strip()
    for where in (out, root):
        planted = where / vkey
        planted.parent.mkdir(parents=True)
        planted.write_text(theirs + "\n")
    monkeypatch.chdir(root)
    assert cli("verify", "--dir", ".", "--key", vkey).returncode == 0  # the key typed
    monkeypatch.chdir(out)
    checked = cli("verify-evidence", ".", "--key", vkey)
    assert f"fingerprint SHA256:{key_fingerprint(vkey)}" in checked.stdout  # the key typed
    assert checked.returncode == 1  # and the planted directory is no part of a package
    # A key file inside what is checked is its maker's, whatever it holds.
    inside = cli("verify-evidence", ".", "--key", "log-key.vkey")
    assert inside.returncode == 2
    assert "a file inside" in inside.stderr
    (root / "mine.vkey").write_text(vkey + "\n")
    assert cli("verify", "--dir", str(root), "--key", str(root / "mine.vkey")).returncode == 2


def test_a_package_holding_other_than_plain_files_is_refused_before_reading(
    tmp_path: Path, cli: Cli
) -> None:
    """A FIFO hung the check; an extra file went unnamed in what is and is not proven."""
    root = tmp_path / "audit"
    asyncio.run(_log(root))
    vkey = (root / "keys" / "checkpoint.vkey").read_text().strip()
    out = tmp_path / "evidence"
    assert cli("export", "--dir", str(root), "--out", str(out)).returncode == 0
    (out / "APPROVALS.md").write_text("every refund was approved by the CFO\n")
    remanifest(out)
    extra = cli("verify-evidence", str(out), "--key", vkey)
    assert extra.returncode == 0, extra.stdout
    not_proven = next(line for line in extra.stdout.splitlines() if "not proven" in line)
    assert "APPROVALS.md (not part of an evidence package)" in not_proven
    proven = next(line for line in extra.stdout.splitlines() if line.startswith("proven"))
    assert "edges.json" not in proven or (out / "edges.json").exists()
    (out / "records.jsonl").unlink()
    os.mkfifo(out / "records.jsonl")
    fifo = cli("verify-evidence", str(out), "--key", vkey)  # returns: nothing reads the FIFO
    assert fifo.returncode == 1
    assert "records.jsonl: not a regular file" in fifo.stdout


def test_the_by_hand_commands_in_the_docs_are_the_ones_packages_give() -> None:
    """docs/audit.md gives the by-hand steps too: the package's VERIFY.md is its maker's."""
    docs = (Path(__file__).parents[2] / "docs" / "audit.md").read_text()
    assert PEM_FROM_KEY in docs
    assert BODY_IS_CHECKPOINT in docs


def test_a_checkpoint_or_record_named_with_another_digit_crashes_nothing(
    tmp_path: Path, cli: Cli
) -> None:
    root = tmp_path / "audit"
    asyncio.run(_log(root))
    (root / "checkpoints" / "\u00b3").write_text("not a checkpoint")
    assert cli("verify", "--dir", str(root)).returncode == 0
    assert cli("export", "--dir", str(root), "--out", str(tmp_path / "e")).returncode == 0
    assert cli("proof", "--dir", str(root), "--record", "3").returncode == 0
    done = cli("proof", "--dir", str(root), "--record", "\u00b3")
    assert done.returncode == 1
    assert "neither a record id nor a sequence number" in done.stderr
