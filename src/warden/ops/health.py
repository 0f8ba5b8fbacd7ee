"""The admin listener's operational routes: ``/metrics``, ``/healthz``, ``/readyz``.

These three are unauthenticated, as scrapers and kubelets expect; bind the
admin listener to loopback or a pod-local address (the default). Routes that
change state (approvals, kill switches) require tokens and live elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from warden.ops import metrics as ops_metrics

__all__ = ["Readiness", "add_health_routes"]

Readiness = Callable[[], tuple[bool, Mapping[str, Any]]]
"""Returns whether Warden is ready and the details that explain it."""


def add_health_routes(app: web.Application, readiness: Readiness) -> None:
    """Add ``/metrics``, ``/healthz`` and ``/readyz`` to ``app``."""

    async def metrics(_: web.Request) -> web.Response:
        # Readiness as gauges, so alerts see what /readyz would answer.
        ops_metrics.observe_readiness(*readiness())
        body = generate_latest(REGISTRY)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        ready, detail = readiness()
        body = {"status": "ready" if ready else "not_ready", **detail}
        return web.Response(
            status=200 if ready else 503,
            body=orjson.dumps(body, default=str),
            content_type="application/json",
        )

    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
