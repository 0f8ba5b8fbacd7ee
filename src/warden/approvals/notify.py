"""Webhook notifications for approvals: new pending approvals and their decisions.

Deliveries run as background tasks, so a slow or dead receiver never delays
a held action. Each is tried ``webhook_tries`` times with exponential backoff
(0.5 s, 1 s, 2 s... by default) and signed::

    X-Warden-Timestamp: 1795747200
    X-Warden-Signature: sha256=<hex HMAC-SHA256 of the exact body bytes, keyed by the secret>

The body carries the same ``timestamp``, so the signature covers it and a
receiver can refuse stale replays. See docs/approvals.md for verification.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson

from warden import __version__, tasks
from warden.approvals import metrics
from warden.approvals.model import Approval, ApprovalSettings
from warden.terminal import plain
from warden.urls import scrub, url_secrets

__all__ = [
    "EVENTS",
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "Delivery",
    "Notifier",
    "render",
    "sign",
    "verify_signature",
]

log = logging.getLogger("warden.approvals.notify")

SIGNATURE_HEADER = "X-Warden-Signature"
TIMESTAMP_HEADER = "X-Warden-Timestamp"
EVENTS = frozenset(
    {"approval.requested", "approval.approved", "approval.rejected", "approval.expired"}
)
_SLACK_ARGS_CHARS = 1500
_SLACK_HIDDEN = 10
"""Hidden paths named in a Slack message; the console lists them all."""
_SLACK_NAME_CHARS = 120
_SLACK_REASON_CHARS = 600


@dataclass(frozen=True, slots=True)
class Delivery:
    """What became of one webhook delivery."""

    event: str
    approval_id: str
    decision_id: str
    ok: bool
    attempts: int
    status: int | None = None
    error: str | None = None


def sign(secret: str, body: bytes) -> str:
    """The ``X-Warden-Signature`` value for ``body``: ``sha256=<hex HMAC-SHA256>``."""
    return "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def verify_signature(secret: str, body: bytes, header: str) -> bool:
    """Whether ``header`` is the valid signature of ``body`` (constant-time compare)."""
    return hmac.compare_digest(sign(secret, body), header)


def render(event: str, approval: Approval, fmt: str, timestamp: int) -> dict[str, Any]:
    """The webhook body for ``event`` in format ``json`` or ``slack``."""
    data = approval.to_json(now=float(timestamp))
    if fmt == "json":
        return {"event": event, "timestamp": timestamp, "approval": data}
    what = f"`{_inline(approval.tool or '-')}` by agent `{_inline(approval.agent_id)}`"
    if approval.upstream:
        what += f" to `{_inline(approval.upstream)}`"
    if event == "approval.requested":
        headline = f":hourglass: Approval needed: {what}"
    elif event == "approval.approved":
        headline = f":white_check_mark: Approved by {_line(approval.decided_by or '')}: {what}"
    elif event == "approval.rejected":
        headline = f":no_entry: Rejected by {_line(approval.decided_by or '')}: {what}"
    else:
        headline = f":alarm_clock: Expired without a decision: {what}"
    # Sorted, as the console shows them: the agent's own order could push the
    # field that matters past the cut. A cut message says so and sends people on.
    pretty = orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS
    # Escaped, then cut: Slack counts the escaped text ("&" is five characters then).
    args = _cut(_code(orjson.dumps(approval.arguments, option=pretty).decode()), _SLACK_ARGS_CHARS)
    if approval.answers is not None:  # an MCP retry's answers: the server acts on them too
        # Each cut on its own: padding in one (the client's text) cannot push the other out.
        answers = orjson.dumps(approval.answers, option=pretty).decode()
        args = f"arguments: {args}\nanswers: {_cut(_code(answers), _SLACK_ARGS_CHARS // 2)}"
    shown = approval.shown_sha256
    digest = f" · args sha256 {shown[:16]}…" if shown else ""  # withheld if a value is hidden
    details = [f"*Reason:* {_line(approval.reason, _SLACK_REASON_CHARS)}"]
    if hidden := approval.hidden:
        # The agent names its arguments: values it put under a credential-like name
        # are masked. Whoever approves must know what they cannot see.
        paths = ", ".join(f"`{_inline(p)}`" for p in hidden[:_SLACK_HIDDEN])
        more = f" and {len(hidden) - _SLACK_HIDDEN} more" if len(hidden) > _SLACK_HIDDEN else ""
        details.append(f"*Hidden from you:* {paths}{more}")
    if approval.risk:
        details.append(f"*Risk:* {_line(approval.risk)}")
    if approval.comment:
        details.append(f"*Comment:* {_line(approval.comment, _SLACK_REASON_CHARS)}")
    return {
        "text": f"{headline} ({approval.id})",
        "blocks": [
            {"type": "section", "text": _mrkdwn(headline)},
            {"type": "section", "text": _mrkdwn("\n".join(details))},
            {"type": "section", "text": _mrkdwn(f"```{args}```")},
            {
                "type": "context",
                "elements": [
                    _mrkdwn(
                        f"{approval.id} · status {approval.status.value} · "
                        f"{len(approval.approved_by)}/{approval.required_approvals} approvals"
                        + digest
                    )
                ],
            },
        ],
        "warden": {"event": event, "timestamp": timestamp, "approval_id": approval.id},
    }


def _cut(text: str, most: int) -> str:
    """Escaped ``text`` cut to ``most`` characters, never inside an entity (``&amp;``)."""
    if len(text) <= most:
        return text
    return _whole_entities(text[:most]) + "\n… (cut: see every argument in the console)"


def _whole_entities(text: str) -> str:
    # An entity is at most five characters ("&amp;"): one begun in the last four is cut.
    amp = text.rfind("&", len(text) - 4)
    return text[:amp] if amp != -1 and ";" not in text[amp:] else text


def _slack(text: str) -> str:
    # Slack's mrkdwn treats these three as control characters.
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _mrkdwn(text: str) -> dict[str, Any]:
    # verbatim: a URL or #channel the agent wrote is not turned into a link.
    return {"type": "mrkdwn", "text": text, "verbatim": True}


def _line(text: str, most: int = _SLACK_NAME_CHARS) -> str:
    """Agent-reachable text on one line of the message: line breaks, other control and
    format characters written as ``\\uXXXX`` (:func:`warden.terminal.plain`: no fake
    ``*Risk:* none`` line, no bidi override redrawing a name), cut to ``most`` (Slack
    refuses a section over 3,000 characters, and the request would never be posted)."""
    escaped = _slack(plain(text))
    if len(escaped) > most:
        escaped = _whole_entities(escaped[: most - 1]) + "…"
    return escaped


def _inline(text: str) -> str:
    """Agent-reachable text inside inline code: as :func:`_line`, and no backtick that
    would close the code early and write mrkdwn of its own."""
    return _line(text).replace("`", "\u02cb")


def _code(text: str) -> str:
    """``text`` (pretty JSON) for inside a code block: a backtick cannot close it (the
    agent wrote it), and what JSON leaves as it is (a bidi override drawing account
    ``4401-8765`` as ``4401-5678``, a zero-width or tag character) reads ``\\uXXXX``."""
    # MODIFIER LETTER GRAVE ACCENT for a backtick.
    return _slack(plain(text, keep="\n")).replace("`", "\u02cb")


class Notifier:
    """Sends approval webhooks in the background; a no-op without a URL.

    ``on_result`` is awaited after each delivery settles (for the audit
    record); its failures are logged, never raised.
    """

    def __init__(
        self,
        settings: ApprovalSettings,
        on_result: Callable[[Delivery], Awaitable[None]] | None = None,
    ) -> None:
        self._settings = settings
        self._on_result = on_result
        url = settings.webhook_url or ""
        # The whole URL, its path (Slack's token) and any password or query value.
        parts = {url, urlsplit(url).path, *url_secrets(url)} - {"", "/"}
        self._url_secrets = sorted(parts, key=len, reverse=True)
        self._tasks: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None

    @property
    def enabled(self) -> bool:
        """Whether a webhook URL is configured."""
        return self._settings.webhook_url is not None

    def notify(self, event: str, approval: Approval) -> None:
        """Start delivering ``event`` for ``approval``; returns at once."""
        if not self.enabled:
            return
        task = tasks.spawn(self._deliver(event, approval), name="webhook")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self, timeout_s: float = 10.0) -> None:
        """Wait (at most ``timeout_s``) for deliveries in flight: for tests and shutdown."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout_s)

    async def close(self, grace_s: float = 2.0) -> None:
        """Give deliveries in flight ``grace_s`` to finish, cancel the rest, close the session."""
        await self.drain(grace_s)
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _deliver(self, event: str, approval: Approval) -> None:
        s = self._settings
        assert s.webhook_url is not None
        timestamp = int(time.time())
        body = orjson.dumps(render(event, approval, s.webhook_format, timestamp))
        headers = {
            "Content-Type": "application/json",
            "User-Agent": f"warden/{__version__}",
            TIMESTAMP_HEADER: str(timestamp),
        }
        if s.webhook_secret:
            headers[SIGNATURE_HEADER] = sign(s.webhook_secret, body)
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=s.webhook_timeout_s)
            )
        status: int | None = None
        error: str | None = None
        attempts = 0
        for attempt in range(s.webhook_tries):
            attempts = attempt + 1
            try:
                # No redirects: the configured URL is the only place approvals go.
                async with self._session.post(
                    s.webhook_url, data=body, headers=headers, allow_redirects=False
                ) as resp:
                    status = resp.status
                    await resp.read()
                if 200 <= status < 300:
                    error = None
                    break
                error = f"HTTP {status}"
                if 400 <= status < 500 and status not in (408, 429):
                    break  # the receiver refuses this body: retrying will not help
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                # A webhook URL is itself a secret (Slack's path is the token), and
                # some client errors quote it: the text is recorded and logged scrubbed.
                why = scrub(f"{type(exc).__name__}: {exc}", self._url_secrets)
                status, error = None, why
            if attempt + 1 < s.webhook_tries:
                await asyncio.sleep(s.webhook_backoff_s * 2**attempt)
        ok = error is None
        metrics.NOTIFICATIONS.labels("ok" if ok else "failed").inc()
        if not ok:
            log.warning(
                "approval webhook for %s (%s) failed after %d tries: %s",
                approval.id,
                event,
                attempts,
                error,
            )
        if self._on_result is not None:
            delivery = Delivery(
                event, approval.id, approval.decision_id, ok, attempts, status, error
            )
            try:
                await self._on_result(delivery)
            except Exception:
                log.exception("could not record the approval webhook delivery")
