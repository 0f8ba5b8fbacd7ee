"""The audit shipper and the central store, against the real PostgreSQL the suite starts.

Records come from a real :class:`AuditLog`; the store is the migrated
database of ``pg_url``; tampering is done as the superuser, the way someone
with database access would.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
from pathlib import Path
from typing import Any, cast

import orjson
import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.pg import APP_PASSWORD, PgServer
from warden.audit.central import CentralError, export_central, index_of, verify_central
from warden.audit.checkpoint import NoteSigner, NoteVerifier
from warden.audit.export import export_log
from warden.audit.log import AuditLog
from warden.audit.segments import LogDamaged
from warden.audit.ship import Batch, Shipper, columns, insert_batch, ship_target
from warden.audit.tail import RecordTail, StoredRecord
from warden.audit.verify import iter_records
from warden.budgets.guard import BudgetGuard
from warden.budgets.prices import PriceTable
from warden.cli_audit import main as audit_cli
from warden.config import AuditConfig, AuditShipConfig, BudgetsConfig
from warden.errors import ConfigError
from warden.model import Action, ActionKind, Agent, Decision, Effect, Mode, RequestMeta, Stage
from warden.pipeline import GuardContext
from warden.state import BudgetRepo
from warden.state.migrate import pg_migrate

_roles = itertools.count(1)


def action(i: int) -> Action:
    return Action(
        action_id=f"act_{i}",
        agent=Agent(id="refunds-bot"),
        kind=ActionKind.TOOL_CALL,
        protocol="openai",
        stage=Stage.PROPOSED,
        request=RequestMeta(method="POST", upstream="openai", path="/v1/chat/completions"),
        tool="issue_refund",
        arguments={"order_id": f"A-{i}", "amount": 10},
    )


def decision(i: int, effect: Effect = Effect.ALLOW) -> Decision:
    return Decision(
        decision_id=f"dec_{i}", effect=effect, reasons=("ok",), mode=Mode.ENFORCE, guard="policy"
    )


async def write(log: AuditLog, start: int, count: int) -> None:
    for i in range(start, start + count):
        await log.record_decision(action(i), decision(i, Effect.DENY if i % 3 else Effect.ALLOW))
    await log.append("killswitch_set", {"agent": "refunds-bot", "reason": "drill"})


def ship_config(pg_server: PgServer, url: str, **over: Any) -> AuditShipConfig:
    base: dict[str, Any] = {
        "url": url,
        "password_file": str(pg_server.password_file),
        "batch": 7,  # several batches even for a small log
        "interval_s": 0.05,
        "max_backoff_s": 0.2,
    }
    return AuditShipConfig.model_validate({**base, **over})


async def ship_all(config: AuditShipConfig, directory: Path, size: int) -> Shipper:
    shipper = Shipper(config, directory)
    shipper.start(lambda: size)
    await shipper.close(timeout_s=30)
    return shipper


def superuser(pg_server: PgServer, url: str) -> psycopg.Connection[tuple[Any, ...]]:
    return pg_server.admin(url.rsplit("/", 1)[1])


@pytest.fixture
async def closed_log(tmp_path: Path) -> Path:
    """An audit directory with 20 records and a final checkpoint, no longer written."""
    directory = tmp_path / "audit"
    log = await AuditLog.open(AuditConfig(dir=str(directory), fsync="never"))
    await write(log, 0, 19)
    await log.close()
    return directory


def stored(pg_server: PgServer, url: str) -> list[tuple[str, int, bytes]]:
    with superuser(pg_server, url) as conn:
        rows = conn.execute("SELECT log_id, idx, line FROM audit_records ORDER BY log_id, idx")
        return [(str(a), int(b), bytes(c)) for a, b, c in rows.fetchall()]


# -- pure parts ------------------------------------------------------------------------------


def test_index_columns_come_from_the_record() -> None:
    doc = {
        "id": "rec_x_01",
        "kind": "decision",
        "time": "2026-11-30T12:00:00.123456Z",
        "agent": {"id": "refunds-bot"},
        "decision": {"id": "dec_1", "effect": "deny"},
    }
    row = index_of(doc)
    assert (row.record_id, row.kind, row.agent, row.decision_id, row.effect) == (
        "rec_x_01",
        "decision",
        "refunds-bot",
        "dec_1",
        "deny",
    )
    assert row.time == dt.datetime(2026, 11, 30, 12, 0, 0, 123456, tzinfo=dt.UTC)
    outcome = index_of({**doc, "kind": "outcome", "decision": None, "decision_id": "dec_1"})
    assert (outcome.decision_id, outcome.effect) == ("dec_1", None)
    other = index_of({"id": "r", "kind": "approval", "time": doc["time"], "body": {"agent": "b"}})
    assert (other.agent, other.decision_id) == ("b", None)


def test_a_record_that_does_not_decode_is_damage_not_a_row() -> None:
    with pytest.raises(LogDamaged, match="record 4"):
        columns([StoredRecord(4, "r", "decision", "t", b'{"id": "r"}')])


def test_the_password_file_is_read_at_once_and_must_not_be_empty(tmp_path: Path) -> None:
    url = "postgresql://w@127.0.0.1:1/db"
    (tmp_path / "pw").write_text("s3cret\n")
    target = ship_target(AuditShipConfig(url=url, password_file=str(tmp_path / "pw")))
    assert target.password == "s3cret"
    assert "s3cret" not in repr(target)
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match=r"audit\.ship\.password_file: .* is empty"):
        ship_target(AuditShipConfig(url=url, password_file=str(tmp_path / "empty")))
    with pytest.raises(ConfigError, match="cannot read"):
        ship_target(AuditShipConfig(url=url, password_file=str(tmp_path / "missing")))


# -- against PostgreSQL ------------------------------------------------------------------------


async def test_shipping_stores_every_record_once_byte_for_byte_and_verifies(
    pg_server: PgServer, pg_url: str, closed_log: Path
) -> None:
    local = list(iter_records(closed_log))
    shipper = await ship_all(ship_config(pg_server, pg_url), closed_log, len(local))
    assert shipper.status().lag_records == 0
    rows = stored(pg_server, pg_url)
    assert [(idx, line) for _, idx, line in rows] == local
    report = await verify_central(ship_target(ship_config(pg_server, pg_url)))
    assert report.ok
    ((log, checked),) = report.logs
    assert (checked.records, checked.latest_checkpoint) == (len(local), len(local))
    assert not checked.warnings  # the final checkpoint was shipped after its records


async def test_shipping_twice_stores_each_record_once(
    pg_server: PgServer, pg_url: str, closed_log: Path
) -> None:
    config = ship_config(pg_server, pg_url)
    size = len(list(iter_records(closed_log)))
    await ship_all(config, closed_log, size)
    before = stored(pg_server, pg_url)
    # A shipper that lost its acknowledgement sends the same rows again.
    tail = RecordTail(closed_log)
    batch = tail.read(size, size)
    log_id = before[0][0]
    target = ship_target(config)
    async with await psycopg.AsyncConnection.connect(
        target.url, password=APP_PASSWORD, autocommit=True
    ) as conn:
        await insert_batch(conn, log_id, Batch(0, len(batch), columns(batch)))
        await insert_batch(conn, log_id, Batch(0, len(batch), columns(batch)))
    await ship_all(config, closed_log, size)  # and a restarted shipper ships nothing new
    assert stored(pg_server, pg_url) == before
    assert len(before) == size


async def test_shipping_continues_where_the_store_stands(
    pg_server: PgServer, pg_url: str, tmp_path: Path
) -> None:
    directory = tmp_path / "audit"
    config = ship_config(pg_server, pg_url)
    log = await AuditLog.open(AuditConfig(dir=str(directory), fsync="never"))
    try:
        await write(log, 0, 9)
        shipper = Shipper(config, directory)
        shipper.start(lambda: log.size)
        await write(log, 9, 30)
        await log.checkpoint()
    finally:
        await log.close()
    await shipper.close(timeout_s=30)
    local = list(iter_records(directory))
    assert [(i, line) for _, i, line in stored(pg_server, pg_url)] == local
    assert (await verify_central(ship_target(config))).ok


async def test_the_audit_tables_refuse_update_delete_and_truncate(
    pg_server: PgServer, pg_url: str, closed_log: Path
) -> None:
    config = ship_config(pg_server, pg_url)
    await ship_all(config, closed_log, len(list(iter_records(closed_log))))
    # The role that owns the tables and ran the migration: the trigger refuses.
    target = ship_target(config)
    async with await psycopg.AsyncConnection.connect(
        target.url, password=APP_PASSWORD, autocommit=True
    ) as conn:
        for statement in (
            "UPDATE audit_records SET effect = 'allow' WHERE idx = 1",
            "DELETE FROM audit_records WHERE idx = 2",
            "TRUNCATE audit_records",
            "DELETE FROM audit_checkpoints",
            "UPDATE audit_logs SET vkey = 'x'",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
                await conn.execute(statement)
    assert (await verify_central(target)).ok


async def test_a_writer_role_with_insert_and_select_only_ships_but_cannot_change_rows(
    pg_server: PgServer, pg_url: str, closed_log: Path, tmp_path: Path
) -> None:
    role = f"audit_writer_{next(_roles)}"
    password = "writer-pw-41c2"
    db = pg_url.rsplit("/", 1)[1]
    # The tables are created by the owner (a migration job); the writer gets the grants
    # docs/audit.md lists.
    owner = ship_config(pg_server, pg_url)
    async with await psycopg.AsyncConnection.connect(
        pg_url, password=APP_PASSWORD, autocommit=True
    ) as conn:
        await pg_migrate(conn)
    with pg_server.admin(db) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
        conn.execute(
            f"GRANT INSERT, SELECT ON audit_logs, audit_records, audit_checkpoints TO {role}"
        )
    (tmp_path / "writer.pw").write_text(password + "\n")
    url = pg_url.replace("warden_app@", f"{role}@")
    writer = AuditShipConfig(
        url=url, password_file=str(tmp_path / "writer.pw"), migrate="off", batch=5
    )
    size = len(list(iter_records(closed_log)))
    shipper = await ship_all(writer, closed_log, size)
    assert shipper.status().shipped == size
    async with await psycopg.AsyncConnection.connect(
        url, password=password, autocommit=True
    ) as conn:
        for statement in (
            "UPDATE audit_records SET effect = 'allow'",
            "DELETE FROM audit_records",
            "TRUNCATE audit_records",
            "ALTER TABLE audit_records DISABLE TRIGGER USER",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                await conn.execute(statement)
    assert (await verify_central(ship_target(owner))).ok


@pytest.mark.parametrize(
    ("tamper", "kind"),
    [
        # The bytes of a record covered by a checkpoint: the chain no longer holds.
        (
            "UPDATE audit_records SET line = convert_to(replace(convert_from(line, 'UTF8'), "
            '\'"effect":"deny"\', \'"effect":"allow"\'), \'UTF8\') WHERE idx = 4',
            "modified",
        ),
        # Only the search column: an auditor's query would be misled.
        ("UPDATE audit_records SET effect = 'allow' WHERE idx = 5 AND effect = 'deny'", "modified"),
        ("DELETE FROM audit_records WHERE idx = 6", "deleted"),
        ("DELETE FROM audit_records WHERE idx >= 15", "truncated"),
    ],
)
async def test_a_row_changed_by_a_superuser_is_found_by_verify(
    pg_server: PgServer, pg_url: str, closed_log: Path, tamper: str, kind: str
) -> None:
    config = ship_config(pg_server, pg_url)
    await ship_all(config, closed_log, len(list(iter_records(closed_log))))
    with superuser(pg_server, pg_url) as conn:
        conn.execute("ALTER TABLE audit_records DISABLE TRIGGER USER")
        changed = conn.execute(tamper.encode())
        assert changed.rowcount >= 1
        conn.execute("ALTER TABLE audit_records ENABLE TRIGGER USER")
    report = await verify_central(ship_target(config))
    assert not report.ok
    ((_, checked),) = report.logs
    assert checked.damage[0].kind == kind, checked.damage[0].describe()


@pytest.mark.parametrize("removed", ["log", "records and checkpoints"])
async def test_a_log_removed_from_the_store_fails_verify_with_its_key(
    pg_server: PgServer,
    pg_url: str,
    closed_log: Path,
    removed: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A superuser who disabled the triggers removes a whole log: the auditor's key names it."""
    config = ship_config(pg_server, pg_url)
    await ship_all(config, closed_log, len(list(iter_records(closed_log))))
    vkey = (closed_log / "keys" / "checkpoint.vkey").read_text().strip()
    key = NoteVerifier.from_vkey(vkey)
    assert (await verify_central(ship_target(config), verifier=key)).ok
    tables = ["audit_records", "audit_checkpoints"] + (["audit_logs"] if removed == "log" else [])
    with superuser(pg_server, pg_url) as conn:
        for table in tables:
            conn.execute(f"ALTER TABLE {table} DISABLE TRIGGER USER")
            conn.execute(f"DELETE FROM {table} WHERE log_id = %s", (key.name,))  # noqa: S608
            conn.execute(f"ALTER TABLE {table} ENABLE TRIGGER USER")
    report = await verify_central(ship_target(config), verifier=key)
    assert not report.ok
    if removed == "log":
        assert report.missing == (key.name,)
    else:
        ((_, checked),) = report.logs
        assert [d.kind for d in checked.damage] == ["checkpoint"]
    assert (await verify_central(ship_target(config))).ok  # no key: nothing names the log
    argv = ["verify", "--url", pg_url, "--password-file", str(pg_server.password_file)]
    code = await asyncio.to_thread(audit_cli, [*argv, "--key", vkey])
    out = capsys.readouterr().out
    assert code == 1, out
    said = f"MISSING {key.name}" if removed == "log" else f"DAMAGED {key.name}: checkpoint"
    assert said in out


async def test_export_from_the_store_matches_an_export_from_the_directory(
    pg_server: PgServer, pg_url: str, closed_log: Path, tmp_path: Path
) -> None:
    config = ship_config(pg_server, pg_url)
    await ship_all(config, closed_log, len(list(iter_records(closed_log))))
    log, result = await export_central(ship_target(config), tmp_path / "out.csv", fmt="csv")
    assert result.records == len(list(iter_records(closed_log)))
    export_log(closed_log, tmp_path / "local.csv", fmt="csv")
    assert (tmp_path / "out.csv").read_bytes() == (tmp_path / "local.csv").read_bytes()
    with pytest.raises(CentralError, match="no log"):
        await export_central(ship_target(config), tmp_path / "x", log_id="nope")
    # A key of another log is refused, never quietly replaced by the stored one.
    stranger = NoteSigner("warden.local/audit/other", Ed25519PrivateKey.generate()).verifier
    with pytest.raises(CentralError, match="export refused"):
        await export_central(ship_target(config), tmp_path / "y", verifier=stranger)
    first = orjson.loads(next(iter_records(closed_log))[1])
    assert first["id"].startswith("rec_" + log.log_id.rsplit("/", 1)[1])


# -- state.on_unavailable: what a decision that needs the state store gets while it is down -----


class _Unreachable:
    """A budget repository whose database does not answer."""

    async def reserve(self, *_: object, **__: object) -> object:
        raise psycopg.OperationalError("connection to server at 127.0.0.1 failed: refused")


def _budget_guard(fallback: dict[str, Effect] | None) -> BudgetGuard:
    cap = {"name": "refunds", "tool": "issue_refund", "value": "amount", "limit": 500}
    return BudgetGuard(
        cast("BudgetRepo", _Unreachable()),
        BudgetsConfig.model_validate({"caps": [cap]}),
        PriceTable.shipped(),
        {"openai": "openai"},
        on_unavailable=fallback,
    )


async def test_a_cap_that_cannot_be_checked_denies_by_default() -> None:
    decision, _ = await _budget_guard(None).admit(
        action(1), GuardContext(Mode.ENFORCE, "read_only")
    )
    assert decision is not None
    assert decision.effect is Effect.DENY
    assert decision.error == "state_unavailable"
    assert "state store is unavailable" in decision.reasons[0]


async def test_fallback_lets_the_risk_class_decide() -> None:
    guard = _budget_guard({"read_only": Effect.ALLOW, "write": Effect.DENY})
    passed, _ = await guard.admit(action(1), GuardContext(Mode.ENFORCE, "read_only"))
    assert passed is None  # on to the policy, uncounted
    denied, _ = await guard.admit(action(2), GuardContext(Mode.ENFORCE, "write"))
    assert denied is not None
    assert denied.effect is Effect.DENY
    assert "state.on_unavailable: fallback" in denied.reasons[0]
