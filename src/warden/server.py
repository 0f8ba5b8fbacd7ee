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
import os
import signal
from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import aiohttp
from aiohttp import web

from warden import tasks
from warden.admin.approval_routes import add_approval_routes
from warden.admin.auth import AUTH, TokenAuth, json_errors
from warden.admin.change_routes import add_change_routes
from warden.admin.killswitch_routes import add_killswitch_routes
from warden.approvals.gate import ApprovalGate, approval_settings
from warden.approvals.service import Approvals
from warden.audit import AuditLog
from warden.audit.changes import CONFIG_LOAD, ActivationRecorder, config_body
from warden.audit.ship import Shipper
from warden.budgets.guard import BudgetGuard
from warden.budgets.prices import PriceTable
from warden.config import Config
from warden.console import Console, console_app
from warden.core import Governor
from warden.credentials import Credentials
from warden.erasure import StateEraser
from warden.ingress.base import FrontDoor
from warden.ingress.connection_cap import MAX_REFUSALS
from warden.ingress.envoy_authz import ExtAuthzService
from warden.ingress.envoy_proc import ExtProcService
from warden.ingress.grpc import GrpcDoor
from warden.ingress.grpc_governance import GovernanceService, RecordSource
from warden.ingress.grpc_service import GrpcService
from warden.ingress.http import HttpDoor
from warden.ingress.listen import Listener, admin_refusal, listen
from warden.killswitch import KillSwitch, KillSwitches, KillSwitchGuard, Scope
from warden.model import ActionKind
from warden.monitor.live import LiveMonitor
from warden.ops import metrics, tracing
from warden.ops.health import add_health_routes
from warden.ops.metrics import STATE_UP
from warden.pipeline import Guard, Pipeline
from warden.policy.bundle.order import SignedOrder
from warden.policy.challenger import Challenger
from warden.policy.engine import PolicyEngine
from warden.policy.guard import PolicyGuard
from warden.sessions import SessionGuard
from warden.state.backend import StateBackend, open_state
from warden.state.links import CallLinks

if TYPE_CHECKING:
    from warden.ingress.transparent import TransparentDoor

__all__ = [
    "OWN_DESCRIPTORS",
    "Warden",
    "connection_shares",
    "descriptors_needed",
    "listeners_of",
]

log = logging.getLogger("warden")

# Upstream connections are kept alive and shared by all agents' requests.
_CONNECTION_LIMIT = 1000
# Descriptors beyond the connections: audit segments, the state store, policy
# workers' sockets, bundle files, the gRPC and transparent listeners.
OWN_DESCRIPTORS = 256
"""Descriptors Warden keeps for itself beyond its connections."""


def listeners_of(config: Config) -> int:
    """The listeners ``config`` opens, each capped at ``limits.max_connections``: the
    proxy and admin ones, and the gRPC and transparent ones when set."""
    return 2 + (config.listen.grpc is not None) + _transparent_on(config)


def connection_shares(config: Config) -> int:
    """How many times ``limits.max_connections`` descriptors the connections may hold:
    one per listener, one for the upstream pool, and one more with transparent mode
    (each request it hands over holds a connection to the proxy listener too)."""
    return listeners_of(config) + 1 + _transparent_on(config)


def descriptors_needed(config: Config) -> int:
    """Open files a Warden serving ``config`` may need at once: every share full
    (:func:`connection_shares`), the refusals being answered, and its own files."""
    shares = connection_shares(config) * config.limits.max_connections
    return shares + 2 * MAX_REFUSALS + OWN_DESCRIPTORS


def _transparent_on(config: Config) -> bool:
    return config.transparent is not None and config.transparent.listen is not None


async def _stop_together(stops: Sequence[tuple[str, Callable[[], Awaitable[None]]]]) -> None:
    """Run every ``(name, stop)`` at once; one that fails is logged, the others still stop."""
    results = await asyncio.gather(*(stop() for _, stop in stops), return_exceptions=True)
    for (name, _), result in zip(stops, results, strict=True):
        if isinstance(result, Exception):
            log.error("%s failed to stop", name, exc_info=result)
        elif isinstance(result, BaseException):
            raise result


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
        self,
        config: Config,
        *,
        doors: Sequence[FrontDoor] = (),
        listeners: bool = True,
        config_source: str | None = None,
    ) -> None:
        """``doors``: front doors to start besides the ones the configuration names.

        ``listeners=False`` starts neither the proxy nor the admin API: only
        ``doors`` take traffic (``warden mcp wrap`` runs beside ``warden serve``).
        """
        self.config = config
        self._config_source = config_source
        """The config file, named in the ``config_load`` audit record."""
        self._extra_doors = tuple(doors)
        self._listeners = listeners
        self._stack = contextlib.AsyncExitStack()
        self._listening: list[tuple[str, Callable[[], Awaitable[None]]]] = []
        """What takes requests (the front doors, the admin listener): stopped together."""
        self._audit: AuditLog | None = None
        self._shipper: Shipper | None = None
        self._state: StateBackend | None = None
        self._engine: PolicyEngine | None = None
        self.killswitches: KillSwitches | None = None
        """The kill switches in force; the proxy checks them between stream chunks."""
        self._approvals: Approvals | None = None
        self.core: Governor | None = None
        self.console: Console | None = None
        """The web console, when ``console.enabled``."""
        self.doors: tuple[FrontDoor, ...] = ()
        self._stopped = asyncio.Event()
        self._stopping = False
        self.proxy_url = ""
        self.admin_url = ""
        self.grpc_address = ""
        """``host:port`` of the gRPC listener (``listen.grpc``), once started; empty when off."""
        self._transparent: TransparentDoor | None = None
        self.monitor: LiveMonitor | None = None
        """Drift and quality gauges (``monitor.enabled``), once started."""
        self.challenger: Challenger | None = None
        """The live challenger (``policy.challenger``), once started (``stats()``)."""

    async def start(self) -> None:
        """Open the audit log, start the policy engine, then begin listening.

        On failure, whatever was started is stopped again before the error
        propagates, so a failed start leaves no workers or files open.
        """
        identity = self.config.identity
        jwt_agents = identity.jwt.agents.values() if identity.jwt is not None else ()
        metrics.expect_agents((self.config.agent.id, *identity.agents, *jwt_agents))
        metrics.reserve("tool", (*self.config.tools, *(kind.value for kind in ActionKind)))
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        cfg = self.config
        stack = self._stack
        prices = PriceTable.load(cfg.prices.file)
        credentials = self._credentials()
        # Entered first, closed last: every other close may still record.
        self._audit = audit = await self._open_audit()
        audit.expect_erasers()  # the state store's eraser comes once the core is up
        # SQLite or PostgreSQL: every repository, and the change feed between sidecars.
        self._state = state = await open_state(cfg.state)
        stack.push_async_callback(state.close)
        self.killswitches = killswitches = KillSwitches(state.killswitches, audit, feed=state.feed)
        await killswitches.start()
        stack.push_async_callback(killswitches.close)
        budgets = BudgetGuard(
            state.budgets,
            cfg.budgets,
            prices,
            {name: up.protocol for name, up in cfg.upstreams.items()},
            on_unavailable=cfg.policy.fallback if cfg.state.on_unavailable == "fallback" else None,
        )
        budgets.start()
        stack.push_async_callback(budgets.close)
        self._approvals = approvals = await Approvals.open(
            state.approvals,
            audit,
            approval_settings(cfg.approvals),
            feed=state.feed,
            subjects=audit.subject_refs,
        )
        stack.push_async_callback(approvals.close)  # before the audit log: it records deliveries
        gate = ApprovalGate(
            approvals, cfg.approvals, audit, killswitches=killswitches, budgets=budgets
        )
        killswitches.on_set(self._reject_held)
        self._engine, policy_guard = await self._start_policy(audit)
        # Kill switch first, then budget reservation, then the session, then policy.
        guards: list[Guard] = [
            KillSwitchGuard(killswitches),
            budgets,
            sessions := self._session_guard(state),
            policy_guard,
        ]
        pipeline = Pipeline(
            guards,
            audit,
            mode_for=cfg.mode_for,
            risk_of=cfg.risk_of,
            default_effect=cfg.policy.default_effect,
            unknown_calls_to_policy=cfg.policy.unknown_calls == "policy",
        )
        self.core = core = await self._start_core(pipeline, gate, sessions, approvals)
        if not self._listeners:
            await self._start_doors(core, self._extra_doors)
            stack.callback(gate.stop_holding)
            return
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=_CONNECTION_LIMIT, limit_per_host=0),
            auto_decompress=True,
            # No proxy from the environment: Warden reaches only configured upstreams.
            trust_env=False,
            # A span per upstream request, continuing the trace (none unless tracing is on).
            trace_configs=tracing.client_trace_configs(),
        )
        stack.push_async_callback(session.close)
        admin_app = web.Application(middlewares=[json_errors])
        admin_app[AUTH] = TokenAuth(cfg.admin.tokens)
        add_health_routes(admin_app, self.readiness)
        add_killswitch_routes(admin_app, killswitches)
        add_change_routes(admin_app, audit)  # eval and replay runs, recorded in this log
        add_approval_routes(admin_app, approvals, admin_app[AUTH])
        await self._start_console(admin_app, audit, approvals, killswitches, budgets=budgets)
        http = HttpDoor(
            cfg,
            session,
            killswitches=killswitches,
            credentials=credentials,
            mcp_owners=state.sessions,
            prices=prices,
        )
        doors: list[FrontDoor] = [http, *self._transparent_door(http)]
        grpc_door: GrpcDoor | None = None
        if cfg.listen.grpc is not None:
            # Warden's own API first; the Envoy services are appended where marked below.
            services: list[GrpcService] = [
                GovernanceService(
                    cfg,
                    core,
                    approvals=approvals,
                    killswitches=killswitches,
                    records=RecordSource(audit.directory, lambda: audit.size, audit.next_write),
                    auth=admin_app[AUTH],
                ),
            ]
            # --- gRPC services beside Warden's API (Envoy ext_authz, ext_proc): append here ---
            services.append(
                ExtAuthzService(core, cfg, approvals=approvals, credentials=credentials)
            )
            services.append(
                ExtProcService(
                    core, cfg, killswitches=killswitches, credentials=credentials, prices=prices
                )
            )
            grpc_door = GrpcDoor(
                cfg.listen.grpc,
                cfg.grpc,
                services,
                shutdown_grace_s=cfg.shutdown_grace_s,
                limits=cfg.limits,
            )
            doors.append(grpc_door)
        await self._start_doors(core, (*doors, *self._extra_doors))
        self.proxy_url = http.url
        self.grpc_address = grpc_door.address if grpc_door is not None else ""
        admin, self.admin_url = await listen(
            admin_app, cfg.listen.admin, Listener.of(cfg, "admin", admin_refusal)
        )
        self._listening.append(("the admin listener", admin.cleanup))
        # Unwound first: held requests are answered as deferred, so doors can drain.
        stack.callback(gate.stop_holding)
        log.info("proxy listening on %s, admin on %s", self.proxy_url, self.admin_url)

    def _credentials(self) -> Credentials:
        """The upstream keys Warden holds (read now: a missing one stops the start)."""
        credentials = Credentials.load(self.config.upstreams, os.environ)
        if not credentials:
            return credentials
        if not self.config.identity.require_proof:
            log.warning(
                "Warden holds upstream keys (%s) and identity.require_proof is off: anyone "
                "who can reach the proxy port can use them as %r; require proof where "
                "other processes can reach it (docs/credentials.md)",
                ", ".join(n for n in self.config.upstreams if credentials.get(n) is not None),
                self.config.agent.id,
            )
        if self.config.listen.grpc is not None and not self.config.grpc.envoy_peers:
            log.warning(
                "Warden holds upstream keys and grpc.envoy_peers names no Envoy: Envoy "
                "ext_proc and ext_authz requests to those upstreams (%s) are refused; name "
                "Envoy's client certificate there, with grpc.tls.client_ca (docs/credentials.md)",
                self.config.listen.grpc,
            )
        if credentials.watched:
            watcher = tasks.spawn(credentials.watch(), name="credential-watch")
            self._stack.push_async_callback(_cancel, watcher)
        return credentials

    async def _start_core(
        self, pipeline: Pipeline, gate: ApprovalGate, sessions: SessionGuard, approvals: Approvals
    ) -> Governor:
        """The governor, with its call links; erasing a data subject reaches both stores."""
        assert self._audit is not None
        assert self._state is not None
        state = self._state
        core = Governor(pipeline, gate=gate, links=CallLinks(state.links), chains=sessions)
        await core.start()
        self._stack.push_async_callback(core.close)  # after the doors: drains their outcomes
        # An erased data subject is erased from the state store and memory too.
        self._audit.on_erase(StateEraser(core.links, approvals, state.sessions))
        return core

    async def _start_policy(self, audit: AuditLog) -> tuple[PolicyEngine, PolicyGuard]:
        """The policy engine (and the challenger beside it, if configured) and its guard."""
        cfg = self.config
        # ext_authz's query is compiled beside policy.query (undefined if the bundle lacks it).
        record = ActivationRecorder(audit)
        marks = self._state.signed_marks if self._state is not None else None
        engine = await PolicyEngine.start(
            cfg.policy,
            entrypoints=(cfg.ext_authz.query,),
            # Every activation is recorded (durably) just before it is swapped in,
            # after an older signed bundle has been refused (rollback protection).
            pre_activate=record
            if marks is None
            else SignedOrder(marks, allow_older=cfg.policy.signing.allow_older, then=record),
        )
        self._stack.push_async_callback(engine.close)
        guard = PolicyGuard(engine, cfg.policy)
        guard.challenger = await self._start_challenger(audit)
        return engine, guard

    async def _start_challenger(self, audit: AuditLog) -> Challenger | None:
        """The live challenger (``policy.challenger``): own workers, fed off the request path."""
        if self.config.policy.challenger is None:
            return None
        self.challenger = challenger = await Challenger.start(
            self.config.policy,
            audit=audit,
            pre_activate=ActivationRecorder(audit, role="challenger"),
        )
        # Closed after the doors (unwound first): they stop offering before it stops.
        self._stack.push_async_callback(challenger.close)
        return challenger

    def _session_guard(self, state: StateBackend) -> SessionGuard:
        """``input.history`` and ``input.session`` (:mod:`warden.sessions`), kept in ``state``."""
        cfg = self.config
        sessions = SessionGuard(
            state.sessions,
            cfg.sessions,
            cfg.tools,
            deny_when_unavailable=cfg.state.on_unavailable == "deny",
        )
        sessions.start()
        self._stack.push_async_callback(sessions.close)
        return sessions

    @property
    def transparent_address(self) -> str:
        """``host:port`` of the transparent mode proxy (``transparent.listen``); empty when off."""
        return self._transparent.address if self._transparent is not None else ""

    def _transparent_door(self, http: HttpDoor) -> list[FrontDoor]:
        """Transparent mode, when ``transparent.listen`` is set: after the HTTP door,
        whose listener it hands governed flows to (ADR 0010)."""
        cfg = self.config
        if cfg.transparent is None or cfg.transparent.listen is None:
            return []
        # Imported only when on: mitmproxy is large.
        from warden.ingress.transparent import TransparentDoor  # noqa: PLC0415

        self._transparent = TransparentDoor(
            cfg, lambda: http.url, shutdown_grace_s=cfg.shutdown_grace_s
        )
        return [self._transparent]

    async def _open_audit(self) -> AuditLog:
        """Open the audit log, and start shipping it when ``audit.ship`` is set."""
        cfg = self.config.audit
        # Reads its password file now: a bad one fails the start before anything opens.
        shipper = Shipper(cfg.ship, cfg.dir) if cfg.ship is not None else None
        audit = await AuditLog.open(cfg)
        if shipper is not None:
            # Closed after the audit log, so the final checkpoint is shipped too.
            self._shipper = shipper
            self._stack.push_async_callback(shipper.close)
            # Only what a power loss cannot take back: a record shipped, then lost locally,
            # would have the restarted log refused as another writer's.
            shipper.start(lambda: audit.synced_size)
        self._stack.push_async_callback(audit.close)
        # Change management: which configuration this process runs (secrets left out).
        await audit.append(CONFIG_LOAD, config_body(self.config, self._config_source))
        self._start_monitor(audit)  # drift and quality gauges, off the request path
        return audit

    def _start_monitor(self, audit: AuditLog) -> None:
        """Drift and quality gauges (``monitor``), recomputed by a background task."""
        if not self.config.monitor.enabled:
            return
        live = LiveMonitor(self.config.monitor, audit.directory)
        audit.follow(live.feed)  # new records reach it as written, not read back
        live.start(lambda: audit.size)
        self.monitor = live
        self._stack.push_async_callback(live.close)  # before the audit log closes

    async def _start_console(
        self,
        admin_app: web.Application,
        audit: AuditLog,
        approvals: Approvals,
        killswitches: KillSwitches,
        *,
        budgets: BudgetGuard | None = None,
    ) -> None:
        """The web console at ``/console/``: reads the log, acts through the same services."""
        if not self.config.console.enabled:
            return
        console = Console(
            self.config,
            audit=audit,
            approvals=approvals,
            killswitches=killswitches,
            auth=admin_app[AUTH],
            readiness=self.readiness,
            budgets=budgets,
            challenger=lambda: self.challenger.stats() if self.challenger is not None else None,
        )
        await console.start()
        self._stack.push_async_callback(console.close)
        self.console = console
        admin_app.add_subapp("/console", console_app(console))

    async def _start_doors(self, core: Governor, doors: Sequence[FrontDoor]) -> None:
        self.doors = tuple(doors)
        # Stopped together, the admin listener too: each may wait out the grace period
        # for its requests in flight, and one after another they would outlast the pod's
        # grace period.
        self._stack.push_async_callback(_stop_together, self._listening)
        for door in self.doors:
            await door.start(core)
            self._listening.append((type(door).__name__, door.stop))

    def readiness(self) -> tuple[bool, Mapping[str, Any]]:
        """Ready only when a policy bundle is active and the audit log is writable."""
        policy_ok = self._engine is not None and self._engine.ready
        audit_ok = self._audit is not None and self._audit.writable
        detail: dict[str, Any] = {
            "policy": self._engine.status() if self._engine is not None else {"ready": False},
            "audit": {"writable": audit_ok},
            "stopping": self._stopping,
        }
        if self._shipper is not None:
            shipping = self._shipper.status()
            detail["audit"]["ship"] = {
                "connected": shipping.connected,
                "lag_records": shipping.lag_records,
                "lag_seconds": round(shipping.lag_seconds, 3),
            }
        if self._state is not None:
            # Degraded, not unready: see ADR 0009 (Outages). Decisions that need the
            # state store follow state.on_unavailable; every other decision still works.
            # Switches not read for long (a connection dropped unheard), or since the feed
            # reported a change, are an outage too: one thrown on another sidecar may be
            # missing here. So is a store that failed a call in the last few seconds.
            switches = self.killswitches
            unread = switches.change_unread_for() if switches is not None else None
            up = self._state.up() and unread is None and (switches is None or not switches.stale())
            detail["state"] = {"backend": self._state.kind, "up": up}
            if switches is not None:
                detail["state"]["killswitches_read_s_ago"] = round(switches.unread_for(), 1)
            if unread is not None:
                detail["state"]["killswitch_change_unread_s"] = round(unread, 1)
            STATE_UP.set(1 if up else 0)  # /metrics asks for readiness on every scrape
        transparent_ok = True
        if self._transparent is not None:
            transparent_ok = self._transparent.ready
            detail["transparent"] = self._transparent.status()
        return policy_ok and audit_ok and transparent_ok and not self._stopping, detail

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
        if self._approvals is None:
            return
        why = f"rejected by {switch.message}"
        if switch.scope is Scope.GLOBAL:
            await self._approvals.cancel_all_for(reason=why)
        elif switch.scope is Scope.AGENT:
            await self._approvals.cancel_all_for(agent=switch.target, reason=why)
        elif switch.scope is Scope.UPSTREAM:
            await self._approvals.cancel_all_for(upstream=switch.target, reason=why)
        else:
            await self._approvals.cancel_all_for(tool=switch.target, reason=why)

    async def wait_stopped(self) -> None:
        """Block until :meth:`stop` has finished."""
        await self._stopped.wait()

    def stop_on_signals(self) -> None:
        """Stop gracefully on SIGTERM, SIGINT and SIGHUP (what Kubernetes, Ctrl-C and a
        closed terminal send). SIGHUP reloads nothing: bundles and keys reload when their
        files change; left to its default it ended Warden mid-request."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            if sig is signal.SIGHUP and signal.getsignal(sig) is signal.SIG_IGN:
                continue  # started under nohup: a closed session must not stop it
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


async def _cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
