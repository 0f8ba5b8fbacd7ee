"""URLs as Warden shows them: with the credentials they may carry masked.

A configured URL can carry a secret: a password in its authority
(``https://user:pass@host``), or a token, key or presigned signature in its
query. Warden sends such a URL as given, but logs, errors, status pages,
spans and audit records only ever see :func:`shown_url`'s form, and error
texts from HTTP clients, which may quote the URL, pass through :func:`scrub`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from urllib.parse import parse_qsl, unquote_plus, urlencode, urlsplit, urlunsplit

__all__ = ["scrub", "shown_url", "url_secrets"]

MASK = "***"
_MIN_SCRUBBED = 4
"""Shorter query values (``v=2``) are not scrubbed from messages: every "2" would go."""


def _every(_name: str) -> bool:
    return True


def _userinfo(url: str) -> tuple[str, str, str] | None:
    """``url`` as (scheme and ``//``, user info, the rest), when its authority has user info.

    The authority is read up to the first ``/``, not the first ``?`` or ``#``:
    libpq takes both as characters of a password (``postgresql://u:p?w@db``),
    where ``urlsplit`` would end the authority inside it and show the rest.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return None
    end = rest.find("/")
    authority = rest if end < 0 else rest[:end]
    if "@" not in authority:
        return None
    userinfo, _, host = authority.rpartition("@")
    return f"{scheme}://", userinfo, host + ("" if end < 0 else rest[end:])


def shown_url(url: str, *, masked: Callable[[str], bool] = _every) -> str:
    """``url`` with its password and the query values ``masked`` names (all) as ``***``.

    A database URL passes ``masked=is_credential_key``, so that libpq options
    such as ``sslmode`` stay readable while ``password`` and ``sslpassword`` go.
    """
    split = _userinfo(url)
    if split is not None:
        head, userinfo, rest = split
        user = userinfo.split(":", 1)[0]
        url = f"{head}{user}:{MASK}@{rest}" if ":" in userinfo else f"{head}{user}@{rest}"
    parts = urlsplit(url)
    netloc = parts.netloc
    query = parts.query
    if query:
        pairs = [(k, MASK if masked(k) else v) for k, v in parse_qsl(query, keep_blank_values=True)]
        query = urlencode(pairs, safe="*/")
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def url_secrets(url: str, *, masked: Callable[[str], bool] = _every) -> list[str]:
    """What :func:`shown_url` masks in ``url``, as written and as decoded, to :func:`scrub`.

    The password always; a masked query value when it is long enough to be told
    apart in a message.
    """
    parts = urlsplit(url)
    raw = []
    for pair in parts.query.split("&"):
        name, _, value = pair.partition("=")
        if masked(unquote_plus(name)) and len(value) >= _MIN_SCRUBBED:
            raw.append(value)
    split = _userinfo(url)
    if split is not None and ":" in split[1]:
        raw.append(split[1].split(":", 1)[1])
    # Longest first, so a secret that contains another is masked whole.
    forms = {form for value in raw if value for form in (value, unquote_plus(value))}
    return sorted(forms, key=len, reverse=True)


def scrub(text: str, secrets: Sequence[str]) -> str:
    """``text`` (an error message) with each of ``secrets`` replaced by ``***``."""
    for secret in secrets:
        text = text.replace(secret, MASK)
    return text
