"""The decision index: filled from a real audit log, searched, paged, charted, rebuilt.

Every test of the query API runs on both backends: the SQLite file and the
fleet's PostgreSQL (a real server, migrated as ``warden serve`` migrates it).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.pg import PgServer
from warden.audit.index import (
    MAX_PAGE,
    DecisionIndex,
    IndexQuery,
    IndexUnavailable,
    RecordIndex,
    default_index_path,
    row_of,
)
from warden.audit.indexes import open_index
from warden.audit.log import AuditLog
from warden.audit.pg_index import PgDecisionIndex
from warden.config import AuditConfig, Config, StateConfig
from warden.errors import ConfigError
from warden.model import Effect, Mode, Outcome
from warden.state.backend import migrate
from warden.state.postgres import PgTarget
from warden.testing.audit import fill, sample_action, sample_decision


async def write_log(root: Path, count: int) -> int:
    log = await AuditLog.open(AuditConfig(dir=str(root)))
    try:
        await fill(log, count)
        size = log.size
    finally:
        await log.close()
    return size


def pg_state(request: pytest.FixtureRequest) -> StateConfig:
    server: PgServer = request.getfixturevalue("pg_server")
    url = request.getfixturevalue("pg_url")
    return StateConfig(url=url, password_file=str(server.password_file))


@pytest.fixture(params=["sqlite", "postgresql"])
async def index(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[RecordIndex]:
    opened: RecordIndex
    if request.param == "sqlite":
        opened = DecisionIndex(tmp_path / "index.sqlite")
    else:
        state = pg_state(request)
        await migrate(state)
        opened = PgDecisionIndex.open(PgTarget.from_config(state), None)
    yield opened
    opened.close()


async def test_catch_up_indexes_every_record_once_and_in_steps(
    tmp_path: Path, index: RecordIndex
) -> None:
    root = tmp_path / "audit"
    size = await write_log(root, 30)
    assert index.catch_up(root, 10) == 10
    assert index.position == 10
    assert index.catch_up(root, size) == size - 10
    assert index.catch_up(root, size) == 0
    page = index.search(IndexQuery(limit=MAX_PAGE))
    assert len(page.rows) == 15  # fill() writes decisions and outcomes alternately
    assert [r.seq for r in page.rows] == sorted((r.seq for r in page.rows), reverse=True)
    assert {r.effect for r in page.rows} == {"allow", "deny", "require_approval"}
    assert all(r.agent == "support-triage" and r.tool == "issue_refund" for r in page.rows)


async def test_filters_paging_and_text_search(tmp_path: Path, index: RecordIndex) -> None:
    root = tmp_path / "audit"
    size = await write_log(root, 40)
    index.catch_up(root, size)
    denies = index.search(IndexQuery(effect="deny", limit=3))
    assert len(denies.rows) == 3
    assert {r.effect for r in denies.rows} == {"deny"}
    assert denies.next_before == denies.rows[-1].seq
    older = index.search(IndexQuery(effect="deny", limit=3, before=denies.next_before))
    assert older.rows
    assert max(r.seq for r in older.rows) < min(r.seq for r in denies.rows)
    assert index.search(IndexQuery(agent="someone-else")).rows == ()
    one = denies.rows[0]
    assert index.search(IndexQuery(text=one.decision_id)).rows == (one,)
    assert index.search(IndexQuery(text=one.id, kinds=())).rows == (one,)
    assert len(index.search(IndexQuery(text="refund limit", limit=500)).rows) == 20
    # LIKE wildcards in the search text are plain characters.
    assert index.search(IndexQuery(text="%")).rows == ()
    outcomes = index.search(IndexQuery(kinds=("outcome",), limit=50))
    assert len(outcomes.rows) == 20
    assert index.get(one.seq) == one
    assert index.get(10_000) is None
    assert set(index.distinct("effect")) == {"allow", "deny", "require_approval"}
    with pytest.raises(ValueError, match="not a filter column"):
        index.distinct("reason; DROP TABLE records")


async def test_series_and_revisions(tmp_path: Path, index: RecordIndex) -> None:
    root = tmp_path / "audit"
    size = await write_log(root, 12)
    index.catch_up(root, size)
    now = time.time()
    buckets = index.series(IndexQuery(), now - 3600, now + 1, 12)
    assert len(buckets) == 12
    assert sum(b.total for b in buckets) == 6
    assert buckets[-1].total == 6  # all written just now
    assert index.series(IndexQuery(effect="deny"), now - 3600, now + 1, 1)[0].effects == {"deny": 2}
    assert len(index.series(IndexQuery(), now - 3600, now, 10_000)) == 96
    [revision] = index.revisions()
    assert revision.revision == "rev-1"
    assert revision.decisions == 6
    assert revision.denials == 2
    first = index.first_time()
    assert first is not None
    assert now - 3600 < first <= now


async def test_rebuild_and_an_index_of_another_log_is_thrown_away(
    tmp_path: Path, index: RecordIndex
) -> None:
    one, other = tmp_path / "one", tmp_path / "other"
    size = await write_log(one, 6)
    await write_log(other, 4)
    assert index.catch_up(one, size) == 6
    # Pointed at another log (another origin): it starts again rather than mixing logs.
    assert index.catch_up(other, 4) == 4
    assert index.position == 4
    assert index.rebuild(one) == 6
    assert index.position == 6


async def test_errors_and_redacted_arguments_are_indexed_as_recorded(
    tmp_path: Path, index: RecordIndex
) -> None:
    root = tmp_path / "audit"
    log = await AuditLog.open(AuditConfig(dir=str(root)))
    try:
        action = sample_action(1)
        decision = sample_decision(Effect.DENY, reasons=("<b>bold</b>",), mode=Mode.OBSERVE)
        await log.record_decision(action, decision)
        failed = Outcome(status=502, latency_ms=1.0, error="upstream_unavailable")
        await log.record_outcome(action, decision.decision_id, failed)
        size = log.size
    finally:
        await log.close()
    index.catch_up(root, size)
    [row] = index.search(IndexQuery(mode="observe")).rows
    assert row.reason == "<b>bold</b>"
    [outcome] = index.search(IndexQuery(kinds=("outcome",))).rows
    assert outcome.decision_id == decision.decision_id
    assert outcome.error == "upstream_unavailable"


def test_row_of_never_raises_on_odd_records() -> None:
    assert row_of(3, {}).kind == ""
    odd = row_of(4, {"kind": "decision", "decision": "nonsense", "agent": [1]})
    assert odd.effect is None
    assert odd.agent is None
    generic = row_of(
        5, {"kind": "approval_decided", "body": {"agent_id": "bot", "verdict": "rejected"}}
    )
    assert (generic.agent, generic.effect) == ("bot", "rejected")


def test_the_default_index_sits_beside_the_log_not_in_it(tmp_path: Path) -> None:
    assert default_index_path(tmp_path / "audit") == tmp_path / "audit-index.sqlite"


# -- PostgreSQL only: a fleet's sidecars share the tables ------------------------------------


async def test_sidecars_share_the_database_without_mixing_their_logs(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    state = pg_state(request)
    await migrate(state)
    one, other = tmp_path / "one", tmp_path / "other"
    size_one, size_other = await write_log(one, 6), await write_log(other, 10)
    config = Config.model_validate({"state": state.model_dump()})
    first = open_index(config, one)
    second = open_index(config, other)
    try:
        assert isinstance(first, PgDecisionIndex)
        assert "app-pw" not in first.where  # the password is never shown
        assert first.catch_up(one, size_one) == size_one
        assert second.catch_up(other, size_other) == size_other
        assert (first.position, second.position) == (6, 10)
        assert len(first.search(IndexQuery(kinds=())).rows) == 6
        assert len(second.search(IndexQuery(kinds=())).rows) == 10
        # Rebuilding one log leaves the other's rows alone.
        assert first.rebuild(one) == 6
        assert second.position == 10
    finally:
        first.close()
        second.close()


async def test_a_nul_in_a_tool_name_cannot_stall_the_index(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    state = pg_state(request)
    await migrate(state)
    root = tmp_path / "audit"
    log = await AuditLog.open(AuditConfig(dir=str(root)))
    try:
        odd = sample_action(1, tool="evil\x00tool")
        await log.record_decision(odd, sample_decision(Effect.DENY))
        await fill(log, 2)
        size = log.size
    finally:
        await log.close()
    index = PgDecisionIndex.open(PgTarget.from_config(state), root)
    try:
        assert index.catch_up(root, size) == size
        assert "evil\ufffdtool" in index.distinct("tool")
    finally:
        index.close()


async def test_unmigrated_or_unreachable_postgres_is_a_clear_error(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    state = pg_state(request)
    root = tmp_path / "audit"
    size = await write_log(root, 2)
    with pytest.raises(ConfigError, match="warden db migrate"):
        PgDecisionIndex.open(PgTarget.from_config(state), root)
    await migrate(state)
    index = PgDecisionIndex.open(PgTarget.from_config(state), root)
    try:
        assert index.catch_up(root, size) == size
        server: PgServer = request.getfixturevalue("pg_server")
        # The database goes away under the console (here: the test drops it).
        await asyncio.to_thread(server.drop_database, state.url.rsplit("/", 1)[1])
        with pytest.raises(IndexUnavailable):
            index.search(IndexQuery())
        with pytest.raises(IndexUnavailable):
            index.catch_up(root, size)
    finally:
        index.close()
