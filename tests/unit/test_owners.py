"""IdOwners, sans store: what it remembers, and when an owner's use writes its row again."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from warden import owners
from warden.owners import IdOwners
from warden.state.sessions import SessionRepo


class _Repo:
    """Keeps owners in a dict and counts the writes."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], str] = {}
        self.claims = 0

    async def claim_id(self, scope: str, owned_id: str, agent_id: str) -> str:
        self.claims += 1
        return self.rows.setdefault((scope, owned_id), agent_id)

    async def id_owner(self, scope: str, owned_id: str) -> str | None:
        return self.rows.get((scope, owned_id))


def _owners(repo: _Repo, ttl_s: float) -> IdOwners:
    return IdOwners(cast(SessionRepo, repo), "mcp", ttl_s=ttl_s)


async def test_an_owners_use_writes_its_row_again_well_within_the_ttl() -> None:
    repo = _Repo()
    ids = _owners(repo, ttl_s=0.2)  # rows go after 0.2 s unused: written again each 0.05 s
    assert await ids.claim("srv", "s-1", "bot")
    ids.used("srv", "s-1", "bot")  # just claimed: nothing to write
    await asyncio.sleep(0)
    assert repo.claims == 1
    await asyncio.sleep(0.06)
    ids.used("srv", "s-1", "bot")
    ids.used("srv", "s-1", "bot")  # once per interval
    await asyncio.sleep(0.01)
    assert repo.claims == 2
    assert repo.rows == {("mcp:srv", "s-1"): "bot"}


async def test_what_it_remembers_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(owners, "MAX_REMEMBERED", 3)
    repo = _Repo()
    ids = _owners(repo, ttl_s=3600)
    for n in range(10):
        assert await ids.claim("srv", f"s-{n}", f"agent-{n}")
    remembered: Any = ids
    assert len(remembered._owners) <= 3
    assert len(remembered._refreshed) <= 3
    # Forgotten here, still owned in the store.
    assert await ids.owner("srv", "s-0") == "agent-0"
    assert not await ids.claim("srv", "s-0", "agent-x")
