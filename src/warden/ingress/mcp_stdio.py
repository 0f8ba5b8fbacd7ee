"""The MCP stdio door: Warden between an MCP client and a stdio server it launches.

``warden mcp wrap -- <command>`` puts this door where the client expected the
server: the client writes newline-delimited JSON-RPC to Warden's stdin, the
door runs ``command`` as a child and relays both ways. Every ``tools/call`` is
decided by the core before the child sees it; a denied or held one is answered
by Warden with an ``isError`` tool result, so the child never receives it. The
child's answer to an allowed call is recorded as its trusted outcome. A kill
switch thrown while a call runs answers it at once and tells the child to
cancel it (``notifications/cancelled``); the child's late answer is dropped.

Client messages are handled in order, one payload at a time, so the child sees
them in the order they were sent (a cancellation never overtakes its call).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from warden import tasks
from warden.errors import AuditError
from warden.killswitch import KillSwitch, KillSwitches
from warden.model import Action, Agent, Decision, Effect, Outcome
from warden.protocols import mcp
from warden.protocols._wire import loads

if TYPE_CHECKING:
    from warden.core import Governor

__all__ = ["StdioDoor"]

log = logging.getLogger("warden.mcp")

MAX_LINE = 64 * 1024 * 1024
"""The longest JSON-RPC line relayed (tool results can carry large documents)."""


@dataclass(slots=True)
class _Pending:
    """An allowed call on its way to the child: what its answer is recorded against."""

    action: Action
    decision: Decision
    started: float


@dataclass(slots=True)
class _Batch:
    """A client batch partly answered by Warden: merged into the child's batch answer."""

    ids: set[str | int]
    answers: list[dict[str, Any]] = field(default_factory=list)


class StdioDoor:
    """Relays one stdio MCP session between ``client`` streams and a child server."""

    name = "mcp-stdio"

    def __init__(
        self,
        command: Sequence[str],
        *,
        agent: Agent,
        upstream: str,
        client_in: asyncio.StreamReader,
        client_out: asyncio.WriteTransport | asyncio.StreamWriter,
        grace_s: float = 5.0,
        killswitches: Callable[[], KillSwitches | None] = lambda: None,
    ) -> None:
        """``killswitches``: where to find the switches in force once Warden runs."""
        self._command = tuple(command)
        self._agent = agent
        self._upstream = upstream
        self._in = client_in
        self._out = client_out
        self._grace_s = grace_s
        self._killswitches = killswitches
        self._killed: set[str | int] = set()
        self._core: Governor | None = None
        self._child: asyncio.subprocess.Process | None = None
        self._pending: dict[str | int, _Pending] = {}
        self._batches: list[_Batch] = []
        self._tasks: list[asyncio.Task[None]] = []
        self.done = asyncio.Event()
        """Set when the session is over: the client closed its end, or the child exited."""
        self.returncode: int | None = None

    async def start(self, core: Governor) -> None:
        """Launch the child and begin relaying."""
        self._core = core
        self._child = await asyncio.create_subprocess_exec(
            *self._command,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=MAX_LINE,
        )
        self._tasks = [
            tasks.spawn(self._from_client(), name="mcp-from-client"),
            tasks.spawn(self._from_child(), name="mcp-from-child"),
            tasks.spawn(self._watch_switches(), name="mcp-kill-switches"),
        ]

    async def stop(self) -> None:
        """Close the child's stdin, give it the grace period to exit, then kill it."""
        child = self._child
        if child is not None:
            if child.stdin is not None and not child.stdin.is_closing():
                child.stdin.close()
            try:
                await asyncio.wait_for(child.wait(), self._grace_s)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    child.kill()
                await child.wait()
            self.returncode = child.returncode
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.done.set()

    # -- client to child -------------------------------------------------------

    async def _from_client(self) -> None:
        try:
            while line := await self._in.readline():
                if line.strip():
                    await self._client_payload(line)
        except (ValueError, asyncio.LimitOverrunError):
            log.error("mcp client sent a line longer than %d bytes; closing", MAX_LINE)
        finally:
            # The client is gone: the child's stdin closes, and it exits in its own time.
            if self._child is not None and self._child.stdin is not None:
                self._child.stdin.close()

    async def _client_payload(self, line: bytes) -> None:
        payload = mcp.parse(line)
        forward: list[Any] = []
        answers: list[dict[str, Any]] = []
        for message in payload.messages:
            if message.error is not None:
                # JSON-RPC answers no error for an invalid notification, but one without
                # an id cannot be told from one; each invalid message gets its answer.
                answers.append(dict(message.error))
            elif message.call is not None:
                sent = await self._decide(message)
                (forward if "method" in sent else answers).append(sent)
            else:
                assert message.body is not None
                forward.append(message.body)
        if payload.batch:
            ids = {m["id"] for m in forward if "method" in m and "id" in m}
            if forward and ids and answers:
                self._batches.append(_Batch(ids, answers))
                answers = []
            if forward:
                await self._to_child(forward)
            if answers:
                self._to_client(answers)
            return
        for item in forward:
            await self._to_child(item)
        for answer in answers:
            self._to_client(answer)

    async def _decide(self, message: mcp.Message) -> dict[str, Any]:
        """The request to forward for an allowed call, or Warden's own answer."""
        assert message.call is not None
        assert self._core is not None
        id_ = message.id
        assert id_ is not None
        if id_ in self._pending or id_ in self._killed:
            # Its answer could not be told from the earlier call's: refused, undecided.
            return mcp.error_response(id_, mcp.INVALID_REQUEST, "Invalid Request: id in use")
        action = mcp.action(message.call, self._agent, self._upstream)
        try:
            decision = await self._core.decide(action)
        except AuditError:
            log.exception("could not record the decision for %s; not forwarded", action.tool)
            return mcp.error_response(id_, -32603, "Warden could not record this call")
        if decision.enforced is not Effect.ALLOW:
            return mcp.denied_result(message, decision)
        self._pending[id_] = _Pending(action, decision, time.perf_counter())
        return mcp.forward_call(message)

    async def _to_child(self, value: Any) -> None:
        child = self._child
        if child is None or child.stdin is None or child.stdin.is_closing():
            return
        child.stdin.write(mcp.encode(value))
        with contextlib.suppress(ConnectionError):
            await child.stdin.drain()

    # -- child to client -------------------------------------------------------

    async def _from_child(self) -> None:
        child = self._child
        assert child is not None
        assert child.stdout is not None
        try:
            while line := await child.stdout.readline():
                self._child_line(line)
        except (ValueError, asyncio.LimitOverrunError):
            log.error("mcp server sent a line longer than %d bytes; closing", MAX_LINE)
        finally:
            self.done.set()

    def _child_line(self, line: bytes) -> None:
        try:
            value = loads(line)
        except (ValueError, UnicodeDecodeError):
            # Not ours to judge: the client's SDK reports the server's bad output.
            self._write(line if line.endswith(b"\n") else line + b"\n")
            return
        if isinstance(value, list):
            kept = [v for v in value if not isinstance(v, dict) or self._answer(v)]
            if kept:
                self._to_client(self._merge(kept))
        elif not isinstance(value, dict) or self._answer(value):
            self._to_client(value)

    def _answer(self, item: dict[str, Any]) -> bool:
        return "method" in item or self._settle(item)

    def _settle(self, response: dict[str, Any]) -> bool:
        """Record the answer to an allowed call; False when it must not reach the client."""
        id_ = response.get("id")
        if not isinstance(id_, str | int) or isinstance(id_, bool):
            return True
        if id_ in self._killed:
            # The client already got Warden's answer when a kill switch stopped the call.
            self._killed.discard(id_)
            return False
        pending = self._pending.pop(id_, None)
        if pending is None or self._core is None:
            return True
        latency = (time.perf_counter() - pending.started) * 1000
        outcome = mcp.result_outcome(response, latency)
        self._core.outcome(pending.action, pending.decision, outcome, trusted=True)
        return True

    # -- kill switches ---------------------------------------------------------

    async def _watch_switches(self) -> None:
        switches = self._killswitches()
        if switches is None:
            return
        while True:
            await switches.wait_changed()
            for id_, pending in list(self._pending.items()):
                if (switch := switches.check(pending.action)) is not None:
                    await self._stop_call(id_, pending, switch)

    async def _stop_call(self, id_: str | int, pending: _Pending, switch: KillSwitch) -> None:
        del self._pending[id_]
        self._killed.add(id_)
        tool = pending.action.tool
        text = (
            f"[Warden] stopped the tool call `{tool}` while it ran; it may or may not have "
            f"completed. Reason: {switch.message}. (decision {pending.decision.decision_id})"
        )
        self._to_client(
            {
                "jsonrpc": "2.0",
                "id": id_,
                "result": {"content": [{"type": "text", "text": text}], "isError": True},
            }
        )
        await self._to_child(
            {
                "jsonrpc": "2.0",
                "method": "notifications/cancelled",
                "params": {"requestId": id_, "reason": switch.message},
            }
        )
        if self._core is not None:
            # Not trusted: whether the tool finished is unknown, so nothing is released.
            outcome = Outcome(error="killed", result=switch.message, is_error=True)
            self._core.outcome(pending.action, pending.decision, outcome)

    def _merge(self, answer: list[Any]) -> list[Any]:
        ids = {item.get("id") for item in answer if isinstance(item, dict)}
        for batch in self._batches:
            if batch.ids & ids:
                self._batches.remove(batch)
                return [*answer, *batch.answers]
        return answer

    def _to_client(self, value: Any) -> None:
        self._write(mcp.encode(value))

    def _write(self, data: bytes) -> None:
        if not self._out.is_closing():
            self._out.write(data)
