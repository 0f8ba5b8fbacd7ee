"""Upstream keys Warden holds, so that agents hold none (docs/credentials.md).

An upstream with ``credential`` set gets Warden's key on every request Warden
forwards to it, in place of the agent's: the configured header and every
header an SDK carries a key in (:data:`AGENT_CREDENTIAL_HEADERS`) are dropped
unread. An agent given no provider key has none to reach the provider with
around Warden.

Keys come from Warden's environment or from a file. A file is re-read when it
changes (a rotated Kubernetes Secret takes effect without a restart); a file
that cannot be read, or holds no usable key, keeps the last key and is counted
in ``warden_credential_reloads_total{result="failed"}``. A key is never
logged, recorded or shown: :class:`Credential` leaves it out of its ``repr``,
and errors name the variable or file, never the text.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from warden.config import CredentialConfig, UpstreamConfig
from warden.errors import ConfigError
from warden.ops import metrics

__all__ = ["AGENT_CREDENTIAL_HEADERS", "CHECK_INTERVAL_S", "Credential", "Credentials"]

log = logging.getLogger("warden.credentials")

AGENT_CREDENTIAL_HEADERS = frozenset(
    {
        "authorization",
        "x-api-key",
        "api-key",
        "x-goog-api-key",
        # With Warden's key, the agent must not choose which organization or project it bills.
        "openai-organization",
        "openai-project",
    }
)
"""Headers that carry or steer a credential; dropped from requests to an upstream Warden holds
a key for. A credential in the query string (``?key=``) is not: see docs/credentials.md."""

CHECK_INTERVAL_S = 10.0
"""How often key files are checked for a change (a Secret volume updates within a minute)."""


@dataclass(frozen=True, slots=True)
class Credential:
    """What Warden sends an upstream in place of the agent's credential."""

    header: str
    value: str = field(repr=False)
    """The header's whole value (``Bearer sk-...``): never log or record it."""
    drop: frozenset[str]
    """Lower-case names of the agent's headers to drop first (this header among them)."""


@dataclass(frozen=True, slots=True)
class _Stamp:
    """What identifies one version of a key file; a change means read it again."""

    inode: int
    size: int
    mtime_ns: int


@dataclass(slots=True)
class _KeyFile:
    upstream: str
    path: Path
    config: CredentialConfig
    protocol: str
    stamp: _Stamp | None


class Credentials:
    """The keys Warden holds, by upstream name; :meth:`load` reads them at start."""

    def __init__(self, held: Mapping[str, Credential], files: list[_KeyFile]) -> None:
        self._held = dict(held)
        self._files = files

    @classmethod
    def none(cls) -> Credentials:
        """No keys held: every agent's own credential goes to its upstream."""
        return cls({}, [])

    @classmethod
    def load(
        cls, upstreams: Mapping[str, UpstreamConfig], environ: Mapping[str, str]
    ) -> Credentials:
        """Read every configured key now.

        Raises :class:`ConfigError` naming the setting (never the key) when a
        variable is unset, a file unreadable, or a key empty or unfit for a header.
        """
        held: dict[str, Credential] = {}
        files: list[_KeyFile] = []
        for name, upstream in upstreams.items():
            config = upstream.credential
            if config is None:
                continue
            where = f"upstreams.{name}.credential"
            if config.env is not None:
                text = environ.get(config.env)
                if text is None:
                    raise ConfigError(
                        f"{where}.env: {config.env} is not set in Warden's environment"
                    )
                held[name] = _credential(
                    config, upstream.protocol, _key(text, f"{where}.env ({config.env})")
                )
                continue
            assert config.file is not None  # the config allows exactly one source
            path = Path(config.file)
            try:
                stamp, text = _read(path)
            except OSError as exc:
                raise ConfigError(f"{where}.file: cannot read {path}: {exc.strerror}") from None
            held[name] = _credential(
                config, upstream.protocol, _key(text, f"{where}.file ({path})")
            )
            files.append(_KeyFile(name, path, config, upstream.protocol, stamp))
        return cls(held, files)

    def __bool__(self) -> bool:
        return bool(self._held)

    def __repr__(self) -> str:
        return f"Credentials(upstreams={sorted(self._held)})"

    @property
    def watched(self) -> bool:
        """Whether any key comes from a file (and :meth:`watch` has work)."""
        return bool(self._files)

    def get(self, upstream: str) -> Credential | None:
        """Warden's credential for ``upstream``, or ``None`` when the agent brings its own."""
        return self._held.get(upstream)

    def reread(self) -> dict[str, Credential]:
        """Read the key files that changed since last read; blocking (run it off the loop).

        Returns the new credentials by upstream; :meth:`apply` puts them in use.
        A file that fails keeps its last key and is not marked read, so the
        next check tries again.
        """
        changed: dict[str, Credential] = {}
        for key_file in self._files:
            try:
                stamp = _stamp(key_file.path)
                if stamp == key_file.stamp:
                    continue
                stamp, text = _read(key_file.path)
                where = f"upstreams.{key_file.upstream}.credential.file ({key_file.path})"
                credential = _credential(key_file.config, key_file.protocol, _key(text, where))
            except (OSError, ConfigError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) else str(exc)
                if key_file.stamp is not None:  # warn once per failure, not every check
                    log.warning(
                        "upstreams.%s.credential: the key file changed but cannot be used (%s); "
                        "the last key stays in use",
                        key_file.upstream,
                        reason,
                    )
                    metrics.child(metrics.CREDENTIAL_RELOADS, key_file.upstream, "failed").inc()
                key_file.stamp = None
                continue
            key_file.stamp = stamp
            changed[key_file.upstream] = credential
        return changed

    def apply(self, changed: Mapping[str, Credential]) -> None:
        """Use the credentials :meth:`reread` returned from now on."""
        for upstream, credential in changed.items():
            self._held[upstream] = credential
            metrics.child(metrics.CREDENTIAL_RELOADS, upstream, "ok").inc()
            log.info(
                "upstreams.%s.credential: the key file changed; the new key is in use", upstream
            )

    async def watch(self, interval_s: float | None = None) -> None:
        """Check the key files every ``interval_s`` (:data:`CHECK_INTERVAL_S`) until cancelled."""
        while True:
            await asyncio.sleep(CHECK_INTERVAL_S if interval_s is None else interval_s)
            self.apply(await asyncio.to_thread(self.reread))


def _credential(config: CredentialConfig, protocol: str, key: str) -> Credential:
    header = config.header or ("x-api-key" if protocol == "anthropic" else "Authorization")
    scheme = config.scheme
    if scheme is None:
        scheme = "Bearer" if header.lower() == "authorization" else ""
    value = f"{scheme} {key}" if scheme else key
    return Credential(header, value, AGENT_CREDENTIAL_HEADERS | {header.lower()})


def _key(text: str, where: str) -> str:
    lines = text.strip().splitlines()
    key = lines[0].strip() if lines else ""
    if not key:
        raise ConfigError(f"{where} holds no key")
    # Visible ASCII only: anything else could split the header or be mangled on the wire.
    if not all("!" <= c <= "~" for c in key):
        raise ConfigError(f"{where}: the key holds characters a header cannot carry")
    return key


def _stamp(path: Path) -> _Stamp:
    st = os.stat(path)  # follows links: a Secret volume swaps the ..data link
    return _Stamp(st.st_ino, st.st_size, st.st_mtime_ns)


def _read(path: Path) -> tuple[_Stamp, str]:
    with path.open(encoding="utf-8", errors="replace") as f:
        st = os.fstat(f.fileno())
        return _Stamp(st.st_ino, st.st_size, st.st_mtime_ns), f.read(64 * 1024)
