"""A reload that fails for a passing reason is tried again; a refused bundle is not.

The new bundle's fingerprint (watched folder) or ETag (bundle server) is
remembered only once the bundle itself was judged: activated, or refused for
what it is. When something else failed (the state store locked, the audit log
unavailable, a compile timed out on a busy machine) the next poll tries it
again, so the older revision does not keep deciding until someone touches
the files or restarts Warden.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import sys
import tarfile
import time
import zlib
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from prometheus_client import REGISTRY

from tests.functional.conftest import make_config, serving
from tests.functional.test_bundle_rollback_functional import (
    activations,
    put_in_place,
    release,
    status_error,
    watched,
)
from tests.functional.test_changelog_functional import signing_key
from tests.functional.test_policy_engine import config, tarball, wait_for, write_policy
from warden.errors import AuditError, PolicyError
from warden.policy.activation import Activator
from warden.policy.bundle import Bundle, BundleError
from warden.policy.engine import PolicyEngine
from warden.server import Warden
from warden.testing import MockLLM


def failures() -> float:
    return REGISTRY.get_sample_value("warden_policy_reloads_total", {"result": "failure"}) or 0


async def test_a_reload_held_up_by_a_locked_state_store_is_tried_again(
    llm: MockLLM, tmp_path: Path
) -> None:
    private, public, key_id = signing_key(tmp_path / "release")
    now = int(time.time())
    loose = release(tmp_path, "loose", 500, "rev-1", private, key_id, now - 120)
    tight = release(tmp_path, "tight", 10, "rev-2", private, key_id, now - 60)
    folder, policy = watched(tmp_path, loose, public, key_id)
    async with Warden(make_config(tmp_path, llm.url, policy=policy)) as warden:
        # Another process holds the state database's write lock while rev-2 is
        # deployed: its signing time cannot be recorded (rollback protection).
        locker = sqlite3.connect(tmp_path / "state.db", isolation_level=None)
        try:
            locker.execute("BEGIN IMMEDIATE")
            put_in_place(tight, folder)
            status = await status_error(warden, "database is locked")
            assert status["revision"] == "rev-1"
        finally:
            locker.close()
        await wait_for(lambda: warden.readiness()[1]["policy"]["revision"] == "rev-2")
        assert warden.readiness()[1]["policy"]["last_error"] is None
    assert activations(tmp_path) == ["rev-1", "rev-2"]


async def test_a_bundle_server_bundle_is_fetched_again_only_after_a_passing_failure(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    served = {"body": tarball(write_policy(tmp_path / "v1", revision="srv-1")), "etag": '"1"'}
    asked: list[str | None] = []

    async def serve(request: web.Request) -> web.Response:
        asked.append(request.headers.get("If-None-Match"))
        if asked[-1] == served["etag"]:
            return web.Response(status=304)
        return web.Response(body=served["body"], headers={"ETag": str(served["etag"])})

    audit_down = True

    async def record(bundle: Bundle) -> None:
        # Where the engine stops a bundle it cannot record or must refuse.
        if bundle.revision == "srv-2" and audit_down:
            raise AuditError("the audit log cannot take records")
        if bundle.revision == "srv-3":
            raise BundleError("support: signed before the newest bundle of this name")

    app = web.Application()
    app.router.add_get("/bundles/support.tar.gz", serve)
    async with serving(app) as port:
        url = f"http://127.0.0.1:{port}/bundles/support.tar.gz"
        eng = await PolicyEngine.start(
            config(tmp_path / "unused", bundle_url=url, workers=1), pre_activate=record
        )
        try:
            assert eng.revision == "srv-1"
            served["body"] = tarball(write_policy(tmp_path / "v2", "v2", revision="srv-2"))
            served["etag"] = '"2"'
            with caplog.at_level(logging.WARNING, logger="warden.policy"):
                await wait_for(lambda: eng.status()["last_error"] is not None)
                assert "AuditError: the audit log cannot take records" in eng.status()["last_error"]
                # Fetched whole again at the next polls, not answered 304.
                await wait_for(lambda: asked.count(None) >= 3)
            assert "will be tried again in 0.1 s" in caplog.text
            assert eng.revision == "srv-1"
            audit_down = False
            await wait_for(lambda: eng.revision == "srv-2")
            assert eng.status()["last_error"] is None

            # A bundle refused for what it is: fetched once, reported once.
            before = failures()
            served["body"] = tarball(write_policy(tmp_path / "v3", "v3", revision="srv-3"))
            served["etag"] = '"3"'
            await wait_for(lambda: eng.status()["last_error"] is not None)
            fetched = len(asked)
            await wait_for(lambda: len(asked) >= fetched + 3)
            assert asked[fetched:] == ['"3"'] * (len(asked) - fetched)
            assert failures() == before + 1
            assert eng.revision == "srv-2"
        finally:
            await eng.close()


async def test_a_compile_that_timed_out_is_tried_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A machine too busy to start a policy worker in time, then not.
    busy = tmp_path / "busy"
    busy.touch()
    python = tmp_path / "python"
    python.write_text(
        f'#!/bin/sh\n[ -e "{busy}" ] && exec sleep 60\nexec "{sys.executable}" "$@"\n'
    )
    python.chmod(0o755)
    cfg = config(write_policy(tmp_path / "b", revision="r1"), workers=1, watch=True)
    eng = PolicyEngine(cfg, python=str(python), start_timeout_s=3)
    activator = Activator.for_config(eng, cfg)
    try:
        assert not await activator.poll_once()
        assert "did not compile within 3 s" in str(eng.status()["last_error"])
        busy.unlink()
        later = time.monotonic() + cfg.poll_interval_s  # the next poll's time
        monkeypatch.setattr("warden.policy.activation.time.monotonic", lambda: later)
        assert await activator.poll_once()
        assert eng.revision == "r1"
    finally:
        await activator.stop()
        await eng.close()


async def test_a_bundle_that_does_not_compile_is_not_tried_again(tmp_path: Path) -> None:
    root = write_policy(tmp_path / "b", revision="r1")
    (root / "warden" / "broken.rego").write_text("package warden\n\nx if {\n")
    cfg = config(root, workers=1, watch=True)
    eng = PolicyEngine(cfg)
    activator = Activator.for_config(eng, cfg)
    try:
        before = failures()
        assert not await activator.poll_once()
        assert not await activator.poll_once()
        assert failures() == before + 1
        assert eng.revision is None
    finally:
        await activator.stop()
        await eng.close()


async def test_a_bundle_server_bomb_is_refused_before_warden_is_exhausted(tmp_path: Path) -> None:
    # 25,000 hidden entries in 40 kB, once a million: each cost time and memory.
    squeeze = zlib.compressobj(6, zlib.DEFLATED, 31)
    hidden = tarfile.TarInfo(".h").tobuf(tarfile.USTAR_FORMAT)
    bomb = squeeze.compress(hidden * 25_000) + squeeze.flush()
    asked: list[str | None] = []

    async def serve(request: web.Request) -> web.Response:
        asked.append(request.headers.get("If-None-Match"))
        return web.Response(body=bomb, headers={"ETag": '"bomb"'})

    app = web.Application()
    app.router.add_get("/bundles/support.tar.gz", serve)
    async with serving(app) as port:
        url = f"http://127.0.0.1:{port}/bundles/support.tar.gz"
        eng = await PolicyEngine.start(config(tmp_path / "unused", bundle_url=url, workers=1))
        try:
            assert not eng.ready
            assert "archive has over 20000 entries" in str(eng.status()["last_error"])
            await wait_for(lambda: len(asked) >= 2)
            assert asked[1] == '"bomb"'  # refused for what it is: not fetched again
        finally:
            await eng.close()


async def test_data_too_deep_for_the_engine_is_refused_and_polling_goes_on(
    tmp_path: Path,
) -> None:
    # Each data file loads, but placed under its folders the whole nests past what
    # JSON carries: the polling task died on it, and no later bundle was activated.
    root = write_policy(tmp_path / "b", revision="r1")
    cfg = config(root, workers=1, watch=True)
    eng = PolicyEngine(cfg)
    activator = Activator.for_config(eng, cfg)
    try:
        assert await activator.poll_once()
        deep: Any = 1
        for _ in range(250):
            deep = {"k": deep}
        folder = root / "warden" / "x" / "y" / "z"
        folder.mkdir(parents=True)
        (folder / "data.json").write_text(json.dumps(deep))
        write_policy(root, revision="r2")
        assert not await activator.poll_once()
        assert "cannot be sent to the engine" in str(eng.status()["last_error"])
        assert eng.revision == "r1"
        (folder / "data.json").unlink()
        write_policy(root, revision="r3")
        assert await activator.poll_once()
        assert eng.revision == "r3"
    finally:
        await activator.stop()
        await eng.close()


class _Source:
    """A bundle source that returns its one bundle until it is seen, as the real ones do."""

    description = "test"

    def __init__(self, bundle: Bundle) -> None:
        self.bundle, self.seen, self.polls = bundle, False, 0

    async def poll(self) -> Bundle | None:
        self.polls += 1
        if self.seen:
            return None
        self.seen = True
        return self.bundle

    def forget(self) -> None:
        self.seen = False

    async def close(self) -> None:
        pass


class _Failing:
    """An engine whose activation always fails for a reason that may pass."""

    def __init__(self) -> None:
        self.tries = 0

    async def activate(self, bundle: Bundle) -> bool:
        self.tries += 1
        raise PolicyError("the state store is busy")

    def report_failure(self, message: str) -> None:
        pass


async def test_a_failure_that_may_pass_is_tried_later_each_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A compile that always times out was tried at every poll, keeping the workers'
    # cores busy beside live decisions.
    now = [0.0]
    monkeypatch.setattr("warden.policy.activation.time.monotonic", lambda: now[0])
    bundle = Bundle(revision="r1", roots=(), modules=(), data={}, source="test")
    engine, source = _Failing(), _Source(bundle)
    activator = Activator(engine, source, interval_s=5)
    tried_at = []
    for _ in range(40):  # 200 s of polls
        before = engine.tries
        await activator.poll_once()
        if engine.tries > before:
            tried_at.append(now[0])
        now[0] += 5
    assert tried_at == [0, 5, 15, 35, 75, 155]
    assert source.polls == 40  # a changed bundle is still seen at every poll
    # A bundle server sending no ETag sends the same bundle at every poll: the same
    # back-off holds.
    engine.tries, now[0] = 0, 0.0
    forgetful = Activator(engine, _Source(bundle), interval_s=5)
    forgetful.source.forget = lambda: None  # type: ignore[method-assign]
    for _ in range(40):
        forgetful.source.seen = False  # type: ignore[attr-defined]
        await forgetful.poll_once()
        now[0] += 5
    assert engine.tries == 6
