"""Route rules: requests a service could run as another call than the one Warden decides.

Method overrides, body fields that override query arguments, rules that
shadow one another, ``HEAD`` and suffixed paths, and encoded bodies: each
is refused (or decided as the service runs it), never guessed.
"""

from __future__ import annotations

import base64
from typing import Any
from urllib.parse import quote

import orjson
import pytest
from aiohttp.helpers import parse_content_type
from multidict import CIMultiDict

from warden.config import load_config
from warden.errors import ConfigError
from warden.protocols.http_tool import (
    MAX_FORM_FIELDS,
    MAX_FORM_NAME_CHARS,
    RouteRule,
    ToolRequest,
    ToolRequestError,
    ToolRoutes,
    check_specificity,
)

JSON = "application/json"
FORM = "application/x-www-form-urlencoded"
MP = "multipart/form-data; boundary=b"
REFUND = RouteRule.compile(
    "POST",
    "/orders/{order_id}/refunds",
    "issue_refund",
    {"order_id": "{order_id}", "amount": "/amount"},
)
CREDIT = RouteRule.compile(
    "POST",
    "/orders/{order_id}/credits",
    "issue_credit",
    {"order_id": "{order_id}", "amount": "?amount"},
)
ROUTES = ToolRoutes(
    (
        REFUND,
        CREDIT,
        # Forwards its body unread, so that only the _method checks refuse one here.
        RouteRule.compile(
            "POST", "/orders/{order_id}", "update_order", {"id": "{order_id}"}, body="unread"
        ),
        RouteRule.compile("GET", "/orders/{order_id}", "get_order", {"id": "{order_id}"}),
        RouteRule.compile("GET", "/orders/export", "export_orders", {}),
        RouteRule.compile(
            "GET",
            "/orders/{order_id}/items",
            "list_items",
            {"id": "{order_id}", "status": "?status", "filter": "/status"},
        ),
    ),
    unmatched="allow",
)


def resolve(
    method: str,
    path: str,
    body: Any = b"",
    content_type: str = JSON,
    query: str = "",
    headers: dict[str, str] | None = None,
) -> ToolRequest | None:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    segments = path.strip("/").split("/")
    return ROUTES.resolve(method, segments, raw, content_type, query, headers=headers or {})


def routes(*specs: tuple[str, str]) -> ToolRoutes:
    return ToolRoutes(
        tuple(RouteRule.compile(m, p, f"tool_{i}", {}) for i, (m, p) in enumerate(specs))
    )


# -- 1. method overrides --------------------------------------------------------------------


@pytest.mark.parametrize(
    "header", ["X-HTTP-Method-Override", "x-http-method", "X-METHOD-OVERRIDE", "X-Http-Method"]
)
@pytest.mark.parametrize("path", ["/orders/A-1/refunds", "/health"])  # fits a rule, or none
def test_a_method_override_header_is_refused_whatever_the_route(header: str, path: str) -> None:
    body = {"amount": 5}
    with pytest.raises(ToolRequestError, match=f"carries {header}, which makes services"):
        resolve("POST", path, body, headers={header: "DELETE"})
    # As the proxy hands them over (aiohttp's case-insensitive multidict), too.
    with pytest.raises(ToolRequestError, match="another method"):
        ROUTES.resolve(
            "POST", path.strip("/").split("/"), b"{}", JSON, headers=CIMultiDict({header: "GET"})
        )


@pytest.mark.parametrize(
    "header", ["X_HTTP_Method_Override", "x_method_override", "X_Original_URL", "x_rewrite-url"]
)
def test_an_override_header_spelled_with_underscores_is_refused(header: str) -> None:
    # CGI and WSGI servers read X_HTTP_Method_Override as X-HTTP-Method-Override.
    with pytest.raises(ToolRequestError, match=f"carries {header}, which makes services"):
        resolve("POST", "/orders/A-1", {}, headers={header: "DELETE"})


def test_an_encoding_or_type_header_spelled_with_underscores_counts() -> None:
    with pytest.raises(ToolRequestError, match="body is encoded"):
        resolve("POST", "/orders/A-1/refunds", {"amount": 5}, headers={"Content_Encoding": "gzip"})
    with pytest.raises(ToolRequestError, match="Content-Type twice"):
        resolve(
            "POST",
            "/orders/A-1/refunds",
            {"amount": 5},
            headers={"Content-Type": JSON, "Content_Type": FORM},
        )


@pytest.mark.parametrize("method", ["post", "Post", "delete"])
def test_a_method_not_in_upper_case_is_refused(method: str) -> None:
    # Over HTTP/2 Envoy passes it as sent; ASP.NET Core and Werkzeug run the POST rule.
    with pytest.raises(ToolRequestError, match="not in upper case"):
        resolve(method, "/orders/A-1/refunds", {"amount": 5000})


@pytest.mark.parametrize(
    "content_type",
    [
        FORM + ", text/plain",
        "text/plain, " + FORM,
        JSON + ",application/json",
        FORM + " text/plain",  # PHP cuts at a space too
        "multipart/form-data boundary=XX",
    ],
)
def test_more_than_one_media_type_is_refused(content_type: str) -> None:
    # Rack splits the type at ',' and PHP stops there: a form Warden did not look into.
    with pytest.raises(ToolRequestError, match="more than one media type"):
        resolve("POST", "/orders/A-1", b"_method=DELETE", content_type)


def test_content_type_given_twice_is_refused() -> None:
    headers = CIMultiDict([("Content-Type", JSON), ("Content-Type", FORM)])
    with pytest.raises(ToolRequestError, match="Content-Type twice"):
        ROUTES.resolve("POST", ["health"], b"{}", JSON, headers=headers)


@pytest.mark.parametrize(
    ("body", "content_type", "where"),
    [
        (b'{"amount": 5, "_method": "DELETE"}', JSON, "JSON body"),
        (b'{"amount": 5, "_METHOD": "DELETE"}', JSON, "JSON body"),
        (b'{"amount": 5, "\\u005fmethod": "DELETE"}', JSON, "JSON body"),
        (b'\xef\xbb\xbf{"_method": "DELETE", "amount": 5}', "application/merge-patch+json", "JSON"),
        (b"_method=DELETE", FORM, "form body"),
        (b"a=1&%5Fmethod=DELETE", FORM + "; charset=utf-8", "form body"),
        (b"_Method=DELETE", "", "form body"),  # Rack reads a POST without a type as a form
        (b".method=DELETE", FORM, "form body"),  # PHP reads "." in a name as "_"
        (b"_method[]=DELETE", FORM, "form body"),
        (b"a=1;_method=DELETE", FORM, "form body"),
        # Laravel reads any type containing "/json" or "+json" as JSON.
        (b'{"_method": "DELETE"}', "text/json", "JSON body"),
        (b'{"_method": "DELETE"}', "application/json-seq", "JSON body"),
        (b'{"_method": "DELETE"}', "text/plain; x=/json", "JSON body"),  # the whole header
        (b"_method=DELETE", FORM + "; v=+json", "form body"),  # a form all the same
        (b"_method%00x=DELETE", FORM, "form body"),  # PHP cuts a name at a NUL
        # ASP.NET MVC 5 reads the override header's name as a form field too.
        (b"a=1&X-HTTP-Method-Override=DELETE", FORM, "form body"),
        (b"x-http-method-override=PUT", "", "form body"),
    ],
)
def test_a_method_field_in_a_json_or_form_body_is_refused(
    body: bytes, content_type: str, where: str
) -> None:
    for path in ("/orders/A-1", "/health"):
        with pytest.raises(ToolRequestError, match=f"{where}.*'_method' field"):
            resolve("POST", path, body, content_type)


@pytest.mark.parametrize(
    "disposition",
    [
        'form-data; name="_method"',
        "form-data; name=_METHOD",
        "form-data; name*=utf-8''%5Fmethod",
        'form-data; filename="x.txt"; name="_method"',
        'form-data;\r\n name="_method"',  # folded: PHP joins the line to the one before
        'form-data;\r\n\tname="_method"',
    ],
)
def test_a_method_field_in_a_multipart_body_is_refused(disposition: str) -> None:
    body = (
        b'--b\r\nContent-Disposition: form-data; name="note"\r\n\r\nhi\r\n'
        b"--b\r\nContent-Disposition: " + disposition.encode() + b"\r\n\r\nDELETE\r\n--b--\r\n"
    )
    with pytest.raises(ToolRequestError, match="form body has a '_method' field"):
        resolve("POST", "/orders/A-1", body, "multipart/form-data; boundary=b")


@pytest.mark.parametrize("header", ["X-Original-URL", "x-rewrite-url"])
def test_a_path_override_header_is_refused(header: str) -> None:
    # IIS URL Rewrite, Symfony and Laminas route the path such a header names.
    with pytest.raises(ToolRequestError, match=f"carries {header}, which makes services"):
        resolve("GET", "/orders/A-1", headers={header: "/orders/A-1/refunds"})


def test_a_method_query_parameter_is_refused() -> None:
    with pytest.raises(ToolRequestError, match="query has a '_method' field"):
        resolve("POST", "/health", query="_method=DELETE")
    with pytest.raises(ToolRequestError, match="query has a '_method' field"):
        resolve("POST", "/orders/A-1", query="x=1&_Method=PUT")
    with pytest.raises(ToolRequestError, match="query has a '_method' field"):
        resolve("POST", "/orders/A-1", query="X-HTTP-Method-Override=DELETE")  # ASP.NET MVC 5


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b'{"amount": 5, "order": {"_method": "DELETE"}}', JSON),  # not top level
        (b'{"amount": 5, "payment_method": "card"}', JSON),
        (b"payment_method=card&method=x", FORM),
        (
            b'--b\r\nContent-Disposition: form-data; name="payment_method"\r\n\r\nx\r\n--b--',
            "multipart/form-data; boundary=b",
        ),
        (b"_method=DELETE", "text/plain"),  # no framework reads this as a form
        (b'["_method"]', JSON),
        (b"not json _method", JSON),
    ],
)
def test_other_fields_named_like_method_pass(body: bytes, content_type: str) -> None:
    assert resolve("POST", "/orders/A-1", body, content_type) == ToolRequest(
        "update_order", {"id": "A-1"}
    )


# -- 2. a body that could override a query argument ------------------------------------------


@pytest.mark.parametrize(
    ("query", "body", "content_type", "message"),
    [
        # Go's FormValue and Laravel's input() read 9000 (the body wins); Warden saw 5.
        ("amount=5", b"amount=9000", FORM, "form"),
        ("", b"amount=9000", FORM, "form"),  # and null, had the query left it out
        ("amount=5", b"--b\r\n\r\n--b--", "multipart/form-data; boundary=b", "multipart"),
        ("amount=5", b"9000", "text/plain", "text/plain"),
        ("amount=5", b"amount=9000", "", "non-JSON"),
        ("amount=5", b'{"amount": 9000}', JSON, "top-level key 'amount'"),
        ("amount=5", b'{"Amount": 9000}', JSON, "top-level key 'Amount'"),
        ("", b'{"AMOUNT": 9000}', JSON, "top-level key 'AMOUNT'"),  # merged over a null
        ("amount=5", b'{"amount": 1, "amount": 9000}', JSON, "twice"),
        ("amount=5", b"{not json", JSON, "not valid JSON"),
    ],
)
def test_a_body_that_could_override_a_query_argument_is_refused(
    query: str, body: bytes, content_type: str, message: str
) -> None:
    with pytest.raises(ToolRequestError, match=message):
        resolve("POST", "/orders/A-1/credits", body, content_type, query)


def test_a_body_that_cannot_override_a_query_argument_passes() -> None:
    expected = ToolRequest("issue_credit", {"order_id": "A-1", "amount": "5"})
    assert resolve("POST", "/orders/A-1/credits", b"", FORM, "amount=5") == expected
    # A body the rule reads whole (every body field is an argument) with no such key.
    whole = RouteRule.compile(
        "POST", "/orders/{order_id}/credits", "issue_credit", {"amount": "?amount", "body": ""}
    )
    for body in ({"note": "late"}, [9000]):
        got = whole.build({"order_id": "A-1"}, orjson.dumps(body), JSON, "amount=5")
        assert got == {"amount": "5", "body": body}
    # A rule that reads no query parameter: the query is empty, nothing to override.
    assert resolve("POST", "/orders/A-1", b"amount=9000", FORM) is not None


def test_a_body_key_read_by_pointer_and_named_in_the_query_is_refused() -> None:
    # Flask's request.values lets the query win, Laravel the body: one of the two
    # values the policy saw is not the one the service reads.
    with pytest.raises(ToolRequestError, match="top-level key 'status'"):
        resolve("GET", "/orders/A-1/items", {"status": "open"}, JSON, "status=all")
    with pytest.raises(ToolRequestError, match="top-level key 'status'"):
        resolve("GET", "/orders/A-1/items", {"status": "open"}, JSON)


# -- 2b. an unread body that could override a path argument ---------------------------------


@pytest.mark.parametrize(
    ("body", "content_type", "where"),
    [
        # ASP.NET MVC model binding and Laravel's $request->order_id read these over the route.
        (b"note=x&order_id=A-2", FORM, "form body"),
        (b"ORDER_ID=A-2", FORM, "form body"),
        (b"order%5Fid=A-2", FORM + "; charset=utf-8", "form body"),
        (b"order.id=A-2", FORM, "form body"),  # PHP reads "." and " " as "_"
        (b"order+id=A-2", FORM, "form body"),
        (b"order[id=A-2", FORM, "form body"),  # and an unclosed "[" too
        (b"order_id[]=A-2", FORM, "form body"),
        (b"update[order_id]=A-2", FORM, "form body"),  # ASP.NET's prefixed names
        (b"x=1;[0].Order_Id=A-2", FORM, "form body"),
        ("order_\u0131d=A-2".encode(), FORM, "form body"),  # ASP.NET reads a dotless i as I
        (b"order_id=A-2", "", "form body"),  # Rails reads a body without a type as a form
        (b'--b\r\nContent-Disposition: form-data; name="order_id"\r\n\r\nA-2\r\n--b--', MP, "form"),
        (
            b"--b\r\nContent-Disposition: form-data; name*=utf-8''order%5Fid\r\n\r\nA-2\r\n--b--",
            MP,
            "form",
        ),
        (b'{"order_id": "A-2"}', JSON, "JSON body's top-level object"),
        (b'{"Order_ID": "A-2"}', "application/merge-patch+json", "JSON body's"),
        (b'{"\\u006frder_id": "A-2"}', JSON, "JSON body's"),
        (b'{"order_id": "A-2"}', "text/json", "JSON body's"),  # Laravel reads it as JSON
    ],
)
def test_an_unread_body_field_named_like_a_path_parameter_is_refused(
    body: bytes, content_type: str, where: str
) -> None:
    # The rule's argument is "id"; the service binds the template's name, order_id.
    with pytest.raises(ToolRequestError, match=rf"{where}.*path parameter \{{order_id\}}"):
        resolve("POST", "/orders/A-1", body, content_type)


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"note=x&order=A-2&id=A-2", FORM),  # the argument's name is Warden's, not the service's
        (b'{"note": "x", "order": {"order_id": "A-2"}}', JSON),  # not top level
        (b'{"order_id": "A-2"', JSON),  # no JSON to a service either: nothing merged
        (b"order_id=A-2", "application/octet-stream"),  # an upload's bytes carry no field
        (b"order_id=A-2", "text/plain"),
        (b'--b\r\nContent-Disposition: form-data; name="file"\r\n\r\norder_id\r\n--b--', MP),
    ],
)
def test_an_unread_body_with_no_field_named_like_a_path_parameter_passes(
    body: bytes, content_type: str
) -> None:
    assert resolve("POST", "/orders/A-1", body, content_type) == ToolRequest(
        "update_order", {"id": "A-1"}
    )


# -- 2c. a multipart part's name, as each parser reads it ------------------------------------

# Part heads that name the part {n} to some parser: which one, and how it reads it.
# {a} and {b} are {n}'s halves; {b64} and {utf7} are {n} encoded (RFC 2047, 2231).
PART_NAMES = [
    pytest.param(h, id=who)
    for h, who in [
        ("Content-Disposition: form-data; name='{n}'", "PHP: single quotes as double ones"),
        ('Content-Disposition: form-data; name="{n}"x', "PHP: text after the quote dropped"),
        ('Content-Disposition: form-data; name="{n}\x00x"', "PHP: a name cut at a NUL"),
        ("Content-Disposition: form-data;\r\n\tname={n}", "PHP, Go, aiohttp: a folded line"),
        ("Content-Disposition: form-data; NAME={n}", "PHP, Go, aiohttp, Werkzeug: any case"),
        ("Content-Disposition: form-data; name = {n}", "Go, aiohttp, Tomcat: spaces at '='"),
        ("Content-Disposition: form-data; name=x; name={n}", "PHP, Werkzeug: the last name"),
        ("Content-Disposition: form-data; name=x\r name={n}", "PHP: a lone CR as a space"),
        ("Content-Disposition: form-data; name={n}; name=x", "busboy, ASP.NET: the first"),
        ('Content-Disposition: form-data; name="{a}\\{b}"', "aiohttp, Werkzeug: \\x is x"),
    ]
]


def _part_named(head: str, name: str) -> bytes:
    """A multipart body whose second part's head is ``head`` spelling ``name``."""
    half = len(name) // 2
    spelled = head.format(
        n=name,
        a=name[:half],
        b=name[half:],
        b64=base64.b64encode(name.encode()).decode(),
        utf7=quote(name.replace("_", "+AF8-"), safe=""),  # "_" in UTF-7's base64 form
    )
    return (
        b'--b\r\nContent-Disposition: form-data; name="note"\r\n\r\nhi\r\n'
        b"--b\r\n" + spelled.encode("latin-1") + b"\r\n\r\nA-2\r\n--b--\r\n"
    )


@pytest.mark.parametrize("head", PART_NAMES)
def test_a_part_named_like_a_path_parameter_is_refused_as_any_parser_spells_it(head: str) -> None:
    with pytest.raises(ToolRequestError, match=r"form body.*path parameter \{order_id\}"):
        resolve("POST", "/orders/A-1", _part_named(head, "order_id"), MP)


@pytest.mark.parametrize("head", PART_NAMES)
def test_a_method_part_is_refused_as_any_parser_spells_it(head: str) -> None:
    for path in ("/orders/A-1", "/health"):  # a rule fits, or none
        with pytest.raises(ToolRequestError, match="form body has a '_method' field"):
            resolve("POST", path, _part_named(head, "_method"), MP)


@pytest.mark.parametrize(
    "head",
    [
        'Content-Disposition: form-data; name="file"; filename="{n}"',  # a file called so
        'Content-Disposition: form-data; name="{n}_note"',
        'Content-Disposition: form-data; name="x"; x-name="{n}"',
        'Content-Disposition: form-data; name="x"\r\nX-Note: name={n}',  # another header
        "Content-Disposition: form-data; name=x\r\n\r\nname={n}",  # the part's content
    ],
)
def test_a_part_no_parser_names_so_passes(head: str) -> None:
    for name in ("order_id", "_method"):
        assert resolve("POST", "/orders/A-1", _part_named(head, name), MP) == ToolRequest(
            "update_order", {"id": "A-1"}
        )


# -- 2d. forms too large to read every field name of --------------------------------------

TOO_MANY = "more than 10,000 fields"


def _parts(count: int, name: str = "note") -> bytes:
    part = b"--b\r\nContent-Disposition: form-data; name=" + name.encode() + b"\r\n\r\nx\r\n"
    return part * count + b"--b--\r\n"


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"&".join([b"note=x"] * (MAX_FORM_FIELDS + 1)), FORM),
        (b"note=x;" * MAX_FORM_FIELDS, ""),  # no type: Rails reads a form
        (b"%41" * (MAX_FORM_NAME_CHARS // 3 + 1) + b"=x&_method=DELETE", FORM),
        (_parts(MAX_FORM_FIELDS + 1), MP),
        (_parts(1, "x" * (MAX_FORM_NAME_CHARS + 1)), MP),
        # One head naming the part over and over, PHP and Werkzeug taking the last name.
        (b"--b\r\nContent-Disposition: form-data" + b"; name=a" * MAX_FORM_FIELDS * 2, MP),
    ],
    ids=["form", "form-no-type", "form-long-names", "parts", "part-long-name", "names-in-a-head"],
)
def test_a_form_with_more_fields_than_are_read_in_bounded_time_is_refused(
    body: bytes, content_type: str
) -> None:
    # Any field could be named like the path parameter {order_id} (or, past a service's own
    # bound, be the one it reads): rather than read millions of names on the proxy's time,
    # the form is refused. Fields are read only where a name matters: a body that spells
    # no "method" is not read for a '_method' field.
    with pytest.raises(ToolRequestError, match=TOO_MANY):
        resolve("POST", "/orders/A-1", body, content_type)
    with pytest.raises(ToolRequestError, match=TOO_MANY):
        resolve("POST", "/health", body + b"&_method=DELETE", content_type)


def test_a_form_within_the_bounds_is_read_whole() -> None:
    fields = b"&".join([b"note=x"] * (MAX_FORM_FIELDS - 2))
    assert resolve("POST", "/orders/A-1", fields, FORM) == ToolRequest(
        "update_order", {"id": "A-1"}
    )
    with pytest.raises(ToolRequestError, match="form body has a '_method' field"):
        resolve("POST", "/orders/A-1", fields + b"&_method=DELETE", FORM)
    parts = _parts(MAX_FORM_FIELDS - 1)
    assert resolve("POST", "/orders/A-1", parts, MP) == ToolRequest("update_order", {"id": "A-1"})
    with pytest.raises(ToolRequestError, match=r"path parameter \{order_id\}"):
        resolve("POST", "/orders/A-1", parts + _parts(1, "order_id"), MP)


def test_a_part_head_is_found_among_many_empty_lines() -> None:
    # Found by bytes.find, not an expression tried at every line start: as fast on
    # 10 MiB of empty lines, and as exact.
    body = b"\n" * 1_000_000 + b'--b\r\nCONTENT-DISPOSITION : form-data;\r\n\tname="_method"\r\n'
    with pytest.raises(ToolRequestError, match="form body has a '_method' field"):
        resolve("POST", "/orders/A-1", body, MP)


def test_a_rule_that_reads_the_body_already_refuses_a_path_name_it_does_not_name() -> None:
    # Every body field is an argument: a key no pointer covers is refused, a form too.
    with pytest.raises(ToolRequestError, match="'/order_id', which no argument"):
        resolve("POST", "/orders/A-1/refunds", {"amount": 5, "order_id": "A-2"})
    with pytest.raises(ToolRequestError, match="'/ORDER_ID', which no argument"):
        resolve("POST", "/orders/A-1/refunds", {"amount": 5, "ORDER_ID": "A-2"})
    with pytest.raises(ToolRequestError, match="send application/json"):
        resolve("POST", "/orders/A-1/refunds", b"amount=5&order_id=A-2", FORM)
    # One the rule names is an argument the policy sees beside the path's.
    both = RouteRule.compile(
        "POST",
        "/orders/{order_id}/refunds",
        "issue_refund",
        {"order_id": "{order_id}", "amount": "/amount", "body_order": "/order_id"},
    )
    got = both.build({"order_id": "A-1"}, b'{"amount": 5, "order_id": "A-2"}', JSON)
    assert got == {"order_id": "A-1", "amount": 5, "body_order": "A-2"}


# -- 3. rules that fit the same request ------------------------------------------------------


def test_the_most_specific_rule_wins_whatever_the_order() -> None:
    specs = [
        ("GET", "/orders/{order_id}/{part}"),
        ("GET", "/orders/{order_id}/items"),
        ("GET", "/orders/export/items"),
        ("GET", "/orders/export/{part}"),
    ]
    for ordered in (specs, specs[::-1]):
        table = routes(*ordered)
        tool = {p: f"tool_{i}" for i, (_, p) in enumerate(ordered)}

        def called(path: str, table: ToolRoutes = table) -> str:
            found = table.find("GET", path.strip("/").split("/"))
            assert found is not None
            return found[0].tool

        assert called("/orders/export/items") == tool["/orders/export/items"]
        assert called("/orders/export/lines") == tool["/orders/export/{part}"]
        assert called("/orders/A-1/items") == tool["/orders/{order_id}/items"]
        assert called("/orders/A-1/lines") == tool["/orders/{order_id}/{part}"]
    assert resolve("GET", "/orders/export") == ToolRequest("export_orders", {})
    assert resolve("GET", "/orders/A-1") == ToolRequest("get_order", {"id": "A-1"})


@pytest.mark.parametrize(
    ("one", "other", "message"),
    [
        (("GET", "/orders/{a}"), ("GET", "/orders/{b}"), "fit exactly the same paths"),
        (("GET", "/orders/x"), ("GET", "/orders/x"), "fit exactly the same paths"),
        # Go refuses these, Spring and Flask choose differently: Warden would guess.
        (("GET", "/a/{x}"), ("GET", "/{y}/b"), "both fit a path such as '/a/b'"),
        (("GET", "/orders/{id}"), ("HEAD", "/orders/{oid}"), "fit exactly the same paths"),
    ],
)
def test_rules_neither_more_specific_than_the_other_are_refused(
    one: tuple[str, str], other: tuple[str, str], message: str
) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        routes(one, other)
    assert f"routes.0 ({one[0]} {one[1]}, tool 'tool_0')" in str(caught.value)
    assert f"routes.1 ({other[0]} {other[1]}, tool 'tool_1')" in str(caught.value)


def test_an_overlap_is_fine_once_a_rule_fits_exactly_the_paths_both_fit() -> None:
    items, export = ("GET", "/orders/{order_id}/items"), ("GET", "/orders/export/{part}")
    with pytest.raises(ValueError, match="such as '/orders/export/items'"):
        routes(items, export)
    with pytest.raises(ValueError, match="such as '/orders/export/items'"):
        # A HEAD rule settles HEAD requests only: GET /orders/export/items stays a guess.
        routes(items, export, ("HEAD", "/orders/export/items"))
    table = routes(
        items, export, ("GET", "/orders/export/{name}/x"), ("GET", "/orders/export/items")
    )
    found = table.find("HEAD", ["orders", "export", "items"])
    assert found is not None
    assert found[0].tool == "tool_3"


def test_rules_that_never_fit_one_request_or_are_ordered_by_specificity_are_fine() -> None:
    check_specificity(
        routes(
            ("GET", "/orders/{id}"),
            ("POST", "/orders/{id}"),  # another method
            ("GET", "/orders/{id}/items/all"),  # another length
            ("GET", "/orders/export"),  # more specific
            ("GET", "/customers/{id}"),  # disjoint
            ("HEAD", "/orders/export/{x}"),
            ("GET", "/orders/{id}/{x}"),  # HEAD /orders/export/1: the HEAD rule's literal
        ).rules
    )


def test_the_config_refuses_to_start_naming_both_rules() -> None:
    route = {"method": "GET", "tool": "get_order", "arguments": {}}
    with pytest.raises(ConfigError, match=r"upstreams\.orders: .*routes\.0 \(GET /orders/\{a\}"):
        load_config(
            environ={},
            overrides={
                "upstreams": {
                    "orders": {
                        "protocol": "http",
                        "base_url": "http://127.0.0.1:1",
                        "routes": [
                            {**route, "path": "/orders/{a}"},
                            {**route, "path": "/orders/{b}", "tool": "other"},
                        ],
                    }
                }
            },
        )


# -- 4. HEAD and suffixed paths --------------------------------------------------------------


def test_head_fits_a_get_rule_and_is_decided_as_it() -> None:
    # Flask, Go, Spring and Rails run the GET handler for HEAD.
    assert resolve("HEAD", "/orders/A-1") == ToolRequest("get_order", {"id": "A-1"})
    assert resolve("HEAD", "/orders/export") == ToolRequest("export_orders", {})
    with pytest.raises(ToolRequestError, match="case-blind"):
        resolve("HEAD", "/orders/A-1/Items")
    # A HEAD rule of its own is more specific than the GET rule it shadows.
    table = routes(("GET", "/orders/{id}"), ("HEAD", "/orders/export"))
    found = table.find("HEAD", ["orders", "export"])
    assert found is not None
    assert found[0].tool == "tool_1"
    found = table.find("GET", ["orders", "export"])
    assert found is not None
    assert found[0].tool == "tool_0"
    assert resolve("GET", "/orders/A-1/refunds") is None  # not the other way round


@pytest.mark.parametrize(
    "last",
    ["refunds.", "refunds.tar.gz", "refunds.json", "Refunds.JSON", "refunds..", "refunds.x;y=1"],
)
def test_a_last_segment_read_as_its_stem_before_a_dot_is_refused(last: str) -> None:
    # Spring's suffix match runs /refunds.anything as /refunds, Rails /refunds.json.
    with pytest.raises(ToolRequestError, match="suffix after a dot"):
        resolve("POST", f"/orders/A-1/{last}", {"amount": 5})


@pytest.mark.parametrize("last", ["Export", "EXPORT", "export.json", "export.", "export;v=1"])
def test_a_path_that_fits_a_parameter_but_loosely_a_literal_is_refused(last: str) -> None:
    # GET /orders/{order_id} fits exactly; a service reading case-blind (ASP.NET Core,
    # Express) or dropping a format suffix (Rails) runs GET /orders/export instead.
    with pytest.raises(ToolRequestError, match="only when read case-blind"):
        resolve("GET", f"/orders/{last}")
    assert resolve("GET", "/orders/exports") == ToolRequest("get_order", {"id": "exports"})
    assert resolve("GET", "/orders/A-1.5") == ToolRequest("get_order", {"id": "A-1.5"})


def test_a_literal_with_a_dot_of_its_own_still_fits_exactly() -> None:
    table = ToolRoutes((RouteRule.compile("GET", "/v1.2/spec.json", "spec", {}),))
    assert table.resolve("GET", ["v1.2", "spec.json"], b"", "") == ToolRequest("spec", {})
    with pytest.raises(ToolRequestError, match="suffix after a dot"):
        table.resolve("GET", ["v1.2", "spec.json.gz"], b"", "")
    assert table.resolve("GET", ["v1.2", "spec.yaml"], b"", "") is None
    assert table.resolve("GET", ["v1", "spec.json"], b"", "") is None  # not the last


# -- 5. encoded bodies -----------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["gzip", "GZIP", "deflate", "br", "gzip, identity", "x-foo"])
def test_an_encoded_body_is_refused(encoding: str) -> None:
    for path in ("/orders/A-1/refunds", "/health"):
        with pytest.raises(ToolRequestError, match="body is encoded"):
            resolve("POST", path, {"amount": 5}, headers={"Content-Encoding": encoding})


def test_an_identity_content_encoding_is_not_an_encoding() -> None:
    got = resolve(
        "POST", "/orders/A-1/refunds", {"amount": 5}, headers={"content-encoding": "identity"}
    )
    assert got == ToolRequest("issue_refund", {"order_id": "A-1", "amount": 5})


# -- 6. what the body's bytes say ------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json; charset=utf-7",
        "application/json;charset=UNICODE_ESCAPE",
        'application/json; charset="latin-1"',
        "application/json; charset=utf-8; charset=utf-7",
        "application/json; charset=",
        'application/json; charset="utf-8\\""',
        # aiohttp reads its header with Python's email parser, which takes RFC 2231
        # names and comments: each of these is charset utf-7 to request.json().
        "application/json; charset*=''utf-7",
        "application/json; charset*=utf-8''utf-7",
        "application/json; CHARSET*=''UTF-7",
        "application/json; charset*0=utf-7",
        "application/json; charset*0=ut; charset*1=f-7",
        "application/json; charset(c)=utf-7",
        "application/json; charset (c) = utf-7",
        # Its quoted strings' ends found by counting quotes, after encoded words are
        # decoded: both are charset utf-7 to aiohttp, a quoted value to a plain reading.
        'application/json; x="\\\\"; y=";charset=utf-7;z="',
        'application/json; x="=?utf-8?q?a=5C?="; y="; charset=utf-7; z="',
    ],
)
def test_a_charset_other_than_utf8_is_refused(content_type: str) -> None:
    # aiohttp's request.json() decodes by the charset: under utf-7, +ACI- closes a string.
    body = b'{"amount":5,"note":"x+ACI-,+ACI-amount+ACI-:9000,+ACI-z+ACI-:+ACI-y"}'
    for path in ("/orders/A-1/refunds", "/health"):
        with pytest.raises(
            ToolRequestError, match="declared as charset|not plain name=value|escapes or encodes"
        ):
            resolve("POST", path, body, content_type)
    if any(c in content_type for c in "*(") or "y=" in content_type:
        # What an aiohttp service reads (its request.charset) for these spellings.
        assert parse_content_type(content_type)[1]["charset"].lower() == "utf-7"


@pytest.mark.parametrize(
    "content_type", ["application/json; charset=utf-8", 'application/json; Charset="UTF8"']
)
def test_a_utf8_charset_passes(content_type: str) -> None:
    got = resolve("POST", "/orders/A-1/refunds", {"amount": 5}, content_type)
    assert got == ToolRequest("issue_refund", {"order_id": "A-1", "amount": 5})


@pytest.mark.parametrize("escaped", [rb"\ud800", rb"\uDFFF", rb"x\ud83dy"])
def test_a_lone_surrogate_is_refused(escaped: bytes) -> None:
    # Valid JSON but no character: Go reads U+FFFD, and no record can hold it.
    for body in (b'{"amount":5,"note":"' + escaped + b'"}', b'{"' + escaped + b'":1,"amount":5}'):
        with pytest.raises(ToolRequestError, match="lone surrogate"):
            resolve("POST", "/orders/A-1/refunds", body)
    paired = resolve("POST", "/orders/A-1/refunds", rb'{"amount":"\ud83d\ude00"}')
    assert paired == ToolRequest("issue_refund", {"order_id": "A-1", "amount": "\U0001f600"})
