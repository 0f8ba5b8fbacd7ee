"""Keeping the active bundle current: watched folders and an HTTP bundle server.

Both sources are polled every ``policy.poll_interval_s``:

* :class:`DirectorySource` fingerprints the configured bundle paths (each
  policy file's path, size and modification time) and reloads only when the
  fingerprint changes; the engine then skips the swap if the files' contents
  are the same as the active bundle's.
* :class:`HttpSource` fetches ``policy.bundle_url`` (an OPA ``.tar.gz``) with
  ``If-None-Match``, so an unchanged bundle costs one ``304``. An archive that
  ends early (a download cut short) is fetched again at the next poll.

A new bundle goes to :meth:`PolicyEngine.activate`, which compiles it in new
workers and swaps it in atomically, or keeps the last good one and reports
why (log line, ``warden_policy_reloads_total{result="failure"}``, status).
A bundle refused for what it is (it does not load, compile or verify, or it
is older than one activated) is tried once per change, not on every poll. A
failure that may pass (the state store or audit log briefly unavailable, a
compile that timed out on a busy machine) is retried, first at the next poll,
then twice as long after each failure (up to :data:`RETRY_MAX_S`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

import aiohttp

from warden.config import PolicyConfig, SigningConfig
from warden.errors import PolicyError
from warden.policy.bundle import (
    MAX_BUNDLE_BYTES,
    Bundle,
    BundleError,
    build_bundle,
    bundle_name,
    load_bundle,
    merge_bundles,
    read_tarball,
)
from warden.policy.bundle.files import BundleCutShort
from warden.tasks import spawn
from warden.urls import scrub, shown_url, url_secrets

__all__ = ["Activator", "BundleSource", "BundleTarget", "DirectorySource", "HttpSource"]

log = logging.getLogger("warden.policy")
_HTTP_TIMEOUT_S = 10.0


class BundleTarget(Protocol):
    """What takes new bundles: :class:`warden.policy.engine.PolicyEngine`.

    A protocol, so that this module never imports the engine, which imports it.
    """

    async def activate(self, bundle: Bundle) -> bool:
        """Compile and swap in ``bundle``; raise :class:`PolicyError` after reporting it.

        A :class:`BundleError` refuses the bundle itself; anything else that
        failed is raised as a plain :class:`PolicyError` from its cause.
        """
        ...

    def report_failure(self, message: str) -> None:
        """Record why a bundle could not be loaded."""
        ...


class BundleSource(Protocol):
    """Somewhere bundles come from."""

    description: str

    async def poll(self) -> Bundle | None:
        """A newly changed bundle, or ``None`` if nothing changed; raise on a broken one.

        A change is remembered once returned or refused with :class:`BundleError`;
        after any other error the next poll tries it again.
        """
        ...

    def forget(self) -> None:
        """Forget the last change: its activation failed for a passing reason."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


def _fingerprint(paths: Sequence[str]) -> tuple[tuple[str, int, int], ...]:
    entries: list[tuple[str, int, int]] = []
    for raw in paths:
        root = Path(raw)
        candidates = sorted(root.rglob("*")) if root.is_dir() else [root]
        for file in candidates:
            try:
                st = file.stat()
            except OSError:
                entries.append((str(file), -1, -1))
                continue
            if file.is_file():
                entries.append((str(file), st.st_size, st.st_mtime_ns))
    return tuple(entries)


class DirectorySource:
    """Bundle directories or archives on disk (``policy.bundles``), merged."""

    def __init__(self, paths: Sequence[str], signing: SigningConfig) -> None:
        self.paths = tuple(paths)
        self.signing = signing
        self.description = ", ".join(self.paths)
        self._seen: tuple[tuple[str, int, int], ...] | None = None

    def _load(self) -> Bundle | None:
        fingerprint = _fingerprint(self.paths)
        if fingerprint == self._seen:
            return None
        try:
            # Syntax is checked by the workers when they compile, not in the proxy process.
            bundle = merge_bundles(
                [load_bundle(p, signing=self.signing, check_syntax=False) for p in self.paths]
            )
        except BundleError:
            self._seen = fingerprint  # broken as written: reported once, not every poll
            raise
        self._seen = fingerprint
        return bundle

    async def poll(self) -> Bundle | None:
        """Reload if any file under the paths changed since the last poll."""
        return await asyncio.to_thread(self._load)

    def forget(self) -> None:
        """Load the paths again at the next poll, changed or not."""
        self._seen = None

    async def close(self) -> None:
        """Nothing to release."""


class HttpSource:
    """An OPA-style bundle server: ``GET bundle_url`` returning a ``.tar.gz``."""

    def __init__(
        self, url: str, signing: SigningConfig, *, timeout_s: float = _HTTP_TIMEOUT_S
    ) -> None:
        self.url = url
        self.signing = signing
        self.description = shown_url(url)
        self._secrets = url_secrets(url)
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._etag: str | None = None
        self._session: aiohttp.ClientSession | None = None

    async def poll(self) -> Bundle | None:
        """Fetch the bundle unless the server says it has not changed (``304``)."""
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        headers = {"Accept": "application/gzip, application/octet-stream"}
        if self._etag is not None:
            headers["If-None-Match"] = self._etag
        try:
            async with self._session.get(self.url, headers=headers) as resp:
                if resp.status == 304:
                    return None
                if resp.status != 200:
                    raise BundleError(
                        f"{self.description}: bundle server answered HTTP {resp.status}"
                    )
                if (resp.content_length or 0) > MAX_BUNDLE_BYTES:
                    raise BundleError(
                        f"{self.description}: bundle is over {MAX_BUNDLE_BYTES} bytes"
                    )
                # The whole body: read(n) returns what is buffered so far, and a
                # cut tarball stored under the new ETag would never be fetched again.
                chunks: list[bytes] = []
                size = 0
                async for chunk in resp.content.iter_any():
                    size += len(chunk)
                    if size > MAX_BUNDLE_BYTES:
                        raise BundleError(
                            f"{self.description}: bundle is over {MAX_BUNDLE_BYTES} bytes"
                        )
                    chunks.append(chunk)
                body = b"".join(chunks)
                etag = resp.headers.get("ETag")
        except (aiohttp.ClientError, TimeoutError) as exc:
            # Some client errors quote the URL they failed on.
            why = scrub(str(exc) or type(exc).__name__, self._secrets)
            raise BundleError(f"{self.description}: cannot fetch bundle: {why}") from None
        # The path's last segment only: the authority may carry a password.
        name = bundle_name(urlsplit(self.url).path.rstrip("/")) or "bundle"
        try:
            bundle = await asyncio.to_thread(self._build, body, name)
        except BundleCutShort:
            # A body that ends at the connection's close may be cut without aiohttp
            # knowing: its ETag is not kept, so the next poll fetches it whole.
            raise
        except BundleError:
            self._etag = etag  # broken as served: reported once per change, not every poll
            raise
        self._etag = etag
        return bundle

    def _build(self, body: bytes, name: str) -> Bundle:
        files = read_tarball(body, label=self.description)
        return build_bundle(
            files, source=self.description, name=name, signing=self.signing, check_syntax=False
        )

    def forget(self) -> None:
        """Fetch the bundle whole at the next poll, even if its ETag is unchanged."""
        self._etag = None

    async def close(self) -> None:
        """Close the HTTP session."""
        if self._session is not None:
            await self._session.close()
            self._session = None


RETRY_MAX_S = 300.0
"""The longest wait before a bundle whose activation failed for a passing reason is tried
again (it starts at the poll interval and doubles)."""


def _refused(exc: PolicyError) -> bool:
    """Whether the engine refused the bundle for what it is, not for a failure that may pass.

    The engine raises a :class:`BundleError` (compile error, engine fault, worker
    crash, rollback refusal) as it is and wraps anything else (state store,
    audit log, OS) in a plain :class:`PolicyError`. A compile that timed out is a
    BundleError raised while handling the ``TimeoutError``: on a busy machine the
    same bundle may compile in time at the next poll.
    """
    return isinstance(exc, BundleError) and not isinstance(exc.__context__, TimeoutError)


def _identity(bundle: Bundle) -> tuple[object, ...]:
    """What tells one bundle from another: its revision, files and signer."""
    hashes = tuple(sorted(bundle.file_hashes.items())) if bundle.file_hashes else None
    return (bundle.revision, hashes, bundle.signed_by)


class Activator:
    """Polls a :class:`BundleSource` and hands new bundles to the engine."""

    def __init__(self, engine: BundleTarget, source: BundleSource, interval_s: float) -> None:
        self.engine = engine
        self.source = source
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None
        self._failures = 0
        """Activations in a row that failed for a reason that may pass."""
        self._retry_at: float | None = None
        """When the source forgets the failed change, so the next poll tries it again."""
        self._failed: tuple[object, ...] | None = None
        """The bundle that failed, while it waits: a server sending no ETag sends it again."""

    @classmethod
    def for_config(cls, engine: BundleTarget, config: PolicyConfig) -> Activator:
        """The bundle server if ``bundle_url`` is set, else the ``bundles`` paths."""
        source: BundleSource
        if config.bundle_url is not None:
            source = HttpSource(config.bundle_url, config.signing)
        else:
            source = DirectorySource(config.bundles, config.signing)
        return cls(engine, source, config.poll_interval_s)

    async def poll_once(self) -> bool:
        """Check the source once; return whether a new revision was activated."""
        if self._retry_at is not None and time.monotonic() >= self._retry_at:
            self._retry_at = None
            self.source.forget()
        try:
            bundle = await self.source.poll()
        except PolicyError as exc:
            self.engine.report_failure(str(exc))
            return False
        except Exception as exc:  # a poll must never stop the loop
            self.engine.report_failure(f"{self.source.description}: {type(exc).__name__}: {exc}")
            return False
        if bundle is None:
            return False
        if self._retry_at is not None and _identity(bundle) == self._failed:
            return False  # the same bundle again, before its retry is due
        try:
            activated = await self.engine.activate(bundle)
        except PolicyError as exc:  # activate() has reported it
            self._retry_at = None
            if _refused(exc):
                self._failures = 0
                return False
            # Tried again, each time later (up to RETRY_MAX_S): a compile that always
            # times out would otherwise keep the workers' cores busy beside live
            # decisions. A changed bundle is still taken at the next poll.
            delay = min(self.interval_s * 2**self._failures, max(RETRY_MAX_S, self.interval_s))
            self._retry_at, self._failed = time.monotonic() + delay, _identity(bundle)
            self._failures += 1
            # The engine logs each new error; say once that it is retried.
            log.log(
                logging.DEBUG if self._failures > 1 else logging.WARNING,
                "policy bundle from %s will be tried again in %g s (later each time it fails)",
                self.source.description,
                delay,
            )
            return False
        except Exception as exc:  # a bug must never stop the polling
            self._retry_at = None
            self.engine.report_failure(f"{self.source.description}: {type(exc).__name__}: {exc}")
            return False
        self._failures, self._retry_at = 0, None
        return activated

    def start(self) -> None:
        """Poll in the background every ``interval_s``."""
        if self._task is None:
            self._task = spawn(self._run(), name="policy-activation")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.poll_once()

    async def stop(self) -> None:
        """Stop polling and release the source."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.source.close()
