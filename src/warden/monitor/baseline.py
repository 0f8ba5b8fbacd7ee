"""Pinned drift baselines: a reference saved once and compared against from then on.

``warden monitor baseline`` saves the profiles of a window (typically the
weeks an agent version was approved on) to a JSON file; ``warden monitor
drift --baseline FILE`` and ``monitor.baseline`` use it as the reference
instead of the previous N days. The file holds only counts and bin edges,
never arguments or record contents.
"""

from __future__ import annotations

import datetime as dt
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from warden.monitor.drift import Profile
from warden.monitor.windows import Window, parse_instant

__all__ = ["FORMAT", "Baseline", "load_baseline", "save_baseline"]

FORMAT = "warden.drift-baseline/1"


@dataclass(frozen=True, slots=True)
class Baseline:
    """Profiles pinned from one window, with where and when they were taken."""

    window: Window
    created: str
    source: str
    profiles: Mapping[tuple[str, str], Profile]

    def as_dict(self) -> dict[str, Any]:
        """The file's JSON form."""
        return {
            "format": FORMAT,
            "created": self.created,
            "source": self.source,
            "window": self.window.as_dict(),
            "profiles": [p.as_dict() for _, p in sorted(self.profiles.items())],
        }


def save_baseline(
    path: Path | str, profiles: Mapping[tuple[str, str], Profile], window: Window, source: str
) -> Baseline:
    """Write a baseline file atomically (a reader never sees half of it)."""
    created = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    baseline = Baseline(window, created, source, dict(profiles))
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".baseline-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(orjson.dumps(baseline.as_dict(), option=orjson.OPT_INDENT_2))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return baseline


def load_baseline(path: Path | str) -> Baseline:
    """Read a baseline file; ``ValueError`` with the reason when it is not one."""
    try:
        doc = orjson.loads(Path(path).read_bytes())
    except OSError as exc:
        raise ValueError(f"cannot read the baseline {path}: {exc.strerror or exc}") from None
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"the baseline {path} is not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"{path} is not a drift baseline ({FORMAT})")
    try:
        window = Window(parse_instant(doc["window"]["from"]), parse_instant(doc["window"]["to"]))
        loaded = [Profile.from_dict(p) for p in doc["profiles"]]
    except (KeyError, TypeError) as exc:
        raise ValueError(f"the baseline {path} is incomplete: {exc}") from None
    return Baseline(
        window,
        str(doc.get("created", "")),
        str(doc.get("source", "")),
        {(p.agent, p.version): p for p in loaded},
    )
