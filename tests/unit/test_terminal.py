"""Agent text printed on an operator's terminal cannot drive it."""

from __future__ import annotations

import io

from warden.cli_monitor import _table
from warden.terminal import plain


def test_control_and_format_characters_are_escaped_as_json_does() -> None:
    assert plain("a\x1b[2Kb\u202ec\n") == "a\\u001b[2Kb\\u202ec\\u000a"
    assert plain("line\nnext", keep="\n") == "line\nnext"
    assert plain("\U000e0001") == "\\udb40\\udc01"  # a tag character, as UTF-16 units


def test_the_monitor_table_prints_a_tool_name_that_moves_the_cursor_as_text() -> None:
    # A tool named by the model: cursor up and erase line would hide the rows above.
    out = io.StringIO()
    _table([("distribution", "level"), ("number:x\x1b]0;pwned\x07\x1b[1A\x1b[2K.a", "act")], out)
    assert "\x1b" not in out.getvalue()
    assert "\\u001b[1A" in out.getvalue()
