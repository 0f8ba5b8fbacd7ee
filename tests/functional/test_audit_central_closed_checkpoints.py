"""The central store catches an append after a clean stop made to look like a crash.

Real Wardens on loopback ship their audit log to PostgreSQL (tests/pg.py) and
are driven with the official openai SDK against :class:`MockLLM`. Between two
runs an insider who can write the audit directory, but holds no signing key,
appends a fake approval and hides the `closed` checkpoint (deleted, or
replaced by the periodic one of the same size), so the next start takes the
record on as a crash's. The local directory then verifies; the store, which
holds the checkpoint of the clean stop, does not.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any, cast

import openai
import pytest

from tests.functional.conftest import audit_records, make_config
from tests.functional.test_audit_insider_functional import _forge_approval
from tests.pg import PgServer
from warden.audit.central import export_central
from warden.audit.checkpoint import Checkpoint, NoteVerifier
from warden.audit.export import ExportError
from warden.audit.ship import ship_target
from warden.cli_audit import main as audit_cli
from warden.config import AuditShipConfig, Config
from warden.server import Warden
from warden.testing import Call, MockLLM, Reply

pytestmark = pytest.mark.timeout(120)

MESSAGES: Any = [{"role": "user", "content": "refund please"}]


def _config(tmp_path: Path, llm: MockLLM, pg_server: PgServer, url: str, *, quiet: bool) -> Config:
    ship = {"url": url, "password_file": str(pg_server.password_file), "interval_s": 0.05}
    # Quiet: periodic checkpoints come often, so one at the final size is shipped before
    # the stop signs the closed one at that same size.
    interval = 0.2 if quiet else 3600
    audit = {"dir": str(tmp_path / "audit"), "checkpoint_interval_s": interval, "ship": ship}
    return make_config(tmp_path, llm.url, audit=audit)


async def _refund(warden: Warden, llm: MockLLM) -> None:
    llm.script(Reply(tool_calls=[Call("issue_refund", {"order_id": "A-1", "amount": 50})]))
    async with openai.AsyncOpenAI(
        base_url=f"{warden.proxy_url}/openai/v1", api_key="sk-test", max_retries=0, timeout=30
    ) as oai:
        await oai.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)


def _store_checkpoint(pg_server: PgServer, url: str) -> int:
    with pg_server.admin(url.rsplit("/", 1)[1]) as conn:
        row = conn.execute("SELECT coalesce(max(size), 0) FROM audit_checkpoints").fetchone()
    assert row is not None
    return int(cast("int", row[0]))


async def _quiet_at_its_size(audit_dir: Path, pg_server: PgServer, url: str) -> bytes:
    """Wait until the store holds a periodic checkpoint at the log's size; that note."""
    async with asyncio.timeout(30):
        while True:
            size = len(audit_records(audit_dir))
            if await asyncio.to_thread(_store_checkpoint, pg_server, url) == size:
                return (audit_dir / "checkpoints" / f"{size:020d}").read_bytes()
            await asyncio.sleep(0.05)


async def _verify_url(url: str, pg_server: PgServer, vkey: str, capsys: Any) -> tuple[int, str]:
    capsys.readouterr()
    argv = ["verify", "--url", url, "--password-file", str(pg_server.password_file)]
    code = await asyncio.to_thread(audit_cli, [*argv, "--key", vkey])
    return int(code), capsys.readouterr().out


@pytest.mark.parametrize("quiet", [False, True], ids=["busy", "quiet"])
async def test_an_append_made_to_look_like_a_crash_is_caught_by_the_central_store(
    tmp_path: Path,
    llm: MockLLM,
    pg_server: PgServer,
    pg_url: str,
    capsys: pytest.CaptureFixture[str],
    quiet: bool,
) -> None:
    config = _config(tmp_path, llm, pg_server, pg_url, quiet=quiet)
    audit_dir = tmp_path / "audit"
    async with Warden(config) as warden:
        await _refund(warden, llm)
        if quiet:
            await _quiet_at_its_size(audit_dir, pg_server, pg_url)
    vkey = (audit_dir / "keys" / "checkpoint.vkey").read_text().strip()
    verifier = NoteVerifier.from_vkey(vkey)
    first_stop = len(audit_records(audit_dir))

    # A genuine restart: the store sees the run resume the closed log, no false alarm.
    held = b""
    async with Warden(config) as warden:
        await _refund(warden, llm)
        if quiet:
            held = await _quiet_at_its_size(audit_dir, pg_server, pg_url)
    code, out = await _verify_url(pg_url, pg_server, vkey, capsys)
    assert code == 0, out
    size = len(audit_records(audit_dir))
    closed = Checkpoint.open((audit_dir / "checkpoint").read_bytes(), verifier)
    assert (closed.size, closed.closed) == (size, True)

    # The insider: a fake approval after the clean stop, the closed checkpoint hidden.
    _forge_approval(audit_dir)
    checkpoints = audit_dir / "checkpoints"
    if quiet:
        assert not Checkpoint.open(held, verifier).closed
        (checkpoints / f"{size:020d}").write_bytes(held)
        (audit_dir / "checkpoint").write_bytes(held)
    else:
        (checkpoints / f"{size:020d}").unlink()
        shutil.copy(checkpoints / f"{first_stop:020d}", audit_dir / "checkpoint")
    async with Warden(config) as warden:  # takes the record on as a crash's
        await _refund(warden, llm)
    kinds = [r["kind"] for r in audit_records(audit_dir)]
    assert kinds[size : size + 2] == ["approval_decided", "log_recovered"]

    capsys.readouterr()
    local = await asyncio.to_thread(audit_cli, ["verify", "--dir", str(audit_dir), "--key", vkey])
    assert local == 0, "the directory alone cannot tell: that is what the store is for"

    code, out = await _verify_url(pg_url, pg_server, vkey, capsys)
    assert code == 1, out
    assert f"appended: record {size}" in out, out
    assert "log_recovered" in out
    target = ship_target(AuditShipConfig(url=pg_url, password_file=str(pg_server.password_file)))
    with pytest.raises(ExportError, match=f"appended: record {size}"):
        await export_central(target, tmp_path / "evidence", verifier=verifier)
