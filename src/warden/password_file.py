"""A database password read from a file (``password_file``, ``--password-file``).

One reading for every place that takes one: the first line, and errors that
name the setting and the file, never the text (a decoder's message quotes a
byte of what it could not decode).
"""

from __future__ import annotations

from pathlib import Path

from warden.errors import ConfigError

__all__ = ["read_password_file"]


def read_password_file(path: str, setting: str) -> str:
    """The first line of ``path``, or :class:`ConfigError` starting with ``setting``
    when the file cannot be read, is not UTF-8 text, or is empty."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{setting}: cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{setting}: {path} is not UTF-8 text") from None
    if not text.strip():
        raise ConfigError(f"{setting}: {path} is empty")
    return text.splitlines()[0]
