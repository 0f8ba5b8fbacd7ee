"""Fake customer-support tool APIs for the demo and for tests.

:class:`MockTools` serves ``POST /tools/{name}``: the JSON body holds the tool's
arguments and the JSON response is its result. Errors are JSON too, shaped
``{"error": {"code": ..., "message": ...}}``: 404 for an unknown tool or record,
400 for bad arguments, 409/422 when the action is not possible.
``GET /tools`` lists the tools with their argument schemas.

The data is a small, fixed set of customers and orders (emails use
``example.com``). Actions change it (refunds, credits, closed accounts), per
instance, and ids of what they create count up (``rf_0001``, ``cr_0001``…), so a
run is reproducible. :data:`TOOLS` holds the same schemas, and
:func:`openai_tools`, :func:`responses_tools` and :func:`anthropic_tools` render
them as the ``tools`` parameter of each API.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import orjson
from aiohttp import web

from warden.testing._server import LoopbackServer

__all__ = [
    "CUSTOMERS",
    "KB_ARTICLES",
    "ORDERS",
    "TOOLS",
    "MockTools",
    "ToolInvocation",
    "ToolSpec",
    "anthropic_tools",
    "openai_tools",
    "responses_tools",
]


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """A tool's description and the JSON Schema of its arguments."""

    name: str
    description: str
    parameters: Mapping[str, Any]


def _schema(required: Iterable[str], **properties: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": dict(properties),
        "required": list(required),
        "additionalProperties": False,
    }


_STR: Final = {"type": "string"}
_MONEY: Final = {"type": "number", "description": "Amount in the order's currency (USD)."}

TOOLS: Final[Mapping[str, ToolSpec]] = {
    spec.name: spec
    for spec in (
        ToolSpec(
            "search_kb",
            "Search the help-centre knowledge base.",
            _schema(["query"], query=_STR),
        ),
        ToolSpec(
            "get_order",
            "Look up an order by id, e.g. A-1001.",
            _schema(["order_id"], order_id=_STR),
        ),
        ToolSpec(
            "get_customer",
            "Look up a customer by id, e.g. C-1001.",
            _schema(["customer_id"], customer_id=_STR),
        ),
        ToolSpec(
            "issue_refund",
            "Refund part or all of an order to the original payment method.",
            _schema(["order_id", "amount"], order_id=_STR, amount=_MONEY, reason=_STR),
        ),
        ToolSpec(
            "apply_credit",
            "Add store credit to a customer's account.",
            _schema(["customer_id", "amount"], customer_id=_STR, amount=_MONEY, reason=_STR),
        ),
        ToolSpec(
            "close_account",
            "Close a customer's account permanently.",
            _schema(["customer_id"], customer_id=_STR, reason=_STR),
        ),
        ToolSpec(
            "update_email",
            "Change the email address on a customer's account.",
            _schema(["customer_id", "email"], customer_id=_STR, email=_STR),
        ),
        ToolSpec(
            "draft_reply",
            "Draft (not send) an email reply to a customer for a human to review.",
            _schema(["customer_id", "body"], customer_id=_STR, subject=_STR, body=_STR),
        ),
    )
}


def openai_tools(names: Iterable[str] | None = None) -> list[Any]:
    """The tools (all, or ``names``) as Chat Completions ``tools``.

    Typed ``list[Any]`` so the result passes straight to the SDKs' typed ``tools``.
    """
    return [
        {
            "type": "function",
            "function": {
                "name": spec.name,
                "description": spec.description,
                "parameters": dict(spec.parameters),
            },
        }
        for spec in _select(names)
    ]


def responses_tools(names: Iterable[str] | None = None) -> list[Any]:
    """The tools (all, or ``names``) as Responses API ``tools``."""
    return [
        {
            "type": "function",
            "name": spec.name,
            "description": spec.description,
            "parameters": dict(spec.parameters),
            "strict": False,
        }
        for spec in _select(names)
    ]


def anthropic_tools(names: Iterable[str] | None = None) -> list[Any]:
    """The tools (all, or ``names``) as Anthropic Messages ``tools``."""
    return [
        {"name": spec.name, "description": spec.description, "input_schema": dict(spec.parameters)}
        for spec in _select(names)
    ]


def _select(names: Iterable[str] | None) -> list[ToolSpec]:
    if names is None:
        return list(TOOLS.values())
    return [TOOLS[name] for name in names]


CUSTOMERS: Final[Mapping[str, Mapping[str, Any]]] = {
    "C-1001": {
        "customer_id": "C-1001",
        "name": "Ada Lovelace",
        "email": "ada@example.com",
        "plan": "pro",
        "status": "active",
        "credit_balance": 0.0,
        "customer_since": "2021-03-14",
        "orders": ["A-1001", "A-1002"],
    },
    "C-1002": {
        "customer_id": "C-1002",
        "name": "Grace Hopper",
        "email": "grace@example.com",
        "plan": "business",
        "status": "active",
        "credit_balance": 25.0,
        "customer_since": "2019-12-09",
        "orders": ["A-1003"],
    },
    "C-1003": {
        "customer_id": "C-1003",
        "name": "Alan Turing",
        "email": "alan@example.com",
        "plan": "free",
        "status": "active",
        "credit_balance": 0.0,
        "customer_since": "2024-06-23",
        "orders": ["A-1004"],
    },
}
"""The customers every :class:`MockTools` starts with."""

ORDERS: Final[Mapping[str, Mapping[str, Any]]] = {
    "A-1001": {
        "order_id": "A-1001",
        "customer_id": "C-1001",
        "status": "delivered",
        "placed_at": "2026-10-02",
        "items": [
            {"sku": "KB-01", "name": "Mechanical keyboard", "quantity": 1, "unit_price": 89.0}
        ],
        "total": 89.0,
        "currency": "USD",
        "refunded": 0.0,
    },
    "A-1002": {
        "order_id": "A-1002",
        "customer_id": "C-1001",
        "status": "shipped",
        "placed_at": "2026-11-18",
        "items": [{"sku": "HUB-07", "name": "USB-C hub", "quantity": 2, "unit_price": 24.5}],
        "total": 49.0,
        "currency": "USD",
        "refunded": 0.0,
    },
    "A-1003": {
        "order_id": "A-1003",
        "customer_id": "C-1002",
        "status": "delivered",
        "placed_at": "2026-09-21",
        "items": [
            {"sku": "MON-4K", "name": "27-inch 4K monitor", "quantity": 1, "unit_price": 1299.0}
        ],
        "total": 1299.0,
        "currency": "USD",
        "refunded": 0.0,
    },
    "A-1004": {
        "order_id": "A-1004",
        "customer_id": "C-1003",
        "status": "processing",
        "placed_at": "2026-11-25",
        "items": [{"sku": "STD-02", "name": "Laptop stand", "quantity": 1, "unit_price": 39.99}],
        "total": 39.99,
        "currency": "USD",
        "refunded": 0.0,
    },
}
"""The orders every :class:`MockTools` starts with."""

KB_ARTICLES: Final[tuple[Mapping[str, str], ...]] = (
    {
        "id": "kb-101",
        "title": "Refund policy",
        "body": "Delivered orders can be refunded within 30 days. Refunds go back to the "
        "original payment method within 5 business days. Refunds over $500 need a manager.",
    },
    {
        "id": "kb-102",
        "title": "Shipping times",
        "body": "Orders ship within 2 business days. Standard delivery takes 3 to 5 days; "
        "tracking links are emailed when an order ships.",
    },
    {
        "id": "kb-103",
        "title": "Changing the email on an account",
        "body": "Support can update a customer's email after confirming their identity. "
        "A confirmation is sent to both the old and the new address.",
    },
    {
        "id": "kb-104",
        "title": "Closing an account",
        "body": "Closing an account is permanent and deletes saved payment methods. "
        "Open orders must be delivered or cancelled first.",
    },
    {
        "id": "kb-105",
        "title": "Store credit",
        "body": "Store credit can be given as goodwill for late deliveries, up to $50 "
        "per order. Credit never expires.",
    },
)
"""The knowledge-base articles ``search_kb`` searches."""

_EMAIL: Final = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_WORD: Final = re.compile(r"[a-z0-9]+")


@dataclass(frozen=True, slots=True)
class ToolInvocation:
    """One ``POST /tools/{name}`` as the mock saw and answered it."""

    name: str
    arguments: Any
    status: int
    result: Any
    headers: Mapping[str, str] = field(default_factory=dict)


class _ToolError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def _need_str(args: Mapping[str, Any], key: str) -> str:
    value = args.get(key)
    if not isinstance(value, str) or not value.strip():
        raise _ToolError(400, "invalid_arguments", f"'{key}' must be a non-empty string")
    return value.strip()


def _need_amount(args: Mapping[str, Any], key: str = "amount") -> float:
    value = args.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise _ToolError(400, "invalid_arguments", f"'{key}' must be a positive number")
    return round(float(value), 2)


class MockTools(LoopbackServer):
    """Customer-support tool APIs on a loopback port; see the module docs.

    Use it as an async context manager, or call :meth:`start` and :meth:`close`.
    :attr:`calls` records every invocation, answered or not.
    """

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[ToolInvocation] = []
        """Every tool invocation, oldest first."""
        self.customers: dict[str, dict[str, Any]] = {}
        """Current customer records, changed by the actions."""
        self.orders: dict[str, dict[str, Any]] = {}
        """Current order records, changed by refunds."""
        self._counters: dict[str, int] = {}
        self._handlers: dict[str, Callable[[Mapping[str, Any]], dict[str, Any]]] = {
            "search_kb": self._search_kb,
            "get_order": self._get_order,
            "get_customer": self._get_customer,
            "issue_refund": self._issue_refund,
            "apply_credit": self._apply_credit,
            "close_account": self._close_account,
            "update_email": self._update_email,
            "draft_reply": self._draft_reply,
        }
        self.reset()

    def reset(self) -> None:
        """Restore the starting data, id counters and an empty :attr:`calls`."""
        self.customers = {k: copy.deepcopy(dict(v)) for k, v in CUSTOMERS.items()}
        self.orders = {k: copy.deepcopy(dict(v)) for k, v in ORDERS.items()}
        self.calls.clear()
        self._counters = {}

    def call(self, name: str, arguments: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
        """Run a tool in-process, without HTTP: returns ``(status, result)``.

        Recorded in :attr:`calls` like an HTTP invocation.
        """
        return self._invoke(name, arguments, {})

    def _routes(self, app: web.Application) -> None:
        app.router.add_get("/tools", self._list)
        app.router.add_post("/tools/{name}", self._post)

    async def _list(self, request: web.Request) -> web.Response:
        tools = [
            {"name": s.name, "description": s.description, "parameters": s.parameters}
            for s in TOOLS.values()
        ]
        return web.Response(body=orjson.dumps({"tools": tools}), content_type="application/json")

    async def _post(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        raw = await request.read()
        arguments: Any
        try:
            arguments = orjson.loads(raw) if raw else {}
        except orjson.JSONDecodeError:
            arguments = None
        status, result = self._invoke(name, arguments, dict(request.headers))
        return web.Response(
            status=status, body=orjson.dumps(result), content_type="application/json"
        )

    def _invoke(
        self, name: str, arguments: Any, headers: Mapping[str, str]
    ) -> tuple[int, dict[str, Any]]:
        status, result = 200, {}
        try:
            handler = self._handlers.get(name)
            if handler is None:
                raise _ToolError(404, "unknown_tool", f"no tool named {name!r}")
            if not isinstance(arguments, dict):
                raise _ToolError(400, "invalid_arguments", "the body must be a JSON object")
            result = handler(arguments)
        except _ToolError as err:
            status, result = err.status, {"error": {"code": err.code, "message": err.message}}
        self.calls.append(ToolInvocation(name, arguments, status, result, headers))
        return status, result

    def _next_id(self, prefix: str) -> str:
        n = self._counters.get(prefix, 0) + 1
        self._counters[prefix] = n
        return f"{prefix}_{n:04d}"

    def _customer(self, args: Mapping[str, Any]) -> dict[str, Any]:
        customer_id = _need_str(args, "customer_id")
        customer = self.customers.get(customer_id)
        if customer is None:
            raise _ToolError(404, "customer_not_found", f"no customer {customer_id}")
        return customer

    def _order(self, args: Mapping[str, Any]) -> dict[str, Any]:
        order_id = _need_str(args, "order_id")
        order = self.orders.get(order_id)
        if order is None:
            raise _ToolError(404, "order_not_found", f"no order {order_id}")
        return order

    # -- tools ----------------------------------------------------------------------

    def _search_kb(self, args: Mapping[str, Any]) -> dict[str, Any]:
        terms = set(_WORD.findall(_need_str(args, "query").lower()))
        scored = []
        for article in KB_ARTICLES:
            words = set(_WORD.findall(f"{article['title']} {article['body']}".lower()))
            score = len(terms & words)
            if score:
                scored.append((-score, article["id"], article))
        scored.sort(key=lambda entry: (entry[0], entry[1]))
        results = [
            {"id": a["id"], "title": a["title"], "snippet": a["body"]} for _, _, a in scored[:3]
        ]
        return {"results": results}

    def _get_order(self, args: Mapping[str, Any]) -> dict[str, Any]:
        return copy.deepcopy(self._order(args))

    def _get_customer(self, args: Mapping[str, Any]) -> dict[str, Any]:
        return copy.deepcopy(self._customer(args))

    def _issue_refund(self, args: Mapping[str, Any]) -> dict[str, Any]:
        order = self._order(args)
        amount = _need_amount(args)
        refundable = round(order["total"] - order["refunded"], 2)
        if amount > refundable:
            raise _ToolError(
                422,
                "amount_exceeds_refundable",
                f"only {refundable:.2f} {order['currency']} left to refund on {order['order_id']}",
            )
        order["refunded"] = round(order["refunded"] + amount, 2)
        if order["refunded"] >= order["total"]:
            order["status"] = "refunded"
        return {
            "refund_id": self._next_id("rf"),
            "order_id": order["order_id"],
            "amount": amount,
            "currency": order["currency"],
            "reason": args.get("reason", ""),
            "status": "processed",
            "refundable_remaining": round(order["total"] - order["refunded"], 2),
        }

    def _apply_credit(self, args: Mapping[str, Any]) -> dict[str, Any]:
        customer = self._customer(args)
        amount = _need_amount(args)
        if customer["status"] != "active":
            raise _ToolError(409, "account_closed", f"{customer['customer_id']} is closed")
        customer["credit_balance"] = round(customer["credit_balance"] + amount, 2)
        return {
            "credit_id": self._next_id("cr"),
            "customer_id": customer["customer_id"],
            "amount": amount,
            "currency": "USD",
            "reason": args.get("reason", ""),
            "credit_balance": customer["credit_balance"],
        }

    def _close_account(self, args: Mapping[str, Any]) -> dict[str, Any]:
        customer = self._customer(args)
        if customer["status"] == "closed":
            raise _ToolError(409, "account_closed", f"{customer['customer_id']} is already closed")
        customer["status"] = "closed"
        return {
            "customer_id": customer["customer_id"],
            "status": "closed",
            "reason": args.get("reason", ""),
        }

    def _update_email(self, args: Mapping[str, Any]) -> dict[str, Any]:
        customer = self._customer(args)
        email = _need_str(args, "email")
        if not _EMAIL.match(email):
            raise _ToolError(400, "invalid_arguments", f"{email!r} is not an email address")
        previous, customer["email"] = customer["email"], email
        return {"customer_id": customer["customer_id"], "previous_email": previous, "email": email}

    def _draft_reply(self, args: Mapping[str, Any]) -> dict[str, Any]:
        customer = self._customer(args)
        body = _need_str(args, "body")
        subject = args.get("subject")
        return {
            "draft_id": self._next_id("dr"),
            "to": customer["email"],
            "subject": subject if isinstance(subject, str) and subject else "Re: your request",
            "body": body,
            "status": "draft",
        }
