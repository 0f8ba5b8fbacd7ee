"""Header hygiene for the base-URL proxy: what is forwarded, returned and recorded.

Credentials are forwarded to the configured upstream (the agent owns them),
unless Warden holds that upstream's key (:mod:`warden.credentials`): then the
agent's are dropped and Warden's is sent. Neither is ever recorded: recording
uses an allowlist, so a new secret-bearing header cannot leak by default.
Warden's own headers (``X-Warden-*``: the agent id, its proxy key
``X-Warden-Agent-Key`` and token ``X-Warden-Agent-Token``, context) are for
Warden alone: never forwarded, never recorded. Who the agent is gets decided
by :mod:`warden.identity`, not here.
"""

from __future__ import annotations

from collections.abc import Mapping

from multidict import CIMultiDict, CIMultiDictProxy

from warden.credentials import Credential

__all__ = [
    "AGENT_HEADER",
    "CONTEXT_PREFIX",
    "DECISION_HEADER",
    "context_from",
    "recordable",
    "request_headers",
    "response_headers",
]

AGENT_HEADER = "X-Warden-Agent"
CONTEXT_PREFIX = "x-warden-context-"
DECISION_HEADER = "X-Warden-Decision-Id"
BLOCKED_HEADER = "X-Warden-Blocked"

# RFC 9110 section 7.6.1, plus the proxy-specific ones clients still send.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
# Recomputed by Warden for the hop it makes.
_REQUEST_DROP = HOP_BY_HOP | {"host", "content-length", "accept-encoding", "expect"}
# Warden returns bodies decoded, often rewritten, so length and encoding change.
# Alt-Svc would send a client that follows it (HTTP/3 over UDP) to the provider
# directly, around Warden: the alternative is the provider's, not Warden's.
_RESPONSE_DROP = HOP_BY_HOP | {"content-length", "content-encoding", "alt-svc"}


def _inflated_by_server(coding: str) -> bool:
    """A request coding aiohttp's server inflates (``HttpRequestParser``: ASCII, any case)."""
    return coding.isascii() and coding.lower() in {"gzip", "deflate", "br", "zstd"}


_RECORDABLE = frozenset(
    {
        "user-agent",
        "content-type",
        "accept",
        "anthropic-version",
        "anthropic-beta",
        "openai-beta",
        "x-stainless-lang",
        "x-stainless-package-version",
        "x-stainless-runtime",
        "x-request-id",
    }
)
_MAX_CONTEXT_VALUE = 256


def _connection_tokens(headers: Mapping[str, str]) -> set[str]:
    # Headers named in Connection are hop-by-hop for this message too.
    value = headers.get("connection", "")
    if not value:
        return set()
    return {t.strip().lower() for t in value.split(",") if t.strip()}


def request_headers(
    incoming: CIMultiDictProxy[str], credential: Credential | None = None
) -> CIMultiDict[str]:
    """Headers to send upstream: hop-by-hop and every ``X-Warden-*`` (credentials too) removed.

    With ``credential`` (Warden holds the upstream's key), every header the
    agent could carry a key in is dropped too, and Warden's is set.
    """
    named = _connection_tokens(incoming)
    drop = _REQUEST_DROP | named if named else _REQUEST_DROP
    if credential is not None:
        drop = drop | credential.drop
    codings = incoming.getall("content-encoding", ())
    if codings and _inflated_by_server(codings[-1]):
        # aiohttp's server inflated the body Warden holds (by the last header, as its
        # parser does): forwarded labelled, the upstream would inflate it again.
        drop = drop | {"content-encoding"}
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in incoming.items():
        lower = name.lower()
        if lower in drop or lower.startswith("x-warden-"):
            continue
        out.add(name, value)
    if credential is not None:
        out[credential.header] = credential.value
    return out


def response_headers(upstream: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """Headers to return to the agent from an upstream response.

    Never an ``X-Warden-*`` header: those are Warden's word to the agent
    (``X-Warden-Blocked``), which an upstream must not forge.
    """
    named = _connection_tokens(upstream)
    drop = _RESPONSE_DROP | named if named else _RESPONSE_DROP
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in upstream.items():
        lower = name.lower()
        if lower not in drop and not lower.startswith("x-warden-"):
            out.add(name, value)
    return out


def recordable(incoming: Mapping[str, str]) -> dict[str, str]:
    """The few headers safe to keep in audit records (an allowlist: no secrets)."""
    return {lower: v for k, v in incoming.items() if (lower := k.lower()) in _RECORDABLE}


def context_from(incoming: Mapping[str, str]) -> dict[str, str]:
    """``X-Warden-Context-Customer-Id: C-1`` becomes ``{"customer_id": "C-1"}``."""
    context: dict[str, str] = {}
    for name, value in incoming.items():
        lower = name.lower()
        if lower.startswith(CONTEXT_PREFIX) and len(lower) > len(CONTEXT_PREFIX):
            key = lower[len(CONTEXT_PREFIX) :].replace("-", "_")
            context[key] = value[:_MAX_CONTEXT_VALUE]
    return context
