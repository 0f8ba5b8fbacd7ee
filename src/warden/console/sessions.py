"""Console sign-in sessions: server-side, expiring, each with its own CSRF token.

A session is created when someone signs in with an admin token (or arrives
through a trusted auth proxy). The browser holds only a random session id in
an HttpOnly, SameSite=Strict cookie; the store keeps the SHA-256 of that id,
so the ids are not in memory in a form that would sign anyone in. Sessions
live in memory: a restart signs everyone out, which is the safe direction.
They expire by the monotonic clock, which no one can step: living in one
process's memory, they need no wall-clock time, and a clock stepped back (NTP,
a VM resumed) would otherwise stretch an 8 h session by the step.
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

__all__ = ["MAX_SESSIONS", "MAX_SESSIONS_PER_PERSON", "Session", "SessionStore", "same_token"]

MAX_SESSIONS = 10_000
"""The oldest sessions are dropped beyond this many (a flood of sign-ins cannot grow memory)."""
MAX_SESSIONS_PER_PERSON = 16
"""A person's own oldest sessions are dropped beyond this many, so no one signed in
(a viewer signing in again and again) can push everyone else's sessions out."""


@dataclass(frozen=True, slots=True)
class Session:
    """One signed-in person: who, until when, and the CSRF token their forms carry."""

    principal: Principal
    csrf: str
    expires_at: float
    """On the store's clock (:func:`time.monotonic` unless given): not a wall-clock time."""
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
        self,
        ttl_s: float,
        *,
        clock: Callable[[], float] | None = None,
        limit: int = MAX_SESSIONS,
        per_person: int = MAX_SESSIONS_PER_PERSON,
    ) -> None:
        """``clock``: seconds that only go forward; :func:`time.monotonic` by default."""
        self.ttl_s = ttl_s
        self._clock = clock if clock is not None else time.monotonic
        self._limit = limit
        self._per_person = per_person
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._by_person: dict[str, OrderedDict[str, None]] = {}
        """Each person's session keys, oldest first."""

    def __len__(self) -> int:
        return len(self._sessions)

    def create(self, principal: Principal, via: str = "token") -> tuple[str, Session]:
        """A new session: its id (for the cookie) and the session."""
        self.prune()
        session_id = secrets.token_urlsafe(32)
        session = Session(principal, secrets.token_urlsafe(32), self._clock() + self.ttl_s, via)
        key = _key(session_id)
        self._sessions[key] = session
        mine = self._by_person.setdefault(principal.subject, OrderedDict())
        mine[key] = None
        while len(mine) > self._per_person:
            self._forget(next(iter(mine)))
        while len(self._sessions) > self._limit:
            self._forget(next(iter(self._sessions)))
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
            self._forget(key)
            return None
        return session

    def drop(self, session_id: str | None) -> None:
        """Sign out: forget the session."""
        if session_id and len(session_id) <= 256:
            self._forget(_key(session_id))

    def drop_sso(self, subject: str, keep: Principal | None = None) -> None:
        """Forget the sessions the auth proxy made for ``subject``, but those of ``keep``
        (its roles changed, or the proxy no longer vouches for them)."""
        mine = self._by_person.get(subject)
        for key in list(mine or ()):
            session = self._sessions[key]
            if session.via == "sso" and session.principal != keep:
                self._forget(key)

    def prune(self) -> None:
        """Forget expired sessions."""
        now = self._clock()
        for key in [k for k, s in self._sessions.items() if s.expires_at <= now]:
            self._forget(key)

    def _forget(self, key: str) -> None:
        session = self._sessions.pop(key, None)
        if session is None:
            return
        mine = self._by_person.get(session.principal.subject)
        if mine is not None:
            mine.pop(key, None)
            if not mine:
                del self._by_person[session.principal.subject]
