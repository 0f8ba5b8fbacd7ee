"""``warden db status|migrate`` against SQLite and a real PostgreSQL, and ``state.migrate``."""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from pathlib import Path

import pytest
import yaml

from tests.pg import APP_PASSWORD, PgServer
from warden import cli
from warden.config import StateConfig, load_config
from warden.errors import ConfigError
from warden.state.backend import open_state
from warden.state.migrate import VERSION_TABLE, migrations


def write_config(tmp_path: Path, state: Mapping[str, object]) -> str:
    path = tmp_path / "warden.yaml"
    path.write_text(yaml.safe_dump({"state": dict(state)}))
    return str(path)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(params=["sqlite", "postgresql"])
def state_section(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, object]:
    if request.param == "sqlite":
        return {"url": f"sqlite:///{tmp_path}/data/state.db"}
    server: PgServer = request.getfixturevalue("pg_server")
    return {"url": request.getfixturevalue("pg_url"), "password_file": str(server.password_file)}


def test_status_then_migrate_then_up_to_date(
    tmp_path: Path, state_section: dict[str, object], capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, state_section)
    backend = "sqlite" if str(state_section["url"]).startswith("sqlite") else "postgresql"
    latest = migrations(backend)[-1].version
    code, out, _ = run(capsys, "db", "status", "--config", config)
    assert code == 0
    assert f"backend:  {backend}" in out
    assert f"version:  0 (this release ships {latest})" in out
    assert "0001_initial" in out
    assert run(capsys, "db", "status", "--check", "--config", config)[0] == 1

    code, out, _ = run(capsys, "db", "migrate", "--config", config)
    assert code == 0
    assert "applied 0001_initial" in out
    code, out, _ = run(capsys, "db", "status", "--check", "--config", config)
    assert code == 0
    assert f"version:  {latest}" in out
    assert "pending:  none" in out
    code, out, _ = run(capsys, "db", "migrate", "--config", config)
    assert (code, out.strip().endswith("up to date")) == (0, True)
    assert APP_PASSWORD not in out


async def test_migrate_off_refuses_to_start_while_migrations_are_pending(
    state_section: dict[str, object],
) -> None:
    off = StateConfig.model_validate({**state_section, "migrate": "off"})
    with pytest.raises(ConfigError, match="warden db migrate"):
        await open_state(off)
    # auto (the default) migrates at start; off then starts too.
    backend = await open_state(StateConfig.model_validate(state_section))
    await backend.close()
    backend = await open_state(off)
    await backend.close()


def test_an_applied_migration_that_changed_is_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, {"url": f"sqlite:///{tmp_path}/state.db"})
    assert run(capsys, "db", "migrate", "--config", config)[0] == 0
    with sqlite3.connect(tmp_path / "state.db") as conn:
        conn.execute(f"UPDATE {VERSION_TABLE} SET checksum = 'x'")  # noqa: S608
    code, _, err = run(capsys, "db", "status", "--config", config)
    assert code == 1
    assert "differ from this release" in err
    assert run(capsys, "db", "migrate", "--config", config)[0] == 1


def test_the_password_can_come_from_the_environment(
    tmp_path: Path,
    pg_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = write_config(tmp_path, {"url": pg_url})
    monkeypatch.setenv("WARDEN_STATE__PASSWORD", APP_PASSWORD)
    assert run(capsys, "db", "migrate", "--config", config)[0] == 0
    monkeypatch.delenv("WARDEN_STATE__PASSWORD")
    monkeypatch.setenv("PGPASSWORD", APP_PASSWORD)  # libpq's own variable
    code, out, _ = run(capsys, "db", "status", "--config", config)
    assert code == 0
    assert "pending:  none" in out
    # `warden config` shows that a password is set, never the password.
    monkeypatch.setenv("WARDEN_STATE__PASSWORD", APP_PASSWORD)
    code, out, _ = run(capsys, "config", "--config", config)
    assert code == 0
    assert APP_PASSWORD not in out


def test_a_wrong_password_is_a_clear_error_that_never_shows_it(
    tmp_path: Path, pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    wrong = "not-the-password-42"
    secret_file = tmp_path / "pw"
    secret_file.write_text(wrong + "\n")
    url = pg_url.replace("warden_app@", f"warden_app:{wrong}@")
    for state in ({"url": pg_url, "password_file": str(secret_file)}, {"url": url}):
        config = write_config(tmp_path, state)
        code, out, err = run(capsys, "db", "status", "--config", config)
        assert code == 2
        assert "cannot connect to postgresql://warden_app" in err
        assert "password authentication failed" in err
        assert wrong not in out + err
    config = write_config(tmp_path, {"url": pg_url, "password_file": str(tmp_path / "missing")})
    code, _, err = run(capsys, "db", "status", "--config", config)
    assert code == 2
    assert "state.password_file: cannot read" in err
    assert load_config(config).state.password is None
