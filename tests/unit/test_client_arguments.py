"""What ``govern`` sends as a tool's arguments: the values the tool acts on, or nothing."""

from __future__ import annotations

import dataclasses
import datetime
import enum
from decimal import Decimal
from typing import Any

import pytest
from pydantic import BaseModel

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
