"""Erasure beyond the audit log: a data subject's rows in the state store, and in memory.

The audit log crypto-shreds a subject's personal fields
(:meth:`warden.audit.AuditLog.erase`); the state store keeps some of the same
data in clear for a while, and :class:`StateEraser` (registered with
:meth:`~warden.audit.AuditLog.on_erase`) erases it there too:

* **call links**: deleted, in memory, in the write queue and stored (raw
  arguments, context and claims; :meth:`warden.state.links.CallLinks.erase`);
* **approvals**: display arguments replaced by ``{"erased": true}``, display
  answers (an MCP retry's) dropped, argument hash and binding cleared; one
  still pending, or approved and not used, is rejected first
  (:meth:`warden.approvals.service.Approvals.erase`);
* **Responses chains**: the chain links whose calls name the subject are
  deleted (:meth:`warden.state.sessions.SessionRepo.erase`).

Rows are matched by content, with the configured subject sources
(``audit.subjects.sources``). A call link keeps the whole action; an approval
keeps the keyed references of the subjects its action named by any source
(older approvals, and chain links, keep only arguments, so there only
``action.arguments.<path>`` sources can match).

The running Warden erases through its own stores (the console, and erasures
the CLI leaves for it); :func:`erase_stopped` is the CLI's way when Warden is
not running.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from warden.approvals.gate import approval_settings
from warden.approvals.service import Approvals
from warden.audit.log import AuditLog, Erasure
from warden.audit.subjects import SubjectMatch
from warden.config import Config, StateConfig
from warden.errors import ConfigError
from warden.state.backend import SQLITE, StateBackend, backend_of, open_state
from warden.state.base import sqlite_path
from warden.state.links import CallLinks
from warden.state.sessions import SessionRepo

__all__ = ["StateEraser", "erase_stopped"]

_log = logging.getLogger("warden.erasure")


class StateEraser:
    """Erases a data subject from the state store (and this process's memory of it).

    Called by the audit log with the subjects to erase; returns counts by
    what: ``call_links``, ``approvals``, ``approvals_revoked``,
    ``session_chains``.
    """

    def __init__(
        self, links: CallLinks, approvals: Approvals, sessions: SessionRepo | None
    ) -> None:
        self._links = links
        self._approvals = approvals
        self._sessions = sessions

    async def __call__(self, erased: SubjectMatch) -> dict[str, int]:
        """Erase whatever the state names ``erased``'s subjects by; counts by what.

        Every step is tried, whichever fails: call links failing first left a
        pending approval holding the subject's data, and able to be approved.
        The first failure is raised after the others ran, so the erasure stays
        noted and is done again (each step finds nothing it did already).
        """
        counts: dict[str, int] = {}
        failures: list[Exception] = []
        try:
            counts["call_links"] = await self._links.erase(erased)
        except Exception as exc:
            failures.append(exc)
        try:
            approvals = await self._approvals.erase(erased)
        except Exception as exc:
            failures.append(exc)
        else:
            counts["approvals"] = approvals.erased
            counts["approvals_revoked"] = len(approvals.revoked)
        if self._sessions is not None:
            try:
                counts["session_chains"] = await self._sessions.erase(erased)
            except Exception as exc:
                failures.append(exc)
        if failures:
            raise failures[0]
        return counts


async def erase_stopped(config: Config, subject_id: str) -> Erasure:
    """Erase a data subject while Warden is not running (``warden audit erase``).

    Opens the audit log (:class:`~warden.errors.AuditError` caused by
    :class:`~warden.audit.layout.LogLocked` when a Warden holds it) and the
    state store of ``config``, then erases both and records it. A SQLite
    state file that does not exist holds nothing and is not created. The
    erasure is noted before the key is destroyed (:meth:`AuditLog.erase`):
    killed midway, say while a busy state store keeps it waiting, it is
    finished by the next Warden to hold the log.
    """
    log = await AuditLog.open(config.audit)
    try:
        async with _state(config.state) as state:
            if state is _UNREACHABLE:
                # The key goes now; the note left for the state store is finished
                # by the next Warden to hold the log (or the next erase).
                log.on_erase(_unreachable)
                return await log.erase(subject_id)
            if state is None:
                return await log.erase(subject_id)
            # Not opened: this process holds no approvals, it only erases (and
            # records, and notifies of, the approvals it rejects).
            approvals = Approvals(state.approvals, log, approval_settings(config.approvals))
            try:
                log.on_erase(StateEraser(CallLinks(state.links), approvals, state.sessions))
                return await log.erase(subject_id)
            finally:
                await approvals.close()  # webhook deliveries finish first
    finally:
        await log.close()


_UNREACHABLE: Any = object()


async def _unreachable(_: SubjectMatch) -> dict[str, int]:
    raise ConnectionError("the state store could not be opened")


@contextlib.asynccontextmanager
async def _state(config: StateConfig) -> AsyncIterator[StateBackend | None]:
    if backend_of(config.url) == SQLITE and not sqlite_path(config.url).exists():
        yield None
        return
    try:
        state = await open_state(config)
    except (ConfigError, OSError) as exc:
        _log.warning("erasure: cannot open the state store (%s); erasing the log first", exc)
        yield _UNREACHABLE
        return
    try:
        yield state
    finally:
        await state.close()
