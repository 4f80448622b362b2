"""The built-in dashboard: a static page that polls /v1/history and draws SVG charts.

No build step and no network: the page, its script and its styles ship in
``lossd/server/static``; the charts are drawn by that script as inline SVG.
The data is the process's own :class:`~lossd.server.monitoring.history.History`, so the
dashboard works without Prometheus; with ``prometheus_url`` set it is the whole
fleet's, from Prometheus (:mod:`lossd.server.gateway.fleet`).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from lossd.server.gateway.fleet import PrometheusHistory
from lossd.server.monitoring import Monitoring
from lossd.server.monitoring.core import FLUSH_SECONDS

__all__ = ["install_dashboard", "STATIC_DIR"]

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"  # lossd.server is a namespace package: no importlib.resources


def install_dashboard(app: FastAPI, monitoring: Monitoring) -> None:
    """Add GET /dashboard, GET /v1/history and the /static files to ``app``."""
    settings = monitoring.settings
    fleet = None
    if settings.prometheus_url:
        fleet = PrometheusHistory(settings.prometheus_url, interval=settings.history_interval_seconds, bins=monitoring.bins)
        app.router.on_shutdown.append(fleet.close)

    @app.get("/dashboard", response_class=HTMLResponse, tags=["dashboard"])
    async def dashboard() -> HTMLResponse:
        """Loss and ECE over time and reliability diagrams per model/dataset/split, refreshed live."""
        return HTMLResponse((STATIC_DIR / "dashboard.html").read_text(encoding="utf-8"), headers={"Cache-Control": "no-cache"})

    @app.get("/v1/history", tags=["dashboard"])
    async def history() -> JSONResponse:
        """Per-interval mean loss and ECE, and the reliability diagram over the window, per model/dataset/split.

        From this process's history, or from Prometheus (every replica) when ``prometheus_url`` is set."""
        if fleet is not None:
            return JSONResponse(await fleet.snapshot(), headers={"Cache-Control": "no-store"})
        await monitoring.flush(FLUSH_SECONDS)  # the evaluations answered before this read are in it
        snapshot = await asyncio.to_thread(monitoring.history.snapshot)  # ECE finalization stays off the event loop
        return JSONResponse(snapshot, headers={"Cache-Control": "no-store"})

    app.mount("/static", StaticFiles(directory=str(STATIC_DIR)), name="static")
