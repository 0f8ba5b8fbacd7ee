"""The governed core: the one object every front door calls.

A front door (the base-URL proxy, later gRPC, MCP and mitmproxy) only
converts: it turns wire traffic into :class:`~warden.model.Action` and
:class:`~warden.model.ToolCall` values, asks the :class:`Governor`, and
renders the :class:`~warden.model.Decision` back in its protocol's shape.
The Governor runs the rest, the same way for every door:

* :meth:`Governor.decide` puts one action through the guards, then the
  approval gate; the decision is durable in the audit log when it returns;
* :meth:`Governor.decide_calls` does so for all the tool calls of one model
  response, and links each allowed call to its decision by call id
  (:mod:`warden.state.links`), so the result the agent sends back later,
  even to a restarted Warden, is recorded as that decision's outcome;
* :meth:`Governor.record_results` and :meth:`Governor.outcome` record what
  happened, in the background: the agent's response never waits on them;
* it owns those background tasks (:meth:`Governor.close` drains them) and the
  decision, token and call-id metrics.

The API is protocol-neutral: nothing here knows HTTP, SSE or JSON shapes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from warden.model import (
    Action,
    ActionKind,
    Agent,
    Conversation,
    Decision,
    Effect,
    Outcome,
    RequestMeta,
    Stage,
    ToolCall,
    ToolResult,
    Usage,
    new_id,
)
from warden.ops import metrics, tracing
from warden.pipeline import Pipeline
from warden.protocols.base import Adapter
from warden.sessions import owed_outputs
from warden.state.links import CallLinks, Link
from warden.tasks import Tasks

__all__ = ["RESERVED_CALL_IDS", "Chains", "Gate", "Governor", "Turn"]

log = logging.getLogger("warden.core")

MAX_RESULTS_PER_REQUEST = 1000
"""Tool results of one request recorded as outcomes: the newest (the conversation's end)."""
RESERVED_CALL_IDS = ("grpc-decision:",)
"""Prefixes of link ids Warden makes itself (a gRPC ``Check``'s decision, awaiting
``ReportOutcome``): never an agent's tool result."""
_LIST_CONCURRENCY = 8
"""Tools of one listing asked about at once: a long listing must not fill the policy queue."""


class Gate(Protocol):
    """Settles ``require_approval`` decisions (:class:`warden.approvals.gate.ApprovalGate`)."""

    async def settle(
        self,
        action: Action,
        decision: Decision,
        *,
        connected: Callable[[], bool] | None = None,
    ) -> Decision:
        """The final decision for ``action``: approved, refused, held or deferred."""
        ...


class Chains(Protocol):
    """Keeps conversations: Responses API chains and what became of held calls
    (:class:`warden.sessions.SessionGuard`)."""

    async def record_response(
        self, conversation: Conversation, response_id: str, agent_id: str
    ) -> None:
        """Link a relayed answer to the request and calls behind it, and to the agent it
        was made for."""
        ...

    def settled(self, action: Action, decision: Decision) -> None:
        """The final decision on a held call (approved, refused or deferred), as the agent
        gets it: an approved call let through counts as a call, once."""
        ...

    def answer_started(self, response_id: str, agent_id: str) -> None:
        """A streamed answer named its id: it is ``agent_id``'s before its link is kept."""
        ...

    def proposed(self, actions: Sequence[Action]) -> None:
        """Calls of one answer, before any is decided (calls the provider ran taint them)."""
        ...


class ArgumentNames(Protocol):
    """Argument names a request declares per tool (:mod:`warden.protocols.declared_arguments`)."""

    def misspelled(self, tool: str, arguments: Mapping[str, Any]) -> str | None:
        """An argument key that folds to a name ``tool`` declares but is spelled otherwise."""
        ...


@dataclass(frozen=True, slots=True)
class Turn:
    """One agent request and the response to it: what all its actions share.

    Create one per response. ``seen`` collects the call ids of that response
    so far (one seen twice is linked to no decision); only the core touches it.
    """

    agent: Agent
    request: RequestMeta
    context: Mapping[str, Any] = field(default_factory=dict)
    model: str | None = None
    seen: set[str] = field(default_factory=set)
    declared: ArgumentNames | None = None
    """The argument names the request declares per tool, if it declares any."""

    def action(self, call: ToolCall, protocol: str) -> Action:
        """The action for a tool call the model proposed in this turn's response.

        Arguments spelled otherwise than the request declares them (``Amount``
        for ``amount``) count as malformed, like a key given twice: the
        validation guard denies the call.
        """
        arguments = call.arguments
        if (
            arguments is not None
            and self.declared is not None
            and self.declared.misspelled(call.name, arguments) is not None
        ):
            arguments = None
        return Action(
            action_id=new_id("act"),
            agent=self.agent,
            kind=call.kind,
            wire_type=call.wire_type or None,
            protocol=protocol,
            stage=Stage.PROPOSED,
            request=self.request,
            tool=call.name,
            arguments=arguments,
            raw_arguments=call.raw_arguments,
            call_id=call.call_id,
            model=self.model,
            context=self.context,
        )


class Governor:
    """Decides actions and records what happened; one per Warden process."""

    def __init__(
        self,
        pipeline: Pipeline,
        *,
        gate: Gate | None = None,
        links: CallLinks | None = None,
        chains: Chains | None = None,
    ) -> None:
        self._pipeline = pipeline
        self._chains = chains
        self._gate = gate
        self.links = links if links is not None else CallLinks(None)
        self.background = Tasks("core")
        """Outcome records still being written."""
        self._closed = False
        # Spans per decision when OTEL_* turned tracing on; otherwise nothing is wrapped.
        tracing.instrument(self)

    async def start(self) -> None:
        """Start writing call links in the background."""
        self.links.start()

    async def close(self) -> None:
        """Wait for outcome records still being written, then flush the call links."""
        if self._closed:
            return
        self._closed = True
        await self.background.drain()
        await self.links.close()

    # -- decisions -------------------------------------------------------------

    async def decide(
        self,
        action: Action,
        *,
        hold: str | None = None,
        connected: Callable[[], bool] | None = None,
    ) -> Decision:
        """Guards, then the approval gate; durable in the audit log on return.

        ``hold``: how the caller can wait for approval (``hold`` or ``defer``),
        overriding the policy's and the config's choice; the gRPC API's
        ``wait`` flag is the client saying so. ``connected``: whether the caller
        is still there; a hold whose caller left becomes a deferral at once
        (its retry then waits on the same approval, never a second one).

        Raises :class:`warden.errors.AuditError` when the decision cannot be
        recorded: the door must then not let the action through.
        """
        tracing.DECISION_ID.set(None)  # no line of this decision names the one before
        decision = await self._pipeline.decide(action)
        _count(action, decision)
        gate = self._gate if decision.enforced is Effect.REQUIRE_APPROVAL else None
        if gate is not None:
            if hold is not None and decision.obligations.hold != hold:
                decision = dataclasses.replace(
                    decision, obligations=dataclasses.replace(decision.obligations, hold=hold)
                )
            settled = await gate.settle(action, decision, connected=connected)
            if settled is not decision:
                # Approved after a policy reload: the policy now in force may deny it.
                settled = await self._pipeline.reconsider(action, decision, settled)
                if settled.decision_id != decision.decision_id:
                    _count(action, settled)  # a deferral is the held decision, counted once
            decision = settled
        # The last word once recorded (or approved): nothing is awaited after it, so
        # the door acts on a decision no switch thrown meanwhile contradicts.
        decision = await self._rechecked(action, decision)
        if gate is not None and self._chains is not None:
            # What became of the held call, as the agent gets it: only an approved call
            # it got verifies, counts as a call and no longer as held (a switch thrown
            # since the approval stopped it).
            self._chains.settled(action, decision)
        tracing.DECISION_ID.set(decision.decision_id)  # log lines after this carry it
        return decision

    async def _rechecked(self, action: Action, decision: Decision) -> Decision:
        """``decision``, or the kill switch's denial when one was thrown since."""
        rechecked = await self._pipeline.recheck(action, decision)
        if rechecked is not decision:
            _count(action, rechecked)
        return rechecked

    async def decide_calls(
        self,
        turn: Turn,
        calls: Sequence[ToolCall],
        protocol: str,
        *,
        connected: Callable[[], bool] | None = None,
    ) -> dict[str, Decision]:
        """Decide tool calls of ``turn``'s response together; decisions by :attr:`ToolCall.key`.

        ``connected``: whether the agent is still there (see :meth:`decide`)."""
        keys = [tc.key for tc in calls]
        if len(set(keys)) != len(keys):
            # Decisions are looked up by key: a shared key would give two calls one decision.
            raise RuntimeError(f"adapter {protocol} gave two calls the same key: {keys}")
        actions = [turn.action(tc, protocol) for tc in calls]
        if self._chains is not None:
            self._chains.proposed(actions)
        if len(actions) == 1:
            decided = [await self.decide(actions[0], connected=connected)]
        else:
            decided = list(
                await asyncio.gather(*(self.decide(a, connected=connected) for a in actions))
            )
            # The answer goes out once its last call is decided, and a held one can
            # wait minutes: a switch thrown meanwhile stops the calls decided first.
            decided = [await self._rechecked(a, d) for a, d in zip(actions, decided, strict=True)]
        for action, decision in zip(actions, decided, strict=True):
            self._link(turn, action, decision)
        return {tc.key: d for tc, d in zip(calls, decided, strict=True)}

    def _link(self, turn: Turn, action: Action, decision: Decision) -> None:
        """Remember an allowed call by id, so the result the agent sends back finds its decision.

        Ids are the upstream's choice: one that appears twice (in this response,
        or still waiting from an earlier one) could link a result to the wrong
        decision, so it is linked to none.
        """
        call_id = action.call_id
        if not call_id:
            return
        conversation = turn.request.conversation
        if decision.enforced is not Effect.ALLOW and conversation is not None:
            # The provider keeps the call it proposed, and a request continuing
            # this answer (Responses API) must give it an output: the session
            # guard keeps these with the answer's chain link (warden.sessions).
            # Not the action itself: its request holds the conversation, and the
            # cycle would leave every such request to the garbage collector.
            refused = (call_id, action.tool or "", action.wire_type or "", decision)
            conversation.memo.setdefault("refused", []).append(refused)
        if call_id.startswith(RESERVED_CALL_IDS):
            # The provider's id in Warden's own namespace (a gRPC decision's key): linked,
            # it would take that decision's link, and its result would not be recorded.
            metrics.child(metrics.AMBIGUOUS_CALL_IDS, turn.request.upstream).inc()
            return
        earlier = call_id not in turn.seen and self.links.waiting(call_id)
        if call_id in turn.seen or earlier:
            if self.links.tombstone(call_id) or earlier:
                metrics.child(metrics.AMBIGUOUS_CALL_IDS, turn.request.upstream).inc()
            turn.seen.add(call_id)
            return
        turn.seen.add(call_id)
        if decision.enforced is Effect.ALLOW:
            self.links.link(call_id, Link(action, decision.decision_id))

    def continued(
        self, turn: Turn, adapter: Adapter, body: Mapping[str, Any]
    ) -> dict[str, Any] | None:
        """The model request to send instead, when the answer it continues is owed outputs.

        Call after the request's own decision: a Responses request that
        continues an answer in which Warden kept calls from the agent gets an
        output for each (what the agent saw instead), or the provider would
        refuse it. ``None``: send ``body`` as it is.
        """
        owed = owed_outputs(turn.request.conversation)
        if not owed:
            return None
        answered = adapter.answer_refused(body, owed)
        if answered is None:
            return None
        changed, count = answered
        metrics.child(metrics.REFUSALS_ANSWERED, turn.request.upstream).inc(count)
        return changed

    # -- listings --------------------------------------------------------------

    async def hidden_tools(
        self, agent: Agent, upstream: str, names: Sequence[str]
    ) -> frozenset[str]:
        """The tools of an MCP ``tools/list`` answer that ``agent`` should not see.

        A tool is hidden when the policy would deny it in every case: it is
        asked about the tool by name alone (``stage: list``, no arguments)
        and answers ``deny`` in enforce mode, or a kill switch covers the
        tool, agent or upstream. ``require_approval`` and allow keep a tool,
        and so does anything less than a clear answer: the policy failing,
        saying nothing, or being too busy. Hiding only spares the model a
        tool it cannot use; every call is still decided on its own, so a
        failure here must not take tools away (that would make a policy
        outage look like a broken server). Nothing is recorded: a listing is
        not an action. Answers come from the policy cache after the first.
        """
        unique = list(dict.fromkeys(names))
        if not unique:
            return frozenset()
        request = RequestMeta(method="tools/list", upstream=upstream, path="")
        limit = asyncio.Semaphore(_LIST_CONCURRENCY)

        async def hidden(name: str) -> bool:
            action = Action(
                action_id=new_id("act"),
                agent=agent,
                kind=ActionKind.TOOL_CALL,
                protocol="mcp",
                stage=Stage.LIST,
                request=request,
                tool=name,
            )
            async with limit:
                try:
                    decision = await self._pipeline.preview(action)
                except Exception:
                    # Overloaded, or a guard failing: the tool stays listed (see above).
                    log.warning("could not decide whether to list %s; it stays listed", name)
                    return False
            return decision is not None and decision.enforced is Effect.DENY

        verdicts = await asyncio.gather(*(hidden(n) for n in unique))
        hide = frozenset(n for n, h in zip(unique, verdicts, strict=True) if h)
        if hide:
            metrics.child(metrics.MCP_TOOLS_HIDDEN, metrics.bounded("upstream", upstream)).inc(
                len(hide)
            )
        return hide

    # -- outcomes --------------------------------------------------------------

    def record_results(self, agent: Agent, results: Iterable[ToolResult]) -> None:
        """Record tool results ``agent`` sent back, each as its decision's outcome, once.

        Agents resend the whole conversation each turn: a result is recorded
        the first time it is seen, for calls this sidecar (or its earlier
        run) let through to that same agent: another agent naming a call id
        neither records an outcome for it nor uses up its link. Unknown ids
        are looked up in the store off the response path. Ids of Warden's own
        (``grpc-decision:``, reported through ``ReportOutcome``) are not results.
        """
        by_id = {r.call_id: r for r in results if not r.call_id.startswith(RESERVED_CALL_IDS)}
        if not by_id:
            return
        if len(by_id) > MAX_RESULTS_PER_REQUEST:
            # Older results were seen in earlier turns; an agent sending more is not
            # given a store lookup each.
            by_id = dict(list(by_id.items())[-MAX_RESULTS_PER_REQUEST:])
        linked, unknown = self.links.take(by_id, agent=agent.id)
        for call_id, link in linked.items():
            self._record_result(link, by_id[call_id])
        if unknown:
            self.background.spawn(
                self._record_stored(agent, {i: by_id[i] for i in unknown}), name="stored-results"
            )

    async def _record_stored(self, agent: Agent, results: Mapping[str, ToolResult]) -> None:
        for call_id, link in (await self.links.take_stored(list(results))).items():
            if link.action.agent.id != agent.id:
                self.links.link(call_id, link)  # still its own agent's to report
                continue
            self._record_result(link, results[call_id])

    def _record_result(self, link: Link, result: ToolResult) -> None:
        outcome = Outcome(result=result.content, is_error=result.is_error, reported_by="agent")
        self.background.spawn(
            self._pipeline.outcome(link.action, link.decision_id, outcome), name="result"
        )

    def answer_started(self, turn: Turn, response_id: str) -> None:
        """A streamed Responses answer named its id, before the agent sees it: from now
        on only ``turn``'s agent may continue or fetch it (its link comes at the end)."""
        conversation = turn.request.conversation
        if conversation is not None and conversation.retrieved_id == response_id:
            return  # a stored answer fetched again: whoever fetches it did not make it
        if self._chains is not None:
            self._chains.answer_started(response_id, turn.agent.id)

    def record_response(self, turn: Turn, response_id: str | None) -> None:
        """Remember a relayed Responses API answer by id, in the background.

        A later request naming it as ``previous_response_id`` then gets its
        conversation history from Warden's own records (:mod:`warden.sessions`).
        """
        conversation = turn.request.conversation
        if self._chains is None or conversation is None or not response_id:
            return
        self.background.spawn(
            self._chains.record_response(conversation, response_id, turn.agent.id),
            name="response-chain",
        )

    def outcome(
        self,
        action: Action,
        decision: Decision | str,
        outcome: Outcome,
        *,
        trusted: bool = False,
    ) -> None:
        """Record what happened to an action that was let through, in the background.

        ``decision``: the decision that let it through, or its id.
        ``trusted``: the door saw the outcome itself, at the tool API that
        executed the action; a trusted failure releases what the action reserved.
        """
        decision_id = decision if isinstance(decision, str) else decision.decision_id
        # Outcomes follow the action; they need not delay the agent's response.
        self.background.spawn(
            self._pipeline.outcome(action, decision_id, outcome, trusted=trusted),
            name="outcome",
        )

    @staticmethod
    def count_usage(
        agent: Agent, model: str | None, usage: Usage | None, *, billed: bool = True
    ) -> None:
        """Count a response's tokens by agent and model.

        ``billed``: the route is one the provider bills (see
        :attr:`~warden.protocols.registry.RouteMatch.billed`); a stored answer
        fetched again repeats the usage of the call that made it, counted then.
        """
        if usage is None or not billed:
            return
        who = metrics.bounded("agent", agent.id)
        label = metrics.bounded("model", model or "unknown")
        metrics.child(metrics.TOKENS, who, label, "input").inc(usage.input_tokens)
        metrics.child(metrics.TOKENS, who, label, "output").inc(usage.output_tokens)
        if usage.cached_input_tokens:
            metrics.child(metrics.TOKENS, who, label, "cached").inc(usage.cached_input_tokens)
        if written := usage.cache_write_tokens + usage.cache_write_1h_tokens:
            metrics.child(metrics.TOKENS, who, label, "cache_write").inc(written)


def _count(action: Action, decision: Decision) -> None:
    agent = metrics.bounded("agent", action.agent.id)
    effect = decision.effect._value_  # not ``.value``: a property call per use
    metrics.child(
        metrics.DECISIONS,
        agent,
        metrics.bounded("tool", action.tool or action.kind.value),
        effect,
        decision.mode._value_,
        decision.guard,
    ).inc()
    metrics.count_agent_decision(agent, effect)
