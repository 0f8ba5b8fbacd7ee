"""Envoy ext_proc for LLM traffic: govern model responses inside a mesh, no base URL changed.

Envoy opens one ``envoy.service.ext_proc.v3.ExternalProcessor/Process``
stream per HTTP request and sends, in order, the request headers, the request
body, the response headers and the response body. This door only converts
those messages; the decisions are the core's (:class:`~warden.core.Governor`),
made exactly as the base-URL proxy (:mod:`warden.ingress.http`) makes them:

* request headers: ``:authority`` names the upstream (its ``base_url`` host,
  or ``ext_proc.hosts``); ``:method`` and ``:path`` find the route on the same
  allowlist; the agent is proved by :class:`~warden.identity.Identity`.
  Warden's own headers (``x-warden-*``, credentials included) are removed
  before the request goes on;
* request body: the adapter reads it (model, stream flag, tool results sent
  back, which are recorded), then the request-stage ``llm_call`` is decided;
  a refusal is an immediate response in the provider's error shape;
* response headers: the decision id goes into ``x-warden-decision-id``;
* response body: a whole JSON body is parsed, all its calls decided and the
  body rewritten (``content-length`` set to the new length); an SSE stream
  runs through the one :class:`~warden.protocols.driver.StreamDriver`, so text
  flows at once and a call's bytes are held until it is decided.

Body modes: ``BUFFERED`` and ``STREAMED`` get one answer per message, each
chunk replaced by what may go out so far (held bytes leave in a later
chunk's answer); ``FULL_DUPLEX_STREAMED`` (when Envoy reports it in
``protocol_config``) gets ``streamed_response`` chunks as they are released.

It fails closed. An authority naming no upstream, a route Warden does not
parse, a body it cannot parse, a body mode it cannot govern and a message out
of order all end in an immediate response in the provider's error shape (or,
once an SSE stream is under way, the provider's error event and nothing more
of the stream). The stream is never just closed: Envoy would then let the
rest through unexamined.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import parse_qsl, urlsplit

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import duration_pb2
from multidict import CIMultiDict

from warden import tasks
from warden.budgets.prices import OutputBounds, PriceTable
from warden.config import Config, UpstreamConfig
from warden.core import Governor, Turn
from warden.credentials import Credentials
from warden.errors import (
    BodyTooLarge,
    ConfigError,
    Forbidden,
    InvalidJSON,
    Overloaded,
    RequestError,
    StreamViolation,
    UnsupportedMedia,
    UpstreamProtocol,
    UpstreamRedirect,
    WardenError,
)
from warden.identity import Identity
from warden.ingress import headers as hdr
from warden.ingress.grpc import KEYS_REFUSED, told_keys
from warden.ingress.http import decode_path, not_governed
from warden.ingress.upstream_io import MAX_UPSTREAM_BODY
from warden.killswitch import KillSwitches
from warden.model import (
    Action,
    ActionKind,
    CallSize,
    Decision,
    Effect,
    Mode,
    Outcome,
    RequestMeta,
    Stage,
    Usage,
    new_id,
    request_sha256,
)
from warden.ops import metrics
from warden.protocols import _wire, metered
from warden.protocols.base import Adapter, bounded, response_id
from warden.protocols.driver import StreamDriver
from warden.protocols.errors import render_error, render_stream_error
from warden.protocols.registry import (
    PassthroughRule,
    RouteMatch,
    base_segments,
    deployment_named,
    match_route,
    past_base,
)
from warden.protocols.sse import SseTooLarge
from warden.sessions import conversation_of, door_conversation, stored_answer_conversation

__all__ = [
    "SERVICE_NAME",
    "UPSTREAM_METADATA",
    "ExtProcService",
    "UnknownUpstream",
    "UpstreamHosts",
    "authority_host",
    "header_map",
    "header_mutation",
    "immediate_response",
]

log = logging.getLogger("warden.ext_proc")

SERVICE_NAME = "envoy.service.ext_proc.v3.ExternalProcessor"
UPSTREAM_METADATA = "x-warden-upstream"
"""The gRPC metadata key in which Envoy's route names its upstream (``upstream_from: route``).
It travels on Envoy's own stream to Warden, not in the agent's request."""

_Mode = processing_mode_pb2.ProcessingMode
_JSON = "application/json"
_SSE = "text/event-stream"
_LLM_FAMILIES = frozenset({"openai", "anthropic"})
# Body modes in which Envoy might let part of a body past Warden unexamined.
_UNGOVERNABLE_MODES = {
    _Mode.NONE: "NONE",
    _Mode.BUFFERED_PARTIAL: "BUFFERED_PARTIAL",
    _Mode.GRPC: "GRPC",
}

Send = Callable[[pb.ProcessingResponse], Awaitable[None]]


class UnknownUpstream(WardenError):
    """``:authority`` names no configured upstream: nothing is let through (fail closed)."""

    code = "unknown_upstream"
    status = 403


class _Denied(WardenError):
    """The request-stage decision did not allow the model call."""

    code = "denied"
    status = 403

    def __init__(self, decision: Decision) -> None:
        super().__init__(
            f"Warden denied this request: {decision.reason} (decision {decision.decision_id})"
        )
        self.decision_id = decision.decision_id


class _OutOfOrder(WardenError):
    """Envoy sent a message this exchange cannot take now (or a body mode it cannot govern)."""

    code = "ext_proc_protocol"
    status = 502


# -- pure helpers ------------------------------------------------------------


def authority_host(authority: str) -> str:
    """The host of an ``:authority`` value: lower case, without port or trailing dot."""
    value = authority.strip().lower()
    if value.startswith("["):  # an IPv6 literal: [::1]:8080
        end = value.find("]")
        return value[1:end] if end > 0 else value
    host, _, port = value.rpartition(":")
    if host and port.isdigit():
        value = host
    return value.rstrip(".")


def header_map(
    headers: Any, *, error: type[RequestError | UpstreamProtocol] = RequestError
) -> CIMultiDict[str]:
    """Envoy's ``HeaderMap`` as a case-insensitive multidict (a repeated header stays repeated).

    Envoy sends values in ``raw_value`` (older versions in ``value``). A value
    that is not UTF-8 raises ``error`` (the agent's request by default; the
    upstream's answer passes :class:`UpstreamProtocol`): it would be read one
    way here and another way by the other side.
    """
    out: CIMultiDict[str] = CIMultiDict()
    for entry in headers.headers:
        raw: bytes = entry.raw_value
        try:
            value = raw.decode("utf-8") if raw else entry.value
        except UnicodeDecodeError:
            raise error(f"header {entry.key!r} is not UTF-8") from None
        out.add(entry.key, value)
    return out


def header_mutation(
    set_headers: Mapping[str, str] | None = None, remove: Iterable[str] = ()
) -> Any:
    """A ``HeaderMutation`` that overwrites ``set_headers`` and removes ``remove``."""
    mutation = pb.HeaderMutation(remove_headers=sorted(set(remove)))
    for name, value in (set_headers or {}).items():
        mutation.set_headers.append(
            base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(key=name.lower(), raw_value=value.encode()),
                append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
            )
        )
    return mutation


def immediate_response(
    family: str,
    status: int,
    code: str,
    message: str,
    *,
    decision_id: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> Any:
    """An ``ImmediateResponse``: the provider's error body, so the agent's SDK raises as usual."""
    headers = {"content-type": _JSON, **(headers or {})}
    if decision_id is not None:
        headers[hdr.DECISION_HEADER] = decision_id
    return pb.ProcessingResponse(
        immediate_response=pb.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=status),
            headers=header_mutation(headers),
            body=render_error(family, status, code, message),
            details=f"warden_{code}",
        )
    )


class UpstreamHosts:
    """Which configured upstream an ``:authority`` names.

    ``ext_proc.hosts`` maps a host to an upstream by name; any other host must
    be the host of exactly one upstream's ``base_url``. Everything else is
    refused: Warden never lets traffic for a host it does not know through.
    """

    def __init__(self, config: Config) -> None:
        upstreams = config.upstreams
        by_host: dict[str, list[str]] = {}
        for name, upstream in upstreams.items():
            host = urlsplit(upstream.base_url).hostname
            if host:
                by_host.setdefault(authority_host(host), []).append(name)
        self._by_host = {host: tuple(names) for host, names in by_host.items()}
        self._overrides: dict[str, str] = {}
        for host, name in config.ext_proc.hosts.items():
            if name not in upstreams:
                known = ", ".join(sorted(upstreams)) or "none"
                raise ConfigError(
                    f"ext_proc.hosts.{host}: no upstream named {name!r} (configured: {known})"
                )
            self._overrides[authority_host(host)] = name
        self._upstreams = upstreams

    def named(self, name: str | None) -> tuple[str, UpstreamConfig]:
        """The upstream Envoy's route names (``upstream_from: route``); raises
        :class:`UnknownUpstream`."""
        if name is None:
            raise UnknownUpstream(
                f"Envoy named no upstream for this route: set gRPC metadata {UPSTREAM_METADATA}"
                " in the route's ExtProcPerRoute overrides.grpc_initial_metadata"
                " (ext_proc.upstream_from: route)"
            )
        upstream = self._upstreams.get(name)
        if upstream is None:
            known = ", ".join(sorted(self._upstreams)) or "none"
            raise UnknownUpstream(
                f"Envoy's route names upstream {name[:64]!r}, which is not configured"
                f" (configured: {known})"
            )
        return name, upstream

    def resolve(self, authority: str) -> tuple[str, UpstreamConfig]:
        """The upstream's name and settings; raises :class:`UnknownUpstream`."""
        host = authority_host(authority)
        name = self._overrides.get(host)
        if name is None:
            names = self._by_host.get(host, ())
            if len(names) > 1:
                raise UnknownUpstream(
                    f"host {host!r} is the base_url host of upstreams {', '.join(names)}; "
                    "name one in ext_proc.hosts"
                )
            if not names:
                raise UnknownUpstream(
                    f"host {host!r} matches no upstream's base_url and is not in ext_proc.hosts"
                )
            name = names[0]
        return name, self._upstreams[name]


# -- the service ---------------------------------------------------------------


class ExtProcService:
    """``envoy.service.ext_proc.v3.ExternalProcessor`` on the gRPC listener.

    One gRPC stream per HTTP request; each is converted and decided through
    ``core``, as the base-URL proxy decides its requests.
    """

    service_names: tuple[str, ...] = (SERVICE_NAME,)

    def __init__(
        self,
        core: Governor,
        config: Config,
        *,
        killswitches: KillSwitches | None = None,
        credentials: Credentials | None = None,
        prices: PriceTable | None = None,
    ) -> None:
        """``credentials``: upstream keys Warden holds; Envoy is told to send them instead
        of the agent's (:mod:`warden.credentials`). ``prices``: the budget guard's price
        table (``None``: ``prices.file`` is read)."""
        self.core = core
        self.config = config
        self.killswitches = killswitches
        self.credentials = credentials if credentials is not None else Credentials.none()
        self.identity = Identity(config)
        self.hosts = UpstreamHosts(config)
        self.passthrough = {
            name: tuple(PassthroughRule.parse(spec) for spec in upstream.passthrough)
            for name, upstream in config.upstreams.items()
        }
        self.bounds = OutputBounds(
            config.budgets.llm, prices or PriceTable.load(config.prices.file)
        )
        self._open = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def add_to(self, server: grpc.aio.Server) -> None:
        """Register the ext_proc servicer on ``server``."""
        pb_grpc.add_ExternalProcessorServicer_to_server(_Servicer(self), server)

    async def close(self) -> None:
        """Wait, up to ``shutdown_grace_s``, for the HTTP exchanges in flight to finish."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), self.config.shutdown_grace_s)

    async def process(
        self,
        requests: AsyncIterable[Any],
        send: Send,
        route_upstream: str | None = None,
        *,
        keys: bool = False,
    ) -> None:
        """Serve one ext_proc stream: read Envoy's messages, ``send`` the answers.

        ``route_upstream``: the upstream Envoy's route named in the stream's metadata.
        ``keys``: the caller proved it is an Envoy that may be told the upstream keys
        Warden holds (``grpc.envoy_peers``); a request to such an upstream from any
        other caller is refused.
        """
        self._open += 1
        self._idle.clear()
        metrics.INFLIGHT.inc()
        try:
            await _Exchange(self, send, route_upstream, keys).run(requests)
        finally:
            metrics.INFLIGHT.dec()
            self._open -= 1
            if self._open == 0:
                self._idle.set()


class _Servicer(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    """The generated servicer base, bound to one :class:`ExtProcService`."""

    def __init__(self, service: ExtProcService) -> None:
        self._service = service

    async def Process(
        self, request_iterator: AsyncIterable[Any], context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        named = [v for k, v in context.invocation_metadata() or () if k == UPSTREAM_METADATA]
        try:
            # Given twice, it names none: the stream is refused like one naming none.
            upstream = named[0] if len(named) == 1 and isinstance(named[0], str) else None
            keys = told_keys(context, self._service.config.grpc)
            await self._service.process(request_iterator, context.write, upstream, keys=keys)
        except _Abort as abort:
            await context.abort(abort.status, abort.details)


class _Abort(Exception):
    """End the gRPC stream with an error status: Envoy then fails the HTTP request (500)."""

    def __init__(self, status: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.status = status
        self.details = details


# -- one HTTP request ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Route:
    name: str
    upstream: UpstreamConfig
    path: str
    """The decoded path without query, as policies see it (``input.action.request.path``)."""
    query: str
    match: RouteMatch
    base: int = 0
    """How many of the path's first segments are the upstream's base path."""

    @property
    def family(self) -> str:
        return self.upstream.protocol

    @property
    def deployment(self) -> str | None:
        """The deployment an Azure-style path names: the model that runs."""
        segments = self.path.split("/")[1:]
        return deployment_named(
            self.upstream.protocol, segments[self.base :], segments[: self.base]
        )


@dataclass(frozen=True, slots=True)
class _BodyModes:
    """The body modes Envoy reported in ``protocol_config`` (``None``: it did not say)."""

    request: int | None = None
    response: int | None = None


class _Exchange:
    """The state of one ext_proc stream: one HTTP request and its response.

    Messages are handled in the order Envoy sends them; each phase accepts
    only what may come next. After an immediate response Envoy ignores the
    stream, so the exchange ends.
    """

    def __init__(
        self, service: ExtProcService, send: Send, route_upstream: str | None, keys: bool
    ) -> None:
        self._svc = service
        self._answer = send
        self._route_upstream = route_upstream
        self._keys = keys
        self._timer: asyncio.TimerHandle | None = None  # asks Envoy for more time when it fires
        self._extension: asyncio.Task[None] | None = None  # override_message_timeout going out
        self._core = service.core
        self._modes = _BodyModes()
        self._family = "openai"
        self._upstream_name = "_unknown"
        self._route: _Route | None = None
        self._headers: CIMultiDict[str] = CIMultiDict()
        self._turn: Turn | None = None
        self._adapter: Adapter | None = None
        self._stream = False
        self._size: CallSize | None = None
        self._hide_usage = False
        self._action: Action | None = None
        self._decision: Decision | None = None
        self._phase = "request_headers"
        self._body = bytearray()
        self._chunks = 0
        self._status = 0
        self._sent_at = 0.0
        self._governed = False  # the response body goes through the adapter
        self._metering = False  # the response body is read for its usage (embeddings)
        self._sse = False
        self._driver: StreamDriver | None = None
        self._out = bytearray()  # what the driver released for the current chunk's answer
        self._cut = False  # an SSE stream was ended with an error event: drop the rest
        self._error: str | None = None
        self._usage: Usage | None = None
        self._reply_status: int | None = None  # an immediate response's status
        self._recorded = False
        self._added_s = 0.0
        self._done = False

    # -- loop --------------------------------------------------------------------

    async def run(self, requests: AsyncIterable[Any]) -> None:
        try:
            async for message in requests:
                started = time.perf_counter()
                self._timer = self._arm_extension(message)
                try:
                    await self._handle(message)
                except WardenError as exc:
                    await self._refuse(exc)
                except _Abort:
                    raise
                except Exception:
                    log.exception("internal error in an ext_proc stream")
                    await self._refuse(WardenError("Warden internal error"))
                finally:
                    if self._timer is not None:
                        self._timer.cancel()
                    self._timer = self._extension = None
                    self._added_s += time.perf_counter() - started
                if self._done:
                    return
            if self._phase != "done" and self._decision is not None:
                # Envoy ended the stream first: the agent went away.
                self._error = self._error or "client_disconnected"
        except asyncio.CancelledError:
            self._error = self._error or "client_disconnected"
            raise
        finally:
            self._record()

    def _arm_extension(self, message: Any) -> asyncio.TimerHandle | None:
        """Ask Envoy for more time if the answer to ``message`` is slow to come.

        Only with ``ext_proc.max_message_timeout_s``, and only where one answer
        is due per message: Envoy times each message (``message_timeout``), and
        a tool call held for a person outlasts it. A full-duplex body is
        answered in its own rhythm, and so is not timed.
        """
        config = self._svc.config.ext_proc
        if config.max_message_timeout_s is None:
            return None
        kind = message.WhichOneof("request")
        if kind == "request_body" and self._full_duplex(self._modes.request):
            return None
        if kind == "response_body" and self._full_duplex(self._modes.response):
            return None
        loop = asyncio.get_running_loop()
        return loop.call_later(config.extend_after_ms / 1000, self._extend)

    def _extend(self) -> None:
        """Send ``override_message_timeout`` now; the answer waits for it (Envoy reads in order)."""
        limit = self._svc.config.ext_proc.max_message_timeout_s
        assert limit is not None
        self._timer = None
        timeout = duration_pb2.Duration()
        timeout.FromNanoseconds(round(limit * 1e9))
        metrics.EXT_PROC_EXTENSIONS.inc()
        self._extension = tasks.spawn(
            self._write(pb.ProcessingResponse(override_message_timeout=timeout)),
            name="ext-proc-extension",
            awaited=True,
        )

    async def _write(self, response: Any) -> None:
        await self._answer(response)

    async def _send(self, response: Any) -> None:
        """Send one answer to Envoy, after the extension asked for it, if one is going out."""
        if self._timer is not None:  # the answer is ready: no extension after it
            self._timer.cancel()
            self._timer = None
        extension, self._extension = self._extension, None
        if extension is not None:
            await extension
        await self._answer(response)

    async def _handle(self, message: Any) -> None:
        if message.observability_mode:
            # Envoy ignores every answer in observability mode: nothing could be enforced.
            raise _Abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "Warden governs traffic; ext_proc observability_mode cannot enforce decisions",
            )
        kind = message.WhichOneof("request")
        if message.HasField("protocol_config"):
            config = message.protocol_config
            self._modes = _BodyModes(config.request_body_mode, config.response_body_mode)
        if kind == "request_headers" and self._phase == "request_headers":
            await self._request_headers(message.request_headers)
        elif kind == "request_body" and self._phase == "request_body":
            await self._request_body(message.request_body)
        elif kind == "request_trailers" and self._phase == "request_body":
            await self._request_trailers()
        elif kind == "response_headers" and self._phase == "response_headers":
            await self._response_headers(message.response_headers)
        elif kind == "response_headers" and self._phase == "request_body":
            route = self._route
            assert route is not None
            if _reads_request(route.match):
                raise self._not_configured("request_body_mode", "the request body never came")
            await self._response_headers(message.response_headers)
        elif kind == "response_body" and self._phase == "response_body":
            await self._response_body(message.response_body.body, message.response_body)
        elif kind == "response_trailers" and self._phase == "response_body":
            await self._response_trailers()
        else:
            raise _OutOfOrder(
                f"ext_proc sent {kind} while Warden expected {self._phase.replace('_', ' ')}"
            )

    # -- request -----------------------------------------------------------------

    async def _request_headers(self, message: Any) -> None:
        headers = header_map(message.headers)
        self._headers = headers
        route = self._resolve_route(headers)
        self._route = route
        self._family, self._upstream_name = route.family, route.name
        agent = await self._svc.identity.resolve(headers)
        limit = self._svc.config.limits.max_body_bytes
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise BodyTooLarge(f"request body is over limits.max_body_bytes ({limit} bytes)")
        self._adapter = route.match.adapter
        # A stored (background) answer fetched by id: in the conversation that asked
        # for it, as through the base URL; a model request's is read with its body.
        # Any other request Warden does not read still names its session (input.session).
        answer = route.match.stored_answer_id(route.path.split("/")[1:])
        conversation = (
            stored_answer_conversation(headers, answer) if answer else door_conversation(headers)
        )
        self._turn = Turn(
            agent=agent,
            request=RequestMeta(
                method=headers.get(":method", ""),
                upstream=route.name,
                path=route.path,
                headers=hdr.recordable(headers),
                conversation=conversation,
            ),
            context=hdr.context_from(headers),
        )
        # Warden's own headers (credentials included) are for Warden alone, and the
        # body must come back unencoded for the adapter to read it.
        strip = {name.lower() for name in headers if name.lower().startswith("x-warden-")}
        strip.add("accept-encoding")
        held = self._svc.credentials.get(route.name)
        put: dict[str, str] = {}
        if held is not None and not self._keys:
            raise Forbidden(KEYS_REFUSED.format(upstream=route.name))
        if held is not None:
            # Warden's key in place of the agent's: its header overwritten, the others
            # that could carry or steer one removed (never the one being set).
            put[held.header] = held.value
            strip |= held.drop - {held.header.lower()}
        answer = pb.ProcessingResponse(
            request_headers=pb.HeadersResponse(
                response=pb.CommonResponse(header_mutation=header_mutation(put, remove=strip))
            )
        )
        self._check_modes(route)
        if _reads_request(route.match):
            if message.end_of_stream:
                raise InvalidJSON("request body must be a JSON object")
            self._phase = "request_body"
            await self._send(answer)
            return
        if route.match.stream_query:
            self._stream = any(
                key == "stream" and value.strip().lower() in ("true", "1")
                for key, value in parse_qsl(route.query, keep_blank_values=True)
            )
        # A body follows that Warden does not read: no approval can name it, so none
        # granted for this request lets another through (a held one still goes on).
        await self._decide_request(None if not message.end_of_stream else b"")
        self._phase = "response_headers" if message.end_of_stream else "request_body"
        await self._send(answer)

    def _resolve_route(self, headers: CIMultiDict[str]) -> _Route:
        if self._svc.config.ext_proc.upstream_from == "route":
            name, upstream = self._svc.hosts.named(self._route_upstream)
        else:
            name, upstream = self._svc.hosts.resolve(headers.get(":authority", ""))
        self._family, self._upstream_name = upstream.protocol, name
        if upstream.protocol not in _LLM_FAMILIES:
            raise UnknownUpstream(
                f"upstream {name!r} is a {upstream.protocol} upstream; ext_proc governs LLM "
                "upstreams only (use ext_authz for tool APIs)"
            )
        method = headers.get(":method", "")
        target = headers.get(":path", "")
        if not target.startswith("/"):
            raise RequestError("ext_proc request has no origin-form :path")
        raw_path, _, query = target.partition("?")
        segments = decode_path(raw_path)
        # Envoy's :path is the provider's whole path; the base-URL proxy's tail never
        # carries the upstream's base path (a gateway's own), so neither does the match.
        tail = past_base(segments, base_segments(upstream.base_url))
        passthrough = self._svc.passthrough[name]
        match = match_route(upstream.protocol, method, tail, passthrough)
        if match is None and len(tail) < len(segments):
            # A base path that holds part of a route (Azure's openai/deployments/<name>),
            # or passthrough patterns written for the whole path: read it whole.
            tail = segments
            match = match_route(upstream.protocol, method, tail, passthrough)
        if match is None:
            raise not_governed(name, method, tail, upstream.protocol)
        return _Route(
            name, upstream, "/" + "/".join(segments), query, match, base=len(segments) - len(tail)
        )

    async def _request_body(self, message: Any) -> None:
        route = self._route
        assert route is not None
        if not _reads_request(route.match):
            # Forwarded unread, as the base-URL proxy forwards it.
            await self._pass_body("request_body", message.body, message.end_of_stream)
            if message.end_of_stream:
                self._phase = "response_headers"
            return
        self._take(message.body, self._svc.config.limits.max_body_bytes, BodyTooLarge)
        if not message.end_of_stream:
            await self._hold("request_body")
            return
        await self._finish_request_body()

    async def _request_trailers(self) -> None:
        route = self._route
        assert route is not None
        if _reads_request(route.match):
            if not self._full_duplex(self._modes.request):
                # A trailers answer cannot carry the held body: refuse rather than lose it.
                raise RequestError("request trailers are not supported on governed routes")
            await self._finish_request_body(eos=False)
        self._phase = "response_headers"
        await self._send(pb.ProcessingResponse(request_trailers=pb.TrailersResponse()))

    async def _finish_request_body(self, *, eos: bool = True) -> None:
        route = self._route
        assert route is not None
        if route.match.metered:
            await self._finish_metered_request(eos=eos)
            return
        adapter = self._adapter
        turn = self._turn
        assert adapter is not None
        assert turn is not None
        body = bytes(self._body)
        declared = self._headers.get("content-type", "")
        content_type = declared.partition(";")[0].strip().lower()
        if content_type != _JSON:
            raise UnsupportedMedia(
                f"expected Content-Type application/json, got {content_type or 'none'!r}"
            )
        _wire.utf8_only(declared)
        parsed_body = _wire.request_object(body)
        parsed = adapter.parse_request(parsed_body)
        self._stream = parsed.stream
        self._size = CallSize(
            len(body), parsed.max_output_tokens, parsed.choices, parsed.rate, 0, parsed.continued
        )
        conversation = conversation_of(
            adapter.name, parsed_body, self._headers, self._svc.config.sessions
        )
        self._turn = turn = Turn(
            agent=turn.agent,
            # Hosted tools (input.request.tools) and history, as the base-URL door reads them.
            request=dataclasses.replace(
                turn.request, conversation=conversation, tools=parsed.tools
            ),
            context=turn.context,
            model=route.deployment or parsed.model,
            declared=parsed.arguments,
        )
        self._core.record_results(turn.agent, parsed.tool_results)
        prepared = adapter.prepare_request(parsed_body)
        if prepared is not None:
            self._hide_usage = True
        unbounded = prepared if prepared is not None else parsed_body
        # Observe mode enforces no cap: a shadow run sends the request as written.
        enforced = self._svc.config.mode_for(turn.agent.id) is Mode.ENFORCE
        sent_body, bound, hosted = bounded(
            adapter,
            unbounded,
            parsed,
            self._svc.bounds.written(route.family, turn.model) if enforced else None,
            self._svc.bounds.tool_calls if enforced else None,
        )
        if sent_body is not unbounded:
            prepared = dict(sent_body)  # held at the bounds written in: sent with them
        self._size = dataclasses.replace(self._size, max_output_tokens=bound, hosted_calls=hosted)
        await self._decide_request(body)
        outgoing = prepared if prepared is not None else parsed_body
        continued = self._core.continued(turn, adapter, outgoing)
        if continued is not None:
            outgoing = continued
        # What was decided on is what is sent (a key given twice, once), as through the
        # base URL: unless Warden's encoding is the agent's byte for byte, sent whole.
        sent = _wire.request_bytes(outgoing)
        if sent != body:
            body, prepared = sent, outgoing
        self._phase = "response_headers"
        self._body.clear()
        chunks, self._chunks = self._chunks, 0
        if self._full_duplex(self._modes.request):
            await self._send(_streamed("request_body", body, eos=eos))
            return
        if prepared is None and chunks == 1:
            await self._send(_body_answer("request_body"))  # the one chunk, unchanged
            return
        # Earlier chunks were cleared: this answer carries the whole body. In
        # BUFFERED mode Envoy keeps content-length and requires it to match.
        await self._send(
            _body_answer(
                "request_body",
                body,
                headers=header_mutation({"content-length": str(len(body))}),
            )
        )

    async def _finish_metered_request(self, *, eos: bool) -> None:
        """A metered request (embeddings): the model and size its hold needs, then on as sent."""
        turn = self._turn
        assert turn is not None
        body = bytes(self._body)
        route = self._route
        assert route is not None
        model, self._size = metered.metered_request(
            body, route.deployment, self._headers.get("content-type", "")
        )
        self._turn = dataclasses.replace(turn, model=model)
        await self._decide_request(body)
        self._phase = "response_headers"
        self._body.clear()
        chunks, self._chunks = self._chunks, 0
        if self._full_duplex(self._modes.request):
            await self._send(_streamed("request_body", body, eos=eos))
        elif chunks == 1:
            await self._send(_body_answer("request_body"))  # the one chunk, unchanged
        else:  # earlier chunks were answered empty: this one carries them all
            length = header_mutation({"content-length": str(len(body))})
            await self._send(_body_answer("request_body", body, headers=length))

    async def _decide_request(self, body: bytes | None = b"") -> None:
        """Decide the model call; ``body``: the request body as the agent sent it
        (``None``: a body Warden does not read follows)."""
        turn = self._turn
        route = self._route
        assert turn is not None
        assert route is not None
        adapter = self._adapter
        target = route.path + ("?" + route.query if route.query else "")
        action = Action(
            action_id=new_id("act"),
            agent=turn.agent,
            kind=ActionKind.LLM_CALL,
            protocol=adapter.name if adapter is not None else route.family,
            stage=Stage.EXECUTED,
            request=turn.request,
            model=turn.model,
            context=turn.context,
            size=self._size,
            # What an approval covers, as through the base URL: an approved call lets
            # only this very request through, not another body on the same path.
            request_sha256=(
                request_sha256(turn.request.method, target, body)
                if body is not None
                else new_id("unread")  # binds to nothing another request can repeat
            ),
        )
        decision = await self._core.decide(action)
        if decision.enforced is not Effect.ALLOW:
            raise _Denied(decision)
        self._action, self._decision = action, decision
        self._sent_at = time.perf_counter()

    # -- response ------------------------------------------------------------------

    async def _response_headers(self, message: Any) -> None:
        decision = self._decision
        assert decision is not None
        headers = header_map(message.headers, error=UpstreamProtocol)
        try:
            self._status = int(headers.get(":status", ""))
        except ValueError:
            raise UpstreamProtocol("ext_proc response headers carry no :status") from None
        upstream_s = time.perf_counter() - self._sent_at
        metrics.child(metrics.UPSTREAM_LATENCY, self._upstream_name).observe(upstream_s)
        if 300 <= self._status < 400:
            raise UpstreamRedirect(
                f"upstream {self._upstream_name!r} answered with a redirect ({self._status}); "
                "Warden never relays redirects, which would send the agent around it"
            )
        success = 200 <= self._status < 300
        set_headers = {hdr.DECISION_HEADER: decision.decision_id}
        # X-Warden-* headers are Warden's word to the agent (X-Warden-Blocked): never
        # the upstream's (the decision id is set over the upstream's, not removed).
        ours = hdr.DECISION_HEADER.lower()
        remove = {n for n in headers if (low := n.lower()).startswith("x-warden-") and low != ours}
        answer = pb.ProcessingResponse()
        # Errors (4xx, 5xx) pass as they are: the SDKs raise them, reading no calls.
        if success and self._adapter is not None:
            self._governed = True
            encoding = headers.get("content-encoding", "identity").strip().lower()
            if encoding not in ("", "identity"):
                raise UpstreamProtocol(
                    f"upstream {self._upstream_name!r} answered with content-encoding "
                    f"{encoding!r}, which Warden cannot read"
                )
            # The SDK picks stream-or-not from its request, never from the content type:
            # an event stream answering a request that asked for none is read whole,
            # whose parse fails (502) as the SDK's would.
            self._sse = self._stream
            if message.end_of_stream:
                raise UpstreamProtocol(
                    f"upstream {self._upstream_name!r} answered {self._status} with no body"
                )
            set_headers["content-type"] = _SSE if self._sse else _JSON
            remove.update({"content-length", "content-encoding"})
            override = self._mode_override()
            if override is not None:
                answer.mode_override.CopyFrom(override)
            if self._sse:
                self._start_stream()
        elif success and self._route is not None and self._route.match.metered:
            self._metering = True  # read whole for its usage, passed on as it came
            override = self._mode_override()
            if override is not None:
                answer.mode_override.CopyFrom(override)
        answer.response_headers.response.header_mutation.CopyFrom(
            header_mutation(set_headers, remove)
        )
        self._phase = "done" if message.end_of_stream else "response_body"
        await self._send(answer)

    def _mode_override(self) -> Any:
        """The body mode this response is best governed in, if Envoy may not be using it.

        BUFFERED for JSON (Envoy holds the headers, so length and status can
        still change), STREAMED for SSE (text flows at once). Envoy applies it
        only with ``allow_mode_override: true``; Warden handles either mode.
        """
        current = self._modes.response
        if current is not None and current not in (_Mode.STREAMED, _Mode.BUFFERED):
            return None
        wanted = _Mode.STREAMED if self._sse else _Mode.BUFFERED
        if current == wanted:
            return None
        return _Mode(response_body_mode=wanted)

    def _start_stream(self) -> None:
        adapter, turn = self._adapter, self._turn
        assert adapter is not None
        assert turn is not None
        full_duplex = self._full_duplex(self._modes.response)
        self._driver = StreamDriver(
            adapter.stream_rewriter(
                hide_usage=self._hide_usage,
                choices=self._size.choices if self._size is not None and self._size.choices else 1,
            ),
            lambda calls: self._core.decide_calls(turn, calls, adapter.name),
            self._release_streamed if full_duplex else self._release_chunk,
            # Per-chunk modes allow one answer per chunk; a keep-alive would only
            # pile up in it. Envoy's message_timeout must cover decisions instead.
            keepalive_s=self._svc.config.approvals.keepalive_s if full_duplex else None,
            on_answer_id=lambda answer: self._core.answer_started(turn, answer),
            recheck=self._check_killed,
        )

    async def _release_chunk(self, data: bytes) -> None:
        self._out += data

    async def _release_streamed(self, data: bytes) -> None:
        # Keep-alive comments go out too: they keep the agent's client waiting.
        if data:
            await self._send(_streamed("response_body", data, eos=False))

    async def _response_body(self, chunk: bytes, message: Any) -> None:
        eos = bool(message.end_of_stream)
        if self._metering:
            await self._metered_chunk(chunk, eos)
        elif not self._governed:
            await self._pass_response(chunk, eos)
        elif self._sse:
            await self._stream_chunk(chunk, eos)
        else:
            await self._whole_chunk(chunk, eos)
        if eos:
            self._finish_response()

    async def _response_trailers(self) -> None:
        """Trailers end the body. Only full-duplex answers can still carry body bytes then."""
        if self._metering:
            if not self._full_duplex(self._modes.response):
                raise UpstreamProtocol("response trailers are not supported on metered routes")
            await self._metered_chunk(b"", True, trailers=True)
        elif self._governed:
            if not self._full_duplex(self._modes.response):
                # A trailers answer cannot carry what is held: refuse rather than leak it.
                raise UpstreamProtocol("response trailers are not supported on governed routes")
            if self._sse:
                await self._stream_chunk(b"", True, trailers=True)
            else:
                await self._whole_chunk(b"", True, trailers=True)
        self._finish_response()
        await self._send(pb.ProcessingResponse(response_trailers=pb.TrailersResponse()))

    async def _whole_chunk(self, chunk: bytes, eos: bool, *, trailers: bool = False) -> None:
        """A JSON body: held whole, then parsed, decided and rewritten."""
        self._take(chunk, MAX_UPSTREAM_BODY, UpstreamProtocol)
        if not eos:
            await self._hold("response_body")
            return
        adapter, turn = self._adapter, self._turn
        assert adapter is not None
        assert turn is not None
        try:
            body = _wire.loads(bytes(self._body))
        except (ValueError, RecursionError):
            body = None
        self._body.clear()
        if not isinstance(body, dict):
            raise UpstreamProtocol(
                f"upstream {self._upstream_name!r} answered {self._status} "
                "with a body that is not a JSON object"
            )
        problem = adapter.problem(body)
        if problem is not None:
            raise UpstreamProtocol(
                f"upstream {self._upstream_name!r} answered {self._status} with {problem}"
            )
        usage = adapter.usage(body)
        self._core.count_usage(turn.agent, turn.model, usage, billed=self._billed)
        self._usage = usage
        set_headers: dict[str, str] = {}
        calls = adapter.tool_calls(body)
        if calls:
            decisions = await self._core.decide_calls(turn, calls, adapter.name)
            # Rendered from the decisions: allowed calls go out as decided.
            body = adapter.rewrite(body, decisions)
            blocked = [d.decision_id for d in decisions.values() if d.enforced is not Effect.ALLOW]
            if blocked:
                set_headers[hdr.BLOCKED_HEADER] = ", ".join(blocked)
        # A later request may continue from it (previous_response_id), as through the base URL.
        self._core.record_response(turn, response_id(adapter, body))
        raw = _wire.dumps(body).encode()
        if self._full_duplex(self._modes.response):
            await self._send(_streamed("response_body", raw, eos=not trailers))
            return
        # Honoured in BUFFERED mode (Envoy holds the headers until now); in
        # STREAMED mode Envoy already removed content-length itself.
        set_headers["content-length"] = str(len(raw))
        await self._send(_body_answer("response_body", raw, headers=header_mutation(set_headers)))

    async def _metered_chunk(self, chunk: bytes, eos: bool, *, trailers: bool = False) -> None:
        """A metered answer's body: held whole for its usage, then passed on unchanged."""
        self._take(chunk, MAX_UPSTREAM_BODY, UpstreamProtocol)
        if not eos:
            await self._hold("response_body")
            return
        raw = bytes(self._body)
        self._body.clear()
        chunks, self._chunks = self._chunks, 0
        turn = self._turn
        assert turn is not None
        self._usage = metered.metered_usage(raw)
        self._core.count_usage(turn.agent, turn.model, self._usage, billed=self._billed)
        if self._full_duplex(self._modes.response):
            await self._send(_streamed("response_body", raw, eos=not trailers))
        elif chunks == 1:
            await self._send(_body_answer("response_body"))  # the one chunk, unchanged
        else:
            length = header_mutation({"content-length": str(len(raw))})
            await self._send(_body_answer("response_body", raw, headers=length))

    async def _stream_chunk(self, chunk: bytes, eos: bool, *, trailers: bool = False) -> None:
        """An SSE chunk through the stream driver: text at once, each call once decided."""
        driver = self._driver
        assert driver is not None
        full_duplex = self._full_duplex(self._modes.response)
        if not self._cut:
            try:
                self._check_killed()
                await driver.feed(chunk)
                if eos:
                    await driver.finish()
            except (WardenError, _Killed) as exc:
                # AuditError and Overloaded keep their code; a StreamViolation lands here too.
                await self._cut_stream(exc)
            except SseTooLarge as exc:
                await self._cut_stream(UpstreamProtocol(f"upstream stream is malformed: {exc}"))
        if full_duplex:
            if eos:
                await self._send(_streamed("response_body", b"", eos=not trailers))
            return
        out, self._out = bytes(self._out), bytearray()
        if out == chunk:
            await self._send(_body_answer("response_body"))
        else:
            await self._send(_body_answer("response_body", out))

    async def _cut_stream(self, exc: Exception) -> None:
        """End the stream for the agent with the provider's error event; drop what follows."""
        code = exc.code if isinstance(exc, WardenError) else "killed"
        if isinstance(exc, StreamViolation):
            metrics.child(metrics.STREAM_VIOLATIONS, self._upstream_name).inc()
            log.warning("stream from %r cut: %s", self._upstream_name, exc)
        self._cut = True
        self._error = code
        metrics.child(metrics.ERRORS, code).inc()
        event = render_stream_error(self._family, code, str(exc))
        if self._full_duplex(self._modes.response):
            await self._send(_streamed("response_body", event, eos=False))
        elif isinstance(exc, _Killed):
            # Nothing of this chunk has reached Envoy yet: a call it allowed before the
            # switch was thrown (while a sibling was held) must not go out with it.
            self._out = bytearray(event)
        else:
            self._out += event

    def _check_killed(self, tools: Sequence[str] = ()) -> None:
        """Raise :class:`_Killed` when a switch stops the agent, its upstream or one of
        ``tools`` (calls of this answer already allowed: :class:`StreamDriver`)."""
        switches = self._svc.killswitches
        turn = self._turn
        if switches is None or turn is None:
            return
        switch = switches.covering(turn.agent.id, self._upstream_name, (None, *tools))
        if switch is not None:
            raise _Killed(switch.message)

    def _finish_response(self) -> None:
        self._phase = "done"
        if self._sse and self._driver is not None:
            rewriter = self._driver.rewriter
            turn = self._turn
            assert turn is not None
            self._usage = rewriter.usage
            self._core.count_usage(
                turn.agent, rewriter.model or turn.model, rewriter.usage, billed=self._billed
            )
            # Cut or not: the answer is the agent's, and its calls decided so far are history.
            self._core.record_response(turn, getattr(rewriter, "response_id", None))

    # -- answers -------------------------------------------------------------------

    async def _pass_response(self, chunk: bytes, eos: bool) -> None:
        """A response body Warden does not read: unchanged, until a kill switch stops the agent.

        As through the base URL: the chunk that finds the switch thrown is
        replaced by the provider's error event, and every later one is dropped.
        """
        if not self._cut:
            try:
                self._check_killed()
            except _Killed as exc:
                await self._cut_stream(exc)
        if not self._cut:
            await self._pass_body("response_body", chunk, eos)
        elif self._full_duplex(self._modes.response):
            if eos:
                await self._send(_streamed("response_body", b"", eos=True))
        else:
            # The length changed: honoured in BUFFERED mode, where Envoy holds the headers.
            out, self._out = bytes(self._out), bytearray()
            length = header_mutation({"content-length": str(len(out))})
            await self._send(_body_answer("response_body", out, headers=length))

    async def _pass_body(self, kind: str, chunk: bytes, eos: bool) -> None:
        """A body Warden does not read: unchanged (echoed back in full-duplex mode)."""
        mode = self._modes.request if kind == "request_body" else self._modes.response
        if self._full_duplex(mode):
            await self._send(_streamed(kind, chunk, eos=eos))
        else:
            await self._send(_body_answer(kind))

    async def _hold(self, kind: str) -> None:
        """Answer a chunk Warden keeps until the body is complete: it goes out empty."""
        mode = self._modes.request if kind == "request_body" else self._modes.response
        if not self._full_duplex(mode):
            await self._send(_body_answer(kind, b""))

    def _take(self, chunk: bytes, limit: int, error: type[WardenError]) -> None:
        self._chunks += 1
        self._body += chunk
        if len(self._body) > limit:
            raise error(f"body is over {limit} bytes")

    @property
    def _billed(self) -> bool:
        """Whether the provider bills this route (not a stored answer fetched again)."""
        return self._route is None or self._route.match.billed

    @staticmethod
    def _full_duplex(mode: int | None) -> bool:
        return mode is not None and mode == int(_Mode.FULL_DUPLEX_STREAMED)

    def _check_modes(self, route: _Route) -> None:
        """Before anything goes upstream: the bodies this route needs will reach Warden.

        Checked here, not when the response arrives: with response headers
        skipped Warden would never be asked, and with an older Envoy that reports
        no modes a body sent in mode ``NONE`` would go to the agent unread.
        """
        if not (_reads_request(route.match) or _reads_response(route.match)):
            return
        if self._modes == _BodyModes():
            if self._svc.config.ext_proc.unreported_modes == "trust":
                return
            raise _OutOfOrder(
                "Envoy did not report its body modes (protocol_config, sent by Envoy 1.34 "
                "and later), so Warden cannot tell this route's bodies will reach it; upgrade "
                "Envoy, or set ext_proc.unreported_modes: trust once request_body_mode and "
                "response_body_mode are BUFFERED or STREAMED"
            )
        if _reads_request(route.match):
            self._check_mode(self._modes.request, "request_body_mode")
        if _reads_response(route.match):
            self._check_mode(self._modes.response, "response_body_mode")

    def _check_mode(self, mode: int | None, setting: str) -> None:
        name = _UNGOVERNABLE_MODES.get(mode) if mode is not None else None
        if name is not None:
            raise self._not_configured(setting, f"Envoy is configured with {setting}: {name}")

    @staticmethod
    def _not_configured(setting: str, what: str) -> _OutOfOrder:
        return _OutOfOrder(
            f"{what}; Warden governs this route only with {setting} BUFFERED, STREAMED "
            "or FULL_DUPLEX_STREAMED"
        )

    async def _refuse(self, exc: WardenError) -> None:
        """Answer with the provider's error; Envoy then ignores the rest of the stream.

        Once response bytes went out (a STREAMED JSON body), Envoy resets the
        agent's stream instead: still nothing unexamined reaches the agent.
        """
        if isinstance(exc, _Denied):
            decision_id: str | None = exc.decision_id
        else:
            decision_id = self._decision.decision_id if self._decision is not None else None
            self._error = self._error or exc.code
        metrics.child(metrics.ERRORS, exc.code).inc()
        self._reply_status = exc.status
        # The SDKs honour Retry-After on a 503 and back off before retrying.
        extra = {"retry-after": str(exc.retry_after_s)} if isinstance(exc, Overloaded) else {}
        await self._send(
            immediate_response(
                self._family, exc.status, exc.code, str(exc), decision_id=decision_id, headers=extra
            )
        )
        self._phase = "done"
        self._done = True

    def _record(self) -> None:
        """The request's outcome (once), its metrics."""
        if self._recorded:
            return
        self._recorded = True
        status = self._reply_status or self._status
        metrics.child(metrics.REQUESTS, self._upstream_name, str(status or 0)).inc()
        metrics.child(metrics.ADDED_LATENCY, self._upstream_name).observe(self._added_s)
        action, decision = self._action, self._decision
        if action is None or decision is None:
            return
        latency = (time.perf_counter() - self._sent_at) * 1e3 if self._sent_at else 0.0
        self._core.outcome(
            action,
            decision,
            Outcome(
                status=self._status or None,
                latency_ms=latency,
                usage=self._usage,
                error=self._error,
            ),
            # The provider's answer Envoy showed Warden: its status says whether it was
            # billed. Without one (the agent hung up first), it may have been; a 5xx
            # may be Envoy's own (504 when its route timed out, 503 on a reset) after
            # the provider ran, so it releases nothing either, nor does Envoy's 408 (its
            # stream idle timeout) or 499.
            trusted=0 < self._status < 500 and self._status not in _ENVOY_LOCAL_4XX,
        )


_ENVOY_LOCAL_4XX: Final = frozenset({408, 499})
"""4xx answers Envoy itself gives after the request went upstream (timeouts, resets)."""


class _Killed(Exception):
    """A kill switch stopped the agent while its response was streaming."""


def _reads_request(match: RouteMatch) -> bool:
    """Whether Warden reads the route's request body before deciding."""
    return match.parse_request or match.metered


def _reads_response(match: RouteMatch) -> bool:
    """Whether Warden reads the route's response body (its calls, or its usage)."""
    return match.adapter is not None or match.metered


def _body_answer(kind: str, body: bytes | None = None, *, headers: Any = None) -> Any:
    """A ``BodyResponse`` for a per-chunk mode: ``body`` replaces the chunk (``None``: as is)."""
    common = pb.CommonResponse()
    if body is not None:
        if body:
            common.body_mutation.body = body
        else:
            common.body_mutation.clear_body = True
    if headers is not None:
        common.header_mutation.CopyFrom(headers)
    return pb.ProcessingResponse(**{kind: pb.BodyResponse(response=common)})


def _streamed(kind: str, body: bytes, *, eos: bool) -> Any:
    """A ``BodyResponse`` chunk in ``FULL_DUPLEX_STREAMED`` mode."""
    common = pb.CommonResponse(
        body_mutation=pb.BodyMutation(
            streamed_response=pb.StreamedBodyResponse(body=body, end_of_stream=eos)
        )
    )
    return pb.ProcessingResponse(**{kind: pb.BodyResponse(response=common)})
