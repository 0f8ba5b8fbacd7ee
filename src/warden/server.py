"""Assembles a running Warden: audit log, policy engine, pipeline, listeners.

``Warden`` is used the same way by ``warden serve``, the demo, the tests and
the benchmarks::

    async with Warden(load_config("warden.yaml")) as warden:
        print(warden.proxy_url)      # point OPENAI_BASE_URL at f"{...}/openai/v1"
        await warden.wait_stopped()  # until stop() or a signal
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Self

import aiohttp
from aiohttp import web

from warden.admin.approval_routes import add_approval_routes
from warden.admin.auth import AUTH, TokenAuth
from warden.admin.killswitch_routes import add_killswitch_routes
from warden.approvals.gate import ApprovalGate, approval_settings
from warden.approvals.service import Approvals
from warden.audit import AuditLog
from warden.budgets.guard import BudgetGuard
from warden.budgets.prices import PriceTable
from warden.config import Config, parse_listen
from warden.errors import ConfigError
from warden.ingress.http import ProxyApp, build_proxy_app
from warden.killswitch import KillSwitch, KillSwitches, KillSwitchGuard, Scope
from warden.ops.health import add_health_routes
from warden.pipeline import Guard, Pipeline
from warden.policy.engine import PolicyEngine
from warden.policy.guard import PolicyGuard
from warden.state import StateStore

__all__ = ["Warden"]

log = logging.getLogger("warden")

# Upstream connections are kept alive and shared by all agents' requests.
_CONNECTION_LIMIT = 1000


class Warden:
    """One sidecar process worth of Warden, started and stopped as a unit."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._audit: AuditLog | None = None
        self._engine: PolicyEngine | None = None
        self._state: StateStore | None = None
        self._budgets: BudgetGuard | None = None
        self.killswitches: KillSwitches | None = None
        self._approvals: Approvals | None = None
        self._gate: ApprovalGate | None = None
        """The kill switches in force; the proxy checks them between stream chunks."""
        self._session: aiohttp.ClientSession | None = None
        self._proxy: ProxyApp | None = None
        self._runners: list[web.AppRunner] = []
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
        prices = PriceTable.load(cfg.prices.file)
        self._audit = await AuditLog.open(cfg.audit)
        self._state = await StateStore.open(cfg.state.url)
        self.killswitches = KillSwitches(self._state, self._audit)
        await self.killswitches.start()
        self._budgets = BudgetGuard(
            self._state,
            cfg.budgets,
            prices,
            {name: up.protocol for name, up in cfg.upstreams.items()},
        )
        self._budgets.start()
        self._approvals = await Approvals.open(
            cfg.state.url, self._audit, approval_settings(cfg.approvals)
        )
        self._gate = ApprovalGate(
            self._approvals,
            cfg.approvals,
            self._audit,
            killswitches=self.killswitches,
            budgets=self._budgets,
        )
        self.killswitches.on_set(self._reject_held)
        self._engine = await PolicyEngine.start(cfg.policy)
        # Kill switch first, then budget reservation, then policy.
        guards: list[Guard] = [
            KillSwitchGuard(self.killswitches),
            self._budgets,
            PolicyGuard(self._engine, cfg.policy),
        ]
        pipeline = Pipeline(
            guards,
            self._audit,
            mode_for=cfg.mode_for,
            risk_of=cfg.risk_of,
            default_effect=cfg.policy.default_effect,
            unknown_calls_to_policy=cfg.policy.unknown_calls == "policy",
        )
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=_CONNECTION_LIMIT, limit_per_host=0),
            auto_decompress=True,
            # No proxy from the environment: Warden reaches only configured upstreams.
            trust_env=False,
        )
        self._proxy = ProxyApp(
            cfg, pipeline, self._session, gate=self._gate, killswitches=self.killswitches
        )
        proxy_app = build_proxy_app(self._proxy, cfg.limits.max_body_bytes)
        admin_app = web.Application()
        admin_app[AUTH] = TokenAuth(cfg.admin.tokens)
        add_health_routes(admin_app, self.readiness)
        add_killswitch_routes(admin_app, self.killswitches)
        add_approval_routes(admin_app, self._approvals, admin_app[AUTH])
        self.proxy_url = await self._listen(proxy_app, cfg.listen.proxy)
        self.admin_url = await self._listen(admin_app, cfg.listen.admin)
        log.info("proxy listening on %s, admin on %s", self.proxy_url, self.admin_url)

    async def _listen(self, app: web.Application, where: str) -> str:
        host, port = parse_listen(where)
        runner = web.AppRunner(
            app,
            access_log=None,
            shutdown_timeout=self.config.shutdown_grace_s,
            handle_signals=False,
        )
        await runner.setup()
        self._runners.append(runner)
        # Bind first so that port 0 resolves to a real port we can report.
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise ConfigError(f"cannot listen on {where}: {exc.strerror}") from None
        site = web.SockSite(runner, sock)
        await site.start()
        bound = sock.getsockname()
        shown = f"[{bound[0]}]" if family == socket.AF_INET6 else bound[0]
        return f"http://{shown}:{bound[1]}"

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
        """Graceful stop: refuse new requests, finish in-flight ones, flush the log."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        if self._gate is not None:
            self._gate.stop_holding()  # held requests are answered as deferred
        # Proxy first: cleanup stops accepting, then waits up to the grace period.
        for runner in self._runners:
            await runner.cleanup()
        if self._proxy is not None:
            await self._proxy.drain_background()
        if self._session is not None:
            await self._session.close()
        if self._engine is not None:
            await self._engine.close()
        if self._budgets is not None:
            await self._budgets.close()
        if self.killswitches is not None:
            await self.killswitches.close()
        if self._approvals is not None:
            await self._approvals.close()  # before the audit log: it records deliveries
        if self._state is not None:
            await self._state.close()
        if self._audit is not None:
            await self._audit.close()
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
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(self.stop()))

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
