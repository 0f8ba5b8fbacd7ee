"""What ``govern`` sends as a tool's arguments: the values the tool acts on, or nothing."""

from __future__ import annotations

import dataclasses
import datetime
import enum
from decimal import Decimal
from pathlib import PurePosixPath
from typing import Any, NamedTuple

import pytest
from pydantic import BaseModel, ConfigDict, Field, field_serializer

from warden.client import _struct


class Transfer(BaseModel):
    to: str
    amount: float


class Tier(enum.Enum):
    GOLD = "gold"


class Rank(enum.IntEnum):
    FIRST = 1


class CustomerId(str):
    pass


class Masked(str):
    def __str__(self) -> str:
        return "***"


class Account(BaseModel):
    model_config = ConfigDict(extra="allow")
    iban: str
    override: bool = Field(default=False, exclude=True)

    @field_serializer("iban")
    def _mask(self, iban: str) -> str:
        return "****" + iban[-4:]


class Point(NamedTuple):
    order_id: str
    amount: int


@dataclasses.dataclass
class Window:
    start: datetime.date
    days: int


def sent(arguments: dict[str, Any]) -> Any:
    struct = _struct(arguments)
    assert struct is not None
    return {k: v for k, v in struct.items()}


def test_models_dataclasses_enums_and_decimals_go_as_the_values_they_hold() -> None:
    # A pydantic model went as its str() ("to='X' amount=5000.0"): a rule on its amount
    # never matched, and the transfer ran unheld.
    got = sent(
        {
            "req": Transfer(to="X", amount=5000),
            "tier": Tier.GOLD,
            "rank": Rank.FIRST,
            "customer": CustomerId("C-1"),
            "window": Window(datetime.date(2026, 12, 1), 7),
            "fee": Decimal("19.99"),
            "total": Decimal("20"),
        }
    )
    assert got["req"]["amount"] == 5000
    assert got["req"]["to"] == "X"
    assert (got["tier"], got["rank"], got["customer"]) == ("gold", 1, "C-1")
    assert got["window"]["start"] == "2026-12-01"
    assert (got["fee"], got["total"]) == (19.99, 20)


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (float("nan"), ValueError),
        (float("-inf"), ValueError),
        (Transfer.model_construct(to="X", amount=float("inf")), ValueError),
        (2**53, ValueError),  # a double would round 2**53 + 1 to it
        (-(2**60), ValueError),
        (Decimal("0.1000000000000000055511151231257827"), ValueError),
        ({1, 2}, TypeError),
        (b"raw", TypeError),
        (object(), TypeError),
        ({(1, 2): "a tuple key"}, TypeError),
    ],
)
def test_a_value_the_policy_would_read_otherwise_is_refused(value: Any, error: type) -> None:
    with pytest.raises(error):
        _struct({"amount": value})


def test_nesting_past_what_protobuf_parses_is_refused() -> None:
    deep: Any = 1
    for _ in range(40):
        deep = [deep]
    with pytest.raises(ValueError, match="nested deeper"):
        _struct({"a": deep})
    assert sent({"a": [[[1]]]}) == {"a": [[[1]]]}


def test_what_the_tool_reads_is_sent_not_what_a_class_prints_or_serializes() -> None:
    # A model's serializer masked the account and its excluded field went unseen; a
    # str subclass sent its own __str__ ("***" for /etc/shadow); a named tuple went as
    # a list no rule could name the fields of.
    got = sent(
        {
            "account": Account(iban="DE89370400440532013000", override=True, note="x"),
            "path": Masked("/etc/shadow"),
            "point": Point("A-1", 900),
            "where": PurePosixPath("/srv/exports"),
        }
    )
    assert got["account"]["iban"] == "DE89370400440532013000"
    assert got["account"]["override"] is True
    assert got["account"]["note"] == "x"
    assert got["path"] == "/etc/shadow"
    assert (got["point"]["order_id"], got["point"]["amount"]) == ("A-1", 900)
    assert got["where"] == "/srv/exports"
    with pytest.raises(ValueError, match="read as one"):
        _struct({"a": {1: "one", "1": "uno"}})
