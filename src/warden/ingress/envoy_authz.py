"""Envoy ext_authz (``envoy.service.auth.v3.Authorization``), compatible with OPA-Envoy.

Every ``Check`` is one action decided by the governed core: kill switches,
budgets, then the policy, and a decision record in the audit log before the
answer goes back. The policy evaluates ``ext_authz.query`` (default
``data.envoy.authz.allow``) over OPA-Envoy's input document
(:mod:`warden.protocols.envoy_authz`) merged with Warden's own (``input.agent``,
``input.action``, ``input.context``), so OPA-Envoy policies carry over. When
``ext_authz.upstream`` names an ``http`` upstream with route rules, a request
that fits a rule is that tool call (``input.action.tool`` and ``arguments``),
the rules tried past ``base_url``'s path as at the base URL;
a request to it that could make the service run another call than the one
decided (a method override, an encoded body, a JSON or form body Envoy cut) is
refused with 400, as the base-URL proxy refuses it; so is one fitting a rule
whose body Envoy did not send whole, or that carries a body field the rule
does not name (docs/http-tools.md).

Fails closed: a request Warden cannot parse is denied with 400 (also in
dry-run, as OPA-Envoy does), a policy that is missing, fails or returns a
value of the wrong shape denies, and a decision that cannot be recorded
denies with 503. The decision id is always in the dynamic metadata
(``decision_id``, ``warden_decision_id``). ``ext_authz.dry_run`` decides in
observe mode: recorded (``would_deny``), always allowed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import unquote

import grpc
import grpc.aio
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from multidict import CIMultiDict
from prometheus_client import Counter

from warden.credentials import Credentials
from warden.errors import AuditError, ConfigError, Overloaded, WardenError
from warden.identity import Identity
from warden.ingress import headers as hdr
from warden.ingress import off_loop
from warden.ingress.grpc import KEYS_REFUSED, told_keys
from warden.model import (
    Action,
    ActionKind,
    Decision,
    Effect,
    PolicyView,
    RequestMeta,
    Stage,
    new_id,
    request_sha256,
)
from warden.ops import metrics
from warden.protocols import envoy_authz as authz
from warden.protocols.http_tool import (
    ToolRequest,
    ToolRequestError,
    ToolRoutes,
    bound_body,
    may_carry_fields,
    names_segments,
)
from warden.protocols.registry import base_segments, model_api_at, model_route_refusal, past_base
from warden.sessions import door_conversation

if TYPE_CHECKING:
    from warden.approvals.service import Approvals
    from warden.config import Config
    from warden.core import Governor

__all__ = ["CHECKS", "ExtAuthzService"]

log = logging.getLogger("warden.ext_authz")

SERVICE_NAME: Final = "envoy.service.auth.v3.Authorization"
APPROVAL_ID_KEY: Final = "warden_approval_id"
"""Dynamic metadata key naming the approval a held check waits for."""
CHECKS = Counter(
    "warden_ext_authz_checks_total",
    "Envoy ext_authz checks by result: allowed, denied, held (awaiting a person's approval), "
    "dry_run (a denial let through), invalid (unparsable request), error (identity, "
    "overload, audit).",
    ["result"],
)
for _result in ("allowed", "denied", "held", "dry_run", "invalid", "error"):
    CHECKS.labels(_result)


def _lenient_segments(path: str) -> list[str]:
    """``path`` decoded once and its dot segments resolved, as a lax server routes it
    (empty segments dropped, ``..`` taking the one before it off, a backslash read as
    a slash as WHATWG URL parsers do: Node, Deno, Bun, Workers)."""
    resolved: list[str] = []
    for segment in unquote(path.partition("?")[0]).replace("\\", "/").split("/"):
        if segment == "..":
            if resolved:
                resolved.pop()
        elif segment not in ("", "."):
            resolved.append(segment)
    return resolved


class _Refusal:
    """Why Warden refuses a request before the policy sees it, and the HTTP status to send.

    ``rule``: a configured rule refused it (``unmatched: deny``), which observe mode
    and ``dry_run`` let through; a request Warden cannot read is refused in every mode.
    """

    __slots__ = ("reason", "rule", "status")

    def __init__(self, reason: str, status: int, *, rule: bool = False) -> None:
        self.reason = reason
        self.status = status
        self.rule = rule


class ExtAuthzService:
    """The ext_authz servicer; a :class:`~warden.ingress.grpc_service.GrpcService`."""

    service_names: tuple[str, ...] = (SERVICE_NAME,)

    def __init__(
        self,
        core: Governor,
        config: Config,
        *,
        identity: Identity | None = None,
        approvals: Approvals | None = None,
        credentials: Credentials | None = None,
    ) -> None:
        """Raises :class:`ConfigError` when ``ext_authz.upstream`` is not an ``http`` upstream.

        ``approvals``: where a held check's approval is found, to name it in
        the answer's dynamic metadata (``warden_approval_id``). ``credentials``:
        upstream keys Warden holds; an allowed request to ``ext_authz.upstream``
        is forwarded with Warden's key in place of the agent's.
        """
        self._core = core
        self._approvals = approvals
        self._credentials = credentials if credentials is not None else Credentials.none()
        self._settings = config.ext_authz
        self.grpc_settings = config.grpc
        self._identity = identity if identity is not None else Identity(config)
        self._routes: ToolRoutes | None = None
        self._grpc_bodies = _grpc_bodies(config.ext_authz.proto_descriptor)
        try:
            self._max_request_bytes = authz.body_limit(
                config.ext_authz.max_request_bytes, config.grpc.max_message_bytes
            )
        except ValueError as exc:
            raise ConfigError(f"ext_authz.max_request_bytes: {exc}") from None
        self._answers = authz.Answers()
        self._upstream = "envoy"
        self._base: list[str] = []
        """The path of ``ext_authz.upstream``'s ``base_url``, which route rules are relative to."""
        name = config.ext_authz.upstream
        if name is not None:
            upstream = config.upstreams.get(name)
            if upstream is None or upstream.protocol != "http":
                raise ConfigError(
                    f"ext_authz.upstream: {name!r} is not an upstream with protocol: http"
                )
            self._upstream = name
            self._base = base_segments(upstream.base_url)
            if upstream.routes:
                self._routes = ToolRoutes.compile(upstream.routes, upstream.unmatched)

    def add_to(self, server: grpc.aio.Server) -> None:
        """Register the Authorization servicer."""
        external_auth_pb2_grpc.add_AuthorizationServicer_to_server(_Servicer(self), server)

    async def close(self) -> None:
        """Nothing to finish: ``Check`` is unary, and in-flight calls finish on their own."""

    async def check(self, request: Any, *, keys: bool = False) -> Any:
        """Decide one ``CheckRequest``; never raises (every failure is a denial).

        ``keys``: the caller proved it is an Envoy that may be told the upstream key
        Warden holds (``grpc.envoy_peers``); where Warden holds one, any other caller
        is refused before anything is decided.
        """
        if not keys and self._credentials.get(self._upstream) is not None:
            CHECKS.labels("error").inc()
            return _refuse(403, "forbidden: " + KEYS_REFUSED.format(upstream=self._upstream))
        http = request.attributes.request.http
        parsed = await off_loop.read(
            len(http.raw_body) + len(http.body),
            partial(
                authz.check_input,
                request,
                self._grpc_bodies,
                max_request_bytes=self._max_request_bytes,
            ),
        )
        try:
            # Envoy sends names lower-cased; identity looks them up as the proxy does.
            agent = await self._identity.resolve(CIMultiDict(parsed.headers))
        except WardenError as exc:
            CHECKS.labels("error").inc()
            return _refuse(exc.status, f"{exc.code}: {exc}")
        refusal = _Refusal(parsed.problem, 400) if parsed.problem is not None else None
        tool: ToolRequest | None = None
        if refusal is None:
            refusal = self._model_route(parsed)
        if refusal is None and self._routes is not None:
            tool, refusal = await off_loop.read(len(parsed.body), partial(self._route, parsed))
        dry_run = self._settings.dry_run
        action = Action(
            action_id=new_id("act"),
            agent=agent,
            kind=ActionKind.TOOL_CALL if tool is not None else ActionKind.HTTP_CALL,
            protocol=authz.PROTOCOL,
            stage=Stage.EXECUTED,
            request=RequestMeta(
                method=parsed.method,
                upstream=self._upstream,
                path=parsed.path,
                headers=hdr.recordable(parsed.headers),
                # input.session, when the checked request names its session.
                conversation=door_conversation(parsed.headers),
            ),
            tool=tool.tool if tool is not None else None,
            arguments=tool.arguments if tool is not None else None,
            # What an approval covers: the request as Envoy passes it on (the body as
            # far as with_request_body sends it).
            request_sha256=request_sha256(
                parsed.method,
                parsed.path + ("?" + parsed.query if parsed.query else ""),
                await off_loop.read(
                    len(parsed.body),
                    partial(bound_body, parsed.body, parsed.headers.get("content-type", "")),
                ),
            ),
            context=hdr.context_from(parsed.headers),
            view=PolicyView(
                query=self._settings.query,
                input=parsed.input,
                read=self._answers.read,
                problem=refusal.reason if refusal is not None else None,
                problem_is_rule=refusal is not None and refusal.rule,
                observe=dry_run,
            ),
        )
        try:
            # Envoy waits for a check only as long as its ext_authz timeout (1 s
            # in deploy/envoy): a call that needs a person is answered at once,
            # and the same request passes once it is approved.
            decision = await self._core.decide(action, hold="defer")
        except Overloaded as exc:
            CHECKS.labels("error").inc()
            return _refuse(503, f"{exc.code}: {exc}")
        except AuditError as exc:
            CHECKS.labels("error").inc()
            log.error("ext_authz check denied: the decision could not be recorded: %s", exc)
            return _refuse(503, "audit_unavailable: the decision could not be recorded")
        response = self._answer(decision, refusal, parsed.headers)
        if decision.enforced is Effect.REQUIRE_APPROVAL and self._approvals is not None:
            # Envoy can log it: %DYNAMIC_METADATA(envoy.filters.http.ext_authz:warden_approval_id)%
            try:
                approval = await self._approvals.pending_for(action, decision)
            except Exception as exc:  # the answer is a denial either way; only the name is lost
                log.warning("could not name the approval of a held check: %s", exc)
            else:
                if approval is not None:
                    response.dynamic_metadata[APPROVAL_ID_KEY] = approval.id
        return response

    def _model_route(self, parsed: authz.CheckInput) -> _Refusal | None:
        """A model API's route that no route rule names: its answer, which Envoy sends on
        without Warden reading it, would carry tool calls nobody decided (Envoy's own
        ext_proc filter governs model APIs: disable ext_authz on those routes)."""
        segments = authz.decode_segments(parsed.path)
        if segments is not None and any("\\" in segment for segment in segments):
            segments = None
        # A path the route rules cannot read (a trailing slash, "//", "..", a backslash)
        # may still be the model route to the service behind Envoy: read it as a lax
        # server would.
        read = segments if segments is not None else _lenient_segments(parsed.path)
        found = model_api_at(read)
        if found is None:
            return None
        api, at = found
        if segments is not None:
            # The whole path names the model API; the rules name it past base_url's path.
            path = self._rule_path(segments)
            skipped = len(segments) - len(path)
            if names_segments(self._routes, parsed.method, path, [i - skipped for i in at]):
                return None
        named = self._settings.upstream
        reason = model_route_refusal("/", named, parsed.method, read, api)
        # A rule of the operator's, which observe mode and dry_run let through as they
        # do unmatched: deny; unless Warden cannot read the path, refused in every mode.
        return _Refusal(reason, 404, rule=segments is not None)

    def _route(self, parsed: authz.CheckInput) -> tuple[ToolRequest | None, _Refusal | None]:
        """The tool call a request is by the route rules, or why it is refused."""
        routes = self._routes
        assert routes is not None
        segments = authz.decode_segments(parsed.path)
        if segments is None:
            # What the service behind Envoy makes of it is its own choice (a trailing
            # slash or "//" may reach a route rule's resource): refused, as the proxy does.
            reason = (
                f"{parsed.path!r} has an empty, '.' or '..' segment, an encoded slash or a "
                "control character, so no route rule can be tried on it"
            )
            return None, _Refusal(reason, 400)
        refusal = self._base_refusal(parsed.method, segments)
        if refusal is not None:
            return None, refusal
        segments = list(self._rule_path(segments))
        content_type = parsed.headers.get("content-type", "")
        found = routes.find(parsed.method, segments)
        if found is not None and authz.partial_body(
            parsed.headers, parsed.body, self._max_request_bytes
        ):
            # The arguments would be read from a prefix of the body the service gets
            # whole, and the fields past the cut (or in a body never sent) go unchecked.
            reason = (
                "Envoy sent only part of the body, or none (with_request_body."
                f"max_request_bytes), so the route rule {found[0].shown} cannot read its "
                "arguments from it nor see that every field of it is one; send the body "
                "whole (raise max_request_bytes)"
            )
            return None, _Refusal(reason, 400)
        if may_carry_fields(content_type) and authz.partial_body(
            parsed.headers, parsed.body, self._max_request_bytes
        ):
            # A "_method" field past the cut would make the service run another method.
            reason = (
                "Envoy sent only part of the body, or none (with_request_body), so Warden "
                "cannot see whether it carries a '_method' field that makes the service run "
                "another method; send the body whole (raise max_request_bytes)"
            )
            return None, _Refusal(reason, 400)
        tool: ToolRequest | None = None
        try:
            tool = routes.resolve(
                parsed.method,
                segments,
                parsed.body,
                content_type,
                parsed.query,
                headers=parsed.headers,  # method overrides, Content-Encoding
            )
        except ToolRequestError as exc:
            return None, _Refusal(str(exc), 400)
        if tool is None and routes.unmatched == "deny":
            reason = (
                f"{parsed.method} {parsed.path} fits no rule in "
                f"upstreams.{self._upstream}.routes (unmatched: deny)"
            )
            return None, _Refusal(reason, 404, rule=True)
        return tool, None

    def _rule_path(self, segments: list[str]) -> Sequence[str]:
        """The segments the route rules are tried on: past the upstream's ``base_url`` path
        when ``segments`` start with it (case-blind), as the base-URL proxy's path never
        carries it and ext_proc takes it off; the whole path otherwise, as ext_proc reads
        it (a path Envoy rewrites into base_url's path only after ext_authz)."""
        return past_base(segments, self._base)

    def _base_refusal(self, method: str, segments: list[str]) -> _Refusal | None:
        """Why a path that a service may read under base_url's path otherwise than Warden
        does is refused: one starting with it only read without ``;`` parameters, or one
        whose whole path fits a rule while the part past base_url's path fits none."""
        routes = self._routes
        assert routes is not None
        tail = self._rule_path(segments)
        if len(tail) == len(segments):
            if len(past_base([s.partition(";")[0] for s in segments], self._base)) == len(tail):
                return None
            # Tomcat and Spring read "/api;x/v2" as "/api/v2": the service would route
            # it under base_url's path, where the rules are, while Warden read it outside.
            reason = (
                f"the path starts with the path of upstreams.{self._upstream}.base_url only "
                "when read without ';' parameters, as some services read paths; send it as "
                "base_url writes it"
            )
            return _Refusal(reason, 400)
        if routes.find(method, tail) is not None:
            return None
        whole = next(
            (
                rule
                for rule in routes.rules
                if rule.match(method, segments) is not None or rule.fits_loosely(method, segments)
            ),
            None,
        )
        if whole is None:
            return None
        # Rules are relative to base_url, as at the base-URL proxy: one written for the
        # whole path would decide here what the proxy decides as another call, or none.
        base = "/" + "/".join(self._base)
        reason = (
            f"the path fits the route rule {whole.shown} only with the path of "
            f"upstreams.{self._upstream}.base_url ({base[:80]}) in it, and rules are "
            f"relative to base_url; write the rule without {base[:80]}"
        )
        return _Refusal(reason, 400)

    def _answer(
        self, decision: Decision, refusal: _Refusal | None, headers: Mapping[str, str]
    ) -> Any:
        allowed = decision.enforced is Effect.ALLOW
        held = decision.enforced is Effect.REQUIRE_APPROVAL
        value = decision.obligations.result  # the policy's result, read by the guard
        result = value if isinstance(value, authz.AuthzResult) else None
        if allowed:
            metrics.child(CHECKS, "allowed" if decision.effect is Effect.ALLOW else "dry_run").inc()
        elif held:
            metrics.child(CHECKS, "held").inc()
        else:
            metrics.child(CHECKS, "invalid" if decision.guard == "validation" else "denied").inc()
        status = 403
        if decision.guard == "validation":
            status = refusal.status if refusal is not None else 400
        verb = "held this request for approval" if held else "denied this request"
        remove = [h for h in authz.CREDENTIAL_HEADERS if h in headers]
        key = self._credentials.get(self._upstream)
        upstream_key = None
        if key is not None:
            upstream_key = (key.header.lower(), key.value)
            remove += sorted(key.drop - {upstream_key[0]})
        return self._answers.render(
            result,
            allowed=allowed,
            decision_id=decision.decision_id,
            status=status,
            body=f"Warden {verb}: {decision.reason} (decision {decision.decision_id})",
            credentials=remove,
            upstream_key=upstream_key,
        )


def _grpc_bodies(path: str | None) -> authz.GrpcBodies | None:
    """The services of ``ext_authz.proto_descriptor``; ``ConfigError`` names what is wrong."""
    if path is None:
        return None
    try:
        return authz.GrpcBodies.load(Path(path).read_bytes())
    except OSError as exc:
        why = exc.strerror or exc
        raise ConfigError(f"ext_authz.proto_descriptor: cannot read {path}: {why}") from None
    except ValueError as exc:
        raise ConfigError(f"ext_authz.proto_descriptor: {path}: {exc}") from None


def _refuse(status: int, body: str) -> Any:
    """A denial that is not a decision (no agent, no record): the id says so."""
    return authz.render_response(None, allowed=False, decision_id="", status=status, body=body)


class _Servicer(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    def __init__(self, service: ExtAuthzService) -> None:
        self._service = service

    async def Check(
        self, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> external_auth_pb2.CheckResponse:
        try:
            keys = told_keys(context, self._service.grpc_settings)
            return await self._service.check(request, keys=keys)
        except Exception:
            # Never a gRPC error: an Envoy set to failure_mode_allow would let it through.
            log.exception("ext_authz check failed; denied")
            CHECKS.labels("error").inc()
            return _refuse(500, "internal_error: Warden could not decide this request")
