"""JSON helpers every adapter shares, so all protocols read arguments alike."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import orjson
from aiohttp.helpers import parse_content_type

from warden.errors import InvalidJSON, UnsupportedMedia
from warden.model import Decision, Effect, Mode, Usage
from warden.protocols.sse import SseEvent
from warden.text import keys_fold_apart

__all__ = [
    "NO_DECISION",
    "Envelope",
    "StreamStatus",
    "answered_by",
    "dumps",
    "event_object",
    "foreign_charset",
    "keys_fold_apart",
    "loads",
    "loads_or_none",
    "misspelled",
    "misspelled_key",
    "parse_arguments",
    "policy_safe",
    "refuse_misspelled_request",
    "reject_constant",
    "request_bytes",
    "request_object",
    "tier_rate",
    "tiered",
    "token_count",
    "unique_keys",
    "utf8_only",
]

NO_DECISION: Final = Decision(
    decision_id="none",
    effect=Effect.DENY,
    reasons=("no decision was made for this call",),
    mode=Mode.ENFORCE,
    guard="fallback",
)
"""Stands in for a call missing from a decision map: it is removed, fail closed."""


class _DuplicateKeyError(ValueError):
    pass


def reject_constant(name: str) -> Any:
    """A ``json.loads`` ``parse_constant`` hook: ``NaN`` and ``Infinity`` are no JSON."""
    raise ValueError(f"{name} is not JSON")


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A ``json.loads`` ``object_pairs_hook``: a key given twice is an error (readers
    disagree on which one wins)."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _DuplicateKeyError("duplicate key")
    return obj


# Nineteen digits in a row may be an integer past 64 bits. Found by mapping
# every ASCII digit to "0" and everything else to a space, then one substring
# search: an order of magnitude cheaper than a regular expression over a body.
_DIGITS_TO_ZERO: Final = bytes(0x30 if 0x30 <= b <= 0x39 else 0x20 for b in range(256))
_NINETEEN: Final = b"0" * 19


def _long_int(text: str | bytes) -> bool:
    """Whether ``text`` holds a run of 19 or more ASCII digits."""
    data = text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass")
    return data.translate(_DIGITS_TO_ZERO).find(_NINETEEN) >= 0


def loads(text: str | bytes) -> Any:
    """Parse a body or event as leniently as the official SDKs do; raises ``ValueError``.

    The SDKs parse with Python's ``json`` module, which takes ``NaN``,
    ``Infinity``, integers past 64 bits, ``1e400`` and lone surrogates. A
    body Warden rejected but an SDK accepts would let a tool call through
    unparsed, so whatever orjson refuses goes to the same stdlib parser, and
    Warden sees the values the SDK will see.
    """
    # orjson reads an integer past 64 bits as a float, silently: such text goes to the stdlib.
    if not _long_int(text):
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:
            pass
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


_TCHAR: Final = r"!#$%&'+\-.^_`|~0-9A-Za-z"  # RFC 9110 token characters, less "*"
_MEDIA_TYPE: Final = re.compile(rf"[ \t]*[{_TCHAR}*]+/[{_TCHAR}*]+[ \t]*")
_PARAMETER: Final = re.compile(
    rf"""; [ \t]* (?: ([{_TCHAR}]+) = ( [{_TCHAR}*]+ | "(?:[^"\\\x00-\x08\x0a-\x1f\x7f]|\\.)*" ) )?
    [ \t]*""",
    re.VERBOSE,
)
_QUOTED_PAIR: Final = re.compile(r"\\(.)")


def foreign_charset(content_type: str) -> str | None:
    """Why a body of ``content_type`` might be read other than as UTF-8, or ``None``.

    Warden reads every JSON body as UTF-8. A server that decodes by the charset
    named (aiohttp's ``request.json()``, Express's ``express.json()``) reads
    other text under ``charset=utf-7``: ``+ACI-`` ends a string Warden read
    whole, and a second key appears (another tool name, another amount). The
    value must be plain RFC 9110 ``name=value`` parameters, each ``charset``
    UTF-8: aiohttp reads its header with Python's email parser, which also
    takes RFC 2231 names (``charset*=''utf-7``, ``charset*0=``) and comments
    (``charset(x)=``) that a narrower reading would miss.
    """
    if not content_type:
        return None
    if "\\" in content_type or "=?" in content_type:
        # Quoted pairs and RFC 2047 encoded words: the email parser aiohttp uses
        # decodes them and then finds quoted strings' ends by counting quotes, so
        # ``x="\\"; y=";charset=utf-7"`` is charset utf-7 to it.
        return (
            f"the Content-Type {content_type[:60]!r} escapes or encodes its parameters "
            "(a backslash, or an encoded word), which servers read differently"
        )
    media = _MEDIA_TYPE.match(content_type)
    if media is None:
        return f"the Content-Type {content_type[:60]!r} is not one media type"
    at = media.end()
    while at < len(content_type):
        param = _PARAMETER.match(content_type, at)
        if param is None:
            return (
                f"the Content-Type's parameters ({content_type[at : at + 60]!r}) are not plain "
                "name=value pairs (RFC 2231 names such as charset*=, comments), which "
                "servers read differently"
            )
        name, value = param.group(1), param.group(2)
        if name is not None and name.lower() == "charset":
            if value.startswith('"'):
                value = _QUOTED_PAIR.sub(r"\1", value[1:-1])
            if value.lower() not in ("utf-8", "utf8"):
                return f"the request body is declared as charset {value[:30]!r}"
        at = param.end()
    # And as aiohttp itself reads it, in case the two readings still part somewhere.
    charset = parse_content_type(content_type)[1].get("charset")
    if charset is not None and charset.lower() not in ("utf-8", "utf8"):
        return f"the request body is declared as charset {charset[:30]!r}"
    return None


def utf8_only(content_type: str) -> None:
    """:class:`UnsupportedMedia` for a JSON body a server might read other than as UTF-8
    (:func:`foreign_charset`): Warden decides on it read as UTF-8."""
    refusal = foreign_charset(content_type)
    if refusal is not None:
        raise UnsupportedMedia(f"{refusal}; send JSON as UTF-8 (charset=utf-8, or none)")


def request_object(body: bytes) -> dict[str, Any]:
    """A model request's body as Warden decides on it; raises :class:`InvalidJSON`.

    As strict as a provider (``NaN`` and ``Infinity`` are refused), with
    integers past 64 bits read exactly (orjson would make them floats). A key
    given twice keeps its last value, and :func:`request_bytes` is what goes
    upstream: the provider reads what Warden decided on, whichever of two
    values its own parser would have kept.
    """
    try:
        if _long_int(body):
            # As orjson would read it: no number past a float's range, no lone surrogate.
            value = json.loads(body, parse_constant=reject_constant, parse_float=_finite)
            if _SURROGATE_ESCAPE.search(body):
                json.dumps(value, ensure_ascii=False).encode()  # raises on a lone one
        else:
            value = orjson.loads(body)
    except (ValueError, RecursionError) as exc:
        raise InvalidJSON(f"request body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise InvalidJSON("request body must be a JSON object")
    return value


_SURROGATE_ESCAPE: Final = re.compile(rb"\\u[dD][89abcdefABCDEF]")


def _finite(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"{text} is past a float's range")
    return number


def request_bytes(value: Mapping[str, Any]) -> bytes:
    """The body Warden sends upstream for a request it read with :func:`request_object`."""
    try:
        return orjson.dumps(value)
    except TypeError:  # an integer past 64 bits
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        return text.encode()


def loads_or_none(text: str) -> Any:
    """Parsed JSON, or ``None`` when ``text`` is not JSON."""
    try:
        return loads(text)
    except (ValueError, RecursionError):
        return None


def dumps(value: Any) -> str:
    """Compact JSON text that an SDK parses back to the same values.

    orjson writes non-finite floats as ``null``; a value parsed leniently by
    :func:`loads` keeps its ``NaN`` or ``Infinity``, and integers past 64
    bits, through the stdlib encoder instead.
    """
    try:
        if not _has_nonfinite(value):
            return orjson.dumps(value).decode()
    except TypeError:
        pass
    # ASCII escapes keep lone surrogates (which the SDKs accept) encodable as UTF-8.
    return json.dumps(value, separators=(",", ":"), ensure_ascii=True)


_LEAVES: Final = frozenset({str, int, bool, type(None)})


def _has_nonfinite(value: Any) -> bool:
    """Whether a NaN or an infinity is anywhere in ``value`` (dicts and lists walked)."""
    # One loop over a stack, exact types first: a body is mostly strings and ints.
    stack = [value]
    pop, push, leaves, isfinite = stack.pop, stack.extend, _LEAVES, math.isfinite
    while stack:
        item = pop()
        kind = type(item)
        if kind in leaves:
            continue
        if kind is dict:
            push(item.values())
        elif kind is list:
            push(item)
        elif kind is float or isinstance(item, float):
            if not isfinite(item):
                return True
        elif isinstance(item, dict):
            push(item.values())
        elif isinstance(item, list):
            push(item)
    return False


STANDARD_TIERS: Final = frozenset({"auto", "default", "flex", "scale", "standard"})
"""Tiers billed at the model's price or below: every other tier is a premium one."""
PRIORITY_RATE: Final = 2.0
"""OpenAI priority processing against standard (its list prices run 1.75 to 2 times)."""
UNKNOWN_PREMIUM_RATE: Final = 6.0
"""A premium tier or speed whose price the table does not know (``ultrafast``,
Anthropic fast mode: published at up to six times standard): counted high."""


def tier_rate(tier: object) -> float:
    """The price multiple of a ``service_tier`` (or speed) a request or answer names."""
    if tier is None or (isinstance(tier, str) and tier in STANDARD_TIERS):
        return 1.0
    # Any other value, a list or an object too, is a tier the table does not know.
    return PRIORITY_RATE if tier == "priority" else UNKNOWN_PREMIUM_RATE


def answered_by(usage: Usage | None, model: object) -> Usage | None:
    """``usage`` naming the model the answer says ran, when it names one."""
    if usage is None or not isinstance(model, str) or not model or usage.model is not None:
        return usage
    return dataclasses.replace(usage, model=model[:_MODEL_CHARS])


_MODEL_CHARS: Final = 200  # a model name, not a place to store an upstream's megabytes


def tiered(usage: Usage | None, tier: object) -> Usage | None:
    """``usage`` billed at least at the rate of the tier its answer says it ran on."""
    rate = tier_rate(tier)
    if usage is None or rate <= usage.rate:
        return usage
    return dataclasses.replace(usage, rate=rate)


_MOST_TOKENS: Final = 2**53
"""Past any real count; a larger one would price a call past a float's range."""


def token_count(value: Any) -> int | None:
    """A token count from the wire, or ``None`` unless a non-negative int no larger than
    :data:`_MOST_TOKENS` (a call with no count is spent at what it held)."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MOST_TOKENS:
        return value
    return None


_MAX_DEPTH: Final = 64
"""Nesting deeper than this is refused: policy engines (and their encoders) stop near here."""
_INT_MIN: Final = -(2**63)
_INT_MAX: Final = 2**64 - 1


def policy_safe(value: Any, depth: int = 1) -> bool:
    """True when a policy engine can take ``value`` exactly as the tool will see it.

    Non-finite floats, integers outside signed/unsigned 64 bits, strings that
    are not valid Unicode (lone surrogates) or hold NUL, and nesting past 64
    levels cannot reach a policy unchanged, so arguments holding them fail
    closed instead.
    So do objects with keys equal but for case (:func:`keys_fold_apart`).
    """
    if isinstance(value, bool) or value is None:
        return True
    if isinstance(value, int):
        return _INT_MIN <= value <= _INT_MAX
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, str):
        return _valid_text(value)
    if depth > _MAX_DEPTH:
        return False
    if isinstance(value, dict):
        return keys_fold_apart(value) and all(
            isinstance(k, str) and _valid_text(k) and policy_safe(v, depth + 1)
            for k, v in value.items()
        )
    if isinstance(value, list):
        return all(policy_safe(v, depth + 1) for v in value)
    return False


@dataclass(frozen=True, slots=True)
class Envelope:
    """The keys a provider's SDK (or API) reads from one message shape, and those it reads into.

    ``names`` are the field names of the shape (all lower case, as the
    providers spell them): a response and its stream events, or a request;
    ``inside`` the fields whose objects (or lists of objects) hold more of
    them. Tool arguments and schemas are never among ``inside``: their keys
    are the tool's, checked by :func:`policy_safe`.
    """

    names: frozenset[str]
    inside: frozenset[str]


_MAX_ENVELOPE_DEPTH: Final = 8


def misspelled_key(value: object, envelope: Envelope, depth: int = 0) -> str | None:
    """The first key a case-blind client would read as one of ``envelope.names``, if any.

    Go's ``encoding/json`` (which clients such as go-openai build on) and
    .NET's default binder take ``TOOL_CALLS`` for ``tool_calls`` when the exact
    spelling is absent, and the last of two spellings when both are present.
    Warden reads exact spellings, so such a response would carry a call that
    Warden never decided: it is malformed instead.
    """
    if isinstance(value, list):
        for item in value:
            found = misspelled_key(item, envelope, depth)
            if found is not None:
                return found
        return None
    if not isinstance(value, dict) or depth > _MAX_ENVELOPE_DEPTH:
        return None
    names, inside = envelope.names, envelope.inside
    for key, inner in value.items():
        if key in names:
            if key in inside and inner is not None:
                found = misspelled_key(inner, envelope, depth + 1)
                if found is not None:
                    return found
        elif isinstance(key, str) and key.casefold() in names:
            return key
    return None


def misspelled(key: str) -> str:
    """Why a response with a key :func:`misspelled_key` found is refused, for errors."""
    return f"the key {key!r}, which case-blind clients read as one of the provider's fields"


def refuse_misspelled_request(body: Mapping[str, Any], envelope: Envelope) -> None:
    """Raise :class:`InvalidJSON` for a request key a case-blind upstream reads as another.

    A gateway built on Go's ``encoding/json`` would take ``TOOLS`` for
    ``tools`` and open the hosted MCP server it declares, which the policy
    never saw in ``input.request.tools``.
    """
    found = misspelled_key(body, envelope)
    if found is not None:
        raise InvalidJSON(f"the request has {misspelled(found)}")


def event_object(data: str, envelope: Envelope) -> dict[str, Any]:
    """A stream event's data as the JSON object the SDK reads.

    Raises :class:`ValueError` saying what the event "is not" or "has" instead
    (the caller's message names the event): not JSON, not an object, or a
    key spelled as :func:`misspelled_key` refuses.
    """
    try:
        obj = loads(data)
    except ValueError:
        raise ValueError("is not JSON") from None
    if not isinstance(obj, dict):
        raise ValueError("is not a JSON object")
    found = misspelled_key(obj, envelope)
    if found is not None:
        raise ValueError(f"has {misspelled(found)}")
    return obj


def as_read(event: SseEvent, obj: Mapping[str, Any]) -> SseEvent:
    """``event`` carrying ``obj``, its data as Warden read it, in Warden's encoding.

    A stream event goes on as Warden parsed it, not as the upstream wrote it:
    with a key given twice (``"delta": {tool_calls}, "delta": {content}``)
    Warden keeps the last, as Python and JavaScript do, while Go's
    ``encoding/json`` merges both into one struct and would run the call.
    """
    return SseEvent(data=dumps(obj), event=event.event, id=event.id)


def _valid_text(text: str) -> bool:
    # NUL: the policy engine takes C strings and would read only what comes before
    # it ("ok\u0000/../../etc/shadow" read as "ok"), while the tool reads it all.
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_arguments(raw: object) -> tuple[str, Mapping[str, Any] | None]:
    """``(raw_arguments, arguments)``; ``arguments`` is ``None`` unless a JSON object.

    Duplicate keys count as malformed: tools disagree on which one wins, so a
    policy could approve a value other than the one the tool would use. So do
    values a policy engine cannot take as they are (see :func:`policy_safe`).
    """
    if isinstance(raw, dict):
        # Some OpenAI-compatible servers send an object instead of a JSON string.
        try:
            text = dumps(raw)
        except (TypeError, ValueError, RecursionError):
            return "", None  # nothing a tool could be given exactly: fail closed
        return text, raw if policy_safe(raw) else None
    if not isinstance(raw, str):
        return ("" if raw is None else dumps(raw)), None
    value = _fast_object(raw)
    if value is None:
        try:
            value = json.loads(raw, object_pairs_hook=unique_keys, parse_constant=reject_constant)
        except (ValueError, RecursionError):
            return raw, None
    if not isinstance(value, dict) or not policy_safe(value):
        return raw, None
    return raw, value


# Where a key ends. Every key in JSON text ends with one of these; text inside
# strings can only add more, so equal counts prove no key was repeated.
_KEY_END: Final = re.compile(r'"[ \t\n\r]*:')


def _key_count(value: Any) -> int:
    if isinstance(value, dict):
        return len(value) + sum(_key_count(v) for v in value.values())
    if isinstance(value, list):
        return sum(_key_count(v) for v in value)
    return 0


def _fast_object(raw: str) -> dict[str, Any] | None:
    """``raw`` parsed by orjson when that is what the stdlib path would return, else ``None``.

    orjson reads strict JSON only (no ``NaN``, no lone surrogates), reads
    it to the same values as ``json``, except integers past 64 bits (left to
    the stdlib), and keeps the last of repeated keys, which the key count
    catches. ``None`` sends the text down the stdlib path, which decides.
    """
    if _long_int(raw):
        return None
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(value, dict) or _key_count(value) != len(_KEY_END.findall(raw)):
        return None
    return value


class StreamStatus:
    """What every stream rewriter reports; rewriters fill the three fields as events arrive."""

    def __init__(self) -> None:
        self._usage: Usage | None = None
        self._model: str | None = None
        self._complete = False

    @property
    def usage(self) -> Usage | None:
        """Token usage the stream reported so far, naming the model the stream named."""
        return answered_by(self._usage, self._model)

    @property
    def model(self) -> str | None:
        """The model the stream named."""
        return self._model

    @property
    def complete(self) -> bool:
        """True once the protocol's own end marker was seen (else: truncated)."""
        return self._complete
