"""SQLite files Warden creates (state.db, the decision index): its user's alone, or refused.

They hold approval arguments (unsealed until ``approvals.keep_decided_s``
after the approval ends) and the indexed fields of decisions: 0600, folders
0700, whatever the umask, and an existing file others can read is tightened.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from warden.audit.index import DecisionIndex
from warden.audit.layout import Layout
from warden.config import StateConfig
from warden.errors import ConfigError
from warden.state import Hold
from warden.state.backend import open_state


@pytest.fixture(autouse=True)
def usual_umask() -> Iterator[None]:
    """The usual 022, under which a file is made 0644 unless Warden says otherwise."""
    before = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(before)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_the_state_database_and_its_companions_are_private(tmp_path: Path) -> None:
    db = tmp_path / "data" / "sub" / "state.db"
    state = await open_state(StateConfig(url=f"sqlite:///{db}"))
    try:
        hold = Hold("refunds", "day:2026-11-27", "agent:a", 60, 100)
        assert (await state.budgets.reserve("r1", [hold])).reserved  # a write: the WAL in use
        companions = [db.with_name("state.db-wal"), db.with_name("state.db-shm")]
        assert all(p.exists() for p in companions)
        assert [mode(p) for p in (db, *companions)] == [0o600, 0o600, 0o600]
        assert mode(tmp_path / "data") == 0o700
        assert mode(tmp_path / "data" / "sub") == 0o700
    finally:
        await state.close()


async def test_a_readable_state_database_is_tightened_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o755)
    db = shared / "state.db"
    state = await open_state(StateConfig(url=f"sqlite:///{db}"))
    await state.close()
    db.chmod(0o644)
    wal = db.with_name("state.db-wal")
    wal.write_bytes(b"")
    wal.chmod(0o640)
    with caplog.at_level(logging.WARNING, logger="warden.state"):
        state = await open_state(StateConfig(url=f"sqlite:///{db}"))
    try:
        assert mode(db) == 0o600
        assert mode(wal) == 0o600
    finally:
        await state.close()  # the last connection removes the -wal file
    assert f"{db} was readable by others; set to 0600" in caplog.text
    assert f"{wal} was readable by others; set to 0600" in caplog.text
    assert mode(shared) == 0o755  # a folder Warden did not make is left as it is


def test_the_decision_index_is_private(tmp_path: Path) -> None:
    path = tmp_path / "indexes" / "audit-index.sqlite"
    index = DecisionIndex(path)
    try:
        assert mode(path) == 0o600
        assert mode(path.parent) == 0o700
    finally:
        index.close()


def test_a_readable_decision_index_is_tightened(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "audit-index.sqlite"
    DecisionIndex(path).close()
    path.chmod(0o604)
    with caplog.at_level(logging.WARNING, logger="warden.state"):
        DecisionIndex(path).close()
    assert mode(path) == 0o600
    assert "was readable by others; set to 0600" in caplog.text


async def test_a_folder_where_the_file_goes_names_the_setting(tmp_path: Path) -> None:
    (tmp_path / "state.db").mkdir()
    with pytest.raises(ConfigError, match=r"^state\.url: .*state\.db is not a file"):
        await open_state(StateConfig(url=f"sqlite:///{tmp_path}/state.db"))
    with pytest.raises(ConfigError, match=r"^the decision index: .* is not a file"):
        DecisionIndex(tmp_path / "state.db")


async def test_a_file_in_the_way_of_the_folder_names_the_setting(tmp_path: Path) -> None:
    (tmp_path / "blocker").write_text("a file where a folder should be\n")
    with pytest.raises(ConfigError, match=r"^state\.url: cannot create .*blocker"):
        await open_state(StateConfig(url=f"sqlite:///{tmp_path}/blocker/state.db"))


def test_an_index_that_is_not_sqlite_says_it_can_be_rebuilt(tmp_path: Path) -> None:
    path = tmp_path / "audit-index.sqlite"
    path.write_bytes(b"not a database, only text " * 200)
    with pytest.raises(ConfigError, match="cannot be used: file is not a database") as caught:
        DecisionIndex(path)
    assert "built again" in str(caught.value)


def test_folders_the_audit_log_makes_above_its_own_are_private(tmp_path: Path) -> None:
    # ./warden-data holds state.db beside the log; whichever makes it first.
    root = tmp_path / "data" / "nested" / "audit"
    Layout(root).init()
    assert mode(tmp_path / "data") == 0o700
    assert mode(tmp_path / "data" / "nested") == 0o700
    assert mode(root) == 0o750
