"""Record schema v1: building record bodies from actions, decisions and outcomes.

Everything here is pure: no I/O, no clock. :class:`~warden.audit.log.AuditLog`
adds the envelope (``v``, ``id``, ``seq``, ``time``, ``prev``), seals personal
fields and encodes. The schema is documented in docs/audit.md.

Two defences run on every body before it is stored:

* provider credentials are dropped from request headers and masked wherever a
  key named like a credential appears (``authorization``, ``x-api-key``...),
  and inside any string (or key) holding a URL: its password, or its user info
  when it has no password (a token as user name), and the values of its
  credential-named query parameters (``?api_key=...``, ``?sig=...``);
* the policy's redaction obligations (``Decision.obligations.redact``) replace
  the named argument, context, MCP answer or result paths with
  ``"[redacted]"`` (:func:`redact_target` says which path names what). Arguments
  or a result hidden whole keep only their SHA-256 (and the argument names),
  and arguments that are not a JSON object are never written in plaintext: no
  path inside them can be redacted. A path naming anything else in the input
  document (``agent.claims.email``) cannot be applied: the decision record
  says so (``obligations.redact_not_applied``). :mod:`warden.audit.redaction`
  makes sure every decision carries its redactions, whoever decided it.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import unquote_plus

import orjson
import rfc8785

from warden.model import Action, Decision, Outcome
from warden.text import mended
from warden.urls import MASK

__all__ = [
    "CREDENTIAL_HEADERS",
    "GENESIS_PREV",
    "MAX_RESULT_CHARS",
    "RECORD_DIGEST_PREFIX",
    "REDACTED",
    "RESERVED_KINDS",
    "SCHEMA_VERSION",
    "ApprovalEvidence",
    "RecordRef",
    "action_body",
    "apply_redactions",
    "arguments_digest",
    "arguments_sha256",
    "decision_body",
    "encode",
    "is_credential_key",
    "mask_credentials",
    "outcome_body",
    "path_holds_arguments",
    "redact_target",
    "scrub_headers",
    "tools_sha256",
    "unmaskable_redactions",
]

SCHEMA_VERSION = 1
GENESIS_PREV = "0" * 64
"""The ``prev`` of the first record: there is no previous record."""
REDACTED = "[redacted]"
MAX_RESULT_CHARS = 64 * 1024
"""Tool results longer than this are cut; the record keeps the full result's SHA-256."""
RESERVED_KINDS = frozenset({"decision", "outcome"})

CREDENTIAL_HEADERS = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "x-api-key",
        "api-key",
        "x-goog-api-key",
        "cookie",
        "set-cookie",
    }
)
# Keys masked anywhere in arguments, context, results and generic bodies: defence
# in depth for tools that pass credentials through (an http tool with its own
# headers, an OAuth token endpoint). A key is compared lower-cased without "-"
# and "_": it is a credential when it is one of the names, contains one of the
# parts, or ends in "token" (api_token, x-vault-token, x-amz-security-token). Only
# the singular: max_tokens and prompt_tokens stay.
_CREDENTIAL_NAMES = frozenset(
    {h.replace("-", "") for h in CREDENTIAL_HEADERS} | {"token", "auth", "bearer", "pwd", "jwt"}
)
_CREDENTIAL_PARTS = (
    "password",
    "passwd",
    "passphrase",
    "secret",
    "apikey",
    "privatekey",
    "credential",
    "cookie",
    "authorization",
    "accesstoken",
    "refreshtoken",
    "idtoken",
    "authtoken",
    "sessiontoken",
    "bearertoken",
    "accesskey",
    "wardenagentkey",
    "wardenagenttoken",
)
_credential_memo: dict[str, bool] = {}
_MEMO_KEYS = 4096
_MEMO_KEY_CHARS = 64
# Cheap test before a result is parsed to be masked: no credential name without one of these.
_CREDENTIAL_HINT = re.compile(r"pass|secret|token|key|credential|cookie|auth|bearer|pwd|jwt", re.I)
# Query parameters that carry a credential under a name no argument key is masked for
# (an argument named "code" or "key" is no secret; a URL's ?code= or ?key= is): Azure
# SAS "sig" and Functions "code", OAuth codes, Google API "key", presigned "Signature",
# "X-Amz-Signature", "X-Goog-Signature", "oauth_signature", session ids. Compared as keys
# are (lower-cased, without "-" and "_"); "...credential" names are credentials already.
_PARAM_NAMES = frozenset({"sig", "code", "pass", "pw", "hmac"})
_PARAM_SUFFIXES = ("signature", "key", "sessionid", "sessid")
# Cheap test before a URL's parameters are read: no credential parameter without one of these.
_PARAM_HINT = re.compile(_CREDENTIAL_HINT.pattern + r"|pw|sig|code|hmac|sess", re.I)
_ENCODE_OPTS = orjson.OPT_SORT_KEYS
_SCALARS = frozenset({str, int, float, bool, type(None)})
# Credentials inside URLs: only a string holding this is looked into (one C-speed search).
_URL_MARK: Final = "://"
# A URL's authority ends at the first "/" (or where the text around it resumes), not at
# "?" or "#": libpq reads both as characters of a password (postgresql://u:p?w@db).
_AUTHORITY_END = re.compile(r"[/\s\"'<>`]")
# A query or fragment parameter (?api_key=..., #access_token=...). A value stops at "?"
# too, so a URL nested in another's query (?next=https://h/?token=...) is read as well.
_URL_PARAM = re.compile(r"([?&;#])([^=&;#?\s\"'<>`]+)=([^&;#?\s\"'<>`]+)")
_MASKS = frozenset({REDACTED, MASK})
"""Values masked already (here, or by :func:`warden.urls.shown_url`): hiding them hides nothing."""
# Passwords that say the user name is the secret: GitHub's https://<token>:x-oauth-basic@.
_NO_PASSWORD = frozenset({"", "x-oauth-basic"})


@dataclass(frozen=True, slots=True)
class RecordRef:
    """Where a record landed: its id, sequence number (= leaf index) and hash (hex)."""

    id: str
    seq: int
    hash: str


@dataclass(frozen=True, slots=True)
class ApprovalEvidence:
    """Who approved an action, when, and the hash of the exact arguments they saw.

    ``arguments_sha256`` is :func:`arguments_sha256` of the arguments shown to
    the approver, so an auditor can tell that what ran is what was approved.
    """

    approval_id: str
    approver: str
    decided_at: str
    arguments_sha256: str
    verdict: str = "approved"

    def as_dict(self) -> dict[str, str]:
        """The record form."""
        return {
            "id": self.approval_id,
            "approver": self.approver,
            "decided_at": self.decided_at,
            "arguments_sha256": self.arguments_sha256,
            "verdict": self.verdict,
        }


def arguments_sha256(arguments: Mapping[str, Any] | None) -> str:
    """SHA-256 (hex) of the RFC 8785 canonical JSON of tool arguments.

    Canonical JSON makes the hash reproducible in any language, so the
    approvals queue, the audit record and an auditor's own tools agree.
    """
    return hashlib.sha256(
        rfc8785.dumps(dict(arguments) if arguments is not None else None)
    ).hexdigest()


RECORD_DIGEST_PREFIX: Final = b"warden-record-encoding\n"
"""Hashed before the record encoding of arguments RFC 8785 cannot write: such a digest
never equals an RFC 8785 one, whatever the two texts are."""


def arguments_digest(arguments: Mapping[str, Any] | None, raw: str | None = None) -> str | None:
    """The hash a record keeps of arguments it does not show.

    :func:`arguments_sha256` of parsed arguments (what approvals bind to);
    for values RFC 8785 cannot write (``NaN``, integers past its range), the
    SHA-256 of :data:`RECORD_DIGEST_PREFIX` and the record encoding with
    sorted keys; for unparseable arguments, the SHA-256 of their UTF-8 text.
    ``None`` when there are none.
    """
    if arguments is not None:
        try:
            return arguments_sha256(arguments)
        except (TypeError, ValueError, OverflowError):
            # Prefixed: the integer 2**60 + 1 is written as RFC 8785 writes a float
            # near it, and the two calls must not share an approval.
            encoded = RECORD_DIGEST_PREFIX + encode(dict(arguments))
            return hashlib.sha256(encoded).hexdigest()
    if raw is not None:
        return _text_sha256(raw)
    return None


def encode(record: Mapping[str, Any]) -> bytes:
    """The stored bytes of a record: RFC 8785 (JCS) form for records without floats.

    Compact JSON, UTF-8, keys sorted. The hash is taken over these bytes as
    stored, so verification never re-encodes. orjson sorts keys by code
    point, JCS by UTF-16 code units; the two differ only for characters from
    U+E000 up, so those records (rare) are sorted again the JCS way. Integers
    beyond 64 bits, which orjson refuses, fall back to the standard library,
    with a float that is not finite written ``null`` as orjson writes it.
    Raises ``ValueError`` for a record the log's readers (orjson) could not
    read back: such a record is never written, as verify and a restart would
    take it for damage.
    """
    try:
        payload = orjson.dumps(record, option=_ENCODE_OPTS)
    except orjson.JSONEncodeError:
        import json  # noqa: PLC0415 - rare path

        text = json.dumps(
            _jcs_order(record), separators=(",", ":"), ensure_ascii=False, allow_nan=False
        ).encode()
        orjson.loads(text)  # an integer past a float's range: no reader could take it
        return text
    # Most records are ASCII: a C-speed check spares the scan for wide characters.
    if not payload.isascii() and _WIDE_UTF8.search(payload):
        payload = orjson.dumps(_jcs_order(record), option=_ENCODE_OPTS & ~orjson.OPT_SORT_KEYS)
    return payload


# UTF-8 lead bytes of U+E000..U+10FFFF, where code-point and UTF-16 orders part.
_WIDE_UTF8 = re.compile(rb"[\xee-\xf4]")


def _utf16(key: str) -> bytes:
    return key.encode("utf-16-be", "surrogatepass")


def _jcs_order(value: Any) -> Any:
    """A copy with every object's keys in RFC 8785 order (by UTF-16 code units), and
    every float that is not finite as ``None`` (what orjson writes for it)."""
    if isinstance(value, Mapping):
        return {k: _jcs_order(value[k]) for k in sorted(value, key=_utf16)}
    if isinstance(value, list | tuple):
        return [_jcs_order(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _whole(text: str | None) -> str | None:
    """``text`` with each lone surrogate replaced by U+FFFD, which UTF-8 can hold.

    Only for what an upstream answered (a result, an error message): an outcome
    must be recorded whatever the server sent. An action's fields are not so
    mended: a call that no record can carry exactly is refused, never recorded
    as another.
    """
    return mended(text) if text is not None else None


def scrub_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """Request headers without any credential header, names lower-cased."""
    return {k.lower(): v for k, v in headers.items() if k.lower() not in CREDENTIAL_HEADERS}


def is_credential_key(key: str) -> bool:
    """Whether a key names a credential (``Authorization``, ``clientSecret``, ``api_token``)."""
    known = _credential_memo.get(key)
    if known is None:
        norm = key.lower().replace("-", "").replace("_", "")
        known = (
            norm in _CREDENTIAL_NAMES
            or norm.endswith("token")
            or any(part in norm for part in _CREDENTIAL_PARTS)
        )
        # Keys come from agents: bounded in number, and only short ones (a 2 MiB key,
        # kept, would stay for the life of the process).
        if len(_credential_memo) < _MEMO_KEYS and len(key) <= _MEMO_KEY_CHARS:
            _credential_memo[key] = known
    return known


def mask_credentials(value: Any, masked: list[str] | None = None, at: str = "") -> Any:
    """A copy of a JSON-like value with credentials masked, at any depth.

    The whole value under a credential-named key becomes ``"[redacted]"`` (an
    object's keys may be secrets too). In a string holding a URL
    (``scheme://``), the password (``https://svc:[redacted]@host/``), or the
    whole user info when there is no password (``https://[redacted]@host/``: a
    token used as the user name), and the values of credential-named query and
    fragment parameters (``?api_key=[redacted]``, ``?sig=[redacted]``) are
    masked; the rest of the URL stays readable. A key holding a URL is masked
    the same way (with `` (2)``, `` (3)``... added should it then equal another
    key), and its pointer listed. The agent names its arguments, so it
    could hide any value from an approver that way (an IBAN under
    ``x_credential_hint``): with ``masked``, the JSON pointer (RFC 6901, from
    ``at``) of every value changed is appended to it, for callers to list in
    ``redacted`` and approvers to see what they cannot; a value that already
    was ``"[redacted]"`` hid nothing.
    """
    kind = type(value)
    if kind is str:
        return _shown_text(value, masked, at) if _URL_MARK in value else value
    if kind in _SCALARS:
        return value
    if kind is dict or isinstance(value, Mapping):
        out: dict[Any, Any] = {}
        for k, v in value.items():
            if type(k) is str and _URL_MARK in k:
                _put_url_key(out, value, k, v, masked=masked, at=at)
            elif type(k) is str and is_credential_key(k):
                out[k] = _hide(v, masked, _pointer(at, k) if masked is not None else "")
            elif type(v) is str:
                # The common case, kept cheap: most strings hold no URL.
                out[k] = (
                    _shown_text(v, masked, _pointer(at, k) if masked is not None else "")
                    if _URL_MARK in v
                    else v
                )
            elif type(v) in _SCALARS:
                out[k] = v
            else:
                out[k] = mask_credentials(v, masked, _pointer(at, k) if masked is not None else "")
        return out
    if isinstance(value, list | tuple):
        return [
            v
            if type(v) in _SCALARS and (type(v) is not str or _URL_MARK not in v)
            else mask_credentials(v, masked, f"{at}/{i}" if masked is not None else "")
            for i, v in enumerate(value)
        ]
    return value


def _put_url_key(
    out: dict[Any, Any],
    value: Mapping[Any, Any],
    key: str,
    item: Any,
    *,
    masked: list[str] | None,
    at: str,
) -> None:
    """Set ``out``'s entry for ``key``, a key holding a URL, its credentials masked.

    Two keys may mask alike (``https://u:a@h``, ``https://u:b@h``), or as one the
    agent sent: a number is added, so no entry overwrites another.
    """
    shown = _masked_urls(key)
    if shown != key:
        base, n = shown, 2
        while shown in value or shown in out:
            shown, n = f"{base} ({n})", n + 1
    at_key = _pointer(at, shown) if masked is not None else ""
    before = len(masked) if masked is not None else 0
    if is_credential_key(key):
        out[shown] = _hide(item, masked, at_key)
    else:
        out[shown] = mask_credentials(item, masked, at_key)
    if masked is not None and shown != key and at_key not in masked[before:]:
        masked.append(at_key)


def _shown_text(text: str, masked: list[str] | None, at: str) -> str:
    """``text`` with the credentials of the URLs in it masked; its pointer kept if it changed."""
    shown = _masked_urls(text)
    if masked is not None and shown != text:
        masked.append(at)
    return shown


def _masked_urls(text: str) -> str:
    """``text`` with each URL's credentials (user info, parameters) as ``"[redacted]"``.

    Every ``scheme://`` in it is read, so a URL inside other text (a shell
    command, a note) or inside another URL's query is masked too. A password
    is everything between the first ``:`` and the last ``@`` of the authority;
    user info without one (``https://ghp_...@github.com``) is masked whole. A
    parameter is masked when its name (decoded) is a credential's, by
    :func:`is_credential_key` or as a URL names one (``sig``, ``code``,
    ``key``, ``X-Amz-Signature``). Each part of ``text`` is scanned a bounded
    number of times: the cost is linear in its length.
    """
    if "@" in text:
        text = _masked_userinfo(text)
    # Every credential name holds a hint (api_key, sig, code); "%" may spell one.
    if "%" in text or _PARAM_HINT.search(text):
        text = _URL_PARAM.sub(_masked_param, text)
    return text


def _masked_userinfo(text: str) -> str:
    """``text`` with the password in each URL's authority as ``"[redacted]"``, or the
    whole user info when it has no password."""
    first = text.find(_URL_MARK)
    parts: list[str] = [text[:first]]
    pos = first
    start = first + len(_URL_MARK)
    while True:
        found = _AUTHORITY_END.search(text, start)
        end = found.start() if found is not None else len(text)
        at = text.rfind("@", start, end)
        colon = text.find(":", start, at) if at > start else -1
        if colon >= 0 and text[colon + 1 : at] not in _NO_PASSWORD:
            if text[colon + 1 : at] not in _MASKS:
                parts += [text[pos : colon + 1], REDACTED]
                pos = at
        elif at > start and text[start:at] not in _MASKS:
            userinfo = text[start:at]
            # Without a password only RFC 3986's authority counts: an "@" after "?"
            # or "#" is the query's (https://h?email=ann@example.com).
            if "?" not in userinfo and "#" not in userinfo:
                parts += [text[pos:start], REDACTED]
                pos = at
        nxt = text.find(_URL_MARK, start)
        if nxt < 0:
            break
        start = nxt + len(_URL_MARK)
    parts.append(text[pos:])
    return "".join(parts)


def _masked_param(found: re.Match[str]) -> str:
    sep, name, value = found.group(1, 2, 3)
    if value in _MASKS or not _is_credential_param(unquote_plus(name)):
        return found.group(0)
    return f"{sep}{name}={REDACTED}"


def _is_credential_param(name: str) -> bool:
    """Whether a URL's query or fragment parameter names a credential."""
    if is_credential_key(name):
        return True
    norm = name.lower().replace("-", "").replace("_", "")
    return norm in _PARAM_NAMES or norm.endswith(_PARAM_SUFFIXES)


def _hide(value: Any, masked: list[str] | None, at: str) -> Any:
    """``value`` under a credential-named key, masked whole; its pointer kept in ``masked``."""
    if masked is not None and not (type(value) is str and value == REDACTED):
        masked.append(at)
    return REDACTED


def _pointer(at: str, key: Any) -> str:
    """The JSON pointer (RFC 6901) of ``key`` inside the value at ``at``."""
    return f"{at}/{str(key).replace('~', '~0').replace('/', '~1')}"


def _masked_at(value: Any, pointer: str) -> bool:
    """Whether ``pointer`` still leads to a masked value (not inside a redacted whole):
    ``"[redacted]"``, a URL with its credentials masked, or a value under such a URL."""
    node = value
    part = ""
    for raw in pointer.split("/")[1:]:
        part = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False
    return (type(node) is str and REDACTED in node) or REDACTED in part


def _redact_path(value: Any, parts: list[str]) -> bool:
    """Replace the value at ``parts`` inside ``value`` in place; whether it was found."""
    node = value
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, dict):
            if part not in node:
                return False
            if last:
                node[part] = REDACTED
                return True
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            if last:
                node[int(part)] = REDACTED
                return True
            node = node[int(part)]
        else:
            return False
    return False


def apply_redactions(value: Any, paths: Iterable[str]) -> list[str]:
    """Redact dotted ``paths`` in ``value`` in place; return the paths found.

    Callers pass a fresh copy (:func:`mask_credentials` returns one), never
    the action's own arguments.
    """
    if not isinstance(value, dict):
        return []
    return [p for p in paths if p and _redact_path(value, p.split("."))]


_ANSWERS: Final = "input_responses"
_MASKABLE: Final = frozenset({"arguments", "context", _ANSWERS, "result"})
"""Where a ``redact`` path can point: what the records keep of the action and its result."""
_INPUT_ROOTS: Final = frozenset(
    {"agent", "request", "budget", "history", "session", "mode", "risk"}
    # The ext_authz door's OPA-Envoy keys (warden.protocols.envoy_authz.check_input).
    | {"attributes", "parsed_body", "parsed_path", "parsed_query", "truncated_body"}
    | {"version", "source_principal"}
)
"""Keys of the input document besides ``action`` and ``context``: no record field of
theirs can be masked (the claims, the declared tools, Warden's own counters, the
request as the ext_authz door shows it)."""
_ACTION_FIELDS: Final = frozenset(
    {"kind", "type", "tool", "protocol", "stage", "model", "upstream", "method", "path"}
    | {"labels", "meta"}
)
"""``input.action``'s keys other than ``arguments`` and ``input_responses``."""


def redact_target(path: str) -> tuple[str, str] | None:
    """What a policy's ``redact`` path names: ``(where, inner)``, or ``None`` for nothing
    Warden can mask.

    ``where`` is ``arguments``, ``context``, ``input_responses`` (an MCP retry's
    answers) or ``result`` (the tool result, in the outcome record); ``inner``
    is the dotted path inside it, ``""`` for all of it. Policies name fields as
    they see them in their input document, ``input.`` optional:
    ``action.arguments.email`` and ``context.customer_email``. The short forms
    stay: ``arguments.email``, ``input_responses...``, ``result...``, and a path
    that starts with no key of the input document is an argument's (``email``,
    ``action.email``). Any other key of the input document (``agent.claims.email``,
    ``session``, ``action.tool``) and a path with an empty part give ``None``.
    """
    parts = path.removeprefix("input.").split(".")
    if "" in parts:
        return None
    head, rest = parts[0], parts[1:]
    if head == "action":
        if not rest or rest[0] in _ACTION_FIELDS:
            return None
        head, rest = rest[0], rest[1:]
        if head not in _MASKABLE or head == "context":
            return "arguments", ".".join(parts[1:])  # action.email: an argument
        return head, ".".join(rest)
    if head in _MASKABLE:
        return head, ".".join(rest)
    if head in _INPUT_ROOTS:
        return None
    return "arguments", ".".join(parts)


def unmaskable_redactions(paths: Iterable[str]) -> list[str]:
    """The ``redact`` paths that name nothing Warden can mask (:func:`redact_target`),
    once each, in order: their values stay in the records as they are."""
    return list(dict.fromkeys(p for p in paths if redact_target(p) is None))


@dataclass(frozen=True, slots=True)
class _Split:
    """A ``redact`` list by where it applies; ``""`` hides all of that place."""

    arguments: tuple[str, ...]
    context: tuple[str, ...]
    answers: tuple[str, ...]
    result: tuple[str, ...]
    """As the outcome record lists them: ``result`` or ``result.<path>``."""


def _split_redactions(paths: Iterable[str]) -> _Split:
    """Policy paths by the place they redact (see :func:`redact_target`)."""
    found: dict[str, list[str]] = {name: [] for name in _MASKABLE}
    for given in paths:
        target = redact_target(given)
        if target is not None:
            found[target[0]].append(target[1])
    return _Split(
        tuple(found["arguments"]),
        tuple(found["context"]),
        tuple(found[_ANSWERS]),
        tuple(f"result.{p}" if p else "result" for p in found["result"]),
    )


_PATH_ARGUMENT_PROTOCOLS: Final = frozenset({"http", "envoy_authz"})
"""Doors whose tool calls take arguments from the request path (route rules)."""


def path_holds_arguments(action: Mapping[str, Any]) -> bool:
    """Whether a decision record's ``request.path`` may spell its tool call's arguments
    (``/customers/{email}``): a routed HTTP tool call's path."""
    return action.get("tool") is not None and action.get("protocol") in _PATH_ARGUMENT_PROTOCOLS


def _answers_body(answers: Mapping[str, Any], paths: tuple[str, ...]) -> tuple[Any, list[str]]:
    """An MCP retry's answers as recorded, and the redactions applied to them.

    Policies name them as they see them: ``action.input_responses`` (all of
    them) or a path inside (``action.input_responses.email.content.email``).
    """
    if "" in paths:
        return REDACTED, [_ANSWERS]
    masked: list[str] = []
    shown = mask_credentials(answers, masked)
    hit = [f"{_ANSWERS}.{p}" for p in apply_redactions(shown, paths)]
    # Masked answers as input_responses/<pointer>, beside the policy's dotted paths.
    return shown, [*hit, *(f"{_ANSWERS}{m}" for m in masked if _masked_at(shown, m))]


def _context_body(context: Mapping[str, Any], paths: tuple[str, ...]) -> tuple[Any, list[str]]:
    """The action's context as recorded, and the redactions applied to it.

    ``context`` hidden whole keeps its keys (the header names a deployment
    chose, ``customer_email``), so readers still find an object.
    """
    shown = mask_credentials(context)
    if not paths or not shown:
        return shown, []
    if "" in paths:
        return {k: REDACTED for k in shown}, ["context"]
    return shown, [f"context.{p}" for p in apply_redactions(shown, paths)]


def action_body(
    action: Action, redact: Iterable[str] = (), *, context: bool = True
) -> dict[str, Any]:
    """The ``action`` object of a decision record, redacted and without credentials.

    ``input_responses`` and ``meta`` are there only for an action that has
    them (an MCP retry's answers, an MCP request's ``_meta``), so every other
    record keeps its shape. Without ``context`` (an approval, which shows no
    context) the body's ``context`` is ``None`` and ``redacted`` names no path in it.
    """
    split = _split_redactions(redact)
    arg_paths = split.arguments
    whole = "" in arg_paths
    arguments: Any = None
    raw: str | None = None
    redacted: list[str] = []
    digest: str | None = None
    keys: list[str] | None = None
    if action.arguments is not None:
        if whole:
            arguments, redacted = REDACTED, ["arguments"]
            digest = arguments_digest(action.arguments)
            # A key may hold a URL with a credential: masked as in the arguments.
            keys = sorted(
                _masked_urls(k) if _URL_MARK in k else k for k in map(str, action.arguments)
            )
        else:
            masked: list[str] = []
            arguments = mask_credentials(action.arguments, masked)
            redacted = apply_redactions(arguments, arg_paths)
            # Masked values are listed too (JSON pointers, "/password"), so whoever
            # reads the arguments (an approver above all) knows what is hidden;
            # those inside a path the policy redacted whole are gone already.
            redacted += [m for m in masked if _masked_at(arguments, m)]
            if redacted or arguments != action.arguments:
                # What is shown is not what the agent got: the hash still binds it.
                digest = arguments_digest(action.arguments)
    elif action.raw_arguments is not None:
        # No path inside unparseable text can be redacted, and nothing can
        # say it holds no personal data: it is never written in plaintext.
        raw, redacted = REDACTED, ["raw_arguments"]
        digest = arguments_digest(None, action.raw_arguments)
    req = action.request
    request: dict[str, Any] = {
        "method": req.method,
        "upstream": req.upstream,
        "path": req.path,
        "headers": scrub_headers(req.headers),
    }
    # The policy's paths are dotted; masked credentials are listed as JSON pointers.
    hidden_by_policy = any(not r.startswith("/") for r in redacted)
    if hidden_by_policy and action.tool is not None and action.protocol in _PATH_ARGUMENT_PROTOCOLS:
        # The path may spell the very argument the policy hides.
        request["path"] = REDACTED
        redacted = [*redacted, "request.path"]
    if req.door:
        request["door"] = req.door  # only when another door handed the request over
    body: dict[str, Any] = {
        "id": action.action_id,
        "kind": action.kind,
        "tool": action.tool,
        "arguments": arguments,
        "raw_arguments": raw,
        "arguments_sha256": digest,
        "argument_keys": keys,
        "redacted": redacted,
        "protocol": action.protocol,
        "stage": action.stage,
        "model": action.model,
        "call_id": action.call_id,
        "request": request,
        "context": None,
    }
    if context:
        # Set from X-Warden-Context-* headers: personal data too (a customer's email).
        body["context"], hidden = _context_body(action.context, split.context)
        body["redacted"] = redacted = [*redacted, *hidden]
    if action.input_responses is not None:
        body[_ANSWERS], hidden = _answers_body(action.input_responses, split.answers)
        body["redacted"] = [*redacted, *hidden]
    if action.meta is not None:
        # MCP's own metadata and a client's keys: what the server got beside the call.
        body["meta"] = mask_credentials(action.meta)
    return body


def decision_body(decision: Decision, *, tools_sha256: str | None = None) -> dict[str, Any]:
    """The ``decision`` object of a decision record.

    ``input`` (when the pipeline set it) holds the policy-input facts the rest
    of the record does not carry, credentials masked (ADR 0012). With
    ``tools_sha256`` (the request's declared tools are in an earlier record of
    this log), ``input.tools_sha256`` stands in for ``input.tools``, so a
    response's many calls do not each repeat a large list.
    """
    ob = decision.obligations
    body: dict[str, Any] = {
        "id": decision.decision_id,
        "effect": decision.effect,
        "enforced": decision.enforced,
        "would": decision.would,
        "reasons": list(decision.reasons),
        "mode": decision.mode,
        "guard": decision.guard,
        "bundle_revision": decision.bundle_revision,
        "obligations": {
            "redact": list(ob.redact),
            "approvers": list(ob.approvers),
            "hold_timeout_s": ob.hold_timeout_s,
            "risk": ob.risk,
        },
        "error": decision.error,
        "elapsed_us": decision.elapsed_us,
    }
    unapplied = unmaskable_redactions(ob.redact)
    if unapplied:
        # Listed in obligations.redact, yet their values are in this log as they were:
        # said here, not left for a reader to believe them masked.
        body["obligations"]["redact_not_applied"] = unapplied
    facts = decision.input
    if facts is not None:
        # Only what the agent's request shaped can hold a credential-named key.
        shown = {
            k: _masked_fact(k, v) if v and k in _AGENT_FACTS else v
            for k, v in facts.items()
            if tools_sha256 is None or k != "tools"
        }
        if tools_sha256 is not None:
            shown["tools_sha256"] = tools_sha256
        body["input"] = shown
    return body


def tools_sha256(tools: Any) -> str:
    """SHA-256 (hex) of a recorded ``input.tools`` list, as records encode it.

    Computed on the masked list a record shows, so a reader hashing the list
    it parsed from an earlier record finds the same digest.
    """
    return hashlib.sha256(encode({"tools": tools})).hexdigest()


_AGENT_FACTS = frozenset({"tools", "session", "history"})
_COUNTERS = ("calls", "held")
"""Session counters by tool name (``reset_password: 3``): a count is no secret, and a
replay must read it as the policy did."""


def _masked_fact(name: str, value: Any) -> Any:
    if name != "session" or not isinstance(value, Mapping):
        return mask_credentials(value)
    masked = mask_credentials({k: v for k, v in value.items() if k not in _COUNTERS})
    return {**masked, **{k: value[k] for k in _COUNTERS if k in value}}


def _text_sha256(text: str) -> str:
    # surrogatepass: a lone surrogate from a JSON escape must not fail the record.
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _result_body(result: str | None, paths: list[str]) -> tuple[Any, list[str], str | None]:
    """The recorded result, the redactions applied, and the full result's hash if cut."""
    if result is None:
        return None, [], None
    if "result" in paths:
        return REDACTED, ["result"], _text_sha256(result)
    redacted: list[str] = []
    if paths:
        try:
            parsed = orjson.loads(result)
        except orjson.JSONDecodeError:
            # Not JSON: a path inside it cannot be found, so hide all of it.
            return REDACTED, ["result"], _text_sha256(result)
        if _is_mcp_whole(parsed):
            # The value a path names is in its text blocks too (in prose, or as escaped
            # JSON), where no path reaches: hide all of it.
            return REDACTED, ["result"], _text_sha256(result)
        hit = apply_redactions(parsed, [p[len("result.") :] for p in paths])
        if not hit:
            # The policy names personal data in the result, and none of its paths finds
            # it (a result shaped otherwise than the policy expects: an MCP result kept
            # whole, its value under structuredContent): hide all of it, as for text.
            return REDACTED, ["result"], _text_sha256(result)
        redacted = [f"result.{p}" for p in hit]
        result = orjson.dumps(mask_credentials(parsed)).decode()
    elif result.lstrip()[:1] in ("{", "[") and _CREDENTIAL_HINT.search(result):
        # A JSON result (an OAuth token endpoint's answer) is masked like arguments.
        try:
            parsed = orjson.loads(result)
        except orjson.JSONDecodeError:
            # Cut short, or holding a NaN or a lone surrogate: a credential in it cannot
            # be found to mask alone, so none of it is kept (its hash is).
            return REDACTED, ["result"], _text_sha256(result)
        masked = mask_credentials(parsed)
        if _is_mcp_whole(masked):
            blocks = _masked_blocks(masked["content"])
            if blocks is None:
                return REDACTED, ["result"], _text_sha256(result)
            masked["content"] = blocks
        if masked != parsed:
            result = orjson.dumps(masked).decode()
    if len(result) > MAX_RESULT_CHARS:
        digest = _text_sha256(result)
        return result[:MAX_RESULT_CHARS], redacted, digest
    return result, redacted, None


def _is_mcp_whole(parsed: Any) -> bool:
    """Whether a recorded result is an MCP tool result kept whole (its ``content`` list
    beside what the text does not say), as :mod:`warden.protocols.mcp` records one."""
    return isinstance(parsed, dict) and isinstance(parsed.get("content"), list)


def _masked_blocks(content: list[Any]) -> list[Any] | None:
    """MCP content blocks with credentials masked inside the JSON their texts hold
    (an SDK server's text of a value: ``{"api_token": ...}`` as an escaped string), or
    ``None`` when a text looks like JSON and names a credential, yet cannot be read."""
    out: list[Any] = []
    for block in content:
        text = block.get("text") if isinstance(block, dict) else None
        if (
            not isinstance(text, str)
            or text.lstrip()[:1] not in ("{", "[")
            or not _CREDENTIAL_HINT.search(text)
        ):
            out.append(block)
            continue
        try:
            value = orjson.loads(text)
        except orjson.JSONDecodeError:
            return None  # as for a result that is such text
        masked = mask_credentials(value)
        out.append(block if masked == value else {**block, "text": orjson.dumps(masked).decode()})
    return out


def outcome_body(
    outcome: Outcome, redact: Iterable[str] = (), cost: float | None = None
) -> dict[str, Any]:
    """The ``outcome`` object of an outcome record."""
    result_paths = list(_split_redactions(redact).result)
    result, redacted, full_hash = _result_body(outcome.result, result_paths)
    if isinstance(result, str) and (mended := _whole(result)) is not result:
        # The text as sent stays bound by its hash (surrogates kept).
        full_hash = full_hash or _text_sha256(outcome.result or "")
        result = mended
    usage = outcome.usage
    tokens: dict[str, int] | None = None
    if usage is not None:
        tokens = {
            "input": usage.input_tokens,
            "output": usage.output_tokens,
            "cached_input": usage.cached_input_tokens,
        }
        if usage.cache_write_tokens or usage.cache_write_1h_tokens:
            tokens["cache_write"] = usage.cache_write_tokens
            tokens["cache_write_1h"] = usage.cache_write_1h_tokens
    body: dict[str, Any] = {
        "status": outcome.status,
        "latency_ms": outcome.latency_ms,
        "tokens": tokens,
        "cost": cost,
        "error": _whole(outcome.error),
        "is_error": outcome.is_error,
        "result": result,
        "result_sha256": full_hash,
        "redacted": redacted,
    }
    if outcome.reported_by is not None:
        body["reported_by"] = outcome.reported_by
    return body
