"""A fleet's PostgreSQL under trouble, continued: a data subject's erasure over a full store,
and migrations waiting for one another.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest
import yaml

from tests.pg import SUPERUSER, PgServer
from tests.unit.test_state_erasure import SOURCES, _action
from warden.audit.subjects import SubjectKeys, SubjectMatch
from warden.config import StateConfig
from warden.state.backend import open_state
from warden.state.links import encode_action
from warden.state.postgres import PgDatabase, PgLinkStore, PgTarget, PgTimeouts

# The migration test holds the database-wide migration lock: alone, not beside others.
pytestmark = pytest.mark.serial

MIGRATION_LOCK = 0x7761726465_6E6D67  # warden.state.migrate's key, fixed forever


def admin(pg_server: PgServer, pg_url: str) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(
        host=str(pg_server.base),
        port=pg_server.port,
        user=SUPERUSER,
        dbname=pg_url.rsplit("/", 1)[1],
        autocommit=True,
    )


async def test_an_erasure_over_a_full_call_link_table_is_not_bound_by_the_statement_timeout(
    tmp_path: Path, pg_server: PgServer, pg_url: str
) -> None:
    config = StateConfig(url=pg_url, password_file=str(pg_server.password_file))
    await (await open_state(config)).close()  # the schema
    keys = SubjectKeys.open(tmp_path / "audit")
    ann = SubjectMatch(frozenset({keys.ref("C-ann")}), SOURCES, keys.ref)
    other = encode_action(_action("x", arguments={"note": "n" * 2000}))
    ann_link = encode_action(_action("ann", arguments={"customer_id": "C-ann"}))
    with admin(pg_server, pg_url) as conn:
        conn.execute(
            "INSERT INTO call_links SELECT 'call_' || g, 'dec', %s, %s "
            "FROM generate_series(1, 20000) g",
            (other, time.time()),
        )
        conn.execute(
            "INSERT INTO call_links VALUES ('ann', 'dec', %s, %s)", (ann_link, time.time())
        )
    # A statement timeout that a read of 20,000 links (40 MB) in one statement outlasts,
    # as one of 100,000 outlasts the default 4 s: the erasure then failed every time.
    db = await PgDatabase.open(PgTarget.from_config(config), timeouts=PgTimeouts(statement_s=0.02))
    try:
        assert await PgLinkStore(db).erase(ann) == ["ann"]
    finally:
        await db.close()
    with admin(pg_server, pg_url) as conn:
        assert conn.execute("SELECT count(*) FROM call_links").fetchone() == (20_000,)


def migrate_cli(tmp_path: Path, pg_server: PgServer, pg_url: str, *argv: str) -> tuple[int, str]:
    """``warden db migrate``, run as a deploy job runs it: exit status and stderr."""
    config = tmp_path / "warden.yaml"
    state = {"url": pg_url, "password_file": str(pg_server.password_file)}
    config.write_text(yaml.safe_dump({"state": state}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WARDEN_", "PG"))}
    done = subprocess.run(
        [sys.executable, "-m", "warden.cli", "db", "migrate", *argv, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,  # before: it waited for as long as the other migration lasted
        env=env,
        check=False,
    )
    return done.returncode, done.stderr.strip()


def test_migrate_waits_for_another_migration_no_longer_than_its_lock_timeout(
    tmp_path: Path, pg_server: PgServer, pg_url: str
) -> None:
    with admin(pg_server, pg_url) as other:
        # Another migration in progress (a sidecar stuck mid-migration, another job).
        other.autocommit = False
        other.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        code, err = migrate_cli(tmp_path, pg_server, pg_url, "--lock-timeout", "1")
        assert code == 2
        assert "another migration of this database is in progress" in err
        assert "waited 1 s" in err
        assert "Traceback" not in err
        other.rollback()
    assert migrate_cli(tmp_path, pg_server, pg_url)[0] == 0


async def test_a_sidecar_waiting_for_a_siblings_migration_says_so(
    pg_server: PgServer, pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="warden.state.migrate")
    config = StateConfig(url=pg_url, password_file=str(pg_server.password_file))
    with admin(pg_server, pg_url) as sibling:
        sibling.autocommit = False
        sibling.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        opening = asyncio.ensure_future(open_state(config))
        try:
            said = "waiting for another process to finish migrating"
            async with asyncio.timeout(10):
                while said not in caplog.text:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
            assert not opening.done()  # it waits for the sibling, as it should
        finally:
            sibling.rollback()
        state = await opening
    await state.close()
