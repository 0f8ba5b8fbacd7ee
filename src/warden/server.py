"""Assembles a running Warden: audit log, policy engine, pipeline, listeners.

``Warden`` is used the same way by ``warden serve``, the demo, the tests and
the benchmarks::

    async with Warden(load_config("warden.yaml")) as warden:
        print(warden.proxy_url)      # point OPENAI_BASE_URL at f"{...}/openai/v1"
        await warden.wait_stopped()  # until stop() or a signal
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, Self

import aiohttp
from aiohttp import web

from warden import tasks
from warden.admin.approval_routes import add_approval_routes
from warden.admin.auth import AUTH, TokenAuth
from warden.admin.killswitch_routes import add_killswitch_routes
from warden.approvals.gate import ApprovalGate, approval_settings
from warden.approvals.service import Approvals
from warden.audit import AuditLog
from warden.budgets.guard import BudgetGuard
from warden.budgets.prices import PriceTable
from warden.config import Config
from warden.core import Governor
from warden.ingress.base import FrontDoor
from warden.ingress.http import HttpDoor
from warden.ingress.listen import listen
from warden.killswitch import KillSwitch, KillSwitches, KillSwitchGuard, Scope
from warden.ops.health import add_health_routes
from warden.pipeline import Guard, Pipeline
from warden.policy.engine import PolicyEngine
from warden.policy.guard import PolicyGuard
from warden.state import StateStore
from warden.state.links import CallLinks, CallLinkStore

__all__ = ["Warden"]

log = logging.getLogger("warden")

# Upstream connections are kept alive and shared by all agents' requests.
_CONNECTION_LIMIT = 1000


class Warden:
    """One sidecar process worth of Warden, started and stopped as a unit.

    Everything it opens is entered on one :class:`contextlib.AsyncExitStack`
    as it starts, so stopping closes it all in reverse order: the front doors
    first, then the core (outcome records, call links), the engine and the
    stores, and the audit log last, which signs its final checkpoint. A close
    that fails is logged and the rest still close: the final checkpoint is
    never skipped.
    """

    def __init__(
        self, config: Config, *, doors: Sequence[FrontDoor] = (), listeners: bool = True
    ) -> None:
        """``doors``: front doors to start besides the ones the configuration names.

        ``listeners=False`` starts neither the proxy nor the admin API: only
        ``doors`` take traffic (``warden mcp wrap`` runs beside ``warden serve``).
        """
        self.config = config
        self._extra_doors = tuple(doors)
        self._listeners = listeners
        self._stack = contextlib.AsyncExitStack()
        self._audit: AuditLog | None = None
        self._engine: PolicyEngine | None = None
        self.killswitches: KillSwitches | None = None
        """The kill switches in force; the proxy checks them between stream chunks."""
        self._approvals: Approvals | None = None
        self.core: Governor | None = None
        self.doors: tuple[FrontDoor, ...] = ()
        self._stopped = asyncio.Event()
        self._stopping = False
        self.proxy_url = ""
        self.admin_url = ""

    async def start(self) -> None:
        """Open the audit log, start the policy engine, then begin listening.

        On failure, whatever was started is stopped again before the error
        propagates, so a failed start leaves no workers or files open.
        """
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        cfg = self.config
        stack = self._stack
        prices = PriceTable.load(cfg.prices.file)
        # Entered first, closed last: every other close may still record.
        self._audit = audit = await AuditLog.open(cfg.audit)
        stack.push_async_callback(audit.close)
        state = await StateStore.open(cfg.state.url)
        stack.push_async_callback(state.close)
        self.killswitches = killswitches = KillSwitches(state, audit)
        await killswitches.start()
        stack.push_async_callback(killswitches.close)
        budgets = BudgetGuard(
            state,
            cfg.budgets,
            prices,
            {name: up.protocol for name, up in cfg.upstreams.items()},
        )
        budgets.start()
        stack.push_async_callback(budgets.close)
        self._approvals = approvals = await Approvals.open(
            cfg.state.url, audit, approval_settings(cfg.approvals)
        )
        stack.push_async_callback(approvals.close)  # before the audit log: it records deliveries
        gate = ApprovalGate(
            approvals, cfg.approvals, audit, killswitches=killswitches, budgets=budgets
        )
        killswitches.on_set(self._reject_held)
        self._engine = engine = await PolicyEngine.start(cfg.policy)
        stack.push_async_callback(engine.close)
        # Kill switch first, then budget reservation, then policy.
        guards: list[Guard] = [
            KillSwitchGuard(killswitches),
            budgets,
            PolicyGuard(engine, cfg.policy),
        ]
        pipeline = Pipeline(
            guards,
            audit,
            mode_for=cfg.mode_for,
            risk_of=cfg.risk_of,
            default_effect=cfg.policy.default_effect,
            unknown_calls_to_policy=cfg.policy.unknown_calls == "policy",
        )
        link_store = await CallLinkStore.open(cfg.state.url)
        stack.push_async_callback(link_store.close)
        self.core = core = Governor(pipeline, gate=gate, links=CallLinks(link_store))
        await core.start()
        stack.push_async_callback(core.close)  # after the doors: drains their outcomes
        if not self._listeners:
            await self._start_doors(core, self._extra_doors)
            stack.callback(gate.stop_holding)
            return
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=_CONNECTION_LIMIT, limit_per_host=0),
            auto_decompress=True,
            # No proxy from the environment: Warden reaches only configured upstreams.
            trust_env=False,
        )
        stack.push_async_callback(session.close)
        admin_app = web.Application()
        admin_app[AUTH] = TokenAuth(cfg.admin.tokens)
        add_health_routes(admin_app, self.readiness)
        add_killswitch_routes(admin_app, killswitches)
        add_approval_routes(admin_app, approvals, admin_app[AUTH])
        http = HttpDoor(cfg, session, killswitches=killswitches)
        await self._start_doors(core, (http, *self._extra_doors))
        self.proxy_url = http.url
        admin, self.admin_url = await listen(
            admin_app, cfg.listen.admin, shutdown_grace_s=cfg.shutdown_grace_s
        )
        stack.push_async_callback(admin.cleanup)
        # Unwound first: held requests are answered as deferred, so doors can drain.
        stack.callback(gate.stop_holding)
        log.info("proxy listening on %s, admin on %s", self.proxy_url, self.admin_url)

    async def _start_doors(self, core: Governor, doors: Sequence[FrontDoor]) -> None:
        self.doors = tuple(doors)
        for door in self.doors:
            await door.start(core)
            self._stack.push_async_callback(door.stop)

    def readiness(self) -> tuple[bool, Mapping[str, Any]]:
        """Ready only when a policy bundle is active and the audit log is writable."""
        policy_ok = self._engine is not None and self._engine.ready
        audit_ok = self._audit is not None and self._audit.writable
        detail: dict[str, Any] = {
            "policy": self._engine.status() if self._engine is not None else {"ready": False},
            "audit": {"writable": audit_ok},
            "stopping": self._stopping,
        }
        return policy_ok and audit_ok and not self._stopping, detail

    async def stop(self) -> None:
        """Graceful stop: refuse new requests, finish in-flight ones, flush the log.

        Everything started is closed even when one close fails (that failure
        is logged): the audit log's final signed checkpoint is never skipped.
        """
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        try:
            await self._stack.aclose()
        except Exception:
            log.exception("a component failed to close; the rest were closed")
        finally:
            self._stopped.set()
        log.info("stopped")

    async def _reject_held(self, switch: KillSwitch) -> None:
        # Approvals do not know their upstream: an upstream switch is enforced
        # when an approved action is checked again before it goes on.
        if self._approvals is None or switch.scope is Scope.UPSTREAM:
            return
        why = f"rejected by {switch.message}"
        if switch.scope is Scope.GLOBAL:
            await self._approvals.cancel_all_for(reason=why)
        elif switch.scope is Scope.AGENT:
            await self._approvals.cancel_all_for(agent=switch.target, reason=why)
        else:
            await self._approvals.cancel_all_for(tool=switch.target, reason=why)

    async def wait_stopped(self) -> None:
        """Block until :meth:`stop` has finished."""
        await self._stopped.wait()

    def stop_on_signals(self) -> None:
        """Stop gracefully on SIGTERM and SIGINT (what Kubernetes and a terminal send)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: tasks.spawn(self.stop(), name="stop"))

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
