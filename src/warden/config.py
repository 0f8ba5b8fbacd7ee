"""Typed configuration: one YAML file, every key optional, ``WARDEN_*`` overrides.

Defaults are the named constants below. Validation happens once, at start, and
an invalid file fails with a message naming the key (``policy.deadline_ms:
Input should be greater than 0``). Environment variables override the file:
``WARDEN_MODE=observe``, ``WARDEN_LISTEN__PROXY=0.0.0.0:8080`` (``__`` walks
into nested keys; values are read as YAML scalars, so ``50`` is a number).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from warden.errors import ConfigError
from warden.model import Effect, Mode
from warden.protocols import http_tool
from warden.protocols.registry import PassthroughRule

__all__ = [
    "DEFAULT_ADMIN_LISTEN",
    "DEFAULT_AGENT_ID",
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_POLICY_QUERY",
    "DEFAULT_PROXY_LISTEN",
    "AdminConfig",
    "AgentConfig",
    "AgentKeysConfig",
    "ApprovalsConfig",
    "AuditConfig",
    "BudgetsConfig",
    "CapConfig",
    "CapCustomerConfig",
    "Config",
    "HttpRouteConfig",
    "IdentityConfig",
    "JwtConfig",
    "LimitsConfig",
    "ListenConfig",
    "LlmBudgetConfig",
    "PolicyConfig",
    "PricesConfig",
    "StateConfig",
    "SubjectsConfig",
    "ToolConfig",
    "UpstreamConfig",
    "load_config",
    "parse_listen",
]

DEFAULT_AGENT_ID = "default-agent"
DEFAULT_PROXY_LISTEN = "127.0.0.1:8080"
DEFAULT_ADMIN_LISTEN = "127.0.0.1:8081"
DEFAULT_POLICY_BUNDLES = ("policies/customer-support",)
DEFAULT_POLICY_QUERY = "data.warden.decision"
DEFAULT_POLICY_DEADLINE_MS = 50.0
DEFAULT_POLICY_QUEUE_TIMEOUT_S = 1.0
DEFAULT_POLICY_WORKERS = 2
DEFAULT_POLICY_CACHE_SIZE = 10_000
DEFAULT_AUDIT_DIR = "./warden-data/audit"
DEFAULT_STATE_URL = "sqlite:///./warden-data/state.db"
DEFAULT_MAX_BODY_BYTES = 10 * 1024 * 1024
DEFAULT_UPSTREAM_TIMEOUT_S = 300.0
DEFAULT_CONNECT_TIMEOUT_S = 10.0
DEFAULT_SHUTDOWN_GRACE_S = 20.0
ENV_PREFIX = "WARDEN_"
# Read by the CLI, not by the server; never treated as config overrides.
ENV_RESERVED = frozenset({"WARDEN_CONFIG", "WARDEN_TOKEN", "WARDEN_ADMIN_URL", "WARDEN_PYTHON"})


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class AgentConfig(_Section):
    """The agent this sidecar speaks for when a request names none."""

    id: str = Field(DEFAULT_AGENT_ID, min_length=1, max_length=128)
    version: str = ""
    mode: Mode | None = None
    """Per-agent mode; overrides the top-level ``mode`` for this agent."""


class ListenConfig(_Section):
    """Where the proxy and admin listeners bind (``host:port``; port 0 picks one)."""

    proxy: str = DEFAULT_PROXY_LISTEN
    admin: str = DEFAULT_ADMIN_LISTEN

    @field_validator("proxy", "admin")
    @classmethod
    def _hostport(cls, value: str) -> str:
        parse_listen(value)
        return value


class HttpRouteConfig(_Section):
    """A route of a plain HTTP tool API that is one tool call (see docs/http-tools.md)."""

    method: str
    path: str
    """A path template after the upstream name: ``/orders/{order_id}/refunds``."""
    tool: str = Field(min_length=1, max_length=128)
    arguments: dict[str, str] = Field(default_factory=dict)
    """Argument name to ``"{param}"`` (a path parameter) or a JSON pointer into the body."""

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
    def _arguments(cls, value: dict[str, str]) -> dict[str, str]:
        for name, source in value.items():
            try:
                http_tool.parse_argument(source)
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
        return value

    @model_validator(mode="after")
    def _compiles(self) -> HttpRouteConfig:
        http_tool.RouteRule.compile(self.method, self.path, self.tool, self.arguments)
        return self


class UpstreamConfig(_Section):
    """An API the agent may reach through ``/<name>/...``; nothing else is reachable."""

    protocol: Literal["openai", "anthropic", "http"]
    base_url: str
    timeout_s: float = Field(DEFAULT_UPSTREAM_TIMEOUT_S, gt=0)
    connect_timeout_s: float = Field(DEFAULT_CONNECT_TIMEOUT_S, gt=0)
    passthrough: tuple[str, ...] = ()
    """Routes Warden does not parse, forwarded as one ``llm_call`` each: ``"GET v1/files"``,
    ``"POST v1/batches/*"`` (``*`` one segment, a final ``**`` the rest). Refused otherwise."""
    routes: tuple[HttpRouteConfig, ...] = ()
    """``protocol: http`` only: requests that are tool calls, tried in order."""
    unmatched: Literal["deny", "allow"] = "deny"
    """With ``routes``: refuse a request no route fits, or forward it as one ``http_call``."""

    @model_validator(mode="after")
    def _routes_on_http(self) -> UpstreamConfig:
        if self.routes and self.protocol != "http":
            raise ValueError("routes: only an upstream with protocol: http has route rules")
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
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an absolute http:// or https:// URL")
        if parts.query or parts.fragment:
            raise ValueError("must not carry a query or fragment")
        return value.rstrip("/")


class ToolConfig(_Section):
    """Per-tool settings: the risk class chooses the fallback when policy fails."""

    risk: Literal["read_only", "write", "high"] = "write"


class SigningConfig(_Section):
    """Bundle signature checking (OPA ``.signatures.json``)."""

    required: bool = False
    keys: dict[str, str] = Field(default_factory=dict)
    """Key id to a PEM public key, or to ``@path/to/key.pem``."""


class PolicyConfig(_Section):
    """The Rego bundles and how they are evaluated."""

    bundles: tuple[str, ...] = DEFAULT_POLICY_BUNDLES
    query: str = Field(DEFAULT_POLICY_QUERY, pattern=r"^data(\.[A-Za-z_][A-Za-z0-9_]*)+$")
    default_effect: Effect = Effect.DENY
    """What an undefined policy result means."""
    deadline_ms: float = Field(DEFAULT_POLICY_DEADLINE_MS, gt=0)
    """How long one evaluation may run on a worker (not counting its wait for one)."""
    queue_timeout_s: float = Field(DEFAULT_POLICY_QUEUE_TIMEOUT_S, gt=0)
    """How long a request may wait for a free worker before Warden answers 503
    with ``Retry-After`` (never a fallback decision)."""
    workers: int = Field(DEFAULT_POLICY_WORKERS, ge=1, le=64)
    cache_size: int = Field(DEFAULT_POLICY_CACHE_SIZE, ge=0)
    watch: bool = True
    """Reload bundles from their folders when files change."""
    poll_interval_s: float = Field(5.0, gt=0)
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


_SUBJECT_ROOTS = ("context.", "action.arguments.", "agent.claims.")


class SubjectsConfig(_Section):
    """Where the data subject of an action (whose key seals its personal fields) comes from."""

    sources: tuple[str, ...] = ("context.customer_id",)
    """Dotted paths, tried in order: ``context.<name>``, ``action.arguments.<path>``,
    ``agent.claims.<path>``. The first present value names the subject."""
    max_keys: int = Field(100_000, ge=1)
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


class AuditConfig(_Section):
    """The local, append-only, hash-chained audit log."""

    dir: str = DEFAULT_AUDIT_DIR
    fsync: Literal["always", "batch", "never"] = "always"
    segment_max_bytes: int = Field(64 * 1024 * 1024, ge=4096)
    checkpoint_interval_s: float = Field(60.0, gt=0)
    signing_key_file: str | None = None
    """Ed25519 private key (PEM) for checkpoints; generated in ``dir`` when absent."""
    subjects: SubjectsConfig = SubjectsConfig()


class StateConfig(_Section):
    """Where approvals, budgets and kill switches live."""

    url: str = DEFAULT_STATE_URL

    @field_validator("url")
    @classmethod
    def _scheme(cls, value: str) -> str:
        if not value.startswith(("sqlite:///", "postgresql://", "postgres://")):
            raise ValueError("must start with sqlite:/// or postgresql://")
        return value


class LimitsConfig(_Section):
    """Bounds on what agents may send."""

    max_body_bytes: int = Field(DEFAULT_MAX_BODY_BYTES, ge=1024)


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
    """Held per call before its cost is known; the actual cost is settled after."""


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
    reservation_ttl_s: float = Field(24 * 3600.0, gt=0)
    """After this long, a reservation whose outcome never came is settled as spent."""
    trust_agent_results: bool = False
    """Release a delivered call's reservation when the agent reports it failed.

    Off by default: an agent's own ``is_error`` is a claim, not evidence, so
    only a trusted outcome (from a tool API Warden fronts) releases value.
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
    backoff_s: float = Field(0.5, gt=0)
    timeout_s: float = Field(5.0, gt=0)

    @field_validator("url")
    @classmethod
    def _http(cls, value: str | None) -> str | None:
        if value is not None and urlsplit(value).scheme not in ("http", "https"):
            raise ValueError("must be an http:// or https:// URL")
        return value


class ApprovalsConfig(_Section):
    """Human approval of actions a policy answers ``require_approval`` for."""

    mode: Literal["hold", "defer"] = "hold"
    """Default for decisions that do not say: keep the request open, or answer at once."""
    hold_timeout_s: float = Field(120.0, gt=0)
    defer_ttl_s: float = Field(86400.0, gt=0)
    required_approvals: int = Field(1, ge=1, le=10)
    keepalive_s: float = Field(10.0, gt=0)
    """How often a held stream gets an SSE comment so that proxies keep it open."""
    orphan_after_s: float = Field(30.0, gt=0)
    """A hold whose Warden sent no heartbeat for this long becomes a deferral."""
    webhook: WebhookConfig = WebhookConfig()


# The syntax of X-Warden-Agent (warden.ingress.headers).
_AGENT_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@/-]{0,127}$")
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
    jwks_ttl_s: float = Field(300.0, gt=0)
    """How long fetched (or read) keys are used before they are fetched again."""
    jwks_timeout_s: float = Field(5.0, gt=0)
    leeway_s: float = Field(30.0, ge=0, le=300)
    """Clock skew allowed on ``exp``, ``nbf`` and ``iat``."""
    agent_claim: str = Field("sub", min_length=1)
    """The claim naming the agent; dots walk into objects: ``kubernetes.io.serviceaccount.name``."""
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
        if value is not None and urlsplit(value).scheme not in ("http", "https"):
            raise ValueError("must be an http:// or https:// URL")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> JwtConfig:
        if (self.jwks_file is None) == (self.jwks_url is None):
            raise ValueError("set exactly one of jwks_file and jwks_url")
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
            if not _AGENT_ID_RE.match(agent_id):
                raise ValueError(f"agent id {agent_id!r} must be 1-128 of [A-Za-z0-9._:@/-]")
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
            "openai": UpstreamConfig(protocol="openai", base_url="https://api.openai.com"),
            "anthropic": UpstreamConfig(protocol="anthropic", base_url="https://api.anthropic.com"),
        }
    )
    tools: dict[str, ToolConfig] = Field(default_factory=dict)
    policy: PolicyConfig = PolicyConfig()
    audit: AuditConfig = AuditConfig()
    state: StateConfig = StateConfig()
    limits: LimitsConfig = LimitsConfig()
    admin: AdminConfig = AdminConfig()
    approvals: ApprovalsConfig = ApprovalsConfig()
    budgets: BudgetsConfig = BudgetsConfig()
    prices: PricesConfig = PricesConfig()
    identity: IdentityConfig = IdentityConfig()
    shutdown_grace_s: float = Field(DEFAULT_SHUTDOWN_GRACE_S, ge=0)

    @field_validator("upstreams")
    @classmethod
    def _names(cls, value: dict[str, UpstreamConfig]) -> dict[str, UpstreamConfig]:
        for name in value:
            if not name or not all(c.isalnum() or c in "-_" for c in name):
                raise ValueError(f"upstream name {name!r} must be letters, digits, - or _")
        return value

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


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name in ENV_RESERVED:
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX) :].split("__")]
        if not all(path):
            raise ConfigError(f"{name}: empty key segment")
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{name}: {key} is set both as a value and a section")
        node[path[-1]] = yaml.safe_load(raw) if raw else raw
    return tree


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def _format(err: ValidationError) -> str:
    lines = []
    for item in err.errors():
        key = ".".join(str(p) for p in item["loc"]) or "(top level)"
        msg = item["msg"]
        if item["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{key}: {msg}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


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
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys")
        data = loaded or {}
    data = _merge(data, _env_overrides(os.environ if environ is None else environ))
    if overrides:
        data = _merge(data, overrides)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format(exc)) from None
