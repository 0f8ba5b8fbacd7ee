"""A policy failing on one call is logged with the id of the decision it made (the fallback's
record), so an author follows the log line to that record: through the real proxy, driven by
the official openai SDK."""

from __future__ import annotations

import logging
from pathlib import Path

import openai

from tests.functional.conftest import audit_records, make_config
from warden.ops import tracing
from warden.server import Warden
from warden.testing import Call, MockLLM, Reply

# A held refund naming its approvers as a string, not a list: a result the proxy refuses.
POLICY = """package warden
import rego.v1
default decision := {"effect": "allow", "reason": "ok"}
decision := {"effect": "require_approval", "reason": "big", "approvers": "leads"} if {
    input.action.tool == "issue_refund"
}
"""


class _Ids(logging.Handler):
    """The decision id each policy warning carries (as the JSON log line's field)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.named: list[str | None] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "policy evaluation failed" in record.getMessage():
            self.named.append(tracing.log_fields().get("decision_id"))


async def test_a_failing_policy_is_logged_with_its_own_decisions_id(
    tmp_path: Path, llm: MockLLM
) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / ".manifest").write_text('{"revision": "r1", "roots": ["warden"]}')
    (bundle / "policy.rego").write_text(POLICY)
    config = make_config(tmp_path, llm.url, policy={"bundles": [str(bundle)]})
    ids = _Ids()
    logging.getLogger("warden.policy").addHandler(ids)
    try:
        async with Warden(config) as warden:
            llm.script(Reply(tool_calls=[Call("issue_refund", {"order_id": "A-1", "amount": 5})]))
            client = openai.AsyncOpenAI(
                base_url=f"{warden.proxy_url}/openai/v1", api_key="sk-test", max_retries=0
            )
            async with client:
                await client.chat.completions.create(
                    model="gpt-4.1", messages=[{"role": "user", "content": "refund A-1"}]
                )
    finally:
        logging.getLogger("warden.policy").removeHandler(ids)
    decisions = {
        r["decision"]["id"]: r for r in audit_records(tmp_path / "audit") if r["kind"] == "decision"
    }
    (failed,) = [i for i, r in decisions.items() if r["decision"].get("error")]
    assert decisions[failed]["action"]["tool"] == "issue_refund"
    # Before: the request's model call decision (allowed), and no line named the failure.
    assert ids.named == [failed]
