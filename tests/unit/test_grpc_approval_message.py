"""The gRPC API shows an approval as the admin API does, answers included."""

from __future__ import annotations

import dataclasses

from google.protobuf.json_format import MessageToDict

from tests.unit.test_console_approvals import held
from warden.ingress.grpc_messages import approval_message


def test_an_mcp_retrys_answers_are_in_the_message_and_unset_otherwise() -> None:
    answers = {"amount": {"action": "accept", "content": {"amount": 900}}}
    message = approval_message(dataclasses.replace(held(), answers=answers))
    assert message.HasField("answers")
    assert MessageToDict(message)["answers"] == answers
    assert MessageToDict(message)["arguments"] == {"order_id": "A-1001"}
    assert not approval_message(held()).HasField("answers")
