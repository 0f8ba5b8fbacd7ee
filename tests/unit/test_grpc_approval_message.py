"""The gRPC API shows an approval as the admin API does, answers included."""

from __future__ import annotations

import dataclasses

from google.protobuf import struct_pb2
from google.protobuf.json_format import MessageToDict

from tests.unit.test_console_approvals import held
from warden.ingress.grpc_messages import approval_message, from_struct


def test_an_mcp_retrys_answers_are_in_the_message_and_unset_otherwise() -> None:
    answers = {"amount": {"action": "accept", "content": {"amount": 900}}}
    message = approval_message(dataclasses.replace(held(), answers=answers))
    assert message.HasField("answers")
    assert MessageToDict(message)["answers"] == answers
    assert MessageToDict(message)["arguments"] == {"order_id": "A-1001"}
    assert not approval_message(held()).HasField("answers")


def test_only_whole_numbers_a_double_holds_exactly_become_integers() -> None:
    # 2**53 + 1 arrives as the double 2**53: as the integer 2**53 it claimed an exactness
    # it does not have (and RFC 8785 refuses it, so an approval could not bind to it).
    struct = struct_pb2.Struct()
    struct.update({"small": 2**53 - 1, "edge": 2**53 + 1, "neg": -(2**53), "frac": 1.5})
    plain = from_struct(struct)
    assert plain["small"] == 2**53 - 1
    assert isinstance(plain["small"], int)
    assert plain["edge"] == float(2**53)
    assert isinstance(plain["edge"], float)
    assert isinstance(plain["neg"], float)
    assert plain["frac"] == 1.5
