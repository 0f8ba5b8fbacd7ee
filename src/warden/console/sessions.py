"""Console sign-in sessions: server-side, expiring, each with its own CSRF token.

A session is created when someone signs in with an admin token (or arrives
through a trusted auth proxy). The browser holds only a random session id in
an HttpOnly, SameSite=Strict cookie; the store keeps the SHA-256 of that id,
so the ids are not in memory in a form that would sign anyone in. Sessions
live in memory: a restart signs everyone out, which is the safe direction.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from warden.admin.auth import Principal

__all__ = ["MAX_SESSIONS", "Session", "SessionStore", "same_token"]

MAX_SESSIONS = 10_000
"""The oldest sessions are dropped beyond this many (a flood of sign-ins cannot grow memory)."""


@dataclass(frozen=True, slots=True)
class Session:
    """One signed-in person: who, until when, and the CSRF token their forms carry."""

    principal: Principal
    csrf: str
    expires_at: float
    via: str
    """``token`` or ``sso``."""


def _key(session_id: str) -> str:
    return hashlib.sha256(session_id.encode("utf-8", "surrogatepass")).hexdigest()


def same_token(expected: str, given: str | None) -> bool:
    """Constant-time comparison of a CSRF (or login) token with what the browser sent."""
    if not given:
        return False
    return hmac.compare_digest(expected.encode(), given.encode("utf-8", "surrogatepass"))


class SessionStore:
    """Sessions by id, bounded in number, each expiring ``ttl_s`` after sign-in."""

    def __init__(
        self, ttl_s: float, *, clock: Callable[[], float] = time.time, limit: int = MAX_SESSIONS
    ) -> None:
        self.ttl_s = ttl_s
        self._clock = clock
        self._limit = limit
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def create(self, principal: Principal, via: str = "token") -> tuple[str, Session]:
        """A new session: its id (for the cookie) and the session."""
        self.prune()
        session_id = secrets.token_urlsafe(32)
        session = Session(principal, secrets.token_urlsafe(32), self._clock() + self.ttl_s, via)
        self._sessions[_key(session_id)] = session
        while len(self._sessions) > self._limit:
            self._sessions.popitem(last=False)
        return session_id, session

    def get(self, session_id: str | None) -> Session | None:
        """The live session for a cookie value, or ``None`` (unknown or expired)."""
        if not session_id or len(session_id) > 256:
            return None
        key = _key(session_id)
        session = self._sessions.get(key)
        if session is None:
            return None
        if session.expires_at <= self._clock():
            del self._sessions[key]
            return None
        return session

    def drop(self, session_id: str | None) -> None:
        """Sign out: forget the session."""
        if session_id:
            self._sessions.pop(_key(session_id), None)

    def prune(self) -> None:
        """Forget expired sessions."""
        now = self._clock()
        for key in [k for k, s in self._sessions.items() if s.expires_at <= now]:
            del self._sessions[key]
