"""A tiny HTML builder that escapes every value it is given.

Text and attribute values are escaped by :func:`tag`; only :class:`Html`
values (built by :func:`tag`, or the fixed markup in this package) pass
through as markup. Text people read (children, and the attributes a browser
shows: ``title``, ``label``...) also has its control and format characters
written as ``\\uXXXX`` (:func:`warden.terminal.plain`): a bidi override in
an agent's argument would otherwise draw ``4401-8765`` as ``4401-5678``.
Attributes read back by the browser (``value``, ``href``, ``data-*``) keep
their text as it is, so a form or link names exactly what it showed.

There is no way to write a ``<script>`` body or an event handler attribute:
:func:`tag` refuses ``script`` bodies, ``on*`` attributes and ``style`` (the
Content-Security-Policy would block them anyway).
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping
from typing import Union

from warden.terminal import plain

__all__ = ["Child", "Html", "esc", "join", "lines", "tag"]


class Html(str):
    """Markup that is already safe: inserted as is by :func:`tag`."""

    __slots__ = ()


Child = Union[Html, str, int, float, None, Iterable["Child"]]  # noqa: UP007 - recursive alias

_VOID = frozenset({"br", "hr", "input", "img", "meta", "link", "col", "rect", "line", "circle"})
_SHOWN = frozenset({"title", "alt", "label", "placeholder", "aria-label", "aria-description"})
"""Attributes a browser shows people (or reads to them): escaped as text is."""


def esc(value: object) -> Html:
    """``value`` as text: control and format characters as ``\\uXXXX`` (line breaks
    too), then ``<``, ``>``, ``&`` and both quotes escaped."""
    return Html(html.escape(plain(value), quote=True))


def lines(text: str) -> Html:
    """A document Warden laid out on several lines (pretty JSON, for a ``<pre>``):
    escaped as :func:`esc` does, its line breaks kept."""
    return Html(html.escape(plain(text, keep="\n"), quote=True))


def _attr(value: object) -> str:
    # Read back by the browser (a form's value, a link): the text itself, markup escaped.
    return html.escape(str(value), quote=True)


def _render(child: Child) -> str:
    if child is None or child is False:
        return ""
    if isinstance(child, Html):
        return child
    if isinstance(child, str | int | float):
        return esc(child)
    return "".join(_render(c) for c in child)


def join(children: Iterable[Child]) -> Html:
    """Children side by side, escaped where they are text."""
    return Html(_render(list(children)))


def tag(
    name: str, attrs: Mapping[str, object] | None = None, *children: Child, void: bool = False
) -> Html:
    """``<name attrs>children</name>``; attribute values and text children are escaped.

    An attribute whose value is ``None`` or ``False`` is left out; ``True``
    writes the bare name (``disabled``).
    """
    if name == "script" and children:
        raise ValueError("inline script is not allowed: ship it as a static file")
    parts = [name]
    for given, value in (attrs or {}).items():
        key = given.rstrip("_").replace("_", "-")
        if key.startswith("on") or key == "style":
            raise ValueError(f"attribute {key!r} is not allowed (CSP forbids inline code)")
        if value is None or value is False:
            continue
        if value is True:
            parts.append(key)
        else:
            parts.append(f'{key}="{esc(value) if key in _SHOWN else _attr(value)}"')
    head = "<" + " ".join(parts)
    if void or (name in _VOID and not children):
        return Html(head + "/>")  # self-closed: inline SVG needs it, HTML allows it
    return Html(head + ">" + _render(list(children)) + f"</{name}>")
