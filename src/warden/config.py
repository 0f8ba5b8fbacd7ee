"""Typed configuration: one YAML file, every key optional, ``WARDEN_*`` overrides.

Defaults are the named constants below. Validation happens once, at start, and
an invalid file fails with a message naming the key (``policy.deadline_ms:
Input should be greater than 0``). Environment variables override the file:
``WARDEN_MODE=observe``, ``WARDEN_LISTEN__PROXY=0.0.0.0:8080`` (``__`` walks
into nested keys). A text setting (a password, a path, a URL) takes the value
exactly as written; a number, true/false, list or mapping is read as YAML
(``50``, ``[a, b]``).
"""

from __future__ import annotations

import ipaddress
import os
import re
import types
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin
from urllib.parse import SplitResult, urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    SecretStr,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from warden.errors import ConfigError
from warden.ingress.transparent_rules import normalize_host
from warden.model import Effect, Mode
from warden.protocols import http_tool
from warden.protocols.registry import PassthroughRule

__all__ = [
    "DEFAULT_ADMIN_LISTEN",
    "DEFAULT_AGENT_ID",
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_POLICY_QUERY",
    "DEFAULT_PROXY_LISTEN",
    "PROVIDER_UPSTREAMS",
    "AdminConfig",
    "AgentConfig",
    "AgentKeysConfig",
    "ApprovalsConfig",
    "AuditConfig",
    "AuditShipConfig",
    "BudgetsConfig",
    "CapConfig",
    "CapCustomerConfig",
    "Config",
    "ConsoleConfig",
    "ConsoleSsoConfig",
    "CredentialConfig",
    "ExtAuthzConfig",
    "ExtProcConfig",
    "GrpcConfig",
    "GrpcTlsConfig",
    "HttpRouteArgument",
    "HttpRouteConfig",
    "IdentityConfig",
    "JwtConfig",
    "LimitsConfig",
    "ListenConfig",
    "LlmBudgetConfig",
    "MonitorConfig",
    "PolicyConfig",
    "PricesConfig",
    "SessionsConfig",
    "StateConfig",
    "SubjectsConfig",
    "ToolConfig",
    "TransparentConfig",
    "UpstreamConfig",
    "load_config",
    "parse_listen",
]

DEFAULT_AGENT_ID = "default-agent"
DEFAULT_PROXY_LISTEN = "127.0.0.1:8080"
DEFAULT_ADMIN_LISTEN = "127.0.0.1:8081"
DEFAULT_POLICY_BUNDLES = ("policies/customer-support",)
# Where the wheel carries the shipped bundle (copied there by setup.py's build step).
PACKAGED_BUNDLE = Path(__file__).parent / "data" / "policies" / "customer-support"
DEFAULT_POLICY_QUERY = "data.warden.decision"
DEFAULT_POLICY_DEADLINE_MS = 50.0
DEFAULT_POLICY_QUEUE_TIMEOUT_S = 1.0
DEFAULT_POLICY_WORKERS = 2
DEFAULT_POLICY_CACHE_SIZE = 10_000
DEFAULT_AUDIT_DIR = "./warden-data/audit"
DEFAULT_STATE_URL = "sqlite:///./warden-data/state.db"
DEFAULT_MAX_BODY_BYTES = 10 * 1024 * 1024
DEFAULT_MAX_CONNECTIONS = 1000
DEFAULT_UPSTREAM_TIMEOUT_S = 300.0
DEFAULT_CONNECT_TIMEOUT_S = 10.0
PROVIDER_UPSTREAMS: Mapping[str, str] = types.MappingProxyType(
    {"openai": "https://api.openai.com", "anthropic": "https://api.anthropic.com"}
)
"""The upstreams a config that names none gets. An upstream given one of these names
takes that protocol, and with it this base URL, unless it says otherwise."""
DEFAULT_SHUTDOWN_GRACE_S = 20.0
MAX_OPERATION_S = 86400.0
"""The longest timeout or interval of one operation (a call, a wait, a poll): a day."""
MAX_LIFETIME_S = 10 * 365 * 86400.0
"""The longest a stored thing may live (an approval, a reservation, a session): ten years.
Past it a time can no longer be written (year 9999) or slept on, and the setting fails
at run time instead of at start."""
MAX_ITEMS = 10**8
"""The most of anything counted in memory (cached decisions, events, messages, keys):
past it a setting would not fit in memory, or not in a C size (``OverflowError`` at start)."""
MAX_BYTES = 2**32
"""The most bytes (or characters) one body or field may be read into memory as: 4 GiB."""
MAX_CONNECTIONS = 1_000_000
"""The most connections a listener may serve at once: each holds a file descriptor."""
ENV_PREFIX = "WARDEN_"
# Read by the CLI (`warden mcp wrap` proves its agent with the last two), or by the
# agent's SDK (WARDEN_AGENT_KEY, docs/identity.md), not by the server; never treated
# as config overrides.
ENV_RESERVED = frozenset(
    {
        "WARDEN_CONFIG",
        "WARDEN_TOKEN",
        "WARDEN_ADMIN_URL",
        "WARDEN_PYTHON",
        "WARDEN_AGENT_KEY",
        "WARDEN_AGENT_TOKEN",
    }
)
_SERVICE_LINK = re.compile(
    r"WARDEN_(?:[A-Z0-9_]*_)?(?:SERVICE_HOST|SERVICE_PORT(?:_[A-Z0-9_]+)?"
    r"|PORT(?:_\d+_(?:TCP|UDP|SCTP)(?:_PROTO|_PORT|_ADDR)?)?)\Z"
)
"""What Kubernetes sets for a Service named ``warden`` or ``warden-<x>`` in the namespace
(``WARDEN_SERVICE_HOST``, ``WARDEN_PORT_8080_TCP``): not Warden's settings."""


def _loopback(host: str) -> bool:
    """Whether ``host`` (a URL's, brackets off) names this machine's loopback."""
    if host.casefold() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _split_url(value: str) -> SplitResult:
    """``value`` split, its port read: ``ValueError`` naming the fault, never the value.

    A URL may carry a password, so the message only says what is wrong with it.
    """
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises for a port that is not a number 0-65535
    except ValueError as exc:
        raise ValueError(f"is not a valid URL: {_split_fault(exc)}") from None
    return parts


def _split_fault(exc: ValueError) -> str:
    # urllib's own messages may quote the port or the host and user (a password).
    text = str(exc)
    if text.startswith("Port"):
        return "its port is not a number from 0 to 65535"
    if "IPv6" in text:
        return "its [IPv6] host is malformed"
    return "its host part cannot be read"


def _check_postgres_url(value: str) -> None:
    """``value``'s ports as libpq reads them, several ``host:port`` pairs (failover)
    included: ``ValueError`` naming the fault, never the value (it may carry a password)."""
    # The URL is shown, its password masked, through urlsplit: it must split. Its port
    # is not read here: ``h1:5432,h2:5432`` is one to urllib, and not a number.
    try:
        urlsplit(value)
    except ValueError as exc:
        raise ValueError(f"is not a valid URL: {_split_fault(exc)}") from None
    if _password_read_as_host(value):
        # libpq ends the user part at the first '@', and '/' ends the authority: the
        # rest of a password holding either would be read, and shown, as the host.
        raise ValueError(
            "is not a valid URL: its user or password holds '@', '/', '?' or '#', or "
            "its database name holds '@': percent-encode them (%40, %2F, %3F, %23), "
            "or put the password in password_file"
        )
    from psycopg import Error as PgError  # noqa: PLC0415 - only for a PostgreSQL URL
    from psycopg.conninfo import conninfo_to_dict  # noqa: PLC0415

    try:
        params = conninfo_to_dict(value)
    except PgError:
        # libpq says why when Warden connects, its message scrubbed of the password
        # (warden.state.postgres.pg_reason); its message here would quote the URL.
        return
    for port in str(params.get("port") or "").split(","):
        if port and not (port.isascii() and port.isdigit() and int(port) <= 65535):
            raise ValueError("is not a valid URL: its port is not a number from 0 to 65535")


def _password_read_as_host(url: str) -> bool:
    """Whether libpq would read part of ``url``'s user or password as its host: the
    authority (up to the first ``/``, as libpq reads it) with a second ``@`` or a
    ``?`` or ``#`` in its user part, or an ``@`` after it before the query."""
    authority, _, rest = url.partition("://")[2].partition("/")
    user, at, hosts = authority.rpartition("@")
    if at and any(c in user for c in "@?#"):
        return True
    if at:
        return False
    if "@" in rest.partition("?")[0] + authority:
        return True
    # No '@' before the first '/': a "port" that is no number is a password's start
    # (``user:Pa/ss?…@host``), which libpq fails on and its error would quote.
    return any(not _port_ok(hostport) for hostport in hosts.split(","))


def _port_ok(hostport: str) -> bool:
    """``host``, ``host:5432`` or ``[::1]:5432`` (a query may follow): a port is digits."""
    hostport = hostport.partition("?")[0]
    if hostport.startswith("["):
        hostport = hostport.partition("]")[2]
    port = hostport.partition(":")[2] if ":" in hostport else ""
    return port == "" or (port.isascii() and port.isdigit())


def _migrate_switch(value: Any) -> Any:
    # Unquoted, YAML reads ``off`` as false: the value meant is plain.
    return "off" if value is False else value


class _Section(BaseModel):
    # inf and nan: a time that cannot be written or slept on, a cap that caps nothing.
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class AgentConfig(_Section):
    """The agent this sidecar speaks for when a request names none."""

    id: str = Field(DEFAULT_AGENT_ID, min_length=1, max_length=128)
    version: str = ""
    mode: Mode | None = None
    """Per-agent mode; overrides the top-level ``mode`` for this agent."""

    @field_validator("id")
    @classmethod
    def _agent_id(cls, value: str) -> str:
        return _checked_agent_id(value)


class ListenConfig(_Section):
    """Where the proxy and admin listeners bind (``host:port``; port 0 picks one)."""

    proxy: str = DEFAULT_PROXY_LISTEN
    admin: str = DEFAULT_ADMIN_LISTEN
    grpc: str | None = None
    """The gRPC listener (Warden's API, Envoy ext_authz and ext_proc); off when unset."""

    @field_validator("proxy", "admin", "grpc")
    @classmethod
    def _hostport(cls, value: str | None) -> str | None:
        if value is not None:
            parse_listen(value)
        return value


def _argument_form(value: Any) -> str:
    """Which form a route argument is written in: text, or a mapping (anything else is
    checked as a mapping, whose error names what it takes)."""
    return "text" if isinstance(value, str) else "mapping"


class HttpRouteArgument(_Section):
    """A body argument that may be absent: ``{pointer: /currency, optional: true}``."""

    pointer: str
    """An RFC 6901 JSON pointer into the body (``/currency``)."""
    optional: bool = False
    """``true``: a pointer that finds nothing leaves the argument out instead of refusing
    the request."""


class HttpRouteConfig(_Section):
    """A route of a plain HTTP tool API that is one tool call (see docs/http-tools.md)."""

    method: str
    path: str
    """A path template after the upstream name: ``/orders/{order_id}/refunds``."""
    tool: str = Field(min_length=1, max_length=128)
    arguments: dict[
        str,
        Annotated[
            Annotated[str, Tag("text")] | Annotated[HttpRouteArgument, Tag("mapping")],
            Discriminator(_argument_form),
        ],
    ] = Field(default_factory=dict)
    """Argument name to ``"{param}"`` (a path parameter), ``"?name"`` (a query parameter),
    a JSON pointer into the body, or ``{pointer: ..., optional: true}``."""
    body: Literal["named", "unread"] = "named"
    """``named``: a request's body may carry only values the arguments' pointers cover
    (none, when no argument reads the body); ``unread``: no argument reads the body, and
    any body is forwarded unread (an upload the policy decides by path and query)."""

    @field_validator("method")
    @classmethod
    def _method(cls, value: str) -> str:
        return http_tool.parse_method(value)

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        http_tool.parse_template(value)
        return value

    @field_validator("arguments")
    @classmethod
    def _arguments(
        cls, value: dict[str, str | HttpRouteArgument]
    ) -> dict[str, str | HttpRouteArgument]:
        for name, source in value.items():
            try:
                http_tool.parse_argument(source)
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
        return value

    @model_validator(mode="after")
    def _compiles(self) -> HttpRouteConfig:
        http_tool.RouteRule.compile(self.method, self.path, self.tool, self.arguments, self.body)
        return self


_HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")  # an RFC 9110 token
# Headers that frame, route or negotiate the request (RFC 9110, 9112): never a credential's.
_NOT_A_CREDENTIAL_HEADER = frozenset(
    {
        "host",
        "content-length",
        "content-type",
        "content-encoding",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
        "expect",
        "proxy-authorization",
        "proxy-connection",
        "cookie",
    }
)


class CredentialConfig(_Section):
    """The upstream's key, held by Warden: the agent needs none (docs/credentials.md).

    Whatever credential the agent sends is dropped and this one set on every
    request Warden forwards to the upstream. Set exactly one of ``env`` and
    ``file``; the key itself never appears in the configuration.
    """

    env: str | None = Field(None, min_length=1, max_length=256)
    """An environment variable of Warden's that holds the key (``OPENAI_API_KEY``)."""
    file: str | None = None
    """A file holding the key (its first line), re-read when it changes (a Kubernetes Secret)."""
    header: str | None = Field(None, min_length=1, max_length=128)
    """The header that carries it. Default: ``x-api-key`` for ``protocol: anthropic``,
    ``Authorization`` otherwise."""
    scheme: str | None = Field(None, max_length=64)
    """Put before the key with a space (``Bearer``). Default: ``Bearer`` when the header
    is ``Authorization``, none otherwise; ``""`` for none."""

    @model_validator(mode="after")
    def _one_source(self) -> CredentialConfig:
        if (self.env is None) == (self.file is None):
            raise ValueError("set exactly one of env and file")
        if self.header is not None and not _HEADER_NAME.fullmatch(self.header):
            raise ValueError(f"header {self.header!r} is not a valid header name")
        if self.header is not None and self.header.lower().startswith("x-warden-"):
            raise ValueError("header: X-Warden-* headers are Warden's own")
        if self.header is not None and self.header.lower() in _NOT_A_CREDENTIAL_HEADER:
            raise ValueError(f"header: {self.header} frames or routes the request; name another")
        if self.scheme and not _HEADER_NAME.fullmatch(self.scheme):
            raise ValueError(f"scheme {self.scheme!r} must be one word (Bearer, Basic, Token)")
        return self


class UpstreamConfig(_Section):
    """An API the agent may reach through ``/<name>/...``; nothing else is reachable."""

    protocol: Literal["openai", "anthropic", "http", "mcp"]
    """``mcp``: an MCP server over streamable HTTP; ``base_url`` is its MCP endpoint."""
    base_url: str
    timeout_s: float = Field(DEFAULT_UPSTREAM_TIMEOUT_S, gt=0, le=MAX_OPERATION_S)
    connect_timeout_s: float = Field(DEFAULT_CONNECT_TIMEOUT_S, gt=0, le=MAX_OPERATION_S)
    passthrough: tuple[str, ...] = ()
    """Routes Warden does not parse, forwarded as one ``llm_call`` each: ``"GET v1/files"``,
    ``"POST v1/batches/*"`` (``*`` one segment, a final ``**`` the rest). Refused otherwise."""
    routes: tuple[HttpRouteConfig, ...] = ()
    """``protocol: http`` only: requests that are tool calls; where a request fits several,
    the most specific rule (literal segments before parameters) is the call."""
    unmatched: Literal["deny", "allow"] = "deny"
    """With ``routes``: refuse a request no route fits, or forward it as one ``http_call``."""
    credential: CredentialConfig | None = None
    """Warden's key for this upstream, put in place of the agent's (off when unset)."""

    @model_validator(mode="after")
    def _routes_on_http(self) -> UpstreamConfig:
        if self.routes and self.protocol != "http":
            raise ValueError("routes: only an upstream with protocol: http has route rules")
        if self.routes:
            # Two rules one request could fit, neither more specific: a guess at run time.
            http_tool.ToolRoutes.compile(self.routes, self.unmatched)
        return self

    @field_validator("passthrough")
    @classmethod
    def _passthrough(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for spec in value:
            PassthroughRule.parse(spec)  # raises ValueError naming the bad pattern
        return value

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str) -> str:
        parts = _split_url(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an absolute http:// or https:// URL")
        if parts.query or parts.fragment:
            raise ValueError("must not carry a query or fragment")
        if parts.username is not None or parts.password is not None:
            # Every request would fail (the HTTP client refuses them beside its own auth).
            raise ValueError(
                "must not carry a user name or password; let Warden hold the key "
                "(upstreams.<name>.credential, docs/credentials.md)"
            )
        return value.rstrip("/")


class ToolConfig(_Section):
    """Per-tool settings: the risk class chooses the fallback when policy fails."""

    risk: Literal["read_only", "write", "high"] = "write"
    labels: tuple[str, ...] = ()
    """Taint labels for session-aware policies: ``untrusted_output`` (its result is
    untrusted content: web fetch, email read), ``sensitive_sink`` (send email, refund,
    export). Policies see them as ``input.action.labels`` and ``input.session.taints``."""

    @field_validator("labels")
    @classmethod
    def _label_names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for label in value:
            if not label or not all(c.isalnum() or c in "_-" for c in label):
                raise ValueError(f"label {label!r} must be letters, digits, _ or -")
        return value


class SessionsConfig(_Section):
    """Sessions and conversation history for policies (``input.session``, ``input.history``)."""

    pointer: str | None = None
    """A JSON pointer into model request bodies naming the session when no
    ``X-Warden-Session`` header does (``/metadata/session_id``, ``/user``)."""
    max_calls: int = Field(256, ge=0, le=10_000)
    """At most this many prior tool calls (the latest) reach ``input.history``."""
    max_messages: int = Field(5000, ge=1, le=MAX_ITEMS)
    """Messages (or input items) read from one request; the rest are not looked at."""
    max_result_chars: int = Field(2048, ge=0, le=MAX_BYTES)
    """Characters of each tool result kept in ``input.history[i].result.content``."""
    max_history_ms: float = Field(20.0, gt=0, le=MAX_OPERATION_S * 1000)
    """Time one request's history extraction may take before it stops (``truncated``)."""
    counters: bool = True
    """Keep session counters in the state store (``input.session.calls`` and the rest)."""
    ttl_s: float = Field(7 * 24 * 3600.0, gt=0, le=MAX_LIFETIME_S)
    """How long session counters and Warden's record of decided calls are kept."""
    handoffs: bool = False
    """Let any agent continue, fetch or delete another agent's Responses answers and
    provider conversations (agents that each bring their own provider key and hand a
    conversation over). Off: each is its own agent's, as one shared key needs."""

    @field_validator("pointer")
    @classmethod
    def _pointer(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("/"):
            raise ValueError("must be a JSON pointer starting with / (e.g. /metadata/session_id)")
        return value


class SigningConfig(_Section):
    """Bundle signature checking (OPA ``.signatures.json``)."""

    required: bool = False
    keys: dict[str, str] = Field(default_factory=dict)
    """Key id to a PEM public key, or to ``@path/to/key.pem``."""
    allow_older: bool = False
    """Activate a signed bundle signed before the newest one of its name that
    Warden activated (off: such a rollback is refused; re-sign to roll back)."""


def default_policy_bundles() -> tuple[str, ...]:
    """The shipped customer-support bundle: ``./policies/customer-support`` when that exists.

    Otherwise the copy installed with Warden, so ``warden serve`` works from
    any folder; in a source checkout, the checkout's own bundle.
    """
    if Path(DEFAULT_POLICY_BUNDLES[0]).exists():
        return DEFAULT_POLICY_BUNDLES
    checkout = Path(__file__).resolve().parents[2] / DEFAULT_POLICY_BUNDLES[0]
    for candidate in (PACKAGED_BUNDLE, checkout):
        if candidate.is_dir():
            return (str(candidate),)
    return DEFAULT_POLICY_BUNDLES  # not found: the engine names the missing folder


class ChallengerConfig(_Section):
    """A candidate policy evaluated beside the active one on live traffic, in observe mode.

    Off the request path: each policy decision's input is queued (dropped and
    counted when the queue is full) and evaluated later by the challenger's own
    workers; it never changes a decision. See docs/monitoring.md.
    """

    bundles: tuple[str, ...] = Field(min_length=1)
    """The candidate bundle folders or archives (merged, as ``policy.bundles``)."""
    workers: int = Field(1, ge=1, le=16)
    queue_size: int = Field(1000, ge=1, le=100_000)
    """Inputs waiting for the challenger; past this many, new ones are dropped and counted."""
    batch_size: int = Field(64, ge=1, le=1000)
    """At most this many queued inputs go to a challenger worker in one request."""
    batch_ms: float = Field(50, ge=0, le=10_000)
    """How long a batch may gather after its first input before it is sent (sooner when
    ``batch_size`` inputs are queued; 0 sends whatever is queued at once)."""
    record: bool = True
    """Write a ``challenger`` audit record for every divergence (the metric counts them anyway)."""


class PolicyConfig(_Section):
    """The Rego bundles and how they are evaluated."""

    bundles: tuple[str, ...] = Field(default_factory=default_policy_bundles)
    query: str = Field(DEFAULT_POLICY_QUERY, pattern=r"^data(\.[A-Za-z_][A-Za-z0-9_]*)+$")
    default_effect: Effect = Effect.DENY
    """What an undefined policy result means."""
    deadline_ms: float = Field(DEFAULT_POLICY_DEADLINE_MS, gt=0, le=MAX_OPERATION_S * 1000)
    """How long one evaluation may run on a worker (not counting its wait for one)."""
    queue_timeout_s: float = Field(DEFAULT_POLICY_QUEUE_TIMEOUT_S, gt=0, le=MAX_OPERATION_S)
    """How long a request may wait for a free worker before Warden answers 503
    with ``Retry-After`` (never a fallback decision)."""
    workers: int = Field(DEFAULT_POLICY_WORKERS, ge=1, le=64)
    worker_stack_mb: int = Field(512, ge=8, le=8192)
    """The stack each worker runs the engine on: its regular expressions and JSON
    parser recurse per character or level, and on Linux's usual 8 MiB a 26,000
    character argument matched by ``^[a-z]+$`` killed the worker."""
    cache_size: int = Field(DEFAULT_POLICY_CACHE_SIZE, ge=0, le=MAX_ITEMS)
    watch: bool = True
    """Reload bundles from their folders when files change."""
    poll_interval_s: float = Field(5.0, gt=0, le=MAX_OPERATION_S)
    bundle_url: str | None = None
    """An HTTP bundle server to poll (``.tar.gz``, ETag aware)."""
    signing: SigningConfig = SigningConfig()
    fallback: dict[str, Effect] = Field(
        default_factory=lambda: {
            "read_only": Effect.ALLOW,
            "write": Effect.DENY,
            "high": Effect.DENY,
        }
    )
    """Effect by tool risk class when the policy errors, times out or crashes."""
    unknown_calls: Literal["deny", "policy"] = "deny"
    """A call of a type Warden does not know (``unknown_call``): denied before the
    policy runs, or handed to the policy (which sees ``input.action.kind``)."""
    challenger: ChallengerConfig | None = None
    """A candidate bundle run beside the active one on live traffic (observe only)."""

    @field_validator("bundle_url")
    @classmethod
    def _bundle_server(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = _split_url(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        return value


_SUBJECT_ROOTS = ("context.", "action.arguments.", "agent.claims.")


class SubjectsConfig(_Section):
    """Where the data subject of an action (whose key seals its personal fields) comes from."""

    sources: tuple[str, ...] = ("context.customer_id",)
    """Dotted paths, tried in order: ``context.<name>``, ``action.arguments.<path>``,
    ``agent.claims.<path>``. The first present value names the subject."""
    max_keys: int = Field(100_000, ge=1, le=MAX_ITEMS)
    """At most this many subject keys; past it, personal fields are recorded redacted."""

    @field_validator("sources")
    @classmethod
    def _paths(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for path in value:
            root = next((r for r in _SUBJECT_ROOTS if path.startswith(r)), None)
            if root is None or not all(path[len(root) :].split(".")):
                raise ValueError(
                    f"{path!r} must be context.<name>, action.arguments.<path> "
                    "or agent.claims.<path>"
                )
        return value


class AuditShipConfig(_Section):
    """Shipping the local audit log to a central, append-only store on PostgreSQL."""

    url: str
    """``postgresql://user@host:5432/db``; libpq options (TLS) in the query string."""
    password_file: str | None = None
    """A file holding the password (first line); never logged."""
    password: SecretStr | None = None
    """The password, for ``WARDEN_AUDIT__SHIP__PASSWORD``; prefer ``password_file``."""
    batch: int = Field(2000, ge=1, le=50_000)
    """At most this many records per insert (one round trip, one transaction)."""
    interval_s: float = Field(0.2, gt=0, le=60)
    """How often the shipper looks for new records once it has caught up."""
    max_backoff_s: float = Field(5.0, gt=0, le=300)
    """The longest wait between attempts while the store is unreachable."""
    connect_timeout_s: float = Field(10.0, gt=0, le=MAX_OPERATION_S)
    migrate: Literal["auto", "off"] = "auto"
    """``auto``: apply pending migrations before shipping; ``off``: the tables must exist."""

    @field_validator("url")
    @classmethod
    def _scheme(cls, value: str) -> str:
        if not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("must start with postgresql://")
        _check_postgres_url(value)
        return value

    _migrate_false = field_validator("migrate", mode="before")(_migrate_switch)

    @field_validator("password", mode="before")
    @classmethod
    def _text(cls, value: Any) -> Any:
        return None if value is None else str(value)


class AuditConfig(_Section):
    """The local, append-only, hash-chained audit log."""

    dir: str = Field(DEFAULT_AUDIT_DIR, min_length=1)
    fsync: Literal["always", "batch", "never"] = "always"
    segment_max_bytes: int = Field(64 * 1024 * 1024, ge=4096)
    checkpoint_interval_s: float = Field(60.0, gt=0, le=MAX_OPERATION_S)
    signing_key_file: str | None = None
    """Ed25519 private key (PEM) for checkpoints; generated in ``dir`` when absent."""
    subjects: SubjectsConfig = SubjectsConfig()
    ship: AuditShipConfig | None = None
    """Ship records and checkpoints to a central store (off when unset)."""


class StateConfig(_Section):
    """Where approvals, budgets and kill switches live."""

    url: str = DEFAULT_STATE_URL
    """``sqlite:///path`` (one machine) or ``postgresql://user@host:5432/db`` (a fleet);
    TLS and other libpq options go in the URL's query (``?sslmode=verify-full&...``)."""
    migrate: Literal["auto", "off"] = "auto"
    """``auto``: apply pending schema migrations at start; ``off``: refuse to start
    while any are pending (run ``warden db migrate``)."""
    password_file: str | None = None
    """A file holding the PostgreSQL password (first line); never logged."""
    password: SecretStr | None = None
    """The PostgreSQL password, for ``WARDEN_STATE__PASSWORD``; prefer ``password_file``."""
    pool_min_size: int = Field(1, ge=0, le=100)
    pool_max_size: int = Field(10, ge=1, le=100)
    connect_timeout_s: float = Field(10.0, gt=0, le=MAX_OPERATION_S)
    pool_timeout_s: float = Field(1.0, gt=0, le=60)
    """How long a decision waits for a pooled PostgreSQL connection before the state
    store counts as unavailable for it (then ``on_unavailable`` applies)."""
    lock_timeout_s: float = Field(2.0, gt=0, le=60)
    """How long a PostgreSQL statement waits for a lock another session holds (an open
    transaction left on a counter row) before it fails and ``on_unavailable`` applies."""
    statement_timeout_s: float = Field(4.0, gt=0, le=600)
    """How long one PostgreSQL statement may run before the server cancels it."""
    call_timeout_s: float = Field(5.0, gt=0, le=600)
    """How long one state store call may take in all (a pooled connection, retries, its
    statements) before its caller is answered that the store is unavailable."""
    on_unavailable: Literal["deny", "fallback"] = "deny"
    """A decision that needs the state store while it is unreachable: ``deny`` (fail
    closed, a cap never overshoots) or ``fallback`` (the tool's risk class picks the
    effect from ``policy.fallback``; an allowed call goes on to the policy uncounted)."""

    @field_validator("url")
    @classmethod
    def _scheme(cls, value: str) -> str:
        if not value.startswith(("sqlite:///", "postgresql://", "postgres://")):
            raise ValueError("must start with sqlite:/// or postgresql://")
        if value.startswith("postgres"):
            _check_postgres_url(value)
        return value

    _migrate_false = field_validator("migrate", mode="before")(_migrate_switch)

    @field_validator("password", mode="before")
    @classmethod
    def _text(cls, value: Any) -> Any:
        # A password of digits written unquoted in the YAML file is still text.
        return None if value is None else str(value)


class LimitsConfig(_Section):
    """Bounds on what agents may send."""

    max_body_bytes: int = Field(DEFAULT_MAX_BODY_BYTES, ge=1024, le=MAX_BYTES)
    body_read_timeout_s: float = Field(30.0, gt=0, le=MAX_OPERATION_S)
    """How long a request's body may take to arrive: a client trickling it a byte at a
    time held a connection (and its file descriptor) for as long as it liked."""
    idle_timeout_s: float = Field(75.0, gt=0, le=MAX_OPERATION_S)
    """How long a connection may sit idle between requests, or take to send a request's
    headers (the proxy and admin listeners)."""
    max_connections: int = Field(DEFAULT_MAX_CONNECTIONS, ge=1, le=MAX_CONNECTIONS)
    """Connections each listener serves at once; past it a new connection is answered
    503 with ``Retry-After`` and closed (proxy, admin), or closed (gRPC, transparent).
    Each holds a file descriptor, which the audit log and state store need too."""


class AdminToken(_Section):
    """An admin API bearer token, stored only as its SHA-256."""

    subject: str = Field(min_length=1)
    roles: tuple[Literal["admin", "approver", "auditor", "viewer"], ...]
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    groups: tuple[str, ...] = ()
    """Approver groups (a policy's ``approvers``, e.g. ``support-leads``) this person is in."""


class AdminConfig(_Section):
    """The admin API's tokens."""

    tokens: tuple[AdminToken, ...] = ()


AdminRole = Literal["admin", "approver", "auditor", "viewer"]
DEFAULT_CONSOLE_SESSION_TTL_S = 8 * 3600.0


class ConsoleSsoConfig(_Section):
    """Single sign-on through an auth proxy (oauth2-proxy) that sets trusted headers.

    The headers are believed only on connections from ``trusted_proxies``;
    the groups they name become roles through ``roles`` (group -> roles) and
    are also the person's approver groups.
    """

    trusted_proxies: tuple[str, ...] = Field(min_length=1)
    """IP addresses of the auth proxy; headers from any other peer are ignored."""
    user_header: str = "X-Forwarded-User"
    groups_header: str = "X-Forwarded-Groups"
    roles: dict[str, tuple[AdminRole, ...]] = Field(default_factory=dict)
    """Group name -> console roles; a user in none of these groups is refused."""


class ConsoleConfig(_Section):
    """The web console on the admin listener (``/console/``)."""

    enabled: bool = True
    session_ttl_s: float = Field(DEFAULT_CONSOLE_SESSION_TTL_S, gt=0, le=7 * 86400)
    """How long a sign-in lasts; the session cookie expires with it."""
    index: str | None = None
    """The decision index (SQLite file); default: ``<audit.dir>-index.sqlite`` beside the log."""
    sso: ConsoleSsoConfig | None = None
    public_url: str | None = None
    """The console's address as browsers reach it (``https://warden.example.com``) when TLS
    ends at a proxy in front: forms must come from its origin, and an ``https`` one marks
    the session cookie ``Secure``. Unset: the address the request reached Warden on."""

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = _split_url(value)
        # The value is not quoted: it may carry a password.
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        if parts.username is not None or parts.password is not None:
            raise ValueError("must not carry a user name or password")
        # The origin browsers send: scheme and host lower-cased, no default port, no path.
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        default = 443 if parts.scheme == "https" else 80
        port = f":{parts.port}" if parts.port not in (None, default) else ""
        return f"{parts.scheme}://{host}{port}"


Window = Literal["hour", "day", "month"]
"""A calendar window in ``budgets.timezone``: this hour, today, this month."""


class LlmBudgetConfig(_Section):
    """A cap on what each agent spends on model calls, in USD at the price table."""

    per: Literal["agent"] = "agent"
    window: Window = "day"
    limit_usd: float | None = Field(None, gt=0)
    """``None`` counts spend without capping it."""
    over: Literal["deny", "require_approval"] = "deny"
    estimate_usd: float = Field(0.0, ge=0)
    """The least held per call before its cost is known; the actual cost is settled after.
    A call whose request Warden reads holds what it can cost, if more."""
    unbounded_output_tokens: int = Field(8192, ge=1)
    """The output a request that sets no bound (``max_tokens`` and its kin) is held at, and,
    with ``limit_usd`` set, the bound Warden writes into it (:attr:`written_output_bound`)."""

    continued_input_tokens: int = Field(128_000, ge=0)
    """The input a continuation is held at beside its body (a Responses
    ``previous_response_id`` or ``conversation``): the provider bills the stored
    chain as input, and the request does not carry it."""
    unbounded_tool_calls: int = Field(10, ge=1)
    """The calls of tools the provider runs and bills per call (web search, file search, code
    interpreter) a request that sets no bound on them is held at, and, with ``limit_usd``
    set, sent with (Responses ``max_tool_calls``, Anthropic ``max_uses``)."""

    @property
    def written_output_bound(self) -> int | None:
        """The output bound written into a model request that sets none, or ``None``.

        Only under a cap: a call held at a bound must not generate more, or
        calls in flight together could all pass a cap that each alone fits.
        """
        return self.unbounded_output_tokens if self.limit_usd is not None else None

    @property
    def written_tool_bound(self) -> int | None:
        """The bound on billed hosted tool calls written into a request that sets none."""
        return self.unbounded_tool_calls if self.limit_usd is not None else None


def _json_pointer(value: str) -> str:
    # RFC 6901: "" is the whole document, else "/"-separated tokens in which
    # "~" only starts the escapes "~0" ("~") and "~1" ("/").
    if value and not value.startswith("/"):
        raise ValueError("must be a JSON pointer: empty or starting with '/'")
    if "~" in value.replace("~0", "").replace("~1", ""):
        raise ValueError("'~' in a JSON pointer must be followed by 0 or 1")
    return value


class CapCustomerConfig(_Section):
    """Where a per-customer cap finds the customer an action is for.

    The argument (what the tool acts on) wins over the context when both are
    present and differ. With neither, ``missing`` decides: the cap is never
    silently skipped.
    """

    argument: str | None = "/customer_id"
    """A JSON pointer (RFC 6901) into the tool's arguments; ``null`` reads none."""
    context: str | None = Field("customer_id", min_length=1)
    """A key of ``input.context`` (``X-Warden-Context-Customer-Id``); ``null`` reads none."""
    missing: Literal["require_approval", "deny"] = "require_approval"
    """What a call naming no customer gets."""

    @field_validator("argument")
    @classmethod
    def _pointer(cls, value: str | None) -> str | None:
        return _json_pointer(value) if value is not None else None


class CapConfig(_Section):
    """A cap on a value taken from a tool's arguments (``issue_refund.amount``)."""

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
    """The counter's name, as policies see it: ``input.budget.<name>``."""
    tool: str = Field(min_length=1)
    value: str = Field(min_length=1)
    """The argument holding the value, a number: a name, or a JSON pointer (``/refund/amount``)."""
    per: tuple[Literal["agent", "customer"], ...] = ("agent",)
    window: Window = "day"
    limit: float = Field(gt=0)
    currency: str = Field("USD", min_length=1, max_length=16)
    over: Literal["deny", "require_approval"] = "deny"
    customer: CapCustomerConfig = CapCustomerConfig()
    """For ``per: customer``: where the customer comes from, and what its absence means."""

    @field_validator("value")
    @classmethod
    def _value(cls, value: str) -> str:
        return _json_pointer(value) if value.startswith("/") else value

    @field_validator("per", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return (value,) if isinstance(value, str) else value

    @field_validator("per")
    @classmethod
    def _not_empty(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("must name agent, customer or both")
        if len(set(value)) != len(value):
            raise ValueError("names a subject twice")
        return value


class BudgetsConfig(_Section):
    """Spend caps: LLM spend per agent, and caps on tool argument values."""

    timezone: str = "UTC"
    """Where calendar windows start and end (an IANA zone name)."""
    llm: LlmBudgetConfig | None = None
    caps: tuple[CapConfig, ...] = ()
    reservation_ttl_s: float = Field(24 * 3600.0, gt=0, le=MAX_LIFETIME_S)
    """After this long, a reservation whose outcome never came is settled as spent."""
    trust_agent_results: bool = False
    """Release a delivered call's reservation when the agent reports it failed.

    Off by default: an agent's own ``is_error`` is a claim, not evidence, so
    only a trusted outcome (from a tool API Warden fronts) releases value.
    """
    trusted_failures: tuple[str, ...] = ()
    """MCP servers (upstream names, or ``warden mcp wrap --name``) whose reported failures
    release a capped call's hold: ``isError``, or arguments refused (``-32602``).

    Empty by default: the official SDKs answer any exception with ``isError``,
    one raised after the refund was made too, so an MCP failure stays spent.
    Name a server here only if its tools report a failure only when they did
    not act.
    """

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{value!r} is not a known time zone") from None
        return value

    @model_validator(mode="after")
    def _unique(self) -> BudgetsConfig:
        seen: set[tuple[str, str]] = set()
        for cap in self.caps:
            if cap.name == "llm":
                raise ValueError("caps: the name 'llm' is reserved for LLM spend")
            key = (cap.name, cap.window)
            if key in seen:
                raise ValueError(f"caps: {cap.name!r} is declared twice for the {cap.window}")
            seen.add(key)
        return self


class PricesConfig(_Section):
    """Model prices: the shipped table, with entries from ``file`` on top."""

    file: str | None = None


class WebhookConfig(_Section):
    """Where approval notifications go, signed with HMAC-SHA256 when ``secret`` is set."""

    url: str | None = None
    secret: str | None = None
    format: Literal["json", "slack"] = "json"
    tries: int = Field(3, ge=1, le=10)
    backoff_s: float = Field(0.5, gt=0, le=MAX_OPERATION_S)
    timeout_s: float = Field(5.0, gt=0, le=MAX_OPERATION_S)

    @field_validator("url")
    @classmethod
    def _http(cls, value: str | None) -> str | None:
        if value is not None and _split_url(value).scheme not in ("http", "https"):
            raise ValueError("must be an http:// or https:// URL")
        return value


_DURATION_PATTERN = r"^\d+(\.\d+)?[smhdw]$"
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class MonitorConfig(_Section):
    """Drift and quality monitoring (docs/monitoring.md): gauges computed off the request path."""

    enabled: bool = True
    interval_s: float = Field(60.0, ge=1, le=MAX_OPERATION_S)
    """How often the gauges are recomputed."""
    current: str = Field("1d", pattern=_DURATION_PATTERN)
    """The current window: the last ``1d`` (also ``30m``, ``24h``, ``2w``)."""
    reference: str = Field("7d", pattern=_DURATION_PATTERN)
    """The reference: this long just before the current window (the previous N days)."""
    baseline: str | None = None
    """A pinned baseline file (``warden monitor baseline``) used instead of ``reference``."""
    min_samples: int = Field(30, ge=1)
    """Fewer decisions than this on either side: the drift level is ``insufficient``."""
    max_events: int = Field(500_000, ge=1000, le=MAX_ITEMS)
    """Decisions, outcomes and approvals kept in memory for the windows (oldest dropped)."""
    replay_max_changes: int | None = Field(None, ge=0)
    """``warden policy replay`` exits 1 when more decisions than this change (unset: report)."""

    @field_validator("current", "reference")
    @classmethod
    def _window(cls, value: str) -> str:
        seconds = float(value[:-1]) * _DURATION_UNITS[value[-1]]
        if not 0 < seconds <= MAX_LIFETIME_S:
            raise ValueError("must be longer than 0 and at most ten years (520w)")
        return value


class ApprovalsConfig(_Section):
    """Human approval of actions a policy answers ``require_approval`` for."""

    mode: Literal["hold", "defer"] = "hold"
    """Default for decisions that do not say: keep the request open, or answer at once."""
    hold_timeout_s: float = Field(120.0, gt=0, le=MAX_LIFETIME_S)
    defer_ttl_s: float = Field(86400.0, gt=0, le=MAX_LIFETIME_S)
    required_approvals: int = Field(1, ge=1, le=10)
    """Votes every approval needs at least (a policy may ask for more); raising it
    applies to approvals already pending too."""
    keepalive_s: float = Field(10.0, gt=0, le=MAX_OPERATION_S)
    """How often a held stream gets an SSE comment so that proxies keep it open."""
    orphan_after_s: float = Field(30.0, gt=0, le=MAX_OPERATION_S)
    """A hold whose Warden sent no heartbeat for this long becomes a deferral."""
    max_pending_per_agent: int = Field(100, ge=0, le=MAX_ITEMS)
    """Approvals one agent may have waiting at once (0: no bound). A looping or hostile
    agent could otherwise open thousands, each a row approvers must wade through."""
    keep_decided_s: float = Field(30 * 86400.0, gt=0, le=MAX_LIFETIME_S)
    """How long an approval that ended (rejected, expired, consumed, a grant past its time)
    stays in the state store, with the arguments it showed approvers; then it is deleted.
    The audit log keeps every approval record for good, sealed like the decision's."""
    bind_context: tuple[str, ...] | None = None
    """The ``input.context`` keys an approval is bound to (``[customer_id]``); default: all.
    Name them when agents also send per-request context (a request id), which would
    otherwise keep a retry from matching its approval."""
    bind_claims: tuple[str, ...] | None = None
    """The agent's token claims (``input.agent.claims``) an approval is bound to; default:
    all but the token's own (``exp``, ``iat``, ``nbf``, ``jti``, ``auth_time``, ``nonce``,
    ``at_hash``, ``c_hash``, and Entra ID's ``uti``, ``aio``, ``rh``). Name them when
    tokens carry other claims that change from one token to the next, which would keep a
    retry under a fresh token from matching."""
    webhook: WebhookConfig = WebhookConfig()

    @field_validator("bind_claims")
    @classmethod
    def _claim_names(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is not None and not value:
            raise ValueError("name at least one claim, or leave it out to bind them all")
        return value

    @field_validator("bind_context")
    @classmethod
    def _context_keys(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("name at least one key, or leave it out to bind them all")
        # As input.context spells them: X-Warden-Context-Customer-Id is customer_id.
        return tuple(key.strip().lower().replace("-", "_") for key in value)


# The syntax of X-Warden-Agent (warden.ingress.headers).
_AGENT_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@/-]{0,127}\Z")


def _checked_agent_id(agent_id: str) -> str:
    """``agent_id`` if it has agent-id syntax: an id with a space could never be stopped
    by a kill switch (which refuses such targets), nor proved by a key or token."""
    if not _AGENT_ID_RE.match(agent_id):
        raise ValueError(f"agent id {agent_id!r} must be 1-128 of [A-Za-z0-9._:@/-]")
    return agent_id


# Asymmetric only: an HS* key would be a shared secret in the config, and
# "none" proves nothing.
JWT_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)


class AgentKeysConfig(_Section):
    """An agent's proxy keys, stored only as their SHA-256 (``warden identity new-key``)."""

    key_sha256: tuple[str, ...] = Field(min_length=1)

    @field_validator("key_sha256", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return (value,) if isinstance(value, str) else value

    @field_validator("key_sha256")
    @classmethod
    def _hex(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for digest in value:
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ValueError("each entry must be 64 lowercase hex digits (a SHA-256)")
        return value


class JwtConfig(_Section):
    """Agent tokens (e.g. Kubernetes projected service-account tokens) and how to verify them."""

    issuer: str = Field(min_length=1)
    audience: tuple[str, ...] = Field(min_length=1)
    """Accepted ``aud`` values; a token must name at least one."""
    algorithms: tuple[str, ...] = ("RS256", "ES256")
    jwks_file: str | None = None
    jwks_url: str | None = None
    jwks_ttl_s: float = Field(300.0, gt=0, le=MAX_LIFETIME_S)
    """How long fetched (or read) keys are used before they are fetched again."""
    jwks_timeout_s: float = Field(5.0, gt=0, le=MAX_OPERATION_S)
    leeway_s: float = Field(30.0, ge=0, le=300)
    """Clock skew allowed on ``exp``, ``nbf`` and ``iat``."""
    agent_claim: str = Field("sub", min_length=1)
    """The claim naming the agent; dots walk into objects: ``kubernetes.io.namespace``."""
    agents: dict[str, str] = Field(default_factory=dict)
    """Claim value to agent id. When set, only the values listed here are agents."""

    @field_validator("audience", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return (value,) if isinstance(value, str) else value

    @field_validator("algorithms")
    @classmethod
    def _asymmetric(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        bad = [a for a in value if a not in JWT_ALGORITHMS]
        if bad or not value:
            allowed = ", ".join(sorted(JWT_ALGORITHMS))
            raise ValueError(f"{bad or 'empty'}: only public-key algorithms ({allowed})")
        return value

    @field_validator("jwks_url")
    @classmethod
    def _http(cls, value: str | None) -> str | None:
        if value is None:
            return value
        parts = _split_url(value)
        if parts.scheme not in ("http", "https"):
            raise ValueError("must be an http:// or https:// URL")
        if parts.scheme == "http" and not _loopback(parts.hostname or ""):
            # Keys fetched in cleartext can be swapped on the way: every agent forged.
            raise ValueError(
                "must be https:// (http:// only to a loopback address): keys fetched in "
                "cleartext could be replaced on the way and any agent's token forged. A "
                "private CA: SSL_CERT_FILE"
            )
        return value

    @model_validator(mode="after")
    def _one_source(self) -> JwtConfig:
        if (self.jwks_file is None) == (self.jwks_url is None):
            raise ValueError("set exactly one of jwks_file and jwks_url")
        claim = self.agent_claim.casefold()
        if claim.endswith(".name") and (
            claim.startswith("kubernetes.io.") or claim.endswith("serviceaccount.name")
        ):
            # Any namespace can create a service account, pod or secret of that name (and
            # set its token's audience in the pod spec), and a node is any pod's.
            raise ValueError(
                f"agent_claim: {self.agent_claim} is the same in every namespace, so any "
                "namespace could act as the agent; use sub "
                "(system:serviceaccount:<namespace>:<name>) mapped in identity.jwt.agents"
            )
        return self


class IdentityConfig(_Section):
    """How agents other than ``agent.id`` prove who they are (see docs/identity.md)."""

    require_proof: bool = False
    """Require a key or token even for ``agent.id`` (a sidecar shared by several agents)."""
    agents: dict[str, AgentKeysConfig] = Field(default_factory=dict)
    """Proxy keys by agent id, sent in ``X-Warden-Agent-Key``."""
    jwt: JwtConfig | None = None
    """Tokens sent in ``X-Warden-Agent-Token``."""

    @model_validator(mode="after")
    def _agent_ids(self) -> IdentityConfig:
        ids = list(self.agents) + (list(self.jwt.agents.values()) if self.jwt else [])
        for agent_id in ids:
            _checked_agent_id(agent_id)
        return self


class GrpcTlsConfig(_Section):
    """TLS for the gRPC listener; ``client_ca`` also requires client certificates (mTLS)."""

    cert: str
    key: str
    client_ca: str | None = None


class GrpcConfig(_Section):
    """Settings of the gRPC listener (``listen.grpc``)."""

    tls: GrpcTlsConfig | None = None
    max_message_bytes: int = Field(DEFAULT_MAX_BODY_BYTES, ge=1024, le=2**31 - 1)
    """gRPC's own limit is a signed 32-bit count."""
    reflection: bool = True
    outcome_reporters: dict[str, list[str]] = Field(default_factory=dict)
    """Tool runners whose ``ReportOutcome`` is trusted: a proven agent id to the agents
    whose decisions it reports on (``{"tool-runner": ["refunds-bot"]}``). The agent's
    own report is its word, as through the base URL: a failure it reports releases
    nothing unless ``budgets.trust_agent_results``."""
    envoy_peers: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list)
    """Names of the Envoys that may be told the upstream keys Warden holds (ext_proc,
    ext_authz): a DNS, URI or email name of the client certificate, or its common name.
    Needs ``tls.client_ca``; without a name here, no caller is told a key."""

    @model_validator(mode="after")
    def _peers_need_client_certificates(self) -> GrpcConfig:
        if self.envoy_peers and (self.tls is None or self.tls.client_ca is None):
            raise ValueError("envoy_peers names client certificates: set tls.client_ca (mTLS) too")
        return self


class ExtAuthzConfig(_Section):
    """Envoy ext_authz, compatible with OPA-Envoy (see docs/envoy.md)."""

    query: str = Field("data.envoy.authz.allow", pattern=r"^data(\.[A-Za-z_][A-Za-z0-9_]*)+$")
    """The Rego rule evaluated: a bool, or an object with ``allowed``, ``headers``, ..."""
    dry_run: bool = False
    """Observe: every check is recorded and answered allowed."""
    upstream: str | None = None
    """An ``http`` upstream whose route rules map a checked request to a tool call."""
    proto_descriptor: str | None = None
    """A ``FileDescriptorSet`` file (``protoc --include_imports --descriptor_set_out``):
    gRPC request bodies of its services become ``input.parsed_body`` (OPA-Envoy's
    ``proto-descriptor``)."""
    max_request_bytes: int | None = Field(1024 * 1024, ge=1, le=2**32 - 1)
    """The filter's ``with_request_body.max_request_bytes`` (default: deploy/envoy's): keep
    them equal. Envoy says a body cut at exactly that length is whole, so a body that long
    counts as cut unless its ``content-length`` says it ends there. ``None``: trust
    Envoy's ``x-envoy-auth-partial-body`` alone. Must fit ``grpc.max_message_bytes``
    with 256 KiB to spare, or Warden does not start."""


class ExtProcConfig(_Section):
    """Envoy ext_proc for LLM traffic: which upstream a request's ``:authority`` means."""

    upstream_from: Literal["route", "authority"] = "route"
    """``route``: Envoy names each route's upstream in the stream's gRPC metadata
    (``x-warden-upstream``, set by ``ExtProcPerRoute`` ``grpc_initial_metadata``), so it is
    the upstream Envoy sends the request to. ``authority``: the request's ``:authority``
    names it (``hosts``): the agent's to choose, so only where Envoy routes by that host."""
    hosts: dict[str, str] = Field(default_factory=dict)
    """With ``upstream_from: authority``: ``:authority`` host to upstream name; otherwise
    matched to upstreams' ``base_url`` hosts."""
    max_message_timeout_s: float | None = Field(None, gt=0, le=86400)
    """Envoy's ``max_message_timeout`` for this filter (unset: Warden never asks for more time).
    An answer not ready after ``extend_after_ms`` (a tool call held for a person) is preceded
    by ``override_message_timeout`` with this value, so ``message_timeout`` can stay short."""
    extend_after_ms: int = Field(100, ge=1, le=int(MAX_OPERATION_S * 1000))
    """How long an answer may take before Warden asks Envoy for more time: keep it below
    Envoy's ``message_timeout`` (200 ms unless configured)."""
    unreported_modes: Literal["refuse", "trust"] = "refuse"
    """Envoy before 1.34 does not say which body modes it runs (``protocol_config``), and a
    response body mode of ``NONE`` would let tool calls pass unread. ``refuse``: a governed
    route is refused then; ``trust``: the filter is trusted to send bodies (BUFFERED or
    STREAMED, as deploy/envoy/envoy.yaml sets them)."""

    @model_validator(mode="after")
    def _hosts_need_authority(self) -> ExtProcConfig:
        if self.hosts and self.upstream_from == "route":
            raise ValueError(
                "hosts maps :authority to upstreams, which only upstream_from: authority "
                "reads; with the default (route) Envoy's route names each upstream "
                "(x-warden-upstream in ExtProcPerRoute grpc_initial_metadata, see "
                "docs/envoy.md): remove hosts, or set upstream_from: authority"
            )
        return self

    @model_validator(mode="after")
    def _extension_fits(self) -> ExtProcConfig:
        limit = self.max_message_timeout_s
        if limit is not None and self.extend_after_ms >= limit * 1000:
            raise ValueError(
                f"ext_proc.extend_after_ms ({self.extend_after_ms}) must be shorter than "
                f"max_message_timeout_s ({limit} s): the extension would come too late"
            )
        return self


class TransparentConfig(_Section):
    """Transparent mode through mitmproxy, for agents that cannot change a base URL."""

    listen: str | None = None
    """``host:port`` agents reach through ``HTTPS_PROXY`` or redirection; off when unset."""
    mode: Literal["regular", "transparent", "wireguard"] = "regular"
    """``regular``: an explicit proxy (``HTTPS_PROXY``); ``transparent``: iptables/nftables
    redirection (Linux); ``wireguard``: mitmproxy's WireGuard server."""
    hosts: dict[str, str] = Field(default_factory=dict)
    """Governed host name to upstream name; its traffic goes to that upstream's ``base_url``."""
    unknown_hosts: Literal["deny", "tunnel"] = "deny"
    """``deny``: refused (403 to CONNECT), no connection opened; ``tunnel``: passed through,
    never decrypted, only a connection record."""
    tunnel_private_networks: bool = False
    """With ``tunnel``: also tunnel to private addresses (RFC 1918, CGNAT 100.64/10, IPv6
    ULA). Loopback, link-local (cloud metadata), unspecified, multicast and this host's
    own addresses are refused whatever it says."""
    ca_dir: str = "./warden-data/ca"
    """Where the CA is generated on first start (key file 0600)."""
    ca_cert_file: str | None = None
    """A CA certificate (PEM) to use instead of a generated one; needs ``ca_key_file``."""
    ca_key_file: str | None = None
    """The CA's private key (PEM), e.g. a mounted Kubernetes Secret."""

    @field_validator("listen")
    @classmethod
    def _hostport(cls, value: str | None) -> str | None:
        if value is not None:
            parse_listen(value)
        return value

    @field_validator("hosts")
    @classmethod
    def _host_names(cls, value: dict[str, str]) -> dict[str, str]:
        out: dict[str, str] = {}
        for host, upstream in value.items():
            # An IP address in its standard form: 0x7f000002 and 127.0.0.2 are one host.
            name = normalize_host(host)
            if not re.fullmatch(
                r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*"
                r"|\[?[0-9a-f:.]+\]?",
                name,
            ):
                raise ValueError(f"{host!r} is not a host name (no scheme, port or path)")
            if name in out:
                raise ValueError(f"host {host!r} is listed twice")
            out[name] = upstream
        return out

    @model_validator(mode="after")
    def _ca_pair(self) -> TransparentConfig:
        if (self.ca_cert_file is None) != (self.ca_key_file is None):
            raise ValueError("ca_cert_file and ca_key_file go together")
        return self


class Config(_Section):
    """The whole configuration; every key has a safe default."""

    agent: AgentConfig = AgentConfig()
    mode: Mode = Mode.ENFORCE
    agents: dict[str, AgentConfig] = Field(default_factory=dict)
    """Settings for agents other than the default one, by agent id."""
    listen: ListenConfig = ListenConfig()
    upstreams: dict[str, UpstreamConfig] = Field(
        default_factory=lambda: {
            "openai": UpstreamConfig(protocol="openai", base_url=PROVIDER_UPSTREAMS["openai"]),
            "anthropic": UpstreamConfig(
                protocol="anthropic", base_url=PROVIDER_UPSTREAMS["anthropic"]
            ),
        }
    )
    """The only APIs Warden calls. Naming any replaces both defaults, so only the
    upstreams listed are reachable (see :data:`PROVIDER_UPSTREAMS` for what a name gives)."""
    tools: dict[str, ToolConfig] = Field(default_factory=dict)
    policy: PolicyConfig = PolicyConfig()
    audit: AuditConfig = AuditConfig()
    state: StateConfig = StateConfig()
    limits: LimitsConfig = LimitsConfig()
    admin: AdminConfig = AdminConfig()
    console: ConsoleConfig = ConsoleConfig()
    approvals: ApprovalsConfig = ApprovalsConfig()
    monitor: MonitorConfig = MonitorConfig()
    budgets: BudgetsConfig = BudgetsConfig()
    prices: PricesConfig = PricesConfig()
    identity: IdentityConfig = IdentityConfig()
    grpc: GrpcConfig = GrpcConfig()
    ext_authz: ExtAuthzConfig = ExtAuthzConfig()
    ext_proc: ExtProcConfig = ExtProcConfig()
    transparent: TransparentConfig | None = None
    """Transparent mode through mitmproxy; off when unset."""
    sessions: SessionsConfig = SessionsConfig()
    shutdown_grace_s: float = Field(DEFAULT_SHUTDOWN_GRACE_S, ge=0, le=MAX_OPERATION_S)

    @field_validator("agents")
    @classmethod
    def _agent_ids(cls, value: dict[str, AgentConfig]) -> dict[str, AgentConfig]:
        for agent_id in value:
            _checked_agent_id(agent_id)
        return value

    @field_validator("upstreams", mode="before")
    @classmethod
    def _provider_defaults(cls, value: Any) -> Any:
        # `openai: {base_url: http://llm:8000}` (or WARDEN_UPSTREAMS__OPENAI__BASE_URL alone)
        # means the OpenAI protocol; an empty `openai:` means the real provider. An entry
        # with other keys and no base_url (WARDEN_UPSTREAMS__OPENAI__TIMEOUT_S=600 alone)
        # still needs one: it must not add a route to the public provider unasked.
        if not isinstance(value, Mapping):
            return value  # pydantic names the error
        filled = dict(value)
        for name, url in PROVIDER_UPSTREAMS.items():
            given = {} if name in value and value[name] is None else value.get(name)
            if isinstance(given, Mapping):
                defaults = {"protocol": name}
                if given.get("protocol", name) == name and set(given) <= {"protocol"}:
                    defaults["base_url"] = url  # another protocol's URL is never guessed
                filled[name] = {**defaults, **given}
        return filled

    @field_validator("upstreams")
    @classmethod
    def _names(cls, value: dict[str, UpstreamConfig]) -> dict[str, UpstreamConfig]:
        for name in value:
            if not name or not all(c.isalnum() or c in "-_" for c in name):
                raise ValueError(f"upstream name {name!r} must be letters, digits, - or _")
        return value

    @model_validator(mode="after")
    def _transparent_upstreams(self) -> Config:
        if self.transparent is not None:
            for host, name in self.transparent.hosts.items():
                if name not in self.upstreams:
                    known = ", ".join(sorted(self.upstreams)) or "none"
                    raise ValueError(
                        f"transparent.hosts.{host}: no upstream named {name!r} "
                        f"(configured: {known})"
                    )
        return self

    @model_validator(mode="after")
    def _provable_reporters(self) -> Config:
        runner = self.agent.id
        if runner in self.grpc.outcome_reporters and not self.identity.require_proof:
            # Any caller without a key or token is the sidecar's own agent.
            raise ValueError(
                f"grpc.outcome_reporters: {runner!r} is this sidecar's own agent.id, which any "
                "caller is when it proves nothing (identity.require_proof is off): name a "
                "runner that proves its id with a key or token, or turn require_proof on"
            )
        return self

    def mode_for(self, agent_id: str) -> Mode:
        """The configured mode for an agent: its own setting, else the global one."""
        if agent_id == self.agent.id and self.agent.mode is not None:
            return self.agent.mode
        own = self.agents.get(agent_id)
        if own is not None and own.mode is not None:
            return own.mode
        return self.mode

    def risk_of(self, tool: str | None) -> str:
        """The tool's risk class (``write`` unless configured)."""
        if tool is None:
            return "write"
        entry = self.tools.get(tool)
        return entry.risk if entry is not None else "write"


def parse_listen(value: str) -> tuple[str, int]:
    """Split ``host:port`` (``[::1]:8080`` for IPv6); raise ``ValueError`` if malformed."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not host:port")
    return host.strip("[]"), int(port)


EnvSources = dict[tuple[str, ...], str]
"""The configuration path each ``WARDEN_*`` variable set, to its variable's name."""


def _env_overrides(environ: Mapping[str, str]) -> tuple[dict[str, Any], EnvSources]:
    tree: dict[str, Any] = {}
    sources: EnvSources = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name in ENV_RESERVED or _SERVICE_LINK.match(name):
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX) :].split("__")]
        if not all(path):
            raise ConfigError(f"{name}: empty key segment")
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{name}: {key} is set both as a value and a section")
        node[path[-1]] = _env_value(name, path, raw)
        sources[tuple(path)] = name
    return tree, sources


def _env_value(name: str, path: list[str], raw: str) -> Any:
    """The value of ``name`` for the setting at ``path``, never echoed in an error.

    Text stays as written: read as YAML, a password ``012345`` would become
    5349 (octal), ``yes`` True, ``&a pw`` "pw" and ``p: w`` a mapping. Only a
    setting that takes a number, true/false, list or mapping is read as YAML.
    """
    expected = _setting_type(path)
    if not raw or expected is None or _is_text(expected):
        return raw  # unknown keys stay text too: validation names them
    # Deferred: warden.audit imports this module.
    from warden.audit.record import is_credential_key  # noqa: PLC0415

    if is_credential_key(path[-1]) and not _is_structured(expected):
        return raw
    try:
        return yaml.safe_load(raw)
    except (yaml.YAMLError, ValueError, RecursionError):
        # The parser's message quotes what it read (an alias's name): part of the value.
        raise ConfigError(
            f"{name}: not a valid value for {'.'.join(path)}, which takes "
            f"{_kind(expected)} written as YAML (the value is not shown)"
        ) from None


def _setting_type(path: list[str]) -> Any:
    """The type the setting at ``path`` holds, or ``None`` where no setting is."""
    annotation: Any = Config
    for key in path:
        annotation = _optional(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            field = annotation.model_fields.get(key)
            if field is None:
                return None
            annotation = field.annotation
        elif get_origin(annotation) in (dict, Mapping):
            annotation = get_args(annotation)[1]  # the key names an entry of the map
        else:
            return None
    return annotation


def _optional(annotation: Any) -> Any:
    """``annotation`` without ``Annotated[...]`` and ``| None``."""
    if get_origin(annotation) is Annotated:
        return _optional(get_args(annotation)[0])
    if get_origin(annotation) in (Union, types.UnionType):
        kinds = [a for a in get_args(annotation) if a is not type(None)]
        if len(kinds) == 1:
            return _optional(kinds[0])
    return annotation


def _is_text(annotation: Any) -> bool:
    annotation = _optional(annotation)
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        return all(_is_text(a) for a in get_args(annotation) if a is not type(None))
    if origin is Literal:
        return all(isinstance(a, str) for a in get_args(annotation))
    return isinstance(annotation, type) and issubclass(annotation, str | SecretStr)


def _is_structured(annotation: Any) -> bool:
    annotation = _optional(annotation)
    shape = get_origin(annotation) or annotation
    return isinstance(shape, type) and issubclass(shape, BaseModel | Mapping | list | tuple)


def _kind(annotation: Any) -> str:
    annotation = _optional(annotation)
    shape = get_origin(annotation) or annotation
    if isinstance(shape, type) and issubclass(shape, BaseModel | Mapping):
        return "a mapping ({key: value, ...})"
    if isinstance(shape, type) and issubclass(shape, list | tuple):
        return "a list ([a, b])"
    if annotation is bool:
        return "true or false"
    if annotation in (int, float):
        return "a number"
    return "a value"


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping.

    YAML takes the last one silently: a ``mode: observe`` further down a file
    would win over ``mode: enforce``, and a second ``tools:`` drop the first.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # "<<": keys it brings may be given again, as YAML intends
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")


def _yaml_error(exc: yaml.YAMLError) -> str:
    """What is wrong and where, never the text around it: that line may hold a secret.

    The parser quotes what it read (``found undefined alias 'Hunter2'``, a tag's
    name): quoted text is left out too.
    """
    problem = str(getattr(exc, "problem", None) or type(exc).__name__)
    if "alias" in problem or "tag" in problem:
        problem = _QUOTED.sub("'…'", problem)
    mark = getattr(exc, "problem_mark", None)
    if mark is None:
        return str(problem)
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"


MAX_YAML_DEPTH = 100
"""How deep a configuration's lists and mappings may nest (its own go six deep)."""


def _parse_yaml(text: str, where: str) -> Any:
    """The document in ``text``; ``ConfigError`` naming ``where``, never a value, if unreadable."""
    try:
        loaded = yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML: {_yaml_error(exc)}") from None
    except RecursionError:
        raise ConfigError(f"{where}: not valid YAML: lists or mappings nest too deeply") from None
    except ValueError as exc:
        # A constructor's own: an integer past Python's 4300 digits, a date that is not.
        raise ConfigError(f"{where}: not valid YAML: {_unreadable(exc)}") from None
    if _depth(loaded) > MAX_YAML_DEPTH:
        # Parsed, it would still exhaust the stack of whatever walks it next.
        raise ConfigError(f"{where}: lists or mappings nest more than {MAX_YAML_DEPTH} deep")
    return loaded


def _unreadable(exc: ValueError) -> str:
    if "integer string conversion" in str(exc):
        return "an integer has more than 4300 digits"
    return f"a value cannot be read ({exc})"  # a date that does not exist: no value quoted


def _depth(value: Any) -> int:
    """How deep ``value``'s lists and mappings nest (without recursing)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    seen: set[int] = set()
    while stack:
        node, depth = stack.pop()
        if not isinstance(node, dict | list) or id(node) in seen:
            continue
        seen.add(id(node))  # an alias (&a ... *a) is one node, reached twice
        deepest = max(deepest, depth + 1)
        if deepest > MAX_YAML_DEPTH:
            return deepest
        children = node.values() if isinstance(node, dict) else node
        stack.extend((child, depth + 1) for child in children)
    return deepest


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


_BOUNDS = {
    MAX_LIFETIME_S: "ten years, in seconds",
    MAX_OPERATION_S: "a day, in seconds",
    MAX_OPERATION_S * 1000: "a day, in milliseconds",
}


def _format(err: ValidationError, sources: EnvSources | None = None) -> str:
    lines = []
    for item in err.errors():
        loc = tuple(str(p) for p in item["loc"])
        key = ".".join(loc) or "(top level)"
        msg = item["msg"]
        if item["type"] == "extra_forbidden":
            msg = "unknown key"
        bound = (item.get("ctx") or {}).get("le")
        if item["type"] == "less_than_equal" and bound in _BOUNDS:
            msg = f"{msg} ({_BOUNDS[bound]})"
        lines.append(f"{key}: {msg}{_from_env(loc, sources or {})}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def _from_env(loc: tuple[str, ...], sources: EnvSources) -> str:
    """Which ``WARDEN_*`` variables set the key in error, or something in it."""
    if not loc:
        return ""
    names = sorted(
        name
        for path, name in sources.items()
        if loc[: len(path)] == path or path[: len(loc)] == loc
    )
    return f" (set by {', '.join(names)})" if names else ""


def load_config(
    path: str | Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Read, merge and validate the configuration.

    Order of precedence, lowest first: defaults, the YAML file, ``WARDEN_*``
    variables, then ``overrides`` (used by tests and the demo). Relative paths
    in the file stay relative to the working directory, as with OPA.
    """
    data: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(
                f"{path}: not UTF-8 text (byte {exc.start} cannot be read); save it as UTF-8"
            ) from None
        loaded = _parse_yaml(text, str(path))
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys")
        data = loaded or {}
    from_env, sources = _env_overrides(os.environ if environ is None else environ)
    data = _merge(data, from_env)
    if overrides:
        data = _merge(data, overrides)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format(exc, sources)) from None
