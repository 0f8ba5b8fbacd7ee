"""``$WARDEN_TOKEN`` as the admin commands send it: trimmed, checked, never printed.

No sockets: the opener is replaced, and what it would have sent is looked at.
"""

from __future__ import annotations

import urllib.request
from typing import Any

import pytest

from warden import cli, cli_admin
from warden.cli_admin import AdminApiError, admin_request

SECRET = "s3cret-token-value"


class _Answer:
    def __init__(self, body: bytes) -> None:
        self._body = body

    def __enter__(self) -> _Answer:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def read(self) -> bytes:
        return self._body


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[urllib.request.Request]:
    """The requests the admin commands would have sent; each is answered ``[]``."""
    requests: list[urllib.request.Request] = []

    def fake_open(req: urllib.request.Request, timeout: float) -> _Answer:
        requests.append(req)
        return _Answer(b'{"approvals": [], "killswitches": []}')

    monkeypatch.setattr(cli_admin._OPENER, "open", fake_open)
    return requests


@pytest.mark.parametrize("pasted", [f"{SECRET}\r", f"{SECRET}\n", f"  {SECRET}\r\n"])
def test_blanks_around_the_token_are_dropped(
    pasted: str, sent: list[urllib.request.Request], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WARDEN_TOKEN", pasted)
    admin_request("GET", "/v1/killswitches")
    assert sent[0].get_header("Authorization") == f"Bearer {SECRET}"


@pytest.mark.parametrize(
    "bad", [f"{SECRET}\rX", f"{SECRET}\x7f", f"{SECRET}\u00e9", "a\nb", "a\tb"]
)
def test_a_token_a_header_cannot_carry_is_refused_unshown(
    bad: str, sent: list[urllib.request.Request], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WARDEN_TOKEN", bad)
    with pytest.raises(AdminApiError) as caught:
        admin_request("GET", "/v1/killswitches")
    assert caught.value.status == 0
    assert "WARDEN_TOKEN" in str(caught.value)
    assert SECRET not in str(caught.value)
    assert not sent


def test_approvals_list_with_a_carriage_return_in_the_token_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The reported case, against nothing listening: no traceback, no token.
    monkeypatch.setenv("WARDEN_TOKEN", f"{SECRET}\rmore")
    monkeypatch.setenv("WARDEN_ADMIN_URL", "http://127.0.0.1:9")
    assert cli.main(["approvals", "list"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("warden: WARDEN_TOKEN holds a control")
    assert SECRET not in err


def test_a_value_error_while_sending_is_an_admin_api_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WARDEN_TOKEN", SECRET)

    def refuses(req: urllib.request.Request, timeout: float) -> Any:
        # What http.client raises for a header it will not send: it quotes the value.
        raise ValueError(f"Invalid header value b'Bearer {SECRET}'")

    monkeypatch.setattr(cli_admin._OPENER, "open", refuses)
    with pytest.raises(AdminApiError) as caught:
        admin_request("GET", "/v1/approvals")
    assert caught.value.status == 0
    assert SECRET not in str(caught.value)


def test_a_malformed_admin_url_is_an_admin_api_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WARDEN_TOKEN", SECRET)
    with pytest.raises(AdminApiError, match="is not a URL"):
        admin_request("GET", "/v1/approvals", base_url="http://[::1")


def test_an_answer_that_is_not_json_is_an_admin_api_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WARDEN_TOKEN", SECRET)
    monkeypatch.setattr(
        cli_admin._OPENER, "open", lambda req, timeout: _Answer(b"<html>a proxy</html>")
    )
    with pytest.raises(AdminApiError, match="did not answer JSON"):
        admin_request("GET", "/v1/approvals")
