"""Approval webhooks: bodies, signatures, retries with backoff, failures counted."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiohttp import web
from prometheus_client import REGISTRY

from warden.approvals import Approval, ApprovalSettings
from warden.approvals.notify import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    Delivery,
    Notifier,
    render,
    sign,
    verify_signature,
)

SECRET = "whsec-test"


def approval() -> Approval:
    now = time.time()
    return Approval(
        id="apr_1",
        decision_id="dec_1",
        action_id="act_1",
        agent_id="refunds-bot",
        tool="issue_refund",
        arguments={"amount": 10, "note": "<b>&</b>"},
        arguments_sha256="ab" * 32,
        binding="cd" * 32,
        mode="hold",
        reason="refunds over 5 need a person",
        created_at=now,
        expires_at=now + 120,
        risk="high",
        upstream="payments",
        method="POST",
    )


class Receiver:
    """A loopback webhook receiver that fails the first ``fail`` requests."""

    def __init__(self, fail: int = 0, status: int = 503) -> None:
        self.fail = fail
        self.status = status
        self.seen: list[tuple[bytes, dict[str, str]]] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append((await request.read(), dict(request.headers)))
        if len(self.seen) <= self.fail:
            return web.Response(status=self.status)
        return web.Response(status=204)


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    rec = Receiver(fail=2)
    app = web.Application()
    app.router.add_post("/hook", rec.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield rec, f"http://127.0.0.1:{port}/hook"
    await runner.cleanup()


def counter(result: str) -> float:
    value = REGISTRY.get_sample_value("warden_approval_notifications_total", {"result": result})
    return value or 0.0


def test_signature_is_hmac_sha256_of_the_body() -> None:
    body = b'{"event":"approval.requested"}'
    signature = sign(SECRET, body)
    assert signature.startswith("sha256=")
    assert len(signature) == 7 + 64
    assert verify_signature(SECRET, body, signature)
    assert not verify_signature(SECRET, body + b" ", signature)
    assert not verify_signature("other", body, signature)


def test_json_and_slack_bodies() -> None:
    generic = render("approval.requested", approval(), "json", 1795747200)
    assert generic["event"] == "approval.requested"
    assert generic["timestamp"] == 1795747200
    assert generic["approval"]["agent"] == "refunds-bot"
    assert generic["approval"]["arguments"] == {"amount": 10, "note": "<b>&</b>"}
    slack = render("approval.approved", approval(), "slack", 1795747200)
    assert "`issue_refund` by agent `refunds-bot` to `payments`" in slack["text"]
    assert (generic["approval"]["upstream"], generic["approval"]["method"]) == ("payments", "POST")
    assert "apr_1" in slack["text"]
    assert slack["blocks"][0]["type"] == "section"
    text = orjson.dumps(slack["blocks"]).decode()
    assert "&lt;b&gt;&amp;&lt;/b&gt;" in text  # mrkdwn control characters escaped


def test_hidden_values_are_named_and_their_digest_withheld() -> None:
    # The agent can put what matters under a credential-like key; whoever approves
    # from Slack is told what they cannot see. The plain digest of arguments with a
    # hidden value would let the channel test guesses of it (a 4-digit PIN).
    shown = render("approval.requested", approval(), "slack", 1795747200)
    assert "args sha256 abababababababab" in orjson.dumps(shown).decode()
    hidden = dataclasses.replace(
        approval(),
        arguments={"amount": 10, "card_pin": "[redacted]"},
        redacted=("/card_pin", "customer.dob"),
    )
    slack = render("approval.requested", hidden, "slack", 1795747200)
    text = orjson.dumps(slack).decode()
    assert "*Hidden from you:* `/card_pin`, `/customer/dob`" in text
    assert "sha256" not in text
    generic = render("approval.requested", hidden, "json", 1795747200)
    assert generic["approval"]["arguments_sha256"] is None
    assert generic["approval"]["redacted"] == ["/card_pin", "customer.dob"]


def test_the_slack_message_cannot_be_shaped_by_the_agent() -> None:
    # A value cannot close the code block and write its own mrkdwn ("Approved by
    # cfo"), and padding sent first cannot push a field past the cut.
    forged = dataclasses.replace(
        approval(),
        arguments={"memo": "x" * 3000 + "```*Approved by cfo*```", "iban": "ATTACKER-IBAN"},
    )
    slack = render("approval.requested", forged, "slack", 1795747200)
    code = slack["blocks"][2]["text"]["text"]
    assert code.count("```") == 2  # the block's own opening and closing only
    assert "ATTACKER-IBAN" in code  # sorted: "iban" before "memo"
    assert "cut: see every argument in the console" in code


def test_names_and_reasons_the_agent_chose_cannot_write_mrkdwn_or_lines() -> None:
    # A tool name that closes its inline code and writes its own text and link, a
    # hidden path adding a fake "Risk: none" line, a reason long enough that Slack
    # would refuse the section (and nobody would be asked).
    forged = dataclasses.replace(
        approval(),
        tool="issue_refund` :white_check_mark: *verified safe* https://evil.example/ok `x",
        arguments={"amount": 10, "password": "[redacted]"},
        redacted=("/password`\n*Risk:* none - pre-approved by Security `",),
        reason="refund 10\n*Risk:* none " + "r" * 5000,
    )
    slack = render("approval.requested", forged, "slack", 1795747200)
    headline = slack["blocks"][0]["text"]["text"]
    details = slack["blocks"][1]["text"]["text"]
    assert headline.count("`") == 6  # tool, agent, upstream: three spans, as written
    assert "\n" not in headline
    assert [line.split(":*")[0] for line in details.split("\n")] == [
        "*Reason",
        "*Hidden from you",
        "*Risk",
    ]
    assert details.split("\n")[2] == "*Risk:* high"
    assert len(details) < 1000
    assert all(b["text"].get("verbatim") for b in slack["blocks"][:3])


def test_every_section_fits_slacks_limit_once_escaped() -> None:
    # "&" is five characters once escaped: cut before, a section passed 3,000 and
    # Slack refused the message (nobody was asked).
    ampersands = dataclasses.replace(
        approval(),
        arguments={"memo": "&" * 5000},
        redacted=tuple(f"/password{i}" + "&" * 200 for i in range(12)),
        reason="&" * 5000,
        comment="<" * 5000,
    )
    slack = render("approval.requested", ampersands, "slack", 1795747200)
    for block in slack["blocks"][:3]:
        text = block["text"]["text"]
        assert len(text) <= 3000
        assert not text.rstrip("…`\n").endswith(("&", "&a", "&am", "&amp", "&l", "&lt"))


def test_an_mcp_retrys_answers_follow_the_arguments_and_cannot_cut_them() -> None:
    # The answers are the client's text: however long, the amount still shows.
    answered = dataclasses.replace(
        approval(), answers={"ask": {"action": "accept", "content": {"note": "y" * 3000}}}
    )
    slack = render("approval.requested", answered, "slack", 1795747200)
    code = slack["blocks"][2]["text"]["text"]
    assert code.index('"amount": 10') < code.index("answers:")
    assert "cut: see every argument in the console" in code
    # Nor can padded arguments push the answers out.
    padded = dataclasses.replace(
        answered,
        arguments={"memo": "z" * 3000},
        answers={"ask": {"action": "accept", "content": {"amount": 950}}},
    )
    code = render("approval.requested", padded, "slack", 1795747200)["blocks"][2]["text"]["text"]
    assert '"amount": 950' in code
    generic = render("approval.requested", answered, "json", 1795747200)
    assert generic["approval"]["answers"] == answered.answers


async def test_delivery_retries_with_backoff_and_is_signed(
    receiver: tuple[Receiver, str],
) -> None:
    rec, url = receiver
    results: list[Delivery] = []

    async def on_result(d: Delivery) -> None:
        results.append(d)

    settings = ApprovalSettings(webhook_url=url, webhook_secret=SECRET, webhook_backoff_s=0.05)
    notifier = Notifier(settings, on_result)
    ok_before = counter("ok")
    started = time.monotonic()
    notifier.notify("approval.requested", approval())
    await notifier.drain(5)
    elapsed = time.monotonic() - started
    await notifier.close()
    assert len(rec.seen) == 3
    assert elapsed >= 0.05 + 0.1  # backoff 0.05 then 0.1
    body, headers = rec.seen[-1]
    assert verify_signature(SECRET, body, headers[SIGNATURE_HEADER])
    assert orjson.loads(body)["timestamp"] == int(headers[TIMESTAMP_HEADER])
    assert results == [Delivery("approval.requested", "apr_1", "dec_1", True, 3, 204, None)]
    assert counter("ok") == ok_before + 1


async def test_delivery_gives_up_after_the_last_try(receiver: tuple[Receiver, str]) -> None:
    rec, url = receiver
    rec.fail = 99
    results: list[Delivery] = []

    async def on_result(d: Delivery) -> None:
        results.append(d)

    settings = ApprovalSettings(webhook_url=url, webhook_tries=2, webhook_backoff_s=0.01)
    notifier = Notifier(settings, on_result)
    failed_before = counter("failed")
    notifier.notify("approval.expired", approval())
    await notifier.drain(5)
    await notifier.close()
    assert len(rec.seen) == 2
    assert SIGNATURE_HEADER not in rec.seen[0][1]  # no secret configured: unsigned
    (result,) = results
    assert not result.ok
    assert result.attempts == 2
    assert result.error == "HTTP 503"
    assert counter("failed") == failed_before + 1


async def test_a_refusing_receiver_is_not_retried(receiver: tuple[Receiver, str]) -> None:
    rec, url = receiver
    rec.fail, rec.status = 99, 400
    notifier = Notifier(ApprovalSettings(webhook_url=url, webhook_backoff_s=0.01))
    notifier.notify("approval.rejected", approval())
    await notifier.drain(5)
    await notifier.close()
    assert len(rec.seen) == 1


async def test_an_unreachable_receiver_does_not_raise() -> None:
    results: list[Any] = []

    async def on_result(d: Delivery) -> None:
        results.append(d)

    # Port 9 on loopback: connection refused at once.
    settings = ApprovalSettings(
        webhook_url="http://127.0.0.1:9/hook", webhook_tries=2, webhook_backoff_s=0.01
    )
    notifier = Notifier(settings, on_result)
    notifier.notify("approval.requested", approval())
    await notifier.drain(5)
    await notifier.close()
    assert results[0].ok is False
    assert results[0].status is None


async def test_a_failed_delivery_never_records_the_webhook_url() -> None:
    """A webhook URL is a secret (Slack's path is its token); client errors quoting it are scrubbed.

    The receiver answers with bytes that are not HTTP, so the client's error
    names the URL it was posting to.
    """

    async def not_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1024)
        writer.write(b"SSH-2.0-not-http\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(not_http, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    results: list[Delivery] = []

    async def on_result(d: Delivery) -> None:
        results.append(d)

    secret = "/services/T0001/B0002/XyZsecretTokenValue"
    settings = ApprovalSettings(
        webhook_url=f"http://127.0.0.1:{port}{secret}?sig=qs-s3cret", webhook_tries=1
    )
    notifier = Notifier(settings, on_result)
    notifier.notify("approval.requested", approval())
    await notifier.drain(5)
    await notifier.close()
    server.close()
    await server.wait_closed()
    [delivery] = results
    assert delivery.ok is False
    assert delivery.error is not None
    assert "XyZsecretTokenValue" not in delivery.error
    assert "qs-s3cret" not in delivery.error
