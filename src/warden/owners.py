"""Which agent owns an id an upstream gave out, so no other agent can use it through Warden.

An MCP server tells its clients apart by ``Mcp-Session-Id`` alone, and an
OpenAI Responses conversation (``conversation``) is named by its id. When
Warden holds the upstream's key, or agents share one, the upstream cannot
tell one agent from another, so Warden keeps each such id to the agent that
owns it.

Owners are kept in the state store (``id_owners``, by a scope per kind and
server), so the binding holds after a restart and across the sidecars of a
fleet, with the most recently used ones remembered here so that only an
id's first use in this process reads the store. An owner's use keeps its row
from expiring; an id with no owner (given out around Warden, or unused for
``sessions.ttl_s``) is claimed by its first user: for MCP once the server
accepted a request naming it, so naming random ids fills no table.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import Final

from warden import tasks
from warden.state.sessions import SessionRepo

__all__ = ["IdOwners"]

log = logging.getLogger("warden.owners")

REFRESH_S: Final = 3600.0
"""How often, at most, an owner's use keeps its row from expiring (more often when rows go
sooner than four times this after their last use: ``sessions.ttl_s``)."""

MAX_REMEMBERED: Final = 100_000
"""Ids whose owner this process remembers (least recently used forgotten first)."""

MAX_REMEMBERED_PER_AGENT: Final = 25_000
"""The same per agent: an agent claiming ids without end forgets its own first."""


class IdOwners:
    """Owners of one kind of id (``mcp`` sessions, Responses ``conversation``s and
    ``answer``s) by (where, id); ``repo`` keeps them, in scope ``<kind>:<where>``.
    ``where`` names the server that gave the id out (an MCP server's URL), so two
    upstream entries for one server share its owners; ``""`` for ids unique at the
    provider.

    Without a repository (a door built without state, as in some tests) the
    owners live in this process only.
    """

    def __init__(self, repo: SessionRepo | None, kind: str, *, ttl_s: float) -> None:
        """``ttl_s``: how long the store keeps an owner row unused (``sessions.ttl_s``);
        an owner's use writes it again well within that."""
        self._repo = repo
        self._kind = kind
        self._refresh_s = min(REFRESH_S, ttl_s / 4)
        self._owners: OrderedDict[tuple[str, str], str] = OrderedDict()
        self._refreshed: dict[tuple[str, str], float] = {}
        self._owned: dict[str, OrderedDict[tuple[str, str], None]] = {}

    async def owner(self, where: str, owned: str) -> str | None:
        """The agent that owns ``owned``; ``None`` when no agent does yet.

        Raises what the state store raises: the caller must then refuse the request.
        """
        key = (where, owned)
        owner = self._owners.get(key)
        if owner is not None:
            self._owners.move_to_end(key)
            self._owned[owner].move_to_end(key)
            return owner
        if self._repo is None:
            return None
        owner = await self._repo.id_owner(self._scope(where), owned)
        if owner is not None and key not in self._owners:
            self._remember(key, owner)
        return owner

    async def claim(self, where: str, owned: str, agent_id: str) -> bool:
        """Make ``agent_id`` the owner of ``owned`` unless an agent already is (an MCP
        server opened it for this agent, or accepted this agent naming an unowned one);
        whether ``agent_id`` owns it now.

        Raises what the state store raises: the caller must then not let it be used.
        """
        key = (where, owned)
        owner = self._owners.get(key)
        if owner is None and self._repo is not None:
            # Most claims find their row (an id used before, in another process): a read
            # answers those, and only an id new to the store is written.
            owner = await self._repo.id_owner(self._scope(where), owned)
            if owner is not None:
                self._remember(key, owner)
        if owner is None:
            owner = await self._claim(key, agent_id)
        return owner == agent_id

    async def ended(self, where: str, owned: str) -> None:
        """Forget an id the upstream ended (an MCP session: its id may be issued again)."""
        self._forget((where, owned))
        if self._repo is not None:
            await self._repo.release_id(self._scope(where), owned)

    async def _claim(self, key: tuple[str, str], agent_id: str) -> str:
        owner = agent_id
        if self._repo is not None:
            owner = await self._repo.claim_id(self._scope(key[0]), key[1], agent_id)
        known = self._owners.get(key)  # another request may have claimed it meanwhile
        if known is not None:
            return known
        self._remember(key, owner)
        self._note_refreshed(key, time.monotonic())
        return owner

    def _note_refreshed(self, key: tuple[str, str], when: float) -> None:
        self._refreshed.pop(key, None)  # to the end: the oldest go first
        self._refreshed[key] = when
        while len(self._refreshed) > MAX_REMEMBERED:
            del self._refreshed[next(iter(self._refreshed))]

    def used(self, where: str, owned: str, agent_id: str) -> None:
        """``agent_id``, the owner, used ``owned``: its row is kept from expiring (written
        again, in the background, at most once per :data:`REFRESH_S` per process)."""
        key = (where, owned)
        now = time.monotonic()
        last = self._refreshed.get(key)
        if self._repo is None or (last is not None and now - last < self._refresh_s):
            return
        self._note_refreshed(key, now)
        tasks.spawn(self._refresh(key, agent_id), name=f"{self._kind}-owner-refresh")

    async def _refresh(self, key: tuple[str, str], agent_id: str) -> None:
        assert self._repo is not None
        try:
            await self._repo.claim_id(self._scope(key[0]), key[1], agent_id)
        except Exception as exc:  # tried again on a later use
            self._refreshed.pop(key, None)
            log.warning("could not keep an owner from expiring: %s", type(exc).__name__)

    def _scope(self, where: str) -> str:
        return f"{self._kind}:{where}"

    def _remember(self, key: tuple[str, str], owner: str) -> None:
        self._owners[key] = owner
        mine = self._owned.setdefault(owner, OrderedDict())
        mine[key] = None
        if len(mine) > MAX_REMEMBERED_PER_AGENT:
            self._forget(next(iter(mine)))
        if len(self._owners) > MAX_REMEMBERED:
            self._forget(next(iter(self._owners)))

    def _forget(self, key: tuple[str, str]) -> None:
        self._refreshed.pop(key, None)
        owner = self._owners.pop(key, None)
        if owner is None:
            return
        mine = self._owned.get(owner)
        if mine is not None:
            mine.pop(key, None)
            if not mine:
                del self._owned[owner]
