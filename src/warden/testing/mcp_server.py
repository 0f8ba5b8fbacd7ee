"""A real MCP server for tests and the demo, built with the official SDK.

It serves the customer-support tools of :mod:`warden.testing.mock_tools`
(search_kb, get_order, get_customer, issue_refund, close_account) with the
same data and semantics, through the SDK's ``MCPServer`` (FastMCP before mcp 2), and
``confirm_with_user``, which asks the client (an elicitation: a request from
server to client) before it answers, ``close_account_confirmed``, whose
resolver asks the same way (on 2026-07-28, an ``InputRequiredResult``),
``refund_asking_amount``, whose refund's amount is the user's answer, and
``triage_with_model``, which asks the client's model (sampling, with tools)
and runs the tool calls it answers with.
It also serves resources (``kb://articles/{slug}``, and a customer's profile at
``customers://{customer_id}/profile``), a prompt (``draft_reply``), argument
completion and an extension's own method (``support/escalate``, which MCP does
not define), each logged like a call. Run it over stdio with::

    python -m warden.testing.mcp_server --call-log calls.jsonl

or over streamable HTTP (it prints its endpoint URL on one line, then serves)::

    python -m warden.testing.mcp_server --transport streamable-http --port 0

In a test, :class:`StreamableHttpServer` runs it in-process on ``127.0.0.1:0``.

Every call that reaches a tool is appended to the call log as one JSON line,
before the tool runs, so a test can prove a denied call never arrived (a
resource read, prompt, completion or escalation is logged under its method's name).
Needs the ``testing`` extra (``pip install agent-warden[testing]``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
import warnings
from collections.abc import Callable, Generator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Annotated, Any, Self

import orjson
import uvicorn
from mcp import types
from mcp.server.extension import Extension, MethodBinding
from mcp.server.mcpserver import AcceptedElicitation, Context, Elicit, MCPServer, Resolve
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import BaseModel, Field

from warden import tasks
from warden.testing.mock_tools import TOOLS, MockTools

__all__ = ["StreamableHttpServer", "build_server", "main", "read_call_log"]


class Confirmation(BaseModel):
    """What ``confirm_with_user`` asks the client for."""

    confirm: bool


def ask_to_close(customer_id: str) -> Elicit[Confirmation]:
    """The resolver of ``close_account_confirmed``: ask the user first."""
    return Elicit(f"Close the account of {customer_id}?", Confirmation)


class RefundAmount(BaseModel):
    """What ``refund_asking_amount`` asks the user for."""

    amount: float


def ask_amount(order_id: str) -> Elicit[RefundAmount]:
    """The resolver of ``refund_asking_amount``: the amount comes from the user's answer."""
    return Elicit(f"How much should be refunded for {order_id}?", RefundAmount)


ESCALATE = "support/escalate"
"""The method of the test server's extension: MCP does not define it (SEP-2133 extensions)."""


class EscalateParams(types.RequestParams):
    """The params of ``support/escalate``."""

    ticket_id: str
    priority: str = "normal"


class _Escalation(Extension):
    """An extension method that acts (hands a ticket to a person), as servers' own do."""

    identifier = "com.example.support/escalation"

    def __init__(self, logged: Callable[[Mapping[str, Any]], None]) -> None:
        self._logged = logged

    def methods(self) -> Sequence[MethodBinding]:
        async def escalate(_ctx: Any, params: EscalateParams) -> dict[str, Any]:
            self._logged({"ticket_id": params.ticket_id, "priority": params.priority})
            return {"escalated": params.ticket_id, "queue": "tier-2"}

        return [MethodBinding(ESCALATE, EscalateParams, escalate)]


_SAMPLING_TOOLS: dict[str, dict[str, Any]] = {
    "issue_refund": {
        "type": "object",
        "properties": {"order_id": {"type": "string"}, "amount": {"type": "number"}},
    },
}


def build_server(call_log: Path | None = None, delay_s: float = 0.0) -> MCPServer[Any]:
    """An MCP server with the support tools; calls are appended to ``call_log``.

    ``delay_s``: each call waits this long after it is logged, before the tool
    runs (a call in flight, for kill-switch tests).
    """
    tools = MockTools()
    server: MCPServer[Any] = MCPServer(
        "warden-support-tools", extensions=[_Escalation(lambda a: logged(ESCALATE, a))]
    )

    def logged(name: str, arguments: Mapping[str, Any]) -> None:
        if call_log is not None:
            line = orjson.dumps({"tool": name, "arguments": dict(arguments)}) + b"\n"
            with call_log.open("ab") as log:
                log.write(line)

    async def run(name: str, arguments: Mapping[str, Any]) -> dict[str, Any]:
        logged(name, arguments)
        if delay_s:
            await asyncio.sleep(delay_s)
        status, body = tools.call(name, arguments)
        if status >= 400:
            raise ToolError(str(body.get("error", {}).get("message", body)))
        return body

    @server.tool(description=TOOLS["search_kb"].description)
    async def search_kb(query: str) -> dict[str, Any]:
        return await run("search_kb", {"query": query})

    @server.tool(description=TOOLS["get_order"].description)
    async def get_order(order_id: str) -> dict[str, Any]:
        return await run("get_order", {"order_id": order_id})

    @server.tool(description=TOOLS["get_customer"].description)
    async def get_customer(
        # Mirrored in an Mcp-Param-Customer header by 2026-07-28 clients (SEP-2243).
        customer_id: Annotated[str, Field(json_schema_extra={"x-mcp-header": "Customer"})],
    ) -> dict[str, Any]:
        return await run("get_customer", {"customer_id": customer_id})

    @server.tool(description=TOOLS["issue_refund"].description)
    async def issue_refund(order_id: str, amount: float, reason: str = "") -> dict[str, Any]:
        return await run("issue_refund", {"order_id": order_id, "amount": amount, "reason": reason})

    @server.tool(description=TOOLS["close_account"].description)
    async def close_account(customer_id: str, reason: str = "") -> dict[str, Any]:
        return await run("close_account", {"customer_id": customer_id, "reason": reason})

    @server.tool(description="Ask the user to confirm an action before going on (elicitation).")
    async def confirm_with_user(action: str, ctx: Context) -> dict[str, Any]:
        if call_log is not None:
            line = orjson.dumps({"tool": "confirm_with_user", "arguments": {"action": action}})
            with call_log.open("ab") as log:
                log.write(line + b"\n")
        answer = await ctx.elicit(f"Go ahead with: {action}?", Confirmation)
        confirmed = isinstance(answer, AcceptedElicitation) and answer.data.confirm
        return {"action": action, "answer": answer.action, "confirmed": confirmed}

    @server.tool(description="Close an account once the user confirms (a resolver elicits).")
    async def close_account_confirmed(
        customer_id: str, confirmation: Annotated[Confirmation, Resolve(ask_to_close)]
    ) -> dict[str, Any]:
        # On 2026-07-28 the question travels as an InputRequiredResult, and the
        # client's answer comes back in the retry's inputResponses.
        return await run(
            "close_account", {"customer_id": customer_id, "confirmed": confirmation.confirm}
        )

    @server.tool(description="Refund an order, asking the user how much (a resolver elicits).")
    async def refund_asking_amount(
        order_id: str, answer: Annotated[RefundAmount, Resolve(ask_amount)]
    ) -> dict[str, Any]:
        # The amount is in no argument: only the retry's inputResponses carry it.
        return await run(
            "issue_refund", {"order_id": order_id, "amount": answer.amount, "reason": ""}
        )

    @server.tool(description="Let the client's model pick a support tool, and run it (sampling).")
    async def triage_with_model(request: str, ctx: Context) -> dict[str, Any]:
        offered = [
            types.Tool(name=name, description=TOOLS[name].description, input_schema=schema)
            for name, schema in _SAMPLING_TOOLS.items()
        ]
        message = types.SamplingMessage(role="user", content=types.TextContent(text=request))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # sampling is deprecated (MCP 2026-07-28)
            answer = await ctx.session.create_message([message], max_tokens=200, tools=offered)
        content = answer.content if isinstance(answer.content, list) else [answer.content]
        ran = []
        for block in content:
            if isinstance(block, types.ToolUseContent):  # the model's choice, run here
                ran.append(await run(block.name, block.input))
        return {"ran": ran}

    @server.resource("kb://articles/{slug}", description="A knowledge-base article.")
    async def article(slug: str) -> str:
        logged("resources/read", {"uri": f"kb://articles/{slug}"})
        return f"Article {slug}: refunds are issued to the original payment method."

    @server.resource("customers://{customer_id}/profile", description="A customer's profile.")
    async def profile(customer_id: str) -> str:
        logged("resources/read", {"uri": f"customers://{customer_id}/profile"})
        return orjson.dumps({"customer_id": customer_id, "email": "ada@example.com"}).decode()

    @server.prompt(description="Draft a reply to a customer in the given tone.")
    async def draft_reply(tone: str) -> str:
        logged("prompts/get", {"name": "draft_reply", "arguments": {"tone": tone}})
        return f"Write a {tone} reply to the customer's last message."

    @server.completion()  # type: ignore[no-untyped-call, untyped-decorator]  # untyped in the SDK
    async def complete(
        ref: types.PromptReference | types.ResourceTemplateReference,
        argument: types.CompletionArgument,
        context: types.CompletionContext | None,
    ) -> types.Completion:
        logged("completion/complete", {"argument": argument.name, "value": argument.value})
        tones = [t for t in ("friendly", "formal", "firm") if t.startswith(argument.value)]
        return types.Completion(values=tones)

    return server


class _QuietServer(uvicorn.Server):
    """Leaves signal handling to its host: it is stopped by ``StreamableHttpServer.close``."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None]:
        yield


class StreamableHttpServer:
    """The test server over MCP streamable HTTP, in this process, on ``127.0.0.1:0``.

    ::

        async with StreamableHttpServer(call_log=tmp_path / "calls.jsonl") as server:
            server.url   # http://127.0.0.1:<port>/mcp
    """

    def __init__(
        self,
        call_log: Path | None = None,
        delay_s: float = 0.0,
        *,
        json_response: bool = False,
        stateless: bool = False,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        """``json_response``: answer requests with one JSON body instead of an SSE stream.
        ``stateless``: keep no session (no ``Mcp-Session-Id``; every request stands alone)."""
        inner = build_server(call_log, delay_s).streamable_http_app(
            json_response=json_response, stateless_http=stateless, host=host
        )
        self.request_headers: list[dict[str, str]] = []
        """The headers of every HTTP request it received, names in lower case, in order."""

        async def app(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "http":
                raw = scope["headers"]
                self.request_headers.append(
                    {k.decode("latin-1"): v.decode("latin-1") for k, v in raw}
                )
            await inner(scope, receive, send)

        self._app = app
        self._host = host
        self._port = port
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._socket: socket.socket | None = None
        self.url = ""

    async def start(self) -> None:
        """Bind (port 0 picks a free port), then serve until :meth:`close`."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # inherited by connections
        sock.bind((self._host, self._port))
        self._socket = sock
        config = uvicorn.Config(
            self._app, log_level="warning", lifespan="on", timeout_graceful_shutdown=1
        )
        self._server = server = _QuietServer(config)
        self._task = tasks.spawn(server.serve(sockets=[sock]), name="mcp-test-server")
        while not server.started:
            if self._task.done():
                await self._task  # raises what made it fail
                raise RuntimeError("the MCP test server stopped while starting")
            await asyncio.sleep(0.01)
        port = sock.getsockname()[1]
        self.url = f"http://{self._host}:{port}/mcp"

    async def close(self) -> None:
        """Stop serving (open streams are cut after a second). Idempotent."""
        server, task = self._server, self._task
        self._server = self._task = None
        if server is not None and task is not None:
            server.should_exit = True
            await task
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


def read_call_log(path: Path) -> list[dict[str, Any]]:
    """The calls a server run with ``--call-log path`` received, oldest first."""
    if not path.exists():
        return []
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def main(argv: Sequence[str] | None = None) -> None:
    """Serve the support tools over stdio or streamable HTTP."""
    parser = argparse.ArgumentParser(prog="python -m warden.testing.mcp_server")
    parser.add_argument("--call-log", type=Path, help="append each tool call here (JSON lines)")
    parser.add_argument("--delay-s", type=float, default=0.0, help="wait before each tool runs")
    parser.add_argument(
        "--transport", choices=["stdio", "streamable-http"], default="stdio", help="how to serve"
    )
    parser.add_argument("--host", default="127.0.0.1", help="streamable-http: address to bind")
    parser.add_argument("--port", type=int, default=0, help="streamable-http: 0 picks a free one")
    parser.add_argument(
        "--json-response", action="store_true", help="streamable-http: JSON answers, not SSE"
    )
    args = parser.parse_args(argv)
    if args.transport == "stdio":
        build_server(args.call_log, args.delay_s).run("stdio")
        return
    server = StreamableHttpServer(
        args.call_log,
        args.delay_s,
        json_response=args.json_response,
        host=args.host,
        port=args.port,
    )
    asyncio.run(_serve_http(server))


async def _serve_http(server: StreamableHttpServer) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        print(server.url, flush=True)
        await stop.wait()


if __name__ == "__main__":
    main()
