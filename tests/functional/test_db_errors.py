"""``warden db`` and ``warden serve`` when PostgreSQL refuses: one line and exit 2, never a
traceback; a role that may only read and write rows starts against a current schema; and a
migration gives up, applying nothing, when another session holds a lock it needs."""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from tests.functional.conftest import make_config
from tests.pg import APP_PASSWORD, APP_USER, PgServer
from warden.config import StateConfig
from warden.errors import ConfigError
from warden.server import Warden
from warden.state.backend import open_state
from warden.state.migrate import VERSION_TABLE
from warden.testing import MockLLM

_roles = itertools.count(1)


def warden_cli(tmp_path: Path, state: dict[str, Any], *argv: str) -> tuple[int, list[str]]:
    """Run the real CLI (``python -m warden.cli``); its exit status and stderr's lines."""
    config = tmp_path / "warden.yaml"
    config.write_text(yaml.safe_dump({"state": state}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WARDEN_", "PG"))}
    done = subprocess.run(
        [sys.executable, "-m", "warden.cli", *argv, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    return done.returncode, done.stderr.strip().splitlines()


def database(url: str) -> str:
    return url.rsplit("/", 1)[1]


@pytest.fixture
def state(pg_server: PgServer, pg_url: str) -> dict[str, Any]:
    """The state section for the database's owner (the app role)."""
    return {"url": pg_url, "password_file": str(pg_server.password_file)}


@pytest.fixture
def rows_only(pg_server: PgServer, pg_url: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """A role that may not create anything in the test database (its state section)."""
    role = f"rows_only_{os.getpid()}_{next(_roles)}"
    with pg_server.admin() as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{APP_PASSWORD}'")
    with pg_server.admin(database(pg_url)) as conn:
        conn.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")  # PostgreSQL 15's default
        conn.execute(f"GRANT USAGE ON SCHEMA public TO {role}")
    url = pg_url.replace(f"{APP_USER}@", f"{role}@")
    try:
        yield role, {"url": url, "password_file": str(pg_server.password_file)}
    finally:
        with pg_server.admin(database(pg_url)) as conn:
            conn.execute(f"DROP OWNED BY {role}")  # its grants
        with pg_server.admin() as conn:
            conn.execute(f"DROP ROLE {role}")


def one_line(err: list[str]) -> str:
    assert len(err) == 1, err  # was a 30-line traceback
    assert err[0].startswith("warden: state.url: ")
    assert "Traceback" not in err[0]
    return err[0]


def test_a_refused_connection_names_its_cause_not_only_libpqs_hint(
    tmp_path: Path, pg_server: PgServer
) -> None:
    with socket.socket() as free:  # a port nothing listens on
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    state = {
        "url": f"postgresql://{APP_USER}@127.0.0.1:{port}/warden",
        "password_file": str(pg_server.password_file),
    }
    code, err = warden_cli(tmp_path, state, "db", "migrate")
    line = one_line(err)
    assert code == 2
    # libpq's cause and its hint are on two lines: the cause was left out.
    assert "Connection refused" in line
    assert "Is the server running" in line


async def test_a_role_that_may_not_create_gets_one_line_and_exit_2(
    tmp_path: Path, rows_only: tuple[str, dict[str, Any]]
) -> None:
    role, state = rows_only
    code, err = warden_cli(tmp_path, state, "db", "migrate")
    line = one_line(err)
    assert code == 2
    assert "permission denied for schema public" in line
    assert f"(role {role})" in line
    assert "nothing was applied" in line
    assert "run `warden db migrate` as a role that may create" in line
    assert APP_PASSWORD not in line
    # Reading the status needs no right to create.
    assert warden_cli(tmp_path, state, "db", "status")[0] == 0
    # `warden serve` (state.migrate: auto) says the same as a configuration error: exit 2.
    with pytest.raises(ConfigError, match="permission denied for schema public"):
        await open_state(StateConfig.model_validate(state))


async def test_a_current_schema_needs_no_right_to_create(
    tmp_path: Path,
    pg_server: PgServer,
    pg_url: str,
    state: dict[str, Any],
    rows_only: tuple[str, dict[str, Any]],
    llm: MockLLM,
) -> None:
    role, limited = rows_only
    assert warden_cli(tmp_path, state, "db", "migrate")[0] == 0  # by the owner
    code, err = warden_cli(tmp_path, limited, "db", "status")
    assert code == 2
    assert f"GRANT SELECT ON {VERSION_TABLE} TO {role}" in one_line(err)

    with pg_server.admin(database(pg_url)) as conn:
        conn.execute(
            f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}"
        )
        conn.execute(f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {role}")
    code, err = warden_cli(tmp_path, limited, "db", "status", "--check")
    assert code == 0, err
    # state.migrate: auto, the default: nothing is pending, so nothing is created.
    async with Warden(make_config(tmp_path, llm.url, state=limited)) as warden:
        assert warden.readiness()[0]


async def test_a_half_applied_schema_is_named_not_a_traceback(
    tmp_path: Path, pg_server: PgServer, pg_url: str, state: dict[str, Any]
) -> None:
    # A hand-run part of 0001: its table exists, and no migration is recorded.
    with pg_server.admin(database(pg_url)) as conn:
        conn.execute(f"SET ROLE {APP_USER}")
        conn.execute("CREATE TABLE budget_counters (counter text PRIMARY KEY)")
    code, err = warden_cli(tmp_path, state, "db", "migrate")
    line = one_line(err)
    assert code == 2
    assert 'applying 0001_initial: relation "budget_counters" already exists' in line
    assert "changed outside `warden db migrate`" in line
    with pytest.raises(ConfigError, match="already exists"):
        await open_state(StateConfig.model_validate(state))


def test_a_migration_gives_up_behind_a_lock_and_applies_nothing(
    tmp_path: Path, pg_server: PgServer, pg_url: str, state: dict[str, Any]
) -> None:
    # Another session holds a lock the migration needs (recording what it applied), as a
    # long transaction that read a table holds one an ALTER of it needs: without a bound
    # the migration waits for as long, and every sidecar's queries on it queue behind it.
    with pg_server.admin(database(pg_url)) as conn:
        conn.execute(f"SET ROLE {APP_USER}")
        conn.execute(
            f"CREATE TABLE {VERSION_TABLE} (version integer PRIMARY KEY, name text NOT NULL, "
            "checksum text NOT NULL, applied_at double precision NOT NULL)"
        )
    with pg_server.admin(database(pg_url)) as holder:
        holder.autocommit = False
        holder.execute(f"LOCK TABLE {VERSION_TABLE} IN SHARE MODE")
        code, err = warden_cli(tmp_path, state, "db", "migrate")
        line = one_line(err)
        assert code == 2
        assert "waited 5 s for a lock another session holds" in line  # the default
        assert "nothing was applied" in line
        code, err = warden_cli(tmp_path, state, "db", "migrate", "--lock-timeout", "0.5")
        assert code == 2
        assert "waited 0.5 s for a lock" in one_line(err)
        holder.rollback()
    # Nothing of 0001 stayed; once the lock is gone, the migration runs.
    with psycopg.connect(pg_url, password=APP_PASSWORD) as conn:
        assert conn.execute("SELECT to_regclass('budget_counters')").fetchone() == (None,)
    assert warden_cli(tmp_path, state, "db", "migrate")[0] == 0
    code, err = warden_cli(tmp_path, state, "db", "migrate", "--lock-timeout", "0")
    assert code == 2
    assert "--lock-timeout" in err[-1]
