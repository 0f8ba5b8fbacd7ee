"""An insider who can write the audit directory, and a CLI erasure killed midway.

Real Wardens on loopback driven with the official openai SDK against
:class:`MockLLM`; ``warden audit`` commands as an operator runs them (the
erasure in a process of its own, killed with SIGKILL).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import sqlite3
import sys
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest

from tests.functional.conftest import audit_records, make_config
from warden.audit.checkpoint import generate_signing_key
from warden.audit.merkle import leaf_hash
from warden.audit.segments import frame
from warden.audit.subjects import SubjectKeys
from warden.cli_audit import main as audit_main
from warden.config import Config
from warden.errors import AuditError
from warden.server import Warden
from warden.testing import Call, MockLLM, Reply
from warden.testing.audit import read_segments

pytestmark = pytest.mark.timeout(120)

POLICY = """package warden

import rego.v1

default decision := {"effect": "allow"}

decision := {"effect": "require_approval", "reason": "an email change needs a person"} if {
    input.action.tool == "update_email"
}
"""
ANN = "C-ann"
EMAIL = "ann.erase@example.com"


def _config(tmp_path: Path, llm: MockLLM, **audit: Any) -> Config:
    policy = tmp_path / "policy"
    policy.mkdir(exist_ok=True)
    (policy / "policy.rego").write_text(POLICY)
    return make_config(
        tmp_path,
        llm.url,
        policy={"bundles": [str(policy)]},
        audit={"dir": str(tmp_path / "audit"), **audit},
    )


async def _email_change(warden: Warden, llm: MockLLM) -> None:
    """Ann's email change: held for approval, which keeps the address in the state store."""
    async with openai.AsyncOpenAI(
        base_url=f"{warden.proxy_url}/openai/v1",
        api_key="sk-test",
        max_retries=0,
        timeout=30,
        default_headers={"X-Warden-Context-Customer-Id": ANN},
    ) as oai:
        llm.script(Reply(tool_calls=[Call("update_email", {"customer_id": ANN, "email": EMAIL})]))
        await oai.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "new email"}]
        )


def _forge_approval(audit_dir: Path) -> None:
    """What the insider appends: a correctly chained "the CFO approved" record."""
    last = read_segments(audit_dir)[-1]
    prev = orjson.loads(last.records[-1])
    seq = prev["seq"] + 1
    forged = {
        "v": 1,
        "id": f"{prev['id'][:-10]}{seq:010x}",
        "seq": seq,
        "time": prev["time"],
        "prev": leaf_hash(last.records[-1]).hex(),
        "kind": "approval_decided",
        "subject": None,
        "sealed": None,
        "body": {
            "approval_id": "apr_forged",
            "who": "cfo@example.com",
            "verdict": "approved",
            "tool": "issue_refund",
            "comment": "approved 50,000 USD",
        },
    }
    data = last.path.read_bytes().rstrip(b"\0")
    last.path.write_bytes(data + frame(orjson.dumps(forged, option=orjson.OPT_SORT_KEYS)))


async def _audit(*argv: str) -> int:
    return int(await asyncio.to_thread(audit_main, list(argv)))


async def test_warden_will_not_sign_records_added_after_it_stopped(
    tmp_path: Path, llm: MockLLM, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = tmp_path / "secret"
    secret.mkdir()
    generate_signing_key(secret / "key.pem")  # the insider cannot read it
    config = _config(tmp_path, llm, signing_key_file=str(secret / "key.pem"))
    audit_dir = tmp_path / "audit"
    async with Warden(config) as warden:
        await _email_change(warden, llm)
    vkey = (audit_dir / "keys" / "checkpoint.vkey").read_text().strip()
    outside = tmp_path / "checkpoint-kept-elsewhere"
    shutil.copy(audit_dir / "checkpoint", outside)
    size = len(audit_records(audit_dir))
    _forge_approval(audit_dir)

    with pytest.raises(AuditError, match=f"closed cleanly at {size} records") as refused:
        async with Warden(config):
            pass
    assert len(audit_records(audit_dir)) == size + 1, "the record is left for the investigation"
    assert (audit_dir / "checkpoint").read_bytes() == outside.read_bytes(), "nothing signed"

    capsys.readouterr()
    code = await _audit(
        "verify", "--dir", str(audit_dir), "--key", vkey, "--checkpoint", str(outside)
    )
    out = capsys.readouterr().out
    assert code == 1, out
    assert f"appended: record {size}" in out
    assert "added after the fact" in out

    # The operator sets the record aside as the refusal says, and Warden starts again.
    cut = re.search(r"truncate -s (\d+) (\S+)`", str(refused.value))
    assert cut is not None, refused.value
    os.truncate(cut.group(2), int(cut.group(1)))
    async with Warden(config) as warden:
        await _email_change(warden, llm)
    kinds = [r["kind"] for r in audit_records(audit_dir)]
    assert "log_recovered" not in kinds
    assert b"apr_forged" not in orjson.dumps(audit_records(audit_dir))
    code = await _audit(
        "verify", "--dir", str(audit_dir), "--key", vkey, "--checkpoint", str(outside)
    )
    assert code == 0, capsys.readouterr().out


async def test_a_checkpoint_file_that_does_not_verify_cannot_get_an_append_signed(
    tmp_path: Path, llm: MockLLM, capsys: pytest.CaptureFixture[str]
) -> None:
    """The insider appends after a clean stop and drops a file named after the size that
    includes the record: Warden judges the log by the newest checkpoint that verifies
    and refuses to start; verify names the file."""
    config = _config(tmp_path, llm)
    audit_dir = tmp_path / "audit"
    async with Warden(config) as warden:
        await _email_change(warden, llm)
    vkey = (audit_dir / "keys" / "checkpoint.vkey").read_text().strip()
    closed = (audit_dir / "checkpoint").read_bytes()
    size = len(audit_records(audit_dir))
    _forge_approval(audit_dir)
    bogus = audit_dir / "checkpoints" / f"{size + 1:020d}"
    bogus.write_text("anything\n")

    with pytest.raises(AuditError, match=f"checkpoint file {bogus.name} .*does not verify"):
        async with Warden(config):
            pass
    assert len(audit_records(audit_dir)) == size + 1, "the record is left for the investigation"
    assert (audit_dir / "checkpoint").read_bytes() == closed, "nothing signed"

    capsys.readouterr()
    code = await _audit("verify", "--dir", str(audit_dir), "--key", vkey)
    out = capsys.readouterr().out
    assert code == 1, out
    assert f"checkpoints/{bogus.name} does not verify with the key" in out
    assert f"appended: record {size}" in out


# `warden audit erase` with a state store slow to answer (a busy database): the eraser
# waits before it touches the store, long enough to be killed there.
_SLOW_ERASE = """
import asyncio, sys
import warden.erasure as erasure
real = erasure.StateEraser.__call__
async def slow(self, erased):
    await asyncio.sleep(60)
    return await real(self, erased)
erasure.StateEraser.__call__ = slow
from warden.cli_audit import main
sys.exit(main(["audit", "erase", "--subject", sys.argv[1], "--config", sys.argv[2]]))
"""


def _approvals_holding(db: Path, text: str) -> int:
    with sqlite3.connect(db) as conn:
        return sum(text in repr(row) for row in conn.execute("SELECT * FROM approvals"))


async def test_a_cli_erasure_killed_midway_is_finished_by_the_next_warden(
    tmp_path: Path, llm: MockLLM
) -> None:
    config = _config(tmp_path, llm)
    audit_dir, db = tmp_path / "audit", tmp_path / "state.db"
    async with Warden(config) as warden:
        await _email_change(warden, llm)
    assert _approvals_holding(db, EMAIL) == 1
    conf = tmp_path / "warden.yaml"
    state = {"url": f"sqlite:///{db}"}
    conf.write_bytes(orjson.dumps({"audit": {"dir": str(audit_dir)}, "state": state}))
    keys = SubjectKeys.open(audit_dir, create=False)
    ref = keys.ref(ANN)
    assert keys.load(ref) is not None

    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _SLOW_ERASE,
        ANN,
        str(conf),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        for _ in range(600):
            if keys.load(ref) is None:
                break
            await asyncio.sleep(0.05)
        assert keys.load(ref) is None, "the CLI destroyed the key"
        await asyncio.sleep(0.3)  # now waiting on the state store
    finally:
        child.send_signal(signal.SIGKILL)
        await child.wait()
    assert keys.noted_erasures() == {ref: True}, "killed midway, the erasure is still noted"
    assert _approvals_holding(db, EMAIL) == 1

    async with Warden(_config(tmp_path, llm, checkpoint_interval_s=0.1)):
        for _ in range(200):
            if not keys.noted_erasures():
                break
            await asyncio.sleep(0.05)
    assert keys.noted_erasures() == {}
    assert _approvals_holding(db, EMAIL) == 0
    (erasure,) = [r["body"] for r in audit_records(audit_dir) if r["kind"] == "erasure"]
    assert erasure["subject"] == ref
    assert erasure["key_destroyed"] is True
    assert erasure["state"]["approvals"] == 1


async def test_the_cli_notes_an_erasure_before_it_destroys_the_key_of_a_running_warden(
    tmp_path: Path, llm: MockLLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The running Warden's path: killed at the key (here: the key cannot be destroyed),
    the note is already there for the running Warden to finish."""
    config = _config(tmp_path, llm)
    audit_dir = tmp_path / "audit"
    async with Warden(config) as warden:
        await _email_change(warden, llm)
        conf = tmp_path / "warden.yaml"
        conf.write_bytes(orjson.dumps({"audit": {"dir": str(audit_dir)}}))

        def killed(self: SubjectKeys, ref: str) -> bool:
            raise OSError("killed here")

        monkeypatch.setattr(SubjectKeys, "erase", killed)
        code = await _audit("erase", "--config", str(conf), "--subject", ANN)
        monkeypatch.undo()
        assert code == 1
        keys = SubjectKeys.open(audit_dir, create=False)
        assert keys.noted_erasures() == {keys.ref(ANN): True}
