"""The budget stage of the guard pipeline: reserve, let the policy see, settle.

For each action the guard works out what it would spend against which caps
(``budgets.caps`` on tool argument values, ``budgets.llm`` on model spend),
and reserves all of it in one state-store transaction, or none of it if any
cap would be passed. The counters as they were before the reservation become
``input.budget`` for the policy. After the final decision a reservation that
will not be used (denied, held for approval, not recorded) is released.

A tool call let through is delivered to the agent, so its reservation counts
as spent: its outcome settles it at the held value. Only a trusted outcome
(from a tool API Warden fronts itself) that says the call failed releases it;
the agent's own ``is_error`` does not, unless ``budgets.trust_agent_results``
is set. A model call is settled at its cost from the response's usage, or
at what it held when no usage came; the amount settled is what it returns,
for the outcome record and the spend metric. A request that fetches, updates,
cancels or lists what a model call made (``GET responses/{id}``) is no model
call: it holds and settles nothing, so a used-up cap does not refuse it.

A per-customer cap takes the customer from the call's arguments (a JSON
pointer) or the context; a call naming none gets the cap's ``missing``
effect, never a pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from warden import tasks
from warden.budgets import metrics
from warden.budgets.caps import (
    LLM_COUNTER,
    Uncountable,
    budget_document,
    customer_of,
    customer_subject,
    over_reason,
    window_key,
    windows_closed_before,
)
from warden.budgets.prices import PriceTable
from warden.config import BudgetsConfig, CapConfig, LlmBudgetConfig
from warden.model import Action, ActionKind, Decision, Effect, Mode, Outcome, Usage, new_id
from warden.ops.metrics import BUDGET_LIMIT, bounded, child
from warden.pipeline import UNCHECKED, GuardContext
from warden.pointers import pointer_get
from warden.protocols.registry import match_route
from warden.state import BudgetRepo, Counter, Hold

__all__ = ["BudgetGuard", "CapSpend"]

log = logging.getLogger("warden.budgets")

MAX_HELD = 100_000
EXPIRY_INTERVAL_S = 60.0
STATE_UNAVAILABLE = "state_unavailable"


@dataclass(frozen=True, slots=True)
class CapSpend:
    """One cap's use in the current window by one subject (or by nobody yet)."""

    cap: str
    """The cap's name; :data:`~warden.budgets.caps.LLM_COUNTER` for model spend."""
    window: str
    """The current window's key: ``day:2026-11-30``, ``month:2026-11``."""
    subject: str | None
    """``agent:<id>`` or ``customer:<id>``; ``None``: nothing counted in this window yet."""
    spent: float
    reserved: float
    """Held by calls whose outcome has not settled yet."""
    limit: float | None
    """``None``: counted, not capped."""
    currency: str

    @property
    def used(self) -> float:
        """What counts against the limit: spent and reserved."""
        return self.spent + self.reserved


@dataclass(frozen=True, slots=True)
class _Line:
    """One counter an action touches: which cap, which subject, how much."""

    cap: str
    window: str
    per: str
    who: str
    hold: Hold
    currency: str
    over: str
    what: str


@dataclass(frozen=True, slots=True)
class _Plan:
    """The counters an action touches, and the per-customer caps it names no customer for."""

    lines: tuple[_Line, ...] = ()
    unkeyed: tuple[CapConfig, ...] = ()


class BudgetGuard:
    """Reserves action value and LLM spend against the configured caps."""

    name = "budget"

    def __init__(
        self,
        store: BudgetRepo,
        config: BudgetsConfig,
        prices: PriceTable,
        providers: Mapping[str, str],
        *,
        clock: Callable[[], float] = time.time,
        on_unavailable: Mapping[str, Effect] | None = None,
    ) -> None:
        """``providers`` maps each upstream name to its protocol (the price table's provider).

        ``on_unavailable``: effect by tool risk class when the state store cannot
        reserve (``state.on_unavailable: fallback``); ``None`` denies every such call.
        """
        self.store = store
        self.config = config
        self.prices = prices
        self._providers = dict(providers)
        self._clock = clock
        self._on_unavailable = dict(on_unavailable) if on_unavailable is not None else None
        self._zone = ZoneInfo(config.timezone)
        self._caps: dict[str, list[CapConfig]] = {}
        for cap in config.caps:
            self._caps.setdefault(cap.tool, []).append(cap)
            child(BUDGET_LIMIT, cap.name, cap.window).set(cap.limit)
        if config.llm is not None and config.llm.limit_usd is not None:
            # Beside warden_budget_spent, for the "spend near a cap" alert.
            child(BUDGET_LIMIT, LLM_COUNTER, config.llm.window).set(config.llm.limit_usd)
        # Actions holding a reservation, so outcomes of others cost no I/O.
        self._held: OrderedDict[str, None] = OrderedDict()
        self._expiry: asyncio.Task[None] | None = None

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        """Start settling stale reservations in the background."""
        if self._expiry is None:
            self._expiry = tasks.spawn(self._expire_loop(), name="budget-expiry")

    async def close(self) -> None:
        """Stop the background task."""
        if self._expiry is not None:
            self._expiry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._expiry
            self._expiry = None

    async def _expire_loop(self) -> None:
        while True:
            try:
                count = await self.store.expire(self.config.reservation_ttl_s)
                if count:
                    log.warning("settled %d reservations whose outcome never came", count)
                now = datetime.fromtimestamp(self._clock(), self._zone)
                await self.store.prune_windows(windows_closed_before(now))
            except Exception:
                log.exception("could not expire stale reservations or old windows")
            await asyncio.sleep(EXPIRY_INTERVAL_S)

    # -- reading ---------------------------------------------------------------

    async def spend(self, *, per_cap: int = 20) -> tuple[CapSpend, ...]:
        """Each configured cap's spent, reserved and limit in its current window.

        At most ``per_cap`` subjects a cap, the most used first; a cap nobody
        used in this window yet is one row with ``subject`` ``None``. Reads the
        state store (shared by the fleet), so every sidecar shows the same.
        """
        now = datetime.fromtimestamp(self._clock(), self._zone)
        wanted: list[tuple[str, str, float | None, str]] = []
        if self.config.llm is not None:
            llm = self.config.llm
            wanted.append((LLM_COUNTER, llm.window, llm.limit_usd, "USD"))
        wanted.extend((c.name, c.window, c.limit, c.currency) for c in self.config.caps)
        out: list[CapSpend] = []
        for name, window, limit, currency in wanted:
            key = window_key(window, now)
            rows = await self.store.window_counters(name, key, limit=per_cap)
            out.extend(
                CapSpend(name, key, c.subject, c.spent, c.reserved, limit, currency) for c in rows
            )
            if not rows:
                out.append(CapSpend(name, key, None, 0.0, 0.0, limit, currency))
        return tuple(out)

    # -- pipeline hooks ----------------------------------------------------------

    async def check(self, action: Action, ctx: GuardContext) -> Decision | None:
        """Reserve and decide; see :meth:`admit`."""
        decision, _ = await self.admit(action, ctx)
        return decision

    async def admit(
        self, action: Action, ctx: GuardContext
    ) -> tuple[Decision | None, GuardContext]:
        """Reserve against every cap the action touches, or decide it passes one."""
        plan = self._plan(action, ctx.mode)
        if isinstance(plan, Decision):
            return plan, ctx
        unkeyed = self._unkeyed(action, ctx, plan.unkeyed) if plan.unkeyed else None
        lines = list(plan.lines)
        if not lines:
            return unkeyed, ctx
        try:
            result = await self.store.reserve(
                action.action_id,
                [line.hold for line in lines],
                force=ctx.mode is Mode.OBSERVE,
            )
        except Exception as exc:
            # One line per call, no traceback: an outage would flood the log.
            log.warning("the state store could not reserve budget: %s", _brief(exc))
            return self._unavailable(action, ctx) or unkeyed, ctx
        doc = budget_document(
            [
                (line.cap, line.window, line.per, counter, line.hold.limit)
                for line, counter in zip(lines, result.before, strict=True)
            ]
        )
        ctx = GuardContext(mode=ctx.mode, risk=ctx.risk, budget={**ctx.budget, **doc})
        if result.reserved:
            self._remember(action.action_id)
            self._gauge(action, lines, result.before, added=True)
        if not result.over:
            return unkeyed, ctx
        over = self._over(action, ctx, lines, result.before, result.over)
        return _stricter(over, unkeyed), ctx

    async def readmit(self, action: Action, mode: Mode) -> None:
        """Reserve again for an action people approved: its hold was released while it waited.

        Forced, like observe mode: the people who approved it saw the caps.
        """
        plan = self._plan(action, mode)
        if isinstance(plan, Decision) or not plan.lines:
            return
        holds = [line.hold for line in plan.lines]
        await self.store.reserve(action.action_id, holds, force=True)
        self._remember(action.action_id)

    async def decided(self, action: Action, decision: Decision | None) -> None:
        """Release the reservation unless the action is going through."""
        if action.action_id not in self._held:
            return
        if decision is not None and decision.enforced is Effect.ALLOW:
            return
        self._held.pop(action.action_id, None)
        await self._settle(action, {})

    async def settle(
        self, action: Action, outcome: Outcome, *, trusted: bool = False
    ) -> float | None:
        """Settle the reservation to what the action really spent; return a model call's cost.

        A delivered tool call is spent at its held value, unless a failure is
        reported by a ``trusted`` outcome (or by the agent, where the operator
        trusts agents' results): then its value is released. The cost (USD)
        goes into the outcome record and ``warden_llm_spend_usd_total``: from
        usage and the price table, or, with no usage read, what the call's
        reservation settled at (its hold, or 0 when released); ``None`` when
        this guard settled no model spend for it.
        """
        if action.kind is ActionKind.LLM_CALL and not self._billed(action):
            return None  # a stored answer fetched again: billed once, when it was made
        cost = (
            self._llm_cost(action, outcome.usage)
            if action.kind is ActionKind.LLM_CALL and outcome.usage is not None
            else None
        )
        if action.action_id in self._held:
            del self._held[action.action_id]
        elif not self._may_hold(action):
            return cost
        # Else decided before a restart, or by another sidecar on the same store:
        # the store settles it if it holds it, and changes nothing if not.
        actual: dict[str, float] | None
        if action.kind is ActionKind.LLM_CALL and cost is not None:
            actual = {LLM_COUNTER: cost}
        elif action.kind is ActionKind.LLM_CALL:
            # No usage: an error answer (or none) is not billed, but a 2xx whose usage
            # never came (the agent hung up mid-stream, a background response) was:
            # spent as held, not released to 0. Only a failure Warden saw (or a runner
            # it trusts reported) releases: the agent's own word cannot (gRPC outcomes).
            failed = (
                outcome.status >= 400
                if outcome.status is not None
                else outcome.error is not None or outcome.is_error
            )
            released = failed and (trusted or self.config.trust_agent_results)
            actual = {LLM_COUNTER: 0.0} if released else None
        elif (outcome.is_error or outcome.error) and (trusted or self.config.trust_agent_results):
            actual = {}  # it did not happen: release
        else:
            actual = None  # delivered: spent as held, whatever the agent says
        after = await self._settle(action, actual)
        llm = self.config.llm
        if (
            cost is None
            and llm is not None
            and action.kind is ActionKind.LLM_CALL
            and any(c.counter == LLM_COUNTER for c in after)
        ):
            # Charged without usage (a cut stream, a background request, a timeout):
            # the record and the metric show the amount the cap was charged.
            cost = self._llm_hold(action, llm) if actual is None else actual[LLM_COUNTER]
            model = bounded("model", action.model or "unknown")
            child(metrics.LLM_SPEND, bounded("agent", action.agent.id), model).inc(cost)
        return cost

    # -- internals ---------------------------------------------------------------

    def _may_hold(self, action: Action) -> bool:
        """Whether a cap applies to ``action``, so it may hold a reservation."""
        if action.kind is ActionKind.LLM_CALL:
            return self.config.llm is not None and self._billed(action)
        # Caps go by tool name whatever kind of call names it, so a capped
        # tool cannot be reached uncounted as a custom or MCP call.
        return bool(self._caps.get(action.tool or ""))

    def _plan(self, action: Action, mode: Mode) -> _Plan | Decision:
        if not self._may_hold(action):
            return _Plan()  # the common case costs no clock read and no I/O
        caps = self._caps.get(action.tool or "") if action.kind is not ActionKind.LLM_CALL else None
        now = datetime.fromtimestamp(self._clock(), self._zone)
        agent = f"agent:{action.agent.id}"
        lines: list[_Line] = []
        llm = self.config.llm
        if action.kind is ActionKind.LLM_CALL and llm is not None:
            lines.append(
                _Line(
                    cap=LLM_COUNTER,
                    window=llm.window,
                    per="agent",
                    who="this agent",
                    hold=Hold(
                        LLM_COUNTER,
                        window_key(llm.window, now),
                        agent,
                        self._llm_hold(action, llm),
                        llm.limit_usd,
                    ),
                    currency="USD",
                    over=llm.over,
                    what="this model call",
                )
            )
        if not caps:
            return _Plan(tuple(lines))
        args = action.arguments or {}
        unkeyed: list[CapConfig] = []
        for cap in caps:
            value = _number(_value_of(cap, args))
            problem = _uncountable(cap, args, value, action.tool)
            if problem is not None:
                return self._refuse(mode, problem)
            assert value is not None
            key = window_key(cap.window, now)
            customer = None
            if "customer" in cap.per:
                try:
                    customer = customer_of(cap.customer, action.context, args)
                except Uncountable as exc:
                    return self._refuse(mode, f"{cap.name} cap: {exc}, so it cannot be checked")
            for per in cap.per:
                if per == "agent":
                    subject, who = agent, "this agent"
                elif customer is not None:
                    # Never the id: reasons are not sealed, and erasure cannot reach them.
                    subject, who = customer_subject(customer), "this customer"
                else:
                    unkeyed.append(cap)  # never skipped: the cap's `missing` applies
                    continue
                lines.append(
                    _Line(
                        cap=cap.name,
                        window=cap.window,
                        per=per,
                        who=who,
                        hold=Hold(cap.name, key, subject, value, cap.limit),
                        currency=cap.currency,
                        over=cap.over,
                        what=f"this {action.tool}",
                    )
                )
        return _Plan(tuple(lines), tuple(unkeyed))

    def _unkeyed(self, action: Action, ctx: GuardContext, caps: tuple[CapConfig, ...]) -> Decision:
        """The decision for a call that names no customer for per-customer caps."""
        effect = Effect.REQUIRE_APPROVAL
        reasons = []
        for cap in caps:
            metrics.CAP_HITS.labels(cap.name, f"missing_{cap.customer.missing}").inc()
            if cap.customer.missing == "deny":
                effect = Effect.DENY
            sources = [
                f"argument {cap.customer.argument}" if cap.customer.argument is not None else "",
                f"context {cap.customer.context}" if cap.customer.context is not None else "",
            ]
            named = " or ".join(s for s in sources if s) or "no configured source"
            outcome = "it is denied" if cap.customer.missing == "deny" else "it needs approval"
            reasons.append(
                f"{cap.name} cap: this {action.tool} names no customer ({named}), so the "
                f"per-customer cap cannot be checked and {outcome}"
            )
        # Unchecked: the policy sees no customer counter for this call.
        return Decision(
            decision_id=new_id("dec"),
            effect=effect,
            reasons=tuple(reasons),
            mode=ctx.mode,
            guard="budget",
            error=UNCHECKED,
        )

    def _over(
        self,
        action: Action,
        ctx: GuardContext,
        lines: list[_Line],
        before: tuple[Counter, ...],
        over: tuple[Hold, ...],
    ) -> Decision:
        reasons = []
        effect = Effect.REQUIRE_APPROVAL
        for line, counter in zip(lines, before, strict=True):
            if line.hold not in over:
                continue
            metrics.CAP_HITS.labels(line.cap, line.over).inc()
            if line.over == "deny":
                effect = Effect.DENY
            reasons.append(
                over_reason(
                    cap="LLM spend" if line.cap == LLM_COUNTER else line.cap,
                    window=line.window,
                    who=line.who,
                    counter=counter,
                    hold=line.hold,
                    currency=line.currency,
                    what=line.what,
                )
            )
        return Decision(
            decision_id=new_id("dec"),
            effect=effect,
            reasons=tuple(reasons),
            mode=ctx.mode,
            guard="budget",
        )

    @staticmethod
    def _refuse(mode: Mode, reason: str) -> Decision:
        # Unchecked: the policy then sees no budget document of this action.
        return Decision(
            decision_id=new_id("dec"),
            effect=Effect.DENY,
            reasons=(reason,),
            mode=mode,
            guard="budget",
            error=UNCHECKED,
        )

    def _unavailable(self, action: Action, ctx: GuardContext) -> Decision | None:
        """``state.on_unavailable``: deny, or the risk class's fallback (allow: to the policy)."""
        fallback = self._on_unavailable
        if fallback is not None and fallback.get(ctx.risk) is Effect.ALLOW:
            log.warning(
                "state store unavailable: %s (%s) goes on to the policy without its caps",
                action.tool or action.kind,
                ctx.risk,
            )
            return None
        how = "fallback" if fallback is not None else "deny"
        return self._fail(
            ctx,
            "the budget state store is unavailable, so the caps cannot be checked; "
            f"denied (state.on_unavailable: {how})",
        )

    @staticmethod
    def _fail(ctx: GuardContext, reason: str) -> Decision:
        # Fail closed: a cap that cannot be checked does not let value through.
        return Decision(
            decision_id=new_id("dec"),
            effect=Effect.DENY,
            reasons=(reason,),
            mode=ctx.mode,
            guard="budget",
            error=STATE_UNAVAILABLE,
        )

    async def _settle(
        self, action: Action, actual: Mapping[str, float] | None
    ) -> tuple[Counter, ...]:
        after = await self.store.settle(action.action_id, actual)
        agent = bounded("agent", action.agent.id)
        for counter in after:
            if counter.subject.startswith("agent:"):
                window = counter.window.partition(":")[0]
                metrics.SPENT.labels(counter.counter, window, agent).set(counter.spent)
                metrics.RESERVED.labels(counter.counter, window, agent).set(counter.reserved)
        return after

    def _billed(self, action: Action) -> bool:
        """Whether a model call's route is one the provider bills (a model request,
        embeddings), or one Warden cannot place (the gRPC door's, a pass-through
        route): not a fetch, update, cancel or list of what a model call made."""
        request = action.request
        family = self._providers.get(request.upstream)
        if family not in ("openai", "anthropic"):
            return True
        route = match_route(family, request.method, request.path.split("/")[1:])
        return route is None or route.billed

    def _gauge(
        self, action: Action, lines: list[_Line], before: tuple[Counter, ...], *, added: bool
    ) -> None:
        agent = bounded("agent", action.agent.id)
        for line, counter in zip(lines, before, strict=True):
            if line.per == "agent":
                extra = line.hold.amount if added else 0.0
                metrics.SPENT.labels(line.cap, line.window, agent).set(counter.spent)
                metrics.RESERVED.labels(line.cap, line.window, agent).set(counter.reserved + extra)

    def _llm_hold(self, action: Action, llm: LlmBudgetConfig) -> float:
        """What a model call holds until it settles (USD)."""
        return max(llm.estimate_usd, self._llm_bound(action, llm))

    def _llm_bound(self, action: Action, llm: LlmBudgetConfig) -> float:
        """What a model call can cost as its request states it, in USD (0: unknown).

        Held until the call settles, so calls in flight together cannot all pass a
        cap that each alone fits: the output at the request's bound (every answer
        it asks for), the input at the body's size, and, for a continuation, the
        stored input the provider bills beside it (``continued_input_tokens``).
        A model the price table does not know is held at its dearest price.
        """
        size = action.size
        if size is None:
            return 0.0
        provider = self._providers.get(action.request.upstream, action.request.upstream)
        output = size.max_output_tokens or llm.unbounded_output_tokens
        kept = llm.continued_input_tokens if size.continued else 0
        most = Usage(
            input_tokens=-(-size.input_bytes // _BYTES_PER_TOKEN) + kept,
            output_tokens=output * size.choices,
            rate=size.rate,
        )
        fees = size.hosted_calls * self.prices.hosted_call_most(provider)
        return self.prices.cost(provider, action.model, most, held=True).usd + fees

    def _llm_cost(self, action: Action, usage: Usage) -> float:
        provider = self._providers.get(action.request.upstream, action.request.upstream)
        if action.size is not None and action.size.rate > usage.rate:
            # A premium tier asked for: billed as asked, whatever the answer says.
            usage = replace(usage, rate=action.size.rate)
        priced = self.prices.cost(provider, action.model, usage)
        if usage.model is not None and usage.model != action.model:
            # What ran, when the table knows it and it is dearer: an Azure deployment, a
            # stored prompt's model, a provider that swapped models.
            # A request naming none, or a name the table does not know, was held at
            # the dearest price: what ran is known now.
            ran = self.prices.cost(provider, usage.model, usage)
            if ran.known and (ran.usd > priced.usd or not priced.known):
                priced = ran
        model = bounded("model", action.model or "unknown")
        if not priced.known:
            child(metrics.UNKNOWN_MODEL_PRICES, provider, model).inc()
        child(metrics.LLM_SPEND, bounded("agent", action.agent.id), model).inc(priced.usd)
        return priced.usd

    def _remember(self, action_id: str) -> None:
        self._held[action_id] = None
        if len(self._held) > MAX_HELD:
            # The oldest reservation is left for expiry to settle.
            self._held.popitem(last=False)


_BYTES_PER_TOKEN = 4
"""About what a token of English text takes in a request body (JSON included): an
estimate of the input, where the output has the request's own bound."""


def _brief(exc: BaseException) -> str:
    """The last line of an exception's message (a driver's error names host and port only)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[-1]}" if lines else type(exc).__name__


def _stricter(first: Decision, second: Decision | None) -> Decision:
    """One decision for two budget findings: deny over approval, all reasons kept."""
    if second is None:
        return first
    effect = Effect.DENY if Effect.DENY in (first.effect, second.effect) else first.effect
    return replace(first, effect=effect, reasons=(*first.reasons, *second.reasons))


def _value_of(cap: CapConfig, args: Mapping[str, Any]) -> Any:
    """The capped value: a top-level argument by name, or any by JSON pointer."""
    if cap.value.startswith("/"):
        return pointer_get(args, cap.value)[1]
    return args.get(cap.value)


def _uncountable(
    cap: CapConfig, args: Mapping[str, Any], value: float | None, tool: str | None
) -> str | None:
    """Why the call's value cannot be counted against ``cap``, or ``None``."""
    if value is None or value < 0:
        return (
            f"{cap.name} cap: {tool}.{cap.value} must be a number of at least 0 to be "
            "counted, so the call cannot be checked"
        )
    for currency in _currencies(cap, args):
        if not isinstance(currency, str) or currency.upper() != cap.currency.upper():
            return (
                f"{cap.name} cap: it counts {cap.currency}, and this {tool} is in "
                f"{currency!r}, so it cannot be checked"
            )
    return None


def _currencies(cap: CapConfig, args: Mapping[str, Any]) -> list[Any]:
    """The ``currency`` arguments beside the capped value: top-level, and for a pointer,
    in the object holding the value (``/refund/amount`` -> ``/refund/currency``)."""
    found = [args["currency"]] if "currency" in args else []
    if cap.value.startswith("/") and cap.value.count("/") > 1:
        parent = cap.value.rsplit("/", 1)[0] + "/currency"
        present, value = pointer_get(args, parent)
        if present:
            found.append(value)
    return found


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)
