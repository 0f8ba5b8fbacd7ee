"""The live challenger: a candidate bundle evaluated beside the active one, off the request path.

``policy.challenger: {bundles: [...]}`` starts a second :class:`PolicyEngine`
with its own worker processes (run at a lower CPU priority). The policy guard
hands each policy decision's input to :meth:`Challenger.offer`, which only
appends it to a bounded queue: nothing on the request path awaits the
challenger, and when the queue is full the input is dropped and counted
(``warden_challenger_dropped_total``), never waited for.

Background tasks drain the queue in batches: once an input is queued, a
drain task waits up to ``policy.challenger.batch_ms`` (or until
``batch_size`` inputs are queued), takes everything queued (at most
``batch_size``) and sends it to one challenger worker as one request
(:meth:`PolicyEngine.evaluate_batch`). The proxy's event loop, which is
also the agents' request path, so spends a few microseconds per input and
one wake-up per batch instead of a round trip per input. The batch's
budget is ``policy.deadline_ms`` per input; a batch that uses it up, or
whose worker crashes, counts every input in it as diverged to ``error``.

Each result is compared with what the active bundle (the champion) gave for
the same input: the effect and the mode (a rule's ``"mode": "observe"`` lets
the action through whatever its effect, so ``deny`` → ``deny (observe)`` is
a divergence of its own, see :func:`result_label`). A difference is a
*divergence*: counted in
``warden_challenger_divergence_total{from,to}`` and, unless
``policy.challenger.record`` is off, written as a ``challenger`` audit record
naming the decision (a batch's records are appended together, so they share
one fsync, and never ahead of the agents' decisions). The challenger never
changes a decision: it runs in observe mode by construction.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import Counter, deque
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client import Counter as PromCounter
from prometheus_client import Gauge

from warden.config import ChallengerConfig, PolicyConfig
from warden.errors import Overloaded
from warden.model import Decision, Effect, Mode
from warden.policy.engine import PolicyEngine, PolicyResult, PreActivate
from warden.policy.metrics import NO_METRICS
from warden.tasks import Tasks

__all__ = [
    "DIVERGENCE",
    "DROPPED",
    "EVALUATED",
    "RECORD_KIND",
    "Challenger",
    "ChallengerStats",
    "Divergence",
    "challenger_effect",
    "result_label",
]

log = logging.getLogger("warden.policy.challenger")

RECORD_KIND = "challenger"
"""The audit record kind of a divergence."""
ERROR_LABEL = "error"
"""The ``to`` label when the challenger could not evaluate an input the champion decided."""
_NICE = 19  # where SCHED_IDLE is refused: the lowest share
_RECENT = 50

DIVERGENCE = PromCounter(
    "warden_challenger_divergence_total",
    "Decisions where the challenger bundle's effect or mode differs from the active bundle's, "
    "by the active effect (from) and the challenger's (to, or error); a side whose mode "
    "differs from the other's reads 'deny (observe)'.",
    ["from", "to"],
)
EVALUATED = PromCounter(
    "warden_challenger_evaluations_total",
    "Inputs the challenger evaluated, by result: same or diverged.",
    ["result"],
)
for _result in ("same", "diverged"):  # at 0 from the start: the alert reads increase()
    EVALUATED.labels(result=_result)
DROPPED = PromCounter(
    "warden_challenger_dropped_total",
    "Inputs the challenger skipped: queue_full (the request path never waits), "
    "busy (its workers were not free in time).",
    ["reason"],
)
QUEUE = Gauge("warden_challenger_queue", "Inputs waiting for the challenger.")


class ChallengeSink(Protocol):
    """Where divergences are recorded: the audit log's ``append``."""

    def append(self, kind: str, body: Mapping[str, Any], *, urgent: bool = True) -> Awaitable[Any]:
        """Record one event; ``urgent=False`` shares the next decision's fsync."""
        ...


@dataclass(frozen=True, slots=True)
class Divergence:
    """One decision on which the challenger disagreed with the active bundle."""

    decision_id: str
    agent: str
    tool: str | None
    champion_revision: str
    champion_effect: str
    challenger_revision: str
    challenger_effect: str
    """An effect, or ``error`` when the challenger could not evaluate the input."""
    champion_mode: str = Mode.ENFORCE.value
    challenger_mode: str = Mode.ENFORCE.value
    """The mode of each result (``observe`` lets the action through whatever the effect)."""

    @property
    def label(self) -> str:
        """``allow→deny``, or ``deny→deny (observe)`` when the modes differ."""
        champion = result_label(self.champion_effect, self.champion_mode, self.challenger_mode)
        challenger = result_label(self.challenger_effect, self.challenger_mode, self.champion_mode)
        return f"{champion}→{challenger}"

    def as_record(self) -> dict[str, Any]:
        """The body of the ``challenger`` audit record (no arguments, no context)."""
        return {
            "decision_id": self.decision_id,
            "agent_id": self.agent,
            "tool": self.tool,
            "champion": {
                "revision": self.champion_revision,
                "effect": self.champion_effect,
                "mode": self.champion_mode,
            },
            "challenger": {
                "revision": self.challenger_revision,
                "effect": self.challenger_effect,
                "mode": self.challenger_mode,
            },
        }


@dataclass(frozen=True, slots=True)
class ChallengerStats:
    """Counts since this process started, for the console and ``/readyz``."""

    revision: str | None
    evaluated: int
    diverged: int
    dropped: int
    queued: int
    changes: Mapping[str, int]
    """Divergences by ``from→to`` (``allow→require_approval``, ``deny→deny (observe)``)."""
    recent: tuple[Divergence, ...]
    """The latest divergences, newest last (at most 50)."""

    @property
    def divergence_rate(self) -> float:
        """Diverged over evaluated (0.0 before any evaluation)."""
        return self.diverged / self.evaluated if self.evaluated else 0.0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "revision": self.revision,
            "evaluated": self.evaluated,
            "diverged": self.diverged,
            "divergence_rate": self.divergence_rate,
            "dropped": self.dropped,
            "queued": self.queued,
            "changes": dict(self.changes),
            "recent": [d.as_record() for d in self.recent],
        }


def challenger_effect(result: PolicyResult, default_effect: Effect) -> str:
    """The challenger's effect label for a result: as the guard reads it, errors as ``error``."""
    if result.error is not None:
        return ERROR_LABEL
    if result.effect is None:
        return default_effect.value
    return result.effect.value


def result_label(effect: str, mode: str, other_mode: str) -> str:
    """How one side of a change reads: ``effect``, or ``deny (observe)``.

    The mode is shown only where the two sides' modes differ, on the side not
    in enforce mode: a change of mode alone (``deny→deny (observe)``) changes
    what is enforced, while an agent configured in observe mode would
    otherwise have every change read ``allow (observe)→deny (observe)``.
    """
    if not mode or mode in (other_mode, Mode.ENFORCE) or effect == ERROR_LABEL:
        return effect
    return f"{effect} ({mode})"


@dataclass(frozen=True, slots=True)
class _Item:
    doc: Mapping[str, Any]
    decision_id: str
    effect: str
    mode: str
    revision: str


class Challenger:
    """A second engine fed from a bounded queue; see the module docstring."""

    def __init__(
        self,
        engine: PolicyEngine,
        config: ChallengerConfig,
        *,
        default_effect: Effect,
        audit: ChallengeSink | None = None,
    ) -> None:
        self.engine = engine
        self.config = config
        self._default = default_effect
        self._audit = audit if config.record else None
        self._queue: deque[_Item] = deque()
        self._batch_size = config.batch_size
        self._wake = asyncio.Event()
        self._full = asyncio.Event()  # batch_size queued, or idle() asked for a flush
        self._collecting = asyncio.Lock()  # one drain task gathers a batch at a time
        self._flushing = 0  # idle() callers waiting: no batch delay meanwhile
        self.batches = 0
        """Batches sent to the challenger's workers so far (for benchmarks and tests)."""
        self._tasks = Tasks("challenger")
        self._closed = False
        self._evaluated = 0
        self._diverged = 0
        self._dropped = 0
        self._changes: Counter[str] = Counter()
        self._recent: deque[Divergence] = deque(maxlen=_RECENT)
        self._niced: set[int] = set()
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @classmethod
    async def start(
        cls,
        policy: PolicyConfig,
        *,
        audit: ChallengeSink | None = None,
        pre_activate: PreActivate | None = None,
    ) -> Challenger:
        """Start the challenger engine for ``policy.challenger`` and its drain tasks.

        The engine takes the active policy's settings (query, deadline,
        polling) with the challenger's bundles and workers; it reports to no
        Prometheus policy metric, so the champion's figures stay its own. A
        broken challenger bundle does not stop Warden: every input then
        diverges as ``error`` and ``status()`` says why.
        """
        config = policy.challenger
        if config is None:
            raise ValueError("policy.challenger is not set")
        engine_config = policy.model_copy(
            update={
                "bundles": config.bundles,
                "workers": config.workers,
                "bundle_url": None,
                "challenger": None,
                "cache_size": policy.cache_size,
            }
        )
        engine = await PolicyEngine.start(
            engine_config, metrics=NO_METRICS, pre_activate=pre_activate
        )
        challenger = cls(engine, config, default_effect=policy.default_effect, audit=audit)
        challenger._renice()
        for i in range(config.workers):
            challenger._tasks.spawn(challenger._drain(), name=f"drain-{i}")
        return challenger

    # -- the request path: one append, never awaited -------------------------

    def offer(self, doc: Mapping[str, Any], decision: Decision) -> None:
        """Queue the champion's policy ``doc`` and ``decision`` for comparison.

        Only decisions the policy made (``guard == "policy"``) are compared:
        a fallback is not the champion's answer. Returns at once; a full queue
        drops the input and counts it.
        """
        if self._closed or decision.guard != "policy":
            return
        if len(self._queue) >= self.config.queue_size:
            self._dropped += 1
            DROPPED.labels(reason="queue_full").inc()
            return
        queue = self._queue
        queue.append(
            _Item(
                doc,
                decision.decision_id,
                decision.effect._value_,
                decision.mode._value_,
                decision.bundle_revision,
            )
        )
        self._idle.clear()
        if not self._wake.is_set():
            self._wake.set()
        if len(queue) >= self._batch_size and not self._full.is_set():
            self._full.set()

    # -- the background -------------------------------------------------------

    async def _drain(self) -> None:
        while not self._closed:
            if not self._queue:
                self._wake.clear()
                QUEUE.set(0)
                await self._wake.wait()
                continue
            async with self._collecting:
                await self._wait_for_batch()
                batch = self._take()
            if not batch:
                continue
            self._inflight += len(batch)
            try:
                await self._run(batch)
            finally:
                self._inflight -= len(batch)
                if not self._queue and not self._inflight:
                    self._idle.set()

    async def _wait_for_batch(self) -> None:
        """Let a batch gather: up to ``batch_ms``, less once it is full or idle() waits."""
        if (
            not self._queue
            or len(self._queue) >= self._batch_size
            or self._flushing
            or self.config.batch_ms <= 0
        ):
            return
        self._full.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.config.batch_ms / 1000):
                await self._full.wait()

    def _take(self) -> list[_Item]:
        queue = self._queue
        take = min(len(queue), self._batch_size)
        batch = [queue.popleft() for _ in range(take)]
        QUEUE.set(len(queue))
        return batch

    async def _run(self, batch: list[_Item]) -> None:
        self.batches += 1
        try:
            results = await self.engine.evaluate_batch([item.doc for item in batch])
        except Overloaded:
            self._dropped += len(batch)
            DROPPED.labels(reason="busy").inc(len(batch))
            return
        self._renice()
        await self._compare(batch, results)

    async def _compare(self, batch: list[_Item], results: list[PolicyResult]) -> None:
        diverged: list[Divergence] = []
        for item, result in zip(batch, results, strict=True):
            effect = challenger_effect(result, self._default)
            # As PolicyGuard.decide: the rule's own mode, else the input's (the configured
            # one). An error has no mode of its own: it diverges by its effect alone.
            if effect == ERROR_LABEL:
                mode = item.mode
            elif result.mode is not None:
                mode = result.mode._value_
            else:
                mode = str(item.doc.get("mode") or item.mode)
            if effect == item.effect and mode == item.mode:
                continue
            agent = item.doc.get("agent") or {}
            action = item.doc.get("action") or {}
            divergence = Divergence(
                decision_id=item.decision_id,
                agent=str(agent.get("id", "")),
                tool=action.get("tool"),
                champion_revision=item.revision,
                champion_effect=item.effect,
                challenger_revision=result.revision or self.engine.revision or "",
                challenger_effect=effect,
                champion_mode=item.mode,
                challenger_mode=mode,
            )
            DIVERGENCE.labels(
                result_label(item.effect, item.mode, mode),
                result_label(effect, mode, item.mode),
            ).inc()
            self._changes[divergence.label] += 1
            diverged.append(divergence)
        self._evaluated += len(batch)
        self._diverged += len(diverged)
        self._recent.extend(diverged)
        if len(batch) > len(diverged):
            EVALUATED.labels(result="same").inc(len(batch) - len(diverged))
        if diverged:
            EVALUATED.labels(result="diverged").inc(len(diverged))
            await self._record(diverged)

    async def _record(self, diverged: list[Divergence]) -> None:
        """Append the batch's divergence records together: they share one fsync."""
        if self._audit is None:
            return
        # Not urgent: no fsync of their own in front of the agents' decisions.
        pending = [self._audit.append(RECORD_KIND, d.as_record(), urgent=False) for d in diverged]
        for outcome in await asyncio.gather(*pending, return_exceptions=True):
            if isinstance(outcome, Exception):  # the log refuses actions itself; keep comparing
                log.warning("challenger divergence not recorded: %s", outcome)

    def _renice(self) -> None:
        """Give new challenger workers (replacements included) only CPU nothing else wants."""
        for pid in self.engine.status()["worker_pids"]:
            if pid not in self._niced:
                # SCHED_IDLE: a proxy thread or champion worker that wakes takes
                # the CPU at once, where a nice value only shrinks the share (and
                # lets the worker finish its slice, milliseconds, first).
                with contextlib.suppress(OSError):
                    os.sched_setscheduler(pid, os.SCHED_IDLE, os.sched_param(0))
                with contextlib.suppress(OSError):
                    os.setpriority(os.PRIO_PROCESS, pid, _NICE)
                self._niced.add(pid)

    # -- reading --------------------------------------------------------------

    def stats(self) -> ChallengerStats:
        """The counts so far; see :class:`ChallengerStats`."""
        return ChallengerStats(
            revision=self.engine.revision,
            evaluated=self._evaluated,
            diverged=self._diverged,
            dropped=self._dropped,
            queued=len(self._queue),
            changes=dict(self._changes),
            recent=tuple(self._recent),
        )

    async def idle(self) -> None:
        """Wait until every queued input has been compared (for tests and shutdown).

        Queued inputs are sent at once, without waiting for their batch to fill.
        """
        if self._idle.is_set():
            return
        self._flushing += 1
        self._full.set()
        try:
            await self._idle.wait()
        finally:
            self._flushing -= 1

    def status(self) -> dict[str, Any]:
        """For ``/readyz``: the challenger engine's status and the counts."""
        return {"engine": self.engine.status(), **self.stats().as_dict()}

    async def close(self) -> None:
        """Stop comparing (queued inputs are discarded) and stop the challenger's workers."""
        self._closed = True
        self._queue.clear()
        self._idle.set()
        await self._tasks.cancel()
        await self.engine.close()
