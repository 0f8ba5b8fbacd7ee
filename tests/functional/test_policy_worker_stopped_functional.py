"""A policy worker that is stopped (SIGSTOP, a frozen cgroup) is replaced, not waited on forever.

The evaluation budget is the worker's CPU time, so that a busy machine does
not turn into policy timeouts; a stopped process uses none. Before the stall
bound, the engine gave a stopped worker the rest of its budget again and
again: it held its input for as long as it stayed stopped, every request
after it was pushed back (503 ``overloaded``) and ``/readyz`` still counted
it alive. Now a worker holding an input for ten budgets of wall time (at
least five seconds) without spending its budget is killed and replaced; the
input it held is pushed back, not blamed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from pathlib import Path

import openai
import pytest

from tests.functional.conftest import audit_records, make_config
from tests.sdk_calls import function_calls
from warden.server import Warden
from warden.testing import Call, MockLLM, Reply

MESSAGES: list[openai.types.chat.ChatCompletionMessageParam] = [
    {"role": "user", "content": "Where is order A-1?"}
]
# Generous bounds for a shared machine: with a 100 ms budget the stall bound is 5 s.
REPLACED_WITHIN_S = 30.0


def _is_worker(pid: int) -> bool:
    try:
        return b"warden.policy.worker" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


async def _ask(client: openai.AsyncOpenAI) -> list[str]:
    done = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    return [c.function.name for c in function_calls(done.choices[0].message)]


async def test_a_stopped_worker_is_replaced_and_requests_are_answered_again(
    tmp_path: Path, llm: MockLLM, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="warden.policy")
    config = make_config(
        tmp_path,
        llm.url,
        # A queue bound past the stall bound: the held request's 503 can only come
        # from the stall (before the fix it came from the queue bound, 10 s in).
        # No cache: every request needs the worker.
        policy={"deadline_ms": 100, "queue_timeout_s": 10, "cache_size": 0},
    )
    llm.on_request(lambda _path, _body: Reply(tool_calls=[Call("get_order", {"order_id": "A-1"})]))
    stopped: int | None = None
    try:
        async with Warden(config) as warden:
            engine = warden._engine
            assert engine is not None
            client = openai.AsyncOpenAI(
                base_url=f"{warden.proxy_url}/openai/v1",
                api_key="sk-test",
                max_retries=0,  # each 503 must show here, not be retried away
            )
            async with client:
                assert await _ask(client) == ["get_order"]
                (stopped,) = engine.status()["worker_pids"]
                os.kill(stopped, signal.SIGSTOP)

                # The next request's input goes to the stopped worker: pushed back, not decided.
                with pytest.raises(openai.InternalServerError) as caught:
                    await asyncio.wait_for(_ask(client), REPLACED_WITHIN_S)
                assert caught.value.status_code == 503
                assert caught.value.code == "overloaded"
                status = engine.status()
                # Not counted alive once it is past the bound: it was killed.
                assert stopped not in status["worker_pids"]
                assert (status["worker_stalls"], status["worker_timeouts"]) == (1, 0)

                # A replacement takes over; the same input was not quarantined.
                loop = asyncio.get_running_loop()
                give_up = loop.time() + REPLACED_WITHIN_S
                while engine.status()["workers_alive"] < 1:
                    assert loop.time() < give_up, "no replacement worker started"
                    await asyncio.sleep(0.05)
                for _ in range(3):
                    assert await _ask(client) == ["get_order"]
                status = engine.status()
                assert len(status["worker_pids"]) == 1
                assert stopped not in status["worker_pids"]
                assert status["worker_restarts"] == 1
    finally:
        if stopped is not None and _is_worker(stopped):  # not reaped and reused meanwhile
            with contextlib.suppress(ProcessLookupError):
                os.kill(stopped, signal.SIGCONT)
                os.kill(stopped, signal.SIGKILL)

    warnings = [r.getMessage() for r in caplog.records if r.name == "warden.policy"]
    assert any(f"policy worker {stopped} held an evaluation for" in m for m in warnings), warnings
    decisions = [
        r["decision"] for r in audit_records(tmp_path / "audit") if r["kind"] == "decision"
    ]
    # Busy is never a decision: nothing fell back, nothing was blamed on the input.
    assert [d for d in decisions if d["guard"] == "fallback"] == []
    assert all(d["effect"] == "allow" for d in decisions), decisions
