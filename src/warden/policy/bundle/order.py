"""Signed bundles only move forward: an older signed bundle is refused (rollback protection).

A signature proves who made a bundle, not that it is the newest: whoever can
write the watched folder or serve ``bundle_url`` could put back an older
signed bundle (one with a limit since tightened, a rule since fixed). Each
signature made by ``warden policy sign`` carries its signing time (JWT
``iat``); the state store keeps, per bundle name, the newest signing time
Warden activated (:class:`SignedMark`), shared by every sidecar of a fleet
and kept across restarts. :class:`SignedOrder` runs before each activation:

* a bundle signed before its name's mark is refused (``BundleError``), the
  active revision keeps deciding, and nothing is recorded as activated;
* a signature without a time (``opa sign``) is accepted only while its name
  has no mark: once a timed bundle was activated, an untimed one could be
  anything older;
* otherwise the mark moves up to the bundle's time, before the activation
  record is written, so no revision decides without having raised it.

``policy.signing.allow_older`` turns the refusal off (a deliberate rollback
without re-signing); re-signing the older files is the usual way back.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from warden.policy.bundle.model import Bundle, BundleError

__all__ = ["MarkRepo", "SignedMark", "SignedOrder", "check_order"]


@dataclass(frozen=True, slots=True)
class SignedMark:
    """The newest signing time activated for one bundle name, and the revision it came with."""

    bundle: str
    signed_at: int
    revision: str
    activated_at: float


class MarkRepo(Protocol):
    """Where the marks are kept: the state store (SQLite or PostgreSQL)."""

    async def signed_marks(self, bundles: Sequence[str]) -> dict[str, SignedMark]:
        """The marks of these bundle names (names without one are absent)."""
        ...

    async def raise_signed_marks(self, marks: Sequence[SignedMark]) -> None:
        """Store each mark unless its name's stored time is newer already."""
        ...


def _when(seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def check_order(bundle: Bundle, marks: Mapping[str, SignedMark]) -> None:
    """Raise :class:`BundleError` if any signed part of ``bundle`` is older than its mark."""
    for name, signed_at in sorted((bundle.signed_at or {}).items()):
        mark = marks.get(name)
        if mark is None:
            continue
        newest = f"{_when(mark.signed_at)} (revision {mark.revision})"
        if signed_at is None:
            raise BundleError(
                f"{name}: the signature carries no signing time (iat), and a bundle of this "
                f"name signed at {newest} was activated; sign it with `warden policy sign` "
                "(policy.signing.allow_older accepts it anyway)"
            )
        if signed_at < mark.signed_at:
            raise BundleError(
                f"{name}: signed at {_when(signed_at)}, before the newest bundle of this name "
                f"Warden activated, signed at {newest}; an older signed bundle is refused "
                "(re-sign it to roll back on purpose, or set policy.signing.allow_older)"
            )


class SignedOrder:
    """A ``pre_activate`` hook: refuse older signed bundles, raise the marks, then ``then``."""

    def __init__(
        self,
        repo: MarkRepo,
        *,
        allow_older: bool = False,
        then: Callable[[Bundle], Awaitable[None]] | None = None,
    ) -> None:
        self.repo = repo
        self.allow_older = allow_older
        self.then = then

    async def __call__(self, bundle: Bundle) -> None:
        """Check ``bundle`` against the stored marks and raise them; raising refuses it."""
        times = bundle.signed_at or {}
        if times:
            names = sorted(times)
            if not self.allow_older:
                check_order(bundle, await self.repo.signed_marks(names))
            now = time.time()
            await self.repo.raise_signed_marks(
                [
                    SignedMark(name, at, bundle.revision, now)
                    for name, at in sorted(times.items())
                    if at is not None
                ]
            )
            if not self.allow_older:
                # Read again: another sidecar may have raised a mark past this
                # bundle between the check and the raise (which then kept it).
                check_order(bundle, await self.repo.signed_marks(names))
        if self.then is not None:
            await self.then(bundle)
