"""The console's pages, rendered from plain data: no I/O, every value escaped.

Each function returns the ``<main>`` content of one view; :func:`page` wraps
it in the layout (navigation by role, the signed-in person, sign-out). Forms
that change state carry the session's CSRF token in a hidden ``csrf`` field.
Script comes only from ``/console/static/console.js`` (the CSP forbids inline
script); the page works without it except for live updates and the in-page
proof check.
"""

from __future__ import annotations

import datetime as dt
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from warden.admin.auth import Principal
from warden.approvals.model import Approval
from warden.audit.index import Bucket, IndexedRecord, IndexQuery, Page, Revision
from warden.budgets.guard import CapSpend
from warden.console import charts
from warden.console.html import Child, Html, join, lines, tag
from warden.killswitch import KillSwitch, Scope
from warden.policy.challenger import ChallengerStats, result_label
from warden.terminal import disguised, disguised_paths

__all__ = [
    "LOST",
    "VIEWS",
    "View",
    "allowed_views",
    "approvals_view",
    "decision_detail",
    "decisions_view",
    "error_view",
    "evidence_view",
    "login_view",
    "model_risk_view",
    "operations_view",
    "page",
    "pretty",
    "record_view",
    "verify_hint",
]

BASE = "/console"
EFFECTS = ("allow", "deny", "require_approval")
MODES = ("enforce", "observe")
SINCE = (
    ("15m", "last 15 minutes"),
    ("1h", "last hour"),
    ("24h", "last 24 hours"),
    ("7d", "last 7 days"),
    ("all", "all time"),
)


@dataclass(frozen=True, slots=True)
class View:
    """A view of the console: its path, its name and the roles that may open it."""

    slug: str
    title: str
    roles: frozenset[str]


VIEWS = (
    View("decisions", "Decisions", frozenset({"viewer", "approver", "auditor", "admin"})),
    View("approvals", "Approvals", frozenset({"approver"})),
    View("evidence", "Evidence", frozenset({"auditor", "admin"})),
    View("model-risk", "Model risk", frozenset({"auditor", "admin"})),
    View("operations", "Operations", frozenset({"admin"})),
)


def allowed_views(who: Principal) -> list[View]:
    """The views ``who`` may open, in menu order."""
    return [v for v in VIEWS if v.roles & who.roles]


def pretty(value: Any) -> str:
    """JSON for people: indented, keys sorted (a page shows it through :func:`lines`,
    which writes the bidi and other format characters JSON leaves as they are)."""
    try:
        return orjson.dumps(value, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode()
    except TypeError:
        return repr(value)


def _when(epoch: float | None) -> str:
    if epoch is None:
        return ""
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _utc(stamp: str) -> str:
    """A record's RFC 3339 time (always UTC) as the tables show it, zone said."""
    return f"{stamp[:19].replace('T', ' ')} UTC" if stamp else ""


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def csrf_field(csrf: str) -> Html:
    """The hidden field every state-changing form carries."""
    return tag("input", {"type": "hidden", "name": "csrf", "value": csrf})


def _field(label: str, name: str, value: str | None = "", **attrs: object) -> Html:
    ident = f"f-{name}"
    return tag(
        "p",
        {"class": "field"},
        tag("label", {"for": ident}, label),
        tag("input", {"id": ident, "name": name, "value": value or "", **attrs}),
    )


def _select(label: str, name: str, options: Iterable[tuple[str, str]], chosen: str | None) -> Html:
    ident = f"f-{name}"
    return tag(
        "p",
        {"class": "field"},
        tag("label", {"for": ident}, label),
        tag(
            "select",
            {"id": ident, "name": name},
            [
                tag("option", {"value": v, "selected": v == (chosen or "")}, text)
                for v, text in options
            ],
        ),
    )


def page(
    title: str,
    body: Child,
    *,
    who: Principal | None = None,
    csrf: str | None = None,
    active: str = "",
) -> Html:
    """The whole document: head, navigation for ``who``'s roles, ``body``."""
    nav: Child = None
    if who is not None:
        links = [
            tag(
                "li",
                None,
                tag(
                    "a",
                    {
                        "href": f"{BASE}/{v.slug}",
                        "aria-current": "page" if v.slug == active else None,
                    },
                    v.title,
                ),
            )
            for v in allowed_views(who)
        ]
        nav = tag(
            "header",
            {"class": "top"},
            tag("span", {"class": "brand"}, "Warden console"),
            tag("nav", {"aria-label": "Views"}, tag("ul", None, links)),
            tag(
                "form",
                {"method": "post", "action": f"{BASE}/logout", "class": "whoami"},
                tag("span", None, f"{who.subject} ({', '.join(sorted(who.roles))})"),
                csrf_field(csrf or ""),
                tag("button", {"type": "submit"}, "Sign out"),
            ),
        )
    doc = tag(
        "html",
        {"lang": "en"},
        tag(
            "head",
            None,
            tag("meta", {"charset": "utf-8"}),
            tag("meta", {"name": "viewport", "content": "width=device-width, initial-scale=1"}),
            tag("title", None, f"{title} · Warden"),
            tag("link", {"rel": "stylesheet", "href": f"{BASE}/static/console.css"}),
            tag("script", {"src": f"{BASE}/static/console.js", "defer": True}),
        ),
        tag("body", None, nav, tag("main", {"id": "main"}, tag("h1", None, title), body)),
    )
    return Html("<!doctype html>\n" + doc)


LOST = {
    "vote": "Your session ended before your vote reached Warden: it was NOT recorded. "
    "Sign in again, then vote again.",
    "switch": "Your session ended before the form reached Warden: the kill switch was NOT "
    "thrown. Sign in again, then throw it again.",
    "clear": "Your session ended before the form reached Warden: the kill switch was NOT "
    "cleared and is still in force. Sign in again, then clear it again.",
    "export": "Your session ended before the form reached Warden: no evidence package was "
    "built. Sign in again, then ask for it again.",
    "erase": "Your session ended before the form reached Warden: nothing was erased. "
    "Sign in again, then send the erasure again.",
    "form": "Your session ended before the form reached Warden: nothing was done. "
    "Sign in again, then send it again.",
}
"""What the sign-in form says after a form was posted without a session, by ``?lost=``."""


def login_view(
    nonce: str, message: str = "", *, sso: bool = False, back: str | None = None
) -> Html:
    """The sign-in form: an admin token in a field labelled "Token"; ``back``: the view to
    return to once signed in."""
    return page(
        "Sign in",
        [
            tag("p", {"class": "error", "role": "alert"}, message) if message else None,
            tag(
                "form",
                {"method": "post", "action": f"{BASE}/login", "class": "login"},
                tag("input", {"type": "hidden", "name": "nonce", "value": nonce}),
                tag("input", {"type": "hidden", "name": "next", "value": back}) if back else None,
                _field("Token", "token", "", type="password", autocomplete="off", required=True),
                tag("button", {"type": "submit"}, "Sign in"),
            ),
            tag(
                "p",
                {"class": "hint"},
                "Use the admin API token you were given. ",
                "Your organisation's single sign-on also leads here." if sso else None,
            ),
        ],
    )


def error_view(
    status: int,
    message: str,
    who: Principal | None,
    csrf: str | None,
    *,
    title: str | None = None,
    hint: Html | None = None,
) -> Html:
    """An error page that keeps the navigation; ``hint``: what to do about it."""
    return page(
        title or (f"{status}: not allowed" if status == 403 else f"Error {status}"),
        [tag("p", {"class": "error", "role": "alert"}, message), hint],
        who=who,
        csrf=csrf,
    )


def verify_hint(damaged: bool) -> Html:
    """What to do when the log cannot give back a record it holds."""
    first = (
        "This is not a missing record: the log holds it, and its stored bytes no longer "
        "read back as written. "
        if damaged
        else "This is not a missing record: the log's files cannot be read right now "
        "(a volume gone, or permissions). Check the audit volume first. "
    )
    return tag(
        "p",
        {"class": "hint"},
        first,
        "Run ",
        tag("code", None, "warden audit verify"),
        " on the log to find what is damaged, and treat it as an incident until it passes.",
    )


# -- Decisions --------------------------------------------------------------------------


def _effect(value: str | None) -> Html:
    return tag("span", {"class": f"effect effect-{value or 'none'}"}, value or "—")


def decision_rows(rows: Sequence[IndexedRecord]) -> Html:
    """The body rows of the decisions table (the script builds the same from JSON)."""
    return join(
        tag(
            "tr",
            {"data-seq": r.seq},
            tag("td", None, r.time[:19].replace("T", " ")),
            tag("td", None, r.agent or ""),
            tag("td", None, r.tool or ""),
            tag("td", None, _effect(r.effect)),
            tag("td", None, r.mode or ""),
            tag("td", {"class": "reason"}, r.reason or ""),
            tag("td", None, tag("a", {"href": f"{BASE}/decisions/{r.seq}"}, r.decision_id or r.id)),
        )
        for r in rows
    )


def _filters(q: IndexQuery, since: str, facets: Mapping[str, Sequence[str]]) -> Html:
    def opts(name: str, fixed: Sequence[str] = ()) -> list[tuple[str, str]]:
        values = list(dict.fromkeys([*fixed, *facets.get(name, ())]))
        return [("", "any"), *((v, v) for v in values)]

    return tag(
        "form",
        {"method": "get", "action": f"{BASE}/decisions", "class": "filters", "role": "search"},
        _select("Agent", "agent", opts("agent"), q.agent),
        _select("Tool", "tool", opts("tool"), q.tool),
        _select("Effect", "effect", opts("effect", EFFECTS), q.effect),
        _select("Mode", "mode", opts("mode", MODES), q.mode),
        _select("Time", "since", SINCE, since),
        tag("button", {"type": "submit"}, "Filter"),
    )


def decisions_view(
    page_: Page,
    *,
    q: IndexQuery,
    since: str,
    buckets: Sequence[Bucket],
    facets: Mapping[str, Sequence[str]],
    query_string: str,
) -> Html:
    """Charts, filters and the live table of decisions."""
    older: Child = None
    if page_.next_before is not None:
        sep = "&" if query_string else ""
        older = tag(
            "a",
            {
                "href": f"{BASE}/decisions?{query_string}{sep}before={page_.next_before}",
                "rel": "next",
            },
            "Older decisions",
        )
    return join(
        [
            _filters(q, since, facets),
            tag(
                "section",
                {"class": "charts", "aria-label": "Charts"},
                tag(
                    "figure",
                    None,
                    charts.decisions_chart(buckets),
                    tag(
                        "figcaption",
                        None,
                        "Decisions by effect: ",
                        [
                            tag("span", {"class": f"key effect effect-{e}"}, e)
                            for e in ("allow", "require_approval", "deny")
                        ],
                    ),
                ),
                tag(
                    "figure",
                    None,
                    charts.latency_chart(buckets),
                    tag(
                        "figcaption",
                        None,
                        "Added latency (ms): ",
                        tag("span", {"class": "key lat-avg"}, "average"),
                        " ",
                        tag("span", {"class": "key lat-max"}, "worst"),
                    ),
                ),
                tag(
                    "figure", None, charts.errors_chart(buckets), tag("figcaption", None, "Errors")
                ),
            ),
            tag(
                "p",
                {"class": "live"},
                tag(
                    "input",
                    {
                        "type": "checkbox",
                        "id": "live",
                        "data-feed": f"{BASE}/api/decisions?{query_string}",
                        "checked": q.before is None,
                    },
                ),
                tag("label", {"for": "live"}, "Live updates"),
                " ",
                # Where the script says that live updates stopped (signed out, refused).
                tag("span", {"id": "live-status", "role": "status", "class": "warn"}, ""),
            ),
            tag(
                "table",
                {"class": "decisions", "aria-label": "Decisions"},
                tag(
                    "thead",
                    None,
                    tag(
                        "tr",
                        None,
                        [
                            tag("th", {"scope": "col"}, h)
                            for h in (
                                "Time (UTC)",
                                "Agent",
                                "Tool",
                                "Effect",
                                "Mode",
                                "Reason",
                                "Decision",
                            )
                        ],
                    ),
                ),
                tag("tbody", {"id": "decision-rows"}, decision_rows(page_.rows)),
            ),
            tag("p", None, "No decisions match." if not page_.rows else None, older),
        ]
    )


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _dl(items: Iterable[tuple[str, Child]]) -> Html:
    return tag(
        "dl", {"class": "facts"}, [[tag("dt", None, k), tag("dd", None, v)] for k, v in items]
    )


Linked = tuple[int, Mapping[str, Any]]
"""A record found for a page: its sequence number and the record as parsed."""


def decision_detail(
    record: Mapping[str, Any],
    outcomes: Sequence[Mapping[str, Any]],
    *,
    approvals: Sequence[Linked] = (),
    follow_ups: Sequence[Linked] = (),
    unreadable: Sequence[int] = (),
) -> Html:
    """One decision: reason, policy revision, redacted arguments, approval, outcome.

    ``approvals``: the approval records of this decision (requested, each vote,
    executed...), oldest first; ``follow_ups``: the decisions made once those
    approvals ended (the call that went ahead, or its refusal), which carry the
    outcome; ``unreadable``: linked records the log could not give back.
    """
    decision = record.get("decision") or {}
    action = record.get("action") or {}
    agent = record.get("agent") or {}
    obligations = decision.get("obligations") or {}
    reasons = decision.get("reasons") or []
    facts = [
        ("Decision", decision.get("id")),
        ("Record", f"{record.get('id')} (#{record.get('seq')})"),
        ("Time", record.get("time")),
        ("Agent", agent.get("id")),
        ("Tool", action.get("tool") or action.get("kind")),
        ("Effect", _effect(decision.get("effect"))),
        ("Enforced", decision.get("enforced")),
        ("Mode", decision.get("mode")),
        ("Decided by", decision.get("guard")),
        ("Reason", "; ".join(str(r) for r in reasons) or "—"),
        ("Policy revision", decision.get("bundle_revision") or "—"),
        ("Risk", obligations.get("risk") or "—"),
        ("Decision time", f"{(decision.get('elapsed_us') or 0) / 1000:.2f} ms"),
        ("Error", decision.get("error") or "—"),
    ]
    shown_args: Any = action.get("arguments")
    if action.get("raw_arguments") is not None:
        shown_args = action.get("raw_arguments")
    redacted = action.get("redacted") or []
    held = decision.get("enforced") == "require_approval" or decision.get("effect") == (
        "require_approval"
    )
    outcome_blocks: Child = [
        tag("pre", {"class": "json", "aria-label": "Outcome"}, lines(pretty(o.get("outcome"))))
        for o in outcomes
    ]
    if not outcomes:
        if follow_ups:
            outcome_blocks = tag(
                "p",
                None,
                "None under this decision: the call was decided again once its approval "
                "ended, and the follow-up decision above carries its outcome.",
            )
        elif held:
            outcome_blocks = tag(
                "p",
                None,
                "None: a held call has no outcome of its own. It goes ahead only under a "
                "follow-up decision once approved, and none is recorded yet.",
            )
        else:
            outcome_blocks = tag("p", None, "No outcome recorded yet.")
    return join(
        [
            _dl(facts),
            tag("h2", None, "Arguments (as recorded, redacted)"),
            tag("p", {"class": "hint"}, f"Redacted: {', '.join(redacted)}") if redacted else None,
            tag("pre", {"class": "json", "aria-label": "Arguments"}, lines(pretty(shown_args))),
            tag("h2", None, "Approval"),
            _approval_section(record.get("approval"), approvals, held),
            tag("h2", None, "Follow-up decision") if follow_ups else None,
            _follow_ups(follow_ups) if follow_ups else None,
            tag("h2", None, "Outcome"),
            outcome_blocks,
            tag(
                "p",
                {"class": "error", "role": "alert"},
                "The audit log could not read back records linked to this decision ("
                f"{', '.join(f'#{n}' for n in unreadable)}): it is damaged or unreadable there. "
                "Run ",
                tag("code", None, "warden audit verify"),
                ".",
            )
            if unreadable
            else None,
        ]
    )


_STEP = {
    "approval_requested": "asked for",
    "approval_deferred": "deferred",
    "approval_executed": "carried out",
    "approval_expired": "expired",
    "approval_cancelled": "cancelled",
}
"""What an approval record without a verdict of its own means, by kind."""


def _approval_section(evidence: Any, approvals: Sequence[Linked], held: bool) -> Html:
    """The approval evidence this decision carries, and the approval records that name it."""
    parts: list[Child] = []
    if evidence:
        # A follow-up decision: the approval it went ahead (or was refused) under.
        parts.append(
            tag(
                "pre", {"class": "json", "aria-label": "Approval evidence"}, lines(pretty(evidence))
            )
        )
    if approvals:
        rows = []
        for seq, r in approvals:
            body = _mapping(r.get("body"))
            who = body.get("who") or ", ".join(str(x) for x in body.get("approved_by") or ())
            kind = str(r.get("kind", ""))
            what = body.get("verdict") or _STEP.get(kind) or body.get("event") or ""
            note = body.get("comment") or body.get("reason") or body.get("result") or ""
            rows.append(
                tag(
                    "tr",
                    None,
                    tag("td", None, str(r.get("time", ""))[:19].replace("T", " ")),
                    tag("td", None, kind.removeprefix("approval_")),
                    tag("td", None, str(body.get("approval_id") or "")),
                    tag("td", None, str(who or "")),
                    tag("td", None, str(what)),
                    tag("td", None, str(note)),
                    tag("td", None, f"#{seq}"),
                )
            )
        heads = ("Time (UTC)", "Step", "Approval", "By", "Verdict", "Comment or reason", "Record")
        parts.append(
            tag(
                "table",
                {"aria-label": "Approval records"},
                tag(
                    "thead", None, tag("tr", None, [tag("th", {"scope": "col"}, h) for h in heads])
                ),
                tag("tbody", None, rows),
            )
        )
    if not parts:
        text = (
            "No approval records name this decision yet."
            if held
            else "None: this decision did not ask for approval."
        )
        parts.append(tag("p", None, text))
    return join(parts)


def _follow_ups(found: Sequence[Linked]) -> Html:
    items = []
    for seq, r in found:
        d = _mapping(r.get("decision"))
        reasons = d.get("reasons") or []
        items.append(
            tag(
                "li",
                None,
                tag("a", {"href": f"{BASE}/decisions/{seq}"}, str(d.get("id") or r.get("id"))),
                " ",
                _effect(d.get("effect")),
                f" at {str(r.get('time', ''))[:19].replace('T', ' ')} UTC: ",
                "; ".join(str(x) for x in reasons),
            )
        )
    return tag("ul", {"class": "follow-ups", "aria-label": "Follow-up decisions"}, items)


# -- Approvals --------------------------------------------------------------------------


def _member(who: Principal, groups: Sequence[str]) -> bool:
    # The service's rule (warden.approvals.service): a token's groups, or a role or
    # subject of the group's name. The page only hides buttons; the service decides.
    return any(g in who.groups or g == who.subject or g in who.roles for g in groups)


def vote_refusal(a: Approval, who: Principal) -> str | None:
    """Why ``who`` cannot vote on ``a`` (the service would refuse it), or ``None``."""
    if "approver" not in who.roles:
        return None  # no vote form at all: the view is for approvers
    mine = next((v for v in a.votes if v.subject == who.subject), None)
    if mine is not None:
        more = a.required_approvals - len(a.approved_by)
        still = f"; it waits for {more} more approval(s) from others" if more > 0 else ""
        return f"You {'approved' if mine.approve else 'rejected'} this{still}."
    if who.subject == a.agent_id:
        return "You cannot decide your own agent's actions."
    if a.approvers and not _member(who, a.approvers):
        return f"Only members of {', '.join(a.approvers)} may decide this; you are not one."
    return None


def _votes(a: Approval) -> str:
    if not a.votes:
        return "none yet"
    return "; ".join(
        f"{v.subject} {'approved' if v.approve else 'rejected'} at {_when(v.at)}"
        + (f": {v.comment}" if v.comment else "")
        for v in a.votes
    )


def decision_link(decision_id: str) -> Html:
    """A link to a decision's page by its id (the route finds its record)."""
    return tag(
        "a",
        {"href": f"{BASE}/decisions/id/{urllib.parse.quote(decision_id, safe='')}"},
        decision_id,
    )


def _approval_card(a: Approval, csrf: str, who: Principal, now: float) -> Html:
    label = f"Approval {a.id}"
    votes = f"{len(a.approved_by)} of {a.required_approvals} approvals"
    forms: Child = None
    refusal = vote_refusal(a, who)
    if refusal is not None:
        # No live buttons for a vote the service would refuse: say why instead.
        forms = tag("p", {"class": "hint vote-closed"}, refusal)
    elif "approver" in who.roles:
        ident = f"comment-{a.id}"
        forms = tag(
            "form",
            {"method": "post", "action": f"{BASE}/approvals/{a.id}/decide", "class": "vote"},
            csrf_field(csrf),
            tag(
                "p",
                {"class": "field"},
                tag("label", {"for": ident}, "Comment"),
                tag("textarea", {"id": ident, "name": "comment", "maxlength": 2000, "rows": 2}, ""),
            ),
            tag(
                "button",
                {"type": "submit", "name": "verdict", "value": "approve", "class": "approve"},
                "Approve",
            ),
            tag(
                "button",
                {"type": "submit", "name": "verdict", "value": "reject", "class": "reject"},
                "Reject",
            ),
        )
    return tag(
        "article",
        {"class": "approval", "aria-label": label},
        tag("h3", None, f"{a.tool or 'action'} for {a.agent_id}"),
        _dl(
            [
                ("Agent", a.agent_id),
                ("Tool", a.tool or "—"),
                ("Upstream", f"{a.method or ''} {a.upstream or '—'}".strip()),
                ("Reason", a.reason),
                ("Risk", a.risk or "—"),
                ("Waiting", _ago(now - a.created_at)),
                ("Approvers", f"{', '.join(a.approvers) or 'any approver'}; {votes}"),
                ("Votes", _votes(a)),
                ("Expires", _when(a.expires_at)),
                ("Approval", a.id),
                ("Decision", decision_link(a.decision_id)),
            ]
        ),
        # Said before the arguments, not left to "[redacted]" in them: an agent can put
        # any value under a credential-like name, and an approver must know to refuse.
        _hidden_notice(a.hidden, _disguised(a)),
        tag("pre", {"class": "json", "aria-label": "Arguments"}, lines(pretty(a.arguments))),
        # An MCP retry's answers to the server's questions: the server acts on them too.
        tag("pre", {"class": "json", "aria-label": "Answers"}, lines(pretty(a.answers)))
        if a.answers is not None
        else None,
        forms,
    )


_DISGUISED_NAMED = 20
"""Disguised texts a card names; past them, one line says how many more."""


def _disguised(a: Approval) -> list[str]:
    """Where the approval's tool name, arguments or answers hold characters drawn
    otherwise than they read (:func:`warden.terminal.disguised`)."""
    found = ["the tool name"] if a.tool and disguised(a.tool) else []
    found += disguised_paths(a.arguments)
    if a.answers is not None:
        found += [f"answers {p}" for p in disguised_paths(a.answers)]
    return found


def _hidden_notice(hidden: Sequence[str], masked: Sequence[str] = ()) -> Html | None:
    """Which argument paths the approver cannot see, and which hold characters they
    cannot see (``masked``, shown escaped), each on its own (a key may hold ", ")."""
    if not hidden and not masked:
        return None
    named: list[Child] = [tag("code", None, path) for path in masked[:_DISGUISED_NAMED]]
    if len(masked) > _DISGUISED_NAMED:
        named.append(f"and {len(masked) - _DISGUISED_NAMED} more")
    return tag(
        "div",
        {"class": "error", "role": "note", "aria-label": "Hidden from you"},
        [
            tag(
                "p",
                None,
                f"{len(hidden)} value(s) hidden from you (credential-like names, the policy's "
                "redactions, or too long to show). Reject the call if you need to see them to "
                "decide:",
            ),
            tag("ul", None, [tag("li", None, tag("code", None, path)) for path in hidden]),
        ]
        if hidden
        else None,
        # The page writes them as \uXXXX, but the service the call goes to may draw them:
        # "4401-\u202e8765" reads 4401-5678 there. An escape is easy to read past.
        [
            tag(
                "p",
                None,
                f"{len(masked)} text(s) hold invisible or text-reordering characters "
                "(bidi controls, zero-width, tag or control characters), written here as "
                "\\uXXXX. Read them as written: other screens draw them differently. Reject "
                "the call if you are unsure what it sends:",
            ),
            tag("ul", None, [tag("li", None, item) for item in named]),
        ]
        if masked
        else None,
    )


def approvals_view(
    shown: Sequence[Approval],
    csrf: str,
    who: Principal,
    message: str = "",
    *,
    history: bool = False,
    waiting: int | None = None,
    first: bool = True,
    next_after: str | None = None,
) -> Html:
    """One page of the queue (with approve and reject for approvers), or of the history.

    ``shown``: the page's approvals, pending ones or (``history``) those past
    pending; ``waiting``: how many are pending in all; ``first``: whether this
    is the first page; ``next_after``: the ``?after=`` of the next page, when
    there is one.
    """
    now = time.time()
    count = len(shown) if waiting is None else waiting
    tabs = tag(
        "nav",
        {"aria-label": "Approvals"},
        tag(
            "ul",
            None,
            [
                tag(
                    "li",
                    None,
                    tag(
                        "a",
                        {
                            "href": f"{BASE}/approvals{query}",
                            "aria-current": "page" if on else None,
                        },
                        label,
                    ),
                )
                for query, label, on in (
                    ("", f"Waiting ({count})", not history),
                    ("?show=history", "History", history),
                )
            ],
        ),
    )
    if history:
        section: Child = [tag("h2", None, "History"), _history_table(shown)]
    else:
        section = [
            tag("h2", None, f"Waiting ({count})"),
            [_approval_card(a, csrf, who, now) for a in shown]
            or tag("p", None, "Nothing is waiting for a decision."),
        ]
    return join(
        [
            tag("p", {"class": "notice", "role": "status"}, message) if message else None,
            tabs,
            section,
            _pager("?show=history&" if history else "?", first, next_after),
        ]
    )


def _history_table(ended: Sequence[Approval]) -> Html:
    rows = [
        tag(
            "tr",
            None,
            tag("td", None, _when(a.decided_at or a.created_at)),
            tag("td", None, a.agent_id),
            tag("td", None, a.tool or ""),
            tag(
                "td",
                None,
                tag("span", {"class": f"status status-{a.status.value}"}, a.status.value),
            ),
            tag(
                "td",
                None,
                ", ".join(
                    f"{v.subject}: {'approved' if v.approve else 'rejected'}" for v in a.votes
                ),
            ),
            tag("td", None, a.comment),
        )
        for a in ended
    ]
    return tag(
        "table",
        {"aria-label": "Approval history"},
        tag(
            "thead",
            None,
            tag(
                "tr",
                None,
                [
                    tag("th", {"scope": "col"}, h)
                    for h in ("When", "Agent", "Tool", "Status", "Votes", "Comment")
                ],
            ),
        ),
        tag("tbody", None, rows),
    )


def _pager(base: str, first: bool, next_after: str | None) -> Html | None:
    """Links to the first page and to the next, when there are. The next starts after
    the last approval shown (``after=``, URL-safe as the route writes it), not at a
    page number: approvals decided meanwhile would shift every page after them."""
    if first and next_after is None:
        return None
    home = f"{BASE}/approvals{base.rstrip('?&')}"
    links = [
        None if first else tag("a", {"href": home, "rel": "first"}, "First page"),
        None
        if next_after is None
        else tag("a", {"href": f"{BASE}/approvals{base}after={next_after}", "rel": "next"}, "Next"),
    ]
    return tag("nav", {"aria-label": "Pages", "class": "pager"}, links)


# -- Evidence ---------------------------------------------------------------------------


def evidence_view(
    q: IndexQuery,
    kind: str,
    results: Page | None,
    *,
    csrf: str,
    who: Principal,
    message: str = "",
    empty: Mapping[str, str] | None = None,
) -> Html:
    """Record search, evidence-package download and (for admins) erasure.

    ``empty``: the period (``from``, ``to``, ``export_agent``) of a package asked
    for that would hold no records: said, with a button to download it anyway.
    """
    kinds = [
        ("", "any"),
        ("decision", "decision"),
        ("outcome", "outcome"),
        ("approval_decided", "approval decided"),
        ("approval_requested", "approval requested"),
        ("kill_switch", "kill switch"),
    ]
    table: Child = None
    if results is not None:
        table = tag(
            "table",
            {"aria-label": "Records found"},
            tag(
                "thead",
                None,
                tag(
                    "tr",
                    None,
                    [
                        tag("th", {"scope": "col"}, h)
                        for h in ("#", "Time (UTC)", "Kind", "Agent", "Tool", "Effect", "Record")
                    ],
                ),
            ),
            tag(
                "tbody",
                None,
                [
                    tag(
                        "tr",
                        None,
                        tag("td", None, r.seq),
                        tag("td", None, r.time[:19].replace("T", " ")),
                        tag("td", None, r.kind),
                        tag("td", None, r.agent or ""),
                        tag("td", None, r.tool or ""),
                        tag("td", None, r.effect or ""),
                        tag(
                            "td", None, tag("a", {"href": f"{BASE}/evidence/records/{r.seq}"}, r.id)
                        ),
                    )
                    for r in results.rows
                ],
            ),
        )
    erase: Child = None
    if "admin" in who.roles:
        erase = tag(
            "section",
            {"aria-label": "Erasure"},
            tag("h2", None, "Erasure request"),
            tag(
                "p",
                {"class": "hint"},
                "Destroys one data subject's key: their personal fields become unreadable; "
                "every hash and checkpoint still verifies.",
            ),
            tag(
                "form",
                {"method": "post", "action": f"{BASE}/evidence/erase"},
                csrf_field(csrf),
                _field("Subject (customer id)", "subject", "", required=True, maxlength=256),
                tag("button", {"type": "submit"}, "Erase subject"),
            ),
        )
    return join(
        [
            tag("p", {"class": "notice", "role": "status"}, message) if message else None,
            tag(
                "form",
                {
                    "method": "get",
                    "action": f"{BASE}/evidence",
                    "role": "search",
                    "class": "filters",
                },
                _field(
                    "Search", "q", q.text, placeholder="record id, decision id or words of a reason"
                ),
                _select("Kind", "kind", kinds, kind),
                _field("Agent", "agent", q.agent),
                _field("Tool", "tool", q.tool),
                tag("button", {"type": "submit"}, "Search records"),
            ),
            table,
            tag("p", None, "No records match.")
            if results is not None and not results.rows
            else None,
            _older_records(q, kind, results),
            tag(
                "section",
                {"aria-label": "Evidence package"},
                tag("h2", None, "Evidence package"),
                tag(
                    "p",
                    {"class": "hint"},
                    "Records of the period with their inclusion proofs, the signed checkpoint "
                    "and a standalone verifier, as a zip file.",
                ),
                tag(
                    "p",
                    {"class": "hint", "id": "period-zone"},
                    "Dates are days in UTC, as the records' times are: From starts at 00:00 "
                    "UTC, and To runs to the end of that day (24:00 UTC).",
                ),
                _empty_export(empty, csrf) if empty is not None else None,
                tag(
                    "form",
                    {"method": "post", "action": f"{BASE}/evidence/export"},
                    csrf_field(csrf),
                    _field(
                        "From",
                        "from",
                        (empty or {}).get("from", ""),
                        type="date",
                        required=True,
                        aria_describedby="period-zone",
                    ),
                    _field(
                        "To",
                        "to",
                        (empty or {}).get("to", ""),
                        type="date",
                        required=True,
                        aria_describedby="period-zone",
                    ),
                    _field("Agent (optional)", "export_agent", (empty or {}).get("export_agent")),
                    tag("button", {"type": "submit"}, "Download evidence package"),
                ),
            ),
            erase,
        ]
    )


def _empty_export(period: Mapping[str, str], csrf: str) -> Html:
    """No records in the period asked for: said, and the empty package offered anyway."""
    agent = period.get("export_agent") or ""
    whose = f" for agent {agent}" if agent else ""
    return tag(
        "div",
        {"class": "notice", "role": "status", "aria-label": "Empty period"},
        tag(
            "p",
            None,
            f"No records from {period.get('from')} to {period.get('to')} (UTC days){whose}: "
            "the package would hold none, so none was downloaded. Check the dates and the "
            "agent, or download the empty package to show there were none.",
        ),
        tag(
            "form",
            {"method": "post", "action": f"{BASE}/evidence/export"},
            csrf_field(csrf),
            [
                tag("input", {"type": "hidden", "name": name, "value": period.get(name, "")})
                for name in ("from", "to", "export_agent")
            ],
            tag("input", {"type": "hidden", "name": "empty", "value": "ok"}),
            tag("button", {"type": "submit"}, "Download the empty package"),
        ),
    )


def _older_records(q: IndexQuery, kind: str, results: Page | None) -> Html | None:
    """The link to the next (older) page of a search, as Decisions has."""
    if results is None or (results.next_before is None and q.before is None):
        return None
    keep = [("q", q.text), ("kind", kind), ("agent", q.agent), ("tool", q.tool)]
    query = urllib.parse.urlencode([(k, v) for k, v in keep if v])
    sep = "&" if query else ""
    links: list[Child] = []
    if q.before is not None:
        links.append(tag("a", {"href": f"{BASE}/evidence?{query}", "rel": "first"}, "Newest"))
    if results.next_before is not None:
        href = f"{BASE}/evidence?{query}{sep}before={results.next_before}"
        links.append(tag("a", {"href": href, "rel": "next"}, "Older records"))
    return tag("nav", {"aria-label": "Pages", "class": "pager"}, links)


def record_view(record_json: str, seq: int) -> Html:
    """One record as stored, and its inclusion proof, verified by the page's script."""
    return join(
        [
            tag("pre", {"class": "json", "aria-label": "Record"}, lines(record_json)),
            tag(
                "section",
                {
                    "class": "proof",
                    "aria-label": "Inclusion proof",
                    "data-proof": f"{BASE}/api/proof/{seq}",
                },
                tag("h2", None, "Inclusion proof"),
                tag(
                    "p",
                    {"id": "proof-status", "role": "status", "class": "pending"},
                    "Checking the proof in this page…",
                ),
                tag("pre", {"id": "proof-detail", "class": "json"}, ""),
            ),
        ]
    )


# -- Model risk -------------------------------------------------------------------------


def model_risk_view(
    revisions: Sequence[Revision], drift: Child, challenger: ChallengerStats | None = None
) -> Html:
    """Drift and quality per agent (or an honest empty state), revisions, challenger."""
    return join(
        [
            tag(
                "section",
                {"aria-label": "Drift and quality"},
                tag("h2", None, "Drift and quality per agent"),
                drift,
            ),
            tag(
                "section",
                {"aria-label": "Policy revisions"},
                tag("h2", None, "Policy revisions"),
                tag(
                    "table",
                    {"aria-label": "Policy revisions"},
                    tag(
                        "thead",
                        None,
                        tag(
                            "tr",
                            None,
                            [
                                tag("th", {"scope": "col"}, h)
                                for h in (
                                    "Revision",
                                    "Decisions",
                                    "Denials",
                                    "First seen (UTC)",
                                    "Last seen (UTC)",
                                )
                            ],
                        ),
                    ),
                    tag(
                        "tbody",
                        None,
                        [
                            tag(
                                "tr",
                                None,
                                tag("td", None, r.revision),
                                tag("td", None, r.decisions),
                                tag("td", None, r.denials),
                                tag("td", None, _utc(r.first)),
                                tag("td", None, _utc(r.last)),
                            )
                            for r in revisions
                        ],
                    ),
                ),
            ),
            tag(
                "section",
                {"aria-label": "Challenger divergence"},
                tag("h2", None, "Challenger divergence"),
                _challenger(challenger),
            ),
        ]
    )


def _challenger(stats: ChallengerStats | None) -> Html:
    if stats is None:
        return tag(
            "p",
            {"class": "empty"},
            "Not configured: no challenger policy runs beside the active one.",
        )
    summary = tag(
        "p",
        None,
        f"Challenger revision {stats.revision or 'unknown'}: {stats.evaluated} decisions "
        f"evaluated, {stats.diverged} diverged ({stats.divergence_rate:.1%}), "
        f"{stats.dropped} dropped.",
    )
    changes = tag(
        "table",
        {"aria-label": "Divergence by change"},
        tag("thead", None, tag("tr", None, tag("th", None, "Change"), tag("th", None, "Count"))),
        tag(
            "tbody",
            None,
            [
                tag("tr", None, tag("td", None, change), tag("td", None, count))
                for change, count in sorted(stats.changes.items())
            ],
        ),
    )
    recent = tag(
        "table",
        {"aria-label": "Recent divergences"},
        tag(
            "thead",
            None,
            tag(
                "tr",
                None,
                [tag("th", None, h) for h in ("Decision", "Agent", "Tool", "Active", "Challenger")],
            ),
        ),
        tag(
            "tbody",
            None,
            [
                tag(
                    "tr",
                    None,
                    tag("td", None, d.decision_id),
                    tag("td", None, d.agent),
                    tag("td", None, d.tool or ""),
                    # The mode too: deny (observe) lets the action through.
                    tag(
                        "td",
                        None,
                        result_label(d.champion_effect, d.champion_mode, d.challenger_mode),
                    ),
                    tag(
                        "td",
                        None,
                        result_label(d.challenger_effect, d.challenger_mode, d.champion_mode),
                    ),
                )
                for d in reversed(stats.recent)
            ],
        ),
    )
    return join([summary, changes, recent])


# -- Operations -------------------------------------------------------------------------


def health_problems(ready: bool, detail: Mapping[str, Any]) -> tuple[str, list[str]]:
    """``ready``, ``degraded`` or ``not-ready``, and the failing dependencies in words.

    Readiness counts only what every decision needs (policy, audit log); a state store
    that is down leaves Warden ready but degraded (ADR 0009), and must say so.
    """
    problems: list[str] = []
    policy = _mapping(detail.get("policy"))
    audit = _mapping(detail.get("audit"))
    if policy and not policy.get("ready", True):
        error = policy.get("last_error")
        problems.append("no policy bundle is active" + (f" ({error})" if error else ""))
    if audit and not audit.get("writable", True):
        problems.append("the audit log is not writable")
    if detail.get("stopping"):
        problems.append("Warden is stopping")
    transparent = _mapping(detail.get("transparent"))
    if transparent and not transparent.get("ready", True):
        problems.append("transparent interception is not ready")
    degraded: list[str] = []
    state = _mapping(detail.get("state"))
    if state and not state.get("up", True):
        degraded.append(
            f"the state store ({state.get('backend') or 'database'}) is unreachable: "
            "until it is back, budgets and approvals follow state.on_unavailable, and kill "
            "switches thrown on other sidecars are not seen here"
        )
    ship = _mapping(audit.get("ship"))
    if ship and not ship.get("connected", True):
        degraded.append(
            f"the central audit store is unreachable ({ship.get('lag_records', '?')} "
            "records waiting to ship)"
        )
    if not ready:
        return "not-ready", problems + degraded
    return ("degraded", degraded) if degraded else ("ready", [])


def _health_section(health: tuple[bool, Mapping[str, Any]]) -> Html:
    ready, detail = health
    level, problems = health_problems(ready, detail)
    head = {"ready": "Ready", "degraded": "Degraded", "not-ready": "Not ready"}[level]
    text = f"{head}: {'; '.join(problems)}." if problems else head
    return tag(
        "section",
        {"aria-label": "Engine health"},
        tag("h2", None, "Engine health"),
        tag("p", {"class": level, "role": "status"}, text),
        tag("pre", {"class": "json"}, lines(pretty(detail))),
    )


def _switch_target(s: KillSwitch, unseen: Callable[[KillSwitch], bool]) -> Child:
    if not unseen(s):
        return s.target
    # An upstream may be a wrap's, whose decisions are in its own log: "here", not "seen".
    mark = (
        "(no such upstream here)"
        if s.scope is Scope.UPSTREAM
        else f"(no such {s.scope.value} seen)"
    )
    return [s.target, " ", tag("span", {"class": "warn"}, mark)]


def operations_view(
    switches: Sequence[KillSwitch],
    csrf: str,
    health: tuple[bool, Mapping[str, Any]],
    caps: Sequence[Mapping[str, Any]],
    message: str = "",
    *,
    spend: Sequence[CapSpend] = (),
    spend_error: str = "",
    known: Mapping[str, Sequence[str]] | None = None,
    unseen: Callable[[KillSwitch], bool] = lambda _: False,
    warning: str = "",
    timezone: str = "UTC",
) -> Html:
    """Kill switches (throw and clear, with a reason), spend against caps, engine health.

    ``known``: agent, tool and upstream names (configured or seen) the Target
    field suggests; ``unseen``: whether a switch names nothing this Warden has
    seen; ``warning``: said beside ``message`` (a switch that stops nothing yet);
    ``timezone``: ``budgets.timezone``, the zone of the spend windows.
    """
    scopes = [(s.value, s.value) for s in Scope]
    suggestions = [
        tag("option", {"value": name, "label": f"{name} ({scope})"})
        for scope, names in (known or {}).items()
        for name in names
    ]
    rows = [
        tag(
            "tr",
            None,
            tag("td", None, s.scope.value),
            tag("td", None, _switch_target(s, unseen)),
            tag("td", None, s.reason),
            tag("td", None, s.created_by),
            tag("td", None, _when(s.created_at)),
            tag(
                "td",
                None,
                tag(
                    "form",
                    {
                        "method": "post",
                        "action": f"{BASE}/operations/killswitches/{s.id}/clear",
                        "aria-label": f"Clear {s.id}",
                    },
                    csrf_field(csrf),
                    tag("label", {"for": f"clear-{s.id}"}, "Reason for clearing"),
                    tag("input", {"id": f"clear-{s.id}", "name": "reason", "maxlength": 500}),
                    tag("button", {"type": "submit"}, "Clear"),
                ),
            ),
        )
        for s in switches
    ]
    return join(
        [
            tag(
                "div",
                {"class": "notice", "role": "status"},
                tag("p", None, message) if message else None,
                tag("p", {"class": "warn"}, warning) if warning else None,
            )
            if message or warning
            else None,
            tag(
                "section",
                {"aria-label": "Kill switches"},
                tag("h2", None, f"Kill switches in force ({len(switches)})"),
                tag(
                    "table",
                    {"aria-label": "Kill switches in force"},
                    tag(
                        "thead",
                        None,
                        tag(
                            "tr",
                            None,
                            [
                                tag("th", {"scope": "col"}, h)
                                for h in ("Scope", "Target", "Reason", "By", "Since", "")
                            ],
                        ),
                    ),
                    tag("tbody", None, rows),
                ),
                tag(
                    "form",
                    {
                        "method": "post",
                        "action": f"{BASE}/operations/killswitches",
                        "class": "killswitch",
                    },
                    csrf_field(csrf),
                    _select("Scope", "scope", scopes, "agent"),
                    _field(
                        "Target",
                        "target",
                        "",
                        maxlength=200,
                        placeholder="agent, tool or upstream name",
                        list="switch-targets",
                        autocomplete="off",
                    ),
                    tag("datalist", {"id": "switch-targets"}, suggestions),
                    _field("Reason", "reason", "", required=True, maxlength=500),
                    tag("button", {"type": "submit", "class": "danger"}, "Throw kill switch"),
                ),
            ),
            _spend_section(caps, spend, spend_error, timezone),
            _health_section(health),
        ]
    )


def _amount(value: float | None, currency: str) -> str:
    return "no limit" if value is None else f"{value:,.2f} {currency}"


def _spend_section(
    caps: Sequence[Mapping[str, Any]], spend: Sequence[CapSpend], error: str, timezone: str
) -> Html:
    """Each cap's spent, reserved and limit in its current window: a table and a bar chart."""
    by_name = {str(c.get("name")): c for c in caps}
    rows = [
        tag(
            "tr",
            None,
            tag("th", {"scope": "row"}, charts.cap_label(r).split(", ", 1)[0]),
            tag("td", None, str(by_name.get(r.cap, {}).get("scope", ""))),
            tag("td", None, f"{r.window} ({timezone})"),
            tag("td", None, r.subject or "no use yet"),
            tag("td", {"class": "num"}, _amount(r.spent, r.currency)),
            tag("td", {"class": "num"}, _amount(r.reserved, r.currency)),
            tag("td", {"class": "num"}, _amount(r.limit, r.currency)),
            tag("td", {"class": "num"}, f"{r.used / r.limit:.0%}" if r.limit else "-"),
            tag("td", None, str(by_name.get(r.cap, {}).get("over", ""))),
        )
        for r in spend
    ]
    heads = (
        "Cap",
        "Applies to",
        "Window",
        "Counted for",
        "Spent",
        "Reserved",
        "Limit",
        "Used",
        "Over the limit",
    )
    if error:
        body: Child = tag("p", {"class": "not-ready", "role": "status"}, error)
    elif not caps:
        body = tag("p", {"class": "empty"}, "No caps are configured.")
    else:
        body = [
            tag(
                "table",
                {"aria-label": "Spend against caps"},
                tag(
                    "thead",
                    None,
                    tag("tr", None, [tag("th", {"scope": "col"}, h) for h in heads]),
                ),
                tag("tbody", None, rows),
            ),
            tag(
                "figure",
                None,
                charts.spend_chart(spend),
                tag(
                    "figcaption",
                    None,
                    "Against each limit: ",
                    tag("span", {"class": "key spent"}, "spent"),
                    " ",
                    tag("span", {"class": "key reserved"}, "reserved"),
                ),
            ),
        ]
    return tag(
        "section",
        {"aria-label": "Spend caps"},
        tag("h2", None, "Spend against caps"),
        body,
        tag(
            "p",
            {"class": "hint"},
            "The current window of each cap, as the state store counts it for every "
            f"sidecar: days and months are those of {timezone} (budgets.timezone). Spent is "
            "settled, reserved is held by calls still in flight, and both count against "
            "the limit.",
        ),
    )
