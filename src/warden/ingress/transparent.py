"""The transparent front door: agents that cannot change a base URL, through mitmproxy.

Agents reach it through ``HTTPS_PROXY`` (``mode: regular``) or by redirection
(``transparent``, ``wireguard``). mitmproxy runs as a library on Warden's
event loop (its proxy core, not ``Master.run``, whose loop-wide task factory
would change how Warden's own tasks run), with one addon (:class:`GoverningAddon`):

* a **governed** host (``transparent.hosts``) is decrypted with Warden's CA
  and each request is handed, unbuffered, to Warden's own base-URL listener as
  ``/<upstream>/<path>`` with the agent's headers plus a mark only this
  process can make (:mod:`warden.ingress.door_mark`). The listener then does
  what it does for any agent: the same adapters, stream driver, core,
  approvals, kill switches and records, with ``request.door: transparent``.
  mitmproxy streams the answer back as it comes (``flow.response.stream``).
  Governed traffic therefore reaches only the upstream's ``base_url``.
* an **unknown** host is refused (``unknown_hosts: deny``: ``CONNECT`` gets 403
  and no connection is opened) or tunnelled (``tunnel``: the TLS connection
  is passed through, never decrypted; a log line and a metric are all that
  is kept), to a public address only: Warden resolves the name itself,
  refuses it if any address it has is loopback, link-local, private (unless
  ``tunnel_private_networks``), this host's own or listed in ``hosts`` (a
  governed API under another name), and connects to the address it checked.
* a second line of defence, ``server_connect``, lets no connection leave
  except to the base-URL listener and, with ``tunnel``, to allowed addresses
  of hosts that are not governed: never an open proxy.

Why a hand-over rather than calling the core from the addon: see
docs/adr/0010-transparent-mode.md.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import ipaddress
import logging
import math
import re
import socket
import threading
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, cast
from urllib.parse import urlsplit

from prometheus_client import Counter

from warden import tasks
from warden.config import DEFAULT_MAX_CONNECTIONS, Config, TransparentConfig, parse_listen
from warden.core import Governor
from warden.errors import ConfigError, ShuttingDown
from warden.ingress import transparent_ca
from warden.ingress.door_mark import VIA_HEADER, mark
from warden.ingress.transparent_rules import (
    HostRules,
    Verdict,
    VerdictKind,
    destination_refusal,
    embedded_ipv4,
    handoff_path,
    normalize_host,
)
from warden.ingress.upstream_io import MAX_UPSTREAM_BODY
from warden.ops import metrics
from warden.protocols import http_tool
from warden.protocols.errors import render_error

with warnings.catch_warnings():
    # mitmproxy.addons (imported by its master too) imports every addon; its LDAP
    # proxy auth (ldap3) uses pyasn1 names that warn as deprecated. None of it runs here.
    warnings.simplefilter("ignore", DeprecationWarning)
    from mitmproxy import certs, connection, http, tls
    from mitmproxy.addons import core as mitm_core
    from mitmproxy.addons import disable_h2c, next_layer, proxyserver, tlsconfig
    from mitmproxy.master import Master
    from mitmproxy.options import Options
    from mitmproxy.proxy import server_hooks

__all__ = ["GoverningAddon", "TransparentDoor"]

log = logging.getLogger("warden.transparent")

CONNECTIONS = Counter(
    "warden_transparent_connections_total",
    "Transparent mode connections by host, mode and what was done "
    "(intercepted, tunnelled, refused).",
    ["host", "mode", "verdict"],
)
REQUESTS = Counter(
    "warden_transparent_requests_total",
    "Transparent mode HTTP requests by host, mode and what was done (governed, refused, passed).",
    ["host", "mode", "verdict"],
)
TLS_FAILURES = Counter(
    "warden_transparent_tls_failures_total",
    "Clients that rejected Warden's certificate (pinning, CA not trusted), by host and mode.",
    ["host", "mode"],
)
LOOKUPS_REFUSED = Counter(
    "warden_transparent_lookups_refused_total",
    "Tunnels refused because too many of their destinations were being resolved at once "
    "(a name server that does not answer, or an agent naming many hosts).",
)

_START_TIMEOUT_S = 30.0
_ANSWERED = "warden_answered"
"""Flow metadata: Warden answered the request itself, so mitmproxy reads its body whole."""
_NOT_GOVERNED = "host_not_governed"
_NOT_ALLOWED = "destination_not_allowed"
_RESOLVE_TIMEOUT_S = 10.0
_CLOSE_TIMEOUT_S = 2.0
_CLOSE_TURNS = 20


def _host_label(host: str) -> str:
    # Host names come from agents: bounded, so no client can grow the series without limit.
    return metrics.bounded("transparent_host", host) or "_none"


# The first segment of a refused request's path, if it is a short word (``/v1``, ``/api``):
# the rest, or a longer segment, can be a secret (a webhook's, a bot token).
_PATH_HEAD = re.compile(r"/[A-Za-z0-9._-]{1,16}(?=/|$)")


def _path_head(path: str) -> str:
    """What a log line may show of a request target: its first segment when more
    follow (``/v1/...``), never the rest, nor a lone segment (a short key or topic)."""
    path = path.partition("?")[0]  # a query can carry a key (?key=...)
    if path in ("", "/"):
        return "/"
    head = _PATH_HEAD.match(path)
    shown = head.group() if head and len(head.group()) < len(path) else ""
    return f"{shown}/..."


class _ConnectionOptions:
    """mitmproxy's options as the layers of one client connection read them.

    mitmproxy checks ``body_size_limit`` against a request's announced length
    before any hook runs, and answers past it with an HTML page of its own. A
    governed request is streamed to the base-URL listener, which bounds it and
    answers in the provider's shape, as it does in base-URL mode; the bodies
    mitmproxy reads whole are those of requests Warden answers itself (a
    refusal), so the limit applies while one of those is read.
    """

    def __init__(self, options: Options, limit: str) -> None:
        self._options = options
        self._limit = limit
        self.answering = 0
        """Requests of this connection Warden is answering itself."""

    @property
    def body_size_limit(self) -> str | None:
        """mitmproxy's limit: only while a request Warden answers is read."""
        return self._limit if self.answering else None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._options, name)

    def __contains__(self, name: object) -> bool:
        return name in self._options


class _ClientConnection:
    """What Warden changes of how mitmproxy handles one client connection."""

    def __init__(self, handler: Any, body_limit: str) -> None:
        # mitmproxy's idle timer covers the whole connection, a request waiting for its
        # answer included; Warden's idle limit is for the time between requests.
        self.watchdog: Any = getattr(handler, "timeout_watchdog", None)
        self.waiting: dict[str, contextlib.ExitStack] = {}
        """The idle timer held off, for each handed-over request not yet answered."""
        self.options: _ConnectionOptions | None = None
        context = getattr(getattr(handler, "layer", None), "context", None)
        if context is not None:
            # Every layer of the connection forks this context, and reads these options.
            self.options = _ConnectionOptions(context.options, body_limit)
            context.options = self.options

    def hold_idle_timer(self, flow_id: str) -> None:
        """No idle timeout while ``flow_id`` waits for its answer (a hold, a slow upstream,
        a pause in a stream): the listener bounds it, as in base-URL mode."""
        if self.watchdog is None or flow_id in self.waiting:
            return
        stack = contextlib.ExitStack()
        stack.enter_context(self.watchdog.disarm())
        # A timer already asleep wakes to this, and waits until the answer is out.
        self.watchdog.register_activity()
        self.waiting[flow_id] = stack

    def release(self, flow_id: str) -> None:
        """``flow_id`` is over: the idle timer runs again from now once none is waiting."""
        stack = self.waiting.pop(flow_id, None)
        if stack is not None:
            stack.close()

    def close(self) -> None:
        """The connection is closed: nothing is held for it any more."""
        for flow_id in list(self.waiting):
            self.release(flow_id)


def _refusal(host: str) -> http.Response:
    return _forbidden(
        _NOT_GOVERNED,
        "Host not governed by Warden",
        f"Warden does not govern {host or 'this host'} and transparent.unknown_hosts is deny",
    )


def _stopping(family: str) -> http.Response:
    body = render_error(family, 503, ShuttingDown.code, "Warden is stopping; retry shortly")
    headers = {"Content-Type": "application/json", "Retry-After": "1", "Connection": "close"}
    return http.Response.make(503, body, headers)


def _destination_refusal(host: str, governed: bool) -> http.Response:
    # Not the address, nor its range: the agent must not learn internal DNS here.
    name = host or "this host"
    why = (
        f"{name} has the address of a governed host, which Warden does not tunnel"
        if governed
        else f"Warden tunnels only to public addresses and {name} is not one"
    )
    return _forbidden(_NOT_ALLOWED, "Destination not allowed", why)


def _forbidden(code: str, title: str, why: str) -> http.Response:
    body = http_tool.problem(403, code, title, f"{why}: no connection was opened")
    return http.Response.make(403, body, {"Content-Type": http_tool.PROBLEM_CONTENT_TYPE})


class _Refused(Exception):
    """A tunnel's destination is not allowed: ``address`` is ``reason``
    (``governed``: an address listed in ``transparent.hosts``)."""

    def __init__(self, address: str, reason: str, *, governed: bool = False) -> None:
        rule = (
            "Warden never tunnels to it" if governed else "Warden tunnels only to public addresses"
        )
        super().__init__(f"{address} is {reason}, and {rule}")
        self.address = address
        self.reason = reason
        self.governed = governed


class _Lookups:
    """Tunnel destinations resolved on threads of their own, a bounded number at a time.

    A lookup the name server never answers holds its thread until the system
    resolver gives up, whatever the caller's timeout. On the event loop's
    default executor, a few agents naming such hosts would hold every thread
    that Warden's upstream connections resolve their own names on, and
    governed calls would queue behind them. Here they hold only these
    threads, and past :data:`_LOOKUPS_QUEUED` lookups not yet finished a
    tunnel is refused at once instead of queued.
    """

    def __init__(self, threads: int, queued: int) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(
            threads, thread_name_prefix="warden-tunnel-dns"
        )
        self._slots = threading.BoundedSemaphore(queued)

    async def resolve(self, host: str, port: int) -> list[tuple[Any, ...]]:
        """``getaddrinfo`` for a stream socket; ``OSError`` when busy, failed or too slow."""
        if not self._slots.acquire(blocking=False):
            LOOKUPS_REFUSED.inc()
            raise OSError("too many tunnel destinations are being resolved; try again")
        try:
            job = self._pool.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
        except BaseException:
            self._slots.release()
            raise
        # Released when the lookup ends, not when the caller stops waiting for it.
        job.add_done_callback(lambda _: self._slots.release())
        return await asyncio.wait_for(asyncio.wrap_future(job), _RESOLVE_TIMEOUT_S)


_LOOKUP_THREADS = 4
_LOOKUPS_QUEUED = 64
_LOOKUPS = _Lookups(_LOOKUP_THREADS, _LOOKUPS_QUEUED)


async def _resolve(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to, in the order to try (an address is itself).

    Raises ``OSError`` when it does not resolve (in time).
    """
    try:
        infos = await _LOOKUPS.resolve(host, port)
    except UnicodeError as exc:  # a name IDNA cannot encode
        raise OSError(f"not a host name: {exc}") from None
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _why_refused(address: str, private_allowed: bool) -> str | None:
    """Why a tunnel may not go to ``address``: its range, or being this host's own."""
    reason = destination_refusal(address, private_allowed=private_allowed)
    if reason is None and _is_this_host(address):
        # Warden's own listeners (admin, base URL) on a public or private interface.
        reason = "an address of this host"
    return reason


def _binds(address: str) -> bool:
    """Whether a socket can bind to ``address``: only to this host's own (nothing is sent)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((address, 0))
    except OSError:  # EADDRNOTAVAIL: not ours; EAFNOSUPPORT: no such family here
        return False
    return True


@functools.cache
def _bind_tells(family_probe: str) -> bool:
    """Whether binding tells this host's addresses: not where any binds (ip_nonlocal_bind),
    as a documentation address (``family_probe``, never assigned) then shows."""
    return not _binds(family_probe)


def _is_this_host(address: str) -> bool:
    # An IPv6 form of an IPv4 address (mapped, NAT64, 6to4) may lead back to it.
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and (inner := embedded_ipv4(ip)) is not None:
        address = str(inner)
    probe = "2001:db8::1" if ":" in address else "192.0.2.1"
    return _bind_tells(probe) and _binds(address)


class GoverningAddon:
    """The mitmproxy addon: every hook decides from :class:`HostRules`.

    ``target`` is the base-URL listener governed requests are handed to. The
    hooks only choose where a flow goes; their one I/O is resolving a tunnel's
    destination, to check where it really goes (``private_allowed``: may it
    be a private address).
    """

    def __init__(
        self,
        rules: HostRules,
        target: tuple[str, int],
        mode: str,
        *,
        private_allowed: bool = False,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        families: Mapping[str, str] | None = None,
        body_limit: int = MAX_UPSTREAM_BODY,
    ) -> None:
        self._rules = rules
        self._families = dict(families or {})
        """Each upstream's protocol, for errors in its own shape."""
        self.stopping = False
        """Set when Warden starts stopping: governed requests are then refused (503)."""
        self._max_connections = max_connections
        self._clients: set[str] = set()
        """Client connections open now (``limits.max_connections``)."""
        self._body_limit = str(body_limit)
        self._connections: dict[str, _ClientConnection] = {}
        """What Warden changed of how each open client connection is handled."""
        self._refused = metrics.child(metrics.CONNECTIONS_REFUSED, "transparent")
        self._target = target
        self._mode = mode
        self._private_allowed = private_allowed
        self._mark = mark("transparent")
        self._inflight: set[str] = set()
        self._by_client: dict[str, set[str]] = {}
        """The in-flight flows of each client connection, dropped when it closes: a flow
        mitmproxy gave up on (request trailers) ends in neither ``response`` nor ``error``."""
        self._idle: asyncio.Event | None = None
        self.proxyserver: Any = None
        """mitmproxy's ``Proxyserver`` addon, to learn what it bound (set by the door)."""
        self.started: concurrent.futures.Future[list[tuple[str, int]]] = concurrent.futures.Future()
        """Resolved once mitmproxy listens: the bound addresses (or the failure)."""

    async def drained(self, timeout_s: float) -> None:
        """Wait (on mitmproxy's loop) until no handed-over request is in flight, or the timeout."""
        if not self._inflight:
            return
        self._idle = asyncio.Event()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout_s)

    def _done(self, flow: http.HTTPFlow) -> None:
        conn = self._connections.get(flow.client_conn.id)
        if conn is not None:
            conn.release(flow.id)
            if flow.metadata.pop(_ANSWERED, False) and conn.options is not None:
                conn.options.answering -= 1
        flows = self._by_client.get(flow.client_conn.id)
        if flows is not None:
            flows.discard(flow.id)
            if not flows:
                del self._by_client[flow.client_conn.id]
        self._forget((flow.id,))

    def _forget(self, ids: Iterable[str]) -> None:
        self._inflight.difference_update(ids)
        if not self._inflight and self._idle is not None:
            self._idle.set()

    def client_connected(self, client: connection.Client) -> None:
        """Past ``limits.max_connections`` open, a new client connection is closed: each
        holds a descriptor the audit log and the state store need too."""
        if len(self._clients) >= self._max_connections:
            self._refused.inc()
            client.error = "too many connections open (limits.max_connections)"
            return
        self._clients.add(client.id)
        handler = self.proxyserver.connections.get(client.id) if self.proxyserver else None
        if handler is not None:
            self._connections[client.id] = _ClientConnection(handler, self._body_limit)

    def client_disconnected(self, client: connection.Client) -> None:
        """Whatever became of its requests, none of them is in flight any more."""
        self._clients.discard(client.id)
        conn = self._connections.pop(client.id, None)
        if conn is not None:
            conn.close()
        self._forget(self._by_client.pop(client.id, ()))

    # -- lifecycle ------------------------------------------------------------

    def running(self) -> None:
        """mitmproxy's servers are set up (or failed to be): tell the door."""
        server = self.proxyserver
        failures = [str(s.last_exception) for s in server.servers if s.last_exception]
        if self.started.done():
            return
        if failures or not server.listen_addrs():
            self.started.set_exception(
                ConfigError(f"transparent.listen: {'; '.join(failures) or 'not listening'}")
            )
        else:
            self.started.set_result([(str(a[0]), int(a[1])) for a in server.listen_addrs()])

    # -- connections ----------------------------------------------------------

    async def _allowed_address(self, host: str, port: int) -> str:
        """The address a tunnel to ``host`` goes to: the first it resolves to, once none
        of them is refused (the client may get any of them from its own resolver).

        Raises :class:`_Refused`, or ``OSError`` when ``host`` does not resolve.
        """
        addresses = await _resolve(host, port)
        if not addresses:
            raise OSError(f"{host} resolves to no address")
        for address in addresses:
            if self._rules.upstream_of(address) is not None:
                # Another name for a governed host (an alias): a tunnel would carry
                # its traffic undecided, and it cannot be governed under that name.
                raise _Refused(address, "governed (transparent.hosts)", governed=True)
            reason = _why_refused(address, self._private_allowed)
            if reason is not None:
                raise _Refused(address, reason)
        return addresses[0]

    async def _refuse_destination(self, flow: http.HTTPFlow, verdict: Verdict) -> bool:
        """Answer 403 when a tunnelled flow's destination is not allowed; whether it did.

        Checked here so that the client gets a clear answer; ``server_connect``
        checks again (and pins the address) whatever this said.
        """
        request = flow.request
        try:
            await self._allowed_address(request.host, request.port)
        except _Refused as exc:
            flow.response = _destination_refusal(verdict.host, exc.governed)
            log.warning(
                "refused %s to %s:%s from %s: %s",
                request.method,
                verdict.host,
                request.port,
                _peer(flow.client_conn),
                exc,
            )
            return True
        except OSError:
            pass  # does not resolve: server_connect blocks it, as the connection would fail
        return False

    async def http_connect(self, flow: http.HTTPFlow) -> None:
        """``CONNECT host:port`` (regular mode): refuse an unknown host when the rule is deny,
        a tunnelled one whose address is not allowed."""
        verdict = self._rules.classify((flow.request.host,))
        if verdict.kind is VerdictKind.DENY:
            flow.response = _refusal(verdict.host)
            CONNECTIONS.labels(_host_label(verdict.host), self._mode, "refused").inc()
            log.warning(
                "refused CONNECT to %s:%s from %s: not a governed host (unknown_hosts: deny)",
                verdict.host,
                flow.request.port,
                _peer(flow.client_conn),
            )
        elif verdict.kind is VerdictKind.TUNNEL and await self._refuse_destination(flow, verdict):
            CONNECTIONS.labels(_host_label(verdict.host), self._mode, "refused").inc()

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        """Decrypt governed hosts; pass a tunnelled host through without decrypting it."""
        verdict = self._rules.classify((data.client_hello.sni, _address_host(data.context.server)))
        if verdict.kind is VerdictKind.TUNNEL:
            data.ignore_connection = True
            CONNECTIONS.labels(_host_label(verdict.host), self._mode, "tunnelled").inc()
            address = data.context.server.address
            log.info(
                "tunnelled a connection to %s (%s) from %s, not decrypted",
                verdict.host,
                f"{address[0]}:{address[1]}" if address else "no address",
                _peer(data.context.client),
            )
            return
        # Governed, or refused: decrypted so that each request gets a clear 403.
        label = "intercepted" if verdict.kind is VerdictKind.GOVERN else "refused"
        CONNECTIONS.labels(_host_label(verdict.host), self._mode, label).inc()

    def tls_failed_client(self, data: tls.TlsData) -> None:
        """The client rejected Warden's certificate: pinning, or the CA is not trusted."""
        host = data.conn.sni or _address_host(data.context.server) or "unknown host"
        TLS_FAILURES.labels(_host_label(host), self._mode).inc()
        log.warning(
            "client %s rejected Warden's certificate for %s (%s): it does not trust the CA "
            "from `warden ca export`, or it pins the host's certificate. A pinning client "
            "cannot be governed in transparent mode: give it a base URL, or tunnel the host",
            _peer(data.conn),
            host,
            _error_kind(data.conn.error or "TLS handshake failed"),
        )

    async def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        """The last check before any connection leaves: Warden's listener, or a tunnel.

        A connection Warden decrypted (its client named a governed host, or one
        refused) may reach the listener only: plaintext the proxy cannot read as
        HTTP (a leading CRLF) would otherwise be relayed as raw bytes to the
        address the agent connected to, the real API, undecided. The client's
        name counts as well, for its server's is not known yet.

        A tunnel goes to an allowed address only, and to the very address
        checked: ``server.address`` is set to it, so that DNS cannot answer
        otherwise between the check and the connection (rebinding).
        """
        server = data.server
        address = server.address
        if (
            address is not None
            and (address[0], address[1]) == self._target
            and data.client.id in self._by_client
        ):
            return  # a governed request handed over (an agent's own CONNECT there is not)
        why = "not a tunnelled host"
        level = logging.WARNING
        try:
            client = data.client
            names = (server.sni, client.sni, address[0] if address else None)
            if (
                address is not None
                and self._rules.unknown is VerdictKind.TUNNEL
                and not client.tls_established
                and not self._rules.any_governed(names)
            ):
                host, port = str(address[0]), int(address[1])
                try:
                    pinned = await self._allowed_address(host, port)
                except _Refused as exc:
                    label = _host_label(normalize_host(host))
                    CONNECTIONS.labels(label, self._mode, "refused").inc()
                    why = str(exc)
                except OSError as exc:
                    why, level = f"{host} does not resolve: {exc}", logging.INFO
                else:
                    if server.sni is None and pinned != host:
                        server.sni = host  # the name, never the pinned address
                    server.address = (pinned, port)
                    return
        except Exception:  # mitmproxy goes on connecting after a hook that raised
            log.exception("could not check a connection; blocked")
        where = f"{address[0]}:{address[1]}" if address else "an unknown address"
        server.error = f"Warden opens no connection to {where} ({why})"
        log.log(level, "blocked a connection from %s: %s", _peer(data.client), server.error)

    # -- requests -------------------------------------------------------------

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        """Hand a governed request to the base-URL listener; refuse or pass the others."""
        await self._route(flow)
        conn = self._connections.get(flow.client_conn.id)
        if flow.response is not None and conn is not None and conn.options is not None:
            # Answered here: mitmproxy reads the body whole before answering, so it is
            # bounded (mitmproxy's limit) until the answer is out.
            flow.metadata[_ANSWERED] = True
            conn.options.answering += 1

    async def _route(self, flow: http.HTTPFlow) -> None:
        request = flow.request
        names = [flow.client_conn.sni, request.host]
        if not flow.client_conn.tls:
            names.append(request.pretty_host)  # plain HTTP: the Host header names it too
        verdict = self._rules.classify(names)
        if verdict.kind is VerdictKind.GOVERN:
            if self.stopping:
                # The base-URL listener may already be closed: a refusal the SDK retries,
                # not mitmproxy's HTML page for a hand-off that could not connect.
                flow.response = _stopping(self._families.get(verdict.upstream or "", ""))
                REQUESTS.labels(_host_label(verdict.host), self._mode, "refused").inc()
                return
            self._hand_over(flow, verdict)
            return
        if verdict.kind is VerdictKind.DENY or flow.client_conn.tls:
            # A decrypted connection whose request names no governed host never
            # leaves: the client gets a clear answer instead.
            flow.response = _refusal(verdict.host)
            REQUESTS.labels(_host_label(verdict.host), self._mode, "refused").inc()
            log.warning(
                "refused %s %s on %s: not a governed host",
                request.method,
                # A path can carry a secret too: a webhook's, a bot token (/bot<id>:<key>/).
                _path_head(request.path),
                verdict.host,
            )
            return
        # Plain HTTP to a tunnelled host: passed on as it is, never recorded, if its
        # address is allowed.
        if await self._refuse_destination(flow, verdict):
            REQUESTS.labels(_host_label(verdict.host), self._mode, "refused").inc()
            return
        # Warden's own headers (an agent's key or token, its context) are for Warden
        # alone: an HTTP stack that adds them to every request must not hand them out.
        for name in [n for n in request.headers if n.lower().startswith("x-warden-")]:
            del request.headers[name]
        request.stream = True
        REQUESTS.labels(_host_label(verdict.host), self._mode, "passed").inc()

    def _hand_over(self, flow: http.HTTPFlow, verdict: Verdict) -> None:
        request = flow.request
        assert verdict.upstream is not None
        try:
            path = handoff_path(verdict.upstream, request.path)
        except ValueError as exc:
            body = http_tool.problem(400, "invalid_request", "Invalid request", str(exc))
            flow.response = http.Response.make(
                400, body, {"Content-Type": http_tool.PROBLEM_CONTENT_TYPE}
            )
            return
        request.scheme = "http"
        request.host, request.port = self._target
        request.path = path
        # The agent's own value, if it sent one, is replaced: only this process can mark.
        request.headers[VIA_HEADER] = self._mark
        request.stream = True  # the body goes on as it arrives; the listener bounds it
        if (request.is_http2 or request.is_http3) and "content-length" not in request.headers:
            # HTTP/2 and 3 frame a body themselves. Over HTTP/1.1 to the listener it needs
            # framing of its own, or its bytes would be read as a request of their own.
            request.headers["transfer-encoding"] = "chunked"
        flow.metadata["warden_governed"] = verdict.host
        conn = self._connections.get(flow.client_conn.id)
        if conn is not None:
            conn.hold_idle_timer(flow.id)
        self._inflight.add(flow.id)
        self._by_client.setdefault(flow.client_conn.id, set()).add(flow.id)
        REQUESTS.labels(_host_label(verdict.host), self._mode, "governed").inc()

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        """Stream every answer: tool-aware rewriting already happened in the listener."""
        if flow.response is not None:
            flow.response.stream = True

    def response(self, flow: http.HTTPFlow) -> None:
        """The whole answer went out."""
        self._done(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        """The flow failed (the client went away, or the listener could not be reached)."""
        self._done(flow)
        if "warden_governed" in flow.metadata and flow.error is not None:
            log.warning(
                "governed request to %s failed in transparent mode: %s",
                flow.metadata["warden_governed"],
                _error_kind(flow.error.msg),
            )


# A bytes literal, to the end of the text if it is not closed.
_BYTES_LITERAL = re.compile(r"""\bb(?:'[^']*'?|"[^"]*"?)""")


def _error_kind(message: str) -> str:
    """What went wrong, without what mitmproxy's and h2's messages quote after a colon:
    the client's own bytes (``HTTP/2 protocol error: ... b'Bearer sk-...'``), headers
    and API keys included. A bytes literal before any colon is blanked too."""
    kind = message.partition(":")[0]
    return _BYTES_LITERAL.sub("b'...'", kind).strip() or "unknown error"


def _address_host(server: connection.Server) -> str | None:
    return str(server.address[0]) if server.address else None


def _peer(conn: connection.Connection) -> str:
    peer = conn.peername
    return f"{peer[0]}:{peer[1]}" if peer else "?"


def _loopback_target(url: str) -> tuple[str, int]:
    """Where mitmproxy reaches the base-URL listener: its address, loopback if unspecified."""
    parts = urlsplit(url)
    if parts.hostname is None or parts.port is None:
        raise ConfigError(f"the base-URL listener has no address to hand over to ({url!r})")
    host = parts.hostname
    with contextlib.suppress(ValueError):
        ip = ipaddress.ip_address(host)
        if ip.is_unspecified:  # listening everywhere: reach it on loopback
            host = "::1" if ip.version == 6 else "127.0.0.1"
    return host, parts.port


# TlsConfig options that would make mitmproxy read (or generate) a CA of its own.
_CA_OPTIONS = frozenset(
    {"certs", "confdir", "key_size", "cert_passphrase", "emudhra", "emudhra_old"}
)


class _WardenTls(tlsconfig.TlsConfig):
    """mitmproxy's TLS addon with Warden's CA: never generated or reloaded by mitmproxy."""

    def __init__(self, store: certs.CertStore) -> None:
        super().__init__()
        self.certstore = store

    def configure(self, updated: set[str]) -> None:
        cast(Any, super()).configure(set(updated) - _CA_OPTIONS)


class TransparentDoor:
    """mitmproxy on ``transparent.listen``, handing governed flows to the base-URL listener.

    ``handoff_url`` returns the base-URL listener's URL; it is read when the
    door starts, so the HTTP door must have started first (the server starts
    doors in order and stops them in reverse: this one stops first).
    """

    name = "transparent"

    def __init__(
        self, config: Config, handoff_url: Callable[[], str], *, shutdown_grace_s: float
    ) -> None:
        if config.transparent is None or config.transparent.listen is None:
            raise ConfigError("transparent.listen is not set")
        self._cfg: TransparentConfig = config.transparent
        self._listen: str = config.transparent.listen
        # A body mitmproxy reads whole (a refused request's) is bounded: what the
        # listener would take at most, the request limit or the upstream answer limit.
        # Governed ones are streamed to the listener, which bounds them itself.
        self._body_limit = max(config.limits.max_body_bytes, MAX_UPSTREAM_BODY)
        self._max_connections = config.limits.max_connections
        self._families = {name: u.protocol for name, u in config.upstreams.items()}
        self._idle_timeout_s = config.limits.idle_timeout_s
        self._handoff_url = handoff_url
        self._grace_s = shutdown_grace_s
        self._master: Any = None
        self._task: asyncio.Task[None] | None = None
        self._addon: GoverningAddon | None = None
        self._stopping = False
        self.address = ""
        """``host:port`` mitmproxy listens on, once started."""

    @property
    def ready(self) -> bool:
        """Listening, and mitmproxy still running."""
        return (
            bool(self.address)
            and not self._stopping
            and self._task is not None
            and not self._task.done()
        )

    def status(self) -> Mapping[str, Any]:
        """For ``/readyz``."""
        return {
            "ready": self.ready,
            "listen": self.address,
            "mode": self._cfg.mode,
            "unknown_hosts": self._cfg.unknown_hosts,
        }

    async def start(self, core: Governor) -> None:
        """Start mitmproxy on this event loop; return once it listens (or raise why not).

        ``core`` is not called here: governed requests reach it through the
        base-URL listener, which records them with ``request.door: transparent``.
        """
        del core
        mitm_log = logging.getLogger("mitmproxy")
        if mitm_log.level == logging.NOTSET:
            # One line per client and server connection at info: too much for a proxy.
            mitm_log.setLevel(logging.WARNING)
        store = await asyncio.to_thread(transparent_ca.load_store, self._cfg)
        host, port = parse_listen(self._listen)
        addon = GoverningAddon(
            HostRules(self._cfg.hosts, self._cfg.unknown_hosts),
            _loopback_target(self._handoff_url()),
            self._cfg.mode,
            private_allowed=self._cfg.tunnel_private_networks,
            max_connections=self._max_connections,
            families=self._families,
            body_limit=self._body_limit,
        )
        if self._cfg.unknown_hosts == "tunnel" and not (
            _bind_tells("192.0.2.1") and _bind_tells("2001:db8::1")
        ):
            log.warning(
                "transparent mode: this host lets a socket bind any address "
                "(ip_nonlocal_bind), so Warden cannot tell its own addresses: a tunnel to one "
                "of its public or (with tunnel_private_networks) private addresses is not "
                "refused; loopback and link-local ones still are"
            )
        self._addon = addon
        shown = f"[{host}]" if ":" in host else host
        spec = f"{self._cfg.mode}@{shown}:{port}"
        try:
            self._master = self._build_master(spec, store, addon)
        except Exception as exc:  # mitmproxy's OptionsError: e.g. a mode this OS lacks
            raise ConfigError(f"transparent.mode {self._cfg.mode}: {exc}") from None
        self._task = tasks.spawn(self._serve(self._master), name="transparent-mitmproxy")
        try:
            addrs = await asyncio.wait_for(asyncio.wrap_future(addon.started), _START_TIMEOUT_S)
        except BaseException:
            await self.stop()
            raise
        bound_host, bound_port = addrs[0]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        self.address = f"{shown}:{bound_port}"
        log.info(
            "transparent mode (%s) listening on %s; unknown hosts: %s",
            self._cfg.mode,
            self.address,
            self._cfg.unknown_hosts,
        )

    def _build_master(self, spec: str, store: certs.CertStore, addon: GoverningAddon) -> Any:
        options = Options(
            mode=[spec],
            confdir=self._cfg.ca_dir,  # also where the wireguard mode keeps its keys
            upstream_cert=False,
            http3=False,
        )
        master: Any = Master(options)
        # mitmproxy routes every log record of the process through its loop for a
        # deprecated hook; Warden's logging already has them.
        master._legacy_log_events.uninstall()
        server = cast(Any, proxyserver.Proxyserver)()
        addon.proxyserver = server
        master.addons.add(
            mitm_core.Core(),
            server,
            next_layer.NextLayer(),
            _WardenTls(store),
            disable_h2c.DisableH2C(),
            addon,
        )
        # Never connect before a request says where: governed hosts go to Warden only.
        cast(Any, options).update(
            # An idle client holds a place under the cap: as long as at the other listeners,
            # between requests only (the addon holds the timer off while one is answered).
            tcp_timeout=max(1, math.ceil(self._idle_timeout_s)),
            connection_strategy="lazy",
            store_streamed_bodies=False,
            body_size_limit=str(self._body_limit),
        )
        return master

    async def _serve(self, master: Any) -> None:
        """``Master.run`` without its loop-wide settings (an eager task factory and an
        exception handler), which would change how Warden's own tasks run."""
        addon = self._addon
        assert addon is not None
        try:
            await addon.proxyserver.setup_servers()
            await master.running()  # the addon learns what was bound
            await master.should_exit.wait()
        except BaseException as exc:
            if not addon.started.done():
                addon.started.set_exception(ConfigError(f"transparent mode failed to start: {exc}"))
            raise
        finally:
            await master.done()

    async def stop(self) -> None:
        """Stop listening; let handed-over requests finish (up to the grace period); stop."""
        self._stopping = True
        if self._addon is not None:
            self._addon.stopping = True
        task, master = self._task, self._master
        if task is None:
            return
        if master is not None and not task.done():
            await self._drain(master)
        with contextlib.suppress(Exception):
            await task  # its failure was logged by warden.tasks
        self._task = None
        self.address = ""

    async def _drain(self, master: Any) -> None:
        """Close the listening sockets, wait for governed requests, end the rest."""
        addon = self._addon
        if addon is not None and addon.proxyserver is not None:
            try:
                await addon.proxyserver.servers.update([])
            except Exception:
                log.exception("transparent mode: closing the listener failed")
            await addon.drained(self._grace_s)
            await _close_connections(addon.proxyserver)
        master.shutdown()


async def _close_connections(server: Any) -> None:
    """End the connections still open (idle keep-alives, tunnels) so that each
    connection task finishes on its own before mitmproxy's loop ends."""
    handlers = []
    for connection_handler in list(server.connections.values()):
        io = connection_handler.transports.get(connection_handler.client)
        if io is not None and io.handler is not None and not io.handler.done():
            io.handler.cancel("Warden is stopping")
            handlers.append(io.handler)
    if handlers:
        await asyncio.wait(handlers, timeout=_CLOSE_TIMEOUT_S)
    # Each connection task now runs its disconnect hooks; give them a few turns.
    for _ in range(_CLOSE_TURNS):
        if not server.connections:
            return
        await asyncio.sleep(0)
