"""``data.yaml`` as a bundle reads it: safe YAML without aliases.

An alias (``*name``) repeats the anchored node without copying it, so a few
hundred bytes of aliases of aliases stand for gigabytes once hashed for the
signature check or encoded for the engine: a file in the bundle store would
exhaust the proxy's memory before its digest is ever compared. Bundle data
is written out in full (or as ``data.json``); anchors alone are harmless.
"""

from __future__ import annotations

from typing import Any

import yaml

__all__ = ["load_data_yaml"]


class _DataLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing aliases."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]
            raise yaml.composer.ComposerError(
                None, None, "aliases (*name) are not allowed in bundle data", event.start_mark
            )
        return super().compose_node(parent, index)


def load_data_yaml(body: bytes | str) -> Any:
    """The value of one YAML document; raises :class:`yaml.YAMLError` (aliases included)."""
    return yaml.load(body, Loader=_DataLoader)  # noqa: S506 - a SafeLoader subclass
