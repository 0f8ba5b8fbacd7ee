"""Envoy ext_authz in OPA-Envoy's shape, sans-I/O: a CheckRequest in, a CheckResponse out.

:func:`check_input` turns an ``envoy.service.auth.v3.CheckRequest`` into the
``input`` document an OPA-Envoy policy expects, built as OPA-Envoy builds it:

* the request message itself, field by field under protobuf JSON names
  (``input.attributes.request.http.{method,path,host,headers,body,rawBody}``,
  ``input.attributes.source.address.socketAddress.address``,
  ``input.attributes.destination...``, ``contextExtensions``, ...): only set
  fields, enums as numbers, 64-bit integers as numbers, bytes as base64,
  timestamps as ``{seconds, nanos}``, ``Struct`` values as plain objects;
* ``input.parsed_path`` (the path before ``?``, percent-decoded, split on
  ``/`` after leading slashes), ``input.parsed_query`` (each name to its list
  of values), ``input.parsed_body`` (JSON and URL-encoded form bodies, and
  gRPC request messages of the services in a :class:`GrpcBodies`) and
  ``input.truncated_body`` (a body that fills ``max_request_bytes`` counts as cut,
  see :func:`partial_body`);
* ``input.version`` (``{"ext_authz": "v3", "encoding": "protojson"}``) and
  ``input.source_principal`` when the peer has one.

A request whose path, query or body cannot be parsed gets a ``problem``: the
door denies it with 400 and the reason, as OPA-Envoy does. JSON bodies are
parsed strictly (a key given twice, ``NaN``: refused), where OPA-Envoy keeps
the last duplicate; multipart bodies, and gRPC bodies without descriptors,
are not parsed (``parsed_body`` is ``null``).

:func:`read_result` checks a policy's value (a boolean, or an object with
``allowed`` and optionally ``headers``, ``response_headers_to_add``,
``request_headers_to_remove``, ``query_parameters_to_set``,
``query_parameters_to_remove``, ``body``, ``http_status``,
``dynamic_metadata``) exactly as OPA-Envoy reads it, and
:func:`render_response` maps it to the ``CheckResponse``.
"""

from __future__ import annotations

import base64
import http
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final

from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2
from envoy.type.v3 import http_status_pb2
from google.protobuf import (
    descriptor_pb2,
    descriptor_pool,
    json_format,
    message_factory,
    struct_pb2,
)
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message

from warden.protocols._wire import foreign_charset
from warden.protocols.http_tool import ToolRequestError, parse_body, parse_query, unescape

__all__ = [
    "CHECK_ROOM",
    "CREDENTIAL_HEADERS",
    "DECISION_ID_KEYS",
    "PROTOCOL",
    "Answers",
    "AuthzResult",
    "CheckInput",
    "GrpcBodies",
    "body_limit",
    "check_input",
    "decode_segments",
    "partial_body",
    "protomap",
    "read_allowed",
    "read_result",
    "render_response",
]

PROTOCOL: Final = "envoy_authz"
"""The ``action.protocol`` of every ext_authz check."""
DECISION_ID_KEYS: Final = ("decision_id", "warden_decision_id")
"""Dynamic metadata keys that carry the decision id (the first is OPA-Envoy's)."""

CREDENTIAL_HEADERS: Final = ("x-warden-agent-key", "x-warden-agent-token")
"""Warden's agent credentials: read for identity, hidden from policy, removed before upstream."""

CHECK_ROOM: Final = 256 * 1024
"""What a ``CheckRequest`` may carry beside the body: headers (60 KiB by Envoy's default,
with the path and host again in their own fields), the peer certificate, metadata."""

_VERSION: Final = {"ext_authz": "v3", "encoding": "protojson"}
_GRPC_OK: Final = 0
_GRPC_PERMISSION_DENIED: Final = 7
_ENVOY_STATUSES: Final = frozenset(http_status_pb2.StatusCode.values())
_HTTP_STATUSES: Final = frozenset(int(s) for s in http.HTTPStatus)


# -- the input document -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CheckInput:
    """What a CheckRequest says: the policy input and the parts Warden itself reads.

    ``problem`` is set when the request cannot be checked (no HTTP request, a
    malformed path, query or body): it must be denied.
    """

    input: dict[str, Any]
    method: str
    path: str
    """The path before ``?``, as sent."""
    host: str
    headers: Mapping[str, str]
    body: bytes
    problem: str | None = None
    query: str = ""
    """The query after ``?``, as sent."""


_ONE, _LIST, _MAP = 0, 1, 2
_PLAIN, _BYTES, _MESSAGE = 0, 1, 2
_Plan = tuple[str, int, int]
_PLANS: dict[FieldDescriptor, _Plan] = {}


def _plan(fd: FieldDescriptor) -> _Plan:
    """How a field maps (its JSON name, one/list/map, what its values are), kept.

    Worked out once per field: the descriptor and option lookups cost more
    than the copying they steer (a tenth of a ``Check``).
    """
    entry = fd.message_type
    value_fd = fd
    if entry is not None and entry.GetOptions().map_entry:
        shape, value_fd = _MAP, entry.fields_by_name["value"]
    else:
        shape = _LIST if fd.is_repeated else _ONE
    if value_fd.message_type is not None:
        kind = _MESSAGE
    elif value_fd.type == FieldDescriptor.TYPE_BYTES:
        kind = _BYTES
    else:
        kind = _PLAIN
    plan = _PLANS[fd] = (fd.json_name, shape, kind)
    return plan


def _value(kind: int, value: Any) -> Any:
    if kind == _MESSAGE:
        return protomap(value)
    if kind == _BYTES:
        return base64.b64encode(value).decode("ascii")
    return value


def protomap(msg: Message) -> dict[str, Any]:
    """A message as OPA-Envoy's ``protomap`` gives it: set fields under their JSON names."""
    if isinstance(msg, struct_pb2.Struct):
        return json_format.MessageToDict(msg)
    out: dict[str, Any] = {}
    for fd, value in msg.ListFields():
        name, shape, kind = _PLANS.get(fd) or _plan(fd)
        if shape == _MAP:
            if kind == _PLAIN:  # the headers: no call per entry
                out[name] = {str(k): v for k, v in value.items()}
            else:
                out[name] = {str(k): _value(kind, value[k]) for k in value}
        elif shape == _LIST:
            out[name] = list(value) if kind == _PLAIN else [_value(kind, v) for v in value]
        elif kind == _PLAIN:
            out[name] = value
        else:
            out[name] = _value(kind, value)
    return out


def _truncated(headers: Mapping[str, str], size: int) -> bool:
    length = headers.get("content-length")
    if length is None:
        return False
    try:
        declared = int(length.strip(), 10)
    except ValueError:
        raise ValueError(f"content-length {length[:40]!r} is not a number") from None
    return declared != -1 and declared > size


def _cut(headers: Mapping[str, str], size: int, max_request_bytes: int | None) -> bool:
    """Whether Envoy cut the body at ``max_request_bytes``, said or not.

    Envoy checks once it holds ``max_request_bytes`` and says ``partial-body: false``
    when the cut lands exactly there, then forwards the rest: a body that long is cut
    unless ``content-length`` (whose framing Envoy enforces) says it ends there.
    """
    if headers.get("x-envoy-auth-partial-body") == "true":
        return True
    if max_request_bytes is None or size < max_request_bytes:
        return False
    try:
        return int(headers.get("content-length", ""), 10) != size
    except ValueError:
        return True


def partial_body(
    headers: Mapping[str, str], body: bytes, max_request_bytes: int | None = None
) -> bool:
    """Whether Envoy sent less than the whole body: cut at ``max_request_bytes``
    (``x-envoy-auth-partial-body``, or a body that long whose ``content-length`` does
    not say it ends there), or not sent at all (no ``with_request_body``) while
    ``content-length`` says there is one, or a chunked body (``transfer-encoding``)
    came as nothing. An unreadable length counts as cut.

    ``max_request_bytes``: the filter's ``with_request_body.max_request_bytes``;
    ``None`` trusts Envoy's header alone.
    """
    if _cut(headers, len(body), max_request_bytes):
        return True
    if not body and headers.get("transfer-encoding", "").strip():
        return True
    try:
        return _truncated(headers, len(body))
    except ValueError:
        return True


def body_limit(max_request_bytes: int | None, max_message_bytes: int) -> int | None:
    """``max_request_bytes`` when a ``CheckRequest`` with that much body fits
    ``max_message_bytes`` (with :data:`CHECK_ROOM` to spare); ``ValueError`` if not.

    gRPC refuses a larger message before any handler runs, with an error Envoy
    answers by its ``failure_mode_allow``, not with Warden's decision.
    """
    if max_request_bytes is not None and max_request_bytes + CHECK_ROOM > max_message_bytes:
        raise ValueError(
            f"{max_request_bytes} bytes of body and {CHECK_ROOM} for the rest of a "
            f"CheckRequest exceed grpc.max_message_bytes ({max_message_bytes}): gRPC would "
            "refuse such checks before Warden reads them; raise grpc.max_message_bytes to "
            f"at least {max_request_bytes + CHECK_ROOM}, or lower max_request_bytes here "
            "and in Envoy's with_request_body"
        )
    return max_request_bytes


class GrpcBodies:
    """The request messages of the gRPC services in a ``FileDescriptorSet``, by method path.

    Build it with :meth:`load` from the file OPA-Envoy's ``proto-descriptor``
    takes (``protoc --include_imports --descriptor_set_out=FILE``).
    """

    def __init__(self, files: descriptor_pb2.FileDescriptorSet) -> None:
        """``ValueError`` when the set is not self-contained (imports left out)."""
        self._pool = descriptor_pool.DescriptorPool()
        for proto in files.file:
            try:
                self._pool.Add(proto)
            except (TypeError, KeyError) as exc:
                raise ValueError(f"{proto.name}: {exc} (built with --include_imports?)") from None
        self._classes: dict[tuple[str, str], type[Message] | None] = {}

    @classmethod
    def load(cls, data: bytes) -> GrpcBodies:
        """From a serialized ``FileDescriptorSet``; ``ValueError`` if it is not one."""
        try:
            files = descriptor_pb2.FileDescriptorSet.FromString(data)
        except DecodeError as exc:
            raise ValueError(f"not a FileDescriptorSet: {exc}") from None
        return cls(files)

    def request_class(self, service: str, method: str) -> type[Message] | None:
        """The request message of ``service``/``method``; ``None``: unknown, or client-streaming."""
        key = (service, method)
        if key in self._classes:
            return self._classes[key]
        try:
            described = self._pool.FindServiceByName(service).methods_by_name.get(method)
        except KeyError:
            described = None
        if described is None:
            return None  # not kept: the path is the caller's, the memo must stay bounded
        found = None
        if not described.client_streaming:
            found = message_factory.GetMessageClass(described.input_type)
        self._classes[key] = found  # bounded by the methods the descriptors define
        return found


def _grpc_body(body: bytes, path: list[str], bodies: GrpcBodies) -> tuple[Any, bool]:
    """The first gRPC message of ``body`` as protojson gives it, as OPA-Envoy reads it.

    ``(None, False)`` for what it does not parse (a compressed message, an
    unknown service or method); ``ValueError`` for a frame or message that
    cannot be read.
    """
    if len(path) != 2:
        raise ValueError("a gRPC request path is /<service>/<method>")
    if len(body) < 5:
        raise ValueError("the gRPC frame is shorter than its 5-byte prefix")
    if body[0] != 0:
        return None, False  # compressed: not parsed, as in OPA-Envoy
    size = int.from_bytes(body[1:5], "big")
    if size > len(body) - 5:
        return None, True
    message_class = bodies.request_class(path[0], path[1])
    if message_class is None:
        return None, False
    try:
        message = message_class.FromString(body[5 : 5 + size])
    except DecodeError as exc:
        raise ValueError(f"the gRPC message is not a {path[0]}/{path[1]} request: {exc}") from None
    return json_format.MessageToDict(message), False


_BODY_FORMATS: Final = ("application/grpc", "application/json", "application/x-www-form-urlencoded")


def _parsed_body(
    headers: Mapping[str, str],
    body: bytes,
    path: list[str] | None = None,
    grpc_bodies: GrpcBodies | None = None,
    *,
    raw: bool = True,
    max_request_bytes: int | None = None,
) -> tuple[Any, bool]:
    """``(parsed_body, truncated_body)`` as OPA-Envoy finds them; ``ValueError`` if unparsable.

    ``raw``: ``body`` came as bytes (``raw_body``), not as Envoy's UTF-8 string.
    """
    if _cut(headers, len(body), max_request_bytes) or _truncated(headers, len(body)):
        # Cut, or not sent at all (no with_request_body) while content-length says
        # there is a body: whatever its type, the policy is told.
        return None, True
    content_type = headers.get("content-type")
    if content_type is None or not body:
        return None, False
    named = [f for f in _BODY_FORMATS if f in content_type]
    if len(named) > 1:
        # OPA-Envoy takes the first it looks for, wherever it stands: the policy would
        # read "application/x-www-form-urlencoded; x=application/json" as JSON while
        # the service reads a form.
        raise ValueError(f"the Content-Type names more than one body format ({', '.join(named)})")
    if named and named[0] != "application/grpc" and (why := foreign_charset(content_type)):
        # A service decoding by the charset (aiohttp's json() and post()) reads other
        # keys than parsed_body shows the policy.
        raise ValueError(f"{why}; send the body as UTF-8")
    if "application/grpc" in content_type:
        if grpc_bodies is None or path is None or not raw:
            # Binary: only Envoy's ``raw_body`` (``pack_as_bytes``) carries it whole.
            return None, False
        return _grpc_body(body, path, grpc_bodies)
    if "application/json" in content_type:
        try:
            return parse_body(body, "application/json"), False
        except ToolRequestError as exc:
            raise ValueError(str(exc)) from None
    if "application/x-www-form-urlencoded" in content_type:
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError("the form body is not UTF-8") from None
        return parse_query(text), False
    return None, False  # multipart and other bodies are not parsed


def check_input(
    request: external_auth_pb2.CheckRequest,
    grpc_bodies: GrpcBodies | None = None,
    *,
    max_request_bytes: int | None = None,
) -> CheckInput:
    """The OPA-Envoy ``input`` for ``request``; see the module docstring.

    ``grpc_bodies``: the services whose gRPC request bodies are parsed.
    ``max_request_bytes``: the filter's ``with_request_body.max_request_bytes``; a body
    that long counts as cut (:func:`partial_body`). ``None`` trusts Envoy's header alone.
    """
    doc = protomap(request)
    http_request = request.attributes.request.http
    problem: str | None = None
    try:
        headers = _headers_of(http_request)
    except ValueError as exc:
        headers, problem = dict(http_request.headers), str(exc)
    shown_http = doc.get("attributes", {}).get("request", {}).get("http", {})
    if "headerMap" in shown_http:
        # Envoy's encode_raw_headers: shown as the map OPA-Envoy policies read, and
        # scrubbed below like it (raw values are credentials too).
        del shown_http["headerMap"]
        shown_http["headers"] = dict(headers)
    shown = shown_http.get("headers")
    if isinstance(shown, dict):
        # A policy (and anything it prints) never sees an agent's key or token.
        for name in list(shown):
            if name.lower() in CREDENTIAL_HEADERS:
                del shown[name]
    body = http_request.raw_body or http_request.body.encode("utf-8")
    doc["version"] = dict(_VERSION)
    principal = request.attributes.source.principal
    if principal:
        doc["source_principal"] = principal
    raw_path, _, raw_query = http_request.path.partition("?")
    base = CheckInput(
        doc, http_request.method, raw_path, http_request.host, headers, body, query=raw_query
    )
    if not request.attributes.request.HasField("http"):
        return _with_problem(base, "the CheckRequest carries no HTTP request")
    if problem is not None:
        return _with_problem(base, problem)
    try:
        doc["parsed_path"] = unescape(raw_path, plus=False, what="the path").lstrip("/").split("/")
        doc["parsed_query"] = parse_query(raw_query)
    except ValueError as exc:
        return _with_problem(base, f"error parsing path and query: {exc}")
    try:
        doc["parsed_body"], doc["truncated_body"] = _parsed_body(
            headers,
            body,
            doc["parsed_path"],
            grpc_bodies,
            raw=bool(http_request.raw_body),
            max_request_bytes=max_request_bytes,
        )
    except ValueError as exc:
        return _with_problem(base, f"error parsing request body: {exc}")
    return base


def _headers_of(http_request: Any) -> dict[str, str]:
    """The request's headers, from ``header_map`` when Envoy sends raw headers
    (``encode_raw_headers: true``): each name lower-cased, repeated ones joined with
    ``,`` as Envoy joins them in ``headers``. ``ValueError`` if a value is not UTF-8."""
    if not http_request.header_map.headers:
        return dict(http_request.headers)
    headers: dict[str, str] = {}
    for entry in http_request.header_map.headers:
        try:
            value = entry.raw_value.decode("utf-8") if entry.raw_value else entry.value
        except UnicodeDecodeError:
            raise ValueError(f"the value of header {entry.key[:40]!r} is not UTF-8") from None
        key = entry.key.lower()
        headers[key] = f"{headers[key]},{value}" if key in headers else value
    return headers


def _with_problem(base: CheckInput, problem: str) -> CheckInput:
    return replace(base, problem=problem)


def decode_segments(path: str) -> list[str] | None:
    """The path's segments, each percent-decoded once, for route rules; ``None`` if unsafe.

    Stricter than ``parsed_path``: a segment that is empty, ``.`` or ``..``
    once decoded (or before a ``;``), or that holds an encoded slash or a control character,
    could mean another resource to the service behind Envoy, so such a path
    fits no rule and is refused.
    """
    if path == "/":
        return []
    segments: list[str] = []
    for raw in path.removeprefix("/").split("/"):
        try:
            segment = unescape(raw, plus=False, what="a path segment")
        except ValueError:
            return None
        # Tomcat and Spring drop ";" parameters first: "..;" is ".." to them.
        if segment.partition(";")[0] in ("", ".", "..") or "/" in segment or "\\" in segment:
            return None
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in segment):
            return None
        segments.append(segment)
    return segments


# -- the policy's result ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AuthzResult:
    """A policy's ext_authz value, checked; ``structured`` is false for a plain boolean."""

    allowed: bool
    structured: bool = False
    headers: tuple[tuple[str, str], ...] = ()
    response_headers_to_add: tuple[tuple[str, str], ...] = ()
    request_headers_to_remove: tuple[str, ...] = ()
    query_parameters_to_set: tuple[tuple[str, str], ...] = ()
    query_parameters_to_remove: tuple[str, ...] = ()
    body: str = ""
    http_status: int = 403
    dynamic_metadata: Mapping[str, Any] = field(default_factory=dict)


def _strings(value: Any, name: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{name} must be a list of strings")
    return tuple(value)


def _pairs(value: Any, name: str) -> list[tuple[str, str]]:
    """One header object: each value a string or a list of strings."""
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be an object or a list of objects")
    out: list[tuple[str, str]] = []
    for key, item in value.items():
        if isinstance(item, str):
            out.append((key, item))
        elif isinstance(item, list) and all(isinstance(v, str) for v in item):
            out.extend((key, v) for v in item)
        else:
            raise ValueError(f"{name}.{key} must be a string or a list of strings")
    return out


def _headers(value: Any, name: str) -> tuple[tuple[str, str], ...]:
    if isinstance(value, list):
        return tuple(pair for item in value for pair in _pairs(item, name))
    return tuple(_pairs(value, name))


def _status(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("http_status must be an integer")
    if value not in _HTTP_STATUSES or value not in _ENVOY_STATUSES:
        raise ValueError(f"http_status {value} is not an HTTP status Envoy can send")
    return value


def read_result(value: Any) -> AuthzResult:
    """Check a policy's value as OPA-Envoy does; ``ValueError`` says what is wrong.

    As in OPA-Envoy, only what the answer uses is checked: the request
    mutations when allowed, ``body`` and ``http_status`` when denied,
    ``headers`` and ``dynamic_metadata`` either way.
    """
    if isinstance(value, bool):
        return AuthzResult(allowed=value)
    if not isinstance(value, dict):
        raise ValueError(f"the result must be a boolean or an object, not {_kind(value)}")
    if "allowed" not in value:
        raise ValueError('the result object has no "allowed" key')
    allowed = value["allowed"]
    if not isinstance(allowed, bool):
        raise ValueError("allowed must be a boolean")
    headers = _headers(value["headers"], "headers") if "headers" in value else ()
    metadata = value.get("dynamic_metadata", {})
    if not isinstance(metadata, dict):
        raise ValueError("dynamic_metadata must be an object")
    if allowed:
        params = value.get("query_parameters_to_set", {})
        if not isinstance(params, dict):
            raise ValueError("query_parameters_to_set must be an object")
        return AuthzResult(
            allowed=True,
            structured=True,
            headers=headers,
            response_headers_to_add=_headers(
                value.get("response_headers_to_add", {}), "response_headers_to_add"
            ),
            request_headers_to_remove=_strings(
                value.get("request_headers_to_remove", []), "request_headers_to_remove"
            ),
            query_parameters_to_set=tuple(_pairs(params, "query_parameters_to_set")),
            query_parameters_to_remove=_strings(
                value.get("query_parameters_to_remove", []), "query_parameters_to_remove"
            ),
            dynamic_metadata=metadata,
        )
    body = value.get("body", "")
    if not isinstance(body, str):
        raise ValueError("body must be a string")
    return AuthzResult(
        allowed=False,
        structured=True,
        headers=headers,
        body=body,
        http_status=_status(value["http_status"]) if "http_status" in value else 403,
        dynamic_metadata=metadata,
    )


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def read_allowed(value: Any) -> tuple[bool, AuthzResult]:
    """Whether the value allows the request, and the result read (a ``PolicyView.read``)."""
    result = read_result(value)
    return result.allowed, result


# -- the response -------------------------------------------------------------------------------


def _options(pairs: Sequence[tuple[str, str]]) -> list[base_pb2.HeaderValueOption]:
    return [
        base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=k, value=v)) for k, v in pairs
    ]


def render_response(
    result: AuthzResult | None,
    *,
    allowed: bool,
    decision_id: str,
    status: int = 403,
    body: str = "",
    credentials: Sequence[str] = (),
    upstream_key: tuple[str, str] | None = None,
) -> external_auth_pb2.CheckResponse:
    """The CheckResponse, as OPA-Envoy builds it, with the decision id in the dynamic metadata.

    ``allowed`` is the answer. ``result`` is the policy's checked value, if
    the policy decided: when the answer follows it, a boolean gives no HTTP
    response and an object gives its headers, status and body; when it does
    not (dry-run letting a denial through), the answer is an empty
    ``OkHttpResponse``, as in OPA-Envoy. When Warden denies on its own (a
    kill switch, a budget, an unparsable request), the ``DeniedHttpResponse``
    has ``status`` and ``body``. The policy's ``dynamic_metadata`` is kept in
    every case. ``credentials``: Warden's credential headers the request
    carried; an allowed request has them removed before Envoy forwards it.
    ``upstream_key``: the header (lower case) and value of the upstream key
    Warden holds; an allowed request carries it, overwriting the agent's, and
    no removal names that header (whatever order Envoy applies them in).
    """
    response = external_auth_pb2.CheckResponse()
    response.status.code = _GRPC_OK if allowed else _GRPC_PERMISSION_DENIED
    if result is not None and result.dynamic_metadata:
        response.dynamic_metadata.update(result.dynamic_metadata)
    if allowed:
        if credentials:
            # The agent's Warden credentials are for Warden: Envoy strips them before the upstream.
            response.ok_response.headers_to_remove.extend(credentials)
        if result is None or not result.allowed:
            response.ok_response.SetInParent()
        elif result.structured:
            ok = response.ok_response
            ok.headers.extend(_options(result.headers))
            ok.headers_to_remove.extend(result.request_headers_to_remove)
            ok.response_headers_to_add.extend(_options(result.response_headers_to_add))
            ok.query_parameters_to_set.extend(
                base_pb2.QueryParameter(key=k, value=v) for k, v in result.query_parameters_to_set
            )
            ok.query_parameters_to_remove.extend(result.query_parameters_to_remove)
        if upstream_key is not None:
            name, value = upstream_key
            ok = response.ok_response
            kept = [h for h in ok.headers_to_remove if h.lower() != name]
            del ok.headers_to_remove[:]
            ok.headers_to_remove.extend(kept)
            mine = [o for o in ok.headers if o.header.key.lower() != name]  # the policy's too
            del ok.headers[:]
            ok.headers.extend(mine)
            ok.headers.append(
                base_pb2.HeaderValueOption(
                    header=base_pb2.HeaderValue(key=name, value=value),
                    append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
                )
            )
    elif result is None or result.allowed:
        denied = response.denied_response
        denied.status.code = status
        denied.body = body
    elif result.structured:
        denied = response.denied_response
        denied.status.code = result.http_status
        denied.headers.extend(_options(result.headers))
        denied.body = result.body
    if decision_id:  # none when the request was refused before it became a decision
        for key in DECISION_ID_KEYS:
            response.dynamic_metadata[key] = decision_id
    return response


class Answers:
    """:func:`read_allowed` and :func:`render_response` done once per distinct value.

    A decision-cache hit hands the door the very value object it cached, so
    the result read from it, and the response an allow renders, repeat check
    after check: reading and rendering them once saves about 13 µs a check.
    Keyed by identity, each entry keeping its value alive so the id cannot be
    reused by another object; cleared when ``size`` entries are reached. Only
    allows are rendered from memory: a denial's body names its decision.
    """

    def __init__(self, size: int = 1024) -> None:
        self._size = size
        self._read: dict[int, tuple[Any, tuple[bool, AuthzResult]]] = {}
        self._allowed: dict[
            tuple[int, tuple[str, ...], tuple[str, str] | None], tuple[AuthzResult, Any]
        ] = {}

    def read(self, value: Any) -> tuple[bool, AuthzResult]:
        """:func:`read_allowed` (a ``PolicyView.read``); ``ValueError`` is not remembered."""
        hit = self._read.get(id(value))
        if hit is not None and hit[0] is value:
            return hit[1]
        answer = read_allowed(value)
        if len(self._read) >= self._size:
            self._read.clear()
        self._read[id(value)] = (value, answer)
        return answer

    def render(
        self,
        result: AuthzResult | None,
        *,
        allowed: bool,
        decision_id: str,
        status: int = 403,
        body: str = "",
        credentials: Sequence[str] = (),
        upstream_key: tuple[str, str] | None = None,
    ) -> external_auth_pb2.CheckResponse:
        """:func:`render_response`, an allow's from a template made once per result."""
        if not allowed or result is None or not decision_id:
            return render_response(
                result,
                allowed=allowed,
                decision_id=decision_id,
                status=status,
                body=body,
                credentials=credentials,
                upstream_key=upstream_key,
            )
        key = (id(result), tuple(credentials), upstream_key)
        hit = self._allowed.get(key)
        if hit is None or hit[0] is not result:
            template = render_response(
                result,
                allowed=True,
                decision_id="",
                credentials=credentials,
                upstream_key=upstream_key,
            )
            if len(self._allowed) >= self._size:
                self._allowed.clear()
            hit = self._allowed[key] = (result, template)
        response = external_auth_pb2.CheckResponse()
        response.CopyFrom(hit[1])
        for name in DECISION_ID_KEYS:
            response.dynamic_metadata[name] = decision_id
        return response
