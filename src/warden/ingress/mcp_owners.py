"""Which agent opened each MCP session, so no other agent can use it through Warden.

An MCP server tells its clients apart by ``Mcp-Session-Id`` alone. When
Warden holds the server's key, or agents share one, the server cannot tell
one agent from another, so Warden answers an agent naming another agent's
session as the server answers an unknown one (404).

Owners are kept in the state store (``mcp_session_owners``), so the binding
holds after a restart and across the sidecars of a fleet, with the most
recently used ones remembered here so that only a session's first request in
this process reads the store. A session Warden has no owner for (opened
around Warden, or pruned after ``sessions.ttl_s``) becomes the agent's whose
request naming it the server accepts first: an id the server does not know
writes nothing, so naming random ids fills no table.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Final

from warden.state.sessions import SessionRepo

__all__ = ["SessionOwners"]

MAX_REMEMBERED: Final = 100_000
"""Sessions whose owner this process remembers (least recently used forgotten first)."""

MAX_REMEMBERED_PER_AGENT: Final = 1_000
"""The same per agent: an agent opening sessions without end forgets its own first."""


class SessionOwners:
    """Owners of MCP sessions by (upstream, ``Mcp-Session-Id``); ``repo`` keeps them.

    Without a repository (a door built without state, as in some tests) the
    owners live in this process only.
    """

    def __init__(self, repo: SessionRepo | None) -> None:
        self._repo = repo
        self._owners: OrderedDict[tuple[str, str], str] = OrderedDict()
        self._owned: dict[str, OrderedDict[tuple[str, str], None]] = {}

    async def owner(self, upstream: str, session: str) -> str | None:
        """The agent that owns ``session``; ``None`` when no agent does yet.

        Raises what the state store raises: the caller must then refuse the request.
        """
        key = (upstream, session)
        owner = self._owners.get(key)
        if owner is not None:
            self._owners.move_to_end(key)
            self._owned[owner].move_to_end(key)
            return owner
        if self._repo is None:
            return None
        owner = await self._repo.mcp_session_owner(upstream, session)
        if owner is not None and key not in self._owners:
            self._remember(key, owner)
        return owner

    async def claim(self, upstream: str, session: str, agent_id: str) -> bool:
        """Make ``agent_id`` the owner of ``session`` unless an agent already is (the
        server opened it for this agent, or accepted this agent naming an unowned one);
        whether ``agent_id`` owns it now.

        Raises what the state store raises: the caller must then not relay the id.
        """
        key = (upstream, session)
        owner = self._owners.get(key)
        if owner is None:
            owner = await self._claim(key, agent_id)
        return owner == agent_id

    async def ended(self, upstream: str, session: str) -> None:
        """Forget a session the server ended (its id may be issued again)."""
        self._forget((upstream, session))
        if self._repo is not None:
            await self._repo.release_mcp_session(upstream, session)

    async def _claim(self, key: tuple[str, str], agent_id: str) -> str:
        owner = agent_id
        if self._repo is not None:
            owner = await self._repo.claim_mcp_session(key[0], key[1], agent_id)
        known = self._owners.get(key)  # another request may have claimed it meanwhile
        if known is not None:
            return known
        self._remember(key, owner)
        return owner

    def _remember(self, key: tuple[str, str], owner: str) -> None:
        self._owners[key] = owner
        mine = self._owned.setdefault(owner, OrderedDict())
        mine[key] = None
        if len(mine) > MAX_REMEMBERED_PER_AGENT:
            self._forget(next(iter(mine)))
        if len(self._owners) > MAX_REMEMBERED:
            self._forget(next(iter(self._owners)))

    def _forget(self, key: tuple[str, str]) -> None:
        owner = self._owners.pop(key, None)
        if owner is None:
            return
        mine = self._owned.get(owner)
        if mine is not None:
            mine.pop(key, None)
            if not mine:
                del self._owned[owner]
