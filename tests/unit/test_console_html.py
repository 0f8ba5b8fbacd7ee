"""The console's HTML builder escapes every value and refuses inline code."""

from __future__ import annotations

import pytest

from warden.console.html import Html, esc, join, tag


def test_text_and_attribute_values_are_escaped() -> None:
    out = tag("p", {"title": '"><img src=x onerror=alert(1)>'}, "<script>alert(1)</script>")
    assert "<script>" not in out
    assert "<img" not in out
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in out
    assert 'title="&quot;&gt;&lt;img src=x onerror=alert(1)&gt;"' in out


def test_markup_passes_through_and_nested_children_flatten() -> None:
    inner = tag("b", None, "x & y")
    out = tag("div", None, [inner, ["a", None, 3]])
    assert out == "<div><b>x &amp; y</b>a3</div>"
    assert isinstance(join(["<", Html("<i>")]), Html)
    assert join(["<", Html("<i>")]) == "&lt;<i>"


def test_boolean_and_missing_attributes() -> None:
    assert tag("input", {"disabled": True, "value": None, "checked": False}) == "<input disabled/>"


def test_inline_script_event_handlers_and_style_are_refused() -> None:
    with pytest.raises(ValueError, match="inline script"):
        tag("script", None, "alert(1)")
    with pytest.raises(ValueError, match="onclick"):
        tag("a", {"onclick": "x()"}, "go")
    with pytest.raises(ValueError, match="style"):
        tag("p", {"style": "color: red"}, "x")
    assert tag("script", {"src": "/console/static/console.js"}) == (
        '<script src="/console/static/console.js"></script>'
    )


def test_esc_quotes_both_kinds() -> None:
    assert esc("'\"") == "&#x27;&quot;"
